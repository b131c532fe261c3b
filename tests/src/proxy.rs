//! Forward proxies inside a test namespace: [`Proxy::connect`] (HTTP
//! `CONNECT`, what `HTTPS_PROXY=http://…` clients speak) and
//! [`Proxy::socks5`] (SOCKS5 with host names, `curl --socks5-hostname`).
//!
//! Both run on threads that entered the namespace, so the connections they
//! make to the fake providers stay in it; they are in no test cgroup, so
//! the agent never judges their own connections. Host names are looked up
//! in a fixed table given at start (no DNS). Each records the targets it
//! opened a tunnel to, so a test can tell "the proxy never saw it" from
//! "the proxy refused it".

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::NetnsGuard;

/// Longest request head the CONNECT proxy reads before it answers 431.
const MAX_HEAD: usize = 128 * 1024;

/// Targets a proxy opened tunnels to, as `host:port` in request order.
#[derive(Clone, Default)]
pub struct Tunnels(Arc<Mutex<Vec<String>>>);

impl Tunnels {
    pub fn list(&self) -> Vec<String> {
        self.0.lock().map(|t| t.clone()).unwrap_or_default()
    }

    fn push(&self, target: String) {
        if let Ok(mut t) = self.0.lock() {
            t.push(target);
        }
    }
}

/// A forward proxy on `addr` in a namespace: HTTP CONNECT
/// ([`Proxy::connect`]) or SOCKS5 ([`Proxy::socks5`]); it stops when
/// dropped.
pub struct Proxy {
    addr: SocketAddr,
    tunnels: Tunnels,
    listener: TcpListener,
}

/// A proxy's handling of one client connection.
type Session = fn(TcpStream, &HashMap<String, String>, &Tunnels) -> std::io::Result<()>;

impl Proxy {
    /// An HTTP CONNECT proxy listening on `addr` ("10.78.0.9:3128") inside
    /// `ns`; `hosts` maps the host names clients ask for to addresses in
    /// the namespace.
    pub fn connect(ns: &NetnsGuard, addr: &str, hosts: &[(&str, &str)]) -> Proxy {
        Proxy::start(ns, addr, hosts, connect_session)
    }

    /// A SOCKS5 proxy (no authentication, CONNECT with a host name or an
    /// IPv4 address), as [`Proxy::connect`].
    pub fn socks5(ns: &NetnsGuard, addr: &str, hosts: &[(&str, &str)]) -> Proxy {
        Proxy::start(ns, addr, hosts, socks_session)
    }

    fn start(ns: &NetnsGuard, addr: &str, hosts: &[(&str, &str)], session: Session) -> Proxy {
        let hosts: Arc<HashMap<String, String>> = Arc::new(
            hosts
                .iter()
                .map(|(h, a)| (h.to_string(), a.to_string()))
                .collect(),
        );
        let tunnels = Tunnels::default();
        let listener = serve(ns, addr, {
            let tunnels = tunnels.clone();
            move |conn| session(conn, &hosts, &tunnels)
        });
        Proxy {
            addr: listener.local_addr().expect("local_addr"),
            tunnels,
            listener,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://addr` for `--proxy` and `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn tunnels(&self) -> Vec<String> {
        self.tunnels.list()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        stop(&self.listener);
    }
}

/// Binds `addr` in `ns` and serves each connection with `session` on its
/// own thread, all inside the namespace (threads inherit it).
fn serve(
    ns: &NetnsGuard,
    addr: &str,
    session: impl Fn(TcpStream) -> std::io::Result<()> + Send + Sync + Clone + 'static,
) -> TcpListener {
    let listener = ns
        .in_netns(|| TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let accept = listener.try_clone().expect("dup listener");
    let path = ns.path();
    std::thread::spawn(move || {
        if let Err(e) = crate::netns::enter_netns(&path) {
            eprintln!("proxy: cannot enter {}: {e}", path.display());
            return;
        }
        for conn in accept.incoming() {
            let Ok(conn) = conn else { break };
            let session = session.clone();
            std::thread::spawn(move || {
                if let Err(e) = session(conn) {
                    eprintln!("proxy session: {e}");
                }
            });
        }
    });
    listener
}

/// Ends the accept loop: shutdown makes accept() fail.
fn stop(listener: &TcpListener) {
    // SAFETY: shutdown(2) on a socket this struct owns.
    unsafe {
        libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(listener), libc::SHUT_RDWR);
    }
}

fn resolve(hosts: &HashMap<String, String>, host: &str, port: u16) -> String {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    match hosts.get(&h.to_ascii_lowercase()) {
        Some(a) => format!("{a}:{port}"),
        None if h.contains(':') => format!("[{h}]:{port}"),
        None => format!("{h}:{port}"),
    }
}

/// One CONNECT session: the request head, then a tunnel (or an error
/// status, like squid's).
fn connect_session(
    mut client: TcpStream,
    hosts: &HashMap<String, String>,
    tunnels: &Tunnels,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = client.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            client.write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\n\r\n")?;
            return Ok(());
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or_default().to_string();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let parsed = target
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)));
    let Some((host, port)) = parsed.filter(|_| method.eq_ignore_ascii_case("CONNECT")) else {
        client.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n")?;
        return Ok(());
    };
    let upstream = match TcpStream::connect(resolve(hosts, &host, port)) {
        Ok(s) => s,
        Err(_) => {
            client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")?;
            return Ok(());
        }
    };
    tunnels.push(format!("{host}:{port}"));
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    pipe(client, upstream)
}

/// One SOCKS5 session (RFC 1928, no authentication).
fn socks_session(
    mut client: TcpStream,
    hosts: &HashMap<String, String>,
    tunnels: &Tunnels,
) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut hello = [0u8; 2];
    client.read_exact(&mut hello)?;
    let mut methods = vec![0u8; hello[1] as usize];
    client.read_exact(&mut methods)?;
    client.write_all(&[5, 0])?;
    let mut req = [0u8; 4];
    client.read_exact(&mut req)?;
    let host = match req[3] {
        1 => {
            let mut a = [0u8; 4];
            client.read_exact(&mut a)?;
            std::net::Ipv4Addr::from(a).to_string()
        }
        3 => {
            let mut len = [0u8; 1];
            client.read_exact(&mut len)?;
            let mut name = vec![0u8; len[0] as usize];
            client.read_exact(&mut name)?;
            String::from_utf8_lossy(&name).into_owned()
        }
        _ => {
            client.write_all(&[5, 8, 0, 1, 0, 0, 0, 0, 0, 0])?;
            return Ok(());
        }
    };
    let mut port = [0u8; 2];
    client.read_exact(&mut port)?;
    let port = u16::from_be_bytes(port);
    let Ok(upstream) = TcpStream::connect(resolve(hosts, &host, port)) else {
        client.write_all(&[5, 5, 0, 1, 0, 0, 0, 0, 0, 0])?;
        return Ok(());
    };
    tunnels.push(format!("{host}:{port}"));
    client.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, 0, 0])?;
    pipe(client, upstream)
}

/// Copies both ways until either side closes.
fn pipe(client: TcpStream, upstream: TcpStream) -> std::io::Result<()> {
    client.set_read_timeout(None)?;
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let _ = std::io::copy(&mut u_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
