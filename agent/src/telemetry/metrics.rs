//! The Prometheus registry: every series the agent exports (docs/metrics.md).
//!
//! Label values come from the policy (workload and provider names) and from
//! fixed vocabularies (verdicts, map names), so cardinality is bounded by the
//! policy's size. Kernel counters are pinned and outlive the agent; they are
//! copied into counters here by `sync_kernel`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use llm_egress_common::counter;

/// `llm_egress_sni_total` results and the kernel counters behind them.
const SNI_RESULTS: [(u32, &str); 11] = [
    (counter::SNI_ALLOW, "allow"),
    (counter::SNI_DENY, "deny"),
    (counter::SNI_AUDIT, "audit"),
    (counter::SNI_OTHER_NAME, "other_name"),
    (counter::SNI_NO_SNI, "no_sni"),
    (counter::SNI_ECH, "ech"),
    (counter::SNI_SPLIT, "split"),
    (counter::SNI_NOT_TLS, "not_tls"),
    (counter::SNI_MALFORMED, "malformed"),
    (counter::SNI_DROPPED, "dropped_packets"),
    (counter::SNI_BUSY, "busy"),
];

/// `llm_egress_proxy_connect_total` results (HTTP CONNECT requests and
/// first payloads to named proxies, docs/names.md "Proxies") and the
/// kernel counters behind them.
const PROXY_RESULTS: [(u32, &str); 9] = [
    (counter::CONNECT_ALLOW, "allow"),
    (counter::CONNECT_DENY, "deny"),
    (counter::CONNECT_AUDIT, "audit"),
    (counter::CONNECT_OTHER_NAME, "other_name"),
    (counter::CONNECT_IP_LITERAL, "ip_literal"),
    (counter::CONNECT_SPLIT, "split"),
    (counter::CONNECT_MALFORMED, "malformed"),
    (counter::PROXY_UNREADABLE, "unreadable"),
    (counter::PROXY_PLAIN_HTTP, "plain_http"),
];

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections: IntCounterVec,
    pub decisions: IntCounterVec,
    pub events_lost: IntCounter,
    pub internal_errors: IntCounter,
    pub depth_truncated: IntCounter,
    pub event_errors: IntCounter,
    pub policy_generation: IntGauge,
    pub policy_reloads: IntCounterVec,
    pub map_update_errors: IntCounterVec,
    pub map_entries: IntGaugeVec,
    pub workload_cgroups: IntGaugeVec,
    pub resolver_failures: IntCounter,
    pub resolved_addresses: IntGauge,
    pub audit_errors: IntCounter,
    pub attribution_misses: IntCounter,
    pub build_info: IntGaugeVec,
    pub bytes: IntCounterVec,
    pub tls_records: IntCounterVec,
    pub active_connections: IntGaugeVec,
    pub connection_duration: HistogramVec,
    pub token_estimate_ratio: HistogramVec,
    pub token_estimate_learned_ratio: HistogramVec,
    pub token_estimate_learned: prometheus::GaugeVec,
    pub connect_failures: IntCounterVec,
    pub process_connections: IntCounterVec,
    pub process_bytes: IntCounterVec,
    pub summaries_missing: IntCounter,
    pub kubernetes_errors: IntCounter,
    pub kubernetes_pods: IntGauge,
    pub tokens: IntCounterVec,
    /// Exact tokens by model (src/exact_tokens.rs).
    pub model_tokens: IntCounterVec,
    pub cost_usd: prometheus::CounterVec,
    pub exact_requests: IntCounterVec,
    pub secrets: IntCounterVec,
    pub plaintext_problems: IntCounterVec,
    pub dns_responses: IntCounter,
    pub dns_answers: IntCounterVec,
    pub dns_learned: IntCounter,
    pub dns_learn_failures: IntCounter,
    pub dns_off_chain: IntCounter,
    pub dns_queries: IntCounterVec,
    pub dns_unasked: IntCounter,
    pub dns_tcp: IntCounterVec,
    pub dns_fallback: IntCounterVec,
    pub learned_destinations: IntGaugeVec,
    pub sni: IntCounterVec,
    pub proxy_connect: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub budget_remaining: IntGaugeVec,
    pub budget_remaining_usd: prometheus::GaugeVec,
    pub limit_buckets_full: IntCounter,
    pub budget_stopped: IntCounter,
    pub socket_decisions: IntCounterVec,
    pub program_loaded: IntGaugeVec,
    /// Last `LIMIT_HITS` values seen, to turn them into increments.
    limit_hits_seen: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<llm_egress_common::LimitHitKey, u64>>,
    >,
    /// Last `VERDICTS` values seen, to turn them into increments.
    verdicts_seen: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<llm_egress_common::VerdictKey, u64>>,
    >,
    /// Last kernel counter values seen, to turn them into increments.
    kernel_seen: std::sync::Arc<std::sync::Mutex<[u64; counter::LEN as usize]>>,
}

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new();
        let m = Self {
            connections: counter_vec(
                &r,
                "llm_egress_connections_total",
                "Every connect() and unconnected UDP sendmsg() the kernel judged, by workload, provider (none: not a provider) and verdict; counted in the kernel, exact even when events are lost.",
                &["workload", "provider", "verdict"],
            )?,
            decisions: counter_vec(
                &r,
                "llm_egress_decisions_total",
                "Every verdict the kernel programs reached, including allowed non-provider traffic that produces no event.",
                &["verdict"],
            )?,
            events_lost: counter(
                &r,
                "llm_egress_events_lost_total",
                "Events the kernel could not queue because the ring buffer was full.",
            )?,
            internal_errors: counter(
                &r,
                "llm_egress_internal_errors_total",
                "Decisions taken by failure_mode because the programs could not read their policy.",
            )?,
            depth_truncated: counter(
                &r,
                "llm_egress_cgroup_depth_truncated_total",
                "Decisions for tasks nested deeper than the programs search for workloads.",
            )?,
            event_errors: counter(
                &r,
                "llm_egress_event_decode_errors_total",
                "Ring-buffer records that could not be decoded.",
            )?,
            policy_generation: gauge(
                &r,
                "llm_egress_policy_generation",
                "Generation of the policy in force (increments on every applied reload).",
            )?,
            policy_reloads: counter_vec(
                &r,
                "llm_egress_policy_reloads_total",
                "Policy reloads by result (ok, invalid, failed).",
                &["result"],
            )?,
            map_update_errors: counter_vec(
                &r,
                "llm_egress_map_update_errors_total",
                "Map entries that could not be written (for example a full map).",
                &["map"],
            )?,
            map_entries: gauge_vec(
                &r,
                "llm_egress_map_entries",
                "Entries of the policy in force, per map.",
                &["map"],
            )?,
            workload_cgroups: gauge_vec(
                &r,
                "llm_egress_workload_cgroups",
                "Cgroups each workload currently selects.",
                &["workload"],
            )?,
            resolver_failures: counter(
                &r,
                "llm_egress_resolver_failures_total",
                "Provider hostname lookups that failed.",
            )?,
            resolved_addresses: gauge(
                &r,
                "llm_egress_resolved_addresses",
                "Addresses learned by resolving provider hostnames.",
            )?,
            audit_errors: counter(
                &r,
                "llm_egress_audit_log_errors_total",
                "Audit records that could not be written or were dropped because the writer fell behind.",
            )?,
            attribution_misses: counter(
                &r,
                "llm_egress_attribution_misses_total",
                "Events whose process had exited before its executable could be read.",
            )?,
            build_info: gauge_vec(
                &r,
                "llm_egress_build_info",
                "Build of the running agent (value is always 1).",
                &["version", "object"],
            )?,
            bytes: counter_vec(
                &r,
                "llm_egress_bytes_total",
                "TCP payload bytes of provider connections (TLS framing included, IP/TCP headers not).",
                &["workload", "provider", "direction"],
            )?,
            tls_records: counter_vec(
                &r,
                "llm_egress_tls_records_total",
                "TLS records of provider connections, counted in the kernel from their record headers.",
                &["workload", "provider", "direction"],
            )?,
            active_connections: gauge_vec(
                &r,
                "llm_egress_active_connections",
                "Provider connections open now.",
                &["workload", "provider"],
            )?,
            connection_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "llm_egress_connection_duration_seconds",
                        "Time from handshake to close of provider connections.",
                    )
                    .buckets(vec![
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
                    ]),
                    &["workload", "provider"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            token_estimate_ratio: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "llm_egress_token_estimate_ratio",
                        "Per connection counted exactly (exact_tokens workloads): what the estimate from encrypted traffic would have been, over the exact count, by kind (prompt, completion).",
                    )
                    .buckets(vec![
                        0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0,
                    ]),
                    &["workload", "provider", "kind"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            token_estimate_learned_ratio: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "llm_egress_token_estimate_learned_ratio",
                        "Per connection counted exactly: the estimate corrected by what earlier exact counts taught (learn_estimates), over the exact count, by kind.",
                    )
                    .buckets(vec![
                        0.25, 0.5, 0.67, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 4.0,
                    ]),
                    &["workload", "provider", "kind"],
                )?;
                r.register(Box::new(h.clone()))?;
                h
            },
            token_estimate_learned: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "llm_egress_token_estimate_learned",
                        "The estimator's learned line per scope (host, or the workload with learn_estimates = \"workload\"), provider, kind, response shape and client kind: tokens per request = offset + slope x the calibration's figure; samples is the (forgetting) weight behind it.",
                    ),
                    &["scope", "provider", "kind", "shape", "client", "term"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            connect_failures: counter_vec(
                &r,
                "llm_egress_connect_failures_total",
                "Allowed provider connections whose handshake never completed.",
                &["workload", "provider"],
            )?,
            process_connections: counter_vec(
                &r,
                "llm_egress_process_connections_total",
                "Provider connections per executable name (bounded per workload; the rest under process=\"other\").",
                &["workload", "process"],
            )?,
            process_bytes: counter_vec(
                &r,
                "llm_egress_process_bytes_total",
                "Provider connection bytes per executable name (bounded like llm_egress_process_connections_total).",
                &["workload", "process", "direction"],
            )?,
            summaries_missing: counter(
                &r,
                "llm_egress_connection_summaries_missing_total",
                "Tracked connections that ended without a summary event (lost to a full ring buffer).",
            )?,
            tokens: counter_vec(
                &r,
                "llm_egress_tokens_total",
                "Tokens of provider connections by kind (prompt, completion) and source (estimated: from encrypted traffic, at close, see docs/tokens.md; exact: from the providers' usage in plaintext, see docs/exact-tokens.md).",
                &["workload", "provider", "kind", "source"],
            )?,
            model_tokens: counter_vec(
                &r,
                "llm_egress_model_tokens_total",
                "Exact tokens read from providers' usage in the plaintext of connections, by model (bounded: the first models of each workload, then other) and kind (prompt, completion); docs/exact-tokens.md.",
                &["workload", "provider", "model", "kind"],
            )?,
            cost_usd: {
                let c = prometheus::CounterVec::new(
                    Opts::new(
                        "llm_egress_cost_usd_total",
                        "Cost in US dollars of exact token counts, from the dated price table (catalog and policy [prices]); requests of models without a price add nothing (docs/exact-tokens.md).",
                    ),
                    &["workload", "provider", "model"],
                )?;
                r.register(Box::new(c.clone()))?;
                c
            },
            exact_requests: counter_vec(
                &r,
                "llm_egress_exact_requests_total",
                "HTTP exchanges read from plaintext, by result: exact (the response carried usage), no_usage (it did not: an error, an OpenAI stream without include_usage, another API).",
                &["workload", "provider", "result"],
            )?,
            secrets: counter_vec(
                &r,
                "llm_egress_secrets_total",
                "Secrets found in request bodies, by kind (built-in kinds and policy pattern names); docs/exact-tokens.md.",
                &["workload", "provider", "kind"],
            )?,
            plaintext_problems: counter_vec(
                &r,
                "llm_egress_plaintext_problems_total",
                "What the HTTP/1.1 reader of plaintext could not read, by problem (http2, not_http1, malformed_head, truncated, decompression_bomb, …); docs/exact-tokens.md.",
                &["problem"],
            )?,
            dns_responses: counter(
                &r,
                "llm_egress_dns_responses_total",
                "UDP datagrams from port 53 that reached a socket below the attach cgroup (seen by the kernel's DNS program).",
            )?,
            dns_answers: counter_vec(
                &r,
                "llm_egress_dns_answers_total",
                "DNS answers for provider names, by whether the kernel parsed them (parsed) or sent them to the agent (unparsed).",
                &["result"],
            )?,
            dns_learned: counter(
                &r,
                "llm_egress_dns_learned_total",
                "Addresses the kernel learned from DNS answers (LEARNED_* updates).",
            )?,
            dns_learn_failures: counter(
                &r,
                "llm_egress_dns_learn_failures_total",
                "LEARNED_* updates that failed in the kernel.",
            )?,
            dns_off_chain: counter(
                &r,
                "llm_egress_dns_off_chain_records_total",
                "Address records of provider answers whose owner is not in the question's CNAME chain (ignored).",
            )?,
            dns_queries: counter_vec(
                &r,
                "llm_egress_dns_queries_total",
                "DNS queries (to port 53) sent by sockets below the attach cgroup: `trusted` (to a trusted resolver: remembered, its answer may be learned from) or `untrusted` (to another resolver: its answer is not learned from).",
                &["resolver"],
            )?,
            dns_unasked: counter(
                &r,
                "llm_egress_dns_unasked_answers_total",
                "DNS answers that answer no pending query of the receiving socket (no query with that id to that resolver in the last 10 s: forged, late, or from another address): not learned from.",
            )?,
            dns_tcp: counter_vec(
                &r,
                "llm_egress_dns_tcp_answers_total",
                "DNS answers over TCP seen by the kernel: `whole` (in one segment, parsed like UDP answers) or `split` (longer than their first segment: not learned).",
                &["segments"],
            )?,
            dns_fallback: counter_vec(
                &r,
                "llm_egress_dns_fallback_answers_total",
                "Answers the kernel could not parse, as the agent's parser handled them: parsed, unparsed, learned (addresses written), dropped (queue full).",
                &["result"],
            )?,
            learned_destinations: gauge_vec(
                &r,
                "llm_egress_learned_destinations",
                "Entries (workload, address) in LEARNED_* with at least one unexpired name, by family (counted every 10 s).",
                &["family"],
            )?,
            sni: counter_vec(
                &r,
                "llm_egress_sni_total",
                "First payloads of TCP connections seen by the SNI program, by result.",
                &["result"],
            )?,
            proxy_connect: counter_vec(
                &r,
                "llm_egress_proxy_connect_total",
                "HTTP CONNECT requests read by the SNI program, and first payloads to named proxies, by result.",
                &["result"],
            )?,
            kubernetes_errors: counter(
                &r,
                "llm_egress_kubernetes_errors_total",
                "Pod lists that failed (API server unreachable, 401/403, bad JSON) or a [kubernetes] setup the environment cannot complete; the last good list is kept.",
            )?,
            kubernetes_pods: gauge(
                &r,
                "llm_egress_kubernetes_pods",
                "Pods of this node in the last good list from the Kubernetes API.",
            )?,
            rate_limited: counter_vec(
                &r,
                "llm_egress_rate_limited_total",
                "Traffic refused by a limit of [workloads.limits] (docs/limits.md): connections for limit=connections|tokens_per_minute|tokens_per_day|usd_per_day|usd_per_month, packets dropped for limit=bandwidth_out|bandwidth_in; verdict=audit counts what audit mode let through.",
                &["workload", "provider", "limit", "verdict"],
            )?,
            budget_remaining: gauge_vec(
                &r,
                "llm_egress_budget_remaining",
                "Tokens left in a workload's rolling token budget for a provider (window=minute|day); below 0 after an overspend, and new connections are refused until it is above 0 again.",
                &["workload", "provider", "window"],
            )?,
            budget_remaining_usd: {
                let g = prometheus::GaugeVec::new(
                    Opts::new(
                        "llm_egress_budget_remaining_usd",
                        "US dollars left in a workload's rolling dollar budget over all its providers (window=day|month, usd_per_day|usd_per_month); below 0 after an overspend, and new connections to every provider are refused until it is above 0 again.",
                    ),
                    &["workload", "window"],
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            limit_buckets_full: counter(
                &r,
                "llm_egress_limit_buckets_full_total",
                "Limited traffic let through because the kernel's bucket map (BUCKETS) was full.",
            )?,
            budget_stopped: counter(
                &r,
                "llm_egress_budget_stopped_connections_total",
                "Open provider connections stopped because their workload's token budget was spent (their next request dropped, the socket aborted; docs/limits.md).",
            )?,
            socket_decisions: counter_vec(
                &r,
                "llm_egress_socket_decisions_total",
                "Raw and ICMP ping sockets refused at socket() (verdict deny) or let through and reported (audit) by the socket-kind verdict; counted in the kernel.",
                &["verdict"],
            )?,
            program_loaded: gauge_vec(
                &r,
                "llm_egress_program_loaded",
                "1 for each kernel program the agent loaded (or adopted) and attached, 0 for each the kernel refused (docs/operations.md, \"When a program fails to load\").",
                &["program"],
            )?,
            limit_hits_seen: Default::default(),
            registry: r,
            verdicts_seen: Default::default(),
            kernel_seen: std::sync::Arc::new(std::sync::Mutex::new([0; counter::LEN as usize])),
        };
        for v in ["allow", "deny", "audit"] {
            m.decisions.with_label_values(&[v]);
        }
        for v in ["ok", "invalid", "failed"] {
            m.policy_reloads.with_label_values(&[v]);
        }
        for v in ["parsed", "unparsed"] {
            m.dns_answers.with_label_values(&[v]);
        }
        for v in ["parsed", "unparsed", "learned", "dropped"] {
            m.dns_fallback.with_label_values(&[v]);
        }
        for v in ["v4", "v6"] {
            m.learned_destinations.with_label_values(&[v]);
        }
        for v in ["deny", "audit"] {
            m.socket_decisions.with_label_values(&[v]);
        }
        for (_, v) in SNI_RESULTS {
            m.sni.with_label_values(&[v]);
        }
        for (_, v) in PROXY_RESULTS {
            m.proxy_connect.with_label_values(&[v]);
        }
        Ok(m)
    }

    /// Adds what the kernel counted since the last call.
    pub fn sync_kernel(&self, now: &[u64; counter::LEN as usize]) {
        let Ok(mut seen) = self.kernel_seen.lock() else {
            return;
        };
        let delta = |i: u32| {
            let (n, s) = (now[i as usize], seen[i as usize]);
            // Counters only shrink when the pinned maps were re-created.
            if n >= s { n - s } else { n }
        };
        self.events_lost.inc_by(delta(counter::EVENTS_LOST));
        self.internal_errors.inc_by(delta(counter::INTERNAL_ERRORS));
        self.depth_truncated.inc_by(delta(counter::DEPTH_TRUNCATED));
        self.decisions
            .with_label_values(&["allow"])
            .inc_by(delta(counter::VERDICT_ALLOW));
        self.decisions
            .with_label_values(&["deny"])
            .inc_by(delta(counter::VERDICT_DENY));
        self.decisions
            .with_label_values(&["audit"])
            .inc_by(delta(counter::VERDICT_AUDIT));
        self.dns_responses.inc_by(delta(counter::DNS_RESPONSES));
        self.dns_answers
            .with_label_values(&["parsed"])
            .inc_by(delta(counter::DNS_PARSED));
        self.dns_answers
            .with_label_values(&["unparsed"])
            .inc_by(delta(counter::DNS_UNPARSED));
        self.dns_learned.inc_by(delta(counter::DNS_LEARNED));
        self.dns_learn_failures
            .inc_by(delta(counter::DNS_LEARN_FAILED));
        self.dns_off_chain.inc_by(delta(counter::DNS_OFF_CHAIN));
        self.dns_queries
            .with_label_values(&["trusted"])
            .inc_by(delta(counter::DNS_QUERIES));
        self.dns_queries
            .with_label_values(&["untrusted"])
            .inc_by(delta(counter::DNS_UNTRUSTED));
        self.dns_unasked.inc_by(delta(counter::DNS_UNASKED));
        let (tcp, split) = (
            delta(counter::DNS_TCP_RESPONSES),
            delta(counter::DNS_TCP_SPLIT),
        );
        self.dns_tcp
            .with_label_values(&["whole"])
            .inc_by(tcp.saturating_sub(split));
        self.dns_tcp.with_label_values(&["split"]).inc_by(split);
        for (index, result) in SNI_RESULTS {
            self.sni.with_label_values(&[result]).inc_by(delta(index));
        }
        for (index, result) in PROXY_RESULTS {
            self.proxy_connect
                .with_label_values(&[result])
                .inc_by(delta(index));
        }
        self.limit_buckets_full
            .inc_by(delta(counter::LIMIT_BUCKETS_FULL));
        self.budget_stopped.inc_by(delta(counter::BUDGET_STOPPED));
        self.socket_decisions
            .with_label_values(&["deny"])
            .inc_by(delta(counter::SOCKETS_DENIED));
        self.socket_decisions
            .with_label_values(&["audit"])
            .inc_by(delta(counter::SOCKETS_AUDITED));
        // A hit that found LIMIT_HITS full was still enforced; count it
        // where a full map is counted.
        self.map_update_errors
            .with_label_values(&[llm_egress_common::MAP_LIMIT_HITS])
            .inc_by(delta(counter::LIMIT_HITS_FULL));
        *seen = *now;
    }

    /// Adds what the kernel's per-decision counters grew by since the last
    /// call; `labels` names (workload, provider, verdict) of a key.
    pub fn sync_verdicts(
        &self,
        counts: &[(llm_egress_common::VerdictKey, u64)],
        labels: impl Fn(&llm_egress_common::VerdictKey) -> [String; 3],
    ) {
        let Ok(mut seen) = self.verdicts_seen.lock() else {
            return;
        };
        for (key, now) in counts {
            let before = seen.insert(*key, *now).unwrap_or(0);
            let delta = if *now >= before { now - before } else { *now };
            if delta > 0 {
                let [w, p, v] = labels(key);
                self.connections
                    .with_label_values(&[&w, &p, &v])
                    .inc_by(delta);
            }
        }
    }

    /// Adds what `LIMIT_HITS` counted since the last call; `labels` names
    /// a key (workload, provider) or None for a pair the agent cannot name.
    pub fn sync_limit_hits(
        &self,
        counts: &[(llm_egress_common::LimitHitKey, u64)],
        labels: impl Fn(u64) -> Option<(String, String)>,
    ) {
        let Ok(mut seen) = self.limit_hits_seen.lock() else {
            return;
        };
        for (key, now) in counts {
            let before = seen.insert(*key, *now).unwrap_or(0);
            let delta = if *now >= before { now - before } else { *now };
            if delta == 0 {
                continue;
            }
            let (w, p) = labels(key.bucket).unwrap_or_else(|| ("unknown".into(), "unknown".into()));
            let v = llm_egress_common::verdict::name(key.verdict as u8);
            self.rate_limited
                .with_label_values(&[&w, &p, llm_egress_common::limit_kind::name(key.kind), v])
                .inc_by(delta);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_counters_become_increments() {
        let m = Metrics::new().unwrap();
        let mut k = [0u64; counter::LEN as usize];
        k[counter::VERDICT_DENY as usize] = 5;
        k[counter::EVENTS_LOST as usize] = 2;
        m.sync_kernel(&k);
        k[counter::VERDICT_DENY as usize] = 7;
        m.sync_kernel(&k);
        assert_eq!(m.decisions.with_label_values(&["deny"]).get(), 7);
        assert_eq!(m.events_lost.get(), 2);
        // re-created maps start from zero again
        k[counter::VERDICT_DENY as usize] = 1;
        m.sync_kernel(&k);
        assert_eq!(m.decisions.with_label_values(&["deny"]).get(), 8);
    }

    #[test]
    fn dns_and_sni_counters_are_exported() {
        let m = Metrics::new().unwrap();
        let mut k = [0u64; counter::LEN as usize];
        k[counter::DNS_RESPONSES as usize] = 10;
        k[counter::DNS_PARSED as usize] = 6;
        k[counter::DNS_UNPARSED as usize] = 1;
        k[counter::DNS_LEARNED as usize] = 9;
        k[counter::DNS_OFF_CHAIN as usize] = 2;
        k[counter::DNS_QUERIES as usize] = 5;
        k[counter::DNS_UNTRUSTED as usize] = 4;
        k[counter::DNS_UNASKED as usize] = 3;
        k[counter::SNI_DENY as usize] = 3;
        k[counter::SNI_SPLIT as usize] = 1;
        k[counter::CONNECT_DENY as usize] = 4;
        k[counter::PROXY_UNREADABLE as usize] = 2;
        m.sync_kernel(&k);
        assert_eq!(m.dns_responses.get(), 10);
        assert_eq!(m.dns_answers.with_label_values(&["parsed"]).get(), 6);
        assert_eq!(m.dns_answers.with_label_values(&["unparsed"]).get(), 1);
        assert_eq!(m.dns_learned.get(), 9);
        assert_eq!(m.dns_off_chain.get(), 2);
        assert_eq!(m.dns_queries.with_label_values(&["trusted"]).get(), 5);
        assert_eq!(m.dns_queries.with_label_values(&["untrusted"]).get(), 4);
        assert_eq!(m.dns_unasked.get(), 3);
        assert_eq!(m.sni.with_label_values(&["deny"]).get(), 3);
        assert_eq!(m.sni.with_label_values(&["split"]).get(), 1);
        assert_eq!(m.proxy_connect.with_label_values(&["deny"]).get(), 4);
        assert_eq!(m.proxy_connect.with_label_values(&["unreadable"]).get(), 2);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains("llm_egress_dns_answers_total{result=\"parsed\"} 6"),
            "{text}"
        );
        assert!(
            text.contains("llm_egress_sni_total{result=\"deny\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn every_metric_is_documented() {
        let m = Metrics::new().unwrap();
        m.connections.with_label_values(&["w", "p", "deny"]).inc();
        m.map_update_errors.with_label_values(&["X"]).inc();
        m.map_entries.with_label_values(&["X"]).set(1);
        m.workload_cgroups.with_label_values(&["w"]).set(1);
        m.build_info.with_label_values(&["v", "o"]).set(1);
        m.bytes.with_label_values(&["w", "p", "sent"]).inc();
        m.tls_records.with_label_values(&["w", "p", "sent"]).inc();
        m.active_connections.with_label_values(&["w", "p"]).inc();
        m.connection_duration
            .with_label_values(&["w", "p"])
            .observe(1.0);
        m.connect_failures.with_label_values(&["w", "p"]).inc();
        m.token_estimate_ratio
            .with_label_values(&["w", "p", "prompt"])
            .observe(1.0);
        m.process_connections.with_label_values(&["w", "x"]).inc();
        m.process_bytes.with_label_values(&["w", "x", "sent"]).inc();
        m.tokens
            .with_label_values(&["w", "p", "prompt", "estimated"])
            .inc();
        m.model_tokens
            .with_label_values(&["w", "p", "m", "prompt"])
            .inc();
        m.cost_usd.with_label_values(&["w", "p", "m"]).inc_by(0.5);
        m.exact_requests
            .with_label_values(&["w", "p", "exact"])
            .inc();
        m.secrets.with_label_values(&["w", "p", "jwt"]).inc();
        m.plaintext_problems.with_label_values(&["http2"]).inc();
        m.rate_limited
            .with_label_values(&["w", "p", "connections", "deny"])
            .inc();
        m.budget_remaining
            .with_label_values(&["w", "p", "minute"])
            .set(1);
        m.budget_remaining_usd
            .with_label_values(&["w", "day"])
            .set(1.5);
        m.program_loaded.with_label_values(&["p"]).set(1);
        let doc = include_str!("../../../docs/metrics.md");
        for family in m.registry.gather() {
            assert!(
                doc.contains(&format!("`{}`", family.name())),
                "docs/metrics.md lacks `{}`",
                family.name()
            );
        }
    }
}
