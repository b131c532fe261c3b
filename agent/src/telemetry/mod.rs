//! Telemetry: the Prometheus registry (`metrics`), the audit log (`audit`)
//! and the HTTP endpoint that serves /metrics, /healthz and /readyz
//! (`http`).

pub mod audit;
pub mod http;
pub mod metrics;
pub mod prom_text;
