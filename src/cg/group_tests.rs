//! The group of several disks' engines: formed, drained and committed as one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cg::tests::MemDisk;
use crate::cg::*;

const CHUNK: u64 = 64;

fn cfg(disk_size: u64) -> CgConfig {
    CgConfig {
        disk_size,
        chunk_size: CHUNK,
        max_coordination_time: Duration::from_secs(10),
        max_drain_time: Duration::from_secs(600),
        cow_cache_limit: 1 << 20,
    }
}

/// `n` disks of `size` bytes, 2 queues each, in one group.
fn group_of(n: usize, c: CgConfig) -> (Group, Vec<Arc<MemDisk>>) {
    let disks: Vec<_> = (0..n).map(|_| MemDisk::new(c.disk_size as usize)).collect();
    let engines = disks
        .iter()
        .map(|d| Engine::new(c.clone(), 2, d.clone()).expect("engine"))
        .collect();
    (Group::new(engines).expect("group"), disks)
}

fn write(g: &Group, disks: &[Arc<MemDisk>], disk: usize, off: u64, data: &[u8]) {
    let t = g
        .engine(disk)
        .begin_write(0, off, data.len() as u64)
        .expect("begin_write");
    disks[disk].write(off, data);
    drop(t);
}

/// Hands out everything the group has now: `(disk, cg, first chunk)` per extent, confirmed.
fn ship_all(g: &Group) -> Vec<(usize, u64, u64)> {
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while let Some(ext) = g.next_extent(&mut buf).expect("read") {
        let d = usize::from(ext.disk);
        g.confirm(&ext);
        out.push((d, ext.cg, ext.first));
    }
    out
}

#[test]
fn a_group_needs_disks_that_agree_on_numbering() {
    assert!(Group::new(Vec::new()).is_err());
    let a = Engine::new(cfg(256), 1, MemDisk::new(256)).expect("a");
    let b = Engine::new(cfg(256), 1, MemDisk::new(256)).expect("b");
    b.resume_numbering(7);
    assert!(Group::new(vec![a.clone(), b.clone()]).is_err());
    a.resume_numbering(7);
    let g = Group::new(vec![a, b]).expect("same numbering");
    assert_eq!((g.disks(), g.next_cg()), (2, 8));
}

#[test]
fn every_queue_of_every_disk_is_frozen_while_the_group_swaps() {
    let (g, _) = group_of(2, cfg(256));
    let seen = Arc::new(Mutex::new(Vec::new()));
    for d in 0..2 {
        let (engines, seen) = ([g.engine(0).clone(), g.engine(1).clone()], seen.clone());
        g.engine(d).set_freeze_observer(Some(Arc::new(move || {
            let frozen = engines.iter().all(|e| {
                e.queues_for_test()
                    .iter()
                    .all(|q| q.lock().expect("q").frozen)
            });
            seen.lock().expect("seen").push((d, frozen));
        })));
    }
    assert_eq!(g.form_cg().expect("form").cg, 1);
    assert_eq!(*seen.lock().expect("seen"), vec![(0, true), (1, true)]);
    // And run again afterwards.
    for d in 0..2 {
        assert!(g
            .engine(d)
            .queues_for_test()
            .iter()
            .all(|q| !q.lock().expect("q").frozen));
    }
}

/// The cross-disk ordering, deterministically: a write on disk B issued after the group's
/// freeze (so after any write on A completed before it) is never in the CG of that freeze.
#[test]
fn a_write_on_one_disk_after_the_freeze_waits_for_the_next_group() {
    let (g, disks) = group_of(2, cfg(256));
    write(&g, &disks, 0, 0, &[1; 8]); // A, completed before the freeze
    assert_eq!(g.form_cg().expect("form").cg, 1);
    write(&g, &disks, 1, 64, &[2; 8]); // B, after: in CR
    assert_eq!(ship_all(&g), vec![(0, 1, 0)]);
    assert!(g.is_ready(1));
    assert_eq!(g.try_commit(1), CommitOutcome::Committed);
    assert_eq!(g.form_cg().expect("form").cg, 2);
    assert_eq!(ship_all(&g), vec![(1, 2, 1)]);
    assert_eq!(g.try_commit(2), CommitOutcome::Committed);
    for d in 0..2 {
        assert_eq!(g.engine(d).stats().last_committed, 2);
    }
}

#[test]
fn no_disk_commits_while_another_still_drains() {
    let (g, disks) = group_of(2, cfg(256));
    write(&g, &disks, 0, 0, &[1; 8]);
    write(&g, &disks, 1, 128, &[1; 8]);
    let cg = g.form_cg().expect("form").cg;
    // Disk A alone is drained: it is ready, the group is not, and nothing commits.
    let mut buf = Vec::new();
    let ext = g.engine(0).next_extent(&mut buf).expect("r").expect("A");
    g.engine(0).confirm(ext.cg, ext.first, ext.count);
    assert!(g.engine(0).is_ready(cg));
    assert!(!g.is_ready(cg));
    assert_eq!(
        g.try_commit(cg),
        CommitOutcome::Pending {
            to_ship: 1,
            unconfirmed: 0
        }
    );
    assert_eq!(g.engine(0).stats().committed, 0, "A waits for B");
    assert_eq!(ship_all(&g), vec![(1, cg, 2)]);
    assert!(g.is_ready(cg));
    assert_eq!(g.try_commit(cg), CommitOutcome::Committed);
    assert_eq!(
        (g.engine(0).stats().committed, g.engine(1).stats().committed),
        (1, 1)
    );
}

#[test]
fn a_busy_group_forms_nothing_and_numbers_stay_aligned() {
    let (g, disks) = group_of(2, cfg(256));
    write(&g, &disks, 1, 0, &[1; 8]);
    assert_eq!(g.form_cg().expect("form").cg, 1);
    assert_eq!(g.form_cg(), Err(FormError::Busy { cg: 1 }));
    assert_eq!((g.engine(0).next_cg(), g.engine(1).next_cg()), (2, 2));
    ship_all(&g);
    assert_eq!(g.try_commit(1), CommitOutcome::Committed);
    assert_eq!(g.form_cg().expect("form").cg, 2);
}

#[test]
fn a_disk_that_abandons_abandons_the_group_and_the_next_group_carries_everything() {
    let mut c = cfg(256);
    c.cow_cache_limit = 0; // any copy-on-write abandons
    let (g, disks) = group_of(2, c);
    write(&g, &disks, 0, 0, &[1; 8]);
    write(&g, &disks, 1, 0, &[1; 8]);
    let cg = g.form_cg().expect("form").cg;
    write(&g, &disks, 0, 0, &[2; 8]); // A must preserve chunk 0: cache full, A abandons
    assert_eq!(g.engine(0).phase(), CgPhase::Abandoned { cg });
    assert_eq!(g.engine(1).phase(), CgPhase::Strict { cg });
    ship_all(&g);
    assert!(!g.is_ready(cg));
    assert_eq!(g.try_commit(cg), CommitOutcome::Abandoned);
    // B was ready, but no commit was sent: it abandons too, and says why.
    assert_eq!(g.engine(1).phase(), CgPhase::Abandoned { cg });
    assert_eq!(g.engine(1).stats().abandoned_other_disk, 1);
    assert_eq!(g.engine(0).stats().abandoned_cache_full, 1);

    write(&g, &disks, 1, 64, &[3; 8]);
    let next = g.form_cg().expect("form").cg;
    assert_eq!(next, cg + 1);
    let shipped = ship_all(&g);
    assert!(shipped.contains(&(1, next, 1)), "{shipped:?}");
    assert_eq!(g.try_commit(next), CommitOutcome::Committed);
    assert_eq!(
        (
            g.engine(0).stats().last_committed,
            g.engine(1).stats().last_committed
        ),
        (next, next)
    );
}

#[test]
fn a_slow_coordination_undoes_the_formation_on_every_disk() {
    let mut c = cfg(256);
    c.max_coordination_time = Duration::ZERO;
    let (g, disks) = group_of(2, c);
    write(&g, &disks, 0, 0, &[1; 8]);
    assert!(matches!(
        g.form_cg(),
        Err(FormError::CoordinationTimeout { .. })
    ));
    for d in 0..2 {
        let s = g.engine(d).stats();
        assert_eq!((s.phase, s.coordination_aborts), (CgPhase::Idle, 1));
        assert!(g
            .engine(d)
            .queues_for_test()
            .iter()
            .all(|q| !q.lock().expect("q").frozen));
    }
    assert_eq!(g.next_cg(), 1, "numbers are not consumed by aborts");
}

#[test]
fn link_lost_reships_every_disks_uncommitted_chunks() {
    let (g, disks) = group_of(2, cfg(256));
    write(&g, &disks, 0, 0, &[1; 8]);
    write(&g, &disks, 1, 192, &[1; 8]);
    let cg = g.form_cg().expect("form").cg;
    assert_eq!(ship_all(&g).len(), 2);
    g.link_lost();
    assert_eq!(g.try_commit(cg), CommitOutcome::Unknown);
    let next = g.form_cg().expect("form").cg;
    let mut shipped = ship_all(&g);
    shipped.sort();
    assert_eq!(shipped, vec![(0, next, 0), (1, next, 3)]);
    assert_eq!(g.try_commit(next), CommitOutcome::Committed);
}

/// Dependent writes alternating between two disks (write `i` is issued only once write
/// `i - 1`, on the other disk, was published as complete) while a drain thread forms, ships
/// and commits groups into two replica images: at every commit, the replicas hold every
/// write up to the newest one they hold. Writes alternate between the queues too.
fn dependent_writes_across_two_disks() {
    const BLOCKS: u64 = 32; // per disk, 8 bytes at the start of each 64-byte chunk
    let (g, disks) = group_of(2, cfg(BLOCKS * CHUNK));
    let g = Arc::new(g);
    // Completions published so far (directly, or by a run after a freeze).
    let published = Arc::new((Mutex::new(0u64), Condvar::new()));
    for d in 0..2 {
        for q in 0..2 {
            let p = published.clone();
            g.engine(d).set_publisher(
                q,
                Some(Arc::new(move |items: &[Completion]| {
                    *p.0.lock().expect("p") += items.len() as u64;
                    p.1.notify_all();
                })),
            );
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (g, disks, published, stop, written) = (
            g.clone(),
            disks.clone(),
            published.clone(),
            stop.clone(),
            written.clone(),
        );
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let (d, block) = ((i % 2) as usize, (i / 2) % BLOCKS);
                let e = g.engine(d);
                let q = ((i / 2) % 2) as usize;
                let t = e.begin_write(q, block * CHUNK, 8).expect("begin");
                disks[d].write(block * CHUNK, &i.to_le_bytes());
                drop(t);
                let p = published.clone();
                e.complete(
                    q,
                    &mut vec![Completion { head: 0, len: 0 }],
                    &move |items| {
                        *p.0.lock().expect("p") += items.len() as u64;
                        p.1.notify_all();
                    },
                );
                // Issue the next write only once this one was published.
                let mut n = published.0.lock().expect("p");
                while *n < i {
                    n = published.1.wait(n).expect("p");
                }
                written.store(i, Ordering::SeqCst);
            }
        })
    };

    let replicas = [
        vec![0u8; (BLOCKS * CHUNK) as usize],
        vec![0u8; (BLOCKS * CHUNK) as usize],
    ];
    let mut replicas = replicas;
    let value = |r: &[u8], block: u64| {
        let at = (block * CHUNK) as usize;
        u64::from_le_bytes(r[at..at + 8].try_into().expect("8 bytes"))
    };
    let hang_guard = Instant::now() + Duration::from_secs(300);
    let (mut commits, mut abandoned) = (0u64, 0u64);
    let mut buf = Vec::new();
    // Enough groups and enough writes, whichever comes last.
    while commits < 200 || written.load(Ordering::SeqCst) < 5000 {
        assert!(Instant::now() < hang_guard, "no progress");
        let Ok(formed) = g.form_cg() else { continue };
        let cg = formed.cg;
        loop {
            while let Some(ext) = g.next_extent(&mut buf).expect("read") {
                let d = usize::from(ext.disk);
                let at = (ext.first * CHUNK) as usize;
                replicas[d][at..at + ext.len].copy_from_slice(&buf[..ext.len]);
                g.confirm(&ext);
            }
            match g.try_commit(cg) {
                CommitOutcome::Committed => {
                    commits += 1;
                    // Every write up to the newest one present is present (or overwritten
                    // by a later one: a block's values only grow).
                    let newest = (0..2)
                        .flat_map(|d| (0..BLOCKS).map(move |b| (d, b)))
                        .map(|(d, b)| value(&replicas[d], b))
                        .max()
                        .unwrap_or(0);
                    for j in 1..=newest {
                        let (d, block) = ((j % 2) as usize, (j / 2) % BLOCKS);
                        assert!(
                            value(&replicas[d], block) >= j,
                            "CG {cg}: write {j} (disk {d}, block {block}) missing, write {newest} present"
                        );
                    }
                    break;
                }
                CommitOutcome::Abandoned | CommitOutcome::Unknown => {
                    abandoned += 1;
                    break;
                }
                CommitOutcome::Pending { .. } => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    assert!(written.load(Ordering::SeqCst) > 0);
    eprintln!(
        "{commits} groups committed and checked, {abandoned} abandoned, {} writes",
        written.load(Ordering::SeqCst)
    );
}

#[test]
fn dependent_writes_across_two_disks_are_consistent_at_every_commit() {
    dependent_writes_across_two_disks();
}
