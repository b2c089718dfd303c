//! `drblk serve --local-replica`: the replica image survives `kill -9` of the daemon at any
//! moment. A dependent-write workload runs through a real vhost-user connection while groups
//! form every 5 ms; the daemon is killed at a (seeded) random moment, the replica's recovery
//! runs (what the next `drblk serve` does when it opens the replica), and the image must be a
//! dependent-write-consistent cut holding at least the last group the daemon reported
//! committed. Every round restarts the daemon on the same disk and replica; at the end a
//! restarted daemon brings the replica to the disk's content.

mod common;

use drblk_testkit::rng::RngExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::ctl;
use common::dw::History;
use drblk::replica::{ReplicaState, ReplicaStore};
use drblk_testkit::test_frontend::TestFrontend;

const BIN: &str = env!("CARGO_BIN_EXE_drblk");
const SIZE: u64 = 8 << 20;
/// The daemon's default tracking granularity (the test starts it without --chunk-size).
const CHUNK: u64 = drblk::config::defaults::CHUNK_SIZE;
const ROUNDS: u64 = 10;

/// A `drblk serve` child, SIGKILLed on drop.
use common::KillOnDrop as Daemon;

struct Paths {
    disk: PathBuf,
    socket: PathBuf,
    replica: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Paths {
        Paths {
            disk: dir.join("disk.img"),
            socket: dir.join("disk.sock"),
            replica: dir.join("replica.img"),
            // The default state directory of a replica image, as for `drblk secondary`.
            state_dir: dir.join("replica.img.state"),
            log: dir.join("serve.log"),
        }
    }
}

fn serve(p: &Paths) -> Daemon {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p.log)
        .unwrap();
    let child = Command::new(BIN)
        .arg("serve")
        .arg("--disk")
        .arg(&p.disk)
        .args(["--size", "8M", "--queues", "2", "--socket"])
        .arg(&p.socket)
        .arg("--local-replica")
        .arg(&p.replica)
        .args(["--cg-interval", "5ms"])
        .env("RUST_LOG", "drblk=info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut d = Daemon(child);
    // The control socket (`ctl`) is the last thing the daemon opens.
    let ctl_socket = drblk::control::control_path(&p.socket);
    wait_until("the daemon to listen", p, || {
        assert!(d.0.try_wait().unwrap().is_none(), "the daemon exited");
        std::os::unix::net::UnixStream::connect(&p.socket).is_ok()
            && std::os::unix::net::UnixStream::connect(&ctl_socket).is_ok()
    });
    d
}

/// Waits for `f` with a generous deadline that only guards against hangs.
fn wait_until(what: &str, p: &Paths, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; daemon log:\n{}",
            std::fs::read_to_string(&p.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Groups this daemon committed, and the number of its last committed group.
fn committed(sock: &Path) -> (u64, u64) {
    let st: drblk::control::PrimaryStatus = ctl(sock, "status");
    (
        st.cg.map_or(0, |c| c.committed),
        st.replication.map_or(0, |r| r.last_committed_cg),
    )
}

/// Runs the replica's crash recovery (what `drblk serve` does when it opens it) and returns
/// its state and the image.
fn recover(p: &Paths) -> (ReplicaState, Option<u64>, Vec<u8>) {
    let uuid = drblk::replica::stored_group(&p.state_dir)
        .unwrap()
        .map_or([0; 16], |g| g.disks[0].uuid);
    let spec = drblk::replica::GroupSpec::single(&p.replica, SIZE, CHUNK, uuid);
    let (store, report) = ReplicaStore::open(&spec, &p.state_dir).unwrap();
    println!("  recovery: {report:?}");
    let (state, cg) = (store.state(), store.last_committed_cg());
    drop(store);
    (state, cg, std::fs::read(&p.replica).unwrap())
}

#[test]
fn the_local_replica_recovers_to_a_whole_group_after_kill_9_at_any_moment() {
    let dir = tempfile::tempdir().unwrap();
    let p = Paths::new(dir.path());
    // Start from zeroes (block id 0 = never written).
    std::fs::write(&p.disk, vec![0u8; SIZE as usize]).unwrap();
    let history = Arc::new(Mutex::new(History::new(SIZE)));
    let mut rng = drblk_testkit::rng::seeded(0x2545_f491_4f6c_dd1d);
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let daemon = serve(&p);
        let stop = Arc::new(AtomicBool::new(false));
        let workload = {
            let (sock, history, stop) = (p.socket.clone(), history.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
                common::dw::drive_until_killed(&mut f, &history, SIZE, round + 1, || {
                    stop.load(Ordering::SeqCst)
                })
            })
        };
        // Kill while groups of the workload's writes are being committed: after two more
        // commits once the workload is under way, at a seeded random moment within a few
        // group intervals.
        let base = history.lock().unwrap().completions.len();
        wait_until("the workload to run", &p, || {
            history.lock().unwrap().completions.len() >= base + 200
        });
        let (c0, _) = committed(&p.socket);
        wait_until("two commits under the workload", &p, || {
            committed(&p.socket).0 >= c0 + 2
        });
        let (_, reported) = committed(&p.socket);
        let delay = Duration::from_micros(rng.random_range(0..20_000));
        std::thread::sleep(delay);
        drop(daemon); // SIGKILL
        stop.store(true, Ordering::SeqCst);
        let writes = workload.join().unwrap();

        let (state, cg, image) = recover(&p);
        let check = history.lock().unwrap().check(&image);
        println!(
            "round {round}: killed {delay:?} after CG {reported} was reported committed, {writes} writes; recovered {state:?}: {check:?}"
        );
        if let Err(e) = check {
            failures.push(format!("round {round}: the recovered replica ({state:?}) is not a dependent-write-consistent cut: {e}"));
        }
        if !matches!(state, ReplicaState::Consistent { .. }) || cg.unwrap_or(0) < reported {
            failures.push(format!(
                "round {round}: recovered {state:?}, but CG {reported} had been reported committed"
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // A restarted daemon has lost its change bitmaps: it copies the whole disk again, staged
    // above the replica's group, and a drain makes the replica identical to the disk.
    let mut daemon = serve(&p);
    let _: drblk::control::Reply<drblk::control::Drained> = ctl(&p.socket, "drain");
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let mut exit = None;
    wait_until("the daemon to exit after SIGTERM", &p, || {
        exit = daemon.0.try_wait().unwrap();
        exit.is_some()
    });
    let st = exit.unwrap();
    assert!(st.success(), "{st}");
    assert!(
        std::fs::read(&p.disk).unwrap() == std::fs::read(&p.replica).unwrap(),
        "after a drain the replica equals the disk"
    );
}
