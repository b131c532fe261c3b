//! Workload cgroups: which cgroup directories under the attach cgroup each
//! workload selects, kept current as cgroups come and go.
//!
//! The kernel walks a task's ancestors and uses the deepest one listed in
//! `WORKLOADS`, so only the selected directories are listed, not their
//! descendants. New directories are seen through inotify (mkdir on cgroupfs
//! raises IN_CREATE) with a periodic rescan as a safety net. A workload whose
//! cgroup does not exist yet is logged and applied when it appears.
//!
//! A `k8s` selector selects pod-level directories (`…pod<uid>.slice`,
//! `…/pod<uid>`) whose uid the pod list (`crate::attribution::kube`) maps to a pod of
//! that namespace and labels; the pod's containers below inherit it through
//! the kernel's ancestor walk.
//!
//! Who chose a directory's name decides whether it may select a workload
//! (docs/policy.md, "Who can create what a selector matches"). Creating a
//! cgroup takes write access to its parent directory: a directory whose
//! every ancestor up to the cgroup2 root only root can write to
//! (`crate::policy::ownership::only_root_writes`) was named by root; one below a
//! directory a non-root user owns or may write to (a delegated subtree:
//! systemd's user managers and `Delegate=` units, rootless container
//! runtimes, all chown their subtree to the user) was named by that user.
//! Every selector matches only root-named directories, except a `cgroup`
//! glob with `match_delegated = true` and a `systemd_user_unit`, and those
//! two never select a user-named directory below another workload's
//! directory: a directory left out keeps the workload of its nearest
//! listed ancestor (the kernel's walk), so creating a cgroup never moves a
//! process to another workload. cgroup2 has no rename, so a name stays
//! what its creator chose.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use globset::{GlobBuilder, GlobMatcher};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{
    attribution::cgroup_info,
    attribution::kube::{self, PodMap},
    policy::ownership,
    policy::{PodSelector, Policy, Selector},
};

/// Directories deeper than this below the attach cgroup are not scanned.
const MAX_SCAN_DEPTH: usize = 32;
/// Rescan period when no inotify event arrives.
const RESCAN: Duration = Duration::from_secs(5);

/// One cgroup directory: its path relative to the attach cgroup ("" for
/// the attach cgroup itself), its id, and who named it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    pub rel: String,
    pub id: u64,
    /// Only root could have created it: no ancestor up to the cgroup2 root
    /// is writable by a non-root user.
    pub root_named: bool,
}

/// Lists the attach cgroup and every directory below it, parents before
/// their children.
pub fn scan(root: &Path) -> Vec<CgroupDir> {
    let mut out = Vec::new();
    let top = ancestors_only_root_writes(root);
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize, top)];
    while let Some((dir, rel, depth, root_named)) = stack.pop() {
        // A directory may vanish between listing and reading: skip it.
        let Ok(meta) = fs::metadata(&dir) else {
            continue;
        };
        out.push(CgroupDir {
            rel: rel.clone(),
            id: meta.ino(),
            root_named,
        });
        // Its children were named by whoever may write to it.
        let children_root_named = root_named && ownership::only_root_writes(&meta);
        if depth >= MAX_SCAN_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((entry.path(), child_rel, depth + 1, children_root_named));
            }
        }
    }
    out
}

/// Whether only root can write to every ancestor of `dir` up to the
/// cgroup2 root (the directories above it that hold `cgroup.procs`).
fn ancestors_only_root_writes(dir: &Path) -> bool {
    dir.ancestors()
        .skip(1)
        .take_while(|a| a.join("cgroup.procs").exists())
        .all(|a| fs::metadata(a).is_ok_and(|m| ownership::only_root_writes(&m)))
}

/// The compiled selectors of a policy's workloads.
pub struct Selectors {
    matchers: Vec<Matcher>,
}

enum Matcher {
    /// `delegated`: `match_delegated = true`.
    Glob {
        glob: GlobMatcher,
        delegated: bool,
    },
    Unit(String),
    /// `manager`: `user@UID.service`.
    UserUnit {
        unit: String,
        manager: String,
    },
    Pods(PodSelector),
}

fn matcher(selector: &Selector) -> Matcher {
    let glob = |g: &str, delegated| match compile(g) {
        Some(glob) => Matcher::Glob { glob, delegated },
        // Validation compiled the same glob; an error here cannot happen,
        // and would only make the workload match nothing.
        None => Matcher::Unit(String::new()),
    };
    match selector {
        Selector::Cgroup(g) => glob(g, false),
        Selector::DelegatedCgroup(g) => glob(g, true),
        Selector::SystemdUnit(u) => Matcher::Unit(u.clone()),
        Selector::SystemdUserUnit { unit, uid } => Matcher::UserUnit {
            unit: unit.clone(),
            manager: format!("user@{uid}.service"),
        },
        Selector::Kubernetes(p) => Matcher::Pods(p.clone()),
    }
}

/// Where systemd's system manager puts units: every directory above the
/// unit (below the attach cgroup) is a slice.
fn all_slices<'a>(mut parents: impl Iterator<Item = &'a str>) -> bool {
    parents.all(|p| p.ends_with(".slice"))
}

/// `*` stays within one path component; `**` crosses them.
fn compile(glob: &str) -> Option<GlobMatcher> {
    GlobBuilder::new(glob.trim_end_matches('/'))
        .literal_separator(true)
        .build()
        .ok()
        .map(|g| g.compile_matcher())
}

impl Selectors {
    pub fn new(policy: &Policy) -> Self {
        let matchers = policy
            .workloads
            .iter()
            .map(|w| matcher(&w.selector))
            .collect();
        Self { matchers }
    }

    /// Whether some workload selects pods by namespace and labels.
    pub fn selects_pods(&self) -> bool {
        self.matchers.iter().any(|m| matches!(m, Matcher::Pods(_)))
    }

    /// Which workload (index) selects `dir`: the first in policy order
    /// that accepts it. `inherited`: the workload its nearest listed
    /// ancestor has (what the kernel gives it when it is not listed);
    /// `root_named(rel)`: whether root named the ancestor `rel`. `pods` is
    /// the node's pod list, for `k8s` selectors.
    fn select(
        &self,
        dir: &CgroupDir,
        inherited: Option<usize>,
        pods: &PodMap,
        root_named: impl Fn(&str) -> bool,
    ) -> Option<usize> {
        let rel = dir.rel.as_str();
        if rel.is_empty() {
            return None;
        }
        let (parents, name) = rel.rsplit_once('/').unwrap_or(("", rel));
        let parents = || parents.split('/').filter(|p| !p.is_empty());
        // A user-named directory never moves a process out of another
        // workload.
        let user_named_ok = |i: usize| dir.root_named || inherited.is_none_or(|w| w == i);
        let mut pod = None;
        self.matchers
            .iter()
            .enumerate()
            .find(|(i, m)| match m {
                Matcher::Glob { glob, delegated } => {
                    glob.is_match(rel) && (dir.root_named || (*delegated && user_named_ok(*i)))
                }
                Matcher::Unit(u) => {
                    dir.root_named && !u.is_empty() && name == u && all_slices(parents())
                }
                Matcher::UserUnit { unit, manager } => {
                    name == unit
                        && user_named_ok(*i)
                        && user_unit_place(parents(), manager, &root_named)
                }
                Matcher::Pods(sel) => {
                    let meta = pod.get_or_insert_with(|| {
                        cgroup_info::pod_dir_uid(rel).and_then(|uid| pods.get(&uid))
                    });
                    dir.root_named && meta.as_ref().is_some_and(|m| kube::matches(sel, m))
                }
            })
            .map(|(i, _)| i)
    }

    /// cgroup id → workload index for every selected directory. `dirs` as
    /// [`scan`] lists them: parents before their children.
    pub fn assign(&self, dirs: &[CgroupDir], pods: &PodMap) -> BTreeMap<u64, usize> {
        // rel → (root named, workload the kernel gives it).
        let mut seen: std::collections::HashMap<&str, (bool, Option<usize>)> =
            std::collections::HashMap::new();
        let mut out = BTreeMap::new();
        for d in dirs {
            let parent = d.rel.rsplit_once('/').map_or("", |(p, _)| p);
            let inherited = if d.rel.is_empty() {
                None
            } else {
                seen.get(parent).and_then(|s| s.1)
            };
            let chosen = self.select(d, inherited, pods, |rel| seen.get(rel).is_some_and(|s| s.0));
            if let Some(w) = chosen {
                out.insert(d.id, w);
            }
            seen.insert(&d.rel, (d.root_named, chosen.or(inherited)));
        }
        out
    }
}

/// A user unit's place: `(*.slice/)*user@UID.service/(*.slice/)*`, where
/// root named `user@UID.service` (`root_named` of its path).
fn user_unit_place<'a>(
    parents: impl Iterator<Item = &'a str>,
    manager: &str,
    root_named: impl Fn(&str) -> bool,
) -> bool {
    let parents: Vec<&str> = parents.collect();
    let Some(k) = parents.iter().position(|p| *p == manager) else {
        return false;
    };
    all_slices(parents[..k].iter().copied())
        && all_slices(parents[k + 1..].iter().copied())
        && root_named(&parents[..=k].join("/"))
}

/// The uids of pod-level directories that `pods` does not know (a pod the
/// list has not caught up with yet).
pub fn unknown_pods(dirs: &[CgroupDir], pods: &PodMap) -> Vec<String> {
    dirs.iter()
        .filter_map(|d| cgroup_info::pod_dir_uid(&d.rel))
        .filter(|uid| !pods.contains_key(uid))
        .collect()
}

/// cgroup id → path relative to the cgroup2 mount (as /proc/PID/cgroup
/// shows it), for attribution.
pub fn paths(root_rel: &str, dirs: &[CgroupDir]) -> BTreeMap<u64, String> {
    dirs.iter()
        .map(|d| {
            let p = match (root_rel.trim_end_matches('/'), d.rel.as_str()) {
                ("", "") => "/".to_string(),
                ("", r) => format!("/{r}"),
                (base, "") => base.to_string(),
                (base, r) => format!("{base}/{r}"),
            };
            (d.id, p)
        })
        .collect()
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// Sends `()` whenever the tree under `root` may have changed: a directory
/// was created or removed (inotify), or the rescan period passed.
pub fn watch(root: PathBuf) -> mpsc::Receiver<()> {
    use inotify::Inotify;
    let (tx, rx) = mpsc::channel(1);
    // The first watches are added before this returns, so that a cgroup
    // created after it is always seen (the caller scans once after).
    let mut inotify = match Inotify::init() {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(error = %e, "inotify unavailable; new cgroups are found by rescanning every 5 s");
            None
        }
    };
    let mut watched = std::collections::HashSet::new();
    if let Some(ino) = inotify.as_mut() {
        add_watches(ino, &root, &mut watched);
    }
    std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || watch_loop(&root, inotify, watched, &tx))
        .map_err(|e| warn!(error = %e, "cannot start the cgroup watcher; rescanning is disabled"))
        .ok();
    rx
}

/// Watches every cgroup directory below `root` not watched yet.
fn add_watches(
    ino: &mut inotify::Inotify,
    root: &Path,
    watched: &mut std::collections::HashSet<PathBuf>,
) {
    use inotify::WatchMask;
    for dir in scan_dirs(root) {
        if watched.insert(dir.clone()) {
            let mask = WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR;
            if let Err(e) = ino.watches().add(&dir, mask) {
                debug!(dir = %dir.display(), error = %e, "inotify watch failed");
                watched.remove(&dir);
            }
        }
    }
    watched.retain(|d: &PathBuf| d.exists());
}

fn watch_loop(
    root: &Path,
    mut inotify: Option<inotify::Inotify>,
    mut watched: std::collections::HashSet<PathBuf>,
    tx: &mpsc::Sender<()>,
) {
    let mut buf = [0u8; 4096];
    loop {
        let changed = match inotify.as_mut() {
            Some(ino) => {
                wait_readable(ino, RESCAN)
                    && ino
                        .read_events(&mut buf)
                        .is_ok_and(|mut e| e.next().is_some())
            }
            None => {
                std::thread::sleep(RESCAN);
                true
            }
        };
        let _ = changed;
        if tx.blocking_send(()).is_err() {
            return;
        }
        // New directories (a new pod's cgroup tree) get their watches.
        if let Some(ino) = inotify.as_mut() {
            add_watches(ino, root, &mut watched);
        }
    }
}

fn scan_dirs(root: &Path) -> Vec<PathBuf> {
    scan(root)
        .into_iter()
        .map(|d| {
            if d.rel.is_empty() {
                root.to_path_buf()
            } else {
                root.join(&d.rel)
            }
        })
        .collect()
}

/// Waits up to `timeout` for inotify events.
fn wait_readable(ino: &inotify::Inotify, timeout: Duration) -> bool {
    use std::os::fd::{AsFd, AsRawFd};
    let mut pfd = libc::pollfd {
        fd: ino.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    rc > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selectors(sel: Vec<Selector>) -> Selectors {
        let matchers = sel.iter().map(matcher).collect();
        Selectors { matchers }
    }

    impl Selectors {
        /// The workload of a root-named directory with no listed ancestor.
        fn workload_of(&self, rel: &str, pods: &PodMap) -> Option<usize> {
            let dir = CgroupDir {
                rel: rel.into(),
                id: 0,
                root_named: true,
            };
            self.select(&dir, None, pods, |_| true)
        }
    }

    /// `(rel, root_named)` in parent-first order, ids 1, 2, …; the
    /// assignment by rel.
    fn assign(s: &Selectors, dirs: &[(&str, bool)]) -> BTreeMap<String, usize> {
        let dirs: Vec<CgroupDir> = dirs
            .iter()
            .enumerate()
            .map(|(i, (rel, root_named))| CgroupDir {
                rel: rel.to_string(),
                id: i as u64 + 1,
                root_named: *root_named,
            })
            .collect();
        let by_id = s.assign(&dirs, &PodMap::new());
        dirs.iter()
            .filter_map(|d| Some((d.rel.clone(), *by_id.get(&d.id)?)))
            .collect()
    }

    fn listed(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
        pairs.iter().map(|(r, w)| (r.to_string(), *w)).collect()
    }

    #[test]
    fn units_match_only_below_slices_and_where_root_named_them() {
        let s = selectors(vec![Selector::SystemdUnit("x.service".into())]);
        let dirs = [
            ("", true),
            ("system.slice", true),
            ("system.slice/x.service", true),
            ("system.slice/foo.slice", true),
            ("system.slice/foo.slice/x.service", true),
            ("system.slice/y.service", true),
            ("system.slice/y.service/x.service", true),
            ("user.slice", true),
            ("user.slice/user-1000.slice", true),
            ("user.slice/user-1000.slice/user@1000.service", true),
            // Below the user's manager: the user named these.
            (
                "user.slice/user-1000.slice/user@1000.service/app.slice",
                false,
            ),
            (
                "user.slice/user-1000.slice/user@1000.service/app.slice/x.service",
                false,
            ),
            (
                "user.slice/user-1000.slice/user@1000.service/x.service",
                false,
            ),
            // A slice a user created in a delegated directory.
            ("delegated.slice", true),
            ("delegated.slice/x.service", false),
        ];
        assert_eq!(
            assign(&s, &dirs),
            listed(&[
                ("system.slice/x.service", 0),
                ("system.slice/foo.slice/x.service", 0),
            ]),
            "only the system manager's places, only root-named"
        );
    }

    #[test]
    fn user_units_need_their_uid_and_the_managers_place() {
        let s = selectors(vec![Selector::SystemdUserUnit {
            unit: "jupyter.service".into(),
            uid: 1000,
        }]);
        let m = "user.slice/user-1000.slice/user@1000.service";
        let dirs = [
            ("user.slice", true),
            ("user.slice/user-1000.slice", true),
            (m, true),
            (&format!("{m}/app.slice") as &str, false),
            (&format!("{m}/app.slice/jupyter.service"), false),
            (&format!("{m}/app.slice/other.service"), false),
            (
                &format!("{m}/app.slice/other.service/jupyter.service"),
                false,
            ),
            ("user.slice/user-1001.slice", true),
            ("user.slice/user-1001.slice/user@1001.service", true),
            (
                "user.slice/user-1001.slice/user@1001.service/jupyter.service",
                false,
            ),
            // A `user@1000.service` that uid 1001 made in its own subtree.
            (
                "user.slice/user-1001.slice/user@1001.service/user@1000.service",
                false,
            ),
            (
                "user.slice/user-1001.slice/user@1001.service/user@1000.service/jupyter.service",
                false,
            ),
        ];
        assert_eq!(
            assign(&s, &dirs),
            listed(&[(&format!("{m}/app.slice/jupyter.service"), 0)])
        );
    }

    #[test]
    fn user_named_directories_never_move_a_process_to_another_workload() {
        let s = selectors(vec![
            Selector::Cgroup("apps/a".into()),
            Selector::Cgroup("**/b-*".into()),
            Selector::DelegatedCgroup("**/jupyter-*".into()),
        ]);
        let dirs = [
            ("apps", true),
            ("apps/a", true),
            // A's cgroup is delegated to its user, who makes children.
            ("apps/a/b-1", false),
            ("apps/a/jupyter-1", false),
            // Root-named: root may nest workloads.
            ("apps/b-2", true),
            ("apps/b-2/jupyter-9", true),
            // A user's own subtree, in no workload: only the glob that
            // accepts delegated matches.
            ("users", true),
            ("users/alice", true),
            ("users/alice/b-3", false),
            ("users/alice/jupyter-2", false),
            // Nested under its own workload: no gain, accepted.
            ("users/alice/jupyter-2/jupyter-3", false),
            ("users/alice/jupyter-2/b-4", false),
        ];
        assert_eq!(
            assign(&s, &dirs),
            listed(&[
                ("apps/a", 0),
                ("apps/b-2", 1),
                ("apps/b-2/jupyter-9", 2),
                ("users/alice/jupyter-2", 2),
                ("users/alice/jupyter-2/jupyter-3", 2),
            ])
        );
    }

    const UID_A: &str = "0b6c1a2d-3e4f-5a6b-7c8d-9e0f1a2b3c4d";
    const UID_B: &str = "7e1d2c3b-4a5f-4e6d-8c7b-6a5f4e3d2c1b";
    const ID: &str = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

    fn pods() -> PodMap {
        let meta = |name: &str, ns: &str, labels: &[(&str, &str)]| {
            std::sync::Arc::new(kube::PodMeta {
                name: name.into(),
                namespace: ns.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
        };
        PodMap::from([
            (
                UID_A.to_string(),
                meta("bot-1", "support", &[("app", "bot")]),
            ),
            (
                UID_B.to_string(),
                meta("web-1", "shop", &[("app", "bot"), ("tier", "web")]),
            ),
        ])
    }

    fn pod_selector(ns: Option<&str>, labels: &[(&str, &str)]) -> Selector {
        Selector::Kubernetes(PodSelector {
            namespace: ns.map(Into::into),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn k8s_selectors_pick_pod_directories_of_both_drivers() {
        let s = selectors(vec![
            pod_selector(Some("support"), &[("app", "bot")]),
            pod_selector(None, &[("tier", "web")]),
        ]);
        let p = pods();
        let a = UID_A.replace('-', "_");
        let systemd =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{a}.slice");
        assert_eq!(s.workload_of(&systemd, &p), Some(0));
        assert_eq!(
            s.workload_of(&format!("{systemd}/cri-containerd-{ID}.scope"), &p),
            None,
            "containers inherit in the kernel, they are not listed"
        );
        let cgroupfs = format!("kubepods/besteffort/pod{UID_B}");
        assert_eq!(s.workload_of(&cgroupfs, &p), Some(1));
        assert_eq!(
            s.workload_of(&format!("kubepods/pod{UID_A}"), &p),
            Some(0),
            "guaranteed pods sit right below kubepods"
        );
        let unknown = "kubepods/pod11111111-2222-4333-8444-555555555555";
        assert_eq!(s.workload_of(unknown, &p), None);
        assert_eq!(
            s.workload_of(&systemd, &PodMap::new()),
            None,
            "no list, no selection"
        );
        // Under the attach cgroup, wherever the kubelet's tree starts.
        assert_eq!(s.workload_of(&format!("node-a/{cgroupfs}"), &p), Some(1));
    }

    #[test]
    fn k8s_selectors_take_their_turn_in_policy_order() {
        let a = format!("kubepods/pod{UID_A}");
        let s = selectors(vec![
            Selector::Cgroup("kubepods/*".into()),
            pod_selector(Some("support"), &[]),
        ]);
        assert_eq!(
            s.workload_of(&a, &pods()),
            Some(0),
            "the first workload in the file wins"
        );
        let s = selectors(vec![
            pod_selector(Some("support"), &[]),
            Selector::Cgroup("kubepods/*".into()),
        ]);
        assert_eq!(s.workload_of(&a, &pods()), Some(0));
        assert_eq!(
            s.workload_of(&format!("kubepods/pod{UID_B}"), &pods()),
            Some(1)
        );
        assert!(s.selects_pods());
    }

    #[test]
    fn unknown_pod_directories_are_found() {
        let dirs = vec![
            CgroupDir {
                rel: "kubepods".into(),
                id: 1,
                root_named: true,
            },
            CgroupDir {
                rel: format!("kubepods/pod{UID_A}"),
                id: 2,
                root_named: true,
            },
            CgroupDir {
                rel: format!("kubepods/pod{UID_A}/{ID}"),
                id: 3,
                root_named: true,
            },
            CgroupDir {
                rel: "kubepods/pod11111111-2222-4333-8444-555555555555".into(),
                id: 4,
                root_named: true,
            },
        ];
        assert_eq!(
            unknown_pods(&dirs, &pods()),
            ["11111111-2222-4333-8444-555555555555"]
        );
    }

    #[test]
    fn globs_units_and_first_match_wins() {
        let s = selectors(vec![
            Selector::Cgroup("bots/support".into()),
            Selector::Cgroup("pods/*".into()),
            Selector::SystemdUnit("batch.service".into()),
            Selector::Cgroup("bots/*".into()),
        ]);
        assert_eq!(s.workload_of("bots/support", &PodMap::new()), Some(0));
        assert_eq!(s.workload_of("bots/other", &PodMap::new()), Some(3));
        assert_eq!(s.workload_of("pods/a", &PodMap::new()), Some(1));
        assert_eq!(
            s.workload_of("pods/a/b", &PodMap::new()),
            None,
            "`*` must not cross `/`"
        );
        assert_eq!(
            s.workload_of("system.slice/batch.service", &PodMap::new()),
            Some(2)
        );
        assert_eq!(s.workload_of("batch.service", &PodMap::new()), Some(2));
        assert_eq!(
            s.workload_of("system.slice/app.service/batch.service", &PodMap::new()),
            None,
            "a unit inside another unit is not where systemd puts units"
        );
        assert_eq!(s.workload_of("bots", &PodMap::new()), None);
        assert_eq!(s.workload_of("", &PodMap::new()), None);
    }

    #[test]
    fn scan_lists_nested_directories_with_inodes() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("a/b")).unwrap();
        fs::create_dir_all(dir.path().join("c")).unwrap();
        fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let mut rels: Vec<_> = scan(dir.path()).into_iter().map(|d| d.rel).collect();
        rels.sort();
        assert_eq!(rels, vec!["", "a", "a/b", "c"]);
    }

    #[test]
    fn paths_are_relative_to_the_mount() {
        let dirs = vec![
            CgroupDir {
                rel: String::new(),
                id: 1,
                root_named: true,
            },
            CgroupDir {
                rel: "x/y".into(),
                id: 2,
                root_named: true,
            },
        ];
        let p = paths("/test", &dirs);
        assert_eq!(p[&1], "/test");
        assert_eq!(p[&2], "/test/x/y");
    }
}
