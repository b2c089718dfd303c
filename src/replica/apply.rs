//! Applying a committed CG: its chunks are written into the image in place (aligned runs
//! around the page cache, in one io_uring batch per image; the rest through it, without
//! fsync), and at checkpoints the image is fsynced, the state advanced and the journal reset.
//!
//! # Why an apply need not fsync the image
//! Once `commit_durable` returns, the journal holds the CG durably, and recovery re-applies
//! every committed CG the journal holds (idempotently, newest version per chunk). So the
//! image may lag on stable storage as long as the journal keeps those records: the journal
//! is only reset (or compacted, which drops committed records) after the image has been
//! fsynced and `state.json` names the last committed CG — a *checkpoint*. Readers of the
//! image (tests, a drill) see the applied data once the apply returns: it waits for its
//! O_DIRECT writes (which drop any cached copy of their pages) and the rest sit in the
//! page cache.
//!
//! A checkpoint happens after an apply when the journal has grown past
//! [`CheckpointPolicy::max_journal_bytes`] or [`CheckpointPolicy::max_interval`] has passed,
//! and before anything resets or compacts the journal. The background writeback thread
//! (`flush.rs`) keeps the image's dirty pages few, so a checkpoint's fsync is short.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::copies::RecordCopies;
use super::fault::CrashPoint;
use super::flush::Touched;
use super::journal::{self, Entry};
use super::key::ChunkKey;
use super::{ChunkData, Error, ReplicaStore, Result};

/// When an applied CG is made durable in the image itself (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// Checkpoint once the journal is at least this long (bounds its disk use and the
    /// replay on open).
    pub max_journal_bytes: u64,
    /// Checkpoint once this long has passed since the last one (bounds how stale
    /// `state.json` is).
    pub max_interval: Duration,
}

impl CheckpointPolicy {
    /// Checkpoint after every CG (the image and `state.json` always hold the last committed
    /// CG; slow: every CG waits for the image's fsync).
    pub const EVERY_CG: CheckpointPolicy = CheckpointPolicy {
        max_journal_bytes: 0,
        max_interval: Duration::ZERO,
    };
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        CheckpointPolicy {
            max_journal_bytes: 256 << 20,
            max_interval: Duration::from_secs(10),
        }
    }
}

impl ReplicaStore {
    /// Apply a CG made durable by `commit_durable`: write its chunks into the image and, if
    /// the [`CheckpointPolicy`] says so, checkpoint. No-op if nothing is pending.
    pub fn apply_committed(&mut self) -> Result<()> {
        self.apply_in_place()?;
        self.checkpoint_if_due()
    }

    /// The first half of [`apply_committed`](Self::apply_committed): write the CG made
    /// durable by `commit_durable` into the image (page cache). The journal still holds it,
    /// so acknowledging the primary here and checkpointing after
    /// ([`checkpoint_if_due`](Self::checkpoint_if_due)) is as safe as checkpointing first:
    /// a crash in between replays the journal. No-op if nothing is pending.
    pub fn apply_in_place(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let Some((cg, frozen)) = self.pending_apply else {
            return Ok(());
        };
        self.guard(|s| {
            let t = Instant::now();
            for (d, image) in s.images.iter().enumerate() {
                if let Some(o) = &image.observer {
                    o.before_writes(&s.staged_ranges(d));
                }
            }
            let mut touched: Vec<Touched> = s.images.iter().map(|_| Touched::default()).collect();
            let runs = s.apply_entries(&s.staged, Some(&s.copies), &mut touched)?;
            let written = t.elapsed();
            let chunks = s.staged.len();
            for (image, touched) in s.images.iter().zip(touched) {
                image.kick(touched);
            }
            // In memory only: the journal's commit record is what makes `cg` durable until
            // the next checkpoint writes it into state.json.
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen;
            s.pending_apply = None;
            s.clear_staged();
            tracing::debug!(cg, chunks, runs, ?written, total = ?t.elapsed(), "CG applied");
            Ok(())
        })
    }

    /// The second half of [`apply_committed`](Self::apply_committed): checkpoint if the
    /// [`CheckpointPolicy`] says so. Nothing may be staged since the apply (a checkpoint
    /// resets the journal); then it does nothing.
    pub fn checkpoint_if_due(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let p = self.checkpoint_policy;
        let due = self.journal.len >= p.max_journal_bytes
            || self.last_checkpoint.elapsed() >= p.max_interval;
        if !due || self.pending_apply.is_some() || !self.staged.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        self.guard(|s| s.checkpoint())?;
        tracing::debug!(cg = self.st.last_committed_cg, took = ?t.elapsed(), "checkpoint");
        Ok(())
    }

    /// Make the image and `state.json` hold the last committed CG durably, then reset the
    /// journal. Nothing may be staged (the reset drops it). Callers run it inside `guard`.
    pub(super) fn checkpoint(&mut self) -> Result<()> {
        self.sync_image_and_state()?;
        self.reset_journal_to_state()
    }

    /// A checkpoint that writes `state.json` even when nothing was applied since the last
    /// one (the state changed otherwise: a disk joined the group).
    pub(super) fn checkpoint_writing_state(&mut self) -> Result<()> {
        self.sync_images_then_state()?;
        self.reset_journal_to_state()
    }

    /// The second half of a checkpoint: the journal's committed records are dead.
    fn reset_journal_to_state(&mut self) -> Result<()> {
        self.fault.hit(CrashPoint::BeforeJournalReset)?;
        let (cg, frozen) = (self.st.last_committed_cg, self.st.frozen_at_unix_us);
        self.journal.reset(cg, frozen, &self.fault)
    }

    /// The first half of a checkpoint: fsync the images, then write `state.json` naming the
    /// last committed CG. Every image is fsynced before the state says `cg`, and the state is
    /// written before the journal (still holding the commit records) is reset or compacted:
    /// a crash at any point leaves either the journal to replay or a state that needs none.
    /// Afterwards the journal's committed records are dead. Skipped when nothing was
    /// applied since the last one.
    pub(super) fn sync_image_and_state(&mut self) -> Result<()> {
        if self.journal.base_cg != self.st.last_committed_cg {
            return self.sync_images_then_state();
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// fsync every image, then write `state.json`: the journal's base is the state's group.
    fn sync_images_then_state(&mut self) -> Result<()> {
        self.fault.hit(CrashPoint::BeforeImageSync)?;
        self.sync_images()?;
        for image in &self.images {
            image.drop_cache();
        }
        self.write_state()?;
        self.journal.base_cg = self.st.last_committed_cg;
        self.journal.base_frozen = self.st.frozen_at_unix_us;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// fsync every image, in the group's order. Until the last one is done, nothing says
    /// the group is at a newer CG (`state.json` is written after this; the journal keeps the
    /// commit records): a crash between two images' fsyncs
    /// ([`CrashPoint::BetweenImageSyncs`]`(k)`: images `0..k` durable) is repaired by the
    /// replay, which rewrites every disk's chunks.
    pub(super) fn sync_images(&self) -> Result<()> {
        for (k, image) in self.images.iter().enumerate() {
            if k > 0 {
                self.fault.hit(CrashPoint::BetweenImageSyncs(k as u64))?;
            }
            image.sync()?;
        }
        Ok(())
    }

    /// Write the chunks of `entries` into the images: each distinct record is read (and
    /// re-verified) once, or taken from `copies` (what the commit of these entries read
    /// and verified), and its chunks in `entries` are written as runs of consecutive
    /// chunks, one write (or hole punch, for zeros) per run. Idempotent, in any order
    /// (every chunk has one entry), so a crash part-way is repaired by doing it again.
    /// Returns the number of runs written, and adds the byte range of each to its image's
    /// `touched` (for the background writeback). [`CrashPoint::MidApply`]`(k)` fires before run `k`
    /// (counting from 0, in apply order: by record, then by chunk).
    pub(super) fn apply_entries(
        &self,
        entries: &HashMap<ChunkKey, Entry>,
        copies: Option<&RecordCopies>,
        touched: &mut [Touched],
    ) -> Result<u64> {
        let written = self.write_entries(entries, copies, touched);
        // Whatever happened, every queued run is written before this returns: a later
        // batch must never carry this apply's runs (and a failed apply is repeated whole).
        let mut finished = Ok(());
        for image in &self.images {
            if let Err(e) = image.finish_batch() {
                finished = finished.and(Err(e));
            }
        }
        let k = written?;
        finished.map(|()| k)
    }

    /// The body of [`apply_entries`](Self::apply_entries): runs that can be are queued on
    /// their image's batch (see `DiskImage::write_batched`), which the caller finishes.
    fn write_entries(
        &self,
        entries: &HashMap<ChunkKey, Entry>,
        copies: Option<&RecordCopies>,
        touched: &mut [Touched],
    ) -> Result<u64> {
        let cs = self.chunk_size;
        let mut read = Vec::new();
        let mut k = 0u64;
        for group in journal::by_record(entries) {
            let (i0, e0) = group[0];
            let kept = copies.and_then(|c| c.get(e0.offset));
            let buf: &[u8] = match kept {
                Some(b) => b,
                None if e0.zero => &[],
                None => {
                    self.journal.read_record(i0, &e0, &mut read)?;
                    &read
                }
            };
            for run in journal::runs(&group) {
                self.fault.hit(CrashPoint::MidApply(k))?;
                k += 1;
                let (first, ef) = run[0];
                let (_, el) = run[run.len() - 1];
                let count = run.len() as u64;
                // Staging and the scan check every key's disk against the group.
                let d = usize::from(first.disk());
                let image = self.image(d)?;
                let first = first.chunk();
                let (off, len) = image.range(first, count);
                #[cfg(feature = "fault-injection")]
                if let Some(f) = crate::sys::fault_plan::apply() {
                    f.next_write()
                        .map_err(super::error::io("write image", &image.path))?;
                }
                if ef.zero {
                    image.write(first, count, ChunkData::Zero)?;
                    touched[d].add(off, len);
                } else {
                    let bytes = &buf[ef.payload_range(cs).start..el.payload_range(cs).end];
                    // Entries have one chunk each, so the runs of one apply never overlap.
                    if !image.write_batched(first, count, bytes)? {
                        image.write(first, count, ChunkData::Bytes(bytes))?;
                        touched[d].add(off, len);
                    }
                }
            }
        }
        Ok(k)
    }

    /// The ranges of disk `disk`'s image the staged chunks cover, sorted, runs of
    /// consecutive chunks merged.
    fn staged_ranges(&self, disk: usize) -> Vec<(u64, u64)> {
        let mut chunks: Vec<u64> = self
            .staged
            .keys()
            .filter(|k| usize::from(k.disk()) == disk)
            .map(|k| k.chunk())
            .collect();
        chunks.sort_unstable();
        chunks
            .chunk_by(|a, b| a + 1 == *b)
            .map(|run| self.images[disk].range(run[0], run.len() as u64))
            .collect()
    }
}
