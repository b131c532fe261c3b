//! What a cgroup path says about the workload it holds: the systemd unit,
//! the container (docker, containerd, cri-o, podman) and the Kubernetes pod
//! uid and QoS class (kubelet's path shapes for the systemd and cgroupfs
//! drivers). Pure string work on the path the kernel and /proc report; pod
//! names and namespaces are not in the path: `crate::attribution::kube` learns them from
//! the API server, by the uid found here (docs/events.md).

use serde::Serialize;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CgroupInfo {
    /// The deepest `*.service` or `*.scope` component that a systemd
    /// manager could have made: none inside another unit, except the user
    /// manager's below `user@UID.service`.
    pub unit: Option<String>,
    /// `docker`, `containerd`, `cri-o` or `podman`.
    pub container_runtime: Option<&'static str>,
    /// 64 hex digits.
    pub container_id: Option<String>,
    /// The pod's uid with dashes (kubelet's systemd driver writes underscores).
    pub pod_uid: Option<String>,
    /// `guaranteed`, `burstable` or `besteffort`.
    pub qos_class: Option<&'static str>,
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `prefix-<id>.scope` → id, for the given prefixes.
fn scoped_id<'a>(component: &'a str, prefixes: &[&str]) -> Option<&'a str> {
    let stem = component.strip_suffix(".scope")?;
    prefixes
        .iter()
        .find_map(|p| stem.strip_prefix(p))
        .filter(|id| is_container_id(id))
}

/// podman's cgroupfs driver (hosts where systemd is not PID 1, and
/// `--cgroup-manager=cgroupfs`): `/libpod_parent/libpod-<id>`, no `.scope`.
/// conmon's own cgroup (`libpod-conmon-<id>`) is not the container's and
/// does not match.
fn libpod_cgroupfs_id(component: &str) -> Option<&str> {
    component
        .strip_prefix("libpod-")
        .filter(|id| is_container_id(id))
}

/// `pod<uid>` or `kubepods-<qos>-pod<uid>.slice` / `kubepods-pod<uid>.slice`.
/// A uid is a UUID (dashes, or underscores with the systemd driver), or 32
/// hex digits: the kubelet's uid of a static pod (the hash its mirror pod
/// carries in the `kubernetes.io/config.mirror` annotation).
fn pod_uid(component: &str) -> Option<String> {
    let rest = component.strip_suffix(".slice").unwrap_or(component);
    let idx = rest.rfind("pod")?;
    let uid = &rest[idx + 3..];
    let uuid = uid.len() == 36
        && uid
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b'-' || b == b'_');
    let hash = uid.len() == 32 && uid.bytes().all(|b| b.is_ascii_hexdigit());
    ((uuid || hash) && (idx == 0 || rest[..idx].ends_with('-'))).then(|| uid.replace('_', "-"))
}

/// The pod uid of `path` when `path` is a pod-level directory (its last
/// component is the pod's, below `kubepods`/`kubepods.slice`): the
/// directory a `k8s` workload selector selects. Container directories below
/// it return None.
pub fn pod_dir_uid(path: &str) -> Option<String> {
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let last = parts.next_back()?;
    parts
        .any(|p| p == "kubepods" || p == "kubepods.slice")
        .then(|| pod_uid(last))
        .flatten()
}

pub fn describe(path: &str) -> CgroupInfo {
    let mut info = CgroupInfo::default();
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    // Anywhere in the path: nested setups (kind, a test cgroup) put the
    // kubelet's tree below other cgroups.
    let mut in_kubepods = false;
    for (i, part) in parts.iter().enumerate() {
        if *part == "kubepods" || *part == "kubepods.slice" {
            in_kubepods = true;
            continue;
        }
        // A unit only where a systemd manager makes units: not inside
        // another unit (a delegated subtree, a container's own tree, where
        // anyone who may write there names directories as they like), except
        // below `user@UID.service`, where the user's manager makes them.
        if (part.ends_with(".service") || part.ends_with(".scope"))
            && info.unit.as_deref().is_none_or(|u| u.starts_with("user@"))
        {
            info.unit = Some((*part).to_string());
        }
        if let Some(id) = scoped_id(part, &["docker-"]) {
            info.container_runtime = Some("docker");
            info.container_id = Some(id.to_string());
        } else if let Some(id) = scoped_id(part, &["cri-containerd-"]) {
            info.container_runtime = Some("containerd");
            info.container_id = Some(id.to_string());
        } else if let Some(id) = scoped_id(part, &["crio-"]) {
            info.container_runtime = Some("cri-o");
            info.container_id = Some(id.to_string());
        } else if let Some(id) = scoped_id(part, &["libpod-"]).or_else(|| libpod_cgroupfs_id(part))
        {
            info.container_runtime = Some("podman");
            info.container_id = Some(id.to_string());
        } else if is_container_id(part) && i > 0 {
            // cgroupfs drivers: /docker/<id>, /kubepods/<qos>/pod<uid>/<id>;
            // the kubelet's path does not name the runtime.
            info.container_runtime = (parts[i - 1] == "docker").then_some("docker");
            info.container_id = Some((*part).to_string());
        }
        if in_kubepods {
            if let Some(uid) = pod_uid(part) {
                info.pod_uid = Some(uid);
            }
            if part.contains("burstable") {
                info.qos_class = Some("burstable");
            } else if part.contains("besteffort") {
                info.qos_class = Some("besteffort");
            }
        }
    }
    if info.pod_uid.is_some() && info.qos_class.is_none() {
        info.qos_class = Some("guaranteed");
    }
    info
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";
    const UID: &str = "0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d";

    #[test]
    fn systemd_units() {
        let i = describe("/system.slice/support-bot.service");
        assert_eq!(i.unit.as_deref(), Some("support-bot.service"));
        assert_eq!(i.container_id, None);
        let i = describe("/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope");
        assert_eq!(i.unit.as_deref(), Some("run-r1.scope"));
        // A directory named like a unit inside a unit's (delegated) tree
        // is not a unit: the enclosing one is reported.
        let i = describe("/system.slice/build.service/payload/x.service");
        assert_eq!(i.unit.as_deref(), Some("build.service"));
        let i = describe(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/run-r1.scope/x.service",
        );
        assert_eq!(i.unit.as_deref(), Some("run-r1.scope"));
    }

    #[test]
    fn docker_with_both_drivers() {
        let i = describe(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(
            (i.container_runtime, i.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
        let i = describe(&format!("/docker/{ID}"));
        assert_eq!(
            (i.container_runtime, i.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
    }

    #[test]
    fn kubernetes_systemd_driver_containerd_and_crio() {
        let u = UID.replace('-', "_");
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{ID}.scope"
        );
        let i = describe(&p);
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.qos_class, Some("burstable"));
        assert_eq!(
            (i.container_runtime, i.container_id.as_deref()),
            (Some("containerd"), Some(ID))
        );
        let p = format!("/kubepods.slice/kubepods-pod{u}.slice/crio-{ID}.scope");
        let i = describe(&p);
        assert_eq!(
            (i.qos_class, i.container_runtime),
            (Some("guaranteed"), Some("cri-o"))
        );
        let p =
            format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice");
        assert_eq!(describe(&p).qos_class, Some("besteffort"));
    }

    #[test]
    fn kubernetes_cgroupfs_driver() {
        let i = describe(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(i.pod_uid.as_deref(), Some(UID));
        assert_eq!(i.qos_class, Some("besteffort"));
        assert_eq!(i.container_id.as_deref(), Some(ID));
        assert_eq!(
            i.container_runtime, None,
            "the cgroupfs driver does not name the runtime"
        );
        assert_eq!(
            describe(&format!("/kubepods/pod{UID}/{ID}")).qos_class,
            Some("guaranteed")
        );
        // below another cgroup (a kind node, a test cgroup)
        let i = describe(&format!("/kubelet.slice/kubepods/burstable/pod{UID}/{ID}"));
        assert_eq!(
            (i.pod_uid.as_deref(), i.qos_class),
            (Some(UID), Some("burstable"))
        );
    }

    #[test]
    fn pod_level_directories() {
        let u = UID.replace('-', "_");
        let systemd =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice");
        assert_eq!(pod_dir_uid(&systemd).as_deref(), Some(UID));
        assert_eq!(
            pod_dir_uid(&format!("{systemd}/cri-containerd-{ID}.scope")),
            None,
            "a container, not the pod"
        );
        assert_eq!(
            pod_dir_uid(&format!("/kubepods/besteffort/pod{UID}")).as_deref(),
            Some(UID)
        );
        assert_eq!(
            pod_dir_uid(&format!("kubepods/pod{UID}")).as_deref(),
            Some(UID)
        );
        assert_eq!(pod_dir_uid(&format!("/kubepods/pod{UID}/{ID}")), None);
        assert_eq!(
            pod_dir_uid(&format!("other/pod{UID}")),
            None,
            "only below kubepods"
        );
        assert_eq!(pod_dir_uid(&format!("pod{UID}")), None);
        assert_eq!(pod_dir_uid("kubepods.slice/kubepods-burstable.slice"), None);
        // Static pods: the kubelet's uid is a 32-hex-digit hash.
        let hash = "5fc3b7ec1ba3ab0e5e4ae1b4ad0d1f47";
        let p =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice");
        assert_eq!(pod_dir_uid(&p).as_deref(), Some(hash));
        assert_eq!(
            describe(&format!("/{p}/cri-containerd-{ID}.scope"))
                .pod_uid
                .as_deref(),
            Some(hash)
        );
        assert_eq!(
            pod_dir_uid("kubepods/pod5fc3b7ec1ba3ab0e5e4ae1b4ad0d1f4"),
            None,
            "31 digits"
        );
    }

    #[test]
    fn podman_and_plain_paths() {
        let i = describe(&format!("/machine.slice/libpod-{ID}.scope"));
        assert_eq!(
            (i.container_runtime, i.container_id.as_deref()),
            (Some("podman"), Some(ID))
        );
        // Measured with podman 4.3 and runc: the systemd driver puts the
        // container in `machine.slice/libpod-<id>.scope` (systemd-run
        // containers one level deeper, `…/container`); the cgroupfs driver
        // (no systemd as PID 1, this project's machines) in
        // `libpod_parent/libpod-<id>`, below the caller's cgroup when that
        // is not the root.
        for path in [
            format!("/machine.slice/libpod-{ID}.scope/container"),
            format!("/libpod_parent/libpod-{ID}"),
            format!("/process_api/x/libpod_parent/libpod-{ID}"),
        ] {
            let i = describe(&path);
            assert_eq!(
                (i.container_runtime, i.container_id.as_deref()),
                (Some("podman"), Some(ID)),
                "{path}"
            );
        }
        // conmon, the container's monitor, is not the container.
        assert_eq!(
            describe(&format!("/machine.slice/libpod-conmon-{ID}.scope")).container_id,
            None
        );
        assert_eq!(
            describe(&format!("/libpod_parent/conmon/libpod-conmon-{ID}")).container_id,
            None
        );
        assert_eq!(describe("/llm-egress-test-x/bot"), CgroupInfo::default());
        assert_eq!(describe("/"), CgroupInfo::default());
        // Not quite a pod or container: never guessed.
        assert_eq!(describe("/kubepods.slice/notapod.slice").pod_uid, None);
        assert_eq!(
            describe("/system.slice/docker-abc.scope").container_id,
            None
        );
    }
}
