//! Workload cgroups: which cgroup directories under the attach cgroup each
//! workload selects, kept current as cgroups come and go.
//!
//! The kernel walks a task's ancestors and uses the deepest one listed in
//! `WORKLOADS`, so only the selected directories are listed, not their
//! descendants. New directories are seen through inotify (mkdir on cgroupfs
//! raises IN_CREATE) with a periodic rescan as a safety net. A workload whose
//! cgroup does not exist yet is logged and applied when it appears.

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

use crate::policy::{Policy, Selector};

/// Directories deeper than this below the attach cgroup are not scanned.
const MAX_SCAN_DEPTH: usize = 32;
/// Rescan period when no inotify event arrives.
const RESCAN: Duration = Duration::from_secs(5);

/// One cgroup directory: its path relative to the attach cgroup ("" for
/// the attach cgroup itself) and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    pub rel: String,
    pub id: u64,
}

/// Lists the attach cgroup and every directory below it.
pub fn scan(root: &Path) -> Vec<CgroupDir> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        // A directory may vanish between listing and reading: skip it.
        let Ok(meta) = fs::metadata(&dir) else { continue };
        out.push(CgroupDir { rel: rel.clone(), id: meta.ino() });
        if depth >= MAX_SCAN_DEPTH {
            continue;
        }
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let name = entry.file_name().to_string_lossy().into_owned();
                let child_rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                stack.push((entry.path(), child_rel, depth + 1));
            }
        }
    }
    out
}

/// The compiled selectors of a policy's workloads.
pub struct Selectors {
    matchers: Vec<Matcher>,
}

enum Matcher {
    Glob(GlobMatcher),
    Unit(String),
}

/// `*` stays within one path component; `**` crosses them.
fn compile(glob: &str) -> Option<GlobMatcher> {
    GlobBuilder::new(glob.trim_end_matches('/')).literal_separator(true).build().ok().map(|g| g.compile_matcher())
}

impl Selectors {
    pub fn new(policy: &Policy) -> Self {
        let matchers = policy
            .workloads
            .iter()
            .map(|w| match &w.selector {
                // Validation compiled the same glob; an error here cannot
                // happen, and would only make the workload match nothing.
                Selector::Cgroup(g) => match compile(g) {
                    Some(m) => Matcher::Glob(m),
                    None => Matcher::Unit(String::new()),
                },
                Selector::SystemdUnit(u) => Matcher::Unit(u.clone()),
            })
            .collect();
        Self { matchers }
    }

    /// Which workload (index) selects `rel`: the first in policy order.
    pub fn workload_of(&self, rel: &str) -> Option<usize> {
        if rel.is_empty() {
            return None;
        }
        let name = rel.rsplit('/').next().unwrap_or(rel);
        self.matchers.iter().position(|m| match m {
            Matcher::Glob(g) => g.is_match(rel),
            Matcher::Unit(u) => !u.is_empty() && name == u,
        })
    }

    /// cgroup id → workload index for every selected directory.
    pub fn assign(&self, dirs: &[CgroupDir]) -> BTreeMap<u64, usize> {
        dirs.iter().filter_map(|d| Some((d.id, self.workload_of(&d.rel)?))).collect()
    }
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
    let (tx, rx) = mpsc::channel(1);
    std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || watch_loop(&root, &tx))
        .map_err(|e| warn!(error = %e, "cannot start the cgroup watcher; rescanning is disabled"))
        .ok();
    rx
}

fn watch_loop(root: &Path, tx: &mpsc::Sender<()>) {
    use inotify::{Inotify, WatchMask};
    let mut inotify = match Inotify::init() {
        Ok(i) => Some(i),
        Err(e) => {
            warn!(error = %e, "inotify unavailable; new cgroups are found by rescanning every 5 s");
            None
        }
    };
    let mut watched = std::collections::HashSet::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(ino) = inotify.as_mut() {
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
        let changed = match inotify.as_mut() {
            Some(ino) => wait_readable(ino, RESCAN) && ino.read_events(&mut buf).is_ok_and(|mut e| e.next().is_some()),
            None => {
                std::thread::sleep(RESCAN);
                true
            }
        };
        let _ = changed;
        if tx.blocking_send(()).is_err() {
            return;
        }
    }
}

fn scan_dirs(root: &Path) -> Vec<PathBuf> {
    scan(root).into_iter().map(|d| if d.rel.is_empty() { root.to_path_buf() } else { root.join(&d.rel) }).collect()
}

/// Waits up to `timeout` for inotify events.
fn wait_readable(ino: &inotify::Inotify, timeout: Duration) -> bool {
    use std::os::fd::{AsFd, AsRawFd};
    let mut pfd = libc::pollfd { fd: ino.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    rc > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selectors(sel: Vec<Selector>) -> Selectors {
        let matchers = sel
            .into_iter()
            .map(|s| match s {
                Selector::Cgroup(g) => Matcher::Glob(compile(&g).unwrap()),
                Selector::SystemdUnit(u) => Matcher::Unit(u),
            })
            .collect();
        Selectors { matchers }
    }

    #[test]
    fn globs_units_and_first_match_wins() {
        let s = selectors(vec![
            Selector::Cgroup("bots/support".into()),
            Selector::Cgroup("pods/*".into()),
            Selector::SystemdUnit("batch.service".into()),
            Selector::Cgroup("bots/*".into()),
        ]);
        assert_eq!(s.workload_of("bots/support"), Some(0));
        assert_eq!(s.workload_of("bots/other"), Some(3));
        assert_eq!(s.workload_of("pods/a"), Some(1));
        assert_eq!(s.workload_of("pods/a/b"), None, "`*` must not cross `/`");
        assert_eq!(s.workload_of("system.slice/batch.service"), Some(2));
        assert_eq!(s.workload_of("batch.service"), Some(2));
        assert_eq!(s.workload_of("bots"), None);
        assert_eq!(s.workload_of(""), None);
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
        let dirs = vec![CgroupDir { rel: String::new(), id: 1 }, CgroupDir { rel: "x/y".into(), id: 2 }];
        let p = paths("/test", &dirs);
        assert_eq!(p[&1], "/test");
        assert_eq!(p[&2], "/test/x/y");
    }
}
