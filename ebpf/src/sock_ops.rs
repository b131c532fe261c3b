//! sock_ops: bytes and times of tracked connections (those `sock_addr`
//! allowed to a provider, recorded in `CONNS` by socket cookie).
//!
//! Callbacks used (include/uapi/linux/bpf.h, enum bpf_sock_ops_op), and
//! when each is turned on: sock_ops runs on every TCP connect, so every
//! callback a socket does not need is one hook run less per connection.
//! - `TCP_CONNECT_CB` (3): before the SYN; chooses the callbacks a socket
//!   needs until its handshake is done (`flags::connecting`). The
//!   connect-time verdict marks the sockets it tracks
//!   (`set_tracked_cb_flags`: `RTT_CB_FLAG`, which no callback before this
//!   one can use), so a socket without the mark is not tracked and needs no
//!   lookup. A tracked socket gets `STATE_CB` from here on, so a failed
//!   handshake is reported too. Where the kernel lacks the option
//!   (`CB_FLAGS_FALLBACK`), every socket is looked up instead;
//! - `ACTIVE_ESTABLISHED_CB` (4): handshake done; turns on what an open
//!   connection needs (`flags::established`);
//! - `RTT_CB` (12), from the handshake on: each RTT sample; at most every
//!   `CONN_UPDATE_NS` an update event with the byte counts so far. RTT
//!   samples come only when data the client sent is acknowledged: the
//!   ingress skb program (records.rs) sends the updates of received data
//!   (a streamed response), and both share the rate limit through
//!   `reported_ns`;
//! - `STATE_CB` (10), `arg(1)` = new state: on TCP_CLOSE (7) the summary
//!   event, then the entry is removed and every callback turned off (the
//!   RST of an abortive close and a later connect of the same socket run
//!   no sock_ops, and carry no stale mark).
//! Byte counts are the socket's `bytes_acked` (payload sent and
//! acknowledged) and `bytes_received` (payload received): TCP payload, so
//! TLS framing is included, IP/TCP headers are not. The kernel counts the
//! SYN and FIN sequence numbers too: the SYN is subtracted (its count is
//! taken at the handshake), a FIN adds 1 in its direction (documented).
//! - `RTO_CB` (8), on for every socket from `TCP_CONNECT_CB`, and
//!   `HDR_OPT_LEN_CB` (14), from the handshake on (the SYN carries no
//!   ClientHello) for tracked connections, sockets to port 443 and sockets
//!   to the ports of named proxies (`PROXY_PORTS`, one lookup at each
//!   untracked handshake: a CONNECT request is judged like a ClientHello): a socket
//!   whose ClientHello the SNI program denied (`SNI_STATE` = `DENIED`) gets
//!   `TCP_USER_TIMEOUT` = 1 ms at the next segment it tries to send, so TCP
//!   aborts it at its next timer run and the application sees ETIMEDOUT
//!   (~0.22 s after connect, measured), instead of retrying for seconds
//!   (docs/names.md, "Failing fast"). A socket judged and not denied has
//!   the per-segment callback turned off at its first segment after the
//!   verdict, except a tracked connection with a token budget: the SNI
//!   program denies it when the budget is spent (docs/limits.md, "Token
//!   budgets"), and it is aborted the same way at its next try.
//! - limited connections are paced at their pair's rate
//!   (`SO_MAX_PACING_RATE`, see `pace`).
//!
//! Per connection that makes five runs the kernel makes whatever the flags
//! (`TIMEOUT_INIT`, `RWND_INIT`, `NEEDS_ECN`, `TCP_CONNECT`,
//! `ACTIVE_ESTABLISHED`), and from the flags: for an untracked socket one
//! per segment sent until its SNI verdict on port 443; for a tracked
//! connection 2 state changes (established, closed) + RTT samples and
//! segments until its verdict (docs/benchmarks.md).
//! Apart from that, the program never affects the connection: it always
//! returns 1.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_ktime_get_ns, generated::bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use llm_egress_common::{CONN_UPDATE_NS, ConnEvent, counter, family, kind, mode, sni_state};

use crate::maps::{BANDWIDTH, CB_FLAGS_FALLBACK, CONNS, EVENTS, PROXY_PORTS, SNI_STATE, count};

const TCP_CONNECT_CB: u32 = 3;
const ACTIVE_ESTABLISHED_CB: u32 = 4;
const RTO_CB: u32 = 8;
const STATE_CB: u32 = 10;
const RTO_CB_FLAG: i32 = 1 << 0;
const HDR_OPT_LEN_CB: u32 = 14;
const HTTPS_PORT: u32 = 443;
const WRITE_HDR_OPT_CB_FLAG: i32 = 1 << 6;
const SOL_TCP: i32 = 6;
const SOL_SOCKET: i32 = 1;
const SO_MAX_PACING_RATE: i32 = 47;
const TCP_USER_TIMEOUT: i32 = 18;
/// include/uapi/linux/bpf.h: bpf_setsockopt's option for the callbacks.
const TCP_BPF_SOCK_OPS_CB_FLAGS: i32 = 1008;
const RTT_CB: u32 = 12;
const STATE_CB_FLAG: i32 = 1 << 2;
const RTT_CB_FLAG: i32 = 1 << 3;
const TCP_CLOSE: u32 = 7;
const AF_INET: u32 = 2;

#[sock_ops]
pub fn account_sock_ops(ctx: SockOpsContext) -> u32 {
    account(&ctx);
    1
}

#[inline(always)]
fn account(ctx: &SockOpsContext) {
    let op = ctx.op();
    if op != TCP_CONNECT_CB
        && op != ACTIVE_ESTABLISHED_CB
        && op != STATE_CB
        && op != RTT_CB
        && op != RTO_CB
        && op != HDR_OPT_LEN_CB
    {
        return;
    }
    // SAFETY: reading this program's own context.
    let cb_flags = unsafe { (*ctx.ops).bpf_sock_ops_cb_flags } as i32;
    // Tracked sockets got STATE_CB at their TCP_CONNECT_CB: an established
    // socket without it is not tracked, and needs no lookup.
    if op == ACTIVE_ESTABLISHED_CB && cb_flags & STATE_CB_FLAG == 0 {
        // The proxy check first: a named proxy may listen on 443 too.
        if to_proxy(ctx) || to_https(ctx) {
            let _ = ctx.set_cb_flags(flags::established(false));
        }
        return;
    }
    if op == TCP_CONNECT_CB && !CB_FLAGS_FALLBACK.get(0).is_some_and(|f| *f != 0) {
        let _ = ctx.set_cb_flags(flags::connecting(cb_flags & flags::TRACKED_MARK != 0));
        return;
    }
    if op == STATE_CB {
        if ctx.arg(1) != TCP_CLOSE {
            return;
        }
        let _ = ctx.set_cb_flags(0);
    }
    // A segment without payload (the handshake's ACK, a pure ACK) is not
    // the retransmitted ClientHello an SNI deny waits for.
    // SAFETY: reading this program's own context.
    if op == HDR_OPT_LEN_CB && unsafe { (*ctx.ops).skb_len } == 0 {
        return;
    }
    // SAFETY: helper on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if op == RTO_CB || op == HDR_OPT_LEN_CB {
        abort_if_denied(ctx, cookie, op);
        return;
    }
    let Some(entry) = CONNS.get_ptr_mut(&cookie) else {
        if op == TCP_CONNECT_CB {
            let _ = ctx.set_cb_flags(flags::connecting(false));
        }
        return;
    };
    // SAFETY: helpers without pointer arguments; `entry` points into the map
    // value, valid for this program run; `ctx.ops` is the kernel's context.
    unsafe {
        let now = bpf_ktime_get_ns();
        match op {
            TCP_CONNECT_CB => {
                let _ = ctx.set_cb_flags(flags::connecting(true));
            }
            ACTIVE_ESTABLISHED_CB => {
                let _ = ctx.set_cb_flags(flags::established(true));
                pace(ctx, (*entry).data.bandwidth_bucket);
                (*entry).data.established_ns = now;
                (*entry).data.reported_ns = now;
                (*entry).data.base_sent = (*ctx.ops).bytes_acked.min(1) as u8;
            }
            RTT_CB => {
                if now.wrapping_sub((*entry).data.reported_ns) >= CONN_UPDATE_NS {
                    (*entry).data.reported_ns = now;
                    // A reload may have changed the limit.
                    pace(ctx, (*entry).data.bandwidth_bucket);
                    read_bytes(ctx, entry);
                    send(entry, kind::CONN_UPDATE);
                }
            }
            _ => {
                // STATE_CB to TCP_CLOSE.
                (*entry).data.closed_ns = now;
                read_bytes(ctx, entry);
                send(entry, kind::CONN_SUMMARY);
                let _ = CONNS.remove(&cookie);
            }
        }
    }
}

/// The optional callbacks of a TCP socket, by phase.
mod flags {
    use super::*;

    /// Set by the connect-time verdict on a socket it tracks, read at its
    /// `TCP_CONNECT_CB`: no callback before that one uses it (RTT samples
    /// need an acknowledgement), and nothing else sets it before the
    /// handshake (`connecting` replaces it).
    pub const TRACKED_MARK: i32 = RTT_CB_FLAG;

    /// From `TCP_CONNECT_CB` to the handshake: a tracked provider
    /// connection needs its state changes (a failed handshake is reported
    /// and removed); every socket gets the (rare) RTO callback, so an SNI
    /// deny aborts it.
    #[inline(always)]
    pub fn connecting(tracked: bool) -> i32 {
        if tracked {
            STATE_CB_FLAG | RTO_CB_FLAG
        } else {
            RTO_CB_FLAG
        }
    }

    /// From `ACTIVE_ESTABLISHED_CB` on: a tracked connection also its RTT
    /// samples and the per-segment callback; a socket to port 443 (where
    /// TLS to a provider name on a shared address is expected) the
    /// per-segment callback, which aborts a denied one fast (it costs on
    /// every segment until the verdict, hence not on other ports: an SNI
    /// deny there still drops every packet, the client fails slower).
    #[inline(always)]
    pub fn established(tracked: bool) -> i32 {
        if tracked {
            STATE_CB_FLAG | RTT_CB_FLAG | RTO_CB_FLAG | WRITE_HDR_OPT_CB_FLAG
        } else {
            RTO_CB_FLAG | WRITE_HDR_OPT_CB_FLAG
        }
    }
}

/// Whether the socket connects to port 443, whichever half of
/// `remote_port` the kernel puts the port's 16 network-order bits in.
#[inline(always)]
fn to_https(ctx: &SockOpsContext) -> bool {
    let rp = ctx.remote_port();
    u32::from_be(rp) == HTTPS_PORT || u32::from(u16::from_be(rp as u16)) == HTTPS_PORT
}

/// Whether the socket connects to a port of a named proxy (`PROXY_PORTS`,
/// docs/names.md "Proxies"): its CONNECT request is judged like a
/// ClientHello, and a denied one is aborted as fast. A socket to a named
/// proxy's address on one of its ports is also marked `PROXY` in
/// `SNI_STATE`, so that the SNI program judges a first payload it cannot
/// read by `failure_mode` (one LPM lookup here, at the handshake, instead
/// of one per first payload there).
#[inline(always)]
fn to_proxy(ctx: &SockOpsContext) -> bool {
    let rp = ctx.remote_port();
    let port = if rp > 0xffff {
        u32::from_be(rp)
    } else {
        u32::from(u16::from_be(rp as u16))
    };
    // SAFETY: presence only.
    if unsafe { PROXY_PORTS.get(&port) }.is_none() {
        return false;
    }
    let Ok((slot, _)) = crate::policy::active() else {
        return true;
    };
    let mut addr = [0u8; 16];
    let fam = if ctx.family() == AF_INET {
        let a = ctx.remote_ip4().to_ne_bytes();
        addr[..4].copy_from_slice(&a);
        family::INET
    } else {
        let w = ctx.remote_ip6();
        if w[0] == 0 && w[1] == 0 && u32::from_be(w[2]) == 0x0000_ffff {
            // ::ffff:a.b.c.d: IPv4 on the wire.
            addr[..4].copy_from_slice(&w[3].to_ne_bytes());
            family::INET
        } else {
            let mut i = 0;
            while i < 4 {
                let b = w[i].to_ne_bytes();
                addr[i * 4] = b[0];
                addr[i * 4 + 1] = b[1];
                addr[i * 4 + 2] = b[2];
                addr[i * 4 + 3] = b[3];
                i += 1;
            }
            family::INET6
        }
    };
    if crate::connect_line::named_proxy(slot, fam, &addr, port as u16) {
        // SAFETY: helper on this program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = SNI_STATE.insert(&cookie, &sni_state::PROXY, 0);
    }
    true
}

/// Called by the connect hook on a socket it starts tracking: its mark
/// (`flags::TRACKED_MARK`), so that `TCP_CONNECT_CB` knows it is tracked
/// without a lookup. Where the kernel has no `TCP_BPF_SOCK_OPS_CB_FLAGS`
/// (before 6.14), `CB_FLAGS_FALLBACK` is set instead, before this socket's
/// own `TCP_CONNECT_CB` runs.
#[inline(always)]
pub fn set_tracked_cb_flags(ctx: &aya_ebpf::programs::SockAddrContext) {
    let mut flags = flags::TRACKED_MARK;
    // SAFETY: helper on the connecting socket, which the connect hook runs
    // under its lock; `flags` is a valid 4-byte option value.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_setsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            TCP_BPF_SOCK_OPS_CB_FLAGS,
            (&mut flags as *mut i32).cast(),
            4,
        )
    };
    if rc != 0
        && let Some(f) = CB_FLAGS_FALLBACK.get_ptr_mut(0)
    {
        // SAFETY: a plain store of a flag that only ever goes 0 → 1.
        unsafe { *f = 1 };
    }
}

/// At a retransmission timeout of a socket the SNI program denied: a user
/// timeout of 1 ms, which the timer handler finds expired at its next run.
#[inline(always)]
fn abort_if_denied(ctx: &SockOpsContext, cookie: u64, op: u32) {
    // SAFETY: value copied out at once.
    let state = unsafe { SNI_STATE.get(&cookie) }.copied();
    if state != Some(llm_egress_common::sni_state::DENIED) {
        // Judged and not denied: no more per-packet callbacks, except for
        // a connection with a token budget: when the budget is spent, the
        // egress program denies it at its next payload and this callback
        // aborts it at the try after.
        // SAFETY: presence and one field, copied out at once.
        // A tunnel (a CONNECT request judged) keeps it: its ClientHello
        // is judged next; so does a socket to a named proxy before its
        // first payload.
        if op == HDR_OPT_LEN_CB
            && state.is_some_and(|s| !sni_state::is_tunnel(s) && s != sni_state::PROXY)
            && !unsafe { CONNS.get(&cookie) }.is_some_and(|c| c.data.budget_bucket != 0)
        {
            // SAFETY: reading this program's own context.
            let flags = unsafe { (*ctx.ops).bpf_sock_ops_cb_flags } as i32;
            let _ = ctx.set_cb_flags(flags & !WRITE_HDR_OPT_CB_FLAG);
        }
        return;
    }
    let mut ms: i32 = 1;
    // SAFETY: helper on this program's own (locked, full) socket; `ms` is a
    // valid 4-byte option value.
    unsafe {
        aya_ebpf::helpers::generated::bpf_setsockopt(
            ctx.as_ptr(),
            SOL_TCP,
            TCP_USER_TIMEOUT,
            (&mut ms as *mut i32).cast(),
            4,
        );
    }
}

/// Paces a connection with a bandwidth limit at its pair's rate for sent
/// bytes (`SO_MAX_PACING_RATE`: TCP's own pacing, which needs no fq qdisc),
/// so that one connection sends evenly instead of in bursts the skb
/// program would drop (ebpf/src/limits.rs still polices the pair's
/// connections together). No limit, or audit mode: no pacing (~0).
#[inline(always)]
fn pace(ctx: &SockOpsContext, bucket: u64) {
    if bucket == 0 {
        return;
    }
    // SAFETY: value copied out at once.
    let limit = unsafe { BANDWIDTH.get(&bucket) }.copied();
    // bytes/s as an int (what bpf_setsockopt accepts); u32::MAX: unpaced.
    let mut rate: u32 = match limit {
        Some(l) if l.egress.per_ns != 0 && l.mode != mode::AUDIT => {
            l.egress.per_ns.min(u64::from(u32::MAX - 1)) as u32
        }
        _ => u32::MAX,
    };
    // SAFETY: helper on this program's own (locked, full) socket; `rate` is
    // a valid 4-byte option value.
    unsafe {
        aya_ebpf::helpers::generated::bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MAX_PACING_RATE,
            (&mut rate as *mut u32).cast(),
            4,
        );
    }
}

/// SAFETY: `entry` must point to a live `CONNS` value.
#[inline(always)]
unsafe fn read_bytes(ctx: &SockOpsContext, entry: *mut ConnEvent) {
    unsafe {
        let base = u64::from((*entry).data.base_sent);
        (*entry).data.bytes_sent = (*ctx.ops).bytes_acked.saturating_sub(base);
        (*entry).data.bytes_received = (*ctx.ops).bytes_received;
        (*entry).data.data_segs_in = (*ctx.ops).data_segs_in;
        (*entry).data.data_segs_out = (*ctx.ops).data_segs_out;
    }
}

/// SAFETY: `entry` must point to a live `CONNS` value.
#[inline(always)]
unsafe fn send(entry: *mut ConnEvent, event_kind: u32) {
    unsafe {
        (*entry).header.kind = event_kind;
        if EVENTS
            .output::<ConnEvent>(&*entry, crate::maps::wake_flags())
            .is_err()
        {
            count(counter::EVENTS_LOST);
        }
    }
}
