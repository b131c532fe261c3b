//! The glue of exact tokens (docs/exact-tokens.md, "How a connection is
//! counted"): plaintext chunks of the OpenSSL uprobes
//! (`crate::plaintext::reader::PlaintextChunk`) reach the tracked
//! connection they belong to, by socket cookie, and are read there by one
//! `exchange::Tracker` per connection; its exchanges, secrets and problems
//! go to [`ExactTokens`], and the tokens it counts to the budgets' tally.
//!
//! Owned by connection accounting (`crate::accounting::connections`, on the
//! event reader task), which opens and closes the entries here and asks at
//! close how much of its estimate the connection may still add
//! ([`Closed::estimate_allowed`]): never both for the same tokens.
//!
//! Bounded: a tracker exists only for a tracked connection of an
//! `exact_tokens` workload to a provider, opened while the agent ran, at
//! most [`MAX_CONNS`] at once. Chunks of anything else (cookie 0, a cookie
//! not tracked, an SDK call whose capture was cut) are skipped and counted
//! in `llm_egress_plaintext_problems_total{problem}` (`no_connection`,
//! `capture_gap`).
//!
//! Who can change the inputs: the chunk's bytes are what the workload's own
//! process wrote and read (it can lie about its own usage only by lying to
//! its own client library: the response comes from the provider through
//! TLS); the cookie is taken by the kernel programs from the socket, not
//! from the process.

use std::collections::{HashMap, HashSet};

use tracing::{debug, warn};

use crate::{
    accounting::exact_tokens::{ExactTokens, record_problem},
    accounting::token_tally::TokenTally,
    plaintext::exchange::{Direction, Output, Problem, Tracker},
    plaintext::reader::{self, PlaintextChunk},
    policy::Policy,
    telemetry::audit::{Attribution, AuditSink},
    telemetry::metrics::Metrics,
};

/// Connections with a tracker at once; later ones keep their estimate.
pub const MAX_CONNS: usize = 4096;

/// Problem label of a chunk with no tracked connection to go to.
pub const NO_CONNECTION: &str = "no_connection";
/// Problem label of a call whose capture was cut (pieces lost, or more
/// than `PLAINTEXT_CALL_MAX` bytes): the connection's reader stops.
pub const CAPTURE_GAP: &str = "capture_gap";
/// Problem label of an `exact_tokens` connection left without a tracker
/// because `MAX_CONNS` were open.
pub const TOO_MANY: &str = "too_many_connections";

struct Conn {
    workload: String,
    provider: String,
    who: Attribution,
    tracker: Tracker,
    /// Exchanges whose response carried usage (counted exactly).
    exact: u64,
    /// Tokens counted exactly (prompt, completion).
    tokens: (u64, u64),
    /// Something of this connection was not counted exactly: an exchange
    /// without usage, HTTP/2, a problem, a gap in the capture.
    partial: bool,
    /// No more chunks are read (a gap: the framing is lost).
    stopped: bool,
}

/// What a closed connection counted exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Closed {
    pub exchanges: u64,
    /// Tokens counted exactly (prompt, completion).
    pub tokens: (u64, u64),
    pub partial: bool,
}

impl Closed {
    /// How much of a connection's estimate (prompt, completion) it may
    /// still add: nothing when every exchange was counted exactly; else the
    /// estimate less what was counted exactly (none counted: the whole
    /// estimate, as for a workload without `exact_tokens`).
    pub fn estimate_allowed(&self, estimate: (u64, u64)) -> (u64, u64) {
        if self.exchanges > 0 && !self.partial {
            return (0, 0);
        }
        (
            estimate.0.saturating_sub(self.tokens.0),
            estimate.1.saturating_sub(self.tokens.1),
        )
    }
}

pub struct ExactConns {
    exact: ExactTokens,
    audit: AuditSink,
    /// Workloads with `exact_tokens = true`.
    workloads: HashSet<String>,
    conns: HashMap<u64, Conn>,
}

impl ExactConns {
    pub fn new(exact: ExactTokens, audit: AuditSink, policy: &Policy) -> Self {
        Self {
            exact,
            audit,
            workloads: exact_workloads(policy),
            conns: HashMap::new(),
        }
    }

    /// A new policy: prices, secret patterns and the `exact_tokens`
    /// workloads. Open connections keep their tracker (and its rules).
    pub fn reload(&mut self, policy: &Policy, generation: u64) {
        if let Err(e) = self.exact.reload(policy, generation) {
            warn!(error = %e, "exact tokens keep the previous prices and secret patterns");
        }
        self.workloads = exact_workloads(policy);
    }

    /// Whether `workload`'s connections count exact tokens (their estimates
    /// wait for the close).
    pub fn is_exact(&self, workload: &str) -> bool {
        self.workloads.contains(workload)
    }

    /// A tracked connection opened.
    pub fn opened(
        &mut self,
        metrics: &Metrics,
        cookie: u64,
        workload: &str,
        provider: &str,
        who: &Attribution,
    ) {
        if cookie == 0 || provider == "none" || !self.is_exact(workload) {
            return;
        }
        if self.conns.len() >= MAX_CONNS && !self.conns.contains_key(&cookie) {
            metrics
                .plaintext_problems
                .with_label_values(&[TOO_MANY])
                .inc();
            return;
        }
        self.conns.insert(
            cookie,
            Conn {
                workload: workload.to_owned(),
                provider: provider.to_owned(),
                who: who.clone(),
                tracker: Tracker::new(self.exact.secret_rules(workload)),
                exact: 0,
                tokens: (0, 0),
                partial: false,
                stopped: false,
            },
        );
    }

    /// Whether `cookie` has a tracker.
    pub fn has(&self, cookie: u64) -> bool {
        self.conns.contains_key(&cookie)
    }

    /// One TLS call's plaintext.
    pub fn chunk(&mut self, metrics: &Metrics, tally: &TokenTally, chunk: &PlaintextChunk) {
        let Some(conn) = self
            .conns
            .get_mut(&chunk.cookie)
            .filter(|_| chunk.cookie != 0)
        else {
            metrics
                .plaintext_problems
                .with_label_values(&[NO_CONNECTION])
                .inc();
            return;
        };
        if conn.stopped {
            return;
        }
        if !chunk.complete || chunk.truncated {
            // The rest of the call is missing: the framing of everything
            // after it would be wrong.
            conn.stopped = true;
            conn.partial = true;
            metrics
                .plaintext_problems
                .with_label_values(&[CAPTURE_GAP])
                .inc();
            return;
        }
        let direction = match chunk.direction {
            reader::Direction::Sent => Direction::Sent,
            reader::Direction::Received => Direction::Received,
        };
        let outputs = conn.tracker.feed(direction, &chunk.data);
        handle(&mut self.exact, &self.audit, metrics, tally, conn, outputs);
    }

    /// The connection closed (its summary, after the grace for late
    /// chunks); None: it had no tracker.
    pub fn close(&mut self, metrics: &Metrics, tally: &TokenTally, cookie: u64) -> Option<Closed> {
        let mut conn = self.conns.remove(&cookie)?;
        if !conn.stopped {
            let outputs = conn.tracker.close();
            handle(
                &mut self.exact,
                &self.audit,
                metrics,
                tally,
                &mut conn,
                outputs,
            );
        }
        debug!(cookie, workload = %conn.workload, provider = %conn.provider, exact = conn.exact, partial = conn.partial, stopped = conn.stopped, "plaintext reader closed");
        Some(Closed {
            exchanges: conn.exact,
            tokens: conn.tokens,
            partial: conn.partial,
        })
    }

    /// Forgets a connection whose summary was lost (what it counted stays
    /// counted).
    pub fn forget(&mut self, cookie: u64) {
        self.conns.remove(&cookie);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.len()
    }
}

fn exact_workloads(policy: &Policy) -> HashSet<String> {
    (policy.workloads.iter())
        .filter(|w| w.exact_tokens)
        .map(|w| w.name.clone())
        .collect()
}

fn handle(
    exact: &mut ExactTokens,
    audit: &AuditSink,
    metrics: &Metrics,
    tally: &TokenTally,
    conn: &mut Conn,
    outputs: Vec<Output>,
) {
    let (w, p) = (conn.workload.as_str(), conn.provider.as_str());
    for out in outputs {
        match out {
            Output::Exchange(ex) => {
                let charge = exact.record_exchange(metrics, audit, w, p, conn.who.clone(), &ex);
                tally.add(w, p, charge.tokens);
                match ex.usage {
                    Some(u) => {
                        conn.exact += 1;
                        conn.tokens.0 += u.input;
                        conn.tokens.1 += u.output;
                    }
                    None => conn.partial = true,
                }
            }
            // `block` is not enforced (docs/exact-tokens.md): recorded only.
            Output::Secret(f) => {
                exact.record_secret(metrics, audit, w, p, conn.who.clone(), &f);
            }
            Output::Http2 => {
                conn.partial = true;
                metrics
                    .plaintext_problems
                    .with_label_values(&["http2"])
                    .inc();
            }
            Output::Problem(problem) => {
                // A response cut by the close still gave its exchange
                // (with usage or not, which decides); any other problem
                // lost bytes that may have held a request.
                if problem != Problem::Truncated {
                    conn.partial = true;
                }
                record_problem(metrics, problem);
            }
        }
    }
}
