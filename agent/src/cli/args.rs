//! Command-line interface: `run`, `check`, `providers`, `status`, `verify`,
//! `fleet-bench`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "llm-egress",
    version,
    about = "eBPF host agent for LLM egress control"
)]
pub struct Cli {
    /// Log format of the agent's own messages (stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Load the programs and enforce a policy (the built-in default policy,
    /// audit-only, when --config is not given).
    Run(crate::run::args::RunArgs),
    /// Validate a policy file; exits non-zero and names line, column, key and
    /// value of every error.
    Check {
        /// The policy file.
        file: PathBuf,
    },
    /// List the providers of the built-in catalog (merged with a policy's
    /// additions when --config is given).
    Providers {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Live view of a running agent (workloads × providers, health), read
    /// from its /metrics; --once or --json print one frame for scripts.
    Status(crate::cli::status::StatusArgs),
    /// Load every program with the verifier's statistics and print, per
    /// program, the instructions it processed, its states and its
    /// verification time; exits non-zero when one fails to load or exceeds
    /// its budget (a fifth of the kernel's 1,000,000-instruction limit, 1 s).
    /// Attaches nothing.
    Verify {
        /// One JSON array on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// Write this program's whole verifier log to stderr (for
        /// developers of the kernel programs).
        #[arg(long, value_name = "PROGRAM")]
        trace: Option<String>,
    },
    /// Measure how many fleet lease operations a second the `[fleet]`
    /// Redis of a policy serves, with simulated agents (docs/fleet.md).
    FleetBench(crate::cli::fleet_bench::BenchArgs),
}
