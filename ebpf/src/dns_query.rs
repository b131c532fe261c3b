//! Pending DNS queries: what makes an answer one the kernel may learn from.
//!
//! The egress program (sni.rs `names_sni_egress`, every packet the
//! workloads' sockets send) calls [`sent`]: a UDP datagram to port 53, or a
//! TCP segment to port 53 whose payload starts a length-prefixed message,
//! that is a DNS query (QR = 0) to a trusted resolver (`RESOLVERS`, or any
//! when `NameConfig::any_resolver`) is remembered in `DNS_QUERIES` under
//! (socket cookie, id) with the resolver's address and an expiry of now +
//! `DNS_QUERY_TTL_NS`. A query to another resolver is counted
//! (`DNS_UNTRUSTED`) and not remembered.
//!
//! The ingress program (dns.rs) calls [`answered`] for every answer from
//! port 53 before it reads anything else: the receiving socket must have a
//! pending query with the answer's id, sent to the answer's source
//! address, not expired. The entry is then removed (one answer per query),
//! whatever the answer holds. An answer without one is counted
//! (`DNS_UNASKED`) and neither learned from nor sent to the agent.
//!
//! `DNS_QUERIES` is an LRU map shared by all sockets: a flood of queries
//! (any workload can send many) evicts the oldest pending entries, so
//! honest answers arriving after the flood are not learned (their
//! addresses are then denied like unknown ones until the next answer); it
//! never makes a forged answer learnable. The question is not compared:
//! a forger who can send from the resolver's address knows the question
//! too (docs/names.md).

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::SkBuffContext,
};
use llm_egress_common::{DNS_QUERY_TTL_NS, DnsQuery, DnsQueryKey, counter};

use crate::maps::{DNS_QUERIES, NAME_CFG, RESOLVERS, count};

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;
const DNS_PORT: u16 = 53;

/// `a` as the 16-byte form of `RESOLVERS` and `DnsQuery::addr`.
#[inline(always)]
fn mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// An egress packet: remembers it if it is a DNS query to a trusted
/// resolver (see the module comment). Never changes the packet's fate.
#[inline(always)]
pub fn sent(ctx: &SkBuffContext) {
    let _ = try_sent(ctx);
}

#[inline(always)]
fn try_sent(ctx: &SkBuffContext) -> Option<()> {
    let v4 = match ctx.skb.protocol() {
        p if p == (ETH_P_IP as u16).to_be() as u32 => true,
        p if p == (ETH_P_IPV6 as u16).to_be() as u32 => false,
        _ => return None,
    };
    let (hlen, proto) = if v4 {
        let b0: u8 = crate::packet::read(ctx, 0)?;
        (
            ((b0 & 0x0f) as usize) * 4,
            crate::packet::read::<u8>(ctx, 9)?,
        )
    } else {
        (40, crate::packet::read::<u8>(ctx, 6)?)
    };
    if (proto != IPPROTO_UDP && proto != IPPROTO_TCP) || hlen < 20 {
        return None;
    }
    let dport: u16 = crate::packet::read(ctx, hlen + 2)?;
    if u16::from_be(dport) != DNS_PORT {
        return None;
    }
    // Where the message starts.
    let msg = if proto == IPPROTO_UDP {
        hlen + 8
    } else {
        let doff: u8 = crate::packet::read(ctx, hlen + 12)?;
        // The 2-byte length prefix (RFC 1035 4.2.2), then the message.
        hlen + ((doff >> 4) as usize) * 4 + 2
    };
    // Id and flags: a query (QR = 0).
    let head: [u8; 4] = ctx.load(msg).ok()?;
    if head[2] & 0x80 != 0 {
        return None;
    }
    let addr = if v4 {
        mapped(crate::packet::read::<[u8; 4]>(ctx, 16)?)
    } else {
        crate::packet::read::<[u8; 16]>(ctx, 24)?
    };
    let cfg = NAME_CFG.get(0)?;
    // SAFETY: presence only.
    if cfg.any_resolver == 0 && unsafe { RESOLVERS.get(&addr) }.is_none() {
        count(counter::DNS_UNTRUSTED);
        return None;
    }
    // SAFETY: helpers on this program's own context, and without arguments.
    let (cookie, now) = unsafe { (bpf_get_socket_cookie(ctx.as_ptr()), bpf_ktime_get_ns()) };
    let key = DnsQueryKey {
        cookie,
        id: u16::from_ne_bytes([head[0], head[1]]),
        _pad: [0; 6],
    };
    let q = DnsQuery {
        addr,
        expires_ns: now + DNS_QUERY_TTL_NS,
    };
    if DNS_QUERIES.insert(&key, &q, 0).is_ok() {
        count(counter::DNS_QUERIES);
    }
    Some(())
}

/// Whether the DNS answer at `off` received by this program's socket
/// answers a pending query of that socket, sent to the answer's source
/// address; the query is consumed. `NameConfig::unasked` skips the check
/// (the agent's own test only). Not inlined: the verifier then checks it
/// once, and what it leaves on the stack (the answer's address) does not
/// split the states of the DNS walk that follows.
#[inline(never)]
pub fn answered(ctx: &SkBuffContext, off: usize) -> bool {
    if NAME_CFG.get(0).is_some_and(|c| c.unasked != 0) {
        return true;
    }
    let Ok(id) = ctx.load::<[u8; 2]>(off) else {
        return false;
    };
    // The IP version from the packet itself: a flag from the caller would
    // keep its two paths apart through the walk.
    let Some(b0) = crate::packet::read::<u8>(ctx, 0) else {
        return false;
    };
    let src = if b0 >> 4 == 4 {
        match crate::packet::read::<[u8; 4]>(ctx, 12) {
            Some(a) => mapped(a),
            None => return false,
        }
    } else {
        match crate::packet::read::<[u8; 16]>(ctx, 8) {
            Some(a) => a,
            None => return false,
        }
    };
    // SAFETY: helper on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = DnsQueryKey {
        cookie,
        id: u16::from_ne_bytes(id),
        _pad: [0; 6],
    };
    // SAFETY: value copied out at once.
    let Some(q) = (unsafe { DNS_QUERIES.get(&key) }).copied() else {
        return false;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if q.addr != src || q.expires_ns <= now {
        // Not consumed: the resolver's own answer may still come.
        return false;
    }
    let _ = DNS_QUERIES.remove(&key);
    true
}
