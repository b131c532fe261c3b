//! Who made a connection: process details from /proc and the cgroup path
//! from the cgroup id.
//!
//! The kernel event already carries pid, tgid, uid, gid, comm and cgroup id;
//! this module adds the executable path and the cgroup's path. A process may
//! exit before its event is read: its exe is then reported empty and the miss
//! is counted, never guessed.

use std::{
    collections::BTreeMap,
    fs,
    sync::{Arc, RwLock},
};

/// cgroup id → path relative to the cgroup2 mount, refreshed by every scan.
#[derive(Clone, Default)]
pub struct CgroupPaths(Arc<RwLock<BTreeMap<u64, String>>>);

impl CgroupPaths {
    pub fn replace(&self, paths: BTreeMap<u64, String>) {
        if let Ok(mut g) = self.0.write() {
            *g = paths;
        }
    }

    /// The path of `id`; for a cgroup not scanned (outside the attach cgroup,
    /// or created and removed between scans), the path /proc shows for the
    /// process if it still lives in that cgroup.
    pub fn path_of(&self, id: u64, tgid: u32) -> Option<String> {
        if let Some(p) = self.0.read().ok().and_then(|g| g.get(&id).cloned()) {
            return Some(p);
        }
        let text = fs::read_to_string(format!("/proc/{tgid}/cgroup")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
    }
}

/// The executable of a live process, or None when it has exited.
pub fn exe_of(tgid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{tgid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// `exe_of` with a short memory: a burst of events from one process reads
/// /proc once. Entries live `EXE_CACHE_TTL` (shorter than any realistic pid
/// reuse) and the cache is bounded.
#[derive(Default)]
pub struct ExeCache {
    entries: std::collections::HashMap<u32, (Option<String>, std::time::Instant)>,
}

const EXE_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(1);
const EXE_CACHE_MAX: usize = 4096;

impl ExeCache {
    pub fn get(&mut self, tgid: u32) -> Option<String> {
        let now = std::time::Instant::now();
        if let Some((exe, at)) = self.entries.get(&tgid)
            && now.duration_since(*at) < EXE_CACHE_TTL
            && exe.is_some()
        {
            return exe.clone();
        }
        if self.entries.len() >= EXE_CACHE_MAX {
            self.entries
                .retain(|_, (_, at)| now.duration_since(*at) < EXE_CACHE_TTL);
            if self.entries.len() >= EXE_CACHE_MAX {
                self.entries.clear();
            }
        }
        let exe = exe_of(tgid);
        self.entries.insert(tgid, (exe.clone(), now));
        exe
    }
}

/// `comm` bytes up to the first NUL.
pub fn comm_str(comm: &[u8; 16]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_stops_at_nul() {
        let mut c = [0u8; 16];
        c[..5].copy_from_slice(b"curl\0");
        assert_eq!(comm_str(&c), "curl");
        assert_eq!(comm_str(&[b'a'; 16]), "a".repeat(16));
    }

    #[test]
    fn own_process_is_found_and_a_dead_one_is_not() {
        assert!(exe_of(std::process::id()).is_some());
        assert_eq!(exe_of(u32::MAX), None);
    }
}
