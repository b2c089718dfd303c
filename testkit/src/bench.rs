//! Shared benchmark machinery: a libblkio workload with latency histograms and backend CPU
//! accounting, used by `drblk-bench` (drblk versus qemu-storage-daemon) and `drblk-cg-bench`
//! (consistency groups on versus off).

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use blkio::Completion;
use hdrhistogram::Histogram;

use crate::blkio_client::{BlkioClient, Op};

/// Read or write.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rw {
    /// 4 KiB random reads.
    RandRead,
    /// 4 KiB random writes.
    RandWrite,
    /// 64 KiB sequential writes (wrapping at the end of the disk).
    SeqWrite64k,
}

impl Rw {
    /// Bytes per request.
    pub fn block_size(self) -> usize {
        match self {
            Rw::RandRead | Rw::RandWrite => 4096,
            Rw::SeqWrite64k => 64 << 10,
        }
    }
}

/// One workload.
#[derive(Clone, Copy, Debug)]
pub struct Cell {
    /// Read or write.
    pub rw: Rw,
    /// Requests in flight (spread over the queues).
    pub qd: usize,
    /// Queues used.
    pub queues: usize,
    /// Hold this many requests per second (None: as fast as possible).
    pub rate: Option<f64>,
    /// Seed of the random block choices (two clients with different seeds write
    /// different blocks).
    pub seed: u64,
    /// Wait for completions asleep, as a guest's vCPU halts, instead of polling for them
    /// (one queue only): for a client that shares its CPU with what it measures, where
    /// polling would take every cycle the measured threads leave.
    pub sleeps: bool,
}

impl Cell {
    /// An unthrottled cell.
    pub fn new(rw: Rw, qd: usize, queues: usize) -> Cell {
        Cell {
            rw,
            qd,
            queues,
            rate: None,
            seed: 0x2545f4914f6cdd1d,
            sleeps: false,
        }
    }
}

/// What a cell measured.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    /// Completed requests per second.
    pub iops: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Backend CPU-seconds per 100k requests.
    pub cpu_per_100k: f64,
    /// CPU used by the backend's queue workers (`vring_worker` threads), in CPUs (1.0 = one
    /// CPU busy the whole time). With replication on, shipping competes with them for CPU.
    pub io_cpus: f64,
    /// Bytes written by every completed write of the run (warm-up and tail included).
    pub bytes_written: u64,
    /// CPU-seconds used by the client's own thread over the whole run.
    pub client_cpu_s: f64,
}

impl Figures {
    /// Requests per CPU-second of the queue workers: the cost of the I/O path itself,
    /// whatever CPU other work (shipping a consistency group) takes from it.
    pub fn iops_per_io_cpu(&self) -> f64 {
        if self.io_cpus > 0.0 {
            self.iops / self.io_cpus
        } else {
            0.0
        }
    }
}

/// A `/proc/.../stat` line split into the command name and the fields after it (field 3 on).
fn parse_stat(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    Some((
        &stat[open + 1..close],
        stat[close + 1..].split_whitespace().collect(),
    ))
}

/// utime + stime (fields 14 and 15 of a stat line), in seconds.
fn stat_cpu_seconds(fields: &[&str]) -> f64 {
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no memory-safety preconditions.
    (ticks(11) + ticks(12)) / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU seconds (user + system) used so far by the threads of process `pid` named `name`.
pub fn thread_cpu_seconds(pid: u32, name: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        .filter_map(|stat| {
            let (comm, fields) = parse_stat(&stat)?;
            (comm == name).then(|| stat_cpu_seconds(&fields))
        })
        .sum()
}

/// Name of the backend's queue worker threads (vhost-user-backend names them).
const IO_THREAD: &str = "vring_worker";

/// CPU seconds (user + system) used so far by process `pid` (all its threads).
pub fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| parse_stat(&stat).map(|(_, f)| stat_cpu_seconds(&f)))
        .unwrap_or(0.0)
}

/// Pins the calling thread to `cpu` (best effort: a figure measured unpinned is still a
/// figure).
pub fn pin_self(cpu: usize) {
    if let Ok(list) = drblk::sys::cpus::CpuList::parse(&cpu.to_string()) {
        let _ = list.pin_current_thread();
    }
}

/// Runs `cell` against the backend at `socket` (process `pid`, for CPU accounting) for
/// `secs` seconds after a 300 ms warm-up.
pub fn run_cell(
    socket: &Path,
    pid: u32,
    cell: &Cell,
    secs: u64,
    blocks: u64,
) -> anyhow::Result<Figures> {
    let bs = cell.rw.block_size();
    let client_cpu0 = this_thread_cpu_seconds();
    let mut c = BlkioClient::connect(socket, cell.queues, bs * cell.qd, false)?;
    // Non-zero data: an all-zero write would travel as a zero marker when replicated.
    for (i, b) in c.buf().iter_mut().enumerate() {
        *b = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes()[7] | 1;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let mut comps: Vec<MaybeUninit<Completion>> = (0..64).map(|_| MaybeUninit::uninit()).collect();
    let mut started = vec![Instant::now(); cell.qd];
    let t_start = Instant::now();
    let mut submitted = cell.qd as u64;
    let mut rng = cell.seed | 1;
    // `blocks` counts 4 KiB blocks; requests of `bs` bytes stay aligned to their size.
    let slots = (blocks * 4096 / bs as u64).max(1);
    let mut seq = 0u64;
    let rw = cell.rw;
    let mut next_block = move || match rw {
        Rw::SeqWrite64k => {
            seq += 1;
            (seq - 1) % slots
        }
        _ => {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % slots
        }
    };
    let op = |slot: usize, blk: u64| match cell.rw {
        Rw::RandRead => Op::Read {
            offset: blk * bs as u64,
            buf: slot * bs,
            len: bs,
        },
        Rw::RandWrite | Rw::SeqWrite64k => Op::Write {
            offset: blk * bs as u64,
            buf: slot * bs,
            len: bs,
        },
    };
    let mut completed = 0u64;
    // Slot s belongs to queue s % queues.
    let warmup = Instant::now() + Duration::from_millis(300);
    let mut measuring = false;
    let (mut done, mut cpu0, mut io0, mut t0) = (0u64, 0.0, 0.0, Instant::now());
    for (slot, t) in started.iter_mut().enumerate() {
        *t = Instant::now();
        c.submit(slot % cell.queues, op(slot, next_block()), slot);
    }
    let end_at = warmup + Duration::from_secs(secs);
    loop {
        let now = Instant::now();
        if !measuring && now >= warmup {
            measuring = true;
            cpu0 = cpu_seconds(pid);
            io0 = thread_cpu_seconds(pid, IO_THREAD);
            t0 = now;
        }
        if now >= end_at {
            break;
        }
        for q in 0..cell.queues {
            let n = if cell.sleeps && cell.queues == 1 {
                // Short enough to notice the end of the measurement in time.
                c.poll_sleeping(q, &mut comps, Duration::from_millis(20))?
            } else {
                c.poll(q, &mut comps, 0)?
            };
            for comp in &comps[..n] {
                // SAFETY: do_io initialised the first n entries.
                let comp = unsafe { comp.assume_init_ref() };
                if comp.ret != 0 {
                    bail!("request failed: errno {}", -comp.ret);
                }
                let slot = comp.user_data;
                completed += 1;
                let t = Instant::now();
                if measuring {
                    hist.record((t - started[slot]).as_nanos() as u64)?;
                    done += 1;
                }
                if let Some(rate) = cell.rate {
                    // Throttle: the next request is due at submitted / rate.
                    submitted += 1;
                    let due = t_start + Duration::from_secs_f64(submitted as f64 / rate);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                started[slot] = Instant::now();
                c.submit(q, op(slot, next_block()), slot);
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    let io_cpu = thread_cpu_seconds(pid, IO_THREAD) - io0;
    // Drain what is still in flight before disconnecting.
    let mut left = cell.qd;
    let deadline = Instant::now() + Duration::from_secs(5);
    while left > 0 && Instant::now() < deadline {
        for q in 0..cell.queues {
            let n = c.poll(q, &mut comps, 0)?;
            completed += n as u64;
            left -= left.min(n);
        }
    }
    let iops = done as f64 / elapsed;
    let bytes_written = match cell.rw {
        Rw::RandRead => 0,
        _ => completed * bs as u64,
    };
    Ok(Figures {
        iops,
        p50_us: hist.value_at_quantile(0.5) as f64 / 1000.0,
        p99_us: hist.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_per_100k: if done > 0 {
            cpu / (done as f64 / 100_000.0)
        } else {
            0.0
        },
        io_cpus: io_cpu / elapsed,
        bytes_written,
        client_cpu_s: this_thread_cpu_seconds() - client_cpu0,
    })
}

/// CPU-seconds used by the calling thread.
pub fn this_thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Write back every dirty page of the machine (`sync(2)`) before a measurement: otherwise
/// the kernel writes back what the previous measurement dirtied (up to the whole image, 30 s
/// later) in the middle of this one, and every fsync of the secondary waits behind it.
pub fn settle_dirty_pages() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Creates `path` with `size` bytes written 4 KiB at a time.
pub fn fill_image(path: &Path, size: u64) -> anyhow::Result<()> {
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
