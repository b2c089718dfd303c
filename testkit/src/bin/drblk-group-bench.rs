//! drblk-group-bench: what forming one consistency group over several disks costs the
//! guest — the freeze (first queue frozen to last queue run) of `cg::Group::form_cg` over
//! 1, 2 and 4 disks' engines, side by side, in one run.
//!
//! With `--daemon`, through the real daemon instead: `drblk serve` (in-process, CPU 0) with
//! 1, 2 and 4 disks of `--queues` queues each, replicating over QUIC on loopback to a
//! `drblk secondary` of as many images (in-process, CPU 1), and one libblkio client per
//! disk (CPU 1) writing random 4 KiB blocks; each disk count is run with replication off
//! and on, and the table shows the clients' IOPS and p99 latency side by side with the
//! daemon's freeze times (its status) and the groups it committed.
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
    /// Measure through the real daemon and a libblkio client per disk (see the module
    /// docs) instead of the engines alone.
    #[arg(long)]
    daemon: bool,
    /// With --daemon: requests in flight per client (spread over its queues).
    #[arg(long, default_value_t = 16)]
    qd: usize,
    /// With --daemon: writes a second per client (0: as fast as it goes).
    #[arg(long, default_value_t = 0.0)]
    client_rate: f64,
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
    if args.daemon {
        if let Err(e) = daemon::table(&args) {
            eprintln!("drblk-group-bench --daemon: {e:#}");
            std::process::exit(1);
        }
        return;
    }
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

/// `--daemon`: the real daemon serving N disks as one group.
mod daemon {
    use std::path::{Path, PathBuf};

    use drblk::cli::ServeArgs;
    use drblk::site::primary::Server;
    use drblk::site::secondary::{Secondary, SecondaryPaths};
    use drblk_testkit::bench::{fill_image, pin_self, run_cell, Cell, Figures, Rw};

    use super::Args;

    struct Row {
        disks: usize,
        replicated: bool,
        /// One per disk.
        figures: Vec<Figures>,
        /// Freeze p50/p99/max µs, groups committed.
        freeze: Option<(f64, f64, f64, u64)>,
    }

    pub fn table(args: &Args) -> anyhow::Result<()> {
        let tmp = tempfile::Builder::new()
            .prefix("drblk-group-bench-")
            .tempdir()?;
        let dir = tmp.path();
        let certs = dir.join("certs");
        drblk::link::certs::generate(&certs, &["primary", "secondary"], true)?;
        let size = args.size_mib << 20;
        let max = args.disks.iter().copied().max().unwrap_or(1);
        let images: Vec<PathBuf> = (0..max).map(|d| dir.join(format!("d{d}.img"))).collect();
        for i in &images {
            eprintln!(
                "filling {} ({} MiB) with 4 KiB writes ...",
                i.display(),
                args.size_mib
            );
            fill_image(i, size)?;
        }
        let mut rows = Vec::new();
        for &n in &args.disks {
            for replicated in [false, true] {
                rows.push(row(args, dir, &certs, &images[..n], replicated)?);
            }
        }
        println!();
        println!(
            "drblk serve with N disks x {} queues (CPU 0); a libblkio client per disk, randwrite 4 KiB qd{}{} (CPU 1); replication to an in-process secondary over QUIC on loopback (CPU 1); a group every {} ms; {} MiB per disk; {} s per cell",
            args.queues,
            args.qd,
            if args.client_rate > 0.0 {
                format!(" at {:.0}/s", args.client_rate)
            } else {
                String::new()
            },
            args.interval_ms,
            args.size_mib,
            args.seconds
        );
        println!("disks | replication | IOPS total (per disk)        | p99 µs (worst disk) | freeze p50 / p99 / max µs | groups committed");
        for r in &rows {
            let total: f64 = r.figures.iter().map(|f| f.iops).sum();
            let per: Vec<String> = r.figures.iter().map(|f| format!("{:.0}", f.iops)).collect();
            let p99 = r.figures.iter().map(|f| f.p99_us).fold(0.0, f64::max);
            let freeze = match r.freeze {
                Some((a, b, c, _)) => format!("{a:>6.1} / {b:>6.1} / {c:>7.1}"),
                None => "-".into(),
            };
            println!(
                "{:>5} | {:<11} | {:>8.0} ({:<17}) | {:>19.0} | {:<25} | {}",
                r.disks,
                if r.replicated { "on" } else { "off" },
                total,
                per.join(" + "),
                p99,
                freeze,
                r.freeze.map_or("-".into(), |f| f.3.to_string())
            );
        }
        Ok(())
    }

    fn row(
        args: &Args,
        dir: &Path,
        certs: &Path,
        images: &[PathBuf],
        replicated: bool,
    ) -> anyhow::Result<Row> {
        let n = images.len();
        let tag = format!("{n}{}", if replicated { "r" } else { "" });
        let socks: Vec<PathBuf> = (0..n)
            .map(|d| dir.join(format!("s{tag}-{d}.sock")))
            .collect();
        // The secondary's threads on CPU 1 (with the clients), the daemon's on CPU 0:
        // threads inherit the CPU of the thread that starts them.
        pin_self(1);
        let secondary = if replicated {
            let replicas = (0..n)
                .map(|d| dir.join(format!("r{tag}-{d}.img")))
                .collect();
            Some(Secondary::start(
                SecondaryPaths {
                    images: replicas,
                    state_dir: dir.join(format!("r{tag}.state")),
                    discard_local_changes: false,
                    remove: Vec::new(),
                },
                drblk::link::SiteIdentity::load(certs, "secondary")?,
                "127.0.0.1:0".parse()?,
                Some("primary".into()),
                None,
            )?)
        } else {
            None
        };
        pin_self(0);
        let mut a = ServeArgs::new(images[0].clone(), socks[0].clone());
        for d in 1..n {
            a.add_disk(images[d].clone(), socks[d].clone());
        }
        a.queues = args.queues as u16;
        a.cg.cg_interval = std::time::Duration::from_millis(args.interval_ms).into();
        if let Some(s) = &secondary {
            a.replication.replicate_to = Some(s.local_addr()?.to_string());
            a.replication.certs = certs.to_owned();
        }
        let server = Server::start(&a)?;
        if replicated {
            // The initial copy first: the figures are those of incremental replication.
            let t0 = std::time::Instant::now();
            while server
                .status()
                .replication
                .is_none_or(|r| r.last_committed_cg == 0)
            {
                anyhow::ensure!(
                    t0.elapsed() < std::time::Duration::from_secs(600),
                    "no initial copy within 600 s"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let before = server.engine().map(|e| e.stats().committed).unwrap_or(0);
        let clients: Vec<_> = socks
            .iter()
            .enumerate()
            .map(|(d, sock)| {
                let (sock, secs, blocks) =
                    (sock.clone(), args.seconds, (args.size_mib << 20) / 4096);
                let cell = Cell {
                    seed: 0x9e37_79b9 + d as u64,
                    rate: (args.client_rate > 0.0).then_some(args.client_rate),
                    ..Cell::new(Rw::RandWrite, args.qd, args.queues.min(4))
                };
                std::thread::spawn(move || {
                    pin_self(1);
                    run_cell(&sock, std::process::id(), &cell, secs, blocks)
                })
            })
            .collect();
        let mut figures = Vec::new();
        for c in clients {
            figures.push(c.join().map_err(|_| anyhow::anyhow!("client panicked"))??);
        }
        let freeze = server.engine().filter(|_| replicated).map(|e| {
            let st = e.stats();
            let mut c = st.coordination_ns.clone();
            c.sort_unstable();
            let pct = |q: f64| {
                c.get(((c.len().max(1) - 1) as f64 * q) as usize)
                    .copied()
                    .unwrap_or(0) as f64
                    / 1000.0
            };
            (
                pct(0.5),
                pct(0.99),
                st.coordination_max_ns as f64 / 1000.0,
                st.committed - before,
            )
        });
        server.stop()?;
        if let Some(s) = secondary {
            s.stop();
        }
        Ok(Row {
            disks: n,
            replicated,
            figures,
            freeze,
        })
    }
}
