//! `llm-egress status`: a live view of a running agent, like `top`.
//!
//! It reads what every other client reads: the agent's `/metrics` (and
//! `/readyz`) over HTTP, so it needs no privileges, no socket of its own in
//! the agent, and works against a remote agent (a node's DaemonSet pod) as
//! well as a local one. This module owns the snapshot built from the
//! samples (`crate::telemetry::prom_text` parses them) (workloads × providers, agent health), and the two
//! renderings: a table redrawn in place every `--interval` seconds, and one
//! JSON document for scripts (`--json`). It must not reach into the agent's
//! state any other way.
//!
//! Columns whose metrics the agent does not export (rate limits before
//! anything was limited, or on older agents; bytes, active connections and
//! token estimates on older agents) show `-`, and the JSON has `null`
//! there; they fill in by themselves once the agent exports
//! `llm_egress_rate_limited_total`, ... with `workload` and `provider`
//! labels. The rate-limit column counts what was refused or dropped
//! (`verdict="deny"`), not what audit mode let through. Token counts of
//! different `source`s are never added together: the column holds
//! `source="estimated"` only.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{self, IsTerminal, Write},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    queue, style,
    terminal::{self, ClearType},
};
use serde::Serialize;

use crate::telemetry::prom_text::{self, Sample};

/// `llm-egress status` arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// The agent's HTTP endpoint, `http://HOST:PORT` (default: `metrics_listen`
    /// of --config, else the default 127.0.0.1:9469).
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// A policy file whose `metrics_listen` names the endpoint.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// Print one JSON document and exit.
    #[arg(long)]
    pub json: bool,
    /// Seconds between two frames of the live view.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
}

const IO_TIMEOUT: Duration = Duration::from_secs(3);

pub fn main(args: StatusArgs) -> ExitCode {
    let url = match (&args.metrics, &args.config) {
        (Some(url), _) => url.clone(),
        (None, Some(path)) => match crate::policy::Policy::from_path(path) {
            Ok(p) => match p.metrics_listen {
                Some(addr) => format!("http://{addr}"),
                None => {
                    eprintln!(
                        "llm-egress status: {} sets metrics_listen = \"off\"; give --metrics URL",
                        path.display()
                    );
                    return ExitCode::FAILURE;
                }
            },
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) => crate::policy::Policy::builtin_default()
            .metrics_listen
            .map_or_else(
                || "http://127.0.0.1:9469".to_string(),
                |a| format!("http://{a}"),
            ),
    };
    let endpoint = match Endpoint::parse(&url) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("llm-egress status: --metrics {url:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json || args.once {
        return match Snapshot::fetch(&endpoint) {
            Ok(s) => {
                let out = if args.json {
                    serde_json::to_string_pretty(&s).unwrap_or_default()
                } else {
                    render(&s, None)
                };
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("llm-egress status: cannot read {}: {e}", endpoint.url);
                ExitCode::FAILURE
            }
        };
    }
    live(
        &endpoint,
        Duration::from_secs_f64(args.interval.clamp(0.2, 3600.0)),
    );
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------- HTTP

/// Where the agent answers: `http://HOST:PORT`, without a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    host: String,
}

impl Endpoint {
    /// `http://127.0.0.1:9469`, `127.0.0.1:9469`, `[::1]:9469`,
    /// `http://localhost:9469/metrics` (the path is dropped).
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.starts_with("https://") {
            return Err("https is not supported; the agent serves plain HTTP".into());
        } else if s.contains("://") {
            return Err("expected http://HOST:PORT".into());
        } else {
            s
        };
        let host = rest.split('/').next().unwrap_or_default();
        let has_port = host.rsplit_once(':').is_some_and(|(h, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && (!h.contains(':') || h.ends_with(']'))
        });
        if host.is_empty() || !has_port {
            return Err("expected http://HOST:PORT (the port is required)".into());
        }
        Ok(Endpoint {
            url: format!("http://{host}"),
            host: host.to_string(),
        })
    }

    /// `GET path`: the status code and the body (an error status is an
    /// answer, not an error).
    pub fn get(&self, path: &str) -> io::Result<(u16, String)> {
        let agent = ureq::AgentBuilder::new()
            .timeout(IO_TIMEOUT)
            .user_agent("llm-egress-status")
            .build();
        let response = match agent.get(&format!("{}{path}", self.url)).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(io::Error::other(t.to_string())),
        };
        let status = response.status();
        Ok((status, response.into_string()?))
    }
}

// ---------------------------------------------------------------- snapshot

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdicts {
    pub allow: u64,
    pub deny: u64,
    pub audit: u64,
    pub total: u64,
}

impl Verdicts {
    fn add(&mut self, verdict: &str, n: u64) {
        match verdict {
            "allow" => self.allow += n,
            "deny" => self.deny += n,
            "audit" => self.audit += n,
            _ => {}
        }
        self.total += n;
    }
}

/// One workload × provider pair. `None`: the agent exports no such metric.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Row {
    pub workload: String,
    pub provider: String,
    pub connections: Verdicts,
    pub bytes_sent: Option<u64>,
    pub bytes_received: Option<u64>,
    pub active_connections: Option<u64>,
    /// `llm_egress_tokens_total{source="estimated"}`, prompt + completion;
    /// other sources (exact counts) are never added to it.
    pub tokens_estimated: Option<u64>,
    pub rate_limited: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Health {
    pub version: Option<String>,
    pub object: Option<String>,
    pub policy_generation: Option<u64>,
    pub decisions: Verdicts,
    pub events_lost: Option<u64>,
    pub event_decode_errors: Option<u64>,
    pub internal_errors: Option<u64>,
    pub map_update_errors: u64,
    pub audit_log_errors: Option<u64>,
    pub attribution_misses: Option<u64>,
    pub resolver_failures: Option<u64>,
    pub resolved_addresses: Option<u64>,
    pub policy_reloads: BTreeMap<String, u64>,
    /// Cgroups each workload selects now.
    pub workload_cgroups: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub endpoint: String,
    /// `/readyz` answered 200.
    pub ready: bool,
    /// `/readyz`'s body (the reason when not ready).
    pub readiness: String,
    pub agent: Health,
    /// Sorted by total connections, most first, then by name.
    pub rows: Vec<Row>,
    /// Metric families behind columns shown as `-`: the agent does not
    /// export them, or has no series of them yet.
    pub not_exported: Vec<&'static str>,
}

/// Columns that come from optional metric families: (family, column name).
const OPTIONAL: [(&str, &str); 4] = [
    ("llm_egress_bytes_total", "bytes"),
    ("llm_egress_active_connections", "active connections"),
    ("llm_egress_tokens_total", "estimated tokens"),
    ("llm_egress_rate_limited_total", "rate limits"),
];

fn count(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        v.round() as u64
    } else {
        0
    }
}

impl Snapshot {
    /// GET /metrics and /readyz of `endpoint`.
    pub fn fetch(endpoint: &Endpoint) -> io::Result<Snapshot> {
        let (status, body) = endpoint.get("/metrics")?;
        if status != 200 {
            return Err(io::Error::other(format!(
                "GET /metrics answered HTTP {status}: {}",
                body.trim()
            )));
        }
        let samples = prom_text::parse(&body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("/metrics {e}")))?;
        let (ready, readiness) = match endpoint.get("/readyz") {
            Ok((code, body)) => (code == 200, body.trim().to_string()),
            Err(e) => (false, format!("GET /readyz failed: {e}")),
        };
        Ok(Snapshot {
            endpoint: endpoint.url.clone(),
            ready,
            readiness,
            ..Snapshot::from_samples(&samples)
        })
    }

    /// The view of one scrape.
    pub fn from_samples(samples: &[Sample]) -> Snapshot {
        let mut s = Snapshot::default();
        let mut rows: BTreeMap<(String, String), Row> = BTreeMap::new();
        fn entry<'a>(
            rows: &'a mut BTreeMap<(String, String), Row>,
            w: &str,
            p: &str,
        ) -> &'a mut Row {
            rows.entry((w.to_string(), p.to_string()))
                .or_insert_with(|| Row {
                    workload: w.to_string(),
                    provider: p.to_string(),
                    ..Row::default()
                })
        }
        let present = |family: &str| samples.iter().any(|x| x.name == family);
        let a = &mut s.agent;
        for x in samples {
            let n = count(x.value);
            let (w, p) = (
                x.label("workload").unwrap_or("none"),
                x.label("provider").unwrap_or("none"),
            );
            match x.name.as_str() {
                "llm_egress_connections_total" => entry(&mut rows, w, p)
                    .connections
                    .add(x.label("verdict").unwrap_or(""), n),
                "llm_egress_bytes_total" => {
                    let r = entry(&mut rows, w, p);
                    match x.label("direction") {
                        Some("sent") => *r.bytes_sent.get_or_insert(0) += n,
                        Some("received") => *r.bytes_received.get_or_insert(0) += n,
                        _ => {}
                    }
                }
                "llm_egress_active_connections" => {
                    *entry(&mut rows, w, p).active_connections.get_or_insert(0) += n
                }
                "llm_egress_tokens_total" if x.label("source") == Some("estimated") => {
                    *entry(&mut rows, w, p).tokens_estimated.get_or_insert(0) += n
                }
                // Refused or dropped; audit-mode would-be hits are not.
                "llm_egress_rate_limited_total" if x.label("verdict") != Some("audit") => {
                    *entry(&mut rows, w, p).rate_limited.get_or_insert(0) += n
                }
                "llm_egress_decisions_total" => {
                    a.decisions.add(x.label("verdict").unwrap_or(""), n)
                }
                "llm_egress_policy_generation" => a.policy_generation = Some(n),
                "llm_egress_events_lost_total" => a.events_lost = Some(n),
                "llm_egress_event_decode_errors_total" => a.event_decode_errors = Some(n),
                "llm_egress_internal_errors_total" => a.internal_errors = Some(n),
                "llm_egress_map_update_errors_total" => a.map_update_errors += n,
                "llm_egress_audit_log_errors_total" => a.audit_log_errors = Some(n),
                "llm_egress_attribution_misses_total" => a.attribution_misses = Some(n),
                "llm_egress_resolver_failures_total" => a.resolver_failures = Some(n),
                "llm_egress_resolved_addresses" => a.resolved_addresses = Some(n),
                "llm_egress_policy_reloads_total" => {
                    *a.policy_reloads
                        .entry(x.label("result").unwrap_or("?").to_string())
                        .or_default() += n
                }
                "llm_egress_workload_cgroups" => {
                    *a.workload_cgroups.entry(w.to_string()).or_default() += n
                }
                "llm_egress_build_info" => {
                    a.version = x.label("version").map(str::to_string);
                    a.object = x.label("object").map(str::to_string);
                }
                _ => {}
            }
        }
        // A family the agent exports shows 0 in rows it has no sample for.
        let (bytes, active, tokens, limited) = (
            present("llm_egress_bytes_total"),
            present("llm_egress_active_connections"),
            present("llm_egress_tokens_total"),
            present("llm_egress_rate_limited_total"),
        );
        s.rows = rows
            .into_values()
            .map(|mut r| {
                // Bytes, active connections, tokens and limits are kept for
                // provider connections only: "-" for the rest.
                if r.provider == "none" {
                    return r;
                }
                if bytes {
                    r.bytes_sent.get_or_insert(0);
                    r.bytes_received.get_or_insert(0);
                }
                if active {
                    r.active_connections.get_or_insert(0);
                }
                if tokens {
                    r.tokens_estimated.get_or_insert(0);
                }
                if limited {
                    r.rate_limited.get_or_insert(0);
                }
                r
            })
            .collect();
        s.rows.sort_by(|x, y| {
            y.connections
                .total
                .cmp(&x.connections.total)
                .then_with(|| (&x.workload, &x.provider).cmp(&(&y.workload, &y.provider)))
        });
        s.not_exported = OPTIONAL
            .iter()
            .filter(|(f, _)| !present(f))
            .map(|(f, _)| *f)
            .collect();
        s
    }
}

// ---------------------------------------------------------------- rendering

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// 1234567 → `1.2M`, for byte columns.
fn human(v: Option<u64>) -> String {
    match v {
        None => "-".into(),
        Some(n) if n < 1024 => n.to_string(),
        Some(n) => {
            let (mut x, mut unit) = (n as f64, 0);
            while x >= 1024.0 && unit < 4 {
                x /= 1024.0;
                unit += 1;
            }
            format!("{x:.1}{}", ["", "K", "M", "G", "T"][unit])
        }
    }
}

/// One frame of text. With `previous` (the snapshot before, and the time
/// between them) the CONN/S column shows the rate of new connections.
pub fn render(s: &Snapshot, previous: Option<(&Snapshot, Duration)>) -> String {
    let a = &s.agent;
    let mut out = String::new();
    // A degraded agent's reason is several lines (one per missing
    // program): the first goes in the header, the rest under it.
    let mut reason = s.readiness.trim_end().lines();
    let ready = if s.ready {
        "ready".to_string()
    } else {
        format!("NOT READY ({})", reason.next().unwrap_or(""))
    };
    let _ = writeln!(
        out,
        "llm-egress status  {}  {ready}  version {}  object {}",
        s.endpoint,
        a.version.as_deref().unwrap_or("-"),
        a.object.as_deref().unwrap_or("-")
    );
    if !s.ready {
        for line in reason {
            let _ = writeln!(out, "  {}", line.trim_start());
        }
    }
    let reloads: Vec<String> = ["ok", "invalid", "failed"]
        .iter()
        .map(|r| format!("{r} {}", a.policy_reloads.get(*r).copied().unwrap_or(0)))
        .collect();
    let _ = writeln!(
        out,
        "policy generation {}  reloads {}",
        opt(a.policy_generation),
        reloads.join(" ")
    );
    let _ = writeln!(
        out,
        "decisions allow {} deny {} audit {}  events lost {}  decode errors {}  internal errors {}  map update errors {}  audit log errors {}",
        a.decisions.allow,
        a.decisions.deny,
        a.decisions.audit,
        opt(a.events_lost),
        opt(a.event_decode_errors),
        opt(a.internal_errors),
        a.map_update_errors,
        opt(a.audit_log_errors)
    );
    out.push('\n');
    let header = [
        "WORKLOAD",
        "PROVIDER",
        "ALLOW",
        "DENY",
        "AUDIT",
        "CONN/S",
        "SENT",
        "RECEIVED",
        "ACTIVE",
        "TOKENS(EST)",
        "RATE-LIMITED",
    ];
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for r in &s.rows {
        let rate = previous.and_then(|(p, dt)| {
            let before = p
                .rows
                .iter()
                .find(|x| x.workload == r.workload && x.provider == r.provider)
                .map_or(0, |x| x.connections.total);
            (dt.as_secs_f64() > 0.0).then(|| {
                format!(
                    "{:.1}",
                    r.connections.total.saturating_sub(before) as f64 / dt.as_secs_f64()
                )
            })
        });
        table.push(vec![
            r.workload.clone(),
            r.provider.clone(),
            r.connections.allow.to_string(),
            r.connections.deny.to_string(),
            r.connections.audit.to_string(),
            rate.unwrap_or_else(|| "-".into()),
            human(r.bytes_sent),
            human(r.bytes_received),
            opt(r.active_connections),
            opt(r.tokens_estimated),
            opt(r.rate_limited),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, v)| {
                if c < 2 {
                    format!("{v:<w$}", w = widths[c])
                } else {
                    format!("{v:>w$}", w = widths[c])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    if s.rows.is_empty() {
        let _ = writeln!(out, "(no connections reported yet)");
    }
    if !a.workload_cgroups.is_empty() {
        let list: Vec<String> = a
            .workload_cgroups
            .iter()
            .map(|(w, n)| format!("{w} {n}"))
            .collect();
        let _ = writeln!(out, "\ncgroups per workload: {}", list.join(", "));
    }
    if !s.not_exported.is_empty() {
        let cols: Vec<String> = OPTIONAL
            .iter()
            .filter(|(f, _)| s.not_exported.contains(f))
            .map(|(f, c)| format!("{c} ({f})"))
            .collect();
        let _ = writeln!(
            out,
            "no series of these metrics yet (shown as -): {}",
            cols.join(", ")
        );
    }
    out
}

// ---------------------------------------------------------------- live view

/// The terminal in raw mode while the live view runs, so that `q` (or
/// Ctrl-C, a key in raw mode) quits at once; restored on drop, also when
/// SIGTERM ends the view. Off when stdin is not a terminal: then only a
/// signal stops the view.
struct RawTerminal {
    raw: bool,
    /// Set by SIGINT and SIGTERM.
    stop: Arc<AtomicBool>,
}

impl RawTerminal {
    fn enable() -> RawTerminal {
        let stop = Arc::new(AtomicBool::new(false));
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
                eprintln!("llm-egress status: cannot handle signal {sig}: {e}");
            }
        }
        let raw = io::stdin().is_terminal() && terminal::enable_raw_mode().is_ok();
        RawTerminal { raw, stop }
    }

    /// Waits up to `d`; true when the user asked to quit (q, Ctrl-C,
    /// SIGINT, SIGTERM).
    fn wait_for_quit(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if self.stop.load(Ordering::SeqCst) {
                return true;
            }
            if !self.raw {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if event::poll(Duration::from_millis(100)).unwrap_or(false)
                && let Ok(Event::Key(k)) = event::read()
                && k.kind == KeyEventKind::Press
                && (matches!(k.code, KeyCode::Char('q' | 'Q'))
                    || (k.code == KeyCode::Char('c')
                        && k.modifiers.contains(KeyModifiers::CONTROL)))
            {
                return true;
            }
        }
        self.stop.load(Ordering::SeqCst)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.raw {
            let _ = terminal::disable_raw_mode();
        }
    }
}

fn live(endpoint: &Endpoint, interval: Duration) {
    let term = RawTerminal::enable();
    let mut previous: Option<(Snapshot, Instant)> = None;
    let mut stdout = io::stdout();
    let _ = queue!(stdout, cursor::Hide);
    loop {
        let frame = match Snapshot::fetch(endpoint) {
            Ok(s) => {
                let now = Instant::now();
                let text = render(&s, previous.as_ref().map(|(p, t)| (p, now - *t)));
                previous = Some((s, now));
                text
            }
            Err(e) => format!(
                "llm-egress status  {}\ncannot read the agent: {e}\n(retrying every {:.0} s)\n",
                endpoint.url,
                interval.as_secs_f64()
            ),
        };
        let frame = format!(
            "{frame}\nrefreshing every {:.1} s; q or Ctrl-C quits\n",
            interval.as_secs_f64()
        );
        // Raw mode does not turn "\n" into a new line at column 0.
        let _ = queue!(
            stdout,
            cursor::MoveTo(0, 0),
            terminal::Clear(ClearType::All),
            style::Print(frame.replace('\n', "\r\n"))
        );
        let _ = stdout.flush();
        if term.wait_for_quit(interval) {
            break;
        }
    }
    let _ = queue!(stdout, cursor::Show, style::Print("\r\n"));
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP llm_egress_connections_total Connections.
# TYPE llm_egress_connections_total counter
llm_egress_connections_total{provider="openai",verdict="allow",workload="bot"} 3
llm_egress_connections_total{provider="openai",verdict="deny",workload="batch"} 2
llm_egress_connections_total{provider="none",verdict="deny",workload="batch"} 1
llm_egress_connections_total{provider="openai",verdict="audit",workload="none"} 5 1700000000000
llm_egress_decisions_total{verdict="allow"} 10
llm_egress_decisions_total{verdict="deny"} 3
llm_egress_decisions_total{verdict="audit"} 5
llm_egress_events_lost_total 0
llm_egress_policy_generation 4
llm_egress_policy_reloads_total{result="ok"} 3
llm_egress_policy_reloads_total{result="invalid"} 1
llm_egress_workload_cgroups{workload="bot"} 2
llm_egress_build_info{object="5bcf9c904f00bae5",version="0.1.0"} 1
"#;

    #[test]
    fn endpoints() {
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:9469").unwrap().url,
            "http://127.0.0.1:9469"
        );
        assert_eq!(
            Endpoint::parse("127.0.0.1:9469/metrics").unwrap().url,
            "http://127.0.0.1:9469"
        );
        assert_eq!(
            Endpoint::parse("http://[::1]:9469/").unwrap().url,
            "http://[::1]:9469"
        );
        assert!(Endpoint::parse("https://x:1").is_err());
        assert!(Endpoint::parse("http://127.0.0.1").is_err());
        assert!(Endpoint::parse("http://[::1]").is_err());
        assert!(Endpoint::parse("ftp://x:1").is_err());
    }

    #[test]
    fn snapshot_counts_rows_and_health() {
        let s = Snapshot::from_samples(&prom_text::parse(TEXT).unwrap());
        let row = |w: &str, p: &str| {
            s.rows
                .iter()
                .find(|r| r.workload == w && r.provider == p)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            row("bot", "openai").connections,
            Verdicts {
                allow: 3,
                deny: 0,
                audit: 0,
                total: 3
            }
        );
        assert_eq!(row("batch", "openai").connections.deny, 2);
        assert_eq!(row("none", "openai").connections.audit, 5);
        // most connections first
        assert_eq!(s.rows[0].workload, "none");
        assert_eq!(
            s.agent.decisions,
            Verdicts {
                allow: 10,
                deny: 3,
                audit: 5,
                total: 18
            }
        );
        assert_eq!(s.agent.policy_generation, Some(4));
        assert_eq!(s.agent.events_lost, Some(0));
        assert_eq!(s.agent.policy_reloads.get("invalid"), Some(&1));
        assert_eq!(s.agent.workload_cgroups.get("bot"), Some(&2));
        assert_eq!(s.agent.version.as_deref(), Some("0.1.0"));
        assert_eq!(row("bot", "openai").tokens_estimated, None);
        assert_eq!(s.not_exported.len(), 4);
    }

    #[test]
    fn optional_families_fill_their_columns() {
        let text = format!(
            "{TEXT}llm_egress_bytes_total{{workload=\"bot\",provider=\"openai\",direction=\"sent\"}} 2048\n\
             llm_egress_bytes_total{{workload=\"bot\",provider=\"openai\",direction=\"received\"}} 10\n\
             llm_egress_tokens_total{{workload=\"bot\",provider=\"openai\",kind=\"prompt\",source=\"estimated\"}} 7\n\
             llm_egress_tokens_total{{workload=\"bot\",provider=\"openai\",kind=\"completion\",source=\"estimated\"}} 5\n\
             llm_egress_tokens_total{{workload=\"bot\",provider=\"openai\",kind=\"completion\",source=\"exact\"}} 100\n"
        );
        let s = Snapshot::from_samples(&prom_text::parse(&text).unwrap());
        let bot = s.rows.iter().find(|r| r.workload == "bot").unwrap();
        // exact counts are never added to the estimate
        assert_eq!(
            (bot.bytes_sent, bot.bytes_received, bot.tokens_estimated),
            (Some(2048), Some(10), Some(12))
        );
        let batch = s
            .rows
            .iter()
            .find(|r| r.workload == "batch" && r.provider == "openai")
            .unwrap();
        assert_eq!(
            (batch.bytes_sent, batch.tokens_estimated, batch.rate_limited),
            (Some(0), Some(0), None)
        );
        assert_eq!(
            s.not_exported,
            vec![
                "llm_egress_active_connections",
                "llm_egress_rate_limited_total"
            ]
        );
    }

    #[test]
    fn renders_a_table_with_dashes_for_missing_metrics() {
        let mut s = Snapshot::from_samples(&prom_text::parse(TEXT).unwrap());
        s.endpoint = "http://127.0.0.1:9469".into();
        s.ready = true;
        let text = render(&s, None);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("llm-egress status  http://127.0.0.1:9469  ready  version 0.1.0"),
            "{text}"
        );
        assert!(
            lines[1].contains("policy generation 4") && lines[1].contains("invalid 1"),
            "{text}"
        );
        assert!(
            lines[2].contains("decisions allow 10 deny 3 audit 5")
                && lines[2].contains("events lost 0"),
            "{text}"
        );
        let header = lines
            .iter()
            .position(|l| l.starts_with("WORKLOAD"))
            .unwrap();
        let cols = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            cols(lines[header]),
            [
                "WORKLOAD",
                "PROVIDER",
                "ALLOW",
                "DENY",
                "AUDIT",
                "CONN/S",
                "SENT",
                "RECEIVED",
                "ACTIVE",
                "TOKENS(EST)",
                "RATE-LIMITED"
            ]
        );
        assert_eq!(
            cols(lines[header + 1]),
            [
                "none", "openai", "0", "0", "5", "-", "-", "-", "-", "-", "-"
            ]
        );
        assert_eq!(
            cols(lines[header + 2]),
            ["bot", "openai", "3", "0", "0", "-", "-", "-", "-", "-", "-"]
        );
        // columns line up: every row is as wide as the header or narrower
        assert!(text.contains("cgroups per workload: bot 2"), "{text}");
        assert!(
            text.contains("estimated tokens (llm_egress_tokens_total)"),
            "{text}"
        );

        let mut later = s.clone();
        later
            .rows
            .iter_mut()
            .find(|r| r.workload == "bot")
            .unwrap()
            .connections
            .allow += 4;
        later
            .rows
            .iter_mut()
            .find(|r| r.workload == "bot")
            .unwrap()
            .connections
            .total += 4;
        let text = render(&later, Some((&s, Duration::from_secs(2))));
        let bot = text.lines().find(|l| l.starts_with("bot ")).unwrap();
        assert_eq!(cols(bot)[5], "2.0", "{text}");
    }

    #[test]
    fn not_ready_says_why_and_json_has_nulls() {
        let s = Snapshot {
            endpoint: "http://x:1".into(),
            readiness: "not ready: programs not attached yet".into(),
            ..Snapshot::from_samples(&prom_text::parse(TEXT).unwrap())
        };
        assert!(
            render(&s, None)
                .lines()
                .next()
                .unwrap()
                .contains("NOT READY (not ready: programs not attached yet)")
        );
        let degraded = Snapshot {
            readiness: "degraded: 1 program(s) failed to load; the others enforce the policy without them:\n  names_dns_ingress: too large\n".into(),
            ..s.clone()
        };
        let text = render(&degraded, None);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        assert!(
            header.contains("NOT READY (degraded: 1 program(s) failed to load; the others enforce the policy without them:)")
                && !header.contains("names_dns_ingress"),
            "{text}"
        );
        assert_eq!(
            lines.next(),
            Some("  names_dns_ingress: too large"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ready"], false);
        assert_eq!(v["agent"]["policy_generation"], 4);
        let bot = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["workload"] == "bot")
            .unwrap();
        assert_eq!(bot["connections"]["allow"], 3);
        assert!(bot["tokens_estimated"].is_null() && bot["bytes_sent"].is_null());
    }
}
