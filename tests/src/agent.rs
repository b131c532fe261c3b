//! [`Agent`]: one `llm-egress run` process with a world of its own.
//!
//! Each agent gets a temp dir (policy file, audit log, stderr/stdout of each
//! run), a pin directory `/sys/fs/bpf/llm-egress-test-<pid>-<n>` and a free
//! loopback port for its HTTP endpoint. The policy's `cgroup` must be the
//! test's [`crate::CgroupGuard`] path: the harness never lets an agent
//! attach anywhere it did not make. Drop stops the agent (SIGTERM, SIGKILL
//! after 5 s), then removes the pin directory ([`PinDir`]) and the temp dir.
//!
//! The binary is `$LLM_EGRESS_BIN`, else `llm-egress` next to the test
//! executable's `deps/` directory (target/debug/llm-egress), see
//! [`agent_bin`]. It is built by `cargo build -p llm-egress`, not by this
//! package.

use std::{
    collections::BTreeSet,
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{TempDir, bpf, cgroup2_mount, http, prom, tail, unique_suffix, wait_until};

/// How long an agent may take to answer /readyz with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long drop and [`Agent::stop`] wait after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`Agent::stop`] allows for each uprobe link closed at exit: the
/// kernel takes ~0.1 s each on 6.18 (docs/plaintext.md, "Cost"), more
/// under the suite's load.
pub const CLOSE_PER_LINK: Duration = Duration::from_millis(300);

/// The agent executable: `$LLM_EGRESS_BIN`, else `<target>/<profile>/llm-egress`
/// derived from the running test executable (`<target>/<profile>/deps/x`).
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("LLM_EGRESS_BIN") {
        return PathBuf::from(p);
    }
    let exe =
        std::env::current_exe().unwrap_or_else(|e| panic!("cannot find the test executable: {e}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join("llm-egress")
}

/// A pin directory below bpffs, removed recursively on drop (unpinning
/// everything in it; links pinned there detach when their last reference
/// goes). Only ever a `llm-egress-test-*` directory directly below /sys/fs/bpf.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// Picks `/sys/fs/bpf/llm-egress-test-<pid>-<n>` (mounting bpffs first if
    /// needed) without creating it: the agent creates its pin directory.
    pub fn new() -> PinDir {
        bpf::ensure_bpffs();
        let path = Path::new(bpf::BPFFS).join(format!("llm-egress-test-{}", unique_suffix()));
        PinDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let ours = self.path.parent() == Some(Path::new(bpf::BPFFS))
            && self
                .path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm-egress-test-"));
        if !ours {
            eprintln!("warning: refusing to remove {}", self.path.display());
            return;
        }
        match fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => eprintln!(
                "warning: cannot remove pin dir {}: {e}",
                self.path.display()
            ),
        }
    }
}

/// A running (or stopped, or killed) agent and everything it was given.
///
/// Field order matters for drop: `Drop for Agent` stops the process first,
/// then `pin` is removed, then the temp dir.
pub struct Agent {
    bin: PathBuf,
    child: Option<Child>,
    /// Runs started so far (1 after `start`, 2 after one `restart_same`...).
    runs: u32,
    metrics_addr: SocketAddr,
    config: PathBuf,
    audit_log: PathBuf,
    /// Whether [`Agent::context`] went into a message already (drop then
    /// does not print it again).
    context_shown: std::cell::Cell<bool>,
    /// Programs attached to the cgroup2 root before the current run started.
    root_before: Vec<(&'static str, u32)>,
    /// Extra environment of every run (see [`Agent::launch_with_env`]).
    env: Vec<(String, String)>,
    /// The pin path, state dir, metrics address and audit log are keys of
    /// the policy file, not command-line flags (see
    /// [`Agent::start_with_keys_in_file`]).
    keys_in_file: bool,
    pin: PinDir,
    dir: TempDir,
}

/// The top-level `cgroup = "/abs/path"` of a policy text (keys before the
/// first table), if any. Only what the harness needs to refuse a policy
/// that does not name a test cgroup; the agent parses the file for real.
pub fn policy_attach_cgroup(policy_toml: &str) -> Option<PathBuf> {
    for line in policy_toml.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            return None;
        }
        let Some(rest) = line.strip_prefix("cgroup") else {
            continue;
        };
        let Some(value) = rest.trim_start().strip_prefix('=') else {
            continue;
        };
        let value = value.trim();
        let (quote, body) = match value.chars().next() {
            Some(q @ ('"' | '\'')) => (q, &value[1..]),
            _ => return None,
        };
        return body.split(quote).next().map(PathBuf::from);
    }
    None
}

/// Panics unless `policy_toml` attaches to a directory inside a test cgroup
/// (`<cgroup2 mount>/llm-egress-test-*`): an agent started by a test must
/// never attach to the cgroup2 root or to a cgroup of the machine.
fn assert_attaches_to_a_test_cgroup(policy_toml: &str) {
    let mount = cgroup2_mount();
    let Some(cg) = policy_attach_cgroup(policy_toml) else {
        panic!(
            "the policy has no top-level `cgroup = \"...\"`: without it the agent would attach to \
             the cgroup2 root. Use a CgroupGuard's path.\n{policy_toml}"
        );
    };
    let inside_test_cgroup = cg
        .strip_prefix(mount)
        .ok()
        .and_then(|rel| rel.components().next())
        .and_then(|c| c.as_os_str().to_str())
        .is_some_and(|first| first.starts_with("llm-egress-test-"));
    assert!(
        inside_test_cgroup
            && !cg
                .components()
                .any(|c| c == std::path::Component::ParentDir),
        "the policy's cgroup {} is not inside a test cgroup ({}/llm-egress-test-*)",
        cg.display(),
        mount.display()
    );
}

/// A loopback port nobody listens on right now.
pub fn free_loopback_port() -> u16 {
    // The tests of one binary run in parallel threads: bind(0) may hand two
    // of them the same port once the first probe's socket is closed, and
    // two agents would then race for it. A port is handed out once per
    // process.
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let l = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
        let port = l
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

impl Agent {
    /// Starts [`agent_bin`] with `policy_toml` and waits until /readyz says 200.
    pub fn start(policy_toml: &str) -> Agent {
        Agent::start_with(agent_bin(), policy_toml)
    }

    /// Starts [`agent_bin`] with `--config` alone: [`Agent::file_keys`]
    /// (this agent's pin path, state dir, metrics address and audit log)
    /// come first in the file, then `policy_toml`. For what only the file
    /// can change (a reload of those keys); [`Agent::rewrite_policy`] then
    /// takes the whole file.
    pub fn start_with_keys_in_file(policy_toml: &str) -> Agent {
        let mut agent = Agent::prepare(agent_bin(), policy_toml);
        agent.keys_in_file = true;
        let text = format!("{}{policy_toml}", agent.file_keys());
        fs::write(&agent.config, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", agent.config.display()));
        agent.spawn();
        agent
    }

    /// This agent's pin path, state dir, metrics address and audit log as
    /// top-level policy keys.
    pub fn file_keys(&self) -> String {
        let q = |p: &Path| crate::toml_str(&p.display().to_string());
        format!(
            "pin_path = {}\nstate_dir = {}\nmetrics_listen = \"{}\"\naudit_log = {}\n",
            q(self.pin.path()),
            q(&self.state_dir()),
            self.metrics_addr,
            q(&self.audit_log)
        )
    }

    /// A path in this agent's temporary directory (removed with it).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the agent executable `bin` with `policy_toml`.
    pub fn start_with(bin: impl Into<PathBuf>, policy_toml: &str) -> Agent {
        let mut agent = Agent::prepare(bin.into(), policy_toml);
        agent.spawn();
        agent
    }

    /// Starts [`agent_bin`] with `policy_toml` without waiting for it to be
    /// ready: for agents expected to refuse to start (see
    /// [`Agent::wait_exit`]).
    pub fn launch(policy_toml: &str) -> Agent {
        let mut agent = Agent::prepare(agent_bin(), policy_toml);
        agent.spawn_process();
        agent
    }

    /// Starts [`agent_bin`] with `policy_toml` and the extra environment
    /// `env` (kept for every later run) without waiting for it to be ready:
    /// for agents expected to refuse to start or to run degraded, e.g. with
    /// `LLM_EGRESS_TEST_FAIL_PROGRAM` (honoured by debug builds only).
    pub fn launch_with_env(policy_toml: &str, env: &[(&str, &str)]) -> Agent {
        let mut agent = Agent::prepare(agent_bin(), policy_toml);
        agent.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        agent.spawn_process();
        agent
    }

    /// Starts a new run with the same files, pin dir, port and environment
    /// (after [`Agent::kill9`] or [`Agent::stop`]) without waiting for it
    /// to be ready.
    pub fn relaunch(&mut self) {
        if self.is_running() {
            panic!("relaunch: the agent is still running; stop() or kill9() it first");
        }
        self.spawn_process();
    }

    /// Waits up to `timeout` until `/readyz` answers and `accept(status,
    /// body)` holds, and returns that answer; panics when the agent exits
    /// first or never answers so (and checks that the cgroup2 root is
    /// untouched).
    #[track_caller]
    pub fn wait_readyz(
        &mut self,
        timeout: Duration,
        accept: impl Fn(u16, &str) -> bool,
    ) -> http::Response {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the agent exited ({status}) while waiting for /readyz (last: {last})\n{}",
                    self.context()
                );
            }
            match http::get(self.metrics_addr, "/readyz", Duration::from_millis(500)) {
                Ok(r) if accept(r.status, &r.body) => {
                    self.check_root_untouched();
                    return r;
                }
                Ok(r) => last = format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "/readyz never answered as expected within {timeout:?} (last: {last})\n{}",
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The world of an agent (temp dir, policy file, pin dir, port), with
    /// no process yet.
    fn prepare(bin: PathBuf, policy_toml: &str) -> Agent {
        crate::require_root();
        assert!(
            bin.is_file(),
            "agent binary {} not found: build it with `cargo build -p llm-egress` \
             (or `cargo xtask build`), or point LLM_EGRESS_BIN at it",
            bin.display()
        );
        assert_attaches_to_a_test_cgroup(policy_toml);
        let dir = TempDir::new("llm-egress-test-agent");
        let config = dir.path().join("policy.toml");
        fs::write(&config, policy_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        // Writable by root alone whatever the umask (the agent checks).
        fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", config.display()));
        Agent {
            bin,
            child: None,
            runs: 0,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], free_loopback_port())),
            audit_log: dir.path().join("audit.jsonl"),
            config,
            context_shown: std::cell::Cell::new(false),
            root_before: Vec::new(),
            env: Vec::new(),
            keys_in_file: false,
            pin: PinDir::new(),
            dir,
        }
    }

    /// Starts a run and waits until it is ready; panics if it changed what
    /// is attached to the cgroup2 root.
    fn spawn(&mut self) {
        // The metrics port was free when chosen, but any socket of a test
        // running meanwhile may have taken it since (bind(0) and client
        // sockets share the ephemeral range): an agent that exits on that,
        // before it attached anything, is started again on a new port.
        for _ in 0..3 {
            self.spawn_process();
            if !self.exited_on_busy_port() {
                break;
            }
            let busy = self.metrics_addr;
            self.metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port()));
            if self.keys_in_file {
                let text = fs::read_to_string(&self.config)
                    .unwrap_or_default()
                    .replace(
                        &format!("metrics_listen = \"{busy}\""),
                        &format!("metrics_listen = \"{}\"", self.metrics_addr),
                    );
                fs::write(&self.config, text)
                    .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config.display()));
            }
        }
        self.wait_ready();
        self.check_root_untouched();
    }

    /// Whether the current run exited, before it was ready, because its
    /// metrics port was taken (a loaded machine can take tens of seconds to
    /// get there; a ready agent ends the wait at once).
    fn exited_on_busy_port(&mut self) -> bool {
        let exited = wait_until(Duration::from_secs(60), Duration::from_millis(20), || {
            if self.try_wait().is_some() {
                return Some(true);
            }
            let ready = http::get(self.metrics_addr, "/readyz", Duration::from_millis(200));
            ready.is_ok().then_some(false)
        });
        exited == Some(true)
            && fs::read_to_string(self.log_path("stderr", self.runs))
                .is_ok_and(|l| l.contains("Address already in use"))
    }

    /// Starts a run, without waiting. The command line of every run (the
    /// CLI flags override the file's keys).
    fn spawn_process(&mut self) {
        self.runs += 1;
        let stderr = self.open_log("stderr");
        let stdout = self.open_log("stdout");
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run").arg("--config").arg(&self.config);
        if !self.keys_in_file {
            cmd.arg("--pin-path")
                .arg(self.pin.path())
                .arg("--state-dir")
                .arg(self.state_dir())
                .arg("--metrics-listen")
                .arg(self.metrics_addr.to_string())
                .arg("--audit-log")
                .arg(&self.audit_log);
        }
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        // Plain text logs in the stderr file (no ANSI colours).
        cmd.env("NO_COLOR", "1");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // nothing of the parent. An agent whose test process dies gets SIGTERM
        // (and detaches) instead of enforcing on a cgroup nobody cleans up.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        self.root_before = bpf::sock_addr_prog_counts(cgroup2_mount(), false);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    /// A safety net, not a test: an agent that attached to the root would
    /// judge every process of the machine. Drop (on this panic) stops it.
    fn check_root_untouched(&self) {
        let root_after = bpf::sock_addr_prog_counts(cgroup2_mount(), false);
        if root_after != self.root_before {
            panic!(
                "the agent changed the programs attached to the cgroup2 root {} ({:?} -> {root_after:?})\n{}",
                cgroup2_mount().display(),
                self.root_before,
                self.context()
            );
        }
    }

    /// Waits up to `timeout` for the current run to exit on its own and
    /// returns its status; panics (and stops it) when it is still running
    /// then. For agents that must refuse to start.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = wait_until(timeout, Duration::from_millis(20), || self.try_wait());
        self.check_root_untouched();
        status.unwrap_or_else(|| {
            let ready = self.http_get("/readyz").map(|r| r.status).ok();
            panic!(
                "the agent was expected to exit by itself, it still runs after {timeout:?} \
                 (/readyz: {ready:?})\n{}",
                self.context()
            )
        })
    }

    fn log_path(&self, stream: &str, run: u32) -> PathBuf {
        self.dir.path().join(format!("{stream}-{run}.log"))
    }

    fn open_log(&self, stream: &str) -> fs::File {
        let path = self.log_path(stream, self.runs);
        fs::File::create(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last: String;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the agent exited ({status}) before /readyz answered 200\n{}",
                    self.context()
                );
            }
            match http::get(self.metrics_addr, "/readyz", Duration::from_millis(500)) {
                Ok(r) if r.status == 200 => return,
                Ok(r) => last = format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "the agent was not ready within {READY_TIMEOUT:?} (GET http://{}/readyz: {last})\n{}",
                    self.metrics_addr,
                    self.context()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the current agent process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// The pid of the current agent process.
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("no agent process"))
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Where this agent keeps its token budgets (`--state-dir`): the same
    /// for every run, like the pin directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn pin_path(&self) -> &Path {
        self.pin.path()
    }

    pub fn audit_log_path(&self) -> &Path {
        &self.audit_log
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// `GET path` on the agent's endpoint.
    pub fn http_get(&self, path: &str) -> std::io::Result<http::Response> {
        http::get(self.metrics_addr, path, Duration::from_secs(5))
    }

    /// The body of GET /metrics; panics unless it answers 200.
    pub fn metrics(&self) -> String {
        match self.http_get("/metrics") {
            Ok(r) if r.status == 200 => r.body,
            Ok(r) => panic!(
                "GET /metrics answered {}: {}\n{}",
                r.status,
                r.body,
                self.context()
            ),
            Err(e) => panic!("GET /metrics failed: {e}\n{}", self.context()),
        }
    }

    /// The sum of the samples of `name` whose labels include `labels`, see
    /// [`prom::value`]; `None` when there is no such sample.
    pub fn metric_value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        prom::value(&self.metrics(), name, labels)
    }

    /// `llm_egress_policy_generation`, panicking when it is missing.
    pub fn generation(&self) -> u64 {
        let v = self
            .metric_value("llm_egress_policy_generation", &[])
            .unwrap_or_else(|| {
                panic!(
                    "/metrics has no llm_egress_policy_generation\n{}",
                    self.context()
                )
            });
        v as u64
    }

    /// The audit log's events so far (a last line still being written is
    /// left out; any other line that is not JSON panics).
    pub fn audit_events(&self) -> Vec<Value> {
        let text = match fs::read_to_string(&self.audit_log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!(
                "cannot read the audit log {}: {e}",
                self.audit_log.display()
            ),
        };
        let complete = match text.rfind('\n') {
            Some(i) => &text[..i],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The first audit event matching `pred`, waiting up to `timeout`.
    pub fn wait_for_audit(
        &self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        wait_until(timeout, Duration::from_millis(50), || {
            self.audit_events().into_iter().find(|e| pred(e))
        })
    }

    /// Waits up to `timeout` until `metric_value(name, labels)` is at least
    /// `min`; returns the last value read.
    pub fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        min: f64,
        timeout: Duration,
    ) -> Option<f64> {
        self.wait_for_metric_where(name, labels, |v| v >= min, timeout)
    }

    /// Waits up to `timeout` until `metric_value(name, labels)` satisfies
    /// `pred`; panics with the last value read (and the agent's context)
    /// when it never does.
    #[track_caller]
    pub fn expect_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> f64 {
        let mut last = None;
        let found = wait_until(timeout, Duration::from_millis(50), || {
            last = self.metric_value(name, labels);
            last.filter(|v| pred(*v))
        });
        found.unwrap_or_else(|| {
            panic!(
                "{name}{labels:?} never reached the expected value within {timeout:?} (last: {last:?})\n{}",
                self.context()
            )
        })
    }

    fn wait_for_metric_where(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        pred: impl Fn(f64) -> bool,
        timeout: Duration,
    ) -> Option<f64> {
        let mut last = None;
        wait_until(timeout, Duration::from_millis(50), || {
            last = self.metric_value(name, labels);
            last.filter(|v| pred(*v))
        });
        last
    }

    /// Waits until the agent reports a policy generation above `previous`
    /// (a reload was applied); panics after 10 s.
    #[track_caller]
    pub fn wait_for_generation_after(&self, previous: u64) -> u64 {
        wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
            Some(self.generation()).filter(|g| *g > previous)
        })
        .unwrap_or_else(|| panic!("no reload after generation {previous}\n{}", self.context()))
    }

    fn try_signal(&self, sig: libc::c_int) -> std::io::Result<()> {
        let Some(child) = self.child.as_ref() else {
            return Err(std::io::Error::other("no agent process"));
        };
        // SAFETY: kill(2) on our own child's pid; the child is not reaped yet
        // (`child` still holds it), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Err(e) = self.try_signal(sig) {
            panic!(
                "cannot send signal {sig} to the agent: {e}\n{}",
                self.context()
            );
        }
    }

    /// Sends SIGHUP (reload the policy).
    pub fn sighup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Replaces the policy file atomically (write a sibling, rename over it).
    pub fn rewrite_policy(&self, policy_toml: &str) {
        assert_attaches_to_a_test_cgroup(policy_toml);
        let tmp = self.dir.path().join(".policy.toml.new");
        fs::write(&tmp, policy_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", tmp.display()));
        fs::rename(&tmp, &self.config).unwrap_or_else(|e| {
            panic!(
                "cannot rename {} to {}: {e}",
                tmp.display(),
                self.config.display()
            )
        });
    }

    /// The uprobe links this run said it closes at exit
    /// (docs/plaintext.md, "Cost": ~0.1 s each, in the kernel).
    fn links_closed_at_exit(&self) -> u32 {
        self.stderr()
            .lines()
            .filter(|l| l.contains("closing the remaining uprobe links"))
            .filter_map(|l| {
                l.split("links=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .next_back()
            .unwrap_or(0)
    }

    /// SIGKILL, and reap the process.
    pub fn kill9(&mut self) {
        if !self.is_running() {
            panic!("kill9: the agent is not running\n{}", self.context());
        }
        self.signal(libc::SIGKILL);
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit (at most [`STOP_TIMEOUT`], plus
    /// [`CLOSE_PER_LINK`] for each uprobe link the agent says it closes at
    /// exit; then SIGKILL and panic); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        if let Some(status) = self.try_wait() {
            return status;
        }
        self.signal(libc::SIGTERM);
        if let Some(status) =
            wait_until(STOP_TIMEOUT, Duration::from_millis(20), || self.try_wait())
        {
            return status;
        }
        let links = self.links_closed_at_exit();
        if links > 0
            && let Some(status) =
                wait_until(CLOSE_PER_LINK * links, Duration::from_millis(20), || {
                    self.try_wait()
                })
        {
            return status;
        }
        self.signal(libc::SIGKILL);
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
        panic!(
            "the agent did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
            self.context()
        );
    }

    /// Starts a new agent process with the same policy file, pin dir, port
    /// and audit log (after [`Agent::kill9`] or [`Agent::stop`]), and waits
    /// until it is ready.
    pub fn restart_same(&mut self) {
        if self.is_running() {
            panic!("restart_same: the agent is still running; stop() or kill9() it first");
        }
        self.spawn();
    }

    /// Stderr of the current (last started) run.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.log_path("stderr", self.runs)).unwrap_or_default()
    }

    /// Stderr of every run so far, each under a header.
    pub fn all_stderr(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                let text = fs::read_to_string(self.log_path("stderr", run)).unwrap_or_default();
                format!("--- agent run {run} stderr ---\n{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What a panic message should show: the agent's stderr (tail) and the
    /// last audit events.
    pub fn context(&self) -> String {
        self.context_shown.set(true);
        let stderr = self.all_stderr();
        let audit = fs::read_to_string(&self.audit_log).unwrap_or_default();
        let audit_tail: Vec<&str> = audit
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!(
            "{}\n--- last audit events ({}) ---\n{}",
            tail(&stderr, 6000),
            self.audit_log.display(),
            audit_tail.join("\n")
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.context_shown.get() {
            eprintln!("--- agent context at test failure ---\n{}", self.context());
        }
        if self.is_running() {
            let _ = self.try_signal(libc::SIGTERM);
            if wait_until(STOP_TIMEOUT, Duration::from_millis(20), || self.try_wait()).is_none() {
                eprintln!("warning: the agent ignored SIGTERM for {STOP_TIMEOUT:?}; SIGKILL");
                let _ = self.try_signal(libc::SIGKILL);
            }
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
        }
        // Then `pin` (PinDir) and `dir` (TempDir) drop, in that order.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_top_level_cgroup_only() {
        let p = "mode = \"audit\"\ncgroup = \"/sys/fs/cgroup/x\"\n[[workloads]]\ncgroup = \"a\"\n";
        assert_eq!(
            policy_attach_cgroup(p),
            Some(PathBuf::from("/sys/fs/cgroup/x"))
        );
        assert_eq!(
            policy_attach_cgroup("cgroup = '/lit'\n"),
            Some(PathBuf::from("/lit"))
        );
        assert_eq!(
            policy_attach_cgroup("[[workloads]]\ncgroup = \"a\"\n"),
            None
        );
        assert_eq!(policy_attach_cgroup("cgroups = 1\n"), None);
    }
}
