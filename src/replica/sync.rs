//! Initial / re-synchronisation: chunks are written straight into the image, which is
//! knowingly inconsistent until `finish_sync`.

use super::fault::CrashPoint;
use super::state::Mode;
use super::{ChunkData, Error, ReplicaStore, Result};

impl ReplicaStore {
    // ----- initial / re-synchronisation -----

    /// Start a full or incremental sync: the image becomes knowingly inconsistent.
    /// Allowed in any state (also to rejoin as secondary after a promotion). Drops
    /// anything staged.
    pub fn begin_sync(&mut self, total_chunks: u64) -> Result<()> {
        self.check_usable()?;
        self.guard(|s| {
            s.st.mode = Mode::Syncing { total_chunks };
            // The whole group is copied: a disk that was joining is copied with it.
            s.st.disks.iter_mut().for_each(|d| d.joining = None);
            s.st.last_committed_cg = 0;
            s.st.frozen_at_unix_us = 0;
            s.write_state()?;
            s.clear_staged();
            s.journal.reset(0, 0, &s.fault)?;
            s.images.iter_mut().for_each(|i| i.clear_synced());
            s.sync_done_count = 0;
            Ok(())
        })
    }

    /// Write one chunk of disk 0 of the sync set directly into its image (not synced yet; a
    /// shorthand for one-disk callers and tests).
    pub fn sync_chunk(&mut self, index: u64, data: &[u8]) -> Result<()> {
        self.sync_extent(0, index, 1, ChunkData::Bytes(data))
    }

    /// Sync a chunk of disk 0 that reads as zeros.
    pub fn sync_zero(&mut self, index: u64) -> Result<()> {
        self.sync_extent(0, index, 1, ChunkData::Zero)
    }

    /// Write the extent of `count` chunks from `first` of disk `disk` of the sync set
    /// directly into its image (not synced yet; `finish_sync` fsyncs) and count its chunks
    /// as received: while the group syncs, or while that disk joins the group (see
    /// `join.rs`). The extent must be valid (`Geometry::extent_len`) and `Bytes` must hold
    /// exactly its bytes.
    pub fn sync_extent(
        &mut self,
        disk: usize,
        first: u64,
        count: u64,
        data: ChunkData<'_>,
    ) -> Result<()> {
        self.check_usable()?;
        self.check_extent(disk, first, count, &data)?;
        if !matches!(self.st.mode, Mode::Syncing { .. }) && !self.joining(disk) {
            return Err(Error::InvalidState(format!(
                "sync_extent of disk {disk} while {:?} (it is a member of the group)",
                self.state()
            )));
        }
        let image = &self.images[disk];
        if let Some(o) = &image.observer {
            let (off, len) = image.range(first, count);
            o.before_write(off, len);
        }
        self.guard(|s| {
            let image = &mut s.images[disk];
            image.write_uncached(first, count, data)?;
            s.sync_done_count += image.mark_synced(first, count);
            s.fault.hit(CrashPoint::AfterSyncChunk)
        })
    }

    /// End the sync: every image now holds CG `cg` (the sync set was formed as that CG).
    /// Fsyncs the images, then records `Consistent { cg }` durably.
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
            s.sync_images()?;
            for image in &s.images {
                image.drop_cache();
            }
            s.fault.hit(CrashPoint::BeforeFinishSyncState)?;
            s.st.mode = Mode::Consistent;
            s.st.disks.iter_mut().for_each(|d| d.joining = None);
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen_at_unix_us;
            s.write_state()?;
            s.journal.reset(cg, frozen_at_unix_us, &s.fault)
        })
    }
}
