//! Consistency groups through a real vhost-user connection: a two-queue frontend issues
//! dependent writes while CGs form every few milliseconds; an in-process consumer applies
//! each committed CG to a second image, where a dependent-write checker runs at every commit.
//! A freeze observer checks that no used-ring update reaches the frontend between freeze and
//! run.

#![allow(clippy::needless_range_loop)] // the workload indexes queues and slots side by side

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dw::History;
use drblk::replicate::local::LocalReplica;
use drblk_testkit::test_frontend::TestFrontend;
use vm_memory::{Bytes, GuestMemoryMmap};

const SIZE: u64 = 2 << 20;

struct Outcome {
    commits: u64,
    violations: Vec<String>,
    frozen_used_changes: u64,
    freeze_samples: u64,
    writes: u64,
    stats: drblk::cg::CgStats,
}

fn run_workload(min_cgs: u64, cow_limit: u64, chunk: u64) -> Outcome {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("drblk=warn")
        .with_test_writer()
        .try_init();
    let s = common::start(SIZE, |a| {
        a.cg.consistency_groups = true;
        a.cg.chunk_size = chunk;
        a.cg.cow_cache_limit = cow_limit;
        a.cg.max_coordination_time = Duration::from_millis(200).into();
    });
    // The initial content is zeroes (block id 0): start from a zeroed image.
    std::fs::write(&s.disk, vec![0u8; SIZE as usize]).unwrap();
    let server = s.server.as_ref().unwrap();
    let engine = server.engine().unwrap().clone();
    let mut f = TestFrontend::connect(&s.socket, 2, 256, true).unwrap();

    // Freeze observer: sample the guest-visible used indexes while frozen; they must not move.
    let mem: GuestMemoryMmap<()> = f.mem().clone();
    let addrs = [f.used_idx_addr(0), f.used_idx_addr(1)];
    let changes = Arc::new(AtomicU64::new(0));
    let samples = Arc::new(AtomicU64::new(0));
    let (c2, s2) = (changes.clone(), samples.clone());
    engine.set_freeze_observer(Some(Arc::new(move || {
        let n = s2.fetch_add(1, Ordering::Relaxed);
        if n % 4 != 0 {
            return;
        }
        let read = || addrs.map(|a| mem.load::<u16>(a, Ordering::Acquire).unwrap());
        let before = read();
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(300) {
            std::hint::spin_loop();
        }
        if read() != before {
            c2.fetch_add(1, Ordering::Relaxed);
        }
    })));

    let history = Arc::new(Mutex::new(History::new(SIZE)));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let commits = Arc::new(AtomicU64::new(0));
    let (h2, v2, k2) = (history.clone(), violations.clone(), commits.clone());
    let replica = LocalReplica::create(&s.dir.path().join("replica.img"), SIZE, chunk)
        .unwrap()
        .on_commit(move |cg, image: &File| {
            let mut buf = vec![0u8; SIZE as usize];
            image.read_exact_at(&mut buf, 0).unwrap();
            if let Err(e) = h2.lock().unwrap().check(&buf) {
                v2.lock().unwrap().push(format!("CG {cg}: {e}"));
            }
            k2.fetch_add(1, Ordering::SeqCst);
        });
    let cycle = server
        .start_cycle(Box::new(replica), Duration::from_millis(2))
        .unwrap();

    // A hang guard only: every group is made durable in the replica store (journal, image
    // and state fsynced), which takes tens of milliseconds a group on some disks.
    let deadline = Instant::now() + Duration::from_secs(600);
    let writes = common::dw::drive(&mut f, &history, SIZE, || {
        commits.load(Ordering::SeqCst) >= min_cgs || Instant::now() > deadline
    });
    cycle.stop().unwrap();
    let stats = engine.stats();
    engine.set_freeze_observer(None);
    let v = violations.lock().unwrap().clone();
    Outcome {
        commits: commits.load(Ordering::SeqCst),
        violations: v,
        frozen_used_changes: changes.load(Ordering::Relaxed),
        freeze_samples: samples.load(Ordering::Relaxed),
        writes,
        stats,
    }
}

#[test]
fn a_thousand_cgs_of_dependent_writes_are_all_consistent() {
    let o = run_workload(min_cgs(1000), 256 << 20, 64 << 10);
    println!(
        "{} writes, {} CGs committed, {} formed, {} preserved chunks, coordination max {} µs, {} freezes observed",
        o.writes, o.commits, o.stats.formed, o.stats.chunks_preserved, o.stats.coordination_max_ns / 1000, o.freeze_samples
    );
    assert!(
        o.violations.is_empty(),
        "{:#?}",
        &o.violations[..o.violations.len().min(5)]
    );
    assert!(
        o.commits >= min_cgs(1000),
        "only {} CGs committed in time",
        o.commits
    );
    if !quick() {
        assert!(
            o.stats.chunks_preserved > 0,
            "the workload must exercise copy-on-write"
        );
    }
    assert_eq!(
        o.frozen_used_changes, 0,
        "a used-ring update reached the frontend during a freeze"
    );
}

#[test]
fn a_tiny_cow_cache_keeps_commits_consistent_under_load() {
    // A 4 KiB cache holds one preserved 4 KiB write: when the guest rewrites more of the
    // chunks the drain has not shipped yet, the strict CG is abandoned. How often that happens under this load
    // depends on scheduling, so this test asserts consistency only; the abandonment itself
    // is driven deterministically below.
    let o = run_workload(min_cgs(100), 4096, 64 << 10);
    println!(
        "{} writes, {} CGs committed, {} abandoned (cache full)",
        o.writes, o.commits, o.stats.abandoned_cache_full
    );
    assert!(
        o.violations.is_empty(),
        "{:#?}",
        &o.violations[..o.violations.len().min(5)]
    );
    assert!(o.commits >= min_cgs(100));
}

#[test]
fn a_full_cow_cache_abandons_the_cg_without_stalling_and_the_next_cg_commits() {
    // Deterministic: form CG n over three dirty chunks, then (before any drain) the guest
    // rewrites two of them (4 KiB each) through the real connection. The first rewrite
    // preserves what it overwrites (filling the 4 KiB cache), the second would exceed it: CG n is
    // abandoned, the write still completes at once, nothing of CG n is committed, and the
    // next CG brings the replica to the primary's image.
    use drblk::cg::{CgPhase, CommitOutcome};
    use drblk::replicate::cycle::{drain_and_commit, CycleStats};
    use drblk_testkit::test_frontend::{Desc, DATA_BASE};
    use std::time::SystemTime;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

    const CHUNK: u64 = 64 << 10;
    let s = common::start(SIZE, |a| {
        a.cg.consistency_groups = true;
        a.cg.chunk_size = CHUNK;
        a.cg.cow_cache_limit = 4096;
        // Groups are formed by hand and must form: no machine takes a minute to freeze.
        a.cg.max_coordination_time = Duration::from_secs(60).into();
    });
    let server = s.server.as_ref().unwrap();
    let engine = server.engine().unwrap().clone();
    let group = server.group().unwrap().clone();
    let mut f = TestFrontend::connect(&s.socket, 2, 256, true).unwrap();
    let mut write = |q: usize, chunk: u64, byte: u8| {
        f.write_mem(DATA_BASE, &[byte; 4096]).unwrap();
        let (st, _) = f
            .request(
                q,
                VIRTIO_BLK_T_OUT,
                chunk * CHUNK / 512,
                &[Desc::r(DATA_BASE, 4096)],
            )
            .unwrap();
        assert_eq!(st, 0, "write to chunk {chunk}");
    };
    let commits = Arc::new(Mutex::new(Vec::new()));
    let k2 = commits.clone();
    let mut replica = LocalReplica::create(&s.dir.path().join("replica.img"), SIZE, CHUNK)
        .unwrap()
        .on_commit(move |cg, _| k2.lock().unwrap().push(cg));
    let stats = CycleStats::default();

    // The first CG ships the whole initial image, as an initial sync does.
    engine.mark_all();
    let first = engine.form_cg().unwrap().cg;
    drain_and_commit(&group, &mut replica, first, SystemTime::now(), &stats).unwrap();
    assert_eq!(*commits.lock().unwrap(), vec![first]);

    for (q, chunk) in [(0, 1), (1, 2), (0, 3)] {
        write(q, chunk, 0xa1);
    }
    let cg = engine.form_cg().unwrap().cg;
    assert_eq!(engine.phase(), CgPhase::Strict { cg });
    write(1, 1, 0xb2); // preserves 4 KiB of chunk 1: the cache is now full
    assert_eq!(engine.stats().chunks_preserved, 1);
    assert_eq!(engine.phase(), CgPhase::Strict { cg });
    write(0, 2, 0xb2); // chunk 2 would not fit: CG abandoned, the write is not held up
    let st = engine.stats();
    assert_eq!(st.abandoned_cache_full, 1, "{st:?}");
    assert_eq!(engine.phase(), CgPhase::Abandoned { cg });
    assert_eq!(
        st.cow_bytes, 0,
        "preserved images are dropped on abandonment"
    );

    // Draining the abandoned CG ships what is dirty but commits nothing.
    drain_and_commit(&group, &mut replica, cg, SystemTime::now(), &stats).unwrap();
    assert_eq!(engine.try_commit(cg), CommitOutcome::Abandoned);
    assert_eq!(*commits.lock().unwrap(), vec![first]);

    // A later CG commits and holds every write, the abandoned CG's included.
    let next = engine.form_cg().unwrap().cg;
    assert!(next > cg);
    drain_and_commit(&group, &mut replica, next, SystemTime::now(), &stats).unwrap();
    assert_eq!(*commits.lock().unwrap(), vec![first, next]);
    drop(f);
    let primary = std::fs::read(&s.disk).unwrap();
    let copy = std::fs::read(s.dir.path().join("replica.img")).unwrap();
    let differ: Vec<u64> = (0..SIZE / CHUNK)
        .filter(|&c| {
            let r = (c * CHUNK) as usize..((c + 1) * CHUNK) as usize;
            primary[r.clone()] != copy[r]
        })
        .collect();
    assert!(
        differ.is_empty(),
        "chunks {differ:?} of the replica differ from the primary"
    );
    assert_eq!(primary[(CHUNK + 100) as usize], 0xb2);
    assert_eq!(primary[(3 * CHUNK) as usize], 0xa1);
}

/// CG counts to reach; the coverage run (instrumented, much slower) sets DRBLK_QUICK=1.
/// Whether the run is instrumented for coverage: too slow for the workload to reliably
/// exercise copy-on-write and abandonment, so only consistency is asserted then.
fn quick() -> bool {
    std::env::var_os("DRBLK_QUICK").is_some()
}

fn min_cgs(full: u64) -> u64 {
    if quick() {
        full / 10
    } else {
        full
    }
}
