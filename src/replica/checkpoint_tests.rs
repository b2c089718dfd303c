//! Deferred checkpoints: an applied CG lives in the image's page cache and in the journal
//! until a checkpoint; every path that drops journal records (reset, compaction, promote)
//! must checkpoint first, and a crash anywhere recovers every committed CG.

use std::time::Duration;

use super::tests::{
    apply_to, crash, dirs, image_of, is_crash, journal_path, open, open_with, read_image, stage,
    synced, Dirs, CHUNK, DISK,
};
use super::*;

/// Checkpoint only when the journal passes `bytes` (never by time).
fn at_bytes(bytes: u64) -> CheckpointPolicy {
    CheckpointPolicy {
        max_journal_bytes: bytes,
        max_interval: Duration::from_secs(3600),
    }
}

/// A synced replica (CG 1) that defers checkpoints (journal limit `bytes`).
fn deferred(d: &Dirs, bytes: u64) -> (ReplicaStore, Vec<u64>) {
    let (mut s, seeds) = synced(d);
    s.set_checkpoint_policy(at_bytes(bytes));
    (s, seeds)
}

fn state_file_cg(d: &Dirs) -> u64 {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.state.join("state.json")).unwrap()).unwrap();
    v["last_committed_cg"].as_u64().unwrap()
}

/// CG `cg` rewrites chunks `cg % 5`, 7 and 12 (the disk's short last chunk).
fn writes(cg: u64) -> [(u64, u64); 3] {
    [(cg % 5, cg * 10), (7, cg * 10 + 1), (12, cg * 10 + 2)]
}

fn commit_cgs(s: &mut ReplicaStore, seeds: &mut [u64], cgs: std::ops::RangeInclusive<u64>) {
    for cg in cgs {
        stage(s, cg, &writes(cg));
        s.commit(cg, cg * 1000).unwrap();
        apply_to(seeds, &writes(cg));
    }
}

fn assert_consistent(s: &ReplicaStore, d: &Dirs, seeds: &[u64], cg: u64) {
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg,
            frozen_at_unix_us: cg * 1000
        }
    );
    assert_eq!(read_image(d), image_of(seeds), "image is not CG {cg}");
}

#[test]
fn applied_cgs_are_readable_at_once_and_replayed_after_a_crash() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, u64::MAX);
    commit_cgs(&mut s, &mut seeds, 2..=5);
    // Readers see every applied CG at once; state.json still names the synced CG and the
    // journal keeps the four commits.
    assert_consistent(&s, &d, &seeds, 5);
    assert_eq!(state_file_cg(&d), 1);
    assert!(s.journal_bytes() > 4 * 2 * 1024);
    drop(s); // a crash: Drop writes nothing
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, Some(5));
    assert_consistent(&s, &d, &seeds, 5);
    assert_eq!(state_file_cg(&d), 5);
}

#[test]
fn the_journal_is_checkpointed_once_past_its_limit() {
    let d = dirs();
    let limit = 8 << 10;
    let (mut s, mut seeds) = deferred(&d, limit);
    let mut checkpoints = 0;
    let mut before = s.journal_bytes();
    for cg in 2..=30 {
        commit_cgs(&mut s, &mut seeds, cg..=cg);
        let now = s.journal_bytes();
        if now < before {
            checkpoints += 1;
            assert_eq!(
                now,
                format::HEADER_LEN as u64,
                "a checkpoint resets the journal"
            );
            assert_eq!(state_file_cg(&d), cg);
        }
        // At most the limit plus one CG (three chunks, their headers and a commit record).
        assert!(
            now < limit + 4 * (1024 + format::HEADER_LEN as u64),
            "{now}"
        );
        before = now;
    }
    assert!(checkpoints >= 5, "{checkpoints} checkpoints");
    assert_consistent(&s, &d, &seeds, 30);
}

#[test]
fn a_link_loss_after_deferred_commits_keeps_them() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, u64::MAX);
    commit_cgs(&mut s, &mut seeds, 2..=3);
    stage(&mut s, 4, &[(1, 41), (2, 42)]);
    s.discard_uncommitted().unwrap();
    // The reset that dropped CG 4 checkpointed CGs 2 and 3 first.
    assert_eq!(state_file_cg(&d), 3);
    assert_eq!(s.journal_bytes(), format::HEADER_LEN as u64);
    drop(s);
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, None);
    assert_consistent(&s, &d, &seeds, 3);
}

#[test]
fn a_compaction_after_deferred_commits_keeps_them() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, u64::MAX);
    commit_cgs(&mut s, &mut seeds, 2..=4);
    s.set_compact_min_dead_bytes(0);
    // Rewriting one chunk makes dead > live: the journal is compacted, which drops the
    // committed records, so CGs 2..4 are checkpointed first.
    for seed in [51, 52, 53] {
        stage(&mut s, 5, &[(9, seed)]);
    }
    assert_eq!(state_file_cg(&d), 4);
    drop(s); // crash before CG 5 commits
    let (s, rep) = open(&d).unwrap();
    assert_eq!(rep.replayed_cg, None);
    assert_consistent(&s, &d, &seeds, 4);
}

#[test]
fn committed_records_alone_never_force_a_compaction() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, u64::MAX);
    s.set_compact_min_dead_bytes(0);
    // Every group rewrites chunk 7: the journal holds many superseded committed records.
    commit_cgs(&mut s, &mut seeds, 2..=20);
    let grown = s.journal_bytes();
    // Staging the next group (one chunk, nothing superseded after the last commit) leaves
    // them to the checkpoint: no compaction, hence no early image fsync.
    stage(&mut s, 21, &[(3, 2101)]);
    assert!(s.journal_bytes() > grown, "the journal was compacted");
    assert_eq!(state_file_cg(&d), 1, "a checkpoint was forced");
    // What follows the last commit still compacts once it is mostly dead.
    for seed in [2102, 2103] {
        stage(&mut s, 21, &[(3, seed)]);
    }
    assert!(
        s.journal_bytes() < grown,
        "the uncommitted part was not compacted"
    );
    assert_eq!(state_file_cg(&d), 20);
    s.commit(21, 21_000).unwrap();
    apply_to(&mut seeds, &[(3, 2103)]);
    drop(s);
    let (s, _) = open(&d).unwrap();
    assert_consistent(&s, &d, &seeds, 21);
}

#[test]
fn promotion_after_deferred_commits_holds_the_last_one() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, u64::MAX);
    commit_cgs(&mut s, &mut seeds, 2..=3);
    stage(&mut s, 4, &[(1, 41)]);
    s.promote().unwrap();
    drop(s);
    let (s, _) = open(&d).unwrap();
    assert_eq!(s.state(), ReplicaState::Promoted);
    assert_eq!(read_image(&d), image_of(&seeds));
    assert_eq!(state_file_cg(&d), 3);
}

#[test]
fn every_crash_point_of_a_deferred_checkpoint() {
    // CGs 2 and 3 are deferred; CG 4 passes the limit and checkpoints all three.
    let points = [
        CrashPoint::AfterCommitDurable,
        CrashPoint::MidApply(0),
        CrashPoint::MidApply(2),
        CrashPoint::BeforeImageSync,
        CrashPoint::MidStateWrite,
        CrashPoint::BeforeJournalReset,
        CrashPoint::MidJournalReset,
    ];
    for p in points {
        let d = dirs();
        let (mut s, mut seeds) = deferred(&d, u64::MAX);
        commit_cgs(&mut s, &mut seeds, 2..=3);
        s.set_checkpoint_policy(at_bytes(0));
        crash(&mut s, p);
        stage(&mut s, 4, &writes(4));
        is_crash(s.commit(4, 4000), p);
        drop(s);
        let (s, rep) = open_with(&d, at_bytes(u64::MAX)).unwrap();
        // Every point is past the durable commit record: CG 4 survives, with 2 and 3.
        apply_to(&mut seeds, &writes(4));
        assert_consistent(&s, &d, &seeds, 4);
        eprintln!("{p:?}: {rep:?}");
    }
}

#[test]
fn the_journal_after_a_checkpoint_holds_only_a_checkpoint_record() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, 0);
    commit_cgs(&mut s, &mut seeds, 2..=2);
    assert_eq!(s.journal_bytes(), format::HEADER_LEN as u64);
    assert_eq!(state_file_cg(&d), 2);
    drop(s);
    // Read back, the file (reused, so longer) holds one checkpoint record of CG 2 and
    // nothing committed after it.
    let mut j = journal::Journal::open(&d.state).unwrap();
    let scan = j
        .scan(&[journal::Geometry::new(DISK, CHUNK).unwrap()])
        .unwrap();
    assert_eq!((scan.base_cg, scan.last_commit), (2, None));
    assert_eq!(scan.committed_end, format::HEADER_LEN as u64);
    assert!(scan.committed.is_empty());
}

#[test]
fn a_reused_journal_never_replays_an_earlier_generation() {
    let d = dirs();
    let (mut s, mut seeds) = deferred(&d, u64::MAX);
    // Five CGs in one generation: chunk 7 has five versions in it, each older than the next.
    commit_cgs(&mut s, &mut seeds, 2..=6);
    let old_len = s.journal_bytes();
    // A checkpoint resets the journal: a new generation overwrites the file from its start.
    s.set_checkpoint_policy(CheckpointPolicy::EVERY_CG);
    commit_cgs(&mut s, &mut seeds, 7..=7);
    s.set_checkpoint_policy(at_bytes(u64::MAX));
    // One short CG: its records cover only the start of the old generation's.
    stage(&mut s, 8, &[(3, 83)]);
    s.commit(8, 8000).unwrap();
    apply_to(&mut seeds, &[(3, 83)]);
    // And a group that never commits.
    stage(&mut s, 9, &[(7, 97)]);
    let new_len = s.journal_bytes();
    assert!(new_len < old_len);
    assert!(
        std::fs::metadata(journal_path(&d)).unwrap().len() >= old_len,
        "the file is reused: the old generation's bytes follow the new one's"
    );
    drop(s); // a crash
    let (s, rep) = open(&d).unwrap();
    // Only CG 8's one chunk is replayed; nothing of CGs 2..=6 (stale) or 9 (uncommitted).
    assert_eq!(
        (rep.replayed_cg, rep.chunks_applied),
        (Some(8), 1),
        "{rep:?}"
    );
    assert_consistent(&s, &d, &seeds, 8);
    assert_eq!(s.journal_bytes(), format::HEADER_LEN as u64);
}
