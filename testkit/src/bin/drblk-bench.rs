//! drblk-bench: the same libblkio workload against drblk and against qemu-storage-daemon's
//! vhost-user-blk export, on the same image, in one run; prints one table.
//!
//! Backends run pinned to CPU 0 and the client to CPU 1 (cross-CPU wakeups are what a real
//! VM pays, and pinning makes QD1 figures repeatable). Nothing is asserted: it prints figures.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;

use drblk_testkit::bench::{fill_image, pin_self, run_cell, Cell, Figures, Rw};

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
    /// Only these backends (comma separated: drblk,drblk-nopoll,drblk-poll,qsd-threads,qsd-io_uring).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// drblk binary (default: the one next to this benchmark).
    #[arg(long)]
    drblk: Option<PathBuf>,
}

struct Backend {
    child: Child,
    socket: PathBuf,
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        "drblk" | "drblk-nopoll" | "drblk-poll" => {
            cmd.arg(drblk)
                .args(["serve", "--queues", "2", "--log", "warn", "--disk"])
                .arg(image)
                .arg("--socket")
                .arg(&socket);
            match name {
                "drblk-poll" => cmd.args(["--poll-us", "200"]),
                "drblk-nopoll" => cmd.args(["--poll-us", "0"]),
                _ => &mut cmd,
            };
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
    Ok(Backend { child, socket })
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

    let mut names: Vec<&'static str> = vec![
        "drblk",
        "drblk-nopoll",
        "drblk-poll",
        "qsd-threads",
        "qsd-io_uring",
    ];
    if !args.only.is_empty() {
        names.retain(|n| args.only.iter().any(|o| o == n));
    }
    let cells: Vec<Cell> = [Rw::RandRead, Rw::RandWrite]
        .into_iter()
        .flat_map(|rw| {
            [1usize, 32].into_iter().flat_map(move |qd| {
                [1usize, 2]
                    .into_iter()
                    .map(move |queues| Cell::new(rw, qd, queues))
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
            let f = run_cell(
                &backend.socket,
                backend.child.id(),
                cell,
                args.seconds,
                size / 4096,
            );
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
