//! The record's invariant, checked against its file as a restart would read it.

use std::collections::BTreeSet;
use std::sync::Arc;

use proptest::prelude::*;

use super::file::RecordFile;
use super::*;
use crate::cg::{CgConfig, ChunkSource};

struct Zeros;
impl ChunkSource for Zeros {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> std::io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

const CHUNK: u64 = 4096;
/// 64 extents of 64 KiB (16 chunks each); a 2-slot log evicts all the time.
const DISK: u64 = 4 << 20;
const EXTENT: u64 = 64 << 10;

fn setup(
    dir: &std::path::Path,
    slots: u64,
) -> (Arc<ChangeRecord>, Arc<Engine>, TrackConfig, Seeded) {
    let mut c = CgConfig::new(DISK);
    c.chunk_size = CHUNK;
    let engine = Engine::new(c, 1, Arc::new(Zeros)).unwrap();
    let cfg = TrackConfig {
        path: dir.join("disk.drblk-track"),
        extent_size: EXTENT,
        slots,
    };
    let (rec, seeded) = ChangeRecord::open(&cfg, engine.clone(), [9; 16]).unwrap();
    (rec, engine, cfg, seeded)
}

/// What a restart would mark dirty: the bitmap plus every chunk of the logged extents.
fn covered(cfg: &TrackConfig) -> (BTreeSet<u64>, bool) {
    let l = RecordFile::load(&cfg.path).unwrap().unwrap();
    let mut s = BTreeSet::new();
    for i in 0..DISK / CHUNK {
        if l.words[(i / 64) as usize] >> (i % 64) & 1 == 1 {
            s.insert(i);
        }
    }
    for e in &l.al {
        s.extend(e * (EXTENT / CHUNK)..(e + 1) * (EXTENT / CHUNK));
    }
    (s, l.sb.flags & file::FLAG_CLEAN != 0)
}

/// Whether the bits the record keeps in memory are those of its file.
fn bits_kept_match_the_file(rec: &ChangeRecord, cfg: &TrackConfig) -> bool {
    let l = RecordFile::load(&cfg.path).unwrap().unwrap();
    let d = rec.disk.lock().unwrap();
    let mut w = vec![0u64; PAGE_WORDS];
    l.words.chunks_exact(PAGE_WORDS).enumerate().all(|(p, f)| {
        d.page(p as u64, &mut w);
        w == f
    })
}

proptest! {
    /// The runs of set bits cover exactly the set bits below `n`, in order, and are maximal.
    #[test]
    fn runs_are_the_set_bits(
        words in proptest::collection::vec(
            prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()], 0..6),
        n in 0u64..400,
    ) {
        let bit = |i: u64| words.get((i / 64) as usize).is_some_and(|w| w >> (i % 64) & 1 == 1);
        let want: Vec<u64> = (0..n).filter(|&i| bit(i)).collect();
        let mut runs = Vec::new();
        for_each_run(&words, n, |a, b| runs.push((a, b)));
        let got: Vec<u64> = runs.iter().flat_map(|&(a, b)| a..=b).collect();
        prop_assert_eq!(got, want);
        for w in runs.windows(2) {
            prop_assert!(w[0].1 + 1 < w[1].0, "not maximal or not in order: {:?}", runs);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// However writes and refreshes interleave, a crash at any point finds every written
    /// (never shipped) chunk in the bitmap or in a logged extent; a clean close leaves
    /// exactly the written chunks.
    #[test]
    fn a_crash_anywhere_finds_every_written_chunk(
        slots in 1u64..4,
        ops in proptest::collection::vec((0u64..DISK / CHUNK, 1u64..40, proptest::bool::weighted(0.1)), 1..60),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (rec, _engine, cfg, _) = setup(dir.path(), slots);
        let t = rec.tracking();
        let mut written = BTreeSet::new();
        for (first, n, refresh) in ops {
            let n = n.min(DISK / CHUNK - first);
            let g = t.begin_write(0, first * CHUNK, n * CHUNK).unwrap();
            written.extend(first..first + n);
            drop(g);
            if refresh {
                rec.refresh(false).unwrap();
            }
            let (cov, _) = covered(&cfg);
            let missing: Vec<_> = written.difference(&cov).take(5).collect();
            prop_assert!(missing.is_empty(), "not covered after a crash: {:?}", missing);
            prop_assert!(bits_kept_match_the_file(&rec, &cfg));
        }
        rec.refresh(true).unwrap();
        let (cov, clean) = covered(&cfg);
        prop_assert!(clean);
        prop_assert_eq!(cov, written);
    }
}

#[test]
fn a_restart_seeds_the_engine_and_rewrites_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, engine, _cfg, seeded) = setup(dir.path(), 2);
    assert!(!seeded.trusted);
    assert_eq!(seeded.why_not.as_deref(), Some("there is none yet"));
    let t = rec.tracking();
    for off in [0, 5 * EXTENT, 9 * EXTENT + CHUNK] {
        drop(t.begin_write(0, off, CHUNK).unwrap());
    }
    assert!(rec.stats().al_misses.load(Ordering::Relaxed) >= 3);
    drop((t, rec, engine)); // a crash: nothing more is written
    let (_rec, engine, _, seeded) = setup(dir.path(), 2);
    assert!(seeded.trusted && !seeded.clean);
    // Chunk 0's extent was evicted (its bit persisted); the two others are logged whole.
    let mut dirty = vec![0u64; (DISK / CHUNK / 64) as usize];
    engine.unacked_in(0, DISK / CHUNK, &mut dirty);
    let n: u64 = dirty.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(seeded.chunks_marked, n);
    assert!(dirty[0] & 1 == 1);
    assert!(n <= 1 + 2 * EXTENT / CHUNK, "{n}");
}

#[test]
fn a_corrupt_record_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, _e, cfg, _) = setup(dir.path(), 2);
    drop(rec.tracking().begin_write(0, 0, CHUNK).unwrap());
    drop(rec);
    std::fs::write(&cfg.path, b"garbage").unwrap();
    let (_r, _e, _, seeded) = setup(dir.path(), 2);
    assert!(!seeded.trusted);
    assert!(
        seeded.why_not.unwrap().contains("cannot be trusted"),
        "says why"
    );
}

#[test]
fn marking_bits_already_on_disk_writes_and_syncs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, _e, cfg, _) = setup(dir.path(), 2);
    let t = rec.tracking();
    // Spans two extents: the slow path sets the write's own bits on disk.
    let (off, len) = (EXTENT - CHUNK, 2 * CHUNK);
    drop(t.begin_write(0, off, len).unwrap());
    let s = rec.stats();
    let counts = || {
        (
            s.meta_writes.load(Ordering::Relaxed),
            s.syncs.load(Ordering::Relaxed),
        )
    };
    let before = counts();
    assert!(before.0 >= 1 && before.1 >= 1);
    drop(t.begin_write(0, off, len).unwrap());
    assert_eq!(counts(), before, "the bits were on disk already");
    // A new bit is written and synced.
    drop(t.begin_write(0, off, len + CHUNK).unwrap());
    let after = counts();
    assert!(after.0 > before.0 && after.1 > before.1);
    let (cov, _) = covered(&cfg);
    assert!((off / CHUNK..(off + len) / CHUNK + 1).all(|c| cov.contains(&c)));
}

#[test]
fn refreshing_many_pages_keeps_the_bits_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    // 71 bitmap pages, the last one partial: more than one engine snapshot per refresh.
    let chunks = 70 * PAGE_BITS + 5;
    let mut c = CgConfig::new(chunks * CHUNK);
    c.chunk_size = CHUNK;
    let engine = Engine::new(c, 1, Arc::new(Zeros)).unwrap();
    let cfg = TrackConfig {
        path: dir.path().join("disk.drblk-track"),
        extent_size: EXTENT,
        slots: 2,
    };
    let (rec, _) = ChangeRecord::open(&cfg, engine.clone(), [9; 16]).unwrap();
    let t = rec.tracking();
    let per = EXTENT / CHUNK;
    // Writes across two extents set their own bits: in page 0, and across pages 64/65 and
    // 69/70.
    assert_eq!(PAGE_BITS % per, 0);
    let firsts = [per - 1, 65 * PAGE_BITS - 1, 70 * PAGE_BITS - 1];
    for &f in &firsts {
        drop(t.begin_write(0, f * CHUNK, 2 * CHUNK).unwrap());
    }
    rec.refresh(false).unwrap();
    assert!(bits_kept_match_the_file(&rec, &cfg));
    let l = RecordFile::load(&cfg.path).unwrap().unwrap();
    let bit = |i: u64| l.words[(i / 64) as usize] >> (i % 64) & 1 == 1;
    for &f in &firsts {
        assert!(bit(f) && bit(f + 1), "chunks {f} and {} kept", f + 1);
    }
    // A full copy: every page is rewritten, full.
    rec.mark_all_dirty();
    engine.mark_all();
    rec.refresh(false).unwrap();
    assert!(bits_kept_match_the_file(&rec, &cfg));
    let l = RecordFile::load(&cfg.path).unwrap().unwrap();
    assert_eq!(l.sb.flags & file::FLAG_ALL_DIRTY, 0);
    assert!((0..chunks).all(|i| l.words[(i / 64) as usize] >> (i % 64) & 1 == 1));
    let d = rec.disk.lock().unwrap();
    assert_eq!(d.pages.len(), 71);
    let full = d
        .pages
        .values()
        .filter(|b| matches!(b, PageBits::Full))
        .count();
    assert_eq!(full, 70, "all but the partial last page are kept as full");
}

#[test]
fn a_refresh_keeps_the_bits_of_a_write_the_engine_has_not_recorded_yet() {
    let dir = tempfile::tempdir().unwrap();
    let (rec, _e, cfg, _) = setup(dir.path(), 2);
    let per = EXTENT / CHUNK;
    // Chunks across extents 0 and 1: the slow path.
    let (first, last) = (per - 1, per);
    // A write's slow path has set its bits on disk and the write is about to be recorded by
    // the engine and submitted, when a refresh runs.
    {
        let mut d = rec.disk.lock().unwrap();
        rec.mark_on_disk(&mut d, first, last).unwrap();
    }
    rec.refresh(false).unwrap();
    let (cov, _) = covered(&cfg);
    assert!(
        cov.contains(&first) && cov.contains(&last),
        "the refresh cleared the bits of a write about to reach the image"
    );
    // Once the engine has recorded it (here it never does), a refresh may clear them.
    rec.recorded(first, last);
    rec.refresh(false).unwrap();
    let (cov, _) = covered(&cfg);
    assert!(!cov.contains(&first) && !cov.contains(&last));
}
