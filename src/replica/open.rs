//! Opening a replica: identity checks, crash recovery from the journal, and the state
//! directory helpers (lock, default location, stored identity).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::fault::Fault;
use super::flush::{ImageFlusher, Touched};
use super::journal::{Geometry, Journal, JOURNAL_FILE, JOURNAL_NEW};
use super::state::{self, Mode, StateFile, STATE_FORMAT, STATE_TMP};
use super::{error, CheckpointPolicy, Error, RecoveryReport, ReplicaStore, Result, StoredIdentity};

fn lock_dir(dir: &Path) -> Result<File> {
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(error::io("open", &p))?;
    // A lock just released by a previous opener in this process can still be held for a
    // moment by a child being spawned concurrently (fork copies the fd; it is closed only
    // at exec), so retry briefly before reporting a real second opener.
    for attempt in 0.. {
        if crate::sys::file::try_lock_exclusive(&f).map_err(error::io("flock", &p))? {
            return Ok(f);
        }
        if attempt == 100 {
            return Err(Error::Locked(dir.to_path_buf()));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    unreachable!()
}

fn file_size(f: &mut File, p: &Path) -> Result<u64> {
    // Works for block devices too (their st_size is 0).
    f.seek(SeekFrom::End(0)).map_err(error::io("seek", p))
}

impl ReplicaStore {
    /// Open (or create) the replica of disk `disk_uuid` whose state lives in `state_dir`
    /// and whose image is `image`, running crash recovery. Refuses if the stored identity
    /// (uuid, size, chunk size) differs. A new replica starts as `Syncing`.
    pub fn open(
        image: &Path,
        state_dir: &Path,
        disk_size: u64,
        chunk_size: u64,
        disk_uuid: [u8; 16],
    ) -> Result<(Self, RecoveryReport)> {
        let geo = Geometry::new(disk_size, chunk_size).map_err(|e| {
            Error::InvalidArgument(format!(
                "disk size {disk_size} / chunk size {chunk_size}: {e}"
            ))
        })?;
        fs::create_dir_all(state_dir).map_err(error::io("create directory", state_dir))?;
        let lock = lock_dir(state_dir)?;
        state::remove_if_exists(&state_dir.join(STATE_TMP))?;
        state::remove_if_exists(&state_dir.join(JOURNAL_NEW))?;
        let mut report = RecoveryReport::default();

        let existing = state::read(state_dir)?;
        let st = match existing {
            Some(st) => {
                let mismatch = |field, stored: String, requested: String| Error::IdentityMismatch {
                    dir: state_dir.to_path_buf(),
                    field,
                    stored,
                    requested,
                };
                if st.disk_uuid != state::uuid_hex(&disk_uuid) {
                    return Err(mismatch(
                        "disk uuid",
                        st.disk_uuid,
                        state::uuid_hex(&disk_uuid),
                    ));
                }
                if st.disk_size != disk_size {
                    return Err(mismatch(
                        "disk size",
                        st.disk_size.to_string(),
                        disk_size.to_string(),
                    ));
                }
                if st.chunk_size != chunk_size {
                    return Err(mismatch(
                        "chunk size",
                        st.chunk_size.to_string(),
                        chunk_size.to_string(),
                    ));
                }
                st
            }
            None => {
                report.created = true;
                StateFile {
                    format: STATE_FORMAT,
                    disk_uuid: state::uuid_hex(&disk_uuid),
                    disk_size,
                    chunk_size,
                    mode: Mode::Syncing {
                        total_chunks: geo.chunks(),
                    },
                    last_committed_cg: 0,
                    frozen_at_unix_us: 0,
                }
            }
        };

        let mut image_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(report.created)
            .truncate(false)
            .open(image)
            .map_err(error::io("open image", image))?;
        if !crate::sys::file::lock_retrying(&image_file, true).map_err(error::io("flock", image))? {
            return Err(Error::InvalidArgument(format!(
                "image {} is in use by another drblk process (a `drblk serve` on it?): stop it first",
                image.display()
            )));
        }
        let image_is_file = image_file
            .metadata()
            .map_err(error::io("stat", image))?
            .is_file();
        let size = file_size(&mut image_file, image)?;
        if size < disk_size {
            if report.created && image_is_file {
                image_file
                    .set_len(disk_size)
                    .map_err(error::io("extend image", image))?;
                image_file.sync_all().map_err(error::io("fsync", image))?;
            } else {
                return Err(Error::InvalidArgument(format!(
                    "image {} is {size} bytes, smaller than the disk ({disk_size})",
                    image.display()
                )));
            }
        }

        if image_is_file {
            preallocate_image(&image_file, image, disk_size)?;
        }

        let mut store = ReplicaStore {
            dir: state_dir.to_path_buf(),
            image_path: image.to_path_buf(),
            image: image_file,
            image_is_file,
            geo,
            st,
            journal: Journal::open(state_dir)?,
            staged: HashMap::new(),
            live_bytes: 0,
            compact_min_dead: 64 << 20,
            pending_apply: None,
            sync_done: vec![0; geo.chunks().div_ceil(64) as usize],
            sync_done_count: 0,
            checkpoint_policy: CheckpointPolicy::default(),
            last_checkpoint: std::time::Instant::now(),
            flusher: None,
            fault: Fault::from_env(),
            space: Default::default(),
            poisoned: false,
            observer: None,
            _lock: lock,
        };
        store.flusher = match ImageFlusher::start(&store.image, disk_size, image) {
            Ok(f) => Some(f),
            Err(e) => {
                // Only slower: each checkpoint then writes back everything applied since.
                tracing::warn!(image = %image.display(), error = %e, "no background writeback of the replica image");
                None
            }
        };
        report.journal_bytes = store.journal.len;
        if report.created {
            store.write_state()?;
        } else if store.st.mode == Mode::Consistent {
            store.recover(&mut report)?;
        }
        let (cg, frozen) = (store.st.last_committed_cg, store.st.frozen_at_unix_us);
        store.journal.reset(cg, frozen, &store.fault)?;
        tracing::info!(dir = %state_dir.display(), state = ?store.state(), ?report, "replica opened");
        Ok((store, report))
    }

    fn recover(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let scan = self.journal.scan(&[self.geo])?;
        report.discarded_records = scan.uncommitted_records;
        report.torn_tail_at = scan.torn_at;
        // What follows the last commit record is dropped below anyway; cut it first, so a
        // journal that filled its filesystem (a group that failed with ENOSPC) gives the
        // space back before recovery writes the image's state. Nothing committed is cut.
        let len = self.journal.file_len()?;
        if scan.committed_end > 0 && scan.committed_end < len {
            self.journal.truncate_uncommitted(scan.committed_end)?;
            report.uncommitted_bytes_cut = len - scan.committed_end;
        }
        if scan.base_cg > self.st.last_committed_cg {
            // Cannot happen with our write order (state before journal reset); trust the
            // journal, which was only reset after the image was synced.
            tracing::warn!(
                journal_base = scan.base_cg,
                state = self.st.last_committed_cg,
                "state.json is older than the journal checkpoint"
            );
            self.st.last_committed_cg = scan.base_cg;
            self.st.frozen_at_unix_us = scan.base_frozen;
        }
        if let Some((cg, frozen)) = scan.last_commit {
            report.replayed_cg = Some(cg);
            report.chunks_applied = scan.committed.len() as u64;
            tracing::info!(
                cg,
                chunks = scan.committed.len(),
                "replaying committed CG from the journal"
            );
            // The fsync below writes it back: no need for the flusher.
            self.apply_entries(&scan.committed, &mut Touched::default())?;
            self.image
                .sync_all()
                .map_err(error::io("fsync", &self.image_path))?;
            if cg > self.st.last_committed_cg {
                self.st.last_committed_cg = cg;
                self.st.frozen_at_unix_us = frozen;
            }
            self.write_state()?;
        }
        Ok(())
    }

    /// Makes an existing image (an old primary rejoining as a secondary) a replica that is
    /// consistent at `cg` as it is — nothing is copied. The caller vouches for the image:
    /// it holds CG `cg` of the primary's line (a demoted primary at its CG of demotion), or
    /// `cg` is 0, which no primary holds, so the next connection resyncs everything as a
    /// staged group and the image stays whole until that group commits. Whatever the state
    /// directory held (a promoted store left by an earlier promotion, a replica whose
    /// writes the operator discards) is replaced: its journal first, so nothing of it is
    /// ever replayed onto the image.
    pub fn adopt(
        image: &Path,
        state_dir: &Path,
        disk_size: u64,
        chunk_size: u64,
        disk_uuid: [u8; 16],
        cg: u64,
    ) -> Result<(Self, RecoveryReport)> {
        fs::create_dir_all(state_dir).map_err(error::io("create directory", state_dir))?;
        {
            let _lock = lock_dir(state_dir)?;
            state::remove_if_exists(&state_dir.join(JOURNAL_FILE))?;
            state::sync_dir(state_dir)?;
            let st = StateFile {
                format: STATE_FORMAT,
                disk_uuid: state::uuid_hex(&disk_uuid),
                disk_size,
                chunk_size,
                mode: Mode::Consistent,
                last_committed_cg: cg,
                frozen_at_unix_us: 0,
            };
            state::write_atomic(state_dir, &st, || Ok(()))?;
        }
        Self::open(image, state_dir, disk_size, chunk_size, disk_uuid)
    }

    /// Mark a replica whose journal is corrupt (see [`Error::Corrupt`]) as needing a full
    /// resync: state becomes `Syncing`, the journal is removed. The image is kept (a
    /// resync overwrites it). The replica must not be opened concurrently.
    pub fn reset_to_syncing(state_dir: &Path) -> Result<()> {
        let _lock = lock_dir(state_dir)?;
        let mut st = state::read(state_dir)?.ok_or_else(|| Error::StateFile {
            path: state_dir.join(state::STATE_FILE),
            detail: "missing".into(),
        })?;
        let geo = Geometry::new(st.disk_size, st.chunk_size).map_err(|e| Error::StateFile {
            path: state_dir.join(state::STATE_FILE),
            detail: e.to_string(),
        })?;
        st.mode = Mode::Syncing {
            total_chunks: geo.chunks(),
        };
        st.last_committed_cg = 0;
        state::write_atomic(state_dir, &st, || Ok(()))?;
        state::remove_if_exists(&state_dir.join(JOURNAL_FILE))?;
        state::sync_dir(state_dir)?;
        tracing::warn!(dir = %state_dir.display(), "replica reset to syncing; a full resync is required");
        Ok(())
    }
}

/// Gives the image file every block of the disk. Why: a group whose commit record is
/// written must always be applicable — an apply that stopped half-way for want of space
/// leaves an image no state file describes, and every replay stops at the same place. With
/// all blocks allocated, applying writes only into them (zeroes included: see
/// `write_image`), so on ext4 and xfs a full filesystem stops replication in the journal,
/// before the commit record, where the group fails cleanly and is retried. Not on a
/// copy-on-write filesystem (btrfs, ZFS: overwrites need new blocks) or one that cannot
/// preallocate: there a full filesystem stops the apply, and the journal's replay applies
/// the group once space returns. Cheap when the file is already allocated (the
/// usual reopen); on ext4 and xfs a new image gets "unwritten" extents, not zeroes written.
/// The cost is thin provisioning: the replica takes the disk's full size at once.
fn preallocate_image(f: &File, image: &Path, size: u64) -> Result<()> {
    let before = crate::sys::file::allocated_bytes(f).unwrap_or(0);
    match crate::sys::file::preallocate(f, size) {
        Ok(true) => {
            if before < size {
                tracing::info!(image = %image.display(), size, "replica image allocated in full");
            }
            Ok(())
        }
        Ok(false) => {
            tracing::warn!(image = %image.display(), "this filesystem cannot preallocate the replica image: if it fills up, applying a committed group stops until space is added (the journal keeps the group; it is applied then)");
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(Error::NoSpaceForImage {
            path: image.to_path_buf(),
            size,
            allocated: crate::sys::file::allocated_bytes(f).unwrap_or(0),
            free: crate::sys::file::free_bytes(image).unwrap_or(0),
        }),
        Err(e) => Err(error::io("allocate", image)(e)),
    }
}

/// The state directory of the replica image `image` unless one is given: `<image>.state`.
pub fn default_state_dir(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

/// Reads the identity of the replica kept in `state_dir` (None: no replica there yet).
pub fn stored_identity(state_dir: &Path) -> Result<Option<StoredIdentity>> {
    let Some(st) = state::read(state_dir)? else {
        return Ok(None);
    };
    let uuid =
        crate::replica::identity::parse_uuid(&st.disk_uuid).ok_or_else(|| Error::StateFile {
            path: state_dir.join(state::STATE_FILE),
            detail: format!("bad disk uuid {:?}", st.disk_uuid),
        })?;
    Ok(Some(StoredIdentity {
        uuid,
        disk_size: st.disk_size,
        chunk_size: st.chunk_size,
    }))
}
