//! Command line: clap definitions and their validation into configs (in one place).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::defaults;

/// A duration on the command line ("250us", "10ms", "2s", "1m"; a bare number is
/// milliseconds), shown in `--help` the same way.
pub type CliDuration = humantime::Duration;

/// drblk: a vhost-user-blk disk for QEMU and cloud-hypervisor, replicated asynchronously
/// over QUIC to a secondary site that always holds a crash-consistent copy.
#[derive(Debug, Parser)]
#[command(name = "drblk", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "drblk=debug"). RUST_LOG wins if set.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `drblk serve --print-capabilities` prints: a vhost-user "block" backend that can
/// serve a disk read-only (`--read-only`) and takes its image as `--blk-file`.
pub const VHOST_USER_CAPABILITIES: &str = r#"{
  "type": "block",
  "features": [
    "read-only",
    "blk-file"
  ]
}"#;

/// Whether the command line is `drblk serve --print-capabilities` (given alone, as the
/// conventions require; `--print-capabilities` is also in `serve`'s `--help`, where clap
/// refuses it next to other options).
pub fn asks_for_capabilities(args: impl IntoIterator<Item = std::ffi::OsString>) -> bool {
    let args: Vec<_> = args.into_iter().skip(1).collect();
    args.len() == 2 && args[0] == "serve" && args[1] == "--print-capabilities"
}

/// An error and its causes as one line ("what failed: why: why"), leaving out a cause whose
/// text the line already holds (an error that prints its source as well as returning it).
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

/// drblk's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a raw disk image to a hypervisor over a vhost-user-blk socket.
    Serve(Box<ServeArgs>),
    /// Receive a replicated disk from a primary and keep a crash-consistent replica.
    Secondary(SecondaryArgs),
    /// Fail over: make a replica (on a stopped secondary) a writable disk for `drblk serve`.
    Promote(PromoteArgs),
    /// Create a CA and per-site certificates for the replication link (quick start).
    Cert(CertArgs),
    /// Show a running daemon's state: role, disk, group, RPO, link, throughput, sync progress.
    Status(StatusArgs),
    /// Talk to a running daemon through its control socket (SOCKET.ctl).
    Ctl(CtlArgs),
}

/// `drblk serve` options.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Raw image to serve. Created (sparse) if it does not exist and --size is given.
    /// Repeat `--disk PATH --socket PATH` to serve several disks of one VM as one
    /// consistency group (the n-th --socket serves the n-th --disk; up to 64): their
    /// replicas are always at the same group. (--blk-file is the name QEMU's vhost-user
    /// backend conventions give it.)
    #[arg(long, value_name = "PATH", alias = "blk-file", required = true)]
    pub disk: Vec<PathBuf>,

    /// vhost-user socket to listen on (the hypervisor connects to it), one per --disk. A
    /// stale socket file is replaced; a socket held by a running daemon is refused. (Also
    /// --socket-path.)
    #[arg(long, value_name = "PATH", alias = "socket-path", required = true)]
    pub socket: Vec<PathBuf>,

    /// Print what this backend offers as QEMU's vhost-user backend conventions describe
    /// (docs/interop/vhost-user.json: type "block"), then exit.
    #[arg(long, exclusive = true)]
    pub print_capabilities: bool,

    /// Size of the image to create when --disk does not exist (bytes, or with a K/M/G/T suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Number of request queues offered to the guest (virtio-blk multi-queue).
    #[arg(long, default_value_t = defaults::QUEUES, value_parser = clap::value_parser!(u16).range(1..=defaults::MAX_QUEUES as i64))]
    pub queues: u16,

    /// Maximum virtqueue size (entries per queue); a power of two.
    #[arg(long, default_value_t = defaults::QUEUE_SIZE, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Worker threads; queues are spread over them round-robin (default: one per queue).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Serve the disk read-only (writes, discards and write-zeroes fail; the guest sees RO).
    /// (Also --read-only.)
    #[arg(long, alias = "read-only")]
    pub readonly: bool,

    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct: bool,

    /// Serial number answered to GET_ID (at most 20 bytes; default: "drblk-" + image name).
    /// With several disks, each gets its default.
    #[arg(long, value_name = "STRING")]
    pub serial: Option<String>,

    /// Logical block size in bytes advertised to the guest (512 or 4096).
    #[arg(long, default_value_t = defaults::LOGICAL_BLOCK_SIZE, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Busy-poll each queue for this many microseconds after its last request before waiting
    /// for a kick. A kick costs a cross-CPU wakeup (tens of µs): a short poll catches the
    /// guest's next request without it, as QEMU's own event loop does (poll-max-ns 32 µs).
    /// Raise it for lowest latency at the cost of CPU; 0 disables polling.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = defaults::POLL_US)]
    pub poll_us: u64,

    /// Permissions of the socket file (octal).
    #[arg(long, default_value = "600", value_parser = parse_mode)] // defaults::SOCKET_MODE
    pub socket_mode: u32,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics (OpenMetrics text; e.g.
    /// 127.0.0.1:9850, port 0 picks a free one). Off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,

    /// Consistency-group options (used when the disk is replicated).
    #[command(flatten)]
    pub cg: CgArgs,

    /// Replication options.
    #[command(flatten)]
    pub replication: ReplicationArgs,
}

/// Where and how the primary replicates.
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Replication")]
pub struct ReplicationArgs {
    /// Replicate the disk to the secondary listening at HOST:PORT (UDP, QUIC). Implies
    /// --consistency-groups.
    #[arg(long, value_name = "HOST:PORT")]
    pub replicate_to: Option<String>,

    /// Directory with ca.pem and this site's SITE.pem/SITE.key (see `drblk cert`).
    #[arg(long, value_name = "DIR", default_value = defaults::CERTS)]
    pub certs: PathBuf,

    /// This site's name (its certificate's name).
    #[arg(long, default_value = defaults::PRIMARY_SITE)]
    pub site: String,

    /// The secondary's site name: its certificate must carry it.
    #[arg(long, default_value = defaults::SECONDARY_SITE)]
    pub peer_site: String,

    /// Limit replication traffic to this many bytes per second (K/M/G suffixes).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub max_rate: Option<u64>,

    /// Compress chunk data (lz4) on the link.
    #[arg(long)]
    pub compress: bool,

    /// Parallel QUIC streams for chunk data.
    #[arg(long, default_value_t = defaults::DATA_STREAMS, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub data_streams: u8,

    /// The persisted change record: after a crash or a restart of this primary the
    /// secondary gets only what may differ from it, not the whole disk. Default:
    /// IMAGE.drblk-track next to a file image (a block device needs this option, or runs
    /// without a record).
    #[arg(long, value_name = "PATH")]
    pub track_file: Option<PathBuf>,

    /// Keep no change record: every restart of this primary resyncs the whole disk.
    #[arg(long, conflicts_with = "track_file")]
    pub no_track_file: bool,

    /// Activity-log extent size of the change record. The first write into an extent that
    /// is not among the --al-extents hot ones waits for one metadata write (and fdatasync).
    /// After a crash the restart resyncs at most the blocks changed since the last committed
    /// group plus --al-extents x --al-extent-size (default 1024 x 1M = 1 GiB); after a clean
    /// shutdown exactly the unshipped blocks.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    // defaults::AL_EXTENT_SIZE
    pub al_extent_size: u64,

    /// Hot extents kept in the activity log (see --al-extent-size).
    #[arg(long, value_name = "N", default_value_t = defaults::AL_EXTENTS, value_parser = clap::value_parser!(u64).range(1..=1048576))]
    pub al_extents: u64,
}

/// How consistency groups are formed.
#[derive(Debug, Args, Clone)]
#[command(next_help_heading = "Consistency groups")]
pub struct CgArgs {
    /// Track writes and form consistency groups (implied by replication).
    #[arg(long)]
    pub consistency_groups: bool,

    /// Keep a crash-consistent replica image on this host: every consistency group is
    /// journaled in PATH.state and applied to PATH when it commits, so a crash recovers the
    /// replica to a whole group (implies --consistency-groups).
    #[arg(long, value_name = "PATH")]
    pub local_replica: Option<PathBuf>,

    /// Change-tracking granularity: one bit per block of this size (a power of two from 4K
    /// to 16M). Contiguous dirty blocks ship as one extent of up to 1M, so a 4K write ships
    /// about 4K; a larger size ships the whole block for any write into it. Both sites must
    /// use the same size.
    #[arg(long, default_value = "4K", value_parser = parse_size)] // defaults::CHUNK_SIZE
    pub chunk_size: u64,

    /// Form a consistency group this often (e.g. 100ms, 1s). Shorter means a smaller RPO
    /// and more freezes.
    #[arg(long, default_value_t = defaults::CG_INTERVAL.into(), value_parser = parse_duration)]
    pub cg_interval: CliDuration,

    /// Longest acceptable freeze of write completions while a consistency group is formed;
    /// a formation that takes longer is undone and the guest resumed.
    #[arg(long, default_value_t = defaults::MAX_COORDINATION_TIME.into(), value_parser = parse_duration)]
    pub max_coordination_time: CliDuration,

    /// Longest acceptable drain of a strict consistency group; past it the group is
    /// abandoned (the secondary stays at its last one) and a later group is formed.
    #[arg(long, default_value_t = defaults::MAX_DRAIN_TIME.into(), value_parser = parse_duration)]
    pub max_drain_time: CliDuration,

    /// Memory limit of the copy-on-write cache of chunks the forming group still has to
    /// ship; at the limit the strict group is abandoned instead of stalling the guest.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    // defaults::COW_CACHE_LIMIT
    pub cow_cache_limit: u64,

    /// Niceness (0-19) of the threads that drain and ship consistency groups. Above 0, the
    /// guest's I/O goes first when the CPUs are saturated and the RPO grows instead; freezes
    /// are still done at normal priority.
    #[arg(long, default_value_t = defaults::SHIP_NICE, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub ship_nice: i32,

    /// Run the threads that form, drain and ship groups only on these CPUs (e.g. `2-3`, as
    /// `taskset -c` writes them); the queue workers keep the process's CPUs. On a busy host,
    /// giving shipping CPUs of its own keeps it from slowing the guest's I/O.
    #[arg(long, value_name = "LIST", value_parser = crate::sys::cpus::CpuList::parse)]
    pub ship_cpus: Option<crate::sys::cpus::CpuList>,
}

impl Default for ReplicationArgs {
    /// The command line's defaults.
    fn default() -> Self {
        ServeArgs::new("disk".into(), "socket".into()).replication
    }
}

impl Default for CgArgs {
    /// The command line's defaults.
    fn default() -> Self {
        ServeArgs::new("disk".into(), "socket".into()).cg
    }
}

/// Parses "250us", "10ms", "2s", "1m", "1h 5m" (humantime); a bare number is milliseconds.
pub fn parse_duration(s: &str) -> Result<CliDuration, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(Duration::from_millis(ms).into());
    }
    s.parse::<CliDuration>()
        .map_err(|e| format!("{s:?} is not a duration (e.g. 500us, 10ms, 2s): {e}"))
}

/// `drblk secondary` options.
#[derive(Debug, Args, Clone)]
pub struct SecondaryArgs {
    /// UDP address to listen on for the primary.
    #[arg(long, value_name = "ADDR", default_value = defaults::LISTEN)]
    pub listen: String,

    /// The replica image (created sparse at the primary's disk size). For a primary that
    /// serves several disks as one group, repeat --disk once per disk, in the primary's
    /// order: the images are kept at the same group.
    #[arg(long, value_name = "PATH", required = true)]
    pub disk: Vec<PathBuf>,

    /// Directory for the staging journal and the replica's state (default: the first
    /// DISK.state).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Directory with ca.pem and this site's SITE.pem/SITE.key (see `drblk cert`).
    #[arg(long, value_name = "DIR", default_value = defaults::CERTS)]
    pub certs: PathBuf,

    /// This site's name (its certificate's name).
    #[arg(long, default_value = defaults::SECONDARY_SITE)]
    pub site: String,

    /// Accept only a primary whose certificate carries this site name.
    #[arg(long, default_value = defaults::PRIMARY_SITE)]
    pub peer_site: String,

    /// Control socket (mode 0600) for `drblk ctl --control PATH status|promote`
    /// (default: STATE_DIR/ctl).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Let the primary's copy replace this disk's own writes when the two lineages diverge
    /// (an old primary rejoining after a failover, a split brain, unrelated disks). Without
    /// it such a handshake is refused with what would be lost. The disk stays whole until
    /// the replacing group commits.
    #[arg(long)]
    pub discard_local_changes: bool,

    /// Take this image's disk out of the replica's group (the primary no longer serves
    /// it): at start the group is recovered, then the disk leaves it, its image left
    /// holding the last committed group and no longer written. Give the other disks with
    /// --disk as usual. Repeatable.
    #[arg(long, value_name = "IMAGE")]
    pub remove_disk: Vec<PathBuf>,

    /// Default limit on a drill's writes plus the replica content kept for it while later
    /// groups apply (`drblk ctl --control PATH drill start`). Drill writes past it fail; a
    /// group whose preservation would pass it ends the drill (replication never waits).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub drill_space: u64,

    /// Directory for a drill's files (its writes and the replica content kept for it),
    /// default STATE_DIR/drill. Another filesystem than the state directory's keeps a busy
    /// drill's write-back out of the journal's fsyncs (a lower RPO during drills).
    #[arg(long, value_name = "DIR")]
    pub drill_dir: Option<PathBuf>,

    /// Serve Prometheus metrics at http://HOST:PORT/metrics (OpenMetrics text; e.g.
    /// 127.0.0.1:9851, port 0 picks a free one). Off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
}

impl SecondaryArgs {
    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| crate::replica::default_state_dir(&self.disk[0]))
    }

    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| self.state_dir().join("ctl"))
    }
}

/// `drblk promote` options.
///
/// Recovers the replica's journal to the last committed consistency group, ends the
/// replica's generation there and starts a new one, and prints the CG the disk holds and
/// how old the primary's state in it is. Afterwards `drblk serve --disk DISK` serves it and
/// tracks every change from this point. Run it with the secondary stopped.
#[derive(Debug, Args, Clone)]
pub struct PromoteArgs {
    /// The replica image. For a replica of a group of disks, repeat --disk for each of its
    /// images, in the order `drblk secondary` was given them: the group is promoted as one.
    #[arg(long, value_name = "PATH", required = true)]
    pub disk: Vec<PathBuf>,

    /// The replica's state directory, as given to `drblk secondary` (default: DISK.state).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Promote a replica that is still syncing (an inconsistent mix of old and new blocks).
    #[arg(long)]
    pub force: bool,
}

impl PromoteArgs {
    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| crate::replica::default_state_dir(&self.disk[0]))
    }
}

/// `drblk cert` options.
#[derive(Debug, Args, Clone)]
pub struct CertArgs {
    /// Directory to write ca.pem/ca.key and SITE.pem/SITE.key into (an existing CA in it
    /// is reused).
    #[arg(long, value_name = "DIR", default_value = defaults::CERTS)]
    pub dir: PathBuf,

    /// Sites to issue certificates for.
    #[arg(long, value_delimiter = ',', default_value = "primary,secondary")]
    pub sites: Vec<String>,

    /// Replace existing site certificates.
    #[arg(long)]
    pub overwrite: bool,
}

/// `drblk ctl` options.
#[derive(Debug, Args, Clone)]
#[command(group(clap::ArgGroup::new("daemon").required(true).args(["socket", "control"])))]
pub struct CtlArgs {
    /// A primary's vhost-user socket (its control socket is this path + ".ctl").
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// A control socket itself, e.g. a secondary's (`drblk secondary --control`, default
    /// STATE_DIR/ctl).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `drblk status` options.
#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// A primary's vhost-user socket (`drblk serve --socket`); its control socket is SOCKET.ctl.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "control",
        required_unless_present = "control"
    )]
    pub socket: Option<PathBuf>,

    /// A control socket: a secondary's (STATE_DIR/ctl, or its --control) or a primary's.
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// Print the typed status as JSON instead (what `drblk ctl status` prints; one line per
    /// refresh with --watch).
    #[arg(long)]
    pub json: bool,

    /// Refresh every --interval until interrupted (redrawn in place on a terminal).
    #[arg(long)]
    pub watch: bool,

    /// How often --watch refreshes; without --watch, the summary measures throughput over
    /// this (at most 500ms; 0 shows none).
    #[arg(long, value_name = "DURATION", default_value = "1s")]
    pub interval: CliDuration,

    /// Stop --watch after N refreshes.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

impl StatusArgs {
    /// What `drblk status` does.
    pub fn request(&self) -> crate::control::watch::StatusRequest {
        let control = match (&self.control, &self.socket) {
            (Some(c), _) => c.clone(),
            (None, Some(s)) => crate::control::control_path(s),
            // clap requires one of them.
            (None, None) => PathBuf::from("ctl"),
        };
        crate::control::watch::StatusRequest {
            control,
            json: self.json,
            watch: self.watch,
            interval: *self.interval,
            count: self.count,
        }
    }
}

/// `drblk ctl` commands.
#[derive(Debug, Subcommand, Clone)]
pub enum CtlCommand {
    /// Print the daemon's state and figures as JSON.
    Status,
    /// Form a consistency group now (a primary).
    FormCg,
    /// Form one last group and wait until it has committed (a primary).
    Drain,
    /// Planned switchover (a primary): refuse writes, form a final group, wait for its
    /// commit, stop replicating and record the disk as demoted there (shut the VM down
    /// first).
    Demote {
        /// Go ahead although a frontend (the VM) is connected; its writes fail from then on.
        #[arg(long)]
        force: bool,
    },
    /// Failover on a running secondary, as `drblk promote` does for a stopped one (a
    /// running drill is stopped first).
    Promote {
        /// Promote a replica that is still syncing.
        #[arg(long)]
        force: bool,
    },
    /// Compare both sites' disks by checksums at a group boundary (a primary).
    Verify {
        /// Ship the chunks that differ in the next group.
        #[arg(long)]
        repair: bool,
    },
    /// DR drills on a running secondary: a writable clone of the last committed group,
    /// served as a vhost-user-blk device while replication goes on.
    Drill {
        /// start, status or stop.
        #[command(subcommand)]
        action: DrillAction,
    },
}

/// `drblk ctl drill` actions.
#[derive(Debug, Subcommand, Clone)]
pub enum DrillAction {
    /// Expose a writable clone of the last committed group on a new vhost-user socket
    /// (no copy: starts at once whatever the disk size).
    Start {
        /// The drill's vhost-user socket (boot the test VM on it). A replica of several
        /// disks takes one per disk, in the group's order: every disk shows the same group.
        #[arg(long, value_name = "PATH", required = true)]
        socket: Vec<PathBuf>,
        /// Limit on the drill's writes plus the replica content kept for it, all its disks
        /// together (default: the secondary's --drill-space).
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        drill_space: Option<u64>,
    },
    /// The drill's group, overlay bytes, preserved bytes and age.
    Status,
    /// Drop the clone and everything written to it.
    Stop,
}

impl CtlCommand {
    /// The control request this command sends.
    pub fn request(&self) -> crate::control::Request {
        use crate::control::Request as R;
        match self {
            CtlCommand::Status => R::Status,
            CtlCommand::FormCg => R::FormCg,
            CtlCommand::Drain => R::Drain,
            CtlCommand::Demote { force } => R::Demote { force: *force },
            CtlCommand::Promote { force } => R::Promote { force: *force },
            CtlCommand::Verify { repair } => R::Verify { repair: *repair },
            CtlCommand::Drill { action } => match action {
                DrillAction::Start {
                    socket,
                    drill_space,
                } => R::DrillStart {
                    sockets: socket.clone(),
                    space: *drill_space,
                },
                DrillAction::Status => R::DrillStatus,
                DrillAction::Stop => R::DrillStop,
            },
        }
    }
}

impl ServeArgs {
    /// The options `drblk serve --disk DISK --socket SOCKET` has (the command line's
    /// defaults), for library users.
    /// Adds a disk of the group, served on `socket`.
    pub fn add_disk(&mut self, disk: PathBuf, socket: PathBuf) {
        self.disk.push(disk);
        self.socket.push(socket);
    }

    /// The arguments of `drblk serve --disk DISK --socket SOCKET`, defaults otherwise.
    pub fn new(disk: PathBuf, socket: PathBuf) -> Self {
        let cli = Cli::try_parse_from([
            "drblk".as_ref(),
            "serve".as_ref(),
            "--disk".as_ref(),
            disk.as_os_str(),
            "--socket".as_ref(),
            socket.as_os_str(),
        ] as [&std::ffi::OsStr; 6])
        .expect("the default serve arguments parse");
        match cli.command {
            Command::Serve(a) => *a,
            _ => unreachable!("parsed a serve command"),
        }
    }
}

/// Parses "4096", "64K", "1M", "2G", "1T" (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_uppercase().as_str() {
                "K" | "KB" | "KIB" => 1u64 << 10,
                "M" | "MB" | "MIB" => 1 << 20,
                "G" | "GB" | "GIB" => 1 << 30,
                "T" | "TB" | "TIB" => 1 << 40,
                "B" => 1,
                other => return Err(format!("unknown size suffix {other:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64K, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if n < 2 || !n.is_power_of_two() || n > 32768 {
        return Err("queue size must be a power of two between 2 and 32768".into());
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("logical block size must be 512 or 4096".into()),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let m = u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .map_err(|_| format!("{s:?} is not an octal mode"))?;
    if m > 0o777 {
        return Err("mode must be at most 777".into());
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn an_error_is_one_line_without_repeating_a_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = anyhow::Error::new(crate::link::certs::CertError::Io {
            path: "certs/ca.pem".into(),
            source: io,
        })
        .context("loading the certificate;\ncreate one");
        assert_eq!(
            error_line(&e),
            "loading the certificate; create one: certs/ca.pem: No such file"
        );
    }

    #[test]
    fn only_a_lone_print_capabilities_is_the_capabilities_request() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert!(asks_for_capabilities(args(&[
            "drblk",
            "serve",
            "--print-capabilities"
        ])));
        assert!(!asks_for_capabilities(args(&[
            "drblk",
            "serve",
            "--print-capabilities",
            "--disk",
            "d"
        ])));
        assert!(!asks_for_capabilities(args(&[
            "drblk",
            "secondary",
            "--print-capabilities"
        ])));
        let caps: serde_json::Value = serde_json::from_str(VHOST_USER_CAPABILITIES).unwrap();
        assert_eq!(caps["type"], "block");
    }

    #[test]
    fn library_defaults_match_the_command_line_and_the_typed_defaults() {
        let parsed = Cli::parse_from(["drblk", "serve", "--disk", "d", "--socket", "s"]);
        let Command::Serve(a) = parsed.command else {
            panic!("not serve")
        };
        let b = ServeArgs::new("d".into(), "s".into());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        // The string defaults clap shows agree with the typed ones.
        assert_eq!(a.cg.chunk_size, defaults::CHUNK_SIZE);
        assert_eq!(a.cg.cow_cache_limit, defaults::COW_CACHE_LIMIT);
        assert_eq!(a.socket_mode, defaults::SOCKET_MODE);
        assert_eq!(*a.cg.max_drain_time, defaults::MAX_DRAIN_TIME);
        let cg = crate::cg::CgConfig::new(1 << 20);
        assert_eq!(cg.chunk_size, defaults::CHUNK_SIZE);
        assert_eq!(cg.max_drain_time, defaults::MAX_DRAIN_TIME);
        assert_eq!(cg.max_coordination_time, defaults::MAX_COORDINATION_TIME);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        let d = |s| *parse_duration(s).unwrap();
        assert_eq!(d("10ms"), Duration::from_millis(10));
        assert_eq!(d("250us"), Duration::from_micros(250));
        assert_eq!(d("2s"), Duration::from_secs(2));
        assert_eq!(d("5"), Duration::from_millis(5));
        assert_eq!(d("1m"), Duration::from_secs(60));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
