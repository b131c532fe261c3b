//! The policy's limits as the kernel holds them (docs/limits.md): the
//! `LIMITS` entries of a slot, the `BANDWIDTH` entries, and the stable
//! bucket id that names a workload × provider pair in `BUCKETS`,
//! `BUDGET_SPENT` and `LIMIT_HITS`. Pure: `maps` writes what this builds.

use std::collections::BTreeMap;

use llm_egress_common::{BYTE_UNIT, BandwidthLimit, CONN_UNIT, LimitValue, Rate, limit_flag};

use crate::policy::{
    ConnectionRate, Limits, Policy, UsdBudget,
    fleet::{FleetFailure, FleetWorkload},
};

/// A fleet pair as the policy makes it (`limits::fleet` keeps its lease).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetPair {
    pub pair: Pair,
    pub workload: FleetWorkload,
    pub limits: Limits,
}

/// A pair whose connection rate is fleet-wide (`scope = "fleet"` with
/// `connections_per_second`; `limits::fleet_rate` holds its share).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetRatePair {
    pub pair: Pair,
    /// 1-based index of the workload in the policy (`WorkloadValue`).
    pub workload_id: u32,
    pub workload: FleetWorkload,
    /// The fleet's rate and burst (the policy's figures).
    pub rate: ConnectionRate,
    /// `[fleet] agents`, for `host_share`.
    pub agents: Option<u64>,
}

impl FleetRatePair {
    /// The rate this host enforces while it holds no share (the ledger
    /// unreachable, or not answered yet): `fleet_failure`'s. `holders`: the
    /// agents the ledger last counted (host_share divides by `[fleet]
    /// agents` first, then by them, then by 1).
    pub fn fallback(&self, holders: Option<u64>) -> Rate {
        match self.workload.failure {
            FleetFailure::Closed => refuse_all(),
            FleetFailure::HostShare => {
                connection_share(&self.rate, self.agents.or(holders).unwrap_or(1))
            }
            FleetFailure::Open => connection_share(&self.rate, 1),
        }
    }
}

/// One `n`th of a connection rate and its burst, with room for at least
/// one connection (a burst below one connection would refuse every
/// connect).
pub fn connection_share(c: &ConnectionRate, n: u64) -> Rate {
    let n = n.max(1);
    let per_ns = ((c.per_second * 1000.0 / n as f64).round() as u64).max(1);
    let capacity = (c.burst.saturating_mul(CONN_UNIT) / n).max(CONN_UNIT);
    Rate::new(per_ns, capacity).unwrap_or_default()
}

/// A connection rate that refuses every connect: a bucket of no room (the
/// kernel takes only from a rate whose `per_ns` is not 0).
pub fn refuse_all() -> Rate {
    Rate {
        per_ns: 1,
        capacity: 0,
        fill_ns: 1,
    }
}

/// The id of the pair (workload, provider): FNV-1a of both names, never 0.
/// Names, not ids, so that the state of a pair outlives reloads that
/// reorder the policy.
pub fn bucket_id(workload: &str, provider: &str) -> u64 {
    let bytes = workload.bytes().chain([0]).chain(provider.bytes());
    let h = bytes.fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h.max(1)
}

/// A limited pair, as the agent names it in metrics and events.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pair {
    pub workload: String,
    pub provider: String,
}

/// Everything the kernel needs for one policy's limits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LimitPlan {
    /// (workload id, provider id) → `LIMITS` value (per slot).
    pub slot: BTreeMap<(u32, u32), LimitValue>,
    /// bucket id → `BANDWIDTH` value.
    pub bandwidth: BTreeMap<u64, BandwidthLimit>,
    /// bucket id → the pair and its limits (token budgets are the agent's).
    pub pairs: BTreeMap<u64, (Pair, Limits)>,
    /// The pairs of `pairs` whose token budgets are fleet-wide
    /// (`scope = "fleet"`, docs/fleet.md).
    pub fleet: BTreeMap<u64, FleetPair>,
    /// The pairs of `pairs` whose connection rates are fleet-wide; their
    /// `slot` entries hold `FleetRatePair::fallback(None)` until the agent
    /// holds a share (docs/fleet.md).
    pub fleet_rates: BTreeMap<u64, FleetRatePair>,
    /// Dollar budgets by workload name; every pair of such a workload is
    /// in `pairs` with the `BUDGET` flag, limits or not.
    pub usd: BTreeMap<String, UsdBudget>,
    /// The dollar budgets of `usd` that are fleet-wide, with the workload's
    /// ledger identity (`scope = "fleet"`, docs/fleet.md).
    pub fleet_usd: BTreeMap<String, FleetUsd>,
}

/// A fleet-wide dollar budget as the policy makes it (`limits::fleet`
/// keeps its lease).
#[derive(Clone, Debug, PartialEq)]
pub struct FleetUsd {
    pub workload: FleetWorkload,
    pub budget: UsdBudget,
}

pub fn plan(policy: &Policy, mode: u8) -> LimitPlan {
    let mut out = LimitPlan {
        usd: policy.usd_budgets.clone(),
        fleet_usd: (policy.usd_budgets.iter())
            .filter_map(|(name, budget)| {
                let workload = policy.fleet_workloads.get(name)?.clone();
                Some((
                    name.clone(),
                    FleetUsd {
                        workload,
                        budget: *budget,
                    },
                ))
            })
            .collect(),
        ..LimitPlan::default()
    };
    for (wi, w) in policy.workloads.iter().enumerate() {
        let usd = policy.usd_budgets.contains_key(&w.name);
        if w.limits.is_empty() && w.provider_limits.is_empty() && !usd {
            continue;
        }
        for (pi, p) in policy.providers.iter().enumerate() {
            let limits = w.limits_for(pi);
            if limits.is_empty() && !usd {
                continue;
            }
            let bucket = bucket_id(&w.name, &p.name);
            let mut flags = 0;
            let tokens = limits.tokens_per_minute.is_some() || limits.tokens_per_day.is_some();
            if tokens || usd {
                flags |= limit_flag::BUDGET;
            }
            if let Some(bw) = limits.bandwidth {
                flags |= limit_flag::BANDWIDTH;
                let rate =
                    Rate::new(bw.bytes_per_second, bw.burst_bytes * BYTE_UNIT).unwrap_or_default();
                out.bandwidth.insert(
                    bucket,
                    BandwidthLimit {
                        egress: rate,
                        ingress: rate,
                        mode,
                        _pad: [0; 7],
                    },
                );
            }
            let pair = Pair {
                workload: w.name.clone(),
                provider: p.name.clone(),
            };
            let fleet_rate = match (policy.fleet_workloads.get(&w.name), limits.connections) {
                (Some(fw), Some(rate)) => Some(FleetRatePair {
                    pair: pair.clone(),
                    workload_id: wi as u32 + 1,
                    workload: fw.clone(),
                    rate,
                    agents: policy.fleet.as_ref().and_then(|f| f.agents),
                }),
                _ => None,
            };
            let connections = match &fleet_rate {
                Some(fr) => fr.fallback(None),
                None => limits
                    .connections
                    .and_then(|c| {
                        // Thousandths of a connection per second = units per ns.
                        let per_ns = (c.per_second * 1000.0).round().max(1.0) as u64;
                        Rate::new(per_ns, c.burst * CONN_UNIT)
                    })
                    .unwrap_or_default(),
            };
            if let Some(fr) = fleet_rate {
                out.fleet_rates.insert(bucket, fr);
            }
            out.slot.insert(
                (wi as u32 + 1, pi as u32 + 1),
                LimitValue {
                    bucket,
                    connections,
                    flags,
                    ..LimitValue::default()
                },
            );
            if let Some(fw) = policy.fleet_workloads.get(&w.name)
                && tokens
            {
                out.fleet.insert(
                    bucket,
                    FleetPair {
                        pair: pair.clone(),
                        workload: fw.clone(),
                        limits,
                    },
                );
            }
            out.pairs.insert(bucket, (pair, limits));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Bandwidth, ConnectionRate};

    #[test]
    fn bucket_ids_depend_on_both_names_only() {
        assert_eq!(bucket_id("a", "openai"), bucket_id("a", "openai"));
        assert_ne!(bucket_id("a", "openai"), bucket_id("a", "anthropic"));
        assert_ne!(bucket_id("ab", "c"), bucket_id("a", "bc"));
        assert_ne!(bucket_id("", ""), 0);
    }

    #[test]
    fn connection_rates_become_units_per_ns() {
        let mut policy =
            Policy::parse("[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\n", "test").unwrap();
        policy.workloads[0].limits = Limits {
            connections: Some(ConnectionRate {
                per_second: 20.0,
                burst: 40,
            }),
            bandwidth: Some(Bandwidth {
                bytes_per_second: 1_000_000,
                burst_bytes: 200_000,
            }),
            tokens_per_minute: Some(1000),
            tokens_per_day: None,
        };
        let plan = plan(&policy, llm_egress_common::mode::ENFORCE);
        let openai = policy
            .providers
            .iter()
            .position(|p| p.name == "openai")
            .unwrap();
        let v = plan.slot[&(1, openai as u32 + 1)];
        assert_eq!(v.bucket, bucket_id("bot", "openai"));
        assert_eq!(v.connections.per_ns, 20_000);
        assert_eq!(v.connections.capacity, 40 * CONN_UNIT);
        // 20 connections a second: 40 take two seconds to come back.
        assert_eq!(v.connections.fill_ns, 2_000_000_001);
        assert_eq!(v.flags, limit_flag::BUDGET | limit_flag::BANDWIDTH);
        let bw = plan.bandwidth[&v.bucket];
        assert_eq!(bw.egress.per_ns, 1_000_000);
        assert_eq!(bw.ingress.capacity, 200_000 * BYTE_UNIT);
        assert_eq!(plan.slot.len(), policy.providers.len());
    }

    /// A dollar budget is the workload's: every provider pair gets a
    /// `LIMITS` entry with the `BUDGET` flag (the kernel then reads
    /// `BUDGET_SPENT` for it), with no other limit.
    #[test]
    fn a_dollar_budget_flags_every_provider_of_the_workload() {
        let text = "[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\nexact_tokens = true\n[workloads.limits]\nusd_per_day = 2\n[[workloads]]\nname = \"other\"\ncgroup = \"other\"\n";
        let policy = Policy::parse(text, "t").unwrap();
        let plan = plan(&policy, llm_egress_common::mode::ENFORCE);
        assert_eq!(plan.slot.len(), policy.providers.len());
        for ((w, _), v) in &plan.slot {
            assert_eq!(*w, 1);
            assert_eq!(v.flags, limit_flag::BUDGET);
            assert_eq!(v.connections, Rate::default());
        }
        assert_eq!(plan.pairs.len(), policy.providers.len());
        assert_eq!(plan.usd["bot"].per_day, Some(2.0));
        assert!(plan.fleet.is_empty() && plan.bandwidth.is_empty());
    }

    /// Fleet mode adds nothing to the kernel: a pair with a fleet budget has
    /// the very `LIMITS` and `BANDWIDTH` entries it has with a host budget
    /// (the kernel only ever reads `BUDGET_SPENT`); only the agent's side,
    /// `fleet`, differs.
    #[test]
    fn a_fleet_budget_is_the_same_to_the_kernel_as_a_host_budget() {
        let text = |scope: &str| {
            format!(
                "[fleet]\nservers = [\"redis://127.0.0.1\"]\n[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\nallow = [\"openai\"]\n[workloads.limits]\nconnections_per_second = 5\ntokens_per_day = 1000\nscope = \"{scope}\"\n"
            )
        };
        let host = Policy::parse(&text("host"), "t").unwrap();
        let fleet = Policy::parse(&text("fleet"), "t").unwrap();
        let (h, f) = (
            plan(&host, llm_egress_common::mode::ENFORCE),
            plan(&fleet, llm_egress_common::mode::ENFORCE),
        );
        assert_eq!(h.slot, f.slot);
        assert_eq!(h.bandwidth, f.bandwidth);
        assert_eq!(h.pairs, f.pairs);
        assert!(h.fleet.is_empty());
        assert_eq!(f.fleet.len(), f.pairs.len());
        assert_eq!(
            f.fleet[&bucket_id("bot", "openai")].workload.identity,
            "bot"
        );
    }

    /// A fleet-wide connection rate starts as its `fleet_failure`'s rate
    /// (the agent holds no share before the ledger answers): closed refuses
    /// all, host_share divides by `[fleet] agents`, open is the whole rate.
    #[test]
    fn a_fleet_connection_rate_starts_at_its_fleet_failure_rate() {
        let text = |failure: &str| {
            format!(
                "[fleet]\nservers = [\"redis://127.0.0.1\"]\nagents = 4\n[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\nallow = [\"openai\"]\n[workloads.limits]\nconnections_per_second = 20\nburst = 8\nscope = \"fleet\"\nfleet_failure = \"{failure}\"\n"
            )
        };
        let b = bucket_id("bot", "openai");
        let rate = |failure: &str| {
            let p = plan(
                &Policy::parse(&text(failure), "t").unwrap(),
                llm_egress_common::mode::ENFORCE,
            );
            assert_eq!(p.fleet_rates[&b].workload_id, 1);
            assert!(p.fleet.is_empty(), "no token budget: no token lease");
            p.slot.values().find(|v| v.bucket == b).unwrap().connections
        };
        assert_eq!(rate("closed"), refuse_all());
        let share = rate("host_share");
        assert_eq!((share.per_ns, share.capacity), (5_000, 2 * CONN_UNIT));
        let open = rate("open");
        assert_eq!((open.per_ns, open.capacity), (20_000, 8 * CONN_UNIT));
    }
}
