//! The running agent: starts every part, then reacts to what changes.
//!
//! Sources of change, all handled on one task so that map writes never
//! interleave: SIGHUP or a changed policy file (a new policy: written to the
//! idle slot, then activated), the cgroup watcher (workload cgroups appear or
//! go), the node's pod list (`kube`: pods appear, labels change), resolver rounds (provider addresses), and a 1 s tick that copies the
//! kernel counters into metrics. SIGTERM/SIGINT stop cleanly.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use llm_egress_common::{MAP_CONNS, MAP_EVENTS, MAP_EXECS, MAP_PLAINTEXT, PROG_EXEC};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    accounting::Accounting,
    attribution::CgroupPaths,
    audit::AuditSink,
    cgroups::{self, Selectors},
    cli::{Listen, RunArgs},
    events::{self, Context, NameTable, Names},
    http::{self, Health},
    kube,
    limiter::Limiter,
    loader::{self, AttachOutcome, Loader},
    maps::{KernelMaps, MapsError, WriteReport},
    metrics::Metrics,
    plaintext::{self, ExecReport, PlaintextChunk},
    plaintext_attach::Attacher,
    plan::{self, Plan},
    policy::{AuditLog, OnExit, Policy, PolicyErrors},
    programs::{self, ProgramsError},
    resolver::{self, HostAddrs, Resolver},
};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid policy:\n{0}")]
    Policy(#[from] PolicyErrors),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Programs(#[from] ProgramsError),
    #[error(transparent)]
    Maps(#[from] crate::maps::MapsError),
    #[error("attach cgroup {0}: {1}")]
    Cgroup(PathBuf, String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the policy does not fit in the kernel maps: {0:?} entries failed")]
    DoesNotFit(BTreeMap<&'static str, u64>),
    #[error("resolver: {0}")]
    Resolver(String),
    #[error(transparent)]
    Untrusted(#[from] crate::ownership::Untrusted),
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
    );
    changed
}

/// DNS answers waiting for the agent's parser; more are dropped (counted).
const DNS_FALLBACK_QUEUE: usize = 1024;

/// Parses an answer the kernel gave up on and writes the addresses it
/// teaches for the active policy's names (docs/names.md: not race-free).
/// The kernel sends only answers to queries the receiving socket sent to
/// a trusted resolver; the addresses are learned for that socket's
/// workload only (`answer.scope`), as the kernel learns them.
fn learn_unparsed(
    maps: &mut KernelMaps,
    seed: u64,
    answer: &crate::events::DnsAnswer,
    metrics: &Metrics,
) {
    let msg = &answer.msg;
    let Some(names) = maps.active_names() else {
        return;
    };
    match crate::dns::learnable(msg, seed, names) {
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
        Err(crate::dns::Skip::NotAnAnswer) => {
            metrics.dns_fallback.with_label_values(&["parsed"]).inc()
        }
        Err(crate::dns::Skip::Unparsed) => {
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
fn set_trusted_resolvers(maps: &mut KernelMaps, policy: &Policy) -> Result<(), MapsError> {
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

/// Ticks (seconds) between two counts of the learned destinations.
const LEARNED_COUNT_TICKS: u64 = 10;

/// Reads the policy and applies the command-line overrides.
pub fn load_policy(args: &RunArgs) -> Result<Policy, PolicyErrors> {
    let mut policy = match &args.config {
        Some(path) => Policy::from_path(path)?,
        None => Policy::builtin_default(),
    };
    apply_overrides(&mut policy, args);
    Ok(policy)
}

fn apply_overrides(policy: &mut Policy, args: &RunArgs) {
    if let Some(c) = &args.cgroup {
        policy.cgroup = Some(c.clone());
    }
    if let Some(p) = &args.pin_path {
        policy.pin_path = p.clone();
    }
    if let Some(d) = &args.state_dir {
        policy.state_dir = d.clone();
    }
    match args.metrics_listen {
        Some(Listen::At(m)) => policy.metrics_listen = Some(m),
        Some(Listen::Off) => policy.metrics_listen = None,
        None => {}
    }
    if let Some(a) = &args.audit_log {
        policy.audit_log = match a.as_str() {
            "-" => AuditLog::Stdout,
            "off" => AuditLog::Off,
            path => AuditLog::File(PathBuf::from(path)),
        };
    }
}

/// The attach cgroup: absolute, existing, on cgroup2; and the cgroup2 mount.
fn attach_point(policy: &Policy) -> Result<(PathBuf, PathBuf), RunError> {
    let mount = cgroups::cgroup2_mount().ok_or_else(|| {
        RunError::Cgroup(
            PathBuf::from("?"),
            "no cgroup2 file system is mounted".into(),
        )
    })?;
    let path = policy.cgroup.clone().unwrap_or_else(|| mount.clone());
    if !path.starts_with(&mount) {
        return Err(RunError::Cgroup(
            path,
            format!("is not below the cgroup2 mount {}", mount.display()),
        ));
    }
    if !path.join("cgroup.procs").exists() {
        return Err(RunError::Cgroup(
            path,
            "does not exist or is not a cgroup v2 directory".into(),
        ));
    }
    Ok((path, mount))
}

fn content_hash(path: &Path) -> Option<u64> {
    let bytes = fs::read(path).ok()?;
    Some(bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    }))
}

/// What the agent currently enforces, and what it was built from.
struct State {
    policy: Policy,
    generation: u64,
    selectors: Selectors,
    cgroups: BTreeMap<u64, usize>,
    hosts: HostAddrs,
    attach: PathBuf,
    attach_id: u64,
    root_rel: String,
    /// The node's pods, for `k8s` selectors.
    pods: kube::Pods,
    /// Pod uids of cgroups that the pod list lacked at the last scan (a
    /// refresh was asked for each once).
    unknown_pods: BTreeSet<String>,
    /// Seed of the name hashes in `NAMES` (kept in the pinned `NAME_CFG`).
    name_seed: u64,
}

impl State {
    fn plan(&self) -> Plan {
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
    fn rescan(&mut self, paths: &CgroupPaths, metrics: &Metrics) -> bool {
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

    fn report_missing_workloads(&self) {
        for (i, w) in self.policy.workloads.iter().enumerate() {
            if !self.cgroups.values().any(|&v| v == i) {
                warn!(workload = %w.name, selector = ?w.selector, "no cgroup matches this workload yet; it applies when one appears");
            }
        }
    }
}

fn record_writes(report: &WriteReport, metrics: &Metrics) {
    for (map, n) in &report.failed {
        metrics
            .map_update_errors
            .with_label_values(&[map])
            .inc_by(*n);
        error!(map = %map, failed = n, "map entries could not be written (map full?)");
    }
}

fn record_occupancy(maps: &KernelMaps, metrics: &Metrics) {
    for (map, n) in maps.occupancy() {
        metrics.map_entries.with_label_values(&[map]).set(n as i64);
    }
}

/// Plaintext chunks waiting for their consumer; more are dropped (counted).
const PLAINTEXT_QUEUE: usize = 4096;
/// Exec reports waiting for the attacher; a report that finds the queue
/// full resumes its process at once, untraced (counted).
const EXEC_QUEUE: usize = 1024;

/// Tells the plaintext attacher which workloads have `exact_tokens` and
/// which cgroups they hold now (docs/plaintext.md).
fn sync_plaintext(
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

pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let policy = load_policy(&args)?;
    // Before anything is created, opened for writing or pinned.
    crate::ownership::check_policy(&policy, args.config.as_deref())?;
    let (attach, mount) = attach_point(&policy)?;
    let attach_id = loader::cgroup_id(&attach)?;
    let root_rel = format!(
        "/{}",
        attach
            .strip_prefix(&mount)
            .unwrap_or(Path::new(""))
            .display()
    );
    let root_rel = if root_rel == "/" {
        String::new()
    } else {
        root_rel
    };

    let metrics = Metrics::new()?;
    metrics
        .build_info
        .with_label_values(&[
            env!("CARGO_PKG_VERSION"),
            &format!("{:016x}", loader::object_hash()),
        ])
        .set(1);
    let health = Arc::new(Health::default());
    let http_task = match policy.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Io {
                    what: format!("listening on {addr}"),
                    source,
                })?;
            info!(addr = %addr, "serving /metrics, /healthz, /readyz");
            Some(tokio::spawn(http::serve(
                listener,
                metrics.clone(),
                health.clone(),
            )))
        }
        None => None,
    };
    let audit =
        AuditSink::open(&policy.audit_log, metrics.clone()).map_err(|source| RunError::Io {
            what: format!("opening the audit log {:?}", policy.audit_log),
            source,
        })?;

    let mut loader = Loader::open(&policy.pin_path)?;
    let mut maps = KernelMaps::take(&mut loader.ebpf)?;
    let ring: RingBuf<MapData> = loader
        .ebpf
        .take_map(MAP_EVENTS)
        .ok_or(loader::LoadError::Missing(MAP_EVENTS))?
        .try_into()
        .map_err(|e: aya::maps::MapError| RunError::Io {
            what: "event ring buffer".into(),
            source: std::io::Error::other(e),
        })?;

    // Pinned state of a previous agent of this build: continue its
    // generation numbering, and keep its links if they guard the same cgroup.
    let previous = maps.active()?;
    // No policy was ever activated in these maps: nothing enforced from
    // them before this start, so a start that fails removes them.
    loader.discard_unless_started(previous.slot == 0);
    let previous_generation = maps.active_config()?.map(|c| c.generation).unwrap_or(0);
    let adopt =
        previous.slot != 0 && previous.attach_cgroup_id == attach_id && loader.has_pinned_links();

    // The programs first (the kernel verifies each): whether the agent can
    // run at all is known before the maps are written (docs/operations.md,
    // "When a program fails to load").
    let failed = loader.prepare(policy.failure_mode, adopt, policy.programs.names());
    for f in &failed {
        error!(program = f.name, reason = %f.reason, lost = programs::loses(f.name), "program failed to load");
    }
    programs::check(&policy, &failed)?;
    for name in loader.ready_programs() {
        metrics.program_loaded.with_label_values(&[name]).set(1);
    }
    for f in &failed {
        metrics.program_loaded.with_label_values(&[f.name]).set(0);
    }
    // What a reload's policy is checked against: the programs that failed,
    // and those `programs` leaves out (it changes only on restart).
    let unavailable = programs::unavailable(&failed, loader.ready_programs());
    if !failed.is_empty()
        && let Ok(mut g) = health.degraded.lock()
    {
        *g = Some(programs::degraded_summary(&failed));
    }

    // The node's pods before the first plan, so that `k8s` workloads apply
    // from the start (a failing API server delays this at most 5 s).
    let (pods, mut pod_changes) = kube::start(&policy.kubernetes, metrics.clone()).await;

    let names = Names::default();
    let paths = CgroupPaths::default();
    let mut state = State {
        selectors: Selectors::new(&policy),
        policy,
        generation: previous_generation + 1,
        cgroups: BTreeMap::new(),
        hosts: HostAddrs::new(),
        attach: attach.clone(),
        attach_id,
        root_rel,
        pods,
        unknown_pods: BTreeSet::new(),
        name_seed: maps.name_seed()?,
    };
    if state.selectors.selects_pods() && !state.pods.enabled() {
        warn!(
            "workloads select pods by namespace and labels (`k8s`), but the agent has no pod list: not in a cluster (KUBERNETES_SERVICE_HOST unset) or [kubernetes] is not usable; they select nothing"
        );
    }
    maps.set_learned_ttl(state.policy.resolver.learned_ttl)?;
    set_trusted_resolvers(&mut maps, &state.policy)?;
    // Watching before the first scan: a workload cgroup created at any
    // moment after it is seen (by the scan, or by the watcher).
    let mut cgroup_changes = cgroups::watch(attach.clone());
    state.rescan(&paths, &metrics);
    state.report_missing_workloads();
    names.push(NameTable::of(&state.policy, state.generation));

    let report = maps.apply_policy(
        state.plan(),
        plan::failure_code(state.policy.failure_mode),
        attach_id,
    )?;
    record_writes(&report, &metrics);
    if !report.is_ok() {
        // Dropping the loader removes the pins if nothing was enforced
        // before us (`discard_unless_started`).
        return Err(RunError::DoesNotFit(report.failed));
    }
    record_occupancy(&maps, &metrics);
    metrics.policy_generation.set(state.generation as i64);
    let mut limiter = Limiter::start(
        &maps.applied_limits(),
        state.policy.state_dir.clone(),
        &mut maps,
        &metrics,
        &audit,
    );

    // Exec tracking first: a process that execs once we are ready must be
    // attributable even if it exits at once.
    let execs = match loader.attach_exec_tracking() {
        Ok(()) => {
            metrics
                .program_loaded
                .with_label_values(&[PROG_EXEC])
                .set(1);
            loader
                .ebpf
                .take_map(MAP_EXECS)
                .and_then(|m| m.try_into().ok())
                .map(Arc::new)
        }
        Err(e) => {
            metrics
                .program_loaded
                .with_label_values(&[PROG_EXEC])
                .set(0);
            warn!(error = %e, "exec tracking unavailable: processes that exit before their event is read get an empty exe");
            None
        }
    };
    let outcome = loader.attach(&attach, state.policy.failure_mode)?;

    // Plaintext of OpenSSL calls (docs/plaintext.md): the programs are
    // loaded always; probes are attached only while a workload has
    // `exact_tokens = true`, uprobes only to its processes.
    let plaintext_stats = Arc::new(plaintext::ReaderStats::default());
    let (chunk_tx, chunk_rx) = mpsc::channel::<PlaintextChunk>(PLAINTEXT_QUEUE);
    let (exec_tx, mut exec_rx) = mpsc::channel::<ExecReport>(EXEC_QUEUE);
    let mut attacher = match Attacher::load(
        &mut loader.ebpf,
        &mount,
        &metrics.registry,
        plaintext_stats.clone(),
    ) {
        Ok(a) => Some(a),
        Err(e) => {
            if state.policy.workloads.iter().any(|w| w.exact_tokens) {
                error!(error = %e, "plaintext programs unavailable: exact_tokens workloads get no plaintext");
            } else {
                info!(error = %e, "plaintext programs unavailable");
            }
            None
        }
    };
    let plaintext_ring: Option<RingBuf<MapData>> = loader
        .ebpf
        .take_map(MAP_PLAINTEXT)
        .and_then(|m| m.try_into().ok());
    if let (Some(a), Some(ring)) = (attacher.as_ref(), plaintext_ring) {
        tokio::spawn(plaintext::read(
            ring,
            chunk_tx,
            exec_tx,
            plaintext_stats.clone(),
            a.seen.clone(),
            Arc::new(AtomicBool::new(true)),
        ));
        match plaintext::dump_path() {
            Some(path) => {
                let pids = a.workload_of_pid.clone();
                tokio::spawn(plaintext::dump(chunk_rx, path, move |pid| {
                    pids.lock().ok().and_then(|g| g.get(&pid).cloned())
                }));
            }
            None => {
                tokio::spawn(plaintext::discard(chunk_rx));
            }
        }
    }
    sync_plaintext(attacher.as_mut(), &mut loader.ebpf, &state, &paths);
    match outcome {
        AttachOutcome::Adopted => info!(
            generation = state.generation,
            previous_generation,
            "adopted the pinned programs of a previous agent; policy re-applied"
        ),
        AttachOutcome::Attached => info!(generation = state.generation, "programs attached"),
    }

    // DNS answers the kernel could not parse, from the event reader.
    let (dns_tx, mut dns_rx) = mpsc::channel::<crate::events::DnsAnswer>(DNS_FALLBACK_QUEUE);
    let ctx = Context {
        execs,
        exe_cache: Default::default(),
        names: names.clone(),
        cgroups: paths.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        pods: state.pods.clone(),
        dns_fallback: Some(dns_tx),
    };
    let events_alive = Arc::new(AtomicBool::new(true));
    let conns = loader
        .ebpf
        .take_map(MAP_CONNS)
        .and_then(|m| m.try_into().ok());
    let accounting = Accounting::new(metrics.clone(), state.policy.telemetry.clone());
    let (telemetry_tx, telemetry_rx) = tokio::sync::watch::channel(state.policy.telemetry.clone());
    let events_task = tokio::spawn(events::read(
        ring,
        ctx,
        accounting,
        conns,
        telemetry_rx,
        events_alive.clone(),
    ));

    let mut resolver =
        Resolver::new(&state.policy.resolver).map_err(|e| RunError::Resolver(e.to_string()))?;
    let (resolved_tx, mut resolved_rx) = mpsc::channel::<(u64, HostAddrs, u64)>(4);
    let spawn_round =
        |resolver: &Resolver, state: &State, tx: &mpsc::Sender<(u64, HostAddrs, u64)>| {
            let (r, tx, hosts, previous, generation) = (
                resolver.clone(),
                tx.clone(),
                resolver::hosts_of(&state.policy),
                state.hosts.clone(),
                state.generation,
            );
            tokio::spawn(async move {
                let (addrs, failures) = r.resolve(hosts, &previous).await;
                let _ = tx.send((generation, addrs, failures)).await;
            });
        };
    spawn_round(&resolver, &state, &resolved_tx);
    let mut refresh = tokio::time::interval(state.policy.resolver.refresh);
    refresh.tick().await;

    let mut hup = signal(SignalKind::hangup()).map_err(|source| RunError::Io {
        what: "SIGHUP handler".into(),
        source,
    })?;
    let mut term = signal(SignalKind::terminate()).map_err(|source| RunError::Io {
        what: "SIGTERM handler".into(),
        source,
    })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| RunError::Io {
        what: "SIGINT handler".into(),
        source,
    })?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // `LEARNED_*` are counted every `LEARNED_COUNT_TICKS` ticks (a walk of
    // up to 2 × 65,536 entries).
    let mut ticks: u64 = 0;
    let mut file_hash = args.config.as_deref().and_then(content_hash);
    let mut file_changes = args.config.as_deref().and_then(crate::policy_watch::watch);
    // Started: from now on the pins stay whatever happens to the agent (and
    // other builds' pins go, with the privileges that may take).
    loader.started();
    // Everything that needs privileges is done: keep only what reading
    // /proc/PID/exe of other users' processes needs.
    if crate::privileges::kernel_allows_unprivileged_map_fds() {
        // The plaintext attacher attaches uprobes per process while the
        // agent runs: perf events and their BPF links, and SIGCONT to
        // processes of other users. Measured on 6.18: perf_event_open of a
        // uprobe fails with EACCES unless CAP_SYS_ADMIN is kept (CAP_PERFMON
        // and CAP_BPF alone are not enough), so an agent whose policy has an
        // `exact_tokens` workload at start keeps it (docs/plaintext.md).
        let plaintext_caps =
            attacher.is_some() && state.policy.workloads.iter().any(|w| w.exact_tokens);
        let keep: &[u32] = if plaintext_caps {
            &[
                crate::privileges::CAP_SYS_PTRACE,
                crate::privileges::CAP_KILL,
                crate::privileges::CAP_SYS_ADMIN,
                crate::privileges::CAP_PERFMON,
                crate::privileges::CAP_BPF,
            ]
        } else {
            &[crate::privileges::CAP_SYS_PTRACE]
        };
        match crate::privileges::drop_all_but(keep) {
            Ok(kept) => info!(kept = ?kept, "dropped capabilities (kept those listed)"),
            Err(e) => {
                warn!(error = %e, "could not drop capabilities; running with the ones the agent was started with")
            }
        }
    } else {
        info!("kernel older than 6.5: map updates need CAP_BPF, so capabilities are kept");
    }
    health.attached.store(true, Ordering::SeqCst);
    health.events_alive.store(true, Ordering::SeqCst);
    if failed.is_empty() {
        info!(attach = %attach.display(), pin_path = %state.policy.pin_path.display(), "ready");
    } else {
        warn!(attach = %attach.display(), pin_path = %state.policy.pin_path.display(), missing = ?failed.iter().map(|f| f.name).collect::<Vec<_>>(), "running degraded: the connect-time verdict and the programs that loaded enforce the policy without the missing ones (see the errors above: which program, why, what is lost); /readyz answers 503 until a restart loads every program");
    }

    loop {
        let reload_reason = tokio::select! {
            _ = hup.recv() => Some("SIGHUP"),
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(()) = pod_changes.recv() => {
                if state.rescan(&paths, &metrics) {
                    let report = maps.apply_update(state.plan())?;
                    record_writes(&report, &metrics);
                    record_occupancy(&maps, &metrics);
                    sync_plaintext(attacher.as_mut(), &mut loader.ebpf, &state, &paths);
                }
                None
            }
            Some(report) = exec_rx.recv() => {
                match attacher.as_mut() {
                    Some(a) => a.on_exec(&mut loader.ebpf, report),
                    None if report.paused => plaintext::resume(report.pid),
                    None => {}
                }
                None
            }
            Some(answer) = dns_rx.recv() => {
                learn_unparsed(&mut maps, state.name_seed, &answer, &metrics);
                None
            }
            Some(()) = cgroup_changes.recv() => {
                if state.rescan(&paths, &metrics) {
                    let report = maps.apply_update(state.plan())?;
                    record_writes(&report, &metrics);
                    record_occupancy(&maps, &metrics);
                    sync_plaintext(attacher.as_mut(), &mut loader.ebpf, &state, &paths);
                }
                None
            }
            Some((generation, hosts, failures)) = resolved_rx.recv() => {
                metrics.resolver_failures.inc_by(failures);
                if generation == state.generation && hosts != state.hosts {
                    state.hosts = hosts;
                    metrics.resolved_addresses.set(state.hosts.values().map(BTreeSet::len).sum::<usize>() as i64);
                    let report = maps.apply_update(state.plan())?;
                    record_writes(&report, &metrics);
                    record_occupancy(&maps, &metrics);
                }
                None
            }
            Some(()) = async {
                match file_changes.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let now = args.config.as_deref().and_then(content_hash);
                (now.is_some() && now != file_hash).then_some("file changed")
            }
            _ = refresh.tick() => {
                spawn_round(&resolver, &state, &resolved_tx);
                None
            }
            _ = tick.tick() => {
                if let Ok(c) = maps.counters() {
                    metrics.sync_kernel(&c);
                }
                if ticks.is_multiple_of(LEARNED_COUNT_TICKS) {
                    let (v4, v6) = maps.learned_counts();
                    metrics.learned_destinations.with_label_values(&["v4"]).set(v4 as i64);
                    metrics.learned_destinations.with_label_values(&["v6"]).set(v6 as i64);
                }
                ticks += 1;
                metrics.sync_verdicts(&maps.verdict_counts(), |k| {
                    let (w, p) = events::names_of(&names, k.generation, k.workload_id, k.provider_id);
                    [w, p.unwrap_or_else(|| "none".into()), events::verdict_name(k.verdict).to_string()]
                });
                limiter.tick(&mut maps, &metrics, &audit);
                if let Some(a) = attacher.as_mut() {
                    a.tick(&mut loader.ebpf);
                }
                health.events_alive.store(events_alive.load(Ordering::SeqCst), Ordering::SeqCst);
                let now = args.config.as_deref().and_then(content_hash);
                if now.is_some() && now != file_hash {
                    file_hash = now;
                    Some("file changed")
                } else {
                    None
                }
            }
        };
        let Some(why) = reload_reason else { continue };
        file_hash = args.config.as_deref().and_then(content_hash);
        let loaded = load_policy(&args)
            .map_err(|e| e.to_string())
            .and_then(|new| {
                // A policy that needs a program that is not running is refused
                // like an invalid one: applying it would enforce less than it says.
                programs::check(&new, &unavailable).map_err(|e| e.to_string())?;
                // The same paths as at start: state_dir may change here.
                crate::ownership::check_policy(&new, args.config.as_deref())
                    .map(|()| new)
                    .map_err(|e| e.to_string())
            });
        match loaded {
            Err(e) => {
                metrics.policy_reloads.with_label_values(&["invalid"]).inc();
                error!(trigger = why, error = %e, "new policy rejected; the previous policy stays in force");
                if let Ok(mut g) = health.policy_error.lock() {
                    *g = Some(e);
                }
            }
            Ok(new) => {
                let mut next = new;
                let kept = keep_restart_only(&mut next, &state.policy);
                if !kept.is_empty() {
                    warn!(keys = ?kept, "these keys change only on restart; keeping the running values");
                }
                if next == state.policy {
                    // The same policy again (a SIGHUP after an edit that the
                    // file watch already applied; an edit undone): no new
                    // generation; a SIGHUP still resolves the hosts again.
                    info!(
                        trigger = why,
                        generation = state.generation,
                        "policy unchanged; nothing to apply"
                    );
                    metrics.policy_reloads.with_label_values(&["ok"]).inc();
                    if let Ok(mut g) = health.policy_error.lock() {
                        *g = None;
                    }
                    if why == "SIGHUP" {
                        spawn_round(&resolver, &state, &resolved_tx);
                    }
                    continue;
                }
                let old_resolver = state.policy.resolver.clone();
                let old = std::mem::replace(&mut state.policy, next);
                state.generation += 1;
                state.selectors = Selectors::new(&state.policy);
                state.rescan(&paths, &metrics);
                names.push(NameTable::of(&state.policy, state.generation));
                let report = maps.apply_policy(
                    state.plan(),
                    plan::failure_code(state.policy.failure_mode),
                    state.attach_id,
                )?;
                record_writes(&report, &metrics);
                if report.is_ok() {
                    metrics.policy_reloads.with_label_values(&["ok"]).inc();
                    metrics.policy_generation.set(state.generation as i64);
                    record_occupancy(&maps, &metrics);
                    if let Ok(mut g) = health.policy_error.lock() {
                        *g = None;
                    }
                    state.report_missing_workloads();
                    sync_plaintext(attacher.as_mut(), &mut loader.ebpf, &state, &paths);
                    limiter.set_policy(
                        &maps.applied_limits(),
                        state.policy.state_dir.clone(),
                        &mut maps,
                        &metrics,
                    );
                    let _ = telemetry_tx.send(state.policy.telemetry.clone());
                    info!(
                        trigger = why,
                        generation = state.generation,
                        "policy applied"
                    );
                    if let Err(e) = maps.set_learned_ttl(state.policy.resolver.learned_ttl) {
                        warn!(error = %e, "could not update the TTL bounds of learned addresses");
                    }
                    if let Err(e) = set_trusted_resolvers(&mut maps, &state.policy) {
                        warn!(error = %e, "could not update the resolvers answers are learned from");
                    }
                    if state.policy.resolver != old_resolver {
                        resolver = Resolver::new(&state.policy.resolver)
                            .map_err(|e| RunError::Resolver(e.to_string()))?;
                        refresh = tokio::time::interval(state.policy.resolver.refresh);
                        refresh.tick().await;
                    }
                    spawn_round(&resolver, &state, &resolved_tx);
                } else {
                    metrics.policy_reloads.with_label_values(&["failed"]).inc();
                    error!(
                        trigger = why,
                        "new policy does not fit in the kernel maps; the previous policy stays in force"
                    );
                    state.policy = old;
                    state.generation -= 1;
                    state.selectors = Selectors::new(&state.policy);
                    state.rescan(&paths, &metrics);
                }
            }
        }
    }

    info!("stopping");
    // Uprobes detach with their links; nothing stays paused (the exec
    // program detaches with the agent).
    drop(attacher);
    limiter.save();
    events_task.abort();
    if let Some(t) = http_task {
        t.abort();
    }
    drop(maps);
    match state.policy.on_exit {
        OnExit::Detach => {
            loader.detach_and_unpin()?;
            info!("programs detached and unpinned");
        }
        OnExit::Keep => loader.keep(),
    }
    Ok(())
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
                "[kubernetes]"
            ]
        );
        let mut expected = running.clone();
        expected.mode = next.mode;
        assert_eq!(next, expected, "only `mode` comes from the new file");
        assert!(keep_restart_only(&mut next, &running).is_empty());
    }
}
