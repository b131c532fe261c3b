//! Per-process series (`llm_egress_process_connections_total`,
//! `llm_egress_process_bytes_total`): which executable names of a workload
//! get a series of their own, and the counting into them.
//!
//! Each workload has at most `limit` named series; every other process is
//! counted under `process="other"`. The named processes are the ones with
//! the most traffic: each process's score is its bytes (sent + received),
//! decaying with a half-life of the series TTL, so it follows recent
//! volume. A process without a series takes a free slot at once; when none
//! is free, it takes the slot of the smallest named process once its score
//! is more than [`PROMOTE_FACTOR`] times that one's (the margin keeps two
//! similar processes from trading the slot back and forth).
//!
//! Counters stay monotonic and sums exact: every increment goes into exactly
//! one series (the process's own, or `other`), never moved afterwards. A
//! demoted process's series leaves the exposition at once (like an expired
//! one); its values are remembered, and if it is promoted again while
//! remembered its series comes back at those values and continues — no
//! reset. A process idle for the TTL is forgotten (its series removed if it
//! had one); `other` never expires. Memory is bounded: at most
//! `limit + MAX_CANDIDATES` processes per workload are known, the lowest
//! scores forgotten first.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::{policy::TelemetryConfig, telemetry::metrics::Metrics};

/// The label of processes without a series of their own.
pub const OTHER_PROCESS: &str = "other";

/// A process takes a named slot from the smallest named one when its score
/// is more than this many times that one's.
pub const PROMOTE_FACTOR: f64 = 2.0;

/// Processes without a series that are remembered per workload (their
/// scores, and the values of demoted series).
pub const MAX_CANDIDATES: usize = 256;

/// What one process of a workload has been counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Values {
    pub connections: u64,
    pub sent: u64,
    pub received: u64,
}

#[derive(Debug)]
struct Process {
    /// Decayed bytes at `scored`.
    score: f64,
    scored: Instant,
    last_seen: Instant,
    named: bool,
    /// What its own series holds (exported while `named`, remembered
    /// otherwise).
    values: Values,
}

impl Process {
    fn score_at(&self, now: Instant, half_life: Duration) -> f64 {
        let dt = now.saturating_duration_since(self.scored).as_secs_f64();
        self.score * 0.5f64.powf(dt / half_life.as_secs_f64().max(1.0))
    }
}

pub struct ProcessSeries {
    metrics: Metrics,
    workloads: HashMap<String, HashMap<String, Process>>,
}

impl ProcessSeries {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            metrics,
            workloads: HashMap::new(),
        }
    }

    /// Counts a new connection of `process`; returns the label it went to.
    pub fn connection(
        &mut self,
        workload: &str,
        process: &str,
        config: &TelemetryConfig,
        now: Instant,
    ) -> String {
        self.count(
            workload,
            process,
            Values {
                connections: 1,
                ..Values::default()
            },
            config,
            now,
        )
    }

    /// Counts bytes of `process`; returns the label they went to.
    pub fn bytes(
        &mut self,
        workload: &str,
        process: &str,
        sent: u64,
        received: u64,
        config: &TelemetryConfig,
        now: Instant,
    ) -> String {
        self.count(
            workload,
            process,
            Values {
                connections: 0,
                sent,
                received,
            },
            config,
            now,
        )
    }

    fn count(
        &mut self,
        workload: &str,
        process: &str,
        add: Values,
        config: &TelemetryConfig,
        now: Instant,
    ) -> String {
        let half_life = config.process_series_ttl;
        let procs = self.workloads.entry(workload.to_string()).or_default();
        if !procs.contains_key(process) {
            let candidates = procs.values().filter(|p| !p.named).count();
            if candidates >= MAX_CANDIDATES {
                forget_lowest_candidate(procs, now, half_life);
            }
            procs.insert(
                process.to_string(),
                Process {
                    score: 0.0,
                    scored: now,
                    last_seen: now,
                    named: false,
                    values: Values::default(),
                },
            );
        }
        let p = procs.get_mut(process).expect("inserted above");
        p.score = p.score_at(now, half_life) + (add.sent + add.received) as f64;
        p.scored = now;
        p.last_seen = now;
        if !p.named {
            self.admit(
                workload,
                process,
                config.process_series_per_workload,
                now,
                half_life,
            );
        }
        let named = self.workloads[workload][process].named;
        let label = if named { process } else { OTHER_PROCESS };
        if named {
            let p = self
                .workloads
                .get_mut(workload)
                .and_then(|w| w.get_mut(process))
                .expect("counted above");
            p.values.connections += add.connections;
            p.values.sent += add.sent;
            p.values.received += add.received;
        }
        self.add(workload, label, add);
        label.to_string()
    }

    /// Gives `process` (known, not named) a series if a slot is free or its
    /// score beats the smallest named one's by [`PROMOTE_FACTOR`].
    fn admit(
        &mut self,
        workload: &str,
        process: &str,
        limit: usize,
        now: Instant,
        half_life: Duration,
    ) {
        let procs = &self.workloads[workload];
        let named = procs.values().filter(|p| p.named).count();
        if named >= limit {
            let score = procs[process].score_at(now, half_life);
            let Some((smallest, least)) = smallest_named(procs, now, half_life) else {
                return;
            };
            if score <= least * PROMOTE_FACTOR {
                return;
            }
            self.demote(workload, &smallest);
        }
        self.promote(workload, process);
    }

    fn promote(&mut self, workload: &str, process: &str) {
        let Some(p) = self
            .workloads
            .get_mut(workload)
            .and_then(|w| w.get_mut(process))
        else {
            return;
        };
        p.named = true;
        let values = p.values;
        // Back at the values it had (0 for a new one): no reset.
        self.add(workload, process, values);
    }

    fn demote(&mut self, workload: &str, process: &str) {
        if let Some(p) = self
            .workloads
            .get_mut(workload)
            .and_then(|w| w.get_mut(process))
        {
            p.named = false;
        }
        self.remove_series(workload, process);
    }

    /// Forgets processes idle for the TTL (removing their series), demotes
    /// the smallest named processes beyond a lowered limit, and gives free
    /// slots to the busiest processes counted under `other`.
    pub fn expire(&mut self, config: &TelemetryConfig, now: Instant) {
        let (ttl, limit) = (
            config.process_series_ttl,
            config.process_series_per_workload,
        );
        let workloads: Vec<String> = self.workloads.keys().cloned().collect();
        for w in workloads {
            let idle: Vec<(String, bool)> = self.workloads[&w]
                .iter()
                .filter(|(_, p)| now.saturating_duration_since(p.last_seen) >= ttl)
                .map(|(name, p)| (name.clone(), p.named))
                .collect();
            for (name, named) in idle {
                if named {
                    self.remove_series(&w, &name);
                }
                if let Some(procs) = self.workloads.get_mut(&w) {
                    procs.remove(&name);
                }
            }
            loop {
                let procs = &self.workloads[&w];
                let named = procs.values().filter(|p| p.named).count();
                if named > limit {
                    if let Some((smallest, _)) = smallest_named(procs, now, ttl) {
                        self.demote(&w, &smallest);
                        continue;
                    }
                } else if named < limit
                    && let Some(best) = busiest_candidate(procs, now, ttl)
                {
                    self.promote(&w, &best);
                    continue;
                }
                break;
            }
            if self.workloads[&w].is_empty() {
                self.workloads.remove(&w);
            }
        }
    }

    /// The named processes of `workload`, sorted.
    #[cfg(test)]
    pub fn named(&self, workload: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .workloads
            .get(workload)
            .into_iter()
            .flatten()
            .filter(|(_, p)| p.named)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn add(&self, workload: &str, label: &str, v: Values) {
        let m = &self.metrics;
        m.process_connections
            .with_label_values(&[workload, label])
            .inc_by(v.connections);
        m.process_bytes
            .with_label_values(&[workload, label, "sent"])
            .inc_by(v.sent);
        m.process_bytes
            .with_label_values(&[workload, label, "received"])
            .inc_by(v.received);
    }

    fn remove_series(&self, workload: &str, process: &str) {
        let m = &self.metrics;
        let _ = m
            .process_connections
            .remove_label_values(&[workload, process]);
        for direction in ["sent", "received"] {
            let _ = m
                .process_bytes
                .remove_label_values(&[workload, process, direction]);
        }
    }
}

/// Ties are broken by name, so the choice is deterministic.
fn smallest_named(
    procs: &HashMap<String, Process>,
    now: Instant,
    half_life: Duration,
) -> Option<(String, f64)> {
    procs
        .iter()
        .filter(|(_, p)| p.named)
        .map(|(n, p)| (n, p.score_at(now, half_life)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)))
        .map(|(n, s)| (n.clone(), s))
}

fn busiest_candidate(
    procs: &HashMap<String, Process>,
    now: Instant,
    half_life: Duration,
) -> Option<String> {
    procs
        .iter()
        .filter(|(_, p)| !p.named)
        .map(|(n, p)| (n, p.score_at(now, half_life)))
        .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(n, _)| n.clone())
}

/// Processes that never had a series go first (forgetting a demoted one's
/// values means its series would start again from 0).
fn forget_lowest_candidate(
    procs: &mut HashMap<String, Process>,
    now: Instant,
    half_life: Duration,
) {
    let lowest = procs
        .iter()
        .filter(|(_, p)| !p.named)
        .map(|(n, p)| {
            let had_series = p.values != Values::default();
            (n, (had_series, p.score_at(now, half_life)))
        })
        .min_by(|a, b| {
            (a.1.0.cmp(&b.1.0))
                .then_with(|| a.1.1.total_cmp(&b.1.1))
                .then_with(|| a.0.cmp(b.0))
        })
        .map(|(n, _)| n.clone());
    if let Some(n) = lowest {
        procs.remove(&n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(limit: usize, ttl_secs: u64) -> TelemetryConfig {
        TelemetryConfig {
            process_series_per_workload: limit,
            process_series_ttl: Duration::from_secs(ttl_secs),
            learn_estimates: Default::default(),
        }
    }

    /// The exported process series of `workload`: label → (connections,
    /// sent + received).
    fn exported(m: &Metrics, workload: &str) -> HashMap<String, (u64, u64)> {
        let mut out: HashMap<String, (u64, u64)> = HashMap::new();
        for f in m.registry.gather() {
            let bytes = match f.name() {
                "llm_egress_process_connections_total" => false,
                "llm_egress_process_bytes_total" => true,
                _ => continue,
            };
            for s in f.get_metric() {
                let label = |n: &str| {
                    s.get_label()
                        .iter()
                        .find(|l| l.name() == n)
                        .map(|l| l.value().to_string())
                        .unwrap_or_default()
                };
                if label("workload") != workload {
                    continue;
                }
                let v = s.get_counter().get_value() as u64;
                let e = out.entry(label("process")).or_default();
                if bytes {
                    e.1 += v;
                } else {
                    e.0 += v;
                }
            }
        }
        out
    }

    #[test]
    fn the_busiest_processes_get_the_series() {
        let m = Metrics::new().unwrap();
        let mut s = ProcessSeries::new(m.clone());
        let c = config(2, 600);
        let t = Instant::now();
        assert_eq!(s.bytes("w", "a", 100, 100, &c, t), "a");
        assert_eq!(s.bytes("w", "b", 500, 500, &c, t), "b");
        // First come, but no free slot: counted under `other` …
        assert_eq!(s.connection("w", "c", &c, t), OTHER_PROCESS);
        assert_eq!(s.bytes("w", "c", 150, 150, &c, t), OTHER_PROCESS);
        // … until it has more than twice the traffic of the smallest.
        assert_eq!(s.bytes("w", "c", 200, 0, &c, t), "c");
        assert_eq!(s.named("w"), ["b", "c"]);
        let e = exported(&m, "w");
        assert_eq!(e["c"], (0, 200), "its earlier traffic stays in `other`");
        assert_eq!(e[OTHER_PROCESS], (1, 300));
        assert!(!e.contains_key("a"), "a demoted series leaves at once");
        // `a` is busy again: its series comes back at its old value.
        assert_eq!(s.bytes("w", "a", 5_000, 0, &c, t), "a");
        assert_eq!(exported(&m, "w")["a"], (0, 5_200));
        assert_eq!(s.named("w"), ["a", "b"]);
    }

    #[test]
    fn similar_processes_do_not_trade_the_slot() {
        let m = Metrics::new().unwrap();
        let mut s = ProcessSeries::new(m);
        let c = config(1, 600);
        let t = Instant::now();
        s.bytes("w", "a", 1_000, 0, &c, t);
        for _ in 0..10 {
            s.bytes("w", "b", 150, 0, &c, t);
            s.bytes("w", "a", 100, 0, &c, t);
        }
        // b (1,500) is within PROMOTE_FACTOR of a (2,000).
        assert_eq!(s.named("w"), ["a"]);
    }

    #[test]
    fn old_traffic_decays_so_new_volume_wins() {
        let m = Metrics::new().unwrap();
        let mut s = ProcessSeries::new(m);
        let c = config(1, 60);
        let t = Instant::now();
        s.bytes("w", "a", 10_000, 0, &c, t);
        // Five half-lives later a's 10,000 count as ~312.
        let later = t + Duration::from_secs(300);
        s.bytes("w", "a", 1, 0, &c, later);
        assert_eq!(s.bytes("w", "b", 700, 0, &c, later), "b");
    }

    /// Random traffic of 9 processes over 3 slots, rebalanced: every
    /// exported series only grows (also across a demotion and promotion),
    /// and the increases of all series add up to the traffic counted.
    #[test]
    fn counters_stay_monotonic_and_sums_exact() {
        let m = Metrics::new().unwrap();
        let mut s = ProcessSeries::new(m.clone());
        // Every process keeps some traffic, so none is idle for the TTL and
        // forgotten (a forgotten one starts again from 0: a documented reset).
        let c = config(3, 60);
        let start = Instant::now();
        let (mut conns, mut bytes) = (0u64, 0u64);
        let mut last: HashMap<String, (u64, u64)> = HashMap::new();
        let mut increases = (0u64, 0u64);
        let mut x = 12345u64;
        let mut demotions = 0;
        for step in 0..3_000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let now = start + Duration::from_millis(step * 100);
            // Each 30 s phase has a hot process; the others trickle.
            let phase = step / 300;
            let name = if (x >> 50).is_multiple_of(5) {
                format!("p{}", (x >> 53) % 9)
            } else {
                format!("p{}", (phase * 4) % 9)
            };
            let before = s.named("w");
            if (x >> 20).is_multiple_of(5) {
                s.connection("w", &name, &c, now);
                conns += 1;
            } else {
                let n = (x >> 40) % 10_000;
                s.bytes("w", &name, n / 3, n - n / 3, &c, now);
                bytes += n;
            }
            if step % 50 == 0 {
                s.expire(&c, now);
            }
            let after = s.named("w");
            demotions += before.iter().filter(|p| !after.contains(p)).count();
            assert!(after.len() <= 3, "at most the limit named: {after:?}");
            let e = exported(&m, "w");
            assert!(e.len() <= 4, "limit + other series: {e:?}");
            for (label, v) in &e {
                let prev = last.get(label).copied().unwrap_or((0, 0));
                assert!(
                    v.0 >= prev.0 && v.1 >= prev.1,
                    "{label} went back from {prev:?} to {v:?} at step {step}"
                );
                increases.0 += v.0 - prev.0;
                increases.1 += v.1 - prev.1;
                last.insert(label.clone(), *v);
            }
        }
        assert!(
            demotions > 5,
            "the test must exercise demotions: {demotions}"
        );
        assert_eq!(increases, (conns, bytes));
    }

    #[test]
    fn expiry_frees_slots_for_the_busiest_and_a_lower_limit_demotes() {
        let m = Metrics::new().unwrap();
        let mut s = ProcessSeries::new(m.clone());
        let c = config(2, 60);
        let t = Instant::now();
        s.bytes("w", "a", 10, 0, &c, t);
        s.bytes("w", "b", 20, 0, &c, t);
        let later = t + Duration::from_secs(30);
        s.bytes("w", "b", 20, 0, &c, later);
        s.bytes("w", "c", 5, 0, &c, later);
        s.bytes("w", "d", 12, 0, &c, later);
        assert_eq!(s.named("w"), ["a", "b"]);
        // a has been idle for the TTL: forgotten, its slot goes to d.
        s.expire(&c, t + Duration::from_secs(61));
        assert_eq!(s.named("w"), ["b", "d"]);
        assert!(!exported(&m, "w").contains_key("a"));
        s.expire(&config(1, 60), t + Duration::from_secs(62));
        assert_eq!(s.named("w"), ["b"]);
        // Everything idle: nothing named is left, `other` stays.
        s.expire(&c, t + Duration::from_secs(200));
        let e = exported(&m, "w");
        assert_eq!(e.keys().collect::<Vec<_>>(), [OTHER_PROCESS]);
    }

    #[test]
    fn candidates_are_bounded() {
        let m = Metrics::new().unwrap();
        let mut s = ProcessSeries::new(m);
        let c = config(1, 600);
        let t = Instant::now();
        for i in 0..(MAX_CANDIDATES * 3) {
            s.bytes("w", &format!("p{i}"), 1, 0, &c, t);
        }
        assert!(s.workloads["w"].len() <= MAX_CANDIDATES + 1);
    }
}
