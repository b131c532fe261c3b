//! Connection accounting: the kernel's connection events (`CONN_UPDATE`,
//! `CONN_SUMMARY`, tied by socket cookie to the connect decision) become
//! byte counters, active-connection gauges, duration histograms, per-process
//! series, token estimates (`crate::accounting::conn_tokens`: at updates and at
//! close) and `connection`
//! records of the audit log.
//!
//! Connections of `exact_tokens` workloads also get a plaintext reader
//! (`crate::accounting::exact_conns`): their estimates wait for the close,
//! which waits [`CLOSE_GRACE`] for the last plaintext, and add only what
//! the exact counts did not cover (docs/exact-tokens.md, "How a connection
//! is counted").
//!
//! Per-process series are bounded per workload and go to the processes
//! with the most traffic (crate::accounting::process_series). State for closed connections is dropped at once; a connection whose
//! summary was lost (ring buffer full) is found by `reconcile` and dropped.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use llm_egress_common::{ConnEvent, TLS_RECEIVED, TLS_SENT, family, kind};

use crate::{
    accounting::conn_tokens::Counted,
    accounting::estimate_learning::{self, EstimateLearning},
    accounting::exact_conns::{Closed, ExactConns},
    accounting::process_series::ProcessSeries,
    accounting::token_tally::TokenTally,
    accounting::tokens,
    policy::{LearnEstimates, TelemetryConfig},
    telemetry::audit::{Attribution, ConnectionRecord},
    telemetry::metrics::Metrics,
};

/// A connection the agent saw being allowed, until its summary.
#[derive(Debug, Clone)]
struct Tracked {
    workload: String,
    provider: String,
    /// The executable name; its label may change while the connection
    /// lives (crate::accounting::process_series).
    process: String,
    sent: u64,
    received: u64,
    /// TLS records counted so far (sent, received).
    records: (u32, u32),
    /// Tokens estimated so far (at updates).
    tokens: Counted,
    /// Estimated tokens added to the metric and the tally so far (prompt,
    /// completion): less than `tokens` while estimates are deferred.
    added: (u64, u64),
    /// When the agent first saw it.
    since: Instant,
}

/// A connection younger than this is not taken for one whose summary was
/// lost: its kernel entry may not be visible yet.
pub const RECONCILE_MIN_AGE: Duration = Duration::from_secs(5);

/// How long the summary of a connection with a plaintext reader waits for
/// the chunks still on their way (they come through another ring buffer
/// and task than the summary).
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A summary waiting for [`CLOSE_GRACE`].
struct Pending {
    due: Instant,
    ev: ConnEvent,
    names: (String, String),
    who: Attribution,
    time: String,
}

pub struct Accounting {
    metrics: Metrics,
    config: TelemetryConfig,
    active: HashMap<u64, Tracked>,
    processes: ProcessSeries,
    /// Where counted tokens go to the budgets (`crate::token_tally`).
    tally: TokenTally,
    /// Plaintext readers of `exact_tokens` connections; None: no exact
    /// tokens (unit tests, or the settings could not be made).
    exact: Option<ExactConns>,
    pending: Vec<Pending>,
    /// What the exact counts taught the estimator
    /// (`[telemetry] learn_estimates`).
    learning: EstimateLearning,
    /// Where the learned lines are saved (`state_dir`); None: not saved.
    state_dir: Option<std::path::PathBuf>,
}

/// The process label of an attribution: the executable's file name, else
/// the command name.
pub fn process_name(who: &Attribution) -> String {
    who.exe
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or(&who.comm)
        .to_string()
}

impl Accounting {
    pub fn new(metrics: Metrics, config: TelemetryConfig) -> Self {
        Self {
            metrics: metrics.clone(),
            config,
            active: HashMap::new(),
            processes: ProcessSeries::new(metrics.clone()),
            tally: TokenTally::default(),
            exact: None,
            pending: Vec::new(),
            learning: EstimateLearning::default(),
            state_dir: None,
        }
    }

    /// Restores the estimator's learned lines from `dir` and saves them
    /// there from now on ([`Accounting::save_learning`]). A file that
    /// cannot be read is reported and ignored: it learns again.
    pub fn with_state_dir(mut self, dir: std::path::PathBuf) -> Self {
        let name = estimate_learning::STATE_FILE;
        let restored = crate::state_file::read_optional(&dir, name).and_then(|bytes| {
            bytes
                .map(|b| EstimateLearning::from_file(&b))
                .transpose()
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))
        });
        match restored {
            Ok(Some((learning, skipped))) => {
                self.learning = learning;
                tracing::info!(
                    lines = self.learning.learned().len(),
                    skipped,
                    "the token estimator's learned lines restored"
                );
                self.publish_learned();
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the estimator's learned lines are unreadable; learning again")
            }
        }
        self.state_dir = Some(dir);
        self
    }

    /// Saves the learned lines when they changed (every housekeeping
    /// round: at most ~10 s of learning is lost with a stop).
    pub fn save_learning(&mut self) {
        let Some(dir) = &self.state_dir else { return };
        if self.learning.take_changed()
            && let Err(e) = crate::state_file::write_private(
                dir,
                estimate_learning::STATE_FILE,
                &self.learning.to_file(),
            )
        {
            tracing::warn!(error = %e, dir = %dir.display(), "could not save the estimator's learned lines");
        }
    }

    /// Connections of `exact_tokens` workloads are read from plaintext.
    pub fn with_exact(mut self, exact: ExactConns) -> Self {
        self.exact = Some(exact);
        self
    }

    /// A new policy for the exact-token readers.
    pub fn set_policy(&mut self, policy: &crate::policy::Policy, generation: u64) {
        if self.state_dir.is_some() {
            self.state_dir = Some(policy.state_dir.clone());
        }
        if let Some(x) = &mut self.exact {
            x.reload(policy, generation);
        }
    }

    /// One TLS call's plaintext, for the connection of its cookie.
    pub fn plaintext(&mut self, chunk: &crate::capture::reader::PlaintextChunk) {
        match &mut self.exact {
            Some(x) => x.chunk(&self.metrics, &self.tally, chunk),
            None => self
                .metrics
                .plaintext_problems
                .with_label_values(&[crate::accounting::exact_conns::NO_CONNECTION])
                .inc(),
        }
    }

    fn deferred(&self, workload: &str) -> bool {
        self.exact.as_ref().is_some_and(|x| x.is_exact(workload))
    }

    /// Counted tokens go to `tally` too, where the budget keeper takes them.
    pub fn with_tally(mut self, tally: TokenTally) -> Self {
        self.tally = tally;
        self
    }

    pub fn set_config(&mut self, config: TelemetryConfig) {
        self.config = config;
    }

    /// An allowed TCP connect to a provider: the connection is active.
    pub fn opened(&mut self, cookie: u64, workload: &str, provider: &str, who: &Attribution) {
        if let Some(x) = &mut self.exact {
            x.opened(&self.metrics, cookie, workload, provider, who);
        }
        let process = process_name(who);
        self.processes
            .connection(workload, &process, &self.config, Instant::now());
        self.metrics
            .active_connections
            .with_label_values(&[workload, provider])
            .inc();
        let t = Tracked {
            workload: workload.into(),
            provider: provider.into(),
            process,
            sent: 0,
            received: 0,
            records: (0, 0),
            tokens: Counted::default(),
            added: (0, 0),
            since: Instant::now(),
        };
        if let Some(old) = self.active.insert(cookie, t) {
            // A cookie is unique for the kernel's lifetime; seeing it twice
            // means a summary was lost in between.
            self.metrics
                .active_connections
                .with_label_values(&[&old.workload, &old.provider])
                .dec();
        }
    }

    /// A `CONN_UPDATE` or `CONN_SUMMARY` event. `names` gives (workload,
    /// provider) of the connection when the agent did not see it open.
    /// Returns the audit record of a summary; the summary of a connection
    /// with a plaintext reader waits [`CLOSE_GRACE`] (see [`Self::flush`]).
    pub fn stats(
        &mut self,
        ev: &ConnEvent,
        names: (String, String),
        who: Attribution,
        time: String,
    ) -> Option<ConnectionRecord> {
        if ev.header.kind == kind::CONN_SUMMARY
            && self.exact.as_ref().is_some_and(|x| x.has(ev.data.cookie))
        {
            self.pending.push(Pending {
                due: Instant::now() + CLOSE_GRACE,
                ev: *ev,
                names,
                who,
                time,
            });
            return None;
        }
        self.apply(ev, names, who, time)
    }

    /// The summaries whose grace has passed at `now` (all with `now` far
    /// enough ahead), as audit records.
    pub fn flush(&mut self, now: Instant) -> Vec<ConnectionRecord> {
        let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.due <= now);
        self.pending = wait;
        due.into_iter()
            .filter_map(|p| self.apply(&p.ev, p.names, p.who, p.time))
            .collect()
    }

    fn apply(
        &mut self,
        ev: &ConnEvent,
        names: (String, String),
        who: Attribution,
        time: String,
    ) -> Option<ConnectionRecord> {
        let d = &ev.data;
        let summary = ev.header.kind == kind::CONN_SUMMARY;
        let tracked = match self.active.get(&d.cookie) {
            Some(t) => t.clone(),
            None => Tracked {
                workload: names.0,
                provider: names.1,
                process: process_name(&who),
                sent: 0,
                received: 0,
                records: (0, 0),
                tokens: Counted::default(),
                added: (0, 0),
                since: Instant::now(),
            },
        };
        // Counters are the socket's totals: count what is new since the
        // last event of this connection.
        let sent = d.bytes_sent.saturating_sub(tracked.sent);
        let received = d.bytes_received.saturating_sub(tracked.received);
        let (w, p) = (tracked.workload.as_str(), tracked.provider.as_str());
        self.metrics
            .bytes
            .with_label_values(&[w, p, "sent"])
            .inc_by(sent);
        self.metrics
            .bytes
            .with_label_values(&[w, p, "received"])
            .inc_by(received);
        let (out, inn) = (&d.tls[TLS_SENT], &d.tls[TLS_RECEIVED]);
        self.metrics
            .tls_records
            .with_label_values(&[w, p, "sent"])
            .inc_by(u64::from(out.records.saturating_sub(tracked.records.0)));
        self.metrics
            .tls_records
            .with_label_values(&[w, p, "received"])
            .inc_by(u64::from(inn.records.saturating_sub(tracked.records.1)));
        let label = self.processes.bytes(
            w,
            &tracked.process,
            sent,
            received,
            &self.config,
            Instant::now(),
        );
        let established = d.established_ns != 0;
        let end = if summary { d.closed_ns } else { d.reported_ns };
        let duration = if established {
            end.saturating_sub(d.established_ns)
        } else {
            0
        };
        let traffic = tokens::Traffic {
            bytes_sent: d.bytes_sent,
            bytes_received: d.bytes_received,
            segments_in: d.data_segs_in,
            segments_out: d.data_segs_out,
            duration: Duration::from_nanos(duration),
            app_records_in: (inn.lost == 0 && inn.records > 0).then_some(inn.app_records),
        };
        let (family, client) = (tokens::Family::of(p), tokens::Client::of(&tracked.process));
        let mut counted = tracked.tokens;
        let mut added = tracked.added;
        if !summary {
            if established {
                counted.update(family, client, &traffic);
            }
            // Connections of exact_tokens workloads estimate only at the
            // close, once it is known what was counted exactly.
            if !self.deferred(w) {
                let so_far = self.so_far((w, p), client, &counted, &traffic, family);
                let inc = (
                    so_far.0.saturating_sub(added.0),
                    so_far.1.saturating_sub(added.1),
                );
                self.count_tokens(w, p, inc);
                added = (added.0 + inc.0, added.1 + inc.1);
            }
            if let Some(t) = self.active.get_mut(&d.cookie) {
                t.sent = d.bytes_sent;
                t.received = d.bytes_received;
                t.records = (out.records, inn.records);
                t.tokens = counted;
                t.added = added;
            }
            return None;
        }
        let closed = match &mut self.exact {
            Some(x) => x.close(&self.metrics, &self.tally, d.cookie),
            None => None,
        };
        if self.active.remove(&d.cookie).is_some() {
            self.metrics
                .active_connections
                .with_label_values(&[w, p])
                .dec();
        }
        if established {
            self.metrics
                .connection_duration
                .with_label_values(&[w, p])
                .observe(duration as f64 / 1e9);
        } else {
            self.metrics
                .connect_failures
                .with_label_values(&[w, p])
                .inc();
        }
        let estimate = if established {
            counted.close(family, client, &traffic).and_then(|(e, _)| {
                let learned = self.learned(w, p, client, &e);
                self.learn_from_exact(w, p, client, closed, &e, learned);
                let (prompt, completion) = allowed(closed, learned);
                self.count_tokens(
                    w,
                    p,
                    (
                        prompt.saturating_sub(added.0),
                        completion.saturating_sub(added.1),
                    ),
                );
                // The record carries the estimate the connection added.
                let (prompt, completion) = (prompt.max(added.0), completion.max(added.1));
                (prompt + completion > 0 || closed.is_none()).then_some(tokens::Estimate {
                    prompt,
                    completion,
                    ..e
                })
            })
        } else {
            None
        };
        Some(ConnectionRecord {
            event: "connection",
            time,
            workload: tracked.workload.clone(),
            provider: tracked.provider.clone(),
            process: label,
            who,
            dst_addr: family::ip(d.family, &d.addr).to_string(),
            dst_port: d.port,
            established,
            connect_seconds: if established {
                d.established_ns.saturating_sub(d.connect_ns) as f64 / 1e9
            } else {
                0.0
            },
            duration_seconds: duration as f64 / 1e9,
            bytes_sent: d.bytes_sent,
            bytes_received: d.bytes_received,
            segments_received: d.data_segs_in,
            segments_sent: d.data_segs_out,
            records_sent: out.records,
            records_received: inn.records,
            app_records_sent: out.app_records,
            app_records_received: inn.app_records,
            records_sync_lost: u32::from(out.lost) + u32::from(inn.lost),
            records_resynced: u32::from(out.resyncs) + u32::from(inn.resyncs),
            generation: d.generation,
            tokens_prompt_estimated: estimate.map(|e| e.prompt),
            tokens_completion_estimated: estimate.map(|e| e.completion),
            streamed: estimate.map(|e| e.streamed()),
        })
    }

    /// Adds (prompt, completion) estimated tokens: to the metric, and to
    /// the tally the token budgets are charged from.
    fn count_tokens(&self, workload: &str, provider: &str, (prompt, completion): (u64, u64)) {
        self.tally.add(workload, provider, prompt + completion);
        let t = &self.metrics.tokens;
        t.with_label_values(&[workload, provider, "prompt", tokens::SOURCE])
            .inc_by(prompt);
        t.with_label_values(&[workload, provider, "completion", tokens::SOURCE])
            .inc_by(completion);
    }

    /// Drops process series idle for the configured time and fills free
    /// slots (crate::accounting::process_series).
    pub fn expire(&mut self) {
        self.processes.expire(&self.config, Instant::now());
    }

    /// Forgets active connections the kernel no longer tracks (their
    /// summary was lost); returns how many. `live` is the kernel's list,
    /// read before the ring was last drained; connections younger than
    /// [`RECONCILE_MIN_AGE`] at `now` and summaries waiting for their grace
    /// are kept.
    pub fn reconcile(&mut self, live: &HashSet<u64>, now: Instant) -> usize {
        let waiting: HashSet<u64> = self.pending.iter().map(|p| p.ev.data.cookie).collect();
        let gone: Vec<u64> = (self.active.iter())
            .filter(|(c, t)| {
                !live.contains(c)
                    && !waiting.contains(c)
                    && now.saturating_duration_since(t.since) >= RECONCILE_MIN_AGE
            })
            .map(|(c, _)| *c)
            .collect();
        for cookie in &gone {
            if let Some(x) = &mut self.exact {
                x.forget(*cookie);
            }
            if let Some(t) = self.active.remove(cookie) {
                self.metrics
                    .active_connections
                    .with_label_values(&[&t.workload, &t.provider])
                    .dec();
            }
        }
        gone.len()
    }

    #[cfg(test)]
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    #[cfg(test)]
    pub fn plaintext_readers(&self) -> usize {
        self.exact.as_ref().map_or(0, ExactConns::readers)
    }
}

impl Accounting {
    /// The (prompt, completion) estimate of a closing connection: the
    /// calibration's `e`, corrected by what exact counts taught
    /// (`crate::accounting::estimate_learning`) when that is on.
    fn learned(
        &self,
        w: &str,
        p: &str,
        client: tokens::Client,
        e: &tokens::Estimate,
    ) -> (u64, u64) {
        match self.learning_scope(w) {
            Some(scope) => self.learning.correct((scope, p), client, e),
            None => (e.prompt, e.completion),
        }
    }

    /// The scope of the lines `w`'s connections learn and use; `None`:
    /// learning is off.
    fn learning_scope<'a>(&self, w: &'a str) -> Option<&'a str> {
        match self.config.learn_estimates {
            LearnEstimates::Host => Some(estimate_learning::HOST),
            LearnEstimates::Workload => Some(w),
            LearnEstimates::Off => None,
        }
    }

    /// The tokens an open connection has shown so far: what
    /// [`Counted::update`] counted, and no more than the learned correction
    /// of the estimate so far (a counter cannot go back, so the smaller of
    /// the two; the close adds the rest).
    fn so_far(
        &self,
        (w, p): (&str, &str),
        client: tokens::Client,
        counted: &Counted,
        t: &tokens::Traffic,
        family: tokens::Family,
    ) -> (u64, u64) {
        let raw = (counted.prompt, counted.completion);
        let Some(scope) = self.learning_scope(w) else {
            return raw;
        };
        match counted.estimate_now(family, client, t) {
            Some(e) if self.learning.knows((scope, p), client, &e) => {
                let c = self.learning.correct((scope, p), client, &e);
                (raw.0.min(c.0), raw.1.min(c.1))
            }
            _ => raw,
        }
    }

    /// Where a connection's every exchange was counted exactly: the
    /// estimator's error, before learning (`llm_egress_token_estimate_ratio`)
    /// and with what was learned before this connection
    /// (`llm_egress_token_estimate_learned_ratio`), per kind with exact
    /// tokens; then the estimator learns from it (docs/exact-tokens.md).
    fn learn_from_exact(
        &mut self,
        w: &str,
        p: &str,
        client: tokens::Client,
        closed: Option<Closed>,
        e: &tokens::Estimate,
        learned: (u64, u64),
    ) {
        let Some(c) = closed.filter(|c| c.exchanges > 0 && !c.partial) else {
            return;
        };
        for (kind, raw, learned, exact) in [
            ("prompt", e.prompt, learned.0, c.tokens.0),
            ("completion", e.completion, learned.1, c.tokens.1),
        ] {
            if exact > 0 {
                self.metrics
                    .token_estimate_ratio
                    .with_label_values(&[w, p, kind])
                    .observe(raw as f64 / exact as f64);
                self.metrics
                    .token_estimate_learned_ratio
                    .with_label_values(&[w, p, kind])
                    .observe(learned as f64 / exact as f64);
            }
        }
        if let Some(scope) = self.learning_scope(w) {
            self.learning.learn((scope, p), client, e, c.tokens);
            self.publish_learned();
        }
    }

    /// `llm_egress_token_estimate_learned`: every line in use.
    fn publish_learned(&self) {
        let g = &self.metrics.token_estimate_learned;
        for l in self.learning.learned() {
            let scope = if l.scope == estimate_learning::HOST {
                "host"
            } else {
                &l.scope
            };
            let (k, s, c) = (l.kind.name(), l.shape.name(), l.client.name());
            for (term, v) in [
                ("offset", l.offset),
                ("slope", l.slope),
                ("samples", l.samples),
            ] {
                g.with_label_values(&[scope, &l.provider, k, s, c, term])
                    .set(v);
            }
        }
    }
}

/// The estimate (prompt, completion) a closing connection may add in all:
/// the whole estimate without a plaintext reader, else what its exact
/// counts did not cover ([`Closed::estimate_allowed`]).
fn allowed(closed: Option<Closed>, estimate: (u64, u64)) -> (u64, u64) {
    match closed {
        None => estimate,
        Some(c) => c.estimate_allowed(estimate),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use llm_egress_common::ConnStats;

    pub(crate) fn who(exe: &str) -> Attribution {
        Attribution {
            exe: exe.into(),
            comm: "comm".into(),
            ..Attribution::default()
        }
    }

    pub(crate) fn config(limit: usize) -> TelemetryConfig {
        TelemetryConfig {
            process_series_per_workload: limit,
            process_series_ttl: Duration::from_secs(600),
            learn_estimates: Default::default(),
        }
    }

    pub(crate) fn stats(cookie: u64, kind: u32, sent: u64, received: u64) -> ConnEvent {
        let mut ev = ConnEvent::default();
        ev.header.kind = kind;
        ev.data = ConnStats {
            cookie,
            bytes_sent: sent,
            bytes_received: received,
            established_ns: 10,
            closed_ns: 2_000_000_010,
            ..Default::default()
        };
        ev
    }

    #[test]
    fn updates_and_summary_count_each_byte_once() {
        let m = Metrics::new().unwrap();
        let mut a = Accounting::new(m.clone(), config(20));
        a.opened(7, "bot", "openai", &who("/usr/bin/python3"));
        assert_eq!(
            m.active_connections
                .with_label_values(&["bot", "openai"])
                .get(),
            1
        );
        a.stats(
            &stats(7, kind::CONN_UPDATE, 100, 1_000),
            ("x".into(), "y".into()),
            who(""),
            String::new(),
        );
        let rec = a
            .stats(
                &stats(7, kind::CONN_SUMMARY, 150, 5_000),
                ("x".into(), "y".into()),
                who(""),
                String::new(),
            )
            .unwrap();
        assert_eq!(
            m.bytes.with_label_values(&["bot", "openai", "sent"]).get(),
            150
        );
        assert_eq!(
            m.bytes
                .with_label_values(&["bot", "openai", "received"])
                .get(),
            5_000
        );
        assert_eq!(
            m.process_bytes
                .with_label_values(&["bot", "python3", "received"])
                .get(),
            5_000
        );
        assert_eq!(
            m.active_connections
                .with_label_values(&["bot", "openai"])
                .get(),
            0
        );
        assert_eq!(
            (
                rec.workload.as_str(),
                rec.process.as_str(),
                rec.duration_seconds
            ),
            ("bot", "python3", 2.0)
        );
        assert_eq!(a.active_count(), 0, "closed connections leave no state");
    }

    #[test]
    fn tls_records_are_counted_once_and_reported_at_close() {
        let m = Metrics::new().unwrap();
        let mut a = Accounting::new(m.clone(), config(20));
        a.opened(8, "bot", "openai", &who("/usr/bin/curl"));
        let with = |kind, (rs, rr): (u32, u32), lost: u16| {
            let mut ev = stats(8, kind, 2_000, 9_000);
            ev.data.tls[TLS_SENT].records = rs;
            ev.data.tls[TLS_SENT].app_records = rs.saturating_sub(3);
            ev.data.tls[TLS_RECEIVED].records = rr;
            ev.data.tls[TLS_RECEIVED].app_records = rr.saturating_sub(4);
            ev.data.tls[TLS_RECEIVED].lost = lost;
            ev
        };
        let names = || ("x".to_string(), "y".to_string());
        a.stats(
            &with(kind::CONN_UPDATE, (5, 40), 0),
            names(),
            who(""),
            String::new(),
        );
        let rec = a
            .stats(
                &with(kind::CONN_SUMMARY, (6, 130), 1),
                names(),
                who(""),
                String::new(),
            )
            .unwrap();
        let get = |dir| {
            m.tls_records
                .with_label_values(&["bot", "openai", dir])
                .get()
        };
        assert_eq!((get("sent"), get("received")), (6, 130));
        assert_eq!(
            (
                rec.records_sent,
                rec.records_received,
                rec.app_records_sent,
                rec.app_records_received,
                rec.records_sync_lost
            ),
            (6, 130, 3, 126, 1)
        );
    }

    #[test]
    fn process_labels_are_bounded_per_workload_and_expire() {
        let m = Metrics::new().unwrap();
        let mut a = Accounting::new(m.clone(), config(2));
        for (cookie, exe) in [(1, "/bin/a"), (2, "/bin/b"), (3, "/bin/c"), (4, "/bin/d")] {
            a.opened(cookie, "w", "p", &who(exe));
        }
        a.opened(5, "v", "p", &who("/bin/c"));
        let series = |w: &str, p: &str| m.process_connections.with_label_values(&[w, p]).get();
        assert_eq!(
            (series("w", "a"), series("w", "b"), series("w", "other")),
            (1, 1, 2)
        );
        assert_eq!(series("v", "c"), 1, "the limit is per workload");
        a.set_config(TelemetryConfig {
            process_series_per_workload: 2,
            process_series_ttl: Duration::ZERO,
            learn_estimates: Default::default(),
        });
        a.expire();
        let families = m.registry.gather();
        let left = families
            .iter()
            .find(|f| f.name() == "llm_egress_process_connections_total")
            .map(|f| f.get_metric().len());
        assert_eq!(
            left,
            Some(1),
            "only the never-expiring `other` series is left"
        );
    }

    #[test]
    fn reconcile_drops_connections_whose_summary_was_lost() {
        let m = Metrics::new().unwrap();
        let mut a = Accounting::new(m.clone(), config(20));
        a.opened(1, "w", "p", &who("/bin/a"));
        a.opened(2, "w", "p", &who("/bin/a"));
        assert_eq!(
            a.reconcile(&HashSet::from([2]), Instant::now()),
            0,
            "too young"
        );
        let later = Instant::now() + RECONCILE_MIN_AGE;
        assert_eq!(a.reconcile(&HashSet::from([2]), later), 1);
        assert_eq!(m.active_connections.with_label_values(&["w", "p"]).get(), 1);
    }

    #[test]
    fn summaries_carry_token_estimates_counted_as_estimated() {
        let m = Metrics::new().unwrap();
        let tally = crate::accounting::token_tally::TokenTally::default();
        let mut a = Accounting::new(m.clone(), config(20)).with_tally(tally.clone());
        a.opened(3, "bot", "anthropic", &who("/usr/bin/curl"));
        let mut ev = stats(3, kind::CONN_SUMMARY, 1_600, 4_000);
        ev.data.data_segs_in = 3;
        let rec = a
            .stats(&ev, ("x".into(), "y".into()), who(""), String::new())
            .unwrap();
        let (p, c) = (
            rec.tokens_prompt_estimated.unwrap(),
            rec.tokens_completion_estimated.unwrap(),
        );
        assert!(p > 0 && c > 0, "{rec:?}");
        assert_eq!(rec.streamed, Some(false));
        let get = |kind| {
            m.tokens
                .with_label_values(&["bot", "anthropic", kind, "estimated"])
                .get()
        };
        assert_eq!((get("prompt"), get("completion")), (p, c));
        // The budgets get the same count, through the tally.
        let bucket = crate::kernel::limit_entries::bucket_id("bot", "anthropic");
        assert_eq!(tally.take().get(&bucket), Some(&(p + c)));
        // No handshake, no request: no estimate, nothing counted.
        let mut ev = stats(4, kind::CONN_SUMMARY, 0, 0);
        ev.data.established_ns = 0;
        let rec = a
            .stats(
                &ev,
                ("bot".into(), "anthropic".into()),
                who(""),
                String::new(),
            )
            .unwrap();
        assert_eq!((rec.tokens_prompt_estimated, rec.streamed), (None, None));
        assert_eq!(get("prompt"), p);
    }

    #[test]
    fn failed_handshakes_are_counted_not_timed() {
        let m = Metrics::new().unwrap();
        let mut a = Accounting::new(m.clone(), config(20));
        let mut ev = stats(9, kind::CONN_SUMMARY, 0, 0);
        ev.data.established_ns = 0;
        let rec = a
            .stats(&ev, ("w".into(), "p".into()), who("/bin/x"), String::new())
            .unwrap();
        assert!(!rec.established);
        assert_eq!(m.connect_failures.with_label_values(&["w", "p"]).get(), 1);
    }
}
