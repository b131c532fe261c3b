//! The container image under a real container runtime: podman 4.3 with runc
//! (tests/src/podman.rs) runs the image's runtime stage with the DaemonSet's
//! security context, read from deploy/kubernetes/03-daemonset.yaml: its
//! capabilities (drop ALL, add four), read-only root file system, no
//! privilege escalation, hostPID, the shipped seccomp profile, and the
//! host paths it mounts (cgroup tree and tracefs read-only, bpffs, the
//! policy directory read-only, a tmpfs on /run).
//!
//! What is built: the Dockerfile's last stage, from a local base image. No
//! registry is reachable here, so `debian:bookworm-slim` is the cached
//! Debian 12 minbase rootfs imported as `localhost/debian:bookworm-slim`,
//! and `COPY --from=build /src/target/release/llm-egress` copies the agent
//! under test instead (the build stage downloads rustup, which these
//! machines cannot reach; docs/install.md "Container image").
//!
//! Every container has `--network=none` and a cgroup parent below a test
//! cgroup; the policy attaches to a cgroup below that one, never to the
//! cgroup2 root.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use llm_egress_tests::{
    PinDir, TempDir, agent_bin, bpf, cgroup2_mount, nspawn, podman::Podman, require_root, toml_str,
    wait_until,
};
use serde_json::Value;

const IMAGE: &str = "localhost/llm-egress:deploy-test";
const BASE: &str = "localhost/debian:bookworm-slim";
const TARGET: &str = "10.20.0.1/443";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The agent container's settings from the DaemonSet, through the setup
/// venv's PyYAML (`cargo xtask setup` makes it).
fn daemonset_security() -> Value {
    let venv = std::env::var_os("LLM_EGRESS_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("the test executable");
            exe.ancestors()
                .nth(3)
                .expect("<target>/<profile>/deps/exe")
                .join("pyenv")
        });
    let script = r#"
import json, sys, yaml
ds = yaml.safe_load(open(sys.argv[1]))
spec = ds["spec"]["template"]["spec"]
[c] = spec["containers"]
vols = {v["name"]: v for v in spec["volumes"]}
mounts = [{"path": m["mountPath"], "ro": m.get("readOnly", False),
           "host": vols[m["name"]].get("hostPath", {}).get("path"),
           "kind": next(k for k in vols[m["name"]] if k != "name")} for m in c["volumeMounts"]]
print(json.dumps({"sc": c["securityContext"], "hostPID": spec.get("hostPID", False), "mounts": mounts}))
"#;
    let out = Command::new(venv.join("bin/python3"))
        .args(["-c", script])
        .arg(repo().join("deploy/kubernetes/03-daemonset.yaml"))
        .output()
        .expect("run the venv's python3 (cargo xtask setup)");
    assert!(
        out.status.success(),
        "reading the DaemonSet:\n{}",
        llm_egress_tests::podman::show(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// `podman run` flags for the DaemonSet's container, with `seccomp` as the
/// profile (a path, or None for podman's default) and `policy_dir` at the
/// ConfigMap's mount point.
fn security_flags(ds: &Value, seccomp: Option<&Path>, policy_dir: &Path) -> Vec<String> {
    let sc = &ds["sc"];
    let mut f: Vec<String> = vec!["--network=none".into()];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    f.push("--cap-drop=ALL".into());
    for cap in sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
    {
        f.push(format!("--cap-add={}", cap.as_str().expect("cap")));
    }
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    f.push("--read-only".into());
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    f.push("--security-opt=no-new-privileges".into());
    assert_eq!(sc["runAsUser"], 0);
    f.push("--user=0:0".into());
    assert_eq!(ds["hostPID"], true);
    f.push("--pid=host".into());
    // The DaemonSet names the shipped profile; None runs podman's default.
    assert_eq!(sc["seccompProfile"]["type"], "Localhost");
    if let Some(p) = seccomp {
        let name = sc["seccompProfile"]["localhostProfile"]
            .as_str()
            .expect("localhostProfile");
        assert_eq!(p.file_name().and_then(|n| n.to_str()), Some(name));
        f.push(format!("--security-opt=seccomp={}", p.display()));
    }
    for m in ds["mounts"].as_array().expect("mounts") {
        let path = m["path"].as_str().expect("mountPath");
        let ro = if m["ro"] == true { ":ro" } else { "" };
        match (m["kind"].as_str(), m["host"].as_str()) {
            (Some("configMap"), _) => {
                f.push(format!("--volume={}:{path}:ro", policy_dir.display()))
            }
            (Some("emptyDir"), _) => f.push(format!("--tmpfs={path}")),
            // The token budgets' state dir is not used by this policy (and
            // would be the host's own /var/lib/llm-egress).
            (Some("hostPath"), Some("/var/lib/llm-egress")) => {}
            (Some("hostPath"), Some(host)) => f.push(format!("--volume={host}:{path}{ro}")),
            other => panic!("DaemonSet volume {path}: {other:?} not mapped in this test"),
        }
    }
    f
}

fn policy(workloads_cg: &Path, pin: &Path, deny: bool) -> String {
    let rule = if deny { "deny" } else { "allow" };
    format!(
        r#"mode = "enforce"
cgroup = {}
metrics_listen = "127.0.0.1:9469"
audit_log = "-"
pin_path = {}
failure_mode = "open"
on_exit = "detach"

[defaults]
llm = "allow"

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]
ports = [443]

[[workloads]]
name = "containers"
cgroup = "libpod-*"
{rule} = ["test-llm"]
"#,
        toml_str(&workloads_cg.display().to_string()),
        toml_str(&pin.display().to_string())
    )
}

/// Writes the policy the way a ConfigMap update lands: a new file renamed
/// over the old one.
fn write_policy(dir: &Path, text: &str) {
    let tmp = dir.join(".policy.toml.new");
    fs::write(&tmp, text).expect("write the policy");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).expect("chmod");
    fs::rename(&tmp, dir.join("policy.toml")).expect("rename the policy");
}

fn connect_from(pm: &Podman, container: &str) -> &'static str {
    let out = pm
        .cmd()
        .args([
            "exec",
            container,
            "/bin/bash",
            "-c",
            &format!(": 3<>/dev/tcp/{TARGET}"),
        ])
        .output()
        .expect("podman exec");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Operation not permitted") {
        "EPERM"
    } else if err.contains("Connection refused") {
        "ECONNREFUSED"
    } else {
        panic!("unexpected result of the connect from {container}:\n{err}")
    }
}

fn logs(pm: &Podman, container: &str) -> String {
    let out = pm
        .cmd()
        .args(["logs", container])
        .output()
        .expect("podman logs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn sock_addr_progs(cgroup: &Path) -> u32 {
    bpf::sock_addr_prog_counts(cgroup, false)
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn image_runs_under_podman_with_the_daemonsets_security_context() {
    require_root();
    let ds = daemonset_security();
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let froms: Vec<&str> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .collect();
    assert_eq!(
        froms,
        ["FROM debian:bookworm AS build", "FROM debian:bookworm-slim"],
        "the FROM lines this test maps to local images"
    );
    let runtime_stage = &dockerfile[dockerfile.rfind("\nFROM ").expect("last FROM") + 1..];
    let copy = "COPY --from=build /src/target/release/llm-egress ";
    assert!(
        runtime_stage.contains(copy),
        "the runtime stage copies the binary from the build stage"
    );

    let pm = Podman::new("image");
    pm.import_rootfs(&nspawn::rootfs("bookworm"), BASE);
    let ctx = TempDir::new("llm-egress-test-image-ctx");
    fs::create_dir_all(ctx.path().join("deploy/systemd")).expect("mkdir");
    fs::copy(
        repo().join("deploy/systemd/policy.toml"),
        ctx.path().join("deploy/systemd/policy.toml"),
    )
    .expect("copy the default policy");
    fs::copy(agent_bin(), ctx.path().join("llm-egress")).expect("copy the agent");
    fs::write(
        ctx.path().join("Containerfile"),
        runtime_stage
            .replace(copy, "COPY llm-egress ")
            .replace("FROM debian:bookworm-slim", &format!("FROM {BASE}")),
    )
    .expect("write the Containerfile");
    let containerfile = ctx.path().join("Containerfile").display().to_string();
    let context = ctx.path().display().to_string();
    pm.ok(&[
        "build",
        "--pull=never",
        "--network=none",
        "--tag",
        IMAGE,
        "--file",
        &containerfile,
        &context,
    ]);

    // The workloads' cgroup (the policy's attach point) and the agent's.
    let workloads_parent = pm.cgroup_parent("workloads");
    let workloads_cg = cgroup2_mount().join(workloads_parent.trim_start_matches('/'));
    fs::create_dir_all(&workloads_cg).expect("create the workloads cgroup");
    assert_ne!(workloads_cg, cgroup2_mount());
    let pin = PinDir::new();
    let policy_dir = TempDir::new("llm-egress-test-image-policy");
    write_policy(policy_dir.path(), &policy(&workloads_cg, pin.path(), true));
    let profile = repo().join("deploy/kubernetes/seccomp/llm-egress.json");
    let run = |name: &str, seccomp: Option<&Path>, detach: bool| {
        let mut args: Vec<String> = vec!["run".into(), format!("--name={name}")];
        if detach {
            args.push("--detach".into());
        }
        args.push(format!("--cgroup-parent={}", pm.cgroup_parent("agent")));
        args.extend(security_flags(&ds, seccomp, policy_dir.path()));
        args.push(IMAGE.into());
        pm.cmd().args(&args).output().expect("podman run")
    };

    // podman's default seccomp profile (containers/common, as CRI-O's)
    // refuses bpf() without CAP_SYS_ADMIN: the agent cannot start.
    let out = run("agent-default-seccomp", None, false);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() && text.contains("Operation not permitted"),
        "with the runtime's default seccomp profile the agent should fail with EPERM:\n{text}"
    );

    // The shipped profile: ready.
    let id = run("agent", Some(&profile), true);
    assert!(
        id.status.success(),
        "podman run the agent:\n{}",
        llm_egress_tests::podman::show(&id)
    );
    let ready = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        let out = pm
            .cmd()
            .args([
                "exec",
                "agent",
                "curl",
                "-s",
                "--max-time",
                "1",
                "http://127.0.0.1:9469/readyz",
            ])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .starts_with("ready")
            .then_some(())
    });
    assert!(
        ready.is_some(),
        "the agent container is not ready within 30 s:\n{}",
        logs(&pm, "agent")
    );
    assert!(
        sock_addr_progs(&workloads_cg) > 0,
        "programs on {}",
        workloads_cg.display()
    );

    // A sibling container in the workloads cgroup: denied, and the audit
    // record names podman and the container's id.
    let sibling = pm.ok(&[
        "run",
        "--detach",
        "--name=sibling",
        "--network=none",
        "--cap-add=NET_ADMIN",
        &format!("--cgroup-parent={workloads_parent}"),
        BASE,
        "sleep",
        "infinity",
    ]);
    pm.ok(&[
        "exec",
        "sibling",
        "sh",
        "-c",
        "ip link set lo up && ip addr add 10.20.0.1/32 dev lo",
    ]);
    assert_eq!(
        connect_from(&pm, "sibling"),
        "EPERM",
        "{}",
        logs(&pm, "agent")
    );
    let audit = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        logs(&pm, "agent")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["event"] == "decision" && e["dst_addr"] == "10.20.0.1")
    })
    .unwrap_or_else(|| {
        panic!(
            "no audit record of the sibling's connect:\n{}",
            logs(&pm, "agent")
        )
    });
    assert_eq!(audit["verdict"], "deny");
    assert_eq!(audit["container_runtime"], "podman", "{audit}");
    assert_eq!(
        audit["container_id"].as_str(),
        Some(sibling.as_str()),
        "{audit}"
    );

    // A changed policy file (a ConfigMap update) applies without a restart.
    write_policy(policy_dir.path(), &policy(&workloads_cg, pin.path(), false));
    let flipped = wait_until(Duration::from_secs(5), Duration::from_millis(200), || {
        (connect_from(&pm, "sibling") == "ECONNREFUSED").then_some(())
    });
    assert!(
        flipped.is_some(),
        "the changed policy did not apply:\n{}",
        logs(&pm, "agent")
    );

    // The agent's own log: plain text, no colour codes.
    let log = logs(&pm, "agent");
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in `podman logs`:\n{log}"
    );
    // perf_event_open passes the shipped profile: the exec tracepoint is on.
    assert!(
        !log.contains("exec tracking unavailable"),
        "the exec tracepoint should attach under the shipped seccomp profile:\n{log}"
    );

    // Stop (SIGTERM, as the kubelet does): exit 0, detached, unpinned.
    pm.ok(&["stop", "--time", "15", "agent"]);
    let code = pm.ok(&["inspect", "agent", "--format", "{{.State.ExitCode}}"]);
    assert_eq!(
        code,
        "0",
        "the agent's exit code after SIGTERM:\n{}",
        logs(&pm, "agent")
    );
    assert_eq!(
        sock_addr_progs(&workloads_cg),
        0,
        "programs left after stop"
    );
    assert_eq!(connect_from(&pm, "sibling"), "ECONNREFUSED");
    assert!(
        fs::read_dir(pin.path())
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "pins left in {}",
        pin.path().display()
    );
}
