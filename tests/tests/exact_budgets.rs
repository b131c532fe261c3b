//! Budgets charged with exact counts, end to end (docs/limits.md, "Token
//! budgets" and "Dollar budgets"): curl, which links Debian's libssl.so.3,
//! in a workload with `exact_tokens = true` talks to the fake providers
//! over real TLS; the OpenSSL uprobes hand the agent the plaintext, the
//! agent reads each exchange's usage and cost, charges the budgets, and the
//! kernel refuses the next connect with EPERM once a budget is spent.
//!
//! What would fail if the feature broke: the `budget` record and the
//! gauges must show the budget minus exactly the fakes' true usage (an
//! estimate from TLS record sizes would not match), and the cost charged
//! must be the catalog's price of that usage; the connects after the
//! spending request must be refused, for one provider (a token budget is
//! per pair) or for every provider (a dollar budget is the workload's).
//!
//! Fleet-wide dollar budgets (docs/fleet.md, "Dollar budgets"): two agents
//! share one budget through one `redis-server`, and an agent whose Redis is
//! killed follows each workload's `fleet_failure`.
//!
//! Needs root, bpffs, curl, redis-server and a built agent
//! (LLM_EGRESS_BIN). Locals are
//! declared cgroup, netns, servers, agent, so they drop in reverse order.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard,
    fake_provider::{self, FakeProvider, Flavor, Usage},
    redis::{RedisOptions, RedisServer},
    require_root,
    scenario::{exact_tokens_policy, expect_eperm, expect_ok, probe, wait_event},
    unique_suffix,
};
use serde_json::Value;

const OPENAI: &str = "192.0.2.1:443";
const ANTHROPIC: &str = "198.51.100.1:443";
/// The catalog's prices (agent/src/policy/catalog/prices.toml), dollars
/// per million tokens, input and output: written here, not read from the
/// agent, so that a cost computed wrong fails.
const GPT_4O_MINI: (f64, f64) = (0.15, 0.6);
const CLAUDE_3_5_HAIKU: (f64, f64) = (0.8, 4.0);

/// [`exact_tokens_policy`] with one more `exact_tokens` workload,
/// `spender`, whose `[workloads.limits]` body is `limits`.
fn spender_policy(cg: &CgroupGuard, limits: &str) -> String {
    exact_tokens_policy(
        cg,
        &format!(
            r#"
[[workloads]]
name = "spender"
cgroup = "spender"
allow = ["openai", "anthropic"]
exact_tokens = true
[workloads.limits]
{limits}
"#
        ),
    )
}

/// curl in `cgroup` posting `body` to `path`; must succeed.
fn curl(server: &FakeProvider, cgroup: &Path, ns: &NetnsGuard, path: &str, body: &str) {
    let out = try_curl(server, cgroup, ns, path, body);
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn try_curl(
    server: &FakeProvider,
    cgroup: &Path,
    ns: &NetnsGuard,
    path: &str,
    body: &str,
) -> std::process::Output {
    let mut cmd = llm_egress_tests::curl::post(server, path, body, cgroup, ns);
    cmd.args(["--http1.1", "--max-time", "30", "-o", "/dev/null"]);
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"))
}

/// The usage of the fake's request number `n` (from 1), once served.
fn usage(server: &FakeProvider, n: usize) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.served().len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = server.served();
    assert_eq!(s.len(), n, "the fake served {} requests, not {n}", s.len());
    s[n - 1].usage
}

fn cost(u: Usage, (input, output): (f64, f64)) -> f64 {
    (u.prompt as f64 * input + u.completion as f64 * output) / 1e6
}

fn chat(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"charge me exactly"}}]}}"#
    )
}

fn messages(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"claude-3-5-haiku-latest","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"and me too"}}]}}"#
    )
}

fn spent_record(agent: &Agent, provider: &str) -> Value {
    wait_event(
        agent,
        &format!("a spent budget of spender/{provider}"),
        |e| {
            e["event"] == "budget"
                && e["state"] == "spent"
                && e["workload"] == "spender"
                && e["provider"] == provider
        },
    )
}

#[test]
fn a_token_budget_spent_by_exact_counts_refuses_the_next_connect() {
    require_root();
    let cg = CgroupGuard::new("exb-tokens");
    let (spender, bot) = (cg.child("spender"), cg.child("bot"));
    let _plain = cg.child("plain");
    let ns = NetnsGuard::new();
    let openai = fake_provider::start(&ns, OPENAI, Flavor::OpenAi);
    let _anthropic = fake_provider::start(&ns, ANTHROPIC, Flavor::Anthropic);
    const BUDGET: u64 = 30;
    let mut agent = Agent::launch(&spender_policy(&cg, &format!("tokens_per_day = {BUDGET}")));
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
    let p = probe();

    // The budget is full: the request is allowed, and its 40 completion
    // tokens alone spend it.
    curl(&openai, &spender, &ns, "/v1/chat/completions", &chat(40));
    let u = usage(&openai, 1);
    let used = u.prompt + u.completion;
    assert!(
        used > BUDGET,
        "the fake's usage {u:?} does not spend {BUDGET}"
    );
    // Exactly the fake's usage was charged (the day refills 30 tokens a
    // day: nothing in a test's time).
    let want = BUDGET as i64 - used as i64;
    let spent = spent_record(&agent, "openai");
    assert_eq!(spent["limit"], "tokens_per_day", "{spent}");
    assert_eq!(spent["remaining_day"].as_i64(), Some(want), "{spent}");
    let labels = [
        ("workload", "spender"),
        ("provider", "openai"),
        ("window", "day"),
    ];
    let left = agent.expect_metric(
        "llm_egress_budget_remaining",
        &labels,
        |v| v < 0.0,
        Duration::from_secs(5),
    );
    assert_eq!(left, want as f64, "llm_egress_budget_remaining");

    // The next connect to that provider is refused; the pair's budget is
    // the pair's: the other provider, and another workload, still connect.
    expect_eperm(
        &agent,
        p.connect(&spender, &ns, OPENAI),
        "spender to openai after spending its token budget",
    );
    expect_ok(
        &agent,
        p.connect(&spender, &ns, ANTHROPIC),
        "spender to anthropic (no budget of its own spent)",
    );
    expect_ok(
        &agent,
        p.connect(&bot, &ns, OPENAI),
        "another workload to openai",
    );
    agent.expect_metric(
        "llm_egress_rate_limited_total",
        &[
            ("workload", "spender"),
            ("provider", "openai"),
            ("limit", "tokens_per_day"),
            ("verdict", "deny"),
        ],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    agent.stop();
}

#[test]
fn a_dollar_budget_spent_by_exact_costs_refuses_every_provider_and_survives_a_restart() {
    require_root();
    let cg = CgroupGuard::new("exb-usd");
    let (spender, bot) = (cg.child("spender"), cg.child("bot"));
    let _plain = cg.child("plain");
    let ns = NetnsGuard::new();
    let openai = fake_provider::start(&ns, OPENAI, Flavor::OpenAi);
    let anthropic = fake_provider::start(&ns, ANTHROPIC, Flavor::Anthropic);
    // 100 micro-dollars a day: the first request (~15 µ$) leaves some, the
    // second (~400 µ$) spends it.
    const BUDGET: f64 = 0.0001;
    let mut agent = Agent::launch(&spender_policy(&cg, &format!("usd_per_day = {BUDGET}")));
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
    let p = probe();
    let labels = [("workload", "spender"), ("window", "day")];
    // The refill of 100 µ$ a day over a test's minute is ~0.07 µ$.
    const SLACK: f64 = 2e-7;

    curl(&openai, &spender, &ns, "/v1/chat/completions", &chat(20));
    let first = cost(usage(&openai, 1), GPT_4O_MINI);
    assert!(first > 0.0 && first < BUDGET, "first request costs {first}");
    let left = agent.expect_metric(
        "llm_egress_budget_remaining_usd",
        &labels,
        |v| v < BUDGET - first / 2.0,
        Duration::from_secs(10),
    );
    assert!(
        (left - (BUDGET - first)).abs() < SLACK,
        "after the first request: {left} left, want {}",
        BUDGET - first
    );
    expect_ok(
        &agent,
        p.connect(&spender, &ns, ANTHROPIC),
        "spender with some of its dollar budget left",
    );

    // The second request, to the other provider, spends the workload's
    // dollars: every provider is refused.
    curl(&anthropic, &spender, &ns, "/v1/messages", &messages(100));
    let second = cost(usage(&anthropic, 1), CLAUDE_3_5_HAIKU);
    let want = BUDGET - first - second;
    assert!(want < 0.0, "the second request costs only {second}");
    for provider in ["openai", "anthropic"] {
        let spent = spent_record(&agent, provider);
        assert_eq!(spent["limit"], "usd_per_day", "{spent}");
        let r = spent["remaining_usd_day"].as_f64().unwrap_or(f64::NAN);
        assert!(
            (r - want).abs() < SLACK,
            "remaining_usd_day {r}, want {want}: {spent}"
        );
        assert_eq!(spent["remaining_usd_month"], Value::Null, "{spent}");
    }
    let left = agent.expect_metric(
        "llm_egress_budget_remaining_usd",
        &labels,
        |v| v < 0.0,
        Duration::from_secs(5),
    );
    assert!((left - want).abs() < SLACK, "{left} left, want {want}");
    // The request records say the same cost.
    let charged: f64 = agent
        .audit_events()
        .iter()
        .filter(|e| e["event"] == "request" && e["workload"] == "spender")
        .map(|e| e["cost_usd"].as_f64().unwrap_or(f64::NAN))
        .sum();
    assert!(
        (charged - first - second).abs() < 1e-12,
        "request records: {charged} $, fakes' usage at catalog prices: {} $",
        first + second
    );
    for addr in [OPENAI, ANTHROPIC] {
        expect_eperm(
            &agent,
            p.connect(&spender, &ns, addr),
            &format!("spender to {addr} after spending its dollar budget"),
        );
    }
    expect_ok(
        &agent,
        p.connect(&bot, &ns, OPENAI),
        "another workload to openai",
    );
    agent.expect_metric(
        "llm_egress_rate_limited_total",
        &[
            ("workload", "spender"),
            ("provider", "anthropic"),
            ("limit", "usd_per_day"),
            ("verdict", "deny"),
        ],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );

    // A clean restart (which unpins BUDGET_SPENT) keeps the debt in
    // state_dir: refused from the first moment.
    agent.stop();
    agent.restart_same();
    for addr in [OPENAI, ANTHROPIC] {
        expect_eperm(
            &agent,
            p.connect(&spender, &ns, addr),
            &format!("spender to {addr} right after a restart"),
        );
    }
    let left = agent
        .metric_value("llm_egress_budget_remaining_usd", &labels)
        .unwrap_or(f64::NAN);
    assert!(
        (left - want).abs() < SLACK,
        "after a restart: {left}, want {want}"
    );
    agent.stop();
}

/// Two agents (own cgroup trees, pin paths, state dirs, metrics ports)
/// share one dollar budget of workload `spender` through one Redis: the
/// fleet spends the budget, not twice it, within the bound of
/// docs/fleet.md (budget + agents × one request's cost + refill), and both
/// agents refuse once the ledger has nothing left.
#[test]
fn two_agents_hold_one_fleet_dollar_budget() {
    require_root();
    const AGENTS: usize = 2;
    // 200 µ$ a day; a lease of 10 %: 20 µ$, about one request.
    const BUDGET: f64 = 0.0002;
    let cgs: Vec<CgroupGuard> = (0..AGENTS).map(|_| CgroupGuard::new("exb-fleet")).collect();
    let spenders: Vec<_> = cgs.iter().map(|cg| cg.child("spender")).collect();
    let _others: Vec<_> = (cgs.iter())
        .flat_map(|cg| [cg.child("bot"), cg.child("plain")])
        .collect();
    let ns = NetnsGuard::new();
    let openai = fake_provider::start(&ns, OPENAI, Flavor::OpenAi);
    let _anthropic = fake_provider::start(&ns, ANTHROPIC, Flavor::Anthropic);
    let redis = RedisServer::start(RedisOptions::default());
    let prefix = format!("test-{}", unique_suffix());
    let agents: Vec<Agent> = cgs
        .iter()
        .map(|cg| {
            let mut a = Agent::launch(&spender_policy(
                cg,
                &format!(
                    "usd_per_day = {BUDGET}\nscope = \"fleet\"\nfleet_failure = \"closed\"\n\n[fleet]\nservers = [\"{}\"]\nkey_prefix = \"{prefix}\"\ntimeout_ms = 300\nlease_fraction = 0.1\n",
                    redis.url()
                ),
            ));
            a.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
            a
        })
        .collect();
    // The agents take turns, a request each, more than a tick apart, until
    // each was refused twice in a row.
    let start = Instant::now();
    let mut results: Vec<Vec<bool>> = vec![Vec::new(); AGENTS];
    let refused = |r: &[bool]| r.len() >= 2 && r[r.len() - 2..].iter().all(|ok| !ok);
    while start.elapsed() < Duration::from_secs(90) && !results.iter().all(|r| refused(r)) {
        for (i, spender) in spenders.iter().enumerate() {
            if refused(&results[i]) {
                continue;
            }
            let ok = try_curl(&openai, spender, &ns, "/v1/chat/completions", &chat(40))
                .status
                .success();
            results[i].push(ok);
            std::thread::sleep(Duration::from_millis(600));
        }
    }
    std::thread::sleep(Duration::from_millis(2_500));
    let served = openai.served();
    let costs: Vec<f64> = served.iter().map(|s| cost(s.usage, GPT_4O_MINI)).collect();
    let total: f64 = costs.iter().sum();
    let one = costs.iter().copied().fold(0.0, f64::max);
    let refill = BUDGET * start.elapsed().as_secs_f64() / 86_400.0;
    let bound = BUDGET + AGENTS as f64 * one + refill;
    let ok: Vec<usize> = results
        .iter()
        .map(|r| r.iter().filter(|ok| **ok).count())
        .collect();
    eprintln!(
        "fleet dollar budget {BUDGET}: spent {total:.7} in {} requests (by agent {ok:?}), one ≤ {one:.7}, bound {bound:.7}",
        served.len()
    );
    for (i, r) in results.iter().enumerate() {
        assert!(
            refused(r),
            "agent {i} was never refused: {r:?}\n{}",
            agents[i].context()
        );
        assert!(ok[i] > 0, "agent {i} spent none of the budget: {r:?}");
    }
    assert!(
        total <= bound,
        "the fleet spent {total} $, above the bound {bound} $"
    );
    // Refused only once the budget was gone (each agent spends its lease
    // before it is refused; a lease is rounded to whole micro-dollars).
    assert!(
        total >= BUDGET - 1e-6 * AGENTS as f64,
        "refused with the budget unspent: {total} of {BUDGET} $"
    );
    // The ledger agrees; each agent's records and gauge say so.
    let key = format!("{prefix}:usd:spender");
    let left = redis
        .hget_f64(&key, "m")
        .unwrap_or_else(|| panic!("no ledger {key}"));
    assert!(left <= 0.0, "ledger {key} has {left} µ$ left");
    for (a, spender) in agents.iter().zip(&spenders) {
        let spent = spent_record(a, "openai");
        assert_eq!(spent["limit"], "usd_per_day", "{spent}");
        a.expect_metric(
            "llm_egress_budget_remaining_usd",
            &[("workload", "spender"), ("window", "day")],
            |v| v <= 0.0,
            Duration::from_secs(10),
        );
        expect_eperm(
            a,
            probe().connect(spender, &ns, ANTHROPIC),
            "spender to the other provider once the fleet's dollars are spent",
        );
        assert_eq!(a.metric_value("llm_egress_fleet_degraded", &[]), Some(0.0));
    }
}

/// Redis killed under a fleet dollar budget: `closed` spends what is left
/// of its lease and is refused; `host_share` is refused once this host's
/// share (budget / agents, charged with all it spent here) is gone; the
/// agent says it is degraded. The failure modes of token budgets, in
/// dollars.
#[test]
fn redis_killed_under_a_fleet_dollar_budget_follows_fleet_failure() {
    require_root();
    // 200 µ$ a day, lease 20 µ$; host share 200 / 2 = 100 µ$.
    const BUDGET: f64 = 0.0002;
    const LEASE: f64 = 0.00002;
    const SHARE: f64 = BUDGET / 2.0;
    let cg = CgroupGuard::new("exb-fail");
    let (closed, share) = (cg.child("closed"), cg.child("share"));
    let _others = [cg.child("bot"), cg.child("plain")];
    let ns = NetnsGuard::new();
    let openai = fake_provider::start(&ns, OPENAI, Flavor::OpenAi);
    let _anthropic = fake_provider::start(&ns, ANTHROPIC, Flavor::Anthropic);
    let mut redis = RedisServer::start(RedisOptions::default());
    let workload = |name: &str, failure: &str| {
        format!(
            "\n[[workloads]]\nname = \"{name}\"\ncgroup = \"{name}\"\nallow = [\"openai\", \"anthropic\"]\nexact_tokens = true\n[workloads.limits]\nusd_per_day = {BUDGET}\nscope = \"fleet\"\nfleet_failure = \"{failure}\"\n"
        )
    };
    let prefix = format!("test-{}", unique_suffix());
    let extra = format!(
        "{}{}\n[fleet]\nservers = [\"{}\"]\nkey_prefix = \"{prefix}\"\ntimeout_ms = 300\nlease_fraction = 0.1\nagents = 2\n",
        workload("closed", "closed"),
        workload("share", "host_share"),
        redis.url(),
    );
    let mut agent = Agent::launch(&exact_tokens_policy(&cg, &extra));
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
    let call = |cgroup: &Path| {
        try_curl(&openai, cgroup, &ns, "/v1/chat/completions", &chat(40))
            .status
            .success()
    };
    // A first request each, with the ledger there.
    assert!(call(&closed) && call(&share), "{}", agent.context());
    std::thread::sleep(Duration::from_millis(2_500));
    let before = openai.served().len();

    redis.kill();
    agent.wait_readyz(Duration::from_secs(10), |s, body| {
        s == 503 && body.contains("fleet ledger")
    });
    // Requests until refused twice in a row, more than a tick apart; the
    // fake's peers tell whose request it served.
    let until_refused = |cgroup: &Path| {
        let mut r: Vec<bool> = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(40)
            && !(r.len() >= 2 && r[r.len() - 2..].iter().all(|ok| !ok))
        {
            r.push(call(cgroup));
            std::thread::sleep(Duration::from_millis(1_100));
        }
        r
    };
    let r_closed = until_refused(&closed);
    let n_closed = openai.served().len() - before;
    let r_share = until_refused(&share);
    let n_share = openai.served().len() - before - n_closed;
    let c = openai
        .served()
        .iter()
        .map(|s| cost(s.usage, GPT_4O_MINI))
        .fold(0.0, f64::max);
    let (spent_closed, share_total) = (n_closed as f64 * c, (n_share + 1) as f64 * c);
    eprintln!(
        "Redis down: closed spent {spent_closed:.7} $ ({r_closed:?}), host_share {share_total:.7} $ in all ({r_share:?}); one request {c:.7} $"
    );
    assert!(
        r_closed.len() >= 2 && !r_closed[r_closed.len() - 1],
        "closed never refused: {r_closed:?}\n{}",
        agent.context()
    );
    assert!(
        spent_closed <= LEASE + c,
        "closed spent {spent_closed} $ past its lease of {LEASE} $"
    );
    assert!(
        r_share.len() >= 2 && !r_share[r_share.len() - 1],
        "host_share never refused: {r_share:?}\n{}",
        agent.context()
    );
    assert!(
        share_total >= SHARE - c && share_total <= SHARE + LEASE + c,
        "host_share spent {share_total} $ in all, its share is {SHARE} $"
    );
    // Every provider of both workloads is refused, with a record each.
    for w in ["closed", "share"] {
        let spent = wait_event(&agent, &format!("a spent budget of {w}/anthropic"), |e| {
            e["event"] == "budget"
                && e["state"] == "spent"
                && e["workload"] == w
                && e["provider"] == "anthropic"
        });
        assert_eq!(spent["limit"], "usd_per_day", "{spent}");
    }
    for cgroup in [&closed, &share] {
        expect_eperm(
            &agent,
            probe().connect(cgroup, &ns, ANTHROPIC),
            "the other provider of a workload whose fleet dollars are out while Redis is down",
        );
    }
    assert_eq!(
        agent.metric_value("llm_egress_fleet_degraded", &[]),
        Some(1.0)
    );
    let last_request = Instant::now();

    // Back, empty, more than a minute after the last request: the day
    // window is seeded with what each workload spent in the last day (not
    // in the last minute, which is nothing by now).
    std::thread::sleep(Duration::from_secs(62).saturating_sub(last_request.elapsed()));
    redis.restart();
    agent.wait_readyz(Duration::from_secs(10), |s, _| s == 200);
    agent.expect_metric(
        "llm_egress_fleet_ledger_resets_total",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
    for (w, spent) in [
        ("closed", (n_closed + 1) as f64 * c),
        ("share", share_total),
    ] {
        let key = format!("{prefix}:usd:{w}");
        let left = redis
            .hget_f64(&key, "m")
            .unwrap_or_else(|| panic!("no ledger {key}"));
        eprintln!("after the data loss: {w} spent {spent:.7} $, the day has {left} µ$ left");
        assert!(
            left <= (BUDGET - spent) * 1e6 + 1.0,
            "the restarted ledger forgot what {w} spent today: {left} µ$ left of {} µ$, {} µ$ spent\n{}",
            BUDGET * 1e6,
            spent * 1e6,
            agent.context()
        );
    }
}
