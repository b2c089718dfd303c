//! Command line: clap definitions and their validation into configs (in one place).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::blk::disk::DiskOptions;

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

/// drblk's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a raw disk image to a hypervisor over a vhost-user-blk socket.
    Serve(ServeArgs),
    /// Receive a replicated disk from a primary and keep a crash-consistent replica.
    Secondary(SecondaryArgs),
    /// Create a CA and per-site certificates for the replication link (quick start).
    Cert(CertArgs),
    /// Talk to a running daemon through its control socket (SOCKET.ctl).
    Ctl(CtlArgs),
}

/// `drblk serve` options.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Raw image to serve. Created (sparse) if it does not exist and --size is given.
    #[arg(long, value_name = "PATH")]
    pub disk: PathBuf,

    /// vhost-user socket to listen on (the hypervisor connects to it). A stale socket file is
    /// replaced; a socket held by a running daemon is refused.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Size of the image to create when --disk does not exist (bytes, or with a K/M/G/T suffix).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Number of request queues offered to the guest (virtio-blk multi-queue).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub queues: u16,

    /// Maximum virtqueue size (entries per queue); a power of two.
    #[arg(long, default_value_t = 256, value_parser = parse_queue_size)]
    pub queue_size: u16,

    /// Worker threads; queues are spread over them round-robin (default: one per queue).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Serve the disk read-only (writes, discards and write-zeroes fail; the guest sees RO).
    #[arg(long)]
    pub readonly: bool,

    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    pub direct: bool,

    /// Serial number answered to GET_ID (at most 20 bytes; default: "drblk-" + image name).
    #[arg(long, value_name = "STRING")]
    pub serial: Option<String>,

    /// Logical block size in bytes advertised to the guest (512 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_block_size)]
    pub logical_block_size: u32,

    /// Busy-poll each queue for this many microseconds after its last request before waiting
    /// for a kick. A kick costs a cross-CPU wakeup (tens of µs): a short poll catches the
    /// guest's next request without it, as QEMU's own event loop does (poll-max-ns 32 µs).
    /// Raise it for lowest latency at the cost of CPU; 0 disables polling.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 32)]
    pub poll_us: u64,

    /// Permissions of the socket file (octal).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,

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
    #[arg(long, value_name = "DIR", default_value = "drblk-certs")]
    pub certs: PathBuf,

    /// This site's name (its certificate's name).
    #[arg(long, default_value = "primary")]
    pub site: String,

    /// The secondary's site name: its certificate must carry it.
    #[arg(long, default_value = "secondary")]
    pub peer_site: String,

    /// Limit replication traffic to this many bytes per second (K/M/G suffixes).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub max_rate: Option<u64>,

    /// Compress chunk data (lz4) on the link.
    #[arg(long)]
    pub compress: bool,

    /// Parallel QUIC streams for chunk data.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u8).range(1..=16))]
    pub data_streams: u8,
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

    /// Change-tracking granularity: one bit per chunk of this size (power of two).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub chunk_size: u64,

    /// Form a consistency group this often (e.g. 100ms, 1s). Shorter means a smaller RPO
    /// and more freezes.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub cg_interval: Duration,

    /// Longest acceptable freeze of write completions while a consistency group is formed;
    /// a formation that takes longer is undone and the guest resumed.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    pub max_coordination_time: Duration,

    /// Longest acceptable drain of a strict consistency group; past it the group is
    /// abandoned (the secondary stays at its last one) and a later group is formed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_drain_time: Duration,

    /// Memory limit of the copy-on-write cache of chunks the forming group still has to
    /// ship; at the limit the strict group is abandoned instead of stalling the guest.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub cow_cache_limit: u64,

    /// Niceness (0-19) of the threads that drain and ship consistency groups. Above 0, the
    /// guest's I/O goes first when the CPUs are saturated and the RPO grows instead; freezes
    /// are still done at normal priority.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub ship_nice: i32,
}

impl Default for ReplicationArgs {
    fn default() -> Self {
        ReplicationArgs {
            replicate_to: None,
            certs: PathBuf::from("drblk-certs"),
            site: "primary".into(),
            peer_site: "secondary".into(),
            max_rate: None,
            compress: false,
            data_streams: 4,
        }
    }
}

impl Default for CgArgs {
    fn default() -> Self {
        CgArgs {
            consistency_groups: false,
            local_replica: None,
            chunk_size: 64 << 10,
            cg_interval: Duration::from_millis(100),
            max_coordination_time: Duration::from_millis(10),
            max_drain_time: Duration::from_secs(60),
            cow_cache_limit: 256 << 20,
            ship_nice: 0,
        }
    }
}

/// Parses "250us", "10ms", "2s", "1m" (a bare number is milliseconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500us, 10ms, 2s)"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("{s:?} is not a duration"));
    }
    let secs = match unit {
        "us" | "µs" => n / 1e6,
        "ms" | "" => n / 1e3,
        "s" => n,
        "m" | "min" => n * 60.0,
        other => {
            return Err(format!(
                "unknown duration unit {other:?} (use us, ms, s or m)"
            ))
        }
    };
    Ok(Duration::from_secs_f64(secs))
}

/// `drblk secondary` options.
#[derive(Debug, Args, Clone)]
pub struct SecondaryArgs {
    /// UDP address to listen on for the primary.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7700")]
    pub listen: String,

    /// The replica image (created sparse at the primary's disk size).
    #[arg(long, value_name = "PATH")]
    pub disk: PathBuf,

    /// Directory for the staging journal and the replica's state (default: DISK.state).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Directory with ca.pem and this site's SITE.pem/SITE.key (see `drblk cert`).
    #[arg(long, value_name = "DIR", default_value = "drblk-certs")]
    pub certs: PathBuf,

    /// This site's name (its certificate's name).
    #[arg(long, default_value = "secondary")]
    pub site: String,

    /// Accept only a primary whose certificate carries this site name.
    #[arg(long, default_value = "primary")]
    pub peer_site: String,
}

impl SecondaryArgs {
    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| crate::replica::default_state_dir(&self.disk))
    }
}

/// `drblk cert` options.
#[derive(Debug, Args, Clone)]
pub struct CertArgs {
    /// Directory to write ca.pem/ca.key and SITE.pem/SITE.key into (an existing CA in it
    /// is reused).
    #[arg(long, value_name = "DIR", default_value = "drblk-certs")]
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
pub struct CtlArgs {
    /// The daemon's vhost-user socket (its control socket is this path + ".ctl").
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// status: print the daemon's state and figures as JSON; form-cg: form a consistency
    /// group now; drain: form one last group and wait until it has committed.
    #[arg(value_parser = ["status", "form-cg", "drain"])]
    pub command: String,
}

impl ServeArgs {
    /// The options `drblk serve --disk DISK --socket SOCKET` has, for library users.
    pub fn new(disk: PathBuf, socket: PathBuf) -> Self {
        ServeArgs {
            disk,
            socket,
            size: None,
            queues: 1,
            queue_size: 256,
            threads: None,
            readonly: false,
            direct: false,
            serial: None,
            logical_block_size: 512,
            poll_us: 32,
            socket_mode: 0o600,
            cg: CgArgs::default(),
            replication: ReplicationArgs::default(),
        }
    }

    /// The image options these arguments describe.
    pub fn disk_options(&self) -> DiskOptions {
        DiskOptions {
            path: self.disk.clone(),
            create_size: self.size,
            readonly: self.readonly,
            direct: self.direct,
            logical_block_size: self.logical_block_size,
        }
    }

    /// The serial number (GET_ID answer).
    pub fn serial(&self) -> String {
        self.serial.clone().unwrap_or_else(|| {
            let name = self
                .disk
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut s = format!("drblk-{name}");
            s.truncate(20);
            s
        })
    }

    /// Busy-poll budget, if enabled.
    pub fn poll(&self) -> Option<Duration> {
        (self.poll_us > 0).then(|| Duration::from_micros(self.poll_us))
    }

    /// Worker thread count.
    pub fn threads(&self) -> usize {
        self.threads
            .unwrap_or(usize::from(self.queues))
            .clamp(1, usize::from(self.queues))
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
    fn library_defaults_match_the_command_line() {
        let parsed = Cli::parse_from(["drblk", "serve", "--disk", "d", "--socket", "s"]);
        let Command::Serve(a) = parsed.command else {
            panic!("not serve")
        };
        let b = ServeArgs::new("d".into(), "s".into());
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
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
        assert_eq!(parse_duration("10ms").unwrap(), Duration::from_millis(10));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("5").unwrap(), Duration::from_millis(5));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
