//! Staging: chunks of a CG are appended to the journal (not synced) until it commits.

use super::fault::CrashPoint;
use super::format::{self, Header, RecordType};
use super::journal::Entry;
use super::{ChunkData, Error, ReplicaStore, Result, StageOutcome};

impl ReplicaStore {
    // ----- CG cycles -----

    /// Stage one chunk of CG `cg` in the journal (appended, not synced). Keeps only the
    /// newest version per chunk (newest CG wins; for equal CGs the later call wins).
    pub fn stage_chunk(
        &mut self,
        cg: u64,
        index: u64,
        data: ChunkData<'_>,
    ) -> Result<StageOutcome> {
        self.check_cycles("stage_chunk")?;
        if cg == 0 {
            return Err(Error::InvalidArgument("CG numbers start at 1".into()));
        }
        self.check_chunk(index, &data)?;
        if cg <= self.st.last_committed_cg {
            return Ok(StageOutcome::AlreadyCommitted);
        }
        if self.staged.get(&index).is_some_and(|e| e.cg > cg) {
            return Ok(StageOutcome::Superseded);
        }
        let data = match data {
            ChunkData::Bytes(b) if b.iter().all(|&x| x == 0) => ChunkData::Zero,
            d => d,
        };
        self.guard(|s| {
            let (rt, payload): (_, &[u8]) = match data {
                ChunkData::Bytes(b) => (RecordType::Data, b),
                ChunkData::Zero => (RecordType::Zero, &[]),
            };
            let len = payload.len() as u32;
            let off = s
                .journal
                .append(Header::new(rt, s.journal.gen, cg, index, 0, len), payload)?;
            let e = Entry {
                cg,
                offset: off,
                len,
                zero: rt == RecordType::Zero,
            };
            if let Some(old) = s.staged.insert(index, e) {
                s.live_bytes -= old.record_len();
            }
            s.live_bytes += e.record_len();
            s.fault.hit(CrashPoint::AfterStage)?;
            let dead = s.journal.len - format::HEADER_LEN as u64 - s.live_bytes;
            if dead > s.live_bytes && dead >= s.compact_min_dead {
                tracing::debug!(dead, live = s.live_bytes, "compacting staging journal");
                s.journal.compact(&mut s.staged, &s.fault)?;
            }
            Ok(StageOutcome::Staged)
        })
    }

    pub(super) fn check_chunk(&self, index: u64, data: &ChunkData<'_>) -> Result<()> {
        if index >= self.geo.chunks() {
            return Err(Error::InvalidArgument(format!(
                "chunk {index} beyond the disk ({} chunks)",
                self.geo.chunks()
            )));
        }
        if let ChunkData::Bytes(b) = data {
            if Some(b.len()) != self.geo.chunk_len(index) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {index} has {} bytes, expected {}",
                    b.len(),
                    self.geo.chunk_len(index).unwrap_or(0)
                )));
            }
        }
        Ok(())
    }
}
