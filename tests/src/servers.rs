//! Counting servers inside a test namespace.
//!
//! [`TcpServer`] accepts and closes connections, [`UdpServer`] receives
//! datagrams; both count what arrived, so a test can tell an allowed
//! connection that really reached its destination from one that did not.
//! An IPv6 address gets an AF_INET6 socket; an IPv4 address also accepts
//! clients that connect to its IPv4-mapped IPv6 form. Both stop on drop.

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{NetnsGuard, wait_until};

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

/// A TCP server that accepts connections, counts and closes them.
#[derive(Debug)]
pub struct TcpServer {
    inner: Counter,
}

impl TcpServer {
    /// Listens on `addr` ("192.0.2.1:8443", "[2001:db8::1]:8443") inside `netns`.
    pub fn start(netns: &NetnsGuard, addr: &str) -> TcpServer {
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
                            drop(conn);
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
        TcpServer {
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
