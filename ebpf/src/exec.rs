//! Tracepoint sched/sched_process_exec: remembers what each process under
//! the attach cgroup executed, so that a connection of a process that exits
//! at once (a denied `curl`) is still attributed to its executable.
//!
//! Format (/sys/kernel/tracing/events/sched/sched_process_exec/format):
//! offset 8: `__data_loc char[] filename` (low 16 bits: offset of the string
//! from the start of the record, high 16 bits: its length); 12: pid; 16:
//! old_pid. `filename` is the path given to execve, as the caller wrote it.
//! Errors only lose attribution, never a verdict: the program always
//! returns 0.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        generated::bpf_get_current_ancestor_cgroup_id,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use llm_egress_common::MAX_CGROUP_DEPTH;

use crate::maps::{ACTIVE, EXEC_SCRATCH, EXECS};

const FILENAME_LOC_OFFSET: usize = 8;

#[tracepoint]
pub fn attribute_exec(ctx: TracePointContext) -> u32 {
    let _ = try_attribute_exec(&ctx);
    0
}

fn try_attribute_exec(ctx: &TracePointContext) -> Result<(), i64> {
    let target = ACTIVE.get(0).ok_or(1)?.attach_cgroup_id;
    if target == 0 || !under(target) {
        return Ok(());
    }
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

/// Whether the current task is in `target` or below it.
#[inline(always)]
fn under(target: u64) -> bool {
    let mut level: u32 = 0;
    while level <= MAX_CGROUP_DEPTH {
        // SAFETY: helper call without pointer arguments.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) };
        if id == 0 {
            return false;
        }
        if id == target {
            return true;
        }
        level += 1;
    }
    false
}
