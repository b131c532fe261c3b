//! Map declarations. Each static's name is the map's name and must equal the
//! constant of the same name in `llm_egress_common::maps` (the agent checks
//! the loaded object against `ALL_MAPS`). All maps are pinned by name so that
//! enforcement and counters survive the agent.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use llm_egress_common::{
    ActionValue, ActiveSlot, CONNS_MAX, ConnEvent, DESTS_MAX, DestValue, EVENTS_BYTES, EXECS_MAX,
    ExecInfo, LEARNED_MAX, Learned, NAMES_MAX, NameConfig, NameKey, PROVIDER_ACTIONS_MAX,
    PrefixKeyV4, PrefixKeyV6, ProviderKey, RULES_MAX, SLOT_COUNT, SlotConfig, VERDICTS_MAX,
    VerdictKey, WORKLOADS_MAX, WorkloadKey, WorkloadValue, counter,
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

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);

#[map]
pub static EXECS: LruHashMap<u32, ExecInfo> = LruHashMap::pinned(EXECS_MAX, 0);

#[map]
pub static EXEC_SCRATCH: PerCpuArray<ExecInfo> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static CONNS: LruHashMap<u64, ConnEvent> = LruHashMap::pinned(CONNS_MAX, 0);

#[map]
pub static CONN_SCRATCH: PerCpuArray<ConnEvent> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static NAMES: HashMap<NameKey, DestValue> = HashMap::pinned(NAMES_MAX, 0);

#[map]
pub static NAME_CFG: Array<NameConfig> = Array::pinned(1, 0);

#[map]
pub static LEARNED_V4: LruHashMap<[u8; 4], Learned> = LruHashMap::pinned(LEARNED_MAX, 0);

#[map]
pub static LEARNED_V6: LruHashMap<[u8; 16], Learned> = LruHashMap::pinned(LEARNED_MAX, 0);

#[map]
pub static DNS_SCRATCH: PerCpuArray<crate::dns::DnsScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static SNI_STATE: LruHashMap<u64, u32> =
    LruHashMap::pinned(llm_egress_common::SNI_STATE_MAX, 0);

#[map]
pub static SNI_SCRATCH: PerCpuArray<crate::sni::SniScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub static VERDICTS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::pinned(VERDICTS_MAX, 0);

/// Counts one decision in `VERDICTS`.
#[inline(always)]
pub fn count_verdict(key: &VerdictKey) {
    if let Some(p) = VERDICTS.get_ptr_mut(key) {
        // SAFETY: this CPU's slot of a per-CPU value; no concurrent writer.
        unsafe { *p += 1 };
        return;
    }
    // BPF_NOEXIST: another CPU may have created the key meanwhile; then
    // this CPU's (zeroed) slot exists and the lookup below finds it.
    if VERDICTS.insert(key, &1, 1).is_err() {
        match VERDICTS.get_ptr_mut(key) {
            // SAFETY: as above.
            Some(p) => unsafe { *p += 1 },
            None => count(counter::VERDICTS_FULL),
        }
    }
}

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of this CPU; programs run with preemption
        // disabled for their whole run, so nothing else writes it meanwhile.
        unsafe { *p += 1 };
    }
}
