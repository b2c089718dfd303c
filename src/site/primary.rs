//! `drblk serve`: assemble the device from its options and run the daemon.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;

use crate::blk::daemon::{self, Shutdown, SocketLock};
use crate::blk::device::{DeviceShared, DeviceStats};
use crate::blk::disk::Disk;
use crate::blk::execute::Executor;
use crate::blk::queue::WorkerOptions;
use crate::blk::tracking::Tracking;
use crate::blk::virtio::DeviceLimits;
use crate::cg::{ChunkSource, Engine, Group};
use crate::cli::ServeArgs;
use crate::config::{CgSettings, DiskConfig, ReplicationConfig, ServeConfig};
use crate::control::{control_path, ControlServer, ControlState, Member};
use crate::link::{ClientConfig, DiskInfo, SiteIdentity};
use crate::replicate::cycle::{ChunkSink, Cycle};
use crate::replicate::local::LocalReplica;
use crate::replicate::shipper::{LinkStatus, Replicator};
use crate::sys::priority::ShipThreads;
use crate::track::{ChangeRecord, Refresher, TrackConfig};

/// A daemon running in a thread of this process (the CLI, the demo and tests use it).
pub struct Server {
    /// The disks, in the group's order.
    disks: Vec<DiskServer>,
    /// The disks' engines as the group the cycle forms.
    group: Option<Arc<Group>>,
    control: Arc<ControlState>,
    _control_servers: Vec<ControlServer>,
    shutdown: Shutdown,
    ship: ShipThreads,
    metrics: Option<crate::metrics::MetricsServer>,
}

/// One disk of a daemon: its device, engine, change record and accept thread.
struct DiskServer {
    shared: Arc<DeviceShared>,
    engine: Option<Arc<Engine>>,
    record: Option<Arc<ChangeRecord>>,
    refresher: Option<Refresher>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

/// A disk opened for serving, before its socket listens.
struct OpenedDisk {
    disk: Arc<Disk>,
    lineage: Option<crate::lineage::Lineage>,
    engine: Option<Arc<Engine>>,
    record: Option<Arc<ChangeRecord>>,
    shared: Arc<DeviceShared>,
}

impl Server {
    /// Opens the images, binds the sockets and starts serving; returns once the sockets
    /// accept connections.
    pub fn start(args: &ServeArgs) -> anyhow::Result<Server> {
        Self::start_with(ServeConfig::try_from(args)?)
    }

    /// [`Server::start`] with a validated configuration.
    pub fn start_with(cfg: ServeConfig) -> anyhow::Result<Server> {
        // Locked first: whoever holds a socket's lock owns its control socket too.
        let socket_locks = cfg
            .disks
            .iter()
            .map(|d| SocketLock::acquire(&d.socket))
            .collect::<Result<Vec<_>, _>>()?;
        // Before anything is created: a missing certificate must not leave a new image.
        let identity = match &cfg.replication {
            Some(r) => {
                crate::link::resolve(&r.target)?;
                Some(SiteIdentity::load_for_daemon(
                    &r.certs,
                    &r.site,
                    &r.peer_site,
                )?)
            }
            None => None,
        };
        let metrics = cfg
            .metrics
            .as_deref()
            .map(crate::metrics::MetricsServer::bind)
            .transpose()?;
        let opened = cfg
            .disks
            .iter()
            .map(|dc| open_disk(&cfg, dc))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Which disks' records knew a group the secondary acknowledged: decided before the
        // numbering is aligned below, which makes every engine look as far along.
        let seeded: Vec<bool> = opened
            .iter()
            .map(|o| {
                o.record.is_some()
                    && o.engine
                        .as_ref()
                        .is_some_and(|e| e.stats().last_committed > 0)
            })
            .collect();
        let group = match opened
            .iter()
            .map(|o| o.engine.clone())
            .collect::<Option<Vec<_>>>()
        {
            Some(engines) => {
                // The disks' records may have been acknowledged up to different groups (a
                // crash between their updates): the group continues above the newest. A
                // record behind it covers more than needed, which is harmless.
                let last = engines
                    .iter()
                    .map(|e| e.stats().last_committed)
                    .max()
                    .unwrap_or(0);
                engines.iter().for_each(|e| e.resume_numbering(last));
                Some(Arc::new(
                    Group::new(engines).context("forming the disks' consistency group")?,
                ))
            }
            None => None,
        };
        let control = Arc::new(ControlState {
            members: opened
                .iter()
                .zip(&cfg.disks)
                .map(|(o, dc)| Member {
                    shared: o.shared.clone(),
                    engine: o.engine.clone(),
                    record: o.record.clone(),
                    socket: dc.socket.clone(),
                })
                .collect(),
            cycle: std::sync::Mutex::new(None),
            link: std::sync::Mutex::new(None),
        });
        let ship = cfg.cg.as_ref().map(|c| c.ship.clone()).unwrap_or_default();
        if let (Some(path), Some(group), Some(cg)) = (&cfg.local_replica, &group, &cfg.cg) {
            // Like a secondary's: journal, state and lock in `<replica>.state`, bound to the
            // disk's identity so a replica of another disk is refused. One disk only (the
            // configuration refuses a group).
            let disk = &opened[0].disk;
            let uuid = crate::replica::identity::load_or_create(disk.path())
                .with_context(|| format!("reading the identity of {}", disk.path().display()))?;
            let state_dir = crate::replica::default_state_dir(path);
            let replica = LocalReplica::open(path, &state_dir, disk.size(), cg.chunk_size, uuid)
                .with_context(|| format!("opening the local replica {}", path.display()))?;
            tracing::info!(replica = %path.display(), state_dir = %state_dir.display(), interval = ?cg.interval, "keeping a local crash-consistent replica");
            let cycle = Cycle::start(group.clone(), Box::new(replica), cg.interval, ship.clone());
            *control.cycle.lock().expect("cycle lock") = Some(cycle);
        }
        if let (Some(r), Some(group), Some(cg), Some(identity)) =
            (&cfg.replication, &group, &cfg.cg, identity)
        {
            let (replicator, link) =
                replicator_for(r, identity, cg, &opened, group.clone(), seeded)?;
            tracing::info!(secondary = %replicator.peer(), interval = ?cg.interval, disks = opened.len(), "replicating");
            let cycle = Cycle::start(
                group.clone(),
                Box::new(replicator),
                cg.interval,
                ship.clone(),
            );
            *control.cycle.lock().expect("cycle lock") = Some(cycle);
            *control.link.lock().expect("link lock") = Some(link);
        }
        // Every socket's control socket answers for the whole daemon.
        let control_servers = cfg
            .disks
            .iter()
            .map(|dc| {
                ControlServer::start(
                    &control_path(&dc.socket),
                    control.clone() as Arc<dyn crate::control::ControlHandler>,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = match metrics {
            Some(bound) => {
                let c = control.clone();
                Some(bound.serve(Arc::new(move || {
                    crate::metrics::primary::render(c.status())
                }))?)
            }
            None => None,
        };
        // Listen last: a frontend (or a script waiting for a socket) that can connect finds
        // the control socket and the replication cycle running.
        let shutdown = Shutdown::default();
        let mut disks = Vec::new();
        for (o, lock) in opened.into_iter().zip(socket_locks) {
            let socket = lock.bind(cfg.socket_mode)?;
            let (s2, sd2) = (o.shared.clone(), shutdown.clone());
            let thread = std::thread::Builder::new()
                .name("drblk-accept".into())
                .spawn(move || daemon::serve(s2, socket, sd2).map_err(anyhow::Error::from))
                .context("spawning the accept thread")?;
            let refresher = o
                .record
                .as_ref()
                .map(|r| r.start_refresher(std::time::Duration::from_secs(1)));
            disks.push(DiskServer {
                shared: o.shared,
                engine: o.engine,
                record: o.record,
                refresher,
                thread: Some(thread),
            });
        }
        Ok(Server {
            disks,
            group,
            control,
            _control_servers: control_servers,
            shutdown,
            ship,
            metrics,
        })
    }

    /// The first disk's device state (counters, executor).
    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.disks[0].shared
    }

    /// The first disk's consistency-group engine (with `--consistency-groups` or
    /// replication).
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.disks[0].engine.as_ref()
    }

    /// The group the cycle forms (every disk's engine).
    pub fn group(&self) -> Option<&Arc<Group>> {
        self.group.as_ref()
    }

    /// Starts forming consistency groups every `interval`, draining them into `sink`.
    pub fn start_cycle(
        &self,
        sink: Box<dyn ChunkSink>,
        interval: std::time::Duration,
    ) -> anyhow::Result<Cycle> {
        let group = self
            .group()
            .context("consistency groups are not enabled on this server")?;
        Ok(Cycle::start(
            group.clone(),
            sink,
            interval,
            self.ship.clone(),
        ))
    }

    /// The change record's counters: (writes that added an extent to the activity log,
    /// metadata writes, fdatasyncs); None without a record.
    pub fn track_stats(&self) -> Option<(u64, u64, u64)> {
        self.disks[0].record.as_ref().map(|r| {
            let s = r.stats();
            (
                s.al_misses.load(std::sync::atomic::Ordering::Relaxed),
                s.meta_writes.load(std::sync::atomic::Ordering::Relaxed),
                s.syncs.load(std::sync::atomic::Ordering::Relaxed),
            )
        })
    }

    /// A handle that stops the server.
    pub fn shutdown_handle(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Forms a consistency group now (if a cycle runs).
    pub fn trigger_cycle(&self) {
        if let Some(c) = self.control.cycle.lock().expect("cycle lock").as_ref() {
            c.trigger();
        }
    }

    /// Where `/metrics` is served, if it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    /// The daemon's status (what `drblk ctl status` prints).
    pub fn status(&self) -> crate::control::PrimaryStatus {
        self.control.status()
    }

    /// Waits until the server stops (after a shutdown request).
    pub fn join(mut self) -> anyhow::Result<()> {
        // Every disk's accept thread, even after one failed: the others must stop too.
        let mut result = Ok(());
        for d in &mut self.disks {
            let r = match d.thread.take() {
                Some(t) => t
                    .join()
                    .map_err(|_| anyhow::anyhow!("the accept thread panicked"))
                    .and_then(|r| r),
                None => Ok(()),
            };
            if r.is_err() {
                self.shutdown.request();
                result = result.and(r);
            }
        }
        result?;
        if let Some(c) = self.control.cycle.lock().expect("cycle lock").take() {
            c.stop()?;
        }
        // Clean shutdown: no write runs any more, so the records can be made exact.
        for d in &mut self.disks {
            d.refresher.take();
            if let Some(r) = d.record.take() {
                if r.refresh(true).is_ok() {
                    tracing::info!(
                        "change record closed clean: a restart ships exactly the unshipped chunks"
                    );
                }
            }
        }
        Ok(())
    }

    /// Stops the server and waits for it.
    pub fn stop(self) -> anyhow::Result<()> {
        self.shutdown.request();
        self.join()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.request();
        for d in &mut self.disks {
            if let Some(t) = d.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Opens one disk of the daemon: the image, its lineage check, its engine and change
/// record (which seeds the engine before any write), and its device.
fn open_disk(cfg: &ServeConfig, dc: &DiskConfig) -> anyhow::Result<OpenedDisk> {
    let disk = Arc::new(Disk::open(&dc.disk)?);
    // Before any write: a replica or a demoted disk is refused here.
    let lineage = super::role::lineage_for_serve(
        disk.path(),
        disk.readonly(),
        cfg.replication.is_some() || cfg.local_replica.is_some(),
    )?;
    let limits = DeviceLimits::new(
        disk.size(),
        dc.disk.logical_block_size,
        cfg.queues,
        cfg.queue_size,
        disk.readonly(),
    );
    let engine = match &cfg.cg {
        Some(cg) => {
            let source: Arc<dyn ChunkSource> = disk.clone();
            let engine = Engine::new(
                cg.engine_config(disk.size()),
                usize::from(cfg.queues),
                source,
            )
            .with_context(|| format!("consistency groups of {}", disk.path().display()))?;
            Some(engine)
        }
        None => None,
    };
    // The persisted change record goes with replication to a secondary: it decides what a
    // restarted primary ships. It is opened (and seeds the engine) before any write.
    let record = match (&cfg.replication, &engine) {
        (Some(r), Some(engine)) => open_record(r, &disk, engine)?,
        _ => None,
    };
    if record.is_none() && !disk.readonly() {
        drop_untracked_record(disk.path())?;
    }
    let tracking = match (&record, &engine) {
        (Some(rec), _) => Some(rec.tracking()),
        (None, e) => e.clone().map(|e| e as Arc<dyn Tracking>),
    };
    let backing: Arc<dyn crate::blk::backing::Backing> = disk.clone();
    #[cfg(feature = "fault-injection")]
    let backing = crate::blk::fault::wrap(backing);
    let executor = Arc::new(Executor::new(backing, &dc.serial, tracking));
    let shared = Arc::new(DeviceShared {
        executor,
        limits,
        queue_size: cfg.queue_size,
        threads: cfg.threads,
        worker: WorkerOptions { poll: cfg.poll },
        stats: DeviceStats::default(),
    });
    tracing::info!(
        disk = %disk.path().display(),
        size = disk.size(),
        queues = cfg.queues,
        queue_size = cfg.queue_size,
        readonly = disk.readonly(),
        direct = disk.direct(),
        poll_us = cfg.poll.map_or(0, |p| p.as_micros()),
        socket = %dc.socket.display(),
        "serving"
    );
    Ok(OpenedDisk {
        disk,
        lineage,
        engine,
        record,
        shared,
    })
}

/// Builds the link client for `--replicate-to`: the group's disks in order, disk 0's
/// lineage (the group's anchor) in the `Hello`, each disk's record and whether it seeded
/// its engine.
fn replicator_for(
    r: &ReplicationConfig,
    identity: SiteIdentity,
    cg: &CgSettings,
    disks: &[OpenedDisk],
    group: Arc<Group>,
    seeded: Vec<bool>,
) -> anyhow::Result<(Replicator, Arc<LinkStatus>)> {
    let addr = crate::link::resolve(&r.target)?;
    // Fits: checked against the link's 16 MiB limit by the configuration.
    let chunk_size = u32::try_from(cg.chunk_size).context("--chunk-size is too large")?;
    let infos = disks
        .iter()
        .map(|o| {
            let info = DiskInfo {
                uuid: crate::replica::identity::load_or_create(o.disk.path())?,
                size: o.disk.size(),
                chunk_size,
            };
            info.validate()?;
            Ok(info)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut cfg = ClientConfig::new(identity, addr, &r.peer_site, infos[0]);
    cfg.disks = infos;
    cfg.lineage = disks[0].lineage.clone();
    cfg.max_rate = r.max_rate;
    cfg.compress = r.compress;
    cfg.data_streams = r.data_streams;
    cfg.threads = cg.ship.clone();
    let records = disks.iter().map(|o| o.record.clone()).collect();
    let rep = Replicator::new(cfg, group).with_records(records, seeded);
    let status = rep.status();
    Ok((rep, status))
}

/// Opens the change record `--track-file` names (default: next to a file image).
fn open_record(
    r: &ReplicationConfig,
    disk: &Disk,
    engine: &Arc<Engine>,
) -> anyhow::Result<Option<Arc<ChangeRecord>>> {
    let Some(choice) = &r.track_file else {
        tracing::warn!("--no-track-file: a restart of this primary resyncs the whole disk");
        return Ok(None);
    };
    let path = match choice {
        Some(p) => p.clone(),
        None if std::fs::metadata(disk.path()).is_ok_and(|m| m.is_file()) => {
            crate::track::default_record_path(disk.path())
        }
        None => {
            tracing::warn!(disk = %disk.path().display(), "no change record for a block device without --track-file: a restart resyncs the whole disk");
            return Ok(None);
        }
    };
    let uuid = crate::replica::identity::load_or_create(disk.path())?;
    let cfg = TrackConfig {
        path: path.clone(),
        extent_size: r.al_extent_size,
        slots: r.al_extents,
    };
    let (rec, _) = ChangeRecord::open(&cfg, engine.clone(), uuid).with_context(|| {
        format!(
            "writing the change record {} (or pass --no-track-file)",
            path.display()
        )
    })?;
    Ok(Some(rec))
}

/// The disk is written without a change record (not replicated, or `--no-track-file`): a
/// record left next to it (a promoted disk's, an earlier run's) would not see these writes,
/// and a later replication trusting it would miss them. It is removed before any write; the
/// next replication then compares the disks by checksums.
fn drop_untracked_record(image: &std::path::Path) -> anyhow::Result<()> {
    let path = crate::track::default_record_path(image);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::warn!(record = %path.display(), "writes are not tracked in this run: the change record is removed; the next replication compares the disks by checksums");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(anyhow::Error::from(e).context(format!(
            "removing the change record {} (writes in this run would not be in it)",
            path.display()
        ))),
    }
}

/// Runs `drblk serve` until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let probe = Shutdown::default();
    // Signals must be blocked before any thread starts so every thread inherits the mask.
    daemon::install_signal_handler(probe.clone()).context("installing signal handlers")?;
    let server = Server::start(&args)?;
    let handle = server.shutdown_handle();
    std::thread::spawn(move || {
        while !probe.requested() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        handle.request();
    });
    server.join()
}
