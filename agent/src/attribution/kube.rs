//! Pod metadata of this node, from the Kubernetes API server: pod uid →
//! name, namespace and labels, for `k8s` workload selectors
//! (`crate::attribution::cgroups`) and for the `pod_name`/`pod_namespace` of audit
//! records (`crate::events`).
//!
//! A cgroup path names a pod only by its uid (`crate::attribution::cgroup_info`); the
//! rest lives in the API server. One thread lists the pods bound to this
//! node, `GET {api}/api/v1/pods?fieldSelector=spec.nodeName={node}`, with
//! the pod's service account token, trusting only the cluster CA. It asks
//! for metadata only (`PartialObjectMetadataList`; an API server that does
//! not offer it sends the full `PodList`, which parses the same) and from
//! the watch cache (`resourceVersion=0`), so a list costs the API server
//! little. It lists again every `refresh_seconds`, and sooner (at most once
//! a second) when the cgroup scan finds a pod uid it does not know. When the
//! list changes the agent rescans its cgroups.
//!
//! A failure (unreachable, 401/403, bad JSON) is counted in
//! `llm_egress_kubernetes_errors_total`, logged once until a list succeeds
//! again, and never stops the agent: the last good list stays. This module
//! never writes kernel maps.

use std::{
    collections::{BTreeMap, HashMap},
    io::Read,
    path::PathBuf,
    sync::{Arc, RwLock, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::policy::{KubeEnabled, KubernetesConfig, PodSelector};

/// How long the agent waits for the first list before it applies its
/// policy (a reachable API server answers in milliseconds).
const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);
/// The shortest time between two lists (on-demand requests wait for it).
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A metadata list of a node's pods is some kB per pod; a full PodList of a
/// very busy node stays well below this.
const MAX_BODY: u64 = 64 << 20;
/// Metadata only, falling back to the full objects.
const ACCEPT: &str =
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json";
/// The annotation of a static pod's mirror: the uid the kubelet (and so the
/// cgroup path) uses for the pod.
const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What the agent knows of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub name: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Pod uid (with dashes, lower case) → metadata.
pub type PodMap = HashMap<String, Arc<PodMeta>>;

/// Whether `pod` is one that `sel` selects: its namespace (if given) and
/// every label, with the same value.
pub fn matches(sel: &PodSelector, pod: &PodMeta) -> bool {
    sel.namespace.as_ref().is_none_or(|ns| *ns == pod.namespace)
        && sel.labels.iter().all(|(k, v)| pod.labels.get(k) == Some(v))
}

/// The pod list, shared by the cgroup scan and the event readers.
#[derive(Clone, Default)]
pub struct Pods {
    map: Arc<RwLock<Arc<PodMap>>>,
    /// None: no pod source (not in a cluster, or disabled).
    refresh: Option<std_mpsc::SyncSender<()>>,
}

impl Pods {
    /// Whether a pod source runs (the agent is in a cluster, or told so).
    pub fn enabled(&self) -> bool {
        self.refresh.is_some()
    }

    /// The current list (empty until the first list succeeded).
    pub fn snapshot(&self) -> Arc<PodMap> {
        self.map.read().map(|g| g.clone()).unwrap_or_default()
    }

    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.map.read().ok()?.get(uid).cloned()
    }

    /// Asks for a list now (a pod uid was seen that the list lacks); the
    /// source lists at most once per [`MIN_INTERVAL`].
    pub fn request_refresh(&self) {
        if let Some(tx) = &self.refresh {
            let _ = tx.try_send(());
        }
    }

    fn replace(&self, map: PodMap) -> bool {
        let Ok(mut g) = self.map.write() else {
            return false;
        };
        if **g == map {
            return false;
        }
        *g = Arc::new(map);
        true
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("[kubernetes]: {0}")]
    Config(String),
    #[error("reading the service account token {0}: {1}")]
    Token(PathBuf, String),
    #[error("reading the cluster CA {0}: {1}")]
    Ca(PathBuf, String),
    #[error("TLS setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    #[error("GET {url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("GET {url}: not a pod list: {source}")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Where and how to list this node's pods.
#[derive(Clone, Debug, PartialEq)]
pub struct Endpoint {
    /// The full list URL.
    pub url: String,
    pub node: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
    pub refresh: Duration,
}

/// The endpoint of `cfg`, with what it leaves out taken from the pod's
/// environment (`env`: `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`,
/// `NODE_NAME`). `Ok(None)`: no pod source (off, or auto outside a cluster).
pub fn endpoint(
    cfg: &KubernetesConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Endpoint>, KubeError> {
    let host = env("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty());
    match cfg.enabled {
        KubeEnabled::Off => return Ok(None),
        KubeEnabled::Auto if host.is_none() => return Ok(None),
        _ => {}
    }
    let api = match (&cfg.api_server, host) {
        (Some(api), _) => api.clone(),
        (None, Some(host)) => {
            let port = env("KUBERNETES_SERVICE_PORT")
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "443".into());
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host
            };
            format!("https://{host}:{port}")
        }
        (None, None) => {
            return Err(KubeError::Config(
                "enabled = \"on\" but neither api_server nor KUBERNETES_SERVICE_HOST is set".into(),
            ));
        }
    };
    let node = cfg.node_name.clone().or_else(|| env("NODE_NAME").filter(|n| !n.is_empty())).ok_or_else(|| {
        KubeError::Config(
            "no node name: set NODE_NAME from the downward API (fieldRef spec.nodeName) or [kubernetes] node_name".into(),
        )
    })?;
    let selector = percent_encode(&format!("spec.nodeName={node}"));
    Ok(Some(Endpoint {
        url: format!("{api}/api/v1/pods?fieldSelector={selector}&resourceVersion=0"),
        node,
        token_file: cfg.token_file.clone(),
        ca_file: cfg.ca_file.clone(),
        refresh: cfg.refresh,
    }))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---- The list as the API server sends it (only what is used). ----

#[derive(Deserialize)]
struct ListFile {
    #[serde(default)]
    items: Option<Vec<ItemFile>>,
}

#[derive(Deserialize)]
struct ItemFile {
    metadata: MetaFile,
}

#[derive(Deserialize)]
struct MetaFile {
    name: String,
    #[serde(default)]
    namespace: String,
    uid: String,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// A `PodList` or `PartialObjectMetadataList` as uid → metadata; a static
/// pod's mirror is also found under the kubelet's uid.
pub fn parse_pod_list(json: &[u8]) -> Result<PodMap, serde_json::Error> {
    let list: ListFile = serde_json::from_slice(json)?;
    let mut map = PodMap::new();
    for item in list.items.unwrap_or_default() {
        let m = item.metadata;
        let meta = Arc::new(PodMeta {
            name: m.name,
            namespace: m.namespace,
            labels: m.labels.unwrap_or_default(),
        });
        if let Some(kubelet_uid) = m
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR_ANNOTATION))
        {
            map.insert(kubelet_uid.to_ascii_lowercase(), meta.clone());
        }
        map.insert(m.uid.to_ascii_lowercase(), meta);
    }
    Ok(map)
}

/// The `message` of a Kubernetes `Status` body, else the body's start.
fn status_message(body: &str) -> String {
    #[derive(Deserialize)]
    struct Status {
        message: String,
    }
    match serde_json::from_str::<Status>(body) {
        Ok(s) => s.message,
        Err(_) => body.chars().take(200).collect::<String>().trim().to_owned(),
    }
}

/// One list: token and CA are read again each time (the kubelet rotates
/// projected tokens).
fn fetch(ep: &Endpoint) -> Result<PodMap, KubeError> {
    let token = std::fs::read_to_string(&ep.token_file)
        .map_err(|e| KubeError::Token(ep.token_file.clone(), e.to_string()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(KubeError::Token(ep.token_file.clone(), "empty".into()));
    }
    let pem =
        std::fs::read(&ep.ca_file).map_err(|e| KubeError::Ca(ep.ca_file.clone(), e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| KubeError::Ca(ep.ca_file.clone(), e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| KubeError::Ca(ep.ca_file.clone(), e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(KubeError::Ca(
            ep.ca_file.clone(),
            "no certificate in it".into(),
        ));
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let agent = ureq::AgentBuilder::new()
        .tls_config(Arc::new(tls))
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build();
    let url = ep.url.clone();
    let response = agent
        .get(&url)
        .set("Authorization", &format!("Bearer {token}"))
        .set("Accept", ACCEPT)
        .call();
    let response = match response {
        Ok(r) => r,
        Err(ureq::Error::Status(status, r)) => {
            let message = status_message(&r.into_string().unwrap_or_default());
            return Err(KubeError::Status {
                url,
                status,
                message,
            });
        }
        Err(e) => {
            return Err(KubeError::Transport {
                url,
                message: e.to_string(),
            });
        }
    };
    let mut body = Vec::new();
    response
        .into_reader()
        .take(MAX_BODY)
        .read_to_end(&mut body)
        .map_err(|e| KubeError::Transport {
            url: url.clone(),
            message: e.to_string(),
        })?;
    parse_pod_list(&body).map_err(|source| KubeError::Json { url, source })
}

/// The series the pod list feeds (`llm_egress_kubernetes_errors_total`,
/// `llm_egress_kubernetes_pods`), handed in by the agent's registry.
#[derive(Clone)]
pub struct KubeMetrics {
    pub errors: prometheus::IntCounter,
    pub pods: prometheus::IntGauge,
}

/// Starts the pod source of `cfg` and waits (at most [`FIRST_LIST_WAIT`])
/// for its first list. The receiver gets `()` whenever the list changed.
/// Without a source (off, outside a cluster, a configuration the
/// environment cannot complete) the list stays empty.
pub async fn start(cfg: &KubernetesConfig, metrics: KubeMetrics) -> (Pods, mpsc::Receiver<()>) {
    let (changed_tx, changed_rx) = mpsc::channel(1);
    let ep = match endpoint(cfg, |k| std::env::var(k).ok()) {
        Ok(Some(ep)) => ep,
        Ok(None) => {
            debug!(
                "no Kubernetes pod source (not in a cluster, or [kubernetes] enabled = \"off\")"
            );
            return (Pods::default(), changed_rx);
        }
        Err(e) => {
            metrics.errors.inc();
            error!(error = %e, "no Kubernetes pod list: k8s workload selectors select nothing, and records have no pod names");
            return (Pods::default(), changed_rx);
        }
    };
    let (refresh_tx, refresh_rx) = std_mpsc::sync_channel(1);
    let pods = Pods {
        map: Arc::default(),
        refresh: Some(refresh_tx),
    };
    let (first_tx, first_rx) = oneshot::channel();
    let source = pods.clone();
    info!(url = %ep.url, node = %ep.node, refresh = ?ep.refresh, "listing this node's pods from the Kubernetes API");
    let spawned = std::thread::Builder::new()
        .name("kube-pods".into())
        .spawn(move || run(&ep, &source, &metrics, &changed_tx, &refresh_rx, first_tx));
    match spawned {
        Ok(_) => {
            let _ = tokio::time::timeout(FIRST_LIST_WAIT, first_rx).await;
        }
        Err(e) => error!(error = %e, "cannot start the Kubernetes pod list thread"),
    }
    (pods, changed_rx)
}

/// The list loop: list, publish, wait for the period or a request.
fn run(
    ep: &Endpoint,
    pods: &Pods,
    metrics: &KubeMetrics,
    changed: &mpsc::Sender<()>,
    requests: &std_mpsc::Receiver<()>,
    first: oneshot::Sender<()>,
) {
    let mut first = Some(first);
    let mut failures = 0u64;
    loop {
        let started = Instant::now();
        match fetch(ep) {
            Ok(map) => {
                if failures > 0 {
                    info!(failures, "the Kubernetes API answers again");
                }
                failures = 0;
                let distinct: std::collections::HashSet<*const PodMeta> =
                    map.values().map(Arc::as_ptr).collect();
                metrics.pods.set(distinct.len() as i64);
                let n = map.len();
                if pods.replace(map) {
                    debug!(uids = n, "pod list changed");
                    let _ = changed.try_send(());
                }
            }
            Err(e) => {
                metrics.errors.inc();
                if failures == 0 {
                    warn!(error = %e, "cannot list this node's pods; keeping the last list (logged again only after a success)");
                } else {
                    debug!(error = %e, failures, "listing pods still fails");
                }
                failures += 1;
            }
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(());
        }
        match requests.recv_timeout(ep.refresh.saturating_sub(started.elapsed())) {
            Ok(()) => std::thread::sleep(MIN_INTERVAL.saturating_sub(started.elapsed())),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {}
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        // Requests that came meanwhile are served by this list.
        while requests.try_recv().is_ok() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PodList as `kubectl get --raw '/api/v1/pods?fieldSelector=spec.nodeName=node-1'`
    /// prints it (trimmed of most spec and status fields), with a static
    /// pod's mirror.
    const POD_LIST: &str = r#"{
  "kind": "PodList",
  "apiVersion": "v1",
  "metadata": {"resourceVersion": "184467"},
  "items": [
    {
      "metadata": {
        "name": "support-bot-7c9f8d6b5-x2k4q",
        "generateName": "support-bot-7c9f8d6b5-",
        "namespace": "support",
        "uid": "0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d",
        "resourceVersion": "184401",
        "creationTimestamp": "2026-11-25T16:02:11Z",
        "labels": {"app": "bot", "pod-template-hash": "7c9f8d6b5", "app.kubernetes.io/part-of": "support"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "support-bot-7c9f8d6b5", "uid": "5d1c7e0a-1111-4a4a-9b9b-222222222222", "controller": true, "blockOwnerDeletion": true}],
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2026-11-25T16:02:11Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
      },
      "spec": {
        "containers": [{"name": "bot", "image": "registry.example/bot:1.4", "resources": {"requests": {"cpu": "100m"}}}],
        "nodeName": "node-1",
        "serviceAccountName": "default"
      },
      "status": {
        "phase": "Running",
        "qosClass": "Burstable",
        "podIP": "10.244.1.17",
        "containerStatuses": [{"name": "bot", "containerID": "containerd://4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b", "ready": true, "restartCount": 0}]
      }
    },
    {
      "metadata": {
        "name": "coredns-5d78c9869d-8qj2m",
        "namespace": "kube-system",
        "uid": "A1B2C3D4-0000-4000-8000-00000000000F",
        "labels": {"k8s-app": "kube-dns"}
      },
      "spec": {"nodeName": "node-1"},
      "status": {"phase": "Running", "qosClass": "Burstable"}
    },
    {
      "metadata": {
        "name": "etcd-node-1",
        "namespace": "kube-system",
        "uid": "9f0e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f",
        "labels": {"component": "etcd", "tier": "control-plane"},
        "annotations": {
          "kubernetes.io/config.hash": "5fc3b7ec1ba3ab0e5e4ae1b4ad0d1f47",
          "kubernetes.io/config.mirror": "5fc3b7ec1ba3ab0e5e4ae1b4ad0d1f47",
          "kubernetes.io/config.source": "file"
        }
      },
      "spec": {"nodeName": "node-1"},
      "status": {"phase": "Running", "qosClass": "Burstable"}
    },
    {
      "metadata": {"name": "no-labels", "namespace": "default", "uid": "11111111-2222-4333-8444-555555555555"},
      "spec": {"nodeName": "node-1"}
    }
  ]
}"#;

    #[test]
    fn a_realistic_pod_list_parses_into_uids() {
        let map = parse_pod_list(POD_LIST.as_bytes()).unwrap();
        assert_eq!(
            map.len(),
            5,
            "four pods, the static one also under its kubelet uid: {map:?}"
        );
        let bot = &map["0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d"];
        assert_eq!(
            (bot.name.as_str(), bot.namespace.as_str()),
            ("support-bot-7c9f8d6b5-x2k4q", "support")
        );
        assert_eq!(bot.labels.get("app").map(String::as_str), Some("bot"));
        assert_eq!(bot.labels.len(), 3);
        assert_eq!(
            map["a1b2c3d4-0000-4000-8000-00000000000f"].name, "coredns-5d78c9869d-8qj2m",
            "uids are lower-cased"
        );
        assert_eq!(
            map["5fc3b7ec1ba3ab0e5e4ae1b4ad0d1f47"].name, "etcd-node-1",
            "static pod by the kubelet's uid"
        );
        assert_eq!(
            map["9f0e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f"].name,
            "etcd-node-1"
        );
        assert!(
            map["11111111-2222-4333-8444-555555555555"]
                .labels
                .is_empty()
        );
    }

    #[test]
    fn metadata_only_and_empty_lists_parse() {
        let partial = r#"{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{"resourceVersion":"9"},
            "items":[{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{"name":"a","namespace":"ns","uid":"u-1","labels":{"x":"y"}}}]}"#;
        let map = parse_pod_list(partial.as_bytes()).unwrap();
        assert_eq!(map["u-1"].labels["x"], "y");
        assert!(
            parse_pod_list(br#"{"kind":"PodList","items":[]}"#)
                .unwrap()
                .is_empty()
        );
        assert!(
            parse_pod_list(br#"{"kind":"PodList","metadata":{},"items":null}"#)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_lists_are_errors() {
        assert!(parse_pod_list(b"<html>proxy error</html>").is_err());
        assert!(
            parse_pod_list(br#"{"items":[{"metadata":{"namespace":"x"}}]}"#).is_err(),
            "no name or uid"
        );
        assert!(parse_pod_list(br#"{"items":{}}"#).is_err());
    }

    #[test]
    fn status_bodies_give_their_message() {
        let forbidden = r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"pods is forbidden: User \"system:serviceaccount:llm-egress:llm-egress\" cannot list resource \"pods\" in API group \"\" at the cluster scope","reason":"Forbidden","details":{"kind":"pods"},"code":403}"#;
        assert!(status_message(forbidden).starts_with("pods is forbidden: User"));
        assert_eq!(status_message("Unauthorized\n"), "Unauthorized");
    }

    fn pod(ns: &str, labels: &[(&str, &str)]) -> PodMeta {
        PodMeta {
            name: "p".into(),
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn sel(ns: Option<&str>, labels: &[(&str, &str)]) -> PodSelector {
        PodSelector {
            namespace: ns.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn selectors_match_namespace_and_every_label() {
        let bot = pod("support", &[("app", "bot"), ("tier", "web")]);
        assert!(matches(&sel(Some("support"), &[]), &bot));
        assert!(matches(&sel(Some("support"), &[("app", "bot")]), &bot));
        assert!(matches(
            &sel(None, &[("app", "bot"), ("tier", "web")]),
            &bot
        ));
        assert!(
            !matches(&sel(Some("default"), &[("app", "bot")]), &bot),
            "namespace differs"
        );
        assert!(
            !matches(&sel(Some("support"), &[("app", "bot"), ("x", "y")]), &bot),
            "all labels must match"
        );
        assert!(
            !matches(&sel(None, &[("app", "Bot")]), &bot),
            "values are case-sensitive"
        );
        assert!(
            !matches(&sel(None, &[("app", "")]), &pod("support", &[])),
            "an absent label is not an empty one"
        );
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.get(k).cloned()
    }

    #[test]
    fn endpoint_from_the_pod_environment() {
        let cfg = KubernetesConfig::default();
        assert_eq!(
            endpoint(&cfg, env(&[])).unwrap(),
            None,
            "auto outside a cluster"
        );
        let in_pod = env(&[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
            ("NODE_NAME", "node-1"),
        ]);
        let ep = endpoint(&cfg, &in_pod).unwrap().unwrap();
        assert_eq!(
            ep.url,
            "https://10.96.0.1:443/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1&resourceVersion=0"
        );
        assert_eq!(
            ep.token_file,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        let v6 = endpoint(
            &cfg,
            env(&[("KUBERNETES_SERVICE_HOST", "fd00::1"), ("NODE_NAME", "n")]),
        )
        .unwrap()
        .unwrap();
        assert!(
            v6.url.starts_with("https://[fd00::1]:443/api/v1/pods?"),
            "{}",
            v6.url
        );
        let off = KubernetesConfig {
            enabled: KubeEnabled::Off,
            ..cfg.clone()
        };
        assert_eq!(endpoint(&off, &in_pod).unwrap(), None);
        let on = KubernetesConfig {
            enabled: KubeEnabled::On,
            api_server: Some("https://127.0.0.1:6443".into()),
            node_name: Some("kind-worker".into()),
            ..cfg.clone()
        };
        let ep = endpoint(&on, env(&[])).unwrap().unwrap();
        assert_eq!(
            ep.url,
            "https://127.0.0.1:6443/api/v1/pods?fieldSelector=spec.nodeName%3Dkind-worker&resourceVersion=0"
        );
        let no_node = endpoint(&cfg, env(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")])).unwrap_err();
        assert!(no_node.to_string().contains("NODE_NAME"), "{no_node}");
        let on_nowhere = KubernetesConfig {
            enabled: KubeEnabled::On,
            ..cfg
        };
        assert!(endpoint(&on_nowhere, env(&[("NODE_NAME", "n")])).is_err());
    }

    #[test]
    fn fetch_errors_name_the_file_or_url() {
        let dir = tempfile::tempdir().unwrap();
        let ep = Endpoint {
            url: "https://127.0.0.1:1/api/v1/pods".into(),
            node: "n".into(),
            token_file: dir.path().join("token"),
            ca_file: dir.path().join("ca.crt"),
            refresh: Duration::from_secs(30),
        };
        assert!(matches!(fetch(&ep), Err(KubeError::Token(..))));
        std::fs::write(&ep.token_file, "t0k\n").unwrap();
        assert!(matches!(fetch(&ep), Err(KubeError::Ca(..))), "missing CA");
        std::fs::write(&ep.ca_file, "not a pem").unwrap();
        assert!(
            matches!(fetch(&ep), Err(KubeError::Ca(..))),
            "no certificate in the CA file"
        );
    }

    #[test]
    fn pods_replace_reports_changes_only() {
        let pods = Pods::default();
        assert!(!pods.enabled());
        let map = parse_pod_list(POD_LIST.as_bytes()).unwrap();
        assert!(pods.replace(map.clone()));
        assert!(!pods.replace(map), "same list: no change");
        assert_eq!(
            pods.get("0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d")
                .map(|p| p.namespace.clone())
                .as_deref(),
            Some("support")
        );
        pods.request_refresh();
    }
}
