//! Several disks, one consistency group (issue 13), through the real binaries: `drblk
//! serve --disk A --socket SA --disk B --socket SB --replicate-to` and `drblk secondary
//! --disk RA --disk RB`. A dependent-write workload spans both disks (a write on one disk
//! is issued after writes on the other completed); every group the secondary commits must
//! hold, on the two replicas together, every write completed before any write it holds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dw::History;
use common::{ctl, ctl_status, make_certs, KillOnDrop};
use drblk::control::Drained;
use drblk::replica::ReplicaStore;
use drblk_testkit::test_frontend::TestFrontend;

const BIN: &str = env!("CARGO_BIN_EXE_drblk");
/// Each disk's size.
const SIZE: u64 = 4 << 20;

/// The primary's disks and sockets, and the secondary's images, in the group's order.
struct Group {
    dir: PathBuf,
    disks: [PathBuf; 2],
    socks: [PathBuf; 2],
    replicas: [PathBuf; 2],
}

impl Group {
    fn new(dir: &Path) -> Group {
        let g = Group {
            dir: dir.to_path_buf(),
            disks: [dir.join("a.img"), dir.join("b.img")],
            socks: [dir.join("a.sock"), dir.join("b.sock")],
            replicas: [dir.join("ra.img"), dir.join("rb.img")],
        };
        // Zeroes: block id 0 = never written.
        for d in &g.disks {
            std::fs::write(d, vec![0u8; SIZE as usize]).unwrap();
        }
        g
    }

    /// `drblk serve` of both disks, replicating to `target`; returns once both sockets
    /// listen.
    fn primary(&self, target: &str, certs: &Path) -> KillOnDrop {
        self.primary_of(2, target, certs)
    }

    /// `drblk serve` of the first `n` disks.
    fn primary_of(&self, n: usize, target: &str, certs: &Path) -> KillOnDrop {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("primary.log"))
            .unwrap();
        let mut c = Command::new(BIN);
        c.args(["serve", "--queues", "2"]);
        for (d, s) in self.disks.iter().zip(&self.socks).take(n) {
            c.arg("--disk").arg(d).arg("--socket").arg(s);
        }
        c.args(["--replicate-to", target, "--cg-interval", "20ms", "--certs"])
            .arg(certs)
            .stdout(Stdio::null())
            .stderr(log);
        let mut p = KillOnDrop(c.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(120);
        for s in self.socks.iter().take(n) {
            while std::os::unix::net::UnixStream::connect(s).is_err() {
                assert!(
                    p.0.try_wait().unwrap().is_none(),
                    "primary exited: {}",
                    self.log("primary")
                );
                assert!(Instant::now() < deadline, "primary never listened");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        p
    }

    /// Each disk and its replica hold the same bytes (after a drain).
    fn assert_identical(&self, when: &str) {
        for (d, r) in self.disks.iter().zip(&self.replicas) {
            assert!(
                std::fs::read(d).unwrap() == std::fs::read(r).unwrap(),
                "{} and {} differ {when}",
                d.display(),
                r.display()
            );
        }
    }

    /// The replicas together pass the history's dependent-write check.
    fn assert_consistent(&self, history: &Mutex<History>) {
        let check = history
            .lock()
            .unwrap()
            .check(&Self::replicas_image(&self.replicas));
        assert!(check.is_ok(), "{check:?}");
    }

    fn log(&self, who: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default()
    }

    /// The replicas, concatenated in the group's order (what the history checks).
    fn replicas_image(images: &[PathBuf]) -> Vec<u8> {
        images
            .iter()
            .flat_map(|p| {
                let mut v = std::fs::read(p).unwrap();
                v.truncate(SIZE as usize);
                v
            })
            .collect()
    }
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs the two-disk workload in a thread until `stop`.
fn workload(
    socks: &[PathBuf; 2],
    history: Arc<Mutex<History>>,
    ping_pong: bool,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let socks = socks.clone();
    std::thread::spawn(move || {
        let mut fs: Vec<TestFrontend> = socks
            .iter()
            .map(|s| TestFrontend::connect(s, 2, 256, true).unwrap())
            .collect();
        common::dw::drive_group(&mut fs, &history, SIZE, ping_pong, || {
            stop.load(Ordering::SeqCst)
        })
    })
}

#[test]
fn every_group_committed_holds_both_disks_dependent_writes() {
    // The secondary runs in this process (the same code as `drblk secondary --disk RA
    // --disk RB`) so both replicas can be checked at every commit; the primary is the real
    // binary.
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let checks = Arc::new(AtomicU64::new(0));
    let (h2, v2, c2) = (history.clone(), violations.clone(), checks.clone());
    let identity = drblk::link::SiteIdentity::load(&certs, "secondary").unwrap();
    let sec = drblk::site::secondary::Secondary::start(
        drblk::site::secondary::SecondaryPaths {
            images: g.replicas.to_vec(),
            state_dir: tmp.path().join("ra.img.state"),
            discard_local_changes: false,
            remove: Vec::new(),
        },
        identity,
        "127.0.0.1:0".parse().unwrap(),
        Some("primary".into()),
        Some(Box::new(move |cg, images: &[PathBuf]| {
            assert_eq!(images.len(), 2);
            let img = Group::replicas_image(images);
            if let Err(e) = h2.lock().unwrap().check(&img) {
                v2.lock().unwrap().push(format!("CG {cg}: {e}"));
            }
            c2.fetch_add(1, Ordering::SeqCst);
        })),
    )
    .unwrap();
    let addr = sec.local_addr().unwrap();
    let _pri = g.primary(&addr.to_string(), &certs);
    // Both sockets answer for the daemon: the status lists both disks.
    let st = ctl_status(&g.socks[1]);
    assert_eq!(st.group.len(), 2, "{st:?}");
    assert_eq!(st.group[1].socket, g.socks[1].display().to_string());
    let mut writes = 0;
    for (ping_pong, commits) in [(false, 60), (true, 120)] {
        let stop = Arc::new(AtomicBool::new(false));
        let w = workload(&g.socks, history.clone(), ping_pong, stop.clone());
        let before = checks.load(Ordering::SeqCst);
        wait_until("checked commits", 300, || {
            checks.load(Ordering::SeqCst) >= before + commits
        });
        stop.store(true, Ordering::SeqCst);
        writes += w.join().unwrap();
    }
    // Everything written is on the secondary after a drain: the images are identical.
    let drained: Drained = ctl(&g.socks[0], "drain");
    let v = violations.lock().unwrap().clone();
    println!(
        "{writes} writes over two disks, {} commits checked on the secondary, drained at CG {}",
        checks.load(Ordering::SeqCst),
        drained.cg
    );
    assert!(v.is_empty(), "{:#?}", &v[..v.len().min(5)]);
    g.assert_identical("after a drain");
    g.assert_consistent(&history);
    sec.stop();
}

/// `drblk secondary --disk RA --disk RB` (the real binary), with `env`.
fn secondary(g: &Group, port: u16, certs: &Path, env: &[(&str, &str)]) -> KillOnDrop {
    secondary_of(g, 2, port, certs, env)
}

/// `drblk secondary` of the first `n` replicas.
fn secondary_of(g: &Group, n: usize, port: u16, certs: &Path, env: &[(&str, &str)]) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(g.dir.join("secondary.log"))
        .unwrap();
    let mut c = Command::new(BIN);
    c.args(["secondary", "--listen", &format!("127.0.0.1:{port}")]);
    for r in g.replicas.iter().take(n) {
        c.arg("--disk").arg(r);
    }
    c.arg("--certs")
        .arg(certs)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(log);
    KillOnDrop(c.spawn().unwrap())
}

fn committed(sock: &Path) -> u64 {
    ctl_status(sock)
        .replication
        .map_or(0, |r| r.last_committed_cg)
}

#[test]
fn a_secondary_killed_mid_commit_recovers_both_disks_to_one_group() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let port = common::free_udp_port();
    let mut sec = secondary(&g, port, &certs, &[]);
    let _pri = g.primary(&format!("127.0.0.1:{port}"), &certs);
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(&g.socks, history.clone(), false, stop.clone());
    wait_until("the initial sync", 120, || committed(&g.socks[0]) > 0);
    let state_dir = tmp.path().join("ra.img.state");
    // A crash inside a group's apply (one disk written, the other not), between the two
    // images' fsyncs at a checkpoint, and a SIGKILL at a random moment.
    let crashes = [
        Some("MidApply:1"),
        Some("BetweenImageSyncs:1"),
        None,
        Some("MidApply:3"),
    ];
    let mut recovered = Vec::new();
    for (round, crash) in crashes.into_iter().enumerate() {
        let before = committed(&g.socks[0]);
        drop(sec);
        // (Crash points are armed from the environment only in builds with the
        // `fault-injection` feature, which the test suite enables; without it every round
        // is a SIGKILL.)
        let crash = crash.filter(|_| cfg!(feature = "fault-injection"));
        match crash {
            Some(at) => {
                sec = secondary(&g, port, &certs, &[("DRBLK_SECONDARY_CRASH_AT", at)]);
                // It aborts at that point (a checkpoint happens at least every 10 s).
                let deadline = Instant::now() + Duration::from_secs(120);
                while sec.0.try_wait().unwrap().is_none() {
                    assert!(Instant::now() < deadline, "never crashed at {at}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None => {
                sec = secondary(&g, port, &certs, &[]);
                wait_until("a commit", 120, || committed(&g.socks[0]) > before);
                std::thread::sleep(Duration::from_millis(37 * round as u64));
            }
        }
        drop(sec); // SIGKILL (if still running)
                   // Recovery is what `drblk secondary` runs when it starts: run it here and check
                   // both images together.
        let spec = drblk::replica::stored_group(&state_dir)
            .unwrap()
            .unwrap()
            .spec(&g.replicas)
            .unwrap();
        let (store, report) = ReplicaStore::open(&spec, &state_dir).unwrap();
        let cg = store.last_committed_cg();
        drop(store);
        let check = history
            .lock()
            .unwrap()
            .check(&Group::replicas_image(&g.replicas));
        assert!(
            check.is_ok(),
            "round {round} ({crash:?}): CG {cg:?}: {check:?} ({report:?})"
        );
        recovered.push((crash, cg, report.replayed_cg));
        sec = secondary(&g, port, &certs, &[]);
    }
    // Replication goes on after the last restart.
    let before = committed(&g.socks[0]);
    wait_until("a commit after the restarts", 120, || {
        committed(&g.socks[0]) > before
    });
    stop.store(true, Ordering::SeqCst);
    let writes = w.join().unwrap();
    let drained: Drained = ctl(&g.socks[0], "drain");
    g.assert_identical("after a drain");
    println!(
        "{writes} writes; recovered (crash point, CG, replayed): {recovered:?}; drained at CG {}",
        drained.cg
    );
    drop(sec);
}

/// `drblk ARGS...` run to completion.
fn drblk(args: &[&str], paths: &[(&str, &Path)]) -> std::process::Output {
    let mut c = Command::new(BIN);
    c.args(args);
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// One failover round of a group: dependent writes across both disks, `kill -9` of both
/// sites (the secondary first in odd rounds: mid-apply), the replicas refused for serving
/// until `drblk promote` takes both; the pair holds one group at least as new as the last
/// one the primary saw acknowledged, passes the cross-disk check, and is served as a group.
fn failover_round(seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let port = common::free_udp_port();
    let mut sec = secondary(&g, port, &certs, &[]);
    let mut pri = g.primary(&format!("127.0.0.1:{port}"), &certs);
    wait_until("the initial sync", 120, || committed(&g.socks[0]) > 0);
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (socks, h, stop) = (g.socks.clone(), history.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut fs: Vec<TestFrontend> = socks
                .iter()
                .map(|s| TestFrontend::connect(s, 2, 256, true).unwrap())
                .collect();
            common::dw::drive_group_until_killed(&mut fs, &h, SIZE, seed, || {
                stop.load(Ordering::SeqCst)
            })
        })
    };
    let mut acked = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(300 + 400 * (seed % 3)) {
        acked = acked.max(committed(&g.socks[0]));
        std::thread::sleep(Duration::from_millis(20));
    }
    let (first, second) = if seed % 2 == 1 {
        (&mut sec, &mut pri)
    } else {
        (&mut pri, &mut sec)
    };
    let _ = first.0.kill();
    std::thread::sleep(Duration::from_millis(7 * (seed % 13)));
    let _ = second.0.kill();
    let _ = pri.0.wait();
    let _ = sec.0.wait();
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();

    // Neither replica may be served before the promotion.
    for r in &g.replicas {
        let refused = drblk(
            &["serve"],
            &[("--disk", r), ("--socket", &tmp.path().join("r.sock"))],
        );
        assert!(!refused.status.success(), "served an unpromoted replica");
        assert!(
            text(&refused).contains("drblk promote --disk"),
            "{}",
            text(&refused)
        );
    }
    // One image of the group alone is not promoted: the group is one.
    let alone = drblk(&["promote"], &[("--disk", &g.replicas[0])]);
    assert!(!alone.status.success());
    assert!(
        text(&alone).contains("group of 2 disks"),
        "{}",
        text(&alone)
    );
    let out = drblk(
        &["promote"],
        &[("--disk", &g.replicas[0]), ("--disk", &g.replicas[1])],
    );
    let said = text(&out);
    assert!(
        out.status.success(),
        "promote failed: {said}\n{}",
        g.log("secondary")
    );
    let cg: u64 = said
        .split(" at CG ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no CG in {said:?}"));
    assert!(
        cg >= acked,
        "promoted at CG {cg}, the primary saw {acked} acknowledged"
    );
    let img = Group::replicas_image(&g.replicas);
    if let Err(e) = history.lock().unwrap().check(&img) {
        panic!("the promoted pair is not one consistent state: {e}\n{said}");
    }
    // One generation for both.
    let lineages: Vec<_> = g
        .replicas
        .iter()
        .map(|r| drblk::lineage::Lineage::load(r).unwrap().unwrap())
        .collect();
    assert_eq!(lineages[0].generation, lineages[1].generation);
    assert_eq!(lineages[1].role, drblk::lineage::Role::Promoted);
    let again = drblk(
        &["promote"],
        &[("--disk", &g.replicas[0]), ("--disk", &g.replicas[1])],
    );
    assert!(
        text(&again).contains("already promoted"),
        "{}",
        text(&again)
    );

    // The promoted pair is served as one group, and reads back what it holds.
    let socks = [tmp.path().join("pa.sock"), tmp.path().join("pb.sock")];
    let log = std::fs::File::create(tmp.path().join("promoted.log")).unwrap();
    let mut c = Command::new(BIN);
    c.args(["serve", "--queues", "2"]);
    for (r, s) in g.replicas.iter().zip(&socks) {
        c.arg("--disk").arg(r).arg("--socket").arg(s);
    }
    let mut served = KillOnDrop(c.stdout(Stdio::null()).stderr(log).spawn().unwrap());
    wait_until("the promoted pair to be served", 120, || {
        assert!(
            served.0.try_wait().unwrap().is_none(),
            "serving the promoted pair failed:\n{}",
            std::fs::read_to_string(tmp.path().join("promoted.log")).unwrap_or_default()
        );
        socks
            .iter()
            .all(|s| std::os::unix::net::UnixStream::connect(s).is_ok())
    });
    for (d, s) in socks.iter().enumerate() {
        let mut f = TestFrontend::connect(s, 2, 256, true).unwrap();
        for block in [0u64, SIZE / 4096 / 2, SIZE / 4096 - 1] {
            let (st, _) = f
                .request(
                    0,
                    virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN,
                    block * 8,
                    &[drblk_testkit::test_frontend::Desc::w(
                        drblk_testkit::test_frontend::DATA_BASE,
                        4096,
                    )],
                )
                .unwrap();
            assert_eq!(st, 0, "read of block {block} of disk {d}");
            let got = f
                .read_mem(drblk_testkit::test_frontend::DATA_BASE, 4096)
                .unwrap();
            let at = (d as u64 * SIZE + block * 4096) as usize;
            assert!(got == img[at..at + 4096], "block {block} of disk {d}");
        }
    }
    println!("round {seed}: {writes} writes, the pair promoted at CG {cg} (acknowledged {acked})");
}

#[test]
fn failover_of_a_group_promotes_both_disks_at_one_group() {
    let rounds: u64 = std::env::var("DRBLK_GROUP_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    for r in 0..rounds {
        failover_round(0x6e0u64 << 16 | r);
    }
}

#[test]
fn a_group_switches_over_as_one_and_the_old_primary_rejoins_with_nothing_to_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let port = common::free_udp_port();
    let sec = secondary(&g, port, &certs, &[]);
    let pri = g.primary(&format!("127.0.0.1:{port}"), &certs);
    wait_until("the initial sync", 120, || committed(&g.socks[0]) > 0);
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(&g.socks, history.clone(), false, stop.clone());
    let before = committed(&g.socks[0]);
    wait_until("groups with writes", 120, || {
        committed(&g.socks[0]) > before + 5
    });
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    wait_until("the VM to go", 60, || {
        ctl_status(&g.socks[0])
            .group
            .iter()
            .all(|m| m.frontends_connected == 0)
    });

    // Through the second disk's socket: it answers for the whole daemon.
    let o = Command::new(BIN)
        .args(["ctl", "--socket"])
        .arg(&g.socks[1])
        .arg("demote")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "demote: {}\n{}",
        text(&o),
        g.log("primary")
    );
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let demoted_at = reply["cg"].as_u64().unwrap();
    drop(pri);
    drop(sec);
    for d in &g.disks {
        let l = drblk::lineage::Lineage::load(d).unwrap().unwrap();
        assert_eq!(l.role, drblk::lineage::Role::Demoted, "{}", d.display());
        assert_eq!(l.since_cg, demoted_at);
    }
    let x = [tmp.path().join("x.sock"), tmp.path().join("y.sock")];
    let refused = drblk(
        &["serve"],
        &[
            ("--disk", &g.disks[0]),
            ("--socket", &x[0]),
            ("--disk", &g.disks[1]),
            ("--socket", &x[1]),
        ],
    );
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("was demoted at CG"),
        "{}",
        text(&refused)
    );

    let out = drblk(
        &["promote"],
        &[("--disk", &g.replicas[0]), ("--disk", &g.replicas[1])],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("at CG {demoted_at}:")),
        "the secondary must hold the final group: {}",
        text(&out)
    );
    g.assert_identical("after the switchover");

    // Reverse: the promoted pair serves and replicates to the old primary's disks.
    let back = Group {
        dir: g.dir.clone(),
        disks: g.replicas.clone(),
        socks: [tmp.path().join("ra.sock"), tmp.path().join("rb.sock")],
        replicas: g.disks.clone(),
    };
    let port = common::free_udp_port();
    let sec = secondary(&back, port, &certs, &[]);
    let pri = back.primary(&format!("127.0.0.1:{port}"), &certs);
    wait_until("the first group back", 120, || {
        committed(&back.socks[0]) > demoted_at
    });
    let st = ctl_status(&back.socks[0]);
    let shipped = st.replication.unwrap().chunks_shipped;
    let full = st.link.unwrap().full_resyncs;
    assert_eq!((shipped, full), (0, 0), "the reverse replication resynced");
    let _: Drained = ctl(&back.socks[0], "drain");
    drop(pri);
    drop(sec);
    g.assert_identical("after the reverse replication's drain");
    println!("a group of 2 switched over at CG {demoted_at}; the reverse shipped 0 chunks");
}

/// SIGTERM (a clean stop) and wait.
fn stop(mut d: KillOnDrop) {
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
    let _ = d.0.wait();
}

#[test]
fn a_disk_added_to_a_replicated_disk_joins_its_group_by_a_copy_of_itself_only() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let port = common::free_udp_port();
    let target = format!("127.0.0.1:{port}");
    // One disk, replicated; dependent writes on it.
    let sec = secondary_of(&g, 1, port, &certs, &[]);
    let pri = g.primary_of(1, &target, &certs);
    wait_until("the initial sync", 120, || committed(&g.socks[0]) > 0);
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let stop1 = Arc::new(AtomicBool::new(false));
    let w = {
        let (sock, h, stop) = (g.socks[0].clone(), history.clone(), stop1.clone());
        std::thread::spawn(move || {
            let mut f = [TestFrontend::connect(&sock, 2, 256, true).unwrap()];
            common::dw::drive_group(&mut f, &h, SIZE, false, || stop.load(Ordering::SeqCst))
        })
    };
    let before = committed(&g.socks[0]);
    wait_until("groups with writes", 120, || {
        committed(&g.socks[0]) > before + 5
    });
    stop1.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let _: Drained = ctl(&g.socks[0], "drain");
    stop(pri);
    stop(sec);

    // Both sides restarted with a second disk.
    let sec = secondary(&g, port, &certs, &[]);
    let pri = g.primary(&target, &certs);
    let before = committed(&g.socks[0]);
    wait_until("a group with the new disk", 120, || {
        committed(&g.socks[0]) > before
    });
    let st = ctl_status(&g.socks[0]);
    let link = st.link.as_ref().unwrap();
    // Only the new disk was copied: the first went on incrementally from its record.
    assert_eq!(link.full_resyncs, 1, "{link:?}");
    assert_eq!(link.checksum_resyncs, 0, "{link:?}");
    let shipped = st.replication.as_ref().unwrap().chunks_shipped;
    assert!(
        shipped <= SIZE / 4096 + 16,
        "shipped {shipped} chunks: more than the new disk"
    );
    let log = g.log("secondary");
    assert!(log.contains("a disk joins the group"), "{log}");
    wait_until("the join", 60, || {
        g.log("secondary").contains("the disk joined the group")
    });
    // Now a group of two: dependent writes across both, then both identical after a drain.
    let stop2 = Arc::new(AtomicBool::new(false));
    let w = workload(&g.socks, history.clone(), true, stop2.clone());
    let before = committed(&g.socks[0]);
    wait_until("groups across both disks", 120, || {
        committed(&g.socks[0]) > before + 10
    });
    stop2.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let _: Drained = ctl(&g.socks[0], "drain");
    g.assert_identical("after a drain");
    g.assert_consistent(&history);
    let stored = drblk::replica::stored_group(&tmp.path().join("ra.img.state"))
        .unwrap()
        .unwrap();
    assert_eq!(stored.disks.len(), 2);
    // A secondary given fewer disks than its group is refused at start, with why.
    stop(pri);
    stop(sec);
    let out = Command::new(BIN)
        .args(["secondary", "--listen", "127.0.0.1:0", "--certs"])
        .arg(&certs)
        .arg("--disk")
        .arg(&g.replicas[0])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("group of 2 disks"), "{}", text(&out));
    println!(
        "the second disk joined with {shipped} chunks shipped ({} in the disk)",
        SIZE / 4096
    );
}

#[test]
fn a_disk_taken_out_of_a_group_keeps_its_last_group_and_the_other_goes_on_incrementally() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let port = common::free_udp_port();
    let target = format!("127.0.0.1:{port}");
    let sec = secondary(&g, port, &certs, &[]);
    let pri = g.primary(&target, &certs);
    wait_until("the initial sync", 120, || committed(&g.socks[0]) > 0);
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let stop1 = Arc::new(AtomicBool::new(false));
    let w = workload(&g.socks, history.clone(), false, stop1.clone());
    let before = committed(&g.socks[0]);
    wait_until("groups with writes", 120, || {
        committed(&g.socks[0]) > before + 5
    });
    stop1.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let left_at: Drained = ctl(&g.socks[0], "drain");
    stop(pri);

    // The primary goes on with the first disk only; the secondary still keeps two: refused,
    // with what to do.
    let pri = g.primary_of(1, &target, &certs);
    wait_until("the refusal", 120, || {
        ctl_status(&g.socks[0])
            .link
            .is_some_and(|l| l.secondary.contains("--remove-disk"))
    });
    stop(sec);
    let rb = std::fs::read(&g.replicas[1]).unwrap();
    let sec = {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(g.dir.join("secondary.log"))
            .unwrap();
        KillOnDrop(
            Command::new(BIN)
                .args(["secondary", "--listen", &target, "--certs"])
                .arg(&certs)
                .arg("--disk")
                .arg(&g.replicas[0])
                .arg("--remove-disk")
                .arg(&g.replicas[1])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    };
    let before = committed(&g.socks[0]);
    wait_until("a group without the removed disk", 120, || {
        committed(&g.socks[0]) > before
    });
    let st = ctl_status(&g.socks[0]);
    let link = st.link.as_ref().unwrap();
    assert_eq!(
        (link.full_resyncs, link.checksum_resyncs),
        (0, 0),
        "the remaining disk must go on incrementally: {link:?}"
    );
    // The first disk goes on; the removed replica is not written any more.
    write_some(&g.socks[0]);
    let _: Drained = ctl(&g.socks[0], "drain");
    assert!(std::fs::read(&g.disks[0]).unwrap() == std::fs::read(&g.replicas[0]).unwrap());
    assert!(
        std::fs::read(&g.replicas[1]).unwrap() == rb,
        "the removed replica changed"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("ra.img.state/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["disks"].as_array().unwrap().len(), 1, "{state}");
    let left = state["removed"][0]["left_at_cg"].as_u64().unwrap();
    assert!(left >= left_at.cg, "{state}");
    drop(pri);
    drop(sec);
}

/// A few 4 KiB writes of non-zero bytes through `sock`.
fn write_some(sock: &Path) {
    use drblk_testkit::test_frontend::{Desc, DATA_BASE};
    let mut f = TestFrontend::connect(sock, 2, 256, true).unwrap();
    f.write_mem(DATA_BASE, &[0x5a; 4096]).unwrap();
    for b in [3u64, 77, SIZE / 4096 - 1] {
        let (st, _) = f
            .request(
                1,
                virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT,
                b * 8,
                &[Desc::r(DATA_BASE, 4096)],
            )
            .unwrap();
        assert_eq!(st, 0);
    }
}

/// A drill on a replica of two disks: one `drill start` with a socket per disk shows both
/// at the same committed group — the two drill devices together pass the dependent-write
/// check — and keeps showing it while replication goes on; drill writes stay in the drill
/// on both disks, within one shared space; the replicas end identical to the primary's
/// disks. One socket for a group of two is refused.
#[test]
fn a_drill_on_a_group_shows_both_disks_at_one_group_while_replication_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let g = Group::new(tmp.path());
    let certs = make_certs(tmp.path());
    let port = common::free_udp_port();
    let _sec = secondary(&g, port, &certs, &[]);
    let _pri = g.primary(&format!("127.0.0.1:{port}"), &certs);
    let history = Arc::new(Mutex::new(History::new(2 * SIZE)));
    let stop = Arc::new(AtomicBool::new(false));
    let w = workload(&g.socks, history.clone(), true, stop.clone());
    wait_until("committed groups", 300, || committed(&g.socks[0]) >= 20);

    let control = g.dir.join("ra.img.state/ctl");
    let ctl_control = |args: &[&str]| {
        Command::new(BIN)
            .args(["ctl", "--control"])
            .arg(&control)
            .args(args)
            .output()
            .unwrap()
    };
    let drills = [g.dir.join("d0.sock"), g.dir.join("d1.sock")];
    let (d0, d1) = (drills[0].to_str().unwrap(), drills[1].to_str().unwrap());
    let one = ctl_control(&["drill", "start", "--socket", d0]);
    assert!(!one.status.success(), "{}", text(&one));
    assert!(
        text(&one).contains("one --socket per disk"),
        "{}",
        text(&one)
    );
    assert!(!drills[0].exists(), "a refused drill left its socket");

    let started = ctl_control(&["drill", "start", "--socket", d0, "--socket", d1]);
    assert!(
        started.status.success(),
        "{}\n{}",
        text(&started),
        g.log("secondary")
    );
    let st: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
    assert_eq!(st["disks"].as_array().unwrap().len(), 2, "{st}");
    let cg = st["cg"].as_u64().unwrap();
    let mut fs: Vec<TestFrontend> = drills
        .iter()
        .map(|s| TestFrontend::connect(s, 1, 256, true).unwrap())
        .collect();
    let read_both = |fs: &mut [TestFrontend]| -> Vec<u8> {
        fs.iter_mut()
            .flat_map(|f| common::read_device(f, SIZE))
            .collect()
    };
    let shown = read_both(&mut fs);
    let (a, b) = shown.split_at(SIZE as usize);
    assert!(
        a.iter().any(|&x| x != 0) && b.iter().any(|&x| x != 0),
        "the drill of CG {cg} holds no writes on one disk"
    );
    let check = history.lock().unwrap().check(&shown);
    assert!(
        check.is_ok(),
        "the drill of CG {cg} is not one consistent cut: {check:?}"
    );
    // Later groups commit and apply; the drill still shows its own.
    let now = committed(&g.socks[0]);
    wait_until("later groups", 300, || committed(&g.socks[0]) >= now + 10);
    assert!(read_both(&mut fs) == shown, "the drill's view moved on");
    // Drill writes on both disks read back and count in the one space.
    assert_eq!(common::write_device(&mut fs[0], 0, &[0xd0; 4096]), 0);
    assert_eq!(
        common::write_device(&mut fs[1], SIZE - 4096, &[0xd1; 4096]),
        0
    );
    let again = read_both(&mut fs);
    assert!(again[..4096].iter().all(|&b| b == 0xd0));
    assert!(again[2 * SIZE as usize - 4096..].iter().all(|&b| b == 0xd1));
    let status = ctl_control(&["drill", "status"]);
    let ds: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let per_disk: Vec<u64> = ds["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["overlay_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(per_disk, [4096, 4096], "{ds}");
    assert_eq!(ds["overlay_bytes"].as_u64(), Some(8192), "{ds}");
    assert_eq!(ds["cg"].as_u64(), Some(cg), "{ds}");

    // The primary's writes, not the drill's, reach the replicas.
    stop.store(true, Ordering::SeqCst);
    let writes = w.join().unwrap();
    let drained: Drained = ctl(&g.socks[0], "drain");
    g.assert_identical("after a drill and a drain");
    g.assert_consistent(&history);
    drop(fs);
    let stopped = ctl_control(&["drill", "stop"]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert!(
        !g.dir.join("ra.img.state/drill").exists(),
        "the drill's files stayed"
    );
    println!(
        "{writes} writes over two disks; the drill showed CG {cg}, the primary drained at CG {}",
        drained.cg
    );
}
