//! From the serde mirror (`file`) to a validated [`Policy`].
//!
//! Every check records its error and carries on with a fallback value, so
//! one run reports every problem of a file; a policy with any error is
//! rejected as a whole. Each error names the line and column of the value it
//! is about (from `toml::Spanned`), its dotted key and the value as written.
//! `file` knows what a single value may look like; this module knows what
//! the values mean together: defaults, the merge of the built-in catalog
//! (`crate::catalog`, parsed with the same checks) with the policy's
//! `[[providers]]`, unique names and selectors, `allow`/`deny` entries
//! that name providers of the merged list, and `[workloads.limits]` with its
//! per-provider overrides (merged key by key).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use llm_egress_common::{LEARN_TTL_MAX_S, LEARN_TTL_MIN_S, MAX_PORTS};
use toml::Spanned;

use super::{
    Action, AuditLog, Bandwidth, ConnectionRate, Defaults, FailureMode, KubeEnabled,
    KubernetesConfig, Limits, MAX_BYTES_BURST, MAX_BYTES_PER_SECOND, MAX_CONNECTION_BURST,
    MAX_CONNECTIONS_PER_SECOND, MIN_BYTES_BURST, Mode, OnExit, PodSelector, Policy, PolicyError,
    PolicyErrors, Provider, ResolverConfig, Selector, Target, TelemetryConfig, Workload,
    error::line_column,
    file::{
        self, CatalogFile, LimitKeysRef, LimitsFile, PodSelectorFile, PolicyFile, ProviderFile,
        WorkloadFile, absolute, audit_log, cgroup_glob, cidr, host, metrics_listen, port,
        provider_name, server, systemd_unit, workload_name,
    },
    kubernetes,
};

// The defaults of the keys a policy leaves out (docs/policy.md lists them).
const DEFAULT_MODE: Mode = Mode::Enforce;
const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9469));
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/llm-egress";
const DEFAULT_STATE_DIR: &str = "/var/lib/llm-egress";
const DEFAULT_FAILURE_MODE: FailureMode = FailureMode::Closed;
const DEFAULT_ON_EXIT: OnExit = OnExit::Detach;
/// `defaults.llm`, and a workload's `llm` (which does not inherit
/// `defaults.llm`: naming a workload means listing what it may reach).
const DEFAULT_LLM: Action = Action::Deny;
/// `defaults.other`; a workload's `other` defaults to `defaults.other`.
const DEFAULT_OTHER: Action = Action::Allow;
const DEFAULT_REFRESH_SECONDS: u64 = 30;
const DEFAULT_PROCESS_SERIES: u64 = 20;
const MAX_PROCESS_SERIES: i64 = 1_000;
const DEFAULT_PROCESS_TTL_SECONDS: u64 = 600;
const MIN_PROCESS_TTL_SECONDS: i64 = 10;
const MAX_REFRESH_SECONDS: i64 = 86_400;
/// The smallest `connections_per_second`: the kernel counts rates in
/// thousandths of a connection per second (llm_egress_common::limits), so a
/// smaller rate would be zero, which is no limit at all.
const MIN_CONNECTIONS_PER_SECOND: f64 = 0.001;
const MAX_TOKENS_PER_MINUTE: i64 = 1_000_000_000_000;
const MAX_TOKENS_PER_DAY: i64 = 1_000_000_000_000_000;

const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];
const ACTIONS: &[(&str, Action)] = &[
    ("allow", Action::Allow),
    ("deny", Action::Deny),
    ("audit", Action::Audit),
];
const FAILURE_MODES: &[(&str, FailureMode)] =
    &[("closed", FailureMode::Closed), ("open", FailureMode::Open)];
const ON_EXITS: &[(&str, OnExit)] = &[("detach", OnExit::Detach), ("keep", OnExit::Keep)];

impl Policy {
    /// Reads and validates the policy file at `path`.
    pub fn from_path(path: &Path) -> Result<Policy, PolicyErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors(vec![PolicyError::whole_file(
                &origin,
                format!("cannot read the policy: {e}"),
            )])
        })?;
        Self::parse(&text, &origin)
    }

    /// Validates policy `text`; `origin` names it in errors (a path).
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyErrors> {
        let file: PolicyFile = file::from_str(text, origin).map_err(|e| PolicyErrors(vec![e]))?;
        let mut c = Checker::new(origin, text);
        let catalog = match crate::catalog::builtin() {
            Ok(catalog) => catalog,
            Err(errors) => {
                c.errors.extend(errors.0.iter().cloned());
                &[]
            }
        };
        let policy = c.policy(&file, catalog);
        c.finish(policy)
    }

    /// The policy of an agent started without `--config`: watch and report,
    /// block nothing.
    ///
    /// `mode = "audit"` so that every would-be deny is reported as an
    /// `audit` verdict and no connection fails; `defaults` stay llm = deny,
    /// other = allow, so the reports show exactly the provider traffic a
    /// default enforcing policy would stop; no workloads (every process gets
    /// the defaults); the built-in catalog. `failure_mode = "open"` too,
    /// unlike a policy file's default: a policy that blocks nothing must not
    /// start blocking when the programs cannot decide or outlive the agent.
    /// Everything else has the defaults of an empty policy file.
    pub fn builtin_default() -> Policy {
        let catalog = crate::catalog::builtin().unwrap_or_else(|errors| {
            // Unreachable in a tested build: catalog::tests parse the file.
            tracing::error!(%errors, "the built-in provider catalog is invalid; using none");
            &[]
        });
        let mut c = Checker::new(crate::catalog::ORIGIN, "");
        let mut policy = c.policy(&PolicyFile::default(), catalog);
        debug_assert!(c.errors.is_empty(), "an empty policy file is valid");
        policy.mode = Mode::Audit;
        policy.failure_mode = FailureMode::Open;
        policy
    }

    /// Id of provider `name` in the kernel maps: its index + 1.
    #[allow(dead_code, reason = "the id rule for callers that look up by name")]
    pub fn provider_id(&self, name: &str) -> Option<u32> {
        let index = self.providers.iter().position(|p| p.name == name)?;
        u32::try_from(index + 1).ok()
    }

    /// Id of workload `name` in the kernel maps: its index + 1.
    #[allow(dead_code, reason = "the id rule for callers that look up by name")]
    pub fn workload_id(&self, name: &str) -> Option<u32> {
        let index = self.workloads.iter().position(|w| w.name == name)?;
        u32::try_from(index + 1).ok()
    }
}

impl Provider {
    /// Parses and validates a catalog file (`[[provider]]` tables: a policy
    /// provider's fields plus `display`), for `crate::catalog`. Returns the
    /// providers in file order, each with its display name.
    pub(crate) fn parse_catalog(
        text: &str,
        origin: &str,
    ) -> Result<Vec<(Provider, String)>, PolicyErrors> {
        let file: CatalogFile = file::from_str(text, origin).map_err(|e| PolicyErrors(vec![e]))?;
        let mut c = Checker::new(origin, text);
        let mut out = Vec::new();
        let mut names = HashMap::new();
        let mut claims = Claims::default();
        for (i, entry) in file.provider.iter().enumerate() {
            let key = format!("provider[{i}]");
            let e = entry.get_ref();
            let mut ok = c
                .check(&e.name, &format!("{key}.name"), |n| provider_name(n))
                .is_some();
            ok &= c.unique(&mut names, &e.name, &format!("{key}.name"), "provider");
            if e.display.get_ref().trim().is_empty() {
                c.error(&e.display, &format!("{key}.display"), "must not be empty");
                ok = false;
            }
            if e.hosts.is_empty() && e.cidrs.is_empty() {
                c.error_at(entry.span(), &key, "a provider needs `hosts` or `cidrs`");
                ok = false;
            }
            let provider = c.provider(&key, e.name.get_ref(), &e.hosts, &e.cidrs, Some(&e.ports));
            c.claim(&mut claims, e.name.get_ref(), &key, &e.hosts, &e.cidrs);
            if let (true, Some(p)) = (ok, provider) {
                out.push((p, e.display.get_ref().trim().to_owned()));
            }
        }
        c.finish(out)
    }
}

/// Collects errors while turning the file into values.
struct Checker<'a> {
    origin: &'a str,
    text: &'a str,
    errors: Vec<PolicyError>,
}

/// Why a provider name that is not in the merged list cannot be used.
enum Unusable {
    Disabled,
    /// Its entry has errors, already reported.
    Invalid,
}

/// The merged provider list, and the names `allow`/`deny` must not use.
struct Merged {
    providers: Vec<Provider>,
    unusable: HashMap<String, Unusable>,
}

/// Which provider each host and each CIDR belongs to (one owner each: the
/// kernel maps an address to one provider).
#[derive(Default)]
struct Claims {
    hosts: HashMap<String, String>,
    cidrs: HashMap<IpNet, String>,
}

impl<'a> Checker<'a> {
    fn new(origin: &'a str, text: &'a str) -> Self {
        Self {
            origin,
            text,
            errors: Vec::new(),
        }
    }

    /// `Ok(value)` when nothing was wrong, else every error, by position.
    fn finish<T>(mut self, value: T) -> Result<T, PolicyErrors> {
        if self.errors.is_empty() {
            return Ok(value);
        }
        let origin = self.origin;
        self.errors
            .sort_by_key(|e| (e.origin == origin, e.line, e.column));
        Err(PolicyErrors(self.errors))
    }

    /// An error about `value`, quoting it.
    fn error<T>(&mut self, value: &Spanned<T>, key: &str, message: impl Into<String>) {
        let e = PolicyError::at(self.origin, self.text, value.span(), key, true, message);
        self.errors.push(e);
    }

    /// An error at the start of `span` (a table), without a value.
    fn error_at(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let e = PolicyError::at(self.origin, self.text, span, key, false, message);
        self.errors.push(e);
    }

    /// `check(value)`, recording its error.
    fn check<T, U>(
        &mut self,
        value: &Spanned<T>,
        key: &str,
        check: impl FnOnce(&T) -> Result<U, String>,
    ) -> Option<U> {
        match check(value.get_ref()) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(value, key, message);
                None
            }
        }
    }

    /// One of the `choices` words; `default` when absent or wrong.
    fn choice<T: Copy>(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        choices: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(value) = value else { return default };
        let found = choices.iter().find(|(word, _)| word == value.get_ref());
        if let Some((_, v)) = found {
            return *v;
        }
        let words: Vec<String> = choices.iter().map(|(w, _)| format!("\"{w}\"")).collect();
        self.error(value, key, format!("expected one of {}", words.join(", ")));
        default
    }

    /// Records `name` in `seen` (name → line); false, with an error, when it
    /// is already there.
    fn unique(
        &mut self,
        seen: &mut HashMap<String, usize>,
        name: &Spanned<String>,
        key: &str,
        what: &str,
    ) -> bool {
        let line = self.line_of(name.span());
        if let Some(first) = seen.get(name.get_ref()) {
            let message = format!("duplicate {what} name (first defined on line {first})");
            self.error(name, key, message);
            return false;
        }
        seen.insert(name.get_ref().clone(), line);
        true
    }

    fn line_of(&self, span: Range<usize>) -> usize {
        line_column(self.text, span.start).0
    }

    fn policy(&mut self, f: &PolicyFile, catalog: &[Provider]) -> Policy {
        let mode = self.choice(f.mode.as_ref(), "mode", MODES, DEFAULT_MODE);
        let cgroup = f
            .cgroup
            .as_ref()
            .and_then(|v| self.check(v, "cgroup", |s| absolute(s)));
        let metrics_listen = match &f.metrics_listen {
            None => Some(DEFAULT_METRICS_LISTEN),
            Some(v) => self
                .check(v, "metrics_listen", |s| metrics_listen(s))
                .flatten(),
        };
        let audit_log = match &f.audit_log {
            None => AuditLog::Stdout,
            Some(v) => self
                .check(v, "audit_log", |s| audit_log(s))
                .unwrap_or(AuditLog::Off),
        };
        let pin_path = f
            .pin_path
            .as_ref()
            .and_then(|v| self.check(v, "pin_path", |s| absolute(s)));
        let failure_mode = self.choice(
            f.failure_mode.as_ref(),
            "failure_mode",
            FAILURE_MODES,
            DEFAULT_FAILURE_MODE,
        );
        let on_exit = self.choice(f.on_exit.as_ref(), "on_exit", ON_EXITS, DEFAULT_ON_EXIT);
        let state_dir = f
            .state_dir
            .as_ref()
            .and_then(|v| self.check(v, "state_dir", |s| absolute(s)));
        let defaults = Defaults {
            llm: self.choice(
                f.defaults.llm.as_ref(),
                "defaults.llm",
                ACTIONS,
                DEFAULT_LLM,
            ),
            other: self.choice(
                f.defaults.other.as_ref(),
                "defaults.other",
                ACTIONS,
                DEFAULT_OTHER,
            ),
        };
        let resolver = self.resolver(f);
        let telemetry = self.telemetry(f);
        let kubernetes = self.kubernetes(f);
        let merged = self.providers(&f.providers, catalog);
        let workloads = self.workloads(&f.workloads, &merged, defaults.other, kubernetes.enabled);
        Policy {
            mode,
            cgroup,
            metrics_listen,
            audit_log,
            pin_path: pin_path.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_PATH)),
            failure_mode,
            on_exit,
            state_dir: state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            defaults,
            resolver,
            telemetry,
            kubernetes,
            providers: merged.providers,
            workloads,
        }
    }

    /// An integer key that must lie in `range`.
    fn bounded(
        &mut self,
        v: &Option<toml::Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        unit: &str,
    ) -> Option<u64> {
        v.as_ref().and_then(|v| {
            self.check(v, key, |&n| {
                if range.contains(&n) {
                    Ok(n.unsigned_abs())
                } else {
                    Err(format!(
                        "must be {} to {}{unit}",
                        range.start(),
                        range.end()
                    ))
                }
            })
        })
    }

    fn telemetry(&mut self, f: &PolicyFile) -> TelemetryConfig {
        let t = &f.telemetry;
        let n = self.bounded(
            &t.process_series_per_workload,
            "telemetry.process_series_per_workload",
            1..=MAX_PROCESS_SERIES,
            "",
        );
        let ttl = self.bounded(
            &t.process_series_ttl_seconds,
            "telemetry.process_series_ttl_seconds",
            MIN_PROCESS_TTL_SECONDS..=MAX_REFRESH_SECONDS,
            " (seconds)",
        );
        TelemetryConfig {
            process_series_per_workload: n.unwrap_or(DEFAULT_PROCESS_SERIES) as usize,
            process_series_ttl: Duration::from_secs(ttl.unwrap_or(DEFAULT_PROCESS_TTL_SECONDS)),
        }
    }

    /// `[kubernetes]` (docs/policy.md; defaults in `kubernetes`).
    fn kubernetes(&mut self, f: &PolicyFile) -> KubernetesConfig {
        let k = &f.kubernetes;
        let d = KubernetesConfig::default();
        let path = |c: &mut Self, v: &Option<Spanned<String>>, key: &str, default: PathBuf| {
            v.as_ref()
                .and_then(|v| c.check(v, key, |s| absolute(s)))
                .unwrap_or(default)
        };
        let refresh = self.bounded(
            &k.refresh_seconds,
            "kubernetes.refresh_seconds",
            1..=kubernetes::MAX_REFRESH_SECONDS,
            " (seconds)",
        );
        KubernetesConfig {
            enabled: self.choice(
                k.enabled.as_ref(),
                "kubernetes.enabled",
                kubernetes::ENABLED,
                d.enabled,
            ),
            api_server: k.api_server.as_ref().and_then(|v| {
                self.check(v, "kubernetes.api_server", |s| kubernetes::api_server(s))
            }),
            node_name: k
                .node_name
                .as_ref()
                .and_then(|v| self.check(v, "kubernetes.node_name", |s| kubernetes::node_name(s))),
            token_file: path(self, &k.token_file, "kubernetes.token_file", d.token_file),
            ca_file: path(self, &k.ca_file, "kubernetes.ca_file", d.ca_file),
            refresh: refresh.map_or(d.refresh, Duration::from_secs),
        }
    }

    /// A workload's `k8s` selector; None when any part is invalid.
    fn pod_selector(
        &mut self,
        s: &PodSelectorFile,
        span: Range<usize>,
        key: &str,
        enabled: KubeEnabled,
    ) -> Option<PodSelector> {
        let errors = self.errors.len();
        let namespace = (s.namespace.as_ref())
            .and_then(|v| self.check(v, &format!("{key}.namespace"), |n| kubernetes::namespace(n)));
        let mut labels = BTreeMap::new();
        for (k, v) in s.labels.iter().flat_map(|l| l.get_ref()) {
            let lkey = format!("{key}.labels.{k}");
            let name = match kubernetes::label_key(k) {
                Ok(name) => Some(name),
                Err(message) => {
                    self.error_at(v.span(), &lkey, format!("{k:?}: {message}"));
                    None
                }
            };
            let value = self.check(v, &lkey, |v| kubernetes::label_value(v));
            if let (Some(name), Some(value)) = (name, value) {
                labels.insert(name, value);
            }
        }
        if s.namespace.is_none() && s.labels.as_ref().is_none_or(|l| l.get_ref().is_empty()) {
            self.error_at(
                span.clone(),
                key,
                "needs `namespace` or `labels` (or both): which pods",
            );
        }
        if enabled == KubeEnabled::Off {
            let message = "pods cannot be selected with [kubernetes] enabled = \"off\": the agent would not know them";
            self.error_at(span, key, message);
        }
        (self.errors.len() == errors).then_some(PodSelector { namespace, labels })
    }

    fn resolver(&mut self, f: &PolicyFile) -> ResolverConfig {
        let r = &f.resolver;
        let servers = (r.servers.iter().enumerate())
            .filter_map(|(i, s)| self.check(s, &format!("resolver.servers[{i}]"), |s| server(s)))
            .collect();
        let refresh_seconds = self.bounded(
            &r.refresh_seconds,
            "resolver.refresh_seconds",
            1..=MAX_REFRESH_SECONDS,
            " (seconds)",
        );
        let refresh = Duration::from_secs(refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS));
        let min = self.bounded(
            &r.min_ttl_seconds,
            "resolver.min_ttl_seconds",
            1..=MAX_REFRESH_SECONDS,
            " (seconds)",
        );
        let max = self.bounded(
            &r.max_ttl_seconds,
            "resolver.max_ttl_seconds",
            1..=MAX_REFRESH_SECONDS,
            " (seconds)",
        );
        let (min, max) = (
            min.map_or(LEARN_TTL_MIN_S, |v| v as u32),
            max.map_or(LEARN_TTL_MAX_S, |v| v as u32),
        );
        if min > max {
            let at = r.max_ttl_seconds.as_ref().or(r.min_ttl_seconds.as_ref());
            if let Some(v) = at {
                self.error(
                    v,
                    "resolver.max_ttl_seconds",
                    format!("must not be below resolver.min_ttl_seconds ({min})"),
                );
            }
        }
        ResolverConfig {
            servers,
            refresh,
            learned_ttl: (min, max.max(min)),
        }
    }

    /// The catalog merged with the policy's `[[providers]]`: an entry named
    /// like a built-in provider replaces it in place (`disabled = true`
    /// removes it), other entries are appended in file order.
    fn providers(&mut self, entries: &[Spanned<ProviderFile>], catalog: &[Provider]) -> Merged {
        let mut slots: Vec<Option<Provider>> = catalog.iter().cloned().map(Some).collect();
        let mut added = Vec::new();
        let mut seen = HashMap::new();
        let mut unusable = HashMap::new();
        let mut replaced = HashSet::new();
        let mut enabled = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("providers[{i}]");
            let p = entry.get_ref();
            let name = p.name.get_ref();
            let mut ok = self
                .check(&p.name, &format!("{key}.name"), |n| provider_name(n))
                .is_some();
            let first = self.unique(&mut seen, &p.name, &format!("{key}.name"), "provider");
            let disabled = p.disabled.as_ref().is_some_and(|d| *d.get_ref());
            if !disabled && p.hosts.is_empty() && p.cidrs.is_empty() {
                let message = "a provider needs `hosts` or `cidrs` (or `disabled = true`)";
                self.error_at(entry.span(), &key, message);
                ok = false;
            }
            let provider = self.provider(&key, name, &p.hosts, &p.cidrs, p.ports.as_ref());
            if !first {
                continue;
            }
            let builtin = catalog.iter().position(|b| &b.name == name);
            if let Some(index) = builtin {
                replaced.insert(name.as_str());
                slots[index] = None;
            }
            match provider {
                _ if disabled => {
                    unusable.insert(name.clone(), Unusable::Disabled);
                }
                Some(provider) if ok => {
                    enabled.push(i);
                    match builtin {
                        Some(index) => slots[index] = Some(provider),
                        None => added.push(provider),
                    }
                }
                _ => {
                    unusable.insert(name.clone(), Unusable::Invalid);
                }
            }
        }
        let mut claims = Claims::default();
        for b in catalog
            .iter()
            .filter(|b| !replaced.contains(b.name.as_str()))
        {
            claims
                .hosts
                .extend(b.hosts.iter().map(|h| (h.clone(), b.name.clone())));
            claims
                .cidrs
                .extend(b.cidrs.iter().map(|c| (*c, b.name.clone())));
        }
        for i in enabled {
            let p = entries[i].get_ref();
            self.claim(
                &mut claims,
                p.name.get_ref(),
                &format!("providers[{i}]"),
                &p.hosts,
                &p.cidrs,
            );
        }
        let providers = slots.into_iter().flatten().chain(added).collect();
        Merged {
            providers,
            unusable,
        }
    }

    /// A provider's hosts, CIDRs and ports; None when any is invalid.
    fn provider(
        &mut self,
        key: &str,
        name: &str,
        hosts: &[Spanned<String>],
        cidrs: &[Spanned<String>],
        ports: Option<&Spanned<Vec<Spanned<i64>>>>,
    ) -> Option<Provider> {
        let errors = self.errors.len();
        let mut p = Provider {
            name: name.to_owned(),
            hosts: vec![],
            cidrs: vec![],
            ports: vec![],
        };
        for (j, h) in hosts.iter().enumerate() {
            if let Some(h) = self.check(h, &format!("{key}.hosts[{j}]"), |s| host(s)) {
                push_new(&mut p.hosts, h);
            }
        }
        for (j, c) in cidrs.iter().enumerate() {
            if let Some(c) = self.check(c, &format!("{key}.cidrs[{j}]"), |s| cidr(s)) {
                push_new(&mut p.cidrs, c);
            }
        }
        if let Some(ports) = ports {
            for (j, n) in ports.get_ref().iter().enumerate() {
                if let Some(n) = self.check(n, &format!("{key}.ports[{j}]"), |&n| port(n)) {
                    push_new(&mut p.ports, n);
                }
            }
            if p.ports.len() > MAX_PORTS {
                let message = format!(
                    "{} ports; a provider lists at most {MAX_PORTS} (leave `ports` out for every port)",
                    p.ports.len()
                );
                self.error(ports, &format!("{key}.ports"), message);
            }
        }
        (self.errors.len() == errors).then_some(p)
    }

    /// Claims `owner`'s valid hosts and CIDRs, with an error for each one
    /// another provider already has.
    fn claim(
        &mut self,
        claims: &mut Claims,
        owner: &str,
        key: &str,
        hosts: &[Spanned<String>],
        cidrs: &[Spanned<String>],
    ) {
        for (j, h) in hosts.iter().enumerate() {
            let Ok(normal) = host(h.get_ref()) else {
                continue;
            };
            match claims.hosts.get(&normal) {
                Some(other) if other != owner => {
                    self.error(h, &format!("{key}.hosts[{j}]"), taken("host", other));
                }
                _ => {
                    claims.hosts.insert(normal, owner.to_owned());
                }
            }
        }
        for (j, c) in cidrs.iter().enumerate() {
            let Ok(net) = cidr(c.get_ref()) else { continue };
            match claims.cidrs.get(&net) {
                Some(other) if other != owner => {
                    self.error(c, &format!("{key}.cidrs[{j}]"), taken("CIDR", other));
                }
                _ => {
                    claims.cidrs.insert(net, owner.to_owned());
                }
            }
        }
    }

    fn workloads(
        &mut self,
        entries: &[Spanned<WorkloadFile>],
        merged: &Merged,
        default_other: Action,
        kube: KubeEnabled,
    ) -> Vec<Workload> {
        let mut out = Vec::new();
        let mut names = HashMap::new();
        let mut selectors: HashMap<(&str, String), String> = HashMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("workloads[{i}]");
            let w = entry.get_ref();
            let name = w.name.get_ref();
            self.check(&w.name, &format!("{key}.name"), |n| workload_name(n));
            self.unique(&mut names, &w.name, &format!("{key}.name"), "workload");
            // (span of the value, key, text that makes two selectors the same, selector)
            let selector = match (&w.cgroup, &w.systemd_unit, &w.k8s) {
                (None, None, None) => {
                    let message = "needs a selector: `cgroup` (a glob of cgroup paths), \
                                   `systemd_unit`, or `k8s` (pod namespace and labels)";
                    self.error_at(entry.span(), &key, message);
                    None
                }
                (Some(_), Some(unit), _) => {
                    let message =
                        "`cgroup` and `systemd_unit` both given; a workload has one selector";
                    self.error(unit, &format!("{key}.systemd_unit"), message);
                    None
                }
                (Some(_), None, Some(k8s)) | (None, Some(_), Some(k8s)) => {
                    let other = if w.cgroup.is_some() {
                        "cgroup"
                    } else {
                        "systemd_unit"
                    };
                    let message =
                        format!("`{other}` and `k8s` both given; a workload has one selector");
                    self.error_at(k8s.span(entry.span()), &format!("{key}.k8s"), message);
                    None
                }
                (Some(glob), None, None) => self
                    .check(glob, &format!("{key}.cgroup"), |s| cgroup_glob(s))
                    .map(|g| (glob.span(), "cgroup", g.clone(), Selector::Cgroup(g))),
                (None, Some(unit), None) => self
                    .check(unit, &format!("{key}.systemd_unit"), |s| systemd_unit(s))
                    .map(|u| {
                        (
                            unit.span(),
                            "systemd_unit",
                            u.clone(),
                            Selector::SystemdUnit(u),
                        )
                    }),
                (None, None, Some(k8s)) => self
                    .pod_selector(k8s, k8s.span(entry.span()), &format!("{key}.k8s"), kube)
                    .map(|p| {
                        (
                            k8s.span(entry.span()),
                            "k8s",
                            format!("{:?} {:?}", p.namespace, p.labels),
                            Selector::Kubernetes(p),
                        )
                    }),
            };
            let selector = selector.and_then(|(span, kind, same, selector)| {
                if let Some(other) = selectors.get(&(kind, same.clone())) {
                    let message = format!("workload `{other}` has the same selector");
                    let quote = kind != "k8s";
                    let e = PolicyError::at(
                        self.origin,
                        self.text,
                        span,
                        format!("{key}.{kind}"),
                        quote,
                        message,
                    );
                    self.errors.push(e);
                    return None;
                }
                selectors.insert((kind, same), name.clone());
                Some(selector)
            });
            let allow = self.targets(&w.allow, &format!("{key}.allow"), merged);
            let deny = self.targets(&w.deny, &format!("{key}.deny"), merged);
            let allowed: HashSet<&Target> = allow.iter().flatten().collect();
            for (j, target) in deny.iter().enumerate() {
                if target.as_ref().is_some_and(|t| allowed.contains(t)) {
                    let message = "in both `allow` and `deny`";
                    self.error(&w.deny[j], &format!("{key}.deny[{j}]"), message);
                }
            }
            let llm = self.choice(w.llm.as_ref(), &format!("{key}.llm"), ACTIONS, DEFAULT_LLM);
            let other = self.choice(
                w.other.as_ref(),
                &format!("{key}.other"),
                ACTIONS,
                default_other,
            );
            let (limits, provider_limits) =
                self.limits(&w.limits, &format!("{key}.limits"), entry.span(), merged);
            if let Some(selector) = selector {
                let (allow, deny) = (dedup(allow), dedup(deny));
                out.push(Workload {
                    name: name.clone(),
                    selector,
                    allow,
                    deny,
                    llm,
                    other,
                    limits,
                    provider_limits,
                });
            }
        }
        out
    }

    /// A workload's `[workloads.limits]` (`key`) and its per-provider
    /// overrides, by provider index. An override is merged with the
    /// workload-wide keys key by key: a key it sets replaces the workload's,
    /// a key it leaves out is the workload's; the defaults of `burst` and
    /// `bytes_burst` then follow the merged rates. `fallback`: where to
    /// report a provider name when no value is near (the workload's table).
    fn limits(
        &mut self,
        f: &LimitsFile,
        key: &str,
        fallback: Range<usize>,
        merged: &Merged,
    ) -> (Limits, BTreeMap<usize, Limits>) {
        let wide = f.keys();
        let w = self.limit_values(wide, key);
        self.bursts_need_rates(wide, None, key);
        self.tokens_in_order(wide, &w, key, None);
        let limits = w.limits(wide);
        let mut overrides = BTreeMap::new();
        for (name, over) in &f.providers {
            let okey = format!("{key}.providers.{}", key_segment(name));
            let keys = over.keys();
            let index = match provider_index(name, merged) {
                Ok(index) => index,
                Err(message) => {
                    self.error_at(keys.span(wide.span(fallback.clone())), &okey, message);
                    None
                }
            };
            let o = self.limit_values(keys, &okey);
            self.bursts_need_rates(keys, Some(wide), &okey);
            let m = LimitValues {
                per_second: o.per_second.or(w.per_second),
                burst: o.burst.or(w.burst),
                bytes_per_second: o.bytes_per_second.or(w.bytes_per_second),
                bytes_burst: o.bytes_burst.or(w.bytes_burst),
                tokens_per_minute: o.tokens_per_minute.or(w.tokens_per_minute),
                tokens_per_day: o.tokens_per_day.or(w.tokens_per_day),
            };
            self.tokens_in_order(keys, &m, &okey, Some(key));
            let over = m.limits(keys);
            if let Some(index) = index
                && !over.is_empty()
            {
                overrides.insert(index, over);
            }
        }
        (limits, overrides)
    }

    /// The values of one level's keys, each checked on its own (None: not
    /// set, or invalid and reported).
    fn limit_values(&mut self, k: LimitKeysRef<'_>, key: &str) -> LimitValues {
        let per_second = k.connections_per_second.and_then(|v| {
            self.check(v, &format!("{key}.connections_per_second"), |&n| {
                connections_per_second(n)
            })
        });
        let ints = [
            (k.burst, "burst", 1, MAX_CONNECTION_BURST, "connections", ""),
            (
                k.bytes_per_second,
                "bytes_per_second",
                1,
                MAX_BYTES_PER_SECOND,
                "bytes per second",
                "",
            ),
            (
                k.bytes_burst,
                "bytes_burst",
                MIN_BYTES_BURST,
                MAX_BYTES_BURST,
                "bytes",
                ": a smaller bucket could never pass one large (64 KiB) packet",
            ),
            (
                k.tokens_per_minute,
                "tokens_per_minute",
                1,
                MAX_TOKENS_PER_MINUTE.unsigned_abs(),
                "tokens",
                "",
            ),
            (
                k.tokens_per_day,
                "tokens_per_day",
                1,
                MAX_TOKENS_PER_DAY.unsigned_abs(),
                "tokens",
                "",
            ),
        ];
        let [
            burst,
            bytes_per_second,
            bytes_burst,
            tokens_per_minute,
            tokens_per_day,
        ] = ints.map(|(v, name, min, max, unit, why)| {
            v.and_then(|v| {
                self.check(v, &format!("{key}.{name}"), |&n| {
                    limit_integer(n, min, max, unit, why)
                })
            })
        });
        LimitValues {
            per_second,
            burst,
            bytes_per_second,
            bytes_burst,
            tokens_per_minute,
            tokens_per_day,
        }
    }

    /// `burst` needs `connections_per_second` and `bytes_burst` needs
    /// `bytes_per_second`, at the same level or, for an override, at the
    /// workload-wide level (`wide`).
    fn bursts_need_rates(
        &mut self,
        level: LimitKeysRef<'_>,
        wide: Option<LimitKeysRef<'_>>,
        key: &str,
    ) {
        let pairs = [
            (
                level.burst,
                "burst",
                level.connections_per_second.is_some()
                    || wide.is_some_and(|w| w.connections_per_second.is_some()),
                "connections_per_second",
            ),
            (
                level.bytes_burst,
                "bytes_burst",
                level.bytes_per_second.is_some()
                    || wide.is_some_and(|w| w.bytes_per_second.is_some()),
                "bytes_per_second",
            ),
        ];
        for (burst, name, has_rate, rate) in pairs {
            let Some(burst) = burst else { continue };
            if has_rate {
                continue;
            }
            let message = match wide {
                None => format!("`{name}` without `{rate}`: a burst is the room of a rate"),
                Some(_) => format!(
                    "`{name}` without `{rate}`, here or in the workload's [workloads.limits]: \
                     a burst is the room of a rate"
                ),
            };
            self.error(burst, &format!("{key}.{name}"), message);
        }
    }

    /// `tokens_per_day` must not be below `tokens_per_minute`. `m`: the
    /// level's values merged with the workload-wide ones (`wide_key`) for an
    /// override, which is checked only when it sets one of the two (the
    /// workload-wide check covers the rest).
    fn tokens_in_order(
        &mut self,
        level: LimitKeysRef<'_>,
        m: &LimitValues,
        key: &str,
        wide_key: Option<&str>,
    ) {
        let (Some(per_minute), Some(per_day)) = (m.tokens_per_minute, m.tokens_per_day) else {
            return;
        };
        if per_day >= per_minute {
            return;
        }
        let from = |set: bool| match wide_key {
            Some(wide) if !set => format!(", from {wide}"),
            _ => String::new(),
        };
        if let Some(v) = level.tokens_per_day {
            let from = from(level.tokens_per_minute.is_some());
            let message = format!("must not be below tokens_per_minute ({per_minute}{from})");
            self.error(v, &format!("{key}.tokens_per_day"), message);
        } else if let Some(v) = level.tokens_per_minute {
            let message = format!(
                "must not be above tokens_per_day ({per_day}{})",
                from(false)
            );
            self.error(v, &format!("{key}.tokens_per_minute"), message);
        }
    }

    /// `allow`/`deny` entries, one per entry (None: invalid).
    fn targets(
        &mut self,
        list: &[Spanned<String>],
        key: &str,
        merged: &Merged,
    ) -> Vec<Option<Target>> {
        let mut out = Vec::with_capacity(list.len());
        for (j, entry) in list.iter().enumerate() {
            let target = match target(entry.get_ref(), merged) {
                Ok(target) => target,
                Err(message) => {
                    self.error(entry, &format!("{key}[{j}]"), message);
                    None
                }
            };
            out.push(target);
        }
        out
    }
}

/// The checked values of one level of limit keys (or of an override
/// merged with the workload-wide level).
#[derive(Clone, Copy, Debug, Default)]
struct LimitValues {
    per_second: Option<f64>,
    burst: Option<u64>,
    bytes_per_second: Option<u64>,
    bytes_burst: Option<u64>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
}

impl LimitValues {
    /// The limits these values make, with only the limits whose keys
    /// `level` sets (an override leaves the others to the workload-wide
    /// level); missing bursts get their defaults.
    fn limits(&self, level: LimitKeysRef<'_>) -> Limits {
        let connections = level.connections_per_second.is_some() || level.burst.is_some();
        let bandwidth = level.bytes_per_second.is_some() || level.bytes_burst.is_some();
        Limits {
            connections: self
                .per_second
                .filter(|_| connections)
                .map(|per_second| ConnectionRate {
                    per_second,
                    burst: self.burst.unwrap_or_else(|| default_burst(per_second)),
                }),
            bandwidth: self
                .bytes_per_second
                .filter(|_| bandwidth)
                .map(|bytes_per_second| Bandwidth {
                    bytes_per_second,
                    burst_bytes: self
                        .bytes_burst
                        .unwrap_or_else(|| default_bytes_burst(bytes_per_second)),
                }),
            tokens_per_minute: self
                .tokens_per_minute
                .filter(|_| level.tokens_per_minute.is_some()),
            tokens_per_day: self
                .tokens_per_day
                .filter(|_| level.tokens_per_day.is_some()),
        }
    }
}

/// `burst` when left out: one second's worth, at least one connection.
fn default_burst(per_second: f64) -> u64 {
    // per_second is at most MAX_CONNECTIONS_PER_SECOND: the cast is exact.
    (per_second.ceil() as u64).clamp(1, MAX_CONNECTION_BURST)
}

/// `bytes_burst` when left out: half a second's worth, within the bounds
/// of `bytes_burst`. A download is held only by dropping what the sender
/// sends, which then waits for its retransmission timer (at least 200 ms):
/// a bucket smaller than that much traffic overflows while the sender
/// waits, and downloads run well below the rate (docs/limits.md).
fn default_bytes_burst(bytes_per_second: u64) -> u64 {
    (bytes_per_second / 2).clamp(MIN_BYTES_BURST, MAX_BYTES_BURST)
}

fn connections_per_second(n: f64) -> Result<f64, String> {
    let bounds = format!(
        "must be {MIN_CONNECTIONS_PER_SECOND} to {MAX_CONNECTIONS_PER_SECOND} (connections per second)"
    );
    if !n.is_finite() {
        Err(format!("not a finite number; {bounds}"))
    } else if n <= 0.0 {
        Err(format!("{bounds}; leave the key out for no limit"))
    } else if n < MIN_CONNECTIONS_PER_SECOND {
        Err(format!(
            "{bounds}: rates are counted in thousandths of a connection per second"
        ))
    } else if n > MAX_CONNECTIONS_PER_SECOND {
        Err(bounds)
    } else {
        Ok(n)
    }
}

/// An integer limit key in `min..=max` (`min` >= 1). The range is checked on
/// the i64 TOML gives, before any conversion.
fn limit_integer(n: i64, min: u64, max: u64, unit: &str, why_min: &str) -> Result<u64, String> {
    let bounds = format!("must be {min} to {max} ({unit})");
    match u64::try_from(n) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        Ok(n) if n >= min => Err(bounds),
        _ if n <= 0 && min == 1 => Err(format!("{bounds}; leave the key out for no limit")),
        _ => Err(format!("{bounds}{why_min}")),
    }
}

/// A provider name as a segment of a dotted key: bare when TOML would take
/// it bare, else quoted.
fn key_segment(name: &str) -> String {
    let bare = !name.is_empty()
        && (name.chars()).all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if bare {
        name.to_owned()
    } else {
        format!("{name:?}")
    }
}

/// The index of provider `name` for `[workloads.limits.providers.NAME]`:
/// a provider of the merged list. `Ok(None)`: a provider whose own errors
/// are already reported.
fn provider_index(name: &str, merged: &Merged) -> Result<Option<usize>, String> {
    if let Some(index) = merged.providers.iter().position(|p| p.name == name) {
        return Ok(Some(index));
    }
    match merged.unusable.get(name) {
        Some(Unusable::Disabled) => Err(format!("provider `{name}` is disabled")),
        Some(Unusable::Invalid) => Ok(None),
        None => {
            let mut message = format!("{name:?} is not a provider (built-in or in this policy)");
            if let Some(near) = nearest_name(name, &merged.providers) {
                message.push_str(&format!("; did you mean \"{near}\"?"));
            }
            Err(message)
        }
    }
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// The valid targets, first occurrence kept (linear: lists may hold
/// tens of thousands of CIDRs).
fn dedup(targets: Vec<Option<Target>>) -> Vec<Target> {
    let mut seen = HashSet::new();
    targets
        .into_iter()
        .flatten()
        .filter(|t| seen.insert(t.clone()))
        .collect()
}

fn taken(what: &str, owner: &str) -> String {
    format!(
        "already a {what} of provider `{owner}`; one provider per {what}: change or disable \
         `{owner}` (a `[[providers]]` entry named like a built-in provider replaces it)"
    )
}

/// An `allow`/`deny` entry: a provider of the merged list, or an address or
/// CIDR. `Ok(None)`: a provider whose own errors are already reported.
fn target(entry: &str, merged: &Merged) -> Result<Option<Target>, String> {
    if let Some(index) = merged.providers.iter().position(|p| p.name == entry) {
        return Ok(Some(Target::Provider(index)));
    }
    match merged.unusable.get(entry) {
        Some(Unusable::Disabled) => return Err(format!("provider `{entry}` is disabled")),
        Some(Unusable::Invalid) => return Ok(None),
        None => {}
    }
    let address_like = entry.contains(['/', ':'])
        || entry.chars().all(|c| c.is_ascii_digit() || c == '.')
        || entry.parse::<IpAddr>().is_ok();
    if address_like {
        return cidr(entry).map(|net| Some(Target::Cidr(net)));
    }
    if entry.contains('.') && host(entry).is_ok() {
        return Err(
            "a host name; `allow` and `deny` take providers, addresses and CIDRs: \
                    add a `[[providers]]` entry with this host and name it here"
                .to_owned(),
        );
    }
    let mut message =
        "neither a provider (built-in or in this policy) nor an IP address or CIDR".to_owned();
    if let Some(near) = nearest_name(entry, &merged.providers) {
        message.push_str(&format!("; did you mean \"{near}\"?"));
    }
    Err(message)
}

/// The provider name closest to `entry` (case aside, within two edits).
fn nearest_name<'p>(entry: &str, providers: &'p [Provider]) -> Option<&'p str> {
    let entry = entry.to_ascii_lowercase();
    (providers.iter())
        .map(|p| (edit_distance(&entry, &p.name), p.name.as_str()))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, name)| name)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (prev + cost).min(row[j] + 1).min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "test.toml";

    fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        Policy::parse(text, ORIGIN)
    }

    fn ok(text: &str) -> Policy {
        parse(text).unwrap_or_else(|e| panic!("policy should be valid:\n{e}\n---\n{text}"))
    }

    fn errors(text: &str) -> Vec<PolicyError> {
        match parse(text) {
            Ok(_) => panic!("policy should be invalid:\n{text}"),
            Err(e) => e.0,
        }
    }

    /// Asserts that `text` has exactly one error, at `key`, `line`:`column`,
    /// whose message contains `message`; returns it.
    #[track_caller]
    fn one_error(text: &str, key: &str, line: usize, column: usize, message: &str) -> PolicyError {
        let errors = errors(text);
        let [e] = errors.as_slice() else {
            panic!(
                "expected one error, got {}:\n{}",
                errors.len(),
                PolicyErrors(errors.clone())
            );
        };
        assert_eq!(e.origin, ORIGIN);
        assert_eq!(
            (e.key.as_str(), e.line, e.column),
            (key, line, column),
            "{e}"
        );
        assert!(e.message.contains(message), "{e:?} lacks {message:?}");
        e.clone()
    }

    fn builtin_index(name: &str) -> usize {
        let catalog = crate::catalog::builtin().unwrap_or_else(|e| panic!("{e}"));
        catalog
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    const UNIT: &str = "systemd_unit = \"app.service\"\n";

    // ---- valid policies ----

    #[test]
    fn empty_policy_has_the_documented_defaults() {
        let p = ok("");
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.cgroup, None);
        assert_eq!(
            p.metrics_listen,
            Some("127.0.0.1:9469".parse().unwrap_or(DEFAULT_METRICS_LISTEN))
        );
        assert_eq!(p.audit_log, AuditLog::Stdout);
        assert_eq!(p.pin_path, PathBuf::from("/sys/fs/bpf/llm-egress"));
        assert_eq!(
            (p.failure_mode, p.on_exit),
            (FailureMode::Closed, OnExit::Detach)
        );
        assert_eq!(
            p.defaults,
            Defaults {
                llm: Action::Deny,
                other: Action::Allow
            }
        );
        assert_eq!(
            p.resolver,
            ResolverConfig {
                servers: vec![],
                refresh: Duration::from_secs(30),
                learned_ttl: (60, 3600),
            }
        );
        assert_eq!(
            p.providers.as_slice(),
            crate::catalog::builtin().unwrap_or(&[])
        );
        assert!(p.workloads.is_empty());
    }

    #[test]
    fn full_policy_parses_into_the_expected_values() {
        let p = ok(r#"
mode = "audit"
cgroup = "/sys/fs/cgroup/workloads"
metrics_listen = "[::1]:9000"
audit_log = "/var/log/llm-egress.jsonl"
pin_path = "/sys/fs/bpf/test"
failure_mode = "open"
on_exit = "keep"

[defaults]
llm = "audit"
other = "deny"

[resolver]
servers = ["10.0.0.53", "10.0.0.54:5353", "[2001:db8::53]:53", "2001:db8::54"]
refresh_seconds = 120

[[providers]]
name = "internal-llm"
hosts = ["LLM.Internal.Example.", "*.inference.internal.example"]
cidrs = ["10.20.0.0/16", "192.0.2.7", "2001:db8:1::/48"]
ports = [443, 8443, 443]

[[workloads]]
name = "support-bot"
systemd_unit = "support-bot.service"
allow = ["openai", "internal-llm", "10.1.0.0/16", "openai"]
deny = ["anthropic", "2001:db8::1"]

[[workloads]]
name = "batch"
cgroup = "batch.slice/*/"
llm = "allow"
"#);
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.cgroup, Some(PathBuf::from("/sys/fs/cgroup/workloads")));
        assert_eq!(p.metrics_listen, "[::1]:9000".parse().ok());
        assert_eq!(
            p.audit_log,
            AuditLog::File(PathBuf::from("/var/log/llm-egress.jsonl"))
        );
        assert_eq!(p.pin_path, PathBuf::from("/sys/fs/bpf/test"));
        assert_eq!(
            (p.failure_mode, p.on_exit),
            (FailureMode::Open, OnExit::Keep)
        );
        assert_eq!(
            p.defaults,
            Defaults {
                llm: Action::Audit,
                other: Action::Deny
            }
        );
        let servers: Vec<SocketAddr> = [
            "10.0.0.53:53",
            "10.0.0.54:5353",
            "[2001:db8::53]:53",
            "[2001:db8::54]:53",
        ]
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
        assert_eq!(
            p.resolver,
            ResolverConfig {
                servers,
                refresh: Duration::from_secs(120),
                learned_ttl: (60, 3600),
            }
        );

        let internal = p.providers.len() - 1;
        let nets: Vec<IpNet> = ["10.20.0.0/16", "192.0.2.7/32", "2001:db8:1::/48"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        assert_eq!(
            p.providers[internal],
            Provider {
                name: "internal-llm".into(),
                hosts: vec![
                    "llm.internal.example".into(),
                    "*.inference.internal.example".into()
                ],
                cidrs: nets,
                ports: vec![443, 8443],
            }
        );
        assert_eq!(
            p.provider_id("internal-llm"),
            u32::try_from(internal + 1).ok()
        );

        let cidr = |s: &str| Target::Cidr(s.parse().unwrap_or_else(|e| panic!("{s}: {e}")));
        assert_eq!(
            p.workloads[0],
            Workload {
                name: "support-bot".into(),
                selector: Selector::SystemdUnit("support-bot.service".into()),
                allow: vec![
                    Target::Provider(builtin_index("openai")),
                    Target::Provider(internal),
                    cidr("10.1.0.0/16"),
                ],
                deny: vec![
                    Target::Provider(builtin_index("anthropic")),
                    cidr("2001:db8::1/128")
                ],
                llm: Action::Deny,
                other: Action::Deny,
                limits: Limits::default(),
                provider_limits: BTreeMap::new(),
            }
        );
        assert_eq!(
            p.workloads[1],
            Workload {
                name: "batch".into(),
                selector: Selector::Cgroup("batch.slice/*".into()),
                allow: vec![],
                deny: vec![],
                llm: Action::Allow,
                other: Action::Deny,
                limits: Limits::default(),
                provider_limits: BTreeMap::new(),
            }
        );
        assert_eq!(
            (p.workload_id("support-bot"), p.workload_id("batch")),
            (Some(1), Some(2))
        );
        assert_eq!((p.workload_id("none"), p.provider_id("nope")), (None, None));
    }

    #[test]
    fn off_switches() {
        let p = ok("metrics_listen = \"off\"\naudit_log = \"off\"\n");
        assert_eq!((p.metrics_listen, p.audit_log), (None, AuditLog::Off));
        assert_eq!(ok("audit_log = \"-\"\n").audit_log, AuditLog::Stdout);
    }

    #[test]
    fn policy_provider_replaces_builtin_in_place() {
        let p = ok("[[providers]]\nname = \"openai\"\nhosts = [\"openai-proxy.example\"]\n");
        let catalog = crate::catalog::builtin().unwrap_or(&[]);
        let i = builtin_index("openai");
        assert_eq!(p.providers.len(), catalog.len());
        assert_eq!(p.providers[i].hosts, ["openai-proxy.example"]);
        assert!(
            p.providers[i].ports.is_empty(),
            "policy providers default to every port"
        );
        assert_eq!(p.provider_id("openai"), u32::try_from(i + 1).ok());
        // The replaced entry's hosts are free again.
        ok(
            "[[providers]]\nname = \"openai\"\nhosts = [\"x.example\"]\n\n\
            [[providers]]\nname = \"mine\"\nhosts = [\"api.openai.com\"]\n",
        );
    }

    #[test]
    fn disabled_provider_is_removed_and_ids_follow_the_merged_order() {
        let p = ok(
            "[[providers]]\nname = \"mine\"\nhosts = [\"llm.example\"]\n\n\
                    [[providers]]\nname = \"anthropic\"\ndisabled = true\n",
        );
        let catalog = crate::catalog::builtin().unwrap_or(&[]);
        assert_eq!(p.providers.len(), catalog.len());
        assert_eq!(p.provider_id("anthropic"), None);
        let expected: Vec<&str> = (catalog.iter().map(|c| c.name.as_str()))
            .filter(|n| *n != "anthropic")
            .chain(["mine"])
            .collect();
        let names: Vec<&str> = p.providers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, expected);
        let first_after = builtin_index("anthropic") + 1;
        let id = p.provider_id(&catalog[first_after].name);
        assert_eq!(
            id,
            u32::try_from(first_after).ok(),
            "ids after a removed entry move up"
        );
        // A disabled provider that is not built in is simply absent.
        let p = ok("[[providers]]\nname = \"later\"\ndisabled = true\n");
        assert_eq!(p.providers.len(), catalog.len());
    }

    #[test]
    fn builtin_default_reports_and_blocks_nothing() {
        let p = Policy::builtin_default();
        assert_eq!(p.mode, Mode::Audit);
        assert_eq!(p.failure_mode, FailureMode::Open);
        assert_eq!(
            p.defaults,
            Defaults {
                llm: Action::Deny,
                other: Action::Allow
            }
        );
        assert!(p.workloads.is_empty());
        assert_eq!(
            p.providers.as_slice(),
            crate::catalog::builtin().unwrap_or(&[])
        );
        assert!(p.providers.len() >= 26);
        let file_defaults = ok("");
        assert_eq!(
            (p.metrics_listen, &p.audit_log),
            (file_defaults.metrics_listen, &file_defaults.audit_log)
        );
        assert_eq!(
            (&p.pin_path, p.on_exit),
            (&file_defaults.pin_path, file_defaults.on_exit)
        );
    }

    #[test]
    fn docs_policy_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md");
        let doc =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let start = doc.find("```toml\n").map(|i| i + "```toml\n".len());
        let end = start.and_then(|s| doc[s..].find("\n```").map(|end| s + end + 1));
        let (Some(start), Some(end)) = (start, end) else {
            panic!("{path} has no ```toml block");
        };
        // Blank lines in front keep error positions those of docs/policy.md.
        let text = format!(
            "{}{}",
            "\n".repeat(doc[..start].lines().count()),
            &doc[start..end]
        );
        let p = Policy::parse(&text, "docs/policy.md").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.mode, Mode::Enforce);
        let names: Vec<&str> = p.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["support-bot", "batch", "notebooks"]);
        assert_eq!(p.provider_id("openrouter"), None);
        let internal = p.providers.len() - 1;
        assert_eq!(
            p.workloads[0].limits_for(internal).connections,
            rate(100.0, 100)
        );
        assert_eq!(
            p.workloads[0].limits.bandwidth,
            bandwidth(10_000_000, 5_000_000)
        );
        assert_eq!(p.state_dir, PathBuf::from("/var/lib/llm-egress"));
        let bedrock = p
            .providers
            .iter()
            .find(|p| p.name == "bedrock")
            .map(|p| p.hosts.len());
        assert_eq!(bedrock, Some(2));
        assert_eq!(
            p.providers.last().map(|p| p.name.as_str()),
            Some("internal-llm")
        );
    }

    #[test]
    fn docs_limits_example_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/policy.md");
        let doc =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
        let section = doc
            .find("\n## Limits\n")
            .unwrap_or_else(|| panic!("no Limits section"));
        let start = doc[section..]
            .find("```toml\n")
            .map(|i| section + i + "```toml\n".len());
        let end = start.and_then(|s| doc[s..].find("\n```").map(|end| s + end + 1));
        let (Some(start), Some(end)) = (start, end) else {
            panic!("{path}: no ```toml block under ## Limits");
        };
        let text = format!(
            "{}{}",
            "\n".repeat(doc[..start].lines().count()),
            &doc[start..end]
        );
        let p = Policy::parse(&text, "docs/policy.md").unwrap_or_else(|e| panic!("{e}"));
        let w = &p.workloads[0];
        assert_eq!(w.limits.connections, rate(20.0, 40));
        assert_eq!(
            w.limits_for(builtin_index("openai")).connections,
            rate(5.0, 40),
            "the doc says so"
        );
        // The example in the top of the page sets limits too.
        let start = doc.find("```toml\n").unwrap_or(0);
        assert!(doc[start..section].contains("[workloads.limits]"));
    }

    #[test]
    fn from_path_reads_the_file_and_names_it() {
        let path =
            std::env::temp_dir().join(format!("llm-egress-policy-{}.toml", std::process::id()));
        let written = std::fs::write(&path, "mode = \"audit\"\n\n[defaults]\nllm = \"block\"\n");
        written.unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        let result = Policy::from_path(&path);
        let _ = std::fs::remove_file(&path);
        let errors = result.err().map(|e| e.0).unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].origin, path.display().to_string());
        assert_eq!((errors[0].line, errors[0].column), (4, 7));

        let missing = Policy::from_path(Path::new("/nonexistent/llm-egress.toml"));
        let errors = missing.err().map(|e| e.0).unwrap_or_default();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, 0);
        assert!(
            errors[0]
                .to_string()
                .starts_with("/nonexistent/llm-egress.toml: cannot read")
        );
    }

    #[test]
    fn every_error_is_reported_in_file_order() {
        let text = "mode = \"enforcing\"\nfailure_mode = \"shut\"\non_exit = \"stay\"\n\n\
                    [defaults]\nllm = \"drop\"\nother = \"pass\"\n\n\
                    [[workloads]]\nname = \"w\"\nsystemd_unit = \"w.service\"\nllm = \"nope\"\nother = \"maybe\"\n";
        let errors = errors(text);
        let found: Vec<(&str, usize, usize)> = errors
            .iter()
            .map(|e| (e.key.as_str(), e.line, e.column))
            .collect();
        assert_eq!(
            found,
            [
                ("mode", 1, 8),
                ("failure_mode", 2, 16),
                ("on_exit", 3, 11),
                ("defaults.llm", 6, 7),
                ("defaults.other", 7, 9),
                ("workloads[0].llm", 12, 7),
                ("workloads[0].other", 13, 9),
            ]
        );
        assert!(errors[0].message.contains("\"enforce\", \"audit\""));
        assert!(errors[1].message.contains("\"closed\", \"open\""));
        assert!(errors[2].message.contains("\"detach\", \"keep\""));
        assert!(errors[3].message.contains("\"allow\", \"deny\", \"audit\""));
        assert_eq!(
            errors[0].to_string(),
            "test.toml:1:8: mode = \"enforcing\": expected one of \"enforce\", \"audit\""
        );
    }

    // ---- TOML syntax and shape ----

    #[test]
    fn toml_syntax_error() {
        let e = one_error(
            "mode = \"audit\"\ncgroup = \"/sys\n",
            "cgroup",
            2,
            15,
            "invalid basic string",
        );
        assert_eq!(e.value, None);
    }

    #[test]
    fn unknown_top_level_key() {
        one_error(
            "mode = \"audit\"\nmood = \"happy\"\n",
            "mood",
            2,
            1,
            "unknown field `mood`",
        );
    }

    #[test]
    fn unknown_key_in_a_table_array() {
        let text = format!(
            "[[workloads]]\nname = \"a\"\n{UNIT}\n[[workloads]]\nname = \"b\"\nlimit = 1\n"
        );
        one_error(&text, "workloads[1].limit", 7, 1, "unknown field `limit`");
    }

    #[test]
    fn wrong_type() {
        one_error(
            "[resolver]\nrefresh_seconds = \"30\"\n",
            "resolver.refresh_seconds",
            2,
            19,
            "invalid type",
        );
    }

    #[test]
    fn missing_required_key() {
        one_error(
            "[[providers]]\nhosts = [\"a.example\"]\n",
            "providers[0].name",
            1,
            1,
            "missing field `name`",
        );
    }

    // ---- top-level values ----

    #[test]
    fn invalid_mode() {
        let e = one_error(
            "mode = \"enforcing\"\n",
            "mode",
            1,
            8,
            "expected one of \"enforce\", \"audit\"",
        );
        assert_eq!(e.value.as_deref(), Some("\"enforcing\""));
    }

    #[test]
    fn metrics_listen_not_a_socket_address() {
        one_error(
            "metrics_listen = \"localhost:9469\"\n",
            "metrics_listen",
            1,
            18,
            "not a socket address",
        );
    }

    #[test]
    fn relative_cgroup() {
        one_error(
            "cgroup = \"sys/fs/cgroup\"\n",
            "cgroup",
            1,
            10,
            "absolute path",
        );
    }

    #[test]
    fn relative_audit_log() {
        one_error(
            "audit_log = \"audit.jsonl\"\n",
            "audit_log",
            1,
            13,
            "an absolute path",
        );
    }

    #[test]
    fn relative_pin_path() {
        one_error(
            "pin_path = \"bpf/llm-egress\"\n",
            "pin_path",
            1,
            12,
            "absolute path",
        );
    }

    #[test]
    fn resolver_server_not_an_address() {
        let text = "[resolver]\nservers = [\"10.0.0.53\", \"dns.example\"]\n";
        one_error(
            text,
            "resolver.servers[1]",
            2,
            25,
            "not an IP address or IP:port",
        );
        one_error(
            "[resolver]\nservers = [\"10.0.0.53:0\"]\n",
            "resolver.servers[0]",
            2,
            12,
            "port 0",
        );
    }

    #[test]
    fn telemetry_bounds() {
        let p =
            ok("[telemetry]\nprocess_series_per_workload = 5\nprocess_series_ttl_seconds = 60\n");
        assert_eq!(p.telemetry.process_series_per_workload, 5);
        assert_eq!(p.telemetry.process_series_ttl, Duration::from_secs(60));
        let p = ok("");
        assert_eq!(
            (
                p.telemetry.process_series_per_workload,
                p.telemetry.process_series_ttl
            ),
            (20, Duration::from_secs(600))
        );
        one_error(
            "[telemetry]\nprocess_series_per_workload = 0\n",
            "telemetry.process_series_per_workload",
            2,
            31,
            "must be 1 to 1000",
        );
        one_error(
            "[telemetry]\nprocess_series_ttl_seconds = 5\n",
            "telemetry.process_series_ttl_seconds",
            2,
            30,
            "must be 10 to 86400",
        );
    }

    #[test]
    fn learned_ttl_bounds() {
        let p = ok("[resolver]\nmin_ttl_seconds = 5\nmax_ttl_seconds = 600\n");
        assert_eq!(p.resolver.learned_ttl, (5, 600));
        one_error(
            "[resolver]\nmin_ttl_seconds = 900\nmax_ttl_seconds = 600\n",
            "resolver.max_ttl_seconds",
            3,
            19,
            "must not be below resolver.min_ttl_seconds (900)",
        );
        one_error(
            "[resolver]\nmin_ttl_seconds = 0\n",
            "resolver.min_ttl_seconds",
            2,
            19,
            "must be 1 to 86400",
        );
    }

    #[test]
    fn refresh_seconds_out_of_range() {
        one_error(
            "[resolver]\nrefresh_seconds = 0\n",
            "resolver.refresh_seconds",
            2,
            19,
            "1 to 86400",
        );
        one_error(
            "[resolver]\nrefresh_seconds = 86401\n",
            "resolver.refresh_seconds",
            2,
            19,
            "1 to 86400",
        );
        ok("[resolver]\nrefresh_seconds = 86400\n");
    }

    // ---- providers ----

    fn provider(fields: &str) -> String {
        format!("[[providers]]\n{fields}")
    }

    #[test]
    fn invalid_provider_names() {
        let cases = [
            ("Internal", "only lower-case letters"),
            ("", "1 to 64 characters"),
            ("my llm", "only lower-case letters"),
            ("none", "reserved"),
            ("10.0.0.1", "looks like an IP address"),
        ];
        for (name, message) in cases {
            let text = provider(&format!("name = \"{name}\"\nhosts = [\"a.example\"]\n"));
            one_error(&text, "providers[0].name", 2, 8, message);
        }
        let long = "a".repeat(65);
        let text = provider(&format!("name = \"{long}\"\nhosts = [\"a.example\"]\n"));
        one_error(&text, "providers[0].name", 2, 8, "1 to 64 characters");
    }

    #[test]
    fn invalid_hosts() {
        let long_label = "a".repeat(64);
        let long_host = format!("{}.example", "abcdefghi.".repeat(25));
        let cases = [
            ("bad_host.example", "'_' is not allowed"),
            ("*.com", "at least two labels"),
            ("api..example", "empty label"),
            ("api.*.example", "only a leading"),
            ("-api.example", "starts or ends with '-'"),
            ("10.1.2.3", "put it in `cidrs`"),
            ("", "empty host name"),
            (long_label.as_str(), "longer than 63"),
            (long_host.as_str(), "longer than 253"),
        ];
        for (host, message) in cases {
            let text = provider(&format!(
                "name = \"p\"\nhosts = [\"ok.example\", \"{host}\"]\n"
            ));
            one_error(&text, "providers[0].hosts[1]", 3, 24, message);
        }
    }

    #[test]
    fn hosts_are_normalized() {
        let p = ok(&provider(
            "name = \"p\"\nhosts = [\"API.Example.COM.\", \"*.Svc.Example\", \"api.example.com\"]\n",
        ));
        let last = p
            .providers
            .last()
            .map(|p| p.hosts.clone())
            .unwrap_or_default();
        assert_eq!(last, ["api.example.com", "*.svc.example"]);
    }

    #[test]
    fn invalid_cidrs() {
        let text = provider("name = \"p\"\ncidrs = [\"10.0.0.1/8\"]\n");
        let e = one_error(
            &text,
            "providers[0].cidrs[0]",
            3,
            10,
            "host bits set; did you mean 10.0.0.0/8?",
        );
        assert_eq!(e.value.as_deref(), Some("\"10.0.0.1/8\""));
        let text = provider("name = \"p\"\ncidrs = [\"2001:db8::1/32\"]\n");
        one_error(
            &text,
            "providers[0].cidrs[0]",
            3,
            10,
            "did you mean 2001:db8::/32?",
        );
        let text = provider("name = \"p\"\ncidrs = [\"10.0.0.0/33\"]\n");
        one_error(
            &text,
            "providers[0].cidrs[0]",
            3,
            10,
            "not an IP address or CIDR",
        );
    }

    #[test]
    fn bare_addresses_are_host_networks() {
        let p = ok(&provider(
            "name = \"p\"\ncidrs = [\"192.0.2.1\", \"2001:db8::1\"]\n",
        ));
        let cidrs = p
            .providers
            .last()
            .map(|p| p.cidrs.clone())
            .unwrap_or_default();
        let expected: Vec<IpNet> = ["192.0.2.1/32", "2001:db8::1/128"]
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        assert_eq!(cidrs, expected);
    }

    #[test]
    fn port_zero_and_out_of_range() {
        let text = provider("name = \"p\"\nhosts = [\"a.example\"]\nports = [443, 0]\n");
        one_error(&text, "providers[0].ports[1]", 4, 15, "port 0");
        let text = provider("name = \"p\"\nhosts = [\"a.example\"]\nports = [65536]\n");
        one_error(&text, "providers[0].ports[0]", 4, 10, "1 to 65535");
    }

    #[test]
    fn too_many_ports() {
        let text = provider(
            "name = \"p\"\nhosts = [\"a.example\"]\nports = [1, 2, 3, 4, 5, 6, 7, 8, 9]\n",
        );
        let e = one_error(&text, "providers[0].ports", 4, 9, "at most 8");
        assert!(e.message.starts_with("9 ports"), "{e}");
        ok(&provider(
            "name = \"p\"\nhosts = [\"a.example\"]\nports = [1, 2, 3, 4, 5, 6, 7, 8, 8]\n",
        ));
    }

    #[test]
    fn provider_without_destinations() {
        let text = format!(
            "mode = \"audit\"\n\n{}",
            provider("name = \"p\"\nports = [443]\n")
        );
        one_error(&text, "providers[0]", 3, 1, "needs `hosts` or `cidrs`");
    }

    #[test]
    fn duplicate_provider_names() {
        let text = format!(
            "{}\n{}",
            provider("name = \"p\"\nhosts = [\"a.example\"]\n"),
            provider("name = \"p\"\nhosts = [\"b.example\"]\n")
        );
        one_error(
            &text,
            "providers[1].name",
            6,
            8,
            "duplicate provider name (first defined on line 2)",
        );
    }

    #[test]
    fn host_of_another_provider() {
        let text = provider("name = \"mine\"\nhosts = [\"API.openai.com\"]\n");
        let e = one_error(
            &text,
            "providers[0].hosts[0]",
            3,
            10,
            "already a host of provider `openai`",
        );
        assert_eq!(e.value.as_deref(), Some("\"API.openai.com\""));
        let text = format!(
            "{}\n{}",
            provider("name = \"a\"\ncidrs = [\"10.9.0.0/16\"]\n"),
            provider("name = \"b\"\ncidrs = [\"10.9.0.0/16\"]\n")
        );
        one_error(
            &text,
            "providers[1].cidrs[0]",
            7,
            10,
            "already a CIDR of provider `a`",
        );
    }

    // ---- workloads ----

    fn workload(fields: &str) -> String {
        format!("[[workloads]]\n{fields}")
    }

    #[test]
    fn duplicate_workload_names() {
        let text = format!(
            "{}\n{}",
            workload(&format!("name = \"w\"\n{UNIT}")),
            workload("name = \"w\"\nsystemd_unit = \"other.service\"\n")
        );
        one_error(
            &text,
            "workloads[1].name",
            6,
            8,
            "duplicate workload name (first defined on line 2)",
        );
    }

    #[test]
    fn reserved_workload_name() {
        one_error(
            &workload(&format!("name = \"none\"\n{UNIT}")),
            "workloads[0].name",
            2,
            8,
            "reserved",
        );
        one_error(
            &workload(&format!("name = \"None\"\n{UNIT}")),
            "workloads[0].name",
            2,
            8,
            "reserved",
        );
    }

    #[test]
    fn invalid_workload_names() {
        let text = workload(&format!("name = \"support bot\"\n{UNIT}"));
        one_error(&text, "workloads[0].name", 2, 8, "only letters, digits");
        let text = workload(&format!("name = \"\"\n{UNIT}"));
        one_error(&text, "workloads[0].name", 2, 8, "1 to 64 characters");
        ok(&workload(&format!("name = \"Support_Bot-2.prod\"\n{UNIT}")));
    }

    #[test]
    fn workload_without_selector() {
        let text = format!(
            "mode = \"audit\"\n{}",
            workload("name = \"w\"\nallow = [\"openai\"]\n")
        );
        let e = one_error(&text, "workloads[0]", 2, 1, "needs a selector");
        assert_eq!(e.value, None);
    }

    #[test]
    fn workload_with_two_selectors() {
        let text = workload("name = \"w\"\ncgroup = \"app\"\nsystemd_unit = \"app.service\"\n");
        one_error(&text, "workloads[0].systemd_unit", 4, 16, "both given");
    }

    #[test]
    fn invalid_cgroup_globs() {
        let cases = [
            ("/sys/fs/cgroup/app", "drop the leading '/'"),
            ("pods/../host", "must not contain \"..\""),
            ("pods/[ab", "not a valid glob"),
            ("pods//x", "empty or \".\" path component"),
        ];
        for (glob, message) in cases {
            let text = workload(&format!("name = \"w\"\ncgroup = \"{glob}\"\n"));
            one_error(&text, "workloads[0].cgroup", 3, 10, message);
        }
    }

    #[test]
    fn invalid_systemd_units() {
        for unit in ["app", ".service", "app.timer", "system.slice/app.service"] {
            let text = workload(&format!("name = \"w\"\nsystemd_unit = \"{unit}\"\n"));
            one_error(&text, "workloads[0].systemd_unit", 3, 16, "");
        }
        for unit in [
            "a.service",
            "session-3.scope",
            "user.slice",
            "sshd.socket",
            "getty@tty1.service",
        ] {
            ok(&workload(&format!(
                "name = \"w\"\nsystemd_unit = \"{unit}\"\n"
            )));
        }
    }

    #[test]
    fn unknown_allow_entry() {
        let text = workload(&format!(
            "name = \"w\"\n{UNIT}allow = [\"anthropic\", \"OpenAI\"]\n"
        ));
        let e = one_error(&text, "workloads[0].allow[1]", 4, 23, "neither a provider");
        assert!(e.message.contains("did you mean \"openai\"?"), "{e}");
        let text = workload(&format!("name = \"w\"\n{UNIT}deny = [\"10.0.0.1/8\"]\n"));
        one_error(
            &text,
            "workloads[0].deny[0]",
            4,
            9,
            "host bits set; did you mean 10.0.0.0/8?",
        );
        let text = workload(&format!(
            "name = \"w\"\n{UNIT}allow = [\"api.openai.com\"]\n"
        ));
        one_error(&text, "workloads[0].allow[0]", 4, 10, "a host name");
        let text = workload(&format!("name = \"w\"\n{UNIT}deny = [\"300.1.1.1\"]\n"));
        one_error(
            &text,
            "workloads[0].deny[0]",
            4,
            9,
            "not an IP address or CIDR",
        );
    }

    #[test]
    fn disabled_provider_in_allow() {
        let text = format!(
            "{}\n{}",
            provider("name = \"openai\"\ndisabled = true\n"),
            workload(&format!("name = \"w\"\n{UNIT}allow = [\"openai\"]\n"))
        );
        one_error(
            &text,
            "workloads[0].allow[0]",
            8,
            10,
            "provider `openai` is disabled",
        );
    }

    #[test]
    fn invalid_provider_is_reported_once() {
        let text = format!(
            "{}\n{}",
            provider("name = \"mine\"\nhosts = [\"bad_host\"]\n"),
            workload(&format!("name = \"w\"\n{UNIT}allow = [\"mine\"]\n"))
        );
        one_error(&text, "providers[0].hosts[0]", 3, 10, "not allowed");
    }

    #[test]
    fn same_entry_in_allow_and_deny() {
        let text = workload(&format!(
            "name = \"w\"\n{UNIT}allow = [\"openai\", \"10.0.0.1\"]\ndeny = [\"10.0.0.1/32\", \"openai\"]\n"
        ));
        let errors = errors(&text);
        let found: Vec<(&str, usize, usize)> = errors
            .iter()
            .map(|e| (e.key.as_str(), e.line, e.column))
            .collect();
        assert_eq!(
            found,
            [
                ("workloads[0].deny[0]", 5, 9),
                ("workloads[0].deny[1]", 5, 24)
            ]
        );
        assert!(
            errors
                .iter()
                .all(|e| e.message.contains("in both `allow` and `deny`"))
        );
    }

    #[test]
    fn identical_selectors() {
        let text = format!(
            "{}\n{}",
            workload("name = \"a\"\ncgroup = \"pods/*\"\n"),
            workload("name = \"b\"\ncgroup = \"pods/*/\"\n")
        );
        one_error(
            &text,
            "workloads[1].cgroup",
            7,
            10,
            "workload `a` has the same selector",
        );
        let text = format!(
            "{}\n{}",
            workload(&format!("name = \"a\"\n{UNIT}")),
            workload(&format!("name = \"b\"\n{UNIT}"))
        );
        one_error(
            &text,
            "workloads[1].systemd_unit",
            7,
            16,
            "workload `a` has the same selector",
        );
        // The same string as a cgroup glob and as a unit name are different selectors.
        ok(&format!(
            "{}\n{}",
            workload("name = \"a\"\ncgroup = \"app.service\"\n"),
            workload(&format!("name = \"b\"\n{UNIT}"))
        ));
    }

    #[test]
    fn workload_other_defaults_to_defaults_other() {
        let p = ok(&format!(
            "[defaults]\nllm = \"allow\"\nother = \"audit\"\n\n{}",
            workload(&format!("name = \"w\"\n{UNIT}"))
        ));
        assert_eq!(
            (p.workloads[0].llm, p.workloads[0].other),
            (Action::Deny, Action::Audit)
        );
    }

    // ---- limits and state_dir ----

    /// A workload whose `[workloads.limits]` holds `keys`: its first key is
    /// on line 7.
    fn with_limits(keys: &str) -> String {
        workload(&format!(
            "name = \"w\"\n{UNIT}allow = [\"openai\"]\n\n[workloads.limits]\n{keys}"
        ))
    }

    fn rate(per_second: f64, burst: u64) -> Option<ConnectionRate> {
        Some(ConnectionRate { per_second, burst })
    }

    fn bandwidth(bytes_per_second: u64, burst_bytes: u64) -> Option<Bandwidth> {
        Some(Bandwidth {
            bytes_per_second,
            burst_bytes,
        })
    }

    #[test]
    fn limits_parse_into_the_expected_values() {
        let p = ok(r#"
state_dir = "/srv/llm-egress/state"

[[workloads]]
name = "support-bot"
cgroup = "support-bot"
allow = ["openai", "anthropic"]
[workloads.limits]
connections_per_second = 20
burst = 40
bytes_per_second = 1_000_000
bytes_burst = 2_000_000
tokens_per_minute = 200_000
tokens_per_day = 5_000_000
[workloads.limits.providers.openai]
connections_per_second = 5
tokens_per_day = 1_000_000
[workloads.limits.providers.mistral]   # denied (not allowed): accepted
bytes_per_second = 500_000

[[workloads]]
name = "batch"
cgroup = "batch"
limits = { connections_per_second = 0.5 }
"#);
        assert_eq!(p.state_dir, PathBuf::from("/srv/llm-egress/state"));
        let w = &p.workloads[0];
        let wide = Limits {
            connections: rate(20.0, 40),
            bandwidth: bandwidth(1_000_000, 2_000_000),
            tokens_per_minute: Some(200_000),
            tokens_per_day: Some(5_000_000),
        };
        assert_eq!(w.limits, wide);
        let (openai, mistral) = (builtin_index("openai"), builtin_index("mistral"));
        let expected = BTreeMap::from([
            (
                openai,
                Limits {
                    // Key by key: the workload's explicit burst stays.
                    connections: rate(5.0, 40),
                    bandwidth: None,
                    tokens_per_minute: None,
                    tokens_per_day: Some(1_000_000),
                },
            ),
            (
                mistral,
                Limits {
                    // The default burst of the merged rate, not the workload's.
                    bandwidth: bandwidth(500_000, 2_000_000),
                    ..Limits::default()
                },
            ),
        ]);
        assert_eq!(w.provider_limits, expected);
        assert_eq!(
            w.limits_for(openai),
            Limits {
                connections: rate(5.0, 40),
                tokens_per_day: Some(1_000_000),
                ..wide
            }
        );
        assert_eq!(
            w.limits_for(mistral).bandwidth,
            bandwidth(500_000, 2_000_000)
        );
        assert_eq!(w.limits_for(builtin_index("anthropic")), wide);
        let batch = &p.workloads[1];
        assert_eq!(
            batch.limits,
            Limits {
                connections: rate(0.5, 1),
                ..Limits::default()
            }
        );
        assert!(batch.provider_limits.is_empty());
        assert_eq!(ok("").state_dir, PathBuf::from("/var/lib/llm-egress"));
        assert!(
            ok(&workload(&format!("name = \"w\"\n{UNIT}"))).workloads[0]
                .limits
                .is_empty()
        );
    }

    #[test]
    fn limit_bursts_have_defaults() {
        let limits = |keys: &str| ok(&with_limits(keys)).workloads[0].limits;
        let cases = [(0.5, 1), (1.0, 1), (2.5, 3), (20.0, 20), (1e6, 1_000_000)];
        for (per_second, burst) in cases {
            let l = limits(&format!("connections_per_second = {per_second:?}\n"));
            assert_eq!(l.connections, rate(per_second, burst), "{per_second}");
        }
        assert_eq!(
            limits("connections_per_second = 7\n").connections,
            rate(7.0, 7)
        );
        let cases = [
            (1, MIN_BYTES_BURST),
            (200_000, MIN_BYTES_BURST),
            (10_000_000, 5_000_000),
            (100_000_000_000, MAX_BYTES_BURST),
        ];
        for (per_second, burst) in cases {
            let l = limits(&format!("bytes_per_second = {per_second}\n"));
            assert_eq!(l.bandwidth, bandwidth(per_second, burst), "{per_second}");
        }
        // An override that sets only the rate gets the default burst of its
        // rate when the workload has no explicit burst.
        let p = ok(&with_limits(
            "bytes_per_second = 1_000_000\n\n[workloads.limits.providers.openai]\nbytes_per_second = 20_000_000\n",
        ));
        let openai = builtin_index("openai");
        assert_eq!(
            p.workloads[0].limits_for(openai).bandwidth,
            bandwidth(20_000_000, 10_000_000)
        );
        // An override that sets only a burst inherits the workload's rate.
        let p = ok(&with_limits(
            "connections_per_second = 3\nbytes_per_second = 1_000_000\n\n\
             [workloads.limits.providers.openai]\nburst = 9\nbytes_burst = 262144\n",
        ));
        assert_eq!(
            p.workloads[0].provider_limits.get(&openai),
            Some(&Limits {
                connections: rate(3.0, 9),
                bandwidth: bandwidth(1_000_000, 262_144),
                ..Limits::default()
            })
        );
        // The largest values are accepted.
        ok(&with_limits(
            "connections_per_second = 1_000_000\nburst = 1_000_000\n\
             bytes_per_second = 100_000_000_000\nbytes_burst = 1_000_000_000\n\
             tokens_per_minute = 1_000_000_000_000\ntokens_per_day = 1_000_000_000_000_000\n",
        ));
    }

    #[test]
    fn invalid_limit_values_are_rejected() {
        // (key = value, message); a burst's rate comes after it, on line 8.
        let cases = [
            (
                "connections_per_second = 0",
                "leave the key out for no limit",
            ),
            ("connections_per_second = -1", "must be 0.001 to 1000000"),
            ("connections_per_second = -0.5", "must be 0.001 to 1000000"),
            ("connections_per_second = 0.0001", "thousandths"),
            (
                "connections_per_second = 1_000_001",
                "must be 0.001 to 1000000",
            ),
            ("connections_per_second = 1e300", "must be 0.001 to 1000000"),
            ("connections_per_second = nan", "not a finite number"),
            ("connections_per_second = inf", "not a finite number"),
            ("connections_per_second = -inf", "not a finite number"),
            ("burst = 0", "must be 1 to 1000000 (connections)"),
            ("burst = -3", "must be 1 to 1000000"),
            ("burst = 1_000_001", "must be 1 to 1000000"),
            ("bytes_per_second = 0", "leave the key out"),
            ("bytes_per_second = -1", "must be 1 to 100000000000"),
            (
                "bytes_per_second = 100_000_000_001",
                "must be 1 to 100000000000",
            ),
            (
                "bytes_burst = 131071",
                "could never pass one large (64 KiB) packet",
            ),
            ("bytes_burst = 0", "must be 131072 to 1000000000 (bytes)"),
            ("bytes_burst = -131072", "must be 131072 to"),
            (
                "bytes_burst = 1_000_000_001",
                "must be 131072 to 1000000000",
            ),
            (
                "tokens_per_minute = 0",
                "must be 1 to 1000000000000 (tokens)",
            ),
            (
                "tokens_per_minute = 1_000_000_000_001",
                "must be 1 to 1000000000000",
            ),
            ("tokens_per_day = -5", "must be 1 to 1000000000000000"),
            (
                "tokens_per_day = 1_000_000_000_000_000_000",
                "must be 1 to 1000000000000000",
            ),
            ("tokens_per_day = 9223372036854775807", "must be 1 to"),
        ];
        for (line, message) in cases {
            let (name, value) = line.split_once(" = ").unwrap_or_default();
            let rate = match name {
                "burst" => "connections_per_second = 1\n",
                "bytes_burst" => "bytes_per_second = 1\n",
                _ => "",
            };
            let text = with_limits(&format!("{line}\n{rate}"));
            let e = one_error(
                &text,
                &format!("workloads[0].limits.{name}"),
                7,
                name.len() + 4,
                message,
            );
            assert_eq!(e.value.as_deref(), Some(value));
        }
        // The same checks in an override, with its key path.
        let text = with_limits(
            "[workloads.limits.providers.openai]\nburst = 0\nconnections_per_second = 1\n",
        );
        let e = one_error(
            &text,
            "workloads[0].limits.providers.openai.burst",
            8,
            9,
            "must be 1 to",
        );
        assert_eq!(
            e.to_string(),
            "test.toml:8:9: workloads[0].limits.providers.openai.burst = 0: \
             must be 1 to 1000000 (connections); leave the key out for no limit"
        );
    }

    #[test]
    fn limit_integers_beyond_i64_are_toml_errors() {
        let text = with_limits("tokens_per_day = 9223372036854775808\n");
        let errors = errors(&text);
        assert_eq!(errors.len(), 1, "{}", PolicyErrors(errors.clone()));
        assert_eq!(errors[0].line, 7);
        assert_eq!(errors[0].key, "workloads[0].limits.tokens_per_day");
        let text = with_limits("bytes_per_second = 2.5\n");
        let e = one_error(
            &text,
            "workloads[0].limits.bytes_per_second",
            7,
            20,
            "invalid type",
        );
        assert_eq!(e.value, None);
        one_error(
            &with_limits("connections_per_second = \"20\"\n"),
            "workloads[0].limits.connections_per_second",
            7,
            26,
            "invalid type",
        );
    }

    #[test]
    fn burst_needs_a_rate() {
        let e = one_error(
            &with_limits("burst = 40\n"),
            "workloads[0].limits.burst",
            7,
            9,
            "`burst` without `connections_per_second`",
        );
        assert_eq!(e.value.as_deref(), Some("40"));
        one_error(
            &with_limits("tokens_per_minute = 5\nbytes_burst = 262144\n"),
            "workloads[0].limits.bytes_burst",
            8,
            15,
            "`bytes_burst` without `bytes_per_second`",
        );
        // In an override: the rate may come from the workload-wide level, or
        // from the override itself.
        let text = with_limits(
            "bytes_per_second = 1_000_000\n\n[workloads.limits.providers.openai]\nburst = 2\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.burst",
            10,
            9,
            "here or in the workload's [workloads.limits]",
        );
        ok(&with_limits(
            "[workloads.limits.providers.openai]\nburst = 2\nconnections_per_second = 1\n",
        ));
        ok(&with_limits(
            "connections_per_second = 1\n[workloads.limits.providers.openai]\nburst = 2\n",
        ));
        // A workload-wide burst with the rate only in an override is not.
        let text = with_limits(
            "burst = 2\n[workloads.limits.providers.openai]\nconnections_per_second = 1\n",
        );
        one_error(&text, "workloads[0].limits.burst", 7, 9, "`burst` without");
    }

    #[test]
    fn tokens_per_day_below_tokens_per_minute() {
        let text = with_limits("tokens_per_minute = 1000\ntokens_per_day = 999\n");
        one_error(
            &text,
            "workloads[0].limits.tokens_per_day",
            8,
            18,
            "must not be below tokens_per_minute (1000)",
        );
        ok(&with_limits(
            "tokens_per_minute = 1000\ntokens_per_day = 1000\n",
        ));
        // Merged with the workload-wide level, reported in the override.
        let text = with_limits(
            "tokens_per_minute = 1000\n\n[workloads.limits.providers.openai]\ntokens_per_day = 500\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.tokens_per_day",
            10,
            18,
            "must not be below tokens_per_minute (1000, from workloads[0].limits)",
        );
        let text = with_limits(
            "tokens_per_day = 500\n\n[workloads.limits.providers.openai]\ntokens_per_minute = 1000\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.tokens_per_minute",
            10,
            21,
            "must not be above tokens_per_day (500, from workloads[0].limits)",
        );
    }

    #[test]
    fn unknown_provider_in_limits() {
        let text = with_limits(
            "connections_per_second = 5\n\n[workloads.limits.providers.opneai]\nburst = 5\n",
        );
        let e = one_error(
            &text,
            "workloads[0].limits.providers.opneai",
            10,
            9,
            "\"opneai\" is not a provider (built-in or in this policy); did you mean \"openai\"?",
        );
        assert_eq!(e.value, None);
        // An empty override is reported at the workload-wide keys.
        let text = with_limits("tokens_per_day = 9\n[workloads.limits.providers.\"Open AI\"]\n");
        one_error(
            &text,
            "workloads[0].limits.providers.\"Open AI\"",
            7,
            18,
            "not a provider",
        );
        // … and with none, at the workload.
        let text = format!(
            "mode = \"audit\"\n{}",
            workload(&format!(
                "name = \"w\"\n{UNIT}[workloads.limits.providers.nope]\n"
            ))
        );
        let e = one_error(&text, "workloads[0].limits.providers.nope", 2, 1, "");
        assert!(!e.message.contains("did you mean"), "{e}");
        let text = format!(
            "{}\n{}",
            provider("name = \"openai\"\ndisabled = true\n"),
            workload(&format!(
                "name = \"w\"\n{UNIT}[workloads.limits.providers.openai]\ntokens_per_day = 1\n"
            ))
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai",
            9,
            18,
            "provider `openai` is disabled",
        );
        // A provider of this policy; one the workload denies.
        let p = ok(&format!(
            "{}\n{}deny = [\"anthropic\"]\n[workloads.limits.providers.mine]\ntokens_per_day = 1\n\
             [workloads.limits.providers.anthropic]\ntokens_per_day = 2\n",
            provider("name = \"mine\"\nhosts = [\"llm.example\"]\n"),
            workload(&format!("name = \"w\"\n{UNIT}"))
        ));
        let mine = p.providers.len() - 1;
        let days: Vec<(usize, Option<u64>)> = (p.workloads[0].provider_limits.iter())
            .map(|(i, l)| (*i, l.tokens_per_day))
            .collect();
        let mut expected = vec![(mine, Some(1)), (builtin_index("anthropic"), Some(2))];
        expected.sort();
        assert_eq!(days, expected);
    }

    #[test]
    fn unknown_key_in_limits() {
        one_error(
            &with_limits("connections_per_minute = 5\n"),
            "workloads[0].limits.connections_per_minute",
            7,
            1,
            "unknown field `connections_per_minute`",
        );
        // An override has no `providers` of its own.
        let text = with_limits(
            "[workloads.limits.providers.openai]\nproviders = { anthropic = { burst = 1 } }\n",
        );
        one_error(
            &text,
            "workloads[0].limits.providers.openai.providers",
            8,
            1,
            "unknown field `providers`",
        );
        one_error(
            &workload(&format!("name = \"w\"\n{UNIT}limits = {{ rate = 1 }}\n")),
            "workloads[0].limits.rate",
            4,
            12,
            "unknown field `rate`",
        );
    }

    #[test]
    fn relative_state_dir() {
        let e = one_error(
            "mode = \"audit\"\nstate_dir = \"var/lib/llm-egress\"\n",
            "state_dir",
            2,
            13,
            "must be an absolute path",
        );
        assert_eq!(e.value.as_deref(), Some("\"var/lib/llm-egress\""));
    }

    #[test]
    fn near_names_are_suggested() {
        assert_eq!(edit_distance("opneai", "openai"), 2);
        assert_eq!(edit_distance("", "ab"), 2);
        let p = ok("");
        assert_eq!(nearest_name("Anthropic", &p.providers), Some("anthropic"));
        assert_eq!(nearest_name("completely-else", &p.providers), None);
    }
}
