//! Applying a committed CG: its chunks are written into the image in place, the image is
//! fsynced, the state advanced and the journal reset.

use std::os::unix::fs::FileExt;

use super::fault::CrashPoint;
use super::journal::Entry;
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
            let mut entries: Vec<(u64, Entry)> = s.staged.iter().map(|(&i, &e)| (i, e)).collect();
            entries.sort_unstable_by_key(|(i, _)| *i);
            s.apply_entries(&entries)?;
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

    /// Write `entries` (sorted by index) into the image, re-verifying each record.
    pub(super) fn apply_entries(&mut self, entries: &[(u64, Entry)]) -> Result<()> {
        let mut buf = Vec::new();
        for (k, (index, e)) in entries.iter().enumerate() {
            self.fault.hit(CrashPoint::MidApply(k as u64))?;
            if e.zero {
                self.write_image(*index, ChunkData::Zero)?;
            } else {
                self.journal.read_entry(*index, e, &mut buf)?;
                self.write_image(*index, ChunkData::Bytes(&buf))?;
            }
        }
        Ok(())
    }

    pub(super) fn write_image(&self, index: u64, data: ChunkData<'_>) -> Result<()> {
        let off = self.geo.chunk_offset(index);
        let len = self.geo.chunk_len(index).unwrap_or(0) as u64;
        match data {
            ChunkData::Bytes(b) => self
                .image
                .write_all_at(b, off)
                .map_err(error::io("write image", &self.image_path)),
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
