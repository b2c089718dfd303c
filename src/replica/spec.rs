//! What a replica store is opened for: the consistency group's disks, in order.

use std::path::{Path, PathBuf};

use super::{Error, Result};

/// One disk of a group: its replica image and the primary disk's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The replica image (a file, or a block device).
    pub image: PathBuf,
    /// The primary disk's identity.
    pub uuid: [u8; 16],
    /// The disk's size in bytes.
    pub size: u64,
}

/// The disks of a consistency group, in the group's order (a disk's position is its index
/// in journal records and on the link), and the group's one chunk size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    /// The disks, 1 to [`crate::cg::MAX_DISKS`].
    pub disks: Vec<DiskSpec>,
    /// Tracking chunk size, the same for every disk.
    pub chunk_size: u64,
}

impl GroupSpec {
    /// A group of one disk.
    pub fn single(image: &Path, size: u64, chunk_size: u64, uuid: [u8; 16]) -> GroupSpec {
        GroupSpec {
            disks: vec![DiskSpec {
                image: image.to_path_buf(),
                uuid,
                size,
            }],
            chunk_size,
        }
    }

    pub(super) fn validate(&self) -> Result<()> {
        let n = self.disks.len();
        if n == 0 || n > crate::cg::MAX_DISKS {
            return Err(Error::InvalidArgument(format!(
                "a group has 1 to {} disks, not {n}",
                crate::cg::MAX_DISKS
            )));
        }
        for (i, a) in self.disks.iter().enumerate() {
            for (j, b) in self.disks[..i].iter().enumerate() {
                if b.image == a.image {
                    return Err(Error::InvalidArgument(format!(
                        "image {} is given twice (disks {j} and {i})",
                        a.image.display()
                    )));
                }
                if b.uuid == a.uuid {
                    return Err(Error::InvalidArgument(format!(
                        "disks {j} and {i} ({} and {}) have the same uuid: one disk cannot be \
                         replicated twice in a group",
                        b.image.display(),
                        a.image.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// One disk of the group kept in a state directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDisk {
    /// Disk identity.
    pub uuid: [u8; 16],
    /// Disk size.
    pub size: u64,
    /// The image it was last opened with (None for a replica written by a release that did
    /// not record it).
    pub image: Option<PathBuf>,
}

/// The group kept in a state directory ([`super::stored_group`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredGroup {
    /// Its disks, in order.
    pub disks: Vec<StoredDisk>,
    /// Its chunk size.
    pub chunk_size: u64,
}

impl StoredGroup {
    /// The spec that reopens this group with `images` (one per disk, in order).
    pub fn spec(&self, images: &[PathBuf]) -> Result<GroupSpec> {
        if images.len() != self.disks.len() {
            return Err(Error::InvalidArgument(format!(
                "the replica's group has {} disks, {} images were given: give every disk's \
                 image, in the group's order",
                self.disks.len(),
                images.len()
            )));
        }
        Ok(GroupSpec {
            disks: self
                .disks
                .iter()
                .zip(images)
                .map(|(d, image)| DiskSpec {
                    image: image.clone(),
                    uuid: d.uuid,
                    size: d.size,
                })
                .collect(),
            chunk_size: self.chunk_size,
        })
    }
}
