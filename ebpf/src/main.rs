//! llm-egress kernel programs.
//!
//! Built only for `bpfel-unknown-none` (`cargo xtask build-ebpf`); the agent
//! embeds the resulting object. One module per hook.
#![no_std]
#![no_main]
// `core::intrinsics::atomic_xadd` (maps::add_u64): the BPF target's `core`
// has no atomic read-modify-write methods (no compare-and-swap), but BPF
// has an atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod connect_line;
mod dns;
mod dns_query;
mod exec;
mod limits;
mod maps;
mod names;
mod nat64;
mod packet;
mod plaintext;
mod policy;
mod records;
mod sni;
mod sock_addr;
mod sock_create;
mod sock_ops;
mod verifier;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
