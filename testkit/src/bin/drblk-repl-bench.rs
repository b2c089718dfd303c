//! drblk-repl-bench: replication figures, in one run on loopback.
//!
//! 1. The QUIC loopback ceiling: this binary's link client sending 64 KiB chunks to a link
//!    server that discards them.
//! 2. Replication throughput: the initial full copy of an image filled with non-zero data,
//!    from `drblk serve --replicate-to` (in process) to a secondary with its journal.
//! 3. Guest IOPS and p99 with replication off and on (same workload, same image).
//! 4. RPO p50/p99 (age of the newest committed group, sampled every 10 ms) and freeze time
//!    under a sustained write load below the link rate.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;

use drblk::cli::ServeArgs;
use drblk::link::server::PeerInfo;
use drblk::link::{
    ChunkData, ClientConfig, DiskInfo, Hello, HelloAck, LinkClient, LinkServer, RejectReason,
    ReplicaSink, ReplicaState, ServerConfig, SiteIdentity, PROTOCOL_VERSION,
};
use drblk::site::primary::Server;
use drblk::site::secondary::{Secondary, SecondaryPaths};
use drblk_testkit::bench::{fill_image, pin_self, run_cell, Cell, Figures, Rw};

/// Replication benchmark.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Image size in MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Guest write rate for the RPO measurement (4 KiB random writes per second).
    #[arg(long, default_value_t = 2000.0)]
    rpo_iops: f64,
}

/// A sink that accepts everything and keeps nothing: measures the link alone.
struct NullSink;

impl ReplicaSink for NullSink {
    fn hello(&self, _hello: &Hello, _peer: &PeerInfo) -> Result<HelloAck, RejectReason> {
        Ok(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            last_committed_cg: None,
            state: ReplicaState::Syncing {
                done_chunks: 0,
                total_chunks: 0,
            },
            site: "secondary".into(),
        })
    }
    fn extent(&self, _cg: u64, _first: u64, _n: u64, _data: ChunkData<'_>) -> anyhow::Result<()> {
        Ok(())
    }
    fn commit(&self, _cg: u64, _frozen: u64, _count: u64) -> anyhow::Result<()> {
        Ok(())
    }
    fn status(&self) -> (ReplicaState, Option<u64>) {
        (
            ReplicaState::Syncing {
                done_chunks: 0,
                total_chunks: 0,
            },
            None,
        )
    }
}

fn link_ceiling(certs: &Path, secs: u64) -> anyhow::Result<f64> {
    let server = LinkServer::start(
        ServerConfig::new(
            SiteIdentity::load(certs, "secondary")?,
            "127.0.0.1:0".parse()?,
        ),
        NullSink,
    )?;
    let addr: SocketAddr = server.local_addr()?;
    let disk = DiskInfo {
        uuid: [7; 16],
        size: 1 << 40,
        chunk_size: 64 << 10,
    };
    let client = LinkClient::connect(ClientConfig::new(
        SiteIdentity::load(certs, "primary")?,
        addr,
        "secondary",
        disk,
    ))?;
    let mut data = vec![0u8; 64 << 10];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8 + 1;
    }
    let t = Instant::now();
    let mut sent = 0u64;
    let mut cg = 1;
    while t.elapsed() < Duration::from_secs(secs) {
        // Large groups, as the initial copy sends them: one acknowledgement per 4096 chunks.
        for _ in 0..4096 {
            client.send_chunk(cg, sent % (1 << 20), &data)?;
            sent += 1;
        }
        client.commit(cg, 0)?;
        cg += 1;
    }
    Ok(sent as f64 * data.len() as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn serve_args(dir: &Path, image: &Path, target: Option<SocketAddr>, certs: &Path) -> ServeArgs {
    let mut a = ServeArgs::new(image.to_owned(), server_socket(dir));
    a.queues = 2;
    a.replication.replicate_to = target.map(|t| t.to_string());
    a.replication.certs = certs.to_owned();
    a
}

fn last_committed(server: &Server) -> u64 {
    server
        .status()
        .replication
        .map_or(0, |r| r.last_committed_cg)
}

fn run_client(socket: &Path, cell: Cell, secs: u64, blocks: u64) -> anyhow::Result<Figures> {
    let sock = socket.to_owned();
    std::thread::spawn(move || {
        pin_self(1);
        run_cell(&sock, std::process::id(), &cell, secs, blocks)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("client panicked"))?
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("drblk-repl-bench-")
        .tempdir()?;
    let dir = tmp.path();
    let certs = dir.join("certs");
    drblk::link::certs::generate(&certs, &["primary", "secondary"], true)?;
    let size = args.size_mib << 20;
    let blocks = size / 4096;
    let image = dir.join("primary.img");
    eprintln!(
        "filling a {} MiB image with 4 KiB writes ...",
        args.size_mib
    );
    fill_image(&image, size)?;

    eprintln!("measuring the QUIC loopback ceiling ...");
    let ceiling = link_ceiling(&certs, args.seconds)?;

    // Replication off.
    pin_self(0);
    let write = Cell::new(Rw::RandWrite, 16, 2);
    let off = {
        let server = Server::start(&serve_args(dir, &image, None, &certs))?;
        let f = run_client(&server_socket(dir), write, args.seconds, blocks)?;
        server.stop()?;
        f
    };

    // Replication on: initial copy first, then the same workload.
    let secondary = Secondary::start(
        SecondaryPaths {
            image: dir.join("secondary.img"),
            state_dir: dir.join("secondary.state"),
        },
        SiteIdentity::load(&certs, "secondary")?,
        "127.0.0.1:0".parse()?,
        None,
        None,
    )?;
    pin_self(0);
    let server = Server::start(&serve_args(
        dir,
        &image,
        Some(secondary.local_addr()?),
        &certs,
    ))?;
    let t = Instant::now();
    while last_committed(&server) == 0 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(300),
            "initial copy did not finish"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync_secs = t.elapsed().as_secs_f64();
    let sync_mbs = size as f64 / sync_secs / 1e6;
    let on = run_client(&server_socket(dir), write, args.seconds, blocks)?;

    // Let replication catch up with the full-speed run before measuring the RPO.
    let settle = Instant::now();
    let target = server.status().cg.map_or(0, |c| c.formed) + 2;
    while last_committed(&server) < target && settle.elapsed() < Duration::from_secs(60) {
        server.trigger_cycle();
        std::thread::sleep(Duration::from_millis(10));
    }

    // RPO under a sustained load below the link rate.
    let mut rpo = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let cell = Cell {
        rate: Some(args.rpo_iops),
        ..Cell::new(Rw::RandWrite, 16, 2)
    };
    let sock = server_socket(dir);
    let client = std::thread::spawn(move || {
        pin_self(1);
        run_cell(&sock, std::process::id(), &cell, args.seconds * 2, blocks)
    });
    let until = Instant::now() + Duration::from_secs(args.seconds * 2) + Duration::from_millis(300);
    std::thread::sleep(Duration::from_millis(500));
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(ms) = server.status().replication.and_then(|r| r.rpo_ms) {
            rpo.record((ms * 1000.0).max(1.0) as u64)?;
        }
    }
    let rated = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    let st = server.status();
    server.stop()?;
    secondary.stop();
    let cg = st
        .cg
        .ok_or_else(|| anyhow::anyhow!("no consistency groups in the status"))?;

    println!();
    println!(
        "replication over QUIC on loopback (TLS 1.3, 4 data streams), {} s per measurement",
        args.seconds
    );
    println!("  QUIC loopback ceiling (this binary, 64 KiB chunks, discarding sink): {ceiling:>8.1} MB/s");
    println!(
        "  initial copy of {} MiB (journaled secondary):                      {sync_mbs:>8.1} MB/s ({:.0} % of the ceiling, {sync_secs:.1} s)",
        args.size_mib,
        sync_mbs / ceiling * 100.0
    );
    println!("  guest 4k randwrite QD16 on 2 queues:");
    println!(
        "      replication off: {:>8.0} IOPS, p50 {:>7.1} µs, p99 {:>8.1} µs",
        off.iops, off.p50_us, off.p99_us
    );
    println!(
        "      replication on:  {:>8.0} IOPS, p50 {:>7.1} µs, p99 {:>8.1} µs  ({:+.1} % IOPS)",
        on.iops,
        on.p50_us,
        on.p99_us,
        (on.iops / off.iops - 1.0) * 100.0
    );
    println!(
        "  sustained {:.0} IOPS of 4k random writes ({:.0} IOPS reached): RPO p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        args.rpo_iops,
        rated.iops,
        rpo.value_at_quantile(0.5) as f64 / 1000.0,
        rpo.value_at_quantile(0.99) as f64 / 1000.0,
        rpo.max() as f64 / 1000.0
    );
    println!(
        "  freeze (coordination) time over the run: p50 {} µs, p99 {} µs, max {} µs; groups formed {}, committed {}, abandoned {}",
        cg.freeze_us.p50,
        cg.freeze_us.p99,
        cg.freeze_us.max,
        cg.formed,
        cg.committed,
        cg.abandoned.total()
    );
    Ok(())
}

fn server_socket(dir: &Path) -> std::path::PathBuf {
    dir.join("bench.sock")
}
