//! drblk-group-bench: what forming one consistency group over several disks costs the
//! guest — the freeze (first queue frozen to last queue run) of `cg::Group::form_cg` over
//! 1, 2 and 4 disks' engines, side by side, in one run.
//!
//! In-process and without a guest: each disk is a `cg::Engine` with `--queues` queues over
//! an image of zeros; writer threads record 4 KiB writes and complete them on every queue of
//! every disk (as the queue workers of the data path do), while the main thread forms a
//! group every `--interval-ms`, drains it and commits it (the drain reads the images; no
//! link). Writers on CPU 1, formation on CPU 0 (the machine's other core), so the freeze
//! includes waiting for queue locks the writers hold, as it does in the daemon.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;

use drblk::cg::{CgConfig, ChunkSource, CommitOutcome, Completion, Engine, FormError, Group};
use drblk_testkit::bench::pin_self;
use drblk_testkit::rng::RngExt;

/// Freeze time of one consistency group over several disks.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Numbers of disks to compare.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    disks: Vec<usize>,
    /// Queues per disk.
    #[arg(long, default_value_t = 4)]
    queues: usize,
    /// Writer threads (each serves its share of every disk's queues).
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Seconds per cell.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Interval between groups (milliseconds).
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
    /// Size of each disk (MiB).
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Writes a second over all disks (0: as fast as the writers go, which dirties every
    /// chunk of every group).
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
}

/// An image of zeros.
struct Zeros;

impl ChunkSource for Zeros {
    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
}

struct Cell {
    disks: usize,
    writes_per_s: f64,
    formed: u64,
    failed: u64,
    freeze: Histogram<u64>,
}

fn cell(args: &Args, disks: usize) -> Cell {
    let size = args.size_mib << 20;
    let engines: Vec<Arc<Engine>> = (0..disks)
        .map(|_| Engine::new(CgConfig::new(size), args.queues, Arc::new(Zeros)).expect("engine"))
        .collect();
    let group = Arc::new(Group::new(engines).expect("group"));
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let queues = disks * args.queues;
    let writers: Vec<_> = (0..args.writers)
        .map(|t| {
            let (group, stop, writes) = (group.clone(), stop.clone(), writes.clone());
            let (per_disk, n) = (args.queues, args.writers);
            let per_writer = args.rate as f64 / n as f64;
            std::thread::spawn(move || {
                let t0 = Instant::now();
                pin_self(1);
                // Queue k of all disks' queues, if this thread serves it.
                let mine: Vec<usize> = (0..queues).filter(|k| k % n == t).collect();
                let blocks = size / 4096;
                let mut rng = drblk_testkit::rng::seeded(t as u64);
                let (mut done, mut head) = (0u64, 0u16);
                let mut items = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if per_writer > 0.0 && done as f64 > per_writer * t0.elapsed().as_secs_f64() {
                        std::thread::sleep(Duration::from_micros(100));
                        continue;
                    }
                    for &k in &mine {
                        let (d, q) = (k / per_disk, k % per_disk);
                        let e = group.engine(d);
                        let block = rng.random_range(0..blocks);
                        let ticket = e.begin_write(q, block * 4096, 4096).expect("record");
                        drop(ticket);
                        head = head.wrapping_add(1);
                        items.push(Completion { head, len: 0 });
                        e.complete(q, &mut items, &|_| {});
                        items.clear();
                        done += 1;
                    }
                }
                writes.fetch_add(done, Ordering::Relaxed);
            })
        })
        .collect();

    pin_self(0);
    let mut freeze = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let (mut formed, mut failed) = (0, 0);
    let mut buf = Vec::new();
    let started = Instant::now();
    let end = started + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(args.interval_ms));
        let cg = match group.form_cg() {
            Ok(f) => {
                formed += 1;
                freeze.saturating_record(f.coordination.as_nanos() as u64);
                f.cg
            }
            Err(FormError::Busy { .. } | FormError::CoordinationTimeout { .. }) => {
                failed += 1;
                continue;
            }
        };
        // Drain and commit, as the shipper does (into nowhere).
        loop {
            while let Some(ext) = group.next_extent(&mut buf).expect("read zeros") {
                group.confirm(&ext);
            }
            match group.try_commit(cg) {
                CommitOutcome::Pending { .. } => std::thread::sleep(Duration::from_micros(200)),
                _ => break,
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    Cell {
        disks,
        writes_per_s: writes.load(Ordering::Relaxed) as f64 / elapsed,
        formed,
        failed,
        freeze,
    }
}

fn main() {
    let args = Args::parse();
    println!(
        "drblk-group-bench: {} queues per disk, {} writer thread(s) on CPU 1, {} writes/s, a group every {} ms, {} s per cell",
        args.queues, args.writers, args.rate, args.interval_ms, args.seconds
    );
    println!("disks | queues | writes/s  | groups formed/failed | freeze p50 / p99 / max µs");
    for &n in &args.disks {
        let c = cell(&args, n);
        let us = |q: f64| c.freeze.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:>5} | {:>6} | {:>9.0} | {:>13} / {:<6} | {:>6.1} / {:>6.1} / {:>7.1}",
            c.disks,
            c.disks * args.queues,
            c.writes_per_s,
            c.formed,
            c.failed,
            us(0.5),
            us(0.99),
            c.freeze.max() as f64 / 1000.0
        );
    }
}
