//! Self-tests of the harness: guards, servers and the probe, without the
//! agent. They need root (cgroups, network namespaces, bpffs).

use std::{
    net::{Ipv4Addr, TcpStream},
    os::unix::fs::MetadataExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use llm_egress_tests::{
    CgroupGuard, DnsServer, HttpServer, NetnsGuard, PinDir, Probe, ProbeCmd, TcpServer, UdpServer,
    agent_bin,
    bpf::{self, ObjKind},
    dns::query_a,
    http,
    probe::{ConnectForReport, confine, describe},
    require_root,
    servers::{ByteServer, HTTP_BODY},
};

const WAIT: Duration = Duration::from_secs(2);

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_egress-probe"))
}

fn netns_listed(name: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn probe_connects_over_ipv4_ipv6_and_ipv4_mapped_ipv6() {
    require_root();
    let cg = CgroupGuard::new("harness-tcp");
    let ns = NetnsGuard::new();
    let v4 = TcpServer::start(&ns, "192.0.2.1:8443");
    let v6 = TcpServer::start(&ns, "[2001:db8::1]:8443");
    let p = probe();
    let dir = cg.child("client");
    for addr in [
        "192.0.2.1:8443",
        "[2001:db8::1]:8443",
        "[::ffff:192.0.2.1]:8443",
    ] {
        let r = p.connect(&dir, &ns, addr);
        assert_eq!(
            r,
            Ok(()),
            "probe connect to {addr} in {} failed: {}",
            ns.name(),
            describe(&r)
        );
    }
    assert_eq!(
        v4.wait_for_count(2, WAIT),
        2,
        "the IPv4 server should have accepted 192.0.2.1 and its IPv4-mapped form [::ffff:192.0.2.1]"
    );
    assert_eq!(
        v6.wait_for_count(1, WAIT),
        1,
        "the IPv6 server should have accepted one connection"
    );
}

#[test]
fn probe_reports_errno_of_a_refused_connect() {
    require_root();
    let cg = CgroupGuard::new("harness-refused");
    let ns = NetnsGuard::new();
    let r = probe().connect(cg.path(), &ns, "203.0.113.1:1");
    assert_eq!(
        r,
        Err(libc::ECONNREFUSED),
        "nothing listens on 203.0.113.1:1, got {}",
        describe(&r)
    );
    let r = probe().udp_connect(cg.path(), &ns, "[fd00:20::1]:9");
    assert_eq!(
        r,
        Ok(()),
        "a UDP send to a closed port still succeeds locally, got {}",
        describe(&r)
    );
}

#[test]
fn probe_joins_the_given_cgroup_and_reports_its_pid() {
    require_root();
    let cg = CgroupGuard::new("harness-join");
    let ns = NetnsGuard::new();
    let _srv = TcpServer::start(&ns, "192.0.2.1:8443");
    let dir = cg.child("a/b");
    let run = probe().run(&dir, &ns, &[ProbeCmd::Connect("192.0.2.1:8443".into())]);
    let line = &run.results[0].raw;
    let cgroup = line["cgroup"].as_str().unwrap_or_default();
    let expected = format!("/{}/a/b", cg.name());
    assert!(
        cgroup.ends_with(&expected),
        "the probe should run in cgroup ...{expected}, /proc/self/cgroup said {cgroup:?}"
    );
    assert_eq!(
        line["pid"].as_u64(),
        Some(u64::from(run.pid)),
        "the probe's reported pid is its process id"
    );
}

#[test]
fn udp_datagrams_arrive_sent_and_connected() {
    require_root();
    let cg = CgroupGuard::new("harness-udp");
    let ns = NetnsGuard::new();
    let v4 = UdpServer::start(&ns, "192.0.2.1:9999");
    let v6 = UdpServer::start(&ns, "[2001:db8::1]:9999");
    let p = probe();
    let run = p.run(
        cg.path(),
        &ns,
        &[
            ProbeCmd::Udp("192.0.2.1:9999".into()),
            ProbeCmd::UdpConnect("192.0.2.1:9999".into()),
            ProbeCmd::Udp("[::ffff:192.0.2.1]:9999".into()),
            ProbeCmd::Udp("[2001:db8::1]:9999".into()),
            ProbeCmd::UdpConnect("[2001:db8::1]:9999".into()),
        ],
    );
    for r in &run.results {
        assert!(r.ok, "UDP send failed: {}", r.raw);
    }
    assert_eq!(
        v4.wait_for_count(3, WAIT),
        3,
        "the IPv4 UDP server should have received 3 datagrams"
    );
    assert_eq!(
        v6.wait_for_count(2, WAIT),
        2,
        "the IPv6 UDP server should have received 2 datagrams"
    );
}

#[test]
fn connect_loop_reports_count_elapsed_and_failures() {
    require_root();
    let cg = CgroupGuard::new("harness-loop");
    let ns = NetnsGuard::new();
    let srv = TcpServer::start(&ns, "10.20.0.1:8443");
    let report = probe().connect_loop(cg.path(), &ns, "10.20.0.1:8443", 20);
    assert_eq!(
        (report.n, report.failures),
        (20, 0),
        "20 connects to a listening server: {report:?}"
    );
    assert!(
        report.elapsed_ns > 0,
        "elapsed time must be measured: {report:?}"
    );
    assert_eq!(
        srv.wait_for_count(20, WAIT),
        20,
        "the server should have accepted all 20"
    );

    let report = probe().connect_loop(cg.path(), &ns, "10.20.0.1:1", 5);
    assert_eq!(
        report.failures, 5,
        "connects to a closed port all fail: {report:?}"
    );
    assert_eq!(report.errno, Some(libc::ECONNREFUSED), "{report:?}");
}

#[test]
fn echo_loop_reports_round_trips_the_server_echoed() {
    require_root();
    let cg = CgroupGuard::new("harness-echo");
    let ns = NetnsGuard::new();
    let server = ByteServer::echo(&ns, "10.20.0.1:8007");
    let report = probe().echo_loop(cg.path(), &ns, "10.20.0.1:8007", 20);
    assert_eq!((report.n, report.failures), (20, 0), "{report:?}");
    assert!(report.elapsed_ns > 0, "{report:?}");
    assert_eq!(
        (server.bytes(), server.count()),
        (20 * 64, 1),
        "the server echoed 20 round trips of 64 bytes on one connection"
    );
    let report = probe().echo_loop(cg.path(), &ns, "10.20.0.1:1", 5);
    assert_eq!(
        report.failures, 1,
        "no connection, no round trip: {report:?}"
    );
    assert_eq!(report.errno, Some(libc::ECONNREFUSED), "{report:?}");
}

#[test]
fn netns_has_only_the_test_interfaces() {
    require_root();
    let ns = NetnsGuard::new();
    let ifaces: Vec<String> = ns.in_netns(|| {
        std::fs::read_to_string("/proc/thread-self/net/dev")
            .expect("read /proc/thread-self/net/dev")
            .lines()
            .skip(2)
            .filter_map(|l| l.split(':').next().map(|n| n.trim().to_string()))
            .collect()
    });
    assert!(
        ifaces.contains(&"lo".to_string()) && ifaces.contains(&"d0".to_string()),
        "{ifaces:?}"
    );
    assert!(
        ifaces
            .iter()
            .all(|i| ["lo", "d0", "d0p"].contains(&i.as_str())),
        "the namespace should hold nothing but lo and d0 (and its veth peer): {ifaces:?}"
    );
    let addrs = ns.ip(&["addr", "show", "dev", "d0"]);
    for a in llm_egress_tests::TEST_ADDRS {
        assert!(addrs.contains(a), "d0 should carry {a}:\n{addrs}");
    }
    assert!(
        addrs
            .lines()
            .filter(|l| l.contains("scope global"))
            .all(|l| !l.contains("tentative")),
        "the test IPv6 addresses must be usable at once (nodad):\n{addrs}"
    );
}

#[test]
fn guards_leave_no_cgroup_netns_or_pin_dir_behind() {
    require_root();
    let cg = CgroupGuard::new("harness-cleanup");
    let ns = NetnsGuard::new();
    let pin = PinDir::new();
    let (cg_path, ns_name, ns_path, pin_path) = (
        cg.path().to_path_buf(),
        ns.name().to_string(),
        ns.path(),
        pin.path().to_path_buf(),
    );
    let leaf = cg.child("x/y/z");
    cg.child("x/w");
    assert!(leaf.is_dir());
    // A probe ran in the deepest cgroup and the namespace.
    let _ = probe().connect(&leaf, &ns, "192.0.2.1:1");
    std::fs::create_dir_all(pin_path.join("sub")).expect("mkdir in bpffs");
    bpf::pin_test_map(&pin_path.join("sub/map")).expect("pin a test map");
    let pinned = bpf::pinned_objects(&pin_path);
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    assert_eq!(pinned[0].kind, ObjKind::Map, "{pinned:?}");
    assert!(
        netns_listed(&ns_name),
        "netns {ns_name} should exist while its guard lives"
    );

    drop(pin);
    drop(ns);
    drop(cg);

    assert!(
        !cg_path.exists(),
        "the cgroup {} is still there after drop",
        cg_path.display()
    );
    assert!(
        !ns_path.exists(),
        "the netns file {} is still there after drop",
        ns_path.display()
    );
    assert!(
        !netns_listed(&ns_name),
        "`ip netns list` still shows {ns_name}"
    );
    assert!(
        !pin_path.exists(),
        "the pin dir {} is still there after drop",
        pin_path.display()
    );
}

#[test]
fn cgroup_guard_kills_what_runs_inside_on_drop() {
    require_root();
    let cg = CgroupGuard::new("harness-kill");
    let dir = cg.child("busy/deeper");
    let mut sleeper = Command::new("sleep")
        .arg("300")
        .spawn()
        .expect("spawn sleep");
    std::fs::write(dir.join("cgroup.procs"), sleeper.id().to_string())
        .expect("move sleep into the cgroup");
    assert_eq!(cg.procs("busy/deeper"), vec![sleeper.id()]);
    let path = cg.path().to_path_buf();
    drop(cg);
    let status = sleeper.wait().expect("wait for sleep");
    assert!(
        !status.success(),
        "the sleeper should have been killed by cgroup.kill, it exited {status}"
    );
    assert!(
        !path.exists(),
        "the cgroup {} is still there after drop",
        path.display()
    );
}

#[test]
fn cgroup_ids_are_distinct_directory_inodes() {
    require_root();
    let cg = CgroupGuard::new("harness-ids");
    cg.child("a/b");
    let (root, a, b) = (cg.id(""), cg.id("a"), cg.id("a/b"));
    assert!(root != a && a != b && root != b, "ids {root} {a} {b}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(cg.path().join("a")).unwrap().ino(), a);
}

#[test]
fn a_fresh_cgroup_has_no_sock_addr_programs() {
    require_root();
    let cg = CgroupGuard::new("harness-query");
    let counts = bpf::sock_addr_prog_counts(cg.path(), false);
    assert!(
        counts.iter().all(|(_, n)| *n == 0),
        "nothing should be attached to a new cgroup: {counts:?}"
    );
}

#[test]
fn agent_binary_is_looked_up_next_to_the_test_deps() {
    if std::env::var_os("LLM_EGRESS_BIN").is_some() {
        return;
    }
    let bin = agent_bin();
    assert_eq!(bin.file_name().and_then(|n| n.to_str()), Some("llm-egress"));
    let probe = Path::new(env!("CARGO_BIN_EXE_egress-probe"));
    assert_eq!(
        bin.parent(),
        probe.parent(),
        "the agent is expected beside egress-probe in target/<profile>/"
    );
}

#[test]
fn dns_server_answers_its_names_only_and_stops_on_drop() {
    require_root();
    let dns = DnsServer::start(&[("llm.test.example", Ipv4Addr::new(10, 20, 0, 1))]);
    let answer = query_a(dns.addr(), "llm.test.example", WAIT);
    assert_eq!(
        answer,
        Ok(vec![Ipv4Addr::new(10, 20, 0, 1)]),
        "dnsmasq on {} should answer its record:\n{}",
        dns.addr(),
        dns.log_tail()
    );
    let answer = query_a(dns.addr(), "api.openai.com", WAIT);
    assert_eq!(
        answer,
        Ok(vec![]),
        "any other name gets NXDOMAIN, never an answer from upstream:\n{}",
        dns.log_tail()
    );
    let pid = dns.pid();
    drop(dns);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "dnsmasq (pid {pid}) still runs after its guard was dropped"
    );
}

#[test]
fn confine_runs_a_program_in_the_cgroup_and_the_netns() {
    require_root();
    let cg = CgroupGuard::new("harness-confine");
    let dir = cg.child("c");
    let ns = NetnsGuard::new();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "cat /proc/self/cgroup; readlink /proc/self/ns/net"]);
    confine(&mut cmd, &dir, &ns);
    let out = cmd.output().expect("run sh in the cgroup and netns");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "sh failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected_cgroup = format!("0::/{}/c", cg.name());
    assert!(
        stdout.lines().any(|l| l.ends_with(&expected_cgroup)),
        "the program should run in cgroup ...{expected_cgroup}:\n{stdout}"
    );
    let ns_ino = std::fs::metadata(ns.path())
        .expect("stat the netns file")
        .ino();
    assert!(
        stdout.contains(&format!("net:[{ns_ino}]")),
        "the program should run in netns {} (net:[{ns_ino}]):\n{stdout}",
        ns.name()
    );
}

#[test]
fn http_server_answers_200_with_its_body() {
    require_root();
    let ns = NetnsGuard::new();
    let server = HttpServer::start(&ns, "192.0.2.1:8080");
    let r = ns
        .in_netns(|| http::get(server.addr(), "/", WAIT))
        .expect("GET / from the HTTP test server");
    assert_eq!((r.status, r.body.as_str()), (200, HTTP_BODY));
    assert_eq!(server.wait_for_count(1, WAIT), 1);
}

#[test]
fn connect_for_counts_connects_the_server_accepted() {
    require_root();
    let cg = CgroupGuard::new("harness-connect-for");
    let ns = NetnsGuard::new();
    let srv = TcpServer::start(&ns, "10.20.0.1:8443");
    let p = probe();
    let r = p.connect_for(cg.path(), &ns, "10.20.0.1:8443", 300, 0);
    assert!(r.ok > 0, "back-to-back connects for 300 ms: {r:?}");
    assert_eq!(
        (r.eperm, r.other_failures, r.first_other_error.as_deref()),
        (0, 0, None),
        "nothing refuses connects without the agent: {r:?}"
    );
    assert!(
        r.elapsed >= Duration::from_millis(300) && r.elapsed < Duration::from_secs(2),
        "the loop runs for the given time: {r:?}"
    );
    assert_eq!(
        srv.wait_for_count(r.ok as usize, WAIT),
        r.ok as usize,
        "the server should have accepted every connect the probe counted as ok: {r:?}"
    );

    // Paced: one connect every 10 ms for 200 ms is about 20.
    let r = p.connect_for(cg.path(), &ns, "10.20.0.1:8443", 200, 10_000);
    assert!(
        (15..=20).contains(&r.ok) && r.attempts() == r.ok,
        "one connect per 10 ms for 200 ms: {r:?}"
    );

    let r = p.connect_for(cg.path(), &ns, "10.20.0.1:1", 50, 1_000);
    assert!(
        r.ok == 0 && r.eperm == 0 && r.other_failures > 0,
        "connects to a closed port fail otherwise than EPERM: {r:?}"
    );
    assert_eq!(
        r.first_other_error.as_deref(),
        Some("ECONNREFUSED"),
        "{r:?}"
    );
}

#[test]
fn concurrent_connect_for_probes_all_report() {
    require_root();
    let cg = CgroupGuard::new("harness-concurrent");
    let ns = NetnsGuard::new();
    let srv = TcpServer::start(&ns, "192.0.2.1:8443");
    let p = probe();
    let dir = cg.child("clients");
    let spawned: Vec<_> = (0..3)
        .map(|_| p.spawn_connect_for(&dir, &ns, "192.0.2.1:8443", 300, 1_000))
        .collect();
    let mut pids: Vec<u32> = spawned.iter().map(|s| s.pid()).collect();
    let reports: Vec<ConnectForReport> =
        spawned.into_iter().map(|s| s.wait_connect_for()).collect();
    assert_eq!(reports.len(), 3);
    for r in &reports {
        assert!(
            r.ok > 0 && r.eperm == 0 && r.other_failures == 0,
            "every probe connects: {reports:?}"
        );
    }
    let mut reported: Vec<u32> = reports.iter().map(|r| r.pid).collect();
    pids.sort_unstable();
    reported.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 3, "three distinct processes");
    assert_eq!(reported, pids, "each report comes from its own process");
    let total: u64 = reports.iter().map(|r| r.ok).sum();
    assert_eq!(
        srv.wait_for_count(total as usize, WAIT),
        total as usize,
        "the server accepted what the three probes counted: {reports:?}"
    );
}

#[test]
fn upload_reaches_the_sink_in_full() {
    require_root();
    let cg = CgroupGuard::new("harness-upload");
    let ns = NetnsGuard::new();
    let sink = ByteServer::sink(&ns, "198.51.100.1:9000");
    let p = probe();
    let r = p
        .upload(cg.path(), &ns, "198.51.100.1:9000", 500)
        .unwrap_or_else(|e| panic!("upload: connect failed: {}", describe(&Err(e))));
    println!(
        "upload: {} bytes in {:?} ({:.0} MB/s), retrans {}, rtt {} us",
        r.bytes,
        r.elapsed,
        r.rate() / 1e6,
        r.retrans,
        r.rtt_us
    );
    assert_eq!(r.error, None, "the upload ended on an error: {r:?}");
    assert!(
        r.elapsed >= Duration::from_millis(250) && r.elapsed <= Duration::from_millis(800),
        "writes go on for about 500 ms: {r:?}"
    );
    assert!(
        r.rate() > 10e6,
        "more than 10 MB/s within one namespace: {r:?}"
    );
    assert_eq!(
        sink.wait_for_bytes(r.bytes, WAIT),
        r.bytes,
        "the sink received exactly what the probe wrote: {r:?}"
    );
    assert_eq!(sink.count(), 1);

    // Two at once: one handler thread per connection.
    let a = p.spawn_upload(cg.path(), &ns, "198.51.100.1:9000", 300);
    let b = p.spawn_upload(cg.path(), &ns, "198.51.100.1:9000", 300);
    let (a, b) = (a.wait_transfer(), b.wait_transfer());
    let (a, b) = (a.expect("first upload"), b.expect("second upload"));
    assert!(a.bytes > 0 && b.bytes > 0, "{a:?} {b:?}");
    let expected = r.bytes + a.bytes + b.bytes;
    assert_eq!(sink.wait_for_bytes(expected, WAIT), expected);
    assert_eq!(sink.count(), 3);

    let r = p.upload(cg.path(), &ns, "198.51.100.1:1", 100);
    assert_eq!(
        r.as_ref().map(|_| ()),
        Err(&libc::ECONNREFUSED),
        "nothing listens on port 1: {r:?}"
    );

    // A client that stays connected does not keep the sink from stopping.
    let idle = ns.in_netns(|| TcpStream::connect("198.51.100.1:9000"));
    let _idle = idle.expect("connect to the sink");
    sink.wait_for_count(4, WAIT);
    let start = Instant::now();
    drop(sink);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "dropping the sink took {:?}",
        start.elapsed()
    );
}

#[test]
fn download_from_the_source_lasts_the_given_time() {
    require_root();
    let cg = CgroupGuard::new("harness-download");
    let ns = NetnsGuard::new();
    let source = ByteServer::source(&ns, "[2001:db8::1]:9001");
    let p = probe();
    let r = p
        .download(cg.path(), &ns, "[2001:db8::1]:9001", 500)
        .unwrap_or_else(|e| panic!("download: connect failed: {}", describe(&Err(e))));
    println!(
        "download: {} bytes in {:?} ({:.0} MB/s), retrans {}, rtt {} us",
        r.bytes,
        r.elapsed,
        r.rate() / 1e6,
        r.retrans,
        r.rtt_us
    );
    assert!(r.bytes > 0, "{r:?}");
    assert!(
        !r.eof && r.error.is_none(),
        "the source sends until the client closes: {r:?}"
    );
    assert!(
        r.elapsed >= Duration::from_millis(500) && r.elapsed <= Duration::from_millis(800),
        "reads go on for about 500 ms: {r:?}"
    );
    let written = source.wait_for_bytes(r.bytes, WAIT);
    assert!(
        written >= r.bytes,
        "the source wrote at least what the probe read: {written} < {}",
        r.bytes
    );
    assert_eq!(source.count(), 1);

    // Two at once, and a client that keeps its connection open without
    // reading does not keep the source from stopping.
    let a = p.spawn_download(cg.path(), &ns, "[2001:db8::1]:9001", 300);
    let b = p.spawn_download(cg.path(), &ns, "[2001:db8::1]:9001", 300);
    let (a, b) = (a.wait_transfer(), b.wait_transfer());
    let (a, b) = (a.expect("first download"), b.expect("second download"));
    assert!(a.bytes > 0 && b.bytes > 0, "{a:?} {b:?}");
    let idle = ns.in_netns(|| TcpStream::connect("[2001:db8::1]:9001"));
    let _idle = idle.expect("connect to the source");
    source.wait_for_count(4, WAIT);
    std::thread::sleep(Duration::from_millis(100));
    let start = Instant::now();
    drop(source);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "dropping the source took {:?}",
        start.elapsed()
    );
}
