//! The userspace CONNECT request-line reader (agent/src/names/connect_line.rs,
//! the kernel's rules of ebpf/src/connect_line.rs): any first payload, never
//! a panic; a host is 1 to 253 bytes of the input followed by `:` and a
//! port of 1 to 65535, cut in 1 to `DNS_MAX_LABELS` non-empty labels.
#![no_main]

use libfuzzer_sys::fuzz_target;
use llm_egress_common::DNS_MAX_LABELS;

use llm_egress::names::connect_line;

fuzz_target!(|data: &[u8]| {
    match connect_line::parse(data) {
        connect_line::Line::Host { host, labels, port } => {
            assert!((1..=253).contains(&host.len()));
            assert!(port != 0);
            assert!((1..=DNS_MAX_LABELS).contains(&labels.len()) && labels.iter().all(|l| !l.is_empty()));
            let needle = [host.as_slice(), b":"].concat();
            assert!(data.windows(needle.len()).any(|w| w == needle.as_slice()));
        }
        connect_line::Line::IpLiteral(port) => assert!(port != 0),
        _ => {}
    }
});
