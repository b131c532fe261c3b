//! [`Probe`]: runs the `egress-probe` binary in a cgroup and a namespace.
//!
//! Integration tests find the binary with
//! `Probe::new(env!("CARGO_BIN_EXE_egress-probe"))`, or [`Probe::beside_test_exe`]
//! from library code (where that variable does not exist). Each call starts
//! one probe process (its pid is the tgid the agent reports), which may run
//! several commands in order; see src/bin/egress-probe.rs for the protocol.
//! [`Probe::spawn`] starts a probe without waiting for it, so a test can
//! run several client processes at once.
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
    process::{Child, Command, Stdio},
    time::Duration,
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
    /// One TCP connection, N round trips of 64 bytes (an echo server).
    EchoLoop(String, u64),
    /// TCP connect + close in a loop: (address, milliseconds, interval
    /// between connect starts in µs, 0 for back to back).
    ConnectFor(String, u64, u64),
    /// Connect, then write as fast as possible for the given milliseconds.
    Upload(String, u64),
    /// Connect, then read and discard for the given milliseconds.
    Download(String, u64),
    /// socket() of another kind (`ping4`, `ping6`, `raw4`, `raw6`,
    /// `raw4-tcp`, `packet`; a ping socket also sends one echo request to
    /// loopback), then close.
    Socket(String),
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
            ProbeCmd::EchoLoop(a, n) => args.extend(["echo-loop".into(), a.clone(), n.to_string()]),
            ProbeCmd::ConnectFor(a, ms, interval_us) => args.extend([
                "connect-for".into(),
                a.clone(),
                ms.to_string(),
                interval_us.to_string(),
            ]),
            ProbeCmd::Upload(a, ms) => args.extend(["upload".into(), a.clone(), ms.to_string()]),
            ProbeCmd::Download(a, ms) => {
                args.extend(["download".into(), a.clone(), ms.to_string()])
            }
            ProbeCmd::Socket(kind) => args.extend(["socket".into(), kind.clone()]),
        }
    }
}

/// The outcome of one command.
#[derive(Clone, Debug)]
pub struct ProbeResult {
    /// `"ok"` of the line; for `connect-for` (where it is a count): at
    /// least one connect succeeded.
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

/// What `connect-for` reports.
#[derive(Clone, Debug)]
pub struct ConnectForReport {
    /// Successful connects.
    pub ok: u64,
    /// Connects that failed with EPERM (refused by a BPF program).
    pub eperm: u64,
    /// Connects that failed otherwise.
    pub other_failures: u64,
    /// The errno name of the first other failure.
    pub first_other_error: Option<String>,
    /// How long the loop ran.
    pub elapsed: Duration,
    /// The probe process.
    pub pid: u32,
}

impl ConnectForReport {
    /// Reads a `connect-for` result line; panics on any other line.
    pub fn from_result(r: &ProbeResult) -> ConnectForReport {
        let raw = &r.raw;
        assert_eq!(
            raw["cmd"].as_str(),
            Some("connect-for"),
            "not a connect-for line: {raw}"
        );
        let n = |k: &str| {
            raw[k]
                .as_u64()
                .unwrap_or_else(|| panic!("connect-for line without {k:?}: {raw}"))
        };
        ConnectForReport {
            ok: n("ok"),
            eperm: n("eperm"),
            other_failures: n("other_failures"),
            first_other_error: raw["first_other_error"].as_str().map(str::to_string),
            elapsed: Duration::from_nanos(n("elapsed_ns")),
            pid: n("pid") as u32,
        }
    }

    /// All connect attempts.
    pub fn attempts(&self) -> u64 {
        self.ok + self.eperm + self.other_failures
    }
}

/// What `upload` and `download` report when connect() succeeded.
#[derive(Clone, Debug)]
pub struct TransferReport {
    /// Bytes written (upload) or read (download).
    pub bytes: u64,
    /// Upload: from the end of connect() to the end of the last write;
    /// download: from the end of connect() to the end of the read loop.
    pub elapsed: Duration,
    /// `tcpi_total_retrans` just before close.
    pub retrans: u32,
    /// `tcpi_rtt` (smoothed RTT, µs) just before close.
    pub rtt_us: u32,
    /// The errno name of the write or read error that ended the transfer early.
    pub error: Option<String>,
    /// Download only: the server closed before the time was up.
    pub eof: bool,
    /// Download only: bytes read, and the time, after the first quarter of
    /// the run (at most 1.5 s), when the socket buffers have filled.
    pub steady: Option<(u64, Duration)>,
}

impl TransferReport {
    /// Reads an `upload` or `download` result line: `Err(errno)` when
    /// connect() failed; panics on any other line.
    pub fn from_result(r: &ProbeResult) -> Result<TransferReport, i32> {
        let raw = &r.raw;
        assert!(
            matches!(raw["cmd"].as_str(), Some("upload" | "download")),
            "not an upload or download line: {raw}"
        );
        r.as_result()?;
        let n = |k: &str| {
            raw[k]
                .as_u64()
                .unwrap_or_else(|| panic!("transfer line without {k:?}: {raw}"))
        };
        let error = raw["write_error"]
            .as_str()
            .or(raw["read_error"].as_str())
            .map(str::to_string);
        Ok(TransferReport {
            bytes: n("bytes"),
            elapsed: Duration::from_nanos(n("elapsed_ns")),
            retrans: n("retrans") as u32,
            rtt_us: n("rtt_us") as u32,
            error,
            eof: raw["eof"].as_bool().unwrap_or(false),
            steady: raw["steady_bytes"]
                .as_u64()
                .zip(raw["steady_ns"].as_u64())
                .map(|(b, ns)| (b, Duration::from_nanos(ns))),
        })
    }

    /// Bytes per second over `elapsed` (0 when nothing was measured).
    pub fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.bytes as f64 / secs
        } else {
            0.0
        }
    }
}

/// A probe process started by [`Probe::spawn`]; [`SpawnedProbe::wait`]
/// collects its results. Dropped without waiting, it kills the process.
#[derive(Debug)]
pub struct SpawnedProbe {
    child: Option<Child>,
    args: Vec<String>,
    ncmds: usize,
}

impl SpawnedProbe {
    /// The probe's pid (= the tgid in the agent's events).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for the probe to exit and parses its lines. Panics like
    /// [`Probe::run`].
    pub fn wait(mut self) -> ProbeRun {
        let child = self.child.take().expect("a SpawnedProbe is waited once");
        let pid = child.id();
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for egress-probe {}: {e}", self.args.join(" ")));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            panic!(
                "egress-probe {} failed ({}): {}\nstdout: {stdout}",
                self.args.join(" "),
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
                    ok: raw["ok"]
                        .as_bool()
                        .unwrap_or_else(|| raw["ok"].as_u64().is_some_and(|n| n > 0)),
                    errno: raw["errno"].as_i64().map(|e| e as i32),
                    raw,
                }
            })
            .collect();
        assert_eq!(
            results.len(),
            self.ncmds,
            "egress-probe {} printed {} result lines for {} commands:\n{stdout}\nstderr: {stderr}",
            self.args.join(" "),
            results.len(),
            self.ncmds
        );
        ProbeRun {
            pid,
            results,
            stderr,
        }
    }

    /// [`SpawnedProbe::wait`] for a probe that ran one `connect-for`.
    pub fn wait_connect_for(self) -> ConnectForReport {
        ConnectForReport::from_result(&self.wait().results[0])
    }

    /// [`SpawnedProbe::wait`] for a probe that ran one `upload` or `download`.
    pub fn wait_transfer(self) -> Result<TransferReport, i32> {
        TransferReport::from_result(&self.wait().results[0])
    }
}

impl Drop for SpawnedProbe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
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
        self.spawn(cgroup, netns, cmds).wait()
    }

    /// Starts a probe process like [`Probe::run`] without waiting for it:
    /// start several, then [`SpawnedProbe::wait`] for each, to run clients
    /// at the same time.
    pub fn spawn(&self, cgroup: &Path, netns: &NetnsGuard, cmds: &[ProbeCmd]) -> SpawnedProbe {
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
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        SpawnedProbe {
            child: Some(child),
            args,
            ncmds: cmds.len(),
        }
    }

    fn one(&self, cgroup: &Path, netns: &NetnsGuard, cmd: ProbeCmd) -> Result<(), i32> {
        self.run(cgroup, netns, &[cmd]).results[0].as_result()
    }

    /// TCP connect to `addr` ("192.0.2.1:8443", "[2001:db8::1]:8443").
    pub fn connect(&self, cgroup: &Path, netns: &NetnsGuard, addr: &str) -> Result<(), i32> {
        self.one(cgroup, netns, ProbeCmd::Connect(addr.into()))
    }

    /// socket() of `kind` ([`ProbeCmd::Socket`]).
    pub fn socket(&self, cgroup: &Path, netns: &NetnsGuard, kind: &str) -> Result<(), i32> {
        self.one(cgroup, netns, ProbeCmd::Socket(kind.into()))
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
        self.run_loop(cgroup, netns, ProbeCmd::ConnectLoop(addr.into(), n))
    }

    /// One TCP connection to `addr` (an echo server), `n` round trips of
    /// 64 bytes.
    pub fn echo_loop(&self, cgroup: &Path, netns: &NetnsGuard, addr: &str, n: u64) -> LoopReport {
        self.run_loop(cgroup, netns, ProbeCmd::EchoLoop(addr.into(), n))
    }

    fn run_loop(&self, cgroup: &Path, netns: &NetnsGuard, cmd: ProbeCmd) -> LoopReport {
        let run = self.run(cgroup, netns, &[cmd]);
        let raw = &run.results[0].raw;
        LoopReport {
            n: raw["n"].as_u64().unwrap_or(0),
            failures: raw["failures"].as_u64().unwrap_or(0),
            elapsed_ns: raw["elapsed_ns"].as_u64().unwrap_or(0),
            errno: run.results[0].errno,
        }
    }

    /// TCP connect + close to `addr` in a loop for `ms` milliseconds, one
    /// connect every `interval_us` µs at most (0: back to back).
    pub fn connect_for(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        ms: u64,
        interval_us: u64,
    ) -> ConnectForReport {
        self.spawn_connect_for(cgroup, netns, addr, ms, interval_us)
            .wait_connect_for()
    }

    /// Starts [`Probe::connect_for`] without waiting; collect the report
    /// with [`SpawnedProbe::wait_connect_for`].
    pub fn spawn_connect_for(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        ms: u64,
        interval_us: u64,
    ) -> SpawnedProbe {
        self.spawn(
            cgroup,
            netns,
            &[ProbeCmd::ConnectFor(addr.into(), ms, interval_us)],
        )
    }

    /// Starts an `upload` without waiting; collect the report with
    /// [`SpawnedProbe::wait_transfer`].
    pub fn spawn_upload(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        ms: u64,
    ) -> SpawnedProbe {
        self.spawn(cgroup, netns, &[ProbeCmd::Upload(addr.into(), ms)])
    }

    /// Starts a `download` without waiting; collect the report with
    /// [`SpawnedProbe::wait_transfer`].
    pub fn spawn_download(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        ms: u64,
    ) -> SpawnedProbe {
        self.spawn(cgroup, netns, &[ProbeCmd::Download(addr.into(), ms)])
    }

    /// Connects to `addr`, writes as fast as the socket takes it for `ms`
    /// milliseconds, then waits (up to 5 s) for the server to close.
    /// `Err(errno)` when connect() fails.
    pub fn upload(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        ms: u64,
    ) -> Result<TransferReport, i32> {
        self.spawn_upload(cgroup, netns, addr, ms).wait_transfer()
    }

    /// Connects to `addr` and reads what it sends for `ms` milliseconds.
    /// `Err(errno)` when connect() fails.
    pub fn download(
        &self,
        cgroup: &Path,
        netns: &NetnsGuard,
        addr: &str,
        ms: u64,
    ) -> Result<TransferReport, i32> {
        self.spawn_download(cgroup, netns, addr, ms).wait_transfer()
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
