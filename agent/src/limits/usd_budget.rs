//! Budgets in US dollars (`usd_per_day`, `usd_per_month` of
//! `[workloads.limits]`): the two windows of one workload, as the budget
//! keeper (`crate::limits::budget`) holds, charges, refills, saves and
//! restores them (docs/limits.md, "Dollar budgets").
//!
//! Like the token budgets, each window is rolling: `usd_per_day` refills
//! continuously at that many dollars per day up to the limit,
//! `usd_per_month` per 30 days. A workload's windows are charged with the
//! cost of each exchange read from plaintext (`exact_tokens::Charge::usd`,
//! through `crate::accounting::token_tally`), over all its providers. When
//! a window is at or below 0 the workload is spent: the keeper then marks
//! every pair of the workload spent in the kernel. Only exact counts have
//! a model and hence a price: the validator accepts a dollar budget only on
//! an `exact_tokens = true` workload.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::budget::Window;
use crate::policy::UsdBudget;

const DAY: Duration = Duration::from_secs(86_400);
const MONTH: Duration = Duration::from_secs(30 * 86_400);

/// The two windows of one workload (None: no such window).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UsdWindows {
    pub(super) day: Option<Window>,
    pub(super) month: Option<Window>,
}

/// A workload's windows in the state file.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SavedUsd {
    pub(super) workload: String,
    day_remaining: Option<f64>,
    month_remaining: Option<f64>,
}

impl UsdWindows {
    /// The windows of `budget`, keeping what `old` had left (capped at the
    /// new limits); full when there is no `old`.
    pub fn keep(old: Option<&UsdWindows>, budget: &UsdBudget) -> Self {
        Self {
            day: Window::keep(old.and_then(|o| o.day), budget.per_day, DAY),
            month: Window::keep(old.and_then(|o| o.month), budget.per_month, MONTH),
        }
    }

    fn windows(&mut self) -> impl Iterator<Item = &mut Window> {
        [&mut self.day, &mut self.month].into_iter().flatten()
    }

    /// Charges `usd`; nonsense (NaN, infinite, negative) is nothing.
    pub fn charge(&mut self, usd: f64) {
        let usd = if usd.is_finite() { usd.max(0.0) } else { 0.0 };
        for w in self.windows() {
            w.remaining -= usd;
        }
    }

    pub fn refill(&mut self, elapsed: Duration) {
        for w in self.windows() {
            w.refill(elapsed);
        }
    }

    pub fn saved(&self, workload: &str) -> SavedUsd {
        SavedUsd {
            workload: workload.to_owned(),
            day_remaining: self.day.map(|w| w.remaining),
            month_remaining: self.month.map(|w| w.remaining),
        }
    }

    /// What a previous agent saved (its workload's name matched by the
    /// caller); values that are not finite are ignored, others capped.
    pub fn restore(&mut self, s: &SavedUsd) {
        for (w, r) in [
            (&mut self.day, s.day_remaining),
            (&mut self.month, s.month_remaining),
        ] {
            if let (Some(w), Some(r)) = (w.as_mut(), r)
                && r.is_finite()
            {
                w.remaining = r.min(w.limit);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Instant};

    use llm_egress_common::limit_kind;

    use super::*;
    use crate::{
        kernel::limit_entries::{Pair, bucket_id},
        limits::budget::Budgets,
        policy::Limits,
    };

    /// Workload "bot" with two providers; "other" with one, no budget.
    fn pairs(tokens_per_day: Option<u64>) -> BTreeMap<u64, (Pair, Limits)> {
        let mut out = BTreeMap::new();
        for (w, p) in [("bot", "openai"), ("bot", "anthropic"), ("other", "openai")] {
            let pair = Pair {
                workload: w.into(),
                provider: p.into(),
            };
            let limits = Limits {
                tokens_per_day: tokens_per_day.filter(|_| w == "bot" && p == "openai"),
                ..Limits::default()
            };
            out.insert(bucket_id(w, p), (pair, limits));
        }
        out
    }

    fn usd(per_day: Option<f64>, per_month: Option<f64>) -> BTreeMap<String, UsdBudget> {
        BTreeMap::from([("bot".to_string(), UsdBudget { per_day, per_month })])
    }

    #[test]
    fn a_spent_workload_refuses_every_provider_until_it_refills() {
        let mut b = Budgets::default();
        b.set_policy(&pairs(None), &usd(Some(10.0), Some(100.0)));
        let t0 = Instant::now();
        assert!(b.tick(t0).is_empty());
        b.charge_usd("bot", 9.0);
        b.charge_usd("other", 1e6);
        assert!(b.tick(t0).is_empty());
        b.charge_usd("bot", 1.05);
        let c = b.tick(t0);
        let mut spent: Vec<(&str, &str, Option<u32>)> = c
            .iter()
            .map(|c| (c.pair.workload.as_str(), c.pair.provider.as_str(), c.spent))
            .collect();
        spent.sort();
        let day = Some(limit_kind::USD_PER_DAY);
        assert_eq!(
            spent,
            vec![("bot", "anthropic", day), ("bot", "openai", day)]
        );
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.pair.workload == "bot"));
        assert_eq!(b.usd_spent_kind("bot"), Some(limit_kind::USD_PER_DAY));
        assert_eq!(b.usd_spent_kind("other"), None);
        // Refills at 10 $/day: 0.05 $ needs 432 s.
        assert!(b.tick(t0 + Duration::from_secs(400)).is_empty());
        let c = b.tick(t0 + Duration::from_secs(500));
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.spent.is_none()));
        let r = b.remaining_usd();
        assert_eq!(r.len(), 2);
        assert!(r[0].1 == "day" && r[0].2 > 0.0 && r[0].2 < 0.01, "{r:?}");
    }

    #[test]
    fn the_month_wins_and_a_token_window_still_counts() {
        let mut b = Budgets::default();
        b.set_policy(&pairs(Some(1000)), &usd(Some(10.0), Some(100.0)));
        b.charge(bucket_id("bot", "openai"), 2000);
        let t0 = Instant::now();
        let c = b.tick(t0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].spent, Some(limit_kind::TOKENS_PER_DAY));
        b.charge_usd("bot", 200.0);
        let mut c = b.tick(t0);
        c.sort_by(|a, b| a.pair.cmp(&b.pair));
        assert!(
            c.iter().all(|c| c.spent == Some(limit_kind::USD_PER_MONTH)),
            "{c:?}"
        );
        assert_eq!(c.len(), 2);
        let rec = b.record(&c[0], "t".into());
        assert_eq!(rec.limit, Some("usd_per_month"));
        assert_eq!(rec.remaining_usd_day, Some(-190.0));
        assert_eq!(rec.remaining_usd_month, Some(-100.0));
    }

    #[test]
    fn nonsense_charges_are_nothing_and_a_reload_keeps_what_is_left() {
        let mut b = Budgets::default();
        b.set_policy(&pairs(None), &usd(Some(10.0), None));
        b.charge_usd("bot", f64::NAN);
        b.charge_usd("bot", -5.0);
        b.charge_usd("bot", f64::INFINITY);
        assert_eq!(b.remaining_usd(), vec![("bot", "day", 10.0)]);
        b.charge_usd("bot", 4.0);
        // A higher limit keeps what is left, a lower one caps it.
        b.set_policy(&pairs(None), &usd(Some(50.0), None));
        assert_eq!(b.remaining_usd(), vec![("bot", "day", 6.0)]);
        b.set_policy(&pairs(None), &usd(Some(2.0), None));
        assert_eq!(b.remaining_usd(), vec![("bot", "day", 2.0)]);
        // No longer limited: the pairs go, spent ones are released.
        b.charge_usd("bot", 3.0);
        assert_eq!(b.tick(Instant::now()).len(), 2);
        let released = b.set_policy(&pairs(None), &BTreeMap::new());
        assert_eq!(released.len(), 2);
        assert!(b.remaining_usd().is_empty() && b.is_empty());
    }

    /// A fleet-wide dollar budget is kept by the fleet keeper; the
    /// workload's pairs are still kept here, spent as that keeper says.
    #[test]
    fn an_external_dollar_budget_marks_every_pair_of_its_workload() {
        let mut b = Budgets::default();
        let external = std::collections::BTreeSet::from(["bot".to_string()]);
        b.set_policy_external(&pairs(None), &BTreeMap::new(), &external);
        let t0 = Instant::now();
        assert!(b.tick(t0).is_empty());
        // Its own windows are not there: charges are the other keeper's.
        b.charge_usd("bot", 1e6);
        assert!(b.remaining_usd().is_empty());
        assert!(b.tick(t0).is_empty());
        b.set_external("bot", Some(limit_kind::USD_PER_MONTH));
        b.set_external("other", Some(limit_kind::USD_PER_MONTH));
        let c = b.tick(t0);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(
            c.iter()
                .all(|c| c.pair.workload == "bot" && c.spent == Some(limit_kind::USD_PER_MONTH))
        );
        b.set_external("bot", None);
        let c = b.tick(t0);
        assert!(c.len() == 2 && c.iter().all(|c| c.spent.is_none()));
    }

    #[test]
    fn dollars_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Budgets::default();
        b.set_policy(&pairs(None), &usd(Some(10.0), Some(100.0)));
        b.charge_usd("bot", 12.5);
        b.tick(Instant::now());
        b.save(dir.path()).unwrap();
        let text =
            std::fs::read_to_string(dir.path().join(super::super::budget::STATE_FILE)).unwrap();
        assert!(text.contains("\"month_remaining\": 87.5"), "{text}");

        let mut after = Budgets::default();
        after.set_policy(&pairs(None), &usd(Some(10.0), Some(100.0)));
        assert!(after.restore(dir.path()).unwrap());
        let r = after.remaining_usd();
        // -2.5 a day (plus the few ms since), 87.5 a month.
        assert!(r[0].2 < -2.49 && r[0].2 >= -2.5, "{r:?}");
        assert!(r[1].2 >= 87.5 && r[1].2 < 87.51, "{r:?}");
        let c = after.tick(Instant::now());
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.spent == Some(limit_kind::USD_PER_DAY)));
    }
}
