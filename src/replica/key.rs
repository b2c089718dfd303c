//! [`ChunkKey`]: which chunk of which disk of the group, as one ordered number.

/// A chunk of one disk of the consistency group: the disk's index in the top 8 bits, the
/// chunk's index below. Keys order by disk, then chunk: sorting the staged chunks puts each
/// disk's together, and a run of consecutive keys never crosses from one disk to the next
/// (the keys jump by 2^56 minus the disk's length).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey(u64);

const SHIFT: u32 = 56;

impl ChunkKey {
    /// Chunk `chunk` of disk `disk`. A disk has fewer than 2^56 chunks (`Geometry`'s
    /// chunks are at least 512 bytes and a disk's size is a `u64`).
    pub fn new(disk: u8, chunk: u64) -> ChunkKey {
        debug_assert!(chunk >> SHIFT == 0, "chunk {chunk} out of range");
        ChunkKey(u64::from(disk) << SHIFT | chunk)
    }

    /// The disk's index in the group.
    pub fn disk(self) -> u8 {
        (self.0 >> SHIFT) as u8
    }

    /// The chunk's index in its disk.
    pub fn chunk(self) -> u64 {
        self.0 & ((1 << SHIFT) - 1)
    }

    /// The key `n` chunks further on the same disk.
    pub fn plus(self, n: u64) -> ChunkKey {
        ChunkKey::new(self.disk(), self.chunk() + n)
    }

    /// The key `n` chunks earlier on the same disk.
    pub fn minus(self, n: u64) -> ChunkKey {
        ChunkKey::new(self.disk(), self.chunk() - n)
    }
}

impl std::fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "chunk {} of disk {}", self.chunk(), self.disk())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_by_disk_then_chunk_and_runs_stay_on_one_disk() {
        let last_of_0 = ChunkKey::new(0, (1 << SHIFT) - 1);
        let first_of_1 = ChunkKey::new(1, 0);
        assert!(last_of_0 < first_of_1);
        let k = ChunkKey::new(63, 1 << 40);
        assert_eq!((k.disk(), k.chunk()), (63, 1 << 40));
        assert_eq!(k.plus(5).minus(5), k);
        assert_eq!(ChunkKey::new(2, 9).to_string(), "chunk 9 of disk 2");
    }
}
