//! NAT64 destinations (RFC 6052): an IPv6 address under one of the
//! policy's `nat64_prefixes` (/96 only) reaches, through the network's
//! NAT64 gateway, the IPv4 address in its last four bytes, so the connect
//! hooks judge it as that IPv4 address (sock_addr.rs `judge_v6`).
//!
//! `NAT64` is written by the agent alone (agent/src/kernel/maps.rs) from the
//! policy; a workload cannot change it. It is not per policy slot: a
//! reload adds the new prefixes, flips the slot, then removes the old
//! ones, so during a reload an address under a prefix of either policy is
//! judged as IPv4. An empty map (no prefix configured) judges every IPv6
//! address as IPv6. Other NAT64 prefix lengths (/32 to /64, whose IPv4
//! bytes sit around the reserved octet) are not read: docs/names.md.

use aya_ebpf::{macros::map, maps::HashMap};
use llm_egress_common::{NAT64_MAX, Nat64Key};

#[map]
pub static NAT64: HashMap<Nat64Key, u32> = HashMap::pinned(NAT64_MAX, 0);

/// Whether the IPv6 address whose first three 32-bit words (as loaded
/// from `user_ip6`, network order) are `w0..w2` is under a NAT64 prefix
/// of the policy. One hash lookup.
#[inline(always)]
pub fn is_nat64(w0: u32, w1: u32, w2: u32) -> bool {
    let (a, b, c) = (w0.to_ne_bytes(), w1.to_ne_bytes(), w2.to_ne_bytes());
    let key = Nat64Key {
        prefix: [
            a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3],
        ],
    };
    // SAFETY: the value is only tested for presence.
    unsafe { NAT64.get(&key) }.is_some()
}
