//! The consistency-group cycle: form a CG on a timer (or on demand), drain it into a sink,
//! commit it when the sink has made it durable, and keep figures (coordination time, RPO).
//!
//! The sink is where chunks go: the QUIC link to a secondary, or [`LocalReplica`](super::local::LocalReplica), an
//! in-process replica image used by the tests and the benchmark.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use crate::cg::{CgFormed, CommitOutcome, Extent, FormError, Group};
use crate::sys::clock::unix_micros;
use crate::sys::priority::ShipThreads;

/// Where the chunks of each CG go.
pub trait ChunkSink: Send {
    /// Called once by [`Cycle::start`], before the first CG is formed: a sink that knows
    /// what it holds tells the group what the first CGs must ship (e.g. everything, with
    /// [`Group::mark_all`]) and where numbering continues ([`Group::resume_numbering`]).
    fn attach(&mut self, group: &Group) {
        let _ = group;
    }
    /// Takes one extent of CG `ext.cg` of disk `ext.disk`, whose bytes are `data` (`ext.len`
    /// of them). Returning Ok means the sink has it (the engine may forget it); it need not
    /// be durable until [`ChunkSink::commit`].
    fn extent(&mut self, ext: Extent, data: &[u8]) -> io::Result<()>;
    /// Makes CG `cg` durable and visible as a whole; returns once it is.
    fn commit(&mut self, cg: u64, frozen_at: SystemTime) -> io::Result<()>;
    /// Called before each group is formed: get ready to take one (e.g. connect, with
    /// backoff, if not connected). A group formed before a connection could not be shipped
    /// over it, since the connection decides what the group must contain. Return an error
    /// to end the cycle; check `stop` while waiting.
    fn prepare(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let _ = stop;
        Ok(())
    }
    /// Called after `chunk` or `commit` failed (the group has already merged everything
    /// uncommitted back into its dirty set): get ready to ship again, e.g. reconnect with
    /// backoff. Return an error to end the cycle; check `stop` while waiting.
    fn recover(&mut self, error: &io::Error, stop: &AtomicBool) -> io::Result<()> {
        let _ = stop;
        Err(io::Error::new(error.kind(), error.to_string()))
    }
}

/// Figures of the cycle, readable while it runs.
#[derive(Default)]
pub struct CycleStats {
    /// Last committed CG.
    pub last_committed: AtomicU64,
    /// Wall-clock time (µs since the epoch) of the freeze of the last committed CG: the
    /// secondary holds the primary's state as of then. RPO = now - this.
    pub last_commit_frozen_us: AtomicU64,
    /// Chunks shipped.
    pub chunks_shipped: AtomicU64,
    /// Extents shipped (one link message each).
    pub extents_shipped: AtomicU64,
    /// Bytes shipped.
    pub bytes_shipped: AtomicU64,
    /// Formations that failed (busy, or coordination too slow).
    pub form_failures: AtomicU64,
}

/// A running cycle thread.
pub struct Cycle {
    stop: Arc<AtomicBool>,
    trigger: Arc<(Mutex<u64>, Condvar)>,
    stats: Arc<CycleStats>,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Cycle {
    /// Starts forming a CG every `interval` across `group`'s disks, draining into `sink`
    /// (attached to the group first, see [`ChunkSink::attach`]). The drain
    /// runs at `threads.nice` (see [`crate::sys::priority`]); formation does not: a freeze
    /// must not wait behind busy queue workers, so with a niceness above 0 a small thread at
    /// normal priority forms the CGs on the drain thread's request. Both run on
    /// `threads.cpus`.
    pub fn start(
        group: Arc<Group>,
        mut sink: Box<dyn ChunkSink>,
        interval: Duration,
        threads: ShipThreads,
    ) -> Cycle {
        sink.attach(&group);
        let stop = Arc::new(AtomicBool::new(false));
        let trigger = Arc::new((Mutex::new(0u64), Condvar::new()));
        let stats = Arc::new(CycleStats::default());
        let (st, tr, sa) = (stop.clone(), trigger.clone(), stats.clone());
        let former = (threads.nice != 0).then(|| Former::start(group.clone(), threads.clone()));
        // Returns once the thread runs at its priority (so its state is observable at once).
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("drblk-cg-cycle".into())
            .spawn(move || {
                threads.apply("drain thread");
                let _ = ready_tx.send(());
                let form = || match &former {
                    Some(f) => f.form(),
                    None => group.form_cg(),
                };
                run(&group, &form, sink.as_mut(), interval, &st, &tr, &sa)
            })
            .expect("spawning the CG cycle thread");
        let _ = ready.recv();
        Cycle {
            stop,
            trigger,
            stats,
            thread: Some(thread),
        }
    }

    /// The cycle's figures.
    pub fn stats(&self) -> &Arc<CycleStats> {
        &self.stats
    }

    /// Forms a CG now instead of waiting for the timer.
    pub fn trigger(&self) {
        let (m, cv) = &*self.trigger;
        *m.lock().expect("trigger lock") += 1;
        cv.notify_all();
    }

    /// Stops the cycle (after the CG in progress, if its drain finishes) and returns how it
    /// ended.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        self.trigger();
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("CG cycle panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for Cycle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.trigger();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Forms CGs at normal priority for a niced drain thread: one request at a time.
struct Former {
    requests: std::sync::mpsc::Sender<std::sync::mpsc::Sender<Result<CgFormed, FormError>>>,
}

impl Former {
    fn start(group: Arc<Group>, threads: ShipThreads) -> Former {
        let (tx, rx) =
            std::sync::mpsc::channel::<std::sync::mpsc::Sender<Result<CgFormed, FormError>>>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("drblk-cg-form".into())
            // Ends when the drain thread drops the Former (the channel closes).
            .spawn(move || {
                threads.apply_cpus("formation thread");
                let _ = ready_tx.send(());
                for reply in rx {
                    let _ = reply.send(group.form_cg());
                }
            })
            .expect("spawning the CG formation thread");
        let _ = ready.recv();
        Former { requests: tx }
    }

    fn form(&self) -> Result<CgFormed, FormError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.requests
            .send(tx)
            .expect("the CG formation thread lives as long as the cycle");
        rx.recv()
            .expect("the CG formation thread answers every request")
    }
}

fn run(
    group: &Group,
    form: &dyn Fn() -> Result<CgFormed, FormError>,
    sink: &mut dyn ChunkSink,
    interval: Duration,
    stop: &AtomicBool,
    trigger: &(Mutex<u64>, Condvar),
    stats: &CycleStats,
) -> io::Result<()> {
    let mut seen_trigger = 0u64;
    // The first group forms at once: what is dirty at start (the initial copy, or what the
    // change record says a crash left unshipped) starts shipping without waiting an interval.
    let mut next_tick = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        // Wait for the timer or a trigger.
        {
            let (m, cv) = trigger;
            let mut g = m.lock().expect("trigger lock");
            while *g == seen_trigger && Instant::now() < next_tick && !stop.load(Ordering::SeqCst) {
                let wait = next_tick.saturating_duration_since(Instant::now());
                g = cv.wait_timeout(g, wait).expect("trigger lock").0;
            }
            seen_trigger = *g;
        }
        next_tick = Instant::now() + interval;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if let Err(e) = sink.prepare(stop) {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            return Err(e);
        }
        let frozen_at = SystemTime::now();
        let formed = match form() {
            Ok(f) => f,
            Err(e @ (FormError::Busy { .. } | FormError::CoordinationTimeout { .. })) => {
                stats.form_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "no CG formed this tick");
                continue;
            }
        };
        if let Err(e) = drain_and_commit(group, sink, formed.cg, frozen_at, stats) {
            static LOG: crate::sys::log_limit::LogLimiter =
                crate::sys::log_limit::LogLimiter::new(Duration::from_secs(60));
            if let Some(a) = LOG.admit() {
                tracing::warn!(cg = formed.cg, error = %e, "shipping the consistency group failed{}", a.note());
            }
            // Everything not committed goes back into the dirty set and ships again later.
            group.link_lost();
            if let Err(e) = sink.recover(&e, stop) {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Ships every chunk of CG `cg` into `sink` and commits it; if the CG was abandoned, ships
/// what is dirty and returns (the next formation produces a committable CG).
pub fn drain_and_commit(
    group: &Group,
    sink: &mut dyn ChunkSink,
    cg: u64,
    frozen_at: SystemTime,
    stats: &CycleStats,
) -> io::Result<()> {
    // One buffer for the whole drain: extents are read into it and handed to the sink
    // borrowed, so nothing is allocated or zeroed per extent.
    let mut buf = Vec::new();
    loop {
        while let Some(ext) = group.next_extent(&mut buf)? {
            sink.extent(ext, &buf[..ext.len])?;
            group.confirm(&ext);
            stats.chunks_shipped.fetch_add(ext.count, Ordering::Relaxed);
            stats.extents_shipped.fetch_add(1, Ordering::Relaxed);
            stats
                .bytes_shipped
                .fetch_add(ext.len as u64, Ordering::Relaxed);
        }
        // Every disk ready, or none is committed: the sink commits the group whole.
        let ready = group.is_ready(cg);
        if ready {
            sink.commit(cg, frozen_at)?;
        }
        let outcome = group.try_commit(cg);
        match settle(ready, outcome) {
            Settle::Committed => {
                stats.last_committed.store(cg, Ordering::SeqCst);
                stats
                    .last_commit_frozen_us
                    .store(unix_micros(frozen_at), Ordering::SeqCst);
                return Ok(());
            }
            Settle::Done => return Ok(()),
            Settle::Wait => std::thread::sleep(Duration::from_micros(200)),
            Settle::NotCommitted => {
                return Err(io::Error::other(format!(
                    "CG {cg} was ready but did not commit: {outcome:?}"
                )))
            }
        }
    }
}

/// What the drain of a CG does once it has handed out every chunk it could.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// The sink committed the CG and so did the group: record it, done.
    Committed,
    /// The sink committed the CG but the group did not: an error (the link is treated as
    /// lost, so everything uncommitted ships again).
    NotCommitted,
    /// Nothing to commit now (abandoned, unknown, or committed elsewhere): done.
    Done,
    /// Chunks still to hand out or to be confirmed: wait a little and drain again.
    Wait,
}

/// The decision after a drain pass: `ready` is what [`Group::is_ready`] said before the
/// sink was asked to commit (only then is it asked), `outcome` what [`Group::try_commit`]
/// answered next.
fn settle(ready: bool, outcome: CommitOutcome) -> Settle {
    match (ready, outcome) {
        (true, CommitOutcome::Committed) => Settle::Committed,
        (true, _) => Settle::NotCommitted,
        (false, CommitOutcome::Abandoned | CommitOutcome::Unknown | CommitOutcome::Committed) => {
            Settle::Done
        }
        (false, CommitOutcome::Pending { .. }) => Settle::Wait,
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests;
