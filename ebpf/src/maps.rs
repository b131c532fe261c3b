//! Map declarations. Each static's name is the map's name and must equal the
//! constant of the same name in `llm_egress_common::maps` (the agent checks
//! the loaded object against `ALL_MAPS`). All maps are pinned by name so that
//! enforcement and counters survive the agent.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP,
    },
    helpers::generated::{bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_map_update_elem},
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use llm_egress_common::{
    ActionValue, ActiveSlot, CONNS_MAX, ConnEvent, DESTS_MAX, DNS_QUERIES_MAX, DestValue, DnsQuery,
    DnsQueryKey, EVENTS_BYTES, EVENTS_WAKE_BYTES, EVENTS_WAKE_NS, EXECS_MAX, ExecInfo, LEARNED_MAX,
    Learned, LearnedKeyV4, LearnedKeyV6, NAMES_MAX, NameConfig, NameKey, PROVIDER_ACTIONS_MAX,
    PrefixKeyV4, PrefixKeyV6, ProviderKey, RESOLVERS_MAX, RULES_MAX, SLOT_COUNT, SlotConfig,
    VERDICTS_MAX, VerdictKey, WORKLOADS_MAX, WorkloadKey, WorkloadValue, counter,
};
use llm_egress_common::{
    BANDWIDTH_MAX, BUCKETS_MAX, BandwidthLimit, Bucket, BucketKey, LIMIT_HITS_MAX, LIMITS_MAX,
    LimitConfig, LimitHitKey, LimitValue, ProviderKey as LimitKey,
};

#[map]
pub static ACTIVE: Array<ActiveSlot> = Array::pinned(1, 0);

#[map]
pub static SLOTS: Array<SlotConfig> = Array::pinned(SLOT_COUNT, 0);

#[map]
pub static WORKLOADS: HashMap<WorkloadKey, WorkloadValue> = HashMap::pinned(WORKLOADS_MAX, 0);

#[map]
pub static RULES_V4: LpmTrie<PrefixKeyV4, ActionValue> = LpmTrie::pinned(RULES_MAX, 0);

#[map]
pub static RULES_V6: LpmTrie<PrefixKeyV6, ActionValue> = LpmTrie::pinned(RULES_MAX, 0);

#[map]
pub static DESTS_V4: LpmTrie<PrefixKeyV4, DestValue> = LpmTrie::pinned(DESTS_MAX, 0);

#[map]
pub static DESTS_V6: LpmTrie<PrefixKeyV6, DestValue> = LpmTrie::pinned(DESTS_MAX, 0);

#[map]
pub static PROVIDER_ACT: HashMap<ProviderKey, ActionValue> =
    HashMap::pinned(PROVIDER_ACTIONS_MAX, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

/// Entry 0: when a program last woke the reader of `EVENTS` (`wake_flags`).
/// Not pinned: a new agent starts with the next record waking it.
#[map]
pub static EVENTS_WOKEN: Array<u64> = Array::with_max_entries(1, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);

#[map]
pub static EXECS: LruHashMap<u32, ExecInfo> = LruHashMap::pinned(EXECS_MAX, 0);

#[map]
pub static EXEC_SCRATCH: PerCpuArray<ExecInfo> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static CONNS: LruHashMap<u64, ConnEvent> = LruHashMap::pinned(CONNS_MAX, 0);

#[map]
pub static CONN_ZERO: Array<ConnEvent> = Array::with_max_entries(1, 0);

#[map]
pub static NAMES: HashMap<NameKey, DestValue> = HashMap::pinned(NAMES_MAX, 0);

#[map]
pub static NAME_CFG: Array<NameConfig> = Array::pinned(1, 0);

#[map]
pub static LEARNED_V4: LruHashMap<LearnedKeyV4, Learned> = LruHashMap::pinned(LEARNED_MAX, 0);

#[map]
pub static LEARNED_V6: LruHashMap<LearnedKeyV6, Learned> = LruHashMap::pinned(LEARNED_MAX, 0);

#[map]
pub static DNS_QUERIES: LruHashMap<DnsQueryKey, DnsQuery> = LruHashMap::pinned(DNS_QUERIES_MAX, 0);

#[map]
pub static RESOLVERS: HashMap<[u8; 16], u32> = HashMap::pinned(RESOLVERS_MAX, 0);

#[map]
pub static DNS_SCRATCH: PerCpuArray<crate::dns::DnsScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static SNI_STATE: LruHashMap<u64, u32> =
    LruHashMap::pinned(llm_egress_common::SNI_STATE_MAX, 0);

/// BPF_F_NO_PREALLOC: entries are allocated on insert, so the map costs
/// memory only while ClientHellos are being read.
#[map]
pub static SNI_SCRATCH: HashMap<u64, crate::sni::SniScratch> =
    HashMap::with_max_entries(llm_egress_common::SOCKET_SCRATCH_MAX, BPF_F_NO_PREALLOC);

#[map]
pub static SNI_ZERO: Array<crate::sni::SniScratch> = Array::with_max_entries(1, 0);

#[map]
pub static RECORDS_SCRATCH: PerCpuArray<crate::records::RecordScratch> =
    PerCpuArray::with_max_entries(1, 0);

/// BPF_F_NO_PREALLOC: entries are allocated on insert (one per walk of sent
/// data in progress, removed after it).
#[map]
pub static RECORDS_SENT: HashMap<u64, crate::records::RecordScratch> =
    HashMap::with_max_entries(llm_egress_common::SOCKET_SCRATCH_MAX, BPF_F_NO_PREALLOC);

/// Ports of the named proxies (common's `MAP_PROXY_PORTS`).
#[map]
pub static PROXY_PORTS: HashMap<u32, u32> = HashMap::pinned(llm_egress_common::PROXY_PORTS_MAX, 0);

#[map]
pub static VERDICTS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::pinned(VERDICTS_MAX, 0);

#[map]
pub static LIMITS: HashMap<LimitKey, LimitValue> = HashMap::pinned(LIMITS_MAX, 0);

#[map]
pub static BANDWIDTH: HashMap<u64, BandwidthLimit> = HashMap::pinned(BANDWIDTH_MAX, 0);

#[map]
pub static BUDGET_SPENT: HashMap<u64, u32> = HashMap::pinned(BANDWIDTH_MAX, 0);

#[map]
pub static LIMIT_HITS: PerCpuHashMap<LimitHitKey, u64> = PerCpuHashMap::pinned(LIMIT_HITS_MAX, 0);

#[map]
pub static LIMIT_CFG: Array<LimitConfig> = Array::pinned(1, 0);

/// Entry 0 is 1 once the connect hook failed to set a tracked socket's
/// sock_ops callbacks (a kernel without `TCP_BPF_SOCK_OPS_CB_FLAGS`): from
/// then on sock_ops looks every connecting socket up (sock_ops.rs).
#[map]
pub static CB_FLAGS_FALLBACK: Array<u32> = Array::with_max_entries(1, 0);

#[btf_map]
pub static BUCKETS: PinnedBtfHash<BucketKey, Bucket, { BUCKETS_MAX as usize }> =
    PinnedBtfHash::new();

/// The `flags` with which the connect hook and sock_ops submit an event
/// record to `EVENTS`: wake the agent's reader when no program has woken it
/// in the last `EVENTS_WAKE_NS`, or when `EVENTS_WAKE_BYTES` wait; else no
/// wakeup (the agent drains on its own for a while after each wakeup:
/// agent/src/events/mod.rs, the contract in common's `EVENTS_WAKE_NS`).
/// The kernel's default (flags 0) wakes the reader whenever it has caught
/// up, which a fast reader always has: one inter-processor interrupt and
/// one scheduler wakeup per record, the most expensive part of a provider
/// connect. Other programs keep flags 0: a record with flags 0 wakes the
/// reader when it has caught up, and it has not caught up only behind a
/// record that this batching covers.
#[inline(always)]
pub fn wake_flags() -> u64 {
    if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= EVENTS_WAKE_BYTES {
        return u64::from(BPF_RB_FORCE_WAKEUP);
    }
    let Some(last) = EVENTS_WOKEN.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: entry 0 of a live array. A plain load and store: two CPUs
    // racing here both wake the reader, which is harmless.
    unsafe {
        if now.wrapping_sub(*last) < EVENTS_WAKE_NS {
            return u64::from(BPF_RB_NO_WAKEUP);
        }
        *last = now;
    }
    u64::from(BPF_RB_FORCE_WAKEUP)
}

/// Counts one decision in `VERDICTS`.
#[inline(always)]
pub fn count_verdict(key: &VerdictKey) {
    add_one(&VERDICTS, key, counter::VERDICTS_FULL);
}

/// Adds one to `key` of a per-CPU counting map; a full map is counted in
/// counter `full`.
#[inline(always)]
pub fn add_one<K>(map: &PerCpuHashMap<K, u64>, key: &K, full: u32) {
    if let Some(p) = map.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a live per-CPU value.
        unsafe { add_u64(p, 1) };
        return;
    }
    // BPF_NOEXIST: another CPU may have created the key meanwhile; then
    // this CPU's (zeroed) slot exists and the lookup below finds it.
    if map.insert(key, &1, 1).is_err() {
        match map.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(p) => unsafe { add_u64(p, 1) },
            None => count(full),
        }
    }
}

/// This socket's (`cookie`'s) entry of a per-socket scratch map, created
/// from `init`: scratch that only one program run uses, where a per-CPU
/// entry could be overwritten by a run that interrupts or preempts it on
/// the same CPU. The caller removes it when its run is done. None: the map
/// is full.
#[inline(always)]
pub fn claim_scratch<V>(map: &HashMap<u64, V>, cookie: u64, init: &V) -> Option<*mut V> {
    map.insert(&cookie, init, 0).ok()?;
    map.get_ptr_mut(&cookie)
}

/// Copies a `T` word by word, unrolled. A plain `*dst = *src` of a large
/// struct becomes a call to a byte-by-byte `memcpy` loop that the verifier
/// walks once per byte (224 iterations for a `ConnEvent`); volatile
/// accesses keep the compiler from turning this back into that call.
///
/// SAFETY: `dst` and `src` point to live, 8-byte aligned `T`s in memory the
/// program may read and write (map values, ring buffer records).
#[inline(always)]
pub unsafe fn copy_words<T>(dst: *mut T, src: *const T) {
    const { assert!(core::mem::size_of::<T>() % 8 == 0 && core::mem::align_of::<T>() == 8) };
    let (d, s) = (dst as *mut u64, src as *const u64);
    let mut i = 0;
    while i < core::mem::size_of::<T>() / 8 {
        // SAFETY: word `i` of both, in bounds by the loop condition.
        unsafe { core::ptr::write_volatile(d.add(i), core::ptr::read_volatile(s.add(i))) };
        i += 1;
    }
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of the array.
        unsafe { add_u64(p, 1) };
    }
}

/// Adds `n` to the counter at `p` in one atomic instruction (BPF_ATOMIC
/// BPF_ADD, a `lock add` on x86). A per-CPU counter is not private to one
/// program run: cgroup programs run with migration, not preemption,
/// disabled, so a task that preempts a connect() on the same CPU, or a
/// softirq that interrupts a program sending in process context, runs the
/// programs too, and could cut in between a plain load and store and lose
/// an increment.
///
/// SAFETY: `p` must point to a live, aligned u64 in a map value.
#[inline(always)]
pub unsafe fn add_u64(p: *mut u64, n: u64) {
    // SAFETY: as the caller promised; the result is not used, so no
    // BPF_FETCH is needed.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            p, n,
        );
    }
}

/// A BTF hash map definition with `pinning = LIBBPF_PIN_BY_NAME`: aya-ebpf's
/// own BTF maps have no pinning field, and a map whose values hold a
/// `bpf_spin_lock` must be a BTF map (the kernel finds the lock in the
/// value's BTF). Field names and order are what the loader reads.
#[repr(C)]
pub struct PinnedBtfHash<K, V, const MAX_ENTRIES: usize> {
    r#type: *const [i32; aya_ebpf::bindings::bpf_map_type::BPF_MAP_TYPE_HASH as usize],
    key: *const K,
    value: *const V,
    max_entries: *const [i32; MAX_ENTRIES],
    map_flags: *const [i32; 0],
    pinning: *const [i32; 1],
}

// SAFETY: placeholder pointers the loader patches; never dereferenced.
unsafe impl<K, V, const M: usize> Sync for PinnedBtfHash<K, V, M> {}

impl<K, V, const M: usize> PinnedBtfHash<K, V, M> {
    pub const fn new() -> Self {
        Self {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    #[inline(always)]
    fn as_ptr(&self) -> *mut c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }

    #[inline(always)]
    pub fn get_ptr_mut(&self, key: &K) -> *mut V {
        // SAFETY: helper with this map and a key of its key type.
        unsafe { bpf_map_lookup_elem(self.as_ptr(), core::ptr::from_ref(key).cast()) }.cast()
    }

    #[inline(always)]
    pub fn insert_new(&self, key: &K, value: &V) {
        // SAFETY: as above; BPF_NOEXIST never replaces a live entry.
        unsafe {
            bpf_map_update_elem(
                self.as_ptr(),
                core::ptr::from_ref(key).cast(),
                core::ptr::from_ref(value).cast(),
                BPF_NOEXIST as u64,
            )
        };
    }
}

/// The plaintext programs' maps (ebpf/src/plaintext.rs; common's
/// `plaintext` module says what each holds). None is pinned: they live as
/// long as the agent that attached the probes.
#[map]
pub static PLAINTEXT: RingBuf = RingBuf::with_byte_size(llm_egress_common::PLAINTEXT_BYTES, 0);

#[map]
pub static PLAINTEXT_CALLS: LruHashMap<u64, llm_egress_common::SslCall> =
    LruHashMap::with_max_entries(llm_egress_common::PLAINTEXT_CALLS_MAX, 0);

#[map]
pub static PLAINTEXT_SOCKS: LruHashMap<llm_egress_common::SslKey, u64> =
    LruHashMap::with_max_entries(llm_egress_common::PLAINTEXT_SOCKS_MAX, 0);

#[map]
pub static PLAINTEXT_PENDING: LruHashMap<u64, llm_egress_common::SslPending> =
    LruHashMap::with_max_entries(llm_egress_common::PLAINTEXT_PENDING_MAX, 0);

#[map]
pub static PLAINTEXT_GO_CALLS: LruHashMap<llm_egress_common::SslKey, llm_egress_common::SslCall> =
    LruHashMap::with_max_entries(llm_egress_common::PLAINTEXT_CALLS_MAX, 0);

#[map]
pub static PLAINTEXT_CFG: Array<llm_egress_common::PlaintextConfig> = Array::with_max_entries(1, 0);

#[map]
pub static PLAINTEXT_WORKLOADS: HashMap<u64, u32> =
    HashMap::with_max_entries(llm_egress_common::PLAINTEXT_WORKLOADS_MAX, 0);

#[map]
pub static PLAINTEXT_SCRATCH: PerCpuArray<llm_egress_common::PlaintextRecord> =
    PerCpuArray::with_max_entries(1, 0);

#[map]
pub static PLAINTEXT_TRACED: Array<u64> =
    Array::with_max_entries(llm_egress_common::PLAINTEXT_TRACED_WORDS, 0);

#[map]
pub static PLAINTEXT_STATS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(llm_egress_common::plaintext_stat::LEN, 0);
