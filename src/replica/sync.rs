//! Initial / re-synchronisation: chunks are written straight into the image, which is
//! knowingly inconsistent until `finish_sync`.

use super::fault::CrashPoint;
use super::state::Mode;
use super::{error, ChunkData, Error, ReplicaStore, Result};

impl ReplicaStore {
    // ----- initial / re-synchronisation -----

    /// Start a full or incremental sync: the image becomes knowingly inconsistent.
    /// Allowed in any state (also to rejoin as secondary after a promotion). Drops
    /// anything staged.
    pub fn begin_sync(&mut self, total_chunks: u64) -> Result<()> {
        self.check_usable()?;
        self.guard(|s| {
            s.st.mode = Mode::Syncing { total_chunks };
            s.st.last_committed_cg = 0;
            s.st.frozen_at_unix_us = 0;
            s.write_state()?;
            s.clear_staged();
            s.journal.reset(0, 0, &s.fault)?;
            s.sync_done.iter_mut().for_each(|w| *w = 0);
            s.sync_done_count = 0;
            Ok(())
        })
    }

    /// Write one chunk of the sync set directly into the image (not synced yet).
    pub fn sync_chunk(&mut self, index: u64, data: &[u8]) -> Result<()> {
        self.sync_extent(index, 1, ChunkData::Bytes(data))
    }

    /// Sync a chunk that reads as zeros.
    pub fn sync_zero(&mut self, index: u64) -> Result<()> {
        self.sync_extent(index, 1, ChunkData::Zero)
    }

    /// Write the extent of `count` chunks from `first` of the sync set directly into the
    /// image (not synced yet; `finish_sync` fsyncs) and count its chunks as received. The
    /// extent must be valid (`Geometry::extent_len`) and `Bytes` must hold exactly its bytes.
    pub fn sync_extent(&mut self, first: u64, count: u64, data: ChunkData<'_>) -> Result<()> {
        self.check_usable()?;
        if !matches!(self.st.mode, Mode::Syncing { .. }) {
            return Err(Error::InvalidState(format!(
                "sync_extent while {:?}",
                self.state()
            )));
        }
        self.check_extent(first, count, &data)?;
        if let Some(o) = &self.observer {
            let (off, len) = self.image_range(first, count);
            o.before_write(off, len);
        }
        self.guard(|s| {
            s.write_image(first, count, data)?;
            for index in first..first + count {
                let (w, b) = ((index / 64) as usize, 1u64 << (index % 64));
                if s.sync_done[w] & b == 0 {
                    s.sync_done[w] |= b;
                    s.sync_done_count += 1;
                }
            }
            s.fault.hit(CrashPoint::AfterSyncChunk)
        })
    }

    /// End the sync: the image now holds CG `cg` (the sync set was formed as that CG).
    /// Fsyncs the image, then records `Consistent { cg }` durably.
    pub fn finish_sync(&mut self, cg: u64, frozen_at_unix_us: u64) -> Result<()> {
        self.check_usable()?;
        if !matches!(self.st.mode, Mode::Syncing { .. }) {
            return Err(Error::InvalidState(format!(
                "finish_sync while {:?}",
                self.state()
            )));
        }
        if cg == 0 {
            return Err(Error::InvalidArgument("CG numbers start at 1".into()));
        }
        self.guard(|s| {
            s.image
                .sync_all()
                .map_err(error::io("fsync", &s.image_path))?;
            s.drop_image_cache();
            s.fault.hit(CrashPoint::BeforeFinishSyncState)?;
            s.st.mode = Mode::Consistent;
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen_at_unix_us;
            s.write_state()?;
            s.journal.reset(cg, frozen_at_unix_us, &s.fault)
        })
    }
}
