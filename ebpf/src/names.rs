//! Name lookups shared by the DNS and SNI programs: the label hashes of a
//! name (read left to right into a scratch) folded into the name's hash
//! right to left (common/src/names.rs), one label per `bpf_loop` step, each
//! suffix looked up in `NAMES` of the active slot: a wildcard entry below
//! the full name, the exact entry at the full name. Later (longer) suffixes
//! are more specific, the exact name last.
//!
//! One label per step, with the fold's state in the caller's map-value
//! scratch, keeps the verifier's work to one pass over a short callback;
//! the 16 suffix lookups unrolled in one function cost the SNI program
//! more than half of its verifier budget.

use llm_egress_common::{
    DNS_MAX_LABELS, NameKey,
    names::{fold, wildcard},
};

use crate::maps::NAMES;

const LMASK: usize = DNS_MAX_LABELS - 1;
const _: () = assert!(DNS_MAX_LABELS.is_power_of_two());

/// The state of one fold (in a map value, see the module comment).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Fold {
    /// Labels of the name, and how many are folded.
    pub n: u64,
    pub k: u64,
    /// The hash of the suffix folded so far (the seed before any label).
    pub acc: u64,
    pub slot: u64,
    /// 1: look each suffix up in `NAMES`.
    pub lookup: u64,
    /// The most specific `NAMES` key matched so far; 0: none.
    pub found: u64,
}

impl Fold {
    /// A fold of the `n` labels of a name.
    #[inline(always)]
    pub fn new(n: u64, seed: u64, slot: u64, lookup: bool) -> Self {
        Self {
            n,
            k: 0,
            acc: seed,
            slot,
            lookup: lookup as u64,
            found: 0,
        }
    }

    /// Folds the next label; true once every label is folded (`acc` is
    /// then the name's hash, `found` its key).
    #[inline(always)]
    pub fn step(&mut self, labels: &[u64; DNS_MAX_LABELS]) -> bool {
        if self.k >= self.n {
            return true;
        }
        let i = self.n - 1 - self.k;
        self.acc = fold(self.acc, labels[(i as usize) & LMASK]);
        self.k += 1;
        if self.lookup != 0 {
            let key = if i == 0 { self.acc } else { wildcard(self.acc) };
            let name = NameKey {
                slot: self.slot as u32,
                _pad: 0,
                hash: key,
            };
            // SAFETY: presence only.
            if unsafe { NAMES.get(&name) }.is_some() {
                self.found = key;
            }
        }
        self.k >= self.n
    }
}
