//! Live DR drills on the secondary: a writable clone of the last committed group, served as
//! a vhost-user-blk device, while replication goes on.
//!
//! `drblk ctl --control PATH drill start --socket DRILL_SOCKET` starts one (instantly, no
//! copy): a [`view::DrillView`] of the replica image as of its last committed group,
//! installed as the store's image observer under the store's lock (so no group is being
//! applied, and the image holds exactly that group), then served by the same data path as a
//! primary's disk ([`crate::blk`]) on a thread of its own. Later groups keep committing and
//! applying; before each changes a block the drill still reads from the image, the view
//! keeps the old content (copy-on-write on the secondary). `drill stop` ends the view,
//! stops its server and removes its files.
//!
//! # Lifetime
//! - A drill does not survive its daemon: its files (`STATE_DIR/drill/`) are removed when
//!   `drblk secondary` or `drblk promote` starts, and a later drill starts empty.
//! - It ends by itself when the store that holds it is closed (reopened after an error,
//!   replaced, promoted) or when preservation would pass `--drill-space`; the server then
//!   answers every request with an error until the daemon reaps it (within a second) and
//!   says why in the log and in `drill status`.
//! - A promotion stops the drill first: the promoted disk never holds drill writes (they
//!   never reach the image anyway).

pub mod view;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::blk::backing::Backing;
use crate::blk::daemon::{self, Shutdown, SocketLock};
use crate::blk::device::{DeviceShared, DeviceStats};
use crate::blk::execute::Executor;
use crate::blk::queue::WorkerOptions;
use crate::blk::virtio::DeviceLimits;
use crate::config::defaults;
use crate::replica::{ReplicaState, ReplicaStore};
use view::{DrillView, Space};

/// Default limit on a drill's overlay plus preserved bytes.
pub const DEFAULT_SPACE: u64 = 1 << 30;

/// The default directory of a drill's files: inside the replica's state directory.
pub fn drill_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("drill")
}

/// The drill's files in its directory.
const FILES: [&str; 2] = ["overlay", "preserved"];

/// Removes the files of a drill an earlier process left in `dir` (drills do not survive a
/// restart) and says so, and with `remove_dir` the directory too if that leaves it empty;
/// nothing else is touched (a `--drill-dir` is the operator's). Returns whether there
/// were any.
pub fn remove_stale(dir: &Path, remove_dir: bool) -> std::io::Result<bool> {
    let found = remove_files(dir, remove_dir)?;
    if found {
        tracing::info!(dir = %dir.display(), "removed the drill an earlier run left (a drill ends with its daemon; its writes are gone)");
    }
    Ok(found)
}

/// [`remove_stale`] without the log line: a drill's own files at its end.
fn remove_files(dir: &Path, remove_dir: bool) -> std::io::Result<bool> {
    let mut found = false;
    // The other disks' files of a group's drill (`disk_dir`).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let is_disk_dir = name
                .strip_prefix("disk")
                .is_some_and(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()));
            if is_disk_dir && e.path().is_dir() {
                found |= remove_files(&e.path(), true)?;
            }
        }
    }
    for f in FILES {
        match std::fs::remove_file(dir.join(f)) {
            Ok(()) => found = true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if remove_dir {
        // Not empty (someone else's files) or gone: both fine.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(found)
}

/// What `drill status` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillStatus {
    /// A drill is running.
    pub running: bool,
    /// The group the drill shows.
    pub cg: Option<u64>,
    /// Its vhost-user socket (the first disk's, for a group).
    pub socket: Option<String>,
    /// When it started (seconds since the epoch).
    pub started_unix_s: Option<u64>,
    /// How long it has run (seconds).
    pub age_s: Option<f64>,
    /// Bytes the drill wrote (all its disks).
    pub overlay_bytes: u64,
    /// Bytes of the replica kept for the drill (later groups overwrote them).
    pub preserved_bytes: u64,
    /// The limit on both together (`--drill-space`), shared by all its disks.
    pub space_bytes: u64,
    /// Drill writes refused because the space was full.
    pub failed_writes: u64,
    /// A frontend (a VM) is connected (to any of its disks).
    pub frontend_connected: bool,
    /// Why the last drill ended, if it ended by itself.
    pub last_ended: Option<String>,
    /// Each disk of the drill, in the group's order.
    #[serde(default)]
    pub disks: Vec<DrillDiskStatus>,
}

/// One disk of a drill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrillDiskStatus {
    /// Its vhost-user socket.
    pub socket: String,
    /// Bytes the drill wrote to it.
    pub overlay_bytes: u64,
    /// Bytes of its replica kept for the drill.
    pub preserved_bytes: u64,
    /// A frontend is connected to it.
    pub frontend_connected: bool,
}

impl DrillStatus {
    /// No drill running.
    pub fn none(last_ended: Option<String>) -> DrillStatus {
        DrillStatus {
            running: false,
            cg: None,
            socket: None,
            started_unix_s: None,
            age_s: None,
            overlay_bytes: 0,
            preserved_bytes: 0,
            space_bytes: 0,
            failed_writes: 0,
            frontend_connected: false,
            last_ended,
            disks: Vec::new(),
        }
    }
}

/// A running drill: one view and device server per disk of the replica.
pub struct Drill {
    disks: Vec<DrillDisk>,
    space: Arc<Space>,
    dir: PathBuf,
    /// The drill created `dir` (removed with it).
    own_dir: bool,
    cg: u64,
    started: Instant,
    started_at: SystemTime,
}

/// One disk of a drill: its view of the replica and the server of its socket.
struct DrillDisk {
    view: Arc<DrillView>,
    socket: PathBuf,
    shared: Arc<DeviceShared>,
    shutdown: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DrillDisk {
    /// Fails every request from now on (`reason`) and stops the server (a connected
    /// frontend is disconnected).
    fn stop(&mut self, reason: &str) {
        self.view.end(reason);
        self.shutdown.request();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The directory of disk `k`'s files in a drill's directory: the directory itself for the
/// first disk (a one-disk drill's files stay where they always were), `disk<k>` in it for
/// the others.
fn disk_dir(dir: &Path, k: usize) -> PathBuf {
    if k == 0 {
        dir.to_path_buf()
    } else {
        dir.join(format!("disk{k}"))
    }
}

impl Drill {
    /// Starts a drill of `store` (which the caller holds locked: no group is being applied)
    /// with one socket per disk of the replica (`sockets`, in the group's order), its
    /// files in `dir` and at most `space` bytes for all its disks together.
    pub fn start(
        store: &mut ReplicaStore,
        dir: &Path,
        sockets: &[PathBuf],
        space: u64,
    ) -> anyhow::Result<Drill> {
        let cg = match store.state() {
            ReplicaState::Consistent { cg, .. } if cg > 0 => cg,
            ReplicaState::Consistent { .. } | ReplicaState::Syncing { .. } => anyhow::bail!(
                "the replica holds no committed group yet ({}): a drill starts from one; wait until `status` says consistent",
                store.state()
            ),
            ReplicaState::Promoted => {
                anyhow::bail!("the replica is promoted: it is a primary's disk now, drill on a replica")
            }
        };
        if space < view::BLOCK {
            anyhow::bail!(
                "--drill-space {space} is below one block ({} bytes)",
                view::BLOCK
            );
        }
        let n = store.disks();
        if sockets.len() != n {
            anyhow::bail!(
                "this replica is a group of {n} disk(s) and {} drill socket(s) were given: give one --socket per disk, in the group's order (the drill shows every disk at the same group)",
                sockets.len()
            );
        }
        if let Some(k) = (0..n).find(|&k| store.joining(k)) {
            anyhow::bail!(
                "disk {k} of the group ({}) is still copying its first content: a drill starts once every disk holds a committed group",
                store.image_path(k).display()
            );
        }
        // The sockets first: a refusal (in use, given twice) leaves nothing behind.
        let locks = sockets
            .iter()
            .map(|s| SocketLock::acquire(s))
            .collect::<Result<Vec<_>, _>>()?;
        let own_dir = !dir.exists();
        remove_stale(dir, false)
            .with_context(|| format!("removing an old drill in {}", dir.display()))?;
        let shared_space = Space::new(space);
        let cleanup = || {
            let _ = remove_files(dir, own_dir);
        };
        let mut views = Vec::with_capacity(n);
        for k in 0..n {
            let view = DrillView::create(
                store.image_path(k),
                &disk_dir(dir, k),
                store.disk_size(k),
                shared_space.clone(),
            )
            .with_context(|| format!("creating the drill's files in {}", dir.display()));
            views.push(Arc::new(view.inspect_err(|_| cleanup())?));
        }
        // The drill may fill `space` there: not at the cost of the journal (by default on
        // the same filesystem) or of whatever else lives there.
        let room = crate::sys::file::free_bytes(dir).map_err(anyhow::Error::from).and_then(|free| {
            anyhow::ensure!(
                free >= space,
                "{} has {} MiB free, less than the drill's space ({} MiB): the drill could fill it (the replica's journal lives there by default); give a smaller --drill-space or a --drill-dir with room",
                dir.display(),
                free >> 20,
                space >> 20
            );
            Ok(())
        });
        room.inspect_err(|_| cleanup())?;
        let mut bound = Vec::with_capacity(n);
        for lock in locks {
            bound.push(
                lock.bind(defaults::SOCKET_MODE)
                    .inspect_err(|_| cleanup())?,
            );
        }
        // From here every change of an image first keeps what the drill reads. All views
        // are installed under the caller's lock of the store, after the last group was
        // applied to every disk: the images are the drill's group until the next
        // `before_write`, and no group can apply to one disk before the others' views are
        // in place.
        let uninstall = |store: &mut ReplicaStore| {
            for k in 0..n {
                let _ = store.set_image_observer(k, None);
            }
        };
        for (k, view) in views.iter().enumerate() {
            if let Err(e) = store.set_image_observer(k, Some(view.clone())) {
                uninstall(store);
                cleanup();
                return Err(e.into());
            }
        }
        let mut disks: Vec<DrillDisk> = Vec::with_capacity(n);
        for ((view, socket), bound) in views.into_iter().zip(sockets).zip(bound) {
            match serve_view(view.clone(), cg, bound) {
                Ok((shared, shutdown, thread)) => disks.push(DrillDisk {
                    view,
                    socket: socket.clone(),
                    shared,
                    shutdown,
                    thread: Some(thread),
                }),
                Err(e) => {
                    uninstall(store);
                    for d in &mut disks {
                        d.stop("the drill could not start");
                    }
                    cleanup();
                    return Err(e).context("spawning the drill's thread");
                }
            }
        }
        let shown = sockets
            .iter()
            .map(|s| s.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        tracing::info!(cg, sockets = %shown, space, disks = n, "drill started: a writable clone of CG {cg}; replication goes on");
        Ok(Drill {
            disks,
            space: shared_space,
            dir: dir.to_path_buf(),
            own_dir,
            cg,
            started: Instant::now(),
            started_at: SystemTime::now(),
        })
    }

    /// Why the drill ended by itself, if it did (any disk's view ending ends the drill: a
    /// group's clone is usable only whole).
    pub fn ended(&self) -> Option<String> {
        self.disks.iter().find_map(|d| d.view.figures().ended)
    }

    /// The group the drill shows.
    pub fn cg(&self) -> u64 {
        self.cg
    }

    /// Ends every disk's view (every request fails with `reason` from now on): from then
    /// on no read uses the images.
    pub fn end_views(&self, reason: &str) {
        self.disks.iter().for_each(|d| d.view.end(reason));
    }

    /// Its figures.
    pub fn status(&self, last_ended: Option<String>) -> DrillStatus {
        let disks: Vec<(DrillDiskStatus, view::ViewFigures)> = self
            .disks
            .iter()
            .map(|d| {
                let f = d.view.figures();
                let s = DrillDiskStatus {
                    socket: d.socket.display().to_string(),
                    overlay_bytes: f.overlay_bytes,
                    preserved_bytes: f.preserved_bytes,
                    frontend_connected: d
                        .shared
                        .stats
                        .frontends
                        .load(std::sync::atomic::Ordering::SeqCst)
                        > 0,
                };
                (s, f)
            })
            .collect();
        let ended = self.ended();
        DrillStatus {
            running: ended.is_none(),
            cg: Some(self.cg),
            socket: disks.first().map(|d| d.0.socket.clone()),
            started_unix_s: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
            age_s: Some(self.started.elapsed().as_secs_f64()),
            overlay_bytes: disks.iter().map(|d| d.0.overlay_bytes).sum(),
            preserved_bytes: disks.iter().map(|d| d.0.preserved_bytes).sum(),
            space_bytes: self.space.bytes(),
            failed_writes: disks.iter().map(|d| d.1.failed_writes).sum(),
            frontend_connected: disks.iter().any(|d| d.0.frontend_connected),
            last_ended: ended.or(last_ended),
            disks: disks.into_iter().map(|d| d.0).collect(),
        }
    }

    /// Stops the drill: its views fail every request from now on (`reason`), its servers
    /// stop (connected frontends are disconnected) and its files are removed. The caller
    /// removes the views from the store first or after (an ended view keeps nothing more).
    pub fn stop(mut self, reason: &str) -> anyhow::Result<()> {
        for d in &mut self.disks {
            d.stop(reason);
        }
        remove_files(&self.dir, self.own_dir)
            .with_context(|| format!("removing the drill's files in {}", self.dir.display()))?;
        tracing::info!(cg = self.cg, reason, "drill stopped; its writes are gone");
        Ok(())
    }
}

/// Serves `view` (the drill of group `cg`) on `bound` in a thread of its own.
fn serve_view(
    view: Arc<DrillView>,
    cg: u64,
    bound: daemon::BoundSocket,
) -> std::io::Result<(Arc<DeviceShared>, Shutdown, std::thread::JoinHandle<()>)> {
    let limits = DeviceLimits::new(
        view.size(),
        defaults::LOGICAL_BLOCK_SIZE,
        DRILL_QUEUES,
        defaults::QUEUE_SIZE,
        false,
    );
    let shared = Arc::new(DeviceShared {
        executor: Arc::new(Executor::new(view, &format!("drblk-drill-{cg}"), None)),
        limits,
        queue_size: defaults::QUEUE_SIZE,
        threads: 1,
        worker: WorkerOptions { poll: None },
        stats: DeviceStats::default(),
    });
    let shutdown = Shutdown::default();
    let (s2, sd2) = (shared.clone(), shutdown.clone());
    let thread = std::thread::Builder::new()
        .name("drblk-drill".into())
        .spawn(move || {
            // Its workers inherit the niceness (Linux keeps it per thread).
            if let Err(e) = crate::sys::priority::set_current_thread_nice(DRILL_NICE) {
                tracing::warn!(error = %e, "could not lower the drill's CPU priority; it competes with replication as an equal");
            }
            if let Err(e) = daemon::serve(s2, bound, sd2) {
                tracing::error!(error = %e, "the drill's device stopped");
            }
        })?;
    Ok((shared, shutdown, thread))
}

/// The niceness the drill's device is served at. A drill is a test and replication is the
/// protection: when the secondary's CPUs are busy, replication goes first and the drill's
/// I/O waits (a drill busy writing otherwise raised the RPO by a further few percent in
/// the benchmark). Raising a thread's niceness needs no privilege.
pub const DRILL_NICE: i32 = 10;

/// Queues of a drill's device (QEMU's `num-queues` must not exceed it).
pub const DRILL_QUEUES: u16 = 4;
