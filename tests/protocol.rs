//! vhost-user protocol behaviour through vhost's `Frontend`: config space, memory table
//! updates, vring enable/disable, and reconnection.

mod common;

use std::time::Duration;

use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;

const SIZE: u64 = 8 << 20;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().unwrap())
}

#[test]
fn config_space_describes_the_disk() {
    let s = common::start(SIZE, |a| a.queue_size = 128);
    let mut f = TestFrontend::connect(&s.socket, 2, 128, true).unwrap();
    let feats = f.features();
    for bit in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_ne!(feats & (1 << bit), 0, "feature bit {bit} offered");
    }
    assert_eq!(feats & (1 << VIRTIO_BLK_F_RO), 0);
    let c = f.config(0, 60).unwrap();
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().unwrap()),
        SIZE / 512,
        "capacity"
    );
    assert_eq!(le32(&c[12..16]), 126, "seg_max = queue size - 2");
    assert_eq!(le32(&c[20..24]), 512, "blk_size");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2, "num_queues");
    assert!(
        le32(&c[36..40]) > 0 && le32(&c[40..44]) > 0,
        "discard limits"
    );
    assert!(
        le32(&c[48..52]) > 0 && le32(&c[52..56]) > 0,
        "write-zeroes limits"
    );
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    // A partial read at an offset returns exactly the bytes asked for.
    let nq = f.config(34, 2).unwrap();
    assert_eq!(nq, vec![2, 0]);
    assert_eq!(f.vhost().get_queue_num().unwrap(), 2);
}

#[test]
fn memory_regions_can_be_added_and_removed() {
    let s = common::start(SIZE, |_| {});
    let mut f = TestFrontend::connect(&s.socket, 1, 256, true).unwrap();
    // Alias guest memory [DATA_BASE, +1 MiB) at GPA 64 MiB.
    const ALIAS: u64 = 64 << 20;
    let region = f.region_info(DATA_BASE, 1 << 20);
    let region = vhost::VhostUserMemoryRegionInfo {
        guest_phys_addr: ALIAS,
        ..region
    };
    f.vhost().add_mem_region(&region).unwrap();
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_IN, 8, &[Desc::w(ALIAS, 4096)])
        .unwrap();
    assert_eq!(st, OK, "read into the added region");
    let image = std::fs::read(&s.disk).unwrap();
    assert_eq!(f.read_mem(DATA_BASE, 4096).unwrap(), &image[4096..8192]);
    f.vhost().remove_mem_region(&region).unwrap();
    let (st, _) = f
        .request(0, VIRTIO_BLK_T_IN, 8, &[Desc::w(ALIAS, 4096)])
        .unwrap();
    assert_eq!(st, IOERR, "the removed region is no longer guest memory");
}

#[test]
fn disabled_vring_is_not_processed_until_enabled() {
    let s = common::start(SIZE, |_| {});
    let mut f = TestFrontend::connect(&s.socket, 2, 256, true).unwrap();
    f.vhost().set_vring_enable(1, false).unwrap();
    let hdr = DATA_BASE - 65536;
    f.write_mem(hdr, &[0u8; 16]).unwrap(); // IN, sector 0
    f.submit(
        1,
        &[
            Desc::r(hdr, 16),
            Desc::w(DATA_BASE, 512),
            Desc::w(hdr + 64, 1),
        ],
    )
    .unwrap();
    assert!(
        f.wait_used(1, 1, Duration::from_millis(300)).is_err(),
        "a disabled ring must not be processed"
    );
    // Queue 0 is unaffected.
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_IN, 0, &[Desc::w(DATA_BASE, 512)])
            .unwrap()
            .0,
        OK
    );
    f.vhost().set_vring_enable(1, true).unwrap();
    // A fresh kick after enabling processes the pending chain and the new one.
    f.submit(
        1,
        &[
            Desc::r(hdr, 16),
            Desc::w(DATA_BASE, 512),
            Desc::w(hdr + 64, 1),
        ],
    )
    .unwrap();
    assert_eq!(f.wait_used(1, 2, Duration::from_secs(60)).unwrap().len(), 2);
}

#[test]
fn vring_base_round_trips_and_reconnect_works() {
    let s = common::start(SIZE, |_| {});
    {
        let mut f = TestFrontend::connect(&s.socket, 1, 256, true).unwrap();
        for i in 0..5 {
            assert_eq!(
                f.request(0, VIRTIO_BLK_T_IN, i, &[Desc::w(DATA_BASE, 512)])
                    .unwrap()
                    .0,
                OK
            );
        }
        // GET_VRING_BASE stops the ring and reports how far it got.
        assert_eq!(f.vhost().get_vring_base(0).unwrap(), 5);
        f.write_mem(DATA_BASE, &[0x42u8; 4096]).unwrap();
    }
    // The frontend went away; a new one connects and finds the disk as it was.
    let mut f = TestFrontend::connect(&s.socket, 1, 256, true).unwrap();
    f.write_mem(DATA_BASE, &[0x42u8; 4096]).unwrap();
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_OUT, 0, &[Desc::r(DATA_BASE, 4096)])
            .unwrap()
            .0,
        OK
    );
    drop(f);
    let mut f = TestFrontend::connect(&s.socket, 2, 256, false).unwrap();
    assert_eq!(
        f.request(1, VIRTIO_BLK_T_IN, 0, &[Desc::w(DATA_BASE + 8192, 4096)])
            .unwrap()
            .0,
        OK
    );
    assert_eq!(
        f.read_mem(DATA_BASE + 8192, 4096).unwrap(),
        vec![0x42u8; 4096]
    );
}

#[test]
fn guest_can_switch_to_writethrough() {
    let s = common::start(SIZE, |_| {});
    let mut f = TestFrontend::connect(&s.socket, 1, 256, true).unwrap();
    assert_eq!(f.config(32, 1).unwrap(), vec![1], "writeback by default");
    f.vhost()
        .set_config(
            32,
            vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE,
            &[0],
        )
        .unwrap();
    assert_eq!(
        f.config(32, 1).unwrap(),
        vec![0],
        "writethrough after the guest set wce=0"
    );
    f.write_mem(DATA_BASE, &[7u8; 512]).unwrap();
    assert_eq!(
        f.request(0, VIRTIO_BLK_T_OUT, 0, &[Desc::r(DATA_BASE, 512)])
            .unwrap()
            .0,
        OK
    );
}
