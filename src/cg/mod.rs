//! Consistency groups (CG) on the primary: change tracking, freeze/swap/run, copy-on-write
//! preservation and the drain of each consistent set. See DESIGN.md §2.
//!
//! The engine is independent of vhost: queue workers call [`Engine::begin_write`] before a
//! write/discard/write-zeroes touches the disk and [`Engine::complete`] for every completion;
//! the shipper calls [`Engine::form_cg`], [`Engine::next_extent`], [`Engine::confirm`] and
//! [`Engine::try_commit`].
//!
//! # Protocol (who may do what, and why it is consistent)
//!
//! * Two recording structures (`record.rs`): **OOS** (chunks still to ship) and **CR** (chunks
//!   written while the CG in OOS is being formed and drained). Each queue has its own lock that
//!   guards its recording target, its `frozen` flag, its held completions and its publisher.
//!   A write is recorded (bits set + in-flight count) under its queue's lock; a completion is
//!   published or held under the same lock. No lock is shared by all queues on the I/O path.
//! * `form_cg` = **freeze** (lock each queue, set `frozen`: once the lock is taken, any publish
//!   in progress on that queue has finished, which is the queue's acknowledgement), then
//!   **swap** (each queue, under its lock, records into the new CR from now on), then **run**
//!   (each queue, under its lock, clears `frozen` and publishes what it held, in order).
//!   A write W2 that depends on W1 is issued only after W1's completion was published; W1 was
//!   recorded before that publish (recording precedes the disk write, which precedes the
//!   completion). If W2 is in OOS it was recorded before its queue swapped, hence before run,
//!   hence W1 was published before the freeze, hence W1 was recorded before the freeze, i.e.
//!   in OOS too. So a CG never holds W2 without W1.
//! * The drain waits until every write recorded before the swap has finished
//!   ("quiescence") before it reads the disk or preserves a chunk, so it never ships a torn
//!   chunk.
//! * Copy-on-write: a write recorded in CR to a chunk whose OOS bit is still set preserves the
//!   granules (1/64 of a chunk) it overwrites, unless already preserved, before it proceeds.
//!   The drain reads the disk, then under the cache lock overlays the preserved granules and
//!   clears the OOS bit: a writer that finds the bit clear may write freely; a writer that
//!   finds it set preserves first, and its disk write cannot start before its piece is in the
//!   cache, so a drain that read any of the new data finds the piece and overlays it.
//! * Abandonment (cache full, drain too long, preservation failed, link lost) never stalls the
//!   guest: queues switch to recording into OOS, CR is *forwarded* into OOS
//!   (`Record::forward_into`), preserved images are dropped, chunks keep being handed
//!   out; a write in flight re-marks its chunks when it finishes, so a chunk read while being
//!   written is shipped again.

mod bitmap;
mod commit;
mod cow;
mod drain;
mod engine;
mod formation;
mod gate;
mod group;
mod record;
mod recording;
mod shipped;
mod sync;

#[cfg(all(test, feature = "loom"))]
mod loom_tests;
#[cfg(all(test, not(feature = "loom")))]
mod model_tests;
#[cfg(all(test, not(feature = "loom")))]
mod tests;

use std::time::Duration;

pub use crate::blk::tracking::{Completion, Publisher};
#[cfg(all(test, not(feature = "loom")))]
pub(crate) use drain::ChunkImage;
pub use engine::{Engine, FreezeObserver, WriteTicket};
pub use group::{Group, MAX_DISKS};

/// Default tracking granularity (64 KiB).
pub const DEFAULT_CHUNK_SIZE: u64 = crate::config::defaults::CHUNK_SIZE;

/// Configuration of a CG [`Engine`].
#[derive(Debug, Clone)]
pub struct CgConfig {
    /// Size of the disk in bytes.
    pub disk_size: u64,
    /// Tracking granularity in bytes; a power of two (default [`DEFAULT_CHUNK_SIZE`]).
    pub chunk_size: u64,
    /// Longest acceptable freeze (freeze → run); a formation that takes longer is undone.
    pub max_coordination_time: Duration,
    /// Longest acceptable drain of a strict CG before it is abandoned.
    pub max_drain_time: Duration,
    /// Memory limit of the preserved-image (copy-on-write) cache, in bytes.
    pub cow_cache_limit: usize,
}

impl CgConfig {
    /// A configuration for a disk of `disk_size` bytes with the defaults of
    /// [`crate::config::defaults`] (those of the command line).
    pub fn new(disk_size: u64) -> Self {
        use crate::config::defaults;
        CgConfig {
            disk_size,
            chunk_size: defaults::CHUNK_SIZE,
            max_coordination_time: defaults::MAX_COORDINATION_TIME,
            max_drain_time: defaults::MAX_DRAIN_TIME,
            cow_cache_limit: usize::try_from(defaults::COW_CACHE_LIMIT).unwrap_or(usize::MAX),
        }
    }
}

/// Reads the disk's current content (the data path implements it with `pread` on the image).
pub trait ChunkSource: Send + Sync {
    /// Fills `buf` with the disk's bytes at `offset..offset + buf.len()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

/// A CG was formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgFormed {
    /// Its number (1, 2, ...; a number is used once).
    pub cg: u64,
    /// Freeze → run: how long the guest's completions were withheld.
    pub coordination: Duration,
}

/// An extent of the forming CG handed out to the shipper: `count` contiguous chunks from
/// `first`, inside one extent region; its `len` bytes are in the caller's buffer (see
/// [`Engine::next_extent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The disk's index in its [`Group`] (0 from an engine asked on its own).
    pub disk: u16,
    /// The CG it belongs to. The secondary keeps, per chunk, the version with the highest CG
    /// number and ignores versions of CGs it has already committed.
    pub cg: u64,
    /// First chunk (byte offset = `first * chunk_size`).
    pub first: u64,
    /// Chunks (at least 1).
    pub count: u64,
    /// Bytes (shorter than `count * chunk_size` if it ends at a short last chunk).
    pub len: usize,
}

/// Result of [`Engine::try_commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// The CG is committed: its CR is the new OOS.
    Committed,
    /// Not yet: chunks still to hand out (`to_ship`) or handed out and not confirmed.
    Pending {
        /// Chunks of the CG not yet handed out (a lower bound until writes recorded before
        /// the swap have finished).
        to_ship: u64,
        /// Chunks handed out since the last commit and not yet confirmed.
        unconfirmed: u64,
    },
    /// The CG was abandoned: the secondary keeps its data staged but must not commit it.
    Abandoned,
    /// No such CG is being formed (never formed, already committed, or lost with the link).
    Unknown,
}

/// Why a CG formation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FormError {
    /// A strict CG is still being drained; commit it (or lose it) first.
    #[error("CG {cg} is still forming")]
    Busy {
        /// The CG being drained.
        cg: u64,
    },
    /// Freeze → swap took longer than `max_coordination_time`; the formation was undone and
    /// the guest resumed (nothing lost: writes recorded meanwhile were merged into OOS).
    #[error("coordination took {elapsed:?}, limit {limit:?}: formation undone")]
    CoordinationTimeout {
        /// Time spent frozen before the abort.
        elapsed: Duration,
        /// The configured limit.
        limit: Duration,
    },
}

/// Errors of engine construction.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CgError {
    /// The configuration cannot be used.
    #[error("invalid CG configuration: {0}")]
    InvalidConfig(&'static str),
    /// The disk cannot be cut into chunks of this size.
    #[error("invalid CG configuration: {0}")]
    Geometry(#[from] crate::geometry::GeometryError),
}

impl From<CgError> for std::io::Error {
    fn from(e: CgError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}

/// Why a strict CG was abandoned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonReason {
    /// The preserved-image cache would exceed `cow_cache_limit`.
    CacheFull,
    /// The drain ran past `max_drain_time`.
    DrainTimeout,
    /// Reading a chunk to preserve it failed.
    PreserveFailed,
    /// The link to the secondary was lost.
    LinkLost,
    /// Another disk of its [`Group`] abandoned the same CG (a group commits whole or not at
    /// all).
    OtherDisk,
}

/// The engine's current phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgPhase {
    /// No CG forming: writes are recorded in OOS, nothing is handed out.
    Idle,
    /// CG `cg` is being drained strictly (writes recorded in CR, copy-on-write active).
    Strict {
        /// The CG number.
        cg: u64,
    },
    /// CG `cg` was abandoned: writes are recorded in OOS and chunks are still handed out.
    Abandoned {
        /// The CG number.
        cg: u64,
    },
}

/// Counters and gauges for metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct CgStats {
    /// Current phase.
    pub phase: CgPhase,
    /// Last committed CG, 0 if none.
    pub last_committed: u64,
    /// CGs formed (freeze/swap/run completed).
    pub formed: u64,
    /// CGs committed.
    pub committed: u64,
    /// Formations undone because coordination exceeded its limit.
    pub coordination_aborts: u64,
    /// CGs abandoned because the cache was full.
    pub abandoned_cache_full: u64,
    /// CGs abandoned because the drain took too long.
    pub abandoned_drain_timeout: u64,
    /// CGs abandoned because a chunk could not be preserved.
    pub abandoned_preserve_failed: u64,
    /// Strict CGs abandoned because the link was lost.
    pub abandoned_link_lost: u64,
    /// Strict CGs abandoned because another disk of the group abandoned them.
    pub abandoned_other_disk: u64,
    /// Coordination times (ns) of the most recent formations, oldest first (at most 1024).
    pub coordination_ns: Vec<u64>,
    /// Longest coordination time seen (ns).
    pub coordination_max_ns: u64,
    /// Every coordination time since start.
    pub coordination_hist: crate::metrics::histogram::HistogramSnapshot,
    /// Bytes currently held by the copy-on-write cache (preserved granules of chunks not yet
    /// handed out, and preserving reads in progress).
    pub cow_bytes: usize,
    /// Highest `cow_bytes` seen.
    pub cow_peak_bytes: usize,
    /// Chunks of which copy-on-write preserved at least one granule.
    pub chunks_preserved: u64,
    /// Chunks handed out by `next_extent`.
    pub chunks_handed_out: u64,
    /// Extents handed out by `next_extent` (each one message on the link).
    pub extents_handed_out: u64,
    /// Chunks set in OOS.
    pub oos_dirty: u64,
    /// Chunks set in CR (0 when no CG is strict).
    pub cr_dirty: u64,
    /// Chunks handed out since the last commit (shipped again after a link loss).
    pub shipped_uncommitted: u64,
    /// Chunks handed out and not yet confirmed.
    pub unconfirmed: u64,
}
