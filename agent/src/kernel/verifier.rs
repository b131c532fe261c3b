//! The verifier's cost of every program: `llm-egress verify`.
//!
//! aya loads a program with an empty log buffer first and keeps the log only
//! when the load fails, so a program that verifies leaves no statistics
//! behind. This module loads the embedded object's programs a second time,
//! outside aya, exactly as aya would (the same relocated instructions, BTF,
//! func and line info, maps created the same way, read-only data frozen),
//! with the verifier's statistics log (`BPF_LOG_STATS`), and reads from it
//! the processed instructions (what the 1,000,000-instruction complexity
//! limit counts), the states and the verification time.
//!
//! Nothing here is attached, pinned or kept: the maps and programs it
//! creates are closed when `measure` returns. It never touches the maps of
//! a running agent (its own maps are fresh and unpinned).

use std::{
    collections::HashSet,
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
    time::Instant,
};

use aya::maps::MapData;
use aya_obj::{
    EbpfSectionKind, Features, Object, ProgramSection,
    btf::{Btf, BtfFeatures},
    generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type},
    programs::CgroupSockAddrAttachType,
};
use serde::Serialize;

/// The kernel's complexity limit: instructions the verifier may process per
/// program (`BPF_COMPLEXITY_LIMIT_INSNS`, the same since 5.2).
pub const INSNS_LIMIT: u64 = 1_000_000;
/// Each program's budget: a fifth of the limit, so that a kernel whose state
/// pruning is a few times worse still loads it (issue 12, docs/kernels.md).
pub const INSNS_BUDGET: u64 = INSNS_LIMIT / 5;
/// The verification time each program must stay under, in microseconds.
pub const TIME_BUDGET_US: u64 = 1_000_000;
/// `BPF_LOG_STATS`: the statistics lines only, not the instruction trace.
const LOG_STATS: u32 = 4;
/// `BPF_LOG_LEVEL1 | BPF_LOG_LEVEL2`: every instruction the verifier walks,
/// with its state (`--trace`; level 1 alone keeps only the failing path).
const LOG_TRACE: u32 = 1 | 2;
/// Log buffer for the statistics (a failed load adds its error lines).
const LOG_BYTES: usize = 1 << 20;
/// Log buffer of a traced program (a longer log keeps its last 256 MiB).
const TRACE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("parsing the eBPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    #[error("preparing the object's BTF: {0}")]
    Btf(#[from] aya_obj::btf::BtfError),
    #[error("relocating the object against the kernel's BTF: {0}")]
    BtfRelocation(#[from] aya_obj::btf::BtfRelocationError),
    #[error("relocating the object: {0}")]
    Relocation(#[from] aya_obj::relocation::EbpfRelocationError),
    #[error("loading the object's BTF into the kernel: {0}")]
    BtfLoad(#[source] io::Error),
    #[error("creating map {name}: {source}")]
    Map {
        name: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("initialising data map {name}: {source}")]
    MapData {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// What the verifier said of one program.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ProgramStats {
    pub program: String,
    pub loaded: bool,
    /// Instructions the verifier processed (`processed N insns`).
    pub insns_processed: u64,
    pub insns_limit: u64,
    pub peak_states: u64,
    pub total_states: u64,
    pub max_states_per_insn: u64,
    /// As the kernel measured it (`verification time N usec`); the wall
    /// time of the load when the kernel does not say.
    pub verification_us: u64,
    /// The verifier's last lines when the load failed.
    pub error: Option<String>,
}

impl ProgramStats {
    /// Whether the program loaded within its budgets.
    pub fn within_budget(&self) -> bool {
        self.loaded && self.insns_processed <= INSNS_BUDGET && self.verification_us < TIME_BUDGET_US
    }
}

/// Loads every program of `object` with the verifier's statistics; sorted
/// by program name. With `trace` naming a program, that program's whole
/// verifier log (instruction by instruction, with states; its last 256 MiB
/// when longer) is written to stderr.
pub fn measure(object: &[u8], trace: Option<&str>) -> Result<Vec<ProgramStats>, VerifyError> {
    let mut obj = Object::parse(object)?;
    // The kernels this agent supports (>= 6.1) have every BTF feature aya
    // probes for; aya sanitizes nothing away on them either.
    let btf_features = BtfFeatures::new(true, true, true, true, true, true, true, true);
    let btf_fd = match obj.fixup_and_sanitize_btf(&btf_features)? {
        Some(btf) => Some(load_btf(&btf.to_bytes()).map_err(VerifyError::BtfLoad)?),
        None => None,
    };
    if obj.has_btf_relocations() {
        obj.relocate_btf(&Btf::from_sys_fs()?)?;
    }
    let mut maps = Vec::new();
    for (name, map) in &obj.maps {
        let data = MapData::create(map.clone(), name, btf_fd.as_ref().map(|f| f.as_fd())).map_err(
            |source| VerifyError::Map {
                name: name.clone(),
                source,
            },
        )?;
        init_data_map(&data, map).map_err(|source| VerifyError::MapData {
            name: name.clone(),
            source,
        })?;
        maps.push((name.clone(), data));
    }
    let text_sections: HashSet<usize> = obj.functions.keys().map(|(section, _)| *section).collect();
    let obj_maps = obj.maps.clone();
    obj.relocate_maps(
        maps.iter().filter_map(|(name, data)| {
            let map = obj_maps.get(name)?;
            Some((name.as_str(), data.fd().as_fd().as_raw_fd(), map))
        }),
        &text_sections,
    )?;
    obj.relocate_calls(&text_sections)?;
    obj.sanitize_functions(&Features::new(
        true,
        true,
        true,
        true,
        true,
        true,
        true,
        Some(btf_features),
    ));

    let mut out = Vec::new();
    for (name, program) in &obj.programs {
        let Some(function) = obj.functions.get(&program.function_key()) else {
            continue;
        };
        let Some((prog_type, attach_type)) = kind(&program.section) else {
            out.push(ProgramStats {
                program: name.clone(),
                error: Some(format!(
                    "program type {:?} is not measured",
                    program.section
                )),
                ..ProgramStats::default()
            });
            continue;
        };
        out.push(load_with_stats(
            name,
            trace == Some(name.as_str()),
            prog_type,
            attach_type,
            &program.license,
            function,
            btf_fd.as_ref(),
        ));
    }
    out.sort_by(|a, b| a.program.cmp(&b.program));
    Ok(out)
}

/// The program and expected attach types aya gives a section of this
/// object (aya's `CgroupSockAddr::load`, `CgroupSkb::load`, ...).
fn kind(section: &ProgramSection) -> Option<(bpf_prog_type, Option<bpf_attach_type>)> {
    use bpf_attach_type::*;
    Some(match section {
        ProgramSection::CgroupSockAddr { attach_type } => (
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            Some(match attach_type {
                CgroupSockAddrAttachType::Connect4 => BPF_CGROUP_INET4_CONNECT,
                CgroupSockAddrAttachType::Connect6 => BPF_CGROUP_INET6_CONNECT,
                CgroupSockAddrAttachType::UDPSendMsg4 => BPF_CGROUP_UDP4_SENDMSG,
                CgroupSockAddrAttachType::UDPSendMsg6 => BPF_CGROUP_UDP6_SENDMSG,
                _ => return None,
            }),
        ),
        ProgramSection::CgroupSkb { attach_type } => (
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB,
            attach_type.map(|a| match a {
                aya_obj::programs::CgroupSkbAttachType::Ingress => BPF_CGROUP_INET_INGRESS,
                aya_obj::programs::CgroupSkbAttachType::Egress => BPF_CGROUP_INET_EGRESS,
            }),
        ),
        ProgramSection::CgroupSock { attach_type } => (
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK,
            Some(bpf_attach_type::from(*attach_type)),
        ),
        ProgramSection::SockOps => (
            bpf_prog_type::BPF_PROG_TYPE_SOCK_OPS,
            Some(BPF_CGROUP_SOCK_OPS),
        ),
        ProgramSection::TracePoint => (bpf_prog_type::BPF_PROG_TYPE_TRACEPOINT, None),
        ProgramSection::RawTracePoint => (bpf_prog_type::BPF_PROG_TYPE_RAW_TRACEPOINT, None),
        // uprobes and kprobes (the plaintext programs) are one program type.
        ProgramSection::KProbe
        | ProgramSection::UProbe { sleepable: false }
        | ProgramSection::URetProbe { sleepable: false } => {
            (bpf_prog_type::BPF_PROG_TYPE_KPROBE, None)
        }
        _ => return None,
    })
}

fn load_with_stats(
    name: &str,
    trace: bool,
    prog_type: bpf_prog_type,
    attach_type: Option<bpf_attach_type>,
    license: &CString,
    function: &aya_obj::Function,
    btf_fd: Option<&OwnedFd>,
) -> ProgramStats {
    let mut log = vec![0u8; if trace { TRACE_BYTES } else { LOG_BYTES }];
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    // SAFETY: bpf_attr is a C union of plain integers; all zeroes is its
    // documented "unset" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the BPF_PROG_LOAD member of the zeroed union.
    let u = unsafe { &mut attr.__bindgen_anon_3 };
    u.prog_type = prog_type as u32;
    if let Some(a) = attach_type {
        u.expected_attach_type = a as u32;
    }
    u.insns = function.instructions.as_ptr() as u64;
    u.insn_cnt = function.instructions.len() as u32;
    u.license = license.as_ptr() as u64;
    for (dst, src) in u.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as _;
    }
    if let Some(fd) = btf_fd {
        u.prog_btf_fd = fd.as_raw_fd() as u32;
        if function.func_info_rec_size > 0 {
            u.func_info = func_info.as_ptr() as u64;
            u.func_info_cnt = function.func_info.len() as u32;
            u.func_info_rec_size = function.func_info_rec_size as u32;
        }
        if function.line_info_rec_size > 0 {
            u.line_info = line_info.as_ptr() as u64;
            u.line_info_cnt = function.line_info.len() as u32;
            u.line_info_rec_size = function.line_info_rec_size as u32;
        }
    }
    u.log_level = if trace {
        LOG_STATS | LOG_TRACE
    } else {
        LOG_STATS
    };
    u.log_buf = log.as_mut_ptr() as u64;
    u.log_size = log.len() as u32;
    let started = Instant::now();
    let result = sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr);
    let wall_us = started.elapsed().as_micros() as u64;
    // A log longer than the buffer keeps its tail (kernels >= 6.4), which
    // may leave a NUL where it wrapped: read up to the last byte written.
    let end = log.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    let text = String::from_utf8_lossy(&log[..end]);
    if trace {
        eprintln!("{}", text.replace('\0', "\n"));
    }
    let mut stats = parse_stats(name, &text);
    if stats.verification_us == 0 {
        stats.verification_us = wall_us;
    }
    match result {
        // The program is closed at once: only its statistics are kept.
        // SAFETY: BPF_PROG_LOAD returned a new fd that nothing else owns.
        Ok(fd) => drop(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            stats.loaded = false;
            stats.error = Some(format!("{e}: {}", last_lines(&text, 3)));
        }
    }
    stats
}

/// Reads the statistics lines of a verifier log (level `BPF_LOG_STATS`).
/// `loaded` is true unless the caller knows better.
pub fn parse_stats(program: &str, log: &str) -> ProgramStats {
    let mut s = ProgramStats {
        program: program.to_string(),
        loaded: true,
        insns_limit: INSNS_LIMIT,
        ..ProgramStats::default()
    };
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let after = |key: &str| -> Option<u64> {
            let i = words.iter().position(|w| *w == key)?;
            words.get(i + 1)?.parse().ok()
        };
        if line.starts_with("processed ") {
            s.insns_processed = after("processed").unwrap_or(0);
            s.max_states_per_insn = after("max_states_per_insn").unwrap_or(0);
            s.total_states = after("total_states").unwrap_or(0);
            s.peak_states = after("peak_states").unwrap_or(0);
            if let Some(i) = line.find("(limit ") {
                let rest = &line[i + 7..];
                if let Some(n) = rest.split(')').next().and_then(|n| n.parse().ok()) {
                    s.insns_limit = n;
                }
            }
        } else if line.starts_with("verification time ") {
            s.verification_us = after("time").unwrap_or(0);
        }
    }
    s
}

/// The last `n` non-empty lines of a verifier log, trimmed, joined with
/// " | ".
pub fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Gives a data map (.rodata, .data, .bss) its initial contents and freezes
/// read-only data, as aya does: the verifier reads frozen .rodata values as
/// constants, so an unfrozen copy would verify differently.
fn init_data_map(data: &MapData, map: &aya_obj::Map) -> io::Result<()> {
    let kind = map.section_kind();
    if !matches!(
        kind,
        EbpfSectionKind::Data | EbpfSectionKind::Rodata | EbpfSectionKind::Bss
    ) {
        return Ok(());
    }
    let fd = data.fd().as_fd().as_raw_fd();
    let mut value = map.data().to_vec();
    if !value.is_empty() {
        let key = 0u32;
        // SAFETY: zeroed union, then the BPF_MAP_*_ELEM member.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let u = unsafe { &mut attr.__bindgen_anon_2 };
        u.map_fd = fd as u32;
        u.key = &key as *const u32 as u64;
        u.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
        sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr)?;
    }
    if kind == EbpfSectionKind::Rodata {
        // SAFETY: as above, the BPF_MAP_FREEZE member.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        attr.__bindgen_anon_2.map_fd = fd as u32;
        sys_bpf(bpf_cmd::BPF_MAP_FREEZE, &mut attr)?;
    }
    Ok(())
}

fn load_btf(raw: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: zeroed union, then the BPF_BTF_LOAD member.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let u = unsafe { &mut attr.__bindgen_anon_7 };
    u.btf = raw.as_ptr() as u64;
    u.btf_size = raw.len() as u32;
    let fd = sys_bpf(bpf_cmd::BPF_BTF_LOAD, &mut attr)?;
    // SAFETY: BPF_BTF_LOAD returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<RawFd> {
    // SAFETY: `attr` is a valid bpf_attr of the size given; the pointers in
    // it point to buffers the caller keeps alive across the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as RawFd)
}

/// The table `llm-egress verify` prints.
pub fn table(stats: &[ProgramStats]) -> String {
    let mut out = format!(
        "{:<20} {:>6} {:>10} {:>7} {:>8} {:>8} {:>6} {:>10}  {}\n",
        "program", "loaded", "insns", "% limit", "peak", "total", "max/i", "verify µs", "budget"
    );
    for s in stats {
        let pct = s.insns_processed as f64 * 100.0 / s.insns_limit.max(1) as f64;
        out.push_str(&format!(
            "{:<20} {:>6} {:>10} {:>6.1}% {:>8} {:>8} {:>6} {:>10}  {}\n",
            s.program,
            if s.loaded { "yes" } else { "NO" },
            s.insns_processed,
            pct,
            s.peak_states,
            s.total_states,
            s.max_states_per_insn,
            s.verification_us,
            if s.within_budget() { "ok" } else { "OVER" },
        ));
        if let Some(e) = &s.error {
            out.push_str(&format!("    {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "func#0 @0\nverification time 10523 usec\nstack depth 120+0+0\n\
processed 1000001 insns (limit 1000000) max_states_per_insn 36 total_states 52000 peak_states 43840 mark_read 12\n";

    #[test]
    fn reads_the_statistics_lines() {
        let s = parse_stats("names_dns_ingress", LOG);
        assert_eq!(s.insns_processed, 1_000_001);
        assert_eq!(s.insns_limit, 1_000_000);
        assert_eq!(s.max_states_per_insn, 36);
        assert_eq!(s.total_states, 52_000);
        assert_eq!(s.peak_states, 43_840);
        assert_eq!(s.verification_us, 10_523);
        assert!(!s.within_budget());
    }

    #[test]
    fn budget_is_a_fifth_of_the_limit_and_a_second() {
        let mut s = parse_stats(
            "p",
            "processed 200000 insns (limit 1000000)\nverification time 999999 usec\n",
        );
        assert!(s.within_budget());
        s.insns_processed += 1;
        assert!(!s.within_budget());
        s.insns_processed = 10;
        s.verification_us = 1_000_000;
        assert!(!s.within_budget());
        s.verification_us = 10;
        s.loaded = false;
        assert!(!s.within_budget());
    }

    #[test]
    fn last_lines_skip_blank_lines() {
        assert_eq!(last_lines("a\n\nb\nc\n\n", 2), "b | c");
        assert_eq!(last_lines("", 3), "");
    }
}
