//! Accounting: what the kernel's connection events become — byte counters,
//! durations, per-process series and token estimates.

pub mod conn_tokens;
pub mod connections;
pub mod estimate_learning;
pub mod exact_conns;
pub mod exact_tokens;
pub mod process_series;
pub mod token_tally;
pub mod tokens;
