//! A streaming JSON scanner with bounded memory: bytes in, `(path, scalar)`
//! out, without ever holding the document.
//!
//! The exact-token parsers (src/usage.rs) need a handful of scalars from
//! documents that can be megabytes long (a prompt) or arrive cut at any
//! byte (a TLS record, an SSE event): `model`, `stream`, `max_tokens` at
//! the top of a request, `usage.prompt_tokens` deep in a response. The
//! scanner keeps only the stack of open containers (the keys of the first
//! [`MAX_KEYED_DEPTH`] levels, each cut at [`MAX_KEY`] bytes), the scalar
//! being read (cut at [`MAX_SCALAR`] bytes) and a few flags, whatever the
//! document's size. It does not validate JSON: what it cannot read makes
//! the rest of the document `broken` (counted by the caller), never a panic.
//! String values and keys are kept as written (escapes not decoded); the
//! keys and values the callers look for are plain ASCII.

/// Levels whose keys are kept; deeper scalars are skipped (the paths the
/// callers match are at most 4 deep).
pub const MAX_KEYED_DEPTH: usize = 8;
/// Levels of nesting followed at all; deeper documents are `broken`.
pub const MAX_DEPTH: usize = 256;
/// Bytes of a key that are kept; longer keys match nothing.
pub const MAX_KEY: usize = 64;
/// Bytes of a scalar that are kept; longer strings are reported cut
/// (`Scalar::Str` with `cut = true`), longer numbers as unreadable.
pub const MAX_SCALAR: usize = 256;

/// One level of the path to a scalar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A member of an object, by key (as written, cut at `MAX_KEY`).
    Key(Vec<u8>),
    /// An element of an array (index not kept).
    Elem,
}

/// A scalar value.
#[derive(Clone, Debug, PartialEq)]
pub enum Scalar<'a> {
    /// A string as written between its quotes (escapes not decoded);
    /// `cut`: longer than `MAX_SCALAR`, only its start is here.
    Str {
        text: &'a [u8],
        cut: bool,
    },
    /// A number that fits a u64.
    Uint(u64),
    /// Any other number (negative, fraction, exponent, too long).
    OtherNumber,
    Bool(bool),
    Null,
}

/// Receives the scalars of a document with their path.
pub trait ScalarSink {
    fn scalar(&mut self, path: &[Seg], value: Scalar<'_>);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting a value (document start, after `:`, after `[` or `,` in an array).
    Value,
    /// In an object, expecting a key or `}`.
    KeyOrEnd,
    /// After a key, expecting `:`.
    Colon,
    /// After a value, expecting `,`, `}` or `]` (or the end at depth 0).
    AfterValue,
    /// In a string; `key`: it is an object key.
    Str { key: bool, escape: bool },
    /// In a number or literal.
    Token,
    /// The document's top value is complete.
    Done,
    /// Unreadable: everything until `reset` is ignored.
    Broken,
}

/// The scanner of one document (reuse it with [`JsonScan::reset`]).
#[derive(Debug)]
pub struct JsonScan {
    state: State,
    /// Kind of each open container: true = object.
    kinds: Vec<bool>,
    /// The path of the first `MAX_KEYED_DEPTH` levels.
    path: Vec<Seg>,
    /// The key, string or token being read.
    text: Vec<u8>,
    /// The string or token being read is longer than `text` holds.
    cut: bool,
}

impl Default for JsonScan {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonScan {
    pub fn new() -> Self {
        Self {
            state: State::Value,
            kinds: Vec::new(),
            path: Vec::new(),
            text: Vec::new(),
            cut: false,
        }
    }

    /// Forgets the document: the next byte starts a new one.
    pub fn reset(&mut self) {
        self.state = State::Value;
        self.kinds.clear();
        self.path.clear();
        self.text.clear();
        self.cut = false;
    }

    /// The document could not be read (a byte out of place, too deep).
    pub fn broken(&self) -> bool {
        self.state == State::Broken
    }

    /// The top value is complete.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Ends the document: a number at the very end (`42` with nothing
    /// after it) is delivered.
    pub fn finish(&mut self, sink: &mut impl ScalarSink) {
        if self.state == State::Token {
            self.end_token(sink);
        }
    }

    /// Scans `data`, the next bytes of the document.
    pub fn feed(&mut self, data: &[u8], sink: &mut impl ScalarSink) {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                State::Broken | State::Done => return,
                State::Str { key, escape } => {
                    if escape {
                        self.state = State::Str { key, escape: false };
                        self.push_text(b);
                        i += 1;
                        continue;
                    }
                    // The run of plain bytes up to the next quote or backslash.
                    let run = data[i..]
                        .iter()
                        .position(|&c| c == b'"' || c == b'\\')
                        .unwrap_or(data.len() - i);
                    self.push_text_slice(&data[i..i + run]);
                    i += run;
                    if i == data.len() {
                        return;
                    }
                    if data[i] == b'\\' {
                        self.push_text(b'\\');
                        self.state = State::Str { key, escape: true };
                    } else {
                        self.end_string(key, sink);
                    }
                    i += 1;
                }
                State::Token => {
                    if is_token_byte(b) {
                        self.push_text(b);
                        i += 1;
                    } else {
                        // The delimiter is read again in AfterValue.
                        self.end_token(sink);
                    }
                }
                _ if matches!(b, b' ' | b'\t' | b'\r' | b'\n') => i += 1,
                State::Value => {
                    self.value_start(b);
                    i += 1;
                }
                State::KeyOrEnd => {
                    match b {
                        b'"' => self.begin_text(State::Str {
                            key: true,
                            escape: false,
                        }),
                        b'}' => self.close(true),
                        _ => self.state = State::Broken,
                    }
                    i += 1;
                }
                State::Colon => {
                    self.state = if b == b':' {
                        State::Value
                    } else {
                        State::Broken
                    };
                    i += 1;
                }
                State::AfterValue => {
                    match (b, self.kinds.last()) {
                        (b',', Some(true)) => self.state = State::KeyOrEnd,
                        // The path's last segment of an array stays `Elem`.
                        (b',', Some(false)) => self.state = State::Value,
                        (b'}', Some(true)) => self.close(true),
                        (b']', Some(false)) => self.close(false),
                        _ => self.state = State::Broken,
                    }
                    i += 1;
                }
            }
        }
    }

    fn value_start(&mut self, b: u8) {
        match b {
            b'{' | b'[' => {
                if self.kinds.len() >= MAX_DEPTH {
                    self.state = State::Broken;
                    return;
                }
                let object = b == b'{';
                self.kinds.push(object);
                if self.kinds.len() <= MAX_KEYED_DEPTH {
                    self.path.push(if object {
                        Seg::Key(Vec::new())
                    } else {
                        Seg::Elem
                    });
                }
                self.state = if object {
                    State::KeyOrEnd
                } else {
                    State::Value
                };
            }
            // `]` right after `[`: an empty array.
            b']' if self.kinds.last() == Some(&false) => self.close(false),
            b'"' => self.begin_text(State::Str {
                key: false,
                escape: false,
            }),
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                self.begin_text(State::Token);
                self.push_text(b);
            }
            _ => self.state = State::Broken,
        }
    }

    fn close(&mut self, object: bool) {
        if self.kinds.last() != Some(&object) {
            self.state = State::Broken;
            return;
        }
        if self.kinds.len() <= MAX_KEYED_DEPTH {
            self.path.pop();
        }
        self.kinds.pop();
        self.after_value();
    }

    fn after_value(&mut self) {
        self.state = if self.kinds.is_empty() {
            State::Done
        } else {
            State::AfterValue
        };
    }

    fn begin_text(&mut self, state: State) {
        self.text.clear();
        self.cut = false;
        self.state = state;
    }

    fn push_text(&mut self, b: u8) {
        if self.text.len() < MAX_SCALAR {
            self.text.push(b);
        } else {
            self.cut = true;
        }
    }

    fn push_text_slice(&mut self, s: &[u8]) {
        let room = MAX_SCALAR - self.text.len().min(MAX_SCALAR);
        let take = room.min(s.len());
        self.text.extend_from_slice(&s[..take]);
        if take < s.len() {
            self.cut = true;
        }
    }

    fn keyed(&self) -> bool {
        self.kinds.len() <= MAX_KEYED_DEPTH
    }

    fn end_string(&mut self, key: bool, sink: &mut impl ScalarSink) {
        if key {
            if self.keyed()
                && let Some(Seg::Key(k)) = self.path.last_mut()
            {
                k.clear();
                if !self.cut && self.text.len() <= MAX_KEY {
                    k.extend_from_slice(&self.text);
                } else {
                    // A cut key matches nothing a caller looks for.
                    k.extend_from_slice(b"\0cut");
                }
            }
            self.state = State::Colon;
        } else {
            if self.keyed() {
                sink.scalar(
                    &self.path,
                    Scalar::Str {
                        text: &self.text,
                        cut: self.cut,
                    },
                );
            }
            self.after_value();
        }
    }

    fn end_token(&mut self, sink: &mut impl ScalarSink) {
        let value = match self.text.as_slice() {
            b"true" => Some(Scalar::Bool(true)),
            b"false" => Some(Scalar::Bool(false)),
            b"null" => Some(Scalar::Null),
            t if !t.is_empty() && t.iter().all(u8::is_ascii_digit) && !self.cut => Some(
                std::str::from_utf8(t)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .map_or(Scalar::OtherNumber, Scalar::Uint),
            ),
            t if t.first().is_some_and(|c| *c == b'-' || c.is_ascii_digit()) => {
                Some(Scalar::OtherNumber)
            }
            _ => None,
        };
        match value {
            Some(v) => {
                if self.keyed() {
                    sink.scalar(&self.path, v);
                }
                self.after_value();
            }
            None => self.state = State::Broken,
        }
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')
}

/// Whether `path` is exactly `keys` (object members from the top), or
/// `keys` below one top-level array (Gemini's streamed `[{…},{…}]`).
pub fn path_is(path: &[Seg], keys: &[&str]) -> bool {
    let path = match path.first() {
        Some(Seg::Elem) => &path[1..],
        _ => path,
    };
    path.len() == keys.len()
        && path
            .iter()
            .zip(keys)
            .all(|(s, k)| matches!(s, Seg::Key(key) if key.as_slice() == k.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Vec<(String, String)>);

    impl ScalarSink for Collect {
        fn scalar(&mut self, path: &[Seg], value: Scalar<'_>) {
            let p: Vec<String> = path
                .iter()
                .map(|s| match s {
                    Seg::Key(k) => String::from_utf8_lossy(k).into_owned(),
                    Seg::Elem => "[]".to_owned(),
                })
                .collect();
            let v = match value {
                Scalar::Str { text, cut } => {
                    format!(
                        "s:{}{}",
                        String::from_utf8_lossy(text),
                        if cut { "…" } else { "" }
                    )
                }
                Scalar::Uint(n) => format!("u:{n}"),
                Scalar::OtherNumber => "n".to_owned(),
                Scalar::Bool(b) => format!("b:{b}"),
                Scalar::Null => "null".to_owned(),
            };
            self.0.push((p.join("."), v));
        }
    }

    fn scan(doc: &[u8]) -> (Vec<(String, String)>, bool, bool) {
        let mut s = JsonScan::new();
        let mut c = Collect::default();
        s.feed(doc, &mut c);
        s.finish(&mut c);
        (c.0, s.done(), s.broken())
    }

    const DOC: &[u8] = br#"{"messages":[{"role":"user","content":"say \"hi\" {not json"}],
        "model" : "gpt-4o", "stream":true,"max_tokens":100,"temperature":-0.5,
        "usage":{"prompt_tokens":12,"details":{"cached_tokens":0}},"x":null,"e":[],"o":{}}"#;

    #[test]
    fn paths_and_scalars() {
        let (got, done, broken) = scan(DOC);
        assert!(done && !broken);
        let want = [
            ("messages.[].role", "s:user"),
            ("messages.[].content", r#"s:say \"hi\" {not json"#),
            ("model", "s:gpt-4o"),
            ("stream", "b:true"),
            ("max_tokens", "u:100"),
            ("temperature", "n"),
            ("usage.prompt_tokens", "u:12"),
            ("usage.details.cached_tokens", "u:0"),
            ("x", "null"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn every_split_gives_the_same_scalars() {
        let (whole, ..) = scan(DOC);
        for cut in 0..=DOC.len() {
            let mut s = JsonScan::new();
            let mut c = Collect::default();
            s.feed(&DOC[..cut], &mut c);
            s.feed(&DOC[cut..], &mut c);
            s.finish(&mut c);
            assert_eq!(c.0, whole, "split at {cut}");
            assert!(s.done());
        }
        // One byte at a time.
        let mut s = JsonScan::new();
        let mut c = Collect::default();
        for b in DOC.chunks(1) {
            s.feed(b, &mut c);
        }
        assert_eq!(c.0, whole);
    }

    #[test]
    fn bounded_and_broken() {
        let long = format!(
            r#"{{"model":"{}","n":{}}}"#,
            "m".repeat(10_000),
            "9".repeat(50)
        );
        let (got, done, _) = scan(long.as_bytes());
        assert!(done);
        assert_eq!(got[0].1.len(), 2 + MAX_SCALAR + "…".len());
        assert_eq!(got[1].1, "n");
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(scan(deep.as_bytes()).2);
        for bad in [
            &b"{1:2}"[..],
            b"{\"a\" 1}",
            b"[1,}",
            b"}",
            b"{\"a\":tru e}",
            b"@",
        ] {
            assert!(
                scan(bad).2,
                "{:?} must be broken",
                String::from_utf8_lossy(bad)
            );
        }
        // Deep keys are not kept, and deep scalars not reported.
        let nested = format!("{}1{}", r#"{"a":"#.repeat(20), "}".repeat(20));
        let (got, done, broken) = scan(nested.as_bytes());
        assert!(done && !broken && got.is_empty());
        // A number at the very end is delivered by finish.
        assert_eq!(scan(b"42").0, vec![(String::new(), "u:42".to_owned())]);
    }

    #[test]
    fn path_matching() {
        let p = [
            Seg::Key(b"usage".to_vec()),
            Seg::Key(b"input_tokens".to_vec()),
        ];
        assert!(path_is(&p, &["usage", "input_tokens"]));
        assert!(!path_is(&p, &["usage"]));
        let q = [Seg::Elem, Seg::Key(b"usage".to_vec())];
        assert!(path_is(&q, &["usage"]));
        let r = [
            Seg::Key(b"a".to_vec()),
            Seg::Elem,
            Seg::Key(b"usage".to_vec()),
        ];
        assert!(!path_is(&r, &["a", "usage"]));
    }
}
