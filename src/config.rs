//! From command-line arguments to the configuration a daemon runs with: one set of defaults
//! ([`defaults`], which the CLI, [`crate::cg::CgConfig::new`] and the library constructors all
//! read) and every cross-check in one place ([`ServeConfig::try_from`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::blk::disk::DiskOptions;
use crate::blk::virtio::ID_BYTES;
use crate::cg::CgConfig;
use crate::cli::ServeArgs;
use crate::sys::cpus::CpuList;
use crate::sys::priority::ShipThreads;

/// The defaults, typed. The CLI shows them in `--help`.
pub mod defaults {
    use std::time::Duration;

    /// Entries per virtqueue.
    pub const QUEUE_SIZE: u16 = 256;
    /// Queues offered to the guest.
    pub const QUEUES: u16 = 1;
    /// The most queues a disk offers.
    pub const MAX_QUEUES: u16 = 64;
    /// Logical block size advertised to the guest.
    pub const LOGICAL_BLOCK_SIZE: u32 = 512;
    /// Busy-poll budget after a queue's last request (QEMU's poll-max-ns).
    pub const POLL_US: u64 = 32;
    /// Permissions of the vhost-user socket.
    pub const SOCKET_MODE: u32 = 0o600;
    /// Change-tracking granularity: one 4 KiB block, so a 4 KiB write ships 4 KiB; the
    /// drain coalesces contiguous dirty blocks into extents of up to 1 MiB.
    pub const CHUNK_SIZE: u64 = 4 << 10;
    /// How often a consistency group is formed.
    pub const CG_INTERVAL: Duration = Duration::from_millis(100);
    /// Longest acceptable freeze of write completions.
    pub const MAX_COORDINATION_TIME: Duration = Duration::from_millis(10);
    /// Longest acceptable drain of a strict group before it is abandoned.
    pub const MAX_DRAIN_TIME: Duration = Duration::from_secs(60);
    /// Memory limit of the copy-on-write cache.
    pub const COW_CACHE_LIMIT: u64 = 256 << 20;
    /// Niceness of the shipping threads.
    pub const SHIP_NICE: i32 = 0;
    /// Parallel QUIC streams for chunk data.
    pub const DATA_STREAMS: u8 = 4;
    /// Activity-log extent size of the change record (1 MiB).
    pub const AL_EXTENT_SIZE: u64 = 1 << 20;
    /// Activity-log slots of the change record: with 1 MiB extents, a crash resyncs at most
    /// 1 GiB beyond what changed since the last committed group (DRBD's default: 4.8 GiB).
    pub const AL_EXTENTS: u64 = 1024;
    /// UDP address a secondary listens on.
    pub const LISTEN: &str = "0.0.0.0:7700";
    /// Certificate directory.
    pub const CERTS: &str = "drblk-certs";
    /// Site name of a primary.
    pub const PRIMARY_SITE: &str = "primary";
    /// Site name of a secondary.
    pub const SECONDARY_SITE: &str = "secondary";
}

/// What `drblk serve` runs with, validated.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The disks, in the consistency group's order (one, or several served as one group).
    pub disks: Vec<DiskConfig>,
    /// Permissions of the socket files.
    pub socket_mode: u32,
    /// Queues offered to the guest.
    pub queues: u16,
    /// Entries per queue.
    pub queue_size: u16,
    /// Worker threads (1..=queues).
    pub threads: usize,
    /// Busy-poll budget, if polling.
    pub poll: Option<Duration>,
    /// Consistency groups, when writes are tracked (replication, a local replica, or asked for).
    pub cg: Option<CgSettings>,
    /// A crash-consistent replica image on this host.
    pub local_replica: Option<PathBuf>,
    /// Replication to a secondary.
    pub replication: Option<ReplicationConfig>,
    /// Where to serve `/metrics`.
    pub metrics: Option<String>,
}

/// One disk of `drblk serve`.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    /// The image.
    pub disk: DiskOptions,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// Its GET_ID answer (at most 20 bytes).
    pub serial: String,
}

/// How consistency groups are formed (the engine's own settings come with the disk size).
#[derive(Debug, Clone)]
pub struct CgSettings {
    /// Tracking granularity (a power of two in the range the link accepts).
    pub chunk_size: u64,
    /// Form a group this often.
    pub interval: Duration,
    /// Freeze limit.
    pub max_coordination_time: Duration,
    /// Drain limit.
    pub max_drain_time: Duration,
    /// Copy-on-write cache limit in bytes.
    pub cow_cache_limit: usize,
    /// Niceness and CPUs of the shipping threads.
    pub ship: ShipThreads,
}

impl CgSettings {
    /// The engine's configuration for a disk of `disk_size` bytes.
    pub fn engine_config(&self, disk_size: u64) -> CgConfig {
        CgConfig {
            disk_size,
            chunk_size: self.chunk_size,
            max_coordination_time: self.max_coordination_time,
            max_drain_time: self.max_drain_time,
            cow_cache_limit: self.cow_cache_limit,
        }
    }
}

/// Where and how the primary replicates.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// The secondary, HOST:PORT.
    pub target: String,
    /// Certificate directory.
    pub certs: PathBuf,
    /// This site's name.
    pub site: String,
    /// The secondary's site name.
    pub peer_site: String,
    /// Bytes per second, if limited.
    pub max_rate: Option<u64>,
    /// lz4 on the link.
    pub compress: bool,
    /// Parallel data streams.
    pub data_streams: usize,
    /// The persisted change record: `None` with `--no-track-file`; `Some(None)`: the
    /// default next to a file image.
    pub track_file: Option<Option<std::path::PathBuf>>,
    /// Activity-log extent size.
    pub al_extent_size: u64,
    /// Activity-log slots.
    pub al_extents: u64,
}

impl TryFrom<&ServeArgs> for ServeConfig {
    type Error = anyhow::Error;

    fn try_from(a: &ServeArgs) -> anyhow::Result<Self> {
        if a.disk.len() != a.socket.len() {
            bail!(
                "{} --disk and {} --socket: give one --socket per --disk, in the same order",
                a.disk.len(),
                a.socket.len()
            );
        }
        if a.disk.len() > crate::cg::MAX_DISKS {
            bail!(
                "{} disks: a group has at most {}",
                a.disk.len(),
                crate::cg::MAX_DISKS
            );
        }
        for (i, d) in a.disk.iter().enumerate() {
            if a.disk[..i].contains(d) {
                bail!("--disk {} is given twice", d.display());
            }
            if a.socket[..i].contains(&a.socket[i]) {
                bail!("--socket {} is given twice", a.socket[i].display());
            }
        }
        let several = a.disk.len() > 1;
        if several && a.serial.is_some() {
            bail!("--serial names one disk: with several disks each gets its default (drblk- and its image name)");
        }
        if several && a.cg.local_replica.is_some() {
            bail!("--local-replica keeps one disk: use --replicate-to for a group of several");
        }
        if several && a.replication.track_file.is_some() {
            bail!("--track-file names one disk's record: with several disks each keeps its default (next to its image)");
        }
        if let Some(s) = a.serial.as_ref().filter(|s| s.len() > ID_BYTES) {
            bail!(
                "--serial {s:?} is {} bytes; GET_ID holds at most {ID_BYTES}",
                s.len()
            )
        }
        let replicate = a.replication.replicate_to.is_some();
        let cg = a.cg.consistency_groups || a.cg.local_replica.is_some() || replicate;
        let c = &a.cg;
        crate::geometry::check_chunk_size(c.chunk_size)
            .with_context(|| format!("--chunk-size {}", c.chunk_size))?;
        for (name, d) in [
            ("--cg-interval", *c.cg_interval),
            ("--max-coordination-time", *c.max_coordination_time),
            ("--max-drain-time", *c.max_drain_time),
        ] {
            if d.is_zero() {
                bail!("{name} must be longer than 0");
            }
        }
        let cow_cache_limit = usize::try_from(c.cow_cache_limit).unwrap_or(usize::MAX);
        if cow_cache_limit == 0 {
            bail!("--cow-cache-limit 0 would abandon every group a write touches");
        }
        if let Some(cpus) = &c.ship_cpus {
            let online = CpuList::online().context("reading which CPUs are online")?;
            let outside = cpus.outside(&online);
            if !outside.is_empty() {
                let outside: Vec<String> = outside.iter().map(|c| c.to_string()).collect();
                bail!(
                    "--ship-cpus {cpus} names CPU {}, which is not online; pick CPUs from {online}",
                    outside.join(",")
                );
            }
        }
        let queues = a.queues;
        let threads = match a.threads {
            Some(0) => bail!("--threads must be at least 1"),
            Some(t) if t > usize::from(queues) => {
                bail!("--threads {t} is more than --queues {queues}: a thread serves at least one queue")
            }
            Some(t) => t,
            None => usize::from(queues),
        };
        Ok(ServeConfig {
            disks: a
                .disk
                .iter()
                .zip(&a.socket)
                .map(|(path, socket)| DiskConfig {
                    disk: DiskOptions {
                        path: path.clone(),
                        create_size: a.size,
                        readonly: a.readonly,
                        direct: a.direct,
                        logical_block_size: a.logical_block_size,
                    },
                    socket: socket.clone(),
                    serial: a.serial.clone().unwrap_or_else(|| default_serial(path)),
                })
                .collect(),
            socket_mode: a.socket_mode,
            metrics: a.metrics.clone(),
            queues,
            queue_size: a.queue_size,
            threads,
            poll: (a.poll_us > 0).then(|| Duration::from_micros(a.poll_us)),
            cg: cg.then(|| CgSettings {
                chunk_size: c.chunk_size,
                interval: *c.cg_interval,
                max_coordination_time: *c.max_coordination_time,
                max_drain_time: *c.max_drain_time,
                cow_cache_limit,
                ship: ShipThreads {
                    nice: c.ship_nice,
                    cpus: c.ship_cpus.clone(),
                },
            }),
            local_replica: c.local_replica.clone(),
            replication: a.replication.replicate_to.as_ref().map(|target| {
                let r = &a.replication;
                ReplicationConfig {
                    target: target.clone(),
                    certs: r.certs.clone(),
                    site: r.site.clone(),
                    peer_site: r.peer_site.clone(),
                    max_rate: r.max_rate,
                    compress: r.compress,
                    data_streams: usize::from(r.data_streams),
                    track_file: (!r.no_track_file).then(|| r.track_file.clone()),
                    al_extent_size: r.al_extent_size,
                    al_extents: r.al_extents,
                }
            }),
        })
    }
}

/// "drblk-" + the image's file stem, cut to GET_ID's 20 bytes at a character boundary (a byte
/// index inside a multi-byte character would panic).
pub fn default_serial(disk: &std::path::Path) -> String {
    let name = disk
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let s = format!("drblk-{name}");
    let end = (0..=s.len().min(ID_BYTES))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0);
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(f: impl FnOnce(&mut ServeArgs)) -> ServeArgs {
        let mut a = ServeArgs::new("d.img".into(), "d.sock".into());
        f(&mut a);
        a
    }

    #[test]
    fn default_serial_of_a_non_ascii_image_name_is_cut_at_a_character_boundary() {
        // "drblk-" + 13 × 'a' puts byte 20 inside the two-byte 'é'.
        let serial = default_serial("aaaaaaaaaaaaaé.img".as_ref());
        assert_eq!(serial, "drblk-aaaaaaaaaaaaa");
        assert!(serial.len() <= ID_BYTES);
        assert_eq!(default_serial("ééééééééééé.img".as_ref()), "drblk-ééééééé");
        assert_eq!(default_serial("d.img".as_ref()), "drblk-d");
    }

    #[test]
    fn defaults_give_a_plain_disk() {
        let c = ServeConfig::try_from(&args(|_| {})).unwrap();
        assert!(c.cg.is_none() && c.replication.is_none() && c.local_replica.is_none());
        assert_eq!(c.threads, 1);
        assert_eq!(c.poll, Some(Duration::from_micros(defaults::POLL_US)));
        assert_eq!(c.disks[0].serial, "drblk-d");
    }

    #[test]
    fn several_disks_pair_with_their_sockets_in_order() {
        let c =
            ServeConfig::try_from(&args(|a| a.add_disk("e.img".into(), "e.sock".into()))).unwrap();
        let pairs: Vec<_> = c
            .disks
            .iter()
            .map(|d| {
                (
                    d.disk.path.to_str().unwrap(),
                    d.socket.to_str().unwrap(),
                    &*d.serial,
                )
            })
            .collect();
        assert_eq!(
            pairs,
            [
                ("d.img", "d.sock", "drblk-d"),
                ("e.img", "e.sock", "drblk-e")
            ]
        );
    }

    #[test]
    fn replication_implies_consistency_groups() {
        let c = ServeConfig::try_from(&args(|a| a.replication.replicate_to = Some("h:1".into())))
            .unwrap();
        let cg = c.cg.unwrap();
        assert_eq!(cg.chunk_size, defaults::CHUNK_SIZE);
        assert_eq!(cg.interval, defaults::CG_INTERVAL);
        assert_eq!(c.replication.unwrap().data_streams, 4);
    }

    #[test]
    fn cross_checks() {
        type Case = (&'static str, fn(&mut ServeArgs), &'static str);
        let cases: &[Case] = &[
            (
                "chunk not a power of two",
                |a| a.cg.chunk_size = 48 << 10,
                "power of two",
            ),
            ("chunk too small", |a| a.cg.chunk_size = 1024, "outside"),
            ("chunk too large", |a| a.cg.chunk_size = 32 << 20, "outside"),
            (
                "zero interval",
                |a| a.cg.cg_interval = Duration::ZERO.into(),
                "--cg-interval",
            ),
            (
                "zero freeze limit",
                |a| a.cg.max_coordination_time = Duration::ZERO.into(),
                "--max-coordination-time",
            ),
            (
                "no cache",
                |a| a.cg.cow_cache_limit = 0,
                "--cow-cache-limit",
            ),
            (
                "more threads than queues",
                |a| a.threads = Some(2),
                "--threads",
            ),
            ("zero threads", |a| a.threads = Some(0), "--threads"),
            (
                "serial too long",
                |a| a.serial = Some("x".repeat(21)),
                "--serial",
            ),
            (
                "a disk without its socket",
                |a| a.disk.push("e.img".into()),
                "one --socket per --disk",
            ),
            (
                "a disk twice",
                |a| a.add_disk("d.img".into(), "e.sock".into()),
                "--disk d.img is given twice",
            ),
            (
                "a socket twice",
                |a| a.add_disk("e.img".into(), "d.sock".into()),
                "--socket d.sock is given twice",
            ),
            (
                "one serial for a group",
                |a| {
                    a.add_disk("e.img".into(), "e.sock".into());
                    a.serial = Some("x".into());
                },
                "--serial names one disk",
            ),
            (
                "a local replica of a group",
                |a| {
                    a.add_disk("e.img".into(), "e.sock".into());
                    a.cg.local_replica = Some("r.img".into());
                },
                "--local-replica keeps one disk",
            ),
        ];
        for (what, f, needle) in cases {
            let e = ServeConfig::try_from(&args(f)).expect_err(what);
            assert!(format!("{e:#}").contains(needle), "{what}: {e:#}");
        }
    }
}
