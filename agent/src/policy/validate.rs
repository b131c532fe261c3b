//! From the serde mirror (`file`) to a validated [`Policy`].
//!
//! Every check records its error and carries on with a fallback value, so
//! one run reports every problem of a file; a policy with any error is
//! rejected as a whole. Each error names the line and column of the value it
//! is about (from `toml::Spanned`), its dotted key and the value as written.
//! The built-in catalog (`crate::catalog`) is parsed with the same checks,
//! and merged here with the policy's `[[providers]]`.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::GlobBuilder;
use ipnet::IpNet;
use llm_egress_common::MAX_PORTS;
use toml::Spanned;

use super::{
    Action, AuditLog, Defaults, FailureMode, Mode, NO_WORKLOAD_NAME, OnExit, Policy, PolicyError,
    PolicyErrors, Provider, ResolverConfig, Selector, Target, Workload,
    error::line_column,
    file::{CatalogFile, PolicyFile, ProviderFile, WorkloadFile},
};

// The defaults of the keys a policy leaves out (docs/policy.md lists them).
const DEFAULT_MODE: Mode = Mode::Enforce;
const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9469));
const DEFAULT_PIN_PATH: &str = "/sys/fs/bpf/llm-egress";
const DEFAULT_FAILURE_MODE: FailureMode = FailureMode::Closed;
const DEFAULT_ON_EXIT: OnExit = OnExit::Detach;
/// `defaults.llm`, and a workload's `llm` (which does not inherit
/// `defaults.llm`: naming a workload means listing what it may reach).
const DEFAULT_LLM: Action = Action::Deny;
/// `defaults.other`; a workload's `other` defaults to `defaults.other`.
const DEFAULT_OTHER: Action = Action::Allow;
const DEFAULT_REFRESH_SECONDS: u64 = 30;
const MAX_REFRESH_SECONDS: i64 = 86_400;
/// Port of a resolver server given without one.
const DNS_PORT: u16 = 53;
const MAX_NAME_LEN: usize = 64;
const MAX_HOST_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

const MODES: &[(&str, Mode)] = &[("enforce", Mode::Enforce), ("audit", Mode::Audit)];
const ACTIONS: &[(&str, Action)] =
    &[("allow", Action::Allow), ("deny", Action::Deny), ("audit", Action::Audit)];
const FAILURE_MODES: &[(&str, FailureMode)] =
    &[("closed", FailureMode::Closed), ("open", FailureMode::Open)];
const ON_EXITS: &[(&str, OnExit)] = &[("detach", OnExit::Detach), ("keep", OnExit::Keep)];
const UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".slice", ".socket"];

impl Policy {
    /// Reads and validates the policy file at `path`.
    pub fn from_path(path: &Path) -> Result<Policy, PolicyErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            PolicyErrors(vec![PolicyError::whole_file(&origin, format!("cannot read the policy: {e}"))])
        })?;
        Self::parse(&text, &origin)
    }

    /// Validates policy `text`; `origin` names it in errors (a path).
    pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyErrors> {
        let file: PolicyFile =
            toml::from_str(text).map_err(|e| PolicyErrors(vec![toml_error(origin, text, &e)]))?;
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
    pub fn provider_id(&self, name: &str) -> Option<u32> {
        let index = self.providers.iter().position(|p| p.name == name)?;
        u32::try_from(index + 1).ok()
    }

    /// Id of workload `name` in the kernel maps: its index + 1.
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
        let file: CatalogFile =
            toml::from_str(text).map_err(|e| PolicyErrors(vec![toml_error(origin, text, &e)]))?;
        let mut c = Checker::new(origin, text);
        let mut out = Vec::new();
        let mut names = HashMap::new();
        let mut claims = Claims::default();
        for (i, entry) in file.provider.iter().enumerate() {
            let key = format!("provider[{i}]");
            let e = entry.get_ref();
            let mut ok = c.check(&e.name, &format!("{key}.name"), |n| provider_name(n)).is_some();
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
        Self { origin, text, errors: Vec::new() }
    }

    /// `value` on error, or the errors sorted by position.
    fn finish<T>(mut self, value: T) -> Result<T, PolicyErrors> {
        if self.errors.is_empty() {
            return Ok(value);
        }
        let origin = self.origin;
        self.errors.sort_by_key(|e| (e.origin == origin, e.line, e.column));
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
        let cgroup = f.cgroup.as_ref().and_then(|v| self.check(v, "cgroup", |s| absolute(s)));
        let metrics_listen = match &f.metrics_listen {
            None => Some(DEFAULT_METRICS_LISTEN),
            Some(v) => self.check(v, "metrics_listen", |s| metrics_listen(s)).flatten(),
        };
        let audit_log = match &f.audit_log {
            None => AuditLog::Stdout,
            Some(v) => self.check(v, "audit_log", |s| audit_log(s)).unwrap_or(AuditLog::Off),
        };
        let pin_path = f.pin_path.as_ref().and_then(|v| self.check(v, "pin_path", |s| absolute(s)));
        let failure_mode =
            self.choice(f.failure_mode.as_ref(), "failure_mode", FAILURE_MODES, DEFAULT_FAILURE_MODE);
        let on_exit = self.choice(f.on_exit.as_ref(), "on_exit", ON_EXITS, DEFAULT_ON_EXIT);
        let defaults = Defaults {
            llm: self.choice(f.defaults.llm.as_ref(), "defaults.llm", ACTIONS, DEFAULT_LLM),
            other: self.choice(f.defaults.other.as_ref(), "defaults.other", ACTIONS, DEFAULT_OTHER),
        };
        let resolver = self.resolver(f);
        let merged = self.providers(&f.providers, catalog);
        let workloads = self.workloads(&f.workloads, &merged, defaults.other);
        Policy {
            mode,
            cgroup,
            metrics_listen,
            audit_log,
            pin_path: pin_path.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_PATH)),
            failure_mode,
            on_exit,
            defaults,
            resolver,
            providers: merged.providers,
            workloads,
        }
    }

    fn resolver(&mut self, f: &PolicyFile) -> ResolverConfig {
        let r = &f.resolver;
        let servers = (r.servers.iter().enumerate())
            .filter_map(|(i, s)| self.check(s, &format!("resolver.servers[{i}]"), |s| server(s)))
            .collect();
        let refresh_seconds = r.refresh_seconds.as_ref().and_then(|v| {
            self.check(v, "resolver.refresh_seconds", |&n| {
                if (1..=MAX_REFRESH_SECONDS).contains(&n) {
                    Ok(n.unsigned_abs())
                } else {
                    Err(format!("must be 1 to {MAX_REFRESH_SECONDS} (seconds)"))
                }
            })
        });
        let refresh = Duration::from_secs(refresh_seconds.unwrap_or(DEFAULT_REFRESH_SECONDS));
        ResolverConfig { servers, refresh }
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
            let mut ok = self.check(&p.name, &format!("{key}.name"), |n| provider_name(n)).is_some();
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
        for b in catalog.iter().filter(|b| !replaced.contains(b.name.as_str())) {
            claims.hosts.extend(b.hosts.iter().map(|h| (h.clone(), b.name.clone())));
            claims.cidrs.extend(b.cidrs.iter().map(|c| (*c, b.name.clone())));
        }
        for i in enabled {
            let p = entries[i].get_ref();
            self.claim(&mut claims, p.name.get_ref(), &format!("providers[{i}]"), &p.hosts, &p.cidrs);
        }
        let providers = slots.into_iter().flatten().chain(added).collect();
        Merged { providers, unusable }
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
        let mut p = Provider { name: name.to_owned(), hosts: vec![], cidrs: vec![], ports: vec![] };
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
            let Ok(normal) = host(h.get_ref()) else { continue };
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
            let selector = match (&w.cgroup, &w.systemd_unit) {
                (None, None) => {
                    let message = "needs a selector: `cgroup` (a glob of cgroup paths) or `systemd_unit`";
                    self.error_at(entry.span(), &key, message);
                    None
                }
                (Some(_), Some(unit)) => {
                    let message = "`cgroup` and `systemd_unit` both given; a workload has one selector";
                    self.error(unit, &format!("{key}.systemd_unit"), message);
                    None
                }
                (Some(glob), None) => self
                    .check(glob, &format!("{key}.cgroup"), |s| cgroup_glob(s))
                    .map(|g| (glob, ("cgroup", g))),
                (None, Some(unit)) => self
                    .check(unit, &format!("{key}.systemd_unit"), |s| systemd_unit(s))
                    .map(|u| (unit, ("systemd_unit", u))),
            };
            let selector = selector.and_then(|(value, (kind, s))| {
                if let Some(other) = selectors.get(&(kind, s.clone())) {
                    let message = format!("workload `{other}` has the same selector");
                    self.error(value, &format!("{key}.{kind}"), message);
                    return None;
                }
                selectors.insert((kind, s.clone()), name.clone());
                Some(if kind == "cgroup" { Selector::Cgroup(s) } else { Selector::SystemdUnit(s) })
            });
            let allow = self.targets(&w.allow, &format!("{key}.allow"), merged);
            let deny = self.targets(&w.deny, &format!("{key}.deny"), merged);
            for (j, target) in deny.iter().enumerate() {
                if target.is_some() && allow.contains(target) {
                    let message = "in both `allow` and `deny`";
                    self.error(&w.deny[j], &format!("{key}.deny[{j}]"), message);
                }
            }
            let llm = self.choice(w.llm.as_ref(), &format!("{key}.llm"), ACTIONS, DEFAULT_LLM);
            let other = self.choice(w.other.as_ref(), &format!("{key}.other"), ACTIONS, default_other);
            if let Some(selector) = selector {
                let (allow, deny) = (dedup(allow), dedup(deny));
                out.push(Workload { name: name.clone(), selector, allow, deny, llm, other });
            }
        }
        out
    }

    /// `allow`/`deny` entries, one per entry (None: invalid).
    fn targets(&mut self, list: &[Spanned<String>], key: &str, merged: &Merged) -> Vec<Option<Target>> {
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

fn dedup(targets: Vec<Option<Target>>) -> Vec<Target> {
    let mut out = Vec::new();
    for t in targets.into_iter().flatten() {
        push_new(&mut out, t);
    }
    out
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

fn absolute(s: &str) -> Result<PathBuf, String> {
    if Path::new(s).is_absolute() {
        Ok(PathBuf::from(s))
    } else {
        Err("must be an absolute path".to_owned())
    }
}

fn metrics_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| {
        "not a socket address (like 127.0.0.1:9469 or [::1]:9469) or \"off\"".to_owned()
    })
}

fn audit_log(s: &str) -> Result<AuditLog, String> {
    match s {
        "-" => Ok(AuditLog::Stdout),
        "off" => Ok(AuditLog::Off),
        _ if Path::new(s).is_absolute() => Ok(AuditLog::File(PathBuf::from(s))),
        _ => Err("expected \"-\" (stdout), \"off\" or an absolute path".to_owned()),
    }
}

/// A resolver server: `ip:port`, or `ip` for port 53.
fn server(s: &str) -> Result<SocketAddr, String> {
    let addr = match s.parse::<SocketAddr>() {
        Ok(addr) => addr,
        Err(_) => {
            let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
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
fn provider_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    if !s.chars().all(allowed) {
        return Err("only lower-case letters, digits, '-', '_' and '.' are allowed".to_owned());
    }
    if s == NO_WORKLOAD_NAME {
        return Err(format!("\"{NO_WORKLOAD_NAME}\" is reserved"));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err("looks like an IP address; `allow` and `deny` could not tell them apart".to_owned());
    }
    Ok(())
}

/// A workload name: 1 to 64 of `[A-Za-z0-9_.-]`, not "none".
fn workload_name(s: &str) -> Result<(), String> {
    if s.eq_ignore_ascii_case(NO_WORKLOAD_NAME) {
        return Err(format!("\"{NO_WORKLOAD_NAME}\" is reserved for processes in no workload"));
    }
    if s.is_empty() || s.len() > MAX_NAME_LEN {
        return Err(format!("must be 1 to {MAX_NAME_LEN} characters"));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err("only letters, digits, '_', '.' and '-' are allowed".to_owned());
    }
    Ok(())
}

/// A host name, lower-cased and without its trailing dot; `*.` in front
/// makes it a wildcard for every name below.
fn host(s: &str) -> Result<String, String> {
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
        if let Some(c) = label.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '-')) {
            return Err(if c == '*' {
                "a wildcard is only a leading \"*.\"".to_owned()
            } else {
                format!("{c:?} is not allowed: only letters, digits, '-' and '.' (IDNs in xn-- form)")
            });
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(format!("label \"{label}\" is longer than {MAX_LABEL_LEN} characters"));
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
fn cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    let net: IpNet = s.parse().map_err(|_| {
        "not an IP address or CIDR (like 10.0.0.0/8 or 2001:db8::/32)".to_owned()
    })?;
    if net.trunc() != net {
        return Err(format!("host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

fn port(n: i64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(0) => Err("port 0 is not a port (leave `ports` out for every port)".to_owned()),
        Ok(p) => Ok(p),
        Err(_) => Err("not a port (1 to 65535)".to_owned()),
    }
}

/// A workload's cgroup glob, relative to the attach cgroup, without a
/// trailing slash.
fn cgroup_glob(s: &str) -> Result<String, String> {
    if s.starts_with('/') {
        return Err("must be relative to the attach cgroup (`cgroup`): drop the leading '/'".to_owned());
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

fn systemd_unit(s: &str) -> Result<String, String> {
    if s.contains('/') || s.chars().any(char::is_whitespace) {
        return Err("a unit name (like app.service), not a path".to_owned());
    }
    if !UNIT_SUFFIXES.iter().any(|suffix| s.len() > suffix.len() && s.ends_with(suffix)) {
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

fn toml_error_key(text: &str, offset: usize, message: &str) -> String {
    let offset = (0..=offset.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
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
            table = name.trim().to_owned();
        }
    }
    let quoted = |prefix: &str| {
        message.strip_prefix(prefix).and_then(|m| m.split('`').next()).map(str::to_owned)
    };
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let on_line = text[line_start..offset].split_once('=').map(|(k, _)| k.trim().to_owned());
    let field = quoted("unknown field `").or_else(|| quoted("missing field `")).or(on_line);
    match field {
        Some(f) if table.is_empty() => f,
        Some(f) if !f.starts_with('[') => format!("{table}.{f}"),
        _ => table,
    }
}

