//! A store of two disks (doc/design/multi-disk-groups.md §3): one journal and one commit
//! record make every disk's part of a group durable together, so a crash at any point
//! recovers both images to the same group.

use std::fs;
use std::path::PathBuf;

use super::tests::{content, crash, is_crash};
use super::*;

const CHUNK: u64 = 1024;
/// Disk 0: 13 chunks, the last one short; disk 1: 8 chunks, the last one short.
const SIZES: [u64; 2] = [12 * CHUNK + 300, 7 * CHUNK + 100];
const UUIDS: [[u8; 16]; 2] = [*b"group-disk-0....", *b"group-disk-1...."];

struct Group {
    _tmp: tempfile::TempDir,
    images: Vec<PathBuf>,
    state: PathBuf,
}

fn group() -> Group {
    let tmp = tempfile::tempdir().unwrap();
    Group {
        images: vec![tmp.path().join("a.img"), tmp.path().join("b.img")],
        state: tmp.path().join("state"),
        _tmp: tmp,
    }
}

fn spec(g: &Group) -> GroupSpec {
    GroupSpec {
        disks: (0..2)
            .map(|d| DiskSpec {
                image: g.images[d].clone(),
                uuid: UUIDS[d],
                size: SIZES[d],
            })
            .collect(),
        chunk_size: CHUNK,
    }
}

fn open(g: &Group) -> Result<(ReplicaStore, RecoveryReport)> {
    let (mut s, r) = ReplicaStore::open(&spec(g), &g.state)?;
    s.set_checkpoint_policy(CheckpointPolicy::EVERY_CG);
    Ok((s, r))
}

fn chunks(d: usize) -> u64 {
    SIZES[d].div_ceil(CHUNK)
}

/// Per disk, per chunk: the seed of its content (0 = zeros). Disk 1's seeds are offset so
/// that the two disks never hold the same bytes.
type Model = [Vec<u64>; 2];

fn chunk_bytes(d: usize, seed: u64, i: u64) -> Vec<u8> {
    let len = CHUNK.min(SIZES[d] - i * CHUNK) as usize;
    if seed == 0 {
        return vec![0; len];
    }
    let mut v = content(seed + 7919 * d as u64, 0);
    v.resize(len, 0);
    v
}

fn image_of(d: usize, m: &Model) -> Vec<u8> {
    (0..chunks(d))
        .flat_map(|i| chunk_bytes(d, m[d][i as usize], i))
        .collect()
}

fn read_images(g: &Group) -> [Vec<u8>; 2] {
    [0, 1].map(|d| {
        let mut v = fs::read(&g.images[d]).unwrap();
        v.truncate(SIZES[d] as usize);
        v
    })
}

fn assert_images(g: &Group, m: &Model, what: &str) {
    for (d, img) in read_images(g).iter().enumerate() {
        assert!(*img == image_of(d, m), "{what}: disk {d} differs");
    }
}

/// A new group, synced as CG 1 (both disks), and its model.
fn synced(g: &Group) -> (ReplicaStore, Model) {
    let (mut s, rep) = open(g).unwrap();
    assert!(rep.created);
    let total = chunks(0) + chunks(1);
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: 0,
            total_chunks: total
        }
    );
    let m: Model = [0, 1].map(|d| (0..chunks(d)).map(|i| 100 + i).collect());
    for d in [1, 0] {
        for i in 0..chunks(d) {
            let b = chunk_bytes(d, m[d][i as usize], i);
            s.sync_extent(d, i, 1, ChunkData::Bytes(&b)).unwrap();
        }
    }
    assert_eq!(
        s.state(),
        ReplicaState::Syncing {
            done_chunks: total,
            total_chunks: total
        }
    );
    s.finish_sync(1, 1).unwrap();
    assert_images(g, &m, "after the sync");
    (s, m)
}

/// Stages `writes` (disk, chunk, seed) as CG `cg`; returns the first error.
fn stage(s: &mut ReplicaStore, cg: u64, writes: &[(usize, u64, u64)]) -> Result<()> {
    for &(d, i, seed) in writes {
        let bytes = chunk_bytes(d, seed, i);
        let data = if seed == 0 {
            ChunkData::Zero
        } else {
            ChunkData::Bytes(&bytes)
        };
        s.stage_extent(d, cg, i, 1, data)?;
    }
    Ok(())
}

fn apply(m: &mut Model, writes: &[(usize, u64, u64)]) {
    for &(d, i, seed) in writes {
        m[d][i as usize] = seed;
    }
}

#[test]
fn a_crash_at_any_point_recovers_both_disks_to_the_same_group() {
    let mut points: Vec<CrashPoint> = fault::ALL_SIMPLE.to_vec();
    points.extend((0..9).map(CrashPoint::MidApply));
    points.push(CrashPoint::BetweenImageSyncs(1));
    // Disk 1's chunks first, then disk 0's, in the journal: apply order is by record, so a
    // `MidApply(k)` stops with one disk written and the other not.
    // Chunk 0 of disk 1 three times: the dead versions let a compaction run while staging.
    let w3 = [
        (1, 0, 41),
        (1, 0, 42),
        (1, 0, 31),
        (1, 7, 0),
        (0, 12, 32),
        (1, 3, 33),
        (0, 0, 34),
        (0, 1, 35),
        (1, 4, 36),
        (0, 5, 0),
    ];
    for p in points {
        let g = group();
        let (mut s, mut m) = synced(&g);
        let w2 = [(0, 2, 21), (1, 2, 22), (1, 6, 0)];
        stage(&mut s, 2, &w2).unwrap();
        s.commit(2, 2).unwrap();
        apply(&mut m, &w2);
        s.set_compact_min_dead_bytes(0);
        crash(&mut s, p);
        let crashed = match stage(&mut s, 3, &w3).and_then(|()| s.commit(3, 3)) {
            Ok(()) => None,
            Err(Error::InjectedCrash(q)) if q == p => Some(p),
            Err(e) => panic!("{p:?}: {e}"),
        };
        drop(s);
        let (s, rep) = open(&g).unwrap();
        let staged_only = crashed == Some(CrashPoint::AfterStage);
        let survives = crashed.is_none() || (!staged_only && p.commit_survives());
        if survives {
            apply(&mut m, &w3);
        }
        let cg = if survives { 3 } else { 2 };
        assert_eq!(s.last_committed_cg(), Some(cg), "{p:?} {rep:?}");
        assert_images(&g, &m, &format!("{p:?} (crashed: {crashed:?})"));
        eprintln!(
            "{p:?}: crashed {}, both disks at CG {cg}, {rep:?}",
            crashed.is_some()
        );
    }
}

#[test]
fn a_crash_during_a_group_sync_leaves_every_disk_syncing() {
    for (p, disk) in [
        (CrashPoint::AfterSyncChunk, 1),
        (CrashPoint::BetweenImageSyncs(1), 0),
        (CrashPoint::BeforeFinishSyncState, 0),
    ] {
        let g = group();
        let (mut s, _) = open(&g).unwrap();
        for i in 0..chunks(0) {
            s.sync_extent(0, i, 1, ChunkData::Bytes(&chunk_bytes(0, 5, i)))
                .unwrap();
        }
        crash(&mut s, p);
        let mut r = Ok(());
        for i in 0..chunks(1) {
            r = s.sync_extent(1, i, 1, ChunkData::Bytes(&chunk_bytes(1, 5, i)));
            if r.is_err() {
                break;
            }
        }
        if r.is_ok() {
            r = s.finish_sync(1, 1);
        }
        is_crash(r, p);
        drop(s);
        let (mut s, _) = open(&g).unwrap();
        assert_eq!(
            s.state(),
            ReplicaState::Syncing {
                done_chunks: 0,
                total_chunks: chunks(0) + chunks(1)
            },
            "{p:?} (disk {disk})"
        );
        assert!(matches!(
            s.stage_extent(disk, 2, 0, 1, ChunkData::Zero),
            Err(Error::InvalidState(_))
        ));
    }
}

#[test]
fn a_group_reopens_only_as_the_same_disks_in_the_same_order() {
    let g = group();
    let (mut s, m) = synced(&g);
    // Checksums and bounds are per disk.
    let want: Vec<u32> = (0..chunks(1))
        .map(|i| crc32c::crc32c(&chunk_bytes(1, m[1][i as usize], i)))
        .collect();
    assert_eq!(s.checksums(1, 0, chunks(1)).unwrap(), want);
    assert!(matches!(
        s.checksums(1, chunks(1) - 1, 2),
        Err(Error::InvalidArgument(_))
    ));
    for (d, first) in [(2, 0), (1, chunks(1))] {
        let e = s.stage_extent(d, 2, first, 1, ChunkData::Zero).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        eprintln!("{e}");
    }
    assert!(s.set_image_observer(2, None).is_err());
    drop(s);

    let mismatch = |spec: GroupSpec, field: &str| {
        let e = ReplicaStore::open(&spec, &g.state).err().unwrap();
        eprintln!("{e}");
        assert!(
            matches!(&e, Error::IdentityMismatch { field: f, .. } if f == field),
            "{e}"
        );
    };
    let mut one = spec(&g);
    one.disks.pop();
    mismatch(one, "number of disks");
    let mut swapped = spec(&g);
    swapped.disks.swap(0, 1);
    mismatch(swapped, "disk uuid of disk 0");
    let mut bigger = spec(&g);
    bigger.disks[1].size += 512;
    mismatch(bigger, "disk size of disk 1");

    let mut twice = spec(&g);
    twice.disks[1].image = twice.disks[0].image.clone();
    let e = ReplicaStore::open(&twice, &g.state).err().unwrap();
    assert!(e.to_string().contains("given twice"), "{e}");
    let mut same_uuid = spec(&g);
    same_uuid.disks[1].uuid = UUIDS[0];
    let e = ReplicaStore::open(&same_uuid, &g.state).err().unwrap();
    assert!(e.to_string().contains("same uuid"), "{e}");

    // What the state directory says of the group, and the spec it gives back.
    let stored = stored_group(&g.state).unwrap().unwrap();
    assert_eq!(stored.chunk_size, CHUNK);
    assert_eq!(stored.disks.len(), 2);
    assert_eq!(
        stored.disks[1].image.as_deref(),
        Some(g.images[1].as_path())
    );
    assert_eq!(stored.spec(&g.images).unwrap(), spec(&g));
    assert!(stored.spec(&g.images[..1]).is_err());
    let (s, _) = open(&g).unwrap();
    assert_eq!(s.disks(), 2);
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 1,
            frozen_at_unix_us: 1
        }
    );
}

#[test]
fn a_format_1_state_is_read_as_a_group_of_one_and_rewritten_as_format_2() {
    let g = group();
    let one = GroupSpec::single(&g.images[0], SIZES[0], CHUNK, UUIDS[0]);
    {
        let (mut s, _) = ReplicaStore::open(&one, &g.state).unwrap();
        for i in 0..chunks(0) {
            s.sync_extent(0, i, 1, ChunkData::Zero).unwrap();
        }
        s.finish_sync(4, 44).unwrap();
    }
    // What a release before groups wrote.
    let v1 = format!(
        "{{\"format\": 1, \"disk_uuid\": \"{}\", \"disk_size\": {}, \"chunk_size\": {CHUNK}, \
         \"mode\": \"consistent\", \"last_committed_cg\": 4, \"frozen_at_unix_us\": 44}}\n",
        state::uuid_hex(&UUIDS[0]),
        SIZES[0]
    );
    fs::write(g.state.join("state.json"), v1).unwrap();
    let (mut s, _) = ReplicaStore::open(&one, &g.state).unwrap();
    s.set_checkpoint_policy(CheckpointPolicy::EVERY_CG);
    assert_eq!(
        s.state(),
        ReplicaState::Consistent {
            cg: 4,
            frozen_at_unix_us: 44
        }
    );
    s.stage_extent(0, 5, 3, 1, ChunkData::Bytes(&chunk_bytes(0, 9, 3)))
        .unwrap();
    s.commit(5, 55).unwrap();
    let text = fs::read_to_string(g.state.join("state.json")).unwrap();
    let st: state::StateFile = serde_json::from_str(&text).unwrap();
    assert_eq!(st.format, 2, "{text}");
    assert_eq!(st.last_committed_cg, 5);
    assert_eq!(st.disks[0].image.as_deref(), Some(g.images[0].as_path()));
    // A format this release does not know is refused with what it reads.
    fs::write(
        g.state.join("state.json"),
        text.replace("\"format\": 2", "\"format\": 9"),
    )
    .unwrap();
    drop(s);
    let e = ReplicaStore::open(&one, &g.state).err().unwrap();
    assert!(e.to_string().contains("unsupported format 9"), "{e}");
}

#[test]
fn a_disk_joins_a_consistent_group_by_a_copy_and_is_in_the_next_cut() {
    // Crash points on the way: while its copy arrives, between the images' fsyncs of the
    // join, and none.
    for crash_at in [
        Some(CrashPoint::AfterSyncChunk),
        Some(CrashPoint::BetweenImageSyncs(1)),
        None,
    ] {
        let g = group();
        let one = GroupSpec {
            disks: vec![spec(&g).disks[0].clone()],
            chunk_size: CHUNK,
        };
        // Disk 0 alone, consistent at CG 1.
        let (mut s, _) = ReplicaStore::open(&one, &g.state).unwrap();
        s.set_checkpoint_policy(CheckpointPolicy::default());
        let mut m: Model = [
            (0..chunks(0)).map(|i| 100 + i).collect(),
            vec![0; chunks(1) as usize],
        ];
        for i in 0..chunks(0) {
            s.sync_extent(
                0,
                i,
                1,
                ChunkData::Bytes(&chunk_bytes(0, m[0][i as usize], i)),
            )
            .unwrap();
        }
        s.finish_sync(1, 1).unwrap();
        // Disk 1 joins: the group stays consistent at CG 1 and says disk 1 is joining.
        fs::write(&g.images[1], vec![0u8; SIZES[1] as usize]).unwrap();
        assert_eq!(s.add_disk(&spec(&g).disks[1]).unwrap(), 1);
        assert!(s.joining(1) && !s.joining(0));
        assert_eq!(
            s.state(),
            ReplicaState::Consistent {
                cg: 1,
                frozen_at_unix_us: 1
            }
        );
        assert_eq!(s.join_progress(1), Some((0, chunks(1))));
        assert!(matches!(
            s.stage_extent(1, 2, 0, 1, ChunkData::Zero),
            Err(Error::InvalidState(_))
        ));
        // Group 2: a change on disk 0, staged, and disk 1's whole copy, written in place.
        let w2 = [(0, 4, 24)];
        stage(&mut s, 2, &w2).unwrap();
        if let Some(p) = crash_at {
            crash(&mut s, p);
        }
        let mut r = Ok(());
        for i in 0..chunks(1) {
            r = s.sync_extent(1, i, 1, ChunkData::Bytes(&chunk_bytes(1, 60 + i, i)));
            if r.is_err() {
                break;
            }
        }
        let r = r
            .and_then(|()| s.commit(2, 2))
            .and_then(|()| s.finish_joins(2));
        match crash_at {
            Some(p) => is_crash(r, p),
            None => r.unwrap(),
        }
        drop(s);
        let (s, _) = open(&g).unwrap();
        if crash_at.is_none() {
            assert!(!s.joining(1));
            apply(&mut m, &w2);
            m[1] = (0..chunks(1)).map(|i| 60 + i).collect();
            assert_images(&g, &m, "joined");
            assert_eq!(s.last_committed_cg(), Some(2));
            let st: state::StateFile =
                serde_json::from_str(&fs::read_to_string(g.state.join("state.json")).unwrap())
                    .unwrap();
            assert!(st.disks.iter().all(|d| d.joining.is_none()), "{st:?}");
        } else {
            // Still joining: copied again at the next connection; disk 0 is at its last
            // committed group.
            assert!(s.joining(1), "{crash_at:?}");
            let got = read_images(&g);
            let cg = s.last_committed_cg().unwrap();
            if cg == 2 {
                apply(&mut m, &w2);
            }
            assert!(got[0] == image_of(0, &m), "{crash_at:?}: disk 0 at CG {cg}");
        }
    }
}

#[test]
fn a_disk_taken_out_of_the_group_keeps_its_last_group_and_the_others_go_on() {
    let g = group();
    let (mut s, mut m) = synced(&g);
    let w2 = [(0, 1, 21), (1, 2, 22)];
    stage(&mut s, 2, &w2).unwrap();
    s.commit(2, 2).unwrap();
    apply(&mut m, &w2);
    assert!(matches!(
        s.remove_disks(&[0, 1]),
        Err(Error::InvalidArgument(_))
    ));
    // Disk 0 leaves: disk 1 becomes disk 0 of the group.
    assert_eq!(s.remove_disks(&[0]).unwrap(), 2);
    assert_eq!(s.disks(), 1);
    drop(s);
    let left = GroupSpec {
        disks: vec![spec(&g).disks[1].clone()],
        chunk_size: CHUNK,
    };
    let (mut s, _) = ReplicaStore::open(&left, &g.state).unwrap();
    s.set_checkpoint_policy(CheckpointPolicy::EVERY_CG);
    assert_eq!(s.last_committed_cg(), Some(2));
    let w3 = [(0, 3, 33)];
    stage(&mut s, 3, &w3).unwrap();
    s.commit(3, 3).unwrap();
    // The removed image holds CG 2; the group's disk (formerly disk 1) goes on.
    let imgs = read_images(&g);
    assert!(imgs[0] == image_of(0, &m), "the removed disk changed");
    // (The write was staged as disk 0's, so its bytes are those `chunk_bytes(0, ..)` makes.)
    let mut want = image_of(1, &m);
    want[3 * CHUNK as usize..4 * CHUNK as usize].copy_from_slice(&chunk_bytes(0, 33, 3));
    let mut b = fs::read(&g.images[1]).unwrap();
    b.truncate(SIZES[1] as usize);
    assert!(b == want);
    let st: state::StateFile =
        serde_json::from_str(&fs::read_to_string(g.state.join("state.json")).unwrap()).unwrap();
    assert_eq!(st.removed.len(), 1);
    assert_eq!(st.removed[0].left_at_cg, 2);
    assert_eq!(st.removed[0].image.as_deref(), Some(g.images[0].as_path()));
}
