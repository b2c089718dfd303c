//! Helpers for the data path's unit tests: guest memory, virtio-blk request chains, and the
//! driver's side of a split virtqueue (virtio-queue's `MockSplitQueue`, feature `test-utils`).

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Size of the test guest's memory: one region from address 0. The virtqueue's own tables
/// lie in the first pages; tests put their buffers from 1 MiB up.
pub(crate) const MEM_SIZE: u64 = 4 << 20;
/// An address past the end of guest memory.
pub(crate) const OUTSIDE: u64 = 16 << 20;

/// Fresh, zeroed guest memory.
pub(crate) fn guest_memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// One buffer of a chain, as the driver describes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Buf {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    /// Device-writable (VRING_DESC_F_WRITE).
    pub(crate) write: bool,
}

/// A buffer the device only reads.
pub(crate) fn ro(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: false,
    }
}

/// A buffer the device writes.
pub(crate) fn wo(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        write: true,
    }
}

/// Writes a virtio-blk request header (type, reserved, sector) at `addr`.
pub(crate) fn put_header(mem: &GuestMemoryMmap<()>, addr: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).expect("header");
}

/// Writes discard / write-zeroes segments `(sector, sectors, flags)` at `addr`; returns
/// their length in bytes.
pub(crate) fn put_segments(mem: &GuestMemoryMmap<()>, addr: u64, segs: &[(u64, u32, u32)]) -> u32 {
    let mut raw = Vec::with_capacity(segs.len() * 16);
    for &(sector, sectors, flags) in segs {
        raw.extend_from_slice(&sector.to_le_bytes());
        raw.extend_from_slice(&sectors.to_le_bytes());
        raw.extend_from_slice(&flags.to_le_bytes());
    }
    mem.write_slice(&raw, GuestAddress(addr)).expect("segments");
    raw.len() as u32
}

/// The descriptors of `bufs`, linked in order, for table indices `first..`.
pub(crate) fn linked(bufs: &[Buf], first: u16) -> Vec<RawDescriptor> {
    bufs.iter()
        .enumerate()
        .map(|(i, b)| {
            let mut flags = if b.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let last = i + 1 == bufs.len();
            let next = if last {
                0
            } else {
                flags |= VRING_DESC_F_NEXT as u16;
                first + i as u16 + 1
            };
            RawDescriptor::from(Descriptor::new(b.addr, b.len, flags, next))
        })
        .collect()
}

/// Writes `bufs` as an indirect descriptor table at `table`; returns the descriptor that
/// refers to it (to be put in the queue's own table).
pub(crate) fn indirect(mem: &GuestMemoryMmap<()>, table: u64, bufs: &[Buf]) -> RawDescriptor {
    for (i, d) in linked(bufs, 0).into_iter().enumerate() {
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .expect("indirect table");
    }
    RawDescriptor::from(Descriptor::new(
        table,
        16 * bufs.len() as u32,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ))
}

/// The driver's side of one split virtqueue in guest memory. (The queue worker's tests that
/// use it are not built for the loom models.)
#[cfg_attr(feature = "loom", allow(dead_code))]
pub(crate) struct Driver<'a> {
    pub(crate) queue: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    size: u16,
    next_desc: u16,
}

#[cfg_attr(feature = "loom", allow(dead_code))]
impl<'a> Driver<'a> {
    /// A queue of `size` entries at guest address 0.
    pub(crate) fn new(mem: &'a GuestMemoryMmap<()>, size: u16) -> Self {
        Self::at(mem, size, GuestAddress(0))
    }

    /// A queue of `size` entries at guest address `start` (a second queue beside one at 0).
    pub(crate) fn at(mem: &'a GuestMemoryMmap<()>, size: u16, start: GuestAddress) -> Self {
        Driver {
            queue: MockSplitQueue::create(mem, start, size),
            size,
            next_desc: 0,
        }
    }

    /// Makes a chain of `bufs` available; returns its head index.
    pub(crate) fn push(&mut self, bufs: &[Buf]) -> u16 {
        self.push_raw(&linked(bufs, self.next_desc))
    }

    /// Makes one chain of already linked descriptors available (placed at the next free
    /// table indices); returns its head index.
    pub(crate) fn push_raw(&mut self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc;
        assert!(usize::from(head) + descs.len() <= usize::from(self.size));
        self.queue.add_desc_chains(descs, head).expect("add chain");
        self.next_desc += descs.len() as u16;
        head
    }

    /// Every used-ring entry published so far, `(head, len)`, in ring order.
    pub(crate) fn used(&self) -> Vec<(u16, u32)> {
        let n = self.queue.used().idx().load();
        assert!(n <= self.size, "the tests never wrap the used ring");
        (0..usize::from(n))
            .map(|i| {
                let e = self
                    .queue
                    .used()
                    .ring()
                    .ref_at(i)
                    .expect("used entry")
                    .load();
                (e.id() as u16, e.len())
            })
            .collect()
    }
}
