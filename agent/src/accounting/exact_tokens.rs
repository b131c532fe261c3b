//! What an exchange read from plaintext adds to metrics and the audit log:
//! the functions the plaintext reader's glue calls with (workload,
//! provider, exchange) (docs/exact-tokens.md, "Metrics and records").
//!
//! [`ExactTokens`] holds what the policy gives this part (the price table,
//! the secret rules and actions) and the bounded `model` label values; it
//! counts `llm_egress_tokens_total{source="exact"}`,
//! `llm_egress_model_tokens_total`, `llm_egress_cost_usd_total`,
//! `llm_egress_exact_requests_total`, `llm_egress_secrets_total` and
//! `llm_egress_plaintext_problems_total`, and writes `request` and `secret`
//! records. It does not decide what a finding does to the connection
//! (`block` is not enforced) and does not charge budgets: [`Charge`] is
//! what the glue (`crate::accounting::exact_conns`) adds to the token
//! tally (tokens by pair, dollars by workload).
//!
//! Never both: a connection whose exchanges are counted here adds no
//! estimate (`source="estimated"`) for the same tokens; the glue owns that
//! switch (docs/exact-tokens.md, "How a connection is counted").

use std::{collections::HashMap, sync::Arc};

use crate::{
    kernel::socket_stop::Stopped,
    plaintext::exchange::{Exchange, Problem},
    plaintext::secrets::{Finding, SecretRules},
    policy::catalog::prices::{Origin, PriceTable},
    policy::{Policy, SecretAction},
    telemetry::audit::{Attribution, AuditSink, RequestRecord, SecretRecord},
    telemetry::metrics::Metrics,
};

/// Distinct `model` label values per workload; later models are counted
/// as `other`.
pub const MODELS_PER_WORKLOAD: usize = 16;
/// The `model` label of exchanges whose model is not known.
pub const UNKNOWN_MODEL: &str = "unknown";
/// The `model` label of models past the first `MODELS_PER_WORKLOAD`.
pub const OTHER_MODEL: &str = "other";

/// The bounded `model` label: the first `limit` distinct models of each
/// workload keep their name (first seen, not most used: a label must not
/// change under a running counter), the rest are `other`.
#[derive(Debug, Default)]
pub struct ModelLabels {
    seen: HashMap<String, Vec<String>>,
    limit: usize,
}

impl ModelLabels {
    pub fn new(limit: usize) -> Self {
        Self {
            seen: HashMap::new(),
            limit,
        }
    }

    pub fn label(&mut self, workload: &str, model: Option<&str>) -> String {
        let Some(model) = model else {
            return UNKNOWN_MODEL.to_owned();
        };
        let models = self.seen.entry(workload.to_owned()).or_default();
        if models.iter().any(|m| m == model) {
            return model.to_owned();
        }
        if models.len() < self.limit {
            models.push(model.to_owned());
            return model.to_owned();
        }
        OTHER_MODEL.to_owned()
    }
}

/// What one exchange costs, for a budget keeper: prompt + completion
/// tokens, and USD when the model has a price.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Charge {
    pub tokens: u64,
    pub usd: Option<f64>,
}

/// Why the policy's exact-token settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExactError {
    #[error("the built-in price table is invalid: {0}")]
    Prices(&'static str),
    #[error("secret pattern {name}: {source}")]
    Pattern {
        name: String,
        #[source]
        source: crate::plaintext::secrets::PatternError,
    },
}

pub struct ExactTokens {
    prices: PriceTable,
    rules: Arc<SecretRules>,
    secrets: crate::policy::SecretsConfig,
    models: ModelLabels,
    generation: u64,
}

impl ExactTokens {
    /// The settings of `policy` (generation `generation`).
    pub fn new(policy: &Policy, generation: u64) -> Result<Self, ExactError> {
        let mut s = Self {
            prices: crate::policy::catalog::prices::catalog()
                .map_err(ExactError::Prices)?
                .clone(),
            rules: Arc::new(SecretRules::new(&[])),
            secrets: Default::default(),
            models: ModelLabels::new(MODELS_PER_WORKLOAD),
            generation,
        };
        s.reload(policy, generation)?;
        Ok(s)
    }

    /// A new policy: prices and secret settings replaced; the `model`
    /// labels already given stay (their counters live on).
    pub fn reload(&mut self, policy: &Policy, generation: u64) -> Result<(), ExactError> {
        let catalog = crate::policy::catalog::prices::catalog().map_err(ExactError::Prices)?;
        let custom = (policy.secrets.patterns.iter())
            .map(|p| {
                crate::plaintext::secrets::compile(&p.regex)
                    .map(|r| (p.name.clone(), r))
                    .map_err(|source| ExactError::Pattern {
                        name: p.name.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.prices = PriceTable::with_overrides(catalog, &policy.prices);
        self.rules = Arc::new(SecretRules::new(&custom));
        self.secrets = policy.secrets.clone();
        self.generation = generation;
        Ok(())
    }

    /// What the policy does with secrets of `workload`.
    pub fn secret_action(&self, workload: &str) -> SecretAction {
        self.secrets.action_for(workload)
    }

    /// The rules to give a new connection's tracker
    /// (`exchange::Tracker::new`); None: the workload's secrets are off.
    pub fn secret_rules(&self, workload: &str) -> Option<Arc<SecretRules>> {
        (self.secret_action(workload) != SecretAction::Off).then(|| self.rules.clone())
    }

    /// Counts an exchange and writes its `request` record; returns what a
    /// budget would be charged.
    pub fn record_exchange(
        &mut self,
        metrics: &Metrics,
        audit: &AuditSink,
        workload: &str,
        provider: &str,
        who: Attribution,
        ex: &Exchange,
    ) -> Charge {
        let label = self.models.label(workload, ex.model());
        let priced = ex
            .response_model
            .as_deref()
            .and_then(|m| self.prices.lookup(m))
            .or_else(|| ex.model().and_then(|m| self.prices.lookup(m)));
        let result = if ex.usage.is_some() {
            "exact"
        } else {
            "no_usage"
        };
        metrics
            .exact_requests
            .with_label_values(&[workload, provider, result])
            .inc();
        let mut charge = Charge::default();
        let mut cost = None;
        if let Some(u) = &ex.usage {
            for (kind, n) in [("prompt", u.input), ("completion", u.output)] {
                metrics
                    .tokens
                    .with_label_values(&[workload, provider, kind, "exact"])
                    .inc_by(n);
                metrics
                    .model_tokens
                    .with_label_values(&[workload, provider, &label, kind])
                    .inc_by(n);
            }
            charge.tokens = u.input.saturating_add(u.output);
            if let Some((_, price, _)) = priced {
                let usd = price.cost(u);
                metrics
                    .cost_usd
                    .with_label_values(&[workload, provider, &label])
                    .inc_by(usd);
                cost = Some(usd);
            }
        }
        charge.usd = cost;
        let record = RequestRecord {
            event: "request",
            time: crate::telemetry::audit::rfc3339(std::time::SystemTime::now()),
            workload: workload.to_owned(),
            provider: provider.to_owned(),
            who,
            api: ex.api.as_str(),
            method: ex.method.clone(),
            path: ex.path.clone(),
            status: ex.status,
            model: ex.model().map(str::to_owned),
            response_model: ex.response_model.clone(),
            model_label: label,
            stream: ex.stream,
            max_tokens: ex.max_tokens,
            tokens_source: if ex.usage.is_some() { "exact" } else { "none" },
            tokens_prompt: ex.usage.map(|u| u.input),
            tokens_completion: ex.usage.map(|u| u.output),
            tokens_cached: ex.usage.map(|u| u.cached),
            tokens_cache_write: ex.usage.map(|u| u.cache_write),
            cost_usd: cost,
            price_model: priced
                .filter(|_| cost.is_some())
                .map(|(m, ..)| m.to_owned()),
            price_origin: priced.filter(|_| cost.is_some()).map(|(.., o)| match o {
                Origin::Catalog => "catalog",
                Origin::Policy => "policy",
            }),
            prices_as_of: self.prices.as_of.clone(),
            request_bytes: ex.request_bytes,
            response_bytes: ex.response_bytes,
            response_coding: ex.response_coding.as_str(),
            complete: ex.complete,
            generation: self.generation,
        };
        audit.record(&record, metrics);
        charge
    }

    /// Counts a finding and writes its `secret` record, with the
    /// workload's `action` and, for `block`, what the stop did (the glue,
    /// exact_conns.rs, stops the connection before it records).
    #[allow(clippy::too_many_arguments)]
    pub fn record_secret(
        &self,
        metrics: &Metrics,
        audit: &AuditSink,
        workload: &str,
        provider: &str,
        who: Attribution,
        finding: &Finding,
        action: SecretAction,
        stopped: Option<Stopped>,
    ) {
        metrics
            .secrets
            .with_label_values(&[workload, provider, &finding.kind])
            .inc();
        let record = SecretRecord {
            event: "secret",
            time: crate::telemetry::audit::rfc3339(std::time::SystemTime::now()),
            workload: workload.to_owned(),
            provider: provider.to_owned(),
            who,
            kind: finding.kind.clone(),
            fingerprint: finding.fingerprint.clone(),
            offset: finding.offset,
            action: action.as_str(),
            result: stopped.map_or("audited", Stopped::as_str),
            generation: self.generation,
        };
        audit.record(&record, metrics);
    }
}

/// Counts something the plaintext reader could not read.
pub fn record_problem(metrics: &Metrics, problem: Problem) {
    metrics
        .plaintext_problems
        .with_label_values(&[problem.as_str()])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        plaintext::body_coding::Coding,
        plaintext::exchange::{Direction, Output, Tracker},
        plaintext::usage::{Api, Usage},
    };

    fn value(m: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut out = Vec::new();
        let enc = prometheus::TextEncoder::new();
        prometheus::Encoder::encode(&enc, &m.registry.gather(), &mut out).expect("encode");
        let text = String::from_utf8(out).expect("utf8");
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && labels
                        .iter()
                        .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn exchange(model: &str, usage: Option<Usage>) -> Exchange {
        Exchange {
            api: Api::OpenAiChat,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            status: 200,
            model: Some(model.into()),
            response_model: Some(format!("{model}-2024-08-06")),
            stream: false,
            max_tokens: None,
            usage,
            request_bytes: 10,
            response_bytes: 20,
            response_coding: Coding::Gzip,
            complete: true,
        }
    }

    fn policy(text: &str) -> Policy {
        match Policy::parse(text, "test.toml") {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn exchange_counts_tokens_model_and_cost() {
        let m = Metrics::new().expect("metrics");
        let audit = AuditSink::open(&crate::policy::AuditLog::Off, m.clone()).expect("audit");
        let p = policy("[prices.\"gpt-4o\"]\ninput = 2\noutput = 10\ncached = 1\n");
        let mut x = ExactTokens::new(&p, 3).expect("exact");
        let u = Usage {
            input: 1_000_000,
            output: 100_000,
            cached: 200_000,
            cache_write: 0,
        };
        let c = x.record_exchange(
            &m,
            &audit,
            "bot",
            "openai",
            Attribution::default(),
            &exchange("gpt-4o", Some(u)),
        );
        let want = 0.8 * 2.0 + 0.2 * 1.0 + 0.1 * 10.0;
        assert_eq!(c.tokens, 1_100_000);
        assert!((c.usd.unwrap_or(0.0) - want).abs() < 1e-9);
        let tokens = |kind, source| {
            value(
                &m,
                "llm_egress_tokens_total",
                &[("workload", "bot"), ("kind", kind), ("source", source)],
            )
        };
        assert_eq!(
            (tokens("prompt", "exact"), tokens("completion", "exact")),
            (1e6, 1e5)
        );
        assert_eq!(tokens("prompt", "estimated"), 0.0);
        assert_eq!(
            value(
                &m,
                "llm_egress_model_tokens_total",
                &[("model", "gpt-4o"), ("kind", "completion")]
            ),
            1e5
        );
        let cost = value(
            &m,
            "llm_egress_cost_usd_total",
            &[("workload", "bot"), ("model", "gpt-4o")],
        );
        assert!((cost - want).abs() < 1e-9);
        // No usage: counted as such, no tokens, no cost.
        x.record_exchange(
            &m,
            &audit,
            "bot",
            "openai",
            Attribution::default(),
            &exchange("gpt-4o", None),
        );
        assert_eq!(
            value(
                &m,
                "llm_egress_exact_requests_total",
                &[("result", "no_usage")]
            ),
            1.0
        );
        // A model without a price: tokens, no cost.
        let c = x.record_exchange(
            &m,
            &audit,
            "bot",
            "openai",
            Attribution::default(),
            &exchange("house-model", Some(u)),
        );
        assert_eq!(c.usd, None);
        assert_eq!(
            value(&m, "llm_egress_cost_usd_total", &[("model", "house-model")]),
            0.0
        );
    }

    #[test]
    fn records_are_documented() {
        let doc = include_str!("../../../docs/events.md");
        let p = policy("");
        let x = ExactTokens::new(&p, 1).expect("exact");
        let ex = exchange("gpt-4o", Some(Usage::default()));
        let r = RequestRecord {
            event: "request",
            time: "t".into(),
            workload: "w".into(),
            provider: "p".into(),
            who: Attribution::default(),
            api: ex.api.as_str(),
            method: ex.method.clone(),
            path: ex.path.clone(),
            status: 200,
            model: None,
            response_model: None,
            model_label: "m".into(),
            stream: false,
            max_tokens: None,
            tokens_source: "exact",
            tokens_prompt: None,
            tokens_completion: None,
            tokens_cached: None,
            tokens_cache_write: None,
            cost_usd: None,
            price_model: None,
            price_origin: None,
            prices_as_of: x.prices.as_of.clone(),
            request_bytes: 0,
            response_bytes: 0,
            response_coding: "gzip",
            complete: true,
            generation: 1,
        };
        let s = SecretRecord {
            event: "secret",
            time: "t".into(),
            workload: "w".into(),
            provider: "p".into(),
            who: Attribution::default(),
            kind: "jwt".into(),
            fingerprint: "f".into(),
            offset: 0,
            action: "audit",
            result: "audited",
            generation: 1,
        };
        for v in [serde_json::to_value(&r), serde_json::to_value(&s)] {
            let v = v.expect("json");
            for key in v.as_object().expect("object").keys() {
                assert!(
                    doc.contains(&format!("`{key}`")),
                    "docs/events.md does not document `{key}`"
                );
            }
        }
        // The built-in kinds are the documented ones.
        for (kind, ..) in crate::plaintext::secrets::BUILTIN {
            assert!(
                doc.contains(&format!("`{kind}`")),
                "docs/events.md lacks the kind `{kind}`"
            );
        }
    }

    #[test]
    fn model_labels_are_bounded_per_workload() {
        let mut l = ModelLabels::new(2);
        assert_eq!(l.label("a", Some("m1")), "m1");
        assert_eq!(l.label("a", Some("m2")), "m2");
        assert_eq!(l.label("a", Some("m3")), OTHER_MODEL);
        assert_eq!(l.label("a", Some("m1")), "m1");
        assert_eq!(l.label("b", Some("m3")), "m3");
        assert_eq!(l.label("a", None), UNKNOWN_MODEL);
    }

    #[test]
    fn secrets_follow_the_policy() {
        let p = policy(
            "[secrets]\naction = \"audit\"\npatterns = [{ name = \"internal\", regex = \"INT-[0-9]{8}\" }]\n\n[[workloads]]\nname = \"quiet\"\ncgroup = \"q.slice\"\nsecrets = \"off\"\n",
        );
        let x = ExactTokens::new(&p, 1).expect("exact");
        assert!(x.secret_rules("quiet").is_none());
        let rules = x.secret_rules("bot");
        assert_eq!(x.secret_action("bot"), SecretAction::Audit);
        let mut t = Tracker::new(rules);
        let body = br#"{"model":"gpt-4o","messages":[{"content":"ticket INT-12345678 now"}]}"#;
        let req = [
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
            body,
        ]
        .concat();
        let out = t.feed(Direction::Sent, &req);
        let Some(Output::Secret(f)) = out.first() else {
            panic!("{out:?}")
        };
        let m = Metrics::new().expect("metrics");
        let audit = AuditSink::open(&crate::policy::AuditLog::Off, m.clone()).expect("audit");
        let action = x.secret_action("bot");
        assert_eq!(action, SecretAction::Audit);
        x.record_secret(
            &m,
            &audit,
            "bot",
            "openai",
            Attribution::default(),
            f,
            action,
            None,
        );
        assert_eq!(
            value(&m, "llm_egress_secrets_total", &[("kind", "internal")]),
            1.0
        );
        record_problem(&m, Problem::Bomb);
        assert_eq!(
            value(
                &m,
                "llm_egress_plaintext_problems_total",
                &[("problem", "decompression_bomb")]
            ),
            1.0
        );
    }
}
