//! Names and layouts of the maps the programs and the agent share.
//!
//! Policy maps are double-buffered: every key starts with a `slot` (1 or 2)
//! and `ACTIVE` names the slot in force. The agent writes a whole policy into
//! the idle slot, then flips `ACTIVE` with one array update; a program reads
//! `ACTIVE` once per decision, so no connection is ever judged by half of two
//! policies. Slot 0 means "no policy yet".

/// `Array<ActiveSlot>`, one entry: which slot is in force.
pub const MAP_ACTIVE: &str = "ACTIVE";
/// `Array<SlotConfig>`, `SLOT_COUNT` entries indexed by slot.
pub const MAP_SLOTS: &str = "SLOTS";
/// `HashMap<WorkloadKey, WorkloadValue>`: workload cgroups of each slot.
pub const MAP_WORKLOADS: &str = "WORKLOADS";
/// `LpmTrie<PrefixKeyV4, ActionValue>`: workloads' CIDR rules, scope = workload id.
pub const MAP_RULES_V4: &str = "RULES_V4";
/// `LpmTrie<PrefixKeyV6, ActionValue>`: workloads' CIDR rules, scope = workload id.
pub const MAP_RULES_V6: &str = "RULES_V6";
/// `LpmTrie<PrefixKeyV4, DestValue>`: provider destinations, scope = 0.
pub const MAP_DESTS_V4: &str = "DESTS_V4";
/// `LpmTrie<PrefixKeyV6, DestValue>`: provider destinations, scope = 0.
pub const MAP_DESTS_V6: &str = "DESTS_V6";
/// `HashMap<ProviderKey, ActionValue>`: what a workload says of a provider.
pub const MAP_PROVIDER_ACTIONS: &str = "PROVIDER_ACT";
/// `RingBuf` of `Event<..>` records.
pub const MAP_EVENTS: &str = "EVENTS";
/// `PerCpuArray<u64>` of `counter::*` values.
pub const MAP_COUNTERS: &str = "COUNTERS";

/// `LruHashMap<u32 tgid, ExecInfo>`: the last exec of processes under the
/// attach cgroup, so that a process that exits right after connecting is
/// still attributed to its executable.
pub const MAP_EXECS: &str = "EXECS";
/// `PerCpuArray<ExecInfo>`, one entry: scratch space of the exec program
/// (an `ExecInfo` is too large for the BPF stack of a tracepoint).
pub const MAP_EXEC_SCRATCH: &str = "EXEC_SCRATCH";

/// Every map of the object, for the loader's pin bookkeeping and a test that
/// checks the object declares exactly these.
pub const ALL_MAPS: [&str; 12] = [
    MAP_ACTIVE,
    MAP_SLOTS,
    MAP_WORKLOADS,
    MAP_RULES_V4,
    MAP_RULES_V6,
    MAP_DESTS_V4,
    MAP_DESTS_V6,
    MAP_PROVIDER_ACTIONS,
    MAP_EVENTS,
    MAP_COUNTERS,
    MAP_EXECS,
    MAP_EXEC_SCRATCH,
];

/// Program names: `<job>_<hook>`.
pub const PROG_CONNECT4: &str = "verdict_connect4";
pub const PROG_CONNECT6: &str = "verdict_connect6";
pub const PROG_SENDMSG4: &str = "verdict_sendmsg4";
pub const PROG_SENDMSG6: &str = "verdict_sendmsg6";
/// The cgroup_sock_addr programs, attached (and pinned) to the attach cgroup.
pub const ALL_PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_CONNECT6, PROG_SENDMSG4, PROG_SENDMSG6];
/// Tracepoint sched/sched_process_exec: fills `EXECS`.
pub const PROG_EXEC: &str = "attribute_exec";

/// Capacities. Changing one changes the pinned maps' shape: the loader then
/// replaces the pinned state instead of adopting it.
pub const WORKLOADS_MAX: u32 = 16_384;
pub const RULES_MAX: u32 = 65_536;
pub const DESTS_MAX: u32 = 65_536;
pub const PROVIDER_ACTIONS_MAX: u32 = 65_536;
pub const EVENTS_BYTES: u32 = 1 << 20;
pub const EXECS_MAX: u32 = 16_384;
/// Bytes of an exec'd path kept (longer paths are cut).
pub const EXEC_PATH_LEN: usize = 256;
/// Index 0 is unused ("no policy"), slots are 1 and 2.
pub const SLOT_COUNT: u32 = 3;
/// Cgroup levels below the cgroup2 root searched for a workload.
pub const MAX_CGROUP_DEPTH: u32 = 16;
/// Ports a provider destination entry can list; 0 listed ports = any port.
pub const MAX_PORTS: usize = 8;
/// Scope of `DESTS_*` keys.
pub const DEST_SCOPE: u32 = 0;
/// Workload id of processes in no workload (never stored in `WORKLOADS`).
pub const NO_WORKLOAD: u32 = 0;
/// Provider id of non-provider destinations.
pub const NO_PROVIDER: u32 = 0;
/// Bits of a prefix key before the address: slot and scope.
pub const PREFIX_KEY_HEADER_BITS: u32 = 64;

/// Indexes into `COUNTERS`. Never reuse a number.
pub mod counter {
    /// Events dropped because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 0;
    pub const VERDICT_ALLOW: u32 = 1;
    pub const VERDICT_DENY: u32 = 2;
    pub const VERDICT_AUDIT: u32 = 3;
    /// Decisions taken by `failure_mode` (no policy, failed lookup).
    pub const INTERNAL_ERRORS: u32 = 4;
    /// Decisions for tasks deeper than `MAX_CGROUP_DEPTH` levels.
    pub const DEPTH_TRUNCATED: u32 = 5;
    pub const LEN: u32 = 16;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActiveSlot {
    /// 0 (none), 1 or 2.
    pub slot: u32,
    /// `failure_mode::*`: what the programs do when they cannot decide.
    pub failure_mode: u8,
    pub _pad: [u8; 3],
    /// Inode of the cgroup the programs were attached to, so that an agent
    /// adopting pinned state can tell whether the attach point changed.
    pub attach_cgroup_id: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// Policy generation written into this slot; reported in every event.
    pub generation: u64,
    /// `mode::*`
    pub mode: u8,
    /// `action::*` for provider destinations of processes in no workload.
    pub default_llm: u8,
    /// `action::*` for other destinations of processes in no workload.
    pub default_other: u8,
    /// `failure_mode::*`
    pub failure_mode: u8,
    pub _pad: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadKey {
    pub slot: u32,
    pub _pad: u32,
    /// Inode number of the workload's cgroup v2 directory.
    pub cgroup_id: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadValue {
    /// 1-based index of the workload in the policy.
    pub workload_id: u32,
    /// `action::*` for providers the workload does not name.
    pub llm: u8,
    /// `action::*` for non-provider destinations.
    pub other: u8,
    pub _pad: [u8; 2],
}

/// Data part of an IPv4 LPM key; the prefix length counts
/// `PREFIX_KEY_HEADER_BITS` + the CIDR's length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixKeyV4 {
    pub slot: u32,
    /// Workload id (`RULES_V4`) or `DEST_SCOPE` (`DESTS_V4`).
    pub scope: u32,
    /// Network order.
    pub addr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixKeyV6 {
    pub slot: u32,
    pub scope: u32,
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ActionValue {
    /// `action::*`
    pub action: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestValue {
    /// 1-based index of the provider in the agent's catalog for this slot.
    pub provider_id: u32,
    /// Destination ports (host order) that make this a provider
    /// destination; `nports == 0` means every port.
    pub ports: [u16; MAX_PORTS],
    pub nports: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProviderKey {
    pub slot: u32,
    pub workload_id: u32,
    pub provider_id: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecInfo {
    /// `bpf_ktime_get_ns()` of the exec.
    pub exec_time_ns: u64,
    /// Bytes of `path` used, including the NUL.
    pub len: u32,
    pub _pad: u32,
    /// The path given to execve (bprm->filename), NUL terminated.
    pub path: [u8; EXEC_PATH_LEN],
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<ExecInfo>() == 272);
    assert!(size_of::<ActiveSlot>() == 16);
    assert!(size_of::<SlotConfig>() == 16 && align_of::<SlotConfig>() == 8);
    assert!(size_of::<WorkloadKey>() == 16);
    assert!(size_of::<WorkloadValue>() == 8);
    assert!(size_of::<PrefixKeyV4>() == 12);
    assert!(size_of::<PrefixKeyV6>() == 24);
    assert!(size_of::<ActionValue>() == 4);
    assert!(size_of::<DestValue>() == 24);
    assert!(size_of::<ProviderKey>() == 12);
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type here is `repr(C)`, `Copy`, made of integers and
    // integer arrays with explicit padding fields, so any bit pattern is valid.
    unsafe impl aya::Pod for ActiveSlot {}
    unsafe impl aya::Pod for SlotConfig {}
    unsafe impl aya::Pod for WorkloadKey {}
    unsafe impl aya::Pod for WorkloadValue {}
    unsafe impl aya::Pod for PrefixKeyV4 {}
    unsafe impl aya::Pod for PrefixKeyV6 {}
    unsafe impl aya::Pod for ActionValue {}
    unsafe impl aya::Pod for DestValue {}
    unsafe impl aya::Pod for ProviderKey {}
    unsafe impl aya::Pod for ExecInfo {}
}
