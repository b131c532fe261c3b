//! egress-probe: the client of the integration tests.
//!
//! ```text
//! egress-probe --cgroup DIR --netns NAME [--timeout-ms MS] COMMAND...
//!   connect ADDR:PORT          TCP connect, then close
//!   udp ADDR:PORT              one datagram with sendto() on an unconnected socket
//!   udp-connect ADDR:PORT      connect() a UDP socket, then send() one datagram
//!   connect-loop ADDR:PORT N   N times TCP connect + close; reports elapsed ns and failures
//! ```
//!
//! It first writes its own pid to DIR/cgroup.procs, then enters the network
//! namespace /var/run/netns/NAME (NAME may also be a path), so every socket
//! it makes is judged as one of that cgroup. IPv6 addresses are written in
//! brackets; an IPv6 address (also an IPv4-mapped one, `[::ffff:192.0.2.1]`)
//! always gets an AF_INET6 socket.
//!
//! Commands run in order; each prints one JSON line:
//! `{"cmd":"connect","addr":"192.0.2.1:8443","pid":123,"ok":true}` or
//! `{..,"ok":false,"errno":1,"error":"EPERM","message":"..."}`; every line
//! also carries `"cgroup"`, the probe's cgroup as /proc/self/cgroup shows it.
//! Exit status 0 whatever the results; 2 when the arguments are wrong or the
//! cgroup or namespace cannot be entered (message on stderr).

use std::{
    fs::File,
    io::{self, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::exit,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const USAGE: &str = "usage: egress-probe --cgroup DIR --netns NAME [--timeout-ms MS] \
(connect ADDR:PORT | udp ADDR:PORT | udp-connect ADDR:PORT | connect-loop ADDR:PORT N)...";

enum Cmd {
    Connect(SocketAddr),
    Udp(SocketAddr),
    UdpConnect(SocketAddr),
    ConnectLoop(SocketAddr, u64),
}

struct Args {
    cgroup: PathBuf,
    netns: PathBuf,
    timeout: Duration,
    cmds: Vec<Cmd>,
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("egress-probe: {msg}");
    exit(2)
}

fn parse_addr(s: Option<String>) -> SocketAddr {
    let s = s.unwrap_or_else(|| fail(format!("missing ADDR:PORT\n{USAGE}")));
    s.parse()
        .unwrap_or_else(|e| fail(format!("{s:?} is not ADDR:PORT ([v6]:PORT): {e}")))
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1);
    let (mut cgroup, mut netns, mut timeout) = (None, None, Duration::from_secs(3));
    let mut cmds = Vec::new();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cgroup" => cgroup = it.next().map(PathBuf::from),
            "--netns" => {
                netns = it.next().map(|n| {
                    if n.contains('/') {
                        PathBuf::from(n)
                    } else {
                        PathBuf::from("/var/run/netns").join(n)
                    }
                })
            }
            "--timeout-ms" => {
                let ms = it.next().and_then(|v| v.parse().ok());
                timeout = Duration::from_millis(
                    ms.unwrap_or_else(|| fail("--timeout-ms needs a number")),
                );
            }
            "connect" => cmds.push(Cmd::Connect(parse_addr(it.next()))),
            "udp" => cmds.push(Cmd::Udp(parse_addr(it.next()))),
            "udp-connect" => cmds.push(Cmd::UdpConnect(parse_addr(it.next()))),
            "connect-loop" => {
                let addr = parse_addr(it.next());
                let n = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| fail("connect-loop needs a count N"));
                cmds.push(Cmd::ConnectLoop(addr, n));
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                exit(0);
            }
            other => fail(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let cgroup = cgroup.unwrap_or_else(|| fail(format!("--cgroup DIR is required\n{USAGE}")));
    let netns = netns.unwrap_or_else(|| fail(format!("--netns NAME is required\n{USAGE}")));
    if cmds.is_empty() {
        fail(format!("no command\n{USAGE}"));
    }
    Args {
        cgroup,
        netns,
        timeout,
        cmds,
    }
}

/// Moves this process into the cgroup, then this (only) thread into the netns.
fn setup(args: &Args) {
    let procs = args.cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .unwrap_or_else(|e| fail(format!("cannot join cgroup {}: {e}", procs.display())));
    let file = File::open(&args.netns)
        .unwrap_or_else(|e| fail(format!("cannot open netns {}: {e}", args.netns.display())));
    // SAFETY: the fd is owned by `file` and valid during the call; the probe
    // is single-threaded, so the whole process is in the namespace after it.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        fail(format!(
            "setns {}: {}",
            args.netns.display(),
            io::Error::last_os_error()
        ));
    }
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(match e.kind() {
        // std's connect_timeout reports its own timeout without an errno.
        io::ErrorKind::TimedOut => libc::ETIMEDOUT,
        io::ErrorKind::WouldBlock => libc::EAGAIN,
        _ => libc::EIO,
    })
}

fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EAGAIN => "EAGAIN",
        libc::EIO => "EIO",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => return format!("E{errno}"),
    };
    name.to_string()
}

fn unspecified_like(addr: &SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("literal"),
    }
}

fn tcp_connect(addr: &SocketAddr, timeout: Duration) -> io::Result<()> {
    // std picks the socket family from the address: SocketAddr::V6 (also
    // ::ffff:a.b.c.d) gets AF_INET6.
    TcpStream::connect_timeout(addr, timeout).map(drop)
}

/// A blocking connect(), then close() with SO_LINGER 0 (a reset), so a
/// long loop does not run out of ephemeral ports to TIME_WAIT.
fn connect_and_reset(addr: &SocketAddr) -> io::Result<()> {
    let stream = TcpStream::connect(addr)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    drop(stream);
    Ok(())
}

fn udp_send(addr: &SocketAddr, connected: bool) -> io::Result<()> {
    let socket = UdpSocket::bind(unspecified_like(addr))?;
    if connected {
        socket.connect(addr)?;
        socket.send(b"egress-probe")?;
    } else {
        socket.send_to(b"egress-probe", addr)?;
    }
    Ok(())
}

fn result(base: Value, r: io::Result<()>) -> Value {
    let mut v = base;
    match r {
        Ok(()) => v["ok"] = json!(true),
        Err(e) => {
            let errno = errno_of(&e);
            v["ok"] = json!(false);
            v["errno"] = json!(errno);
            v["error"] = json!(errno_name(errno));
            v["message"] = json!(e.to_string());
        }
    }
    v
}

/// This process's cgroup v2 path (the `0::` line of /proc/self/cgroup).
fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string()
}

fn run(cmd: &Cmd, timeout: Duration) -> Value {
    let pid = std::process::id();
    let mut v = run_one(cmd, timeout, pid);
    v["cgroup"] = json!(own_cgroup());
    v
}

fn run_one(cmd: &Cmd, timeout: Duration, pid: u32) -> Value {
    match cmd {
        Cmd::Connect(a) => result(
            json!({"cmd": "connect", "addr": a.to_string(), "pid": pid}),
            tcp_connect(a, timeout),
        ),
        Cmd::Udp(a) => result(
            json!({"cmd": "udp", "addr": a.to_string(), "pid": pid}),
            udp_send(a, false),
        ),
        Cmd::UdpConnect(a) => result(
            json!({"cmd": "udp-connect", "addr": a.to_string(), "pid": pid}),
            udp_send(a, true),
        ),
        Cmd::ConnectLoop(a, n) => {
            let (mut failures, mut first_err) = (0u64, None);
            let start = Instant::now();
            for _ in 0..*n {
                if let Err(e) = connect_and_reset(a) {
                    failures += 1;
                    first_err.get_or_insert(e);
                }
            }
            let elapsed_ns = start.elapsed().as_nanos() as u64;
            let mut v = json!({
                "cmd": "connect-loop", "addr": a.to_string(), "pid": pid,
                "n": n, "failures": failures, "elapsed_ns": elapsed_ns,
            });
            v["ok"] = json!(failures == 0);
            if let Some(e) = first_err {
                let errno = errno_of(&e);
                v["errno"] = json!(errno);
                v["error"] = json!(errno_name(errno));
                v["message"] = json!(e.to_string());
            }
            v
        }
    }
}

fn main() {
    let args = parse_args();
    setup(&args);
    let stdout = io::stdout();
    for cmd in &args.cmds {
        let line = run(cmd, args.timeout);
        let mut out = stdout.lock();
        // A closed stdout is the caller's problem; nothing to report it to.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
