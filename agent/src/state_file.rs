//! The agent's own files under `state_dir` (token budgets, fleet leases,
//! learned estimator lines): written whole through a temporary file
//! renamed over the old one, 0600 in a 0700 directory, whatever the umask
//! (docs/operations.md, "Files and directories the agent trusts"); a
//! missing file reads as none.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::Path,
};

/// Writes `dir/name` atomically, root's alone.
pub fn write_private(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))
}

/// The bytes of `dir/name`; `None` when there is no such file. The error
/// names the path.
pub fn read_optional(dir: &Path, name: &str) -> Result<Option<Vec<u8>>, String> {
    let path = dir.join(name);
    match fs::read(&path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_state_file_is_replaced_whole_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        assert_eq!(read_optional(&sub, "x.json").unwrap(), None);
        write_private(&sub, "x.json", b"one").unwrap();
        write_private(&sub, "x.json", b"two").unwrap();
        assert_eq!(
            read_optional(&sub, "x.json").unwrap().as_deref(),
            Some(&b"two"[..])
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sub), 0o700);
        assert_eq!(mode(&sub.join("x.json")), 0o600);
        assert!(!sub.join("x.json.tmp").exists());
        // Not a file: the error names the path.
        fs::create_dir(sub.join("d")).unwrap();
        assert!(read_optional(&sub, "d").unwrap_err().contains("/state/d"));
    }
}
