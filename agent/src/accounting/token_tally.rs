//! The one path from accounting to the budget keeper (issue 17, item 2):
//! accounting adds each pair's newly counted tokens here as it counts them
//! (beside the metric it writes), and the limiter takes what accumulated
//! once a second to charge the token budgets. Metrics stay write-only: no
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
pub struct TokenTally(Arc<Mutex<HashMap<u64, u64>>>);

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
    }
}
