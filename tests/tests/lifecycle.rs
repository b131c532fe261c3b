//! The agent's lifecycle, end to end: reloads (SIGHUP, a changed file, an
//! invalid or oversized policy), SIGKILL and restart with adoption of the
//! pinned programs, a clean stop, `failure_mode`, and refusing to start.
//! The verdicts themselves are in enforce.rs.
//!
//! Needs root, bpffs, and a built agent (`cargo build -p llm-egress`, or
//! LLM_EGRESS_BIN). Locals are declared cgroup, netns, servers, agent, so
//! they drop in the reverse order: the agent stops before its cgroup goes.

use std::time::Duration;

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer,
    bpf::{self, ObjKind},
    probe::describe,
    require_root,
    scenario::{
        RELOAD_WAIT, both_allowed_policy, expect_eperm, expect_ok, expect_server_count,
        only_192_policy, probe,
    },
    wait_until,
};

#[test]
fn sighup_reloads_the_policy_and_bumps_the_generation() {
    require_root();
    let cg = CgroupGuard::new("sighup");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&both_allowed_policy(&cg));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "before the reload 198.51.100.0/24 is allowed",
    );
    let g0 = agent.generation();
    agent.rewrite_policy(&only_192_policy(&cg, ""));
    agent.sighup();
    let g1 = wait_until(RELOAD_WAIT, Duration::from_millis(50), || {
        Some(agent.generation()).filter(|g| *g > g0)
    })
    .unwrap_or_else(|| {
        panic!(
            "llm_egress_policy_generation stayed {g0} after SIGHUP\n{}",
            agent.context()
        )
    });
    assert!(g1 > g0);
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "after the reload 198.51.100.0/24 is denied",
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "after the reload 192.0.2.0/24 is still allowed",
    );
}

#[test]
fn policy_file_change_is_applied_without_a_signal() {
    require_root();
    let cg = CgroupGuard::new("filewatch");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&both_allowed_policy(&cg));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "before the change 198.51.100.0/24 is allowed",
    );
    let g0 = agent.generation();
    agent.rewrite_policy(&only_192_policy(&cg, ""));
    wait_until(RELOAD_WAIT, Duration::from_millis(50), || Some(agent.generation()).filter(|g| *g > g0))
        .unwrap_or_else(|| {
            panic!(
                "the agent did not reload within {RELOAD_WAIT:?} of the policy file being replaced (generation stayed {g0})\n{}",
                agent.context()
            )
        });
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "after the file change 198.51.100.0/24 is denied",
    );
}

#[test]
fn invalid_policy_on_reload_keeps_the_old_policy_in_force() {
    require_root();
    let cg = CgroupGuard::new("badreload");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the first policy denies 198.51.100.0/24",
    );
    let g0 = agent.generation();
    // Would allow everything, if it were valid.
    let bad = only_192_policy(&cg, "").replace(r#"other = "deny""#, r#"other = "sometimes""#);
    agent.rewrite_policy(&bad);
    agent.sighup();
    wait_until(RELOAD_WAIT, Duration::from_millis(50), || {
        agent.stderr().contains("sometimes").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the agent's stderr does not mention the bad value \"sometimes\" after the reload\n{}",
            agent.context()
        )
    });
    assert!(
        agent.is_running(),
        "an invalid reload must not stop the agent\n{}",
        agent.context()
    );
    assert_eq!(
        agent.generation(),
        g0,
        "an invalid policy must not become a new generation"
    );
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the old policy still denies 198.51.100.0/24",
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "the old policy still allows 192.0.2.0/24",
    );
    let ready = agent.http_get("/readyz").map(|r| r.status).unwrap_or(0);
    assert_eq!(
        ready,
        200,
        "the agent stays ready with the old policy in force\n{}",
        agent.context()
    );
}

#[test]
fn sigkilled_agent_leaves_the_last_policy_in_force() {
    require_root();
    let cg = CgroupGuard::new("sigkill");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "while the agent runs",
    );
    agent.kill9();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "after SIGKILL (failure_mode closed by default: pinned programs stay)",
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "after SIGKILL the allowed CIDR still works",
    );
}

#[test]
fn restarted_agent_adopts_the_pinned_programs() {
    require_root();
    let cg = CgroupGuard::new("adopt");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "before the restart",
    );
    let g0 = agent.generation();
    let attached_before = bpf::sock_addr_prog_counts(cg.path(), false);
    agent.kill9();
    agent.restart_same();
    let g1 = agent.generation();
    assert_eq!(
        g1,
        g0 + 1,
        "the restarted agent's generation continues from the old one\n{}",
        agent.context()
    );
    assert!(
        agent.stderr().to_lowercase().contains("adopt"),
        "the restarted agent should log that it adopted the pinned programs\n{}",
        agent.context()
    );
    let attached_after = bpf::sock_addr_prog_counts(cg.path(), false);
    assert_eq!(
        attached_after,
        attached_before,
        "adopting must not attach a second set of programs to the cgroup\n{}",
        agent.context()
    );
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "after the restart",
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "after the restart the allowed CIDR works",
    );
}

#[test]
fn clean_stop_detaches_the_programs() {
    require_root();
    let cg = CgroupGuard::new("stop");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "while the agent runs",
    );
    let attached = bpf::sock_addr_prog_counts(cg.path(), false);
    assert!(
        attached.iter().all(|(_, n)| *n >= 1),
        "the agent should attach all four sock_addr hooks: {attached:?}"
    );
    let status = agent.stop();
    assert!(
        status.success(),
        "SIGTERM should end the agent cleanly, it exited {status}\n{}",
        agent.context()
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "after a clean stop nothing is enforced",
    );
    expect_server_count(
        &s198,
        1,
        "the connection after the stop must reach the server",
    );
    let attached = bpf::sock_addr_prog_counts(cg.path(), false);
    assert!(
        attached.iter().all(|(_, n)| *n == 0),
        "programs still attached after a clean stop: {attached:?}"
    );
    let links: Vec<_> = bpf::pinned_objects(agent.pin_path())
        .into_iter()
        .filter(|o| o.kind == ObjKind::Link)
        .collect();
    assert!(
        links.is_empty(),
        "links still pinned after a clean stop: {links:?}"
    );
}

#[test]
fn failure_mode_open_detaches_when_the_agent_is_killed() {
    require_root();
    let cg = CgroupGuard::new("failopen");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&only_192_policy(&cg, r#"failure_mode = "open""#));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "while the agent runs",
    );
    agent.kill9();
    let r = wait_until(Duration::from_secs(2), Duration::from_millis(50), || {
        let r = p.connect(&w, &ns, "198.51.100.1:8443");
        r.is_ok().then_some(r)
    });
    if r.is_none() {
        panic!(
            "with failure_mode = \"open\" the denied connect should succeed once the agent is dead, it still fails: {}\n{}",
            describe(&p.connect(&w, &ns, "198.51.100.1:8443")),
            agent.context()
        );
    }
}
