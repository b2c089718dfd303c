//! The drain of a CG: handing out its chunks (after quiescence, overlaying preserved
//! granules), confirmations, and abandonment of a strict CG that cannot finish.

use std::io;
use std::mem;
use std::sync::Arc;
use std::time::Instant;

use tracing::warn;

use super::engine::{Central, Engine, Mode};
use super::record::Record;
use super::sync::{lock, AtomicBool, Ordering};
use super::{AbandonReason, Extent};

/// Per-CG drain context, shared with the queue workers that record into its CR.
pub(super) struct Drain {
    pub(super) cg: u64,
    /// The OOS being drained.
    pub(super) oos: Arc<Record>,
    /// Every record that writes may have been recorded in before the swap (OOS and records
    /// forwarded into it): the drain must not read the disk before they are all idle.
    pub(super) pre_swap: Vec<Arc<Record>>,
    /// True while the CG is strict (copy-on-write active). Cleared under the cache lock.
    pub(super) strict: AtomicBool,
    /// The CG was formed right after an abandoned one: a write from before the swap may still
    /// re-mark an OOS bit that was cleared, so an OOS bit is only final after quiescence.
    pub(super) remark_possible: bool,
    /// All `pre_swap` records were seen idle (monotonic: nothing records there any more).
    pub(super) quiesced: AtomicBool,
    pub(super) deadline: Instant,
}

impl Drain {
    /// Waits until every write recorded before the swap has finished (bounded by the drain
    /// deadline). Returns false on timeout.
    pub(super) fn wait_quiesced(&self) -> bool {
        if self.quiesced.load(Ordering::SeqCst) {
            return true;
        }
        if !self.pre_swap.iter().all(|r| r.wait_idle(self.deadline)) {
            return false;
        }
        self.quiesced.store(true, Ordering::SeqCst);
        true
    }

    pub(super) fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst) || self.pre_swap.iter().all(|r| r.inflight() == 0)
    }
}

impl Engine {
    /// Abandons CG `cg` if it is the strict one.
    ///
    /// Not if the CG has meanwhile become ready (every chunk captured, nothing left to
    /// protect): a writer decides to abandon under the cache lock and takes the central lock
    /// only afterwards, and the drain may have captured its chunk — and the shipper seen
    /// `is_ready` and sent the commit — in between. Its chunk bit is then clear, so the write
    /// may proceed unpreserved. `is_ready` and this check both hold the central lock, and a
    /// ready CG stays ready (no bit of its OOS can be set once it is quiesced), so a CG that
    /// `is_ready` reported is never abandoned afterwards except by `link_lost`.
    pub(super) fn abandon(&self, cg: u64, reason: AbandonReason) {
        let mut c = lock(&self.central);
        let ready = match &c.mode {
            Mode::Strict { drain, .. } if drain.cg == cg => {
                drain.is_quiesced() && c.oos.bits.count() == 0
            }
            _ => return,
        };
        if !ready {
            self.abandon_locked(&mut c, reason);
        }
    }

    /// Abandons CG `cg` because another disk of its [`Group`](super::Group) did, even if it
    /// is ready here: the group sends the commit only once every disk is ready, so no commit
    /// of `cg` was sent (the exemption of [`Engine::abandon`] protects a commit sent).
    pub(super) fn abandon_for_group(&self, cg: u64) {
        let mut c = lock(&self.central);
        if matches!(&c.mode, Mode::Strict { drain, .. } if drain.cg == cg) {
            self.abandon_locked(&mut c, AbandonReason::OtherDisk);
        }
    }

    /// Strict → abandoned: stop copy-on-write, record into OOS, forward CR into OOS. The
    /// guest never waits for this beyond one queue lock at a time.
    pub(super) fn abandon_locked(&self, c: &mut Central, reason: AbandonReason) {
        let cg = match &c.mode {
            Mode::Strict { drain, .. } => drain.cg,
            _ => return,
        };
        let Mode::Strict { drain, cr } = mem::replace(&mut c.mode, Mode::Abandoned { cg }) else {
            return;
        };
        self.stop_cow(&drain);
        // Queues first, then the forwarding: after the retarget no write is recorded in CR,
        // and every mark made in CR under a queue lock is visible to `forward_into`.
        self.retarget_queues(&c.oos);
        cr.forward_into(&c.oos);
        c.retired.push(cr);
        c.abandoned[reason as usize] += 1;
        // Once a minute at most: a secondary that keeps failing groups (retried with a
        // backoff) must not fill the log.
        static LOG: crate::sys::log_limit::LogLimiter =
            crate::sys::log_limit::LogLimiter::new(std::time::Duration::from_secs(60));
        if let Some(a) = LOG.admit() {
            warn!(
                cg,
                ?reason,
                "cg: strict consistency group abandoned; the secondary stays at CG {} until a later CG commits{}",
                c.last_committed,
                a.note()
            );
        }
    }

    /// Hands out the next extent of the forming CG — a run of contiguous dirty chunks inside
    /// one extent region ([`Geometry::extent_chunks`](crate::geometry::Geometry::extent_chunks)),
    /// read with one read into `buf[..extent.len]` (`buf` is grown once to the largest
    /// extent and reused: nothing is allocated or zeroed per extent). `Ok(None)` when
    /// nothing is left to hand out now (or no CG is forming). Errors are disk read errors
    /// (the chunks stay to be shipped).
    ///
    /// Strict CG: waits (once) until writes recorded before the swap have finished, reads the
    /// run, then, under the cache lock, overlays the images of chunks a writer preserved
    /// meanwhile, and clears their OOS bits.
    pub fn next_extent(&self, buf: &mut Vec<u8>) -> io::Result<Option<Extent>> {
        let max = self.max_extent_len();
        if buf.len() < max {
            buf.resize(max, 0);
        }
        let mut c = lock(&self.central);
        loop {
            let drain = match &c.mode {
                Mode::Idle => return Ok(None),
                Mode::Abandoned { cg } => {
                    let cg = *cg;
                    return self.next_abandoned(&mut c, cg, buf);
                }
                Mode::Strict { drain, .. } => Arc::clone(drain),
            };
            if !drain.is_quiesced() {
                // Wait for the pre-swap writes WITHOUT the central lock: a writer holding a
                // pre-swap ticket may need that lock (to abandon a CG whose cache filled up)
                // before it can finish its write and drop the ticket. Quiescence is
                // monotonic, so re-checking the mode after re-locking is enough.
                drop(c);
                let quiesced = drain.wait_quiesced();
                c = lock(&self.central);
                if !quiesced && matches!(&c.mode, Mode::Strict { drain: d, .. } if d.cg == drain.cg)
                {
                    self.abandon_locked(&mut c, AbandonReason::DrainTimeout);
                }
                continue;
            }
            let start = c.cursor;
            let Some(first) = c
                .oos
                .bits
                .next_set_in(start, self.chunks)
                .or_else(|| c.oos.bits.next_set_in(0, start))
            else {
                return Ok(None);
            };
            if Instant::now() > drain.deadline {
                self.abandon_locked(&mut c, AbandonReason::DrainTimeout);
                continue;
            }
            // Once quiesced, nothing sets a bit of this OOS any more (writes go to CR): the
            // run found now is the run we clear below.
            let count = c.oos.bits.run_len(first, self.region_end(first));
            let len = self.extent_len(first, count);
            let data = &mut buf[..len];
            self.source
                .read_at(data, self.geometry.chunk_offset(first))?;
            {
                let mut cache = lock(&self.cache);
                // Happens-before: a writer puts its piece in the cache (under this lock)
                // before its disk write starts. If our read saw any of that write, the piece
                // was stored before our lock here and we overlay it; a granule that is not
                // preserved (or only being read) has not been written since the swap, so
                // what we read of it is its content at the freeze.
                if !cache.slots.is_empty() {
                    let cs = self.cfg.chunk_size as usize;
                    for i in first..first + count {
                        if let Some(slot) = cache.slots.remove(&i) {
                            let at = (i - first) as usize * cs;
                            let end = (at + self.chunk_len(i)).min(len);
                            slot.overlay(&mut data[at..end], self.granule());
                            cache.bytes -= slot.reserved;
                            cache.recycle(slot);
                        }
                    }
                }
                // Cleared under the cache lock: a writer that sees it clear knows the chunk
                // is captured and may write without preserving.
                c.oos.bits.clear_range(first, first + count - 1);
            }
            return Ok(Some(self.hand_out(&mut c, drain.cg, first, count, len)));
        }
    }

    /// Records the hand-out of an extent (shipped since the last commit, unconfirmed).
    fn hand_out(&self, c: &mut Central, cg: u64, first: u64, count: u64, len: usize) -> Extent {
        c.cursor = first + count;
        c.shipped.add(first, count);
        c.outstanding.push((first, count, cg));
        c.handed_out += count;
        c.extents_handed_out += 1;
        Extent {
            disk: 0,
            cg,
            first,
            count,
            len,
        }
    }

    /// Abandoned CG: hand out OOS runs while writes keep being recorded there. The bits are
    /// cleared *before* the read: a write in flight re-marks them when it finishes, so a
    /// chunk read while being written is handed out again (after its previous hand-out is
    /// confirmed, so one CG never has two versions of a chunk in flight).
    fn next_abandoned(
        &self,
        c: &mut Central,
        cg: u64,
        buf: &mut [u8],
    ) -> io::Result<Option<Extent>> {
        let start = c.cursor;
        for (mut from, to) in [(start, self.chunks), (0, start)] {
            while let Some(first) = c.oos.bits.next_set_in(from, to) {
                from = first + 1;
                if c.is_outstanding(first, cg) {
                    continue;
                }
                let mut count = c.oos.bits.run_len(first, self.region_end(first));
                // Stop before a chunk whose earlier version of this CG is unconfirmed.
                if let Some(k) = (1..count).find(|&k| c.is_outstanding(first + k, cg)) {
                    count = k;
                }
                let last = first + count - 1;
                c.oos.bits.clear_range(first, last);
                let len = self.extent_len(first, count);
                if let Err(e) = self
                    .source
                    .read_at(&mut buf[..len], self.geometry.chunk_offset(first))
                {
                    c.oos.bits.set_range(first, last);
                    return Err(e);
                }
                return Ok(Some(self.hand_out(c, cg, first, count, len)));
            }
        }
        Ok(None)
    }

    /// End (exclusive) of the extent region of chunk `i`.
    fn region_end(&self, i: u64) -> u64 {
        let per = self.geometry.extent_chunks();
        ((self.geometry.region_of(i) + 1) * per).min(self.chunks)
    }

    /// Bytes of a run the drain found (inside one region and the disk by construction).
    fn extent_len(&self, first: u64, count: u64) -> usize {
        self.geometry
            .extent_len(first, count)
            .expect("cg: a run lies inside one region of the disk")
    }

    /// Bytes of the largest extent (the size of the drain's buffer).
    pub fn max_extent_len(&self) -> usize {
        self.geometry.max_extent_len()
    }

    /// Convenience for tests and simple consumers: [`Engine::next_extent`] into a fresh
    /// buffer, returned with the extent.
    pub fn next_extent_owned(&self) -> io::Result<Option<(Extent, Vec<u8>)>> {
        let mut buf = Vec::new();
        Ok(self.next_extent(&mut buf)?.map(|e| {
            buf.truncate(e.len);
            (e, buf)
        }))
    }

    /// The consumer has chunks `first..first + count` of CG `cg` (the sink took them): they
    /// no longer count as unconfirmed. Usually one whole extent; any part of one works too.
    /// Stale or duplicate confirmations are ignored.
    pub fn confirm(&self, cg: u64, first: u64, count: u64) {
        let end = first.saturating_add(count);
        let mut c = lock(&self.central);
        // The drain confirms each extent whole: no allocation on that path.
        if let Some(k) = c.outstanding.iter().position(|&o| o == (first, count, cg)) {
            c.outstanding.swap_remove(k);
            return;
        }
        let mut kept = Vec::with_capacity(c.outstanding.len());
        for &(f, n, g) in &c.outstanding {
            if g != cg || f + n <= first || end <= f {
                kept.push((f, n, g));
                continue;
            }
            // Keep the parts of this hand-out the confirmation does not cover.
            if f < first {
                kept.push((f, first - f, g));
            }
            if end < f + n {
                kept.push((end, f + n - end, g));
            }
        }
        c.outstanding = kept;
    }
}

impl Central {
    /// Whether chunk `i` was handed out for CG `cg` and not confirmed yet.
    fn is_outstanding(&self, i: u64, cg: u64) -> bool {
        self.outstanding
            .iter()
            .any(|&(f, n, g)| g == cg && (f..f + n).contains(&i))
    }

    /// Chunks handed out and not confirmed.
    pub(super) fn unconfirmed(&self) -> u64 {
        self.outstanding.iter().map(|&(_, n, _)| n).sum()
    }
}

/// One hand-out as the engine's tests look at it: an extent with its bytes.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkImage {
    pub(crate) cg: u64,
    /// First chunk.
    pub(crate) index: u64,
    pub(crate) count: u64,
    pub(crate) data: Vec<u8>,
}

#[cfg(test)]
impl Engine {
    /// [`Engine::next_extent`] into a fresh buffer, as one image.
    pub(crate) fn next_chunk(&self) -> io::Result<Option<ChunkImage>> {
        Ok(self.next_extent_owned()?.map(|(e, data)| ChunkImage {
            cg: e.cg,
            index: e.first,
            count: e.count,
            data,
        }))
    }
}

#[cfg(all(test, not(feature = "loom")))]
impl ChunkImage {
    /// The image cut into one image per chunk (`chunk_size` bytes each).
    pub(crate) fn split(self, chunk_size: u64) -> Vec<ChunkImage> {
        self.data
            .chunks(chunk_size as usize)
            .enumerate()
            .map(|(k, d)| ChunkImage {
                cg: self.cg,
                index: self.index + k as u64,
                count: 1,
                data: d.to_vec(),
            })
            .collect()
    }
}
