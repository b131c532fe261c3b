//! Every kernel program verifies with headroom on this kernel.
//!
//! `llm-egress verify --json` loads each program of the agent's object with
//! the verifier's statistics (agent/src/kernel/verifier.rs); this test prints the
//! table and fails when a program does not load or exceeds its budget: a
//! fifth of the kernel's 1,000,000-instruction complexity limit and 1 s of
//! verification. A program that passes the verifier by a hair on one kernel
//! build fails on the next (issue 12); docs/kernels.md keeps the table per
//! kernel and `cargo xtask kernels` measures the others.
//!
//! It also checks that the instrument measures what the agent really loads:
//! the instructions the kernel reports it verified for the programs a
//! running agent attached (`bpf_prog_info.verified_insns`) equal those of
//! the statistics load.

use std::process::Command;

use llm_egress_tests::{Agent, CgroupGuard, agent_bin, bpf, require_root, scenario::policy};
use serde_json::Value;

/// Every program of the object (common/src/maps.rs: ALL_PROGRAMS and
/// PROG_EXEC).
const PROGRAMS: [&str; 17] = [
    "account_sock_ops",
    "attribute_exec",
    "names_dns_ingress",
    "names_sni_egress",
    "plaintext_exec",
    "plaintext_go_entry",
    "plaintext_go_return",
    "plaintext_sock_msg",
    "plaintext_ssl_entry",
    "plaintext_ssl_return",
    "plaintext_tcp_msg",
    "plaintext_tcp_send",
    "verdict_connect4",
    "verdict_connect6",
    "verdict_sendmsg4",
    "verdict_sendmsg6",
    "verdict_sock_create",
];
const BUDGET_INSNS: u64 = 200_000;

/// The program the agent attaches at a hook of tests/src/bpf.rs.
fn program_of(hook: &str) -> &'static str {
    match hook {
        "connect4" => "verdict_connect4",
        "connect6" => "verdict_connect6",
        "sendmsg4" => "verdict_sendmsg4",
        "sendmsg6" => "verdict_sendmsg6",
        "sock_create" => "verdict_sock_create",
        "skb_ingress" => "names_dns_ingress",
        "skb_egress" => "names_sni_egress",
        "sock_ops" => "account_sock_ops",
        other => panic!("no program of the agent is attached at {other}"),
    }
}
const BUDGET_US: u64 = 1_000_000;

fn verify() -> Vec<Value> {
    let out = Command::new(agent_bin())
        .args(["verify", "--json"])
        .output()
        .unwrap_or_else(|e| panic!("running {} verify: {e}", agent_bin().display()));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`llm-egress verify --json` printed no JSON ({e}), exit {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let stats = stats.as_array().cloned().unwrap_or_default();
    let table: Vec<String> = stats
        .iter()
        .map(|s| {
            format!(
                "{:<20} loaded={:<5} insns={:>7} ({:>4.1} %) peak_states={:>6} verification={:>7} µs {}",
                s["program"].as_str().unwrap_or("?"),
                s["loaded"],
                s["insns_processed"],
                s["insns_processed"].as_f64().unwrap_or(0.0) / 10_000.0,
                s["peak_states"],
                s["verification_us"],
                s["error"].as_str().unwrap_or("")
            )
        })
        .collect();
    eprintln!("verifier statistics on this kernel:\n{}", table.join("\n"));
    let all_ok = stats.iter().all(|s| {
        s["loaded"] == true
            && s["insns_processed"]
                .as_u64()
                .is_some_and(|n| n <= BUDGET_INSNS)
            && s["verification_us"].as_u64().is_some_and(|t| t < BUDGET_US)
    });
    assert_eq!(
        out.status.success(),
        all_ok,
        "the exit status of `llm-egress verify` must say whether every program is within budget"
    );
    stats
}

#[test]
fn every_program_verifies_within_a_fifth_of_the_limit() {
    require_root();
    let stats = verify();
    let names: Vec<&str> = stats.iter().filter_map(|s| s["program"].as_str()).collect();
    assert_eq!(
        names, PROGRAMS,
        "verify must measure every program of the object"
    );
    for s in &stats {
        let name = &s["program"];
        assert_eq!(s["loaded"], true, "{name} did not load: {}", s["error"]);
        let insns = s["insns_processed"].as_u64().unwrap_or(u64::MAX);
        assert!(
            insns > 0 && insns <= BUDGET_INSNS,
            "{name}: the verifier processed {insns} instructions; the budget is {BUDGET_INSNS} (a fifth of the 1,000,000 limit)"
        );
        let us = s["verification_us"].as_u64().unwrap_or(u64::MAX);
        assert!(
            us < BUDGET_US,
            "{name}: verification took {us} µs; the budget is {BUDGET_US} µs"
        );
    }
}

#[test]
fn the_statistics_load_costs_what_the_agents_load_costs() {
    require_root();
    let cg = CgroupGuard::new("verifier");
    let agent = Agent::start(&policy(
        &cg,
        "",
        "[defaults]\nllm = \"deny\"\nother = \"allow\"\n",
    ));
    let attached = bpf::attached_program_costs(cg.path());
    let stats = verify();
    let measured = |name: &str| {
        stats
            .iter()
            .find(|s| s["program"] == name)
            .and_then(|s| s["insns_processed"].as_u64())
    };
    assert_eq!(
        attached.len(),
        8,
        "the agent attaches eight programs to its cgroup with programs = \"all\": {attached:?}\n{}",
        agent.context()
    );
    for (hook, kernel_name, verified) in &attached {
        let name = program_of(hook);
        assert!(
            name.starts_with(kernel_name.as_str()),
            "the program at hook {hook} is {kernel_name}, not {name}"
        );
        assert_eq!(
            measured(name),
            Some(u64::from(*verified)),
            "{name}: the kernel verified {verified} instructions when the agent loaded it; `llm-egress verify` measured {:?}",
            measured(name)
        );
    }
}
