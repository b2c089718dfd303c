//! A fixed-size bitmap of atomic words, one bit per chunk.

use super::sync::{AtomicU64, Ordering};

/// One bit per chunk, stored in `AtomicU64` words so that queue workers can set bits without a
/// lock. Operations use `SeqCst` (free on x86 for read-modify-writes); where a protocol needs
/// a handshake between bit updates and another flag, it uses read-modify-writes on both sides
/// (see [`super::record::Record::exit`]).
pub(crate) struct Bitmap {
    words: Box<[AtomicU64]>,
    bits: u64,
}

/// Mask of the bits `lo..=hi` (0..=63) of a word.
fn word_mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo <= hi && hi < 64);
    let upper = if hi == 63 {
        u64::MAX
    } else {
        (1u64 << (hi + 1)) - 1
    };
    upper & !((1u64 << lo) - 1)
}

impl Bitmap {
    /// A bitmap of `bits` clear bits.
    pub(crate) fn new(bits: u64) -> Self {
        let n = bits.div_ceil(64) as usize;
        Bitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            bits,
        }
    }

    /// Sets bits `first..=last` (one `fetch_or` per word touched).
    pub(crate) fn set_range(&self, first: u64, last: u64) {
        debug_assert!(first <= last && last < self.bits);
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            self.words[w as usize].fetch_or(word_mask(lo, hi), Ordering::SeqCst);
        }
    }

    /// Sets bit `i`.
    pub(crate) fn set(&self, i: u64) {
        self.set_range(i, i);
    }

    /// Whether bit `i` is set.
    pub(crate) fn test(&self, i: u64) -> bool {
        self.words[(i / 64) as usize].load(Ordering::SeqCst) & (1 << (i % 64)) != 0
    }

    /// Whether any bit in `first..=last` is set.
    pub(crate) fn any_in(&self, first: u64, last: u64) -> bool {
        let (fw, lw) = (first / 64, last / 64);
        (fw..=lw).any(|w| {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            self.words[w as usize].load(Ordering::SeqCst) & word_mask(lo, hi) != 0
        })
    }

    /// Clears bit `i`; returns whether it was set.
    pub(crate) fn clear(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!m, Ordering::SeqCst) & m != 0
    }

    /// Sets every bit.
    pub(crate) fn set_all(&self) {
        if self.bits > 0 {
            self.set_range(0, self.bits - 1);
        }
    }

    /// Clears every bit.
    pub(crate) fn clear_all(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// `self |= other` (word by word; each word of `other` is read once).
    pub(crate) fn or_from(&self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        for (d, s) in self.words.iter().zip(other.words.iter()) {
            let v = s.load(Ordering::SeqCst);
            if v != 0 {
                d.fetch_or(v, Ordering::SeqCst);
            }
        }
    }

    /// `other |= self`, reading each word of `self` with a read-modify-write (so the read is
    /// the latest value in the word's modification order; see `Record::exit`).
    pub(crate) fn or_into_rmw(&self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        for (s, d) in self.words.iter().zip(other.words.iter()) {
            let v = s.fetch_or(0, Ordering::SeqCst);
            if v != 0 {
                d.fetch_or(v, Ordering::SeqCst);
            }
        }
    }

    /// Number of set bits.
    pub(crate) fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
            .sum()
    }

    /// Lowest set bit in `from..to`, if any.
    pub(crate) fn next_set_in(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            let w = self.words[(i / 64) as usize].load(Ordering::SeqCst) & (u64::MAX << (i % 64));
            if w != 0 {
                let bit = (i / 64) * 64 + u64::from(w.trailing_zeros());
                return (bit < to).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

#[cfg(all(test, not(drblk_loom)))]
mod tests {
    use super::*;

    #[test]
    fn ranges_across_words() {
        let b = Bitmap::new(200);
        b.set_range(60, 130);
        assert_eq!(b.count(), 71);
        assert!(!b.test(59) && b.test(60) && b.test(130) && !b.test(131));
        assert!(b.any_in(0, 60) && !b.any_in(0, 59) && !b.any_in(131, 199));
        assert_eq!(b.next_set_in(0, 200), Some(60));
        assert_eq!(b.next_set_in(131, 200), None);
        assert_eq!(b.next_set_in(0, 60), None);
        assert!(b.clear(64) && !b.clear(64));
        assert_eq!(b.next_set_in(64, 200), Some(65));
        let c = Bitmap::new(200);
        c.set(199);
        c.or_from(&b);
        assert_eq!(c.count(), 71);
        c.clear_all();
        assert_eq!(c.count(), 0);
        c.set_all();
        assert_eq!(c.count(), 200);
        assert_eq!(word_mask(0, 63), u64::MAX);
    }
}
