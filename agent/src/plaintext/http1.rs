//! HTTP/1.1 message framing of one direction of a plaintext connection:
//! where heads end, where bodies end (Content-Length, chunked, until close),
//! with bounded memory (docs/exact-tokens.md, "HTTP/1.1").
//!
//! A [`Framer`] takes the bytes of one direction as they come, cut
//! anywhere, and tells its [`MessageSink`] about each head (parsed with
//! `httparse`), each piece of body (transfer coding removed, content coding
//! not) and each end. It keeps only an unfinished head (at most
//! [`MAX_HEAD`] bytes) and a few numbers. What it cannot read (an oversized
//! head, a malformed head or chunk line, a connection that is not HTTP/1.x,
//! e.g. the HTTP/2 preface) stops it for the rest of the connection: the
//! reason is reported once, the bytes after it are counted and ignored.
//! Never a panic; never a wait for bytes that a lying Content-Length
//! promises (a body simply stays open until the connection closes).

/// Longest head (request or status line and headers) read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers read per head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (with extensions) and trailer line.
const MAX_LINE: usize = 4096;
/// Longest header value kept (content-type, content-encoding…).
const MAX_VALUE: usize = 128;
/// Longest request target kept.
pub const MAX_PATH: usize = 512;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which side of the exchange a framer reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Requests (what the client sends).
    Request,
    /// Responses (what the client receives).
    Response,
}

/// A parsed head, reduced to what the exact-token parser uses.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// Requests: the method and the target (cut at `MAX_PATH`).
    pub method: String,
    pub path: String,
    /// Responses: the status code.
    pub status: u16,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// Lower case; empty: none.
    pub content_encoding: String,
    /// Lower case; empty: none.
    pub content_type: String,
    /// Size of the head in bytes.
    pub head_bytes: usize,
}

/// Why a framer stopped reading its direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The client sent the HTTP/2 preface.
    Http2,
    /// The bytes are not an HTTP/1.x message (another protocol, or the
    /// server speaks HTTP/2).
    NotHttp1,
    /// A head longer than `MAX_HEAD` or with more than 128 headers.
    HeadTooLarge,
    /// A head httparse rejects, or contradictory framing headers.
    Malformed,
    /// A chunk line that is not one (the body framing lost its place).
    BadChunk,
    /// `101 Switching Protocols` (WebSocket, h2c): not HTTP any more.
    Upgraded,
    /// The connection closed in the middle of a head.
    Truncated,
}

impl Stop {
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Http2 => "http2",
            Stop::NotHttp1 => "not_http1",
            Stop::HeadTooLarge => "head_too_large",
            Stop::Malformed => "malformed_head",
            Stop::BadChunk => "bad_chunk",
            Stop::Upgraded => "upgraded",
            Stop::Truncated => "truncated_head",
        }
    }
}

/// How a message's body is delimited, as the sink decides for a response
/// (it knows the request's method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyRule {
    /// By the head (Content-Length, chunked, or until close).
    Headers,
    /// No body whatever the head says (the response to HEAD).
    None,
}

/// Receives what a framer reads.
pub trait MessageSink {
    /// A head. Interim responses (1xx but 101) are delivered too; their
    /// messages end at once.
    fn head(&mut self, head: &Head) -> BodyRule;
    /// The next piece of the body, transfer coding removed.
    fn body(&mut self, data: &[u8]);
    /// The message ended; `complete`: its framing said so (not a close in
    /// the middle).
    fn end(&mut self, complete: bool);
    /// The framer stopped for the rest of the connection.
    fn stop(&mut self, why: Stop);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Reading the size line: the size so far, whether digits were seen,
    /// whether extensions started, the line's length.
    Size {
        size: u64,
        digits: bool,
        ext: bool,
        len: usize,
    },
    /// In the data: bytes left.
    Data(u64),
    /// After the data: the CRLF.
    DataEnd,
    /// After the last chunk: trailer lines; `empty`: the current line has
    /// nothing yet but maybe `\r`.
    Trailer { empty: bool, len: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunk),
    UntilClose,
    Stopped,
}

/// The framer of one direction.
#[derive(Debug)]
pub struct Framer {
    side: Side,
    state: State,
    /// The unfinished head.
    head: Vec<u8>,
    /// Bytes ignored after a stop.
    pub ignored: u64,
}

impl Framer {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Head,
            head: Vec::new(),
            ignored: 0,
        }
    }

    pub fn stopped(&self) -> bool {
        self.state == State::Stopped
    }

    /// Reads the next bytes of the direction.
    pub fn feed(&mut self, mut data: &[u8], sink: &mut impl MessageSink) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => {
                    self.ignored += data.len() as u64;
                    return;
                }
                State::Head => data = self.read_head(data, sink),
                State::Length(left) => {
                    let take = left.min(data.len() as u64) as usize;
                    sink.body(&data[..take]);
                    data = &data[take..];
                    if left == take as u64 {
                        self.end(sink, true);
                    } else {
                        self.state = State::Length(left - take as u64);
                    }
                }
                State::UntilClose => {
                    sink.body(data);
                    return;
                }
                State::Chunked(c) => data = self.read_chunked(c, data, sink),
            }
        }
    }

    /// The direction ended (the connection closed).
    pub fn close(&mut self, sink: &mut impl MessageSink) {
        match self.state {
            State::UntilClose => sink.end(true),
            State::Length(_) | State::Chunked(_) => sink.end(false),
            State::Head if !self.head.is_empty() => sink.stop(Stop::Truncated),
            _ => {}
        }
        self.state = State::Stopped;
        self.head = Vec::new();
    }

    fn stop(&mut self, why: Stop, rest: usize, sink: &mut impl MessageSink) {
        sink.stop(why);
        self.state = State::Stopped;
        self.head = Vec::new();
        self.ignored += rest as u64;
    }

    fn end(&mut self, sink: &mut impl MessageSink, complete: bool) {
        sink.end(complete);
        self.state = State::Head;
    }

    /// Reads head bytes; returns what follows the head.
    fn read_head<'d>(&mut self, data: &'d [u8], sink: &mut impl MessageSink) -> &'d [u8] {
        let mut data = data;
        // Empty lines before a message are allowed (RFC 9112 §2.2).
        if self.head.is_empty() {
            let skip = data
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            data = &data[skip..];
            if data.is_empty() {
                return data;
            }
        }
        let old = self.head.len();
        let room = MAX_HEAD - old;
        let take = room.min(data.len());
        self.head.extend_from_slice(&data[..take]);
        // The start: HTTP/2's preface, or something that cannot be HTTP/1.
        let start = &self.head[..self.head.len().min(H2_PREFACE.len())];
        match self.side {
            Side::Request if H2_PREFACE.starts_with(start) && start.len() >= 3 => {
                if start.len() == H2_PREFACE.len() || self.head.len() >= H2_PREFACE.len() {
                    self.stop(Stop::Http2, data.len() - take, sink);
                    return &[];
                }
                return &data[take..];
            }
            Side::Response if !b"HTTP/".starts_with(&start[..start.len().min(5)]) => {
                self.stop(Stop::NotHttp1, data.len() - take, sink);
                return &[];
            }
            _ => {}
        }
        let search_from = old.saturating_sub(3);
        let Some(end) = head_end(&self.head[search_from..]).map(|e| e + search_from) else {
            if self.head.len() >= MAX_HEAD {
                self.stop(Stop::HeadTooLarge, data.len() - take, sink);
                return &[];
            }
            return &data[take..];
        };
        // Bytes of `data` after the head.
        let used = end - old;
        let rest = &data[used..];
        self.head.truncate(end);
        let head = match parse_head(self.side, &self.head) {
            Ok(h) => h,
            Err(why) => {
                self.stop(why, rest.len(), sink);
                return &[];
            }
        };
        self.head.clear();
        if self.head.capacity() > 4096 {
            self.head = Vec::new();
        }
        let rule = sink.head(&head);
        let interim = self.side == Side::Response && (100..200).contains(&head.status);
        if interim && head.status == 101 {
            self.stop(Stop::Upgraded, rest.len(), sink);
            return &[];
        }
        let no_body = interim
            || rule == BodyRule::None
            || (self.side == Side::Response && matches!(head.status, 204 | 304));
        self.state = if no_body {
            State::Length(0)
        } else if head.chunked {
            State::Chunked(Chunk::Size {
                size: 0,
                digits: false,
                ext: false,
                len: 0,
            })
        } else if let Some(n) = head.content_length {
            State::Length(n)
        } else if self.side == Side::Response {
            State::UntilClose
        } else {
            State::Length(0)
        };
        if self.state == State::Length(0) {
            self.end(sink, true);
        }
        rest
    }

    fn read_chunked<'d>(
        &mut self,
        mut c: Chunk,
        data: &'d [u8],
        sink: &mut impl MessageSink,
    ) -> &'d [u8] {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match c {
                Chunk::Data(left) => {
                    let take = left.min((data.len() - i) as u64) as usize;
                    sink.body(&data[i..i + take]);
                    i += take;
                    c = if left == take as u64 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take as u64)
                    };
                    continue;
                }
                Chunk::Size {
                    size,
                    digits,
                    ext,
                    len,
                } => {
                    if len >= MAX_LINE {
                        self.stop(Stop::BadChunk, data.len() - i, sink);
                        return &[];
                    }
                    let next_len = len + 1;
                    if b == b'\n' {
                        if !digits {
                            self.stop(Stop::BadChunk, data.len() - i, sink);
                            return &[];
                        }
                        c = if size == 0 {
                            Chunk::Trailer {
                                empty: true,
                                len: 0,
                            }
                        } else {
                            Chunk::Data(size)
                        };
                    } else if ext || b == b'\r' || b == b' ' || b == b'\t' {
                        c = Chunk::Size {
                            size,
                            digits,
                            ext,
                            len: next_len,
                        };
                    } else if b == b';' {
                        c = Chunk::Size {
                            size,
                            digits,
                            ext: true,
                            len: next_len,
                        };
                    } else if let Some(d) = (b as char).to_digit(16) {
                        let Some(s) = size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(u64::from(d)))
                        else {
                            self.stop(Stop::BadChunk, data.len() - i, sink);
                            return &[];
                        };
                        c = Chunk::Size {
                            size: s,
                            digits: true,
                            ext,
                            len: next_len,
                        };
                    } else {
                        self.stop(Stop::BadChunk, data.len() - i, sink);
                        return &[];
                    }
                }
                Chunk::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => {
                        c = Chunk::Size {
                            size: 0,
                            digits: false,
                            ext: false,
                            len: 0,
                        }
                    }
                    _ => {
                        self.stop(Stop::BadChunk, data.len() - i, sink);
                        return &[];
                    }
                },
                Chunk::Trailer { empty, len } => {
                    if b == b'\n' {
                        if empty {
                            self.end(sink, true);
                            return &data[i + 1..];
                        }
                        c = Chunk::Trailer {
                            empty: true,
                            len: 0,
                        };
                    } else if len >= MAX_LINE {
                        self.stop(Stop::BadChunk, data.len() - i, sink);
                        return &[];
                    } else {
                        c = Chunk::Trailer {
                            empty: empty && b == b'\r',
                            len: len + 1,
                        };
                    }
                }
            }
            i += 1;
        }
        self.state = State::Chunked(c);
        &[]
    }
}

/// Where the head ends (the index after its empty line), CRLF or bare LF.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + p;
        let next = &buf[nl + 1..];
        if next.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        if next.starts_with(b"\n") {
            return Some(nl + 2);
        }
        i = nl + 1;
    }
    None
}

fn lower(value: &[u8]) -> String {
    String::from_utf8_lossy(&value[..value.len().min(MAX_VALUE)])
        .trim()
        .to_ascii_lowercase()
}

fn parse_head(side: Side, buf: &[u8]) -> Result<Head, Stop> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut head = Head {
        head_bytes: buf.len(),
        ..Head::default()
    };
    let parsed = match side {
        Side::Request => {
            let mut req = httparse::Request::new(&mut headers);
            let status = req.parse(buf);
            head.method = req.method.unwrap_or("").to_owned();
            let path = req.path.unwrap_or("");
            head.path = path.chars().take(MAX_PATH).collect();
            status.map(|s| (s, req.headers.len()))
        }
        Side::Response => {
            let mut resp = httparse::Response::new(&mut headers);
            let status = resp.parse(buf);
            head.status = resp.code.unwrap_or(0);
            status.map(|s| (s, resp.headers.len()))
        }
    };
    let count = match parsed {
        Ok((httparse::Status::Complete(_), n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(Stop::HeadTooLarge),
        Err(httparse::Error::Version) if side == Side::Request => return Err(Stop::NotHttp1),
        _ => return Err(Stop::Malformed),
    };
    for h in &headers[..count] {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(Stop::Malformed)?;
            if head.content_length.is_some_and(|old| old != n) {
                return Err(Stop::Malformed);
            }
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = lower(h.value);
            // Chunked must be the last coding; other codings are not read.
            if v.rsplit(',').next().map(str::trim) == Some("chunked") {
                head.chunked = true;
            } else if side == Side::Request {
                return Err(Stop::Malformed);
            }
        } else if name.eq_ignore_ascii_case("content-encoding") {
            head.content_encoding = lower(h.value);
        } else if name.eq_ignore_ascii_case("content-type") {
            head.content_type = lower(h.value);
        }
    }
    if head.chunked {
        // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3).
        head.content_length = None;
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default, Debug, PartialEq)]
    struct Log {
        heads: Vec<Head>,
        bodies: Vec<Vec<u8>>,
        ends: Vec<bool>,
        stops: Vec<Stop>,
        no_body_for: Option<&'static str>,
    }

    impl MessageSink for Log {
        fn head(&mut self, head: &Head) -> BodyRule {
            self.heads.push(head.clone());
            self.bodies.push(Vec::new());
            if self.no_body_for.is_some() {
                BodyRule::None
            } else {
                BodyRule::Headers
            }
        }
        fn body(&mut self, data: &[u8]) {
            if let Some(b) = self.bodies.last_mut() {
                b.extend_from_slice(data);
            }
        }
        fn end(&mut self, complete: bool) {
            self.ends.push(complete);
        }
        fn stop(&mut self, why: Stop) {
            self.stops.push(why);
        }
    }

    fn run(side: Side, input: &[u8], piece: usize) -> Log {
        let mut f = Framer::new(side);
        let mut log = Log::default();
        for p in input.chunks(piece.max(1)) {
            f.feed(p, &mut log);
        }
        f.close(&mut log);
        log
    }

    fn at_every_split(side: Side, input: &[u8]) -> Log {
        let whole = run(side, input, input.len());
        for piece in 1..=input.len().min(40) {
            assert_eq!(run(side, input, piece), whole, "pieces of {piece}");
        }
        for cut in 0..=input.len() {
            let mut f = Framer::new(side);
            let mut log = Log::default();
            f.feed(&input[..cut], &mut log);
            f.feed(&input[cut..], &mut log);
            f.close(&mut log);
            assert_eq!(log, whole, "split at {cut}");
        }
        whole
    }

    #[test]
    fn keep_alive_requests_with_length_and_chunked() {
        let input = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello\
\r\nPOST /v1/messages HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: GZIP\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: 1\r\n\r\n\
GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
        let log = at_every_split(Side::Request, input);
        assert_eq!(log.heads.len(), 3);
        assert_eq!(log.heads[0].path, "/v1/chat/completions");
        assert_eq!(log.heads[0].content_type, "application/json");
        assert_eq!(log.heads[1].content_encoding, "gzip");
        assert!(log.heads[1].chunked);
        assert_eq!(
            log.bodies,
            vec![b"hello".to_vec(), b"abc0123456789abcdef".to_vec(), vec![]]
        );
        assert_eq!(log.ends, vec![true, true, true]);
        assert!(log.stops.is_empty());
    }

    #[test]
    fn responses_until_close_interim_and_no_body() {
        let input =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\ndata: 2\n\n";
        let log = at_every_split(Side::Response, input);
        assert_eq!(
            log.heads.iter().map(|h| h.status).collect::<Vec<_>>(),
            vec![100, 204, 200]
        );
        assert_eq!(log.bodies[2], b"data: 1\n\ndata: 2\n\n".to_vec());
        assert_eq!(log.ends, vec![true, true, true]);
        // HEAD: the sink says no body, whatever Content-Length says.
        let mut f = Framer::new(Side::Response);
        let mut log = Log {
            no_body_for: Some("HEAD"),
            ..Log::default()
        };
        f.feed(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
            &mut log,
        );
        assert_eq!(log.heads.len(), 2);
    }

    #[test]
    fn truncated_and_lying_lengths_are_survived() {
        // Content-Length larger than the body: the body stays open, the close ends it incomplete.
        let log = run(
            Side::Response,
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
            3,
        );
        assert_eq!(
            (log.bodies[0].as_slice(), log.ends.as_slice()),
            (&b"short"[..], &[false][..])
        );
        // Smaller than the body: the rest is taken for a head, which is not one.
        let log = run(
            Side::Response,
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nlonger body\r\n\r\n",
            4,
        );
        assert_eq!(log.ends, vec![true]);
        assert_eq!(log.stops, vec![Stop::NotHttp1]);
        let log = run(
            Side::Request,
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nlonger\r\n\r\n",
            4,
        );
        assert_eq!(log.stops, vec![Stop::Malformed]);
        // A head cut by the close.
        assert_eq!(
            run(Side::Request, b"POST / HTTP/1.1\r\nHost:", 5).stops,
            vec![Stop::Truncated]
        );
        // Chunked cut in the middle.
        let log = run(
            Side::Response,
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            2,
        );
        assert_eq!(log.ends, vec![false]);
    }

    #[test]
    fn what_stops_a_framer() {
        let h2 = [H2_PREFACE, &[0, 0, 18, 4, 0, 0, 0, 0, 0][..]].concat();
        for piece in [1, 2, 3, 5, 100] {
            assert_eq!(
                run(Side::Request, &h2, piece).stops,
                vec![Stop::Http2],
                "{piece}"
            );
        }
        assert_eq!(
            run(Side::Response, &[0, 0, 18, 4, 0], 1).stops,
            vec![Stop::NotHttp1]
        );
        assert_eq!(
            run(Side::Request, b"\x16\x03\x01\x02\x00\r\n\r\n", 9).stops,
            vec![Stop::Malformed]
        );
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        let mut f = Framer::new(Side::Request);
        let mut log = Log::default();
        f.feed(big.as_bytes(), &mut log);
        f.feed(b"more", &mut log);
        assert_eq!(log.stops, vec![Stop::HeadTooLarge]);
        assert!(f.stopped() && f.ignored > 0 && f.head.capacity() == 0);
        let many: String = (0..200).map(|i| format!("X-{i}: 1\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            run(Side::Request, many.as_bytes(), 1000).stops,
            vec![Stop::HeadTooLarge]
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
        ] {
            assert_eq!(run(Side::Response, bad, 3).stops, vec![Stop::BadChunk]);
        }
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(run(Side::Response, two, 100).stops, vec![Stop::Malformed]);
        let up = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
        assert_eq!(run(Side::Response, up, 100).stops, vec![Stop::Upgraded]);
    }

    #[test]
    fn bare_lf_heads() {
        let log = run(
            Side::Response,
            b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
            1,
        );
        assert_eq!(
            (log.bodies[0].as_slice(), log.ends.as_slice()),
            (&b"ok"[..], &[true][..])
        );
    }
}
