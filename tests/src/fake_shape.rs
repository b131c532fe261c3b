//! How a fake provider's answers are shaped on the wire: tidy (the
//! default: uncompressed bodies, the fixed header set, one write, and so
//! one TLS record, per stream event) or like the real services behind their
//! CDNs ([`Shape::realistic`]).
//!
//! - `compress`: buffered bodies are compressed when the request's
//!   `Accept-Encoding` allows it (br, then zstd, then gzip, the order
//!   Cloudflare prefers), with `Content-Encoding` set. Streams stay
//!   uncompressed, as the providers send them.
//! - `cdn_headers`: extra headers of varying number and length
//!   (`cf-ray`, `set-cookie` with random lengths, `x-request-id`,
//!   `server-timing`, `report-to`…), so a head's size is not a constant.
//! - `events_per_write`: stream events (HTTP chunks) are written N at a
//!   time, so one TLS record carries several events, as a CDN that
//!   coalesces writes delivers them.
//! - `h2`: HTTP/2 for a client that offers it in ALPN (curl does unless
//!   told `--http1.1`; the Python SDKs do not), src/fake_h2.rs.
//!
//! [`Out`] is the writer the response code writes through; [`plain`] runs
//! the same server code over plain HTTP on a loopback listener, for
//! capturing test vectors of what real clients send and what the fakes
//! answer (`capture_vectors` in fake_provider.rs).

use std::io::{self, Write};

use crate::fake_provider::Rng;

/// See the module comment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub compress: bool,
    pub cdn_headers: bool,
    /// 1: every event on its own write.
    pub events_per_write: usize,
    /// HTTP/2 for clients that offer it in ALPN (src/fake_h2.rs).
    pub h2: bool,
}

impl Default for Shape {
    /// Tidy: what the fakes always did.
    fn default() -> Self {
        Shape {
            compress: false,
            cdn_headers: false,
            events_per_write: 1,
            h2: false,
        }
    }
}

impl Shape {
    /// Compressed buffered bodies, CDN headers, 4 events per write,
    /// HTTP/2 where the client offers it.
    pub fn realistic() -> Self {
        Shape {
            compress: true,
            cdn_headers: true,
            events_per_write: 4,
            h2: true,
        }
    }
}

/// The writer of one response.
pub struct Out<'a> {
    io: &'a mut dyn Write,
    pub shape: Shape,
    /// The request's `Accept-Encoding`, lower case.
    accept: String,
    pending: Vec<u8>,
    flushes: usize,
}

impl<'a> Out<'a> {
    pub fn new(io: &'a mut dyn Write, shape: Shape, accept_encoding: Option<&str>) -> Self {
        Out {
            io,
            shape,
            accept: accept_encoding.unwrap_or("").to_ascii_lowercase(),
            pending: Vec::new(),
            flushes: 0,
        }
    }

    fn coalescing(&self) -> bool {
        self.shape.events_per_write > 1
    }

    /// Sends everything held back, now.
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.io.write_all(&self.pending)?;
            self.pending.clear();
        }
        self.io.flush()
    }

    /// The coding a buffered body gets, and the body in it.
    pub fn encode(&self, body: &[u8]) -> (Option<&'static str>, Vec<u8>) {
        if !self.shape.compress {
            return (None, body.to_vec());
        }
        let accepts = |c: &str| {
            self.accept
                .split(',')
                .any(|a| a.split(';').next().map(str::trim) == Some(c))
        };
        if accepts("br") {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                let _ = e.write_all(body);
            }
            return (Some("br"), out);
        }
        if accepts("zstd")
            && let Ok(z) = zstd::encode_all(body, 3)
        {
            return (Some("zstd"), z);
        }
        if accepts("gzip") {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            if e.write_all(body).is_ok()
                && let Ok(gz) = e.finish()
            {
                return (Some("gzip"), gz);
            }
        }
        (None, body.to_vec())
    }

    /// `head` (ending in the empty line) with `lines` ("Name: value\r\n"…)
    /// and, with `cdn_headers`, the CDN's extra headers added before its end.
    pub fn decorate(&self, head: &mut String, lines: &str, rng: &mut Rng) {
        let mut extra = lines.to_string();
        if self.shape.cdn_headers {
            extra.push_str(&cdn_headers(rng));
        }
        if let Some(end) = head.rfind("\r\n\r\n") {
            head.insert_str(end + 2, &extra);
        }
    }
}

impl Write for Out<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.coalescing() {
            self.pending.extend_from_slice(buf);
            Ok(buf.len())
        } else {
            self.io.write(buf)
        }
    }

    /// With `events_per_write` N, only every Nth flush sends.
    fn flush(&mut self) -> io::Result<()> {
        if !self.coalescing() {
            return self.io.flush();
        }
        self.flushes += 1;
        if self.flushes.is_multiple_of(self.shape.events_per_write) {
            self.finish()?;
        }
        Ok(())
    }
}

/// Headers a CDN and the provider's edge add, of varying number and length.
fn cdn_headers(rng: &mut Rng) -> String {
    let len = |rng: &mut Rng, base: usize, spread: u64| base + rng.below(spread) as usize;
    // The tidy heads already carry CF-RAY and a request id; these vary
    // in number and length.
    let mut h = format!(
        "server-timing: cfExtPri;dur={}, cfL4;desc=\"?proto=TCP&rtt={}&min_rtt={}&rtt_var={}&sent={}&recv={}\"\r\n",
        rng.below(5000),
        rng.below(90_000),
        rng.below(9000),
        rng.below(40_000),
        rng.below(40),
        rng.below(40),
    );
    for _ in 0..rng.below(3) {
        let (name, value) = (len(rng, 2, 4), len(rng, 20, 120));
        h.push_str(&format!(
            "set-cookie: __cf_{}={}; path=/; expires=Thu, 26-Nov-26 18:36:26 GMT; HttpOnly; Secure; SameSite=None\r\n",
            rng.alnum(name),
            rng.alnum(value),
        ));
    }
    if rng.below(2) == 0 {
        let n = len(rng, 60, 80);
        h.push_str(&format!(
            "report-to: {{\"endpoints\":[{{\"url\":\"https:\\/\\/a.nel.cloudflare.com\\/report\\/v4?s={}\"}}],\"group\":\"cf-nel\",\"max_age\":604800}}\r\nnel: {{\"success_fraction\":0,\"report_to\":\"cf-nel\",\"max_age\":604800}}\r\n",
            rng.alnum(n)
        ));
    }
    if rng.below(2) == 0 {
        h.push_str("vary: Accept-Encoding\r\n");
    }
    h
}

/// A plain-HTTP fake on 127.0.0.1 for capturing vectors: serves one
/// connection at a time with the fake's own code and returns, per
/// connection, (bytes the client sent, bytes the server answered).
pub mod plain {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        sync::{
            Arc, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        thread::JoinHandle,
    };

    use crate::fake_provider::{Flavor, Options, Served, serve_io};

    use super::Shape;

    /// Reads and writes a TCP stream, keeping a copy of both directions.
    struct Tee {
        s: TcpStream,
        sent: Vec<u8>,
        received: Vec<u8>,
    }

    impl Read for Tee {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.s.read(buf)?;
            self.sent.extend_from_slice(&buf[..n]);
            Ok(n)
        }
    }

    impl Write for Tee {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.s.write(buf)?;
            self.received.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.s.flush()
        }
    }

    /// What one connection carried: (its accept order, sent by the
    /// client, answered).
    pub type Conversation = (usize, Vec<u8>, Vec<u8>);

    pub struct PlainFake {
        pub port: u16,
        pub conversations: Arc<Mutex<Vec<Conversation>>>,
        pub served: Arc<Mutex<Vec<Served>>>,
        /// Connections accepted so far.
        pub accepted: Arc<AtomicUsize>,
        _thread: JoinHandle<()>,
    }

    /// Serves `connections` connections on 127.0.0.1 (a free port).
    pub fn start(flavor: Flavor, opts: Options, shape: Shape, connections: usize) -> PlainFake {
        let l = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        let conversations = Arc::new(Mutex::new(Vec::new()));
        let served = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (c, s, a) = (conversations.clone(), served.clone(), accepted.clone());
        let thread = std::thread::spawn(move || {
            for (index, conn) in l.incoming().take(connections).enumerate() {
                let Ok(conn) = conn else { continue };
                let (c, s) = (c.clone(), s.clone());
                a.fetch_add(1, Ordering::SeqCst);
                // Each connection on its own thread: a client may keep one
                // open in its pool while it opens another.
                std::thread::spawn(move || {
                    let peer = conn
                        .peer_addr()
                        .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
                    let mut tee = Tee {
                        s: conn,
                        sent: Vec::new(),
                        received: Vec::new(),
                    };
                    if let Err(e) = serve_io(&mut tee, flavor, opts, shape, &s, peer) {
                        eprintln!("plain fake: {e}");
                    }
                    if let Ok(mut v) = c.lock() {
                        v.push((index, tee.sent, tee.received));
                    }
                });
            }
        });
        PlainFake {
            port,
            conversations,
            served,
            accepted,
            _thread: thread,
        }
    }
}
