//! Loading, attaching, pinning and adopting the eBPF programs.
//!
//! Pinned layout under `pin_path` (on bpffs):
//!
//! ```text
//! <pin_path>/<object-hash>/maps/<MAP>      every map (pinned by name)
//! <pin_path>/<object-hash>/links/<PROG>    cgroup links (failure_mode = "closed")
//! ```
//!
//! The hash is that of the embedded object, so an agent adopts only state
//! written by the same programs. A new agent finds `<hash>/links/*` attached to
//! the same cgroup and keeps them: enforcement never stops across a restart.
//! State of another build is replaced: the new programs are attached first,
//! then the old directory is removed (which detaches the old links), so there
//! is no moment without enforcement.
//!
//! Programs are loaded (verified) before anything is attached, one by one:
//! a program the kernel refuses is reported as a [`ProgramFailure`] with
//! the verifier's last lines, and `programs` decides whether the agent can
//! run without it. A start that fails before it is ready removes the pins it
//! made (never those of an earlier agent that still enforce).
//!
//! This module loads and attaches; it never writes map contents (`maps` does).

use std::{
    ffi::CString,
    fs, io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, VerifierLogLevel,
    programs::{
        CgroupAttachMode, Program, ProgramError, TracePoint,
        links::{FdLink, PinnedLink},
        trace_point::TracePointLink,
    },
};
use llm_egress_common::{ALL_MAPS, ALL_PROGRAMS, CONNECT_PROGRAMS, PROG_EXEC};
use tracing::{info, warn};

use crate::policy::FailureMode;

/// The kernel object built by `cargo xtask build-ebpf`, embedded by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/llm-egress.bpf.o"));

/// The embedded kernel object (empty when built without it).
pub fn object() -> &'static [u8] {
    OBJECT
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "this llm-egress binary was built without its eBPF object; build it with `cargo xtask build` (or `cargo xtask run`)"
    )]
    NoObject,
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("pin_path {0} is not on a bpf filesystem (mount one with `mount -t bpf bpf {0}`)")]
    NotBpffs(PathBuf),
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("pinning link of {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("the eBPF object has no map or program named {0}")]
    Missing(&'static str),
    #[error("program {}: {}", .0.name, .0.reason)]
    NotLoaded(ProgramFailure),
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> LoadError + 'a {
    move |source| LoadError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Stable 64-bit FNV-1a of the object: names the pin directory.
pub fn object_hash() -> u64 {
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A program the kernel refused to load (or, in debug builds, one that
/// `LLM_EGRESS_TEST_FAIL_PROGRAM` names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramFailure {
    pub name: &'static str,
    /// The error and the verifier's last lines (its error and statistics).
    pub reason: String,
}

/// The loaded object, before or after its programs are attached.
pub struct Loader {
    pub ebpf: Ebpf,
    pin_root: PathBuf,
    dir: PathBuf,
    links: Vec<Attached>,
    /// What `prepare` found: links to adopt, or the programs it loaded.
    prepared: Prepared,
    /// Detached when the agent exits, whatever `failure_mode` says.
    exec_link: Option<TracePointLink>,
    /// Until `started`: remove this build's pin directory on drop (a start
    /// that fails leaves no pins), set by `discard_unless_started`.
    discard_unless_started: bool,
}

/// The programs `prepare` made ready for `attach`.
enum Prepared {
    Nothing,
    /// A previous agent's pinned links, kept as they are.
    Adopted(Vec<Attached>, Vec<&'static str>),
    /// Programs loaded into the kernel (verified), not attached yet.
    Loaded(Vec<&'static str>),
}

enum Attached {
    Pinned(PinnedLink),
    /// Detached when dropped (failure_mode = "open").
    Owned(#[allow(dead_code, reason = "held for its Drop")] FdLink),
}

/// How `attach` went, for the log and `/readyz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachOutcome {
    /// Fresh programs attached.
    Attached,
    /// Pinned links of a previous agent kept as they were.
    Adopted,
}

/// The cgroup id (inode) of a cgroup v2 directory.
pub fn cgroup_id(path: &Path) -> Result<u64, LoadError> {
    Ok(fs::metadata(path)
        .map_err(io_err(path, "reading the attach cgroup"))?
        .ino())
}

impl Loader {
    /// Loads the object with its maps pinned under `pin_root` (adopting maps
    /// already pinned there by an agent of the same build). Mounts bpffs on
    /// /sys/fs/bpf when `pin_root` is below it and nothing is mounted there.
    pub fn open(pin_root: &Path) -> Result<Self, LoadError> {
        if OBJECT.is_empty() {
            return Err(LoadError::NoObject);
        }
        ensure_bpffs(pin_root)?;
        let dir = pin_root.join(format!("{:016x}", object_hash()));
        let existed = dir.exists();
        match Self::open_in(pin_root, &dir) {
            Ok(mut loader) => {
                // Until the agent knows more (`discard_unless_started`): a
                // directory this start made is this start's to remove.
                loader.discard_unless_started = !existed;
                Ok(loader)
            }
            Err(e) => {
                if !existed {
                    // Nothing of an earlier agent was there: leave nothing.
                    remove_pin_dir(pin_root, &dir);
                }
                Err(e)
            }
        }
    }

    fn open_in(pin_root: &Path, dir: &Path) -> Result<Self, LoadError> {
        let maps_dir = dir.join("maps");
        // Root's alone, whatever the umask (`crate::policy::ownership`).
        let mut mkdir = fs::DirBuilder::new();
        std::os::unix::fs::DirBuilderExt::mode(mkdir.recursive(true), 0o700);
        mkdir
            .create(&maps_dir)
            .map_err(io_err(&maps_dir, "creating the pin directory"))?;
        mkdir
            .create(dir.join("links"))
            .map_err(io_err(dir, "creating the pin directory"))?;
        let ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            // The error and the statistics, not the instruction trace: a
            // program the verifier gives up on after 1M instructions has a
            // trace of hundreds of MB, and aya verifies it again for every
            // tenfold larger buffer it tries (about 60 s, then a truncated
            // log). Loads that succeed ask for no log at all.
            .verifier_log_level(VerifierLogLevel::STATS)
            .load(OBJECT)?;
        for name in ALL_MAPS {
            if ebpf.map(name).is_none() {
                return Err(LoadError::Missing(name));
            }
        }
        Ok(Self {
            ebpf,
            pin_root: pin_root.to_path_buf(),
            dir: dir.to_path_buf(),
            links: Vec::new(),
            prepared: Prepared::Nothing,
            exec_link: None,
            discard_unless_started: false,
        })
    }

    /// Whether a failed start removes this build's pin directory when the
    /// loader is dropped: true when nothing enforced from it before this
    /// start (no policy was ever activated in its maps), so every pin in it
    /// is this start's. Pins of an earlier agent that still enforce are
    /// never removed.
    pub fn discard_unless_started(&mut self, discard: bool) {
        self.discard_unless_started = discard;
    }

    /// The start succeeded: pins stay from now on (a crash keeps enforcing),
    /// and the pinned state of other builds is removed (their links detach
    /// when their pins go; ours are attached by now).
    pub fn started(&mut self) {
        self.discard_unless_started = false;
        self.remove_other_builds();
    }

    /// Whether pinned links of this build exist (a previous agent's).
    pub fn has_pinned_links(&self) -> bool {
        ALL_PROGRAMS
            .iter()
            .any(|p| self.dir.join("links").join(p).exists())
    }

    /// Makes the programs `names` (`Programs::names`) ready to attach:
    /// adopts the pinned links when `adopt` is true (the caller checked they
    /// belong to this cgroup) and exactly these programs are pinned, else
    /// loads each program (the kernel verifies it) and returns those that
    /// failed. A pin of a program not in `names` (a previous agent's
    /// `programs = "all"`) means attaching afresh, which removes it. Nothing
    /// is attached yet: the caller decides whether it can run without the
    /// programs that failed. The verdict hooks come first in `names`; one
    /// that fails ends the loading.
    pub fn prepare(
        &mut self,
        failure: FailureMode,
        adopt: bool,
        names: &'static [&'static str],
    ) -> Vec<ProgramFailure> {
        #[cfg(not(debug_assertions))]
        if std::env::var_os(TEST_FAIL_PROGRAM_ENV).is_some() {
            warn!("{TEST_FAIL_PROGRAM_ENV} is set and ignored: only debug builds honour it");
        }
        let links_dir = self.dir.join("links");
        let others_pinned = ALL_PROGRAMS
            .iter()
            .any(|p| !names.contains(p) && links_dir.join(p).exists());
        if adopt && failure == FailureMode::Closed && !others_pinned {
            let mut adopted = Vec::new();
            for &name in names {
                match PinnedLink::from_pin(links_dir.join(name)) {
                    Ok(link) => adopted.push(Attached::Pinned(link)),
                    Err(e) => {
                        warn!(program = name, error = %e, "pinned link missing; attaching afresh");
                        adopted.clear();
                        break;
                    }
                }
            }
            if adopted.len() == names.len() {
                self.prepared = Prepared::Adopted(adopted, names.to_vec());
                return Vec::new();
            }
        }
        let mut loaded = Vec::new();
        let mut failed = Vec::new();
        for &name in names {
            match self.load_program(name) {
                Ok(()) => loaded.push(name),
                Err(f) => {
                    failed.push(f);
                    // The agent cannot start without a verdict hook; the
                    // others would only cost verifier time (seconds each).
                    if CONNECT_PROGRAMS.contains(&name) {
                        break;
                    }
                }
            }
        }
        self.prepared = Prepared::Loaded(loaded);
        failed
    }

    /// The programs `prepare` adopted or loaded, which `attach` attaches.
    pub fn ready_programs(&self) -> &[&'static str] {
        match &self.prepared {
            Prepared::Nothing => &[],
            Prepared::Adopted(_, names) | Prepared::Loaded(names) => names,
        }
    }

    /// Loads (verifies) one program; its failure with the verifier's reason.
    fn load_program(&mut self, name: &'static str) -> Result<(), ProgramFailure> {
        if let Some(reason) = injected_failure(name) {
            warn!(
                program = name,
                "LLM_EGRESS_TEST_FAIL_PROGRAM: treating the program as refused by the kernel (debug builds only)"
            );
            return Err(ProgramFailure { name, reason });
        }
        let Some(program) = self.ebpf.program_mut(name) else {
            return Err(ProgramFailure {
                name,
                reason: LoadError::Missing(name).to_string(),
            });
        };
        let loaded = match program {
            Program::CgroupSockAddr(p) => p.load(),
            Program::CgroupSock(p) => p.load(),
            Program::SockOps(p) => p.load(),
            Program::CgroupSkb(p) => p.load(),
            Program::TracePoint(p) => p.load(),
            other => Err(ProgramError::IOError(io::Error::other(format!(
                "unexpected program type {:?}",
                other.prog_type()
            )))),
        };
        loaded.map_err(|e| ProgramFailure {
            name,
            reason: load_failure_reason(&e),
        })
    }

    /// Attaches to `cgroup` what `prepare` made ready (or keeps the adopted
    /// links). With `FailureMode::Closed` the links are pinned; with `Open`
    /// they live as long as this agent and any pinned ones are removed.
    /// Either all of them are attached, or none (an error detaches those
    /// attached so far).
    pub fn attach(
        &mut self,
        cgroup: &Path,
        failure: FailureMode,
    ) -> Result<AttachOutcome, LoadError> {
        let names = match std::mem::replace(&mut self.prepared, Prepared::Nothing) {
            Prepared::Adopted(links, names) => {
                self.links = links;
                self.prepared = Prepared::Adopted(Vec::new(), names);
                info!(dir = %self.dir.display(), "adopted pinned programs and maps");
                return Ok(AttachOutcome::Adopted);
            }
            Prepared::Loaded(names) => names,
            Prepared::Nothing => Vec::new(),
        };
        self.prepared = Prepared::Loaded(names.clone());
        let links_dir = self.dir.join("links");
        let cgroup_file =
            fs::File::open(cgroup).map_err(io_err(cgroup, "opening the attach cgroup"))?;
        let mut fresh = Vec::new();
        for &name in &names {
            let program = self
                .ebpf
                .program_mut(name)
                .ok_or(LoadError::Missing(name))?;
            let link = attach_to_cgroup(program, &cgroup_file)
                .map_err(|source| LoadError::Program { name, source })?;
            fresh.push((name, link));
        }
        // The new links are attached; now replace whatever was pinned before
        // (a previous attach point, or pins left when switching to "open").
        for name in ALL_PROGRAMS {
            let path = links_dir.join(name);
            if path.exists() {
                fs::remove_file(&path).map_err(io_err(&path, "removing an old pinned link"))?;
            }
        }
        for (name, link) in fresh {
            match failure {
                FailureMode::Closed => {
                    let path = links_dir.join(name);
                    let pinned =
                        link.pin(&path)
                            .map_err(|source| LoadError::Pin { name, path, source })?;
                    self.links.push(Attached::Pinned(pinned));
                }
                FailureMode::Open => self.links.push(Attached::Owned(link)),
            }
        }
        info!(cgroup = %cgroup.display(), pinned = (failure == FailureMode::Closed), programs = ?names, "attached programs");
        Ok(AttachOutcome::Attached)
    }

    /// Attaches the exec tracepoint that feeds `EXECS`. Its link is never
    /// pinned: it only improves attribution, and a new agent attaches its own.
    /// Mounts tracefs on /sys/kernel/tracing when nothing is mounted there.
    pub fn attach_exec_tracking(&mut self) -> Result<(), LoadError> {
        ensure_tracefs()?;
        let name = PROG_EXEC;
        self.load_program(name).map_err(LoadError::NotLoaded)?;
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(name)
            .ok_or(LoadError::Missing(name))?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        let id = prog
            .attach("sched", "sched_process_exec")
            .map_err(|source| LoadError::Program { name, source })?;
        let link = prog
            .take_link(id)
            .map_err(|source| LoadError::Program { name, source })?;
        self.exec_link = Some(link);
        Ok(())
    }

    /// Removes pinned state of other builds under `pin_root` (their links
    /// detach when their pins go).
    fn remove_other_builds(&self) {
        let Ok(entries) = fs::read_dir(&self.pin_root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path != self.dir && path.is_dir() && is_hash_dir(&path) {
                match fs::remove_dir_all(&path) {
                    Ok(()) => info!(dir = %path.display(), "removed pinned state of another build"),
                    Err(e) => {
                        warn!(dir = %path.display(), error = %e, "could not remove pinned state of another build")
                    }
                }
            }
        }
    }

    /// Clean stop: detach the programs and remove every pin of this build.
    pub fn detach_and_unpin(mut self) -> Result<(), LoadError> {
        self.discard_unless_started = false;
        for link in self.links.drain(..) {
            if let Attached::Pinned(p) = link {
                // Dropping the returned FdLink closes the last reference.
                let _link = p.unpin().map_err(io_err(&self.dir, "unpinning a link"))?;
            }
        }
        fs::remove_dir_all(&self.dir).map_err(io_err(&self.dir, "removing the pin directory"))?;
        // The root is ours too if nothing else is left in it.
        let _ = fs::remove_dir(&self.pin_root);
        Ok(())
    }

    /// Clean stop that keeps enforcement (`on_exit = "keep"`).
    pub fn keep(mut self) {
        self.discard_unless_started = false;
        info!(dir = %self.dir.display(), "leaving programs attached and pinned");
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        if !self.discard_unless_started {
            return;
        }
        // A start that failed: detach what it attached, remove what it pinned.
        for link in self.links.drain(..) {
            if let Attached::Pinned(p) = link
                && let Err(e) = p.unpin()
            {
                warn!(dir = %self.dir.display(), error = %e, "could not unpin a link of the failed start");
            }
        }
        remove_pin_dir(&self.pin_root, &self.dir);
        info!(dir = %self.dir.display(), "the start failed: removed what it pinned");
    }
}

/// Removes a pin directory of this build, and `pin_root` if that leaves it
/// empty (other builds' directories stay).
fn remove_pin_dir(pin_root: &Path, dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(dir = %dir.display(), error = %e, "could not remove the pin directory"),
    }
    let _ = fs::remove_dir(pin_root);
}

/// Lines of the verifier's log kept in a [`ProgramFailure`]: its error and
/// the statistics after it (verification time, stack depth, processed
/// instructions).
const VERIFIER_TAIL_LINES: usize = 5;

/// The reason of a failed load: the syscall's error and the last lines of
/// the verifier's log (never the whole log, which can be thousands of
/// lines).
fn load_failure_reason(e: &ProgramError) -> String {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let tail = verifier_tail(&verifier_log.to_string());
            if tail.is_empty() {
                format!("the kernel refused it: {io_error}")
            } else {
                format!("the kernel refused it: {io_error}; verifier: {tail}")
            }
        }
        other => other.to_string(),
    }
}

/// The last lines of a verifier log: its error and statistics.
fn verifier_tail(log: &str) -> String {
    crate::kernel::verifier::last_lines(log, VERIFIER_TAIL_LINES)
}

/// The environment variable that makes a debug build treat programs as
/// refused by the kernel (comma-separated names), for the integration
/// tests of a degraded start. Release builds ignore it.
pub const TEST_FAIL_PROGRAM_ENV: &str = "LLM_EGRESS_TEST_FAIL_PROGRAM";

/// The synthetic reason when `TEST_FAIL_PROGRAM_ENV` names `program`.
#[cfg(debug_assertions)]
fn injected_failure(program: &str) -> Option<String> {
    let names = std::env::var(TEST_FAIL_PROGRAM_ENV).ok()?;
    names
        .split(',')
        .any(|n| n.trim() == program)
        .then(|| format!("synthetic failure ({TEST_FAIL_PROGRAM_ENV}, debug builds only)"))
}

#[cfg(not(debug_assertions))]
fn injected_failure(_program: &str) -> Option<String> {
    None
}

/// Attaches the loaded `program` to the cgroup with a bpf_link.
///
/// With bpf_link (kernel >= 5.7) the flags must be 0 ("Single"): cgroup
/// links always coexist with other programs, like BPF_F_ALLOW_MULTI; a
/// non-zero flag makes link_create fail.
fn attach_to_cgroup(program: &mut Program, cgroup: &fs::File) -> Result<FdLink, ProgramError> {
    let link_err =
        |e: aya::programs::links::LinkError| ProgramError::IOError(io::Error::other(e.to_string()));
    match program {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into().map_err(link_err)
        }
        Program::CgroupSock(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into().map_err(link_err)
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, CgroupAttachMode::Single)?;
            p.take_link(id)?.try_into().map_err(link_err)
        }
        Program::CgroupSkb(p) => {
            let id = p.attach(
                cgroup,
                p.expected_attach_type()
                    .unwrap_or(aya::programs::CgroupSkbAttachType::Egress),
                CgroupAttachMode::Single,
            )?;
            p.take_link(id)?.try_into().map_err(link_err)
        }
        other => Err(ProgramError::IOError(io::Error::other(format!(
            "unexpected program type {:?}",
            other.prog_type()
        )))),
    }
}

fn is_hash_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() == 16 && n.bytes().all(|b| b.is_ascii_hexdigit()))
}

const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// Mounts tracefs on /sys/kernel/tracing if it is not there (tracepoint
/// attachment reads event ids from it).
fn ensure_tracefs() -> Result<(), LoadError> {
    let path = Path::new("/sys/kernel/tracing");
    if fs_magic(path)? == TRACEFS_MAGIC || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let _lock = mount_lock()?;
    if fs_magic(path)? == TRACEFS_MAGIC {
        return Ok(());
    }
    mount(c"nodev", c"/sys/kernel/tracing", c"tracefs", path)
}

/// mount(2) of a pseudo file system with no options.
fn mount(
    source: &std::ffi::CStr,
    target: &std::ffi::CStr,
    fstype: &std::ffi::CStr,
    path: &Path,
) -> Result<(), LoadError> {
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LoadError::Io {
            path: path.to_path_buf(),
            what: "mounting",
            source: io::Error::last_os_error(),
        });
    }
    info!(fstype = ?fstype, path = %path.display(), "mounted");
    Ok(())
}

/// Serialises mounts of bpffs and tracefs by agents (or tests) starting at
/// once: a second mount would hide what was pinned on the first.
fn mount_lock() -> Result<fs::File, LoadError> {
    let lock_path = Path::new("/run/llm-egress-mount.lock");
    let lock = fs::File::create(lock_path).map_err(io_err(lock_path, "creating the mount lock"))?;
    // SAFETY: flock on a file descriptor we own; released when it is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(LoadError::Io {
            path: lock_path.to_path_buf(),
            what: "locking",
            source: io::Error::last_os_error(),
        });
    }
    Ok(lock)
}

fn fs_magic(path: &Path) -> Result<i64, LoadError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| LoadError::Io {
        path: path.to_path_buf(),
        what: "path",
        source: io::Error::other(e),
    })?;
    // SAFETY: statfs writes into the zeroed struct we pass; `c` is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(LoadError::Io {
            path: path.to_path_buf(),
            what: "statfs",
            source: io::Error::last_os_error(),
        });
    }
    Ok(st.f_type as i64)
}

fn is_bpffs(path: &Path) -> Result<bool, LoadError> {
    Ok(fs_magic(path)? == BPF_FS_MAGIC)
}

/// Makes sure `pin_root` is on bpffs, mounting /sys/fs/bpf if that is where
/// it should be and nothing is mounted there yet.
fn ensure_bpffs(pin_root: &Path) -> Result<(), LoadError> {
    let mut existing = pin_root;
    while !existing.exists() {
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    if is_bpffs(existing)? {
        return Ok(());
    }
    let sys_bpf = Path::new("/sys/fs/bpf");
    if !pin_root.starts_with(sys_bpf) {
        return Err(LoadError::NotBpffs(pin_root.to_path_buf()));
    }
    let _lock = mount_lock()?;
    if !is_bpffs(sys_bpf).unwrap_or(false) {
        fs::create_dir_all(sys_bpf).map_err(io_err(sys_bpf, "creating the bpffs mount point"))?;
        mount(c"bpf", c"/sys/fs/bpf", c"bpf", sys_bpf)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of a real log (kernel 6.18, `names_dns_ingress` over the
    /// 1M-instruction limit, log level STATS).
    const TOO_LARGE: &str = "\
BPF program is too large. Processed 1000001 insn
verification time 6896890 usec
stack depth 168+8+248+0+16+0
processed 1000001 insns (limit 1000000) max_states_per_insn 36 total_states 34350 peak_states 43840 mark_read 0

";

    /// `ALL_MAPS` is the loader's list of the maps the object must have:
    /// the list and the object stay the same set.
    #[test]
    fn the_object_declares_exactly_all_maps() {
        if OBJECT.is_empty() {
            return;
        }
        let obj = aya_obj::Object::parse(OBJECT).expect("the embedded object parses");
        let mut declared: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with('.'))
            .collect();
        declared.sort_unstable();
        let mut listed = ALL_MAPS.to_vec();
        listed.sort_unstable();
        assert_eq!(declared, listed);
    }

    #[test]
    fn the_reason_is_the_verifiers_error_and_statistics() {
        let tail = verifier_tail(TOO_LARGE);
        assert_eq!(
            tail,
            "BPF program is too large. Processed 1000001 insn | verification time 6896890 usec | \
             stack depth 168+8+248+0+16+0 | processed 1000001 insns (limit 1000000) \
             max_states_per_insn 36 total_states 34350 peak_states 43840 mark_read 0"
        );
        let long: String = (0..700).map(|i| format!("{i}: (bf) r1 = r6\n")).collect();
        let tail = verifier_tail(&format!("{long}{TOO_LARGE}"));
        assert!(
            tail.starts_with("699: (bf) r1 = r6 | BPF program is too large"),
            "{tail}"
        );
        assert_eq!(verifier_tail(""), "");
    }
}
