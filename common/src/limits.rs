//! Rate limits and token budgets: the layouts the kernel and the agent share
//! (docs/limits.md has the user's view).
//!
//! Every limit is a token bucket of one workload × provider pair, named by a
//! stable 64-bit bucket id (the agent hashes the two names, so the state
//! survives reloads that renumber workloads). A bucket holds `level` units
//! of credit up to `capacity`, refilled by `per_ns` units per nanosecond;
//! taking `cost` units succeeds when `level >= cost`. Units are chosen so
//! that no division happens in the kernel and nothing overflows a u64:
//! a connection costs `CONN_UNIT` (rates in thousandths of a connection per
//! second are then units per ns), a byte costs `BYTE_UNIT` (bytes per second
//! are units per ns).

/// `HashMap<ProviderKey, LimitValue>`: the limits of a workload × provider,
/// per policy slot (written with the rest of the slot).
pub const MAP_LIMITS: &str = "LIMITS";
/// BTF `HashMap<BucketKey, Bucket>` with a `bpf_spin_lock` in each value:
/// the state of every bucket the kernel takes from.
pub const MAP_BUCKETS: &str = "BUCKETS";
/// `HashMap<u64 bucket id, BandwidthLimit>`: bandwidth limits, by bucket id
/// (the skb programs find the id in the connection's `CONNS` entry).
pub const MAP_BANDWIDTH: &str = "BANDWIDTH";
/// `HashMap<u64 bucket id, u32 limit_kind>`: pairs whose token budget (or
/// whose workload's dollar budget) is spent (written by the agent); new
/// connections are refused.
pub const MAP_BUDGET_SPENT: &str = "BUDGET_SPENT";
/// `Array<LimitConfig>`, one entry: what the skb programs need to know
/// before looking anything up.
pub const MAP_LIMIT_CFG: &str = "LIMIT_CFG";
/// `PerCpuHashMap<LimitHitKey, u64>`: connections refused (or, in audit
/// mode, that would have been) and packets dropped, by limit.
pub const MAP_LIMIT_HITS: &str = "LIMIT_HITS";

pub const LIMITS_MAX: u32 = 65_536;
pub const BUCKETS_MAX: u32 = 65_536;
pub const BANDWIDTH_MAX: u32 = 16_384;
pub const LIMIT_HITS_MAX: u32 = 65_536;

/// Units of one connection (rates in 1/1000 connection per second are then
/// units per nanosecond).
pub const CONN_UNIT: u64 = 1_000_000_000_000;
/// Units of one byte (rates in bytes per second are units per nanosecond).
pub const BYTE_UNIT: u64 = 1_000_000_000;
/// Largest connection rate and burst a policy may set.
pub const MAX_CONNECTIONS_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_CONNECTION_BURST: u64 = 1_000_000;
/// Largest bandwidth (bytes/s) and burst (bytes) a policy may set.
pub const MAX_BYTES_PER_SECOND: u64 = 100_000_000_000;
pub const MAX_BYTES_BURST: u64 = 1_000_000_000;

/// What was limited (`BucketKey::kind`, `LimitHitKey::kind`,
/// `BUDGET_SPENT` values).
pub mod limit_kind {
    pub const CONNECTIONS: u32 = 1;
    pub const BANDWIDTH_OUT: u32 = 2;
    pub const BANDWIDTH_IN: u32 = 3;
    pub const TOKENS_PER_MINUTE: u32 = 4;
    pub const TOKENS_PER_DAY: u32 = 5;
    /// A workload's budget in US dollars (exact costs), written for every
    /// provider pair of the workload.
    pub const USD_PER_DAY: u32 = 6;
    pub const USD_PER_MONTH: u32 = 7;

    /// The word of a limit kind in records and metric labels.
    pub fn name(kind: u32) -> &'static str {
        match kind {
            CONNECTIONS => "connections",
            BANDWIDTH_OUT => "bandwidth_out",
            BANDWIDTH_IN => "bandwidth_in",
            TOKENS_PER_MINUTE => "tokens_per_minute",
            TOKENS_PER_DAY => "tokens_per_day",
            USD_PER_DAY => "usd_per_day",
            USD_PER_MONTH => "usd_per_month",
            _ => "unknown",
        }
    }
}

/// `LimitValue::flags`.
pub mod limit_flag {
    /// Token budgets are set: check `BUDGET_SPENT` at connect.
    pub const BUDGET: u32 = 1 << 0;
    /// A bandwidth limit is set: the connection's `CONNS` entry carries the
    /// bucket id for the skb programs.
    pub const BANDWIDTH: u32 = 1 << 1;
}

/// A token bucket's rate and size, in the units above. `per_ns == 0`: no
/// limit. `fill_ns`: time to fill from empty (`capacity / per_ns`), so that
/// the kernel can cap the elapsed time instead of dividing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rate {
    pub per_ns: u64,
    pub capacity: u64,
    pub fill_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitValue {
    /// Stable id of the workload × provider pair; never 0.
    pub bucket: u64,
    /// Connections (cost `CONN_UNIT` each).
    pub connections: Rate,
    /// `limit_flag::*`
    pub flags: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC ns after which `connections_after` replaces
    /// `connections` (0: never): the end of a fleet share's lease, so that
    /// the share of an agent that died holding it lapses in the kernel too
    /// (docs/fleet.md, "Connection rates").
    pub connections_until_ns: u64,
    /// The rate after `connections_until_ns`: the `fleet_failure` rate.
    pub connections_after: Rate,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BandwidthLimit {
    /// Bytes sent (cost `BYTE_UNIT` each, IP packet length).
    pub egress: Rate,
    /// Bytes received.
    pub ingress: Rate,
    /// `mode::*`: in audit mode packets over the limit are counted, not
    /// dropped.
    pub mode: u8,
    pub _pad: [u8; 7],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitConfig {
    /// Entries in `BANDWIDTH`; 0: the skb programs skip policing.
    pub bandwidth_limits: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BucketKey {
    pub bucket: u64,
    /// `limit_kind::*`
    pub kind: u32,
    pub _pad: u32,
}

/// `struct bpf_spin_lock` of include/uapi/linux/bpf.h. The kernel finds the
/// lock in a map value by this exact type name in the value's BTF.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct bpf_spin_lock {
    pub val: u32,
}

/// A bucket's state. `level` and `last_ns` are only read or written by the
/// kernel with `lock` held.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub lock: bpf_spin_lock,
    pub _pad: u32,
    pub level: u64,
    /// CLOCK_MONOTONIC ns of the last refill.
    pub last_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LimitHitKey {
    pub bucket: u64,
    /// `limit_kind::*`
    pub kind: u32,
    /// `verdict::DENY` (refused or dropped) or `verdict::AUDIT` (would have
    /// been, audit mode).
    pub verdict: u32,
}

impl Rate {
    /// The rate of `per_second_units` units per second with room for
    /// `capacity` units; `None` for a zero rate.
    pub const fn new(per_ns: u64, capacity: u64) -> Option<Self> {
        if per_ns == 0 {
            return None;
        }
        Some(Self {
            per_ns,
            capacity,
            fill_ns: capacity / per_ns + 1,
        })
    }

    /// Refills a bucket last refilled at `last_ns` with `level` units to
    /// `now_ns`, then takes `cost` if there is that much: the new level and
    /// whether it was taken. The kernel's and the agent's one rule (tested
    /// here; ebpf/src/limits.rs calls it under the bucket's lock). A clock
    /// that went backwards refills nothing; levels never exceed `capacity`.
    #[inline(always)]
    pub const fn take(&self, level: u64, last_ns: u64, now_ns: u64, cost: u64) -> (u64, bool) {
        let elapsed = now_ns.saturating_sub(last_ns);
        let mut level = if elapsed >= self.fill_ns {
            self.capacity
        } else {
            // elapsed < fill_ns, so elapsed * per_ns <= capacity: no overflow.
            let l = level.saturating_add(elapsed * self.per_ns);
            if l > self.capacity { self.capacity } else { l }
        };
        if level >= cost {
            level -= cost;
            (level, true)
        } else {
            (level, false)
        }
    }
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<Rate>() == 24);
    assert!(size_of::<LimitValue>() == 72 && align_of::<LimitValue>() == 8);
    assert!(size_of::<BandwidthLimit>() == 56);
    assert!(size_of::<BucketKey>() == 16);
    assert!(size_of::<LimitConfig>() == 8);
    assert!(size_of::<Bucket>() == 24);
    assert!(size_of::<LimitHitKey>() == 16);
    // The largest capacity fits with room for one refill on top.
    assert!(MAX_CONNECTION_BURST * CONN_UNIT < u64::MAX / 2);
    assert!(MAX_BYTES_BURST * BYTE_UNIT < u64::MAX / 2);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: repr(C) integers with explicit padding; any bit pattern is valid.
    unsafe impl aya::Pod for Rate {}
    unsafe impl aya::Pod for LimitValue {}
    unsafe impl aya::Pod for BandwidthLimit {}
    unsafe impl aya::Pod for BucketKey {}
    unsafe impl aya::Pod for LimitConfig {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for LimitHitKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refills_at_its_rate_and_never_past_capacity() {
        // 2 connections per second (2,000 thousandths), burst 3.
        let r = Rate::new(2_000, 3 * CONN_UNIT).unwrap();
        let (l, ok) = r.take(3 * CONN_UNIT, 0, 0, CONN_UNIT);
        assert!(ok);
        assert_eq!(l, 2 * CONN_UNIT);
        // 250 ms later: half a connection more.
        let (l, _) = r.take(0, 0, 250_000_000, 0);
        assert_eq!(l, CONN_UNIT / 2);
        let (_, ok) = r.take(0, 0, 250_000_000, CONN_UNIT);
        assert!(!ok);
        let (l, ok) = r.take(0, 0, 500_000_000, CONN_UNIT);
        assert!(ok);
        assert_eq!(l, 0);
        // An hour idle: full, not more.
        let (l, _) = r.take(0, 0, 3_600_000_000_000, 0);
        assert_eq!(l, 3 * CONN_UNIT);
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let r = Rate::new(1_000, CONN_UNIT).unwrap();
        assert_eq!(r.take(7, 1_000, 10, 0), (7, true));
    }

    #[test]
    fn extreme_rates_do_not_overflow() {
        let r = Rate::new(
            (MAX_CONNECTIONS_PER_SECOND * 1000.0) as u64,
            MAX_CONNECTION_BURST * CONN_UNIT,
        )
        .unwrap();
        assert_eq!(r.take(0, 0, r.fill_ns - 1, 0).0, (r.fill_ns - 1) * r.per_ns);
        let b = Rate::new(MAX_BYTES_PER_SECOND, MAX_BYTES_BURST * BYTE_UNIT).unwrap();
        assert_eq!(b.take(u64::MAX / 4, 0, u64::MAX, 0).0, b.capacity);
        let slow = Rate::new(1, CONN_UNIT).unwrap();
        assert_eq!(slow.take(0, 0, u64::MAX, CONN_UNIT), (0, true));
    }
}
