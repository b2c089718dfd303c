//! DR drills through the real binaries: `drblk ctl --control C drill start --socket S` on a
//! running `drblk secondary` while `drblk serve` keeps replicating dependent writes. The
//! drill's device (read and written through vhost-user) must show exactly its group, keep
//! showing it while later groups apply, keep its own writes to itself, and never change the
//! replica; a full drill space fails drill writes only; a promotion stops the drill, and a
//! restarted secondary removes a drill its predecessor left.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::dw::History;
use common::sites::{text, Sites, SIZE};
use common::write_device;
use drblk_testkit::test_frontend::TestFrontend;

fn read_device(f: &mut TestFrontend) -> Vec<u8> {
    common::read_device(f, SIZE)
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn drill_start(s: &Sites, sock: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["drill", "start", "--socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = s.ctl_control(&args);
    assert!(out.status.success(), "{}\n{}", text(&out), s.logs());
    json(&out)
}

fn connect(s: &Sites, sock: &Path) -> TestFrontend {
    s.wait_until("the drill's socket", || {
        std::os::unix::net::UnixStream::connect(sock).is_ok()
    });
    TestFrontend::connect(sock, 1, 256, true).unwrap()
}

/// The primary keeps writing dependent writes in the background until dropped.
struct Writer {
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Writer {
    fn start(s: &Sites) -> Writer {
        let history = Arc::new(Mutex::new(History::new(SIZE)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (sock, h, stop) = (s.sock(), history.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
                common::dw::drive(&mut f, &h, SIZE, || stop.load(Ordering::SeqCst))
            })
        };
        Writer {
            history,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[test]
fn a_drill_shows_its_group_while_replication_goes_on_and_keeps_its_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let secondary = s.secondary_with(&["--drill-space", "64M"]);
    let _primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));
    let writer = Writer::start(&s);
    s.wait_until("some dependent writes to replicate", || {
        writer.history.lock().unwrap().completions.len() > 2000 && s.acked().is_some_and(|c| c >= 5)
    });

    let sock = tmp.path().join("drill.sock");
    let started = drill_start(&s, &sock, &[]);
    let cg = started["cg"].as_u64().unwrap();
    assert_eq!(started["running"], true, "{started}");
    let mut f = connect(&s, &sock);
    // The drill's device is served below replication's CPU priority (its server thread
    // and its queues' workers: the secondary serves no other device).
    let pid = secondary.0.id();
    let nices = [
        thread_nices(pid, "drblk-drill"),
        thread_nices(pid, "vring_worker"),
    ]
    .concat();
    assert!(
        !nices.is_empty() && nices.iter().all(|&n| n == drblk::drill::DRILL_NICE),
        "the drill's threads run at niceness {nices:?}"
    );
    let first = read_device(&mut f);
    let found = writer
        .history
        .lock()
        .unwrap()
        .check(&first)
        .unwrap_or_else(|e| panic!("the drill's device at CG {cg}: {e}\n{}", s.logs()));
    assert!(found > 0, "the drill shows none of the primary's writes");

    // Twenty later groups apply on the replica; the drill's view does not move.
    s.wait_until("20 more groups", || s.acked().is_some_and(|c| c >= cg + 20));
    assert!(first == read_device(&mut f), "the drill's view changed");
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert!(st["preserved_bytes"].as_u64().unwrap() > 0, "{st}");
    assert_eq!(st["cg"].as_u64(), Some(cg));
    assert_eq!(st["frontend_connected"], true, "{st}");

    // The drill's own writes read back from it.
    let mine = vec![0xa5u8; 64 << 10];
    for off in [0u64, 4096 * 100 + 512, SIZE - (64 << 10)] {
        assert_eq!(write_device(&mut f, off, &mine), 0);
    }
    let after = read_device(&mut f);
    for off in [0u64, 4096 * 100 + 512, SIZE - (64 << 10)] {
        let at = off as usize;
        assert_eq!(
            &after[at..at + mine.len()],
            &mine[..],
            "drill write at {off}"
        );
    }
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert!(
        st["overlay_bytes"].as_u64().unwrap() >= 3 * (64 << 10),
        "{st}"
    );
    // A second drill is refused while one runs.
    let again = s.ctl_control(&["drill", "start", "--socket", "/tmp/x.sock"]);
    assert!(!again.status.success());
    assert!(text(&again).contains("drill stop"), "{}", text(&again));

    // The replica never saw the drill: it drains to the primary's exact image, which
    // passes the dependent-write check.
    let history = writer.history.clone();
    writer.finish();
    assert!(drain(&s) > cg);
    let replica = std::fs::read(s.replica()).unwrap();
    assert!(
        replica == std::fs::read(tmp.path().join("primary.img")).unwrap(),
        "the replica differs from the primary after the drain\n{}",
        s.logs()
    );
    history.lock().unwrap().check(&replica).unwrap();

    let stopped = s.ctl_control(&["drill", "stop"]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert_eq!(st["running"], false, "{st}");
    assert!(!tmp.path().join("secondary.img.state/drill").exists());
    assert!(!s.ctl_control(&["drill", "stop"]).status.success());
}

/// The niceness of each thread of process `pid` whose name starts with `prefix`.
fn thread_nices(pid: u32, prefix: &str) -> Vec<i32> {
    let mut nices = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) || comm.starts_with("drblk-drill-ra") {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the command's closing parenthesis start at field 3; nice is 19.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if let Some(n) = after.split_whitespace().nth(16) {
            nices.push(n.parse().unwrap());
        }
    }
    nices
}

/// Writes `blocks` 4 KiB blocks on the primary through a frontend of its own.
fn primary_writes(s: &Sites, first_block: u64, blocks: u64, byte: u8) {
    let mut f = TestFrontend::connect(&s.sock(), 2, 256, true).unwrap();
    for b in first_block..first_block + blocks {
        assert_eq!(write_device(&mut f, b * 4096, &[byte; 4096]), 0);
    }
}

/// `drblk ctl --socket PRIMARY drain`: the last committed group.
fn drain(s: &Sites) -> u64 {
    common::ctl::<serde_json::Value>(&s.sock(), "drain")["cg"]
        .as_u64()
        .unwrap()
}

#[test]
fn a_full_drill_space_fails_drill_writes_only_and_ends_the_drill_not_replication() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let _secondary = s.secondary();
    let _primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));
    primary_writes(&s, 0, 8, 1);
    drain(&s);

    // 64 blocks of space: the drill's 64 first blocks fit, the next write fails.
    let sock = tmp.path().join("drill.sock");
    drill_start(&s, &sock, &["--drill-space", "256K"]);
    let mut f = connect(&s, &sock);
    for b in 0..64u64 {
        assert_eq!(
            write_device(&mut f, (1000 + b) * 4096, &[2; 4096]),
            0,
            "block {b}"
        );
    }
    assert_ne!(
        write_device(&mut f, 2000 * 4096, &[2; 4096]),
        0,
        "a write past --drill-space succeeded"
    );
    // Reads still work, and show the drill's writes over its group.
    let img = read_device(&mut f);
    assert_eq!(&img[..4096], &[1; 4096][..]);
    assert_eq!(&img[1000 * 4096..1001 * 4096], &[2; 4096][..]);
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert_eq!(st["failed_writes"].as_u64(), Some(1), "{st}");
    assert!(
        s.logs().contains("the drill space is full"),
        "no error in the log:\n{}",
        s.logs()
    );

    // The primary writes blocks the drill reads from the replica: keeping them would pass
    // the space, so the drill ends; replication goes on and the replica is whole.
    primary_writes(&s, 0, 8, 3);
    let cg = drain(&s);
    assert_eq!(
        std::fs::read(s.replica()).unwrap(),
        std::fs::read(tmp.path().join("primary.img")).unwrap()
    );
    s.wait_until("the ended drill to be reaped", || {
        let st = json(&s.ctl_control(&["drill", "status"]));
        st["running"] == false
    });
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert!(
        st["last_ended"].as_str().unwrap().contains("--drill-space"),
        "{st}"
    );
    assert!(!tmp.path().join("secondary.img.state/drill").exists());
    // A later group still commits.
    primary_writes(&s, 8, 1, 4);
    assert!(drain(&s) > cg);
}

#[test]
fn a_promotion_stops_the_drill_and_a_restart_removes_a_drill_left_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Sites::new(tmp.path());
    let mut secondary = s.secondary();
    let primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));
    primary_writes(&s, 0, 4, 1);
    drain(&s);
    let drill_dir = tmp.path().join("secondary.img.state/drill");

    // kill -9 with a drill running: its files stay until the next start, which removes them.
    let sock = tmp.path().join("drill.sock");
    drill_start(&s, &sock, &[]);
    assert_eq!(write_device(&mut connect(&s, &sock), 0, &[9; 4096]), 0);
    let _ = secondary.0.kill();
    let _ = secondary.0.wait();
    assert!(drill_dir.exists());
    let _secondary = s.secondary();
    s.wait_until("the restarted secondary", || {
        s.ctl_control(&["status"]).status.success()
    });
    assert!(!drill_dir.exists(), "a drill survived its daemon");
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert_eq!(st["running"], false, "{st}");
    s.wait_until("the primary to reconnect", || {
        drblk::control::client::status(&s.sock())
            .ok()
            .and_then(|st| st.link)
            .is_some_and(|l| l.connected)
    });
    primary_writes(&s, 4, 4, 2);
    let cg = drain(&s);

    // A drill at the last group, written to; then failover on the running secondary.
    drill_start(&s, &sock, &[]);
    let mut f = connect(&s, &sock);
    assert_eq!(write_device(&mut f, 0, &[9; 4096]), 0);
    drop(primary);
    let p = s.ctl_control(&["promote"]);
    assert!(p.status.success(), "{}\n{}", text(&p), s.logs());
    // Empty groups may have committed after the drain.
    assert!(json(&p)["cg"].as_u64().unwrap() >= cg, "{}", text(&p));
    let st = json(&s.ctl_control(&["drill", "status"]));
    assert_eq!(st["running"], false, "{st}");
    assert!(!drill_dir.exists());
    assert!(!sock.exists(), "the drill's socket outlived the promotion");
    // The promoted disk holds the primary's writes, none of the drill's.
    let img = std::fs::read(s.replica()).unwrap();
    assert_eq!(&img[..4096], &[1; 4096][..]);
    assert_eq!(&img[4 * 4096..5 * 4096], &[2; 4096][..]);
    // A promoted replica takes no drill.
    let refused = s.ctl_control(&["drill", "start", "--socket", sock.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("promoted"), "{}", text(&refused));
}
