//! The group's members: adding a disk, which joins by an initial copy while the members go
//! on committing groups and becomes part of the group's cut at the first group committed
//! after its copy; and taking one out, which leaves it holding the group it left at.
//!
//! # Removing (`remove_disks`)
//! A checkpoint first: every image holds the last committed group durably and the journal
//! holds nothing, so no record names a disk by an index that is about to shift. Then one
//! state write drops the disks and lists them under `removed` with that group. A crash
//! before it leaves the group as it was; after it, the smaller group.
//!
//! # Steps, and why every crash leaves the group consistent
//! 1. `add_disk`: a checkpoint (nothing of a group is left in the journal), then the disk is
//!    appended to the group as *joining* in `state.json`. Its image is no part of any cut:
//!    the group's state and its members are unchanged.
//! 2. The primary copies the whole disk in the next group. Its extents go straight into its
//!    image (`sync_extent`, as an initial sync does); the members' extents are staged and
//!    committed as always.
//! 3. `finish_joins(cg)`, after group `cg` committed and applied: every image is fsynced,
//!    then `state.json` says the disk is a member at `cg` (with the members' images
//!    fsynced too, the journal's committed records are dead and it is reset). A crash
//!    before that state write leaves the disk joining (the primary copies it again at the
//!    next connection); after it, a member holding `cg` like the others.
//!
//! The disk's copy is group `cg` (the primary marks the whole disk at the connection, and
//! the next group it forms carries all of it), so at that commit it holds `cg` exactly.

use super::image::DiskImage;
use super::journal::Geometry;
use super::state::{uuid_hex, DiskEntry, Mode, RemovedDisk};
use super::{DiskSpec, Error, ReplicaStore, Result};

impl ReplicaStore {
    /// Appends the disk `spec` to the consistent group as joining (see the module docs);
    /// its image must exist at least as large as the disk. Returns its index. A group still
    /// syncing (no cut yet) takes it as one more disk to copy.
    pub fn add_disk(&mut self, spec: &DiskSpec) -> Result<usize> {
        let syncing = matches!(self.st.mode, Mode::Syncing { .. });
        if !syncing {
            self.check_cycles("add_disk")?;
        }
        self.check_usable()?;
        if !self.staged.is_empty() {
            return Err(Error::InvalidState(
                "add_disk while a group is staged (discard it first)".into(),
            ));
        }
        let n = self.images.len();
        if n >= crate::cg::MAX_DISKS {
            return Err(Error::InvalidArgument(format!(
                "the group has {n} disks already, the most there can be"
            )));
        }
        let uuid = uuid_hex(&spec.uuid);
        if self.st.disks.iter().any(|d| d.uuid == uuid) {
            return Err(Error::InvalidArgument(format!(
                "disk {uuid} is in the group already"
            )));
        }
        if self.images.iter().any(|i| i.path == spec.image) {
            return Err(Error::InvalidArgument(format!(
                "image {} is in the group already",
                spec.image.display()
            )));
        }
        let geo = Geometry::new(spec.size, self.chunk_size).map_err(|e| {
            Error::InvalidArgument(format!(
                "disk {} (size {}) / chunk size {}: {e}",
                spec.image.display(),
                spec.size,
                self.chunk_size
            ))
        })?;
        let image = DiskImage::open(&spec.image, geo, false)?;
        self.guard(|s| {
            if let Mode::Syncing { total_chunks } = &mut s.st.mode {
                // No cut yet: the disk is copied with the others.
                *total_chunks += geo.chunks();
            } else {
                // Nothing of a group in the journal: its records name disks by index, and
                // the group's shape changes now.
                s.checkpoint()?;
            }
            s.images.push(image);
            s.st.disks.push(DiskEntry {
                uuid,
                size: spec.size,
                image: Some(spec.image.clone()),
                joining: (!syncing).then_some(geo.chunks()),
            });
            s.write_state()?;
            tracing::info!(disk = n, image = %spec.image.display(), "a disk joins the group: it is copied in full, then it is part of the group's next cut");
            Ok(n)
        })
    }

    /// Disk `disk` is joining the group (not part of its cut yet).
    pub fn joining(&self, disk: usize) -> bool {
        self.st.disks.get(disk).is_some_and(|d| d.joining.is_some())
    }

    /// A joining disk's copy: (chunks received, chunks in all); None for a member.
    pub fn join_progress(&self, disk: usize) -> Option<(u64, u64)> {
        let total = self.st.disks.get(disk)?.joining?;
        Some((self.images[disk].synced.min(total), total))
    }

    /// The identity of disk `disk` as the state names it: (uuid, size).
    pub fn disk_identity(&self, disk: usize) -> Option<([u8; 16], u64)> {
        let d = self.st.disks.get(disk)?;
        Some((super::identity::parse_uuid(&d.uuid)?, d.size))
    }

    /// After group `cg` committed and was applied: the joining disks, whose copy that group
    /// carried, become members at `cg` (see the module docs). No-op without joining disks.
    pub fn finish_joins(&mut self, cg: u64) -> Result<()> {
        self.check_cycles("finish_joins")?;
        if !self.st.disks.iter().any(|d| d.joining.is_some()) {
            return Ok(());
        }
        if cg != self.st.last_committed_cg || self.st.mode != Mode::Consistent {
            return Err(Error::InvalidState(format!(
                "finish_joins({cg}) while the group is at CG {}",
                self.st.last_committed_cg
            )));
        }
        self.guard(|s| {
            // A disk joins once its whole copy arrived (the primary ships all of it in the
            // first group after it connects); one still short stays joining.
            let joined: Vec<usize> = (0..s.st.disks.len())
                .filter(|&d| s.join_progress(d).is_some_and(|(done, all)| done >= all))
                .collect();
            for &d in &joined {
                s.st.disks[d].joining = None;
            }
            for d in (0..s.st.disks.len()).filter(|&d| s.joining(d)) {
                tracing::warn!(disk = d, progress = ?s.join_progress(d), cg, "group committed without this joining disk's whole copy: it stays joining");
            }
            // In memory only so far: the checkpoint fsyncs every image before the state
            // names them members (also when the apply's own checkpoint already wrote `cg`).
            s.checkpoint_writing_state()?;
            for d in joined {
                s.images[d].clear_synced();
                tracing::info!(disk = d, image = %s.images[d].path.display(), cg, "the disk joined the group: it holds CG {cg} like the others");
            }
            Ok(())
        })
    }

    /// Takes disks `disks` (indices) out of the consistent group; the others keep their
    /// order. Each removed image is left holding the last committed group (see the module
    /// docs). Returns that group.
    pub fn remove_disks(&mut self, disks: &[usize]) -> Result<u64> {
        self.check_cycles("remove_disks")?;
        if !self.staged.is_empty() {
            return Err(Error::InvalidState(
                "remove_disks while a group is staged (discard it first)".into(),
            ));
        }
        let n = self.images.len();
        if let Some(&d) = disks.iter().find(|&&d| d >= n) {
            return Err(Error::InvalidArgument(format!(
                "disk {d} is not in the group (it has {n} disks)"
            )));
        }
        let mut gone: Vec<usize> = disks.to_vec();
        gone.sort_unstable();
        gone.dedup();
        if gone.len() == n {
            return Err(Error::InvalidArgument(
                "a group keeps at least one disk: to stop replicating, stop the secondary".into(),
            ));
        }
        self.guard(|s| {
            s.checkpoint()?;
            let cg = s.st.last_committed_cg;
            for &d in gone.iter().rev() {
                let image = s.images.remove(d);
                let entry = s.st.disks.remove(d);
                if let Some(o) = &image.observer {
                    o.closed();
                }
                tracing::info!(disk = d, image = %image.path.display(), cg, "the disk leaves the group: its image holds CG {cg} and is not written any more");
                s.st.removed.push(RemovedDisk {
                    uuid: entry.uuid,
                    image: Some(image.path.clone()),
                    left_at_cg: if entry.joining.is_some() { 0 } else { cg },
                });
            }
            s.write_state()?;
            Ok(cg)
        })
    }
}
