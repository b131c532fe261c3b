//! Files nobody else can touch: the audit log is the agent's alone whatever
//! the umask, and the agent refuses to start, pinning nothing, when a path
//! it trusts (the policy file, `pin_path`, `state_dir`, or a directory
//! above one) can be changed by a non-root user (docs/operations.md,
//! "Files and directories the agent trusts"); a policy file opened to
//! others while the agent runs is not reloaded.
//!
//! The refused starts run the agent binary directly (the harness's
//! [`Agent`] makes its own trusted paths); each attaches to the test's own
//! cgroup if it wrongly started, and is killed when it does not exit.
//!
//! Needs root, bpffs, and a built agent.

use std::{
    fs,
    os::unix::fs::{MetadataExt, PermissionsExt, chown},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, PinDir, TcpServer, TempDir, agent_bin, bpf, require_root,
    scenario::{
        DEAD_DNS, RELOAD_WAIT, both_allowed_policy, expect_eperm, expect_ok, only_192_policy, probe,
    },
    toml_str, wait_until,
};

/// The unprivileged user of these tests.
const USER: u32 = 65534;

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .mode()
        & 0o7777
}

#[test]
fn audit_log_is_0600_under_umask_0_and_a_wider_one_is_narrowed() {
    require_root();
    let cg = CgroupGuard::new("files-umask");
    // The agent under `umask 000`: a wrapper sets it and execs the agent.
    let wrap = TempDir::new("llm-egress-test-umask");
    let wrapper = wrap.path().join("llm-egress-umask0");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\numask 000\nexec {} \"$@\"\n",
            toml_str(&agent_bin().display().to_string())
        ),
    )
    .unwrap();
    chmod(&wrapper, 0o755);
    let mut agent = Agent::start_with(&wrapper, &only_192_policy(&cg, ""));
    let status = fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    assert!(
        status.lines().any(|l| l == "Umask:\t0000"),
        "the agent runs with umask 0:\n{status}"
    );
    let log = agent.audit_log_path().to_path_buf();
    assert_eq!(mode(&log), 0o600, "the audit log made under umask 0");
    let pins = agent.pin_path().to_path_buf();
    assert_eq!(
        mode(&pins) & 0o077,
        0,
        "the pin directory made under umask 0"
    );

    // A log someone widened is narrowed at the next start, and said so.
    agent.stop();
    chmod(&log, 0o666);
    agent.restart_same();
    assert_eq!(mode(&log), 0o600, "the widened audit log after a restart");
    assert!(
        agent.stderr().contains("its mode is now 0600"),
        "the narrowing is logged\n{}",
        agent.context()
    );
}

/// A policy attached to `cg`, written to `dir/policy.toml` (mode 0644).
fn write_policy(cg: &CgroupGuard, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("policy.toml");
    let text = format!(
        "cgroup = {}\n[resolver]\nservers = [{}]\n[[workloads]]\nname = \"w\"\ncgroup = \"w\"\nother = \"deny\"\n",
        toml_str(&cg.path().display().to_string()),
        toml_str(DEAD_DNS)
    );
    fs::write(&path, text).unwrap();
    chmod(&path, 0o644);
    path
}

/// Runs `llm-egress run` with these paths (no metrics, no audit log);
/// returns its stderr after checking that it exited non-zero by itself and
/// attached nothing to `cg`.
fn refused(cg: &CgroupGuard, config: &Path, pin: &Path, state: &Path) -> String {
    let dir = TempDir::new("llm-egress-test-refused");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(agent_bin())
        .arg("run")
        .args(["--config".as_ref(), config.as_os_str()])
        .args(["--pin-path".as_ref(), pin.as_os_str()])
        .args(["--state-dir".as_ref(), state.as_os_str()])
        .args(["--metrics-listen", "off", "--audit-log", "off"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", agent_bin().display()));
    let status = wait_until(Duration::from_secs(20), Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    });
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the agent did not refuse to start within 20 s\n{stderr}");
    };
    assert!(!status.success(), "the agent must exit non-zero\n{stderr}");
    assert!(
        bpf::sock_addr_prog_counts(cg.path(), false)
            .iter()
            .all(|(_, n)| *n == 0),
        "a refused start attaches nothing\n{stderr}"
    );
    stderr
}

#[track_caller]
fn assert_names(stderr: &str, parts: &[&str]) {
    for p in parts {
        assert!(stderr.contains(p), "the error names {p:?}:\n{stderr}");
    }
}

#[test]
fn a_pin_path_owned_by_another_user_is_refused() {
    require_root();
    let cg = CgroupGuard::new("files-pin");
    let dir = TempDir::new("llm-egress-test-files");
    let config = write_policy(&cg, dir.path());
    let pin = PinDir::new();
    fs::create_dir(pin.path()).unwrap();
    chown(pin.path(), Some(USER), Some(USER)).unwrap();
    chmod(pin.path(), 0o755);
    let stderr = refused(&cg, &config, pin.path(), &dir.path().join("state"));
    assert_names(
        &stderr,
        &[
            &format!("pin_path {} is not trusted", pin.path().display()),
            "owned by another user",
            "owner uid 65534",
            "mode 0755",
        ],
    );
    let pinned: Vec<_> = fs::read_dir(pin.path()).unwrap().flatten().collect();
    assert!(pinned.is_empty(), "nothing pinned: {pinned:?}");
    assert!(!dir.path().join("state").exists(), "no state dir made");
}

#[test]
fn a_world_writable_state_dir_or_one_below_a_users_directory_is_refused() {
    require_root();
    let cg = CgroupGuard::new("files-state");
    let dir = TempDir::new("llm-egress-test-files");
    let config = write_policy(&cg, dir.path());
    let state = dir.path().join("state");
    fs::create_dir(&state).unwrap();
    chmod(&state, 0o777);
    let pin = PinDir::new();
    let stderr = refused(&cg, &config, pin.path(), &state);
    assert_names(
        &stderr,
        &[
            &format!("state_dir {} is not trusted", state.display()),
            "writable by every user",
            "owner uid 0",
            "mode 0777",
        ],
    );
    assert!(!pin.path().exists(), "nothing pinned");

    // Root's own 0700 directory, below a directory the user owns: the user
    // could rename it away and put its own in its place.
    let home = dir.path().join("home");
    fs::create_dir(&home).unwrap();
    chown(&home, Some(USER), Some(USER)).unwrap();
    chmod(&home, 0o755);
    let state = home.join("state");
    fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let stderr = refused(&cg, &config, pin.path(), &state);
    assert_names(
        &stderr,
        &[
            &format!(
                "{} is not trusted: {} is owned by another user",
                state.display(),
                home.display()
            ),
            "owner uid 65534",
        ],
    );
    assert!(!pin.path().exists(), "nothing pinned");
}

#[test]
fn a_policy_file_others_can_write_is_refused() {
    require_root();
    let cg = CgroupGuard::new("files-policy");
    let dir = TempDir::new("llm-egress-test-files");
    let config = write_policy(&cg, dir.path());
    chmod(&config, 0o666);
    let pin = PinDir::new();
    let stderr = refused(&cg, &config, pin.path(), &dir.path().join("state"));
    assert_names(
        &stderr,
        &[
            &format!("policy file {} is not trusted", config.display()),
            "writable by every user",
            "mode 0666",
        ],
    );
    assert!(!pin.path().exists(), "nothing pinned");
}

#[test]
fn a_policy_file_made_writable_by_others_is_not_reloaded() {
    require_root();
    let cg = CgroupGuard::new("files-reload");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the first policy denies 198.51.100.0/24",
    );
    let g0 = agent.generation();
    // Someone opens the file to everyone, and it then says "allow more".
    let config = agent.config_path().to_path_buf();
    chmod(&config, 0o666);
    fs::write(&config, both_allowed_policy(&cg)).unwrap();
    agent.sighup();
    let refused = format!("policy file {} is not trusted", config.display());
    wait_until(RELOAD_WAIT, Duration::from_millis(50), || {
        agent.stderr().contains(&refused).then_some(())
    })
    .unwrap_or_else(|| panic!("the reload is refused naming the file\n{}", agent.context()));
    assert_eq!(agent.generation(), g0, "no new generation");
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the running policy stays in force",
    );
    // Root's alone again: the same content is applied.
    chmod(&config, 0o644);
    agent.sighup();
    agent.wait_for_generation_after(g0);
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the trusted file's policy allows 198.51.100.0/24",
    );
}

#[test]
fn a_policy_in_a_read_only_mount_of_an_open_directory_is_accepted() {
    require_root();
    // A Kubernetes ConfigMap volume: a 0777 directory, mounted read-only.
    let cg = CgroupGuard::new("files-ro");
    let dir = TempDir::new("llm-egress-test-files");
    let cm = dir.path().join("configmap");
    fs::create_dir(&cm).unwrap();
    chmod(&cm, 0o777);
    let config = write_policy(&cg, &cm);
    let pin = PinDir::new();
    let err_path = dir.path().join("stderr");
    // The agent in its own mount namespace, where `cm` is a read-only bind
    // mount of itself (nothing changes outside).
    let script = format!(
        "mount --bind {cm} {cm} && mount -o remount,bind,ro {cm} && exec {bin} run \
         --config {config} --pin-path {pin} --state-dir {state} --metrics-listen off --audit-log off",
        cm = toml_str(&cm.display().to_string()),
        bin = toml_str(&agent_bin().display().to_string()),
        config = toml_str(&config.display().to_string()),
        pin = toml_str(&pin.path().display().to_string()),
        state = toml_str(&dir.path().join("state").display().to_string()),
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start unshare: {e}"));
    let ready = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        if child.try_wait().ok().flatten().is_some() {
            return Some(false);
        }
        let log = fs::read_to_string(&err_path).unwrap_or_default();
        log.contains(" ready ").then_some(true)
    });
    // SAFETY: signalling our own child by its pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let _ = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    })
    .or_else(|| {
        let _ = child.kill();
        child.wait().ok()
    });
    let log = fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(
        ready,
        Some(true),
        "write bits on a read-only mount do not count: the agent starts\n{log}"
    );
    // The same directory writable: refused.
    let stderr = refused(&cg, &config, pin.path(), &dir.path().join("state"));
    assert_names(&stderr, &["writable by every user", "mode 0777"]);
}
