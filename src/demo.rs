//! `drblk demo` (also `drblk` with no command): a self-contained tour on a built-in default.
//!
//! Creates a sparse image in a temporary directory, serves it, connects a real vhost-user
//! frontend (libblkio's virtio-blk driver) with two queues, runs a verified random-write
//! workload, and prints what happened.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::blkio_client::{BlkioClient, Op};
use crate::cli::{DemoArgs, ServeArgs};
use crate::serve::Server;

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
    let _ = std::fs::remove_file(&disk);
    println!(
        "drblk demo: serving a {} MiB sparse image {}",
        args.size >> 20,
        disk.display()
    );
    let serve = ServeArgs {
        disk: disk.clone(),
        socket: socket.clone(),
        size: Some(args.size),
        queues: 2,
        queue_size: 256,
        threads: None,
        readonly: false,
        direct: false,
        serial: Some("drblk-demo".into()),
        logical_block_size: 512,
        poll_us: 0,
        socket_mode: 0o600,
        cg: Default::default(),
        replication: Default::default(),
    };
    let server = Server::start(&serve)?;

    const BLOCK: usize = 4096;
    const DEPTH: usize = 16;
    let mut client = BlkioClient::connect(&socket, 2, BLOCK * DEPTH * 2, false)
        .context("connecting the demo frontend")?;
    println!(
        "frontend connected over vhost-user: capacity {} MiB, {} queues",
        client.capacity() >> 20,
        client.num_queues()
    );

    // Each write stamps its block with (block number, generation) so reads can verify it.
    let blocks = client.capacity() / BLOCK as u64;
    let mut generation = vec![0u32; blocks as usize];
    let mut rng = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let start = Instant::now();
    let (mut writes, mut reads) = (0u64, 0u64);
    while Instant::now() < deadline {
        for q in 0..2 {
            let mut inflight = Vec::new();
            for slot in 0..DEPTH {
                let blk = next() % blocks;
                if inflight.iter().any(|&(b, _)| b == blk) {
                    continue;
                }
                let gen = generation[blk as usize] + 1;
                let buf_off = (q * DEPTH + slot) * BLOCK;
                stamp(&mut client.buf()[buf_off..buf_off + BLOCK], blk, gen);
                client.submit(
                    q,
                    Op::Write {
                        offset: blk * BLOCK as u64,
                        buf: buf_off,
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
            // Read back one block of the batch and check it.
            let (blk, gen) = inflight[0];
            let buf_off = q * DEPTH * BLOCK;
            client.run(
                q,
                Op::Read {
                    offset: blk * BLOCK as u64,
                    buf: buf_off,
                    len: BLOCK,
                },
            )?;
            check(&client.buf()[buf_off..buf_off + BLOCK], blk, gen)?;
            reads += 1;
        }
    }
    client.run(0, Op::Flush)?;
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "workload: {writes} verified 4 KiB writes and {reads} read-backs in {elapsed:.1} s ({:.0} IOPS), flushed",
        (writes + reads) as f64 / elapsed
    );
    drop(client);

    // The host sees exactly what the guest wrote.
    let image = std::fs::read(&disk)?;
    let mut checked = 0;
    for (blk, &gen) in generation.iter().enumerate() {
        if gen > 0 {
            let off = blk * BLOCK;
            check(&image[off..off + BLOCK], blk as u64, gen)?;
            checked += 1;
        }
    }
    let stats = &server.shared().stats;
    println!(
        "image check: all {checked} written blocks hold their last write; {} requests served, {} rejected",
        stats.requests.load(std::sync::atomic::Ordering::Relaxed),
        stats.rejected.load(std::sync::atomic::Ordering::Relaxed),
    );
    server.stop()?;
    println!("demo finished: OK");
    Ok(())
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
