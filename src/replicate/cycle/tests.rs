//! The cycle's commit/abandon decisions, without a network: a real [`Engine`] over an
//! in-memory disk drains into an in-memory [`ChunkSink`] that fails on demand.
//!
//! Every formation here uses a 60 s coordination limit: the tests also run under ptrace-based
//! coverage on a loaded machine, where the 10 ms default can be missed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use super::*;
use crate::cg::{
    CgConfig, CgPhase, CgStats, ChunkSource, CommitOutcome, Engine, Extent, FormError,
};

const CHUNK: u64 = 64;
const CHUNKS: u64 = 4;

/// An in-memory disk.
struct MemDisk(Mutex<Vec<u8>>);

impl ChunkSource for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().expect("disk");
        let start = offset as usize;
        buf.copy_from_slice(&d[start..start + buf.len()]);
        Ok(())
    }
}

/// An engine over a 4-chunk in-memory disk; `cow_cache_limit` 0 abandons a strict CG at
/// the first write that needs copy-on-write.
fn engine(cow_cache_limit: usize) -> (Arc<Engine>, Arc<MemDisk>) {
    let disk = Arc::new(MemDisk(Mutex::new(vec![0; (CHUNK * CHUNKS) as usize])));
    let cfg = CgConfig {
        disk_size: CHUNK * CHUNKS,
        chunk_size: CHUNK,
        max_coordination_time: Duration::from_secs(60),
        max_drain_time: Duration::from_secs(600),
        cow_cache_limit,
    };
    (Engine::new(cfg, 1, disk.clone()).expect("engine"), disk)
}

/// A guest write: tracked, then on the disk, then finished.
fn write(e: &Engine, d: &MemDisk, offset: u64, data: &[u8]) {
    let guard = e.begin_write(0, offset, data.len() as u64).expect("track");
    d.0.lock().expect("disk")[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    drop(guard);
}

/// What the sink was given.
#[derive(Default)]
struct Log {
    /// (cg, chunk index, data) of every chunk accepted.
    chunks: Vec<(u64, u64, Vec<u8>)>,
    /// (cg, frozen_at) of every commit made.
    commits: Vec<(u64, SystemTime)>,
    /// Every recovery: the error, and the engine's state when recovery began.
    recoveries: Vec<(io::ErrorKind, CgStats)>,
    /// (disk, cg, first chunk) of every extent accepted.
    extents: Vec<(u16, u64, u64)>,
}

impl Log {
    fn chunk_ids(&self) -> Vec<(u64, u64)> {
        self.chunks.iter().map(|(cg, i, _)| (*cg, *i)).collect()
    }
    fn commit_cgs(&self) -> Vec<u64> {
        self.commits.iter().map(|(cg, _)| *cg).collect()
    }
}

/// How recovery ends.
#[derive(Clone, Copy)]
enum Recover {
    Reconnected,
    GivesUp,
    /// The cycle is being stopped while recovering: it sets `stop` and gives up.
    Stopped,
}

/// An in-memory sink that fails on demand, each failure once.
struct MemSink {
    log: Arc<Mutex<Log>>,
    engine: Arc<Engine>,
    chunk_calls: usize,
    /// Fail the chunk call with this number (0 = the first call).
    fail_chunk_call: Option<usize>,
    /// Fail the commit of this CG.
    fail_commit: Option<u64>,
    recover: Recover,
}

impl MemSink {
    fn new(engine: &Arc<Engine>) -> (Self, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let sink = MemSink {
            log: log.clone(),
            engine: engine.clone(),
            chunk_calls: 0,
            fail_chunk_call: None,
            fail_commit: None,
            recover: Recover::Reconnected,
        };
        (sink, log)
    }
}

impl ChunkSink for MemSink {
    fn extent(&mut self, ext: Extent, data: &[u8]) -> io::Result<()> {
        let call = self.chunk_calls;
        self.chunk_calls += 1;
        if self.fail_chunk_call == Some(call) {
            self.fail_chunk_call = None;
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "chunk lost"));
        }
        let mut log = self.log.lock().expect("log");
        log.extents.push((ext.disk, ext.cg, ext.first));
        // Logged per chunk, as the secondary keeps them.
        for (k, part) in data.chunks(CHUNK as usize).enumerate() {
            log.chunks
                .push((ext.cg, ext.first + k as u64, part.to_vec()));
        }
        Ok(())
    }

    fn commit(&mut self, cg: u64, frozen_at: SystemTime) -> io::Result<()> {
        if self.fail_commit == Some(cg) {
            self.fail_commit = None;
            return Err(io::Error::new(io::ErrorKind::TimedOut, "commit lost"));
        }
        self.log.lock().expect("log").commits.push((cg, frozen_at));
        Ok(())
    }

    fn recover(&mut self, error: &io::Error, stop: &AtomicBool) -> io::Result<()> {
        let state = self.engine.stats();
        let mut log = self.log.lock().expect("log");
        log.recoveries.push((error.kind(), state));
        match self.recover {
            Recover::Reconnected => Ok(()),
            Recover::GivesUp => Err(io::Error::new(io::ErrorKind::NotConnected, "gave up")),
            Recover::Stopped => {
                stop.store(true, Ordering::SeqCst);
                Err(io::Error::other("stopped"))
            }
        }
    }
}

/// [`drain_and_commit`] of CG `cg` on `e`'s disk alone, frozen at [`frozen_at`].
fn drain(e: &Arc<Engine>, sink: &mut MemSink, cg: u64, stats: &CycleStats) -> io::Result<()> {
    drain_and_commit(&Group::single(e.clone()), sink, cg, frozen_at(), stats)
}

/// A freeze time whose microseconds are easy to check.
fn frozen_at() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_micros(1_234_567)
}

/// Runs the cycle loop with no wait between ticks, forming through `form`.
fn run_cycle(
    engine: &Arc<Engine>,
    form: &dyn Fn() -> Result<CgFormed, FormError>,
    sink: &mut MemSink,
    stop: &AtomicBool,
    stats: &CycleStats,
) -> io::Result<()> {
    let trigger = (Mutex::new(0u64), Condvar::new());
    run(
        &Group::single(engine.clone()),
        form,
        sink,
        Duration::ZERO,
        stop,
        &trigger,
        stats,
    )
}

/// A formation function that forms through the engine and stops the cycle after the
/// `last`-th call (so the loop ends once that CG's drain returns).
fn form_then_stop<'a>(
    engine: &'a Engine,
    stop: &'a AtomicBool,
    calls: &'a AtomicUsize,
    last: usize,
) -> impl Fn() -> Result<CgFormed, FormError> + 'a {
    move || {
        if calls.fetch_add(1, Ordering::SeqCst) + 1 >= last {
            stop.store(true, Ordering::SeqCst);
        }
        engine.form_cg()
    }
}

#[test]
fn settle_decides_after_each_drain_pass() {
    use CommitOutcome::*;
    let pending = |to_ship, unconfirmed| Pending {
        to_ship,
        unconfirmed,
    };
    let table = [
        // The sink committed a ready CG: the engine must commit it too.
        (true, Committed, Settle::Committed),
        (true, pending(0, 1), Settle::NotCommitted),
        (true, Abandoned, Settle::NotCommitted),
        (true, Unknown, Settle::NotCommitted),
        // Not ready: nothing to commit now, or wait for the rest.
        (false, Abandoned, Settle::Done),
        (false, Unknown, Settle::Done),
        (false, Committed, Settle::Done),
        (false, pending(1, 0), Settle::Wait),
        (false, pending(0, 1), Settle::Wait),
        (false, pending(0, 0), Settle::Wait),
    ];
    for (ready, outcome, want) in table {
        assert_eq!(settle(ready, outcome), want, "ready {ready}, {outcome:?}");
    }
}

#[test]
fn ready_cg_is_shipped_and_committed() {
    let (e, d) = engine(1 << 20);
    write(&e, &d, 0, &[1; 10]);
    write(&e, &d, 2 * CHUNK + 5, &[2; 10]);
    let (mut sink, log) = MemSink::new(&e);
    let stats = CycleStats::default();
    let cg = e.form_cg().expect("form").cg;

    drain(&e, &mut sink, cg, &stats).expect("drain");

    let log = log.lock().expect("log");
    assert_eq!(log.chunk_ids(), vec![(1, 0), (1, 2)]);
    assert_eq!(&log.chunks[1].2[5..15], &[2; 10]);
    assert_eq!(log.commits, vec![(1, frozen_at())]);
    assert_eq!(stats.last_committed.load(Ordering::SeqCst), 1);
    assert_eq!(
        stats.last_commit_frozen_us.load(Ordering::SeqCst),
        1_234_567
    );
    assert_eq!(stats.chunks_shipped.load(Ordering::SeqCst), 2);
    assert_eq!(stats.bytes_shipped.load(Ordering::SeqCst), 2 * CHUNK);
    let s = e.stats();
    assert_eq!(
        (s.phase, s.last_committed, s.committed, s.oos_dirty),
        (CgPhase::Idle, 1, 1, 0)
    );
}

#[test]
fn empty_cg_commits_at_once() {
    let (e, _) = engine(1 << 20);
    let (mut sink, log) = MemSink::new(&e);
    let stats = CycleStats::default();
    let cg = e.form_cg().expect("form").cg;
    drain(&e, &mut sink, cg, &stats).expect("drain");
    let log = log.lock().expect("log");
    assert!(log.chunks.is_empty());
    assert_eq!(log.commit_cgs(), vec![1]);
}

#[test]
fn abandoned_cg_ships_its_dirty_chunks_and_returns_without_committing() {
    let (e, d) = engine(0);
    write(&e, &d, 0, &[1; 128]); // chunks 0 and 1
    let cg = e.form_cg().expect("form").cg;
    write(&e, &d, 0, &[9; 8]); // needs copy-on-write, the cache has no room: abandoned
    assert_eq!(e.phase(), CgPhase::Abandoned { cg: 1 });
    let (mut sink, log) = MemSink::new(&e);
    let stats = CycleStats::default();

    drain(&e, &mut sink, cg, &stats).expect("drain");

    {
        let log = log.lock().expect("log");
        assert_eq!(log.chunk_ids(), vec![(1, 0), (1, 1)]);
        // An abandoned CG ships what the disk holds now.
        assert_eq!(&log.chunks[0].2[..9], &[9, 9, 9, 9, 9, 9, 9, 9, 1]);
        assert!(log.commits.is_empty());
    }
    assert_eq!(stats.last_committed.load(Ordering::SeqCst), 0);
    assert_eq!(stats.chunks_shipped.load(Ordering::SeqCst), 2);
    let s = e.stats();
    assert_eq!((s.last_committed, s.abandoned_cache_full), (0, 1));
    assert_eq!(e.try_commit(cg), CommitOutcome::Abandoned);

    // The next formation gives a CG that commits.
    let cg = e.form_cg().expect("form").cg;
    drain(&e, &mut sink, cg, &stats).expect("drain");
    assert_eq!(log.lock().expect("log").commit_cgs(), vec![2]);
    assert_eq!(stats.last_committed.load(Ordering::SeqCst), 2);
}

#[test]
fn unknown_cg_returns_without_shipping_or_committing() {
    let (e, d) = engine(1 << 20);
    write(&e, &d, 0, &[1; 1]);
    let (mut sink, log) = MemSink::new(&e);
    let stats = CycleStats::default();
    // Idle engine: nothing handed out, CG 7 is unknown.
    drain(&e, &mut sink, 7, &stats).expect("drain");
    let log = log.lock().expect("log");
    assert!(log.chunks.is_empty() && log.commits.is_empty());
    assert_eq!(e.stats().oos_dirty, 1);
}

#[test]
fn failed_chunk_or_commit_is_an_error_and_nothing_commits() {
    for fail_commit in [false, true] {
        let (e, d) = engine(1 << 20);
        // Chunks 0 and 2: two extents.
        write(&e, &d, 0, &[1; CHUNK as usize]);
        write(&e, &d, 2 * CHUNK, &[1; CHUNK as usize]);
        let (mut sink, log) = MemSink::new(&e);
        if fail_commit {
            sink.fail_commit = Some(1);
        } else {
            sink.fail_chunk_call = Some(1);
        }
        let stats = CycleStats::default();
        let cg = e.form_cg().expect("form").cg;
        let err = drain(&e, &mut sink, cg, &stats).expect_err("fails");
        let want = if fail_commit {
            io::ErrorKind::TimedOut
        } else {
            io::ErrorKind::ConnectionReset
        };
        assert_eq!(err.kind(), want);
        assert!(log.lock().expect("log").commits.is_empty());
        assert_eq!(stats.last_committed.load(Ordering::SeqCst), 0);
        assert_eq!(e.stats().last_committed, 0);
        assert_eq!(e.phase(), CgPhase::Strict { cg: 1 }, "the caller decides");
    }
}

/// The engine's state when a recovery began: link lost, everything uncommitted dirty again.
fn assert_merged_back(state: &CgStats, dirty: u64) {
    assert_eq!(state.phase, CgPhase::Idle);
    assert_eq!(state.abandoned_link_lost, 1);
    assert_eq!(state.oos_dirty, dirty);
    assert_eq!((state.shipped_uncommitted, state.unconfirmed), (0, 0));
    assert_eq!(state.last_committed, 0);
}

#[test]
fn failed_chunk_merges_the_cg_back_recovers_and_ships_it_again() {
    let (e, d) = engine(1 << 20);
    // Chunks 0 and 2: two extents. The first goes through, the second fails.
    write(&e, &d, 0, &[1; CHUNK as usize]);
    write(&e, &d, 2 * CHUNK, &[1; CHUNK as usize]);
    let (mut sink, log) = MemSink::new(&e);
    sink.fail_chunk_call = Some(1);
    let (stop, calls, stats) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        CycleStats::default(),
    );
    let form = form_then_stop(&e, &stop, &calls, 2);

    run_cycle(&e, &form, &mut sink, &stop, &stats).expect("run");

    let log = log.lock().expect("log");
    assert_eq!(log.recoveries.len(), 1);
    assert_eq!(log.recoveries[0].0, io::ErrorKind::ConnectionReset);
    assert_merged_back(&log.recoveries[0].1, 2);
    let want = vec![(1, 0), (2, 0), (2, 2)];
    assert_eq!(log.chunk_ids(), want);
    assert_eq!(log.commit_cgs(), vec![2]);
    assert_eq!(stats.last_committed.load(Ordering::SeqCst), 2);
    assert_eq!(stats.form_failures.load(Ordering::SeqCst), 0);
    assert_eq!(e.stats().oos_dirty, 0);
}

#[test]
fn failed_commit_merges_the_cg_back_recovers_and_ships_it_again() {
    let (e, d) = engine(1 << 20);
    write(&e, &d, 0, &[1; 256]);
    let (mut sink, log) = MemSink::new(&e);
    sink.fail_commit = Some(1);
    let (stop, calls, stats) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        CycleStats::default(),
    );
    let form = form_then_stop(&e, &stop, &calls, 2);

    run_cycle(&e, &form, &mut sink, &stop, &stats).expect("run");

    let log = log.lock().expect("log");
    assert_eq!(log.recoveries.len(), 1);
    assert_eq!(log.recoveries[0].0, io::ErrorKind::TimedOut);
    // Every chunk of CG 1 was shipped and confirmed: all of them are dirty again.
    assert_merged_back(&log.recoveries[0].1, CHUNKS);
    let want: Vec<(u64, u64)> = [1, 2]
        .into_iter()
        .flat_map(|cg| (0..CHUNKS).map(move |i| (cg, i)))
        .collect();
    assert_eq!(log.chunk_ids(), want);
    assert_eq!(log.commit_cgs(), vec![2]);
    assert_eq!(stats.last_committed.load(Ordering::SeqCst), 2);
}

#[test]
fn writes_during_a_failed_cg_are_shipped_after_recovery() {
    // A chunk written after the freeze (in CR) and the CG's own chunks all ship in the next CG.
    let (e, d) = engine(1 << 20);
    write(&e, &d, 0, &[1; 1]);
    let (mut sink, log) = MemSink::new(&e);
    sink.fail_commit = Some(1);
    let (stop, calls, stats) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        CycleStats::default(),
    );
    let form = || {
        let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
        let formed = e.form_cg();
        if n == 1 {
            write(&e, &d, 3 * CHUNK, &[3; 1]); // after the swap: recorded for the next CG
        } else {
            stop.store(true, Ordering::SeqCst);
        }
        formed
    };

    run_cycle(&e, &form, &mut sink, &stop, &stats).expect("run");

    let log = log.lock().expect("log");
    assert_merged_back(&log.recoveries[0].1, 2);
    assert_eq!(log.chunk_ids(), vec![(1, 0), (2, 0), (2, 3)]);
    assert_eq!(log.commit_cgs(), vec![2]);
}

#[test]
fn busy_and_coordination_timeout_are_counted_and_retried() {
    let (e, d) = engine(1 << 20);
    write(&e, &d, 0, &[1; 1]);
    let (mut sink, log) = MemSink::new(&e);
    let (stop, calls, stats) = (
        AtomicBool::new(false),
        AtomicUsize::new(0),
        CycleStats::default(),
    );
    let form = || match calls.fetch_add(1, Ordering::SeqCst) {
        0 => Err(FormError::Busy { cg: 0 }),
        1 => Err(FormError::CoordinationTimeout {
            elapsed: Duration::from_millis(20),
            limit: Duration::from_millis(10),
        }),
        2 => Err(FormError::Busy { cg: 0 }),
        _ => {
            stop.store(true, Ordering::SeqCst);
            e.form_cg()
        }
    };

    run_cycle(&e, &form, &mut sink, &stop, &stats).expect("run");

    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert_eq!(stats.form_failures.load(Ordering::SeqCst), 3);
    let log = log.lock().expect("log");
    assert!(
        log.recoveries.is_empty(),
        "a formation failure is not a link failure"
    );
    assert_eq!(log.chunk_ids(), vec![(1, 0)]);
    assert_eq!(log.commit_cgs(), vec![1]);
    assert_eq!(e.stats().abandoned_link_lost, 0);
}

#[test]
fn recovery_failure_ends_the_cycle_with_its_error_unless_stopping() {
    for (recover, ends_ok) in [(Recover::GivesUp, false), (Recover::Stopped, true)] {
        let (e, d) = engine(1 << 20);
        write(&e, &d, 0, &[1; 256]);
        let (mut sink, log) = MemSink::new(&e);
        sink.fail_chunk_call = Some(0);
        sink.recover = recover;
        let (stop, stats) = (AtomicBool::new(false), CycleStats::default());
        // Never stops by itself: only the recovery's outcome ends the loop.
        let form = || e.form_cg();

        let r = run_cycle(&e, &form, &mut sink, &stop, &stats);

        if ends_ok {
            r.expect("stopping is a clean end");
        } else {
            assert_eq!(r.expect_err("gives up").kind(), io::ErrorKind::NotConnected);
        }
        let log = log.lock().expect("log");
        assert_eq!(log.recoveries.len(), 1);
        assert_merged_back(&log.recoveries[0].1, CHUNKS);
        assert!(log.commits.is_empty());
    }
}

#[test]
fn default_recovery_gives_up_with_the_same_error() {
    struct Plain;
    impl ChunkSink for Plain {
        fn extent(&mut self, _: Extent, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn commit(&mut self, _: u64, _: SystemTime) -> io::Result<()> {
            Ok(())
        }
    }
    let err = io::Error::new(io::ErrorKind::BrokenPipe, "link down");
    let got = Plain
        .recover(&err, &AtomicBool::new(false))
        .expect_err("gives up");
    assert_eq!((got.kind(), got.to_string()), (err.kind(), err.to_string()));
}

#[test]
fn cycle_thread_commits_on_trigger_and_stops() {
    // Niceness 0 forms on the drain thread; 1 forms on the separate formation thread.
    for nice in [0, 1] {
        let (e, d) = engine(1 << 20);
        write(&e, &d, 0, &[1; 100]);
        let (sink, log) = MemSink::new(&e);
        // A long interval: the first CG forms at start, the next only on the trigger.
        let cycle = Cycle::start(
            Group::single(e.clone()),
            Box::new(sink),
            Duration::from_secs(3600),
            ShipThreads { nice, cpus: None },
        );
        let committed = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while cycle.stats().last_committed.load(Ordering::SeqCst) < n {
                assert!(
                    Instant::now() < deadline,
                    "CG {n} not committed within 60 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        committed(1);
        assert_eq!(cycle.stats().chunks_shipped.load(Ordering::SeqCst), 2);
        write(&e, &d, 2 * CHUNK, &[2; 10]);
        cycle.trigger();
        committed(2);
        assert_eq!(cycle.stats().chunks_shipped.load(Ordering::SeqCst), 3);
        cycle.stop().expect("clean stop");
        assert_eq!(log.lock().expect("log").commit_cgs(), vec![1, 2]);
        assert_eq!(e.stats().last_committed, 2);
    }
}

#[test]
fn a_group_of_two_disks_drains_both_and_commits_once_or_not_at_all() {
    let (a, da) = engine(1 << 20);
    let (b, db) = engine(0); // no copy-on-write room: a write over its CG abandons it
    let g = Group::new(vec![a.clone(), b.clone()]).expect("group");
    let (mut sink, log) = MemSink::new(&a);
    let stats = CycleStats::default();

    write(&a, &da, 0, &[1; 4]);
    write(&b, &db, 3 * CHUNK, &[2; 4]);
    let cg = g.form_cg().expect("form").cg;
    drain_and_commit(&g, &mut sink, cg, frozen_at(), &stats).expect("drain");
    {
        let mut log = log.lock().expect("log");
        log.extents.sort_unstable();
        assert_eq!(log.extents, vec![(0, 1, 0), (1, 1, 3)]);
        assert_eq!(log.commit_cgs(), vec![1], "one commit for both disks");
    }
    assert_eq!((a.stats().last_committed, b.stats().last_committed), (1, 1));

    // Disk B abandons CG 2 (a write over a chunk its CG holds, no cache room): A has
    // nothing left to ship but must not commit CG 2 alone.
    write(&a, &da, CHUNK, &[3; 4]);
    write(&b, &db, 0, &[4; 4]);
    let cg = g.form_cg().expect("form").cg;
    write(&b, &db, 0, &[5; 4]);
    assert_eq!(b.phase(), CgPhase::Abandoned { cg: 2 });
    drain_and_commit(&g, &mut sink, cg, frozen_at(), &stats).expect("drain");
    assert_eq!(log.lock().expect("log").commit_cgs(), vec![1]);
    assert_eq!((a.stats().last_committed, b.stats().last_committed), (1, 1));

    // What the abandoned CG shipped (both disks' chunks, as they are now) is staged and
    // becomes durable with the next commit, formed on both disks.
    let cg = g.form_cg().expect("form").cg;
    drain_and_commit(&g, &mut sink, cg, frozen_at(), &stats).expect("drain");
    assert_eq!(log.lock().expect("log").commit_cgs(), vec![1, 3]);
    assert_eq!((a.stats().last_committed, b.stats().last_committed), (3, 3));
    let log = log.lock().expect("log");
    let staged: Vec<_> = log.extents.iter().filter(|e| e.1 == 2).copied().collect();
    assert_eq!(staged, vec![(0, 2, 1), (1, 2, 0)]);
    let b0 = log
        .chunks
        .iter()
        .rfind(|c| c.0 == 2 && c.1 == 0)
        .expect("B's chunk 0");
    assert_eq!(
        b0.2[..4],
        [5; 4],
        "an abandoned CG ships what the disk holds now"
    );
    assert_eq!(stats.last_committed.load(Ordering::SeqCst), 3);
}
