//! Copy-on-write for the strict CG: a write recorded in CR to a chunk the CG still has to ship
//! preserves the granules it overwrites before it proceeds; the drain overlays them.

use std::collections::HashMap;

use tracing::warn;

use super::drain::Drain;
use super::engine::Engine;
use super::sync::{lock, Ordering};
use super::AbandonReason;

/// Granules per chunk: copy-on-write preserves the granules a write overwrites, not the
/// whole chunk (a 4 KiB write into a 64 KiB chunk copies 4 KiB, not 64 KiB).
const GRANULES: u64 = 64;

/// Buffers of handed-out pieces kept for the next preserving reads: a writer then reads into
/// memory already mapped instead of allocating (and faulting in) a new one per write. At most
/// this many, of at most [`SPARE_BUFFER_MAX`] bytes each (16 MiB in all at 4 KiB tracking).
const SPARE_BUFFERS: usize = 4096;
const SPARE_BUFFER_MAX: usize = 4 << 10;

/// The preserved parts of one chunk not yet handed out. Invariants (under the cache lock):
/// `have` and `reading` are disjoint; each granule in `have` is in exactly one piece and holds
/// the chunk's content at the freeze; no write recorded in CR has touched a granule that is in
/// neither (such a write preserves first), nor one in `reading` (its writer has not started
/// the disk write, and other writers of it wait).
pub(super) struct Slot {
    /// Identifies this slot: a writer stores what it read only into the slot it reserved in.
    token: u64,
    /// Granules preserved.
    have: u64,
    /// Granules a writer is reading right now.
    reading: u64,
    /// (granules it supplies, byte offset in the chunk, bytes read from there).
    pieces: Vec<(u64, usize, Vec<u8>)>,
    /// Bytes counted against the cache limit (pieces and reads in progress).
    pub(super) reserved: usize,
}

impl Slot {
    /// Its pieces' buffers, for [`Cache::recycle`].
    pub(super) fn into_buffers(self) -> impl Iterator<Item = Vec<u8>> {
        self.pieces.into_iter().map(|(_, _, data)| data)
    }

    /// Overlays the preserved granules onto `buf`, a read of the whole chunk.
    pub(super) fn overlay(&self, buf: &mut [u8], granule: usize) {
        for (mask, at, data) in &self.pieces {
            let mut m = *mask;
            while m != 0 {
                let g = m.trailing_zeros() as usize;
                m &= m - 1;
                let lo = (g * granule).max(*at);
                let hi = ((g + 1) * granule).min(at + data.len()).min(buf.len());
                if lo < hi {
                    buf[lo..hi].copy_from_slice(&data[lo - at..hi - at]);
                }
            }
        }
    }
}

/// The copy-on-write cache, for the strict CG `cg` only.
pub(super) struct Cache {
    pub(super) cg: u64,
    pub(super) slots: HashMap<u64, Slot>,
    pub(super) bytes: usize,
    pub(super) peak: usize,
    pub(super) next_token: u64,
    pub(super) preserved: u64,
    /// Buffers to read the next pieces into (at most [`SPARE_BUFFERS`]).
    pub(super) spare: Vec<Vec<u8>>,
}

impl Cache {
    /// Keeps the buffers of a slot the drain has overlaid, up to [`SPARE_BUFFERS`].
    pub(super) fn recycle(&mut self, slot: Slot) {
        for buf in slot.into_buffers() {
            if self.spare.len() >= SPARE_BUFFERS {
                break;
            }
            if buf.capacity() <= SPARE_BUFFER_MAX {
                self.spare.push(buf);
            }
        }
    }
}

impl Engine {
    /// Bytes per copy-on-write granule.
    pub(super) fn granule(&self) -> usize {
        // Fits: chunk_size fits in usize (checked in `new`).
        (self.cfg.chunk_size / GRANULES).max(1) as usize
    }

    /// Copy-on-write for a write of `[offset, end)` recorded in the CR of the strict CG `d`.
    pub(super) fn preserve_range(&self, d: &Drain, offset: u64, end: u64) {
        let cs = self.cfg.chunk_size;
        let (first, last) = (offset / cs, (end - 1) / cs);
        if !d.strict.load(Ordering::SeqCst) {
            return;
        }
        // After an abandoned CG, a write from before the swap may still re-mark a cleared OOS
        // bit: wait until they are done before trusting a clear bit.
        if d.remark_possible && !d.wait_quiesced() {
            self.abandon(d.cg, AbandonReason::DrainTimeout);
            return;
        }
        // Fast path: none of the chunks is still to be shipped. A clear bit is final: before
        // the swap this queue's lock chain makes every pre-swap mark visible, and after the
        // swap a bit is cleared only once its chunk was captured (see `next_extent`).
        if !d.oos.bits.any_in(first, last) {
            return;
        }
        let g = self.granule() as u64;
        for i in first..=last {
            // The granules of chunk i this write overwrites.
            let base = i * cs;
            let lo = (offset.max(base) - base) / g;
            let hi = (end.min(base + cs) - base).div_ceil(g);
            let mask = if hi - lo >= 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if !self.preserve_granules(d, i, mask) {
                return;
            }
        }
    }

    /// Preserves the granules `mask` of chunk `i` for the strict CG `d`, except those already
    /// preserved, unless the chunk was captured. Returns false when `d` is no longer strict
    /// (nothing more to preserve).
    fn preserve_granules(&self, d: &Drain, i: u64, mask: u64) -> bool {
        let granule = self.granule();
        let chunk_len = self.chunk_len(i);
        let (token, need, at, len, mut buf) = {
            let mut c = lock(&self.cache);
            loop {
                if !d.strict.load(Ordering::SeqCst) || c.cg != d.cg {
                    return false;
                }
                // Checked under the cache lock, where `next_extent` clears it after reading.
                if !d.oos.bits.test(i) {
                    return true;
                }
                let (have, reading) = c.slots.get(&i).map_or((0, 0), |s| (s.have, s.reading));
                let need = mask & !have;
                if need == 0 {
                    return true;
                }
                if need & reading != 0 {
                    // Another writer is preserving some of them; our write must wait for it.
                    c = self.cache_cv.wait(c).expect("cg: cache lock poisoned");
                    continue;
                }
                // One read spans the needed granules (granules between them that are already
                // preserved are read too, but only `need` is taken from this read).
                let at = need.trailing_zeros() as usize * granule;
                let to = ((64 - need.leading_zeros()) as usize * granule).min(chunk_len);
                let len = to - at;
                if c.bytes + len > self.cfg.cow_cache_limit {
                    drop(c);
                    self.abandon(d.cg, AbandonReason::CacheFull);
                    return false;
                }
                c.bytes += len;
                c.peak = c.peak.max(c.bytes);
                // Tokens only need to be unique: a new slot takes the next one.
                let token = c.next_token;
                c.next_token += 1;
                let slot = c.slots.entry(i).or_insert_with(|| Slot {
                    token,
                    have: 0,
                    reading: 0,
                    pieces: Vec::new(),
                    reserved: 0,
                });
                slot.reading |= need;
                slot.reserved += len;
                let token = slot.token;
                break (token, need, at, len, c.spare.pop().unwrap_or_default());
            }
        };
        // Writes recorded before the swap may still be writing this chunk: reading it before
        // they finish would preserve a torn chunk.
        if !d.wait_quiesced() {
            self.end_reading(i, token, need, len, None);
            self.abandon(d.cg, AbandonReason::DrainTimeout);
            return false;
        }
        buf.clear();
        buf.resize(len, 0);
        match self
            .source
            .read_at(&mut buf, self.geometry.chunk_offset(i) + at as u64)
        {
            // The piece is in the cache before this write touches the disk: a drain that
            // reads the disk and then (under the cache lock) finds it overlays it.
            Ok(()) => {
                self.end_reading(i, token, need, len, Some((at, buf)));
                true
            }
            Err(e) => {
                self.end_reading(i, token, need, len, None);
                warn!(cg = d.cg, chunk = i, error = %e, "cg: cannot preserve chunk");
                self.abandon(d.cg, AbandonReason::PreserveFailed);
                false
            }
        }
    }

    /// A preserving read of granules `need` of chunk `i` ended: store the piece (`Some`) or
    /// give its reservation back. Nothing to do if the slot is gone (the chunk was handed
    /// out, or the CG stopped being strict: its reservation went with it).
    fn end_reading(
        &self,
        i: u64,
        token: u64,
        need: u64,
        len: usize,
        piece: Option<(usize, Vec<u8>)>,
    ) {
        let mut c = lock(&self.cache);
        let cache = &mut *c;
        if let Some(slot) = cache.slots.get_mut(&i).filter(|s| s.token == token) {
            slot.reading &= !need;
            match piece {
                Some((at, data)) => {
                    if slot.have == 0 {
                        cache.preserved += 1;
                    }
                    slot.have |= need;
                    slot.pieces.push((need, at, data));
                }
                None => {
                    slot.reserved -= len;
                    cache.bytes -= len;
                    if slot.have == 0 && slot.reading == 0 {
                        cache.slots.remove(&i);
                    }
                }
            }
        }
        drop(c);
        self.cache_cv.notify_all();
    }

    /// Ends copy-on-write for `drain`: under the cache lock (where writers decide), clear
    /// `strict` and drop every preserved image.
    pub(super) fn stop_cow(&self, drain: &Drain) {
        let mut c = lock(&self.cache);
        drain.strict.store(false, Ordering::SeqCst);
        c.slots.clear();
        c.bytes = 0;
        drop(c);
        self.cache_cv.notify_all();
    }
}
