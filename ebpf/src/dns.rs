//! cgroup_skb/ingress: learns provider addresses from DNS answers before the
//! application can read them.
//!
//! Hook: `BPF_CGROUP_INET_INGRESS` runs in `sk_filter()` when a packet is
//! queued to a socket of a task under the attach cgroup, i.e. before
//! `recvmsg()` can return it. The context is the `__sk_buff`; offset 0 of
//! `bpf_skb_load_bytes` is the IP header. DNS learning always keeps the
//! packet; the same program then polices bandwidth limits (limits.rs), the
//! only reason a received packet is ever dropped.
//!
//! For a UDP datagram from port 53 (IPv4 or IPv6 without extension headers,
//! not fragmented), and for a TCP segment from port 53 whose payload holds a
//! whole length-prefixed answer (RFC 1035 4.2.2; an answer that continues in
//! later segments is counted in `DNS_TCP_SPLIT` and not learned), the
//! program copies up to `DNS_BUF` bytes of the DNS message into per-CPU
//! scratch and reads it with masked indexes:
//!
//! 1. header: a response (QR) with opcode 0, rcode 0 and one question;
//! 2. the question name: its label hashes; the exact name and each of its
//!    suffixes (as a wildcard) are looked up in `NAMES` of the active slot;
//! 3. up to `DNS_MAX_ANSWERS` answer records, one per `bpf_loop` step: a
//!    CNAME whose owner is in the chain (the question name, then each CNAME
//!    target) adds its target to the chain, and if no name matched yet the
//!    target is looked up like the question; an A/AAAA record whose owner
//!    is in the chain, once some name of the chain matched, is learned:
//!    `LEARNED_*[address]` gets the matched `NAMES` key with an expiry of
//!    now + TTL clamped to `NAME_CFG`'s bounds. Other records are skipped.
//!
//! Compression pointers must point backwards (so they cannot loop) and at
//! most `DNS_MAX_HOPS` are followed per name. Anything the program cannot
//! read (see `dns_unparsed`) is counted in `DNS_UNPARSED` and the message is
//! sent to the agent as a `DNS_UNPARSED` event: the agent parses it and
//! writes the addresses, which is *not* race-free (docs/names.md).
//!
//! TCP segments with payload from other ports are handed to records.rs
//! (TLS records and updates of tracked provider connections).
//!
//! Errors never drop the packet: the program always returns 1 (DNS keeps
//! working when the agent cannot learn from it; failing closed would break
//! name resolution for every workload).

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_skb_load_bytes},
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use llm_egress_common::{
    DNS_BUF, DNS_EVENT_BYTES, DNS_MAX_ANSWERS, DNS_MAX_HOPS, DNS_MAX_LABELS, DnsEvent, EventHeader,
    LEARNED_NAMES, Learned, NameKey, SLOT_COUNT, counter, dns_unparsed, kind,
    names::{LABEL_INIT, fold, label_step, wildcard},
};

use crate::maps::{ACTIVE, DNS_SCRATCH, EVENTS, LEARNED_V4, LEARNED_V6, NAME_CFG, NAMES, count};

const MASK: usize = DNS_BUF - 1;
const _: () = assert!(DNS_BUF.is_power_of_two() && DNS_EVENT_BYTES == DNS_BUF);
const LMASK: usize = DNS_MAX_LABELS - 1;
const _: () = assert!(DNS_MAX_LABELS.is_power_of_two());
/// CNAME chain members remembered (question name included).
const MAX_CHAIN: usize = 4;

const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_TCP: u8 = 6;
const DNS_PORT: u16 = 53;
const TYPE_A: u16 = 1;
const TYPE_CNAME: u16 = 5;
const TYPE_AAAA: u16 = 28;
const CLASS_IN: u16 = 1;

/// Per-CPU scratch: the copied message, the label hashes of the last name
/// read, and the state of the bpf_loop walks. The walk state lives here and
/// not on the stack on purpose: the verifier does not track map values, so
/// counters kept here are unknown scalars to it and the loop callbacks
/// converge after one or two passes (counters on the stack made it walk
/// every value they could take, past the 1M instruction limit). Every index
/// into `buf` and `labels` is masked, so no value read here can make an
/// access unsafe; the bounds that matter for correctness are checked
/// against `len` as ordinary conditions.
#[repr(C)]
pub struct DnsScratch {
    pub buf: [u8; DNS_BUF],
    pub labels: [u64; DNS_MAX_LABELS],
    name: NameCtx,
    ans: AnswerCtx,
}

#[cgroup_skb(ingress)]
pub fn names_dns_ingress(ctx: SkBuffContext) -> i32 {
    let mut tracked = crate::limits::Tracked::unknown();
    let _ = try_dns(&ctx, &mut tracked);
    crate::limits::police(&ctx, false, &tracked)
}

/// Why parsing stopped early.
#[derive(Clone, Copy)]
enum Stop {
    /// Not something to parse (not DNS, no policy, not a provider name).
    Ignore,
    /// A provider answer (or unreadable question) the kernel cannot parse.
    Unparsed(u32),
}

#[inline(always)]
fn try_dns(ctx: &SkBuffContext, tracked: &mut crate::limits::Tracked) -> Result<(), Stop> {
    // 1. IP, then UDP or TCP headers, a few bytes at a time: this runs on
    // every packet the workloads receive.
    let (hlen, proto) = match ctx.skb.protocol() {
        p if p == (ETH_P_IP as u16).to_be() as u32 => {
            let b0: u8 = crate::packet::read(ctx, 0).ok_or(Stop::Ignore)?;
            let proto: u8 = crate::packet::read(ctx, 9).ok_or(Stop::Ignore)?;
            if proto != IPPROTO_UDP && proto != IPPROTO_TCP {
                return Err(Stop::Ignore);
            }
            let frag: u16 = crate::packet::read(ctx, 6).ok_or(Stop::Ignore)?;
            // MF set or a fragment offset: not a whole datagram.
            if u16::from_be(frag) & 0x3fff != 0 {
                return Err(Stop::Ignore);
            }
            (((b0 & 0x0f) as usize) * 4, proto)
        }
        p if p == (ETH_P_IPV6 as u16).to_be() as u32 => {
            let next: u8 = crate::packet::read(ctx, 6).ok_or(Stop::Ignore)?;
            if next != IPPROTO_UDP && next != IPPROTO_TCP {
                return Err(Stop::Ignore);
            }
            (40, next)
        }
        _ => return Err(Stop::Ignore),
    };
    if hlen < 20 {
        return Err(Stop::Ignore);
    }
    let total = ctx.len() as usize;
    let (off, msg_len) = if proto == IPPROTO_UDP {
        let sport: u16 = crate::packet::read(ctx, hlen).ok_or(Stop::Ignore)?;
        if u16::from_be(sport) != DNS_PORT {
            return Err(Stop::Ignore);
        }
        (hlen + 8, total.saturating_sub(hlen + 8))
    } else {
        // Segments without payload (handshake, ACKs) are neither answers
        // nor records: the data offset first.
        let doff: u8 = crate::packet::read(ctx, hlen + 12).ok_or(Stop::Ignore)?;
        let payload = hlen + ((doff >> 4) as usize) * 4;
        if total <= payload {
            return Err(Stop::Ignore);
        }
        // Ports and sequence number.
        let tcp: [u8; 8] = crate::packet::read(ctx, hlen).ok_or(Stop::Ignore)?;
        if u16::from_be_bytes([tcp[0], tcp[1]]) != DNS_PORT {
            // TLS records and updates of tracked connections (records.rs).
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            crate::records::received(ctx, payload, total - payload, seq, tracked);
            return Err(Stop::Ignore);
        }
        // DNS over TCP (RFC 1035 4.2.2): a 2-byte length, then the message.
        let len: u16 = ctx.load(payload).map_err(|_| Stop::Ignore)?;
        let len = u16::from_be(len) as usize;
        count(counter::DNS_RESPONSES);
        count(counter::DNS_TCP_RESPONSES);
        if payload + 2 + len > total {
            // The answer continues in later segments: not reassembled here
            // (counted; docs/names.md).
            count(counter::DNS_TCP_SPLIT);
            return Err(Stop::Ignore);
        }
        (payload + 2, len)
    };
    if proto == IPPROTO_UDP {
        count(counter::DNS_RESPONSES);
    }
    if msg_len < 12 {
        return Err(Stop::Ignore);
    }
    let r = parse(ctx, off, msg_len);
    if let Err(Stop::Unparsed(why)) = r {
        count(counter::DNS_UNPARSED);
        send_unparsed(ctx, off, msg_len, why);
    }
    r
}

/// Copies the message and parses it; see the module comment.
#[inline(always)]
fn parse(ctx: &SkBuffContext, off: usize, msg_len: usize) -> Result<(), Stop> {
    let active = ACTIVE.get(0).ok_or(Stop::Ignore)?;
    let slot = active.slot;
    if slot == 0 || slot >= SLOT_COUNT {
        return Err(Stop::Ignore);
    }
    let cfg = NAME_CFG.get(0).ok_or(Stop::Ignore)?;
    let seed = cfg.seed;
    if seed == 0 {
        return Err(Stop::Ignore);
    }
    let (ttl_min, ttl_max) = (cfg.ttl_min_s, cfg.ttl_max_s);
    let s = DNS_SCRATCH.get_ptr_mut(0).ok_or(Stop::Ignore)?;
    // SAFETY: per-CPU scratch of this CPU: this program runs in softirq
    // only (packets received), and never twice at once on one CPU.
    let s = unsafe { &mut *s };
    let len = if msg_len > DNS_BUF { DNS_BUF } else { msg_len };
    if len < 12 {
        return Err(Stop::Ignore);
    }
    // Equal to `len` (12..=DNS_BUF), written so that the verifier sees
    // 1..=DNS_BUF whatever the compiler did with the checks above.
    let copy = ((len - 1) & MASK) + 1;
    // SAFETY: `s.buf` has DNS_BUF bytes and 1 <= copy <= DNS_BUF.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            off as u32,
            s.buf.as_mut_ptr() as *mut _,
            copy as u32,
        )
    };
    if rc != 0 {
        return Err(Stop::Ignore);
    }

    // 2. Header.
    let flags = u16_at(s, 2);
    // QR = 1, opcode 0 (query), rcode 0 (no error).
    if flags & 0x8000 == 0 || flags & 0x7800 != 0 || flags & 0x000f != 0 {
        return Err(Stop::Ignore);
    }
    let qdcount = u16_at(s, 4);
    let ancount = u16_at(s, 6) as usize;
    if qdcount != 1 {
        return Err(Stop::Unparsed(dns_unparsed::QUESTIONS));
    }

    // 3. The question: is it a provider name?
    let (n, mut pos) = read_name(s, len, 12).map_err(Stop::Unparsed)?;
    if pos + 4 > len {
        return Err(Stop::Unparsed(dns_unparsed::TRUNCATED));
    }
    let qclass = u16_at(s, pos + 2);
    if qclass != CLASS_IN {
        return Err(Stop::Ignore);
    }
    pos += 4;
    let (qhash, matched) = lookup_name(&s.labels, n, seed, slot);

    // 4. Answers, one record per bpf_loop step (the verifier checks the
    // step once instead of once per record).
    // Volatile: see `read_name`.
    // SAFETY: valid, aligned fields of the scratch; helper without arguments.
    unsafe {
        let c = &mut s.ans;
        core::ptr::write_volatile(&mut c.pos, pos as u64);
        core::ptr::write_volatile(&mut c.len, len as u64);
        core::ptr::write_volatile(&mut c.ancount, ancount as u64);
        core::ptr::write_volatile(&mut c.seed, seed);
        core::ptr::write_volatile(&mut c.matched, matched);
        core::ptr::write_volatile(&mut c.slot, slot as u64);
        core::ptr::write_volatile(&mut c.chain[0], qhash);
        core::ptr::write_volatile(&mut c.chain_len, 1);
        core::ptr::write_volatile(&mut c.now, bpf_ktime_get_ns());
        core::ptr::write_volatile(&mut c.ttl_min, ttl_min as u64);
        core::ptr::write_volatile(&mut c.ttl_max, ttl_max as u64);
        core::ptr::write_volatile(&mut c.err, 0);
    }
    // SAFETY: `answer_step` is a bpf_loop callback; it finds its state in
    // the scratch.
    unsafe {
        bpf_loop(
            DNS_MAX_ANSWERS as u32,
            answer_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    // SAFETY: as above.
    let err = unsafe { core::ptr::read_volatile(&s.ans.err) };
    if err != 0 {
        return Err(Stop::Unparsed(err as u32));
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&s.ans.matched) } == 0 {
        return Err(Stop::Ignore);
    }
    if ancount > DNS_MAX_ANSWERS {
        return Err(Stop::Unparsed(dns_unparsed::TOO_MANY_ANSWERS));
    }
    if msg_len > DNS_BUF {
        // Answers the kernel did not see may follow (an EDNS message longer
        // than the copy): the agent reads the rest.
        return Err(Stop::Unparsed(dns_unparsed::TRUNCATED));
    }
    count(counter::DNS_PARSED);
    Ok(())
}

#[inline(always)]
fn byte(s: &DnsScratch, i: usize) -> u8 {
    s.buf[i & MASK]
}

#[inline(always)]
fn bytes_at(buf: &[u8; DNS_BUF], i: usize) -> u8 {
    buf[i & MASK]
}

#[inline(always)]
fn u16_at(s: &DnsScratch, i: usize) -> u16 {
    (byte(s, i) as u16) << 8 | byte(s, i + 1) as u16
}

#[inline(always)]
fn u32_at(s: &DnsScratch, i: usize) -> u32 {
    (u16_at(s, i) as u32) << 16 | u16_at(s, i + 2) as u32
}

/// State of one answer-section walk (`answer_step`).
#[repr(C)]
#[derive(Clone, Copy)]
struct AnswerCtx {
    pos: u64,
    len: u64,
    ancount: u64,
    seed: u64,
    /// The `NAMES` key the question (or, failing that, the first CNAME
    /// target that has one) matched: what addresses are learned for; 0: none.
    matched: u64,
    slot: u64,
    /// Full-name hashes of the question name and the CNAME targets so far.
    chain: [u64; MAX_CHAIN],
    chain_len: u64,
    now: u64,
    ttl_min: u64,
    ttl_max: u64,
    /// `dns_unparsed::*`, 0 while all is well.
    err: u64,
}

/// The per-CPU scratch of this CPU.
#[inline(always)]
fn scratch() -> Option<&'static mut DnsScratch> {
    let p = DNS_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch of this CPU, which only one run of this
    // program (softirq) uses at a time; callers never hold two references
    // across a call that takes another.
    Some(unsafe { &mut *p })
}

/// bpf_loop callback: reads answer record `index`. Returns 1 to stop.
#[inline(never)]
extern "C" fn answer_step(index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else { return 1 };
    if index >= s.ans.ancount {
        return 1;
    }
    match answer(s) {
        Ok(()) => 0,
        Err(why) => {
            s.ans.err = why as u64;
            1
        }
    }
}

/// Reads the answer record at `s.ans.pos` (see the module comment).
#[inline(always)]
fn answer(s: &mut DnsScratch) -> Result<(), u32> {
    let len = s.ans.len as usize;
    let (n, p) = read_name(s, len, s.ans.pos as usize)?;
    let owner = hash_labels(&s.labels, n, s.ans.seed);
    if p + 10 > len {
        return Err(dns_unparsed::TRUNCATED);
    }
    let rtype = u16_at(s, p);
    let rclass = u16_at(s, p + 2);
    let ttl = u32_at(s, p + 4) as u64;
    let rdlen = u16_at(s, p + 8) as usize;
    let rdata = p + 10;
    if rdata + rdlen > len {
        return Err(dns_unparsed::TRUNCATED);
    }
    s.ans.pos = (rdata + rdlen) as u64;
    if rclass != CLASS_IN {
        return Ok(());
    }
    let cl = s.ans.chain_len;
    let chain = s.ans.chain;
    let in_chain = owner == chain[0]
        || (cl > 1 && owner == chain[1])
        || (cl > 2 && owner == chain[2])
        || (cl > 3 && owner == chain[3]);
    if rtype == TYPE_CNAME {
        if !in_chain {
            return Ok(());
        }
        let (tn, _) = read_name(s, len, rdata)?;
        let (target, m) = lookup_name(&s.labels, tn, s.ans.seed, s.ans.slot as u32);
        if s.ans.matched == 0 {
            s.ans.matched = m;
        }
        if cl >= MAX_CHAIN as u64 {
            return Err(dns_unparsed::CHAIN);
        }
        s.ans.chain[(cl as usize) & (MAX_CHAIN - 1)] = target;
        s.ans.chain_len = cl + 1;
        return Ok(());
    }
    if rtype != TYPE_A && rtype != TYPE_AAAA {
        return Ok(());
    }
    if s.ans.matched == 0 {
        // No provider name in the chain (yet): nothing to learn.
        return Ok(());
    }
    if !in_chain {
        count(counter::DNS_OFF_CHAIN);
        return Ok(());
    }
    let (lo, hi, now, matched) = (s.ans.ttl_min, s.ans.ttl_max, s.ans.now, s.ans.matched);
    let ttl_s = if ttl < lo {
        lo
    } else if ttl > hi {
        hi
    } else {
        ttl
    };
    let expires = now + ttl_s * 1_000_000_000;
    if rtype == TYPE_A && rdlen == 4 {
        let addr = [
            byte(s, rdata),
            byte(s, rdata + 1),
            byte(s, rdata + 2),
            byte(s, rdata + 3),
        ];
        learn_v4(&addr, matched, expires, now);
    } else if rtype == TYPE_AAAA && rdlen == 16 {
        let mut addr = [0u8; 16];
        let mut j = 0;
        while j < 16 {
            addr[j] = byte(s, rdata + j);
            j += 1;
        }
        learn_v6(&addr, matched, expires, now);
    }
    Ok(())
}

/// State of one name walk (`name_step`).
#[repr(C)]
#[derive(Clone, Copy)]
struct NameCtx {
    pos: u64,
    len: u64,
    /// Offset after the name where it starts (0: not known yet).
    end: u64,
    hops: u64,
    /// Labels read (their hashes are in the scratch's `labels`).
    n: u64,
    /// Bytes of the current label still to hash, and its hash so far.
    remaining: u64,
    h: u64,
    /// 1 once the root label was reached.
    done: u64,
    /// `dns_unparsed::*`, 0 while all is well.
    err: u64,
}

/// Reads the name at `start` into `s.labels`: (label count, offset after
/// the name where it starts). One byte or pointer per bpf_loop step (a
/// step with an inner loop over a label made the verifier walk 63
/// iterations per call site).
#[inline(always)]
fn read_name(s: &mut DnsScratch, len: usize, start: usize) -> Result<(usize, usize), u32> {
    // Volatile: the callback changes the scratch behind this `&mut`, which
    // the compiler cannot see (bpf_loop gets no pointer to it).
    // SAFETY: valid, aligned fields of the scratch.
    unsafe {
        let c = &mut s.name;
        core::ptr::write_volatile(&mut c.pos, start as u64);
        core::ptr::write_volatile(&mut c.len, len as u64);
        core::ptr::write_volatile(&mut c.end, 0);
        core::ptr::write_volatile(&mut c.hops, 0);
        core::ptr::write_volatile(&mut c.n, 0);
        core::ptr::write_volatile(&mut c.remaining, 0);
        core::ptr::write_volatile(&mut c.done, 0);
        core::ptr::write_volatile(&mut c.err, 0);
    };
    // SAFETY: `name_step` is a bpf_loop callback; it finds its state in the
    // scratch.
    unsafe {
        bpf_loop(
            NAME_STEPS,
            name_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    // SAFETY: as above.
    let (err, done, n, end) = unsafe {
        (
            core::ptr::read_volatile(&s.name.err),
            core::ptr::read_volatile(&s.name.done),
            core::ptr::read_volatile(&s.name.n),
            core::ptr::read_volatile(&s.name.end),
        )
    };
    if err != 0 {
        return Err(err as u32);
    }
    if done == 0 {
        return Err(dns_unparsed::NAME);
    }
    Ok((n as usize, end as usize))
}

/// Steps of a name walk: 255 bytes of wire name, the pointers, the root.
const NAME_STEPS: u32 = (255 + DNS_MAX_HOPS + 2) as u32;

/// bpf_loop callback: one byte of a label, one length byte or one pointer.
#[inline(never)]
extern "C" fn name_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(s) = scratch() else { return 1 };
    let DnsScratch {
        buf,
        labels,
        name: c,
        ..
    } = s;
    name_byte(buf, labels, c)
}

#[inline(always)]
fn name_byte(buf: &[u8; DNS_BUF], labels: &mut [u64; DNS_MAX_LABELS], c: &mut NameCtx) -> i64 {
    let (pos, len) = (c.pos as usize, c.len as usize);
    if pos >= len {
        c.err = dns_unparsed::TRUNCATED as u64;
        return 1;
    }
    if c.remaining > 0 {
        c.h = label_step(c.h, bytes_at(buf, pos));
        c.pos = (pos + 1) as u64;
        c.remaining -= 1;
        if c.remaining == 0 {
            labels[(c.n as usize) & LMASK] = c.h;
            c.n += 1;
        }
        return 0;
    }
    let l = bytes_at(buf, pos) as usize;
    if l == 0 {
        if c.end == 0 {
            c.end = (pos + 1) as u64;
        }
        c.done = 1;
        return 1;
    }
    if l & 0xc0 == 0xc0 {
        if pos + 1 >= len {
            c.err = dns_unparsed::TRUNCATED as u64;
            return 1;
        }
        let target = (l & 0x3f) << 8 | bytes_at(buf, pos + 1) as usize;
        // Backwards only: a pointer can never loop.
        if target >= pos || c.hops >= DNS_MAX_HOPS as u64 {
            c.err = dns_unparsed::NAME as u64;
            return 1;
        }
        if c.end == 0 {
            c.end = (pos + 2) as u64;
        }
        c.hops += 1;
        c.pos = target as u64;
        return 0;
    }
    if l & 0xc0 != 0 || c.n >= DNS_MAX_LABELS as u64 || pos + 1 + l > len {
        c.err = dns_unparsed::NAME as u64;
        return 1;
    }
    c.h = LABEL_INIT;
    c.remaining = l as u64;
    c.pos = (pos + 1) as u64;
    0
}

/// (full-name hash, matched `NAMES` key or 0) of the `n` labels the last
/// name walk left: the exact name, else the longest suffix with a wildcard
/// entry in `slot`.
#[inline(always)]
pub(crate) fn lookup_name(
    labels: &[u64; DNS_MAX_LABELS],
    n: usize,
    seed: u64,
    slot: u32,
) -> (u64, u64) {
    let mut matched = 0u64;
    let mut acc = seed;
    let mut i = 0;
    while i < DNS_MAX_LABELS {
        if i < n {
            let k = n - 1 - i;
            acc = fold(acc, label_at(labels, k));
            let key = if k == 0 { acc } else { wildcard(acc) };
            // SAFETY: presence only.
            if unsafe {
                NAMES.get(&NameKey {
                    slot,
                    _pad: 0,
                    hash: key,
                })
            }
            .is_some()
            {
                // Later (longer) suffixes are more specific; the exact name last.
                matched = key;
            }
        }
        i += 1;
    }
    (acc, matched)
}

/// Label hash `i` as the last name walk left it (volatile: written by the
/// bpf_loop callback behind the compiler's back).
#[inline(always)]
fn label_at(labels: &[u64; DNS_MAX_LABELS], i: usize) -> u64 {
    // SAFETY: masked index into the array.
    unsafe { core::ptr::read_volatile(&labels[i & LMASK]) }
}

/// The full-name hash of the `n` labels in `s.labels`.
#[inline(always)]
fn hash_labels(labels: &[u64; DNS_MAX_LABELS], n: usize, seed: u64) -> u64 {
    let mut acc = seed;
    let mut i = 0;
    while i < DNS_MAX_LABELS {
        if i < n {
            acc = fold(acc, label_at(labels, n - 1 - i));
        }
        i += 1;
    }
    acc
}

/// Merges `hash` into a learned entry: the same name is refreshed, else an
/// empty or expired place is taken, else the one expiring first.
#[inline(always)]
fn merge(old: Option<&Learned>, hash: u64, expires: u64, now: u64) -> Learned {
    let mut v = match old {
        Some(o) => *o,
        None => Learned::default(),
    };
    let mut pick = LEARNED_NAMES;
    let mut i = 0;
    while i < LEARNED_NAMES {
        if v.names[i].hash == hash {
            pick = i;
        }
        i += 1;
    }
    if pick == LEARNED_NAMES {
        let mut oldest = u64::MAX;
        let mut i = 0;
        while i < LEARNED_NAMES {
            let e = &v.names[i];
            let when = if e.hash == 0 || e.expires_ns <= now {
                0
            } else {
                e.expires_ns
            };
            if when < oldest {
                oldest = when;
                pick = i;
            }
            i += 1;
        }
    }
    if pick < LEARNED_NAMES {
        let e = &mut v.names[pick];
        e.hash = hash;
        if expires > e.expires_ns || e.expires_ns <= now {
            e.expires_ns = expires;
        }
    }
    v
}

#[inline(always)]
fn learn_v4(addr: &[u8; 4], hash: u64, expires: u64, now: u64) {
    // SAFETY: value copied out at once by `merge`.
    let v = merge(unsafe { LEARNED_V4.get(addr) }, hash, expires, now);
    match LEARNED_V4.insert(addr, &v, 0) {
        Ok(()) => count(counter::DNS_LEARNED),
        Err(_) => count(counter::DNS_LEARN_FAILED),
    }
}

#[inline(always)]
fn learn_v6(addr: &[u8; 16], hash: u64, expires: u64, now: u64) {
    // SAFETY: as in `learn_v4`.
    let v = merge(unsafe { LEARNED_V6.get(addr) }, hash, expires, now);
    match LEARNED_V6.insert(addr, &v, 0) {
        Ok(()) => count(counter::DNS_LEARNED),
        Err(_) => count(counter::DNS_LEARN_FAILED),
    }
}

/// Queues the message for the agent (its first `DNS_EVENT_BYTES` bytes).
#[inline(always)]
fn send_unparsed(ctx: &SkBuffContext, off: usize, msg_len: usize, why: u32) {
    let Some(mut entry) = EVENTS.reserve::<DnsEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let len = if msg_len > DNS_EVENT_BYTES {
        DNS_EVENT_BYTES
    } else {
        msg_len
    };
    let p = entry.as_mut_ptr();
    // SAFETY: `p` is the reserved record of size_of::<DnsEvent>(); the copy
    // writes at most DNS_EVENT_BYTES bytes into `data`.
    unsafe {
        (*p).header = EventHeader {
            kind: kind::DNS_UNPARSED,
            time_ns: bpf_ktime_get_ns(),
            ..EventHeader::default()
        };
        (*p).data.len = len as u32;
        (*p).data.msg_len = msg_len as u32;
        (*p).data.why = why;
        (*p).data._pad = 0;
        let copy = ((len.wrapping_sub(1)) & MASK) + 1;
        if len == 0
            || bpf_skb_load_bytes(
                ctx.as_ptr() as *const _,
                off as u32,
                (*p).data.data.as_mut_ptr() as *mut _,
                copy as u32,
            ) != 0
        {
            (*p).data.len = 0;
        }
    }
    entry.submit(0);
}

/// The provider of `addr` through a learned name: the first unexpired name
/// of its `LEARNED_*` entry that `NAMES` of `slot` maps to a provider on
/// `port`. `NO_PROVIDER` (0) if none.
#[inline(always)]
pub fn learned_provider(slot: u32, v4: bool, addr: &[u8; 16], port: u16) -> u32 {
    let learned = if v4 {
        let a = [addr[0], addr[1], addr[2], addr[3]];
        // SAFETY: value copied out at once.
        unsafe { LEARNED_V4.get(&a) }.copied()
    } else {
        // SAFETY: as above.
        unsafe { LEARNED_V6.get(addr) }.copied()
    };
    let Some(learned) = learned else { return 0 };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let mut i = 0;
    while i < LEARNED_NAMES {
        let e = learned.names[i];
        i += 1;
        if e.hash == 0 || e.expires_ns <= now {
            continue;
        }
        // SAFETY: value copied out at once.
        let Some(d) = (unsafe {
            NAMES.get(&NameKey {
                slot,
                _pad: 0,
                hash: e.hash,
            })
        })
        .copied() else {
            continue;
        };
        if d.nports == 0 {
            return d.provider_id;
        }
        let mut j = 0;
        while j < llm_egress_common::MAX_PORTS {
            if (j as u16) < d.nports && d.ports[j] == port {
                return d.provider_id;
            }
            j += 1;
        }
    }
    0
}
