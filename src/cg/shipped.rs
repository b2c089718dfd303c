//! What was handed out since the last commit: shipped again if the link is lost before the
//! commit. A superset is always safe (shipping a chunk twice is harmless), so on very large
//! disks it is kept per group of chunks: at most [`MAX_BITS`] bits (1 MiB) however large the
//! disk, exact up to 8 Mi chunks (32 GiB at 4 KiB).

use super::bitmap::Bitmap;
use super::record::Record;

/// Most bits kept.
const MAX_BITS: u64 = 1 << 23;

pub(super) struct Shipped {
    bits: Bitmap,
    /// Chunks per bit (a power of two).
    per_bit: u64,
    chunks: u64,
}

impl Shipped {
    pub(super) fn new(chunks: u64) -> Self {
        let mut per_bit = 1;
        while chunks.div_ceil(per_bit) > MAX_BITS {
            per_bit *= 2;
        }
        Shipped {
            bits: Bitmap::new(chunks.div_ceil(per_bit).max(1)),
            per_bit,
            chunks,
        }
    }

    /// Chunks `first..first + count` were handed out.
    pub(super) fn add(&self, first: u64, count: u64) {
        self.bits
            .set_range(first / self.per_bit, (first + count - 1) / self.per_bit);
    }

    /// Marks everything handed out (or its group) in `oos`.
    pub(super) fn merge_into(&self, oos: &Record) {
        if self.per_bit == 1 {
            oos.bits.or_from(&self.bits);
            return;
        }
        let n = self.chunks.div_ceil(self.per_bit);
        let mut from = 0;
        while let Some(b) = self.bits.next_set_in(from, n) {
            let last = ((b + 1) * self.per_bit).min(self.chunks) - 1;
            oos.bits.set_range(b * self.per_bit, last);
            from = b + 1;
        }
    }

    /// Sets bit `i - from` of `out` for every chunk `i` in `from..to` handed out (or in a
    /// group with one that was).
    pub(super) fn or_range_into(&self, from: u64, to: u64, out: &mut [u64]) {
        if self.per_bit == 1 {
            self.bits.or_range_into(from, to, out);
            return;
        }
        let (g0, g1) = (from / self.per_bit, (to - 1) / self.per_bit + 1);
        let mut g = g0;
        while let Some(b) = self.bits.next_set_in(g, g1) {
            for j in (b * self.per_bit).max(from)..((b + 1) * self.per_bit).min(to) {
                let k = j - from;
                out[(k / 64) as usize] |= 1 << (k % 64);
            }
            g = b + 1;
        }
    }

    /// Chunks that would ship again (exact when one bit is one chunk).
    pub(super) fn count(&self) -> u64 {
        (self.bits.count() * self.per_bit).min(self.chunks)
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;

    #[test]
    fn exact_on_small_disks_coarse_and_bounded_on_huge_ones() {
        let s = Shipped::new(100);
        s.add(3, 2);
        let oos = Record::new(100);
        s.merge_into(&oos);
        assert_eq!((oos.bits.count(), s.count()), (2, 2));
        // 2 TiB at 4 KiB: 64 chunks per bit, 1 MiB of bits.
        let chunks = (2u64 << 40) / 4096;
        let s = Shipped::new(chunks);
        assert_eq!(s.per_bit, 64);
        s.add(chunks - 1, 1);
        let oos = Record::new(chunks);
        s.merge_into(&oos);
        assert_eq!(oos.bits.count(), 64, "a superset: the whole group");
        assert!(oos.bits.test(chunks - 1) && oos.bits.test(chunks - 64));
    }
}
