//! Pods selected by namespace and labels, end to end: a fake Kubernetes API
//! server on 127.0.0.1 (real HTTPS with its own CA, bearer token) lists the
//! pods of a node; a real cgroup tree below the test cgroup has kubepods
//! directories of both kubelet cgroup drivers; the agent, told where the
//! API server, token and CA are (`[kubernetes]`), selects the pod cgroups of
//! matching pods, and the probe's connects from the containers below them
//! are judged by that workload. Audit records carry the pod's name and
//! namespace.
//!
//! Needs root, bpffs and a built agent. Locals are declared cgroup, netns,
//! servers, agent, so the agent stops before its cgroup goes.

use std::time::{Duration, Instant};

use llm_egress_tests::{
    Agent, CgroupGuard, NetnsGuard, Probe, TcpServer,
    fake_kube::{FakeKube, FakePod},
    require_root,
    scenario::{
        EVENT_WAIT, expect_eperm, expect_eperm_within, expect_metric_at_least, expect_ok, policy,
        wait_event,
    },
};

const NODE: &str = "node-1";
/// Pod uids as the API server writes them; the systemd driver's cgroup
/// names have underscores instead of dashes.
const BOT: &str = "0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d";
const SHOP: &str = "7e1d2c3b-4a5f-4e6d-8c7b-6a5f4e3d2c1b";
const LATE: &str = "c0ffee00-1111-4222-8333-444455556666";
const ID1: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
const ID2: &str = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f809";
const ID3: &str = "9e8d7c6b5a49382716f5e4d3c2b1a0f99e8d7c6b5a49382716f5e4d3c2b1a0f9";
/// A server in the test namespace that the defaults allow and the
/// `support-bot` workload (`other = "deny"`) does not.
const TARGET: &str = "192.0.2.1:8443";

fn probe() -> Probe {
    Probe::new(env!("CARGO_BIN_EXE_egress-probe"))
}

/// The container cgroup of a pod with the kubelet's systemd driver
/// (containerd), burstable QoS.
fn systemd_container(cg: &CgroupGuard, uid: &str, id: &str) -> std::path::PathBuf {
    let u = uid.replace('-', "_");
    cg.child(&format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{id}.scope"))
}

/// The container cgroup of a pod with the kubelet's cgroupfs driver,
/// best-effort QoS.
fn cgroupfs_container(cg: &CgroupGuard, uid: &str, id: &str) -> std::path::PathBuf {
    cg.child(&format!("kubepods/besteffort/pod{uid}/{id}"))
}

fn bot_pod(name: &str, uid: &str) -> FakePod {
    FakePod::new(
        name,
        "support",
        uid,
        &[("app", "bot"), ("pod-template-hash", "7c9f8d6b5")],
    )
}

/// `support-bot` selects pods of namespace `support` labelled `app=bot`;
/// everything else is allowed and reported (`other = "audit"`), so every
/// connect leaves an audit record.
fn k8s_policy(cg: &CgroupGuard, kube: &FakeKube, refresh_seconds: u32) -> String {
    let body = format!(
        r#"
[defaults]
llm = "deny"
other = "audit"

{}
[[workloads]]
name = "support-bot"
k8s = {{ namespace = "support", labels = {{ app = "bot" }} }}
other = "deny"
"#,
        kube.policy_table(refresh_seconds)
    );
    policy(cg, "", &body)
}

#[test]
fn pods_are_selected_by_namespace_and_labels_from_the_api_server() {
    require_root();
    let cg = CgroupGuard::new("k8s-select");
    let bot = systemd_container(&cg, BOT, ID1);
    let shop = cgroupfs_container(&cg, SHOP, ID2);
    let late = cgroupfs_container(&cg, LATE, ID3);
    let ns = NetnsGuard::new();
    let _server = TcpServer::start(&ns, TARGET);
    // Same label, other namespace: not selected.
    let kube = FakeKube::start(
        NODE,
        vec![
            bot_pod("support-bot-7c9f8d6b5-x2k4q", BOT),
            FakePod::new("shop-web-0", "shop", SHOP, &[("app", "bot")]),
        ],
    );
    let agent = Agent::start(&k8s_policy(&cg, &kube, 2));
    let p = probe();

    expect_eperm(
        &agent,
        p.connect(&bot, &ns, TARGET),
        "container of the support/app=bot pod (systemd driver) is judged by support-bot (other = deny)",
    );
    let event = wait_event(&agent, "for the bot pod's denied connect", |e| {
        e["workload"] == "support-bot" && e["verdict"] == "deny"
    });
    assert_eq!(event["pod_uid"], BOT, "{event}");
    assert_eq!(
        event["pod_name"], "support-bot-7c9f8d6b5-x2k4q",
        "pod name from the API server: {event}"
    );
    assert_eq!(event["pod_namespace"], "support", "{event}");
    assert_eq!(event["container_id"], ID1, "{event}");

    expect_ok(
        &agent,
        p.connect(&shop, &ns, TARGET),
        "container of the shop pod (cgroupfs driver): not selected, the defaults allow",
    );
    let event = wait_event(&agent, "for the shop pod's audited connect", |e| {
        e["pod_uid"] == SHOP
    });
    assert_eq!(event["workload"], "none", "{event}");
    assert_eq!(
        (event["pod_name"].as_str(), event["pod_namespace"].as_str()),
        (Some("shop-web-0"), Some("shop")),
        "unselected pods are named too: {event}"
    );

    expect_ok(
        &agent,
        p.connect(&late, &ns, TARGET),
        "a pod cgroup the API server does not list yet: the defaults",
    );
    let event = wait_event(&agent, "for the unlisted pod's connect", |e| {
        e["pod_uid"] == LATE
    });
    assert!(
        event["pod_name"].is_null() && event["pod_namespace"].is_null(),
        "an unknown uid has no name: {event}"
    );

    // The pod appears in the API server's list: selected after a refresh.
    let added = Instant::now();
    kube.add_pod(bot_pod("support-bot-7c9f8d6b5-q8w2e", LATE));
    expect_eperm_within(
        &agent,
        &late,
        &ns,
        TARGET,
        added,
        Duration::from_secs(10),
        "a pod added to the API list is selected after the refresh (2 s)",
    );
    let event = wait_event(&agent, "for the added pod's deny", |e| {
        e["pod_uid"] == LATE && e["verdict"] == "deny"
    });
    assert_eq!(
        (event["workload"].as_str(), event["pod_name"].as_str()),
        (Some("support-bot"), Some("support-bot-7c9f8d6b5-q8w2e")),
        "{event}"
    );
    expect_metric_at_least(
        &agent,
        "llm_egress_workload_cgroups",
        &[("workload", "support-bot")],
        2.0,
        EVENT_WAIT,
        "two pod cgroups selected",
    );
    expect_metric_at_least(
        &agent,
        "llm_egress_kubernetes_pods",
        &[],
        3.0,
        EVENT_WAIT,
        "three pods listed",
    );
    assert_eq!(
        agent.metric_value("llm_egress_kubernetes_errors_total", &[]),
        Some(0.0),
        "no list failed\n{}",
        agent.context()
    );
    assert_eq!(
        kube.refused(),
        0,
        "the agent sent its token and this node's field selector every time"
    );
    drop(agent);
}

#[test]
fn a_new_pod_cgroup_is_selected_without_waiting_for_the_refresh() {
    require_root();
    let cg = CgroupGuard::new("k8s-new");
    let bot = systemd_container(&cg, BOT, ID1);
    let ns = NetnsGuard::new();
    let _server = TcpServer::start(&ns, TARGET);
    let kube = FakeKube::start(NODE, vec![bot_pod("support-bot-0", BOT)]);
    // An hour between refreshes: only the on-demand list can find the new pod.
    let agent = Agent::start(&k8s_policy(&cg, &kube, 3600));
    let p = probe();
    expect_eperm(
        &agent,
        p.connect(&bot, &ns, TARGET),
        "the pod listed at start",
    );
    let lists = kube.served();

    // As the kubelet does it: the pod is bound to the node (in the list)
    // before its cgroup is made.
    kube.add_pod(bot_pod("support-bot-1", LATE));
    let made = Instant::now();
    let late = systemd_container(&cg, LATE, ID3);
    expect_eperm_within(
        &agent,
        &late,
        &ns,
        TARGET,
        made,
        Duration::from_secs(5),
        "a new pod cgroup with an unknown uid makes the agent list again at once",
    );
    assert!(
        kube.served() > lists,
        "the on-demand list ({} lists before, {} after)",
        lists,
        kube.served()
    );
    let event = wait_event(&agent, "for the new pod's deny", |e| {
        e["pod_uid"] == LATE && e["verdict"] == "deny"
    });
    assert_eq!(event["pod_name"], "support-bot-1", "{event}");
    drop(agent);
}

#[test]
fn api_errors_are_counted_and_the_last_good_list_is_kept() {
    require_root();
    let cg = CgroupGuard::new("k8s-errors");
    let bot = systemd_container(&cg, BOT, ID1);
    let ns = NetnsGuard::new();
    let _server = TcpServer::start(&ns, TARGET);
    let kube = FakeKube::start(NODE, vec![bot_pod("support-bot-0", BOT)]);
    kube.set_forbidden(true);
    let mut agent = Agent::start(&k8s_policy(&cg, &kube, 1));
    let p = probe();

    // 403 (no ClusterRoleBinding): the agent runs, counts, selects nothing.
    expect_metric_at_least(
        &agent,
        "llm_egress_kubernetes_errors_total",
        &[],
        2.0,
        EVENT_WAIT,
        "403 answers are counted",
    );
    assert!(
        agent.is_running(),
        "the agent must keep running when the API server refuses it\n{}",
        agent.context()
    );
    assert_eq!(
        agent.http_get("/readyz").map(|r| r.status).ok(),
        Some(200),
        "still ready: enforcement does not depend on the API server"
    );
    expect_ok(
        &agent,
        p.connect(&bot, &ns, TARGET),
        "no pod list yet: the pod's workload selects nothing",
    );

    // The binding is made: the next list selects the pod.
    kube.set_forbidden(false);
    expect_eperm_within(
        &agent,
        &bot,
        &ns,
        TARGET,
        Instant::now(),
        Duration::from_secs(5),
        "selected once the API server answers",
    );

    // The token rotates and the agent still holds the old one (401): the
    // last good list stays in force.
    kube.set_token("rotated-token");
    let before = agent
        .metric_value("llm_egress_kubernetes_errors_total", &[])
        .unwrap_or_default();
    expect_metric_at_least(
        &agent,
        "llm_egress_kubernetes_errors_total",
        &[],
        before + 3.0,
        Duration::from_secs(8),
        "401 answers are counted",
    );
    expect_eperm(
        &agent,
        p.connect(&bot, &ns, TARGET),
        "the last good list is kept while the API server refuses",
    );
    // The kubelet writes the new token: read again at the next list.
    let served = kube.served();
    kube.write_token_file("rotated-token\n");
    assert!(
        kube.wait_served(served + 1, Duration::from_secs(5)) > served,
        "the agent reads the token file again for each list"
    );
    assert!(agent.is_running(), "{}", agent.context());

    // Logged once per run of failures (two here), counted every time.
    let stderr = agent.stderr();
    let warned = stderr.matches("cannot list this node's pods").count();
    let counted = agent
        .metric_value("llm_egress_kubernetes_errors_total", &[])
        .unwrap_or_default();
    assert_eq!(
        warned, 2,
        "one warning per run of failures ({counted} failures counted):\n{stderr}"
    );
    assert!(
        stderr.contains("pods is forbidden"),
        "the 403's message is in the log:\n{stderr}"
    );
    assert_eq!(
        agent.stop().code(),
        Some(0),
        "a clean stop\n{}",
        agent.context()
    );
}
