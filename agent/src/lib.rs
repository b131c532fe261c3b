//! llm-egress: eBPF host agent for LLM egress control, as a library; the
//! binary (`src/main.rs`) only calls [`cli::main`].
//!
//! The rooms follow the data path (docs/architecture.md):
//!
//! - [`policy`]: the policy file → a validated policy (with the built-in
//!   provider catalog), who may change the files the agent trusts, and the
//!   watch on the policy file.
//! - [`kernel`]: policy → kernel entries (`plan`), loading, attaching and
//!   pinning the programs, the only map writer, verifier costs, dropping
//!   privileges.
//! - [`names`]: provider names → addresses (the resolver, the userspace DNS
//!   answer parser) and the userspace twins of the kernel's name readers.
//! - [`attribution`]: who a connection belongs to — processes, cgroups,
//!   workload cgroups, Kubernetes pods.
//! - [`events`]: the ring-buffer reader: kernel events decoded, attributed
//!   and handed on.
//! - [`accounting`]: connection bytes, durations and token estimates.
//! - [`limits`]: token budgets and the keeper that charges them.
//! - [`telemetry`]: Prometheus metrics, the audit log, the HTTP endpoint.
//! - [`run`]: the running agent: start-up and the handlers of what changes.
//! - [`cli`]: the command line (`run`, `check`, `providers`, `verify`,
//!   `status`).

pub mod accounting;
pub mod attribution;
pub mod cli;
pub mod events;
pub mod kernel;
pub mod limits;
pub mod names;
pub mod policy;
pub mod run;
pub mod telemetry;
