//! A sparse bitmap of atomic words, one bit per tracked block, allocated in pages on first
//! use: a disk's bitmaps cost memory in proportion to what was written, not to its size.

use std::ptr;

use super::sync::{AtomicPtr, AtomicU64, Ordering};

/// Words per page: 128 words = 8192 bits = 1 KiB, covering 32 MiB of disk at 4 KiB blocks.
const PAGE_WORDS: usize = 128;
const PAGE_BITS: u64 = (PAGE_WORDS * 64) as u64;

struct Page {
    words: [AtomicU64; PAGE_WORDS],
}

impl Page {
    fn new() -> Box<Page> {
        Box::new(Page {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        })
    }
}

/// One bit per block, in `AtomicU64` words so that queue workers set bits without a lock.
/// Operations use `SeqCst` (free on x86 for read-modify-writes); where a protocol needs a
/// handshake between bit updates and another flag, it uses read-modify-writes on both sides
/// (see [`super::record::Record::exit`]).
///
/// Pages are installed with a compare-and-swap and never removed while the bitmap lives, so
/// a reader that finds a page absent may read its bits as zero: a setter installs the page
/// (SeqCst) before it sets a bit in it. Under loom every page is allocated up front, so the
/// models check the word-level handshakes exactly as with a dense bitmap.
///
/// Memory: a pointer per page (2 TiB at 4 KiB blocks: 64 Ki pages, 512 KiB) plus 1 KiB per
/// 32 MiB region with a bit set since the bitmap was made; a bitmap with every bit set costs
/// 1 bit per block (2 TiB: 64 MiB).
pub(crate) struct Bitmap {
    pages: Box<[AtomicPtr<Page>]>,
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

impl Drop for Bitmap {
    fn drop(&mut self) {
        for p in self.pages.iter() {
            let page = p.swap(ptr::null_mut(), Ordering::SeqCst);
            if !page.is_null() {
                // SAFETY: every non-null page pointer came from `Box::into_raw` in `page_mut`
                // (or `new`) and is freed only here, once, with exclusive access.
                drop(unsafe { Box::from_raw(page) });
            }
        }
    }
}

impl Bitmap {
    /// A bitmap of `bits` clear bits.
    pub(crate) fn new(bits: u64) -> Self {
        let n = bits.div_ceil(PAGE_BITS) as usize;
        let pages = (0..n)
            .map(|_| {
                if cfg!(drblk_loom) {
                    AtomicPtr::new(Box::into_raw(Page::new()))
                } else {
                    AtomicPtr::new(ptr::null_mut())
                }
            })
            .collect();
        Bitmap { pages, bits }
    }

    /// The page of word `w`, if it was ever written.
    fn page(&self, w: u64) -> Option<&Page> {
        let p = self.pages[(w / PAGE_WORDS as u64) as usize].load(Ordering::SeqCst);
        // SAFETY: a non-null page stays allocated until the bitmap is dropped.
        (!p.is_null()).then(|| unsafe { &*p })
    }

    /// The page of word `w`, installed if absent.
    fn page_mut(&self, w: u64) -> &Page {
        let slot = &self.pages[(w / PAGE_WORDS as u64) as usize];
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: as in `page`.
            return unsafe { &*p };
        }
        let fresh = Box::into_raw(Page::new());
        match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::SeqCst, Ordering::SeqCst) {
            // SAFETY: installed; lives until drop.
            Ok(_) => unsafe { &*fresh },
            Err(other) => {
                // Another thread installed one first: use it, free ours.
                // SAFETY: `fresh` was never shared.
                drop(unsafe { Box::from_raw(fresh) });
                // SAFETY: as in `page`.
                unsafe { &*other }
            }
        }
    }

    fn word(&self, w: u64) -> Option<&AtomicU64> {
        self.page(w)
            .map(|p| &p.words[(w % PAGE_WORDS as u64) as usize])
    }

    fn load(&self, w: u64) -> u64 {
        self.word(w).map_or(0, |a| a.load(Ordering::SeqCst))
    }

    /// Sets bits `first..=last` (one `fetch_or` per word touched).
    pub(crate) fn set_range(&self, first: u64, last: u64) {
        debug_assert!(first <= last && last < self.bits);
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            self.page_mut(w).words[(w % PAGE_WORDS as u64) as usize]
                .fetch_or(word_mask(lo, hi), Ordering::SeqCst);
        }
    }

    /// Clears bits `first..=last` (one `fetch_and` per word touched).
    pub(crate) fn clear_range(&self, first: u64, last: u64) {
        debug_assert!(first <= last && last < self.bits);
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            if let Some(a) = self.word(w) {
                a.fetch_and(!word_mask(lo, hi), Ordering::SeqCst);
            }
        }
    }

    /// Sets bit `i`.
    #[cfg(test)]
    pub(crate) fn set(&self, i: u64) {
        self.set_range(i, i);
    }

    /// Whether bit `i` is set.
    pub(crate) fn test(&self, i: u64) -> bool {
        self.load(i / 64) & (1 << (i % 64)) != 0
    }

    /// Whether any bit in `first..=last` is set.
    pub(crate) fn any_in(&self, first: u64, last: u64) -> bool {
        let (fw, lw) = (first / 64, last / 64);
        (fw..=lw).any(|w| {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            self.load(w) & word_mask(lo, hi) != 0
        })
    }

    /// Clears bit `i`; returns whether it was set.
    #[cfg(test)]
    pub(crate) fn clear(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.word(i / 64)
            .is_some_and(|a| a.fetch_and(!m, Ordering::SeqCst) & m != 0)
    }

    /// Sets every bit.
    pub(crate) fn set_all(&self) {
        if self.bits > 0 {
            self.set_range(0, self.bits - 1);
        }
    }

    /// Calls `f` with the first word index and the page of every allocated page.
    fn each_page(&self, mut f: impl FnMut(u64, &Page)) {
        for (i, p) in self.pages.iter().enumerate() {
            let p = p.load(Ordering::SeqCst);
            if !p.is_null() {
                // SAFETY: as in `page`.
                f(i as u64 * PAGE_WORDS as u64, unsafe { &*p });
            }
        }
    }

    /// `self |= other` (word by word; each word of `other` is read once).
    pub(crate) fn or_from(&self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        other.each_page(|base, page| {
            for (k, s) in page.words.iter().enumerate() {
                let v = s.load(Ordering::SeqCst);
                if v != 0 {
                    let w = base + k as u64;
                    self.page_mut(w).words[k].fetch_or(v, Ordering::SeqCst);
                }
            }
        });
    }

    /// `other |= self`, reading each word of `self` with a read-modify-write (so the read is
    /// the latest value in the word's modification order; see `Record::exit`).
    pub(crate) fn or_into_rmw(&self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        self.each_page(|base, page| {
            for (k, s) in page.words.iter().enumerate() {
                let v = s.fetch_or(0, Ordering::SeqCst);
                if v != 0 {
                    let w = base + k as u64;
                    other.page_mut(w).words[k].fetch_or(v, Ordering::SeqCst);
                }
            }
        });
    }

    /// Number of set bits.
    pub(crate) fn count(&self) -> u64 {
        let mut n = 0;
        self.each_page(|_, page| {
            n += page
                .words
                .iter()
                .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
                .sum::<u64>();
        });
        n
    }

    /// Lowest set bit in `from..to`, if any.
    pub(crate) fn next_set_in(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            let Some(page) = self.page(i / 64) else {
                // Skip the whole absent page.
                i = (i / PAGE_BITS + 1) * PAGE_BITS;
                continue;
            };
            let w = page.words[((i / 64) % PAGE_WORDS as u64) as usize].load(Ordering::SeqCst)
                & (u64::MAX << (i % 64));
            if w != 0 {
                let bit = (i / 64) * 64 + u64::from(w.trailing_zeros());
                return (bit < to).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Number of consecutive set bits from `from` (which is set), stopping at `to`.
    pub(crate) fn run_len(&self, from: u64, to: u64) -> u64 {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            let w = !self.load(i / 64) & (u64::MAX << (i % 64));
            if w != 0 {
                let clear = (i / 64) * 64 + u64::from(w.trailing_zeros());
                return clear.min(to) - from;
            }
            i = (i / 64 + 1) * 64;
        }
        to - from
    }

    /// Bytes allocated for pages (for the memory figure in the docs and tests).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        let mut n = self.pages.len() * std::mem::size_of::<usize>();
        self.each_page(|_, _| n += std::mem::size_of::<Page>());
        n
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
        assert_eq!(b.run_len(60, 200), 71);
        assert_eq!(b.run_len(60, 100), 40);
        assert!(b.clear(64) && !b.clear(64));
        assert_eq!(b.run_len(60, 200), 4);
        assert_eq!(b.next_set_in(64, 200), Some(65));
        let c = Bitmap::new(200);
        c.set(199);
        c.or_from(&b);
        assert_eq!(c.count(), 71);
        c.clear_range(60, 130);
        assert_eq!(c.count(), 1);
        c.clear_range(0, 199);
        assert_eq!(c.count(), 0);
        c.set_all();
        assert_eq!(c.count(), 200);
        assert_eq!(c.run_len(0, 200), 200);
        assert_eq!(word_mask(0, 63), u64::MAX);
    }

    #[test]
    fn sparse_pages_across_a_large_disk() {
        // 2 TiB at 4 KiB blocks.
        let blocks = (2u64 << 40) / 4096;
        let b = Bitmap::new(blocks);
        let empty = b.allocated_bytes();
        assert_eq!(empty, 512 << 10, "one pointer per 32 MiB region");
        let far = blocks - 1;
        b.set(far);
        b.set(3);
        assert_eq!(b.next_set_in(4, blocks), Some(far));
        assert_eq!(b.next_set_in(0, blocks), Some(3));
        assert_eq!(b.count(), 2);
        assert_eq!(b.allocated_bytes(), empty + 2 * 1024);
        assert!(!b.clear(5) && b.clear(far));
        let c = Bitmap::new(blocks);
        b.or_into_rmw(&c);
        assert!(c.test(3) && c.count() == 1);
    }
}
