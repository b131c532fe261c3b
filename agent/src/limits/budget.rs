//! Token budgets (`tokens_per_minute`, `tokens_per_day`) and dollar
//! budgets (`usd_per_day`, `usd_per_month`): what each limited workload ×
//! provider pair (and each workload with a dollar budget) has left, which
//! pairs are spent (the kernel then refuses their new connections,
//! `BUDGET_SPENT`), and the state file that carries this over a restart
//! (docs/limits.md).
//!
//! A dollar budget is the workload's, over all its providers
//! (`crate::limits::usd_budget` holds its windows): every pair of the
//! workload is kept here, and is spent when its own token window or its
//! workload's dollar window is.
//!
//! Each window is a rolling budget: it refills continuously at `limit` per
//! window length, up to `limit`. Tokens are charged when the agent counts
//! them (`crate::token_tally`, estimated from encrypted traffic), i.e.
//! after the connection that used them was allowed: a pair may go below 0
//! (into debt), and stays refused until the window has refilled above 0.
//!
//! Time: while the agent runs, elapsed time is measured with the monotonic
//! clock, so wall-clock jumps change nothing. Across a restart the state
//! file records CLOCK_BOOTTIME and the boot id: on the same boot the elapsed
//! time is exact whatever the wall clock did; after a reboot it is the wall
//! clock difference, and a wall clock that went backwards refills nothing.

use std::{
    collections::BTreeMap,
    fs, io,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use llm_egress_common::limit_kind;
use serde::{Deserialize, Serialize};

use crate::{
    kernel::limit_entries::Pair,
    limits::usd_budget::{SavedUsd, UsdWindows},
    policy::{Limits, UsdBudget},
    telemetry::audit::BudgetRecord,
};

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);
/// Name of the state file under `state_dir`.
pub const STATE_FILE: &str = "budgets.json";

/// One rolling window of a pair (tokens) or of a workload (dollars).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Window {
    pub(super) limit: f64,
    length: Duration,
    /// Tokens (or dollars) left; below 0 after an overspend.
    pub(super) remaining: f64,
}

impl Window {
    pub(super) fn new(limit: f64, length: Duration) -> Self {
        Self {
            limit,
            length,
            remaining: limit,
        }
    }

    /// A window of `limit` that keeps what `old` had left (capped).
    pub(super) fn keep(old: Option<Window>, limit: Option<f64>, length: Duration) -> Option<Self> {
        limit.map(|l| {
            let mut w = Window::new(l, length);
            if let Some(o) = old {
                w.remaining = o.remaining.min(l);
            }
            w
        })
    }

    pub(super) fn refill(&mut self, elapsed: Duration) {
        let add = self.limit * elapsed.as_secs_f64() / self.length.as_secs_f64();
        self.remaining = (self.remaining + add).min(self.limit);
    }

    pub(super) fn spent(&self) -> bool {
        self.remaining <= 0.0
    }
}

#[derive(Clone, Debug, PartialEq)]
struct PairBudget {
    pair: Pair,
    minute: Option<Window>,
    day: Option<Window>,
    /// What the kernel was last told (`limit_kind` of the spent window).
    spent: Option<u32>,
}

impl PairBudget {
    /// The spent window that refills slowest, given the workload's dollar
    /// windows: a month of dollars, then a day (tokens before dollars),
    /// then a minute.
    /// `external`: the spent window of a dollar budget kept elsewhere (a
    /// fleet-wide one, `crate::limits::fleet`).
    fn spent_kind(&self, usd: Option<&UsdWindows>, external: Option<u32>) -> Option<u32> {
        let spent = |w: Option<Window>| w.is_some_and(|w| w.spent());
        if spent(usd.and_then(|u| u.month)) || external == Some(limit_kind::USD_PER_MONTH) {
            Some(limit_kind::USD_PER_MONTH)
        } else if spent(self.day) {
            Some(limit_kind::TOKENS_PER_DAY)
        } else if spent(usd.and_then(|u| u.day)) || external == Some(limit_kind::USD_PER_DAY) {
            Some(limit_kind::USD_PER_DAY)
        } else if spent(self.minute) {
            Some(limit_kind::TOKENS_PER_MINUTE)
        } else {
            None
        }
    }
}

/// A pair whose spent state changed: the kernel and the audit log are told.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub bucket: u64,
    pub pair: Pair,
    /// `Some(limit_kind)`: now spent; None: available again.
    pub spent: Option<u32>,
}

#[derive(Default)]
pub struct Budgets {
    pairs: BTreeMap<u64, PairBudget>,
    /// Dollar windows by workload name.
    usd: BTreeMap<String, UsdWindows>,
    /// Workloads whose dollar budget is kept by the fleet keeper: their
    /// pairs are kept here, spent when that keeper says (`set_external`).
    external: BTreeMap<String, Option<u32>>,
    last: Option<Instant>,
}

/// What the state file holds.
#[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
struct StateFile {
    boot_id: String,
    boottime_ns: u64,
    wall_unix_ns: u128,
    pairs: Vec<SavedPair>,
    /// Dollar budgets by workload (absent in files of older agents).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    usd: Vec<SavedUsd>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SavedPair {
    workload: String,
    provider: String,
    minute_remaining: Option<f64>,
    day_remaining: Option<f64>,
}

impl Budgets {
    /// Follows a (new) policy: pairs with token budgets, and every pair of
    /// a workload with a dollar budget (`usd`, by workload), are kept with
    /// what they have left (capped by a lower new limit), new ones start
    /// full, others are dropped. Returns the pairs that are no longer
    /// limited but were spent (to be released in the kernel).
    pub fn set_policy(
        &mut self,
        pairs: &BTreeMap<u64, (Pair, Limits)>,
        usd: &BTreeMap<String, UsdBudget>,
    ) -> Vec<Change> {
        self.set_policy_external(pairs, usd, &std::collections::BTreeSet::new())
    }

    /// [`Budgets::set_policy`], where the workloads `external` have a dollar
    /// budget kept elsewhere: their pairs are kept here too, spent as
    /// [`Budgets::set_external`] says.
    pub fn set_policy_external(
        &mut self,
        pairs: &BTreeMap<u64, (Pair, Limits)>,
        usd: &BTreeMap<String, UsdBudget>,
        external: &std::collections::BTreeSet<String>,
    ) -> Vec<Change> {
        self.external = (external.iter())
            .map(|w| (w.clone(), self.external.get(w).copied().flatten()))
            .collect();
        let mut released = Vec::new();
        let mut next = BTreeMap::new();
        for (bucket, (pair, limits)) in pairs {
            if limits.tokens_per_minute.is_none()
                && limits.tokens_per_day.is_none()
                && !usd.contains_key(&pair.workload)
                && !external.contains(&pair.workload)
            {
                continue;
            }
            let old = self.pairs.remove(bucket);
            let tokens = |l: Option<u64>| l.map(|l| l as f64);
            next.insert(
                *bucket,
                PairBudget {
                    pair: pair.clone(),
                    minute: Window::keep(
                        old.as_ref().and_then(|o| o.minute),
                        tokens(limits.tokens_per_minute),
                        MINUTE,
                    ),
                    day: Window::keep(
                        old.as_ref().and_then(|o| o.day),
                        tokens(limits.tokens_per_day),
                        DAY,
                    ),
                    spent: old.and_then(|o| o.spent),
                },
            );
        }
        self.usd = usd
            .iter()
            .map(|(w, b)| (w.clone(), UsdWindows::keep(self.usd.get(w), b)))
            .collect();
        for (bucket, old) in std::mem::take(&mut self.pairs) {
            if old.spent.is_some() {
                released.push(Change {
                    bucket,
                    pair: old.pair,
                    spent: None,
                });
            }
        }
        self.pairs = next;
        released
    }

    /// Pairs the kernel says are spent that this agent does not (left by a
    /// previous agent, or no longer limited): set so that `tick` tells the
    /// kernel the truth.
    pub fn adopt_kernel_state(&mut self, kernel: &BTreeMap<u64, u32>) -> Vec<Change> {
        let mut out = Vec::new();
        for (bucket, kind) in kernel {
            match self.pairs.get_mut(bucket) {
                Some(p) => p.spent = Some(*kind),
                None => out.push(Change {
                    bucket: *bucket,
                    pair: Pair {
                        workload: String::new(),
                        provider: String::new(),
                    },
                    spent: None,
                }),
            }
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The window that is spent of pair `bucket` (as of the last `tick`).
    pub fn spent_kind(&self, bucket: u64) -> Option<u32> {
        self.pairs
            .get(&bucket)
            .and_then(|p| p.spent_kind(self.usd.get(&p.pair.workload), None))
    }

    /// The spent window of `workload`'s dollar budget, if it is spent.
    pub fn usd_spent_kind(&self, workload: &str) -> Option<u32> {
        let u = self.usd.get(workload)?;
        let spent = |w: Option<Window>| w.is_some_and(|w| w.spent());
        if spent(u.month) {
            Some(limit_kind::USD_PER_MONTH)
        } else if spent(u.day) {
            Some(limit_kind::USD_PER_DAY)
        } else {
            None
        }
    }

    /// What the keeper of `workload`'s external dollar budget says: the
    /// spent window, or None (applied at the next `tick`).
    pub fn set_external(&mut self, workload: &str, spent: Option<u32>) {
        if let Some(e) = self.external.get_mut(workload) {
            *e = spent;
        }
    }

    /// Charges `usd` dollars to `workload`'s dollar budget (nothing if it
    /// has none; a charge that is not a finite positive number is 0).
    pub fn charge_usd(&mut self, workload: &str, usd: f64) {
        if let Some(u) = self.usd.get_mut(workload) {
            u.charge(usd);
        }
    }

    /// Charges `tokens` to pair `bucket`.
    pub fn charge(&mut self, bucket: u64, tokens: u64) {
        if let Some(p) = self.pairs.get_mut(&bucket) {
            for w in [&mut p.minute, &mut p.day].into_iter().flatten() {
                w.remaining -= tokens as f64;
            }
        }
    }

    /// Refills every window to `now` and returns the pairs whose spent
    /// state changed.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let elapsed = self
            .last
            .map(|l| now.saturating_duration_since(l))
            .unwrap_or_default();
        self.last = Some(now);
        self.refill(elapsed);
        let mut out = Vec::new();
        for (bucket, p) in &mut self.pairs {
            let external = self.external.get(&p.pair.workload).copied().flatten();
            let kind = p.spent_kind(self.usd.get(&p.pair.workload), external);
            if kind != p.spent {
                p.spent = kind;
                out.push(Change {
                    bucket: *bucket,
                    pair: p.pair.clone(),
                    spent: kind,
                });
            }
        }
        out
    }

    fn refill(&mut self, elapsed: Duration) {
        for p in self.pairs.values_mut() {
            for w in [&mut p.minute, &mut p.day].into_iter().flatten() {
                w.refill(elapsed);
            }
        }
        for u in self.usd.values_mut() {
            u.refill(elapsed);
        }
    }

    /// Tokens left per pair and window ("minute", "day"), for the gauge.
    pub fn remaining(&self) -> Vec<(&Pair, &'static str, f64)> {
        let mut out = Vec::new();
        for p in self.pairs.values() {
            if let Some(w) = p.minute {
                out.push((&p.pair, "minute", w.remaining));
            }
            if let Some(w) = p.day {
                out.push((&p.pair, "day", w.remaining));
            }
        }
        out
    }

    /// Dollars left per workload and window ("day", "month"), for the gauge.
    pub fn remaining_usd(&self) -> Vec<(&str, &'static str, f64)> {
        let mut out = Vec::new();
        for (workload, u) in &self.usd {
            for (name, w) in [("day", u.day), ("month", u.month)] {
                if let Some(w) = w {
                    out.push((workload.as_str(), name, w.remaining));
                }
            }
        }
        out
    }

    /// The audit record of a change.
    pub fn record(&self, change: &Change, time: String) -> BudgetRecord {
        let p = self.pairs.get(&change.bucket);
        let u = self.usd.get(&change.pair.workload);
        BudgetRecord {
            event: "budget",
            time,
            workload: change.pair.workload.clone(),
            provider: change.pair.provider.clone(),
            state: if change.spent.is_some() {
                "spent"
            } else {
                "available"
            },
            limit: change.spent.map(llm_egress_common::limit_kind::name),
            remaining_minute: p.and_then(|p| p.minute).map(|w| w.remaining.floor() as i64),
            remaining_day: p.and_then(|p| p.day).map(|w| w.remaining.floor() as i64),
            remaining_usd_day: u.and_then(|u| u.day).map(|w| w.remaining),
            remaining_usd_month: u.and_then(|u| u.month).map(|w| w.remaining),
        }
    }

    /// Writes the state file (atomically: a temporary file renamed over it).
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let clock = Clock::now();
        let state = StateFile {
            boot_id: clock.boot_id,
            boottime_ns: clock.boottime_ns,
            wall_unix_ns: clock.wall_unix_ns,
            pairs: self
                .pairs
                .values()
                .map(|p| SavedPair {
                    workload: p.pair.workload.clone(),
                    provider: p.pair.provider.clone(),
                    minute_remaining: p.minute.map(|w| w.remaining),
                    day_remaining: p.day.map(|w| w.remaining),
                })
                .collect(),
            usd: self.usd.iter().map(|(w, u)| u.saved(w)).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&state).map_err(io::Error::other)?;
        crate::state_file::write_private(dir, STATE_FILE, &bytes)
    }

    /// Restores what a previous agent saved for the pairs of the current
    /// policy (call after `set_policy`), refilled by the time that passed.
    /// A missing file is no error; an unreadable one is reported and
    /// ignored (every budget starts full).
    pub fn restore(&mut self, dir: &Path) -> Result<bool, String> {
        let path = dir.join(STATE_FILE);
        let Some(text) = crate::state_file::read_optional(dir, STATE_FILE)? else {
            return Ok(false);
        };
        let saved: StateFile =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let elapsed = Clock::now().since(&saved);
        for s in &saved.pairs {
            let bucket = crate::kernel::limit_entries::bucket_id(&s.workload, &s.provider);
            let Some(p) = self.pairs.get_mut(&bucket) else {
                continue;
            };
            for (w, r) in [
                (&mut p.minute, s.minute_remaining),
                (&mut p.day, s.day_remaining),
            ] {
                if let (Some(w), Some(r)) = (w.as_mut(), r)
                    && r.is_finite()
                {
                    w.remaining = r.min(w.limit);
                }
            }
        }
        for s in &saved.usd {
            if let Some(u) = self.usd.get_mut(&s.workload) {
                u.restore(s);
            }
        }
        self.refill(elapsed);
        Ok(true)
    }
}

/// The clocks a saved state is compared by.
struct Clock {
    boot_id: String,
    boottime_ns: u64,
    wall_unix_ns: u128,
}

impl Clock {
    fn now() -> Self {
        let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        Self {
            boot_id,
            boottime_ns: ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            wall_unix_ns: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        }
    }

    /// Time since `saved` was written: CLOCK_BOOTTIME on the same boot,
    /// else the wall clock (0 if it went backwards).
    fn since(&self, saved: &StateFile) -> Duration {
        if !saved.boot_id.is_empty() && saved.boot_id == self.boot_id {
            Duration::from_nanos(self.boottime_ns.saturating_sub(saved.boottime_ns))
        } else {
            let ns = self.wall_unix_ns.saturating_sub(saved.wall_unix_ns);
            Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(minute: Option<u64>, day: Option<u64>) -> BTreeMap<u64, (Pair, Limits)> {
        let pair = Pair {
            workload: "bot".into(),
            provider: "openai".into(),
        };
        let limits = Limits {
            tokens_per_minute: minute,
            tokens_per_day: day,
            ..Limits::default()
        };
        BTreeMap::from([(
            crate::kernel::limit_entries::bucket_id("bot", "openai"),
            (pair, limits),
        )])
    }

    fn set(b: &mut Budgets, pairs: BTreeMap<u64, (Pair, Limits)>) -> Vec<Change> {
        b.set_policy(&pairs, &BTreeMap::new())
    }

    #[test]
    fn spending_the_minute_budget_refuses_until_it_refills() {
        let mut b = Budgets::default();
        set(&mut b, pairs(Some(600), None));
        let id = crate::kernel::limit_entries::bucket_id("bot", "openai");
        let t0 = Instant::now();
        assert!(b.tick(t0).is_empty());
        b.charge(id, 650);
        let c = b.tick(t0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].spent, Some(limit_kind::TOKENS_PER_MINUTE));
        // 600 a minute = 10 a second: -50 needs 5 s to get back above 0.
        assert!(b.tick(t0 + Duration::from_secs(4)).is_empty());
        let c = b.tick(t0 + Duration::from_millis(5_100));
        assert_eq!(c[0].spent, None);
        // A long pause refills to the limit, not beyond.
        b.tick(t0 + Duration::from_secs(3600));
        assert_eq!(b.remaining()[0].2, 600.0);
    }

    #[test]
    fn the_day_window_wins_when_both_are_spent() {
        let mut b = Budgets::default();
        set(&mut b, pairs(Some(100), Some(150)));
        let id = crate::kernel::limit_entries::bucket_id("bot", "openai");
        b.charge(id, 200);
        let c = b.tick(Instant::now());
        assert_eq!(c[0].spent, Some(limit_kind::TOKENS_PER_DAY));
    }

    #[test]
    fn a_reload_keeps_what_is_left_and_releases_pairs_no_longer_limited() {
        let mut b = Budgets::default();
        set(&mut b, pairs(Some(1000), None));
        let id = crate::kernel::limit_entries::bucket_id("bot", "openai");
        b.charge(id, 1200);
        assert_eq!(b.tick(Instant::now()).len(), 1);
        // Same pair, higher limit: still 200 in debt, still spent.
        assert!(set(&mut b, pairs(Some(5000), None)).is_empty());
        assert_eq!(b.remaining()[0].2, -200.0);
        assert!(b.tick(Instant::now()).is_empty());
        // No longer limited: released.
        let released = b.set_policy(&BTreeMap::new(), &BTreeMap::new());
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].spent, None);
        assert!(b.remaining().is_empty());
    }

    #[test]
    fn a_lower_limit_caps_what_is_left() {
        let mut b = Budgets::default();
        set(&mut b, pairs(Some(1000), None));
        set(&mut b, pairs(Some(10), None));
        assert_eq!(b.remaining()[0].2, 10.0);
    }

    #[test]
    fn state_survives_a_restart_and_refills_by_the_time_passed() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Budgets::default();
        set(&mut b, pairs(Some(60_000), Some(1_000_000)));
        let id = crate::kernel::limit_entries::bucket_id("bot", "openai");
        b.charge(id, 100_000);
        b.tick(Instant::now());
        b.save(dir.path()).unwrap();

        let mut after = Budgets::default();
        set(&mut after, pairs(Some(60_000), Some(1_000_000)));
        assert!(after.restore(dir.path()).unwrap());
        let r = after.remaining();
        // Restored: -40,000 a minute (plus the few ms since), 900,000 a day.
        assert!(r[0].2 < -39_000.0 && r[0].2 > -40_000.0, "{r:?}");
        assert!(r[1].2 >= 900_000.0 && r[1].2 < 900_100.0, "{r:?}");
        let c = after.tick(Instant::now());
        assert_eq!(c[0].spent, Some(limit_kind::TOKENS_PER_MINUTE));
    }

    #[test]
    fn a_wall_clock_that_went_backwards_refills_nothing_after_a_reboot() {
        let now = Clock::now();
        let saved = StateFile {
            boot_id: "another boot".into(),
            boottime_ns: 0,
            wall_unix_ns: now.wall_unix_ns + 3_600_000_000_000,
            pairs: vec![],
            usd: vec![],
        };
        assert_eq!(now.since(&saved), Duration::ZERO);
        let same_boot = StateFile {
            boot_id: now.boot_id.clone(),
            boottime_ns: now.boottime_ns - 5_000_000_000,
            // A wall clock far in the future does not matter on the same boot.
            wall_unix_ns: now.wall_unix_ns + 3_600_000_000_000,
            pairs: vec![],
            usd: vec![],
        };
        assert_eq!(now.since(&same_boot), Duration::from_secs(5));
    }

    #[test]
    fn a_corrupt_state_file_is_reported_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(STATE_FILE), b"{not json").unwrap();
        let mut b = Budgets::default();
        set(&mut b, pairs(Some(10), None));
        assert!(b.restore(dir.path()).is_err());
        assert_eq!(b.remaining()[0].2, 10.0);
    }
}
