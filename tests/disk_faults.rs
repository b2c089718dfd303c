//! A full or failing disk under a replicating primary, through the real binaries and
//! vhost-user (feature `fault-injection`: `DRBLK_FAULT_WRITES` fails chosen image writes
//! with ENOSPC or EIO). The writes that fail get IOERR and change nothing; every other
//! write succeeds; the daemon keeps serving and replicating; the replica ends
//! byte-identical to the primary; and the failures cost one log line, not one per request.
#![cfg(feature = "fault-injection")]

mod common;

use common::sites::{Sites, SIZE};
use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};

const BLOCK: usize = 4096;

fn run(errno: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let _secondary = s.secondary();
    let plan = format!("{errno},skip=50,fail=100");
    let _primary = s.primary_env(&[], &[("DRBLK_FAULT_WRITES", &plan)]);
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));

    let mut f = TestFrontend::connect(&s.sock(), 2, 256, true).unwrap();
    let blocks = (SIZE as usize / BLOCK) as u64;
    let mut statuses = Vec::new();
    for i in 0..300u64 {
        let block = i * 7 % blocks;
        f.write_mem(DATA_BASE, &[(i % 251) as u8 + 1; BLOCK])
            .unwrap();
        let (st, _) = f
            .request(
                (i % 2) as usize,
                VIRTIO_BLK_T_OUT,
                block * 8,
                &[Desc::r(DATA_BASE, BLOCK as u32)],
            )
            .unwrap();
        statuses.push((block, (i % 251) as u8 + 1, st));
    }
    // Exactly the planned writes failed, with IOERR; the rest succeeded.
    let failed: Vec<usize> = (0..300).filter(|&i| statuses[i].2 != 0).collect();
    assert_eq!(failed, (50..150).collect::<Vec<_>>(), "{statuses:?}");
    assert!(statuses[50..150].iter().all(|s| s.2 == 1), "IOERR");

    // Still serving: reads work, and a drain commits everything on the secondary.
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_IN, 0, &[Desc::w(DATA_BASE, BLOCK as u32)])
        .unwrap();
    assert_eq!(st, 0);
    let _: drblk::control::Drained = common::ctl(&s.sock(), "drain");
    let primary = std::fs::read(tmp.path().join("primary.img")).unwrap();
    let replica = std::fs::read(s.replica()).unwrap();
    assert!(primary == replica, "the replica differs from the primary");
    // Each block holds its last successful write (the failed ones changed nothing).
    let mut want = vec![0u8; blocks as usize];
    for &(block, byte, st) in &statuses {
        if st == 0 {
            want[block as usize] = byte;
        }
    }
    for (b, &byte) in want.iter().enumerate() {
        let got = &primary[b * BLOCK..(b + 1) * BLOCK];
        assert!(
            got.iter().all(|&x| x == byte),
            "block {b}: want {byte}, got {}",
            got[0]
        );
    }
    // A line per 10 s, not per failure: one here (ten would need the hundred writes to
    // take 100 s).
    let log = std::fs::read_to_string(tmp.path().join("primary.log")).unwrap();
    let lines = log.matches("request failed").count();
    assert!((1..=10).contains(&lines), "{lines} lines:\n{log}");
}

#[test]
fn a_full_disk_fails_only_the_writes_that_hit_it_and_replication_goes_on() {
    run("ENOSPC");
}

#[test]
fn a_failing_disk_fails_only_the_writes_that_hit_it_and_replication_goes_on() {
    run("EIO");
}
