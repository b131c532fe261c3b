//! From the serde mirror (`file`) to a validated [`Policy`].
//!
//! Every check records its error and carries on with a fallback value, so
//! one run reports every problem of a file; a policy with any error is
//! rejected as a whole. Each error names the line and column of the value it
//! is about (from `toml::Spanned`), its dotted key and the value as written.
//! `file` knows what a single value may look like; this module knows what
//! the values mean together: defaults, the merge of the built-in catalog
//! (`crate::policy::catalog`, parsed with the same checks) with the policy's
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
    KubernetesConfig, LearnEstimates, Limits, MAX_BYTES_BURST, MAX_BYTES_PER_SECOND,
    MAX_CONNECTION_BURST, MAX_CONNECTIONS_PER_SECOND, MIN_BYTES_BURST, Mode, OnExit, PodSelector,
    Policy, PolicyError, PolicyErrors, Programs, Provider, Proxy, ResolverConfig, Selector, Target,
    TelemetryConfig, Workload,
    error::line_column,
    file::{
        self, CatalogFile, LimitKeysRef, LimitsFile, PodSelectorFile, PolicyFile, ProviderFile,
        ProxyFile, WorkloadFile, absolute, audit_log, cgroup_glob, cidr, host, metrics_listen,
        port, provider_name, server, systemd_unit, trusted, workload_name,
    },
    kubernetes,
};

mod exact;
mod fleet;
mod limits;
mod proxies;
mod sockets;

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
const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];
const ACTIONS: &[(&str, Action)] = &[
    ("allow", Action::Allow),
    ("deny", Action::Deny),
    ("audit", Action::Audit),
];
const FAILURE_MODES: &[(&str, FailureMode)] =
    &[("closed", FailureMode::Closed), ("open", FailureMode::Open)];
const ON_EXITS: &[(&str, OnExit)] = &[("detach", OnExit::Detach), ("keep", OnExit::Keep)];
const PROGRAMS: &[(&str, Programs)] = &[("all", Programs::All), ("connect", Programs::Connect)];

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
        let catalog = match crate::policy::catalog::builtin() {
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
        let catalog = crate::policy::catalog::builtin().unwrap_or_else(|errors| {
            // Unreachable in a tested build: catalog::tests parse the file.
            tracing::error!(%errors, "the built-in provider catalog is invalid; using none");
            &[]
        });
        let mut c = Checker::new(crate::policy::catalog::ORIGIN, "");
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
    /// provider's fields plus `display`), for `crate::policy::catalog`. Returns the
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
    /// The policy's `programs`: limits that need the programs it leaves
    /// out are errors.
    programs: Programs,
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
            programs: Programs::All,
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
        let programs = self.choice(f.programs.as_ref(), "programs", PROGRAMS, Programs::All);
        self.programs = programs;
        let state_dir = f
            .state_dir
            .as_ref()
            .and_then(|v| self.check(v, "state_dir", |s| absolute(s)));
        let other = self.choice(
            f.defaults.other.as_ref(),
            "defaults.other",
            ACTIONS,
            DEFAULT_OTHER,
        );
        let defaults = Defaults {
            llm: self.choice(
                f.defaults.llm.as_ref(),
                "defaults.llm",
                ACTIONS,
                DEFAULT_LLM,
            ),
            other,
            raw_sockets: self.raw_sockets(
                f.defaults.raw_sockets.as_ref(),
                "defaults.raw_sockets",
                other,
            ),
        };
        let nat64_prefixes = self.nat64_prefixes(f.nat64_prefixes.as_ref());
        let resolver = self.resolver(f);
        let telemetry = self.telemetry(f);
        let kubernetes = self.kubernetes(f);
        let merged = self.providers(&f.providers, catalog);
        let proxies = self.proxies(&f.proxies, &merged);
        let mut workloads =
            self.workloads(&f.workloads, &merged, defaults.other, kubernetes.enabled);
        self.workload_proxies(&f.workloads, &mut workloads, &proxies);
        let fleet = self.fleet(f);
        let fleet_workloads = self.fleet_workloads(&f.workloads, &workloads, fleet.as_ref());
        let prices = self.prices(f);
        let secrets = self.secrets(f);
        let usd_budgets = self.usd_budgets(f);
        Policy {
            mode,
            cgroup,
            metrics_listen,
            audit_log,
            pin_path: pin_path.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_PATH)),
            failure_mode,
            on_exit,
            programs,
            state_dir: state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            defaults,
            nat64_prefixes,
            resolver,
            telemetry,
            kubernetes,
            providers: merged.providers,
            workloads,
            proxies,
            fleet,
            fleet_workloads,
            prices,
            secrets,
            usd_budgets,
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
            learn_estimates: self.choice(
                t.learn_estimates.as_ref(),
                "telemetry.learn_estimates",
                &[
                    ("host", LearnEstimates::Host),
                    ("workload", LearnEstimates::Workload),
                    ("off", LearnEstimates::Off),
                ],
                LearnEstimates::Host,
            ),
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
        let trusted = match &r.trusted {
            None => Some(Vec::new()),
            Some(v) => self
                .check(v, "resolver.trusted", trusted)
                .unwrap_or(Some(Vec::new())),
        };
        ResolverConfig {
            servers,
            refresh,
            learned_ttl: (min, max.max(min)),
            trusted,
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
                (None, None, None) if w.systemd_user_unit.is_none() => {
                    let message = "needs a selector: `cgroup` (a glob of cgroup paths), \
                                   `systemd_unit`, `systemd_user_unit`, or `k8s` (pod namespace and labels)";
                    self.error_at(entry.span(), &key, message);
                    None
                }
                (None, None, None) => self.user_unit(w, entry.span(), &key),
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
            let selector = self.anchoring(w, &key, selector);
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
            let raw_sockets =
                self.raw_sockets(w.raw_sockets.as_ref(), &format!("{key}.raw_sockets"), other);
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
                    raw_sockets,
                    limits,
                    provider_limits,
                    proxies: vec![],
                    exact_tokens: w.exact_tokens.as_ref().is_some_and(|e| *e.get_ref()),
                });
            }
        }
        out
    }

    /// A `systemd_user_unit` selector (with its `uid`), as the selector
    /// match of `workloads` gives it: (span, key, same-text, selector).
    fn user_unit(
        &mut self,
        w: &WorkloadFile,
        span: Range<usize>,
        key: &str,
    ) -> Option<(Range<usize>, &'static str, String, Selector)> {
        let unit = w.systemd_user_unit.as_ref()?;
        let name = self.check(unit, &format!("{key}.systemd_user_unit"), |s| {
            systemd_unit(s)
        });
        let uid = match &w.uid {
            None => {
                let message =
                    "`systemd_user_unit` needs `uid`: the user whose manager runs the unit";
                self.error_at(span, key, message);
                None
            }
            Some(v) => self.check(v, &format!("{key}.uid"), |&u| match u32::try_from(u) {
                Ok(0) => Err("uid 0: root's units are system units (`systemd_unit`)".to_owned()),
                Ok(u) if u != u32::MAX => Ok(u),
                _ => Err("not a uid (1 to 4294967294)".to_owned()),
            }),
        };
        let (unit_name, uid) = (name?, uid?);
        Some((
            unit.span(),
            "systemd_user_unit",
            format!("{uid}:{unit_name}"),
            Selector::SystemdUserUnit {
                unit: unit_name,
                uid,
            },
        ))
    }

    /// The keys that say where a selector may match (`systemd_user_unit`
    /// beside another selector, `uid`, `match_delegated`): checked after
    /// the selector, and `match_delegated = true` applied to a `cgroup`.
    fn anchoring(
        &mut self,
        w: &WorkloadFile,
        key: &str,
        selector: Option<(Range<usize>, &'static str, String, Selector)>,
    ) -> Option<(Range<usize>, &'static str, String, Selector)> {
        let mut ok = true;
        if let Some(unit) = &w.systemd_user_unit {
            let others = [
                ("cgroup", w.cgroup.is_some()),
                ("systemd_unit", w.systemd_unit.is_some()),
                ("k8s", w.k8s.is_some()),
            ];
            if let Some((other, _)) = others.iter().find(|(_, given)| *given) {
                let message = format!(
                    "`{other}` and `systemd_user_unit` both given; a workload has one selector"
                );
                self.error(unit, &format!("{key}.systemd_user_unit"), message);
                ok = false;
            }
        } else if let Some(uid) = &w.uid {
            let message = "`uid` belongs with `systemd_user_unit`";
            self.error(uid, &format!("{key}.uid"), message);
            ok = false;
        }
        let delegated = w.match_delegated.as_ref();
        if let Some(d) = delegated
            && w.cgroup.is_none()
        {
            let message = "`match_delegated` belongs with `cgroup` (other selectors never match \
                           what a non-root user created, except `systemd_user_unit`)";
            self.error(d, &format!("{key}.match_delegated"), message);
            ok = false;
        }
        let selector = selector.filter(|_| ok)?;
        Some(match (selector, delegated.is_some_and(|d| *d.get_ref())) {
            ((span, kind, same, Selector::Cgroup(g)), true) => {
                (span, kind, same, Selector::DelegatedCgroup(g))
            }
            (s, _) => s,
        })
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

    pub(super) fn parse(text: &str) -> Result<Policy, PolicyErrors> {
        Policy::parse(text, ORIGIN)
    }

    pub(super) fn ok(text: &str) -> Policy {
        parse(text).unwrap_or_else(|e| panic!("policy should be valid:\n{e}\n---\n{text}"))
    }

    pub(super) fn errors(text: &str) -> Vec<PolicyError> {
        match parse(text) {
            Ok(_) => panic!("policy should be invalid:\n{text}"),
            Err(e) => e.0,
        }
    }

    /// Asserts that `text` has exactly one error, at `key`, `line`:`column`,
    /// whose message contains `message`; returns it.
    #[track_caller]
    pub(super) fn one_error(
        text: &str,
        key: &str,
        line: usize,
        column: usize,
        message: &str,
    ) -> PolicyError {
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

    pub(super) fn builtin_index(name: &str) -> usize {
        let catalog = crate::policy::catalog::builtin().unwrap_or_else(|e| panic!("{e}"));
        catalog
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    pub(super) const UNIT: &str = "systemd_unit = \"app.service\"\n";

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
        assert_eq!(p.programs, Programs::All);
        assert_eq!(
            p.defaults,
            Defaults {
                llm: Action::Deny,
                other: Action::Allow,
                raw_sockets: Action::Allow,
            }
        );
        assert_eq!(
            p.resolver,
            ResolverConfig {
                servers: vec![],
                refresh: Duration::from_secs(30),
                learned_ttl: (60, 3600),
                trusted: Some(vec![]),
            }
        );
        assert_eq!(
            p.providers.as_slice(),
            crate::policy::catalog::builtin().unwrap_or(&[])
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
                other: Action::Deny,
                raw_sockets: Action::Deny,
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
                trusted: Some(vec![]),
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
                raw_sockets: Action::Deny,
                limits: Limits::default(),
                provider_limits: BTreeMap::new(),
                proxies: vec![],
                exact_tokens: false,
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
                raw_sockets: Action::Deny,
                limits: Limits::default(),
                provider_limits: BTreeMap::new(),
                proxies: vec![],
                exact_tokens: false,
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
        let catalog = crate::policy::catalog::builtin().unwrap_or(&[]);
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
        let catalog = crate::policy::catalog::builtin().unwrap_or(&[]);
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
                other: Action::Allow,
                raw_sockets: Action::Allow,
            }
        );
        assert!(p.workloads.is_empty());
        assert_eq!(
            p.providers.as_slice(),
            crate::policy::catalog::builtin().unwrap_or(&[])
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
        assert_eq!((p.mode, p.programs), (Mode::Enforce, Programs::All));
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
        let text = "mode = \"enforcing\"\nfailure_mode = \"shut\"\non_exit = \"stay\"\nprograms = \"some\"\n\
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
                ("programs", 4, 12),
                ("defaults.llm", 6, 7),
                ("defaults.other", 7, 9),
                ("workloads[0].llm", 12, 7),
                ("workloads[0].other", 13, 9),
            ]
        );
        assert!(errors[0].message.contains("\"enforce\", \"audit\""));
        assert!(errors[1].message.contains("\"closed\", \"open\""));
        assert!(errors[2].message.contains("\"detach\", \"keep\""));
        assert!(errors[3].message.contains("\"all\", \"connect\""));
        assert!(errors[4].message.contains("\"allow\", \"deny\", \"audit\""));
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
        assert_eq!(p.telemetry.learn_estimates, LearnEstimates::Host);
        let p = ok("[telemetry]\nlearn_estimates = \"workload\"\n");
        assert_eq!(p.telemetry.learn_estimates, LearnEstimates::Workload);
        one_error(
            "[telemetry]\nlearn_estimates = \"always\"\n",
            "telemetry.learn_estimates",
            2,
            19,
            "expected one of \"host\", \"workload\", \"off\"",
        );
    }

    #[test]
    fn trusted_resolvers() {
        use std::net::IpAddr;
        let conf =
            "# comment\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\nsearch x\nnameserver bad\n";
        // Default: resolv.conf's and the agent's own servers, nothing else.
        let p = ok("[resolver]\nservers = [\"10.9.9.9:5353\"]\n");
        let t = p.resolver.trusted_resolvers(conf).expect("a list");
        let want: Vec<IpAddr> = ["10.0.0.2", "10.9.9.9", "fe80::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(t.into_iter().collect::<Vec<_>>(), want);
        let p = ok("[resolver]\ntrusted = [\"192.0.2.1\", \"2001:db8::53\"]\n");
        let t = p.resolver.trusted_resolvers("").expect("a list");
        assert_eq!(t.len(), 2);
        assert!(t.contains(&"2001:db8::53".parse::<IpAddr>().unwrap()));
        // "any": no check.
        let p = ok("[resolver]\ntrusted = \"any\"\n");
        assert_eq!(p.resolver.trusted_resolvers(conf), None);
        one_error(
            "[resolver]\ntrusted = [\"192.0.2.1\", \"dns.example\"]\n",
            "resolver.trusted",
            2,
            11,
            "\"dns.example\" is not an IP address",
        );
        one_error(
            "[resolver]\ntrusted = \"all\"\n",
            "resolver.trusted",
            2,
            11,
            "expected \"any\" or a list of IP addresses",
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

    pub(super) fn provider(fields: &str) -> String {
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

    pub(super) fn workload(fields: &str) -> String {
        format!("[[workloads]]\n{fields}")
    }

    /// `exact_tokens`: off unless set, a boolean only (docs/plaintext.md).
    #[test]
    fn exact_tokens_is_off_by_default_and_a_boolean() {
        let p = ok(&workload(&format!("name = \"w\"\n{UNIT}")));
        assert!(!p.workloads[0].exact_tokens);
        let p = ok(&workload(&format!(
            "name = \"w\"\n{UNIT}exact_tokens = true\n"
        )));
        assert!(p.workloads[0].exact_tokens);
        let e = Policy::parse(
            &workload(&format!("name = \"w\"\n{UNIT}exact_tokens = \"yes\"\n")),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exact_tokens"), "{e}");
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
    fn anchoring_keys() {
        let p = ok(&workload(
            "name = \"j\"\nsystemd_user_unit = \"jupyter.service\"\nuid = 1000\n",
        ));
        assert_eq!(
            p.workloads[0].selector,
            Selector::SystemdUserUnit {
                unit: "jupyter.service".into(),
                uid: 1000
            }
        );
        let p = ok(&workload(
            "name = \"j\"\ncgroup = \"users/**/jupyter-*\"\nmatch_delegated = true\n",
        ));
        assert_eq!(
            p.workloads[0].selector,
            Selector::DelegatedCgroup("users/**/jupyter-*".into())
        );
        let p = ok(&workload(
            "name = \"j\"\ncgroup = \"users/*\"\nmatch_delegated = false\n",
        ));
        assert_eq!(p.workloads[0].selector, Selector::Cgroup("users/*".into()));
        let text = workload("name = \"j\"\nsystemd_user_unit = \"jupyter.service\"\n");
        one_error(&text, "workloads[0]", 1, 1, "needs `uid`");
        let text = workload("name = \"j\"\nsystemd_user_unit = \"j.service\"\nuid = 0\n");
        one_error(&text, "workloads[0].uid", 4, 7, "system units");
        let text = workload("name = \"j\"\nsystemd_user_unit = \"j.service\"\nuid = -1\n");
        one_error(&text, "workloads[0].uid", 4, 7, "not a uid");
        let text = workload("name = \"j\"\nsystemd_user_unit = \"j\"\nuid = 5\n");
        one_error(
            &text,
            "workloads[0].systemd_user_unit",
            3,
            21,
            "must end in",
        );
        let text =
            workload("name = \"j\"\ncgroup = \"a\"\nsystemd_user_unit = \"j.service\"\nuid = 5\n");
        one_error(&text, "workloads[0].systemd_user_unit", 4, 21, "both given");
        let text = workload("name = \"j\"\nsystemd_unit = \"j.service\"\nuid = 5\n");
        one_error(
            &text,
            "workloads[0].uid",
            4,
            7,
            "belongs with `systemd_user_unit`",
        );
        let text = workload("name = \"j\"\nsystemd_unit = \"j.service\"\nmatch_delegated = true\n");
        one_error(
            &text,
            "workloads[0].match_delegated",
            4,
            19,
            "belongs with `cgroup`",
        );
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

    // ---- helpers the limits tests share (validate/limits.rs) ----

    pub(super) fn rate(per_second: f64, burst: u64) -> Option<ConnectionRate> {
        Some(ConnectionRate { per_second, burst })
    }

    pub(super) fn bandwidth(bytes_per_second: u64, burst_bytes: u64) -> Option<Bandwidth> {
        Some(Bandwidth {
            bytes_per_second,
            burst_bytes,
        })
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
