//! The arguments of `llm-egress run`: each overrides one key of the policy.

use std::{net::SocketAddr, path::PathBuf};

/// `--metrics-listen`: an address, or "off".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    At(SocketAddr),
}

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen::Off);
    }
    s.parse()
        .map(Listen::At)
        .map_err(|e| format!("{e}: expected IP:port or \"off\""))
}

#[derive(clap::Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Policy file (TOML, docs/policy.md). Reloaded on SIGHUP and when it changes.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Overrides the policy's `cgroup` (the cgroup v2 directory to attach to).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Overrides the policy's `pin_path` (bpffs directory for pinned state).
    #[arg(long)]
    pub pin_path: Option<PathBuf>,
    /// Overrides the policy's `state_dir` (where token budgets are kept
    /// across restarts).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Overrides the policy's `metrics_listen` (an address, or "off").
    #[arg(long, value_parser = parse_listen)]
    pub metrics_listen: Option<Listen>,
    /// Overrides the policy's `audit_log` (a path, or "-" for stdout).
    #[arg(long)]
    pub audit_log: Option<String>,
}
