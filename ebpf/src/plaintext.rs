//! Plaintext of TLS calls (docs/plaintext.md): OpenSSL's (shared, or
//! linked into an executable), GnuTLS's `gnutls_record_send`/`_recv`
//! (the same programs: the same arguments and results), and Go's
//! `crypto/tls` (its own programs, below).
//!
//! - `plaintext_ssl_entry`, a uprobe on `SSL_write`, `SSL_read`,
//!   `SSL_write_ex`, `SSL_read_ex` (attach cookie: `call_flags`), attached
//!   by the agent per process of an `exact_tokens` workload: remembers the
//!   call's `SSL*`, buffer and out-pointer in `PLAINTEXT_CALLS` by thread.
//!   Prototypes (OpenSSL 3, include/openssl/ssl.h):
//!   `int SSL_write(SSL *s, const void *buf, int num)`,
//!   `int SSL_read(SSL *s, void *buf, int num)`,
//!   `int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)`,
//!   `int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *readbytes)`.
//!   OpenSSL 3's `SSL_read`/`SSL_write` call an internal function, not
//!   the `_ex` forms, so one application call is seen once.
//! - `plaintext_sock_msg`, raw tracepoints sock/sock_send_length and
//!   sock/sock_recv_length (6.4+), or where they are missing the kprobes
//!   `plaintext_tcp_send` on `tcp_sendmsg(struct sock *sk, struct msghdr
//!   *msg, size_t size)` and `plaintext_tcp_msg` on `tcp_recvmsg(struct
//!   sock *sk, ...)` (the first argument since 4.x; kernels built without
//!   CONFIG_KPROBES have none). They run for every socket call on the
//!   host: a process the agent does not trace (no bit in
//!   `PLAINTEXT_TRACED`) returns after one array read. For a traced one,
//!   when the thread is inside an SSL call, reads the socket's cookie
//!   (`sk->__sk_common.skc_cookie`, at the offset the agent found in the
//!   kernel's BTF) into the call. A cookie is 0 until something asked for
//!   it; the connect hook asks for every provider connection it tracks,
//!   so the connections the agent accounts have one. Outside SSL calls,
//!   the tracepoint (with the bytes moved) or the `tcp_sendmsg` kprobe
//!   (with the bytes asked) joins the thread's pending write (below) to
//!   the socket it sends on.
//! - A write that returns with no cookie (OpenSSL over memory BIOs, as in
//!   Node.js: the caller sends the records itself, right after) is left in
//!   `PLAINTEXT_PENDING` by thread. The thread's next socket call within
//!   `PLAINTEXT_PENDING_NS` that moved at least the write's length plus
//!   `TLS_RECORD_OVERHEAD_MIN` joins the `SSL*` to that socket: its cookie
//!   goes to `PLAINTEXT_SOCKS` (later calls find it) and a `LINK` record
//!   to the reader. A guess by thread and size, not a proof: a thread that
//!   writes on one `SSL*` and sends as much on another socket first would
//!   join the wrong one (docs/plaintext.md, "Memory BIOs").
//! - `plaintext_ssl_return`, a uretprobe on the same four functions: the
//!   length the call moved (the return value, or `*out` of the `_ex` forms
//!   when they return 1), then the plaintext copied from the caller's
//!   buffer with `bpf_probe_read_user` in pieces of `PLAINTEXT_PIECE`
//!   bytes, at most `PLAINTEXT_PIECES` of them (one `bpf_loop` step each:
//!   the verifier checks one piece, whatever the count), each a record on
//!   `PLAINTEXT`. Reading at the return serves both directions: a write's
//!   buffer is unchanged, and a write that returns "retry" (non-blocking
//!   sockets) copies nothing, so a retried write is not seen twice. The
//!   cookie is the one seen by the kprobe during the call, else the one
//!   last seen for this `SSL*` (`PLAINTEXT_SOCKS`: a read served from a
//!   record OpenSSL had already received touches no socket).
//! - `plaintext_exec`, tracepoint sched/sched_process_exec: a process that
//!   execs in a workload whose `exact_tokens` is on is reported on
//!   `PLAINTEXT` and stopped (SIGSTOP, delivered before its first user
//!   instruction) until the agent has attached the uprobes and sent
//!   SIGCONT: without the pause, a short client (curl) could finish its
//!   request before the probes are in place. The record is reserved before
//!   the signal is sent, so a process is never stopped without the agent
//!   hearing of it; with the ring full it is not stopped (counted).
//!
//! - `plaintext_go_entry`, a uprobe at the entry of Go's
//!   `crypto/tls.(*Conn).Write` and `Read` (attach cookie `GO`, `| READ`),
//!   and `plaintext_go_return`, a uprobe at each of their `RET`s (Go moves
//!   goroutine stacks: no uretprobe): Go's register ABI, the call kept by
//!   goroutine (`R14`) in `PLAINTEXT_GO_CALLS` and by thread in
//!   `PLAINTEXT_CALLS` for the socket hooks; the return copies as the
//!   OpenSSL return does.
//!
//! Internal errors lose plaintext, never a verdict: every program returns 0.

use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_attach_cookie, bpf_loop, bpf_probe_read_user, bpf_send_signal},
    },
    macros::{kprobe, raw_tracepoint, tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext, TracePointContext},
};
use llm_egress_common::{
    PLAINTEXT_BYTES, PLAINTEXT_HEADER_BYTES, PLAINTEXT_PENDING_NS, PLAINTEXT_PIECE,
    PLAINTEXT_PIECES, PLAINTEXT_WAKE_NS, PlaintextHeader, SslCall, SslKey, SslPending,
    TLS_RECORD_OVERHEAD_MIN, call_flags, plaintext_dir, plaintext_flags, plaintext_kind,
    plaintext_stat, workload_key,
};

use crate::maps::{
    PLAINTEXT, PLAINTEXT_CALLS, PLAINTEXT_CFG, PLAINTEXT_GO_CALLS, PLAINTEXT_PENDING,
    PLAINTEXT_SCRATCH, PLAINTEXT_SOCKS, PLAINTEXT_STATS, PLAINTEXT_TRACED, PLAINTEXT_WORKLOADS,
    add_u64,
};

/// SIGSTOP on every architecture Linux runs eBPF on.
const SIGSTOP: u32 = 19;

#[inline(always)]
fn stat(index: u32, n: u64) {
    if let Some(p) = PLAINTEXT_STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of the array.
        unsafe { add_u64(p, n) };
    }
}

#[uprobe]
pub fn plaintext_ssl_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: the context of a uprobe; the cookie is what the agent gave.
    let flags = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let call = SslCall {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: ctx.arg::<u64>(1).unwrap_or(0),
        out: if flags & call_flags::EX != 0 {
            ctx.arg::<u64>(3).unwrap_or(0)
        } else {
            0
        },
        cookie: 0,
        flags,
    };
    let id = bpf_get_current_pid_tgid();
    let _ = PLAINTEXT_CALLS.insert(&id, &call, 0);
    0
}

#[kprobe]
pub fn plaintext_tcp_msg(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        // `tcp_recvmsg`'s length is the reader's buffer, not what moved:
        // no write is joined from here.
        note_socket(sk, -1);
    }
    0
}

#[kprobe]
pub fn plaintext_tcp_send(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(0) {
        // `tcp_sendmsg(sk, msg, size)`: what the caller asks to send, all
        // of it for a blocking socket, and on a non-blocking one what is
        // left of the records the write produced: the first send after
        // the write asks for at least its records.
        let size = ctx.arg::<u64>(2).unwrap_or(0);
        note_socket(
            sk,
            if size > i64::MAX as u64 {
                -1
            } else {
                size as i64
            },
        );
    }
    0
}

/// A raw tracepoint (no trace record is built: the arguments as the
/// kernel passes them): sock/sock_send_length and sock/sock_recv_length,
/// `TP_PROTO(struct sock *sk, int ret, int flags)` (6.4+; called by
/// sock_sendmsg_nosec / sock_recvmsg_nosec in the caller's context, for
/// every socket family).
#[raw_tracepoint]
pub fn plaintext_sock_msg(ctx: RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    // `ret`: the bytes moved, or an error (an int in a u64 slot).
    let moved = ctx.arg::<u64>(1) as i32;
    note_socket(sk, i64::from(moved));
    0
}

/// When the thread is inside an SSL call: the cookie of socket `sk` into
/// the call. Else, when the thread's last write went to no socket
/// (`PLAINTEXT_PENDING`): this call, if it moved at least that write's
/// records (`moved`; -1: unknown, never joins), joins the write's `SSL*`
/// to `sk`.
#[inline(always)]
fn note_socket(sk: u64, moved: i64) {
    let id = bpf_get_current_pid_tgid();
    // Every other process on the host stops here (one array read).
    let tgid = (id >> 32) as u32;
    match PLAINTEXT_TRACED.get(tgid / 64) {
        Some(word) if *word & (1 << (tgid % 64)) != 0 => {}
        _ => return,
    }
    let call = PLAINTEXT_CALLS.get_ptr_mut(&id);
    if call.is_none() && moved < 0 {
        return;
    }
    let Some(cfg) = PLAINTEXT_CFG.get(0) else {
        return;
    };
    let offset = cfg.sk_cookie_offset as u64;
    if offset == 0 || sk == 0 {
        return;
    }
    match call {
        Some(call) => {
            // The first socket the call touches: an OpenSSL call touches
            // one; a Go call's goroutine may park after its first socket
            // call (EAGAIN), and other goroutines then run on this thread.
            // SAFETY: this thread's live entry; only this thread writes it.
            if unsafe { (*call).cookie } != 0 {
                return;
            }
            // SAFETY: a probe read of kernel memory, which faults safely.
            if let Ok(cookie) = unsafe { bpf_probe_read_kernel((sk + offset) as *const u64) }
                && cookie != 0
            {
                // SAFETY: as above.
                unsafe { (*call).cookie = cookie };
            }
        }
        None => join_pending(id, sk + offset, moved as u64),
    }
}

/// The thread's pending write (if any, recent, and no longer than `moved`
/// allows) is joined to the socket whose cookie is at `cookie_at`: later
/// calls on its `SSL*` find the cookie in `PLAINTEXT_SOCKS`, and a `LINK`
/// record tells the reader, which holds the calls it delivered without one.
#[inline(always)]
fn join_pending(id: u64, cookie_at: u64, moved: u64) {
    // SAFETY: copied out at once; only this thread writes its entry.
    let Some(p) = (unsafe { PLAINTEXT_PENDING.get(&id) }).copied() else {
        return;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(p.ns) > PLAINTEXT_PENDING_NS {
        let _ = PLAINTEXT_PENDING.remove(&id);
        return;
    }
    if moved < p.len + TLS_RECORD_OVERHEAD_MIN {
        return;
    }
    // SAFETY: a probe read of kernel memory, which faults safely.
    let Ok(cookie) = (unsafe { bpf_probe_read_kernel(cookie_at as *const u64) }) else {
        return;
    };
    if cookie == 0 {
        return;
    }
    let _ = PLAINTEXT_PENDING.remove(&id);
    let tgid = id >> 32;
    let _ = PLAINTEXT_SOCKS.insert(&SslKey { tgid, ssl: p.ssl }, &cookie, 0);
    stat(plaintext_stat::LINKED, 1);
    let link = PlaintextHeader {
        kind: plaintext_kind::LINK,
        call_ns: now,
        tid: id as u32,
        tgid: tgid as u32,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        ssl: p.ssl,
        ..PlaintextHeader::default()
    };
    if PLAINTEXT
        .output::<PlaintextHeader>(&link, wake_flags())
        .is_err()
    {
        stat(plaintext_stat::LOST, 1);
    }
}

#[uretprobe]
pub fn plaintext_ssl_return(ctx: RetProbeContext) -> u32 {
    let _ = try_ssl_return(&ctx);
    0
}

/// Go's register ABI (ABIInternal, amd64, Go 1.17+): the method's
/// receiver and the slice's pointer and length in RAX, RBX, RCX at entry,
/// the first result (`n int`) in RAX at return, and the running
/// goroutine's `g` in R14 throughout.
#[inline(always)]
fn go_regs(ctx: &ProbeContext) -> (u64, u64, u64, u64) {
    // SAFETY: the context of a uprobe is the user registers (`pt_regs`).
    unsafe {
        let r = &*ctx.regs;
        (r.rax, r.rbx, r.rcx, r.r14)
    }
}

#[uprobe]
pub fn plaintext_go_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: the context of a uprobe; the cookie is what the agent gave.
    let flags = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    let (conn, buf, _len, g) = go_regs(&ctx);
    let id = bpf_get_current_pid_tgid();
    // The thread's entry gathers the socket cookie of the call's socket
    // writes and reads on this thread (the sock hooks); the goroutine's
    // entry finds it again at the return, on whatever thread.
    let call = SslCall {
        ssl: conn,
        buf,
        out: id,
        cookie: 0,
        flags,
    };
    let _ = PLAINTEXT_CALLS.insert(&id, &call, 0);
    let key = SslKey {
        tgid: id >> 32,
        ssl: g,
    };
    let _ = PLAINTEXT_GO_CALLS.insert(&key, &call, 0);
    0
}

#[uprobe]
pub fn plaintext_go_return(ctx: ProbeContext) -> u32 {
    let (ret, _, _, g) = go_regs(&ctx);
    let id = bpf_get_current_pid_tgid();
    let key = SslKey {
        tgid: id >> 32,
        ssl: g,
    };
    // SAFETY: copied out at once.
    let Some(mut call) = (unsafe { PLAINTEXT_GO_CALLS.get(&key) }).copied() else {
        stat(plaintext_stat::NO_ENTRY, 1);
        return 0;
    };
    let _ = PLAINTEXT_GO_CALLS.remove(&key);
    // The entering thread's entry, if it is still this call's.
    // SAFETY: copied out at once.
    if let Some(t) = (unsafe { PLAINTEXT_CALLS.get(&call.out) }).copied()
        && t.ssl == call.ssl
        && t.buf == call.buf
    {
        call.cookie = t.cookie;
        let _ = PLAINTEXT_CALLS.remove(&call.out);
    }
    let n = ret as i64;
    if n > 0 {
        let _ = emit(id, &call, n as u64);
    }
    0
}

fn try_ssl_return(ctx: &RetProbeContext) -> Result<(), i64> {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out at once; only this thread writes its entry.
    let Some(call) = (unsafe { PLAINTEXT_CALLS.get(&id) }).copied() else {
        stat(plaintext_stat::NO_ENTRY, 1);
        return Ok(());
    };
    let _ = PLAINTEXT_CALLS.remove(&id);
    let ret: i64 = ctx.ret();
    let n: u64 = if call.flags & call_flags::EX != 0 {
        if ret as i32 != 1 || call.out == 0 {
            return Ok(());
        }
        // SAFETY: a probe read of user memory, which faults safely.
        unsafe { aya_ebpf::helpers::bpf_probe_read_user(call.out as *const u64) }
            .map_err(i64::from)?
    } else {
        let r = ret as i32;
        if r <= 0 {
            return Ok(());
        }
        r as u64
    };
    emit(id, &call, n)
}

/// Copies the `n` bytes `call` moved to the ring, with the socket cookie
/// of the call or the one last seen for its `SSL*`.
#[inline(always)]
fn emit(id: u64, call: &SslCall, n: u64) -> Result<(), i64> {
    if n == 0 {
        return Ok(());
    }
    let tgid = id >> 32;
    let key = SslKey {
        tgid,
        ssl: call.ssl,
    };
    let mut flags = 0u8;
    let cookie = if call.cookie != 0 {
        flags |= plaintext_flags::COOKIE_SEEN;
        let _ = PLAINTEXT_SOCKS.insert(&key, &call.cookie, 0);
        call.cookie
    } else {
        // SAFETY: copied out at once.
        match unsafe { PLAINTEXT_SOCKS.get(&key) } {
            Some(c) => {
                flags |= plaintext_flags::COOKIE_REMEMBERED;
                *c
            }
            None => {
                stat(plaintext_stat::NO_COOKIE, 1);
                if call.flags & (call_flags::READ | call_flags::GO) == 0 {
                    let pending = SslPending {
                        ssl: call.ssl,
                        len: n,
                        // SAFETY: helper without arguments.
                        ns: unsafe { bpf_ktime_get_ns() },
                    };
                    let _ = PLAINTEXT_PENDING.insert(&id, &pending, 0);
                }
                0
            }
        }
    };
    if n > llm_egress_common::PLAINTEXT_CALL_MAX as u64 {
        flags |= plaintext_flags::TRUNCATED;
        stat(plaintext_stat::TRUNCATED, 1);
    }
    stat(plaintext_stat::CALLS, 1);
    let header = PlaintextHeader {
        kind: plaintext_kind::CHUNK,
        direction: if call.flags & call_flags::READ != 0 {
            plaintext_dir::RECEIVED
        } else {
            plaintext_dir::SENT
        },
        flags,
        _pad: 0,
        // SAFETY: helper without arguments.
        call_ns: unsafe { bpf_ktime_get_ns() },
        tid: id as u32,
        tgid: tgid as u32,
        // SAFETY: helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        cookie,
        ssl: call.ssl,
        call_len: n,
        offset: 0,
        len: 0,
    };
    let Some(rec) = PLAINTEXT_SCRATCH.get_ptr_mut(0) else {
        return Ok(());
    };
    // SAFETY: this CPU's scratch (uprobe programs run with preemption
    // disabled); the pieces below fill in offset, len and flags.
    unsafe { (*rec).header = header };
    let pieces = n.div_ceil(PLAINTEXT_PIECE as u64);
    let mut copy = Pieces {
        buf: call.buf,
        len: n,
        flags: u64::from(flags),
    };
    // SAFETY: `piece_step` is a bpf_loop callback; its context is `copy`,
    // on this frame's stack for the whole loop.
    unsafe {
        bpf_loop(
            if pieces > PLAINTEXT_PIECES as u64 {
                PLAINTEXT_PIECES as u32
            } else {
                pieces as u32
            },
            piece_step as *mut c_void,
            (&mut copy as *mut Pieces).cast(),
            0,
        );
    }
    Ok(())
}

/// What [`piece_step`] copies: the caller's buffer, the bytes the call
/// moved, the header's flags.
#[repr(C)]
struct Pieces {
    buf: u64,
    len: u64,
    flags: u64,
}

/// bpf_loop callback: piece `index` of the call (`PLAINTEXT_PIECE` bytes,
/// the last one shorter) copied into the scratch record, whose header the
/// caller filled, and output to the ring. Returns 1 to stop.
#[inline(never)]
extern "C" fn piece_step(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: the caller passes its `Pieces` (see `emit`).
    let call = unsafe { &*(ctx as *const Pieces) };
    let offset = index * PLAINTEXT_PIECE as u64;
    if offset >= call.len || offset >= llm_egress_common::PLAINTEXT_CALL_MAX as u64 {
        return 1;
    }
    let rest = call.len - offset;
    let len = if rest > PLAINTEXT_PIECE as u64 {
        PLAINTEXT_PIECE
    } else {
        rest as usize
    };
    piece(call.buf + offset, offset as u32, call.flags as u8, len);
    0
}

/// Copies `len` (1..=`PLAINTEXT_PIECE`) bytes at `src` into the scratch
/// record (its header filled by the caller) and the record to the ring.
#[inline(always)]
fn piece(src: u64, offset: u32, flags: u8, len: usize) {
    let Some(rec) = PLAINTEXT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let size = crate::verifier::helper_len(len, PLAINTEXT_PIECE);
    // SAFETY: this CPU's scratch (uprobe programs run with preemption
    // disabled); `size` is at most the data's length; the source is read
    // with the probe-read helper, which faults safely.
    unsafe {
        (*rec).header.offset = offset;
        (*rec).header.flags = flags;
        let used =
            if bpf_probe_read_user((*rec).data.as_mut_ptr().cast(), size, src as *const _) == 0 {
                size
            } else {
                (*rec).header.flags |= plaintext_flags::UNREADABLE;
                stat(plaintext_stat::UNREADABLE, 1);
                0
            };
        (*rec).header.len = used;
        // At most the record's size: `used` is 0 or `size`.
        let bytes =
            core::slice::from_raw_parts(rec as *const u8, PLAINTEXT_HEADER_BYTES + used as usize);
        match PLAINTEXT.output::<[u8]>(bytes, wake_flags()) {
            Ok(()) => stat(plaintext_stat::BYTES, u64::from(used)),
            Err(_) => stat(plaintext_stat::LOST, 1),
        }
    }
}

/// The flags of a record's output: wake the reader when this CPU has not
/// woken it for `PLAINTEXT_WAKE_NS` or a quarter of the ring waits, else
/// no wakeup (the reader's tail drains pick the record up: common's
/// `PLAINTEXT_WAKE_NS`).
#[inline(always)]
fn wake_flags() -> u64 {
    if PLAINTEXT.query(u64::from(BPF_RB_AVAIL_DATA)) >= u64::from(PLAINTEXT_BYTES / 4) {
        return u64::from(BPF_RB_FORCE_WAKEUP);
    }
    let Some(last) = PLAINTEXT_STATS.get_ptr_mut(plaintext_stat::LAST_WAKE_NS) else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: this CPU's slot; preemption is disabled in the program.
    unsafe {
        if now.wrapping_sub(*last) < PLAINTEXT_WAKE_NS {
            return u64::from(BPF_RB_NO_WAKEUP);
        }
        *last = now;
    }
    u64::from(BPF_RB_FORCE_WAKEUP)
}

#[tracepoint]
pub fn plaintext_exec(_ctx: TracePointContext) -> u32 {
    let _ = try_exec();
    0
}

fn try_exec() -> Result<(), i64> {
    let Some(cfg) = PLAINTEXT_CFG.get(0) else {
        return Ok(());
    };
    if cfg.exec_enabled == 0 {
        return Ok(());
    }
    let Ok((slot, slot_cfg)) = crate::policy::active() else {
        return Ok(());
    };
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    let Some(w) = crate::policy::workload_of(slot, own, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level)
    }) else {
        return Ok(());
    };
    let key = workload_key(slot_cfg.generation, w.workload_id);
    // SAFETY: presence only.
    if unsafe { PLAINTEXT_WORKLOADS.get(&key) }.is_none() {
        return Ok(());
    }
    let Some(mut entry) = PLAINTEXT.reserve::<PlaintextHeader>(0) else {
        stat(plaintext_stat::EXECS_LOST, 1);
        return Ok(());
    };
    let id = bpf_get_current_pid_tgid();
    // SAFETY: SIGSTOP to the current process (not a kernel thread, not
    // init); it takes effect when the exec returns to user space.
    let paused = unsafe { bpf_send_signal(SIGSTOP) } == 0;
    entry.write(PlaintextHeader {
        kind: plaintext_kind::EXEC,
        direction: 0,
        flags: if paused { plaintext_flags::PAUSED } else { 0 },
        _pad: 0,
        // SAFETY: helper without arguments.
        call_ns: unsafe { bpf_ktime_get_ns() },
        tid: id as u32,
        tgid: (id >> 32) as u32,
        cgroup_id: own,
        cookie: 0,
        ssl: 0,
        call_len: 0,
        offset: 0,
        len: 0,
    });
    entry.submit(0);
    stat(plaintext_stat::EXECS, 1);
    Ok(())
}
