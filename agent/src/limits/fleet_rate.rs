//! Fleet-wide connection rates (docs/fleet.md, "Connection rates"): for
//! each pair whose workload has `scope = "fleet"` and a
//! `connections_per_second`, this agent holds a **share** of the fleet's
//! rate and burst as a lease in Redis, and the kernel's token bucket of
//! the pair is set to that share (`KernelMaps::set_fleet_rate`). The
//! connect path is the kernel's as for a host rate; Redis is only asked on
//! the agent's tick, by a task of its own (nothing waits for it).
//!
//! The lease of a pair is a member of one sorted set,
//! `{key_prefix}:rate:{identity}:{provider}`: this agent's id, scored by
//! when its lease ends (Redis' own clock). One Lua script, atomic on the
//! server, drops the lapsed members, renews (or, at a clean stop, removes)
//! this agent's, and answers how many hold one: the share is `1 / holders`
//! of the rate and of the burst (equal shares). Only an agent that has a
//! cgroup of the workload holds a share. A lease lasts [`LEASE_TTL`] and is
//! renewed every [`RENEW_EVERY`].
//!
//! Locally a share holds until [`LEASE_TTL`] after the op that renewed it
//! was *sent* (never later than Redis' own expiry). A pair with no share
//! in force (the ledger unreachable past that, or not answered yet)
//! follows its `fleet_failure` (`FleetRatePair::fallback`): `closed`
//! refuses every connection, `host_share` enforces rate / agents, `open`
//! the whole rate.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use llm_egress_common::Rate;
use prometheus::{GaugeVec, IntGaugeVec, Opts, Registry};
use redis::{Script, aio::MultiplexedConnection};
use tokio::sync::{Notify, mpsc};
use tracing::{info, warn};

use crate::{
    kernel::limit_entries::{FleetRatePair, connection_share},
    limits::fleet_ledger::Ledger,
    policy::fleet::FleetConfig,
};

/// How long a share lasts without renewal (the bound's `T`).
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How often a held share is renewed (the bound's `P`).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// Ops waiting for the task.
const OP_QUEUE: usize = 4096;

/// KEYS: the pair's sorted set. ARGV: agent id, TTL (ms), "1" to hold a
/// share, "0" to give it up. Returns the holders after the op.
const RATE_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return redis.call('ZCARD', KEYS[1])
"#;

#[derive(Clone, Debug)]
struct RateOp {
    bucket: u64,
    key: String,
    hold: bool,
    sent: Instant,
}

#[derive(Debug)]
struct RateReply {
    bucket: u64,
    sent: Instant,
    hold: bool,
    /// The holders, or why not.
    result: Result<u64, String>,
}

/// The set of a pair: `{prefix}:rate:{identity}:{provider}`.
pub fn rate_key(prefix: &str, identity: &str, provider: &str) -> String {
    format!("{prefix}:rate:{identity}:{provider}")
}

/// One pair's share.
#[derive(Clone, Debug)]
struct Share {
    fp: FleetRatePair,
    key: String,
    /// Holders the ledger last counted (this agent among them).
    holders: Option<u64>,
    /// The share is in force until then (the renewing op's send + TTL).
    until: Option<Instant>,
    last_op: Option<Instant>,
    in_flight: bool,
    /// The ledger counts this agent as a holder (it asked to hold last).
    holding: bool,
    /// What the kernel was last told.
    told: Option<(Rate, Option<Instant>)>,
}

/// What a pair enforces now.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RateState {
    /// Its share of the fleet's rate: 1 / holders.
    Leased(u64),
    /// No share in force: `fleet_failure`'s rate.
    Degraded,
}

impl Share {
    fn state(&self, now: Instant) -> RateState {
        match (self.holders, self.until) {
            (Some(n), Some(until)) if now < until && self.holding => RateState::Leased(n.max(1)),
            _ => RateState::Degraded,
        }
    }

    fn rate(&self, now: Instant) -> Rate {
        match self.state(now) {
            RateState::Leased(n) => connection_share(&self.fp.rate, n),
            RateState::Degraded => self.fp.fallback(self.holders),
        }
    }
}

#[derive(Clone)]
struct RateMetrics {
    share: GaugeVec,
    holders: IntGaugeVec,
    degraded: IntGaugeVec,
}

impl RateMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let labels = &["workload", "provider"];
        let share = GaugeVec::new(
            Opts::new(
                "llm_egress_fleet_rate_share",
                "Connections per second this agent lets a fleet-rate pair open (its share, or its fleet_failure's rate; 0: refused)",
            ),
            labels,
        )?;
        let holders = IntGaugeVec::new(
            Opts::new(
                "llm_egress_fleet_rate_holders",
                "Agents holding a share of a fleet connection rate, as the ledger last said",
            ),
            labels,
        )?;
        let degraded = IntGaugeVec::new(
            Opts::new(
                "llm_egress_fleet_rate_degraded",
                "1 while a fleet-rate pair holds no share and follows its fleet_failure",
            ),
            labels,
        )?;
        r.register(Box::new(share.clone()))?;
        r.register(Box::new(holders.clone()))?;
        r.register(Box::new(degraded.clone()))?;
        Ok(Self {
            share,
            holders,
            degraded,
        })
    }
}

/// A change of a pair's kernel rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateChange {
    pub bucket: u64,
    pub rate: Rate,
    /// A share: when its lease ends, and the `fleet_failure` rate the
    /// kernel enforces from then on unless told otherwise.
    pub lease: Option<(Instant, Rate)>,
}

pub struct RateKeeper {
    prefix: String,
    timeout: Duration,
    shares: BTreeMap<u64, Share>,
    ops: mpsc::Sender<RateOp>,
    replies: mpsc::Receiver<RateReply>,
    metrics: RateMetrics,
    task: tokio::task::JoinHandle<()>,
    /// The last op failed.
    unreachable: bool,
}

impl RateKeeper {
    /// Starts the task that runs the rate script, on a connection of its
    /// own to the `[fleet]` Redis, as `agent` (the token ledger's id).
    /// `answered` is notified after each batch of replies.
    pub fn start(
        config: FleetConfig,
        agent: String,
        registry: &Registry,
        answered: Arc<Notify>,
    ) -> Result<Self, prometheus::Error> {
        let metrics = RateMetrics::register(registry)?;
        let (ops_tx, ops_rx) = mpsc::channel(OP_QUEUE);
        let (rep_tx, rep_rx) = mpsc::channel(OP_QUEUE);
        let ledger = Ledger::new(config.clone(), agent.clone());
        let task = tokio::spawn(serve(ledger, agent, ops_rx, rep_tx, answered));
        Ok(Self {
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            shares: BTreeMap::new(),
            ops: ops_tx,
            replies: rep_rx,
            metrics,
            task,
            unreachable: false,
        })
    }

    /// Follows a (new) policy's fleet-rate pairs: kept pairs keep their
    /// share (with the new rate), new ones start degraded.
    pub fn set_pairs(&mut self, pairs: &BTreeMap<u64, FleetRatePair>) {
        let mut next = BTreeMap::new();
        for (bucket, fp) in pairs {
            let key = rate_key(&self.prefix, &fp.workload.identity, &fp.pair.provider);
            let share = match self.shares.remove(bucket) {
                Some(mut s) if s.key == key => {
                    s.fp = fp.clone();
                    s.told = None;
                    s
                }
                old => {
                    if let Some(o) = old {
                        self.give_up(&o);
                    }
                    info!(
                        workload = %fp.pair.workload,
                        provider = %fp.pair.provider,
                        ledger = %key,
                        fleet_failure = fp.workload.failure.name(),
                        connections_per_second = fp.rate.per_second,
                        "fleet connection rate"
                    );
                    Share {
                        fp: fp.clone(),
                        key,
                        holders: None,
                        until: None,
                        last_op: None,
                        in_flight: false,
                        holding: false,
                        told: None,
                    }
                }
            };
            next.insert(*bucket, share);
        }
        for old in std::mem::take(&mut self.shares).into_values() {
            self.give_up(&old);
            let labels = [old.fp.pair.workload.as_str(), old.fp.pair.provider.as_str()];
            let _ = self.metrics.share.remove_label_values(&labels);
            let _ = self.metrics.holders.remove_label_values(&labels);
            let _ = self.metrics.degraded.remove_label_values(&labels);
        }
        self.shares = next;
    }

    fn give_up(&self, s: &Share) {
        if s.holding {
            let _ = self.ops.try_send(RateOp {
                bucket: 0,
                key: s.key.clone(),
                hold: false,
                sent: Instant::now(),
            });
        }
    }

    /// Once a second and when the ledger answered: reads the answers,
    /// renews the shares that are due (pairs whose workload has a cgroup
    /// here, `present`: workload ids), gives up the others, and returns
    /// the pairs whose kernel rate changes.
    pub fn tick(&mut self, now: Instant, present: &BTreeSet<u32>) -> Vec<RateChange> {
        self.read_replies();
        for (bucket, s) in &mut self.shares {
            let wanted = present.contains(&s.fp.workload_id);
            if s.in_flight {
                continue;
            }
            let due = if wanted {
                !s.holding
                    || s.last_op
                        .is_none_or(|t| now.duration_since(t) >= RENEW_EVERY)
            } else {
                s.holding
            };
            if !due {
                continue;
            }
            let op = RateOp {
                bucket: *bucket,
                key: s.key.clone(),
                hold: wanted,
                sent: now,
            };
            if self.ops.try_send(op).is_ok() {
                s.in_flight = true;
                s.last_op = Some(now);
                if !wanted {
                    // Others may count it until the op lands: it stops
                    // using the share at once.
                    s.holding = false;
                }
            }
        }
        let mut out = Vec::new();
        for (bucket, s) in &mut self.shares {
            let rate = s.rate(now);
            let labels = [s.fp.pair.workload.as_str(), s.fp.pair.provider.as_str()];
            self.metrics
                .share
                .with_label_values(&labels)
                .set(per_second(&rate));
            // Degraded: a workload that runs here holds no share (one with
            // no cgroup here holds none by design).
            let degraded =
                present.contains(&s.fp.workload_id) && s.state(now) == RateState::Degraded;
            self.metrics
                .degraded
                .with_label_values(&labels)
                .set(i64::from(degraded));
            if let Some(n) = s.holders {
                self.metrics
                    .holders
                    .with_label_values(&labels)
                    .set(n as i64);
            }
            let lease = match s.state(now) {
                RateState::Leased(_) => s.until.map(|end| (end, s.fp.fallback(s.holders))),
                RateState::Degraded => None,
            };
            let told = (rate, lease.map(|(end, _)| end));
            if s.told != Some(told) {
                s.told = Some(told);
                out.push(RateChange {
                    bucket: *bucket,
                    rate,
                    lease,
                });
            }
        }
        out
    }

    fn read_replies(&mut self) {
        while let Ok(r) = self.replies.try_recv() {
            let Some(s) = self.shares.get_mut(&r.bucket) else {
                continue;
            };
            s.in_flight = false;
            match r.result {
                Ok(n) => {
                    if self.unreachable {
                        info!("fleet connection rates: the ledger answers again");
                    }
                    self.unreachable = false;
                    s.holders = Some(n);
                    if r.hold {
                        s.holding = true;
                        s.until = Some(r.sent + LEASE_TTL);
                    }
                }
                Err(e) => {
                    if !self.unreachable {
                        warn!(error = %e, "fleet connection rates: the ledger is unreachable; shares lapse after their lease, then follow fleet_failure");
                    }
                    self.unreachable = true;
                }
            }
        }
    }

    /// Why `/readyz` should say not ready: a pair of a workload present
    /// here holds no share.
    pub fn degraded(&self, now: Instant, present: &BTreeSet<u32>) -> Option<String> {
        let lapsed = self
            .shares
            .values()
            .filter(|s| present.contains(&s.fp.workload_id))
            .filter(|s| s.state(now) == RateState::Degraded)
            .count();
        (lapsed > 0).then(|| {
            format!(
                "fleet ledger (Redis): {lapsed} fleet connection rate(s) hold no share and follow their fleet_failure"
            )
        })
    }

    /// A clean stop: gives the shares up so that the others' grow at their
    /// next renewal (waits at most the timeout), and returns each pair's
    /// `fleet_failure` rate for the kernel: programs kept after the stop
    /// (`on_exit = "keep"`) must not go on enforcing a share no longer
    /// held.
    pub async fn stop(&mut self) -> Vec<RateChange> {
        while self.replies.try_recv().is_ok() {}
        let mut waiting = 0;
        for (bucket, s) in &self.shares {
            if !s.holding {
                continue;
            }
            let op = RateOp {
                bucket: *bucket,
                key: s.key.clone(),
                hold: false,
                sent: Instant::now(),
            };
            if self.ops.try_send(op).is_ok() {
                waiting += 1;
            }
        }
        let deadline = tokio::time::Instant::now() + self.timeout * 2 + Duration::from_millis(100);
        while waiting > 0 {
            match tokio::time::timeout_at(deadline, self.replies.recv()).await {
                Ok(Some(_)) => waiting -= 1,
                Ok(None) | Err(_) => break,
            }
        }
        if waiting == 0 && self.shares.values().any(|s| s.holding) {
            info!("fleet connection rate shares given up");
        }
        self.shares
            .iter_mut()
            .map(|(bucket, s)| {
                s.holding = false;
                RateChange {
                    bucket: *bucket,
                    rate: s.fp.fallback(s.holders),
                    lease: None,
                }
            })
            .collect()
    }
}

impl Drop for RateKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connections per second of a kernel rate (0 for one that refuses all).
fn per_second(r: &Rate) -> f64 {
    if r.capacity < llm_egress_common::CONN_UNIT {
        0.0
    } else {
        r.per_ns as f64 / 1000.0
    }
}

/// The task: connects (AUTH, TLS as the token ledger does), runs each op
/// within the timeout, reconnects after a failure at most once a second.
async fn serve(
    ledger: Ledger,
    agent: String,
    mut ops: mpsc::Receiver<RateOp>,
    replies: mpsc::Sender<RateReply>,
    answered: Arc<Notify>,
) {
    let script = Script::new(RATE_LUA);
    let timeout = ledger.timeout();
    let mut conn: Option<MultiplexedConnection> = None;
    let mut next_try = tokio::time::Instant::now();
    while let Some(first) = ops.recv().await {
        let mut batch = vec![first];
        while let Ok(op) = ops.try_recv() {
            batch.push(op);
        }
        let mut error = None;
        if conn.is_none() && tokio::time::Instant::now() >= next_try {
            match tokio::time::timeout(timeout * 2, ledger.connect()).await {
                Ok(Ok(c)) => conn = Some(c),
                Ok(Err(e)) => error = Some(e),
                Err(_) => error = Some(format!("no connection within {:?}", timeout * 2)),
            }
            if conn.is_none() {
                next_try = tokio::time::Instant::now() + Duration::from_secs(1);
            }
        }
        for op in batch {
            let result = match conn.as_mut() {
                None => Err(error.clone().unwrap_or_else(|| "not connected".into())),
                Some(c) => {
                    let mut inv = script.key(&op.key);
                    inv.arg(&agent)
                        .arg(LEASE_TTL.as_millis() as u64)
                        .arg(if op.hold { "1" } else { "0" });
                    match tokio::time::timeout(timeout, inv.invoke_async::<i64>(c)).await {
                        Ok(Ok(n)) => Ok(n.max(0) as u64),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                    }
                }
            };
            if result.is_err() && conn.take().is_some() {
                next_try = tokio::time::Instant::now() + Duration::from_secs(1);
            }
            let reply = RateReply {
                bucket: op.bucket,
                sent: op.sent,
                hold: op.hold,
                result,
            };
            if replies.send(reply).await.is_err() {
                return;
            }
        }
        answered.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::limit_entries::{Pair, refuse_all},
        policy::{
            ConnectionRate,
            fleet::{FleetFailure, FleetWorkload},
        },
    };
    use llm_egress_common::CONN_UNIT;

    fn share(failure: FleetFailure, agents: Option<u64>) -> Share {
        Share {
            fp: FleetRatePair {
                pair: Pair {
                    workload: "bot".into(),
                    provider: "openai".into(),
                },
                workload_id: 1,
                workload: FleetWorkload {
                    identity: "bot".into(),
                    failure,
                },
                rate: ConnectionRate {
                    per_second: 30.0,
                    burst: 6,
                },
                agents,
            },
            key: "k".into(),
            holders: None,
            until: None,
            last_op: None,
            in_flight: false,
            holding: false,
            told: None,
        }
    }

    #[test]
    fn a_held_share_is_one_over_the_holders_of_rate_and_burst() {
        let now = Instant::now();
        let mut s = share(FleetFailure::Closed, None);
        s.holders = Some(3);
        s.holding = true;
        s.until = Some(now + LEASE_TTL);
        let r = s.rate(now);
        assert_eq!(r.per_ns, 10_000);
        assert_eq!(r.capacity, 2 * CONN_UNIT);
        assert_eq!(per_second(&r), 10.0);
        // A burst share below one connection still allows one.
        s.holders = Some(12);
        assert_eq!(s.rate(now).capacity, CONN_UNIT);
    }

    #[test]
    fn a_lapsed_share_follows_fleet_failure() {
        let now = Instant::now();
        for (failure, agents, want) in [
            (FleetFailure::Closed, Some(3), 0.0),
            (FleetFailure::HostShare, Some(3), 10.0),
            // Without `[fleet] agents`: the holders last counted.
            (FleetFailure::HostShare, None, 15.0),
            (FleetFailure::Open, Some(3), 30.0),
        ] {
            let mut s = share(failure, agents);
            s.holders = Some(2);
            s.holding = true;
            s.until = Some(now + LEASE_TTL);
            assert_eq!(s.state(now), RateState::Leased(2));
            let later = now + LEASE_TTL;
            assert_eq!(s.state(later), RateState::Degraded);
            assert_eq!(per_second(&s.rate(later)), want, "{failure:?}");
        }
        assert_eq!(share(FleetFailure::Closed, None).rate(now), refuse_all());
        // Never answered: host_share without `agents` is the whole rate.
        let s = share(FleetFailure::HostShare, None);
        assert_eq!(per_second(&s.rate(now)), 30.0);
    }

    #[test]
    fn refuse_all_refuses_every_take() {
        let r = refuse_all();
        assert_eq!(r.take(0, 0, 10_000_000_000, CONN_UNIT), (0, false));
        assert_eq!(r.take(5 * CONN_UNIT, 0, 1, CONN_UNIT), (0, false));
    }
}
