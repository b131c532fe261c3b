//! Workload and provider names by policy generation: events carry the
//! generation that decided them and are named from its table (the last few
//! are kept), so a reload never relabels decisions taken under the previous
//! policy.

use std::{
    collections::VecDeque,
    sync::{Arc, RwLock},
};

use llm_egress_common::{NO_PROVIDER, NO_WORKLOAD};

use crate::policy::{NO_WORKLOAD_NAME, Policy};

/// Names of one policy generation, indexed by id - 1.
#[derive(Debug, Default)]
pub struct NameTable {
    pub generation: u64,
    pub workloads: Vec<String>,
    pub providers: Vec<String>,
}

impl NameTable {
    pub fn of(policy: &Policy, generation: u64) -> Self {
        Self {
            generation,
            workloads: policy.workloads.iter().map(|w| w.name.clone()).collect(),
            providers: policy.providers.iter().map(|p| p.name.clone()).collect(),
        }
    }
}

/// The name tables of recent generations.
#[derive(Clone, Default)]
pub struct Names(Arc<RwLock<VecDeque<Arc<NameTable>>>>);

const KEPT_GENERATIONS: usize = 8;

impl Names {
    pub fn push(&self, table: NameTable) {
        if let Ok(mut g) = self.0.write() {
            g.push_front(Arc::new(table));
            g.truncate(KEPT_GENERATIONS);
        }
    }

    /// The table of `generation`; an unknown one (decided before this agent
    /// started) uses the newest table: ids follow policy order, so they
    /// agree whenever the policy file did not change.
    pub(super) fn table(&self, generation: u64) -> Option<Arc<NameTable>> {
        let g = self.0.read().ok()?;
        g.iter()
            .find(|t| t.generation == generation)
            .or_else(|| g.front())
            .cloned()
    }
}

/// Workload and provider names of ids decided under `generation`.
pub fn names_of(
    names: &Names,
    generation: u64,
    workload_id: u32,
    provider_id: u32,
) -> (String, Option<String>) {
    let table = names.table(generation);
    let name = |list: fn(&NameTable) -> &Vec<String>, id: u32| {
        table
            .as_ref()
            .and_then(|t| list(t).get(id as usize - 1).cloned())
            .unwrap_or_else(|| format!("#{id}"))
    };
    let workload = if workload_id == NO_WORKLOAD {
        NO_WORKLOAD_NAME.to_string()
    } else {
        name(|t| &t.workloads, workload_id)
    };
    let provider = (provider_id != NO_PROVIDER).then(|| name(|t| &t.providers, provider_id));
    (workload, provider)
}
