//! TLS records of tracked connections, counted in the kernel, and the
//! connection updates of received data.
//!
//! Called by the two cgroup_skb programs for every packet with TCP payload
//! (`names_sni_egress` for what the workloads send, `names_dns_ingress` for
//! what they receive); packets without payload never get here. Only
//! connections in `CONNS` (allowed TCP provider connections) are walked:
//! one hash lookup per payload packet, nothing more for other sockets.
//!
//! A TLS record starts with a 5-byte header: content type (20 change
//! cipher spec, 21 alert, 22 handshake, 23 application_data, 24
//! heartbeat), version 3.x, 16-bit length of what follows. Per connection
//! and direction, `ConnStats::tls` (`TlsWalk`) keeps the TCP sequence
//! number where the next header starts; a segment is placed in the stream
//! by the sequence number of its TCP header:
//!
//! - the first payload of a direction must start with a valid header
//!   (anything else, e.g. plain HTTP: the direction is `LOST`; a first
//!   segment shorter than a header is checked by its content type);
//! - a segment that ends before the next header (a retransmission, or a
//!   piece of one long record) is skipped; one that overlaps it is read
//!   from there;
//! - a segment that starts after it (a gap: a lost or reordered segment,
//!   which this hook sees before TCP reorders) loses sync: the records of
//!   the missing bytes can never be read;
//! - headers inside one skb (a GRO skb on ingress or a GSO skb on egress
//!   can be 64 KiB with hundreds of small records) are walked with
//!   `bpf_loop`, at most `RECORD_STEPS`; a walk cut short loses sync;
//! - a header split across two segments keeps its first bytes in `hdr`
//!   and is completed by the next segment in sequence;
//! - a direction that lost sync resyncs at the start of a segment of new
//!   data (past every byte seen) that begins with an application_data
//!   header (`17 03 03`, length 1..=16,640): a 2^-24 chance for random
//!   ciphertext, and the next segment of TLS written with a flush per
//!   message (what streaming servers do) usually begins so.
//!
//! A record is counted when its header is read (its body may still be on
//! the way). The state is updated without a lock: packets of one direction
//! of one socket on two CPUs at once (rare: one flow is steered to one CPU
//! on receive, and sends under the socket lock) may miscount.
//!
//! Received data also sends a `CONN_UPDATE` at most every `CONN_UPDATE_NS`
//! (shared with sock_ops' updates through `reported_ns`), with the byte
//! counts read from the socket (`bpf_tcp_sock`), so a streamed response is
//! seen while it streams even when the client sends nothing.
//!
//! Errors only stop counting: the programs' verdicts never depend on this.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::__sk_buff,
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_get_socket_cookie, bpf_loop, bpf_sk_fullsock, bpf_skb_load_bytes, bpf_tcp_sock,
        },
    },
    programs::SkBuffContext,
};
use llm_egress_common::{
    CONN_UPDATE_NS, ConnEvent, RECORD_MAX_LEN, RECORD_STEPS, TLS_RECEIVED, TLS_SENT, TlsWalk,
    counter, kind, tls_walk,
};

use crate::maps::{CONNS, EVENTS, RECORDS_SCRATCH, RECORDS_SENT, count};

const HEADER: u64 = 5;
const APPLICATION_DATA: u8 = 23;
/// Longest TLS 1.3 record (2^14 + 256): a resync must announce no more.
const TLS13_MAX_LEN: u16 = 16_384 + 256;

/// What the walk of one skb left (`RecordScratch::stop`).
const RUNNING: u64 = 0;
const DONE: u64 = 1;
const BAD: u64 = 2;

/// State of one `bpf_loop` walk over an skb's headers (`scratch`), in a
/// map value for the reasons given in dns.rs.
#[repr(C)]
pub struct RecordScratch {
    /// Offset of the next header from the start of the payload.
    pos: u64,
    /// Payload bytes of the skb.
    end: u64,
    /// Offset of the payload in the skb.
    off: u64,
    records: u64,
    app: u64,
    stop: u64,
}

impl RecordScratch {
    const ZERO: Self = Self {
        pos: 0,
        end: 0,
        off: 0,
        records: 0,
        app: 0,
        stop: 0,
    };
}

/// On the stack: what the callback needs.
#[repr(C)]
struct LoopCtx {
    skb: *mut __sk_buff,
    scratch: *mut RecordScratch,
}

/// A packet the egress program sends with payload on a tracked connection
/// (`entry`: its `CONNS` value): `off` and `len` of the payload in the
/// skb, `seq` from its TCP header.
#[inline(always)]
pub fn sent(ctx: &SkBuffContext, entry: *mut ConnEvent, off: usize, len: usize, seq: u32) {
    // SAFETY: `entry` points into a live CONNS value for this program run.
    let w = unsafe { &mut (*entry).data.tls[TLS_SENT] };
    walk(ctx, w, off, len as u32, seq, TLS_SENT);
}

/// A packet the ingress program receives with payload: as [`sent`], then
/// maybe an update. The lookup is left in `tracked` for the bandwidth check.
#[inline(always)]
pub fn received(
    ctx: &SkBuffContext,
    off: usize,
    len: usize,
    seq: u32,
    tracked: &mut crate::limits::Tracked,
) {
    // SAFETY: helper on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let entry = CONNS.get_ptr_mut(&cookie);
    tracked.set(entry);
    let Some(entry) = entry else {
        return;
    };
    // SAFETY: as in `sent`.
    let w = unsafe { &mut (*entry).data.tls[TLS_RECEIVED] };
    walk(ctx, w, off, len as u32, seq, TLS_RECEIVED);
    update(ctx, entry);
}

/// Loses the record boundaries of a direction; `end`: the highest sequence
/// number seen.
#[inline(always)]
fn lose(w: &mut TlsWalk, end: u32) {
    w.state = tls_walk::LOST;
    w.lost = w.lost.saturating_add(1);
    w.have = 0;
    w.next_seq = end;
}

/// The length a header announces, if it is a TLS record header.
#[inline(always)]
fn header_len(h0: u8, h1: u8, h2: u8, h3: u8, h4: u8) -> Option<u64> {
    let len = u16::from_be_bytes([h3, h4]);
    if !(20..=24).contains(&h0) || h1 != 3 || h2 > 4 || len > RECORD_MAX_LEN {
        return None;
    }
    Some(u64::from(len))
}

/// Whether the payload starts with an application_data header a resync
/// may trust.
#[inline(always)]
fn resync_at(ctx: &SkBuffContext, off: usize) -> bool {
    let Ok(h) = ctx.load::<[u8; 5]>(off) else {
        return false;
    };
    let len = u16::from_be_bytes([h[3], h[4]]);
    h[0] == APPLICATION_DATA && h[1] == 3 && h[2] == 3 && len >= 1 && len <= TLS13_MAX_LEN
}

#[inline(always)]
fn walk(ctx: &SkBuffContext, w: &mut TlsWalk, off: usize, plen: u32, seq: u32, dir: usize) {
    let end = seq.wrapping_add(plen);
    // Where the payload's first byte to read is.
    let mut pos: u32 = 0;
    if w.state == tls_walk::NEW {
        let ok = if plen >= HEADER as u32 {
            match ctx.load::<[u8; 5]>(off) {
                Ok(h) => header_len(h[0], h[1], h[2], h[3], h[4]).is_some(),
                Err(_) => false,
            }
        } else {
            // A first segment shorter than a header: its content type;
            // the whole header is checked when the next one completes it.
            matches!(ctx.load::<u8>(off), Ok(t) if (20..=24).contains(&t))
        };
        if !ok {
            lose(w, end);
            return;
        }
        w.state = tls_walk::SYNCED;
        w.next_seq = seq;
    } else if w.state == tls_walk::SYNCED {
        let d = seq.wrapping_sub(w.next_seq) as i32;
        if d > 0 {
            // A gap: the next header was in bytes this hook did not see.
            lose(w, seq);
        } else {
            let behind = w.next_seq.wrapping_sub(seq);
            if behind >= plen {
                // A retransmission, or inside a record's body.
                return;
            }
            pos = behind;
        }
    }
    if w.state == tls_walk::LOST {
        if (seq.wrapping_sub(w.next_seq) as i32) < 0 {
            // Not new data: only the highest end seen moves.
            if (end.wrapping_sub(w.next_seq) as i32) > 0 {
                w.next_seq = end;
            }
            return;
        }
        if !resync_at(ctx, off) {
            w.next_seq = end;
            return;
        }
        w.state = tls_walk::SYNCED;
        w.resyncs = w.resyncs.saturating_add(1);
        w.next_seq = seq;
        pos = 0;
    }

    // The rest of a header split across segments. Header bytes are kept
    // in a big-endian accumulator (no variable index into an array: the
    // verifier rejects what the compiler makes of one).
    if w.have > 0 {
        let have = u32::from(w.have);
        let need = 5u32.saturating_sub(have);
        let avail = plen - pos;
        let take = if avail < need { avail } else { need };
        let mut acc = kept(w, have);
        let Some(more) = load_be(ctx, off + pos as usize, take) else {
            lose(w, end);
            return;
        };
        acc = acc << (8 * take) | more;
        if avail < need {
            // Still not whole (a segment of fewer than 4 bytes).
            keep(w, acc, have + take);
            w.next_seq = end;
            return;
        }
        let b = |k: u32| (acc >> (8 * (4 - k))) as u8;
        let Some(len) = header_len(b(0), b(1), b(2), b(3), b(4)) else {
            lose(w, end);
            return;
        };
        w.records = w.records.wrapping_add(1);
        if b(0) == APPLICATION_DATA {
            w.app_records = w.app_records.wrapping_add(1);
        }
        w.have = 0;
        let next = u64::from(pos) + u64::from(need) + len;
        if next >= u64::from(plen) {
            w.next_seq = seq.wrapping_add(next as u32);
            return;
        }
        pos = next as u32;
    }

    // Every header in this skb.
    let sent = dir == TLS_SENT;
    // SAFETY: helper on this program's own context.
    let cookie = if sent {
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
    } else {
        0
    };
    let Some(sp) = scratch(sent, cookie) else {
        lose(w, end);
        return;
    };
    let (npos, records, app, stop) = walk_headers(ctx, sp, pos, plen, off);
    if sent {
        let _ = RECORDS_SENT.remove(&cookie);
    }
    w.records = w.records.wrapping_add(records as u32);
    w.app_records = w.app_records.wrapping_add(app as u32);
    if stop != DONE {
        // Not a header (BAD), or more headers than RECORD_STEPS (RUNNING).
        lose(w, end);
        return;
    }
    let plen64 = u64::from(plen);
    if npos >= plen64 {
        w.next_seq = seq.wrapping_add(npos as u32);
        return;
    }
    // 1 to 4 bytes of a header end the skb: keep them.
    let rem = (plen64 - npos) as u32;
    let Some(acc) = load_be(ctx, off + npos as usize, rem) else {
        lose(w, end);
        return;
    };
    keep(w, acc, rem);
    w.next_seq = end;
}

/// Walks the headers of the skb from payload offset `pos` with the scratch
/// at `sp`: (offset after the last header, records, application_data
/// records, `RUNNING`/`DONE`/`BAD`).
#[inline(always)]
fn walk_headers(
    ctx: &SkBuffContext,
    sp: *mut RecordScratch,
    pos: u32,
    plen: u32,
    off: usize,
) -> (u64, u64, u64, u64) {
    // SAFETY: the scratch entry `scratch` handed out for this walk.
    let s = unsafe { &mut *sp };
    // Volatile: the callback changes the scratch behind this reference
    // (see read_name in dns.rs).
    // SAFETY: valid, aligned fields of the scratch.
    unsafe {
        core::ptr::write_volatile(&mut s.pos, u64::from(pos));
        core::ptr::write_volatile(&mut s.end, u64::from(plen));
        core::ptr::write_volatile(&mut s.off, off as u64);
        core::ptr::write_volatile(&mut s.records, 0);
        core::ptr::write_volatile(&mut s.app, 0);
        core::ptr::write_volatile(&mut s.stop, RUNNING);
    }
    let mut lc = LoopCtx {
        skb: ctx.skb.skb,
        scratch: sp,
    };
    // SAFETY: `record_step` is a bpf_loop callback; `lc` lives on this
    // stack for the call.
    unsafe {
        bpf_loop(
            RECORD_STEPS,
            record_step as *mut c_void,
            (&mut lc as *mut LoopCtx).cast(),
            0,
        )
    };
    // SAFETY: as above.
    unsafe {
        (
            core::ptr::read_volatile(&s.pos),
            core::ptr::read_volatile(&s.records),
            core::ptr::read_volatile(&s.app),
            core::ptr::read_volatile(&s.stop),
        )
    }
}

/// `n` (at most 4) bytes at `at`, big-endian.
#[inline(always)]
fn load_be(ctx: &SkBuffContext, at: usize, n: u32) -> Option<u64> {
    let mut acc = 0u64;
    let mut i = 0u32;
    while i < 4 {
        if i < n {
            let b = ctx.load::<u8>(at + i as usize).ok()?;
            acc = acc << 8 | u64::from(b);
        }
        i += 1;
    }
    Some(acc)
}

/// The `have` header bytes kept in `w.hdr`, big-endian.
#[inline(always)]
fn kept(w: &TlsWalk, have: u32) -> u64 {
    let mut acc = 0u64;
    if have > 0 {
        acc = u64::from(w.hdr[0]);
    }
    if have > 1 {
        acc = acc << 8 | u64::from(w.hdr[1]);
    }
    if have > 2 {
        acc = acc << 8 | u64::from(w.hdr[2]);
    }
    if have > 3 {
        acc = acc << 8 | u64::from(w.hdr[3]);
    }
    acc
}

/// Keeps the `n` (1..=4) header bytes of `acc` in `w.hdr`.
#[inline(always)]
fn keep(w: &mut TlsWalk, acc: u64, n: u32) {
    let n = n & 7;
    let byte = |k: u32| {
        if k < n {
            (acc >> (8 * (n - 1 - k))) as u8
        } else {
            0
        }
    };
    w.hdr[0] = byte(0);
    w.hdr[1] = byte(1);
    w.hdr[2] = byte(2);
    w.hdr[3] = byte(3);
    w.have = if n > 4 { 0 } else { n as u8 };
}

/// The scratch of one walk. Received data is walked by the ingress
/// program, in softirq only, which never runs twice at once on one CPU:
/// the per-CPU `RECORDS_SCRATCH`. Sent data is walked by the egress program
/// in process context and in softirq (data TCP sends when an ACK arrives),
/// so a walk can be interrupted or preempted by another socket's on the
/// same CPU: an entry of its own socket (`cookie`) in `RECORDS_SENT`, which
/// the caller removes after the walk (one socket's packets are sent under
/// its lock, one at a time). None: the map is full.
#[inline(always)]
fn scratch(sent: bool, cookie: u64) -> Option<*mut RecordScratch> {
    if sent {
        crate::maps::claim_scratch(&RECORDS_SENT, cookie, &RecordScratch::ZERO)
    } else {
        RECORDS_SCRATCH.get_ptr_mut(0)
    }
}

/// bpf_loop callback: one record header. Returns 1 to stop.
#[inline(never)]
extern "C" fn record_step(_index: u64, c: *mut c_void) -> i64 {
    // SAFETY: `c` is the caller's `LoopCtx` (bpf_loop passes it through).
    let (skb, sp) = unsafe {
        let c = &*(c as *const LoopCtx);
        (c.skb, c.scratch)
    };
    if sp.is_null() {
        return 1;
    }
    // SAFETY: the walk's scratch entry, which only this walk uses; the
    // caller reads it with volatile loads after the loop.
    let s = unsafe { &mut *sp };
    let pos = s.pos;
    if pos + HEADER > s.end {
        s.stop = DONE;
        return 1;
    }
    let mut h = [0u8; 5];
    // SAFETY: helper on the program's own skb into a 5-byte stack buffer.
    let rc = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            (s.off + pos) as u32,
            h.as_mut_ptr() as *mut c_void,
            5,
        )
    };
    if rc != 0 {
        s.stop = BAD;
        return 1;
    }
    let Some(len) = header_len(h[0], h[1], h[2], h[3], h[4]) else {
        s.stop = BAD;
        return 1;
    };
    s.records += 1;
    if h[0] == APPLICATION_DATA {
        s.app += 1;
    }
    s.pos = pos + HEADER + len;
    0
}

/// At most every `CONN_UPDATE_NS` (shared with sock_ops), an update with
/// the socket's byte counts, as sock_ops reads them.
#[inline(always)]
fn update(ctx: &SkBuffContext, entry: *mut ConnEvent) {
    // SAFETY: helper without arguments; `entry` points into a live CONNS
    // value; `skb` is this program's context, whose `sk` the verifier
    // types as a socket pointer or null.
    unsafe {
        let now = bpf_ktime_get_ns();
        if (*entry).data.established_ns == 0
            || now.wrapping_sub((*entry).data.reported_ns) < CONN_UPDATE_NS
        {
            return;
        }
        (*entry).data.reported_ns = now;
        let sk = (*ctx.skb.skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        let full = bpf_sk_fullsock(sk);
        if full.is_null() {
            return;
        }
        let tp = bpf_tcp_sock(full);
        if tp.is_null() {
            return;
        }
        // The SYN is not payload: see sock_ops.rs.
        let base = u64::from((*entry).data.base_sent);
        (*entry).data.bytes_sent = (*tp).bytes_acked.saturating_sub(base);
        (*entry).data.bytes_received = (*tp).bytes_received;
        (*entry).data.data_segs_in = (*tp).data_segs_in;
        (*entry).data.data_segs_out = (*tp).data_segs_out;
        // The event is a copy made in the ring buffer: sock_ops writes
        // `header.kind` of the entry itself for its own events.
        let Some(mut rec) = EVENTS.reserve::<ConnEvent>(0) else {
            count(counter::EVENTS_LOST);
            return;
        };
        let p = rec.as_mut_ptr();
        crate::maps::copy_words(p, entry);
        (*p).header.kind = kind::CONN_UPDATE;
        rec.submit(0);
    }
}
