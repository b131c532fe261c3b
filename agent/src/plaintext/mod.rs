//! Plaintext of provider connections read as HTTP/1.1 (docs/exact-tokens.md):
//! one reader per TLS connection (`exchange`, on `http1`, `body_coding`,
//! `json_scan`) finds the request's model, the response's usage (`usage`)
//! and secrets in prompts (`secrets`), with bounded memory and no body
//! kept. Pure: the bytes come from `crate::capture`.

pub mod body_coding;
pub mod exchange;
pub mod http1;
pub mod json_scan;
pub mod secrets;
pub mod usage;
