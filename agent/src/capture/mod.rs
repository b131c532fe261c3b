//! Plaintext capture where the process's TLS library allows it
//! (docs/plaintext.md): OpenSSL uprobes attached to the processes of
//! `exact_tokens` workloads, and no others (`attach`, with what it reads
//! from /proc and cgroupfs, `procs`, an OpenSSL linked into an executable
//! found by symbol, `elf`, Go's `crypto/tls` and its returns, `go_tls`,
//! the kernel's BTF, `btf`, the thread that
//! closes uprobe links, `detach`, and its series, `metrics`); their
//! records joined into one chunk per TLS call on the connection's socket
//! cookie (`reader`; calls of memory BIOs wait for their socket in
//! `join`). `crate::plaintext` reads the chunks as HTTP.

pub mod attach;
pub mod btf;
pub mod detach;
pub mod elf;
pub mod go_tls;
pub mod join;
pub mod metrics;
pub mod procs;
pub mod reader;
