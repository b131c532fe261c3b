//! deploy/: the systemd unit, the Kubernetes manifests, the Grafana
//! dashboard and the image, checked against the tools that consume them and
//! against a real agent.
//!
//! - The unit passes `systemd-analyze verify`; the agent runs under exactly
//!   the unit's capabilities and file system restrictions (emulated with
//!   `unshare --mount` and `setpriv`, nothing is installed), and each of
//!   those capabilities is still needed. Under a real systemd and a real
//!   container runtime: deploy_systemd.rs and deploy_container.rs.
//! - The agent's log is plain text on a pipe, JSON with `--log-format json`.
//! - The manifests pass `kubernetes-validate --strict` (from the venv that
//!   `cargo xtask setup` makes) and agree with each other, with the unit's
//!   capabilities, and with `llm-egress check`.
//! - Every query of the dashboard returns series from a real Prometheus that
//!   scraped a real agent after real traffic (tests/src/prometheus.rs), and
//!   `promtool check metrics` accepts that agent's exposition.
//!
//! Needs root for the agent (cgroups, BPF); the static checks do not.

use std::{
    collections::BTreeSet,
    fs,
    io::Write,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, PinDir, Probe, TempDir,
    agent::free_loopback_port,
    agent_bin,
    fake_provider::{self, FakeProvider, Flavor},
    http,
    probe::describe,
    prometheus::Prometheus,
    redis::{RedisOptions, RedisServer},
    require_root,
    servers::HttpServer,
    tail, toml_str, wait_until,
};
use serde_json::Value;

const UNIT: &str = "deploy/systemd/llm-egress.service";
/// Kubernetes versions the manifests are validated against.
const KUBERNETES_VERSIONS: &[&str] = &["1.31.0", "1.33.0"];
const EVENT_WAIT: Duration = Duration::from_secs(5);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_egress-probe"))
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 6000),
        tail(&String::from_utf8_lossy(&out.stderr), 6000)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()))
}

/// The tests' Python venv (`cargo xtask setup` makes it): `$LLM_EGRESS_PYENV`,
/// else `<target dir>/pyenv`, found from this test executable
/// (`<target>/<profile>/deps/deploy-*`).
fn pyenv() -> PathBuf {
    let dir = std::env::var_os("LLM_EGRESS_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("the test executable");
            exe.ancestors()
                .nth(3)
                .expect("<target>/<profile>/deps/exe")
                .join("pyenv")
        });
    assert!(
        dir.join("bin/kubernetes-validate").is_file(),
        "{} has no kubernetes-validate: run `cargo xtask setup` (it makes this venv), or set LLM_EGRESS_PYENV",
        dir.display()
    );
    dir
}

// ---------------------------------------------------------------- systemd

/// The values of `key=` in the unit's [Service] section, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service
            && let Some(v) = line.strip_prefix(key).and_then(|r| r.strip_prefix('='))
        {
            out.push(v.trim().to_string());
        }
    }
    out
}

/// `CapabilityBoundingSet=` as lower-case names without `CAP_`: `bpf`, ...
fn unit_capabilities(unit: &str) -> Vec<String> {
    let sets = unit_values(unit, "CapabilityBoundingSet");
    assert_eq!(
        sets.len(),
        1,
        "{UNIT} should set CapabilityBoundingSet= once: {sets:?}"
    );
    sets[0]
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{UNIT}: capability {c:?} without CAP_"))
                .to_ascii_lowercase()
        })
        .collect()
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read(UNIT);
    let exec = unit_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart= in {UNIT}");
    assert!(
        exec[0].starts_with("/usr/local/bin/llm-egress run --config /etc/llm-egress/policy.toml"),
        "{UNIT}: ExecStart= should run the installed binary with the installed policy: {}",
        exec[0]
    );
    assert_eq!(
        unit_values(&unit, "ExecReload"),
        ["/bin/kill -HUP $MAINPID"]
    );
    assert_eq!(unit_values(&unit, "Restart"), ["on-failure"]);
    assert_eq!(unit_values(&unit, "NoNewPrivileges"), ["yes"]);
    assert_eq!(unit_values(&unit, "ProtectSystem"), ["strict"]);
    let bin = agent_bin();
    assert!(bin.is_file(), "agent binary {} not found", bin.display());
    let dir = TempDir::new("llm-egress-test-unit");
    // verify checks that ExecStart's binary exists: point it at the build.
    let verify = |text: &str| -> Output {
        let file = dir.path().join("llm-egress.service");
        fs::write(
            &file,
            text.replace("/usr/local/bin/llm-egress", &bin.display().to_string()),
        )
        .expect("write the unit copy");
        run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&file))
    };
    let out = verify(&unit);
    let complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("llm-egress"))
        .map(str::to_string)
        .collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "systemd-analyze verify complains about {UNIT}:\n{}",
        show(&out)
    );
    // The check is not blind: an unknown key is reported (with exit 0).
    let out = verify(&unit.replace("[Service]\n", "[Service]\nProtectKernal=yes\n"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ProtectKernal"),
        "systemd-analyze verify should report an unknown key:\n{}",
        show(&out)
    );
}

#[test]
fn systemd_default_policy_passes_check() {
    let out = run(Command::new(agent_bin())
        .arg("check")
        .arg(repo().join("deploy/systemd/policy.toml")));
    assert!(
        out.status.success(),
        "deploy/systemd/policy.toml must pass `llm-egress check`:\n{}",
        show(&out)
    );
}

/// A script that runs the agent the way the unit does: a private mount
/// namespace where every mount is read-only except bpffs and the directory
/// of `--audit-log` (ProtectSystem=strict, ProtectKernelTunables=,
/// ProtectControlGroups=, ReadWritePaths=/sys/fs/bpf, LogsDirectory=), then
/// `setpriv` with the bounding set `caps` and no_new_privs.
fn sandbox_script(dir: &Path, caps: &[String], no_new_privs: bool) -> PathBuf {
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let nnp = if no_new_privs { "--no-new-privs" } else { "" };
    let inner = format!(
        r#"#!/bin/sh
# Runs inside `unshare --mount --propagation private`.
agent="$1"; shift
rw=""; prev=""
for a in "$@"; do [ "$prev" = --audit-log ] && rw="$(dirname "$a")"; prev="$a"; done
[ -n "$rw" ] && mount --bind "$rw" "$rw"
while read -r _ _ _ _ mp _; do
  case "$mp" in /sys/fs/bpf|/sys/fs/bpf/*|"$rw") continue ;; esac
  mount -o bind,remount,ro "$mp" 2>/dev/null || echo "sandbox: $mp stays writable" >&2
done < /proc/self/mountinfo
exec setpriv --bounding-set {bounding} {nnp} -- "$agent" "$@"
"#
    );
    let inner_path = dir.join(format!("sandbox-inner-{}.sh", caps.join("-")));
    let outer_path = dir.join(format!("sandbox-{}.sh", caps.join("-")));
    let outer = format!(
        "#!/bin/sh\nexec unshare --mount --propagation private -- /bin/sh {} {} \"$@\"\n",
        inner_path.display(),
        agent_bin().display()
    );
    for (path, text) in [(&inner_path, inner), (&outer_path, outer)] {
        fs::write(path, text).expect("write the sandbox script");
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .expect("chmod the sandbox script");
    }
    outer_path
}

fn unit_policy(cg: &CgroupGuard) -> String {
    format!(
        r#"mode = "enforce"
cgroup = {}
failure_mode = "closed"

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]
ports = [443]

[[workloads]]
name = "w"
cgroup = "w"
deny = ["test-llm"]
"#,
        toml_str(&cg.path().display().to_string())
    )
}

/// A bash of user 65534 in cgroup `w` and the namespace, started now (before
/// the agent, so that no exec event of it exists): when `go` appears it
/// connects to 10.20.0.1:443 and stays alive 3 s longer.
fn start_other_user_client(w: &Path, ns: &NetnsGuard, go: &Path) -> Child {
    let script = format!(
        "echo $$ > {procs}; exec ip netns exec {ns} setpriv --reuid=65534 --regid=65534 --clear-groups \
         /bin/bash -c 'while [ ! -e {go} ]; do sleep 0.05; done; {{ : 3<>/dev/tcp/10.20.0.1/443; }} 2>/dev/null; sleep 3; exit 0'",
        procs = w.join("cgroup.procs").display(),
        ns = ns.name(),
        go = go.display()
    );
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", &script]).stdin(Stdio::null());
    // SAFETY: prctl is async-signal-safe; the client dies with the test.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    cmd.spawn().expect("start the client of user 65534")
}

/// The executable the audit log names for user 65534's connect.
fn exe_of_other_user(agent: &Agent) -> String {
    let ev = agent
        .wait_for_audit(
            |e| e["uid"] == 65534 && e["dst_addr"] == "10.20.0.1",
            EVENT_WAIT,
        )
        .unwrap_or_else(|| {
            panic!(
                "no audit event of user 65534's connect\n{}",
                agent.context()
            )
        });
    ev["exe"].as_str().unwrap_or_default().to_string()
}

/// Starts `wrapper` as `llm-egress run` would be started by the harness and
/// returns how it ended, or `None` if it became ready (then it is stopped).
fn start_expecting_failure(wrapper: &Path, policy: &str, dir: &Path) -> Option<(i32, String)> {
    let pin = PinDir::new();
    let config = dir.join("policy-fail.toml");
    fs::write(&config, policy).expect("write the policy");
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let stderr_path = dir.join("stderr-fail.log");
    let mut cmd = Command::new(wrapper);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--pin-path")
        .arg(pin.path())
        .arg("--metrics-listen")
        .arg(&addr)
        .arg("--audit-log")
        .arg(dir.join("audit-fail.jsonl"))
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr_path).expect("stderr file"));
    // SAFETY: prctl is async-signal-safe; the agent stops with the test.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start the agent");
    let addr = addr.parse().expect("socket address");
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some((
                status.code().unwrap_or(-1),
                fs::read_to_string(&stderr_path).unwrap_or_default(),
            ));
        }
        if http::get(addr, "/readyz", Duration::from_millis(300)).is_ok_and(|r| r.status == 200) {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!(
        "the agent neither became ready nor exited within 20 s:\n{}",
        fs::read_to_string(&stderr_path).unwrap_or_default()
    );
}

#[test]
fn systemd_unit_privileges_are_enough_and_each_capability_is_needed() {
    require_root();
    let unit = read(UNIT);
    let caps = unit_capabilities(&unit);
    let nnp = unit_values(&unit, "NoNewPrivileges") == ["yes"];
    let read_write = unit_values(&unit, "ReadWritePaths");
    assert_eq!(
        read_write,
        ["/sys/fs/bpf"],
        "the sandbox below emulates ReadWritePaths=/sys/fs/bpf only"
    );
    // Token budgets are saved under the policy's state_dir, by default
    // /var/lib/llm-egress: the unit must make exactly that writable.
    assert_eq!(
        unit_values(&unit, "StateDirectory"),
        ["llm-egress"],
        "StateDirectory= gives the agent /var/lib/llm-egress (docs/limits.md)"
    );
    let dir = TempDir::new("llm-egress-test-caps");
    let cg = CgroupGuard::new("unit-caps");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let policy = unit_policy(&cg);

    // With the unit's privileges: ready, enforcing, and the exe of another
    // user's process that started before the agent is known.
    {
        let go = dir.path().join("go-all");
        let mut client = start_other_user_client(&w, &ns, &go);
        let agent = Agent::start_with(sandbox_script(dir.path(), &caps, nnp), &policy);
        let status =
            fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap_or_default();
        let eff = status
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .unwrap_or_default()
            .to_string();
        let r = probe().connect(&w, &ns, "10.20.0.1:443");
        assert_eq!(
            r,
            Err(libc::EPERM),
            "w → test-llm under the unit's privileges: got {}\n{}",
            describe(&r),
            agent.context()
        );
        fs::write(&go, "").expect("touch go");
        let exe = exe_of_other_user(&agent);
        assert!(
            exe.ends_with("bash"),
            "with CAP_SYS_PTRACE the agent reads /proc/PID/exe of user 65534's bash, got {exe:?} ({eff})\n{}",
            agent.context()
        );
        let _ = client.wait();
    }

    // exact_tokens needs CAP_SYS_ADMIN, which the unit leaves out (an
    // opt-in, docs/install.md "Exact tokens"): the agent still enforces,
    // and says at start why those workloads get no plaintext.
    {
        let exact = format!(
            "{policy}\n[[workloads]]\nname = \"reader\"\ncgroup = \"reader\"\nallow = [\"test-llm\"]\nexact_tokens = true\n"
        );
        let agent = Agent::start_with(sandbox_script(dir.path(), &caps, nnp), &exact);
        let r = probe().connect(&w, &ns, "10.20.0.1:443");
        assert_eq!(r, Err(libc::EPERM), "{}", agent.context());
        let said = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            agent
                .stderr()
                .contains("exact_tokens workloads need CAP_SYS_ADMIN")
                .then_some(())
        });
        assert!(
            said.is_some(),
            "no start-time error about CAP_SYS_ADMIN for exact_tokens\n{}",
            agent.context()
        );
    }

    // Without each capability: what breaks. A capability whose removal breaks
    // nothing should leave the unit.
    for cap in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != cap).cloned().collect();
        let wrapper = sandbox_script(dir.path(), &fewer, nnp);
        match cap.as_str() {
            "bpf" | "net_admin" | "perfmon" => {
                let Some((code, stderr)) = start_expecting_failure(&wrapper, &policy, dir.path())
                else {
                    panic!(
                        "the agent started without CAP_{}: remove it from {UNIT} and docs/install.md",
                        cap.to_uppercase()
                    );
                };
                assert!(
                    code != 0
                        && (stderr.contains("Operation not permitted")
                            || stderr.contains("Permission denied")),
                    "without CAP_{} the agent should refuse to start with EPERM/EACCES (exit {code}):\n{stderr}",
                    cap.to_uppercase()
                );
            }
            "sys_ptrace" => {
                let go = dir.path().join("go-noptrace");
                let mut client = start_other_user_client(&w, &ns, &go);
                let agent = Agent::start_with(wrapper, &policy);
                fs::write(&go, "").expect("touch go");
                let exe = exe_of_other_user(&agent);
                assert_eq!(
                    exe,
                    "",
                    "without CAP_SYS_PTRACE the exe of an older process of another user should be unknown; if it is known, drop the capability\n{}",
                    agent.context()
                );
                let _ = client.wait();
            }
            other => panic!(
                "{UNIT} grants CAP_{}, which this test does not know why",
                other.to_uppercase()
            ),
        }
    }
}

/// journald, `podman logs` and the kubelet store what the agent writes to
/// stderr, a pipe: plain text there (colour only on a terminal), and one
/// JSON object per line with `--log-format json`. (The systemd and podman
/// tests check the same in journald and `podman logs`.)
#[test]
fn agent_log_is_plain_text_in_a_pipe_and_json_on_request() {
    let dir = TempDir::new("llm-egress-test-logfmt");
    let config = dir.path().join("policy.toml");
    // Fails right after logging starts: the attach cgroup does not exist.
    fs::write(
        &config,
        format!(
            "mode = \"audit\"\ncgroup = {}\nmetrics_listen = \"127.0.0.1:0\"\n",
            toml_str(&dir.path().join("no-such-cgroup").display().to_string())
        ),
    )
    .expect("write the policy");
    let text = run(Command::new(agent_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NO_COLOR"));
    let stderr = String::from_utf8_lossy(&text.stderr);
    assert!(
        !text.status.success() && stderr.contains("ERROR") && stderr.contains("no-such-cgroup"),
        "the agent should fail on the missing cgroup:\n{}",
        show(&text)
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "escape codes in the agent's log on a pipe:\n{stderr:?}"
    );
    let json = run(Command::new(agent_bin())
        .args(["--log-format", "json", "run", "--config"])
        .arg(&config));
    let lines: Vec<Value> = String::from_utf8_lossy(&json.stderr)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("--log-format json wrote a non-JSON line ({e}): {l}"))
        })
        .collect();
    assert!(
        lines.iter().any(|v| v["level"] == "ERROR"
            && v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no-such-cgroup"))),
        "the error as a JSON record: {lines:?}"
    );
}

// ---------------------------------------------------------------- Kubernetes

fn manifests() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo().join("deploy/kubernetes"), &mut out);
    assert!(
        out.len() >= 6,
        "deploy/kubernetes should hold the manifests: {out:?}"
    );
    out
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let venv = pyenv();
    let files = manifests();
    for version in KUBERNETES_VERSIONS {
        let out = run(Command::new(venv.join("bin/kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", version])
            .args(&files));
        let text = show(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate {version}:\n{text}"
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let passed = all
            .lines()
            .filter(|l| l.starts_with("INFO") && l.contains(" passed "))
            .count();
        // Only the PodMonitor has no schema in kubernetes-validate (a CRD of
        // the Prometheus Operator); kubernetes_manifests_agree checks it.
        let unexpected: Vec<&str> = all
            .lines()
            .filter(|l| !l.trim().is_empty())
            .filter(|l| !(l.starts_with("INFO") && l.contains(" passed ")))
            .filter(|l| {
                !(l.starts_with("WARN")
                    && l.contains("kind PodMonitor with api version monitoring.coreos.com/v1"))
            })
            .collect();
        assert!(
            unexpected.is_empty(),
            "kubernetes-validate {version} said more than `passed`:\n{text}"
        );
        // A file may hold several documents (05-rbac.yaml: a ClusterRole
        // and its binding); each passes on its own line.
        let documents: usize = files
            .iter()
            .map(|f| yaml_documents(&fs::read_to_string(f).unwrap_or_default()))
            .sum();
        assert_eq!(
            passed,
            documents - 1,
            "every manifest but the PodMonitor passes ({version}):\n{text}"
        );
    }
}

/// The documents of a YAML stream: `---`-separated parts with content.
fn yaml_documents(text: &str) -> usize {
    let mut count = 0;
    let mut content = false;
    for line in text.lines().chain(["---"]) {
        if line.trim_end() == "---" {
            count += usize::from(content);
            content = false;
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            content = true;
        }
    }
    count
}

/// Reads every manifest with PyYAML and checks that they fit together;
/// prints what the Rust side checks further as one JSON object.
const AGREE_PY: &str = r#"
import json, os, sys, tomllib, yaml
docs = []
for f in sys.argv[1:]:
    docs += [(f, d) for d in yaml.safe_load_all(open(f)) if d]
by_kind = {}
for f, d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
def one(kind):
    assert len(by_kind.get(kind, [])) == 1, f"expected one {kind}, got {len(by_kind.get(kind, []))}"
    return by_kind[kind][0]
problems = []
def check(ok, what):
    if not ok: problems.append(what)
ns = one("Namespace")["metadata"]["name"]
for f, d in docs:
    if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
        check(d["metadata"].get("namespace") == ns, f"{f}: {d['kind']} not in namespace {ns}")
check(one("Namespace")["metadata"]["labels"].get("pod-security.kubernetes.io/enforce") == "privileged", "namespace must admit privileged pods (hostPID, hostPath)")
ds, svc, cm, sa, pm = one("DaemonSet"), one("Service"), one("ConfigMap"), one("ServiceAccount"), one("PodMonitor")
tmpl = ds["spec"]["template"]
labels = tmpl["metadata"]["labels"]
sub = lambda sel: all(labels.get(k) == v for k, v in sel.items())
check(sub(ds["spec"]["selector"]["matchLabels"]), "DaemonSet selector does not match its pod labels")
check(sub(svc["spec"]["selector"]), "Service selector does not match the pods")
check(sub(pm["spec"]["selector"]["matchLabels"]), "PodMonitor selector does not match the pods")
check(ns in pm["spec"]["namespaceSelector"]["matchNames"], "PodMonitor does not look in the namespace")
spec = tmpl["spec"]
check(spec.get("hostPID") is True, "hostPID: the agent reads /proc/<host pid>/exe")
check(spec.get("serviceAccountName") == sa["metadata"]["name"], "DaemonSet does not use the ServiceAccount")
[c] = spec["containers"]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
check(svc["spec"]["ports"][0]["targetPort"] in ports, "Service targetPort is no container port")
check(all(e["port"] in ports for e in pm["spec"]["podMetricsEndpoints"]), "PodMonitor port is no container port")
check(c["livenessProbe"]["httpGet"]["path"] == "/healthz" and c["livenessProbe"]["httpGet"]["port"] in ports, "liveness probe on /healthz")
check(c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["readinessProbe"]["httpGet"]["port"] in ports, "readiness probe on /readyz")
for obj in (tmpl["metadata"], svc["metadata"]):
    a = obj.get("annotations", {})
    check(a.get("prometheus.io/scrape") == "true" and int(a.get("prometheus.io/port", 0)) in ports.values(), "prometheus.io annotations")
sc = c["securityContext"]
check(sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False, "not privileged, no privilege escalation")
check(sc["capabilities"]["drop"] == ["ALL"], "drop ALL capabilities first")
# seccomp: the shipped Localhost profile, which allows bpf() and
# perf_event_open() without CAP_SYS_ADMIN (containers/common's default does not).
check(sc.get("seccompProfile") == {"type": "Localhost", "localhostProfile": "llm-egress.json"}, "seccompProfile: Localhost llm-egress.json (deploy/kubernetes/seccomp/)")
prof = json.load(open(os.path.join(os.path.dirname(sys.argv[1]), "seccomp", "llm-egress.json")))
check(prof["defaultAction"] == "SCMP_ACT_ERRNO", "the seccomp profile denies by default")
for name in ("bpf", "perf_event_open"):
    rules = [r for r in prof["syscalls"] if name in r["names"]]
    check(len(rules) == 1 and rules[0]["action"] == "SCMP_ACT_ALLOW" and not rules[0].get("includes") and not rules[0].get("excludes") and not rules[0].get("args"), f"the seccomp profile allows {name} unconditionally, once")
# Only what the agent calls (docs/install.md "seccomp"): none of the calls a
# runtime's default allows that the agent never makes.
allowed = {n for r in prof["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
for name in ("unshare", "setns", "keyctl", "ptrace", "process_vm_writev", "chroot", "pivot_root", "init_module", "kexec_load", "userfaultfd", "io_uring_setup", "personality"):
    check(name not in allowed, f"the seccomp profile allows {name}, which the agent never calls")
check(len(allowed) < 140, f"the seccomp profile allows {len(allowed)} calls: it should list only the agent's")
mounts = {m["name"]: m for m in c["volumeMounts"]}
vols = {v["name"]: v for v in spec["volumes"]}
policy_vol = [n for n, v in vols.items() if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
check(len(policy_vol) == 1 and "subPath" not in mounts[policy_vol[0]], "the ConfigMap is mounted as a directory (subPath mounts never see updates)")
config = c["args"][c["args"].index("--config") + 1]
check(config == mounts[policy_vol[0]]["mountPath"].rstrip("/") + "/policy.toml" and "policy.toml" in cm["data"], "--config names the ConfigMap's policy.toml")
host = {m["mountPath"]: vols[n]["hostPath"]["path"] for n, m in mounts.items() if "hostPath" in vols[n]}
check(host.get("/sys/fs/cgroup") == "/sys/fs/cgroup" and host.get("/sys/fs/bpf") == "/sys/fs/bpf", "cgroup2 and bpffs at their host paths")
check(host.get(policy_state_dir := tomllib.loads(cm["data"]["policy.toml"]).get("state_dir", "/var/lib/llm-egress")) == policy_state_dir, "state_dir (token budgets) is a host directory, so budgets outlive the pod")
policy = tomllib.loads(cm["data"]["policy.toml"])
check(int(policy["metrics_listen"].rsplit(":", 1)[1]) in ports.values(), "metrics_listen is the container port")
check(policy.get("cgroup", "/sys/fs/cgroup").startswith("/sys/fs/cgroup/"), "the policy's cgroup is below the mounted cgroup tree")
for kind in ("requests", "limits"):
    check({"cpu", "memory"} <= set(c["resources"].get(kind, {})), f"resources.{kind} cpu and memory")
# The pod list (docs/policy.md "[kubernetes]"): RBAC, token, node name.
cr, crb = one("ClusterRole"), one("ClusterRoleBinding")
check(any("" in r.get("apiGroups", []) and "pods" in r.get("resources", []) and "list" in r.get("verbs", []) for r in cr["rules"]), "the ClusterRole lets the agent list pods")
check(all(set(r.get("verbs", [])) <= {"get", "list", "watch"} for r in cr["rules"]), "the ClusterRole only reads")
check(crb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cr["metadata"]["name"]}, "the binding names the ClusterRole")
check({"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": ns} in crb["subjects"], "the binding's subject is the agent's ServiceAccount")
check(spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True)) is True, "the service account token is mounted (the agent lists pods with it)")
env = {e["name"]: e for e in c.get("env", [])}
check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName", "NODE_NAME from the downward API (spec.nodeName)")
print(json.dumps({"problems": problems, "capabilities": sc["capabilities"]["add"], "policy": cm["data"]["policy.toml"],
                  "command": c["command"], "image": c["image"]}))
"#;

fn manifest_facts() -> Value {
    let venv = pyenv();
    let out = run(Command::new(venv.join("bin/python3"))
        .arg("-c")
        .arg(AGREE_PY)
        .args(manifests()));
    assert!(
        out.status.success(),
        "reading the manifests failed:\n{}",
        show(&out)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", show(&out)))
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_with_the_unit() {
    let facts = manifest_facts();
    assert_eq!(
        facts["problems"],
        Value::Array(vec![]),
        "the manifests do not fit together"
    );
    let daemonset: BTreeSet<String> = facts["capabilities"]
        .as_array()
        .expect("capabilities")
        .iter()
        .map(|c| c.as_str().unwrap_or_default().to_ascii_lowercase())
        .collect();
    let unit: BTreeSet<String> = unit_capabilities(&read(UNIT)).into_iter().collect();
    assert_eq!(
        daemonset, unit,
        "the DaemonSet adds other capabilities than the systemd unit allows"
    );
    let dockerfile = read("Dockerfile");
    let command = facts["command"][0].as_str().unwrap_or_default();
    assert!(
        dockerfile.contains(&format!(
            "COPY --from=build /src/target/release/llm-egress {command}"
        )),
        "the image should put the agent where the DaemonSet runs it ({command})"
    );
}

#[test]
fn kubernetes_configmap_policy_passes_check() {
    let facts = manifest_facts();
    let dir = TempDir::new("llm-egress-test-cm");
    let file = dir.path().join("policy.toml");
    fs::write(&file, facts["policy"].as_str().expect("policy text")).expect("write policy");
    let out = run(Command::new(agent_bin()).arg("check").arg(&file));
    assert!(
        out.status.success(),
        "the ConfigMap's policy.toml must pass `llm-egress check`:\n{}",
        show(&out)
    );
}

// ---------------------------------------------------------------- image

#[test]
fn dockerfile_builds_the_pinned_toolchain_and_ignores_build_output() {
    let dockerfile = read("Dockerfile");
    let setup = read("xtask/src/setup.rs");
    let linker = setup
        .lines()
        .find_map(|l| l.strip_prefix("pub const BPF_LINKER_VERSION: &str = \""))
        .and_then(|r| r.strip_suffix("\";"))
        .expect("BPF_LINKER_VERSION in xtask/src/setup.rs");
    assert!(
        dockerfile.contains(&format!("ARG BPF_LINKER_VERSION={linker}")),
        "Dockerfile: bpf-linker {linker}, as setup installs"
    );
    let manifest = read("Cargo.toml");
    let rust = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = \""))
        .and_then(|r| r.strip_suffix('"'))
        .expect("rust-version in Cargo.toml");
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={rust}")),
        "Dockerfile: rustup toolchain {rust}, the workspace's rust-version"
    );
    for needle in [
        "FROM debian:bookworm AS build",
        "FROM debian:bookworm-slim",
        "cargo xtask build-ebpf",
        "--release",
        "--locked",
    ] {
        assert!(dockerfile.contains(needle), "Dockerfile lacks {needle:?}");
    }
    // A pipe's exit status is its last command's: `curl … | sh` built an
    // image without rustup when the download failed. No RUN pipes unless
    // it sets pipefail (continuation lines joined; `||` is not a pipe).
    let joined = dockerfile.replace("\\\n", " ");
    for run in joined
        .lines()
        .filter(|l| l.trim_start().starts_with("RUN "))
    {
        let pipes = run.replace("||", "").contains('|');
        assert!(
            !pipes || run.contains("pipefail"),
            "Dockerfile: a RUN with a pipe but without pipefail hides a failed first command: {run}"
        );
    }
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target", ".git"] {
        assert!(
            rules.iter().any(|r| r.trim_matches('/') == must),
            ".dockerignore should leave out {must}"
        );
    }
    for needed in [
        "Cargo.lock",
        "agent",
        "common",
        "ebpf",
        "xtask",
        "deploy",
        ".cargo",
    ] {
        assert!(
            !rules
                .iter()
                .any(|r| r.trim_matches('/') == needed || *r == "*"),
            ".dockerignore must not leave out {needed}: the build needs it"
        );
    }
}

// ---------------------------------------------------------------- dashboard

/// A panel query as Prometheus gets it: Grafana's interval variables
/// become 1m, dashboard variables (`$workload`, `${provider}`) `.*`.
pub fn substitute(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "5m");
    let mut out = String::new();
    let mut rest = expr.as_str();
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name_len, skip) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').unwrap_or(braced.len());
            (end, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (end, end)
        };
        if name_len == 0 {
            out.push('$');
            rest = after;
        } else {
            out.push_str(".*");
            rest = &after[skip.min(after.len())..];
        }
    }
    out.push_str(rest);
    out
}

/// (panel title, exprs) of every panel with queries, rows' children included.
fn dashboard_panels(dash: &Value) -> Vec<(String, Vec<String>)> {
    fn walk(panels: &Value, out: &mut Vec<(String, Vec<String>)>) {
        for p in panels.as_array().into_iter().flatten() {
            walk(&p["panels"], out);
            let exprs: Vec<String> = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["expr"].as_str().map(str::to_string))
                .collect();
            if !exprs.is_empty() {
                out.push((p["title"].as_str().unwrap_or("?").to_string(), exprs));
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Metric names (`llm_egress_*`) an expression uses; histogram series map
/// to their family.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("llm_egress_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        out.insert(family);
    }
    out
}

#[test]
fn dashboard_uses_only_documented_metrics() {
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/llm-egress.json")).expect("dashboard JSON");
    let docs = read("docs/metrics.md");
    let panels = dashboard_panels(&dash);
    assert!(
        panels.len() >= 10,
        "the dashboard should have its panels: {}",
        panels.len()
    );
    for (title, exprs) in &panels {
        for expr in exprs {
            for name in metric_names(expr) {
                assert!(
                    docs.contains(&format!("`{name}`")),
                    "panel {title:?} uses {name}, which docs/metrics.md does not document: {expr}"
                );
            }
        }
    }
    assert_eq!(
        substitute(r#"rate(x{w=~"$workload",p=~"${provider}"}[$__rate_interval])"#),
        r#"rate(x{w=~".*",p=~".*"}[1m])"#
    );
}

/// curl inside `cgroup` and the namespace, fetching `url` with a request
/// big enough for a token estimate (the agent estimates none below 800 bytes).
fn curl(cgroup: &Path, ns: &NetnsGuard, url: &str) -> Output {
    let procs = cgroup.join("cgroup.procs");
    let pad = format!("X-Prompt: {}", "p".repeat(1500));
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns.name(),
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "--max-time",
        "5",
        "-H",
        &pad,
        url,
    ]);
    // SAFETY: only an open, a write and a close between fork and exec.
    unsafe {
        cmd.pre_exec(move || fs::write(&procs, b"0"));
    }
    run(&mut cmd)
}

/// An agent after traffic of every kind the dashboard shows: allowed provider
/// connections with payload (curl), denied ones, audited ones, a failed
/// handshake, a connection refused by a rate limit, and a token budget.
/// `redis`: the fleet ledger of workload `fleetbot` (the fleet panels).
/// `openai`: a fake provider that workload `reader` (`exact_tokens`, a
/// dollar budget) calls with curl, a secret in its prompt (the plaintext
/// panels: cost, exact tokens, the estimator's error, secrets).
fn agent_with_traffic(
    cg: &CgroupGuard,
    ns: &NetnsGuard,
    redis: &RedisServer,
    openai: &FakeProvider,
) -> Agent {
    let (bot, batch, notebook) = (cg.child("bot"), cg.child("batch"), cg.child("notebook"));
    let reader = cg.child("reader");
    let capped = cg.child("capped");
    // A pod of `fleetbot` here: it holds a share of its fleet connection
    // rate (the dashboard's fleet-rate panel).
    cg.child("fleetbot");
    let agent = Agent::start(&format!(
        r#"mode = "enforce"
cgroup = {}

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]

[[providers]]
name = "openai"
hosts = ["api.openai.com"]
cidrs = ["192.0.2.1/32"]
ports = [443]

[[workloads]]
name = "reader"
cgroup = "reader"
allow = ["openai"]
exact_tokens = true
[workloads.limits]
usd_per_day = 1000

[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm"]
[workloads.limits]
tokens_per_minute = 1000000

[[workloads]]
name = "batch"
cgroup = "batch"
deny = ["test-llm"]

[[workloads]]
name = "notebook"
cgroup = "notebook"
llm = "audit"

[[workloads]]
name = "capped"
cgroup = "capped"
allow = ["test-llm"]
[workloads.limits]
connections_per_second = 0.001
burst = 1

[[workloads]]
name = "fleetbot"
cgroup = "fleetbot"
allow = ["test-llm"]
[workloads.limits]
tokens_per_day = 1000000
connections_per_second = 1000
scope = "fleet"

[fleet]
servers = [{}]
"#,
        toml_str(&cg.path().display().to_string()),
        toml_str(&redis.url())
    ));
    for i in 0..3 {
        let out = curl(&bot, ns, "http://10.20.0.1:8080/v1/models");
        assert!(
            out.status.success(),
            "curl #{i} from bot: {}\n{}",
            show(&out),
            agent.context()
        );
    }
    let p = probe();
    let r = p.connect(&batch, ns, "10.20.0.1:8080");
    assert_eq!(
        r,
        Err(libc::EPERM),
        "batch → test-llm: {}\n{}",
        describe(&r),
        agent.context()
    );
    let r = p.connect(&notebook, ns, "10.20.0.1:8080");
    assert!(
        r.is_ok(),
        "notebook → test-llm is audited, not denied: {}\n{}",
        describe(&r),
        agent.context()
    );
    let first = p.connect(&capped, ns, "10.20.0.1:8080");
    let second = p.connect(&capped, ns, "10.20.0.1:8080");
    assert_eq!(
        (first, second),
        (Ok(()), Err(libc::EPERM)),
        "capped (burst 1, one connection in 1000 s) → test-llm twice\n{}",
        agent.context()
    );
    // The plaintext panels: one exact exchange, with AWS's documented
    // example key in its prompt.
    let leaky = r#"{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"deploy with AKIAIOSFODNN7EXAMPLE please"}]}"#;
    let mut cmd = llm_egress_tests::curl::post(openai, "/v1/chat/completions", leaky, &reader, ns);
    cmd.args(["--http1.1", "--max-time", "30", "-o", "/dev/null"]);
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "curl from reader: {}\n{}",
        show(&out),
        agent.context()
    );
    let got = agent.wait_for_metric(
        "llm_egress_secrets_total",
        &[("workload", "reader")],
        1.0,
        EVENT_WAIT,
    );
    assert_eq!(got, Some(1.0), "the secret was found\n{}", agent.context());
    // Its close (1 s of grace for late plaintext) measures the estimator.
    let got = agent.wait_for_metric(
        "llm_egress_token_estimate_ratio_count",
        &[("workload", "reader")],
        1.0,
        EVENT_WAIT,
    );
    assert!(
        got >= Some(1.0),
        "the estimator's error was measured\n{}",
        agent.context()
    );
    // Nothing listens on port 9: an allowed connection whose handshake fails.
    let r = p.connect(&bot, ns, "10.20.0.1:9");
    assert_eq!(
        r,
        Err(libc::ECONNREFUSED),
        "bot → 10.20.0.1:9: {}\n{}",
        describe(&r),
        agent.context()
    );
    agent
}

#[test]
fn dashboard_queries_return_data_from_a_real_prometheus() {
    require_root();
    let dash: Value =
        serde_json::from_str(&read("deploy/grafana/llm-egress.json")).expect("dashboard JSON");
    let cg = CgroupGuard::new("dashboard");
    let ns = NetnsGuard::new();
    let _server = HttpServer::start(&ns, "10.20.0.1:8080");
    let redis = RedisServer::start(RedisOptions::default());
    let openai = fake_provider::start(&ns, "192.0.2.1:443", Flavor::OpenAi);
    let agent = agent_with_traffic(&cg, &ns, &redis, &openai);
    for (labels, n) in [
        (vec![("workload", "bot"), ("verdict", "allow")], 3.0),
        (vec![("workload", "batch"), ("verdict", "deny")], 1.0),
        (vec![("workload", "notebook"), ("verdict", "audit")], 1.0),
    ] {
        let got = agent.wait_for_metric("llm_egress_connections_total", &labels, n, EVENT_WAIT);
        assert!(
            got >= Some(n),
            "llm_egress_connections_total{labels:?} should reach {n}, is {got:?}\n{}",
            agent.context()
        );
    }
    let prom = Prometheus::start(agent.metrics_addr());
    // Two scrapes at least, so that rate() and increase() have two samples.
    let scraped = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        let r = prom
            .query("count_over_time(llm_egress_build_info[1m])")
            .ok()?;
        let n: f64 = r.first()?["value"][1].as_str()?.parse().ok()?;
        (n >= 3.0).then_some(n)
    });
    assert!(
        scraped.is_some(),
        "prometheus did not scrape the agent 3 times in 30 s:\n{}",
        prom.log()
    );

    let mut failures = Vec::new();
    let panels = dashboard_panels(&dash);
    for (title, exprs) in &panels {
        let mut series = 0;
        for expr in exprs {
            let q = substitute(expr);
            match prom.query(&q) {
                Ok(result) => series += result.len(),
                Err(e) => failures.push(format!("panel {title:?}: query error: {e}\n    {q}")),
            }
        }
        if series == 0 {
            failures.push(format!(
                "panel {title:?} shows nothing after traffic:\n    {}",
                exprs
                    .iter()
                    .map(|e| substitute(e))
                    .collect::<Vec<_>>()
                    .join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} panels fail against Prometheus scraping the agent:\n{}\n--- agent /metrics ---\n{}",
        failures.len(),
        panels.len(),
        failures.join("\n"),
        agent.metrics()
    );

    // The exposition those panels read passes Prometheus' own linter.
    let metrics = agent.metrics();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start promtool (Debian package prometheus)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(metrics.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics finds problems in the agent's /metrics:\n{}\n--- /metrics ---\n{metrics}",
        show(&out)
    );
}
