//! Dropping capabilities once the programs are loaded and attached.
//!
//! Loading programs, creating and pinning maps, attaching links and mounting
//! bpffs/tracefs need CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and (for mounts)
//! CAP_SYS_ADMIN. After that the agent only uses file descriptors it already
//! holds (map updates, lookups and the ring buffer need no capability on
//! kernels >= 6.5), reads /proc, cgroupfs and its policy file, and removes
//! its own pins at a clean stop (as their owner). It keeps CAP_SYS_PTRACE,
//! which reading `/proc/PID/exe` of other users' processes needs, and drops
//! everything else from the effective, permitted and inheritable sets of
//! **every thread** (capabilities are per thread on Linux): each thread is
//! signalled and drops its own set in the handler, the way libpsx does it.
//! Threads created later inherit the reduced sets.

use std::{
    io,
    sync::atomic::{AtomicI64, AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// CAP_SYS_PTRACE (linux/capability.h).
pub const CAP_SYS_PTRACE: u32 = 19;
/// CAP_KILL, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF (linux/capability.h): what
/// the plaintext attacher needs after start (run/start.rs).
pub const CAP_KILL: u32 = 5;
/// CAP_NET_ADMIN: `SOCK_DESTROY` of a connection `secrets = "block"` stops.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// The signal used to make each thread drop its own capabilities.
const DROP_SIGNAL: i32 = libc::SIGUSR2;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The sets every thread moves to (low and high 32 bits of the masks).
static TARGET_LOW: AtomicU32 = AtomicU32::new(0);
static TARGET_HIGH: AtomicU32 = AtomicU32::new(0);
/// Threads that have run the handler.
static DONE: AtomicI64 = AtomicI64::new(0);
/// Threads whose capset failed.
static FAILED: AtomicI64 = AtomicI64::new(0);

fn capset_current_thread() -> i64 {
    let (low, high) = (
        TARGET_LOW.load(Ordering::SeqCst),
        TARGET_HIGH.load(Ordering::SeqCst),
    );
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a v3 header and two data structs; a plain
    // syscall, async-signal-safe.
    unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    }
}

extern "C" fn on_signal(_: libc::c_int) {
    if capset_current_thread() != 0 {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
}

fn thread_ids() -> io::Result<Vec<i32>> {
    Ok(std::fs::read_dir("/proc/self/task")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Keeps only `keep` (capability numbers, if the process has them) in every
/// thread. Returns the capabilities kept.
pub fn drop_all_but(keep: &[u32]) -> io::Result<Vec<u32>> {
    let mut low = 0u32;
    let mut high = 0u32;
    let mut kept = Vec::new();
    let have = effective_mask(0)?;
    for &cap in keep {
        if cap < 64 && have & (1 << cap) != 0 {
            if cap < 32 {
                low |= 1 << cap
            } else {
                high |= 1 << (cap - 32)
            }
            kept.push(cap);
        }
    }
    TARGET_LOW.store(low, Ordering::SeqCst);
    TARGET_HIGH.store(high, Ordering::SeqCst);
    // SAFETY: installs a handler that only makes a syscall and touches atomics.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(DROP_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::gettid()) };
    // Other threads first (they may spawn more while we work: repeat until
    // every thread listed has dropped), this thread last.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut signalled = std::collections::HashSet::new();
    loop {
        let pending: Vec<i32> = thread_ids()?
            .into_iter()
            .filter(|t| *t != me && !signalled.contains(t))
            .collect();
        if pending.is_empty() {
            break;
        }
        let before = DONE.load(Ordering::SeqCst);
        for &tid in &pending {
            // SAFETY: tgkill to a thread of our own process.
            if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, DROP_SIGNAL) } == 0 {
                signalled.insert(tid);
            } else {
                // The thread exited meanwhile.
                signalled.insert(tid);
                DONE.fetch_add(1, Ordering::SeqCst);
            }
        }
        while DONE.load(Ordering::SeqCst) < before + pending.len() as i64 {
            if Instant::now() > deadline {
                return Err(io::Error::other(
                    "threads did not drop their capabilities within 5 s",
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    if capset_current_thread() != 0 {
        return Err(io::Error::last_os_error());
    }
    if FAILED.load(Ordering::SeqCst) > 0 {
        return Err(io::Error::other("capset failed in a thread"));
    }
    Ok(kept)
}

/// Whether this kernel lets map fds be used without capabilities (Linux
/// 6.5 moved bpf()'s capability checks into map creation and program load).
pub fn kernel_allows_unprivileged_map_fds() -> bool {
    // SAFETY: a zeroed utsname is valid; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return false;
    }
    let release: String = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    release_at_least(&release, 6, 5)
}

fn release_at_least(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

/// The effective capability mask of thread `tid` (0: the calling thread).
pub fn effective_mask(tid: i32) -> io::Result<u64> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: tid,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a v3 header and room for two data structs.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(data[0].effective) | (u64::from(data[1].effective) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_compare_by_major_and_minor() {
        assert!(release_at_least("6.18.44-fc-v595", 6, 5));
        assert!(release_at_least("6.5.0", 6, 5));
        assert!(!release_at_least("6.1.0-13-amd64", 6, 5));
        assert!(!release_at_least("5.15.0", 6, 5));
        assert!(!release_at_least("garbage", 6, 5));
    }

    #[test]
    fn every_thread_keeps_only_what_was_kept() {
        // In a forked child (one thread), with extra threads started there,
        // so the test process keeps its capabilities.
        // SAFETY: the child only spawns threads, makes syscalls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let helper = std::thread::spawn(move || {
                let _ = rx.recv();
                effective_mask(0).unwrap_or(u64::MAX)
            });
            let before = effective_mask(0).unwrap_or(0);
            let ok = drop_all_but(&[CAP_SYS_PTRACE]).is_ok();
            let _ = tx.send(());
            let other = helper.join().unwrap_or(u64::MAX);
            let mine = effective_mask(0).unwrap_or(u64::MAX);
            let expected = before & (1 << CAP_SYS_PTRACE);
            let code = if ok && mine == expected && other == expected {
                0
            } else {
                1
            };
            // SAFETY: leaving the forked child without running destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "a thread kept more than CAP_SYS_PTRACE"
        );
    }
}
