//! [`Probe`]: runs the `egress-probe` binary in a cgroup and a namespace.
//!
//! Integration tests find the binary with
//! `Probe::new(env!("CARGO_BIN_EXE_egress-probe"))`, or [`Probe::beside_test_exe`]
//! from library code (where that variable does not exist). Each call starts
//! one probe process (its pid is the tgid the agent reports), which may run
//! several commands in order; see src/bin/egress-probe.rs for the protocol.
//!
//! [`confine`] prepares any other program (curl, ...) to run the same way:
//! in a test cgroup and a test network namespace.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

use crate::{NetnsGuard, errno_name};

/// One command of a probe run.
#[derive(Clone, Debug)]
pub enum ProbeCmd {
    /// TCP connect, then close.
    Connect(String),
    /// One datagram with sendto() on an unconnected UDP socket.
    Udp(String),
    /// connect() a UDP socket, then send() one datagram.
    UdpConnect(String),
    /// N times TCP connect + close.
    ConnectLoop(String, u64),
}

impl ProbeCmd {
    fn push_args(&self, args: &mut Vec<String>) {
        match self {
            ProbeCmd::Connect(a) => args.extend(["connect".into(), a.clone()]),
            ProbeCmd::Udp(a) => args.extend(["udp".into(), a.clone()]),
            ProbeCmd::UdpConnect(a) => args.extend(["udp-connect".into(), a.clone()]),
            ProbeCmd::ConnectLoop(a, n) => {
                args.extend(["connect-loop".into(), a.clone(), n.to_string()])
            }
        }
    }
}

/// The outcome of one command.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    pub ok: bool,
    pub errno: Option<i32>,
    /// The JSON line as printed.
    pub raw: Value,
}

impl ProbeResult {
    /// `Ok(())`, or `Err(errno)`.
    pub fn as_result(&self) -> Result<(), i32> {
        if self.ok {
            Ok(())
        } else {
            Err(self.errno.unwrap_or(-1))
        }
    }
}

/// One probe process.
#[derive(Clone, Debug)]
pub struct ProbeRun {
    /// The probe's pid (= the tgid in the agent's events).
    pub pid: u32,
    pub results: Vec<ProbeResult>,
    pub stderr: String,
}

/// What `connect-loop` reports.
#[derive(Clone, Debug)]
pub struct LoopReport {
    pub n: u64,
    pub failures: u64,
    pub elapsed_ns: u64,
    /// The errno of the first failure.
    pub errno: Option<i32>,
}

/// The probe binary.
#[derive(Clone, Debug)]
pub struct Probe {
    bin: PathBuf,
}

impl Probe {
    /// `bin`: the egress-probe executable (`env!("CARGO_BIN_EXE_egress-probe")`).
    pub fn new(bin: impl Into<PathBuf>) -> Probe {
        Probe { bin: bin.into() }
    }

    /// The `egress-probe` that cargo built beside the running test
    /// executable (`<target>/<profile>/egress-probe`, the test being
    /// `<target>/<profile>/deps/x`); panics when it is not there.
    pub fn beside_test_exe() -> Probe {
        let exe = std::env::current_exe()
            .unwrap_or_else(|e| panic!("cannot find the test executable: {e}"));
        let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        let bin = dir.join("egress-probe");
        assert!(
            bin.is_file(),
            "{} not found: `cargo test -p llm-egress-tests` builds it (or `cargo build -p llm-egress-tests --bins`)",
            bin.display()
        );
        Probe { bin }
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `cmds` in one probe process in cgroup `cgroup` (an absolute
    /// cgroup directory) and namespace `netns`. Panics if the probe cannot
    /// enter them or its output is not one JSON line per command.
    pub fn run(&self, cgroup: &Path, netns: &NetnsGuard, cmds: &[ProbeCmd]) -> ProbeRun {
        let mut args: Vec<String> = vec![
            "--cgroup".into(),
            cgroup.display().to_string(),
            "--netns".into(),
            netns.name().into(),
        ];
        for cmd in cmds {
            cmd.push_args(&mut args);
        }
        let child = Command::new(&self.bin)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        let pid = child.id();
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.bin.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            panic!(
                "egress-probe {} failed ({}): {}\nstdout: {stdout}",
                args.join(" "),
                out.status,
                stderr.trim()
            );
        }
        let results: Vec<ProbeResult> = stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let raw: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                    panic!("egress-probe printed a line that is not JSON ({e}): {l}")
                });
                ProbeResult {
                    ok: raw["ok"].as_bool().unwrap_or(false),
                    errno: raw["errno"].as_i64().map(|e| e as i32),
                    raw,
                }
            })
            .collect();
        assert_eq!(
            results.len(),
            cmds.len(),
            "egress-probe {} printed {} result lines for {} commands:\n{stdout}\nstderr: {stderr}",
            args.join(" "),
            results.len(),
            cmds.len()
        );
        ProbeRun {
            pid,
            results,
            stderr,
        }
    }

    fn one(&self, cgroup: &Path, netns: &NetnsGuard, cmd: ProbeCmd) -> Result<(), i32> {
        self.run(cgroup, netns, &[cmd]).results[0].as_result()
    }

    /// TCP connect to `addr` ("192.0.2.1:8443", "[2001:db8::1]:8443").
    pub fn connect(&self, cgroup: &Path, netns: &NetnsGuard, addr: &str) -> Result<(), i32> {
        self.one(cgroup, netns, ProbeCmd::Connect(addr.into()))
    }

    /// One datagram to `addr` with sendto() on an unconnected socket.
    pub fn udp(&self, cgroup: &Path, netns: &NetnsGuard, addr: &str) -> Result<(), i32> {
        self.one(cgroup, netns, ProbeCmd::Udp(addr.into()))
    }

    /// connect() a UDP socket to `addr`, then send() one datagram.
    pub fn udp_connect(&self, cgroup: &Path, netns: &NetnsGuard, addr: &str) -> Result<(), i32> {
        self.one(cgroup, netns, ProbeCmd::UdpConnect(addr.into()))
    }

    /// `n` times TCP connect + close to `addr`.
    pub fn connect_loop(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        n: u64,
    ) -> LoopReport {
        let run = self.run(cgroup, netns, &[ProbeCmd::ConnectLoop(addr.into(), n)]);
        let raw = &run.results[0].raw;
        LoopReport {
            n: raw["n"].as_u64().unwrap_or(0),
            failures: raw["failures"].as_u64().unwrap_or(0),
            elapsed_ns: raw["elapsed_ns"].as_u64().unwrap_or(0),
            errno: run.results[0].errno,
        }
    }
}

/// Makes `cmd` run in cgroup `cgroup` and network namespace `netns`, like
/// the probe: between fork and exec the child writes itself into
/// `<cgroup>/cgroup.procs` (every socket it makes is then judged as one of
/// that cgroup) and enters the namespace with setns(2). Nothing else of the
/// child changes (no new mount namespace, unlike `ip netns exec`).
pub fn confine(cmd: &mut Command, cgroup: &Path, netns: &NetnsGuard) {
    let procs = cgroup.join("cgroup.procs");
    let procs_c = CString::new(procs.as_os_str().as_bytes())
        .unwrap_or_else(|_| panic!("{} contains a NUL byte", procs.display()));
    let ns: OwnedFd = File::open(netns.path())
        .unwrap_or_else(|e| panic!("cannot open netns {}: {e}", netns.path().display()))
        .into();
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (open, write, close, setns) on data
    // prepared before the fork; `ns` stays open in the parent's Command
    // until spawn returns (O_CLOEXEC: the exec'd program does not inherit it).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs_c.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let write_err = std::io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(write_err);
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// "ok" or the errno's name, for messages.
pub fn describe(r: &Result<(), i32>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => errno_name(*e),
    }
}
