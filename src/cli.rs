//! Command line: clap definitions and their validation into configs (in one place).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::storage::DiskOptions;

/// drblk: a vhost-user-blk disk for QEMU and cloud-hypervisor, replicated asynchronously
/// over QUIC to a secondary site that always holds a crash-consistent copy.
#[derive(Debug, Parser)]
#[command(name = "drblk", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. "info" or "drblk=debug"). RUST_LOG wins if set.
    #[arg(long, global = true, default_value = "info")]
    pub log: String,

    /// What to do. Without a command, `drblk demo` runs.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// drblk's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a raw disk image to a hypervisor over a vhost-user-blk socket.
    Serve(ServeArgs),
    /// Run the built-in demonstration: create a sparse image in a temporary directory, serve
    /// it, drive a short workload through a real vhost-user frontend, and print what happened.
    Demo(DemoArgs),
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
    /// for a kick: lowest latency at the cost of CPU. 0 disables polling.
    #[arg(long, value_name = "MICROSECONDS", default_value_t = 0)]
    pub poll_us: u64,

    /// Permissions of the socket file (octal).
    #[arg(long, default_value = "600", value_parser = parse_mode)]
    pub socket_mode: u32,
}

/// `drblk demo` options.
#[derive(Debug, Args, Clone)]
pub struct DemoArgs {
    /// Directory for the demo's image and socket (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// Size of the demo disk.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub size: u64,

    /// How long to run the workload.
    #[arg(long, default_value = "3", value_name = "SECONDS")]
    pub seconds: u64,
}

impl ServeArgs {
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
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
