//! Exchanges of one plaintext connection: the entry point of exact tokens
//! (docs/exact-tokens.md).
//!
//! Whatever delivers the plaintext of a TLS connection (the OpenSSL
//! uprobes) hands each piece to the connection's [`Tracker`] with its
//! direction: `feed(Direction::Sent, bytes)`. The tracker frames both
//! directions as HTTP/1.1 (src/http1.rs), decodes bodies (src/body_coding.rs),
//! reads the request's model and the response's usage as they stream
//! (src/usage.rs), scans request bodies for secrets (src/secrets.rs), pairs
//! responses with requests in order (keep-alive, pipelining), and returns
//! [`Output`]s: an [`Exchange`] per answered request, a [`Finding`] as soon
//! as a secret is seen (before the request is complete, so a caller can
//! stop the connection), `Http2` once when the client speaks HTTP/2 (the
//! caller keeps the estimate for that connection), and the [`Problem`]s
//! met (to count). Memory per connection is bounded: an unfinished head (64
//! KiB at most), a secret window (17 KiB), a decoder window while a
//! compressed body streams, and at most `MAX_PENDING` small request records;
//! no body is kept. Nothing here knows workloads, providers, metrics or
//! the kernel.

use std::{collections::VecDeque, sync::Arc};

use crate::{
    plaintext::body_coding::{Coding, Consumer, DecodeError, Decoder, MAX_DECODED},
    plaintext::http1::{BodyRule, Framer, Head, MessageSink, Side, Stop},
    plaintext::json_scan::JsonScan,
    plaintext::secrets::{Finding, SecretRules, SecretScan},
    plaintext::usage::{Api, RequestFields, Sse, Target, Usage, UsageFields, target},
};

/// Requests sent and not yet answered that are remembered; older ones are
/// dropped (and counted) when a client pipelines more.
pub const MAX_PENDING: usize = 16;

/// Which way plaintext went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the client (SSL_write): requests.
    Sent,
    /// To the client (SSL_read): responses.
    Received,
}

/// One answered request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub api: Api,
    pub method: String,
    /// The request target without its query (`?key=` is a credential).
    pub path: String,
    pub status: u16,
    /// The model the request names (body `model`, or Gemini's path).
    pub model: Option<String>,
    /// The model the response names (often with a date: `gpt-4o-2024-08-06`).
    pub response_model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// The provider's own counts; None: the response had none (an error,
    /// an OpenAI stream without `include_usage`, another API).
    pub usage: Option<Usage>,
    /// Decoded body sizes.
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub response_coding: Coding,
    /// The response ended as its framing says (not cut by a close).
    pub complete: bool,
}

impl Exchange {
    /// The model to label and price: the request's, else the response's.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref().or(self.response_model.as_deref())
    }
}

/// Something the tracker could not read, to count
/// (`llm_egress_http_problems_total{problem}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A framer stopped for the rest of the connection.
    Stopped(Side, Stop),
    /// A response cut by the close.
    Truncated,
    /// A body decoded past the cap.
    Bomb,
    /// A body not valid in its coding.
    Corrupt,
    /// A body in a coding the agent does not decode.
    UnsupportedCoding,
    /// A response with no request to pair it with.
    Unmatched,
    /// A request dropped because `MAX_PENDING` were waiting.
    PendingOverflow,
}

impl Problem {
    pub fn as_str(self) -> &'static str {
        match self {
            Problem::Stopped(_, stop) => stop.as_str(),
            Problem::Truncated => "truncated",
            Problem::Bomb => "decompression_bomb",
            Problem::Corrupt => "corrupt_body",
            Problem::UnsupportedCoding => "unsupported_coding",
            Problem::Unmatched => "unmatched_response",
            Problem::PendingOverflow => "pending_overflow",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Exchange(Exchange),
    Secret(Finding),
    /// The client sent the HTTP/2 preface: no exact counts on this
    /// connection (reported once).
    Http2,
    Problem(Problem),
}

/// What reads a request body.
struct ReqConsumer {
    json: bool,
    scan: JsonScan,
    fields: RequestFields,
    secrets: Option<(Arc<SecretRules>, SecretScan)>,
}

impl Consumer for ReqConsumer {
    fn consume(&mut self, data: &[u8]) {
        if self.json {
            self.scan.feed(data, &mut self.fields);
        }
        if let Some((rules, scan)) = &mut self.secrets {
            scan.feed(rules, data);
        }
    }
}

enum RespBody {
    Json(JsonScan),
    Sse(Sse),
}

/// What reads a response body.
struct RespConsumer {
    body: RespBody,
    usage: UsageFields,
}

impl Consumer for RespConsumer {
    fn consume(&mut self, data: &[u8]) {
        match &mut self.body {
            RespBody::Json(s) => s.feed(data, &mut self.usage),
            RespBody::Sse(s) => s.feed(data, &mut self.usage),
        }
    }
}

/// A request being read.
struct ReqInFlight {
    target: Target,
    method: String,
    path: String,
    /// None: a coding the agent does not decode.
    dec: Option<Decoder<ReqConsumer>>,
    /// A response already took it (the server answered early).
    answered: bool,
}

/// A request read and waiting for its response.
#[derive(Clone, Debug)]
struct Pending {
    target: Target,
    method: String,
    path: String,
    fields: RequestFields,
    bytes: u64,
}

struct RespInFlight {
    request: Option<Pending>,
    status: u16,
    coding: Coding,
    dec: Option<Decoder<RespConsumer>>,
}

/// Everything but the two framers (so a framer can feed it).
struct Core {
    rules: Option<Arc<SecretRules>>,
    cap: u64,
    req: Option<ReqInFlight>,
    pending: VecDeque<Pending>,
    resp: Option<RespInFlight>,
    out: Vec<Output>,
    http2: bool,
}

/// The tracker of one connection.
pub struct Tracker {
    sent: Framer,
    received: Framer,
    core: Core,
}

impl Tracker {
    /// `rules`: the secret rules to scan request bodies with; None: no scan.
    pub fn new(rules: Option<Arc<SecretRules>>) -> Self {
        Self::with_cap(rules, MAX_DECODED)
    }

    /// With a cap on each body's decoded size other than `MAX_DECODED`.
    pub fn with_cap(rules: Option<Arc<SecretRules>>, cap: u64) -> Self {
        Self {
            sent: Framer::new(Side::Request),
            received: Framer::new(Side::Response),
            core: Core {
                rules,
                cap,
                req: None,
                pending: VecDeque::new(),
                resp: None,
                out: Vec::new(),
                http2: false,
            },
        }
    }

    /// Reads the next plaintext of one direction.
    pub fn feed(&mut self, direction: Direction, data: &[u8]) -> Vec<Output> {
        match direction {
            Direction::Sent => self.sent.feed(data, &mut ReqSink(&mut self.core)),
            Direction::Received => self.received.feed(data, &mut RespSink(&mut self.core)),
        }
        std::mem::take(&mut self.core.out)
    }

    /// The connection closed: a response read until the close ends here.
    pub fn close(&mut self) -> Vec<Output> {
        self.sent.close(&mut ReqSink(&mut self.core));
        self.received.close(&mut RespSink(&mut self.core));
        std::mem::take(&mut self.core.out)
    }

    /// The client speaks HTTP/2 on this connection.
    pub fn http2(&self) -> bool {
        self.core.http2
    }

    /// Bytes ignored after a framer stopped (both directions).
    pub fn ignored(&self) -> u64 {
        self.sent.ignored + self.received.ignored
    }
}

fn strip_query(path: &str) -> String {
    path.split(['?', '#']).next().unwrap_or("").to_owned()
}

struct ReqSink<'a>(&'a mut Core);

impl ReqSink<'_> {
    fn drain_findings(&mut self) {
        let core = &mut *self.0;
        if let Some(req) = &mut core.req
            && let Some(dec) = &mut req.dec
            && let Some((_, scan)) = &mut dec.consumer().secrets
        {
            core.out.extend(scan.found.drain(..).map(Output::Secret));
        }
    }
}

impl MessageSink for ReqSink<'_> {
    fn head(&mut self, head: &Head) -> BodyRule {
        let core = &mut *self.0;
        let coding = Coding::parse(&head.content_encoding);
        if coding.is_none() {
            core.out.push(Output::Problem(Problem::UnsupportedCoding));
        }
        let json = head.content_type.is_empty() || head.content_type.contains("json");
        let consumer = ReqConsumer {
            json,
            scan: JsonScan::new(),
            fields: RequestFields::default(),
            secrets: core.rules.clone().map(|r| (r, SecretScan::new())),
        };
        core.req = Some(ReqInFlight {
            target: target(&head.path),
            method: head.method.clone(),
            path: strip_query(&head.path),
            dec: coding.map(|c| Decoder::new(c, consumer, core.cap)),
            answered: false,
        });
        BodyRule::Headers
    }

    fn body(&mut self, data: &[u8]) {
        if let Some(req) = &mut self.0.req
            && let Some(dec) = &mut req.dec
        {
            dec.write(data);
        }
        self.drain_findings();
    }

    fn end(&mut self, _complete: bool) {
        let core = &mut *self.0;
        let Some(mut req) = core.req.take() else {
            return;
        };
        let mut fields = RequestFields::default();
        let mut bytes = 0;
        if let Some(dec) = &mut req.dec {
            dec.finish();
            let c = dec.consumer();
            c.scan.finish(&mut c.fields);
            if let Some((rules, scan)) = &mut c.secrets {
                scan.finish(rules);
                core.out.extend(scan.found.drain(..).map(Output::Secret));
            }
            fields = std::mem::take(&mut c.fields);
            bytes = dec.decoded();
            if let Some(e) = dec.error {
                core.out.push(Output::Problem(decode_problem(e)));
            }
        }
        if req.answered {
            return;
        }
        if core.pending.len() >= MAX_PENDING {
            core.pending.pop_front();
            core.out.push(Output::Problem(Problem::PendingOverflow));
        }
        core.pending.push_back(Pending {
            target: req.target,
            method: req.method,
            path: req.path,
            fields,
            bytes,
        });
    }

    fn stop(&mut self, why: Stop) {
        let core = &mut *self.0;
        core.req = None;
        if why == Stop::Http2 {
            core.http2 = true;
            core.out.push(Output::Http2);
        } else {
            core.out
                .push(Output::Problem(Problem::Stopped(Side::Request, why)));
        }
    }
}

fn decode_problem(e: DecodeError) -> Problem {
    match e {
        DecodeError::Bomb => Problem::Bomb,
        DecodeError::Corrupt => Problem::Corrupt,
    }
}

struct RespSink<'a>(&'a mut Core);

impl MessageSink for RespSink<'_> {
    fn head(&mut self, head: &Head) -> BodyRule {
        let core = &mut *self.0;
        if (100..200).contains(&head.status) {
            core.resp = None;
            return BodyRule::Headers;
        }
        let request = core.pending.pop_front().or_else(|| {
            // Answered before the request was complete (an early error).
            let req = core.req.as_mut()?;
            req.answered = true;
            let fields = req
                .dec
                .as_mut()
                .map(|d| d.consumer().fields.clone())
                .unwrap_or_default();
            Some(Pending {
                target: req.target.clone(),
                method: req.method.clone(),
                path: req.path.clone(),
                fields,
                bytes: 0,
            })
        });
        if request.is_none() {
            core.out.push(Output::Problem(Problem::Unmatched));
        }
        let head_request = request.as_ref().is_some_and(|r| r.method == "HEAD");
        let coding = Coding::parse(&head.content_encoding);
        if coding.is_none() {
            core.out.push(Output::Problem(Problem::UnsupportedCoding));
        }
        let body = if head.content_type.starts_with("text/event-stream") {
            RespBody::Sse(Sse::new())
        } else {
            RespBody::Json(JsonScan::new())
        };
        let consumer = RespConsumer {
            body,
            usage: UsageFields::default(),
        };
        core.resp = Some(RespInFlight {
            request,
            status: head.status,
            coding: coding.unwrap_or(Coding::Identity),
            dec: coding.map(|c| Decoder::new(c, consumer, core.cap)),
        });
        if head_request {
            BodyRule::None
        } else {
            BodyRule::Headers
        }
    }

    fn body(&mut self, data: &[u8]) {
        if let Some(resp) = &mut self.0.resp
            && let Some(dec) = &mut resp.dec
        {
            dec.write(data);
        }
    }

    fn end(&mut self, complete: bool) {
        // Interim responses leave nothing in flight.
        let Some(mut resp) = self.0.resp.take() else {
            return;
        };
        let core = &mut *self.0;
        if !complete {
            core.out.push(Output::Problem(Problem::Truncated));
        }
        let mut usage = UsageFields::default();
        let mut bytes = 0;
        if let Some(dec) = &mut resp.dec {
            dec.finish();
            let c = dec.consumer();
            match &mut c.body {
                RespBody::Json(s) => s.finish(&mut c.usage),
                RespBody::Sse(s) => s.finish(),
            }
            usage = std::mem::take(&mut c.usage);
            bytes = dec.decoded();
            if let Some(e) = dec.error {
                core.out.push(Output::Problem(decode_problem(e)));
            }
        }
        let Some(req) = resp.request else { return };
        let Pending {
            target,
            method,
            path,
            fields,
            bytes: request_bytes,
        } = req;
        core.out.push(Output::Exchange(Exchange {
            api: target.api,
            method,
            path,
            status: resp.status,
            model: fields.model.or(target.model),
            response_model: usage.model.clone(),
            stream: fields.stream || target.stream,
            max_tokens: fields.max_tokens,
            usage: usage.usage(),
            request_bytes,
            response_bytes: bytes,
            response_coding: resp.coding,
            complete,
        }));
    }

    fn stop(&mut self, why: Stop) {
        let core = &mut *self.0;
        core.resp = None;
        // An HTTP/2 server's frames after the client's preface: reported once, as Http2.
        if !core.http2 {
            core.out
                .push(Output::Problem(Problem::Stopped(Side::Response, why)));
        }
    }
}

#[cfg(test)]
#[path = "exchange_tests.rs"]
mod tests;
