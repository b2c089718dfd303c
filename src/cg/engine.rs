//! The CG engine of one disk: its state and accessors. The phases live in sibling modules:
//! `recording` (write path), `gate` (completion path), `formation` (freeze/swap/run), `cow`
//! (copy-on-write), `drain` (hand-out and abandonment) and `commit`.

use std::collections::{HashMap, VecDeque};

use std::sync::Arc;

use super::cow::Cache;
use super::drain::Drain;
use super::record::Record;
use super::shipped::Shipped;
use super::sync::{lock, Condvar, Mutex, MutexGuard};
use super::{
    AbandonReason, CgConfig, CgError, CgPhase, CgStats, ChunkSource, Completion, Publisher,
};
use crate::blk::tracking::WriteGuard;
use crate::geometry::Geometry;

/// State of one queue, guarded by that queue's own lock.
pub(crate) struct QueueState {
    /// Where writes of this queue are recorded.
    pub(super) target: Arc<Record>,
    /// The strict CG whose CR is `target`, if any (copy-on-write context).
    pub(super) drain: Option<Arc<Drain>>,
    pub(crate) frozen: bool,
    /// Completions withheld during a freeze (or left over for lack of a publisher), in order.
    pub(super) held: Vec<Completion>,
    pub(super) publisher: Option<Publisher>,
}

pub(super) enum Mode {
    Idle,
    Strict { drain: Arc<Drain>, cr: Arc<Record> },
    Abandoned { cg: u64 },
}

/// Shipper-side state (formation, drain, commit); never taken on the write or completion path
/// except to abandon a CG.
pub(super) struct Central {
    pub(super) mode: Mode,
    pub(super) oos: Arc<Record>,
    /// Records forwarded into `oos` that may still have writes in flight.
    pub(super) retired: Vec<Arc<Record>>,
    /// Chunks handed out since the last commit.
    pub(super) shipped: Shipped,
    /// Extents handed out and not confirmed yet: (first chunk, chunks, CG). The drain
    /// confirms each before it hands out the next, so this holds one or two entries.
    pub(super) outstanding: Vec<(u64, u64, u64)>,
    pub(super) cursor: u64,
    pub(super) next_cg: u64,
    pub(super) first_uncommitted: u64,
    pub(super) last_committed: u64,
    pub(super) formed: u64,
    pub(super) committed: u64,
    pub(super) coordination_aborts: u64,
    pub(super) abandoned: [u64; 5],
    pub(super) coordination: VecDeque<u64>,
    pub(super) coordination_max: u64,
    /// Every coordination time since start (what `/metrics` exposes).
    pub(super) coordination_hist: crate::metrics::histogram::Histogram,
    pub(super) handed_out: u64,
    pub(super) extents_handed_out: u64,
}

/// The consistency-group engine of one disk. Shared via `Arc` by all queue workers and the
/// shipper thread.
///
/// Lock order: central → one queue at a time (→ publisher callback); central → cache;
/// a record's idle lock is a leaf. The write path takes its queue lock, then (separately) the
/// cache lock, and the central lock only to abandon a CG.
pub struct Engine {
    pub(super) cfg: CgConfig,
    pub(super) chunks: u64,
    pub(super) geometry: Geometry,
    pub(super) source: Arc<dyn ChunkSource>,
    pub(super) queues: Box<[Mutex<QueueState>]>,
    pub(super) central: Mutex<Central>,
    pub(super) cache: Mutex<Cache>,
    pub(super) cache_cv: Condvar,
    pub(super) freeze_observer: Mutex<Option<FreezeObserver>>,
}

/// Called while every queue is frozen; see [`Engine::set_freeze_observer`].
pub type FreezeObserver = Arc<dyn Fn() + Send + Sync>;

/// Proof that a write was recorded: the data path's [`WriteGuard`]. Until it is dropped, the
/// drain does not read the chunks it recorded before a swap.
pub type WriteTicket = WriteGuard;

impl Engine {
    /// Creates the engine for a disk served by `num_queues` queues. Every chunk starts clean
    /// (call [`Engine::mark_all`] for an initial full copy).
    pub fn new(
        cfg: CgConfig,
        num_queues: usize,
        source: Arc<dyn ChunkSource>,
    ) -> Result<Arc<Self>, CgError> {
        let geometry = Geometry::new(cfg.disk_size, cfg.chunk_size)?;
        if num_queues == 0 {
            return Err(CgError::InvalidConfig("at least one queue is needed"));
        }
        let chunks = geometry.chunks();
        let oos = Arc::new(Record::new(chunks));
        let queues = (0..num_queues)
            .map(|_| {
                Mutex::new(QueueState {
                    target: Arc::clone(&oos),
                    drain: None,
                    frozen: false,
                    held: Vec::new(),
                    publisher: None,
                })
            })
            .collect();
        Ok(Arc::new(Engine {
            chunks,
            geometry,
            source,
            queues,
            central: Mutex::new(Central {
                mode: Mode::Idle,
                oos,
                retired: Vec::new(),
                shipped: Shipped::new(chunks),
                outstanding: Vec::new(),
                cursor: 0,
                next_cg: 1,
                first_uncommitted: 1,
                last_committed: 0,
                formed: 0,
                committed: 0,
                coordination_aborts: 0,
                abandoned: [0; 5],
                coordination: VecDeque::new(),
                coordination_max: 0,
                coordination_hist: Default::default(),
                handed_out: 0,
                extents_handed_out: 0,
            }),
            cache: Mutex::new(Cache {
                cg: 0,
                slots: HashMap::new(),
                bytes: 0,
                peak: 0,
                next_token: 0,
                preserved: 0,
                spare: Vec::new(),
            }),
            cache_cv: Condvar::new(),
            freeze_observer: Mutex::new(None),
            cfg,
        }))
    }

    /// Number of chunks tracked.
    pub fn num_chunks(&self) -> u64 {
        self.chunks
    }

    /// Where the drain reads the disk.
    pub fn source(&self) -> &Arc<dyn ChunkSource> {
        &self.source
    }

    /// The configuration.
    pub fn config(&self) -> &CgConfig {
        &self.cfg
    }

    /// Bytes of chunk `i` (`i` below [`Engine::num_chunks`]).
    pub(super) fn chunk_len(&self, i: u64) -> usize {
        self.geometry.chunk_len(i).unwrap_or(0)
    }

    /// The current phase.
    pub fn phase(&self) -> CgPhase {
        phase_of(&lock(&self.central))
    }

    /// Counters and gauges.
    pub fn stats(&self) -> CgStats {
        let c = lock(&self.central);
        let cache: MutexGuard<'_, Cache> = lock(&self.cache);
        CgStats {
            phase: phase_of(&c),
            last_committed: c.last_committed,
            formed: c.formed,
            committed: c.committed,
            coordination_aborts: c.coordination_aborts,
            abandoned_cache_full: c.abandoned[AbandonReason::CacheFull as usize],
            abandoned_drain_timeout: c.abandoned[AbandonReason::DrainTimeout as usize],
            abandoned_preserve_failed: c.abandoned[AbandonReason::PreserveFailed as usize],
            abandoned_link_lost: c.abandoned[AbandonReason::LinkLost as usize],
            abandoned_other_disk: c.abandoned[AbandonReason::OtherDisk as usize],
            coordination_ns: c.coordination.iter().copied().collect(),
            coordination_max_ns: c.coordination_max,
            coordination_hist: c.coordination_hist.snapshot(),
            cow_bytes: cache.bytes,
            cow_peak_bytes: cache.peak,
            chunks_preserved: cache.preserved,
            chunks_handed_out: c.handed_out,
            extents_handed_out: c.extents_handed_out,
            oos_dirty: c.oos.bits.count(),
            cr_dirty: match &c.mode {
                Mode::Strict { cr, .. } => cr.bits.count(),
                _ => 0,
            },
            shipped_uncommitted: c.shipped.count(),
            unconfirmed: c.unconfirmed(),
        }
    }
}

#[cfg(all(test, not(feature = "loom")))]
impl Engine {
    /// The per-queue gates, for tests that need to freeze a queue by hand.
    pub(crate) fn queues_for_test(&self) -> &[Mutex<QueueState>] {
        &self.queues
    }
}

fn phase_of(c: &Central) -> CgPhase {
    match &c.mode {
        Mode::Idle => CgPhase::Idle,
        Mode::Strict { drain, .. } => CgPhase::Strict { cg: drain.cg },
        Mode::Abandoned { cg } => CgPhase::Abandoned { cg: *cg },
    }
}
