//! A minimal virtio-blk driver over vhost's `Frontend`, for protocol-level tests.
//!
//! Unlike a real driver it lets a test place any descriptor chain — malformed ones included —
//! on a queue, and watch the used ring directly. Guest memory is a memfd shared with the
//! backend, laid out as: per queue `q`, a 1 MiB block at `q * 1 MiB` holding the descriptor
//! table, avail ring and used ring; data buffers from [`DATA_BASE`] on.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory size.
pub const MEM_SIZE: u64 = 32 << 20;
/// Where data buffers start in guest memory.
pub const DATA_BASE: u64 = 16 << 20;
const QUEUE_AREA: u64 = 1 << 20;
const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// One descriptor a test wants in a chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Guest address.
    pub addr: u64,
    /// Length.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

impl Desc {
    /// A device-readable descriptor.
    pub fn r(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: false,
        }
    }
    /// A device-writable descriptor.
    pub fn w(addr: u64, len: u32) -> Self {
        Desc {
            addr,
            len,
            write: true,
        }
    }
}

struct TestQueue {
    size: u16,
    base: u64,
    kick: EventFd,
    call: EventFd,
    next_avail: u16,
    last_used: u16,
    next_desc: u16,
}

impl TestQueue {
    fn desc(&self) -> u64 {
        self.base
    }
    fn avail(&self) -> u64 {
        self.base + 0x10000
    }
    fn used(&self) -> u64 {
        self.base + 0x20000
    }
}

/// A connected test frontend.
pub struct TestFrontend {
    frontend: Frontend,
    mem: GuestMemoryMmap<()>,
    queues: Vec<TestQueue>,
    memfd: File,
    features: u64,
}

fn memfd(size: u64) -> anyhow::Result<File> {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"drblk-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        bail!("memfd_create: {}", std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)?;
    Ok(f)
}

impl TestFrontend {
    /// Connects to `socket`, negotiates, sets up `num_queues` queues of `queue_size`.
    pub fn connect(
        socket: &Path,
        num_queues: usize,
        queue_size: u16,
        event_idx: bool,
    ) -> anyhow::Result<Self> {
        let file = memfd(MEM_SIZE)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .context("mapping test guest memory")?;
        let mut frontend = Frontend::connect(socket, num_queues as u64)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        let offered = frontend.get_features()?;
        let mut features = offered;
        if !event_idx {
            features &= !(1 << VIRTIO_RING_F_EVENT_IDX);
        }
        frontend.set_features(features)?;
        let proto = frontend.get_protocol_features()?;
        frontend.set_protocol_features(
            proto
                & (VhostUserProtocolFeatures::CONFIG
                    | VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS),
        )?;
        // Every later message waits for the backend's acknowledgement (REPLY_ACK), so a test's
        // next step never races the backend's handling of the previous message.
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        frontend.set_owner()?;
        let mut tf = TestFrontend {
            frontend,
            mem,
            queues: Vec::new(),
            memfd: file,
            features,
        };
        tf.set_mem_table()?;
        for q in 0..num_queues {
            let tq = TestQueue {
                size: queue_size,
                base: q as u64 * QUEUE_AREA,
                kick: EventFd::new(libc::EFD_NONBLOCK)?,
                call: EventFd::new(libc::EFD_NONBLOCK)?,
                next_avail: 0,
                last_used: 0,
                next_desc: 0,
            };
            tf.queues.push(tq);
            tf.start_queue(q)?;
        }
        Ok(tf)
    }

    /// Features negotiated.
    pub fn features(&self) -> u64 {
        self.features
    }

    fn host_addr(&self, gpa: u64) -> u64 {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .expect("in memory") as u64
    }

    /// The memory region description of `[gpa, gpa+len)` of the guest memory memfd.
    pub fn region_info(&self, gpa: u64, len: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: self.host_addr(gpa),
            mmap_offset: gpa,
            mmap_handle: self.memfd.as_raw_fd(),
        }
    }

    fn set_mem_table(&mut self) -> anyhow::Result<()> {
        let region = self.region_info(0, MEM_SIZE);
        self.frontend.set_mem_table(&[region])?;
        Ok(())
    }

    fn start_queue(&mut self, q: usize) -> anyhow::Result<()> {
        let tq = &self.queues[q];
        // Zero the ring area so a restarted queue starts clean.
        self.mem
            .write_slice(&vec![0u8; 0x30000], GuestAddress(tq.base))?;
        self.frontend.set_vring_num(q, tq.size)?;
        let cfg = VringConfigData {
            queue_max_size: tq.size,
            queue_size: tq.size,
            flags: 0,
            desc_table_addr: self.host_addr(tq.desc()),
            used_ring_addr: self.host_addr(tq.used()),
            avail_ring_addr: self.host_addr(tq.avail()),
            log_addr: None,
        };
        self.frontend.set_vring_addr(q, &cfg)?;
        self.frontend.set_vring_base(q, 0)?;
        self.frontend.set_vring_call(q, &tq.call)?;
        self.frontend.set_vring_kick(q, &tq.kick)?;
        self.frontend.set_vring_enable(q, true)?;
        Ok(())
    }

    /// The backend's vhost-user frontend handle, for protocol-level calls.
    pub fn vhost(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// Reads `len` config-space bytes at `offset`.
    pub fn config(&mut self, offset: u32, len: u32) -> anyhow::Result<Vec<u8>> {
        let buf = vec![0u8; len as usize];
        let (_, data) =
            self.frontend
                .get_config(offset, len, VhostUserConfigFlags::WRITABLE, &buf)?;
        Ok(data)
    }

    /// Places a chain made of `descs` on queue `q` (direct descriptors) and kicks.
    /// Returns the head index.
    pub fn submit(&mut self, q: usize, descs: &[Desc]) -> anyhow::Result<u16> {
        let head = self.write_chain(q, descs, false)?;
        self.publish(q, head)?;
        Ok(head)
    }

    /// Places `descs` in an indirect table at `table_gpa`, referenced by one descriptor.
    pub fn submit_indirect(
        &mut self,
        q: usize,
        descs: &[Desc],
        table_gpa: u64,
    ) -> anyhow::Result<u16> {
        for (i, d) in descs.iter().enumerate() {
            let next = if i + 1 < descs.len() {
                (i + 1) as u16
            } else {
                0
            };
            self.write_desc(table_gpa, i as u16, d, next, i + 1 < descs.len())?;
        }
        let table = Desc::r(table_gpa, (descs.len() * 16) as u32);
        let head = self.alloc_descs(q, 1);
        let base = self.queues[q].desc();
        self.mem
            .write_obj(table.addr, GuestAddress(base + u64::from(head) * 16))?;
        self.mem
            .write_obj(table.len, GuestAddress(base + u64::from(head) * 16 + 8))?;
        self.mem.write_obj(
            VIRTQ_DESC_F_INDIRECT,
            GuestAddress(base + u64::from(head) * 16 + 12),
        )?;
        self.mem
            .write_obj(0u16, GuestAddress(base + u64::from(head) * 16 + 14))?;
        self.publish(q, head)?;
        Ok(head)
    }

    /// Writes raw descriptor-table entries starting at index `first` of queue `q` (for chains
    /// with loops or bad `next` fields) and publishes `first` as a head.
    pub fn submit_raw(
        &mut self,
        q: usize,
        first: u16,
        entries: &[(u64, u32, u16, u16)],
    ) -> anyhow::Result<u16> {
        let base = self.queues[q].desc();
        for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
            let at = base + (u64::from(first) + i as u64) * 16;
            self.mem.write_obj(addr, GuestAddress(at))?;
            self.mem.write_obj(len, GuestAddress(at + 8))?;
            self.mem.write_obj(flags, GuestAddress(at + 12))?;
            self.mem.write_obj(next, GuestAddress(at + 14))?;
        }
        self.publish(q, first)?;
        Ok(first)
    }

    fn alloc_descs(&mut self, q: usize, n: u16) -> u16 {
        let tq = &mut self.queues[q];
        if tq.next_desc + n > tq.size {
            tq.next_desc = 0;
        }
        let head = tq.next_desc;
        tq.next_desc += n;
        head
    }

    fn write_desc(
        &self,
        table: u64,
        idx: u16,
        d: &Desc,
        next: u16,
        has_next: bool,
    ) -> anyhow::Result<()> {
        let at = table + u64::from(idx) * 16;
        let mut flags = 0u16;
        if d.write {
            flags |= VIRTQ_DESC_F_WRITE;
        }
        if has_next {
            flags |= VIRTQ_DESC_F_NEXT;
        }
        self.mem.write_obj(d.addr, GuestAddress(at))?;
        self.mem.write_obj(d.len, GuestAddress(at + 8))?;
        self.mem.write_obj(flags, GuestAddress(at + 12))?;
        self.mem.write_obj(next, GuestAddress(at + 14))?;
        Ok(())
    }

    fn write_chain(&mut self, q: usize, descs: &[Desc], _indirect: bool) -> anyhow::Result<u16> {
        let head = self.alloc_descs(q, descs.len() as u16);
        let table = self.queues[q].desc();
        for (i, d) in descs.iter().enumerate() {
            let idx = head + i as u16;
            self.write_desc(table, idx, d, idx + 1, i + 1 < descs.len())?;
        }
        Ok(head)
    }

    fn publish(&mut self, q: usize, head: u16) -> anyhow::Result<()> {
        let tq = &mut self.queues[q];
        let slot = u64::from(tq.next_avail % tq.size);
        self.mem
            .write_obj(head, GuestAddress(tq.avail() + 4 + slot * 2))?;
        tq.next_avail = tq.next_avail.wrapping_add(1);
        // Ask for a notification on every completion (EVENT_IDX: used_event = last seen).
        self.mem.write_obj(
            tq.last_used,
            GuestAddress(tq.avail() + 4 + u64::from(tq.size) * 2),
        )?;
        // Release: the ring entry is visible before the index that publishes it.
        self.mem.store(
            tq.next_avail,
            GuestAddress(tq.avail() + 2),
            Ordering::Release,
        )?;
        tq.kick.write(1)?;
        Ok(())
    }

    /// Guest address of queue `q`'s used index (read it through a clone of [`Self::mem`] to
    /// watch completions from another thread).
    pub fn used_idx_addr(&self, q: usize) -> GuestAddress {
        GuestAddress(self.queues[q].used() + 2)
    }

    /// Submits a request (header, data descriptors, 1-byte status) on queue `q` without
    /// waiting. `slot` picks a private header/status area (0..64 per queue).
    pub fn submit_request(
        &mut self,
        q: usize,
        slot: usize,
        req_type: u32,
        sector: u64,
        data: &[Desc],
    ) -> anyhow::Result<u16> {
        let hdr = self.slot_header(q, slot);
        self.mem.write_obj(req_type, GuestAddress(hdr))?;
        self.mem.write_obj(0u32, GuestAddress(hdr + 4))?;
        self.mem.write_obj(sector, GuestAddress(hdr + 8))?;
        self.mem.write_obj(0xffu8, GuestAddress(hdr + 16))?;
        let mut chain = vec![Desc::r(hdr, 16)];
        chain.extend_from_slice(data);
        chain.push(Desc::w(hdr + 16, 1));
        self.submit(q, &chain)
    }

    /// Status byte of the request last submitted in `slot` of queue `q`.
    pub fn slot_status(&self, q: usize, slot: usize) -> u8 {
        self.mem
            .read_obj(GuestAddress(self.slot_header(q, slot) + 16))
            .unwrap_or(0xff)
    }

    fn slot_header(&self, q: usize, slot: usize) -> u64 {
        assert!(slot < 64);
        self.queues[q].base + 0x30000 + slot as u64 * 64
    }

    /// Polls queue `q` once: completions seen since the last call, without waiting.
    pub fn poll_used(&mut self, q: usize) -> anyhow::Result<Vec<(u16, u32)>> {
        let mut out = Vec::new();
        self.take_used(q, usize::MAX, &mut out)?;
        Ok(out)
    }

    /// Appends to `out` the (head, len) of new used entries of queue `q`, at most `max`.
    fn take_used(&mut self, q: usize, max: usize, out: &mut Vec<(u16, u32)>) -> anyhow::Result<()> {
        let idx = self.used_idx(q);
        let tq = &mut self.queues[q];
        let mut taken = 0;
        while tq.last_used != idx && taken < max {
            let slot = u64::from(tq.last_used % tq.size);
            let at = tq.used() + 4 + slot * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(at))?;
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4))?;
            out.push((id as u16, len));
            tq.last_used = tq.last_used.wrapping_add(1);
            taken += 1;
        }
        Ok(())
    }

    /// The device's used index of queue `q`, as the guest would read it.
    pub fn used_idx(&self, q: usize) -> u16 {
        let tq = &self.queues[q];
        self.mem
            .load(GuestAddress(tq.used() + 2), Ordering::Acquire)
            .unwrap_or(0)
    }

    /// Waits up to `timeout` for `n` new used entries on queue `q`; returns (head, len) pairs.
    pub fn wait_used(
        &mut self,
        q: usize,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(u16, u32)>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            self.take_used(q, n - out.len(), &mut out)?;
            if out.len() >= n {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "queue {q}: {} of {n} completions after {timeout:?}",
                    out.len()
                );
            }
            let _ = self.queues[q].call.read();
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(out)
    }

    /// Submits one request (header, data descriptors, 1-byte status) and waits for it.
    /// Returns (status byte, used length).
    pub fn request(
        &mut self,
        q: usize,
        req_type: u32,
        sector: u64,
        data: &[Desc],
    ) -> anyhow::Result<(u8, u32)> {
        // The last header slot of the queue: workloads using submit_request keep to lower ones.
        const SLOT: usize = 63;
        self.submit_request(q, SLOT, req_type, sector, data)?;
        // A hang guard, not a speed target.
        let used = self.wait_used(q, 1, Duration::from_secs(120))?;
        Ok((self.slot_status(q, SLOT), used[0].1))
    }

    /// Writes `data` into guest memory at `gpa`.
    pub fn write_mem(&self, gpa: u64, data: &[u8]) -> anyhow::Result<()> {
        self.mem.write_slice(data, GuestAddress(gpa))?;
        Ok(())
    }

    /// Reads `len` bytes of guest memory at `gpa`.
    pub fn read_mem(&self, gpa: u64, len: usize) -> anyhow::Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa))?;
        Ok(v)
    }
}
