//! Delivery of TLS plaintext to the agent: reads the `PLAINTEXT` ring
//! buffer (ebpf/src/plaintext.rs), joins the pieces of each TLS call into
//! one [`PlaintextChunk`], and hands every chunk to one channel, the input
//! of whatever reads HTTP from it (docs/plaintext.md). Exec reports of
//! `exact_tokens` workloads go to the attacher (`attach`).
//!
//! This module only decodes and forwards: it keeps no plaintext beyond one
//! call in progress per thread (bounded), writes nothing to disk and logs
//! no plaintext. The one exception is the test dump ([`DUMP_ENV`]), which
//! only debug builds honour.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use llm_egress_common::{
    PLAINTEXT_CALL_MAX, PLAINTEXT_HEADER_BYTES, PLAINTEXT_WAKE_NS, PlaintextHeader, plaintext_dir,
    plaintext_flags, plaintext_kind,
};
use tokio::sync::{Notify, mpsc};

use crate::capture::join::Joiner;
use crate::kernel::ring::RingReader;
use tracing::warn;

/// Which way the plaintext went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// `SSL_write`/`SSL_write_ex`: the process sent it (a request).
    Sent,
    /// `SSL_read`/`SSL_read_ex`: the process received it (a response).
    Received,
}

/// The plaintext of one TLS call of one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlaintextChunk {
    /// Socket cookie of the connection: the key of `accounting`'s
    /// connections and of the connect events. 0: unknown (no TCP call was
    /// seen under this `SSL*`; `ssl` still tells connections apart within
    /// the process).
    pub cookie: u64,
    /// The `SSL*` of the call (per process).
    pub ssl: u64,
    pub pid: u32,
    pub tid: u32,
    /// Inode of the thread's cgroup v2 directory at the call.
    pub cgroup_id: u64,
    pub direction: Direction,
    /// CLOCK_MONOTONIC ns of the call's return.
    pub time_ns: u64,
    /// The plaintext: the first `min(call_len, PLAINTEXT_CALL_MAX)` bytes
    /// of the call, fewer when pieces were lost (`complete == false`).
    pub data: Vec<u8>,
    /// Bytes the call moved.
    pub call_len: u64,
    /// The call moved more than `PLAINTEXT_CALL_MAX` bytes; `data` is its
    /// beginning.
    pub truncated: bool,
    /// Every piece of the call arrived and was readable: `data` is the
    /// call's first `min(call_len, PLAINTEXT_CALL_MAX)` bytes.
    pub complete: bool,
}

/// A process that exec'd in an `exact_tokens` workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecReport {
    pub pid: u32,
    pub cgroup_id: u64,
    /// The kernel stopped it: it waits for SIGCONT.
    pub paused: bool,
}

/// A decoded record of the ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    Piece(PlaintextHeader, &'a [u8]),
    Exec(PlaintextHeader),
    Link(PlaintextHeader),
}

/// Decodes one ring record; None for a record too short or of an unknown
/// kind (counted by the caller).
pub fn decode(bytes: &[u8]) -> Option<Record<'_>> {
    if bytes.len() < PLAINTEXT_HEADER_BYTES {
        return None;
    }
    // SAFETY: `PlaintextHeader` is repr(C) plain integers (every bit
    // pattern valid), and `bytes` holds at least its size; read_unaligned
    // makes no alignment assumption.
    let h: PlaintextHeader = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    match h.kind {
        plaintext_kind::EXEC => Some(Record::Exec(h)),
        plaintext_kind::LINK => Some(Record::Link(h)),
        plaintext_kind::CHUNK => {
            let data =
                bytes.get(PLAINTEXT_HEADER_BYTES..PLAINTEXT_HEADER_BYTES + h.len as usize)?;
            Some(Record::Piece(h, data))
        }
        _ => None,
    }
}

/// Counts of the reader, for metrics.
#[derive(Default)]
pub struct ReaderStats {
    pub chunks: AtomicU64,
    pub bytes: AtomicU64,
    /// Calls delivered with pieces missing (ring full, unreadable memory).
    pub incomplete: AtomicU64,
    /// Records that did not decode.
    pub malformed: AtomicU64,
    /// Chunks dropped because the consumer did not keep up.
    pub dropped: AtomicU64,
    /// Exec reports the attacher could not take (the process was resumed
    /// at once, unattached).
    pub execs_dropped: AtomicU64,
}

/// Joins the pieces of calls into chunks. Pieces of one call come in order
/// (one program run emits them, one after the other) but records of other
/// threads may come between them; a thread's next call ends its previous
/// one.
#[derive(Default)]
pub struct Assembler {
    open: HashMap<u32, PlaintextChunk>,
}

/// Threads with a call in progress at once; beyond, the oldest call is
/// delivered as it is.
const OPEN_CALLS_MAX: usize = 4096;

impl Assembler {
    /// Adds a piece; returns the chunks it completes (the call itself when
    /// this was its last piece, and a call of the same thread left
    /// incomplete).
    pub fn piece(&mut self, h: &PlaintextHeader, data: &[u8]) -> Vec<PlaintextChunk> {
        let mut out = Vec::new();
        let same_call = self
            .open
            .get(&h.tid)
            .is_some_and(|c| c.time_ns == h.call_ns && c.data.len() == h.offset as usize);
        if !same_call {
            // A call still open lost its last pieces (the ring was full).
            if let Some(mut old) = self.open.remove(&h.tid) {
                old.complete = false;
                out.push(old);
            }
            if self.open.len() >= OPEN_CALLS_MAX
                && let Some(&tid) = self.open.keys().next()
                && let Some(mut old) = self.open.remove(&tid)
            {
                old.complete = false;
                out.push(old);
            }
            self.open.insert(
                h.tid,
                PlaintextChunk {
                    cookie: h.cookie,
                    ssl: h.ssl,
                    pid: h.tgid,
                    tid: h.tid,
                    cgroup_id: h.cgroup_id,
                    direction: if h.direction == plaintext_dir::RECEIVED {
                        Direction::Received
                    } else {
                        Direction::Sent
                    },
                    time_ns: h.call_ns,
                    data: Vec::with_capacity(h.call_len.min(PLAINTEXT_CALL_MAX as u64) as usize),
                    call_len: h.call_len,
                    truncated: h.flags & plaintext_flags::TRUNCATED != 0,
                    // A call whose first piece is missing is never complete.
                    complete: h.offset == 0,
                },
            );
        }
        let Some(call) = self.open.get_mut(&h.tid) else {
            return out;
        };
        if h.flags & plaintext_flags::UNREADABLE != 0 {
            call.complete = false;
        }
        call.data.extend_from_slice(data);
        let want = call.call_len.min(PLAINTEXT_CALL_MAX as u64) as usize;
        if (call.data.len() >= want || h.flags & plaintext_flags::UNREADABLE != 0)
            && let Some(done) = self.open.remove(&h.tid)
        {
            out.push(done);
        }
        out
    }
}

/// Reads `ring` until `finish` is notified: chunks to `chunks`, exec
/// reports to `execs`. A process the kernel paused whose report `execs`
/// cannot take is resumed at once (never left stopped). When finished it
/// reads what the ring still holds and returns, closing `execs`: the agent
/// stops the exec program first, then resumes every process still reported
/// until `execs` is closed.
pub async fn read(
    ring: RingBuf<MapData>,
    chunks: mpsc::Sender<PlaintextChunk>,
    execs: mpsc::Sender<ExecReport>,
    stats: Arc<ReaderStats>,
    seen: Arc<Mutex<std::collections::HashSet<u32>>>,
    alive: Arc<AtomicBool>,
    finish: Arc<Notify>,
) {
    let mut reader = match RingReader::new(ring, Duration::from_nanos(PLAINTEXT_WAKE_NS)) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot poll the plaintext ring buffer; no plaintext is delivered");
            alive.store(false, Ordering::SeqCst);
            return;
        }
    };
    let mut asm = Assembler::default();
    let mut joiner = Joiner::default();
    let out = Outputs {
        chunks: &chunks,
        execs: &execs,
        stats: &stats,
        seen: &seen,
    };
    loop {
        let expiry = joiner.next_expiry();
        tokio::select! {
            polled = reader.wait() => {
                if let Err(e) = polled {
                    warn!(error = %e, "plaintext ring buffer poll failed");
                    alive.store(false, Ordering::SeqCst);
                    deliver(joiner.release_all(), &out);
                    return;
                }
                drain(reader.ring(), &mut asm, &mut joiner, &out);
            }
            () = finish.notified() => {
                drain(reader.ring(), &mut asm, &mut joiner, &out);
                deliver(joiner.release_all(), &out);
                return;
            }
            () = async {
                match expiry {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        deliver(joiner.expire(Instant::now()), &out);
    }
}

/// Where the reader's results go.
struct Outputs<'a> {
    chunks: &'a mpsc::Sender<PlaintextChunk>,
    execs: &'a mpsc::Sender<ExecReport>,
    stats: &'a ReaderStats,
    seen: &'a Mutex<std::collections::HashSet<u32>>,
}

/// Handles every record the ring holds.
fn drain(ring: &mut RingBuf<MapData>, asm: &mut Assembler, joiner: &mut Joiner, o: &Outputs<'_>) {
    let mut done = Vec::new();
    let now = Instant::now();
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(Record::Piece(h, data)) => {
                for c in asm.piece(&h, data) {
                    done.extend(joiner.chunk(c, now));
                }
            }
            Some(Record::Link(h)) => done.extend(joiner.link(h.tgid, h.ssl, h.cookie)),
            Some(Record::Exec(h)) => {
                let report = ExecReport {
                    pid: h.tgid,
                    cgroup_id: h.cgroup_id,
                    paused: h.flags & plaintext_flags::PAUSED != 0,
                };
                if o.execs.try_send(report).is_err() {
                    o.stats.execs_dropped.fetch_add(1, Ordering::Relaxed);
                    if report.paused {
                        resume(report.pid);
                    }
                }
            }
            None => {
                o.stats.malformed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    deliver(done, o);
}

/// Chunks to the consumer (counted; skipped when it cannot take them).
fn deliver(done: Vec<PlaintextChunk>, o: &Outputs<'_>) {
    if done.is_empty() {
        return;
    }
    if let Ok(mut s) = o.seen.lock() {
        for c in &done {
            s.insert(c.pid);
        }
    }
    for c in done {
        if !c.complete {
            o.stats.incomplete.fetch_add(1, Ordering::Relaxed);
        }
        o.stats.chunks.fetch_add(1, Ordering::Relaxed);
        o.stats
            .bytes
            .fetch_add(c.data.len() as u64, Ordering::Relaxed);
        if o.chunks.try_send(c).is_err() {
            o.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// SIGCONT to a process the exec program paused.
pub fn resume(pid: u32) {
    // SAFETY: kill(2) with a pid and a signal number; no memory involved.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ESRCH) {
            warn!(pid, error = %e, "could not resume a process paused at exec");
        }
    }
}

/// Debug builds only: a file to which the test consumer ([`dump`]) writes
/// every chunk as a JSON line, plaintext in hex. Release builds ignore it:
/// plaintext holds prompts and keys, and never goes to disk.
pub const DUMP_ENV: &str = "LLM_EGRESS_TEST_PLAINTEXT_DUMP";

/// The path of the test dump, in debug builds when [`DUMP_ENV`] is set.
pub fn dump_path() -> Option<std::path::PathBuf> {
    if cfg!(debug_assertions) {
        std::env::var_os(DUMP_ENV).map(Into::into)
    } else {
        if std::env::var_os(DUMP_ENV).is_some() {
            warn!("{DUMP_ENV} is set and ignored: only debug builds honour it");
        }
        None
    }
}

/// The test consumer: reassembles each connection's stream (per cookie and
/// direction: the bytes so far) and appends each chunk to `path` as a JSON
/// line with the workload the attacher traced its process for
/// (`workload_of`). Stands where the HTTP parser will (issue 15).
pub async fn dump(
    mut chunks: mpsc::Receiver<PlaintextChunk>,
    path: std::path::PathBuf,
    workload_of: impl Fn(u32) -> Option<String> + Send + 'static,
) {
    use std::io::Write;
    let mut file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "cannot open the plaintext dump");
            return;
        }
    };
    let mut streams: HashMap<(u64, Direction), u64> = HashMap::new();
    while let Some(c) = chunks.recv().await {
        let at = streams.entry((c.cookie, c.direction)).or_default();
        let stream_offset = *at;
        *at += c.data.len() as u64;
        let line = serde_json::json!({
            "cookie": c.cookie,
            "ssl": c.ssl,
            "pid": c.pid,
            "tid": c.tid,
            "cgroup_id": c.cgroup_id,
            "workload": workload_of(c.pid),
            "direction": c.direction,
            "call_len": c.call_len,
            "truncated": c.truncated,
            "complete": c.complete,
            "stream_offset": stream_offset,
            "hex": hex(&c.data),
        });
        let _ = writeln!(file, "{line}");
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_egress_common::PLAINTEXT_PIECE;

    fn header(tid: u32, ns: u64, call_len: u64, offset: u32, len: u32) -> PlaintextHeader {
        PlaintextHeader {
            kind: plaintext_kind::CHUNK,
            direction: plaintext_dir::SENT,
            flags: 0,
            _pad: 0,
            call_ns: ns,
            tid,
            tgid: 7,
            cgroup_id: 9,
            cookie: 42,
            ssl: 0x1000,
            call_len,
            offset,
            len,
        }
    }

    fn record(h: &PlaintextHeader, data: &[u8]) -> Vec<u8> {
        // SAFETY: a repr(C) struct of integers viewed as its bytes.
        let hb = unsafe {
            std::slice::from_raw_parts(
                (h as *const PlaintextHeader).cast::<u8>(),
                PLAINTEXT_HEADER_BYTES,
            )
        };
        [hb, data].concat()
    }

    #[test]
    fn a_record_decodes_to_its_header_and_bytes() {
        let h = header(1, 5, 3, 0, 3);
        let r = record(&h, b"abc");
        assert_eq!(decode(&r), Some(Record::Piece(h, &b"abc"[..])));
        assert_eq!(decode(&r[..10]), None, "too short");
        assert_eq!(decode(&r[..PLAINTEXT_HEADER_BYTES + 2]), None, "data cut");
        let mut bad = h;
        bad.kind = 99;
        assert_eq!(decode(&record(&bad, b"abc")), None);
    }

    #[test]
    fn pieces_of_one_call_join_across_other_threads_records() {
        let mut a = Assembler::default();
        let big = vec![b'x'; PLAINTEXT_PIECE];
        let n = (PLAINTEXT_PIECE + 10) as u64;
        assert!(
            a.piece(&header(1, 5, n, 0, PLAINTEXT_PIECE as u32), &big)
                .is_empty()
        );
        let other = a.piece(&header(2, 6, 2, 0, 2), b"hi");
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].data, b"hi");
        let done = a.piece(&header(1, 5, n, PLAINTEXT_PIECE as u32, 10), b"0123456789");
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].data.len() as u64, n);
        assert!(done[0].complete && !done[0].truncated);
        assert_eq!((done[0].cookie, done[0].pid, done[0].tid), (42, 7, 1));
    }

    #[test]
    fn a_call_that_lost_a_piece_is_delivered_incomplete() {
        let mut a = Assembler::default();
        let big = vec![b'x'; PLAINTEXT_PIECE];
        assert!(
            a.piece(&header(1, 5, 20_000, 0, PLAINTEXT_PIECE as u32), &big)
                .is_empty()
        );
        // The thread's next call: the first is delivered as it is.
        let out = a.piece(&header(1, 8, 1, 0, 1), b"z");
        assert_eq!(out.len(), 2);
        assert!(!out[0].complete && out[0].data.len() == PLAINTEXT_PIECE);
        assert!(out[1].complete);
        // A call whose first piece was lost waits for the thread's next
        // call, then comes incomplete.
        assert!(
            a.piece(&header(3, 9, 20_000, PLAINTEXT_PIECE as u32, 2), b"ab")
                .is_empty()
        );
        let out = a.piece(&header(3, 10, 1, 0, 1), b"q");
        assert_eq!(out.len(), 2);
        assert!(!out[0].complete && out[0].data == b"ab");
    }

    #[test]
    fn a_truncated_call_is_flagged_and_capped() {
        let mut a = Assembler::default();
        let big = vec![b'y'; PLAINTEXT_PIECE];
        let n = (PLAINTEXT_CALL_MAX + 5) as u64;
        let mut out = Vec::new();
        for i in 0..llm_egress_common::PLAINTEXT_PIECES {
            let mut h = header(
                4,
                1,
                n,
                (i * PLAINTEXT_PIECE) as u32,
                PLAINTEXT_PIECE as u32,
            );
            h.flags = plaintext_flags::TRUNCATED;
            out.extend(a.piece(&h, &big));
        }
        assert_eq!(out.len(), 1);
        assert!(out[0].truncated && out[0].complete);
        assert_eq!(out[0].data.len(), PLAINTEXT_CALL_MAX);
        assert_eq!(out[0].call_len, n);
    }
}
