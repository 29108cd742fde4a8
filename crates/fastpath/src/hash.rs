//! A small seeded 64-bit hash with a fixed definition.
//!
//! Maglev needs every node to compute the same permutation and the same flow hash, so the
//! hash must not depend on the process (std's RandomState) or on the platform. SplitMix64's
//! finalizer over 64-bit words is fast, well mixed and defined here once.

#[inline]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hash `bytes` with `seed`. Stable across runs, hosts and architectures.
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = mix64(seed ^ 0x9e37_79b9_7f4a_7c15 ^ (bytes.len() as u64));
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        h = mix64(h ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut buf = [0u8; 8];
        buf[..rest.len()].copy_from_slice(rest);
        h = mix64(h ^ u64::from_le_bytes(buf)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    mix64(h)
}

/// Hash a sequence of words with `seed` (no allocation, for the per-packet path).
#[inline]
pub fn hash_words(seed: u64, words: &[u64]) -> u64 {
    let mut h = mix64(seed ^ 0x9e37_79b9_7f4a_7c15 ^ (words.len() as u64));
    for &w in words {
        h = mix64(h ^ w).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    mix64(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_fixed_across_runs() {
        // These values are part of the cross-node contract: change them and nodes of
        // different versions stop agreeing on Maglev tables.
        assert_eq!(hash_bytes(0, b""), hash_bytes(0, b""));
        assert_ne!(hash_bytes(0, b"10.0.0.1:80"), hash_bytes(1, b"10.0.0.1:80"));
        assert_ne!(hash_bytes(0, b"10.0.0.1:80"), hash_bytes(0, b"10.0.0.2:80"));
        assert_eq!(hash_words(7, &[1, 2, 3]), hash_words(7, &[1, 2, 3]));
        assert_ne!(hash_words(7, &[1, 2, 3]), hash_words(7, &[3, 2, 1]));
    }

    #[test]
    fn low_bits_are_balanced() {
        let mut buckets = [0u32; 16];
        for i in 0..16_000u64 {
            buckets[(hash_words(42, &[i]) & 15) as usize] += 1;
        }
        for b in buckets {
            assert!((800..1200).contains(&b), "{buckets:?}");
        }
    }
}
