//! [`Machine`]: a Debian system booted with systemd as PID 1 under
//! `systemd-nspawn` (Debian 12's systemd 252, Debian 13's 257), for tests
//! of the shipped systemd unit under a real service manager
//! (tests/tests/deploy_systemd.rs).
//!
//! - [`rootfs`]: a minimal Debian root file system made once per suite with
//!   `mmdebstrap` from Debian's archive and cached in
//!   `<target>/deploy/rootfs-<suite>` (~225 MB, ~60 s to build; a stamp
//!   file names the package list, a changed list rebuilds it).
//! - [`Machine::boot`] boots it read-only with a tmpfs overlay
//!   (`--volatile=overlay`: the cache is never changed, everything the test
//!   installs is gone with the machine), in a network namespace of its own
//!   (`unshare --net`: only `lo`), from a process moved first into cgroups of
//!   its own (cgroup2 and, on hybrid hosts, the `name=systemd` hierarchy):
//!   with `--keep-unit` nspawn puts the container in `payload/` below the
//!   caller's cgroup and gives it a cgroup namespace rooted there, so the
//!   container's cgroup2 root is a test cgroup, never the host's. The
//!   machine gets the unified hierarchy (cgroup2 on /sys/fs/cgroup, as
//!   Debian 12 and 13 boot by default, and systemd >= 256 requires) even on
//!   hosts with the hybrid layout (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`).
//!   `--system-call-filter='bpf perf_event_open'`: nspawn's own seccomp
//!   filter refuses both otherwise.
//! - Drop powers the machine off (SIGTERM to nspawn), kills what is left
//!   through the cgroups and removes them bottom-up, also when the test
//!   panicked. nspawn gets SIGTERM when the test thread dies
//!   (PR_SET_PDEATHSIG).

use std::{
    fs,
    os::unix::{fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{cgroup2_mount, tail, unique_suffix, wait_until};

/// Packages of the cached root file system (besides `minbase`).
pub const ROOTFS_PACKAGES: &str =
    "systemd,systemd-sysv,dbus,iproute2,curl,ca-certificates,procps,util-linux";
const STAMP: &str = "llm-egress-rootfs";

/// The target directory, found from this test executable
/// (`<target>/<profile>/deps/<exe>`), or `$CARGO_TARGET_DIR`.
fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the test executable");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/exe")
        .to_path_buf()
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout), 6000),
        tail(&String::from_utf8_lossy(&out.stderr), 6000)
    )
}

/// The cached root file system of Debian `suite` (`bookworm`, `trixie`),
/// made by `mmdebstrap` when missing or made from another package list.
/// One test process at a time builds it (flock on
/// `<target>/deploy/.rootfs.lock`).
pub fn rootfs(suite: &str) -> PathBuf {
    rootfs_with(suite, "")
}

/// [`rootfs`] with `extra` packages (comma-separated) besides
/// [`ROOTFS_PACKAGES`], cached apart (`rootfs-<suite>-<extra>`).
pub fn rootfs_with(suite: &str, extra: &str) -> PathBuf {
    let dir = target_dir().join("deploy");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    let lock = fs::File::create(dir.join(".rootfs.lock")).expect("the rootfs lock file");
    // SAFETY: flock on a file we own; released when `lock` is closed.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    let (name, packages) = if extra.is_empty() {
        (format!("rootfs-{suite}"), ROOTFS_PACKAGES.to_string())
    } else {
        (
            format!("rootfs-{suite}-{}", extra.replace(',', "-")),
            format!("{ROOTFS_PACKAGES},{extra}"),
        )
    };
    let root = dir.join(&name);
    let stamp = format!("{suite} minbase {packages}\n");
    if fs::read_to_string(root.join(STAMP)).is_ok_and(|s| s == stamp) {
        return root;
    }
    let tmp = dir.join(format!("{name}.tmp"));
    for d in [&tmp, &root] {
        if d.exists() {
            fs::remove_dir_all(d).unwrap_or_else(|e| panic!("cannot remove {}: {e}", d.display()));
        }
    }
    eprintln!(
        "building the Debian {suite} root file system {} (once, ~60 s)",
        root.display()
    );
    let out = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={packages}"))
        .arg(suite)
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run mmdebstrap ({e}): run `cargo xtask setup`, which installs it")
        });
    assert!(out.status.success(), "mmdebstrap failed:\n{}", show(&out));
    fs::write(tmp.join(STAMP), &stamp).expect("write the rootfs stamp");
    fs::rename(&tmp, &root).expect("rename the rootfs into place");
    root
}

/// The `name=systemd` cgroup v1 hierarchy of a hybrid host, if any.
fn systemd_v1_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-")?;
        (fields.get(sep + 1) == Some(&"cgroup")
            && fields
                .get(sep + 3)
                .is_some_and(|o| o.split(',').any(|o| o == "name=systemd")))
        .then(|| PathBuf::from(fields[4]))
    })
}

/// A booted machine; see the module comment.
pub struct Machine {
    /// Our cgroups: cgroup2, and `name=systemd` on hybrid hosts.
    cgroups: Vec<PathBuf>,
    nspawn: Child,
    leader: u32,
    log: PathBuf,
}

impl Machine {
    /// Boots the cached rootfs of `suite` with `binds` (host path, path inside)
    /// bind-mounted read-only, and waits until systemd says the system is
    /// running (at most 90 s).
    pub fn boot(suite: &str, name: &str, binds: &[(&Path, &str)], log: &Path) -> Machine {
        Machine::boot_root(rootfs(suite), name, binds, log)
    }

    /// [`Machine::boot`] of a root file system of [`rootfs_with`].
    pub fn boot_root(root: PathBuf, name: &str, binds: &[(&Path, &str)], log: &Path) -> Machine {
        let leaf = format!("llm-egress-test-{name}-{}", unique_suffix());
        let mut cgroups = vec![cgroup2_mount().join(&leaf)];
        if let Some(v1) = systemd_v1_mount() {
            cgroups.push(v1.join(&leaf));
        }
        for cg in &cgroups {
            fs::create_dir(cg).unwrap_or_else(|e| panic!("cannot create {}: {e}", cg.display()));
        }
        let moves: String = cgroups
            .iter()
            .map(|cg| format!("echo $$ > {}/cgroup.procs && ", cg.display()))
            .collect();
        let mut nspawn = format!(
            "{moves}exec unshare --net -- systemd-nspawn --quiet -D {} --volatile=overlay -b \
             --register=no --keep-unit --console=passive --machine={name} \
             --system-call-filter='bpf perf_event_open' \
             --capability=CAP_BPF,CAP_NET_ADMIN,CAP_PERFMON,CAP_SYS_PTRACE,CAP_SYS_ADMIN",
            root.display()
        );
        for (host, inside) in binds {
            nspawn.push_str(&format!(" --bind-ro={}:{inside}", host.display()));
        }
        let log_file = fs::File::create(log).expect("the nspawn log file");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", &nspawn])
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file);
        // SAFETY: prctl is async-signal-safe; nspawn powers the machine off
        // on SIGTERM when the test thread dies without dropping the guard.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let nspawn = cmd.spawn().expect("start systemd-nspawn");
        let mut m = Machine {
            cgroups,
            nspawn,
            leader: 0,
            log: log.to_path_buf(),
        };
        let init_procs = m.cgroups[0].join("payload/init.scope/cgroup.procs");
        m.leader = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            fs::read_to_string(&init_procs)
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
        })
        .unwrap_or_else(|| panic!("the machine did not start PID 1 within 30 s\n{}", m.log()));
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let out = m.sh("systemctl is-system-running --wait");
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if state == "running" || state == "degraded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the machine did not finish booting within 90 s ({state})\n{}\n{}",
                show(&out),
                m.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        m
    }

    /// PID 1 of the machine, as the host sees it.
    pub fn leader(&self) -> u32 {
        self.leader
    }

    /// The host path of the machine's cgroup2 root (`…/payload`).
    pub fn host_cgroup_root(&self) -> PathBuf {
        self.cgroups[0].join("payload")
    }

    /// `/bin/sh -c script` in every namespace of the machine (the process
    /// stays in the test's cgroup; use `systemd-run` for workloads).
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args([
                "-t",
                &self.leader.to_string(),
                "-a",
                "/bin/sh",
                "-c",
                script,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    /// [`Machine::sh`] that must succeed; its stdout.
    pub fn sh_ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the machine: {script}\n{}",
            show(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// nspawn's own output (the machine's console is passive).
    pub fn log(&self) -> String {
        format!(
            "nspawn log:\n{}",
            tail(&fs::read_to_string(&self.log).unwrap_or_default(), 3000)
        )
    }

    /// The inode (cgroup id) of a directory inside the machine, read
    /// through `/proc/<leader>/root`.
    pub fn inode(&self, inside: &str) -> Option<u64> {
        fs::metadata(format!("/proc/{}/root{inside}", self.leader))
            .ok()
            .map(|m| m.ino())
    }
}

fn kill_cgroup(cg: &Path) {
    if fs::write(cg.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // cgroup v1 (name=systemd): every task, depth first.
    for entry in walk(cg) {
        for pid in fs::read_to_string(entry.join("tasks"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: kill(2) of a process in our own test cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// `dir` and every directory below it, deepest first.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                out.extend(walk(&e.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGTERM: nspawn asks the machine's systemd to power off.
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let ended = wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
            self.nspawn.try_wait().ok().flatten()
        });
        if ended.is_none() {
            eprintln!("warning: the machine did not power off within 20 s; killing it");
            let _ = self.nspawn.kill();
            let _ = self.nspawn.wait();
        }
        for cg in &self.cgroups {
            kill_cgroup(cg);
        }
        for cg in &self.cgroups {
            for dir in walk(cg) {
                let gone = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
                    (fs::remove_dir(&dir).is_ok() || !dir.exists()).then_some(())
                });
                if gone.is_none() {
                    eprintln!("warning: cannot remove cgroup {}", dir.display());
                }
            }
        }
    }
}
