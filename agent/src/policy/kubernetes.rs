//! The Kubernetes parts of a policy: the `[kubernetes]` table (where the
//! agent lists the pods of its node, see `crate::attribution::kube`) and the syntax of
//! the values a workload's `k8s` selector holds (namespace, label keys and
//! values, as the API server accepts them). `validate` calls these checks
//! and reports their errors with line and column; nothing here talks to a
//! cluster.

use std::{path::PathBuf, time::Duration};

use super::{KubeEnabled, KubernetesConfig};

/// Where a pod's service account token is mounted.
pub(super) const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// The cluster CA that signed the API server's certificate, beside the token.
pub(super) const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
pub(super) const DEFAULT_REFRESH_SECONDS: u64 = 30;
pub(super) const MAX_REFRESH_SECONDS: i64 = 3_600;
pub(super) const ENABLED: &[(&str, KubeEnabled)] = &[
    ("auto", KubeEnabled::Auto),
    ("on", KubeEnabled::On),
    ("off", KubeEnabled::Off),
];

const MAX_SUBDOMAIN_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// An empty `[kubernetes]` table: on inside a pod (auto), the in-cluster
/// API server, `NODE_NAME`, the pod's service account files, 30 s refresh.
impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: KubeEnabled::Auto,
            api_server: None,
            node_name: None,
            token_file: PathBuf::from(DEFAULT_TOKEN_FILE),
            ca_file: PathBuf::from(DEFAULT_CA_FILE),
            refresh: Duration::from_secs(DEFAULT_REFRESH_SECONDS),
        }
    }
}

/// `https://host[:port][/prefix]`, without a trailing `/`. Only HTTPS: the
/// agent sends its service account token.
pub(super) fn api_server(s: &str) -> Result<String, String> {
    let shape = "an https:// URL (like https://10.96.0.1:443 or https://api.cluster.example:6443)";
    let Some(rest) = s.strip_prefix("https://") else {
        return Err(format!("must be {shape}"));
    };
    let rest = rest.trim_end_matches('/');
    if rest
        .chars()
        .any(|c| c.is_whitespace() || "?#@\\".contains(c))
    {
        return Err(format!("must be {shape}, without user, query or fragment"));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (ip, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("must be {shape}"))?;
            ip.parse::<std::net::Ipv6Addr>()
                .map_err(|_| format!("{ip:?} is not an IPv6 address"))?;
            (ip, after.strip_prefix(':'))
        }
        None => match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err(format!("no host: must be {shape}"));
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(1..))
    {
        return Err(format!("port {port:?} is not a port (1 to 65535)"));
    }
    Ok(format!("https://{rest}"))
}

/// A DNS subdomain name (RFC 1123): node names, label key prefixes.
fn subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_SUBDOMAIN_LEN {
        return Err(format!("must be 1 to {MAX_SUBDOMAIN_LEN} characters"));
    }
    for part in s.split('.') {
        dns_label(part).map_err(|e| format!("{part:?}: {e}"))?;
    }
    Ok(())
}

/// A DNS label (RFC 1123): namespaces, parts of subdomain names.
fn dns_label(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > MAX_LABEL_LEN {
        return Err(format!("must be 1 to {MAX_LABEL_LEN} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err("only lower-case letters, digits and '-' are allowed".to_owned());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit".to_owned());
    }
    Ok(())
}

pub(super) fn node_name(s: &str) -> Result<String, String> {
    subdomain(s).map_err(|e| format!("not a Kubernetes node name: {e}"))?;
    Ok(s.to_owned())
}

pub(super) fn namespace(s: &str) -> Result<String, String> {
    dns_label(s).map_err(|e| format!("not a Kubernetes namespace: {e}"))?;
    Ok(s.to_owned())
}

/// A label name or value: at most 63 of letters, digits, `-`, `_`, `.`,
/// starting and ending with a letter or digit (a value may be empty).
fn label_part(s: &str) -> Result<(), String> {
    if s.len() > MAX_LABEL_LEN {
        return Err(format!("longer than {MAX_LABEL_LEN} characters"));
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed".to_owned());
    }
    let edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    if !edge(s.chars().next()) || !edge(s.chars().last()) {
        return Err("must start and end with a letter or digit".to_owned());
    }
    Ok(())
}

/// A label key: `name` or `prefix/name` (`app.kubernetes.io/name`).
pub(super) fn label_key(s: &str) -> Result<String, String> {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    if let Some(prefix) = prefix {
        subdomain(prefix)
            .map_err(|e| format!("label key prefix {prefix:?} is not a DNS subdomain: {e}"))?;
    }
    if name.is_empty() {
        return Err("empty label name".to_owned());
    }
    label_part(name).map_err(|e| format!("not a label key: {e}"))?;
    Ok(s.to_owned())
}

pub(super) fn label_value(s: &str) -> Result<String, String> {
    label_part(s).map_err(|e| format!("not a label value: {e}"))?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::policy::{PodSelector, Policy, Selector};

    fn errors(text: &str) -> Vec<(String, usize, usize, String)> {
        match Policy::parse(text, "t.toml") {
            Ok(_) => panic!("should be invalid:\n{text}"),
            Err(e) => {
                e.0.into_iter()
                    .map(|e| (e.key, e.line, e.column, e.message))
                    .collect()
            }
        }
    }

    #[track_caller]
    fn one_error(text: &str, key: &str, line: usize, column: usize, message: &str) {
        let errors = errors(text);
        let [(k, l, c, m)] = errors.as_slice() else {
            panic!("expected one error, got {errors:?}\n{text}")
        };
        assert_eq!((k.as_str(), *l, *c), (key, line, column), "{m}");
        assert!(m.contains(message), "{m:?} lacks {message:?}");
    }

    fn ok(text: &str) -> Policy {
        Policy::parse(text, "t.toml").unwrap_or_else(|e| panic!("should be valid:\n{e}\n{text}"))
    }

    #[test]
    fn empty_table_has_the_documented_defaults() {
        let k = ok("").kubernetes;
        assert_eq!(k, KubernetesConfig::default());
        assert_eq!(k.enabled, KubeEnabled::Auto);
        assert_eq!(
            k.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert_eq!(
            k.ca_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
        );
        assert_eq!(k.refresh, Duration::from_secs(30));
    }

    #[test]
    fn full_table_parses() {
        let k = ok(r#"
[kubernetes]
enabled = "on"
api_server = "https://10.96.0.1:443/"
node_name = "node-1.example"
token_file = "/run/token"
ca_file = "/run/ca.crt"
refresh_seconds = 5
"#)
        .kubernetes;
        assert_eq!(k.enabled, KubeEnabled::On);
        assert_eq!(k.api_server.as_deref(), Some("https://10.96.0.1:443"));
        assert_eq!(k.node_name.as_deref(), Some("node-1.example"));
        assert_eq!(
            (k.token_file, k.ca_file),
            (PathBuf::from("/run/token"), PathBuf::from("/run/ca.crt"))
        );
        assert_eq!(k.refresh, Duration::from_secs(5));
    }

    #[test]
    fn table_errors_name_key_line_and_column() {
        one_error(
            "[kubernetes]\nenabled = \"yes\"\n",
            "kubernetes.enabled",
            2,
            11,
            "expected one of \"auto\", \"on\", \"off\"",
        );
        one_error(
            "[kubernetes]\napi_server = \"http://10.0.0.1\"\n",
            "kubernetes.api_server",
            2,
            14,
            "https://",
        );
        one_error(
            "[kubernetes]\napi_server = \"https://:443\"\n",
            "kubernetes.api_server",
            2,
            14,
            "no host",
        );
        one_error(
            "[kubernetes]\napi_server = \"https://h:0\"\n",
            "kubernetes.api_server",
            2,
            14,
            "not a port",
        );
        one_error(
            "[kubernetes]\nnode_name = \"Node_1\"\n",
            "kubernetes.node_name",
            2,
            13,
            "not a Kubernetes node name",
        );
        one_error(
            "[kubernetes]\ntoken_file = \"token\"\n",
            "kubernetes.token_file",
            2,
            14,
            "absolute",
        );
        one_error(
            "[kubernetes]\nca_file = \"ca.crt\"\n",
            "kubernetes.ca_file",
            2,
            11,
            "absolute",
        );
        one_error(
            "[kubernetes]\nrefresh_seconds = 0\n",
            "kubernetes.refresh_seconds",
            2,
            19,
            "1 to 3600",
        );
        one_error(
            "[kubernetes]\nrefresh_seconds = 3601\n",
            "kubernetes.refresh_seconds",
            2,
            19,
            "1 to 3600",
        );
        one_error(
            "[kubernetes]\nwatch = true\n",
            "kubernetes.watch",
            2,
            1,
            "unknown field",
        );
    }

    #[test]
    fn api_server_shapes() {
        assert_eq!(
            api_server("https://[fd00::1]:6443"),
            Ok("https://[fd00::1]:6443".into())
        );
        assert_eq!(
            api_server("https://api.example/prefix/"),
            Ok("https://api.example/prefix".into())
        );
        assert!(api_server("https://[fd00::1:6443").is_err());
        assert!(api_server("https://user@h").is_err());
        assert!(api_server("10.0.0.1:443").is_err());
    }

    #[test]
    fn label_keys_and_values() {
        assert!(label_key("app").is_ok());
        assert!(label_key("app.kubernetes.io/name").is_ok());
        assert!(label_key("A_b.c-D").is_ok());
        assert!(label_key("-app").is_err());
        assert!(
            label_key("Example.com/app").is_err(),
            "prefixes are lower case"
        );
        assert!(label_key("example.com/").is_err());
        assert!(label_key(&"a".repeat(64)).is_err());
        assert!(label_value("").is_ok(), "an empty value is a value");
        assert!(label_value("v1.2_3").is_ok());
        assert!(label_value("a b").is_err());
        assert!(label_value("a.").is_err());
    }

    const W: &str = "[[workloads]]\nname = \"bot\"\n";

    #[test]
    fn k8s_selectors_parse() {
        let p = ok(&format!(
            "{W}k8s = {{ namespace = \"support\", labels = {{ app = \"bot\", \"app.kubernetes.io/part-of\" = \"x\" }} }}\n"
        ));
        let labels = BTreeMap::from([
            ("app".to_owned(), "bot".to_owned()),
            ("app.kubernetes.io/part-of".to_owned(), "x".to_owned()),
        ]);
        assert_eq!(
            p.workloads[0].selector,
            Selector::Kubernetes(PodSelector {
                namespace: Some("support".into()),
                labels
            })
        );
        let p = ok(&format!("{W}k8s = {{ namespace = \"support\" }}\n"));
        assert_eq!(
            p.workloads[0].selector,
            Selector::Kubernetes(PodSelector {
                namespace: Some("support".into()),
                labels: BTreeMap::new()
            })
        );
        let p = ok(&format!("{W}[workloads.k8s.labels]\napp = \"bot\"\n"));
        let Selector::Kubernetes(s) = &p.workloads[0].selector else {
            panic!("{:?}", p.workloads[0].selector)
        };
        assert_eq!((s.namespace.as_deref(), s.labels.len()), (None, 1));
    }

    #[test]
    fn k8s_selector_errors() {
        // `k8s = {}` has no position of its own: the workload's table is named.
        one_error(
            &format!("{W}k8s = {{}}\n"),
            "workloads[0].k8s",
            1,
            1,
            "needs `namespace` or `labels`",
        );
        one_error(
            &format!("{W}k8s = {{ labels = {{}} }}\n"),
            "workloads[0].k8s",
            3,
            18,
            "needs `namespace` or `labels`",
        );
        one_error(
            &format!("{W}k8s = {{ namespace = \"Support\" }}\n"),
            "workloads[0].k8s.namespace",
            3,
            21,
            "not a Kubernetes namespace",
        );
        one_error(
            &format!("{W}k8s = {{ labels = {{ \"-app\" = \"bot\" }} }}\n"),
            "workloads[0].k8s.labels.-app",
            3,
            29,
            "\"-app\": not a label key",
        );
        one_error(
            &format!("{W}k8s = {{ labels = {{ app = \"b ot\" }} }}\n"),
            "workloads[0].k8s.labels.app",
            3,
            26,
            "not a label value",
        );
        one_error(
            &format!("{W}k8s = {{ name = \"x\" }}\n"),
            "workloads[0].k8s.name",
            3,
            9,
            "unknown field",
        );
        one_error(
            &format!("{W}cgroup = \"pods/*\"\nk8s = {{ namespace = \"a\" }}\n"),
            "workloads[0].k8s",
            4,
            21,
            "both given",
        );
        one_error(
            &format!("{W}systemd_unit = \"a.service\"\nk8s = {{ namespace = \"a\" }}\n"),
            "workloads[0].k8s",
            4,
            21,
            "both given",
        );
        one_error(
            &format!("[kubernetes]\nenabled = \"off\"\n{W}k8s = {{ namespace = \"a\" }}\n"),
            "workloads[0].k8s",
            5,
            21,
            "[kubernetes] enabled = \"off\"",
        );
    }

    #[test]
    fn identical_k8s_selectors() {
        let text = format!(
            "{W}k8s = {{ namespace = \"a\", labels = {{ x = \"1\", y = \"2\" }} }}\n\
             [[workloads]]\nname = \"b\"\nk8s = {{ labels = {{ y = \"2\", x = \"1\" }}, namespace = \"a\" }}\n"
        );
        one_error(
            &text,
            "workloads[1].k8s",
            6,
            18,
            "workload `bot` has the same selector",
        );
        // A different namespace, or labels of a different value: different selectors.
        ok(&format!(
            "{W}k8s = {{ namespace = \"a\" }}\n[[workloads]]\nname = \"b\"\nk8s = {{ namespace = \"b\" }}\n"
        ));
    }
}
