//! A kernel program that fails to load (docs/operations.md, "When a program
//! fails to load"): the agent runs degraded with the connect-time verdict
//! when the policy can do without the missing program, and refuses to start,
//! leaving no pins, when it cannot.
//!
//! The failure is made by `LLM_EGRESS_TEST_FAIL_PROGRAM`, which only debug
//! builds of the agent honour (the tests run the debug agent): the loader
//! then treats the named program as refused by the kernel, on every kernel.
//! The program these tests fail is never verified, so they take the same
//! time whether or not this kernel's verifier accepts every program. Every
//! test name starts with `program_fails_to_load_` (`cargo xtask test
//! --filter program_fails_to_load`).
//!
//! Needs root, bpffs, and a built agent (`cargo build -p llm-egress`, or
//! LLM_EGRESS_BIN). Locals are declared cgroup, netns, servers, agent, so
//! they drop in the reverse order: the agent stops before its cgroup goes.

use std::time::{Duration, Instant};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer,
    bpf::{self, ObjKind},
    require_root,
    scenario::{RELOAD_WAIT, both_allowed_policy, expect_eperm, expect_ok, only_192_policy, probe},
    wait_until,
};

const FAIL_ENV: &str = "LLM_EGRESS_TEST_FAIL_PROGRAM";
const DNS: &str = "names_dns_ingress";
/// How long a degraded agent may take to answer /readyz, or a refusing one
/// to exit: the program made to fail is not verified, so this is the rest
/// of a debug agent's start (about 1 s) with room for a loaded machine.
const START_WAIT: Duration = Duration::from_secs(10);

/// `bytes_per_second` on workload `w` of [`only_192_policy`]: a key that
/// needs the skb programs (names_dns_ingress polices what is received).
fn with_bandwidth_limit(cg: &CgroupGuard) -> String {
    format!(
        "{}\n[workloads.limits]\nbytes_per_second = 1_000_000\n",
        only_192_policy(cg, "")
    )
}

/// An agent of [`only_192_policy`] on `cg` whose names_dns_ingress failed,
/// once its /readyz says so (503, naming the program).
fn start_degraded(cg: &CgroupGuard) -> Agent {
    let mut agent = Agent::launch_with_env(&only_192_policy(cg, ""), &[(FAIL_ENV, DNS)]);
    agent.wait_readyz(START_WAIT, |status, body| {
        status == 503 && body.contains(DNS)
    });
    agent
}

/// Starts an agent of `policy` with `program` made to fail, and waits for
/// it to exit: (the agent, its exit status, its stderr).
fn refused_start(policy: &str, program: &str) -> (Agent, std::process::ExitStatus, String) {
    let started = Instant::now();
    let mut agent = Agent::launch_with_env(policy, &[(FAIL_ENV, program)]);
    let status = agent.wait_exit(START_WAIT);
    eprintln!(
        "refusing agent exited {:?} after its start",
        started.elapsed()
    );
    let stderr = agent.stderr();
    (agent, status, stderr)
}

/// Panics unless the agent left nothing under its pin path: no pinned
/// object and no directory (the pin root itself may be gone).
#[track_caller]
fn expect_no_pins(agent: &Agent, what: &str) {
    let pinned = bpf::pinned_objects(agent.pin_path());
    let leftovers: Vec<_> = std::fs::read_dir(agent.pin_path())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        pinned.is_empty() && leftovers.is_empty(),
        "{what}: the failed start must leave nothing in its pin dir {}: {pinned:?} {leftovers:?}\n{}",
        agent.pin_path().display(),
        agent.context()
    );
}

/// Panics unless no program of the agent is attached to `cg`.
#[track_caller]
fn expect_nothing_attached(agent: &Agent, cg: &CgroupGuard) {
    let verdict = bpf::sock_addr_prog_counts(cg.path(), false);
    let other = bpf::hook_prog_counts(cg.path(), &bpf::OTHER_HOOKS, false);
    assert!(
        verdict.iter().chain(&other).all(|(_, n)| *n == 0),
        "an agent that refused to start must leave nothing attached to its cgroup: {verdict:?} {other:?}\n{}",
        agent.context()
    );
}

#[test]
fn program_fails_to_load_the_agent_runs_degraded_and_still_enforces() {
    require_root();
    let cg = CgroupGuard::new("degraded");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let started = Instant::now();
    let mut agent = Agent::launch_with_env(&only_192_policy(&cg, ""), &[(FAIL_ENV, DNS)]);
    let ready = agent.wait_readyz(START_WAIT, |status, body| {
        status == 200 || !body.contains("not attached yet")
    });
    let took = started.elapsed();
    eprintln!("degraded agent answered /readyz {took:?} after its start");
    assert!(
        ready.status == 503
            && ready.body.contains("degraded")
            && ready.body.contains(DNS)
            && ready.body.contains("DNS learning"),
        "/readyz must answer 503 naming the program that failed and what is lost, got {} {:?}\n{}",
        ready.status,
        ready.body,
        agent.context()
    );
    let loaded =
        |program: &str| agent.metric_value("llm_egress_program_loaded", &[("program", program)]);
    assert_eq!(
        (
            loaded(DNS),
            loaded("verdict_connect4"),
            loaded("names_sni_egress")
        ),
        (Some(0.0), Some(1.0), Some(1.0)),
        "llm_egress_program_loaded: 0 for {DNS}, 1 for the programs that loaded\n{}",
        agent.context()
    );
    let stderr = agent.stderr();
    assert!(
        stderr.contains("program failed to load")
            && stderr.contains(DNS)
            && stderr.contains("synthetic failure")
            && stderr.contains("DNS learning"),
        "the log must say which program failed, why, and what is lost\n{}",
        agent.context()
    );
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "a degraded agent still denies what the policy denies",
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "a degraded agent still allows what the policy allows",
    );
    let verdict = bpf::sock_addr_prog_counts(cg.path(), false);
    let other = bpf::hook_prog_counts(cg.path(), &bpf::OTHER_HOOKS, false);
    assert!(
        verdict.iter().all(|(_, n)| *n == 1)
            && other == [("skb_ingress", 0), ("skb_egress", 1), ("sock_ops", 1)],
        "every program but {DNS} (cgroup_skb ingress) attached once: {verdict:?} {other:?}\n{}",
        agent.context()
    );
    let status = agent.stop();
    assert!(
        status.success(),
        "a degraded agent stops cleanly: {status}\n{}",
        agent.context()
    );
}

#[test]
fn program_fails_to_load_a_reload_keeps_naming_it_and_refuses_keys_that_need_it() {
    require_root();
    let cg = CgroupGuard::new("degraded-reload");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = start_degraded(&cg);
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "before the reload",
    );

    // A reload the degraded agent can enforce: applied, still degraded.
    let g0 = agent.generation();
    agent.rewrite_policy(&both_allowed_policy(&cg));
    agent.sighup();
    let g1 = agent.wait_for_generation_after(g0);
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the reloaded policy allows 198.51.100.0/24",
    );
    let r = agent.http_get("/readyz").ok();
    assert!(
        r.as_ref()
            .is_some_and(|r| r.status == 503 && r.body.contains(DNS)),
        "after a reload /readyz still answers 503 naming {DNS}: {:?}\n{}",
        r.map(|r| (r.status, r.body)),
        agent.context()
    );

    // A reload with a key that needs the missing program: refused, the
    // running policy stays, and /readyz names both.
    agent.rewrite_policy(&with_bandwidth_limit(&cg));
    agent.sighup();
    let refused = wait_until(RELOAD_WAIT, Duration::from_millis(50), || {
        let n = agent
            .metric_value("llm_egress_policy_reloads_total", &[("result", "invalid")])
            .unwrap_or(0.0);
        (n >= 1.0).then_some(())
    });
    assert!(
        refused.is_some(),
        "a reload with bytes_per_second while {DNS} is missing must be refused (counted as invalid)\n{}",
        agent.context()
    );
    assert_eq!(
        agent.generation(),
        g1,
        "the refused policy must not become a generation"
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the running policy stays after the refused reload",
    );
    let r = agent.http_get("/readyz").ok();
    assert!(
        r.as_ref().is_some_and(|r| r.status == 503
            && r.body.contains("degraded")
            && r.body.contains("rejected")
            && r.body.contains("bytes_per_second")
            && r.body.matches(DNS).count() >= 2),
        "/readyz names the missing program and the rejected reload (with the key): {:?}\n{}",
        r.map(|r| (r.status, r.body)),
        agent.context()
    );
}

#[test]
fn program_fails_to_load_a_policy_that_needs_it_refuses_to_start_leaving_no_pins() {
    require_root();
    let cg = CgroupGuard::new("degraded-needed");
    let (agent, status, stderr) = refused_start(&with_bandwidth_limit(&cg), DNS);
    assert!(
        !status.success()
            && stderr.contains(DNS)
            && stderr.contains("workloads[0].limits.bytes_per_second"),
        "the agent must exit non-zero naming the program ({DNS}) and the key that needs it, it exited {status}\n{}",
        agent.context()
    );
    expect_no_pins(&agent, "a policy that needs a missing program");
    expect_nothing_attached(&agent, &cg);
}

#[test]
fn program_fails_to_load_a_verdict_hook_refuses_to_start_leaving_no_pins() {
    require_root();
    let cg = CgroupGuard::new("degraded-verdict");
    let (agent, status, stderr) = refused_start(&only_192_policy(&cg, ""), "verdict_connect6");
    assert!(
        !status.success()
            && stderr.contains("verdict_connect6")
            && stderr.contains("connect-time verdict"),
        "a failed verdict hook is fatal: non-zero exit naming it, it exited {status}\n{}",
        agent.context()
    );
    expect_no_pins(&agent, "a failed verdict hook");
    expect_nothing_attached(&agent, &cg);
}

/// A start that fails must not remove what an earlier agent pinned and
/// still enforces: after SIGKILL of a degraded agent, a restart whose
/// policy needs the missing program refuses to start and the pinned
/// programs go on enforcing the last policy.
#[test]
fn program_fails_to_load_a_failed_restart_leaves_the_previous_pins_enforcing() {
    require_root();
    let cg = CgroupGuard::new("degraded-keep");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = start_degraded(&cg);
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "while the agent runs",
    );
    let links_before = pinned_links(&agent);
    assert_eq!(
        links_before,
        7,
        "the degraded agent pins its seven links (every program but the missing one)\n{}",
        agent.context()
    );
    agent.kill9();

    agent.rewrite_policy(&with_bandwidth_limit(&cg));
    agent.relaunch();
    let status = agent.wait_exit(START_WAIT);
    assert!(
        !status.success() && agent.stderr().contains("bytes_per_second"),
        "the restart with a policy that needs {DNS} must refuse to start, it exited {status}\n{}",
        agent.context()
    );
    assert_eq!(
        pinned_links(&agent),
        links_before,
        "the failed restart must leave the previous agent's pinned links\n{}",
        agent.context()
    );
    assert!(
        bpf::pinned_map_path(agent.pin_path(), "ACTIVE").is_some(),
        "the failed restart must leave the previous agent's pinned maps\n{}",
        agent.context()
    );
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the previous agent's pinned programs still enforce its policy",
    );
}

fn pinned_links(agent: &Agent) -> usize {
    bpf::pinned_objects(agent.pin_path())
        .into_iter()
        .filter(|o| o.kind == ObjKind::Link)
        .count()
}
