//! The secondary's durable replica store (DESIGN.md §3): the replica images of a
//! consistency group, one staging journal and one state file, crash-safe.
//!
//! A store holds the images of every disk of its group ([`GroupSpec`], in the group's
//! order; a single disk is a group of one). Every structure below is the group's: one
//! journal whose records name their disk, one commit record per group, one `state.json`.
//! So a group's parts on all disks become durable together, with the one fsynced commit
//! record, and recovery brings every image to the same group.
//!
//! # Files (in the state directory)
//! - `state.json` — the group's identity (each disk's uuid and size, in order, and the
//!   image it was opened with; the chunk size) and state (syncing / consistent at CG n /
//!   promoted), replaced atomically (temp + fsync + rename + fsync dir). Format in `state.rs`.
//! - `journal` — staging journal of checksummed records (format in [`format`]).
//! - `lock` — `flock`ed while a [`ReplicaStore`] is open (one opener per replica).
//! - The images are separate paths (files, or block devices).
//!
//! # Life of a CG
//! `stage_extent` appends one data (or zero) record for an extent — `count` contiguous
//! chunks inside one extent region (`Geometry::extent_len`) — to the journal (no fsync) and
//! remembers, per chunk, the newest staged version as a position inside its record (newest
//! CG wins, for equal CGs the later call; chunks of an extent for which a newer CG is
//! staged keep that version; data of CGs `<=` the last committed CG is ignored).
//! `stage_chunk` is the one-chunk case. `commit` then:
//! 1. reads every distinct staged record back once and checks its crc (a bad one fails the
//!    commit before anything is committed);
//! 2. fdatasyncs the journal (whose write-back staging started every 4 MiB, so little is
//!    left to write), appends a commit record `(cg, frozen_at, n_chunks)`,
//!    fdatasyncs again — **the CG is now durable; acknowledge the primary**
//!    ([`ReplicaStore::commit_durable`] stops here);
//! 3. applies the staged chunks in place (each record's payload as step 1 read and
//!    verified it, kept in memory up to 16 MiB a group — `copies.rs` — the rest read and
//!    re-verified once; its live
//!    chunks written as runs of consecutive chunks, one write or hole punch per run) — into
//!    the page cache only: readers see the CG at once, and the journal's commit record keeps
//!    it durable ([`ReplicaStore::apply_committed`]);
//! 4. at a *checkpoint* (the journal past [`CheckpointPolicy::max_journal_bytes`], default
//!    256 MiB, or [`CheckpointPolicy::max_interval`], default 10 s, since the last one; and
//!    before anything resets or compacts the journal) fsyncs every image, writes `state.json`
//!    (consistent at the last committed CG), and resets the journal to a single checkpoint
//!    record (truncate + write + fdatasync). A background thread (`flush.rs`) writes the
//!    image back between checkpoints, so a checkpoint's fsync finds little to do.
//!    With [`CheckpointPolicy::EVERY_CG`] every apply checkpoints. The secondary
//!    acknowledges a group once applied and checkpoints after that
//!    ([`ReplicaStore::apply_in_place`], then [`ReplicaStore::checkpoint_if_due`]): the
//!    primary drains its next group while the image is fsynced.
//!
//! # Bound on staging disk use
//! Besides the uncommitted data, the journal holds the committed CGs since the last
//! checkpoint: at most `max_journal_bytes` plus one CG (a checkpoint follows the apply that
//! passes it). The bound below is for the uncommitted part, what follows the last commit
//! record: committed records are left to the checkpoint (a compaction would only force one
//! early, mid-group; when one runs it checkpoints first, then drops them). The in-memory
//! index keeps one live version per chunk. A live chunk counts its payload plus
//! its share of its record's header (48 bytes divided by the record's chunk count, rounded
//! up: never more than 48); everything else after the last commit record — superseded
//! records and the superseded chunks of partly live extent records — is dead. When
//! `dead > live` and
//! `dead >= compact_min_dead_bytes` (default 64 MiB) the journal is compacted (live chunks
//! copied to `journal.new` as one record per run of consecutive chunks of the same record,
//! fsync, rename, fsync dir). Hence, with `L = nchunks * 48 + disk_size` (every chunk
//! staged once as its own record, 48-byte headers):
//! `journal <= 2 L + compact_min_dead_bytes + one record` (a record holds at most one
//! extent), plus `<= L` for `journal.new` while a compaction runs — however many CGs fail.
//! All-zero extents are stored as 48-byte zero records. The in-memory index is ~40 bytes
//! per staged chunk, plus up to 16 MiB of verified record copies between a commit and its
//! apply.
//!
//! # Recovery (on `open`)
//! State `consistent`: the journal is scanned from its checkpoint record, verifying every
//! record (it may hold several committed CGs: those applied since the last checkpoint). Extent records are expanded into per-chunk versions with the staging rule.
//! Every complete commit record makes its CG's chunks (the newest version per chunk
//! up to that record) applied again — idempotently, so a crash mid-apply is repaired; the
//! image is fsynced and `state.json` advanced. Records after the last commit (a partial or
//! abandoned CG) are dropped, a torn/corrupt tail is treated as end of journal; then the
//! journal is reset. The primary learns the last committed CG in the handshake and resends
//! everything newer (what it does after any link loss).
//! A bad record *followed by a valid commit record* lies inside a committed CG: `open`
//! fails with [`Error::Corrupt`] naming the offset, nothing of that CG is applied, and the
//! replica stays unusable until [`ReplicaStore::reset_to_syncing`] turns it into a replica
//! that needs a full resync (the image may hold an interrupted apply, so it is not claimed
//! consistent).
//! States `syncing` and `promoted`: the journal holds nothing of value and is reset.
//!
//! # Crash points ([`CrashPoint`]) and what recovery yields
//! | point | after reopen |
//! |---|---|
//! | `AfterStage`, `MidCompaction` | previous CG; staged data dropped |
//! | `BeforeCommitRecord`, `TornCommitRecord` | previous CG (torn record = end of journal) |
//! | `AfterCommitRecordWrite` | this CG (process crash: the bytes are in the page cache; on power loss it could be either) |
//! | `AfterCommitDurable`, `MidApply(k)`, `BeforeImageSync`, `BetweenImageSyncs(k)` | this CG on every disk, re-applied from the journal (with every CG since the last checkpoint) |
//! | `MidStateWrite` | this CG (from the journal; the stale `state.json.tmp` is removed) |
//! | `BeforeJournalReset`, `MidJournalReset` | this CG (state says so; replay is idempotent) |
//! | a crash between checkpoints | the last committed CG, re-applied from the journal |
//!
//! `BeforeImageSync`, `MidStateWrite` and `BeforeJournalReset` are steps of a checkpoint:
//! inside `commit` only when it checkpoints, and also inside a link loss's discard, a
//! promotion or a compaction (which checkpoint first).
//! | `AfterSyncChunk`, `BeforeFinishSyncState` | still syncing (done count restarts at 0) |
//!
//! `MidApply(k)` counts runs (one image write each), not chunks.
//!
//! # Limitations
//! - Sync progress is not persisted: after a restart while syncing the state is
//!   `Syncing { done_chunks: 0 }` and the primary must resend the whole sync set.
//! - A bit flip in the *last* commit record is indistinguishable from a torn write: the
//!   replica falls back to the previous CG although the primary was acknowledged. The
//!   handshake's "last committed CG" exposes it; the primary must then resync.
//! - No power-loss model in the tests (only process crashes); the fsync ordering is what
//!   makes power loss safe and is argued above, not tested.
//!
//! # Code layout
//! One file per phase, in the order a group travels: `open.rs` (open, crash recovery,
//! `reset_to_syncing`, the state directory helpers), `sync.rs` (initial sync), `stage.rs`
//! (staging), `commit.rs` (commit record, discard, promote), `apply.rs` (applying a
//! committed CG to the image, checkpoints), `flush.rs` (background write-back of the
//! image). The files on disk are handled by `journal.rs` (record
//! format in `format.rs`) and `state.rs`; the crash points live in `fault.rs`.

mod apply;
#[cfg(test)]
mod checkpoint_tests;
mod checksum;
mod commit;
mod copies;
mod error;
#[cfg(test)]
mod extent_tests;
mod fault;
mod flush;
mod format;
#[cfg(test)]
mod group_tests;
pub mod identity;
mod image;
pub use checksum::chunk_crcs;
mod journal;
mod key;
mod members;
mod open;
mod space;
mod spec;
mod stage;
mod state;
mod sync;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use apply::CheckpointPolicy;
pub use error::{Error, Result};
pub use fault::{CrashMode, CrashPoint};
pub use open::{default_state_dir, stored_group};
pub use space::RESERVE as STAGING_RESERVE;
pub use spec::{DiskSpec, GroupSpec, StoredDisk, StoredGroup};

use fault::Fault;
use journal::{Entry, Geometry, Journal};
use state::{Mode, StateFile};

/// The replica's state: what the store holds, what the secondary reports to the primary in
/// its handshake, and what operators see. (The state file persists it in its own form, see
/// `state.rs`: progress of a sync is not persisted.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ReplicaState {
    /// Initial or re-synchronisation: the image is knowingly inconsistent.
    Syncing {
        /// Chunks received so far.
        done_chunks: u64,
        /// Chunks of the disk.
        total_chunks: u64,
    },
    /// The image holds exactly CG `cg`.
    Consistent {
        /// The CG the image holds.
        cg: u64,
        /// When the primary froze that CG (µs since the Unix epoch).
        frozen_at_unix_us: u64,
    },
    /// The replica was promoted to a writable primary; replication into it has stopped.
    Promoted,
}

impl ReplicaState {
    /// Progress of a sync in percent (100 when not syncing).
    pub fn percent(&self) -> f64 {
        match *self {
            ReplicaState::Syncing {
                done_chunks,
                total_chunks,
            } if total_chunks > 0 => {
                (done_chunks.min(total_chunks) as f64) * 100.0 / total_chunks as f64
            }
            ReplicaState::Syncing { .. } => 0.0,
            _ => 100.0,
        }
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplicaState::Syncing { .. } => write!(f, "syncing {:.1} %", self.percent()),
            ReplicaState::Consistent { cg, .. } => write!(f, "consistent at CG {cg}"),
            ReplicaState::Promoted => write!(f, "promoted"),
        }
    }
}

/// Content of a chunk or extent handed to [`ReplicaStore::stage_extent`],
/// [`ReplicaStore::stage_chunk`] or [`ReplicaStore::sync_extent`].
#[derive(Clone, Copy, Debug)]
pub enum ChunkData<'a> {
    /// Exactly the chunk's or extent's length (the last chunk of the disk may be short).
    Bytes(&'a [u8]),
    /// The chunk or extent reads as zeros.
    Zero,
}

/// What `stage_extent` / `stage_chunk` did with an extent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageOutcome {
    /// Staged for the next commit (possibly only some of its chunks: those for which a
    /// newer CG is staged keep that version).
    Staged,
    /// A version of a newer CG is already staged for every chunk; this one was ignored.
    Superseded,
    /// The CG is already committed; ignored.
    AlreadyCommitted,
}

/// What `open` found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// No state existed: a new replica was created (state `Syncing`).
    pub created: bool,
    /// Newest CG whose committed chunks were (re)applied from the journal.
    pub replayed_cg: Option<u64>,
    /// Chunks (re)applied from the journal.
    pub chunks_applied: u64,
    /// Staged records (one per extent) of an uncommitted CG that were dropped.
    pub discarded_records: u64,
    /// Offset where a torn/corrupt tail (after the last commit) was cut off.
    pub torn_tail_at: Option<u64>,
    /// Journal size found on open.
    pub journal_bytes: u64,
    /// Bytes after the last commit record cut from the journal before recovery wrote
    /// anything (a failed or abandoned group's records).
    pub uncommitted_bytes_cut: u64,
}

/// One replica of a consistency group: its images + one staging journal + one state. See
/// the module docs.
pub struct ReplicaStore {
    dir: PathBuf,
    /// The group's images, in the group's order (a key's disk indexes this).
    images: Vec<image::DiskImage>,
    chunk_size: u64,
    st: StateFile,
    journal: Journal,
    /// Newest staged version per chunk (uncommitted, or committed-but-not-applied while
    /// `pending_apply` is set).
    staged: HashMap<key::ChunkKey, Entry>,
    live_bytes: u64,
    compact_min_dead: u64,
    /// A commit record for this (cg, frozen_at) is durable but not yet applied.
    pending_apply: Option<(u64, u64)>,
    /// Records the last commit verified, for its apply (`copies.rs`).
    copies: copies::RecordCopies,
    /// Chunks written by the current sync, over every image.
    sync_done_count: u64,
    checkpoint_policy: CheckpointPolicy,
    last_checkpoint: std::time::Instant,
    fault: Fault,
    /// Room left for staging on the journal's filesystem.
    space: space::SpaceGuard,
    poisoned: bool,
    _lock: File,
}

/// Something that must see the replica image's content before the store changes it: a
/// drill keeps the content it still reads from the image. Called on the thread that writes,
/// before the write, for every range the store writes or punches: once per group with all
/// its ranges (`before_writes`, applying a group), per extent (`before_write`, an initial
/// sync); recovery's replay runs in a new store, which has no observer. Must not fail or block for long: replication never waits for it.
pub trait ImageObserver: Send + Sync {
    /// `[offset, offset + len)` of the image is about to change.
    fn before_write(&self, offset: u64, len: u64) {
        self.before_writes(&[(offset, len)]);
    }
    /// Every range of a group about to be applied (sorted, each `(offset, len)`), told
    /// once before the group's first write, so their old content can be read at once.
    fn before_writes(&self, ranges: &[(u64, u64)]);
    /// `[offset, offset + len)` was staged: a later apply will change it (a hint, early).
    fn will_write(&self, _offset: u64, _len: u64) {}
    /// The store is closed: a later store of the same image (reopened after an error,
    /// replaced) does not call this observer, so what it saw ends here.
    fn closed(&self);
}

impl Drop for ReplicaStore {
    fn drop(&mut self) {
        for i in &mut self.images {
            if let Some(o) = i.observer.take() {
                o.closed();
            }
        }
    }
}

impl ReplicaStore {
    // ----- accessors -----

    /// Sets (or clears) the observer told before each change of disk `disk`'s image.
    pub fn set_image_observer(
        &mut self,
        disk: usize,
        observer: Option<std::sync::Arc<dyn ImageObserver>>,
    ) -> Result<()> {
        self.image_mut(disk)?.observer = observer;
        Ok(())
    }

    /// The replica's state.
    pub fn state(&self) -> ReplicaState {
        match self.st.mode {
            Mode::Syncing { total_chunks } => ReplicaState::Syncing {
                done_chunks: self.sync_done_count,
                total_chunks,
            },
            Mode::Consistent => ReplicaState::Consistent {
                cg: self.st.last_committed_cg,
                frozen_at_unix_us: self.st.frozen_at_unix_us,
            },
            Mode::Promoted => ReplicaState::Promoted,
        }
    }

    /// Last CG durably committed (for the handshake / acks). Includes a CG whose commit
    /// record is durable but whose apply is still pending.
    pub fn last_committed_cg(&self) -> Option<u64> {
        let c = self
            .pending_apply
            .map_or(self.st.last_committed_cg, |(c, _)| c);
        (c != 0).then_some(c)
    }

    /// Number of disks in the group.
    pub fn disks(&self) -> usize {
        self.images.len()
    }
    /// Disk `disk`'s replica image (panics if there is no such disk).
    pub fn image_path(&self, disk: usize) -> &Path {
        &self.images[disk].path
    }
    /// Disk `disk`'s open replica image, for reading it (tests check it after a commit).
    /// Writing to it behind the store's back voids its guarantees. Panics if there is no
    /// such disk.
    pub fn image_file(&self, disk: usize) -> &File {
        &self.images[disk].file
    }
    /// Disk `disk`'s size in bytes (panics if there is no such disk).
    pub fn disk_size(&self, disk: usize) -> u64 {
        self.images[disk].geo.disk_size()
    }
    /// Chunk size in bytes (the group's).
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }
    /// Number of chunks of disk `disk` (panics if there is no such disk).
    pub fn nchunks(&self, disk: usize) -> u64 {
        self.images[disk].geo.chunks()
    }
    /// Number of chunks staged for the next commit.
    pub fn staged_chunks(&self) -> u64 {
        self.staged.len() as u64
    }
    /// Current journal size in bytes.
    pub fn journal_bytes(&self) -> u64 {
        self.journal.len
    }

    /// Minimum dead bytes before the journal is compacted (default 64 MiB).
    pub fn set_compact_min_dead_bytes(&mut self, bytes: u64) {
        self.compact_min_dead = bytes;
    }

    /// When applied CGs are checkpointed into the image (default
    /// [`CheckpointPolicy::default`]).
    pub fn set_checkpoint_policy(&mut self, policy: CheckpointPolicy) {
        self.checkpoint_policy = policy;
    }

    /// Arm (or disarm with `None`) a crash point. Test hook; see [`CrashPoint`].
    /// Also armable with the environment variable `DRBLK_SECONDARY_CRASH_AT` (aborts).
    pub fn set_crash_point(&mut self, point: Option<(CrashPoint, CrashMode)>) {
        self.fault.arm(point);
    }

    // ----- internals -----

    /// Disk `disk`'s image, or an error naming the group's size.
    fn image(&self, disk: usize) -> Result<&image::DiskImage> {
        self.images.get(disk).ok_or_else(|| self.no_disk(disk))
    }

    fn image_mut(&mut self, disk: usize) -> Result<&mut image::DiskImage> {
        let n = self.images.len();
        self.images
            .get_mut(disk)
            .ok_or_else(|| no_such_disk(disk, n))
    }

    fn no_disk(&self, disk: usize) -> Error {
        no_such_disk(disk, self.images.len())
    }

    fn check_usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    fn check_cycles(&self, what: &str) -> Result<()> {
        self.check_usable()?;
        if self.st.mode != Mode::Consistent {
            return Err(Error::InvalidState(format!(
                "{what} while {:?}",
                self.state()
            )));
        }
        if self.pending_apply.is_some() {
            return Err(Error::InvalidState(format!(
                "{what} while a committed CG awaits apply_committed()"
            )));
        }
        Ok(())
    }

    /// Run a mutating step; any failure inside poisons the store (its in-memory view may
    /// no longer match the files; reopening runs recovery).
    fn guard<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let r = f(self);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn clear_staged(&mut self) {
        self.staged.clear();
        self.copies.clear();
        self.live_bytes = 0;
    }

    fn geometries(&self) -> Vec<Geometry> {
        self.images.iter().map(|i| i.geo).collect()
    }

    fn write_state(&self) -> Result<()> {
        state::write_atomic(&self.dir, &self.st, || {
            self.fault.hit(CrashPoint::MidStateWrite)
        })
    }
}

fn no_such_disk(disk: usize, n: usize) -> Error {
    Error::InvalidArgument(format!(
        "disk {disk} is not in the group (it has {n} disks)"
    ))
}
