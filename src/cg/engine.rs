//! The CG engine: per-queue gates, formation (freeze/swap/run), copy-on-write and the drain.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::bitmap::Bitmap;
use super::record::Record;
use super::sync::{lock, AtomicBool, Condvar, Mutex, MutexGuard, Ordering};
use super::{
    AbandonReason, CgConfig, CgError, CgFormed, CgPhase, CgStats, ChunkImage, ChunkSource,
    CommitOutcome, Completion, FormError, Publisher,
};
use crate::blk::tracking::{Tracking, WriteEnd, WriteGuard};

/// How many coordination samples [`CgStats::coordination_ns`] keeps.
const COORDINATION_SAMPLES: usize = 1024;

/// Per-CG drain context, shared with the queue workers that record into its CR.
struct Drain {
    cg: u64,
    /// The OOS being drained.
    oos: Arc<Record>,
    /// Every record that writes may have been recorded in before the swap (OOS and records
    /// forwarded into it): the drain must not read the disk before they are all idle.
    pre_swap: Vec<Arc<Record>>,
    /// True while the CG is strict (copy-on-write active). Cleared under the cache lock.
    strict: AtomicBool,
    /// The CG was formed right after an abandoned one: a write from before the swap may still
    /// re-mark an OOS bit that was cleared, so an OOS bit is only final after quiescence.
    remark_possible: bool,
    /// All `pre_swap` records were seen idle (monotonic: nothing records there any more).
    quiesced: AtomicBool,
    deadline: Instant,
}

impl Drain {
    /// Waits until every write recorded before the swap has finished (bounded by the drain
    /// deadline). Returns false on timeout.
    fn wait_quiesced(&self) -> bool {
        if self.quiesced.load(Ordering::SeqCst) {
            return true;
        }
        if !self.pre_swap.iter().all(|r| r.wait_idle(self.deadline)) {
            return false;
        }
        self.quiesced.store(true, Ordering::SeqCst);
        true
    }

    fn is_quiesced(&self) -> bool {
        self.quiesced.load(Ordering::SeqCst) || self.pre_swap.iter().all(|r| r.inflight() == 0)
    }
}

/// State of one queue, guarded by that queue's own lock.
pub(crate) struct QueueState {
    /// Where writes of this queue are recorded.
    target: Arc<Record>,
    /// The strict CG whose CR is `target`, if any (copy-on-write context).
    drain: Option<Arc<Drain>>,
    pub(crate) frozen: bool,
    /// Completions withheld during a freeze (or left over for lack of a publisher), in order.
    held: Vec<Completion>,
    publisher: Option<Publisher>,
}

/// Granules per chunk: copy-on-write preserves the granules a write overwrites, not the
/// whole chunk (a 4 KiB write into a 64 KiB chunk copies 4 KiB, not 64 KiB).
const GRANULES: u64 = 64;

/// The preserved parts of one chunk not yet handed out. Invariants (under the cache lock):
/// `have` and `reading` are disjoint; each granule in `have` is in exactly one piece and holds
/// the chunk's content at the freeze; no write recorded in CR has touched a granule that is in
/// neither (such a write preserves first), nor one in `reading` (its writer has not started
/// the disk write, and other writers of it wait).
struct Slot {
    /// Identifies this slot: a writer stores what it read only into the slot it reserved in.
    token: u64,
    /// Granules preserved.
    have: u64,
    /// Granules a writer is reading right now.
    reading: u64,
    /// (granules it supplies, byte offset in the chunk, bytes read from there).
    pieces: Vec<(u64, usize, Vec<u8>)>,
    /// Bytes counted against the cache limit (pieces and reads in progress).
    reserved: usize,
}

impl Slot {
    /// Overlays the preserved granules onto `buf`, a read of the whole chunk.
    fn overlay(&self, buf: &mut [u8], granule: usize) {
        for (mask, at, data) in &self.pieces {
            let mut m = *mask;
            while m != 0 {
                let g = m.trailing_zeros() as usize;
                m &= m - 1;
                let lo = (g * granule).max(*at);
                let hi = ((g + 1) * granule).min(at + data.len()).min(buf.len());
                if lo < hi {
                    buf[lo..hi].copy_from_slice(&data[lo - at..hi - at]);
                }
            }
        }
    }
}

/// The copy-on-write cache, for the strict CG `cg` only.
struct Cache {
    cg: u64,
    slots: HashMap<u64, Slot>,
    bytes: usize,
    peak: usize,
    next_token: u64,
    preserved: u64,
}

enum Mode {
    Idle,
    Strict { drain: Arc<Drain>, cr: Arc<Record> },
    Abandoned { cg: u64 },
}

/// Shipper-side state (formation, drain, commit); never taken on the write or completion path
/// except to abandon a CG.
struct Central {
    mode: Mode,
    oos: Arc<Record>,
    /// Records forwarded into `oos` that may still have writes in flight.
    retired: Vec<Arc<Record>>,
    /// Chunks handed out since the last commit.
    shipped: Bitmap,
    /// Chunk -> CG of its latest hand-out, until confirmed.
    outstanding: HashMap<u64, u64>,
    cursor: u64,
    next_cg: u64,
    first_uncommitted: u64,
    last_committed: u64,
    formed: u64,
    committed: u64,
    coordination_aborts: u64,
    abandoned: [u64; 4],
    coordination: VecDeque<u64>,
    coordination_max: u64,
    handed_out: u64,
}

/// The consistency-group engine of one disk. Shared via `Arc` by all queue workers and the
/// shipper thread.
///
/// Lock order: central → one queue at a time (→ publisher callback); central → cache;
/// a record's idle lock is a leaf. The write path takes its queue lock, then (separately) the
/// cache lock, and the central lock only to abandon a CG.
pub struct Engine {
    cfg: CgConfig,
    chunks: u64,
    source: Arc<dyn ChunkSource>,
    queues: Box<[Mutex<QueueState>]>,
    central: Mutex<Central>,
    cache: Mutex<Cache>,
    cache_cv: Condvar,
    freeze_observer: Mutex<Option<FreezeObserver>>,
}

/// Called while every queue is frozen; see [`Engine::set_freeze_observer`].
pub type FreezeObserver = Arc<dyn Fn() + Send + Sync>;

/// Proof that a write was recorded: the data path's [`WriteGuard`]. Until it is dropped, the
/// drain does not read the chunks it recorded before a swap.
pub type WriteTicket = WriteGuard;

impl WriteEnd for Record {
    fn end_write(&self, first: u64, last: u64) {
        self.exit(first, last);
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Engine {
    /// Creates the engine for a disk served by `num_queues` queues. Every chunk starts clean
    /// (call [`Engine::mark_all`] for an initial full copy).
    pub fn new(
        cfg: CgConfig,
        num_queues: usize,
        source: Arc<dyn ChunkSource>,
    ) -> Result<Arc<Self>, CgError> {
        if cfg.chunk_size == 0 || !cfg.chunk_size.is_power_of_two() {
            return Err(CgError::InvalidConfig("chunk_size must be a power of two"));
        }
        if cfg.disk_size == 0 {
            return Err(CgError::InvalidConfig("disk_size must not be 0"));
        }
        if usize::try_from(cfg.chunk_size).is_err() {
            return Err(CgError::InvalidConfig("chunk_size does not fit in memory"));
        }
        if num_queues == 0 {
            return Err(CgError::InvalidConfig("at least one queue is needed"));
        }
        let chunks = cfg.disk_size.div_ceil(cfg.chunk_size);
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
            source,
            queues,
            central: Mutex::new(Central {
                mode: Mode::Idle,
                oos,
                retired: Vec::new(),
                shipped: Bitmap::new(chunks),
                outstanding: HashMap::new(),
                cursor: 0,
                next_cg: 1,
                first_uncommitted: 1,
                last_committed: 0,
                formed: 0,
                committed: 0,
                coordination_aborts: 0,
                abandoned: [0; 4],
                coordination: VecDeque::new(),
                coordination_max: 0,
                handed_out: 0,
            }),
            cache: Mutex::new(Cache {
                cg: 0,
                slots: HashMap::new(),
                bytes: 0,
                peak: 0,
                next_token: 0,
                preserved: 0,
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

    /// The configuration.
    pub fn config(&self) -> &CgConfig {
        &self.cfg
    }

    fn chunk_len(&self, i: u64) -> usize {
        // Fits: chunk_size fits in usize (checked in `new`).
        (self
            .cfg
            .chunk_size
            .min(self.cfg.disk_size - i * self.cfg.chunk_size)) as usize
    }

    /// Write path, queue worker `q`, before a write/discard/write-zeroes touches the disk range
    /// `[offset, offset + len)`.
    ///
    /// Records the chunks in this queue's current structure and, if the forming CG still has
    /// to ship one of them, preserves the part it overwrites first (copy-on-write). May block while writes recorded
    /// before the last swap finish (bounded by `max_drain_time`): so a caller must not hold
    /// another unfinished `WriteTicket` when it calls this (a synchronous per-queue data path
    /// never does). Fails only for an invalid queue or range. `len == 0` records nothing.
    pub fn begin_write(&self, q: usize, offset: u64, len: u64) -> io::Result<WriteTicket> {
        let gate = self
            .queues
            .get(q)
            .ok_or_else(|| invalid("cg: no such queue"))?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.cfg.disk_size)
            .ok_or_else(|| invalid("cg: write beyond the end of the disk"))?;
        if len == 0 {
            return Ok(WriteGuard::untracked());
        }
        let (first, last) = (
            offset / self.cfg.chunk_size,
            (end - 1) / self.cfg.chunk_size,
        );
        // Recording happens under the queue lock, like the swap of this queue's target: the
        // write is counted and marked either in the old structure (before the swap: shipped in
        // the CG being formed, and the drain waits for this ticket) or in the new one.
        let (rec, drain) = {
            let g = lock(gate);
            g.target.enter(first, last);
            (Arc::clone(&g.target), g.drain.clone())
        };
        let ticket = WriteGuard::new(rec, first, last);
        if let Some(d) = drain {
            self.preserve_range(&d, offset, end);
        }
        Ok(ticket)
    }

    /// Bytes per copy-on-write granule.
    fn granule(&self) -> usize {
        // Fits: chunk_size fits in usize (checked in `new`).
        (self.cfg.chunk_size / GRANULES).max(1) as usize
    }

    /// Copy-on-write for a write of `[offset, end)` recorded in the CR of the strict CG `d`.
    fn preserve_range(&self, d: &Drain, offset: u64, end: u64) {
        let cs = self.cfg.chunk_size;
        let (first, last) = (offset / cs, (end - 1) / cs);
        if !d.strict.load(Ordering::SeqCst) {
            return;
        }
        // After an abandoned CG, a write from before the swap may still re-mark a cleared OOS
        // bit: wait until they are done before trusting a clear bit.
        if d.remark_possible && !d.wait_quiesced() {
            self.abandon(d.cg, AbandonReason::DrainTimeout);
            return;
        }
        // Fast path: none of the chunks is still to be shipped. A clear bit is final: before
        // the swap this queue's lock chain makes every pre-swap mark visible, and after the
        // swap a bit is cleared only once its chunk was captured (see `next_chunk`).
        if !d.oos.bits.any_in(first, last) {
            return;
        }
        let g = self.granule() as u64;
        for i in first..=last {
            // The granules of chunk i this write overwrites.
            let base = i * cs;
            let lo = (offset.max(base) - base) / g;
            let hi = (end.min(base + cs) - base).div_ceil(g);
            let mask = if hi - lo >= 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if !self.preserve_granules(d, i, mask) {
                return;
            }
        }
    }

    /// Preserves the granules `mask` of chunk `i` for the strict CG `d`, except those already
    /// preserved, unless the chunk was captured. Returns false when `d` is no longer strict
    /// (nothing more to preserve).
    fn preserve_granules(&self, d: &Drain, i: u64, mask: u64) -> bool {
        let granule = self.granule();
        let chunk_len = self.chunk_len(i);
        let (token, need, at, len) = {
            let mut c = lock(&self.cache);
            loop {
                if !d.strict.load(Ordering::SeqCst) || c.cg != d.cg {
                    return false;
                }
                // Checked under the cache lock, where `next_chunk` clears it after reading.
                if !d.oos.bits.test(i) {
                    return true;
                }
                let (have, reading) = c.slots.get(&i).map_or((0, 0), |s| (s.have, s.reading));
                let need = mask & !have;
                if need == 0 {
                    return true;
                }
                if need & reading != 0 {
                    // Another writer is preserving some of them; our write must wait for it.
                    c = self.cache_cv.wait(c).expect("cg: cache lock poisoned");
                    continue;
                }
                // One read spans the needed granules (granules between them that are already
                // preserved are read too, but only `need` is taken from this read).
                let at = need.trailing_zeros() as usize * granule;
                let to = ((64 - need.leading_zeros()) as usize * granule).min(chunk_len);
                let len = to - at;
                if c.bytes + len > self.cfg.cow_cache_limit {
                    drop(c);
                    self.abandon(d.cg, AbandonReason::CacheFull);
                    return false;
                }
                c.bytes += len;
                c.peak = c.peak.max(c.bytes);
                // Tokens only need to be unique: a new slot takes the next one.
                let token = c.next_token;
                c.next_token += 1;
                let slot = c.slots.entry(i).or_insert_with(|| Slot {
                    token,
                    have: 0,
                    reading: 0,
                    pieces: Vec::new(),
                    reserved: 0,
                });
                slot.reading |= need;
                slot.reserved += len;
                break (slot.token, need, at, len);
            }
        };
        // Writes recorded before the swap may still be writing this chunk: reading it before
        // they finish would preserve a torn chunk.
        if !d.wait_quiesced() {
            self.end_reading(i, token, need, len, None);
            self.abandon(d.cg, AbandonReason::DrainTimeout);
            return false;
        }
        let mut buf = vec![0u8; len];
        match self
            .source
            .read_at(&mut buf, i * self.cfg.chunk_size + at as u64)
        {
            // The piece is in the cache before this write touches the disk: a drain that
            // reads the disk and then (under the cache lock) finds it overlays it.
            Ok(()) => {
                self.end_reading(i, token, need, len, Some((at, buf)));
                true
            }
            Err(e) => {
                self.end_reading(i, token, need, len, None);
                warn!(cg = d.cg, chunk = i, error = %e, "cg: cannot preserve chunk");
                self.abandon(d.cg, AbandonReason::PreserveFailed);
                false
            }
        }
    }

    /// A preserving read of granules `need` of chunk `i` ended: store the piece (`Some`) or
    /// give its reservation back. Nothing to do if the slot is gone (the chunk was handed
    /// out, or the CG stopped being strict: its reservation went with it).
    fn end_reading(
        &self,
        i: u64,
        token: u64,
        need: u64,
        len: usize,
        piece: Option<(usize, Vec<u8>)>,
    ) {
        let mut c = lock(&self.cache);
        let cache = &mut *c;
        if let Some(slot) = cache.slots.get_mut(&i).filter(|s| s.token == token) {
            slot.reading &= !need;
            match piece {
                Some((at, data)) => {
                    if slot.have == 0 {
                        cache.preserved += 1;
                    }
                    slot.have |= need;
                    slot.pieces.push((need, at, data));
                }
                None => {
                    slot.reserved -= len;
                    cache.bytes -= len;
                    if slot.have == 0 && slot.reading == 0 {
                        cache.slots.remove(&i);
                    }
                }
            }
        }
        drop(c);
        self.cache_cv.notify_all();
    }

    /// Completion path, queue `q`: publishes `items` (and anything held before them) through
    /// `publish`, or holds them in order while the queue is frozen. `items` is left empty.
    ///
    /// The check of `frozen` and the publish happen under the queue's lock, so once a freeze
    /// has taken that lock no publish is in progress and none starts until run.
    ///
    /// # Panics
    /// If `q` is not a queue of this engine (a programming error).
    pub fn complete(&self, q: usize, items: &mut Vec<Completion>, publish: &dyn Fn(&[Completion])) {
        let mut g = lock(&self.queues[q]);
        if g.frozen {
            g.held.append(items);
            return;
        }
        if !g.held.is_empty() {
            // Left over from a run without a publisher: they go first, to keep the order.
            g.held.append(items);
            let held = mem::take(&mut g.held);
            publish(&held);
        } else if !items.is_empty() {
            publish(items);
            items.clear();
        }
    }

    /// Sets (or clears) the publisher used at "run" to publish the completions held during a
    /// freeze. Held items survive a clear; without a publisher at run they stay held until the
    /// queue's next [`Engine::complete`] (published first) or [`Engine::discard_held`].
    ///
    /// # Panics
    /// If `q` is not a queue of this engine.
    pub fn set_publisher(&self, q: usize, p: Option<Publisher>) {
        lock(&self.queues[q]).publisher = p;
    }

    /// Number of completions queue `q` holds right now (a frozen queue, or leftovers).
    pub fn held(&self, q: usize) -> usize {
        lock(&self.queues[q]).held.len()
    }

    /// Installs a function called while every queue is frozen (after the swap, before run),
    /// so tests and diagnostics can observe the guest-visible state inside the window.
    pub fn set_freeze_observer(&self, f: Option<FreezeObserver>) {
        *lock(&self.freeze_observer) = f;
    }

    /// Drops the completions held for queue `q` (its connection went away); returns how many.
    ///
    /// # Panics
    /// If `q` is not a queue of this engine.
    pub fn discard_held(&self, q: usize) -> usize {
        mem::take(&mut lock(&self.queues[q]).held).len()
    }

    /// Forms the next CG: freeze, swap, run. Fails if a strict CG is still draining, or if
    /// coordination exceeds `max_coordination_time` (the formation is then undone: the guest
    /// resumes and writes recorded meanwhile are merged into OOS).
    pub fn form_cg(&self) -> Result<CgFormed, FormError> {
        self.form_cg_inner(false)
    }

    /// `form_cg`, with a test hook that aborts after the swap.
    pub(crate) fn form_cg_inner(&self, abort_after_swap: bool) -> Result<CgFormed, FormError> {
        // Allocated before anything is frozen: the freeze must be short.
        let cr = Arc::new(Record::new(self.chunks));
        let mut c = lock(&self.central);
        let remark_possible = match &c.mode {
            Mode::Strict { drain, .. } => return Err(FormError::Busy { cg: drain.cg }),
            Mode::Abandoned { .. } => true,
            Mode::Idle => false,
        };
        c.retired.retain(|r| r.inflight() > 0);
        let cg = c.next_cg;
        let mut pre_swap = vec![Arc::clone(&c.oos)];
        pre_swap.extend(c.retired.iter().cloned());
        let limit = self.cfg.max_coordination_time;
        let t0 = Instant::now();
        let drain = Arc::new(Drain {
            cg,
            oos: Arc::clone(&c.oos),
            pre_swap,
            strict: AtomicBool::new(true),
            remark_possible,
            quiesced: AtomicBool::new(false),
            deadline: t0 + self.cfg.max_drain_time,
        });
        {
            let mut cache = lock(&self.cache);
            debug_assert!(cache.slots.is_empty());
            cache.cg = cg;
        }

        // 1. Freeze. Taking a queue's lock waits for a publish in progress there (publishes
        //    happen under it): once every queue is frozen, nothing can complete visibly.
        for gate in self.queues.iter() {
            lock(gate).frozen = true;
        }
        let elapsed = t0.elapsed();
        if elapsed > limit {
            self.run_queues();
            return Err(self.coordination_abort(&mut c, cg, elapsed));
        }

        // 2. Swap. Per queue, under its lock (atomic with that queue's recording). Queues may
        //    switch one after the other: no completion is visible until run, so no write
        //    recorded in CR can be the cause of a write recorded in OOS.
        for gate in self.queues.iter() {
            let mut g = lock(gate);
            g.target = Arc::clone(&cr);
            g.drain = Some(Arc::clone(&drain));
        }
        let elapsed = t0.elapsed();
        if elapsed > limit || abort_after_swap {
            // Undo: switch back to OOS and forward CR into it (writes recorded in CR meanwhile
            // keep their bits, in-flight ones re-mark OOS when done). Still frozen, so nothing
            // recorded in CR has been acknowledged.
            self.stop_cow(&drain);
            self.retarget_queues(&c.oos);
            cr.forward_into(&c.oos);
            c.retired.push(cr);
            self.run_queues();
            return Err(self.coordination_abort(&mut c, cg, elapsed));
        }

        if let Some(observe) = lock(&self.freeze_observer).clone() {
            observe();
        }

        // 3. Run: publish what was held, in order, and let completions through again.
        self.run_queues();
        let coordination = t0.elapsed();

        let ns = u64::try_from(coordination.as_nanos()).unwrap_or(u64::MAX);
        if c.coordination.len() == COORDINATION_SAMPLES {
            c.coordination.pop_front();
        }
        c.coordination.push_back(ns);
        c.coordination_max = c.coordination_max.max(ns);
        c.mode = Mode::Strict { drain, cr };
        c.next_cg += 1;
        c.cursor = 0;
        c.formed += 1;
        Ok(CgFormed { cg, coordination })
    }

    fn coordination_abort(&self, c: &mut Central, cg: u64, elapsed: Duration) -> FormError {
        c.coordination_aborts += 1;
        let limit = self.cfg.max_coordination_time;
        warn!(
            cg,
            ?elapsed,
            ?limit,
            "cg: coordination too slow, formation undone"
        );
        FormError::CoordinationTimeout { elapsed, limit }
    }

    /// Run: per queue, under its lock, unfreeze and publish held completions in order.
    fn run_queues(&self) {
        for gate in self.queues.iter() {
            let mut g = lock(gate);
            g.frozen = false;
            if g.held.is_empty() {
                continue;
            }
            if let Some(p) = g.publisher.clone() {
                let held = mem::take(&mut g.held);
                p(&held);
            }
        }
    }

    /// Switches every queue to recording into `oos`, without copy-on-write.
    fn retarget_queues(&self, oos: &Arc<Record>) {
        for gate in self.queues.iter() {
            let mut g = lock(gate);
            g.target = Arc::clone(oos);
            g.drain = None;
        }
    }

    /// Ends copy-on-write for `drain`: under the cache lock (where writers decide), clear
    /// `strict` and drop every preserved image.
    fn stop_cow(&self, drain: &Drain) {
        let mut c = lock(&self.cache);
        drain.strict.store(false, Ordering::SeqCst);
        c.slots.clear();
        c.bytes = 0;
        drop(c);
        self.cache_cv.notify_all();
    }

    /// Abandons CG `cg` if it is the strict one.
    ///
    /// Not if the CG has meanwhile become ready (every chunk captured, nothing left to
    /// protect): a writer decides to abandon under the cache lock and takes the central lock
    /// only afterwards, and the drain may have captured its chunk — and the shipper seen
    /// `is_ready` and sent the commit — in between. Its chunk bit is then clear, so the write
    /// may proceed unpreserved. `is_ready` and this check both hold the central lock, and a
    /// ready CG stays ready (no bit of its OOS can be set once it is quiesced), so a CG that
    /// `is_ready` reported is never abandoned afterwards except by `link_lost`.
    fn abandon(&self, cg: u64, reason: AbandonReason) {
        let mut c = lock(&self.central);
        let ready = match &c.mode {
            Mode::Strict { drain, .. } if drain.cg == cg => {
                drain.is_quiesced() && c.oos.bits.count() == 0
            }
            _ => return,
        };
        if !ready {
            self.abandon_locked(&mut c, reason);
        }
    }

    /// Strict → abandoned: stop copy-on-write, record into OOS, forward CR into OOS. The
    /// guest never waits for this beyond one queue lock at a time.
    fn abandon_locked(&self, c: &mut Central, reason: AbandonReason) {
        let cg = match &c.mode {
            Mode::Strict { drain, .. } => drain.cg,
            _ => return,
        };
        let Mode::Strict { drain, cr } = mem::replace(&mut c.mode, Mode::Abandoned { cg }) else {
            return;
        };
        self.stop_cow(&drain);
        // Queues first, then the forwarding: after the retarget no write is recorded in CR,
        // and every mark made in CR under a queue lock is visible to `forward_into`.
        self.retarget_queues(&c.oos);
        cr.forward_into(&c.oos);
        c.retired.push(cr);
        c.abandoned[reason as usize] += 1;
        warn!(
            cg,
            ?reason,
            "cg: strict consistency group abandoned; the secondary stays at CG {} until a later CG commits",
            c.last_committed
        );
    }

    /// Hands out the next chunk of the forming CG: `Ok(None)` when nothing is left to hand out
    /// now (or no CG is forming). Errors are disk read errors (the chunk stays to be shipped).
    ///
    /// Strict CG: waits (once) until writes recorded before the swap have finished, reads the
    /// chunk, then, under the cache lock, ships the preserved image instead if a writer
    /// preserved it meanwhile, and clears the OOS bit.
    pub fn next_chunk(&self) -> io::Result<Option<ChunkImage>> {
        let mut c = lock(&self.central);
        loop {
            let drain = match &c.mode {
                Mode::Idle => return Ok(None),
                Mode::Abandoned { cg } => {
                    let cg = *cg;
                    return self.next_abandoned(&mut c, cg);
                }
                Mode::Strict { drain, .. } => Arc::clone(drain),
            };
            if !drain.is_quiesced() {
                // Wait for the pre-swap writes WITHOUT the central lock: a writer holding a
                // pre-swap ticket may need that lock (to abandon a CG whose cache filled up)
                // before it can finish its write and drop the ticket. Quiescence is
                // monotonic, so re-checking the mode after re-locking is enough.
                drop(c);
                let quiesced = drain.wait_quiesced();
                c = lock(&self.central);
                if !quiesced && matches!(&c.mode, Mode::Strict { drain: d, .. } if d.cg == drain.cg)
                {
                    self.abandon_locked(&mut c, AbandonReason::DrainTimeout);
                }
                continue;
            }
            let start = c.cursor;
            let Some(i) = c
                .oos
                .bits
                .next_set_in(start, self.chunks)
                .or_else(|| c.oos.bits.next_set_in(0, start))
            else {
                return Ok(None);
            };
            if Instant::now() > drain.deadline {
                self.abandon_locked(&mut c, AbandonReason::DrainTimeout);
                continue;
            }
            let len = self.chunk_len(i);
            let mut data = vec![0u8; len];
            self.source.read_at(&mut data, i * self.cfg.chunk_size)?;
            {
                let mut cache = lock(&self.cache);
                // Happens-before: a writer puts its piece in the cache (under this lock)
                // before its disk write starts. If our read saw any of that write, the piece
                // was stored before our lock here and we overlay it; a granule that is not
                // preserved (or only being read) has not been written since the swap, so
                // what we read of it is its content at the freeze.
                if let Some(slot) = cache.slots.remove(&i) {
                    slot.overlay(&mut data, self.granule());
                    cache.bytes -= slot.reserved;
                }
                // Cleared under the cache lock: a writer that sees it clear knows the chunk
                // is captured and may write without preserving.
                c.oos.bits.clear(i);
            }
            c.cursor = i + 1;
            c.shipped.set(i);
            c.outstanding.insert(i, drain.cg);
            c.handed_out += 1;
            return Ok(Some(ChunkImage {
                cg: drain.cg,
                index: i,
                data,
            }));
        }
    }

    /// Abandoned CG: hand out OOS chunks while writes keep being recorded there. The bit is
    /// cleared *before* the read: a write in flight re-marks it when it finishes, so a chunk
    /// read while being written is handed out again (after its previous hand-out is
    /// confirmed, so one CG never has two versions of a chunk in flight).
    fn next_abandoned(&self, c: &mut Central, cg: u64) -> io::Result<Option<ChunkImage>> {
        let start = c.cursor;
        for (mut from, to) in [(start, self.chunks), (0, start)] {
            while let Some(i) = c.oos.bits.next_set_in(from, to) {
                from = i + 1;
                if c.outstanding.get(&i) == Some(&cg) {
                    continue;
                }
                c.oos.bits.clear(i);
                let mut buf = vec![0u8; self.chunk_len(i)];
                if let Err(e) = self.source.read_at(&mut buf, i * self.cfg.chunk_size) {
                    c.oos.bits.set(i);
                    return Err(e);
                }
                c.cursor = i + 1;
                c.shipped.set(i);
                c.outstanding.insert(i, cg);
                c.handed_out += 1;
                return Ok(Some(ChunkImage {
                    cg,
                    index: i,
                    data: buf,
                }));
            }
        }
        Ok(None)
    }

    /// The consumer has chunk `index` of CG `cg` (the secondary acknowledged it): it no longer
    /// counts as unconfirmed. Stale or duplicate confirmations are ignored.
    pub fn confirm(&self, cg: u64, index: u64) {
        let mut c = lock(&self.central);
        if c.outstanding.get(&index) == Some(&cg) {
            c.outstanding.remove(&index);
        }
    }

    /// Whether every chunk of the strict CG `cg` has been handed out and confirmed, i.e. the
    /// consumer may send "CG `cg` complete" to the secondary.
    pub fn is_ready(&self, cg: u64) -> bool {
        let c = lock(&self.central);
        match &c.mode {
            Mode::Strict { drain, .. } if drain.cg == cg => {
                drain.is_quiesced() && c.oos.bits.count() == 0 && c.outstanding.is_empty()
            }
            _ => false,
        }
    }

    /// Commits CG `cg` if all its chunks were handed out and confirmed: its CR becomes the new
    /// OOS. Call it once the secondary acknowledged "CG `cg` complete" (use
    /// [`Engine::is_ready`] to know when to send that); if the link is lost before that
    /// acknowledgement, call [`Engine::link_lost`] instead. A strict CG with chunks left to
    /// hand out past `max_drain_time` is abandoned here.
    pub fn try_commit(&self, cg: u64) -> CommitOutcome {
        let mut c = lock(&self.central);
        if cg < c.first_uncommitted || cg >= c.next_cg {
            return CommitOutcome::Unknown;
        }
        let drain = match &c.mode {
            Mode::Strict { drain, .. } if drain.cg == cg => Arc::clone(drain),
            _ => return CommitOutcome::Abandoned,
        };
        let to_ship = c.oos.bits.count();
        let unconfirmed = c.outstanding.len() as u64;
        let quiesced = drain.is_quiesced();
        if quiesced && to_ship == 0 && unconfirmed == 0 {
            let Mode::Strict { drain, cr } = mem::replace(&mut c.mode, Mode::Idle) else {
                return CommitOutcome::Unknown;
            };
            self.stop_cow(&drain);
            for gate in self.queues.iter() {
                lock(gate).drain = None;
            }
            // CR becomes OOS; the queues already record into it. Every record forwarded into
            // the old OOS was idle before the first hand-out (pre_swap), so nothing is lost.
            c.oos = cr;
            c.retired.clear();
            c.shipped.clear_all();
            c.first_uncommitted = cg + 1;
            c.last_committed = cg;
            c.committed += 1;
            info!(cg, "cg: committed");
            return CommitOutcome::Committed;
        }
        if (to_ship > 0 || !quiesced) && Instant::now() > drain.deadline {
            self.abandon_locked(&mut c, AbandonReason::DrainTimeout);
            return CommitOutcome::Abandoned;
        }
        CommitOutcome::Pending {
            to_ship,
            unconfirmed,
        }
    }

    /// The link to the secondary is lost: the uncommitted CG is abandoned and everything not
    /// committed — including chunks handed out or confirmed since the last commit, which the
    /// secondary discards — is merged back into OOS. Back to idle: form a CG on reconnect.
    pub fn link_lost(&self) {
        let mut c = lock(&self.central);
        self.abandon_locked(&mut c, AbandonReason::LinkLost);
        c.oos.bits.or_from(&c.shipped);
        c.shipped.clear_all();
        c.outstanding.clear();
        c.mode = Mode::Idle;
        c.first_uncommitted = c.next_cg;
        info!(
            last_committed = c.last_committed,
            "cg: link lost, uncommitted chunks merged into OOS"
        );
    }

    /// The number the next CG formed will get (CGs below it were formed, committed or not).
    pub fn next_cg(&self) -> u64 {
        lock(&self.central).next_cg
    }

    /// Continues CG numbering after `last_committed`, the last CG the secondary committed
    /// (a restarted primary, or a secondary that was ahead): the next CG formed is numbered
    /// above it, so the secondary never mistakes new data for a CG it already has.
    pub fn resume_numbering(&self, last_committed: u64) {
        let mut c = lock(&self.central);
        if c.next_cg <= last_committed {
            c.next_cg = last_committed + 1;
            c.first_uncommitted = c.next_cg;
            c.last_committed = last_committed;
        }
    }

    /// Marks every chunk dirty (initial full copy, or resynchronisation from scratch). During
    /// a strict CG the chunks are marked in CR (the next CG ships them), keeping the CG
    /// consistent.
    pub fn mark_all(&self) {
        let c = lock(&self.central);
        match &c.mode {
            Mode::Strict { cr, .. } => cr.bits.set_all(),
            _ => c.oos.bits.set_all(),
        }
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
            coordination_ns: c.coordination.iter().copied().collect(),
            coordination_max_ns: c.coordination_max,
            cow_bytes: cache.bytes,
            cow_peak_bytes: cache.peak,
            chunks_preserved: cache.preserved,
            chunks_handed_out: c.handed_out,
            oos_dirty: c.oos.bits.count(),
            cr_dirty: match &c.mode {
                Mode::Strict { cr, .. } => cr.bits.count(),
                _ => 0,
            },
            shipped_uncommitted: c.shipped.count(),
            unconfirmed: c.outstanding.len() as u64,
        }
    }
}

impl Tracking for Engine {
    fn begin_write(&self, queue: usize, offset: u64, len: u64) -> io::Result<WriteGuard> {
        Engine::begin_write(self, queue, offset, len)
    }
    fn complete(&self, queue: usize, items: &mut Vec<Completion>, publish: &dyn Fn(&[Completion])) {
        Engine::complete(self, queue, items, publish)
    }
    fn set_publisher(&self, queue: usize, publisher: Option<Publisher>) {
        Engine::set_publisher(self, queue, publisher)
    }
    fn held(&self, queue: usize) -> usize {
        Engine::held(self, queue)
    }
    fn discard_held(&self, queue: usize) -> usize {
        Engine::discard_held(self, queue)
    }
}

#[cfg(all(test, not(drblk_loom)))]
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
