//! The queue worker on a real vring whose driver side is virtio-queue's `MockSplitQueue`:
//! no vhost-user connection, a temporary image, and (for the gate) the consistency-group
//! engine as the [`Tracking`](crate::blk::tracking::Tracking) implementation.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{QueueWorker, WorkerOptions};
use crate::blk::device::{DeviceShared, DeviceStats};
use crate::blk::disk::{Disk, DiskOptions};
use crate::blk::execute::Executor;
use crate::blk::request::status;
use crate::blk::testing::{guest_memory, indirect, put_header, put_segments, ro, wo, Buf, Driver};
use crate::blk::tracking::Tracking;
use crate::blk::virtio::DeviceLimits;
use crate::cg::{CgConfig, Engine};

const QUEUE_SIZE: u16 = 128;
const DISK_SIZE: u64 = 1 << 20;
const SERIAL: &str = "drblk-unit-serial";

/// Guest addresses of request `i`: header, status byte, data (up to 4 KiB).
#[derive(Clone, Copy)]
struct Slot {
    hdr: u64,
    status: u64,
    data: u64,
}

fn slot(i: u64) -> Slot {
    let base = 0x10_0000 + i * 0x2000;
    Slot {
        hdr: base,
        status: base + 0x10,
        data: base + 0x1000,
    }
}

/// A temporary image of `DISK_SIZE` bytes.
fn disk() -> (tempfile::TempDir, Arc<Disk>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Disk::open(&DiskOptions {
        path: dir.path().join("disk.img"),
        create_size: Some(DISK_SIZE),
        readonly: false,
        direct: false,
        logical_block_size: 512,
    })
    .expect("disk");
    (dir, Arc::new(disk))
}

/// The consistency-group engine of `disk`, one queue; formation never times out.
fn engine(disk: &Arc<Disk>) -> Arc<Engine> {
    let cfg = CgConfig {
        max_coordination_time: Duration::from_secs(60),
        ..CgConfig::new(DISK_SIZE)
    };
    Engine::new(cfg, 1, disk.clone()).expect("engine")
}

fn shared(
    disk: &Arc<Disk>,
    tracking: Option<Arc<dyn Tracking>>,
    poll: Option<Duration>,
) -> Arc<DeviceShared> {
    Arc::new(DeviceShared {
        executor: Arc::new(Executor::new(disk.clone(), SERIAL, tracking)),
        limits: DeviceLimits::new(DISK_SIZE, 512, 1, QUEUE_SIZE, false),
        queue_size: QUEUE_SIZE,
        threads: 1,
        worker: WorkerOptions { poll },
        stats: DeviceStats::default(),
    })
}

/// The device's view of the driver's queue, as vhost-user would set it up.
fn vring(atomic: &GuestMemoryAtomic<GuestMemoryMmap<()>>, driver: &Driver) -> VringRwLock {
    let vring = VringRwLock::new(atomic.clone(), QUEUE_SIZE).expect("vring");
    vring.set_queue_size(QUEUE_SIZE);
    vring
        .set_queue_info(
            driver.queue.desc_table_addr().0,
            driver.queue.avail_addr().0,
            driver.queue.used_addr().0,
        )
        .expect("queue addresses");
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    vring
}

/// Makes request `i` available: header, `data`, status (pre-set to 0xff, so a status that
/// was never written shows).
fn push(
    mem: &GuestMemoryMmap<()>,
    driver: &mut Driver,
    i: u64,
    req_type: u32,
    sector: u64,
    data: &[Buf],
) -> u16 {
    let s = slot(i);
    put_header(mem, s.hdr, req_type, sector);
    mem.write_obj(0xffu8, GuestAddress(s.status))
        .expect("status");
    let mut bufs = vec![ro(s.hdr, 16)];
    bufs.extend_from_slice(data);
    bufs.push(wo(s.status, 1));
    driver.push(&bufs)
}

fn status_of(mem: &GuestMemoryMmap<()>, i: u64) -> u8 {
    mem.read_obj(GuestAddress(slot(i).status)).expect("status")
}

fn guest_bytes(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr))
        .expect("guest read");
    v
}

fn disk_bytes(disk: &Disk, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    disk.read_at(&mut v, offset).expect("disk read");
    v
}

#[test]
fn every_request_type_completes_in_order_with_its_length() {
    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    disk.write_at(&[0xab; 4096], 8 * 512).expect("seed");
    disk.write_at(&[0x77; 4096], 64 * 512).expect("seed");
    let shared = shared(&disk, None, None);
    let mut driver = Driver::new(&mem, QUEUE_SIZE);
    let vring = vring(&atomic, &driver);

    let d = |i| slot(i).data;
    mem.write_slice(&[0xcd; 1024], GuestAddress(d(1)))
        .expect("payload");
    let seg_len = put_segments(&mem, d(6), &[(64, 8, 0)]);
    // Request 7 has no status descriptor: its status byte must stay untouched.
    mem.write_obj(0xffu8, GuestAddress(slot(7).status))
        .expect("status");
    put_header(&mem, slot(9).hdr, VIRTIO_BLK_T_IN, 8);
    let table = indirect(
        &mem,
        slot(9).data + 0x800,
        &[ro(slot(9).hdr, 16), wo(d(9), 512), wo(slot(9).status, 1)],
    );
    let heads = vec![
        push(&mem, &mut driver, 0, VIRTIO_BLK_T_IN, 8, &[wo(d(0), 4096)]),
        push(
            &mem,
            &mut driver,
            1,
            VIRTIO_BLK_T_OUT,
            16,
            &[ro(d(1), 1024)],
        ),
        push(&mem, &mut driver, 2, VIRTIO_BLK_T_FLUSH, 0, &[]),
        push(
            &mem,
            &mut driver,
            3,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[wo(d(3), 32)],
        ),
        // Rejected with a status: unaligned read.
        push(&mem, &mut driver, 4, VIRTIO_BLK_T_IN, 0, &[wo(d(4), 100)]),
        // Rejected with a status: unknown type.
        push(&mem, &mut driver, 5, 77, 0, &[]),
        push(
            &mem,
            &mut driver,
            6,
            VIRTIO_BLK_T_WRITE_ZEROES,
            0,
            &[ro(d(6), seg_len)],
        ),
        // Rejected without a status: the chain has no writable last descriptor.
        driver.push(&[ro(slot(7).hdr, 16)]),
        push(
            &mem,
            &mut driver,
            8,
            VIRTIO_BLK_T_DISCARD,
            0,
            &[ro(d(6), seg_len)],
        ),
        // An indirect chain.
        driver.push_raw(&[table]),
    ];

    let mut worker = QueueWorker::new(0, shared.clone());
    worker.run(&vring, &atomic).expect("run");

    let lens = [4097, 1, 1, 21, 1, 1, 1, 0, 1, 513];
    let expected: Vec<(u16, u32)> = heads.iter().copied().zip(lens).collect();
    assert_eq!(driver.used(), expected);
    let statuses: Vec<u8> = (0..10).map(|i| status_of(&mem, i)).collect();
    let (ok, ioerr, unsupp) = (status::OK, status::IOERR, status::UNSUPP);
    assert_eq!(
        statuses,
        vec![ok, ok, ok, ok, ioerr, unsupp, ok, 0xff, ok, ok]
    );
    assert_eq!(guest_bytes(&mem, d(0), 4096), vec![0xab; 4096]);
    assert_eq!(disk_bytes(&disk, 16 * 512, 1024), vec![0xcd; 1024]);
    let mut id = SERIAL.as_bytes().to_vec();
    id.resize(20, 0);
    assert_eq!(guest_bytes(&mem, d(3), 20), id);
    assert_eq!(disk_bytes(&disk, 64 * 512, 4096), vec![0; 4096]);
    assert_eq!(guest_bytes(&mem, d(9), 512), vec![0xab; 512]);
    assert_eq!(shared.stats.requests.load(Ordering::Relaxed), 10);
    assert_eq!(shared.stats.rejected.load(Ordering::Relaxed), 3);
    assert_eq!(vring.queue_next_avail(), 10);
}

#[test]
fn more_than_one_batch_is_published_in_order() {
    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    let shared = shared(&disk, None, None);
    let mut driver = Driver::new(&mem, QUEUE_SIZE);
    let vring = vring(&atomic, &driver);
    // 40 requests: one batch of 32 is published before the rest.
    let heads: Vec<u16> = (0..40)
        .map(|i| {
            push(
                &mem,
                &mut driver,
                i,
                VIRTIO_BLK_T_GET_ID,
                0,
                &[wo(slot(i).data, 20)],
            )
        })
        .collect();
    QueueWorker::new(0, shared.clone())
        .run(&vring, &atomic)
        .expect("run");
    let expected: Vec<(u16, u32)> = heads.iter().map(|&h| (h, 21)).collect();
    assert_eq!(driver.used(), expected);
    assert_eq!(shared.stats.requests.load(Ordering::Relaxed), 40);
}

#[test]
fn frozen_gate_holds_completions_until_run_publishes_them_in_order() {
    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    let engine = engine(&disk);
    let tracking: Arc<dyn Tracking> = engine.clone();
    let shared = shared(&disk, Some(tracking), None);
    let mut driver = Driver::new(&mem, QUEUE_SIZE);
    let vring = vring(&atomic, &driver);
    let mut worker = QueueWorker::new(0, shared.clone());

    // Freeze queue 0's gate by hand, as the first step of a formation does.
    engine.queues_for_test()[0].lock().expect("gate").frozen = true;
    mem.write_slice(&[0x5a; 512], GuestAddress(slot(0).data))
        .expect("payload");
    let mut heads = vec![
        push(
            &mem,
            &mut driver,
            0,
            VIRTIO_BLK_T_OUT,
            0,
            &[ro(slot(0).data, 512)],
        ),
        push(
            &mem,
            &mut driver,
            1,
            VIRTIO_BLK_T_IN,
            0,
            &[wo(slot(1).data, 512)],
        ),
        push(&mem, &mut driver, 2, VIRTIO_BLK_T_FLUSH, 0, &[]),
    ];
    worker.run(&vring, &atomic).expect("run");
    // Executed (statuses written, the write tracked and on disk) but not published.
    assert!(driver.used().is_empty());
    assert_eq!(engine.held(0), 3);
    assert_eq!(
        (0..3).map(|i| status_of(&mem, i)).collect::<Vec<_>>(),
        [0; 3]
    );
    assert_eq!(guest_bytes(&mem, slot(1).data, 512), vec![0x5a; 512]);
    assert_eq!(engine.stats().oos_dirty, 1);

    // A second kick, more than a batch: still held, behind the first three.
    heads.extend((3..38).map(|i| {
        push(
            &mem,
            &mut driver,
            i,
            VIRTIO_BLK_T_GET_ID,
            0,
            &[wo(slot(i).data, 20)],
        )
    }));
    worker.run(&vring, &atomic).expect("run");
    assert!(driver.used().is_empty());
    assert_eq!(engine.held(0), 38);

    // A formation freezes, swaps and runs: "run" publishes everything held, in order,
    // through the publisher the worker installed.
    assert_eq!(engine.form_cg().expect("form").cg, 1);
    let lens = [1, 513, 1].into_iter().chain([21; 35]);
    let expected: Vec<(u16, u32)> = heads.iter().copied().zip(lens).collect();
    assert_eq!(driver.used(), expected);
    assert_eq!(engine.held(0), 0);

    // Not frozen any more: the next completion is published at once.
    let h = push(&mem, &mut driver, 38, VIRTIO_BLK_T_FLUSH, 0, &[]);
    worker.run(&vring, &atomic).expect("run");
    assert_eq!(driver.used().last(), Some(&(h, 1)));
    assert_eq!(driver.used().len(), 39);
}

#[test]
fn disabled_ring_is_left_alone_until_enabled() {
    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    let mut driver = Driver::new(&mem, QUEUE_SIZE);
    let vring = vring(&atomic, &driver);
    let mut worker = QueueWorker::new(0, shared(&disk, None, None));
    let h = push(&mem, &mut driver, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    vring.set_enabled(false);
    worker.run(&vring, &atomic).expect("run");
    assert!(driver.used().is_empty());
    assert_eq!(vring.queue_next_avail(), 0);
    vring.set_enabled(true);
    worker.run(&vring, &atomic).expect("run");
    assert_eq!(driver.used(), vec![(h, 1)]);
}

#[test]
fn poll_mode_processes_and_returns_once_idle() {
    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    let mut driver = Driver::new(&mem, QUEUE_SIZE);
    let vring = vring(&atomic, &driver);
    let mut worker = QueueWorker::new(0, shared(&disk, None, Some(Duration::from_millis(1))));
    let h = push(&mem, &mut driver, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    worker.run(&vring, &atomic).expect("run");
    assert_eq!(driver.used(), vec![(h, 1)]);
    // Nothing to do: polls for its budget, then returns.
    worker.run(&vring, &atomic).expect("run");
    assert_eq!(driver.used().len(), 1);
}

#[test]
fn guest_is_notified_only_when_something_was_published() {
    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    let mut driver = Driver::new(&mem, QUEUE_SIZE);
    let vring = vring(&atomic, &driver);
    let call = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let fd = call.try_clone().expect("dup").into_raw_fd();
    // SAFETY: `fd` is a freshly duplicated descriptor that nothing else owns; the File
    // (then the vring's notifier) takes sole ownership of it.
    vring.set_call(Some(unsafe { File::from_raw_fd(fd) }));
    let mut worker = QueueWorker::new(0, shared(&disk, None, None));

    worker.run(&vring, &atomic).expect("run");
    assert!(call.read().is_err(), "no completion, no notification");
    push(&mem, &mut driver, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    worker.run(&vring, &atomic).expect("run");
    assert!(call.read().expect("notified") >= 1);
}

/// With two threads, queue 1's kick reaches thread 1 as its event 0 (vhost-user-backend
/// numbers a thread's events by its own queues). It must run queue 1's worker and gate:
/// read as queue 0, a completion held by a freeze went to queue 0's gate, whose "run"
/// published it on queue 0's ring, and the guest waited for it forever.
#[test]
fn a_kick_of_the_second_threads_queue_runs_that_queues_worker_and_gate() {
    use crate::blk::device::BlkBackend;
    use vhost_user_backend::VhostUserBackend;
    use vmm_sys_util::epoll::EventSet;

    let mem = guest_memory();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (_dir, disk) = disk();
    let cfg = CgConfig {
        max_coordination_time: Duration::from_secs(60),
        ..CgConfig::new(DISK_SIZE)
    };
    let engine = Engine::new(cfg, 2, disk.clone()).expect("engine");
    let tracking: Arc<dyn Tracking> = engine.clone();
    let shared = Arc::new(DeviceShared {
        executor: Arc::new(Executor::new(disk.clone(), SERIAL, Some(tracking))),
        limits: DeviceLimits::new(DISK_SIZE, 512, 2, QUEUE_SIZE, false),
        queue_size: QUEUE_SIZE,
        threads: 2,
        worker: WorkerOptions { poll: None },
        stats: DeviceStats::default(),
    });
    let backend = BlkBackend::new(shared, atomic.clone()).expect("backend");
    let mut driver = Driver::at(&mem, QUEUE_SIZE, GuestAddress(0x8000));
    let ring1 = vring(&atomic, &driver);

    // A formation has frozen queue 1's gate.
    engine.queues_for_test()[1].lock().expect("gate").frozen = true;
    let head = push(&mem, &mut driver, 0, VIRTIO_BLK_T_FLUSH, 0, &[]);
    backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(&ring1), 1)
        .expect("event");
    assert_eq!(engine.held(1), 1, "queue 1's gate holds the completion");
    assert_eq!(engine.held(0), 0);
    assert!(driver.used().is_empty());

    // "Run" publishes it on queue 1's ring.
    engine.form_cg().expect("form");
    assert_eq!(driver.used(), vec![(head, 1)]);
    assert_eq!(status_of(&mem, 0), status::OK);
}
