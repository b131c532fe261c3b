//! The arguments of `llm-egress run`: each overrides one key of the policy.

use std::{net::SocketAddr, path::PathBuf};

use crate::policy::{AuditLog, Policy, PolicyErrors};

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

/// Reads the policy and applies the command-line overrides.
pub fn load_policy(args: &RunArgs) -> Result<Policy, PolicyErrors> {
    let mut policy = match &args.config {
        Some(path) => Policy::from_path(path)?,
        None => Policy::builtin_default(),
    };
    apply_overrides(&mut policy, args);
    Ok(policy)
}

fn apply_overrides(policy: &mut Policy, args: &RunArgs) {
    if let Some(c) = &args.cgroup {
        policy.cgroup = Some(c.clone());
    }
    if let Some(p) = &args.pin_path {
        policy.pin_path = p.clone();
    }
    if let Some(d) = &args.state_dir {
        policy.state_dir = d.clone();
    }
    match args.metrics_listen {
        Some(Listen::At(m)) => policy.metrics_listen = Some(m),
        Some(Listen::Off) => policy.metrics_listen = None,
        None => {}
    }
    if let Some(a) = &args.audit_log {
        policy.audit_log = match a.as_str() {
            "-" => AuditLog::Stdout,
            "off" => AuditLog::Off,
            path => AuditLog::File(PathBuf::from(path)),
        };
    }
}
