//! The words of socket-kind decisions and of IPv4 destinations written in
//! IPv6 form, for the audit log (docs/events.md). The kernel side:
//! ebpf/src/sock_create.rs (raw and ping sockets refused at socket()) and
//! ebpf/src/nat64.rs with sock_addr.rs `judge_v6` (NAT64 and IPv4-mapped
//! destinations judged as IPv4). Pure decoding of `ConnectDecision`
//! fields; nothing here touches the kernel.

use std::net::Ipv6Addr;

use llm_egress_common::{ConnectDecision, family, sock};

/// The first 12 bytes of `::ffff:a.b.c.d`.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// `dst_addr_form` of a decision record: how an IPv6 destination carried
/// the IPv4 address it was judged as (`ipv4_mapped`, `nat64`); None when
/// it was judged as written. The kernel keeps the IPv6 form's first 12
/// bytes in bytes 4..16 of `addr` (all zero for an IPv4 socket).
pub fn form_name(d: &ConnectDecision) -> Option<&'static str> {
    if d.family != family::INET || d.addr[4..16] == [0u8; 12] {
        return None;
    }
    if d.addr[4..16] == V4_MAPPED_PREFIX {
        Some("ipv4_mapped")
    } else {
        Some("nat64")
    }
}

/// `dst_addr_given`: the IPv6 address the program was given, when it was
/// judged as the IPv4 address in its last four bytes.
pub fn given_addr(d: &ConnectDecision) -> Option<String> {
    form_name(d)?;
    let a = &d.addr;
    let mut v6 = [0u8; 16];
    v6[..12].copy_from_slice(&a[4..16]);
    v6[12..].copy_from_slice(&a[..4]);
    Some(Ipv6Addr::from(v6).to_string())
}

/// `socket_type` of a socket-kind decision (`ConnectDecision::port`
/// carries the socket type).
pub fn socket_type(d: &ConnectDecision) -> &'static str {
    match u32::from(d.port) {
        sock::SOCK_RAW => "raw",
        sock::SOCK_DGRAM => "dgram",
        _ => "unknown",
    }
}

/// `protocol` of a socket-kind decision: `icmp`/`icmpv6` for ping
/// sockets, `raw` for raw sockets (`ip_protocol` has the number).
pub fn socket_protocol(d: &ConnectDecision) -> &'static str {
    if u32::from(d.port) == sock::SOCK_RAW {
        return "raw";
    }
    match u32::from(d.proto) {
        sock::IPPROTO_ICMP => "icmp",
        sock::IPPROTO_ICMPV6 => "icmpv6",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(addr: [u8; 16]) -> ConnectDecision {
        ConnectDecision {
            family: family::INET,
            addr,
            ..Default::default()
        }
    }

    #[test]
    fn a_nat64_destination_shows_the_address_it_was_given() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 51, 100, 7]);
        addr[4..16].copy_from_slice(&"64:ff9b::".parse::<Ipv6Addr>().unwrap().octets()[..12]);
        let d = decision(addr);
        assert_eq!(form_name(&d), Some("nat64"));
        assert_eq!(given_addr(&d).as_deref(), Some("64:ff9b::c633:6407"));
        let mapped = [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];
        let mapped = decision(mapped);
        assert_eq!(given_addr(&mapped).as_deref(), Some("::ffff:192.0.2.1"));
        let plain = decision([192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((form_name(&plain), given_addr(&plain)), (None, None));
    }

    #[test]
    fn socket_kinds_have_words() {
        let mut d = ConnectDecision {
            port: sock::SOCK_DGRAM as u16,
            proto: sock::IPPROTO_ICMPV6 as u8,
            ..Default::default()
        };
        assert_eq!((socket_type(&d), socket_protocol(&d)), ("dgram", "icmpv6"));
        d.port = sock::SOCK_RAW as u16;
        d.proto = 6;
        assert_eq!((socket_type(&d), socket_protocol(&d)), ("raw", "raw"));
    }
}
