//! The realistic fake providers over real TLS (src/fake_shape.rs): curl
//! gets compressed buffered bodies it can decode when it asks for them,
//! a stream's events arrive several to a TLS record, and HTTP/2 when curl
//! offers it. No agent: this
//! checks the fakes that the exact-token parser and the estimator are
//! measured against.

use llm_egress_tests::{
    CgroupGuard, NetnsGuard,
    fake_provider::{self, FakeProvider, Flavor, Options, Shape},
};

/// curl over HTTP/1.1 with `extra` arguments, posting `body` to `path`;
/// (status line and headers, body as curl gives it).
fn call(
    server: &FakeProvider,
    cg: &CgroupGuard,
    ns: &NetnsGuard,
    path: &str,
    body: &str,
    extra: &[&str],
) -> (String, String) {
    let args: Vec<&str> = ["--http1.1"].iter().chain(extra).copied().collect();
    exchange(server, cg.path(), ns, path, body, &args)
}

/// curl with `args` (and its own protocol choice), posting `body` to
/// `path`; (status line and headers, body as curl gives it).
fn exchange(
    server: &FakeProvider,
    cgroup: &std::path::Path,
    ns: &NetnsGuard,
    path: &str,
    body: &str,
    args: &[&str],
) -> (String, String) {
    let mut cmd = llm_egress_tests::curl::post(server, path, body, cgroup, ns);
    cmd.args(["-D", "-", "--max-time", "30"]).args(args);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (head.to_string(), body.to_string())
}

#[test]
fn realistic_fakes_compress_for_clients_that_ask_and_coalesce_events() {
    let ns = NetnsGuard::new();
    let cg = CgroupGuard::new("fake-real");
    let opts = Options::default();
    let server = fake_provider::start_shaped(
        &ns,
        "192.0.2.1:443",
        Flavor::OpenAi,
        opts,
        Shape::realistic(),
    );
    let chat =
        r#"{"model":"gpt-4o-mini","max_tokens":40,"messages":[{"role":"user","content":"hi"}]}"#;
    // Asked for: br (curl --compressed offers deflate, gzip, br, zstd), decoded by curl.
    let (head, body) = call(
        &server,
        &cg,
        &ns,
        "/v1/chat/completions",
        chat,
        &["--compressed"],
    );
    assert!(head.contains("Content-Encoding: br"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("curl could not decode the body ({e}): {body:?}"));
    assert_eq!(v["usage"]["completion_tokens"], 40);
    // Not asked for: identity.
    let (head, _) = call(&server, &cg, &ns, "/v1/chat/completions", chat, &[]);
    assert!(!head.contains("Content-Encoding"), "{head}");
    // Only gzip offered: gzip.
    let (head, body) = call(
        &server,
        &cg,
        &ns,
        "/v1/chat/completions",
        chat,
        &["-H", "Accept-Encoding: gzip", "-o", "/dev/null"],
    );
    assert!(head.contains("Content-Encoding: gzip"), "{head}{body}");

    // A stream of 40 tokens: 40 + 4 events (role, finish, [DONE], usage is
    // off) in fewer TLS records than events.
    let before: u64 = server.records().iter().map(|(_, c)| c.app_written).sum();
    let stream = r#"{"model":"gpt-4o-mini","max_tokens":40,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let (_, body) = call(&server, &cg, &ns, "/v1/chat/completions", stream, &[]);
    let events = body.matches("data: ").count();
    assert_eq!(events, 43, "{body}");
    let after: u64 = server.records().iter().map(|(_, c)| c.app_written).sum();
    let records = after - before;
    assert!(
        records * 2 < events as u64,
        "{events} events came in {records} records: not coalesced"
    );

    // Gemini's generateContent, with usageMetadata.
    let gemini = fake_provider::start_shaped(
        &ns,
        "198.51.100.1:443",
        Flavor::Gemini,
        opts,
        Shape::realistic(),
    );
    let (head, body) = call(
        &gemini,
        &cg,
        &ns,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        r#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"maxOutputTokens":5}}"#,
        &["--compressed"],
    );
    assert!(head.contains("Content-Encoding"), "{head}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    assert_eq!(v["usageMetadata"]["candidatesTokenCount"], 5);
    let served = gemini.wait_served(1);
    assert_eq!(served.len(), 1, "the Gemini fake recorded no request");
    assert_eq!(served[0].usage.completion, 5);
}

/// A client that offers HTTP/2 (curl's default) gets it, with the same
/// answers: a compressed body curl decodes, a stream of every event, the
/// true usage recorded.
#[test]
fn realistic_fakes_speak_http2_to_clients_that_offer_it() {
    let ns = NetnsGuard::new();
    let cg = CgroupGuard::new("fake-h2");
    let server = fake_provider::start_shaped(
        &ns,
        "192.0.2.1:443",
        Flavor::OpenAi,
        Options::default(),
        Shape::realistic(),
    );
    let h2 = |body: &str, extra: &[&str]| {
        let (head, body) = exchange(&server, cg.path(), &ns, "/v1/chat/completions", body, extra);
        assert!(head.starts_with("HTTP/2 200"), "not HTTP/2: {head}");
        (head, body)
    };
    let chat =
        r#"{"model":"gpt-4o-mini","max_tokens":40,"messages":[{"role":"user","content":"hi"}]}"#;
    let (head, body) = h2(chat, &["--compressed"]);
    assert!(head.contains("content-encoding: br"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("curl could not decode the body ({e}): {body:?}"));
    assert_eq!(v["usage"]["completion_tokens"], 40);
    let stream = r#"{"model":"gpt-4o-mini","max_tokens":30,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let (head, body) = h2(stream, &[]);
    assert!(head.contains("content-type: text/event-stream"), "{head}");
    assert!(!head.contains("transfer-encoding"), "{head}");
    // 30 tokens, role, finish, usage, [DONE].
    assert_eq!(body.matches("data: ").count(), 34, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let served = server.wait_served(2);
    assert_eq!(
        served
            .iter()
            .map(|s| s.usage.completion)
            .collect::<Vec<_>>(),
        [40, 30]
    );
}
