//! How a disk is cut into chunks, the unit that is tracked, shipped, journaled and applied:
//! one definition for the engine, the link and the replica store.

use thiserror::Error;

/// Smallest chunk the product accepts on the command line and on the link.
pub const MIN_CHUNK_SIZE: u64 = 4 << 10;
/// Largest chunk the product accepts (a chunk travels in one link frame).
pub const MAX_CHUNK_SIZE: u64 = 16 << 20;

/// Longest extent, in bytes, that travels, is journaled and is applied as one unit: the drain
/// coalesces contiguous dirty chunks into extents of at most this many bytes (or one chunk,
/// if chunks are larger), aligned so that an extent never crosses a multiple of it. The
/// alignment keeps every version of a chunk on the same link stream (see `link::proto`).
pub const MAX_EXTENT_BYTES: u64 = 1 << 20;

/// A disk of `disk_size` bytes in chunks of `chunk_size` (a power of two; the last chunk may
/// be short).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    disk_size: u64,
    chunk_size: u64,
}

/// A geometry that cannot be used.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum GeometryError {
    /// The disk has no bytes.
    #[error("the disk size is 0")]
    EmptyDisk,
    /// The chunk size is not a power of two (or does not fit in memory).
    #[error("chunk size {0} is not a power of two")]
    NotPowerOfTwo(u64),
    /// Outside what the command line and the link accept.
    #[error("chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE} bytes")]
    OutOfRange(u64),
}

/// Whether `chunk_size` is one the command line and the link accept: a power of two in
/// [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
pub fn check_chunk_size(chunk_size: u64) -> Result<(), GeometryError> {
    if !chunk_size.is_power_of_two() {
        return Err(GeometryError::NotPowerOfTwo(chunk_size));
    }
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(GeometryError::OutOfRange(chunk_size));
    }
    Ok(())
}

impl Geometry {
    /// A geometry; any power-of-two chunk size (tests and models use tiny chunks). Use
    /// [`Geometry::check_replicable`] for what the product accepts.
    pub fn new(disk_size: u64, chunk_size: u64) -> Result<Self, GeometryError> {
        if disk_size == 0 {
            return Err(GeometryError::EmptyDisk);
        }
        if !chunk_size.is_power_of_two() || usize::try_from(chunk_size).is_err() {
            return Err(GeometryError::NotPowerOfTwo(chunk_size));
        }
        Ok(Geometry {
            disk_size,
            chunk_size,
        })
    }

    /// Whether the chunk size is one the command line and the link accept.
    pub fn check_replicable(&self) -> Result<(), GeometryError> {
        check_chunk_size(self.chunk_size)
    }

    /// Bytes of the disk.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Bytes per chunk.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.disk_size.div_ceil(self.chunk_size)
    }

    /// Byte offset of chunk `index`.
    pub fn chunk_offset(&self, index: u64) -> u64 {
        index * self.chunk_size
    }

    /// Length of chunk `index` (the last one may be short); `None` past the end.
    pub fn chunk_len(&self, index: u64) -> Option<usize> {
        let start = index.checked_mul(self.chunk_size)?;
        if start >= self.disk_size {
            return None;
        }
        // Fits: at most chunk_size, which fits in usize (checked in `new`).
        Some((self.disk_size - start).min(self.chunk_size) as usize)
    }

    /// Chunks per extent region: an extent lies inside one aligned run of this many chunks.
    pub fn extent_chunks(&self) -> u64 {
        (MAX_EXTENT_BYTES / self.chunk_size).max(1)
    }

    /// The extent region that chunk `index` lies in.
    pub fn region_of(&self, index: u64) -> u64 {
        index / self.extent_chunks()
    }

    /// Bytes of the extent of `count` chunks from `first`, if it is one the product ships:
    /// `count >= 1`, inside the disk and inside one extent region.
    pub fn extent_len(&self, first: u64, count: u64) -> Option<usize> {
        let last = first.checked_add(count.checked_sub(1)?)?;
        if last >= self.chunks() || self.region_of(first) != self.region_of(last) {
            return None;
        }
        let end = (self.chunk_offset(last) + self.chunk_len(last)? as u64).min(self.disk_size);
        // Fits: at most MAX_EXTENT_BYTES or one chunk.
        Some((end - self.chunk_offset(first)) as usize)
    }

    /// Bytes of the largest extent of this disk (an extent region, or the whole disk if it is
    /// smaller): what one extent message or journal record can carry.
    pub fn max_extent_len(&self) -> usize {
        self.extent_len(0, self.extent_chunks().min(self.chunks()))
            .unwrap_or(0)
    }

    /// The chunks `first..=last` that bytes `[offset, offset + len)` touch (`len > 0`).
    pub fn chunks_of(&self, offset: u64, len: u64) -> (u64, u64) {
        (
            offset / self.chunk_size,
            (offset + len - 1) / self.chunk_size,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_and_lengths() {
        let g = Geometry::new(10, 4096).unwrap();
        assert_eq!(g.chunks(), 1);
        assert_eq!(g.chunk_len(0), Some(10));
        assert_eq!(g.chunk_len(1), None);
        let g = Geometry::new(8192 + 100, 4096).unwrap();
        assert_eq!(g.chunks(), 3);
        assert_eq!(g.chunk_len(1), Some(4096));
        assert_eq!(g.chunk_len(2), Some(100));
        assert_eq!(g.chunk_len(u64::MAX), None);
        assert_eq!(g.chunks_of(4095, 2), (0, 1));
        assert_eq!(g.chunk_offset(2), 8192);
        assert_eq!(g.extent_len(0, 3), Some(8192 + 100));
        assert_eq!(g.extent_len(2, 1), Some(100));
        assert_eq!(g.extent_len(2, 2), None);
        assert_eq!(g.extent_len(0, 0), None);
        let g = Geometry::new(4 << 20, 4096).unwrap();
        assert_eq!(g.extent_chunks(), 256);
        assert_eq!(g.extent_len(0, 256), Some(1 << 20));
        assert_eq!(g.extent_len(255, 2), None, "crosses a region boundary");
        assert_eq!(g.extent_len(256, 256), Some(1 << 20));
        assert_eq!(g.max_extent_len(), 1 << 20);
        assert_eq!(Geometry::new(10, 4096).unwrap().max_extent_len(), 10);
        let g = Geometry::new(64 << 20, 16 << 20).unwrap();
        assert_eq!(g.extent_chunks(), 1);
        assert_eq!(g.extent_len(1, 1), Some(16 << 20));
    }

    #[test]
    fn rules() {
        assert_eq!(Geometry::new(0, 4096), Err(GeometryError::EmptyDisk));
        assert_eq!(
            Geometry::new(1, 3000),
            Err(GeometryError::NotPowerOfTwo(3000))
        );
        assert_eq!(Geometry::new(1, 0), Err(GeometryError::NotPowerOfTwo(0)));
        assert!(Geometry::new(1, 8).unwrap().check_replicable().is_err());
        assert!(Geometry::new(1, 64 << 10)
            .unwrap()
            .check_replicable()
            .is_ok());
        assert!(Geometry::new(1, 32 << 20)
            .unwrap()
            .check_replicable()
            .is_err());
    }
}
