//! The agent among real programs rather than the test's own probe: dnsmasq
//! as the DNS server the agent resolves provider hosts with, and curl as a
//! client in a workload. One test = one behaviour a user relies on.
//!
//! Needs root, bpffs, a built agent (`cargo build -p llm-egress`, or
//! LLM_EGRESS_BIN), and the Debian packages dnsmasq and curl (`cargo xtask
//! setup` installs them). dnsmasq listens on loopback only and answers
//! nothing but the test's names; curl runs in the test cgroup and network
//! namespace, so its traffic stays there. Locals are declared cgroup,
//! netns, servers, agent, so they drop in the reverse order: the agent
//! stops before its cgroup goes.

use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use llm_egress_tests::{
    Agent, CgroupGuard, DnsServer, HttpServer, NetnsGuard, TcpServer,
    probe::confine,
    require_root,
    scenario::{
        expect_eperm, expect_ok, expect_server_count, only_192_policy, policy_with_dns, probe,
        wait_event,
    },
    servers::HTTP_BODY,
    wait_until,
};

/// How long the agent may take to resolve the provider hosts at start (one
/// round: every host of the built-in catalog and of the policy).
const RESOLVE_WAIT: Duration = Duration::from_secs(10);

#[test]
fn provider_hosts_are_resolved_and_judged() {
    require_root();
    let cg = CgroupGuard::new("resolve");
    let (bot, batch) = (cg.child("bot"), cg.child("batch"));
    let ns = NetnsGuard::new();
    let server = TcpServer::start(&ns, "10.20.0.1:8443");
    let dns = DnsServer::start(&[("llm.test.example", Ipv4Addr::new(10, 20, 0, 1))]);
    let agent = Agent::start(&policy_with_dns(
        &cg,
        "",
        &dns.addr().to_string(),
        r#"
[defaults]
llm = "deny"
other = "allow"

# A provider known by its host name only: the agent learns its address.
[[providers]]
name = "test-llm"
hosts = ["llm.test.example"]
ports = [8443]

[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm"]

# Names no provider: providers get its `llm` (deny), the rest is allowed.
[[workloads]]
name = "batch"
cgroup = "batch"
other = "allow"
"#,
    ));
    let resolved = wait_until(RESOLVE_WAIT, Duration::from_millis(50), || {
        agent
            .metric_value("llm_egress_resolved_addresses", &[])
            .filter(|n| *n >= 1.0)
    });
    if resolved.is_none() {
        panic!(
            "the agent did not learn the address of llm.test.example from {} within {RESOLVE_WAIT:?} \
             (llm_egress_resolved_addresses = {:?})\n--- dnsmasq log ---\n{}\n{}",
            dns.addr(),
            agent.metric_value("llm_egress_resolved_addresses", &[]),
            dns.log_tail(),
            agent.context()
        );
    }
    assert!(
        dns.log().contains("query[A] llm.test.example"),
        "the agent should have asked the policy's DNS server for llm.test.example:\n{}",
        dns.log_tail()
    );

    let p = probe();
    expect_ok(
        &agent,
        p.connect(&bot, &ns, "10.20.0.1:8443"),
        "bot allows test-llm, whose host resolves to 10.20.0.1",
    );
    let run = p.run(
        &batch,
        &ns,
        &[llm_egress_tests::ProbeCmd::Connect("10.20.0.1:8443".into())],
    );
    expect_eperm(
        &agent,
        run.results[0].as_result(),
        "batch does not name test-llm: 10.20.0.1:8443 is judged as that provider (llm = deny), \
         not as other traffic (other = allow)",
    );
    expect_server_count(&server, 1, "only bot's connection may reach 10.20.0.1:8443");

    let pid = u64::from(run.pid);
    let e = wait_event(&agent, "for batch's denied connect", |e| {
        e["tgid"].as_u64() == Some(pid)
    });
    assert_eq!(
        (
            e["verdict"].as_str(),
            e["provider"].as_str(),
            e["workload"].as_str(),
            e["reason"].as_str()
        ),
        (
            Some("deny"),
            Some("test-llm"),
            Some("batch"),
            Some("workload_llm_default")
        ),
        "the deny names the provider learned by name: {e}"
    );
    let e = wait_event(&agent, "for bot's allowed provider connect", |e| {
        e["workload"] == "bot"
    });
    assert_eq!(
        (e["verdict"].as_str(), e["provider"].as_str()),
        (Some("allow"), Some("test-llm")),
        "every provider connection is logged, allowed ones too: {e}"
    );
}

/// Runs curl in `cgroup` and `netns` against `url`; returns its output and pid.
fn curl(cgroup: &Path, netns: &NetnsGuard, url: &str) -> (Output, u32) {
    let bin = ["/usr/bin/curl", "/bin/curl"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| {
            panic!("curl not found (Debian package curl; `cargo xtask setup` installs it)")
        });
    let mut cmd = Command::new(bin);
    // -q: no ~/.curlrc; --noproxy: never a proxy from the environment.
    cmd.args([
        "-q",
        "--silent",
        "--show-error",
        "--verbose",
        "--noproxy",
        "*",
        "--max-time",
        "5",
        url,
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for var in [
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ] {
        cmd.env_remove(var);
    }
    confine(&mut cmd, cgroup, netns);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start curl in {}: {e}", cgroup.display()));
    let pid = child.id();
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for curl: {e}"));
    (out, pid)
}

fn describe(out: &Output) -> String {
    format!(
        "curl exited {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn curl_is_denied_and_allowed_like_any_client() {
    require_root();
    let cg = CgroupGuard::new("curl");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let allowed = HttpServer::start(&ns, "192.0.2.1:8080");
    let denied = HttpServer::start(&ns, "198.51.100.1:8080");
    let agent = Agent::start(&only_192_policy(&cg, ""));

    let (out, _) = curl(&w, &ns, "http://192.0.2.1:8080/");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout) == HTTP_BODY,
        "curl to 192.0.2.1:8080 (w allows 192.0.2.0/24) should get the server's body:\n{}\n{}",
        describe(&out),
        agent.context()
    );
    assert_eq!(allowed.wait_for_count(1, Duration::from_secs(2)), 1);

    let (out, pid) = curl(&w, &ns, "http://198.51.100.1:8080/");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(7) && stderr.contains("Operation not permitted"),
        "curl to 198.51.100.1:8080 (w: other = deny) should fail to connect (exit 7) with \
         \"Operation not permitted\" (EPERM):\n{}\n{}",
        describe(&out),
        agent.context()
    );
    assert_eq!(
        denied.count(),
        0,
        "the denied connection must not reach 198.51.100.1:8080"
    );

    let e = wait_event(&agent, "for curl's denied connect", |e| {
        e["tgid"].as_u64() == Some(u64::from(pid))
    });
    let exe = e["exe"].as_str().unwrap_or_default();
    assert!(
        e["verdict"] == "deny"
            && e["workload"] == "w"
            && e["comm"] == "curl"
            && exe.ends_with("/curl"),
        "the deny should be attributed to curl (comm \"curl\", exe …/curl) in workload w: {e}"
    );
}
