//! SNI verdicts: two provider names on one address, told apart by the TLS
//! ClientHello's server name (cgroup_skb egress, ebpf/src/sni.rs).
//!
//! A TLS server (`openssl s_server`, a self-signed certificate) listens on
//! 10.79.0.1:443 inside the test namespace; it is in no test cgroup. The
//! workload `w` allows provider `good` (`good.sni.test`), denies provider
//! `bad` (`bad.sni.test`) and allows other traffic, so the connect hook lets
//! every connection to 10.79.0.1 through (the address is no provider's: the
//! agent's resolver is dead and curl does not resolve, `--resolve`): only
//! the server name tells the two apart.
//!
//! Locals are declared cgroup, netns, server, agent, so they drop in the
//! reverse order.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TlsServer, probe::confine, require_root, toml_str,
};

const ADDR: &str = "10.79.0.1";

fn policy(cg: &CgroupGuard) -> String {
    format!(
        r#"cgroup = {}

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "good"
hosts = ["good.sni.test"]
ports = [443]

[[providers]]
name = "bad"
hosts = ["bad.sni.test"]
ports = [443]

[[workloads]]
name = "w"
cgroup = "w"
allow = ["good"]
deny = ["bad"]
other = "allow"
"#,
        toml_str(&cg.path().display().to_string())
    )
}

/// What one curl run gave: exit code, stderr, and how long it took.
struct Curl {
    code: i32,
    http: String,
    stderr: String,
    took: Duration,
}

/// `curl -k https://<name>/` with `<name>` pinned to 10.79.0.1 (or an
/// address URL when `name` is one), run in `cgroup` and `ns`.
fn curl(cgroup: &Path, ns: &NetnsGuard, name: &str) -> Curl {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ]);
    if name != ADDR {
        cmd.arg("--resolve").arg(format!("{name}:443:{ADDR}"));
    }
    cmd.arg(format!("https://{name}/"));
    confine(&mut cmd, cgroup, ns);
    let started = Instant::now();
    let out = cmd.output().expect("cannot run curl");
    Curl {
        code: out.status.code().unwrap_or(-1),
        http: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        took: started.elapsed(),
    }
}

#[test]
fn two_names_on_one_address_the_allowed_handshake_completes_the_denied_one_fails_fast() {
    require_root();
    let cg = CgroupGuard::new("sni");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    ns.ip(&["addr", "add", &format!("{ADDR}/32"), "dev", "lo"]);
    let server = TlsServer::start(&ns, ADDR);
    let agent = Agent::start(&policy(&cg));

    let good = curl(&w, &ns, "good.sni.test");
    assert!(
        good.code == 0 && good.http == "200",
        "the allowed name's handshake must complete: curl exit {} http {:?} in {:?}: {}\n{}",
        good.code,
        good.http,
        good.took,
        good.stderr,
        agent.context()
    );

    let bad = curl(&w, &ns, "bad.sni.test");
    eprintln!(
        "denied handshake: curl exit {} after {:?}: {}",
        bad.code,
        bad.took,
        bad.stderr.trim()
    );
    assert!(
        bad.code != 0,
        "the denied name's handshake must fail, it gave http {:?}\n{}",
        bad.http,
        agent.context()
    );
    assert!(
        bad.took < Duration::from_secs(1),
        "the denied handshake must fail within a second, it took {:?} (curl exit {}: {})\n{}",
        bad.took,
        bad.code,
        bad.stderr,
        agent.context()
    );

    // The allowed name (in other case) still works on the same address
    // afterwards. s_server serves one connection at a time and still
    // waits for the ClientHello the client never delivered (the client's
    // socket was aborted without a RST): a fresh server.
    drop(server);
    let _server = TlsServer::start(&ns, ADDR);
    let again = curl(&w, &ns, "Good.SNI.test");
    assert!(
        again.code == 0,
        "the allowed name (other case) after a deny: curl exit {}: {}",
        again.code,
        again.stderr
    );

    let deny = agent
        .wait_for_audit(
            |e| e["hook"] == "sni" && e["verdict"] == "deny",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no SNI deny in the audit log\n{}", agent.context()));
    assert_eq!(deny["server_name"], "bad.sni.test");
    assert_eq!(deny["provider"], "bad");
    assert_eq!(deny["workload"], "w");
    assert_eq!(deny["dst_addr"], ADDR);
    assert_eq!(deny["dst_port"], 443);
    let allow = agent
        .wait_for_audit(
            |e| e["hook"] == "sni" && e["verdict"] == "allow",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no SNI allow in the audit log\n{}", agent.context()));
    assert_eq!(allow["provider"], "good");
    let denies = agent
        .wait_for_metric(
            "llm_egress_sni_total",
            &[("result", "deny")],
            1.0,
            Duration::from_secs(5),
        )
        .unwrap_or(0.0);
    assert!(
        denies >= 1.0,
        "llm_egress_sni_total{{result=\"deny\"}} = {denies}"
    );
}

#[test]
fn a_client_hello_without_a_server_name_keeps_the_address_verdict() {
    require_root();
    let cg = CgroupGuard::new("sni-none");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    ns.ip(&["addr", "add", &format!("{ADDR}/32"), "dev", "lo"]);
    let _server = TlsServer::start(&ns, ADDR);
    let agent = Agent::start(&policy(&cg));

    // An address URL: curl sends no server_name.
    let r = curl(&w, &ns, ADDR);
    assert!(
        r.code == 0,
        "a ClientHello without SNI to an allowed address: curl exit {}: {}\n{}",
        r.code,
        r.stderr,
        agent.context()
    );
    let n = agent
        .wait_for_metric(
            "llm_egress_sni_total",
            &[("result", "no_sni")],
            1.0,
            Duration::from_secs(5),
        )
        .unwrap_or(0.0);
    assert!(n >= 1.0, "llm_egress_sni_total{{result=\"no_sni\"}} = {n}");
}
