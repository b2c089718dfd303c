//! Guest benchmark: the same fio jobs, in the same guest boot, against drblk and against
//! qemu-storage-daemon's vhost-user-blk export; printed side by side, nothing asserted.
//!
//!     cargo test --release --test guest_bench -- --ignored --nocapture
//!
//! One guest (TCG, 2 vCPUs) gets both disks (2 queues each); each job runs on one disk, then
//! the other (the order alternates between rounds). Both backends serve a 1 GiB raw image
//! through the host page cache (drblk default; qsd `cache.direct=off`, `aio=io_uring`); the
//! 256 MiB working set is written on the host before the boot, so reads hit allocated data.
//!
//! Environment:
//! - `DRBLK_BENCH_PIN=CPUS`: run both backends under `taskset -c CPUS` (e.g. `0`); default
//!   unpinned.
//! - `DRBLK_BENCH_RUNTIME=SECS` (default 8) per job and disk, after a 1 s ramp.
//! - `DRBLK_BENCH_ROUNDS=N` (default 2).
//! - `DRBLK_SKIP_VM=1`: return at once.
//!
//! Under TCG the guest's emulated CPUs are the bottleneck, so the numbers measure the
//! overhead each backend adds to a CPU-bound guest (and the host CPU it takes from QEMU),
//! not what the backends could do for a KVM guest.

#[path = "common/daemons.rs"]
mod daemons;
use drblk_testkit::vm;

use std::collections::BTreeMap;
use std::time::Duration;

use daemons::{create_image, pattern, skip_vm, write_at, Backend, FIND_DISK_SH};
use vm::{VhostUserBlkDisk, VmBuilder};

const MIB: u64 = 1 << 20;

const JOBS: [(&str, &str, &str); 3] = [
    (
        "randread",
        "4k randread QD16",
        "--rw=randread --bs=4k --iodepth=16",
    ),
    (
        "randwrite",
        "4k randwrite QD16",
        "--rw=randwrite --bs=4k --iodepth=16",
    ),
    (
        "seqwrite",
        "64k seq write QD16",
        "--rw=write --bs=64k --iodepth=16",
    ),
];
const BACKENDS: [&str; 2] = ["drblk", "qsd"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime+stime of a process, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

#[derive(Default, Clone)]
struct Sample {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// Backend CPU time / wall time during the job (1.0 = one core).
    cpu: f64,
}

#[test]
#[ignore = "benchmark: cargo test --release --test guest_bench -- --ignored --nocapture"]
fn guest_fio_drblk_vs_qemu_storage_daemon() {
    if skip_vm("guest_fio_drblk_vs_qemu_storage_daemon") {
        return;
    }
    let runtime = env_u64("DRBLK_BENCH_RUNTIME", 8);
    let rounds = env_u64("DRBLK_BENCH_ROUNDS", 2);
    let pin = std::env::var("DRBLK_BENCH_PIN")
        .ok()
        .filter(|s| !s.is_empty() && s != "none");
    let dir = tempfile::tempdir().unwrap();
    let size = 1024 * MIB;
    let fill = pattern(42, 256 * MIB as usize);
    let mut backends = Vec::new();
    for name in BACKENDS {
        let img = dir.path().join(format!("{name}.img"));
        create_image(&img, size);
        write_at(&img, 0, &fill);
        let sock = dir.path().join(format!("{name}.sock"));
        let b = match name {
            "drblk" => Backend::drblk(
                name,
                &img,
                &sock,
                &["--queues", "2", "--serial", "bench-drblk"],
                pin.as_deref(),
            ),
            _ => Backend::qsd(name, &img, &sock, 2, pin.as_deref()),
        };
        backends.push(b);
    }

    // The guest runs every (round, job, backend) as section "<job>.<backend>.<round>",
    // bracketed by DRBLK-VALUE begin/end lines so the host can sample the backends' CPU.
    let mut order = Vec::new();
    for r in 1..=rounds {
        for (job, _, _) in JOBS {
            let mut bs = BACKENDS.to_vec();
            if r % 2 == 0 {
                bs.reverse();
            }
            for b in bs {
                order.push(format!("{job}.{b}.{r}"));
            }
        }
    }
    let mut script = format!(
        r#"{FIND_DISK_SH}
drblk_wait_dev vda || exit 1
drblk_wait_dev vdb || exit 1
dev_drblk=$(find_disk bench-drblk) || exit 1
for d in $(drblk_disks); do [ "$d" != "$dev_drblk" ] && dev_qsd=$d; done
drblk_value disks drblk=$dev_drblk qsd=$dev_qsd
run() {{
    tag=$1; dev=$2; shift 2
    drblk_value begin $tag
    drblk_section $tag fio --name=$tag --filename=/dev/$dev --ioengine=libaio --direct=1 \
        --time_based --runtime={runtime} --ramp_time=1 --size=256M --norandommap \
        --randrepeat=0 --output-format=json "$@"
    drblk_value end $tag
}}
"#
    );
    for tag in &order {
        let mut it = tag.split('.');
        let (job, backend) = (it.next().unwrap(), it.next().unwrap());
        let args = JOBS.iter().find(|j| j.0 == job).unwrap().2;
        script.push_str(&format!("run {tag} $dev_{backend} {args}\n"));
    }
    script.push_str("exit 0\n");

    let budget = 60 + order.len() as u64 * (runtime + 6);
    let mut vm = VmBuilder::new()
        .disk_with(VhostUserBlkDisk::new(dir.path().join("drblk.sock")))
        .disk_with(VhostUserBlkDisk::new(dir.path().join("qsd.sock")))
        .job(script)
        .timeout(Duration::from_secs(budget))
        .spawn()
        .unwrap();
    let pids: BTreeMap<&str, u32> = BACKENDS
        .iter()
        .zip(&backends)
        .map(|(n, b)| (*n, b.pid().unwrap()))
        .collect();
    let mut cpu: BTreeMap<String, f64> = BTreeMap::new();
    for tag in &order {
        let backend = tag.split('.').nth(1).unwrap();
        let pid = pids[backend];
        if !vm.wait_for(
            &format!("DRBLK-VALUE begin {tag}\n"),
            Duration::from_secs(120),
        ) {
            break;
        }
        let (c0, t0) = (cpu_secs(pid).unwrap_or(0.0), std::time::Instant::now());
        if !vm.wait_for(
            &format!("DRBLK-VALUE end {tag}\n"),
            Duration::from_secs(runtime + 60),
        ) {
            break;
        }
        let c1 = cpu_secs(pid).unwrap_or(0.0);
        cpu.insert(tag.clone(), (c1 - c0) / t0.elapsed().as_secs_f64());
    }
    let out = vm.wait();
    assert!(
        out.success(),
        "benchmark guest failed\n{}\n{}{}",
        out.diagnostics(),
        backends[0].all_logs(),
        backends[1].all_logs()
    );

    let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
    for tag in &order {
        let fio = out.fio(tag);
        let j = &fio.jobs[0];
        assert_eq!(j.error, 0, "{tag}: fio error");
        let st = if tag.starts_with("randread") {
            &j.read
        } else {
            &j.write
        };
        samples.insert(
            tag.clone(),
            Sample {
                iops: st.iops,
                mib_s: st.bw_bytes as f64 / MIB as f64,
                p50_us: st.clat_percentile_ns(50.0).unwrap_or(0) as f64 / 1e3,
                p99_us: st.clat_percentile_ns(99.0).unwrap_or(0) as f64 / 1e3,
                cpu: cpu.get(tag).copied().unwrap_or(f64::NAN),
            },
        );
    }

    println!();
    println!(
        "guest fio, TCG 2 vCPUs, 2 queues per disk, {runtime} s per run (+1 s ramp), {rounds} round(s), backends {}",
        match &pin {
            Some(c) => format!("pinned to CPU {c}"),
            None => "unpinned".to_string(),
        }
    );
    println!(
        "(host: {} CPUs; guest disks: {})",
        num_cpus(),
        out.value("disks").unwrap_or("?")
    );
    println!(
        "{:<20} {:>5} | {:>8} {:>8} {:>7} {:>8} {:>5} | {:>8} {:>8} {:>7} {:>8} {:>5} | {:>6}",
        "job",
        "round",
        "drblk",
        "MiB/s",
        "p50 us",
        "p99 us",
        "CPU%",
        "qsd",
        "MiB/s",
        "p50 us",
        "p99 us",
        "CPU%",
        "ratio"
    );
    for (job, label, _) in JOBS {
        // (IOPS, MiB/s) sums for drblk, qsd
        let mut sums = [(0.0, 0.0), (0.0, 0.0)];
        for r in 1..=rounds {
            let d = samples[&format!("{job}.drblk.{r}")].clone();
            let q = samples[&format!("{job}.qsd.{r}")].clone();
            sums[0].0 += d.iops;
            sums[0].1 += d.mib_s;
            sums[1].0 += q.iops;
            sums[1].1 += q.mib_s;
            println!(
                "{:<20} {:>5} | {:>8.0} {:>8.1} {:>7.0} {:>8.0} {:>5.0} | {:>8.0} {:>8.1} {:>7.0} {:>8.0} {:>5.0} | {:>6.2}",
                label,
                r,
                d.iops,
                d.mib_s,
                d.p50_us,
                d.p99_us,
                d.cpu * 100.0,
                q.iops,
                q.mib_s,
                q.p50_us,
                q.p99_us,
                q.cpu * 100.0,
                d.iops / q.iops
            );
        }
        let n = rounds as f64;
        println!(
            "{:<20} {:>5} | {:>8.0} {:>8.1} {:>22} | {:>8.0} {:>8.1} {:>22} | {:>6.2}",
            label,
            "mean",
            sums[0].0 / n,
            sums[0].1 / n,
            "",
            sums[1].0 / n,
            sums[1].1 / n,
            "",
            sums[0].0 / sums[1].0
        );
    }
    println!("(IOPS columns are 'drblk' and 'qsd'; ratio = drblk IOPS / qsd IOPS; CPU% = backend process CPU time / wall time during the run)");
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}
