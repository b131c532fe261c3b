//! The kernel's DNS program and the agent's fallback parser, run over the
//! same answers, must agree: the kernel (`names_dns_ingress`, run with
//! `BPF_PROG_TEST_RUN` on a made-up IPv4/UDP packet from port 53, never
//! attached anywhere) learns a subset of what `dns::learnable` learns,
//! never an address the userspace parser would not, and when it learns
//! less it has given the answer up (`DNS_UNPARSED`, so the agent parses
//! it and learns the rest).
//!
//! Needs root (BPF): skipped with a message otherwise. Loads the embedded
//! object with its maps pinned in a fresh directory under /sys/fs/bpf,
//! removed at the end.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::programs::{CgroupSkb, TestRun, TestRunOptions};
use llm_egress_common::{DNS_MAX_ANSWERS, PROG_DNS_INGRESS, counter};

use crate::{
    dns::{learnable, wire::*},
    loader::Loader,
    maps::KernelMaps,
    plan,
    policy::Policy,
};

/// Ethernet + IPv4 + UDP (source port 53) around `dns`.
fn packet(dns: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + dns.len()) as u16;
    p.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0]);
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
        ("A".into(), response("api.prov.test", &[("api.prov.test", 1, a(1))], 60)),
        ("mixed case, trailing dot".into(), response("API.Prov.TEST.", &[("api.prov.test", 1, a(2))], 60)),
        (
            "CNAME chain, A and AAAA".into(),
            response(
                "alias.example",
                &[("alias.example", 5, cname("c1.example")), ("c1.example", 5, cname("API.prov.test")), ("api.prov.test", 1, a(3)), ("api.prov.test", 28, Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, 0, 3).octets().to_vec())],
                60,
            ),
        ),
        ("wildcard".into(), response("x.y.wild.test", &[("x.y.wild.test", 1, a(4))], 60)),
        ("wildcard apex".into(), response("wild.test", &[("wild.test", 1, a(5))], 60)),
        ("other name".into(), response("other.test", &[("other.test", 1, a(6))], 60)),
        ("off-chain record".into(), response("api.prov.test", &[("api.prov.test", 1, a(7)), ("elsewhere.test", 1, a(8))], 60)),
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
    let many: Vec<(&str, u16, Vec<u8>)> = (0..DNS_MAX_ANSWERS as u8 + 2).map(|i| ("api.prov.test", 1, vec![10, 1, 0, i])).collect();
    c.push(("more answers than the kernel reads".into(), response("api.prov.test", &many, 60)));
    let mut nx = response("api.prov.test", &[("api.prov.test", 1, a(11))], 60);
    nx[3] = 0x83;
    c.push(("NXDOMAIN".into(), nx));
    // The malformed corpus, as far as a test packet takes it.
    c.extend(malformed_corpus().into_iter().filter(|(_, m)| m.len() <= 1400));
    c
}

#[test]
fn the_kernel_learns_what_the_userspace_parser_learns() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to load BPF programs (cargo xtask test runs it as root)");
        return;
    }
    let pin_root = std::path::PathBuf::from(format!("/sys/fs/bpf/llm-egress-unit-{}", std::process::id()));
    let mut loader = Loader::open(&pin_root).expect("load the eBPF object");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&mut loader)));
    loader.detach_and_unpin().expect("remove the pin directory");
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

fn run(loader: &mut Loader) {
    let prog: &mut CgroupSkb = loader.ebpf.program_mut(PROG_DNS_INGRESS).expect("the DNS program").try_into().expect("a cgroup_skb program");
    prog.load().expect("load names_dns_ingress");
    let mut maps = KernelMaps::take(&mut loader.ebpf).expect("the maps");
    let seed = maps.name_seed().expect("the name seed");
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
    let prog: &mut CgroupSkb = loader.ebpf.program_mut(PROG_DNS_INGRESS).unwrap().try_into().unwrap();

    let mut disagree = Vec::new();
    let (mut both, mut fallback) = (0, 0);
    for (what, msg) in corpus() {
        let before = maps.counters().expect("counters");
        let pkt = packet(&msg);
        let r = prog.test_run(TestRunOptions { data_in: Some(&pkt), ..TestRunOptions::new() }).unwrap_or_else(|e| panic!("{what}: test_run: {e}"));
        assert_eq!(r.return_value, 1, "{what}: the DNS program must always keep the packet");
        let kernel = maps.drain_learned();
        let after = maps.counters().expect("counters");
        let gave_up = after[counter::DNS_UNPARSED as usize] > before[counter::DNS_UNPARSED as usize];
        let user: BTreeSet<(IpAddr, u64)> = learnable(&msg, seed, &names).map(|v| v.into_iter().map(|l| (l.addr, l.key)).collect()).unwrap_or_default();
        if !kernel.is_subset(&user) || (kernel != user && !gave_up) {
            disagree.push(format!("{what}: kernel {kernel:?} (gave up: {gave_up}), userspace {user:?}"));
        }
        if gave_up {
            fallback += 1;
        } else if !user.is_empty() {
            both += 1;
        }
    }
    eprintln!("{both} answers learned alike by both, {fallback} given up by the kernel");
    assert!(both >= 5, "the kernel learned from only {both} answers");
    assert!(disagree.is_empty(), "the kernel and the userspace parser disagree:\n{}", disagree.join("\n"));
    // The kernel wrote nothing of its own for the wildcard apex or others.
    let _ = Ipv4Addr::UNSPECIFIED;
}
