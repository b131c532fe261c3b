//! Hostile sockets and addresses in other clothes (issue 13, items 4 and
//! 5), end to end in enforce mode: a real agent on the test's own cgroup,
//! `egress-probe` processes in workload cgroups, the test's own network
//! namespace.
//!
//! Socket kinds (ebpf/src/sock_create.rs): an ICMP ping socket or a raw
//! socket carries data that no connect or sendmsg hook sees, so a workload
//! whose `raw_sockets` is `deny` (the default when its `other` is deny)
//! gets EPERM at socket(); one whose `raw_sockets` is `allow` (the default
//! when its `other` is allow) gets the socket. AF_PACKET sockets are not
//! seen by the hook: asserted as the documented limit.
//!
//! Addresses (ebpf/src/nat64.rs, docs/names.md "IPv4 in IPv6 addresses"):
//! an IPv6 destination under one of `nat64_prefixes` is judged as the IPv4
//! address in its last four bytes, by every IPv4 rule; the other IPv4-in-
//! IPv6 forms, which Linux does not send to IPv4 by itself, are judged as
//! the IPv6 addresses they are. The namespace has no route to any of
//! these IPv6 forms, so a connect the agent allows fails with ENETUNREACH:
//! the tests assert EPERM against not-EPERM, as bypass.rs does.
//!
//! ping_group_range is set inside the test's namespace only (it is a
//! per-namespace sysctl): ping sockets are then allowed to root by the
//! kernel, and an EPERM is the agent's.
//!
//! Locals are declared cgroup, netns, servers, agent, so they drop in the
//! reverse order.

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer,
    probe::describe,
    require_root,
    scenario::{
        EVENT_WAIT, expect_eperm, expect_metric_at_least, expect_ok, policy, probe, wait_event,
    },
};

/// Lets every group open ping sockets in `ns` (not on the host).
fn allow_ping_sockets(ns: &NetnsGuard) {
    ns.in_netns(|| {
        std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
            .unwrap_or_else(|e| panic!("setting ping_group_range in the test namespace: {e}"));
    });
}

/// Panics unless `r` failed with something other than EPERM, or succeeded:
/// the agent let it through (the namespace may have no route).
#[track_caller]
fn expect_not_eperm(agent: &Agent, r: Result<(), i32>, what: &str) {
    if r == Err(libc::EPERM) {
        panic!(
            "{what}: expected the agent to let it through, got EPERM\n{}",
            agent.context()
        );
    }
}

/// Workload `deny` (other = deny, so raw_sockets = deny), `allow` (other =
/// allow, so raw_sockets = allow), `rawok` (other = deny, raw_sockets =
/// allow) and `audited` (other = deny, raw_sockets = audit).
const SOCKET_WORKLOADS: &str = r#"
[defaults]
llm = "deny"
other = "allow"

[[workloads]]
name = "deny"
cgroup = "deny"
other = "deny"

[[workloads]]
name = "allow"
cgroup = "allow"
other = "allow"

[[workloads]]
name = "rawok"
cgroup = "rawok"
other = "deny"
raw_sockets = "allow"

[[workloads]]
name = "audited"
cgroup = "audited"
other = "deny"
raw_sockets = "audit"
"#;

#[test]
fn ping_and_raw_sockets_of_a_deny_workload_get_eperm_at_socket() {
    require_root();
    let cg = CgroupGuard::new("hs-kinds");
    let (deny, allow, rawok, audited) = (
        cg.child("deny"),
        cg.child("allow"),
        cg.child("rawok"),
        cg.child("audited"),
    );
    let ns = NetnsGuard::new();
    allow_ping_sockets(&ns);
    let agent = Agent::start(&policy(&cg, "", SOCKET_WORKLOADS));
    let p = probe();
    for kind in ["ping4", "ping6", "raw4", "raw6", "raw4-tcp"] {
        expect_eperm(
            &agent,
            p.socket(&deny, &ns, kind),
            &format!("a {kind} socket of workload deny (other = deny)"),
        );
        expect_ok(
            &agent,
            p.socket(&allow, &ns, kind),
            &format!("a {kind} socket of workload allow (other = allow)"),
        );
        expect_ok(
            &agent,
            p.socket(&rawok, &ns, kind),
            &format!("a {kind} socket of workload rawok (raw_sockets = allow)"),
        );
        expect_ok(
            &agent,
            p.socket(&audited, &ns, kind),
            &format!("a {kind} socket of workload audited (raw_sockets = audit)"),
        );
    }
    let refused = wait_event(&agent, "of the refused ping socket", |e| {
        e["hook"] == "sock_create"
            && e["workload"] == "deny"
            && e["reason"] == "ping_socket"
            && e["protocol"] == "icmp"
    });
    assert_eq!(
        (
            &refused["verdict"],
            &refused["socket_type"],
            &refused["ip_protocol"],
            &refused["dst_addr"],
        ),
        (
            &serde_json::json!("deny"),
            &serde_json::json!("dgram"),
            &serde_json::json!(1),
            &serde_json::json!("")
        ),
        "{refused}"
    );
    wait_event(&agent, "of the refused raw TCP socket", |e| {
        e["hook"] == "sock_create"
            && e["workload"] == "deny"
            && e["reason"] == "raw_socket"
            && e["socket_type"] == "raw"
            && e["ip_protocol"] == 6
    });
    wait_event(&agent, "of the audited raw socket", |e| {
        e["hook"] == "sock_create" && e["workload"] == "audited" && e["verdict"] == "audit"
    });
    assert!(
        !agent
            .audit_events()
            .iter()
            .any(|e| e["hook"] == "sock_create" && e["workload"] == "allow"),
        "allowed sockets are not logged"
    );
    // Five kinds refused in `deny`, five audited.
    expect_metric_at_least(
        &agent,
        "llm_egress_socket_decisions_total",
        &[("verdict", "deny")],
        5.0,
        EVENT_WAIT,
        "refused sockets are counted",
    );
    expect_metric_at_least(
        &agent,
        "llm_egress_socket_decisions_total",
        &[("verdict", "audit")],
        5.0,
        EVENT_WAIT,
        "audited sockets are counted",
    );
}

#[test]
fn the_socket_kind_verdict_runs_with_programs_connect_and_in_audit_mode() {
    require_root();
    let cg = CgroupGuard::new("hs-sets");
    let deny = cg.child("deny");
    let ns = NetnsGuard::new();
    allow_ping_sockets(&ns);
    let p = probe();
    {
        let agent = Agent::start(&policy(&cg, "programs = \"connect\"", SOCKET_WORKLOADS));
        expect_eperm(
            &agent,
            p.socket(&deny, &ns, "ping4"),
            "a ping socket of workload deny with programs = \"connect\"",
        );
    }
    let agent = Agent::start(&policy(&cg, "mode = \"audit\"", SOCKET_WORKLOADS));
    expect_ok(
        &agent,
        p.socket(&deny, &ns, "raw4"),
        "a raw socket of workload deny in mode = \"audit\"",
    );
    wait_event(&agent, "of the would-be refused raw socket", |e| {
        e["hook"] == "sock_create" && e["workload"] == "deny" && e["verdict"] == "audit"
    });
}

#[test]
fn packet_sockets_are_not_stopped_documented_limit() {
    require_root();
    let cg = CgroupGuard::new("hs-packet");
    let deny = cg.child("deny");
    let ns = NetnsGuard::new();
    let agent = Agent::start(&policy(&cg, "", SOCKET_WORKLOADS));
    let p = probe();
    expect_eperm(
        &agent,
        p.socket(&deny, &ns, "raw4"),
        "a raw socket of workload deny (the program is attached)",
    );
    // cgroup/sock_create runs for AF_INET and AF_INET6 sockets only: an
    // AF_PACKET socket (CAP_NET_RAW) is made. README, "Honest limits".
    let r = p.socket(&deny, &ns, "packet");
    assert_eq!(
        r,
        Ok(()),
        "an AF_PACKET socket of workload deny: the documented limit says it is NOT \
         stopped; got {}. If the agent now stops it, update the README and docs/policy.md.\n{}",
        describe(&r),
        agent.context()
    );
}

/// Provider `p64` at 10.20.0.0/16 port 8443; workload `n` may reach it and
/// 192.0.2.0/24, nothing else (other = deny).
fn nat64_policy(cg: &CgroupGuard, top: &str) -> String {
    policy(
        cg,
        top,
        r#"
[defaults]
llm = "deny"
other = "allow"

[[providers]]
name = "p64"
cidrs = ["10.20.0.0/16"]
ports = [8443]

[[workloads]]
name = "n"
cgroup = "n"
allow = ["p64", "192.0.2.0/24"]
other = "deny"
"#,
    )
}

#[test]
fn nat64_destinations_are_judged_as_their_ipv4_address() {
    require_root();
    let cg = CgroupGuard::new("hs-nat64");
    let n = cg.child("n");
    let ns = NetnsGuard::new();
    let _provider = TcpServer::start(&ns, "10.20.0.1:8443");
    let _allowed = TcpServer::start(&ns, "192.0.2.1:8443");
    let agent = Agent::start(&nat64_policy(
        &cg,
        "nat64_prefixes = [\"64:ff9b::/96\", \"2001:db8:64::/96\"]",
    ));
    let p = probe();
    // The IPv4 forms: the reference.
    expect_ok(
        &agent,
        p.connect(&n, &ns, "10.20.0.1:8443"),
        "n to its provider",
    );
    expect_ok(
        &agent,
        p.connect(&n, &ns, "192.0.2.1:8443"),
        "n to its CIDR",
    );
    expect_eperm(
        &agent,
        p.connect(&n, &ns, "198.51.100.1:8443"),
        "n to 198.51.100.1 (other = deny)",
    );
    for prefix in ["64:ff9b::", "2001:db8:64::"] {
        expect_eperm(
            &agent,
            p.connect(&n, &ns, &format!("[{prefix}198.51.100.1]:8443")),
            &format!("n to {prefix}198.51.100.1 (NAT64 of a denied IPv4 address)"),
        );
        expect_eperm(
            &agent,
            p.udp(&n, &ns, &format!("[{prefix}198.51.100.1]:53")),
            &format!("n sends a datagram to {prefix}198.51.100.1 (sendmsg6)"),
        );
        // Judged as IPv6 these would meet other = deny: not EPERM shows
        // they were judged as the allowed IPv4 provider and CIDR.
        expect_not_eperm(
            &agent,
            p.connect(&n, &ns, &format!("[{prefix}10.20.0.1]:8443")),
            &format!("n to {prefix}10.20.0.1 (NAT64 of its provider)"),
        );
        expect_not_eperm(
            &agent,
            p.connect(&n, &ns, &format!("[{prefix}192.0.2.1]:8443")),
            &format!("n to {prefix}192.0.2.1 (NAT64 of its CIDR)"),
        );
    }
    let e = wait_event(&agent, "of the denied NAT64 connect", |e| {
        e["hook"] == "connect6" && e["dst_addr_given"] == "64:ff9b::c633:6401"
    });
    assert_eq!(
        (&e["verdict"], &e["dst_addr"], &e["dst_addr_form"]),
        (
            &serde_json::json!("deny"),
            &serde_json::json!("198.51.100.1"),
            &serde_json::json!("nat64")
        ),
        "{e}"
    );
    let e = wait_event(&agent, "of the provider connect through NAT64", |e| {
        e["hook"] == "connect6" && e["dst_addr_given"] == "2001:db8:64::a14:1"
    });
    assert_eq!(
        (&e["verdict"], &e["provider"], &e["dst_addr"]),
        (
            &serde_json::json!("allow"),
            &serde_json::json!("p64"),
            &serde_json::json!("10.20.0.1")
        ),
        "{e}"
    );
}

#[test]
fn ipv4_in_ipv6_forms_the_kernel_does_not_send_to_ipv4_are_judged_as_ipv6() {
    require_root();
    let cg = CgroupGuard::new("hs-forms");
    let n = cg.child("n");
    let ns = NetnsGuard::new();
    // Only the operator's prefix: the well-known one is then plain IPv6.
    let agent = Agent::start(&nat64_policy(
        &cg,
        "nat64_prefixes = [\"2001:db8:64::/96\"]",
    ));
    let p = probe();
    // Each embeds 192.0.2.1, which n may reach as IPv4; as the IPv6
    // addresses they are, other = deny refuses them (docs/names.md table).
    for (form, addr) in [
        ("IPv4-compatible ::a.b.c.d", "[::192.0.2.1]:8443"),
        ("6to4 2002::/16", "[2002:c000:201::1]:8443"),
        ("Teredo 2001::/32", "[2001:0:c000:201::3fff:fdfe]:8443"),
        (
            "local-use NAT64 64:ff9b:1::/48",
            "[64:ff9b:1::c000:201]:8443",
        ),
        (
            "the well-known NAT64 prefix, not configured",
            "[64:ff9b::c000:201]:8443",
        ),
    ] {
        expect_eperm(
            &agent,
            p.connect(&n, &ns, addr),
            &format!("n to {addr} ({form}: judged as IPv6)"),
        );
    }
    // The mapped form is IPv4 whatever the prefixes.
    expect_not_eperm(
        &agent,
        p.connect(&n, &ns, "[::ffff:192.0.2.1]:8443"),
        "n to ::ffff:192.0.2.1 (IPv4-mapped: judged as IPv4)",
    );
}
