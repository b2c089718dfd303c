//! Tests of the replica store: crash points (deterministic and property-based), corruption,
//! torn tails, identity checks, a real `kill -9` of a child process.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use super::format::{Header, RecordType, HEADER_LEN};
use super::*;

pub(super) const CHUNK: u64 = 1024;
pub(super) const NCHUNKS: u64 = 13;
/// Last chunk is short (300 bytes).
pub(super) const DISK: u64 = 12 * CHUNK + 300;
const UUID: [u8; 16] = *b"0123456789abcdef";

pub(super) struct Dirs {
    _tmp: tempfile::TempDir,
    image: PathBuf,
    pub(super) state: PathBuf,
}

pub(super) fn dirs() -> Dirs {
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
pub(super) fn open(d: &Dirs) -> Result<(ReplicaStore, RecoveryReport)> {
    open_with(d, CheckpointPolicy::EVERY_CG)
}

pub(super) fn open_with(
    d: &Dirs,
    policy: CheckpointPolicy,
) -> Result<(ReplicaStore, RecoveryReport)> {
    let (mut s, rep) =
        ReplicaStore::open(&GroupSpec::single(&d.image, DISK, CHUNK, UUID), &d.state)?;
    s.set_checkpoint_policy(policy);
    Ok((s, rep))
}

fn chunk_len(i: u64) -> usize {
    CHUNK.min(DISK - i * CHUNK) as usize
}

/// Deterministic chunk content; `seed == 0` gives zeros.
pub(super) fn content(seed: u64, i: u64) -> Vec<u8> {
    if seed == 0 {
        return vec![0; chunk_len(i)];
    }
    drblk_testkit::rng::pattern(seed << 24 ^ i, chunk_len(i))
}

pub(super) fn read_image(d: &Dirs) -> Vec<u8> {
    let mut v = fs::read(&d.image).unwrap();
    v.truncate(DISK as usize);
    v
}

/// The store's image as a flat vector from per-chunk seeds.
pub(super) fn image_of(seeds: &[u64]) -> Vec<u8> {
    (0..NCHUNKS)
        .flat_map(|i| content(seeds[i as usize], i))
        .collect()
}

/// Fresh replica, fully synced as CG 1 with content seeds `1000 + i`.
pub(super) fn synced(d: &Dirs) -> (ReplicaStore, Vec<u64>) {
    let (mut s, rep) = open(d).unwrap();
    assert!(rep.created);
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: 0,
            total_chunks: NCHUNKS
        }
    );
    s.begin_sync(NCHUNKS).unwrap();
    let seeds: Vec<u64> = (0..NCHUNKS)
        .map(|i| if i == 3 { 0 } else { 1000 + i })
        .collect();
    for i in 0..NCHUNKS {
        if seeds[i as usize] == 0 {
            s.sync_zero(i).unwrap();
        } else {
            s.sync_chunk(i, &content(seeds[i as usize], i)).unwrap();
        }
    }
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: NCHUNKS,
            total_chunks: NCHUNKS
        }
    );
    s.finish_sync(1, 1000).unwrap();
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 1,
            frozen_at_unix_us: 1000
        }
    );
    assert_eq!(read_image(d), image_of(&seeds));
    (s, seeds)
}

pub(super) fn journal_path(d: &Dirs) -> PathBuf {
    d.state.join("journal")
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

pub(super) fn crash(s: &mut ReplicaStore, p: CrashPoint) {
    s.set_crash_point(Some((p, CrashMode::ReturnError)));
}

pub(super) fn is_crash<T: std::fmt::Debug>(r: Result<T>, p: CrashPoint) {
    match r {
        Err(Error::InjectedCrash(q)) if q == p => {}
        other => panic!("expected injected crash at {p:?}, got {other:?}"),
    }
}

/// Stage CG `cg` writing `writes` (index, seed) and update `seeds` for the expected image.
pub(super) fn stage(s: &mut ReplicaStore, cg: u64, writes: &[(u64, u64)]) {
    for &(i, seed) in writes {
        let r = if seed == 0 {
            s.stage_chunk(cg, i, ChunkData::Zero)
        } else {
            s.stage_chunk(cg, i, ChunkData::Bytes(&content(seed, i)))
        };
        assert_eq!(r.unwrap(), StageOutcome::Staged);
    }
}

pub(super) fn apply_to(seeds: &mut [u64], writes: &[(u64, u64)]) {
    for &(i, seed) in writes {
        seeds[i as usize] = seed;
    }
}

// ---------------------------------------------------------------- deterministic tests

#[test]
fn commit_cycle_and_state_survives_reopen() {
    let d = dirs();
    let (mut s, mut seeds) = synced(&d);
    let w = [(0, 7), (5, 8), (12, 9), (3, 10), (4, 0)];
    stage(&mut s, 2, &w);
    assert_eq!(
        read_image(&d),
        image_of(&seeds),
        "staging must not touch the image"
    );
    s.commit(2, 2000).unwrap();
    apply_to(&mut seeds, &w);
    assert_eq!(read_image(&d), image_of(&seeds));
    assert_eq!(s.last_committed_cg(), Some(2));
    assert_eq!(s.staged_chunks(), 0);
    assert_eq!(s.journal_bytes(), HEADER_LEN as u64);
    drop(s);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, None);
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 2,
            frozen_at_unix_us: 2000
        }
    );
    assert_eq!(read_image(&d), image_of(&seeds));
}

#[test]
fn every_crash_point_in_commit() {
    let mut points: Vec<CrashPoint> = fault::ALL_SIMPLE.to_vec();
    points.extend((0..6).map(CrashPoint::MidApply));
    for p in points {
        let d = dirs();
        let (mut s, mut seeds) = synced(&d);
        let w2 = [(1, 21), (2, 22), (7, 0)];
        stage(&mut s, 2, &w2);
        s.commit(2, 2000).unwrap();
        apply_to(&mut seeds, &w2);
        s.set_compact_min_dead_bytes(0);
        let w3 = [
            (1, 31),
            (1, 33),
            (1, 37),
            (2, 32),
            (9, 34),
            (12, 35),
            (0, 0),
            (4, 36),
            (1, 38),
        ];
        crash(&mut s, p);
        let mut crashed = None;
        for &(i, seed) in &w3 {
            let data = content(seed, i);
            let r = if seed == 0 {
                s.stage_chunk(3, i, ChunkData::Zero)
            } else {
                s.stage_chunk(3, i, ChunkData::Bytes(&data))
            };
            if let Err(e) = r {
                assert!(matches!(e, Error::InjectedCrash(q) if q == p), "{e}");
                crashed = Some("stage");
                break;
            }
        }
        if crashed.is_none() {
            match s.commit(3, 3000) {
                Ok(()) => {}
                Err(Error::InjectedCrash(q)) if q == p => crashed = Some("commit"),
                Err(e) => panic!("{p:?}: {e}"),
            }
        }
        // Poisoned after a crash.
        if crashed.is_some() {
            assert!(matches!(
                s.stage_chunk(4, 0, ChunkData::Zero),
                Err(Error::Poisoned)
            ));
        }
        drop(s);
        let (s, rep) = open(&d).unwrap();
        let survives = match crashed {
            None => true,
            Some("stage") => false,
            Some(_) => p.commit_survives(),
        };
        if survives {
            apply_to(&mut seeds, &w3);
        }
        let cg = if survives { 3 } else { 2 };
        assert_eq!(
            read_image(&d),
            image_of(&seeds),
            "{p:?} ({crashed:?}) {rep:?}"
        );
        assert_eq!(s.last_committed_cg(), Some(cg), "{p:?}");
        eprintln!("{p:?}: crashed in {crashed:?}, recovered CG {cg}, {rep:?}");
    }
}

#[test]
fn crash_during_sync_stays_syncing() {
    for p in [
        CrashPoint::AfterSyncChunk,
        CrashPoint::BeforeFinishSyncState,
        CrashPoint::MidStateWrite,
    ] {
        let d = dirs();
        let (mut s, _) = open(&d).unwrap();
        s.begin_sync(NCHUNKS).unwrap();
        crash(&mut s, p);
        let mut r = Ok(());
        for i in 0..NCHUNKS {
            r = s.sync_chunk(i, &content(5, i));
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = s.finish_sync(1, 1);
        }
        is_crash(r, p);
        drop(s);
        let (mut s, _) = open(&d).unwrap();
        assert_eq!(
            s.state(),
            ReplicaState::Syncing {
                done_chunks: 0,
                total_chunks: NCHUNKS
            }
        );
        assert_eq!(s.last_committed_cg(), None);
        assert!(matches!(
            s.stage_chunk(2, 0, ChunkData::Zero),
            Err(Error::InvalidState(_))
        ));
    }
}

#[test]
fn abandoned_cgs_keep_staged_data_newest_wins() {
    let d = dirs();
    let (mut s, mut seeds) = synced(&d);
    stage(&mut s, 2, &[(0, 20), (1, 21)]);
    // CG 2 abandoned; CG 3 re-ships chunk 0 and more; a late CG-2 chunk 0 is superseded.
    stage(&mut s, 3, &[(0, 30), (2, 32)]);
    assert_eq!(
        s.stage_chunk(2, 0, ChunkData::Bytes(&content(99, 0)))
            .unwrap(),
        StageOutcome::Superseded
    );
    assert_eq!(s.staged_chunks(), 3);
    // Commit of 2 while CG 3 data is staged is refused (and harmless).
    assert!(matches!(s.commit(2, 1), Err(Error::InvalidArgument(_))));
    s.commit(3, 3000).unwrap();
    apply_to(&mut seeds, &[(0, 30), (1, 21), (2, 32)]);
    assert_eq!(read_image(&d), image_of(&seeds));
    assert_eq!(
        s.stage_chunk(3, 0, ChunkData::Zero).unwrap(),
        StageOutcome::AlreadyCommitted
    );
    // Repeated "complete" for the committed CG is a no-op; older is refused.
    s.commit(3, 3000).unwrap();
    assert!(matches!(s.commit(2, 1), Err(Error::InvalidArgument(_))));
    // Link loss drops staged data.
    stage(&mut s, 4, &[(5, 40)]);
    s.discard_uncommitted().unwrap();
    s.commit(4, 4000).unwrap();
    assert_eq!(read_image(&d), image_of(&seeds));
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 4,
            frozen_at_unix_us: 4000
        }
    );
}

#[test]
fn argument_checks() {
    let d = dirs();
    let (mut s, _) = synced(&d);
    assert!(matches!(
        s.stage_chunk(2, NCHUNKS, ChunkData::Zero),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.stage_chunk(2, 12, ChunkData::Bytes(&[1u8; CHUNK as usize])),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.stage_chunk(0, 1, ChunkData::Zero),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        s.sync_chunk(0, &content(1, 0)),
        Err(Error::InvalidState(_))
    ));
    // Argument errors do not poison.
    s.stage_chunk(2, 12, ChunkData::Bytes(&content(1, 12)))
        .unwrap();
}

#[test]
fn identity_mismatch_and_lock() {
    let d = dirs();
    let (s, _) = synced(&d);
    assert!(matches!(open(&d), Err(Error::Locked(_))));
    drop(s);
    let e = ReplicaStore::open(
        &GroupSpec::single(&d.image, DISK, CHUNK, *b"fedcba9876543210"),
        &d.state,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            Error::IdentityMismatch { ref field, .. } if field == "disk uuid"
        ),
        "{e}"
    );
    eprintln!("{e}");
    let e = ReplicaStore::open(
        &GroupSpec::single(&d.image, DISK + 512, CHUNK, UUID),
        &d.state,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            Error::IdentityMismatch { ref field, .. } if field == "disk size"
        ),
        "{e}"
    );
    let e = ReplicaStore::open(
        &GroupSpec::single(&d.image, DISK, CHUNK * 2, UUID),
        &d.state,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            e,
            Error::IdentityMismatch { ref field, .. } if field == "chunk size"
        ),
        "{e}"
    );
    // Still opens with the right identity, unchanged.
    let (s, _) = open(&d).unwrap();
    assert_eq!(s.last_committed_cg(), Some(1));
    drop(s);
    // An existing image that is too small is refused.
    fs::OpenOptions::new()
        .write(true)
        .open(&d.image)
        .unwrap()
        .set_len(100)
        .unwrap();
    assert!(matches!(open(&d), Err(Error::InvalidArgument(_))));
}

/// Leave CG 2 durable-but-unapplied in the journal; return (seeds before, seeds after CG 2,
/// record offsets of the staged records in journal order, commit record offset).
fn durable_unapplied(d: &Dirs) -> (Vec<u64>, Vec<u64>, Vec<u64>, u64) {
    let (mut s, seeds1) = synced(d);
    let w = [(1, 21), (4, 0), (6, 26)];
    stage(&mut s, 2, &w);
    crash(&mut s, CrashPoint::AfterCommitDurable);
    is_crash(s.commit(2, 2000), CrashPoint::AfterCommitDurable);
    drop(s);
    let mut seeds2 = seeds1.clone();
    apply_to(&mut seeds2, &w);
    let h = HEADER_LEN as u64;
    let r1 = h; // after checkpoint
    let r2 = r1 + h + CHUNK;
    let r3 = r2 + h; // zero record
    let commit = r3 + h + CHUNK;
    assert_eq!(fs::metadata(journal_path(d)).unwrap().len(), commit + h);
    (seeds1, seeds2, vec![r1, r2, r3], commit)
}

#[test]
fn corrupt_record_inside_committed_cg_is_refused() {
    // Flip a payload byte, a header byte, a zero-record byte.
    for (which, delta) in [(0usize, 48 + 100), (2, 17), (1, 30)] {
        let d = dirs();
        let (seeds1, _, recs, commit) = durable_unapplied(&d);
        let off = recs[which];
        flip_byte(&journal_path(&d), off + delta);
        let e = open(&d).err().expect("must refuse");
        eprintln!("{e}");
        match e {
            Error::Corrupt {
                offset,
                cg,
                commit_offset,
                ..
            } => {
                assert_eq!((offset, cg, commit_offset), (off, 2, commit));
            }
            other => panic!("{other}"),
        }
        // Nothing of CG 2 applied; still refuses on every open; evidence kept.
        assert_eq!(read_image(&d), image_of(&seeds1));
        assert!(matches!(open(&d), Err(Error::Corrupt { .. })));
        // Operator path: reset to syncing, then a full resync.
        ReplicaStore::reset_to_syncing(&d.state).unwrap();
        let (mut s, _) = open(&d).unwrap();
        assert!(matches!(s.state(), ReplicaState::Syncing { .. }));
        assert_eq!(s.last_committed_cg(), None);
        s.begin_sync(NCHUNKS).unwrap();
        for i in 0..NCHUNKS {
            s.sync_chunk(i, &content(77, i)).unwrap();
        }
        s.finish_sync(5, 5000).unwrap();
        assert_eq!(read_image(&d), image_of(&[77; NCHUNKS as usize]));
    }
}

#[test]
fn corrupt_last_commit_record_is_a_torn_tail() {
    let d = dirs();
    let (seeds1, _, _, commit) = durable_unapplied(&d);
    flip_byte(&journal_path(&d), commit + 20);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.torn_tail_at, Some(commit));
    assert_eq!(rep.replayed_cg, None);
    assert_eq!(rep.discarded_records, 3);
    assert_eq!(s.last_committed_cg(), Some(1));
    assert_eq!(read_image(&d), image_of(&seeds1));
}

#[test]
fn tail_truncation_at_every_length() {
    let d = dirs();
    let (seeds1, seeds2, _, commit) = durable_unapplied(&d);
    let full = fs::read(journal_path(&d)).unwrap();
    // Append a partial CG 3 after the commit: one full data record and one zero record.
    let gen = Header::decode(&full[..HEADER_LEN]).unwrap().gen;
    let mut j = full.clone();
    let p = content(33, 8);
    j.extend_from_slice(&Header::new(RecordType::Data, gen, 3, 8, 1, CHUNK as u32).encode(&p));
    j.extend_from_slice(&p);
    j.extend_from_slice(&Header::new(RecordType::Zero, gen, 3, 9, 1, 0).encode(&[]));
    let commit_end = commit + HEADER_LEN as u64;
    let mut len = j.len() as u64;
    loop {
        fs::write(journal_path(&d), &j[..len as usize]).unwrap();
        let (s, rep) = open(&d).unwrap_or_else(|e| panic!("len {len}: {e}"));
        let expect2 = len >= commit_end;
        assert_eq!(
            s.last_committed_cg(),
            Some(if expect2 { 2 } else { 1 }),
            "len {len}"
        );
        assert_eq!(
            read_image(&d),
            image_of(if expect2 { &seeds2 } else { &seeds1 }),
            "len {len}"
        );
        if expect2 {
            assert_eq!(rep.replayed_cg, Some(2));
        }
        drop(s);
        // Recovery reset the state: put it back (state.json says CG 1 or 2 now; restore 1).
        if expect2 {
            // Once CG 2 is applied and checkpointed it cannot be undone by truncation;
            // rewrite state and image to "CG 1" to keep testing shorter lengths.
            let st_path = d.state.join("state.json");
            let st = fs::read_to_string(&st_path)
                .unwrap()
                .replace("\"last_committed_cg\": 2", "\"last_committed_cg\": 1");
            fs::write(&st_path, st).unwrap();
            fs::write(&d.image, image_of(&seeds1)).unwrap();
        }
        if len == 0 {
            break;
        }
        len = len.saturating_sub(if len > commit_end + 64 || len < 200 {
            13
        } else {
            1
        });
    }
}

#[test]
fn staging_is_bounded_however_many_cgs_fail() {
    let d = dirs();
    let (mut s, _) = synced(&d);
    s.set_compact_min_dead_bytes(4 * CHUNK);
    let per_record = HEADER_LEN as u64 + CHUNK;
    let live_max = NCHUNKS * per_record;
    let bound = HEADER_LEN as u64 + 2 * live_max + 4 * CHUNK + per_record;
    let mut max_seen = 0;
    for cg in 2..400u64 {
        // Each CG is abandoned after re-shipping a few chunks.
        for k in 0..5 {
            let i = (cg * 7 + k) % NCHUNKS;
            s.stage_chunk(cg, i, ChunkData::Bytes(&content(cg * 10 + k + 1, i)))
                .unwrap();
            max_seen = max_seen.max(s.journal_bytes());
            assert!(
                s.journal_bytes() <= bound,
                "{} > {bound}",
                s.journal_bytes()
            );
        }
    }
    eprintln!("max journal {max_seen} bytes, bound {bound}, live max {live_max}");
    assert_eq!(s.staged_chunks(), NCHUNKS);
    // And the latest versions are what a commit applies.
    let mut expect: Vec<u64> = vec![0; NCHUNKS as usize];
    for cg in 2..400u64 {
        for k in 0..5 {
            expect[((cg * 7 + k) % NCHUNKS) as usize] = cg * 10 + k + 1;
        }
    }
    s.commit(400, 1).unwrap();
    assert_eq!(read_image(&d), image_of(&expect));
}

#[test]
fn promote_and_rejoin() {
    let d = dirs();
    let (mut s, seeds) = synced(&d);
    stage(&mut s, 2, &[(0, 5)]);
    s.promote().unwrap();
    assert_eq!(s.state(), ReplicaState::Promoted);
    assert!(matches!(
        s.stage_chunk(3, 0, ChunkData::Zero),
        Err(Error::InvalidState(_))
    ));
    drop(s);
    let (mut s, _) = open(&d).unwrap();
    assert_eq!(s.state(), ReplicaState::Promoted);
    assert_eq!(read_image(&d), image_of(&seeds));
    // Failback: rejoin as secondary with an incremental resync of two chunks.
    s.begin_sync(2).unwrap();
    s.sync_chunk(0, &content(50, 0)).unwrap();
    s.sync_zero(1).unwrap();
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: 2,
            total_chunks: 2
        }
    );
    s.finish_sync(9, 9000).unwrap();
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 9,
            frozen_at_unix_us: 9000
        }
    );
}

// ---------------------------------------------------------------- property test

#[derive(Clone, Debug)]
enum End {
    Commit,
    Abandon,
    LinkLoss,
}

#[derive(Clone, Debug)]
struct Step {
    /// (chunk, seed (0 = zero chunk), stage as the previous CG number ("late" chunk))
    writes: Vec<(u64, u64, bool)>,
    end: End,
    crash: Option<CrashPoint>,
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
            (
                prop_oneof![0..NCHUNKS, 0..3u64],
                prop_oneof![3 => 1u64..1000, 1 => Just(0u64)],
                proptest::bool::weighted(0.15),
            ),
            0..10,
        ),
        prop_oneof![6 => Just(End::Commit), 2 => Just(End::Abandon), 1 => Just(End::LinkLoss)],
        proptest::option::weighted(0.3, crash_point()),
    )
        .prop_map(|(writes, end, crash)| Step { writes, end, crash })
}

/// Expected state: committed chunk seeds, last CG, and the staged (newest) versions.
struct Model {
    seeds: Vec<u64>,
    cg: u64,
    frozen: u64,
    staged: HashMap<u64, (u64, u64)>,
}

impl Model {
    fn stage(&mut self, cg: u64, i: u64, seed: u64) -> StageOutcome {
        if cg <= self.cg {
            return StageOutcome::AlreadyCommitted;
        }
        if self.staged.get(&i).is_some_and(|&(c, _)| c > cg) {
            return StageOutcome::Superseded;
        }
        self.staged.insert(i, (cg, seed));
        StageOutcome::Staged
    }
    fn commit(&mut self, cg: u64) {
        for (i, (_, seed)) in self.staged.drain() {
            self.seeds[i as usize] = seed;
        }
        self.cg = cg;
        self.frozen = cg * 1000;
    }
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
    prop_assert!(
        read_image(d) == image_of(&m.seeds),
        "image differs from CG {} ({})",
        m.cg,
        ctx
    );
    Ok(())
}

fn run_steps(steps: Vec<Step>, compact: bool) -> std::result::Result<(), TestCaseError> {
    let d = dirs();
    let (mut s, seeds) = synced(&d);
    let mut m = Model {
        seeds,
        cg: 1,
        frozen: 1000,
        staged: HashMap::new(),
    };
    let min_dead = if compact { 0 } else { 64 << 20 };
    s.set_compact_min_dead_bytes(min_dead);
    for (n, st) in steps.into_iter().enumerate() {
        let cg = n as u64 + 2;
        if let Some(p) = st.crash {
            crash(&mut s, p);
        }
        // Which operation crashed, if any.
        let mut crashed: Option<&str> = None;
        for &(i, seed, late) in &st.writes {
            let c = if late { cg - 1 } else { cg };
            let data = content(seed, i);
            let r = if seed == 0 && i % 2 == 0 {
                s.stage_chunk(c, i, ChunkData::Zero)
            } else {
                s.stage_chunk(c, i, ChunkData::Bytes(&data)) // seed 0 & odd: all-zero bytes
            };
            match r {
                Ok(out) => prop_assert_eq!(out, m.stage(c, i, seed)),
                Err(Error::InjectedCrash(_)) => {
                    crashed = Some("stage");
                    break;
                }
                Err(e) => return Err(TestCaseError::fail(format!("stage: {e}"))),
            }
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
                    crashed = Some(match st.end {
                        End::Commit => "commit",
                        _ => "discard",
                    });
                    if matches!(st.end, End::Commit) && p.commit_survives() {
                        m.commit(cg);
                    }
                }
                Err(e) => return Err(TestCaseError::fail(format!("{:?}: {e}", st.end))),
            }
        }
        let ctx = format!("step {n} cg {cg} {:?} crashed in {crashed:?}", st.crash);
        if std::env::var("DRBLK_TEST_VERBOSE").is_ok() && crashed.is_some() {
            eprintln!("CRASH {:?} in {crashed:?} -> CG {}", st.crash, m.cg);
        }
        if crashed.is_some() {
            drop(s);
            m.staged.clear(); // recovery drops everything uncommitted
            let (s2, _rep) = open(&d).map_err(|e| TestCaseError::fail(format!("reopen: {e}")))?;
            s = s2;
            s.set_compact_min_dead_bytes(min_dead);
        } else {
            s.set_crash_point(None);
        }
        check(&d, &s, &m, &ctx)?;
    }
    // Final: a clean reopen changes nothing (staged data dropped).
    drop(s);
    m.staged.clear();
    let (s, _) = open(&d).map_err(|e| TestCaseError::fail(format!("final reopen: {e}")))?;
    check(&d, &s, &m, "final reopen")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_cgs_with_crashes(steps in proptest::collection::vec(step(), 1..14), compact in any::<bool>()) {
        run_steps(steps, compact)?;
    }
}

// ---------------------------------------------------------------- real process, kill -9

const CHILD_ENV: &str = "DRBLK_TEST_SECONDARY_CHILD_DIR";

/// Seed of chunk `i` in CG `cg` in the child workload: every CG rewrites every chunk.
fn child_seed(cg: u64, i: u64) -> u64 {
    if (cg + i).is_multiple_of(5) {
        0
    } else {
        cg * 100 + i + 1
    }
}

/// Not a test on its own: the body of the child process (does nothing unless the
/// environment variable is set). Commits CGs forever, each rewriting every chunk.
#[test]
fn child_process_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let d = Dirs {
        _tmp: tempfile::tempdir().unwrap(),
        image: Path::new(&dir).join("image.raw"),
        state: Path::new(&dir).join("state"),
    };
    // Deferred checkpoints unless a crash point inside the checkpoint must be reached.
    let policy = match std::env::var(CHILD_CHECKPOINT_ENV).as_deref() {
        Ok("every") => CheckpointPolicy::EVERY_CG,
        _ => CheckpointPolicy::default(),
    };
    let (mut s, _) = open_with(&d, policy).unwrap();
    if s.last_committed_cg().is_none() {
        s.begin_sync(NCHUNKS).unwrap();
        for i in 0..NCHUNKS {
            s.sync_chunk(i, &content(child_seed(1, i).max(1), i))
                .unwrap();
        }
        s.finish_sync(1, 0).unwrap();
        panic!("child: synced only"); // parent expects a synced replica first
    }
    loop {
        let cg = s.last_committed_cg().unwrap() + 1;
        for i in 0..NCHUNKS {
            let seed = child_seed(cg, i);
            let data = content(seed, i);
            let c = if seed == 0 {
                ChunkData::Zero
            } else {
                ChunkData::Bytes(&data)
            };
            s.stage_chunk(cg, i, c).unwrap();
        }
        s.commit(cg, cg).unwrap();
    }
}

const CHILD_CHECKPOINT_ENV: &str = "DRBLK_TEST_CHILD_CHECKPOINT";

fn spawn_child(dir: &Path, crash_at: Option<&str>) -> std::process::Child {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "replica::tests::child_process_writer",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_ENV, dir)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    if let Some(p) = crash_at {
        c.env("DRBLK_SECONDARY_CRASH_AT", p);
        c.env(CHILD_CHECKPOINT_ENV, "every");
    }
    c.spawn().unwrap()
}

fn check_uniform(d: &Dirs) -> u64 {
    let (s, rep) = open(d).unwrap();
    let cg = s.last_committed_cg().unwrap();
    let expect: Vec<u64> = (0..NCHUNKS)
        .map(|i| {
            if cg == 1 {
                child_seed(1, i).max(1)
            } else {
                child_seed(cg, i)
            }
        })
        .collect();
    assert_eq!(
        read_image(d),
        image_of(&expect),
        "image is not exactly CG {cg} ({rep:?})"
    );
    cg
}

#[test]
fn kill_9_child_process_recovers_to_a_committed_cg() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Dirs {
        image: tmp.path().join("image.raw"),
        state: tmp.path().join("state"),
        _tmp: tempfile::tempdir().unwrap(),
    };
    // Initial sync (the child exits after it).
    let st = spawn_child(tmp.path(), None).wait().unwrap();
    assert!(!st.success());
    assert_eq!(check_uniform(&d), 1);
    let mut last = 1;
    for round in 0..6u64 {
        let mut child = spawn_child(tmp.path(), None);
        std::thread::sleep(std::time::Duration::from_millis(150 + 37 * round));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let cg = check_uniform(&d);
        eprintln!("round {round}: killed, recovered at CG {cg}");
        assert!(cg >= last);
        last = cg;
    }
    // Abort at a precise point inside apply: that CG must survive.
    for p in [
        "MidApply:5",
        "AfterCommitDurable",
        "BeforeJournalReset",
        "TornCommitRecord",
    ] {
        let st = spawn_child(tmp.path(), Some(p)).wait().unwrap();
        assert!(!st.success());
        let cg = check_uniform(&d);
        let expect = if p == "TornCommitRecord" {
            last
        } else {
            last + 1
        };
        assert_eq!(cg, expect, "{p}");
        last = cg;
    }
}

/// The apply writes the records the commit verified from its copies, and reads the ones
/// past the copies' bound again: a record corrupted on disk after the commit is still
/// applied from its copy, and one past the bound is read and refused.
#[test]
fn apply_writes_the_commits_verified_copies_and_rereads_past_their_bound() {
    let d = dirs();
    let (mut s, mut seeds) = synced(&d);
    // Room for the first two records only (chunks of `CHUNK` bytes, one record each).
    s.copies = super::copies::RecordCopies::with_limit(2 * CHUNK as usize);
    let w = [(1, 41), (6, 42), (9, 43), (11, 0), (3, 44)];
    let offsets: Vec<u64> = w
        .iter()
        .map(|&(i, seed)| {
            let before = s.journal_bytes();
            stage(&mut s, 2, &[(i, seed)]);
            before
        })
        .collect();
    s.commit_durable(2, 2000).unwrap();
    apply_to(&mut seeds, &w);
    // The first record's payload, corrupted after the commit verified it.
    flip_byte(&journal_path(&d), offsets[0] + HEADER_LEN as u64 + 5);
    s.apply_in_place().unwrap();
    assert_eq!(
        read_image(&d),
        image_of(&seeds),
        "applied from the copies and rereads"
    );
    drop(s);

    // The same group with no room for copies: the corrupted record is read, and refused.
    let d = dirs();
    let (mut s, _) = synced(&d);
    s.copies = super::copies::RecordCopies::with_limit(0);
    let at = s.journal_bytes();
    stage(&mut s, 2, &w[..1]);
    s.commit_durable(2, 2000).unwrap();
    flip_byte(&journal_path(&d), at + HEADER_LEN as u64 + 5);
    assert!(matches!(s.apply_in_place(), Err(Error::Corrupt { .. })));
}
