//! [`DnsServer`]: a real DNS server (dnsmasq) on loopback that answers a
//! few fixed names, for the agent's resolver.
//!
//! dnsmasq runs as a child process in the foreground (`--no-daemon`), reads
//! no configuration, no /etc/hosts and no /etc/resolv.conf, has no upstream
//! server, and listens on 127.0.0.1 only, on a free port. The names given to
//! [`DnsServer::start`] get their A record; every other name gets NXDOMAIN at
//! once (`--address=/#/`), so the agent's lookups of the built-in catalog's
//! hosts fail fast and nothing is ever forwarded. Its log (queries included)
//! is kept for panic messages. Drop stops it (SIGTERM, then SIGKILL); it also
//! gets SIGTERM if the thread that started it dies (PR_SET_PDEATHSIG).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{TempDir, tail, wait_until};

/// How long dnsmasq may take to answer its first query.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Ports tried before giving up (another process may take a free port
/// between our probe and dnsmasq's bind).
const PORT_ATTEMPTS: usize = 5;

/// A running dnsmasq on 127.0.0.1.
#[derive(Debug)]
pub struct DnsServer {
    child: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

/// The dnsmasq executable: on PATH, else /usr/sbin/dnsmasq (root's PATH
/// has /usr/sbin; a test runner's may not).
fn dnsmasq_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("dnsmasq"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin/dnsmasq")])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("dnsmasq not found (Debian package dnsmasq; `cargo xtask setup` installs it)")
        })
}

/// A loopback port that is free for UDP and for TCP right now.
fn free_dns_port() -> u16 {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind UDP 127.0.0.1:0: {e}"));
        let port = udp
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"))
            .port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("found no loopback port free for both UDP and TCP")
}

impl DnsServer {
    /// Starts dnsmasq answering `records` (name → IPv4 address) and waits
    /// until it answers the first of them.
    pub fn start(records: &[(&str, Ipv4Addr)]) -> DnsServer {
        crate::require_root();
        assert!(!records.is_empty(), "DnsServer needs at least one record");
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let dir = TempDir::new("llm-egress-test-dns");
            let log = dir.path().join("dnsmasq.log");
            let addr = SocketAddr::from(([127, 0, 0, 1], free_dns_port()));
            let mut server = DnsServer {
                child: Some(spawn(&log, addr, records)),
                addr,
                log,
                _dir: dir,
            };
            match server.wait_ready(records[0]) {
                Ok(()) => return server,
                // Dropping `server` stops it and removes its dir.
                Err(why) => failures.push(format!("{why}\n{}", server.log_tail())),
            }
        }
        panic!(
            "dnsmasq did not start in {PORT_ATTEMPTS} attempts:\n{}",
            failures.join("\n---\n")
        )
    }

    /// Where it listens (UDP and TCP): `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The dnsmasq process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What dnsmasq logged so far, one line per query and per answer.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of [`DnsServer::log`], for panic messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log(), 3000).to_string()
    }

    fn wait_ready(&mut self, (name, want): (&str, Ipv4Addr)) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last: String;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!("dnsmasq exited ({status})"));
            }
            match query_a(self.addr, name, Duration::from_millis(200)) {
                Ok(addrs) if addrs.contains(&want) => return Ok(()),
                Ok(addrs) => last = format!("{name} answered {addrs:?}, expected {want}"),
                Err(e) => last = e,
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "dnsmasq on {} did not answer within {READY_TIMEOUT:?}: {last}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child, not reaped yet (we hold it).
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let gone = wait_until(Duration::from_secs(2), Duration::from_millis(10), || {
                child.try_wait().ok().flatten()
            });
            if gone.is_none() {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
    }
}

fn spawn(log: &Path, addr: SocketAddr, records: &[(&str, Ipv4Addr)]) -> Child {
    let bin = dnsmasq_bin();
    let log_file =
        fs::File::create(log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
    let mut cmd = Command::new(&bin);
    cmd.args([
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        // The agent's own loopback traffic only: no DHCP, no pid file, and
        // no privilege drop (which would clear PR_SET_PDEATHSIG).
        "--pid-file",
        "--user=root",
        "--group=root",
        "--log-queries",
        "--log-facility=-",
        // Every name we do not list: NXDOMAIN, never forwarded.
        "--address=/#/",
    ])
    .arg(format!("--port={}", addr.port()));
    for (name, ip) in records {
        cmd.arg(format!("--address=/{name}/{ip}"));
    }
    cmd.stdin(Stdio::null())
        .stdout(
            log_file
                .try_clone()
                .unwrap_or_else(|e| panic!("cannot dup the dnsmasq log fd: {e}")),
        )
        .stderr(log_file);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
    // nothing of the parent: dnsmasq goes when the test thread that owns it
    // dies without dropping the guard.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
            Ok(())
        });
    }
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()))
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Asks `server` for the A records of `name` over UDP; the addresses of
/// the answer (empty for NXDOMAIN or no data), or why there was none.
pub fn query_a(server: SocketAddr, name: &str, timeout: Duration) -> Result<Vec<Ipv4Addr>, String> {
    let id: u16 = (std::process::id() as u16) ^ 0x5a5a;
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(&id.to_be_bytes());
    // Flags: recursion desired; 1 question.
    msg.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..64).contains(l))
            .ok_or_else(|| format!("{name:?}: bad label {label:?}"))?;
        msg.push(len);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.extend_from_slice(&[0, 0, 1, 0, 1]); // root, QTYPE A, QCLASS IN
    let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    sock.set_read_timeout(Some(timeout))
        .map_err(|e| format!("set_read_timeout: {e}"))?;
    sock.send_to(&msg, server)
        .map_err(|e| format!("send to {server}: {e}"))?;
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .map_err(|e| format!("no answer from {server}: {e}"))?;
    parse_a_answers(&buf[..n], id)
}

/// The A records of a DNS response with id `id`.
fn parse_a_answers(r: &[u8], id: u16) -> Result<Vec<Ipv4Addr>, String> {
    let short = || "short DNS response".to_string();
    if r.len() < 12 || u16::from_be_bytes([r[0], r[1]]) != id {
        return Err("not the answer to our query".into());
    }
    let (qd, an) = (
        u16::from_be_bytes([r[4], r[5]]),
        u16::from_be_bytes([r[6], r[7]]),
    );
    let mut i = 12;
    let skip_name = |mut i: usize| -> Result<usize, String> {
        loop {
            let len = *r.get(i).ok_or_else(short)? as usize;
            if len == 0 {
                return Ok(i + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Ok(i + 2);
            }
            i += 1 + len;
        }
    };
    for _ in 0..qd {
        i = skip_name(i)? + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        i = skip_name(i)?;
        let h = r.get(i..i + 10).ok_or_else(short)?;
        let (rtype, rdlen) = (
            u16::from_be_bytes([h[0], h[1]]),
            u16::from_be_bytes([h[8], h[9]]) as usize,
        );
        let data = r.get(i + 10..i + 10 + rdlen).ok_or_else(short)?;
        if rtype == 1 && rdlen == 4 {
            out.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + rdlen;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_a_answer_with_a_compressed_name() {
        let r: &[u8] = &[
            0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, // header
            3, b'l', b'l', b'm', 4, b't', b'e', b's', b't', 0, 0, 1, 0, 1, // question
            0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 10, 20, 0, 1, // answer
        ];
        assert_eq!(
            parse_a_answers(r, 0x1234),
            Ok(vec![Ipv4Addr::new(10, 20, 0, 1)])
        );
        assert!(parse_a_answers(r, 0x9999).is_err());
        assert!(parse_a_answers(&r[..30], 0x1234).is_err());
    }
}
