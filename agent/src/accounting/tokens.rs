//! Token estimates from encrypted traffic: prompt and completion tokens of
//! one provider connection from what the kernel sees of it (payload bytes
//! and payload segments each way, duration), never from its content.
//!
//! The method (docs/tokens.md): a connection is one TLS handshake and one
//! HTTP request/response. Its bytes are a fixed part (handshake, headers,
//! JSON envelope) plus a part that grows with the tokens; both are straight
//! lines whose constants were fitted on a corpus of real-format requests
//! against fake providers that report the true usage
//! (tests/tests/tokens.rs). First the response's shape is read from the
//! segments and the timing:
//!
//! - **streamed** (SSE): many small segments, one event per token; the
//!   completion is the received bytes over the bytes of one event;
//! - **buffered**: few full segments; the completion is the received bytes
//!   over the bytes of one token of JSON text;
//! - **not generated** (embeddings and the like): buffered, but arrived
//!   faster than any model generates text; no completion tokens.
//!
//! The prompt is the sent bytes over the bytes of one prompt token, after
//! the fixed part of that shape (a streamed request says so in its body).
//!
//! Pure: no I/O, no state. Every count made here is `source="estimated"`.

use std::time::Duration;

/// The `source` label and meaning of every count made here.
pub const SOURCE: &str = "estimated";

/// Wire format family, from the provider's name: `anthropic` speaks the
/// Messages API; every other provider is taken as OpenAI-compatible (most
/// catalog providers offer that API; Gemini, Bedrock and Cohere's own
/// formats are not calibrated and get these constants too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    OpenAi,
    Anthropic,
}

impl Family {
    pub fn of(provider: &str) -> Family {
        match provider {
            "anthropic" => Family::Anthropic,
            _ => Family::OpenAi,
        }
    }

    fn calibration(self) -> &'static Calibration {
        match self {
            Family::OpenAi => &OPENAI,
            Family::Anthropic => &ANTHROPIC,
        }
    }
}

/// Who sent the request, from the executable name of the process that
/// connected: the official SDKs (Python, Node) send ~340–380 bytes more
/// headers per request than curl (`x-stainless-*`, user agent), ~85 prompt
/// tokens' worth, which a short prompt cannot absorb.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Client {
    /// curl and other clients that send few headers.
    Plain,
    /// `python*`, `node`, `bun`, `deno`: taken as the official SDKs.
    Sdk,
}

impl Client {
    pub fn name(self) -> &'static str {
        match self {
            Client::Plain => "plain",
            Client::Sdk => "sdk",
        }
    }

    pub fn of_name(name: &str) -> Option<Client> {
        [Client::Plain, Client::Sdk]
            .into_iter()
            .find(|c| c.name() == name)
    }

    pub fn of(process: &str) -> Client {
        let p = process.to_ascii_lowercase();
        if p.starts_with("python") || matches!(p.as_str(), "node" | "nodejs" | "bun" | "deno") {
            Client::Sdk
        } else {
            Client::Plain
        }
    }
}

/// What the kernel reports of one connection (`ConnStats` at close).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Payload bytes sent and acknowledged (+1 for a FIN).
    pub bytes_sent: u64,
    /// Payload bytes received (+1 for a FIN).
    pub bytes_received: u64,
    /// Payload-carrying segments received and sent.
    pub segments_in: u32,
    pub segments_out: u32,
    /// Handshake done to close.
    pub duration: Duration,
    /// application_data TLS records received, when the kernel counted
    /// every one (no lost sync, docs/events.md "TLS records"); `None`
    /// otherwise (not TLS, a gap).
    pub app_records_in: Option<u32>,
}

/// How the response came.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shape {
    /// One JSON body.
    Buffered,
    /// Server-sent events, one per token.
    Streamed,
    /// A body that came faster than text is generated (embeddings):
    /// prompt tokens only.
    NotGenerated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub prompt: u64,
    pub completion: u64,
    pub shape: Shape,
    /// HTTP requests the connection is taken to have carried.
    pub requests: u32,
    /// `prompt` and `completion` before they were clamped at 0: the
    /// figures the lines give (below 0 when the bytes are under the fixed
    /// part), which `crate::accounting::estimate_learning` learns from.
    pub prompt_z: i64,
    pub completion_z: i64,
}

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Buffered => "buffered",
            Shape::Streamed => "streamed",
            Shape::NotGenerated => "not_generated",
        }
    }

    pub fn of_name(name: &str) -> Option<Shape> {
        [Shape::Buffered, Shape::Streamed, Shape::NotGenerated]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl Estimate {
    pub fn streamed(&self) -> bool {
        self.shape == Shape::Streamed
    }
}

/// A line `bytes = fixed + per_token * tokens`.
#[derive(Clone, Copy, Debug)]
struct Line {
    fixed: f64,
    per_token: f64,
}

impl Line {
    /// The line of `n` requests on one connection: the handshake's
    /// `handshake` bytes once, the rest of the fixed part `n` times.
    fn repeated(self, n: u32, handshake: f64) -> Line {
        let per_request = (self.fixed - handshake).max(0.0);
        Line {
            fixed: handshake + per_request * f64::from(n),
            ..self
        }
    }

    /// Tokens for `bytes`: never negative, rounded.
    fn tokens(&self, bytes: u64) -> u64 {
        self.signed(bytes).max(0) as u64
    }

    /// Tokens for `bytes`, below 0 under the fixed part, rounded.
    fn signed(&self, bytes: u64) -> i64 {
        ((bytes as f64 - self.fixed) / self.per_token).round() as i64
    }
}

/// The constants of one family. Each `fixed` absorbs the framing tokens
/// the provider counts (OpenAI: 3 per message, 3 for the reply), so it is
/// the fixed bytes less those tokens' worth.
#[derive(Clone, Copy, Debug)]
struct Calibration {
    /// Sent bytes against prompt tokens, for each shape's requests, from
    /// a [`Client::Plain`] client.
    prompt_buffered: Line,
    prompt_streamed: Line,
    prompt_not_generated: Line,
    /// Received bytes against completion tokens.
    completion_buffered: Line,
    completion_streamed: Line,
    /// What a [`Client::Sdk`] request sends more than a plain one.
    sdk_extra_sent: f64,
}

// Where the numbers come from: least-squares fits printed by
// `LLM_EGRESS_TOKENS_FIT=1 LLM_EGRESS_TOKENS_SEED=1000 cargo test -p
// llm-egress-tests --test tokens -- --nocapture` (120 requests by curl
// 7.88/OpenSSL 3.0 over TLS 1.3 and HTTP/1.1 against the fake providers of
// tests/src/fake_provider.rs), rounded. The checked run uses another seed.
// `sdk_extra_sent`: the same fit of the same corpus sent by the official
// Python SDKs (`LLM_EGRESS_TOKENS_PYTHON`, openai 3.57, anthropic 2.14),
// less curl's intercepts (each shape within ±6 B of the mean).
// What they contain: sent = ClientHello (~0.5 kB) + Finished + request
// headers (~0.4 kB with a real-length API key) + JSON envelope + text;
// received = server handshake flight (certificate chain 1.1 kB) + session
// tickets + response headers (~1.1 kB, shaped like the provider's) + JSON
// envelope + text (buffered) or one SSE event per token (streamed).

/// OpenAI-compatible chat completions and embeddings.
const OPENAI: Calibration = Calibration {
    // English prose: ~4.2 bytes of JSON string per token (cl100k_base and
    // o200k_base alike on this text).
    prompt_buffered: Line {
        fixed: 1095.0,
        per_token: 4.196,
    },
    // `"stream":true,"stream_options":{"include_usage":true}` adds ~55 B.
    prompt_streamed: Line {
        fixed: 1150.0,
        per_token: 4.198,
    },
    prompt_not_generated: Line {
        fixed: 1077.0,
        per_token: 4.178,
    },
    // A pretty-printed `chat.completion` with `usage`: ~0.7 kB of envelope.
    completion_buffered: Line {
        fixed: 3720.0,
        per_token: 4.208,
    },
    // One `chat.completion.chunk` event (~300 B of JSON, HTTP chunk
    // framing, 22 B of TLS record header and tag) per token.
    completion_streamed: Line {
        fixed: 3900.0,
        per_token: 328.6,
    },
    sdk_extra_sent: 340.0,
};

/// Anthropic Messages API.
const ANTHROPIC: Calibration = Calibration {
    prompt_buffered: Line {
        fixed: 1063.0,
        per_token: 4.215,
    },
    // `"stream":true` adds 14 B.
    prompt_streamed: Line {
        fixed: 1099.0,
        per_token: 4.172,
    },
    // Anthropic has no embeddings endpoint: a body that came too fast to be
    // generated is still taken as a buffered request's.
    prompt_not_generated: Line {
        fixed: 1063.0,
        per_token: 4.215,
    },
    completion_buffered: Line {
        fixed: 3082.0,
        per_token: 4.213,
    },
    // One `content_block_delta` event (~120 B + framing) per token.
    completion_streamed: Line {
        fixed: 3768.0,
        per_token: 147.19,
    },
    sdk_extra_sent: 382.0,
};

/// Names the constants the estimate's figures come from (the families'
/// lines, the handshake's share, the shape thresholds): lines learned from
/// those figures (`crate::accounting::estimate_learning`) hold for this
/// id only. The first 16 hex digits of a SHA-256 of the constants.
pub fn calibration_id() -> String {
    let constants = format!(
        "{OPENAI:?}{ANTHROPIC:?}{STREAM_MIN_SEGMENTS}/{STREAM_MAX_BYTES_PER_SEGMENT}/{MAX_GENERATION_TOKENS_PER_SECOND}/{MIN_REQUEST_BYTES}/{HANDSHAKE_SENT}/{HANDSHAKE_RECEIVED}/{HANDSHAKE_SEGMENTS_SENT}/{MIN_FIXED_SHARE}/{HANDSHAKE_APP_RECORDS}"
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, constants.as_bytes());
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A streamed response arrives as at least this many payload segments…
/// (a buffered one, as 3–4 on loopback and ~1 per 1.4 kB on the internet;
/// the shortest streamed answer of the corpus, ~15 tokens, as 20).
pub const STREAM_MIN_SEGMENTS: u32 = 8;

/// …of at most this many bytes on average (corpus: streamed 150–390 B,
/// buffered at least 950 B; full internet segments are ~1.4 kB).
pub const STREAM_MAX_BYTES_PER_SEGMENT: u64 = 700;

/// Faster than any model generates text (fast hosted models reach ~2,000
/// tokens/s; the fake providers generate 1,000/s): a buffered body that
/// would be this many tokens per second of connection was not generated
/// (an embedding vector: 8–30 kB in milliseconds).
pub const MAX_GENERATION_TOKENS_PER_SECOND: f64 = 5_000.0;

/// Below this many sent bytes no request was made (a handshake alone is
/// ~600 B; the shortest request of the corpus sends ~1.1 kB).
pub const MIN_REQUEST_BYTES: u64 = 800;

/// Bytes of the TLS handshake each way: the part of a connection's fixed
/// bytes that keep-alive requests after the first do not repeat (the rest,
/// headers and JSON envelope, comes with every request). From the
/// keep-alive cases of the corpus (seed 1000, curl, 4 requests a
/// connection) against the one-request lines: ClientHello and Finished
/// (~620 B) sent; the server's flight with the 1.1 kB certificate chain and
/// the session tickets (~1.6 kB) received.
pub const HANDSHAKE_SENT: f64 = 620.0;
pub const HANDSHAKE_RECEIVED: f64 = 1_610.0;

/// Payload segments a client sends before its first request (ClientHello,
/// Finished) …
pub const HANDSHAKE_SEGMENTS_SENT: u32 = 2;

impl Client {
    /// … and per request: curl writes headers and body at once; the Python
    /// SDKs (httpx) write them apart (corpus on loopback: a connection of
    /// 3 keep-alive requests sends 6 segments from curl, which also sends
    /// a close_notify, and 8 from the SDKs).
    pub fn segments_per_request(self) -> u32 {
        match self {
            Client::Plain => 1,
            Client::Sdk => 2,
        }
    }
}

/// Share of a request's (and a response's) fixed bytes below which no
/// request is taken to have been made: requests vary by tens of bytes
/// around the calibrated fixed part (model names, system prompts).
const MIN_FIXED_SHARE: f64 = 0.9;

/// The most requests `t` can have carried: each one sends at least 90% of a
/// request's fixed bytes (headers, JSON envelope) and receives at least
/// 90% of a response's, after the handshake. A bound on the request
/// count from other evidence (crate::accounting::conn_tokens) that cannot make short
/// requests vanish.
pub fn max_requests(family: Family, client: Client, t: &Traffic) -> u32 {
    let (prompt, completion) = lines(family, client, shape(family, t));
    let fits = |bytes: u64, line: Line, handshake: f64| {
        let per = ((line.fixed - handshake) * MIN_FIXED_SHARE).max(1.0);
        ((bytes as f64 - handshake).max(0.0) / per).floor() as u64
    };
    let mut n = fits(t.bytes_sent, prompt, HANDSHAKE_SENT);
    if let Some(c) = completion {
        n = n.min(fits(t.bytes_received, c, HANDSHAKE_RECEIVED));
    }
    n.clamp(1, u64::from(u32::MAX)) as u32
}

/// The prompt and completion lines of `shape` for `client`.
fn lines(family: Family, client: Client, shape: Shape) -> (Line, Option<Line>) {
    let c = family.calibration();
    let (mut prompt, completion) = match shape {
        Shape::Buffered => (c.prompt_buffered, Some(c.completion_buffered)),
        Shape::Streamed => (c.prompt_streamed, Some(c.completion_streamed)),
        Shape::NotGenerated => (c.prompt_not_generated, None),
    };
    if client == Client::Sdk {
        prompt.fixed += c.sdk_extra_sent;
    }
    (prompt, completion)
}

/// The prompt tokens of `t` if its `n` requests had responses of `shape`.
pub fn prompt_as(family: Family, client: Client, t: &Traffic, n: u32, shape: Shape) -> u64 {
    lines(family, client, shape)
        .0
        .repeated(n.max(1), HANDSHAKE_SENT)
        .tokens(t.bytes_sent)
}

/// The response shape of `t`.
pub fn shape(family: Family, t: &Traffic) -> Shape {
    let segments = u64::from(t.segments_in.max(1));
    if t.segments_in >= STREAM_MIN_SEGMENTS
        && t.bytes_received / segments <= STREAM_MAX_BYTES_PER_SEGMENT
    {
        return Shape::Streamed;
    }
    let body = family
        .calibration()
        .completion_buffered
        .tokens(t.bytes_received) as f64;
    let seconds = t.duration.as_secs_f64().max(1e-3);
    if body / seconds > MAX_GENERATION_TOKENS_PER_SECOND {
        Shape::NotGenerated
    } else {
        Shape::Buffered
    }
}

/// Prompt and completion tokens of one connection from `client` to a
/// provider of `family`; `None` when it carried no request (a handshake
/// that never completed, or no payload). One request.
#[cfg(test)]
pub fn estimate(family: Family, client: Client, t: &Traffic) -> Option<Estimate> {
    estimate_requests(family, client, t, 1)
}

/// [`estimate`] of a connection that carried `n` requests (at least 1, at
/// most [`max_requests`]): one handshake, `n` times the per-request fixed
/// bytes each way.
pub fn estimate_requests(family: Family, client: Client, t: &Traffic, n: u32) -> Option<Estimate> {
    if t.bytes_sent < MIN_REQUEST_BYTES || t.bytes_received == 0 {
        return None;
    }
    let n = n.clamp(1, max_requests(family, client, t));
    let shape = shape(family, t);
    let (prompt, completion) = lines(family, client, shape);
    // A body taken as not generated has no completion; its figure as a
    // buffered one is still what estimate learning maps to exact counts
    // (a stream the shapes mistook for it has some).
    let mut completion_z = completion
        .unwrap_or(family.calibration().completion_buffered)
        .repeated(n, HANDSHAKE_RECEIVED)
        .signed(t.bytes_received);
    let completion = completion_z.max(0) as u64;
    if shape == Shape::Streamed
        && let Some(events) = stream_events(family, t, n)
    {
        // One event per record, if the bytes agree (a server that
        // writes several events per record has far more bytes per
        // record than one event's: then the bytes stand).
        let (lo, hi) = (completion as f64 * 0.75, completion as f64 * 1.25 + 3.0);
        if (lo..=hi).contains(&(events as f64)) {
            completion_z = events as i64;
        }
    }
    let prompt_z = prompt.repeated(n, HANDSHAKE_SENT).signed(t.bytes_sent);
    Some(Estimate {
        prompt: prompt_z.max(0) as u64,
        completion: if shape == Shape::NotGenerated {
            0
        } else {
            completion_z.max(0) as u64
        },
        shape,
        requests: n,
        prompt_z,
        completion_z,
    })
}

/// application_data records a stream's connection receives besides one per
/// token: the server's encrypted handshake flight and session tickets
/// (rustls, like most servers: 2) …
pub const HANDSHAKE_APP_RECORDS: u32 = 2;

impl Family {
    /// … and per streamed response: OpenAI the headers, the role chunk,
    /// the finish chunk, `[DONE]` and the last HTTP chunk (5; a usage
    /// chunk makes 6); Anthropic the headers, `message_start`,
    /// `content_block_start`, `ping`, `content_block_stop`,
    /// `message_delta`, `message_stop` and the last chunk (8).
    pub fn stream_fixed_records(self) -> u32 {
        match self {
            Family::OpenAi => 5,
            Family::Anthropic => 8,
        }
    }
}

/// Token events of `n` streamed responses from the records received, when
/// the kernel counted them all.
pub fn stream_events(family: Family, t: &Traffic, n: u32) -> Option<u64> {
    let records = t.app_records_in?;
    let fixed = HANDSHAKE_APP_RECORDS + n.max(1) * family.stream_fixed_records();
    Some(u64::from(records.saturating_sub(fixed)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traffic(sent: u64, received: u64, segments_in: u32, millis: u64) -> Traffic {
        Traffic {
            bytes_sent: sent,
            bytes_received: received,
            segments_in,
            segments_out: 4,
            duration: Duration::from_millis(millis),
            app_records_in: None,
        }
    }

    /// Bytes of `tokens` on `line`, as the fits say.
    fn bytes(line: Line, tokens: u64) -> u64 {
        (line.fixed + line.per_token * tokens as f64).round() as u64
    }

    #[test]
    fn family_follows_the_provider_name() {
        assert_eq!(Family::of("anthropic"), Family::Anthropic);
        assert_eq!(Family::of("openai"), Family::OpenAi);
        assert_eq!(Family::of("groq"), Family::OpenAi);
        assert_eq!(Family::of("internal-llm"), Family::OpenAi);
    }

    #[test]
    fn client_follows_the_executable_name() {
        assert_eq!(Client::of("python3.11"), Client::Sdk);
        assert_eq!(Client::of("node"), Client::Sdk);
        assert_eq!(Client::of("curl"), Client::Plain);
        assert_eq!(Client::of("support-bot"), Client::Plain);
    }

    #[test]
    fn sdk_requests_carry_more_fixed_bytes() {
        let sent = bytes(OPENAI.prompt_buffered, 30) + OPENAI.sdk_extra_sent as u64;
        let t = traffic(sent, bytes(OPENAI.completion_buffered, 20), 3, 100);
        assert_eq!(
            estimate(Family::OpenAi, Client::Sdk, &t).map(|e| e.prompt),
            Some(30)
        );
        assert_eq!(
            estimate(Family::OpenAi, Client::Plain, &t).map(|e| e.prompt),
            Some(30 + 81)
        );
    }

    #[test]
    fn buffered_response_is_inverted_from_the_fitted_lines() {
        let sent = bytes(OPENAI.prompt_buffered, 500);
        let received = bytes(OPENAI.completion_buffered, 300);
        let e = estimate(
            Family::OpenAi,
            Client::Plain,
            &traffic(sent, received, 3, 400),
        )
        .unwrap();
        assert_eq!(
            e,
            Estimate {
                prompt: 500,
                completion: 300,
                shape: Shape::Buffered,
                requests: 1,
                prompt_z: 500,
                completion_z: 300,
            }
        );
        assert!(!e.streamed());
    }

    #[test]
    fn many_small_segments_are_a_stream() {
        let received = bytes(ANTHROPIC.completion_streamed, 200);
        let t = traffic(bytes(ANTHROPIC.prompt_streamed, 40), received, 210, 900);
        let e = estimate(Family::Anthropic, Client::Plain, &t).unwrap();
        assert_eq!(
            (e.prompt, e.completion, e.shape),
            (40, 200, Shape::Streamed)
        );
        // The same bytes in few full segments are one buffered body.
        let t = Traffic {
            segments_in: 20,
            duration: Duration::from_secs(10),
            ..t
        };
        assert_eq!(shape(Family::Anthropic, &t), Shape::Buffered);
        // A handful of small segments is a short buffered answer, not a stream.
        let t = traffic(1200, 3500, 4, 30);
        assert_eq!(shape(Family::OpenAi, &t), Shape::Buffered);
    }

    #[test]
    fn a_stream_counts_one_token_per_record_when_the_bytes_agree() {
        let received = bytes(OPENAI.completion_streamed, 300) + 700;
        let t = traffic(bytes(OPENAI.prompt_streamed, 40), received, 310, 900);
        let by_bytes = estimate(Family::OpenAi, Client::Plain, &t).unwrap();
        assert_eq!(by_bytes.shape, Shape::Streamed);
        assert!(by_bytes.completion > 300, "{by_bytes:?}");
        // 300 events + 5 fixed records + 2 of the handshake.
        let t = Traffic {
            app_records_in: Some(307),
            ..t
        };
        let e = estimate(Family::OpenAi, Client::Plain, &t).unwrap();
        assert_eq!(e.completion, 300);
        // A server that writes ten events per record: the bytes stand.
        let t = Traffic {
            app_records_in: Some(37),
            ..t
        };
        let e = estimate(Family::OpenAi, Client::Plain, &t).unwrap();
        assert_eq!(e.completion, by_bytes.completion);
        // Two streamed responses on one connection: 2 × 5 fixed records.
        let t = Traffic {
            app_records_in: Some(2 + 10 + 290),
            ..t
        };
        assert_eq!(stream_events(Family::OpenAi, &t, 2), Some(290));
    }

    #[test]
    fn a_body_faster_than_generation_has_no_completion() {
        // A 30 kB embedding vector within 20 ms.
        let t = traffic(bytes(OPENAI.prompt_not_generated, 300), 30_000, 4, 20);
        let e = estimate(Family::OpenAi, Client::Plain, &t).unwrap();
        assert_eq!(
            (e.prompt, e.completion, e.shape),
            (300, 0, Shape::NotGenerated)
        );
        // The same bytes over 30 s were generated.
        let t = Traffic {
            duration: Duration::from_secs(30),
            ..t
        };
        assert_eq!(shape(Family::OpenAi, &t), Shape::Buffered);
    }

    #[test]
    fn the_request_count_is_capped_by_the_fixed_bytes() {
        // A short SDK stream (corpus): two requests' fixed bytes do not fit.
        let t = Traffic {
            bytes_sent: 1_628,
            bytes_received: 7_019,
            segments_in: 30,
            segments_out: 5,
            duration: Duration::from_millis(137),
            app_records_in: None,
        };
        assert_eq!(max_requests(Family::Anthropic, Client::Sdk, &t), 1);
        assert_eq!(
            estimate_requests(Family::Anthropic, Client::Sdk, &t, 2),
            estimate_requests(Family::Anthropic, Client::Sdk, &t, 1)
        );
        // Three curl requests and buffered answers (corpus): they fit.
        let t = traffic(4_617, 9_598, 5, 16_000);
        let e = estimate_requests(Family::OpenAi, Client::Plain, &t, 3).unwrap();
        assert_eq!(e.requests, 3);
        // True: 618 prompt and 402 completion tokens (one request: 839, 895).
        assert!(
            e.prompt.abs_diff(618) < 15 && e.completion.abs_diff(402) < 15,
            "{e:?}"
        );
    }

    #[test]
    fn no_request_no_estimate() {
        assert_eq!(
            estimate(Family::OpenAi, Client::Plain, &traffic(0, 0, 0, 0)),
            None
        );
        // A handshake alone.
        assert_eq!(
            estimate(Family::OpenAi, Client::Plain, &traffic(600, 2_500, 2, 10)),
            None
        );
        // A request without any answer.
        assert_eq!(
            estimate(Family::OpenAi, Client::Plain, &traffic(2_000, 0, 0, 10)),
            None
        );
    }

    #[test]
    fn counts_never_go_negative_and_grow_with_bytes() {
        let small = estimate(
            Family::OpenAi,
            Client::Plain,
            &traffic(MIN_REQUEST_BYTES, 1, 1, 5),
        )
        .unwrap();
        assert_eq!((small.prompt, small.completion), (0, 0));
        let mut last = (0, 0);
        for k in 1..50u64 {
            let e = estimate(
                Family::OpenAi,
                Client::Plain,
                &traffic(1_000 + 100 * k, 3_000 + 100 * k, 3, 10_000),
            )
            .unwrap();
            assert!(
                e.prompt >= last.0 && e.completion >= last.1,
                "{e:?} after {last:?}"
            );
            last = (e.prompt, e.completion);
        }
    }
}
