//! The audit log: one JSON object per line per decision (docs/events.md).
//!
//! Lines go through a bounded channel to one writer task; if the writer
//! falls behind, records are dropped and counted rather than stalling the
//! event readers. Write errors are counted and logged once per burst.

use std::{
    io::Write,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

use crate::{policy::AuditLog, telemetry::metrics::Metrics};

/// Who made a connection (docs/events.md, shared by every record kind).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Attribution {
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub exe: String,
    pub uid: u32,
    pub gid: u32,
    pub cgroup: String,
    /// What the cgroup path says: systemd unit, container, pod.
    #[serde(flatten)]
    pub cgroup_info: crate::attribution::cgroup_info::CgroupInfo,
    /// The pod of `pod_uid`, from the node's pod list (`crate::attribution::kube`);
    /// null when the agent has no list or the list lacks the uid.
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
}

/// One decision as the audit log shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DecisionRecord {
    /// Always "decision".
    pub event: &'static str,
    /// RFC 3339, UTC, nanoseconds.
    pub time: String,
    pub verdict: &'static str,
    pub reason: &'static str,
    pub workload: String,
    #[serde(flatten)]
    pub who: Attribution,
    pub protocol: &'static str,
    pub dst_addr: String,
    pub dst_port: u16,
    /// How an IPv6 destination carried the IPv4 address in `dst_addr`
    /// (`nat64`, `ipv4_mapped`); only on such records.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_addr_form: Option<&'static str>,
    /// The IPv6 address as the process gave it (with `dst_addr_form`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_addr_given: Option<String>,
    pub provider: Option<String>,
    pub generation: u64,
    pub hook: &'static str,
    /// The name judged: a TLS server name (`hook: "sni"`, `"sni_tunnel"`)
    /// or the host of an HTTP CONNECT request (`hook: "http_connect"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// `raw` or `dgram` (`hook: "sock_create"` records only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_type: Option<&'static str>,
    /// The protocol number given to socket() (`hook: "sock_create"` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_protocol: Option<u8>,
    /// The port of the CONNECT request (`"http_connect"`, `"sni_tunnel"`);
    /// `dst_port` is then the proxy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// The first bytes (up to 64) of a first payload to a named proxy the
    /// kernel could not read (`hook: "proxy_unreadable"`), non-printable
    /// bytes escaped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_start: Option<String>,
}

/// A tracked provider connection at its close.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ConnectionRecord {
    /// Always "connection".
    pub event: &'static str,
    /// Close time, RFC 3339.
    pub time: String,
    pub workload: String,
    pub provider: String,
    /// The `process` label its metrics were counted under.
    pub process: String,
    #[serde(flatten)]
    pub who: Attribution,
    pub dst_addr: String,
    pub dst_port: u16,
    /// False when the handshake never completed.
    pub established: bool,
    /// connect() to handshake done.
    pub connect_seconds: f64,
    /// Handshake done to close.
    pub duration_seconds: f64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Payload-carrying TCP segments received and sent.
    pub segments_received: u32,
    pub segments_sent: u32,
    /// TLS record headers the kernel read in each direction, and of those
    /// the application_data records (docs/events.md).
    pub records_sent: u32,
    pub records_received: u32,
    pub app_records_sent: u32,
    pub app_records_received: u32,
    /// Times the record walks lost the record boundaries (both directions;
    /// 0: the counts are complete) and found them again.
    pub records_sync_lost: u32,
    pub records_resynced: u32,
    pub generation: u64,
    /// Token estimates from the encrypted traffic (docs/tokens.md); null
    /// when the connection carried no request.
    pub tokens_prompt_estimated: Option<u64>,
    pub tokens_completion_estimated: Option<u64>,
    /// The response came as a stream of small segments (SSE).
    pub streamed: Option<bool>,
}

/// One HTTP exchange read from a connection's plaintext
/// (docs/exact-tokens.md; fields: docs/events.md).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RequestRecord {
    /// Always "request".
    pub event: &'static str,
    /// When the response ended, RFC 3339.
    pub time: String,
    pub workload: String,
    pub provider: String,
    #[serde(flatten)]
    pub who: Attribution,
    /// `openai_chat`, `anthropic_messages`, `gemini`, … (crate::usage::Api).
    pub api: &'static str,
    pub method: String,
    /// The request target without its query.
    pub path: String,
    pub status: u16,
    /// The model the request names, else the response's.
    pub model: Option<String>,
    /// The model the response names.
    pub response_model: Option<String>,
    /// The `model` label its metrics were counted under (bounded).
    pub model_label: String,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// `exact` when the response carried usage; `none` otherwise.
    pub tokens_source: &'static str,
    pub tokens_prompt: Option<u64>,
    pub tokens_completion: Option<u64>,
    pub tokens_cached: Option<u64>,
    pub tokens_cache_write: Option<u64>,
    /// USD, from the price table; null: no usage or no price for the model.
    pub cost_usd: Option<f64>,
    /// The price entry used and where it came from (`catalog`, `policy`).
    pub price_model: Option<String>,
    pub price_origin: Option<&'static str>,
    /// The catalog's `as_of` date.
    pub prices_as_of: String,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// The response's content coding (`identity`, `gzip`, `br`, `zstd`, `deflate`).
    pub response_coding: &'static str,
    /// False when the connection closed before the response's end.
    pub complete: bool,
    pub generation: u64,
}

/// A secret found in a request body: its kind and fingerprint, never the
/// secret (docs/exact-tokens.md, "Secrets").
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SecretRecord {
    /// Always "secret".
    pub event: &'static str,
    pub time: String,
    pub workload: String,
    pub provider: String,
    #[serde(flatten)]
    pub who: Attribution,
    /// A built-in kind (`openai_key`, `aws_access_key`, …) or a policy
    /// pattern's name.
    pub kind: String,
    /// First 16 hex digits of the SHA-256 of the matched text.
    pub fingerprint: String,
    /// Offset in the decoded request body.
    pub offset: u64,
    /// The policy's action for the workload: `audit` or `block`.
    pub action: &'static str,
    /// What happened to the connection: `audited` (left alone), `blocked`
    /// (stopped: marked in the kernel and destroyed), `blocked_marked_only`
    /// (marked: no more payload leaves, the destroy failed),
    /// `block_failed` (neither; or the secret was only read at the close).
    pub result: &'static str,
    pub generation: u64,
}

#[derive(Clone)]
pub struct AuditSink {
    tx: Option<mpsc::Sender<String>>,
}

const QUEUE: usize = 65_536;

impl AuditSink {
    /// Opens the log (creating or appending to a file) and starts the writer.
    pub fn open(target: &AuditLog, metrics: Metrics) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match target {
            AuditLog::Off => return Ok(Self { tx: None }),
            AuditLog::Stdout => Box::new(std::io::stdout()),
            // Buffered: flushed whenever the queue runs empty, so a burst
            // costs one write per buffer, not one per line.
            AuditLog::File(path) => Box::new(std::io::BufWriter::with_capacity(
                1 << 16,
                open_append(path)?,
            )),
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("audit-log".into())
            .spawn(move || {
                let mut failing = false;
                while let Some(line) = rx.blocking_recv() {
                    let result = out
                        .write_all(line.as_bytes())
                        .and_then(|()| if rx.is_empty() { out.flush() } else { Ok(()) });
                    match result {
                        Ok(()) => failing = false,
                        Err(e) => {
                            metrics.audit_errors.inc();
                            if !failing {
                                warn!(error = %e, "writing the audit log failed");
                            }
                            failing = true;
                        }
                    }
                }
                let _ = out.flush();
            })?;
        Ok(Self { tx: Some(tx) })
    }

    pub fn record(&self, record: &impl Serialize, metrics: &Metrics) {
        let Some(tx) = &self.tx else { return };
        match serde_json::to_string(record) {
            Ok(mut line) => {
                line.push('\n');
                if tx.try_send(line).is_err() {
                    metrics.audit_errors.inc();
                }
            }
            Err(_) => metrics.audit_errors.inc(),
        }
    }
}

/// The audit log's mode: read and written by root alone (it names
/// processes, users and destinations).
pub const AUDIT_LOG_MODE: u32 = 0o600;

/// Opens the log for appending: created 0600 whatever the umask, never
/// through a symbolic link; an existing log with a wider mode is narrowed
/// to 0600 (logged). Its owner and directories were checked at start
/// (`crate::policy::ownership`).
fn open_append(path: &PathBuf) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(AUDIT_LOG_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mode = file.metadata()?.permissions().mode() & 0o7777;
    if mode != AUDIT_LOG_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(AUDIT_LOG_MODE))?;
        warn!(path = %path.display(), old_mode = format!("{mode:04o}"), "the audit log was readable or writable by others; its mode is now 0600");
    }
    Ok(file)
}

/// The `budget` audit record (docs/events.md).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BudgetRecord {
    /// Always "budget".
    pub event: &'static str,
    pub time: String,
    pub workload: String,
    pub provider: String,
    /// "spent" or "available".
    pub state: &'static str,
    /// The window that is spent (`tokens_per_minute`, `tokens_per_day`,
    /// `usd_per_day`, `usd_per_month`), null when available.
    pub limit: Option<&'static str>,
    pub remaining_minute: Option<i64>,
    pub remaining_day: Option<i64>,
    /// Dollars left in the workload's dollar windows (all its providers).
    pub remaining_usd_day: Option<f64>,
    pub remaining_usd_month: Option<f64>,
}

/// Wall-clock time of a CLOCK_MONOTONIC timestamp.
pub fn wall_time(mono_ns: u64) -> SystemTime {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now_mono = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    let now = SystemTime::now();
    now.checked_sub(Duration::from_nanos(now_mono.saturating_sub(mono_ns)))
        .unwrap_or(now)
}

/// A record's `time`: RFC 3339 in UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let dt = time::OffsetDateTime::from(t);
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_serializes_every_documented_field() {
        let r = DecisionRecord {
            event: "decision",
            time: "2026-01-01T00:00:00.000000000Z".into(),
            verdict: "deny",
            reason: "workload_llm_default",
            workload: "bot".into(),
            who: Attribution {
                pid: 2,
                tgid: 1,
                comm: "curl".into(),
                exe: "/usr/bin/curl".into(),
                uid: 0,
                gid: 0,
                cgroup: "/system.slice/bot.service".into(),
                cgroup_info: crate::attribution::cgroup_info::describe("/system.slice/bot.service"),
                pod_name: Some("bot-1".into()),
                pod_namespace: Some("support".into()),
            },
            protocol: "tcp",
            dst_addr: "192.0.2.1".into(),
            dst_port: 443,
            provider: Some("openai".into()),
            generation: 3,
            hook: "connect4",
            server_name: Some("api.openai.com".into()),
            dst_addr_form: Some("nat64"),
            dst_addr_given: Some("64:ff9b::c000:201".into()),
            socket_type: Some("raw"),
            ip_protocol: Some(1),
            target_port: Some(443),
            payload_start: Some("CONNECT api.op".into()),
        };
        let c = ConnectionRecord {
            event: "connection",
            time: r.time.clone(),
            workload: "bot".into(),
            provider: "openai".into(),
            process: "curl".into(),
            who: r.who.clone(),
            dst_addr: "192.0.2.1".into(),
            dst_port: 443,
            established: true,
            connect_seconds: 0.01,
            duration_seconds: 1.5,
            bytes_sent: 1,
            bytes_received: 2,
            segments_received: 1,
            segments_sent: 1,
            records_sent: 4,
            records_received: 9,
            app_records_sent: 2,
            app_records_received: 5,
            records_sync_lost: 0,
            records_resynced: 0,
            generation: 3,
            tokens_prompt_estimated: Some(20),
            tokens_completion_estimated: Some(30),
            streamed: Some(false),
        };
        let doc = include_str!("../../../docs/events.md");
        let documented = |record: serde_json::Value| {
            for key in record.as_object().unwrap().keys() {
                assert!(
                    doc.contains(&format!("`{key}`")),
                    "docs/events.md does not document `{key}`"
                );
            }
        };
        documented(serde_json::to_value(&c).unwrap());
        let v: serde_json::Value = serde_json::to_value(&r).unwrap();
        documented(v.clone());
        assert_eq!(v["provider"], "openai");
        let b = BudgetRecord {
            event: "budget",
            time: "t".into(),
            workload: "w".into(),
            provider: "p".into(),
            state: "spent",
            limit: Some("tokens_per_minute"),
            remaining_minute: Some(-1),
            remaining_day: None,
            remaining_usd_day: Some(0.5),
            remaining_usd_month: None,
        };
        documented(serde_json::to_value(&b).unwrap());
    }
}
