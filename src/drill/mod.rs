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

use crate::blk::daemon::{self, Shutdown, SocketLock};
use crate::blk::device::{DeviceShared, DeviceStats};
use crate::blk::execute::Executor;
use crate::blk::queue::WorkerOptions;
use crate::blk::virtio::DeviceLimits;
use crate::config::defaults;
use crate::replica::{ReplicaState, ReplicaStore};
use view::DrillView;

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
    /// Its vhost-user socket.
    pub socket: Option<String>,
    /// When it started (seconds since the epoch).
    pub started_unix_s: Option<u64>,
    /// How long it has run (seconds).
    pub age_s: Option<f64>,
    /// Bytes the drill wrote.
    pub overlay_bytes: u64,
    /// Bytes of the replica kept for the drill (later groups overwrote them).
    pub preserved_bytes: u64,
    /// The limit on both together (`--drill-space`).
    pub space_bytes: u64,
    /// Drill writes refused because the space was full.
    pub failed_writes: u64,
    /// A frontend (a VM) is connected.
    pub frontend_connected: bool,
    /// Why the last drill ended, if it ended by itself.
    pub last_ended: Option<String>,
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
        }
    }
}

/// A running drill: its view and the server of its socket.
pub struct Drill {
    view: Arc<DrillView>,
    dir: PathBuf,
    /// The drill created `dir` (removed with it).
    own_dir: bool,
    cg: u64,
    socket: PathBuf,
    shared: Arc<DeviceShared>,
    shutdown: Shutdown,
    thread: Option<std::thread::JoinHandle<()>>,
    started: Instant,
    started_at: SystemTime,
}

impl Drill {
    /// Starts a drill of `store` (which the caller holds locked: no group is being applied)
    /// on `socket`, with its files in `dir` and at most `space` bytes.
    pub fn start(
        store: &mut ReplicaStore,
        dir: &Path,
        socket: &Path,
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
        if store.disks() > 1 {
            // doc/design/multi-disk-groups.md step 9: one view per disk, installed together.
            anyhow::bail!(
                "this replica is a group of {} disks: drills on a group are not supported yet",
                store.disks()
            );
        }
        // The socket first: a refusal (in use) leaves nothing behind.
        let lock = SocketLock::acquire(socket)?;
        let own_dir = !dir.exists();
        remove_stale(dir, false)
            .with_context(|| format!("removing an old drill in {}", dir.display()))?;
        let size = store.disk_size(0);
        let view = DrillView::create(store.image_path(0), dir, size, space)
            .with_context(|| format!("creating the drill's files in {}", dir.display()))
            .and_then(|v| {
                // The drill may fill `space` there: not at the cost of the journal (by
                // default on the same filesystem) or of whatever else lives there.
                let free = crate::sys::file::free_bytes(dir)?;
                anyhow::ensure!(
                    free >= space,
                    "{} has {} MiB free, less than the drill's space ({} MiB): the drill could fill it (the replica's journal lives there by default); give a smaller --drill-space or a --drill-dir with room",
                    dir.display(),
                    free >> 20,
                    space >> 20
                );
                Ok(Arc::new(v))
            });
        let cleanup = || {
            let _ = remove_files(dir, own_dir);
        };
        let view = view.inspect_err(|_| cleanup())?;
        let limits = DeviceLimits::new(
            size,
            defaults::LOGICAL_BLOCK_SIZE,
            DRILL_QUEUES,
            defaults::QUEUE_SIZE,
            false,
        );
        let shared = Arc::new(DeviceShared {
            executor: Arc::new(Executor::new(
                view.clone(),
                &format!("drblk-drill-{cg}"),
                None,
            )),
            limits,
            queue_size: defaults::QUEUE_SIZE,
            threads: 1,
            worker: WorkerOptions { poll: None },
            stats: DeviceStats::default(),
        });
        let bound = lock
            .bind(defaults::SOCKET_MODE)
            .inspect_err(|_| cleanup())?;
        // From here every change of the image first keeps what the drill reads. Installed
        // under the caller's lock of the store, after the last group was applied: the image
        // is the drill's group until the next `before_write`.
        store.set_image_observer(0, Some(view.clone()))?;
        let shutdown = Shutdown::default();
        let (s2, sd2) = (shared.clone(), shutdown.clone());
        let thread = std::thread::Builder::new()
            .name("drblk-drill".into())
            .spawn(move || {
                if let Err(e) = daemon::serve(s2, bound, sd2) {
                    tracing::error!(error = %e, "the drill's device stopped");
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = store.set_image_observer(0, None);
                cleanup();
                return Err(e).context("spawning the drill's thread");
            }
        };
        tracing::info!(cg, socket = %socket.display(), space, "drill started: a writable clone of CG {cg}; replication goes on");
        Ok(Drill {
            view,
            dir: dir.to_path_buf(),
            own_dir,
            cg,
            socket: socket.to_path_buf(),
            shared,
            shutdown,
            thread: Some(thread),
            started: Instant::now(),
            started_at: SystemTime::now(),
        })
    }

    /// Why the drill ended by itself, if it did.
    pub fn ended(&self) -> Option<String> {
        self.view.figures().ended
    }

    /// The group the drill shows.
    pub fn cg(&self) -> u64 {
        self.cg
    }

    /// The view (the store's observer while the drill runs).
    pub fn view(&self) -> &Arc<DrillView> {
        &self.view
    }

    /// Its figures.
    pub fn status(&self, last_ended: Option<String>) -> DrillStatus {
        let f = self.view.figures();
        DrillStatus {
            running: f.ended.is_none(),
            cg: Some(self.cg),
            socket: Some(self.socket.display().to_string()),
            started_unix_s: self
                .started_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs()),
            age_s: Some(self.started.elapsed().as_secs_f64()),
            overlay_bytes: f.overlay_bytes,
            preserved_bytes: f.preserved_bytes,
            space_bytes: self.view.space(),
            failed_writes: f.failed_writes,
            frontend_connected: self
                .shared
                .stats
                .frontends
                .load(std::sync::atomic::Ordering::SeqCst)
                > 0,
            last_ended: f.ended.or(last_ended),
        }
    }

    /// Stops the drill: its view fails every request from now on (`reason`), its server
    /// stops (a connected frontend is disconnected) and its files are removed. The caller
    /// removes the view from the store first or after (an ended view keeps nothing more).
    pub fn stop(mut self, reason: &str) -> anyhow::Result<()> {
        self.view.end(reason);
        self.shutdown.request();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        remove_files(&self.dir, self.own_dir)
            .with_context(|| format!("removing the drill's files in {}", self.dir.display()))?;
        tracing::info!(cg = self.cg, reason, "drill stopped; its writes are gone");
        Ok(())
    }
}

/// Queues of a drill's device (QEMU's `num-queues` must not exceed it).
pub const DRILL_QUEUES: u16 = 4;
