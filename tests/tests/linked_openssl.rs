//! OpenSSL linked into the client's executable, found by symbol
//! (docs/plaintext.md, "Which clients are visible"), end to end: a C
//! client built by the test against Debian's libssl.a/libcrypto.a (no
//! shared libssl: `readelf -d` checks it) posts a chat completion to the
//! fake OpenAI provider from a workload with `exact_tokens = true`. The
//! agent finds `SSL_write`/`SSL_read`(`_ex`) in the client's `.symtab`,
//! attaches by file offset, and counts the request exactly: the exact
//! counts must equal the fake's usage, with no estimate. A stripped copy
//! of the same client has no symbols: it stays invisible and is counted
//! as such. Node.js (when installed) is a second linked-in OpenSSL, found
//! in its `.dynsym`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TempDir,
    fake_provider::{self, FakeProvider, Flavor},
    openssl_static,
    probe::confine,
    require_root,
    scenario::exact_tokens_policy,
};

const CHAT: &str = r#"{"model":"gpt-4o-mini","max_tokens":40,"messages":[{"role":"user","content":"count me from a static client"}]}"#;

/// `exe` (the C client) posting [`CHAT`] to `server` from `cgroup`.
fn post(exe: &Path, server: &FakeProvider, cgroup: &Path, ns: &NetnsGuard) -> String {
    let mut cmd = Command::new(exe);
    cmd.arg(server.addr().ip().to_string())
        .arg(server.addr().port().to_string())
        .arg(server.host())
        .arg(server.ca_file())
        .args(["/v1/chat/completions", CHAT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    confine(&mut cmd, cgroup, ns);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    assert!(
        out.status.success(),
        "{}: {}",
        exe.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text
}

/// Waits until `server` recorded `n` requests; what it served.
fn served(server: &FakeProvider, n: usize) -> Vec<fake_provider::Served> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.served().len() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = server.served();
    assert_eq!(s.len(), n, "the fake served {} requests, not {n}", s.len());
    s
}

/// Waits up to 10 s for the metric to reach `want`; its value.
fn wait_metric(agent: &Agent, name: &str, labels: &[(&str, &str)], want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = agent.metric_value(name, labels).unwrap_or(0.0);
        if v == want || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tokens(agent: &Agent, kind: &str, source: &str) -> f64 {
    agent
        .metric_value(
            "llm_egress_tokens_total",
            &[
                ("workload", "bot"),
                ("provider", "openai"),
                ("kind", kind),
                ("source", source),
            ],
        )
        .unwrap_or(0.0)
}

#[test]
fn a_client_with_openssl_linked_in_is_counted_exactly_and_its_stripped_copy_is_not_visible() {
    require_root();
    let cg = CgroupGuard::new("lo-static");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let openai = fake_provider::start(&ns, "192.0.2.1:443", Flavor::OpenAi);
    let dir = TempDir::new("lo");
    let (exe, stripped) = openssl_static::build(dir.path());
    let mut agent = Agent::launch(&exact_tokens_policy(&cg, ""));
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);

    // The linked client: found by symbol, counted exactly.
    post(&exe, &openai, &bot, &ns);
    let first = served(&openai, 1);
    let (prompt, completion) = (first[0].usage.prompt, first[0].usage.completion);
    assert!(prompt > 0 && completion > 0);
    for (kind, want) in [("prompt", prompt), ("completion", completion)] {
        let labels = [
            ("workload", "bot"),
            ("provider", "openai"),
            ("kind", kind),
            ("source", "exact"),
        ];
        assert_eq!(
            wait_metric(&agent, "llm_egress_tokens_total", &labels, want as f64),
            want as f64,
            "{kind}: exact = the fake's usage\n{}\n{}",
            agent.metrics(),
            agent.context()
        );
    }
    assert_eq!(
        agent.metric_value("llm_egress_plaintext_elf_files_total", &[("result", "all")]),
        Some(1.0),
        "the client's executable is the one file with OpenSSL linked in\n{}",
        agent.metrics()
    );
    assert!(
        agent
            .all_stderr()
            .contains("OpenSSL linked into this file, found by symbol"),
        "{}",
        agent.context()
    );
    // Its connection closed and summarised: no estimate beside the exact
    // counts.
    let deadline = Instant::now() + Duration::from_secs(15);
    while agent
        .metric_value("llm_egress_active_connections", &[("workload", "bot")])
        .unwrap_or(0.0)
        != 0.0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    for kind in ["prompt", "completion"] {
        assert_eq!(
            tokens(&agent, kind, "estimated"),
            0.0,
            "{}",
            agent.metrics()
        );
    }

    // The stripped copy: the same client without symbols stays invisible.
    post(&stripped, &openai, &bot, &ns);
    served(&openai, 2);
    assert_eq!(
        wait_metric(
            &agent,
            "llm_egress_plaintext_invisible_total",
            &[("workload", "bot")],
            1.0
        ),
        1.0,
        "the stripped client is counted as not visible\n{}\n{}",
        agent.metrics(),
        agent.context()
    );
    assert_eq!(
        agent.metric_value("llm_egress_plaintext_elf_files_total", &[("result", "all")]),
        Some(1.0),
        "{}",
        agent.metrics()
    );
    assert_eq!(tokens(&agent, "prompt", "exact"), prompt as f64);
    assert_eq!(tokens(&agent, "completion", "exact"), completion as f64);
    // The linked client was not counted as invisible: only the stripped one.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.metric_value(
            "llm_egress_plaintext_invisible_total",
            &[("workload", "bot")]
        ),
        Some(1.0)
    );
}

/// A Node.js https client (argv: a JSON list of requests, each `[ip,
/// port, host, ca, path, body]`): all POSTs at once, each on its own
/// connection (no agent, no keep-alive), the statuses printed.
const NODE_CLIENT: &str = r#"
const https = require("https"), fs = require("fs");
const reqs = JSON.parse(process.argv[2]);
let left = reqs.length, out = [];
for (const [ip, port, host, ca, path, body] of reqs) {
  const req = https.request({host: ip, port: +port, servername: host, ca: fs.readFileSync(ca),
    method: "POST", path, agent: false, headers: {"Host": host, "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(body), "Connection": "close",
    "x-api-key": "test", "anthropic-version": "2023-06-01"}}, res => {
    res.on("data", () => {});
    res.on("end", () => { out.push(res.statusCode); if (--left == 0) console.log(out.join(" ")); });
  });
  req.on("error", e => { console.error(e); process.exit(1); });
  req.end(body);
}
"#;

/// Node.js (NodeSource's build here) has OpenSSL linked into `node` and
/// exports it in `.dynsym`: it is found by symbol. Its TLS runs over
/// memory BIOs (libuv writes and reads the socket outside
/// `SSL_write`/`SSL_read`), so a call arrives without a socket cookie; the
/// kernel joins the `SSL*` to the socket the thread sends the write's
/// records on next (docs/plaintext.md, "Memory BIOs"). Four requests at
/// once, on one thread, to two providers: each provider's exact counts
/// must be its own usage, so a join to the wrong connection is seen.
/// Skipped without `node`; a `node` that maps a shared libssl (Debian's
/// own package) takes the libssl path.
#[test]
fn node_plaintext_over_memory_bios_is_joined_to_its_connections() {
    require_root();
    let Some(node) = ["/usr/bin/node", "/usr/local/bin/node"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        eprintln!("SKIPPED: no node (NodeSource's nodejs; not in cargo xtask setup)");
        return;
    };
    let ldd = Command::new("ldd").arg(node).output().unwrap();
    if String::from_utf8_lossy(&ldd.stdout).contains("libssl.so") {
        eprintln!(
            "SKIPPED: {node} links the shared libssl (Debian's nodejs): the libssl path, not this test's"
        );
        return;
    }
    let cg = CgroupGuard::new("lo-node");
    let bot = cg.child("bot");
    let ns = NetnsGuard::new();
    let openai = fake_provider::start(&ns, "192.0.2.1:443", Flavor::OpenAi);
    let anthropic = fake_provider::start(&ns, "198.51.100.1:443", Flavor::Anthropic);
    let dir = TempDir::new("lon");
    let script = dir.path().join("client.js");
    std::fs::write(&script, NODE_CLIENT).unwrap();
    let mut agent = Agent::launch(&exact_tokens_policy(&cg, ""));
    agent.wait_readyz(Duration::from_secs(30), |s, _| s == 200);
    let to = |server: &FakeProvider, path: &str, body: &str| {
        serde_json::json!([
            server.addr().ip().to_string(),
            server.addr().port().to_string(),
            server.host(),
            server.ca_file(),
            path,
            body
        ])
    };
    let messages = |words: &str, max: u32| {
        format!(
            r#"{{"model":"claude-3-5-haiku-latest","max_tokens":{max},"messages":[{{"role":"user","content":"{words}"}}]}}"#
        )
    };
    let requests = serde_json::json!([
        to(&openai, "/v1/chat/completions", CHAT),
        to(
            &anthropic,
            "/v1/messages",
            &messages(
                "a longer prompt for the other provider, so that the sizes differ",
                90
            )
        ),
        to(&openai, "/v1/chat/completions", CHAT),
        to(&anthropic, "/v1/messages", &messages("short", 20)),
    ]);
    let mut cmd = Command::new(node);
    cmd.arg(&script)
        .arg(requests.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    confine(&mut cmd, &bot, &ns);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "200 200 200 200",
        "node: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        wait_metric(
            &agent,
            "llm_egress_plaintext_elf_files_total",
            &[("result", "all")],
            1.0
        ),
        1.0,
        "{}\n{}",
        agent.metrics(),
        agent.context()
    );
    for (server, provider) in [(&openai, "openai"), (&anthropic, "anthropic")] {
        let usage = served(server, 2);
        for (kind, want) in [
            ("prompt", usage.iter().map(|s| s.usage.prompt).sum::<u64>()),
            (
                "completion",
                usage.iter().map(|s| s.usage.completion).sum::<u64>(),
            ),
        ] {
            let labels = [
                ("workload", "bot"),
                ("provider", provider),
                ("kind", kind),
                ("source", "exact"),
            ];
            assert!(want > 0);
            assert_eq!(
                wait_metric(&agent, "llm_egress_tokens_total", &labels, want as f64),
                want as f64,
                "{provider} {kind}: exact = the fake's usage\n{}\n{}",
                agent.metrics(),
                agent.context()
            );
        }
    }
    let links = agent
        .wait_for_metric(
            "llm_egress_plaintext_links_total",
            &[],
            4.0,
            Duration::from_secs(5),
        )
        .unwrap_or(0.0);
    assert!(
        links >= 4.0,
        "one join per connection at least: {links}\n{}",
        agent.metrics()
    );
    // Not counted as invisible: its plaintext was seen.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent
            .metric_value(
                "llm_egress_plaintext_invisible_total",
                &[("workload", "bot")]
            )
            .unwrap_or(0.0),
        0.0
    );
}
