//! Budgets in US dollars (`usd_per_day`, `usd_per_month` of
//! `[workloads.limits]`): the arithmetic a budget keeper calls, nothing
//! more (docs/exact-tokens.md, "Metrics and records"; docs/limits.md).
//!
//! Like the token budgets, each window is rolling: `usd_per_day` refills
//! continuously at that many dollars per day up to the limit,
//! `usd_per_month` per 30 days. A workload's buckets are charged with the
//! cost of each exchange read from plaintext (`exact_tokens::Charge::usd`),
//! over all its providers. When a window is at or below 0 the workload is
//! spent. Writing the spent state to the kernel, persisting it and the
//! `budget` records are the keeper's (src/budget.rs), which is not changed
//! here.

use crate::policy::UsdBudget;

const DAY: f64 = 86_400.0;
const MONTH: f64 = 30.0 * DAY;

/// The two windows of one workload.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UsdBuckets {
    /// Dollars left in each window (None: no such window); below 0 after an
    /// overspend.
    pub day: Option<f64>,
    pub month: Option<f64>,
    /// Seconds (any clock the caller keeps) of the last refill.
    at: f64,
}

impl UsdBuckets {
    /// Full buckets of `budget` at time `now` (seconds).
    pub fn new(budget: &UsdBudget, now: f64) -> Self {
        Self {
            day: budget.per_day,
            month: budget.per_month,
            at: now,
        }
    }

    fn refill(&mut self, budget: &UsdBudget, now: f64) {
        let elapsed = (now - self.at).max(0.0);
        self.at = now.max(self.at);
        let fill = |left: Option<f64>, limit: Option<f64>, window: f64| {
            limit.map(|l| (left.unwrap_or(l) + l * elapsed / window).min(l))
        };
        self.day = fill(self.day, budget.per_day, DAY);
        self.month = fill(self.month, budget.per_month, MONTH);
    }

    /// Charges `usd` at `now` (after refilling for the time passed; a
    /// budget changed by a reload applies from here, what is left capped
    /// at the new limits).
    pub fn charge(&mut self, budget: &UsdBudget, now: f64, usd: f64) {
        self.refill(budget, now);
        let usd = if usd.is_finite() { usd.max(0.0) } else { 0.0 };
        self.day = self.day.map(|d| d - usd);
        self.month = self.month.map(|m| m - usd);
    }

    /// The window that is spent at `now`: `usd_per_month` wins when both
    /// are; None: the workload may spend.
    pub fn spent(&mut self, budget: &UsdBudget, now: f64) -> Option<&'static str> {
        self.refill(budget, now);
        if self.month.is_some_and(|m| m <= 0.0) {
            Some("usd_per_month")
        } else if self.day.is_some_and(|d| d <= 0.0) {
            Some("usd_per_day")
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spending_and_refilling() {
        let b = UsdBudget {
            per_day: Some(10.0),
            per_month: Some(100.0),
        };
        let mut u = UsdBuckets::new(&b, 0.0);
        u.charge(&b, 0.0, 9.0);
        assert_eq!(u.spent(&b, 0.0), None);
        u.charge(&b, 0.0, 1.05);
        assert_eq!(u.spent(&b, 0.0), Some("usd_per_day"));
        // Refills at 10 $/day: 0.05 $ needs 432 s.
        assert_eq!(u.spent(&b, 400.0), Some("usd_per_day"));
        assert_eq!(u.spent(&b, 500.0), None);
        // The month: 100 $ spent over the days wins over the day.
        let mut u = UsdBuckets::new(&b, 0.0);
        u.charge(&b, 0.0, 100.0);
        assert_eq!(u.spent(&b, 0.0), Some("usd_per_month"));
        // Never above the limit; nonsense charges are nothing.
        let mut u = UsdBuckets::new(&b, 0.0);
        u.charge(&b, 1e9, f64::NAN);
        u.charge(&b, 1e9, -5.0);
        assert_eq!((u.day, u.month), (Some(10.0), Some(100.0)));
        // A clock that went backwards refills nothing.
        u.charge(&b, 0.0, 10.0);
        assert_eq!(u.spent(&b, 5.0), Some("usd_per_day"));
    }

    #[test]
    fn one_window_only() {
        let b = UsdBudget {
            per_day: None,
            per_month: Some(1.0),
        };
        let mut u = UsdBuckets::new(&b, 0.0);
        u.charge(&b, 0.0, 2.0);
        assert_eq!(u.day, None);
        assert_eq!(u.spent(&b, 0.0), Some("usd_per_month"));
    }
}
