//! Unit tests of the engine's behaviours (single-threaded unless stated).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

/// An in-memory disk.
pub(crate) struct MemDisk(pub(crate) Mutex<Vec<u8>>);

impl MemDisk {
    pub(crate) fn new(size: usize) -> Arc<Self> {
        Arc::new(MemDisk(Mutex::new(vec![0; size])))
    }
    pub(crate) fn write(&self, offset: u64, data: &[u8]) {
        let mut d = self.0.lock().expect("disk");
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
    pub(crate) fn snapshot(&self) -> Vec<u8> {
        self.0.lock().expect("disk").clone()
    }
}

impl ChunkSource for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().expect("disk");
        let end = offset as usize + buf.len();
        if end > d.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "beyond disk"));
        }
        buf.copy_from_slice(&d[offset as usize..end]);
        Ok(())
    }
}

/// A source that always fails.
struct BadDisk;
impl ChunkSource for BadDisk {
    fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
        Err(io::Error::other("media error"))
    }
}

fn cfg(disk_size: u64, chunk: u64) -> CgConfig {
    CgConfig {
        disk_size,
        chunk_size: chunk,
        max_coordination_time: Duration::from_secs(10),
        max_drain_time: Duration::from_secs(600),
        cow_cache_limit: 1 << 20,
    }
}

fn engine(c: CgConfig, queues: usize) -> (Arc<Engine>, Arc<MemDisk>) {
    let disk = MemDisk::new(c.disk_size as usize);
    let e = Engine::new(c, queues, disk.clone()).expect("engine");
    (e, disk)
}

/// A full write: record, write the disk, finish.
fn write(e: &Engine, d: &MemDisk, q: usize, off: u64, data: &[u8]) {
    let t = e
        .begin_write(q, off, data.len() as u64)
        .expect("begin_write");
    d.write(off, data);
    drop(t);
}

/// Ships everything handed out now: returns the images, one per chunk (the extents they
/// were handed out in are cut up; each piece can be confirmed on its own).
fn ship_all(e: &Engine) -> Vec<ChunkImage> {
    let mut v = Vec::new();
    while let Some(c) = e.next_chunk().expect("next_chunk") {
        v.extend(c.split(e.config().chunk_size));
    }
    v
}

#[test]
fn config_is_validated() {
    let d = MemDisk::new(16);
    assert!(Engine::new(cfg(16, 3), 1, d.clone()).is_err());
    assert!(Engine::new(cfg(0, 8), 1, d.clone()).is_err());
    assert!(Engine::new(cfg(16, 8), 0, d.clone()).is_err());
    assert_eq!(Engine::new(cfg(16, 8), 1, d).expect("ok").num_chunks(), 2);
}

#[test]
fn begin_write_rejects_bad_ranges_and_queues() {
    let (e, _) = engine(cfg(100, 64), 2);
    assert!(e.begin_write(2, 0, 1).is_err());
    assert!(e.begin_write(0, 90, 11).is_err());
    assert!(e.begin_write(0, u64::MAX, 2).is_err());
    let t = e.begin_write(0, 100, 0).expect("empty write");
    drop(t);
    assert_eq!(e.stats().oos_dirty, 0);
}

#[test]
fn full_cycle_with_short_last_chunk() {
    let (e, d) = engine(cfg(100, 64), 1);
    write(&e, &d, 0, 70, &[7; 20]);
    assert_eq!(e.stats().oos_dirty, 1);
    let f = e.form_cg().expect("form");
    assert_eq!(f.cg, 1);
    let imgs = ship_all(&e);
    assert_eq!(imgs.len(), 1);
    assert_eq!((imgs[0].cg, imgs[0].index, imgs[0].data.len()), (1, 1, 36));
    assert_eq!(&imgs[0].data[6..26], &[7; 20]);
    assert!(!e.is_ready(1));
    assert_eq!(
        e.try_commit(1),
        CommitOutcome::Pending {
            to_ship: 0,
            unconfirmed: 1
        }
    );
    e.confirm(1, 1, 1);
    assert!(e.is_ready(1));
    assert_eq!(e.try_commit(1), CommitOutcome::Committed);
    assert_eq!(e.try_commit(1), CommitOutcome::Unknown);
    let s = e.stats();
    assert_eq!(
        (s.formed, s.committed, s.last_committed, s.phase),
        (1, 1, 1, CgPhase::Idle)
    );
    assert_eq!(s.coordination_ns.len(), 1);
}

#[test]
fn range_write_marks_every_chunk_it_touches() {
    let (e, d) = engine(cfg(1000, 64), 1);
    write(&e, &d, 0, 63, &[1; 66]); // chunks 0, 1, 2
    assert_eq!(e.stats().oos_dirty, 3);
    e.form_cg().expect("form");
    let idx: Vec<u64> = ship_all(&e).iter().map(|c| c.index).collect();
    assert_eq!(idx, vec![0, 1, 2]);
}

#[test]
fn writes_after_swap_go_to_cr_and_become_oos_at_commit() {
    let (e, d) = engine(cfg(256, 64), 2);
    write(&e, &d, 0, 0, &[1; 4]);
    e.form_cg().expect("form");
    write(&e, &d, 1, 128, &[2; 4]);
    let s = e.stats();
    assert_eq!((s.oos_dirty, s.cr_dirty), (1, 1));
    assert_eq!(e.form_cg(), Err(FormError::Busy { cg: 1 }));
    for c in ship_all(&e) {
        e.confirm(c.cg, c.index, c.count);
    }
    assert_eq!(e.try_commit(1), CommitOutcome::Committed);
    assert_eq!(e.stats().oos_dirty, 1);
    assert_eq!(e.form_cg().expect("form").cg, 2);
    let imgs = ship_all(&e);
    assert_eq!((imgs.len(), imgs[0].index), (1, 2));
}

#[test]
fn copy_on_write_ships_preserved_image() {
    let (e, d) = engine(cfg(256, 64), 1);
    write(&e, &d, 0, 0, &[1; 64]);
    e.form_cg().expect("form");
    // Chunk 0 is still to ship: this write preserves the old content first.
    write(&e, &d, 0, 0, &[2; 64]);
    let s = e.stats();
    assert_eq!((s.chunks_preserved, s.cow_bytes), (1, 64));
    let imgs = ship_all(&e);
    assert_eq!(imgs[0].data, vec![1; 64]);
    assert_eq!(e.stats().cow_bytes, 0, "released when handed out");
    e.confirm(1, 0, 1);
    assert_eq!(e.stats().cow_peak_bytes, 64);
    // A second write to the shipped chunk does not preserve again.
    write(&e, &d, 0, 0, &[3; 64]);
    assert_eq!(e.stats().chunks_preserved, 1);
    assert_eq!(e.try_commit(1), CommitOutcome::Committed);
}

#[test]
fn copy_on_write_preserves_only_the_granules_written() {
    // 64-byte chunks: 1-byte granules. Three writes into chunk 0 after the freeze: the first
    // preserves bytes 8..16, the second 4..8 and 16..20 (8..16 are preserved already: its read
    // spans them but keeps only the new granules), the third nothing new.
    let (e, d) = engine(cfg(256, 64), 1);
    let before: Vec<u8> = (0..64).collect();
    write(&e, &d, 0, 0, &before);
    e.form_cg().expect("form");
    write(&e, &d, 0, 8, &[0xa0; 8]);
    assert_eq!(e.stats().cow_bytes, 8);
    write(&e, &d, 0, 4, &[0xb0; 16]);
    assert_eq!(e.stats().cow_bytes, 8 + 16);
    write(&e, &d, 0, 10, &[0xc0; 4]);
    assert_eq!(e.stats().cow_bytes, 24);
    assert_eq!(e.stats().chunks_preserved, 1);
    let imgs = ship_all(&e);
    assert_eq!(imgs[0].data, before, "the chunk as it was at the freeze");
    assert_eq!(e.stats().cow_bytes, 0);
}

#[test]
fn write_to_captured_chunk_is_not_preserved() {
    let (e, d) = engine(cfg(256, 64), 1);
    write(&e, &d, 0, 0, &[1; 64]);
    e.form_cg().expect("form");
    let img = e.next_chunk().expect("read").expect("chunk");
    write(&e, &d, 0, 0, &[2; 64]);
    assert_eq!(e.stats().chunks_preserved, 0);
    assert_eq!(img.data, vec![1; 64]);
}

#[test]
fn freeze_holds_completions_in_order_and_run_publishes_them() {
    let (e, _) = engine(cfg(256, 64), 2);
    let log: Arc<Mutex<Vec<(usize, u16)>>> = Arc::default();
    for q in 0..2 {
        let l = log.clone();
        e.set_publisher(
            q,
            Some(Arc::new(move |c: &[Completion]| {
                l.lock().expect("log").extend(c.iter().map(|c| (q, c.head)));
            })),
        );
    }
    // Freeze by hand through the queue state: hold two completions on queue 0.
    {
        let mut g = e.queues_for_test()[0].lock().expect("q");
        g.frozen = true;
    }
    let direct = |c: &[Completion]| panic!("published while frozen: {c:?}");
    e.complete(0, &mut vec![Completion { head: 1, len: 0 }], &direct);
    e.complete(
        0,
        &mut vec![
            Completion { head: 2, len: 0 },
            Completion { head: 3, len: 1 },
        ],
        &direct,
    );
    // form_cg freezes again, swaps, and runs: the held items are published, in order.
    e.form_cg().expect("form");
    assert_eq!(*log.lock().expect("log"), vec![(0, 1), (0, 2), (0, 3)]);
    // Not frozen: published at once through the caller's publish.
    let seen: Mutex<Vec<u16>> = Mutex::default();
    e.complete(1, &mut vec![Completion { head: 9, len: 0 }], &|c| {
        seen.lock().expect("seen").extend(c.iter().map(|c| c.head))
    });
    assert_eq!(*seen.lock().expect("seen"), vec![9]);
}

#[test]
fn held_items_survive_a_cleared_publisher() {
    let (e, _) = engine(cfg(256, 64), 1);
    e.queues_for_test()[0].lock().expect("q").frozen = true;
    e.complete(0, &mut vec![Completion { head: 1, len: 0 }], &|_| {
        panic!("frozen")
    });
    e.set_publisher(0, None);
    e.form_cg().expect("form");
    // Run had no publisher: still held; the next completion publishes them first, in order.
    let seen: Mutex<Vec<u16>> = Mutex::default();
    e.complete(0, &mut vec![Completion { head: 2, len: 0 }], &|c| {
        seen.lock().expect("seen").extend(c.iter().map(|c| c.head))
    });
    assert_eq!(*seen.lock().expect("seen"), vec![1, 2]);
    // discard_held drops them on disconnect.
    e.queues_for_test()[0].lock().expect("q").frozen = true;
    e.complete(0, &mut vec![Completion { head: 3, len: 0 }], &|_| {
        panic!("frozen")
    });
    assert_eq!(e.discard_held(0), 1);
}

#[test]
fn cache_limit_abandons_without_losing_chunks() {
    let mut c = cfg(256, 64);
    c.cow_cache_limit = 64; // room for one image
    let (e, d) = engine(c, 1);
    write(&e, &d, 0, 0, &[1; 256]); // all 4 chunks in OOS
    e.form_cg().expect("form");
    write(&e, &d, 0, 0, &[2; 64]); // preserved (fits)
    write(&e, &d, 0, 64, &[3; 64]); // cache full: abandon
    let s = e.stats();
    assert_eq!(
        (s.abandoned_cache_full, s.phase, s.cow_bytes),
        (1, CgPhase::Abandoned { cg: 1 }, 0)
    );
    // Chunks keep flowing from OOS (CR merged in), writes go to OOS.
    write(&e, &d, 0, 192, &[4; 64]);
    let imgs = ship_all(&e);
    assert_eq!(
        imgs.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    assert!(imgs.iter().all(|c| c.cg == 1));
    assert_eq!(imgs[3].data, vec![4; 64]);
    assert_eq!(e.try_commit(1), CommitOutcome::Abandoned);
    for c in &imgs {
        e.confirm(c.cg, c.index, c.count);
    }
    // The next CG forms normally and commits.
    write(&e, &d, 0, 64, &[5; 1]);
    assert_eq!(e.form_cg().expect("form").cg, 2);
    let imgs = ship_all(&e);
    assert_eq!(imgs.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1]);
    e.confirm(2, 1, 1);
    assert_eq!(e.try_commit(2), CommitOutcome::Committed);
}

#[test]
fn drain_timeout_abandons() {
    let mut c = cfg(256, 64);
    c.max_drain_time = Duration::ZERO;
    let (e, d) = engine(c, 1);
    write(&e, &d, 0, 0, &[1; 128]);
    e.form_cg().expect("form");
    std::thread::sleep(Duration::from_millis(2));
    let first = e.next_chunk().expect("read").expect("chunk");
    assert_eq!(e.stats().abandoned_drain_timeout, 1);
    assert_eq!(e.phase(), CgPhase::Abandoned { cg: 1 });
    assert_eq!(first.index, 0);
}

#[test]
fn preserve_failure_abandons_and_write_proceeds() {
    let e = Engine::new(cfg(128, 64), 1, Arc::new(BadDisk)).expect("engine");
    let t = e.begin_write(0, 0, 1).expect("w");
    drop(t);
    e.form_cg().expect("form");
    let t = e.begin_write(0, 0, 1).expect("write proceeds");
    drop(t);
    assert_eq!(e.stats().abandoned_preserve_failed, 1);
    assert!(e.next_chunk().is_err(), "drain read error is reported");
    assert_eq!(e.stats().oos_dirty, 1, "chunk stays to ship");
}

#[test]
fn link_lost_reships_uncommitted_chunks() {
    let (e, d) = engine(cfg(256, 64), 1);
    // Chunks 0 and 2: two extents (contiguous chunks would travel as one).
    write(&e, &d, 0, 0, &[1; 64]);
    write(&e, &d, 0, 128, &[1; 64]);
    e.form_cg().expect("form");
    let a = e.next_chunk().expect("r").expect("c");
    e.confirm(a.cg, a.index, a.count);
    let _b = e.next_chunk().expect("r").expect("c");
    write(&e, &d, 0, 192, &[2; 1]); // in CR
    e.link_lost();
    let s = e.stats();
    assert_eq!(
        (
            s.phase,
            s.abandoned_link_lost,
            s.oos_dirty,
            s.shipped_uncommitted
        ),
        (CgPhase::Idle, 1, 3, 0)
    );
    assert_eq!(e.try_commit(1), CommitOutcome::Unknown);
    e.confirm(1, 2, 1); // stale: ignored
    assert_eq!(e.form_cg().expect("form").cg, 2);
    let imgs = ship_all(&e);
    assert_eq!(
        imgs.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 2, 3]
    );
    for c in &imgs {
        e.confirm(c.cg, c.index, c.count);
    }
    assert_eq!(e.try_commit(2), CommitOutcome::Committed);
}

#[test]
fn link_lost_after_abandon_reships_abandoned_chunks() {
    let mut c = cfg(256, 64);
    c.cow_cache_limit = 0;
    let (e, d) = engine(c, 1);
    write(&e, &d, 0, 0, &[1; 64]);
    e.form_cg().expect("form");
    write(&e, &d, 0, 0, &[2; 64]); // abandons
    assert_eq!(ship_all(&e).len(), 1);
    e.link_lost();
    assert_eq!(e.stats().oos_dirty, 1);
    assert_eq!(e.stats().abandoned_link_lost, 0, "already abandoned");
}

#[test]
fn coordination_timeout_undoes_the_formation() {
    let mut c = cfg(256, 64);
    c.max_coordination_time = Duration::ZERO;
    let (e, d) = engine(c, 2);
    write(&e, &d, 0, 0, &[1; 1]);
    assert!(matches!(
        e.form_cg(),
        Err(FormError::CoordinationTimeout { .. })
    ));
    assert_eq!(e.stats().coordination_aborts, 1);
    assert_eq!(e.phase(), CgPhase::Idle);
    write(&e, &d, 1, 64, &[1; 1]);
    assert_eq!(e.stats().oos_dirty, 2);
    // Queues are not left frozen.
    let seen: Mutex<u32> = Mutex::default();
    e.complete(0, &mut vec![Completion { head: 0, len: 0 }], &|_| {
        *seen.lock().expect("s") += 1
    });
    assert_eq!(*seen.lock().expect("s"), 1);
}

#[test]
fn abort_after_swap_forwards_cr_into_oos() {
    let (e, d) = engine(cfg(256, 64), 2);
    write(&e, &d, 0, 0, &[1; 1]);
    let t = e.begin_write(1, 64, 1).expect("w"); // in flight over the aborted formation
    assert!(e.form_cg_inner(true).is_err());
    d.write(64, &[9]);
    drop(t);
    write(&e, &d, 0, 128, &[1; 1]);
    assert_eq!(e.stats().oos_dirty, 3);
    assert_eq!(
        e.form_cg().expect("form").cg,
        1,
        "numbers are not consumed by aborts"
    );
    assert_eq!(ship_all(&e).len(), 3);
}

#[test]
fn mark_all_marks_oos_or_cr() {
    let (e, _) = engine(cfg(200, 64), 1);
    e.mark_all();
    assert_eq!(e.stats().oos_dirty, 4);
    e.form_cg().expect("form");
    e.mark_all();
    assert_eq!(e.stats().cr_dirty, 4);
    let imgs = ship_all(&e);
    assert_eq!(imgs.last().map(|c| c.data.len()), Some(8));
}

#[test]
fn abandoned_drain_reships_chunk_written_during_read() {
    let mut c = cfg(256, 64);
    c.cow_cache_limit = 0;
    let (e, d) = engine(c, 1);
    write(&e, &d, 0, 0, &[1; 64]);
    e.form_cg().expect("form");
    write(&e, &d, 0, 64, &[1; 1]); // not in OOS: no COW, no abandon
    write(&e, &d, 0, 0, &[2; 1]); // COW needed, limit 0: abandon
    assert_eq!(e.phase(), CgPhase::Abandoned { cg: 1 });
    // A write recorded in OOS is in flight while the drain reads its chunk.
    let t = e.begin_write(0, 128, 64).expect("w");
    d.write(128, &[3; 32]); // half written
    let imgs = ship_all(&e);
    assert_eq!(
        imgs.iter().map(|c| c.index).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    d.write(160, &[3; 32]);
    drop(t); // re-marks chunk 2
    assert!(
        e.next_chunk().expect("r").is_none(),
        "previous hand-out of chunk 2 not confirmed"
    );
    for c in &imgs {
        e.confirm(c.cg, c.index, c.count);
    }
    let again = e.next_chunk().expect("r").expect("chunk 2 again");
    assert_eq!((again.index, again.data.clone()), (2, vec![3; 64]));
}

#[test]
fn next_chunk_waits_for_writes_recorded_before_the_swap() {
    let (e, d) = engine(cfg(256, 64), 2);
    let t = e.begin_write(0, 0, 64).expect("w");
    d.write(0, &[1; 32]);
    e.form_cg().expect("form");
    let e2 = e.clone();
    let h = std::thread::spawn(move || e2.next_chunk().expect("read").expect("chunk"));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!h.is_finished(), "drain must wait for the in-flight write");
    d.write(32, &[1; 32]);
    drop(t);
    let img = h.join().expect("join");
    assert_eq!(img.data, vec![1; 64]);
}

#[test]
fn preservation_waits_for_writes_recorded_before_the_swap() {
    let (e, d) = engine(cfg(256, 64), 2);
    let t = e.begin_write(0, 0, 64).expect("w");
    d.write(0, &[1; 32]);
    e.form_cg().expect("form");
    let (e2, d2) = (e.clone(), d.clone());
    let h = std::thread::spawn(move || write(&e2, &d2, 1, 0, &[2; 64]));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !h.is_finished(),
        "copy-on-write must wait for the in-flight write"
    );
    d.write(32, &[1; 32]);
    drop(t);
    h.join().expect("join");
    assert_eq!(
        ship_all(&e)[0].data,
        vec![1; 64],
        "preserved the complete pre-swap chunk"
    );
    assert_eq!(d.snapshot()[..64], [2; 64]);
}
