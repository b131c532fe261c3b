//! Plaintext of TLS calls: what the OpenSSL uprobes (ebpf/src/plaintext.rs)
//! and the agent's reader (agent/src/plaintext.rs) and attacher
//! (agent/src/plaintext_attach.rs) share. docs/plaintext.md has the
//! user's view: which clients are visible, the correlation to the
//! connection, the caps and the costs.
//!
//! One record per piece of a TLS call on the `PLAINTEXT` ring buffer: a
//! call (`SSL_write`, `SSL_read`, `SSL_write_ex`, `SSL_read_ex`) that
//! moved `n` bytes gives `ceil(min(n, PLAINTEXT_CALL_MAX) /
//! PLAINTEXT_PIECE)` records, all with the same `call_ns` and `tid`. The
//! exec program puts `plaintext_kind::EXEC` records on the same ring.

/// uprobe on the entry of `SSL_write`, `SSL_read`, `SSL_write_ex` and
/// `SSL_read_ex` (the attach cookie says which: `call_flags`).
pub const PROG_PLAINTEXT_SSL_ENTRY: &str = "plaintext_ssl_entry";
/// uretprobe on the same four functions: copies the plaintext.
pub const PROG_PLAINTEXT_SSL_RETURN: &str = "plaintext_ssl_return";
/// kprobe on `tcp_recvmsg`: the socket cookie of a TCP call made inside
/// an SSL call of the same thread. The fallback for kernels without the
/// `sock` tracepoints below (before 6.4).
pub const PROG_PLAINTEXT_TCP: &str = "plaintext_tcp_msg";
/// kprobe on `tcp_sendmsg`: the same, and outside SSL calls the length
/// asked (its third argument), which joins a memory-BIO write of the
/// thread to the socket as the tracepoint's bytes moved do.
pub const PROG_PLAINTEXT_TCP_SEND: &str = "plaintext_tcp_send";
/// Raw tracepoints sock/sock_send_length and sock/sock_recv_length (6.4+):
/// the same as `PROG_PLAINTEXT_TCP`, for kernels without kprobes.
pub const PROG_PLAINTEXT_SOCK: &str = "plaintext_sock_msg";
/// Tracepoint sched/sched_process_exec: reports (and pauses) a process
/// that execs in a workload with `exact_tokens = true`.
pub const PROG_PLAINTEXT_EXEC: &str = "plaintext_exec";
/// uprobe on the entry of Go's `crypto/tls.(*Conn).Write` and `Read`
/// (attach cookie: `call_flags::GO`, `| READ`).
pub const PROG_PLAINTEXT_GO_ENTRY: &str = "plaintext_go_entry";
/// uprobe on each `RET` of the same functions (Go moves goroutine stacks:
/// no uretprobe): copies the plaintext.
pub const PROG_PLAINTEXT_GO_RETURN: &str = "plaintext_go_return";
/// Every plaintext program; none of them is attached to the cgroup or
/// pinned (their links live as long as the agent).
pub const PLAINTEXT_PROGRAMS: [&str; 8] = [
    PROG_PLAINTEXT_GO_ENTRY,
    PROG_PLAINTEXT_GO_RETURN,
    PROG_PLAINTEXT_SSL_ENTRY,
    PROG_PLAINTEXT_SSL_RETURN,
    PROG_PLAINTEXT_TCP,
    PROG_PLAINTEXT_TCP_SEND,
    PROG_PLAINTEXT_SOCK,
    PROG_PLAINTEXT_EXEC,
];

/// `RingBuf` of plaintext records: its own ring, so that a flood of
/// plaintext never costs a connection event on `EVENTS`. Not pinned.
pub const MAP_PLAINTEXT: &str = "PLAINTEXT";
/// `LruHashMap<u64 pid_tgid, SslCall>`: SSL calls in progress, by thread
/// (entry to return). LRU: a thread killed inside a call leaves an entry
/// that ages out.
pub const MAP_PLAINTEXT_CALLS: &str = "PLAINTEXT_CALLS";
/// `LruHashMap<SslKey, u64 cookie>`: the socket cookie last seen under each
/// `SSL*` of each process, for calls that touch no socket (an `SSL_read`
/// served from a record OpenSSL already holds).
pub const MAP_PLAINTEXT_SOCKS: &str = "PLAINTEXT_SOCKS";
/// `LruHashMap<u64 pid_tgid, SslPending>`: the thread's last `SSL_write`
/// that returned without a socket cookie (no TCP call inside it, none
/// remembered for its `SSL*`): OpenSSL over memory BIOs (Node.js), whose
/// caller sends the TLS records itself right after. The thread's next
/// socket send, soon enough and at least as long as the records, joins
/// the `SSL*` to that socket (`PLAINTEXT_SOCKS`, a `LINK` record).
pub const MAP_PLAINTEXT_PENDING: &str = "PLAINTEXT_PENDING";
/// `LruHashMap<SslKey { tgid, ssl: goroutine }, SslCall>`: Go
/// `crypto/tls` calls in progress, by goroutine (the `g` in R14): a
/// goroutine may return on another thread than it entered on. The call's
/// `out` holds the entering thread's pid_tgid, whose `PLAINTEXT_CALLS`
/// entry gathered the socket cookie.
pub const MAP_PLAINTEXT_GO_CALLS: &str = "PLAINTEXT_GO_CALLS";
/// `Array<PlaintextConfig>`, one entry, written by the agent.
pub const MAP_PLAINTEXT_CFG: &str = "PLAINTEXT_CFG";
/// `HashMap<u64, u32>`: the workloads with `exact_tokens = true`, keyed by
/// `workload_key(generation, workload_id)` (value 1).
pub const MAP_PLAINTEXT_WORKLOADS: &str = "PLAINTEXT_WORKLOADS";
/// `PerCpuArray<PlaintextRecord>`, one entry: where a record is built
/// before it is copied to the ring (uprobe programs run with preemption
/// disabled, and a kprobe program cannot nest on the same CPU).
pub const MAP_PLAINTEXT_SCRATCH: &str = "PLAINTEXT_SCRATCH";
/// `PerCpuArray<u64>` of `plaintext_stat::*`.
pub const MAP_PLAINTEXT_STATS: &str = "PLAINTEXT_STATS";
/// `Array<u64>` of `PLAINTEXT_TRACED_WORDS` words, written by the agent
/// alone: bit `tgid % 64` of word `tgid / 64` is set while the agent
/// traces process `tgid` (from before its uprobes attach until it is
/// forgotten). The socket hooks run for every socket call on the host and
/// return at once for a process without its bit.
pub const MAP_PLAINTEXT_TRACED: &str = "PLAINTEXT_TRACED";
/// Words of `PLAINTEXT_TRACED`: one bit for each pid Linux can give
/// (`PID_MAX_LIMIT`, 2^22 on 64-bit), 512 KiB.
pub const PLAINTEXT_TRACED_WORDS: u32 = (1 << 22) / 64;

/// Every plaintext map (part of `ALL_MAPS`).
pub const PLAINTEXT_MAPS: [&str; 10] = [
    MAP_PLAINTEXT,
    MAP_PLAINTEXT_CALLS,
    MAP_PLAINTEXT_SOCKS,
    MAP_PLAINTEXT_PENDING,
    MAP_PLAINTEXT_GO_CALLS,
    MAP_PLAINTEXT_CFG,
    MAP_PLAINTEXT_WORKLOADS,
    MAP_PLAINTEXT_SCRATCH,
    MAP_PLAINTEXT_STATS,
    MAP_PLAINTEXT_TRACED,
];

/// Wakeups of the agent's plaintext reader are batched as those of
/// `EVENTS` are (`EVENTS_WAKE_NS`): a CPU wakes the reader for a record only
/// when it has not in the last `PLAINTEXT_WAKE_NS` (or when a quarter of
/// the ring waits); the reader, once woken, drains again every
/// `PLAINTEXT_WAKE_NS` for `2 × PLAINTEXT_WAKE_NS`. A wakeup per SSL call
/// was most of the calls' cost (docs/benchmarks.md, "Plaintext uprobes").
pub const PLAINTEXT_WAKE_NS: u64 = 5_000_000;

/// The plaintext ring: 8 MiB.
pub const PLAINTEXT_BYTES: u32 = 8 << 20;
/// Bytes of plaintext one record carries (a TLS record's plaintext is at
/// most 2^14 bytes, so an `SSL_read` fills at most one piece).
pub const PLAINTEXT_PIECE: usize = 16_384;
/// Pieces copied of one call: bytes past `PLAINTEXT_CALL_MAX` (1 MiB) of
/// one call are not copied (the record says `TRUNCATED` and the call's full
/// length). An SDK sends a request body in one `SSL_write`: 1 MiB holds a
/// prompt of ~250,000 tokens of English.
pub const PLAINTEXT_PIECES: usize = 64;
pub const PLAINTEXT_CALL_MAX: usize = PLAINTEXT_PIECE * PLAINTEXT_PIECES;
/// Threads inside an SSL call at once.
pub const PLAINTEXT_CALLS_MAX: u32 = 16_384;
/// `SSL*`s whose socket is remembered.
pub const PLAINTEXT_SOCKS_MAX: u32 = 65_536;
/// Threads with a write waiting to be joined (`PLAINTEXT_PENDING`).
pub const PLAINTEXT_PENDING_MAX: u32 = 16_384;
/// How soon after the write the thread's socket send must come to join
/// it: Node sends the records in the same call stack (microseconds).
pub const PLAINTEXT_PENDING_NS: u64 = 20_000_000;
/// `PLAINTEXT_WORKLOADS` entries.
pub const PLAINTEXT_WORKLOADS_MAX: u32 = 4_096;

/// The key of `PLAINTEXT_WORKLOADS`.
pub const fn workload_key(generation: u64, workload_id: u32) -> u64 {
    (generation << 32) | workload_id as u64
}

/// `PlaintextHeader::kind` values.
pub mod plaintext_kind {
    /// Plaintext of a TLS call (`PlaintextRecord`).
    pub const CHUNK: u32 = 1;
    /// A process exec'd in an `exact_tokens` workload (header only).
    pub const EXEC: u32 = 2;
    /// An `SSL*` joined to its socket after its calls (header only:
    /// `tgid`, `ssl`, `cookie`): a write that touched no socket, then the
    /// same thread's next socket send (`PLAINTEXT_PENDING`).
    pub const LINK: u32 = 3;
}

/// `PlaintextHeader::direction` values.
pub mod plaintext_dir {
    /// `SSL_write`/`SSL_write_ex`: bytes the process sent.
    pub const SENT: u8 = 0;
    /// `SSL_read`/`SSL_read_ex`: bytes the process received.
    pub const RECEIVED: u8 = 1;
}

/// Bits of the attach cookie of the SSL uprobes and of `SslCall::flags`.
pub mod call_flags {
    /// `SSL_read`/`SSL_read_ex` (else a write).
    pub const READ: u64 = 1;
    /// The `_ex` form: success is 1, the length is in the 4th argument.
    pub const EX: u64 = 2;
    /// Go's `crypto/tls.(*Conn).Write`/`Read`: arguments and results in
    /// Go's registers; a write without a cookie is never joined (it has
    /// sent its records already).
    pub const GO: u64 = 4;
}

/// `PlaintextHeader::flags` bits.
pub mod plaintext_flags {
    /// The call moved more than `PLAINTEXT_CALL_MAX` bytes: only the first
    /// are copied.
    pub const TRUNCATED: u8 = 1;
    /// The cookie came from a TCP call inside this SSL call.
    pub const COOKIE_SEEN: u8 = 2;
    /// The cookie is the one remembered for this `SSL*`.
    pub const COOKIE_REMEMBERED: u8 = 4;
    /// `plaintext_kind::EXEC`: the process was stopped (SIGSTOP) and waits for the
    /// agent's SIGCONT.
    pub const PAUSED: u8 = 8;
    /// A piece could not be read from the process's memory.
    pub const UNREADABLE: u8 = 16;
}

/// Indexes into `PLAINTEXT_STATS`. Never reuse a number.
pub mod plaintext_stat {
    /// SSL calls that returned data.
    pub const CALLS: u32 = 0;
    /// Plaintext bytes copied to the ring.
    pub const BYTES: u32 = 1;
    /// Records lost: the ring was full.
    pub const LOST: u32 = 2;
    /// Calls longer than `PLAINTEXT_CALL_MAX`.
    pub const TRUNCATED: u32 = 3;
    /// Calls with no socket cookie (no TCP call seen under this `SSL*`).
    pub const NO_COOKIE: u32 = 4;
    /// Returns without a recorded entry (the entry map was full, or the
    /// probes were attached while the call was in progress).
    pub const NO_ENTRY: u32 = 5;
    /// Execs in an `exact_tokens` workload reported (and paused).
    pub const EXECS: u32 = 6;
    /// Execs in such a workload that could not be reported (ring full):
    /// not paused, attached later by the agent's scan (a race).
    pub const EXECS_LOST: u32 = 7;
    /// Pieces whose bytes could not be read from the process's memory.
    pub const UNREADABLE: u32 = 8;
    /// Not a counter: this CPU's `bpf_ktime_get_ns()` when it last woke
    /// the agent's reader (`PLAINTEXT_WAKE_NS`).
    pub const LAST_WAKE_NS: u32 = 9;
    /// `SSL*`s joined to a socket by the thread's next send (`LINK`).
    pub const LINKED: u32 = 10;
    pub const LEN: u32 = 11;
}

/// `PLAINTEXT_CFG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaintextConfig {
    /// Offset of `skc_cookie` in `struct sock` (`__sk_common.skc_cookie`),
    /// from the kernel's BTF; 0: unknown, no cookie is read.
    pub sk_cookie_offset: u32,
    /// 1: the exec program reports and pauses execs of `exact_tokens`
    /// workloads; 0: it returns at once.
    pub exec_enabled: u32,
}

/// The least a TLS record adds to its plaintext (`PLAINTEXT_PENDING`):
/// a 5-byte header and a 16-byte AEAD tag (TLS 1.3 adds a content-type
/// byte, TLS 1.2 GCM an 8-byte nonce). A send shorter than the write plus
/// this does not carry all of it, so it is not the write's records.
pub const TLS_RECORD_OVERHEAD_MIN: u64 = 21;

/// A write waiting to be joined (`PLAINTEXT_PENDING`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslPending {
    pub ssl: u64,
    /// Plaintext bytes the write moved.
    pub len: u64,
    /// `bpf_ktime_get_ns()` at its return.
    pub ns: u64,
}

/// An SSL call in progress (`PLAINTEXT_CALLS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SslCall {
    pub ssl: u64,
    pub buf: u64,
    /// The 4th argument of the `_ex` forms (`size_t *written/readbytes`).
    pub out: u64,
    /// The socket cookie of a TCP call made inside this call; 0: none yet.
    pub cookie: u64,
    /// `call_flags::*`
    pub flags: u64,
}

/// Key of `PLAINTEXT_SOCKS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SslKey {
    pub tgid: u64,
    pub ssl: u64,
}

/// The header of every record on `PLAINTEXT`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlaintextHeader {
    /// `plaintext_kind::*`
    pub kind: u32,
    /// `plaintext_dir::*`
    pub direction: u8,
    /// `plaintext_flags::*`
    pub flags: u8,
    pub _pad: u16,
    /// `bpf_ktime_get_ns()` at the call's return (the same in every piece
    /// of one call); for `EXEC`, at the exec.
    pub call_ns: u64,
    /// Kernel thread id.
    pub tid: u32,
    /// Process id.
    pub tgid: u32,
    /// Inode of the task's cgroup v2 directory.
    pub cgroup_id: u64,
    /// Socket cookie of the connection (as the connect hook's events and
    /// the agent's accounting have it); 0: unknown.
    pub cookie: u64,
    /// The `SSL*` (a connection key within the process when the cookie is
    /// unknown).
    pub ssl: u64,
    /// Bytes the call moved (all of them, also those not copied).
    pub call_len: u64,
    /// Offset of this piece within the call.
    pub offset: u32,
    /// Bytes of `data` used.
    pub len: u32,
}

/// A record of kind `CHUNK` (only `header.len` bytes of `data` are sent).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaintextRecord {
    pub header: PlaintextHeader,
    pub data: [u8; PLAINTEXT_PIECE],
}

/// Bytes of a record before its data.
pub const PLAINTEXT_HEADER_BYTES: usize = core::mem::size_of::<PlaintextHeader>();

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<PlaintextConfig>() == 8);
    assert!(size_of::<SslCall>() == 40 && align_of::<SslCall>() == 8);
    assert!(size_of::<SslKey>() == 16);
    assert!(size_of::<SslPending>() == 24);
    assert!(size_of::<PlaintextHeader>() == 64 && align_of::<PlaintextHeader>() == 8);
    assert!(size_of::<PlaintextRecord>() == 64 + PLAINTEXT_PIECE);
    assert!(PLAINTEXT_PIECE.is_power_of_two());
};

#[cfg(feature = "user")]
// SAFETY: repr(C) integers, no padding.
unsafe impl aya::Pod for PlaintextConfig {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SslKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SslCall {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SslPending {}
