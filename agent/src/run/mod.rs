//! The running agent: [`start`] brings every part up, then [`Running`]
//! reacts to what changes until SIGTERM/SIGINT, then stops cleanly.
//!
//! Sources of change ([`Sources`]), all handled on one task so that map
//! writes never interleave: SIGHUP or a changed policy file (a new policy:
//! written to the idle slot, then activated; `reload`), the cgroup watcher
//! (workload cgroups appear or go), the node's pod list (`kube`: pods
//! appear, labels change), resolver rounds (provider addresses), DNS
//! answers the kernel gave up on, and a 1 s tick that copies the kernel
//! counters into metrics (`handlers`).

pub mod args;
mod handlers;
mod reload;
mod start;
mod state;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, atomic::AtomicBool},
};

use tokio::{
    signal::unix::Signal,
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
    time::Interval,
};

use crate::{
    attribution::process::CgroupPaths,
    capture::{attach::Attacher, reader::ExecReport},
    events::{decode::DnsAnswer, names::Names},
    kernel::{
        loader::{self, Loader, ProgramFailure},
        maps::KernelMaps,
        programs::ProgramsError,
    },
    limits::limiter::Limiter,
    names::resolver::{HostAddrs, Resolver},
    policy::PolicyErrors,
    telemetry::{audit::AuditSink, http::Health, metrics::Metrics},
};
use args::RunArgs;
use state::State;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid policy:\n{0}")]
    Policy(#[from] PolicyErrors),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Programs(#[from] ProgramsError),
    #[error(transparent)]
    Maps(#[from] crate::kernel::maps::MapsError),
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
    Untrusted(#[from] crate::policy::ownership::Untrusted),
}

/// `llm-egress run`.
pub async fn run(args: RunArgs) -> Result<(), RunError> {
    let mut agent = start::start(args).await?;
    agent.serve().await?;
    agent.stop().await
}

/// A resolver round's result: the generation it was started for, the
/// addresses, the failures.
type Resolved = (u64, HostAddrs, u64);

/// Where changes come from.
struct Sources {
    hup: Signal,
    term: Signal,
    int: Signal,
    /// The node's pod list changed.
    pod_changes: mpsc::Receiver<()>,
    /// Workload cgroups may have appeared or gone.
    cgroup_changes: mpsc::Receiver<()>,
    /// The policy file may have changed (inotify; None without it).
    file_changes: Option<mpsc::Receiver<()>>,
    /// DNS answers the kernel could not parse, from the event reader.
    dns_answers: mpsc::Receiver<DnsAnswer>,
    resolved: mpsc::Receiver<Resolved>,
    /// The next resolver round (`resolver.refresh`).
    refresh: Interval,
    /// The 1 s tick.
    tick: Interval,
    /// A fleet ledger's answer arrived (None without `[fleet]`).
    fleet_wake: Option<Arc<Notify>>,
    /// Processes that exec'd in an `exact_tokens` workload (paused until
    /// their uprobes are attached).
    execs_paused: mpsc::Receiver<ExecReport>,
}

/// The agent once started: what it enforces, the parts it drives, and the
/// sources of change.
struct Running {
    args: RunArgs,
    state: State,
    maps: KernelMaps,
    loader: Loader,
    metrics: Metrics,
    audit: AuditSink,
    health: Arc<Health>,
    limiter: Limiter,
    /// Workload and provider names of the recent generations (events).
    names: Names,
    paths: CgroupPaths,
    /// The programs that failed and those `programs` leaves out: a reload
    /// that needs one is refused.
    unavailable: Vec<ProgramFailure>,
    resolver: Resolver,
    resolved_tx: mpsc::Sender<Resolved>,
    /// The policy and its generation, to the event reader (telemetry
    /// settings, exact-token prices and secret patterns).
    telemetry_tx: watch::Sender<crate::events::PolicyUpdate>,
    events_alive: Arc<AtomicBool>,
    events_task: JoinHandle<()>,
    http_task: Option<JoinHandle<()>>,
    /// The policy file's content hash when last read.
    file_hash: Option<u64>,
    /// 1 s ticks so far.
    ticks: u64,
    /// The OpenSSL uprobes of `exact_tokens` workloads (None when the
    /// kernel refused the plaintext programs).
    attacher: Option<Attacher>,
    sources: Sources,
}
