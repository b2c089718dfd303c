//! The soak: dependent guest writes through vhost-user for a long time while the link is
//! cut, the secondary is killed (`kill -9`) and restarted and the primary is killed and
//! restarted, in turn. Each daemon runs in its own process: the primary is `drblk serve`; the
//! secondary is this test binary started again to run only the secondary (the same code as
//! `drblk secondary`) with a hook that, at every commit, waits while this process reads the
//! replica image and checks it for dependent-write consistency. At the end the images are
//! byte-identical; the resident memory and open file descriptors of both daemons' processes
//! are printed over time and must stay flat.
//!
//! Length: `DRBLK_SOAK_SECONDS` (CI: 24 s, six periods of 4 s: two of each event; the
//! coverage run, where every other test already covers this code, skips it). Past two minutes the writer is
//! paced to 1,000 writes a second. The full soak:
//!
//! ```text
//! DRBLK_SOAK_SECONDS=1800 cargo test --release -p drblk --test soak -- --nocapture
//! ```
//!
//! `DRBLK_SOAK_KEEP_SECONDARY=1` keeps one secondary process for the whole soak (its kill
//! becomes another link cut), to show its memory over a long life; `DRBLK_SOAK_KEEP=1`
//! keeps the directory with both daemons' logs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dw::History;
use common::sites::Sites;
use common::KillOnDrop;
use drblk::site::secondary::{Secondary, SecondaryPaths};
use drblk_testkit::impair::ImpairProxy;
use drblk_testkit::test_frontend::TestFrontend;

const SIZE: u64 = 4 << 20;
const TEST: &str = "soak_link_cuts_and_restarts_of_both_sites_keep_every_group_consistent";
/// Set in the secondary's process: "DIR\nPORT" (the sites' directory, where to listen).
const SECONDARY_PROCESS: &str = "DRBLK_SOAK_SECONDARY";

/// Resident memory (KiB) and open descriptors of process `pid`.
fn footprint(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// Bytes (KiB) glibc's allocator counts as in use in this process (`mallinfo2`, summed
/// over every arena): what the program holds plus what each thread's cache (tcache) keeps,
/// without the free lists and arenas that make up the rest of the RSS.
fn malloc_in_use_kib() -> u64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    ((m.uordblks + m.hblkhd) / 1024) as u64
}

/// What the checks at each commit found.
#[derive(Default)]
struct Checks {
    groups: AtomicU64,
    violations: Mutex<Vec<String>>,
}

/// The secondary's process: the secondary on the sites' replica, telling the test at
/// `DIR/commits.sock` of every committed group and waiting for its answer before going on
/// (so the image holds exactly that group while the test reads it). Runs until killed.
fn secondary_process(spec: &str) {
    let (dir, port) = spec.split_once('\n').expect("DIR\\nPORT");
    let dir = PathBuf::from(dir);
    // Logs as `drblk secondary` writes them (to the sites' secondary.log).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("drblk=info"))
        .with_writer(std::io::stderr)
        .init();
    let hook = Mutex::new(UnixStream::connect(dir.join("commits.sock")).unwrap());
    let identity = drblk::link::SiteIdentity::load(&dir.join("certs"), "secondary").unwrap();
    let _secondary = Secondary::start(
        SecondaryPaths {
            images: vec![dir.join("secondary.img")],
            state_dir: dir.join("secondary.img.state"),
            discard_local_changes: false,
            remove: Vec::new(),
        },
        identity,
        format!("127.0.0.1:{port}").parse().unwrap(),
        Some("primary".into()),
        Some(Box::new(move |cg, _images: &[PathBuf]| {
            let mut test = hook.lock().unwrap();
            let mut checked = [0u8];
            if test.write_all(&cg.to_le_bytes()).is_err() || test.read_exact(&mut checked).is_err()
            {
                std::process::exit(1); // the test is gone
            }
        })),
    )
    .unwrap();
    eprintln!("soak: secondary process {} started", std::process::id());
    // Until killed, or until the test that started it is gone (then this one is adopted).
    // Meanwhile it publishes its allocator's in-use bytes for the test's samples.
    let parent = std::os::unix::process::parent_id();
    while std::os::unix::process::parent_id() == parent {
        // Written aside and renamed: a sample never reads a half-written (empty) file.
        let tmp = dir.join("secondary.heap.tmp");
        if std::fs::write(&tmp, malloc_in_use_kib().to_string()).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join("secondary.heap"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts the secondary's process ([`secondary_process`]) listening on `port`.
fn start_secondary(s: &Sites, port: u16) -> KillOnDrop {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(s.dir.join("secondary.log"))
        .unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(SECONDARY_PROCESS, format!("{}\n{port}", s.dir.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

/// Answers the secondary's processes, one after the other, on `listener`: at each committed
/// group it reads the replica image and checks it against the history, then lets the
/// secondary go on. A killed secondary ends its connection; the next one connects anew.
fn check_every_commit(
    listener: UnixListener,
    image: PathBuf,
    history: Arc<Mutex<History>>,
    checks: Arc<Checks>,
) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            let mut cg = [0u8; 8];
            while conn.read_exact(&mut cg).is_ok() {
                let cg = u64::from_le_bytes(cg);
                let img = std::fs::read(&image).unwrap();
                if let Err(e) = history.lock().unwrap().check(&img) {
                    checks
                        .violations
                        .lock()
                        .unwrap()
                        .push(format!("CG {cg}: {e}"));
                }
                checks.groups.fetch_add(1, Ordering::SeqCst);
                if conn.write_all(&[1]).is_err() {
                    break;
                }
            }
        }
    });
}

/// The guest: dependent writes until `stop`, at most `rate` a second if set (the check
/// at each group reads the whole history: a long soak paces its writes).
fn writer(
    sock: &Path,
    history: &Arc<Mutex<History>>,
    stop: &Arc<AtomicBool>,
    rate: Option<f64>,
) -> std::thread::JoinHandle<u64> {
    let (sock, history, stop) = (sock.to_owned(), history.clone(), stop.clone());
    std::thread::spawn(move || {
        let mut f = TestFrontend::connect(&sock, 2, 256, true).unwrap();
        let (t0, n0) = (Instant::now(), history.lock().unwrap().block.len());
        let h = history.clone();
        common::dw::drive(&mut f, &history, SIZE, || {
            if let Some(rate) = rate {
                let due = (h.lock().unwrap().block.len() - n0) as f64 / rate;
                let ahead = due - t0.elapsed().as_secs_f64();
                if ahead > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(ahead.min(0.1)));
                }
            }
            stop.load(Ordering::SeqCst)
        })
    })
}

/// One sample of both daemons' footprints.
struct Sample {
    at: f64,
    event: &'static str,
    primary: (u64, usize),
    secondary: (u64, usize),
    /// The secondary's allocator in-use bytes (KiB), as it last published them.
    secondary_heap: u64,
}

#[test]
fn soak_link_cuts_and_restarts_of_both_sites_keep_every_group_consistent() {
    if let Ok(spec) = std::env::var(SECONDARY_PROCESS) {
        return secondary_process(&spec);
    }
    let asked: Option<u64> = std::env::var("DRBLK_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    if asked.is_none() && std::env::var_os("DRBLK_QUICK").is_some() {
        println!("soak skipped in the coverage run (DRBLK_QUICK); DRBLK_SOAK_SECONDS runs it");
        return;
    }
    let total = Duration::from_secs(asked.unwrap_or(24));
    let rate = (total > Duration::from_secs(120)).then_some(1000.0);
    // One event per period, in turn: a link cut, a secondary kill, a primary kill (every
    // few minutes in the full soak).
    let period = (total / 6).clamp(Duration::from_secs(4), Duration::from_secs(120));
    // At least two of each event, whatever each takes.
    let rounds = (total.as_secs() / period.as_secs()).max(6) as u32;
    let tmp = tempfile::tempdir().unwrap();
    if std::env::var_os("DRBLK_SOAK_KEEP").is_some() {
        println!("soak: keeping {} (DRBLK_SOAK_KEEP)", tmp.path().display());
    }
    let mut s = Sites::new(tmp.path());
    std::fs::write(tmp.path().join("primary.img"), vec![0u8; SIZE as usize]).unwrap();
    let history = Arc::new(Mutex::new(History::new(SIZE)));
    let checks = Arc::new(Checks::default());
    let listener = UnixListener::bind(tmp.path().join("commits.sock")).unwrap();
    check_every_commit(listener, s.replica(), history.clone(), checks.clone());

    let sec_port = common::free_udp_port();
    let mut secondary = start_secondary(&s, sec_port);
    let proxy = ImpairProxy::start(format!("127.0.0.1:{sec_port}").parse().unwrap()).unwrap();
    let link = proxy.handle();
    s.port = proxy.local_addr().port();
    let mut primary = s.primary();
    s.wait_until("the initial copy", || s.acked().is_some_and(|c| c >= 1));

    let mut stop = Arc::new(AtomicBool::new(false));
    let mut w = writer(&s.sock(), &history, &stop, rate);
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut events = Vec::new();
    let sample = |event, primary: &KillOnDrop, secondary: &KillOnDrop| Sample {
        at: started.elapsed().as_secs_f64(),
        event,
        primary: footprint(primary.0.id()),
        secondary: footprint(secondary.0.id()),
        secondary_heap: std::fs::read_to_string(tmp.path().join("secondary.heap"))
            .ok()
            .and_then(|h| h.parse().ok())
            .unwrap_or(0),
    };
    // `DRBLK_SOAK_KEEP_SECONDARY`: one secondary for the whole soak (its kill becomes
    // another link cut), to show its memory over a long life.
    let keep_secondary = std::env::var_os("DRBLK_SOAK_KEEP_SECONDARY").is_some();
    for round in 0..rounds {
        // Four samples a period: the last one just before the event.
        for _ in 0..3 {
            std::thread::sleep(period / 4);
            samples.push(sample("", &primary, &secondary));
        }
        std::thread::sleep(period / 4);
        let kind = match round % 3 {
            1 if keep_secondary => 0,
            k => k,
        };
        let event = ["link cut", "secondary kill -9", "primary kill -9"][kind as usize];
        samples.push(sample(event, &primary, &secondary));
        match kind {
            0 => {
                link.set_blackhole(true);
                std::thread::sleep(period / 3);
                link.set_blackhole(false);
            }
            1 => {
                drop(secondary);
                std::thread::sleep(period / 4);
                secondary = start_secondary(&s, sec_port);
            }
            _ => {
                // The guest stops first (a vhost-user guest dies with its backend), then the
                // primary is killed and started again on its image and change record.
                stop.store(true, Ordering::SeqCst);
                w.join().unwrap();
                drop(primary);
                primary = s.primary();
                stop = Arc::new(AtomicBool::new(false));
                w = writer(&s.sock(), &history, &stop, rate);
            }
        }
        events.push(format!("{:.0}s {event}", started.elapsed().as_secs_f64()));
    }
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    let writes = history.lock().unwrap().block.len();
    let _: drblk::control::Drained = common::ctl(&s.sock(), "drain");
    samples.push(sample("end", &primary, &secondary));

    println!("soak: {:?}, events: {events:?}", total);
    println!(
        "  time  event               primary RSS   fds   secondary RSS   fds  (malloc in use)"
    );
    for x in &samples {
        println!(
            "{:>6.0}s {:<18} {:>9} KiB {:>5} {:>11} KiB {:>5} {:>9} KiB",
            x.at, x.event, x.primary.0, x.primary.1, x.secondary.0, x.secondary.1, x.secondary_heap
        );
    }
    let groups = checks.groups.load(Ordering::SeqCst);
    println!("  {writes} dependent writes, {groups} committed groups checked, none inconsistent");
    let v = checks.violations.lock().unwrap().clone();
    assert!(v.is_empty(), "{:#?}", &v[..v.len().min(5)]);
    assert!(groups > 0, "no group was checked");
    let a = std::fs::read(tmp.path().join("primary.img")).unwrap();
    let b = std::fs::read(s.replica()).unwrap();
    assert!(
        a == b,
        "the replica differs from the primary after the drain"
    );
    // Flat: each daemon's descriptors come back to what they were at the end of the first
    // period (a restarted daemon opens what its first run did). Memory is printed, not asserted
    // (allocators keep what they touched; the figures are read over the full soak).
    let end = samples.last().unwrap();
    for (name, first, now) in [
        ("secondary", samples[3].secondary.1, end.secondary.1),
        ("primary", samples[3].primary.1, end.primary.1),
    ] {
        assert!(
            now <= first + 8,
            "the {name}'s open descriptors grew from {first} to {now}"
        );
    }
    if std::env::var_os("DRBLK_SOAK_KEEP").is_some() {
        std::mem::forget(tmp);
    }
}
