//! What the running agent does for each change ([`Running::serve`]): a
//! rescan of workload cgroups, a resolver round's addresses, a DNS answer
//! for the agent's parser, the 1 s tick (kernel counters into metrics, the
//! budget keeper, the policy file's hash); and the clean stop.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::atomic::Ordering,
};

use tracing::{error, info, warn};

use super::{Resolved, RunError, Running, state::State};
use crate::{
    attribution::process::CgroupPaths,
    capture::{
        attach::Attacher,
        reader::{self, ExecReport},
    },
    events::{decode::DnsAnswer, names::names_of},
    kernel::maps::{KernelMaps, MapsError, WriteReport},
    policy::{OnExit, Policy},
    telemetry::metrics::Metrics,
};

/// Tells the plaintext attacher which workloads have `exact_tokens` and
/// which cgroups they hold now (docs/plaintext.md).
pub(super) fn sync_plaintext(
    attacher: Option<&mut Attacher>,
    ebpf: &mut aya::Ebpf,
    state: &State,
    paths: &CgroupPaths,
) {
    let Some(attacher) = attacher else { return };
    let mut exact: BTreeMap<usize, (u32, String, Vec<String>)> = BTreeMap::new();
    for (&id, &idx) in &state.cgroups {
        let Some(w) = state.policy.workloads.get(idx).filter(|w| w.exact_tokens) else {
            continue;
        };
        let entry = exact
            .entry(idx)
            .or_insert_with(|| (idx as u32 + 1, w.name.clone(), Vec::new()));
        if let Some(p) = paths.path_of(id, 0) {
            entry.2.push(p);
        }
    }
    let exact: Vec<_> = exact.into_values().collect();
    if let Err(e) = attacher.set_workloads(ebpf, state.generation, &exact) {
        warn!(error = %e, "plaintext: could not apply the exact_tokens workloads");
    }
}

/// Ticks (seconds) between two counts of the learned destinations (a walk
/// of up to 2 × 65,536 entries).
const LEARNED_COUNT_TICKS: u64 = 10;

/// At stop, how long the plaintext reader gets to report the processes it
/// paused at exec (it needs one read of the ring).
const STOP_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// One change, as [`Running::next_change`] saw it.
enum Change {
    Stop,
    /// A new policy may be there (the trigger's name).
    Reload(&'static str),
    /// The workload cgroups or the pod list changed.
    Workloads,
    DnsAnswer(DnsAnswer),
    Resolved(Resolved),
    /// Time for a resolver round.
    Refresh,
    /// The fleet ledger answered.
    FleetAnswer,
    /// A process exec'd in an `exact_tokens` workload.
    Exec(ExecReport),
    Tick,
    /// An event that changed nothing (the policy file written with the
    /// same content).
    Nothing,
}

impl Running {
    /// Reacts to changes until SIGTERM or SIGINT.
    pub(super) async fn serve(&mut self) -> Result<(), RunError> {
        loop {
            match self.next_change().await {
                Change::Stop => return Ok(()),
                Change::Reload(why) => self.reload(why).await?,
                Change::Workloads => self.rescan()?,
                Change::DnsAnswer(answer) => {
                    learn_unparsed(&mut self.maps, self.state.name_seed, &answer, &self.metrics)
                }
                Change::Resolved(r) => self.resolved(r)?,
                Change::Refresh => self.resolve(),
                Change::Exec(report) => match self.attacher.as_mut() {
                    Some(a) => a.on_exec(&mut self.loader.ebpf, report),
                    None if report.paused => reader::resume(report.pid),
                    None => {}
                },
                Change::FleetAnswer => {
                    self.limiter
                        .fleet_answered(&mut self.maps, &self.metrics, &self.audit);
                    self.report_fleet();
                }
                Change::Nothing => {}
                Change::Tick => {
                    if let Some(why) = self.tick() {
                        self.reload(why).await?;
                    }
                }
            }
        }
    }

    async fn next_change(&mut self) -> Change {
        let s = &mut self.sources;
        tokio::select! {
            _ = s.hup.recv() => Change::Reload("SIGHUP"),
            _ = s.term.recv() => Change::Stop,
            _ = s.int.recv() => Change::Stop,
            Some(()) = s.pod_changes.recv() => Change::Workloads,
            Some(()) = s.cgroup_changes.recv() => Change::Workloads,
            Some(answer) = s.dns_answers.recv() => Change::DnsAnswer(answer),
            Some(report) = s.execs_paused.recv() => Change::Exec(report),
            Some(r) = s.resolved.recv() => Change::Resolved(r),
            Some(()) = async {
                match s.file_changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let now = self.args.config.as_deref().and_then(super::reload::content_hash);
                if now.is_some() && now != self.file_hash {
                    Change::Reload("file changed")
                } else {
                    Change::Nothing
                }
            }
            () = async {
                match &s.fleet_wake {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            } => Change::FleetAnswer,
            _ = s.refresh.tick() => Change::Refresh,
            _ = s.tick.tick() => Change::Tick,
        }
    }

    /// Workload cgroups (or the pods behind them) changed: a new plan if
    /// the assignment did.
    fn rescan(&mut self) -> Result<(), RunError> {
        if self.state.rescan(&self.paths, &self.metrics) {
            let report = self.maps.apply_update(self.state.plan())?;
            record_writes(&report, &self.metrics);
            record_occupancy(&self.maps, &self.metrics);
            self.sync_plaintext();
        }
        Ok(())
    }

    /// Tells the plaintext attacher the `exact_tokens` workloads' cgroups.
    pub(super) fn sync_plaintext(&mut self) {
        sync_plaintext(
            self.attacher.as_mut(),
            &mut self.loader.ebpf,
            &self.state,
            &self.paths,
        );
    }

    /// Starts a resolver round for the current policy's hosts; its result
    /// comes back as [`Change::Resolved`].
    pub(super) fn resolve(&self) {
        let (r, tx, hosts, previous, generation) = (
            self.resolver.clone(),
            self.resolved_tx.clone(),
            crate::names::resolver::hosts_of(&self.state.policy),
            self.state.hosts.clone(),
            self.state.generation,
        );
        tokio::spawn(async move {
            let (addrs, failures) = r.resolve(hosts, &previous).await;
            let _ = tx.send((generation, addrs, failures)).await;
        });
    }

    /// A resolver round's addresses: a new plan if they changed (rounds of
    /// an older generation are stale).
    fn resolved(&mut self, (generation, hosts, failures): Resolved) -> Result<(), RunError> {
        self.metrics.resolver_failures.inc_by(failures);
        if generation == self.state.generation && hosts != self.state.hosts {
            self.state.hosts = hosts;
            self.metrics
                .resolved_addresses
                .set(self.state.hosts.values().map(BTreeSet::len).sum::<usize>() as i64);
            let report = self.maps.apply_update(self.state.plan())?;
            record_writes(&report, &self.metrics);
            record_occupancy(&self.maps, &self.metrics);
        }
        Ok(())
    }

    /// The 1 s tick: kernel counters and verdicts into metrics, the budget
    /// keeper, liveness of the event reader; and the policy file's hash
    /// (for file systems without inotify). Returns a reload trigger when
    /// the file changed.
    fn tick(&mut self) -> Option<&'static str> {
        if let Ok(c) = self.maps.counters() {
            self.metrics.sync_kernel(&c);
        }
        if self.ticks.is_multiple_of(LEARNED_COUNT_TICKS) {
            let (v4, v6) = self.maps.learned_counts();
            let learned = &self.metrics.learned_destinations;
            learned.with_label_values(&["v4"]).set(v4 as i64);
            learned.with_label_values(&["v6"]).set(v6 as i64);
        }
        self.ticks += 1;
        let names = &self.names;
        self.metrics
            .sync_verdicts(&self.maps.verdict_counts(), |k| {
                let (w, p) = names_of(names, k.generation, k.workload_id, k.provider_id);
                [
                    w,
                    p.unwrap_or_else(|| "none".into()),
                    llm_egress_common::verdict::name(k.verdict).to_string(),
                ]
            });
        self.limiter
            .tick(&mut self.maps, &self.metrics, &self.audit);
        if let Some(a) = self.attacher.as_mut() {
            a.tick(&mut self.loader.ebpf);
        }
        self.report_fleet();
        self.health
            .events_alive
            .store(self.events_alive.load(Ordering::SeqCst), Ordering::SeqCst);
        let now = self
            .args
            .config
            .as_deref()
            .and_then(super::reload::content_hash);
        (now.is_some() && now != self.file_hash).then_some("file changed")
    }

    /// The fleet ledger's state on /readyz.
    fn report_fleet(&self) {
        if let Ok(mut g) = self.health.fleet.lock() {
            *g = self.limiter.fleet_degraded(&self.maps);
        }
    }

    /// SIGTERM/SIGINT: budgets saved (fleet leases returned), tasks
    /// stopped, and the programs detached or kept as `on_exit` says.
    pub(super) async fn stop(mut self) -> Result<(), RunError> {
        info!("stopping");
        // No process stays paused at exec: the exec program goes first,
        // then every report the reader still has is resumed.
        if let Some(a) = self.attacher.as_mut() {
            a.stop_pausing(&mut self.loader.ebpf);
            let execs = &mut self.sources.execs_paused;
            let resume_all = async {
                while let Some(r) = execs.recv().await {
                    if r.paused {
                        reader::resume(r.pid);
                    }
                }
            };
            if tokio::time::timeout(STOP_DRAIN, resume_all).await.is_err() {
                warn!(
                    "the plaintext reader did not finish within {STOP_DRAIN:?}: a process paused at exec may stay stopped"
                );
            }
        }
        self.limiter.stop(&mut self.maps).await;
        self.events_task.abort();
        if let Some(t) = &self.http_task {
            t.abort();
        }
        drop(self.maps);
        match self.state.policy.on_exit {
            OnExit::Detach => {
                self.loader.detach_and_unpin()?;
                info!("programs detached and unpinned");
            }
            OnExit::Keep => self.loader.keep(),
        }
        // Last: the uprobe links still open close at ~100 ms each
        // (`crate::capture::detach`), after budgets and programs are done.
        if let Some(a) = self.attacher.take() {
            let open = a.open_links();
            if open > 0 {
                info!(
                    links = open,
                    "closing the remaining uprobe links (about 0.1 s each)"
                );
            }
        }
        Ok(())
    }
}

pub(super) fn record_writes(report: &WriteReport, metrics: &Metrics) {
    for (map, n) in &report.failed {
        metrics
            .map_update_errors
            .with_label_values(&[map])
            .inc_by(*n);
        error!(map = %map, failed = n, "map entries could not be written (map full?)");
    }
}

pub(super) fn record_occupancy(maps: &KernelMaps, metrics: &Metrics) {
    for (map, n) in maps.occupancy() {
        metrics.map_entries.with_label_values(&[map]).set(n as i64);
    }
}

/// Parses an answer the kernel gave up on and writes the addresses it
/// teaches for the active policy's names (docs/names.md: not race-free).
/// The kernel sends only answers to queries the receiving socket sent to
/// a trusted resolver; the addresses are learned for that socket's
/// workload only (`answer.scope`), as the kernel learns them.
pub(super) fn learn_unparsed(
    maps: &mut KernelMaps,
    seed: u64,
    answer: &crate::events::decode::DnsAnswer,
    metrics: &Metrics,
) {
    let msg = &answer.msg;
    let Some(names) = maps.active_names() else {
        return;
    };
    match crate::names::dns::learnable(msg, seed, names) {
        Ok(found) => {
            metrics.dns_fallback.with_label_values(&["parsed"]).inc();
            for l in found {
                match maps.learn(answer.scope, l.addr, l.key, l.ttl) {
                    Ok(()) => metrics.dns_fallback.with_label_values(&["learned"]).inc(),
                    Err(e) => {
                        let map = if l.addr.is_ipv4() {
                            llm_egress_common::MAP_LEARNED_V4
                        } else {
                            llm_egress_common::MAP_LEARNED_V6
                        };
                        metrics.map_update_errors.with_label_values(&[map]).inc();
                        warn!(addr = %l.addr, error = %e, "could not write an address learned by the DNS fallback");
                    }
                }
            }
        }
        Err(crate::names::dns::Skip::NotAnAnswer) => {
            metrics.dns_fallback.with_label_values(&["parsed"]).inc()
        }
        Err(crate::names::dns::Skip::Unparsed) => {
            metrics.dns_fallback.with_label_values(&["unparsed"]).inc()
        }
    }
}

/// The host's resolver configuration, read (never written) at start and
/// on every reload: its `nameserver`s are trusted resolvers.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Writes the resolvers the kernel learns answers from (docs/names.md):
/// `[resolver] trusted`, `servers` and the nameservers of /etc/resolv.conf,
/// or any with `trusted = "any"`.
pub(super) fn set_trusted_resolvers(
    maps: &mut KernelMaps,
    policy: &Policy,
) -> Result<(), MapsError> {
    let text = std::fs::read_to_string(RESOLV_CONF).unwrap_or_else(|e| {
        warn!(path = RESOLV_CONF, error = %e, "cannot read the host's resolvers; only those of the policy are trusted");
        String::new()
    });
    let trusted = policy.resolver.trusted_resolvers(&text);
    match &trusted {
        Some(t) => info!(resolvers = ?t, "DNS answers are learned from these resolvers only"),
        None => warn!(
            "resolver.trusted = \"any\": DNS answers from any resolver the workloads ask are learned from (docs/names.md)"
        ),
    }
    maps.set_trusted_resolvers(trusted.as_ref())
}
