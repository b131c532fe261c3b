//! The plaintext HTTP/1.1 reader of exact tokens (agent/src/plaintext/: exchange.rs
//! and what it uses: http1.rs, body_coding.rs, json_scan.rs, usage.rs,
//! secrets.rs): any bytes, cut anywhere, in both directions, never a panic
//! or a hang; findings never carry more than a 16-hex-digit fingerprint;
//! the JSON scanner and the SSE reader take the same bytes on their own.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;

use llm_egress::plaintext::{exchange, http1, json_scan, secrets, usage};

use exchange::{Direction, Output, Tracker};

fn rules() -> Arc<secrets::SecretRules> {
    static RULES: OnceLock<Arc<secrets::SecretRules>> = OnceLock::new();
    RULES.get_or_init(|| Arc::new(secrets::SecretRules::new(&[]))).clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    // A third of the input is what the client sent, the rest the answers,
    // fed in pieces of 1 to 64 bytes (chosen by `control`), interleaved.
    let split = rest.len() / 3;
    let (sent, received) = rest.split_at(split);
    let piece = usize::from(control % 64) + 1;
    let mut t = Tracker::with_cap(Some(rules()), 1 << 20);
    let mut out = Vec::new();
    let (mut a, mut b) = (sent.chunks(piece), received.chunks(piece));
    loop {
        let (x, y) = (a.next(), b.next());
        if x.is_none() && y.is_none() {
            break;
        }
        if let Some(x) = x {
            out.extend(t.feed(Direction::Sent, x));
        }
        if let Some(y) = y {
            out.extend(t.feed(Direction::Received, y));
        }
    }
    out.extend(t.close());
    assert!(t.ignored() <= rest.len() as u64);
    for o in &out {
        match o {
            Output::Secret(f) => {
                assert_eq!(f.fingerprint.len(), 16);
                assert!(f.offset < 1 << 20);
            }
            Output::Exchange(e) => {
                assert!(e.path.len() <= http1::MAX_PATH * 4);
                assert!(e.model.as_ref().is_none_or(|m| m.len() <= usage::MAX_MODEL));
            }
            _ => {}
        }
    }
    // The scanners on their own, on the whole input.
    let mut fields = usage::UsageFields::default();
    let mut sse = usage::Sse::new();
    sse.feed(rest, &mut fields);
    let mut scan = json_scan::JsonScan::new();
    scan.feed(rest, &mut fields);
    scan.finish(&mut fields);
    let _ = fields.usage();
});
