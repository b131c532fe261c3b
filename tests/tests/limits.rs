//! `[workloads.limits]` end to end (docs/limits.md): connection rates taken
//! in the kernel by several client processes at once, token budgets spent by
//! streamed responses from a fake provider, bandwidth held by the skb
//! programs; other workloads unaffected; limits follow reloads and budgets
//! survive restarts.
//!
//! Needs root, bpffs, curl and a built agent (LLM_EGRESS_BIN). Locals are
//! declared cgroup, netns, servers, agent, so they drop in reverse order.

use std::time::{Duration, Instant};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer,
    curl::{expect_200, stream_chat},
    fake_provider::{self, Flavor},
    probe::{SpawnedProbe, TransferReport},
    require_root,
    scenario::{FAKE_OPENAI, PROVIDER, expect_eperm, expect_ok, policy, probe, wait_event},
    servers::ByteServer,
};

const LLM: &str = "10.20.0.1:8443";
/// The accuracy issue 5 asks of connection-rate limits.
const RATE_TOLERANCE: f64 = 0.05;

/// The provider `test-llm` with workload `bot` (limited by `limits`, a
/// `[workloads.limits]` body) and workload `free` (not limited).
fn limited_policy(cg: &CgroupGuard, top: &str, limits: &str) -> String {
    policy(
        cg,
        top,
        &format!(
            r#"{PROVIDER}
[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm"]
[workloads.limits]
{limits}

[[workloads]]
name = "free"
cgroup = "free"
allow = ["test-llm"]
"#
        ),
    )
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    agent.metric_value(name, labels).unwrap_or(0.0)
}

#[test]
fn concurrent_processes_of_a_workload_share_its_connection_rate() {
    require_root();
    let cg = CgroupGuard::new("limit-rate");
    let (bot, free) = (cg.child("bot"), cg.child("free"));
    let ns = NetnsGuard::new();
    let server = TcpServer::start(&ns, LLM);
    let agent = Agent::start(&limited_policy(
        &cg,
        "",
        "connections_per_second = 50\nburst = 10",
    ));
    let p = probe();
    // Four processes of `bot` try 200 connections a second each (800/s in
    // all) for 10 s; `free` tries at the same time.
    const MS: u64 = 10_000;
    let runs: Vec<_> = (0..4)
        .map(|_| p.spawn_connect_for(&bot, &ns, LLM, MS, 5_000))
        .collect();
    let free_run = p.spawn_connect_for(&free, &ns, LLM, MS, 5_000);
    let reports: Vec<_> = runs.into_iter().map(|r| r.wait_connect_for()).collect();
    let free_report = free_run.wait_connect_for();

    let ok: u64 = reports.iter().map(|r| r.ok).sum();
    let eperm: u64 = reports.iter().map(|r| r.eperm).sum();
    let attempts = ok + eperm;
    // The bucket starts full (burst), then refills at the rate for as long
    // as the clients ran.
    let span = reports
        .iter()
        .map(|r| r.elapsed.as_secs_f64())
        .fold(0.0, f64::max);
    let expected = 10.0 + 50.0 * span;
    let error = (ok as f64 - expected) / expected;
    println!(
        "connection rate: {ok} allowed of {attempts} attempts over {span:.2} s by 4 processes; expected {expected:.0}; error {:+.2}%",
        error * 100.0
    );
    assert!(
        reports.iter().all(|r| r.other_failures == 0),
        "failures other than EPERM: {reports:?}\n{}",
        agent.context()
    );
    assert!(
        attempts as f64 > 4.0 * expected,
        "the clients did not try hard enough to test the limit: {attempts} attempts"
    );
    assert!(
        error.abs() <= RATE_TOLERANCE,
        "{ok} connections allowed, expected {expected:.0} ± {}%\n{}",
        RATE_TOLERANCE * 100.0,
        agent.context()
    );
    assert_eq!(
        free_report.eperm, 0,
        "the unlimited workload was limited: {free_report:?}"
    );
    assert!(free_report.ok > 0, "{free_report:?}");
    // What was allowed reached the server; what was refused is counted.
    let served = (ok + free_report.ok) as usize;
    assert_eq!(
        server.wait_for_count(served, Duration::from_secs(5)),
        served,
        "server accepts vs allowed connects"
    );
    let labels = [
        ("workload", "bot"),
        ("provider", "test-llm"),
        ("limit", "connections"),
        ("verdict", "deny"),
    ];
    agent.expect_metric(
        "llm_egress_rate_limited_total",
        &labels,
        |v| v == eperm as f64,
        Duration::from_secs(5),
    );
    let e = wait_event(&agent, "a rate_limited decision", |e| {
        e["reason"] == "rate_limited" && e["workload"] == "bot"
    });
    assert_eq!(e["verdict"], "deny");
    assert_eq!(e["provider"], "test-llm");
}

#[test]
fn audit_mode_reports_would_be_rate_limiting_without_refusing() {
    require_root();
    let cg = CgroupGuard::new("limit-audit");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let _server = TcpServer::start(&ns, LLM);
    let agent = Agent::start(&limited_policy(
        &cg,
        "mode = \"audit\"",
        "connections_per_second = 1\nburst = 2",
    ));
    let r = probe().connect_for(&bot, &ns, LLM, 1_000, 20_000);
    assert_eq!(r.eperm, 0, "audit mode refused connections: {r:?}");
    assert!(r.ok >= 20, "{r:?}");
    agent.expect_metric(
        "llm_egress_rate_limited_total",
        &[
            ("workload", "bot"),
            ("limit", "connections"),
            ("verdict", "audit"),
        ],
        |v| v >= (r.ok - 3) as f64,
        Duration::from_secs(5),
    );
    let e = wait_event(&agent, "an audited rate_limited decision", |e| {
        e["reason"] == "rate_limited"
    });
    assert_eq!(e["verdict"], "audit");
}

#[test]
fn connection_limits_follow_a_reload() {
    require_root();
    let cg = CgroupGuard::new("limit-reload");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let _server = TcpServer::start(&ns, LLM);
    let agent = Agent::start(&limited_policy(&cg, "", ""));
    let p = probe();
    let r = p.connect_for(&bot, &ns, LLM, 500, 10_000);
    assert_eq!(r.eperm, 0, "no limits yet: {r:?}");

    let generation = agent.generation();
    agent.rewrite_policy(&limited_policy(
        &cg,
        "",
        "connections_per_second = 2\nburst = 2",
    ));
    agent.wait_for_generation_after(generation);
    let r = p.connect_for(&bot, &ns, LLM, 1_000, 10_000);
    assert!(
        r.ok <= 5 && r.eperm > 0,
        "2/s with a burst of 2 allows at most ~4 in a second: {r:?}"
    );

    agent.rewrite_policy(&limited_policy(&cg, "", ""));
    agent.wait_for_generation_after(generation + 1);
    let r = p.connect_for(&bot, &ns, LLM, 500, 10_000);
    assert_eq!(r.eperm, 0, "limits removed by the reload: {r:?}");
}

/// An OpenAI-compatible provider at 192.0.2.1:443 with workloads `bot`
/// (token budget `budget`) and `other`.
fn budget_policy(cg: &CgroupGuard, budget: &str) -> String {
    policy(
        cg,
        "",
        &format!(
            r#"{FAKE_OPENAI}
[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["openai"]
[workloads.limits]
{budget}

[[workloads]]
name = "other"
cgroup = "other"
allow = ["openai"]
"#
        ),
    )
}

#[test]
fn a_token_budget_spent_by_streams_refuses_new_connections_and_survives_a_restart() {
    require_root();
    let cg = CgroupGuard::new("limit-budget");
    let (bot, other) = (cg.child("bot"), cg.child("other"));
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, "192.0.2.1:443", Flavor::OpenAi);
    let mut agent = Agent::start(&budget_policy(
        &cg,
        "tokens_per_minute = 300\ntokens_per_day = 1000000",
    ));
    let p = probe();
    // Within the budget: the first stream is allowed...
    expect_200(stream_chat(&server, &bot, &ns, 400));
    // ...and spends more than the minute's 300 tokens.
    let labels = [
        ("workload", "bot"),
        ("provider", "openai"),
        ("window", "minute"),
    ];
    agent.expect_metric(
        "llm_egress_budget_remaining",
        &labels,
        |v| v < 0.0,
        Duration::from_secs(10),
    );
    let spent = wait_event(&agent, "the budget record", |e| {
        e["event"] == "budget" && e["state"] == "spent"
    });
    assert_eq!(spent["workload"], "bot");
    assert_eq!(spent["provider"], "openai");
    assert_eq!(spent["limit"], "tokens_per_minute");
    assert!(spent["remaining_minute"].as_i64().unwrap() < 0, "{spent}");

    expect_eperm(
        &agent,
        p.connect(&bot, &ns, "192.0.2.1:443"),
        "bot after spending its budget",
    );
    expect_ok(
        &agent,
        p.connect(&other, &ns, "192.0.2.1:443"),
        "another workload of the same provider",
    );
    let e = wait_event(&agent, "a token_budget decision", |e| {
        e["reason"] == "token_budget"
    });
    assert_eq!(e["workload"], "bot");
    agent.expect_metric(
        "llm_egress_rate_limited_total",
        &[
            ("workload", "bot"),
            ("provider", "openai"),
            ("limit", "tokens_per_minute"),
            ("verdict", "deny"),
        ],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );

    // A clean restart (which detaches and unpins everything, BUDGET_SPENT
    // too) keeps the debt in state_dir, and the new agent refuses from its
    // first moment.
    agent.stop();
    agent.restart_same();
    expect_eperm(
        &agent,
        p.connect(&bot, &ns, "192.0.2.1:443"),
        "bot right after a restart",
    );
    let left = metric(&agent, "llm_egress_budget_remaining", &labels);
    assert!(left < 0.0, "budget after restart: {left}");
}

/// The accuracy issue 5 asks of bandwidth limits.
const BANDWIDTH_TOLERANCE: f64 = 0.10;

#[test]
fn bandwidth_limits_hold_uploads_and_downloads_near_the_rate() {
    require_root();
    let cg = CgroupGuard::new("limit-bw");
    let (bot, free) = (cg.child("bot"), cg.child("free"));
    let ns = NetnsGuard::new();
    let agent = Agent::start(&limited_policy(&cg, "", "bytes_per_second = 2_000_000"));
    let p = probe();
    const MS: u64 = 8_000;
    let rate = 2_000_000.0;
    // Throughput in steady state, after socket buffers have filled (what a
    // client wrote or a server queued in the first instant is not what
    // crossed): an upload by the sink's byte count between 1.5 s and 7.5 s
    // of an 8 s transfer, a download by what the clients read after their
    // first 1.5 s.
    let check = |what: &str, runs: Vec<SpawnedProbe>, sink: Option<&ByteServer>| {
        let window = sink.map(|s| {
            std::thread::sleep(Duration::from_millis(1_500));
            let (b0, t0) = (s.bytes(), Instant::now());
            std::thread::sleep(Duration::from_secs(6));
            (s.bytes() - b0, t0.elapsed())
        });
        let reports: Vec<TransferReport> = runs
            .into_iter()
            .map(|run| {
                run.wait_transfer()
                    .unwrap_or_else(|e| panic!("{what}: errno {e}\n{}", agent.context()))
            })
            .collect();
        let (bytes, time) = window.unwrap_or_else(|| {
            let steady: Vec<_> = reports.iter().filter_map(|r| r.steady).collect();
            assert_eq!(steady.len(), reports.len(), "{what}: {reports:?}");
            let secs = steady.iter().map(|(_, t)| t.as_secs_f64()).sum::<f64>();
            (
                steady.iter().map(|(b, _)| b).sum(),
                Duration::from_secs_f64(secs / steady.len() as f64),
            )
        });
        let got = bytes as f64 / time.as_secs_f64();
        let error = (got - rate) / rate;
        let retrans: u32 = reports.iter().map(|r| r.retrans).sum();
        println!(
            "{what}: {got:.0} bytes/s of payload in steady state (limit {rate:.0} bytes/s of IP packets): error {:+.1}%; {retrans} retransmissions seen by the client, rtt {} µs",
            error * 100.0,
            reports[0].rtt_us
        );
        assert!(
            error.abs() <= BANDWIDTH_TOLERANCE,
            "{what} ran at {got:.0} bytes/s, expected {rate:.0} ± {}%\n{}",
            BANDWIDTH_TOLERANCE * 100.0,
            agent.context()
        );
    };
    // The provider has one address and port in the test namespace: a sink
    // for the uploads, then a source for the downloads.
    {
        let sink = ByteServer::sink(&ns, LLM);
        check(
            "upload",
            vec![p.spawn_upload(&bot, &ns, LLM, MS)],
            Some(&sink),
        );
        // Three connections of the pair share its rate.
        let runs = (0..3).map(|_| p.spawn_upload(&bot, &ns, LLM, MS)).collect();
        check("upload, 3 connections", runs, Some(&sink));
    }
    {
        let _source = ByteServer::source(&ns, LLM);
        check("download", vec![p.spawn_download(&bot, &ns, LLM, MS)], None);
        let runs = (0..3)
            .map(|_| p.spawn_download(&bot, &ns, LLM, MS))
            .collect();
        check("download, 3 connections", runs, None);
    }
    // Another workload of the same provider is not held to bot's limit.
    let _sink = ByteServer::sink(&ns, LLM);
    let free_up = p
        .upload(&free, &ns, LLM, 1_000)
        .unwrap_or_else(|e| panic!("free upload: errno {e}"));
    assert!(
        free_up.rate() > 5.0 * rate,
        "the unlimited workload was slowed: {:.0} bytes/s",
        free_up.rate()
    );
    // Dropped packets are counted per direction: the download is held
    // only by drops; the paced upload needs none.
    let dropped = agent.expect_metric(
        "llm_egress_rate_limited_total",
        &[
            ("workload", "bot"),
            ("limit", "bandwidth_in"),
            ("verdict", "deny"),
        ],
        |v| v > 0.0,
        Duration::from_secs(5),
    );
    let dropped_out = metric(
        &agent,
        "llm_egress_rate_limited_total",
        &[
            ("workload", "bot"),
            ("limit", "bandwidth_out"),
            ("verdict", "deny"),
        ],
    );
    println!("packets dropped: {dropped} received, {dropped_out} sent");
}

#[test]
fn each_provider_has_its_own_bucket_and_overrides_replace_workload_limits() {
    require_root();
    let cg = CgroupGuard::new("limit-override");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let _llm = TcpServer::start(&ns, LLM);
    let _other = TcpServer::start(&ns, "192.0.2.1:8443");
    let _third = TcpServer::start(&ns, "198.51.100.1:8443");
    let agent = Agent::start(&policy(
        &cg,
        "",
        &format!(
            r#"{PROVIDER}
[[providers]]
name = "other-llm"
cidrs = ["192.0.2.0/24"]
ports = [8443]

[[providers]]
name = "third-llm"
cidrs = ["198.51.100.0/24"]
ports = [8443]

[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm", "other-llm", "third-llm"]
[workloads.limits]
connections_per_second = 2
burst = 2
[workloads.limits.providers.other-llm]
connections_per_second = 1000
burst = 1000
"#
        ),
    ));
    let p = probe();
    // test-llm and third-llm each get the workload's 2/s from a bucket of
    // their own: using up one leaves the other full.
    let llm = p.connect_for(&bot, &ns, LLM, 1_000, 10_000);
    let third = p.connect_for(&bot, &ns, "198.51.100.1:8443", 1_000, 10_000);
    // other-llm's override: 1000/s, far above what 100 tries a second need.
    let other = p.connect_for(&bot, &ns, "192.0.2.1:8443", 1_000, 10_000);
    for (what, r) in [("test-llm", &llm), ("third-llm", &third)] {
        assert!(
            r.eperm > 0 && (2..=5).contains(&r.ok),
            "{what}: 2/s with a burst of 2 allows 2 + ~2 in a second: {r:?}\n{}",
            agent.context()
        );
    }
    assert_eq!(
        other.eperm, 0,
        "other-llm's override must replace the workload's rate: {other:?}"
    );
    assert!(other.ok >= 50, "{other:?}");
    agent.expect_metric(
        "llm_egress_rate_limited_total",
        &[
            ("workload", "bot"),
            ("provider", "third-llm"),
            ("limit", "connections"),
        ],
        |v| v == third.eperm as f64,
        Duration::from_secs(5),
    );
}

/// A keep-alive client (Python's http.client over TLS): one chat request,
/// then it waits for `go` to exist and sends a second request on the same
/// connection; prints `first 200` and then `second 200` or `second error
/// <exception> <seconds>`.
const KEEP_ALIVE_CLIENT: &str = r#"
import http.client, json, os, socket, ssl, sys, time
ip, host, ca, go = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
class Conn(http.client.HTTPSConnection):
    def connect(self):
        self.sock = ctx.wrap_socket(socket.create_connection((ip, 443), timeout=30), server_hostname=host)
c = Conn(host, 443, context=ctx, timeout=30)
body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
hdrs = {"Content-Type": "application/json", "Authorization": "Bearer sk-test"}
c.request("POST", "/v1/chat/completions", body, hdrs)
r = c.getresponse(); r.read()
print("first", r.status, flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
t = time.monotonic()
try:
    c.request("POST", "/v1/chat/completions", body, hdrs)
    r = c.getresponse(); r.read()
    print("second", r.status, flush=True)
except Exception as e:
    print("second error", type(e).__name__, round(time.monotonic() - t, 2), flush=True)
"#;

#[test]
fn a_spent_budget_stops_the_open_keep_alive_connections_of_the_workload() {
    require_root();
    let cg = CgroupGuard::new("limit-keepalive");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let server = fake_provider::start(&ns, "192.0.2.1:443", Flavor::OpenAi);
    let agent = Agent::start(&budget_policy(&cg, "tokens_per_minute = 300"));
    let dir = llm_egress_tests::TempDir::new("llm-egress-test-keepalive");
    let go = dir.path().join("go");
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", KEEP_ALIVE_CLIENT, "192.0.2.1", server.host()])
        .arg(server.ca_file())
        .arg(&go)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    llm_egress_tests::probe::confine(&mut cmd, &bot, &ns);
    let client = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"));
    // Its first request is served; then another connection of the
    // workload spends the budget.
    llm_egress_tests::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (server.served().len() == 1).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the keep-alive client's first request never arrived\n{}",
            agent.context()
        )
    });
    expect_200(stream_chat(&server, &bot, &ns, 400));
    agent.expect_metric(
        "llm_egress_budget_remaining",
        &[
            ("workload", "bot"),
            ("provider", "openai"),
            ("window", "minute"),
        ],
        |v| v < 0.0,
        Duration::from_secs(10),
    );
    // Now the open connection's next request must not reach the provider.
    std::fs::write(&go, b"").expect("touch go");
    let out = client
        .wait_with_output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("keep-alive client: {}", text.trim().replace('\n', "; "));
    assert!(
        text.contains("first 200"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("second error"),
        "the second request on the open connection must fail: {text}\n{}",
        agent.context()
    );
    assert_eq!(
        server.served().len(),
        2,
        "the provider must have served the first request and the stream only"
    );
    agent.expect_metric(
        "llm_egress_budget_stopped_connections_total",
        &[],
        |v| v >= 1.0,
        Duration::from_secs(5),
    );
}
