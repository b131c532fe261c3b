//! cgroup_sock_addr hooks: the connect-time verdict.
//!
//! `connect4`/`connect6` judge every `connect()` (TCP, and UDP sockets that
//! connect), `sendmsg4`/`sendmsg6` every unconnected UDP datagram with an
//! explicit destination. An IPv4-mapped IPv6 destination, and one under a
//! NAT64 prefix of the policy (nat64.rs), is judged as IPv4.
//!
//! Context (include/uapi/linux/bpf.h, struct bpf_sock_addr): `user_ip4` and
//! `user_ip6[]` are network order; `user_port` is network order in the low
//! 16 bits. Returning 1 allows; 0 makes the syscall fail with EPERM.
//!
//! Decision, in order (docs/policy.md has the user's version):
//! 1. the workload: the deepest ancestor cgroup of the task found in
//!    `WORKLOADS` for the active slot (none: the policy's defaults);
//! 2. the workload's CIDR rules (`RULES_*`, longest prefix);
//! 3. provider destinations (`DESTS_*`, with ports, else an address learned
//!    from a DNS answer to a socket of the same workload: `LEARNED_*` under
//!    the task's scope, dns.rs): the workload's word on that provider
//!    (`PROVIDER_ACT`) or its `llm` action;
//! 4. otherwise the workload's `other` action.
//! 5. an allowed provider connection of a workload then meets the pair's
//!    limits (`LIMITS`, ebpf/src/limits.rs): a spent token budget refuses
//!    it, and a connect() takes one from the connection-rate bucket.
//!
//! Internal errors (no active policy slot, a missing slot config) are decided
//! by the `failure_mode` in `ACTIVE` and counted in `INTERNAL_ERRORS`.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_comm, bpf_get_socket_cookie,
        },
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use llm_egress_common::{
    ConnectEvent, EventHeader, MAX_PORTS, NO_PROVIDER, NO_SCOPE, NO_WORKLOAD,
    PREFIX_KEY_HEADER_BITS, PrefixKeyV4, PrefixKeyV6, VerdictKey, action, counter, failure_mode,
    family, hook, kind, limit_flag, limit_kind, mode, proto, reason, verdict,
};

use crate::maps::{
    CONN_ZERO, CONNS, DESTS_V4, DESTS_V6, EVENTS, RULES_V4, RULES_V6, count, count_verdict,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn verdict_connect4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx, hook::CONNECT4)
}

/// Starts tracking an allowed TCP connection to a provider: `CONNS` keeps
/// who connected where, sock_ops adds bytes and times and reports it.
/// The entry is created zeroed (from `CONN_ZERO`) and filled in place: it
/// is this socket's, which nothing else touches before the connect goes on
/// (a shared per-CPU scratch could be overwritten by a connect() that
/// preempts this one on the same CPU). A full map evicts the oldest entry
/// (LRU); failures only lose accounting. Whether the entry was written.
#[inline(always)]
fn track(ctx: &SockAddrContext, dest: &Dest, d: &Decision, buckets: (u64, u64)) -> bool {
    let Some(zero) = CONN_ZERO.get(0) else {
        return false;
    };
    // SAFETY: helper on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if CONNS.insert(&cookie, zero, 0).is_err() {
        return false;
    }
    let Some(entry) = CONNS.get_ptr_mut(&cookie) else {
        return false;
    };
    // SAFETY: `entry` points into this socket's CONNS value for this run.
    unsafe {
        fill_header(&mut (*entry).header, kind::CONN_SUMMARY);
        let c = &mut (*entry).data;
        c.cookie = cookie;
        c.generation = d.generation;
        c.connect_ns = (*entry).header.time_ns;
        c.workload_id = d.workload_id;
        c.provider_id = d.provider_id;
        c.addr = dest.addr;
        c.port = dest.port;
        c.family = dest.family;
        c.bandwidth_bucket = buckets.0;
        c.budget_bucket = buckets.1;
    }
    true
}

/// The envelope header of an event about the current task.
#[inline(always)]
pub(crate) fn fill_header(h: &mut EventHeader, event_kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    h.kind = event_kind;
    h._pad = 0;
    // SAFETY: helpers without pointer arguments.
    unsafe {
        h.time_ns = bpf_ktime_get_ns();
        h.cgroup_id = aya_ebpf::helpers::generated::bpf_get_current_cgroup_id();
    }
    h.pid = pid_tgid as u32;
    h.tgid = (pid_tgid >> 32) as u32;
    h.uid = uid_gid as u32;
    h.gid = (uid_gid >> 32) as u32;
    // SAFETY: the helper writes at most 16 bytes into `comm` (zeros on
    // failure). Not aya's `bpf_get_current_comm()`: its zeroed buffer and
    // `unwrap_or([0; 16])` are byte-by-byte `memset` loops, which 6.1's
    // verifier walks again on each of the ~200 paths that reach an event.
    unsafe { bpf_get_current_comm(h.comm.as_mut_ptr() as *mut _, h.comm.len() as u32) };
}

#[cgroup_sock_addr(sendmsg4)]
pub fn verdict_sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx, hook::SENDMSG4)
}

#[cgroup_sock_addr(connect6)]
pub fn verdict_connect6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx, hook::CONNECT6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn verdict_sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx, hook::SENDMSG6)
}

/// A destination as judged: IPv4 in the first four bytes of `addr` (and,
/// when given in IPv6 form, that form's first 12 bytes in bytes 4..16: see
/// `ConnectDecision::addr`).
struct Dest {
    family: u8,
    addr: [u8; 16],
    port: u16,
    proto: u8,
}

#[inline(always)]
fn judge_v4(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for this program type;
    // these are direct, aligned context loads the verifier checks.
    let (ip4, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.user_ip4, sa.user_port, sa.protocol)
    };
    let mut addr = [0u8; 16];
    let b = ip4.to_ne_bytes();
    addr[0] = b[0];
    addr[1] = b[1];
    addr[2] = b[2];
    addr[3] = b[3];
    let dest = Dest {
        family: family::INET,
        addr,
        port: port_of(port),
        proto: proto_of(protocol),
    };
    judge(ctx, &dest, hook)
}

#[inline(always)]
fn judge_v6(ctx: &SockAddrContext, hook: u8) -> i32 {
    // SAFETY: as in `judge_v4`; user_ip6 is read one aligned u32 at a time.
    let (w0, w1, w2, w3, port, protocol) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
            sa.user_port,
            sa.protocol,
        )
    };
    let mut addr = [0u8; 16];
    let words = [w0, w1, w2, w3];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let mut dest = Dest {
        family: family::INET6,
        addr,
        port: port_of(port),
        proto: proto_of(protocol),
    };
    // ::ffff:a.b.c.d is an IPv4 destination reached through a dual-stack
    // socket; P::a.b.c.d under a NAT64 /96 prefix P of the policy reaches
    // a.b.c.d through the network's NAT64 gateway (nat64.rs). Both are
    // judged as IPv4, and keep their first 12 bytes in bytes 4..16 for
    // the event (the agent tells the two forms apart by them). The NAT64
    // lookup comes first although it costs a mapped address a lookup: the
    // verifier then walks the IPv4 judgement with unknown bytes first, and
    // the mapped way (known zeros) is pruned against it (the other order
    // walks it twice: 34K instead of 16K instructions on 6.18).
    let mapped = w0 == 0 && w1 == 0 && u32::from_be(w2) == 0x0000_ffff;
    if crate::nat64::is_nat64(w0, w1, w2) || mapped {
        let b = w3.to_ne_bytes();
        dest.family = family::INET;
        dest.addr = [
            b[0], b[1], b[2], b[3], addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6],
            addr[7], addr[8], addr[9], addr[10], addr[11],
        ];
    }
    judge(ctx, &dest, hook)
}

#[inline(always)]
fn port_of(user_port: u32) -> u16 {
    u16::from_be(user_port as u16)
}

#[inline(always)]
fn proto_of(protocol: u32) -> u8 {
    if protocol == proto::UDP as u32 {
        proto::UDP
    } else {
        proto::TCP
    }
}

/// The outcome of the policy lookups, before `mode` is applied.
struct Decision {
    action: u8,
    reason: u8,
    slot: u32,
    workload_id: u32,
    provider_id: u32,
    generation: u64,
    mode: u8,
    /// The slot's `track`: sock_ops is attached to account what is tracked.
    track: bool,
}

#[inline(always)]
fn judge(ctx: &SockAddrContext, dest: &Dest, hook: u8) -> i32 {
    let mut decision = match decide(dest) {
        Ok(d) => d,
        Err(fail) => {
            count(counter::INTERNAL_ERRORS);
            let action = if fail == failure_mode::CLOSED {
                action::DENY
            } else {
                action::ALLOW
            };
            Decision {
                action,
                reason: reason::INTERNAL_ERROR,
                slot: 0,
                workload_id: NO_WORKLOAD,
                provider_id: NO_PROVIDER,
                generation: 0,
                mode: mode::ENFORCE,
                track: false,
            }
        }
    };
    let connect = hook == hook::CONNECT4 || hook == hook::CONNECT6;
    // Limits of an allowed provider connection of a workload
    // (ebpf/src/limits.rs): a spent token budget or connection rate turns
    // it into a deny, which `mode = "audit"` reports instead.
    let mut limit = None;
    if decision.action != action::DENY
        && decision.provider_id != NO_PROVIDER
        && decision.workload_id != NO_WORKLOAD
    {
        // SAFETY: helper without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        limit = crate::limits::connect_limit(
            decision.slot,
            decision.workload_id,
            decision.provider_id,
            connect,
            now,
        );
        if let Some(l) = &limit
            && l.hit != 0
        {
            decision.action = action::DENY;
            decision.reason = if l.hit == limit_kind::CONNECTIONS {
                reason::RATE_LIMITED
            } else {
                reason::TOKEN_BUDGET
            };
        }
    }
    let v = match decision.action {
        action::ALLOW => verdict::ALLOW,
        action::AUDIT => verdict::AUDIT,
        _ if decision.mode == mode::AUDIT => verdict::AUDIT,
        _ => verdict::DENY,
    };
    if let Some(l) = &limit
        && l.hit != 0
    {
        crate::limits::count_hit(l.limits.bucket, l.hit, v);
    }
    count(match v {
        verdict::ALLOW => counter::VERDICT_ALLOW,
        verdict::AUDIT => counter::VERDICT_AUDIT,
        _ => counter::VERDICT_DENY,
    });
    count_verdict(&verdict_key(&decision, v));
    let mut tracked = false;
    if v != verdict::DENY
        && decision.track
        && decision.provider_id != NO_PROVIDER
        && connect
        && dest.proto == proto::TCP
    {
        let bucket_if = |flag: u32| match &limit {
            Some(l) if l.limits.flags & flag != 0 => l.limits.bucket,
            _ => 0,
        };
        let buckets = (
            bucket_if(limit_flag::BANDWIDTH),
            bucket_if(limit_flag::BUDGET),
        );
        tracked = track(ctx, dest, &decision, buckets);
        if tracked {
            crate::sock_ops::set_tracked_cb_flags(ctx);
        }
    }
    if v != verdict::ALLOW || decision.provider_id != NO_PROVIDER {
        report(ctx, dest, hook, v, &decision, tracked);
    }
    if v == verdict::DENY { DENY } else { ALLOW }
}

/// The `VERDICTS` key of a decision, built as whole words: the struct
/// literal's `_pad: [0; 7]` is a byte-by-byte `memset` loop the verifier
/// walks on every path here.
#[inline(always)]
fn verdict_key(d: &Decision, v: u8) -> VerdictKey {
    let words: [u64; 3] = [
        d.generation,
        u64::from(d.workload_id) | u64::from(d.provider_id) << 32,
        u64::from(v),
    ];
    // SAFETY: `VerdictKey` is repr(C), 24 bytes, align 8: the generation,
    // the two ids (little endian, the BPF target's order: the low half
    // first), the verdict and a zero pad; every bit pattern is valid.
    unsafe { core::mem::transmute::<[u64; 3], VerdictKey>(words) }
}

/// Err carries the failure mode to apply.
#[inline(always)]
fn decide(dest: &Dest) -> Result<Decision, u8> {
    let (slot, cfg) = crate::policy::active()?;

    // 1. Workload: the deepest ancestor (level 0 is the cgroup2 root) that
    // the active slot names.
    // SAFETY: helper calls without pointer arguments.
    let own = unsafe { aya_ebpf::helpers::generated::bpf_get_current_cgroup_id() };
    // The workload's learning scope too: addresses learned from DNS count
    // only where the workload's own sockets received them (dns.rs).
    let mut scope = NO_SCOPE;
    let w = crate::policy::workload_in(
        slot,
        own,
        // SAFETY: as above.
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) },
        &mut scope,
    );
    let workload = (w.workload_id != NO_WORKLOAD).then_some(w);

    let mut d = Decision {
        action: cfg.default_other,
        reason: reason::DEFAULT_OTHER,
        slot,
        workload_id: NO_WORKLOAD,
        provider_id: NO_PROVIDER,
        generation: cfg.generation,
        mode: cfg.mode,
        track: cfg.track != 0,
    };
    let other = match workload {
        Some(w) => w.other,
        None => cfg.default_other,
    };
    // Which provider it is, if it is one (reported with a CIDR rule's
    // verdict too). Looked up once, before the rules: two inlined copies
    // of the lookup cost the verifier twice the work.
    let provider = provider_of(slot, scope, dest);
    if let Some(w) = workload {
        d.workload_id = w.workload_id;
        // 2. The workload's own CIDR rules.
        if let Some(a) = rule_action(slot, w.workload_id, dest) {
            d.action = a;
            d.reason = reason::WORKLOAD_CIDR;
            d.provider_id = provider;
            return Ok(d);
        }
    }
    // 3. Provider destinations.
    if provider != NO_PROVIDER {
        d.provider_id = provider;
        (d.action, d.reason) = crate::policy::provider_action(slot, &cfg, workload, provider);
        return Ok(d);
    }
    // 4. Everything else.
    d.action = other;
    d.reason = if workload.is_some() {
        reason::WORKLOAD_OTHER_DEFAULT
    } else {
        reason::DEFAULT_OTHER
    };
    Ok(d)
}

#[inline(always)]
fn rule_action(slot: u32, workload_id: u32, dest: &Dest) -> Option<u8> {
    if dest.family == family::INET {
        let data = PrefixKeyV4 {
            slot,
            scope: workload_id,
            addr: [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]],
        };
        RULES_V4
            .get(Key::new(PREFIX_KEY_HEADER_BITS + 32, data))
            .map(|v| v.action)
    } else {
        let data = PrefixKeyV6 {
            slot,
            scope: workload_id,
            addr: dest.addr,
        };
        RULES_V6
            .get(Key::new(PREFIX_KEY_HEADER_BITS + 128, data))
            .map(|v| v.action)
    }
}

#[inline(always)]
fn provider_of(slot: u32, scope: u64, dest: &Dest) -> u32 {
    let found = if dest.family == family::INET {
        let data = PrefixKeyV4 {
            slot,
            scope: llm_egress_common::DEST_SCOPE,
            addr: [dest.addr[0], dest.addr[1], dest.addr[2], dest.addr[3]],
        };
        DESTS_V4.get(Key::new(PREFIX_KEY_HEADER_BITS + 32, data))
    } else {
        let data = PrefixKeyV6 {
            slot,
            scope: llm_egress_common::DEST_SCOPE,
            addr: dest.addr,
        };
        DESTS_V6.get(Key::new(PREFIX_KEY_HEADER_BITS + 128, data))
    };
    // Not a catalog or resolved destination: an address learned from a DNS
    // answer for a provider name (ebpf/src/dns.rs) by a socket of this
    // workload (`scope`).
    let Some(d) = found else {
        return crate::dns::learned_provider(
            slot,
            scope,
            dest.family == family::INET,
            &dest.addr,
            dest.port,
        );
    };
    if d.nports == 0 {
        return d.provider_id;
    }
    let mut i = 0;
    while i < MAX_PORTS {
        if (i as u16) < d.nports && d.ports[i] == dest.port {
            return d.provider_id;
        }
        i += 1;
    }
    NO_PROVIDER
}

#[inline(always)]
fn report(ctx: &SockAddrContext, dest: &Dest, hook: u8, v: u8, d: &Decision, tracked: bool) {
    // SAFETY: helper on this program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    // Written in place, field by field: a stack copy of the event would
    // start from a zeroed buffer (`memset` loops the verifier walks on
    // every path here) and be copied over.
    let p = entry.as_mut_ptr();
    // SAFETY: `p` is this run's reserved, exclusively owned ring buffer
    // record of a `ConnectEvent`; every field is written (neither struct
    // has padding) before it is submitted.
    unsafe {
        fill_header(&mut (*p).header, kind::CONNECT_DECISION);
        let e = &mut (*p).data;
        e.generation = d.generation;
        e.cookie = cookie;
        e.workload_id = d.workload_id;
        e.provider_id = d.provider_id;
        e.addr = dest.addr;
        e.port = dest.port;
        e.verdict = v;
        e.reason = d.reason;
        e.proto = dest.proto;
        e.family = dest.family;
        e.hook = hook;
        e.tracked = u8::from(tracked);
    }
    entry.submit(crate::maps::wake_flags());
}
