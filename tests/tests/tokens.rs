//! Token estimates from encrypted traffic, against the truth.
//!
//! A calibration corpus of realistic requests (OpenAI chat completions and
//! embeddings, Anthropic messages; streamed and buffered; short and long
//! prompts and completions; several models, system prompts, multi-turn
//! conversations) is sent by curl, from a workload cgroup inside the test
//! namespace, to fake providers that speak the real wire formats over TLS
//! and record the true `usage` (tests/src/fake_provider.rs). The agent sees
//! only the encrypted connections; its per-connection estimates (the audit
//! log's `connection` records) are compared with the true usage, request
//! by request. The relative error of each case (median and p90) must stay
//! within the bounds written in docs/tokens.md.
//!
//! `LLM_EGRESS_TOKENS_PYTHON=<python with the openai and anthropic
//! packages>` sends the same corpus with the official Python SDKs instead of
//! curl (other headers, another TLS stack) and checks the `sdk/` bounds of
//! docs/tokens.md; without it, curl sends and the `curl/` bounds are checked.
//!
//! `LLM_EGRESS_TOKENS_FIT=1` also prints least-squares fits of the byte
//! counts against the true token counts, per provider family and response
//! shape: the numbers `agent/src/tokens.rs` takes its constants from (fit on
//! another seed than the checked run: `LLM_EGRESS_TOKENS_SEED=1000`).
//!
//! Locals are declared cgroup, netns, servers, agent, so they drop in the
//! reverse order: the agent stops before its cgroup goes.

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TempDir,
    fake_provider::{self, Endpoint, FakeProvider, Flavor, Rng, Served},
    probe::confine,
    require_root, toml_str, wait_until,
};
use serde_json::{Value, json};

/// docs/tokens.md: the bounds this test enforces are read from it.
const DOC: &str = include_str!("../../docs/tokens.md");

/// Requests per case (the brief: at least 10).
const REQUESTS_PER_CASE: usize = 12;
/// curl processes at once.
const PARALLEL: usize = 4;

#[derive(Clone, Copy, Debug)]
struct Case {
    name: &'static str,
    flavor: Flavor,
    endpoint: Endpoint,
    streamed: bool,
    /// Typical prompt and completion lengths (tokens); each request varies
    /// them by ±25%.
    prompt: usize,
    completion: usize,
}

const fn case(
    name: &'static str,
    flavor: Flavor,
    endpoint: Endpoint,
    streamed: bool,
    prompt: usize,
    completion: usize,
) -> Case {
    Case {
        name,
        flavor,
        endpoint,
        streamed,
        prompt,
        completion,
    }
}

const CASES: &[Case] = &[
    case(
        "openai-chat-short",
        Flavor::OpenAi,
        Endpoint::ChatCompletions,
        false,
        20,
        20,
    ),
    case(
        "openai-chat-long",
        Flavor::OpenAi,
        Endpoint::ChatCompletions,
        false,
        2000,
        2000,
    ),
    case(
        "openai-chat-stream-short",
        Flavor::OpenAi,
        Endpoint::ChatCompletions,
        true,
        20,
        20,
    ),
    case(
        "openai-chat-stream-long",
        Flavor::OpenAi,
        Endpoint::ChatCompletions,
        true,
        2000,
        2000,
    ),
    case(
        "openai-embeddings-short",
        Flavor::OpenAi,
        Endpoint::Embeddings,
        false,
        20,
        0,
    ),
    case(
        "openai-embeddings-long",
        Flavor::OpenAi,
        Endpoint::Embeddings,
        false,
        2000,
        0,
    ),
    case(
        "anthropic-short",
        Flavor::Anthropic,
        Endpoint::Messages,
        false,
        20,
        20,
    ),
    case(
        "anthropic-long",
        Flavor::Anthropic,
        Endpoint::Messages,
        false,
        2000,
        2000,
    ),
    case(
        "anthropic-stream-short",
        Flavor::Anthropic,
        Endpoint::Messages,
        true,
        20,
        20,
    ),
    case(
        "anthropic-stream-long",
        Flavor::Anthropic,
        Endpoint::Messages,
        true,
        2000,
        2000,
    ),
];

/// One request of the corpus.
#[derive(Clone, Debug)]
struct Job {
    case: usize,
    id: String,
    path: &'static str,
    body: String,
}

fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

/// ±25% around `n` (at least 1).
fn around(rng: &mut Rng, n: usize) -> usize {
    ((n as f64) * (0.75 + 0.5 * rng.unit())).round().max(1.0) as usize
}

const SYSTEM_PROMPTS: &[&str] = &[
    "You are a helpful assistant.",
    "You are a support agent for an online store. Answer briefly and politely.",
    "You summarize documents for busy engineers. Use plain language.",
];

/// The JSON body of request `i` of `case`.
fn body(case: &Case, rng: &mut Rng) -> Value {
    let prompt_len = around(rng, case.prompt);
    let completion_len = around(rng, case.completion);
    let seed = rng.next_u64();
    let system = (rng.below(2) == 0).then(|| pick(rng, SYSTEM_PROMPTS));
    // Some conversations carry an earlier turn; the prompt budget is split.
    let multi_turn = rng.below(4) == 0 && prompt_len > 10;
    let turns: Vec<(&str, String)> = if multi_turn {
        let first = prompt_len / 3;
        vec![
            ("user", fake_provider::prose(seed, first)),
            ("assistant", fake_provider::prose(seed ^ 1, first)),
            (
                "user",
                fake_provider::prose(seed ^ 2, prompt_len - 2 * first),
            ),
        ]
    } else {
        vec![("user", fake_provider::prose(seed, prompt_len))]
    };
    match case.endpoint {
        Endpoint::ChatCompletions => {
            let model = pick(rng, &["gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-3.5-turbo"]);
            let mut messages: Vec<Value> = system
                .map(|s| json!({"role": "system", "content": s}))
                .into_iter()
                .collect();
            messages.extend(
                turns
                    .into_iter()
                    .map(|(role, content)| json!({"role": role, "content": content})),
            );
            let mut b = json!({"model": model, "messages": messages});
            let key = if rng.below(2) == 0 {
                "max_tokens"
            } else {
                "max_completion_tokens"
            };
            b[key] = json!(completion_len);
            if rng.below(2) == 0 {
                b["temperature"] = json!(0.2);
            }
            if case.streamed {
                b["stream"] = json!(true);
                if rng.below(5) != 0 {
                    b["stream_options"] = json!({"include_usage": true});
                }
            }
            b
        }
        Endpoint::Embeddings => {
            let model = pick(rng, &["text-embedding-3-small", "text-embedding-ada-002"]);
            let mut b = json!({"model": model, "input": fake_provider::prose(seed, prompt_len)});
            // curl users get floats; the official SDKs ask for base64.
            if rng.below(2) == 0 {
                b["encoding_format"] = json!("base64");
            }
            b
        }
        Endpoint::Messages => {
            let model = pick(
                rng,
                &[
                    "claude-sonnet-4-20250514",
                    "claude-3-5-haiku-20241022",
                    "claude-opus-4-1-20250805",
                ],
            );
            let blocks = rng.below(3) == 0;
            let messages: Vec<Value> = turns
                .into_iter()
                .map(|(role, text)| {
                    let content = if blocks {
                        json!([{"type": "text", "text": text}])
                    } else {
                        json!(text)
                    };
                    json!({"role": role, "content": content})
                })
                .collect();
            let mut b = json!({"model": model, "max_tokens": completion_len, "messages": messages});
            if let Some(s) = system {
                b["system"] = json!(s);
            }
            if case.streamed {
                b["stream"] = json!(true);
            }
            b
        }
    }
}

fn corpus(seed: u64) -> Vec<Job> {
    let mut jobs = Vec::new();
    for (c, case) in CASES.iter().enumerate() {
        let mut rng = Rng::new(seed.wrapping_mul(1_000_003).wrapping_add(c as u64));
        for i in 0..REQUESTS_PER_CASE {
            let path = match case.endpoint {
                Endpoint::ChatCompletions => "/v1/chat/completions",
                Endpoint::Embeddings => "/v1/embeddings",
                Endpoint::Messages => "/v1/messages",
            };
            jobs.push(Job {
                case: c,
                id: format!("tok-{c:02}-{i:04}"),
                path,
                body: body(case, &mut rng).to_string(),
            });
        }
    }
    // Interleave the cases so that long and short requests run side by side.
    let mut rng = Rng::new(seed);
    for i in (1..jobs.len()).rev() {
        jobs.swap(i, rng.below(i as u64 + 1) as usize);
    }
    jobs
}

/// Runs `job` with curl in `cgroup` and `netns`; returns curl's pid.
fn run_curl(
    job: &Job,
    server: &FakeProvider,
    cgroup: &Path,
    netns: &NetnsGuard,
    dir: &Path,
) -> u32 {
    let file = dir.join(format!("{}.json", job.id));
    std::fs::write(&file, &job.body).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--max-time",
        "120",
    ]);
    cmd.arg("--cacert")
        .arg(server.ca_file())
        .arg("--resolve")
        .arg(server.resolve_arg());
    cmd.args([
        "-H",
        "Content-Type: application/json",
        "-H",
        &format!("X-Client-Request-Id: {}", job.id),
    ]);
    // Credentials as long as real ones (not real ones).
    let mut rng = Rng::new(job.id.len() as u64);
    match server.flavor() {
        Flavor::OpenAi => cmd.args([
            "-H",
            &format!("Authorization: Bearer sk-proj-{}", rng.alnum(156)),
        ]),
        Flavor::Anthropic => cmd.args([
            "-H",
            &format!("x-api-key: sk-ant-api03-{}AA", rng.alnum(93)),
            "-H",
            "anthropic-version: 2023-06-01",
        ]),
    };
    cmd.arg("--data-binary")
        .arg(format!("@{}", file.display()))
        .arg(server.url(job.path));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    confine(&mut cmd, cgroup, netns);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
    let pid = child.id();
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("curl: {e}"));
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && code == "200",
        "curl {} failed ({code}): {}",
        job.id,
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

/// Sends one request with the official SDK (argv: flavor, server IP,
/// host, CA file, request id, body file); exits non-zero on failure.
const SDK_CLIENT: &str = r#"
import json, ssl, sys
try:
    import httpx
except ImportError:  # newer SDKs ship it as httpx2
    import httpx2 as httpx
flavor, ip, host, ca, rid, body_file = sys.argv[1:]
body = json.load(open(body_file))

class Transport(httpx.HTTPTransport):
    # Connect to the test address, but speak TLS and HTTP to the API host.
    def handle_request(self, request):
        request.extensions["sni_hostname"] = host
        request.headers["Host"] = host
        return super().handle_request(request)

http = httpx.Client(transport=Transport(verify=ssl.create_default_context(cafile=ca)))
headers = {"X-Client-Request-Id": rid}
if flavor == "openai":
    import openai
    client = openai.OpenAI(api_key="sk-proj-" + "x" * 156, base_url=f"https://{ip}/v1", http_client=http, default_headers=headers, max_retries=0)
    if "input" in body:
        client.embeddings.create(**body)
    elif body.get("stream"):
        for _ in client.chat.completions.create(**body):
            pass
    else:
        client.chat.completions.create(**body)
else:
    import anthropic
    client = anthropic.Anthropic(api_key="sk-ant-api03-" + "x" * 95 + "AA", base_url=f"https://{ip}", http_client=http, default_headers=headers, max_retries=0)
    if body.get("stream"):
        for _ in client.messages.create(**body):
            pass
    else:
        client.messages.create(**body)
client.close()
"#;

/// Runs `job` with the Python SDK in `cgroup` and `netns`; returns its pid.
fn run_sdk(
    python: &str,
    job: &Job,
    server: &FakeProvider,
    cgroup: &Path,
    netns: &NetnsGuard,
    dir: &Path,
) -> u32 {
    let file = dir.join(format!("{}.json", job.id));
    std::fs::write(&file, &job.body).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
    let script = dir.join("sdk_client.py");
    if !script.exists() {
        std::fs::write(&script, SDK_CLIENT)
            .unwrap_or_else(|e| panic!("write {}: {e}", script.display()));
    }
    let flavor = if server.flavor() == Flavor::OpenAi {
        "openai"
    } else {
        "anthropic"
    };
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args([flavor, &server.addr().ip().to_string(), server.host()])
        .arg(server.ca_file())
        .arg(&job.id)
        .arg(&file);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    confine(&mut cmd, cgroup, netns);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let pid = child.id();
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    assert!(
        out.status.success(),
        "SDK request {} failed: {}",
        job.id,
        String::from_utf8_lossy(&out.stderr)
    );
    pid
}

/// One request's truth and the agent's estimate of its connection.
#[derive(Clone, Debug)]
struct Sample {
    case: usize,
    served: Served,
    record: Value,
}

impl Sample {
    fn n(&self, key: &str) -> f64 {
        self.record[key].as_f64().unwrap_or(f64::NAN)
    }
    fn est_prompt(&self) -> f64 {
        self.n("tokens_prompt_estimated")
    }
    fn est_completion(&self) -> f64 {
        self.n("tokens_completion_estimated")
    }
}

fn rel_error(est: f64, truth: u64) -> f64 {
    (est - truth as f64).abs() / (truth.max(1) as f64)
}

/// The value at quantile `q` (nearest rank) of `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Errors of one case: (prompt median, prompt p90, completion median, completion p90), fractions.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Errors {
    prompt_median: f64,
    prompt_p90: f64,
    completion_median: f64,
    completion_p90: f64,
}

/// The bounds table of docs/tokens.md: lines `| \`case\` | a% | b% | c% | d% |`
/// under the heading "Bounds".
fn doc_bounds() -> HashMap<String, Errors> {
    let section = DOC
        .split("\n## ")
        .find(|s| s.starts_with("Bounds"))
        .unwrap_or_else(|| panic!("docs/tokens.md has no `## Bounds` section"));
    let mut out = HashMap::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let pct = |s: &str| {
            s.trim_end_matches('%')
                .trim()
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("bad bound {s:?} in {line:?}: {e}"))
                / 100.0
        };
        assert_eq!(cells.len(), 5, "a bounds line has 5 cells: {line}");
        out.insert(
            cells[0].trim_matches('`').to_string(),
            Errors {
                prompt_median: pct(cells[1]),
                prompt_p90: pct(cells[2]),
                completion_median: pct(cells[3]),
                completion_p90: pct(cells[4]),
            },
        );
    }
    out
}

fn policy(cg: &CgroupGuard) -> String {
    format!(
        r#"cgroup = {}
[resolver]
servers = ["127.0.0.1:9"]
[[providers]]
name = "openai"
hosts = ["api.openai.com"]
cidrs = ["192.0.2.0/24"]
ports = [443]
[[providers]]
name = "anthropic"
hosts = ["api.anthropic.com"]
cidrs = ["198.51.100.0/24"]
ports = [443]
[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["openai", "anthropic"]
"#,
        toml_str(&cg.path().display().to_string())
    )
}

/// The clients the corpus is sent with: the prefix of the bounds' names.
const CLIENTS: [&str; 2] = ["curl", "sdk"];

#[test]
fn docs_tokens_md_has_a_bound_for_every_case() {
    let bounds = doc_bounds();
    for client in CLIENTS {
        for c in CASES {
            assert!(
                bounds.contains_key(&format!("{client}/{}", c.name)),
                "docs/tokens.md: no bound for `{client}/{}`",
                c.name
            );
        }
    }
    assert_eq!(
        bounds.len(),
        CLIENTS.len() * CASES.len(),
        "docs/tokens.md bounds cases this test does not run"
    );
}

#[test]
fn token_estimates_stay_within_the_documented_error() {
    require_root();
    let cg = CgroupGuard::new("tokens");
    let bot = cg.child("bot");
    let netns = NetnsGuard::new();
    let openai = fake_provider::start(&netns, "192.0.2.1:443", Flavor::OpenAi);
    let anthropic = fake_provider::start(&netns, "198.51.100.1:443", Flavor::Anthropic);
    let agent = Agent::start(&policy(&cg));
    let dir = TempDir::new("llm-egress-tokens");

    let seed = std::env::var("LLM_EGRESS_TOKENS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let jobs = corpus(seed);
    let python = std::env::var("LLM_EGRESS_TOKENS_PYTHON").ok();
    let queue = Arc::new(Mutex::new(jobs.clone()));
    let pids: Arc<Mutex<HashMap<u32, String>>> = Arc::default();
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| {
                while let Some(job) = queue.lock().ok().and_then(|mut q| q.pop()) {
                    let server = if CASES[job.case].flavor == Flavor::OpenAi {
                        &openai
                    } else {
                        &anthropic
                    };
                    let pid = match &python {
                        Some(py) => run_sdk(py, &job, server, &bot, &netns, dir.path()),
                        None => run_curl(&job, server, &bot, &netns, dir.path()),
                    };
                    if let Ok(mut p) = pids.lock() {
                        p.insert(pid, job.id.clone());
                    }
                }
            });
        }
    });
    let pids = pids.lock().map(|p| p.clone()).unwrap_or_default();
    let records = wait_until(Duration::from_secs(15), Duration::from_millis(200), || {
        let r: Vec<Value> = agent
            .audit_events()
            .into_iter()
            .filter(|e| e["event"] == "connection")
            .collect();
        (r.len() >= jobs.len()).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "one connection record per request ({}) expected\n{}",
            jobs.len(),
            agent.context()
        )
    });
    let mut served: HashMap<String, Served> = HashMap::new();
    for s in openai.served().into_iter().chain(anthropic.served()) {
        served.insert(s.request_id.clone().unwrap_or_default(), s);
    }
    let case_of: HashMap<&str, usize> = jobs.iter().map(|j| (j.id.as_str(), j.case)).collect();
    let mut samples = Vec::new();
    for r in records {
        let pid = r["tgid"].as_u64().unwrap_or(0) as u32;
        let id = pids
            .get(&pid)
            .unwrap_or_else(|| panic!("a connection record of no curl of this test: {r}"));
        let truth = served
            .get(id)
            .unwrap_or_else(|| panic!("the server did not record {id}"));
        samples.push(Sample {
            case: case_of[id.as_str()],
            served: truth.clone(),
            record: r,
        });
    }
    assert_eq!(samples.len(), jobs.len());

    if std::env::var_os("LLM_EGRESS_TOKENS_FIT").is_some() {
        print_fits(&samples);
    }
    let client = if python.is_some() { "sdk" } else { "curl" };
    let measured = report(&samples, client);
    check_metrics(&agent, &samples);
    let bounds = doc_bounds();
    let mut failures = Vec::new();
    for (c, case) in CASES.iter().enumerate() {
        let name = format!("{client}/{}", case.name);
        let (m, b) = (measured[c], bounds[&name]);
        for (what, got, bound) in [
            ("prompt median", m.prompt_median, b.prompt_median),
            ("prompt p90", m.prompt_p90, b.prompt_p90),
            (
                "completion median",
                m.completion_median,
                b.completion_median,
            ),
            ("completion p90", m.completion_p90, b.completion_p90),
        ] {
            // NaN (no estimate) fails too.
            if got.is_nan() || got > bound {
                failures.push(format!(
                    "{name}: {what} error {:.1}% > {:.1}% (docs/tokens.md)",
                    got * 100.0,
                    bound * 100.0
                ));
            }
        }
        let wrong_shape = samples
            .iter()
            .filter(|s| s.case == c && s.record["streamed"].as_bool() != Some(case.streamed))
            .count();
        if wrong_shape > 0 {
            failures.push(format!(
                "{name}: {wrong_shape} connections classified as streamed = {}",
                !case.streamed
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "token estimates are worse than docs/tokens.md says:\n{}",
        failures.join("\n")
    );
}

/// Prints the error table (the one docs/tokens.md shows) and returns it.
fn report(samples: &[Sample], client: &str) -> Vec<Errors> {
    let mut out = Vec::new();
    println!(
        "\n| case | requests | prompt tokens (true, median) | prompt error median | prompt error p90 | completion tokens (true, median) | completion error median | completion error p90 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (c, case) in CASES.iter().enumerate() {
        let of: Vec<&Sample> = samples.iter().filter(|s| s.case == c).collect();
        let pe: Vec<f64> = of
            .iter()
            .map(|s| rel_error(s.est_prompt(), s.served.usage.prompt))
            .collect();
        let ce: Vec<f64> = of
            .iter()
            .map(|s| rel_error(s.est_completion(), s.served.usage.completion))
            .collect();
        let tp: Vec<f64> = of.iter().map(|s| s.served.usage.prompt as f64).collect();
        let tc: Vec<f64> = of
            .iter()
            .map(|s| s.served.usage.completion as f64)
            .collect();
        let e = Errors {
            prompt_median: quantile(&pe, 0.5),
            prompt_p90: quantile(&pe, 0.9),
            completion_median: quantile(&ce, 0.5),
            completion_p90: quantile(&ce, 0.9),
        };
        println!(
            "| `{client}/{}` | {} | {} | {:.1}% | {:.1}% | {} | {:.1}% | {:.1}% |",
            case.name,
            of.len(),
            quantile(&tp, 0.5),
            e.prompt_median * 100.0,
            e.prompt_p90 * 100.0,
            quantile(&tc, 0.5),
            e.completion_median * 100.0,
            e.completion_p90 * 100.0
        );
        out.push(e);
    }
    if std::env::var_os("LLM_EGRESS_TOKENS_VERBOSE").is_some() {
        for s in samples {
            println!(
                "{} {} prompt {} est {} completion {} est {} | sent {} recv {} segs_in {} segs_out {} dur {:.3} streamed {}",
                CASES[s.case].name,
                s.served.model,
                s.served.usage.prompt,
                s.est_prompt(),
                s.served.usage.completion,
                s.est_completion(),
                s.record["bytes_sent"],
                s.record["bytes_received"],
                s.record["segments_received"],
                s.record["segments_sent"],
                s.n("duration_seconds"),
                s.record["streamed"]
            );
        }
    }
    out
}

/// The token counter must hold what the connection records say, per
/// provider and kind, with `source="estimated"`.
fn check_metrics(agent: &Agent, samples: &[Sample]) {
    for (provider, flavor) in [("openai", Flavor::OpenAi), ("anthropic", Flavor::Anthropic)] {
        let of = || samples.iter().filter(|s| CASES[s.case].flavor == flavor);
        for (kind, total) in [
            ("prompt", of().map(Sample::est_prompt).sum::<f64>()),
            ("completion", of().map(Sample::est_completion).sum::<f64>()),
        ] {
            let labels = [
                ("workload", "bot"),
                ("provider", provider),
                ("kind", kind),
                ("source", "estimated"),
            ];
            let got = agent.metric_value("llm_egress_tokens_total", &labels);
            assert_eq!(
                got,
                Some(total),
                "llm_egress_tokens_total{{provider={provider},kind={kind}}} must add up the connection records"
            );
        }
    }
}

/// Least-squares line `bytes = a + b * tokens`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0, y + p.1));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - b * mx, b)
}

/// The fits agent/src/tokens.rs takes its constants from.
fn print_fits(samples: &[Sample]) {
    type Group = (&'static str, fn(&Case) -> bool);
    let groups: [Group; 5] = [
        ("openai chat buffered", |c| {
            c.endpoint == Endpoint::ChatCompletions && !c.streamed
        }),
        ("openai chat streamed", |c| {
            c.endpoint == Endpoint::ChatCompletions && c.streamed
        }),
        ("openai embeddings", |c| c.endpoint == Endpoint::Embeddings),
        ("anthropic buffered", |c| {
            c.endpoint == Endpoint::Messages && !c.streamed
        }),
        ("anthropic streamed", |c| {
            c.endpoint == Endpoint::Messages && c.streamed
        }),
    ];
    println!("\nfits: bytes = a + b * tokens");
    for (name, pred) in groups {
        let of: Vec<&Sample> = samples.iter().filter(|s| pred(&CASES[s.case])).collect();
        let sent: Vec<(f64, f64)> = of
            .iter()
            .map(|s| (s.served.usage.prompt as f64, s.n("bytes_sent")))
            .collect();
        let recv: Vec<(f64, f64)> = of
            .iter()
            .map(|s| (s.served.usage.completion as f64, s.n("bytes_received")))
            .collect();
        let (sa, sb) = fit(&sent);
        let (ra, rb) = fit(&recv);
        let avg_seg: Vec<f64> = of
            .iter()
            .map(|s| s.n("bytes_received") / s.n("segments_received").max(1.0))
            .collect();
        let segs: Vec<f64> = of.iter().map(|s| s.n("segments_received")).collect();
        let segs_out: Vec<f64> = of.iter().map(|s| s.n("segments_sent")).collect();
        let rate: Vec<f64> = of
            .iter()
            .map(|s| s.n("bytes_received") / s.n("duration_seconds").max(1e-6))
            .collect();
        println!(
            "{name:<22} sent: a {sa:8.1} b {sb:6.3} | received: a {ra:8.1} b {rb:7.3} | received bytes/segment min {:.0} max {:.0} | segments in min {} max {} | segments out min {} max {} | received bytes/s min {:.0} max {:.0}",
            quantile(&avg_seg, 0.0),
            quantile(&avg_seg, 1.0),
            quantile(&segs, 0.0),
            quantile(&segs, 1.0),
            quantile(&segs_out, 0.0),
            quantile(&segs_out, 1.0),
            quantile(&rate, 0.0),
            quantile(&rate, 1.0),
        );
    }
}
