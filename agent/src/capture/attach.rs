//! Which processes get the TLS library uprobes (docs/plaintext.md): those
//! of workloads with `exact_tokens = true`, and no others.
//!
//! - At start and on every change of the workloads, the `exact_tokens`
//!   workloads' (generation, id) pairs go to `PLAINTEXT_WORKLOADS`: the exec
//!   program reports and pauses a process that execs in one of them, and
//!   [`Attacher::on_exec`] attaches it and resumes it.
//! - Every tick ([`Attacher::tick`]) the workloads' cgroups are listed:
//!   processes already running (at start, or moved in after their exec,
//!   or forked without exec) are attached then (without a pause: what they
//!   sent before is not seen); processes that ended are forgotten (their
//!   uprobes detached); the libraries each traced process maps are read
//!   again, and a TLS library mapped since is attached too.
//! - A process is attached to the TLS libraries it maps (/proc/PID/maps):
//!   OpenSSL's libssl (`SSL_write`, `SSL_read` and their `_ex` forms) and
//!   GnuTLS's libgnutls (`gnutls_record_send`, `gnutls_record_recv`, which
//!   the same programs read). One that maps none yet (paused at exec,
//!   before its loader ran) is attached to the system's libssl.so.3 found
//!   under its root (a Python process maps libssl only when it imports
//!   `ssl`, after its exec, and a uprobe attached to the file before the
//!   mapping is installed when the mapping is made), and to the system's
//!   libgnutls.so.30 if its executable names it in its dynamic string
//!   table (wget).
//! - A traced process's bit in `PLAINTEXT_TRACED` is set before its
//!   uprobes attach and cleared when it is forgotten: the socket hooks,
//!   which run for every socket call on the host, skip every other process.
//! - At most `max_processes` processes are traced, those that ended and
//!   whose uprobes are still being closed included (`crate::capture::detach`:
//!   each close takes ~100 ms); more are counted (`overflow`) and left
//!   untraced.
//! - A process is also attached, by file offset, to every other executable
//!   file it maps (its executable first) that has OpenSSL linked in:
//!   `SSL_write`, `SSL_read`, `SSL_write_ex` and `SSL_read_ex` all defined
//!   in its `.dynsym` or `.symtab` (`crate::capture::elf`; Node.js, a C
//!   client built with libssl.a). A file with only some of them is logged
//!   with their names and not attached. A file without OpenSSL is searched
//!   for Go's `crypto/tls.(*Conn).Write` and `Read` (`crate::capture::go_tls`):
//!   uprobes at their entries and at each of their returns. Each file
//!   version (device, inode, size, mtime) is searched once.
//! - A traced process that ends having mapped no TLS library, no linked-in
//!   OpenSSL or Go TLS, and sent no plaintext is counted and logged as not
//!   visible (other TLS: rustls, BoringSSL, NSS; a stripped static OpenSSL
//!   or Go binary).
//!
//! Who can change the inputs: the traced process itself can unmap, replace
//! or bypass its TLS library (its own TLS code, a static build, raw
//! syscalls), so plaintext is evidence of what a client of the probed
//! library sent, never proof that nothing else was sent. The symbol offsets come from the library file
//! the process maps, read by the agent (root).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    num::NonZeroU32,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::{
        KProbe, RawTracePoint, TracePoint, UProbe,
        kprobe::KProbeLinkId,
        raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use llm_egress_common::{
    MAP_PLAINTEXT_CFG, MAP_PLAINTEXT_STATS, MAP_PLAINTEXT_TRACED, MAP_PLAINTEXT_WORKLOADS,
    PROG_PLAINTEXT_EXEC, PROG_PLAINTEXT_GO_ENTRY, PROG_PLAINTEXT_GO_RETURN, PROG_PLAINTEXT_SOCK,
    PROG_PLAINTEXT_SSL_ENTRY, PROG_PLAINTEXT_SSL_RETURN, PROG_PLAINTEXT_TCP,
    PROG_PLAINTEXT_TCP_SEND, PlaintextConfig, call_flags, plaintext_stat, workload_key,
};
use tracing::{info, warn};

use crate::capture::elf::{FileSource, Lookup, dynamic_strings_hold, find_function_ranges, lookup};
use crate::capture::go_tls::{self, GoTls};
use crate::capture::metrics::Metrics;
use crate::capture::procs::{
    TlsLibrary, cgroup_pids, executable_paths, maps, process_root, start_time, tls_library_paths,
    workload_by_path,
};
use crate::capture::{
    detach::Detacher,
    reader::{ExecReport, ReaderStats, resume},
};

/// OpenSSL's functions probed, with the attach cookie each entry probe
/// gets.
const OPENSSL_FUNCTIONS: [(&str, u64); 4] = [
    ("SSL_write", 0),
    ("SSL_read", call_flags::READ),
    ("SSL_write_ex", call_flags::EX),
    ("SSL_read_ex", call_flags::READ | call_flags::EX),
];

/// The names of [`OPENSSL_FUNCTIONS`], as `crate::capture::elf` looks them
/// up.
const FUNCTION_NAMES: [&str; 4] = [
    OPENSSL_FUNCTIONS[0].0,
    OPENSSL_FUNCTIONS[1].0,
    OPENSSL_FUNCTIONS[2].0,
    OPENSSL_FUNCTIONS[3].0,
];

/// GnuTLS's: `gnutls_record_send(session, data, size)` and
/// `gnutls_record_recv(session, data, size)` return the bytes moved (or a
/// negative error), as `SSL_write` and `SSL_read` do: the same programs
/// serve them, the session pointer standing for the `SSL*`.
const GNUTLS_FUNCTIONS: [(&str, u64); 2] = [
    ("gnutls_record_send", 0),
    ("gnutls_record_recv", call_flags::READ),
];

/// The functions probed in a shared `lib`.
fn functions(lib: TlsLibrary) -> &'static [(&'static str, u64)] {
    match lib {
        TlsLibrary::OpenSsl => &OPENSSL_FUNCTIONS,
        TlsLibrary::GnuTls => &GNUTLS_FUNCTIONS,
    }
}

/// File versions whose search result is kept; the cache is emptied when
/// it is full.
const ELF_CACHE: usize = 1024;

/// (device, inode, size, mtime s, mtime ns) of a file.
type FileVersion = (u64, u64, u64, i64, i64);

/// The version of the file `meta` describes (device, inode, size, mtime).
fn file_version(meta: &fs::Metadata) -> FileVersion {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
    )
}

/// Keeps what was read of a file version; a full cache starts over.
fn remember<V>(cache: &mut HashMap<FileVersion, V>, key: FileVersion, value: V) {
    if cache.len() >= ELF_CACHE {
        cache.clear();
    }
    cache.insert(key, value);
}

/// Where the functions are in a file.
#[derive(Clone)]
enum Location {
    /// By name, resolved by aya (a shared libssl or libgnutls).
    Symbols(TlsLibrary),
    /// By file offset, in the order of [`OPENSSL_FUNCTIONS`] (a linked-in
    /// OpenSSL).
    Offsets(Vec<u64>),
    /// Go's `crypto/tls`: entries and returns by file offset.
    Go(GoTls),
}

/// Every uprobe of `location`: (program, function, where, attach cookie).
fn probe_points(
    location: &Location,
) -> Vec<(
    &'static str,
    &'static str,
    UProbeAttachLocation<'static>,
    u64,
)> {
    // OpenSSL's and GnuTLS's functions, an entry and a return probe each
    // (the attach locations are made anew for each program).
    let ssl_places = || -> Vec<(&'static str, u64, UProbeAttachLocation<'static>)> {
        match location {
            Location::Symbols(lib) => (functions(*lib).iter())
                .map(|&(f, cookie)| (f, cookie, UProbeAttachLocation::Symbol(f)))
                .collect(),
            Location::Offsets(offsets) => (OPENSSL_FUNCTIONS.iter().zip(offsets))
                .map(|(&(f, cookie), &off)| (f, cookie, UProbeAttachLocation::AbsoluteOffset(off)))
                .collect(),
            Location::Go(_) => Vec::new(),
        }
    };
    let mut out = Vec::new();
    for name in [PROG_PLAINTEXT_SSL_ENTRY, PROG_PLAINTEXT_SSL_RETURN] {
        for (f, cookie, at) in ssl_places() {
            out.push((name, f, at, cookie));
        }
    }
    if let Location::Go(go) = location {
        for (probes, (function, read)) in go.functions.iter().zip([
            (go_tls::FUNCTIONS[0], 0),
            (go_tls::FUNCTIONS[1], call_flags::READ),
        ]) {
            let cookie = call_flags::GO | read;
            let at = UProbeAttachLocation::AbsoluteOffset;
            out.push((PROG_PLAINTEXT_GO_ENTRY, function, at(probes.entry), cookie));
            for &r in &probes.returns {
                out.push((PROG_PLAINTEXT_GO_RETURN, function, at(r), cookie));
            }
        }
    }
    out
}

/// Where a process's root has its system libraries (Debian/Ubuntu,
/// Fedora/RHEL, Alpine/Arch): the system libssl is tried when a process
/// maps none yet, the system libgnutls when its executable needs it.
const SYSTEM_LIB_DIRS: [&str; 6] = [
    "/usr/lib/x86_64-linux-gnu",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/lib64",
    "/usr/lib",
];

/// OpenSSL's shared object as the system installs it.
const LIBSSL: &str = "libssl.so.3";
/// GnuTLS's shared object as an executable names it (`DT_NEEDED`).
const LIBGNUTLS: &str = "libgnutls.so.30";

/// The kernel functions whose first argument is the `struct sock *`, and
/// the program probing each (the kprobe fallback).
const TCP_FUNCTIONS: [(&str, &str); 2] = [
    (PROG_PLAINTEXT_TCP_SEND, "tcp_sendmsg"),
    (PROG_PLAINTEXT_TCP, "tcp_recvmsg"),
];
/// The (raw) tracepoints with the `struct sock *` (6.4+), preferred.
const SOCK_TRACEPOINTS: [&str; 2] = ["sock_send_length", "sock_recv_length"];

/// An error and its sources, one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// How the socket cookie reaches the SSL calls.
enum CookieHooks {
    None,
    Tracepoints(Vec<RawTracePointLinkId>),
    Kprobes(Vec<(&'static str, KProbeLinkId)>),
}

/// Processes traced at once by default (8 perf events each).
pub const MAX_PROCESSES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {0}: {1}")]
    Program(&'static str, String),
    #[error("map {0}: {1}")]
    Map(&'static str, String),
}

/// One traced process.
struct Traced {
    workload: String,
    /// Field 22 of /proc/PID/stat: tells a reused pid apart.
    start_time: u64,
    /// (device, inode) of each TLS library file attached.
    libs: BTreeSet<(u64, u64)>,
    links: Vec<UProbeLink>,
    /// The shared TLS libraries it mapped at some point.
    mapped: BTreeSet<TlsLibrary>,
    /// It maps an executable file with OpenSSL linked in.
    linked: bool,
}

/// The uprobe attacher. Owns the plaintext control maps; the programs stay
/// in the `Ebpf` the caller passes in.
pub struct Attacher {
    cgroup_mount: PathBuf,
    workloads_map: BpfHashMap<MapData, u64, u32>,
    cfg_map: Array<MapData, PlaintextConfig>,
    stats_map: PerCpuArray<MapData, u64>,
    /// `PLAINTEXT_TRACED`: the bits of the traced processes.
    traced_map: Array<MapData, u64>,
    cfg: PlaintextConfig,
    /// (cgroup path relative to the mount, workload name) of each
    /// `exact_tokens` workload cgroup.
    exact: Vec<(String, String)>,
    written_keys: Vec<u64>,
    traced: BTreeMap<u32, Traced>,
    /// Closes the links of processes that ended (`crate::capture::detach`).
    detacher: Detacher,
    max_processes: usize,
    cookie_hooks: CookieHooks,
    exec_link: Option<TracePointLinkId>,
    /// (device, inode, size, mtime s, mtime ns) of each executable file
    /// searched → where its linked-in OpenSSL or Go TLS is, if it has one.
    elf_cache: HashMap<FileVersion, Option<Location>>,
    /// The same, of executables exec'd → whether they need GnuTLS.
    gnutls_cache: HashMap<FileVersion, bool>,
    /// pid → workload of traced processes, for the plaintext consumer.
    pub workload_of_pid: Arc<Mutex<HashMap<u32, String>>>,
    /// pids that sent or received plaintext (the reader fills it).
    pub seen: Arc<Mutex<HashSet<u32>>>,
    reader: Arc<ReaderStats>,
    /// Tells the plaintext reader to read the ring a last time and end.
    pub reader_finish: Arc<tokio::sync::Notify>,
    kernel_seen: [u64; plaintext_stat::LEN as usize],
    reader_seen: [u64; 6],
    metrics: Metrics,
}

impl Attacher {
    /// Loads the plaintext programs (nothing is attached yet) and takes
    /// their control maps.
    pub fn load(
        ebpf: &mut Ebpf,
        cgroup_mount: &Path,
        registry: &prometheus::Registry,
        reader: Arc<ReaderStats>,
    ) -> Result<Self, AttachError> {
        for name in [PROG_PLAINTEXT_SSL_ENTRY, PROG_PLAINTEXT_SSL_RETURN] {
            let p: &mut UProbe = program(ebpf, name)?;
            p.load()
                .map_err(|e| AttachError::Program(name, chain(&e)))?;
        }
        // Go's programs read x86-64 registers: elsewhere Go stays
        // invisible, nothing else is lost.
        for name in [PROG_PLAINTEXT_GO_ENTRY, PROG_PLAINTEXT_GO_RETURN] {
            if let Ok(p) = program::<UProbe>(ebpf, name)
                && let Err(e) = p.load()
            {
                warn!(program = name, error = %chain(&e), "plaintext: Go's crypto/tls programs did not load; Go clients stay invisible");
            }
        }
        // The kprobe may be refused where the tracepoints are not (and the
        // other way round): each is tried when the cookie hooks attach.
        for (name, _) in TCP_FUNCTIONS {
            if let Ok(k) = program::<KProbe>(ebpf, name)
                && let Err(e) = k.load()
            {
                warn!(program = name, error = %chain(&e), "plaintext: the kprobe fallback did not load");
            }
        }
        let t: &mut TracePoint = program(ebpf, PROG_PLAINTEXT_EXEC)?;
        t.load()
            .map_err(|e| AttachError::Program(PROG_PLAINTEXT_EXEC, chain(&e)))?;
        let t: &mut RawTracePoint = program(ebpf, PROG_PLAINTEXT_SOCK)?;
        t.load()
            .map_err(|e| AttachError::Program(PROG_PLAINTEXT_SOCK, chain(&e)))?;
        let workloads_map = take_map(ebpf, MAP_PLAINTEXT_WORKLOADS)?;
        let cfg_map = take_map(ebpf, MAP_PLAINTEXT_CFG)?;
        let stats_map = take_map(ebpf, MAP_PLAINTEXT_STATS)?;
        let traced_map = take_map(ebpf, MAP_PLAINTEXT_TRACED)?;
        let sk_cookie_offset = match sk_cookie_offset(Path::new("/sys/kernel/btf/vmlinux")) {
            Ok(o) => o,
            Err(e) => {
                warn!(error = %e, "cannot find the socket cookie in the kernel's BTF: plaintext is delivered with cookie 0");
                0
            }
        };
        let metrics =
            Metrics::new(registry).map_err(|e| AttachError::Map("metrics", e.to_string()))?;
        let mut a = Self {
            cgroup_mount: cgroup_mount.to_path_buf(),
            workloads_map,
            cfg_map,
            stats_map,
            traced_map,
            cfg: PlaintextConfig {
                sk_cookie_offset,
                exec_enabled: 0,
            },
            exact: Vec::new(),
            written_keys: Vec::new(),
            traced: BTreeMap::new(),
            detacher: Detacher::spawn(),
            max_processes: MAX_PROCESSES,
            cookie_hooks: CookieHooks::None,
            exec_link: None,
            elf_cache: HashMap::new(),
            gnutls_cache: HashMap::new(),
            workload_of_pid: Arc::default(),
            seen: Arc::default(),
            reader,
            reader_finish: Arc::default(),
            kernel_seen: [0; plaintext_stat::LEN as usize],
            reader_seen: [0; 6],
            metrics,
        };
        a.write_cfg()?;
        Ok(a)
    }

    fn write_cfg(&mut self) -> Result<(), AttachError> {
        self.cfg_map
            .set(0, self.cfg, 0)
            .map_err(|e| AttachError::Map(MAP_PLAINTEXT_CFG, e.to_string()))
    }

    /// The workloads whose processes are traced: `exact` is (workload id
    /// of this generation, workload name, cgroup paths relative to the
    /// cgroup2 mount) of each `exact_tokens` workload. Attaches the
    /// kprobes and the exec tracepoint while there is one, detaches them
    /// and every uprobe when there is none.
    pub fn set_workloads(
        &mut self,
        ebpf: &mut Ebpf,
        generation: u64,
        exact: &[(u32, String, Vec<String>)],
    ) -> Result<(), AttachError> {
        let keys: Vec<u64> = exact
            .iter()
            .map(|(id, _, _)| workload_key(generation, *id))
            .collect();
        for k in &keys {
            self.workloads_map
                .insert(k, 1, 0)
                .map_err(|e| AttachError::Map(MAP_PLAINTEXT_WORKLOADS, e.to_string()))?;
        }
        for old in std::mem::replace(&mut self.written_keys, keys.clone()) {
            if !keys.contains(&old) {
                let _ = self.workloads_map.remove(&old);
            }
        }
        self.exact = exact
            .iter()
            .flat_map(|(_, name, paths)| paths.iter().map(move |p| (p.clone(), name.clone())))
            .collect();
        let on = !exact.is_empty();
        if on && self.exec_link.is_none() {
            let t: &mut TracePoint = program(ebpf, PROG_PLAINTEXT_EXEC)?;
            let id = t
                .attach("sched", "sched_process_exec")
                .map_err(|e| AttachError::Program(PROG_PLAINTEXT_EXEC, chain(&e)))?;
            self.exec_link = Some(id);
            self.cookie_hooks = attach_cookie_hooks(ebpf);
        } else if !on && self.exec_link.is_some() {
            if let Some(id) = self.exec_link.take() {
                let t: &mut TracePoint = program(ebpf, PROG_PLAINTEXT_EXEC)?;
                let _ = t.detach(id);
            }
            match std::mem::replace(&mut self.cookie_hooks, CookieHooks::None) {
                CookieHooks::None => {}
                CookieHooks::Tracepoints(ids) => {
                    let t: &mut RawTracePoint = program(ebpf, PROG_PLAINTEXT_SOCK)?;
                    for id in ids {
                        let _ = t.detach(id);
                    }
                }
                CookieHooks::Kprobes(ids) => detach_kprobes(ebpf, ids),
            }
            info!("plaintext: no exact_tokens workload; the exec and socket hooks are detached");
        }
        self.cfg.exec_enabled = u32::from(on);
        self.write_cfg()?;
        // Processes of workloads that no longer trace are forgotten.
        let pids: Vec<u32> = self.traced.keys().copied().collect();
        for pid in pids {
            if self.workload_of(pid).is_none() {
                self.forget(pid);
            }
        }
        Ok(())
    }

    /// At stop: no process is paused at exec any more (the exec program is
    /// detached: once that returns, none of its runs is in flight), and the
    /// reader is told to read the ring a last time and end, so that every
    /// process it already paused is reported and resumed.
    pub fn stop_pausing(&mut self, ebpf: &mut Ebpf) {
        if let Some(id) = self.exec_link.take()
            && let Ok(t) = program::<TracePoint>(ebpf, PROG_PLAINTEXT_EXEC)
        {
            let _ = t.detach(id);
        }
        self.cfg.exec_enabled = 0;
        let _ = self.write_cfg();
        self.reader_finish.notify_one();
    }

    /// Uprobe links still open: of traced processes, and of ended ones
    /// not closed yet.
    pub fn open_links(&self) -> usize {
        self.traced.values().map(|t| t.links.len()).sum::<usize>() + self.detacher.pending_links()
    }

    /// The `exact_tokens` workload of a process, by its cgroup path.
    fn workload_of(&self, pid: u32) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        workload_by_path(&self.exact, path)
    }

    /// A process the exec program reported: attach, then resume it.
    pub fn on_exec(&mut self, ebpf: &mut Ebpf, report: ExecReport) {
        if report.paused {
            self.metrics.execs.with_label_values(&["paused"]).inc();
        }
        if let Some(w) = self.workload_of(report.pid) {
            self.attach(ebpf, report.pid, w);
        }
        if report.paused {
            resume(report.pid);
        }
    }

    /// Every second: new processes of the workloads, ended ones, newly
    /// mapped libraries; the counters.
    pub fn tick(&mut self, ebpf: &mut Ebpf) {
        let mut present = BTreeSet::new();
        for (rel, workload) in self.exact.clone() {
            let dir = self.cgroup_mount.join(rel.trim_start_matches('/'));
            for pid in cgroup_pids(&dir) {
                present.insert(pid);
                if !self.traced.contains_key(&pid) {
                    self.attach(ebpf, pid, workload.clone());
                }
            }
        }
        let pids: Vec<u32> = self.traced.keys().copied().collect();
        for pid in pids {
            let alive = start_time(pid)
                .is_some_and(|t| Some(t) == self.traced.get(&pid).map(|p| p.start_time));
            if !alive || !present.contains(&pid) {
                self.forget(pid);
                continue;
            }
            self.attach_mapped(ebpf, pid);
        }
        let (mut with, mut gnutls, mut linked, mut without) = (0, 0, 0, 0);
        for t in self.traced.values() {
            if t.mapped.contains(&TlsLibrary::OpenSsl) {
                with += 1;
            } else if t.mapped.contains(&TlsLibrary::GnuTls) {
                gnutls += 1;
            } else if t.linked {
                linked += 1;
            } else {
                without += 1;
            }
        }
        self.metrics
            .processes
            .with_label_values(&["linked"])
            .set(linked);
        self.metrics
            .processes
            .with_label_values(&["libssl"])
            .set(with);
        self.metrics
            .processes
            .with_label_values(&["libgnutls"])
            .set(gnutls);
        self.metrics
            .processes
            .with_label_values(&["no_libssl"])
            .set(without);
        self.metrics
            .processes
            .with_label_values(&["detaching"])
            .set(self.detacher.pending() as i64);
        self.sync_counters();
    }

    fn sync_counters(&mut self) {
        let mut now = [0u64; plaintext_stat::LEN as usize];
        for (i, slot) in now.iter_mut().enumerate() {
            if let Ok(v) = self.stats_map.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        let d = |i: u32, seen: &[u64]| now[i as usize].saturating_sub(seen[i as usize]);
        let seen = self.kernel_seen;
        self.metrics.calls.inc_by(d(plaintext_stat::CALLS, &seen));
        self.metrics.bytes.inc_by(d(plaintext_stat::BYTES, &seen));
        self.metrics
            .no_cookie
            .inc_by(d(plaintext_stat::NO_COOKIE, &seen));
        self.metrics.links.inc_by(d(plaintext_stat::LINKED, &seen));
        for (stat, why) in [
            (plaintext_stat::LOST, "ring_full"),
            (plaintext_stat::UNREADABLE, "unreadable"),
            (plaintext_stat::NO_ENTRY, "no_entry"),
        ] {
            self.metrics
                .lost
                .with_label_values(&[why])
                .inc_by(d(stat, &seen));
        }
        self.metrics
            .execs
            .with_label_values(&["lost"])
            .inc_by(d(plaintext_stat::EXECS_LOST, &seen));
        self.kernel_seen = now;
        use std::sync::atomic::Ordering::Relaxed;
        let r = &self.reader;
        let rnow = [
            r.chunks.load(Relaxed),
            r.incomplete.load(Relaxed),
            r.dropped.load(Relaxed),
            r.malformed.load(Relaxed),
            r.execs_dropped.load(Relaxed),
            r.bytes.load(Relaxed),
        ];
        let rd = |i: usize| rnow[i].saturating_sub(self.reader_seen[i]);
        self.metrics.chunks.inc_by(rd(0));
        self.metrics
            .lost
            .with_label_values(&["incomplete"])
            .inc_by(rd(1));
        self.metrics
            .lost
            .with_label_values(&["consumer"])
            .inc_by(rd(2));
        self.metrics
            .lost
            .with_label_values(&["malformed"])
            .inc_by(rd(3));
        self.metrics
            .execs
            .with_label_values(&["lost"])
            .inc_by(rd(4));
        self.reader_seen = rnow;
    }

    /// Starts tracing `pid` for `workload`: attaches the libssl files it
    /// maps, else the system libssl under its root.
    fn attach(&mut self, ebpf: &mut Ebpf, pid: u32, workload: String) {
        let Some(start_time) = start_time(pid) else {
            return;
        };
        match self.traced.get_mut(&pid) {
            // The same process after an exec (a shell that execs the
            // client): the files attached stay attached, since a uprobe on
            // a file is installed in every mapping the new image makes of
            // it (closing them would cost ~0.8 s of closing for nothing);
            // what it maps is the new image's.
            Some(t) if t.start_time == start_time => {
                t.mapped.clear();
                t.linked = false;
                t.workload = workload.clone();
            }
            _ => {
                if let Some(old) = self.traced.remove(&pid) {
                    self.detacher.detach(old.links);
                }
                if self.traced.len() + self.detacher.pending() >= self.max_processes {
                    self.write_traced_word(pid);
                    self.metrics.attach.with_label_values(&["overflow"]).inc();
                    warn!(pid, workload = %workload, max = self.max_processes, "plaintext: too many traced processes; this one is not traced");
                    return;
                }
                // Before any uprobe: the socket hooks skip processes
                // without their bit.
                self.traced.insert(
                    pid,
                    Traced {
                        workload: workload.clone(),
                        start_time,
                        libs: BTreeSet::new(),
                        links: Vec::new(),
                        mapped: BTreeSet::new(),
                        linked: false,
                    },
                );
                self.write_traced_word(pid);
            }
        }
        if let Ok(mut g) = self.workload_of_pid.lock() {
            g.insert(pid, workload.clone());
        }
        let attached = self.attach_mapped(ebpf, pid);
        if !attached {
            // Nothing mapped yet (paused at exec, before its loader ran):
            // the system libssl, where the process would load it from
            // (Python loads it later, with `import ssl`), and the system
            // libgnutls if its executable needs it.
            let root = process_root(pid);
            let system = |name: &str| {
                SYSTEM_LIB_DIRS
                    .iter()
                    .map(|d| root.join(d.trim_start_matches('/')).join(name))
                    .find(|p| p.exists())
            };
            if let Some(lib) = system(LIBSSL) {
                self.attach_lib(ebpf, pid, &lib, &Location::Symbols(TlsLibrary::OpenSsl));
            }
            if self.needs_gnutls(pid)
                && let Some(lib) = system(LIBGNUTLS)
            {
                self.attach_lib(ebpf, pid, &lib, &Location::Symbols(TlsLibrary::GnuTls));
            }
        }
        let ok = self.traced.get(&pid).is_some_and(|t| !t.links.is_empty());
        self.metrics
            .attach
            .with_label_values(&[if ok { "attached" } else { "error" }])
            .inc();
    }

    /// Attaches every TLS library `pid` maps, and every other executable file
    /// it maps with OpenSSL linked in, that is not attached yet; whether
    /// it maps one of either.
    fn attach_mapped(&mut self, ebpf: &mut Ebpf, pid: u32) -> bool {
        let maps = maps(pid);
        let libs = tls_library_paths(&maps);
        let root = process_root(pid);
        for (lib, kind) in &libs {
            if let Some(t) = self.traced.get_mut(&pid) {
                t.mapped.insert(*kind);
            }
            self.attach_lib(
                ebpf,
                pid,
                &root.join(lib.trim_start_matches('/')),
                &Location::Symbols(*kind),
            );
        }
        let mut linked = false;
        for file in executable_paths(&maps) {
            let path = root.join(file.trim_start_matches('/'));
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            if self
                .traced
                .get(&pid)
                .is_some_and(|t| t.libs.contains(&(meta.dev(), meta.ino())))
            {
                linked = true;
                continue;
            }
            if let Some(location) = self.linked_tls(&path, &meta) {
                linked = true;
                self.attach_lib(ebpf, pid, &path, &location);
            }
        }
        if linked && let Some(t) = self.traced.get_mut(&pid) {
            t.linked = true;
        }
        !libs.is_empty() || linked
    }

    /// Where to probe `path` if it has OpenSSL linked in (the file offsets
    /// of all four functions) or Go's `crypto/tls` (its Write and Read
    /// with their returns), searched once per file version.
    fn linked_tls(&mut self, path: &Path, meta: &fs::Metadata) -> Option<Location> {
        let key = file_version(meta);
        if let Some(hit) = self.elf_cache.get(&key) {
            return hit.clone();
        }
        let started = Instant::now();
        // One read of the symbol tables for both: OpenSSL's four functions
        // and Go's two.
        let names: Vec<&str> = FUNCTION_NAMES
            .iter()
            .chain(&go_tls::FUNCTIONS)
            .copied()
            .collect();
        let found = FileSource::open(path)
            .map_err(|e| e.to_string())
            .and_then(|src| {
                let ranges = find_function_ranges(&src, &names).map_err(|e| e.to_string())?;
                Ok((src, ranges))
            });
        let ms = started.elapsed().as_secs_f64() * 1e3;
        let (result, location) = match found {
            Ok((src, ranges)) => {
                match (lookup(&FUNCTION_NAMES, &ranges[..4]), ranges[4], ranges[5]) {
                    (Lookup::All(offsets), ..) => {
                        info!(file = %path.display(), ms, "plaintext: OpenSSL linked into this file, found by symbol");
                        ("all", Some(Location::Offsets(offsets)))
                    }
                    (Lookup::Some(names), ..) => {
                        warn!(file = %path.display(), found = ?names, wanted = ?FUNCTION_NAMES, "plaintext: this file has only some of the OpenSSL functions; not attached");
                        ("some", None)
                    }
                    (Lookup::None, Some(write), Some(read)) => {
                        match go_tls::at(&src, write, read) {
                            Ok(go) => {
                                info!(file = %path.display(), ms, returns = ?go.functions.iter().map(|f| f.returns.len()).collect::<Vec<_>>(), "plaintext: Go's crypto/tls in this file, found by symbol");
                                ("go", Some(Location::Go(go)))
                            }
                            Err(e) => {
                                warn!(file = %path.display(), error = %e, "plaintext: Go's crypto/tls in this file cannot be probed");
                                ("error", None)
                            }
                        }
                    }
                    (Lookup::None, ..) => ("none", None),
                }
            }
            Err(e) => {
                info!(file = %path.display(), error = %e, "plaintext: cannot search this file for OpenSSL or Go symbols");
                ("error", None)
            }
        };
        self.metrics.linked.with_label_values(&[result]).inc();
        remember(&mut self.elf_cache, key, location.clone());
        location
    }

    /// Whether `pid`'s executable needs GnuTLS (names `libgnutls.so.30` in
    /// its dynamic string table), read once per file version.
    fn needs_gnutls(&mut self, pid: u32) -> bool {
        let exe = PathBuf::from(format!("/proc/{pid}/exe"));
        let Ok(meta) = fs::metadata(&exe) else {
            return false;
        };
        let key = file_version(&meta);
        if let Some(&hit) = self.gnutls_cache.get(&key) {
            return hit;
        }
        let needs = FileSource::open(&exe)
            .map_err(|e| e.to_string())
            .and_then(|src| dynamic_strings_hold(&src, &[LIBGNUTLS]).map_err(|e| e.to_string()))
            .is_ok_and(|held| held == [true]);
        remember(&mut self.gnutls_cache, key, needs);
        needs
    }

    /// Attaches the probes of `lib` (a path under /proc/PID/root) for
    /// `pid` at `location` (8 for OpenSSL, 4 for GnuTLS, 2 + the returns
    /// for Go), once per file.
    fn attach_lib(&mut self, ebpf: &mut Ebpf, pid: u32, lib: &Path, location: &Location) {
        let Ok(meta) = fs::metadata(lib) else {
            return;
        };
        let id = (meta.dev(), meta.ino());
        let Some(t) = self.traced.get_mut(&pid) else {
            return;
        };
        if t.libs.contains(&id) {
            return;
        }
        t.libs.insert(id);
        let Some(scope) = NonZeroU32::new(pid).map(UProbeScope::OneProcess) else {
            return;
        };
        let mut links = Vec::new();
        let mut errors = Vec::new();
        for (name, function, location, cookie) in probe_points(location) {
            let p: &mut UProbe = match program(ebpf, name) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(e.to_string());
                    continue;
                }
            };
            let point = UProbeAttachPoint {
                location,
                cookie: Some(cookie),
            };
            match p.attach(point, lib, scope).and_then(|id| p.take_link(id)) {
                Ok(link) => links.push(link),
                Err(e) => errors.push(format!("{name} {function}: {}", chain(&e))),
            }
        }
        if !errors.is_empty() {
            warn!(pid, lib = %lib.display(), errors = ?errors, "plaintext: some uprobes could not be attached");
        }
        info!(pid, workload = %t.workload, lib = %lib.display(), probes = links.len(), "plaintext: uprobes attached");
        t.links.extend(links);
    }

    /// Writes the `PLAINTEXT_TRACED` word that holds `pid`'s bit (the
    /// agent is its only writer).
    fn write_traced_word(&mut self, pid: u32) {
        let (index, word) = traced_word(&self.traced, pid);
        if let Err(e) = self.traced_map.set(index, word, 0) {
            warn!(pid, error = %e, "plaintext: cannot mark the process as traced: its plaintext has no socket cookie");
        }
    }

    /// Stops tracing `pid` (its uprobes are detached when the links drop).
    fn forget(&mut self, pid: u32) {
        let Some(t) = self.traced.remove(&pid) else {
            return;
        };
        self.write_traced_word(pid);
        self.detacher.detach(t.links);
        let seen = self
            .seen
            .lock()
            .map(|mut s| s.remove(&pid))
            .unwrap_or(false);
        if t.mapped.is_empty() && !t.linked && !seen {
            self.metrics
                .invisible
                .with_label_values(&[&t.workload])
                .inc();
            info!(pid, workload = %t.workload, "plaintext: the process ended without a shared libssl or libgnutls, a linked-in OpenSSL or Go crypto/tls found by symbol, or plaintext: its TLS (if any) was not visible (rustls, BoringSSL, NSS, a stripped static OpenSSL or Go binary)");
        }
        if let Ok(mut g) = self.workload_of_pid.lock() {
            g.remove(&pid);
        }
    }
}

/// The index of the `PLAINTEXT_TRACED` word that holds `pid`'s bit, and
/// its value: the bits of the `traced` pids in it.
fn traced_word<V>(traced: &BTreeMap<u32, V>, pid: u32) -> (u32, u64) {
    let first = pid / 64 * 64;
    let word = traced
        .range(first..first.saturating_add(64))
        .fold(0u64, |w, (p, _)| w | 1 << (p - first));
    (pid / 64, word)
}

/// Detaches the kprobe fallback's links, each from its program.
fn detach_kprobes(ebpf: &mut Ebpf, ids: Vec<(&'static str, KProbeLinkId)>) {
    for (name, id) in ids {
        if let Ok(k) = program::<KProbe>(ebpf, name) {
            let _ = k.detach(id);
        }
    }
}

/// The socket tracepoints, else the kprobes; None (cookies stay 0) when
/// neither attaches.
fn attach_cookie_hooks(ebpf: &mut Ebpf) -> CookieHooks {
    let mut errors = Vec::new();
    if let Ok(t) = program::<RawTracePoint>(ebpf, PROG_PLAINTEXT_SOCK) {
        let mut ids = Vec::new();
        for tp in SOCK_TRACEPOINTS {
            match t.attach(tp) {
                Ok(id) => ids.push(id),
                Err(e) => errors.push(format!("sock/{tp}: {}", chain(&e))),
            }
        }
        if ids.len() == SOCK_TRACEPOINTS.len() {
            info!(
                "plaintext: socket cookies from the sock_send_length/sock_recv_length tracepoints"
            );
            return CookieHooks::Tracepoints(ids);
        }
        for id in ids {
            let _ = t.detach(id);
        }
    }
    let mut ids = Vec::new();
    for (name, f) in TCP_FUNCTIONS {
        match program::<KProbe>(ebpf, name).map(|k| k.attach(f, 0)) {
            Ok(Ok(id)) => ids.push((name, id)),
            Ok(Err(e)) => errors.push(format!("kprobe {f}: {}", chain(&e))),
            Err(e) => errors.push(format!("kprobe {f}: {e}")),
        }
    }
    if ids.len() == TCP_FUNCTIONS.len() {
        info!("plaintext: socket cookies from kprobes on tcp_sendmsg/tcp_recvmsg");
        return CookieHooks::Kprobes(ids);
    }
    detach_kprobes(ebpf, ids);
    warn!(errors = ?errors, "plaintext: neither the sock tracepoints nor the tcp kprobes attach: plaintext is delivered with socket cookie 0");
    CookieHooks::None
}

/// Takes map `name` out of `ebpf` as a `T`.
fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, AttachError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.take_map(name)
        .ok_or_else(|| AttachError::Map(name, "missing".into()))?
        .try_into()
        .map_err(|e: aya::maps::MapError| AttachError::Map(name, e.to_string()))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AttachError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| AttachError::Program(name, "missing from the object".into()))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| AttachError::Program(name, e.to_string()))
}

/// Offset of `skc_cookie` in `struct sock` (through `__sk_common`), from the
/// kernel's BTF at `path`.
pub fn sk_cookie_offset(path: &Path) -> Result<u32, String> {
    let raw = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let btf = crate::capture::btf::Btf::parse(&raw)?;
    let common = btf
        .member_offset("sock", "__sk_common")
        .ok_or("struct sock has no __sk_common")?;
    let cookie = btf
        .member_offset("sock_common", "skc_cookie")
        .ok_or("struct sock_common has no skc_cookie")?;
    Ok(common + cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel with BTF (this machine's), the cookie is found, inside
    /// `struct sock`'s first 256 bytes (it is in `sock_common`).
    #[test]
    fn the_socket_cookie_offset_comes_from_the_kernels_btf() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            return;
        }
        let off = sk_cookie_offset(path).expect("offset");
        assert!(off > 0 && off < 256 && off.is_multiple_of(8), "{off}");
    }

    /// A word holds the bits of the traced pids of its 64, and no others.
    #[test]
    fn a_traced_word_holds_the_bits_of_its_traced_pids() {
        let traced: BTreeMap<u32, ()> = [63, 64, 65, 127, 128, 4_194_303]
            .into_iter()
            .map(|p| (p, ()))
            .collect();
        assert_eq!(traced_word(&traced, 0), (0, 1 << 63));
        assert_eq!(traced_word(&traced, 100), (1, 1 | 2 | 1 << 63));
        assert_eq!(traced_word(&traced, 128), (2, 1));
        assert_eq!(traced_word(&traced, 4_194_303), (65_535, 1 << 63));
        // A forgotten pid's word no longer has its bit.
        assert_eq!(traced_word(&BTreeMap::<u32, ()>::new(), 64), (1, 0));
    }
}
