//! What a policy file (and the catalog's providers.toml) may contain: the
//! serde mirror of the TOML, and the syntax of each single value.
//!
//! The structs give the text its shape: unknown keys and wrong types are
//! rejected here (`deny_unknown_fields`), with the position toml reports.
//! Values that need checking are [`Spanned`] so an error can name their line
//! and column; enum-like strings stay strings so the error can list the
//! accepted words. A key left out is `None` or empty; `validate` applies the
//! defaults (its `DEFAULT_*` constants). The value checks at the end (host
//! names, CIDRs, names, globs, units, addresses) each take one value and
//! return it normalized or say why it is wrong; `validate` calls them and
//! checks what depends on more than one value.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use globset::GlobBuilder;
use ipnet::IpNet;
use serde::{Deserialize, de::DeserializeOwned};
use toml::Spanned;

use super::{AuditLog, NO_WORKLOAD_NAME, PolicyError};

/// Port of a resolver server given without one.
const DNS_PORT: u16 = 53;
const MAX_NAME_LEN: usize = 64;
const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;
const UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".slice", ".socket"];

/// Parses `text` into its mirror; a syntax or shape error (unknown key,
/// wrong type) becomes a [`PolicyError`] at its position.
pub(super) fn from_str<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, PolicyError> {
    toml::from_str(text).map_err(|e| toml_error(origin, text, &e))
}

/// The whole policy file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PolicyFile {
    pub mode: Option<Spanned<String>>,
    pub cgroup: Option<Spanned<String>>,
    pub metrics_listen: Option<Spanned<String>>,
    pub audit_log: Option<Spanned<String>>,
    pub pin_path: Option<Spanned<String>>,
    pub failure_mode: Option<Spanned<String>>,
    pub on_exit: Option<Spanned<String>>,
    pub programs: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    /// Absent: the well-known prefix alone; `[]`: none.
    pub nat64_prefixes: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub defaults: DefaultsFile,
    #[serde(default)]
    pub resolver: ResolverFile,
    #[serde(default)]
    pub telemetry: TelemetryFile,
    #[serde(default)]
    pub kubernetes: KubernetesFile,
    #[serde(default)]
    pub providers: Vec<Spanned<ProviderFile>>,
    #[serde(default)]
    pub workloads: Vec<Spanned<WorkloadFile>>,
    #[serde(default)]
    pub proxies: Vec<Spanned<ProxyFile>>,
    /// `[fleet]` (docs/fleet.md).
    pub fleet: Option<super::fleet::FleetFile>,
    /// `[prices."MODEL"]` (checked in validate/exact.rs). Keys are plain
    /// strings: a key written in a header has no position; its errors are
    /// reported at the entry's `input`.
    #[serde(default)]
    pub prices: BTreeMap<String, PriceFile>,
    #[serde(default)]
    pub secrets: SecretsFile,
}

/// One `[prices."MODEL"]` entry: USD per million tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PriceFile {
    /// Integer or float: serde's `f64` takes TOML integers too.
    pub input: Spanned<f64>,
    pub output: Spanned<f64>,
    pub cached: Option<Spanned<f64>>,
    pub cache_write: Option<Spanned<f64>>,
}

/// `[secrets]`: what is done with secrets found in request bodies, and
/// the policy's own patterns.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretsFile {
    pub action: Option<Spanned<String>>,
    #[serde(default)]
    pub patterns: Vec<Spanned<SecretPatternFile>>,
}

/// `[[secrets.patterns]]` or `patterns = [{ name = "…", regex = "…" }]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SecretPatternFile {
    pub name: Spanned<String>,
    pub regex: Spanned<String>,
}

/// One `[[proxies]]` entry: a forward proxy workloads may be allowed to use.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProxyFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    pub ports: Option<Spanned<Vec<Spanned<i64>>>>,
}

/// `[defaults]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DefaultsFile {
    pub llm: Option<Spanned<String>>,
    pub other: Option<Spanned<String>>,
    pub raw_sockets: Option<Spanned<String>>,
}

/// `[resolver]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResolverFile {
    #[serde(default)]
    pub servers: Vec<Spanned<String>>,
    pub refresh_seconds: Option<Spanned<i64>>,
    pub min_ttl_seconds: Option<Spanned<i64>>,
    pub max_ttl_seconds: Option<Spanned<i64>>,
    /// `"any"` or a list of IP addresses (checked in validate.rs).
    pub trusted: Option<Spanned<toml::Value>>,
}

/// `[telemetry]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryFile {
    pub process_series_per_workload: Option<Spanned<i64>>,
    pub process_series_ttl_seconds: Option<Spanned<i64>>,
    pub learn_estimates: Option<Spanned<String>>,
}

/// `[kubernetes]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct KubernetesFile {
    pub enabled: Option<Spanned<String>>,
    pub api_server: Option<Spanned<String>>,
    pub node_name: Option<Spanned<String>>,
    pub token_file: Option<Spanned<String>>,
    pub ca_file: Option<Spanned<String>>,
    pub refresh_seconds: Option<Spanned<i64>>,
}

/// A workload's `k8s = { namespace = "…", labels = { key = "value" } }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PodSelectorFile {
    pub namespace: Option<Spanned<String>>,
    /// Keys are plain strings: toml cannot give the position of a key
    /// written in a `[workloads.k8s.labels]` header; a key's error is
    /// reported at its value.
    pub labels: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

impl PodSelectorFile {
    /// Where the selector is reported: its first key with a position, else
    /// `fallback` (the workload's table).
    pub fn span(&self, fallback: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let spans = [
            self.namespace.as_ref().map(Spanned::span),
            self.labels.as_ref().map(Spanned::span),
        ];
        spans
            .into_iter()
            .flatten()
            .min_by_key(|s| s.start)
            .unwrap_or(fallback)
    }
}

/// One `[[providers]]` entry of a policy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ProviderFile {
    pub name: Spanned<String>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    /// Absent or empty: every port.
    pub ports: Option<Spanned<Vec<Spanned<i64>>>>,
    pub disabled: Option<Spanned<bool>>,
}

/// One `[[workloads]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WorkloadFile {
    pub name: Spanned<String>,
    pub cgroup: Option<Spanned<String>>,
    pub systemd_unit: Option<Spanned<String>>,
    /// A unit of a user's systemd manager; needs `uid`.
    pub systemd_user_unit: Option<Spanned<String>>,
    pub uid: Option<Spanned<i64>>,
    /// With `cgroup`: also select directories non-root users created.
    pub match_delegated: Option<Spanned<bool>>,
    /// Not `Spanned`: toml cannot give the span of a table made by a
    /// `[workloads.k8s.labels]` header; errors use the spans inside.
    pub k8s: Option<PodSelectorFile>,
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    pub llm: Option<Spanned<String>>,
    pub other: Option<Spanned<String>>,
    pub raw_sockets: Option<Spanned<String>>,
    /// Trace the workload's OpenSSL calls for exact tokens (docs/plaintext.md).
    pub exact_tokens: Option<Spanned<bool>>,
    /// `[[proxies]]` names the workload may use.
    #[serde(default)]
    pub proxies: Vec<Spanned<String>>,
    /// Not `Spanned`, like `k8s`: `[workloads.limits]` is a header.
    #[serde(default)]
    pub limits: LimitsFile,
    /// `secrets = "off" | "audit" | "block"`: overrides `[secrets].action`.
    pub secrets: Option<Spanned<String>>,
}

/// A workload's `[workloads.limits]`: the limit keys, and per-provider
/// overrides of them.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitsFile {
    /// Integer or float: serde's `f64` takes TOML integers too.
    pub connections_per_second: Option<Spanned<f64>>,
    pub burst: Option<Spanned<i64>>,
    pub bytes_per_second: Option<Spanned<i64>>,
    pub bytes_burst: Option<Spanned<i64>>,
    pub tokens_per_minute: Option<Spanned<i64>>,
    pub tokens_per_day: Option<Spanned<i64>>,
    /// `"host"` or `"fleet"`: whose token budgets these are (docs/fleet.md).
    pub scope: Option<Spanned<String>>,
    /// With `scope = "fleet"`: `"closed"`, `"host_share"` or `"open"`.
    pub fleet_failure: Option<Spanned<String>>,
    /// US dollars of exact counts, workload-wide (checked in
    /// validate/exact.rs; not in provider overrides).
    pub usd_per_day: Option<Spanned<f64>>,
    pub usd_per_month: Option<Spanned<f64>>,
    /// `[workloads.limits.providers.NAME]`, by provider name. Keys are plain
    /// strings: toml cannot give the position of a key written in a header;
    /// a name's error is reported at the nearest value (`LimitKeysFile::span`).
    #[serde(default)]
    pub providers: BTreeMap<String, LimitKeysFile>,
}

/// `[workloads.limits.providers.NAME]`: the keys of [`LimitsFile`] without
/// `providers` (an override has no overrides).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LimitKeysFile {
    pub connections_per_second: Option<Spanned<f64>>,
    pub burst: Option<Spanned<i64>>,
    pub bytes_per_second: Option<Spanned<i64>>,
    pub bytes_burst: Option<Spanned<i64>>,
    pub tokens_per_minute: Option<Spanned<i64>>,
    pub tokens_per_day: Option<Spanned<i64>>,
}

impl LimitsFile {
    /// The limit keys of the workload-wide level.
    pub fn keys(&self) -> LimitKeysRef<'_> {
        LimitKeysRef {
            connections_per_second: self.connections_per_second.as_ref(),
            burst: self.burst.as_ref(),
            bytes_per_second: self.bytes_per_second.as_ref(),
            bytes_burst: self.bytes_burst.as_ref(),
            tokens_per_minute: self.tokens_per_minute.as_ref(),
            tokens_per_day: self.tokens_per_day.as_ref(),
        }
    }
}

impl LimitKeysFile {
    pub fn keys(&self) -> LimitKeysRef<'_> {
        LimitKeysRef {
            connections_per_second: self.connections_per_second.as_ref(),
            burst: self.burst.as_ref(),
            bytes_per_second: self.bytes_per_second.as_ref(),
            bytes_burst: self.bytes_burst.as_ref(),
            tokens_per_minute: self.tokens_per_minute.as_ref(),
            tokens_per_day: self.tokens_per_day.as_ref(),
        }
    }
}

/// The limit keys of one level (workload-wide or one provider's override),
/// as written.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct LimitKeysRef<'a> {
    pub connections_per_second: Option<&'a Spanned<f64>>,
    pub burst: Option<&'a Spanned<i64>>,
    pub bytes_per_second: Option<&'a Spanned<i64>>,
    pub bytes_burst: Option<&'a Spanned<i64>>,
    pub tokens_per_minute: Option<&'a Spanned<i64>>,
    pub tokens_per_day: Option<&'a Spanned<i64>>,
}

impl LimitKeysRef<'_> {
    /// Where the level is reported when no single value is at fault: its
    /// first key with a position, else `fallback`.
    pub fn span(&self, fallback: std::ops::Range<usize>) -> std::ops::Range<usize> {
        let spans = [
            self.connections_per_second.map(Spanned::span),
            self.burst.map(Spanned::span),
            self.bytes_per_second.map(Spanned::span),
            self.bytes_burst.map(Spanned::span),
            self.tokens_per_minute.map(Spanned::span),
            self.tokens_per_day.map(Spanned::span),
        ];
        spans
            .into_iter()
            .flatten()
            .min_by_key(|s| s.start)
            .unwrap_or(fallback)
    }
}

/// The built-in catalog file (`catalog/providers.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CatalogFile {
    #[serde(default)]
    pub provider: Vec<Spanned<CatalogEntryFile>>,
}

/// One `[[provider]]` of the catalog: a policy provider's fields (ports
/// required, no `disabled`) plus the name people know it by.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CatalogEntryFile {
    pub name: Spanned<String>,
    pub display: Spanned<String>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub cidrs: Vec<Spanned<String>>,
    pub ports: Spanned<Vec<Spanned<i64>>>,
}

// ---- The syntax of single values: Ok(normalized value) or Err(why). ----

pub(super) fn absolute(s: &str) -> Result<PathBuf, String> {
    if Path::new(s).is_absolute() {
        Ok(PathBuf::from(s))
    } else {
        Err("must be an absolute path".to_owned())
    }
}

pub(super) fn metrics_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        "not a socket address (like 127.0.0.1:9469 or [::1]:9469) or \"off\"".to_owned()
    })
}

pub(super) fn audit_log(s: &str) -> Result<AuditLog, String> {
    match s {
        "-" => Ok(AuditLog::Stdout),
        "off" => Ok(AuditLog::Off),
        _ if Path::new(s).is_absolute() => Ok(AuditLog::File(PathBuf::from(s))),
        _ => Err("expected \"-\" (stdout), \"off\" or an absolute path".to_owned()),
    }
}

/// `[resolver] trusted`: `"any"` (None) or a list of IP addresses.
pub(super) fn trusted(v: &toml::Value) -> Result<Option<Vec<IpAddr>>, String> {
    const WANT: &str =
        "expected \"any\" or a list of IP addresses (like [\"10.0.0.53\", \"2001:db8::53\"])";
    match v {
        toml::Value::String(s) if s == "any" => Ok(None),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| match i {
                toml::Value::String(s) => s
                    .parse::<IpAddr>()
                    .map_err(|_| format!("{s:?} is not an IP address; {WANT}")),
                _ => Err(WANT.to_owned()),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        _ => Err(WANT.to_owned()),
    }
}

/// A resolver server: `ip:port`, or `ip` for port 53.
pub(super) fn server(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let bare = s
                .strip_prefix('[')
                .and_then(|r| r.strip_suffix(']'))
                .unwrap_or(s);
            let ip: IpAddr = bare.parse().map_err(|_| {
                "not an IP address or IP:port (like 10.0.0.53, 10.0.0.53:5353 or [2001:db8::53]:53)"
                    .to_owned()
            })?;
            SocketAddr::new(ip, DNS_PORT)
        }
    };
    if addr.port() == 0 {
        return Err("port 0 is not a port".to_owned());
    }
    Ok(addr)
}

/// A provider name: 1 to 64 of `[a-z0-9-_.]`, not an address.
pub(super) fn provider_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if !s.chars().all(allowed) {
        return Err("only lower-case letters, digits, '-', '_' and '.' are allowed".to_owned());
    }
    if s == NO_WORKLOAD_NAME {
        return Err(format!(
            "\"{NO_WORKLOAD_NAME}\" is reserved (the provider label of other destinations)"
        ));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(
            "looks like an IP address; `allow` and `deny` could not tell them apart".to_owned(),
        );
    }
    Ok(())
}

/// A workload name: 1 to 64 of `[A-Za-z0-9_.-]`, not "none".
pub(super) fn workload_name(s: &str) -> Result<(), String> {
    if s.eq_ignore_ascii_case(NO_WORKLOAD_NAME) {
        return Err(format!(
            "\"{NO_WORKLOAD_NAME}\" is reserved for processes in no workload"
        ));
    }
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        return Err("only letters, digits, '_', '.' and '-' are allowed".to_owned());
    }
    Ok(())
}

/// A host name, lower-cased and without its trailing dot; `*.` in front
/// makes it a wildcard for every name below.
pub(super) fn host(s: &str) -> Result<String, String> {
    let lower = s.to_ascii_lowercase();
    let h = lower.strip_suffix('.').unwrap_or(&lower);
    if h.is_empty() {
        return Err("empty host name".to_owned());
    }
    if h.parse::<IpAddr>().is_ok() {
        return Err("an IP address, not a host name: put it in `cidrs`".to_owned());
    }
    if h.len() > MAX_HOST_LEN {
        return Err(format!("longer than {MAX_HOST_LEN} characters"));
    }
    let (wildcard, rest) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h),
    };
    for label in rest.split('.') {
        if label.is_empty() {
            return Err("empty label (a leading dot or two dots in a row)".to_owned());
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(if c == '*' {
                "a wildcard is only a leading \"*.\"".to_owned()
            } else {
                format!(
                    "{c:?} is not allowed: only letters, digits, '-' and '.' (IDNs in xn-- form)"
                )
            });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!(
                "label \"{label}\" is longer than {MAX_LABEL_LEN} characters"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label \"{label}\" starts or ends with '-'"));
        }
    }
    if wildcard && rest.split('.').count() < 2 {
        return Err("a wildcard needs at least two labels after \"*.\"".to_owned());
    }
    Ok(h.to_owned())
}

/// A network: `10.0.0.0/8`, `2001:db8::/32`, or a bare address (/32, /128).
pub(super) fn cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s
        .parse()
        .map_err(|_| "not an IP address or CIDR (like 10.0.0.0/8 or 2001:db8::/32)".to_owned())?;
    if net.trunc() != net {
        return Err(format!("host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

pub(super) fn port(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(0) => Err("port 0 is not a port (leave `ports` out for every port)".to_owned()),
        Ok(p) => Ok(p),
        Err(_) => Err("not a port (1 to 65535)".to_owned()),
    }
}

/// A workload's cgroup glob, relative to the attach cgroup, without a
/// trailing slash.
pub(super) fn cgroup_glob(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        return Err(
            "must be relative to the attach cgroup (`cgroup`): drop the leading '/'".to_owned(),
        );
    }
    let s = s.trim_end_matches('/');
    if s.is_empty() {
        return Err("empty cgroup glob".to_owned());
    }
    if s.split('/').any(|part| part == "..") {
        return Err("must not contain \"..\"".to_owned());
    }
    if s.split('/').any(|part| part.is_empty() || part == ".") {
        return Err("empty or \".\" path component".to_owned());
    }
    GlobBuilder::new(s)
        .literal_separator(true)
        .build()
        .map_err(|e| format!("not a valid glob: {}", e.kind()))?;
    Ok(s.to_owned())
}

pub(super) fn systemd_unit(s: &str) -> Result<String, String> {
    if s.contains('/') || s.chars().any(char::is_whitespace) {
        return Err("a unit name (like app.service), not a path".to_owned());
    }
    if !UNIT_SUFFIXES
        .iter()
        .any(|suffix| s.len() > suffix.len() && s.ends_with(suffix))
    {
        return Err(format!("must end in {}", UNIT_SUFFIXES.join(", ")));
    }
    Ok(s.to_owned())
}

/// A TOML syntax or shape error (unknown key, wrong type) as a policy
/// error. The key is a best effort from the message and the nearest table
/// header above the position.
fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> PolicyError {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().replace('\n', "; ");
    let key = toml_error_key(text, span.start, e.message());
    PolicyError::at(origin, text, span, key, false, message)
}

pub(super) fn toml_error_key(text: &str, offset: usize, message: &str) -> String {
    let offset = (0..=offset.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let mut table = String::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in text[..line_end].lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = name.trim();
            let n = counts.entry(name).or_default();
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            // A table below the last entry of an array of tables:
            // `[workloads.limits]` is `workloads[n].limits`.
            let name = name.trim();
            let entry = (counts.iter())
                .filter(|(array, _)| {
                    name.strip_prefix(**array)
                        .is_some_and(|rest| rest.starts_with('.'))
                })
                .max_by_key(|(array, _)| array.len());
            table = match entry {
                Some((array, n)) => format!("{array}[{}]{}", n - 1, &name[array.len()..]),
                None => name.to_owned(),
            };
        }
    }
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|m| m.split('`').next())
            .map(str::to_owned)
    };
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let on_line = text[line_start..offset]
        .split_once('=')
        .map(|(k, _)| k.trim().to_owned());
    let field = match (
        quoted("unknown field `").or_else(|| quoted("missing field `")),
        on_line,
    ) {
        // A key inside an inline table: `k8s = { name = "x" }`.
        (Some(f), Some(outer)) if f != outer => Some(format!("{outer}.{f}")),
        (f, outer) => f.or(outer),
    };
    match field {
        Some(f) if table.is_empty() => f,
        Some(f) if !f.starts_with('[') => format!("{table}.{f}"),
        _ => table,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_error_keys_are_a_best_effort() {
        assert_eq!(toml_error_key("[a]\nb = 1\n", 8, "invalid type"), "a.b");
        let text = "[[w]]\n[[w]]\nx = 1\n";
        assert_eq!(
            toml_error_key(text, 12, "unknown field `x`, expected"),
            "w[1].x"
        );
        assert_eq!(
            toml_error_key("[[w]]\ny = 2\n", 0, "missing field `name`"),
            "w[0].name"
        );
        assert_eq!(toml_error_key("a = [\n 1]\n", 7, "invalid"), "");
        let text = "[[w]]\n[[w]]\n[w.limits]\nx = 1\n";
        assert_eq!(
            toml_error_key(text, 23, "unknown field `x`, expected"),
            "w[1].limits.x"
        );
    }

    #[test]
    fn resolver_servers() {
        let parsed = |s: &str| server(s).map(|a| a.to_string());
        assert_eq!(parsed("10.0.0.53"), Ok("10.0.0.53:53".to_owned()));
        assert_eq!(parsed("10.0.0.53:5353"), Ok("10.0.0.53:5353".to_owned()));
        assert_eq!(parsed("2001:db8::53"), Ok("[2001:db8::53]:53".to_owned()));
        assert_eq!(parsed("[2001:db8::53]"), Ok("[2001:db8::53]:53".to_owned()));
        assert_eq!(
            parsed("[2001:db8::53]:5353"),
            Ok("[2001:db8::53]:5353".to_owned())
        );
        assert!(parsed("dns.example:53").is_err());
    }

    #[test]
    fn cgroup_globs_are_normalized() {
        assert_eq!(cgroup_glob("pods/*/"), Ok("pods/*".to_owned()));
        assert_eq!(
            cgroup_glob("users/**/jupyter-*"),
            Ok("users/**/jupyter-*".to_owned())
        );
        assert!(cgroup_glob("/").is_err());
        assert!(cgroup_glob("").is_err());
    }
}
