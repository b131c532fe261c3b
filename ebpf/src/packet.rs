//! Header reads of the two cgroup_skb programs, which run on every packet
//! of the workloads' sockets: straight from the packet's linear data when
//! it holds the bytes (no helper call), else through `bpf_skb_load_bytes`
//! (headers in paged data). Offsets are from the IP header, as for
//! `bpf_skb_load_bytes` in these programs.

use aya_ebpf::programs::SkBuffContext;

/// Offsets past this are read with the helper (IP + TCP headers are at most
/// 120 bytes); the bound also tells the verifier the offset's range.
const DIRECT_MAX_OFF: usize = 255;

/// `size_of::<T>()` bytes at `off`, as a `T` (byte arrays and integers in
/// network order); None past the end of the packet.
#[inline(always)]
pub fn read<T: Copy>(ctx: &SkBuffContext, off: usize) -> Option<T> {
    // SAFETY: reading the context's packet pointers.
    let (data, end) = unsafe {
        (
            (*ctx.skb.skb).data as usize,
            (*ctx.skb.skb).data_end as usize,
        )
    };
    // Strictly below `end`: the verifier learns no range from `end > p`
    // when p has no constant offset, the form LLVM gives `p + 1 <= end`;
    // a read ending at the packet's last byte takes the helper.
    if off <= DIRECT_MAX_OFF && data + off + core::mem::size_of::<T>() < end {
        // SAFETY: [data + off, data + off + size) lies in the linear packet
        // data, checked against data_end just above.
        return Some(unsafe { ((data + off) as *const T).read_unaligned() });
    }
    ctx.load::<T>(off).ok()
}
