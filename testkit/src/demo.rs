//! The demo (`cargo run --release`): the whole product on one machine.
//!
//! Creates certificates, a secondary listening on loopback and a primary serving a sparse
//! image over vhost-user and replicating it to the secondary over QUIC. A real vhost-user
//! frontend (libblkio's virtio-blk driver, two queues) runs a verified random-write
//! workload while a status line shows the replication (group, RPO, throughput, freeze
//! time); a final drain is then checked: the secondary's image equals the primary's, and
//! every block holds the last write the guest made to it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use drblk::cli::{parse_size, ServeArgs};
use drblk::control::PrimaryStatus;
use drblk::site::primary::Server;
use drblk::site::secondary::{Secondary, SecondaryPaths};

use crate::blkio_client::{BlkioClient, Op};

/// Bytes the link has sent in UDP datagrams (extent frames, their headers and QUIC's).
fn wire_bytes(s: &PrimaryStatus) -> u64 {
    s.link.as_ref().map_or(0, |l| l.udp_bytes)
}

/// Bytes of extent frames (messages with their headers) written to the link.
fn frame_bytes(s: &PrimaryStatus) -> u64 {
    s.link.as_ref().map_or(0, |l| l.wire_bytes)
}

/// The demo's options.
#[derive(Debug, clap::Parser, Clone)]
#[command(
    name = "drblk-demo",
    version,
    about = "drblk on one machine: a primary replicating a disk to a secondary over QUIC on loopback, a verified write workload through a real vhost-user frontend, and a final consistency check."
)]
pub struct DemoArgs {
    /// Directory for the demo's image and socket (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Size of the demo disk.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,

    /// How long to run the workload.
    #[arg(long, default_value = "5", value_name = "SECONDS")]
    pub seconds: u64,

    /// Guest write rate of the workload (a busy VM; 0 = as fast as possible).
    #[arg(long, default_value_t = 5000)]
    pub iops: u64,
}

const BLOCK: usize = 4096;
const DEPTH: usize = 16;

/// Runs the demo.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("drblk-demo-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let disk = dir.join("primary.img");
    let socket = dir.join("primary.sock");
    let replica = dir.join("secondary.img");
    // A reused directory: the old images go, and with them what belonged to them.
    for f in [&disk, &replica] {
        let _ = std::fs::remove_file(f);
    }
    for f in [
        "primary.img.drblk-track",
        "primary.img.drblk-lineage",
        "primary.img.drblk-id",
        "secondary.img.drblk-lineage",
        "secondary.img.drblk-id",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir_all(dir.join("secondary.state"));
    println!(
        "drblk demo in {} (the daemons log warnings only; RUST_LOG=drblk=info shows their log)",
        dir.display()
    );

    // 1. Certificates for both sites, from a private CA.
    let certs = dir.join("certs");
    drblk::link::certs::generate(&certs, &["primary", "secondary"], true)?;
    println!(
        "  certificates: CA + primary + secondary in {}",
        certs.display()
    );

    // 2. The secondary site.
    let identity = drblk::link::SiteIdentity::load(&certs, "secondary")?;
    let secondary = Secondary::start(
        SecondaryPaths {
            images: vec![replica.clone()],
            state_dir: dir.join("secondary.state"),
            discard_local_changes: false,
            remove: Vec::new(),
        },
        identity,
        "127.0.0.1:0".parse()?,
        Some("primary".into()),
        None,
    )?;
    let sec_addr = secondary.local_addr()?;
    println!("  secondary: listening on {sec_addr} (QUIC, mutual TLS)");

    // 3. The primary: serves the disk and replicates it.
    let mut serve = ServeArgs::new(disk.clone(), socket.clone());
    serve.size = Some(args.size);
    serve.queues = 2;
    serve.serial = Some("drblk-demo".into());
    serve.replication.replicate_to = Some(sec_addr.to_string());
    serve.replication.certs = certs.clone();
    let server = Server::start(&serve)?;
    println!(
        "  primary: serving a {} MiB sparse image on {}, consistency group every {}",
        args.size >> 20,
        socket.display(),
        serve.cg.cg_interval
    );

    // 4. A vhost-user frontend, as a hypervisor would connect.
    let mut client = BlkioClient::connect(&socket, 2, BLOCK * DEPTH * 2, false)
        .context("connecting the demo frontend")?;
    println!(
        "  guest frontend: virtio-blk over vhost-user, capacity {} MiB, {} queues",
        client.capacity() >> 20,
        client.num_queues()
    );
    wait_for(&server, "the initial copy", Duration::from_secs(60), |s| {
        last_committed(s) > 0
    })?;
    println!("  initial copy done: {}", secondary.status().0);

    // 5. The workload, with a status line every second.
    let blocks = client.capacity() / BLOCK as u64;
    let mut generation = vec![0u32; blocks as usize];
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut next_status = start + Duration::from_secs(1);
    let at_start = server.status();
    let (wire_at_start, frames_at_start) = (wire_bytes(&at_start), frame_bytes(&at_start));
    let (mut writes, mut last_writes, mut last_bytes, mut last_t) = (0u64, 0u64, 0u64, start);
    let mut last_wire = wire_at_start;
    println!(
        "  workload: random 4 KiB writes at {} IOPS, {DEPTH} in flight per queue, every write stamped for checking",
        if args.iops > 0 { args.iops.to_string() } else { "full speed".into() }
    );
    while Instant::now() < deadline {
        for q in 0..2 {
            let mut inflight: Vec<(u64, u32)> = Vec::new();
            for slot in 0..DEPTH {
                let blk = next() % blocks;
                if inflight.iter().any(|&(b, _)| b == blk) {
                    continue;
                }
                let gen = generation[blk as usize] + 1;
                let off = (q * DEPTH + slot) * BLOCK;
                stamp(&mut client.buf()[off..off + BLOCK], blk, gen);
                client.submit(
                    q,
                    Op::Write {
                        offset: blk * BLOCK as u64,
                        buf: off,
                        len: BLOCK,
                    },
                    slot,
                );
                inflight.push((blk, gen));
            }
            for (_, ret) in client.wait(q, inflight.len())? {
                if ret != 0 {
                    bail!("write failed: errno {}", -ret);
                }
            }
            for &(blk, gen) in &inflight {
                generation[blk as usize] = gen;
            }
            writes += inflight.len() as u64;
        }
        if args.iops > 0 {
            // Hold the requested rate.
            let due = start + Duration::from_secs_f64(writes as f64 / args.iops as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        if Instant::now() >= next_status {
            let s = server.status();
            let rep = s.replication.unwrap_or_default();
            let bytes = rep.bytes_shipped;
            let wire = wire_bytes(&s);
            let dt = last_t.elapsed().as_secs_f64();
            // Wire bytes (frames, headers included) per byte the guest wrote meanwhile.
            let written = ((writes - last_writes) * BLOCK as u64) as f64;
            println!(
                "  [{:>4.1}s] guest {:>6.0} IOPS | CG {:>4} committed | RPO {:>6.1} ms | shipped {:>6.1} MB/s, wire x{:.2} of written | freeze p99 {:>5.1} µs | secondary: {}",
                start.elapsed().as_secs_f64(),
                (writes - last_writes) as f64 / dt,
                rep.last_committed_cg,
                rep.rpo_ms.unwrap_or(f64::NAN),
                (bytes - last_bytes) as f64 / dt / 1e6,
                (wire - last_wire) as f64 / written.max(1.0),
                s.cg.as_ref().map_or(f64::NAN, |c| c.freeze_us.p99),
                s.link.as_ref().map_or("?", |l| l.secondary.as_str()),
            );
            (last_writes, last_bytes, last_t) = (writes, bytes, Instant::now());
            last_wire = wire;
            next_status += Duration::from_secs(1);
        }
    }
    client.run(0, Op::Flush)?;
    println!(
        "  workload done: {writes} verified writes in {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // 6. Final drain: one last group, committed on the secondary.
    let target = server.status().cg.map_or(0, |c| c.formed) + 1;
    server.trigger_cycle();
    wait_for(&server, "the final group", Duration::from_secs(120), |s| {
        last_committed(s) >= target
    })?;
    let s = server.status();
    let wire = wire_bytes(&s) - wire_at_start;
    let frames = frame_bytes(&s) - frames_at_start;
    let rep = s.replication.unwrap_or_default();
    let written = writes * BLOCK as u64;
    println!(
        "  final drain: CG {} committed on the secondary; {} blocks in {} extents ({:.1} MiB) shipped in all; freeze max {:.1} µs; {} groups abandoned",
        rep.last_committed_cg,
        rep.chunks_shipped,
        rep.extents_shipped,
        rep.bytes_shipped as f64 / (1 << 20) as f64,
        s.cg.as_ref().map_or(f64::NAN, |c| c.freeze_us.max),
        s.cg.as_ref().map_or(0, |c| c.abandoned.total()),
    );
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "  the workload wrote {:.1} MiB; the link sent {:.1} MiB of UDP datagrams for it (x{:.2}: messages {:.1} MiB, x{:.2}, plus QUIC's headers and acknowledgements)",
        mib(written),
        mib(wire),
        wire as f64 / written.max(1) as f64,
        mib(frames),
        frames as f64 / written.max(1) as f64,
    );
    drop(client);

    // 7. The consistency check.
    let primary = std::fs::read(&disk)?;
    let copy = std::fs::read(&replica)?;
    if primary != copy {
        bail!("the secondary's image differs from the primary's after the final drain");
    }
    let mut checked = 0;
    for (blk, &gen) in generation.iter().enumerate() {
        if gen > 0 {
            let off = blk * BLOCK;
            check(&copy[off..off + BLOCK], blk as u64, gen)?;
            checked += 1;
        }
    }
    println!(
        "  consistency check: the secondary's image equals the primary's; all {checked} written blocks hold their last write ({})",
        secondary.status().0
    );
    server.stop()?;
    secondary.stop();
    println!("demo finished: OK");
    Ok(())
}

fn last_committed(s: &PrimaryStatus) -> u64 {
    s.replication.map_or(0, |r| r.last_committed_cg)
}

fn wait_for(
    server: &Server,
    what: &str,
    limit: Duration,
    f: impl Fn(&PrimaryStatus) -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    loop {
        let s = server.status();
        if f(&s) {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("timed out waiting for {what}; status: {s:?}");
        }
        server.trigger_cycle();
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stamp(buf: &mut [u8], blk: u64, gen: u32) {
    for (i, chunk) in buf.chunks_exact_mut(16).enumerate() {
        chunk[0..8].copy_from_slice(&blk.to_le_bytes());
        chunk[8..12].copy_from_slice(&gen.to_le_bytes());
        chunk[12..16].copy_from_slice(&(i as u32).to_le_bytes());
    }
}

fn check(buf: &[u8], blk: u64, gen: u32) -> anyhow::Result<()> {
    let mut want = vec![0u8; buf.len()];
    stamp(&mut want, blk, gen);
    if buf != want.as_slice() {
        bail!("block {blk} does not hold generation {gen}");
    }
    Ok(())
}
