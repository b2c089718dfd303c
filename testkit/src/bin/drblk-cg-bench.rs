//! drblk-cg-bench: what consistency groups cost the guest, and what they buy.
//!
//! Runs the same libblkio workload against drblk with consistency groups off and on (at two
//! intervals) in one run, with each group drained into an in-process replica image, and
//! prints guest IOPS and latency side by side with the freeze (coordination) time, groups
//! formed/committed/abandoned, peak copy-on-write cache, and RPO (age of the newest
//! committed group, sampled every 10 ms). Backend on CPU 0, client on CPU 1.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use hdrhistogram::Histogram;

use drblk::cli::ServeArgs;
use drblk::replicate::local::LocalReplica;
use drblk::site::primary::Server;
use drblk_testkit::bench::{fill_image, pin_self, run_cell, Cell, Figures, Rw};

/// Benchmark consistency-group formation on versus off.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Seconds per cell.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Consistency-group intervals to compare with "off" (milliseconds).
    #[arg(long, value_delimiter = ',', default_value = "100,20")]
    intervals_ms: Vec<u64>,
    /// Niceness of the shipping thread (`drblk serve --ship-nice`).
    #[arg(long, default_value_t = 0)]
    ship_nice: i32,
    /// Tracking granularity (chunk size) in KiB.
    #[arg(long, default_value_t = drblk::cg::DEFAULT_CHUNK_SIZE / 1024)]
    chunk_kib: u64,
    /// Request rate of the rate-limited write cell (requests per second, at QD1 so that the
    /// latency is the service time).
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
}

struct Row {
    label: String,
    figures: Vec<Option<Figures>>,
    coord: Option<(f64, f64, f64)>,
    groups: Option<(u64, u64, u64)>,
    cow_peak_mib: f64,
    rpo: Option<(f64, f64)>,
}

fn percentile(v: &mut [u64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("drblk-cg-bench-")
        .tempdir()?;
    let image = tmp.path().join("bench.img");
    let size = args.size_mib << 20;
    eprintln!(
        "filling a {} MiB image with 4 KiB writes ...",
        args.size_mib
    );
    fill_image(&image, size)?;
    // Unthrottled writes are the worst case (every interval dirties most chunks, and the
    // drain competes with the queue workers for the CPU); the rate-limited cell is a busy
    // guest that leaves CPU to spare, where the cost shows as latency, not IOPS.
    let cells = [
        Cell::new(Rw::RandWrite, 16, 2),
        Cell::new(Rw::RandWrite, 1, 1),
        Cell {
            rate: Some(args.rate),
            ..Cell::new(Rw::RandWrite, 1, 1)
        },
        Cell::new(Rw::RandRead, 16, 2),
    ];
    let mut modes: Vec<Option<Duration>> = vec![None];
    modes.extend(
        args.intervals_ms
            .iter()
            .map(|&ms| Some(Duration::from_millis(ms))),
    );
    let mut rows = Vec::new();
    for mode in modes {
        // Server threads inherit the CPU of the thread that starts them.
        pin_self(0);
        let socket = tmp.path().join("bench.sock");
        let mut serve = ServeArgs::new(image.clone(), socket.clone());
        serve.queues = 2;
        serve.cg.consistency_groups = mode.is_some();
        serve.cg.chunk_size = args.chunk_kib << 10;
        serve.cg.ship_nice = args.ship_nice;
        let server = Server::start(&serve)?;
        let cycle = match mode {
            Some(interval) => {
                let replica = LocalReplica::create(
                    &tmp.path().join("replica.img"),
                    size,
                    serve.cg.chunk_size,
                )?;
                Some(server.start_cycle(Box::new(replica), interval)?)
            }
            None => None,
        };
        let mut figures = Vec::new();
        let mut rpo = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
        for cell in cells {
            let sock = socket.clone();
            let client = std::thread::spawn(move || {
                pin_self(1);
                run_cell(&sock, std::process::id(), &cell, args.seconds, size / 4096)
            });
            // Sample the RPO while the workload runs.
            let until =
                Instant::now() + Duration::from_secs(args.seconds) + Duration::from_millis(300);
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
                if let Some(c) = &cycle {
                    let frozen = c.stats().last_commit_frozen_us.load(Ordering::SeqCst);
                    if frozen > 0 {
                        let now = SystemTime::now()
                            .duration_since(SystemTime::UNIX_EPOCH)?
                            .as_micros() as u64;
                        rpo.record(now.saturating_sub(frozen).max(1))?;
                    }
                }
            }
            let f = client
                .join()
                .map_err(|_| anyhow::anyhow!("client panicked"))?;
            if let Err(e) = &f {
                eprintln!("cell failed: {e:#}");
            }
            figures.push(f.ok());
        }
        let label = match mode {
            None => "CG off".to_string(),
            Some(i) => format!("CG every {} ms", i.as_millis()),
        };
        let (coord, groups, cow_peak_mib) = match server.engine() {
            Some(e) => {
                let st = e.stats();
                let mut c = st.coordination_ns.clone();
                let abandoned = st.abandoned_cache_full
                    + st.abandoned_drain_timeout
                    + st.abandoned_preserve_failed
                    + st.abandoned_link_lost;
                (
                    Some((
                        percentile(&mut c, 0.5),
                        percentile(&mut c, 0.99),
                        st.coordination_max_ns as f64 / 1000.0,
                    )),
                    Some((st.formed, st.committed, abandoned)),
                    st.cow_peak_bytes as f64 / (1 << 20) as f64,
                )
            }
            None => (None, None, 0.0),
        };
        if let Some(c) = cycle {
            c.stop()?;
        }
        server.stop()?;
        let rpo = (!rpo.is_empty()).then(|| {
            (
                rpo.value_at_quantile(0.5) as f64 / 1000.0,
                rpo.value_at_quantile(0.99) as f64 / 1000.0,
            )
        });
        rows.push(Row {
            label,
            figures,
            coord,
            groups,
            cow_peak_mib,
            rpo,
        });
    }

    println!();
    println!(
        "libblkio over vhost-user, 2-queue drblk, {} MiB image, {} KiB chunks, ship-nice {}, {} s per cell; backend on CPU 0, client on CPU 1",
        args.size_mib, args.chunk_kib, args.ship_nice, args.seconds
    );
    let names: Vec<String> = cells
        .iter()
        .map(|c| {
            let rw = if c.rw == Rw::RandRead {
                "randread"
            } else {
                "randwrite"
            };
            let rate = c
                .rate
                .map_or(String::new(), |r| format!(" @{:.0}k", r / 1000.0));
            format!("{rw} qd{} q{}{rate}", c.qd, c.queues)
        })
        .collect();
    print!("{:<16}", "mode");
    for n in &names {
        print!(" | {:^26}", format!("{n}: IOPS p99µs"));
    }
    println!(" | freeze p50/p99/max µs  | formed/committed/abandoned | CoW peak | RPO p50/p99 ms");
    let base: Vec<Option<f64>> = rows[0].figures.iter().map(|f| f.map(|f| f.iops)).collect();
    for r in &rows {
        print!("{:<16}", r.label);
        for (i, f) in r.figures.iter().enumerate() {
            match (f, base[i]) {
                (Some(f), Some(b)) if r.label != "CG off" => print!(
                    " | {:>8.0} ({:+5.1}%) {:>8.0}",
                    f.iops,
                    (f.iops / b - 1.0) * 100.0,
                    f.p99_us
                ),
                (Some(f), _) => print!(" | {:>8.0}          {:>8.0}", f.iops, f.p99_us),
                _ => print!(" | {:^26}", "-"),
            }
        }
        match r.coord {
            Some((a, b, c)) => print!(" | {a:>6.1}/{b:>6.1}/{c:>7.1} "),
            None => print!(" | {:^22}", "-"),
        }
        match r.groups {
            Some((f, c, a)) => print!(" | {:>8}/{:>8}/{:>8} ", f, c, a),
            None => print!(" | {:^26}", "-"),
        }
        print!(" | {:>5.1} MiB", r.cow_peak_mib);
        match r.rpo {
            Some((a, b)) => println!(" | {a:>6.1}/{b:>6.1}"),
            None => println!(" | -"),
        }
    }
    // The drain competes with the queue workers for the backend's CPU; per CPU-second of
    // the workers, the I/O path's own cost shows.
    println!();
    println!("I/O path cost: CPUs used by the queue workers, and requests per worker CPU-second");
    print!("{:<16}", "mode");
    for n in &names {
        print!(" | {n:^26}");
    }
    println!();
    let base: Vec<Option<f64>> = rows[0]
        .figures
        .iter()
        .map(|f| f.map(|f| f.iops_per_io_cpu()))
        .collect();
    for r in &rows {
        print!("{:<16}", r.label);
        for (i, f) in r.figures.iter().enumerate() {
            match (f, base[i]) {
                (Some(f), Some(b)) if b > 0.0 && r.label != "CG off" => print!(
                    " | {:>4.2} CPU {:>7.0}/s ({:+5.1}%)",
                    f.io_cpus,
                    f.iops_per_io_cpu(),
                    (f.iops_per_io_cpu() / b - 1.0) * 100.0
                ),
                (Some(f), _) => print!(
                    " | {:>4.2} CPU {:>7.0}/s         ",
                    f.io_cpus,
                    f.iops_per_io_cpu()
                ),
                _ => print!(" | {:^26}", "-"),
            }
        }
        println!();
    }
    Ok(())
}
