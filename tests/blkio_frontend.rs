//! drblk through an independent frontend: libblkio's virtio-blk-vhost-user driver.
//! Data is always checked against the image file on the host.

mod common;

use std::os::unix::fs::MetadataExt;

use drblk_testkit::blkio_client::{BlkioClient, Op};

const SIZE: u64 = 16 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

#[test]
fn writes_reads_flush_on_two_queues_match_the_image() {
    let s = common::start(SIZE, |_| {});
    let mut c = BlkioClient::connect(&s.socket, 2, 1 << 20, false).unwrap();
    assert_eq!(c.capacity(), SIZE);
    assert_eq!(c.num_queues(), 2);
    // Queue 0 writes the first half, queue 1 the second, several requests in flight each.
    for q in 0..2usize {
        for i in 0..8usize {
            let off = (q * 8 + i) * 65536;
            let data = pattern((q * 8 + i) as u8, 65536);
            c.buf()[i * 65536..(i + 1) * 65536].copy_from_slice(&data);
            c.submit(
                q,
                Op::Write {
                    offset: off as u64 * 8,
                    buf: i * 65536,
                    len: 65536,
                },
                i,
            );
        }
        let done = c.wait(q, 8).unwrap();
        assert!(done.iter().all(|&(_, r)| r == 0), "{done:?}");
    }
    c.run(0, Op::Flush).unwrap();
    let image = std::fs::read(&s.disk).unwrap();
    for n in 0..16usize {
        let off = n * 65536 * 8;
        assert_eq!(
            &image[off..off + 65536],
            &pattern(n as u8, 65536)[..],
            "block {n}"
        );
    }
    // Host writes are seen by the guest.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&s.disk)
            .unwrap();
        f.write_all_at(&pattern(77, 4096), 12288).unwrap();
    }
    c.run(
        1,
        Op::Read {
            offset: 12288,
            buf: 0,
            len: 4096,
        },
    )
    .unwrap();
    assert_eq!(&c.buf()[..4096], &pattern(77, 4096)[..]);
}

#[test]
fn discard_punches_holes_and_write_zeroes_zeroes() {
    let s = common::start(SIZE, |_| {});
    let blocks_before = std::fs::metadata(&s.disk).unwrap().blocks();
    let mut c = BlkioClient::connect(&s.socket, 1, 1 << 20, false).unwrap();
    c.run(
        0,
        Op::Discard {
            offset: 1 << 20,
            len: 4 << 20,
        },
    )
    .unwrap();
    c.run(
        0,
        Op::WriteZeroes {
            offset: 8 << 20,
            len: 1 << 20,
            unmap: false,
        },
    )
    .unwrap();
    c.run(
        0,
        Op::WriteZeroes {
            offset: 10 << 20,
            len: 1 << 20,
            unmap: true,
        },
    )
    .unwrap();
    c.run(0, Op::Flush).unwrap();
    let image = std::fs::read(&s.disk).unwrap();
    assert!(image[1 << 20..5 << 20].iter().all(|&b| b == 0));
    assert!(image[8 << 20..9 << 20].iter().all(|&b| b == 0));
    assert!(image[10 << 20..11 << 20].iter().all(|&b| b == 0));
    assert!(
        image[5 << 20..(5 << 20) + 4096].iter().any(|&b| b != 0),
        "data after the discarded range is kept"
    );
    let blocks_after = std::fs::metadata(&s.disk).unwrap().blocks();
    // At least the 4 MiB discarded (8192 512-byte blocks) must be deallocated.
    assert!(
        blocks_before - blocks_after >= 8192,
        "discard must deallocate: {blocks_before} -> {blocks_after} blocks"
    );
    // Reading a hole returns zeroes.
    c.run(
        0,
        Op::Read {
            offset: 2 << 20,
            buf: 0,
            len: 65536,
        },
    )
    .unwrap();
    assert!(c.buf()[..65536].iter().all(|&b| b == 0));
}

#[test]
fn readonly_disk_fails_writes_and_serves_reads() {
    let s = common::start(SIZE, |a| a.readonly = true);
    let before = common::checksum(&s.disk);
    let mut c = BlkioClient::connect(&s.socket, 2, 1 << 20, true).unwrap();
    c.run(
        1,
        Op::Read {
            offset: 0,
            buf: 0,
            len: 4096,
        },
    )
    .unwrap();
    let image = std::fs::read(&s.disk).unwrap();
    assert_eq!(&c.buf()[..4096], &image[..4096]);
    drop(c);
    // A read-write frontend on a read-only disk: the device offers RO, writes fail.
    let mut c = BlkioClient::connect(&s.socket, 1, 1 << 20, false);
    if let Ok(c) = c.as_mut() {
        c.buf()[..4096].fill(9);
        assert!(c
            .run(
                0,
                Op::Write {
                    offset: 0,
                    buf: 0,
                    len: 4096
                }
            )
            .is_err());
    }
    assert_eq!(common::checksum(&s.disk), before);
}

#[test]
fn reconnect_after_disconnect_serves_the_same_data() {
    let s = common::start(SIZE, |_| {});
    for round in 0..3u8 {
        let mut c = BlkioClient::connect(&s.socket, 2, 1 << 20, false).unwrap();
        if round > 0 {
            c.run(
                0,
                Op::Read {
                    offset: 0,
                    buf: 0,
                    len: 4096,
                },
            )
            .unwrap();
            assert_eq!(
                &c.buf()[..4096],
                &pattern(round - 1, 4096)[..],
                "round {round}"
            );
        }
        c.buf()[..4096].copy_from_slice(&pattern(round, 4096));
        c.run(
            1,
            Op::Write {
                offset: 0,
                buf: 0,
                len: 4096,
            },
        )
        .unwrap();
    }
    let n = s
        .server
        .as_ref()
        .unwrap()
        .shared()
        .stats
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n, 3);
}
