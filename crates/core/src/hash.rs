//! A stable 64-bit hash for placement and anti-entropy.
//!
//! Every node must compute the same hash for the same bytes, on every platform and in every
//! version, so this cannot be `std`'s `DefaultHasher` (its algorithm may change between Rust
//! releases). It is FNV-1a over the bytes followed by the splitmix64 finalizer, which spreads
//! FNV's weak low bits over the whole word. Not a cryptographic hash: it resists accidents,
//! not adversaries.

/// The stable hash of `bytes` under `seed`.
pub fn stable_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    mix(h)
}

/// The splitmix64 finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed by an independent implementation of the same definition. Changing them
    /// would move every key of every deployment.
    #[test]
    fn the_hash_is_stable_across_versions() {
        assert_eq!(stable_hash(0, b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(stable_hash(0, b"agent:identity:123"), 0xe9b0_0035_4d90_7e5b);
        assert_eq!(stable_hash(7, b"node-1#0"), 0x1557_8a53_e17a_c299);
    }
}
