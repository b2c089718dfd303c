//! A sparse bitmap of atomic words, one bit per tracked block, allocated in pages on first
//! use: a disk's bitmaps cost memory in proportion to what was written, not to its size.

use std::ptr;

use super::sync::{AtomicPtr, AtomicU64, Ordering};

/// Words per page: 128 words = 8192 bits = 1 KiB, covering 32 MiB of disk at 4 KiB blocks.
/// Under loom one word: every word operation is a point the model checker explores.
const PAGE_WORDS: usize = if cfg!(all(test, feature = "loom")) {
    1
} else {
    128
};
const PAGE_BITS: u64 = (PAGE_WORDS * 64) as u64;

struct Page {
    words: [AtomicU64; PAGE_WORDS],
}

impl Page {
    /// A page whose words all hold `word`.
    fn new(word: u64) -> Box<Page> {
        Box::new(Page {
            words: std::array::from_fn(|_| AtomicU64::new(word)),
        })
    }
}

/// One bit per block, in `AtomicU64` words so that queue workers set bits without a lock.
/// Operations use `SeqCst` (free on x86 for read-modify-writes); where a protocol needs a
/// handshake between bit updates and another flag, it uses read-modify-writes on both sides
/// (see [`super::record::Record::exit`]).
///
/// A page slot is absent (all clear), `full` (all set, no memory) or a real page. Slots only
/// change absent → page, absent → full and full → page (compare-and-swap), and real pages
/// are freed only with the bitmap, so a reader never sees a page freed under it; a setter
/// installs the page (SeqCst) before it sets a bit in it. Under loom every page is allocated
/// up front and never `full`, so the models check the word-level handshakes exactly as with
/// a dense bitmap.
///
/// Memory: a pointer per page (2 TiB at 4 KiB blocks: 64 Ki pages, 512 KiB) plus 1 KiB per
/// 32 MiB region with a bit set since the bitmap was made — or cleared since it was made
/// full. Even when every page is real, 1 bit per block (2 TiB: 64 MiB).
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

/// A page slot's content.
enum Slot<'a> {
    /// Never written: every bit clear.
    Absent,
    /// Every bit set (by `set_all` or a range covering the page), with no memory behind it.
    Full,
    Page(&'a Page),
}

/// The marker of a full page: never dereferenced, never a real allocation's address.
fn full() -> *mut Page {
    ptr::dangling_mut::<Page>()
}

impl Drop for Bitmap {
    fn drop(&mut self) {
        for p in self.pages.iter() {
            let page = p.swap(ptr::null_mut(), Ordering::SeqCst);
            if !page.is_null() && page != full() {
                // SAFETY: every page pointer other than null and `full()` came from
                // `Box::into_raw` and is freed only here, once, with exclusive access.
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
                if cfg!(all(test, feature = "loom")) {
                    AtomicPtr::new(Box::into_raw(Page::new(0)))
                } else {
                    AtomicPtr::new(ptr::null_mut())
                }
            })
            .collect();
        Bitmap { pages, bits }
    }

    fn decode(p: *mut Page) -> Slot<'static> {
        if p.is_null() {
            Slot::Absent
        } else if p == full() {
            Slot::Full
        } else {
            // SAFETY: a real page stays allocated until the bitmap is dropped, and slots only
            // go null → page/full and full → page, so no page is freed while readable.
            Slot::Page(unsafe { &*p })
        }
    }

    fn slot(&self, page: u64) -> Slot<'_> {
        Self::decode(self.pages[page as usize].load(Ordering::SeqCst))
    }

    /// Installs `fresh` in slot `page` if it holds `expect`; returns what the slot holds
    /// afterwards (ours, or what another thread installed first — ours is then freed).
    fn install(&self, page: u64, expect: *mut Page, fresh: Box<Page>) -> Slot<'_> {
        let fresh = Box::into_raw(fresh);
        match self.pages[page as usize].compare_exchange(
            expect,
            fresh,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => Self::decode(fresh),
            Err(other) => {
                // SAFETY: `fresh` was never shared.
                drop(unsafe { Box::from_raw(fresh) });
                Self::decode(other)
            }
        }
    }

    /// The page to set bits in: `None` if the page is full (nothing to set).
    fn page_to_set(&self, page: u64) -> Option<&Page> {
        match self.slot(page) {
            Slot::Full => None,
            Slot::Page(p) => Some(p),
            Slot::Absent => match self.install(page, ptr::null_mut(), Page::new(0)) {
                Slot::Page(p) => Some(p),
                _ => None,
            },
        }
    }

    /// The page to clear bits in: `None` if it has none set. A full page becomes a real page
    /// of set bits first (`full` → page is the only transition away from `full`).
    fn page_to_clear(&self, page: u64) -> Option<&Page> {
        match self.slot(page) {
            Slot::Absent => None,
            Slot::Page(p) => Some(p),
            Slot::Full => match self.install(page, full(), Page::new(u64::MAX)) {
                Slot::Page(p) => Some(p),
                // Only `full` → page happens to a full slot: another thread materialised it.
                _ => None,
            },
        }
    }

    fn load(&self, w: u64) -> u64 {
        match self.slot(w / PAGE_WORDS as u64) {
            Slot::Absent => 0,
            Slot::Full => u64::MAX,
            Slot::Page(p) => p.words[(w % PAGE_WORDS as u64) as usize].load(Ordering::SeqCst),
        }
    }

    /// Calls `f(word, mask)` for every word of bits `first..=last`.
    fn for_words(first: u64, last: u64, mut f: impl FnMut(u64, u64)) {
        let (fw, lw) = (first / 64, last / 64);
        for w in fw..=lw {
            let lo = if w == fw { first % 64 } else { 0 };
            let hi = if w == lw { last % 64 } else { 63 };
            f(w, word_mask(lo, hi));
        }
    }

    /// Sets bits `first..=last` (one `fetch_or` per word touched; a page the range covers
    /// whole and that was never written becomes `full`, with no memory).
    pub(crate) fn set_range(&self, first: u64, last: u64) {
        debug_assert!(first <= last && last < self.bits);
        let (fp, lp) = (first / PAGE_BITS, last / PAGE_BITS);
        for page in fp..=lp {
            let lo = if page == fp { first } else { page * PAGE_BITS };
            let hi = if page == lp {
                last
            } else {
                (page + 1) * PAGE_BITS - 1
            };
            let whole = lo == page * PAGE_BITS && (hi + 1 == (page + 1) * PAGE_BITS);
            if whole && !cfg!(all(test, feature = "loom")) {
                let slot = &self.pages[page as usize];
                if slot
                    .compare_exchange(ptr::null_mut(), full(), Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    continue;
                }
            }
            let Some(p) = self.page_to_set(page) else {
                continue;
            };
            Self::for_words(lo, hi, |w, m| {
                p.words[(w % PAGE_WORDS as u64) as usize].fetch_or(m, Ordering::SeqCst);
            });
        }
    }

    /// Clears bits `first..=last` (one `fetch_and` per word touched).
    pub(crate) fn clear_range(&self, first: u64, last: u64) {
        debug_assert!(first <= last && last < self.bits);
        Self::for_words(first, last, |w, m| {
            if let Some(p) = self.page_to_clear(w / PAGE_WORDS as u64) {
                p.words[(w % PAGE_WORDS as u64) as usize].fetch_and(!m, Ordering::SeqCst);
            }
        });
    }

    /// Sets bit `i`.
    #[cfg(all(test, not(feature = "loom")))]
    pub(crate) fn set(&self, i: u64) {
        self.set_range(i, i);
    }

    /// Whether bit `i` is set.
    pub(crate) fn test(&self, i: u64) -> bool {
        self.load(i / 64) & (1 << (i % 64)) != 0
    }

    /// Whether any bit in `first..=last` is set.
    pub(crate) fn any_in(&self, first: u64, last: u64) -> bool {
        let mut any = false;
        Self::for_words(first, last, |w, m| any |= self.load(w) & m != 0);
        any
    }

    /// Clears bit `i`; returns whether it was set.
    #[cfg(all(test, not(feature = "loom")))]
    pub(crate) fn clear(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        self.page_to_clear(i / PAGE_BITS).is_some_and(|p| {
            p.words[((i / 64) % PAGE_WORDS as u64) as usize].fetch_and(!m, Ordering::SeqCst) & m
                != 0
        })
    }

    /// Sets every bit (pages never written cost no memory).
    pub(crate) fn set_all(&self) {
        if self.bits > 0 {
            self.set_range(0, self.bits - 1);
        }
    }

    /// The bits `lo..=hi` of page `page` that exist (the last page may be partial).
    fn page_bits(&self, page: u64) -> (u64, u64) {
        let lo = page * PAGE_BITS;
        (lo, ((page + 1) * PAGE_BITS).min(self.bits) - 1)
    }

    /// Calls `f` with the index and content of every page that has bits set.
    fn each_page(&self, mut f: impl FnMut(u64, Slot<'_>)) {
        for page in 0..self.pages.len() as u64 {
            match self.slot(page) {
                Slot::Absent => {}
                s => f(page, s),
            }
        }
    }

    /// `self |= other` (word by word; each word of `other` is read once).
    pub(crate) fn or_from(&self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        other.each_page(|page, slot| match slot {
            Slot::Full => {
                let (lo, hi) = self.page_bits(page);
                self.set_range(lo, hi);
            }
            Slot::Page(p) => {
                for (k, s) in p.words.iter().enumerate() {
                    let v = s.load(Ordering::SeqCst);
                    if v != 0 {
                        if let Some(d) = self.page_to_set(page) {
                            d.words[k].fetch_or(v, Ordering::SeqCst);
                        }
                    }
                }
            }
            Slot::Absent => {}
        });
    }

    /// `other |= self`, reading each word of `self` with a read-modify-write (so the read is
    /// the latest value in the word's modification order; see `Record::exit`). A full page
    /// of `self` marks its whole range in `other` (a record retired this way is never
    /// cleared, so `full` is final for it).
    pub(crate) fn or_into_rmw(&self, other: &Bitmap) {
        debug_assert_eq!(self.bits, other.bits);
        self.each_page(|page, slot| match slot {
            Slot::Full => {
                let (lo, hi) = self.page_bits(page);
                other.set_range(lo, hi);
            }
            Slot::Page(p) => {
                for (k, s) in p.words.iter().enumerate() {
                    let v = s.fetch_or(0, Ordering::SeqCst);
                    if v != 0 {
                        if let Some(d) = other.page_to_set(page) {
                            d.words[k].fetch_or(v, Ordering::SeqCst);
                        }
                    }
                }
            }
            Slot::Absent => {}
        });
    }

    /// Number of set bits.
    pub(crate) fn count(&self) -> u64 {
        let mut n = 0;
        self.each_page(|page, slot| match slot {
            Slot::Full => {
                let (lo, hi) = self.page_bits(page);
                n += hi - lo + 1;
            }
            Slot::Page(p) => {
                n += p
                    .words
                    .iter()
                    .map(|w| u64::from(w.load(Ordering::SeqCst).count_ones()))
                    .sum::<u64>();
            }
            Slot::Absent => {}
        });
        n
    }

    /// Lowest set bit in `from..to`, if any.
    pub(crate) fn next_set_in(&self, from: u64, to: u64) -> Option<u64> {
        let to = to.min(self.bits);
        let mut i = from;
        while i < to {
            let w = match self.slot(i / PAGE_BITS) {
                Slot::Absent => {
                    // Skip the whole page.
                    i = (i / PAGE_BITS + 1) * PAGE_BITS;
                    continue;
                }
                Slot::Full => return Some(i),
                Slot::Page(p) => {
                    p.words[((i / 64) % PAGE_WORDS as u64) as usize].load(Ordering::SeqCst)
                }
            } & (u64::MAX << (i % 64));
            if w != 0 {
                let bit = (i / 64) * 64 + u64::from(w.trailing_zeros());
                return (bit < to).then_some(bit);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Sets bit `i - from` of `out` (64 bits a word) for every set bit `i` in `from..to`.
    pub(crate) fn or_range_into(&self, from: u64, to: u64, out: &mut [u64]) {
        let mut i = from;
        while let Some(b) = self.next_set_in(i, to) {
            let run = self.run_len(b, to);
            for j in b..b + run {
                let k = j - from;
                out[(k / 64) as usize] |= 1 << (k % 64);
            }
            i = b + run;
        }
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

    /// Bytes allocated: the page pointers and the real pages.
    #[cfg(all(test, not(feature = "loom")))]
    pub(crate) fn allocated_bytes(&self) -> usize {
        let mut n = self.pages.len() * std::mem::size_of::<usize>();
        self.each_page(|_, slot| {
            if let Slot::Page(_) = slot {
                n += std::mem::size_of::<Page>();
            }
        });
        n
    }
}

#[cfg(all(test, not(feature = "loom")))]
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
        // Everything set: no page memory until bits are cleared.
        let f = Bitmap::new(blocks);
        f.set_all();
        assert_eq!((f.count(), f.allocated_bytes()), (blocks, empty));
        assert_eq!(f.run_len(5, 1 << 20), (1 << 20) - 5);
        f.clear_range(10, 20);
        assert_eq!(f.count(), blocks - 11);
        assert_eq!(f.allocated_bytes(), empty + 1024, "one page made real");
        assert_eq!(f.next_set_in(10, blocks), Some(21));
        let g = Bitmap::new(blocks);
        f.or_into_rmw(&g);
        assert_eq!(g.count(), blocks - 11);
        assert!(!g.test(15) && g.test(9) && g.test(blocks - 1));
    }

    #[test]
    fn a_partial_last_page_counts_only_real_bits() {
        let b = Bitmap::new(PAGE_BITS + 10);
        b.set_all();
        assert_eq!(b.count(), PAGE_BITS + 10);
        assert_eq!(b.next_set_in(PAGE_BITS + 10, u64::MAX), None);
        let c = Bitmap::new(PAGE_BITS + 10);
        c.or_from(&b);
        assert_eq!(c.count(), PAGE_BITS + 10);
        b.clear_range(0, PAGE_BITS + 9);
        assert_eq!(b.count(), 0);
    }
}
