//! Numeric codes of actions, verdicts, reasons and modes.
//!
//! These numbers are written into pinned maps and ring-buffer events, which
//! outlive one agent binary: a number, once given a meaning, is never reused.

/// What a policy says about a destination (stored in maps as `u8`).
pub mod action {
    /// Let the connection through.
    pub const ALLOW: u8 = 1;
    /// Refuse it: the caller gets EPERM.
    pub const DENY: u8 = 2;
    /// Let it through and report it as a would-be deny.
    pub const AUDIT: u8 = 3;
}

/// What actually happened to a connection (in events).
pub mod verdict {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
    /// Allowed, but the policy would have denied it (action `audit`, or
    /// `mode = "audit"`).
    pub const AUDIT: u8 = 3;

    /// The word of a verdict in records and metric labels.
    pub fn name(v: u8) -> &'static str {
        match v {
            ALLOW => "allow",
            DENY => "deny",
            AUDIT => "audit",
            _ => "unknown",
        }
    }
}

/// Why a verdict was reached (in events).
pub mod reason {
    /// A CIDR in the workload's `allow`/`deny` lists matched.
    pub const WORKLOAD_CIDR: u8 = 1;
    /// The destination is a provider the workload names in `allow`/`deny`.
    pub const WORKLOAD_PROVIDER: u8 = 2;
    /// A provider the workload does not name: the workload's `llm` action.
    pub const WORKLOAD_LLM_DEFAULT: u8 = 3;
    /// A non-provider destination: the workload's `other` action.
    pub const WORKLOAD_OTHER_DEFAULT: u8 = 4;
    /// A provider destination of a process in no workload: `defaults.llm`.
    pub const DEFAULT_LLM: u8 = 5;
    /// A non-provider destination of a process in no workload: `defaults.other`.
    pub const DEFAULT_OTHER: u8 = 6;
    /// No policy is loaded, or a map lookup failed: `failure_mode` decided.
    pub const INTERNAL_ERROR: u8 = 7;
    /// The workload's connection rate to this provider is used up
    /// (`[workloads.limits]`, docs/limits.md).
    pub const RATE_LIMITED: u8 = 8;
    /// The workload's token budget for this provider is spent.
    pub const TOKEN_BUDGET: u8 = 9;
    /// A raw socket (`SOCK_RAW`, any protocol): the workload's
    /// `raw_sockets` action (hook `SOCK_CREATE`).
    pub const RAW_SOCKET: u8 = 10;
    /// An ICMP ping socket (`SOCK_DGRAM` with `IPPROTO_ICMP` or
    /// `IPPROTO_ICMPV6`): the workload's `raw_sockets` action.
    pub const PING_SOCKET: u8 = 11;
    /// The first payload of a connection to a named proxy is not a CONNECT
    /// request the kernel could read: `failure_mode` decided.
    pub const PROXY_UNREADABLE: u8 = 12;

    /// The word of a reason in records.
    pub fn name(r: u8) -> &'static str {
        match r {
            WORKLOAD_CIDR => "workload_cidr",
            WORKLOAD_PROVIDER => "workload_provider",
            WORKLOAD_LLM_DEFAULT => "workload_llm_default",
            WORKLOAD_OTHER_DEFAULT => "workload_other_default",
            DEFAULT_LLM => "default_llm",
            DEFAULT_OTHER => "default_other",
            INTERNAL_ERROR => "internal_error",
            RATE_LIMITED => "rate_limited",
            TOKEN_BUDGET => "token_budget",
            RAW_SOCKET => "raw_socket",
            PING_SOCKET => "ping_socket",
            PROXY_UNREADABLE => "proxy_unreadable",
            _ => "unknown",
        }
    }
}

/// `mode` of a policy slot.
pub mod mode {
    /// Deny what the policy denies.
    pub const ENFORCE: u8 = 1;
    /// Deny nothing; report would-be denies as verdict `AUDIT`.
    pub const AUDIT: u8 = 2;
}

/// What the programs do when they cannot reach a decision (no active policy,
/// a failed lookup of their own configuration).
pub mod failure_mode {
    /// Deny: nothing passes that the policy has not judged.
    pub const CLOSED: u8 = 1;
    /// Allow: an internal error never breaks a workload.
    pub const OPEN: u8 = 2;
}

/// Transport protocol of a judged socket (IANA numbers).
pub mod proto {
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// Address family of the judged destination (after IPv4-mapped IPv6 has been
/// unmapped).
pub mod family {
    pub const INET: u8 = 4;
    pub const INET6: u8 = 6;

    /// An event's address (IPv4 in the first four bytes) as an address.
    pub fn ip(family: u8, a: &[u8; 16]) -> core::net::IpAddr {
        if family == INET {
            core::net::IpAddr::V4(core::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            core::net::IpAddr::V6(core::net::Ipv6Addr::from(*a))
        }
    }
}

/// Which hook produced a decision.
pub mod hook {
    pub const CONNECT4: u8 = 1;
    pub const CONNECT6: u8 = 2;
    pub const SENDMSG4: u8 = 3;
    pub const SENDMSG6: u8 = 4;
    /// The SNI program (cgroup_skb egress): a ClientHello's server name.
    pub const SNI: u8 = 5;
    /// The socket-kind program (cgroup/sock_create): a raw or ping socket
    /// refused or audited at `socket()`.
    pub const SOCK_CREATE: u8 = 6;

    /// The word of a hook in records.
    pub fn name(h: u8) -> &'static str {
        match h {
            CONNECT4 => "connect4",
            CONNECT6 => "connect6",
            SENDMSG4 => "sendmsg4",
            SENDMSG6 => "sendmsg6",
            SNI => "sni",
            SOCK_CREATE => "sock_create",
            _ => "unknown",
        }
    }
}
