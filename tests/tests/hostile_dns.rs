//! Hostile DNS: answers the kernel must not learn from, end to end
//! (docs/names.md, "Who can teach an address").
//!
//! The world of each test: its own cgroup with workloads `a` and `b`, both
//! allowed provider `hostile` (`api.hostile.test`, port 443, known only by
//! name: the agent's own resolver is dead) and the DNS addresses, `other =
//! "deny"`. So a workload reaches an address in `10.77.0.0/16` (local to
//! the test namespace, where a listener on port 443 accepts everything)
//! only when the kernel learned it for that workload as `hostile`'s, and
//! gets EPERM otherwise. The policy trusts the resolver 192.0.2.1 only
//! (two tests: `trusted = "any"`).
//!
//! Clients are this test executable run again as a child
//! (`hostile_client_process`, selected by `LLM_EGRESS_HOSTILE_CLIENT`): it
//! joins a workload cgroup and the namespace, opens one UDP socket, and
//! runs one command per stdin line (send a query, receive a datagram,
//! connect), answering one line each. Forged answers come from the test
//! process itself, outside the attach cgroup, from a socket it binds to
//! port 53 in the namespace.
//!
//! Locals are declared cgroup, netns, servers, agent, so they drop in the
//! reverse order.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer,
    client_process::{self, ClientProcess},
    require_root, toml_str,
};

const DEAD_DNS: &str = "127.0.0.1:9";
/// The resolver the policy trusts.
const TRUSTED: &str = "192.0.2.1";
/// Another address of the namespace: not trusted.
const UNTRUSTED: &str = "198.51.100.1";
const NAME: &str = "api.hostile.test";
const CLIENT_ENV: &str = "LLM_EGRESS_HOSTILE_CLIENT";
/// EPERM, what a denied connect() gets.
const EPERM: i32 = 1;

// ---------------------------------------------------------------- DNS wire

fn put_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// A query for `name` (type A), id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    put_name(&mut q, name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// An answer with id `id` to the question `name` (type A): one A record
/// `addr` for it, TTL 60.
fn answer(id: u16, name: &str, addr: Ipv4Addr) -> Vec<u8> {
    let mut r = id.to_be_bytes().to_vec();
    r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0]);
    put_name(&mut r, name);
    r.extend_from_slice(&[0, 1, 0, 1]);
    r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
    r.extend_from_slice(&addr.octets());
    r
}

/// (id, question name) of a query.
fn parse_query(q: &[u8]) -> Option<(u16, String)> {
    let id = u16::from_be_bytes([*q.first()?, *q.get(1)?]);
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
    Some((id, labels.join(".")))
}

/// How a test server answers a query: (id, name) → the answer's bytes.
type Answerer = dyn Fn(u16, &str) -> Vec<u8> + Send + Sync;

/// A UDP DNS server at `addr`:53 in the test namespace.
struct DnsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    fn start(ns: &NetnsGuard, addr: &str, answer: Box<Answerer>) -> DnsServer {
        let addr: SocketAddr = format!("{addr}:53").parse().unwrap();
        let sock = ns
            .in_netns(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("DNS server cannot bind {addr}: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s2.load(Ordering::SeqCst) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf)
                    && let Some((id, name)) = parse_query(&buf[..n])
                {
                    let _ = sock.send_to(&answer(id, &name), peer);
                }
            }
        });
        DnsServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `msg` from `from`:53 to the client's socket (`port` on
/// 192.0.2.1, an address of the namespace), as the test process: outside
/// every workload.
fn forge(ns: &NetnsGuard, from: &str, port: u16, msg: &[u8]) {
    let from: SocketAddr = format!("{from}:53").parse().unwrap();
    ns.in_netns(|| {
        let s = UdpSocket::bind(from).unwrap_or_else(|e| panic!("cannot bind {from}: {e}"));
        s.send_to(msg, (TRUSTED, port))
            .unwrap_or_else(|e| panic!("cannot send the forged answer: {e}"));
    });
}

// ------------------------------------------------------------- the client

/// A client process in a workload cgroup and the test namespace.
struct Client(ClientProcess);

impl Client {
    fn start(cgroup: &Path, ns: &NetnsGuard) -> Client {
        Client(ClientProcess::start(
            "hostile_client_process",
            CLIENT_ENV,
            cgroup,
            ns,
        ))
    }

    fn cmd(&mut self, line: &str) -> String {
        self.0.cmd(line)
    }

    /// The port of the client's UDP socket.
    fn port(&mut self) -> u16 {
        self.cmd("port").parse().expect("a port")
    }

    /// Sends a query for `NAME` with id `id` to `server`:53.
    fn query(&mut self, server: &str, id: u16) {
        let r = self.cmd(&format!("query {server} {id} {NAME}"));
        assert_eq!(r, "sent", "the query to {server} was not sent");
    }

    /// The next datagram the socket receives: (id, source address).
    fn recv(&mut self) -> (u16, String) {
        let r = self.cmd("recv");
        let (id, src) = r
            .split_once(' ')
            .unwrap_or_else(|| panic!("the client received nothing: {r}"));
        (id.parse().unwrap(), src.to_string())
    }

    /// connect() to `addr`:443: Ok or the errno.
    fn connect(&mut self, addr: Ipv4Addr) -> Result<(), i32> {
        match self.cmd(&format!("connect {addr}")).as_str() {
            "ok" => Ok(()),
            e => Err(e.parse().unwrap_or(-1)),
        }
    }
}

/// The client: only does something when run by `Client::start`.
#[test]
fn hostile_client_process() {
    let mut udp: Option<UdpSocket> = None;
    let mut buf = [0u8; 2048];
    client_process::serve(CLIENT_ENV, |line| {
        let udp = udp.get_or_insert_with(|| {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            u
        });
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["port"] => udp.local_addr().unwrap().port().to_string(),
            ["query", server, id, name] => {
                let to = format!("{server}:53");
                match udp.send_to(&query(id.parse().unwrap(), name), to) {
                    Ok(_) => "sent".to_string(),
                    Err(e) => format!("error {e}"),
                }
            }
            ["recv"] => match udp.recv_from(&mut buf) {
                Ok((n, from)) if n >= 2 => {
                    format!("{} {}", u16::from_be_bytes([buf[0], buf[1]]), from.ip())
                }
                Ok(_) => "short".to_string(),
                Err(e) => format!("timeout:{e}"),
            },
            ["connect", addr] => {
                let a: Ipv4Addr = addr.parse().unwrap();
                match TcpStream::connect_timeout(
                    &SocketAddr::V4(SocketAddrV4::new(a, 443)),
                    Duration::from_secs(3),
                ) {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.raw_os_error().unwrap_or(-1).to_string(),
                }
            }
            _ => format!("unknown command {line:?}"),
        }
    });
}

// ----------------------------------------------------------------- world

/// `trusted`: the TOML value of `[resolver] trusted`.
fn policy(cg: &CgroupGuard, trusted: &str) -> String {
    let workload = |name: &str| {
        format!(
            r#"
[[workloads]]
name = "{name}"
cgroup = "{name}"
allow = ["hostile", "192.0.2.0/24", "198.51.100.0/24"]
other = "deny"
"#
        )
    };
    format!(
        r#"cgroup = {}

[resolver]
servers = [{}]
trusted = {}

[[providers]]
name = "hostile"
hosts = [{}]
ports = [443]
{}{}"#,
        toml_str(&cg.path().display().to_string()),
        toml_str(DEAD_DNS),
        trusted,
        toml_str(NAME),
        workload("a"),
        workload("b"),
    )
}

/// Cgroups `a` and `b`, a namespace with `10.77.0.0/16` local and a
/// listener on port 443, the agent (servers are the test's own).
struct World {
    agent: Agent,
    /// Accepts (and closes) every connection to port 443 on any address
    /// local to the namespace.
    _listener: TcpServer,
    ns: NetnsGuard,
    cg: CgroupGuard,
}

impl World {
    /// The policy trusts `TRUSTED` only.
    fn new(tag: &str) -> World {
        World::trusting(tag, &format!("[{}]", toml_str(TRUSTED)))
    }

    fn trusting(tag: &str, trusted: &str) -> World {
        let cg = CgroupGuard::new(tag);
        cg.child("a");
        cg.child("b");
        let ns = NetnsGuard::new();
        ns.ip(&["route", "add", "local", "10.77.0.0/16", "dev", "lo"]);
        let listener = TcpServer::start(&ns, "0.0.0.0:443");
        let agent = Agent::start(&policy(&cg, trusted));
        World {
            agent,
            _listener: listener,
            ns,
            cg,
        }
    }

    fn client(&self, workload: &str) -> Client {
        Client::start(&self.cg.child(workload), &self.ns)
    }

    /// Waits until the kernel counter behind `metric` (with `labels`) is at
    /// least 1.
    #[track_caller]
    fn expect_counted(&self, metric: &str, labels: &[(&str, &str)], what: &str) {
        let got = self
            .agent
            .wait_for_metric(metric, labels, 1.0, Duration::from_secs(5));
        assert!(
            got.is_some(),
            "{what}: {metric}{labels:?} stays 0\n{}",
            self.agent.context()
        );
    }
}

/// A server at `at`:53 that answers `NAME` with `addr`.
fn honest(ns: &NetnsGuard, at: &str, addr: Ipv4Addr) -> DnsServer {
    DnsServer::start(ns, at, Box::new(move |id, name| answer(id, name, addr)))
}

// ----------------------------------------------------------------- tests

/// An answer sent to a socket that asked nothing, even from the trusted
/// resolver's address, teaches nothing: the workload that forged it gets
/// EPERM for the forged address.
#[test]
fn a_forged_answer_to_a_socket_that_sent_no_query_is_not_learned() {
    require_root();
    let w = World::new("hdns-forged");
    let mut a = w.client("a");
    let port = a.port();
    let forged = Ipv4Addr::new(10, 77, 1, 1);
    forge(&w.ns, TRUSTED, port, &answer(7, NAME, forged));
    assert_eq!(
        a.recv(),
        (7, TRUSTED.to_string()),
        "the forged answer reached the socket"
    );
    assert_eq!(
        a.connect(forged),
        Err(EPERM),
        "the forged address is not the provider's\n{}",
        w.agent.context()
    );
    w.expect_counted(
        "llm_egress_dns_unasked_answers_total",
        &[],
        "the unasked answer",
    );
}

/// A query to the trusted resolver is pending; an answer with its id
/// from another address (a second socket bound to port 53) is not the
/// resolver's and teaches nothing.
#[test]
fn an_answer_from_another_address_than_the_one_asked_is_not_learned() {
    require_root();
    let w = World::new("hdns-other-src");
    let mut a = w.client("a");
    let port = a.port();
    // Nobody listens at the trusted address: only the forger answers.
    a.query(TRUSTED, 11);
    let forged = Ipv4Addr::new(10, 77, 2, 1);
    forge(&w.ns, UNTRUSTED, port, &answer(11, NAME, forged));
    assert_eq!(a.recv(), (11, UNTRUSTED.to_string()));
    assert_eq!(
        a.connect(forged),
        Err(EPERM),
        "an answer from {UNTRUSTED} to a query sent to {TRUSTED}\n{}",
        w.agent.context()
    );
    w.expect_counted(
        "llm_egress_dns_unasked_answers_total",
        &[],
        "the answer from another address",
    );
}

/// A resolver the policy does not trust answers a query sent to it: not
/// learned, the query is counted as untrusted.
#[test]
fn an_answer_from_a_resolver_that_is_not_trusted_is_not_learned() {
    require_root();
    let w = World::new("hdns-untrusted");
    let addr = Ipv4Addr::new(10, 77, 3, 1);
    let _dns = honest(&w.ns, UNTRUSTED, addr);
    let mut a = w.client("a");
    a.query(UNTRUSTED, 21);
    assert_eq!(a.recv(), (21, UNTRUSTED.to_string()));
    assert_eq!(
        a.connect(addr),
        Err(EPERM),
        "an answer of the untrusted resolver {UNTRUSTED}\n{}",
        w.agent.context()
    );
    w.expect_counted(
        "llm_egress_dns_queries_total",
        &[("resolver", "untrusted")],
        "the query to the untrusted resolver",
    );
}

/// `trusted = "any"` (documented as weaker): the answer of any resolver a
/// socket asked is learned, still only as the answer to its own query.
#[test]
fn with_trusted_any_an_answer_from_any_resolver_asked_is_learned() {
    require_root();
    let w = World::trusting("hdns-any", "\"any\"");
    let addr = Ipv4Addr::new(10, 77, 7, 1);
    let _dns = honest(&w.ns, UNTRUSTED, addr);
    let mut a = w.client("a");
    a.query(UNTRUSTED, 61);
    assert_eq!(a.recv(), (61, UNTRUSTED.to_string()));
    assert_eq!(
        a.connect(addr),
        Ok(()),
        "trusted = \"any\": the answer of {UNTRUSTED} is learned\n{}",
        w.agent.context()
    );
    // Still no answer without a query.
    let port = a.port();
    let forged = Ipv4Addr::new(10, 77, 7, 2);
    forge(&w.ns, TRUSTED, port, &answer(62, NAME, forged));
    assert_eq!(a.recv(), (62, TRUSTED.to_string()));
    assert_eq!(a.connect(forged), Err(EPERM), "an unasked answer");
}

/// The trusted resolver's answer to the socket's own query is learned
/// before the client reads it: the connect is allowed.
#[test]
fn a_real_answer_from_the_trusted_resolver_is_learned() {
    require_root();
    let w = World::new("hdns-real");
    let addr = Ipv4Addr::new(10, 77, 4, 1);
    let _dns = honest(&w.ns, TRUSTED, addr);
    let mut a = w.client("a");
    assert_eq!(a.connect(addr), Err(EPERM), "before the answer");
    a.query(TRUSTED, 31);
    assert_eq!(a.recv(), (31, TRUSTED.to_string()));
    assert_eq!(
        a.connect(addr),
        Ok(()),
        "the answer was learned\n{}",
        w.agent.context()
    );
    w.expect_counted(
        "llm_egress_dns_queries_total",
        &[("resolver", "trusted")],
        "the query to the trusted resolver",
    );
}

/// The resolver's answer carries another id than the query: it answers no
/// pending query and teaches nothing.
#[test]
fn an_answer_with_a_mismatching_id_is_not_learned() {
    require_root();
    let w = World::new("hdns-id");
    let addr = Ipv4Addr::new(10, 77, 6, 1);
    let _dns = DnsServer::start(
        &w.ns,
        TRUSTED,
        Box::new(move |id, name| answer(id ^ 0x0101, name, addr)),
    );
    let mut a = w.client("a");
    a.query(TRUSTED, 51);
    assert_eq!(a.recv(), (51 ^ 0x0101, TRUSTED.to_string()));
    assert_eq!(
        a.connect(addr),
        Err(EPERM),
        "an answer with id {} to query 51\n{}",
        51 ^ 0x0101,
        w.agent.context()
    );
    w.expect_counted(
        "llm_egress_dns_unasked_answers_total",
        &[],
        "the answer with another id",
    );
}

/// Learned addresses are the receiving workload's: the trusted resolver's
/// answer to a query of workload `a` lets `a` connect, but for `b` (the
/// same policy, `other = "deny"`) the address is no provider's until `b`
/// resolves it itself.
#[test]
fn an_address_one_workload_learned_is_not_the_providers_for_another() {
    require_root();
    let w = World::new("hdns-scope");
    let addr = Ipv4Addr::new(10, 77, 8, 1);
    let _dns = honest(&w.ns, TRUSTED, addr);
    let (mut a, mut b) = (w.client("a"), w.client("b"));
    a.query(TRUSTED, 61);
    assert_eq!(a.recv(), (61, TRUSTED.to_string()));
    assert_eq!(
        a.connect(addr),
        Ok(()),
        "a: the answer to its own query was learned\n{}",
        w.agent.context()
    );
    assert_eq!(
        b.connect(addr),
        Err(EPERM),
        "b: an address only a's answer taught is no provider's for b\n{}",
        w.agent.context()
    );
    b.query(TRUSTED, 62);
    assert_eq!(b.recv(), (62, TRUSTED.to_string()));
    assert_eq!(
        b.connect(addr),
        Ok(()),
        "b: after the answer to its own query\n{}",
        w.agent.context()
    );
}

/// With `trusted = "any"`, a workload that runs its own resolver teaches
/// itself any address, and only itself: the other workload still gets
/// EPERM for it.
#[test]
fn with_trusted_any_a_workloads_own_resolver_teaches_only_that_workload() {
    require_root();
    let w = World::trusting("hdns-any-scope", "\"any\"");
    let addr = Ipv4Addr::new(10, 77, 9, 1);
    // The workload's "own" resolver: any address of the namespace.
    let _dns = honest(&w.ns, UNTRUSTED, addr);
    let (mut a, mut b) = (w.client("a"), w.client("b"));
    a.query(UNTRUSTED, 71);
    assert_eq!(a.recv(), (71, UNTRUSTED.to_string()));
    assert_eq!(
        a.connect(addr),
        Ok(()),
        "a taught itself through a resolver it asked (trusted = \"any\")\n{}",
        w.agent.context()
    );
    assert_eq!(
        b.connect(addr),
        Err(EPERM),
        "what a taught itself is no provider's for b\n{}",
        w.agent.context()
    );
}
