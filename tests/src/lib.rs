//! Harness for the root integration tests of llm-egress.
//!
//! Every test builds its own world out of guards, and every guard undoes what
//! it made when it is dropped, also when the test panics:
//!
//! - [`CgroupGuard`]: a cgroup directory below the cgroup2 mount (never the
//!   root itself), with nested children; drop kills what is inside and
//!   removes the directories bottom-up.
//! - [`NetnsGuard`]: a network namespace with `lo` and an interface `d0`
//!   carrying the test addresses ([`TEST_ADDRS`]); [`NetnsGuard::in_netns`]
//!   runs code on a thread inside it.
//! - [`TcpServer`], [`HttpServer`], [`UdpServer`], [`servers::ByteServer`]:
//!   counting servers inside a namespace; [`fake_provider`]: TLS servers
//!   speaking the OpenAI and Anthropic wire formats, and [`curl`] to call
//!   them from a workload.
//! - [`DnsServer`]: dnsmasq on a loopback port, answering fixed names.
//! - [`proxy::Proxy`] (HTTP CONNECT and SOCKS5): forward proxies
//!   (HTTP CONNECT, SOCKS5) inside a namespace.
//! - [`redis::RedisServer`]: redis-server on a loopback port (AUTH, TLS),
//!   killed, restarted empty or hung on demand, for the fleet budgets.
//! - [`fake_kube::FakeKube`]: a Kubernetes API server on 127.0.0.1 (HTTPS,
//!   bearer token) that lists the pods of a node.
//! - [`Probe`]: runs the `egress-probe` binary, which moves itself into a
//!   cgroup and a namespace and then connects or sends;
//!   [`probe::confine`] runs any other program (curl) the same way.
//! - [`Agent`]: the `llm-egress` binary with its own policy file, pin
//!   directory, metrics port and audit log; [`PinDir`] removes the pin
//!   directory even when the agent was killed and never restarted.
//!
//! [`scenario`] holds what the agent tests share: policy text for a test
//! cgroup and checks that panic with the agent's stderr and audit log.
//!
//! Safety rules the guards keep: nothing is attached to or removed from the
//! cgroup2 root; traffic only goes to loopback (the agent's metrics) or to
//! addresses inside namespaces a test created; names carry the test process
//! id and a counter so tests can run in parallel.

pub mod agent;
pub mod bench;
pub mod bpf;
pub mod cgroup;
pub mod client_process;
pub mod curl;
pub mod dns;
pub mod fake_gemini;
pub mod fake_h2;
pub mod fake_kube;
pub mod fake_provider;
pub mod fake_shape;
#[cfg(test)]
mod fake_vectors;
pub mod go_client;
pub mod http;
pub mod netns;
pub mod nspawn;
pub mod openssl_static;
pub mod podman;
pub mod probe;
pub mod prom;
pub mod prometheus;
pub mod proxy;
pub mod redis;
pub mod scenario;
pub mod servers;
pub mod test_ca;

pub use agent::{Agent, PinDir, agent_bin};
pub use cgroup::{CgroupGuard, cgroup2_mount};
pub use dns::DnsServer;
pub use netns::{NetnsGuard, TEST_ADDRS};
pub use probe::{LoopReport, Probe, ProbeCmd, ProbeResult, ProbeRun};
pub use servers::{HttpServer, TcpServer, TlsServer, UdpServer};

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `<pid>-<n>`: unique among the guards of every test process on the machine.
pub fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Panics unless the tests run as root: everything here needs it.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests need root (cgroups, network namespaces, BPF); run them with sudo or as root"
    );
}

/// Calls `f` every `interval` until it returns `Some`, for at most `timeout`
/// (`f` runs at least once).
pub fn wait_until<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", unique_suffix()));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        // 0755 whatever the umask: the agent refuses paths below a
        // directory others can write to (docs/operations.md).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("cannot chmod temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "warning: cannot remove temp dir {}: {e}",
                self.path.display()
            );
        }
    }
}

/// A TOML basic string literal holding `s`.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The last `max` characters of `s`, for panic messages.
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The name of an errno value (`EPERM`), or `E<n>`.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::EAGAIN => "EAGAIN",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => return format!("E{errno}"),
    };
    name.to_string()
}

/// The Python with the official openai and anthropic SDKs:
/// `LLM_EGRESS_TOKENS_PYTHON` (`cargo xtask test` sets it), else setup's
/// venv (target/pyenv) when it is there.
pub fn sdk_python() -> Option<String> {
    if let Ok(p) = std::env::var("LLM_EGRESS_TOKENS_PYTHON") {
        return Some(p);
    }
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python");
    venv.exists().then(|| venv.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_str_escapes_quotes_and_backslashes() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("/sys/fs/cgroup/x"), "\"/sys/fs/cgroup/x\"");
    }

    #[test]
    fn tail_keeps_the_end() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        // Never cuts a character in half.
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("aé", 2), "é");
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EPERM), "EPERM");
        assert_eq!(errno_name(9999), "E9999");
    }
}
