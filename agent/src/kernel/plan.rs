//! Turns a validated policy, the workload cgroups found on the host and the
//! addresses resolved for provider hosts into the exact entries of one policy
//! slot. Pure: no kernel, no I/O, so every decision input is unit-tested here
//! and `maps` only copies entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use llm_egress_common::{
    ActionValue, DestValue, MAX_PORTS, SlotConfig, WorkloadValue, action, failure_mode, mode,
};

use crate::policy::{Action, FailureMode, Mode, Policy, Programs, Target};

/// An address prefix as the LPM tries store it: network bytes + prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Prefix {
    V4([u8; 4], u8),
    V6([u8; 16], u8),
}

impl Prefix {
    pub fn from_net(net: &IpNet) -> Self {
        match net.trunc() {
            IpNet::V4(n) => Prefix::V4(n.network().octets(), n.prefix_len()),
            IpNet::V6(n) => Prefix::V6(n.network().octets(), n.prefix_len()),
        }
    }

    pub fn host(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(a) => Prefix::V4(a.octets(), 32),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => Prefix::V4(v4.octets(), 32),
                None => Prefix::V6(a.octets(), 128),
            },
        }
    }
}

/// Everything one slot holds. Keys carry no slot: `maps` adds it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub config: SlotConfig,
    /// cgroup id → workload.
    pub workloads: BTreeMap<u64, WorkloadValue>,
    /// (workload id, prefix) → action.
    pub rules: BTreeMap<(u32, Prefix), ActionValue>,
    /// prefix → provider destination.
    pub dests: BTreeMap<Prefix, DestValue>,
    /// (workload id, provider id) → action.
    pub provider_actions: BTreeMap<(u32, u32), ActionValue>,
    /// Destinations claimed by more than one provider: (prefix, kept, dropped).
    pub dest_conflicts: Vec<(Prefix, String, String)>,
    /// `NAMES` entries: host key (`names::host_key`) → the provider's
    /// destination value (id and ports). Filled by [`names`].
    pub names: BTreeMap<u64, DestValue>,
    /// `[workloads.limits]` (`LIMITS` of the slot, `BANDWIDTH`).
    pub limits: crate::kernel::limit_entries::LimitPlan,
    /// `NAT64` keys: the first 12 bytes of each of `nat64_prefixes` (not
    /// per slot; `maps` adds them before the flip, removes others after).
    pub nat64: BTreeSet<[u8; 12]>,
    /// `[[proxies]]`: prefix → the proxy's id (index + 1) and ports, in
    /// `DESTS_*` under `PROXY_SCOPE`.
    pub proxies: BTreeMap<Prefix, DestValue>,
    /// Every port of a named proxy (`PROXY_PORTS`, not per slot).
    pub proxy_ports: BTreeSet<u16>,
}

pub fn action_code(a: Action) -> u8 {
    match a {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
        Action::Audit => action::AUDIT,
    }
}

fn action_value(a: Action) -> ActionValue {
    ActionValue {
        action: action_code(a),
        _pad: [0; 3],
    }
}

/// Builds the slot contents.
///
/// `cgroups`: cgroup id → workload index (0-based) as found by `cgroups`.
/// `resolved`: provider index (0-based) → addresses of its hosts.
pub fn build(
    policy: &Policy,
    generation: u64,
    cgroups: &BTreeMap<u64, usize>,
    resolved: &BTreeMap<usize, BTreeSet<IpAddr>>,
) -> Plan {
    let mut plan = Plan {
        config: SlotConfig {
            generation,
            mode: match policy.mode {
                Mode::Enforce => mode::ENFORCE,
                Mode::Audit => mode::AUDIT,
            },
            default_llm: action_code(policy.defaults.llm),
            default_other: action_code(policy.defaults.other),
            failure_mode: failure_code(policy.failure_mode),
            track: u8::from(policy.programs == Programs::All),
            default_raw_sockets: action_code(policy.defaults.raw_sockets),
            _pad: [0; 2],
        },
        ..Plan::default()
    };
    plan.limits = crate::kernel::limit_entries::plan(policy, plan.config.mode);
    for (&cgroup_id, &index) in cgroups {
        let Some(w) = policy.workloads.get(index) else {
            continue;
        };
        plan.workloads.insert(
            cgroup_id,
            WorkloadValue {
                workload_id: index as u32 + 1,
                llm: action_code(w.llm),
                other: action_code(w.other),
                raw_sockets: action_code(w.raw_sockets),
                _pad: 0,
            },
        );
    }
    for net in &policy.nat64_prefixes {
        let o = net.network().octets();
        let mut key = [0u8; 12];
        key.copy_from_slice(&o[..12]);
        plan.nat64.insert(key);
    }
    for (index, proxy) in policy.proxies.iter().enumerate() {
        let value = dest_value(index, &proxy.ports);
        for net in &proxy.cidrs {
            plan.proxies.insert(Prefix::from_net(net), value);
        }
        plan.proxy_ports.extend(proxy.ports.iter().copied());
    }
    for (index, w) in policy.workloads.iter().enumerate() {
        let wid = index as u32 + 1;
        // A named proxy: allowed to the workloads that name it in
        // `proxies`, denied to the others, as CIDR rules (every port of its
        // addresses), written first so that the workload's own entry for
        // the same prefix wins.
        for (pindex, proxy) in policy.proxies.iter().enumerate() {
            let act = if w.proxies.contains(&pindex) {
                Action::Allow
            } else {
                Action::Deny
            };
            for net in &proxy.cidrs {
                plan.rules
                    .insert((wid, Prefix::from_net(net)), action_value(act));
            }
        }
        // Deny entries are written last so that they win over an allow of
        // the same prefix.
        for (targets, act) in [(&w.allow, Action::Allow), (&w.deny, Action::Deny)] {
            for target in targets {
                match target {
                    Target::Cidr(net) => {
                        plan.rules
                            .insert((wid, Prefix::from_net(net)), action_value(act));
                    }
                    Target::Provider(p) => {
                        plan.provider_actions
                            .insert((wid, *p as u32 + 1), action_value(act));
                    }
                }
            }
        }
    }
    for (index, provider) in policy.providers.iter().enumerate() {
        let mut ports = [0u16; MAX_PORTS];
        let n = provider.ports.len().min(MAX_PORTS);
        ports[..n].copy_from_slice(&provider.ports[..n]);
        let value = DestValue {
            provider_id: index as u32 + 1,
            ports,
            nports: n as u16,
            _pad: 0,
        };
        let static_prefixes = provider.cidrs.iter().map(Prefix::from_net);
        let learned = resolved
            .get(&index)
            .into_iter()
            .flatten()
            .map(|a| Prefix::host(*a));
        for prefix in static_prefixes.chain(learned) {
            match plan.dests.get(&prefix) {
                Some(existing) if existing.provider_id != value.provider_id => {
                    let kept = policy.providers.get(existing.provider_id as usize - 1);
                    plan.dest_conflicts.push((
                        prefix,
                        kept.map(|p| p.name.clone()).unwrap_or_default(),
                        provider.name.clone(),
                    ));
                }
                _ => {
                    plan.dests.insert(prefix, value);
                }
            }
        }
    }
    plan
}

/// The `NAMES` entries of a policy: every provider host (exact names and
/// `*.` wildcards) keyed by its hash under `seed`. A host whose key another
/// provider already has (a hash collision: validation rules out the same
/// host twice) keeps the first provider.
pub fn names(policy: &Policy, seed: u64) -> BTreeMap<u64, DestValue> {
    let mut out = BTreeMap::new();
    for (index, provider) in policy.providers.iter().enumerate() {
        let value = dest_value(index, &provider.ports);
        for host in &provider.hosts {
            if let Some(key) = llm_egress_common::names::host_key(seed, host) {
                out.entry(key).or_insert(value);
            }
        }
    }
    out
}

fn dest_value(index: usize, provider_ports: &[u16]) -> DestValue {
    let mut ports = [0u16; MAX_PORTS];
    let n = provider_ports.len().min(MAX_PORTS);
    ports[..n].copy_from_slice(&provider_ports[..n]);
    DestValue {
        provider_id: index as u32 + 1,
        ports,
        nports: n as u16,
        _pad: 0,
    }
}

pub fn failure_code(f: FailureMode) -> u8 {
    match f {
        FailureMode::Closed => failure_mode::CLOSED,
        FailureMode::Open => failure_mode::OPEN,
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Duration};

    use super::*;
    use crate::policy::{
        AuditLog, Defaults, OnExit, Provider, ResolverConfig, Selector, TelemetryConfig, Workload,
    };

    fn policy() -> Policy {
        Policy {
            mode: Mode::Enforce,
            cgroup: None,
            metrics_listen: None,
            audit_log: AuditLog::Off,
            pin_path: PathBuf::from("/sys/fs/bpf/x"),
            failure_mode: FailureMode::Closed,
            on_exit: OnExit::Detach,
            programs: Programs::All,
            state_dir: PathBuf::from("/var/lib/x"),
            defaults: Defaults {
                llm: Action::Deny,
                other: Action::Allow,
                raw_sockets: Action::Allow,
            },
            nat64_prefixes: vec![],
            resolver: ResolverConfig {
                servers: vec![],
                refresh: Duration::from_secs(30),
                learned_ttl: (60, 3600),
                trusted: Some(vec![]),
            },
            telemetry: TelemetryConfig {
                process_series_per_workload: 20,
                process_series_ttl: Duration::from_secs(600),
                learn_estimates: Default::default(),
            },
            kubernetes: Default::default(),
            prices: vec![],
            secrets: Default::default(),
            usd_budgets: Default::default(),
            providers: vec![
                Provider {
                    name: "a".into(),
                    hosts: vec![],
                    cidrs: vec!["10.20.0.0/16".parse().unwrap()],
                    ports: vec![443],
                },
                Provider {
                    name: "b".into(),
                    hosts: vec!["b.example".into()],
                    cidrs: vec!["10.20.0.0/16".parse().unwrap()],
                    ports: vec![],
                },
            ],
            workloads: vec![Workload {
                name: "w".into(),
                selector: Selector::Cgroup("w".into()),
                allow: vec![
                    Target::Provider(1),
                    Target::Cidr("192.0.2.0/24".parse().unwrap()),
                ],
                deny: vec![Target::Cidr("192.0.2.0/24".parse().unwrap())],
                llm: Action::Deny,
                other: Action::Audit,
                raw_sockets: Action::Audit,
                limits: Default::default(),
                provider_limits: Default::default(),
                proxies: vec![],
                exact_tokens: false,
            }],
            proxies: vec![],
            fleet: None,
            fleet_workloads: Default::default(),
        }
    }

    #[test]
    fn named_proxies_are_allowed_to_the_workloads_that_name_them_and_denied_to_others() {
        let mut p = policy();
        p.proxies = vec![crate::policy::Proxy {
            name: "corp".into(),
            cidrs: vec![
                "10.9.0.5/32".parse().unwrap(),
                "192.0.2.0/24".parse().unwrap(),
            ],
            ports: vec![3128, 8080],
        }];
        let mut other = p.workloads[0].clone();
        other.name = "v".into();
        other.proxies = vec![0];
        p.workloads.push(other);
        let plan = build(&p, 1, &BTreeMap::new(), &BTreeMap::new());
        let proxy = Prefix::V4([10, 9, 0, 5], 32);
        assert_eq!(plan.rules[&(1, proxy)].action, action::DENY);
        assert_eq!(plan.rules[&(2, proxy)].action, action::ALLOW);
        // The workload's own entry of the same prefix wins (its deny).
        let own = Prefix::V4([192, 0, 2, 0], 24);
        assert_eq!(plan.rules[&(2, own)].action, action::DENY);
        let d = plan.proxies[&proxy];
        assert_eq!(
            (d.provider_id, d.nports, d.ports[0], d.ports[1]),
            (1, 2, 3128, 8080)
        );
        assert_eq!(plan.proxy_ports, BTreeSet::from([3128, 8080]));
    }

    #[test]
    fn workloads_rules_and_provider_actions_are_numbered_from_one() {
        let p = policy();
        let cgroups = BTreeMap::from([(77, 0)]);
        let plan = build(&p, 5, &cgroups, &BTreeMap::new());
        assert_eq!(plan.config.generation, 5);
        assert_eq!(plan.workloads[&77].workload_id, 1);
        assert_eq!(plan.workloads[&77].other, action::AUDIT);
        assert_eq!(plan.workloads[&77].raw_sockets, action::AUDIT);
        assert_eq!(plan.config.default_raw_sockets, action::ALLOW);
        assert_eq!(plan.provider_actions[&(1, 2)].action, action::ALLOW);
        // deny of the same prefix wins over allow
        assert_eq!(
            plan.rules[&(1, Prefix::V4([192, 0, 2, 0], 24))].action,
            action::DENY
        );
    }

    #[test]
    fn provider_connections_are_tracked_only_where_sock_ops_is_attached() {
        let mut p = policy();
        let none = BTreeMap::new();
        assert_eq!(build(&p, 1, &none, &BTreeMap::new()).config.track, 1);
        p.programs = Programs::Connect;
        assert_eq!(build(&p, 1, &none, &BTreeMap::new()).config.track, 0);
    }

    #[test]
    fn shared_destination_keeps_the_first_provider_and_reports_the_conflict() {
        let p = policy();
        let plan = build(&p, 1, &BTreeMap::new(), &BTreeMap::new());
        let d = plan.dests[&Prefix::V4([10, 20, 0, 0], 16)];
        assert_eq!(d.provider_id, 1);
        assert_eq!((d.nports, d.ports[0]), (1, 443));
        assert_eq!(plan.dest_conflicts.len(), 1);
        assert_eq!(plan.dest_conflicts[0].2, "b");
    }

    #[test]
    fn resolved_addresses_become_host_prefixes_and_mapped_v6_is_v4() {
        let p = policy();
        let resolved = BTreeMap::from([(
            1usize,
            BTreeSet::from([
                "203.0.113.9".parse().unwrap(),
                "::ffff:198.51.100.7".parse().unwrap(),
                "2001:db8::9".parse().unwrap(),
            ]),
        )]);
        let plan = build(&p, 1, &BTreeMap::new(), &resolved);
        assert_eq!(plan.dests[&Prefix::V4([203, 0, 113, 9], 32)].provider_id, 2);
        assert_eq!(
            plan.dests[&Prefix::V4([198, 51, 100, 7], 32)].provider_id,
            2
        );
        let v6: std::net::Ipv6Addr = "2001:db8::9".parse().unwrap();
        assert_eq!(plan.dests[&Prefix::V6(v6.octets(), 128)].nports, 0);
    }

    #[test]
    fn names_are_keyed_by_host_hash_with_the_provider_ports() {
        let mut p = policy();
        p.providers[0].hosts = vec!["API.A.example.".into(), "*.wild.example".into()];
        let names = names(&p, 42);
        let key = llm_egress_common::names::name_hash(42, "api.a.example").unwrap();
        assert_eq!(names[&key].provider_id, 1);
        assert_eq!((names[&key].nports, names[&key].ports[0]), (1, 443));
        let wild = llm_egress_common::names::host_key(42, "*.wild.example").unwrap();
        assert_eq!(names[&wild].provider_id, 1);
        let b = llm_egress_common::names::name_hash(42, "b.example").unwrap();
        assert_eq!((names[&b].provider_id, names[&b].nports), (2, 0));
        assert_eq!(names.len(), 3);
    }

    #[test]
    fn host_bits_are_cleared() {
        let net: IpNet = "10.1.2.3/8".parse().unwrap();
        assert_eq!(Prefix::from_net(&net), Prefix::V4([10, 0, 0, 0], 8));
    }
}
