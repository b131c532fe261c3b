//! Debian's `redis-server` on a host where systemd is PID 1 (docs/fleet.md,
//! "Hosts where systemd runs Debian's redis"): installing the package
//! there also starts Debian's own service on 127.0.0.1:6379. A Debian 12
//! machine with the package, booted with systemd as PID 1 under
//! `systemd-nspawn -b` (tests/src/nspawn.rs, in a network namespace of its
//! own), shows that the service runs on 6379, that the fleet tests' servers
//! (the harness's very arguments, `SERVER_ARGS`, on a port of their own)
//! start beside it and keep their data apart, and that setup's check of
//! the package (`dpkg-query`) finds it installed, so setup does nothing to
//! the running service.
//!
//! Needs root, `mmdebstrap` and `systemd-nspawn` (`cargo xtask setup`); the
//! first run builds the root file system from Debian's archive (~60 s, then
//! cached under the target directory).

use std::time::Duration;

use llm_egress_tests::{
    TempDir,
    nspawn::{Machine, rootfs_with},
    redis::{DEBIAN_REDIS_PORT, SERVER_ARGS},
    require_root, wait_until,
};

/// The port the test's own server takes inside the machine (its network
/// namespace has only `lo`: nothing else listens there).
const TEST_PORT: u16 = 42_379;

#[test]
fn debian_redis_under_systemd_leaves_the_fleet_test_servers_alone() {
    require_root();
    let dir = TempDir::new("llm-egress-test-redis-systemd");
    let root = rootfs_with("bookworm", "redis-server");
    let m = Machine::boot_root(root, "redis", &[], &dir.path().join("nspawn.log"));
    // Debian's service, started by systemd as the package enables it.
    let active = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let out = m.sh("systemctl is-active redis-server.service");
        (String::from_utf8_lossy(&out.stdout).trim() == "active").then_some(())
    });
    assert!(
        active.is_some(),
        "Debian's redis-server.service is not active\n{}\n{}",
        m.sh_ok("systemctl status redis-server.service --no-pager || true"),
        m.log()
    );
    let cli = |port: u16, args: &str| m.sh_ok(&format!("redis-cli -p {port} {args}"));
    let pong = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (cli(DEBIAN_REDIS_PORT, "PING").trim() == "PONG").then_some(())
    });
    assert!(pong.is_some(), "nothing answers on {DEBIAN_REDIS_PORT}");
    assert_eq!(cli(DEBIAN_REDIS_PORT, "SET owner debian").trim(), "OK");

    // A test server as tests/src/redis.rs starts it, beside the service.
    let args = SERVER_ARGS
        .iter()
        .map(|a| {
            if a.is_empty() {
                "''".to_string()
            } else {
                a.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    m.sh_ok(&format!(
        "mkdir -p /tmp/t && redis-server {args} --dir /tmp/t --port {TEST_PORT} --daemonize yes"
    ));
    let up = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (cli(TEST_PORT, "PING").trim() == "PONG").then_some(())
    });
    assert!(
        up.is_some(),
        "the test server did not start beside Debian's"
    );
    // Apart: neither sees the other's keys, and Debian's config is not the
    // test server's (its dir is the test's).
    assert_eq!(cli(TEST_PORT, "GET owner").trim(), "");
    assert_eq!(cli(TEST_PORT, "SET owner test").trim(), "OK");
    assert_eq!(cli(DEBIAN_REDIS_PORT, "GET owner").trim(), "debian");
    assert_eq!(
        cli(TEST_PORT, "CONFIG GET dir").lines().nth(1),
        Some("/tmp/t")
    );
    assert_eq!(
        cli(DEBIAN_REDIS_PORT, "CONFIG GET dir").lines().nth(1),
        Some("/var/lib/redis")
    );
    // Setup checks packages with dpkg-query and installs only what is
    // missing: with the package installed it runs nothing against the
    // service, which is still the one systemd started.
    assert_eq!(
        m.sh_ok("dpkg-query -W -f='${Status}' redis-server").trim(),
        "install ok installed"
    );
    let main_pid = m.sh_ok("systemctl show -p MainPID --value redis-server.service");
    m.sh_ok(&format!("redis-cli -p {TEST_PORT} SHUTDOWN NOSAVE || true"));
    assert_eq!(
        m.sh_ok("systemctl is-active redis-server.service").trim(),
        "active"
    );
    assert_eq!(
        m.sh_ok("systemctl show -p MainPID --value redis-server.service"),
        main_pid
    );
}
