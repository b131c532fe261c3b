//! egress-probe: the client of the integration tests.
//!
//! ```text
//! egress-probe --cgroup DIR --netns NAME [--timeout-ms MS] COMMAND...
//!   connect ADDR:PORT          TCP connect, then close
//!   udp ADDR:PORT              one datagram with sendto() on an unconnected socket
//!   udp-connect ADDR:PORT      connect() a UDP socket, then send() one datagram
//!   connect-loop ADDR:PORT N   N times TCP connect + close; reports elapsed ns and failures
//!   echo-loop ADDR:PORT N      one TCP connection (TCP_NODELAY), N times: write 64 bytes,
//!                              read 64 bytes back; reports elapsed ns and failures
//!   connect-for ADDR:PORT MS [INTERVAL_US]
//!                              TCP connect + close in a loop for MS milliseconds, starting
//!                              one every INTERVAL_US microseconds (default 0: back to
//!                              back); counts successes, EPERM failures and other failures
//!   upload ADDR:PORT MS        connect, write 64 KiB buffers for MS ms, shut down the write
//!                              side, wait (up to 5 s) for the server to close
//!   download ADDR:PORT MS      connect, read and discard for MS ms
//!   socket KIND                socket() of another kind, then close; KIND is
//!                              ping4 / ping6 (SOCK_DGRAM, IPPROTO_ICMP / ICMPV6: also
//!                              sends one echo request to 127.0.0.1 / ::1),
//!                              raw4 / raw6 (SOCK_RAW, IPPROTO_ICMP / ICMPV6),
//!                              raw4-tcp (SOCK_RAW, IPPROTO_TCP: a hand-made SYN's socket),
//!                              packet (AF_PACKET, SOCK_DGRAM, ETH_P_ALL)
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
//!
//! `connect-for` adds `"ok"` (the count of successful connects, a number
//! here), `"eperm"`, `"other_failures"`, `"first_other_error"` (an errno
//! name, only when there was one), `"interval_us"` and `"elapsed_ns"`; a
//! connect that starts late does not make the next ones come faster. `upload` and
//! `download` add `"bytes"` (written, read), `"elapsed_ns"` (from the end
//! of connect() to the end of the last write, or of the read loop),
//! `"retrans"` and `"rtt_us"` (`tcpi_total_retrans` and `tcpi_rtt` of
//! TCP_INFO, read just before close), and `"write_error"` / `"read_error"`
//! when the transfer stopped on an error; when connect() fails they carry
//! `"ok":false` and the errno fields like `connect`. `download` also adds
//! `"steady_bytes"` and `"steady_ns"`: what was read after the first
//! quarter of MS (at most 1.5 s), when the socket buffers have filled.
//!
//! Exit status 0 whatever the results; 2 when the arguments are wrong or the
//! cgroup or namespace cannot be entered (message on stderr).

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::PathBuf,
    process::exit,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const USAGE: &str = "usage: egress-probe --cgroup DIR --netns NAME [--timeout-ms MS] \
(connect ADDR:PORT | udp ADDR:PORT | udp-connect ADDR:PORT | connect-loop ADDR:PORT N \
| connect-for ADDR:PORT MS [INTERVAL_US] | upload ADDR:PORT MS | download ADDR:PORT MS \
| socket ping4|ping6|raw4|raw6|raw4-tcp|packet)...";

enum Cmd {
    Connect(SocketAddr),
    Udp(SocketAddr),
    UdpConnect(SocketAddr),
    ConnectLoop(SocketAddr, u64),
    EchoLoop(SocketAddr, u64),
    ConnectFor(SocketAddr, Duration, Duration),
    Upload(SocketAddr, Duration),
    Download(SocketAddr, Duration),
    Socket(String),
}

/// The socket() arguments of `socket KIND`, and where a ping socket sends
/// its echo request.
fn socket_kind(kind: &str) -> Option<(i32, i32, i32, Option<SocketAddr>)> {
    let eth_p_all = i32::from((libc::ETH_P_ALL as u16).to_be());
    Some(match kind {
        "ping4" => (
            libc::AF_INET,
            libc::SOCK_DGRAM,
            libc::IPPROTO_ICMP,
            Some("127.0.0.1:0".parse().expect("literal")),
        ),
        "ping6" => (
            libc::AF_INET6,
            libc::SOCK_DGRAM,
            libc::IPPROTO_ICMPV6,
            Some("[::1]:0".parse().expect("literal")),
        ),
        "raw4" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP, None),
        "raw6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6, None),
        "raw4-tcp" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP, None),
        "packet" => (libc::AF_PACKET, libc::SOCK_DGRAM, eth_p_all, None),
        _ => return None,
    })
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

fn parse_ms(s: Option<String>, cmd: &str) -> Duration {
    let ms = s
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| fail(format!("{cmd} needs a duration MS (milliseconds)\n{USAGE}")));
    Duration::from_millis(ms)
}

fn parse_args() -> Args {
    let mut it = std::env::args().skip(1).peekable();
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
            name @ ("connect-loop" | "echo-loop") => {
                let addr = parse_addr(it.next());
                let n = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| fail(format!("{name} needs a count N")));
                cmds.push(if name == "connect-loop" {
                    Cmd::ConnectLoop(addr, n)
                } else {
                    Cmd::EchoLoop(addr, n)
                });
            }
            "connect-for" => {
                let addr = parse_addr(it.next());
                let dur = parse_ms(it.next(), "connect-for");
                // The optional INTERVAL_US: a number (a command never is).
                let interval = it
                    .next_if(|v| v.parse::<u64>().is_ok())
                    .map_or(0, |v| v.parse().unwrap_or(0));
                cmds.push(Cmd::ConnectFor(addr, dur, Duration::from_micros(interval)));
            }
            "upload" => {
                let addr = parse_addr(it.next());
                cmds.push(Cmd::Upload(addr, parse_ms(it.next(), "upload")));
            }
            "download" => {
                let addr = parse_addr(it.next());
                cmds.push(Cmd::Download(addr, parse_ms(it.next(), "download")));
            }
            "socket" => {
                let kind = it.next().unwrap_or_default();
                if socket_kind(&kind).is_none() {
                    fail(format!("unknown socket kind {kind:?}\n{USAGE}"));
                }
                cmds.push(Cmd::Socket(kind));
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

/// `socket KIND`: socket(), and for a ping socket one echo request (the
/// kernel fills in the identifier and checksum); then close.
fn other_socket(kind: &str) -> io::Result<()> {
    let (family, ty, protocol, echo_to) =
        socket_kind(kind).ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: plain syscall; the fd is closed below.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor this function owns.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let Some(to) = echo_to else { return Ok(()) };
    // An echo request: type 8 (ICMP) or 128 (ICMPv6), code 0.
    let echo: [u8; 12] = [
        if family == libc::AF_INET { 8 } else { 128 },
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        b'p',
        b'r',
        b'o',
        b'b',
    ];
    let to = sockaddr_of(&to);
    // SAFETY: sendto on the socket we own with a buffer and address of the
    // given lengths.
    let rc = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            echo.as_ptr().cast(),
            echo.len(),
            0,
            (&to.0 as *const libc::sockaddr_storage).cast(),
            to.1,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `sockaddr_storage` and its length for `addr`.
fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and aligned for it.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The size of every write of `upload` and every read of `download`.
const CHUNK: usize = 64 * 1024;
/// The longest a single write or read blocks, so a transfer ends on time
/// even when the peer (or a limiter) stalls it.
const STEP: Duration = Duration::from_millis(100);
/// How long `upload` waits for the server to close after its shutdown.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// `connect-for`: connect + reset in a loop until `dur` passed, one
/// connect every `interval` at most.
fn connect_for(addr: &SocketAddr, dur: Duration, interval: Duration, base: Value) -> Value {
    let (mut ok, mut eperm, mut other, mut first_other) = (0u64, 0u64, 0u64, None);
    let start = Instant::now();
    let deadline = start + dur;
    let mut next = start;
    loop {
        let now = Instant::now();
        if next > now {
            if next >= deadline {
                break;
            }
            std::thread::sleep(next - now);
        } else if now >= deadline {
            break;
        }
        // No catching up after a late start: never a burst of connects.
        next = next.max(now) + interval;
        match connect_and_reset(addr) {
            Ok(()) => ok += 1,
            Err(e) if errno_of(&e) == libc::EPERM => eperm += 1,
            Err(e) => {
                other += 1;
                first_other.get_or_insert_with(|| errno_name(errno_of(&e)));
            }
        }
    }
    let mut v = base;
    v["ok"] = json!(ok);
    v["eperm"] = json!(eperm);
    v["other_failures"] = json!(other);
    v["interval_us"] = json!(interval.as_micros() as u64);
    v["elapsed_ns"] = json!(start.elapsed().as_nanos() as u64);
    if let Some(name) = first_other {
        v["first_other_error"] = json!(name);
    }
    v
}

/// `tcpi_total_retrans` and `tcpi_rtt` (µs) of a connected TCP socket.
fn tcp_info(stream: &TcpStream) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt on a socket we own, writing at most `len` bytes
    // into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_total_retrans, info.tcpi_rtt))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Adds the transfer fields to `v`: bytes, elapsed, TCP_INFO and the error
/// (under `err_key`) that ended the transfer, if any.
fn transfer_fields(
    mut v: Value,
    stream: &TcpStream,
    bytes: u64,
    elapsed: Duration,
    err_key: &str,
    err: Option<io::Error>,
) -> Value {
    v["ok"] = json!(true);
    v["bytes"] = json!(bytes);
    v["elapsed_ns"] = json!(elapsed.as_nanos() as u64);
    match tcp_info(stream) {
        Ok((retrans, rtt_us)) => {
            v["retrans"] = json!(retrans);
            v["rtt_us"] = json!(rtt_us);
        }
        Err(e) => v["tcp_info_error"] = json!(e.to_string()),
    }
    if let Some(e) = err {
        v[err_key] = json!(errno_name(errno_of(&e)));
        v[&format!("{err_key}_message")] = json!(e.to_string());
    }
    v
}

/// `upload`: write as fast as the socket takes it for `dur`, then shut
/// down the write side and wait for the server to close.
fn upload(addr: &SocketAddr, dur: Duration, timeout: Duration, base: Value) -> Value {
    let mut stream = match TcpStream::connect_timeout(addr, timeout) {
        Ok(s) => s,
        Err(e) => return result(base, Err(e)),
    };
    let buf = vec![0x5a_u8; CHUNK];
    let (mut bytes, mut err) = (0u64, None);
    let start = Instant::now();
    let mut last_write = start;
    let deadline = start + dur;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        // SO_SNDTIMEO: a write returns what it wrote so far when it expires.
        if let Err(e) = stream.set_write_timeout(Some((deadline - now).min(STEP))) {
            err = Some(e);
            break;
        }
        match stream.write(&buf) {
            Ok(n) => {
                bytes += n as u64;
                last_write = Instant::now();
            }
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let elapsed = last_write - start;
    if err.is_none() {
        // The server reads to EOF, then closes: once read() sees that
        // close, it has counted every byte.
        let _ = stream.shutdown(Shutdown::Write);
        let close_deadline = Instant::now() + CLOSE_WAIT;
        let mut sink = [0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= close_deadline
                || stream
                    .set_read_timeout(Some((close_deadline - now).min(STEP)))
                    .is_err()
            {
                break;
            }
            match stream.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if is_timeout(&e) => {}
                Err(_) => break,
            }
        }
    }
    transfer_fields(base, &stream, bytes, elapsed, "write_error", err)
}

/// `download`: read and discard for `dur` (or until the server closes).
fn download(addr: &SocketAddr, dur: Duration, timeout: Duration, base: Value) -> Value {
    let mut stream = match TcpStream::connect_timeout(addr, timeout) {
        Ok(s) => s,
        Err(e) => return result(base, Err(e)),
    };
    let mut buf = vec![0u8; CHUNK];
    let (mut bytes, mut err, mut eof) = (0u64, None, false);
    let start = Instant::now();
    let deadline = start + dur;
    // Where the steady state starts: socket buffers fill in the first
    // instant, so a rate is measured from here.
    let warmup = start + (dur / 4).min(Duration::from_millis(1_500));
    let mut steady: Option<(u64, Instant)> = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if steady.is_none() && now >= warmup {
            steady = Some((bytes, now));
        }
        if let Err(e) = stream.set_read_timeout(Some((deadline - now).min(STEP))) {
            err = Some(e);
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => bytes += n as u64,
            Err(e) if is_timeout(&e) => {}
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let elapsed = start.elapsed();
    let mut v = transfer_fields(base, &stream, bytes, elapsed, "read_error", err);
    v["eof"] = json!(eof);
    if let Some((at, when)) = steady {
        v["steady_bytes"] = json!(bytes - at);
        v["steady_ns"] = json!(when.elapsed().as_nanos() as u64);
    }
    v
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

/// The line of a loop command: its count, failures, elapsed ns and the
/// first error.
fn loop_report(
    cmd: &str,
    a: &SocketAddr,
    pid: u32,
    n: u64,
    failures: u64,
    elapsed_ns: u64,
    first_err: Option<io::Error>,
) -> Value {
    let mut v = json!({
        "cmd": cmd, "addr": a.to_string(), "pid": pid,
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

/// One connection, `n` round trips of 64 bytes each way: ns from the first
/// write to the last read.
fn echo_loop(a: &SocketAddr, n: u64, timeout: Duration) -> io::Result<u64> {
    let mut s = TcpStream::connect_timeout(a, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    let (msg, mut buf) = ([7u8; 64], [0u8; 64]);
    let start = Instant::now();
    for _ in 0..n {
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
    }
    Ok(start.elapsed().as_nanos() as u64)
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
            loop_report("connect-loop", a, pid, *n, failures, elapsed_ns, first_err)
        }
        Cmd::EchoLoop(a, n) => {
            let (elapsed_ns, err) = match echo_loop(a, *n, timeout) {
                Ok(ns) => (ns, None),
                Err(e) => (0, Some(e)),
            };
            let failures = u64::from(err.is_some());
            loop_report("echo-loop", a, pid, *n, failures, elapsed_ns, err)
        }
        Cmd::ConnectFor(a, dur, interval) => connect_for(
            a,
            *dur,
            *interval,
            json!({"cmd": "connect-for", "addr": a.to_string(), "pid": pid}),
        ),
        Cmd::Upload(a, dur) => upload(
            a,
            *dur,
            timeout,
            json!({"cmd": "upload", "addr": a.to_string(), "pid": pid}),
        ),
        Cmd::Download(a, dur) => download(
            a,
            *dur,
            timeout,
            json!({"cmd": "download", "addr": a.to_string(), "pid": pid}),
        ),
        Cmd::Socket(kind) => result(
            json!({"cmd": "socket", "kind": kind, "pid": pid}),
            other_socket(kind),
        ),
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
