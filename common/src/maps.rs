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
/// `Array<u64>`, one entry: `bpf_ktime_get_ns()` when a program last woke
/// the agent's reader of `EVENTS` (see [`EVENTS_WAKE_NS`]).
pub const MAP_EVENTS_WOKEN: &str = "EVENTS_WOKEN";
/// `Array<u32>[1]`: 1 once the kernel refused `TCP_BPF_SOCK_OPS_CB_FLAGS`
/// from the connect hook (before 6.14); sock_ops then looks every
/// connecting socket up (ebpf/src/sock_ops.rs).
pub const MAP_CB_FLAGS_FALLBACK: &str = "CB_FLAGS_FALLBACK";

/// `LruHashMap<u32 tgid, ExecInfo>`: the last exec of processes under the
/// attach cgroup, so that a process that exits right after connecting is
/// still attributed to its executable.
pub const MAP_EXECS: &str = "EXECS";
/// `PerCpuArray<ExecInfo>`, one entry: scratch space of the exec program
/// (an `ExecInfo` is too large for the BPF stack of a tracepoint).
pub const MAP_EXEC_SCRATCH: &str = "EXEC_SCRATCH";

/// `LruHashMap<u64 socket cookie, ConnEvent>`: tracked provider connections.
pub const MAP_CONNS: &str = "CONNS";
/// `Array<ConnEvent>`, one entry, all zeros and never written: what a
/// tracked connection's `CONNS` entry is created from before the connect
/// hook fills it in place (a `ConnEvent` does not fit the BPF stack, and a
/// per-CPU scratch could be overwritten by a connect that preempts this one).
pub const MAP_CONN_ZERO: &str = "CONN_ZERO";

/// `HashMap<NameKey, DestValue>`: provider host names by hash
/// (`names::host_key`), per slot; wildcard hosts as `names::wildcard` keys.
pub const MAP_NAMES: &str = "NAMES";
/// `Array<NameConfig>`, one entry: the name-hash seed and the TTL bounds of
/// learned addresses. Not per slot: learned entries outlive reloads.
pub const MAP_NAME_CFG: &str = "NAME_CFG";
/// `LruHashMap<LearnedKeyV4, Learned>`: addresses learned from DNS answers,
/// per workload (the scope of the socket that received the answer), with
/// the name hashes they were learned for. Not per slot: a reload maps the
/// same names to the new policy's providers through `NAMES`.
pub const MAP_LEARNED_V4: &str = "LEARNED_V4";
/// `LruHashMap<LearnedKeyV6, Learned>`: as `LEARNED_V4`, for IPv6.
pub const MAP_LEARNED_V6: &str = "LEARNED_V6";
/// `LruHashMap<DnsQueryKey, DnsQuery>`: DNS queries the workloads' sockets
/// sent to a trusted resolver and that no answer has consumed yet
/// (ebpf/src/dns_query.rs). LRU: a flood of queries evicts the oldest.
pub const MAP_DNS_QUERIES: &str = "DNS_QUERIES";
/// `HashMap<[u8; 16], u32>`: the resolvers answers are learned from
/// (IPv4 as `::ffff:a.b.c.d`), unless `NameConfig::any_resolver` is set.
pub const MAP_RESOLVERS: &str = "RESOLVERS";
/// `PerCpuArray`, one entry: scratch space of the DNS program (the copied
/// answer and the label hashes of a name).
pub const MAP_DNS_SCRATCH: &str = "DNS_SCRATCH";

/// `PerCpuHashMap<VerdictKey, u64>`: every decision, counted by
/// generation, workload, provider and verdict (exact, whatever happens to
/// events).
pub const MAP_VERDICTS: &str = "VERDICTS";

/// `LruHashMap<u64 socket cookie, u32 sni_state::*>`: TCP sockets whose
/// first payload the SNI program has seen, and whether it denied them.
pub const MAP_SNI_STATE: &str = "SNI_STATE";
/// `HashMap<u64 socket cookie, SniScratch>` (allocated on insert): scratch
/// space of the SNI program while it reads one socket's ClientHello (the
/// copied bytes and the label hashes of its server name), removed when it is
/// done. Per socket, not per CPU: the egress program runs in process context
/// and in softirq, and a parse on one CPU can be interrupted or preempted
/// by another socket's.
pub const MAP_SNI_SCRATCH: &str = "SNI_SCRATCH";
/// `Array<SniScratch>`, one entry, never written: what `SNI_SCRATCH`
/// entries are created from.
pub const MAP_SNI_ZERO: &str = "SNI_ZERO";

/// `PerCpuArray`, one entry: state of a TLS record walk over one received
/// skb (ebpf/src/records.rs; the ingress program runs in softirq only).
pub const MAP_RECORDS_SCRATCH: &str = "RECORDS_SCRATCH";
/// `HashMap<u64 socket cookie, RecordScratch>` (allocated on insert): state
/// of a TLS record walk over one sent skb, per socket because the egress
/// program runs in process context and in softirq; removed after the walk.
pub const MAP_RECORDS_SENT: &str = "RECORDS_SENT";

/// `HashMap<u32 port, u32>`: the ports of the policy's named proxies
/// (`[[proxies]]`), any slot. sock_ops gives sockets to these ports the
/// per-segment callback at their handshake, as it does port 443, so that a
/// denied CONNECT request is aborted fast (docs/names.md, "Proxies").
pub const MAP_PROXY_PORTS: &str = "PROXY_PORTS";

/// Every map of the object, for the loader's pin bookkeeping and a test that
/// checks the object declares exactly these.
pub const ALL_MAPS: [&str; 47] = [
    MAP_ACTIVE,
    MAP_SLOTS,
    MAP_WORKLOADS,
    MAP_RULES_V4,
    MAP_RULES_V6,
    MAP_DESTS_V4,
    MAP_DESTS_V6,
    MAP_PROVIDER_ACTIONS,
    MAP_EVENTS,
    MAP_EVENTS_WOKEN,
    MAP_CB_FLAGS_FALLBACK,
    MAP_COUNTERS,
    MAP_EXECS,
    MAP_EXEC_SCRATCH,
    MAP_CONNS,
    MAP_CONN_ZERO,
    MAP_NAMES,
    MAP_NAME_CFG,
    MAP_LEARNED_V4,
    MAP_LEARNED_V6,
    MAP_DNS_SCRATCH,
    MAP_DNS_QUERIES,
    MAP_RESOLVERS,
    MAP_VERDICTS,
    MAP_SNI_STATE,
    MAP_SNI_SCRATCH,
    MAP_SNI_ZERO,
    MAP_RECORDS_SCRATCH,
    MAP_RECORDS_SENT,
    MAP_PROXY_PORTS,
    crate::limits::MAP_LIMITS,
    crate::limits::MAP_BUCKETS,
    crate::limits::MAP_BANDWIDTH,
    crate::limits::MAP_BUDGET_SPENT,
    crate::limits::MAP_LIMIT_HITS,
    crate::limits::MAP_LIMIT_CFG,
    crate::sockets::MAP_NAT64,
    crate::plaintext::MAP_PLAINTEXT,
    crate::plaintext::MAP_PLAINTEXT_CALLS,
    crate::plaintext::MAP_PLAINTEXT_SOCKS,
    crate::plaintext::MAP_PLAINTEXT_PENDING,
    crate::plaintext::MAP_PLAINTEXT_GO_CALLS,
    crate::plaintext::MAP_PLAINTEXT_CFG,
    crate::plaintext::MAP_PLAINTEXT_WORKLOADS,
    crate::plaintext::MAP_PLAINTEXT_SCRATCH,
    crate::plaintext::MAP_PLAINTEXT_STATS,
    crate::plaintext::MAP_PLAINTEXT_TRACED,
];

/// Program names: `<job>_<hook>`.
pub const PROG_CONNECT4: &str = "verdict_connect4";
pub const PROG_CONNECT6: &str = "verdict_connect6";
pub const PROG_SENDMSG4: &str = "verdict_sendmsg4";
pub const PROG_SENDMSG6: &str = "verdict_sendmsg6";
/// sock_ops: connection establishment, state changes and RTT samples of
/// tracked connections (bytes and durations).
pub const PROG_SOCK_OPS: &str = "account_sock_ops";
/// The programs attached (and pinned) to the attach cgroup with
/// `programs = "all"`, the default.
pub const ALL_PROGRAMS: [&str; 8] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    crate::sockets::PROG_SOCK_CREATE,
    PROG_SOCK_OPS,
    PROG_DNS_INGRESS,
    PROG_SNI_EGRESS,
];
/// The programs attached with `programs = "connect"`: the connect-time
/// verdict alone (docs/policy.md). The socket-kind verdict
/// (`PROG_SOCK_CREATE`) is one of them: a connect-time verdict too.
pub const CONNECT_PROGRAMS: [&str; 5] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    crate::sockets::PROG_SOCK_CREATE,
];
/// Tracepoint sched/sched_process_exec: fills `EXECS`.
pub const PROG_EXEC: &str = "attribute_exec";
/// cgroup_skb/ingress: learns provider addresses from DNS answers.
pub const PROG_DNS_INGRESS: &str = "names_dns_ingress";
/// cgroup_skb/egress: judges the server name of TLS ClientHellos.
pub const PROG_SNI_EGRESS: &str = "names_sni_egress";

/// Capacities. Changing one changes the pinned maps' shape: the loader then
/// replaces the pinned state instead of adopting it.
pub const WORKLOADS_MAX: u32 = 16_384;
pub const RULES_MAX: u32 = 65_536;
pub const DESTS_MAX: u32 = 65_536;
pub const PROVIDER_ACTIONS_MAX: u32 = 65_536;
/// The event ring buffer: 16 MiB of kernel memory, so that a burst of
/// events (batched wakeups let the programs run ahead of the agent's
/// reader) waits here instead of being lost: 3,000 provider connects in a
/// burst overflowed 1 MiB with the debug agent.
pub const EVENTS_BYTES: u32 = 16 << 20;
/// Wakeups of the agent's reader of `EVENTS` are batched: the connect hook
/// and sock_ops wake it for a record only when no program has woken it in
/// the last `EVENTS_WAKE_NS` (or when `EVENTS_WAKE_BYTES` wait), and the
/// agent, once woken, drains the ring again on its own every
/// `EVENTS_WAKE_NS` for `2 × EVENTS_WAKE_NS`. A wakeup is an
/// inter-processor interrupt and a scheduler wakeup, several µs on a VM:
/// one per provider connect was most of its connect-time cost
/// (docs/benchmarks.md). A lone event is delivered at once; events of a
/// burst at most ~`2 × EVENTS_WAKE_NS` late (while the agent keeps up).
/// Nothing is sampled or merged; a full ring drops and counts (`EVENTS_LOST`).
pub const EVENTS_WAKE_NS: u64 = 5_000_000;
/// Bytes waiting in `EVENTS` above which a record wakes the reader at once
/// (a quarter of the ring: a burst never waits for the timer to drain).
pub const EVENTS_WAKE_BYTES: u64 = EVENTS_BYTES as u64 / 4;
pub const EXECS_MAX: u32 = 16_384;
pub const CONNS_MAX: u32 = 65_536;
pub const VERDICTS_MAX: u32 = 65_536;
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
/// Scope of the named proxies' entries in `DESTS_V4`/`DESTS_V6` (value: a
/// `DestValue` whose `provider_id` is the proxy's 1-based id). Workload
/// ids never reach it.
pub const PROXY_SCOPE: u32 = u32::MAX;
/// Ports of the `PROXY_PORTS` map (sock_ops' per-segment callback).
pub const PROXY_PORTS_MAX: u32 = 256;
/// Workload id of processes in no workload (never stored in `WORKLOADS`).
pub const NO_WORKLOAD: u32 = 0;
/// Provider id of non-provider destinations.
pub const NO_PROVIDER: u32 = 0;
/// Bits of a prefix key before the address: slot and scope.
pub const PREFIX_KEY_HEADER_BITS: u32 = 64;
pub const NAMES_MAX: u32 = 65_536;
pub const LEARNED_MAX: u32 = 65_536;
/// Pending DNS queries remembered (LRU, all workloads together).
pub const DNS_QUERIES_MAX: u32 = 16_384;
/// How long a pending query waits for its answer (resolvers' retries and
/// timeouts are a few seconds; a later answer is not learned).
pub const DNS_QUERY_TTL_NS: u64 = 10_000_000_000;
/// Trusted resolver addresses (`RESOLVERS`).
pub const RESOLVERS_MAX: u32 = 256;
/// Names one learned address remembers (a CDN address serves several).
pub const LEARNED_NAMES: usize = 4;
/// Bytes of a DNS message the kernel copies and parses; a longer answer is
/// parsed as far as these bytes go (what lies beyond: `DNS_UNPARSED`).
pub const DNS_BUF: usize = 1024;
/// Labels of a name the kernel follows (longer names: unparsed).
pub const DNS_MAX_LABELS: usize = 16;
/// Answer records the kernel reads per message.
pub const DNS_MAX_ANSWERS: usize = 16;
/// Compression pointers followed per name (a loop ends there).
pub const DNS_MAX_HOPS: usize = 8;
/// Default bounds of a learned address's lifetime (seconds): the record's
/// TTL, clamped. The minimum covers clients that connect right after a
/// TTL-0 answer.
pub const LEARN_TTL_MIN_S: u32 = 60;
pub const LEARN_TTL_MAX_S: u32 = 3600;
/// Sockets the SNI program remembers (LRU).
pub const SNI_STATE_MAX: u32 = 65_536;
/// Entries of each per-socket scratch map (`SNI_SCRATCH`, `RECORDS_SENT`):
/// one entry lives for one program run, so this bounds runs in progress (a
/// few per CPU), not sockets. An SNI read that finds its map full passes the
/// packet unjudged, counted in `counter::SNI_BUSY`; a record walk loses
/// sync.
pub const SOCKET_SCRATCH_MAX: u32 = 1024;
/// Bytes of a first TCP payload the SNI program copies and parses (a
/// ClientHello with post-quantum key shares is ~1,800 bytes).
pub const SNI_BUF: usize = 2048;
/// Record headers the record walk reads in one skb (bpf_loop steps); an
/// skb with more (a 64 KiB GRO skb of records < 16 bytes) is cut short and
/// the direction loses sync. 64 KiB / 22 bytes (the smallest TLS 1.3
/// record: header, type byte, 16-byte tag) = 2,979.
pub const RECORD_STEPS: u32 = 4096;
/// Longest record a header may announce (TLS 1.2 ciphertext: 2^14 + 2048).
pub const RECORD_MAX_LEN: u16 = 16_384 + 2_048;
/// ClientHello extensions the SNI program walks.
pub const SNI_MAX_EXTENSIONS: usize = 32;

/// `SNI_STATE` values.
pub mod sni_state {
    /// First payload seen: the socket is not judged again.
    pub const SEEN: u32 = 1;
    /// The ClientHello was denied: every later packet is dropped.
    pub const DENIED: u32 = 2;
    /// A CONNECT request was judged and not denied: the next payload (the
    /// ClientHello sent through the tunnel) is read too. The CONNECT's
    /// target port is in the upper 16 bits (`tunnel`, `tunnel_port`).
    pub const TUNNEL: u32 = 3;

    /// A socket to a named proxy (`[[proxies]]`, on one of its ports),
    /// marked by sock_ops at its handshake, before its first payload: a
    /// first payload that is not a CONNECT request the kernel reads is
    /// judged by `failure_mode`.
    pub const PROXY: u32 = 4;

    /// The state of a socket whose CONNECT named port `port`.
    pub const fn tunnel(port: u16) -> u32 {
        TUNNEL | (port as u32) << 16
    }

    /// Whether `state` is a tunnel's.
    pub const fn is_tunnel(state: u32) -> bool {
        state & 0xffff == TUNNEL
    }

    /// The CONNECT target port of a tunnel's state.
    pub const fn tunnel_port(state: u32) -> u16 {
        (state >> 16) as u16
    }
}

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
    /// UDP datagrams from port 53 seen by the DNS program.
    pub const DNS_RESPONSES: u32 = 6;
    /// Responses for a provider name that the kernel parsed to the end.
    pub const DNS_PARSED: u32 = 7;
    /// Responses for a provider name (or whose question the kernel could not
    /// read) that the kernel could not parse: sent to the agent.
    pub const DNS_UNPARSED: u32 = 8;
    /// Addresses learned (written to `LEARNED_*`) by the kernel.
    pub const DNS_LEARNED: u32 = 9;
    /// `LEARNED_*` updates that failed.
    pub const DNS_LEARN_FAILED: u32 = 10;
    /// Address records in a provider answer whose owner is not in the
    /// question's CNAME chain: ignored.
    pub const DNS_OFF_CHAIN: u32 = 11;
    /// Decisions not counted in `VERDICTS` because it was full.
    pub const VERDICTS_FULL: u32 = 12;
    /// SNI verdicts (ebpf/src/sni.rs): a ClientHello naming a provider host
    /// on one of its ports, judged allow / deny / audit.
    pub const SNI_ALLOW: u32 = 13;
    pub const SNI_DENY: u32 = 14;
    pub const SNI_AUDIT: u32 = 15;
    /// A ClientHello whose server name is no provider's (on this port): the
    /// address verdict stands.
    pub const SNI_OTHER_NAME: u32 = 16;
    /// A ClientHello without a server_name extension: address verdict.
    pub const SNI_NO_SNI: u32 = 17;
    /// A ClientHello with an encrypted_client_hello extension (its
    /// server_name is the public outer name): address verdict.
    pub const SNI_ECH: u32 = 18;
    /// A ClientHello that goes on past the first segment and whose
    /// server_name is not in it: address verdict.
    pub const SNI_SPLIT: u32 = 19;
    /// First payload of a provider connection (tracked in `CONNS`) that is
    /// not a TLS ClientHello: address verdict.
    pub const SNI_NOT_TLS: u32 = 20;
    /// A ClientHello the kernel could not read (bad lengths, more than
    /// `SNI_MAX_EXTENSIONS` extensions, a name of more than
    /// `DNS_MAX_LABELS` labels or with empty labels): address verdict.
    pub const SNI_MALFORMED: u32 = 21;
    /// Packets of a socket whose ClientHello was denied, dropped.
    pub const SNI_DROPPED: u32 = 22;
    /// DNS answers over TCP (also counted in `DNS_RESPONSES`).
    pub const DNS_TCP_RESPONSES: u32 = 23;
    /// TCP answers longer than their first segment: not learned.
    pub const DNS_TCP_SPLIT: u32 = 24;
    /// Limited traffic let through because `BUCKETS` was full.
    pub const LIMIT_BUCKETS_FULL: u32 = 25;
    /// Limit hits not counted in `LIMIT_HITS` because it was full.
    pub const LIMIT_HITS_FULL: u32 = 26;
    /// Open connections stopped because their pair's token budget was
    /// spent (their next payload packet dropped, the socket aborted).
    pub const BUDGET_STOPPED: u32 = 27;
    /// First payloads passed unjudged because `SNI_SCRATCH` was full (more
    /// ClientHellos read at once than `SOCKET_SCRATCH_MAX`).
    pub const SNI_BUSY: u32 = 28;
    /// Raw and ping sockets refused at socket() (ebpf/src/sock_create.rs).
    pub const SOCKETS_DENIED: u32 = 29;
    /// Raw and ping sockets allowed but reported as would-be denies.
    pub const SOCKETS_AUDITED: u32 = 30;
    /// DNS answers (UDP or TCP from port 53) that answer no query the
    /// receiving socket sent to that address with that id in the last
    /// `DNS_QUERY_TTL_NS` (forged, late, or from another resolver): not
    /// learned from, not sent to the agent.
    pub const DNS_UNASKED: u32 = 31;
    /// HTTP `CONNECT host:port` requests (ebpf/src/connect_line.rs) whose
    /// host is a provider's on one of its ports, judged allow / deny /
    /// audit like a TLS server name.
    pub const CONNECT_ALLOW: u32 = 32;
    pub const CONNECT_DENY: u32 = 33;
    pub const CONNECT_AUDIT: u32 = 34;
    /// A CONNECT request whose host is no provider's (on that port).
    pub const CONNECT_OTHER_NAME: u32 = 35;
    /// A CONNECT request whose host is an IP literal (`1.2.3.4`, `[::1]`):
    /// no name to judge.
    pub const CONNECT_IP_LITERAL: u32 = 36;
    /// A CONNECT request line cut before its host and port were read: the
    /// first segment ends inside it.
    pub const CONNECT_SPLIT: u32 = 37;
    /// A CONNECT request line that is not `CONNECT host:port ` with a
    /// host of 1 to 253 name bytes and a port of 1 to 65535 (too long,
    /// absolute-form, odd bytes, no port).
    pub const CONNECT_MALFORMED: u32 = 38;
    /// The first payload of a connection to a named proxy that is not a
    /// CONNECT request the kernel read (TLS to the proxy, SOCKS, HTTP/2,
    /// a cut or malformed CONNECT), judged by `failure_mode`.
    pub const PROXY_UNREADABLE: u32 = 39;
    /// The first payload of a connection to a named proxy that is a plain
    /// `http://` request (absolute-form, not CONNECT): passed, unjudged.
    pub const PROXY_PLAIN_HTTP: u32 = 40;
    /// DNS queries (to port 53) sent to a resolver that is not trusted
    /// (`RESOLVERS`): not remembered, so their answers are not learned.
    pub const DNS_UNTRUSTED: u32 = 41;
    /// DNS queries to trusted resolvers remembered in `DNS_QUERIES`.
    pub const DNS_QUERIES: u32 = 42;
    pub const LEN: u32 = 48;
}

/// Key of `VERDICTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictKey {
    pub generation: u64,
    pub workload_id: u32,
    pub provider_id: u32,
    /// `verdict::*`
    pub verdict: u8,
    pub _pad: [u8; 7],
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
    /// 1: sock_ops is attached (`programs = "all"`), so the connect hook
    /// tracks allowed provider connections in `CONNS`; 0: nothing would
    /// read or remove the entries, so it does not.
    pub track: u8,
    /// `action::*` for raw and ping sockets of processes in no workload
    /// (`defaults.raw_sockets`); 0 (a slot written before the key
    /// existed): allow.
    pub default_raw_sockets: u8,
    pub _pad: [u8; 2],
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
    /// `action::*` for raw and ping sockets (`raw_sockets`); 0: allow.
    pub raw_sockets: u8,
    pub _pad: u8,
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NameKey {
    pub slot: u32,
    pub _pad: u32,
    /// `names::host_key` of a provider host.
    pub hash: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NameConfig {
    /// Seed of `names::name_hash`; 0 until the first agent writes one.
    pub seed: u64,
    /// Bounds of a learned address's lifetime, seconds.
    pub ttl_min_s: u32,
    pub ttl_max_s: u32,
    /// 1: queries to any resolver are remembered (`trusted_resolvers =
    /// "any"`); 0: only to those in `RESOLVERS`.
    pub any_resolver: u32,
    /// 1: answers are learned from without a pending query (the behaviour
    /// before `DNS_QUERIES`). Only the agent's own test of the DNS program
    /// (kernel_agrees.rs, `BPF_PROG_TEST_RUN` on a made-up packet whose
    /// socket sent nothing) sets it; no policy key does.
    pub unasked: u32,
}

/// Key of `DNS_QUERIES`: the socket that sent the query and the query's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DnsQueryKey {
    /// `bpf_get_socket_cookie` of the sending (and receiving) socket.
    pub cookie: u64,
    /// The DNS message id, as on the wire (network order).
    pub id: u16,
    pub _pad: [u8; 6],
}

/// Value of `DNS_QUERIES`: whom the query went to. The port is 53: only
/// queries to and answers from port 53 are looked at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsQuery {
    /// The resolver's address (IPv4 as `::ffff:a.b.c.d`).
    pub addr: [u8; 16],
    /// `bpf_ktime_get_ns()` after which the query is no longer answered.
    pub expires_ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedName {
    /// The `NAMES` key the address was learned for (0: unused).
    pub hash: u64,
    /// `bpf_ktime_get_ns()` after which the entry is ignored.
    pub expires_ns: u64,
}

/// Key of `LEARNED_V4`: whose the entry is, and the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKeyV4 {
    /// The learning scope of the socket that received the answer: the
    /// cgroup id of its workload's `WORKLOADS` entry (the deepest named
    /// ancestor, as the connect hook finds it), `NO_SCOPE` for a socket in
    /// no workload. The cgroup id and not the workload id: it stays the
    /// same when a reload renumbers the workloads. Only a connect() whose
    /// task has the same scope uses the entry.
    pub scope: u64,
    /// Network order.
    pub addr: [u8; 4],
    pub _pad: [u8; 4],
}

/// Key of `LEARNED_V6`: as `LearnedKeyV4`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKeyV6 {
    pub scope: u64,
    pub addr: [u8; 16],
}

/// `LearnedKey*::scope` of processes in no workload (they share the
/// policy's defaults, and so what they learned).
pub const NO_SCOPE: u64 = 0;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub names: [LearnedName; LEARNED_NAMES],
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
    assert!(size_of::<VerdictKey>() == 24);
    assert!(size_of::<SlotConfig>() == 16 && align_of::<SlotConfig>() == 8);
    assert!(size_of::<WorkloadKey>() == 16);
    assert!(size_of::<WorkloadValue>() == 8);
    assert!(size_of::<PrefixKeyV4>() == 12);
    assert!(size_of::<PrefixKeyV6>() == 24);
    assert!(size_of::<ActionValue>() == 4);
    assert!(size_of::<DestValue>() == 24);
    assert!(size_of::<ProviderKey>() == 12);
    assert!(size_of::<NameKey>() == 16 && align_of::<NameKey>() == 8);
    assert!(size_of::<NameConfig>() == 24);
    assert!(size_of::<DnsQueryKey>() == 16 && size_of::<DnsQuery>() == 24);
    assert!(size_of::<LearnedName>() == 16);
    assert!(size_of::<Learned>() == 64);
    assert!(size_of::<LearnedKeyV4>() == 16 && align_of::<LearnedKeyV4>() == 8);
    assert!(size_of::<LearnedKeyV6>() == 24 && align_of::<LearnedKeyV6>() == 8);
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
    unsafe impl aya::Pod for VerdictKey {}
    unsafe impl aya::Pod for NameKey {}
    unsafe impl aya::Pod for NameConfig {}
    unsafe impl aya::Pod for LearnedName {}
    unsafe impl aya::Pod for Learned {}
    unsafe impl aya::Pod for LearnedKeyV4 {}
    unsafe impl aya::Pod for LearnedKeyV6 {}
    unsafe impl aya::Pod for DnsQueryKey {}
    unsafe impl aya::Pod for DnsQuery {}
}
