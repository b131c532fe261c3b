//! Test vectors for the agent's plaintext HTTP reader (agent/src/plaintext/exchange.rs):
//! what real clients (curl, the official Python SDKs) send, and what the
//! fake providers answer them, byte for byte, with the true usage.
//!
//! `capture_vectors` runs each client against the fakes' own code over
//! plain HTTP on 127.0.0.1 (src/fake_shape.rs `plain`: the bytes are those
//! TLS would carry) and writes, per connection N of a case, `NAME.cN.sent`,
//! `NAME.cN.received`, and the case's entry of `expected.json` (the true
//! usage of its exchanges, in the order they were answered) under
//! agent/src/plaintext/testdata/exact/. The agent's unit tests read them. Ignored by
//! default (it needs curl and the SDKs); regenerate with
//!
//! ```text
//! LLM_EGRESS_TOKENS_PYTHON=$PWD/target/pyenv/bin/python LLM_EGRESS_WRITE_VECTORS=1 \
//!   cargo test -p llm-egress-tests --lib -- --ignored capture_vectors
//! ```
//!
//! (`cargo xtask setup` makes that venv with the pinned SDKs; any Python
//! with `openai` and `anthropic` will do.)

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    fake_provider::{Flavor, Options},
    fake_shape::{Shape, plain},
};

/// The AWS documentation's example access key id: a secret-shaped value
/// the vectors carry in one prompt.
const AWS_EXAMPLE_KEY: &str = "AKIAIOSFODNN7EXAMPLE";

struct Case {
    name: &'static str,
    flavor: Flavor,
    shape: Shape,
    client: Client,
    /// Secret kinds a request body carries.
    secrets: &'static [&'static str],
}

enum Client {
    /// curl arguments after the URL base (`{}` is replaced by it).
    Curl(Vec<String>),
    /// A Python program; `BASE` is the server's base URL.
    Python(&'static str),
}

fn curl_calls(calls: &[(&str, &str, &[&str])]) -> Vec<String> {
    let mut args = Vec::new();
    for (i, (path, body, headers)) in calls.iter().enumerate() {
        if i > 0 {
            args.push("--next".to_string());
        }
        args.extend(["-sS", "--compressed", "-o", "/dev/null"].map(String::from));
        for h in *headers {
            args.extend(["-H".to_string(), h.to_string()]);
        }
        args.extend(["-H".into(), "Content-Type: application/json".into()]);
        args.extend(["-d".into(), body.to_string(), format!("{{}}{path}")]);
    }
    args
}

const OPENAI_SDK: &str = r#"
import openai
c = openai.OpenAI(base_url=BASE + "/v1", api_key="sk-proj-" + "x" * 48, max_retries=0)
c.chat.completions.create(model="gpt-4o-mini", max_tokens=12,
    messages=[{"role": "user", "content": "Say hello in a few words."}])
for _ in c.chat.completions.create(model="gpt-4o", max_completion_tokens=9, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five."}]):
    pass
c.embeddings.create(model="text-embedding-3-small", input=["one", "two words"])
"#;

const ANTHROPIC_SDK: &str = r#"
import anthropic
c = anthropic.Anthropic(base_url=BASE, api_key="sk-ant-api03-" + "y" * 93 + "AA", max_retries=0)
c.messages.create(model="claude-3-5-haiku-20241022", max_tokens=10,
    messages=[{"role": "user", "content": "My AWS key is AKIAIOSFODNN7EXAMPLE, is that fine?"}])
with c.messages.stream(model="claude-sonnet-4-20250514", max_tokens=14,
        messages=[{"role": "user", "content": "Write one short sentence."}]) as s:
    for _ in s.text_stream:
        pass
"#;

fn cases() -> Vec<Case> {
    let openai_key = format!("Authorization: Bearer sk-proj-{}", "k".repeat(48));
    let anthropic_key = format!("x-api-key: sk-ant-api03-{}AA", "z".repeat(93));
    let oa: &[&str] = &[openai_key.as_str()];
    let an: &[&str] = &[anthropic_key.as_str(), "anthropic-version: 2023-06-01"];
    let openai_calls = curl_calls(&[
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":7,"messages":[{"role":"user","content":"hi"}]}"#,
            oa,
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4.1","max_tokens":11,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"tell me a story"}]}"#,
            oa,
        ),
        (
            "/v1/embeddings",
            r#"{"model":"text-embedding-3-small","input":"embed me","dimensions":8}"#,
            oa,
        ),
    ]);
    let anthropic_calls = curl_calls(&[
        (
            "/v1/messages",
            r#"{"model":"claude-3-5-haiku-20241022","max_tokens":6,"messages":[{"role":"user","content":"hi"}]}"#,
            an,
        ),
        (
            "/v1/messages",
            r#"{"model":"claude-sonnet-4-20250514","max_tokens":13,"stream":true,"messages":[{"role":"user","content":"a poem"}]}"#,
            an,
        ),
    ]);
    let gemini_calls = curl_calls(&[
        (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            r#"{"contents":[{"parts":[{"text":"Explain tokens."}]}],"generationConfig":{"maxOutputTokens":9}}"#,
            &["x-goog-api-key: AIzaSyD-4bC9xYz_0123456789abcdefghijklm"],
        ),
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            r#"{"contents":[{"parts":[{"text":"Stream please."}]}],"generationConfig":{"maxOutputTokens":10}}"#,
            &["x-goog-api-key: AIzaSyD-4bC9xYz_0123456789abcdefghijklm"],
        ),
    ]);
    vec![
        Case {
            name: "curl-openai-tidy",
            flavor: Flavor::OpenAi,
            shape: Shape::default(),
            client: Client::Curl(openai_calls.clone()),
            secrets: &[],
        },
        Case {
            name: "curl-openai-realistic",
            flavor: Flavor::OpenAi,
            shape: Shape::realistic(),
            client: Client::Curl(openai_calls),
            secrets: &[],
        },
        Case {
            name: "curl-anthropic-realistic",
            flavor: Flavor::Anthropic,
            shape: Shape::realistic(),
            client: Client::Curl(anthropic_calls),
            secrets: &[],
        },
        Case {
            name: "curl-gemini-realistic",
            flavor: Flavor::Gemini,
            shape: Shape::realistic(),
            client: Client::Curl(gemini_calls),
            secrets: &[],
        },
        Case {
            name: "sdk-openai-realistic",
            flavor: Flavor::OpenAi,
            shape: Shape::realistic(),
            client: Client::Python(OPENAI_SDK),
            secrets: &[],
        },
        Case {
            name: "sdk-anthropic-realistic",
            flavor: Flavor::Anthropic,
            shape: Shape::realistic(),
            client: Client::Python(ANTHROPIC_SDK),
            secrets: &["aws_access_key"],
        },
    ]
}

#[test]
#[ignore = "needs curl and the Python SDKs; writes agent/src/plaintext/testdata/exact"]
fn capture_vectors() {
    let write = std::env::var_os("LLM_EGRESS_WRITE_VECTORS").is_some();
    let python = std::env::var("LLM_EGRESS_TOKENS_PYTHON").unwrap_or_else(|_| "python3".into());
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../agent/src/plaintext/testdata/exact");
    let mut expected = serde_json::Map::new();
    let opts = Options {
        token_interval: Duration::ZERO,
    };
    for case in cases() {
        let fake = plain::start(case.flavor, opts, case.shape, 8);
        let base = format!("http://127.0.0.1:{}", fake.port);
        let out = match &case.client {
            Client::Curl(args) => {
                let args: Vec<String> = args.iter().map(|a| a.replace("{}", &base)).collect();
                Command::new("curl").args(&args).output()
            }
            Client::Python(program) => Command::new(&python)
                .arg("-c")
                .arg(format!("BASE = {base:?}\n{program}"))
                .output(),
        }
        .unwrap_or_else(|e| panic!("{}: cannot run the client: {e}", case.name));
        assert!(
            out.status.success(),
            "{}: the client failed: {}",
            case.name,
            String::from_utf8_lossy(&out.stderr)
        );
        // The client has exited: every connection it opened ends.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut conversations = loop {
            let c = fake
                .conversations
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default();
            if !c.is_empty() && c.len() == fake.accepted.load(std::sync::atomic::Ordering::SeqCst) {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "{}: connections still open",
                case.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        conversations.sort_by_key(|c| c.0);
        let connections = conversations.len();
        let served = fake.served.lock().map(|s| s.clone()).unwrap_or_default();
        assert!(!served.is_empty(), "{}: nothing served", case.name);
        if case.secrets.contains(&"aws_access_key") {
            let sent: Vec<u8> = conversations.iter().flat_map(|c| c.1.clone()).collect();
            let text = String::from_utf8_lossy(&sent);
            assert!(
                text.contains(AWS_EXAMPLE_KEY),
                "{}: the prompt lost its key",
                case.name
            );
        }
        let exchanges: Vec<Value> = served
            .iter()
            .map(|s| json!({"model": s.model, "prompt": s.usage.prompt, "completion": s.usage.completion, "stream": s.streamed}))
            .collect();
        expected.insert(
            case.name.to_string(),
            json!({"exchanges": exchanges, "secrets": case.secrets, "connections": connections}),
        );
        if write {
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
            for (i, (_, sent, received)) in conversations.iter().enumerate() {
                for (ext, bytes) in [("sent", sent), ("received", received)] {
                    let f = dir.join(format!("{}.c{i}.{ext}", case.name));
                    std::fs::write(&f, bytes).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
            }
        }
    }
    if write {
        let f = dir.join("expected.json");
        let text = serde_json::to_string_pretty(&Value::Object(expected)).unwrap_or_default();
        std::fs::write(&f, text + "\n").unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}
