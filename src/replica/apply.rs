//! Applying a committed CG: its chunks are written into the image in place (page cache
//! only), and at checkpoints the image is fsynced, the state advanced and the journal reset.
//!
//! # Why an apply need not fsync the image
//! Once `commit_durable` returns, the journal holds the CG durably, and recovery re-applies
//! every committed CG the journal holds (idempotently, newest version per chunk). So the
//! image may lag on stable storage as long as the journal keeps those records: the journal
//! is only reset (or compacted, which drops committed records) after the image has been
//! fsynced and `state.json` names the last committed CG — a *checkpoint*. Readers of the
//! image (tests, a drill) see the applied data at once: it is in the page cache.
//!
//! A checkpoint happens after an apply when the journal has grown past
//! [`CheckpointPolicy::max_journal_bytes`] or [`CheckpointPolicy::max_interval`] has passed,
//! and before anything resets or compacts the journal. The background writeback thread
//! (`flush.rs`) keeps the image's dirty pages few, so a checkpoint's fsync is short.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::fault::CrashPoint;
use super::flush::Touched;
use super::journal::{self, Entry};
use super::key::ChunkKey;
use super::{error, ChunkData, Error, ReplicaStore, Result};

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
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let Some((cg, frozen)) = self.pending_apply else {
            return Ok(());
        };
        self.guard(|s| {
            let t = Instant::now();
            let mut touched = Touched::default();
            if let Some(o) = &s.observer {
                o.before_writes(&s.staged_ranges());
            }
            let runs = s.apply_entries(&s.staged, &mut touched)?;
            let written = t.elapsed();
            let chunks = s.staged.len();
            if let Some(f) = &s.flusher {
                f.kick(touched);
            }
            // In memory only: the journal's commit record is what makes `cg` durable until
            // the next checkpoint writes it into state.json.
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen;
            s.pending_apply = None;
            s.clear_staged();
            let p = s.checkpoint_policy;
            let checkpoint = s.journal.len >= p.max_journal_bytes
                || s.last_checkpoint.elapsed() >= p.max_interval;
            if checkpoint {
                s.checkpoint()?;
            }
            tracing::debug!(cg, chunks, runs, ?written, checkpoint, total = ?t.elapsed(), "CG applied");
            Ok(())
        })
    }

    /// Make the image and `state.json` hold the last committed CG durably, then reset the
    /// journal. Nothing may be staged (the reset drops it). Callers run it inside `guard`.
    pub(super) fn checkpoint(&mut self) -> Result<()> {
        self.sync_image_and_state()?;
        self.fault.hit(CrashPoint::BeforeJournalReset)?;
        let (cg, frozen) = (self.st.last_committed_cg, self.st.frozen_at_unix_us);
        self.journal.reset(cg, frozen, &self.fault)
    }

    /// The first half of a checkpoint: fsync the image, then write `state.json` naming the
    /// last committed CG. The image is fsynced before the state says `cg`, and the state is
    /// written before the journal (still holding the commit records) is reset or compacted:
    /// a crash at any point leaves either the journal to replay or a state that needs none.
    /// Afterwards the journal's committed records are dead. Skipped when nothing was
    /// applied since the last one.
    pub(super) fn sync_image_and_state(&mut self) -> Result<()> {
        if self.journal.base_cg != self.st.last_committed_cg {
            self.fault.hit(CrashPoint::BeforeImageSync)?;
            self.image
                .sync_all()
                .map_err(error::io("fsync", &self.image_path))?;
            self.drop_image_cache();
            self.write_state()?;
            self.journal.base_cg = self.st.last_committed_cg;
            self.journal.base_frozen = self.st.frozen_at_unix_us;
        }
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Drop the image's (now clean) pages from the page cache. The secondary never reads
    /// its image in the cycle, and pages cached from large writes (the initial copy's
    /// 1 MiB extents) sit in large folios, which make each later 4 KiB write and its
    /// write-back walk the whole folio (several times slower). Best effort.
    pub(super) fn drop_image_cache(&self) {
        if let Err(e) = crate::sys::file::drop_clean_cache(&self.image) {
            tracing::debug!(image = %self.image_path.display(), error = %e, "could not drop the image's cached pages");
        }
    }

    /// Write the chunks of `entries` into the image: each distinct record is read (and
    /// re-verified) once, and its chunks in `entries` are written as runs of consecutive
    /// chunks, one write (or hole punch, for zeros) per run. Idempotent, in any order
    /// (every chunk has one entry), so a crash part-way is repaired by doing it again.
    /// Returns the number of runs written, and adds the byte range of each to `touched`
    /// (for the background writeback). [`CrashPoint::MidApply`]`(k)` fires before run `k`
    /// (counting from 0, in apply order: by record, then by chunk).
    pub(super) fn apply_entries(
        &self,
        entries: &HashMap<ChunkKey, Entry>,
        touched: &mut Touched,
    ) -> Result<u64> {
        let cs = self.geo.chunk_size();
        let mut buf = Vec::new();
        let mut k = 0u64;
        for group in journal::by_record(entries) {
            let (i0, e0) = group[0];
            if !e0.zero {
                self.journal.read_record(i0, &e0, &mut buf)?;
            }
            for run in journal::runs(&group) {
                self.fault.hit(CrashPoint::MidApply(k))?;
                k += 1;
                let (first, ef) = run[0];
                let (_, el) = run[run.len() - 1];
                let count = run.len() as u64;
                // One image until the store holds a group's (step 4 of
                // doc/design/multi-disk-groups.md): staging and the scan make only disk 0.
                debug_assert_eq!(first.disk(), 0, "{first}");
                let first = first.chunk();
                let (off, len) = self.image_range(first, count);
                touched.add(off, len);
                #[cfg(feature = "fault-injection")]
                if let Some(f) = crate::sys::fault_plan::apply() {
                    f.next_write()
                        .map_err(error::io("write image", &self.image_path))?;
                }
                if ef.zero {
                    self.write_image(first, count, ChunkData::Zero)?;
                } else {
                    let bytes = &buf[ef.payload_range(cs).start..el.payload_range(cs).end];
                    self.write_image(first, count, ChunkData::Bytes(bytes))?;
                }
            }
        }
        Ok(k)
    }

    /// The image ranges the staged chunks cover, sorted, runs of consecutive chunks merged.
    fn staged_ranges(&self) -> Vec<(u64, u64)> {
        let mut chunks: Vec<u64> = self.staged.keys().map(|k| k.chunk()).collect();
        chunks.sort_unstable();
        chunks
            .chunk_by(|a, b| a + 1 == *b)
            .map(|run| self.image_range(run[0], run.len() as u64))
            .collect()
    }

    /// The byte offset and length in the image of `count` chunks from `first` (contiguous,
    /// inside the disk).
    pub(super) fn image_range(&self, first: u64, count: u64) -> (u64, u64) {
        let off = self.geo.chunk_offset(first);
        let last = first + count - 1;
        let end = self.geo.chunk_offset(last) + self.geo.chunk_len(last).unwrap_or(0) as u64;
        (off, end - off)
    }

    /// Write `count` chunks from `first` (contiguous, inside the disk) into the image. The
    /// caller has told the observer (once per group in `apply_committed`, per extent in
    /// `sync_extent`).
    pub(super) fn write_image(&self, first: u64, count: u64, data: ChunkData<'_>) -> Result<()> {
        let (off, len) = self.image_range(first, count);
        match data {
            ChunkData::Bytes(b) => {
                debug_assert_eq!(b.len() as u64, len);
                self.image
                    .write_all_at(b, off)
                    .map_err(error::io("write image", &self.image_path))
            }
            ChunkData::Zero => {
                if self.image_is_file {
                    // Not a hole punch: the image keeps every block it was given at open,
                    // so applying a committed group never needs new space (module doc).
                    return crate::sys::file::zero_range_keep_allocated(&self.image, off, len)
                        .map_err(error::io("zero range in image", &self.image_path));
                }
                let zeros = vec![0u8; len as usize];
                self.image
                    .write_all_at(&zeros, off)
                    .map_err(error::io("write image", &self.image_path))
            }
        }
    }
}
