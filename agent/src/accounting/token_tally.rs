//! The one path from accounting to the budget keeper (issue 17, item 2):
//! accounting adds each pair's newly counted tokens (and each workload's
//! exact cost in dollars) here as it counts them (beside the metric it
//! writes), and the limiter takes what accumulated once a second to charge
//! the token and dollar budgets. Metrics stay write-only: no
//! budget is charged by reading `llm_egress_tokens_total` back.
//!
//! A shared owner rather than a channel: the sums by pair are what the
//! limiter needs, and a map of pairs is bounded by the policy (workloads ×
//! providers), where a queue would grow with every connection update if
//! the limiter fell behind. Nothing is lost between two takes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Tokens counted per pair (bucket id, `crate::kernel::limit_entries::bucket_id`) since
/// the last [`TokenTally::take`].
#[derive(Clone, Debug, Default)]
pub struct TokenTally(
    Arc<Mutex<HashMap<u64, u64>>>,
    Arc<Mutex<HashMap<String, f64>>>,
);

impl TokenTally {
    /// Adds `tokens` (prompt + completion) counted for workload × provider.
    pub fn add(&self, workload: &str, provider: &str, tokens: u64) {
        if tokens == 0 {
            return;
        }
        let bucket = crate::kernel::limit_entries::bucket_id(workload, provider);
        // A poisoned lock only means a panic elsewhere while holding it;
        // the sums are still sums.
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(bucket).or_default() += tokens;
    }

    /// Adds `usd`, the exact cost of an exchange of `workload` (any
    /// provider); a cost that is not a finite positive number is nothing.
    pub fn add_usd(&self, workload: &str, usd: f64) {
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let mut m = self.1.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(workload.to_owned()).or_default() += usd;
    }

    /// Dollars counted since the last take, by workload name (emptied).
    pub fn take_usd(&self) -> HashMap<String, f64> {
        let mut m = self.1.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *m)
    }

    /// What was counted since the last take, by bucket id (emptied).
    pub fn take(&self) -> HashMap<u64, u64> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_by_pair_and_a_take_empties() {
        let t = TokenTally::default();
        let other = t.clone();
        t.add("bot", "openai", 100);
        other.add("bot", "openai", 50);
        t.add("bot", "anthropic", 7);
        t.add("bot", "mistral", 0);
        let got = t.take();
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[&crate::kernel::limit_entries::bucket_id("bot", "openai")],
            150
        );
        assert_eq!(
            got[&crate::kernel::limit_entries::bucket_id("bot", "anthropic")],
            7
        );
        assert!(t.take().is_empty());
        other.add_usd("bot", 0.25);
        t.add_usd("bot", 0.5);
        t.add_usd("bot", f64::NAN);
        t.add_usd("bot", -1.0);
        assert_eq!(t.take_usd(), HashMap::from([("bot".to_string(), 0.75)]));
        assert!(t.take_usd().is_empty());
    }
}
