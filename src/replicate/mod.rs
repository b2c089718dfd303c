//! The primary's half of replication: the [`cycle`] that forms, drains and commits
//! consistency groups, and the sinks it ships them to — the [`shipper`] (the link to a
//! secondary, with its resync decisions) and the [`local`] replica.

pub mod compare;
pub mod cycle;
pub mod local;
pub mod shipper;

use crate::blk::disk::Disk;
use crate::cg::ChunkSource;

/// The drain reads the primary's image directly.
impl ChunkSource for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Disk::read_at(self, buf, offset)
    }
}
