//! The virtio-blk device model: feature bits, limits and the config space drblk advertises.
//!
//! What is advertised here and what [`crate::blk::request`] accepts come from the same
//! [`DeviceLimits`], so the two cannot drift apart.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Sector size of the virtio-blk protocol (request offsets are in 512-byte units).
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer (the serial number), per the virtio spec.
pub const ID_BYTES: usize = 20;
/// Size of `struct virtio_blk_config` up to and including `write_zeroes_may_unmap` + padding.
pub const CONFIG_SPACE_SIZE: usize = 60;
/// Byte offset of `wce` (writeback cache enable) in the config space.
pub const CONFIG_WCE_OFFSET: u32 = 32;

/// Request limits shared by the config space and the request validator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Logical block size in bytes.
    pub logical_block_size: u32,
    /// Maximum data segments in one request (the virtqueue size minus header and status).
    pub seg_max: u32,
    /// Maximum sectors in one discard segment.
    pub max_discard_sectors: u32,
    /// Maximum segments in one discard request.
    pub max_discard_seg: u32,
    /// Maximum sectors in one write-zeroes segment.
    pub max_write_zeroes_sectors: u32,
    /// Maximum segments in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Whether the disk is read-only.
    pub readonly: bool,
}

impl DeviceLimits {
    /// Limits for a disk of `size` bytes served on `num_queues` queues of `queue_size` entries.
    pub fn new(
        size: u64,
        logical_block_size: u32,
        num_queues: u16,
        queue_size: u16,
        readonly: bool,
    ) -> Self {
        DeviceLimits {
            capacity_sectors: size / SECTOR_SIZE,
            logical_block_size,
            seg_max: u32::from(queue_size).saturating_sub(2).max(1),
            // 1 GiB per segment keeps a single fallocate call short.
            max_discard_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_discard_seg: 16,
            max_write_zeroes_sectors: (1 << 30) / SECTOR_SIZE as u32,
            max_write_zeroes_seg: 16,
            num_queues,
            readonly,
        }
    }

    /// The virtio feature bits drblk offers.
    pub fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_CONFIG_WCE)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_MQ);
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }

    /// Encodes `struct virtio_blk_config` (little endian, fields at their spec offsets).
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let put = |c: &mut [u8; CONFIG_SPACE_SIZE], off: usize, v: &[u8]| {
            c[off..off + v.len()].copy_from_slice(v)
        };
        let block_sectors = self.logical_block_size / SECTOR_SIZE as u32;
        put(&mut c, 0, &self.capacity_sectors.to_le_bytes());
        // size_max (8) stays 0: the feature is not offered.
        put(&mut c, 12, &self.seg_max.to_le_bytes());
        // geometry (16..20) unused.
        put(&mut c, 20, &self.logical_block_size.to_le_bytes());
        // physical_block_exp = 0, alignment_offset = 0 (24, 25).
        put(&mut c, 26, &1u16.to_le_bytes()); // min_io_size in logical blocks
        put(&mut c, 28, &1u32.to_le_bytes()); // opt_io_size in logical blocks
        c[CONFIG_WCE_OFFSET as usize] = u8::from(writeback);
        put(&mut c, 34, &self.num_queues.to_le_bytes());
        put(&mut c, 36, &self.max_discard_sectors.to_le_bytes());
        put(&mut c, 40, &self.max_discard_seg.to_le_bytes());
        put(&mut c, 44, &block_sectors.to_le_bytes()); // discard_sector_alignment
        put(&mut c, 48, &self.max_write_zeroes_sectors.to_le_bytes());
        put(&mut c, 52, &self.max_write_zeroes_seg.to_le_bytes());
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn config_offsets_match_the_kernel_header() {
        assert_eq!(offset_of!(virtio_blk_config, capacity), 0);
        assert_eq!(offset_of!(virtio_blk_config, seg_max), 12);
        assert_eq!(offset_of!(virtio_blk_config, blk_size), 20);
        assert_eq!(offset_of!(virtio_blk_config, min_io_size), 26);
        assert_eq!(offset_of!(virtio_blk_config, opt_io_size), 28);
        assert_eq!(
            offset_of!(virtio_blk_config, wce),
            CONFIG_WCE_OFFSET as usize
        );
        assert_eq!(offset_of!(virtio_blk_config, num_queues), 34);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_sectors), 36);
        assert_eq!(offset_of!(virtio_blk_config, max_discard_seg), 40);
        assert_eq!(offset_of!(virtio_blk_config, discard_sector_alignment), 44);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_sectors), 48);
        assert_eq!(offset_of!(virtio_blk_config, max_write_zeroes_seg), 52);
        assert_eq!(offset_of!(virtio_blk_config, write_zeroes_may_unmap), 56);
    }

    #[test]
    fn readonly_hides_discard() {
        let l = DeviceLimits::new(1 << 20, 512, 2, 256, true);
        assert_ne!(l.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(l.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        let c = l.config_space(true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
    }
}
