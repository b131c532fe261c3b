//! The policy: a TOML file turned into validated, kernel-ready values.
//!
//! `file` holds the serde mirror of the TOML (unknown keys are errors),
//! `validate` turns it into a [`Policy`] or a list of [`PolicyError`]s that
//! name file, line, column, key and value. Nothing here touches the kernel.

pub mod catalog;
mod error;
mod file;
pub mod fleet;
mod kubernetes;
pub mod ownership;
mod validate;
pub mod watch;

pub use error::{PolicyError, PolicyErrors};
pub use llm_egress_common::{
    MAX_BYTES_BURST, MAX_BYTES_PER_SECOND, MAX_CONNECTION_BURST, MAX_CONNECTIONS_PER_SECOND,
};

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;

/// `mode`: enforce the policy, or only report what it would deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Audit,
}

/// What a rule or default says about a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    /// Allow, and report as a would-be deny.
    Audit,
}

/// `failure_mode`: what happens when the programs cannot decide, and whether
/// enforcement outlives the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureMode {
    /// Programs stay attached (pinned) when the agent dies; internal errors deny.
    Closed,
    /// Programs are detached when the agent dies; internal errors allow.
    Open,
}

/// `programs`: which kernel programs the agent attaches (docs/policy.md,
/// "Programs"; what each costs: docs/benchmarks.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    /// Every program: the connect-time verdict, DNS learning and SNI
    /// verdicts (cgroup_skb), connection accounting (sock_ops).
    All,
    /// The connect-time verdict alone (cgroup_sock_addr): no DNS learning,
    /// no SNI verdicts, no connection accounting, no bandwidth limits or
    /// token budgets.
    Connect,
}

impl Programs {
    /// The names of the programs attached to the attach cgroup.
    pub fn names(self) -> &'static [&'static str] {
        match self {
            Programs::All => &llm_egress_common::ALL_PROGRAMS,
            Programs::Connect => &llm_egress_common::CONNECT_PROGRAMS,
        }
    }
}

/// `on_exit`: what a clean stop (SIGTERM, SIGINT) does with the programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    Detach,
    Keep,
}

/// `audit_log`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditLog {
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Defaults {
    pub llm: Action,
    pub other: Action,
    /// Raw and ICMP ping sockets of processes in no workload; default:
    /// `other` (docs/policy.md, "Raw and ping sockets").
    pub raw_sockets: Action,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ResolverConfig {
    /// Empty: the system resolver (/etc/resolv.conf).
    pub servers: Vec<SocketAddr>,
    /// How often catalog and policy hosts are resolved again.
    pub refresh: Duration,
    /// Bounds on how long an address learned from a DNS answer stays a
    /// provider's: the record's TTL, clamped to [min, max] seconds.
    pub learned_ttl: (u32, u32),
    /// `trusted`: resolvers whose answers the kernel learns from, besides
    /// those of /etc/resolv.conf and `servers`; None: any resolver
    /// (`trusted = "any"`, weaker: docs/names.md).
    pub trusted: Option<Vec<std::net::IpAddr>>,
}

impl ResolverConfig {
    /// The resolvers answers are learned from: `trusted`, the addresses
    /// of `servers`, and the `nameserver`s of `resolv_conf` (the text of
    /// /etc/resolv.conf, read by the caller); None: any.
    pub fn trusted_resolvers(
        &self,
        resolv_conf: &str,
    ) -> Option<std::collections::BTreeSet<std::net::IpAddr>> {
        let listed = self.trusted.as_ref()?;
        let mut all: std::collections::BTreeSet<std::net::IpAddr> =
            listed.iter().copied().collect();
        all.extend(self.servers.iter().map(|s| s.ip()));
        all.extend(nameservers(resolv_conf));
        Some(all)
    }
}

/// The addresses of the `nameserver` lines of a resolv.conf text (a
/// scope suffix `%eth0` dropped; anything unreadable skipped).
pub fn nameservers(text: &str) -> Vec<std::net::IpAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse().ok())
        .collect()
}

/// `[telemetry]`: bounds on per-process series.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryConfig {
    /// Distinct `process` label values per workload; more processes are
    /// counted under `process="other"`.
    pub process_series_per_workload: usize,
    /// A process series not updated for this long is removed (its slot
    /// freed).
    pub process_series_ttl: Duration,
    /// Whose exact counts correct the token estimates of connections nobody
    /// reads (`crate::accounting::estimate_learning`).
    pub learn_estimates: LearnEstimates,
}

/// `[telemetry] learn_estimates`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LearnEstimates {
    /// Every `exact_tokens` workload's counts, for every workload.
    #[default]
    Host,
    /// A workload's own exact counts, for its own connections only.
    Workload,
    Off,
}

/// A provider of the merged catalog (built-in entries, then the policy's).
#[derive(Clone, Debug, PartialEq)]
pub struct Provider {
    pub name: String,
    /// Lower case, no trailing dot; `*.example.com` is a wildcard.
    pub hosts: Vec<String>,
    pub cidrs: Vec<IpNet>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

/// A `[[proxies]]` entry: a forward proxy (HTTP CONNECT) by address and
/// ports. Workloads that name it in `proxies` may connect to it; others
/// are denied its addresses. What goes through it is judged by the host of
/// each CONNECT request (docs/names.md, "Proxies").
#[derive(Clone, Debug, PartialEq)]
pub struct Proxy {
    pub name: String,
    pub cidrs: Vec<IpNet>,
    /// 1 to `MAX_PORTS` ports.
    pub ports: Vec<u16>,
}

/// `[kubernetes].enabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeEnabled {
    /// On when the agent runs in a pod (`KUBERNETES_SERVICE_HOST` is set).
    Auto,
    On,
    Off,
}

/// `[kubernetes]`: where the agent lists the pods of its node (src/attribution/kube.rs).
/// Unset values come from the pod's environment when the agent starts.
#[derive(Clone, Debug, PartialEq)]
pub struct KubernetesConfig {
    pub enabled: KubeEnabled,
    /// `https://host[:port]`; None: `KUBERNETES_SERVICE_HOST`/`_PORT`.
    pub api_server: Option<String>,
    /// None: `NODE_NAME` (the DaemonSet sets it from `spec.nodeName`).
    pub node_name: Option<String>,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    /// How often the pod list is fetched again.
    pub refresh: Duration,
}

/// A workload selector over pod metadata: the pod's namespace and labels
/// (all must match); an absent namespace matches every namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodSelector {
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Which cgroup directories a workload selects. Every form selects only
/// directories whose name root chose (no ancestor up to the cgroup2 root is
/// writable by a non-root user), except the two that say otherwise
/// (`DelegatedCgroup`, `SystemdUserUnit`): see `crate::attribution::cgroups` and
/// docs/policy.md, "Who can create what a selector matches".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    /// A glob relative to the attach cgroup (`pods/*`), matched against
    /// cgroup directory paths.
    Cgroup(String),
    /// `cgroup` with `match_delegated = true`: the glob also selects
    /// directories a non-root user created (inside a delegated subtree),
    /// unless they lie below another workload's directory.
    DelegatedCgroup(String),
    /// A systemd unit name (`x.service`, `x.scope`): a cgroup directory of
    /// that name whose every ancestor below the attach cgroup is a `.slice`
    /// (where the system manager puts units).
    SystemdUnit(String),
    /// `systemd_user_unit` with `uid`: a unit of that user's manager,
    /// `…/user@UID.service/(*.slice/)*NAME`, where `user@UID.service` is
    /// itself where the system manager puts units.
    SystemdUserUnit { unit: String, uid: u32 },
    /// Pods by namespace and labels: the pod-level cgroup directory
    /// (`…pod<uid>.slice`, `…/pod<uid>`) of each matching pod.
    Kubernetes(PodSelector),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// Index into `Policy::providers`.
    Provider(usize),
    Cidr(IpNet),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub selector: Selector,
    pub allow: Vec<Target>,
    pub deny: Vec<Target>,
    /// Providers the workload names in neither list.
    pub llm: Action,
    /// Non-provider destinations its CIDR rules do not cover.
    pub other: Action,
    /// Raw and ICMP ping sockets (refused at socket()); default: `other`.
    pub raw_sockets: Action,
    /// `[workloads.limits]`: limits of each provider the workload reaches.
    pub limits: Limits,
    /// `[workloads.limits.providers.NAME]`: per-provider overrides, by
    /// provider index; a field set here replaces the workload-wide one.
    pub provider_limits: BTreeMap<usize, Limits>,
    /// The proxies (indices into `Policy::proxies`) it may use.
    pub proxies: Vec<usize>,
    /// `exact_tokens = true`: its processes get the OpenSSL uprobes and
    /// their TLS plaintext reaches the agent (docs/plaintext.md). Default
    /// false: no uprobe, no plaintext.
    pub exact_tokens: bool,
}

/// Limits of one workload × provider pair (docs/limits.md). None: no such
/// limit.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Limits {
    /// `connections_per_second` and `burst`.
    pub connections: Option<ConnectionRate>,
    /// `bytes_per_second` and `bytes_burst`, applied to each direction.
    pub bandwidth: Option<Bandwidth>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionRate {
    /// 0.001 (the kernel counts thousandths) to `MAX_CONNECTIONS_PER_SECOND`;
    /// fractions allowed.
    pub per_second: f64,
    /// Connections that may be made at once; default `ceil(per_second)`.
    pub burst: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bandwidth {
    pub bytes_per_second: u64,
    /// Default: `bytes_per_second / 2`, clamped to `MIN_BYTES_BURST..=MAX_BYTES_BURST`.
    pub burst_bytes: u64,
}

/// The smallest `bytes_burst`: a single (GSO) packet may carry 64 KiB, and
/// a bucket smaller than a packet would never let it through.
pub const MIN_BYTES_BURST: u64 = 128 * 1024;

impl Limits {
    /// This limits with every field `over` sets replaced.
    pub fn overridden_by(&self, over: &Limits) -> Limits {
        Limits {
            connections: over.connections.or(self.connections),
            bandwidth: over.bandwidth.or(self.bandwidth),
            tokens_per_minute: over.tokens_per_minute.or(self.tokens_per_minute),
            tokens_per_day: over.tokens_per_day.or(self.tokens_per_day),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }
}

impl Workload {
    /// The limits of this workload for provider `index`.
    pub fn limits_for(&self, provider: usize) -> Limits {
        match self.provider_limits.get(&provider) {
            Some(over) => self.limits.overridden_by(over),
            None => self.limits,
        }
    }
}

/// A validated policy. Provider ids are `index + 1`, workload ids too.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub mode: Mode,
    /// None: the cgroup2 mount root.
    pub cgroup: Option<PathBuf>,
    /// None: no HTTP endpoint.
    pub metrics_listen: Option<SocketAddr>,
    pub audit_log: AuditLog,
    pub pin_path: PathBuf,
    pub failure_mode: FailureMode,
    pub on_exit: OnExit,
    pub programs: Programs,
    /// `state_dir`: where state that must survive a restart is kept (token
    /// budgets). Default /var/lib/llm-egress.
    pub state_dir: PathBuf,
    pub defaults: Defaults,
    /// `nat64_prefixes`: IPv6 /96 prefixes whose addresses are judged as
    /// the IPv4 address in their last four bytes (docs/names.md, "IPv4 in
    /// IPv6 addresses"). Default: the well-known prefix 64:ff9b::/96.
    pub nat64_prefixes: Vec<ipnet::Ipv6Net>,
    pub resolver: ResolverConfig,
    pub telemetry: TelemetryConfig,
    pub kubernetes: KubernetesConfig,
    pub providers: Vec<Provider>,
    pub workloads: Vec<Workload>,
    /// `[[proxies]]`, in file order.
    pub proxies: Vec<Proxy>,
    /// `[fleet]`: the Redis ledger of fleet-wide budgets (docs/fleet.md);
    /// changes only on restart.
    pub fleet: Option<fleet::FleetConfig>,
    /// Workloads whose token (or dollar) budgets have `scope = "fleet"`, by name.
    pub fleet_workloads: BTreeMap<String, fleet::FleetWorkload>,
    /// `[prices."MODEL"]`: prices that add to or replace the catalog's
    /// (crate::policy::catalog::prices), in file order.
    pub prices: Vec<(String, crate::policy::catalog::prices::Price)>,
    /// `[secrets]` and each workload's `secrets`.
    pub secrets: SecretsConfig,
    /// `usd_per_day`/`usd_per_month` of `[workloads.limits]`, by workload
    /// name (`crate::limits::usd_budget`; kept by `crate::limits::budget`,
    /// or `crate::limits::fleet` with `scope = "fleet"`).
    pub usd_budgets: BTreeMap<String, UsdBudget>,
}

/// A workload's budget in US dollars, over all its providers (None: no
/// such window).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UsdBudget {
    pub per_day: Option<f64>,
    pub per_month: Option<f64>,
}

/// What is done with a secret found in a request body
/// (docs/exact-tokens.md, "Secrets").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretAction {
    /// Not looked for.
    Off,
    /// Audit record and metric.
    Audit,
    /// Audit record and metric, and the connection is to be stopped.
    Block,
}

impl SecretAction {
    pub fn as_str(self) -> &'static str {
        match self {
            SecretAction::Off => "off",
            SecretAction::Audit => "audit",
            SecretAction::Block => "block",
        }
    }
}

/// A `[[secrets.patterns]]` entry: `name` is the finding's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretPattern {
    pub name: String,
    /// Checked by `crate::plaintext::secrets::compile`.
    pub regex: String,
}

/// `[secrets]` and the workloads' `secrets`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretsConfig {
    /// `[secrets].action`; default `audit`.
    pub action: SecretAction,
    pub patterns: Vec<SecretPattern>,
    /// Workloads whose `secrets` key differs from `action`, by name.
    pub workloads: BTreeMap<String, SecretAction>,
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            action: SecretAction::Audit,
            patterns: Vec::new(),
            workloads: BTreeMap::new(),
        }
    }
}

impl SecretsConfig {
    /// The action for workload `name` (`none` and unknown names: `action`).
    pub fn action_for(&self, workload: &str) -> SecretAction {
        self.workloads.get(workload).copied().unwrap_or(self.action)
    }
}

/// Workload name reserved for processes in no workload (metrics, events).
pub const NO_WORKLOAD_NAME: &str = "none";
