//! `[fleet]` and the per-workload `scope` / `fleet_failure` of token budgets
//! (docs/fleet.md): the shared ledger on Redis that lets one token budget
//! hold for a workload across every agent of a fleet. This module holds the
//! validated values and the serde mirror of `[fleet]`; the checks are in
//! `validate/fleet.rs`; what the agent does with them is `crate::limits::fleet`.

use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use toml::Spanned;

/// The default `key_prefix`: every key the agents write starts with it.
pub const DEFAULT_KEY_PREFIX: &str = "llm-egress";
/// The default `lease_fraction`: an agent takes 2 % of a budget at a time.
pub const DEFAULT_LEASE_FRACTION: f64 = 0.02;
/// The default `timeout_ms` of one Redis operation.
pub const DEFAULT_TIMEOUT_MS: u64 = 500;
/// The port of a server URL without one.
pub const REDIS_PORT: u16 = 6379;

/// `[fleet]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FleetFile {
    #[serde(default)]
    pub servers: Vec<Spanned<String>>,
    pub key_prefix: Option<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub password: Option<Spanned<String>>,
    pub password_file: Option<Spanned<String>>,
    pub tls_ca: Option<Spanned<String>>,
    pub lease_fraction: Option<Spanned<f64>>,
    pub agents: Option<Spanned<i64>>,
    pub timeout_ms: Option<Spanned<i64>>,
}

/// One Redis server of `servers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    /// `rediss://`: TLS, verified against `tls_ca` (else the system roots).
    pub tls: bool,
    pub db: i64,
}

/// The AUTH password: never printed.
#[derive(Clone, PartialEq, Eq)]
pub enum Password {
    Inline(String),
    /// Read when the agent connects (root's file, like the policy).
    File(PathBuf),
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Password::Inline(_) => f.write_str("Inline(<redacted>)"),
            Password::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// `[fleet]`, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetConfig {
    /// Tried in order; the first that answers is used. They must be the same
    /// ledger (a primary under several names), never independent servers.
    pub servers: Vec<Server>,
    pub key_prefix: String,
    pub username: Option<String>,
    pub password: Option<Password>,
    /// PEM file of the CA that signs the servers' certificates (rediss).
    pub tls_ca: Option<PathBuf>,
    /// Share of a window's limit one lease takes.
    pub lease_fraction: f64,
    /// The number of agents `host_share` divides budgets by; None: the
    /// number of agents last seen in the ledger.
    pub agents: Option<u64>,
    /// Longest wait for one Redis operation; past it the ledger is
    /// unreachable (degraded).
    pub timeout: Duration,
}

/// `scope` of a workload's token budgets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Scope {
    /// This agent's own budget (each agent enforces the whole limit).
    #[default]
    Host,
    /// One budget shared by the workload on every agent of the fleet.
    Fleet,
}

/// `fleet_failure`: what a fleet budget does while the ledger is unreachable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FleetFailure {
    /// Refuse new connections of the pair once its lease is used up.
    Closed,
    /// Enforce a static share of the budget locally (limit / agents).
    #[default]
    HostShare,
    /// Allow, with no budget, until the ledger answers again.
    Open,
}

impl FleetFailure {
    pub fn name(self) -> &'static str {
        match self {
            FleetFailure::Closed => "closed",
            FleetFailure::HostShare => "host_share",
            FleetFailure::Open => "open",
        }
    }
}

/// A workload whose token (or dollar) budgets are fleet-wide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetWorkload {
    /// Its name in the ledger: the workload's name, prefixed by the pod
    /// namespace (`ns/name`) when it selects pods of one namespace.
    pub identity: String,
    pub failure: FleetFailure,
}

/// Parses one `servers` entry: `redis://host[:port][/db]` or
/// `rediss://…` (TLS). Credentials belong in `username`/`password`, not
/// in the URL (it is logged).
pub fn server(s: &str) -> Result<Server, String> {
    let (tls, rest) = if let Some(r) = s.strip_prefix("redis://") {
        (false, r)
    } else if let Some(r) = s.strip_prefix("rediss://") {
        (true, r)
    } else {
        return Err("expected redis://host[:port][/db] or rediss://… (TLS)".into());
    };
    if rest.contains('@') {
        return Err(
            "credentials in the URL would be logged: use `username` and `password_file`".into(),
        );
    }
    let (hostport, db) = match rest.split_once('/') {
        None | Some((_, "")) => (rest.trim_end_matches('/'), 0),
        Some((h, d)) => (
            h,
            d.parse::<i64>()
                .ok()
                .filter(|d| (0..=15).contains(d))
                .ok_or("the database after the `/` must be 0 to 15")?,
        ),
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, p) = v6
            .split_once(']')
            .ok_or("unclosed `[` in an IPv6 address")?;
        (h.to_string(), p.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'))
    {
        return Err("needs a host name or address".into());
    }
    let port = match port {
        None => REDIS_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("the port must be 1 to 65535")?,
    };
    Ok(Server {
        host,
        port,
        tls,
        db,
    })
}

/// A `key_prefix`: 1 to 64 of `A-Z a-z 0-9 : _ . -`.
pub fn key_prefix(s: &str) -> Result<String, String> {
    if (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-'))
    {
        Ok(s.to_string())
    } else {
        Err("must be 1 to 64 characters of A-Z a-z 0-9 : _ . -".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            server("redis://10.0.0.5").unwrap(),
            Server {
                host: "10.0.0.5".into(),
                port: 6379,
                tls: false,
                db: 0
            }
        );
        let s = server("rediss://redis.llm-egress.svc:6380/2").unwrap();
        assert_eq!(
            (s.host.as_str(), s.port, s.tls, s.db),
            ("redis.llm-egress.svc", 6380, true, 2)
        );
        assert_eq!(server("redis://[::1]:7000").unwrap().host, "::1");
        for bad in [
            "10.0.0.5:6379",
            "http://x",
            "redis://:secret@x",
            "redis://x:0",
            "redis://x:99999",
            "redis://x/16",
            "redis://",
            "redis://a b",
        ] {
            assert!(server(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_password_is_never_printed() {
        let p = Password::Inline("hunter2".into());
        assert!(!format!("{p:?}").contains("hunter2"));
    }
}
