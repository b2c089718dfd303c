//! TEMPORARY until the replica-extents branch lands: per-chunk fallbacks of the extent API.

use super::{ChunkData, ReplicaStore, Result, StageOutcome};

impl ReplicaStore {
    /// Temporary.
    pub fn stage_extent(
        &mut self,
        cg: u64,
        first: u64,
        count: u64,
        data: ChunkData<'_>,
    ) -> Result<StageOutcome> {
        let cs = self.geo.chunk_size() as usize;
        let mut out = StageOutcome::Superseded;
        for k in 0..count {
            let d = match data {
                ChunkData::Bytes(b) => {
                    let at = k as usize * cs;
                    ChunkData::Bytes(&b[at..(at + cs).min(b.len())])
                }
                ChunkData::Zero => ChunkData::Zero,
            };
            out = self.stage_chunk(cg, first + k, d)?;
        }
        Ok(out)
    }

    /// Temporary.
    pub fn sync_extent(&mut self, first: u64, count: u64, data: ChunkData<'_>) -> Result<()> {
        let cs = self.geo.chunk_size() as usize;
        for k in 0..count {
            match data {
                ChunkData::Bytes(b) => {
                    let at = k as usize * cs;
                    self.sync_chunk(first + k, &b[at..(at + cs).min(b.len())])?
                }
                ChunkData::Zero => self.sync_zero(first + k)?,
            }
        }
        Ok(())
    }
}
