//! Malformed requests through a real vhost-user connection: each gets the right status byte
//! (or, without a usable status descriptor, an empty completion), the image is unchanged,
//! and the queue keeps working.

mod common;

use std::time::Duration;

use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE, MEM_SIZE};
use virtio_bindings::virtio_blk::*;

const SIZE: u64 = 4 << 20;
const CAPACITY_SECTORS: u64 = SIZE / 512;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn setup(readonly: bool) -> (common::Served, TestFrontend) {
    let s = common::start(SIZE, |a| a.readonly = readonly);
    let f = TestFrontend::connect(&s.socket, 2, 256, true).unwrap();
    (s, f)
}

/// Asserts that a well-formed write+read still works on queue `q` (the queue is not wedged).
fn assert_queue_alive(f: &mut TestFrontend, q: usize, writable: bool) {
    let (st, _) = f
        .request(q, VIRTIO_BLK_T_IN, 0, &[Desc::w(DATA_BASE, 512)])
        .unwrap();
    assert_eq!(st, OK, "queue {q} no longer serves reads");
    if writable {
        let data = f.read_mem(DATA_BASE, 512).unwrap();
        f.write_mem(DATA_BASE, &data).unwrap();
        let (st, _) = f
            .request(q, VIRTIO_BLK_T_OUT, 0, &[Desc::r(DATA_BASE, 512)])
            .unwrap();
        assert_eq!(st, OK);
    }
}

fn discard_segments(f: &TestFrontend, at: u64, segs: &[(u64, u32, u32)]) -> u32 {
    let mut raw = Vec::new();
    for &(sector, n, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&n.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    f.write_mem(at, &raw).unwrap();
    raw.len() as u32
}

#[test]
fn malformed_requests_get_a_status_and_change_nothing() {
    let (s, mut f) = setup(false);
    let before = common::checksum(&s.disk);
    f.write_mem(DATA_BASE, &[0xabu8; 8192]).unwrap();

    let cases: Vec<(&str, u32, u64, Vec<Desc>, u8)> = vec![
        (
            "data outside guest memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Desc::r(MEM_SIZE + 4096, 512)],
            IOERR,
        ),
        (
            "data straddling the end of guest memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Desc::r(MEM_SIZE - 256, 512)],
            IOERR,
        ),
        (
            "data address wrapping u64",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Desc::r(u64::MAX - 255, 512)],
            IOERR,
        ),
        (
            "sector overflow (u64 wrap)",
            VIRTIO_BLK_T_OUT,
            u64::MAX - 1,
            vec![Desc::r(DATA_BASE, 1024)],
            IOERR,
        ),
        (
            "write past the end of the disk",
            VIRTIO_BLK_T_OUT,
            CAPACITY_SECTORS - 1,
            vec![Desc::r(DATA_BASE, 1024)],
            IOERR,
        ),
        (
            "read past the end of the disk",
            VIRTIO_BLK_T_IN,
            CAPACITY_SECTORS,
            vec![Desc::w(DATA_BASE, 512)],
            IOERR,
        ),
        (
            "length not a multiple of 512",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Desc::r(DATA_BASE, 100)],
            IOERR,
        ),
        (
            "write with a device-writable data buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![Desc::w(DATA_BASE, 512)],
            IOERR,
        ),
        (
            "read into a device-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![Desc::r(DATA_BASE, 512)],
            IOERR,
        ),
        (
            "unknown request type",
            99,
            0,
            vec![Desc::r(DATA_BASE, 512)],
            UNSUPP,
        ),
        (
            "GET_ID with a short buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![Desc::w(DATA_BASE, 8)],
            IOERR,
        ),
    ];
    for (name, t, sector, data, want) in cases {
        let (st, len) = f.request(0, t, sector, &data).unwrap();
        assert_eq!(st, want, "{name}: status");
        assert_eq!(
            len, 1,
            "{name}: only the status byte is reported as written"
        );
        assert_eq!(common::checksum(&s.disk), before, "{name}: image changed");
    }

    // Discard / write-zeroes segments.
    let seg_at = DATA_BASE + 65536;
    type SegCase = (&'static str, u32, Vec<(u64, u32, u32)>, u8);
    let cases: Vec<SegCase> = vec![
        (
            "oversize discard",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, u32::MAX, 0)],
            IOERR,
        ),
        (
            "discard past the end",
            VIRTIO_BLK_T_DISCARD,
            vec![(CAPACITY_SECTORS - 8, 16, 0)],
            IOERR,
        ),
        (
            "discard sector overflow",
            VIRTIO_BLK_T_DISCARD,
            vec![(u64::MAX - 7, 16, 0)],
            IOERR,
        ),
        (
            "discard with unmap flag",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, 8, 1)],
            UNSUPP,
        ),
        (
            "write-zeroes with reserved flags",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(0, 8, 0x80)],
            UNSUPP,
        ),
        (
            "too many discard segments",
            VIRTIO_BLK_T_DISCARD,
            (0..17).map(|i| (i * 8, 8, 0)).collect(),
            IOERR,
        ),
        (
            "multi-segment discard with one bad segment",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, 8, 0), (CAPACITY_SECTORS, 8, 0)],
            IOERR,
        ),
    ];
    for (name, t, segs, want) in cases {
        let len = discard_segments(&f, seg_at, &segs);
        let (st, _) = f.request(0, t, 0, &[Desc::r(seg_at, len)]).unwrap();
        assert_eq!(st, want, "{name}: status");
        assert_eq!(common::checksum(&s.disk), before, "{name}: image changed");
    }
    // A discard payload that is not a whole number of segments.
    f.write_mem(seg_at, &[0u8; 24]).unwrap();
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_DISCARD, 0, &[Desc::r(seg_at, 24)])
        .unwrap();
    assert_eq!(st, IOERR);

    assert_queue_alive(&mut f, 0, true);
    drop(f);
    s.server.unwrap().stop().unwrap();
}

#[test]
fn broken_headers_and_status_descriptors() {
    let (s, mut f) = setup(false);
    let before = common::checksum(&s.disk);
    let hdr = DATA_BASE - 8192;
    let status = hdr + 64;
    f.write_mem(hdr, &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap(); // OUT, sector 0
    f.write_mem(DATA_BASE, &[0x5au8; 512]).unwrap();

    // Header write-only: status IOERR.
    f.write_mem(status, &[0xff]).unwrap();
    f.submit(
        0,
        &[
            Desc::w(hdr, 16),
            Desc::r(DATA_BASE, 512),
            Desc::w(status, 1),
        ],
    )
    .unwrap();
    let used = f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(
        f.read_mem(status, 1).unwrap()[0],
        IOERR,
        "write-only header"
    );
    assert_eq!(used[0].1, 1);

    // Short header.
    f.write_mem(status, &[0xff]).unwrap();
    f.submit(
        0,
        &[Desc::r(hdr, 8), Desc::r(DATA_BASE, 512), Desc::w(status, 1)],
    )
    .unwrap();
    f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(f.read_mem(status, 1).unwrap()[0], IOERR, "short header");

    // Header outside guest memory.
    f.write_mem(status, &[0xff]).unwrap();
    f.submit(
        0,
        &[
            Desc::r(MEM_SIZE + 65536, 16),
            Desc::r(DATA_BASE, 512),
            Desc::w(status, 1),
        ],
    )
    .unwrap();
    f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(
        f.read_mem(status, 1).unwrap()[0],
        IOERR,
        "header outside memory"
    );

    // Read-only status descriptor: nothing can be reported, the chain is returned empty.
    f.write_mem(status, &[0xff]).unwrap();
    f.submit(
        0,
        &[
            Desc::r(hdr, 16),
            Desc::r(DATA_BASE, 512),
            Desc::r(status, 1),
        ],
    )
    .unwrap();
    let used = f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(used[0].1, 0, "read-only status: used length 0");
    assert_eq!(
        f.read_mem(status, 1).unwrap()[0],
        0xff,
        "read-only status byte untouched"
    );

    // Missing status (chain is just the header).
    f.submit(0, &[Desc::r(hdr, 16)]).unwrap();
    let used = f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(used[0].1, 0, "missing status: used length 0");

    // Zero-length status descriptor.
    f.submit(
        0,
        &[
            Desc::r(hdr, 16),
            Desc::r(DATA_BASE, 512),
            Desc::w(status, 0),
        ],
    )
    .unwrap();
    let used = f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(used[0].1, 0);

    // Status outside guest memory.
    f.submit(
        0,
        &[
            Desc::r(hdr, 16),
            Desc::r(DATA_BASE, 512),
            Desc::w(MEM_SIZE + 1, 1),
        ],
    )
    .unwrap();
    let used = f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(used[0].1, 0);

    // A descriptor loop (next points back to itself) terminates.
    f.submit_raw(1, 100, &[(hdr, 16, 1 /* NEXT */, 100)])
        .unwrap();
    let used = f.wait_used(1, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(used[0].0, 100);
    // A `next` index past the table.
    f.submit_raw(1, 120, &[(hdr, 16, 1, 4000)]).unwrap();
    f.wait_used(1, 1, Duration::from_secs(60)).unwrap();

    assert_eq!(common::checksum(&s.disk), before, "image changed");
    assert_queue_alive(&mut f, 0, true);
    assert_queue_alive(&mut f, 1, true);
    drop(f);
    s.server.unwrap().stop().unwrap();
}

#[test]
fn readonly_disk_refuses_every_write() {
    let (s, mut f) = setup(true);
    let before = common::checksum(&s.disk);
    assert_ne!(
        f.features() & (1 << VIRTIO_BLK_F_RO),
        0,
        "RO feature offered"
    );
    f.write_mem(DATA_BASE, &[1u8; 512]).unwrap();
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_OUT, 0, &[Desc::r(DATA_BASE, 512)])
        .unwrap();
    assert_eq!(st, IOERR, "write");
    let seg = DATA_BASE + 4096;
    let len = discard_segments(&f, seg, &[(0, 8, 0)]);
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_DISCARD, 0, &[Desc::r(seg, len)])
        .unwrap();
    assert_eq!(st, IOERR, "discard");
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Desc::r(seg, len)])
        .unwrap();
    assert_eq!(st, IOERR, "write-zeroes");
    let (st, _) = f.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]).unwrap();
    assert_eq!(st, OK, "flush is harmless");
    assert_eq!(common::checksum(&s.disk), before);
    assert_queue_alive(&mut f, 0, false);
}

#[test]
fn valid_requests_through_direct_and_indirect_chains() {
    let (s, mut f) = setup(false);
    // Multi-segment write through an indirect table, then read back through direct chains.
    let hdr = DATA_BASE - 16384;
    let status = hdr + 64;
    let mut payload = vec![0u8; 8192];
    for (i, b) in payload.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    f.write_mem(DATA_BASE, &payload[..4096]).unwrap();
    f.write_mem(DATA_BASE + (1 << 20), &payload[4096..])
        .unwrap();
    f.write_mem(hdr, &[1, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0])
        .unwrap(); // OUT sector 16
    f.submit_indirect(
        0,
        &[
            Desc::r(hdr, 16),
            Desc::r(DATA_BASE, 4096),
            Desc::r(DATA_BASE + (1 << 20), 4096),
            Desc::w(status, 1),
        ],
        DATA_BASE + (4 << 20),
    )
    .unwrap();
    f.wait_used(0, 1, Duration::from_secs(60)).unwrap();
    assert_eq!(f.read_mem(status, 1).unwrap()[0], OK);
    let image = std::fs::read(&s.disk).unwrap();
    assert_eq!(&image[16 * 512..16 * 512 + 8192], &payload[..]);

    let (st, len) = f
        .request(1, VIRTIO_BLK_T_IN, 16, &[Desc::w(DATA_BASE + 65536, 8192)])
        .unwrap();
    assert_eq!((st, len), (OK, 8193));
    assert_eq!(f.read_mem(DATA_BASE + 65536, 8192).unwrap(), payload);

    // GET_ID returns the serial, zero-padded to 20 bytes.
    let (st, len) = f
        .request(0, VIRTIO_BLK_T_GET_ID, 0, &[Desc::w(DATA_BASE, 20)])
        .unwrap();
    assert_eq!((st, len), (OK, 21));
    assert_eq!(
        &f.read_mem(DATA_BASE, 20).unwrap()[..17],
        b"drblk-test-serial"
    );

    // Multi-segment discard and write-zeroes (with and without unmap) reach the image.
    let seg = DATA_BASE + 8192;
    let len = discard_segments(&f, seg, &[(64, 8, 0), (128, 16, 0)]);
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_DISCARD, 0, &[Desc::r(seg, len)])
        .unwrap();
    assert_eq!(st, OK);
    let len = discard_segments(&f, seg, &[(256, 8, 0), (512, 8, 1)]);
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_WRITE_ZEROES, 0, &[Desc::r(seg, len)])
        .unwrap();
    assert_eq!(st, OK);
    let image = std::fs::read(&s.disk).unwrap();
    for (sector, n) in [(64usize, 8usize), (128, 16), (256, 8), (512, 8)] {
        assert!(
            image[sector * 512..(sector + n) * 512]
                .iter()
                .all(|&b| b == 0),
            "sector {sector} zeroed"
        );
    }
    assert!(
        image[72 * 512..80 * 512].iter().any(|&b| b != 0),
        "neighbouring data untouched"
    );
    let (st, _) = f.request(0, VIRTIO_BLK_T_FLUSH, 0, &[]).unwrap();
    assert_eq!(st, OK);
}

#[test]
fn without_event_idx_every_completion_is_seen() {
    let s = common::start(SIZE, |_| {});
    let mut f = TestFrontend::connect(&s.socket, 1, 8, false).unwrap();
    assert_eq!(
        f.features() & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX),
        0
    );
    // More requests than the ring has entries: indices wrap.
    for i in 0..40u64 {
        let (st, _) = f
            .request(0, VIRTIO_BLK_T_IN, i, &[Desc::w(DATA_BASE, 512)])
            .unwrap();
        assert_eq!(st, OK);
    }
}
