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
use crate::config::{CgSettings, ReplicationConfig, ServeConfig};
use crate::control::{control_path, ControlServer, ControlState};
use crate::link::{ClientConfig, DiskInfo, SiteIdentity};
use crate::replicate::cycle::{ChunkSink, Cycle};
use crate::replicate::local::LocalReplica;
use crate::replicate::shipper::{LinkStatus, Replicator};
use crate::track::{ChangeRecord, Refresher, TrackConfig};

/// A daemon running in a thread of this process (the CLI, the demo and tests use it).
pub struct Server {
    shared: Arc<DeviceShared>,
    engine: Option<Arc<Engine>>,
    /// The disk's engine as the group the cycle forms (one disk per daemon for now).
    group: Option<Arc<Group>>,
    control: Arc<ControlState>,
    _control_server: ControlServer,
    shutdown: Shutdown,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    ship_nice: i32,
    record: Option<Arc<ChangeRecord>>,
    refresher: Option<Refresher>,
    metrics: Option<crate::metrics::MetricsServer>,
}

impl Server {
    /// Opens the image, binds the socket and starts serving; returns once the socket accepts
    /// connections.
    pub fn start(args: &ServeArgs) -> anyhow::Result<Server> {
        Self::start_with(ServeConfig::try_from(args)?)
    }

    /// [`Server::start`] with a validated configuration.
    pub fn start_with(cfg: ServeConfig) -> anyhow::Result<Server> {
        // Locked first: whoever holds the socket's lock owns its control socket too.
        let socket_lock = SocketLock::acquire(&cfg.socket)?;
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
        let disk = Arc::new(Disk::open(&cfg.disk)?);
        // Before any write: a replica or a demoted disk is refused here.
        let lineage = super::role::lineage_for_serve(
            disk.path(),
            disk.readonly(),
            cfg.replication.is_some() || cfg.local_replica.is_some(),
        )?;
        let limits = DeviceLimits::new(
            disk.size(),
            cfg.disk.logical_block_size,
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
                .context("consistency groups")?;
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
        let executor = Arc::new(Executor::new(backing, &cfg.serial, tracking));
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
            socket = %cfg.socket.display(),
            "serving"
        );
        let control = Arc::new(ControlState {
            shared: shared.clone(),
            engine: engine.clone(),
            cycle: std::sync::Mutex::new(None),
            link: std::sync::Mutex::new(None),
            record: record.clone(),
        });
        let ship_nice = cfg.cg.as_ref().map_or(0, |c| c.ship_nice);
        let group = engine.as_ref().map(|e| Group::single(e.clone()));
        if let (Some(path), Some(group), Some(cg)) = (&cfg.local_replica, &group, &cfg.cg) {
            // Like a secondary's: journal, state and lock in `<replica>.state`, bound to the
            // disk's identity so a replica of another disk is refused.
            let uuid = crate::replica::identity::load_or_create(disk.path())
                .with_context(|| format!("reading the identity of {}", disk.path().display()))?;
            let state_dir = crate::replica::default_state_dir(path);
            let replica = LocalReplica::open(path, &state_dir, disk.size(), cg.chunk_size, uuid)
                .with_context(|| format!("opening the local replica {}", path.display()))?;
            tracing::info!(replica = %path.display(), state_dir = %state_dir.display(), interval = ?cg.interval, "keeping a local crash-consistent replica");
            let cycle = Cycle::start(group.clone(), Box::new(replica), cg.interval, ship_nice);
            *control.cycle.lock().expect("cycle lock") = Some(cycle);
        }
        if let (Some(r), Some(group), Some(cg), Some(identity)) =
            (&cfg.replication, &group, &cfg.cg, identity)
        {
            let (replicator, link) = replicator_for(
                r,
                identity,
                cg,
                &disk,
                group.clone(),
                record.clone(),
                lineage,
            )?;
            tracing::info!(secondary = %replicator.peer(), interval = ?cg.interval, "replicating");
            let cycle = Cycle::start(group.clone(), Box::new(replicator), cg.interval, ship_nice);
            *control.cycle.lock().expect("cycle lock") = Some(cycle);
            *control.link.lock().expect("link lock") = Some(link);
        }
        let control_server = ControlServer::start(
            &control_path(&cfg.socket),
            control.clone() as Arc<dyn crate::control::ControlHandler>,
        )?;
        let metrics = match metrics {
            Some(bound) => {
                let c = control.clone();
                Some(bound.serve(Arc::new(move || {
                    crate::metrics::primary::render(c.status())
                }))?)
            }
            None => None,
        };
        // Listen last: a frontend (or a script waiting for the socket) that can connect finds
        // the control socket and the replication cycle running.
        let socket = socket_lock.bind(cfg.socket_mode)?;
        let shutdown = Shutdown::default();
        let (s2, sd2) = (shared.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name("drblk-accept".into())
            .spawn(move || daemon::serve(s2, socket, sd2).map_err(anyhow::Error::from))
            .context("spawning the accept thread")?;
        let refresher = record
            .as_ref()
            .map(|r| r.start_refresher(std::time::Duration::from_secs(1)));
        Ok(Server {
            shared,
            engine,
            group,
            record,
            refresher,
            control,
            _control_server: control_server,
            shutdown,
            thread: Some(thread),
            ship_nice,
            metrics,
        })
    }

    /// The device state (counters, executor).
    pub fn shared(&self) -> &Arc<DeviceShared> {
        &self.shared
    }

    /// The consistency-group engine (with `--consistency-groups` or replication).
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.as_ref()
    }

    /// The group the cycle forms (the engine's disk alone).
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
        Ok(Cycle::start(group.clone(), sink, interval, self.ship_nice))
    }

    /// The change record's counters: (writes that added an extent to the activity log,
    /// metadata writes, fdatasyncs); None without a record.
    pub fn track_stats(&self) -> Option<(u64, u64, u64)> {
        self.record.as_ref().map(|r| {
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
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("the accept thread panicked"))?,
            None => Ok(()),
        }?;
        if let Some(c) = self.control.cycle.lock().expect("cycle lock").take() {
            c.stop()?;
        }
        // Clean shutdown: no write runs any more, so the record can be made exact.
        self.refresher.take();
        if let Some(r) = self.record.take() {
            if r.refresh(true).is_ok() {
                tracing::info!(
                    "change record closed clean: a restart ships exactly the unshipped chunks"
                );
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
        if let Some(t) = self.thread.take() {
            self.shutdown.request();
            let _ = t.join();
        }
    }
}

/// Builds the link client for `--replicate-to`.
fn replicator_for(
    r: &ReplicationConfig,
    identity: SiteIdentity,
    cg: &CgSettings,
    disk: &Disk,
    group: Arc<Group>,
    record: Option<Arc<ChangeRecord>>,
    lineage: Option<crate::lineage::Lineage>,
) -> anyhow::Result<(Replicator, Arc<LinkStatus>)> {
    let addr = crate::link::resolve(&r.target)?;
    let uuid = crate::replica::identity::load_or_create(disk.path())?;
    let info = DiskInfo {
        uuid,
        size: disk.size(),
        // Fits: checked against the link's 16 MiB limit by the configuration.
        chunk_size: u32::try_from(cg.chunk_size).context("--chunk-size is too large")?,
    };
    info.validate()?;
    let mut cfg = ClientConfig::new(identity, addr, &r.peer_site, info);
    cfg.lineage = lineage;
    cfg.max_rate = r.max_rate;
    cfg.compress = r.compress;
    cfg.data_streams = r.data_streams;
    cfg.thread_nice = cg.ship_nice;
    let rep = Replicator::new(cfg, group).with_record(record);
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
