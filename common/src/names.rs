//! The name hash shared by the kernel programs and the agent.
//!
//! Host names are matched in the kernel by a 64-bit hash, never by string:
//! the agent writes one `NAMES` entry per provider host (exact names, and
//! wildcard suffixes), the programs hash the names they read from DNS
//! answers and TLS ClientHellos the same way and look the hash up.
//!
//! The hash of a name with labels `l0.l1.….ln` (case folded to ASCII lower
//! case, no trailing dot) is computed right to left:
//!
//! ```text
//! acc = seed;  for i in n..=0: acc = fold(acc, label_hash(li))
//! ```
//!
//! so that the hash of every suffix of a name falls out of one pass over its
//! labels: that is what lets the kernel check `*.example.com` wildcards at
//! each label boundary. A wildcard `*.x` is stored as `wildcard(hash(x))`,
//! which matches names *below* `x` but not `x` itself.
//!
//! `seed` is random per pinned map set (written once by the first agent into
//! `NAME_CFG`), so that names crafted to collide with a provider's name
//! cannot be computed offline. The hash is not cryptographic: docs/names.md
//! says what that means.

/// FNV-1a 64 offset basis: the start of every label hash.
pub const LABEL_INIT: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0100_0000_01b3;
/// Mixed into wildcard entries so that `*.x` never equals `x`.
const WILDCARD_TWEAK: u64 = 0x2a2e_7769_6c64_6361;

/// ASCII lower case; other bytes unchanged.
#[inline(always)]
pub fn lower(b: u8) -> u8 {
    if b.wrapping_sub(b'A') < 26 {
        b | 0x20
    } else {
        b
    }
}

/// One byte of a label into its hash (case folded).
#[inline(always)]
pub fn label_step(h: u64, b: u8) -> u64 {
    (h ^ lower(b) as u64).wrapping_mul(FNV_PRIME)
}

/// The splitmix64 finaliser.
#[inline(always)]
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Adds one label (its hash) in front of the name hashed so far.
#[inline(always)]
pub fn fold(acc: u64, label: u64) -> u64 {
    mix(acc ^ label)
}

/// The `NAMES` key of the wildcard `*.<name>`, from the hash of `<name>`.
#[inline(always)]
pub fn wildcard(h: u64) -> u64 {
    mix(h ^ WILDCARD_TWEAK)
}

/// Hash of a label given as bytes.
pub fn label_hash(label: &[u8]) -> u64 {
    let mut h = LABEL_INIT;
    for &b in label {
        h = label_step(h, b);
    }
    h
}

/// Hash of a dotted name (`api.openai.com`, `API.OpenAI.com.`): one
/// trailing dot is ignored, case does not matter. `None` for an empty name
/// or an empty label (`a..b`).
pub fn name_hash(seed: u64, name: &str) -> Option<u64> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    let mut acc = seed;
    for label in name.rsplit('.') {
        if label.is_empty() {
            return None;
        }
        acc = fold(acc, label_hash(label.as_bytes()));
    }
    Some(acc)
}

/// The `NAMES` key of a policy host: `name_hash`, or for `*.x` the
/// wildcard key of `x`.
pub fn host_key(seed: u64, host: &str) -> Option<u64> {
    match host.strip_prefix("*.") {
        Some(rest) => name_hash(seed, rest).map(wildcard),
        None => name_hash(seed, host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_and_trailing_dot_do_not_matter() {
        let a = name_hash(7, "api.openai.com").unwrap();
        assert_eq!(name_hash(7, "API.OpenAI.COM.").unwrap(), a);
        assert_ne!(name_hash(8, "api.openai.com").unwrap(), a);
        assert_ne!(name_hash(7, "api.openai.co").unwrap(), a);
        assert_ne!(name_hash(7, "apio.penai.com").unwrap(), a);
        assert_eq!(name_hash(7, "a..b"), None);
        assert_eq!(name_hash(7, ""), None);
    }

    #[test]
    fn suffix_hashes_fall_out_of_the_fold() {
        let seed = 99;
        let suffix = name_hash(seed, "openai.azure.com").unwrap();
        let full = fold(suffix, label_hash(b"myres"));
        assert_eq!(full, name_hash(seed, "myres.openai.azure.com").unwrap());
        assert_eq!(
            host_key(seed, "*.openai.azure.com").unwrap(),
            wildcard(suffix)
        );
        assert_ne!(wildcard(suffix), suffix);
    }
}
