//! The kernel/user boundary of llm-egress.
//!
//! Everything the eBPF programs and the agent must agree on lives here and
//! nowhere else: map and program names, map key/value layouts, the event
//! envelope and the numeric codes inside it. Every shared struct is
//! `#[repr(C)]`, has no `bool` and no implicit padding (explicit `_pad`
//! fields), and carries a `const` size assertion, so a layout change breaks
//! the build instead of silently corrupting a map.
#![no_std]

pub mod codes;
pub mod event;
pub mod limits;
pub mod maps;
pub mod names;
pub mod plaintext;
pub mod sockets;

pub use codes::*;
pub use event::*;
pub use limits::*;
pub use maps::*;
pub use plaintext::*;
pub use sockets::*;
