//! An in-process replica image next to the primary (`--local-replica`), kept in a
//! [`ReplicaStore`] like a secondary's: each CG's chunks are staged in the store's checksummed
//! journal and applied to the image only once its commit record is durable, so a crash at any
//! point (`kill -9` included) leaves a replica that recovers, when it is next opened, to a
//! whole committed CG.
//!
//! A new replica (or one whose initial copy was interrupted) is synchronised first: the
//! engine marks every chunk, the first CG is written straight into the image (knowingly
//! inconsistent meanwhile) and its commit declares the replica consistent. A replica that is
//! already consistent at CG `n` when it is opened is brought up to date by a full copy staged
//! as one CG above `n` (a new engine does not know what changed since), so it stays at `n`
//! until that CG commits.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use super::cycle::ChunkSink;
use crate::cg::{Extent, Group};
use crate::replica::{self, ChunkData, ReplicaState, ReplicaStore};

/// An in-process replica: a [`ReplicaStore`] (image + state directory) fed by the CG cycle.
pub struct LocalReplica {
    image: PathBuf,
    state_dir: PathBuf,
    size: u64,
    chunk_size: u64,
    disk_uuid: [u8; 16],
    /// `None` after a failed store call (the store is poisoned) until `recover` reopens it.
    store: Option<ReplicaStore>,
    on_commit: Option<CommitHook>,
}

/// Called after a commit was applied to the replica image.
pub type CommitHook = Box<dyn FnMut(u64, &File) + Send>;

/// Identity recorded for a replica made with [`LocalReplica::create`] (no disk identity).
const ANONYMOUS_DISK: [u8; 16] = [0; 16];

fn store_error(e: replica::Error) -> io::Error {
    io::Error::other(e)
}

impl LocalReplica {
    /// A replica image at `path` (created at `size` if missing) with chunks of `chunk_size`,
    /// its state in the default state directory `<path>.state`. The replica records no disk
    /// identity, so reopening it checks only the size and the chunk size; `drblk serve` uses
    /// [`LocalReplica::open`] with the disk's identity.
    pub fn create(path: &Path, size: u64, chunk_size: u64) -> io::Result<Self> {
        Self::open(
            path,
            &replica::default_state_dir(path),
            size,
            chunk_size,
            ANONYMOUS_DISK,
        )
    }

    /// Opens (or creates) the replica of disk `disk_uuid` whose image is `image` and whose
    /// journal, state file and lock are in `state_dir`, running crash recovery. Refuses a
    /// replica of another disk (identity, size or chunk size) and a promoted one.
    pub fn open(
        image: &Path,
        state_dir: &Path,
        size: u64,
        chunk_size: u64,
        disk_uuid: [u8; 16],
    ) -> io::Result<Self> {
        let mut r = LocalReplica {
            image: image.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
            size,
            chunk_size,
            disk_uuid,
            store: None,
            on_commit: None,
        };
        r.reopen()?;
        Ok(r)
    }

    /// Calls `f(cg, image)` after each commit has been applied (tests check the image there).
    pub fn on_commit(mut self, f: impl FnMut(u64, &File) + Send + 'static) -> Self {
        self.on_commit = Some(Box::new(f));
        self
    }

    /// The replica's state (`None` while a failed store waits to be reopened).
    pub fn state(&self) -> Option<ReplicaState> {
        self.store.as_ref().map(ReplicaStore::state)
    }

    /// Drops the store (releasing its lock) and opens it again, which runs crash recovery
    /// and discards anything staged and not committed.
    fn reopen(&mut self) -> io::Result<()> {
        self.store = None;
        let spec =
            replica::GroupSpec::single(&self.image, self.size, self.chunk_size, self.disk_uuid);
        let (store, report) = ReplicaStore::open(&spec, &self.state_dir).map_err(store_error)?;
        if store.state() == ReplicaState::Promoted {
            return Err(io::Error::other(format!(
                "the replica {} was promoted to a primary disk; it accepts no replication",
                self.image.display()
            )));
        }
        tracing::info!(replica = %self.image.display(), state = ?store.state(), ?report, "local replica opened");
        self.store = Some(store);
        Ok(())
    }

    /// Runs `f` on the store; a failure poisons the store, so it is dropped (`recover`
    /// reopens it).
    fn with_store<T>(
        &mut self,
        f: impl FnOnce(&mut ReplicaStore) -> replica::Result<T>,
    ) -> io::Result<T> {
        let store = self.store.as_mut().ok_or_else(|| {
            io::Error::other("the local replica failed and has not been reopened")
        })?;
        f(store).map_err(|e| {
            self.store = None;
            store_error(e)
        })
    }
}

impl ChunkSink for LocalReplica {
    fn attach(&mut self, group: &Group) {
        match self.state() {
            Some(ReplicaState::Consistent { cg, .. }) => {
                tracing::info!(
                    cg,
                    "local replica consistent at CG {cg}: a full copy is staged above it"
                );
                group.resume_numbering(cg);
                group.mark_all();
            }
            // New, or its initial copy was interrupted: copy everything.
            Some(ReplicaState::Syncing { .. }) => group.mark_all(),
            // Refused when opened; a failed store is reopened by `recover`, which the
            // engine follows by shipping everything not committed again.
            Some(ReplicaState::Promoted) | None => {}
        }
    }

    fn extent(&mut self, ext: Extent, data: &[u8]) -> io::Result<()> {
        if ext.disk != 0 {
            return Err(io::Error::other(format!(
                "a local replica holds one disk; disk {} of the group has no image here",
                ext.disk
            )));
        }
        self.with_store(|s| {
            let d = if data.iter().all(|&b| b == 0) {
                ChunkData::Zero
            } else {
                ChunkData::Bytes(data)
            };
            if let ReplicaState::Syncing { .. } = s.state() {
                s.sync_extent(0, ext.first, ext.count, d)
            } else {
                s.stage_extent(0, ext.cg, ext.first, ext.count, d).map(drop)
            }
        })
    }

    fn commit(&mut self, cg: u64, frozen_at: SystemTime) -> io::Result<()> {
        let us = crate::sys::clock::unix_micros(frozen_at);
        self.with_store(|s| match s.state() {
            // The first CG after creation is the initial copy: it was written in place.
            ReplicaState::Syncing { .. } => s.finish_sync(cg, us),
            _ => s.commit(cg, us),
        })?;
        if let (Some(f), Some(s)) = (self.on_commit.as_mut(), self.store.as_ref()) {
            f(cg, s.image_file(0));
        }
        Ok(())
    }

    fn recover(&mut self, error: &io::Error, stop: &AtomicBool) -> io::Result<()> {
        // The engine merged everything uncommitted back into its dirty set: it ships again.
        // Reopening runs the store's recovery and drops what was staged.
        let mut backoff = Duration::from_millis(100);
        let mut next_log = Instant::now();
        loop {
            match self.reopen() {
                Ok(()) => return Ok(()),
                Err(e) if stop.load(Ordering::SeqCst) => return Err(e),
                Err(e) => {
                    if Instant::now() >= next_log {
                        tracing::warn!(replica = %self.image.display(), after = %error, error = %e, retry_in = ?backoff, "cannot reopen the local replica; changes are tracked meanwhile");
                        next_log = Instant::now() + Duration::from_secs(10);
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
