//! HTTP/2 for the realistic fake providers ([`Shape::h2`]): a client that
//! offers `h2` in ALPN gets it, as from the real services' CDNs (curl offers
//! it by default; the Python SDKs' httpx does not). A client that offers
//! only HTTP/1.1 gets the HTTP/1.1 server of fake_provider.rs, unchanged.
//!
//! The TLS handshake runs on tokio-rustls (the ALPN answer decides the
//! protocol); an HTTP/1.1 connection is then handed back, as a blocking
//! socket and its rustls state, to the HTTP/1.1 server. An HTTP/2 one is
//! served by hyper: each request's answer is what the HTTP/1.1 path writes
//! (`respond` through `Out`: compression, CDN headers, coalesced events,
//! paced like generation), its head turned into an HTTP/2 HEADERS frame and
//! its body, de-chunked, into DATA frames as it is written.
//!
//! [`Shape::h2`]: crate::fake_shape::Shape

use std::{
    convert::Infallible,
    io::{self, Write},
    net::{SocketAddr, TcpStream},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::{ServerConfig, ServerConnection};
use tokio::sync::mpsc;

use crate::{
    fake_provider::{Flavor, Options, Request, Served, respond},
    fake_shape::{Out, Shape},
};

/// What the handshake left to do.
pub enum Accepted {
    /// HTTP/2: served to its end here.
    Served,
    /// HTTP/1.1: the blocking socket and its TLS state.
    Http1(TcpStream, Box<ServerConnection>),
}

/// The TLS handshake of `conn` offering `h2` and `http/1.1`; an `h2`
/// connection is served here to its end.
pub fn accept(
    conn: TcpStream,
    config: &ServerConfig,
    flavor: Flavor,
    opts: Options,
    shape: Shape,
    served: Arc<Mutex<Vec<Served>>>,
) -> Result<Accepted, String> {
    let peer = conn.peer_addr().map_err(|e| format!("peer: {e}"))?;
    let mut config = config.clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        conn.set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        let tcp = tokio::net::TcpStream::from_std(conn).map_err(|e| format!("tokio: {e}"))?;
        let tls = acceptor
            .accept(tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            let (tcp, state) = tls.into_inner();
            let std = tcp.into_std().map_err(|e| format!("std: {e}"))?;
            std.set_nonblocking(false)
                .map_err(|e| format!("blocking: {e}"))?;
            return Ok(Accepted::Http1(std, Box::new(state)));
        }
        let service = hyper::service::service_fn(move |req| {
            answer(req, flavor, opts, shape, served.clone(), peer)
        });
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), service)
            .await
            .map_err(|e| format!("h2: {e}"))?;
        Ok(Accepted::Served)
    })
}

/// One HTTP/2 request: the HTTP/1.1 answer, translated as it is written.
async fn answer(
    req: hyper::Request<Incoming>,
    flavor: Flavor,
    opts: Options,
    shape: Shape,
    served: Arc<Mutex<Vec<Served>>>,
    peer: SocketAddr,
) -> Result<hyper::Response<DataBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let request = Request {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body,
    };
    let (tx, mut written) = mpsc::unbounded_channel::<Vec<u8>>();
    // The HTTP/1.1 answer, written (and paced) on its own thread.
    std::thread::spawn(move || {
        let mut w = ChannelWriter(tx);
        let mut out = Out::new(&mut w, shape, request.header("accept-encoding"));
        let record = respond(&mut out, flavor, opts, &request);
        let _ = out.finish();
        if let Ok(Some(mut r)) = record {
            r.peer = peer;
            r.request_id = request.header("x-client-request-id").map(str::to_string);
            if let Ok(mut v) = served.lock() {
                v.push(r);
            }
        }
    });
    let mut head = Vec::new();
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        match written.recv().await {
            Some(b) => head.extend_from_slice(&b),
            None => return Ok(failed("the answer ended inside its head")),
        }
    };
    let rest = head.split_off(end + 4);
    let text = String::from_utf8_lossy(&head[..end]).into_owned();
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let mut builder = hyper::Response::builder().status(status);
    let mut chunked = false;
    for (name, value) in lines.filter_map(|l| l.split_once(':')) {
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            // Connection-specific: not in HTTP/2.
            "connection" | "keep-alive" | "proxy-connection" | "upgrade" => {}
            _ => builder = builder.header(name, value),
        }
    }
    let (data, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let mut body = Dechunk::new(chunked);
        let mut next = rest;
        loop {
            for piece in body.feed(&next) {
                if data.send(piece).await.is_err() {
                    return;
                }
            }
            if body.done {
                return;
            }
            match written.recv().await {
                Some(b) => next = b,
                None => return,
            }
        }
    });
    Ok(builder
        .body(DataBody(rx))
        .unwrap_or_else(|_| failed("the answer's head is not valid HTTP/2")))
}

fn failed(why: &str) -> hyper::Response<DataBody> {
    eprintln!("fake provider (h2): {why}");
    let (_, rx) = mpsc::channel(1);
    let mut r = hyper::Response::new(DataBody(rx));
    *r.status_mut() = hyper::StatusCode::INTERNAL_SERVER_ERROR;
    r
}

/// The writer `respond` writes through: every write goes to the HTTP/2
/// side as it is made.
struct ChannelWriter(mpsc::UnboundedSender<Vec<u8>>);

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .send(buf.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the HTTP/2 stream is gone"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A response body of DATA frames, one per piece the answer wrote.
pub struct DataBody(mpsc::Receiver<Bytes>);

impl Body for DataBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// An HTTP/1.1 body's bytes as they come, without its chunked framing.
struct Dechunk {
    chunked: bool,
    pending: Vec<u8>,
    /// Bytes left of the current chunk's data (then its CRLF).
    left: usize,
    done: bool,
}

impl Dechunk {
    fn new(chunked: bool) -> Self {
        Dechunk {
            chunked,
            pending: Vec::new(),
            left: 0,
            done: false,
        }
    }

    /// The body bytes in `bytes` (and what was held back before them).
    fn feed(&mut self, bytes: &[u8]) -> Vec<Bytes> {
        if !self.chunked {
            return if bytes.is_empty() {
                Vec::new()
            } else {
                vec![Bytes::copy_from_slice(bytes)]
            };
        }
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut at = 0;
        while !self.done {
            if self.left > 0 {
                let n = self.left.min(self.pending.len() - at);
                if n == 0 {
                    break;
                }
                out.push(Bytes::copy_from_slice(&self.pending[at..at + n]));
                at += n;
                self.left -= n;
                continue;
            }
            // A size line (after the previous chunk's CRLF, if any).
            let rest = &self.pending[at..];
            let rest_start = if rest.starts_with(b"\r\n") { 2 } else { 0 };
            let Some(eol) = rest[rest_start..].windows(2).position(|w| w == b"\r\n") else {
                break;
            };
            let line = String::from_utf8_lossy(&rest[rest_start..rest_start + eol]).into_owned();
            let size =
                usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
            at += rest_start + eol + 2;
            if size == 0 {
                self.done = true;
            }
            self.left = size;
        }
        self.pending.drain(..at);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_anywhere_come_out_as_the_body() {
        let wire = b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n";
        for step in 1..wire.len() {
            let mut d = Dechunk::new(true);
            let mut body = Vec::new();
            for piece in wire.chunks(step) {
                for b in d.feed(piece) {
                    body.extend_from_slice(&b);
                }
            }
            assert_eq!(body, b"hello, world", "step {step}");
            assert!(d.done, "step {step}");
        }
        let mut d = Dechunk::new(false);
        assert_eq!(d.feed(b"as is")[0].as_ref(), b"as is");
    }
}
