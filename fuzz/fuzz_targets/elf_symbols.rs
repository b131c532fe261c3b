//! The ELF symbol search for a linked-in OpenSSL (agent/src/capture/elf.rs,
//! docs/plaintext.md): any file, never a panic; when all four functions are
//! found, each offset lies inside the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

use llm_egress::capture::elf::{Lookup, find_functions};

const WANTED: [&str; 4] = ["SSL_write", "SSL_read", "SSL_write_ex", "SSL_read_ex"];

fuzz_target!(|data: &[u8]| {
    if let Ok(Lookup::All(offsets)) = find_functions(data, &WANTED) {
        assert_eq!(offsets.len(), WANTED.len());
    }
});
