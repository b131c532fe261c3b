//! The agent's HTTP endpoint: `/metrics` (Prometheus text), `/healthz`
//! (the process answers) and `/readyz` (policy applied, every program
//! attached, event reader alive, last reload accepted; otherwise 503 with
//! every reason).

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::debug;

use crate::telemetry::metrics::Metrics;

/// What `/readyz` reports.
#[derive(Default)]
pub struct Health {
    pub attached: AtomicBool,
    pub events_alive: AtomicBool,
    /// The last reload error, cleared by a successful reload.
    pub policy_error: Mutex<Option<String>>,
    /// Programs that failed to load, why, and what is lost (set at start;
    /// only a restart can load them).
    pub degraded: Mutex<Option<String>>,
    /// The fleet ledger is unreachable (docs/fleet.md); cleared when it
    /// answers again.
    pub fleet: Mutex<Option<String>>,
}

impl Health {
    /// Every reason the agent is not ready; empty when it is.
    fn not_ready(&self) -> Vec<String> {
        if !self.attached.load(Ordering::SeqCst) {
            return vec!["programs not attached yet".into()];
        }
        let mut why = Vec::new();
        if let Some(d) = self.degraded.lock().ok().and_then(|d| d.clone()) {
            why.push(d);
        }
        if let Some(f) = self.fleet.lock().ok().and_then(|f| f.clone()) {
            why.push(f);
        }
        if !self.events_alive.load(Ordering::SeqCst) {
            why.push("event reader stopped".into());
        }
        // A rejected reload makes the agent not ready (the previous
        // policy stays enforced): orchestrators show the error, and
        // liveness (/healthz) stays green so nothing restarts it.
        if let Some(e) = self.policy_error.lock().ok().and_then(|e| e.clone()) {
            why.push(format!(
                "the last policy reload was rejected; the previous policy stays in force:\n{e}"
            ));
        }
        why
    }
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(
    req: Request<hyper::body::Incoming>,
    metrics: Metrics,
    health: Arc<Health>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
        "/readyz" => {
            let why = health.not_ready();
            if why.is_empty() {
                respond(StatusCode::OK, "text/plain", b"ready\n".to_vec())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {}\n", why.join("\nnot ready: ")).into_bytes(),
                )
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec()),
    })
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Metrics, health: Arc<Health>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (m, h) = (metrics.clone(), health.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| route(req, m.clone(), h.clone()));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}
