//! The agent's userspace DNS answer handling (agent/src/names/dns.rs, the path
//! for answers the kernel gives up on): any bytes, never a panic, and every
//! address learned is one of the message's A/AAAA records.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use llm_egress_common::{DestValue, names::host_key};

use llm_egress::names::dns;

const SEED: u64 = 0x5eed;

fuzz_target!(|data: &[u8]| {
    // Names a fuzzer finds easily (short labels) and the wildcard form.
    let mut names = BTreeMap::new();
    for h in ["a.b", "*.b", "api.prov.test", "*.test"] {
        names.insert(host_key(SEED, h).unwrap(), DestValue { provider_id: 1, ..DestValue::default() });
    }
    if let Ok(learned) = dns::learnable(data, SEED, &names) {
        for l in learned {
            assert!(names.contains_key(&l.key), "learned for a key that is no name: {l:?}");
            let bytes: Vec<u8> = match l.addr {
                std::net::IpAddr::V4(a) => a.octets().to_vec(),
                std::net::IpAddr::V6(a) => a.octets().to_vec(),
            };
            assert!(data.windows(bytes.len()).any(|w| w == bytes), "learned {l:?}, not in the message");
        }
    }
});
