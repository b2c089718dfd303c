//! `drblk serve`: assemble the device from its options and run the daemon.

use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::Context;

use crate::blk::daemon::{self, BoundSocket, Shutdown};
use crate::blk::device::{DeviceShared, DeviceStats};
use crate::blk::disk::Disk;
use crate::blk::execute::Executor;
use crate::blk::queue::WorkerOptions;
use crate::blk::tracking::Tracking;
use crate::blk::virtio::DeviceLimits;
use crate::cg::{CgConfig, ChunkSource, Engine};
use crate::cli::ServeArgs;
use crate::control::{control_path, ControlServer, ControlState};
use crate::link::{ClientConfig, DiskInfo, SiteIdentity};
use crate::replicate::cycle::{ChunkSink, Cycle};
use crate::replicate::local::LocalReplica;
use crate::replicate::shipper::{LinkStatus, Replicator};

/// A daemon running in a thread of this process (the CLI, the demo and tests use it).
pub struct Server {
    shared: Arc<DeviceShared>,
    engine: Option<Arc<Engine>>,
    control: Arc<ControlState>,
    _control_server: ControlServer,
    shutdown: Shutdown,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    ship_nice: i32,
}

impl Server {
    /// Opens the image, binds the socket and starts serving; returns once the socket accepts
    /// connections.
    pub fn start(args: &ServeArgs) -> anyhow::Result<Server> {
        let disk = Arc::new(Disk::open(&args.disk_options())?);
        let limits = DeviceLimits::new(
            disk.size(),
            args.logical_block_size,
            args.queues,
            args.queue_size,
            disk.readonly(),
        );
        let replicate = args.replication.replicate_to.is_some();
        let engine = if args.cg.consistency_groups || args.cg.local_replica.is_some() || replicate {
            let cfg = CgConfig {
                disk_size: disk.size(),
                chunk_size: args.cg.chunk_size,
                max_coordination_time: args.cg.max_coordination_time,
                max_drain_time: args.cg.max_drain_time,
                cow_cache_limit: usize::try_from(args.cg.cow_cache_limit).unwrap_or(usize::MAX),
            };
            let source: Arc<dyn ChunkSource> = disk.clone();
            Some(Engine::new(cfg, usize::from(args.queues), source).context("consistency groups")?)
        } else {
            None
        };
        let tracking = engine.clone().map(|e| e as Arc<dyn Tracking>);
        let executor = Arc::new(Executor::new(disk.clone(), &args.serial(), tracking));
        let shared = Arc::new(DeviceShared {
            executor,
            limits,
            queue_size: args.queue_size,
            threads: args.threads(),
            worker: WorkerOptions { poll: args.poll() },
            stats: DeviceStats::default(),
        });
        let socket = BoundSocket::bind(&args.socket, args.socket_mode)?;
        tracing::info!(
            disk = %disk.path().display(),
            size = disk.size(),
            queues = args.queues,
            queue_size = args.queue_size,
            readonly = disk.readonly(),
            direct = disk.direct(),
            poll_us = args.poll_us,
            socket = %args.socket.display(),
            "serving"
        );
        let control = Arc::new(ControlState {
            shared: shared.clone(),
            engine: engine.clone(),
            cycle: std::sync::Mutex::new(None),
            link: std::sync::Mutex::new(None),
        });
        if let (Some(path), Some(engine)) = (&args.cg.local_replica, &engine) {
            // Like a secondary's: journal, state and lock in `<replica>.state`, bound to the
            // disk's identity so a replica of another disk is refused.
            let uuid = crate::replica::identity::load_or_create(disk.path())
                .with_context(|| format!("reading the identity of {}", disk.path().display()))?;
            let state_dir = crate::replica::default_state_dir(path);
            let replica =
                LocalReplica::open(path, &state_dir, disk.size(), args.cg.chunk_size, uuid)
                    .with_context(|| format!("opening the local replica {}", path.display()))?;
            tracing::info!(replica = %path.display(), state_dir = %state_dir.display(), interval = ?args.cg.cg_interval, "keeping a local crash-consistent replica");
            let cycle = Cycle::start(
                engine.clone(),
                Box::new(replica),
                args.cg.cg_interval,
                args.cg.ship_nice,
            );
            *control.cycle.lock().expect("cycle lock") = Some(cycle);
        }
        if let (Some(target), Some(engine)) = (&args.replication.replicate_to, &engine) {
            let (replicator, link) = replicator_for(args, &disk, target, engine.clone())?;
            tracing::info!(secondary = %replicator.peer(), interval = ?args.cg.cg_interval, "replicating");
            let cycle = Cycle::start(
                engine.clone(),
                Box::new(replicator),
                args.cg.cg_interval,
                args.cg.ship_nice,
            );
            *control.cycle.lock().expect("cycle lock") = Some(cycle);
            *control.link.lock().expect("link lock") = Some(link);
        }
        let control_server = ControlServer::start(&control_path(&args.socket), control.clone())?;
        let shutdown = Shutdown::default();
        let (s2, sd2) = (shared.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name("drblk-accept".into())
            .spawn(move || daemon::serve(s2, socket, sd2).map_err(anyhow::Error::from))
            .context("spawning the accept thread")?;
        Ok(Server {
            shared,
            engine,
            control,
            _control_server: control_server,
            shutdown,
            thread: Some(thread),
            ship_nice: args.cg.ship_nice,
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

    /// Starts forming consistency groups every `interval`, draining them into `sink`.
    pub fn start_cycle(
        &self,
        sink: Box<dyn ChunkSink>,
        interval: std::time::Duration,
    ) -> anyhow::Result<Cycle> {
        let engine = self
            .engine()
            .context("consistency groups are not enabled on this server")?;
        Ok(Cycle::start(engine.clone(), sink, interval, self.ship_nice))
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

    /// The daemon's status (what `drblk ctl status` prints).
    pub fn status(&self) -> serde_json::Value {
        crate::control::status(&self.control)
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
    args: &ServeArgs,
    disk: &Disk,
    target: &str,
    engine: Arc<Engine>,
) -> anyhow::Result<(Replicator, Arc<LinkStatus>)> {
    let r = &args.replication;
    let addr = crate::site::secondary::resolve(target)?;
    let identity = SiteIdentity::load(&r.certs, &r.site).with_context(|| {
        format!(
            "loading this site's certificate ({}/{}.pem); create one with `drblk cert --dir {} --sites {},{}`",
            r.certs.display(),
            r.site,
            r.certs.display(),
            r.site,
            r.peer_site
        )
    })?;
    let uuid = crate::replica::identity::load_or_create(disk.path())?;
    let info = DiskInfo {
        uuid,
        size: disk.size(),
        chunk_size: u32::try_from(args.cg.chunk_size).context("--chunk-size is too large")?,
    };
    info.validate()?;
    let mut cfg = ClientConfig::new(identity, addr, &r.peer_site, info);
    cfg.max_rate = r.max_rate;
    cfg.compress = r.compress;
    cfg.data_streams = usize::from(r.data_streams);
    cfg.thread_nice = args.cg.ship_nice;
    let rep = Replicator::new(cfg, engine);
    let status = rep.status();
    Ok((rep, status))
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
