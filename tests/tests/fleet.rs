//! Fleet-wide token budgets on Redis (docs/fleet.md), end to end: several
//! agents on one machine, each with its own cgroup tree, pin path, state
//! dir and metrics port, share one budget of workload `bot` through one
//! `redis-server` on loopback (its own port per test); streamed completions
//! from a fake OpenAI server spend it. Faults: an agent killed and
//! restarted, Redis killed mid-run (each `fleet_failure`) and restarted
//! with its data lost, Redis hung (SIGSTOP), AUTH and TLS.
//!
//! Needs root, bpffs, curl, redis-server and a built agent (LLM_EGRESS_BIN).
//! Locals are declared cgroup, netns, servers, agent, so they drop in
//! reverse order.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, agent_bin,
    curl::stream_chat,
    fake_provider::{self, FakeProvider, Flavor},
    redis::{RedisOptions, RedisServer, Relay},
    require_root,
    scenario::{FAKE_OPENAI, policy},
    unique_suffix,
};

const PROVIDER_ADDR: &str = "192.0.2.1:443";
/// Completion tokens each call asks for.
const CALL_TOKENS: usize = 150;
/// Between two calls of one client: more than the agent's 1 s tick, so at
/// most one call's tokens are counted past a lease (the bound's `C`).
const PAUSE: Duration = Duration::from_millis(1100);

/// The `[fleet]` table for `redis`, with a key prefix of its own.
fn fleet_table(redis: &RedisServer, extra: &str) -> String {
    format!(
        "[fleet]\nservers = [\"{}\"]\nkey_prefix = \"test-{}\"\ntimeout_ms = 300\n{extra}\n",
        redis.url(),
        unique_suffix()
    )
}

/// One workload `name` in cgroup `name` with a fleet day budget.
fn fleet_workload(name: &str, tokens_per_day: u64, failure: &str) -> String {
    format!(
        r#"
[[workloads]]
name = "{name}"
cgroup = "{name}"
allow = ["openai"]
[workloads.limits]
tokens_per_day = {tokens_per_day}
scope = "fleet"
fleet_failure = "{failure}"
"#
    )
}

fn fleet_policy(cg: &CgroupGuard, fleet: &str, workloads: &str) -> String {
    policy(cg, "", &format!("{FAKE_OPENAI}\n{fleet}\n{workloads}"))
}

/// One streamed completion from `cgroup`; true when it got its 200 (false:
/// refused, EPERM at connect, or cut).
fn call(server: &FakeProvider, cgroup: &std::path::Path, ns: &NetnsGuard) -> bool {
    let out = stream_chat(server, cgroup, ns, CALL_TOKENS)
        .wait_with_output()
        .unwrap_or_else(|e| panic!("curl: {e}"));
    out.status.success() && out.stdout == b"200"
}

/// Calls every `PAUSE` until `stop` says so (given the results so far) or
/// `limit` passes; the results.
fn calls_until(
    server: &FakeProvider,
    cgroup: &std::path::Path,
    ns: &NetnsGuard,
    limit: Duration,
    stop: impl Fn(&[bool]) -> bool,
) -> Vec<bool> {
    let start = Instant::now();
    let mut results = Vec::new();
    while start.elapsed() < limit && !stop(&results) {
        results.push(call(server, cgroup, ns));
        thread::sleep(PAUSE);
    }
    results
}

/// Three refusals in a row: the budget is spent (a lease renewal takes one
/// tick, never three).
fn refused_thrice(r: &[bool]) -> bool {
    r.len() >= 3 && r[r.len() - 3..].iter().all(|ok| !ok)
}

/// Tokens the agent counted for `workload` (prompt and completion).
fn tokens(agent: &Agent, workload: &str) -> f64 {
    agent
        .metric_value(
            "llm_egress_tokens_total",
            &[("workload", workload), ("provider", "openai")],
        )
        .unwrap_or(0.0)
}

/// The most tokens one connection of `workload` carried (audit log).
fn max_call_tokens(agent: &Agent, workload: &str) -> f64 {
    agent
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "connection" && e["workload"] == workload)
        .map(|e| {
            e["tokens_prompt_estimated"].as_f64().unwrap_or(0.0)
                + e["tokens_completion_estimated"].as_f64().unwrap_or(0.0)
        })
        .fold(0.0, f64::max)
}

/// Waits until every agent has counted every token of the calls made.
fn settle() {
    thread::sleep(Duration::from_millis(2_500));
}

fn ledger_key(fleet: &str, identity: &str) -> String {
    let prefix = fleet
        .lines()
        .find_map(|l| l.strip_prefix("key_prefix = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap_or_else(|| panic!("no key_prefix in {fleet}"));
    format!("{prefix}:tokens:{identity}:openai")
}

#[test]
fn three_agents_hold_one_fleet_budget_within_the_published_bound() {
    require_root();
    const BUDGET: u64 = 6_000;
    const AGENTS: usize = 3;
    let cgs: Vec<CgroupGuard> = (0..AGENTS).map(|_| CgroupGuard::new("fleet-n")).collect();
    let bots: Vec<_> = cgs.iter().map(|cg| cg.child("bot")).collect();
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let redis = RedisServer::start(RedisOptions::default());
    // A lease of 5 %: 300 tokens, about one call.
    let fleet = fleet_table(&redis, "lease_fraction = 0.05");
    let agents: Vec<Agent> = cgs
        .iter()
        .map(|cg| {
            Agent::start(&fleet_policy(
                cg,
                &fleet,
                &fleet_workload("bot", BUDGET, "closed"),
            ))
        })
        .collect();
    let start = Instant::now();
    let results: Vec<Vec<bool>> = thread::scope(|s| {
        let handles: Vec<_> = bots
            .iter()
            .map(|bot| {
                let (server, ns) = (&server, &ns);
                s.spawn(move || {
                    calls_until(server, bot, ns, Duration::from_secs(60), refused_thrice)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    settle();
    let total: f64 = agents.iter().map(|a| tokens(a, "bot")).sum();
    let per_agent: Vec<f64> = agents.iter().map(|a| tokens(a, "bot")).collect();
    let c = agents
        .iter()
        .map(|a| max_call_tokens(a, "bot"))
        .fold(0.0, f64::max);
    // The bound (docs/fleet.md): budget + agents × C, where C is what one
    // agent counts past its lease before its kernel refuses (here one call:
    // calls are more than a tick apart); plus the day's refill meanwhile.
    let refill = BUDGET as f64 * start.elapsed().as_secs_f64() / 86_400.0;
    let bound = BUDGET as f64 + AGENTS as f64 * c + refill;
    eprintln!(
        "fleet budget {BUDGET}: counted {total:.0} ({per_agent:?}), one call ≤ {c:.0}, bound {bound:.0}, calls {:?}",
        results
            .iter()
            .map(|r| (r.iter().filter(|ok| **ok).count(), r.len()))
            .collect::<Vec<_>>()
    );
    for (i, r) in results.iter().enumerate() {
        assert!(
            refused_thrice(r),
            "agent {i} was never refused: {r:?}\n{}",
            agents[i].context()
        );
    }
    assert!(
        per_agent.iter().all(|t| *t > 0.0),
        "every agent spent some of the budget: {per_agent:?}"
    );
    assert!(
        total <= bound,
        "the fleet spent {total:.0} tokens, above the bound {bound:.0}"
    );
    // Refused only once the budget was gone: each agent spends its whole
    // lease before it is refused, and leases are granted until none is left.
    assert!(
        total >= BUDGET as f64 - AGENTS as f64,
        "refused with the budget unspent: {total:.0} of {BUDGET}"
    );
    // The ledger agrees, and each agent says the fleet has nothing left.
    for a in &agents {
        a.expect_metric(
            "llm_egress_fleet_budget_remaining",
            &[
                ("workload", "bot"),
                ("provider", "openai"),
                ("window", "day"),
            ],
            |v| v <= 0.0,
            Duration::from_secs(10),
        );
        assert_eq!(a.metric_value("llm_egress_fleet_degraded", &[]), Some(0.0));
        let spent = a
            .audit_events()
            .into_iter()
            .find(|e| e["event"] == "budget" && e["state"] == "spent")
            .unwrap_or_else(|| panic!("no budget record\n{}", a.context()));
        assert_eq!(spent["limit"], "tokens_per_day");
    }
    let key = ledger_key(&fleet, "bot");
    let left = redis
        .hget_f64(&key, "d")
        .unwrap_or_else(|| panic!("no ledger {key}"));
    assert!(left <= 0.0, "ledger {key} has {left} left");
    assert_eq!(
        agents[0].metric_value("llm_egress_fleet_agents", &[]),
        Some(AGENTS as f64)
    );
}

#[test]
fn an_agent_killed_and_restarted_keeps_its_fleet_id_and_gets_no_budget_back() {
    require_root();
    const BUDGET: u64 = 100_000;
    let (cg_a, cg_b) = (CgroupGuard::new("fleet-ka"), CgroupGuard::new("fleet-kb"));
    let (bot_a, bot_b) = (cg_a.child("bot"), cg_b.child("bot"));
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let redis = RedisServer::start(RedisOptions::default());
    let fleet = fleet_table(&redis, "lease_fraction = 0.01");
    let w = fleet_workload("bot", BUDGET, "closed");
    let mut a = Agent::start(&fleet_policy(&cg_a, &fleet, &w));
    let b = Agent::start(&fleet_policy(&cg_b, &fleet, &w));
    for _ in 0..3 {
        assert!(call(&server, &bot_a, &ns), "{}", a.context());
        assert!(call(&server, &bot_b, &ns), "{}", b.context());
    }
    settle();
    let id = |a: &Agent| -> String {
        let text = std::fs::read_to_string(a.state_dir().join("fleet.json"))
            .unwrap_or_else(|e| panic!("fleet.json: {e}\n{}", a.context()));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["agent"].as_str().unwrap().to_string()
    };
    let id_a = id(&a);
    let key = ledger_key(&fleet, "bot");
    let spent_a = tokens(&a, "bot");
    // The ledger holds at least what A spent (reported, or reserved as
    // its lease).
    let charged_a = redis
        .hget_f64(&key, &format!("g:{id_a}"))
        .unwrap_or_else(|| {
            panic!(
                "agent {id_a} not in the ledger\n{}",
                redis.cli(&["HGETALL", &key])
            )
        });
    assert!(
        charged_a >= spent_a,
        "ledger charged A {charged_a}, A spent {spent_a}"
    );
    let left_before = redis.hget_f64(&key, "d").unwrap();

    a.kill9();
    a.relaunch();
    a.wait_readyz(Duration::from_secs(20), |s, _| s == 200);
    assert_eq!(
        id(&a),
        id_a,
        "the restarted agent is the same agent to the ledger"
    );
    assert!(
        call(&server, &bot_a, &ns),
        "A spends again after its restart\n{}",
        a.context()
    );
    settle();
    // Nothing came back: what is left only went down (beyond the refill
    // of a few seconds: BUDGET / 86,400 a second).
    let left_after = redis.hget_f64(&key, "d").unwrap();
    assert!(
        left_after <= left_before + 10.0,
        "the restart gave budget back: {left_before} → {left_after}"
    );
    // The lease A held at the kill counts as spent: the ledger's usage of A
    // is at least its grant before the kill.
    let used_a = redis.hget_f64(&key, &format!("u:{id_a}")).unwrap();
    assert!(
        used_a >= charged_a,
        "A's usage {used_a} < its grant before the kill {charged_a}"
    );
    // A clean stop returns the unspent lease.
    let granted = redis.hget_f64(&key, &format!("g:{id_a}")).unwrap();
    a.stop();
    let returned = redis.hget_f64(&key, &format!("g:{id_a}")).unwrap();
    let used = redis.hget_f64(&key, &format!("u:{id_a}")).unwrap();
    assert!(
        returned <= granted && returned == used,
        "after a clean stop A holds nothing: granted {granted} → {returned}, used {used}\n{}",
        a.context()
    );
}

#[test]
fn redis_killed_mid_run_each_fleet_failure_mode_then_restarted_with_its_data_lost() {
    require_root();
    const BUDGET: u64 = 3_000;
    let cg = CgroupGuard::new("fleet-fail");
    let (closed, share, open) = (cg.child("closed"), cg.child("share"), cg.child("open"));
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let mut redis = RedisServer::start(RedisOptions::default());
    // Lease 300 tokens; host share 3,000 / 2 = 1,500.
    let fleet = fleet_table(&redis, "lease_fraction = 0.1\nagents = 2");
    let workloads = [
        fleet_workload("closed", BUDGET, "closed"),
        fleet_workload("share", BUDGET, "host_share"),
        fleet_workload("open", BUDGET, "open"),
    ]
    .concat();
    let mut agent = Agent::start(&fleet_policy(&cg, &fleet, &workloads));
    for w in [&closed, &share, &open] {
        assert!(call(&server, w, &ns), "{}", agent.context());
    }
    settle();
    let before: Vec<f64> = ["closed", "share", "open"]
        .iter()
        .map(|w| tokens(&agent, w))
        .collect();

    redis.kill();
    agent.wait_readyz(Duration::from_secs(10), |s, body| {
        s == 503 && body.contains("fleet ledger")
    });
    assert_eq!(
        agent.metric_value("llm_egress_fleet_degraded", &[]),
        Some(1.0)
    );
    let c = max_call_tokens(&agent, "open").max(max_call_tokens(&agent, "closed"));
    let lease = 300.0;
    let share_limit = BUDGET as f64 / 2.0;
    let (r_closed, r_share, r_open) = thread::scope(|s| {
        let (server, ns) = (&server, &ns);
        let a =
            s.spawn(|| calls_until(server, &closed, ns, Duration::from_secs(30), refused_thrice));
        let b =
            s.spawn(|| calls_until(server, &share, ns, Duration::from_secs(40), refused_thrice));
        // `open` spends past what host_share would allow, never refused.
        let o = s.spawn(|| {
            calls_until(server, &open, ns, Duration::from_secs(40), |r| {
                r.len() as f64 * c > share_limit + lease + 2.0 * c
            })
        });
        (a.join().unwrap(), b.join().unwrap(), o.join().unwrap())
    });
    settle();
    let spent = |w: &str, i: usize| tokens(&agent, w) - before[i];
    eprintln!(
        "Redis down: closed spent {:.0} ({r_closed:?}), host_share {:.0} (total {:.0}) ({r_share:?}), open {:.0} ({r_open:?}); C = {c:.0}",
        spent("closed", 0),
        spent("share", 1),
        tokens(&agent, "share"),
        spent("open", 2)
    );
    // closed: what was left of its lease, then refused.
    assert!(
        refused_thrice(&r_closed),
        "closed never refused: {r_closed:?}"
    );
    assert!(
        spent("closed", 0) <= lease + c,
        "closed spent {:.0} past its lease",
        spent("closed", 0)
    );
    // host_share: refused once this host's share (all it spent) is gone.
    assert!(
        refused_thrice(&r_share),
        "host_share never refused: {r_share:?}"
    );
    let share_total = tokens(&agent, "share");
    assert!(
        share_total >= share_limit - c && share_total <= share_limit + lease + c,
        "host_share spent {share_total:.0} in all, its share is {share_limit:.0}"
    );
    // open: never refused.
    assert!(
        r_open.iter().all(|ok| *ok),
        "open was refused: {r_open:?}\n{}",
        agent.context()
    );
    let open_total = tokens(&agent, "open");

    // Back, empty: the ledger is seeded with what each agent spent in the
    // last day, not full; everything spent while it was down is charged.
    redis.restart();
    agent.wait_readyz(Duration::from_secs(10), |s, _| s == 200);
    agent.expect_metric(
        "llm_egress_fleet_degraded",
        &[],
        |v| v == 0.0,
        Duration::from_secs(5),
    );
    agent.expect_metric(
        "llm_egress_fleet_ledger_resets_total",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    let key = ledger_key(&fleet, "open");
    let left = redis
        .hget_f64(&key, "d")
        .unwrap_or_else(|| panic!("no ledger {key}"));
    assert!(
        left <= BUDGET as f64 - open_total + 1.0,
        "the restarted ledger forgot what `open` spent: {left} left of {BUDGET}, {open_total:.0} spent"
    );
    // `open` spent past the whole budget, the ledger says so, and the
    // agent now refuses it.
    if open_total > BUDGET as f64 {
        assert!(left <= 0.0);
        thread::sleep(Duration::from_millis(1500));
        assert!(
            !call(&server, &open, &ns),
            "open allowed after the fleet budget is known spent"
        );
    }
}

#[test]
fn an_agent_cut_off_from_redis_follows_its_fleet_failure_while_the_others_go_on() {
    require_root();
    const BUDGET: u64 = 100_000;
    let (cg_a, cg_b) = (CgroupGuard::new("fleet-pa"), CgroupGuard::new("fleet-pb"));
    let (bot_a, bot_b) = (cg_a.child("bot"), cg_b.child("bot"));
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let redis = RedisServer::start(RedisOptions::default());
    let relay = Relay::start(&redis);
    // Leases of 300 tokens (two calls).
    let fleet_a = fleet_table(&redis, "lease_fraction = 0.003");
    let fleet_b = fleet_a.replace(&redis.url(), &relay.url());
    let w = fleet_workload("bot", BUDGET, "closed");
    let a = Agent::start(&fleet_policy(&cg_a, &fleet_a, &w));
    let b = Agent::start(&fleet_policy(&cg_b, &fleet_b, &w));
    assert!(call(&server, &bot_b, &ns), "{}", b.context());
    settle();

    relay.cut();
    b.expect_metric(
        "llm_egress_fleet_degraded",
        &[],
        |v| v == 1.0,
        Duration::from_secs(10),
    );
    let before_b = tokens(&b, "bot");
    // B spends what is left of its lease, then is refused (closed); A,
    // still connected, goes on through lease after lease.
    let (r_a, r_b) = thread::scope(|s| {
        let (server, ns) = (&server, &ns);
        let ra = s.spawn(|| calls_until(server, &bot_a, ns, Duration::from_secs(8), |_| false));
        let rb =
            s.spawn(|| calls_until(server, &bot_b, ns, Duration::from_secs(30), refused_thrice));
        (ra.join().unwrap(), rb.join().unwrap())
    });
    settle();
    assert_eq!(
        a.metric_value("llm_egress_fleet_degraded", &[]),
        Some(0.0),
        "A saw nothing"
    );
    assert!(
        r_a.iter().all(|ok| *ok),
        "A was refused: {r_a:?}\n{}",
        a.context()
    );
    assert!(tokens(&a, "bot") > 600.0, "A spent past its first leases");
    assert!(refused_thrice(&r_b), "B was never refused: {r_b:?}");
    let cut_off = tokens(&b, "bot") - before_b;
    assert!(
        cut_off <= 300.0 + 150.0,
        "B spent {cut_off} while cut off (lease 300, C 150)"
    );

    // Healed: B reports what it spent and is served again.
    relay.heal();
    b.expect_metric(
        "llm_egress_fleet_degraded",
        &[],
        |v| v == 0.0,
        Duration::from_secs(10),
    );
    thread::sleep(Duration::from_millis(1500));
    assert!(
        call(&server, &bot_b, &ns),
        "B after the partition healed\n{}",
        b.context()
    );
}

#[test]
fn a_hung_redis_degrades_the_fleet_but_never_blocks_connections() {
    require_root();
    let cg = CgroupGuard::new("fleet-hung");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let mut redis = RedisServer::start(RedisOptions::default());
    let fleet = fleet_table(&redis, "lease_fraction = 0.5");
    let agent = Agent::start(&fleet_policy(
        &cg,
        &fleet,
        &fleet_workload("bot", 100_000, "closed"),
    ));
    assert!(call(&server, &bot, &ns));
    redis.pause();
    // Connections go on from the lease while every op times out.
    let t = Instant::now();
    for _ in 0..3 {
        assert!(
            call(&server, &bot, &ns),
            "refused while Redis hangs\n{}",
            agent.context()
        );
    }
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "connections waited on Redis: {:?}",
        t.elapsed()
    );
    agent.expect_metric(
        "llm_egress_fleet_degraded",
        &[],
        |v| v == 1.0,
        Duration::from_secs(10),
    );
    let r = agent.http_get("/readyz").unwrap();
    assert!(
        r.status == 503 && r.body.contains("fleet ledger"),
        "{}: {}",
        r.status,
        r.body
    );
    redis.resume();
    agent.expect_metric(
        "llm_egress_fleet_degraded",
        &[],
        |v| v == 0.0,
        Duration::from_secs(10),
    );
}

#[test]
fn fleet_ledger_with_auth_takes_the_password_file_and_refuses_a_wrong_one() {
    require_root();
    let cg = CgroupGuard::new("fleet-auth");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let redis = RedisServer::start(RedisOptions {
        password: Some("s3cret-fleet".into()),
        tls: false,
    });
    let dir = tempfile_dir();
    let good = dir.join("good");
    let bad = dir.join("bad");
    std::fs::write(&good, "s3cret-fleet\n").unwrap();
    std::fs::write(&bad, "wrong\n").unwrap();
    let table = |file: &std::path::Path| {
        fleet_table(&redis, &format!("password_file = \"{}\"", file.display()))
    };
    let w = fleet_workload("bot", 100_000, "closed");
    let mut agent = Agent::launch(&fleet_policy(&cg, &table(&bad), &w));
    let r = agent.wait_readyz(Duration::from_secs(20), |s, body| {
        s == 503 && body.contains("fleet ledger")
    });
    assert!(r.body.contains("unreachable"), "{}", r.body);
    assert!(
        agent.all_stderr().contains("authentication failed"),
        "the error names the refused password\n{}",
        agent.context()
    );
    assert!(!call(&server, &bot, &ns), "closed with no lease: refused");
    assert!(
        !agent.all_stderr().contains("wrong\n"),
        "the password is not logged"
    );
    agent.stop();
    agent.rewrite_policy(&fleet_policy(&cg, &table(&good), &w));
    agent.relaunch();
    agent.wait_readyz(Duration::from_secs(20), |s, _| s == 200);
    assert!(call(&server, &bot, &ns), "{}", agent.context());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fleet_ledger_over_tls_is_verified_against_the_configured_ca() {
    require_root();
    let cg = CgroupGuard::new("fleet-tls");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let redis = RedisServer::start(RedisOptions {
        password: None,
        tls: true,
    });
    let w = fleet_workload("bot", 100_000, "closed");
    // Without the CA: the system roots do not know the test CA.
    let mut agent = Agent::launch(&fleet_policy(&cg, &fleet_table(&redis, ""), &w));
    agent.wait_readyz(Duration::from_secs(20), |s, body| {
        s == 503 && body.contains("fleet ledger")
    });
    agent.stop();
    let ca = format!("tls_ca = \"{}\"", redis.ca_file().display());
    agent.rewrite_policy(&fleet_policy(&cg, &fleet_table(&redis, &ca), &w));
    agent.relaunch();
    agent.wait_readyz(Duration::from_secs(20), |s, _| s == 200);
    assert!(call(&server, &bot, &ns), "{}", agent.context());
    agent.expect_metric(
        "llm_egress_fleet_lease_operations_total",
        &[("result", "ok")],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
}

/// `scope` follows a reload: a pair whose fleet budget is spent becomes a
/// host pair with budget left, and is allowed again (the kernel was told
/// "spent" by the fleet side; the host side takes that over).
#[test]
fn a_reload_moves_a_spent_fleet_budget_to_the_host() {
    require_root();
    let cg = CgroupGuard::new("fleet-reload");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, PROVIDER_ADDR, Flavor::OpenAi);
    let redis = RedisServer::start(RedisOptions::default());
    let fleet = fleet_table(&redis, "");
    let agent = Agent::start(&fleet_policy(
        &cg,
        &fleet,
        &fleet_workload("bot", 100, "closed"),
    ));
    assert!(call(&server, &bot, &ns), "{}", agent.context());
    agent.expect_metric(
        "llm_egress_fleet_budget_remaining",
        &[
            ("workload", "bot"),
            ("provider", "openai"),
            ("window", "day"),
        ],
        |v| v <= 0.0,
        Duration::from_secs(5),
    );
    assert!(
        !call(&server, &bot, &ns),
        "refused by its spent fleet budget"
    );
    let generation = agent.generation();
    let host = fleet_workload("bot", 100_000, "closed")
        .replace("scope = \"fleet\"\nfleet_failure = \"closed\"\n", "");
    agent.rewrite_policy(&fleet_policy(&cg, &fleet, &host));
    agent.wait_for_generation_after(generation);
    thread::sleep(Duration::from_millis(1500));
    assert!(
        call(&server, &bot, &ns),
        "allowed by its host budget after the reload\n{}",
        agent.context()
    );
}

/// A password file others could replace is refused like an untrusted
/// policy file: the agent does not start.
#[test]
fn a_fleet_password_file_others_can_write_is_refused() {
    require_root();
    let cg = CgroupGuard::new("fleet-own");
    let redis = RedisServer::start(RedisOptions::default());
    let dir = tempfile_dir();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let file = dir.join("password");
    std::fs::write(&file, "x\n").unwrap();
    let fleet = fleet_table(&redis, &format!("password_file = \"{}\"", file.display()));
    let mut agent = Agent::launch(&fleet_policy(
        &cg,
        &fleet,
        &fleet_workload("bot", 1000, "closed"),
    ));
    let status = agent.wait_exit(Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success(), "{}", agent.context());
    assert!(
        agent.all_stderr().contains("fleet.password_file"),
        "the error names the key\n{}",
        agent.context()
    );
}

/// `llm-egress fleet-bench` against one Redis: how many lease operations a
/// second it serves, and the grants stay within the budgets.
#[test]
fn fleet_bench_measures_lease_operations_per_second() {
    require_root();
    let redis = RedisServer::start(RedisOptions::default());
    let dir = tempfile_dir();
    let config = dir.join("bench.toml");
    std::fs::write(&config, fleet_table(&redis, "")).unwrap();
    let out = Command::new(agent_bin())
        .args([
            "fleet-bench",
            "--agents",
            "50",
            "--pairs",
            "10",
            "--seconds",
            "5",
        ])
        .args(["--budget", "20000", "--lease", "100"])
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap_or_else(|e| panic!("fleet-bench: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("fleet-bench: {v}");
    assert!(v["ops_per_second"].as_f64().unwrap() > 100.0, "{v}");
    assert_eq!(v["within_budget"], true, "{v}");
    // The budgets were exhausted (2,000 ops): the ledger granted all of
    // them, and no more.
    assert!(v["granted"].as_u64().unwrap() >= 10 * 20_000, "{v}");
}

/// A root-owned 0755 directory for secret and config files.
fn tempfile_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fleet-test-{}", unique_suffix()));
    std::fs::create_dir(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}
