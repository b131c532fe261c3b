//! What the plaintext attacher reads from /proc and cgroupfs: the
//! workload of a process by its cgroup path, the processes of a cgroup
//! tree, a process's start time and root, and the libssl and other
//! executable files it maps.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// The workload whose cgroup is `path` (relative to the cgroup2 mount, as
/// /proc/PID/cgroup shows it) or one of its ancestors; the deepest wins.
pub fn workload_by_path(exact: &[(String, String)], path: &str) -> Option<String> {
    exact
        .iter()
        .filter(|(p, _)| {
            let p = p.trim_end_matches('/');
            path == p || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
        })
        .max_by_key(|(p, _)| p.len())
        .map(|(_, w)| w.clone())
}

/// Where `pid`'s root is seen from the agent: `/` when it shares the
/// agent's root and mount namespace (the path then names the file
/// directly), else /proc/PID/root (a container's root, or a private mount
/// namespace whose mounts may cover the agent's files: `unshare -m` and a
/// bind mount over libssl).
pub fn process_root(pid: u32) -> PathBuf {
    let theirs = PathBuf::from(format!("/proc/{pid}/root"));
    let same_file = |a: &str, b: &str| match (fs::metadata(a), fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    };
    let same = same_file(&format!("/proc/{pid}/root"), "/")
        && same_file(&format!("/proc/{pid}/ns/mnt"), "/proc/self/ns/mnt");
    if same { PathBuf::from("/") } else { theirs }
}

/// Processes in `dir` and the cgroups below it.
pub fn cgroup_pids(dir: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if depth >= llm_egress_common::MAX_CGROUP_DEPTH {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&d) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((e.path(), depth + 1));
                }
            }
        }
    }
    out
}

/// Field 22 (starttime) of /proc/PID/stat.
pub fn start_time(pid: u32) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&text)
}

pub fn parse_start_time(stat: &str) -> Option<u64> {
    // The command may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `pid`'s /proc/PID/maps text (empty when it is gone).
pub fn maps(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default()
}

/// A shared TLS library whose functions are probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsLibrary {
    /// OpenSSL's `libssl.so` (Python's `ssl`, curl, Debian's Node.js).
    OpenSsl,
    /// GnuTLS's `libgnutls.so` (wget, libcurl3-gnutls).
    GnuTls,
}

impl TlsLibrary {
    pub const ALL: [TlsLibrary; 2] = [TlsLibrary::OpenSsl, TlsLibrary::GnuTls];

    /// Its shared object's file name, without a version.
    pub fn soname(self) -> &'static str {
        match self {
            TlsLibrary::OpenSsl => "libssl.so",
            TlsLibrary::GnuTls => "libgnutls.so",
        }
    }

    /// The library a file name (`libssl.so.3`, `libgnutls.so.30`) is.
    pub fn of_file(base: &str) -> Option<TlsLibrary> {
        TlsLibrary::ALL.into_iter().find(|l| {
            base.strip_prefix(l.soname())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
    }
}

/// The TLS library paths of a /proc/PID/maps text (`libssl.so` and its
/// versions, `libgnutls.so.30`), once each.
pub fn tls_library_paths(maps: &str) -> Vec<(String, TlsLibrary)> {
    let mut out: Vec<(String, TlsLibrary)> = Vec::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let base = path.rsplit('/').next().unwrap_or("");
        if let Some(lib) = TlsLibrary::of_file(base)
            && path.starts_with('/')
            && !out.iter().any(|(p, _)| p == path)
        {
            out.push((path.to_string(), lib));
        }
    }
    out
}

/// Paths of the other executable files a /proc/PID/maps text maps with
/// execute permission (the executable itself, its libraries), the TLS
/// libraries excepted, once each: where a linked-in OpenSSL is looked for.
pub fn executable_paths(maps: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(perms), Some(path)) = (f.nth(1), f.nth(3)) else {
            continue;
        };
        // "(deleted)" after the path: the file is gone.
        if f.next().is_some() || !perms.contains('x') || !path.starts_with('/') {
            continue;
        }
        let base = path.rsplit('/').next().unwrap_or("");
        if TlsLibrary::of_file(base).is_some() || out.iter().any(|p| p == path) {
            continue;
        }
        out.push(path.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_libraries_are_found_in_a_maps_text() {
        let maps = "\
7f00-7f10 r--p 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f10-7f20 r-xp 00010000 08:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f20-7f30 r--p 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libcrypto.so.3
7f30-7f40 r--p 00000000 08:01 98 /opt/app/libssl-fake.so
7f40-7f50 rw-p 00000000 00:00 0 
7f50-7f60 r--p 00000000 08:01 97 /venv/lib/libssl.so.1.1 (deleted)
7f60-7f70 r-xp 00000000 08:01 96 /usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3
7f70-7f80 r-xp 00000000 08:01 95 /usr/lib/x86_64-linux-gnu/libgnutlsxx.so.30
";
        assert_eq!(
            tls_library_paths(maps),
            [
                (
                    "/usr/lib/x86_64-linux-gnu/libssl.so.3".to_string(),
                    TlsLibrary::OpenSsl
                ),
                ("/venv/lib/libssl.so.1.1".to_string(), TlsLibrary::OpenSsl),
                (
                    "/usr/lib/x86_64-linux-gnu/libgnutls.so.30.34.3".to_string(),
                    TlsLibrary::GnuTls
                ),
            ]
        );
        assert!(tls_library_paths("").is_empty());
    }

    #[test]
    fn executable_files_are_found_in_a_maps_text() {
        let maps = "\
5600-5610 r--p 00000000 08:01 11 /usr/bin/client
5610-5620 r-xp 00010000 08:01 11 /usr/bin/client
7f00-7f10 r-xp 00010000 08:01 1234 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f20-7f30 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f30-7f40 r-xp 00000000 08:01 98 /opt/app/gone.so (deleted)
7f40-7f50 r-xp 00000000 00:00 0 [vdso]
7f50-7f60 rw-p 00000000 00:00 0 
";
        assert_eq!(
            executable_paths(maps),
            ["/usr/bin/client", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
        );
    }

    #[test]
    fn start_time_skips_a_command_with_parentheses() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 1 0 123456 1000 10";
        assert_eq!(parse_start_time(stat), Some(123456));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn the_deepest_workload_cgroup_of_a_path_wins() {
        let exact = vec![
            ("/a".to_string(), "outer".to_string()),
            ("/a/b".to_string(), "inner".to_string()),
        ];
        assert_eq!(workload_by_path(&exact, "/a/b/c").as_deref(), Some("inner"));
        assert_eq!(workload_by_path(&exact, "/a/x").as_deref(), Some("outer"));
        assert_eq!(workload_by_path(&exact, "/ab"), None);
        assert_eq!(workload_by_path(&exact, "/a").as_deref(), Some("outer"));
    }
}
