//! llm-egress: eBPF host agent for LLM egress control.
//!
//! Module map (one job each): `policy` (file → validated policy), `catalog`
//! (built-in providers), `plan` (policy → kernel entries), `loader` (load,
//! attach, pin, adopt), `maps` (the only map writer), `cgroups` (workload
//! cgroups), `resolver` (provider host addresses), `events` (ring buffer),
//! `attribution` (process and cgroup details), `kube` (pod names, namespaces
//! and labels from the Kubernetes API), `audit` (JSON lines),
//! `metrics` (Prometheus), `http` (endpoints), `agent` (the run loop),
//! `cli` (arguments), `tokens` (token estimates from encrypted traffic),
//! `programs` (what each kernel program gives, and running without one).

mod accounting;
mod agent;
mod attribution;
mod audit;
mod budget;
mod catalog;
mod cgroup_info;
mod cgroups;
mod cli;
mod conn_tokens;
mod dns;
mod events;
mod http;
#[cfg(test)]
mod kernel_agrees;
mod kube;
mod limiter;
mod limits;
mod loader;
mod maps;
mod metrics;
mod ownership;
mod plaintext;
mod plaintext_attach;
mod plaintext_btf;
mod plaintext_metrics;
mod plaintext_procs;
mod plan;
mod policy;
mod policy_watch;
mod privileges;
mod process_series;
mod programs;
mod resolver;
// The kernel's ClientHello rules in userspace, for the fuzz target and the
// tests (fuzz/); the agent does not parse traffic with it.
#[cfg_attr(not(test), allow(dead_code))]
mod connect_line;
#[cfg_attr(not(test), allow(dead_code))]
mod sni;
mod sockets;
mod status;
mod tokens;
mod verifier;

use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// The agent's own log goes to stderr. Colour only when stderr is a
/// terminal: under systemd (journald) and container runtimes (`podman logs`,
/// the kubelet's log files) escape codes would end up in the stored text.
/// `--log-format json` gives collectors one JSON object per line.
fn init_logging(format: LogFormat) {
    let filter =
        EnvFilter::try_from_env("LLM_EGRESS_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// `llm-egress verify`: every program's verifier cost on this kernel.
fn verify(json: bool, trace: Option<&str>) -> ExitCode {
    let stats = match verifier::measure(loader::object(), trace) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("llm-egress verify: {e}");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string(&stats) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("llm-egress verify: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", verifier::table(&stats));
    }
    if stats.is_empty() || !stats.iter().all(verifier::ProgramStats::within_budget) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { file } => match policy::Policy::from_path(&file) {
            Ok(p) => {
                println!(
                    "{}: ok ({} workloads, {} providers, mode {:?})",
                    file.display(),
                    p.workloads.len(),
                    p.providers.len(),
                    p.mode
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Providers { config } => {
            let policy = match config {
                Some(path) => match policy::Policy::from_path(&path) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
                None => policy::Policy::builtin_default(),
            };
            for p in &policy.providers {
                let ports = if p.ports.is_empty() {
                    "any".to_string()
                } else {
                    p.ports
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let cidrs: Vec<String> = p.cidrs.iter().map(ToString::to_string).collect();
                println!(
                    "{:<16} ports={:<8} hosts={} cidrs={}",
                    p.name,
                    ports,
                    p.hosts.join(","),
                    cidrs.join(",")
                );
            }
            ExitCode::SUCCESS
        }
        Command::Status(args) => status::main(args),
        Command::Verify { json, trace } => verify(json, trace.as_deref()),
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("llm-egress: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(agent::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    let mut message = e.to_string();
                    let mut source = std::error::Error::source(&e);
                    // Error types here often show their source in their own
                    // text already: add a source only when it says more.
                    while let Some(s) = source {
                        let text = s.to_string();
                        if !message.contains(&text) {
                            message.push_str(&format!(": {text}"));
                        }
                        source = s.source();
                    }
                    tracing::error!("{message}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
