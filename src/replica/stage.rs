//! Staging: extents of a CG are appended to the journal (not synced) until it commits.

use super::fault::CrashPoint;
use super::format::{self, Header, RecordType};
use super::journal::Entry;
use super::key::ChunkKey;
use super::{space, ChunkData, Error, ReplicaStore, Result, StageOutcome};

impl ReplicaStore {
    // ----- CG cycles -----

    /// Stage one chunk of disk 0 for CG `cg`: [`stage_extent`](Self::stage_extent) with
    /// `count == 1` (a shorthand for one-disk callers and tests).
    pub fn stage_chunk(
        &mut self,
        cg: u64,
        index: u64,
        data: ChunkData<'_>,
    ) -> Result<StageOutcome> {
        self.stage_extent(0, cg, index, 1, data)
    }

    /// Stage the extent of `count` chunks from chunk `first` of disk `disk` for CG `cg` in
    /// the journal: one record, appended, not synced. The extent must be one the disk's
    /// geometry allows (`Geometry::extent_len`: inside the disk and inside one extent
    /// region), and
    /// [`ChunkData::Bytes`] must hold exactly its bytes.
    ///
    /// Keeps only the newest version per chunk: newest CG wins, for equal CGs the later call
    /// wins. Chunks for which a newer CG is already staged keep it (the new record's bytes
    /// for them are dead); the outcome is [`StageOutcome::Superseded`] only if that holds
    /// for every chunk of the extent (nothing is written then).
    pub fn stage_extent(
        &mut self,
        disk: usize,
        cg: u64,
        first: u64,
        count: u64,
        data: ChunkData<'_>,
    ) -> Result<StageOutcome> {
        self.check_cycles("stage_extent")?;
        if cg == 0 {
            return Err(Error::InvalidArgument("CG numbers start at 1".into()));
        }
        self.check_extent(disk, first, count, &data)?;
        if self.joining(disk) {
            return Err(Error::InvalidState(format!(
                "stage_extent of disk {disk}, which is joining the group (its extents are \
                 copied with sync_extent until it joins)"
            )));
        }
        if cg <= self.st.last_committed_cg {
            return Ok(StageOutcome::AlreadyCommitted);
        }
        // `check_extent` checked `disk` against the group (at most `MAX_DISKS`, < 256).
        let key = |pos: u64| ChunkKey::new(disk as u8, first + pos);
        let takes = |s: &Self, pos: u64| s.staged.get(&key(pos)).is_none_or(|e| e.cg <= cg);
        if !(0..count).any(|pos| takes(self, pos)) {
            return Ok(StageOutcome::Superseded);
        }
        let data = match data {
            ChunkData::Bytes(b) if b.iter().all(|&x| x == 0) => ChunkData::Zero,
            d => d,
        };
        let record = format::HEADER_LEN as u64
            + match data {
                ChunkData::Bytes(b) => b.len() as u64,
                ChunkData::Zero => 0,
            };
        if let Err(free) = self.space.make_room(&self.dir, record) {
            // Refused before anything is written: the store stays usable.
            return Err(Error::NoSpace {
                dir: self.dir.clone(),
                cg,
                free,
                staged: self.live_bytes,
                needed: record,
                reserve: space::RESERVE,
            });
        }
        let image = &self.images[disk];
        if let Some(o) = &image.observer {
            // The group will overwrite this range: whoever keeps its old content can start
            // reading it now, while the rest of the group travels.
            let (off, len) = image.range(first, count);
            o.will_write(off, len);
        }
        self.guard(|s| {
            let (rt, payload): (_, &[u8]) = match data {
                ChunkData::Bytes(b) => (RecordType::Data, b),
                ChunkData::Zero => (RecordType::Zero, &[]),
            };
            // Fits: checked by check_extent.
            let len = payload.len() as u32;
            let h = Header::new(rt, s.journal.gen, cg, first, count, len).on_disk(disk as u8);
            // The record is appended before the index points at it; a crash in between
            // loses only uncommitted data, which recovery drops anyway.
            let off = s.journal.append(h, payload)?;
            let cs = s.chunk_size;
            for pos in 0..count {
                if !takes(s, pos) {
                    continue;
                }
                let e = Entry {
                    cg,
                    offset: off,
                    len,
                    count: count as u32,
                    pos: pos as u32,
                    zero: rt == RecordType::Zero,
                };
                if let Some(old) = s.staged.insert(key(pos), e) {
                    s.live_bytes -= old.live_bytes(cs);
                }
                s.live_bytes += e.live_bytes(cs);
            }
            s.fault.hit(CrashPoint::AfterStage)?;
            // Dead: what follows the last commit record and is not live (superseded or
            // abandoned records). Committed records before it are not counted: the next
            // checkpoint drops them (the CheckpointPolicy bounds them), and compacting them
            // would only force that checkpoint early, mid-group. `live_bytes`
            // over-estimates what the live chunks occupy (header shares are rounded up),
            // so `dead` can only under-estimate: saturate.
            let dead = (s.journal.len.saturating_sub(s.journal.committed_end))
                .saturating_sub(s.live_bytes);
            // `journal.new` holds the live bytes until the old journal is gone: without room
            // for them the compaction waits (the journal stays within its bound anyway, see
            // the module doc) rather than fail the group half-way.
            let dir = s.dir.clone();
            if dead > s.live_bytes
                && dead >= s.compact_min_dead
                && s.space.make_room(&dir, s.live_bytes).is_ok()
            {
                tracing::debug!(dead, live = s.live_bytes, "compacting staging journal");
                // Compaction keeps only staged chunks: committed records must first be
                // in the image durably.
                s.sync_image_and_state()?;
                s.journal.compact(&mut s.staged, cs, &s.fault)?;
                s.live_bytes = s.staged.values().map(|e| e.live_bytes(cs)).sum();
            }
            Ok(StageOutcome::Staged)
        })
    }

    /// Check that `disk` is in the group, that `count` chunks from `first` form a valid
    /// extent of it and that `data` fits it.
    pub(super) fn check_extent(
        &self,
        disk: usize,
        first: u64,
        count: u64,
        data: &ChunkData<'_>,
    ) -> Result<()> {
        let geo = self.image(disk)?.geo;
        let Some(len) = geo.extent_len(first, count) else {
            let n = geo.chunks();
            let why = if count == 0 {
                "it is empty".to_string()
            } else if first >= n || count > n - first {
                format!("it extends beyond the disk ({n} chunks)")
            } else {
                format!(
                    "it crosses an extent region boundary (regions of {} chunks)",
                    geo.extent_chunks()
                )
            };
            return Err(Error::InvalidArgument(format!(
                "extent of {count} chunks from chunk {first} is invalid: {why}"
            )));
        };
        if u32::try_from(len).is_err() {
            return Err(Error::InvalidArgument(format!(
                "extent of {count} chunks from chunk {first} has {len} bytes, too long for a \
                 journal record"
            )));
        }
        if let ChunkData::Bytes(b) = data {
            if b.len() != len {
                return Err(Error::InvalidArgument(format!(
                    "extent of {count} chunks from chunk {first} has {} bytes, expected {len}",
                    b.len()
                )));
            }
        }
        Ok(())
    }
}
