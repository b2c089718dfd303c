//! drblk-repl-bench: replication figures, in one run on loopback.
//!
//! 1. The QUIC loopback ceiling: this binary's link client sending 1 MiB extents to a link
//!    server that discards them, on the CPUs the initial copy runs on.
//! 2. The initial full copy of an image filled with non-zero data, from `drblk serve
//!    --replicate-to` (in process) to a `drblk secondary` child process with its journal.
//! 3. For each tracking granularity compared (`--chunk-sizes`, default 64K = the old
//!    tracking, and 4K = block-granular) and each workload (random 4 KiB writes at 5,000
//!    and 20,000 IOPS and unthrottled; 64 KiB sequential writes unthrottled): guest IOPS
//!    and p99 with replication on (and off, same workload and image), bytes on the wire ÷
//!    bytes the guest wrote (headers included, compression off), RPO p50/p99 (age of the
//!    newest committed group, sampled every 10 ms), and CPU-seconds per GB on the wire for
//!    the primary (this process minus the client's thread) and the secondary (its process).
//!
//! Threads (`--placement`): the client is always pinned to CPU 1. By default the primary's
//! threads (queue workers, drain, link) run on CPU 0 and the secondary process on CPU 1;
//! `ship-apart` gives shipping a CPU of its own instead, `spread` lets them float.
//! Every measurement starts after `sync(2)`, so none pays for the write-back of the one before.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;

use drblk::cli::{parse_size, ServeArgs};
use drblk::link::server::PeerInfo;
use drblk::link::{
    ChunkData, ClientConfig, DiskAck, DiskInfo, DiskState, Hello, HelloAck, LinkClient, LinkServer,
    RejectReason, ReplicaSink, ReplicaState, ServerConfig, SiteIdentity, PROTOCOL_VERSION,
};
use drblk::site::primary::Server;
use drblk::sys::cpus::CpuList;
use drblk_testkit::bench::{
    cpu_seconds, fill_image, pin_self, run_cell, settle_dirty_pages, Cell, Figures, Rw,
};

/// Replication benchmark.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Image size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Tracking granularities to compare (comma-separated).
    #[arg(long, default_value = "64K,4K", value_delimiter = ',', value_parser = parse_size)]
    chunk_sizes: Vec<u64>,
    /// The `drblk` binary run as the secondary (default: next to this binary).
    #[arg(long)]
    drblk: Option<PathBuf>,
    /// Where the threads run (the client always on CPU 1).
    #[arg(long, value_enum, default_value_t = Placement::Shared)]
    placement: Placement,
    /// Only the write-path cost of the persisted change record (record on versus off).
    #[arg(long)]
    track_only: bool,
    /// Only the cost of a DR drill on the secondary: RPO and apply throughput without a
    /// drill and with one busy writing (random 4 KiB writes on the drill's device).
    #[arg(long)]
    drill_only: bool,
    /// `--drill-only`: the drill client's writes per second (0: as fast as it can).
    #[arg(long, default_value_t = 2000.0)]
    drill_rate: f64,
    /// Put the primary's image (and its change record) in this directory instead of next to
    /// the secondary's files: e.g. `/dev/shm`, to model two sites that do not share one
    /// disk (on one disk, each site's fsyncs wait behind the other's writes).
    #[arg(long)]
    primary_dir: Option<PathBuf>,
    /// Only the workloads whose name contains one of these (comma-separated, e.g.
    /// `20000,QD16`); default: all.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
}

/// Where the benchmark's threads run on a machine of two CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Placement {
    /// The primary's queue workers, drain and link threads on CPU 0; the secondary process
    /// on CPU 1 with the client.
    Shared,
    /// Shipping apart from the guest's I/O: the primary's queue workers on CPU 1 with the
    /// client; its shipping threads (`--ship-cpus 0`) on CPU 0 with the secondary process.
    ShipApart,
    /// Only the client is pinned.
    Spread,
}

/// The CPU each part runs on (`None`: unpinned).
struct Cpus {
    /// The primary's queue workers (they inherit the main thread's affinity).
    workers: Option<usize>,
    /// The primary's shipping threads, and the benchmark's RPO sampler with them.
    ship: Option<usize>,
    /// The secondary process.
    secondary: Option<usize>,
}

impl Placement {
    fn cpus(self) -> Cpus {
        let (workers, ship, secondary) = match self {
            Placement::Shared => (Some(0), Some(0), Some(1)),
            Placement::ShipApart => (Some(1), Some(0), Some(0)),
            Placement::Spread => (None, None, None),
        };
        Cpus {
            workers,
            ship,
            secondary,
        }
    }

    /// `--ship-cpus` of the primary: set where shipping runs apart from the queue workers.
    fn ship_cpus(self) -> Option<CpuList> {
        let c = self.cpus();
        c.ship
            .filter(|_| c.ship != c.workers)
            .and_then(|cpu| CpuList::parse(&cpu.to_string()).ok())
    }

    /// The table's line saying where the threads ran.
    fn describe(self) -> &'static str {
        match self {
            Placement::Shared => "primary (queue workers, drain, link) on CPU 0; the secondary process on CPU 1 with the client",
            Placement::ShipApart => "primary's queue workers on CPU 1 with the client; its shipping threads (formation, drain, link: --ship-cpus 0) on CPU 0 with the secondary process",
            Placement::Spread => "primary and secondary unpinned",
        }
    }
}

/// A sink that accepts everything and keeps nothing: measures the link alone.
struct NullSink;

impl ReplicaSink for NullSink {
    fn hello(&self, _hello: &Hello, _peer: &PeerInfo) -> Result<HelloAck, RejectReason> {
        Ok(HelloAck {
            disks: vec![DiskAck {
                state: DiskState::Member,
                resync_also: Vec::new(),
                compare_first: false,
            }],
            protocol_version: PROTOCOL_VERSION,
            last_committed_cg: None,
            state: ReplicaState::Syncing {
                done_chunks: 0,
                total_chunks: 0,
            },
            site: "secondary".into(),
        })
    }
    fn extent(
        &self,
        _disk: u16,
        _cg: u64,
        _first: u64,
        _n: u64,
        _data: ChunkData<'_>,
    ) -> anyhow::Result<()> {
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

/// The link alone, its client and server on the CPUs of the primary's shipping threads and
/// of the secondary (as the initial copy runs): a runtime's threads inherit the CPU of the
/// thread that builds it.
fn link_ceiling(certs: &Path, secs: u64, placement: Placement) -> anyhow::Result<f64> {
    let all = CpuList::allowed()?;
    if let Some(cpu) = placement.cpus().secondary {
        pin_self(cpu);
    }
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
        chunk_size: 4096,
    };
    if let Some(cpu) = placement.cpus().ship {
        pin_self(cpu);
    }
    let client = LinkClient::connect(ClientConfig::new(
        SiteIdentity::load(certs, "primary")?,
        addr,
        "secondary",
        disk,
    ))?;
    let mut data = vec![0u8; 1 << 20];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8 + 1;
    }
    let t = Instant::now();
    let mut sent = 0u64;
    let mut cg = 1;
    while t.elapsed() < Duration::from_secs(secs) {
        // Large groups, as the initial copy sends them: one acknowledgement per 256 extents.
        for _ in 0..256 {
            client.send_extent(0, cg, (sent % (1 << 18)) * 256, 256, &data)?;
            sent += 1;
        }
        client.commit(cg, 0)?;
        cg += 1;
    }
    all.pin_current_thread()?;
    Ok(sent as f64 * data.len() as f64 / t.elapsed().as_secs_f64() / 1e6)
}

fn serve_args(
    args: &Args,
    dir: &Path,
    image: &Path,
    target: Option<SocketAddr>,
    certs: &Path,
) -> ServeArgs {
    let mut a = ServeArgs::new(image.to_owned(), server_socket(dir));
    a.queues = 2;
    a.cg.ship_cpus = args.placement.ship_cpus();
    a.replication.replicate_to = target.map(|t| t.to_string());
    a.replication.certs = certs.to_owned();
    a
}

fn server_socket(dir: &Path) -> PathBuf {
    dir.join("bench.sock")
}

fn last_committed(server: &Server) -> u64 {
    server
        .status()
        .replication
        .map_or(0, |r| r.last_committed_cg)
}

/// (UDP datagram bytes, extent frame bytes) sent so far.
fn wire_bytes(server: &Server) -> (u64, u64) {
    server
        .status()
        .link
        .map_or((0, 0), |l| (l.udp_bytes, l.wire_bytes))
}

/// How long an initial copy took.
struct CopyTimes {
    /// From the server's start until the secondary committed the copy.
    total_s: f64,
    /// Bytes shipped between the first and the last byte (connection and final commit
    /// left out), and the seconds between them (sampled every 5 ms).
    shipped: u64,
    shipping_s: f64,
}

/// Waits until the initial copy has committed (forming groups on demand with `trigger`,
/// for a server whose interval is long).
fn wait_initial_copy(server: &Server, trigger: bool) -> anyhow::Result<CopyTimes> {
    let t = Instant::now();
    let (mut first, mut last, mut shipped) = (None, Duration::ZERO, 0);
    while last_committed(server) == 0 {
        let b = server.status().replication.map_or(0, |r| r.bytes_shipped);
        if b > shipped {
            first.get_or_insert((t.elapsed(), b));
            (last, shipped) = (t.elapsed(), b);
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "initial copy did not finish"
        );
        if trigger {
            server.trigger_cycle();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let (at, from) = first.unwrap_or((last, shipped));
    Ok(CopyTimes {
        total_s: t.elapsed().as_secs_f64(),
        shipped: shipped - from,
        shipping_s: (last - at).as_secs_f64(),
    })
}

/// Forms groups until one formed after now has committed (the secondary caught up).
fn catch_up(server: &Server) -> anyhow::Result<()> {
    let target = server.status().cg.map_or(0, |c| c.formed) + 2;
    let t = Instant::now();
    while last_committed(server) < target {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "replication did not catch up"
        );
        server.trigger_cycle();
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A `drblk secondary` child process.
struct SecondaryProcess {
    child: Child,
    addr: SocketAddr,
}

impl SecondaryProcess {
    fn start(drblk: &Path, dir: &Path, certs: &Path, cpu: Option<usize>) -> anyhow::Result<Self> {
        let addr = UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
        let mut cmd = if let Some(cpu) = cpu {
            let mut c = Command::new("taskset");
            c.args(["-c", &cpu.to_string()]).arg(drblk);
            c
        } else {
            Command::new(drblk)
        };
        let child = cmd
            .arg("secondary")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--disk")
            .arg(dir.join("replica.img"))
            .arg("--certs")
            .arg(certs)
            // Room for a drill that writes the whole time (`--drill-only`).
            .args(["--drill-space", "4G"])
            .args(
                std::env::var("DRBLK_BENCH_DRILL_DIR")
                    .map(|d| vec!["--drill-dir".to_owned(), d])
                    .unwrap_or_default(),
            )
            .env(
                "RUST_LOG",
                std::env::var("DRBLK_BENCH_SECONDARY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut secondary = SecondaryProcess { child, addr };
        secondary.wait_listening()?;
        Ok(secondary)
    }

    /// Waits until the secondary has bound its UDP port: a primary that sends its first
    /// QUIC packet earlier waits for QUIC's first retransmission (about a second), which
    /// the initial copy's time would include.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let port = format!(":{:04X} ", self.addr.port());
        let t = Instant::now();
        loop {
            let table = std::fs::read_to_string("/proc/net/udp")?;
            // Lines: `sl local_address rem_address ...`, addresses as HEXIP:HEXPORT.
            if table.lines().skip(1).any(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|a| format!("{a} ").ends_with(&port))
            }) {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                anyhow::bail!("the secondary exited before listening: {st}");
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(60),
                "the secondary did not listen on {} within 60 s",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn cpu_seconds(&self) -> f64 {
        // With `taskset -c 0 drblk`, taskset execs drblk: same pid.
        cpu_seconds(self.child.id())
    }
}

impl Drop for SecondaryProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One workload of the table.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    cell: Cell,
}

/// The table's workloads, or those of them `filter` names (see `--workloads`).
fn workloads(filter: &[String]) -> Vec<Workload> {
    let mut all = every_workload();
    if !filter.is_empty() {
        all.retain(|w| filter.iter().any(|f| w.name.contains(f.as_str())));
    }
    all
}

fn every_workload() -> Vec<Workload> {
    let rand = Cell::new(Rw::RandWrite, 16, 2);
    vec![
        Workload {
            name: "4k randwrite @5000/s",
            cell: Cell {
                rate: Some(5000.0),
                ..rand
            },
        },
        Workload {
            name: "4k randwrite @20000/s",
            cell: Cell {
                rate: Some(20000.0),
                ..rand
            },
        },
        Workload {
            name: "4k randwrite QD16",
            cell: rand,
        },
        Workload {
            name: "64k seqwrite QD8",
            cell: Cell::new(Rw::SeqWrite64k, 8, 2),
        },
    ]
}

/// What one workload gave with replication on.
struct On {
    fig: Figures,
    amplification: f64,
    frame_amplification: f64,
    rpo_p50_ms: f64,
    rpo_p99_ms: f64,
    primary_s_per_gb: f64,
    secondary_s_per_gb: f64,
    extents: u64,
    chunks: u64,
    /// Bytes on the wire per second from the client's start until the secondary had
    /// committed everything (what the secondary applied, catch-up included).
    applied_mb_s: f64,
}

fn run_client(socket: &Path, cell: Cell, secs: u64, blocks: u64) -> anyhow::Result<Figures> {
    settle_dirty_pages();
    let sock = socket.to_owned();
    std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            pin_self(1);
            run_cell(&sock, std::process::id(), &cell, secs, blocks)
        })?
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))?
}

/// Runs `w` against a replicating primary; samples the RPO meanwhile; waits for the
/// secondary to catch up before reading the wire and CPU figures.
fn measure_on(
    placement: Placement,
    server: &Server,
    secondary: &SecondaryProcess,
    socket: &Path,
    w: Workload,
    secs: u64,
    blocks: u64,
) -> anyhow::Result<On> {
    catch_up(server)?;
    settle_dirty_pages();
    let me = std::process::id();
    let (wire0, cpu0, sec0) = (wire_bytes(server), cpu_seconds(me), secondary.cpu_seconds());
    let rep0 = server.status().replication.unwrap_or_default();
    let started = Instant::now();
    let sock = socket.to_owned();
    let cell = w.cell;
    let client = std::thread::Builder::new()
        .name("bench-client".into())
        .spawn(move || {
            pin_self(1);
            run_cell(&sock, std::process::id(), &cell, secs, blocks)
        })?;
    let mut rpo = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    // The primary's threads are running: the sampler may move (and moves back below, as a
    // server started later inherits this thread's CPU).
    if let Some(cpu) = placement.cpus().ship {
        pin_self(cpu);
    }
    // Sample once the client runs (its warm-up is 300 ms).
    std::thread::sleep(Duration::from_millis(300));
    while !client.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
        if let Some(ms) = server.status().replication.and_then(|r| r.rpo_ms) {
            rpo.record((ms * 1000.0).max(1.0) as u64)?;
        }
    }
    let fig = client
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    if let Some(cpu) = placement.cpus().workers {
        pin_self(cpu);
    }
    catch_up(server)?;
    let applied_secs = started.elapsed().as_secs_f64();
    let (udp1, frames1) = wire_bytes(server);
    let wire = (udp1 - wire0.0) as f64;
    let frames = (frames1 - wire0.1) as f64;
    let gb = wire / 1e9;
    let primary = cpu_seconds(me) - cpu0 - fig.client_cpu_s;
    let rep = server.status().replication.unwrap_or_default();
    Ok(On {
        amplification: wire / fig.bytes_written.max(1) as f64,
        frame_amplification: frames / fig.bytes_written.max(1) as f64,
        rpo_p50_ms: rpo.value_at_quantile(0.5) as f64 / 1000.0,
        rpo_p99_ms: rpo.value_at_quantile(0.99) as f64 / 1000.0,
        primary_s_per_gb: primary / gb.max(1e-9),
        secondary_s_per_gb: (secondary.cpu_seconds() - sec0) / gb.max(1e-9),
        extents: rep.extents_shipped - rep0.extents_shipped,
        chunks: rep.chunks_shipped - rep0.chunks_shipped,
        applied_mb_s: wire / applied_secs / 1e6,
        fig,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The primary runs in this process: RUST_LOG shows its log (default: warnings).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let drblk = match &args.drblk {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("drblk"),
    };
    anyhow::ensure!(
        drblk.exists(),
        "{} not found: build it with `cargo build --release --workspace` or pass --drblk",
        drblk.display()
    );
    let tmp = tempfile::Builder::new()
        .prefix("drblk-repl-bench-")
        .tempdir()?;
    let dir = tmp.path();
    let certs = dir.join("certs");
    drblk::link::certs::generate(&certs, &["primary", "secondary"], true)?;
    let size = args.size_mib << 20;
    let blocks = size / 4096;
    let primary_tmp = match &args.primary_dir {
        Some(d) => Some(
            tempfile::Builder::new()
                .prefix("drblk-repl-bench-primary-")
                .tempdir_in(d)?,
        ),
        None => None,
    };
    let image = primary_tmp
        .as_ref()
        .map_or(dir, |t| t.path())
        .join("primary.img");
    eprintln!(
        "filling a {} MiB image with 4 KiB writes ...",
        args.size_mib
    );
    fill_image(&image, size)?;

    eprintln!("measuring the QUIC loopback ceiling ...");
    let ceiling = link_ceiling(&certs, args.seconds, args.placement)?;

    // The primary's threads inherit this thread's CPU; the client pins itself to 1.
    if let Some(cpu) = args.placement.cpus().workers {
        pin_self(cpu);
    }
    if args.track_only {
        return track_table(&args, dir, &image, &certs, &drblk, blocks);
    }
    if args.drill_only {
        return drill_table(&args, dir, &image, &certs, &drblk, blocks);
    }
    let loads = workloads(&args.workloads);
    eprintln!("replication off ...");
    let mut off = Vec::new();
    {
        let server = Server::start(&serve_args(&args, dir, &image, None, &certs))?;
        for w in &loads {
            off.push(run_client(
                &server_socket(dir),
                w.cell,
                args.seconds,
                blocks,
            )?);
        }
        server.stop()?;
    }

    let mut results = Vec::new();
    for &chunk in &args.chunk_sizes {
        eprintln!("replication on, tracking at {} KiB ...", chunk >> 10);
        let sdir = dir.join(format!("secondary-{chunk}"));
        std::fs::create_dir_all(&sdir)?;
        let secondary =
            SecondaryProcess::start(&drblk, &sdir, &certs, args.placement.cpus().secondary)?;
        let mut sa = serve_args(&args, dir, &image, Some(secondary.addr), &certs);
        sa.cg.chunk_size = chunk;
        settle_dirty_pages();
        let server = Server::start(&sa)?;
        let sec0 = secondary.cpu_seconds();
        let copy = wait_initial_copy(&server, false)?;
        let sync_sec_cpu = secondary.cpu_seconds() - sec0;
        let mut rows = Vec::new();
        for w in &loads {
            rows.push(measure_on(
                args.placement,
                &server,
                &secondary,
                &server_socket(dir),
                *w,
                args.seconds,
                blocks,
            )?);
        }
        let freeze = server.status().cg.map(|c| c.freeze_us);
        server.stop()?;
        drop(secondary);
        results.push((chunk, copy, sync_sec_cpu, rows, freeze));
    }

    println!();
    println!(
        "replication over QUIC on loopback (TLS 1.3, 4 data streams, compression off), {} MiB disk, {} s per measurement",
        args.size_mib, args.seconds
    );
    println!(
        "threads: client pinned to CPU 1; {}",
        args.placement.describe()
    );
    println!("  QUIC loopback ceiling (this binary, 1 MiB extents, discarding sink; its client and server on the CPUs of the primary's shipping threads and of the secondary): {ceiling:>8.1} MB/s");
    for (chunk, copy, sync_cpu, _, _) in &results {
        let mbs = size as f64 / copy.total_s / 1e6;
        let streaming = copy.shipped as f64 / copy.shipping_s.max(1e-9) / 1e6;
        println!(
            "  initial copy, tracking {:>2} KiB: {mbs:>8.1} MB/s ({:.0} % of the ceiling, {:.1} s from start to commit; secondary {sync_cpu:.2} CPU-s); from its first byte shipped to its last: {streaming:.1} MB/s ({:.0} %)",
            chunk >> 10,
            mbs / ceiling * 100.0,
            copy.total_s,
            streaming / ceiling * 100.0
        );
    }
    println!();
    println!(
        "  {:<22} {:>5} | {:>8} {:>9} | {:>8} {:>9} {:>7} | {:>6} {:>6} {:>7} | {:>8} {:>8} | {:>6} {:>6}",
        "workload", "track", "off IOPS", "off p99", "on IOPS", "on p99", "on/off", "wire/w", "msg/w", "blk/ext", "RPO p50", "RPO p99", "pri", "sec"
    );
    println!(
        "  {:<22} {:>5} | {:>8} {:>9} | {:>8} {:>9} {:>7} | {:>6} {:>6} {:>7} | {:>8} {:>8} | {:>6} {:>6}",
        "", "", "", "µs", "", "µs", "", "", "", "", "ms", "ms", "s/GB", "s/GB"
    );
    for (k, w) in loads.iter().enumerate() {
        for (chunk, _, _, rows, _) in &results {
            let on = &rows[k];
            let f = &off[k];
            println!(
                "  {:<22} {:>3}K | {:>8.0} {:>9.1} | {:>8.0} {:>9.1} {:>6.0}% | {:>6.2} {:>6.2} {:>7.1} | {:>8.1} {:>8.1} | {:>6.1} {:>6.1}",
                w.name,
                chunk >> 10,
                f.iops,
                f.p99_us,
                on.fig.iops,
                on.fig.p99_us,
                on.fig.iops / f.iops * 100.0,
                on.amplification,
                on.frame_amplification,
                on.chunks as f64 / on.extents.max(1) as f64,
                on.rpo_p50_ms,
                on.rpo_p99_ms,
                on.primary_s_per_gb,
                on.secondary_s_per_gb,
            );
        }
    }
    println!();
    println!("  wire/w: UDP datagram bytes the primary sent (QUIC headers, acknowledgements, retransmissions included) per byte the guest wrote; msg/w: the same for the link's messages (extent frames with their headers); blk/ext: tracked blocks per extent message; pri/sec: CPU-seconds per GB on the wire (primary: this process minus the client's thread; secondary: its process)");
    for (chunk, _, _, _, freeze) in &results {
        if let Some(f) = freeze {
            println!(
                "  freeze (coordination) time, tracking {:>2} KiB: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
                chunk >> 10,
                f.p50,
                f.p99,
                f.max
            );
        }
    }
    Ok(())
}

/// The persisted change record's cost on the write path: random 4 KiB writes with the record
/// on and off, on a hot working set (inside the activity log) and on writes that keep
/// touching cold extents (the whole disk against a 16-extent log). Groups are formed only
/// once (the initial copy), so nothing but the write path runs while measuring.
fn track_table(
    args: &Args,
    dir: &Path,
    image: &Path,
    certs: &Path,
    drblk: &Path,
    blocks: u64,
) -> anyhow::Result<()> {
    let rand = Cell::new(Rw::RandWrite, 16, 2);
    let rows = [
        (
            "hot: 64 MiB, 1024 x 1 MiB log",
            (64u64 << 20) / 4096,
            1024u64,
        ),
        ("cold: whole disk, 16 x 1 MiB log", blocks, 16),
    ];
    println!();
    println!(
        "persisted change record, random 4 KiB writes QD16 on 2 queues, {} MiB disk, {} s per measurement",
        args.size_mib, args.seconds
    );
    println!(
        "  {:<34} | {:>8} {:>9} | {:>8} {:>9} {:>7} | {:>12} {:>12}",
        "workload",
        "off IOPS",
        "off p99",
        "on IOPS",
        "on p99",
        "on/off",
        "AL miss/1k w",
        "meta w/1k w"
    );
    for (name, span, slots) in rows {
        let mut figs = Vec::new();
        for record in [false, true] {
            let sdir = dir.join(format!("track-secondary-{slots}-{record}"));
            std::fs::create_dir_all(&sdir)?;
            let secondary =
                SecondaryProcess::start(drblk, &sdir, certs, args.placement.cpus().secondary)?;
            let mut sa = serve_args(args, dir, image, Some(secondary.addr), certs);
            sa.replication.no_track_file = !record;
            sa.replication.al_extents = slots;
            sa.cg.cg_interval = Duration::from_secs(3600).into();
            let _ = std::fs::remove_file(format!("{}.drblk-track", image.display()));
            let server = Server::start(&sa)?;
            wait_initial_copy(&server, true)?;
            let before = server.track_stats().unwrap_or_default();
            let f = run_client(&server_socket(dir), rand, args.seconds, span)?;
            let after = server.track_stats().unwrap_or_default();
            let writes = f.iops * (args.seconds as f64 + 0.3);
            let per_k = |a: u64, b: u64| (b - a) as f64 * 1000.0 / writes.max(1.0);
            figs.push((f, per_k(before.0, after.0), per_k(before.1, after.1)));
            server.stop()?;
            drop(secondary);
        }
        let (off, on) = (&figs[0].0, &figs[1].0);
        println!(
            "  {:<34} | {:>8.0} {:>9.1} | {:>8.0} {:>9.1} {:>6.1}% | {:>12.2} {:>12.2}",
            name,
            off.iops,
            off.p99_us,
            on.iops,
            on.p99_us,
            on.iops / off.iops * 100.0,
            figs[1].1,
            figs[1].2
        );
    }
    println!("  AL miss/1k w: writes that had to add their extent to the on-disk activity log, per 1,000 guest writes; meta w/1k w: the record's metadata writes (log, bitmap pages, superblock; each followed by an fdatasync) per 1,000 guest writes (including the ~300 ms warm-up)");
    Ok(())
}

/// The cost of a DR drill on replication: each workload measured with no drill, then with a
/// drill started on the secondary (`drblk ctl --control C drill start`) and a client busy
/// writing random 4 KiB blocks on the drill's device the whole time (so every group the
/// secondary applies first keeps the drill's view of the blocks it overwrites).
fn drill_table(
    args: &Args,
    dir: &Path,
    image: &Path,
    certs: &Path,
    drblk: &Path,
    blocks: u64,
) -> anyhow::Result<()> {
    let loads: Vec<Workload> = workloads(&args.workloads)
        .into_iter()
        .filter(|w| w.name.starts_with("4k"))
        .collect();
    let sdir = dir.join("drill-secondary");
    std::fs::create_dir_all(&sdir)?;
    let secondary = SecondaryProcess::start(drblk, &sdir, certs, args.placement.cpus().secondary)?;
    let control = sdir.join("replica.img.state/ctl");
    let server = Server::start(&serve_args(args, dir, image, Some(secondary.addr), certs))?;
    wait_initial_copy(&server, false)?;
    let ctl = |cmd: &[&str]| -> anyhow::Result<serde_json::Value> {
        let out = Command::new(drblk)
            .arg("ctl")
            .arg("--control")
            .arg(&control)
            .args(cmd)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "ctl {cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let drill_sock = dir.join("drill.sock");
    let mut rows = Vec::new();
    let mut start_ms: Vec<f64> = Vec::new();
    for w in &loads {
        let without = measure_on(
            args.placement,
            &server,
            &secondary,
            &server_socket(dir),
            *w,
            args.seconds,
            blocks,
        )?;
        let t = Instant::now();
        ctl(&[
            "drill",
            "start",
            "--socket",
            drill_sock.to_str().unwrap_or_default(),
        ])?;
        start_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // The drill's writer runs until the measurement (and its catch-up) is over.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Other blocks than the guest's workload (another seed), at the given rate.
        let drill_cell = Cell {
            rate: (args.drill_rate > 0.0).then_some(args.drill_rate),
            seed: 0x5eed_d411 + rows.len() as u64,
            // Like a drill guest's vCPU waiting for its disk: asleep, not spinning on the
            // secondary's CPU.
            sleeps: true,
            ..Cell::new(Rw::RandWrite, 4, 1)
        };
        let writer = {
            let (sock, stop) = (drill_sock.clone(), stop.clone());
            std::thread::Builder::new()
                .name("bench-drill".into())
                .spawn(move || -> anyhow::Result<(u64, f64)> {
                    pin_self(1);
                    let (mut n, mut iops) = (0u64, 0.0);
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let f = run_cell(&sock, 0, &drill_cell, 1, blocks)?;
                        n += 1;
                        iops += f.iops;
                    }
                    Ok((n, iops / n.max(1) as f64))
                })?
        };
        std::thread::sleep(Duration::from_millis(500));
        let with = measure_on(
            args.placement,
            &server,
            &secondary,
            &server_socket(dir),
            *w,
            args.seconds,
            blocks,
        )?;
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let (_, drill_iops) = writer
            .join()
            .map_err(|_| anyhow::anyhow!("drill writer panicked"))??;
        let st = ctl(&["drill", "status"])?;
        ctl(&["drill", "stop"])?;
        rows.push((w.name, without, with, drill_iops, st));
    }
    server.stop()?;
    drop(secondary);

    println!();
    println!(
        "DR drill on the secondary while replicating: {} MiB disk, {} s per measurement; a drill client writes random 4 KiB blocks at QD4 on the drill's device throughout ({}; pinned to CPU 1 with the secondary, waiting for completions asleep)",
        args.size_mib,
        args.seconds,
        if args.drill_rate > 0.0 {
            format!("{} writes/s", args.drill_rate)
        } else {
            "as fast as it can".into()
        }
    );
    println!(
        "  {:<22} {:<8} | {:>8} {:>8} | {:>9} {:>6} | {:>8} | {:>10} {:>10}",
        "workload",
        "drill",
        "RPO p50",
        "RPO p99",
        "applied",
        "ratio",
        "guest",
        "drill",
        "preserved"
    );
    println!(
        "  {:<22} {:<8} | {:>8} {:>8} | {:>9} {:>6} | {:>8} | {:>10} {:>10}",
        "", "", "ms", "ms", "MB/s", "", "IOPS", "IOPS", "MiB"
    );
    for (name, without, with, drill_iops, st) in &rows {
        println!(
            "  {:<22} {:<8} | {:>8.1} {:>8.1} | {:>9.1} {:>6} | {:>8.0} | {:>10} {:>10}",
            name,
            "none",
            without.rpo_p50_ms,
            without.rpo_p99_ms,
            without.applied_mb_s,
            "",
            without.fig.iops,
            "",
            ""
        );
        println!(
            "  {:<22} {:<8} | {:>8.1} {:>8.1} | {:>9.1} {:>5.0}% | {:>8.0} | {:>10.0} {:>10.1}",
            "",
            "writing",
            with.rpo_p50_ms,
            with.rpo_p99_ms,
            with.applied_mb_s,
            with.applied_mb_s / without.applied_mb_s.max(1e-9) * 100.0,
            with.fig.iops,
            drill_iops,
            st["preserved_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0
        );
    }
    println!("  applied: bytes on the wire per second from the workload's start until the secondary had applied it all (catch-up included); ratio: with the drill versus without; preserved: replica content kept for the drill when its groups overwrote blocks the drill still read");
    // What a start costs on a large disk: the view of a sparse 2 TiB image.
    let big = dir.join("big.img");
    std::fs::File::create(&big)?.set_len(2 << 40)?;
    let t = Instant::now();
    let view = drblk::drill::view::DrillView::create(
        &big,
        &dir.join("big-drill"),
        2 << 40,
        drblk::drill::view::Space::new(1 << 30),
    )?;
    let big_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(view);
    println!(
        "  drill start: {} ms (`drblk ctl drill start` round trip, this disk); a view of a 2 TiB disk: {big_ms:.1} ms",
        start_ms
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
