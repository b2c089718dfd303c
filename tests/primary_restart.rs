//! A replicating primary (`drblk serve --replicate-to`, the real binary) that restarts keeps
//! its change record (`<image>.drblk-track`): after `kill -9` under a dependent-write
//! workload the restart ships at most what changed since the secondary's last committed
//! group plus the activity log's extents, never the whole disk; after a clean shutdown
//! exactly the unshipped blocks; a corrupt record is detected and the whole disk is
//! resynced. The secondary runs in this process and checks every group it commits.
//!
//! Rounds: `DRBLK_PRIMARY_KILL_ROUNDS` (default 5; the full drill is 20).

mod common;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ctl;
use common::dw::History;
use drblk::control::{Drained, PrimaryStatus, Reply};
use drblk::site::secondary::{Secondary, SecondaryPaths};
use drblk_testkit::rng::RngExt;
use drblk_testkit::test_frontend::TestFrontend;

const BIN: &str = env!("CARGO_BIN_EXE_drblk");
const SIZE: u64 = 32 << 20;
const CHUNK: u64 = 4096;
const AL_EXTENT: u64 = 256 << 10;
const AL_SLOTS: u64 = 8;
/// What the activity log may add to a resync after a crash.
const AL_BOUND: u64 = AL_SLOTS * AL_EXTENT / CHUNK;

type Daemon = common::KillOnDrop;

struct Site {
    dir: PathBuf,
    certs: PathBuf,
    port: u16,
    history: Arc<Mutex<History>>,
    /// Writes issued when each group's commit was checked.
    issued_at_commit: Arc<Mutex<HashMap<u64, usize>>>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl Site {
    fn new(dir: &Path) -> Site {
        let certs = common::make_certs(dir);
        std::fs::write(dir.join("primary.img"), vec![0u8; SIZE as usize]).unwrap();
        Site {
            dir: dir.to_path_buf(),
            certs,
            port: common::free_udp_port(),
            history: Arc::new(Mutex::new(History::new(SIZE))),
            issued_at_commit: Arc::default(),
            violations: Arc::default(),
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("primary.sock")
    }

    /// The secondary, in this process, checking the image at every commit. Started again
    /// on the same port after a stop: the stopped one's runtime closes its socket in the
    /// background, so a bind that finds the port still taken is retried (bounded).
    fn secondary(&self) -> Secondary {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_secondary() {
                Ok(s) => return s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("secondary start: {e:#}; retrying");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("the secondary did not start: {e:#}"),
            }
        }
    }

    fn try_secondary(&self) -> anyhow::Result<Secondary> {
        let (h, v, at) = (
            self.history.clone(),
            self.violations.clone(),
            self.issued_at_commit.clone(),
        );
        let identity = drblk::link::SiteIdentity::load(&self.certs, "secondary").unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        Secondary::start(
            SecondaryPaths {
                images: vec![self.dir.join("secondary.img")],
                state_dir: self.dir.join("secondary.state"),
                discard_local_changes: false,
                remove: Vec::new(),
            },
            identity,
            addr,
            Some("primary".into()),
            Some(Box::new(move |cg, images: &[PathBuf]| {
                let Ok(img) = std::fs::read(&images[0]) else {
                    return; // the test is over and its directory gone
                };
                let h = h.lock().unwrap();
                at.lock().unwrap().insert(cg, h.block.len());
                if let Err(e) = h.check(&img) {
                    v.lock().unwrap().push(format!("CG {cg}: {e}"));
                }
            })),
        )
    }

    fn primary(&self) -> Daemon {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("primary.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--queues", "2", "--size", "32M", "--disk"])
            .arg(self.dir.join("primary.img"))
            .arg("--socket")
            .arg(self.sock())
            .args(["--replicate-to", &format!("127.0.0.1:{}", self.port)])
            .arg("--certs")
            .arg(&self.certs)
            .args([
                "--cg-interval",
                "20ms",
                "--al-extent-size",
                "256K",
                "--al-extents",
            ])
            .arg(AL_SLOTS.to_string())
            .env("RUST_LOG", "drblk=info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = common::KillOnDrop(child);
        let ctl_socket = drblk::control::control_path(&self.sock());
        self.wait_until("the primary to listen", || {
            assert!(
                d.0.try_wait().unwrap().is_none(),
                "the primary exited:\n{}",
                self.log()
            );
            std::os::unix::net::UnixStream::connect(self.sock()).is_ok()
                && std::os::unix::net::UnixStream::connect(&ctl_socket).is_ok()
        });
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("primary.log")).unwrap_or_default()
    }

    /// Waits for `f`; the deadline only guards against hangs.
    fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn status(&self) -> PrimaryStatus {
        ctl(&self.sock(), "status")
    }

    /// Groups this daemon committed; chunks it shipped; full resyncs it started.
    fn figures(&self) -> (u64, u64, u64) {
        let st = self.status();
        (
            st.cg.map_or(0, |c| c.committed),
            st.replication.map_or(0, |r| r.chunks_shipped),
            st.link.map_or(0, |l| l.full_resyncs),
        )
    }

    /// Waits for this daemon's first committed group with no workload running: what it
    /// shipped is the resync. Returns (chunks shipped, full resyncs).
    fn resync(&self) -> (u64, u64) {
        self.wait_until("the first group of this primary", || self.figures().0 >= 1);
        let (_, chunks, full) = self.figures();
        (chunks, full)
    }

    fn workload(
        &self,
        seed: u64,
        until_killed: bool,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<u64> {
        let (sock, history) = (self.sock(), self.history.clone());
        std::thread::spawn(move || {
            let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
            let done = || stop.load(Ordering::SeqCst);
            if until_killed {
                common::dw::drive_until_killed(&mut f, &history, SIZE, seed, done)
            } else {
                common::dw::drive(&mut f, &history, SIZE, done)
            }
        })
    }

    /// The secondary and the primary started, the initial copy done, 300 ms of dependent
    /// writes (workload `seed`) drained: both images identical.
    fn replicating_after_writes(&self, seed: u64) -> (Secondary, Daemon) {
        let sec = self.secondary();
        let primary = self.primary();
        self.wait_until("the initial copy", || {
            self.status()
                .replication
                .is_some_and(|r| r.last_committed_cg > 0)
        });
        let stop = Arc::new(AtomicBool::new(false));
        let w = self.workload(seed, false, stop.clone());
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        w.join().unwrap();
        self.drain_and_compare();
        (sec, primary)
    }

    fn drain_and_compare(&self) {
        let drained: Reply<Drained> = ctl(&self.sock(), "drain");
        assert!(drained.ok, "{drained:?}");
        assert!(
            std::fs::read(self.dir.join("primary.img")).unwrap()
                == std::fs::read(self.dir.join("secondary.img")).unwrap(),
            "after a drain the images are identical"
        );
    }

    fn sigterm(&self, mut d: Daemon) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
        let mut exit = None;
        self.wait_until("the primary to exit after SIGTERM", || {
            exit = d.0.try_wait().unwrap();
            exit.is_some()
        });
        assert!(exit.unwrap().success(), "{}", self.log());
    }

    fn assert_consistent_throughout(&self) {
        let v = self.violations.lock().unwrap().clone();
        assert!(v.is_empty(), "{:#?}", &v[..v.len().min(5)]);
    }
}

fn distinct_blocks(h: &History, from_write: usize) -> u64 {
    h.block[from_write.min(h.block.len())..]
        .iter()
        .collect::<BTreeSet<_>>()
        .len() as u64
}

#[test]
fn a_primary_killed_under_load_resyncs_at_most_the_bound_and_converges() {
    let rounds: u64 = std::env::var("DRBLK_PRIMARY_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path());
    let sec = site.secondary();
    let mut rng = drblk_testkit::rng::seeded(0x9e37_79b9_7f4a_7c15);
    let mut figures = Vec::new();
    let mut primary = site.primary();
    site.wait_until("the initial copy", || {
        site.status()
            .replication
            .is_some_and(|r| r.last_committed_cg > 0)
    });
    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let w = site.workload(round + 1, true, stop.clone());
        let base = site.history.lock().unwrap().completions.len();
        site.wait_until("the workload to run", || {
            site.history.lock().unwrap().completions.len() >= base + 200
        });
        let c0 = site.figures().0;
        site.wait_until("two commits under the workload", || {
            site.figures().0 >= c0 + 2
        });
        std::thread::sleep(Duration::from_micros(rng.random_range(0..30_000)));
        drop(primary); // SIGKILL, writes in flight
        stop.store(true, Ordering::SeqCst);
        w.join().unwrap();

        // What may differ: every block written after the secondary checked the group two
        // before the record's acknowledged one (that check ran before the group after it
        // was frozen; one more for a commit racing the record's snapshot).
        let last = sec.status().1.unwrap_or(0);
        let acked =
            drblk::track::file::RecordFile::load(&dir.path().join("primary.img.drblk-track"))
                .unwrap()
                .expect("the record exists")
                .sb
                .acked_cg;
        assert!(
            acked <= last,
            "the record claims CG {acked}, the secondary holds {last}"
        );
        let changed = {
            let h = site.history.lock().unwrap();
            let from = site
                .issued_at_commit
                .lock()
                .unwrap()
                .get(&acked.saturating_sub(3))
                .copied()
                .unwrap_or(0);
            distinct_blocks(&h, from)
        };
        primary = site.primary();
        let (shipped, full) = site.resync();
        println!(
            "round {round}: secondary at CG {last}, record at CG {acked}; restart resynced {shipped} blocks (changed since: <= {changed}, bound {}, disk {})",
            changed + AL_BOUND,
            SIZE / CHUNK
        );
        assert_eq!(
            full,
            0,
            "round {round}: a full resync after a crash:\n{}",
            site.log()
        );
        assert!(
            shipped <= changed + AL_BOUND,
            "round {round}: resynced {shipped} blocks, more than {changed} changed + {AL_BOUND} of the activity log"
        );
        figures.push((shipped, changed));
    }
    site.drain_and_compare();
    site.assert_consistent_throughout();
    println!("resync after each crash (blocks shipped, blocks changed since the secondary's group): {figures:?}");
    drop(primary);
    sec.stop();
}

#[test]
fn a_clean_restart_ships_exactly_the_unshipped_blocks_and_a_corrupt_record_a_checksum_resync() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path());
    let sec = site.secondary();
    let primary = site.primary();
    site.wait_until("the initial copy", || {
        site.status()
            .replication
            .is_some_and(|r| r.last_committed_cg > 0)
    });
    let drained: Reply<Drained> = ctl(&site.sock(), "drain");
    assert!(drained.ok);
    // The link goes down; the guest writes on.
    sec.stop();
    let from = site.history.lock().unwrap().block.len();
    let stop = Arc::new(AtomicBool::new(false));
    let w = site.workload(7, false, stop.clone());
    site.wait_until("writes while the link is down", || {
        site.history.lock().unwrap().completions.len() >= from + 300
    });
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let unshipped = distinct_blocks(&site.history.lock().unwrap(), from);
    site.sigterm(primary);
    assert!(
        site.log().contains("change record closed clean"),
        "{}",
        site.log()
    );

    let sec = site.secondary();
    let primary = site.primary();
    let (shipped, full) = site.resync();
    println!("clean restart: {unshipped} blocks unshipped at the stop, {shipped} shipped");
    assert_eq!((shipped, full), (unshipped, 0), "{}", site.log());
    // What `drblk ctl status` shows of the record.
    let track = site.status().track.expect("the record in the status");
    assert!(track.kept && track.trusted_on_start, "{track:?}");
    assert_eq!(track.resync_blocks_on_start, unshipped);
    assert!(track.path.ends_with("primary.img.drblk-track"), "{track:?}");
    site.drain_and_compare();
    site.sigterm(primary);
    site.assert_consistent_throughout();

    // A corrupt record is not trusted: the disks are compared by checksums and only what
    // differs is shipped. 1 % of the secondary's blocks are changed behind its back.
    sec.stop();
    let blocks = SIZE / CHUNK;
    let changed: BTreeSet<u64> = (0..blocks).step_by(100).collect();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("secondary.img"))
            .unwrap();
        for &b in &changed {
            f.write_all_at(&[0xee; CHUNK as usize], b * CHUNK).unwrap();
        }
    }
    let sec = site.secondary();
    let track = dir.path().join("primary.img.drblk-track");
    std::fs::write(&track, b"not a change record").unwrap();
    let primary = site.primary();
    let (shipped, full) = site.resync();
    let link = site.status().link.unwrap();
    println!(
        "checksum resync: {} of {blocks} blocks differ, {shipped} shipped; {} bytes on the link ({} UDP) for a {} MiB disk",
        changed.len(),
        link.wire_bytes,
        link.udp_bytes,
        SIZE >> 20
    );
    assert_eq!((shipped, full), (changed.len() as u64, 0), "{}", site.log());
    assert_eq!(link.checksum_resyncs, 1);
    assert_eq!(link.resync_differing, changed.len() as u64);
    assert!(!site.status().track.unwrap().trusted_on_start);
    assert!(site.log().contains("cannot be trusted"), "{}", site.log());
    site.drain_and_compare();
    drop(primary);
    sec.stop();
}

#[test]
fn verify_finds_a_block_changed_behind_drblks_back_and_repair_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path());
    let (sec, _primary) = site.replicating_after_writes(3);

    let verify = |repair: bool| -> serde_json::Value {
        let mut c = Command::new(BIN);
        c.args(["ctl", "--socket"]).arg(site.sock()).arg("verify");
        if repair {
            c.arg("--repair");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let clean = verify(false);
    assert_eq!(clean["differing"], 0, "{clean}");
    assert_eq!(clean["compared"], SIZE / CHUNK, "{clean}");

    // A block of the replica changes behind drblk's back.
    let bad = 1234u64;
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("secondary.img"))
            .unwrap();
        f.write_all_at(&[0x5a; 100], bad * CHUNK + 7).unwrap();
    }
    let found = verify(false);
    assert_eq!(found["differing"], 1, "{found}");
    assert_eq!(found["first_differing"], serde_json::json!([bad]));
    assert_eq!(found["repaired"], false);
    let repaired = verify(true);
    assert_eq!(repaired["differing"], 1, "{repaired}");
    assert_eq!(repaired["repaired"], true);
    site.drain_and_compare();
    assert_eq!(verify(false)["differing"], 0);
    sec.stop();
}

#[test]
fn a_secondary_whose_state_was_reset_gets_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::new(dir.path());
    let (sec, _primary) = site.replicating_after_writes(11);

    // The secondary loses its state directory (journal, state file); its image stays.
    sec.stop();
    std::fs::remove_dir_all(dir.path().join("secondary.state")).unwrap();
    let before = site.status().replication.unwrap().chunks_shipped;
    let resyncs = site.status().link.unwrap().checksum_resyncs;
    let sec = site.secondary();
    site.wait_until("the checksum resync", || {
        site.status()
            .link
            .is_some_and(|l| l.checksum_resyncs > resyncs && l.connected)
    });
    site.drain_and_compare();
    let st = site.status();
    let shipped = st.replication.unwrap().chunks_shipped - before;
    let link = st.link.unwrap();
    println!(
        "state reset: {} blocks compared, {} differ, {shipped} shipped (disk {} blocks)",
        link.resync_compared,
        link.resync_differing,
        SIZE / CHUNK
    );
    assert_eq!(link.resync_differing, 0);
    assert_eq!(shipped, 0, "{}", site.log());
    assert_eq!(link.full_resyncs, 1, "only the initial copy was a full one");
    sec.stop();
}
