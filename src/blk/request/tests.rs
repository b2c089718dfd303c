//! Parsing chains written by a mock driver (virtio-queue's `MockSplitQueue`): every item of
//! the module's checklist, accepted and rejected.

use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::blk::testing::{guest_memory, indirect, linked, put_header, put_segments, ro, wo, Buf};
use crate::blk::testing::{MEM_SIZE, OUTSIDE};

const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x11_0000;
const SEGS: u64 = 0x12_0000;
const TABLE: u64 = 0x13_0000;

/// 1 MiB disk (2048 sectors) of 512-byte blocks, one queue of 16.
fn limits() -> DeviceLimits {
    DeviceLimits::new(1 << 20, 512, 1, 16, false)
}

fn readonly() -> DeviceLimits {
    DeviceLimits {
        readonly: true,
        ..limits()
    }
}

/// Parses the chain the driver makes of `descs` (walked by virtio-queue's chain iterator).
fn parse_raw(
    mem: &GuestMemoryMmap<()>,
    descs: &[RawDescriptor],
    limits: &DeviceLimits,
) -> Result<Request, Rejected> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).expect("chain");
    parse(chain, mem, limits)
}

fn parse_bufs(
    mem: &GuestMemoryMmap<()>,
    bufs: &[Buf],
    limits: &DeviceLimits,
) -> Result<Request, Rejected> {
    parse_raw(mem, &linked(bufs, 0), limits)
}

/// Header at HDR, then `data`, then a 1-byte writable status at STATUS.
fn request(mem: &GuestMemoryMmap<()>, req_type: u32, sector: u64, data: &[Buf]) -> Vec<Buf> {
    put_header(mem, HDR, req_type, sector);
    let mut v = vec![ro(HDR, 16)];
    v.extend_from_slice(data);
    v.push(wo(STATUS, 1));
    v
}

fn rejected(reason: ChainError) -> Result<Request, Rejected> {
    Err(Rejected {
        reason,
        status_addr: Some(GuestAddress(STATUS)),
    })
}

fn ok(kind: RequestKind, sector: u64, data: &[(u64, u32)]) -> Result<Request, Rejected> {
    Ok(Request {
        kind,
        sector,
        data: data.iter().map(|&(a, l)| (GuestAddress(a), l)).collect(),
        data_len: data.iter().map(|&(_, l)| u64::from(l)).sum(),
        status_addr: GuestAddress(STATUS),
    })
}

#[test]
fn valid_read() {
    let mem = guest_memory();
    let bufs = request(&mem, VIRTIO_BLK_T_IN, 8, &[wo(DATA, 4096)]);
    let r = parse_bufs(&mem, &bufs, &limits());
    assert_eq!(r, ok(RequestKind::In, 8, &[(DATA, 4096)]));
    assert!(!r.expect("read").is_write());
}

#[test]
fn valid_read_over_several_buffers_skips_empty_ones() {
    let mem = guest_memory();
    let bufs = request(
        &mem,
        VIRTIO_BLK_T_IN,
        0,
        &[wo(DATA, 512), wo(DATA + 0x1000, 0), wo(DATA + 0x2000, 1024)],
    );
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()),
        ok(RequestKind::In, 0, &[(DATA, 512), (DATA + 0x2000, 1024)])
    );
}

#[test]
fn valid_write() {
    let mem = guest_memory();
    let bufs = request(&mem, VIRTIO_BLK_T_OUT, 100, &[ro(DATA, 1024)]);
    let r = parse_bufs(&mem, &bufs, &limits());
    assert_eq!(r, ok(RequestKind::Out, 100, &[(DATA, 1024)]));
    assert!(r.expect("write").is_write());
}

#[test]
fn valid_flush_with_and_without_data() {
    let mem = guest_memory();
    let bufs = request(&mem, VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()),
        ok(RequestKind::Flush, 0, &[])
    );
    // FLUSH takes no data, so any direction is accepted (the executor ignores it); its
    // sector is reported as sent.
    let bufs = request(&mem, VIRTIO_BLK_T_FLUSH, 5, &[ro(DATA, 512), wo(DATA, 512)]);
    let r = parse_bufs(&mem, &bufs, &limits()).expect("flush");
    assert_eq!(
        (r.kind, r.sector, r.data_len),
        (RequestKind::Flush, 5, 1024)
    );
}

#[test]
fn valid_get_id() {
    let mem = guest_memory();
    let bufs = request(&mem, VIRTIO_BLK_T_GET_ID, 0, &[wo(DATA, 20)]);
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()),
        ok(RequestKind::GetId, 0, &[(DATA, 20)])
    );
    // The 20 bytes may come in pieces.
    let bufs = request(
        &mem,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[wo(DATA, 10), wo(DATA + 64, 10)],
    );
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()).map(|r| r.kind),
        Ok(RequestKind::GetId)
    );
}

#[test]
fn valid_discard() {
    let mem = guest_memory();
    let len = put_segments(&mem, SEGS, &[(0, 8, 0), (2040, 8, 0)]);
    let bufs = request(&mem, VIRTIO_BLK_T_DISCARD, 0, &[ro(SEGS, len)]);
    let r = parse_bufs(&mem, &bufs, &limits()).expect("discard");
    let seg = |sector, sectors| Segment {
        sector,
        sectors,
        unmap: false,
    };
    assert_eq!(r.kind, RequestKind::Discard(vec![seg(0, 8), seg(2040, 8)]));
    assert!(r.is_write());
    assert_eq!(seg(2040, 8).byte_range(), (2040 * 512, 4096));
}

#[test]
fn valid_write_zeroes_keeps_the_unmap_flag_and_spans_buffers() {
    let mem = guest_memory();
    put_segments(&mem, SEGS, &[(16, 16, SEGMENT_FLAG_UNMAP), (64, 1, 0)]);
    // The two 16-byte segments in two descriptors.
    let bufs = request(
        &mem,
        VIRTIO_BLK_T_WRITE_ZEROES,
        0,
        &[ro(SEGS, 16), ro(SEGS + 16, 16)],
    );
    let r = parse_bufs(&mem, &bufs, &limits()).expect("write zeroes");
    assert_eq!(
        r.kind,
        RequestKind::WriteZeroes(vec![
            Segment {
                sector: 16,
                sectors: 16,
                unmap: true
            },
            Segment {
                sector: 64,
                sectors: 1,
                unmap: false
            },
        ])
    );
    assert!(r.is_write());
}

#[test]
fn indirect_chain_parses_like_a_direct_one() {
    let mem = guest_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 16);
    let inner = [
        ro(HDR, 16),
        wo(DATA, 512),
        wo(DATA + 512, 1536),
        wo(STATUS, 1),
    ];
    let head = indirect(&mem, TABLE, &inner);
    assert_eq!(
        parse_raw(&mem, &[head], &limits()),
        ok(RequestKind::In, 16, &[(DATA, 512), (DATA + 512, 1536)])
    );
}

#[test]
fn indirect_chain_is_checked_like_a_direct_one() {
    let mem = guest_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let head = indirect(&mem, TABLE, &[ro(HDR, 16), ro(DATA, 512), ro(STATUS, 1)]);
    assert_eq!(
        parse_raw(&mem, &[head], &limits()),
        Err(Rejected {
            reason: ChainError::BadStatus,
            status_addr: None
        })
    );
}

#[test]
fn malformed_indirect_table_is_an_empty_chain() {
    let mem = guest_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let mut head = virtio_queue::desc::split::Descriptor::from(indirect(
        &mem,
        TABLE,
        &[ro(HDR, 16), wo(STATUS, 1)],
    ));
    // A table length that is not a whole number of descriptors: the chain yields nothing.
    head.set_len(20);
    let reject = parse_raw(&mem, &[RawDescriptor::from(head)], &limits());
    assert_eq!(
        reject,
        Err(Rejected {
            reason: ChainError::EmptyChain,
            status_addr: None
        })
    );
    assert_eq!(
        parse(std::iter::empty(), &mem, &limits()).map_err(|r| r.reason),
        Err(ChainError::EmptyChain)
    );
}

#[test]
fn header_not_readable_or_too_short() {
    let mem = guest_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Device-writable header.
    let bufs = [wo(HDR, 16), wo(DATA, 512), wo(STATUS, 1)];
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()),
        rejected(ChainError::BadHeader)
    );
    // Shorter than 16 bytes.
    let bufs = [ro(HDR, 15), wo(DATA, 512), wo(STATUS, 1)];
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()),
        rejected(ChainError::BadHeader)
    );
    // Outside guest memory, or running off its end.
    for addr in [OUTSIDE, MEM_SIZE - 8] {
        let bufs = [ro(addr, 16), wo(DATA, 512), wo(STATUS, 1)];
        assert_eq!(
            parse_bufs(&mem, &bufs, &limits()),
            rejected(ChainError::HeaderOutsideMemory),
            "header at {addr:#x}"
        );
    }
}

#[test]
fn status_missing_read_only_empty_or_outside_memory() {
    let mem = guest_memory();
    put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let no_status = Err(Rejected {
        reason: ChainError::BadStatus,
        status_addr: None,
    });
    let cases: &[(&str, Vec<Buf>)] = &[
        ("header only", vec![ro(HDR, 16)]),
        ("read-only status", vec![ro(HDR, 16), ro(STATUS, 1)]),
        ("empty status", vec![ro(HDR, 16), wo(STATUS, 0)]),
        ("status outside memory", vec![ro(HDR, 16), wo(OUTSIDE, 1)]),
        // The status is the *last* descriptor: a writable one before a read-only last one
        // does not count.
        (
            "read-only last descriptor",
            vec![ro(HDR, 16), wo(STATUS, 1), ro(DATA, 512)],
        ),
    ];
    for (what, bufs) in cases {
        assert_eq!(parse_bufs(&mem, bufs, &limits()), no_status, "{what}");
    }
    // The status is checked first: a bad header with a bad status has nowhere to report.
    assert_eq!(
        parse_bufs(&mem, &[wo(HDR, 16), ro(STATUS, 1)], &limits()),
        no_status
    );
}

#[test]
fn data_length_not_a_multiple_of_512() {
    let mem = guest_memory();
    for (req_type, data) in [
        (VIRTIO_BLK_T_IN, wo(DATA, 1000)),
        (VIRTIO_BLK_T_IN, wo(DATA, 511)),
        (VIRTIO_BLK_T_OUT, ro(DATA, 513)),
    ] {
        let bufs = request(&mem, req_type, 0, &[data]);
        assert_eq!(
            parse_bufs(&mem, &bufs, &limits()),
            rejected(ChainError::Unaligned),
            "type {req_type}, {data:?}"
        );
    }
    // Two unaligned pieces that add up to whole sectors are fine.
    let bufs = request(
        &mem,
        VIRTIO_BLK_T_IN,
        0,
        &[wo(DATA, 100), wo(DATA + 100, 412)],
    );
    assert!(parse_bufs(&mem, &bufs, &limits()).is_ok());
}

#[test]
fn sector_range_past_the_end_of_the_disk() {
    let mem = guest_memory();
    let capacity = limits().capacity_sectors;
    assert_eq!(capacity, 2048);
    // (sector, bytes, accepted)
    let cases = [
        (capacity - 2, 1024, true), // ends exactly at the end
        (capacity - 1, 1024, false),
        (capacity, 512, false),
        (capacity, 0, true), // empty read at the very end
        (capacity + 1, 0, false),
        (u64::MAX, 512, false), // sector + sectors overflows
        (u64::MAX - 1, 1024, false),
        (u64::MAX / 512 + 1, 512, false), // the byte offset would overflow
    ];
    for (sector, bytes, accepted) in cases {
        for (req_type, data) in [
            (VIRTIO_BLK_T_IN, wo(DATA, bytes)),
            (VIRTIO_BLK_T_OUT, ro(DATA, bytes)),
        ] {
            let data: &[Buf] = if bytes == 0 { &[] } else { &[data] };
            let bufs = request(&mem, req_type, sector, data);
            let r = parse_bufs(&mem, &bufs, &limits());
            if accepted {
                assert!(r.is_ok(), "sector {sector}, {bytes} bytes: {r:?}");
            } else {
                assert_eq!(
                    r,
                    rejected(ChainError::OutOfRange),
                    "sector {sector}, {bytes} bytes"
                );
            }
        }
    }
}

#[test]
fn segment_range_past_the_end_of_the_disk() {
    let mem = guest_memory();
    for (req_type, seg) in [
        (VIRTIO_BLK_T_DISCARD, (2047, 2, 0)),
        (VIRTIO_BLK_T_DISCARD, (u64::MAX, 1, 0)),
        (VIRTIO_BLK_T_WRITE_ZEROES, (2048, 1, 0)),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            (u64::MAX - 7, 8, SEGMENT_FLAG_UNMAP),
        ),
    ] {
        let len = put_segments(&mem, SEGS, &[(0, 8, 0), seg]);
        let bufs = request(&mem, req_type, 0, &[ro(SEGS, len)]);
        assert_eq!(
            parse_bufs(&mem, &bufs, &limits()),
            rejected(ChainError::OutOfRange),
            "type {req_type}, segment {seg:?}"
        );
    }
}

#[test]
fn get_id_buffer_under_20_bytes() {
    let mem = guest_memory();
    for data in [
        vec![],
        vec![wo(DATA, 19)],
        vec![wo(DATA, 10), wo(DATA + 64, 9)],
    ] {
        let bufs = request(&mem, VIRTIO_BLK_T_GET_ID, 0, &data);
        assert_eq!(
            parse_bufs(&mem, &bufs, &limits()),
            rejected(ChainError::ShortIdBuffer),
            "{data:?}"
        );
    }
    // Device-readable id buffer: wrong direction.
    let bufs = request(&mem, VIRTIO_BLK_T_GET_ID, 0, &[ro(DATA, 20)]);
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()),
        rejected(ChainError::WrongDirection)
    );
}

#[test]
fn writes_on_a_read_only_device() {
    let mem = guest_memory();
    let len = put_segments(&mem, SEGS, &[(0, 8, 0)]);
    for (req_type, data) in [
        (VIRTIO_BLK_T_OUT, ro(DATA, 512)),
        (VIRTIO_BLK_T_DISCARD, ro(SEGS, len)),
        (VIRTIO_BLK_T_WRITE_ZEROES, ro(SEGS, len)),
    ] {
        let bufs = request(&mem, req_type, 0, &[data]);
        assert_eq!(
            parse_bufs(&mem, &bufs, &readonly()),
            rejected(ChainError::ReadOnly),
            "type {req_type}"
        );
        assert!(
            parse_bufs(&mem, &bufs, &limits()).is_ok(),
            "type {req_type}"
        );
    }
    // Reads, flushes and GET_ID still work.
    for (req_type, data) in [
        (VIRTIO_BLK_T_IN, vec![wo(DATA, 512)]),
        (VIRTIO_BLK_T_FLUSH, vec![]),
        (VIRTIO_BLK_T_GET_ID, vec![wo(DATA, 20)]),
    ] {
        let bufs = request(&mem, req_type, 0, &data);
        assert!(
            parse_bufs(&mem, &bufs, &readonly()).is_ok(),
            "type {req_type}"
        );
    }
}

#[test]
fn data_descriptors_direction_placement_and_count() {
    let mem = guest_memory();
    let len = put_segments(&mem, SEGS, &[(0, 8, 0)]);
    let cases: &[(&str, u32, Vec<Buf>, ChainError)] = &[
        (
            "read into a device-readable buffer",
            VIRTIO_BLK_T_IN,
            vec![ro(DATA, 512)],
            ChainError::WrongDirection,
        ),
        (
            "write from a device-writable buffer",
            VIRTIO_BLK_T_OUT,
            vec![ro(DATA, 512), wo(DATA + 512, 512)],
            ChainError::WrongDirection,
        ),
        (
            "discard segments device-writable",
            VIRTIO_BLK_T_DISCARD,
            vec![wo(SEGS, len)],
            ChainError::WrongDirection,
        ),
        (
            "data outside memory",
            VIRTIO_BLK_T_IN,
            vec![wo(OUTSIDE, 512)],
            ChainError::DataOutsideMemory,
        ),
        (
            "data running off the end of memory",
            VIRTIO_BLK_T_OUT,
            vec![ro(MEM_SIZE - 512, 1024)],
            ChainError::DataOutsideMemory,
        ),
        (
            "unknown type",
            99,
            vec![wo(DATA, 512)],
            ChainError::UnsupportedType,
        ),
    ];
    for (what, req_type, data, reason) in cases {
        let bufs = request(&mem, *req_type, 0, data);
        assert_eq!(
            parse_bufs(&mem, &bufs, &limits()),
            rejected(*reason),
            "{what}"
        );
    }
    // seg_max data descriptors are fine (a full 16-entry table: 14 + header + status),
    // one more is not.
    let data: Vec<Buf> = (0..14).map(|i| wo(DATA + 512 * i, 512)).collect();
    let bufs = request(&mem, VIRTIO_BLK_T_IN, 0, &data);
    assert_eq!(
        parse_bufs(&mem, &bufs, &limits()).map(|r| r.data_len),
        Ok(14 * 512)
    );
    let small = DeviceLimits {
        seg_max: 13,
        ..limits()
    };
    assert_eq!(
        parse_bufs(&mem, &bufs, &small),
        rejected(ChainError::TooManySegments)
    );
}

#[test]
fn malformed_discard_and_write_zeroes_payloads() {
    let mem = guest_memory();
    let l = limits();
    let too_many: Vec<(u64, u32, u32)> = (0..=u64::from(l.max_discard_seg))
        .map(|i| (i * 8, 8, 0))
        .collect();
    // (what, type, segments, payload length override, limits, reason)
    type Case<'a> = (
        &'a str,
        u32,
        Vec<(u64, u32, u32)>,
        Option<u32>,
        DeviceLimits,
        ChainError,
    );
    let block_4k = DeviceLimits {
        logical_block_size: 4096,
        ..l
    };
    let cases: Vec<Case> = vec![
        (
            "no payload",
            VIRTIO_BLK_T_DISCARD,
            vec![],
            None,
            l,
            ChainError::BadSegments,
        ),
        (
            "payload not a whole number of segments",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, 8, 0), (8, 8, 0)],
            Some(24),
            l,
            ChainError::BadSegments,
        ),
        (
            "more segments than advertised",
            VIRTIO_BLK_T_DISCARD,
            too_many,
            None,
            l,
            ChainError::BadSegments,
        ),
        (
            "segment longer than advertised",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(0, l.max_write_zeroes_sectors + 1, 0)],
            None,
            DeviceLimits {
                capacity_sectors: u64::MAX,
                ..l
            },
            ChainError::BadSegments,
        ),
        (
            "start not on a logical block",
            VIRTIO_BLK_T_DISCARD,
            vec![(4, 8, 0)],
            None,
            block_4k,
            ChainError::BadSegments,
        ),
        (
            "length not whole logical blocks",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(8, 4, 0)],
            None,
            block_4k,
            ChainError::BadSegments,
        ),
        (
            "unmap flag on a discard",
            VIRTIO_BLK_T_DISCARD,
            vec![(0, 8, SEGMENT_FLAG_UNMAP)],
            None,
            l,
            ChainError::UnsupportedFlags,
        ),
        (
            "reserved flag on a write-zeroes",
            VIRTIO_BLK_T_WRITE_ZEROES,
            vec![(0, 8, 2)],
            None,
            l,
            ChainError::UnsupportedFlags,
        ),
    ];
    for (what, req_type, segs, len, limits, reason) in cases {
        let written = put_segments(&mem, SEGS, &segs);
        let data: Vec<Buf> = match len.unwrap_or(written) {
            0 => vec![],
            n => vec![ro(SEGS, n)],
        };
        let bufs = request(&mem, req_type, 0, &data);
        assert_eq!(parse_bufs(&mem, &bufs, &limits), rejected(reason), "{what}");
    }
}

#[test]
fn rejection_status_bytes() {
    use ChainError::*;
    let all = [
        (EmptyChain, status::IOERR),
        (BadHeader, status::IOERR),
        (HeaderOutsideMemory, status::IOERR),
        (BadStatus, status::IOERR),
        (DataOutsideMemory, status::IOERR),
        (WrongDirection, status::IOERR),
        (TooManySegments, status::IOERR),
        (Unaligned, status::IOERR),
        (OutOfRange, status::IOERR),
        (ShortIdBuffer, status::IOERR),
        (ReadOnly, status::IOERR),
        (BadSegments, status::IOERR),
        (UnsupportedFlags, status::UNSUPP),
        (UnsupportedType, status::UNSUPP),
    ];
    for (reason, byte) in all {
        assert_eq!(reason.status(), byte, "{reason:?}");
        assert!(!reason.to_string().is_empty());
    }
    assert_eq!((status::OK, status::IOERR, status::UNSUPP), (0, 1, 2));
}
