//! Values the compiler must not reason about, so that the verifier sees the
//! bounds the code states.
//!
//! LLVM drops a mask (`i & (N - 1)`) or a clamp it can prove redundant from
//! earlier checks, e.g. `pos < avail` with `avail <= N`. Kernels since ~6.8
//! learn the same from the comparison of two registers; older ones (6.1)
//! do not, and then refuse the access as unbounded. Passing a value through
//! a volatile stack slot hides what the compiler knew, so the mask it can
//! no longer prove redundant stays in the program.

/// `v`, unknown to the compiler (one stack store and load).
#[inline(always)]
pub fn opaque<T: Copy>(v: T) -> T {
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&v) }
}

/// `n` (1..=`max`) as a helper length the verifier sees bounded to
/// 1..=`max` (`max` a power of two): `bpf_skb_load_bytes` needs at least
/// 1, and 6.1 saw a length that could be 0 where the compiler had folded
/// `((n - 1) & (max - 1)) + 1` back into `n`.
#[inline(always)]
pub fn helper_len(n: usize, max: usize) -> u32 {
    ((opaque(n).wrapping_sub(1) & (max - 1)) + 1) as u32
}
