//! Fuzzes request parsing with guest-controlled descriptor tables, indirect tables, headers
//! and discard segments: parsing must never panic, and anything it accepts must lie inside
//! guest memory and inside the disk.
#![no_main]

use drblk::blk::request::{parse, RequestKind};
use drblk::blk::virtio::DeviceLimits;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 64 * 1024;
const QSIZE: u16 = 16;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    // The fuzzer owns the descriptor table and the data area; the rings are ours.
    let table = &data[4..];
    let n = table.len().min(0x1000);
    mem.write_slice(&table[..n], GuestAddress(DESC)).unwrap();
    if table.len() > 0x1000 {
        let rest = &table[0x1000..];
        let n = rest.len().min(MEM - 0x3000);
        mem.write_slice(&rest[..n], GuestAddress(0x3000)).unwrap();
    }
    let head = u16::from_le_bytes([data[0], data[1]]) % QSIZE;
    mem.write_obj(head, GuestAddress(AVAIL + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();

    let mut q = Queue::new(QSIZE).unwrap();
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    let Some(chain) = q.pop_descriptor_chain(&mem) else { return };

    let capacity = u64::from(data[2]) * 4096 + 4096;
    let limits = DeviceLimits::new(capacity, 512, 1, QSIZE, data[3] & 1 == 1);
    if let Ok(req) = parse(chain, &mem, &limits) {
        for &(addr, len) in &req.data {
            assert!(mem.check_range(addr, len as usize));
        }
        match &req.kind {
            RequestKind::In | RequestKind::Out => {
                assert!(req.sector * 512 + req.data_len <= capacity);
                assert!(!(limits.readonly && req.kind == RequestKind::Out));
            }
            RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) => {
                assert!(!limits.readonly);
                for s in segs {
                    let (off, len) = s.byte_range();
                    assert!(off + len <= capacity);
                }
            }
            RequestKind::GetId => assert!(req.data_len >= 20),
            RequestKind::Flush => {}
        }
    }
});
