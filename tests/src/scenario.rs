//! What the agent tests share: policy text for a test cgroup, the probe,
//! and checks that panic with the agent's context (stderr, audit log).
//!
//! Every policy made here has `[resolver] servers` on loopback
//! ([`DEAD_DNS`] unless a test runs its own DNS server), so no test makes
//! the agent ask the machine's resolver.
//!
//! Locals of a test are declared cgroup, netns, servers, agent, so they drop
//! in the reverse order: the agent stops before its cgroup goes.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Agent, CgroupGuard, NetnsGuard, Probe, TcpServer, probe::describe, toml_str};

/// Where the agent resolves provider hostnames: a loopback port nothing
/// listens on, so no test makes the agent send DNS anywhere else.
pub const DEAD_DNS: &str = "127.0.0.1:9";
/// How long to wait for events and metrics that follow a decision.
pub const EVENT_WAIT: Duration = Duration::from_secs(5);
/// How long to wait for reloads.
pub const RELOAD_WAIT: Duration = Duration::from_secs(5);
/// The promise for cgroups made after the agent started.
pub const NEW_CGROUP_WAIT: Duration = Duration::from_secs(2);
/// Time for late arrivals before an "exactly N" check.
pub const SETTLE: Duration = Duration::from_millis(300);

/// The `egress-probe` built with the tests.
pub fn probe() -> Probe {
    Probe::beside_test_exe()
}

/// A policy for the test cgroup `cg`: `top` holds extra top-level keys
/// (`mode = "audit"`), `body` the tables ([defaults], [[providers]],
/// [[workloads]]). The resolver is [`DEAD_DNS`].
pub fn policy(cg: &CgroupGuard, top: &str, body: &str) -> String {
    policy_with_dns(cg, top, DEAD_DNS, body)
}

/// [`policy`] with the resolver `dns` ("127.0.0.1:5353"), which must be a
/// loopback server the test runs.
pub fn policy_with_dns(cg: &CgroupGuard, top: &str, dns: &str, body: &str) -> String {
    assert!(
        dns.starts_with("127.") || dns.starts_with("[::1]"),
        "test policies only name loopback DNS servers, not {dns}"
    );
    format!(
        "{top}\ncgroup = {}\n\n[resolver]\nservers = [{}]\n\n{body}",
        toml_str(&cg.path().display().to_string()),
        toml_str(dns)
    )
}

/// A policy for one workload `w` in cgroup `w` that may reach 192.0.2.0/24
/// and nothing else that is not a provider.
pub fn only_192_policy(cg: &CgroupGuard, top: &str) -> String {
    policy(
        cg,
        top,
        r#"
[defaults]
llm = "deny"
other = "allow"

[[workloads]]
name = "w"
cgroup = "w"
allow = ["192.0.2.0/24"]
other = "deny"
"#,
    )
}

/// Workload `w` may reach both 192.0.2.0/24 and 198.51.100.0/24: the
/// "before" of the reload tests.
pub fn both_allowed_policy(cg: &CgroupGuard) -> String {
    policy(
        cg,
        "",
        r#"
[[workloads]]
name = "w"
cgroup = "w"
allow = ["192.0.2.0/24", "198.51.100.0/24"]
other = "deny"
"#,
    )
}

/// `[defaults]` and the provider `test-llm` (10.20.0.0/16, port 8443) of
/// the provider tests; append `[[workloads]]`.
pub const PROVIDER: &str = r#"
[defaults]
llm = "deny"
other = "allow"

[[providers]]
name = "test-llm"
cidrs = ["10.20.0.0/16"]
ports = [8443]
"#;

/// The provider `openai` at the address of a [`crate::fake_provider`]
/// OpenAI server on 192.0.2.1:443; append `[[workloads]]`.
pub const FAKE_OPENAI: &str = r#"
[[providers]]
name = "openai"
hosts = ["api.openai.com"]
cidrs = ["192.0.2.0/24"]
ports = [443]
"#;

/// Panics unless `r` is a success.
#[track_caller]
pub fn expect_ok(agent: &Agent, r: Result<(), i32>, what: &str) {
    if r.is_err() {
        panic!(
            "{what}: expected the connection to be allowed, got {}\n{}",
            describe(&r),
            agent.context()
        );
    }
}

/// Panics unless `r` failed with EPERM (the agent's deny).
#[track_caller]
pub fn expect_eperm(agent: &Agent, r: Result<(), i32>, what: &str) {
    if r != Err(libc::EPERM) {
        panic!(
            "{what}: expected EPERM from the agent's policy, got {}\n{}",
            describe(&r),
            agent.context()
        );
    }
}

/// Polls `connect` from `cgroup` to `addr` until it fails with EPERM, for at
/// most `timeout` from `since`; panics otherwise.
#[track_caller]
pub fn expect_eperm_within(
    agent: &Agent,
    cgroup: &Path,
    ns: &NetnsGuard,
    addr: &str,
    since: Instant,
    timeout: Duration,
    what: &str,
) {
    let p = probe();
    let mut last = Ok(());
    while since.elapsed() < timeout {
        last = p.connect(cgroup, ns, addr);
        if last == Err(libc::EPERM) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "{what}: no EPERM within {timeout:?} (last result: {})\n{}",
        describe(&last),
        agent.context()
    );
}

/// Waits until the server saw `n` connections, then checks it saw no more.
#[track_caller]
pub fn expect_server_count(server: &TcpServer, n: usize, what: &str) {
    server.wait_for_count(n, EVENT_WAIT);
    std::thread::sleep(SETTLE);
    let got = server.count();
    assert_eq!(
        got,
        n,
        "{what}: the server at {} accepted {got} connections, expected {n}",
        server.addr()
    );
}

/// The audit events so far, one JSON object a line, for messages.
pub fn events_text(agent: &Agent) -> String {
    agent
        .audit_events()
        .iter()
        .map(Value::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first audit event matching `pred` within [`EVENT_WAIT`]; panics
/// with the events seen when there is none.
#[track_caller]
pub fn wait_event(agent: &Agent, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    agent.wait_for_audit(pred, EVENT_WAIT).unwrap_or_else(|| {
        panic!(
            "no audit event {what} within {EVENT_WAIT:?}; events so far:\n{}\n{}",
            events_text(agent),
            agent.context()
        )
    })
}

/// Waits up to `timeout` until `metric_value(name, labels)` is at least
/// `min` and returns it; panics with the metrics and the agent's context
/// otherwise.
#[track_caller]
pub fn expect_metric_at_least(
    agent: &Agent,
    name: &str,
    labels: &[(&str, &str)],
    min: f64,
    timeout: Duration,
    what: &str,
) -> f64 {
    let last = agent.wait_for_metric(name, labels, min, timeout);
    match last {
        Some(v) if v >= min => v,
        _ => panic!(
            "{what}: {name}{labels:?} should reach {min} within {timeout:?}, it is {last:?}\n--- /metrics ---\n{}\n{}",
            agent.metrics(),
            agent.context()
        ),
    }
}

/// The providers `openai` (192.0.2.1) and `anthropic` (198.51.100.1) on
/// port 443 of the plaintext and exact-token tests (their fakes listen
/// there), workload `bot` (cgroup `bot`) with `exact_tokens = true` and
/// `plain` (cgroup `plain`) without, then `extra` (more tables).
pub fn exact_tokens_policy(cg: &CgroupGuard, extra: &str) -> String {
    policy(
        cg,
        "",
        &format!(
            r#"
[[providers]]
name = "openai"
hosts = ["api.openai.com"]
cidrs = ["192.0.2.1/32"]
ports = [443]

[[providers]]
name = "anthropic"
hosts = ["api.anthropic.com"]
cidrs = ["198.51.100.1/32"]
ports = [443]

[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["openai", "anthropic"]
exact_tokens = true

[[workloads]]
name = "plain"
cgroup = "plain"
allow = ["openai", "anthropic"]
{extra}"#
        ),
    )
}
