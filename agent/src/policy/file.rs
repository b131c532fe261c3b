//! The serde mirror of the policy TOML, and of the catalog's providers.toml.
//!
//! These structs only give the text a shape: unknown keys and wrong types
//! are rejected here (`deny_unknown_fields`), everything else is checked by
//! `validate`. Values that need checking are [`Spanned`] so an error can name
//! the line and column of the value; enum-like strings stay strings so the
//! error can list the accepted words. A key left out is `None` or empty;
//! `validate` applies the defaults (its `DEFAULT_*` constants).

use serde::Deserialize;
use toml::Spanned;

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
    #[serde(default)]
    pub defaults: DefaultsFile,
    #[serde(default)]
    pub resolver: ResolverFile,
    #[serde(default)]
    pub providers: Vec<Spanned<ProviderFile>>,
    #[serde(default)]
    pub workloads: Vec<Spanned<WorkloadFile>>,
}

/// `[defaults]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DefaultsFile {
    pub llm: Option<Spanned<String>>,
    pub other: Option<Spanned<String>>,
}

/// `[resolver]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ResolverFile {
    #[serde(default)]
    pub servers: Vec<Spanned<String>>,
    pub refresh_seconds: Option<Spanned<i64>>,
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
    #[serde(default)]
    pub allow: Vec<Spanned<String>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
    pub llm: Option<Spanned<String>>,
    pub other: Option<Spanned<String>>,
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
