//! Looking at BPF state from the outside: bpffs, pinned objects, and the
//! programs attached to a cgroup. Raw bpf(2) calls, so the harness does not
//! depend on aya (and cannot share the agent's bugs).

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
};

use crate::cgroup::mounts_of_type;

/// Where bpffs is expected.
pub const BPFFS: &str = "/sys/fs/bpf";

// enum bpf_cmd
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

// enum bpf_attach_type: the cgroup_sock_addr hooks the agent uses.
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;
/// cgroup/sock_create: the socket-kind verdict (raw and ping sockets).
pub const BPF_CGROUP_INET_SOCK_CREATE: u32 = 2;
/// The hooks of the connect-time verdict: the four sock_addr hooks and
/// sock_create (in both program sets).
pub const SOCK_ADDR_HOOKS: [(u32, &str); 5] = [
    (BPF_CGROUP_INET4_CONNECT, "connect4"),
    (BPF_CGROUP_INET6_CONNECT, "connect6"),
    (BPF_CGROUP_UDP4_SENDMSG, "sendmsg4"),
    (BPF_CGROUP_UDP6_SENDMSG, "sendmsg6"),
    (BPF_CGROUP_INET_SOCK_CREATE, "sock_create"),
];
/// The other hooks of `programs = "all"`: DNS learning / records
/// (cgroup_skb ingress), SNI / records / bandwidth (egress), accounting
/// (sock_ops).
pub const OTHER_HOOKS: [(u32, &str); 3] = [(0, "skb_ingress"), (1, "skb_egress"), (3, "sock_ops")];

/// cgroup/sock_release: not one of the agent's hooks; benches attach a
/// no-op program there ([`attach_noop`]) to measure what entering it costs.
pub const BPF_CGROUP_INET_SOCK_RELEASE: u32 = 34;
/// enum bpf_prog_type: cgroup/sock_create and cgroup/sock_release programs.
pub const BPF_PROG_TYPE_CGROUP_SOCK: u32 = 9;

const BPF_F_QUERY_EFFECTIVE: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

/// Mounts bpffs at /sys/fs/bpf unless something of type `bpf` is mounted
/// there already. Serialised within the test process, and with agents and
/// other test processes through the agent's mount lock file.
pub fn ensure_bpffs() {
    static LOCK: Mutex<()> = Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let lock_file = std::fs::File::create("/run/llm-egress-mount.lock")
        .unwrap_or_else(|e| panic!("cannot create /run/llm-egress-mount.lock: {e}"));
    // SAFETY: flock on a file we own; released when `lock_file` is closed.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock_file), libc::LOCK_EX) };
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| {
            mounts_of_type(&info, "bpf")
                .iter()
                .any(|m| m == Path::new(BPFFS))
        })
        .unwrap_or(false);
    if mounted {
        return;
    }
    let _ = std::fs::create_dir_all(BPFFS);
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
    assert!(
        out.status.success(),
        "`mount -t bpf bpf {BPFFS}` failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a #[repr(C)] prefix of union bpf_attr for `cmd`,
    // zero-initialised by the caller except for the fields it set; the size
    // passed is its exact size, which the kernel zero-extends.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned_fd(rc: libc::c_long) -> OwnedFd {
    // SAFETY: rc is a new file descriptor returned by bpf(2), owned by no one else.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes())
        .unwrap_or_else(|_| panic!("path {} contains a NUL byte", path.display()))
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// What kind of BPF object a pin is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjKind {
    Map,
    Prog,
    Link,
    Unknown,
}

/// A pinned object found below a pin directory.
#[derive(Clone, Debug)]
pub struct Pinned {
    pub path: PathBuf,
    pub kind: ObjKind,
}

/// The kind of the BPF object behind `fd`, from /proc/self/fdinfo.
fn fd_kind(fd: &OwnedFd) -> ObjKind {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .unwrap_or_default();
    let has = |key: &str| info.lines().any(|l| l.starts_with(key));
    if has("link_type:") {
        ObjKind::Link
    } else if has("map_type:") {
        ObjKind::Map
    } else if has("prog_type:") {
        ObjKind::Prog
    } else {
        ObjKind::Unknown
    }
}

/// Opens the pinned object at `path` (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = c_path(path);
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_GET, &mut attr).map(owned_fd)
}

/// The pinned map `name` of the agent whose pin path is `pin_path` (in its
/// build's `<hash>/maps/`).
pub fn pinned_map_path(pin_path: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(pin_path).ok()?.flatten().find_map(|e| {
        let p = e.path().join("maps").join(name);
        p.exists().then_some(p)
    })
}

/// `bpftool -j ARGS` as JSON; None when bpftool fails.
fn bpftool(args: &[&str]) -> Option<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Entries of the pinned map at `path` (`bpftool map dump`, per-CPU values
/// listed per key); None when bpftool fails.
pub fn pinned_map_dump(path: &Path) -> Option<Vec<serde_json::Value>> {
    bpftool(&["map", "dump", "pinned", path.to_str()?])?
        .as_array()
        .cloned()
}

/// Entries of the map `name` (as the kernel keeps it: at most 15
/// characters) used by the programs attached to `cgroup` (directly), found
/// through bpftool: maps that are not pinned, such as the scratch maps.
/// None when no attached program uses such a map.
pub fn attached_map_entries(cgroup: &Path, name: &str) -> Option<usize> {
    let progs = bpftool(&["cgroup", "show", cgroup.to_str()?])?;
    for prog in progs.as_array()? {
        let id = prog["id"].as_u64()?.to_string();
        let info = bpftool(&["prog", "show", "id", &id])?;
        for map_id in info["map_ids"].as_array().into_iter().flatten() {
            let map_id = map_id.as_u64()?.to_string();
            let map = bpftool(&["map", "show", "id", &map_id])?;
            if map["name"] == name {
                return bpftool(&["map", "dump", "id", &map_id])?
                    .as_array()
                    .map(|e| e.len());
            }
        }
    }
    None
}

/// Every pinned object below `dir` (recursively), with its kind; empty when
/// `dir` does not exist.
pub fn pinned_objects(dir: &Path) -> Vec<Pinned> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(pinned_objects(&path));
            continue;
        }
        let kind = obj_get(&path)
            .map(|fd| fd_kind(&fd))
            .unwrap_or(ObjKind::Unknown);
        out.push(Pinned { path, kind });
    }
    out
}

/// `(hook, name, verified instructions)` of every program attached directly
/// to `cgroup` at one of the agent's hooks (hook names of [`SOCK_ADDR_HOOKS`]
/// and [`OTHER_HOOKS`]; the kernel keeps 15 characters of a program's
/// name), as the kernel reports them
/// (`bpf_prog_info.verified_insns`, Linux >= 5.16): the verifier's cost of
/// the programs the agent really loaded.
pub fn attached_program_costs(cgroup: &Path) -> Vec<(&'static str, String, u32)> {
    let dir = File::open(cgroup).unwrap_or_else(|e| panic!("opening {}: {e}", cgroup.display()));
    let mut out = Vec::new();
    for (attach_type, hook) in SOCK_ADDR_HOOKS.iter().chain(OTHER_HOOKS.iter()) {
        let mut ids = [0u32; 16];
        let mut attr = QueryAttr {
            target_fd: dir.as_raw_fd() as u32,
            attach_type: *attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            ..Default::default()
        };
        sys_bpf(BPF_PROG_QUERY, &mut attr)
            .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {hook} on {}: {e}", cgroup.display()));
        for id in &ids[..attr.prog_cnt as usize] {
            let mut by_id = ProgIdAttr {
                id: *id,
                ..Default::default()
            };
            let fd = owned_fd(
                sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id)
                    .unwrap_or_else(|e| panic!("BPF_PROG_GET_FD_BY_ID {id}: {e}")),
            );
            // struct bpf_prog_info up to attach_btf_id (228 bytes): name at
            // 64 (16 bytes), verified_insns at 216.
            let info: [u8; 232] = obj_info(&fd)
                .unwrap_or_else(|e| panic!("BPF_OBJ_GET_INFO_BY_FD of program {id}: {e}"));
            let name: String = info[64..80]
                .iter()
                .take_while(|b| **b != 0)
                .map(|b| *b as char)
                .collect();
            let verified = u32::from_ne_bytes([info[216], info[217], info[218], info[219]]);
            out.push((*hook, name, verified));
        }
    }
    out
}

/// How many programs are attached to the cgroup directory `cgroup` for
/// `attach_type`: directly (`effective == false`) or in effect there,
/// inherited from ancestors included (`effective == true`).
pub fn cgroup_prog_count(cgroup: &Path, attach_type: u32, effective: bool) -> std::io::Result<u32> {
    let dir = File::open(cgroup)?;
    let mut attr = QueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type,
        query_flags: if effective { BPF_F_QUERY_EFFECTIVE } else { 0 },
        ..Default::default()
    };
    // prog_cnt == 0 and prog_ids == NULL: the kernel only reports the count.
    sys_bpf(BPF_PROG_QUERY, &mut attr)?;
    Ok(attr.prog_cnt)
}

/// `(hook name, count)` for each of the verdict hooks of `cgroup`
/// ([`SOCK_ADDR_HOOKS`]).
pub fn sock_addr_prog_counts(cgroup: &Path, effective: bool) -> Vec<(&'static str, u32)> {
    hook_prog_counts(cgroup, &SOCK_ADDR_HOOKS, effective)
}

/// `(hook name, count)` for each of `hooks` of `cgroup`.
pub fn hook_prog_counts(
    cgroup: &Path,
    hooks: &[(u32, &'static str)],
    effective: bool,
) -> Vec<(&'static str, u32)> {
    hooks
        .iter()
        .map(|(t, name)| {
            let n = cgroup_prog_count(cgroup, *t, effective)
                .unwrap_or_else(|e| panic!("BPF_PROG_QUERY {name} on {}: {e}", cgroup.display()));
            (*name, n)
        })
        .collect()
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
}

/// Every BPF link on the host: an fd of it and the first 32 bytes of its
/// `struct bpf_link_info` (type at 0, program id at 8; for a cgroup link
/// (type 3) the cgroup id at 16 and the attach type at 24).
fn links() -> std::io::Result<Vec<(OwnedFd, [u8; 32])>> {
    let mut out = Vec::new();
    let mut next = ProgIdAttr::default();
    while sys_bpf(BPF_LINK_GET_NEXT_ID, &mut next).is_ok() {
        next.id = next.next_id;
        let mut by_id = ProgIdAttr {
            id: next.id,
            ..Default::default()
        };
        // Gone meanwhile: not ours to care about.
        let Ok(rc) = sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut by_id) else {
            continue;
        };
        let link = owned_fd(rc);
        let info = obj_info(&link)?;
        out.push((link, info));
    }
    Ok(out)
}

/// The first `N` bytes of the `bpf_*_info` of the object `fd` refers to.
fn obj_info<const N: usize>(fd: &OwnedFd) -> std::io::Result<[u8; N]> {
    let mut info = [0u8; N];
    let mut get = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: N as u32,
        info: info.as_mut_ptr() as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut get)?;
    Ok(info)
}

fn word_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The name of program `id` as the kernel keeps it (15 characters).
fn prog_name(id: u32) -> std::io::Result<String> {
    let mut by_id = ProgIdAttr {
        id,
        ..Default::default()
    };
    let fd = owned_fd(sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id)?);
    // struct bpf_prog_info: name at 64 (16 bytes).
    let info: [u8; 80] = obj_info(&fd)?;
    Ok(info[64..80]
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect())
}

/// How many links on the host (any kind: tracepoint, raw tracepoint,
/// kprobe, cgroup) run a program whose kernel name starts with `prefix`:
/// for benches that must know whether an agent's host-wide hooks are on.
pub fn links_of_programs(prefix: &str) -> std::io::Result<usize> {
    let mut n = 0;
    for (_, info) in links()? {
        if prog_name(word_at(&info, 8)).is_ok_and(|name| name.starts_with(prefix)) {
            n += 1;
        }
    }
    Ok(n)
}

/// Detaches every link attached directly to `cgroup` at `attach_type`
/// (the agent attaches with links): for bench experiments that measure a
/// program set without one of its hooks. How many were detached.
pub fn detach_links(cgroup: &Path, attach_type: u32) -> std::io::Result<usize> {
    use std::os::unix::fs::MetadataExt;
    // A cgroup2 directory's inode number is its cgroup id.
    let cgroup_id = std::fs::metadata(cgroup)?.ino();
    let mut detached = 0;
    for (link, info) in links()? {
        let id = u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes"));
        if word_at(&info, 0) == BPF_LINK_TYPE_CGROUP
            && id == cgroup_id
            && word_at(&info, 24) == attach_type
        {
            let mut detach = [link.as_raw_fd() as u32, 0];
            sys_bpf(BPF_LINK_DETACH, &mut detach)?;
            detached += 1;
        }
    }
    Ok(detached)
}

/// A program that returns 1 at once, attached to a cgroup hook (beside
/// whatever else is attached there) until dropped: the kernel's cost of
/// entering that hook, for bench experiments.
pub struct NoopAttachment {
    cgroup: File,
    prog: OwnedFd,
    attach_type: u32,
}

/// Loads a no-op program of `prog_type` for `attach_type` and attaches it
/// to `cgroup` (BPF_F_ALLOW_MULTI).
pub fn attach_noop(
    cgroup: &Path,
    prog_type: u32,
    attach_type: u32,
) -> std::io::Result<NoopAttachment> {
    // r0 = 1; exit.
    let insns: [u64; 2] = [0xb7 | 1 << 32, 0x95];
    let license = c"GPL";
    let mut name = [0u8; 16];
    name[..4].copy_from_slice(b"noop");
    let mut load = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        expected_attach_type: attach_type,
        ..Default::default()
    };
    let prog = owned_fd(sys_bpf(BPF_PROG_LOAD, &mut load)?);
    let cgroup = File::open(cgroup)?;
    let mut attach = AttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
    };
    sys_bpf(BPF_PROG_ATTACH, &mut attach)?;
    Ok(NoopAttachment {
        cgroup,
        prog,
        attach_type,
    })
}

impl Drop for NoopAttachment {
    fn drop(&mut self) {
        let mut detach = AttachAttr {
            target_fd: self.cgroup.as_raw_fd() as u32,
            attach_bpf_fd: self.prog.as_raw_fd() as u32,
            attach_type: self.attach_type,
            attach_flags: 0,
        };
        let _ = sys_bpf(BPF_PROG_DETACH, &mut detach);
    }
}

/// Creates a small array map and pins it at `path` (for harness self-tests);
/// the fd is closed on return, the pin keeps the map.
pub fn pin_test_map(path: &Path) -> std::io::Result<()> {
    let mut create = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 8,
        max_entries: 1,
        map_flags: 0,
    };
    let fd = owned_fd(sys_bpf(BPF_MAP_CREATE, &mut create)?);
    let c = c_path(path);
    let mut pin = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    sys_bpf(BPF_OBJ_PIN, &mut pin)?;
    Ok(())
}
