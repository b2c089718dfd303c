//! Loom model checks of the interleavings that matter. Run with
//! `cargo test --release -p drblk --lib --features loom cg::loom_tests`
//! (add `LOOM_MAX_PREEMPTIONS=2` or `3` to bound the search).

use std::sync::Arc;
use std::time::Duration;

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::Mutex;
use loom::thread;

use super::*;

struct Disk(Mutex<Vec<u8>>);

impl Disk {
    fn write(&self, off: usize, data: &[u8]) {
        self.0.lock().expect("disk")[off..off + data.len()].copy_from_slice(data);
    }
    fn snapshot(&self) -> Vec<u8> {
        self.0.lock().expect("disk").clone()
    }
}

impl ChunkSource for Disk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let d = self.0.lock().expect("disk");
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

const CHUNK: usize = 4;

fn setup(queues: usize) -> (Arc<Engine>, Arc<Disk>) {
    let disk = Arc::new(Disk(Mutex::new(vec![0; 2 * CHUNK])));
    let cfg = CgConfig {
        disk_size: 2 * CHUNK as u64,
        chunk_size: CHUNK as u64,
        max_coordination_time: Duration::from_secs(3600),
        max_drain_time: Duration::from_secs(3600),
        cow_cache_limit: 1 << 20,
    };
    (
        Engine::new(cfg, queues, disk.clone()).expect("engine"),
        disk,
    )
}

fn write(e: &Engine, d: &Disk, q: usize, chunk: usize, v: u8) {
    write_at(e, d, q, chunk * CHUNK, CHUNK, v);
}

/// Records, writes `len` bytes of `v` at `off`, finishes.
fn write_at(e: &Engine, d: &Disk, q: usize, off: usize, len: usize, v: u8) {
    let t = e
        .begin_write(q, off as u64, len as u64)
        .expect("begin_write");
    d.write(off, &vec![v; len]);
    drop(t);
}

/// Drains and commits the strict CG `cg` into `img`.
fn drain_commit(e: &Engine, cg: u64, img: &mut [u8]) {
    while let Some(c) = e.next_chunk().expect("read") {
        assert_eq!(c.cg, cg);
        let off = c.index as usize * CHUNK;
        img[off..off + c.data.len()].copy_from_slice(&c.data);
        e.confirm(c.cg, c.index, c.count);
    }
    assert_eq!(e.try_commit(cg), CommitOutcome::Committed);
}

/// A write racing the swap, and its completion racing the freeze; a second write on another
/// queue depends on the first. CG 1 never holds W2 without W1, and nothing is lost.
#[test]
fn write_and_completion_race_formation() {
    loom::model(|| {
        let (e, d) = setup(2);
        let published = Arc::new(AtomicBool::new(false));
        let p = published.clone();
        e.set_publisher(
            0,
            Some(Arc::new(move |_: &[Completion]| {
                p.store(true, Ordering::SeqCst)
            })),
        );
        let (e2, d2, p2) = (e.clone(), d.clone(), published.clone());
        let t = thread::spawn(move || {
            write(&e2, &d2, 0, 0, 1);
            let p3 = p2.clone();
            e2.complete(0, &mut vec![Completion { head: 1, len: 0 }], &move |_| {
                p3.store(true, Ordering::SeqCst)
            });
            while !p2.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            // Issued only once W1's completion is visible: a dependent write.
            write(&e2, &d2, 1, 1, 2);
        });
        let f = e.form_cg().expect("form");
        let mut img = vec![0u8; 2 * CHUNK];
        drain_commit(&e, f.cg, &mut img);
        if img[CHUNK] == 2 {
            assert_eq!(img[0], 1, "CG holds W2 without W1");
        }
        t.join().expect("join");
        let f = e.form_cg().expect("form");
        drain_commit(&e, f.cg, &mut img);
        assert_eq!(img, d.snapshot(), "a write was lost");
    });
}

/// The drain's read of a chunk racing a copy-on-write of the same chunk: the CG ships the
/// pre-swap content either way.
#[test]
fn drain_read_races_copy_on_write() {
    loom::model(|| {
        let (e, d) = setup(1);
        write(&e, &d, 0, 0, 1);
        let f = e.form_cg().expect("form");
        let (e2, d2) = (e.clone(), d.clone());
        let t = thread::spawn(move || write(&e2, &d2, 0, 0, 2));
        let c = e.next_chunk().expect("read").expect("chunk 0");
        assert_eq!(c.data, vec![1; CHUNK]);
        e.confirm(c.cg, c.index, c.count);
        t.join().expect("join");
        assert_eq!(e.try_commit(f.cg), CommitOutcome::Committed);
        assert_eq!(e.stats().cow_bytes, 0);
    });
}

/// Two writers preserving overlapping granules of one chunk (bytes 0..2 and 1..4) race each
/// other and the drain's read: the CG ships every byte as it was at the freeze, whichever
/// writer reads byte 1 and whenever the drain reads.
#[test]
fn granule_copy_on_write_overlapping_writers_race_drain() {
    loom::model(|| {
        let (e, d) = setup(2);
        write(&e, &d, 0, 0, 1);
        let f = e.form_cg().expect("form");
        let (e2, d2) = (e.clone(), d.clone());
        let t = thread::spawn(move || write_at(&e2, &d2, 1, 0, 2, 2));
        write_at(&e, &d, 0, 1, 3, 3);
        let c = e.next_chunk().expect("read").expect("chunk 0");
        assert_eq!(c.data, vec![1; CHUNK]);
        e.confirm(c.cg, c.index, c.count);
        t.join().expect("join");
        assert_eq!(e.try_commit(f.cg), CommitOutcome::Committed);
        assert_eq!(e.stats().cow_bytes, 0);
    });
}

/// Block-granular tracking, extent drain: two writers on neighbouring blocks (chunks 0 and
/// 1, both still to ship) race the drain, which hands both out as ONE extent. The extent
/// holds both blocks as they were at the freeze, whoever preserves first and whenever the
/// drain reads; the next group ships both new values.
#[test]
fn extent_drain_races_writers_on_neighbouring_blocks() {
    loom::model(|| {
        let (e, d) = setup(2);
        write_at(&e, &d, 0, 0, 2 * CHUNK, 1);
        let f = e.form_cg().expect("form");
        let (e2, d2) = (e.clone(), d.clone());
        let t = thread::spawn(move || write(&e2, &d2, 1, 1, 3));
        write(&e, &d, 0, 0, 2);
        let c = e.next_chunk().expect("read").expect("extent");
        assert_eq!((c.index, c.count), (0, 2), "one extent of both blocks");
        assert_eq!(c.data, vec![1; 2 * CHUNK]);
        e.confirm(c.cg, c.index, c.count);
        t.join().expect("join");
        assert_eq!(e.try_commit(f.cg), CommitOutcome::Committed);
        assert_eq!(e.stats().cow_bytes, 0);
        let mut img = vec![1u8; 2 * CHUNK];
        let f = e.form_cg().expect("form");
        drain_commit(&e, f.cg, &mut img);
        assert_eq!(img, d.snapshot(), "a write was lost");
    });
}

/// Completions racing a formation: each is published exactly once, in order, never lost.
#[test]
fn completions_race_freeze_in_order() {
    loom::model(|| {
        let (e, _) = setup(1);
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        e.set_publisher(
            0,
            Some(Arc::new(move |c: &[Completion]| {
                l.lock().expect("log").extend(c.iter().map(|c| c.head))
            })),
        );
        let (e2, l2) = (e.clone(), log.clone());
        let t = thread::spawn(move || {
            for head in 1..=2 {
                let l3 = l2.clone();
                e2.complete(0, &mut vec![Completion { head, len: 0 }], &move |c| {
                    l3.lock().expect("log").extend(c.iter().map(|c| c.head))
                });
            }
        });
        e.form_cg().expect("form");
        t.join().expect("join");
        assert_eq!(*log.lock().expect("log"), vec![1, 2]);
    });
}

/// A write recorded in CR still in flight when the CG is lost: CR is forwarded into OOS and
/// the next CG waits for the write and ships its data.
#[test]
fn in_flight_cr_write_survives_link_loss() {
    loom::model(|| {
        let (e, d) = setup(1);
        e.form_cg().expect("form");
        // Recorded in CG 1's CR; the disk write and the ticket drop race the link loss.
        let ticket = e
            .begin_write(0, CHUNK as u64, CHUNK as u64)
            .expect("begin_write");
        let d2 = d.clone();
        let t = thread::spawn(move || {
            d2.write(CHUNK, &[7; CHUNK]);
            drop(ticket);
        });
        e.link_lost();
        let f = e.form_cg().expect("form");
        let mut img = vec![0u8; 2 * CHUNK];
        // Recorded before CG 2's swap: CG 2 waits for it and carries it.
        drain_commit(&e, f.cg, &mut img);
        assert_eq!(img[CHUNK], 7);
        t.join().expect("join");
    });
}

/// A CR write in flight while the strict CG is abandoned (cache full) and its chunk is handed
/// out: the write's re-mark reaches OOS through the forwarding, so the final data is shipped.
#[test]
fn in_flight_cr_write_remarks_through_forwarding() {
    loom::model(|| {
        let disk = Arc::new(Disk(Mutex::new(vec![0; 2 * CHUNK])));
        let cfg = CgConfig {
            disk_size: 2 * CHUNK as u64,
            chunk_size: CHUNK as u64,
            max_coordination_time: Duration::from_secs(3600),
            max_drain_time: Duration::from_secs(3600),
            cow_cache_limit: CHUNK, // one image
        };
        let e = Engine::new(cfg, 1, disk.clone()).expect("engine");
        write(&e, &disk, 0, 0, 1);
        write(&e, &disk, 0, 1, 1);
        e.form_cg().expect("form");
        let ticket = e.begin_write(0, 0, CHUNK as u64).expect("begin_write"); // preserves chunk 0
        let d2 = disk.clone();
        let t = thread::spawn(move || {
            d2.write(0, &[7; CHUNK]);
            drop(ticket);
        });
        write(&e, &disk, 0, 1, 2); // cache full: abandon, CR forwarded into OOS
        assert!(matches!(e.phase(), CgPhase::Abandoned { .. }));
        let mut img = vec![0u8; 2 * CHUNK];
        let drain = |img: &mut Vec<u8>| {
            while let Some(c) = e.next_chunk().expect("read") {
                let off = c.index as usize * CHUNK;
                img[off..off + c.data.len()].copy_from_slice(&c.data);
                e.confirm(c.cg, c.index, c.count);
            }
        };
        drain(&mut img);
        t.join().expect("join");
        drain(&mut img);
        assert_eq!(img, disk.snapshot(), "a write was lost");
    });
}

/// Drains and commits the group's strict CG `cg` into one image per disk.
fn drain_commit_group(g: &Group, cg: u64, imgs: &mut [Vec<u8>]) {
    let mut buf = Vec::new();
    while let Some(ext) = g.next_extent(&mut buf).expect("read") {
        let d = usize::from(ext.disk);
        assert_eq!(ext.cg, cg);
        let off = ext.first as usize * CHUNK;
        imgs[d][off..off + ext.len].copy_from_slice(&buf[..ext.len]);
        g.confirm(&ext);
    }
    assert!(g.is_ready(cg));
    assert_eq!(g.try_commit(cg), CommitOutcome::Committed);
}

/// The cross-disk form of `write_and_completion_race_formation`: W1 on disk A, its
/// completion racing the group's freeze, then W2 on disk B, issued once W1's completion is
/// visible. The group's CG never holds W2 without W1, and nothing is lost.
#[test]
fn dependent_write_across_two_disks_races_group_formation() {
    loom::model(|| {
        let (a, da) = setup(1);
        let (b, db) = setup(1);
        let g = Arc::new(Group::new(vec![a.clone(), b.clone()]).expect("group"));
        let published = Arc::new(AtomicBool::new(false));
        let p = published.clone();
        a.set_publisher(
            0,
            Some(Arc::new(move |_: &[Completion]| {
                p.store(true, Ordering::SeqCst)
            })),
        );
        let (a2, b2, da2, db2, p2) = (a.clone(), b.clone(), da.clone(), db.clone(), published);
        let t = thread::spawn(move || {
            write(&a2, &da2, 0, 0, 1);
            let p3 = p2.clone();
            a2.complete(0, &mut vec![Completion { head: 1, len: 0 }], &move |_| {
                p3.store(true, Ordering::SeqCst)
            });
            while !p2.load(Ordering::SeqCst) {
                thread::yield_now();
            }
            write(&b2, &db2, 0, 0, 2);
        });
        let f = g.form_cg().expect("form");
        let mut imgs = vec![vec![0u8; 2 * CHUNK], vec![0u8; 2 * CHUNK]];
        drain_commit_group(&g, f.cg, &mut imgs);
        if imgs[1][0] == 2 {
            assert_eq!(imgs[0][0], 1, "the group holds W2 on B without W1 on A");
        }
        t.join().expect("join");
        let f = g.form_cg().expect("form");
        drain_commit_group(&g, f.cg, &mut imgs);
        assert_eq!(imgs[0], da.snapshot(), "a write on A was lost");
        assert_eq!(imgs[1], db.snapshot(), "a write on B was lost");
    });
}
