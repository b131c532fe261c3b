//! Names, not addresses: addresses learned from DNS answers where they
//! enter the workload's sockets (cgroup_skb ingress), end to end.
//!
//! A DNS server of the test's own answers inside the test namespace (on
//! 192.0.2.1:53). Clients are this test executable run again as a child
//! (`names_client_process`, selected by the `LLM_EGRESS_NAMES_CLIENT`
//! environment variable): it joins a workload cgroup and the namespace,
//! then resolves and connects at once. Provider addresses are
//! `10.77.0.0/16` and `10.78.0.0/16`, made local to the namespace with an
//! AnyIP route on `lo`, where a listener on port 443 accepts everything.
//!
//! Locals are declared cgroup, netns, servers, agent, so they drop in the
//! reverse order: the agent stops before its cgroup goes.

use std::{
    io::{BufRead, BufReader, ErrorKind},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, bpf, netns::enter_netns, require_root, toml_str,
};

const DEAD_DNS: &str = "127.0.0.1:9";
const DNS_ADDR: &str = "192.0.2.1:53";
const CLIENT_ENV: &str = "LLM_EGRESS_NAMES_CLIENT";

// ---------------------------------------------------------------- DNS wire

/// One answer record the test server sends.
#[derive(Clone, Debug)]
enum Rr {
    /// owner, address
    A(String, Ipv4Addr),
    /// owner, target
    Cname(String, String),
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
}

/// A query for `name` (type A), id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    put_name(&mut q, name);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// (id, question name as sent, offset after the question) of a query.
fn parse_query(q: &[u8]) -> Option<(u16, String, usize)> {
    if q.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([q[0], q[1]]);
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
    Some((id, labels.join("."), pos + 4))
}

/// A response to `q` with `answers`. Owner names equal to the question name
/// are written as a compression pointer to it (offset 12), as resolvers do.
fn response(q: &[u8], answers: &[Rr], ttl: u32) -> Vec<u8> {
    let (_, qname, qend) = parse_query(q).expect("a query");
    let mut r = Vec::with_capacity(512);
    r.extend_from_slice(&q[..2]);
    r.extend_from_slice(&[0x81, 0x80, 0, 1]);
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&q[12..qend]);
    let owner = |r: &mut Vec<u8>, name: &str| {
        if name.eq_ignore_ascii_case(&qname) {
            r.extend_from_slice(&[0xc0, 12]);
        } else {
            put_name(r, name);
        }
    };
    for rr in answers {
        match rr {
            Rr::A(name, a) => {
                owner(&mut r, name);
                r.extend_from_slice(&[0, 1, 0, 1]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&a.octets());
            }
            Rr::Cname(name, target) => {
                owner(&mut r, name);
                r.extend_from_slice(&[0, 5, 0, 1]);
                r.extend_from_slice(&ttl.to_be_bytes());
                let mut t = Vec::new();
                put_name(&mut t, target);
                r.extend_from_slice(&(t.len() as u16).to_be_bytes());
                r.extend_from_slice(&t);
            }
        }
    }
    r
}

/// The last A record's address of a response (the client's own reading).
fn last_a(r: &[u8]) -> Option<Ipv4Addr> {
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
    let mut last = None;
    for _ in 0..ancount {
        pos = skip_name(pos)?;
        let rtype = u16::from_be_bytes([*r.get(pos)?, *r.get(pos + 1)?]);
        let rdlen = u16::from_be_bytes([*r.get(pos + 8)?, *r.get(pos + 9)?]) as usize;
        let rdata = r.get(pos + 10..pos + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            last = Some(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]));
        }
        pos += 10 + rdlen;
    }
    last
}

/// How the test server answers a question (the name as asked).
type Answerer = dyn Fn(&str) -> Vec<Rr> + Send + Sync;

/// A UDP DNS server in the test namespace.
struct DnsServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DnsServer {
    fn start(ns: &NetnsGuard, ttl: u32, answer: Box<Answerer>) -> DnsServer {
        let addr: SocketAddr = DNS_ADDR.parse().unwrap();
        let sock = ns
            .in_netns(|| UdpSocket::bind(addr))
            .unwrap_or_else(|e| panic!("DNS server cannot bind {addr} in {}: {e}", ns.name()));
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !s2.load(Ordering::SeqCst) {
                match sock.recv_from(&mut buf) {
                    Ok((n, peer)) => {
                        let q = &buf[..n];
                        let Some((_, name, _)) = parse_query(q) else {
                            continue;
                        };
                        let r = response(q, &answer(&name), ttl);
                        let _ = sock.send_to(&r, peer);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                        ) => {}
                    Err(e) => panic!("DNS server: {e}"),
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

/// Accepts (and closes) every connection to port 443 on any address local
/// to the namespace, with a deep backlog so that fast clients never wait.
struct AnyListener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AnyListener {
    fn start(ns: &NetnsGuard) -> AnyListener {
        let l = ns
            .in_netns(|| TcpListener::bind("0.0.0.0:443"))
            .unwrap_or_else(|e| panic!("cannot listen on 0.0.0.0:443 in {}: {e}", ns.name()));
        // SAFETY: listen(2) on a socket we own, to deepen its backlog.
        unsafe { libc::listen(l.as_raw_fd(), 4096) };
        l.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => drop(c),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(1))
                    }
                    Err(_) => {}
                }
            }
        });
        AnyListener {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for AnyListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ------------------------------------------------------------- the client

/// What the client process reports per trial: the name asked, the address
/// it got, and the connect result ("ok" or an errno).
#[derive(Debug, Clone)]
struct Trial {
    name: String,
    addr: Option<Ipv4Addr>,
    result: Result<(), i32>,
}

/// Runs this executable again as a client in `cgroup` and `ns`: for each
/// name, resolve it at 192.0.2.1:53 and connect to the answer's address on
/// port 443 at once.
fn run_client(cgroup: &Path, ns: &NetnsGuard, names: &[String]) -> Vec<Trial> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "names_client_process",
            "--exact",
            "--nocapture",
            "--test-threads=1",
            "-q",
        ])
        .env(
            CLIENT_ENV,
            format!("{}\n{}", cgroup.display(), ns.path().display()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start the client process");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        for n in names {
            writeln!(stdin, "{n}").unwrap();
        }
    }
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut trials = Vec::new();
    for line in out.lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("TRIAL ") else {
            continue;
        };
        let mut f = rest.split(' ');
        let name = f.next().unwrap_or_default().to_string();
        let addr = f.next().and_then(|a| a.parse().ok());
        let result = match f.next() {
            Some("ok") => Ok(()),
            Some(e) => Err(e.parse().unwrap_or(-1)),
            None => Err(-1),
        };
        trials.push(Trial { name, addr, result });
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "the client process failed: {status}");
    assert_eq!(
        trials.len(),
        names.len(),
        "the client reported {} trials for {} names",
        trials.len(),
        names.len()
    );
    trials
}

/// The client: only does something when run by `run_client`.
#[test]
fn names_client_process() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let mut lines = spec.lines();
    let cgroup = lines.next().unwrap();
    let ns = lines.next().unwrap();
    std::fs::write(
        Path::new(cgroup).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| panic!("cannot join {cgroup}: {e}"));
    enter_netns(Path::new(ns)).unwrap_or_else(|e| panic!("cannot enter {ns}: {e}"));
    let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let dns: SocketAddr = DNS_ADDR.parse().unwrap();
    let mut out = std::io::BufWriter::new(std::io::stdout());
    use std::io::Write;
    let mut buf = [0u8; 2048];
    for (i, name) in std::io::stdin().lines().map_while(Result::ok).enumerate() {
        let id = i as u16;
        udp.send_to(&query(id, &name), dns)
            .unwrap_or_else(|e| panic!("DNS query for {name}: {e}"));
        let addr = loop {
            let n = udp
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("DNS answer for {name}: {e}"));
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                break last_a(&buf[..n]);
            }
        };
        let result = match addr {
            None => Err(-1),
            Some(a) => match TcpStream::connect_timeout(
                &SocketAddr::V4(SocketAddrV4::new(a, 443)),
                Duration::from_secs(3),
            ) {
                Ok(_) => Ok(()),
                Err(e) => Err(e.raw_os_error().unwrap_or(-1)),
            },
        };
        let r = match result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.to_string(),
        };
        let a = addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
        writeln!(out, "TRIAL {name} {a} {r}").unwrap();
    }
    out.flush().unwrap();
}

// ----------------------------------------------------------------- world

/// Workload `allowed` may reach provider `race` (and the DNS server) and
/// nothing else; workload `denied` may reach anything but providers.
fn policy(cg: &CgroupGuard, hosts: &[&str]) -> String {
    let hosts: Vec<String> = hosts.iter().map(|h| toml_str(h)).collect();
    format!(
        r#"cgroup = {}

[resolver]
servers = [{}]
# The test namespace's DNS server (docs/names.md: answers are learned only
# from trusted resolvers).
trusted = ["192.0.2.1"]

[[providers]]
name = "race"
hosts = [{}]
ports = [443]

[[workloads]]
name = "allowed"
cgroup = "allowed"
allow = ["race", "192.0.2.1/32"]
other = "deny"

[[workloads]]
name = "denied"
cgroup = "denied"
llm = "deny"
other = "allow"
"#,
        toml_str(&cg.path().display().to_string()),
        toml_str(DEAD_DNS),
        hosts.join(", ")
    )
}

/// A namespace whose `10.77.0.0/16` and `10.78.0.0/16` are local (AnyIP).
fn netns() -> NetnsGuard {
    let ns = NetnsGuard::new();
    ns.ip(&["route", "add", "local", "10.77.0.0/16", "dev", "lo"]);
    ns.ip(&["route", "add", "local", "10.78.0.0/16", "dev", "lo"]);
    ns
}

/// The i-th address of the /16 `10.<second>.0.0`.
fn nth(second: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, second, (i / 250) as u8, (i % 250 + 1) as u8)
}

/// The answer address encoded in a name `n<i>-<second>.…` or `…` asked
/// by the race test, so that every answer is a new address.
fn addr_of_name(name: &str) -> Option<Ipv4Addr> {
    let first = name.split('.').next()?;
    let (i, second) = first.strip_prefix('n')?.split_once('-')?;
    Some(nth(second.parse().ok()?, i.parse().ok()?))
}

/// The kernel's counters (summed over CPUs) from the agent's pinned maps.
fn kernel_counters(agent: &Agent) -> Vec<u64> {
    let Some(entries) =
        bpf::pinned_map_path(agent.pin_path(), "COUNTERS").and_then(|p| bpf::pinned_map_dump(&p))
    else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|e| {
            e["values"]
                .as_array()
                .map(|vs| vs.iter().map(|x| x["value"].as_u64().unwrap_or(0)).sum())
                .unwrap_or(0)
        })
        .collect()
}

#[track_caller]
fn check(agent: &Agent, trials: &[Trial], want: Result<(), i32>, what: &str) {
    let wrong: Vec<&Trial> = trials.iter().filter(|t| t.result != want).collect();
    if !wrong.is_empty() {
        if let Ok(secs) = std::env::var("NAMES_DEBUG_PAUSE") {
            eprintln!("pausing {secs}s: pin path {}", agent.pin_path().display());
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(30)));
        }
        panic!(
            "{what}: {} of {} trials got the wrong verdict (want {want:?}); first: {:?}\nkernel counters: {:?}\n{}",
            wrong.len(),
            trials.len(),
            &wrong[..wrong.len().min(5)],
            kernel_counters(agent),
            agent.context()
        );
    }
}

// ----------------------------------------------------------------- tests

/// Every answer carries an address nobody has seen before (its last
/// octets are encoded in the question name's first label); the provider is
/// the exact host `api.race.test`, the question asks the upper-case,
/// trailing-dot variants too, through a CNAME from a per-trial alias.
fn race_answer(name: &str) -> Vec<Rr> {
    let Some(a) = addr_of_name(name) else {
        return vec![];
    };
    let first = name.split('.').next().unwrap_or_default();
    if name.to_ascii_lowercase().ends_with(".race.test") {
        // n<i>-<o>.race.test: asked directly (a wildcard host).
        vec![Rr::A(name.to_string(), a)]
    } else {
        // n<i>-<o>.alias.example CNAME api.race.test A <a>
        let _ = first;
        vec![
            Rr::Cname(name.to_string(), "API.race.test".into()),
            Rr::A("api.race.test".into(), a),
        ]
    }
}

fn trial_names(second: u8, n: u32, suffix: &str) -> Vec<String> {
    (0..n).map(|i| format!("n{i}-{second}.{suffix}")).collect()
}

#[test]
fn an_address_is_learned_before_the_answer_can_be_read_10000_trials() {
    require_root();
    let cg = CgroupGuard::new("names-race");
    let (allowed, denied) = (cg.child("allowed"), cg.child("denied"));
    let ns = netns();
    let _dns = DnsServer::start(&ns, 0, Box::new(race_answer));
    let _l = AnyListener::start(&ns);
    let agent = Agent::start(&policy(&cg, &["*.race.test"]));

    let n = 5000;
    let started = Instant::now();
    let t_allowed = run_client(&allowed, &ns, &trial_names(77, n, "race.test"));
    let t_denied = run_client(&denied, &ns, &trial_names(78, n, "race.test"));
    eprintln!("{} trials in {:?}", 2 * n, started.elapsed());
    for t in t_allowed.iter().chain(&t_denied) {
        assert_eq!(
            t.addr,
            addr_of_name(&t.name),
            "the client read another address than the server sent: {t:?}"
        );
    }
    check(
        &agent,
        &t_allowed,
        Ok(()),
        "workload allowing the provider, resolve then connect at once",
    );
    check(
        &agent,
        &t_denied,
        Err(libc::EPERM),
        "workload denying the provider, resolve then connect at once",
    );
}

/// `N<i>-<o>.Alias.Example` (mixed case) CNAME `API.race.test` (the exact
/// provider host in other case) A <fresh address>: the chain is followed
/// and case does not matter. Names no provider has are not learned.
#[test]
fn cname_chains_and_mixed_case_names_are_learned_and_other_names_are_not() {
    require_root();
    let cg = CgroupGuard::new("names-cname");
    let (allowed, denied) = (cg.child("allowed"), cg.child("denied"));
    let ns = netns();
    let _dns = DnsServer::start(
        &ns,
        300,
        Box::new(|name: &str| {
            let Some(a) = addr_of_name(name) else {
                return vec![];
            };
            if name.to_ascii_lowercase().ends_with(".other.example") {
                return vec![Rr::A(name.to_string(), a)];
            }
            vec![
                Rr::Cname(name.to_string(), "API.Race.TEST".into()),
                Rr::A("api.RACE.test".into(), a),
            ]
        }),
    );
    let _l = AnyListener::start(&ns);
    let agent = Agent::start(&policy(&cg, &["api.race.test"]));

    let n = 300;
    let t = run_client(&allowed, &ns, &trial_names(77, n, "Alias.Example"));
    check(
        &agent,
        &t,
        Ok(()),
        "CNAME chain to the exact provider host, allowing workload",
    );
    let t = run_client(&denied, &ns, &trial_names(78, n, "ALIAS.example"));
    check(
        &agent,
        &t,
        Err(libc::EPERM),
        "CNAME chain to the exact provider host, denying workload",
    );
    // Fresh addresses (second octet 77/78 again, but other indexes) for a
    // name that is no provider's: judged as other traffic.
    let names: Vec<String> = (n..2 * n)
        .map(|i| format!("n{i}-77.other.example"))
        .collect();
    let t = run_client(&allowed, &ns, &names);
    check(
        &agent,
        &t,
        Err(libc::EPERM),
        "a non-provider name, workload whose other traffic is denied",
    );
    let names: Vec<String> = (n..2 * n)
        .map(|i| format!("n{i}-78.other.example"))
        .collect();
    let t = run_client(&denied, &ns, &names);
    check(
        &agent,
        &t,
        Ok(()),
        "a non-provider name, workload whose other traffic is allowed",
    );
}
