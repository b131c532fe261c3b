//! The only writer of kernel maps (but one: `socket_stop` writes the
//! `DENIED` mark of one socket into `SNI_STATE` for `secrets = "block"`,
//! from the event reader's task, so that a stop does not wait for the run
//! task).
//!
//! A new policy goes into the idle slot, then `ACTIVE` flips to it in one
//! array update, then the old slot is emptied once in-flight decisions are
//! done (programs run for microseconds; we wait `DRAIN`). Changes that do not
//! change the policy (a workload cgroup appears, a provider host resolves to
//! new addresses) are applied entry by entry to the active slot: each entry
//! is independent, so every decision still sees one consistent policy.
//!
//! A policy that does not fit (a map is full) is not activated: the slot in
//! force stays, and the error is returned and counted.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key, LpmTrie},
    },
};
use llm_egress_common::{
    ActionValue, ActiveSlot, DestValue, LEARN_TTL_MAX_S, LEARN_TTL_MIN_S, LEARNED_NAMES, Learned,
    LearnedKeyV4, LearnedKeyV6, MAP_ACTIVE, MAP_COUNTERS, MAP_DESTS_V4, MAP_DESTS_V6,
    MAP_LEARNED_V4, MAP_LEARNED_V6, MAP_NAME_CFG, MAP_NAMES, MAP_PROVIDER_ACTIONS, MAP_RESOLVERS,
    MAP_RULES_V4, MAP_RULES_V6, MAP_SLOTS, MAP_VERDICTS, MAP_WORKLOADS, NameConfig, NameKey,
    PREFIX_KEY_HEADER_BITS, PrefixKeyV4, PrefixKeyV6, ProviderKey, SlotConfig, VerdictKey,
    WorkloadKey, WorkloadValue, counter,
};
use llm_egress_common::{
    BandwidthLimit, Bucket, BucketKey, LimitConfig, LimitHitKey, LimitValue, MAP_BANDWIDTH,
    MAP_BUCKETS, MAP_BUDGET_SPENT, MAP_LIMIT_CFG, MAP_LIMIT_HITS, MAP_LIMITS, MAP_NAT64, Nat64Key,
    Rate,
};
use llm_egress_common::{MAP_PROXY_PORTS, PROXY_SCOPE};

use crate::{
    kernel::limit_entries::LimitPlan,
    kernel::plan::{Plan, Prefix},
};

/// Time given to decisions that read the old slot before it is emptied.
const DRAIN: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("the eBPF object has no map {0}")]
    Missing(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Map { map, source }
}

/// Entries written and failed per map, for metrics.
#[derive(Debug, Default, Clone)]
pub struct WriteReport {
    pub failed: BTreeMap<&'static str, u64>,
}

impl WriteReport {
    fn fail(&mut self, map: &'static str) {
        *self.failed.entry(map).or_default() += 1;
    }
    pub fn is_ok(&self) -> bool {
        self.failed.is_empty()
    }
}

pub struct KernelMaps {
    active: Array<MapData, ActiveSlot>,
    slots: Array<MapData, SlotConfig>,
    workloads: HashMap<MapData, WorkloadKey, WorkloadValue>,
    rules_v4: LpmTrie<MapData, PrefixKeyV4, ActionValue>,
    rules_v6: LpmTrie<MapData, PrefixKeyV6, ActionValue>,
    dests_v4: LpmTrie<MapData, PrefixKeyV4, DestValue>,
    dests_v6: LpmTrie<MapData, PrefixKeyV6, DestValue>,
    provider_act: HashMap<MapData, ProviderKey, ActionValue>,
    counters: PerCpuArray<MapData, u64>,
    verdicts: PerCpuHashMap<MapData, VerdictKey, u64>,
    names: HashMap<MapData, NameKey, DestValue>,
    name_cfg: Array<MapData, NameConfig>,
    learned_v4: HashMap<MapData, LearnedKeyV4, Learned>,
    learned_v6: HashMap<MapData, LearnedKeyV6, Learned>,
    resolvers: HashMap<MapData, [u8; 16], u32>,
    limits: HashMap<MapData, ProviderKey, LimitValue>,
    bandwidth: HashMap<MapData, u64, BandwidthLimit>,
    budget_spent: HashMap<MapData, u64, u32>,
    limit_hits: PerCpuHashMap<MapData, LimitHitKey, u64>,
    limit_cfg: Array<MapData, LimitConfig>,
    buckets: HashMap<MapData, BucketKey, Bucket>,
    nat64: HashMap<MapData, Nat64Key, u32>,
    proxy_ports: HashMap<MapData, u32, u32>,
    /// What the active slot holds, as last written by this agent.
    applied: Option<Plan>,
    /// The connection rates of fleet-rate pairs (bucket id → this host's
    /// share, `limits::fleet_rate`): written over the plan's in every slot.
    /// Fleet-rate pairs: (rate, CLOCK_MONOTONIC ns its lease ends or 0,
    /// the rate after).
    fleet_rates: BTreeMap<u64, (Rate, u64, Rate)>,
}

macro_rules! take {
    ($ebpf:expr, $name:expr) => {
        $ebpf
            .take_map($name)
            .ok_or(MapsError::Missing($name))?
            .try_into()
            .map_err(map_err($name))?
    };
}

fn key4(slot: u32, scope: u32, addr: [u8; 4], len: u8) -> Key<PrefixKeyV4> {
    Key::new(
        PREFIX_KEY_HEADER_BITS + u32::from(len),
        PrefixKeyV4 { slot, scope, addr },
    )
}

fn key6(slot: u32, scope: u32, addr: [u8; 16], len: u8) -> Key<PrefixKeyV6> {
    Key::new(
        PREFIX_KEY_HEADER_BITS + u32::from(len),
        PrefixKeyV6 { slot, scope, addr },
    )
}

impl KernelMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            active: take!(ebpf, MAP_ACTIVE),
            slots: take!(ebpf, MAP_SLOTS),
            workloads: take!(ebpf, MAP_WORKLOADS),
            rules_v4: take!(ebpf, MAP_RULES_V4),
            rules_v6: take!(ebpf, MAP_RULES_V6),
            dests_v4: take!(ebpf, MAP_DESTS_V4),
            dests_v6: take!(ebpf, MAP_DESTS_V6),
            provider_act: take!(ebpf, MAP_PROVIDER_ACTIONS),
            counters: take!(ebpf, MAP_COUNTERS),
            verdicts: take!(ebpf, MAP_VERDICTS),
            names: take!(ebpf, MAP_NAMES),
            name_cfg: take!(ebpf, MAP_NAME_CFG),
            learned_v4: take!(ebpf, MAP_LEARNED_V4),
            learned_v6: take!(ebpf, MAP_LEARNED_V6),
            resolvers: take!(ebpf, MAP_RESOLVERS),
            limits: take!(ebpf, MAP_LIMITS),
            bandwidth: take!(ebpf, MAP_BANDWIDTH),
            budget_spent: take!(ebpf, MAP_BUDGET_SPENT),
            limit_hits: take!(ebpf, MAP_LIMIT_HITS),
            limit_cfg: take!(ebpf, MAP_LIMIT_CFG),
            buckets: take!(ebpf, MAP_BUCKETS),
            nat64: take!(ebpf, MAP_NAT64),
            proxy_ports: take!(ebpf, MAP_PROXY_PORTS),
            applied: None,
            fleet_rates: BTreeMap::new(),
        })
    }

    /// The seed of the name hash (`NAME_CFG`), written once: a random one
    /// if the pinned maps have none yet, else the one they have (an adopted
    /// map set keeps its learned entries, which carry hashes under it).
    pub fn name_seed(&mut self) -> Result<u64, MapsError> {
        let mut cfg = self.name_cfg.get(&0, 0).map_err(map_err(MAP_NAME_CFG))?;
        if cfg.seed == 0 {
            cfg = NameConfig {
                seed: random_seed(),
                ttl_min_s: LEARN_TTL_MIN_S,
                ttl_max_s: LEARN_TTL_MAX_S,
                ..NameConfig::default()
            };
            self.name_cfg
                .set(0, cfg, 0)
                .map_err(map_err(MAP_NAME_CFG))?;
        }
        Ok(cfg.seed)
    }

    /// Sets the TTL bounds (seconds) of learned addresses in `NAME_CFG`,
    /// keeping its seed; the kernel and `learn` read them per answer.
    pub fn set_learned_ttl(&mut self, (min, max): (u32, u32)) -> Result<(), MapsError> {
        let mut cfg = self.name_cfg.get(&0, 0).map_err(map_err(MAP_NAME_CFG))?;
        cfg.ttl_min_s = min;
        cfg.ttl_max_s = max;
        self.name_cfg.set(0, cfg, 0).map_err(map_err(MAP_NAME_CFG))
    }

    /// Sets the resolvers whose answers the kernel learns from: `None`
    /// for any resolver (`NameConfig::any_resolver`), else exactly the
    /// addresses given (`RESOLVERS` is made equal to them; IPv4 stored as
    /// `::ffff:a.b.c.d`). Addresses are added before the old ones are
    /// removed, so a reload never drops a resolver that both lists name.
    pub fn set_trusted_resolvers(
        &mut self,
        trusted: Option<&BTreeSet<std::net::IpAddr>>,
    ) -> Result<(), MapsError> {
        let want: BTreeSet<[u8; 16]> = trusted
            .map(|t| t.iter().map(|a| resolver_key(*a)).collect())
            .unwrap_or_default();
        for k in &want {
            self.resolvers
                .insert(k, 1, 0)
                .map_err(map_err(MAP_RESOLVERS))?;
        }
        let old: Vec<[u8; 16]> = self.resolvers.keys().flatten().collect();
        for k in old.iter().filter(|k| !want.contains(*k)) {
            let _ = self.resolvers.remove(k);
        }
        let mut cfg = self.name_cfg.get(&0, 0).map_err(map_err(MAP_NAME_CFG))?;
        cfg.any_resolver = u32::from(trusted.is_none());
        self.name_cfg.set(0, cfg, 0).map_err(map_err(MAP_NAME_CFG))
    }

    /// Makes the kernel learn from answers without a pending query (the
    /// test that runs the DNS program on made-up packets, whose socket
    /// sent nothing: kernel_agrees.rs).
    #[cfg(test)]
    pub(crate) fn learn_unasked(&mut self) {
        let mut cfg = self.name_cfg.get(&0, 0).expect("NAME_CFG");
        cfg.unasked = 1;
        self.name_cfg.set(0, cfg, 0).expect("NAME_CFG");
    }

    pub fn active(&self) -> Result<ActiveSlot, MapsError> {
        self.active.get(&0, 0).map_err(map_err(MAP_ACTIVE))
    }

    /// The config of the slot in force, if any (left by a previous agent).
    pub fn active_config(&self) -> Result<Option<SlotConfig>, MapsError> {
        let active = self.active()?;
        if active.slot == 0 {
            return Ok(None);
        }
        Ok(Some(
            self.slots
                .get(&active.slot, 0)
                .map_err(map_err(MAP_SLOTS))?,
        ))
    }

    /// Writes `plan` into the idle slot and makes it the active one.
    /// On a write failure the idle slot is emptied again and nothing changes
    /// for the programs.
    pub fn apply_policy(
        &mut self,
        mut plan: Plan,
        failure_mode: u8,
        attach_cgroup_id: u64,
    ) -> Result<WriteReport, MapsError> {
        self.fleet_rates
            .retain(|b, _| plan.limits.fleet_rates.contains_key(b));
        self.keep_fleet_rates(&mut plan);
        let old = self.active()?.slot;
        let target = if old == 1 { 2 } else { 1 };
        self.clear_slot(target)?;
        let mut report = WriteReport::default();
        self.write_entries(target, &plan, &mut report);
        if !report.is_ok() {
            self.clear_slot(target)?;
            return Ok(report);
        }
        self.add_nat64(&plan.nat64, &mut report);
        self.slots
            .set(target, plan.config, 0)
            .map_err(map_err(MAP_SLOTS))?;
        let active = ActiveSlot {
            slot: target,
            failure_mode,
            _pad: [0; 3],
            attach_cgroup_id,
        };
        self.active.set(0, active, 0).map_err(map_err(MAP_ACTIVE))?;
        self.write_bandwidth(&plan.limits, &mut report);
        self.remove_other_nat64(&plan.nat64);
        self.write_proxy_ports(&plan, &mut report);
        self.applied = Some(plan);
        if old != 0 {
            std::thread::sleep(DRAIN);
            self.clear_slot(old)?;
        }
        Ok(report)
    }

    /// Applies the difference between what the active slot holds and `plan`
    /// (same policy generation: workload cgroups and provider addresses).
    pub fn apply_update(&mut self, mut plan: Plan) -> Result<WriteReport, MapsError> {
        // `LIMITS` is not rewritten here: what it holds stays recorded.
        self.keep_fleet_rates(&mut plan);
        let slot = self.active()?.slot;
        let mut report = WriteReport::default();
        let Some(old) = self.applied.take() else {
            self.applied = Some(plan);
            return Ok(report);
        };
        // Additions and changes first, removals after.
        for (cg, v) in &plan.workloads {
            if old.workloads.get(cg) != Some(v) {
                let key = WorkloadKey {
                    slot,
                    _pad: 0,
                    cgroup_id: *cg,
                };
                if self.workloads.insert(key, *v, 0).is_err() {
                    report.fail(MAP_WORKLOADS);
                }
            }
        }
        for (prefix, v) in &plan.dests {
            if old.dests.get(prefix) != Some(v) {
                self.insert_dest(slot, prefix, v, &mut report);
            }
        }
        for (hash, v) in &plan.names {
            if old.names.get(hash) != Some(v) {
                self.insert_name(slot, *hash, v, &mut report);
            }
        }
        for hash in old.names.keys().filter(|h| !plan.names.contains_key(h)) {
            let _ = self.names.remove(&NameKey {
                slot,
                _pad: 0,
                hash: *hash,
            });
        }
        for cg in old
            .workloads
            .keys()
            .filter(|cg| !plan.workloads.contains_key(cg))
        {
            let _ = self.workloads.remove(&WorkloadKey {
                slot,
                _pad: 0,
                cgroup_id: *cg,
            });
        }
        for prefix in old.dests.keys().filter(|p| !plan.dests.contains_key(p)) {
            let _ = match *prefix {
                Prefix::V4(a, l) => self.dests_v4.remove(&key4(slot, 0, a, l)),
                Prefix::V6(a, l) => self.dests_v6.remove(&key6(slot, 0, a, l)),
            };
        }
        self.applied = Some(plan);
        Ok(report)
    }

    fn insert_dest(&mut self, slot: u32, prefix: &Prefix, v: &DestValue, report: &mut WriteReport) {
        let ok = match *prefix {
            Prefix::V4(a, l) => self.dests_v4.insert(&key4(slot, 0, a, l), *v, 0).is_ok(),
            Prefix::V6(a, l) => self.dests_v6.insert(&key6(slot, 0, a, l), *v, 0).is_ok(),
        };
        if !ok {
            report.fail(if matches!(prefix, Prefix::V4(..)) {
                MAP_DESTS_V4
            } else {
                MAP_DESTS_V6
            });
        }
    }

    fn insert_name(&mut self, slot: u32, hash: u64, v: &DestValue, report: &mut WriteReport) {
        let key = NameKey {
            slot,
            _pad: 0,
            hash,
        };
        if self.names.insert(key, *v, 0).is_err() {
            report.fail(MAP_NAMES);
        }
    }

    fn write_entries(&mut self, slot: u32, plan: &Plan, report: &mut WriteReport) {
        for (cg, v) in &plan.workloads {
            if self
                .workloads
                .insert(
                    WorkloadKey {
                        slot,
                        _pad: 0,
                        cgroup_id: *cg,
                    },
                    *v,
                    0,
                )
                .is_err()
            {
                report.fail(MAP_WORKLOADS);
            }
        }
        for ((wid, prefix), v) in &plan.rules {
            let ok = match *prefix {
                Prefix::V4(a, l) => self.rules_v4.insert(&key4(slot, *wid, a, l), *v, 0).is_ok(),
                Prefix::V6(a, l) => self.rules_v6.insert(&key6(slot, *wid, a, l), *v, 0).is_ok(),
            };
            if !ok {
                report.fail(if matches!(prefix, Prefix::V4(..)) {
                    MAP_RULES_V4
                } else {
                    MAP_RULES_V6
                });
            }
        }
        for (prefix, v) in &plan.dests {
            self.insert_dest(slot, prefix, v, report);
        }
        for ((wid, pid), v) in &plan.provider_actions {
            let key = ProviderKey {
                slot,
                workload_id: *wid,
                provider_id: *pid,
            };
            if self.provider_act.insert(key, *v, 0).is_err() {
                report.fail(MAP_PROVIDER_ACTIONS);
            }
        }
        for (hash, v) in &plan.names {
            self.insert_name(slot, *hash, v, report);
        }
        // Named proxies: `DESTS_*` under `PROXY_SCOPE` (removed with the
        // slot by `clear_slot`, which clears every key of a slot).
        for (prefix, v) in &plan.proxies {
            let ok = match *prefix {
                Prefix::V4(a, l) => self
                    .dests_v4
                    .insert(&key4(slot, PROXY_SCOPE, a, l), *v, 0)
                    .is_ok(),
                Prefix::V6(a, l) => self
                    .dests_v6
                    .insert(&key6(slot, PROXY_SCOPE, a, l), *v, 0)
                    .is_ok(),
            };
            if !ok {
                report.fail(if matches!(prefix, Prefix::V4(..)) {
                    MAP_DESTS_V4
                } else {
                    MAP_DESTS_V6
                });
            }
        }
        for ((wid, pid), v) in &plan.limits.slot {
            let key = ProviderKey {
                slot,
                workload_id: *wid,
                provider_id: *pid,
            };
            if self.limits.insert(key, *v, 0).is_err() {
                report.fail(MAP_LIMITS);
            }
        }
    }

    /// Before a policy is in force: its NAT64 prefixes (`NAT64` is not per
    /// slot; the old policy's stay until `remove_other_nat64`).
    fn add_nat64(
        &mut self,
        prefixes: &std::collections::BTreeSet<[u8; 12]>,
        report: &mut WriteReport,
    ) {
        for p in prefixes {
            if self.nat64.insert(Nat64Key { prefix: *p }, 1, 0).is_err() {
                report.fail(MAP_NAT64);
            }
        }
    }

    /// After a policy is in force: no NAT64 prefix but its own.
    fn remove_other_nat64(&mut self, prefixes: &std::collections::BTreeSet<[u8; 12]>) {
        let stale: Vec<Nat64Key> = self
            .nat64
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !prefixes.contains(&k.prefix))
            .collect();
        for k in stale {
            let _ = self.nat64.remove(&k);
        }
    }

    /// After a policy is in force: its bandwidth limits (by bucket id, not
    /// per slot), and no state left for pairs it no longer limits.
    fn write_bandwidth(&mut self, limits: &LimitPlan, report: &mut WriteReport) {
        for (bucket, v) in &limits.bandwidth {
            if self.bandwidth.insert(bucket, v, 0).is_err() {
                report.fail(MAP_BANDWIDTH);
            }
        }
        let stale: Vec<u64> = self
            .bandwidth
            .keys()
            .filter_map(Result::ok)
            .filter(|b| !limits.bandwidth.contains_key(b))
            .collect();
        for b in stale {
            let _ = self.bandwidth.remove(&b);
        }
        let cfg = LimitConfig {
            bandwidth_limits: limits.bandwidth.len() as u32,
            _pad: 0,
        };
        if self.limit_cfg.set(0, cfg, 0).is_err() {
            report.fail(MAP_LIMIT_CFG);
        }
        let gone: Vec<BucketKey> = self
            .buckets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !limits.pairs.contains_key(&k.bucket))
            .collect();
        for k in gone {
            let _ = self.buckets.remove(&k);
        }
    }

    /// After a policy is in force: the ports of its named proxies in
    /// `PROXY_PORTS` (not per slot), and no others. A port a reload drops
    /// only costs sock_ops a per-segment callback until it is removed.
    fn write_proxy_ports(&mut self, plan: &Plan, report: &mut WriteReport) {
        for port in &plan.proxy_ports {
            if self.proxy_ports.insert(u32::from(*port), 1, 0).is_err() {
                report.fail(MAP_PROXY_PORTS);
            }
        }
        let stale: Vec<u32> = (self.proxy_ports.keys().filter_map(Result::ok))
            .filter(|p| u16::try_from(*p).map_or(true, |p| !plan.proxy_ports.contains(&p)))
            .collect();
        for p in stale {
            let _ = self.proxy_ports.remove(&p);
        }
    }

    /// Marks the token budget of pair `bucket` spent (`Some(limit_kind)`:
    /// the kernel refuses its new connections) or available again.
    pub fn set_budget_spent(&mut self, bucket: u64, kind: Option<u32>) -> Result<(), MapsError> {
        match kind {
            Some(k) => self
                .budget_spent
                .insert(bucket, k, 0)
                .map_err(map_err(MAP_BUDGET_SPENT)),
            None => match self.budget_spent.remove(&bucket) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(MAP_BUDGET_SPENT)(e)),
            },
        }
    }

    /// A fleet-rate pair keeps the share this host holds (a pair no longer
    /// fleet-wide has its policy rate: `apply_policy` forgets it first).
    fn keep_fleet_rates(&self, plan: &mut Plan) {
        for v in plan.limits.slot.values_mut() {
            if let Some(&(rate, until, after)) = self.fleet_rates.get(&v.bucket) {
                v.connections = rate;
                v.connections_until_ns = until;
                v.connections_after = after;
            }
        }
    }

    /// Sets the connection rate of fleet-rate pair `bucket` (this host's
    /// share, docs/fleet.md) in the active slot's `LIMITS` entries; later
    /// policies keep it while the pair stays fleet-wide. The kernel's
    /// bucket keeps its level (capped at the new burst at its next take).
    /// `lease`: when the share ends and the rate after it; the kernel
    /// switches to that rate at the end even if nobody tells it (an agent
    /// killed while it held a share).
    pub fn set_fleet_rate(
        &mut self,
        bucket: u64,
        rate: Rate,
        lease: Option<(std::time::Instant, Rate)>,
    ) -> Result<(), MapsError> {
        let (until, after) = match lease {
            Some((end, after)) => {
                let left = end.saturating_duration_since(std::time::Instant::now());
                (monotonic_ns() + left.as_nanos() as u64, after)
            }
            None => (0, Rate::default()),
        };
        let Some(plan) = &mut self.applied else {
            return Ok(());
        };
        if !plan.limits.fleet_rates.contains_key(&bucket) {
            return Ok(());
        }
        self.fleet_rates.insert(bucket, (rate, until, after));
        let slot = self.active.get(&0, 0).map_err(map_err(MAP_ACTIVE))?.slot;
        for ((wid, pid), v) in plan.limits.slot.iter_mut() {
            if v.bucket != bucket
                || (v.connections, v.connections_until_ns, v.connections_after)
                    == (rate, until, after)
            {
                continue;
            }
            v.connections = rate;
            v.connections_until_ns = until;
            v.connections_after = after;
            let key = ProviderKey {
                slot,
                workload_id: *wid,
                provider_id: *pid,
            };
            self.limits
                .insert(key, *v, 0)
                .map_err(map_err(MAP_LIMITS))?;
        }
        Ok(())
    }

    /// The workloads (1-based ids) with at least one cgroup on this host
    /// in the policy in force.
    pub fn present_workloads(&self) -> BTreeSet<u32> {
        self.applied
            .as_ref()
            .map(|p| p.workloads.values().map(|w| w.workload_id).collect())
            .unwrap_or_default()
    }

    /// Pairs marked spent in the kernel (left by a previous agent, too).
    pub fn budget_spent(&self) -> BTreeMap<u64, u32> {
        self.budget_spent.iter().filter_map(Result::ok).collect()
    }

    /// Every limit hit counter, summed over CPUs.
    pub fn limit_hits(&self) -> Vec<(LimitHitKey, u64)> {
        self.limit_hits
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k, per_cpu.iter().sum()))
            .collect()
    }

    /// Removes every entry of `slot` from the per-slot maps.
    fn clear_slot(&mut self, slot: u32) -> Result<(), MapsError> {
        // Keys are collected first: deleting while iterating restarts the walk.
        macro_rules! clear {
            ($map:expr, $slot_of:expr) => {{
                let keys: Vec<_> = $map
                    .keys()
                    .filter_map(Result::ok)
                    .filter(|k| $slot_of(k) == slot)
                    .collect();
                for k in keys {
                    let _ = $map.remove(&k);
                }
            }};
        }
        clear!(self.workloads, |k: &WorkloadKey| k.slot);
        clear!(self.provider_act, |k: &ProviderKey| k.slot);
        clear!(self.limits, |k: &ProviderKey| k.slot);
        clear!(self.names, |k: &NameKey| k.slot);
        clear!(self.rules_v4, |k: &Key<PrefixKeyV4>| k.data().slot);
        clear!(self.rules_v6, |k: &Key<PrefixKeyV6>| k.data().slot);
        clear!(self.dests_v4, |k: &Key<PrefixKeyV4>| k.data().slot);
        clear!(self.dests_v6, |k: &Key<PrefixKeyV6>| k.data().slot);
        self.slots
            .set(slot, SlotConfig::default(), 0)
            .map_err(map_err(MAP_SLOTS))?;
        Ok(())
    }

    /// Kernel counters summed over CPUs, indexed by `counter::*`.
    pub fn counters(&self) -> Result<[u64; counter::LEN as usize], MapsError> {
        let mut out = [0u64; counter::LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self
                .counters
                .get(&(i as u32), 0)
                .map_err(map_err(MAP_COUNTERS))?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Every decision counter, summed over CPUs.
    pub fn verdict_counts(&self) -> Vec<(VerdictKey, u64)> {
        self.verdicts
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k, per_cpu.iter().sum()))
            .collect()
    }

    /// The `NAMES` entries of the active slot (host key → destination), as
    /// last written by this agent: what the DNS fallback matches names
    /// against.
    pub fn active_names(&self) -> Option<&BTreeMap<u64, DestValue>> {
        self.applied.as_ref().map(|p| &p.names)
    }

    /// Writes an address learned by the agent's DNS parser (the fallback
    /// for answers the kernel could not parse) into `LEARNED_*` for the
    /// learning scope `scope` (the receiving socket's workload, from the
    /// kernel's event), merged
    /// like the kernel does (ebpf/src/dns.rs `merge`): the same name is
    /// refreshed, else a free or expired place, else the one expiring
    /// first. `ttl_s` is clamped to `NAME_CFG`'s bounds. Not atomic with
    /// the kernel's own updates of the same address (the kernel may write
    /// between our read and write; one of the two names is then lost until
    /// the next answer).
    pub fn learn(
        &mut self,
        scope: u64,
        addr: std::net::IpAddr,
        key: u64,
        ttl_s: u32,
    ) -> Result<(), MapsError> {
        let cfg = self.name_cfg.get(&0, 0).map_err(map_err(MAP_NAME_CFG))?;
        let (lo, hi) = if cfg.ttl_min_s <= cfg.ttl_max_s && cfg.ttl_max_s > 0 {
            (cfg.ttl_min_s, cfg.ttl_max_s)
        } else {
            (LEARN_TTL_MIN_S, LEARN_TTL_MAX_S)
        };
        let now = monotonic_ns();
        let expires = now + u64::from(ttl_s.clamp(lo, hi)) * 1_000_000_000;
        let addr = match addr {
            std::net::IpAddr::V6(a) => a
                .to_ipv4_mapped()
                .map(std::net::IpAddr::V4)
                .unwrap_or(std::net::IpAddr::V6(a)),
            a => a,
        };
        match addr {
            std::net::IpAddr::V4(a) => {
                let k = LearnedKeyV4 {
                    scope,
                    addr: a.octets(),
                    _pad: [0; 4],
                };
                let merged = merge_learned(self.learned_v4.get(&k, 0).ok(), key, expires, now);
                self.learned_v4
                    .insert(k, merged, 0)
                    .map_err(map_err(MAP_LEARNED_V4))
            }
            std::net::IpAddr::V6(a) => {
                let k = LearnedKeyV6 {
                    scope,
                    addr: a.octets(),
                };
                let merged = merge_learned(self.learned_v6.get(&k, 0).ok(), key, expires, now);
                self.learned_v6
                    .insert(k, merged, 0)
                    .map_err(map_err(MAP_LEARNED_V6))
            }
        }
    }

    /// Every (address, name key) in `LEARNED_*`, whatever its scope, then
    /// both maps emptied:
    /// for the test that runs the kernel's DNS program (kernel_agrees.rs).
    #[cfg(test)]
    pub(crate) fn drain_learned(&mut self) -> std::collections::BTreeSet<(std::net::IpAddr, u64)> {
        let mut out = std::collections::BTreeSet::new();
        let k4: Vec<LearnedKeyV4> = self.learned_v4.keys().flatten().collect();
        for k in k4 {
            if let Ok(l) = self.learned_v4.get(&k, 0) {
                out.extend(
                    l.names
                        .iter()
                        .filter(|n| n.hash != 0)
                        .map(|n| (std::net::IpAddr::from(k.addr), n.hash)),
                );
            }
            let _ = self.learned_v4.remove(&k);
        }
        let k6: Vec<LearnedKeyV6> = self.learned_v6.keys().flatten().collect();
        for k in k6 {
            if let Ok(l) = self.learned_v6.get(&k, 0) {
                out.extend(
                    l.names
                        .iter()
                        .filter(|n| n.hash != 0)
                        .map(|n| (std::net::IpAddr::from(k.addr), n.hash)),
                );
            }
            let _ = self.learned_v6.remove(&k);
        }
        out
    }

    /// Entries in `LEARNED_V4` and `LEARNED_V6` with at least one
    /// unexpired name (an address learned by two workloads counts twice) (one map walk each: call it every few seconds, not
    /// per event).
    pub fn learned_counts(&self) -> (usize, usize) {
        let now = monotonic_ns();
        let live = |l: &Learned| l.names.iter().any(|n| n.hash != 0 && n.expires_ns > now);
        let v4 = self
            .learned_v4
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, l)| live(l))
            .count();
        let v6 = self
            .learned_v6
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, l)| live(l))
            .count();
        (v4, v6)
    }

    /// The limits of the policy in force, as last written by this agent.
    pub fn applied_limits(&self) -> LimitPlan {
        self.applied
            .as_ref()
            .map(|p| p.limits.clone())
            .unwrap_or_default()
    }

    /// Entries of the active slot per map, for the occupancy gauge.
    pub fn occupancy(&self) -> Vec<(&'static str, usize)> {
        let Some(p) = &self.applied else {
            return Vec::new();
        };
        let v4 = |pref: &Prefix| matches!(pref, Prefix::V4(..));
        vec![
            (MAP_WORKLOADS, p.workloads.len()),
            (
                MAP_RULES_V4,
                p.rules.keys().filter(|(_, pr)| v4(pr)).count(),
            ),
            (
                MAP_RULES_V6,
                p.rules.keys().filter(|(_, pr)| !v4(pr)).count(),
            ),
            (MAP_DESTS_V4, p.dests.keys().filter(|pr| v4(pr)).count()),
            (MAP_DESTS_V6, p.dests.keys().filter(|pr| !v4(pr)).count()),
            (MAP_PROVIDER_ACTIONS, p.provider_actions.len()),
            (MAP_NAMES, p.names.len()),
            (MAP_LIMITS, p.limits.slot.len()),
            (MAP_BANDWIDTH, p.limits.bandwidth.len()),
        ]
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `RESOLVERS`' key of a resolver address (ebpf/src/dns_query.rs).
fn resolver_key(a: std::net::IpAddr) -> [u8; 16] {
    match a {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    }
}

/// The kernel's merge of a learned name (ebpf/src/dns.rs `merge`).
fn merge_learned(old: Option<Learned>, hash: u64, expires: u64, now: u64) -> Learned {
    let mut v = old.unwrap_or_default();
    let pick = v.names.iter().position(|n| n.hash == hash).or_else(|| {
        (0..LEARNED_NAMES).min_by_key(|&i| {
            let e = &v.names[i];
            if e.hash == 0 || e.expires_ns <= now {
                0
            } else {
                e.expires_ns
            }
        })
    });
    if let Some(i) = pick {
        let e = &mut v.names[i];
        e.hash = hash;
        if expires > e.expires_ns || e.expires_ns <= now {
            e.expires_ns = expires;
        }
    }
    v
}

/// 64 random bits from the kernel (getrandom), never 0.
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    let seed = if n == 8 {
        u64::from_ne_bytes(b)
    } else {
        // No entropy source: time and pid still differ between hosts.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        llm_egress_common::names::mix(t ^ u64::from(std::process::id()))
    };
    seed.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learned_names_merge_like_the_kernel() {
        let v = merge_learned(None, 7, 100, 10);
        assert_eq!((v.names[0].hash, v.names[0].expires_ns), (7, 100));
        // the same name is refreshed, never shortened
        let v = merge_learned(Some(v), 7, 50, 10);
        assert_eq!((v.names[0].hash, v.names[0].expires_ns), (7, 100));
        let mut v = v;
        for h in 8..=10 {
            v = merge_learned(Some(v), h, 200 + h, 10);
        }
        assert!(v.names.iter().all(|n| n.hash != 0));
        // full: the one expiring first (7, at 100) gives way
        let v = merge_learned(Some(v), 11, 300, 10);
        assert_eq!(v.names[0].hash, 11);
    }
}
