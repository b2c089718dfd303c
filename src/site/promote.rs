//! `drblk promote`: failover. Turns a replica into a disk a VM can boot from: the journal
//! is recovered to the last committed CG, the replica's generation ends there and a new
//! one begins, and the disk is left ready for `drblk serve`, which tracks every change from
//! the promotion point.
//!
//! # Steps, and why a crash between any two is safe
//! 1. Open the replica store (crash recovery: the image holds the last committed CG).
//! 2. Mark the store promoted (`state.json`; a link loss's checkpoint first): from here no
//!    primary can replicate into it.
//! 3. Write each disk's identity next to its image (`IMAGE.drblk-id`, the replicated disk's
//!    uuid), so `drblk serve` replicates it as the same disk.
//! 4. Write each disk an empty, clean change record acknowledged at the CG: the promoted
//!    side ships only what it writes after the promotion.
//! 5. Write the lineage (role promoted, one new generation for the whole group): this is
//!    what lets `drblk serve` write the images, so it comes last — the other disks' first,
//!    the first disk's (the group's anchor) last. A crash before the anchor's leaves
//!    disks `drblk serve` still refuses; running `drblk promote` again redoes 3–5 (each is
//!    idempotent), and only an anchor promoted means the whole group is.
//!
//! A group of several disks (`drblk secondary --disk A --disk B`) is promoted as one: one
//! state write makes every image the same group, and each disk gets the steps above.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::lineage::{short, Lineage, Role};
use crate::replica::{Error as StoreError, ReplicaState, ReplicaStore};

/// What a promotion did.
#[derive(Debug, Clone)]
pub struct Promotion {
    /// The promoted images, in the group's order (one for a single disk).
    pub images: Vec<PathBuf>,
    /// The CG the image holds (0 for a forced promotion of a syncing replica).
    pub cg: u64,
    /// When the primary froze that CG (Unix microseconds; 0 if unknown).
    pub frozen_at_unix_us: u64,
    /// A forced promotion of a replica still syncing: (chunks copied, chunks in all).
    pub inconsistent: Option<(u64, u64)>,
    /// The lineage after the promotion.
    pub lineage: Lineage,
    /// The generation that ended.
    pub previous: Option<[u8; 16]>,
    /// It was promoted already; nothing changed.
    pub already: bool,
    /// Besides the CG it holds writes of its own (an old primary taken in as a replica
    /// whose own writes were not overwritten yet).
    pub own_writes: bool,
}

impl Promotion {
    /// What `drblk promote` prints.
    pub fn report(&self) -> String {
        let img = self
            .images
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ");
        if self.already {
            return format!(
                "{img} was already promoted at CG {} ({}); nothing changed",
                self.lineage.since_cg,
                self.lineage.describe()
            );
        }
        let mut s = match self.inconsistent {
            Some((done, total)) => format!(
                "promoted {img} although it was still syncing ({done} of {total} chunks copied): \
                 it mixes old and new blocks, and a filesystem on it may need repair or may not mount"
            ),
            None if self.cg == 0 => format!(
                "promoted {img}: it holds no group of the primary's (it was taken in to be resynced and none has committed): its content is this disk's own earlier state"
            ),
            None => {
                let when = if self.frozen_at_unix_us > 0 {
                    let t = std::time::UNIX_EPOCH
                        + std::time::Duration::from_micros(self.frozen_at_unix_us);
                    let age = crate::sys::clock::now_unix_micros()
                        .saturating_sub(self.frozen_at_unix_us);
                    format!(
                        "{} ({:.1} s ago)",
                        humantime::format_rfc3339_millis(t),
                        age as f64 / 1e6
                    )
                } else {
                    "an unknown time".into()
                };
                format!(
                    "promoted {img} at CG {}: it holds the primary's writes up to {when}; data the primary wrote after that is not here",
                    self.cg
                )
            }
        };
        if self.own_writes {
            s.push_str(
                "\nit also holds writes of its own from before it rejoined, not yet overwritten by the primary's: the next replication from it compares the disks by checksums",
            );
        }
        let serve: String = if self.images.len() == 1 {
            format!("it with: drblk serve --disk {img} --socket SOCKET")
        } else {
            self.images.iter().enumerate().fold(
                "them as one group with: drblk serve".to_string(),
                |s, (i, p)| format!("{s} --disk {} --socket SOCKET{i}", p.display()),
            )
        };
        s.push_str(&format!(
            "\nnew generation {}{}\nserve {serve} [--replicate-to ...]",
            short(&self.lineage.generation),
            self.previous
                .map(|g| format!(" (generation {} ends at CG {})", short(&g), self.cg))
                .unwrap_or_default()
        ));
        s
    }
}

/// `drblk promote` on a stopped secondary: opens the replica in `state_dir` (whose images
/// are `images`, in the group's order) and promotes it. A running secondary holds the
/// replica's lock; promote it through its control socket.
pub fn promote_offline(
    images: &[PathBuf],
    state_dir: &Path,
    force: bool,
) -> anyhow::Result<Promotion> {
    let image = images
        .first()
        .context("no image to promote: give the replica's --disk")?;
    let lineage = Lineage::load(image)?;
    match &lineage {
        Some(l) if l.role == Role::Primary => bail!(
            "{} is a primary disk ({}), not a replica: there is nothing to promote",
            image.display(),
            l.describe()
        ),
        Some(l) if l.role == Role::Demoted && images.len() == 1 => {
            // A demoted primary (its successor lost): it holds its CG of demotion exactly.
            let promoted = l.promoted(l.since_cg);
            promoted.store(image)?;
            tracing::info!(disk = %image.display(), lineage = %promoted.describe(), "demoted disk promoted");
            return Ok(Promotion {
                images: images.to_vec(),
                cg: l.since_cg,
                frozen_at_unix_us: 0,
                inconsistent: None,
                previous: Some(l.generation),
                lineage: promoted,
                already: false,
                own_writes: false,
            });
        }
        _ => {}
    }
    let group = crate::replica::stored_group(state_dir)?.with_context(|| {
        format!(
            "{} holds no replica (no state.json): {} is not a replica kept by `drblk secondary` \
             with this state directory (pass the one it used with --state-dir)",
            state_dir.display(),
            image.display()
        )
    })?;
    let spec = group.spec(images).with_context(|| {
        format!(
            "the replica in {} is a group of {} disks: give each of its images with --disk, in \
             the order `drblk secondary` was given them",
            state_dir.display(),
            group.disks.len()
        )
    })?;
    let (mut store, report) = ReplicaStore::open(&spec, state_dir).map_err(|e| match e {
        StoreError::Locked(dir) => anyhow::anyhow!(
            "the replica in {} is in use (a running `drblk secondary`, or another promote): \
             promote it through that secondary's control socket (`drblk ctl --control PATH promote`), or stop it first",
            dir.display()
        ),
        e => anyhow::Error::from(e).context(format!("recovering the replica in {}", state_dir.display())),
    })?;
    // Opened (and locked) first: no secondary runs on it now, so a drill's files are an
    // earlier run's and go (the promoted disk never held drill writes).
    let drills = crate::drill::drill_dir(state_dir);
    crate::drill::remove_stale(&drills, true)
        .with_context(|| format!("removing an old drill in {}", drills.display()))?;
    tracing::info!(?report, state = ?store.state(), "replica recovered for promotion");
    let uuids: Vec<_> = group.disks.iter().map(|d| d.uuid).collect();
    promote_store(&mut store, &uuids, lineage, force)
}

/// Promotes an open replica store (see the module docs for the steps); `uuids` are its
/// disks' identities, in order. `lineage` is the first image's lineage as loaded (every
/// image of a group holds the same).
pub fn promote_store(
    store: &mut ReplicaStore,
    uuids: &[[u8; 16]],
    lineage: Option<Lineage>,
    force: bool,
) -> anyhow::Result<Promotion> {
    let images: Vec<PathBuf> = (0..store.disks())
        .map(|d| store.image_path(d).to_path_buf())
        .collect();
    anyhow::ensure!(
        uuids.len() == images.len(),
        "{} disk identities for a group of {} disks",
        uuids.len(),
        images.len()
    );
    let image = &images[0];
    // A disk still joining the group holds a partial copy, no group of the primary's.
    let joining: Vec<String> = (0..images.len())
        .filter_map(|d| {
            store.join_progress(d).map(|(done, all)| {
                format!("{} ({done} of {all} chunks copied)", images[d].display())
            })
        })
        .collect();
    if !joining.is_empty() {
        if !force {
            bail!(
                "{} still joining the group: its copy is not finished, it holds no group of the \
                 primary's. Pass --force to promote the group anyway (the other disks hold \
                 the group; that disk a mix of old and new blocks)",
                joining.join(" and ")
            );
        }
        tracing::warn!(disks = %joining.join(", "), "promoting a group with a disk still joining (--force): that disk is a mix of old and new blocks");
    }
    let (cg, frozen_at_unix_us, inconsistent) = match store.state() {
        ReplicaState::Promoted => {
            let cg = store.last_committed_cg().unwrap_or(0);
            if let Some(l) = lineage.as_ref().filter(|l| l.role == Role::Promoted) {
                return Ok(Promotion {
                    images: images.clone(),
                    cg: l.since_cg,
                    frozen_at_unix_us: 0,
                    inconsistent: None,
                    previous: l.history.first().map(|a| a.generation),
                    lineage: l.clone(),
                    already: true,
                    own_writes: false,
                });
            }
            // An earlier promote stopped between its steps: finish it.
            (cg, 0, None)
        }
        ReplicaState::Syncing {
            done_chunks,
            total_chunks,
        } => {
            if !force {
                bail!(
                    "{} is still syncing ({done_chunks} of {total_chunks} chunks copied): it is \
                     not a consistent copy of any moment of the primary, and a filesystem on it \
                     may need repair or may not mount. Pass --force to promote it anyway",
                    image.display()
                );
            }
            store.promote_inconsistent()?;
            (0, 0, Some((done_chunks, total_chunks)))
        }
        ReplicaState::Consistent {
            cg,
            frozen_at_unix_us,
        } => {
            store.promote()?;
            (cg, frozen_at_unix_us, None)
        }
    };
    let mut own_writes = false;
    for (d, (image, uuid)) in images.iter().zip(uuids).enumerate() {
        crate::replica::identity::store(image, uuid)?;
        let record = crate::track::default_record_path(image);
        // A record next to a replica lists an old primary's own writes that a rejoin has
        // not overwritten yet: the image is CG `cg` plus those, so no empty record may claim
        // it is exactly `cg`. Without a record the next replication compares by checksums.
        let own = record.exists();
        own_writes |= own;
        if own || cg == 0 {
            match std::fs::remove_file(&record) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(
                        anyhow::Error::from(e).context(format!("removing {}", record.display()))
                    )
                }
            }
        } else {
            crate::track::write_empty(&record, *uuid, store.disk_size(d), store.chunk_size(), cg)
                .with_context(|| format!("writing the change record {}", record.display()))?;
        }
    }
    let base = lineage.unwrap_or_else(|| {
        // A replica kept by a drblk without lineages: its generation is unknown.
        Lineage::replica_of(crate::lineage::new_generation(), &[])
    });
    let promoted = base.promoted(cg);
    // The anchor last: once it says promoted, every disk is (see the module docs).
    for image in images.iter().skip(1).chain(&images[..1]) {
        promoted.store(image)?;
        tracing::info!(disk = %image.display(), cg, lineage = %promoted.describe(), "replica promoted");
    }
    Ok(Promotion {
        images,
        cg,
        frozen_at_unix_us,
        inconsistent,
        previous: Some(base.generation),
        lineage: promoted,
        already: false,
        own_writes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{ChunkData, DiskSpec, GroupSpec};

    #[test]
    fn a_group_with_a_disk_still_joining_is_promoted_only_with_force() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b, dir) = (
            tmp.path().join("a.img"),
            tmp.path().join("b.img"),
            tmp.path().join("a.img.state"),
        );
        let size = 64 << 10;
        let (mut store, _) =
            ReplicaStore::open(&GroupSpec::single(&a, size, 4096, [1; 16]), &dir).unwrap();
        for i in 0..16 {
            store.sync_extent(0, i, 1, ChunkData::Zero).unwrap();
        }
        store.finish_sync(3, 0).unwrap();
        std::fs::write(&b, vec![0u8; size as usize]).unwrap();
        store
            .add_disk(&DiskSpec {
                image: b.clone(),
                uuid: [2; 16],
                size,
            })
            .unwrap();
        let e = promote_store(&mut store, &[[1; 16], [2; 16]], None, false).unwrap_err();
        assert!(e.to_string().contains("still joining"), "{e}");
        assert_eq!(
            store.state(),
            ReplicaState::Consistent {
                cg: 3,
                frozen_at_unix_us: 0
            }
        );
        let p = promote_store(&mut store, &[[1; 16], [2; 16]], None, true).unwrap();
        assert_eq!((p.cg, p.images.len()), (3, 2));
        assert!(
            p.report().contains("serve them as one group"),
            "{}",
            p.report()
        );
        for img in [&a, &b] {
            let l = Lineage::load(img).unwrap().unwrap();
            assert_eq!((l.role, l.since_cg), (Role::Promoted, 3));
        }
    }
}
