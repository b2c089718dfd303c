//! Opening a replica: identity checks, crash recovery from the journal, and the state
//! directory helpers (lock, default location, stored identity).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::fault::Fault;
use super::flush::Touched;
use super::image::DiskImage;
use super::journal::{Geometry, Journal, JOURNAL_FILE, JOURNAL_NEW};
use super::state::{self, DiskEntry, Mode, StateFile, STATE_FORMAT, STATE_TMP};
use super::{
    error, CheckpointPolicy, Error, GroupSpec, RecoveryReport, ReplicaStore, Result, StoredDisk,
    StoredGroup,
};

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

impl ReplicaStore {
    /// Open (or create) the replica of the group `spec` whose state lives in `state_dir`,
    /// running crash recovery. Refuses if the stored group differs (number of disks, any
    /// disk's uuid or size, the chunk size). A new replica starts as `Syncing`.
    pub fn open(spec: &GroupSpec, state_dir: &Path) -> Result<(Self, RecoveryReport)> {
        spec.validate()?;
        let chunk_size = spec.chunk_size;
        let geos = spec
            .disks
            .iter()
            .map(|d| {
                Geometry::new(d.size, chunk_size).map_err(|e| {
                    Error::InvalidArgument(format!(
                        "disk {} (size {}) / chunk size {chunk_size}: {e}",
                        d.image.display(),
                        d.size
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        fs::create_dir_all(state_dir).map_err(error::io("create directory", state_dir))?;
        let lock = lock_dir(state_dir)?;
        state::remove_if_exists(&state_dir.join(STATE_TMP))?;
        state::remove_if_exists(&state_dir.join(JOURNAL_NEW))?;
        let mut report = RecoveryReport::default();

        let st = match state::read(state_dir)? {
            Some(mut st) => {
                check_identity(&st, spec, state_dir)?;
                // Recorded for operators and offline promotion; the uuids identify.
                for (e, d) in st.disks.iter_mut().zip(&spec.disks) {
                    e.image = Some(d.image.clone());
                }
                st
            }
            None => {
                report.created = true;
                StateFile {
                    format: STATE_FORMAT,
                    chunk_size,
                    mode: Mode::Syncing {
                        total_chunks: geos.iter().map(|g| g.chunks()).sum(),
                    },
                    last_committed_cg: 0,
                    frozen_at_unix_us: 0,
                    disks: disk_entries(spec),
                    removed: Vec::new(),
                }
            }
        };

        let images = spec
            .disks
            .iter()
            .zip(&geos)
            .map(|(d, &geo)| DiskImage::open(&d.image, geo, report.created))
            .collect::<Result<Vec<_>>>()?;
        let mut store = ReplicaStore {
            dir: state_dir.to_path_buf(),
            images,
            chunk_size,
            st,
            journal: Journal::open(state_dir)?,
            staged: HashMap::new(),
            live_bytes: 0,
            compact_min_dead: 64 << 20,
            pending_apply: None,
            copies: Default::default(),
            sync_done_count: 0,
            checkpoint_policy: CheckpointPolicy::default(),
            last_checkpoint: std::time::Instant::now(),
            fault: Fault::from_env(),
            space: Default::default(),
            poisoned: false,
            _lock: lock,
        };
        report.journal_bytes = store.journal.len;
        if report.created {
            store.write_state()?;
        } else if store.st.mode == Mode::Consistent {
            store.recover(&mut report)?;
        }
        let (cg, frozen) = (store.st.last_committed_cg, store.st.frozen_at_unix_us);
        store.journal.reset(cg, frozen, &store.fault)?;
        tracing::info!(dir = %state_dir.display(), disks = store.images.len(), state = ?store.state(), ?report, "replica opened");
        Ok((store, report))
    }

    fn recover(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let scan = self.journal.scan(&self.geometries())?;
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
            let mut touched: Vec<Touched> =
                self.images.iter().map(|_| Touched::default()).collect();
            self.apply_entries(&scan.committed, None, &mut touched)?;
            self.sync_images()?;
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
    pub fn adopt(spec: &GroupSpec, state_dir: &Path, cg: u64) -> Result<(Self, RecoveryReport)> {
        spec.validate()?;
        fs::create_dir_all(state_dir).map_err(error::io("create directory", state_dir))?;
        {
            let _lock = lock_dir(state_dir)?;
            state::remove_if_exists(&state_dir.join(JOURNAL_FILE))?;
            state::sync_dir(state_dir)?;
            let st = StateFile {
                format: STATE_FORMAT,
                chunk_size: spec.chunk_size,
                mode: Mode::Consistent,
                last_committed_cg: cg,
                frozen_at_unix_us: 0,
                disks: disk_entries(spec),
                removed: Vec::new(),
            };
            state::write_atomic(state_dir, &st, || Ok(()))?;
        }
        Self::open(spec, state_dir)
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
        let mut total_chunks = 0;
        for d in &st.disks {
            let geo = Geometry::new(d.size, st.chunk_size).map_err(|e| Error::StateFile {
                path: state_dir.join(state::STATE_FILE),
                detail: e.to_string(),
            })?;
            total_chunks += geo.chunks();
        }
        st.mode = Mode::Syncing { total_chunks };
        // The whole group is copied again: a disk that was joining is copied with it.
        st.disks.iter_mut().for_each(|d| d.joining = None);
        st.last_committed_cg = 0;
        state::write_atomic(state_dir, &st, || Ok(()))?;
        state::remove_if_exists(&state_dir.join(JOURNAL_FILE))?;
        state::sync_dir(state_dir)?;
        tracing::warn!(dir = %state_dir.display(), "replica reset to syncing; a full resync is required");
        Ok(())
    }
}

/// The state directory of the replica image `image` unless one is given: `<image>.state`.
pub fn default_state_dir(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

/// Reads the group kept in `state_dir` (None: no replica there yet).
pub fn stored_group(state_dir: &Path) -> Result<Option<StoredGroup>> {
    let Some(st) = state::read(state_dir)? else {
        return Ok(None);
    };
    let disks = st
        .disks
        .iter()
        .map(|d| {
            let uuid =
                crate::replica::identity::parse_uuid(&d.uuid).ok_or_else(|| Error::StateFile {
                    path: state_dir.join(state::STATE_FILE),
                    detail: format!("bad disk uuid {:?}", d.uuid),
                })?;
            Ok(StoredDisk {
                uuid,
                size: d.size,
                image: d.image.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(StoredGroup {
        disks,
        chunk_size: st.chunk_size,
    }))
}

/// What `state.json` says of the disks of `spec`.
fn disk_entries(spec: &GroupSpec) -> Vec<DiskEntry> {
    spec.disks
        .iter()
        .map(|d| DiskEntry {
            uuid: state::uuid_hex(&d.uuid),
            size: d.size,
            image: Some(d.image.clone()),
            joining: None,
        })
        .collect()
}

/// Refuses a stored group that is not `spec`'s: another number of disks, another disk at a
/// position, another size or chunk size.
fn check_identity(st: &StateFile, spec: &GroupSpec, dir: &Path) -> Result<()> {
    let mismatch = |field: String, stored: String, requested: String| Error::IdentityMismatch {
        dir: dir.to_path_buf(),
        field,
        stored,
        requested,
    };
    if st.disks.len() != spec.disks.len() {
        return Err(mismatch(
            "number of disks".into(),
            st.disks.len().to_string(),
            spec.disks.len().to_string(),
        ));
    }
    let one = spec.disks.len() == 1;
    let name = |what: &str, i: usize| {
        if one {
            what.to_string()
        } else {
            format!("{what} of disk {i}")
        }
    };
    for (i, (e, d)) in st.disks.iter().zip(&spec.disks).enumerate() {
        if e.uuid != state::uuid_hex(&d.uuid) {
            return Err(mismatch(
                name("disk uuid", i),
                e.uuid.clone(),
                state::uuid_hex(&d.uuid),
            ));
        }
        if e.size != d.size {
            return Err(mismatch(
                name("disk size", i),
                e.size.to_string(),
                d.size.to_string(),
            ));
        }
    }
    if st.chunk_size != spec.chunk_size {
        return Err(mismatch(
            "chunk size".into(),
            st.chunk_size.to_string(),
            spec.chunk_size.to_string(),
        ));
    }
    Ok(())
}
