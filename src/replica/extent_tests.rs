//! Tests of extent staging, journaling and apply, through the store's public API: partial
//! supersede, equal-CG overwrite, exact image bytes against a model, crash points, runs,
//! compaction of partly live records, corruption, invalid extents, version-1 journals, and
//! a property test with random extents, CGs and crashes.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::format::{Header, RecordType, HEADER_LEN};
use super::key::ChunkKey;
use super::*;

/// 128 KiB chunks: an extent region (1 MiB) is 8 chunks.
const CHUNK: u64 = 128 << 10;
const REGION: u64 = 8;
/// 19 chunks, the last one short; regions [0, 8), [8, 16), [16, 19).
const NCH: u64 = 19;
const DISK: u64 = 18 * CHUNK + 3000;
const UUID: [u8; 16] = *b"extent-tests-uid";
const H: u64 = HEADER_LEN as u64;

struct Dirs {
    _tmp: tempfile::TempDir,
    image: PathBuf,
    state: PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    Dirs {
        image: tmp.path().join("image.raw"),
        state: tmp.path().join("state"),
        _tmp: tmp,
    }
}

/// Open with a checkpoint after every CG: these tests follow each step of a commit (every
/// crash point is reached, the journal is reset). Deferred checkpoints are exercised by
/// `open_with` (the property test, the kill -9 rounds, `checkpoint_tests.rs`).
fn open(d: &Dirs) -> Result<(ReplicaStore, RecoveryReport)> {
    open_with(d, CheckpointPolicy::EVERY_CG)
}

fn open_with(d: &Dirs, policy: CheckpointPolicy) -> Result<(ReplicaStore, RecoveryReport)> {
    let (mut s, rep) =
        ReplicaStore::open(&GroupSpec::single(&d.image, DISK, CHUNK, UUID), &d.state)?;
    s.set_checkpoint_policy(policy);
    Ok((s, rep))
}

fn journal_path(d: &Dirs) -> PathBuf {
    d.state.join("journal")
}

fn read_image(d: &Dirs) -> Vec<u8> {
    let mut v = fs::read(&d.image).unwrap();
    v.truncate(DISK as usize);
    v
}

fn ext_range(first: u64, count: u64) -> std::ops::Range<usize> {
    let start = (first * CHUNK) as usize;
    start..((first + count) * CHUNK).min(DISK) as usize
}

/// Content of the extent `first + count` for `seed`: depends on the seed and on the
/// absolute disk offset of every 8 bytes, so misplaced bytes show. Seed 0: zeros.
fn ext_bytes(seed: u64, first: u64, count: u64) -> Vec<u8> {
    let r = ext_range(first, count);
    let mut v = vec![0u8; r.len()];
    if seed == 0 {
        return v;
    }
    for (k, w) in v.chunks_mut(8).enumerate() {
        let mut x = (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ ((r.start / 8 + k) as u64);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^= x >> 31;
        w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
    }
    v
}

/// What an extent holds in a test: bytes of a seed, `Zero`, or all-zero bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Seed(u64),
    Zero,
    ZeroBytes,
}

impl Kind {
    fn bytes(self, first: u64, count: u64) -> Vec<u8> {
        match self {
            Kind::Seed(s) => ext_bytes(s, first, count),
            _ => ext_bytes(0, first, count),
        }
    }
}

fn stage_ext(
    s: &mut ReplicaStore,
    cg: u64,
    first: u64,
    count: u64,
    kind: Kind,
) -> Result<StageOutcome> {
    match kind {
        Kind::Zero => s.stage_extent(0, cg, first, count, ChunkData::Zero),
        k => s.stage_extent(
            0,
            cg,
            first,
            count,
            ChunkData::Bytes(&k.bytes(first, count)),
        ),
    }
}

/// Expected state: the committed image and the staged version per chunk.
#[derive(Clone, Debug)]
struct Model {
    image: Vec<u8>,
    cg: u64,
    frozen: u64,
    /// chunk -> (cg, that chunk's bytes)
    staged: BTreeMap<u64, (u64, Vec<u8>)>,
}

impl Model {
    fn new(image: Vec<u8>, cg: u64, frozen: u64) -> Self {
        Model {
            image,
            cg,
            frozen,
            staged: BTreeMap::new(),
        }
    }

    fn stage(&mut self, cg: u64, first: u64, count: u64, kind: Kind) -> StageOutcome {
        if cg <= self.cg {
            return StageOutcome::AlreadyCommitted;
        }
        let takes = |m: &Self, i: u64| m.staged.get(&i).is_none_or(|&(c, _)| c <= cg);
        if !(first..first + count).any(|i| takes(self, i)) {
            return StageOutcome::Superseded;
        }
        for i in first..first + count {
            if takes(self, i) {
                self.staged.insert(i, (cg, kind.bytes(i, 1)));
            }
        }
        StageOutcome::Staged
    }

    fn commit(&mut self, cg: u64) {
        for (i, (_, b)) in std::mem::take(&mut self.staged) {
            self.image[ext_range(i, 1)].copy_from_slice(&b);
        }
        self.cg = cg;
        self.frozen = cg * 1000;
    }
}

/// Fresh replica synced as CG 1 (frozen 1000) with `sync_extent`, per region, one region
/// as zeros; returns the store and the model.
fn synced(d: &Dirs) -> (ReplicaStore, Model) {
    let (mut s, rep) = open(d).unwrap();
    assert!(rep.created);
    s.begin_sync(NCH).unwrap();
    let mut image = vec![0u8; DISK as usize];
    for (r, first) in (0..NCH).step_by(REGION as usize).enumerate() {
        let count = REGION.min(NCH - first);
        if r == 1 {
            s.sync_extent(0, first, count, ChunkData::Zero).unwrap();
        } else {
            let b = ext_bytes(100 + r as u64, first, count);
            s.sync_extent(0, first, count, ChunkData::Bytes(&b))
                .unwrap();
            image[ext_range(first, count)].copy_from_slice(&b);
        }
    }
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: NCH,
            total_chunks: NCH
        }
    );
    s.finish_sync(1, 1000).unwrap();
    assert!(read_image(d) == image);
    (s, Model::new(image, 1, 1000))
}

fn crash(s: &mut ReplicaStore, p: CrashPoint) {
    s.set_crash_point(Some((p, CrashMode::ReturnError)));
}

fn flip_byte(p: &Path, off: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, off).unwrap();
}

#[track_caller]
fn assert_image(d: &Dirs, m: &Model, ctx: &str) {
    let img = read_image(d);
    if img != m.image {
        let at = img.iter().zip(&m.image).position(|(a, b)| a != b).unwrap();
        panic!(
            "{ctx}: image differs from the model first at byte {at} (chunk {})",
            at as u64 / CHUNK
        );
    }
}

// ---------------------------------------------------------------- deterministic tests

#[test]
fn a_full_journal_fails_the_extent_cleanly_and_the_image_keeps_its_blocks() {
    use std::os::unix::fs::MetadataExt;
    let allocated = |d: &Dirs| fs::metadata(&d.image).unwrap().blocks() * 512;
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    let probe = fs::File::create(d.state.join("probe")).unwrap();
    let can_preallocate = crate::sys::file::preallocate(&probe, 4096).unwrap();
    assert!(
        !can_preallocate || allocated(&d) >= DISK,
        "the image is allocated in full at creation"
    );
    // Room for one chunk's record and the reserve, not for two chunks more.
    s.space.fixed_free = Some(space::RESERVE + 2 * CHUNK);
    stage_ext(&mut s, 2, 0, 1, Kind::Seed(5)).unwrap();
    m.stage(2, 0, 1, Kind::Seed(5));
    let j = s.journal_bytes();
    let e = stage_ext(&mut s, 2, 1, 2, Kind::Seed(6)).unwrap_err();
    assert!(matches!(e, Error::NoSpace { cg: 2, .. }), "{e}");
    assert!(e.to_string().starts_with("journal full:"), "{e}");
    assert_eq!(s.journal_bytes(), j, "nothing written");
    // The store stays usable: a zero extent (a header only) fits, and the group commits.
    stage_ext(&mut s, 2, 8, 8, Kind::Zero).unwrap();
    m.stage(2, 8, 8, Kind::Zero);
    s.commit(2, 2000).unwrap();
    m.commit(2);
    assert_image(&d, &m, "after the commit");
    assert!(
        !can_preallocate || allocated(&d) >= DISK,
        "zeroes are written into the image's blocks, never punched out of it"
    );
}

/// Recovery cuts what follows the last commit record before it writes anything: a journal
/// that filled its filesystem with a failed group gives that space back first.
#[test]
fn recovery_cuts_the_uncommitted_tail_first() {
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    s.set_checkpoint_policy(CheckpointPolicy {
        max_journal_bytes: u64::MAX,
        max_interval: std::time::Duration::MAX,
    });
    stage_ext(&mut s, 2, 0, 8, Kind::Seed(7)).unwrap();
    m.stage(2, 0, 8, Kind::Seed(7));
    s.commit(2, 2000).unwrap();
    m.commit(2);
    let committed = s.journal_bytes();
    stage_ext(&mut s, 3, 8, 8, Kind::Seed(8)).unwrap();
    assert!(s.journal_bytes() > committed);
    drop(s); // a crash with CG 3 staged
    let len = fs::metadata(journal_path(&d)).unwrap().len();
    let mut j = Journal::open(&d.state).unwrap();
    let scan = j.scan(&[Geometry::new(DISK, CHUNK).unwrap()]).unwrap();
    assert_eq!(scan.committed_end, committed);
    drop(j);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.discarded_records, 1);
    assert_eq!(
        rep.uncommitted_bytes_cut,
        len - committed,
        "cut by recovery itself"
    );
    assert_eq!(s.last_committed_cg(), Some(2));
    assert_image(&d, &m, "after recovery");
}

#[test]
fn one_journal_record_per_extent() {
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    let j0 = s.journal_bytes();
    assert_eq!(j0, H);
    stage_ext(&mut s, 2, 0, 8, Kind::Seed(1)).unwrap();
    assert_eq!(s.journal_bytes(), j0 + H + 8 * CHUNK);
    assert_eq!(s.staged_chunks(), 8);
    // A zero extent (or all-zero bytes) is one header-only record.
    stage_ext(&mut s, 2, 8, 8, Kind::Zero).unwrap();
    stage_ext(&mut s, 2, 16, 3, Kind::ZeroBytes).unwrap();
    assert_eq!(s.journal_bytes(), j0 + 3 * H + 8 * CHUNK);
    assert_eq!(s.staged_chunks(), NCH);
    // The disk's short last chunk inside an extent.
    stage_ext(&mut s, 2, 17, 2, Kind::Seed(2)).unwrap();
    assert_eq!(s.journal_bytes(), j0 + 4 * H + 9 * CHUNK + 3000);
    for (f, c, k) in [
        (0, 8, Kind::Seed(1)),
        (8, 8, Kind::Zero),
        (16, 3, Kind::ZeroBytes),
        (17, 2, Kind::Seed(2)),
    ] {
        m.stage(2, f, c, k);
    }
    s.commit(2, 2000).unwrap();
    m.commit(2);
    assert_image(&d, &m, "after commit");
}

#[test]
fn overlapping_extents_of_different_cgs_partial_supersede() {
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    let steps: &[(u64, u64, u64, Kind, StageOutcome)] = &[
        // CG 3 first (CG 2 was abandoned and CG 3 already arrives), then late CG-2 data.
        (3, 2, 4, Kind::Seed(31), StageOutcome::Staged),
        // Chunks 2..6 keep CG 3; 0, 1, 6, 7 take CG 2.
        (2, 0, 8, Kind::Seed(21), StageOutcome::Staged),
        // Entirely inside CG 3's extent: superseded, nothing written.
        (2, 3, 2, Kind::Seed(22), StageOutcome::Superseded),
        // Equal CG: the later call wins for part of the first CG-3 extent.
        (3, 4, 3, Kind::Seed(32), StageOutcome::Staged),
        // Equal CG overwrites part of the CG-2 extent? No: chunk 7 is CG 2, CG 2 again wins
        // there (equal CG, later call); chunks 5, 6 are CG 3 now and keep it.
        (2, 5, 3, Kind::Zero, StageOutcome::Staged),
        (3, 16, 3, Kind::ZeroBytes, StageOutcome::Staged),
        (2, 16, 3, Kind::Seed(23), StageOutcome::Superseded),
    ];
    for &(cg, first, count, kind, want) in steps {
        let before = s.journal_bytes();
        let got = stage_ext(&mut s, cg, first, count, kind).unwrap();
        assert_eq!(got, want, "CG {cg} {first}+{count}");
        assert_eq!(m.stage(cg, first, count, kind), want);
        if want == StageOutcome::Superseded {
            assert_eq!(
                s.journal_bytes(),
                before,
                "a superseded extent writes nothing"
            );
        }
    }
    assert_eq!(s.staged_chunks(), m.staged.len() as u64);
    // Who holds what (the model agrees with the hand-derived expectation).
    let cgs: Vec<(u64, u64)> = m.staged.iter().map(|(&i, (c, _))| (i, *c)).collect();
    assert_eq!(
        cgs,
        vec![
            (0, 2),
            (1, 2),
            (2, 3),
            (3, 3),
            (4, 3),
            (5, 3),
            (6, 3),
            (7, 2),
            (16, 3),
            (17, 3),
            (18, 3)
        ]
    );
    // Commit 2 is refused while CG-3 chunks are staged.
    assert!(matches!(s.commit(2, 2000), Err(Error::InvalidArgument(_))));
    assert_image(&d, &m, "staging does not touch the image");
    s.commit_durable(3, 3000).unwrap();
    assert_image(&d, &m, "commit_durable does not touch the image");
    s.apply_committed().unwrap();
    m.commit(3);
    assert_image(&d, &m, "after apply");
    assert_eq!(
        stage_ext(&mut s, 3, 0, 1, Kind::Zero).unwrap(),
        StageOutcome::AlreadyCommitted
    );
    drop(s);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, None);
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 3,
            frozen_at_unix_us: 3000
        }
    );
    assert_image(&d, &m, "after reopen");
}

#[test]
fn replay_keeps_newer_cg_inside_an_older_extent() {
    // The journal holds a CG-3 extent followed by an overlapping CG-2 extent; recovery must
    // expand records with the staging rule (newest CG wins), not "last record wins".
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    for (cg, first, count, kind) in [
        (3, 2, 3, Kind::Seed(31)),
        (2, 0, 8, Kind::Seed(21)),
        (3, 6, 1, Kind::Zero),
        (2, 5, 3, Kind::Seed(22)),
    ] {
        stage_ext(&mut s, cg, first, count, kind).unwrap();
        m.stage(cg, first, count, kind);
    }
    crash(&mut s, CrashPoint::AfterCommitDurable);
    assert!(s.commit(3, 3000).is_err());
    drop(s);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, Some(3));
    assert_eq!(rep.chunks_applied, 8);
    m.commit(3);
    assert_eq!(s.last_committed_cg(), Some(3));
    assert_image(&d, &m, "replayed");
}

/// Stage CG 2 as a sequence that compacts once (with `compact_min_dead_bytes(0)`) and
/// leaves exactly 6 runs to apply: [0, 1] and [5, 7] of the compacted record, [2, 4],
/// [9, 11] (zero), [12, 13] (zero bytes), [16, 18].
const CG2: &[(u64, u64, Kind)] = &[
    (0, 8, Kind::Seed(1)),
    (0, 8, Kind::Seed(2)),
    (0, 8, Kind::Seed(3)), // dead > live: compaction
    (2, 3, Kind::Seed(4)),
    (9, 4, Kind::Zero),
    (12, 2, Kind::ZeroBytes),
    (16, 3, Kind::Seed(5)),
];
const CG2_RUNS: u64 = 6;

#[test]
fn every_crash_point_with_extents() {
    let mut points: Vec<CrashPoint> = fault::ALL_SIMPLE
        .iter()
        .copied()
        .filter(|p| {
            !matches!(
                p,
                CrashPoint::AfterSyncChunk | CrashPoint::BeforeFinishSyncState
            )
        })
        .collect();
    points.extend((0..=CG2_RUNS).map(CrashPoint::MidApply));
    for p in points {
        let d = dirs();
        let (mut s, mut m) = synced(&d);
        s.set_compact_min_dead_bytes(0);
        crash(&mut s, p);
        let mut crashed = None;
        for &(first, count, kind) in CG2 {
            match stage_ext(&mut s, 2, first, count, kind) {
                Ok(out) => assert_eq!(out, m.stage(2, first, count, kind)),
                Err(Error::InjectedCrash(q)) if q == p => {
                    crashed = Some("stage");
                    break;
                }
                Err(e) => panic!("{p:?}: {e}"),
            }
        }
        if crashed.is_none() {
            match s.commit(2, 2000) {
                Ok(()) => {}
                Err(Error::InjectedCrash(q)) if q == p => crashed = Some("commit"),
                Err(e) => panic!("{p:?}: {e}"),
            }
        }
        // MidApply fires once per run: exactly CG2_RUNS runs.
        match p {
            CrashPoint::MidApply(k) => {
                assert_eq!(crashed.is_some(), k < CG2_RUNS, "{p:?}: {crashed:?}")
            }
            CrashPoint::MidJournalReset | CrashPoint::MidStateWrite => {}
            _ => assert!(crashed.is_some(), "{p:?} never reached"),
        }
        drop(s);
        let (s, rep) = open(&d).unwrap();
        let survives = match crashed {
            None => true,
            Some("stage") => false,
            Some(_) => p.commit_survives(),
        };
        if survives {
            m.commit(2);
        } else {
            m.staged.clear();
        }
        assert_image(&d, &m, &format!("{p:?} ({crashed:?}) {rep:?}"));
        assert_eq!(s.last_committed_cg(), Some(m.cg), "{p:?}");
        // After MidJournalReset the state already says CG 2 and the journal is empty.
        if crashed == Some("commit") && survives && p != CrashPoint::MidJournalReset {
            assert_eq!(rep.replayed_cg, Some(2), "{p:?}");
            assert_eq!(rep.chunks_applied, 16, "{p:?}");
        }
    }
}

#[test]
fn compaction_with_partly_live_records() {
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    s.set_compact_min_dead_bytes(2 * CHUNK);
    let mut compactions = 0;
    let mut last = s.journal_bytes();
    // Abandoned CGs keep overwriting parts of whole-region extents.
    for cg in 2..40u64 {
        let region = cg % 3;
        let rfirst = region * REGION;
        let rcount = REGION.min(NCH - rfirst);
        let kind = if cg % 7 == 0 {
            Kind::Zero
        } else {
            Kind::Seed(cg)
        };
        let (first, count) = if cg % 2 == 0 {
            (rfirst, rcount)
        } else {
            let f = rfirst + cg % rcount;
            (f, (cg % 3 + 1).min(rfirst + rcount - f))
        };
        assert_eq!(
            stage_ext(&mut s, cg, first, count, kind).unwrap(),
            StageOutcome::Staged
        );
        m.stage(cg, first, count, kind);
        if s.journal_bytes() < last {
            compactions += 1;
        }
        last = s.journal_bytes();
        // The bound of the module docs.
        let l = NCH * H + DISK;
        assert!(s.journal_bytes() <= H + 2 * l + 2 * CHUNK + H + 8 * CHUNK);
    }
    assert!(compactions >= 3, "{compactions} compactions");
    assert_eq!(s.staged_chunks(), NCH);
    // Replay from a compacted journal after a crash once the commit record is durable.
    crash(&mut s, CrashPoint::AfterCommitDurable);
    assert!(matches!(
        s.commit(40, 40_000),
        Err(Error::InjectedCrash(CrashPoint::AfterCommitDurable))
    ));
    drop(s);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, Some(40));
    assert_eq!(rep.chunks_applied, NCH);
    m.commit(40);
    assert_eq!(s.last_committed_cg(), Some(40));
    assert_image(&d, &m, "after replay");
}

#[test]
fn corrupt_extent_record_inside_committed_cg_is_refused() {
    // Records: checkpoint @0, data 0+8 @H, zero 9+4 @2H+8C, data 16+3 @3H+8C, commit.
    let r1 = H;
    let r2 = r1 + H + 8 * CHUNK;
    let r3 = r2 + H;
    let commit = r3 + H + 2 * CHUNK + 3000;
    // (record, byte within it): a payload byte deep in the extent, the count field of a
    // zero record, the first-chunk field of a data record, the short last chunk's bytes.
    for (rec, delta) in [
        (r1, H + 5 * CHUNK + 17),
        (r2, 32),
        (r3, 24),
        (r3, H + 2 * CHUNK + 2999),
    ] {
        let d = dirs();
        let (mut s, m) = synced(&d);
        stage_ext(&mut s, 2, 0, 8, Kind::Seed(1)).unwrap();
        stage_ext(&mut s, 2, 9, 4, Kind::Zero).unwrap();
        stage_ext(&mut s, 2, 16, 3, Kind::Seed(2)).unwrap();
        crash(&mut s, CrashPoint::AfterCommitDurable);
        assert!(s.commit(2, 2000).is_err());
        drop(s);
        assert_eq!(fs::metadata(journal_path(&d)).unwrap().len(), commit + H);
        flip_byte(&journal_path(&d), rec + delta);
        match open(&d).err().expect("must refuse") {
            Error::Corrupt {
                offset,
                cg,
                commit_offset,
                ..
            } => assert_eq!(
                (offset, cg, commit_offset),
                (rec, 2, commit),
                "{rec}+{delta}"
            ),
            e => panic!("{rec}+{delta}: {e}"),
        }
        assert_image(&d, &m, "nothing of CG 2 applied");
    }
}

#[test]
fn invalid_extents_are_refused_and_stage_nothing() {
    let d = dirs();
    let (mut s, _) = synced(&d);
    let full = |first: u64, count: u64| vec![1u8; ext_range(first, count).len()];
    let cases: Vec<(u64, u64, Option<Vec<u8>>, &str)> = vec![
        (0, 0, None, "empty"),
        (0, 0, Some(Vec::new()), "empty"),
        (6, 3, None, "crosses"),
        (7, 2, Some(vec![1u8; 2 * CHUNK as usize]), "crosses"),
        (17, 3, None, "beyond the disk"),
        (NCH, 1, None, "beyond the disk"),
        (u64::MAX, 2, None, "beyond the disk"),
        (0, 2, Some(vec![1u8; CHUNK as usize]), "expected"),
        (16, 3, Some(vec![1u8; 3 * CHUNK as usize]), "expected"),
        (2, 3, Some(full(2, 4)), "expected"),
    ];
    for (first, count, bytes, why) in &cases {
        let data = match bytes {
            Some(b) => ChunkData::Bytes(b),
            None => ChunkData::Zero,
        };
        match s.stage_extent(0, 2, *first, *count, data) {
            Err(Error::InvalidArgument(msg)) => {
                assert!(msg.contains(why), "{first}+{count}: {msg}");
            }
            other => panic!("{first}+{count}: {other:?}"),
        }
        assert_eq!(s.staged_chunks(), 0);
        assert_eq!(s.journal_bytes(), H);
    }
    // Not poisoned: a valid extent stages.
    assert_eq!(
        s.stage_extent(0, 2, 16, 3, ChunkData::Bytes(&full(16, 3)))
            .unwrap(),
        StageOutcome::Staged
    );
    // The same checks guard sync_extent.
    s.begin_sync(NCH).unwrap();
    for (first, count, bytes, why) in &cases {
        let data = match bytes {
            Some(b) => ChunkData::Bytes(b),
            None => ChunkData::Zero,
        };
        match s.sync_extent(0, *first, *count, data) {
            Err(Error::InvalidArgument(msg)) => assert!(msg.contains(why), "{msg}"),
            other => panic!("sync {first}+{count}: {other:?}"),
        }
    }
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: 0,
            total_chunks: NCH
        }
    );
}

#[test]
fn sync_extent_counts_chunks_once() {
    let d = dirs();
    let (mut s, _) = open(&d).unwrap();
    s.begin_sync(NCH).unwrap();
    let mut image = vec![0u8; DISK as usize];
    for &(first, count, seed) in &[(0, 8, 1), (4, 4, 2), (8, 8, 0), (16, 3, 3), (18, 1, 4)] {
        let b = ext_bytes(seed, first, count);
        if seed == 0 {
            s.sync_extent(0, first, count, ChunkData::Zero).unwrap();
        } else {
            s.sync_extent(0, first, count, ChunkData::Bytes(&b))
                .unwrap();
        }
        image[ext_range(first, count)].copy_from_slice(&b);
    }
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: NCH,
            total_chunks: NCH
        }
    );
    // The one-chunk wrappers still work.
    s.sync_zero(3).unwrap();
    s.sync_chunk(5, &ext_bytes(9, 5, 1)).unwrap();
    image[ext_range(3, 1)].fill(0);
    image[ext_range(5, 1)].copy_from_slice(&ext_bytes(9, 5, 1));
    s.finish_sync(1, 1).unwrap();
    assert!(read_image(&d) == image);
}

#[test]
fn journals_of_older_releases_are_replayed() {
    for version in [1, 2] {
        replay_old_journal(version);
    }
}

/// A journal as an older release wrote it (version 1: one chunk per record, aux 0; version
/// 2: extents, byte 7 reserved), CG 2 committed but not applied.
fn replay_old_journal(version: u16) {
    let d = dirs();
    let (s, mut m) = synced(&d);
    drop(s);
    let gen = 0x1234_5678_9abc_def0;
    let mut j = Vec::new();
    let mut rec = |h: Header, p: &[u8]| {
        j.extend_from_slice(&h.encode_version(p, version));
        j.extend_from_slice(p);
    };
    rec(Header::new(RecordType::Checkpoint, gen, 1, 0, 1000, 0), &[]);
    let one = if version == 1 { 0 } else { 1 };
    let c3 = ext_bytes(7, 3, 1);
    let c18 = ext_bytes(8, 18, 1);
    rec(
        Header::new(RecordType::Data, gen, 2, 3, one, CHUNK as u32),
        &c3,
    );
    rec(Header::new(RecordType::Zero, gen, 2, 4, one, 0), &[]);
    rec(Header::new(RecordType::Data, gen, 2, 18, one, 3000), &c18);
    rec(Header::new(RecordType::Commit, gen, 2, 3, 2000, 0), &[]);
    fs::write(journal_path(&d), &j).unwrap();
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, Some(2), "version {version}");
    assert_eq!(rep.chunks_applied, 3);
    m.stage(2, 3, 1, Kind::Seed(7));
    m.stage(2, 4, 1, Kind::Zero);
    m.stage(2, 18, 1, Kind::Seed(8));
    m.commit(2);
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 2,
            frozen_at_unix_us: 2000
        }
    );
    assert_image(&d, &m, &format!("version-{version} replay"));
    // The journal was reset in the current format.
    let raw = fs::read(journal_path(&d)).unwrap();
    assert_eq!(
        s.journal_bytes(),
        H,
        "one checkpoint record (the file is reused)"
    );
    assert_eq!(u16::from_le_bytes([raw[4], raw[5]]), format::VERSION);
}

/// One journal holds a whole group: the scan files each extent under its disk, checks it
/// against that disk's size, and refuses a disk the group does not have.
#[test]
fn a_group_journal_is_scanned_per_disk() {
    let d = dirs();
    let (s, _) = synced(&d);
    drop(s);
    let gen = 0x0bad_cafe_0000_0001;
    let write = |recs: &[(Header, Vec<u8>)]| {
        let mut j = Vec::new();
        for (h, p) in recs {
            j.extend_from_slice(&h.encode(p));
            j.extend_from_slice(p);
        }
        fs::write(journal_path(&d), &j).unwrap();
    };
    let ck = (
        Header::new(RecordType::Checkpoint, gen, 1, 0, 1000, 0),
        vec![],
    );
    let c3 = ext_bytes(7, 3, 1);
    let data0 = (
        Header::new(RecordType::Data, gen, 2, 3, 1, CHUNK as u32),
        c3.clone(),
    );
    // Disk 1 is 4 chunks long: chunks 2 and 3 are its last two.
    let zero1 = (
        Header::new(RecordType::Zero, gen, 2, 2, 2, 0).on_disk(1),
        vec![],
    );
    let commit = |n| (Header::new(RecordType::Commit, gen, 2, n, 2000, 0), vec![]);
    let geo0 = Geometry::new(DISK, CHUNK).unwrap();
    let geo1 = Geometry::new(4 * CHUNK, CHUNK).unwrap();

    write(&[ck.clone(), data0.clone(), zero1.clone(), commit(3)]);
    let mut j = Journal::open(&d.state).unwrap();
    let scan = j.scan(&[geo0, geo1]).unwrap();
    let mut keys: Vec<ChunkKey> = scan.committed.keys().copied().collect();
    keys.sort();
    let want = [(0, 3), (1, 2), (1, 3)].map(|(d, c)| ChunkKey::new(d, c));
    assert_eq!(keys, want);
    let mut buf = Vec::new();
    let k = ChunkKey::new(0, 3);
    j.read_record(k, &scan.committed[&k], &mut buf).unwrap();
    assert_eq!(buf, c3);
    // The same record read as disk 1's chunk 3 is not the staged one.
    let wrong = ChunkKey::new(1, 3);
    assert!(j.read_record(wrong, &scan.committed[&k], &mut buf).is_err());

    // A one-disk group: the disk-1 extent inside a committed group is corruption.
    assert!(matches!(j.scan(&[geo0]), Err(Error::Corrupt { .. })));
    drop(j);
    // An extent past its own disk's end (disk 1 has 4 chunks), though inside disk 0's.
    let past = (
        Header::new(RecordType::Zero, gen, 2, 3, 2, 0).on_disk(1),
        vec![],
    );
    write(&[ck, data0, past, commit(3)]);
    let mut j = Journal::open(&d.state).unwrap();
    assert!(matches!(j.scan(&[geo0, geo1]), Err(Error::Corrupt { .. })));
}

// ---------------------------------------------------------------- property test

#[derive(Clone, Copy, Debug)]
enum End {
    Commit,
    Abandon,
    LinkLoss,
}

#[derive(Clone, Debug)]
struct Step {
    /// (first, count, kind, stage as the previous CG ("late" data))
    extents: Vec<(u64, u64, Kind, bool)>,
    end: End,
    crash: Option<CrashPoint>,
}

fn extent() -> impl Strategy<Value = (u64, u64)> {
    (0..NCH).prop_flat_map(|first| {
        let room = (first / REGION + 1) * REGION;
        let max = room.min(NCH) - first;
        (Just(first), 1..=max)
    })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        6 => (1u64..1000).prop_map(Kind::Seed),
        1 => Just(Kind::Zero),
        1 => Just(Kind::ZeroBytes),
    ]
}

fn crash_point() -> impl Strategy<Value = CrashPoint> {
    prop_oneof![
        proptest::sample::select(fault::ALL_SIMPLE.to_vec()),
        (0u64..8).prop_map(CrashPoint::MidApply),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    (
        proptest::collection::vec(
            (extent(), kind(), proptest::bool::weighted(0.2))
                .prop_map(|((f, c), k, late)| (f, c, k, late)),
            0..7,
        ),
        prop_oneof![6 => Just(End::Commit), 2 => Just(End::Abandon), 1 => Just(End::LinkLoss)],
        proptest::option::weighted(0.35, crash_point()),
    )
        .prop_map(|(extents, end, crash)| Step {
            extents,
            end,
            crash,
        })
}

fn check(
    d: &Dirs,
    s: &ReplicaStore,
    m: &Model,
    ctx: &str,
) -> std::result::Result<(), TestCaseError> {
    prop_assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: m.cg,
            frozen_at_unix_us: m.frozen
        },
        "{}",
        ctx
    );
    let img = read_image(d);
    if img != m.image {
        let at = img.iter().zip(&m.image).position(|(a, b)| a != b).unwrap();
        return Err(TestCaseError::fail(format!(
            "{ctx}: image differs from CG {} first at chunk {}",
            m.cg,
            at as u64 / CHUNK
        )));
    }
    Ok(())
}

fn run_steps(
    steps: Vec<Step>,
    compact: bool,
    policy: CheckpointPolicy,
) -> std::result::Result<(), TestCaseError> {
    let d = dirs();
    let (mut s, mut m) = synced(&d);
    let min_dead = if compact { 0 } else { 64 << 20 };
    s.set_compact_min_dead_bytes(min_dead);
    s.set_checkpoint_policy(policy);
    for (n, st) in steps.into_iter().enumerate() {
        let cg = n as u64 + 2;
        if let Some(p) = st.crash {
            crash(&mut s, p);
        }
        let mut crashed: Option<&str> = None;
        for &(first, count, kind, late) in &st.extents {
            let c = if late { cg - 1 } else { cg };
            match stage_ext(&mut s, c, first, count, kind) {
                Ok(out) => prop_assert_eq!(out, m.stage(c, first, count, kind)),
                Err(Error::InjectedCrash(_)) => {
                    crashed = Some("stage");
                    break;
                }
                Err(e) => return Err(TestCaseError::fail(format!("stage: {e}"))),
            }
            prop_assert_eq!(s.staged_chunks(), m.staged.len() as u64);
        }
        if crashed.is_none() {
            let r = match st.end {
                End::Commit => s.commit(cg, cg * 1000),
                End::Abandon => Ok(()),
                End::LinkLoss => s.discard_uncommitted(),
            };
            match r {
                Ok(()) => match st.end {
                    End::Commit => m.commit(cg),
                    End::Abandon => {}
                    End::LinkLoss => m.staged.clear(),
                },
                Err(Error::InjectedCrash(p)) => {
                    crashed = Some("end");
                    if matches!(st.end, End::Commit) && p.commit_survives() {
                        m.commit(cg);
                    }
                }
                Err(e) => return Err(TestCaseError::fail(format!("{:?}: {e}", st.end))),
            }
        }
        let ctx = format!("step {n} cg {cg} {:?} crashed in {crashed:?}", st.crash);
        if crashed.is_some() {
            drop(s);
            m.staged.clear();
            let (s2, _) =
                open_with(&d, policy).map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
            s = s2;
            s.set_compact_min_dead_bytes(min_dead);
        } else {
            s.set_crash_point(None);
        }
        check(&d, &s, &m, &ctx)?;
    }
    drop(s);
    m.staged.clear();
    let (s, _) = open(&d).map_err(|e| TestCaseError::fail(format!("final reopen: {e}")))?;
    check(&d, &s, &m, "final reopen")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn random_extents_with_crashes(
        steps in proptest::collection::vec(step(), 1..10),
        compact in any::<bool>(),
        checkpoint_at in prop_oneof![Just(0u64), 1u64..40_000, Just(u64::MAX)],
    ) {
        // 0: a checkpoint after every CG; otherwise only once the journal is that long
        // (u64::MAX: never, so link losses and compactions checkpoint first).
        let policy = CheckpointPolicy {
            max_journal_bytes: checkpoint_at,
            max_interval: if checkpoint_at == 0 {
                std::time::Duration::ZERO
            } else {
                std::time::Duration::from_secs(3600)
            },
        };
        run_steps(steps, compact, policy)?;
    }
}
