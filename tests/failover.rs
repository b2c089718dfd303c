//! Failover through the real binaries: a primary (`drblk serve --replicate-to`) takes
//! dependent writes through vhost-user and replicates them to `drblk secondary`; both are
//! killed with SIGKILL at random moments (the secondary first in some rounds, so it dies
//! mid-apply); `drblk promote` recovers the replica and makes it writable. The promoted
//! image must pass the dependent-write check, hold at least every group the primary saw
//! acknowledged, and `drblk serve` must serve it — while before the promotion `drblk
//! serve` refuses the replica.
//!
//! Rounds: `DRBLK_FAILOVER_ROUNDS` (default 3; the full drill is 20).

mod common;

use common::sites::{text, Sites, BIN, SIZE};

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dw::History;
use drblk::control::PrimaryStatus;
use drblk_testkit::rng::RngExt;
use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;

/// One round; returns the CG promoted at.
fn round(seed: u64) -> u64 {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let mut rng = drblk_testkit::rng::seeded(seed);
    let mut secondary = s.secondary();
    let mut primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));

    // Dependent writes until the primary dies; the highest acknowledged group is polled.
    let history = Arc::new(Mutex::new(History::new(SIZE)));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (sock, h, stop) = (s.sock(), history.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
            common::dw::drive_until_killed(&mut f, &h, SIZE, seed, || stop.load(Ordering::SeqCst))
        })
    };
    let load_for = Duration::from_millis(rng.random_range(300..1500));
    let t0 = Instant::now();
    while t0.elapsed() < load_for {
        if let Some(c) = s.acked() {
            acked.fetch_max(c, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Odd rounds kill the secondary first, in the middle of its groups (mid-apply), then
    // the primary; even rounds the other way round.
    if seed % 2 == 1 {
        let _ = secondary.0.kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
        let _ = primary.0.kill();
    } else {
        let _ = primary.0.kill();
        std::thread::sleep(Duration::from_millis(rng.random_range(0..100)));
        let _ = secondary.0.kill();
    }
    let _ = primary.0.wait();
    let _ = secondary.0.wait();
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();

    // Before the promotion the replica is refused for writing.
    let refused = s.drblk(
        &["serve"],
        &[
            ("--disk", &s.replica()),
            ("--socket", &tmp.path().join("r.sock")),
        ],
    );
    assert!(!refused.status.success(), "served an unpromoted replica");
    assert!(
        text(&refused).contains("drblk promote --disk"),
        "{}",
        text(&refused)
    );

    let out = s.drblk(&["promote"], &[("--disk", &s.replica())]);
    let said = text(&out);
    assert!(out.status.success(), "promote failed: {said}\n{}", s.logs());
    let cg: u64 = said
        .split(" at CG ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no CG in {said:?}"));
    let acked = acked.load(Ordering::SeqCst);
    assert!(
        cg >= acked,
        "promoted at CG {cg}, but the primary saw {acked} acknowledged\n{said}"
    );
    let img = std::fs::read(s.replica()).unwrap();
    if let Err(e) = history.lock().unwrap().check(&img) {
        panic!(
            "the promoted image is not a consistent state: {e}\n{said}\n{}",
            s.logs()
        );
    }

    // A second promote changes nothing and says so.
    let again = s.drblk(&["promote"], &[("--disk", &s.replica())]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        text(&again).contains("already promoted"),
        "{}",
        text(&again)
    );

    // The promoted disk is served, and what it holds reads back through vhost-user.
    let sock = tmp.path().join("promoted.sock");
    let mut served = s.spawn(
        "promoted.log",
        &["serve", "--queues", "2"],
        &[("--disk", &s.replica()), ("--socket", &sock)],
    );
    s.wait_until("the promoted disk to be served", || {
        assert!(
            served.0.try_wait().unwrap().is_none(),
            "serving the promoted disk failed:\n{}",
            std::fs::read_to_string(tmp.path().join("promoted.log")).unwrap_or_default()
        );
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
    for block in [0u64, 1, SIZE / 4096 / 2, SIZE / 4096 - 1] {
        let (st, _) = f
            .request(0, VIRTIO_BLK_T_IN, block * 8, &[Desc::w(DATA_BASE, 4096)])
            .unwrap();
        assert_eq!(st, 0, "read of block {block}");
        let got = f.read_mem(DATA_BASE, 4096).unwrap();
        let at = (block * 4096) as usize;
        assert_eq!(got, img[at..at + 4096], "block {block} of the served disk");
    }
    println!("round {seed}: {writes} writes, promoted at CG {cg} (acknowledged {acked})");
    cg
}

#[test]
fn failover_after_kill_9_promotes_a_consistent_replica_that_serves() {
    let rounds: u64 = std::env::var("DRBLK_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for r in 0..rounds {
        round(0xfa11_0000 + r);
    }
}

#[test]
fn promote_refuses_what_is_no_replica_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("plain.img");
    std::fs::write(&img, vec![7u8; 1 << 20]).unwrap();
    let o = Command::new(BIN)
        .args(["promote", "--disk"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("holds no replica"), "{}", text(&o));
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("plain.img")]);
}

fn ctl_control(path: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["ctl", "--control"])
        .arg(path)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_running_secondary_is_promoted_through_its_control_socket_and_its_primary_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let _secondary = s.secondary();
    let _primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));
    let control = tmp.path().join("secondary.img.state/ctl");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&control).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let st = ctl_control(&control, &["status"]);
    assert!(st.status.success(), "{}", text(&st));
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        v["state"].as_str().unwrap().starts_with("consistent at CG"),
        "{v}"
    );
    assert_eq!(v["lineage"]["role"], "secondary");
    // A primary's command is refused here, and a secondary's on a primary.
    assert!(!ctl_control(&control, &["drain"]).status.success());
    let on_primary = ctl_control(&drblk::control::control_path(&s.sock()), &["promote"]);
    assert!(text(&on_primary).contains("promote is a secondary's command"));

    // Promote while the primary keeps writing.
    let history = Arc::new(Mutex::new(History::new(SIZE)));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sock, h, stop) = (s.sock(), history.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
            common::dw::drive(&mut f, &h, SIZE, || stop.load(Ordering::SeqCst))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let p = ctl_control(&control, &["promote"]);
    assert!(p.status.success(), "{}\n{}", text(&p), s.logs());
    assert!(text(&p).contains("promoted"), "{}", text(&p));
    let v: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap();
    let cg = v["cg"].as_u64().unwrap();
    let st: serde_json::Value =
        serde_json::from_slice(&ctl_control(&control, &["status"]).stdout).unwrap();
    assert_eq!(st["lineage"]["role"], "promoted");
    // The primary learns it at its next handshake and says so in its status.
    s.wait_until("the primary to report the promotion", || {
        Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(s.sock())
            .arg("status")
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<PrimaryStatus>(&o.stdout).ok())
            .and_then(|st| st.link)
            .is_some_and(|l| l.secondary.contains("the secondary was promoted"))
    });
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    // The replica stayed at the promoted group: a consistent state, nothing written since.
    let img = std::fs::read(s.replica()).unwrap();
    history.lock().unwrap().check(&img).unwrap();
    let again: serde_json::Value =
        serde_json::from_slice(&ctl_control(&control, &["status"]).stdout).unwrap();
    assert_eq!(again["last_committed_cg"].as_u64(), Some(cg));
}

#[test]
fn a_syncing_replica_is_promoted_only_with_force_and_a_corrupt_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    // Random content and a slow link: the initial copy takes a while.
    std::fs::write(
        tmp.path().join("primary.img"),
        drblk_testkit::rng::pattern(5, SIZE as usize),
    )
    .unwrap();
    let _secondary = s.secondary();
    let to = format!("127.0.0.1:{}", s.port);
    let _primary = s.spawn(
        "primary.log",
        &["serve", "--replicate-to", &to, "--max-rate", "256K"],
        &[
            ("--disk", &tmp.path().join("primary.img")),
            ("--socket", &s.sock()),
            ("--certs", &s.certs),
        ],
    );
    let control = tmp.path().join("secondary.img.state/ctl");
    s.wait_until("the initial copy to start", || {
        ctl_control(&control, &["status"]).status.success()
            && serde_json::from_slice::<serde_json::Value>(
                &ctl_control(&control, &["status"]).stdout,
            )
            .is_ok_and(|v| v["state"].as_str().is_some_and(|t| t.contains("syncing")))
    });
    let refused = ctl_control(&control, &["promote"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("still syncing"),
        "{}",
        text(&refused)
    );
    assert!(text(&refused).contains("--force"), "{}", text(&refused));
    let forced = ctl_control(&control, &["promote", "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert!(text(&forced).contains("although it was still syncing"));
    drop(_primary);
    drop(_secondary);

    // A corrupt state file: one clear error, nothing changed.
    let state = tmp.path().join("secondary.img.state/state.json");
    std::fs::write(&state, "{ garbage").unwrap();
    let lineage = std::fs::read(tmp.path().join("secondary.img.drblk-lineage")).unwrap();
    let o = s.drblk(&["promote"], &[("--disk", &s.replica())]);
    assert!(!o.status.success());
    assert!(text(&o).contains("state.json"), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&state).unwrap(), "{ garbage");
    assert_eq!(
        std::fs::read(tmp.path().join("secondary.img.drblk-lineage")).unwrap(),
        lineage
    );
}
