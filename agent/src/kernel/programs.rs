//! What each kernel program does for the user, and what the agent does when
//! the kernel refuses one (docs/operations.md, "When a program fails to
//! load").
//!
//! The five connect-time verdict hooks (the four cgroup_sock_addr hooks and
//! the socket-kind verdict, cgroup/sock_create) are the enforcement: without any of
//! them the agent refuses to start. Each other program adds something (DNS
//! learning, SNI verdicts, accounting, bandwidth policing); without it the
//! agent runs **degraded** (enforcing what the loaded programs can, `/readyz`
//! not ready and naming what is missing), unless the policy has a key that
//! needs it: then it refuses to start (at start) or refuses the policy (on
//! reload), naming the program and the key. This module decides; it never
//! loads or attaches anything (`loader` does).

use llm_egress_common::{
    ALL_PROGRAMS, CONNECT_PROGRAMS, PROG_DNS_INGRESS, PROG_EXEC, PROG_SNI_EGRESS, PROG_SOCK_OPS,
};

use crate::{kernel::loader::ProgramFailure, policy::Policy};

/// Programs the agent can do without, and what the user loses without each.
const LOSSES: [(&str, &str); 4] = [
    (
        PROG_DNS_INGRESS,
        "DNS learning (a provider reached at an address only its DNS answer names is judged by `other`), \
         TLS records and updates of received data (token estimates while a response streams), \
         and received-bandwidth limits",
    ),
    (
        PROG_SNI_EGRESS,
        "SNI verdicts (a denied server name sharing an address with an allowed one gets through), \
         TLS records of sent data, sent-bandwidth limits, and stopping open connections of a spent token budget",
    ),
    (
        PROG_SOCK_OPS,
        "connection accounting (bytes, durations, connection records, token estimates), \
         pacing of bandwidth-limited connections, and failing SNI-denied connections fast",
    ),
    (
        PROG_EXEC,
        "the executable of processes that exit before their event is read",
    ),
];

/// What the user loses without `program` (a connect-time verdict hook: all
/// enforcement).
pub fn loses(program: &str) -> &'static str {
    LOSSES
        .iter()
        .find(|(name, _)| *name == program)
        .map(|(_, lost)| *lost)
        .unwrap_or("the connect-time verdict: nothing would be enforced")
}

/// Whether `program` is one of the connect-time verdict hooks.
pub fn is_verdict(program: &str) -> bool {
    CONNECT_PROGRAMS.contains(&program)
}

/// Programs that bandwidth limits need: the skb programs police them.
const BANDWIDTH_NEEDS: [&str; 2] = [PROG_SNI_EGRESS, PROG_DNS_INGRESS];
/// Programs that token budgets need: sock_ops and the skb programs count
/// what the estimates are made of, the egress program stops open
/// connections of a spent budget.
const TOKENS_NEED: [&str; 3] = [PROG_SOCK_OPS, PROG_DNS_INGRESS, PROG_SNI_EGRESS];
/// Programs that dollar budgets need: exact counts are read on the
/// connections sock_ops tracks; the egress program stops open connections.
const USD_NEED: [&str; 2] = [PROG_SOCK_OPS, PROG_SNI_EGRESS];

/// The policy keys that need `program`, as key paths
/// (`workloads[0].limits.bytes_per_second`).
pub fn keys_needing(policy: &Policy, program: &str) -> Vec<String> {
    let bandwidth = BANDWIDTH_NEEDS.contains(&program);
    let tokens = TOKENS_NEED.contains(&program);
    let usd = USD_NEED.contains(&program);
    let mut keys = Vec::new();
    for (i, w) in policy.workloads.iter().enumerate() {
        if let Some(b) = policy.usd_budgets.get(&w.name).filter(|_| usd) {
            for (name, set) in [("usd_per_day", b.per_day), ("usd_per_month", b.per_month)] {
                if set.is_some() {
                    keys.push(format!("workloads[{i}].limits.{name}"));
                }
            }
        }
        let levels = std::iter::once((format!("workloads[{i}].limits"), &w.limits)).chain(
            w.provider_limits.iter().map(|(p, l)| {
                let name = policy.providers.get(*p).map_or("?", |p| p.name.as_str());
                (format!("workloads[{i}].limits.providers.{name}"), l)
            }),
        );
        for (at, l) in levels {
            if bandwidth && l.bandwidth.is_some() {
                keys.push(format!("{at}.bytes_per_second"));
            }
            if tokens && l.tokens_per_minute.is_some() {
                keys.push(format!("{at}.tokens_per_minute"));
            }
            if tokens && l.tokens_per_day.is_some() {
                keys.push(format!("{at}.tokens_per_day"));
            }
        }
    }
    keys
}

/// Why the agent cannot run with the programs it has.
#[derive(Debug, thiserror::Error)]
pub enum ProgramsError {
    #[error(
        "program {program} failed to load ({reason}); it is one of the connect-time verdict hooks, without which nothing is enforced, so the agent does not start"
    )]
    Verdict {
        program: &'static str,
        reason: String,
    },
    #[error(
        "the policy needs kernel programs that are not running; remove these keys to run without them:{detail}"
    )]
    Needed {
        /// One line per program: its name, why it is not running, the
        /// keys that need it and what is lost without it.
        detail: String,
    },
}

/// Checks that `policy` can be enforced without the programs in `failed`
/// (those that failed to load, or that are not attached): a verdict hook
/// among them, else every program a key of the policy needs.
pub fn check(policy: &Policy, failed: &[ProgramFailure]) -> Result<(), ProgramsError> {
    if let Some(f) = failed.iter().find(|f| is_verdict(f.name)) {
        return Err(ProgramsError::Verdict {
            program: f.name,
            reason: f.reason.clone(),
        });
    }
    let mut detail = String::new();
    for f in failed {
        let keys = keys_needing(policy, f.name);
        if !keys.is_empty() {
            detail.push_str(&format!(
                "\n  {} ({}) is needed by {}; without it the agent loses {}",
                f.name,
                f.reason,
                keys.join(", "),
                loses(f.name)
            ));
        }
    }
    if !detail.is_empty() {
        return Err(ProgramsError::Needed { detail });
    }
    Ok(())
}

/// The programs a policy cannot count on: those that `failed`, and those of
/// `ALL_PROGRAMS` that are not `running` because `programs` leaves them out.
pub fn unavailable(failed: &[ProgramFailure], running: &[&'static str]) -> Vec<ProgramFailure> {
    let mut out = failed.to_vec();
    for name in ALL_PROGRAMS {
        if !running.contains(&name) && !failed.iter().any(|f| f.name == name) {
            out.push(ProgramFailure {
                name,
                reason: "not attached: `programs` leaves it out, and it changes only on restart"
                    .into(),
            });
        }
    }
    out
}

/// The `/readyz` text of a degraded agent: one line per missing program,
/// with the kernel's reason and what is lost.
pub fn degraded_summary(failed: &[ProgramFailure]) -> String {
    let mut out = format!(
        "degraded: {} program(s) failed to load; the others enforce the policy without them:",
        failed.len()
    );
    for f in failed {
        out.push_str(&format!(
            "\n{}: {}; lost: {}",
            f.name,
            f.reason,
            loses(f.name)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_egress_common::PROG_CONNECT4;

    fn policy(text: &str) -> Policy {
        Policy::parse(text, "test.toml").unwrap()
    }

    fn failed(name: &'static str) -> ProgramFailure {
        ProgramFailure {
            name,
            reason: "E2BIG; BPF program is too large".into(),
        }
    }

    const LIMITED: &str = r#"
[[providers]]
name = "p"
cidrs = ["10.0.0.0/8"]

[[workloads]]
name = "w"
cgroup = "w"
allow = ["p"]
[workloads.limits]
connections_per_second = 5
[workloads.limits.providers.p]
bytes_per_second = 1_000_000
tokens_per_day = 1000
"#;

    #[test]
    fn every_program_but_the_verdict_has_a_loss_written_down() {
        for p in ALL_PROGRAMS {
            assert_eq!(is_verdict(p), !LOSSES.iter().any(|(n, _)| *n == p), "{p}");
        }
    }

    #[test]
    fn a_failed_verdict_hook_is_always_fatal() {
        let p = policy("");
        let e = check(&p, &[failed(PROG_DNS_INGRESS), failed(PROG_CONNECT4)]).unwrap_err();
        assert!(matches!(e, ProgramsError::Verdict { program, .. } if program == PROG_CONNECT4));
        assert!(e.to_string().contains("nothing is enforced"), "{e}");
    }

    #[test]
    fn the_socket_kind_verdict_is_a_verdict_hook_in_both_sets() {
        use llm_egress_common::PROG_SOCK_CREATE;
        assert!(is_verdict(PROG_SOCK_CREATE));
        assert!(ALL_PROGRAMS.contains(&PROG_SOCK_CREATE));
        let e = check(&policy(""), &[failed(PROG_SOCK_CREATE)]).unwrap_err();
        assert!(
            matches!(e, ProgramsError::Verdict { program, .. } if program == PROG_SOCK_CREATE),
            "{e}"
        );
    }

    #[test]
    fn a_missing_program_no_key_needs_is_degraded_not_fatal() {
        let p = policy(
            "[[workloads]]\nname = \"w\"\ncgroup = \"w\"\n[workloads.limits]\nconnections_per_second = 5\n",
        );
        for name in [PROG_DNS_INGRESS, PROG_SNI_EGRESS, PROG_SOCK_OPS, PROG_EXEC] {
            assert!(check(&p, &[failed(name)]).is_ok(), "{name}");
        }
    }

    #[test]
    fn keys_that_need_a_missing_program_are_named() {
        let p = policy(LIMITED);
        assert_eq!(
            keys_needing(&p, PROG_DNS_INGRESS),
            [
                "workloads[0].limits.providers.p.bytes_per_second",
                "workloads[0].limits.providers.p.tokens_per_day"
            ]
        );
        assert_eq!(
            keys_needing(&p, PROG_SOCK_OPS),
            ["workloads[0].limits.providers.p.tokens_per_day"]
        );
        assert!(keys_needing(&p, PROG_EXEC).is_empty());
        let usd = policy(
            "[[workloads]]\nname = \"w\"\ncgroup = \"w\"\nexact_tokens = true\n[workloads.limits]\nusd_per_day = 1\n",
        );
        assert_eq!(
            keys_needing(&usd, PROG_SOCK_OPS),
            ["workloads[0].limits.usd_per_day"]
        );
        assert!(keys_needing(&usd, PROG_DNS_INGRESS).is_empty());
        let e = check(&p, &[failed(PROG_SNI_EGRESS)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(PROG_SNI_EGRESS)
                && e.contains("bytes_per_second")
                && e.contains("BPF program is too large"),
            "{e}"
        );
    }

    #[test]
    fn programs_left_out_are_unavailable_to_a_reload() {
        let u = unavailable(&[], &CONNECT_PROGRAMS);
        let names: Vec<_> = u.iter().map(|f| f.name).collect();
        assert_eq!(names, [PROG_SOCK_OPS, PROG_DNS_INGRESS, PROG_SNI_EGRESS]);
        let e = check(&policy(LIMITED), &u).unwrap_err().to_string();
        for needle in [
            "account_sock_ops (not attached",
            "names_dns_ingress (not attached",
            "names_sni_egress (not attached",
            "providers.p.bytes_per_second",
            "providers.p.tokens_per_day",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let running: Vec<_> = ALL_PROGRAMS
            .into_iter()
            .filter(|p| *p != PROG_DNS_INGRESS)
            .collect();
        let u = unavailable(&[failed(PROG_DNS_INGRESS)], &running);
        assert_eq!(u, [failed(PROG_DNS_INGRESS)]);
    }

    #[test]
    fn the_summary_names_program_reason_and_loss() {
        let s = degraded_summary(&[failed(PROG_DNS_INGRESS)]);
        assert!(
            s.contains("names_dns_ingress: E2BIG") && s.contains("DNS learning"),
            "{s}"
        );
    }
}
