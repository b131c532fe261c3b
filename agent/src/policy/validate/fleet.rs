//! `[fleet]` and the `scope` / `fleet_failure` keys of `[workloads.limits]`
//! (docs/fleet.md), checked into [`FleetConfig`] and [`FleetWorkload`]s.
//! Part of the checker of `validate`: errors name key, line and column.

use super::*;
use crate::policy::fleet::{self as f, FleetConfig, FleetFailure, FleetWorkload, Password, Scope};

const SCOPES: &[(&str, Scope)] = &[("host", Scope::Host), ("fleet", Scope::Fleet)];
const FLEET_FAILURES: &[(&str, FleetFailure)] = &[
    ("closed", FleetFailure::Closed),
    ("host_share", FleetFailure::HostShare),
    ("open", FleetFailure::Open),
];
const MAX_AGENTS: i64 = 100_000;

impl Checker<'_> {
    /// `[fleet]`; None when the file has none.
    pub(super) fn fleet(&mut self, file: &PolicyFile) -> Option<FleetConfig> {
        let t = file.fleet.as_ref()?;
        let mut servers = Vec::new();
        for (i, s) in t.servers.iter().enumerate() {
            if let Some(s) = self.check(s, &format!("fleet.servers[{i}]"), |s| f::server(s)) {
                servers.push(s);
            }
        }
        if t.servers.is_empty() {
            let span = [
                t.key_prefix.as_ref().map(Spanned::span),
                t.password_file.as_ref().map(Spanned::span),
                t.tls_ca.as_ref().map(Spanned::span),
            ]
            .into_iter()
            .flatten()
            .next()
            .unwrap_or(0..0);
            self.error_at(
                span,
                "fleet.servers",
                "[fleet] needs `servers`: the Redis ledger, e.g. [\"redis://10.0.0.5:6379\"]",
            );
        }
        let key_prefix = t
            .key_prefix
            .as_ref()
            .and_then(|v| self.check(v, "fleet.key_prefix", |s| f::key_prefix(s)))
            .unwrap_or_else(|| f::DEFAULT_KEY_PREFIX.to_string());
        let username = t.username.as_ref().and_then(|v| {
            self.check(v, "fleet.username", |s| {
                if s.is_empty() || s.chars().any(char::is_whitespace) {
                    Err("must be a non-empty name without spaces".to_string())
                } else {
                    Ok(s.clone())
                }
            })
        });
        let password = match (&t.password, &t.password_file) {
            (Some(_), Some(pf)) => {
                self.error(
                    pf,
                    "fleet.password_file",
                    "`password` and `password_file` both given; use one",
                );
                None
            }
            (Some(p), None) => self
                .check(p, "fleet.password", |s| {
                    if s.is_empty() {
                        Err("must not be empty".to_string())
                    } else {
                        Ok(Password::Inline(s.clone()))
                    }
                })
                .or(None),
            (None, Some(pf)) => self
                .check(pf, "fleet.password_file", |s| absolute(s))
                .map(Password::File),
            (None, None) => None,
        };
        let tls_ca = t
            .tls_ca
            .as_ref()
            .and_then(|v| self.check(v, "fleet.tls_ca", |s| absolute(s)));
        if let Some(ca) = &t.tls_ca
            && !servers.is_empty()
            && !servers.iter().any(|s| s.tls)
        {
            self.error(
                ca,
                "fleet.tls_ca",
                "no server is rediss:// (TLS); the CA would not be used",
            );
        }
        let lease_fraction = t
            .lease_fraction
            .as_ref()
            .and_then(|v| {
                self.check(v, "fleet.lease_fraction", |&x| {
                    if x > 0.0 && x <= 0.5 {
                        Ok(x)
                    } else {
                        Err("must be above 0 and at most 0.5 (a share of each budget)".into())
                    }
                })
            })
            .unwrap_or(f::DEFAULT_LEASE_FRACTION);
        let agents = self.bounded(&t.agents, "fleet.agents", 1..=MAX_AGENTS, " (agents)");
        let timeout = self
            .bounded(
                &t.timeout_ms,
                "fleet.timeout_ms",
                10..=60_000,
                " (milliseconds)",
            )
            .unwrap_or(f::DEFAULT_TIMEOUT_MS);
        Some(FleetConfig {
            servers,
            key_prefix,
            username,
            password,
            tls_ca,
            lease_fraction,
            agents,
            timeout: Duration::from_millis(timeout),
        })
    }

    /// The workloads whose token budgets, dollar budgets and connection
    /// rates are fleet-wide, by name.
    pub(super) fn fleet_workloads(
        &mut self,
        entries: &[Spanned<WorkloadFile>],
        workloads: &[Workload],
        fleet: Option<&FleetConfig>,
    ) -> BTreeMap<String, FleetWorkload> {
        let mut out = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let w = entry.get_ref();
            let key = format!("workloads[{i}].limits");
            let scope = self.choice(
                w.limits.scope.as_ref(),
                &format!("{key}.scope"),
                SCOPES,
                Scope::Host,
            );
            let failure = self.choice(
                w.limits.fleet_failure.as_ref(),
                &format!("{key}.fleet_failure"),
                FLEET_FAILURES,
                FleetFailure::default(),
            );
            if scope == Scope::Host {
                if let Some(v) = &w.limits.fleet_failure {
                    self.error(
                        v,
                        &format!("{key}.fleet_failure"),
                        "only with scope = \"fleet\"",
                    );
                }
                continue;
            }
            let Some(v) = &w.limits.scope else { continue };
            if fleet.is_none() {
                self.error(
                    v,
                    &format!("{key}.scope"),
                    "scope = \"fleet\" needs a [fleet] table with the Redis `servers`",
                );
            }
            let Some(workload) = workloads.iter().find(|x| &x.name == w.name.get_ref()) else {
                continue; // its own errors are reported
            };
            // Token and dollar budgets take leases (limits::fleet),
            // connection rates shares of the rate (limits::fleet_rate).
            let fleet_wide = |l: &Limits| {
                l.tokens_per_minute.is_some()
                    || l.tokens_per_day.is_some()
                    || l.connections.is_some()
            };
            let usd = w.limits.usd_per_day.is_some() || w.limits.usd_per_month.is_some();
            if !fleet_wide(&workload.limits)
                && !workload.provider_limits.values().any(fleet_wide)
                && !usd
            {
                self.error(
                    v,
                    &format!("{key}.scope"),
                    "scope = \"fleet\" applies to token budgets (tokens_per_minute, tokens_per_day), dollar budgets (usd_per_day, usd_per_month) and connections_per_second; this workload has none",
                );
                continue;
            }
            let identity = match &workload.selector {
                Selector::Kubernetes(PodSelector {
                    namespace: Some(ns),
                    ..
                }) => format!("{ns}/{}", workload.name),
                _ => workload.name.clone(),
            };
            out.insert(workload.name.clone(), FleetWorkload { identity, failure });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{errors, ok};
    use crate::policy::fleet::{FleetFailure, Password};

    fn err(text: &str) -> String {
        let all: Vec<String> = errors(text).iter().map(|e| e.to_string()).collect();
        all.join("\n")
    }

    const BOT: &str = r#"
[[workloads]]
name = "bot"
cgroup = "bot"
allow = ["openai"]
[workloads.limits]
tokens_per_day = 1000000
"#;

    #[test]
    fn a_fleet_workload_gets_its_identity_and_failure_mode() {
        let p = ok(&format!(
            "[fleet]\nservers = [\"redis://127.0.0.1:7000\"]\npassword_file = \"/etc/llm-egress/redis\"\nagents = 12\n{BOT}scope = \"fleet\"\nfleet_failure = \"closed\"\n"
        ));
        let fleet = p.fleet.as_ref().unwrap();
        assert_eq!(fleet.servers[0].port, 7000);
        assert_eq!(fleet.key_prefix, "llm-egress");
        assert_eq!(fleet.agents, Some(12));
        assert!(matches!(fleet.password, Some(Password::File(_))));
        let w = &p.fleet_workloads["bot"];
        assert_eq!(w.identity, "bot");
        assert_eq!(w.failure, FleetFailure::Closed);
    }

    #[test]
    fn a_pod_workload_of_one_namespace_is_known_by_both() {
        let p = ok(r#"
[fleet]
servers = ["redis://10.0.0.5"]
[[workloads]]
name = "bot"
allow = ["openai"]
[workloads.k8s]
namespace = "team-a"
labels = { app = "bot" }
[workloads.limits]
tokens_per_minute = 1000
scope = "fleet"
"#);
        assert_eq!(p.fleet_workloads["bot"].identity, "team-a/bot");
        assert_eq!(p.fleet_workloads["bot"].failure, FleetFailure::HostShare);
    }

    #[test]
    fn a_connection_rate_alone_can_be_fleet_wide() {
        let p = ok(
            "[fleet]\nservers = [\"redis://x\"]\n[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\n[workloads.limits]\nconnections_per_second = 5\nscope = \"fleet\"\nfleet_failure = \"open\"\n",
        );
        assert_eq!(p.fleet_workloads["bot"].failure, FleetFailure::Open);
    }

    #[test]
    fn fleet_mistakes_are_named() {
        let e = err(&format!("{BOT}scope = \"fleet\"\n"));
        assert!(e.contains("needs a [fleet] table"), "{e}");
        let e = err(&format!(
            "[fleet]\nservers = [\"redis://x\"]\n{BOT}scope = \"world\"\n"
        ));
        assert!(e.contains("expected one of \"host\", \"fleet\""), "{e}");
        let e = err(&format!("{BOT}fleet_failure = \"open\"\n"));
        assert!(e.contains("only with scope = \"fleet\""), "{e}");
        let e = err(
            "[fleet]\nservers = [\"redis://x\"]\n[[workloads]]\nname = \"bot\"\ncgroup = \"bot\"\n[workloads.limits]\nbytes_per_second = 5000\nscope = \"fleet\"\n",
        );
        assert!(e.contains("applies to token budgets"), "{e}");
        let e = err("[fleet]\nkey_prefix = \"x\"\n");
        assert!(e.contains("[fleet] needs `servers`"), "{e}");
        let e = err("[fleet]\nservers = [\"redis://:pw@x\"]\n");
        assert!(e.contains("password_file"), "{e}");
        let e =
            err("[fleet]\nservers = [\"redis://x\"]\npassword = \"a\"\npassword_file = \"/p\"\n");
        assert!(e.contains("both given"), "{e}");
        let e = err("[fleet]\nservers = [\"redis://x\"]\ntls_ca = \"/ca.pem\"\n");
        assert!(e.contains("no server is rediss://"), "{e}");
        let e = err("[fleet]\nservers = [\"redis://x\"]\nlease_fraction = 0.9\n");
        assert!(e.contains("fleet.lease_fraction"), "{e}");
    }
}
