//! Seeded pseudo-random numbers for tests, workloads and the impairment proxy: one
//! well-known generator (PCG) instead of hand-written xorshifts.

use rand::{Rng, SeedableRng};

pub use rand::RngExt;

/// The generator tests use: small, fast, reproducible from a `u64` seed.
pub type TestRng = rand_pcg::Pcg64Mcg;

/// A generator seeded with `seed`.
pub fn seeded(seed: u64) -> TestRng {
    TestRng::seed_from_u64(seed)
}

/// `len` pseudo-random bytes, the same for the same `seed`, different across seeds.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    seeded(seed).fill_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_reproducible_and_differ_by_seed() {
        assert_eq!(pattern(7, 100), pattern(7, 100));
        assert_ne!(pattern(7, 100), pattern(8, 100));
        assert_eq!(pattern(7, 10)[..], pattern(7, 100)[..10]);
    }
}
