//! `llm-egress status`: what it shows is what the running agent counted.
//!
//! A real agent judges real connects of `egress-probe` processes in two
//! workloads; `llm-egress status --once --json` and `--once` (the table)
//! then read the agent's /metrics and must show the same numbers per
//! workload, provider and verdict. Needs root and a built agent, like the
//! other integration tests.

use std::{
    io::{Read, Write},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, Probe, TcpServer, agent::free_loopback_port, agent_bin,
    probe::describe, require_root, toml_str, wait_until,
};
use serde_json::Value;

const METRIC_WAIT: Duration = Duration::from_secs(5);

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_egress-probe"))
}

fn status(args: &[&str]) -> (Output, String) {
    let bin = agent_bin();
    let out = Command::new(&bin)
        .arg("status")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} status: {e}", bin.display()));
    let text = format!(
        "`llm-egress status {}` exited {}\nstdout:\n{}\nstderr:\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

/// The JSON row of `workload` × `provider`.
fn row<'a>(doc: &'a Value, workload: &str, provider: &str, text: &str) -> &'a Value {
    doc["rows"]
        .as_array()
        .unwrap_or_else(|| panic!("status JSON has no `rows` array:\n{text}"))
        .iter()
        .find(|r| r["workload"] == workload && r["provider"] == provider)
        .unwrap_or_else(|| panic!("status JSON has no row {workload} × {provider}:\n{text}"))
}

#[test]
fn status_shows_the_agents_counts_per_workload_provider_and_verdict() {
    require_root();
    let cg = CgroupGuard::new("status");
    let (bot, batch) = (cg.child("bot"), cg.child("batch"));
    let ns = NetnsGuard::new();
    let _llm = TcpServer::start(&ns, "10.20.0.1:443");
    let agent = Agent::start(&format!(
        r#"mode = "enforce"
cgroup = {}

[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]
ports = [443]

[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["test-llm"]

[[workloads]]
name = "batch"
cgroup = "batch"
deny = ["test-llm"]
"#,
        toml_str(&cg.path().display().to_string())
    ));
    let p = probe();
    for i in 0..3 {
        let r = p.connect(&bot, &ns, "10.20.0.1:443");
        assert!(
            r.is_ok(),
            "bot → test-llm #{i}: expected allowed, got {}\n{}",
            describe(&r),
            agent.context()
        );
    }
    for i in 0..2 {
        let r = p.connect(&batch, &ns, "10.20.0.1:443");
        assert_eq!(
            r,
            Err(libc::EPERM),
            "batch → test-llm #{i}: expected EPERM, got {}\n{}",
            describe(&r),
            agent.context()
        );
    }
    let counted = |w: &str, v: &str, n: f64| {
        let got = agent.wait_for_metric(
            "llm_egress_connections_total",
            &[("workload", w), ("provider", "test-llm"), ("verdict", v)],
            n,
            METRIC_WAIT,
        );
        assert_eq!(
            got,
            Some(n),
            "the agent's own /metrics should count {n} {v} for {w} × test-llm\n{}",
            agent.context()
        );
    };
    counted("bot", "allow", 3.0);
    counted("batch", "deny", 2.0);

    let url = format!("http://{}", agent.metrics_addr());
    let (out, text) = status(&["--once", "--json", "--metrics", &url]);
    assert!(out.status.success(), "{text}");
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json did not print JSON ({e}):\n{text}"));
    assert_eq!(doc["endpoint"], url.as_str(), "{text}");
    assert_eq!(doc["ready"], true, "{text}");
    let bot_row = row(&doc, "bot", "test-llm", &text);
    assert_eq!(bot_row["connections"]["allow"], 3, "{text}");
    assert_eq!(bot_row["connections"]["deny"], 0, "{text}");
    assert_eq!(bot_row["connections"]["audit"], 0, "{text}");
    let batch_row = row(&doc, "batch", "test-llm", &text);
    assert_eq!(batch_row["connections"]["deny"], 2, "{text}");
    assert_eq!(batch_row["connections"]["allow"], 0, "{text}");
    // Columns of metrics the agent may not export (yet): null, or a count.
    for col in [
        "bytes_sent",
        "bytes_received",
        "active_connections",
        "tokens_estimated",
        "rate_limited",
    ] {
        assert!(
            bot_row[col].is_null() || bot_row[col].is_u64(),
            "{col}: {text}"
        );
    }
    let a = &doc["agent"];
    assert_eq!(a["policy_generation"], agent.generation(), "{text}");
    assert!(a["decisions"]["deny"].as_u64() >= Some(2), "{text}");
    assert!(a["decisions"]["allow"].as_u64() >= Some(3), "{text}");
    assert_eq!(a["events_lost"], 0, "{text}");
    assert_eq!(a["workload_cgroups"]["bot"], 1, "{text}");
    assert_eq!(a["version"], env!("CARGO_PKG_VERSION"), "{text}");

    // The table: one line per pair, with the same numbers.
    let (out, text) = status(&["--once", "--metrics", &url]);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .next()
            .is_some_and(|l| l.contains(&url) && l.contains("ready")),
        "{text}"
    );
    let cells = |w: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.split_whitespace().take(2).eq([w, "test-llm"]))
            .unwrap_or_else(|| panic!("no table line for {w} × test-llm:\n{text}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        cells("bot")[2..5],
        ["3", "0", "0"],
        "ALLOW DENY AUDIT of bot:\n{text}"
    );
    assert_eq!(
        cells("batch")[2..5],
        ["0", "2", "0"],
        "ALLOW DENY AUDIT of batch:\n{text}"
    );
    let tokens = &cells("bot")[9];
    assert!(
        tokens == "-" && bot_row["tokens_estimated"].is_null()
            || tokens.parse::<u64>().ok() == bot_row["tokens_estimated"].as_u64(),
        "TOKENS of bot: `-` when not exported, else the JSON's count:\n{text}"
    );
    assert!(
        stdout.contains("policy generation") && stdout.contains("events lost 0"),
        "{text}"
    );
    live_view_draws_frames_and_q_quits(&url);
}

/// The live view on a real terminal (a pty from util-linux `script`):
/// frames are drawn in place with CR-LF line ends (raw mode), and `q`
/// quits at once, showing the cursor again.
fn live_view_draws_frames_and_q_quits(url: &str) {
    let cmd = format!(
        "{} status --metrics {url} --interval 0.2",
        agent_bin().display()
    );
    let mut child = Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run `script` (util-linux): {e}"));
    let out = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let (out, mut stdout) = (out.clone(), child.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let frames = || text().matches("refreshing every 0.2 s").count();
    let drew = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (frames() >= 2).then_some(())
    });
    assert!(
        drew.is_some(),
        "the live view should redraw every 0.2 s:\n{}",
        text()
    );
    let asked = Instant::now();
    child.stdin.as_mut().unwrap().write_all(b"q").unwrap();
    let status = wait_until(Duration::from_secs(5), Duration::from_millis(20), || {
        child.try_wait().ok().flatten()
    });
    let Some(status) = status else {
        let _ = child.kill();
        panic!("`q` did not end the live view within 5 s:\n{}", text());
    };
    let quit_after = asked.elapsed();
    reader.join().unwrap();
    let shown = text();
    assert!(
        status.success(),
        "the live view exits 0 on `q` ({status}):\n{shown}"
    );
    assert!(
        quit_after < Duration::from_secs(1),
        "`q` quits at once, not at the next frame: {quit_after:?}"
    );
    assert!(
        shown.contains("policy generation"),
        "frames show the agent's health:\n{shown}"
    );
    assert!(
        shown.contains("\r\nrefreshing every 0.2 s; q or Ctrl-C quits\r\n"),
        "raw mode: every line ends in CR-LF:\n{shown:?}"
    );
    assert!(
        shown.contains("\x1b[?25l") && shown.trim_end().ends_with("\x1b[?25h"),
        "the cursor is hidden while drawing and shown again at the end:\n{shown:?}"
    );
}

#[test]
fn status_names_the_endpoint_when_no_agent_answers() {
    let url = format!("http://127.0.0.1:{}", free_loopback_port());
    for args in [
        vec!["--once", "--metrics", url.as_str()],
        vec!["--json", "--metrics", url.as_str()],
    ] {
        let (out, text) = status(&args);
        assert!(!out.status.success(), "{text}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&url) && stderr.contains("refused"),
            "the error should name {url} and why:\n{text}"
        );
        assert!(out.stdout.is_empty(), "nothing on stdout:\n{text}");
    }
}
