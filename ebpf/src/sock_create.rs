//! cgroup/sock_create: the socket-kind verdict.
//!
//! Raw sockets (`SOCK_RAW`, any protocol) and unprivileged ICMP ping
//! sockets (`SOCK_DGRAM` with `IPPROTO_ICMP` / `IPPROTO_ICMPV6`) send
//! packets that no connect or sendmsg hook sees: a raw socket writes its
//! own TCP SYN, a ping socket carries data in echo requests. This program
//! refuses them at `socket()` (EPERM) for workloads whose `raw_sockets`
//! action is `deny` (the default of a workload whose `other` is deny), and
//! reports refused and audited ones as decision events (hook
//! `SOCK_CREATE`, reason `RAW_SOCKET` / `PING_SOCKET`; docs/events.md).
//!
//! Context (include/uapi/linux/bpf.h, struct bpf_sock; kernel ≥ 4.10):
//! `family`, `type`, `protocol` of the socket being made, run by
//! inet_create()/inet6_create() after the protocol's own checks
//! (CAP_NET_RAW for raw sockets, net.ipv4.ping_group_range for ping
//! sockets: a caller those refuse never gets here). Returning 1 allows;
//! 0 makes socket() fail with EPERM. Only AF_INET and AF_INET6 sockets
//! run it: AF_PACKET sockets are never seen (README, "Honest limits").
//!
//! Internal errors (no active policy) are decided by `failure_mode` and
//! counted in `INTERNAL_ERRORS`, like the connect hooks.

use aya_ebpf::{
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::cgroup_sock,
    programs::SockContext,
};
use llm_egress_common::{
    ConnectDecision, ConnectEvent, EventHeader, NO_PROVIDER, NO_WORKLOAD, action, counter,
    failure_mode, family, hook, kind, mode, reason, sock, verdict,
};

use crate::maps::{EVENTS, count};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock(sock_create)]
pub fn verdict_sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock for this program type;
    // direct, aligned context loads the verifier checks.
    let (fam, ty, protocol) = unsafe {
        let sk = &*ctx.sock;
        (sk.family, sk.type_, sk.protocol)
    };
    if fam != sock::AF_INET && fam != sock::AF_INET6 {
        return ALLOW;
    }
    let why = if ty == sock::SOCK_RAW {
        reason::RAW_SOCKET
    } else if ty == sock::SOCK_DGRAM
        && (protocol == sock::IPPROTO_ICMP || protocol == sock::IPPROTO_ICMPV6)
    {
        reason::PING_SOCKET
    } else {
        return ALLOW;
    };
    let (act, generation, workload_id, slot_mode) = match crate::policy::active() {
        Ok((slot, cfg)) => {
            // SAFETY: helpers without pointer arguments.
            let own = unsafe { bpf_get_current_cgroup_id() };
            let workload = crate::policy::workload_of(slot, own, |level| unsafe {
                bpf_get_current_ancestor_cgroup_id(level)
            });
            match workload {
                Some(w) => (w.raw_sockets, cfg.generation, w.workload_id, cfg.mode),
                None => (
                    cfg.default_raw_sockets,
                    cfg.generation,
                    NO_WORKLOAD,
                    cfg.mode,
                ),
            }
        }
        Err(fail) => {
            count(counter::INTERNAL_ERRORS);
            let a = if fail == failure_mode::CLOSED {
                action::DENY
            } else {
                action::ALLOW
            };
            (a, 0, NO_WORKLOAD, mode::ENFORCE)
        }
    };
    let v = match act {
        action::DENY if slot_mode == mode::AUDIT => verdict::AUDIT,
        action::DENY => verdict::DENY,
        action::AUDIT => verdict::AUDIT,
        // ALLOW, and 0 (a slot written before `raw_sockets` existed).
        _ => return ALLOW,
    };
    count(if v == verdict::DENY {
        counter::SOCKETS_DENIED
    } else {
        counter::SOCKETS_AUDITED
    });
    report(fam, ty, protocol, v, why, generation, workload_id);
    if v == verdict::DENY { DENY } else { ALLOW }
}

#[inline(always)]
fn report(fam: u32, ty: u32, protocol: u32, v: u8, why: u8, generation: u64, workload_id: u32) {
    let Some(mut entry) = EVENTS.reserve::<ConnectEvent>(0) else {
        count(counter::EVENTS_LOST);
        return;
    };
    let mut header = EventHeader::default();
    crate::sock_addr::fill_header(&mut header, kind::CONNECT_DECISION);
    let event = ConnectEvent {
        header,
        data: ConnectDecision {
            generation,
            cookie: 0,
            workload_id,
            provider_id: NO_PROVIDER,
            addr: [0; 16],
            port: ty as u16,
            verdict: v,
            reason: why,
            proto: protocol as u8,
            family: if fam == sock::AF_INET6 {
                family::INET6
            } else {
                family::INET
            },
            hook: hook::SOCK_CREATE,
            tracked: 0,
        },
    };
    entry.write(event);
    // A refused socket is rare and worth seeing at once.
    entry.submit(0);
}
