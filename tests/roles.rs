//! Role changes through the real binaries (DESIGN.md §4, §7): a planned switchover
//! (`drblk ctl demote`, `drblk promote`, the old primary rejoining with nothing to resync),
//! a failback after an unplanned failover (refused until `--discard-local-changes`, then
//! only the changed chunks of both sides shipped), and the refusals of a split brain and
//! of unrelated disks, resolved with the explicit flag.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dw::History;
use common::KillOnDrop;
use drblk::control::PrimaryStatus;
use drblk_testkit::test_frontend::{Desc, TestFrontend, DATA_BASE};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

const BIN: &str = env!("CARGO_BIN_EXE_drblk");
const SIZE: u64 = 16 << 20;
const BLOCKS: u64 = SIZE / 4096;

/// Two sites, "a" and "b", each with a disk, a vhost-user socket and a UDP port; "a" holds
/// the certificate of site `primary`, "b" that of `secondary`, whatever role they play.
struct Pair {
    dir: PathBuf,
    certs: PathBuf,
}

fn port() -> u16 {
    common::free_udp_port()
}

fn cert_name(site: &str) -> &'static str {
    if site == "a" {
        "primary"
    } else {
        "secondary"
    }
}

impl Pair {
    fn new(dir: &Path) -> Pair {
        let certs = common::make_certs(dir);
        std::fs::write(dir.join("a.img"), vec![0u8; SIZE as usize]).unwrap();
        Pair {
            dir: dir.to_path_buf(),
            certs,
        }
    }

    fn img(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.img"))
    }

    fn sock(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}.sock"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }

    fn spawn(&self, log: &str, args: &[String]) -> KillOnDrop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{log}.log")))
            .unwrap();
        KillOnDrop(
            Command::new(BIN)
                .args(args)
                .env("RUST_LOG", "drblk=info")
                .stdout(Stdio::null())
                .stderr(file)
                .spawn()
                .unwrap(),
        )
    }

    /// `drblk serve` of `site`'s disk replicating to `peer` at `port`.
    fn primary(&self, site: &str, peer: &str, port: u16, extra: &[&str]) -> KillOnDrop {
        let mut args: Vec<String> = [
            "serve",
            "--queues",
            "2",
            "--cg-interval",
            "20ms",
            "--al-extent-size",
            "256K",
            "--al-extents",
            "8",
            "--site",
            cert_name(site),
            "--peer-site",
            cert_name(peer),
            "--replicate-to",
        ]
        .map(String::from)
        .into();
        args.push(format!("127.0.0.1:{port}"));
        for (flag, p) in [
            ("--disk", self.img(site)),
            ("--socket", self.sock(site)),
            ("--certs", self.certs.clone()),
        ] {
            args.push(flag.into());
            args.push(p.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut d = self.spawn(&format!("{site}-serve"), &args);
        let ctl = drblk::control::control_path(&self.sock(site));
        wait_until("the primary to listen", || {
            if let Some(st) = d.0.try_wait().unwrap() {
                panic!(
                    "serve {site} exited ({st}):\n{}",
                    self.log(&format!("{site}-serve"))
                );
            }
            std::os::unix::net::UnixStream::connect(&ctl).is_ok()
        });
        d
    }

    /// `drblk secondary` on `site`'s disk, for `peer`, listening on `port`.
    fn secondary(&self, site: &str, peer: &str, port: u16, extra: &[&str]) -> KillOnDrop {
        let mut args: Vec<String> = ["secondary", "--site", cert_name(site), "--peer-site"]
            .map(String::from)
            .into();
        args.push(cert_name(peer).into());
        args.push("--listen".into());
        args.push(format!("127.0.0.1:{port}"));
        args.push("--disk".into());
        args.push(self.img(site).display().to_string());
        args.push("--certs".into());
        args.push(self.certs.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.spawn(&format!("{site}-secondary"), &args)
    }

    fn status(&self, site: &str) -> Option<PrimaryStatus> {
        let out = Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.sock(site))
            .arg("status")
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn acked(&self, site: &str) -> u64 {
        self.status(site)
            .and_then(|s| s.replication)
            .map_or(0, |r| r.last_committed_cg)
    }

    fn drblk(&self, args: &[&str], disk_of: Option<&str>) -> Output {
        let mut c = Command::new(BIN);
        c.args(args);
        if let Some(site) = disk_of {
            c.arg("--disk").arg(self.img(site));
        }
        c.output().unwrap()
    }

    fn ctl(&self, site: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(["ctl", "--socket"])
            .arg(self.sock(site))
            .args(args)
            .output()
            .unwrap()
    }

    /// Dependent writes on `site` for `ms` milliseconds; returns the history.
    fn dependent_writes(&self, site: &str, ms: u64) -> Arc<Mutex<History>> {
        let history = Arc::new(Mutex::new(History::new(SIZE)));
        let stop = Arc::new(AtomicBool::new(false));
        let (sock, h, s) = (self.sock(site), history.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
            common::dw::drive(&mut f, &h, SIZE, || s.load(Ordering::SeqCst))
        });
        std::thread::sleep(Duration::from_millis(ms));
        stop.store(true, Ordering::SeqCst);
        t.join().unwrap();
        history
    }

    fn wait_frontends_gone(&self, site: &str) {
        wait_until("the frontend to disconnect", || {
            self.status(site)
                .is_some_and(|s| s.frontends_connected == 0)
        });
    }
}

/// Writes `blocks` (4 KiB each, filled with `byte`) through a vhost-user connection.
fn write_blocks(sock: &Path, blocks: &[u64], byte: u8) {
    let mut f = TestFrontend::connect(sock, 2, 256, true).unwrap();
    f.write_mem(DATA_BASE, &[byte; 4096]).unwrap();
    for &b in blocks {
        let (st, _) = f
            .request(0, VIRTIO_BLK_T_OUT, b * 8, &[Desc::r(DATA_BASE, 4096)])
            .unwrap();
        assert_eq!(st, 0, "write of block {b}");
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits for `f`; the deadline only guards against hangs.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn stop(mut d: KillOnDrop) {
    // SIGTERM: a clean stop.
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
    let _ = d.0.wait();
}

fn promoted_cg(out: &Output) -> u64 {
    let t = text(out);
    assert!(out.status.success(), "promote failed: {t}");
    t.split(" at CG ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no CG in {t:?}"))
}

fn same(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// a → b replication up and running with some dependent writes shipped; returns the
/// daemons and b's port.
fn replicating(p: &Pair, ms: u64) -> (KillOnDrop, KillOnDrop, u16, Arc<Mutex<History>>) {
    let pb = port();
    let b = p.secondary("b", "a", pb, &[]);
    let a = p.primary("a", "b", pb, &[]);
    wait_until("the initial copy", || p.acked("a") >= 1);
    let h = p.dependent_writes("a", ms);
    (a, b, pb, h)
}

#[test]
fn switchover_loses_nothing_and_the_old_primary_rejoins_with_nothing_to_resync() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Pair::new(tmp.path());
    let (a, b, _, history) = replicating(&p, 800);

    // With the VM attached, demote is refused and nothing changes.
    let held = {
        let f = TestFrontend::connect(&p.sock("a"), 2, 256, true).unwrap();
        wait_until("the frontend to connect", || {
            p.status("a").is_some_and(|s| s.frontends_connected == 1)
        });
        let o = p.ctl("a", &["demote"]);
        assert!(!o.status.success());
        assert!(text(&o).contains("shut the VM down first"), "{}", text(&o));
        f
    };
    drop(held);
    p.wait_frontends_gone("a");
    let st = p.status("a").unwrap();
    assert_eq!(st.lineage.unwrap().role, drblk::lineage::Role::Primary);

    let t0 = Instant::now();
    let o = p.ctl("a", &["demote"]);
    assert!(
        o.status.success(),
        "demote: {}\n{}",
        text(&o),
        p.log("a-serve")
    );
    let reply: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let demoted_at = reply["cg"].as_u64().unwrap();
    assert!(text(&o).contains(&format!("demoted at CG {demoted_at}")));
    stop(a);
    stop(b);
    // The demoted disk is refused for writing.
    let x = p.dir.join("x.sock").display().to_string();
    let refused = p.drblk(&["serve", "--socket", &x], Some("a"));
    assert!(
        text(&refused).contains("was demoted at CG"),
        "{}",
        text(&refused)
    );

    let promoted_at = promoted_cg(&p.drblk(&["promote"], Some("b")));
    assert_eq!(
        promoted_at, demoted_at,
        "the secondary must hold the final group"
    );
    assert!(
        same(&p.img("a"), &p.img("b")),
        "data lost in the switchover"
    );
    history
        .lock()
        .unwrap()
        .check(&std::fs::read(p.img("b")).unwrap())
        .unwrap();

    // Reverse: b serves and replicates to a, which rejoins as its secondary.
    let pa = port();
    let a2 = p.secondary("a", "b", pa, &[]);
    let b2 = p.primary("b", "a", pa, &[]);
    wait_until("b's first group on a", || p.acked("b") > promoted_at);
    let switch = t0.elapsed();
    let st = p.status("b").unwrap();
    let shipped = st.replication.unwrap().chunks_shipped;
    let full = st.link.unwrap().full_resyncs;
    assert_eq!(
        shipped, 0,
        "the reverse replication resynced {shipped} chunks"
    );
    assert_eq!(full, 0);
    println!(
        "switchover: demote to the promoted side replicating in {switch:?}; 0 chunks resynced"
    );

    // And it replicates: b's writes reach a.
    write_blocks(&p.sock("b"), &[3, 1000, BLOCKS - 1], 0x5b);
    p.wait_frontends_gone("b");
    let o = p.ctl("b", &["drain"]);
    assert!(o.status.success(), "{}", text(&o));
    stop(b2);
    stop(a2);
    assert!(same(&p.img("a"), &p.img("b")));
}

#[test]
fn failback_after_failover_ships_only_what_changed_on_either_side() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Pair::new(tmp.path());
    let (mut a, b, _, _) = replicating(&p, 500);
    // The primary site is lost under load: its last writes never reach b.
    let stop_writes = Arc::new(AtomicBool::new(false));
    let writer = {
        let (sock, s) = (p.sock("a"), stop_writes.clone());
        std::thread::spawn(move || {
            let h = Arc::new(Mutex::new(History::new(SIZE)));
            let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
            common::dw::drive_until_killed(&mut f, &h, SIZE, 7, || s.load(Ordering::SeqCst))
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let _ = a.0.kill();
    let _ = a.0.wait();
    stop_writes.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    stop(b);
    let p_cg = promoted_cg(&p.drblk(&["promote"], Some("b")));

    // The promoted side serves and writes.
    let pa = port();
    let b2 = p.primary("b", "a", pa, &[]);
    let written_on_b: Vec<u64> = (0..BLOCKS).step_by(97).collect();
    write_blocks(&p.sock("b"), &written_on_b, 0xb2);
    p.wait_frontends_gone("b");

    // The old primary's own unreplicated writes, per its change record.
    let tail = drblk::site::rejoin::tail_ranges(&p.img("a"), SIZE).expect("a's record");
    let tail_chunks: u64 = tail.iter().map(|r| r.1 / 4096).sum();
    let before = std::fs::read(p.img("a")).unwrap();
    let lineage_before = std::fs::read(p.dir.join("a.img.drblk-lineage")).unwrap();

    // Without the flag: refused, with what would be lost and the command; a untouched.
    let a2 = p.secondary("a", "b", pa, &[]);
    wait_until("the refusal", || {
        p.log("a-secondary").contains("--discard-local-changes")
    });
    stop(a2);
    let said = p.log("a-secondary");
    assert!(said.contains("chunks"), "{said}");
    assert_eq!(
        std::fs::read(p.img("a")).unwrap(),
        before,
        "a refused rejoin wrote the disk"
    );
    assert_eq!(
        std::fs::read(p.dir.join("a.img.drblk-lineage")).unwrap(),
        lineage_before
    );
    assert!(!p.dir.join("a.img.state").join("state.json").exists());

    // With it: a takes b's copy; only b's changes and a's own writes are shipped.
    let a3 = p.secondary("a", "b", pa, &["--discard-local-changes"]);
    wait_until("b's first group on a", || p.acked("b") > p_cg);
    let o = p.ctl("b", &["drain"]);
    assert!(o.status.success(), "{}", text(&o));
    let st = p.status("b").unwrap();
    let shipped = st.replication.unwrap().chunks_shipped;
    let full = st.link.unwrap().full_resyncs;
    let changed = written_on_b.len() as u64;
    println!(
        "failback: shipped {shipped} chunks; changed on b {changed}, a's own writes {tail_chunks} chunks (disk {BLOCKS})"
    );
    assert_eq!(full, 0, "a full resync");
    assert!(
        shipped <= changed + tail_chunks,
        "shipped {shipped} > {changed} + {tail_chunks}"
    );
    stop(b2);
    stop(a3);
    assert!(
        same(&p.img("a"), &p.img("b")),
        "the images differ after failback"
    );
    assert!(
        !p.dir.join("a.img.drblk-track").exists(),
        "a's old change record outlived the resync"
    );
}

#[test]
fn split_brain_and_unrelated_disks_are_refused_then_resolved_with_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let p = Pair::new(tmp.path());
    let (a, b, _, _) = replicating(&p, 300);
    let o = p.ctl("a", &["drain"]);
    assert!(o.status.success(), "{}", text(&o));
    stop(a);
    stop(b);
    // Two copies of the replica are both promoted: two new generations of one.
    let c = p.dir.join("c.img");
    std::fs::copy(p.img("b"), &c).unwrap();
    std::fs::copy(
        p.dir.join("b.img.drblk-lineage"),
        p.dir.join("c.img.drblk-lineage"),
    )
    .unwrap();
    let cstate = p.dir.join("c.img.state");
    std::fs::create_dir(&cstate).unwrap();
    std::fs::copy(
        p.dir.join("b.img.state/state.json"),
        cstate.join("state.json"),
    )
    .unwrap();
    promoted_cg(&p.drblk(&["promote"], Some("b")));
    promoted_cg(&p.drblk(&["promote", "--disk", c.to_str().unwrap()], None));
    // Both write; then b replicates to "a"'s slot holding c's disk.
    std::fs::rename(&c, p.img("a")).unwrap();
    std::fs::rename(
        p.dir.join("c.img.drblk-lineage"),
        p.dir.join("a.img.drblk-lineage"),
    )
    .unwrap();
    std::fs::rename(p.dir.join("c.img.drblk-id"), p.dir.join("a.img.drblk-id")).unwrap();
    std::fs::rename(
        p.dir.join("c.img.drblk-track"),
        p.dir.join("a.img.drblk-track"),
    )
    .unwrap();
    std::fs::remove_dir_all(p.dir.join("a.img.state")).ok();
    std::fs::rename(&cstate, p.dir.join("a.img.state")).unwrap();
    let pa = port();
    let b2 = p.primary("b", "a", pa, &[]);
    write_blocks(&p.sock("b"), &[5, 6], 0xbb);
    p.wait_frontends_gone("b");
    let a2 = p.secondary("a", "b", pa, &[]);
    wait_until("the split-brain refusal", || {
        p.log("a-secondary").contains("split brain")
    });
    stop(a2);
    let a3 = p.secondary("a", "b", pa, &["--discard-local-changes"]);
    wait_until("the resolved resync", || p.acked("b") > 0);
    let o = p.ctl("b", &["drain"]);
    assert!(o.status.success(), "{}", text(&o));
    stop(a3);

    // Unrelated: a disk that only shares the identity file, never a generation.
    let d = p.dir.join("d.img");
    std::fs::write(&d, vec![9u8; SIZE as usize]).unwrap();
    std::fs::copy(p.dir.join("b.img.drblk-id"), p.dir.join("d.img.drblk-id")).unwrap();
    drblk::lineage::Lineage::new_primary().store(&d).unwrap();
    std::fs::rename(&d, p.img("a")).unwrap();
    std::fs::rename(
        p.dir.join("d.img.drblk-lineage"),
        p.dir.join("a.img.drblk-lineage"),
    )
    .unwrap();
    std::fs::remove_dir_all(p.dir.join("a.img.state")).ok();
    let _ = std::fs::remove_file(p.dir.join("a.img.drblk-track"));
    let a4 = p.secondary("a", "b", pa, &[]);
    wait_until("the unrelated refusal", || {
        p.log("a-secondary").contains("different disks")
    });
    stop(a4);
    let a5 = p.secondary("a", "b", pa, &["--discard-local-changes"]);
    let before = p.acked("b");
    wait_until("the resync", || p.acked("b") > before);
    let o = p.ctl("b", &["drain"]);
    assert!(o.status.success(), "{}", text(&o));
    stop(b2);
    stop(a5);
    assert!(same(&p.img("a"), &p.img("b")));
}
