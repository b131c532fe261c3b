//! Rate limits in the kernel: the token buckets of `[workloads.limits]`
//! (docs/limits.md). `connect_limit` is asked by the connect hook for an
//! allowed provider connection; `police` by the skb programs for every
//! packet of a connection with a bandwidth limit.
//!
//! Bucket state lives in `BUCKETS`, one entry per bucket id and kind, and is
//! read and written only under the entry's `bpf_spin_lock`, so that every
//! CPU takes from the same bucket (per-CPU buckets would split the rate).
//! The arithmetic is `Rate::take` of common/src/limits.rs, shared with the
//! agent's tests. A bucket created on first use starts full.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_get_socket_cookie, bpf_spin_lock, bpf_spin_unlock},
    },
    programs::SkBuffContext,
};
use llm_egress_common::{
    BYTE_UNIT, Bucket, BucketKey, CONN_UNIT, ConnEvent, LimitHitKey, LimitValue, ProviderKey, Rate,
    counter, limit_flag, limit_kind, mode, verdict,
};

use crate::maps::{
    BANDWIDTH, BUCKETS, BUDGET_SPENT, CONNS, LIMIT_CFG, LIMIT_HITS, LIMITS, add_one, count,
};

/// Takes `cost` from bucket (`bucket`, `kind`) of rate `rate` at `now`:
/// the level left and whether it had that much. `None` when the bucket
/// cannot be created (`BUCKETS` full: counted, the caller lets the traffic
/// through).
#[inline(always)]
pub fn take(bucket: u64, kind: u32, rate: &Rate, now: u64, cost: u64) -> Option<(u64, bool)> {
    let key = BucketKey {
        bucket,
        kind,
        _pad: 0,
    };
    let mut b = BUCKETS.get_ptr_mut(&key);
    if b.is_null() {
        BUCKETS.insert_new(
            &key,
            &Bucket {
                level: rate.capacity,
                last_ns: now,
                ..Bucket::default()
            },
        );
        b = BUCKETS.get_ptr_mut(&key);
        if b.is_null() {
            count(counter::LIMIT_BUCKETS_FULL);
            return None;
        }
    }
    // SAFETY: `b` points into a live BUCKETS value, whose first field is its
    // bpf_spin_lock; between lock and unlock there is no helper or function
    // call (Rate::take is inlined), as the verifier requires.
    unsafe {
        let lock = core::ptr::addr_of_mut!((*b).lock).cast();
        bpf_spin_lock(lock);
        let (level, ok) = rate.take((*b).level, (*b).last_ns, now, cost);
        (*b).level = level;
        if now > (*b).last_ns {
            (*b).last_ns = now;
        }
        bpf_spin_unlock(lock);
        Some((level, ok))
    }
}

/// What the limits say of an allowed provider connection.
pub struct ConnectLimit {
    /// The pair's limits (for the bandwidth bucket of the connection).
    pub limits: LimitValue,
    /// `limit_kind::*` that refuses it; 0: within every limit.
    pub hit: u32,
}

/// The limits of `workload_id` × `provider_id` in `slot` for a new
/// connection (`connect`: a connect() that takes from the connection rate;
/// false for a datagram, which only the token budget refuses). None: the
/// pair has no limits.
#[inline(always)]
pub fn connect_limit(
    slot: u32,
    workload_id: u32,
    provider_id: u32,
    connect: bool,
    now: u64,
) -> Option<ConnectLimit> {
    let key = ProviderKey {
        slot,
        workload_id,
        provider_id,
    };
    // SAFETY: value copied out at once; entries are replaced whole.
    let limits = *unsafe { LIMITS.get(&key) }?;
    let mut hit = 0;
    if limits.flags & limit_flag::BUDGET != 0 {
        // SAFETY: as above.
        if let Some(kind) = unsafe { BUDGET_SPENT.get(&limits.bucket) } {
            hit = *kind;
        }
    }
    // A fleet share whose lease ended (its agent stopped renewing it) gives
    // way to the fleet_failure rate.
    let rate = if limits.connections_until_ns != 0 && now > limits.connections_until_ns {
        &limits.connections_after
    } else {
        &limits.connections
    };
    if hit == 0 && connect && rate.per_ns != 0 {
        let taken = take(limits.bucket, limit_kind::CONNECTIONS, rate, now, CONN_UNIT);
        if let Some((_, false)) = taken {
            hit = limit_kind::CONNECTIONS;
        }
    }
    Some(ConnectLimit { limits, hit })
}

/// Counts one refusal (or, in audit mode, would-be refusal) in `LIMIT_HITS`.
#[inline(always)]
pub fn count_hit(bucket: u64, kind: u32, verdict: u8) {
    let key = LimitHitKey {
        bucket,
        kind,
        verdict: u32::from(verdict),
    };
    add_one(&LIMIT_HITS, &key, counter::LIMIT_HITS_FULL);
}

/// A packet's `CONNS` entry as far as its program has looked it up, so that
/// `police` does not look it up again.
pub struct Tracked {
    looked_up: bool,
    /// Null: not a tracked connection (when `looked_up`).
    conn: *mut ConnEvent,
}

impl Tracked {
    /// Nothing looked up yet (a packet without payload).
    pub const fn unknown() -> Self {
        Self {
            looked_up: false,
            conn: core::ptr::null_mut(),
        }
    }

    /// The lookup of the packet's cookie in `CONNS`.
    #[inline(always)]
    pub fn set(&mut self, conn: Option<*mut ConnEvent>) {
        self.looked_up = true;
        self.conn = conn.unwrap_or(core::ptr::null_mut());
    }
}

/// The skb programs' verdict on a packet of a connection that may have a
/// bandwidth limit (`egress`: sent, else received): `PASS`, or over the
/// limit in enforce mode: sent packets are dropped with congestion
/// notification (TCP lowers its window and sends the data again, as the
/// kernel's hbm sample does), received ones dropped (the sender's TCP
/// backs off and retransmits). Cheap for everything else: one array read
/// when no policy has a bandwidth limit, and when one has, one hash lookup
/// for packets whose program has not looked them up already (`tracked`).
#[inline(always)]
pub fn police(ctx: &SkBuffContext, egress: bool, tracked: &Tracked) -> i32 {
    const PASS: i32 = 1;
    const DROP: i32 = 0;
    const DROP_CN: i32 = 2;
    const PASS_CN: i32 = 3;
    match LIMIT_CFG.get(0) {
        Some(cfg) if cfg.bandwidth_limits != 0 => {}
        _ => return PASS,
    }
    let conn = if tracked.looked_up {
        tracked.conn
    } else {
        // SAFETY: helper on this program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        CONNS.get_ptr_mut(&cookie).unwrap_or(core::ptr::null_mut())
    };
    if conn.is_null() {
        return PASS;
    }
    // SAFETY: a live CONNS value for this program run; one field read.
    let bucket = unsafe { (*conn).data.bandwidth_bucket };
    if bucket == 0 {
        return PASS;
    }
    // SAFETY: as above.
    let Some(limit) = (unsafe { BANDWIDTH.get(&bucket) }).copied() else {
        return PASS;
    };
    let (rate, kind) = if egress {
        (limit.egress, limit_kind::BANDWIDTH_OUT)
    } else {
        (limit.ingress, limit_kind::BANDWIDTH_IN)
    };
    if rate.per_ns == 0 {
        return PASS;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let cost = u64::from(ctx.len()) * BYTE_UNIT;
    match take(bucket, kind, &rate, now, cost) {
        Some((_, false)) => {
            let audit = limit.mode == mode::AUDIT;
            count_hit(
                bucket,
                kind,
                if audit { verdict::AUDIT } else { verdict::DENY },
            );
            match (audit, egress) {
                (true, _) => PASS,
                (false, true) => DROP_CN,
                (false, false) => DROP,
            }
        }
        // Below a quarter of the burst left: ask TCP to slow down before
        // packets have to be dropped.
        Some((level, true)) if egress && limit.mode != mode::AUDIT && level < rate.capacity / 4 => {
            PASS_CN
        }
        _ => PASS,
    }
}

/// Whether a tracked connection must stop sending because its pair's token
/// budget is spent (`conn`: its `CONNS` entry). In enforce mode the caller
/// drops the packet and marks the socket denied (`SNI_STATE`), which makes
/// sock_ops abort it at its next try; audit mode only counts. Each stopped
/// connection is counted once in `LIMIT_HITS` (the caller marks it).
#[inline(always)]
pub fn budget_stops(conn: &ConnEvent) -> bool {
    let bucket = conn.data.budget_bucket;
    if bucket == 0 {
        return false;
    }
    // SAFETY: value copied out at once.
    let Some(kind) = (unsafe { BUDGET_SPENT.get(&bucket) }).copied() else {
        return false;
    };
    let audit = match crate::policy::active() {
        Ok((_, cfg)) => cfg.mode == mode::AUDIT,
        Err(_) => true,
    };
    count_hit(
        bucket,
        kind,
        if audit { verdict::AUDIT } else { verdict::DENY },
    );
    if audit {
        return false;
    }
    count(counter::BUDGET_STOPPED);
    true
}
