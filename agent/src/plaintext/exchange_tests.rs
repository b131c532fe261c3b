//! Tests of src/exchange.rs: whole connections, as bytes, in any pieces.

use super::*;
use crate::plaintext::body_coding::tests::encode;

fn request(path: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "POST {path} HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: Bearer sk-proj-{}\r\n{headers}Content-Length: {}\r\n\r\n",
        "k".repeat(48),
        body.len()
    )
    .into_bytes();
    m.extend_from_slice(body);
    m
}

fn response(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 01:00:00 GMT\r\nContent-Type: application/json\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    m.extend_from_slice(body);
    m
}

/// `body` in chunks of `size` bytes.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

fn sse_response(headers: &str, events: &[u8]) -> Vec<u8> {
    let mut m = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n{headers}\r\n"
    )
    .into_bytes();
    m.extend_from_slice(&chunked(events, 37));
    m
}

/// Feeds a whole conversation (each direction's pieces in order,
/// alternating as given) and closes.
fn run(tracker: &mut Tracker, steps: &[(Direction, &[u8])], piece: usize) -> Vec<Output> {
    let mut out = Vec::new();
    for (dir, bytes) in steps {
        for p in bytes.chunks(piece.max(1)) {
            out.extend(tracker.feed(*dir, p));
        }
    }
    out.extend(tracker.close());
    out
}

fn exchanges(out: &[Output]) -> Vec<&Exchange> {
    out.iter()
        .filter_map(|o| match o {
            Output::Exchange(e) => Some(e),
            _ => None,
        })
        .collect()
}

fn problems(out: &[Output]) -> Vec<&'static str> {
    out.iter()
        .filter_map(|o| match o {
            Output::Problem(p) => Some(p.as_str()),
            _ => None,
        })
        .collect()
}

const CHAT_RESPONSE: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18","choices":[{"index":0,"message":{"role":"assistant","content":"Hello!"},"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":2,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":0}}}"#;

const ANTHROPIC_EVENTS: &[u8] = b"event: message_start\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-20250514\",\"content\":[],\"usage\":{\"input_tokens\":21,\"cache_read_input_tokens\":4,\"output_tokens\":1}}}\n\n\
event: content_block_delta\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
event: message_delta\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":9}}\n\n\
event: message_stop\n\
data: {\"type\":\"message_stop\"}\n\n";

#[test]
fn keep_alive_with_every_coding() {
    let chat_req =
        br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o-mini","max_tokens":50}"#;
    let emb_req = br#"{"input":"hello","model":"text-embedding-3-small"}"#;
    let emb = br#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":1,"total_tokens":1}}"#;
    let msg_req = br#"{"model":"claude-sonnet-4-20250514","max_tokens":1024,"stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
    let mut sent = Vec::new();
    sent.extend(request(
        "/v1/chat/completions",
        "Accept-Encoding: gzip, deflate, br, zstd\r\n",
        chat_req,
    ));
    sent.extend(request("/v1/embeddings", "", emb_req));
    sent.extend(request("/v1/messages", "", msg_req));
    sent.extend(request("/v1/chat/completions", "", chat_req));
    let mut received = Vec::new();
    received.extend(response(
        "Content-Encoding: gzip\r\n",
        &encode(Coding::Gzip, CHAT_RESPONSE),
    ));
    received.extend(response(
        "Content-Encoding: zstd\r\n",
        &encode(Coding::Zstd, emb),
    ));
    received.extend(sse_response(
        "Content-Encoding: br\r\n",
        &encode(Coding::Brotli, ANTHROPIC_EVENTS),
    ));
    received.extend(response(
        "Content-Encoding: deflate\r\n",
        &encode(Coding::Deflate, CHAT_RESPONSE),
    ));
    for piece in [1, 5, 100, 100_000] {
        let mut t = Tracker::new(Some(Arc::new(SecretRules::new(&[]))));
        let out = run(
            &mut t,
            &[(Direction::Sent, &sent), (Direction::Received, &received)],
            piece,
        );
        assert_eq!(problems(&out), Vec::<&str>::new(), "pieces of {piece}");
        let ex = exchanges(&out);
        assert_eq!(ex.len(), 4, "pieces of {piece}");
        assert_eq!(ex[0].api, Api::OpenAiChat);
        assert_eq!(ex[0].model.as_deref(), Some("gpt-4o-mini"));
        assert_eq!(
            ex[0].response_model.as_deref(),
            Some("gpt-4o-mini-2024-07-18")
        );
        assert_eq!(ex[0].max_tokens, Some(50));
        assert_eq!(
            ex[0].usage,
            Some(Usage {
                input: 11,
                output: 2,
                cached: 0,
                cache_write: 0
            })
        );
        assert_eq!(ex[0].response_coding, Coding::Gzip);
        assert_eq!(ex[0].response_bytes, CHAT_RESPONSE.len() as u64);
        assert_eq!(ex[1].api, Api::OpenAiEmbeddings);
        assert_eq!(
            ex[1].usage,
            Some(Usage {
                input: 1,
                ..Usage::default()
            })
        );
        assert_eq!(ex[2].api, Api::AnthropicMessages);
        assert!(ex[2].stream && ex[2].complete);
        assert_eq!(
            ex[2].usage,
            Some(Usage {
                input: 25,
                output: 9,
                cached: 4,
                cache_write: 0
            })
        );
        assert_eq!(ex[3].usage, ex[0].usage);
        // The Authorization header's key is not a finding: only bodies are scanned.
        assert!(!out.iter().any(|o| matches!(o, Output::Secret(_))));
    }
}

#[test]
fn anthropic_stream_split_at_every_byte() {
    let req = request(
        "/v1/messages",
        "",
        br#"{"model":"claude-sonnet-4-20250514","stream":true}"#,
    );
    let resp = sse_response("", ANTHROPIC_EVENTS);
    let mut whole = Tracker::new(None);
    let want = run(
        &mut whole,
        &[(Direction::Sent, &req), (Direction::Received, &resp)],
        resp.len(),
    );
    assert_eq!(exchanges(&want).len(), 1);
    for cut in 0..=resp.len() {
        let mut t = Tracker::new(None);
        let mut out = t.feed(Direction::Sent, &req);
        out.extend(t.feed(Direction::Received, &resp[..cut]));
        out.extend(t.feed(Direction::Received, &resp[cut..]));
        out.extend(t.close());
        assert_eq!(out, want, "split at {cut}");
    }
}

#[test]
fn gemini_and_openai_streams() {
    let gem_req = request(
        "/v1beta/models/gemini-2.0-flash:generateContent?key=AIzaSyD-4bC9xYz_0123456789abcdefghijk",
        "Content-Type: application/json\r\n",
        br#"{"contents":[{"parts":[{"text":"hi"}]}],"generationConfig":{"maxOutputTokens":100}}"#,
    );
    let gem = br#"{"candidates":[{"content":{"parts":[{"text":"Hello"}],"role":"model"}}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":1,"totalTokenCount":4},"modelVersion":"gemini-2.0-flash"}"#;
    let oai_req = request(
        "/v1/chat/completions",
        "",
        br#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    );
    let events = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":8,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
    let mut t = Tracker::new(Some(Arc::new(SecretRules::new(&[]))));
    let out = run(
        &mut t,
        &[
            (Direction::Sent, &gem_req),
            (Direction::Received, &response("", gem)),
            (Direction::Sent, &oai_req),
            (Direction::Received, &sse_response("", events)),
        ],
        9,
    );
    let ex = exchanges(&out);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].api, Api::Gemini);
    assert_eq!(
        ex[0].path,
        "/v1beta/models/gemini-2.0-flash:generateContent"
    );
    assert_eq!(ex[0].model(), Some("gemini-2.0-flash"));
    assert_eq!(ex[0].max_tokens, Some(100));
    assert_eq!(
        ex[0].usage,
        Some(Usage {
            input: 3,
            output: 1,
            ..Usage::default()
        })
    );
    assert!(ex[1].stream);
    assert_eq!(
        ex[1].usage,
        Some(Usage {
            input: 8,
            output: 2,
            ..Usage::default()
        })
    );
    // The key in Gemini's query is the request's own credential, not a finding.
    assert!(!out.iter().any(|o| matches!(o, Output::Secret(_))));
}

#[test]
fn http2_is_reported_once_and_ignored() {
    let mut t = Tracker::new(None);
    let mut out = t.feed(Direction::Sent, crate::plaintext::http1::H2_PREFACE);
    out.extend(t.feed(Direction::Sent, &[0, 0, 0, 4, 0, 0, 0, 0, 0]));
    out.extend(t.feed(
        Direction::Received,
        &[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100],
    ));
    out.extend(t.close());
    assert_eq!(out, vec![Output::Http2]);
    assert!(t.http2());
    assert!(t.ignored() > 0);
}

#[test]
fn secrets_are_found_before_the_request_ends() {
    let key = format!("sk-ant-api03-{}", "Q".repeat(90));
    let body = format!(
        r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"my key is {key} please"}}]}}"#
    );
    let req = request("/v1/chat/completions", "", body.as_bytes());
    let at = req.len() - 5; // after the key and a space, before the body's end
    let mut t = Tracker::new(Some(Arc::new(SecretRules::new(&[]))));
    let mut out = Vec::new();
    for p in req[..at].chunks(13) {
        out.extend(t.feed(Direction::Sent, p));
    }
    // The finding is out although the request is not complete.
    let Some(Output::Secret(f)) = out.iter().find(|o| matches!(o, Output::Secret(_))) else {
        panic!("no finding before the request's end: {out:?}");
    };
    assert_eq!(f.kind, "anthropic_key");
    assert!(!format!("{out:?}").contains(&key[..20]));
    // Compressed request bodies are scanned too.
    let gz = encode(Coding::Gzip, body.as_bytes());
    let req = request("/v1/chat/completions", "Content-Encoding: gzip\r\n", &gz);
    let mut t = Tracker::new(Some(Arc::new(SecretRules::new(&[]))));
    let out = run(&mut t, &[(Direction::Sent, &req)], 7);
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::Secret(_)))
            .count(),
        1
    );
}

#[test]
fn bad_input_is_counted_and_survived() {
    // A bomb: the body stops at the cap, the exchange is still reported.
    let bomb = encode(Coding::Gzip, &vec![b' '; 4 * 1024 * 1024]);
    let req = request("/v1/chat/completions", "", b"{}");
    let mut t = Tracker::with_cap(None, 256 * 1024);
    let out = run(
        &mut t,
        &[
            (Direction::Sent, &req),
            (
                Direction::Received,
                &response("Content-Encoding: gzip\r\n", &bomb),
            ),
        ],
        4096,
    );
    assert_eq!(problems(&out), vec!["decompression_bomb"]);
    assert_eq!(exchanges(&out)[0].response_bytes, 256 * 1024);
    assert_eq!(exchanges(&out)[0].usage, None);

    // Content-Length larger than the body, then the close.
    let mut resp = response("", CHAT_RESPONSE);
    let cl = format!("Content-Length: {}", CHAT_RESPONSE.len());
    let lie = String::from_utf8_lossy(&resp).replace(&cl, "Content-Length: 99999");
    resp = lie.into_bytes();
    let mut t = Tracker::new(None);
    let out = run(
        &mut t,
        &[(Direction::Sent, &req), (Direction::Received, &resp)],
        50,
    );
    assert_eq!(problems(&out), vec!["truncated"]);
    let ex = exchanges(&out);
    assert!(!ex[0].complete);
    // What had arrived is still read.
    assert_eq!(
        ex[0].usage,
        Some(Usage {
            input: 11,
            output: 2,
            ..Usage::default()
        })
    );

    // Corrupt gzip, unsupported coding, a response nobody asked for, garbage.
    let mut t = Tracker::new(None);
    let out = run(
        &mut t,
        &[
            (
                Direction::Received,
                &response("Content-Encoding: gzip\r\n", b"not gzip at all"),
            ),
            (Direction::Sent, &req),
            (
                Direction::Received,
                &response("Content-Encoding: compress\r\n", b"xx"),
            ),
            (Direction::Received, b"\x00\x01garbage\r\n\r\n"),
        ],
        3,
    );
    assert_eq!(
        problems(&out),
        vec![
            "unmatched_response",
            "corrupt_body",
            "unsupported_coding",
            "not_http1"
        ]
    );
    assert_eq!(exchanges(&out).len(), 1);

    // Pipelining past MAX_PENDING.
    let mut t = Tracker::new(None);
    let many = req.repeat(MAX_PENDING + 2);
    let out = run(&mut t, &[(Direction::Sent, &many)], 1000);
    assert_eq!(problems(&out), vec!["pending_overflow"; 2]);
}

#[test]
fn early_answer_and_head() {
    // The server refuses before the body is complete (413), then closes.
    let req = request(
        "/v1/chat/completions",
        "",
        &br#"{"model":"gpt-4o","messages":"#.repeat(10),
    );
    let mut t = Tracker::new(None);
    let mut out = t.feed(Direction::Sent, &req[..req.len() / 2]);
    out.extend(t.feed(
        Direction::Received,
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ));
    out.extend(t.feed(Direction::Sent, &req[req.len() / 2..]));
    out.extend(t.close());
    let ex = exchanges(&out);
    assert_eq!((ex.len(), ex[0].status), (1, 413));
    assert_eq!(ex[0].model.as_deref(), Some("gpt-4o"));
    // HEAD: no body whatever Content-Length says; the next response is read.
    let mut t = Tracker::new(None);
    let out = run(
        &mut t,
        &[
            (
                Direction::Sent,
                b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
            ),
            (Direction::Sent, &req),
            (
                Direction::Received,
                b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n",
            ),
            (Direction::Received, &response("", CHAT_RESPONSE)),
        ],
        11,
    );
    assert_eq!(problems(&out), Vec::<&str>::new());
    assert_eq!(exchanges(&out).len(), 2);
    assert!(exchanges(&out)[1].usage.is_some());
}

/// The vectors of tests/src/fake_vectors.rs: what curl and the official
/// Python SDKs sent to the fake providers (tidy and realistic: compressed
/// bodies, CDN headers, several events per write) and what the fakes
/// answered; every exchange's usage must be the fakes' true count.
#[test]
fn vectors_from_real_clients_and_the_fakes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/plaintext/testdata/exact");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let expected: serde_json::Value = serde_json::from_slice(&read("expected.json"))
        .unwrap_or_else(|e| panic!("expected.json: {e}"));
    let cases = expected.as_object().expect("an object of cases");
    assert!(cases.len() >= 6);
    for (name, case) in cases {
        let connections = case["connections"].as_u64().unwrap_or(0) as usize;
        for piece in [1, 7, 1400, 16_384, usize::MAX] {
            let mut out = Vec::new();
            for c in 0..connections {
                let sent = read(&format!("{name}.c{c}.sent"));
                let received = read(&format!("{name}.c{c}.received"));
                let mut t = Tracker::new(Some(Arc::new(SecretRules::new(&[]))));
                out.extend(run(
                    &mut t,
                    &[(Direction::Sent, &sent), (Direction::Received, &received)],
                    piece.min(sent.len().max(received.len())),
                ));
            }
            assert_eq!(
                problems(&out),
                Vec::<&str>::new(),
                "{name}, pieces of {piece}"
            );
            let ex = exchanges(&out);
            let want = case["exchanges"].as_array().expect("exchanges");
            assert_eq!(ex.len(), want.len(), "{name}, pieces of {piece}");
            for (got, want) in ex.iter().zip(want) {
                let usage = got
                    .usage
                    .unwrap_or_else(|| panic!("{name}: no usage in {got:?}"));
                assert_eq!(
                    (usage.input, usage.output),
                    (
                        want["prompt"].as_u64().unwrap_or(0),
                        want["completion"].as_u64().unwrap_or(0)
                    ),
                    "{name}, pieces of {piece}: {got:?}"
                );
                assert_eq!(got.model.as_deref(), want["model"].as_str(), "{name}");
                assert_eq!(
                    got.stream,
                    want["stream"].as_bool().unwrap_or(false),
                    "{name}"
                );
                assert!(got.complete && got.status == 200, "{name}: {got:?}");
            }
            let kinds: Vec<&str> = out
                .iter()
                .filter_map(|o| match o {
                    Output::Secret(f) => Some(f.kind.as_str()),
                    _ => None,
                })
                .collect();
            let want_kinds: Vec<&str> = case["secrets"]
                .as_array()
                .expect("secrets")
                .iter()
                .filter_map(|k| k.as_str())
                .collect();
            assert_eq!(
                kinds, want_kinds,
                "{name}: secrets (the credentials in headers are not findings)"
            );
        }
    }
    // The realistic vectors do carry what they claim.
    let realistic = read("curl-openai-realistic.c0.received");
    let text = String::from_utf8_lossy(&realistic);
    assert!(text.contains("Content-Encoding: br") && text.contains("server-timing"));
    let sdk = read("sdk-openai-realistic.c0.received");
    assert!(String::from_utf8_lossy(&sdk).contains("Content-Encoding: gzip"));
}

/// Throughput of the reader (docs/exact-tokens.md, "Cost"): a 3 MiB
/// request body scanned for secrets, a 16 MiB stream of OpenAI chunks, a
/// 3 MiB JSON response gzip-compressed, in 16 KiB pieces (rates of the
/// bytes fed). Not a timed
/// test: run with
/// `cargo test --release -p llm-egress -- --ignored reader_throughput --nocapture`.
#[test]
#[ignore = "a measurement, not a test"]
fn reader_throughput() {
    let prompt: String = (0..4 * 1024 * 1024 / 64)
        .map(|i| format!("word{i:08} and some more text of the prompt.. "))
        .collect();
    let body = format!(
        r#"{{"model":"gpt-4o","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let req = request("/v1/chat/completions", "", body.as_bytes());
    let mut events = Vec::new();
    while events.len() < 16 * 1024 * 1024 {
        events.extend_from_slice(b"data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" token\"},\"finish_reason\":null}]}\n\n");
    }
    events.extend_from_slice(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
    let stream = sse_response("", &events);
    let buffered = format!(
        r#"{{"model":"gpt-4o","choices":[{{"message":{{"content":"{prompt}"}}}}],"usage":{{"prompt_tokens":1,"completion_tokens":2}}}}"#
    );
    let gz = response(
        "Content-Encoding: gzip\r\n",
        &encode(Coding::Gzip, buffered.as_bytes()),
    );
    for (what, dir, bytes) in [
        ("request, secrets on", Direction::Sent, &req),
        ("SSE stream, chunked", Direction::Received, &stream),
        ("gzip JSON body (3 MiB decoded)", Direction::Received, &gz),
    ] {
        let mut t = Tracker::new(Some(Arc::new(SecretRules::new(&[]))));
        if dir == Direction::Received {
            t.feed(Direction::Sent, &request("/v1/chat/completions", "", b"{}"));
        }
        let start = std::time::Instant::now();
        let mut n = 0;
        for p in bytes.chunks(16 * 1024) {
            n += t.feed(dir, p).len();
        }
        n += t.close().len();
        let s = start.elapsed().as_secs_f64();
        eprintln!(
            "{what}: {:.1} MiB in {:.3} s = {:.0} MiB/s ({n} outputs)",
            bytes.len() as f64 / 1048576.0,
            s,
            bytes.len() as f64 / 1048576.0 / s
        );
    }
}
