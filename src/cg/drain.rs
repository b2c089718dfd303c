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
use super::{AbandonReason, ChunkImage};

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
        warn!(
            cg,
            ?reason,
            "cg: strict consistency group abandoned; the secondary stays at CG {} until a later CG commits",
            c.last_committed
        );
    }

    /// Hands out the next chunk of the forming CG: `Ok(None)` when nothing is left to hand out
    /// now (or no CG is forming). Errors are disk read errors (the chunk stays to be shipped).
    ///
    /// Strict CG: waits (once) until writes recorded before the swap have finished, reads the
    /// chunk, then, under the cache lock, ships the preserved image instead if a writer
    /// preserved it meanwhile, and clears the OOS bit.
    pub fn next_chunk(&self) -> io::Result<Option<ChunkImage>> {
        let mut c = lock(&self.central);
        loop {
            let drain = match &c.mode {
                Mode::Idle => return Ok(None),
                Mode::Abandoned { cg } => {
                    let cg = *cg;
                    return self.next_abandoned(&mut c, cg);
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
            let Some(i) = c
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
            let len = self.chunk_len(i);
            let mut data = vec![0u8; len];
            self.source
                .read_at(&mut data, self.geometry.chunk_offset(i))?;
            {
                let mut cache = lock(&self.cache);
                // Happens-before: a writer puts its piece in the cache (under this lock)
                // before its disk write starts. If our read saw any of that write, the piece
                // was stored before our lock here and we overlay it; a granule that is not
                // preserved (or only being read) has not been written since the swap, so
                // what we read of it is its content at the freeze.
                if let Some(slot) = cache.slots.remove(&i) {
                    slot.overlay(&mut data, self.granule());
                    cache.bytes -= slot.reserved;
                }
                // Cleared under the cache lock: a writer that sees it clear knows the chunk
                // is captured and may write without preserving.
                c.oos.bits.clear(i);
            }
            c.cursor = i + 1;
            c.shipped.set(i);
            c.outstanding.insert(i, drain.cg);
            c.handed_out += 1;
            return Ok(Some(ChunkImage {
                cg: drain.cg,
                index: i,
                data,
            }));
        }
    }

    /// Abandoned CG: hand out OOS chunks while writes keep being recorded there. The bit is
    /// cleared *before* the read: a write in flight re-marks it when it finishes, so a chunk
    /// read while being written is handed out again (after its previous hand-out is
    /// confirmed, so one CG never has two versions of a chunk in flight).
    fn next_abandoned(&self, c: &mut Central, cg: u64) -> io::Result<Option<ChunkImage>> {
        let start = c.cursor;
        for (mut from, to) in [(start, self.chunks), (0, start)] {
            while let Some(i) = c.oos.bits.next_set_in(from, to) {
                from = i + 1;
                if c.outstanding.get(&i) == Some(&cg) {
                    continue;
                }
                c.oos.bits.clear(i);
                let mut buf = vec![0u8; self.chunk_len(i)];
                if let Err(e) = self.source.read_at(&mut buf, self.geometry.chunk_offset(i)) {
                    c.oos.bits.set(i);
                    return Err(e);
                }
                c.cursor = i + 1;
                c.shipped.set(i);
                c.outstanding.insert(i, cg);
                c.handed_out += 1;
                return Ok(Some(ChunkImage {
                    cg,
                    index: i,
                    data: buf,
                }));
            }
        }
        Ok(None)
    }

    /// The consumer has chunk `index` of CG `cg` (the secondary acknowledged it): it no longer
    /// counts as unconfirmed. Stale or duplicate confirmations are ignored.
    pub fn confirm(&self, cg: u64, index: u64) {
        let mut c = lock(&self.central);
        if c.outstanding.get(&index) == Some(&cg) {
            c.outstanding.remove(&index);
        }
    }
}
