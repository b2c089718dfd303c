//! Formation of a CG on one engine, in explicit phases: [`Engine::prepare`], then
//! [`Engine::freeze`], [`Engine::swap`], [`Engine::run`], then [`Engine::finish`] — or, when
//! coordination takes too long, the formation is undone and ended by
//! [`Engine::coordination_abort`]. [`Engine::form_cg`] calls them in that order.
//!
//! The phases are separate so that several engines (several disks) can be formed together:
//! every engine frozen before any is swapped, and every one swapped before any runs. Then every
//! swap happens while no completion of any of them can become visible, and the ordering
//! argument of the `cg` module documentation holds across engines as it holds across the
//! queues of one engine.

use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::warn;

use super::drain::Drain;
use super::engine::{Central, Engine, Mode};
use super::record::Record;
use super::sync::{lock, AtomicBool, MutexGuard};
use super::{CgFormed, FormError};

/// How many coordination samples [`CgStats::coordination_ns`](super::CgStats::coordination_ns)
/// keeps.
const COORDINATION_SAMPLES: usize = 1024;

/// One engine's formation in progress, from [`Engine::prepare`] to [`Engine::finish`] or
/// [`Engine::coordination_abort`]. It holds the engine's central lock throughout.
pub(crate) struct Formation<'a> {
    c: MutexGuard<'a, Central>,
    cg: u64,
    /// The new CR: queues record into it from the swap on.
    cr: Arc<Record>,
    drain: Arc<Drain>,
    /// Start of coordination: the coordination time and the drain deadline count from here.
    t0: Instant,
}

impl Engine {
    /// Forms the next CG: freeze, swap, run. Fails if a strict CG is still draining, or if
    /// coordination exceeds `max_coordination_time` (the formation is then undone: the guest
    /// resumes and writes recorded meanwhile are merged into OOS).
    pub fn form_cg(&self) -> Result<CgFormed, FormError> {
        self.form_cg_inner(false)
    }

    /// `form_cg`, with a test hook that aborts after the swap.
    pub(crate) fn form_cg_inner(&self, abort_after_swap: bool) -> Result<CgFormed, FormError> {
        let mut f = self.prepare()?;
        let limit = self.cfg.max_coordination_time;

        // 1. Freeze: once every queue is frozen, nothing can complete visibly.
        self.freeze();
        let elapsed = f.t0.elapsed();
        if elapsed > limit {
            self.run();
            return Err(self.coordination_abort(f, elapsed));
        }

        // 2. Swap: from now on every queue records into CR.
        self.swap(&f);
        let elapsed = f.t0.elapsed();
        if elapsed > limit || abort_after_swap {
            self.undo_swap(&mut f);
            self.run();
            return Err(self.coordination_abort(f, elapsed));
        }

        if let Some(observe) = lock(&self.freeze_observer).clone() {
            observe();
        }

        // 3. Run: publish what was held, in order, and let completions through again.
        self.run();
        Ok(self.finish(f))
    }

    /// Starts a formation: fails if a strict CG is still draining, else takes the central
    /// lock (kept until the formation ends), the next CG number and the new CR, and starts
    /// the coordination clock. Nothing is frozen yet.
    pub(crate) fn prepare(&self) -> Result<Formation<'_>, FormError> {
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
        Ok(Formation {
            c,
            cg,
            cr,
            drain,
            t0,
        })
    }

    /// Freeze: every queue holds its completions from now on, until [`Engine::run`].
    pub(crate) fn freeze(&self) {
        // Taking a queue's lock waits for a publish in progress there (publishes happen under
        // it): once every queue is frozen, nothing can complete visibly.
        for gate in self.queues.iter() {
            lock(gate).frozen = true;
        }
    }

    /// Swap (only while frozen): every queue records into the formation's CR from now on,
    /// with copy-on-write for its CG.
    pub(crate) fn swap(&self, f: &Formation<'_>) {
        // Per queue, under its lock (atomic with that queue's recording). Queues may switch
        // one after the other: no completion is visible until run, so no write recorded in CR
        // can be the cause of a write recorded in OOS.
        for gate in self.queues.iter() {
            let mut g = lock(gate);
            g.target = Arc::clone(&f.cr);
            g.drain = Some(Arc::clone(&f.drain));
        }
    }

    /// Undoes [`Engine::swap`], before run: every queue records into OOS again, without
    /// copy-on-write.
    pub(crate) fn undo_swap(&self, f: &mut Formation<'_>) {
        // Switch back to OOS and forward CR into it (writes recorded in CR meanwhile keep
        // their bits, in-flight ones re-mark OOS when done). Still frozen, so nothing recorded
        // in CR has been acknowledged.
        self.stop_cow(&f.drain);
        self.retarget_queues(&f.c.oos);
        f.cr.forward_into(&f.c.oos);
        f.c.retired.push(Arc::clone(&f.cr));
    }

    /// Run: per queue, under its lock, unfreeze and publish held completions in order.
    pub(crate) fn run(&self) {
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

    /// Ends a formation after [`Engine::run`]: records the coordination time (freeze → run)
    /// and makes the CG strict, ready to drain.
    pub(crate) fn finish(&self, f: Formation<'_>) -> CgFormed {
        let Formation {
            mut c,
            cg,
            cr,
            drain,
            t0,
        } = f;
        let coordination = t0.elapsed();

        let ns = u64::try_from(coordination.as_nanos()).unwrap_or(u64::MAX);
        if c.coordination.len() == COORDINATION_SAMPLES {
            c.coordination.pop_front();
        }
        c.coordination.push_back(ns);
        c.coordination_max = c.coordination_max.max(ns);
        c.coordination_hist.observe(coordination);
        c.mode = Mode::Strict { drain, cr };
        c.next_cg += 1;
        c.cursor = 0;
        c.formed += 1;
        CgFormed { cg, coordination }
    }

    /// Ends a formation undone (queues swapped back if they were swapped, then run) because
    /// coordination took `elapsed`, more than `max_coordination_time`.
    pub(crate) fn coordination_abort(&self, mut f: Formation<'_>, elapsed: Duration) -> FormError {
        f.c.coordination_aborts += 1;
        let limit = self.cfg.max_coordination_time;
        warn!(
            cg = f.cg,
            ?elapsed,
            ?limit,
            "cg: coordination too slow, formation undone"
        );
        FormError::CoordinationTimeout { elapsed, limit }
    }

    /// Switches every queue to recording into `oos`, without copy-on-write.
    pub(super) fn retarget_queues(&self, oos: &Arc<Record>) {
        for gate in self.queues.iter() {
            let mut g = lock(gate);
            g.target = Arc::clone(oos);
            g.drain = None;
        }
    }
}
