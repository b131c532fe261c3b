//! Tracepoint sched/sched_process_exec: remembers what each process
//! executed, so that a connection of a process that exits at once (a denied
//! `curl`) is still attributed to its executable.
//!
//! Every exec on the host is recorded, not only those under the attach
//! cgroup: a process may exec first and be moved into its cgroup afterwards
//! (cgexec-style launchers), and `EXECS` is an LRU map, so the cost is one
//! bounded string copy per exec and a fixed amount of memory.
//!
//! Format (/sys/kernel/tracing/events/sched/sched_process_exec/format):
//! offset 8: `__data_loc char[] filename` (low 16 bits: offset of the string
//! from the start of the record, high 16 bits: its length); 12: pid; 16:
//! old_pid. `filename` is the path given to execve, as the caller wrote it.
//! Errors only lose attribution, never a verdict: the program always
//! returns 0.

use crate::maps::{EXEC_SCRATCH, EXECS};
use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::tracepoint,
    programs::TracePointContext,
};

const FILENAME_LOC_OFFSET: usize = 8;

#[tracepoint]
pub fn attribute_exec(ctx: TracePointContext) -> u32 {
    let _ = try_attribute_exec(&ctx);
    0
}

fn try_attribute_exec(ctx: &TracePointContext) -> Result<(), i64> {
    // SAFETY: the record starts with the fixed fields listed above.
    let loc: u32 = unsafe { ctx.read_at(FILENAME_LOC_OFFSET) }.map_err(i64::from)?;
    let offset = (loc & 0xffff) as usize;
    let info = EXEC_SCRATCH.get_ptr_mut(0).ok_or(2)?;
    // SAFETY: per-CPU scratch of this CPU; the source is read with the
    // probe-read helper, which faults safely.
    unsafe {
        (*info).exec_time_ns = bpf_ktime_get_ns();
        let src = (ctx.as_ptr() as *const u8).add(offset);
        let read = bpf_probe_read_kernel_str_bytes(src, &mut (*info).path).map_err(i64::from)?;
        (*info).len = read.len() as u32 + 1;
        let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        EXECS.insert(&tgid, &*info, 0).map_err(i64::from)?;
    }
    Ok(())
}
