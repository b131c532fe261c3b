//! Uprobe links are closed on a thread of their own. Closing one takes
//! about 100 ms on 6.18 (the kernel waits for a grace period under a lock
//! all closes share, so closes on several threads do not overlap): the
//! eight probes of one ended process would hold the agent's loop for most
//! of a second, and signals, reloads, the DNS fallback and processes paused
//! at exec would wait behind it (measured: docs/plaintext.md, "Costs").
//!
//! The processes whose links wait here count against the attacher's
//! `max_processes`: a workload that starts and ends processes faster than
//! their probes can be closed gets its new processes counted as
//! `overflow`, never an unbounded queue of open perf events.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::Instant,
};

use aya::programs::uprobe::UProbeLink;
use tracing::{debug, warn};

/// The closing thread and how many processes' links it still holds.
pub struct Detacher {
    tx: Option<mpsc::Sender<Vec<UProbeLink>>>,
    /// Processes, then links, not closed yet.
    pending: Arc<(AtomicUsize, AtomicUsize)>,
}

impl Detacher {
    /// Starts the thread; without it (thread creation failed) links are
    /// closed by the caller, as before.
    pub fn spawn() -> Self {
        let (tx, rx) = mpsc::channel::<Vec<UProbeLink>>();
        let pending = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let count = pending.clone();
        let spawned = thread::Builder::new()
            .name("uprobe-detach".into())
            .spawn(move || {
                for links in rx {
                    let (n, started) = (links.len(), Instant::now());
                    drop(links);
                    count.1.fetch_sub(n, Ordering::SeqCst);
                    let left = count.0.fetch_sub(1, Ordering::SeqCst) - 1;
                    debug!(
                        links = n,
                        ms = started.elapsed().as_millis() as u64,
                        left,
                        "uprobe links closed"
                    );
                }
            });
        match spawned {
            Ok(_) => Self {
                tx: Some(tx),
                pending,
            },
            Err(e) => {
                warn!(error = %e, "cannot start the uprobe detach thread: uprobes are detached on the agent's loop");
                Self { tx: None, pending }
            }
        }
    }

    /// Closes one process's links, off the caller's thread.
    pub fn detach(&self, links: Vec<UProbeLink>) {
        if links.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else {
            drop(links);
            return;
        };
        let n = links.len();
        self.pending.0.fetch_add(1, Ordering::SeqCst);
        self.pending.1.fetch_add(n, Ordering::SeqCst);
        if let Err(mpsc::SendError(links)) = tx.send(links) {
            self.pending.0.fetch_sub(1, Ordering::SeqCst);
            self.pending.1.fetch_sub(n, Ordering::SeqCst);
            drop(links);
        }
    }

    /// Processes whose links are not closed yet.
    pub fn pending(&self) -> usize {
        self.pending.0.load(Ordering::SeqCst)
    }

    /// Links not closed yet.
    pub fn pending_links(&self) -> usize {
        self.pending.1.load(Ordering::SeqCst)
    }
}
