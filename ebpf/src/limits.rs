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

use aya_ebpf::helpers::generated::{bpf_spin_lock, bpf_spin_unlock};
use llm_egress_common::{
    Bucket, BucketKey, CONN_UNIT, LimitHitKey, LimitValue, ProviderKey, Rate, counter,
    limit_flag, limit_kind,
};

use crate::maps::{BUCKETS, BUDGET_SPENT, LIMIT_HITS, LIMITS, add_one, count};

/// Takes `cost` from bucket (`bucket`, `kind`) of rate `rate` at `now`:
/// whether it had that much. `None` when the bucket cannot be created
/// (`BUCKETS` full: counted, the caller lets the traffic through).
#[inline(always)]
pub fn take(bucket: u64, kind: u32, rate: &Rate, now: u64, cost: u64) -> Option<bool> {
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
        Some(ok)
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
    if hit == 0 && connect && limits.connections.per_ns != 0 {
        let taken = take(
            limits.bucket,
            limit_kind::CONNECTIONS,
            &limits.connections,
            now,
            CONN_UNIT,
        );
        if taken == Some(false) {
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
