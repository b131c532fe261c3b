//! The agent's lifecycle, end to end: reloads (SIGHUP, a changed file, an
//! invalid or oversized policy), SIGKILL and restart with adoption of the
//! pinned programs and of the events queued meanwhile, a clean stop,
//! `failure_mode`, and refusing to start.
//! The verdicts themselves are in enforce.rs.
//!
//! Needs root, bpffs, and a built agent (`cargo build -p llm-egress`, or
//! LLM_EGRESS_BIN). Locals are declared cgroup, netns, servers, agent, so
//! they drop in the reverse order: the agent stops before its cgroup goes.

use std::time::{Duration, Instant};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, ProbeCmd, TcpServer,
    bpf::{self, ObjKind},
    errno_name,
    probe::describe,
    require_root,
    scenario::{
        RELOAD_WAIT, SETTLE, both_allowed_policy, expect_eperm, expect_metric_at_least, expect_ok,
        expect_server_count, only_192_policy, policy, probe, wait_event,
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

/// Each way a policy file is changed in practice is applied in
/// milliseconds (inotify, agent/src/policy/watch.rs), not at the next
/// once-a-second check: a rename over the file (editors, tools), a write
/// in place, and Kubernetes' ConfigMap update (the file is a symlink
/// through `..data`, which is swapped by a rename). Five changes each under
/// 250 ms: with the one-second check alone that happens by chance once in
/// ~3,000 runs.
#[test]
fn policy_file_changes_apply_within_milliseconds_however_written() {
    require_root();
    let cg = CgroupGuard::new("fastwatch");
    let _w = cg.child("w");
    let agent = Agent::start(&both_allowed_policy(&cg));
    let config = agent.config_path().to_path_buf();
    let dir = config.parent().unwrap().to_path_buf();
    // A different policy each time (a comment alone changes nothing the
    // agent applies).
    let text = |i: usize| {
        only_192_policy(&cg, "").replace(
            r#"allow = ["192.0.2.0/24"]"#,
            &format!(r#"allow = ["192.0.2.0/24", "203.0.113.{i}/32"]"#),
        )
    };
    let timed = |what: &str, change: &dyn Fn()| {
        let g0 = agent.generation();
        let t0 = Instant::now();
        change();
        let applied = wait_until(Duration::from_secs(5), Duration::from_millis(2), || {
            Some(agent.generation()).filter(|g| *g > g0)
        });
        let took = t0.elapsed();
        assert!(
            applied.is_some(),
            "{what}: no reload within 5 s\n{}",
            agent.context()
        );
        eprintln!("{what}: applied after {took:?}");
        took
    };
    let mut took = Vec::new();
    took.push(timed("rename over the file", &|| {
        agent.rewrite_policy(&text(1))
    }));
    took.push(timed("write in place", &|| {
        std::fs::write(&config, text(2)).unwrap()
    }));
    // The ConfigMap layout, set up by renames (itself one change).
    let swap = |version: usize| {
        let data = dir.join(format!("..v{version}"));
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("policy.toml"), text(10 + version)).unwrap();
        std::os::unix::fs::symlink(format!("..v{version}"), dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    };
    took.push(timed("ConfigMap layout", &|| {
        swap(1);
        std::os::unix::fs::symlink("..data/policy.toml", dir.join(".link")).unwrap();
        std::fs::rename(dir.join(".link"), &config).unwrap();
    }));
    took.push(timed("ConfigMap update 1", &|| swap(2)));
    took.push(timed("ConfigMap update 2", &|| swap(3)));
    assert!(
        took.iter().all(|t| *t < Duration::from_millis(250)),
        "every change applies within 250 ms: {took:?}"
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
    let ready = agent.http_get("/readyz").ok();
    assert!(
        ready.as_ref().is_some_and(|r| r.status == 503
            && r.body.contains("rejected")
            && r.body.contains("sometimes")),
        "readiness reports the rejected reload (503, naming the error) while the old policy stays: {:?}\n{}",
        ready.map(|r| (r.status, r.body)),
        agent.context()
    );
    let live = agent.http_get("/healthz").map(|r| r.status).unwrap_or(0);
    assert_eq!(
        live, 200,
        "liveness stays green: nothing should restart the agent"
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
        "the agent should attach all five verdict hooks: {attached:?}"
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

/// Denied connects made while the agent is dead: more than the 16 MiB event
/// ring buffer holds (one event of ~100 bytes each: ~160,000 fit).
const OVERFLOW_CONNECTS: u64 = 250_000;

#[test]
fn ring_buffer_overflow_is_counted() {
    require_root();
    let cg = CgroupGuard::new("ringbuf");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let mut agent = Agent::start(&only_192_policy(&cg, r#"failure_mode = "closed""#));
    agent.kill9();

    // Nobody reads the pinned ring buffer now: it fills, then the kernel
    // drops events (and counts them) while it goes on denying.
    let run = probe().run(
        &w,
        &ns,
        &[ProbeCmd::ConnectLoop(
            "198.51.100.1:8443".into(),
            OVERFLOW_CONNECTS,
        )],
    );
    let report = &run.results[0].raw;
    assert_eq!(
        (
            report["failures"].as_u64(),
            run.results[0].errno.map(errno_name)
        ),
        (Some(OVERFLOW_CONNECTS), Some(errno_name(libc::EPERM))),
        "every connect of the loop must be denied with EPERM by the pinned programs \
         while the agent is dead: {report}\n{}",
        agent.context()
    );

    agent.restart_same();
    let lost = expect_metric_at_least(
        &agent,
        "llm_egress_events_lost_total",
        &[],
        1.0,
        COUNTER_SYNC_WAIT,
        "events that did not fit the full ring buffer must be counted as lost",
    );
    expect_metric_at_least(
        &agent,
        "llm_egress_decisions_total",
        &[("verdict", "deny")],
        OVERFLOW_CONNECTS as f64,
        COUNTER_SYNC_WAIT,
        "every deny is counted in the pinned kernel counters, also those whose event was lost",
    );

    // The restarted agent reads what was queued: every deny of the loop is
    // either a line of the audit log or counted as lost.
    let tgid = format!("\"tgid\":{},", run.pid);
    let count_logged = || {
        std::fs::read_to_string(agent.audit_log_path())
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&tgid))
            .count() as u64
    };
    let mut logged = 0;
    let accounted = wait_until(EVENT_DRAIN_WAIT, Duration::from_millis(100), || {
        logged = count_logged();
        let lost = agent
            .metric_value("llm_egress_events_lost_total", &[])
            .unwrap_or(0.0) as u64;
        (logged > 0 && logged + lost == OVERFLOW_CONNECTS).then_some(())
    });
    let lost_now = agent
        .metric_value("llm_egress_events_lost_total", &[])
        .unwrap_or(0.0);
    assert!(
        accounted.is_some(),
        "the audit log should hold the queued denies of the loop (pid {}) and, with the events \
         counted as lost, account for all {OVERFLOW_CONNECTS}: {logged} logged + {lost_now} lost \
         (first read of lost: {lost})\n{}",
        run.pid,
        agent.context()
    );
    eprintln!(
        "{OVERFLOW_CONNECTS} denies while the agent was dead: {logged} logged after the restart, {lost_now} lost"
    );
    let e = wait_event(&agent, "for a queued deny of the loop", |e| {
        e["tgid"].as_u64() == Some(u64::from(run.pid))
    });
    assert_eq!(
        (e["verdict"].as_str(), e["workload"].as_str()),
        (Some("deny"), Some("w")),
        "a queued event is the loop's deny in workload w: {e}"
    );
}

/// How long the counters may take to reach /metrics (synced every second).
const COUNTER_SYNC_WAIT: Duration = Duration::from_secs(5);
/// How long a restarted agent may take to log ~10,000 queued events.
const EVENT_DRAIN_WAIT: Duration = Duration::from_secs(15);

/// How long an agent may take to validate a 70,000-entry policy, try to
/// write it into the maps and give up (~2 s in a debug build; the margin is
/// for a loaded machine: the time bound itself is tested by
/// `one_workload_with_70000_deny_entries_is_refused_within_10s`).
const OVERSIZED_WAIT: Duration = Duration::from_secs(60);
/// IPv4 /32 deny entries of [`oversized_policy`]: more than RULES_V4 holds
/// (65,536 entries, for both policy slots together).
const OVERSIZED_ENTRIES: usize = 70_000;

/// A policy with [`OVERSIZED_ENTRIES`] distinct IPv4 /32 deny entries spread
/// over `workloads` workloads. The first workload is `w` (cgroup `w`): it
/// denies 192.0.2.1 and allows everything else, the opposite of
/// [`only_192_policy`], so a test can tell which of the two is in force.
/// The others select cgroups that do not exist (valid: they apply when the
/// cgroup appears; their rules are written all the same).
fn oversized_policy(cg: &CgroupGuard, workloads: usize) -> String {
    let per_workload = OVERSIZED_ENTRIES.div_ceil(workloads);
    let mut body = String::with_capacity(OVERSIZED_ENTRIES * 20);
    let mut next: u32 = u32::from(std::net::Ipv4Addr::new(10, 64, 0, 0));
    let mut written = 0;
    for i in 0..workloads {
        let (name, extra) = if i == 0 {
            ("w".to_string(), "  \"192.0.2.1\",\n")
        } else {
            (format!("big-{i}"), "")
        };
        body.push_str(&format!(
            "\n[[workloads]]\nname = \"{name}\"\ncgroup = \"{name}\"\nother = \"allow\"\ndeny = [\n{extra}"
        ));
        for _ in 0..per_workload.min(OVERSIZED_ENTRIES - written) {
            body.push_str(&format!("  \"{}\",\n", std::net::Ipv4Addr::from(next)));
            next += 1;
            written += 1;
        }
        body.push_str("]\n");
    }
    policy(cg, "", &body)
}

/// Workloads of the start test's [`oversized_policy`]: the capacity of a
/// map is shared by all workloads, so 70 lists of 1,000 entries do not fit
/// either. (The reload test uses one workload with all 70,000.)
const OVERSIZED_WORKLOADS: usize = 70;

#[test]
fn policy_that_does_not_fit_the_maps_is_refused() {
    require_root();
    let cg = CgroupGuard::new("toobig");
    let mut agent = Agent::launch(&oversized_policy(&cg, OVERSIZED_WORKLOADS));
    let status = agent.wait_exit(OVERSIZED_WAIT);
    assert!(
        !status.success(),
        "an agent whose policy does not fit the kernel maps must refuse to start, it exited {status}\n{}",
        agent.context()
    );
    let stderr = agent.stderr();
    assert!(
        stderr.contains("does not fit in the kernel maps") && stderr.contains("RULES_V4"),
        "stderr should say that the policy does not fit in the kernel maps, naming RULES_V4\n{}",
        agent.context()
    );
    let attached = bpf::sock_addr_prog_counts(cg.path(), false);
    assert!(
        attached.iter().all(|(_, n)| *n == 0),
        "an agent that refused to start must not leave programs attached to its cgroup: {attached:?}"
    );
}

#[test]
fn reload_that_does_not_fit_the_maps_keeps_the_old_policy() {
    require_root();
    let cg = CgroupGuard::new("toobig-reload");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&only_192_policy(&cg, ""));
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "the first policy allows 192.0.2.0/24",
    );
    let g0 = agent.generation();

    // The file watcher picks the change up (no SIGHUP: one reload only).
    agent.rewrite_policy(&oversized_policy(&cg, 1));
    let failed = [("result", "failed")];
    expect_metric_at_least(
        &agent,
        "llm_egress_policy_reloads_total",
        &failed,
        1.0,
        OVERSIZED_WAIT,
        "a reload that does not fit the maps is counted as failed",
    );
    std::thread::sleep(SETTLE);
    let reloads = |result| {
        agent
            .metric_value("llm_egress_policy_reloads_total", &[("result", result)])
            .unwrap_or(0.0)
    };
    assert_eq!(
        (reloads("failed"), reloads("ok")),
        (1.0, 0.0),
        "one failed reload and no successful one (results failed, ok)\n{}",
        agent.context()
    );
    let errors = agent
        .metric_value("llm_egress_map_update_errors_total", &[("map", "RULES_V4")])
        .unwrap_or(0.0);
    assert!(
        errors > 0.0,
        "llm_egress_map_update_errors_total{{map=\"RULES_V4\"}} should count the entries that did not fit, it is {errors}\n{}",
        agent.context()
    );
    assert_eq!(
        agent.generation(),
        g0,
        "a policy that did not fit must not become a new generation"
    );
    assert!(
        agent.is_running(),
        "a reload that does not fit must not stop the agent\n{}",
        agent.context()
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "the old policy still allows 192.0.2.1 (the refused one denies it)",
    );
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the old policy still denies 198.51.100.1 (the refused one allows it)",
    );
}

#[test]
fn one_workload_with_70000_deny_entries_is_refused_within_10s() {
    require_root();
    let cg = CgroupGuard::new("toobig-one");
    let started = Instant::now();
    let mut agent = Agent::launch(&oversized_policy(&cg, 1));
    let status = agent.wait_exit(OVERSIZED_WAIT);
    let took = started.elapsed();
    assert!(
        !status.success() && agent.stderr().contains("does not fit in the kernel maps"),
        "the agent must refuse a policy that does not fit, it exited {status}\n{}",
        agent.context()
    );
    assert!(
        took < Duration::from_secs(10),
        "refusing a 70,000-entry workload took {took:?}; a reload of it would block the agent \
         (cgroup changes, resolver updates, counters) as long"
    );
}

#[test]
fn invalid_policy_at_start_refuses_to_start() {
    require_root();
    let cg = CgroupGuard::new("badstart");
    let w = cg.child("w");
    let bad = only_192_policy(&cg, "").replace(r#"other = "deny""#, r#"other = "sometimes""#);
    let (line, column) = position_of(&bad, "\"sometimes\"");
    let mut agent = Agent::launch(&bad);
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        !status.success(),
        "an agent with an invalid policy must refuse to start, it exited {status}\n{}",
        agent.context()
    );
    let stderr = agent.stderr();
    for (what, needle) in [
        ("line:column of the value", format!(":{line}:{column}:")),
        ("the key", "workloads[0].other".to_string()),
        ("the value", "\"sometimes\"".to_string()),
    ] {
        assert!(
            stderr.contains(&needle),
            "stderr should name {what} ({needle}):\n{}",
            agent.context()
        );
    }
    let pinned = bpf::pinned_objects(agent.pin_path());
    let leftovers: Vec<_> = std::fs::read_dir(agent.pin_path())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        pinned.is_empty() && leftovers.is_empty(),
        "an agent that refused its policy must leave nothing in its pin dir {}: {pinned:?} {leftovers:?}",
        agent.pin_path().display()
    );
    for dir in [cg.path(), w.as_path()] {
        let attached = bpf::sock_addr_prog_counts(dir, true);
        assert!(
            attached.iter().all(|(_, n)| *n == 0),
            "an agent that refused its policy must attach nothing: {} has {attached:?}",
            dir.display()
        );
    }
}

/// 1-based line and column (in characters) of the first `needle` in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let at = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in the policy"));
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..at].chars().count() + 1)
}

/// Capability masks (CapEff, CapPrm) of every thread of `pid`.
fn thread_caps(pid: u32) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(u64::MAX)
        };
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            field("CapEff:"),
            field("CapPrm:"),
        ));
    }
    out
}

#[test]
fn running_agent_keeps_only_cap_sys_ptrace_in_every_thread_and_still_reloads() {
    require_root();
    const CAP_SYS_PTRACE: u64 = 1 << 19;
    let cg = CgroupGuard::new("caps");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let mut agent = Agent::start(&both_allowed_policy(&cg));
    let dropped = wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
        let caps = thread_caps(agent.pid());
        (!caps.is_empty()
            && caps
                .iter()
                .all(|(_, eff, prm)| *eff == CAP_SYS_PTRACE && *prm == CAP_SYS_PTRACE))
        .then_some(caps)
    });
    assert!(
        dropped.is_some(),
        "every thread must keep only CAP_SYS_PTRACE once attached: {:x?}\n{}",
        thread_caps(agent.pid()),
        agent.context()
    );
    // Without its capabilities it still writes policy maps and stops cleanly.
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "allowed before the reload",
    );
    let before = agent.generation();
    agent.rewrite_policy(&only_192_policy(&cg, ""));
    agent.sighup();
    let reloaded = wait_until(RELOAD_WAIT, Duration::from_millis(100), || {
        (agent.generation() > before).then_some(())
    });
    assert!(
        reloaded.is_some(),
        "reload after dropping capabilities\n{}",
        agent.context()
    );
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "the reloaded policy denies 198.51.100.1",
    );
    let status = agent.stop();
    assert!(
        status.success(),
        "clean stop without capabilities: {status}\n{}",
        agent.context()
    );
    let left = bpf::pinned_objects(agent.pin_path());
    assert!(
        left.iter().all(|o| o.kind != ObjKind::Link),
        "no links left pinned after the stop: {left:?}"
    );
}

/// `programs = "connect"` attaches the five verdict hooks and nothing else,
/// tracks no provider connection (sock_ops, which would report and remove
/// the `CONNS` entry, is not there), and switching `programs` across a
/// restart leaves exactly the chosen set attached, never two of a kind.
#[test]
fn programs_connect_attaches_the_verdict_alone_and_restarts_switch_the_set() {
    require_root();
    let cg = CgroupGuard::new("programs");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let with = |programs: &str| {
        policy(
            &cg,
            programs,
            r#"
[[providers]]
name = "test-llm"
cidrs = ["192.0.2.0/24"]

[[workloads]]
name = "w"
cgroup = "w"
allow = ["test-llm"]
other = "deny"
"#,
        )
    };
    let connect_only = with("programs = \"connect\"");
    let hooks = || {
        (
            bpf::sock_addr_prog_counts(cg.path(), false),
            bpf::hook_prog_counts(cg.path(), &bpf::OTHER_HOOKS, false),
        )
    };
    // The links a restart replaces are released when their pins go, and
    // the kernel frees a bpffs inode after an RCU grace period and a work
    // item: the old set may show for a moment (seen under load), so wait
    // up to 2 s for exactly the new one.
    let expect_set = |agent: &Agent, others: u32, when: &str| {
        let since = std::time::Instant::now();
        let (mut verdict, mut other) = hooks();
        while !(verdict.iter().all(|(_, n)| *n == 1) && other.iter().all(|(_, n)| *n == others))
            && since.elapsed() < std::time::Duration::from_secs(2)
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
            (verdict, other) = hooks();
        }
        assert!(
            verdict.iter().all(|(_, n)| *n == 1) && other.iter().all(|(_, n)| *n == others),
            "{when}: the five verdict hooks once each, the others {others} times; got {verdict:?} {other:?}\n{}",
            agent.context()
        );
    };
    let mut agent = Agent::start(&connect_only);
    let p = probe();
    expect_set(&agent, 0, "programs = \"connect\"");
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "connect only",
    );
    expect_ok(&agent, p.connect(&w, &ns, "192.0.2.1:8443"), "connect only");
    wait_event(&agent, "the provider decision", |e| {
        e["event"] == "decision" && e["provider"] == "test-llm" && e["verdict"] == "allow"
    });
    let conns = bpf::pinned_map_path(agent.pin_path(), "CONNS").expect("pinned CONNS");
    assert_eq!(
        bpf::pinned_map_dump(&conns).map(|e| e.len()),
        Some(0),
        "without sock_ops an allowed provider connection must not be tracked\n{}",
        agent.context()
    );

    agent.rewrite_policy(&with(""));
    agent.kill9();
    agent.restart_same();
    expect_set(&agent, 1, "restarted with programs = \"all\"");
    expect_eperm(&agent, p.connect(&w, &ns, "198.51.100.1:8443"), "all");

    agent.rewrite_policy(&connect_only);
    agent.kill9();
    agent.restart_same();
    expect_set(&agent, 0, "restarted with programs = \"connect\" again");
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "connect again",
    );
    expect_ok(
        &agent,
        p.connect(&w, &ns, "192.0.2.1:8443"),
        "connect again",
    );
}

/// The byte at `offset` of the value of the pinned map `name`'s only entry
/// (bpftool JSON: hex strings, or the BTF-formatted struct's `field`).
fn pinned_value_byte(agent: &Agent, name: &str, offset: usize, field: &str) -> Option<u64> {
    let path = bpf::pinned_map_path(agent.pin_path(), name)?;
    let entry = bpf::pinned_map_dump(&path)?.into_iter().next()?;
    let value = entry
        .get("formatted")
        .map_or(&entry["value"], |f| &f["value"]);
    if let Some(v) = value.get(field) {
        return v.as_u64();
    }
    let byte = value.as_array()?.get(offset)?.as_str()?;
    u64::from_str_radix(byte.trim_start_matches("0x"), 16).ok()
}

/// Every key that changes only on restart (`cgroup`, `pin_path`,
/// `metrics_listen`, `failure_mode`, `audit_log`, `programs`,
/// `[kubernetes]`; docs/policy.md) keeps its running value when a reload's
/// file changes it, and the warning names each; the rest of the file
/// applies. The keys are written in the file (no command-line flags), as a
/// user's policy has them.
#[test]
fn a_reload_keeps_every_restart_only_key_at_its_running_value() {
    require_root();
    let cg = CgroupGuard::new("restartkeys");
    let w = cg.child("w");
    let other_cg = CgroupGuard::new("restartkeys-new");
    // The new file's workload would have a cgroup there.
    let _other_w = other_cg.child("w");
    let ns = NetnsGuard::new();
    let _s192 = TcpServer::start(&ns, "192.0.2.1:8443");
    let _s198 = TcpServer::start(&ns, "198.51.100.1:8443");
    let body = |cg: &CgroupGuard, top: &str, allow: &str| {
        policy(
            cg,
            top,
            &format!(
                "[[workloads]]\nname = \"w\"\ncgroup = \"w\"\nallow = [{allow}]\nother = \"deny\"\n"
            ),
        )
    };
    let mut agent = Agent::start_with_keys_in_file(&body(
        &cg,
        "failure_mode = \"closed\"\nprograms = \"all\"",
        "\"192.0.2.0/24\"",
    ));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "before the reload",
    );
    let closed = pinned_value_byte(&agent, "ACTIVE", 4, "failure_mode");
    assert_eq!(
        closed,
        Some(1),
        "ACTIVE says failure_mode closed\n{}",
        agent.context()
    );
    let pinned_before = std::fs::read_dir(agent.pin_path()).unwrap().count();

    let new_pins = llm_egress_tests::agent::PinDir::new();
    let new_metrics = format!(
        "127.0.0.1:{}",
        llm_egress_tests::agent::free_loopback_port()
    );
    let new_audit = agent.temp_path("new-audit.jsonl");
    let new_state = agent.temp_path("new-state");
    let g0 = agent.generation();
    agent.rewrite_policy(&format!(
        "pin_path = {}\nstate_dir = {}\nmetrics_listen = \"{new_metrics}\"\naudit_log = {}\n{}\n[kubernetes]\nnode_name = \"n1\"\n",
        llm_egress_tests::toml_str(&new_pins.path().display().to_string()),
        llm_egress_tests::toml_str(&new_state.display().to_string()),
        llm_egress_tests::toml_str(&new_audit.display().to_string()),
        body(
            &other_cg,
            "failure_mode = \"open\"\nprograms = \"connect\"",
            "\"192.0.2.0/24\", \"198.51.100.0/24\""
        ),
    ));
    agent.sighup();
    let g1 = agent.wait_for_generation_after(g0);
    assert!(g1 > g0);
    let log = agent.stderr();
    let warned = log
        .lines()
        .find(|l| l.contains("change only on restart"))
        .unwrap_or_else(|| panic!("no warning names the kept keys\n{}", agent.context()));
    for key in [
        "cgroup",
        "pin_path",
        "metrics_listen",
        "failure_mode",
        "audit_log",
        "programs",
        "[kubernetes]",
    ] {
        assert!(
            warned.contains(&format!("\"{key}\"")),
            "the warning names {key}: {warned}"
        );
    }
    assert!(
        !warned.contains("state_dir"),
        "state_dir changes on reload: {warned}"
    );
    // The rest of the file applied: 198.51.100.0/24 is allowed now...
    expect_ok(
        &agent,
        p.connect(&w, &ns, "198.51.100.1:8443"),
        "after the reload, the new allow list",
    );
    // cgroup: ... in the cgroup attached at start, and the new file's
    // cgroup has no programs (its workload is not judged).
    assert!(
        bpf::sock_addr_prog_counts(other_cg.path(), false)
            .iter()
            .all(|(_, n)| *n == 0),
        "nothing is attached to the reload's cgroup\n{}",
        agent.context()
    );
    // pin_path: the pins stay where they were; nothing under the new path.
    assert_eq!(
        std::fs::read_dir(agent.pin_path()).unwrap().count(),
        pinned_before
    );
    assert!(
        std::fs::read_dir(new_pins.path()).map_or(true, |mut d| d.next().is_none()),
        "nothing is pinned under the reload's pin_path"
    );
    // failure_mode: the kernel still fails closed.
    assert_eq!(
        pinned_value_byte(&agent, "ACTIVE", 4, "failure_mode"),
        Some(1)
    );
    // programs: the SNI program is still attached (programs = "all").
    assert!(
        bpf::hook_prog_counts(cg.path(), &bpf::OTHER_HOOKS, false)
            .iter()
            .all(|(_, n)| *n == 1),
        "every program of the \"all\" set stays attached\n{}",
        agent.context()
    );
    // metrics_listen: the running address answers, the new one does not.
    assert!(agent.http_get("/metrics").is_ok_and(|r| r.status == 200));
    assert!(
        std::net::TcpStream::connect(&new_metrics).is_err(),
        "nothing listens on {new_metrics}"
    );
    // audit_log: a new decision goes to the running log, no new file.
    expect_eperm(
        &agent,
        p.connect(&w, &ns, "203.0.113.1:8443"),
        "a deny after the reload",
    );
    wait_event(&agent, "the deny after the reload", |e| {
        e["verdict"] == "deny" && e["dst_addr"] == "203.0.113.1" && e["generation"] == g1
    });
    assert!(!new_audit.exists(), "the reload's audit_log is not opened");
    agent.stop();
}
