//! A fast, non-cryptographic 64-bit hash (the "Fx" hash of rustc and Firefox) for the daemon's
//! hot paths: hashing every row of a 100,000-row file on each change, and the sets keyed by
//! mapping id. std's SipHash costs about three times as much there.
//!
//! Not for untrusted keys where collisions could be provoked: the keys here are mapping ids
//! and rows of the operator's own database. A changed row that hashes like its old self is
//! caught by the next full reconcile, which does not use these hashes.

use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

/// The hasher. Words are mixed one at a time: a change confined to one 8-byte word always
/// changes the hash.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().expect("chunks of 8")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    /// The multiply leaves the best-mixed bits at the top, and hash tables index buckets
    /// by the low bits: rotate the top bits down (as rustc-hash 2 does).
    fn finish(&self) -> u64 {
        self.hash.rotate_left(26)
    }
}

/// For `HashMap<K, V, FxBuildHasher>`.
pub type FxBuildHasher = BuildHasherDefault<FxHasher>;

/// A `HashMap` with the Fx hash.
pub type FxHashMap<K, V> = std::collections::HashMap<K, V, FxBuildHasher>;

/// A `HashSet` with the Fx hash.
pub type FxHashSet<K> = std::collections::HashSet<K, FxBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(bytes: &[u8]) -> u64 {
        let mut h = FxHasher::default();
        h.write(bytes);
        h.finish()
    }

    #[test]
    fn any_one_word_change_changes_the_hash() {
        let base =
            b"mapping:key-1|gpt-4o|[\"gpt-4o\", \"o4-mini\"]|{\"temperature\": 0.37}".to_vec();
        let h = hash(&base);
        for i in 0..base.len() {
            let mut changed = base.clone();
            changed[i] ^= 0x01;
            assert_ne!(hash(&changed), h, "a flip at byte {i} went unnoticed");
        }
        // The last word is zero-padded: callers that need it hash the length too.
        assert_eq!(hash(b"ab"), hash(b"ab\0"));
    }
}
