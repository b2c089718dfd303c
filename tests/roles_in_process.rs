//! The role changes with both sites in this process (the same code as `drblk serve` and
//! `drblk secondary`, driven through their control sockets): verify, demote, promote
//! through the secondary's socket, the old primary rejoining with nothing to resync, and a
//! secondary whose state was reset getting a checksum resync. `tests/roles.rs` runs the
//! same operations through the binaries.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drblk::cli::ServeArgs;
use drblk::control::{client, control_path, PrimaryStatus, Request};
use drblk::site::primary::Server;
use drblk::site::secondary::{Secondary, SecondaryPaths};
use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

const SIZE: u64 = 8 << 20;

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    // A hang guard only.
    let deadline = Instant::now() + Duration::from_secs(300);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn secondary(dir: &Path, certs: &Path, site: &str, img: &str) -> (Secondary, PathBuf) {
    secondary_of(dir, certs, site, &[img])
}

/// A secondary of the images `imgs` (a group when several), its state in `IMGS[0].state`.
fn secondary_of(dir: &Path, certs: &Path, site: &str, imgs: &[&str]) -> (Secondary, PathBuf) {
    let img = imgs[0];
    let identity = drblk::link::SiteIdentity::load(certs, site).unwrap();
    let peer = if site == "secondary" {
        "primary"
    } else {
        "secondary"
    };
    let mut s = Secondary::start(
        SecondaryPaths {
            images: imgs.iter().map(|i| dir.join(i)).collect(),
            state_dir: dir.join(format!("{img}.state")),
            discard_local_changes: false,
            remove: Vec::new(),
        },
        identity,
        "127.0.0.1:0".parse().unwrap(),
        Some(peer.into()),
        None,
    )
    .unwrap();
    let ctl = dir.join(format!("{img}.ctl"));
    s.serve_control(&ctl).unwrap();
    (s, ctl)
}

fn primary(dir: &Path, certs: &Path, site: &str, img: &str, to: &Secondary) -> (Server, PathBuf) {
    let (server, socks) = primary_of(dir, certs, site, &[img], to);
    (server, socks[0].clone())
}

/// A primary serving `imgs` (a group when several) on `IMG.sock` each.
fn primary_of(
    dir: &Path,
    certs: &Path,
    site: &str,
    imgs: &[&str],
    to: &Secondary,
) -> (Server, Vec<PathBuf>) {
    let socks: Vec<PathBuf> = imgs.iter().map(|i| dir.join(format!("{i}.sock"))).collect();
    let mut a = ServeArgs::new(dir.join(imgs[0]), socks[0].clone());
    for (i, s) in imgs.iter().zip(&socks).skip(1) {
        a.add_disk(dir.join(i), s.clone());
    }
    a.queues = 2;
    a.cg.cg_interval = Duration::from_millis(20).into();
    a.replication.replicate_to = Some(to.local_addr().unwrap().to_string());
    a.replication.certs = certs.to_path_buf();
    a.replication.site = site.into();
    a.replication.peer_site = if site == "primary" {
        "secondary".into()
    } else {
        "primary".into()
    };
    (Server::start(&a).unwrap(), socks)
}

fn status(sock: &Path) -> PrimaryStatus {
    client::status(sock).unwrap()
}

fn write_blocks(sock: &Path, blocks: &[u64], byte: u8) {
    let mut f = TestFrontend::connect(sock, 2, 256, true).unwrap();
    f.write_mem(DATA_BASE, &[byte; 4096]).unwrap();
    for &b in blocks {
        let (st, _) = f
            .request(1, VIRTIO_BLK_T_OUT, b * 8, &[Desc::r(DATA_BASE, 4096)])
            .unwrap();
        assert_eq!(st, 0);
    }
}

#[test]
fn verify_demote_promote_and_rejoin_in_process() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("drblk=info")
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = common::make_certs(dir);
    std::fs::write(dir.join("a.img"), vec![0u8; SIZE as usize]).unwrap();

    // a → b.
    let (b, b_ctl) = secondary(dir, &certs, "secondary", "b.img");
    let (a, a_sock) = primary(dir, &certs, "primary", "a.img", &b);
    wait_until("the initial copy", || {
        status(&a_sock)
            .replication
            .is_some_and(|r| r.last_committed_cg > 0)
    });
    write_blocks(&a_sock, &[1, 2, 300, 2047], 0xa1);
    wait_until("the frontend to go", || {
        status(&a_sock).frontends_connected == 0
    });
    // Verify: nothing differs; a block changed behind drblk's back is found.
    let v = client::request_at(&control_path(&a_sock), Request::Verify { repair: false }).unwrap();
    assert_eq!(v["differing"], 0, "{v}");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("b.img"))
            .unwrap();
        f.write_all_at(&[0x77; 10], 5 * 4096).unwrap();
    }
    let v = client::request_at(&control_path(&a_sock), Request::Verify { repair: true }).unwrap();
    assert_eq!(v["first_differing"], serde_json::json!([5]), "{v}");
    // A secondary's command on the primary, and the other way round, are refused.
    assert!(client::request_at(&control_path(&a_sock), Request::Promote { force: false }).is_err());
    assert!(client::request_at(&b_ctl, Request::Drain).is_err());
    let sst = client::request_at(&b_ctl, Request::Status).unwrap();
    assert!(
        sst["state"].as_str().unwrap().contains("consistent"),
        "{sst}"
    );

    // Switchover: demote a, promote b through its socket.
    let d = client::request_at(&control_path(&a_sock), Request::Demote { force: false }).unwrap();
    let demoted_at = d["cg"].as_u64().unwrap();
    assert!(client::request_at(&control_path(&a_sock), Request::Demote { force: false }).is_err());
    a.stop().unwrap();
    let p = client::request_at(&b_ctl, Request::Promote { force: false }).unwrap();
    assert_eq!(p["cg"].as_u64(), Some(demoted_at), "{p}");
    assert!(p["report"].as_str().unwrap().contains("promoted"));
    b.stop();
    assert_eq!(
        std::fs::read(dir.join("a.img")).unwrap(),
        std::fs::read(dir.join("b.img")).unwrap(),
        "the switchover lost data"
    );
    // A demoted disk is not served for writing; a replica is not either.
    let mut again = ServeArgs::new(dir.join("a.img"), dir.join("x.sock"));
    again.queues = 1;
    assert!(Server::start(&again)
        .err()
        .unwrap()
        .to_string()
        .contains("demoted at CG"));

    // b → a: a rejoins at the demoted group, nothing is resynced.
    let (a2, _a2_ctl) = secondary(dir, &certs, "primary", "a.img");
    let (b2, b_sock) = primary(dir, &certs, "secondary", "b.img", &a2);
    wait_until("b's first group on a", || {
        status(&b_sock)
            .replication
            .is_some_and(|r| r.last_committed_cg > demoted_at)
    });
    let st = status(&b_sock);
    assert_eq!(st.replication.unwrap().chunks_shipped, 0);
    assert_eq!(st.link.as_ref().unwrap().full_resyncs, 0);
    write_blocks(&b_sock, &[7, 8], 0xb2);
    wait_until("the frontend to go", || {
        status(&b_sock).frontends_connected == 0
    });
    client::drain(&b_sock).unwrap();

    // a's state directory is lost: a checksum resync, not a full copy.
    a2.stop();
    std::fs::remove_dir_all(dir.join("a.img.state")).unwrap();
    let before = status(&b_sock).replication.unwrap().chunks_shipped;
    let (a3, _) = secondary(dir, &certs, "primary", "a.img");
    b2.shutdown_handle().request();
    drop(b2);
    let (b3, b_sock) = primary(dir, &certs, "secondary", "b.img", &a3);
    wait_until("the resync", || {
        status(&b_sock)
            .replication
            .is_some_and(|r| r.last_committed_cg > 0)
    });
    let st = status(&b_sock);
    let link = st.link.unwrap();
    assert_eq!(link.checksum_resyncs, 1, "{link:?}");
    assert_eq!(link.resync_differing, 0, "{link:?}");
    let _ = before;
    client::drain(&b_sock).unwrap();
    b3.stop().unwrap();
    a3.stop();
    assert_eq!(
        std::fs::read(dir.join("a.img")).unwrap(),
        std::fs::read(dir.join("b.img")).unwrap()
    );
}

fn read_block(f: &mut TestFrontend, b: u64) -> Vec<u8> {
    let (st, _) = f
        .request(
            0,
            virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN,
            b * 8,
            &[Desc::w(DATA_BASE, 4096)],
        )
        .unwrap();
    assert_eq!(st, 0, "read of block {b}");
    f.read_mem(DATA_BASE, 4096).unwrap()
}

#[test]
fn a_drill_in_process_keeps_its_group_and_its_writes_and_ends_with_a_promotion() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = common::make_certs(dir);
    std::fs::write(dir.join("a.img"), vec![0u8; SIZE as usize]).unwrap();
    let (b, b_ctl) = secondary(dir, &certs, "secondary", "b.img");
    let (_a, a_sock) = primary(dir, &certs, "primary", "a.img", &b);
    let committed = || {
        status(&a_sock)
            .replication
            .map_or(0, |r| r.last_committed_cg)
    };
    wait_until("the initial copy", || committed() > 0);
    write_blocks(&a_sock, &[1], 0xa1);
    let cg = client::drain(&a_sock).unwrap();

    let dsock = dir.join("drill.sock");
    // More space than the filesystem has: refused, nothing left behind.
    let huge = Request::DrillStart {
        sockets: vec![dsock.clone()],
        space: Some(1 << 60),
    };
    let refused = client::request_at(&b_ctl, huge).unwrap_err();
    assert!(refused.to_string().contains("--drill-space"), "{refused}");
    assert!(!dir.join("b.img.state/drill").exists());
    assert!(!dsock.exists());
    let start = Request::DrillStart {
        sockets: vec![dsock.clone()],
        space: Some(16 << 20),
    };
    let st = client::request_at(&b_ctl, start.clone()).unwrap();
    assert!(st["cg"].as_u64().unwrap() >= cg, "{st}");
    let refused = client::request_at(&b_ctl, start.clone()).unwrap_err();
    assert!(refused.to_string().contains("drill stop"), "{refused}");
    let mut f = TestFrontend::connect(&dsock, 1, 256, true).unwrap();
    assert_eq!(read_block(&mut f, 1), vec![0xa1; 4096]);
    f.write_mem(DATA_BASE, &[0x5d; 4096]).unwrap();
    let (w, _) = f
        .request(0, VIRTIO_BLK_T_OUT, 5 * 8, &[Desc::r(DATA_BASE, 4096)])
        .unwrap();
    assert_eq!(w, 0);

    // A later group overwrites block 1 on the replica; the drill keeps its group.
    write_blocks(&a_sock, &[1], 0xb2);
    client::drain(&a_sock).unwrap();
    assert_eq!(read_block(&mut f, 1), vec![0xa1; 4096]);
    assert_eq!(read_block(&mut f, 5), vec![0x5d; 4096]);
    let img = std::fs::read(dir.join("b.img")).unwrap();
    assert_eq!(&img[4096..8192], &[0xb2; 4096][..]);
    assert_eq!(
        &img[5 * 4096..6 * 4096],
        &[0; 4096][..],
        "a drill write reached the replica"
    );
    let st = b.drill_status();
    assert_eq!(st.preserved_bytes, 4096, "{st:?}");
    assert_eq!(st.overlay_bytes, 4096, "{st:?}");
    assert!(st.frontend_connected, "{st:?}");
    drop(f);

    let stopped = client::request_at(&b_ctl, Request::DrillStop).unwrap();
    assert_eq!(stopped["running"], true, "{stopped}");
    assert!(!b.drill_status().running);
    assert!(client::request_at(&b_ctl, Request::DrillStop).is_err());

    // A promotion stops a running drill; a promoted replica takes none.
    client::request_at(&b_ctl, start.clone()).unwrap();
    client::request_at(&b_ctl, Request::Promote { force: false }).unwrap();
    assert!(!b.drill_status().running);
    assert!(!dir.join("b.img.state/drill").exists());
    let refused = client::request_at(&b_ctl, start).unwrap_err();
    assert!(refused.to_string().contains("promoted"), "{refused}");
    b.stop();
}

#[test]
fn status_and_metrics_of_both_sites_in_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = common::make_certs(dir);
    std::fs::write(dir.join("a.img"), vec![0u8; SIZE as usize]).unwrap();
    let (mut b, b_ctl) = secondary(dir, &certs, "secondary", "b.img");
    let b_metrics = b
        .serve_metrics(drblk::metrics::MetricsServer::bind("127.0.0.1:0").unwrap())
        .unwrap();
    let (_a, a_sock) = primary(dir, &certs, "primary", "a.img", &b);
    wait_until("the initial copy", || {
        status(&a_sock)
            .replication
            .is_some_and(|r| r.last_committed_cg > 0)
    });
    write_blocks(&a_sock, &[1, 2, 3], 0x5a);
    client::drain(&a_sock).unwrap();

    // `drblk status` once, as JSON, and watching, on both control sockets.
    use drblk::control::watch::{run, StatusRequest};
    for (control, json, watch) in [
        (control_path(&a_sock), false, false),
        (b_ctl.clone(), false, false),
        (control_path(&a_sock), true, false),
        (b_ctl.clone(), false, true),
        (control_path(&a_sock), true, true),
    ] {
        run(&StatusRequest {
            control,
            json,
            watch,
            interval: Duration::from_millis(5),
            count: Some(2),
        })
        .unwrap();
    }
    let summary = drblk::control::summary::render(
        &drblk::control::summary::AnyStatus::from_json(
            client::request_at(&b_ctl, Request::Status).unwrap(),
        )
        .unwrap(),
        None,
    );
    assert!(
        summary.contains("state       consistent at CG"),
        "{summary}"
    );

    // The secondary's endpoint.
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(b_metrics).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(
        text.contains("drblk_replica_state{state=\"consistent\"} 1"),
        "{text}"
    );
    assert!(text.contains("drblk_applied_bytes_total "), "{text}");

    // Stopping does not wait for the metrics thread (it held the replica until its 60 s
    // bound; a stop on the slowest machine takes a few seconds).
    let t = Instant::now();
    b.stop();
    assert!(t.elapsed() < Duration::from_secs(45), "{:?}", t.elapsed());
}

/// A group of two disks with both sites in this process (as `tests/group.rs` does through
/// the binaries): replication, verify across both disks (a block changed on the second
/// replica is found and repaired), switchover (demote through the second disk's socket,
/// promote through the secondary's socket), and the old primary's pair rejoining with
/// nothing to resync.
#[test]
fn a_group_of_two_disks_verifies_switches_over_and_rejoins_in_process() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("drblk=info")
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = common::make_certs(dir);
    let names = [["a.img", "a2.img"], ["b.img", "b2.img"]];
    for n in names[0] {
        std::fs::write(dir.join(n), vec![0u8; SIZE as usize]).unwrap();
    }
    let group_secondary = |site: &str, imgs: [&str; 2]| secondary_of(dir, &certs, site, &imgs);
    let group_primary =
        |site: &str, imgs: [&str; 2], to: &Secondary| primary_of(dir, &certs, site, &imgs, to);
    let committed = |sock: &Path| status(sock).replication.map_or(0, |r| r.last_committed_cg);

    let (b, b_ctl) = group_secondary("secondary", names[1]);
    let (a, a_socks) = group_primary("primary", names[0], &b);
    wait_until("the initial copy", || committed(&a_socks[0]) > 0);
    assert_eq!(status(&a_socks[0]).group.len(), 2);
    write_blocks(&a_socks[0], &[1, 2, 300], 0xa1);
    write_blocks(&a_socks[1], &[7, 2047], 0xa2);
    wait_until("the frontends to go", || {
        status(&a_socks[0])
            .group
            .iter()
            .all(|m| m.frontends_connected == 0)
    });
    // Verify walks both disks; a block changed behind drblk's back on the second replica
    // is found, and repaired by the next group.
    let v = client::request_at(
        &control_path(&a_socks[0]),
        Request::Verify { repair: false },
    )
    .unwrap();
    assert_eq!(v["differing"], 0, "{v}");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("b2.img"))
            .unwrap();
        f.write_all_at(&[0x77; 10], 9 * 4096).unwrap();
    }
    let v =
        client::request_at(&control_path(&a_socks[1]), Request::Verify { repair: true }).unwrap();
    assert_eq!(v["differing"], 1, "{v}");
    let _ = client::request_at(&control_path(&a_socks[0]), Request::Drain).unwrap();
    for (x, y) in names[0].iter().zip(names[1]) {
        assert!(
            std::fs::read(dir.join(x)).unwrap() == std::fs::read(dir.join(y)).unwrap(),
            "{x} and {y} differ"
        );
    }

    // Switchover: demote through the second disk's socket, promote through the secondary's.
    let d =
        client::request_at(&control_path(&a_socks[1]), Request::Demote { force: false }).unwrap();
    let demoted_at = d["cg"].as_u64().unwrap();
    a.stop().unwrap();
    let p = client::request_at(&b_ctl, Request::Promote { force: false }).unwrap();
    assert_eq!(p["cg"].as_u64(), Some(demoted_at), "{p}");
    b.stop();
    for n in names[1] {
        let l = drblk::lineage::Lineage::load(&dir.join(n))
            .unwrap()
            .unwrap();
        assert_eq!(l.role, drblk::lineage::Role::Promoted, "{n}");
    }

    // The promoted pair serves and replicates back; the old pair rejoins with nothing to
    // resync.
    let (a2, _) = group_secondary("primary", names[0]);
    let (b2, b_socks) = group_primary("secondary", names[1], &a2);
    wait_until("the first group back", || {
        committed(&b_socks[0]) > demoted_at
    });
    let st = status(&b_socks[0]);
    assert_eq!(st.replication.unwrap().chunks_shipped, 0);
    assert_eq!(st.link.unwrap().full_resyncs, 0);
    b2.stop().unwrap();
    a2.stop();
}
