//! Attribution from real cgroup trees: a process in a cgroup laid out like
//! the kubelet's (systemd driver, containerd) or docker's tree is reported
//! with its pod uid, QoS class, container runtime and id, and unit; and a
//! workload can select pods by a glob over that tree.

use std::time::Duration;

use llm_egress_tests::{Agent, CgroupGuard, NetnsGuard, Probe, require_root, toml_str};

const ID: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
const UID: &str = "0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d";

#[test]
fn kubepods_and_docker_paths_are_attributed_and_selectable() {
    require_root();
    let cg = CgroupGuard::new("attr");
    let uid = UID.replace('-', "_");
    let pod = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice");
    let container = cg.child(&format!("{pod}/cri-containerd-{ID}.scope"));
    let docker = cg.child(&format!("system.slice/docker-{ID}.scope"));
    let netns = NetnsGuard::new();
    let policy = format!(
        r#"cgroup = {}
[resolver]
servers = ["127.0.0.1:9"]
[[workloads]]
name = "burstable-pods"
cgroup = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod*.slice"
other = "deny"
[[workloads]]
name = "one-container"
systemd_unit = "docker-{ID}.scope"
other = "deny"
"#,
        toml_str(&cg.path().display().to_string())
    );
    let agent = Agent::start(&policy);
    let probe = Probe::new(env!("CARGO_BIN_EXE_egress-probe"));

    let r = probe.connect(&container, &netns, "192.0.2.1:7");
    assert_eq!(
        r,
        Err(libc::EPERM),
        "the pod's workload denies other egress (container below the pod cgroup)"
    );
    let event = agent
        .wait_for_audit(
            |e| e["workload"] == "burstable-pods",
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| {
            panic!(
                "no audit event for the pod's denied connect\n{}",
                agent.context()
            )
        });
    assert_eq!(event["pod_uid"], UID, "pod uid with dashes: {event}");
    assert_eq!(event["qos_class"], "burstable", "{event}");
    assert_eq!(event["container_runtime"], "containerd", "{event}");
    assert_eq!(event["container_id"], ID, "{event}");
    assert_eq!(
        event["unit"],
        format!("cri-containerd-{ID}.scope"),
        "{event}"
    );

    let r = probe.connect(&docker, &netns, "192.0.2.1:7");
    assert_eq!(
        r,
        Err(libc::EPERM),
        "the container's unit selects its workload"
    );
    let event = agent
        .wait_for_audit(|e| e["workload"] == "one-container", Duration::from_secs(5))
        .unwrap_or_else(|| {
            panic!(
                "no audit event for the docker container\n{}",
                agent.context()
            )
        });
    assert_eq!(event["container_runtime"], "docker", "{event}");
    assert_eq!(event["container_id"], ID, "{event}");
    assert!(
        event["pod_uid"].is_null() && event["qos_class"].is_null(),
        "not a pod: {event}"
    );
    drop(agent);
}
