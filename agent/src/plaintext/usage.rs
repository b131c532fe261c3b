//! What the exact-token parser reads out of provider API bodies: the
//! request's model, `stream` and token cap, and the response's `usage`
//! (docs/exact-tokens.md, "What is read").
//!
//! Both sides are [`ScalarSink`]s of the streaming JSON scanner
//! (src/json_scan.rs), so neither keeps a body. The response side knows
//! every `usage` shape at once (OpenAI chat/completions/embeddings and
//! responses, Anthropic messages, Gemini `usageMetadata`), buffered or
//! streamed: in a stream every event is a document of its own and the last
//! value of each field wins, which is what each provider's final event
//! means (Anthropic's `message_delta` repeats the output count so far,
//! OpenAI's last chunk carries the whole `usage`, each Gemini chunk the
//! counts so far). [`Sse`] cuts `text/event-stream` into those documents.
//! Nothing here knows connections, HTTP framing or metrics.

use crate::plaintext::json_scan::{JsonScan, Scalar, ScalarSink, Seg, path_is};

/// Longest model name kept (longer: cut).
pub const MAX_MODEL: usize = 128;

/// The API a request calls, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletions,
    OpenAiResponses,
    OpenAiEmbeddings,
    AnthropicMessages,
    /// `…/models/MODEL:generateContent` or `:streamGenerateContent`.
    Gemini,
    Other,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::OpenAiChat => "openai_chat",
            Api::OpenAiCompletions => "openai_completions",
            Api::OpenAiResponses => "openai_responses",
            Api::OpenAiEmbeddings => "openai_embeddings",
            Api::AnthropicMessages => "anthropic_messages",
            Api::Gemini => "gemini",
            Api::Other => "other",
        }
    }
}

/// What a request's target says: the API, and for Gemini the model and
/// whether it streams (both are in the path, not the body).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub api: Api,
    pub model: Option<String>,
    pub stream: bool,
}

/// Reads a request target (`/v1/chat/completions`,
/// `/openai/deployments/D/chat/completions?api-version=…`,
/// `/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse`).
pub fn target(path: &str) -> Target {
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.trim_end_matches('/');
    let mut t = Target {
        api: Api::Other,
        model: None,
        stream: false,
    };
    if let Some((before, method)) = path.rsplit_once(':')
        && matches!(method, "generateContent" | "streamGenerateContent")
    {
        t.api = Api::Gemini;
        t.stream = method == "streamGenerateContent";
        t.model = before
            .rsplit_once("/models/")
            .map(|(_, m)| cut(m.as_bytes()))
            .filter(|m| !m.is_empty());
        return t;
    }
    t.api = if path.ends_with("/chat/completions") {
        Api::OpenAiChat
    } else if path.ends_with("/completions") {
        Api::OpenAiCompletions
    } else if path.ends_with("/responses") {
        Api::OpenAiResponses
    } else if path.ends_with("/embeddings") {
        Api::OpenAiEmbeddings
    } else if path.ends_with("/messages") {
        Api::AnthropicMessages
    } else {
        Api::Other
    };
    t
}

/// A model name as text, cut at `MAX_MODEL` bytes, other than printable
/// ASCII replaced (it becomes a metric label).
fn cut(text: &[u8]) -> String {
    text.iter()
        .take(MAX_MODEL)
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// The fields of a request body (top-level members only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestFields {
    pub model: Option<String>,
    pub stream: bool,
    /// `max_tokens`, `max_completion_tokens`, `max_output_tokens` or
    /// Gemini's `generationConfig.maxOutputTokens`.
    pub max_tokens: Option<u64>,
    /// `stream_options.include_usage` (OpenAI sends no usage in a stream
    /// without it).
    pub include_usage: bool,
}

impl ScalarSink for RequestFields {
    fn scalar(&mut self, path: &[Seg], value: Scalar<'_>) {
        // A top-level array (a batch) is not a request of one model.
        if matches!(path.first(), Some(Seg::Elem)) {
            return;
        }
        match value {
            Scalar::Str { text, .. } if path_is(path, &["model"]) => self.model = Some(cut(text)),
            Scalar::Bool(b) if path_is(path, &["stream"]) => self.stream = b,
            Scalar::Bool(b) if path_is(path, &["stream_options", "include_usage"]) => {
                self.include_usage = b
            }
            Scalar::Uint(n)
                if path_is(path, &["max_tokens"])
                    || path_is(path, &["max_completion_tokens"])
                    || path_is(path, &["max_output_tokens"])
                    || path_is(path, &["generationConfig", "maxOutputTokens"]) =>
            {
                self.max_tokens = Some(n)
            }
            _ => {}
        }
    }
}

/// Token counts of one exchange, the same meaning for every provider:
/// `input` counts every prompt token (cached ones and cache writes
/// included), `cached` the part of `input` read from the provider's cache,
/// `cache_write` the part written to it (Anthropic), `output` every
/// generated token (reasoning/thinking included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub output: u64,
    pub cached: u64,
    pub cache_write: u64,
}

/// The `usage` fields of a response as seen so far (last value wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageFields {
    /// The model the response names (`model`, Anthropic's
    /// `message.model`, Gemini's `modelVersion`).
    pub model: Option<String>,
    // OpenAI chat/completions/embeddings.
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    cached_tokens: Option<u64>,
    // OpenAI responses, Anthropic messages.
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    // Gemini.
    prompt_token_count: Option<u64>,
    candidates_token_count: Option<u64>,
    thoughts_token_count: Option<u64>,
    cached_content_token_count: Option<u64>,
}

impl UsageFields {
    /// The usage, when the response carried any.
    pub fn usage(&self) -> Option<Usage> {
        let n = |x: Option<u64>| x.unwrap_or(0);
        if self.prompt_tokens.is_some() || self.completion_tokens.is_some() {
            return Some(Usage {
                input: n(self.prompt_tokens),
                output: n(self.completion_tokens),
                cached: n(self.cached_tokens),
                cache_write: 0,
            });
        }
        if self.input_tokens.is_some() || self.output_tokens.is_some() {
            // Anthropic's input_tokens leaves out cache reads and writes;
            // OpenAI responses' includes its cached_tokens.
            let read = n(self.cache_read_input_tokens);
            let write = n(self.cache_creation_input_tokens);
            return Some(Usage {
                input: n(self.input_tokens)
                    .saturating_add(read)
                    .saturating_add(write),
                output: n(self.output_tokens),
                cached: self.cached_tokens.unwrap_or(read),
                cache_write: write,
            });
        }
        if self.prompt_token_count.is_some() || self.candidates_token_count.is_some() {
            return Some(Usage {
                input: n(self.prompt_token_count),
                output: n(self.candidates_token_count).saturating_add(n(self.thoughts_token_count)),
                cached: n(self.cached_content_token_count),
                cache_write: 0,
            });
        }
        None
    }
}

/// The path below Anthropic's `message_start` wrapper (`message`) or
/// OpenAI responses' stream events (`response`).
fn unwrap(path: &[Seg]) -> &[Seg] {
    let start = usize::from(matches!(path.first(), Some(Seg::Elem)));
    match path.get(start) {
        Some(Seg::Key(k)) if path.len() > start + 1 && (k == b"message" || k == b"response") => {
            &path[start + 1..]
        }
        _ => path,
    }
}

impl ScalarSink for UsageFields {
    fn scalar(&mut self, path: &[Seg], value: Scalar<'_>) {
        let p = unwrap(path);
        if let Scalar::Str { text, .. } = value {
            if path_is(p, &["model"]) || path_is(p, &["modelVersion"]) {
                self.model = Some(cut(text));
            }
            return;
        }
        let Scalar::Uint(v) = value else { return };
        let field = if path_is(p, &["usage", "prompt_tokens"]) {
            &mut self.prompt_tokens
        } else if path_is(p, &["usage", "completion_tokens"]) {
            &mut self.completion_tokens
        } else if path_is(p, &["usage", "prompt_tokens_details", "cached_tokens"])
            || path_is(p, &["usage", "input_tokens_details", "cached_tokens"])
        {
            &mut self.cached_tokens
        } else if path_is(p, &["usage", "input_tokens"]) {
            &mut self.input_tokens
        } else if path_is(p, &["usage", "output_tokens"]) {
            &mut self.output_tokens
        } else if path_is(p, &["usage", "cache_read_input_tokens"]) {
            &mut self.cache_read_input_tokens
        } else if path_is(p, &["usage", "cache_creation_input_tokens"]) {
            &mut self.cache_creation_input_tokens
        } else if path_is(p, &["usageMetadata", "promptTokenCount"]) {
            &mut self.prompt_token_count
        } else if path_is(p, &["usageMetadata", "candidatesTokenCount"]) {
            &mut self.candidates_token_count
        } else if path_is(p, &["usageMetadata", "thoughtsTokenCount"]) {
            &mut self.thoughts_token_count
        } else if path_is(p, &["usageMetadata", "cachedContentTokenCount"]) {
            &mut self.cached_content_token_count
        } else {
            return;
        };
        *field = Some(v);
    }
}

/// Longest SSE field name read (`data`, `event`, `id`, `retry`).
const MAX_FIELD: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SseState {
    /// At the start of a line.
    LineStart,
    /// Reading a field name.
    Field,
    /// Right after `data:` (one space is skipped).
    DataStart,
    /// In the value of a `data` line.
    Data,
    /// In a line that is not read (comment, other field).
    Skip,
}

/// A `text/event-stream` reader: the `data` of each event goes through a
/// JSON scanner into `sink`; nothing is buffered but the field name.
#[derive(Debug)]
pub struct Sse {
    state: SseState,
    field: [u8; MAX_FIELD],
    field_len: usize,
    /// The last byte was `\r` (a `\n` after it ends nothing).
    cr: bool,
    /// The event has a data line already (the next one is joined by `\n`).
    has_data: bool,
    scan: JsonScan,
    /// Events dispatched (ended by an empty line).
    pub events: u64,
    /// Events whose data was not one readable JSON value (`[DONE]` included).
    pub unreadable: u64,
}

impl Default for Sse {
    fn default() -> Self {
        Self::new()
    }
}

impl Sse {
    pub fn new() -> Self {
        Self {
            state: SseState::LineStart,
            field: [0; MAX_FIELD],
            field_len: 0,
            cr: false,
            has_data: false,
            scan: JsonScan::new(),
            events: 0,
            unreadable: 0,
        }
    }

    pub fn feed(&mut self, data: &[u8], sink: &mut impl ScalarSink) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            if self.cr && b == b'\n' {
                self.cr = false;
                i += 1;
                continue;
            }
            self.cr = b == b'\r';
            let eol = b == b'\n' || b == b'\r';
            match self.state {
                SseState::LineStart if eol => self.dispatch(sink),
                SseState::LineStart | SseState::Field => {
                    if eol {
                        // A field name alone: `data` with an empty value.
                        self.end_field(sink);
                        self.state = SseState::LineStart;
                    } else if b == b':' {
                        self.end_field(sink);
                    } else if self.field_len < MAX_FIELD {
                        self.field[self.field_len] = b;
                        self.field_len += 1;
                        self.state = SseState::Field;
                    } else {
                        self.state = SseState::Skip;
                    }
                }
                SseState::DataStart | SseState::Data => {
                    if eol {
                        self.state = SseState::LineStart;
                    } else if self.state == SseState::DataStart && b == b' ' {
                        self.state = SseState::Data;
                    } else {
                        // The rest of the line up to its end, in one piece.
                        let run = data[i..]
                            .iter()
                            .position(|&c| c == b'\n' || c == b'\r')
                            .unwrap_or(data.len() - i);
                        self.scan.feed(&data[i..i + run], sink);
                        self.state = SseState::Data;
                        i += run;
                        continue;
                    }
                }
                SseState::Skip => {
                    if eol {
                        self.state = SseState::LineStart;
                    }
                }
            }
            i += 1;
        }
    }

    /// The stream ended: an event not closed by an empty line is dropped,
    /// as the SSE rules say.
    pub fn finish(&mut self) {
        self.scan.reset();
        self.has_data = false;
    }

    fn end_field(&mut self, sink: &mut impl ScalarSink) {
        let name = &self.field[..self.field_len];
        self.field_len = 0;
        if name == b"data" {
            if self.has_data {
                self.scan.feed(b"\n", sink);
            }
            self.has_data = true;
            self.state = SseState::DataStart;
        } else {
            // `:comment`, `event:`, `id:`, `retry:`.
            self.state = SseState::Skip;
        }
    }

    fn dispatch(&mut self, sink: &mut impl ScalarSink) {
        if self.has_data {
            self.scan.finish(sink);
            self.events += 1;
            if !self.scan.done() {
                self.unreadable += 1;
            }
        }
        self.has_data = false;
        self.scan.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(doc: &[u8]) -> UsageFields {
        let mut u = UsageFields::default();
        let mut s = JsonScan::new();
        s.feed(doc, &mut u);
        s.finish(&mut u);
        u
    }

    fn sse(stream: &[u8]) -> (UsageFields, Sse) {
        let mut u = UsageFields::default();
        let mut s = Sse::new();
        s.feed(stream, &mut u);
        s.finish();
        (u, s)
    }

    #[test]
    fn targets() {
        assert_eq!(target("/v1/chat/completions").api, Api::OpenAiChat);
        assert_eq!(
            target("/openai/deployments/d1/chat/completions?api-version=2024-10-21").api,
            Api::OpenAiChat
        );
        assert_eq!(target("/v1/completions").api, Api::OpenAiCompletions);
        assert_eq!(target("/v1/responses").api, Api::OpenAiResponses);
        assert_eq!(target("/v1/embeddings").api, Api::OpenAiEmbeddings);
        assert_eq!(target("/v1/messages").api, Api::AnthropicMessages);
        assert_eq!(target("/v1/models").api, Api::Other);
        let g = target("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=AIzaX");
        assert_eq!(
            g,
            Target {
                api: Api::Gemini,
                model: Some("gemini-2.0-flash".into()),
                stream: true
            }
        );
        let g = target("/v1beta/models/gemini-1.5-pro:generateContent");
        assert!(!g.stream && g.model.as_deref() == Some("gemini-1.5-pro"));
    }

    #[test]
    fn request_fields() {
        let mut r = RequestFields::default();
        let mut s = JsonScan::new();
        s.feed(
            br#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}","model":"inner"}],
               "model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},
               "max_completion_tokens":256,"tools":[{"parameters":{"max_tokens":1}}]}"#,
            &mut r,
        );
        assert_eq!(
            r,
            RequestFields {
                model: Some("gpt-4o-mini".into()),
                stream: true,
                max_tokens: Some(256),
                include_usage: true
            }
        );
        let mut r = RequestFields::default();
        let mut s = JsonScan::new();
        s.feed(
            br#"{"contents":[],"generationConfig":{"maxOutputTokens":64}}"#,
            &mut r,
        );
        assert_eq!(r.max_tokens, Some(64));
        assert_eq!(r.model, None);
    }

    #[test]
    fn openai_chat_and_embeddings() {
        let u = fields(
            br#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o-2024-08-06",
            "choices":[{"message":{"role":"assistant","content":"hi"}}],
            "usage":{"prompt_tokens":19,"completion_tokens":10,"total_tokens":29,
            "prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":0}}}"#,
        );
        assert_eq!(
            u.usage(),
            Some(Usage {
                input: 19,
                output: 10,
                cached: 3,
                cache_write: 0
            })
        );
        assert_eq!(u.model.as_deref(), Some("gpt-4o-2024-08-06"));
        let e = fields(
            br#"{"object":"list","data":[{"embedding":[0.1,-0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        assert_eq!(
            e.usage(),
            Some(Usage {
                input: 8,
                ..Usage::default()
            })
        );
        assert_eq!(fields(br#"{"error":{"message":"bad"}}"#).usage(), None);
    }

    #[test]
    fn openai_responses_and_anthropic() {
        let r = fields(
            br#"{"id":"resp_1","model":"gpt-4.1","output":[],"usage":{"input_tokens":36,
            "input_tokens_details":{"cached_tokens":6},"output_tokens":87,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":123}}"#,
        );
        assert_eq!(
            r.usage(),
            Some(Usage {
                input: 36,
                output: 87,
                cached: 6,
                cache_write: 0
            })
        );
        let a = fields(
            br#"{"id":"msg_1","type":"message","model":"claude-sonnet-4-20250514","content":[],
            "usage":{"input_tokens":12,"cache_creation_input_tokens":100,"cache_read_input_tokens":50,"output_tokens":6}}"#,
        );
        assert_eq!(
            a.usage(),
            Some(Usage {
                input: 162,
                output: 6,
                cached: 50,
                cache_write: 100
            })
        );
    }

    #[test]
    fn gemini_buffered_and_array_stream() {
        let g = fields(
            br#"{"candidates":[{"content":{"parts":[{"text":"hi"}]}}],"usageMetadata":{"promptTokenCount":9,
            "candidatesTokenCount":4,"thoughtsTokenCount":2,"cachedContentTokenCount":1,"totalTokenCount":15},"modelVersion":"gemini-2.0-flash"}"#,
        );
        assert_eq!(
            g.usage(),
            Some(Usage {
                input: 9,
                output: 6,
                cached: 1,
                cache_write: 0
            })
        );
        assert_eq!(g.model.as_deref(), Some("gemini-2.0-flash"));
        let a = fields(
            br#"[{"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":1}},
                 {"usageMetadata":{"promptTokenCount":9,"candidatesTokenCount":7}}]"#,
        );
        assert_eq!(
            a.usage(),
            Some(Usage {
                input: 9,
                output: 7,
                ..Usage::default()
            })
        );
    }

    const ANTHROPIC_SSE: &[u8] = b"event: message_start\r\n\
data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"model\":\"claude-3-5-haiku-20241022\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
event: content_block_delta\r\n\
data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"usage: 99\"}}\r\n\r\n\
: a comment\r\n\
event: ping\r\ndata: {\"type\": \"ping\"}\r\n\r\n\
event: message_delta\r\n\
data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\r\n\r\n\
event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";

    #[test]
    fn anthropic_stream_at_every_split() {
        let want = Usage {
            input: 25,
            output: 15,
            ..Usage::default()
        };
        let (u, s) = sse(ANTHROPIC_SSE);
        assert_eq!(u.usage(), Some(want));
        assert_eq!(u.model.as_deref(), Some("claude-3-5-haiku-20241022"));
        assert_eq!((s.events, s.unreadable), (5, 0));
        for cut in 0..=ANTHROPIC_SSE.len() {
            for cut2 in [cut, (cut + 7).min(ANTHROPIC_SSE.len())] {
                let mut u = UsageFields::default();
                let mut s = Sse::new();
                s.feed(&ANTHROPIC_SSE[..cut], &mut u);
                s.feed(&ANTHROPIC_SSE[cut..cut2], &mut u);
                s.feed(&ANTHROPIC_SSE[cut2..], &mut u);
                assert_eq!(u.usage(), Some(want), "split at {cut}/{cut2}");
                assert_eq!(s.events, 5);
            }
        }
    }

    #[test]
    fn openai_stream_usage_chunk_and_done() {
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":null}\n\n\
data: {\"choices\":[],\"model\":\"gpt-4o-mini\",\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3}}\n\n\
data: [DONE]\n\n";
        let (u, s) = sse(stream);
        assert_eq!(
            u.usage(),
            Some(Usage {
                input: 7,
                output: 3,
                ..Usage::default()
            })
        );
        assert_eq!((s.events, s.unreadable), (3, 1));
        // Without include_usage: no usage at all.
        let (u, _) = sse(b"data: {\"choices\":[{\"delta\":{}}]}\n\ndata: [DONE]\n\n");
        assert_eq!(u.usage(), None);
    }

    #[test]
    fn responses_stream_and_multiline_data() {
        let stream = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\n\
data: \"response\":{\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":2}}}\n\n";
        let (u, s) = sse(stream);
        assert_eq!(
            u.usage(),
            Some(Usage {
                input: 5,
                output: 2,
                ..Usage::default()
            })
        );
        assert_eq!(s.unreadable, 0);
        // An event cut by the end of the stream still gave what it had
        // delivered (fields are read as they stream).
        let (u, _) = sse(b"data: {\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}");
        assert_eq!(
            u.usage(),
            Some(Usage {
                input: 1,
                output: 1,
                ..Usage::default()
            })
        );
    }
}
