//! The secondary's durable replica store (DESIGN.md §3): the replica image, a staging
//! journal and a state file, crash-safe.
//!
//! # Files (in the state directory)
//! - `state.json` — identity (disk uuid, size, chunk size) and state (syncing / consistent
//!   at CG n / promoted), replaced atomically (temp + fsync + rename + fsync dir).
//! - `journal` — staging journal of checksummed records (format in [`format`]).
//! - `lock` — `flock`ed while a [`ReplicaStore`] is open (one opener per replica).
//! - The image is a separate path (a file, or a block device).
//!
//! # Life of a CG
//! `stage_chunk` appends a data (or zero) record to the journal (no fsync) and remembers,
//! per chunk, the newest staged version (newest CG wins; data of CGs `<=` the last committed
//! CG is ignored). `commit` then:
//! 1. reads every staged record back and checks its crc (a bad one fails the commit before
//!    anything is committed);
//! 2. fdatasyncs the journal, appends a commit record `(cg, frozen_at, n_chunks)`,
//!    fdatasyncs again — **the CG is now durable; acknowledge the primary**
//!    ([`ReplicaStore::commit_durable`] stops here);
//! 3. applies the staged chunks in place (sorted by chunk index; each record re-verified),
//!    fsyncs the image, writes `state.json` (consistent at `cg`), and resets the journal to
//!    a single checkpoint record (truncate + write + fdatasync)
//!    ([`ReplicaStore::apply_committed`]).
//!
//! # Bound on staging disk use
//! The journal only ever holds uncommitted data (it is reset at every commit), and the
//! in-memory index keeps one live record per chunk. Superseded records are dead bytes;
//! when `dead > live` and `dead >= compact_min_dead_bytes` (default 64 MiB) the journal is
//! compacted (live records copied to `journal.new`, fsync, rename, fsync dir). Hence, with
//! `L = nchunks * 48 + disk_size` (every chunk staged once, 48-byte headers):
//! `journal <= 2 L + compact_min_dead_bytes + one record`, plus `<= L` for `journal.new`
//! while a compaction runs — however many CGs fail. All-zero chunks are stored as 48-byte
//! zero records. The in-memory index is ~40 bytes per staged chunk.
//!
//! # Recovery (on `open`)
//! State `consistent`: the journal is scanned from its checkpoint record, verifying every
//! record. Every complete commit record makes its CG's chunks (the newest version per chunk
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
//! | `AfterCommitDurable`, `MidApply(k)`, `BeforeImageSync` | this CG, re-applied from the journal |
//! | `MidStateWrite` | this CG (from the journal; the stale `state.json.tmp` is removed) |
//! | `BeforeJournalReset`, `MidJournalReset` | this CG (state says so; replay is idempotent) |
//! | `AfterSyncChunk`, `BeforeFinishSyncState` | still syncing (done count restarts at 0) |
//!
//! # Limitations
//! - Sync progress is not persisted: after a restart while syncing the state is
//!   `Syncing { done_chunks: 0 }` and the primary must resend the whole sync set.
//! - A bit flip in the *last* commit record is indistinguishable from a torn write: the
//!   replica falls back to the previous CG although the primary was acknowledged. The
//!   handshake's "last committed CG" exposes it; the primary must then resync.
//! - No power-loss model in the tests (only process crashes); the fsync ordering is what
//!   makes power loss safe and is argued above, not tested.

mod error;
mod fault;
mod format;
pub mod identity;
mod journal;
mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub use error::{Error, Result};
pub use fault::{CrashMode, CrashPoint};

use fault::Fault;
use format::{Header, RecordType};
use journal::{Entry, Geometry, Journal, JOURNAL_FILE, JOURNAL_NEW};
use state::{Mode, StateFile, STATE_FORMAT, STATE_TMP};

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

/// Chunk content handed to [`ReplicaStore::stage_chunk`].
#[derive(Clone, Copy, Debug)]
pub enum ChunkData<'a> {
    /// Exactly the chunk's length (the last chunk of the disk may be short).
    Bytes(&'a [u8]),
    /// The chunk reads as zeros.
    Zero,
}

/// What `stage_chunk` did with a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageOutcome {
    /// Staged for the next commit.
    Staged,
    /// A version of a newer CG is already staged for this chunk; this one was ignored.
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
    /// Staged records of an uncommitted CG that were dropped.
    pub discarded_records: u64,
    /// Offset where a torn/corrupt tail (after the last commit) was cut off.
    pub torn_tail_at: Option<u64>,
    /// Journal size found on open.
    pub journal_bytes: u64,
}

/// One replica: image + staging journal + state. See the module docs.
pub struct ReplicaStore {
    dir: PathBuf,
    image_path: PathBuf,
    image: File,
    image_is_file: bool,
    geo: Geometry,
    st: StateFile,
    journal: Journal,
    /// Newest staged version per chunk (uncommitted, or committed-but-not-applied while
    /// `pending_apply` is set).
    staged: HashMap<u64, Entry>,
    live_bytes: u64,
    compact_min_dead: u64,
    /// A commit record for this (cg, frozen_at) is durable but not yet applied.
    pending_apply: Option<(u64, u64)>,
    sync_done: Vec<u64>,
    sync_done_count: u64,
    fault: Fault,
    poisoned: bool,
    _lock: File,
}

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
            fault: Fault::from_env(),
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
        tracing::info!(dir = %state_dir.display(), state = ?store.state(), ?report, "replica opened");
        Ok((store, report))
    }

    fn recover(&mut self, report: &mut RecoveryReport) -> Result<()> {
        let scan = self.journal.scan(self.geo)?;
        report.discarded_records = scan.uncommitted_records;
        report.torn_tail_at = scan.torn_at;
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
            let mut entries: Vec<(u64, Entry)> = scan.committed.into_iter().collect();
            entries.sort_unstable_by_key(|(i, _)| *i);
            report.replayed_cg = Some(cg);
            report.chunks_applied = entries.len() as u64;
            tracing::info!(
                cg,
                chunks = entries.len(),
                "replaying committed CG from the journal"
            );
            self.apply_entries(&entries)?;
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

    // ----- accessors -----

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

    /// The replica image.
    pub fn image_path(&self) -> &Path {
        &self.image_path
    }
    /// The open replica image, for reading it (tests check it after a commit). Writing to it
    /// behind the store's back voids its guarantees.
    pub fn image_file(&self) -> &File {
        &self.image
    }
    /// Disk size in bytes.
    pub fn disk_size(&self) -> u64 {
        self.geo.disk_size()
    }
    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        self.geo.chunk_size()
    }
    /// Number of chunks.
    pub fn nchunks(&self) -> u64 {
        self.geo.chunks()
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

    /// Arm (or disarm with `None`) a crash point. Test hook; see [`CrashPoint`].
    /// Also armable with the environment variable `DRBLK_SECONDARY_CRASH_AT` (aborts).
    pub fn set_crash_point(&mut self, point: Option<(CrashPoint, CrashMode)>) {
        self.fault.arm(point);
    }

    // ----- initial / re-synchronisation -----

    /// Start a full or incremental sync: the image becomes knowingly inconsistent.
    /// Allowed in any state (also to rejoin as secondary after a promotion). Drops
    /// anything staged.
    pub fn begin_sync(&mut self, total_chunks: u64) -> Result<()> {
        self.check_usable()?;
        self.guard(|s| {
            s.st.mode = Mode::Syncing { total_chunks };
            s.st.last_committed_cg = 0;
            s.st.frozen_at_unix_us = 0;
            s.write_state()?;
            s.clear_staged();
            s.journal.reset(0, 0, &s.fault)?;
            s.sync_done.iter_mut().for_each(|w| *w = 0);
            s.sync_done_count = 0;
            Ok(())
        })
    }

    /// Write one chunk of the sync set directly into the image (not synced yet).
    pub fn sync_chunk(&mut self, index: u64, data: &[u8]) -> Result<()> {
        self.sync_write(index, ChunkData::Bytes(data))
    }

    /// Sync a chunk that reads as zeros.
    pub fn sync_zero(&mut self, index: u64) -> Result<()> {
        self.sync_write(index, ChunkData::Zero)
    }

    fn sync_write(&mut self, index: u64, data: ChunkData<'_>) -> Result<()> {
        self.check_usable()?;
        if !matches!(self.st.mode, Mode::Syncing { .. }) {
            return Err(Error::InvalidState(format!(
                "sync_chunk while {:?}",
                self.state()
            )));
        }
        self.check_chunk(index, &data)?;
        self.guard(|s| {
            s.write_image(index, data)?;
            let (w, b) = ((index / 64) as usize, 1u64 << (index % 64));
            if s.sync_done[w] & b == 0 {
                s.sync_done[w] |= b;
                s.sync_done_count += 1;
            }
            s.fault.hit(CrashPoint::AfterSyncChunk)
        })
    }

    /// End the sync: the image now holds CG `cg` (the sync set was formed as that CG).
    /// Fsyncs the image, then records `Consistent { cg }` durably.
    pub fn finish_sync(&mut self, cg: u64, frozen_at_unix_us: u64) -> Result<()> {
        self.check_usable()?;
        if !matches!(self.st.mode, Mode::Syncing { .. }) {
            return Err(Error::InvalidState(format!(
                "finish_sync while {:?}",
                self.state()
            )));
        }
        if cg == 0 {
            return Err(Error::InvalidArgument("CG numbers start at 1".into()));
        }
        self.guard(|s| {
            s.image
                .sync_all()
                .map_err(error::io("fsync", &s.image_path))?;
            s.fault.hit(CrashPoint::BeforeFinishSyncState)?;
            s.st.mode = Mode::Consistent;
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen_at_unix_us;
            s.write_state()?;
            s.journal.reset(cg, frozen_at_unix_us, &s.fault)
        })
    }

    // ----- CG cycles -----

    /// Stage one chunk of CG `cg` in the journal (appended, not synced). Keeps only the
    /// newest version per chunk (newest CG wins; for equal CGs the later call wins).
    pub fn stage_chunk(
        &mut self,
        cg: u64,
        index: u64,
        data: ChunkData<'_>,
    ) -> Result<StageOutcome> {
        self.check_cycles("stage_chunk")?;
        if cg == 0 {
            return Err(Error::InvalidArgument("CG numbers start at 1".into()));
        }
        self.check_chunk(index, &data)?;
        if cg <= self.st.last_committed_cg {
            return Ok(StageOutcome::AlreadyCommitted);
        }
        if self.staged.get(&index).is_some_and(|e| e.cg > cg) {
            return Ok(StageOutcome::Superseded);
        }
        let data = match data {
            ChunkData::Bytes(b) if b.iter().all(|&x| x == 0) => ChunkData::Zero,
            d => d,
        };
        self.guard(|s| {
            let (rt, payload): (_, &[u8]) = match data {
                ChunkData::Bytes(b) => (RecordType::Data, b),
                ChunkData::Zero => (RecordType::Zero, &[]),
            };
            let len = payload.len() as u32;
            let off = s
                .journal
                .append(Header::new(rt, s.journal.gen, cg, index, 0, len), payload)?;
            let e = Entry {
                cg,
                offset: off,
                len,
                zero: rt == RecordType::Zero,
            };
            if let Some(old) = s.staged.insert(index, e) {
                s.live_bytes -= old.record_len();
            }
            s.live_bytes += e.record_len();
            s.fault.hit(CrashPoint::AfterStage)?;
            let dead = s.journal.len - format::HEADER_LEN as u64 - s.live_bytes;
            if dead > s.live_bytes && dead >= s.compact_min_dead {
                tracing::debug!(dead, live = s.live_bytes, "compacting staging journal");
                s.journal.compact(&mut s.staged, &s.fault)?;
            }
            Ok(StageOutcome::Staged)
        })
    }

    /// Commit CG `cg`: [`commit_durable`](Self::commit_durable) then
    /// [`apply_committed`](Self::apply_committed).
    pub fn commit(&mut self, cg: u64, frozen_at_unix_us: u64) -> Result<()> {
        self.commit_durable(cg, frozen_at_unix_us)?;
        self.apply_committed()
    }

    /// Make CG `cg` durable: verify the staged records, fdatasync, write the commit
    /// record, fdatasync. When this returns Ok the CG survives any crash: acknowledge the
    /// primary. All staged chunks must belong to CGs `<= cg`. Committing the last committed
    /// CG again with nothing staged is a no-op (a repeated "complete" after a reconnect).
    pub fn commit_durable(&mut self, cg: u64, frozen_at_unix_us: u64) -> Result<()> {
        self.check_cycles("commit")?;
        if cg == self.st.last_committed_cg && self.staged.is_empty() {
            return Ok(());
        }
        if cg <= self.st.last_committed_cg {
            return Err(Error::InvalidArgument(format!(
                "commit of CG {cg}, but CG {} is already committed",
                self.st.last_committed_cg
            )));
        }
        if let Some((i, e)) = self.staged.iter().find(|(_, e)| e.cg > cg) {
            return Err(Error::InvalidArgument(format!(
                "commit of CG {cg} while chunk {i} of CG {} is staged",
                e.cg
            )));
        }
        self.guard(|s| {
            let mut buf = Vec::new();
            for (&i, e) in &s.staged {
                s.journal.read_entry(i, e, &mut buf)?;
            }
            s.journal.sync()?;
            s.fault.hit(CrashPoint::BeforeCommitRecord)?;
            let h = Header::new(
                RecordType::Commit,
                s.journal.gen,
                cg,
                s.staged.len() as u64,
                frozen_at_unix_us,
                0,
            );
            if s.fault.is_armed(CrashPoint::TornCommitRecord) {
                s.journal.append_torn(h)?;
                s.fault.hit(CrashPoint::TornCommitRecord)?;
            }
            s.journal.append(h, &[])?;
            s.fault.hit(CrashPoint::AfterCommitRecordWrite)?;
            s.journal.sync()?;
            s.pending_apply = Some((cg, frozen_at_unix_us));
            tracing::debug!(cg, chunks = s.staged.len(), "CG durable");
            s.fault.hit(CrashPoint::AfterCommitDurable)
        })
    }

    /// Apply a CG made durable by `commit_durable`: write its chunks into the image,
    /// fsync, record the new state, reset the journal. No-op if nothing is pending.
    pub fn apply_committed(&mut self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        let Some((cg, frozen)) = self.pending_apply else {
            return Ok(());
        };
        self.guard(|s| {
            let mut entries: Vec<(u64, Entry)> = s.staged.iter().map(|(&i, &e)| (i, e)).collect();
            entries.sort_unstable_by_key(|(i, _)| *i);
            s.apply_entries(&entries)?;
            s.fault.hit(CrashPoint::BeforeImageSync)?;
            s.image
                .sync_all()
                .map_err(error::io("fsync", &s.image_path))?;
            s.st.last_committed_cg = cg;
            s.st.frozen_at_unix_us = frozen;
            s.write_state()?;
            s.fault.hit(CrashPoint::BeforeJournalReset)?;
            s.pending_apply = None;
            s.clear_staged();
            s.journal.reset(cg, frozen, &s.fault)?;
            tracing::debug!(cg, "CG applied");
            Ok(())
        })
    }

    /// Link loss: drop everything staged and not committed.
    pub fn discard_uncommitted(&mut self) -> Result<()> {
        self.check_cycles("discard_uncommitted")?;
        self.guard(|s| {
            s.clear_staged();
            let (cg, frozen) = (s.st.last_committed_cg, s.st.frozen_at_unix_us);
            s.journal.reset(cg, frozen, &s.fault)
        })
    }

    /// Failover: drop uncommitted data and mark the replica promoted (the image, at the
    /// last committed CG, becomes a writable primary disk). Refused while syncing.
    pub fn promote(&mut self) -> Result<()> {
        self.check_cycles("promote")?;
        self.guard(|s| {
            s.clear_staged();
            let (cg, frozen) = (s.st.last_committed_cg, s.st.frozen_at_unix_us);
            s.journal.reset(cg, frozen, &s.fault)?;
            s.st.mode = Mode::Promoted;
            s.write_state()
        })
    }

    // ----- internals -----

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

    fn check_chunk(&self, index: u64, data: &ChunkData<'_>) -> Result<()> {
        if index >= self.geo.chunks() {
            return Err(Error::InvalidArgument(format!(
                "chunk {index} beyond the disk ({} chunks)",
                self.geo.chunks()
            )));
        }
        if let ChunkData::Bytes(b) = data {
            if Some(b.len()) != self.geo.chunk_len(index) {
                return Err(Error::InvalidArgument(format!(
                    "chunk {index} has {} bytes, expected {}",
                    b.len(),
                    self.geo.chunk_len(index).unwrap_or(0)
                )));
            }
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
        self.live_bytes = 0;
    }

    fn write_state(&self) -> Result<()> {
        state::write_atomic(&self.dir, &self.st, || {
            self.fault.hit(CrashPoint::MidStateWrite)
        })
    }

    /// Write `entries` (sorted by index) into the image, re-verifying each record.
    fn apply_entries(&mut self, entries: &[(u64, Entry)]) -> Result<()> {
        let mut buf = Vec::new();
        for (k, (index, e)) in entries.iter().enumerate() {
            self.fault.hit(CrashPoint::MidApply(k as u64))?;
            if e.zero {
                self.write_image(*index, ChunkData::Zero)?;
            } else {
                self.journal.read_entry(*index, e, &mut buf)?;
                self.write_image(*index, ChunkData::Bytes(&buf))?;
            }
        }
        Ok(())
    }

    fn write_image(&self, index: u64, data: ChunkData<'_>) -> Result<()> {
        let off = self.geo.chunk_offset(index);
        let len = self.geo.chunk_len(index).unwrap_or(0) as u64;
        match data {
            ChunkData::Bytes(b) => self
                .image
                .write_all_at(b, off)
                .map_err(error::io("write image", &self.image_path)),
            ChunkData::Zero => {
                if self.image_is_file {
                    match crate::sys::file::punch_hole(&self.image, off, len) {
                        Ok(()) => return Ok(()),
                        Err(e) if crate::sys::file::is_unsupported(&e) => {}
                        Err(e) => {
                            return Err(error::io("punch hole in image", &self.image_path)(e))
                        }
                    }
                }
                let zeros = vec![0u8; len as usize];
                self.image
                    .write_all_at(&zeros, off)
                    .map_err(error::io("write image", &self.image_path))
            }
        }
    }
}

/// The state directory of the replica image `image` unless one is given: `<image>.state`.
pub fn default_state_dir(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".state");
    PathBuf::from(p)
}

/// Identity of the replica stored in `state_dir`, if there is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoredIdentity {
    /// Disk identity.
    pub uuid: [u8; 16],
    /// Disk size.
    pub disk_size: u64,
    /// Chunk size.
    pub chunk_size: u64,
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
