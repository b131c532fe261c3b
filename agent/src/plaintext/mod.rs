//! Plaintext of provider connections (docs/exact-tokens.md): an HTTP/1.1
//! reader per TLS connection (`exchange`, on `http1`, `body_coding`,
//! `json_scan`) that finds the request's model and the response's usage
//! (`usage`) and secrets in prompts (`secrets`), with bounded memory.

pub mod body_coding;
pub mod exchange;
pub mod http1;
pub mod json_scan;
pub mod secrets;
pub mod usage;
