//! Policy lookups shared by the hooks that judge: the connect-time verdict
//! (sock_addr.rs) and the SNI verdict (sni.rs). One rule, one place:
//! the workload is the deepest ancestor cgroup named in `WORKLOADS` for the
//! active slot; a provider destination is judged by the workload's word on
//! that provider (`PROVIDER_ACT`), else its `llm` action; processes in no
//! workload get `defaults.llm`.

use llm_egress_common::{
    MAX_CGROUP_DEPTH, ProviderKey, SLOT_COUNT, SlotConfig, WorkloadKey, WorkloadValue, counter,
    failure_mode, reason,
};

use crate::maps::{ACTIVE, PROVIDER_ACT, SLOTS, WORKLOADS, count};

/// The slot in force and its config. Err carries the failure mode to apply
/// (no policy loaded, or the slot's config is missing).
#[inline(always)]
pub fn active() -> Result<(u32, SlotConfig), u8> {
    let active = ACTIVE.get(0).ok_or(failure_mode::OPEN)?;
    let fail = active.failure_mode;
    let slot = active.slot;
    if slot == 0 || slot >= SLOT_COUNT {
        return Err(fail);
    }
    let cfg = SLOTS.get(slot).ok_or(fail)?;
    Ok((slot, *cfg))
}

/// The workload of a task or socket in cgroup `own` whose cgroup ancestors
/// `ancestor(level)` gives (level 0 is the cgroup2 root; 0 past the cgroup
/// itself): the deepest one the slot names. `own` itself, when named, is
/// the deepest: one lookup, the common case of a process in a workload's
/// own cgroup (a systemd unit's); else the walk over every level. Tasks
/// deeper than `MAX_CGROUP_DEPTH` are counted in `DEPTH_TRUNCATED`.
#[inline(always)]
pub fn workload_of(slot: u32, own: u64, ancestor: impl Fn(i32) -> u64) -> Option<WorkloadValue> {
    let key = WorkloadKey {
        slot,
        _pad: 0,
        cgroup_id: own,
    };
    // SAFETY: as below.
    if let Some(w) = unsafe { WORKLOADS.get(&key) } {
        return Some(*w);
    }
    let mut workload = None;
    let mut level: u32 = 0;
    while level <= MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 {
            break;
        }
        let key = WorkloadKey {
            slot,
            _pad: 0,
            cgroup_id: id,
        };
        // SAFETY: the value is copied out at once; entries are only replaced
        // whole by the agent.
        if let Some(w) = unsafe { WORKLOADS.get(&key) } {
            workload = Some(*w);
        }
        level += 1;
    }
    if level > MAX_CGROUP_DEPTH && ancestor(level as i32) != 0 {
        count(counter::DEPTH_TRUNCATED);
    }
    workload
}

/// As `workload_of`, with `workload_id` `NO_WORKLOAD` for none, and sets
/// `scope` to the cgroup id of the `WORKLOADS` entry found (left as is
/// when none is): the learning scope of DNS answers (`LearnedKeyV4`),
/// which, unlike the workload id, stays the same across reloads. A plain
/// value and an out-parameter, not an `Option` of a pair: where an
/// `Option`'s undefined payload (None) met a defined one, LLVM stored a
/// register never written, which the verifier refuses. The same walk as
/// `workload_of`, not its base: `workload_of` written on top of it cost
/// the SNI program ~1,300 more verifier instructions on 6.18.
#[inline(always)]
pub fn workload_in(
    slot: u32,
    own: u64,
    ancestor: impl Fn(i32) -> u64,
    scope: &mut u64,
) -> WorkloadValue {
    let key = WorkloadKey {
        slot,
        _pad: 0,
        cgroup_id: own,
    };
    // SAFETY: as below.
    if let Some(w) = unsafe { WORKLOADS.get(&key) } {
        *scope = own;
        return *w;
    }
    let mut workload = WorkloadValue::default();
    let mut level: u32 = 0;
    while level <= MAX_CGROUP_DEPTH {
        let id = ancestor(level as i32);
        if id == 0 {
            break;
        }
        let key = WorkloadKey {
            slot,
            _pad: 0,
            cgroup_id: id,
        };
        // SAFETY: the value is copied out at once; entries are only replaced
        // whole by the agent.
        if let Some(w) = unsafe { WORKLOADS.get(&key) } {
            workload = *w;
            *scope = id;
        }
        level += 1;
    }
    if level > MAX_CGROUP_DEPTH && ancestor(level as i32) != 0 {
        count(counter::DEPTH_TRUNCATED);
    }
    workload
}

/// (action, reason) for provider `provider` of a process in `workload`
/// (None: in no workload).
#[inline(always)]
pub fn provider_action(
    slot: u32,
    cfg: &SlotConfig,
    workload: Option<WorkloadValue>,
    provider: u32,
) -> (u8, u8) {
    match workload {
        Some(w) => {
            let key = ProviderKey {
                slot,
                workload_id: w.workload_id,
                provider_id: provider,
            };
            // SAFETY: value copied out at once.
            match unsafe { PROVIDER_ACT.get(&key) } {
                Some(a) => (a.action, reason::WORKLOAD_PROVIDER),
                None => (w.llm, reason::WORKLOAD_LLM_DEFAULT),
            }
        }
        None => (cfg.default_llm, reason::DEFAULT_LLM),
    }
}
