//! Fake model providers: TLS servers inside a test namespace that speak the
//! OpenAI and Anthropic wire formats and know the true token counts of what
//! they served.
//!
//! [`start`] binds `addr` in a [`NetnsGuard`] and serves HTTP/1.1 over real
//! TLS (rustls; made with rcgen: a test root CA, an intermediate, and a
//! leaf for the provider's API host; leaf and intermediate are sent, as
//! public servers send theirs). Clients reach it with
//! `curl --cacert <ca_file> --resolve <host>:443:<ip>`:
//!
//! - OpenAI (`api.openai.com`): `POST /v1/chat/completions` (a pretty-printed
//!   `chat.completion` with `usage`; with `"stream": true` an SSE stream of
//!   `chat.completion.chunk`s, one per token, each flushed on its own, a
//!   usage chunk when `stream_options.include_usage`, then `data: [DONE]`)
//!   and `POST /v1/embeddings` (floats, or `encoding_format: "base64"`).
//! - Anthropic (`api.anthropic.com`): `POST /v1/messages` (a `message` with
//!   `usage.input_tokens/output_tokens`; streamed: `message_start`,
//!   `content_block_start`, `ping`, one `content_block_delta` per token,
//!   `content_block_stop`, `message_delta` with usage, `message_stop`).
//!
//! The completion is deterministic pseudo-English ([`prose`]) of exactly
//! `max_tokens` (or `max_completion_tokens`) tokens. Counts come from
//! tiktoken: o200k_base or cl100k_base as OpenAI uses them for the model
//! (chat prompts with OpenAI's per-message framing: 3 tokens a message plus
//! 3 to prime the reply); Anthropic's tokenizer is not public, so its counts
//! are cl100k_base ones with a framing of the same shape, a stand-in.
//! Responses are paced like generation: one token every `token_interval`
//! (streamed: each event after its token's interval; buffered: the whole
//! body after all of them). Embeddings answer at once.
//!
//! - Gemini (`generativelanguage.googleapis.com`):
//!   `POST /v1beta/models/MODEL:generateContent` (candidates and
//!   `usageMetadata`) and `:streamGenerateContent?alt=sse` (one `data:`
//!   event per token, each with the counts so far, CRLF-separated as
//!   Google sends them). Counts are cl100k_base ones, a stand-in.
//!
//! Response headers are shaped like the real ones (rate-limit headers,
//! request ids, Cloudflare cookies), so fixed byte overheads are realistic.
//! [`start_shaped`] with [`Shape::realistic`] (src/fake_shape.rs) goes
//! further: compressed buffered bodies for clients that accept them, CDN
//! headers of varying length, several stream events per TLS record.
//! Every request is recorded ([`Served`]) with its `X-Client-Request-Id`,
//! so a test can tie a client's connection to the true usage.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{ServerConfig, ServerConnection, StreamOwned, pki_types::PrivateKeyDer};
use serde_json::{Value, json};
use tiktoken_rs::CoreBPE;

pub use crate::fake_shape::Shape;
use crate::{NetnsGuard, TempDir, fake_shape::Out};

/// Which provider a server plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Flavor {
    /// The API host name its certificate is for.
    pub fn host(self) -> &'static str {
        match self {
            Flavor::OpenAi => "api.openai.com",
            Flavor::Anthropic => "api.anthropic.com",
            Flavor::Gemini => "generativelanguage.googleapis.com",
        }
    }
}

/// What a request asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Messages,
    /// Gemini's generateContent and streamGenerateContent.
    GenerateContent,
}

/// True token counts, as the response's `usage` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

/// One request the server answered.
#[derive(Clone, Debug)]
pub struct Served {
    /// The request's `X-Client-Request-Id` header.
    pub request_id: Option<String>,
    pub endpoint: Endpoint,
    pub model: String,
    pub streamed: bool,
    pub usage: Usage,
    pub peer: SocketAddr,
}

/// Server settings.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Time per generated token (0: answer at once).
    pub token_interval: Duration,
}

impl Default for Options {
    /// 1 ms a token: faster than real providers (10–50 ms), slow enough that
    /// streamed tokens leave as separate segments, as they do for real.
    fn default() -> Self {
        Options {
            token_interval: Duration::from_millis(1),
        }
    }
}

/// A running fake provider; stops accepting on drop.
pub struct FakeProvider {
    flavor: Flavor,
    addr: SocketAddr,
    ca_file: PathBuf,
    served: Arc<Mutex<Vec<Served>>>,
    records: Arc<ConnRecords>,
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    _dir: TempDir,
}

/// [`start_with`] default [`Options`].
pub fn start(netns: &NetnsGuard, addr: &str, flavor: Flavor) -> FakeProvider {
    start_with(netns, addr, flavor, Options::default())
}

/// Starts a `flavor` server on `addr` ("192.0.2.1:443") inside `netns`,
/// tidy.
pub fn start_with(netns: &NetnsGuard, addr: &str, flavor: Flavor, opts: Options) -> FakeProvider {
    start_shaped(netns, addr, flavor, opts, Shape::default())
}

/// [`start_with`], with answers shaped by `shape` (src/fake_shape.rs).
pub fn start_shaped(
    netns: &NetnsGuard,
    addr: &str,
    flavor: Flavor,
    opts: Options,
    shape: Shape,
) -> FakeProvider {
    let dir = TempDir::new("llm-egress-fake-provider");
    let (config, ca_pem) = tls_config(flavor.host());
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", ca_file.display()));
    let listener = netns
        .in_netns(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let local = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"));
    let accept = listener
        .try_clone()
        .unwrap_or_else(|e| panic!("dup listener: {e}"));
    let served = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let records = Arc::new(Mutex::new(Vec::new()));
    let (s, st, rec) = (served.clone(), stop.clone(), records.clone());
    std::thread::spawn(move || {
        for conn in accept.incoming() {
            if st.load(Ordering::SeqCst) {
                break;
            }
            let Ok(conn) = conn else { continue };
            let (config, s, rec) = (config.clone(), s.clone(), rec.clone());
            std::thread::spawn(move || {
                if let Err(e) = serve(conn, config, flavor, opts, shape, s, &rec) {
                    eprintln!("fake provider ({}): {e}", flavor.host());
                }
            });
        }
    });
    FakeProvider {
        flavor,
        addr: local,
        ca_file,
        served,
        records,
        stop,
        listener,
        _dir: dir,
    }
}

impl FakeProvider {
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    pub fn host(&self) -> &'static str {
        self.flavor.host()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The test CA's certificate (PEM), for `curl --cacert`.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// `curl --resolve` argument: the API host at this server's address.
    pub fn resolve_arg(&self) -> String {
        format!("{}:{}:{}", self.host(), self.addr.port(), self.addr.ip())
    }

    /// `https://<host><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.host())
    }

    /// TLS records written and read so far on each connection, by client
    /// address, in the order the connections were accepted.
    pub fn records(&self) -> Vec<(SocketAddr, RecordCounts)> {
        self.records
            .lock()
            .map(|r| {
                r.iter()
                    .map(|(a, c)| (*a, c.lock().map(|c| *c).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The requests answered so far.
    pub fn served(&self) -> Vec<Served> {
        self.served.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The requests answered, once there are at least `n` (waiting up to
    /// 5 s): a request is recorded after the last byte of its answer left,
    /// so a client may be done before its request is recorded.
    pub fn wait_served(&self, n: usize) -> Vec<Served> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let served = self.served();
            if served.len() >= n || std::time::Instant::now() >= deadline {
                return served;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a listening socket we own wakes the
        // accept loop (which holds a dup of it) with an error.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A server config for `host` and the CA certificate (PEM) that signed it.
pub fn tls_config(host: &str) -> (Arc<ServerConfig>, String) {
    let (chain, (key, ca_pem)) = chain_for(host);
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .unwrap_or_else(|e| panic!("TLS config: {e}"));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(config), ca_pem)
}

type Chain = Vec<rustls::pki_types::CertificateDer<'static>>;

/// Leaf and intermediate for `host`, the leaf's key, the root CA (PEM).
fn chain_for(host: &str) -> (Chain, (PrivateKeyDer<'static>, String)) {
    let ca = crate::test_ca::root("llm-egress test CA");
    let mid = crate::test_ca::intermediate("llm-egress test intermediate", &ca);
    let wildcard = format!("*.{host}");
    let mut params = crate::test_ca::leaf_params(&[host, &wildcard], host);
    // Public leaves carry signed certificate timestamps (~250 bytes); an
    // opaque extension of a private OID stands in for them.
    let mut filler = vec![0x04, 0x81, 240];
    filler.extend((0..240u32).map(|i| (i * 37 % 251) as u8));
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 55555, 1],
            filler,
        ));
    let (leaf, key) = crate::test_ca::sign(params, &mid);
    // As public servers do: leaf and intermediate, not the root.
    let chain = vec![leaf.der().clone(), mid.der().clone()];
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    (chain, (key, ca.pem()))
}

/// The TLS record counts of every connection a server served, by peer.
type ConnRecords = Mutex<Vec<(SocketAddr, Arc<Mutex<RecordCounts>>)>>;

/// TLS records of one connection as the server wrote and read them: the
/// ground truth for the kernel's record counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecordCounts {
    /// Records the server wrote (what the client receives).
    pub written: u64,
    pub app_written: u64,
    /// Records the server read (what the client sent).
    pub read: u64,
    pub app_read: u64,
    /// Plaintext bytes the server read (decrypted requests, heads and
    /// bodies, complete or not).
    pub plain_read: u64,
    /// Requests the server read whole (head and every body byte), answered
    /// or not.
    pub requests_read: u64,
}

/// Counts TLS records along a byte stream: 5-byte headers (type, version,
/// 16-bit length), wherever the stream's chunks are cut.
#[derive(Clone, Debug, Default)]
pub struct RecordWalker {
    /// Body bytes of the current record still to come.
    skip: usize,
    hdr: Vec<u8>,
    pub records: u64,
    /// application_data (content type 23) records.
    pub app: u64,
}

impl RecordWalker {
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.hdr.len()).min(bytes.len());
            self.hdr.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            if self.hdr.len() == 5 {
                self.records += 1;
                if self.hdr[0] == 23 {
                    self.app += 1;
                }
                self.skip = usize::from(u16::from_be_bytes([self.hdr[3], self.hdr[4]]));
                self.hdr.clear();
            }
        }
    }
}

/// The server's socket: a TcpStream that counts the TLS records through it.
pub struct RecordSock {
    sock: TcpStream,
    out: RecordWalker,
    inn: RecordWalker,
    counts: Arc<Mutex<RecordCounts>>,
}

impl RecordSock {
    fn publish(&self) {
        if let Ok(mut c) = self.counts.lock() {
            c.written = self.out.records;
            c.app_written = self.out.app;
            c.read = self.inn.records;
            c.app_read = self.inn.app;
        }
    }
}

impl Read for RecordSock {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.inn.feed(&buf[..n]);
        self.publish();
        Ok(n)
    }
}

impl Write for RecordSock {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.sock.write(buf)?;
        self.out.feed(&buf[..n]);
        self.publish();
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// One connection: requests until the client closes (keep-alive).
fn serve(
    conn: TcpStream,
    config: Arc<ServerConfig>,
    flavor: Flavor,
    opts: Options,
    shape: Shape,
    served: Arc<Mutex<Vec<Served>>>,
    records: &ConnRecords,
) -> Result<(), String> {
    conn.set_nodelay(true)
        .map_err(|e| format!("nodelay: {e}"))?;
    let peer = conn.peer_addr().map_err(|e| format!("peer: {e}"))?;
    // With HTTP/2 offered, the handshake decides (src/fake_h2.rs); its
    // records are not counted.
    let (conn, tls) = if shape.h2 {
        match crate::fake_h2::accept(conn, &config, flavor, opts, shape, served.clone())? {
            crate::fake_h2::Accepted::Served => return Ok(()),
            crate::fake_h2::Accepted::Http1(conn, tls) => (conn, *tls),
        }
    } else {
        let tls = ServerConnection::new(config).map_err(|e| format!("tls: {e}"))?;
        (conn, tls)
    };
    let counts = Arc::new(Mutex::new(RecordCounts::default()));
    if let Ok(mut r) = records.lock() {
        r.push((peer, counts.clone()));
    }
    let sock = RecordSock {
        sock: conn,
        out: RecordWalker::default(),
        inn: RecordWalker::default(),
        counts: counts.clone(),
    };
    let mut s = StreamOwned::new(tls, sock);
    let mut plain = PlainCount {
        inner: &mut s,
        counts: counts.clone(),
    };
    let result = serve_counted(
        &mut plain,
        flavor,
        opts,
        shape,
        &served,
        peer,
        Some(&counts),
    );
    let _ = s.sock.sock.shutdown(Shutdown::Both);
    result
}

/// The plaintext side of a TLS connection, counting what the server read
/// (`RecordCounts::plain_read`, `requests_read`).
struct PlainCount<'a, S> {
    inner: &'a mut S,
    counts: Arc<Mutex<RecordCounts>>,
}

impl<S: Read> Read for PlainCount<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Ok(mut c) = self.counts.lock() {
            c.plain_read += n as u64;
        }
        Ok(n)
    }
}

impl<S: Write> Write for PlainCount<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Answers the requests of one connection's plaintext stream until the
/// client closes it (TLS in [`serve`], plain HTTP in fake_shape::plain).
pub(crate) fn serve_io(
    s: &mut (impl Read + Write),
    flavor: Flavor,
    opts: Options,
    shape: Shape,
    served: &Mutex<Vec<Served>>,
    peer: SocketAddr,
) -> Result<(), String> {
    serve_counted(s, flavor, opts, shape, served, peer, None)
}

/// [`serve_io`], counting whole requests read in `counts`.
fn serve_counted(
    s: &mut (impl Read + Write),
    flavor: Flavor,
    opts: Options,
    shape: Shape,
    served: &Mutex<Vec<Served>>,
    peer: SocketAddr,
    counts: Option<&Mutex<RecordCounts>>,
) -> Result<(), String> {
    let mut pending = Vec::new();
    while let Some(req) = read_request(s, &mut pending)? {
        if let Some(mut c) = counts.and_then(|c| c.lock().ok()) {
            c.requests_read += 1;
        }
        let mut out = Out::new(s, shape, req.header("accept-encoding"));
        let record = respond(&mut out, flavor, opts, &req).map_err(|e| format!("respond: {e}"))?;
        out.finish().map_err(|e| format!("respond: {e}"))?;
        if let Some(mut r) = record {
            r.peer = peer;
            r.request_id = req.header("x-client-request-id").map(str::to_string);
            if let Ok(mut v) = served.lock() {
                v.push(r);
            }
        }
    }
    Ok(())
}

pub(crate) struct Request {
    pub(crate) method: String,
    pub(crate) path: String,
    /// Names in lower case.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Request {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The next request, `None` when the client closed the connection.
fn read_request(
    s: &mut (impl Read + Write),
    pending: &mut Vec<u8>,
) -> Result<Option<Request>, String> {
    let mut chunk = [0u8; 16_384];
    let head_end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) if pending.is_empty() => return Ok(None),
            Ok(0) => return Err("connection closed inside a request".into()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&pending[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (
        first.next().unwrap_or("").to_string(),
        first.next().unwrap_or("").to_string(),
    );
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    pending.drain(..head_end + 4);
    let expect = headers
        .iter()
        .any(|(k, v)| k == "expect" && v.eq_ignore_ascii_case("100-continue"));
    if expect && pending.len() < len {
        s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
    }
    while pending.len() < len {
        match s.read(&mut chunk) {
            Ok(0) => return Err("connection closed inside a body".into()),
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read body: {e}")),
        }
    }
    let body = pending.drain(..len).collect();
    Ok(Some(Request {
        method,
        path,
        headers,
        body,
    }))
}

/// Answers one request; the record of what it served (none for errors).
pub(crate) fn respond(
    s: &mut Out<'_>,
    flavor: Flavor,
    opts: Options,
    req: &Request,
) -> std::io::Result<Option<Served>> {
    let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
    let endpoint = match (flavor, req.method.as_str(), req.path.as_str()) {
        (Flavor::OpenAi, "POST", "/v1/chat/completions") => Endpoint::ChatCompletions,
        (Flavor::OpenAi, "POST", "/v1/embeddings") => Endpoint::Embeddings,
        (Flavor::Anthropic, "POST", "/v1/messages") => Endpoint::Messages,
        (Flavor::Gemini, "POST", p) if crate::fake_gemini::method(p).is_some() => {
            Endpoint::GenerateContent
        }
        _ => {
            let msg = json!({"error": {"message": format!("Unknown request URL: {} {}", req.method, req.path), "type": "invalid_request_error"}});
            write_response(s, flavor, 404, "application/json", &msg.to_string())?;
            return Ok(None);
        }
    };
    if body.is_null() {
        let msg = json!({"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error"}});
        write_response(s, flavor, 400, "application/json", &msg.to_string())?;
        return Ok(None);
    }
    if endpoint == Endpoint::GenerateContent {
        return crate::fake_gemini::respond(s, opts, req.path.as_str(), &body, &req.body);
    }
    let model = body["model"].as_str().unwrap_or("gpt-4o-mini").to_string();
    let streamed = body["stream"].as_bool().unwrap_or(false);
    let mut rng = Rng::new(fnv(&req.body));
    let usage = match endpoint {
        Endpoint::Embeddings => embeddings(s, &body, &model, &mut rng)?,
        Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::GenerateContent => {
            let bpe = bpe_for(&model);
            let prompt = match endpoint {
                Endpoint::Messages => anthropic_prompt_tokens(&body),
                _ => openai_prompt_tokens(&body, bpe),
            };
            let n = body["max_completion_tokens"]
                .as_u64()
                .or(body["max_tokens"].as_u64())
                .unwrap_or(16) as usize;
            let pieces = completion(rng.next_u64(), n, bpe);
            let usage = Usage {
                prompt,
                completion: pieces.len() as u64,
            };
            let generation = Generation {
                pieces: &pieces,
                usage,
                model: &model,
                interval: opts.token_interval,
            };
            match (endpoint, streamed) {
                (Endpoint::Messages, false) => anthropic_message(s, &generation, &mut rng)?,
                (Endpoint::Messages, true) => anthropic_stream(s, &generation, &mut rng)?,
                (_, false) => openai_completion(s, &generation, &mut rng)?,
                (_, true) => {
                    let usage_chunk = body["stream_options"]["include_usage"]
                        .as_bool()
                        .unwrap_or(false);
                    openai_stream(s, &generation, usage_chunk, &mut rng)?
                }
            }
            usage
        }
    };
    let peer = SocketAddr::from(([0, 0, 0, 0], 0));
    Ok(Some(Served {
        request_id: None,
        endpoint,
        model,
        streamed,
        usage,
        peer,
    }))
}

struct Generation<'a> {
    pieces: &'a [String],
    usage: Usage,
    model: &'a str,
    interval: Duration,
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Headers shaped like the provider's (Cloudflare in front of both).
pub(crate) fn headers(
    flavor: Flavor,
    status: u16,
    content_type: &str,
    length: Option<usize>,
    rng: &mut Rng,
) -> String {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        _ => "Not Found",
    };
    let framing = match length {
        Some(n) => format!("Content-Length: {n}"),
        None => "Transfer-Encoding: chunked".to_string(),
    };
    let t = now_secs();
    let common_tail = format!(
        "strict-transport-security: max-age=31536000; includeSubDomains; preload\r\ncf-cache-status: DYNAMIC\r\n\
         X-Content-Type-Options: nosniff\r\nServer: cloudflare\r\nCF-RAY: {}-FRA\r\nalt-svc: h3=\":443\"; ma=86400\r\n\r\n",
        rng.hex(16)
    );
    match flavor {
        Flavor::OpenAi => format!(
            "HTTP/1.1 {status} {reason}\r\nDate: Wed, 25 Nov 2026 18:06:26 GMT\r\nContent-Type: {content_type}\r\n{framing}\r\n\
             Connection: keep-alive\r\naccess-control-expose-headers: X-Request-ID\r\nopenai-organization: user-{}\r\n\
             openai-processing-ms: {}\r\nopenai-project: proj_{}\r\nopenai-version: 2020-10-01\r\nx-envoy-upstream-service-time: {}\r\n\
             x-ratelimit-limit-requests: 10000\r\nx-ratelimit-limit-tokens: 30000000\r\nx-ratelimit-remaining-requests: 9999\r\n\
             x-ratelimit-remaining-tokens: 29999{}\r\nx-ratelimit-reset-requests: 6ms\r\nx-ratelimit-reset-tokens: 0s\r\n\
             x-request-id: req_{}\r\nset-cookie: __cf_bm={}-{t}-1.0.1.1-{}; path=/; expires=Wed, 25-Nov-26 18:36:26 GMT; \
             domain=.api.openai.com; HttpOnly; Secure; SameSite=None\r\nset-cookie: _cfuvid={}-{t}000-0.0.1.1-604800000; path=/; \
             domain=.api.openai.com; HttpOnly; Secure; SameSite=None\r\n{common_tail}",
            rng.alnum(24),
            100 + rng.below(900),
            rng.alnum(24),
            100 + rng.below(900),
            100 + rng.below(900),
            rng.hex(32),
            rng.alnum(43),
            rng.alnum(86),
            rng.alnum(43),
        ),
        Flavor::Gemini => format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {}\r\nVary: Origin\r\nVary: X-Origin\r\nVary: Referer\r\n\
             Date: Wed, 25 Nov 2026 18:06:26 GMT\r\nServer: scaffolding on HTTPServer2\r\nX-XSS-Protection: 0\r\n\
             X-Frame-Options: SAMEORIGIN\r\nX-Content-Type-Options: nosniff\r\nServer-Timing: gfet4t7; dur={}\r\n\
             Alt-Svc: h3=\":443\"; ma=2592000,h3-29=\":443\"; ma=2592000\r\n{framing}\r\n\r\n",
            if content_type.starts_with("text/event-stream") {
                "text/event-stream"
            } else {
                "application/json; charset=UTF-8"
            },
            100 + rng.below(2000),
        ),
        Flavor::Anthropic => {
            let mut h = format!(
                "HTTP/1.1 {status} {reason}\r\nDate: Wed, 25 Nov 2026 18:06:26 GMT\r\nContent-Type: {content_type}\r\n{framing}\r\nConnection: keep-alive\r\n"
            );
            for (what, limit) in [
                ("input-tokens", 400_000),
                ("output-tokens", 80_000),
                ("requests", 4_000),
                ("tokens", 480_000),
            ] {
                h.push_str(&format!(
                    "anthropic-ratelimit-{what}-limit: {limit}\r\nanthropic-ratelimit-{what}-remaining: {}\r\n\
                     anthropic-ratelimit-{what}-reset: 2026-11-25T18:06:27Z\r\n",
                    limit - 1
                ));
            }
            if length.is_none() {
                h.push_str("Cache-Control: no-cache\r\n");
            }
            h.push_str(&format!(
                "request-id: req_011C{}\r\nanthropic-organization-id: {}-{}-{}-{}-{}\r\nvia: 1.1 google\r\nX-Robots-Tag: none\r\n{common_tail}",
                rng.alnum(20),
                rng.hex(8),
                rng.hex(4),
                rng.hex(4),
                rng.hex(4),
                rng.hex(12)
            ));
            h
        }
    }
}

pub(crate) fn write_response(
    s: &mut Out<'_>,
    flavor: Flavor,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let mut rng = Rng::new(fnv(body.as_bytes()));
    let (coding, body) = s.encode(body.as_bytes());
    let mut head = headers(flavor, status, content_type, Some(body.len()), &mut rng);
    let coding = coding
        .map(|c| format!("Content-Encoding: {c}\r\n"))
        .unwrap_or_default();
    s.decorate(&mut head, &coding, &mut rng);
    // One write: head and body leave in one TLS record, as before.
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    s.write_all(&out)?;
    s.finish()
}

/// One HTTP/1.1 chunk, written (and so encrypted and sent) on its own.
pub(crate) fn write_chunk(s: &mut Out<'_>, data: &str) -> std::io::Result<()> {
    s.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())?;
    s.flush()
}

pub(crate) fn start_stream(s: &mut Out<'_>, flavor: Flavor, rng: &mut Rng) -> std::io::Result<()> {
    let mut head = headers(flavor, 200, "text/event-stream; charset=utf-8", None, rng);
    s.decorate(&mut head, "", rng);
    s.write_all(head.as_bytes())?;
    s.flush()
}

pub(crate) fn end_stream(s: &mut Out<'_>) -> std::io::Result<()> {
    s.write_all(b"0\r\n\r\n")?;
    s.finish()
}

/// The snapshot name OpenAI reports for a model alias.
fn snapshot(model: &str) -> String {
    match model {
        "gpt-4o-mini" => "gpt-4o-mini-2024-07-18".into(),
        "gpt-4o" => "gpt-4o-2024-08-06".into(),
        "gpt-4.1" => "gpt-4.1-2025-04-14".into(),
        "gpt-4.1-mini" => "gpt-4.1-mini-2025-04-14".into(),
        "gpt-3.5-turbo" => "gpt-3.5-turbo-0125".into(),
        m => m.into(),
    }
}

fn openai_usage(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt,
        "completion_tokens": u.completion,
        "total_tokens": u.prompt + u.completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0, "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

fn openai_completion(s: &mut Out<'_>, g: &Generation, rng: &mut Rng) -> std::io::Result<()> {
    std::thread::sleep(g.interval * g.pieces.len() as u32);
    let body = json!({
        "id": format!("chatcmpl-{}", rng.alnum(29)),
        "object": "chat.completion",
        "created": now_secs(),
        "model": snapshot(g.model),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": g.pieces.concat(), "refusal": null, "annotations": []},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": openai_usage(g.usage),
        "service_tier": "default",
        "system_fingerprint": format!("fp_{}", rng.hex(10))
    });
    // The real API pretty-prints non-streamed bodies (two-space indent).
    let text = serde_json::to_string_pretty(&body).unwrap_or_default();
    write_response(s, Flavor::OpenAi, 200, "application/json", &text)
}

fn openai_stream(
    s: &mut Out<'_>,
    g: &Generation,
    usage_chunk: bool,
    rng: &mut Rng,
) -> std::io::Result<()> {
    let (id, created, model, fp) = (
        format!("chatcmpl-{}", rng.alnum(29)),
        now_secs(),
        snapshot(g.model),
        format!("fp_{}", rng.hex(10)),
    );
    let chunk = |delta: Value, finish: Value| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "service_tier": "default", "system_fingerprint": fp,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if usage_chunk {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    start_stream(s, Flavor::OpenAi, rng)?;
    write_chunk(
        s,
        &chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        ),
    )?;
    for piece in g.pieces {
        std::thread::sleep(g.interval);
        write_chunk(s, &chunk(json!({"content": piece}), Value::Null))?;
    }
    write_chunk(s, &chunk(json!({}), json!("stop")))?;
    if usage_chunk {
        let c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "service_tier": "default", "system_fingerprint": fp, "choices": [], "usage": openai_usage(g.usage)
        });
        write_chunk(s, &format!("data: {c}\n\n"))?;
    }
    write_chunk(s, "data: [DONE]\n\n")?;
    end_stream(s)
}

fn anthropic_usage(u: Usage, output: u64) -> Value {
    json!({"input_tokens": u.prompt, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": output, "service_tier": "standard"})
}

fn anthropic_message(s: &mut Out<'_>, g: &Generation, rng: &mut Rng) -> std::io::Result<()> {
    std::thread::sleep(g.interval * g.pieces.len() as u32);
    let body = json!({
        "id": format!("msg_01{}", rng.alnum(22)),
        "type": "message",
        "role": "assistant",
        "model": g.model,
        "content": [{"type": "text", "text": g.pieces.concat()}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": anthropic_usage(g.usage, g.usage.completion)
    });
    write_response(
        s,
        Flavor::Anthropic,
        200,
        "application/json",
        &body.to_string(),
    )
}

fn anthropic_stream(s: &mut Out<'_>, g: &Generation, rng: &mut Rng) -> std::io::Result<()> {
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    start_stream(s, Flavor::Anthropic, rng)?;
    let message = json!({
        "id": format!("msg_01{}", rng.alnum(22)), "type": "message", "role": "assistant", "model": g.model,
        "content": [], "stop_reason": null, "stop_sequence": null, "usage": anthropic_usage(g.usage, 1)
    });
    write_chunk(
        s,
        &event(
            "message_start",
            json!({"type": "message_start", "message": message}),
        ),
    )?;
    write_chunk(
        s,
        &event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    )?;
    write_chunk(s, &event("ping", json!({"type": "ping"})))?;
    for piece in g.pieces {
        std::thread::sleep(g.interval);
        let delta = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}});
        write_chunk(s, &event("content_block_delta", delta))?;
    }
    write_chunk(
        s,
        &event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
    )?;
    let delta = json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": g.usage.completion}});
    write_chunk(s, &event("message_delta", delta))?;
    write_chunk(s, &event("message_stop", json!({"type": "message_stop"})))?;
    end_stream(s)
}

fn embeddings(s: &mut Out<'_>, body: &Value, model: &str, rng: &mut Rng) -> std::io::Result<Usage> {
    let inputs: Vec<String> = match &body["input"] {
        Value::String(t) => vec![t.clone()],
        Value::Array(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    };
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let prompt: u64 = inputs
        .iter()
        .map(|t| bpe.encode_ordinary(t).len() as u64)
        .sum();
    let dims = body["dimensions"]
        .as_u64()
        .unwrap_or(if model.contains("large") { 3072 } else { 1536 }) as usize;
    let base64 = body["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = (0..inputs.len())
        .map(|i| {
            let v: Vec<f32> = (0..dims)
                .map(|_| (rng.unit() as f32 - 0.5) * 0.12)
                .collect();
            let embedding = if base64 {
                json!(base64_encode(
                    &v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>()
                ))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let out = json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt, "total_tokens": prompt}});
    let text = serde_json::to_string_pretty(&out).unwrap_or_default();
    write_response(s, Flavor::OpenAi, 200, "application/json", &text)?;
    Ok(Usage {
        prompt,
        completion: 0,
    })
}

/// The tokenizer OpenAI uses for `model` (o200k_base for the 4o/4.1/o-series
/// family, else cl100k_base).
pub fn bpe_for(model: &str) -> &'static CoreBPE {
    match tiktoken_rs::tokenizer::get_tokenizer(model) {
        Some(tiktoken_rs::tokenizer::Tokenizer::Cl100kBase) => tiktoken_rs::cl100k_base_singleton(),
        Some(_) => tiktoken_rs::o200k_base_singleton(),
        None if model.starts_with("claude") => tiktoken_rs::cl100k_base_singleton(),
        None => tiktoken_rs::o200k_base_singleton(),
    }
}

/// A text value: a string, or content parts (`[{"type":"text","text":..}]`).
pub(crate) fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// OpenAI's count for chat prompts: 3 per message plus its role and
/// content (and name plus 1), plus 3 that prime the reply.
fn openai_prompt_tokens(body: &Value, bpe: &CoreBPE) -> u64 {
    let n = |t: &str| bpe.encode_ordinary(t).len() as u64;
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    3 + messages
        .iter()
        .map(|m| {
            let name = m["name"].as_str().map_or(0, |v| n(v) + 1);
            3 + n(m["role"].as_str().unwrap_or("")) + n(&text_of(&m["content"])) + name
        })
        .sum::<u64>()
}

/// Stand-in for Anthropic's (private) count: cl100k_base tokens of the
/// system prompt and each message, 3 framing tokens a message, 4 for the
/// conversation.
fn anthropic_prompt_tokens(body: &Value) -> u64 {
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let n = |t: &str| bpe.encode_ordinary(t).len() as u64;
    let system = match &body["system"] {
        Value::Null => 0,
        v => 3 + n(&text_of(v)),
    };
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    4 + system
        + messages
            .iter()
            .map(|m| 3 + n(&text_of(&m["content"])))
            .sum::<u64>()
}

/// `n` tokens of [`prose`] as `bpe` splits them: the deltas of a stream.
pub(crate) fn completion(seed: u64, n: usize, bpe: &CoreBPE) -> Vec<String> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut rng = Rng::new(seed);
    while tokens.len() < n {
        text.push_str(&words(&mut rng, 8 * n + 32));
        tokens = bpe.encode_ordinary(&text);
    }
    tokens[..n]
        .iter()
        .map(|t| bpe.decode(&[*t]).unwrap_or_default())
        .collect()
}

/// Deterministic pseudo-English text of exactly `tokens` cl100k_base
/// tokens (sentences, commas, paragraphs), for prompts.
pub fn prose(seed: u64, tokens: usize) -> String {
    completion(seed, tokens, tiktoken_rs::cl100k_base_singleton()).concat()
}

/// Number of cl100k_base tokens of `text`.
pub fn cl100k_tokens(text: &str) -> usize {
    tiktoken_rs::cl100k_base_singleton()
        .encode_ordinary(text)
        .len()
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "time",
    "people",
    "system",
    "data",
    "model",
    "request",
    "service",
    "network",
    "report",
    "customer",
    "order",
    "account",
    "policy",
    "question",
    "answer",
    "summary",
    "document",
    "results",
    "support",
    "team",
    "process",
    "because",
    "should",
    "between",
    "important",
    "following",
    "example",
    "information",
    "available",
    "different",
    "however",
    "several",
    "through",
    "during",
    "without",
    "within",
    "specific",
    "general",
    "current",
    "previous",
    "response",
    "problem",
    "solution",
    "approach",
    "analysis",
    "quickly",
    "carefully",
    "usually",
    "production",
    "deployment",
    "configuration",
    "security",
    "performance",
    "latency",
    "throughput",
    "workload",
    "cluster",
    "database",
    "migration",
    "release",
    "schedule",
    "meeting",
    "review",
    "feedback",
    "invoice",
    "shipment",
    "warehouse",
    "delivery",
    "contract",
    "budget",
    "forecast",
    "quarter",
    "revenue",
    "growth",
    "market",
    "product",
    "feature",
    "version",
    "update",
    "error",
    "warning",
    "message",
    "user",
    "client",
    "server",
    "connection",
    "session",
    "token",
    "limit",
    "cost",
    "estimate",
    "explain",
    "describe",
    "compare",
    "translate",
    "write",
    "check",
    "improve",
    "reduce",
    "increase",
    "make",
    "take",
    "give",
    "find",
    "know",
    "think",
    "see",
    "come",
    "look",
    "use",
    "work",
    "call",
    "try",
    "need",
    "feel",
    "become",
    "leave",
    "put",
    "mean",
    "keep",
    "let",
    "begin",
    "seem",
    "help",
    "show",
    "hear",
    "play",
    "run",
    "move",
    "like",
    "live",
    "believe",
    "new",
    "good",
    "first",
    "last",
    "long",
    "great",
    "little",
    "own",
    "other",
    "old",
    "right",
    "big",
    "high",
    "small",
    "large",
    "next",
    "early",
    "young",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "three",
    "twelve",
    "2024",
    "15%",
];

/// About `n` characters of sentences.
fn words(rng: &mut Rng, n: usize) -> String {
    let mut out = String::new();
    while out.len() < n {
        let len = 6 + rng.below(14) as usize;
        for i in 0..len {
            // Zipf-like: word k (the list is roughly by frequency) with
            // weight about 1/(k+1), as in English text.
            let k = ((WORDS.len() as f64 + 1.0).powf(rng.unit()) - 1.0) as usize;
            let w = WORDS[k.min(WORDS.len() - 1)];
            if i == 0 {
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push(' ');
                }
                let mut c = w.chars();
                out.extend(c.next().map(|f| f.to_ascii_uppercase()));
                out.push_str(c.as_str());
            } else {
                out.push(' ');
                out.push_str(w);
                if i + 1 < len && rng.below(10) == 0 {
                    out.push(',');
                }
            }
        }
        out.push(if rng.below(12) == 0 { '?' } else { '.' });
        if rng.below(5) == 0 {
            out.push_str("\n\n");
        }
    }
    out.trim_end().to_string()
}

/// splitmix64: deterministic, no dependencies.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick_from(&mut self, alphabet: &[u8], n: usize) -> String {
        (0..n)
            .map(|_| alphabet[self.below(alphabet.len() as u64) as usize] as char)
            .collect()
    }

    pub fn alnum(&mut self, n: usize) -> String {
        self.pick_from(
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            n,
        )
    }

    pub fn hex(&mut self, n: usize) -> String {
        self.pick_from(b"0123456789abcdef", n)
    }
}

pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_walker_counts_headers_across_any_cut() {
        // Three records: handshake (3 bytes), application_data (0), (40).
        let mut stream = vec![22, 3, 1, 0, 3, 1, 2, 3, 23, 3, 3, 0, 0, 23, 3, 3, 0, 40];
        stream.extend_from_slice(&[9; 40]);
        for cut in 0..stream.len() {
            let mut w = RecordWalker::default();
            w.feed(&stream[..cut]);
            w.feed(&stream[cut..]);
            assert_eq!((w.records, w.app), (3, 2), "cut at {cut}");
        }
    }

    #[test]
    fn prose_has_exactly_the_tokens_asked_for() {
        for n in [1, 20, 2000] {
            let t = prose(n as u64, n);
            assert_eq!(cl100k_tokens(&t), n, "{t:?}");
        }
        assert_eq!(prose(7, 50), prose(7, 50), "deterministic");
    }

    #[test]
    fn completion_pieces_are_single_tokens() {
        let bpe = bpe_for("gpt-4o-mini");
        let pieces = completion(3, 40, bpe);
        assert_eq!(pieces.len(), 40);
        assert_eq!(bpe.encode_ordinary(&pieces.concat()).len(), 40);
    }

    #[test]
    fn chat_prompt_count_follows_openai_framing() {
        let bpe = bpe_for("gpt-4o");
        let body = json!({"messages": [{"role": "user", "content": "Hello there"}]});
        // (3 + "user" + "Hello" " there") + 3 to prime the reply, as
        // OpenAI's cookbook counts.
        assert_eq!(openai_prompt_tokens(&body, bpe), 3 + 1 + 2 + 3);
    }

    #[test]
    fn chain_is_leaf_and_intermediate() {
        let (chain, _) = chain_for("api.openai.com");
        let sizes: Vec<usize> = chain.iter().map(|c| c.len()).collect();
        eprintln!("certificate chain DER sizes: {sizes:?}");
        assert_eq!(sizes.len(), 2);
        assert!(sizes.iter().sum::<usize>() > 900, "{sizes:?}");
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
    }
}
