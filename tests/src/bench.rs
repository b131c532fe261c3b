//! What the benches share: medians and their intervals (so that every
//! bench reports ratios the same way), and pinning a thread to a CPU.

/// Pins the calling thread to `cpu`. False when there are fewer than two
/// CPUs (the benches then leave everything where it runs) or when it
/// fails.
pub fn pin_to(cpu: usize) -> bool {
    // SAFETY: sysconf has no preconditions.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays in it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A 95 % confidence interval of the median of `v` (percentile bootstrap,
/// 2,000 resamples, a fixed xorshift seed so that a run's report is
/// reproducible from its rounds).
pub fn median_ci95(v: &[f64]) -> (f64, f64) {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut medians: Vec<f64> = (0..2_000)
        .map(|_| {
            let sample: Vec<f64> = (0..v.len())
                .map(|_| v[(next() % v.len() as u64) as usize])
                .collect();
            median(&sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (medians[50], medians[1_949])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_and_its_interval_hold_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        let v: Vec<f64> = (0..101).map(f64::from).collect();
        let (lo, hi) = median_ci95(&v);
        assert!(
            lo < 50.0 && 50.0 < hi && lo > 30.0 && hi < 70.0,
            "{lo} {hi}"
        );
    }
}
