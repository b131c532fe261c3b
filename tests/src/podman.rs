//! [`Podman`]: podman 4.3 with runc and a storage of its own, for tests of
//! the container image (tests/tests/deploy_container.rs).
//!
//! Everything is private to one guard: the image store and run directory in
//! a temp dir (`--root`, `--runroot`), a `CONTAINERS_CONF` (runc, because
//! crun refuses the hybrid cgroup layout of these machines; the cgroupfs
//! manager; no default ulimits, which need CAP_SYS_RESOURCE; file event
//! log), and a cgroup name `llm-egress-test-<name>-<pid>-<n>` that every
//! container of the test gets as `--cgroup-parent`. Containers always run
//! with `--network=none`: podman's default network adds a bridge and NAT
//! rules to the host. There is no registry: base images come from the
//! cached Debian rootfs ([`crate::nspawn::rootfs`]) by `podman import`.
//!
//! Drop removes the containers and images, unmounts what the store left
//! mounted, removes the temp dir and the test cgroup in every hierarchy,
//! also when the test panicked.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use crate::{TempDir, tail, unique_suffix};

const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = []
netns = "none"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"#;

pub struct Podman {
    dir: TempDir,
    cgroup: String,
}

pub fn show(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 4000),
        tail(&String::from_utf8_lossy(&out.stderr), 4000)
    )
}

/// Every mount point of a cgroup hierarchy (v1 controllers and cgroup2).
fn cgroup_mounts() -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            matches!(fields.get(sep + 1), Some(&"cgroup") | Some(&"cgroup2"))
                .then(|| PathBuf::from(fields[4]))
        })
        .collect()
}

impl Podman {
    pub fn new(name: &str) -> Podman {
        let dir = TempDir::new(&format!("llm-egress-test-podman-{name}"));
        fs::write(dir.path().join("containers.conf"), CONTAINERS_CONF)
            .expect("write containers.conf");
        Podman {
            dir,
            cgroup: format!("llm-egress-test-{name}-{}", unique_suffix()),
        }
    }

    /// `/<test cgroup>/<rel>`: a `--cgroup-parent` below the test's cgroup.
    pub fn cgroup_parent(&self, rel: &str) -> String {
        format!("/{}/{rel}", self.cgroup)
    }

    /// A `podman` command on this guard's store and configuration.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .args(["--storage-driver", "overlay"])
            .stdin(Stdio::null());
        c
    }

    /// Runs `podman args…`; panics with its output when it fails.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self
            .cmd()
            .args(args)
            .output()
            .expect("run podman (cargo xtask setup installs it)");
        assert!(out.status.success(), "podman {args:?}:\n{}", show(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `podman import` of a root file system directory as `tag`.
    pub fn import_rootfs(&self, rootfs: &Path, tag: &str) {
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("run tar");
        let out = self
            .cmd()
            .args(["import", "-", tag])
            .stdin(tar.stdout.take().expect("tar stdout"))
            .output()
            .expect("run podman import");
        let tar_status = tar.wait().expect("wait for tar");
        assert!(
            out.status.success() && tar_status.success(),
            "importing {} as {tag} (tar: {tar_status}):\n{}",
            rootfs.display(),
            show(&out)
        );
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for args in [
            &["rm", "--all", "--force", "--time", "0"][..],
            &["rmi", "--all", "--force"][..],
        ] {
            let _ = self.cmd().args(args).output();
        }
        // The overlay store bind-mounts its own directory: unmount what is
        // still mounted below the temp dir, deepest first.
        let root = self.dir.path().to_string_lossy().into_owned();
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mounts: Vec<&str> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        // The test cgroup in every hierarchy: kill what is left, then
        // remove the directories bottom-up.
        for mount in cgroup_mounts() {
            let top = mount.join(&self.cgroup);
            if !top.is_dir() {
                continue;
            }
            let _ = fs::write(top.join("cgroup.kill"), "1");
            let mut dirs = Vec::new();
            let mut stack = vec![top.clone()];
            while let Some(d) = stack.pop() {
                if let Ok(entries) = fs::read_dir(&d) {
                    stack.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path()),
                    );
                }
                dirs.push(d);
            }
            for d in dirs.iter().rev() {
                for attempt in 0..50 {
                    if fs::remove_dir(d).is_ok() || !d.exists() {
                        break;
                    }
                    if attempt == 49 {
                        eprintln!("warning: cannot remove cgroup {}", d.display());
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            }
        }
    }
}
