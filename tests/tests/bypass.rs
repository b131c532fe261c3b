//! The bypass suite: each test is one thing an attacker or a careless
//! library would do to reach a model provider that its workload does not
//! allow, in enforce mode, end to end. Each asserts that the step is blocked
//! for workload `denied` (EPERM at connect/sendmsg, or a failed TLS
//! handshake for the SNI cases) and that the same step works for workload
//! `allowed`; the three tests named `..._documented_limit` assert a limit
//! the README's "Honest limits" describes instead.
//!
//! The world: provider `bp` is the host `api.bypass.test` and the wildcard
//! `*.wild.test` on port 443, known only by name (no CIDR; the agent's own
//! resolver is dead). A DNS server of the test's own answers listens on
//! 192.0.2.1:53 (UDP and TCP) inside the test namespace. Provider addresses
//! are in `10.77.0.0/16` and `fd77::/64`, made local to the namespace with
//! AnyIP routes on `lo`, where an echo server on `[::]:443` (dual stack)
//! accepts everything. Workload `allowed` may reach `bp` and the DNS servers
//! and nothing else; workload `denied` may reach anything but providers.
//! So `denied` gets EPERM only when the address was learned as `bp`'s,
//! and `allowed` gets through only when it was.
//!
//! Clients are this test executable run again as a child
//! (`bypass_client_process`, selected by `LLM_EGRESS_BYPASS_CLIENT`): it
//! joins a workload cgroup and the namespace, then runs one command per
//! stdin line and answers one line each (resolve, connect, hold a
//! connection, use it).
//!
//! Locals are declared cgroup, netns, servers, agent, so they drop in the
//! reverse order.

use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TlsServer,
    client_process::{self, ClientProcess},
    probe::confine,
    require_root,
    scenario::{expect_eperm, expect_ok, probe},
    toml_str,
};

const DEAD_DNS: &str = "127.0.0.1:9";
const DNS1: &str = "192.0.2.1:53";
const DNS2: &str = "198.51.100.1:53";
const CLIENT_ENV: &str = "LLM_EGRESS_BYPASS_CLIENT";
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;

// ---------------------------------------------------------------- DNS wire

#[derive(Clone, Debug)]
enum Rr {
    A(String, Ipv4Addr),
    Aaaa(String, Ipv6Addr),
    Cname(String, String),
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    put_name(&mut q, name);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&[0, 1]);
    q
}

/// (question name as sent, qtype, offset after the question).
fn parse_query(q: &[u8]) -> Option<(String, u16, usize)> {
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let l = *q.get(pos)? as usize;
        pos += 1;
        if l == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(pos..pos + l)?).into_owned());
        pos += l;
    }
    let qtype = u16::from_be_bytes([*q.get(pos)?, *q.get(pos + 1)?]);
    Some((labels.join("."), qtype, pos + 4))
}

/// A response to `q`; owners equal to the question are a pointer to it.
fn response(q: &[u8], answers: &[Rr]) -> Vec<u8> {
    let (qname, _, qend) = parse_query(q).expect("a query");
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1]);
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..qend]);
    let ttl = 300u32.to_be_bytes();
    for rr in answers {
        let (owner, rtype, rdata) = match rr {
            Rr::A(n, a) => (n, TYPE_A, a.octets().to_vec()),
            Rr::Aaaa(n, a) => (n, TYPE_AAAA, a.octets().to_vec()),
            Rr::Cname(n, t) => {
                let mut d = Vec::new();
                put_name(&mut d, t);
                (n, TYPE_CNAME, d)
            }
        };
        if owner.trim_end_matches('.').eq_ignore_ascii_case(&qname) {
            r.extend_from_slice(&[0xc0, 12]);
        } else {
            put_name(&mut r, owner);
        }
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&[0, 1]);
        r.extend_from_slice(&ttl);
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    r
}

/// Every A/AAAA address of a response.
fn addresses(r: &[u8]) -> Option<Vec<IpAddr>> {
    let ancount = u16::from_be_bytes([*r.get(6)?, *r.get(7)?]) as usize;
    let (_, _, mut pos) = parse_query(r)?;
    let skip_name = |mut p: usize| -> Option<usize> {
        loop {
            let l = *r.get(p)? as usize;
            if l == 0 {
                return Some(p + 1);
            }
            if l & 0xc0 == 0xc0 {
                return Some(p + 2);
            }
            p += 1 + l;
        }
    };
    let mut out = Vec::new();
    for _ in 0..ancount {
        pos = skip_name(pos)?;
        let rtype = u16::from_be_bytes([*r.get(pos)?, *r.get(pos + 1)?]);
        let rdlen = u16::from_be_bytes([*r.get(pos + 8)?, *r.get(pos + 9)?]) as usize;
        let d = r.get(pos + 10..pos + 10 + rdlen)?;
        match (rtype, rdlen) {
            (TYPE_A, 4) => out.push(IpAddr::from(<[u8; 4]>::try_from(d).ok()?)),
            (TYPE_AAAA, 16) => out.push(IpAddr::from(<[u8; 16]>::try_from(d).ok()?)),
            _ => {}
        }
        pos += 10 + rdlen;
    }
    Some(out)
}

type Answerer = dyn Fn(&str, u16) -> Vec<Rr> + Send + Sync;

/// A DNS server (UDP and TCP) in the test namespace.
struct DnsServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    fn start(
        ns: &NetnsGuard,
        addr: &str,
        answer: impl Fn(&str, u16) -> Vec<Rr> + Send + Sync + 'static,
    ) -> DnsServer {
        let addr: SocketAddr = addr.parse().unwrap();
        let answer: Arc<Answerer> = Arc::new(answer);
        let (udp, tcp) = ns.in_netns(|| (UdpSocket::bind(addr), TcpListener::bind(addr)));
        let udp = udp.unwrap_or_else(|e| panic!("DNS server cannot bind UDP {addr}: {e}"));
        let tcp = tcp.unwrap_or_else(|e| panic!("DNS server cannot bind TCP {addr}: {e}"));
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        tcp.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (s1, a1) = (stop.clone(), answer.clone());
        let t1 = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s1.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    let q = &buf[..n];
                    let Some((name, qtype, _)) = parse_query(q) else {
                        continue;
                    };
                    let _ = udp.send_to(&response(q, &a1(&name, qtype)), peer);
                }
            }
        });
        let (s2, a2) = (stop.clone(), answer);
        let t2 = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((mut c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut len = [0u8; 2];
                        if c.read_exact(&mut len).is_err() {
                            continue;
                        }
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if c.read_exact(&mut q).is_err() {
                            continue;
                        }
                        let Some((name, qtype, _)) = parse_query(&q) else {
                            continue;
                        };
                        let r = response(&q, &a2(&name, qtype));
                        let mut out = (r.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&r);
                        let _ = c.write_all(&out);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => {}
                }
            }
        });
        DnsServer {
            stop,
            threads: vec![t1, t2],
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The standard answers: `api.bypass.test` and every name below
/// `wild.test` get `10.77.0.5` / `fd77::5`; `alias.example` is a CNAME
/// chain to `API.Bypass.Test`; everything else gets nothing.
fn answers(name: &str, qtype: u16) -> Vec<Rr> {
    let lower = name.to_ascii_lowercase();
    let addr = |owner: &str| match qtype {
        TYPE_AAAA => Rr::Aaaa(owner.to_string(), PROV6),
        _ => Rr::A(owner.to_string(), PROV4),
    };
    if lower == "api.bypass.test" || lower.ends_with(".wild.test") {
        vec![addr(name)]
    } else if lower == "alias.example" {
        vec![
            Rr::Cname(name.to_string(), "hop.example".into()),
            Rr::Cname("hop.example".into(), "API.Bypass.Test".into()),
            addr("api.bypass.test"),
        ]
    } else if lower == "wild.test" {
        // The wildcard's own apex is not matched by `*.wild.test`.
        vec![Rr::A(name.to_string(), APEX4)]
    } else {
        vec![]
    }
}

const PROV4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 5);
const PROV6: Ipv6Addr = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 5);
const APEX4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 9);
const P4: &str = "10.77.0.5:443";
const P6: &str = "[fd77::5]:443";

// ------------------------------------------------------------ echo server

/// Echoes every connection to port 443 on any address local to the
/// namespace (IPv4 and IPv6: a dual-stack `[::]` socket).
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &NetnsGuard) -> EchoServer {
        let l = ns
            .in_netns(|| TcpListener::bind("[::]:443"))
            .unwrap_or_else(|e| panic!("cannot listen on [::]:443 in {}: {e}", ns.name()));
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((mut c, _)) => {
                        let s3 = s2.clone();
                        std::thread::spawn(move || {
                            let _ = c.set_nonblocking(false);
                            let _ = c.set_read_timeout(Some(Duration::from_millis(100)));
                            let mut buf = [0u8; 512];
                            while !s3.load(Ordering::SeqCst) {
                                match c.read(&mut buf) {
                                    Ok(0) => return,
                                    Ok(n) => {
                                        if c.write_all(&buf[..n]).is_err() {
                                            return;
                                        }
                                    }
                                    Err(e)
                                        if matches!(
                                            e.kind(),
                                            ErrorKind::WouldBlock | ErrorKind::TimedOut
                                        ) => {}
                                    Err(_) => return,
                                }
                            }
                        });
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Err(_) => {}
                }
            }
        });
        EchoServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------- the client

/// This executable run again, in a workload cgroup and the namespace.
struct Client(ClientProcess);

impl Client {
    fn start(cgroup: &Path, ns: &NetnsGuard) -> Client {
        Client(ClientProcess::start(
            "bypass_client_process",
            CLIENT_ENV,
            cgroup,
            ns,
        ))
    }

    fn cmd(&mut self, line: &str) -> String {
        self.0.cmd(line)
    }

    /// Resolves `name` (`AAAA` when `v6`) at `server` over UDP, or TCP
    /// when `tcp`; the addresses of the answer.
    fn resolve(&mut self, server: &str, name: &str, v6: bool, tcp: bool) -> Vec<IpAddr> {
        let r = self.cmd(&format!(
            "q {server} {} {name} {}",
            if v6 { "AAAA" } else { "A" },
            if tcp { "tcp" } else { "udp" }
        ));
        if r == "-" {
            return vec![];
        }
        r.split(',')
            .map(|a| a.parse().unwrap_or_else(|_| panic!("resolve {name}: {r}")))
            .collect()
    }

    /// TCP connect to `addr` (then close).
    fn connect(&mut self, addr: &str) -> Result<(), i32> {
        parse_result(&self.cmd(&format!("c {addr}")))
    }

    /// TCP connect to `addr` and keep the connection.
    fn hold(&mut self, addr: &str) -> Result<(), i32> {
        parse_result(&self.cmd(&format!("hold {addr}")))
    }

    /// Sends a line on the held connection and reads the echo.
    fn echo(&mut self) -> Result<(), i32> {
        parse_result(&self.cmd("echo"))
    }
}

fn parse_result(r: &str) -> Result<(), i32> {
    if r == "ok" {
        Ok(())
    } else {
        Err(r.parse().unwrap_or(-1))
    }
}

fn errno(e: &std::io::Error) -> String {
    e.raw_os_error().unwrap_or(-1).to_string()
}

/// The client: only does something when run by `Client::start`.
#[test]
fn bypass_client_process() {
    let mut held: Option<TcpStream> = None;
    let mut id: u16 = 1;
    client_process::serve(CLIENT_ENV, |line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["q", server, qtype, name, proto] => {
                id = id.wrapping_add(1);
                let server: SocketAddr = server.parse().unwrap();
                let qtype = if *qtype == "AAAA" { TYPE_AAAA } else { TYPE_A };
                let q = query(id, name, qtype);
                let answer = if *proto == "tcp" {
                    (|| -> std::io::Result<Vec<u8>> {
                        let mut c = TcpStream::connect_timeout(&server, Duration::from_secs(2))?;
                        c.set_read_timeout(Some(Duration::from_secs(2)))?;
                        let mut m = (q.len() as u16).to_be_bytes().to_vec();
                        m.extend_from_slice(&q);
                        c.write_all(&m)?;
                        let mut len = [0u8; 2];
                        c.read_exact(&mut len)?;
                        let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
                        c.read_exact(&mut r)?;
                        Ok(r)
                    })()
                } else {
                    (|| -> std::io::Result<Vec<u8>> {
                        let u = UdpSocket::bind("0.0.0.0:0")?;
                        u.set_read_timeout(Some(Duration::from_secs(2)))?;
                        u.send_to(&q, server)?;
                        let mut buf = [0u8; 2048];
                        loop {
                            let n = u.recv(&mut buf)?;
                            if n >= 2 && buf[..2] == id.to_be_bytes() {
                                return Ok(buf[..n].to_vec());
                            }
                        }
                    })()
                };
                match answer {
                    Ok(r) => match addresses(&r) {
                        Some(a) if a.is_empty() => "-".to_string(),
                        Some(a) => a
                            .iter()
                            .map(IpAddr::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        None => "bad-answer".to_string(),
                    },
                    Err(e) => format!("dns-error-{}", errno(&e)),
                }
            }
            ["c", addr] => {
                match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)) {
                    Ok(_) => "ok".into(),
                    Err(e) => errno(&e),
                }
            }
            ["hold", addr] => {
                match TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3)) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                        held = Some(s);
                        "ok".into()
                    }
                    Err(e) => errno(&e),
                }
            }
            ["echo"] => match held.as_mut() {
                None => "-1".into(),
                Some(s) => {
                    let r = s.write_all(b"ping\n").and_then(|()| {
                        let mut b = [0u8; 5];
                        s.read_exact(&mut b).map(|()| b)
                    });
                    match r {
                        Ok(b) if &b == b"ping\n" => "ok".into(),
                        Ok(_) => "-1".into(),
                        Err(e) => errno(&e),
                    }
                }
            },
            _ => "-1".into(),
        }
    });
}

// ----------------------------------------------------------------- world

fn policy(cg: &CgroupGuard, allowed_may_reach_bp: bool) -> String {
    let allowed = if allowed_may_reach_bp {
        r#"allow = ["bp", "192.0.2.0/24", "198.51.100.0/24"]"#
    } else {
        "allow = [\"192.0.2.0/24\", \"198.51.100.0/24\"]\nllm = \"deny\""
    };
    format!(
        r#"cgroup = {}

[resolver]
servers = [{}]
# The test namespace's DNS servers (docs/names.md: answers are learned only
# from trusted resolvers).
trusted = ["192.0.2.1", "198.51.100.1"]

[defaults]
llm = "deny"
other = "allow"

[[providers]]
name = "bp"
hosts = ["api.bypass.test", "*.wild.test"]
ports = [443]

[[workloads]]
name = "allowed"
cgroup = "allowed"
{allowed}
other = "deny"

[[workloads]]
name = "denied"
cgroup = "denied"
llm = "deny"
other = "allow"
"#,
        toml_str(&cg.path().display().to_string()),
        toml_str(DEAD_DNS),
    )
}

/// A test world: cgroups `allowed` and `denied`, a namespace with the
/// provider ranges local, the DNS server on 192.0.2.1:53, the echo server,
/// the agent, and one client per workload.
struct World {
    a: Client,
    d: Client,
    agent: Agent,
    _echo: EchoServer,
    _dns: DnsServer,
    ns: NetnsGuard,
    cg: CgroupGuard,
}

impl World {
    fn new(tag: &str) -> World {
        let cg = CgroupGuard::new(tag);
        let (allowed, denied) = (cg.child("allowed"), cg.child("denied"));
        let ns = NetnsGuard::new();
        ns.ip(&["route", "add", "local", "10.77.0.0/16", "dev", "lo"]);
        ns.ip(&["-6", "route", "add", "local", "fd77::/64", "dev", "lo"]);
        let dns = DnsServer::start(&ns, DNS1, answers);
        let echo = EchoServer::start(&ns);
        let agent = Agent::start(&policy(&cg, true));
        let a = Client::start(&allowed, &ns);
        let d = Client::start(&denied, &ns);
        World {
            a,
            d,
            agent,
            _echo: echo,
            _dns: dns,
            ns,
            cg,
        }
    }

    fn path(&self, w: &str) -> std::path::PathBuf {
        self.cg.path().join(w)
    }

    /// Before anything is resolved, the provider's addresses are no
    /// provider's: `denied` reaches them, `allowed` does not (other = deny).
    #[track_caller]
    fn check_unlearned(&mut self, addr: &str) {
        expect_ok(
            &self.agent,
            self.d.connect(addr),
            &format!(
                "{addr} before any answer: not a provider address yet (denied, other = allow)"
            ),
        );
        expect_eperm(
            &self.agent,
            self.a.connect(addr),
            &format!(
                "{addr} before any answer: not a provider address yet (allowed, other = deny)"
            ),
        );
    }

    /// After workload `by` resolved: the provider's address is `bp`'s for
    /// `by` only (learned addresses are per workload, docs/names.md); for
    /// the other workload it is still no provider's.
    #[track_caller]
    fn check_learned(&mut self, by: By, addr: &str, what: &str) {
        match by {
            By::Denied => {
                expect_eperm(
                    &self.agent,
                    self.d.connect(addr),
                    &format!("{what}: denied workload to {addr} it resolved"),
                );
                expect_eperm(
                    &self.agent,
                    self.a.connect(addr),
                    &format!(
                        "{what}: allowed workload to {addr} only `denied` resolved: no provider's (other = deny)"
                    ),
                );
            }
            By::Allowed => {
                expect_ok(
                    &self.agent,
                    self.a.connect(addr),
                    &format!("{what}: allowed workload to {addr} it resolved"),
                );
                expect_ok(
                    &self.agent,
                    self.d.connect(addr),
                    &format!(
                        "{what}: denied workload to {addr} only `allowed` resolved: no provider's (other = allow)"
                    ),
                );
            }
        }
    }
}

/// Which workload resolved (`World::check_learned`).
#[derive(Clone, Copy)]
enum By {
    Allowed,
    Denied,
}

// ----------------------------------------------------------------- tests

/// (a) AAAA answers are learned: an IPv6 connect to the provider's learned
/// IPv6 address is denied for `denied` and allowed for `allowed`.
#[test]
fn bypass_ipv6_destination_learned_from_aaaa() {
    require_root();
    let mut w = World::new("bp-v6");
    w.check_unlearned(P6);
    let got = w.a.resolve(DNS1, "api.bypass.test", true, false);
    assert_eq!(got, vec![IpAddr::V6(PROV6)]);
    w.check_learned(By::Allowed, P6, "AAAA answer");
    // The IPv4 address was not asked for: still unlearned.
    w.check_unlearned(P4);
}

/// (a) A provider given by an IPv6 CIDR is judged on IPv6 connects.
#[test]
fn bypass_ipv6_destination_of_a_v6_cidr_provider() {
    require_root();
    let cg = CgroupGuard::new("bp-v6cidr");
    let (allowed, denied) = (cg.child("allowed"), cg.child("denied"));
    let ns = NetnsGuard::new();
    let _s = llm_egress_tests::TcpServer::start(&ns, "[fd00:20::1]:443");
    let agent = Agent::start(&llm_egress_tests::scenario::policy(
        &cg,
        "",
        r#"
[defaults]
llm = "deny"
other = "allow"

[[providers]]
name = "v6"
cidrs = ["fd00:20::/48"]
ports = [443]

[[workloads]]
name = "allowed"
cgroup = "allowed"
allow = ["v6"]
other = "deny"

[[workloads]]
name = "denied"
cgroup = "denied"
llm = "deny"
other = "allow"
"#,
    ));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&denied, &ns, "[fd00:20::1]:443"),
        "denied to a v6 CIDR provider",
    );
    expect_ok(
        &agent,
        p.connect(&allowed, &ns, "[fd00:20::1]:443"),
        "allowed to a v6 CIDR provider",
    );
}

/// (b) `[::ffff:10.77.0.5]` on an AF_INET6 socket is the learned IPv4
/// address.
#[test]
fn bypass_ipv4_mapped_ipv6_of_a_learned_address() {
    require_root();
    let mut w = World::new("bp-mapped");
    const MAPPED: &str = "[::ffff:10.77.0.5]:443";
    w.a.resolve(DNS1, "api.bypass.test", false, false);
    w.check_learned(By::Allowed, P4, "A answer");
    w.check_learned(
        By::Allowed,
        MAPPED,
        "IPv4-mapped IPv6 of the learned address",
    );
    w.d.resolve(DNS1, "api.bypass.test", false, false);
    expect_eperm(
        &w.agent,
        w.d.connect(MAPPED),
        "IPv4-mapped IPv6 of the address the denied workload resolved",
    );
}

/// (c) UDP to 443 (a QUIC-style datagram), unconnected `sendto()` and
/// connected `send()`, IPv4, IPv6 and mapped.
#[test]
fn bypass_udp_443_quic_datagram() {
    require_root();
    let mut w = World::new("bp-udp");
    // Each workload learns for itself (the probes run in the same cgroups).
    for c in [&mut w.a, &mut w.d] {
        c.resolve(DNS1, "api.bypass.test", false, false);
        c.resolve(DNS1, "api.bypass.test", true, false);
    }
    let p = probe();
    let (a, d) = (w.path("allowed"), w.path("denied"));
    for addr in [P4, P6, "[::ffff:10.77.0.5]:443"] {
        expect_eperm(
            &w.agent,
            p.udp(&d, &w.ns, addr),
            &format!("denied: sendto {addr} (UDP 443)"),
        );
        expect_eperm(
            &w.agent,
            p.udp_connect(&d, &w.ns, addr),
            &format!("denied: connect+send {addr} (UDP 443)"),
        );
        expect_ok(
            &w.agent,
            p.udp(&a, &w.ns, addr),
            &format!("allowed: sendto {addr} (UDP 443)"),
        );
        expect_ok(
            &w.agent,
            p.udp_connect(&a, &w.ns, addr),
            &format!("allowed: connect+send {addr} (UDP 443)"),
        );
    }
}

/// (d) Another workload resolves the name; this one connects to the
/// literal address it never resolved. Learned addresses are per workload
/// (docs/names.md): for `denied` (and a process in no workload) it is no
/// provider's, so their `other = "allow"` lets the connect through. The
/// limit: a provider known by name only is not stopped at a literal
/// address the workload did not resolve (README "Honest limits"). Once
/// `denied` resolves it itself, it is the provider's for it too.
#[test]
fn bypass_literal_address_resolved_by_another_workload_documented_limit() {
    require_root();
    let mut w = World::new("bp-literal");
    w.check_unlearned(P4);
    // The allowed workload's process resolves; the denied one does not.
    w.a.resolve(DNS1, "api.bypass.test", false, false);
    expect_ok(
        &w.agent,
        w.a.connect(P4),
        "the allowed workload to the address it learned",
    );
    expect_ok(
        &w.agent,
        w.d.connect(P4),
        "the denied workload to the literal address only another workload resolved: no provider's (other = allow)",
    );
    // A process in no workload: its defaults (llm = deny, other = allow).
    let nobody = w.cg.child("nobody");
    expect_ok(
        &w.agent,
        probe().connect(&nobody, &w.ns, P4),
        "a process in no workload to the literal address another workload resolved",
    );
    // The denied workload's own answer makes it the provider's for it.
    w.d.resolve(DNS1, "api.bypass.test", false, false);
    expect_eperm(
        &w.agent,
        w.d.connect(P4),
        "the denied workload to the address once it resolved it itself",
    );
}

/// (e) `alias.example` CNAME `hop.example` CNAME `API.Bypass.Test` A.
#[test]
fn bypass_cname_chain_to_the_provider_name() {
    require_root();
    let mut w = World::new("bp-cname");
    w.check_unlearned(P4);
    assert_eq!(
        w.d.resolve(DNS1, "alias.example", false, false),
        vec![IpAddr::V4(PROV4)]
    );
    w.check_learned(By::Denied, P4, "two-hop CNAME chain");
}

/// (f) The question in upper case with a trailing dot.
#[test]
fn bypass_upper_case_and_trailing_dot_name() {
    require_root();
    let mut w = World::new("bp-case");
    w.check_unlearned(P4);
    assert_eq!(
        w.d.resolve(DNS1, "API.BYPASS.TEST.", false, false),
        vec![IpAddr::V4(PROV4)]
    );
    w.check_learned(By::Denied, P4, "upper-case, trailing-dot question");
}

/// (g) A name below the wildcard host `*.wild.test` (two labels deep, in
/// mixed case) is the provider's; the wildcard's apex is not.
#[test]
fn bypass_wildcard_provider_name() {
    require_root();
    let mut w = World::new("bp-wild");
    w.check_unlearned(P4);
    w.check_unlearned("10.77.0.9:443");
    assert_eq!(
        w.d.resolve(DNS1, "eu.Region.WILD.test", false, false),
        vec![IpAddr::V4(PROV4)]
    );
    w.check_learned(By::Denied, P4, "name below *.wild.test");
    w.d.resolve(DNS1, "wild.test", false, false);
    w.check_unlearned("10.77.0.9:443");
}

/// (h) A second DNS server on another address of the namespace, which
/// the policy trusts too, answers the provider name: learning is on the
/// answer's way into the socket, whichever trusted server sent it.
#[test]
fn bypass_second_resolver_in_the_namespace() {
    require_root();
    let mut w = World::new("bp-resolver2");
    let _dns2 = DnsServer::start(&w.ns, DNS2, |name: &str, _| {
        if name.eq_ignore_ascii_case("api.bypass.test") {
            vec![Rr::A(name.to_string(), Ipv4Addr::new(10, 77, 0, 7))]
        } else {
            vec![]
        }
    });
    w.check_unlearned("10.77.0.7:443");
    assert_eq!(
        w.d.resolve(DNS2, "api.bypass.test", false, false),
        vec![IpAddr::V4(Ipv4Addr::new(10, 77, 0, 7))]
    );
    w.check_learned(By::Denied, "10.77.0.7:443", "answer from a second resolver");
}

/// DNS over TCP: an answer that arrives over TCP (in one segment, as small
/// answers do) is learned like a UDP one, before the client can read it.
#[test]
fn bypass_dns_over_tcp() {
    require_root();
    let mut w = World::new("bp-tcpdns");
    w.check_unlearned(P4);
    assert_eq!(
        w.d.resolve(DNS1, "api.bypass.test", false, true),
        vec![IpAddr::V4(PROV4)]
    );
    w.check_learned(By::Denied, P4, "an answer over TCP");
    let tcp = w.agent.wait_for_metric(
        "llm_egress_dns_tcp_answers_total",
        &[("segments", "whole")],
        1.0,
        Duration::from_secs(5),
    );
    assert!(
        tcp.is_some(),
        "the TCP answer is counted\n{}",
        w.agent.context()
    );
}

/// Only answers from source port 53 are read: a resolver on another port
/// teaches nothing (README "Honest limits"). This asserts the limit.
#[test]
fn bypass_resolver_on_another_port_is_not_learned_documented_limit() {
    require_root();
    let mut w = World::new("bp-port");
    let _dns = DnsServer::start(&w.ns, "192.0.2.1:5353", answers);
    assert_eq!(
        w.d.resolve("192.0.2.1:5353", "api.bypass.test", false, false),
        vec![IpAddr::V4(PROV4)]
    );
    std::thread::sleep(Duration::from_millis(200));
    w.check_unlearned(P4);
}

// ------------------------------------------------- (i) SNI on one address

const SNI_ADDR: &str = "10.79.0.1";

/// curl -k https://<name>/ pinned to SNI_ADDR: (exit code, http code, took).
fn curl(cgroup: &Path, ns: &NetnsGuard, name: &str) -> (i32, String, Duration, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .arg("--resolve")
    .arg(format!("{name}:443:{SNI_ADDR}"))
    .arg(format!("https://{name}/"));
    confine(&mut cmd, cgroup, ns);
    let started = Instant::now();
    let out = cmd.output().expect("cannot run curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// (i) Two provider names on one address, one allowed and one denied for
/// the workload: the allowed name is resolved (so the address is learned
/// as the allowed provider's) and the denied name is pointed at the same
/// address. The connect passes on the address; the denied name's TLS
/// handshake fails, the allowed one completes.
#[test]
fn bypass_denied_name_on_an_allowed_names_address() {
    require_root();
    let cg = CgroupGuard::new("bp-shared");
    let w = cg.child("w");
    let ns = NetnsGuard::new();
    ns.ip(&["addr", "add", &format!("{SNI_ADDR}/32"), "dev", "lo"]);
    let _dns = DnsServer::start(&ns, DNS1, |name: &str, _| {
        if name.eq_ignore_ascii_case("good.shared.test") {
            vec![Rr::A(name.to_string(), SNI_ADDR.parse().unwrap())]
        } else {
            vec![]
        }
    });
    let _tls = TlsServer::start(&ns, SNI_ADDR);
    let agent = Agent::start(&format!(
        r#"cgroup = {}

[resolver]
servers = [{}]
# The test namespace's DNS servers (docs/names.md: answers are learned only
# from trusted resolvers).
trusted = ["192.0.2.1", "198.51.100.1"]

[[providers]]
name = "good"
hosts = ["good.shared.test"]
ports = [443]

[[providers]]
name = "bad"
hosts = ["bad.shared.test"]
ports = [443]

[[workloads]]
name = "w"
cgroup = "w"
allow = ["good", "192.0.2.0/24"]
deny = ["bad"]
other = "deny"
"#,
        toml_str(&cg.path().display().to_string()),
        toml_str(DEAD_DNS)
    ));
    let mut c = Client::start(&w, &ns);
    // other = deny: the address is unreachable until it is learned.
    expect_eperm(
        &agent,
        c.connect(&format!("{SNI_ADDR}:443")),
        "the shared address before it is learned",
    );
    assert_eq!(
        c.resolve(DNS1, "good.shared.test", false, false),
        vec![IpAddr::V4(SNI_ADDR.parse().unwrap())]
    );
    drop(c);
    let (code, http, took, err) = curl(&w, &ns, "bad.shared.test");
    assert!(
        code != 0,
        "the denied name's handshake on the allowed name's address must fail, it gave http {http:?}\n{}",
        agent.context()
    );
    eprintln!(
        "denied handshake: curl exit {code} after {took:?}: {}",
        err.trim()
    );
    // s_server serves one connection at a time and still waits for the
    // ClientHello the aborted client never delivered: a fresh server.
    drop(_tls);
    let _tls = TlsServer::start(&ns, SNI_ADDR);
    let (code, http, took, err) = curl(&w, &ns, "good.shared.test");
    assert!(
        code == 0 && http == "200",
        "the allowed name must complete: curl exit {code} http {http:?} after {took:?}: {err}\n{}",
        agent.context()
    );
    let deny = agent
        .wait_for_audit(
            |e| e["hook"] == "sni" && e["verdict"] == "deny",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no SNI deny in the audit log\n{}", agent.context()));
    assert_eq!(deny["server_name"], "bad.shared.test");
}

/// (j) A connection opened while the provider was allowed survives a
/// reload that denies it (documented: established connections are not
/// cut); the next connect after the reload is denied.
#[test]
fn bypass_connection_opened_before_the_policy_changed_documented_limit() {
    require_root();
    let mut w = World::new("bp-reload");
    w.a.resolve(DNS1, "api.bypass.test", false, false);
    expect_ok(
        &w.agent,
        w.a.hold(P4),
        "allowed workload opens a connection to the provider",
    );
    expect_ok(
        &w.agent,
        w.a.echo(),
        "the held connection works before the reload",
    );
    w.agent.rewrite_policy(&policy(&w.cg, false));
    w.agent.sighup();
    // The address may have to be learned again after the reload.
    let since = Instant::now();
    let mut last = Ok(());
    while since.elapsed() < Duration::from_secs(5) {
        w.a.resolve(DNS1, "api.bypass.test", false, false);
        last = w.a.connect(P4);
        if last == Err(libc::EPERM) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    expect_eperm(
        &w.agent,
        last,
        "the next connect after the reload that denies the provider",
    );
    // The limit: the connection opened before the reload still carries data.
    expect_ok(
        &w.agent,
        w.a.echo(),
        "the connection opened before the reload (not cut: documented limit)",
    );
}

/// The TTL bounds of learned addresses are the policy's: with
/// `max_ttl_seconds = 1` an address learned from an answer (whatever its
/// TTL) stops being the provider's after a second, and the next answer
/// learns it again.
#[test]
fn learned_addresses_expire_at_the_policys_max_ttl() {
    require_root();
    let mut w = World::new("bp-ttl");
    let short = policy(&w.cg, true).replace(
        "[resolver]\n",
        "[resolver]\nmin_ttl_seconds = 1\nmax_ttl_seconds = 1\n",
    );
    let before = w.agent.generation();
    w.agent.rewrite_policy(&short);
    w.agent.sighup();
    let reloaded =
        llm_egress_tests::wait_until(Duration::from_secs(5), Duration::from_millis(100), || {
            (w.agent.generation() > before).then_some(())
        });
    assert!(
        reloaded.is_some(),
        "reload with the TTL bounds\n{}",
        w.agent.context()
    );
    w.d.resolve(DNS1, "api.bypass.test", false, false);
    w.check_learned(By::Denied, P4, "right after the answer");
    std::thread::sleep(Duration::from_millis(2_500));
    w.check_unlearned(P4);
    w.d.resolve(DNS1, "api.bypass.test", false, false);
    w.check_learned(By::Denied, P4, "after the next answer");
}
