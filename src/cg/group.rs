//! A consistency group across several disks (issue 13, first step): one [`Engine`] per disk,
//! formed, drained and committed as one. A disk's engine, data path and change record stay
//! as they are; the group only decides *when* each engine moves.
//!
//! Why it is consistent across disks: the `cg` module's argument holds for the queues of one
//! engine because every queue is frozen before any is swapped, and every one swapped before
//! any runs. [`Group::form_cg`] keeps exactly that order across the queues of *all* engines:
//! freeze all, swap all, run all. A write W2 on disk B issued after W1 on disk A completed is
//! then in the same or a later CG than W1, as within one disk.
//!
//! And the group commits whole or not at all: the commit is sent only once every engine is
//! ready ([`Group::is_ready`]: a ready engine stays ready), and if any engine abandons the
//! CG the others abandon it too ([`Group::try_commit`]), so no CG commits on one disk
//! without the others.
//!
//! Lock order: the formation holds every engine's central lock, taken in disk order, then
//! takes one queue lock at a time. Nothing else holds two central locks, and the write path
//! never takes a central lock while it holds a queue lock, so this cannot deadlock.
//!
//! The cycle (`replicate::cycle`) forms, drains and commits through a group; the daemons
//! still serve one disk, a group of one ([`Group::single`]).

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::commit::Poll;
use super::sync::{lock, AtomicUsize, Ordering};
use super::{CgError, CgFormed, CommitOutcome, Engine, Extent, FormError};

/// Most disks in one group.
pub const MAX_DISKS: usize = 64;

/// Several disks' engines formed, drained and committed as one consistency group.
pub struct Group {
    engines: Box<[Arc<Engine>]>,
    /// The disk the drain asks first next time (round robin, so no disk starves).
    cursor: AtomicUsize,
}

impl Group {
    /// A group of `engines`, disk `d` being `engines[d]`. Their CG numbering must agree
    /// (fresh engines, or all resumed after the same CG).
    pub fn new(engines: Vec<Arc<Engine>>) -> Result<Group, CgError> {
        if engines.is_empty() {
            return Err(CgError::InvalidConfig("a group needs at least one disk"));
        }
        if engines.len() > MAX_DISKS {
            return Err(CgError::InvalidConfig("a group holds at most 64 disks"));
        }
        let next = engines[0].next_cg();
        if engines.iter().any(|e| e.next_cg() != next) {
            return Err(CgError::InvalidConfig(
                "the disks of a group must continue from the same CG",
            ));
        }
        Ok(Group {
            engines: engines.into(),
            cursor: AtomicUsize::new(0),
        })
    }

    /// How many disks.
    pub fn disks(&self) -> usize {
        self.engines.len()
    }

    /// Disk `d`'s engine.
    pub fn engine(&self, d: usize) -> &Arc<Engine> {
        &self.engines[d]
    }

    /// Forms the next CG on every disk at once: every queue of every disk frozen, then
    /// swapped, then run. Fails, changing nothing, if a CG is still draining; undoes the
    /// formation on every disk if coordination takes longer than the smallest
    /// `max_coordination_time`. `coordination` is the guest's pause: first freeze to last run.
    pub fn form_cg(&self) -> Result<CgFormed, FormError> {
        let limit = self
            .engines
            .iter()
            .map(|e| e.cfg.max_coordination_time)
            .min()
            .expect("a group has a disk");
        // Every central lock, in disk order (kept by the formations until they end). A busy
        // disk fails the whole formation before anything is frozen; the formations made so
        // far are dropped, which only releases their locks.
        let mut forming = Vec::with_capacity(self.engines.len());
        for e in self.engines.iter() {
            forming.push(e.prepare()?);
        }
        let t0 = Instant::now();
        let abort = |forming: Vec<_>, elapsed| {
            let mut err = None;
            for (e, f) in self.engines.iter().zip(forming) {
                err = Some(e.coordination_abort(f, elapsed));
            }
            err.expect("a group has a disk")
        };

        // 1. Freeze every queue of every disk: from now on nothing completes visibly.
        for e in self.engines.iter() {
            e.freeze();
        }
        let elapsed = t0.elapsed();
        if elapsed > limit {
            self.run_all();
            return Err(abort(forming, elapsed));
        }

        // 2. Swap every queue of every disk (still all frozen).
        for (e, f) in self.engines.iter().zip(&forming) {
            e.swap(f);
        }
        let elapsed = t0.elapsed();
        if elapsed > limit {
            for (e, f) in self.engines.iter().zip(forming.iter_mut()) {
                e.undo_swap(f);
            }
            self.run_all();
            return Err(abort(forming, elapsed));
        }
        for e in self.engines.iter() {
            if let Some(observe) = lock(&e.freeze_observer).clone() {
                observe();
            }
        }

        // 3. Run: publish what every queue held.
        self.run_all();
        let coordination = t0.elapsed();
        let mut formed = None;
        for (e, f) in self.engines.iter().zip(forming) {
            formed = Some(e.finish(f).cg);
        }
        let cg = formed.expect("a group has a disk");
        Ok(CgFormed { cg, coordination })
    }

    fn run_all(&self) {
        for e in self.engines.iter() {
            e.run();
        }
    }

    /// The next extent of the forming CG on any disk (`extent.disk`), its bytes in
    /// `buf[..extent.len]` (see [`Engine::next_extent`]); `None` when no disk has one now.
    pub fn next_extent(&self, buf: &mut Vec<u8>) -> io::Result<Option<Extent>> {
        let n = self.engines.len();
        // Only the drain thread moves it: relaxed is enough.
        let start = self.cursor.load(Ordering::Relaxed);
        for k in 0..n {
            let d = (start + k) % n;
            if let Some(ext) = self.engines[d].next_extent(buf)? {
                self.cursor.store((d + 1) % n, Ordering::Relaxed);
                // `d < MAX_DISKS`, checked in `new`.
                return Ok(Some(Extent {
                    disk: d as u16,
                    ..ext
                }));
            }
        }
        Ok(None)
    }

    /// The sink has extent `ext` of disk `ext.disk` (see [`Engine::confirm`]).
    pub fn confirm(&self, ext: &Extent) {
        self.engines[usize::from(ext.disk)].confirm(ext.cg, ext.first, ext.count);
    }

    /// Whether every disk is ready to commit CG `cg`: only then may the sink be told to
    /// commit it. Each disk that is ready stays ready (until `link_lost`), so checking them
    /// one after the other gives an answer that holds for all at once.
    pub fn is_ready(&self, cg: u64) -> bool {
        self.engines.iter().all(|e| e.is_ready(cg))
    }

    /// Commits CG `cg` on every disk if every disk is ready, else none: `Pending` (with the
    /// sums) while any disk still drains; `Abandoned` if any disk abandoned it — the others
    /// are then made to abandon it too, so that the next CG, formed on all, carries every
    /// disk's data; `Unknown` if no disk is forming it.
    pub fn try_commit(&self, cg: u64) -> CommitOutcome {
        // One pass, no allocation: the drain asks this every 200 µs while it waits.
        let (mut ready, mut abandoned, mut unknown) = (0, false, false);
        let (mut to_ship, mut unconfirmed) = (0, 0);
        for e in self.engines.iter() {
            match e.poll(cg) {
                Poll::Ready => ready += 1,
                Poll::Not(CommitOutcome::Abandoned) => abandoned = true,
                Poll::Not(CommitOutcome::Pending {
                    to_ship: t,
                    unconfirmed: u,
                }) => {
                    to_ship += t;
                    unconfirmed += u;
                }
                Poll::Not(CommitOutcome::Unknown | CommitOutcome::Committed) => unknown = true,
            }
        }
        if ready == self.engines.len() {
            for e in self.engines.iter() {
                // Ready stays ready: only `link_lost` undoes it, and it runs on the thread
                // that calls this.
                let outcome = e.try_commit(cg);
                debug_assert_eq!(
                    outcome,
                    CommitOutcome::Committed,
                    "a ready disk stays ready"
                );
            }
            return CommitOutcome::Committed;
        }
        if abandoned || unknown {
            for e in self.engines.iter() {
                e.abandon_for_group(cg);
            }
            return if abandoned {
                CommitOutcome::Abandoned
            } else {
                CommitOutcome::Unknown
            };
        }
        CommitOutcome::Pending {
            to_ship,
            unconfirmed,
        }
    }

    /// The link was lost: every disk merges everything uncommitted back into its dirty set
    /// (see [`Engine::link_lost`]).
    pub fn link_lost(&self) {
        for e in self.engines.iter() {
            e.link_lost();
        }
    }

    /// Continues numbering on every disk after `last_committed` (see
    /// [`Engine::resume_numbering`]).
    pub fn resume_numbering(&self, last_committed: u64) {
        for e in self.engines.iter() {
            e.resume_numbering(last_committed);
        }
    }

    /// The number the next CG formed will get.
    pub fn next_cg(&self) -> u64 {
        self.engines[0].next_cg()
    }

    /// Marks every chunk of every disk dirty (see [`Engine::mark_all`]).
    pub fn mark_all(&self) {
        for e in self.engines.iter() {
            e.mark_all();
        }
    }

    /// The last CG committed on every disk (they commit together).
    pub fn last_committed(&self) -> u64 {
        self.engines[0].stats().last_committed
    }

    /// A group of one disk: what a one-disk daemon runs.
    pub fn single(engine: Arc<Engine>) -> Arc<Group> {
        Arc::new(Group::new(vec![engine]).expect("one engine is a valid group"))
    }
}

#[cfg(all(test, not(feature = "loom")))]
#[path = "group_tests.rs"]
mod tests;
