//! [`NetnsGuard`]: a network namespace of the test's own, with the test
//! addresses on an interface `d0`.
//!
//! Made and removed with iproute2 (`ip netns add/del`), so the namespace is
//! bind-mounted at /var/run/netns/NAME. Code runs inside it through
//! [`NetnsGuard::in_netns`], which enters the namespace on a fresh thread:
//! sockets made there belong to the namespace for their whole life. The
//! namespace is never entered with `ip netns exec` (it remounts /sys).
//!
//! `d0` is a dummy interface where the kernel has them (CONFIG_DUMMY), else
//! one end of a veth pair whose other end (`d0p`) stays in the namespace too.
//! Either way every test address is local to the namespace, and nothing
//! leaves it.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
};

use crate::unique_suffix;

/// The addresses put on `d0` in every test namespace (IPv6 ones with `nodad`).
pub const TEST_ADDRS: &[&str] = &[
    "192.0.2.1/24",
    "198.51.100.1/24",
    "203.0.113.1/24",
    "10.20.0.1/16",
    "2001:db8::1/64",
    "fd00:20::1/48",
];

const NETNS_DIR: &str = "/var/run/netns";

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetnsGuard {
    name: String,
}

impl NetnsGuard {
    /// `ip netns add llme-<pid>-<n>`, then `lo` and `d0` up with [`TEST_ADDRS`].
    pub fn new() -> NetnsGuard {
        let name = format!("llme-{}", unique_suffix());
        ip(&["netns", "add", &name]);
        // From here on drop cleans up, even if a later step panics.
        let guard = NetnsGuard { name };
        guard.ip(&["link", "set", "lo", "up"]);
        if try_ip(&["-n", &guard.name, "link", "add", "d0", "type", "dummy"]).is_err() {
            guard.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d0p"]);
            guard.ip(&["link", "set", "d0p", "up"]);
        }
        guard.ip(&["link", "set", "d0", "up"]);
        for addr in TEST_ADDRS {
            if addr.contains(':') {
                guard.ip(&["-6", "addr", "add", addr, "dev", "d0", "nodad"]);
            } else {
                guard.ip(&["addr", "add", addr, "dev", "d0"]);
            }
        }
        guard
    }

    /// The namespace name, as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file: /var/run/netns/NAME.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`; panics with ip's stderr when it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `f` on a new thread that entered this namespace with
    /// setns(CLONE_NEWNET), and returns its result (a panic in `f` is
    /// propagated). Sockets `f` creates stay in the namespace.
    pub fn in_netns<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        in_netns(&self.path(), f)
    }
}

impl Default for NetnsGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = try_ip(&["netns", "del", &self.name]) {
            eprintln!("warning: cannot delete netns {}: {e}", self.name);
        }
    }
}

/// Runs `f` on a new thread inside the network namespace whose file is
/// `ns_path` (e.g. /var/run/netns/NAME).
pub fn in_netns<R: Send>(ns_path: &Path, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        let handle = s.spawn(|| {
            enter_netns(ns_path)
                .unwrap_or_else(|e| panic!("cannot enter netns {}: {e}", ns_path.display()));
            f()
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// setns(CLONE_NEWNET) of the calling thread into the namespace at `ns_path`.
pub fn enter_netns(ns_path: &Path) -> std::io::Result<()> {
    let file = File::open(ns_path)?;
    // SAFETY: the fd is valid for the duration of the call (owned by `file`);
    // setns only changes the calling thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"))
}

fn try_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
