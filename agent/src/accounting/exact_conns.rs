//! The glue of exact tokens (docs/exact-tokens.md, "How a connection is
//! counted"): plaintext chunks of the OpenSSL uprobes
//! (`crate::capture::reader::PlaintextChunk`) reach the tracked
//! connection they belong to, by socket cookie, and are read there by one
//! `exchange::Tracker` per connection; its exchanges, secrets and problems
//! go to [`ExactTokens`], and the tokens and dollars it counts to the
//! budgets' tally.
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
    capture::reader::{self, PlaintextChunk},
    kernel::socket_stop::{SocketStop, Stopped},
    plaintext::exchange::{Direction, Output, Problem, Tracker},
    policy::{Policy, SecretAction},
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
    /// No more chunks are read (a gap: the framing is lost; or the
    /// connection was stopped for a secret).
    stopped: bool,
    /// Stopped for a secret (`secrets = "block"`).
    blocked: bool,
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
    /// Stops connections of workloads whose `secrets` is `block` (None:
    /// unit tests, or the map was missing: recorded as `block_failed`).
    stop: Option<SocketStop>,
}

impl ExactConns {
    pub fn new(exact: ExactTokens, audit: AuditSink, policy: &Policy) -> Self {
        Self {
            exact,
            audit,
            workloads: exact_workloads(policy),
            conns: HashMap::new(),
            stop: None,
        }
    }

    /// What `secrets = "block"` stops connections with.
    pub fn with_stop(mut self, stop: SocketStop) -> Self {
        self.stop = Some(stop);
        self
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
                blocked: false,
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
            // after it would be wrong. A whole first 1 MiB of a larger
            // request (one SSL_write of its body) is still read first: a
            // secret there is found (and blocked) before the reader stops.
            if chunk.complete && chunk.direction == reader::Direction::Sent {
                let outputs = conn.tracker.feed(Direction::Sent, &chunk.data);
                let mut stop = Stop {
                    stop: self.stop.as_mut(),
                    cookie: chunk.cookie,
                    pid: chunk.pid,
                    call_ns: chunk.time_ns,
                };
                let outputs = outputs
                    .into_iter()
                    .filter(|o| matches!(o, Output::Secret(_)))
                    .collect();
                handle(
                    &mut self.exact,
                    &self.audit,
                    metrics,
                    tally,
                    conn,
                    outputs,
                    Some(&mut stop),
                );
            }
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
        let mut stop = Stop {
            stop: self.stop.as_mut(),
            cookie: chunk.cookie,
            pid: chunk.pid,
            call_ns: chunk.time_ns,
        };
        handle(
            &mut self.exact,
            &self.audit,
            metrics,
            tally,
            conn,
            outputs,
            Some(&mut stop),
        );
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
                None,
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
    pub fn readers(&self) -> usize {
        self.conns.len()
    }
}

fn exact_workloads(policy: &Policy) -> HashSet<String> {
    (policy.workloads.iter())
        .filter(|w| w.exact_tokens)
        .map(|w| w.name.clone())
        .collect()
}

/// How to stop the connection a chunk came from: its cookie and the
/// process that wrote it (whose network namespace holds the socket).
struct Stop<'a> {
    stop: Option<&'a mut SocketStop>,
    cookie: u64,
    pid: u32,
    /// When the TLS call returned (CLOCK_MONOTONIC): the stop's delay is
    /// logged from it.
    call_ns: u64,
}

fn handle(
    exact: &mut ExactTokens,
    audit: &AuditSink,
    metrics: &Metrics,
    tally: &TokenTally,
    conn: &mut Conn,
    outputs: Vec<Output>,
    mut stop: Option<&mut Stop>,
) {
    let (w, p) = (conn.workload.as_str(), conn.provider.as_str());
    for out in outputs {
        match out {
            Output::Exchange(ex) => {
                let charge = exact.record_exchange(metrics, audit, w, p, conn.who.clone(), &ex);
                tally.add(w, p, charge.tokens);
                if let Some(usd) = charge.usd {
                    tally.add_usd(w, usd);
                }
                match ex.usage {
                    Some(u) => {
                        conn.exact += 1;
                        conn.tokens.0 += u.input;
                        conn.tokens.1 += u.output;
                    }
                    None => conn.partial = true,
                }
            }
            // `block`: the connection is stopped first (every microsecond
            // lets more of the request leave), then recorded; its reader
            // stops (the rest of the request is not read).
            Output::Secret(f) => {
                let action = exact.secret_action(w);
                let mut delay_us = 0;
                let result = match (action, stop.as_deref_mut()) {
                    (SecretAction::Block, _) if conn.blocked => continue,
                    (SecretAction::Block, Some(s)) => {
                        conn.blocked = true;
                        conn.stopped = true;
                        conn.partial = true;
                        let r = match s.stop.as_deref_mut() {
                            Some(st) => st.stop(s.cookie, s.pid),
                            None => Stopped::Failed,
                        };
                        delay_us =
                            crate::kernel::maps::monotonic_ns().saturating_sub(s.call_ns) / 1000;
                        Some(r)
                    }
                    // Found at the close: nothing left to stop.
                    (SecretAction::Block, None) => Some(Stopped::Failed),
                    _ => None,
                };
                if let Some(r) = result {
                    warn!(workload = w, provider = p, kind = %f.kind, fingerprint = %f.fingerprint, result = r.as_str(), delay_us, "secret in a request: connection stopped (secrets = \"block\")");
                }
                exact.record_secret(metrics, audit, w, p, conn.who.clone(), &f, action, result);
                if conn.blocked {
                    break;
                }
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

/// Tests of the routing and of never-both, through connection accounting.
#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        time::{Duration, Instant},
    };

    use llm_egress_common::{ConnEvent, kind};

    use super::*;
    use crate::{
        accounting::{
            conn_tokens::Counted,
            connections::{
                Accounting, CLOSE_GRACE, RECONCILE_MIN_AGE,
                tests::{config, stats, who},
            },
            tokens,
        },
        capture::reader::{Direction, PlaintextChunk},
        telemetry::audit::ConnectionRecord,
    };

    const REQUEST: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"model\":\"gpt-4o\",\"n\":1}  ";
    fn response() -> Vec<u8> {
        let body = br#"{"model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":1234,"completion_tokens":567,"total_tokens":1801}}"#;
        let mut m = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        m.extend_from_slice(body);
        m
    }

    fn chunk(cookie: u64, direction: Direction, data: &[u8]) -> PlaintextChunk {
        PlaintextChunk {
            cookie,
            ssl: 1,
            pid: 2,
            tid: 2,
            cgroup_id: 3,
            direction,
            time_ns: 0,
            data: data.to_vec(),
            call_len: data.len() as u64,
            truncated: false,
            complete: true,
        }
    }

    fn accounting(m: &Metrics, tally: &TokenTally) -> Accounting {
        let text = "[[workloads]]\nname = \"bot\"\nsystemd_unit = \"bot.service\"\nallow = [\"openai\"]\nexact_tokens = true\n\n[[workloads]]\nname = \"plain\"\nsystemd_unit = \"plain.service\"\nallow = [\"openai\"]\n";
        let policy = match crate::policy::Policy::parse(text, "test.toml") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        };
        let audit = AuditSink::open(&crate::policy::AuditLog::Off, m.clone()).expect("audit");
        let exact = ExactTokens::new(&policy, 1).expect("exact");
        Accounting::new(m.clone(), config(20))
            .with_tally(tally.clone())
            .with_exact(ExactConns::new(exact, audit, &policy))
    }

    /// A streamed-looking connection: an update would count estimates.
    fn traffic(cookie: u64, kind: u32) -> ConnEvent {
        let mut ev = stats(cookie, kind, 3_000, 60_000);
        ev.data.data_segs_in = 200;
        ev.data.data_segs_out = 3;
        ev.data.reported_ns = 6_000_000_010;
        ev.data.closed_ns = 7_000_000_010;
        ev
    }

    fn get(m: &Metrics, w: &str, kind: &str, source: &str) -> u64 {
        m.tokens
            .with_label_values(&[w, "openai", kind, source])
            .get()
    }

    fn close(a: &mut Accounting, ev: &ConnEvent) -> ConnectionRecord {
        let names = ("x".to_string(), "y".to_string());
        assert!(
            a.stats(ev, names, who(""), String::new()).is_none(),
            "the summary of a read connection waits for late plaintext"
        );
        assert!(a.flush(Instant::now()).is_empty(), "not before the grace");
        let mut out = a.flush(Instant::now() + CLOSE_GRACE);
        assert_eq!(out.len(), 1);
        out.remove(0)
    }

    #[test]
    fn an_exact_connection_adds_exact_tokens_and_no_estimate() {
        let (m, tally) = (Metrics::new().unwrap(), TokenTally::default());
        let mut a = accounting(&m, &tally);
        a.opened(5, "bot", "openai", &who("/usr/bin/curl"));
        a.plaintext(&chunk(5, Direction::Sent, REQUEST));
        let update = traffic(5, kind::CONN_UPDATE);
        a.stats(&update, ("x".into(), "y".into()), who(""), String::new());
        assert_eq!(
            get(&m, "bot", "prompt", "estimated"),
            0,
            "no per-update estimate"
        );
        let summary = traffic(5, kind::CONN_SUMMARY);
        let names = ("x".to_string(), "y".to_string());
        assert!(a.stats(&summary, names, who(""), String::new()).is_none());
        // The response's last bytes come after the summary: still read.
        a.plaintext(&chunk(5, Direction::Received, &response()));
        let rec = a.flush(Instant::now() + CLOSE_GRACE).remove(0);
        assert_eq!(
            (
                get(&m, "bot", "prompt", "exact"),
                get(&m, "bot", "completion", "exact")
            ),
            (1234, 567)
        );
        assert_eq!(
            (
                get(&m, "bot", "prompt", "estimated"),
                get(&m, "bot", "completion", "estimated")
            ),
            (0, 0),
            "never both"
        );
        assert_eq!(rec.tokens_prompt_estimated, None);
        // The estimate it did not add shows the estimator's error.
        for kind in ["prompt", "completion"] {
            let ratio = m
                .token_estimate_ratio
                .with_label_values(&["bot", "openai", kind]);
            assert_eq!(ratio.get_sample_count(), 1, "{kind}: one connection");
            assert!(ratio.get_sample_sum() > 0.0, "{kind}: estimate / exact");
        }
        let bucket = crate::kernel::limit_entries::bucket_id("bot", "openai");
        assert_eq!(
            tally.take().get(&bucket),
            Some(&1801),
            "budgets get the exact count"
        );
        assert_eq!(
            m.model_tokens
                .with_label_values(&["bot", "openai", "gpt-4o", "prompt"])
                .get(),
            1234
        );
    }

    #[test]
    fn an_exact_connection_without_plaintext_adds_its_estimate_at_close() {
        let (m, tally) = (Metrics::new().unwrap(), TokenTally::default());
        let mut a = accounting(&m, &tally);
        // The same traffic on a workload without exact_tokens, for the
        // figure to expect.
        a.opened(1, "plain", "openai", &who("/usr/bin/curl"));
        a.stats(
            &traffic(1, kind::CONN_UPDATE),
            ("x".into(), "y".into()),
            who(""),
            String::new(),
        );
        assert!(
            get(&m, "plain", "prompt", "estimated") > 0,
            "plain: estimated at updates"
        );
        assert_eq!(a.plaintext_readers(), 0, "no reader for a plain workload");
        let plain = a
            .stats(
                &traffic(1, kind::CONN_SUMMARY),
                ("x".into(), "y".into()),
                who(""),
                String::new(),
            )
            .expect("a plain summary is not held");
        a.opened(2, "bot", "openai", &who("/usr/bin/curl"));
        a.stats(
            &traffic(2, kind::CONN_UPDATE),
            ("x".into(), "y".into()),
            who(""),
            String::new(),
        );
        assert_eq!(get(&m, "bot", "prompt", "estimated"), 0, "deferred");
        let rec = close(&mut a, &traffic(2, kind::CONN_SUMMARY));
        assert_eq!(
            (
                get(&m, "bot", "prompt", "estimated"),
                get(&m, "bot", "completion", "estimated")
            ),
            (
                get(&m, "plain", "prompt", "estimated"),
                get(&m, "plain", "completion", "estimated")
            ),
        );
        assert_eq!(rec.tokens_prompt_estimated, plain.tokens_prompt_estimated);
        assert_eq!(get(&m, "bot", "prompt", "exact"), 0);
        assert_eq!(
            a.plaintext_readers(),
            0,
            "closed connections leave no reader"
        );
    }

    #[test]
    fn a_gap_keeps_only_the_estimate_beyond_the_exact_count() {
        let (m, tally) = (Metrics::new().unwrap(), TokenTally::default());
        let mut a = accounting(&m, &tally);
        a.opened(3, "bot", "openai", &who("/usr/bin/curl"));
        a.plaintext(&chunk(3, Direction::Sent, REQUEST));
        a.plaintext(&chunk(3, Direction::Received, &response()));
        let mut cut = chunk(3, Direction::Sent, REQUEST);
        cut.complete = false;
        a.plaintext(&cut);
        a.plaintext(&chunk(3, Direction::Sent, REQUEST));
        let rec = close(&mut a, &traffic(3, kind::CONN_SUMMARY));
        let gap = m
            .plaintext_problems
            .with_label_values(&["capture_gap"])
            .get();
        assert_eq!(gap, 1);
        assert_eq!(
            get(&m, "bot", "prompt", "exact"),
            1234,
            "read up to the gap only"
        );
        let e = (
            rec.tokens_prompt_estimated.unwrap_or(0),
            rec.tokens_completion_estimated.unwrap_or(0),
        );
        assert_eq!(get(&m, "bot", "prompt", "estimated"), e.0);
        // The estimate of this traffic, less what was counted exactly.
        let mut c = Counted::default();
        let t = &traffic(3, kind::CONN_SUMMARY).data;
        let full = c
            .close(
                tokens::Family::of("openai"),
                tokens::Client::of("curl"),
                &tokens::Traffic {
                    bytes_sent: t.bytes_sent,
                    bytes_received: t.bytes_received,
                    segments_in: t.data_segs_in,
                    segments_out: t.data_segs_out,
                    duration: Duration::from_secs(7),
                    app_records_in: None,
                },
            )
            .unwrap()
            .0;
        assert_eq!(
            e,
            (
                full.prompt.saturating_sub(1234),
                full.completion.saturating_sub(567)
            )
        );
    }

    #[test]
    fn chunks_without_a_tracked_connection_are_skipped_and_counted() {
        let (m, tally) = (Metrics::new().unwrap(), TokenTally::default());
        let mut a = accounting(&m, &tally);
        a.opened(4, "plain", "openai", &who("/usr/bin/curl"));
        a.opened(6, "bot", "none", &who("/usr/bin/curl"));
        for cookie in [0, 4, 6, 99] {
            a.plaintext(&chunk(cookie, Direction::Sent, REQUEST));
        }
        let skipped = m
            .plaintext_problems
            .with_label_values(&["no_connection"])
            .get();
        assert_eq!(skipped, 4);
        assert_eq!(a.plaintext_readers(), 0);
        a.opened(7, "bot", "openai", &who("/usr/bin/curl"));
        assert_eq!(a.plaintext_readers(), 1);
        a.reconcile(&HashSet::new(), Instant::now() + RECONCILE_MIN_AGE);
        assert_eq!(a.plaintext_readers(), 0, "a lost summary drops the reader");
    }

    /// `block` without a kernel (no `SocketStop`): the finding is recorded
    /// as `block_failed`, and the connection's reader stops: its answer is
    /// not counted, a second secret is not recorded. `audit` reads on.
    #[test]
    fn block_stops_the_connections_reader_and_audit_does_not() {
        let key = format!("sk-proj-{}", "Qw7_Er4-Ty1".repeat(8));
        let body = format!(r#"{{"model":"gpt-4o","messages":[{{"content":"{key}"}}]}}"#);
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        for action in ["block", "audit"] {
            let dir = std::env::temp_dir().join(format!(
                "llm-egress-block-unit-{}-{action}",
                std::process::id()
            ));
            let _ = std::fs::remove_file(&dir);
            let text = format!(
                "[secrets]\naction = \"{action}\"\n\n[[workloads]]\nname = \"bot\"\nsystemd_unit = \"bot.service\"\nallow = [\"openai\"]\nexact_tokens = true\n"
            );
            let policy = crate::policy::Policy::parse(&text, "t.toml").expect("policy");
            let m = Metrics::new().expect("metrics");
            let tally = TokenTally::default();
            let audit = AuditSink::open(&crate::policy::AuditLog::File(dir.clone()), m.clone())
                .expect("audit");
            let exact = ExactTokens::new(&policy, 1).expect("exact");
            let mut x = ExactConns::new(exact, audit, &policy);
            x.opened(&m, 7, "bot", "openai", &Attribution::default());
            x.chunk(&m, &tally, &chunk(7, Direction::Sent, request.as_bytes()));
            x.chunk(&m, &tally, &chunk(7, Direction::Received, &response()));
            x.chunk(&m, &tally, &chunk(7, Direction::Sent, request.as_bytes()));
            let secrets = m
                .secrets
                .with_label_values(&["bot", "openai", "openai_key"])
                .get();
            let answered = m
                .exact_requests
                .with_label_values(&["bot", "openai", "exact"])
                .get();
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut log = String::new();
            while Instant::now() < deadline {
                log = std::fs::read_to_string(&dir).unwrap_or_default();
                if log.contains("\"event\":\"secret\"") {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = std::fs::remove_file(&dir);
            assert!(!log.contains(&key[8..]), "the record holds the key: {log}");
            if action == "block" {
                assert_eq!((secrets, answered), (1, 0), "{log}");
                assert!(log.contains("\"result\":\"block_failed\""), "{log}");
            } else {
                assert_eq!((secrets, answered), (2, 1), "{log}");
                assert!(log.contains("\"result\":\"audited\""), "{log}");
            }
        }
    }
}
