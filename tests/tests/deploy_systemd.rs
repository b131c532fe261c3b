//! deploy/systemd/llm-egress.service under a real systemd: Debian 12's
//! systemd 252 and Debian 13's 257, each booted as PID 1 in a
//! `systemd-nspawn` machine (tests/src/nspawn.rs), with the binary, unit and policy installed by the
//! commands of docs/install.md. What a real service manager does and an
//! emulation cannot show: the unit's sandbox (ProtectSystem=, ReadOnlyPaths=,
//! SystemCallFilter=, ...), where ExecStartPre= mounts bpffs, journald,
//! ExecReload=, Restart= after a crash, and stop.
//!
//! The machine has its own network namespace (only `lo`) and a cgroup
//! namespace rooted in a test cgroup; before the agent starts, the test
//! checks that the machine's cgroup2 root *is* that test cgroup, so that
//! every policy it installs attaches inside the machine.
//!
//! Needs root, `mmdebstrap` and `systemd-nspawn` (`cargo xtask setup`); the
//! first run builds the cached Debian root file systems (~60 s each).

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use llm_egress_tests::{TempDir, agent_bin, bpf, nspawn::Machine, require_root, wait_until};
use serde_json::Value;

const UNIT: &str = "deploy/systemd/llm-egress.service";
/// The workloads' slices; the policy attaches to their parent.
const ATTACH_SLICE: &str = "llmtest.slice";
const W_SLICE: &str = "llmtest-w.slice";
const O_SLICE: &str = "llmtest-o.slice";
const TARGET: &str = "10.20.0.1/443";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The shell commands of docs/install.md's "On a host, with systemd" that
/// install and start the agent, in order (not the build).
fn documented_install_commands() -> Vec<String> {
    let docs = fs::read_to_string(repo().join("docs/install.md")).expect("docs/install.md");
    let section = docs
        .split("## On a host, with systemd")
        .nth(1)
        .and_then(|s| s.split("Operating it:").next())
        .expect("docs/install.md has the section \"On a host, with systemd\"");
    let commands: Vec<String> = section
        .lines()
        .map(|l| l.split('#').next().unwrap_or_default().trim())
        .filter(|l| {
            l.starts_with("install ")
                || l.starts_with("llm-egress check ")
                || l.starts_with("systemctl daemon-reload")
                || l.starts_with("systemctl enable --now")
        })
        .map(str::to_string)
        .collect();
    assert!(
        commands.len() >= 6 && commands.last().is_some_and(|c| c.contains("enable --now")),
        "docs/install.md: expected the install commands ending in `systemctl enable --now`: {commands:?}"
    );
    commands
}

/// A policy that enforces below llmtest.slice: `deny_slice` may not reach
/// the test provider, the other slice may; pins stay across a crash.
fn enforcing_policy(deny_slice: &str) -> String {
    format!(
        r#"mode = "enforce"
cgroup = "/sys/fs/cgroup/{ATTACH_SLICE}"
metrics_listen = "127.0.0.1:9469"
audit_log = "/var/log/llm-egress/audit.jsonl"
pin_path = "/sys/fs/bpf/llm-egress"
failure_mode = "closed"
on_exit = "detach"

[defaults]
llm = "allow"
other = "allow"

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]
ports = [443]

[[workloads]]
name = "denied"
cgroup = "{deny_slice}"
deny = ["test-llm"]
"#
    )
}

/// Connects from a transient service in `slice` to 10.20.0.1:443 (an
/// address on the machine's `lo` where nothing listens): `EPERM` when the
/// agent denies, `ECONNREFUSED` when it lets the connect through.
fn connect_from(m: &Machine, slice: &str) -> &'static str {
    let out = m.sh(&format!(
        "systemd-run --quiet --wait --pipe --collect --slice={slice} /bin/bash -c ': 3<>/dev/tcp/{TARGET}'"
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("Operation not permitted") {
        "EPERM"
    } else if err.contains("Connection refused") {
        "ECONNREFUSED"
    } else {
        panic!("unexpected result of the connect from {slice}:\n{err}")
    }
}

fn readyz(m: &Machine) -> String {
    let out = m.sh("curl -s --max-time 1 http://127.0.0.1:9469/readyz");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn wait_ready(m: &Machine, what: &str) {
    if wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        readyz(m).starts_with("ready").then_some(())
    })
    .is_none()
    {
        panic!(
            "{what}: the agent is not ready within 30 s (/readyz: {:?})\n{}",
            readyz(m),
            journal(m)
        );
    }
}

fn journal(m: &Machine) -> String {
    let out = m.sh("systemctl status --no-pager llm-egress; journalctl -u llm-egress --no-pager -o cat | tail -40");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main_pid(m: &Machine) -> u32 {
    m.sh_ok("systemctl show -P MainPID llm-egress")
        .trim()
        .parse()
        .expect("MainPID")
}

/// The mount options of `path` as the agent (`pid` inside the machine) sees
/// it, through its own mount namespace.
fn mount_options(m: &Machine, pid: u32, path: &str) -> String {
    m.sh_ok(&format!(
        "nsenter -t {pid} -m findmnt -n -o OPTIONS --target {path}"
    ))
    .trim()
    .to_string()
}

fn sock_addr_progs(cgroup: &Path) -> u32 {
    bpf::sock_addr_prog_counts(cgroup, false)
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn systemd_unit_runs_under_systemd_252() {
    unit_runs_under("bookworm", "252");
}

#[test]
fn systemd_unit_runs_under_systemd_257() {
    unit_runs_under("trixie", "257");
}

fn unit_runs_under(suite: &str, systemd_version: &str) {
    require_root();
    let dir = TempDir::new("llm-egress-test-systemd");
    let bin = agent_bin();
    assert!(bin.is_file(), "agent binary {} not found", bin.display());
    let m = Machine::boot(
        suite,
        "systemd",
        &[
            (&bin, "/mnt/src/target/release/llm-egress"),
            (&repo().join("deploy/systemd"), "/mnt/src/deploy/systemd"),
            // The host's tracefs, read-only, so that the exec tracepoint
            // (perf_event_open through SystemCallFilter=) runs too; nspawn
            // mounts none.
            (Path::new("/sys/kernel/tracing"), "/sys/kernel/tracing"),
        ],
        &dir.path().join("nspawn.log"),
    );

    let version = m.sh_ok("systemctl --version");
    assert!(
        version.starts_with(&format!("systemd {systemd_version} ")),
        "expected systemd {systemd_version} in Debian {suite}: {version}"
    );
    // Safety first: the machine's cgroup2 root is our test cgroup (cgroup
    // namespace), so "/sys/fs/cgroup" in a policy is inside it.
    let host_root = m.host_cgroup_root();
    assert_eq!(
        m.inode("/sys/fs/cgroup"),
        fs::metadata(&host_root)
            .ok()
            .map(|md| std::os::unix::fs::MetadataExt::ino(&md)),
        "the machine's cgroup2 root must be the test cgroup {}; refusing to attach anything",
        host_root.display()
    );
    // The machine's own network: the provider address on lo, nothing listens.
    m.sh_ok("ip link set lo up && ip addr add 10.20.0.1/32 dev lo");
    // bpffs is not mounted in the machine (nspawn does not, and systemd
    // does not in a container): the unit must mount it, for PID 1's mount
    // namespace, where pins outlive the agent.
    assert_eq!(
        m.sh_ok("findmnt -n -o FSTYPE /sys/fs/bpf || true").trim(),
        "",
        "bpffs should not be mounted in the machine before the unit starts"
    );

    // Install as docs/install.md says: the default policy (audit, the whole
    // machine), the unit, enable --now.
    let install = documented_install_commands().join(" && ");
    m.sh_ok(&format!("set -e; cd /mnt/src; {install}"));
    wait_ready(&m, "installed as documented, default policy");
    assert!(
        sock_addr_progs(&host_root) > 0,
        "the default policy attaches to the machine's cgroup2 root"
    );

    // ExecStartPre= mounted bpffs where it persists: PID 1's namespace,
    // with the agent's pins in it.
    assert_eq!(
        m.sh_ok("findmnt -n -o FSTYPE /sys/fs/bpf").trim(),
        "bpf",
        "bpffs should be mounted in PID 1's mount namespace after the start\n{}",
        journal(&m)
    );
    m.sh_ok("test -d /sys/fs/bpf/llm-egress");

    // The sandbox, as the agent sees it.
    let pid = main_pid(&m);
    for (path, want) in [
        ("/sys/fs/bpf", "rw"),
        ("/var/lib/llm-egress", "rw"),
        ("/var/log/llm-egress", "rw"),
        ("/sys", "ro"),
        ("/sys/fs/cgroup", "ro"),
        ("/proc/sys", "ro"),
        ("/etc/llm-egress", "ro"),
        ("/usr/local/bin", "ro"),
    ] {
        let opts = mount_options(&m, pid, path);
        assert!(
            opts.split(',').next() == Some(want),
            "{path} should be {want} for the agent under {UNIT}, is {opts}"
        );
    }
    // The directories the agent trusts are root's and writable by root
    // only (the policy's, the state and log directories, the pins).
    let owners = m.sh_ok(
        "stat -c '%n %U %a' /etc/llm-egress /etc/llm-egress/policy.toml /var/lib/llm-egress /var/log/llm-egress /sys/fs/bpf/llm-egress",
    );
    for line in owners.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let mode = u32::from_str_radix(f[2], 8).expect("octal mode");
        assert!(
            f[1] == "root" && mode & 0o022 == 0,
            "{} should be root's and not group/other-writable: {line}",
            f[0]
        );
    }
    let status = m.sh_ok(&format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    // CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(
        field("CapBnd:"),
        "000000c000081000",
        "bounding set: the four capabilities"
    );
    assert_eq!(field("NoNewPrivs:"), "1");
    assert_eq!(field("Seccomp:"), "2", "SystemCallFilter= applies");

    // journald stores plain text: no escape codes (journald keeps a MESSAGE
    // with control characters as a byte array in its JSON).
    let lines = m.sh_ok("journalctl -u llm-egress -o json --no-pager");
    let mut agent_lines = 0;
    for line in lines.lines() {
        let v: Value = serde_json::from_str(line).expect("journalctl -o json line");
        if v["SYSLOG_IDENTIFIER"] == "llm-egress" {
            agent_lines += 1;
            assert!(
                v["MESSAGE"].as_str().is_some_and(|s| !s.contains('\u{1b}')),
                "the agent's journal lines should be plain text, got {}",
                v["MESSAGE"]
            );
        }
    }
    assert!(
        agent_lines >= 2,
        "the agent's lines in the journal:\n{lines}"
    );
    assert!(
        !lines.contains("exec tracking unavailable"),
        "the exec tracepoint should attach under the unit (tracefs is there):\n{}",
        journal(&m)
    );

    // Enforce below llmtest.slice (a restart: `cgroup` changes only then).
    m.sh_ok(&format!(
        "printf '[Slice]\\n' > /etc/systemd/system/{ATTACH_SLICE} && systemctl daemon-reload && systemctl start {ATTACH_SLICE}"
    ));
    let attach = host_root.join(ATTACH_SLICE);
    assert_eq!(
        m.inode(&format!("/sys/fs/cgroup/{ATTACH_SLICE}")),
        fs::metadata(&attach)
            .ok()
            .map(|md| std::os::unix::fs::MetadataExt::ino(&md)),
        "{ATTACH_SLICE} should be {} on the host",
        attach.display()
    );
    let write_policy = |text: &str| {
        m.sh_ok(&format!(
            "cat > /etc/llm-egress/policy.toml.new <<'EOF'\n{text}EOF\nllm-egress check /etc/llm-egress/policy.toml.new && mv /etc/llm-egress/policy.toml.new /etc/llm-egress/policy.toml"
        ));
    };
    write_policy(&enforcing_policy(W_SLICE));
    m.sh_ok("systemctl restart llm-egress");
    wait_ready(&m, "enforcing policy");
    assert_eq!(connect_from(&m, W_SLICE), "EPERM", "{}", journal(&m));
    assert_eq!(connect_from(&m, O_SLICE), "ECONNREFUSED");
    assert!(
        sock_addr_progs(&attach) > 0,
        "programs on {}",
        attach.display()
    );
    assert_eq!(
        sock_addr_progs(&host_root),
        0,
        "after the restart nothing should stay on the machine's root cgroup"
    );

    // systemctl reload (SIGHUP): the other slice is denied now.
    write_policy(&enforcing_policy(O_SLICE));
    m.sh_ok("systemctl reload llm-egress");
    let flipped = wait_until(Duration::from_secs(5), Duration::from_millis(200), || {
        (connect_from(&m, O_SLICE) == "EPERM").then_some(())
    });
    assert!(
        flipped.is_some(),
        "reload did not apply the new policy\n{}",
        journal(&m)
    );
    assert_eq!(connect_from(&m, W_SLICE), "ECONNREFUSED");

    // SIGKILL: the pinned programs keep enforcing (failure_mode = "closed"),
    // Restart=on-failure brings the agent back, it adopts them.
    let before = main_pid(&m);
    m.sh_ok("systemctl kill -s KILL llm-egress");
    assert_eq!(
        connect_from(&m, O_SLICE),
        "EPERM",
        "enforcing while the agent is dead"
    );
    let start = Instant::now();
    let restarted = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let pid = main_pid(&m);
        (pid != 0 && pid != before).then_some(pid)
    });
    assert!(
        restarted.is_some(),
        "Restart= did not restart the agent\n{}",
        journal(&m)
    );
    wait_ready(&m, "after SIGKILL");
    eprintln!("restarted and ready {:?} after SIGKILL", start.elapsed());
    assert_eq!(
        connect_from(&m, O_SLICE),
        "EPERM",
        "enforcing after the restart"
    );
    assert_eq!(
        m.sh_ok("systemctl show -P NRestarts llm-egress").trim(),
        "1"
    );

    // stop: detached (on_exit = "detach") and unpinned.
    m.sh_ok("systemctl stop llm-egress");
    assert_eq!(
        sock_addr_progs(&attach),
        0,
        "programs left on {} after stop",
        attach.display()
    );
    assert_eq!(connect_from(&m, O_SLICE), "ECONNREFUSED");
    m.sh_ok("! test -e /sys/fs/bpf/llm-egress");
}
