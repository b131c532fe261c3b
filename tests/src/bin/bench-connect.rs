//! `cargo xtask bench`: the cost of the connect-time verdict.
//!
//! A `connect()` + `close()` loop to a listener inside a test namespace, run
//! by the same probe binary from two sibling cgroups at the same time of the
//! same run: one under the agent's attach cgroup (a workload of a policy with
//! 1,000 CIDR rules, so every connect runs the programs: workload walk, rule
//! and provider lookups), one outside it (no program runs: the same as no
//! agent). Many short rounds (1,000 connects, ~35 ms) alternate between the
//! two so that drift of the machine hits both alike; the report is the
//! median of the per-round ratios (each enforced loop against the baseline
//! loop next to it in time), its 95 % interval, and the ratio of the medians.
//! Every round measures each destination of [`DESTINATIONS`] (a plain
//! allowed address, a provider's, the provider's from a workload with a
//! connection rate), each against a baseline loop of its own to the same
//! address; `plain_echo` is the other kind of loop: 64-byte round trips on
//! one open connection, what the per-packet programs cost traffic that
//! makes no connect. This runs once with `programs = "connect"` (the connect-time
//! verdict alone) and once with `programs = "all"` (every program), each
//! with an agent of its own.
//!
//! Then each set's agent carries provider connections (with `"all"` every
//! one tracked, reported and logged; with `"connect"` a decision event and
//! an audit line each): CPU and RSS per round of
//! PROVIDER_CONNECTS_PER_ROUND connections at full speed. The rounds are a
//! soak of its memory: the bench exits 1 when the RSS grows after the
//! first (warm-up) round by more than `RSS_SLACK_KIB` or 10 %.
//!
//! Usage: bench-connect [ROUNDS] [OPERATIONS_PER_ROUND] [PROVIDER_ROUNDS]
//! (default 401 × 1000 connects or round trips, then 5 provider rounds of 10,000).
//! `BENCH_PROGRAMS=connect` (or `all`) runs that set only;
//! `BENCH_DESTS=plain,provider` (names of [`DESTINATIONS`]) those
//! destinations only; `provider_budget` and `provider_fleet` (a token
//! budget of host scope, and the same budget of fleet scope on a Redis
//! ledger the bench starts on loopback) run only when named there, with
//! `BENCH_PROGRAMS=all` (budgets need it): fleet mode must cost the connect
//! path nothing more. `BENCH_AA=1` runs
//! the "enforced" loop from a cgroup of the same depth outside the attach
//! cgroup: an A/A run, which shows the bench's own noise.
//!
//! Experiments on the hook set (not an agent anyone runs; the report says
//! so): `BENCH_DETACH=sock_ops,skb_egress,skb_ingress` (any of them)
//! detaches those hooks' programs from the attach cgroup once the agent
//! has attached them, and `BENCH_NOOP=sock_release` attaches a program
//! that returns at once to cgroup/sock_release, a hook the agent does not
//! use: what entering it would cost (docs/benchmarks.md, "The floor").
//! Both apply to the connect loops; run them with 0 provider rounds.

use std::{fmt::Write as _, path::PathBuf};

use std::os::fd::AsRawFd;

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, Probe,
    bench::{median, median_ci95, pin_to},
    bpf, require_root, toml_str,
};

/// A listener that accepts as fast as it can (blocking accept, deep
/// backlog), so the loop measures connect() and not a full accept queue.
fn fast_listener(netns: &NetnsGuard, addr: &str) -> std::net::SocketAddr {
    let addr: std::net::SocketAddr = addr.parse().expect("listener address");
    let listener = netns
        .in_netns(|| std::net::TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("bench listener on {addr}: {e}"));
    // SAFETY: listen(2) on a socket we own; raises the backlog of std's 128.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    addr
}

fn probe_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.join("egress-probe")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "egress-probe not found next to bench-connect: build the tests package's binaries"
            )
        })
}

/// The plain destination: allowed by a CIDR of the workload, no provider.
const PLAIN_ADDR: &str = "192.0.2.1:9000";
/// An echo server in the same allowed network, for the per-packet loop.
const ECHO_ADDR: &str = "192.0.2.1:9007";
/// The provider destination: in the static `cidrs` of provider `bench-llm`,
/// which both workloads allow by name.
const PROVIDER_ADDR: &str = "10.20.0.1:9443";
/// The workload cgroups (below the attach cgroup, or the A/A cgroup).
const WORKLOAD_CGROUP: &str = "system.slice/bench.service";
const RATE_WORKLOAD_CGROUP: &str = "system.slice/bench-rate.service";
const BUDGET_WORKLOAD_CGROUP: &str = "system.slice/bench-budget.service";
const FLEET_WORKLOAD_CGROUP: &str = "system.slice/bench-fleet.service";
/// Destinations measured only when `BENCH_DESTS` names them.
const ON_REQUEST: [&str; 2] = ["provider_budget", "provider_fleet"];

/// What a loop measures, one operation at a time.
#[derive(Clone, Copy, PartialEq)]
enum Loop {
    /// `connect()` + `close()`.
    ConnectClose,
    /// A 64-byte write and its 64-byte echo on one open connection: two
    /// packets with payload (and the ACKs that ride on them), no connect.
    Echo,
}

/// What the loops connect to, each from its workload: (name in the report,
/// address, workload cgroup, loop, what it shows).
const DESTINATIONS: [(&str, &str, &str, Loop, &str); 6] = [
    (
        "plain",
        PLAIN_ADDR,
        WORKLOAD_CGROUP,
        Loop::ConnectClose,
        "an address allowed by the workload's CIDR rule: no event, no limits",
    ),
    (
        "plain_echo",
        ECHO_ADDR,
        WORKLOAD_CGROUP,
        Loop::Echo,
        "64-byte round trips on one open connection to an allowed address: the packet hooks (cgroup_skb) per packet, no connect",
    ),
    (
        "provider",
        PROVIDER_ADDR,
        WORKLOAD_CGROUP,
        Loop::ConnectClose,
        "a provider's static CIDR, allowed by name, no limits: a decision event each",
    ),
    (
        "provider_rate",
        PROVIDER_ADDR,
        RATE_WORKLOAD_CGROUP,
        Loop::ConnectClose,
        "the same provider from a workload with connections_per_second (never reached): the bucket's spin lock too",
    ),
    (
        "provider_budget",
        PROVIDER_ADDR,
        BUDGET_WORKLOAD_CGROUP,
        Loop::ConnectClose,
        "the same provider from a workload with a token budget of host scope (never spent): the BUDGET_SPENT check",
    ),
    (
        "provider_fleet",
        PROVIDER_ADDR,
        FLEET_WORKLOAD_CGROUP,
        Loop::ConnectClose,
        "the same budget of fleet scope, leased from a Redis ledger: the same kernel path",
    ),
];

/// A policy whose workloads have 1,000 entries each: 999 denied /24s they
/// never reach, and the allowed network of the plain listener; both allow
/// the provider `bench-llm`, and `bench-rate` has a connection rate far
/// above what the loop reaches (every connect takes from the bucket, none
/// is refused). `programs`: the policy's `programs` key ("all" or
/// "connect"). With `fleet` (a ledger's URL), workloads `bench-budget` and
/// `bench-fleet` have the same token budget, of host and of fleet scope.
fn policy(attach: &std::path::Path, programs: &str, fleet: Option<&str>) -> String {
    let mut deny = String::new();
    for i in 0..999u32 {
        let _ = write!(deny, "\"10.{}.{}.0/24\", ", 100 + i / 256, i % 256);
    }
    let budgets = match fleet {
        None => String::new(),
        Some(url) => {
            let workload = |name: &str, cgroup: &str, scope: &str| {
                format!(
                    "[[workloads]]\nname = \"{name}\"\ncgroup = {}\nallow = [\"192.0.2.0/24\", \"bench-llm\"]\ndeny = [{deny}]\nother = \"deny\"\n[workloads.limits]\ntokens_per_day = 1000000000000\nscope = \"{scope}\"\n",
                    toml_str(cgroup)
                )
            };
            format!(
                "{}{}[fleet]\nservers = [{}]\nkey_prefix = \"bench\"\n",
                workload("bench-budget", BUDGET_WORKLOAD_CGROUP, "host"),
                workload("bench-fleet", FLEET_WORKLOAD_CGROUP, "fleet"),
                toml_str(url)
            )
        }
    };
    format!(
        r#"mode = "enforce"
programs = {}
cgroup = {}
[resolver]
servers = ["127.0.0.1:1"]
[[providers]]
name = "bench-llm"
cidrs = ["10.20.0.0/16"]
[[workloads]]
name = "bench"
cgroup = {}
allow = ["192.0.2.0/24", "bench-llm"]
deny = [{deny}]
other = "deny"
[[workloads]]
name = "bench-rate"
cgroup = {}
allow = ["192.0.2.0/24", "bench-llm"]
deny = [{deny}]
other = "deny"
[workloads.limits]
connections_per_second = 1000000
burst = 1000000
{budgets}"#,
        toml_str(programs),
        toml_str(&attach.display().to_string()),
        toml_str(WORKLOAD_CGROUP),
        toml_str(RATE_WORKLOAD_CGROUP),
    )
}

/// (CPU seconds used so far, resident set in KiB) of process `pid`.
fn cpu_and_rss(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after ") ".
    let cpu = (ticks(11) + ticks(12)) / hz;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

/// Connections per round of the provider load: enough for the agent's CPU
/// time (read in clock ticks) to be measured to a few percent.
const PROVIDER_CONNECTS_PER_ROUND: u64 = 10_000;

/// Agent cost under provider connections: every connection is tracked
/// (decision event, sock_ops summary, metrics, an audit line). Rounds of
/// `n` connections at full speed; per round the agent's CPU and RSS.
fn provider_load(
    agent: &Agent,
    probe: &Probe,
    workload: &std::path::Path,
    netns: &NetnsGuard,
    target: &str,
    rounds: usize,
    n: u64,
) -> serde_json::Value {
    let mut out = Vec::new();
    for round in 0..rounds {
        if stopped() {
            break;
        }
        let (cpu0, _) = cpu_and_rss(agent.pid());
        let started = std::time::Instant::now();
        let r = probe.connect_loop(workload, netns, target, n);
        assert_eq!(
            r.failures, 0,
            "provider connect loop failed (errno {:?})",
            r.errno
        );
        let loop_s = r.elapsed_ns as f64 / 1e9;
        // Let the agent drain what the loop queued before reading its CPU.
        std::thread::sleep(std::time::Duration::from_secs(2));
        let wall = started.elapsed().as_secs_f64();
        let (cpu1, rss) = cpu_and_rss(agent.pid());
        let cpu = cpu1 - cpu0;
        let rate = n as f64 / loop_s;
        eprintln!(
            "provider round {round}: {rate:.0} connections/s, agent CPU {cpu:.2} s ({:.0}% of one core over the loop), {:.2} ms CPU per 1,000 connections, RSS {rss} KiB",
            100.0 * cpu / loop_s,
            1e6 * cpu / n as f64
        );
        out.push(serde_json::json!({
            "connections_per_s": rate.round(),
            "agent_cpu_s": (cpu * 1000.0).round() / 1000.0,
            "agent_cpu_percent_of_core_during_loop": (100.0 * cpu / loop_s).round(),
            "agent_cpu_ms_per_1000_connections": (1e7 * cpu / n as f64).round() / 10.0,
            "agent_rss_kib": rss,
            "wall_s": (wall * 100.0).round() / 100.0,
        }));
    }
    let lost = agent
        .metric_value("llm_egress_events_lost_total", &[])
        .unwrap_or(0.0);
    // RSS after the warm-up round against the highest after it.
    let rss: Vec<u64> = out
        .iter()
        .filter_map(|r| r["agent_rss_kib"].as_u64())
        .collect();
    let warm = rss.first().copied().unwrap_or(0);
    let growth = rss
        .iter()
        .skip(1)
        .max()
        .map_or(0, |m| m.saturating_sub(warm));
    let flat = growth <= RSS_SLACK_KIB.max(warm / 10);
    serde_json::json!({"bench": "provider_connection_load", "connections_per_round": n, "rounds": out, "events_lost_total": lost, "rss_after_warmup_kib": warm, "rss_growth_after_warmup_kib": growth, "rss_flat": flat})
}

/// Set by SIGINT or SIGTERM: the bench stops after the round it is in and
/// exits normally, so that its cgroups, namespace and agent are removed.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
}

fn stopped() -> bool {
    let stop = STOP.load(std::sync::atomic::Ordering::SeqCst);
    if stop {
        eprintln!("bench: stopping after this round (signal); cleaning up");
    }
    stop
}

/// Pins the calling thread (and what it spawns from now on) to `cpu`.
fn main() {
    require_root();
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(401);
    let n: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let provider_rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);

    // SAFETY: the handler only stores to an atomic, which is signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_stop_signal as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as *const () as libc::sighandler_t,
        );
    }
    // With two or more CPUs the listener threads and the agent stay on
    // CPU 0 and each measured loop runs alone on CPU 1, so that neither
    // side of a round shares its CPU with them.
    let pinned = pin_to(0);
    let enforced = CgroupGuard::new("bench-on");
    // BENCH_AA=1: the "enforced" loops run from cgroups of the same depth
    // outside the attach cgroup (an A/A run: what the bench reports when
    // nothing differs but the cgroup).
    let aa_root = CgroupGuard::new("bench-aa");
    let aa = std::env::var_os("BENCH_AA").is_some();
    let workload_root = if aa { &aa_root } else { &enforced };
    let baseline = CgroupGuard::new("bench-off");
    let netns = NetnsGuard::new();
    fast_listener(&netns, PLAIN_ADDR);
    fast_listener(&netns, PROVIDER_ADDR);
    let _echo = llm_egress_tests::servers::ByteServer::echo(&netns, ECHO_ADDR);
    let probe = Probe::new(probe_bin());
    // BENCH_DESTS=provider,plain: only these destinations (quick runs).
    let only = std::env::var("BENCH_DESTS").ok();
    let dests: Vec<Destination> = DESTINATIONS
        .iter()
        .filter(|(name, ..)| match only.as_deref() {
            Some(o) => o.split(',').any(|x| x.trim() == *name),
            None => !ON_REQUEST.contains(name),
        })
        .map(|&(name, addr, cgroup, kind, what)| Destination {
            name,
            addr,
            workload: workload_root.child(cgroup),
            kind,
            what,
        })
        .collect();
    assert!(
        !dests.is_empty(),
        "BENCH_DESTS names none of plain, plain_echo, provider, provider_rate, provider_budget, provider_fleet"
    );
    // The budget destinations: a Redis ledger on loopback for the fleet one.
    let redis = dests
        .iter()
        .any(|d| ON_REQUEST.contains(&d.name))
        .then(|| llm_egress_tests::redis::RedisServer::start(Default::default()));
    let fleet_url = redis.as_ref().map(|r| r.url());
    assert!(
        redis.is_none() || std::env::var("BENCH_PROGRAMS").as_deref() == Ok("all"),
        "provider_budget and provider_fleet need token budgets, which need programs = \"all\": run them with BENCH_PROGRAMS=all"
    );
    let bench = Bench {
        enforced: enforced.path(),
        dests: &dests,
        baseline: baseline.path(),
        netns: &netns,
        probe: &probe,
        aa,
        pinned,
        fleet: fleet_url.as_deref(),
    };
    // Both sets by default: the connect-time verdict alone, then every
    // program (whose agent then also carries the provider load).
    let sets = match std::env::var("BENCH_PROGRAMS") {
        Ok(p) => vec![p],
        Err(_) => vec!["connect".to_owned(), "all".to_owned()],
    };
    let mut grew = Vec::new();
    for programs in &sets {
        let Some(agent) = connect_loop(&bench, programs, rounds, n) else {
            return;
        };
        if provider_rounds == 0 {
            continue;
        }
        let (_, rss_before) = cpu_and_rss(agent.pid());
        let load = provider_load(
            &agent,
            &probe,
            &workload_root.child(WORKLOAD_CGROUP),
            &netns,
            PROVIDER_ADDR,
            provider_rounds,
            PROVIDER_CONNECTS_PER_ROUND,
        );
        println!(
            "{}",
            serde_json::json!({"programs": programs, "load": load})
        );
        println!("[{programs}] agent RSS before the provider load: {rss_before} KiB");
        if load["rss_flat"] == false {
            grew.push(format!(
                "[{programs}] agent RSS grew by {} KiB after the warm-up round",
                load["rss_growth_after_warmup_kib"]
            ));
        }
    }
    if !grew.is_empty() {
        eprintln!("bench: the memory soak failed:\n{}", grew.join("\n"));
        std::process::exit(1);
    }
}

/// The soak's allowance: after the first (warm-up) round of the provider
/// load, the agent's RSS may grow by this much or 10 %, whichever is more
/// (allocator and page noise), and no more.
const RSS_SLACK_KIB: u64 = 2048;

/// One destination of the connect loops, reached from `workload`.
struct Destination {
    name: &'static str,
    addr: &'static str,
    workload: PathBuf,
    kind: Loop,
    what: &'static str,
}

impl Destination {
    /// `n` operations of this destination's loop from `cgroup`.
    fn run(
        &self,
        probe: &Probe,
        cgroup: &std::path::Path,
        netns: &NetnsGuard,
        n: u64,
    ) -> llm_egress_tests::LoopReport {
        match self.kind {
            Loop::ConnectClose => probe.connect_loop(cgroup, netns, self.addr, n),
            Loop::Echo => probe.echo_loop(cgroup, netns, self.addr, n),
        }
    }
}

/// What the connect loops of every program set share.
struct Bench<'a> {
    /// The attach cgroup.
    enforced: &'a std::path::Path,
    dests: &'a [Destination],
    baseline: &'a std::path::Path,
    netns: &'a NetnsGuard,
    probe: &'a Probe,
    aa: bool,
    pinned: bool,
    /// The fleet ledger's URL when a budget destination is measured.
    fleet: Option<&'a str>,
}

/// Per-round loop times (ns per operation) of one destination.
#[derive(Default)]
struct Rounds {
    on: Vec<f64>,
    off: Vec<f64>,
}

/// Starts an agent with `programs = PROGRAMS`, runs the alternating rounds
/// and prints the report, one per destination; returns the agent, or None
/// when a signal stopped the bench before a round completed.
fn connect_loop(b: &Bench, programs: &str, rounds: usize, n: u64) -> Option<Agent> {
    let Bench {
        enforced,
        dests,
        baseline,
        netns,
        probe,
        aa,
        pinned,
        fleet,
    } = *b;
    let agent = Agent::start(&policy(enforced, programs, fleet));
    let (_noops, hooks_changed) = hook_experiment(enforced);

    // Warm-up, and proof that the enforced loops really run the programs: a
    // denied destination fails from each workload and not from the
    // baseline, and every destination is allowed.
    for d in dests {
        let denied = probe.connect(&d.workload, netns, "198.51.100.1:9000");
        assert!(
            aa || denied == Err(libc::EPERM),
            "the workload's `other = deny` must refuse 198.51.100.1 (got {denied:?})"
        );
        let ok = probe.connect(&d.workload, netns, d.addr);
        assert_eq!(
            ok,
            Ok(()),
            "destination {} ({}) must be allowed",
            d.name,
            d.addr
        );
        let _ = d.run(probe, &d.workload, netns, 2_000);
        let _ = d.run(probe, baseline, netns, 2_000);
    }

    let mut results: Vec<Rounds> = dests.iter().map(|_| Rounds::default()).collect();
    let mut done = 0;
    for round in 0..rounds {
        if stopped() {
            break;
        }
        let mut line = format!("round {round}:");
        // Rotate which destination goes first, and alternate the order of
        // each pair too, so neither side nor any destination always leads.
        for k in 0..dests.len() {
            let di = (round + k) % dests.len();
            let d = &dests[di];
            let order: [bool; 2] = if round % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            for with_agent in order {
                let cg: &std::path::Path = if with_agent { &d.workload } else { baseline };
                if pinned {
                    pin_to(1);
                }
                let r = d.run(probe, cg, netns, n);
                if pinned {
                    pin_to(0);
                }
                assert_eq!(
                    r.failures, 0,
                    "loop to {} failed (errno {:?}); with_agent={with_agent}",
                    d.name, r.errno
                );
                let ns_per = r.elapsed_ns as f64 / r.n as f64;
                if with_agent {
                    results[di].on.push(ns_per)
                } else {
                    results[di].off.push(ns_per)
                }
            }
        }
        for (d, r) in dests.iter().zip(&results) {
            let _ = write!(line, " {} {:.0}/{:.0}", d.name, r.off[round], r.on[round]);
        }
        eprintln!("{line} ns per operation (baseline/enforced)");
        done += 1;
    }
    if done == 0 {
        eprintln!("bench: stopped before a round completed; nothing to report");
        return None;
    }
    let decisions = agent
        .metric_value("llm_egress_decisions_total", &[("verdict", "allow")])
        .unwrap_or(0.0);
    let lost = agent
        .metric_value("llm_egress_events_lost_total", &[])
        .unwrap_or(0.0);
    let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
    for (d, r) in dests.iter().zip(&results) {
        let (m_on, m_off) = (median(&r.on), median(&r.off));
        let ratio_of_medians = m_on / m_off;
        let ratios: Vec<f64> = r.on.iter().zip(&r.off).map(|(a, b)| a / b).collect();
        let ratio = median(&ratios);
        let (ci_lo, ci_hi) = median_ci95(&ratios);
        println!(
            "{}",
            serde_json::json!({
                "bench": if d.kind == Loop::Echo { "echo_loop" } else { "connect_close_loop" },
                "destination": d.name,
                "destination_addr": d.addr,
                "destination_is": d.what,
                "policy_entries": 1000,
                "rounds": r.on.len(),
                "operations_per_round": n,
                "loop_pinned_to_cpu1": pinned,
                "baseline_ns_per_op_median": m_off.round(),
                "enforced_ns_per_op_median": m_on.round(),
                "ratio": r3(ratio),
                "ratio_ci95": [r3(ci_lo), r3(ci_hi)],
                "a_a_run": aa,
                "programs": programs,
                "ratio_of_medians": r3(ratio_of_medians),
                "baseline_rounds": r.off.iter().map(|v| v.round()).collect::<Vec<_>>(),
                "enforced_rounds": r.on.iter().map(|v| v.round()).collect::<Vec<_>>(),
                "kernel_allow_decisions": decisions,
                "events_lost_total": lost,
                "hooks_changed": hooks_changed,
            })
        );
    }
    for (d, r) in dests.iter().zip(&results) {
        let ratios: Vec<f64> = r.on.iter().zip(&r.off).map(|(a, b)| a / b).collect();
        let ratio = median(&ratios);
        let (ci_lo, ci_hi) = median_ci95(&ratios);
        let ratio_of_medians = median(&r.on) / median(&r.off);
        println!(
            "ratio enforced/baseline [{programs}] {:<13} = {ratio:.3} (median of per-round ratios, 95 % CI {ci_lo:.3}-{ci_hi:.3}; ratio of medians {ratio_of_medians:.3}){}",
            d.name,
            if aa {
                " [A/A run: both loops outside the attach cgroup]"
            } else {
                ""
            }
        );
    }
    if !hooks_changed.is_empty() {
        println!("(an experiment, not the agent's hook set: {hooks_changed})");
    }
    Some(agent)
}

/// Applies `BENCH_DETACH` and `BENCH_NOOP` to the attach cgroup `cgroup`
/// (module docs): the no-op attachments (detached when dropped) and what
/// was changed, empty when nothing was.
fn hook_experiment(cgroup: &std::path::Path) -> (Vec<bpf::NoopAttachment>, String) {
    let names = |var: &str| -> Vec<String> {
        std::env::var(var)
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let mut changed = Vec::new();
    for name in names("BENCH_DETACH") {
        let Some((attach_type, hook)) = bpf::OTHER_HOOKS.iter().find(|(_, h)| *h == name) else {
            panic!("BENCH_DETACH: {name} is none of sock_ops, skb_egress, skb_ingress");
        };
        let n = bpf::detach_links(cgroup, *attach_type)
            .unwrap_or_else(|e| panic!("BENCH_DETACH {hook}: {e}"));
        assert!(n > 0, "BENCH_DETACH {hook}: nothing attached there");
        changed.push(format!("without {hook}"));
    }
    let mut noops = Vec::new();
    for name in names("BENCH_NOOP") {
        assert_eq!(name, "sock_release", "BENCH_NOOP: only sock_release");
        noops.push(
            bpf::attach_noop(
                cgroup,
                bpf::BPF_PROG_TYPE_CGROUP_SOCK,
                bpf::BPF_CGROUP_INET_SOCK_RELEASE,
            )
            .unwrap_or_else(|e| panic!("BENCH_NOOP sock_release: {e}")),
        );
        changed.push("with a no-op sock_release".to_owned());
    }
    (noops, changed.join(", "))
}
