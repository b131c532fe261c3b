//! cgroup_skb/egress: judges TLS ClientHellos by their server name.
//!
//! Hook: `BPF_CGROUP_INET_EGRESS` runs in `ip_finish_output()` (and the
//! IPv6 equivalent) for every packet a socket below the attach cgroup
//! sends, before GSO segmentation: a ClientHello written in one `send()`
//! is normally one skb here however large. Offset 0 of
//! `bpf_skb_load_bytes` is the IP header. Return values: 1 pass; 2 drop
//! with congestion notification, which the kernel turns into
//! `NET_XMIT_DROP`: TCP takes it as a local send failure and retries from
//! its probe timer (every 500 ms, 15 times: 7.9 s measured). sock_ops cuts
//! that short for denied sockets (`TCP_USER_TIMEOUT`, see sock_ops.rs and
//! "Failing fast" in docs/names.md): ~0.22 s measured.
//!
//! Packets without TCP payload pass at once. Packets with payload of a
//! tracked connection have their TLS records counted (records.rs), and are
//! dropped (the socket then `DENIED`) when the connection's token budget is
//! spent (limits.rs, `budget_stops`). Per TCP socket
//! (`bpf_get_socket_cookie`), `SNI_STATE` remembers that the first payload
//! was seen (`SEEN`: later packets pass without a look) or denied
//! (`DENIED`: every later packet with payload is dropped; ACKs, FIN and RST
//! carry no data and pass). On the first payload:
//!
//! 1. TLS record header (type 22, version 3.x), handshake type 1
//!    (ClientHello); else, on a provider connection (`CONNS` has the
//!    cookie), count `SNI_NOT_TLS`; the address verdict stands.
//! 2. Skip version, random, session id, cipher suites, compression methods;
//!    walk up to `SNI_MAX_EXTENSIONS` extensions (one per `bpf_loop` step)
//!    for server_name (0) and encrypted_client_hello (0xfe0d).
//! 3. ECH, no server_name, a ClientHello whose extensions go on past the
//!    bytes of this first segment (or past `SNI_BUF`) before a server_name
//!    was found, or bad lengths: counted; the address verdict stands.
//! 4. The server name is hashed like DNS names (common/src/names.rs, one
//!    byte per `bpf_loop` step) and looked up in `NAMES` of the active slot
//!    (exact name, else the most specific wildcard). A provider's name on
//!    one of its ports is judged (ebpf/src/policy.rs, the connect hook's
//!    rule for providers; the workload's CIDR rules are not consulted: the
//!    name is more precise than the address): the socket's cgroup gives the
//!    workload (`bpf_skb_ancestor_cgroup_id`), then `PROVIDER_ACT` or the
//!    workload's `llm` action, `defaults.llm` for no workload. An SNI event
//!    reports every such verdict. Other names: counted, address verdict.
//!
//! Proxies (docs/names.md, "Proxies"): a first payload that is no
//! ClientHello is read as an HTTP `CONNECT host:port` request
//! (connect_line.rs); its host is judged like a server name, on the
//! CONNECT's port, and the socket then waits in `TUNNEL` (with that port)
//! for the ClientHello sent through the tunnel, judged on that port too. A
//! socket to a named proxy, marked `PROXY` by sock_ops at its handshake,
//! whose first payload is neither (nor a plain `GET http://` request) is
//! judged by `failure_mode`: `judge` with `payload::UNREADABLE`.
//!
//! Internal errors (no policy, no seed, a failed map update) pass the
//! packet: the connect hook has already applied the address verdict and
//! `failure_mode`; this hook only ever narrows it.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_get_socket_cookie, bpf_get_socket_uid, bpf_loop, bpf_skb_ancestor_cgroup_id,
            bpf_skb_cgroup_id, bpf_skb_load_bytes,
        },
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use llm_egress_common::{
    DNS_MAX_LABELS, EventHeader, MAX_PORTS, NO_PROVIDER, NameKey, SNI_BUF, SNI_MAX_EXTENSIONS,
    SNI_NAME_BYTES, SniDecision, SniEvent, action, counter, failure_mode, family, kind, mode,
    names::LABEL_INIT, names::label_step, payload as what, reason, sni_state, verdict,
};

use crate::connect_line::{Line, LineCtx};
use crate::maps::{CONNS, EVENTS, NAME_CFG, NAMES, SNI_SCRATCH, SNI_STATE, SNI_ZERO, count};
use crate::names::Fold;

const PASS: i32 = 1;
/// Drop (with congestion notification): see the module comment.
const DROP_CN: i32 = 2;
const MASK: usize = SNI_BUF - 1;
const _: () = assert!(SNI_BUF.is_power_of_two());
const LMASK: usize = DNS_MAX_LABELS - 1;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TLS_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ECH: u16 = 0xfe0d;
/// Longest DNS name in text form.
const MAX_NAME: usize = 253;

/// One socket's scratch while its first payload is read (`SNI_SCRATCH`,
/// keyed by socket cookie, removed after the read): the copied bytes, the
/// label hashes of the server name, and the state of the bpf_loop walks
/// (in a map value, not on the stack, for the reasons given in dns.rs).
/// Per socket and not per CPU: this program runs in process context and in
/// softirq (data TCP sends when an ACK arrives), so a read on one CPU can
/// be interrupted, or preempted, by another socket's, which must not
/// write over it. One socket's packets are never judged by two runs at
/// once: they are sent under its socket lock.
#[repr(C)]
pub struct SniScratch {
    pub buf: [u8; SNI_BUF],
    pub labels: [u64; DNS_MAX_LABELS],
    ext: ExtCtx,
    name: NameCtx,
    fold: Fold,
    line: LineCtx,
    out: Named5,
    /// The socket's `SNI_STATE` before this payload (0: none).
    state: u64,
    verdict: Outcome,
}

/// A verdict on its way to the event (see `judge`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Outcome {
    verdict: u64,
    reason: u64,
    workload: u64,
}

/// What a judged name is: (offset, length, provider, `payload::*`,
/// CONNECT target port), in the scratch on its way to the verdict.
#[repr(C)]
#[derive(Clone, Copy)]
struct Named5 {
    off: u64,
    len: u64,
    provider: u64,
    seen: u64,
    target: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct ExtCtx {
    pos: u64,
    /// Bytes of the ClientHello in `buf` (this segment, at most SNI_BUF).
    avail: u64,
    /// End of the extension list, by the ClientHello's own lengths.
    end: u64,
    /// Offset of the server_name extension's data (0: none seen).
    sni: u64,
    sni_len: u64,
    ech: u64,
    /// The walk reached the end of `avail` before `end`.
    split: u64,
    err: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct NameCtx {
    pos: u64,
    end: u64,
    /// Labels finished (hashes in `labels`).
    n: u64,
    /// Bytes in the current label, and its hash so far.
    len: u64,
    h: u64,
    done: u64,
    err: u64,
}

#[cgroup_skb(egress)]
pub fn names_sni_egress(ctx: SkBuffContext) -> i32 {
    // DNS queries the ingress program may learn the answers of.
    crate::dns_query::sent(&ctx);
    let mut tracked = crate::limits::Tracked::unknown();
    match try_sni(&ctx, &mut tracked) {
        PASS => crate::limits::police(&ctx, true, &tracked),
        v => v,
    }
}

/// What the first payload was.
enum Hello {
    /// A provider's name on one of its ports: (name offset, length,
    /// provider id, `payload::*`, CONNECT target port or 0).
    Provider(usize, usize, u32, u8, u16),
    /// A CONNECT request whose host is not judged (counted under this
    /// counter): the tunnel to this port follows, its ClientHello is read.
    Tunnel(u32, u16),
    /// A plain HTTP request to a proxy (counted under this counter).
    Plain(u32),
    /// Counted under this counter; the address verdict stands.
    Counted(u32),
    /// Nothing to count.
    Ignore,
}

#[inline(always)]
fn try_sni(ctx: &SkBuffContext, tracked: &mut crate::limits::Tracked) -> i32 {
    // 1. Whether the packet carries TCP payload, from three header bytes.
    // Packets without (the handshake, ACKs, FIN, RST) carry nothing to
    // judge or to stop: they pass before any map lookup or further read,
    // which keeps the cost of this program on a connect()/close() small.
    let v4 = match ctx.skb.protocol() {
        p if p == (ETH_P_IP as u16).to_be() as u32 => true,
        p if p == (ETH_P_IPV6 as u16).to_be() as u32 => false,
        _ => return PASS,
    };
    let (hlen, next) = if v4 {
        let Some(b0) = crate::packet::read::<u8>(ctx, 0) else {
            return PASS;
        };
        (
            ((b0 & 0x0f) as usize) * 4,
            crate::packet::read::<u8>(ctx, 9),
        )
    } else {
        (40, crate::packet::read::<u8>(ctx, 6))
    };
    if next != Some(IPPROTO_TCP) || hlen < 20 {
        return PASS;
    }
    let Some(doff) = crate::packet::read::<u8>(ctx, hlen + 12) else {
        return PASS;
    };
    let off = hlen + ((doff >> 4) as usize) * 4;
    let total = ctx.len() as usize;
    if total <= off {
        return PASS;
    }
    // 2. A payload: the destination, port and sequence number.
    let mut addr = [0u8; 16];
    let fam = if v4 {
        let Some(a) = crate::packet::read::<[u8; 4]>(ctx, 16) else {
            return PASS;
        };
        addr[0] = a[0];
        addr[1] = a[1];
        addr[2] = a[2];
        addr[3] = a[3];
        family::INET
    } else {
        let Some(a) = crate::packet::read::<[u8; 16]>(ctx, 24) else {
            return PASS;
        };
        addr = a;
        family::INET6
    };
    let Some(tcp) = crate::packet::read::<[u8; 8]>(ctx, hlen) else {
        return PASS;
    };
    let port = u16::from_be_bytes([tcp[2], tcp[3]]);
    // SAFETY: helper on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied out at once.
    let state = unsafe { SNI_STATE.get(&cookie) }.copied();
    if state == Some(sni_state::DENIED) {
        count(counter::SNI_DROPPED);
        return DROP_CN;
    }
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let conn = CONNS.get_ptr_mut(&cookie);
    tracked.set(conn);
    if let Some(conn) = conn {
        // SAFETY: `conn` points into a live CONNS value for this run.
        if crate::limits::budget_stops(unsafe { &*conn }) {
            let _ = SNI_STATE.insert(&cookie, &sni_state::DENIED, 0);
            return DROP_CN;
        }
        crate::records::sent(ctx, conn, off, total - off, seq);
    }
    // Payloads still to read: the first (no state, or `PROXY`: a socket to
    // a named proxy, marked by sock_ops at its handshake), and the one
    // after a CONNECT request (`TUNNEL`, docs/names.md "Proxies").
    let st = match state {
        None => 0,
        Some(st) if st == sni_state::PROXY || sni_state::is_tunnel(st) => st,
        Some(_) => return PASS,
    };
    let _ = SNI_STATE.insert(&cookie, &sni_state::SEEN, 0);
    let payload = total - off;

    let scratch = SNI_ZERO
        .get(0)
        .and_then(|zero| crate::maps::claim_scratch(&SNI_SCRATCH, cookie, zero));
    let Some(s) = scratch else {
        count(counter::SNI_BUSY);
        return PASS;
    };
    // Through the scratch (a map value): the verifier reads it back as one
    // unknown value instead of walking the whole read once per state.
    // SAFETY: this socket's scratch entry, used by this run only.
    unsafe { core::ptr::write_volatile(&mut (*s).state, u64::from(st)) };
    let hello = parse(ctx, s, off, payload, port);
    let ret = match outcome(s, hello, cookie, payload) {
        // 5. The verdict.
        Some(n) => match crate::policy::active() {
            Ok((slot, cfg)) => judge(ctx, s, cookie, slot, &cfg, &n, &addr, fam, port, off),
            Err(_) => PASS,
        },
        None => PASS,
    };
    let _ = SNI_SCRATCH.remove(&cookie);
    ret
}

/// What the parse of a payload leads to: a name (or an unreadable payload
/// to a named proxy) to judge, or None when it is counted and passes. A
/// CONNECT request not judged by its host leaves the socket in the tunnel
/// state (its ClientHello is read next).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn outcome(s: *mut SniScratch, hello: Hello, cookie: u64, payload: usize) -> Option<Named5> {
    match hello {
        Hello::Provider(o, l, p, w, t) => return Some(settle(s, o, l, p, w, t)),
        Hello::Tunnel(c, t) => {
            count(c);
            let _ = SNI_STATE.insert(&cookie, &sni_state::tunnel(t), 0);
            return None;
        }
        Hello::Plain(c) => {
            count(c);
            return None;
        }
        Hello::Counted(c) => count(c),
        Hello::Ignore => {}
    }
    // A first payload neither judged by a name nor read as a CONNECT
    // request: on a connection to a named proxy (`[[proxies]]`, on one of
    // its ports: sock_ops marked it `PROXY`), what the kernel cannot
    // judge, which `failure_mode` decides (`judge`). Anywhere else the
    // address verdict stands.
    // SAFETY: as in `settle`.
    if unsafe { core::ptr::read_volatile(&(*s).state) } != u64::from(sni_state::PROXY) {
        return None;
    }
    count(counter::PROXY_UNREADABLE);
    let shown = if payload > UNREADABLE_BYTES {
        UNREADABLE_BYTES
    } else {
        payload
    };
    Some(settle(s, 0, shown, NO_PROVIDER, what::UNREADABLE, 0))
}

/// Bytes of an unreadable first payload an event carries.
const UNREADABLE_BYTES: usize = 64;

/// A name to judge, through the scratch `s` (a map value): the verifier
/// then sees one unknown value where each way to a verdict (ClientHello,
/// tunnel, CONNECT, unreadable) gave constants of its own, and checks the
/// verdict path once, not once per way.
#[inline(always)]
fn settle(
    s: *mut SniScratch,
    off: usize,
    len: usize,
    provider: u32,
    seen: u8,
    target: u16,
) -> Named5 {
    let n = Named5 {
        off: off as u64,
        len: len as u64,
        provider: provider as u64,
        seen: seen as u64,
        target: target as u64,
    };
    // SAFETY: this socket's scratch entry, used by this run only; a valid,
    // aligned field.
    unsafe {
        core::ptr::write_volatile(&mut (*s).out, n);
        core::ptr::read_volatile(&(*s).out)
    }
}

/// The verdict on what the first payload named: (offset, length of the
/// name, provider, `payload::*`, CONNECT target port). `UNREADABLE` is
/// judged by `failure_mode` (closed: denied, like a denied name; `mode =
/// "audit"` makes that an audit); the others by the workload's word on the
/// provider. Every verdict is an event; a deny drops the packet and marks
/// the socket.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn judge(
    ctx: &SkBuffContext,
    s: *mut SniScratch,
    cookie: u64,
    slot: u32,
    cfg: &llm_egress_common::SlotConfig,
    n: &Named5,
    addr: &[u8; 16],
    fam: u8,
    port: u16,
    off: usize,
) -> i32 {
    let (name_off, name_len, provider, seen, target) = (
        n.off as usize,
        n.len as usize,
        n.provider as u32,
        n.seen as u8,
        n.target as u16,
    );
    let addr = *addr;
    // SAFETY: helpers on this program's own context.
    let own = unsafe { bpf_skb_cgroup_id(ctx.as_ptr() as *mut _) };
    // SAFETY: as above.
    let workload = crate::policy::workload_of(slot, own, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(ctx.as_ptr() as *mut _, level)
    });
    let (act, why) = if seen == what::UNREADABLE {
        let act = if cfg.failure_mode == failure_mode::CLOSED {
            action::DENY
        } else {
            action::ALLOW
        };
        (act, reason::PROXY_UNREADABLE)
    } else {
        crate::policy::provider_action(slot, cfg, workload, provider)
    };
    let v = match act {
        action::ALLOW => verdict::ALLOW,
        action::AUDIT => verdict::AUDIT,
        _ if cfg.mode == mode::AUDIT => verdict::AUDIT,
        _ => verdict::DENY,
    };
    let connect = seen == what::CONNECT;
    // (An unreadable payload was counted as `PROXY_UNREADABLE`.)
    if seen != what::UNREADABLE {
        count(match v {
            verdict::ALLOW if connect => counter::CONNECT_ALLOW,
            verdict::AUDIT if connect => counter::CONNECT_AUDIT,
            _ if connect => counter::CONNECT_DENY,
            verdict::ALLOW => counter::SNI_ALLOW,
            verdict::AUDIT => counter::SNI_AUDIT,
            _ => counter::SNI_DENY,
        });
    }
    // Through the scratch, like the name: one path on to the event, not
    // one per way to the verdict (workload or none, its word or its
    // default, the mode).
    let o = Outcome {
        verdict: v as u64,
        reason: why as u64,
        workload: workload.map(|w| w.workload_id).unwrap_or(0) as u64,
    };
    // SAFETY: this socket's scratch entry, used by this run only.
    let o = unsafe {
        core::ptr::write_volatile(&mut (*s).verdict, o);
        core::ptr::read_volatile(&(*s).verdict)
    };
    let v = o.verdict as u8;
    let d = Judged {
        generation: cfg.generation,
        workload_id: o.workload as u32,
        provider_id: provider,
        addr,
        port,
        verdict: v,
        reason: o.reason as u8,
        family: fam,
        payload: seen,
        target_port: target,
    };
    report(ctx, cookie, &d, off + name_off, name_len);
    if v == verdict::DENY {
        let _ = SNI_STATE.insert(&cookie, &sni_state::DENIED, 0);
        count(counter::SNI_DROPPED);
        return DROP_CN;
    }
    if connect {
        let _ = SNI_STATE.insert(&cookie, &sni_state::tunnel(target), 0);
    }
    PASS
}

/// On the stack: the scratch, for the bpf_loop callbacks.
#[repr(C)]
struct LoopCtx {
    scratch: *mut SniScratch,
}

/// Copies the first payload into the scratch at `sp` (this socket's entry,
/// live until the caller removes it) and reads the ClientHello (steps 1 to
/// 4 of the module comment), or the CONNECT request (connect_line.rs).
/// The payload after a CONNECT request (the scratch's `state` is a
/// tunnel's) has its ClientHello judged on the CONNECT's target port.
#[inline(always)]
fn parse(ctx: &SkBuffContext, sp: *mut SniScratch, off: usize, payload: usize, port: u16) -> Hello {
    // SAFETY: `sp` is that live entry, used by this run only.
    let s = unsafe { &mut *sp };
    let mut lc = LoopCtx { scratch: sp };
    // Opaque: knowing avail <= SNI_BUF, the compiler would drop the masks
    // of the reads below, which 6.1's verifier then refuses.
    let avail = crate::verifier::opaque(if payload > SNI_BUF { SNI_BUF } else { payload });
    let copy = crate::verifier::helper_len(avail, SNI_BUF);
    // SAFETY: `s.buf` has SNI_BUF bytes and 1 <= copy <= SNI_BUF.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            off as u32,
            s.buf.as_mut_ptr() as *mut _,
            copy,
        )
    };
    if rc != 0 {
        return Hello::Ignore;
    }
    let tls =
        avail >= 6 && byte(s, 0) == TLS_HANDSHAKE && byte(s, 1) == 3 && byte(s, 5) == CLIENT_HELLO;
    let (name, name_len, seen, on_port) = if tls {
        match hello_name(s, &mut lc, avail) {
            Ok((name, len)) if sni_state::is_tunnel(state_of(s)) => (
                name,
                len,
                what::TUNNEL_CLIENT_HELLO,
                sni_state::tunnel_port(state_of(s)),
            ),
            Ok((name, len)) => (name, len, what::CLIENT_HELLO, port),
            Err(h) => return h,
        }
    } else {
        let SniScratch { buf, line, .. } = &mut *s;
        let host = match crate::connect_line::read(buf, line, avail) {
            Line::Host(at, len, target) => (at, len, what::CONNECT, target),
            Line::IpLiteral(target) => {
                return Hello::Tunnel(counter::CONNECT_IP_LITERAL, target);
            }
            Line::Split => return Hello::Counted(counter::CONNECT_SPLIT),
            Line::Malformed => return Hello::Counted(counter::CONNECT_MALFORMED),
            Line::Plain => return Hello::Plain(counter::PROXY_PLAIN_HTTP),
            Line::Other => {
                // SAFETY: presence only.
                return if unsafe { CONNS.get(&cookie_of(ctx)) }.is_some() {
                    Hello::Counted(counter::SNI_NOT_TLS)
                } else {
                    Hello::Ignore
                };
            }
        };
        host
    };
    judge_name(s, &mut lc, name, name_len, seen, on_port)
}

/// The server name of the ClientHello in the scratch (`avail` bytes):
/// its offset and length, or what the ClientHello is instead.
#[inline(always)]
fn hello_name(s: &mut SniScratch, lc: &mut LoopCtx, avail: usize) -> Result<(usize, usize), Hello> {
    // The ClientHello: record header (5), handshake header (4), version
    // (2), random (32), then the variable parts.
    let hello_end = 9 + ((byte(s, 6) as usize) << 16 | u16_at(s, 7) as usize);
    let mut pos = 43;
    if pos + 1 > avail {
        return Err(Hello::Counted(counter::SNI_SPLIT));
    }
    pos += 1 + byte(s, pos) as usize;
    if pos + 2 > avail {
        return Err(Hello::Counted(counter::SNI_SPLIT));
    }
    pos += 2 + u16_at(s, pos) as usize;
    if pos + 1 > avail {
        return Err(Hello::Counted(counter::SNI_SPLIT));
    }
    pos += 1 + byte(s, pos) as usize;
    if pos + 2 > hello_end {
        // A ClientHello without extensions.
        return Err(Hello::Counted(counter::SNI_NO_SNI));
    }
    if pos + 2 > avail {
        return Err(Hello::Counted(counter::SNI_SPLIT));
    }
    let end = pos + 2 + u16_at(s, pos) as usize;
    if end > hello_end {
        return Err(Hello::Counted(counter::SNI_MALFORMED));
    }
    pos += 2;

    // 2. Extensions.
    // Volatile: the bpf_loop callback changes the scratch behind this
    // reference (see read_name in dns.rs).
    // SAFETY: valid, aligned fields of the scratch.
    unsafe {
        let c = &mut s.ext;
        core::ptr::write_volatile(&mut c.pos, pos as u64);
        core::ptr::write_volatile(&mut c.avail, avail as u64);
        core::ptr::write_volatile(&mut c.end, end as u64);
        core::ptr::write_volatile(&mut c.sni, 0);
        core::ptr::write_volatile(&mut c.sni_len, 0);
        core::ptr::write_volatile(&mut c.ech, 0);
        core::ptr::write_volatile(&mut c.split, 0);
        core::ptr::write_volatile(&mut c.err, 0);
    }
    // SAFETY: `ext_step` is a bpf_loop callback; it finds its state in the
    // scratch `lc` points to, and `lc` lives on this stack for the call.
    unsafe {
        bpf_loop(
            SNI_MAX_EXTENSIONS as u32,
            ext_step as *mut c_void,
            (lc as *mut LoopCtx).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let (epos, sni, sni_len, ech, split, err) = unsafe {
        (
            core::ptr::read_volatile(&s.ext.pos) as usize,
            core::ptr::read_volatile(&s.ext.sni) as usize,
            core::ptr::read_volatile(&s.ext.sni_len) as usize,
            core::ptr::read_volatile(&s.ext.ech),
            core::ptr::read_volatile(&s.ext.split),
            core::ptr::read_volatile(&s.ext.err),
        )
    };
    if ech != 0 {
        return Err(Hello::Counted(counter::SNI_ECH));
    }
    if sni == 0 {
        return Err(Hello::Counted(if err != 0 {
            counter::SNI_MALFORMED
        } else if split != 0 {
            counter::SNI_SPLIT
        } else if epos < end {
            // More extensions than the walk reads.
            counter::SNI_MALFORMED
        } else {
            counter::SNI_NO_SNI
        }));
    }

    // 3. server_name: list length (2), name type (1) = host_name (0),
    // name length (2), name.
    if sni_len < 5 || byte(s, sni + 2) != 0 {
        return Err(Hello::Counted(counter::SNI_MALFORMED));
    }
    let name_len = u16_at(s, sni + 3) as usize;
    let name = sni + 5;
    if name_len == 0 || name_len > MAX_NAME || name + name_len > sni + sni_len {
        return Err(Hello::Counted(counter::SNI_MALFORMED));
    }
    if name + name_len > avail {
        return Err(Hello::Counted(counter::SNI_SPLIT));
    }
    Ok((name, name_len))
}

/// A name read from a ClientHello or a CONNECT request (`seen`,
/// `payload::*`), judged on `port` (the CONNECT target's, or the
/// connection's): a provider, or what it is counted as.
#[inline(always)]
fn judge_name(
    s: &mut SniScratch,
    lc: &mut LoopCtx,
    name: usize,
    name_len: usize,
    seen: u8,
    port: u16,
) -> Hello {
    let connect = seen == what::CONNECT;
    let target = if seen == what::CLIENT_HELLO { 0 } else { port };
    match name_provider(s, lc, name, name_len, port) {
        Named::Provider(p) => Hello::Provider(name, name_len, p, seen, target),
        Named::Other | Named::Ignore if connect => Hello::Tunnel(counter::CONNECT_OTHER_NAME, port),
        Named::Malformed if connect => Hello::Counted(counter::CONNECT_MALFORMED),
        Named::Other => Hello::Counted(counter::SNI_OTHER_NAME),
        Named::Malformed => Hello::Counted(counter::SNI_MALFORMED),
        Named::Ignore => Hello::Ignore,
    }
}

/// A name's provider, by `NAMES`.
enum Named {
    /// A provider's name on one of its ports.
    Provider(u32),
    /// No provider's name, or not on its ports.
    Other,
    /// Empty labels, more than `DNS_MAX_LABELS` labels.
    Malformed,
    /// No policy or seed yet.
    Ignore,
}

/// The provider of the `name_len` bytes at `name` in the scratch, on
/// `port`: the name hashed label by label (`name_step`), folded and looked
/// up (`fold_step`, names.rs).
#[inline(always)]
fn name_provider(
    s: &mut SniScratch,
    lc: &mut LoopCtx,
    name: usize,
    name_len: usize,
    port: u16,
) -> Named {
    // 4. The name's hash and provider.
    // SAFETY: as above.
    unsafe {
        let c = &mut s.name;
        core::ptr::write_volatile(&mut c.pos, name as u64);
        core::ptr::write_volatile(&mut c.end, (name + name_len) as u64);
        core::ptr::write_volatile(&mut c.n, 0);
        core::ptr::write_volatile(&mut c.len, 0);
        core::ptr::write_volatile(&mut c.h, LABEL_INIT);
        core::ptr::write_volatile(&mut c.done, 0);
        core::ptr::write_volatile(&mut c.err, 0);
    }
    // SAFETY: as above.
    unsafe {
        bpf_loop(
            (MAX_NAME + 1) as u32,
            name_step as *mut c_void,
            (lc as *mut LoopCtx).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let (n, done, nerr) = unsafe {
        (
            core::ptr::read_volatile(&s.name.n) as usize,
            core::ptr::read_volatile(&s.name.done),
            core::ptr::read_volatile(&s.name.err),
        )
    };
    if nerr != 0 || done == 0 || n == 0 {
        return Named::Malformed;
    }
    let Some(ncfg) = NAME_CFG.get(0) else {
        return Named::Ignore;
    };
    let seed = ncfg.seed;
    let Ok((slot, _)) = crate::policy::active() else {
        return Named::Ignore;
    };
    if seed == 0 {
        return Named::Ignore;
    }
    // SAFETY: as above.
    unsafe {
        core::ptr::write_volatile(&mut s.fold, Fold::new(n as u64, seed, slot as u64, true));
    }
    // SAFETY: as above.
    unsafe {
        bpf_loop(
            DNS_MAX_LABELS as u32,
            fold_step as *mut c_void,
            (lc as *mut LoopCtx).cast(),
            0,
        )
    };
    // SAFETY: as above.
    let matched = unsafe { core::ptr::read_volatile(&s.fold.found) };
    if matched == 0 {
        return Named::Other;
    }
    // SAFETY: value copied out at once.
    let Some(d) = (unsafe {
        NAMES.get(&NameKey {
            slot,
            _pad: 0,
            hash: matched,
        })
    })
    .copied() else {
        return Named::Other;
    };
    let mut on_port = d.nports == 0;
    let mut i = 0;
    while i < MAX_PORTS {
        if (i as u16) < d.nports && d.ports[i] == port {
            on_port = true;
        }
        i += 1;
    }
    if !on_port {
        return Named::Other;
    }
    Named::Provider(d.provider_id)
}

/// The socket's state before this payload, from the scratch.
#[inline(always)]
fn state_of(s: &SniScratch) -> u32 {
    // SAFETY: a valid, aligned field of this run's scratch.
    unsafe { core::ptr::read_volatile(&s.state) as u32 }
}

#[inline(always)]
fn cookie_of(ctx: &SkBuffContext) -> u64 {
    // SAFETY: helper on this program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The scratch of a bpf_loop callback, from the `LoopCtx` its caller
/// passed.
#[inline(always)]
fn scratch(c: *mut c_void) -> Option<&'static mut SniScratch> {
    // SAFETY: `c` is the caller's `LoopCtx`, on its stack for the call.
    let p = unsafe { (*(c as *const LoopCtx)).scratch };
    if p.is_null() {
        return None;
    }
    // SAFETY: this socket's `SNI_SCRATCH` entry, which only this run uses;
    // the caller reads it with volatile loads after the loop.
    Some(unsafe { &mut *p })
}

#[inline(always)]
fn byte(s: &SniScratch, i: usize) -> u8 {
    s.buf[i & MASK]
}

#[inline(always)]
fn u16_at(s: &SniScratch, i: usize) -> u16 {
    (byte(s, i) as u16) << 8 | byte(s, i + 1) as u16
}

/// bpf_loop callback: one extension. Returns 1 to stop.
#[inline(never)]
extern "C" fn ext_step(_index: u64, ctx: *mut c_void) -> i64 {
    let Some(s) = scratch(ctx) else { return 1 };
    let (pos, avail, end) = (s.ext.pos as usize, s.ext.avail as usize, s.ext.end as usize);
    if pos >= end {
        return 1;
    }
    if pos + 4 > avail {
        s.ext.split = 1;
        return 1;
    }
    let t = u16_at(s, pos);
    let len = u16_at(s, pos + 2) as usize;
    let next = pos + 4 + len;
    if next > end {
        s.ext.err = 1;
        return 1;
    }
    if t == EXT_SERVER_NAME && s.ext.sni == 0 {
        s.ext.sni = (pos + 4) as u64;
        s.ext.sni_len = len as u64;
    } else if t == EXT_ECH {
        s.ext.ech = 1;
    }
    s.ext.pos = next as u64;
    0
}

/// bpf_loop callback: one byte of the server name. Returns 1 to stop.
#[inline(never)]
extern "C" fn name_step(_index: u64, ctx: *mut c_void) -> i64 {
    let Some(s) = scratch(ctx) else { return 1 };
    let SniScratch {
        buf,
        labels,
        name: c,
        ..
    } = s;
    let pos = c.pos as usize;
    if pos >= c.end as usize {
        // One trailing dot is allowed (the last label is then empty).
        if c.len > 0 && !push_label(labels, c) {
            return 1;
        }
        c.done = 1;
        return 1;
    }
    let b = buf[pos & MASK];
    if b == b'.' {
        if c.len == 0 {
            c.err = 1;
            return 1;
        }
        if !push_label(labels, c) {
            return 1;
        }
    } else {
        c.h = label_step(c.h, b);
        c.len += 1;
    }
    c.pos = (pos + 1) as u64;
    0
}

/// bpf_loop callback: one label of the server name into its hash and
/// lookups (ebpf/src/names.rs). Returns 1 to stop.
#[inline(never)]
extern "C" fn fold_step(_index: u64, ctx: *mut c_void) -> i64 {
    let Some(s) = scratch(ctx) else { return 1 };
    let SniScratch { labels, fold, .. } = s;
    fold.step(labels) as i64
}

/// Ends the current label; false (and `err`) past `DNS_MAX_LABELS`.
#[inline(always)]
fn push_label(labels: &mut [u64; DNS_MAX_LABELS], c: &mut NameCtx) -> bool {
    if c.n >= DNS_MAX_LABELS as u64 {
        c.err = 1;
        return false;
    }
    labels[(c.n as usize) & LMASK] = c.h;
    c.n += 1;
    c.h = LABEL_INIT;
    c.len = 0;
    true
}

/// A verdict, before it goes into an event (kept small: the event itself
/// is written in place in the ring buffer, never on the 512-byte stack).
struct Judged {
    generation: u64,
    workload_id: u32,
    provider_id: u32,
    addr: [u8; 16],
    port: u16,
    verdict: u8,
    reason: u8,
    family: u8,
    /// `payload::*`
    payload: u8,
    target_port: u16,
}

/// Sends the SNI event: `d` plus the name copied from the packet.
#[inline(always)]
fn report(ctx: &SkBuffContext, cookie: u64, d: &Judged, name_at: usize, name_len: usize) {
    let Some(mut entry) = EVENTS.reserve::<SniEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let p = entry.as_mut_ptr();
    // SAFETY: `p` is the reserved record of size_of::<SniEvent>(); the name
    // copy writes 1..=SNI_NAME_BYTES bytes into `name`.
    unsafe {
        let mut h = EventHeader {
            kind: kind::SNI_DECISION,
            time_ns: bpf_ktime_get_ns(),
            ..EventHeader::default()
        };
        h.cgroup_id = bpf_skb_cgroup_id(ctx.as_ptr() as *mut _);
        h.uid = bpf_get_socket_uid(ctx.as_ptr() as *mut _);
        // The task that connected, if the connect hook tracked the socket.
        if let Some(c) = CONNS.get(&cookie) {
            h.pid = c.header.pid;
            h.tgid = c.header.tgid;
            h.gid = c.header.gid;
            h.comm = c.header.comm;
        }
        (*p).header = h;
        let e: &mut SniDecision = &mut (*p).data;
        e.generation = d.generation;
        e.cookie = cookie;
        e.workload_id = d.workload_id;
        e.provider_id = d.provider_id;
        e.addr = d.addr;
        e.port = d.port;
        e.verdict = d.verdict;
        e.reason = d.reason;
        e.family = d.family;
        e.payload = d.payload;
        e.target_port = d.target_port;
        // Two stores, not a 6-byte memset: a loop the verifier would walk
        // on every path to here.
        e._pad = 0;
        e._pad2 = 0;
        e.name_len = 0;
        let copy = ((name_len.wrapping_sub(1)) & (SNI_NAME_BYTES - 1)) + 1;
        if bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            name_at as u32,
            (*p).data.name.as_mut_ptr() as *mut _,
            copy as u32,
        ) == 0
        {
            (*p).data.name_len = copy as u16;
        }
    }
    entry.submit(0);
}
