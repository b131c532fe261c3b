//! The userspace ClientHello reader (agent/src/names/sni.rs, the kernel's rules
//! of ebpf/src/sni.rs): any first payload, never a panic; a server name is
//! 1 to 253 bytes of the input, cut in 1 to 16 non-empty labels.
#![no_main]

use libfuzzer_sys::fuzz_target;

use llm_egress::names::sni;

fuzz_target!(|data: &[u8]| {
    if let sni::Hello::Name { name, labels } = sni::parse(data) {
        assert!((1..=253).contains(&name.len()));
        assert!((1..=16).contains(&labels.len()) && labels.iter().all(|l| !l.is_empty()));
        assert!(data.windows(name.len()).any(|w| w == name.as_slice()));
    }
});
