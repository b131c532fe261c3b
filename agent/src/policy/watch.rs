//! Tells the agent at once when its policy file may have changed (inotify),
//! so that an edit applies in milliseconds instead of at the next
//! once-a-second check (which stays, for file systems without inotify).
//!
//! Watched: the directory the policy path names (an editor's or
//! `rewrite`'s rename over the file, an in-place write, Kubernetes'
//! ConfigMap update, which renames its `..data` symlink in that directory)
//! and, when the path is a symlink elsewhere, the directory of the file it
//! resolves to (an in-place write there). The agent decides whether the
//! content changed (its hash), so a burst of events is one reload, and
//! events of other files in those directories reload nothing.

use std::path::{Path, PathBuf};

use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;
use tracing::warn;

/// What ends a change: a write closed, a rename into the directory (a
/// sibling written, then renamed over the file; ConfigMap's `..data`), a
/// removal. Not `CREATE` or `MODIFY`: the file is still being written then.
fn mask() -> WatchMask {
    WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::DELETE | WatchMask::ATTRIB
}

/// The directories to watch for `path`: its own, and the resolved file's.
fn dirs_of(path: &Path) -> Vec<PathBuf> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if d.as_os_str().is_empty() => PathBuf::from("."),
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("/"),
    };
    let mut dirs = vec![parent(path)];
    if let Ok(real) = std::fs::canonicalize(path) {
        let d = parent(&real);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    dirs
}

/// Sends `()` after each change in the watched directories; `None` when
/// inotify cannot be used (the agent then checks the file every second).
pub fn watch(path: &Path) -> Option<mpsc::Receiver<()>> {
    let mut ino = Inotify::init()
        .map_err(
            |e| warn!(error = %e, "inotify unavailable; the policy file is checked every second"),
        )
        .ok()?;
    let add = |ino: &mut Inotify| {
        for dir in dirs_of(path) {
            if let Err(e) = ino.watches().add(&dir, mask()) {
                warn!(dir = %dir.display(), error = %e, "cannot watch the policy file's directory; it is checked every second");
            }
        }
    };
    add(&mut ino);
    let (tx, rx) = mpsc::channel(1);
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                if ino.read_events_blocking(&mut buf).is_err() {
                    return;
                }
                // A symlink may now resolve into another directory: watch
                // it before the agent reads the file.
                for dir in dirs_of(&path) {
                    let _ = ino.watches().add(&dir, mask());
                }
                // A full channel already holds a pending change.
                if let Err(mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                    return;
                }
            }
        })
        .map_err(|e| warn!(error = %e, "cannot start the policy file watcher; it is checked every second"))
        .ok()?;
    Some(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn next(rx: &mut mpsc::Receiver<()>) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), rx.recv()).await })
            .is_ok()
    }

    fn drain(rx: &mut mpsc::Receiver<()>) {
        while rx.try_recv().is_ok() {}
    }

    #[test]
    fn renames_in_place_writes_and_configmap_swaps_are_seen() {
        let dir = tempfile::tempdir().unwrap();
        // The ConfigMap layout: policy.toml -> ..data/policy.toml,
        // ..data -> ..v1 (a directory).
        std::fs::create_dir(dir.path().join("..v1")).unwrap();
        std::fs::write(dir.path().join("..v1/policy.toml"), "a").unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        let path = dir.path().join("policy.toml");
        std::os::unix::fs::symlink("..data/policy.toml", &path).unwrap();
        let mut rx = watch(&path).expect("inotify");

        // Kubernetes' update: a new directory, a new symlink renamed over
        // `..data`.
        std::fs::create_dir(dir.path().join("..v2")).unwrap();
        std::fs::write(dir.path().join("..v2/policy.toml"), "b").unwrap();
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        drain(&mut rx);
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        assert!(next(&mut rx), "the ..data swap is seen");

        // An in-place write to the file the symlink now resolves to.
        drain(&mut rx);
        std::fs::write(dir.path().join("..v2/policy.toml"), "c").unwrap();
        assert!(next(&mut rx), "an in-place write is seen");

        // A plain file replaced by a rename (editors, `rewrite_policy`).
        let other = tempfile::tempdir().unwrap();
        let moved = other.path().join("p.toml");
        std::fs::write(&moved, "x").unwrap();
        let mut rx2 = watch(&moved).expect("inotify");
        std::fs::write(other.path().join(".p.toml.new"), "y").unwrap();
        drain(&mut rx2);
        std::fs::rename(other.path().join(".p.toml.new"), &moved).unwrap();
        assert!(next(&mut rx2), "a rename over the file is seen");
    }
}
