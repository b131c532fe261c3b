//! The kernel's DNS program and the agent's fallback parser, run over the
//! same answers, must agree: the kernel (`names_dns_ingress`, run with
//! `BPF_PROG_TEST_RUN` on a made-up IPv4/UDP packet from port 53, never
//! attached anywhere) learns a subset of what `dns::learnable` learns,
//! never an address the userspace parser would not, and when it learns
//! less it has given the answer up (`DNS_UNPARSED`, so the agent parses
//! it and learns the rest). One difference is allowed and counted: a
//! message hickory-proto rejects as a whole (truncated, a bad length late
//! in it) keeps, in the kernel, the complete provider records read before
//! the bad part.
//!
//! Needs root (BPF): skipped with a message otherwise. Loads the embedded
//! object with its maps pinned in a fresh directory under /sys/fs/bpf,
//! removed at the end.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use aya::programs::{CgroupSkb, TestRun, TestRunOptions};
use llm_egress_common::{
    DNS_MAX_ANSWERS, DestValue, PROG_DNS_INGRESS, PROG_SNI_EGRESS, SNI_BUF, SOCKET_SCRATCH_MAX,
    counter,
};

use crate::{
    kernel::loader::Loader,
    kernel::maps::KernelMaps,
    kernel::plan,
    names::connect_line,
    names::dns::{learnable, match_name, wire::*},
    names::sni,
    policy::Policy,
};

/// Ethernet + IPv4 + UDP (source port 53) around `dns`.
fn packet(dns: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + dns.len()) as u16;
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ]);
    p.extend_from_slice(&[192, 0, 2, 53, 192, 0, 2, 1]);
    let ulen = (8 + dns.len()) as u16;
    p.extend_from_slice(&[0, 53, 0x9c, 0x40, (ulen >> 8) as u8, ulen as u8, 0, 0]);
    p.extend_from_slice(dns);
    p
}

/// Good answers of every shape the kernel reads, and some it gives up.
fn corpus() -> Vec<(String, Vec<u8>)> {
    let a = |x: u8| vec![10, 0, 0, x];
    let mut c: Vec<(String, Vec<u8>)> = vec![
        (
            "A".into(),
            response("api.prov.test", &[("api.prov.test", 1, a(1))], 60),
        ),
        (
            "mixed case, trailing dot".into(),
            response("API.Prov.TEST.", &[("api.prov.test", 1, a(2))], 60),
        ),
        (
            "CNAME chain, A and AAAA".into(),
            response(
                "alias.example",
                &[
                    ("alias.example", 5, cname("c1.example")),
                    ("c1.example", 5, cname("API.prov.test")),
                    ("api.prov.test", 1, a(3)),
                    (
                        "api.prov.test",
                        28,
                        Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3).octets().to_vec(),
                    ),
                ],
                60,
            ),
        ),
        (
            "wildcard".into(),
            response("x.y.wild.test", &[("x.y.wild.test", 1, a(4))], 60),
        ),
        (
            "wildcard apex".into(),
            response("wild.test", &[("wild.test", 1, a(5))], 60),
        ),
        (
            "other name".into(),
            response("other.test", &[("other.test", 1, a(6))], 60),
        ),
        (
            "off-chain record".into(),
            response(
                "api.prov.test",
                &[("api.prov.test", 1, a(7)), ("elsewhere.test", 1, a(8))],
                60,
            ),
        ),
        (
            "CNAME chain of 6 hops".into(),
            response(
                "h0.example",
                &[
                    ("h0.example", 5, cname("h1.example")),
                    ("h1.example", 5, cname("h2.example")),
                    ("h2.example", 5, cname("h3.example")),
                    ("h3.example", 5, cname("h4.example")),
                    ("h4.example", 5, cname("api.prov.test")),
                    ("api.prov.test", 1, a(9)),
                ],
                60,
            ),
        ),
        ("17 labels".into(), {
            let n = format!("{}.prov.test", vec!["l"; 15].join("."));
            response(&n, &[(&n, 1, a(10))], 60)
        }),
    ];
    let many: Vec<(&str, u16, Vec<u8>)> = (0..DNS_MAX_ANSWERS as u8 + 2)
        .map(|i| ("api.prov.test", 1, vec![10, 1, 0, i]))
        .collect();
    c.push((
        "more answers than the kernel reads".into(),
        response("api.prov.test", &many, 60),
    ));
    let mut nx = response("api.prov.test", &[("api.prov.test", 1, a(11))], 60);
    nx[3] = 0x83;
    c.push(("NXDOMAIN".into(), nx));
    // The malformed corpus, as far as a test packet takes it.
    c.extend(
        malformed_corpus()
            .into_iter()
            .filter(|(_, m)| m.len() <= 1400),
    );
    c
}

/// Runs `f` with the object loaded (maps pinned in a fresh directory, no
/// program attached anywhere), `prog` loaded, and a policy of provider
/// `prov` (`api.prov.test`, `*.wild.test`, port 443; defaults llm = deny)
/// written; removes the pins afterwards. Skips without root.
fn with_kernel(
    tag: &str,
    prog: &str,
    f: impl FnOnce(&mut Loader, &mut KernelMaps, u64, &BTreeMap<u64, DestValue>),
) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to load BPF programs (cargo xtask test runs it as root)");
        return;
    }
    let pin_root = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/llm-egress-unit-{}-{tag}",
        std::process::id()
    ));
    let mut loader = Loader::open(&pin_root).expect("load the eBPF object");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let p: &mut CgroupSkb = loader
            .ebpf
            .program_mut(prog)
            .expect("the program")
            .try_into()
            .expect("a cgroup_skb program");
        p.load().unwrap_or_else(|e| panic!("load {prog}: {e}"));
        let mut maps = KernelMaps::take(&mut loader.ebpf).expect("the maps");
        let seed = maps.name_seed().expect("the name seed");
        // The made-up packets' socket sent no query (hostile_dns.rs tests
        // that check end to end).
        maps.learn_unasked();
        let policy = Policy::parse(
            r#"
[resolver]
servers = ["127.0.0.1:9"]

[[providers]]
name = "prov"
hosts = ["api.prov.test", "*.wild.test"]
ports = [443]
"#,
            "kernel_agrees",
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let mut p = plan::build(&policy, 1, &BTreeMap::new(), &BTreeMap::new());
        p.names = plan::names(&policy, seed);
        let report = maps.apply_policy(p, 0, 0).expect("write the policy");
        assert!(report.is_ok(), "policy write failed");
        let names = maps.active_names().expect("names").clone();
        f(&mut loader, &mut maps, seed, &names)
    }));
    loader.detach_and_unpin().expect("remove the pin directory");
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn the_kernel_learns_what_the_userspace_parser_learns() {
    with_kernel("dns", PROG_DNS_INGRESS, run);
}

fn run(loader: &mut Loader, maps: &mut KernelMaps, seed: u64, names: &BTreeMap<u64, DestValue>) {
    let prog: &mut CgroupSkb = loader
        .ebpf
        .program_mut(PROG_DNS_INGRESS)
        .unwrap()
        .try_into()
        .unwrap();

    let mut disagree = Vec::new();
    let (mut both, mut fallback, mut kept_from_rejected) = (0, 0, 0);
    for (what, msg) in corpus() {
        let before = maps.counters().expect("counters");
        let pkt = packet(&msg);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&pkt),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("{what}: test_run: {e}"));
        assert_eq!(
            r.return_value, 1,
            "{what}: the DNS program must always keep the packet"
        );
        let kernel = maps.drain_learned();
        let after = maps.counters().expect("counters");
        let gave_up =
            after[counter::DNS_UNPARSED as usize] > before[counter::DNS_UNPARSED as usize];
        let parsed = learnable(&msg, seed, names);
        let rejected = parsed.is_err();
        let user: BTreeSet<(IpAddr, u64)> = parsed
            .map(|v| v.into_iter().map(|l| (l.addr, l.key)).collect())
            .unwrap_or_default();
        let agrees = if !gave_up {
            // The kernel read the whole answer: the same addresses, for
            // the same names.
            kernel == user
        } else if rejected {
            // A message hickory-proto rejects as a whole (truncated, bad
            // lengths): the kernel keeps the complete records it read
            // before it gave up. Each is a provider-name record of the
            // message, the key a provider's.
            kernel.iter().all(|(a, k)| {
                let o = match a {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                names.contains_key(k) && msg.windows(o.len()).any(|w| w == o.as_slice())
            })
        } else {
            // Given up: the agent learns the rest (`learn_unparsed`).
            kernel.is_subset(&user)
        };
        if !agrees {
            disagree.push(format!("{what}: kernel {kernel:?} (gave up: {gave_up}), userspace {user:?} (rejected: {rejected})"));
        }
        if gave_up {
            fallback += 1;
            if rejected && !kernel.is_empty() {
                kept_from_rejected += 1;
            }
        } else if !user.is_empty() {
            both += 1;
        }
    }
    eprintln!(
        "{both} answers learned alike by both; {fallback} given up by the kernel, of which {kept_from_rejected} rejected by userspace after the kernel learned their first complete records"
    );
    assert!(both >= 5, "the kernel learned from only {both} answers");
    assert!(
        disagree.is_empty(),
        "the kernel and the userspace parser disagree:\n{}",
        disagree.join("\n")
    );
}

/// Ethernet + IPv4 + TCP (to port 443, ACK|PSH) around `payload`.
fn tcp_packet(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 20 + payload.len()) as u16;
    p.extend_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        0,
        0x40,
        0,
        64,
        6,
        0,
        0,
    ]);
    p.extend_from_slice(&[192, 0, 2, 1, 192, 0, 2, 77]);
    p.extend_from_slice(&[
        0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    p.extend_from_slice(payload);
    p
}

/// The same first payloads through `names_sni_egress` (BPF_PROG_TEST_RUN)
/// and `sni::parse`: the same outcome, read from the kernel's counters (a
/// provider's name is denied: no workload, `defaults.llm = deny`).
#[test]
fn the_kernel_reads_client_hellos_like_the_userspace_reader() {
    with_kernel("sni", PROG_SNI_EGRESS, run_sni);
}

fn run_sni(
    loader: &mut Loader,
    maps: &mut KernelMaps,
    seed: u64,
    names: &BTreeMap<u64, DestValue>,
) {
    // Each run reads its ClientHello into a scratch of its own socket
    // (every test run has a new one), created zeroed: bytes past a payload
    // read as 0, as they do in `sni::parse`.
    let prog: &mut CgroupSkb = loader
        .ebpf
        .program_mut(PROG_SNI_EGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    let sni_counters = [
        ("allow", counter::SNI_ALLOW),
        ("deny", counter::SNI_DENY),
        ("audit", counter::SNI_AUDIT),
        ("other_name", counter::SNI_OTHER_NAME),
        ("no_sni", counter::SNI_NO_SNI),
        ("ech", counter::SNI_ECH),
        ("split", counter::SNI_SPLIT),
        ("not_tls", counter::SNI_NOT_TLS),
        ("malformed", counter::SNI_MALFORMED),
    ];
    let mut disagree = Vec::new();
    let mut seen = BTreeSet::new();
    for (what, payload) in sni::wire::corpus() {
        // The kernel reads SNI_BUF bytes; a test packet is at most a page.
        let payload = &payload[..payload.len().min(SNI_BUF + 256)];
        if payload.is_empty() {
            continue; // no payload: not a first payload, nothing to read
        }
        let before = maps.counters().expect("counters");
        let pkt = tcp_packet(payload);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&pkt),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("{what}: test_run: {e}"));
        let after = maps.counters().expect("counters");
        let kernel: Vec<&str> = sni_counters
            .iter()
            .filter(|(_, c)| after[*c as usize] > before[*c as usize])
            .map(|(n, _)| *n)
            .collect();
        let user = match sni::parse(payload) {
            sni::Hello::Name { labels, .. } => match match_name(seed, &labels, names)
                .and_then(|k| names.get(&k))
            {
                Some(d) if d.nports == 0 || d.ports[..d.nports as usize].contains(&443) => "deny",
                _ => "other_name",
            },
            // Not TLS on a connection the connect hook did not track:
            // nothing counted.
            sni::Hello::NotTls => "",
            sni::Hello::NoSni => "no_sni",
            sni::Hello::Ech => "ech",
            sni::Hello::Split => "split",
            sni::Hello::Malformed => "malformed",
        };
        let want: Vec<&str> = if user.is_empty() { vec![] } else { vec![user] };
        let want_ret = if user == "deny" { 2 } else { 1 };
        if kernel != want || r.return_value != want_ret {
            disagree.push(format!(
                "{what}: kernel {kernel:?} (returned {}), userspace {user:?}",
                r.return_value
            ));
        }
        seen.insert(user);
    }
    eprintln!("outcomes covered: {seen:?}");
    for o in [
        "deny",
        "other_name",
        "no_sni",
        "ech",
        "split",
        "malformed",
        "",
    ] {
        assert!(seen.contains(o), "the corpus never gave {o:?}");
    }
    assert!(
        disagree.is_empty(),
        "the kernel and sni::parse disagree:\n{}",
        disagree.join("\n")
    );
    // Every run removes its scratch entry: more runs than the map holds
    // never find it full.
    let (_, hello) = sni::wire::corpus()
        .into_iter()
        .find(|(_, p)| matches!(sni::parse(p), sni::Hello::Name { .. }))
        .expect("a ClientHello with a name in the corpus");
    let pkt = tcp_packet(&hello);
    let before = maps.counters().expect("counters");
    for _ in 0..2 * SOCKET_SCRATCH_MAX + 1 {
        prog.test_run(TestRunOptions {
            data_in: Some(&pkt),
            ..TestRunOptions::new()
        })
        .expect("test_run");
    }
    let after = maps.counters().expect("counters");
    let read = |c: u32| after[c as usize] - before[c as usize];
    assert_eq!(
        (
            read(counter::SNI_BUSY),
            read(counter::SNI_DENY) + read(counter::SNI_OTHER_NAME)
        ),
        (0, u64::from(2 * SOCKET_SCRATCH_MAX + 1)),
        "SNI_SCRATCH entries must go when their run ends"
    );
}

/// The same CONNECT request lines through `names_sni_egress` and
/// `connect_line::parse`: the same counter and return value (a provider's
/// host is denied on its port, 443; the connection is to no named proxy,
/// so what the kernel cannot read passes).
#[test]
fn the_kernel_reads_connect_requests_like_the_userspace_reader() {
    with_kernel("connect", PROG_SNI_EGRESS, run_connect);
}

fn run_connect(
    loader: &mut Loader,
    maps: &mut KernelMaps,
    seed: u64,
    names: &BTreeMap<u64, DestValue>,
) {
    let prog: &mut CgroupSkb = loader
        .ebpf
        .program_mut(PROG_SNI_EGRESS)
        .unwrap()
        .try_into()
        .unwrap();
    let counters = [
        ("allow", counter::CONNECT_ALLOW),
        ("deny", counter::CONNECT_DENY),
        ("audit", counter::CONNECT_AUDIT),
        ("other_name", counter::CONNECT_OTHER_NAME),
        ("ip_literal", counter::CONNECT_IP_LITERAL),
        ("split", counter::CONNECT_SPLIT),
        ("malformed", counter::CONNECT_MALFORMED),
        ("plain_http", counter::PROXY_PLAIN_HTTP),
        ("unreadable", counter::PROXY_UNREADABLE),
        ("sni_other_name", counter::SNI_OTHER_NAME),
        ("sni_malformed", counter::SNI_MALFORMED),
    ];
    let mut disagree = Vec::new();
    let mut seen = BTreeSet::new();
    for (what, payload) in connect_line::wire::corpus() {
        let payload = &payload[..payload.len().min(SNI_BUF + 256)];
        let before = maps.counters().expect("counters");
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&tcp_packet(payload)),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("{what}: test_run: {e}"));
        let after = maps.counters().expect("counters");
        let kernel: Vec<&str> = counters
            .iter()
            .filter(|(_, c)| after[*c as usize] > before[*c as usize])
            .map(|(n, _)| *n)
            .collect();
        let user = match connect_line::parse(payload) {
            connect_line::Line::Host { labels, port, .. } => {
                match match_name(seed, &labels, names).and_then(|k| names.get(&k)) {
                    Some(d) if d.nports == 0 || d.ports[..d.nports as usize].contains(&port) => {
                        "deny"
                    }
                    _ => "other_name",
                }
            }
            connect_line::Line::IpLiteral(_) => "ip_literal",
            connect_line::Line::Split => "split",
            connect_line::Line::Malformed => "malformed",
            connect_line::Line::Plain => "plain_http",
            connect_line::Line::Other => "",
        };
        let want: Vec<&str> = if user.is_empty() { vec![] } else { vec![user] };
        let want_ret = if user == "deny" { 2 } else { 1 };
        if kernel != want || r.return_value != want_ret {
            disagree.push(format!(
                "{what}: kernel {kernel:?} (returned {}), userspace {user:?}",
                r.return_value
            ));
        }
        seen.insert(user);
    }
    eprintln!("outcomes covered: {seen:?}");
    for o in [
        "deny",
        "other_name",
        "ip_literal",
        "split",
        "malformed",
        "plain_http",
        "",
    ] {
        assert!(seen.contains(o), "the corpus never gave {o:?}");
    }
    assert!(
        disagree.is_empty(),
        "the kernel and connect_line::parse disagree:\n{}",
        disagree.join("\n")
    );
}
