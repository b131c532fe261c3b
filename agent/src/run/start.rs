//! Start-up: the policy read and checked, the programs loaded (each
//! verified before any map is written), the first policy written and
//! activated, the programs attached (or a previous agent's adopted), the
//! event reader, resolver and watchers started, privileges dropped.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, MapData, RingBuf};
use llm_egress_common::{
    MAP_CONNS, MAP_EVENTS, MAP_EXECS, MAP_PLAINTEXT, MAP_SNI_STATE, PROG_EXEC,
};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use super::{
    Resolved, RunError, Running, Sources,
    args::{RunArgs, load_policy},
    handlers::{record_occupancy, record_writes, set_trusted_resolvers},
    reload::content_hash,
    state::State,
};
use crate::{
    accounting::{
        connections::Accounting, exact_conns::ExactConns, exact_tokens::ExactTokens,
        token_tally::TokenTally,
    },
    attribution::{
        cgroups::{self, Selectors},
        kube,
        process::CgroupPaths,
    },
    capture::{
        attach::Attacher,
        reader::{self, ExecReport, PlaintextChunk},
    },
    events::{
        self,
        names::{NameTable, Names},
        records::{Context, Execs},
    },
    kernel::{
        loader::{self, AttachOutcome, Loader, ProgramFailure},
        maps::KernelMaps,
        plan, privileges, programs,
        socket_stop::SocketStop,
    },
    limits::{fleet::FleetKeeper, fleet_rate::RateKeeper, limiter::Limiter},
    names::resolver::{HostAddrs, Resolver},
    policy::Policy,
    telemetry::{
        audit::AuditSink,
        http::{self, Health},
        metrics::Metrics,
    },
};

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

/// DNS answers waiting for the agent's parser; more are dropped (counted).
const DNS_FALLBACK_QUEUE: usize = 1024;

/// Starts every part; the agent enforces the policy when this returns.
pub(super) async fn start(args: RunArgs) -> Result<Running, RunError> {
    let policy = load_policy(&args)?;
    // Before anything is created, opened for writing or pinned.
    crate::policy::ownership::check_policy(&policy, args.config.as_deref())?;
    let (attach, mount) = attach_point(&policy)?;
    let attach_id = loader::cgroup_id(&attach)?;
    let root_rel = relative_root(&attach, &mount);

    let (metrics, health, http_task, audit) = start_telemetry(&policy).await?;

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
    // run at all is known before the maps are written.
    let (failed, unavailable) = load_programs(&mut loader, &policy, adopt, &metrics, &health)?;

    // The node's pods before the first plan, so that `k8s` workloads apply
    // from the start (a failing API server delays this at most 5 s).
    let (pods, pod_changes) = kube::start(
        &policy.kubernetes,
        kube::KubeMetrics {
            errors: metrics.kubernetes_errors.clone(),
            pods: metrics.kubernetes_pods.clone(),
        },
    )
    .await;

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
    let cgroup_changes = cgroups::watch(attach.clone());
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
    // Accounting's token counts reach the limiter through this tally.
    let tally = TokenTally::default();
    // Fleet-wide budgets: the ledger task starts; nothing waits for it.
    let fleet = match &state.policy.fleet {
        Some(config) => Some(FleetKeeper::start(
            config.clone(),
            &state.policy.state_dir,
            &metrics.registry,
        )?),
        None => None,
    };
    // Fleet-wide connection rates: shares held under the same agent id,
    // on a connection of their own; their answers wake the same handler.
    let rates = match (&state.policy.fleet, &fleet) {
        (Some(config), Some(f)) => Some(RateKeeper::start(
            config.clone(),
            f.agent_id().to_string(),
            &metrics.registry,
            f.answered(),
        )?),
        _ => None,
    };
    let mut limiter = Limiter::start(
        &maps.applied_limits(),
        state.policy.state_dir.clone(),
        tally.clone(),
        fleet,
        &mut maps,
        &metrics,
        &audit,
    );
    if let Some(r) = rates {
        limiter.start_rates(r, &maps.applied_limits(), &mut maps);
    }
    let fleet_wake = limiter.fleet_wake();

    // Exec tracking first: a process that execs once we are ready must be
    // attributable even if it exits at once.
    let execs = attach_exec_tracking(&mut loader, &metrics);
    let outcome = loader.attach(&attach, state.policy.failure_mode)?;
    let (attacher, execs_paused, chunks) =
        start_plaintext(&mut loader, &mount, &metrics, &state, &paths);
    match outcome {
        AttachOutcome::Adopted => info!(
            generation = state.generation,
            previous_generation,
            "adopted the pinned programs of a previous agent; policy re-applied"
        ),
        AttachOutcome::Attached => info!(generation = state.generation, "programs attached"),
    }

    // DNS answers the kernel could not parse, from the event reader.
    let (dns_tx, dns_answers) =
        mpsc::channel::<crate::events::decode::DnsAnswer>(DNS_FALLBACK_QUEUE);
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
    let (events_task, events_alive, telemetry_tx) =
        start_event_reader(&mut loader, ring, ctx, &state, tally, chunks);

    let resolver =
        Resolver::new(&state.policy.resolver).map_err(|e| RunError::Resolver(e.to_string()))?;
    let (resolved_tx, resolved) = mpsc::channel::<Resolved>(4);
    let mut refresh = tokio::time::interval(state.policy.resolver.refresh);
    refresh.tick().await;

    let (hup, term, int) = stop_and_reload_signals()?;
    let tick = tokio::time::interval(Duration::from_secs(1));
    let file_hash = args.config.as_deref().and_then(content_hash);
    let file_changes = args.config.as_deref().and_then(crate::policy::watch::watch);
    // Started: from now on the pins stay whatever happens to the agent (and
    // other builds' pins go, with the privileges that may take).
    loader.started();
    // Everything that needs privileges is done.
    drop_privileges(attacher.is_some() && state.policy.workloads.iter().any(|w| w.exact_tokens));
    health.attached.store(true, Ordering::SeqCst);
    health.events_alive.store(true, Ordering::SeqCst);
    if failed.is_empty() {
        info!(attach = %attach.display(), pin_path = %state.policy.pin_path.display(), "ready");
    } else {
        warn!(attach = %attach.display(), pin_path = %state.policy.pin_path.display(), missing = ?failed.iter().map(|f| f.name).collect::<Vec<_>>(), "running degraded: the connect-time verdict and the programs that loaded enforce the policy without the missing ones (see the errors above: which program, why, what is lost); /readyz answers 503 until a restart loads every program");
    }

    let agent = Running {
        args,
        state,
        maps,
        loader,
        metrics,
        audit,
        health,
        limiter,
        names,
        paths,
        unavailable,
        resolver,
        resolved_tx,
        telemetry_tx,
        events_alive,
        events_task,
        http_task,
        file_hash,
        ticks: 0,
        attacher,
        sources: Sources {
            hup,
            term,
            int,
            pod_changes,
            cgroup_changes,
            file_changes,
            dns_answers,
            resolved,
            refresh,
            tick,
            fleet_wake,
            execs_paused,
        },
    };
    agent.resolve();
    Ok(agent)
}

/// The attach cgroup's path below the cgroup2 mount ("" for the mount).
fn relative_root(attach: &Path, mount: &Path) -> String {
    let rel = format!(
        "/{}",
        attach
            .strip_prefix(mount)
            .unwrap_or(Path::new(""))
            .display()
    );
    if rel == "/" { String::new() } else { rel }
}

/// The registry, the HTTP endpoint (when `metrics_listen` is set) and the
/// audit log: up before the programs, so that a failed start is seen.
async fn start_telemetry(
    policy: &Policy,
) -> Result<(Metrics, Arc<Health>, Option<JoinHandle<()>>, AuditSink), RunError> {
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
    Ok((metrics, health, http_task, audit))
}

/// Loads (or adopts) the programs `programs` names; a program that fails
/// is named with why and what is lost (docs/operations.md, "When a program
/// fails to load"), and the start is refused if the policy needs it.
/// Returns the programs that failed, and those a reload may not need.
fn load_programs(
    loader: &mut Loader,
    policy: &Policy,
    adopt: bool,
    metrics: &Metrics,
    health: &Health,
) -> Result<(Vec<ProgramFailure>, Vec<ProgramFailure>), RunError> {
    let failed = loader.prepare(policy.failure_mode, adopt, policy.programs.names());
    for f in &failed {
        error!(program = f.name, reason = %f.reason, lost = programs::loses(f.name), "program failed to load");
    }
    programs::check(policy, &failed)?;
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
    Ok((failed, unavailable))
}

/// The exec tracepoint and its map: None (counted as not loaded) when the
/// kernel refuses it.
fn attach_exec_tracking(loader: &mut Loader, metrics: &Metrics) -> Option<Execs> {
    match loader.attach_exec_tracking() {
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
    }
}

/// SIGHUP (reload), SIGTERM and SIGINT (stop).
fn stop_and_reload_signals() -> Result<(Signal, Signal, Signal), RunError> {
    let hup = signal(SignalKind::hangup()).map_err(|source| RunError::Io {
        what: "SIGHUP handler".into(),
        source,
    })?;
    let term = signal(SignalKind::terminate()).map_err(|source| RunError::Io {
        what: "SIGTERM handler".into(),
        source,
    })?;
    let int = signal(SignalKind::interrupt()).map_err(|source| RunError::Io {
        what: "SIGINT handler".into(),
        source,
    })?;
    Ok((hup, term, int))
}

/// Keeps only what reading /proc/PID/exe of other users' processes needs
/// (CAP_SYS_PTRACE), where the kernel lets map fds be used without CAP_BPF.
///
/// The plaintext attacher attaches uprobes per process while the agent
/// runs: perf events and their BPF links, and SIGCONT to processes of other
/// users. Measured on 6.18: perf_event_open of a uprobe fails with EACCES
/// unless CAP_SYS_ADMIN is kept (CAP_PERFMON and CAP_BPF alone are not
/// enough), so an agent whose policy has an `exact_tokens` workload at
/// start keeps those (docs/plaintext.md), and CAP_NET_ADMIN, which
/// `SOCK_DESTROY` of a connection stopped by `secrets = "block"` needs
/// (kernel/socket_stop.rs).
fn drop_privileges(plaintext: bool) {
    if privileges::kernel_allows_unprivileged_map_fds() {
        let keep: &[u32] = if plaintext {
            &[
                privileges::CAP_SYS_PTRACE,
                privileges::CAP_KILL,
                privileges::CAP_SYS_ADMIN,
                privileges::CAP_PERFMON,
                privileges::CAP_BPF,
                privileges::CAP_NET_ADMIN,
            ]
        } else {
            &[privileges::CAP_SYS_PTRACE]
        };
        match privileges::drop_all_but(keep) {
            Ok(kept) => info!(kept = ?kept, "dropped capabilities (kept those listed)"),
            Err(e) => {
                warn!(error = %e, "could not drop capabilities; running with the ones the agent was started with")
            }
        }
    } else {
        info!("kernel older than 6.5: map updates need CAP_BPF, so capabilities are kept");
    }
}

/// The ring-buffer reader on its own task, with connection accounting and
/// the exact-token readers of plaintext `chunks`; returns the task, its
/// liveness flag, and the sender of the policy (a reload changes its
/// telemetry settings, prices and secret patterns).
fn start_event_reader(
    loader: &mut Loader,
    ring: RingBuf<MapData>,
    ctx: Context,
    state: &State,
    tally: TokenTally,
    chunks: Option<mpsc::Receiver<PlaintextChunk>>,
) -> (
    JoinHandle<()>,
    Arc<AtomicBool>,
    watch::Sender<crate::events::PolicyUpdate>,
) {
    let telemetry = &state.policy.telemetry;
    let metrics = ctx.metrics.clone();
    let events_alive = Arc::new(AtomicBool::new(true));
    let conns = loader
        .ebpf
        .take_map(MAP_CONNS)
        .and_then(|m| m.try_into().ok());
    let mut accounting = Accounting::new(metrics.clone(), telemetry.clone())
        .with_tally(tally)
        .with_state_dir(state.policy.state_dir.clone());
    match ExactTokens::new(&state.policy, state.generation) {
        Ok(exact) => {
            let mut exact = ExactConns::new(exact, ctx.audit.clone(), &state.policy);
            match loader.ebpf.take_map(MAP_SNI_STATE).map(HashMap::try_from) {
                Some(Ok(m)) => exact = exact.with_stop(SocketStop::new(m)),
                _ => error!("secrets = \"block\" cannot mark sockets: no SNI_STATE map"),
            }
            accounting = accounting.with_exact(exact);
        }
        Err(e) => error!(error = %e, "exact tokens unavailable: every connection is estimated"),
    }
    let (telemetry_tx, telemetry_rx) =
        watch::channel((Arc::new(state.policy.clone()), state.generation));
    let events_task = tokio::spawn(events::read(
        ring,
        ctx,
        accounting,
        conns,
        telemetry_rx,
        chunks,
        events_alive.clone(),
    ));
    (events_task, events_alive, telemetry_tx)
}

/// Plaintext chunks waiting for their consumer; more are dropped (counted).
const PLAINTEXT_QUEUE: usize = 4096;
/// Exec reports waiting for the attacher; a report that finds the queue
/// full resumes its process at once, untraced (counted).
const EXEC_QUEUE: usize = 1024;

/// Plaintext of OpenSSL calls (docs/plaintext.md): the programs are loaded
/// always; probes are attached only while a workload has `exact_tokens =
/// true`, uprobes only to its processes. Returns the attacher (None when
/// the kernel refused the programs) and the exec reports it must act on.
fn start_plaintext(
    loader: &mut Loader,
    mount: &Path,
    metrics: &Metrics,
    state: &State,
    paths: &CgroupPaths,
) -> (
    Option<Attacher>,
    mpsc::Receiver<ExecReport>,
    Option<mpsc::Receiver<PlaintextChunk>>,
) {
    // Uprobes are attached while the agent runs, with perf_event_open,
    // which needs CAP_SYS_ADMIN here (docs/plaintext.md, "Privileges"): an
    // agent started without it (the shipped unit and DaemonSet leave it
    // out) says so now, not at each process's failed attach.
    let exact = state.policy.workloads.iter().any(|w| w.exact_tokens);
    let sys_admin =
        privileges::effective_mask(0).is_ok_and(|m| m & (1 << privileges::CAP_SYS_ADMIN) != 0);
    if exact && !sys_admin {
        error!(
            "exact_tokens workloads need CAP_SYS_ADMIN to attach uprobes, and this agent was started without it: \
             their TLS plaintext will not be read (counts stay estimated, secrets are not seen); \
             docs/install.md, \"Exact tokens\""
        );
    }
    let stats = Arc::new(reader::ReaderStats::default());
    let (chunk_tx, chunk_rx) = mpsc::channel::<PlaintextChunk>(PLAINTEXT_QUEUE);
    let (exec_tx, exec_rx) = mpsc::channel::<ExecReport>(EXEC_QUEUE);
    let mut attacher = match Attacher::load(
        &mut loader.ebpf,
        mount,
        &metrics.registry,
        stats.clone(),
    ) {
        Ok(a) => Some(a),
        Err(e) => {
            if exact {
                error!(error = %e, "plaintext programs unavailable: exact_tokens workloads get no plaintext");
            } else {
                info!(error = %e, "plaintext programs unavailable");
            }
            None
        }
    };
    let ring: Option<RingBuf<MapData>> = loader
        .ebpf
        .take_map(MAP_PLAINTEXT)
        .and_then(|m| m.try_into().ok());
    let mut chunks = None;
    if let (Some(a), Some(ring)) = (attacher.as_ref(), ring) {
        tokio::spawn(reader::read(
            ring,
            chunk_tx,
            exec_tx,
            stats,
            a.seen.clone(),
            Arc::new(AtomicBool::new(true)),
            a.reader_finish.clone(),
        ));
        match reader::dump_path() {
            Some(path) => {
                let pids = a.workload_of_pid.clone();
                tokio::spawn(reader::dump(chunk_rx, path, move |pid| {
                    pids.lock().ok().and_then(|g| g.get(&pid).cloned())
                }));
            }
            // The event reader's connection accounting reads them.
            None => chunks = Some(chunk_rx),
        }
    }
    super::handlers::sync_plaintext(attacher.as_mut(), &mut loader.ebpf, state, paths);
    (attacher, exec_rx, chunks)
}
