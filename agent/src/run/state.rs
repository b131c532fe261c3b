//! What the running agent enforces and what it was built from: the policy
//! and its generation, the workload cgroups found, the provider addresses
//! resolved; and the plan (kernel entries) they make together.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use tracing::warn;

use crate::{
    attribution::{
        cgroups::{self, Selectors},
        kube,
        process::CgroupPaths,
    },
    kernel::plan::{self, Plan},
    names::resolver::{self, HostAddrs},
    policy::Policy,
    telemetry::metrics::Metrics,
};

/// What the agent currently enforces, and what it was built from.
pub(super) struct State {
    pub(super) policy: Policy,
    pub(super) generation: u64,
    pub(super) selectors: Selectors,
    pub(super) cgroups: BTreeMap<u64, usize>,
    pub(super) hosts: HostAddrs,
    pub(super) attach: PathBuf,
    pub(super) attach_id: u64,
    pub(super) root_rel: String,
    /// The node's pods, for `k8s` selectors.
    pub(super) pods: kube::Pods,
    /// Pod uids of cgroups that the pod list lacked at the last scan (a
    /// refresh was asked for each once).
    pub(super) unknown_pods: BTreeSet<String>,
    /// Seed of the name hashes in `NAMES` (kept in the pinned `NAME_CFG`).
    pub(super) name_seed: u64,
}

impl State {
    pub(super) fn plan(&self) -> Plan {
        let resolved: BTreeMap<usize, BTreeSet<IpAddr>> =
            resolver::by_provider(&self.policy, &self.hosts);
        let mut plan = plan::build(&self.policy, self.generation, &self.cgroups, &resolved);
        plan.names = plan::names(&self.policy, self.name_seed);
        for (prefix, kept, dropped) in &plan.dest_conflicts {
            warn!(?prefix, kept = %kept, dropped = %dropped, "destination claimed by two providers; the first in catalog order is used");
        }
        plan
    }

    /// Rescans the attach cgroup; true if the workload assignment changed.
    pub(super) fn rescan(&mut self, paths: &CgroupPaths, metrics: &Metrics) -> bool {
        let dirs = cgroups::scan(&self.attach);
        paths.replace(cgroups::paths(&self.root_rel, &dirs));
        let pods = self.pods.snapshot();
        let assigned = self.selectors.assign(&dirs, &pods);
        if self.pods.enabled() {
            let unknown: BTreeSet<String> =
                cgroups::unknown_pods(&dirs, &pods).into_iter().collect();
            if !unknown.is_subset(&self.unknown_pods) {
                self.pods.request_refresh();
            }
            self.unknown_pods = unknown;
        }
        let changed = assigned != self.cgroups;
        self.cgroups = assigned;
        metrics.workload_cgroups.reset();
        for (i, w) in self.policy.workloads.iter().enumerate() {
            let n = self.cgroups.values().filter(|&&v| v == i).count();
            metrics
                .workload_cgroups
                .with_label_values(&[&w.name])
                .set(n as i64);
        }
        changed
    }

    pub(super) fn report_missing_workloads(&self) {
        for (i, w) in self.policy.workloads.iter().enumerate() {
            if !self.cgroups.values().any(|&v| v == i) {
                warn!(workload = %w.name, selector = ?w.selector, "no cgroup matches this workload yet; it applies when one appears");
            }
        }
    }
}
