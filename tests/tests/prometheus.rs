//! A real Prometheus server scrapes a real agent: the exposition parses
//! (promtool and the server), and PromQL answers with the per-workload
//! numbers the test's traffic made.

use std::{process::Command, time::Duration};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer,
    prometheus::Prometheus,
    require_root,
    scenario::{policy, probe},
};

#[test]
fn prometheus_answers_per_workload_numbers_and_promtool_accepts_the_metrics() {
    require_root();
    let cg = CgroupGuard::new("prom");
    let (a, b) = (cg.child("a"), cg.child("b"));
    let netns = NetnsGuard::new();
    let _server = TcpServer::start(&netns, "10.20.0.1:8443");
    let text = policy(
        &cg,
        "",
        r#"[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]
ports = [8443]
[[workloads]]
name = "alpha"
cgroup = "a"
allow = ["test-llm"]
[[workloads]]
name = "beta"
cgroup = "b"
"#,
    );
    let agent = Agent::start(&text);
    let p = probe();
    for _ in 0..3 {
        assert!(
            p.connect(&a, &netns, "10.20.0.1:8443").is_ok(),
            "alpha may reach test-llm\n{}",
            agent.context()
        );
    }
    for _ in 0..2 {
        assert_eq!(
            p.connect(&b, &netns, "10.20.0.1:8443"),
            Err(libc::EPERM),
            "beta may not\n{}",
            agent.context()
        );
    }

    // promtool lints the exposition format of what the agent serves.
    let exposition = agent.metrics();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    if let Some(mut stdin) = lint.stdin.take() {
        use std::io::Write;
        stdin
            .write_all(exposition.as_bytes())
            .unwrap_or_else(|e| panic!("promtool stdin: {e}"));
    }
    let out = lint
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prom = Prometheus::start(agent.metrics_addr());
    let wait = Duration::from_secs(30);
    let allowed = prom.wait_value(
        r#"sum(llm_egress_connections_total{workload="alpha",provider="test-llm",verdict="allow"})"#,
        wait,
        |v| v == 3.0,
    );
    assert_eq!(
        allowed,
        Some(3.0),
        "alpha's 3 allowed connections via PromQL\n{}",
        prom.log()
    );
    let denied = prom.wait_value(
        r#"sum by (workload) (llm_egress_connections_total{verdict="deny",provider="test-llm"})"#,
        wait,
        |v| v == 2.0,
    );
    assert_eq!(denied, Some(2.0), "beta's 2 denies via PromQL");
    let per_process = prom.wait_value(
        r#"sum(llm_egress_process_connections_total{workload="alpha",process="egress-probe"})"#,
        wait,
        |v| v == 3.0,
    );
    assert_eq!(per_process, Some(3.0), "per-process series via PromQL");
    let by_workload = prom
        .query(r#"sum by (workload) (llm_egress_connections_total{provider="test-llm"})"#)
        .unwrap_or_else(|e| panic!("{e}"));
    let workloads: Vec<String> = by_workload
        .iter()
        .filter_map(|r| r["metric"]["workload"].as_str().map(str::to_string))
        .collect();
    assert!(
        workloads.contains(&"alpha".to_string()) && workloads.contains(&"beta".to_string()),
        "{by_workload:?}"
    );
}
