//! The primary's persisted change record (DESIGN.md §2, issue "change tracking that
//! survives a crash"): after any crash or restart of `drblk serve`, the primary knows a
//! superset of the chunks that may differ from the secondary's last committed CG, so the
//! resync ships those instead of the whole disk.
//!
//! # What is on disk (`<image>.drblk-track`, see [`mod@file`])
//! - a **bitmap** of chunks that may differ from the secondary (one bit per chunk);
//! - an **activity log** (AL) of at most `slots` hot extents (`extent_size` bytes each)
//!   that may hold writes the bitmap does not show;
//! - `acked_cg`: the record is a superset of what differs from any state of the secondary
//!   at or above that CG.
//!
//! # The invariant, and why each ordering keeps it
//! *Every chunk that may differ from the secondary's committed state has its bit set on
//! disk, or lies in an extent listed in the on-disk activity log.*
//! - **A write** into an extent not in the log waits until the extent is in the on-disk log
//!   (written and fdatasynced) before it is recorded and submitted to the image: a write
//!   that reaches the image is always covered (DRBD's rule, stricter than dm-era's "before
//!   the completion is published", so that a write in flight at the crash is covered too).
//!   Writes into extents already in the log pay one atomic increment. A write that spans
//!   extents, or finds every logged extent in use, sets its own bits on disk instead (one
//!   page write and fdatasync, none if they are set already): no write ever waits for
//!   another, so none can deadlock. A refresh keeps those bits set until the engine has
//!   recorded the write (it is *pending* until then), as its snapshot may not show it.
//! - **An eviction** (the log is full) first writes the evicted extent's dirty bits (what
//!   the engine says may differ, OR-ed into the page on disk) and fdatasyncs them, and only
//!   then writes the log without it. Writes still using it cannot be evicted (see
//!   [`activity`]).
//! - **Clearing** bits (after every commit, at least every second, and at a clean shutdown): the engine's snapshot of
//!   what may differ excludes chunks of committed CGs, so `acked_cg` is raised to the
//!   engine's last committed CG (which the secondary holds: it acknowledged it) and synced
//!   *before* pages with cleared bits are written.
//! - **A full copy** (a new or reset secondary) sets the "all dirty" flag on disk before
//!   the engine marks every chunk; it is cleared only after every page was rewritten.
//!
//! # On start
//! A valid record marks its bits and every chunk of its logged extents dirty in the engine
//! and resumes numbering at `acked_cg`; a missing, corrupt or foreign record marks nothing,
//! and the first connection finds the secondary "at another group" and does a full resync.
//! Either way the record is then rewritten (atomically, a temporary file renamed) to hold
//! exactly what the engine now has dirty, with an empty log.
//!
//! # Bound
//! After a crash the restart ships at most the chunks changed since the record's `acked_cg`
//! (the bitmap) plus `slots × extent_size` (the log). The record's group follows the
//! secondary's last committed group within one refresh (normally the next group). After a clean shutdown
//! the log is empty and the bitmap exact: the restart ships exactly the unshipped chunks.

pub mod activity;
pub mod file;
mod fresh;

pub use fresh::{default_record_path, write_empty};

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::blk::tracking::{Completion, Publisher, Tracking, WriteEnd, WriteGuard};
use crate::cg::Engine;
use activity::ExtentStates;
use file::{RecordFile, Superblock, FLAG_ALL_DIRTY, FLAG_CLEAN, PAGE_BITS, PAGE_WORDS};

/// Bitmap pages a refresh snapshots from the engine at a time (about 2 Mi chunks).
const SNAPSHOT_PAGES: usize = 64;

/// Why a first start uses no record.
const NONE_YET: &str = "there is none yet";

/// Where the record lives and how large its activity log is.
#[derive(Debug, Clone)]
pub struct TrackConfig {
    /// The record file.
    pub path: PathBuf,
    /// Activity-log extent size in bytes (a power of two, at least the chunk size).
    pub extent_size: u64,
    /// Activity-log slots (hot extents).
    pub slots: u64,
}

/// What the record said on start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    /// The record was usable: its chunks were marked dirty.
    pub trusted: bool,
    /// It was written by a clean shutdown.
    pub clean: bool,
    /// The secondary holds at least this CG (0: nothing known).
    pub acked_cg: u64,
    /// Chunks marked dirty from the bitmap and the activity log.
    pub chunks_marked: u64,
    /// Why it was not used, if it was not.
    pub why_not: Option<String>,
}

/// Counters of the record's I/O.
#[derive(Debug, Default)]
pub struct TrackStats {
    /// Writes that had to add their extent to the on-disk log.
    pub al_misses: AtomicU64,
    /// Metadata writes (superblock, log and bitmap page writes).
    pub meta_writes: AtomicU64,
    /// fdatasyncs of the record.
    pub syncs: AtomicU64,
}

struct Slots {
    /// Extent per slot (`u64::MAX`: free).
    extents: Vec<u64>,
    hand: usize,
}

struct Disk {
    rf: RecordFile,
    /// The bitmap pages as they are on disk, by page; absent pages are all clear. Every
    /// page write is synced before the disk lock is released (or the record gives up), so
    /// under the lock these are the bits on stable storage.
    pages: BTreeMap<u64, PageBits>,
}

/// The bits of one bitmap page on disk that has some set.
enum PageBits {
    /// Every bit set (a full copy marks every page: cheap to keep for a whole disk).
    Full,
    /// These `PAGE_WORDS` words.
    Words(Box<[u64]>),
}

impl Disk {
    /// Copies page `p`'s bits into `w` (`PAGE_WORDS` words).
    fn page(&self, p: u64, w: &mut [u64]) {
        match self.pages.get(&p) {
            None => w.fill(0),
            Some(PageBits::Full) => w.fill(u64::MAX),
            Some(PageBits::Words(b)) => w.copy_from_slice(b),
        }
    }

    /// Whether page `p` holds exactly the bits `w`.
    fn page_is(&self, p: u64, w: &[u64]) -> bool {
        match self.pages.get(&p) {
            None => w.iter().all(|&x| x == 0),
            Some(PageBits::Full) => w.iter().all(|&x| x == u64::MAX),
            Some(PageBits::Words(b)) => **b == *w,
        }
    }

    /// Page `p` now holds `w` on disk.
    fn set_page(&mut self, p: u64, w: &[u64]) {
        if w.iter().all(|&x| x == 0) {
            self.pages.remove(&p);
        } else if w.iter().all(|&x| x == u64::MAX) {
            self.pages.insert(p, PageBits::Full);
        } else {
            self.pages.insert(p, PageBits::Words(w.into()));
        }
    }
}

/// The persisted change record of one disk (see the module docs).
pub struct ChangeRecord {
    engine: Arc<Engine>,
    chunk_size: u64,
    chunks: u64,
    extent_size: u64,
    states: ExtentStates,
    slots: Mutex<Slots>,
    disk: Mutex<Disk>,
    /// Chunk ranges whose bits `mark_on_disk` set for a write the engine may not have
    /// recorded yet (one entry per such write, until [`ChangeRecord::recorded`]): a refresh
    /// keeps them set, as the engine's snapshot may not show them.
    pending: Mutex<Vec<(u64, u64)>>,
    broken: AtomicBool,
    stats: TrackStats,
    /// What the record said on start.
    seeded: Seeded,
    /// Wakes the refresher: (a group committed, stop).
    signal: (Mutex<(bool, bool)>, Condvar),
    /// A checksum resync runs: the ALL_DIRTY flag stays (see `hold_all_dirty`).
    hold_all: AtomicBool,
}

impl ChangeRecord {
    /// Opens (or creates) the record of the disk `uuid` for `engine`, seeding the engine from
    /// it (see the module docs). Fails only if the new record cannot be written.
    pub fn open(
        cfg: &TrackConfig,
        engine: Arc<Engine>,
        uuid: [u8; 16],
    ) -> io::Result<(Arc<ChangeRecord>, Seeded)> {
        let ec = engine.config();
        let (disk_size, chunk_size) = (ec.disk_size, ec.chunk_size);
        if !cfg.extent_size.is_power_of_two() || cfg.extent_size < chunk_size || cfg.slots == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "activity log: extents of {} bytes x {} slots (need a power of two >= the chunk size {chunk_size}, and slots >= 1)",
                    cfg.extent_size, cfg.slots
                ),
            ));
        }
        let chunks = engine.num_chunks();
        let mut seeded = Seeded {
            trusted: false,
            clean: false,
            acked_cg: 0,
            chunks_marked: 0,
            why_not: None,
        };
        match RecordFile::load(&cfg.path) {
            Ok(Some(l))
                if l.sb.uuid == uuid
                    && l.sb.disk_size == disk_size
                    && l.sb.chunk_size == chunk_size =>
            {
                let per_ext = l.sb.al_extent / chunk_size;
                for &e in &l.al {
                    engine.mark_range(e * per_ext, (e + 1) * per_ext - 1);
                }
                for_each_run(&l.words, chunks, |first, last| {
                    engine.mark_range(first, last)
                });
                if l.sb.flags & FLAG_ALL_DIRTY != 0 {
                    engine.mark_all();
                }
                if l.sb.acked_cg > 0 {
                    engine.resume_numbering(l.sb.acked_cg);
                }
                if l.bad_pages > 0 {
                    tracing::warn!(record = %cfg.path.display(), pages = l.bad_pages, "change record: bitmap pages failed their check; every chunk they cover is resynced");
                }
                seeded.trusted = true;
                seeded.clean = l.sb.flags & FLAG_CLEAN != 0;
                seeded.acked_cg = l.sb.acked_cg;
            }
            Ok(Some(l)) => {
                seeded.why_not = Some(format!(
                    "it belongs to another disk (uuid/size/chunk size {:02x?}/{}/{}); a full resync follows",
                    &l.sb.uuid[..4], l.sb.disk_size, l.sb.chunk_size
                ));
            }
            Ok(None) => {
                seeded.why_not = Some(NONE_YET.into());
            }
            Err(e) => {
                seeded.why_not = Some(format!(
                    "it cannot be trusted ({e}); the secondary gets a full resync"
                ));
            }
        }
        // Rewrite it to hold exactly what the engine has dirty now, with an empty log.
        let mut words = vec![0u64; (chunks.div_ceil(PAGE_BITS) * PAGE_WORDS as u64) as usize];
        engine.unacked_in(0, chunks, &mut words);
        seeded.chunks_marked = words.iter().map(|x| u64::from(x.count_ones())).sum();
        let sb = Superblock {
            seq: 0,
            uuid,
            disk_size,
            chunk_size,
            al_extent: cfg.extent_size,
            al_slots: cfg.slots,
            acked_cg: seeded.acked_cg,
            flags: 0,
        };
        let rf = RecordFile::create(&cfg.path, sb, &words)?;
        let mut disk = Disk {
            rf,
            pages: BTreeMap::new(),
        };
        for (p, w) in words.chunks_exact(PAGE_WORDS).enumerate() {
            disk.set_page(p as u64, w);
        }
        drop(words);
        match &seeded.why_not {
            None => {
                tracing::info!(record = %cfg.path.display(), clean = seeded.clean, acked_cg = seeded.acked_cg, chunks = seeded.chunks_marked, "change record loaded: these chunks are resynced")
            }
            // A first start has no record: nothing to warn about.
            Some(why) if why == NONE_YET => {
                tracing::info!(record = %cfg.path.display(), "change record created (there was none yet)")
            }
            Some(why) => {
                tracing::warn!(record = %cfg.path.display(), "change record not used: {why}")
            }
        }
        let extents = disk_size.div_ceil(cfg.extent_size);
        let rec = Arc::new(ChangeRecord {
            engine,
            chunk_size,
            chunks,
            extent_size: cfg.extent_size,
            states: ExtentStates::new(extents),
            slots: Mutex::new(Slots {
                extents: vec![u64::MAX; cfg.slots as usize],
                hand: 0,
            }),
            disk: Mutex::new(disk),
            pending: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
            hold_all: AtomicBool::new(false),
            stats: TrackStats::default(),
            seeded: seeded.clone(),
            signal: (Mutex::new((false, false)), Condvar::new()),
        });
        Ok((rec, seeded))
    }

    /// What operators see of it (`drblk ctl status`).
    pub fn status(&self) -> crate::control::TrackStatus {
        let (path, acked_cg) = {
            let d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
            (d.rf.path.display().to_string(), d.rf.sb.acked_cg)
        };
        let s = &self.stats;
        crate::control::TrackStatus {
            path,
            kept: !self.is_broken(),
            trusted_on_start: self.seeded.trusted,
            resync_blocks_on_start: self.seeded.chunks_marked,
            acked_cg,
            al_misses: s.al_misses.load(Ordering::Relaxed),
            meta_writes: s.meta_writes.load(Ordering::Relaxed),
            syncs: s.syncs.load(Ordering::Relaxed),
        }
    }

    /// The record's I/O counters.
    pub fn stats(&self) -> &TrackStats {
        &self.stats
    }

    /// The data path's tracking: the engine's, with every write covered by the record first.
    pub fn tracking(self: &Arc<Self>) -> Arc<dyn Tracking> {
        Arc::new(RecordedTracking {
            record: self.clone(),
        })
    }

    /// Whether the record gave up (an I/O error): it was removed, and a restart resyncs
    /// everything.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    fn give_up(&self, what: &str, e: &io::Error) {
        if self.broken.swap(true, Ordering::SeqCst) {
            return;
        }
        let d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        // A record that is not kept up to date must not be trusted after a restart.
        let removed = std::fs::remove_file(&d.rf.path);
        tracing::error!(record = %d.rf.path.display(), error = %e, removed = removed.is_ok(), "change record: {what} failed; it is no longer kept and a restart resyncs the whole disk");
    }

    fn sync(&self, d: &Disk) -> io::Result<()> {
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        d.rf.sync()
    }

    /// Writes the pages covering chunks `first..=last` as their on-disk bits OR what the
    /// engine has dirty (never clearing), then fdatasyncs.
    fn persist_bits(&self, d: &mut Disk, first: u64, last: u64) -> io::Result<()> {
        let (p0, p1) = (first / PAGE_BITS, last / PAGE_BITS);
        let mut ws = vec![0u64; (p1 - p0 + 1) as usize * PAGE_WORDS];
        self.engine.unacked_in_each(
            (p0..=p1)
                .zip(ws.chunks_exact_mut(PAGE_WORDS))
                .map(|(p, w)| (p * PAGE_BITS, (p + 1) * PAGE_BITS, w)),
        );
        let mut old = vec![0u64; PAGE_WORDS];
        let mut wrote = false;
        for (p, w) in (p0..=p1).zip(ws.chunks_exact_mut(PAGE_WORDS)) {
            d.page(p, &mut old);
            let mut changed = false;
            for (n, o) in w.iter_mut().zip(&old) {
                changed |= *n | o != *o;
                *n |= o;
            }
            if changed {
                d.rf.write_page(p, w)?;
                self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
                d.set_page(p, w);
                wrote = true;
            }
        }
        if wrote {
            self.sync(d)?;
        }
        Ok(())
    }

    /// Slow path of a write of chunks `first..=last` inside extent `e`: put `e` in the
    /// on-disk log (returns true: the write is counted in `e`), or, if every logged extent
    /// is in use, set the write's own bits on disk instead (returns false). Never waits for
    /// other writes, so writes cannot deadlock on the log.
    fn admit(&self, e: u64, first: u64, last: u64) -> io::Result<bool> {
        let mut sl = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if self.states.try_enter(e) {
            return Ok(true);
        }
        self.stats.al_misses.fetch_add(1, Ordering::Relaxed);
        let n = sl.extents.len();
        let mut slot = sl.extents.iter().position(|&x| x == u64::MAX);
        let mut victim = None;
        if slot.is_none() {
            for _ in 0..2 * n {
                let h = sl.hand;
                sl.hand = (h + 1) % n;
                if self.states.try_evict(sl.extents[h]) {
                    slot = Some(h);
                    victim = Some(sl.extents[h]);
                    break;
                }
            }
        }
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let Some(slot) = slot else {
            self.mark_on_disk(&mut d, first, last)?;
            return Ok(false);
        };
        if let Some(v) = victim {
            let per = self.extent_size / self.chunk_size;
            let end = ((v + 1) * per).min(self.chunks) - 1;
            if let Err(err) = self.persist_bits(&mut d, v * per, end) {
                self.states.readmit(v);
                return Err(err);
            }
        }
        let mut extents = sl.extents.clone();
        extents[slot] = e;
        d.rf.write_al(&extents)?;
        self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
        self.sync(&d)?;
        sl.extents = extents;
        self.states.admit(e);
        Ok(true)
    }

    /// Sets the bits of chunks `first..=last` on disk (a write that does not use the log:
    /// it spans extents, or the log is busy), then fdatasyncs. Pages whose bits are all set
    /// already are not rewritten, and nothing is synced if no page was.
    ///
    /// Skipping is safe: the rule (dm-era's, kept stricter here) is that a write's bits are
    /// on stable storage before the write is submitted, so before its completion is
    /// published. Every path that writes a bitmap page (`persist_bits`, `refresh_inner`,
    /// `RecordFile::create`) syncs it before it releases the disk lock, which is held here;
    /// if that sync failed the record gives up and is removed (a restart resyncs
    /// everything). So bits set in `Disk::pages` here are on stable storage already.
    fn mark_on_disk(&self, d: &mut Disk, first: u64, last: u64) -> io::Result<()> {
        let mut w = vec![0u64; PAGE_WORDS];
        let mut wrote = false;
        for p in first / PAGE_BITS..=last / PAGE_BITS {
            d.page(p, &mut w);
            let (a, b) = (first.max(p * PAGE_BITS), last.min((p + 1) * PAGE_BITS - 1));
            let mut changed = false;
            for i in a - p * PAGE_BITS..=b - p * PAGE_BITS {
                let (k, m) = ((i / 64) as usize, 1u64 << (i % 64));
                changed |= w[k] & m == 0;
                w[k] |= m;
            }
            if changed {
                d.rf.write_page(p, &w)?;
                self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
                d.set_page(p, &w);
                wrote = true;
            }
        }
        if wrote {
            self.sync(d)?;
        }
        // Until the engine records the write, its bits are only here (see `refresh_inner`).
        self.lock_pending().push((first, last));
        Ok(())
    }

    /// The engine has recorded (or refused) the write whose bits `mark_on_disk` set for
    /// chunks `first..=last`: a refresh may clear them once the engine no longer has them.
    fn recorded(&self, first: u64, last: u64) {
        let mut p = self.lock_pending();
        if let Some(i) = p.iter().position(|&r| r == (first, last)) {
            p.swap_remove(i);
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, Vec<(u64, u64)>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// While a checksum resync compares the disks, the record must keep saying "everything
    /// may differ": the engine holds only part of the differences yet, and a refresh would
    /// otherwise write those as exact. Call with `true` after [`ChangeRecord::mark_all_dirty`],
    /// with `false` once every difference is marked in the engine.
    pub fn hold_all_dirty(&self, on: bool) {
        // Under the disk lock: a refresh reads the hold before its snapshot of the engine
        // and keeps both for its whole run, so one whose snapshot may be partial never
        // clears the flag.
        let _d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        self.hold_all.store(on, Ordering::SeqCst);
    }

    /// Before a full copy: every chunk may differ until it commits.
    pub fn mark_all_dirty(&self) {
        if self.is_broken() {
            return;
        }
        let r = (|| {
            let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
            let sb = Superblock {
                flags: (d.rf.sb.flags | FLAG_ALL_DIRTY) & !FLAG_CLEAN,
                ..d.rf.sb
            };
            d.rf.write_sb(sb)?;
            self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
            self.sync(&d)
        })();
        if let Err(e) = r {
            self.give_up("marking a full copy", &e);
        }
    }

    /// Clears on disk what the secondary has acknowledged (see the module docs); with
    /// `clean`, also empties the log and marks the record clean (no write may run then).
    pub fn refresh(&self, clean: bool) -> io::Result<()> {
        if self.is_broken() {
            return Ok(());
        }
        let r = self.refresh_inner(clean);
        if let Err(e) = &r {
            self.give_up("bringing the record up to date", e);
        }
        r
    }

    fn refresh_inner(&self, clean: bool) -> io::Result<()> {
        let sl = clean.then(|| self.slots.lock().unwrap_or_else(|p| p.into_inner()));
        let mut d = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        // Read before the snapshot (see `hold_all_dirty`).
        let hold = self.hold_all.load(Ordering::SeqCst);
        let all = clean || d.rf.sb.flags & FLAG_ALL_DIRTY != 0;
        let pages: Vec<u64> = if all {
            (0..d.rf.page_count()).collect()
        } else {
            d.pages.keys().copied().collect()
        };
        // Writes whose bits are on disk but which the engine may not have recorded yet (the
        // slow path of `begin_write` sets the bits, then records the write): their bits stay.
        // Read before the snapshot: a write removed from `pending` since was recorded before,
        // so the snapshot shows it; none is added meanwhile (that needs the disk lock).
        let pending = self.lock_pending().clone();
        // What may differ now, for every page that has (or may need) bits on disk: one
        // snapshot of the engine, or one per `SNAPSHOT_PAGES` pages when many pages have bits
        // (a full copy), so that the engine's lock is never held for long.
        let mut exact = vec![0u64; pages.len() * PAGE_WORDS];
        let mut acked = 0;
        for (ps, ws) in pages
            .chunks(SNAPSHOT_PAGES)
            .zip(exact.chunks_mut(SNAPSHOT_PAGES * PAGE_WORDS))
        {
            acked = self.engine.unacked_in_each(
                ps.iter()
                    .zip(ws.chunks_exact_mut(PAGE_WORDS))
                    .map(|(&p, w)| (p * PAGE_BITS, (p + 1) * PAGE_BITS, w)),
            );
        }
        // At or above every snapshot's last committed CG (the last one's): the secondary
        // holds it.
        if pages.is_empty() {
            acked = self.engine.unacked_in(0, 0, &mut []);
        }
        for (first, last) in pending {
            for p in first / PAGE_BITS..=last / PAGE_BITS {
                // Every page of a pending write has bits on disk, so it is in `pages`.
                let Ok(k) = pages.binary_search(&p) else {
                    debug_assert!(false, "page {p} of a pending write has no bits");
                    continue;
                };
                let w = &mut exact[k * PAGE_WORDS..(k + 1) * PAGE_WORDS];
                let (a, b) = (first.max(p * PAGE_BITS), last.min((p + 1) * PAGE_BITS - 1));
                for i in a - p * PAGE_BITS..=b - p * PAGE_BITS {
                    w[(i / 64) as usize] |= 1 << (i % 64);
                }
            }
        }
        if acked > d.rf.sb.acked_cg {
            let sb = Superblock {
                acked_cg: acked,
                ..d.rf.sb
            };
            d.rf.write_sb(sb)?;
            self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
            self.sync(&d)?;
        }
        let mut wrote = false;
        for (p, w) in pages.into_iter().zip(exact.chunks_exact(PAGE_WORDS)) {
            if !d.page_is(p, w) {
                d.rf.write_page(p, w)?;
                self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
                d.set_page(p, w);
                wrote = true;
            }
        }
        if wrote {
            self.sync(&d)?;
        }
        if clean {
            d.rf.write_al(&[])?;
            self.sync(&d)?;
        }
        if all && !hold {
            let mut flags = d.rf.sb.flags & !FLAG_ALL_DIRTY;
            if clean {
                flags |= FLAG_CLEAN;
            }
            let sb = Superblock { flags, ..d.rf.sb };
            d.rf.write_sb(sb)?;
            self.stats.meta_writes.fetch_add(1, Ordering::Relaxed);
            self.sync(&d)?;
        }
        drop(sl);
        Ok(())
    }

    /// A group committed on the secondary: clear what it acknowledged soon (the refresher
    /// runs on its own thread, so the cycle does not wait for the record's writes).
    pub fn committed(&self) {
        let (m, cv) = &self.signal;
        m.lock().unwrap_or_else(|p| p.into_inner()).0 = true;
        cv.notify_one();
    }

    /// Runs [`ChangeRecord::refresh`] after every commit ([`ChangeRecord::committed`]) and
    /// at least every `every`, until the returned handle is dropped. What a crash resyncs
    /// beyond the secondary's last group is therefore what changed during one refresh.
    pub fn start_refresher(self: &Arc<Self>, every: Duration) -> Refresher {
        let rec = self.clone();
        let thread = std::thread::Builder::new()
            .name("drblk-track".into())
            .spawn(move || loop {
                {
                    let (m, cv) = &rec.signal;
                    let g = m.lock().unwrap_or_else(|p| p.into_inner());
                    let (mut g, _) = cv
                        .wait_timeout_while(g, every, |s| !s.0 && !s.1)
                        .unwrap_or_else(|p| p.into_inner());
                    if g.1 {
                        g.1 = false;
                        return;
                    }
                    g.0 = false;
                }
                let _ = rec.refresh(false);
            })
            .expect("spawning the change record thread");
        Refresher {
            record: self.clone(),
            thread: Some(thread),
        }
    }
}

/// Calls `f(first, last)` once per maximal run of set bits among bits `0..n` of `words`
/// (bit `i` is bit `i % 64` of word `i / 64`), in order.
fn for_each_run(words: &[u64], n: u64, mut f: impl FnMut(u64, u64)) {
    let n = n.min(words.len() as u64 * 64);
    let mut run = None;
    let mut i = 0;
    while i < n {
        let (wi, bit) = ((i / 64) as usize, i % 64);
        let rest = words[wi] >> bit;
        // Bits from `i` on that keep the current state (set in a run, clear outside one),
        // up to the end of the word.
        let same = if run.is_some() { !rest } else { rest };
        let step = u64::from(same.trailing_zeros()).min(64 - bit);
        i += step;
        if step < 64 - bit && i < n {
            match run.take() {
                Some(s) => f(s, i - 1),
                None => run = Some(i),
            }
        }
    }
    if let Some(s) = run {
        f(s, n - 1);
    }
}

impl WriteEnd for ChangeRecord {
    fn end_write(&self, first: u64, last: u64) {
        for e in first..=last {
            self.states.exit(e);
        }
    }
}

/// The refresher thread; stopped and joined on drop.
pub struct Refresher {
    record: Arc<ChangeRecord>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Refresher {
    fn drop(&mut self) {
        let (m, cv) = &self.record.signal;
        m.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The engine's tracking with the record's activity log in front.
struct RecordedTracking {
    record: Arc<ChangeRecord>,
}

impl Tracking for RecordedTracking {
    fn begin_write(&self, queue: usize, offset: u64, len: u64) -> io::Result<WriteGuard> {
        let r = &self.record;
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= r.engine.config().disk_size);
        if len == 0 || !in_range || r.is_broken() {
            return r.engine.begin_write(queue, offset, len);
        }
        let (e0, e1) = (offset / r.extent_size, (offset + len - 1) / r.extent_size);
        let (c0, c1) = (offset / r.chunk_size, (offset + len - 1) / r.chunk_size);
        // Covered before it is recorded and submitted: its extent is in the on-disk log
        // (`counted`: it stays there until the write ends), or its own bits are on disk.
        let counted = if e0 == e1 && r.states.try_enter(e0) {
            true
        } else {
            let r2 = if e0 == e1 {
                r.admit(e0, c0, c1)
            } else {
                let mut d = r.disk.lock().unwrap_or_else(|p| p.into_inner());
                r.mark_on_disk(&mut d, c0, c1).map(|()| false)
            };
            match r2 {
                Ok(c) => c,
                Err(err) => {
                    r.give_up("covering a write", &err);
                    return r.engine.begin_write(queue, offset, len);
                }
            }
        };
        let res = r.engine.begin_write(queue, offset, len);
        if !counted {
            // Its bits were set on disk for it; the engine now has it (or refused it).
            r.recorded(c0, c1);
        }
        match res {
            Ok(g) if counted => Ok(g.and_then(r.clone(), e0, e0)),
            Ok(g) => Ok(g),
            Err(err) => {
                if counted {
                    r.states.exit(e0);
                }
                Err(err)
            }
        }
    }

    fn complete(&self, queue: usize, items: &mut Vec<Completion>, publish: &dyn Fn(&[Completion])) {
        self.record.engine.complete(queue, items, publish)
    }

    fn set_publisher(&self, queue: usize, publisher: Option<Publisher>) {
        self.record.engine.set_publisher(queue, publisher)
    }

    fn held(&self, queue: usize) -> usize {
        self.record.engine.held(queue)
    }

    fn discard_held(&self, queue: usize) -> usize {
        self.record.engine.discard_held(queue)
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests;
