//! Socket kinds and address forms: what the kernel and the agent share for
//! the socket-kind verdict (cgroup/sock_create, ebpf/src/sock_create.rs)
//! and for judging NAT64 destinations as IPv4 (ebpf/src/nat64.rs).
//! docs/policy.md ("Raw and ping sockets", "NAT64 prefixes") has the
//! user's view.

/// cgroup/sock_create: refuses raw and ICMP ping sockets of workloads
/// whose `raw_sockets` says so.
pub const PROG_SOCK_CREATE: &str = "verdict_sock_create";

/// `HashMap<Nat64Key, u32>`: the policy's `nat64_prefixes` (value 1). Not
/// per slot: a reload adds the new prefixes before removing the old ones,
/// and an address under a prefix of either policy is judged as IPv4.
pub const MAP_NAT64: &str = "NAT64";
/// Prefixes `NAT64` holds (the policy accepts at most this many).
pub const NAT64_MAX: u32 = 16;

/// Key of `NAT64`: the first 12 bytes (a /96) of an IPv6 address, network
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Nat64Key {
    pub prefix: [u8; 12],
}

/// The values of `struct bpf_sock` fields the program compares
/// (include/uapi/linux/in.h, in6.h, linux/net.h; the same on every
/// architecture Linux runs eBPF on).
pub mod sock {
    pub const AF_INET: u32 = 2;
    pub const AF_INET6: u32 = 10;
    pub const SOCK_DGRAM: u32 = 2;
    pub const SOCK_RAW: u32 = 3;
    pub const IPPROTO_ICMP: u32 = 1;
    pub const IPPROTO_ICMPV6: u32 = 58;

    /// The word of a refused socket's type (`ConnectDecision::port` of a
    /// `sock_create` decision).
    pub fn type_name(sock_type: u32) -> &'static str {
        match sock_type {
            SOCK_RAW => "raw",
            SOCK_DGRAM => "dgram",
            _ => "unknown",
        }
    }

    /// The word of a refused socket's protocol (`ConnectDecision::proto`).
    pub fn protocol_name(sock_type: u32, protocol: u32) -> &'static str {
        if sock_type == SOCK_RAW {
            return "raw";
        }
        match protocol {
            IPPROTO_ICMP => "icmp",
            IPPROTO_ICMPV6 => "icmpv6",
            _ => "unknown",
        }
    }
}

const _: () = {
    assert!(core::mem::size_of::<Nat64Key>() == 12);
};

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, a byte array: every bit pattern is valid.
unsafe impl aya::Pod for Nat64Key {}
