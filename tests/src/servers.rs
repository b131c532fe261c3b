//! Counting servers inside a test namespace.
//!
//! [`TcpServer`] accepts and closes connections, [`HttpServer`] answers
//! every request with `200 OK` and a fixed body, [`UdpServer`] receives
//! datagrams; each counts what arrived, so a test can tell an allowed
//! connection that really reached its destination from one that did not.
//! An IPv6 address gets an AF_INET6 socket; an IPv4 address also accepts
//! clients that connect to its IPv4-mapped IPv6 form. Both stop on drop.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
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

/// What both servers share: a counter, a stop flag and the thread.
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

/// Listens on `addr` inside `netns` and calls `handle` on every accepted
/// connection (on the server's thread), after counting it.
fn serve_tcp(netns: &NetnsGuard, addr: &str, handle: fn(TcpStream)) -> Counter {
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
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _peer)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        handle(conn);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => {
                        eprintln!("TCP server {addr}: accept: {e}");
                        std::thread::sleep(POLL);
                    }
                }
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
            inner: serve_tcp(netns, addr, drop),
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
            inner: serve_tcp(netns, addr, answer_http),
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
