//! Workload matching a non-root user cannot steer: a user with a delegated
//! cgroup subtree (systemd's `user@UID.service`, a `Delegate=` unit, a
//! rootless container runtime: each chowns its subtree to the user)
//! creates cgroups named like other workloads' units and globs, and must
//! not gain their rights (docs/policy.md, "Who can create what a selector
//! matches").
//!
//! The test cgroup plays the cgroup2 root: its `system.slice/…` and
//! `user.slice/…` are laid out like systemd's. "The user" is uid 65534
//! (nobody): the test chowns the delegated directory to it, as systemd
//! does, and creates the user's cgroups with `mkdir` run as that uid.
//! Processes are placed by the (root) probe: what is tested is who named
//! the cgroup, not who moves into it.
//!
//! Needs root, bpffs, and a built agent. Locals are declared cgroup, netns,
//! servers, agent, so they drop in the reverse order.

use std::{os::unix::process::CommandExt, path::Path, process::Command, time::Duration};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, TcpServer, require_root,
    scenario::{NEW_CGROUP_WAIT, SETTLE, expect_eperm, expect_ok, policy, probe},
};

/// The unprivileged user of these tests.
const USER: u32 = 65534;
/// Allowed for the workload a user tries to claim.
const CLAIMED: &str = "192.0.2.1:8443";
/// Allowed for the workload the user really is in.
const OWN: &str = "198.51.100.1:8443";

/// Hands `dir` to `USER`, as systemd (`Delegate=`, user@.service) does.
fn delegate(dir: &Path) {
    std::os::unix::fs::chown(dir, Some(USER), Some(USER))
        .unwrap_or_else(|e| panic!("cannot chown {} to {USER}: {e}", dir.display()));
    for f in ["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"] {
        let _ = std::os::unix::fs::chown(dir.join(f), Some(USER), Some(USER));
    }
}

/// `mkdir dir` as `USER`: a cgroup the user created.
fn mkdir_as_user(dir: &Path) {
    let out = Command::new("mkdir")
        .arg(dir)
        .uid(USER)
        .gid(USER)
        .output()
        .unwrap_or_else(|e| panic!("cannot run mkdir as uid {USER}: {e}"));
    assert!(
        out.status.success(),
        "mkdir {} as uid {USER}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir).unwrap());
    assert_eq!(owner, USER, "{} was made by the user", dir.display());
}

/// Waits until `workload` has `n` selected cgroups (the agent rescanned
/// after every cgroup made before this call).
fn wait_selected(agent: &Agent, workload: &str, n: f64) {
    agent.expect_metric(
        "llm_egress_workload_cgroups",
        &[("workload", workload)],
        |v| v == n,
        NEW_CGROUP_WAIT + Duration::from_secs(5),
    );
}

#[test]
fn a_users_x_service_in_its_delegated_subtree_does_not_get_xs_rights() {
    require_root();
    let cg = CgroupGuard::new("hostile-unit");
    let real = cg.child("system.slice/x.service");
    let manager = cg.child("user.slice/user-65534.slice/user@65534.service");
    delegate(&manager);
    // Slices all the way, but one the user may write to (not systemd's
    // doing; a hand-made delegation): only the ownership rule stops it.
    let open_slice = cg.child("system.slice/open.slice");
    delegate(&open_slice);
    let ns = NetnsGuard::new();
    let _claimed = TcpServer::start(&ns, CLAIMED);
    let _own = TcpServer::start(&ns, OWN);
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[defaults]
llm = "deny"
other = "deny"

[[workloads]]
name = "x"
systemd_unit = "x.service"
allow = ["192.0.2.0/24"]
other = "deny"

[[workloads]]
name = "users-own"
systemd_user_unit = "own.service"
uid = 65534
allow = ["198.51.100.0/24"]
other = "deny"
"#,
    ));
    // The user names cgroups after x, while the agent runs: right in its
    // manager, below a slice of its own, and a slice chain of its own.
    let fake = manager.join("x.service");
    mkdir_as_user(&fake);
    let app = manager.join("app.slice");
    mkdir_as_user(&app);
    let fake_in_slice = app.join("x.service");
    mkdir_as_user(&fake_in_slice);
    let own = app.join("own.service");
    mkdir_as_user(&own);
    let fake_in_open_slice = open_slice.join("x.service");
    mkdir_as_user(&fake_in_open_slice);
    // Root adds a second real unit after them: once it is selected, the
    // agent has seen the user's cgroups too.
    let real2 = cg.child("system.slice/foo.slice/x.service");
    wait_selected(&agent, "x", 2.0);
    wait_selected(&agent, "users-own", 1.0);
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&real, &ns, CLAIMED),
        "system.slice/x.service is x (where the system manager puts units)",
    );
    expect_ok(
        &agent,
        p.connect(&real2, &ns, CLAIMED),
        "system.slice/foo.slice/x.service is x (slices all the way up)",
    );
    for (dir, what) in [
        (&fake, "user@65534.service/x.service (made by the user)"),
        (
            &fake_in_slice,
            "user@65534.service/app.slice/x.service (made by the user)",
        ),
        (
            &fake_in_open_slice,
            "system.slice/open.slice/x.service (made by the user)",
        ),
    ] {
        expect_eperm(
            &agent,
            p.connect(dir, &ns, CLAIMED),
            &format!("{what} is in no workload: defaults.other = deny"),
        );
    }
    // The explicit opt-in for that user's manager.
    expect_ok(
        &agent,
        p.connect(&own, &ns, OWN),
        "systemd_user_unit own.service with uid 65534 selects the user's unit",
    );
    expect_eperm(
        &agent,
        p.connect(&own, &ns, CLAIMED),
        "the user's own.service has its own rights, not x's",
    );
}

#[test]
fn a_child_of_workload_a_named_for_bs_glob_keeps_as_rights() {
    require_root();
    let cg = CgroupGuard::new("hostile-glob");
    // A's cgroup is delegated to its (unprivileged) user; b-2 is a real
    // B cgroup root made.
    let a = cg.child("apps/a");
    delegate(&a);
    let b_real = cg.child("apps/b-2");
    let ns = NetnsGuard::new();
    let _claimed = TcpServer::start(&ns, CLAIMED);
    let _own = TcpServer::start(&ns, OWN);
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[defaults]
llm = "deny"
other = "allow"

[[workloads]]
name = "a"
cgroup = "apps/a"
allow = ["198.51.100.0/24"]
other = "deny"

[[workloads]]
name = "b"
cgroup = "apps/**/b-*"
match_delegated = true      # even the opt-in never takes a cgroup out of another workload
allow = ["192.0.2.0/24"]
other = "deny"
"#,
    ));
    let fake = a.join("b-1");
    mkdir_as_user(&fake);
    let nested = fake.join("b-3");
    mkdir_as_user(&nested);
    let b_late = cg.child("apps/b-4");
    wait_selected(&agent, "b", 2.0);
    std::thread::sleep(SETTLE);
    let p = probe();
    expect_ok(&agent, p.connect(&b_real, &ns, CLAIMED), "apps/b-2 is b");
    expect_ok(&agent, p.connect(&b_late, &ns, CLAIMED), "apps/b-4 is b");
    for (dir, what) in [(&fake, "apps/a/b-1"), (&nested, "apps/a/b-1/b-3")] {
        expect_eperm(
            &agent,
            p.connect(dir, &ns, CLAIMED),
            &format!("{what}, made by a's user, keeps a's rights (other = deny)"),
        );
        expect_ok(
            &agent,
            p.connect(dir, &ns, OWN),
            &format!("{what} keeps a's allow rule"),
        );
    }
}

#[test]
fn globs_match_user_made_cgroups_only_when_they_say_so() {
    require_root();
    let cg = CgroupGuard::new("hostile-opt-in");
    let home = cg.child("users/nobody");
    delegate(&home);
    let ns = NetnsGuard::new();
    let _claimed = TcpServer::start(&ns, CLAIMED);
    let _own = TcpServer::start(&ns, OWN);
    let agent = Agent::start(&policy(
        &cg,
        "",
        r#"
[defaults]
llm = "deny"
other = "deny"

[[workloads]]
name = "notebooks"
cgroup = "users/*/jupyter-*"
match_delegated = true
allow = ["198.51.100.0/24"]
other = "deny"

[[workloads]]
name = "batch"
cgroup = "users/*/batch-*"
allow = ["192.0.2.0/24"]
other = "deny"
"#,
    ));
    let jupyter = home.join("jupyter-1");
    mkdir_as_user(&jupyter);
    let batch = home.join("batch-1");
    mkdir_as_user(&batch);
    wait_selected(&agent, "notebooks", 1.0);
    std::thread::sleep(SETTLE);
    let p = probe();
    expect_ok(
        &agent,
        p.connect(&jupyter, &ns, OWN),
        "users/nobody/jupyter-1: `match_delegated = true` accepts the user's cgroup",
    );
    expect_eperm(
        &agent,
        p.connect(&batch, &ns, CLAIMED),
        "users/nobody/batch-1 is made by the user: batch does not accept it (defaults: deny)",
    );
    assert_eq!(
        agent.metric_value("llm_egress_workload_cgroups", &[("workload", "batch")]),
        Some(0.0),
        "batch selects nothing\n{}",
        agent.context()
    );
}
