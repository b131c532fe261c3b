//! A new policy while running (SIGHUP, or the file changed): read and
//! checked like at start, restart-only keys kept at their running values
//! (one list: [`keep_restart_only`]), written to the idle slot and
//! activated; a policy that is invalid, needs a program that is not
//! running, or does not fit the maps leaves the previous one in force.

use std::{fs, path::Path};

use tracing::{error, info, warn};

use super::{
    RunError, Running,
    args::load_policy,
    handlers::{record_occupancy, record_writes, set_trusted_resolvers},
};
use crate::{
    attribution::cgroups::Selectors,
    events::names::NameTable,
    kernel::{plan, programs},
    names::resolver::Resolver,
    policy::Policy,
};

/// The policy file's content, hashed (FNV-1a): a write of the same bytes
/// is no change.
pub(super) fn content_hash(path: &Path) -> Option<u64> {
    let bytes = fs::read(path).ok()?;
    Some(bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    }))
}

/// Keeps in `next` the running values of the keys that change only on
/// restart (the one list of them: docs/policy.md says the same), and
/// returns the names of those `next` would have changed.
fn keep_restart_only(next: &mut Policy, running: &Policy) -> Vec<&'static str> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident => $name:literal),* $(,)?) => {$(
            if next.$field != running.$field {
                changed.push($name);
                next.$field = running.$field.clone();
            }
        )*};
    }
    keep!(
        cgroup => "cgroup",
        pin_path => "pin_path",
        metrics_listen => "metrics_listen",
        failure_mode => "failure_mode",
        audit_log => "audit_log",
        programs => "programs",
        kubernetes => "[kubernetes]",
        fleet => "[fleet]",
    );
    changed
}

impl Running {
    /// Reads the policy again and applies it (`why`: the trigger, logged).
    pub(super) async fn reload(&mut self, why: &'static str) -> Result<(), RunError> {
        self.file_hash = self.args.config.as_deref().and_then(content_hash);
        let loaded = load_policy(&self.args)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                // A policy that needs a program that is not running is refused
                // like an invalid one: applying it would enforce less than it says.
                programs::check(&new, &self.unavailable).map_err(|e| e.to_string())?;
                // The same paths as at start: state_dir may change here.
                crate::policy::ownership::check_policy(&new, self.args.config.as_deref())
                    .map(|()| new)
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Err(e) => {
                self.metrics
                    .policy_reloads
                    .with_label_values(&["invalid"])
                    .inc();
                error!(trigger = why, error = %e, "new policy rejected; the previous policy stays in force");
                if let Ok(mut g) = self.health.policy_error.lock() {
                    *g = Some(e);
                }
            }
            Ok(new) => {
                let mut next = new;
                let kept = keep_restart_only(&mut next, &self.state.policy);
                if !kept.is_empty() {
                    warn!(keys = ?kept, "these keys change only on restart; keeping the running values");
                }
                if next == self.state.policy {
                    // The same policy again (a SIGHUP after an edit that the
                    // file watch already applied; an edit undone): no new
                    // generation; a SIGHUP still resolves the hosts again.
                    info!(
                        trigger = why,
                        generation = self.state.generation,
                        "policy unchanged; nothing to apply"
                    );
                    self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
                    if let Ok(mut g) = self.health.policy_error.lock() {
                        *g = None;
                    }
                    if why == "SIGHUP" {
                        self.resolve();
                    }
                    return Ok(());
                }
                let old_resolver = self.state.policy.resolver.clone();
                let old = std::mem::replace(&mut self.state.policy, next);
                self.state.generation += 1;
                self.state.selectors = Selectors::new(&self.state.policy);
                self.state.rescan(&self.paths, &self.metrics);
                self.names
                    .push(NameTable::of(&self.state.policy, self.state.generation));
                let report = self.maps.apply_policy(
                    self.state.plan(),
                    plan::failure_code(self.state.policy.failure_mode),
                    self.state.attach_id,
                )?;
                record_writes(&report, &self.metrics);
                if report.is_ok() {
                    self.metrics.policy_reloads.with_label_values(&["ok"]).inc();
                    self.metrics
                        .policy_generation
                        .set(self.state.generation as i64);
                    record_occupancy(&self.maps, &self.metrics);
                    if let Ok(mut g) = self.health.policy_error.lock() {
                        *g = None;
                    }
                    self.state.report_missing_workloads();
                    self.sync_plaintext();
                    self.limiter.set_policy(
                        &self.maps.applied_limits(),
                        self.state.policy.state_dir.clone(),
                        &mut self.maps,
                        &self.metrics,
                    );
                    let _ = self.telemetry_tx.send((
                        std::sync::Arc::new(self.state.policy.clone()),
                        self.state.generation,
                    ));
                    info!(
                        trigger = why,
                        generation = self.state.generation,
                        "policy applied"
                    );
                    if let Err(e) = self
                        .maps
                        .set_learned_ttl(self.state.policy.resolver.learned_ttl)
                    {
                        warn!(error = %e, "could not update the TTL bounds of learned addresses");
                    }
                    if let Err(e) = set_trusted_resolvers(&mut self.maps, &self.state.policy) {
                        warn!(error = %e, "could not update the resolvers answers are learned from");
                    }
                    if self.state.policy.resolver != old_resolver {
                        self.resolver = Resolver::new(&self.state.policy.resolver)
                            .map_err(|e| RunError::Resolver(e.to_string()))?;
                        self.sources.refresh =
                            tokio::time::interval(self.state.policy.resolver.refresh);
                        self.sources.refresh.tick().await;
                    }
                    self.resolve();
                } else {
                    self.metrics
                        .policy_reloads
                        .with_label_values(&["failed"])
                        .inc();
                    error!(
                        trigger = why,
                        "new policy does not fit in the kernel maps; the previous policy stays in force"
                    );
                    self.state.policy = old;
                    self.state.generation -= 1;
                    self.state.selectors = Selectors::new(&self.state.policy);
                    self.state.rescan(&self.paths, &self.metrics);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every restart-only key of a reloaded policy keeps its running value
    /// and is named; everything else comes from the new file.
    #[test]
    fn a_reload_keeps_each_restart_only_key_and_names_it() {
        let running = Policy::parse(
            r#"cgroup = "/sys/fs/cgroup/a"
pin_path = "/sys/fs/bpf/a"
metrics_listen = "127.0.0.1:9001"
failure_mode = "closed"
audit_log = "-"
programs = "all"
mode = "enforce"
"#,
            "running",
        )
        .unwrap();
        let mut next = Policy::parse(
            r#"cgroup = "/sys/fs/cgroup/b"
pin_path = "/sys/fs/bpf/b"
metrics_listen = "127.0.0.1:9002"
failure_mode = "open"
audit_log = "off"
programs = "connect"
mode = "audit"
[kubernetes]
node_name = "n1"
[fleet]
servers = ["redis://10.0.0.5"]
"#,
            "next",
        )
        .unwrap();
        let kept = keep_restart_only(&mut next, &running);
        assert_eq!(
            kept,
            [
                "cgroup",
                "pin_path",
                "metrics_listen",
                "failure_mode",
                "audit_log",
                "programs",
                "[kubernetes]",
                "[fleet]"
            ]
        );
        let mut expected = running.clone();
        expected.mode = next.mode;
        assert_eq!(next, expected, "only `mode` comes from the new file");
        assert!(keep_restart_only(&mut next, &running).is_empty());
    }
}
