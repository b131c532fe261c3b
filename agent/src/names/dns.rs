//! The userspace half of DNS learning: answers the kernel could not parse.
//!
//! `names_dns_ingress` (ebpf/src/dns.rs) sends a DNS answer it gives up on
//! (too many labels, answers or CNAMEs, a forward compression pointer,
//! longer than 1024 bytes, …) as a `DNS_UNPARSED` event. The event reader
//! hands the bytes to the agent loop, which parses them here with
//! hickory-proto and writes what it finds through `maps::KernelMaps::learn`.
//!
//! The rule is the kernel's (docs/names.md): for each question, the chain
//! is the question name and the targets of CNAMEs whose owner is in the
//! chain; the `NAMES` key learned for is the first name of the chain that
//! matches (exact name first, else the most specific `*.` wildcard);
//! A/AAAA records whose owner is in the chain are learned for it, with
//! their TTL (clamped by `maps`). Records whose owner is not in the chain
//! are ignored. Unlike the kernel, this parser has no label, hop, answer or
//! chain limits (hickory-proto rejects pointer loops).
//!
//! This path is **not race-free**: the application reads the answer while
//! the event is on its way, and may connect before the address is written.
//! Pure: no kernel, no I/O.

use std::{collections::BTreeMap, net::IpAddr};

use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{Name, RData},
};
use llm_egress_common::{
    DestValue,
    names::{fold, label_hash, wildcard},
};

/// One address to learn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Learn {
    pub addr: IpAddr,
    /// The `NAMES` key (`names::host_key`) it is learned for.
    pub key: u64,
    /// The record's TTL, seconds (not clamped yet).
    pub ttl: u32,
}

/// Why a message was not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not a DNS message hickory-proto can read (truncated, malformed).
    Unparsed,
    /// Not an answer to learn from (a query, an error rcode, another opcode).
    NotAnAnswer,
}

/// Longest CNAME chain followed (question name included); a longer chain
/// is a loop or an attack, its further names are ignored.
const MAX_CHAIN: usize = 32;

/// Lower-case labels of a name, without the root.
fn labels(name: &Name) -> Vec<Vec<u8>> {
    name.iter().map(|l| l.to_ascii_lowercase()).collect()
}

/// Full-name hash of `labels` (as `names::name_hash`).
fn full_hash(seed: u64, labels: &[Vec<u8>]) -> u64 {
    labels
        .iter()
        .rev()
        .fold(seed, |acc, l| fold(acc, label_hash(l)))
}

/// The `NAMES` key a name matches: the exact name, else the most specific
/// wildcard suffix (as `lookup_name` in ebpf/src/dns.rs).
pub fn match_name(seed: u64, labels: &[Vec<u8>], names: &BTreeMap<u64, DestValue>) -> Option<u64> {
    if labels.is_empty() {
        return None;
    }
    let mut acc = seed;
    let mut matched = None;
    for (i, l) in labels.iter().enumerate().rev() {
        acc = fold(acc, label_hash(l));
        let key = if i == 0 { acc } else { wildcard(acc) };
        if names.contains_key(&key) {
            matched = Some(key);
        }
    }
    matched
}

/// The addresses a DNS response teaches for the names in `names`.
pub fn learnable(
    msg: &[u8],
    seed: u64,
    names: &BTreeMap<u64, DestValue>,
) -> Result<Vec<Learn>, Skip> {
    let m = Message::from_vec(msg).map_err(|_| Skip::Unparsed)?;
    if m.message_type() != MessageType::Response
        || m.op_code() != OpCode::Query
        || m.response_code() != ResponseCode::NoError
    {
        return Err(Skip::NotAnAnswer);
    }
    let mut out = Vec::new();
    for q in m.queries() {
        let qlabels = labels(q.name());
        let mut chain = vec![full_hash(seed, &qlabels)];
        let mut matched = match_name(seed, &qlabels, names);
        for rr in m.answers() {
            let owner = full_hash(seed, &labels(rr.name()));
            if !chain.contains(&owner) {
                continue;
            }
            match rr.data() {
                RData::CNAME(target) => {
                    let t = labels(&target.0);
                    if matched.is_none() {
                        matched = match_name(seed, &t, names);
                    }
                    if chain.len() < MAX_CHAIN {
                        chain.push(full_hash(seed, &t));
                    }
                }
                RData::A(a) => {
                    if let Some(key) = matched {
                        out.push(Learn {
                            addr: IpAddr::V4(a.0),
                            key,
                            ttl: rr.ttl(),
                        });
                    }
                }
                RData::AAAA(a) => {
                    if let Some(key) = matched {
                        out.push(Learn {
                            addr: IpAddr::V6(a.0),
                            key,
                            ttl: rr.ttl(),
                        });
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod wire {
    //! DNS messages written by hand, for tests (and the fuzz corpus).

    pub fn name(out: &mut Vec<u8>, name: &str) {
        for label in name.trim_end_matches('.').split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }

    /// A response to an A question for `q` with `answers`: (owner, type,
    /// rdata). An owner equal to the question is written as a pointer to
    /// offset 12.
    pub fn response(q: &str, answers: &[(&str, u16, Vec<u8>)], ttl: u32) -> Vec<u8> {
        let mut r = vec![0x12, 0x34, 0x81, 0x80, 0, 1];
        r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        name(&mut r, q);
        r.extend_from_slice(&[0, 1, 0, 1]);
        for (owner, rtype, rdata) in answers {
            if owner.eq_ignore_ascii_case(q) {
                r.extend_from_slice(&[0xc0, 12]);
            } else {
                name(&mut r, owner);
            }
            r.extend_from_slice(&rtype.to_be_bytes());
            r.extend_from_slice(&[0, 1]);
            r.extend_from_slice(&ttl.to_be_bytes());
            r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            r.extend_from_slice(rdata);
        }
        r
    }

    pub fn cname(target: &str) -> Vec<u8> {
        let mut t = Vec::new();
        name(&mut t, target);
        t
    }

    /// Bad answers: (what, message). Each is built from a good response
    /// to `api.prov.test` (CNAME chain, A 10.0.0.1, AAAA ::1) and
    /// truncated, looped, lengthened or emptied.
    pub fn malformed_corpus() -> Vec<(String, Vec<u8>)> {
        let good = response(
            "alias.example",
            &[
                ("alias.example", 5, cname("api.prov.test")),
                ("api.prov.test", 1, vec![10, 0, 0, 1]),
                (
                    "api.prov.test",
                    28,
                    std::net::Ipv6Addr::LOCALHOST.octets().to_vec(),
                ),
            ],
            60,
        );
        let mut out: Vec<(String, Vec<u8>)> = vec![
            ("zero-length".into(), vec![]),
            ("one byte".into(), vec![0x81]),
        ];
        for n in 0..good.len() {
            out.push((format!("truncated to {n} bytes"), good[..n].to_vec()));
        }
        // The first answer's owner (a pointer to 12 right after the
        // question) turned into pointers that loop.
        let owner = 12 + 15 + 4;
        assert_eq!(good[owner], 0xc0, "the corpus's good message changed");
        let mut m = good.clone();
        m[owner + 1] = owner as u8;
        out.push(("owner pointer to itself".into(), m));
        let mut m = good.clone();
        m[owner + 1] = 0xff;
        out.push(("forward pointer".into(), m));
        // The question name: a pointer to itself, and two pointers to
        // each other (12 -> 14 -> 12).
        let mut m = good[..12].to_vec();
        m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        out.push(("question pointer to itself".into(), m));
        let mut m = good[..12].to_vec();
        m.extend_from_slice(&[0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
        out.push(("two-pointer cycle".into(), m));
        // Counts the message does not have.
        let mut m = good.clone();
        m[6] = 0xff;
        m[7] = 0xff;
        out.push(("ancount 65535".into(), m));
        let mut m = good.clone();
        m[4] = 0xff;
        out.push(("qdcount 65280".into(), m));
        let mut m = good.clone();
        m[5] = 0;
        out.push(("qdcount 0".into(), m));
        // An rdlength past the end; an A record of 3 and of 5 bytes.
        let mut m = good.clone();
        let at = m.len() - 16 - 2;
        m[at] = 0xff;
        out.push(("AAAA rdlength past the end".into(), m));
        out.push((
            "A of 3 bytes".into(),
            response("api.prov.test", &[("api.prov.test", 1, vec![10, 0, 0])], 1),
        ));
        out.push((
            "A of 5 bytes".into(),
            response(
                "api.prov.test",
                &[("api.prov.test", 1, vec![10, 0, 0, 1, 2])],
                1,
            ),
        ));
        out.push((
            "AAAA of 4 bytes".into(),
            response(
                "api.prov.test",
                &[("api.prov.test", 28, vec![10, 0, 0, 1])],
                1,
            ),
        ));
        // Oversized: a name past 255 bytes, a label with the reserved
        // 0x40 bits, 64 KiB of answers, 100 KiB of garbage.
        let long = vec!["a".repeat(60); 5].join(".") + ".prov.test";
        out.push((
            "name over 255 bytes".into(),
            response(&long, &[(&long, 1, vec![10, 0, 0, 2])], 1),
        ));
        let mut m = good.clone();
        m[12] = 0x45;
        out.push(("label type 0x40".into(), m));
        let many: Vec<(&str, u16, Vec<u8>)> = (0..4000)
            .map(|i| ("api.prov.test", 1, vec![10, 9, (i >> 8) as u8, i as u8]))
            .collect();
        let mut m = response("api.prov.test", &many, 1);
        m.truncate(65_535);
        out.push(("4000 answers cut at 64 KiB".into(), m));
        out.push(("100 KiB of 0xc0".into(), vec![0xc0; 100 * 1024]));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use llm_egress_common::names::host_key;

    use super::{wire::*, *};

    fn names(seed: u64, hosts: &[&str]) -> BTreeMap<u64, DestValue> {
        hosts
            .iter()
            .map(|h| {
                (
                    host_key(seed, h).unwrap(),
                    DestValue {
                        provider_id: 1,
                        ..DestValue::default()
                    },
                )
            })
            .collect()
    }

    #[test]
    fn a_cname_chain_to_a_provider_name_is_learned_with_its_ttl() {
        let seed = 5;
        let n = names(seed, &["api.prov.test"]);
        let msg = response(
            "Alias.Example",
            &[
                ("alias.example", 5, cname("c1.example")),
                ("C1.example", 5, cname("API.prov.test.")),
                ("api.prov.test", 1, vec![10, 0, 0, 1]),
                ("api.prov.test", 28, Ipv6Addr::LOCALHOST.octets().to_vec()),
                ("elsewhere.test", 1, vec![10, 0, 0, 9]),
            ],
            42,
        );
        let got = learnable(&msg, seed, &n).unwrap();
        let key = host_key(seed, "api.prov.test").unwrap();
        assert_eq!(
            got,
            vec![
                Learn {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
                    key,
                    ttl: 42
                },
                Learn {
                    addr: IpAddr::V6(Ipv6Addr::LOCALHOST),
                    key,
                    ttl: 42
                },
            ]
        );
    }

    #[test]
    fn wildcards_match_names_below_and_exact_names_win() {
        let seed = 9;
        let n = names(seed, &["*.prov.test", "exact.prov.test"]);
        let msg = response(
            "a.b.prov.test",
            &[("a.b.prov.test", 1, vec![1, 2, 3, 4])],
            1,
        );
        assert_eq!(
            learnable(&msg, seed, &n).unwrap()[0].key,
            host_key(seed, "*.prov.test").unwrap()
        );
        let msg = response(
            "EXACT.prov.test",
            &[("exact.prov.test", 1, vec![1, 2, 3, 4])],
            1,
        );
        assert_eq!(
            learnable(&msg, seed, &n).unwrap()[0].key,
            host_key(seed, "exact.prov.test").unwrap()
        );
        // the wildcard does not match the name itself
        let msg = response("prov.test", &[("prov.test", 1, vec![1, 2, 3, 4])], 1);
        assert!(learnable(&msg, seed, &n).unwrap().is_empty());
    }

    /// Truncated, looping, oversized and empty answers: never a panic,
    /// a clean `Skip` or a subset of the good answer's addresses (never an
    /// address the message does not carry for the provider's name).
    #[test]
    fn malformed_corpus_is_skipped_cleanly() {
        let seed = 3;
        let n = names(seed, &["api.prov.test"]);
        let good: Vec<IpAddr> = vec![
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        let corpus = malformed_corpus();
        assert!(corpus.len() > 100);
        let mut skipped = 0;
        for (what, msg) in &corpus {
            match std::panic::catch_unwind(|| learnable(msg, seed, &n)) {
                Err(_) => panic!("{what}: the parser panicked"),
                Ok(Err(_)) => skipped += 1,
                Ok(Ok(v)) => {
                    for l in v {
                        let ok = good.contains(&l.addr)
                            || matches!(l.addr, IpAddr::V4(a) if a.octets()[..2] == [10, 9])
                                && what.starts_with("4000");
                        assert!(
                            ok,
                            "{what}: learned {l:?}, which the message does not carry for the provider"
                        );
                    }
                }
            }
        }
        // Every truncation and every loop is an error, not an answer.
        assert!(
            skipped
                >= corpus
                    .iter()
                    .filter(|(w, _)| w.starts_with("truncated")
                        || w.contains("pointer")
                        || w.contains("cycle"))
                    .count(),
            "only {skipped} skipped"
        );
    }

    #[test]
    fn other_names_errors_and_garbage_teach_nothing() {
        let seed = 1;
        let n = names(seed, &["api.prov.test"]);
        let msg = response("other.test", &[("other.test", 1, vec![1, 2, 3, 4])], 1);
        assert!(learnable(&msg, seed, &n).unwrap().is_empty());
        let mut err = response(
            "api.prov.test",
            &[("api.prov.test", 1, vec![1, 2, 3, 4])],
            1,
        );
        err[3] = 0x83; // NXDOMAIN
        assert_eq!(learnable(&err, seed, &n), Err(Skip::NotAnAnswer));
        let ok = response(
            "api.prov.test",
            &[("api.prov.test", 1, vec![1, 2, 3, 4])],
            1,
        );
        assert_eq!(
            learnable(&ok[..ok.len() - 2], seed, &n),
            Err(Skip::Unparsed)
        );
        // a pointer loop
        let mut looped = ok.clone();
        let at = looped.len() - 16;
        looped[at] = 0xc0;
        looped[at + 1] = at as u8;
        assert!(
            learnable(&looped, seed, &n)
                .map(|v| v.is_empty())
                .unwrap_or(true)
        );
    }
}
