//! [`FakeKube`]: a Kubernetes API server that answers one request, the pod
//! list of a node, the way a real one does.
//!
//! Real HTTPS on 127.0.0.1 (rustls; a test CA and a leaf for the IP address
//! 127.0.0.1 made with rcgen, the CA written as `ca.crt` like a service
//! account's), a bearer token checked on every request (written as `token`),
//! and `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>` answered with a
//! `PodList` of the pods the test set. Anything else gets the `Status` body
//! and code the API server would send: 401 for a wrong token, 403 while
//! [`FakeKube::set_forbidden`] is on (what a missing ClusterRoleBinding
//! gives), 400 for another node's field selector, 404 for other paths.
//! Every connection closes after its response; drop stops the server.

use std::{
    io::{BufRead, BufReader, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{ServerConfig, ServerConnection, StreamOwned, pki_types::PrivateKeyDer};
use serde_json::{Value, json};

use crate::{TempDir, toml_str, wait_until};

/// A pod as the fake lists it.
#[derive(Clone, Debug)]
pub struct FakePod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub labels: Vec<(String, String)>,
}

impl FakePod {
    pub fn new(name: &str, namespace: &str, uid: &str, labels: &[(&str, &str)]) -> FakePod {
        FakePod {
            name: name.into(),
            namespace: namespace.into(),
            uid: uid.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }
}

#[derive(Default)]
struct State {
    pods: Vec<FakePod>,
    token: String,
    forbidden: bool,
    /// Pod lists answered with 200.
    served: usize,
    /// Requests answered with an error status.
    refused: usize,
}

pub struct FakeKube {
    addr: SocketAddr,
    node: String,
    state: Arc<Mutex<State>>,
    listener: TcpListener,
    dir: TempDir,
}

impl FakeKube {
    /// Starts the server for node `node` with `pods`, and writes `token`
    /// (the one it accepts) and `ca.crt` into its temp dir.
    pub fn start(node: &str, pods: Vec<FakePod>) -> FakeKube {
        let dir = TempDir::new("llm-egress-test-kube");
        let (config, ca_pem) = tls_config();
        std::fs::write(dir.path().join("ca.crt"), ca_pem)
            .unwrap_or_else(|e| panic!("writing ca.crt: {e}"));
        let token = format!("test-token-{}", crate::unique_suffix());
        std::fs::write(dir.path().join("token"), format!("{token}\n"))
            .unwrap_or_else(|e| panic!("writing token: {e}"));
        let listener =
            TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind 127.0.0.1:0: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let state = Arc::new(Mutex::new(State {
            pods,
            token,
            ..State::default()
        }));
        let accept = listener
            .try_clone()
            .unwrap_or_else(|e| panic!("listener clone: {e}"));
        let (st, node_name) = (state.clone(), node.to_string());
        std::thread::spawn(move || {
            for conn in accept.incoming() {
                let Ok(conn) = conn else { return };
                let (st, config, node) = (st.clone(), config.clone(), node_name.clone());
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn, config, &node, &st) {
                        eprintln!("fake kube-apiserver: {e}");
                    }
                });
            }
        });
        FakeKube {
            addr,
            node: node.into(),
            state,
            listener,
            dir,
        }
    }

    /// `https://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Where the token and the CA are.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A `[kubernetes]` table pointing the agent at this server, refreshing
    /// every `refresh_seconds`.
    pub fn policy_table(&self, refresh_seconds: u32) -> String {
        format!(
            "[kubernetes]\nenabled = \"on\"\napi_server = {}\nnode_name = {}\ntoken_file = {}\nca_file = {}\nrefresh_seconds = {refresh_seconds}\n",
            toml_str(&self.url()),
            toml_str(&self.node),
            toml_str(&self.token_file().display().to_string()),
            toml_str(&self.ca_file().display().to_string()),
        )
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn add_pod(&self, pod: FakePod) {
        self.with(|s| s.pods.push(pod));
    }

    /// 403 for every request while `on`.
    pub fn set_forbidden(&self, on: bool) {
        self.with(|s| s.forbidden = on);
    }

    /// Accept `token` from now on (the file keeps the old one until
    /// [`FakeKube::write_token_file`]): a rotation.
    pub fn set_token(&self, token: &str) {
        self.with(|s| s.token = token.into());
    }

    pub fn write_token_file(&self, token: &str) {
        std::fs::write(self.token_file(), token)
            .unwrap_or_else(|e| panic!("writing the token: {e}"));
    }

    /// Pod lists answered with 200 so far.
    pub fn served(&self) -> usize {
        self.with(|s| s.served)
    }

    /// Requests answered with an error status so far.
    pub fn refused(&self) -> usize {
        self.with(|s| s.refused)
    }

    /// Waits until `served()` reaches `n`; returns the last count.
    pub fn wait_served(&self, n: usize, timeout: Duration) -> usize {
        wait_until(timeout, Duration::from_millis(20), || {
            (self.served() >= n).then_some(())
        });
        self.served()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        // SAFETY: shutdown(2) on our own listening socket; it ends the
        // accept loop (which holds a dup of it) with an error.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
    }
}

/// A server config for 127.0.0.1 and the PEM of the CA that signed it.
fn tls_config() -> (Arc<ServerConfig>, String) {
    let ca = crate::test_ca::root("kubernetes");
    // Like a real API server's: the service IP (here 127.0.0.1) and names.
    let (leaf, key) = crate::test_ca::sign(
        crate::test_ca::leaf_params(&["127.0.0.1", "kubernetes.default.svc"], "kube-apiserver"),
        &ca,
    );
    let chain = vec![leaf.der().clone()];
    let key = PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
            .unwrap_or_else(|e| panic!("TLS config: {e}"));
    (Arc::new(config), ca.pem())
}

/// `%XX` decoding of a query value.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (
            b[i],
            b.get(i + 1).and_then(|c| hex(*c)),
            b.get(i + 2).and_then(|c| hex(*c)),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', ..) => {
                out.push(b' ');
                i += 1;
            }
            (c, ..) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    (code, body)
}

fn pod_list(pods: &[FakePod], node: &str) -> Value {
    let items: Vec<Value> = pods
        .iter()
        .map(|p| {
            let labels: serde_json::Map<String, Value> = p
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.clone())))
                .collect();
            json!({
                "metadata": {
                    "name": p.name, "namespace": p.namespace, "uid": p.uid,
                    "resourceVersion": "1042", "creationTimestamp": "2026-11-25T16:02:11Z",
                    "labels": labels,
                },
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": "main", "image": "registry.example/app:1"}],
                    "serviceAccountName": "default",
                },
                "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": "10.244.1.7"},
            })
        })
        .collect();
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1042"}, "items": items})
}

/// The answer to `GET target` with `authorization`.
fn answer(
    state: &Mutex<State>,
    node: &str,
    method: &str,
    target: &str,
    authorization: Option<&str>,
) -> (u16, Value) {
    let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let field_selector = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "fieldSelector")
        .map(|(_, v)| percent_decode(v));
    let (code, body) = if authorization != Some(format!("Bearer {}", s.token).as_str()) {
        status(401, "Unauthorized", "Unauthorized")
    } else if s.forbidden {
        status(
            403,
            "Forbidden",
            "pods is forbidden: User \"system:serviceaccount:llm-egress:llm-egress\" cannot list resource \"pods\" in API group \"\" at the cluster scope",
        )
    } else if method != "GET" || path != "/api/v1/pods" {
        status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    } else if field_selector.as_deref() != Some(&format!("spec.nodeName={node}")) {
        status(
            400,
            "BadRequest",
            &format!("this fake lists the pods of node {node} only, not {field_selector:?}"),
        )
    } else {
        (200, pod_list(&s.pods, node))
    };
    if code == 200 {
        s.served += 1;
    } else {
        s.refused += 1;
    }
    (code, body)
}

fn serve(
    conn: TcpStream,
    config: Arc<ServerConfig>,
    node: &str,
    state: &Mutex<State>,
) -> Result<(), String> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("timeout: {e}"))?;
    let tls = ServerConnection::new(config).map_err(|e| format!("tls: {e}"))?;
    let mut reader = BufReader::new(StreamOwned::new(tls, conn));
    let mut request_line = String::new();
    reader
        .read_line(&mut request_line)
        .map_err(|e| format!("reading the request: {e}"))?;
    let mut authorization = None;
    loop {
        let mut line = String::new();
        if reader
            .read_line(&mut line)
            .map_err(|e| format!("reading headers: {e}"))?
            == 0
        {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("authorization")
        {
            authorization = Some(v.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (code, body) = answer(state, node, method, target, authorization.as_deref());
    let body = body.to_string();
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        _ => "Not Found",
    };
    let mut s = reader.into_inner();
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nAudit-Id: 6b0c8f2e-0000-4000-8000-000000000001\r\nCache-Control: no-cache, private\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())
        .and_then(|()| s.write_all(body.as_bytes()))
        .and_then(|()| s.flush())
        .map_err(|e| format!("writing: {e}"))?;
    s.conn.send_close_notify();
    let _ = s.flush();
    let _ = s.sock.shutdown(Shutdown::Both);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            percent_decode("spec.nodeName%3Dnode-1"),
            "spec.nodeName=node-1"
        );
        assert_eq!(percent_decode("a+b%2"), "a b%2");
    }

    #[test]
    fn answers_like_an_api_server() {
        let state = Mutex::new(State {
            token: "t".into(),
            pods: vec![FakePod::new("p", "ns", "u", &[("app", "x")])],
            ..State::default()
        });
        let target = "/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&resourceVersion=0";
        let (code, body) = answer(&state, "n1", "GET", target, Some("Bearer t"));
        assert_eq!(code, 200);
        assert_eq!(body["items"][0]["metadata"]["labels"]["app"], "x");
        assert_eq!(answer(&state, "n1", "GET", target, Some("Bearer x")).0, 401);
        assert_eq!(answer(&state, "n1", "GET", target, None).0, 401);
        assert_eq!(answer(&state, "n2", "GET", target, Some("Bearer t")).0, 400);
        assert_eq!(
            answer(&state, "n1", "GET", "/api/v1/nodes", Some("Bearer t")).0,
            404
        );
        state.lock().unwrap().forbidden = true;
        let (code, body) = answer(&state, "n1", "GET", target, Some("Bearer t"));
        assert_eq!((code, body["reason"].as_str()), (403, Some("Forbidden")));
        let s = state.lock().unwrap();
        assert_eq!((s.served, s.refused), (1, 5));
    }
}
