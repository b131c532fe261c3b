//! [`CgroupGuard`]: a test's own cgroup below the cgroup2 mount.
//!
//! It owns one directory `<mount>/llm-egress-test-<name>-<pid>-<n>` and every
//! directory created below it. It must never touch the cgroup2 root: the
//! machine's own processes live there. Drop kills whatever still runs inside
//! (`cgroup.kill`), waits until each directory is empty and removes them
//! bottom-up.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
    sync::OnceLock,
    time::Duration,
};

use crate::{unique_suffix, wait_until};

/// Where cgroup2 is mounted, read from /proc/self/mountinfo (fstype
/// `cgroup2`); panics when there is none.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_else(|e| panic!("cannot read /proc/self/mountinfo: {e}"));
        mounts_of_type(&info, "cgroup2")
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no cgroup2 mount in /proc/self/mountinfo"))
    })
}

/// Mount points of the given filesystem type, in mountinfo order.
pub(crate) fn mounts_of_type(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // id parent maj:min root mountpoint options [optional...] - fstype source superopts
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 5 || fields.get(sep + 1) != Some(&fstype) {
            continue;
        }
        out.push(PathBuf::from(unescape_mountinfo(fields[4])));
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let digit = |c: u8| u32::from(c - b'0');
            let v = digit(b[i + 1]) * 64 + digit(b[i + 2]) * 8 + digit(b[i + 3]);
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A test cgroup and its descendants.
#[derive(Debug)]
pub struct CgroupGuard {
    path: PathBuf,
}

impl CgroupGuard {
    /// Creates `<cgroup2 mount>/llm-egress-test-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> CgroupGuard {
        assert!(
            !name.is_empty() && !name.contains('/') && name != "." && name != "..",
            "cgroup test name {name:?} must be one plain path component"
        );
        let mount = cgroup2_mount();
        let path = mount.join(format!("llm-egress-test-{name}-{}", unique_suffix()));
        assert_ne!(path, mount, "refusing to use the cgroup2 root");
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        CgroupGuard { path }
    }

    /// The absolute path of the test cgroup (the agent's attach point).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory name of the test cgroup (last path component).
    pub fn name(&self) -> &str {
        self.path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
    }

    /// Creates `rel` (e.g. `"a/b"`) below the test cgroup, with every missing
    /// parent, and returns its absolute path. Creating an existing one is fine.
    pub fn child(&self, rel: &str) -> PathBuf {
        let path = self.resolve(rel);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        path
    }

    /// The absolute path of `rel` below the test cgroup, without creating it
    /// (`""` or `"."` is the test cgroup itself).
    pub fn resolve(&self, rel: &str) -> PathBuf {
        let rel_path = Path::new(rel);
        assert!(
            rel_path
                .components()
                .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
            "cgroup child {rel:?} must be a relative path without `..`"
        );
        self.path.join(rel_path)
    }

    /// The cgroup id of `rel` (`""` for the test cgroup itself): the inode
    /// number of its directory, which is what bpf_get_current_cgroup_id()
    /// returns.
    pub fn id(&self, rel: &str) -> u64 {
        let path = self.resolve(rel);
        fs::metadata(&path)
            .unwrap_or_else(|e| panic!("cannot stat cgroup {}: {e}", path.display()))
            .ino()
    }

    /// Pids in `rel`'s cgroup.procs (not its descendants').
    pub fn procs(&self, rel: &str) -> Vec<u32> {
        let path = self.resolve(rel).join("cgroup.procs");
        fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Every directory of the tree, children before their parents, the test
    /// cgroup last.
    fn dirs_bottom_up(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        walk(&entry.path(), out);
                    }
                }
            }
            out.push(dir.to_path_buf());
        }
        let mut out = Vec::new();
        walk(&self.path, &mut out);
        out
    }
}

/// `populated 0` in cgroup.events: no process in the cgroup or below.
fn is_empty(dir: &Path) -> bool {
    match fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => events.lines().any(|l| l.trim() == "populated 0"),
        Err(_) => !dir.exists(),
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        let mount = cgroup2_mount();
        if self.path == mount || !self.path.starts_with(mount) {
            // Unreachable by construction; never touch anything else.
            eprintln!(
                "warning: refusing to clean up cgroup {}",
                self.path.display()
            );
            return;
        }
        for dir in self.dirs_bottom_up() {
            // cgroup.kill (kernel ≥ 5.14) kills the whole subtree; writing it
            // on every directory bottom-up also covers a process that moved in
            // meanwhile.
            let _ = fs::write(dir.join("cgroup.kill"), "1");
            if wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                is_empty(&dir).then_some(())
            })
            .is_none()
            {
                eprintln!(
                    "warning: cgroup {} still has processes after cgroup.kill",
                    dir.display()
                );
            }
            // rmdir can fail with EBUSY for a moment after the last process
            // left; retry briefly.
            let removed = wait_until(Duration::from_secs(5), Duration::from_millis(10), || {
                match fs::remove_dir(&dir) {
                    Ok(()) => Some(Ok(())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(Ok(())),
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => None,
                    Err(e) => Some(Err(e)),
                }
            });
            match removed {
                Some(Ok(())) => {}
                Some(Err(e)) => eprintln!("warning: cannot remove cgroup {}: {e}", dir.display()),
                None => eprintln!("warning: cgroup {} stayed busy", dir.display()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 0:23 / / rw,relatime shared:1 - ext4 /dev/vda rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/with\\040space rw,relatime shared:9 - cgroup2 cgroup2 rw
43 22 0:40 / /sys/fs/bpf rw,relatime - bpf bpf rw
";

    #[test]
    fn finds_cgroup2_and_bpf_mounts() {
        assert_eq!(
            mounts_of_type(MOUNTINFO, "cgroup2"),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup/with space")
            ]
        );
        assert_eq!(
            mounts_of_type(MOUNTINFO, "bpf"),
            vec![PathBuf::from("/sys/fs/bpf")]
        );
        assert!(mounts_of_type(MOUNTINFO, "tmpfs").is_empty());
    }
}
