//! Plaintext of provider connections. Captured where the process's TLS
//! library allows it (docs/plaintext.md): OpenSSL uprobes attached to the
//! processes of `exact_tokens` workloads (`attach`, with `procs`, `btf`,
//! `metrics`), their records joined into one chunk per TLS call
//! (`reader`). Read as HTTP/1.1 per connection (docs/exact-tokens.md):
//! `exchange`, on `http1`, `body_coding`, `json_scan`, finds the request's
//! model, the response's usage (`usage`) and secrets in prompts
//! (`secrets`), with bounded memory.

pub mod attach;
pub mod body_coding;
pub mod btf;
pub mod exchange;
pub mod http1;
pub mod json_scan;
pub mod metrics;
pub mod procs;
pub mod reader;
pub mod secrets;
pub mod usage;
