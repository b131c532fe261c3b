//! `cargo xtask demo`: the agent against a throw-away world, in seconds.
//!
//! Builds, then makes a cgroup below the cgroup2 mount (never the root
//! itself) with two workload cgroups, a network namespace with a veth pair
//! carrying 192.0.2.1 and 10.20.0.1 and a small HTTP listener on both, and
//! runs the agent with a demo policy attached to that cgroup only. Sample
//! clients (egress-probe and curl, moved into the workload cgroups and the
//! namespace) then connect; the demo prints what was allowed and blocked,
//! the agent's audit records, its metrics and `llm-egress status --once`.
//! Everything it made is removed at the end, also after an error or Ctrl-C.
//! Traffic never leaves the namespace; the agent resolves nothing (its
//! resolver is pointed at 127.0.0.1:9).

use std::{
    fs,
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    Workspace,
    agent::{self, Profile},
    cmd::{self, say, secs},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("demo: interrupted (Ctrl-C)");
    }
    Ok(())
}

/// Sleeps `d`, but returns an error as soon as Ctrl-C was pressed.
fn pause(d: Duration) -> Result<()> {
    let deadline = Instant::now() + d;
    while Instant::now() < deadline {
        check_interrupt()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    check_interrupt()
}

/// The demo policy: one provider, two workloads.
fn policy(cgroup: &Path) -> String {
    format!(
        r#"# The demo policy (docs/policy.md).
mode = "enforce"
cgroup = "{}"
failure_mode = "open"        # nothing stays enforced if the demo dies

[resolver]
servers = ["127.0.0.1:9"]    # resolve nothing: no DNS query leaves the machine

[defaults]
llm = "deny"
other = "allow"

[[providers]]
name = "demo-llm"
cidrs = ["10.20.0.0/16"]
ports = [443]

[[workloads]]
name = "chatbot"             # may use demo-llm, nothing else
cgroup = "chatbot"
allow = ["demo-llm"]
other = "deny"

[[workloads]]
name = "batch"               # may not use any model provider
cgroup = "batch"
allow = ["192.0.2.0/24"]
"#,
        cgroup.display()
    )
}

/// (workload, what, destination, command) of each sample.
const SAMPLES: &[(&str, &str, &str)] = &[
    ("chatbot", "demo-llm (allowed provider)", "10.20.0.1:443"),
    ("batch", "demo-llm (no provider allowed)", "10.20.0.1:443"),
    ("batch", "192.0.2.1 (allowed CIDR)", "192.0.2.1:80"),
    ("chatbot", "192.0.2.1 (other = \"deny\")", "192.0.2.1:80"),
];

pub fn demo(ws: &Workspace) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "demo: the agent loads BPF programs and the demo makes a cgroup and a network namespace, which needs root: run `sudo cargo xtask demo`"
        );
    }
    let (_, bin) = agent::build(ws, Profile::Debug)?;
    let probe = ws.bin(Profile::Debug, "egress-probe");
    if !probe.is_file() {
        bail!("demo: {} was not built", probe.display());
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let start = Instant::now();
    let result = World::make().and_then(|mut world| {
        let r = world.run(&bin, &probe);
        drop(world);
        r
    });
    say(format_args!(
        "demo: everything removed ({} in all)",
        secs(start.elapsed())
    ));
    result
}

/// What the demo made; `Drop` removes it in reverse order.
struct World {
    id: String,
    cgroup: PathBuf,
    netns: String,
    dir: PathBuf,
    pin: PathBuf,
    listener: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    agent: Option<Child>,
}

fn cgroup2_mount() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .context("demo: no cgroup2 file system is mounted")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl World {
    fn make() -> Result<World> {
        let id = std::process::id().to_string();
        let mount = cgroup2_mount()?;
        let mut w = World {
            cgroup: mount.join(format!("llm-egress-demo-{id}")),
            netns: format!("llme-demo-{id}"),
            dir: std::env::temp_dir().join(format!("llm-egress-demo-{id}")),
            pin: PathBuf::from(format!("/sys/fs/bpf/llm-egress-demo-{id}")),
            id,
            listener: None,
            agent: None,
        };
        assert!(
            w.cgroup != mount && w.cgroup.starts_with(&mount),
            "the demo cgroup is below the cgroup2 root"
        );
        fs::create_dir(&w.dir).with_context(|| format!("creating {}", w.dir.display()))?;
        fs::create_dir(&w.cgroup)
            .with_context(|| format!("creating cgroup {}", w.cgroup.display()))?;
        for child in ["chatbot", "batch"] {
            fs::create_dir(w.cgroup.join(child)).context("creating a workload cgroup")?;
        }
        ip(&["netns", "add", &w.netns])?;
        let ns = w.netns.clone();
        // This kernel may have no dummy interfaces: a veth pair, both ends
        // inside the namespace.
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &ns, "link", "add", "d0", "type", "veth", "peer", "name", "d0p",
        ])?;
        for args in [["link", "set", "d0", "up"], ["link", "set", "d0p", "up"]] {
            ip(&[&["-n", ns.as_str()][..], &args[..]].concat())?;
        }
        for addr in ["192.0.2.1/24", "10.20.0.1/16"] {
            ip(&["-n", &ns, "addr", "add", addr, "dev", "d0"])?;
        }
        w.listener = Some(listen(&ns, &["10.20.0.1:443", "192.0.2.1:80"])?);
        say(format_args!(
            "demo: made cgroup {} (workloads chatbot, batch), network namespace {} (192.0.2.1, 10.20.0.1; HTTP listeners on 10.20.0.1:443 and 192.0.2.1:80)",
            w.cgroup.display(),
            w.netns
        ));
        Ok(w)
    }

    fn run(&mut self, bin: &Path, probe: &Path) -> Result<()> {
        let config = self.dir.join("policy.toml");
        fs::write(&config, policy(&self.cgroup)).context("writing the demo policy")?;
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let audit = self.dir.join("audit.jsonl");
        let mut c = Command::new(bin);
        c.arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--pin-path")
            .arg(&self.pin)
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .arg("--audit-log")
            .arg(&audit)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(fs::File::create(self.dir.join("agent.log"))?);
        // SAFETY: prctl is async-signal-safe: the agent stops (and detaches)
        // if this process dies.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        say(format_args!("demo: starting the agent: {}", cmd::show(&c)));
        self.agent = Some(c.spawn().context("starting the agent")?);
        self.wait_ready(metrics)?;
        println!(
            "\n--- policy ({}) ---\n{}",
            config.display(),
            policy(&self.cgroup)
        );

        println!(
            "--- sample connections (egress-probe in the workload cgroup and the namespace) ---"
        );
        for (workload, what, dest) in SAMPLES {
            check_interrupt()?;
            let cgroup = self.cgroup.join(workload);
            let out = Command::new(probe)
                .args([
                    "--cgroup",
                    &cgroup.display().to_string(),
                    "--netns",
                    &self.netns,
                    "connect",
                    dest,
                ])
                .output()
                .context("running egress-probe")?;
            let line: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let verdict = if line["ok"] == true {
                "allowed   connected".to_string()
            } else if line["error"] == "EPERM" {
                "BLOCKED   connect() = EPERM (Operation not permitted)".to_string()
            } else {
                format!(
                    "failed    {}",
                    line["message"]
                        .as_str()
                        .unwrap_or(&String::from_utf8_lossy(&out.stderr))
                )
            };
            println!("  {workload:<8} → {what:<34} {dest:<14} {verdict}");
        }
        check_interrupt()?;
        let cgroup = self.cgroup.join("chatbot");
        let procs = cgroup.join("cgroup.procs");
        let mut curl = Command::new("ip");
        curl.args([
            "netns",
            "exec",
            &self.netns,
            "curl",
            "-sS",
            "--max-time",
            "3",
            "http://10.20.0.1:443/v1/models",
        ]);
        // SAFETY: only an open, a write and a close between fork and exec.
        unsafe { curl.pre_exec(move || fs::write(&procs, b"0")) };
        let out = curl
            .output()
            .context("running curl (Debian package curl)")?;
        println!(
            "  chatbot  → curl http://10.20.0.1:443/v1/models: {}",
            if out.status.success() {
                format!("answered {:?}", String::from_utf8_lossy(&out.stdout).trim())
            } else {
                String::from_utf8_lossy(&out.stderr).trim().to_string()
            }
        );

        // The kernel counters reach /metrics within a second; events sooner.
        pause(Duration::from_millis(1500))?;
        println!("\n--- audit log: decisions ({}) ---", audit.display());
        for line in fs::read_to_string(&audit).unwrap_or_default().lines() {
            let e: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            if e["event"] != "decision" {
                continue;
            }
            println!(
                "  {:<6} {:<8} → {}:{} provider={} reason={} process={} ({})",
                e["verdict"].as_str().unwrap_or("?"),
                e["workload"].as_str().unwrap_or("?"),
                e["dst_addr"].as_str().unwrap_or("?"),
                e["dst_port"],
                e["provider"].as_str().unwrap_or("-"),
                e["reason"].as_str().unwrap_or("?"),
                e["comm"].as_str().unwrap_or("?"),
                e["exe"].as_str().unwrap_or("?")
            );
        }
        check_interrupt()?;
        println!("\n--- metrics (http://{metrics}/metrics, excerpt) ---");
        let body = http_get(metrics, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default();
        for line in body.lines().filter(|l| {
            [
                "llm_egress_connections_total",
                "llm_egress_decisions_total",
                "llm_egress_bytes_total",
                "llm_egress_policy_generation",
            ]
            .iter()
            .any(|m| l.starts_with(m))
        }) {
            println!("  {line}");
        }
        check_interrupt()?;
        println!("\n--- llm-egress status --once ---");
        let status = Command::new(bin)
            .args([
                "status",
                "--once",
                "--metrics",
                &format!("http://{metrics}"),
            ])
            .output()?;
        print!("{}", String::from_utf8_lossy(&status.stdout));
        println!();
        Ok(())
    }

    fn wait_ready(&mut self, metrics: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            check_interrupt()?;
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                bail!(
                    "demo: the agent exited ({status}):\n{}",
                    fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
                );
            }
            if matches!(http_get(metrics, "/readyz"), Ok((200, _))) {
                say(format_args!(
                    "demo: agent ready, attached to {} only",
                    self.cgroup.display()
                ));
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "demo: the agent was not ready within 20 s:\n{}",
                    fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(agent.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(agent.try_wait(), Ok(None)) {
                let _ = agent.kill();
            }
            let _ = agent.wait();
            say("demo: agent stopped (programs detached)");
        }
        if let Some((stop, thread)) = self.listener.take() {
            stop.store(true, Ordering::SeqCst);
            let _ = thread.join();
        }
        if let Err(e) = ip(&["netns", "del", &self.netns]) {
            say(format_args!("demo: warning: {e:#}"));
        }
        for dir in [
            self.cgroup.join("chatbot"),
            self.cgroup.join("batch"),
            self.cgroup.clone(),
        ] {
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if Instant::now() > deadline => {
                        say(format_args!(
                            "demo: warning: cannot remove {}: {e}",
                            dir.display()
                        ));
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // Only ever our own directory below /sys/fs/bpf (empty after a clean
        // agent stop; this covers a killed agent).
        if self
            .pin
            .file_name()
            .is_some_and(|n| n.to_string_lossy() == format!("llm-egress-demo-{}", self.id))
        {
            let _ = fs::remove_dir_all(&self.pin);
        }
        let _ = fs::remove_dir_all(&self.dir);
        say(format_args!(
            "demo: removed network namespace {}, cgroup {}, {}",
            self.netns,
            self.cgroup.display(),
            self.dir.display()
        ));
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Listens on `addrs` inside the namespace (a thread that entered it) and
/// answers every connection with a tiny HTTP response, until stopped.
fn listen(netns: &str, addrs: &[&str]) -> Result<(Arc<AtomicBool>, JoinHandle<()>)> {
    let ns = fs::File::open(format!("/var/run/netns/{netns}")).context("opening the namespace")?;
    let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on a valid fd; changes this thread's namespace only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            let _ = tx.send(Err(std::io::Error::last_os_error()));
            return;
        }
        let listeners: std::io::Result<Vec<TcpListener>> = addrs
            .iter()
            .map(|a| {
                let l = TcpListener::bind(a.as_str())?;
                l.set_nonblocking(true)?;
                Ok(l)
            })
            .collect();
        let listeners = match listeners {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        while !flag.load(Ordering::SeqCst) {
            let mut idle = true;
            for l in &listeners {
                if let Ok((mut conn, _)) = l.accept() {
                    idle = false;
                    let _ = conn.set_nonblocking(false);
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(300)));
                    let mut buf = [0u8; 2048];
                    let _ = conn.read(&mut buf);
                    let body = "hello from demo-llm\n";
                    let _ = write!(
                        conn,
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    });
    match rx.recv() {
        Ok(Ok(())) => Ok((stop, thread)),
        Ok(Err(e)) => Err(e).context("demo: the listener cannot bind in the namespace"),
        Err(_) => bail!("demo: the listener thread ended"),
    }
}

/// `GET path` on the agent's loopback endpoint: status and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_policy_attaches_to_the_demo_cgroup_and_resolves_nothing() {
        let p = policy(Path::new("/sys/fs/cgroup/llm-egress-demo-1"));
        assert!(p.contains("cgroup = \"/sys/fs/cgroup/llm-egress-demo-1\""));
        assert!(p.contains("servers = [\"127.0.0.1:9\"]"));
        assert!(p.contains("failure_mode = \"open\""));
        assert_eq!(SAMPLES.len(), 4);
    }
}
