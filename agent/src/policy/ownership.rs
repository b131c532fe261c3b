//! Who may change what the agent trusts: the policy file, `pin_path`,
//! `state_dir`, the audit log, `[fleet]`'s `tls_ca` and `password_file`,
//! and the cgroup directories whose names select workloads
//! (`crate::attribution::cgroups`).
//!
//! The agent runs as root and acts on these paths; a non-root user who can
//! write one of them, or replace it (write a directory above it), could
//! change the policy, swap pinned maps, forge saved budgets or read and
//! rewrite the audit log. At start, before anything is created or pinned,
//! every one of them must be trusted (docs/operations.md, "Files and
//! directories the agent trusts"):
//!
//! - the path itself, where it exists, is owned by root (or the agent's own
//!   uid) and is writable neither by others nor by a group other than gid 0;
//! - every directory above it, up to `/`, is the same, or is owned by root
//!   and sticky (`/tmp`, a `/sys/fs/bpf` mounted 1777): others may create
//!   entries there but not replace the agent's;
//! - a symbolic link on the way is followed and the directories of its
//!   target are checked too;
//! - write bits mean nothing on a read-only mount (a Kubernetes ConfigMap
//!   volume: its directory is 0777, mounted read-only): there only the
//!   owner counts.
//!
//! A component that does not exist yet is created later by the agent (mode
//! 0700). This module only reads metadata; it never changes a mode (the
//! audit log's own mode is fixed where it is opened, `crate::telemetry::audit`).

use std::{
    fs::{self, Metadata},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use crate::policy::{AuditLog, Policy};

/// A path the agent refuses to trust. `component`: the path itself or the
/// directory above it that fails.
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    #[error(
        "{what} {path} is not trusted: {component} is {why} (owner uid {uid}, group gid {gid}, \
         mode {mode:04o}); make it and every directory above it owned by root and writable \
         only by root (docs/operations.md, \"Files and directories the agent trusts\")"
    )]
    Mode {
        what: &'static str,
        path: PathBuf,
        component: PathBuf,
        why: &'static str,
        uid: u32,
        gid: u32,
        mode: u32,
    },
    /// Root cannot stat it (another user's FUSE mount): nothing is known.
    #[error("{what} {path} is not trusted: {component} cannot be examined: {source}")]
    Unreadable {
        what: &'static str,
        path: PathBuf,
        component: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The metadata of `path` (`follow`: through a final symbolic link); None
/// when it does not exist.
fn stat(
    what: &'static str,
    whole: &Path,
    path: &Path,
    follow: bool,
) -> Result<Option<Metadata>, Untrusted> {
    let meta = if follow {
        fs::metadata(path)
    } else {
        fs::symlink_metadata(path)
    };
    match meta {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Untrusted::Unreadable {
            what,
            path: whole.to_path_buf(),
            component: path.to_path_buf(),
            source,
        }),
    }
}

fn trusted_owner(uid: u32) -> bool {
    // SAFETY: geteuid() has no preconditions and cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Whether only root can create, remove or rename entries in (a
/// directory) or write to (a file) what `meta` describes: owned by root,
/// not writable by others, writable by its group only if that is gid 0.
/// For cgroup directories: only root can create a child there.
pub fn only_root_writes(meta: &Metadata) -> bool {
    let mode = meta.mode();
    meta.uid() == 0 && mode & 0o002 == 0 && (mode & 0o020 == 0 || meta.gid() == 0)
}

/// Whether `path` lies on a file system mounted read-only.
fn read_only_mount(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path and a zeroed out-parameter the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the pointers live for the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_flag & libc::ST_RDONLY != 0
}

/// Why `meta` (of the path itself, `leaf`, or of a directory above it) is
/// not trusted; None when it is. `read_only`: on a read-only mount.
fn distrust(meta: &Metadata, leaf: bool, read_only: bool) -> Option<&'static str> {
    let mode = meta.mode();
    if !trusted_owner(meta.uid()) {
        return Some("owned by another user");
    }
    if read_only {
        return None;
    }
    // A root-owned sticky directory above: others may add entries but not
    // remove or rename the agent's.
    let sticky_ok = !leaf && meta.uid() == 0 && meta.is_dir() && mode & 0o1000 != 0;
    if mode & 0o002 != 0 && !sticky_ok {
        return Some("writable by every user");
    }
    if mode & 0o020 != 0 && meta.gid() != 0 && !sticky_ok {
        return Some("writable by a group other than root's");
    }
    None
}

/// Checks `path` (which may not exist yet) and every directory above it,
/// as written and, through symbolic links, as resolved.
pub fn check(what: &'static str, path: &Path) -> Result<(), Untrusted> {
    let untrusted = |component: &Path, meta: &Metadata, why| Untrusted::Mode {
        what,
        path: path.to_path_buf(),
        component: component.to_path_buf(),
        why,
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.permissions().mode() & 0o7777,
    };
    // As written: every existing component (a symlink's own bits mean
    // nothing; who made it is the directory above's question).
    for (i, component) in path.ancestors().enumerate() {
        if component.as_os_str().is_empty() {
            continue;
        }
        let Some(meta) = stat(what, path, component, false)? else {
            continue;
        };
        if meta.file_type().is_symlink() {
            continue;
        }
        if let Some(why) = distrust(&meta, i == 0, read_only_mount(component)) {
            return Err(untrusted(component, &meta, why));
        }
    }
    // As resolved: the deepest existing component and its directories.
    let Some((i, existing)) = path
        .ancestors()
        .enumerate()
        .find(|(_, a)| !a.as_os_str().is_empty() && fs::symlink_metadata(a).is_ok())
    else {
        return Ok(());
    };
    let real = fs::canonicalize(existing).map_err(|source| Untrusted::Unreadable {
        what,
        path: path.to_path_buf(),
        component: existing.to_path_buf(),
        source,
    })?;
    for (j, component) in real.ancestors().enumerate() {
        let Some(meta) = stat(what, path, component, true)? else {
            continue;
        };
        if let Some(why) = distrust(&meta, i == 0 && j == 0, read_only_mount(component)) {
            return Err(untrusted(component, &meta, why));
        }
    }
    Ok(())
}

/// Every path of `policy` the agent trusts, and the policy file `config`.
pub fn check_policy(policy: &Policy, config: Option<&Path>) -> Result<(), Untrusted> {
    if let Some(config) = config {
        check("policy file", config)?;
    }
    check("pin_path", &policy.pin_path)?;
    check("state_dir", &policy.state_dir)?;
    if let AuditLog::File(log) = &policy.audit_log {
        check_audit_log(log)?;
    }
    // Whoever could change the ledger's CA could stand in for the ledger
    // and grant any fleet budget (docs/fleet.md).
    if let Some(fleet) = &policy.fleet {
        if let Some(ca) = &fleet.tls_ca {
            check("fleet.tls_ca", ca)?;
        }
        if let Some(crate::policy::fleet::Password::File(p)) = &fleet.password {
            check("fleet.password_file", p)?;
        }
    }
    Ok(())
}

/// The audit log's directories must be trusted like the other paths; the
/// file itself only needs a trusted owner (its mode is narrowed when it
/// is opened, `crate::telemetry::audit`).
fn check_audit_log(log: &Path) -> Result<(), Untrusted> {
    if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
        check("audit_log's directory", dir)?;
    }
    match fs::metadata(log) {
        Ok(meta) if !trusted_owner(meta.uid()) => Err(Untrusted::Mode {
            what: "audit_log",
            path: log.to_path_buf(),
            component: log.to_path_buf(),
            why: "owned by another user",
            uid: meta.uid(),
            gid: meta.gid(),
            mode: meta.permissions().mode() & 0o7777,
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// (component, why, uid) of a mode error.
    fn mode_err(e: Untrusted) -> (PathBuf, &'static str, u32) {
        match e {
            Untrusted::Mode {
                component,
                why,
                uid,
                ..
            } => (component, why, uid),
            e => panic!("not a mode error: {e}"),
        }
    }

    fn set_mode(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Run as root (the suite's tests run as root); skipped otherwise.
    fn root() -> bool {
        // SAFETY: no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn modes_decide_trust() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let file = dir.path().join("policy.toml");
        fs::write(&file, "").unwrap();
        set_mode(&file, 0o644);
        assert!(check("policy file", &file).is_ok());
        assert!(
            check("state_dir", &dir.path().join("missing/state")).is_ok(),
            "missing components are created later"
        );
        set_mode(&file, 0o646);
        let e = check("policy file", &file).unwrap_err();
        assert!(e.to_string().contains("mode 0646"), "{e}");
        assert_eq!(mode_err(e).1, "writable by every user");
        set_mode(&file, 0o644);
        // Sticky is fine above, never for the path itself.
        set_mode(dir.path(), 0o1777);
        assert!(check("policy file", &file).is_ok());
        let e = check("state_dir", dir.path()).unwrap_err();
        assert_eq!(mode_err(e).0, dir.path());
        set_mode(dir.path(), 0o777);
        let e = check("policy file", &file).unwrap_err();
        assert_eq!(mode_err(e).0, dir.path());
        set_mode(dir.path(), 0o755);
        std::os::unix::fs::chown(&file, Some(65534), None).unwrap();
        let e = check("policy file", &file).unwrap_err();
        let (_, why, uid) = mode_err(e);
        assert_eq!((why, uid), ("owned by another user", 65534));
    }

    #[test]
    fn symlinks_are_checked_where_they_lead() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        set_mode(&open, 0o777);
        let target = open.join("state");
        fs::create_dir(&target).unwrap();
        set_mode(&target, 0o700);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = check("state_dir", &link).unwrap_err();
        assert_eq!(mode_err(e).0, open);
    }

    #[test]
    fn an_audit_log_of_another_user_is_refused_a_wide_one_is_not() {
        if !root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o755);
        let log = dir.path().join("audit.jsonl");
        assert!(check_audit_log(&log).is_ok(), "a log not made yet");
        fs::write(&log, "").unwrap();
        set_mode(&log, 0o666);
        assert!(
            check_audit_log(&log).is_ok(),
            "its mode is narrowed on open"
        );
        std::os::unix::fs::chown(&log, Some(65534), None).unwrap();
        let (component, why, uid) = mode_err(check_audit_log(&log).unwrap_err());
        assert_eq!((component, why, uid), (log, "owned by another user", 65534));
    }

    #[test]
    fn write_bits_do_not_count_on_a_read_only_mount() {
        let dir = tempfile::tempdir().unwrap();
        set_mode(dir.path(), 0o777);
        let meta = fs::metadata(dir.path()).unwrap();
        let owned = trusted_owner(meta.uid());
        assert_eq!(distrust(&meta, true, true).is_none(), owned);
        assert!(distrust(&meta, true, false).is_some());
        assert!(!read_only_mount(dir.path()), "a temp dir is writable");
    }

    #[test]
    fn only_root_writes_reads_owner_and_bits() {
        let dir = tempfile::tempdir().unwrap();
        let meta = fs::metadata(dir.path()).unwrap();
        assert_eq!(
            only_root_writes(&meta),
            meta.uid() == 0 && meta.mode() & 0o022 == 0
        );
    }
}
