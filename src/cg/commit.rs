//! Commit of a strict CG (its CR becomes the new OOS), link loss, CG numbering and full
//! resynchronisation.

use std::mem;
use std::sync::Arc;
use std::time::Instant;

use tracing::info;

use super::engine::{Central, Engine, Mode};
use super::shipped::Shipped;
use super::sync::lock;
use super::{AbandonReason, CommitOutcome};

/// What [`Engine::poll`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Poll {
    /// Every chunk handed out and confirmed, every pre-swap write finished: it may commit.
    Ready,
    /// What [`Engine::try_commit`] would answer (never `Committed`).
    Not(CommitOutcome),
}

impl Engine {
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
        match self.poll_locked(&mut c, cg) {
            Poll::Ready => {
                self.commit_locked(&mut c, cg);
                CommitOutcome::Committed
            }
            Poll::Not(outcome) => outcome,
        }
    }

    /// [`Engine::try_commit`] without the commit: whether CG `cg` could commit now (a strict
    /// CG past its drain deadline is abandoned here, as there). For a [`Group`](super::Group),
    /// which commits its engines all together or none.
    pub(super) fn poll(&self, cg: u64) -> Poll {
        self.poll_locked(&mut lock(&self.central), cg)
    }

    fn poll_locked(&self, c: &mut Central, cg: u64) -> Poll {
        if cg < c.first_uncommitted || cg >= c.next_cg {
            return Poll::Not(CommitOutcome::Unknown);
        }
        let drain = match &c.mode {
            Mode::Strict { drain, .. } if drain.cg == cg => Arc::clone(drain),
            _ => return Poll::Not(CommitOutcome::Abandoned),
        };
        let to_ship = c.oos.bits.count();
        let unconfirmed = c.unconfirmed();
        let quiesced = drain.is_quiesced();
        if quiesced && to_ship == 0 && unconfirmed == 0 {
            return Poll::Ready;
        }
        if (to_ship > 0 || !quiesced) && Instant::now() > drain.deadline {
            self.abandon_locked(c, AbandonReason::DrainTimeout);
            return Poll::Not(CommitOutcome::Abandoned);
        }
        Poll::Not(CommitOutcome::Pending {
            to_ship,
            unconfirmed,
        })
    }

    /// The commit itself, once [`Engine::poll_locked`] said `Ready`.
    fn commit_locked(&self, c: &mut Central, cg: u64) {
        let Mode::Strict { drain, cr } = mem::replace(&mut c.mode, Mode::Idle) else {
            return;
        };
        self.stop_cow(&drain);
        for gate in self.queues.iter() {
            lock(gate).drain = None;
        }
        // CR becomes OOS; the queues already record into it. Every record forwarded into
        // the old OOS was idle before the first hand-out (pre_swap), so nothing is lost.
        c.oos = cr;
        c.retired.clear();
        // A fresh bitmap, not cleared pages: its memory follows what the next CG ships.
        c.shipped = Shipped::new(self.chunks);
        c.first_uncommitted = cg + 1;
        c.last_committed = cg;
        c.committed += 1;
        // One line per group would flood the log at the default interval: debug only.
        tracing::debug!(cg, "cg: committed");
    }

    /// The link to the secondary is lost: the uncommitted CG is abandoned and everything not
    /// committed — including chunks handed out or confirmed since the last commit, which the
    /// secondary discards — is merged back into OOS. Back to idle: form a CG on reconnect.
    pub fn link_lost(&self) {
        let mut c = lock(&self.central);
        self.abandon_locked(&mut c, AbandonReason::LinkLost);
        c.shipped.merge_into(&c.oos);
        c.shipped = Shipped::new(self.chunks);
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

    /// The chunks of `from..to` that may differ from the secondary's last committed CG —
    /// dirty (OOS, CR, records not yet merged) or handed out since the last commit — as bits
    /// `i - from` of `out` (which must hold `to - from` bits; it is OR-ed into). A write is
    /// marked here from its `begin_write` on, before it touches the disk. Returns the last
    /// committed CG, as of the same moment. For the persisted change record (`crate::track`).
    pub fn unacked_in(&self, from: u64, to: u64, out: &mut [u64]) -> u64 {
        self.unacked_in_each([(from, to, out)])
    }

    /// [`Engine::unacked_in`] for each `(from, to, out)` of `ranges`, all at one moment
    /// (the central lock is taken once). Returns the last committed CG as of that moment.
    pub fn unacked_in_each<'a>(
        &self,
        ranges: impl IntoIterator<Item = (u64, u64, &'a mut [u64])>,
    ) -> u64 {
        let c = lock(&self.central);
        for (from, to, out) in ranges {
            let to = to.min(self.chunks);
            if from >= to {
                continue;
            }
            c.oos.bits.or_range_into(from, to, out);
            if let Mode::Strict { cr, .. } = &c.mode {
                cr.bits.or_range_into(from, to, out);
            }
            for r in &c.retired {
                r.bits.or_range_into(from, to, out);
            }
            c.shipped.or_range_into(from, to, out);
        }
        c.last_committed
    }

    /// Marks chunks `first..=last` dirty (what a persisted change record says may differ
    /// from the secondary, on start). Like [`Engine::mark_all`], into CR during a strict CG.
    pub fn mark_range(&self, first: u64, last: u64) {
        let last = last.min(self.chunks.saturating_sub(1));
        if first > last {
            return;
        }
        let c = lock(&self.central);
        match &c.mode {
            Mode::Strict { cr, .. } => cr.bits.set_range(first, last),
            _ => c.oos.bits.set_range(first, last),
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
}
