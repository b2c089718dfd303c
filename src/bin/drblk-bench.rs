//! drblk-bench: the same libblkio workload against drblk and against qemu-storage-daemon's
//! vhost-user-blk export, on the same image, in one run; prints one table.
//!
//! Backends run pinned to CPU 0 and the client to CPU 1 (cross-CPU wakeups are what a real
//! VM pays, and pinning makes QD1 figures repeatable). Nothing is asserted: it prints figures.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkio::Completion;
use clap::Parser;
use hdrhistogram::Histogram;

use drblk::blkio_client::{BlkioClient, Op};

/// Benchmark drblk against qemu-storage-daemon over vhost-user-blk.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Seconds per cell.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Image size in MiB (filled with 4 KiB writes before the run).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Working directory (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Only these backends (comma separated: drblk,drblk-poll,qsd-threads,qsd-io_uring).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// drblk binary (default: the one next to this benchmark).
    #[arg(long)]
    drblk: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq)]
enum Rw {
    RandRead,
    RandWrite,
}

struct Cell {
    rw: Rw,
    qd: usize,
    queues: usize,
}

struct Figures {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_per_100k: f64,
}

struct Backend {
    name: &'static str,
    child: Child,
    socket: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cpu_seconds(pid: u32) -> f64 {
    // utime + stime of all threads, in clock ticks (fields 14 and 15 of /proc/pid/stat).
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no memory-safety preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn pin_self(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn wait_socket(p: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::os::unix::net::UnixStream::connect(p).is_err() {
        if let Some(st) = child.try_wait()? {
            bail!("backend exited early: {st}");
        }
        if Instant::now() > deadline {
            bail!("backend never listened on {}", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn start_backend(
    name: &'static str,
    drblk: &Path,
    image: &Path,
    dir: &Path,
) -> anyhow::Result<Backend> {
    let socket = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]);
    match name {
        "drblk" | "drblk-poll" => {
            cmd.arg(drblk)
                .args(["serve", "--queues", "2", "--log", "warn", "--disk"])
                .arg(image)
                .arg("--socket")
                .arg(&socket);
            if name == "drblk-poll" {
                cmd.args(["--poll-us", "50"]);
            }
        }
        _ => {
            let aio = if name == "qsd-threads" {
                "threads"
            } else {
                "io_uring"
            };
            cmd.arg("qemu-storage-daemon")
                .arg("--blockdev")
                .arg(format!(
                    "driver=file,node-name=file0,filename={},aio={aio},cache.direct=off",
                    image.display()
                ))
                .arg("--export")
                .arg(format!(
                    "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path={},writable=on,num-queues=2",
                    socket.display()
                ));
        }
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    wait_socket(&socket, &mut child)?;
    Ok(Backend {
        name,
        child,
        socket,
    })
}

fn run_cell(b: &Backend, cell: &Cell, secs: u64, blocks: u64) -> anyhow::Result<Figures> {
    const BS: usize = 4096;
    let mut c = BlkioClient::connect(&b.socket, cell.queues, BS * cell.qd, false)?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..64).map(|_| MaybeUninit::uninit()).collect();
    let mut started = vec![Instant::now(); cell.qd];
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut next_block = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % blocks
    };
    let op = |slot: usize, blk: u64| match cell.rw {
        Rw::RandRead => Op::Read {
            offset: blk * BS as u64,
            buf: slot * BS,
            len: BS,
        },
        Rw::RandWrite => Op::Write {
            offset: blk * BS as u64,
            buf: slot * BS,
            len: BS,
        },
    };
    // Slot s belongs to queue s % queues.
    let warmup = Instant::now() + Duration::from_millis(300);
    let mut measuring = false;
    let (mut done, mut cpu0, mut t0) = (0u64, 0.0, Instant::now());
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        c.submit(slot % cell.queues, op(slot, next_block()), slot);
    }
    let end_at = warmup + Duration::from_secs(secs);
    loop {
        let now = Instant::now();
        if !measuring && now >= warmup {
            measuring = true;
            cpu0 = cpu_seconds(b.child.id());
            t0 = now;
        }
        if now >= end_at {
            break;
        }
        for q in 0..cell.queues {
            let n = c.poll(q, &mut comps, 0)?;
            for comp in &comps[..n] {
                // SAFETY: do_io initialised the first n entries.
                let comp = unsafe { comp.assume_init_ref() };
                if comp.ret != 0 {
                    bail!("{}: request failed: errno {}", b.name, -comp.ret);
                }
                let slot = comp.user_data;
                let t = Instant::now();
                if measuring {
                    hist.record((t - started[slot]).as_nanos() as u64)?;
                    done += 1;
                }
                started[slot] = t;
                c.submit(q, op(slot, next_block()), slot);
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(b.child.id()) - cpu0;
    // Drain what is still in flight before disconnecting.
    let mut left = cell.qd;
    let deadline = Instant::now() + Duration::from_secs(5);
    while left > 0 && Instant::now() < deadline {
        for q in 0..cell.queues {
            left -= left.min(c.poll(q, &mut comps, 0)?);
        }
    }
    let iops = done as f64 / elapsed;
    Ok(Figures {
        iops,
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_per_100k: if done > 0 {
            cpu / (done as f64 / 100_000.0)
        } else {
            0.0
        },
    })
}

fn fill_image(path: &Path, size: u64) -> anyhow::Result<()> {
    // 4 KiB writes: an image written with large blocks sits in the page cache as large
    // folios and makes buffered 4k random writes slower for every backend.
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let mut block = vec![0u8; 4096];
    for b in 0..size / 4096 {
        block[..8].copy_from_slice(&b.to_le_bytes());
        block[8] = 1;
        f.write_all(&block)?;
    }
    f.sync_all()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    pin_self(1);
    let tmp = tempfile::Builder::new().prefix("drblk-bench-").tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let drblk = match &args.drblk {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("drblk"),
    };
    let image = dir.join("bench.img");
    let size = args.size_mib << 20;
    eprintln!(
        "filling a {} MiB image with 4 KiB writes ...",
        args.size_mib
    );
    fill_image(&image, size)?;
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--version")
        .output();
    let qsd_version = qsd
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "not installed".into());
    eprintln!("peer: {qsd_version}");

    let mut names: Vec<&'static str> = vec!["drblk", "drblk-poll", "qsd-threads", "qsd-io_uring"];
    if !args.only.is_empty() {
        names.retain(|n| args.only.iter().any(|o| o == n));
    }
    let cells: Vec<Cell> = [Rw::RandRead, Rw::RandWrite]
        .into_iter()
        .flat_map(|rw| {
            [1usize, 32].into_iter().flat_map(move |qd| {
                [1usize, 2]
                    .into_iter()
                    .map(move |queues| Cell { rw, qd, queues })
            })
        })
        .collect();
    let mut results: Vec<Vec<Option<Figures>>> = Vec::new();
    for name in &names {
        let backend = match start_backend(name, &drblk, &image, &dir) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{name}: skipped: {e:#}");
                results.push(cells.iter().map(|_| None).collect());
                continue;
            }
        };
        let mut row = Vec::new();
        for cell in &cells {
            let f = run_cell(&backend, cell, args.seconds, size / 4096);
            if let Err(e) = &f {
                eprintln!("{name}: cell failed: {e:#}");
            }
            row.push(f.ok());
        }
        results.push(row);
    }

    println!();
    println!("4 KiB random I/O through libblkio (virtio-blk-vhost-user), {} s per cell; backend on CPU 0, client on CPU 1", args.seconds);
    println!("peer: {qsd_version}");
    println!("cells: IOPS  p50/p99 latency (µs)  backend CPU-seconds per 100k IOPS");
    print!("{:<22}", "workload");
    for n in &names {
        print!(" | {:^32}", n);
    }
    println!();
    for (ci, cell) in cells.iter().enumerate() {
        let rw = if cell.rw == Rw::RandRead {
            "randread"
        } else {
            "randwrite"
        };
        print!("{:<22}", format!("{rw} qd{} q{}", cell.qd, cell.queues));
        for row in &results {
            match &row[ci] {
                Some(f) => print!(
                    " | {:>8.0} {:>6.1}/{:<7.1} {:>6.2}s",
                    f.iops, f.p50_us, f.p99_us, f.cpu_per_100k
                ),
                None => print!(" | {:^32}", "-"),
            }
        }
        println!();
    }
    Ok(())
}
