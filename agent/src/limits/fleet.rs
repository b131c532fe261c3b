//! Fleet-wide token budgets (docs/fleet.md): the agent's side of the
//! ledger. For each pair whose workload has `scope = "fleet"` it holds a
//! **lease** (tokens the ledger granted it and it has not spent yet),
//! and for each such workload with a dollar budget one lease of
//! micro-dollars over all its providers (its spent state is handed to
//! `crate::limits::budget`, which keeps the workload's pairs: `usd_spent`),
//! spends it locally exactly as a host budget is spent (the limiter
//! charges counted tokens here; a pair with nothing left is written to
//! `BUDGET_SPENT`, and the kernel refuses as for any budget), and renews it
//! through `crate::limits::fleet_ledger`'s task when it runs low. Nothing here
//! waits for Redis: ops go out on a channel and replies are read at the
//! next tick.
//!
//! While the ledger is unreachable (or has not answered yet) a pair
//! follows its `fleet_failure`: `closed` spends the lease it holds and
//! then refuses; `host_share` spends the lease, then a local budget of
//! limit / agents (`shares`, charged with everything the pair spent on this
//! host all along); `open` does not refuse. Usage is reported when the
//! ledger answers again (reconcile). The agent id, the cumulative usage and
//! grants are saved under `state_dir` (`fleet.json`), so a restarted agent
//! continues where it stopped.

use std::{
    collections::{BTreeMap, VecDeque},
    fs, io,
    path::Path,
    time::{Duration, Instant},
};

use llm_egress_common::limit_kind;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    kernel::limit_entries::{FleetPair, FleetUsd, Pair, bucket_id},
    limits::budget::{Budgets, Change},
    limits::fleet_ledger::{self, Ledger, Op, Reply, TOKEN_WINDOWS_MS, USD_WINDOWS_MS},
    policy::{
        Limits, UsdBudget,
        fleet::{FleetConfig, FleetFailure},
    },
    state_file::{read_optional, write_private},
};

/// Name of the state file under `state_dir`.
pub const STATE_FILE: &str = "fleet.json";
/// Ops waiting for the ledger task; a tick that finds the queue full
/// sends again at the next.
const OP_QUEUE: usize = 4096;
/// A pair whose usage changed is reported at least this often.
const SYNC_EVERY: Duration = Duration::from_secs(5);
/// The least time between two ops of a pair.
const MIN_OP_GAP: Duration = Duration::from_millis(900);
/// Every pair is reported at least this often (remaining, live agents).
const HEARTBEAT: Duration = Duration::from_secs(60);

/// Slots per window of [`Recent`].
const RECENT_SLOTS: u64 = 96;

/// The agent's recent spending of one lease in each of its two windows
/// (the seed of a ledger that lost its data): per window, slots of
/// window / 96 (a second for a minute, 15 minutes for a day, 7.5 hours for
/// 30 days), numbered on the wall clock (unix seconds) so that they are
/// saved in `fleet.json` and survive a restart. A sum covers at least the
/// whole window (one slot more): it errs on the side of refusing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Recent {
    /// Per window: (slot number, spent), oldest first.
    slots: [VecDeque<(u64, u64)>; 2],
}

/// A window's slot length (s) and the slots a sum covers.
fn recent_slots(window_ms: u64) -> (u64, u64) {
    let secs = (window_ms / 1000).max(1);
    let len = secs.div_ceil(RECENT_SLOTS).max(1);
    (len, secs.div_ceil(len) + 1)
}

impl Recent {
    fn add(&mut self, windows_ms: [u64; 2], unix: u64, spent: u64) {
        for (q, window) in self.slots.iter_mut().zip(windows_ms) {
            let (len, keep) = recent_slots(window);
            let slot = unix / len;
            match q.back_mut() {
                // A clock that went back adds to the newest slot.
                Some((s, n)) if *s >= slot => *n += spent,
                _ => q.push_back((slot, spent)),
            }
            while q.front().is_some_and(|(s, _)| *s + keep <= slot) {
                q.pop_front();
            }
        }
    }

    /// What was spent in each window up to `unix`.
    fn sums(&self, windows_ms: [u64; 2], unix: u64) -> (u64, u64) {
        let sum = |q: &VecDeque<(u64, u64)>, window: u64| {
            let (len, keep) = recent_slots(window);
            let now = unix / len;
            q.iter()
                .filter(|(s, _)| *s + keep > now)
                .map(|(_, n)| n)
                .sum()
        };
        (
            sum(&self.slots[0], windows_ms[0]),
            sum(&self.slots[1], windows_ms[1]),
        )
    }
}

/// Seconds since the epoch (0 for a clock before it).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Debug)]
struct Lease {
    fp: FleetPair,
    key: String,
    /// Tokens one lease holds.
    size: u64,
    /// Cumulative tokens this agent spent on the pair, and was granted.
    used: u64,
    granted: u64,
    used_at_last_op: u64,
    left_minute: Option<i64>,
    left_day: Option<i64>,
    last_answer: Option<Instant>,
    last_op: Option<Instant>,
    in_flight: bool,
    recent: Recent,
    /// What the kernel was last told.
    told: Option<u32>,
    /// Restored from a previous run: the first op forfeits what the ledger
    /// granted before.
    forfeit: bool,
    /// What the last answer granted: the fleet had tokens left then.
    last_grant: u64,
    /// The limits of the short and the long window, in the lease's units.
    windows: [Option<u64>; 2],
    /// A workload's dollar budget (units: micro-dollars; windows: a day
    /// and 30 days), not a pair's tokens.
    usd: bool,
    /// Charged dollars below one micro-dollar, not yet in `used`.
    carry: f64,
}

/// Micro-dollars in a dollar: the unit of a dollar lease.
const MICRO: f64 = 1_000_000.0;

/// The lease id of `workload`'s dollar budget: not a kernel bucket (no
/// provider is named `$usd`).
fn usd_bucket(workload: &str) -> u64 {
    bucket_id(workload, "$usd")
}

impl Lease {
    fn allowance(&self) -> i64 {
        self.granted as i64 - self.used as i64
    }

    /// The `limit_kind` of the short and the long window.
    fn kinds(&self) -> [u32; 2] {
        if self.usd {
            [limit_kind::USD_PER_DAY, limit_kind::USD_PER_MONTH]
        } else {
            [limit_kind::TOKENS_PER_MINUTE, limit_kind::TOKENS_PER_DAY]
        }
    }

    /// The window the ledger says is spent (the long one first), if any.
    fn spent_window(&self) -> Option<u32> {
        let [short, long] = self.kinds();
        if self.windows[1].is_some() && self.left_day.is_some_and(|d| d <= 0) {
            Some(long)
        } else if self.windows[0].is_some() && self.left_minute.is_some_and(|m| m <= 0) {
            Some(short)
        } else {
            None
        }
    }

    /// The lengths of the lease's two windows.
    fn windows_ms(&self) -> [u64; 2] {
        if self.usd {
            USD_WINDOWS_MS
        } else {
            TOKEN_WINDOWS_MS
        }
    }

    fn op(&self, bucket: u64, unix: u64) -> Op {
        let (recent_minute, recent_day) = self.recent.sums(self.windows_ms(), unix);
        Op {
            bucket,
            key: self.key.clone(),
            used: self.used,
            target: self.size,
            limit_minute: self.windows[0].unwrap_or(0),
            limit_day: self.windows[1].unwrap_or(0),
            windows_ms: self.windows_ms(),
            recent_minute,
            recent_day,
            forfeit: self.forfeit,
        }
    }
}

/// The series of docs/metrics.md, "Fleet".
#[derive(Clone)]
struct FleetMetrics {
    degraded: IntGauge,
    ops: IntCounterVec,
    remaining: IntGaugeVec,
    lease: IntGaugeVec,
    agents: IntGauge,
    resets: IntCounter,
}

impl FleetMetrics {
    fn register(r: &Registry) -> Result<Self, prometheus::Error> {
        let degraded = IntGauge::new(
            "llm_egress_fleet_degraded",
            "1 while the fleet ledger (Redis) is unreachable or has not answered yet",
        )?;
        let ops = IntCounterVec::new(
            Opts::new(
                "llm_egress_fleet_lease_operations_total",
                "Lease operations (renew, report, return) on the fleet ledger, by result",
            ),
            &["result"],
        )?;
        let remaining = IntGaugeVec::new(
            Opts::new(
                "llm_egress_fleet_budget_remaining",
                "Tokens left in a fleet budget's window, as the ledger last said",
            ),
            &["workload", "provider", "window"],
        )?;
        let lease = IntGaugeVec::new(
            Opts::new(
                "llm_egress_fleet_lease_tokens",
                "Tokens of its lease this agent holds unspent (below 0: spent beyond it)",
            ),
            &["workload", "provider"],
        )?;
        let agents = IntGauge::new(
            "llm_egress_fleet_agents",
            "Agents that used the fleet ledger in the last two minutes",
        )?;
        let resets = IntCounter::new(
            "llm_egress_fleet_ledger_resets_total",
            "Times the ledger was found to have lost its data (a new epoch)",
        )?;
        r.register(Box::new(degraded.clone()))?;
        r.register(Box::new(ops.clone()))?;
        r.register(Box::new(remaining.clone()))?;
        r.register(Box::new(lease.clone()))?;
        r.register(Box::new(agents.clone()))?;
        r.register(Box::new(resets.clone()))?;
        degraded.set(1);
        Ok(Self {
            degraded,
            ops,
            remaining,
            lease,
            agents,
            resets,
        })
    }
}

/// What `fleet.json` holds.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct StateFile {
    agent: String,
    epoch: Option<String>,
    pairs: Vec<SavedLease>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct SavedLease {
    key: String,
    used: u64,
    granted: u64,
    /// Absent in files of earlier versions.
    #[serde(default)]
    recent: Recent,
}

pub struct FleetKeeper {
    config: FleetConfig,
    agent: String,
    leases: BTreeMap<u64, Lease>,
    /// Restored usage by ledger key, for pairs the policy sets later.
    saved: BTreeMap<String, SavedLease>,
    ops: mpsc::Sender<Op>,
    replies: mpsc::Receiver<Reply>,
    /// The agent id came from `fleet.json`: a restart (first ops forfeit
    /// what was granted before).
    restored: bool,
    /// None: no answer yet; false: the last op failed.
    reachable: Option<bool>,
    agents_seen: u64,
    epoch: Option<String>,
    /// The `host_share` budgets: each limit divided by the agents.
    shares: Budgets,
    shares_divisor: u64,
    metrics: FleetMetrics,
    task: tokio::task::JoinHandle<()>,
    /// Notified when replies are waiting.
    answered: std::sync::Arc<tokio::sync::Notify>,
}

impl FleetKeeper {
    /// Restores the agent's id and usage from `state_dir` (a new id when
    /// there is none) and starts the ledger task.
    pub fn start(
        config: FleetConfig,
        state_dir: &Path,
        registry: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let metrics = FleetMetrics::register(registry)?;
        let saved = match load(state_dir) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "fleet state unreadable; starting as a new agent");
                None
            }
        };
        let restored = saved.as_ref().is_some_and(|s| !s.agent.is_empty());
        let (agent, epoch, saved) = match saved {
            Some(s) if !s.agent.is_empty() => (
                s.agent,
                s.epoch,
                s.pairs.into_iter().map(|p| (p.key.clone(), p)).collect(),
            ),
            _ => {
                let id = new_agent_id();
                // Saved at once: a restart, even after SIGKILL, is the
                // same agent to the ledger.
                let first = StateFile {
                    agent: id.clone(),
                    epoch: None,
                    pairs: vec![],
                };
                if let Err(e) = serde_json::to_vec_pretty(&first)
                    .map_err(io::Error::other)
                    .and_then(|b| write_private(state_dir, STATE_FILE, &b))
                {
                    warn!(error = %e, dir = %state_dir.display(), "could not save the fleet agent id");
                }
                (id, None, BTreeMap::new())
            }
        };
        info!(agent = %agent, servers = config.servers.len(), "fleet budgets on the ledger");
        let (ops_tx, ops_rx) = mpsc::channel(OP_QUEUE);
        let (rep_tx, rep_rx) = mpsc::channel(OP_QUEUE);
        let ledger = Ledger::new(config.clone(), agent.clone());
        let answered = std::sync::Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn(fleet_ledger::serve(
            ledger,
            ops_rx,
            rep_tx,
            answered.clone(),
        ));
        Ok(Self {
            shares_divisor: config.agents.unwrap_or(1),
            config,
            agent,
            restored,
            leases: BTreeMap::new(),
            saved,
            ops: ops_tx,
            replies: rep_rx,
            reachable: None,
            agents_seen: 0,
            epoch,
            shares: Budgets::default(),
            metrics,
            task,
            answered,
        })
    }

    /// Follows a (new) policy's fleet pairs (bucket id → pair) and fleet
    /// dollar budgets (by workload): kept ones keep their lease, new ones
    /// start with the usage saved for them. Returns the pairs no longer
    /// fleet-limited that the kernel was told were spent.
    pub fn set_pairs(
        &mut self,
        pairs: &BTreeMap<u64, FleetPair>,
        usd: &BTreeMap<String, FleetUsd>,
    ) -> Vec<Change> {
        let mut released = Vec::new();
        let mut next = BTreeMap::new();
        let prefix = self.config.key_prefix.clone();
        for (bucket, fp) in pairs {
            let key = Ledger::pair_key(&prefix, &fp.workload.identity, &fp.pair.provider);
            let windows = [fp.limits.tokens_per_minute, fp.limits.tokens_per_day];
            let lease = self.lease_for(*bucket, fp.clone(), key, windows, false, &mut released);
            next.insert(*bucket, lease);
        }
        for (name, fu) in usd {
            // Whole micro-dollars, at least one.
            let micro = |v: Option<f64>| v.map(|v| ((v * MICRO).round() as u64).max(1));
            let fp = FleetPair {
                pair: Pair {
                    workload: name.clone(),
                    provider: String::new(),
                },
                workload: fu.workload.clone(),
                limits: Limits::default(),
            };
            let key = Ledger::usd_key(&prefix, &fu.workload.identity);
            let windows = [micro(fu.budget.per_day), micro(fu.budget.per_month)];
            let bucket = usd_bucket(name);
            let lease = self.lease_for(bucket, fp, key, windows, true, &mut released);
            next.insert(bucket, lease);
        }
        for (bucket, old) in std::mem::take(&mut self.leases) {
            if old.told.is_some() && !old.usd {
                released.push(change(bucket, &old.fp.pair, None));
            }
            let _ = self
                .metrics
                .lease
                .remove_label_values(&[&old.fp.pair.workload, &old.fp.pair.provider]);
        }
        self.leases = next;
        self.set_shares();
        released
    }

    /// The lease of `bucket` for the new policy: the old one if its ledger
    /// key is the same (limits updated), else a new one with the usage
    /// saved for the key.
    fn lease_for(
        &mut self,
        bucket: u64,
        fp: FleetPair,
        key: String,
        windows: [Option<u64>; 2],
        usd: bool,
        released: &mut Vec<Change>,
    ) -> Lease {
        let smallest = windows.into_iter().flatten().min().unwrap_or(1);
        let size = ((smallest as f64 * self.config.lease_fraction).ceil() as u64).max(1);
        match self.leases.remove(&bucket) {
            Some(mut l) if l.key == key => {
                l.fp = fp;
                l.size = size;
                l.windows = windows;
                l
            }
            old => {
                if let Some(o) = old.filter(|o| o.told.is_some() && !o.usd) {
                    released.push(change(bucket, &o.fp.pair, None));
                }
                let (used, granted, recent) = match self.saved.get(&key) {
                    Some(p) => (p.used, p.granted, p.recent.clone()),
                    None => (0, 0, Recent::default()),
                };
                info!(
                    workload = %fp.pair.workload,
                    provider = %fp.pair.provider,
                    ledger = %key,
                    fleet_failure = fp.workload.failure.name(),
                    lease = size,
                    "fleet budget"
                );
                Lease {
                    fp,
                    key,
                    size,
                    used,
                    granted,
                    used_at_last_op: used,
                    left_minute: None,
                    left_day: None,
                    last_answer: None,
                    last_op: None,
                    in_flight: false,
                    recent,
                    told: None,
                    forfeit: self.restored,
                    last_grant: 0,
                    windows,
                    usd,
                    carry: 0.0,
                }
            }
        }
    }

    /// The host_share budgets for the current pairs and divisor.
    fn set_shares(&mut self) {
        let n = self.shares_divisor.max(1);
        let share = |v: Option<u64>| v.map(|v| (v / n).max(1));
        let pairs: BTreeMap<u64, (Pair, Limits)> = (self.leases.iter())
            .filter(|(_, l)| !l.usd)
            .map(|(b, l)| {
                let limits = Limits {
                    tokens_per_minute: share(l.windows[0]),
                    tokens_per_day: share(l.windows[1]),
                    ..Limits::default()
                };
                (*b, (l.fp.pair.clone(), limits))
            })
            .collect();
        let dollars = |v: Option<u64>| share(v).map(|v| v as f64 / MICRO);
        let usd: BTreeMap<String, UsdBudget> = (self.leases.values())
            .filter(|l| l.usd)
            .map(|l| {
                let budget = UsdBudget {
                    per_day: dollars(l.windows[0]),
                    per_month: dollars(l.windows[1]),
                };
                (l.fp.pair.workload.clone(), budget)
            })
            .collect();
        self.shares.set_policy(&pairs, &usd);
    }

    /// This agent's id in the ledger (kept in `fleet.json`); the fleet
    /// connection rates (`crate::limits::fleet_rate`) hold their shares
    /// under it too.
    pub fn agent_id(&self) -> &str {
        &self.agent
    }

    /// Notified when the ledger answered: call `tick` then, too.
    pub fn answered(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.answered.clone()
    }

    pub fn owns(&self, bucket: u64) -> bool {
        self.leases.contains_key(&bucket)
    }

    /// The kernel's `BUDGET_SPENT` state of a pair at start.
    pub fn adopt_kernel_state(&mut self, bucket: u64, kind: u32) -> bool {
        match self.leases.get_mut(&bucket) {
            Some(l) => {
                l.told = Some(kind);
                true
            }
            None => false,
        }
    }

    /// Whether `workload`'s dollar budget is fleet-wide (kept here).
    pub fn owns_usd(&self, workload: &str) -> bool {
        self.leases
            .get(&usd_bucket(workload))
            .is_some_and(|l| l.usd)
    }

    /// Charges `usd` dollars to `workload`'s fleet dollar budget, in whole
    /// micro-dollars (the rest is carried to the next charge).
    pub fn charge_usd(&mut self, workload: &str, usd: f64) {
        let usd = if usd.is_finite() { usd.max(0.0) } else { 0.0 };
        let unix = unix_now();
        if let Some(l) = self.leases.get_mut(&usd_bucket(workload)) {
            let micro = l.carry + usd * MICRO;
            let whole = micro.floor();
            l.carry = micro - whole;
            l.used += whole as u64;
            let windows = l.windows_ms();
            l.recent.add(windows, unix, whole as u64);
            self.shares.charge_usd(workload, usd);
        }
    }

    /// The spent window of each fleet dollar budget, by workload (None:
    /// available), as of the last `tick`: `crate::limits::budget` marks
    /// the workload's pairs.
    pub fn usd_spent(&self) -> Vec<(String, Option<u32>)> {
        (self.leases.values())
            .filter(|l| l.usd)
            .map(|l| (l.fp.pair.workload.clone(), l.told))
            .collect()
    }

    /// Dollars left in each fleet dollar budget's windows ("day",
    /// "month"), as the ledger last said.
    pub fn usd_remaining(&self) -> Vec<(String, &'static str, f64)> {
        let mut out = Vec::new();
        for l in self.leases.values().filter(|l| l.usd) {
            for (window, set, left) in [
                ("day", l.windows[0], l.left_minute),
                ("month", l.windows[1], l.left_day),
            ] {
                if let (Some(_), Some(left)) = (set, left) {
                    out.push((l.fp.pair.workload.clone(), window, left as f64 / MICRO));
                }
            }
        }
        out
    }

    /// Fills the dollars left of a `budget` record of a pair whose
    /// workload's dollar budget is fleet-wide.
    pub fn usd_record(&self, record: &mut crate::telemetry::audit::BudgetRecord) {
        if let Some(l) = self
            .leases
            .get(&usd_bucket(&record.workload))
            .filter(|l| l.usd)
        {
            let dollars =
                |set: Option<u64>, left: Option<i64>| set.and(left).map(|v| v as f64 / MICRO);
            record.remaining_usd_day = dollars(l.windows[0], l.left_minute);
            record.remaining_usd_month = dollars(l.windows[1], l.left_day);
        }
    }

    /// Charges counted tokens to a fleet pair.
    pub fn charge(&mut self, bucket: u64, tokens: u64) {
        let unix = unix_now();
        if let Some(l) = self.leases.get_mut(&bucket) {
            l.used += tokens;
            let windows = l.windows_ms();
            l.recent.add(windows, unix, tokens);
            self.shares.charge(bucket, tokens);
        }
    }

    /// Once a second, and when the ledger answered: reads its answers,
    /// sends the ops that are due, and returns the pairs whose spent state
    /// changed.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        self.read_replies(now);
        self.shares.tick(now);
        let unix = unix_now();
        for (bucket, l) in &mut self.leases {
            // At most one op a pair about every second (ticks jitter): a
            // spent pair polls, it does not spin on the answers. A lease
            // used up while the fleet still granted renews at once.
            let renew_now = l.allowance() <= 0 && l.last_grant > 0;
            if l.in_flight
                || (!renew_now
                    && l.last_op
                        .is_some_and(|t| now.duration_since(t) < MIN_OP_GAP))
            {
                continue;
            }
            let due = l.last_answer.is_none()
                || l.allowance() <= (l.size as i64 + 1) / 2
                || (l.used != l.used_at_last_op
                    && l.last_op
                        .is_none_or(|t| now.duration_since(t) >= SYNC_EVERY))
                || l.last_op.is_none_or(|t| now.duration_since(t) >= HEARTBEAT);
            if !due {
                continue;
            }
            if self.ops.try_send(l.op(*bucket, unix)).is_ok() {
                l.in_flight = true;
                l.last_op = Some(now);
                l.used_at_last_op = l.used;
            }
        }
        let degraded = self.reachable != Some(true);
        self.metrics.degraded.set(i64::from(degraded));
        let mut out = Vec::new();
        for (bucket, l) in &mut self.leases {
            let kind = if l.usd {
                let w = &l.fp.pair.workload;
                decide(l, degraded, |_| self.shares.usd_spent_kind(w), *bucket)
            } else {
                decide(l, degraded, |b| self.shares.spent_kind(b), *bucket)
            };
            self.metrics
                .lease
                .with_label_values(&[&l.fp.pair.workload, &l.fp.pair.provider])
                .set(l.allowance());
            if kind != l.told {
                l.told = kind;
                // A dollar lease is no kernel pair: `usd_spent` tells
                // the host keeper, which marks the workload's pairs.
                if !l.usd {
                    out.push(change(*bucket, &l.fp.pair, kind));
                }
            }
        }
        out
    }

    fn read_replies(&mut self, now: Instant) {
        while let Ok(reply) = self.replies.try_recv() {
            match reply {
                Reply::Done { bucket, answer } => {
                    self.metrics.ops.with_label_values(&["ok"]).inc();
                    self.reachable = Some(true);
                    if self.epoch.as_ref().is_some_and(|e| *e != answer.epoch) {
                        self.metrics.resets.inc();
                        warn!(
                            "the fleet ledger lost its data (a new epoch): budgets are seeded again with each agent's spending in their windows (docs/fleet.md)"
                        );
                    }
                    self.epoch = Some(answer.epoch.clone());
                    if answer.agents != self.agents_seen {
                        self.agents_seen = answer.agents;
                        self.metrics.agents.set(answer.agents as i64);
                        if self.config.agents.is_none() && answer.agents > 0 {
                            self.shares_divisor = answer.agents;
                            self.set_shares();
                        }
                    }
                    let Some(l) = self.leases.get_mut(&bucket) else {
                        continue;
                    };
                    l.in_flight = false;
                    l.used = l.used.max(answer.used);
                    l.forfeit = false;
                    l.last_answer = Some(now);
                    l.last_grant = answer
                        .granted
                        .saturating_sub(l.granted.max(l.used_at_last_op));
                    l.granted = answer.granted;
                    let pair = &l.fp.pair;
                    for (window, limit, left, slot) in [
                        (
                            "minute",
                            l.windows[0],
                            answer.left_minute,
                            &mut l.left_minute,
                        ),
                        ("day", l.windows[1], answer.left_day, &mut l.left_day),
                    ] {
                        if limit.is_some() {
                            *slot = Some(left);
                            // Dollars left go to llm_egress_budget_remaining_usd
                            // (`usd_remaining`).
                            if !l.usd {
                                self.metrics
                                    .remaining
                                    .with_label_values(&[&pair.workload, &pair.provider, window])
                                    .set(left);
                            }
                        }
                    }
                }
                Reply::Health { ok } => self.reachable = Some(ok),
                Reply::Failed { bucket, error } => {
                    self.metrics.ops.with_label_values(&["failed"]).inc();
                    if self.reachable != Some(false) {
                        warn!(error = %error, "fleet budgets follow their fleet_failure until the ledger answers");
                    }
                    self.reachable = Some(false);
                    if let Some(l) = self.leases.get_mut(&bucket) {
                        l.in_flight = false;
                    }
                }
            }
        }
    }

    /// A clean stop: gives every unspent lease back to the ledger (waiting
    /// at most the timeout), so that other agents can have it.
    pub async fn stop(&mut self) {
        let unix = unix_now();
        // Answers still on their way are read (and dropped) first.
        while self.replies.try_recv().is_ok() {}
        let mut waiting = 0;
        for (bucket, l) in &self.leases {
            if l.last_answer.is_none() || l.allowance() <= 0 {
                continue;
            }
            let mut op = l.op(*bucket, unix);
            op.target = 0;
            if self.ops.try_send(op).is_ok() {
                waiting += 1;
            }
        }
        let deadline =
            tokio::time::Instant::now() + self.config.timeout + Duration::from_millis(100);
        while waiting > 0 {
            match tokio::time::timeout_at(deadline, self.replies.recv()).await {
                Ok(Some(Reply::Done { bucket, answer })) => {
                    waiting -= 1;
                    if let Some(l) = self.leases.get_mut(&bucket) {
                        l.granted = answer.granted;
                        l.used = l.used.max(answer.used);
                    }
                }
                Ok(Some(Reply::Failed { .. })) => waiting -= 1,
                Ok(Some(Reply::Health { .. })) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if waiting == 0 && !self.leases.is_empty() {
            info!("fleet leases returned");
        }
    }

    /// Why `/readyz` should say not ready, if it should.
    pub fn degraded(&self) -> Option<String> {
        match self.reachable {
            _ if self.leases.is_empty() => None,
            Some(true) if self.leases.values().all(|l| l.last_answer.is_some()) => None,
            Some(true) | None => {
                Some("fleet ledger (Redis) has not answered every lease yet".into())
            }
            Some(false) => Some(
                "fleet ledger (Redis) unreachable: fleet budgets follow their fleet_failure".into(),
            ),
        }
    }

    /// The `budget` audit record of a fleet pair's change.
    pub fn record(&self, c: &Change, time: String) -> crate::telemetry::audit::BudgetRecord {
        let l = self.leases.get(&c.bucket);
        crate::telemetry::audit::BudgetRecord {
            event: "budget",
            time,
            workload: c.pair.workload.clone(),
            provider: c.pair.provider.clone(),
            state: if c.spent.is_some() {
                "spent"
            } else {
                "available"
            },
            limit: c.spent.map(llm_egress_common::limit_kind::name),
            remaining_minute: l.and_then(|l| l.left_minute),
            remaining_day: l.and_then(|l| l.left_day),
            remaining_usd_day: None,
            remaining_usd_month: None,
        }
    }

    /// Saves the agent id and each pair's usage (atomically, 0600).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let mut pairs = self.saved.clone();
        for l in self.leases.values() {
            let saved = SavedLease {
                key: l.key.clone(),
                used: l.used,
                granted: l.granted,
                recent: l.recent.clone(),
            };
            pairs.insert(l.key.clone(), saved);
        }
        let state = StateFile {
            agent: self.agent.clone(),
            epoch: self.epoch.clone(),
            pairs: pairs.into_values().collect(),
        };
        write_private(
            dir,
            STATE_FILE,
            &serde_json::to_vec_pretty(&state).map_err(io::Error::other)?,
        )
    }
}

impl Drop for FleetKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether a pair is spent now (`limit_kind`), and which window.
fn decide(
    l: &Lease,
    degraded: bool,
    share_spent: impl Fn(u64) -> Option<u32>,
    bucket: u64,
) -> Option<u32> {
    if l.allowance() > 0 {
        return None;
    }
    let [short, long] = l.kinds();
    let fallback = l
        .spent_window()
        .unwrap_or(if l.windows[0].is_some() { short } else { long });
    if !degraded {
        // The lease is used up: refused until the ledger grants more (the
        // renewal went out when it ran below half; a fleet with nothing
        // left grants nothing).
        return Some(fallback);
    }
    match l.fp.workload.failure {
        FleetFailure::Open => None,
        FleetFailure::Closed => Some(fallback),
        FleetFailure::HostShare => share_spent(bucket),
    }
}

fn change(bucket: u64, pair: &Pair, spent: Option<u32>) -> Change {
    Change {
        bucket,
        pair: pair.clone(),
        spent,
    }
}

fn new_agent_id() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .take(40)
        .collect();
    format!("{host}-{:08x}", fleet_ledger::random_u64() as u32)
}

fn load(dir: &Path) -> Result<Option<StateFile>, String> {
    match read_optional(dir, STATE_FILE)? {
        Some(t) => serde_json::from_slice(&t)
            .map(Some)
            .map_err(|e| format!("{}: {e}", dir.join(STATE_FILE).display())),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::fleet::FleetWorkload;

    fn lease(failure: FleetFailure, granted: u64, used: u64) -> Lease {
        Lease {
            fp: FleetPair {
                pair: Pair {
                    workload: "bot".into(),
                    provider: "openai".into(),
                },
                workload: FleetWorkload {
                    identity: "bot".into(),
                    failure,
                },
                limits: Limits {
                    tokens_per_day: Some(1000),
                    ..Limits::default()
                },
            },
            key: "k".into(),
            size: 20,
            used,
            granted,
            used_at_last_op: used,
            left_minute: None,
            left_day: Some(500),
            last_answer: None,
            last_op: None,
            in_flight: false,
            recent: Recent::default(),
            told: None,
            forfeit: false,
            last_grant: 0,
            windows: [None, Some(1000)],
            usd: false,
            carry: 0.0,
        }
    }

    #[test]
    fn a_held_lease_is_spent_whatever_the_ledger_does() {
        for f in [
            FleetFailure::Closed,
            FleetFailure::HostShare,
            FleetFailure::Open,
        ] {
            assert_eq!(decide(&lease(f, 100, 50), true, |_| Some(1), 1), None);
        }
    }

    #[test]
    fn a_used_up_lease_follows_the_ledger_then_the_failure_mode() {
        let now = Instant::now();
        let mut l = lease(FleetFailure::Closed, 100, 100);
        l.last_answer = Some(now);
        // Nothing is spent beyond the lease, whatever the fleet has left.
        assert_eq!(
            decide(&l, false, |_| None, 1),
            Some(limit_kind::TOKENS_PER_DAY)
        );
        l.left_day = Some(0);
        assert_eq!(
            decide(&l, false, |_| None, 1),
            Some(limit_kind::TOKENS_PER_DAY)
        );
        l.left_day = Some(500);
        // Unreachable: closed refuses, open allows, host_share asks its share.
        assert_eq!(
            decide(&l, true, |_| None, 1),
            Some(limit_kind::TOKENS_PER_DAY)
        );
        l.fp.workload.failure = FleetFailure::Open;
        assert_eq!(decide(&l, true, |_| Some(5), 1), None);
        l.fp.workload.failure = FleetFailure::HostShare;
        assert_eq!(decide(&l, true, |_| None, 1), None);
        assert_eq!(decide(&l, true, |_| Some(5), 1), Some(5));
    }

    #[test]
    fn a_dollar_lease_names_dollar_windows() {
        let now = Instant::now();
        let mut l = lease(FleetFailure::Closed, 100, 100);
        l.usd = true;
        l.windows = [Some(5_000_000), Some(50_000_000)];
        l.last_answer = Some(now);
        l.left_day = Some(1);
        l.left_minute = Some(-3);
        assert_eq!(
            decide(&l, false, |_| None, 1),
            Some(limit_kind::USD_PER_DAY)
        );
        l.left_day = Some(0);
        assert_eq!(
            decide(&l, false, |_| None, 1),
            Some(limit_kind::USD_PER_MONTH)
        );
        let op = l.op(1, 0);
        assert_eq!((op.limit_minute, op.limit_day), (5_000_000, 50_000_000));
        assert_eq!(op.windows_ms, USD_WINDOWS_MS);
    }

    #[test]
    fn recent_spending_covers_each_window_of_tokens_and_dollars() {
        let t0 = 1_800_000_000;
        let mut r = Recent::default();
        r.add(TOKEN_WINDOWS_MS, t0, 10);
        r.add(TOKEN_WINDOWS_MS, t0 + 30, 5);
        r.add(TOKEN_WINDOWS_MS, t0 + 30, 5);
        assert_eq!(r.sums(TOKEN_WINDOWS_MS, t0 + 30), (20, 20));
        // A sum covers the whole window and at most one slot more.
        assert_eq!(r.sums(TOKEN_WINDOWS_MS, t0 + 60), (20, 20));
        assert_eq!(r.sums(TOKEN_WINDOWS_MS, t0 + 62), (10, 20));
        r.add(TOKEN_WINDOWS_MS, t0 + 2_000, 1);
        assert_eq!(r.sums(TOKEN_WINDOWS_MS, t0 + 2_000), (1, 21));
        r.add(TOKEN_WINDOWS_MS, t0 + 90_000, 7);
        assert_eq!(r.sums(TOKEN_WINDOWS_MS, t0 + 90_000), (7, 7));
        assert!(r.slots.iter().all(|q| q.len() <= 98));

        // Dollars: a day and 30 days. What was spent two hours ago is
        // still in the day (it was not for the minute-and-day slots of
        // tokens, the bug this replaces), and in the month after 20 days.
        let mut u = Recent::default();
        u.add(USD_WINDOWS_MS, t0, 25);
        assert_eq!(u.sums(USD_WINDOWS_MS, t0 + 7_200), (25, 25));
        assert_eq!(u.sums(USD_WINDOWS_MS, t0 + 20 * 86_400), (0, 25));
        assert_eq!(u.sums(USD_WINDOWS_MS, t0 + 32 * 86_400), (0, 0));
        // A clock that went back adds to the newest slot.
        u.add(USD_WINDOWS_MS, t0 - 100_000, 5);
        assert_eq!(u.sums(USD_WINDOWS_MS, t0), (30, 30));
    }

    #[test]
    fn recent_spending_is_saved_and_restored_with_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let mut recent = Recent::default();
        recent.add(USD_WINDOWS_MS, unix_now() - 3_600, 40);
        let state = StateFile {
            agent: "a1".into(),
            epoch: None,
            pairs: vec![SavedLease {
                key: "k".into(),
                used: 40,
                granted: 50,
                recent: recent.clone(),
            }],
        };
        write_private(dir.path(), STATE_FILE, &serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(state));
        // A file of an earlier version (no `recent`) still loads.
        let old = r#"{"agent":"a1","epoch":null,"pairs":[{"key":"k","used":1,"granted":2}]}"#;
        fs::write(dir.path().join(STATE_FILE), old).unwrap();
        let loaded = load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.pairs[0].recent, Recent::default());
    }
}
