//! The ring-buffer event envelope: `Event<T> { header, data }`.
//!
//! `header.kind` says which `T` follows; kinds are never renumbered.

/// `EventHeader::kind` values.
pub mod kind {
    /// `Event<ConnectDecision>` from the cgroup_sock_addr hooks.
    pub const CONNECT_DECISION: u32 = 1;
    /// `Event<ConnStats>` from sock_ops when a tracked connection closes.
    pub const CONN_SUMMARY: u32 = 2;
    /// `Event<ConnStats>` at most every `CONN_UPDATE_NS` while a tracked
    /// connection lives: from sock_ops on RTT samples (data sent is
    /// acknowledged) and from the ingress skb program when data arrives
    /// (streamed responses); both share `ConnStats::reported_ns`.
    pub const CONN_UPDATE: u32 = 3;
    /// `Event<DnsPacket>` from the DNS program: an answer for a provider
    /// name (or one whose question it could not read) that the kernel could
    /// not parse to the end; the agent parses it (not race-free).
    pub const DNS_UNPARSED: u32 = 16;
    /// `Event<SniDecision>` from the SNI program: a ClientHello whose
    /// server name is a provider host, judged.
    pub const SNI_DECISION: u32 = 17;
}

/// Minimum time between two `CONN_UPDATE` events of one connection.
pub const CONN_UPDATE_NS: u64 = 5_000_000_000;

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
    /// Socket cookie: ties the decision to the connection's later
    /// `ConnStats` events.
    pub cookie: u64,
    /// `NO_WORKLOAD` or the workload's 1-based id in that generation.
    pub workload_id: u32,
    /// `NO_PROVIDER` or the provider's 1-based id in that generation.
    pub provider_id: u32,
    /// Destination, network order; IPv4 in the first 4 bytes. An IPv4
    /// destination the program was given in IPv6 form (`::ffff:a.b.c.d`,
    /// or under a NAT64 prefix) keeps that address's first 12 bytes in
    /// bytes 4..16; an IPv4 socket's destination has zeros there.
    /// `hook == SOCK_CREATE`: all zero.
    pub addr: [u8; 16],
    /// Destination port, host order. `hook == SOCK_CREATE`: the socket
    /// type (`SOCK_RAW` 3, `SOCK_DGRAM` 2).
    pub port: u16,
    /// `verdict::*`
    pub verdict: u8,
    /// `reason::*`
    pub reason: u8,
    /// `proto::*`; `hook == SOCK_CREATE`: the socket's IP protocol number
    /// as given to socket() (0, 1 ICMP, 58 ICMPv6, 255 RAW, ...).
    pub proto: u8,
    /// `family::*`
    pub family: u8,
    /// `hook::*`
    pub hook: u8,
    /// 1: the connect hook tracks this connection in `CONNS`, so sock_ops
    /// reports its close (`programs = "all"`, an allowed provider TCP
    /// connect, a free `CONNS` slot); 0: no summary will come.
    pub tracked: u8,
}

/// The first 12 bytes of `::ffff:a.b.c.d`.
const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// The words of IPv4 destinations written in IPv6 form, for the audit log
/// (ebpf/src/nat64.rs and sock_addr.rs `judge_v6` judge NAT64 and
/// IPv4-mapped destinations as IPv4; docs/events.md).
impl ConnectDecision {
    /// `dst_addr_form`: how an IPv6 destination carried the IPv4 address it
    /// was judged as (`ipv4_mapped`, `nat64`); None when it was judged as
    /// written. The kernel keeps the IPv6 form's first 12 bytes in bytes
    /// 4..16 of `addr` (all zero for an IPv4 socket).
    pub fn addr_form(&self) -> Option<&'static str> {
        if self.family != crate::codes::family::INET || self.addr[4..16] == [0u8; 12] {
            return None;
        }
        if self.addr[4..16] == V4_MAPPED_PREFIX {
            Some("ipv4_mapped")
        } else {
            Some("nat64")
        }
    }

    /// `dst_addr_given`: the IPv6 address the program was given, when it
    /// was judged as the IPv4 address in its last four bytes.
    pub fn given_addr(&self) -> Option<core::net::Ipv6Addr> {
        self.addr_form()?;
        let a = &self.addr;
        let mut v6 = [0u8; 16];
        v6[..12].copy_from_slice(&a[4..16]);
        v6[12..].copy_from_slice(&a[..4]);
        Some(core::net::Ipv6Addr::from(v6))
    }
}

pub type ConnectEvent = Event<ConnectDecision>;

/// A tracked (provider, TCP) connection: what `CONNS` holds per socket
/// cookie and what summary and update events carry. The envelope's header
/// describes the task that called `connect()`, not the task running when
/// the event is sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnStats {
    pub cookie: u64,
    pub generation: u64,
    /// `connect()` time (CLOCK_MONOTONIC ns).
    pub connect_ns: u64,
    /// Handshake completed; 0 if it never did.
    pub established_ns: u64,
    /// Socket reached TCP_CLOSE; 0 in updates.
    pub closed_ns: u64,
    /// Last update event sent.
    pub reported_ns: u64,
    /// `bytes_acked`: payload bytes sent and acknowledged.
    pub bytes_sent: u64,
    /// `bytes_received`: payload bytes received.
    pub bytes_received: u64,
    pub workload_id: u32,
    pub provider_id: u32,
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    /// `bytes_acked` at the handshake: the SYN's sequence number, which the
    /// kernel counts and which is not payload.
    pub base_sent: u8,
    pub _pad: [u8; 4],
    /// Segments that carried payload, received (`data_segs_in`): a streamed
    /// response arrives as many small segments, a buffered one as few full
    /// ones (the token estimator uses the ratio).
    pub data_segs_in: u32,
    /// Segments that carried payload, sent (`data_segs_out`).
    pub data_segs_out: u32,
    /// Bucket id of the connection's bandwidth limit (`BANDWIDTH`), 0 for
    /// none: the skb programs police the connection's packets with it.
    pub bandwidth_bucket: u64,
    /// Bucket id of the connection's token budget (`BUDGET_SPENT`), 0 for
    /// none: once the budget is spent, the egress program stops what the
    /// connection sends (docs/limits.md, "Open connections").
    pub budget_bucket: u64,
    /// TLS record walks (ebpf/src/records.rs): `tls[TLS_SENT]` over the
    /// bytes sent, `tls[TLS_RECEIVED]` over the bytes received.
    pub tls: [TlsWalk; 2],
}

/// Index of the sent direction in `ConnStats::tls`.
pub const TLS_SENT: usize = 0;
/// Index of the received direction in `ConnStats::tls`.
pub const TLS_RECEIVED: usize = 1;

/// One direction of a connection's TLS record walk: the cgroup_skb programs
/// read the 5-byte record headers (type, version 3.x, length) along the TCP
/// stream, by TCP sequence number (ebpf/src/records.rs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsWalk {
    /// `tls_walk::*`
    pub state: u8,
    /// Bytes of a record header that ended a segment, kept in `hdr` until
    /// the next segment completes it.
    pub have: u8,
    /// Times the walk lost the record boundaries (a gap in the sequence
    /// numbers, a walk cut short by its bound, bytes that are not a record
    /// header).
    pub lost: u16,
    /// `SYNCED`: sequence number of the next byte to read (a record header,
    /// or the rest of `hdr`). `LOST`: the highest end of a segment seen.
    pub next_seq: u32,
    /// Record headers read.
    pub records: u32,
    /// Of which application_data (content type 23).
    pub app_records: u32,
    /// Times the walk found the boundaries again after losing them.
    pub resyncs: u16,
    pub hdr: [u8; 4],
    pub _pad: u16,
}

/// `TlsWalk::state` values.
pub mod tls_walk {
    /// No payload seen yet: the first payload must start with a record header.
    pub const NEW: u8 = 0;
    /// Record boundaries known.
    pub const SYNCED: u8 = 1;
    /// Boundaries lost: a new segment that starts with an application_data
    /// header resyncs.
    pub const LOST: u8 = 2;
}

pub type ConnEvent = Event<ConnStats>;

#[cfg(feature = "user")]
// SAFETY: repr(C) integers and integer arrays with explicit padding.
unsafe impl aya::Pod for ConnEvent {}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<EventHeader>() == 56 && align_of::<EventHeader>() == 8);
    assert!(size_of::<ConnectDecision>() == 48);
    assert!(size_of::<ConnectEvent>() == 104 && align_of::<ConnectEvent>() == 8);
    assert!(size_of::<TlsWalk>() == 24 && align_of::<TlsWalk>() == 4);
    assert!(size_of::<ConnStats>() == 168);
    assert!(size_of::<ConnEvent>() == 224 && align_of::<ConnEvent>() == 8);
};

/// Bytes of a DNS message carried by a `DNS_UNPARSED` event.
pub const DNS_EVENT_BYTES: usize = 1024;

/// A DNS message the kernel could not parse, for the agent to parse.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsPacket {
    /// Bytes of `data` holding the message (the start of it if longer).
    pub len: u32,
    /// Length of the whole DNS message (UDP payload).
    pub msg_len: u32,
    /// Why the kernel gave up (`dns_unparsed::*`).
    pub why: u32,
    pub _pad: u32,
    /// The learning scope of the socket that received the answer
    /// (`LearnedKeyV4::scope`): the agent learns the addresses for it.
    pub scope: u64,
    pub data: [u8; DNS_EVENT_BYTES],
}

pub type DnsEvent = Event<DnsPacket>;

/// `DnsPacket::why` values.
pub mod dns_unparsed {
    /// A name the kernel could not read (too many labels or hops, a pointer
    /// forward, a label type it does not know).
    pub const NAME: u32 = 1;
    /// The message is longer than the bytes the kernel copies, or records
    /// run past its end.
    pub const TRUNCATED: u32 = 2;
    /// More answer records than the kernel reads.
    pub const TOO_MANY_ANSWERS: u32 = 3;
    /// More than one question.
    pub const QUESTIONS: u32 = 4;
    /// More CNAMEs in the chain than the kernel follows.
    pub const CHAIN: u32 = 5;
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<DnsPacket>() == 24 + DNS_EVENT_BYTES);
    assert!(size_of::<DnsEvent>() == 56 + 24 + DNS_EVENT_BYTES && align_of::<DnsEvent>() == 8);
};

/// Bytes of a server name carried by an SNI event (names are at most 253).
pub const SNI_NAME_BYTES: usize = 256;

/// A TLS ClientHello judged by its server name (cgroup_skb egress).
/// The envelope's header: `time_ns`, the socket's cgroup and uid; pid,
/// tgid and comm of the task that connected when the connect hook tracked
/// the connection (a provider address), else 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SniDecision {
    pub generation: u64,
    /// Socket cookie (the connect decision's cookie).
    pub cookie: u64,
    pub workload_id: u32,
    /// The provider the server name belongs to.
    pub provider_id: u32,
    /// Destination, network order; IPv4 in the first 4 bytes.
    pub addr: [u8; 16],
    /// Destination port, host order.
    pub port: u16,
    /// `verdict::*`
    pub verdict: u8,
    /// `reason::*`
    pub reason: u8,
    /// `family::*`
    pub family: u8,
    /// `payload::*`: what was judged (a ClientHello, a CONNECT request).
    pub payload: u8,
    /// Bytes of `name` used.
    pub name_len: u16,
    /// The server name or CONNECT host as sent (not NUL terminated); for
    /// `payload::UNREADABLE`, the payload's first bytes.
    pub name: [u8; SNI_NAME_BYTES],
    /// The CONNECT request's target port (`payload::CONNECT`, and the
    /// ClientHello of its tunnel); 0 otherwise.
    pub target_port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

pub type SniEvent = Event<SniDecision>;

/// `SniDecision::payload` values: what the SNI program judged.
pub mod payload {
    /// A TLS ClientHello, the connection's first payload.
    pub const CLIENT_HELLO: u8 = 0;
    /// An HTTP `CONNECT host:port` request to a proxy (its host judged).
    pub const CONNECT: u8 = 1;
    /// The ClientHello sent through the tunnel of a CONNECT request.
    pub const TUNNEL_CLIENT_HELLO: u8 = 2;
    /// The first payload of a connection to a named proxy that is not a
    /// CONNECT request the kernel read: judged by `failure_mode`.
    pub const UNREADABLE: u8 = 3;

    /// The record's `hook` word for what the SNI program judged.
    pub fn hook_name(p: u8) -> &'static str {
        match p {
            CLIENT_HELLO => "sni",
            CONNECT => "http_connect",
            TUNNEL_CLIENT_HELLO => "sni_tunnel",
            UNREADABLE => "proxy_unreadable",
            _ => "unknown",
        }
    }
}

const _: () = {
    use core::mem::{align_of, size_of};
    assert!(size_of::<SniDecision>() == 56 + SNI_NAME_BYTES);
    assert!(size_of::<SniEvent>() == 56 + 56 + SNI_NAME_BYTES && align_of::<SniEvent>() == 8);
};

#[cfg(test)]
mod tests {
    use core::net::Ipv6Addr;

    use super::*;
    use crate::sock;

    fn decision(addr: [u8; 16]) -> ConnectDecision {
        ConnectDecision {
            family: crate::codes::family::INET,
            addr,
            ..Default::default()
        }
    }

    #[test]
    fn a_nat64_destination_shows_the_address_it_was_given() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[198, 51, 100, 7]);
        let prefix: Ipv6Addr = "64:ff9b::".parse().unwrap();
        addr[4..16].copy_from_slice(&prefix.octets()[..12]);
        let d = decision(addr);
        assert_eq!(d.addr_form(), Some("nat64"));
        assert_eq!(d.given_addr(), Some("64:ff9b::c633:6407".parse().unwrap()));
        let mapped = decision([192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(
            mapped.given_addr(),
            Some("::ffff:192.0.2.1".parse().unwrap())
        );
        let plain = decision([192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((plain.addr_form(), plain.given_addr()), (None, None));
    }

    #[test]
    fn socket_kinds_have_words() {
        assert_eq!(
            (
                sock::type_name(sock::SOCK_DGRAM),
                sock::protocol_name(sock::SOCK_DGRAM, sock::IPPROTO_ICMPV6)
            ),
            ("dgram", "icmpv6")
        );
        assert_eq!(
            (
                sock::type_name(sock::SOCK_RAW),
                sock::protocol_name(sock::SOCK_RAW, 6)
            ),
            ("raw", "raw")
        );
    }
}
