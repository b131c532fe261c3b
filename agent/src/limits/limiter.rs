//! The agent's side of `[workloads.limits]` while it runs: charges the
//! tokens and dollars accounting counts (taken from `crate::token_tally`,
//! never read back from the metrics) to the token and dollar budgets
//! (`budget`), tells the kernel which pairs are spent (`BUDGET_SPENT`),
//! writes `budget` audit records, keeps `llm_egress_budget_remaining`,
//! `llm_egress_budget_remaining_usd` and `llm_egress_rate_limited_total`
//! current, and saves the budgets under `state_dir`. Pairs whose budgets
//! are fleet-wide (`scope = "fleet"`) are charged to and decided by
//! `crate::fleet` instead of `budget`; the kernel side is the same.
//! Fleet-wide connection rates (`crate::limits::fleet_rate`) are settled
//! with them: each share that changes is written into the pair's `LIMITS`
//! entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Instant, SystemTime},
};

use tracing::{info, warn};

use crate::{
    accounting::token_tally::TokenTally,
    kernel::limit_entries::{LimitPlan, Pair},
    kernel::maps::KernelMaps,
    limits::budget::{Budgets, Change},
    limits::{fleet::FleetKeeper, fleet_rate::RateKeeper},
    policy::{Limits, UsdBudget},
    telemetry::audit::AuditSink,
    telemetry::metrics::Metrics,
};

/// Seconds between two saves of the state file.
const SAVE_EVERY_TICKS: u64 = 10;

pub struct Limiter {
    budgets: Budgets,
    state_dir: PathBuf,
    /// Tokens counted by accounting since the last tick, by pair.
    tally: TokenTally,
    /// Every pair ever limited by this agent: names for `LIMIT_HITS` keys of
    /// pairs a reload removed.
    names: BTreeMap<u64, Pair>,
    /// Label values of the `llm_egress_budget_remaining` series set last,
    /// so that series of pairs no longer limited are removed (and the
    /// others are never missing from a scrape).
    gauges: BTreeSet<[String; 3]>,
    /// The same for `llm_egress_budget_remaining_usd`.
    usd_gauges: BTreeSet<[String; 2]>,
    ticks: u64,
    /// Fleet-wide budgets (`[fleet]`); None without `[fleet]`.
    fleet: Option<FleetKeeper>,
    /// Fleet-wide connection rates (`[fleet]`); None without `[fleet]`.
    rates: Option<RateKeeper>,
}

/// The pairs `budget` keeps: all but those `fleet` keeps.
fn host_pairs(limits: &LimitPlan, fleet: bool) -> BTreeMap<u64, (Pair, Limits)> {
    let mut pairs = limits.pairs.clone();
    if fleet {
        pairs.retain(|b, _| !limits.fleet.contains_key(b));
    } else if !limits.fleet.is_empty() {
        warn!(
            "scope = \"fleet\" without a running fleet ledger ([fleet] changes only on restart): these budgets are kept per host until the agent restarts"
        );
    }
    pairs
}

/// The dollar budgets `budget` keeps (all but those `fleet` keeps), and
/// the workloads whose dollar budget `fleet` keeps (their pairs are still
/// `budget`'s, spent as `fleet` says).
fn host_usd(limits: &LimitPlan, fleet: bool) -> (BTreeMap<String, UsdBudget>, BTreeSet<String>) {
    if !fleet {
        if !limits.fleet_usd.is_empty() {
            warn!(
                "scope = \"fleet\" dollar budgets without a running fleet ledger ([fleet] changes only on restart): kept per host until the agent restarts"
            );
        }
        return (limits.usd.clone(), BTreeSet::new());
    }
    let mut usd = limits.usd.clone();
    usd.retain(|w, _| !limits.fleet_usd.contains_key(w));
    (usd, limits.fleet_usd.keys().cloned().collect())
}

impl Limiter {
    /// Budgets of `limits`, restored from `state_dir`, and the kernel's
    /// `BUDGET_SPENT` made to agree (before the programs are attached, so a
    /// budget spent before a restart is refused from the first moment).
    pub fn start(
        limits: &LimitPlan,
        state_dir: PathBuf,
        tally: TokenTally,
        fleet: Option<FleetKeeper>,
        maps: &mut KernelMaps,
        metrics: &Metrics,
        audit: &AuditSink,
    ) -> Self {
        let mut l = Self {
            budgets: Budgets::default(),
            state_dir,
            tally,
            names: BTreeMap::new(),
            gauges: BTreeSet::new(),
            usd_gauges: BTreeSet::new(),
            ticks: 0,
            fleet,
            rates: None,
        };
        let (usd, external) = host_usd(limits, l.fleet.is_some());
        l.budgets
            .set_policy_external(&host_pairs(limits, l.fleet.is_some()), &usd, &external);
        if let Some(f) = &mut l.fleet {
            f.set_pairs(&limits.fleet, &limits.fleet_usd);
        }
        match l.budgets.restore(&l.state_dir) {
            Ok(true) => info!(dir = %l.state_dir.display(), "token budgets restored"),
            Ok(false) => {}
            Err(e) => warn!(error = %e, "token budget state unreadable; every budget starts full"),
        }
        let mut kernel = maps.budget_spent();
        if let Some(f) = &mut l.fleet {
            kernel.retain(|b, kind| !f.adopt_kernel_state(*b, *kind));
        }
        let stale = l.budgets.adopt_kernel_state(&kernel);
        l.write(&stale, maps, metrics);
        l.remember(limits);
        l.settle(maps, metrics, audit);
        l
    }

    /// A new policy: budgets follow it; pairs no longer limited are
    /// released in the kernel.
    pub fn set_policy(
        &mut self,
        limits: &LimitPlan,
        state_dir: PathBuf,
        maps: &mut KernelMaps,
        metrics: &Metrics,
    ) {
        self.state_dir = state_dir;
        let (usd, external) = host_usd(limits, self.fleet.is_some());
        let mut released = self.budgets.set_policy_external(
            &host_pairs(limits, self.fleet.is_some()),
            &usd,
            &external,
        );
        if let Some(f) = &mut self.fleet {
            released.extend(f.set_pairs(&limits.fleet, &limits.fleet_usd));
        }
        if let Some(r) = &mut self.rates {
            r.set_pairs(&limits.fleet_rates);
        }
        self.settle_rates(maps);
        // A pair that moved between host and fleet is released by one and
        // kept by the other, which takes over what the kernel was told:
        // the next tick tells the kernel its new state.
        let (moved, released): (Vec<Change>, Vec<Change>) = released
            .into_iter()
            .partition(|c| limits.pairs.contains_key(&c.bucket));
        if !moved.is_empty() {
            let mut kernel = maps.budget_spent();
            kernel.retain(|b, _| moved.iter().any(|c| c.bucket == *b));
            if let Some(f) = &mut self.fleet {
                kernel.retain(|b, kind| !f.adopt_kernel_state(*b, *kind));
            }
            self.budgets.adopt_kernel_state(&kernel);
        }
        self.write(&released, maps, metrics);
        self.remember(limits);
    }

    /// Fleet-wide connection rates: their pairs hold shares from now on
    /// (the kernel has each pair's `fleet_failure` rate until the first
    /// answer).
    pub fn start_rates(
        &mut self,
        mut rates: RateKeeper,
        limits: &LimitPlan,
        maps: &mut KernelMaps,
    ) {
        rates.set_pairs(&limits.fleet_rates);
        self.rates = Some(rates);
        self.settle_rates(maps);
    }

    /// Tells the kernel the fleet-rate pairs whose share changed.
    fn settle_rates(&mut self, maps: &mut KernelMaps) {
        let Some(r) = &mut self.rates else { return };
        let present = maps.present_workloads();
        for c in r.tick(Instant::now(), &present) {
            if let Err(e) = maps.set_fleet_rate(c.bucket, c.rate, c.lease) {
                warn!(error = %e, "could not set a fleet connection rate");
            }
        }
    }

    /// Notified when the fleet ledger answered (then call
    /// [`Limiter::fleet_answered`]); None without `[fleet]`.
    pub fn fleet_wake(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        self.fleet.as_ref().map(FleetKeeper::answered)
    }

    /// The fleet ledger answered: leases renewed (or refused) apply at
    /// once, not at the next tick.
    pub fn fleet_answered(&mut self, maps: &mut KernelMaps, metrics: &Metrics, audit: &AuditSink) {
        self.settle(maps, metrics, audit);
    }

    /// Why `/readyz` should say not ready because of the fleet ledger.
    pub fn fleet_degraded(&self, maps: &KernelMaps) -> Option<String> {
        let rates = self
            .rates
            .as_ref()
            .and_then(|r| r.degraded(Instant::now(), &maps.present_workloads()));
        match (self.fleet.as_ref().and_then(FleetKeeper::degraded), rates) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        }
    }

    fn remember(&mut self, limits: &LimitPlan) {
        for (bucket, (pair, _)) in &limits.pairs {
            self.names.insert(*bucket, pair.clone());
        }
    }

    /// Once a second.
    pub fn tick(&mut self, maps: &mut KernelMaps, metrics: &Metrics, audit: &AuditSink) {
        self.charge_tally();
        self.settle(maps, metrics, audit);
        metrics.sync_limit_hits(&maps.limit_hits(), |bucket| {
            self.names
                .get(&bucket)
                .map(|p| (p.workload.clone(), p.provider.clone()))
        });
        self.ticks += 1;
        if self.ticks.is_multiple_of(SAVE_EVERY_TICKS) {
            self.save();
        }
    }

    /// Refills the budgets, tells the kernel and the audit log which pairs
    /// changed, and updates the gauge.
    fn settle(&mut self, maps: &mut KernelMaps, metrics: &Metrics, audit: &AuditSink) {
        let now = Instant::now();
        // The fleet first: what it says of fleet dollar budgets marks
        // their workloads' pairs in `budgets` at this tick.
        let mut fleet_changes = Vec::new();
        if let Some(f) = &mut self.fleet {
            fleet_changes = f.tick(now);
            for (workload, spent) in f.usd_spent() {
                self.budgets.set_external(&workload, spent);
            }
        }
        let mut changes = self.budgets.tick(now);
        let host = changes.len();
        changes.extend(fleet_changes);
        let time = crate::telemetry::audit::rfc3339(SystemTime::now());
        for (i, c) in changes.iter().enumerate() {
            let record = match &self.fleet {
                Some(f) if i >= host => f.record(c, time.clone()),
                Some(f) => {
                    let mut r = self.budgets.record(c, time.clone());
                    f.usd_record(&mut r);
                    r
                }
                None => self.budgets.record(c, time.clone()),
            };
            audit.record(&record, metrics);
            info!(
                workload = %c.pair.workload,
                provider = %c.pair.provider,
                spent = ?c.spent.map(llm_egress_common::limit_kind::name),
                "token budget"
            );
        }
        self.write(&changes, maps, metrics);
        self.settle_rates(maps);
        let mut now = BTreeSet::new();
        for (pair, window, left) in self.budgets.remaining() {
            let labels = [
                pair.workload.clone(),
                pair.provider.clone(),
                window.to_string(),
            ];
            metrics
                .budget_remaining
                .with_label_values(&labels)
                .set(left.floor() as i64);
            now.insert(labels);
        }
        for gone in self.gauges.difference(&now) {
            let _ = metrics.budget_remaining.remove_label_values(gone);
        }
        self.gauges = now;
        let mut now = BTreeSet::new();
        let mut usd_left: Vec<(String, &str, f64)> = (self.budgets.remaining_usd().into_iter())
            .map(|(w, window, left)| (w.to_owned(), window, left))
            .collect();
        if let Some(f) = &self.fleet {
            usd_left.extend(f.usd_remaining());
        }
        for (workload, window, left) in usd_left {
            let labels = [workload, window.to_string()];
            metrics
                .budget_remaining_usd
                .with_label_values(&labels)
                .set(left);
            now.insert(labels);
        }
        for gone in self.usd_gauges.difference(&now) {
            let _ = metrics.budget_remaining_usd.remove_label_values(gone);
        }
        self.usd_gauges = now;
    }

    fn write(&self, changes: &[Change], maps: &mut KernelMaps, metrics: &Metrics) {
        for c in changes {
            if let Err(e) = maps.set_budget_spent(c.bucket, c.spent) {
                warn!(error = %e, workload = %c.pair.workload, provider = %c.pair.provider, "could not update BUDGET_SPENT");
                metrics
                    .map_update_errors
                    .with_label_values(&[llm_egress_common::MAP_BUDGET_SPENT])
                    .inc();
            }
        }
    }

    /// Charges what accounting counted since the last take.
    fn charge_tally(&mut self) {
        // Pairs not limited (any more) are not charged: a budget a reload
        // adds starts with what is counted from then on.
        for (bucket, tokens) in self.tally.take() {
            match &mut self.fleet {
                Some(f) if f.owns(bucket) => f.charge(bucket, tokens),
                _ => self.budgets.charge(bucket, tokens),
            }
        }
        for (workload, usd) in self.tally.take_usd() {
            match &mut self.fleet {
                Some(f) if f.owns_usd(&workload) => f.charge_usd(&workload, usd),
                _ => self.budgets.charge_usd(&workload, usd),
            }
        }
    }

    /// A clean stop: fleet leases are returned, fleet connection rates
    /// given up (the kernel gets their `fleet_failure` rates), then
    /// everything is saved.
    pub async fn stop(&mut self, maps: &mut KernelMaps) {
        self.charge_tally();
        if let Some(f) = &mut self.fleet {
            f.stop().await;
        }
        if let Some(r) = &mut self.rates {
            for c in r.stop().await {
                if let Err(e) = maps.set_fleet_rate(c.bucket, c.rate, c.lease) {
                    warn!(error = %e, "could not set a fleet connection rate");
                }
            }
        }
        self.save();
    }

    /// Saves the budgets (also at a clean stop); nothing when no policy
    /// has set a budget.
    pub fn save(&self) {
        if let Some(f) = &self.fleet
            && let Err(e) = f.save(&self.state_dir)
        {
            warn!(error = %e, dir = %self.state_dir.display(), "could not save the fleet lease state");
        }
        if self.budgets.is_empty() {
            return;
        }
        if let Err(e) = self.budgets.save(&self.state_dir) {
            warn!(error = %e, dir = %self.state_dir.display(), "could not save the token budget state");
        }
    }
}
