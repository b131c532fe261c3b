//! Connect-time verdicts, end to end: a real agent attached to the test's
//! own cgroup, real connect()/sendmsg() calls by `egress-probe` processes in
//! workload cgroups, servers in the test's own network namespace. One test
//! = one behaviour a user relies on. What happens around the verdicts
//! (reloads, crashes, restarts, stops) is in lifecycle.rs.
//!
//! Needs root, bpffs, and a built agent (`cargo build -p llm-egress`, or
//! LLM_EGRESS_BIN). Locals are declared cgroup, netns, servers, agent, so
//! they drop in the reverse order: the agent stops before its cgroup goes.

use std::time::Instant;

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, ProbeCmd, TcpServer, UdpServer, require_root,
    scenario::{
        EVENT_WAIT, NEW_CGROUP_WAIT, PROVIDER, SETTLE, expect_eperm, expect_eperm_within,
        expect_ok, expect_server_count, only_192_policy, policy, probe, wait_event,
    },
};

#[test]
fn workload_reaches_its_allowed_cidr_and_gets_eperm_elsewhere() {
    require_root();
    let cg = CgroupGuard::new("allow-deny");
    let (a, b) = (cg.child("a"), cg.child("b"));
    let ns = NetnsGuard::new();
    let s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[defaults]
llm = "deny"
other = "allow"

[[workloads]]
name = "a"
cgroup = "a"
allow = ["192.0.2.0/24"]
other = "deny"

[[workloads]]
name = "b"
cgroup = "b"
allow = ["198.51.100.0/24"]
other = "deny"
"#,
    ));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&a, &ns, "192.0.2.1:8443"),
        "workload a to 192.0.2.1:8443 (its allow CIDR)",
    );
    expect_eperm(
        &agent,
        p.connect(&a, &ns, "198.51.100.1:8443"),
        "workload a to 198.51.100.1:8443 (other = deny)",
    );
    expect_ok(
        &agent,
        p.connect(&b, &ns, "198.51.100.1:8443"),
        "workload b to 198.51.100.1:8443 (its allow CIDR)",
    );
    expect_eperm(
        &agent,
        p.connect(&b, &ns, "192.0.2.1:8443"),
        "workload b to 192.0.2.1:8443 (other = deny)",
    );
    expect_server_count(&s192, 1, "only workload a's connection may reach 192.0.2.1");
    expect_server_count(
        &s198,
        1,
        "only workload b's connection may reach 198.51.100.1",
    );
}

#[test]
fn ipv6_cidr_rules_allow_and_deny_ipv6_connects() {
    require_root();
    let cg = CgroupGuard::new("ipv6");
    let (allow6, deny6) = (cg.child("allow6"), cg.child("deny6"));
    let ns = NetnsGuard::new();
    let _s_doc = TcpServer::start(&ns, "[2001:db8::1]:8443");
    let _s_ula = TcpServer::start(&ns, "[fd00:20::1]:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[[workloads]]
name = "allow6"
cgroup = "allow6"
allow = ["2001:db8::/64"]
other = "deny"

[[workloads]]
name = "deny6"
cgroup = "deny6"
deny = ["2001:db8::/64"]
other = "allow"
"#,
    ));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&allow6, &ns, "[2001:db8::1]:8443"),
        "allow6 to [2001:db8::1] (allow 2001:db8::/64)",
    );
    expect_eperm(
        &agent,
        p.connect(&allow6, &ns, "[fd00:20::1]:8443"),
        "allow6 to [fd00:20::1] (other = deny)",
    );
    expect_eperm(
        &agent,
        p.connect(&deny6, &ns, "[2001:db8::1]:8443"),
        "deny6 to [2001:db8::1] (deny 2001:db8::/64)",
    );
    expect_ok(
        &agent,
        p.connect(&deny6, &ns, "[fd00:20::1]:8443"),
        "deny6 to [fd00:20::1] (other = allow)",
    );
}

#[test]
fn ipv4_mapped_ipv6_destinations_are_judged_as_ipv4() {
    require_root();
    let cg = CgroupGuard::new("mapped");
    let (denier, allower) = (cg.child("denier"), cg.child("allower"));
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[[workloads]]
name = "denier"
cgroup = "denier"
deny = ["198.51.100.0/24"]
other = "allow"

[[workloads]]
name = "allower"
cgroup = "allower"
allow = ["192.0.2.0/24"]
other = "deny"
"#,
    ));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&denier, &ns, "[::ffff:198.51.100.1]:8443"),
        "an AF_INET6 connect to [::ffff:198.51.100.1] must hit the IPv4 rule deny 198.51.100.0/24",
    );
    expect_eperm(
        &agent,
        p.connect(&denier, &ns, "198.51.100.1:8443"),
        "plain IPv4 198.51.100.1 (deny 198.51.100.0/24)",
    );
    expect_ok(
        &agent,
        p.connect(&denier, &ns, "[::ffff:192.0.2.1]:8443"),
        "[::ffff:192.0.2.1] is not in the denied CIDR",
    );
    expect_ok(
        &agent,
        p.connect(&allower, &ns, "[::ffff:192.0.2.1]:8443"),
        "an AF_INET6 connect to [::ffff:192.0.2.1] must hit the IPv4 rule allow 192.0.2.0/24",
    );
    expect_eperm(
        &agent,
        p.connect(&allower, &ns, "[::ffff:198.51.100.1]:8443"),
        "allower to [::ffff:198.51.100.1] (other = deny)",
    );
    expect_server_count(
        &s198,
        0,
        "no connection to 198.51.100.1 may get through, mapped or not",
    );
    let e = wait_event(&agent, "for the mapped deny", |e| {
        e["workload"] == "denier" && e["verdict"] == "deny"
    });
    assert_eq!(
        e["dst_addr"], "198.51.100.1",
        "a mapped destination is reported as IPv4: {e}"
    );
}

#[test]
fn udp_sendmsg_and_udp_connect_follow_the_policy() {
    require_root();
    let cg = CgroupGuard::new("udp");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let u192 = UdpServer::start(&ns, "192.0.2.1:9999");
    let u198 = UdpServer::start(&ns, "198.51.100.1:9999");
    let u6 = UdpServer::start(&ns, "[2001:db8::1]:9999");
    let agent = Agent::start(&only_192_policy(&cg, ""));
    let run = probe().run(
        &w,
        &ns,
        &[
            ProbeCmd::Udp("198.51.100.1:9999".into()),
            ProbeCmd::UdpConnect("198.51.100.1:9999".into()),
            ProbeCmd::Udp("[::ffff:198.51.100.1]:9999".into()),
            ProbeCmd::Udp("[2001:db8::1]:9999".into()),
            ProbeCmd::UdpConnect("[2001:db8::1]:9999".into()),
            ProbeCmd::Udp("192.0.2.1:9999".into()),
            ProbeCmd::UdpConnect("192.0.2.1:9999".into()),
        ],
    );
    let what = [
        "sendto 198.51.100.1 (other = deny, sendmsg4)",
        "connect+send 198.51.100.1 (other = deny, connect4 on UDP)",
        "sendto [::ffff:198.51.100.1] (judged as IPv4, denied)",
        "sendto [2001:db8::1] (other = deny, sendmsg6)",
        "connect+send [2001:db8::1] (other = deny, connect6 on UDP)",
        "sendto 192.0.2.1 (allowed CIDR)",
        "connect+send 192.0.2.1 (allowed CIDR)",
    ];
    for (i, r) in run.results.iter().enumerate() {
        if i < 5 {
            expect_eperm(&agent, r.as_result(), what[i]);
        } else {
            expect_ok(&agent, r.as_result(), what[i]);
        }
    }
    assert_eq!(
        u192.wait_for_count(2, EVENT_WAIT),
        2,
        "both allowed datagrams must reach 192.0.2.1:9999"
    );
    std::thread::sleep(SETTLE);
    assert_eq!(
        u192.count(),
        2,
        "192.0.2.1:9999 received more than the 2 allowed datagrams"
    );
    assert_eq!(
        u198.count(),
        0,
        "denied datagrams reached 198.51.100.1:9999"
    );
    assert_eq!(u6.count(), 0, "denied datagrams reached [2001:db8::1]:9999");
    let e = wait_event(&agent, "for a denied UDP datagram", |e| {
        e["protocol"] == "udp" && e["verdict"] == "deny"
    });
    assert_eq!(e["workload"], "w", "{e}");
}

#[test]
fn provider_is_reachable_only_by_workloads_that_name_it_and_denies_are_audited() {
    require_root();
    let cg = CgroupGuard::new("provider");
    let (bot, batch) = (cg.child("bot"), cg.child("batch"));
    let ns = NetnsGuard::new();
    let server = TcpServer::start(&ns, "10.20.0.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        &format!(
            r#"{PROVIDER}
[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm"]

[[workloads]]
name = "batch"
cgroup = "batch"
"#
        ),
    ));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&bot, &ns, "10.20.0.1:8443"),
        "bot allows test-llm",
    );
    let run = p.run(&batch, &ns, &[ProbeCmd::Connect("10.20.0.1:8443".into())]);
    expect_eperm(
        &agent,
        run.results[0].as_result(),
        "batch does not name test-llm (llm defaults to deny)",
    );
    expect_server_count(&server, 1, "only bot's connection may reach the provider");

    let pid = u64::from(run.pid);
    let e = wait_event(&agent, "for batch's denied provider connect", |e| {
        e["verdict"] == "deny" && e["provider"] == "test-llm" && e["tgid"].as_u64() == Some(pid)
    });
    let text = e.to_string();
    assert_eq!(e["workload"], "batch", "workload: {text}");
    assert_eq!(
        e["tgid"].as_u64(),
        Some(pid),
        "tgid is the probe's pid: {text}"
    );
    assert_eq!(
        e["pid"].as_u64(),
        Some(pid),
        "the probe is single-threaded, so pid == tgid: {text}"
    );
    assert_eq!(e["comm"], "egress-probe", "comm: {text}");
    let exe = e["exe"].as_str().unwrap_or_default();
    assert!(
        exe.ends_with("/egress-probe"),
        "exe should be the probe's path, got {exe:?}: {text}"
    );
    let cgroup = e["cgroup"].as_str().unwrap_or_default();
    let expected = format!("{}/batch", cg.name());
    assert!(
        cgroup.ends_with(&expected),
        "cgroup should end with {expected:?}, got {cgroup:?}: {text}"
    );
    assert_eq!(e["protocol"], "tcp", "protocol: {text}");
    assert_eq!(e["dst_addr"], "10.20.0.1", "dst_addr: {text}");
    assert_eq!(e["dst_port"].as_u64(), Some(8443), "dst_port: {text}");
    assert_eq!(e["reason"], "workload_llm_default", "reason: {text}");
    assert!(
        e["generation"].as_u64().is_some_and(|g| g >= 1),
        "generation: {text}"
    );
    assert!(
        e["time"].as_str().is_some_and(|t| !t.is_empty()),
        "time: {text}"
    );
    assert!(
        e["uid"].as_u64() == Some(0),
        "the probe runs as root: {text}"
    );
}

#[test]
fn provider_ports_limit_which_connections_count_as_provider_traffic() {
    require_root();
    let cg = CgroupGuard::new("provider-ports");
    let batch = cg.child("batch");
    let ns = NetnsGuard::new();
    let _llm = TcpServer::start(&ns, "10.20.0.1:8443");
    let other = TcpServer::start(&ns, "10.20.0.1:9000");
    let agent = Agent::start(&policy(
        &cg,
        "",
        &format!(
            r#"{PROVIDER}
[[workloads]]
name = "batch"
cgroup = "batch"
other = "allow"
"#
        ),
    ));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&batch, &ns, "10.20.0.1:8443"),
        "10.20.0.1:8443 is test-llm (ports = [8443])",
    );
    expect_ok(
        &agent,
        p.connect(&batch, &ns, "10.20.0.1:9000"),
        "10.20.0.1:9000 is not a provider port: other = allow",
    );
    expect_server_count(
        &other,
        1,
        "the non-provider port should have been reached once",
    );
}

#[test]
fn processes_in_no_workload_get_the_defaults() {
    require_root();
    let cg = CgroupGuard::new("defaults");
    let (_bot, loose) = (cg.child("bot"), cg.child("loose"));
    let ns = NetnsGuard::new();
    let _llm = TcpServer::start(&ns, "10.20.0.1:8443");
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        &format!(
            r#"{PROVIDER}
[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm"]
"#
        ),
    ));
    let p = probe();
    for (dir, label) in [
        (loose.as_path(), "a cgroup no workload selects"),
        (cg.path(), "the attach cgroup itself"),
    ] {
        expect_eperm(
            &agent,
            p.connect(dir, &ns, "10.20.0.1:8443"),
            &format!("{label}: defaults.llm = deny"),
        );
        expect_ok(
            &agent,
            p.connect(dir, &ns, "192.0.2.1:8443"),
            &format!("{label}: defaults.other = allow"),
        );
    }
    let e = wait_event(&agent, "for the default deny", |e| {
        e["verdict"] == "deny" && e["provider"] == "test-llm"
    });
    assert_eq!(
        e["workload"], "none",
        "a process in no workload is reported as workload \"none\": {e}"
    );
    assert_eq!(e["reason"], "default_llm", "{e}");
}

#[test]
fn audit_mode_allows_would_be_denies_and_logs_them_as_audit() {
    require_root();
    let cg = CgroupGuard::new("audit-mode");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&only_192_policy(&cg, r#"mode = "audit""#));
    let run = probe().run(&w, &ns, &[ProbeCmd::Connect("198.51.100.1:8443".into())]);
    expect_ok(
        &agent,
        run.results[0].as_result(),
        "mode = audit must not block the would-be deny",
    );
    expect_server_count(
        &s198,
        1,
        "in audit mode the connection must really go through",
    );
    let pid = u64::from(run.pid);
    let e = wait_event(&agent, "with verdict audit for the would-be deny", |e| {
        e["tgid"].as_u64() == Some(pid)
    });
    assert_eq!(e["verdict"], "audit", "{e}");
    assert_eq!(e["workload"], "w", "{e}");
    assert_eq!(e["dst_addr"], "198.51.100.1", "{e}");
}

#[test]
fn workload_llm_audit_allows_provider_traffic_and_logs_it() {
    require_root();
    let cg = CgroupGuard::new("llm-audit");
    let (trial, strict) = (cg.child("trial"), cg.child("strict"));
    let ns = NetnsGuard::new();
    let server = TcpServer::start(&ns, "10.20.0.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        &format!(
            r#"{PROVIDER}
[[workloads]]
name = "trial"
cgroup = "trial"
llm = "audit"

[[workloads]]
name = "strict"
cgroup = "strict"
"#
        ),
    ));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&trial, &ns, "10.20.0.1:8443"),
        "trial has llm = audit",
    );
    expect_eperm(
        &agent,
        p.connect(&strict, &ns, "10.20.0.1:8443"),
        "strict keeps llm = deny",
    );
    expect_server_count(&server, 1, "only trial's connection may reach the provider");
    let e = wait_event(&agent, "with verdict audit from trial", |e| {
        e["workload"] == "trial"
    });
    assert_eq!(e["verdict"], "audit", "{e}");
    assert_eq!(e["provider"], "test-llm", "{e}");
}

#[test]
fn workload_cgroup_created_after_start_is_enforced_within_2s() {
    require_root();
    let cg = CgroupGuard::new("late");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&only_192_policy(&cg, ""));
    let created = Instant::now();
    let w = cg.child("w");
    expect_eperm_within(
        &agent,
        &w,
        &ns,
        "198.51.100.1:8443",
        created,
        NEW_CGROUP_WAIT,
        "cgroup w created after start",
    );
    expect_ok(
        &agent,
        probe().connect(&w, &ns, "192.0.2.1:8443"),
        "the new cgroup's allow rule",
    );
}

#[test]
fn nested_cgroup_below_a_workload_inherits_its_policy() {
    require_root();
    let cg = CgroupGuard::new("nested");
    let deep = cg.child("w/worker/deep");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&deep, &ns, "198.51.100.1:8443"),
        "w/worker/deep inherits w's other = deny",
    );
    expect_ok(
        &agent,
        p.connect(&deep, &ns, "192.0.2.1:8443"),
        "w/worker/deep inherits w's allow",
    );
    let created = Instant::now();
    let late = cg.child("w/late-child");
    expect_eperm_within(
        &agent,
        &late,
        &ns,
        "198.51.100.1:8443",
        created,
        NEW_CGROUP_WAIT,
        "w/late-child made after start",
    );
}

#[test]
fn glob_selector_matches_every_cgroup_it_names() {
    require_root();
    let cg = CgroupGuard::new("glob");
    let p1 = cg.child("pods/p1");
    let p2_ctr = cg.child("pods/p2/ctr");
    let pods = cg.resolve("pods");
    let elsewhere = cg.child("elsewhere");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[defaults]
other = "allow"

[[workloads]]
name = "pods"
cgroup = "pods/*"
allow = ["192.0.2.0/24"]
other = "deny"
"#,
    ));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&p1, &ns, "198.51.100.1:8443"),
        "pods/p1 matches pods/*",
    );
    expect_ok(
        &agent,
        p.connect(&p1, &ns, "192.0.2.1:8443"),
        "pods/p1's allow rule",
    );
    expect_eperm(
        &agent,
        p.connect(&p2_ctr, &ns, "198.51.100.1:8443"),
        "pods/p2/ctr is below pods/p2, which matches pods/*",
    );
    expect_ok(
        &agent,
        p.connect(&pods, &ns, "198.51.100.1:8443"),
        "pods itself does not match pods/* (defaults apply)",
    );
    expect_ok(
        &agent,
        p.connect(&elsewhere, &ns, "198.51.100.1:8443"),
        "elsewhere does not match pods/*",
    );
    let created = Instant::now();
    let p3 = cg.child("pods/p3");
    expect_eperm_within(
        &agent,
        &p3,
        &ns,
        "198.51.100.1:8443",
        created,
        NEW_CGROUP_WAIT,
        "pods/p3 made after start",
    );
}

#[test]
fn systemd_unit_selector_matches_the_unit_directory() {
    require_root();
    let cg = CgroupGuard::new("unit");
    let x = cg.child("system.slice/x.service");
    let y = cg.child("system.slice/y.service");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[[workloads]]
name = "x"
systemd_unit = "x.service"
allow = ["192.0.2.0/24"]
other = "deny"
"#,
    ));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&x, &ns, "198.51.100.1:8443"),
        "x.service is the unit workload x names",
    );
    expect_ok(
        &agent,
        p.connect(&x, &ns, "192.0.2.1:8443"),
        "x.service's allow rule",
    );
    expect_ok(
        &agent,
        p.connect(&y, &ns, "198.51.100.1:8443"),
        "y.service is in no workload (defaults.other = allow)",
    );
    let e = wait_event(&agent, "for x.service's deny", |e| e["verdict"] == "deny");
    assert_eq!(e["workload"], "x", "{e}");
}

#[test]
fn connections_total_counts_each_deny_exactly_once() {
    require_root();
    let cg = CgroupGuard::new("count");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let agent = Agent::start(&only_192_policy(&cg, ""));
    let labels = [("workload", "w"), ("verdict", "deny")];
    let metric = "llm_egress_connections_total";
    let before = agent.metric_value(metric, &labels).unwrap_or(0.0);
    assert_eq!(before, 0.0, "no deny was counted yet");
    let cmds: Vec<ProbeCmd> = (0..5)
        .map(|_| ProbeCmd::Connect("198.51.100.1:8443".into()))
        .collect();
    let run = probe().run(&w, &ns, &cmds);
    for r in &run.results {
        expect_eperm(&agent, r.as_result(), "each of the 5 connects is denied");
    }
    let counted = agent.wait_for_metric(metric, &labels, 5.0, EVENT_WAIT);
    std::thread::sleep(SETTLE);
    let settled = agent.metric_value(metric, &labels);
    assert_eq!(
        settled,
        Some(5.0),
        "{metric}{{workload=\"w\",verdict=\"deny\"}} should be exactly 5 (first read {counted:?})\n{}",
        agent.metrics()
    );
}
