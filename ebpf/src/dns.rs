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
//!    `LEARNED_*[scope, address]` gets the matched `NAMES` key with an
//!    expiry of now + TTL clamped to `NAME_CFG`'s bounds. Other records are
//!    skipped. The scope is the receiving socket's workload (its cgroup's
//!    deepest ancestor that `WORKLOADS` of the active slot names; `NO_SCOPE`
//!    for none): the connect hook uses an entry only for tasks of the same
//!    workload, so one workload's answers never open a destination for
//!    another.
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
        generated::{bpf_loop, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id, bpf_skb_load_bytes},
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use llm_egress_common::{
    DNS_BUF, DNS_EVENT_BYTES, DNS_MAX_ANSWERS, DNS_MAX_HOPS, DNS_MAX_LABELS, DnsEvent, EventHeader,
    LEARNED_NAMES, Learned, LearnedKeyV4, LearnedKeyV6, NO_SCOPE, NameKey, SLOT_COUNT, counter,
    dns_unparsed, kind,
    names::{LABEL_INIT, label_step},
};

use crate::maps::{ACTIVE, DNS_SCRATCH, EVENTS, LEARNED_V4, LEARNED_V6, NAME_CFG, NAMES, count};
use crate::names::Fold;

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

/// Per-CPU scratch: the copied message, the label hashes of the name being
/// read, and the state of the walk (`Walk`). The walk state lives here and
/// not on the stack on purpose: the verifier does not track map values, so
/// what is kept here is an unknown scalar to it and the one `bpf_loop`
/// callback converges after a pass or two. Every index into `buf` and
/// `labels` is masked, so no value read here can make an access unsafe;
/// the bounds that matter for correctness are checked against `len` as
/// ordinary conditions.
#[repr(C)]
pub struct DnsScratch {
    pub buf: [u8; DNS_BUF],
    pub labels: [u64; DNS_MAX_LABELS],
    walk: Walk,
    /// The learned entry being merged (`merge`).
    learned: Learned,
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
    // 2. Only an answer to a query this socket sent to this address
    // (dns_query.rs): nothing else is read, learned or sent to the agent.
    if !crate::dns_query::answered(ctx, off) {
        count(counter::DNS_UNASKED);
        return Err(Stop::Ignore);
    }
    let r = parse(ctx, off, msg_len);
    if let Err(Stop::Unparsed(why)) = r {
        count(counter::DNS_UNPARSED);
        send_unparsed(ctx, off, msg_len, why);
    }
    r
}

/// Copies the message, checks its header and walks the rest with
/// `bpf_loop` (`walk_step`); see the module comment.
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
    // Whose the learned addresses are: the receiving socket's workload
    // (the deepest ancestor of its cgroup the slot names, as the connect
    // hook finds the connecting task's), NO_SCOPE for none. Written before
    // anything can fail: `send_unparsed` reads it for the agent.
    // SAFETY: helpers on this program's own context; `s` as below.
    unsafe {
        let skb = ctx.as_ptr() as *mut _;
        let mut scope = NO_SCOPE;
        crate::policy::workload_in(
            slot,
            bpf_skb_cgroup_id(skb),
            |level| bpf_skb_ancestor_cgroup_id(skb, level),
            &mut scope,
        );
        core::ptr::write_volatile(&mut (*s).walk.scope, scope);
    }
    let len = if msg_len > DNS_BUF { DNS_BUF } else { msg_len };
    if len < 12 {
        return Err(Stop::Ignore);
    }
    let copy = crate::verifier::helper_len(len, DNS_BUF);
    // SAFETY: `s` is this CPU's scratch: this program runs in softirq only
    // (packets received), and never twice at once on one CPU. `buf` has
    // DNS_BUF bytes and 1 <= copy <= DNS_BUF.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr() as *const _,
            off as u32,
            (*s).buf.as_mut_ptr() as *mut _,
            copy,
        )
    };
    if rc != 0 {
        return Err(Stop::Ignore);
    }
    // SAFETY: as above; the walk below changes the scratch only through
    // the pointer it fetches itself, after these reads.
    let (flags, qdcount, ancount) = unsafe {
        let b = &(*s).buf;
        (u16_at(b, 2), u16_at(b, 4), u16_at(b, 6) as u64)
    };
    // QR = 1, opcode 0 (query), rcode 0 (no error).
    if flags & 0x8000 == 0 || flags & 0x7800 != 0 || flags & 0x000f != 0 {
        return Err(Stop::Ignore);
    }
    if qdcount != 1 {
        return Err(Stop::Unparsed(dns_unparsed::QUESTIONS));
    }
    let answers = if ancount > DNS_MAX_ANSWERS as u64 {
        DNS_MAX_ANSWERS as u64
    } else {
        ancount
    };
    // SAFETY: as above. Volatile: `walk_step` reads the walk state behind
    // the compiler's back (bpf_loop gets no pointer to it). Field by field:
    // a `Walk` built on the stack first costs 200 bytes of the 512 the
    // program and its callback share.
    unsafe {
        let w = &mut (*s).walk;
        core::ptr::write_volatile(&mut w.phase, PHASE_NAME);
        core::ptr::write_volatile(&mut w.then, THEN_QUESTION);
        core::ptr::write_volatile(&mut w.pos, 12);
        core::ptr::write_volatile(&mut w.len, len as u64);
        core::ptr::write_volatile(&mut w.name_end, 0);
        core::ptr::write_volatile(&mut w.hops, 0);
        core::ptr::write_volatile(&mut w.n, 0);
        core::ptr::write_volatile(&mut w.remaining, 0);
        core::ptr::write_volatile(&mut w.steps, 0);
        core::ptr::write_volatile(&mut w.answers_left, answers);
        core::ptr::write_volatile(&mut w.seed, seed);
        core::ptr::write_volatile(&mut w.slot, slot as u64);
        core::ptr::write_volatile(&mut w.matched, 0);
        core::ptr::write_volatile(&mut w.chain_len, 0);
        core::ptr::write_volatile(&mut w.now, bpf_ktime_get_ns());
        core::ptr::write_volatile(&mut w.ttl_min, ttl_min as u64);
        core::ptr::write_volatile(&mut w.ttl_max, ttl_max as u64);
        core::ptr::write_volatile(&mut w.result, 0);
    }
    // SAFETY: `walk_step` is a bpf_loop callback; it finds its state in
    // the scratch.
    unsafe {
        bpf_loop(
            WALK_STEPS,
            walk_step as *mut c_void,
            core::ptr::null_mut(),
            0,
        );
    }
    // SAFETY: as above.
    let (phase, result, matched) = unsafe {
        (
            core::ptr::read_volatile(&(*s).walk.phase),
            core::ptr::read_volatile(&(*s).walk.result),
            core::ptr::read_volatile(&(*s).walk.matched),
        )
    };
    if phase == PHASE_IGNORE {
        return Err(Stop::Ignore);
    }
    if phase != PHASE_DONE {
        // The step budget ran out (cannot happen within the bounds above):
        // the agent reads it.
        return Err(Stop::Unparsed(dns_unparsed::NAME));
    }
    if result != 0 {
        return Err(Stop::Unparsed(result as u32));
    }
    if matched == 0 {
        return Err(Stop::Ignore);
    }
    if ancount > DNS_MAX_ANSWERS as u64 {
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
fn byte(buf: &[u8; DNS_BUF], i: u64) -> u8 {
    buf[(i as usize) & MASK]
}

#[inline(always)]
fn u16_at(buf: &[u8; DNS_BUF], i: u64) -> u16 {
    (byte(buf, i) as u16) << 8 | byte(buf, i + 1) as u16
}

#[inline(always)]
fn u32_at(buf: &[u8; DNS_BUF], i: u64) -> u32 {
    (u16_at(buf, i) as u32) << 16 | u16_at(buf, i + 2) as u32
}

/// Phases of the walk: one `walk_step` does one step of the current phase.
/// Reading a name: one length byte, label byte or pointer.
const PHASE_NAME: u64 = 0;
/// Folding the labels read into the name's hash: one label (and, for a
/// question or CNAME target, one `NAMES` lookup of that suffix).
const PHASE_FOLD: u64 = 1;
/// The fixed part of a resource record after its owner name.
const PHASE_RECORD: u64 = 2;
/// Finished: `result` is 0 or a `dns_unparsed` reason.
const PHASE_DONE: u64 = 3;
/// Finished: nothing to learn and nothing to report (not class IN).
const PHASE_IGNORE: u64 = 4;

/// What the name being read is, i.e. what follows its fold.
const THEN_QUESTION: u64 = 0;
const THEN_OWNER: u64 = 1;
const THEN_CNAME: u64 = 2;

/// Steps one name may take: 255 bytes of wire name, the pointers, the root.
const NAME_STEPS: u64 = (255 + DNS_MAX_HOPS + 2) as u64;
/// Steps of a whole walk: the question and every answer's two names (owner
/// and CNAME target), each read and folded, and the records themselves.
const WALK_STEPS: u32 = ((1 + 2 * DNS_MAX_ANSWERS as u64)
    * (NAME_STEPS + DNS_MAX_LABELS as u64 + 1)
    + DNS_MAX_ANSWERS as u64
    + 1) as u32;

/// The state of one message walk (`walk_step`).
#[repr(C)]
#[derive(Clone, Copy)]
struct Walk {
    phase: u64,
    /// `THEN_*`: what the current name is.
    then: u64,
    /// Where the next byte to read is.
    pos: u64,
    /// Bytes of the message in `buf`.
    len: u64,
    /// Name reading: the offset after the name where it starts (0: not
    /// known yet), pointers followed, labels read (their hashes are in
    /// `labels`), bytes of the current label still to hash and its hash so
    /// far, steps taken.
    name_end: u64,
    hops: u64,
    n: u64,
    remaining: u64,
    h: u64,
    steps: u64,
    /// The fold of the name just read (ebpf/src/names.rs).
    fold: Fold,
    /// Offset of the record after the current one.
    next: u64,
    /// Answer records still to read.
    answers_left: u64,
    seed: u64,
    slot: u64,
    /// The learning scope of the receiving socket (`LearnedKeyV4::scope`).
    scope: u64,
    /// The `NAMES` key the question (or, failing that, the first CNAME
    /// target that has one) matched: what addresses are learned for; 0: none.
    matched: u64,
    /// Full-name hash of the current record's owner.
    owner: u64,
    /// Full-name hashes of the question name and the CNAME targets so far.
    chain: [u64; MAX_CHAIN],
    chain_len: u64,
    now: u64,
    ttl_min: u64,
    ttl_max: u64,
    /// `dns_unparsed::*` once `PHASE_DONE`, 0 while all is well.
    result: u64,
}

/// bpf_loop callback: one step of the walk. Returns 1 to stop.
#[inline(never)]
extern "C" fn walk_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(p) = DNS_SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch, which only this program run (softirq)
    // uses; the caller reads it after the loop with volatile loads.
    let s = unsafe { &mut *p };
    let DnsScratch {
        buf,
        labels,
        walk,
        learned,
    } = s;
    let r = match walk.phase {
        PHASE_NAME => name_step(buf, labels, walk),
        PHASE_FOLD => fold_step(labels, walk),
        PHASE_RECORD => record_step(buf, walk, learned),
        _ => return 1,
    };
    if let Err(why) = r {
        walk.result = why as u64;
        walk.phase = PHASE_DONE;
    }
    if walk.phase >= PHASE_DONE { 1 } else { 0 }
}

/// Starts reading the name at `pos`.
#[inline(always)]
fn start_name(w: &mut Walk, pos: u64, then: u64) {
    w.phase = PHASE_NAME;
    w.then = then;
    w.pos = pos;
    w.name_end = 0;
    w.hops = 0;
    w.n = 0;
    w.remaining = 0;
    w.steps = 0;
}

/// One byte of a label, one length byte or one pointer of a name.
#[inline(always)]
fn name_step(
    buf: &[u8; DNS_BUF],
    labels: &mut [u64; DNS_MAX_LABELS],
    w: &mut Walk,
) -> Result<(), u32> {
    let pos = w.pos;
    if pos >= w.len {
        return Err(dns_unparsed::TRUNCATED);
    }
    w.steps += 1;
    if w.steps > NAME_STEPS {
        return Err(dns_unparsed::NAME);
    }
    if w.remaining > 0 {
        w.h = label_step(w.h, byte(buf, pos));
        w.pos = pos + 1;
        w.remaining -= 1;
        if w.remaining == 0 {
            labels[(w.n as usize) & LMASK] = w.h;
            w.n += 1;
        }
        return Ok(());
    }
    let l = byte(buf, pos) as u64;
    if l == 0 {
        if w.name_end == 0 {
            w.name_end = pos + 1;
        }
        // The name is read: fold it (an owner's only for its hash).
        w.phase = PHASE_FOLD;
        w.fold = Fold::new(w.n, w.seed, w.slot, w.then != THEN_OWNER);
        return Ok(());
    }
    if l & 0xc0 == 0xc0 {
        if pos + 1 >= w.len {
            return Err(dns_unparsed::TRUNCATED);
        }
        let target = (l & 0x3f) << 8 | byte(buf, pos + 1) as u64;
        // Backwards only: a pointer can never loop.
        if target >= pos || w.hops >= DNS_MAX_HOPS as u64 {
            return Err(dns_unparsed::NAME);
        }
        if w.name_end == 0 {
            w.name_end = pos + 2;
        }
        w.hops += 1;
        w.pos = target;
        return Ok(());
    }
    if l & 0xc0 != 0 || w.n >= DNS_MAX_LABELS as u64 || pos + 1 + l > w.len {
        return Err(dns_unparsed::NAME);
    }
    w.h = LABEL_INIT;
    w.remaining = l;
    w.pos = pos + 1;
    Ok(())
}

/// Folds one label of the name just read (ebpf/src/names.rs), then, once
/// every label is folded, goes on with what the name was read for.
#[inline(always)]
fn fold_step(labels: &[u64; DNS_MAX_LABELS], w: &mut Walk) -> Result<(), u32> {
    if !w.fold.step(labels) {
        return Ok(());
    }
    let (acc, found) = (w.fold.acc, w.fold.found);
    match w.then {
        THEN_QUESTION => {
            let pos = w.name_end;
            if pos + 4 > w.len {
                return Err(dns_unparsed::TRUNCATED);
            }
            w.matched = found;
            w.chain[0] = acc;
            w.chain_len = 1;
            w.pos = pos + 4;
            // qtype and qclass are the question's fixed part: record_step
            // checks the class (`then` is still THEN_QUESTION).
            w.phase = PHASE_RECORD;
        }
        THEN_OWNER => {
            w.owner = acc;
            w.pos = w.name_end;
            w.phase = PHASE_RECORD;
        }
        _ => {
            // A CNAME target.
            if w.matched == 0 {
                w.matched = found;
            }
            let cl = w.chain_len;
            if cl >= MAX_CHAIN as u64 {
                return Err(dns_unparsed::CHAIN);
            }
            w.chain[(cl as usize) & (MAX_CHAIN - 1)] = acc;
            w.chain_len = cl + 1;
            next_answer(w, w.next);
        }
    }
    Ok(())
}

/// Moves to the answer record at `pos`, or finishes.
#[inline(always)]
fn next_answer(w: &mut Walk, pos: u64) {
    if w.answers_left == 0 {
        w.phase = PHASE_DONE;
        return;
    }
    w.answers_left -= 1;
    start_name(w, pos, THEN_OWNER);
}

/// The fixed part after a name: the question's class, or an answer
/// record's type, class, TTL and data (see the module comment).
#[inline(always)]
fn record_step(buf: &[u8; DNS_BUF], w: &mut Walk, learned: &mut Learned) -> Result<(), u32> {
    if w.then == THEN_QUESTION {
        // `pos` is past qtype and qclass (checked against `len`).
        if u16_at(buf, w.pos - 2) != CLASS_IN {
            w.phase = PHASE_IGNORE;
            return Ok(());
        }
        next_answer(w, w.pos);
        return Ok(());
    }
    let p = w.pos;
    let len = w.len;
    if p + 10 > len {
        return Err(dns_unparsed::TRUNCATED);
    }
    let rtype = u16_at(buf, p);
    let rclass = u16_at(buf, p + 2);
    let ttl = u32_at(buf, p + 4) as u64;
    let rdlen = u16_at(buf, p + 8) as u64;
    let rdata = p + 10;
    if rdata + rdlen > len {
        return Err(dns_unparsed::TRUNCATED);
    }
    let next = rdata + rdlen;
    if rclass != CLASS_IN {
        next_answer(w, next);
        return Ok(());
    }
    let owner = w.owner;
    let cl = w.chain_len;
    let in_chain = owner == w.chain[0]
        || (cl > 1 && owner == w.chain[1])
        || (cl > 2 && owner == w.chain[2])
        || (cl > 3 && owner == w.chain[3]);
    if rtype == TYPE_CNAME {
        if in_chain {
            w.next = next;
            start_name(w, rdata, THEN_CNAME);
        } else {
            next_answer(w, next);
        }
        return Ok(());
    }
    if (rtype == TYPE_A || rtype == TYPE_AAAA) && w.matched != 0 {
        if in_chain {
            learn(buf, w, learned, rtype, rdata, rdlen, ttl);
        } else {
            count(counter::DNS_OFF_CHAIN);
        }
    }
    next_answer(w, next);
    Ok(())
}

/// Learns the address of an A or AAAA record of the chain.
#[inline(always)]
fn learn(
    buf: &[u8; DNS_BUF],
    w: &Walk,
    v: &mut Learned,
    rtype: u16,
    rdata: u64,
    rdlen: u64,
    ttl: u64,
) {
    let (lo, hi) = (w.ttl_min, w.ttl_max);
    let ttl_s = if ttl < lo {
        lo
    } else if ttl > hi {
        hi
    } else {
        ttl
    };
    let expires = w.now + ttl_s * 1_000_000_000;
    if rtype == TYPE_A && rdlen == 4 {
        let addr = [
            byte(buf, rdata),
            byte(buf, rdata + 1),
            byte(buf, rdata + 2),
            byte(buf, rdata + 3),
        ];
        learn_v4(v, w.scope, &addr, w.matched, expires, w.now);
    } else if rtype == TYPE_AAAA && rdlen == 16 {
        let mut addr = [0u8; 16];
        let mut j = 0;
        while j < 16 {
            addr[j] = byte(buf, rdata + j as u64);
            j += 1;
        }
        learn_v6(v, w.scope, &addr, w.matched, expires, w.now);
    }
}

/// Merges `hash` into `v`, a copy of an address's learned entry in the
/// scratch: the same name is refreshed, else an empty or expired place is
/// taken, else the one expiring first. `v` lives in map memory on purpose:
/// the verifier bounds an index into it without tracking its value, where an
/// index into a copy on the stack made it walk every choice of place.
#[inline(always)]
fn merge(v: &mut Learned, hash: u64, expires: u64, now: u64) {
    let mut pick = LEARNED_NAMES as u64;
    let mut i = 0;
    while i < LEARNED_NAMES {
        if v.names[i].hash == hash {
            pick = i as u64;
        }
        i += 1;
    }
    if pick == LEARNED_NAMES as u64 {
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
                pick = i as u64;
            }
            i += 1;
        }
    }
    if pick < LEARNED_NAMES as u64 {
        let e = &mut v.names[(pick as usize) & (LEARNED_NAMES - 1)];
        e.hash = hash;
        if expires > e.expires_ns || e.expires_ns <= now {
            e.expires_ns = expires;
        }
    }
}

const _: () = assert!(LEARNED_NAMES.is_power_of_two());

#[inline(always)]
fn learn_v4(v: &mut Learned, scope: u64, addr: &[u8; 4], hash: u64, expires: u64, now: u64) {
    let key = key_v4(scope, addr);
    // SAFETY: value copied out at once.
    *v = match unsafe { LEARNED_V4.get(&key) } {
        Some(old) => *old,
        None => Learned::default(),
    };
    merge(v, hash, expires, now);
    match LEARNED_V4.insert(&key, v, 0) {
        Ok(()) => count(counter::DNS_LEARNED),
        Err(_) => count(counter::DNS_LEARN_FAILED),
    }
}

#[inline(always)]
fn learn_v6(v: &mut Learned, scope: u64, addr: &[u8; 16], hash: u64, expires: u64, now: u64) {
    let key = LearnedKeyV6 { scope, addr: *addr };
    // SAFETY: as in `learn_v4`.
    *v = match unsafe { LEARNED_V6.get(&key) } {
        Some(old) => *old,
        None => Learned::default(),
    };
    merge(v, hash, expires, now);
    match LEARNED_V6.insert(&key, v, 0) {
        Ok(()) => count(counter::DNS_LEARNED),
        Err(_) => count(counter::DNS_LEARN_FAILED),
    }
}

/// The `LEARNED_V4` key of `addr` in `scope`, built as two words: the
/// struct literal's `_pad: [0; 4]` can become a byte-by-byte `memset`.
#[inline(always)]
fn key_v4(scope: u64, addr: &[u8; 4]) -> LearnedKeyV4 {
    let words: [u64; 2] = [scope, u64::from(u32::from_ne_bytes(*addr))];
    // SAFETY: `LearnedKeyV4` is repr(C), 16 bytes, align 8: the scope, the
    // address (little endian, the BPF target's order: its bytes first) and
    // a zero pad; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u64; 2], LearnedKeyV4>(words) }
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
    // writes at most DNS_EVENT_BYTES bytes into `data`. The scratch's
    // scope was written by `parse` before it could fail.
    unsafe {
        (*p).header = EventHeader {
            kind: kind::DNS_UNPARSED,
            time_ns: bpf_ktime_get_ns(),
            cgroup_id: bpf_skb_cgroup_id(ctx.as_ptr() as *mut _),
            ..EventHeader::default()
        };
        (*p).data.scope = match DNS_SCRATCH.get_ptr(0) {
            Some(s) => core::ptr::read_volatile(&(*s).walk.scope),
            None => NO_SCOPE,
        };
        (*p).data.len = len as u32;
        (*p).data.msg_len = msg_len as u32;
        (*p).data.why = why;
        (*p).data._pad = 0;
        let copy = crate::verifier::helper_len(len, DNS_BUF);
        if len == 0
            || bpf_skb_load_bytes(
                ctx.as_ptr() as *const _,
                off as u32,
                (*p).data.data.as_mut_ptr() as *mut _,
                copy,
            ) != 0
        {
            (*p).data.len = 0;
        }
    }
    entry.submit(0);
}

/// The provider of `addr` through a learned name: the first unexpired name
/// of its `LEARNED_*` entry in `scope` (the connecting task's workload) that `NAMES` of `slot` maps to a provider on
/// `port`. `NO_PROVIDER` (0) if none.
#[inline(always)]
pub fn learned_provider(slot: u32, scope: u64, v4: bool, addr: &[u8; 16], port: u16) -> u32 {
    let learned = if v4 {
        let key = key_v4(scope, &[addr[0], addr[1], addr[2], addr[3]]);
        // SAFETY: value copied out at once.
        unsafe { LEARNED_V4.get(&key) }.copied()
    } else {
        let key = LearnedKeyV6 { scope, addr: *addr };
        // SAFETY: as above.
        unsafe { LEARNED_V6.get(&key) }.copied()
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
