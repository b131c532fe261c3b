//! Counting servers inside a test namespace.
//!
//! [`TcpServer`] accepts and closes connections, [`HttpServer`] answers
//! every request with `200 OK` and a fixed body, [`UdpServer`] receives
//! datagrams; each counts what arrived, so a test can tell an allowed
//! connection that really reached its destination from one that did not.
//! [`ByteServer`] either reads and discards what its clients send (a sink) or
//! sends to its clients without end (a source), counting bytes,
//! for bandwidth tests; it serves every connection on its own thread, so
//! several clients run at once.
//! An IPv6 address gets an AF_INET6 socket; an IPv4 address also accepts
//! clients that connect to its IPv4-mapped IPv6 form. All stop on drop.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use std::process::{Child, Command, Stdio};

use crate::{NetnsGuard, TempDir, netns::enter_netns, wait_until};

const POLL: Duration = Duration::from_millis(5);

fn parse(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|e| panic!("server address {addr:?} is not ADDR:PORT ([v6]:PORT): {e}"))
}

/// What the servers share: a counter, a stop flag and the thread.
#[derive(Debug)]
struct Counter {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Counter {
    fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    fn wait_for_count(&self, n: usize, timeout: Duration) -> usize {
        wait_until(timeout, POLL, || (self.count() >= n).then_some(()));
        self.count()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How a connection handler learns that its server is being dropped.
type StopFlag = Arc<AtomicBool>;

/// Waits up to [`POLL`] for `listener` to have a connection to accept.
fn wait_readable(listener: &TcpListener) {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; the listener
    // outlives it.
    unsafe { libc::poll(&mut pfd, 1, POLL.as_millis() as libc::c_int) };
}

/// Listens on `addr` inside `netns` and calls `handle` on every accepted
/// connection, after counting it: on the server's thread, or with
/// `threaded` on a thread of its own (so clients are served at once); the
/// server joins those threads when it stops, so `handle` must return soon
/// after the stop flag it gets is set.
fn serve_tcp<F>(netns: &NetnsGuard, addr: &str, threaded: bool, handle: F) -> Counter
where
    F: Fn(TcpStream, &StopFlag) + Send + Sync + 'static,
{
    let addr = parse(addr);
    let listener = netns
        .in_netns(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| {
            panic!(
                "TCP server cannot listen on {addr} in {}: {e}",
                netns.name()
            )
        });
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("set_nonblocking on {addr}: {e}"));
    let count = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (count, stop) = (count.clone(), stop.clone());
        let handle = Arc::new(handle);
        std::thread::spawn(move || {
            let mut handlers: Vec<JoinHandle<()>> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _peer)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        if threaded {
                            handlers.retain(|h| !h.is_finished());
                            let (handle, stop) = (handle.clone(), stop.clone());
                            handlers.push(std::thread::spawn(move || handle(conn, &stop)));
                        } else {
                            handle(conn, &stop);
                        }
                    }
                    // Poll rather than sleep: a burst of clients must not
                    // overflow the accept queue while the server sleeps.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => wait_readable(&listener),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        eprintln!("TCP server {addr}: accept: {e}");
                        std::thread::sleep(POLL);
                    }
                }
            }
            for h in handlers {
                let _ = h.join();
            }
        })
    };
    Counter {
        addr,
        count,
        stop,
        thread: Some(thread),
    }
}

/// A TCP server that accepts connections, counts and closes them.
#[derive(Debug)]
pub struct TcpServer {
    inner: Counter,
}

impl TcpServer {
    /// Listens on `addr` ("192.0.2.1:8443", "[2001:db8::1]:8443") inside `netns`.
    pub fn start(netns: &NetnsGuard, addr: &str) -> TcpServer {
        TcpServer {
            inner: serve_tcp(netns, addr, false, |conn, _| drop(conn)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.inner.count()
    }

    /// Waits until at least `n` connections were accepted or `timeout`
    /// passed; returns the count then. (A client's connect() returns before
    /// the server's accept(), so counts lag a little.)
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> usize {
        self.inner.wait_for_count(n, timeout)
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.inner.stop();
    }
}

/// The body every [`HttpServer`] answers with.
pub const HTTP_BODY: &str = "hello from the llm-egress test server\n";

/// A plain HTTP/1.1 server: reads a request head and answers `200 OK` with
/// [`HTTP_BODY`], then closes; counts connections.
#[derive(Debug)]
pub struct HttpServer {
    inner: Counter,
}

/// Answers one request (its head: up to the blank line) and closes.
fn answer_http(mut conn: TcpStream) {
    let timeout = Some(Duration::from_secs(2));
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(timeout);
    let _ = conn.set_write_timeout(timeout);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{HTTP_BODY}",
        HTTP_BODY.len()
    );
    let _ = conn.write_all(response.as_bytes());
    let _ = conn.flush();
}

impl HttpServer {
    /// Listens on `addr` ("192.0.2.1:8080") inside `netns`.
    pub fn start(netns: &NetnsGuard, addr: &str) -> HttpServer {
        HttpServer {
            inner: serve_tcp(netns, addr, false, |conn, _| answer_http(conn)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.inner.count()
    }

    /// Waits until at least `n` connections were accepted or `timeout`
    /// passed; returns the count then.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> usize {
        self.inner.wait_for_count(n, timeout)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.inner.stop();
    }
}

/// The size of every read of a sink and every write of a source ([`ByteServer`]).
const CHUNK: usize = 64 * 1024;

/// How long a handler's read or write blocks before it looks at the stop flag.
const HANDLER_STEP: Duration = Duration::from_millis(50);

fn handler_timeouts_failed(conn: &TcpStream) -> bool {
    conn.set_nonblocking(false).is_err()
        || conn.set_read_timeout(Some(HANDLER_STEP)).is_err()
        || conn.set_write_timeout(Some(HANDLER_STEP)).is_err()
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Reads until EOF, an error or the stop flag, counting bytes; with `echo`
/// writes back what it read, after counting it (a client may end as soon
/// as it has read the last echo); else discards it.
fn receive(mut conn: TcpStream, stop: &StopFlag, bytes: &AtomicU64, echo: bool) {
    if handler_timeouts_failed(&conn) || (echo && conn.set_nodelay(true).is_err()) {
        return;
    }
    let mut buf = vec![0u8; CHUNK];
    while !stop.load(Ordering::SeqCst) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::SeqCst);
                if echo && conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// Writes 64 KiB buffers until the peer closes, an error or the stop flag;
/// counts bytes (also those of partial writes).
fn source(mut conn: TcpStream, stop: &StopFlag, bytes: &AtomicU64) {
    if handler_timeouts_failed(&conn) {
        return;
    }
    let buf = vec![0xa5u8; CHUNK];
    while !stop.load(Ordering::SeqCst) {
        match conn.write(&buf) {
            Ok(0) => return,
            Ok(n) => {
                bytes.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if is_timeout(&e) => {}
            Err(_) => return,
        }
    }
}

/// A TCP server that moves bytes with every client on its own thread,
/// counting connections and bytes: a **sink** reads and discards
/// everything its clients send, a **source** writes 64 KiB buffers to each
/// client until it closes (or the server is dropped), an **echo** writes
/// back what it reads (and counts it once).
#[derive(Debug)]
pub struct ByteServer {
    inner: Counter,
    bytes: Arc<AtomicU64>,
}

impl ByteServer {
    /// A sink listening on `addr` ("192.0.2.1:9000") inside `netns`.
    pub fn sink(netns: &NetnsGuard, addr: &str) -> ByteServer {
        Self::serve(netns, addr, |conn, stop, b| receive(conn, stop, b, false))
    }

    /// A source listening on `addr` inside `netns`.
    pub fn source(netns: &NetnsGuard, addr: &str) -> ByteServer {
        Self::serve(netns, addr, source)
    }

    /// An echo server listening on `addr` inside `netns`.
    pub fn echo(netns: &NetnsGuard, addr: &str) -> ByteServer {
        Self::serve(netns, addr, |conn, stop, b| receive(conn, stop, b, true))
    }

    fn serve(
        netns: &NetnsGuard,
        addr: &str,
        handler: fn(TcpStream, &StopFlag, &AtomicU64),
    ) -> ByteServer {
        let bytes = Arc::new(AtomicU64::new(0));
        let b = bytes.clone();
        ByteServer {
            inner: serve_tcp(netns, addr, true, move |conn, stop| handler(conn, stop, &b)),
            bytes,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Connections accepted so far.
    pub fn count(&self) -> usize {
        self.inner.count()
    }

    /// Waits until at least `n` connections were accepted or `timeout`
    /// passed; returns the count then.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> usize {
        self.inner.wait_for_count(n, timeout)
    }

    /// Bytes received (sink, echo) or written (source) so far, over all
    /// connections. A source counts a write when it returns: a client may
    /// have read a little more, and what was still in the send buffer when
    /// a client closed never reached it.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` bytes moved or `timeout` passed; returns
    /// the byte count then.
    pub fn wait_for_bytes(&self, n: u64, timeout: Duration) -> u64 {
        wait_until(timeout, POLL, || (self.bytes() >= n).then_some(()));
        self.bytes()
    }
}

impl Drop for ByteServer {
    fn drop(&mut self) {
        self.inner.stop();
    }
}

/// A UDP server that counts received datagrams.
#[derive(Debug)]
pub struct UdpServer {
    inner: Counter,
}

impl UdpServer {
    /// Binds `addr` inside `netns`.
    pub fn start(netns: &NetnsGuard, addr: &str) -> UdpServer {
        let addr = parse(addr);
        let socket = netns
            .in_netns(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("UDP server cannot bind {addr} in {}: {e}", netns.name()));
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap_or_else(|e| panic!("set_read_timeout on {addr}: {e}"));
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (count, stop) = (count.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::SeqCst) {
                    match socket.recv_from(&mut buf) {
                        Ok(_) => {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            eprintln!("UDP server {addr}: recv: {e}");
                            std::thread::sleep(POLL);
                        }
                    }
                }
            })
        };
        UdpServer {
            inner: Counter {
                addr,
                count,
                stop,
                thread: Some(thread),
            },
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// Datagrams received so far.
    pub fn count(&self) -> usize {
        self.inner.count()
    }

    /// Waits until at least `n` datagrams arrived or `timeout` passed;
    /// returns the count then.
    pub fn wait_for_count(&self, n: usize, timeout: Duration) -> usize {
        self.inner.wait_for_count(n, timeout)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.inner.stop();
    }
}

/// `openssl s_server -www` on port 443 of the namespace, with a fresh
/// self-signed certificate.
pub struct TlsServer {
    child: Child,
    _dir: TempDir,
}

impl TlsServer {
    /// Listens on `addr`:443 inside `ns`.
    pub fn start(ns: &NetnsGuard, addr: &str) -> TlsServer {
        let dir = TempDir::new("llm-egress-test-tls");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=llm-egress.test",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("cannot run openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut cmd = Command::new("openssl");
        cmd.args(["s_server", "-quiet", "-www", "-accept", "443"])
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let ns_path = ns.path();
        // SAFETY: setns in the forked child before exec, on a path prepared
        // before the fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || enter_netns(&ns_path));
        }
        let child = cmd.spawn().expect("cannot start openssl s_server");
        let server = TlsServer { child, _dir: dir };
        let up = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            ns.in_netns(|| TcpStream::connect((addr, 443)).ok())
                .map(drop)
        });
        assert!(
            up.is_some(),
            "openssl s_server did not listen on {addr}:443 in {}",
            ns.name()
        );
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
