//! The kernel side as the agent drives it: a policy turned into map entries
//! (`plan`, `limit_entries`), the programs loaded, attached, pinned and
//! adopted (`loader`, `programs`), the only map writer (`maps`), verifier
//! costs (`verifier`) and the capabilities dropped after loading
//! (`privileges`).

#[cfg(test)]
mod kernel_agrees;
pub mod limit_entries;
pub mod loader;
pub mod maps;
pub mod plan;
pub mod privileges;
pub mod programs;
pub mod ring;
pub mod socket_stop;
pub mod verifier;
