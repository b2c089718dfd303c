//! Applying a committed CG: its chunks are written into the image in place, the image is
//! fsynced, the state advanced and the journal reset.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;

use super::fault::CrashPoint;
use super::journal::{self, Entry};
use super::{error, ChunkData, Error, ReplicaStore, Result};

impl ReplicaStore {
    /// Apply a CG made durable by `commit_durable`: write its chunks into the image,
    /// fsync, record the new state, reset the journal. No-op if nothing is pending.
    pub fn apply_committed(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let Some((cg, frozen)) = self.pending_apply else {
            return Ok(());
        };
        self.guard(|s| {
            let runs = s.apply_entries(&s.staged)?;
            tracing::trace!(cg, runs, chunks = s.staged.len(), "CG written to the image");
            // The image is fsynced before the state says `cg`, and the state is written
            // before the journal (still holding the commit record) is reset: a crash at any
            // point leaves either the journal to replay or a state that needs none.
            s.fault.hit(CrashPoint::BeforeImageSync)?;
            s.image
                .sync_all()
                .map_err(error::io("fsync", &s.image_path))?;
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen;
            s.write_state()?;
            s.fault.hit(CrashPoint::BeforeJournalReset)?;
            s.pending_apply = None;
            s.clear_staged();
            s.journal.reset(cg, frozen, &s.fault)?;
            tracing::debug!(cg, "CG applied");
            Ok(())
        })
    }

    /// Write the chunks of `entries` into the image: each distinct record is read (and
    /// re-verified) once, and its chunks in `entries` are written as runs of consecutive
    /// chunks, one write (or hole punch, for zeros) per run. Idempotent, in any order
    /// (every chunk has one entry), so a crash part-way is repaired by doing it again.
    /// Returns the number of runs written. [`CrashPoint::MidApply`]`(k)` fires before run
    /// `k` (counting from 0, in apply order: by record, then by chunk).
    pub(super) fn apply_entries(&self, entries: &HashMap<u64, Entry>) -> Result<u64> {
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

    /// Write `count` chunks from `first` (contiguous, inside the disk) into the image.
    pub(super) fn write_image(&self, first: u64, count: u64, data: ChunkData<'_>) -> Result<()> {
        let off = self.geo.chunk_offset(first);
        let last = first + count - 1;
        let end = self.geo.chunk_offset(last) + self.geo.chunk_len(last).unwrap_or(0) as u64;
        let len = end - off;
        match data {
            ChunkData::Bytes(b) => {
                debug_assert_eq!(b.len() as u64, len);
                self.image
                    .write_all_at(b, off)
                    .map_err(error::io("write image", &self.image_path))
            }
            ChunkData::Zero => {
                if self.image_is_file {
                    match crate::sys::file::punch_hole(&self.image, off, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if crate::sys::file::is_unsupported(&e) => {}
                        Err(e) => {
                            return Err(error::io("punch hole in image", &self.image_path)(e))
                        }
                    }
                }
                let zeros = vec![0u8; len as usize];
                self.image
                    .write_all_at(&zeros, off)
                    .map_err(error::io("write image", &self.image_path))
            }
        }
    }
}
