//! Stops one TCP connection of a workload, by socket cookie: the action of
//! `secrets = "block"` (docs/exact-tokens.md, "Secrets").
//!
//! Two steps, both the kernel's own ways to end a socket:
//!
//! 1. `SNI_STATE[cookie] = DENIED`, the mark an SNI deny leaves: the
//!    cgroup_skb egress program (ebpf/src/sni.rs) drops every later packet
//!    of the socket that carries payload, and sock_ops aborts it at its
//!    next retransmission timeout (`TCP_USER_TIMEOUT` = 1 ms). This is one
//!    map update, done first: what the socket has not yet handed to IP
//!    stays in it.
//! 2. `SOCK_DESTROY` over `NETLINK_SOCK_DIAG` (what `ss -K` does), in the
//!    network namespace of the process that wrote the request
//!    (`/proc/PID/ns/net`, entered by a short-lived thread): the socket is
//!    found among the namespace's TCP sockets by its cookie, and
//!    `tcp_abort` ends it: an RST to the peer, `ECONNABORTED` to the
//!    process at once (a client waiting for its response is not left
//!    waiting). Needs `CONFIG_INET_DIAG_DESTROY` and CAP_NET_ADMIN (kept
//!    by agents with an `exact_tokens` workload, run/start.rs) and
//!    CAP_SYS_ADMIN for `setns`; where it fails, step 1 still holds.
//!
//! The stop runs on the event reader's task and holds it for the destroy
//! (a thread spawn and one dump of the namespace's TCP sockets: included
//! in the delays measured in docs/exact-tokens.md).
//!
//! This module writes `SNI_STATE` from the event reader's task, not from the
//! `run` task that owns every other map write: the stop must not wait for
//! that task's turn. It only ever writes `DENIED` for one cookie, the value
//! the egress program itself writes; nothing else in the agent writes this
//! map.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use aya::maps::{HashMap, MapData};
use llm_egress_common::sni_state;

/// The socket-diag constants (linux/sock_diag.h, linux/inet_diag.h,
/// linux/netlink.h).
const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`.
const SOCKID: usize = 48;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const REQ: usize = 8 + SOCKID;

/// What a stop did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Marked and destroyed: no more bytes leave, the process sees the
    /// connection aborted.
    Destroyed,
    /// Marked only (the destroy failed): no more payload leaves; the
    /// process notices at its next send's retransmission timeout, or at
    /// its own timeout.
    Marked,
    /// The socket was no longer there to destroy: the connection had
    /// closed before the agent read the secret (the race, docs/exact-tokens.md).
    Gone,
    /// Neither worked.
    Failed,
}

impl Stopped {
    pub fn as_str(self) -> &'static str {
        match self {
            Stopped::Destroyed => "blocked",
            Stopped::Marked => "blocked_marked_only",
            Stopped::Gone => "closed_before_stop",
            Stopped::Failed => "block_failed",
        }
    }
}

/// The handle on `SNI_STATE` the stops write.
pub struct SocketStop {
    sni_state: HashMap<MapData, u64, u32>,
}

impl SocketStop {
    pub fn new(sni_state: HashMap<MapData, u64, u32>) -> Self {
        Self { sni_state }
    }

    /// Stops the connection with socket `cookie`, written by process `pid`.
    pub fn stop(&mut self, cookie: u64, pid: u32) -> Stopped {
        let marked = match self.sni_state.insert(cookie, sni_state::DENIED, 0) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(cookie, error = %e, "secret block: SNI_STATE not written");
                false
            }
        };
        match destroy_in_netns_of(pid, cookie) {
            Ok(true) => Stopped::Destroyed,
            Ok(false) => {
                tracing::debug!(cookie, pid, "secret block: socket not found to destroy");
                Stopped::Gone
            }
            Err(e) => {
                tracing::warn!(cookie, pid, error = %e, "secret block: SOCK_DESTROY failed");
                if marked {
                    Stopped::Marked
                } else {
                    Stopped::Failed
                }
            }
        }
    }
}

/// Destroys the TCP socket with `cookie` in the network namespace of `pid`;
/// Ok(false): no such socket there.
pub fn destroy_in_netns_of(pid: u32, cookie: u64) -> io::Result<bool> {
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    let own = std::fs::metadata("/proc/self/ns/net")?;
    let theirs = ns.metadata()?;
    use std::os::unix::fs::MetadataExt;
    if own.ino() == theirs.ino() && own.dev() == theirs.dev() {
        return destroy(cookie);
    }
    // setns changes the calling thread only: a thread of its own, which
    // ends with it.
    std::thread::Builder::new()
        .name("socket-stop".into())
        .spawn(move || {
            // SAFETY: a valid namespace fd; affects this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            destroy(cookie)
        })?
        .join()
        .map_err(|_| io::Error::other("the socket-stop thread panicked"))?
}

/// In the current thread's network namespace.
fn destroy(cookie: u64) -> io::Result<bool> {
    let sock = netlink()?;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        if let Some(id) = find(&sock, family, cookie)? {
            let req = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, family, &id);
            send(&sock, &req)?;
            let mut buf = vec![0u8; 8192];
            let n = recv(&sock, &mut buf)?;
            return match error_of(&buf[..n]) {
                Some(0) | None => Ok(true),
                Some(e) => Err(io::Error::from_raw_os_error(-e)),
            };
        }
    }
    Ok(false)
}

fn netlink() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(sock: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: a valid buffer of `msg.len()` bytes; the kernel is the peer
    // of an unbound netlink socket.
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(sock: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: a valid writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A netlink message with an `inet_diag_req_v2` for TCP, all states.
fn request(kind: u16, flags: u16, family: u8, id: &[u8; SOCKID]) -> Vec<u8> {
    let len = NLMSG_HDR + REQ;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // seq
    m.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states: all
    m.extend_from_slice(id);
    m
}

/// The `inet_diag_sockid` of the TCP socket with `cookie` among the
/// namespace's sockets of `family`.
fn find(sock: &OwnedFd, family: u8, cookie: u64) -> io::Result<Option<[u8; SOCKID]>> {
    send(
        sock,
        &request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            family,
            &[0; SOCKID],
        ),
    )?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut found = None;
    loop {
        let n = recv(sock, &mut buf)?;
        if n == 0 {
            return Ok(found);
        }
        let mut at = 0;
        while at + NLMSG_HDR <= n {
            let h = &buf[at..];
            let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let kind = u16::from_ne_bytes([h[4], h[5]]);
            if len < NLMSG_HDR || at + len > n {
                return Ok(found);
            }
            match kind {
                NLMSG_DONE => return Ok(found),
                NLMSG_ERROR => {
                    return match error_of(&h[..len]) {
                        Some(e) if e != 0 => Err(io::Error::from_raw_os_error(-e)),
                        _ => Ok(found),
                    };
                }
                _ => {}
            }
            // `struct inet_diag_msg`: family, state, timer, retrans, then
            // the sockid, whose last 8 bytes are the cookie (two u32, low
            // half first).
            // TIME_WAIT (6) and CLOSE (7): already ended, nothing to stop.
            let body = &h[NLMSG_HDR..len];
            if found.is_none() && body.len() >= 4 + SOCKID && body[1] != 6 && body[1] != 7 {
                let id: [u8; SOCKID] = body[4..4 + SOCKID].try_into().unwrap_or([0; SOCKID]);
                let lo = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]);
                let hi = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]);
                if (u64::from(hi) << 32 | u64::from(lo)) == cookie {
                    found = Some(id);
                }
            }
            at += (len + 3) & !3;
        }
    }
}

/// The error code of an `NLMSG_ERROR` message (0: an acknowledgement).
fn error_of(msg: &[u8]) -> Option<i32> {
    if msg.len() < NLMSG_HDR + 4 || u16::from_ne_bytes([msg[4], msg[5]]) != NLMSG_ERROR {
        return None;
    }
    let b = &msg[NLMSG_HDR..NLMSG_HDR + 4];
    Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_has_the_kernels_layout() {
        let mut id = [0u8; SOCKID];
        id[40] = 7;
        let m = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2, &id);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes([m[4], m[5]]), SOCK_DESTROY);
        assert_eq!(&m[16..20], &[2, 6, 0, 0]);
        assert_eq!(m[24 + 40], 7);
    }

    #[test]
    fn an_unknown_cookie_is_not_found_and_nothing_is_destroyed() {
        // The agent's own namespace; a cookie no socket has (cookies count
        // up from 1; this one is far away).
        match destroy(u64::MAX - 1) {
            Ok(found) => assert!(!found),
            // An unprivileged test environment may refuse the dump.
            Err(e) => eprintln!("sock_diag unavailable here: {e}"),
        }
    }
}
