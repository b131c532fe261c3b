//! The ring-buffer event envelope: `Event<T> { header, data }`.
//!
//! `header.kind` says which `T` follows; kinds are never renumbered.

/// `EventHeader::kind` values.
pub mod kind {
    /// `Event<ConnectDecision>` from the cgroup_sock_addr hooks.
    pub const CONNECT_DECISION: u32 = 1;
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub time_ns: u64,
    /// Kernel thread id.
    pub pid: u32,
    /// Kernel thread-group id (the user-visible process id).
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Inode of the task's cgroup v2 directory.
    pub cgroup_id: u64,
    /// `task->comm`, NUL padded.
    pub comm: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event<T> {
    pub header: EventHeader,
    pub data: T,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectDecision {
    /// Generation of the policy slot that decided.
    pub generation: u64,
    /// `NO_WORKLOAD` or the workload's 1-based id in that generation.
    pub workload_id: u32,
    /// `NO_PROVIDER` or the provider's 1-based id in that generation.
    pub provider_id: u32,
    /// Destination, network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Destination port, host order.
    pub port: u16,
    /// `verdict::*`
    pub verdict: u8,
    /// `reason::*`
    pub reason: u8,
    /// `proto::*`
    pub proto: u8,
    /// `family::*`
    pub family: u8,
    /// `hook::*`
    pub hook: u8,
    pub _pad: u8,
}

pub type ConnectEvent = Event<ConnectDecision>;

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<EventHeader>() == 56 && align_of::<EventHeader>() == 8);
    assert!(size_of::<ConnectDecision>() == 40);
    assert!(size_of::<ConnectEvent>() == 96 && align_of::<ConnectEvent>() == 8);
};
