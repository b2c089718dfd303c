//! `drblk secondary`: the site that receives consistency groups over the link and keeps the
//! replica in a [`ReplicaStore`]. Only committed groups ever reach the image.
//!
//! The replica is opened at the first `Hello` (a new secondary adopts the primary's disk
//! identity; an existing one refuses any other disk). While the replica is syncing, chunks
//! are written straight into the image and the first committed group ends the sync; after
//! that every group is staged in the journal and applied when it commits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};

use anyhow::Context;

use crate::control::{reply, ControlHandler, ControlServer, Promoted, Request, SecondaryStatus};
use crate::lineage::{Decision, Lineage, Role};
use crate::link::server::PeerInfo;
use crate::link::{
    ChunkData as WireChunk, DiskAck, DiskState, Hello, HelloAck, LinkServer, RejectReason,
    ReplicaSink, ServerConfig, SiteIdentity, PROTOCOL_VERSION,
};
use crate::replica::identity::uuid_hex;
use crate::replica::{ChunkData, Error as StoreError, GroupSpec, ReplicaState, ReplicaStore};
use crate::site::promote::{promote_store, Promotion};
use crate::site::rejoin::Target;

mod drill;

/// Where the secondary keeps its replica.
#[derive(Clone, Debug)]
pub struct SecondaryPaths {
    /// The replica images, one per disk of the primary's group, in its order (one disk:
    /// one image). The first is the group's anchor: its lineage speaks for the group.
    pub images: Vec<PathBuf>,
    /// Journal, state file and lock.
    pub state_dir: PathBuf,
    /// The operator's word that this disk's own writes may be discarded when the lineages
    /// say it rejoins from behind (an old primary), diverged (split brain) or is unrelated:
    /// it then takes the primary's copy as one staged group.
    pub discard_local_changes: bool,
    /// Images to take out of the replica's group when it is opened (`--remove-disk`): each
    /// is left holding the last committed group and is not written any more.
    pub remove: Vec<PathBuf>,
}

impl SecondaryPaths {
    /// The first disk's image (the group's anchor).
    pub fn image(&self) -> &Path {
        &self.images[0]
    }
}

/// The link-facing side of a replica store.
pub struct StoreSink {
    paths: SecondaryPaths,
    site: String,
    store: Mutex<Option<ReplicaStore>>,
    on_commit: Option<CommitObserver>,
    /// The `HelloAck` asked for this disk's own writes (see `resync_also`): the old
    /// primary's change record is removed once a group has committed.
    tail_pending: std::sync::atomic::AtomicBool,
    /// This process promoted its replica (`drblk ctl --control PATH promote`): the disk is
    /// being served now, so no primary may write it, whatever the flags say.
    promoted_here: std::sync::atomic::AtomicBool,
    /// Per image: this process created it (empty); a sync copies it, comparing first
    /// would only read zeroes.
    fresh_images: Mutex<Vec<bool>>,
    /// `--discard-local-changes` was used once: it does not apply to a later handshake
    /// (a standing flag must not discard writes made after that).
    discard_used: std::sync::atomic::AtomicBool,
    /// The running drill (`crate::drill`); lock before `store`.
    drill: Mutex<Option<crate::drill::Drill>>,
    /// Why the last drill ended by itself.
    last_drill_end: Mutex<Option<String>>,
    /// Default `--drill-space`.
    drill_space: std::sync::atomic::AtomicU64,
    /// `--drill-dir` (None: STATE_DIR/drill).
    drill_dir: Mutex<Option<PathBuf>>,
    /// The control socket's path (for the hints in refusals).
    control: Mutex<Option<PathBuf>>,
    /// What the status and `/metrics` count.
    counters: SinkCounters,
}

/// The secondary's counters since start.
#[derive(Default)]
struct SinkCounters {
    connected: std::sync::atomic::AtomicBool,
    connections: std::sync::atomic::AtomicU64,
    groups_committed: std::sync::atomic::AtomicU64,
    received_bytes: std::sync::atomic::AtomicU64,
    /// Received for the group being staged (moved to `applied_bytes` at its commit).
    staged_bytes: std::sync::atomic::AtomicU64,
    applied_bytes: std::sync::atomic::AtomicU64,
    commit: crate::metrics::histogram::Histogram,
    /// Groups that failed in the store (see `SecondaryStatus::store_failures`).
    store_failures: std::sync::atomic::AtomicU64,
    /// The group of the last `NoSpace` counted: its other extents (other data streams)
    /// fail alike and are not counted again.
    last_no_space_cg: std::sync::atomic::AtomicU64,
    store_error: Mutex<Option<String>>,
}

/// Called after each group was committed and applied, with its number and the image paths
/// in the group's order (tests check the images there; nothing else touches them
/// meanwhile).
pub type CommitObserver = Box<dyn Fn(u64, &[PathBuf]) + Send + Sync>;

impl StoreSink {
    /// A sink that opens the replica at `paths` on the first `Hello`.
    pub fn new(paths: SecondaryPaths, site: &str, on_commit: Option<CommitObserver>) -> Arc<Self> {
        Arc::new(StoreSink {
            paths,
            site: site.to_owned(),
            store: Mutex::new(None),
            on_commit,
            tail_pending: Default::default(),
            promoted_here: Default::default(),
            fresh_images: Default::default(),
            discard_used: Default::default(),
            drill: Mutex::new(None),
            last_drill_end: Mutex::new(None),
            drill_space: crate::drill::DEFAULT_SPACE.into(),
            drill_dir: Mutex::new(None),
            control: Mutex::new(None),
            counters: SinkCounters::default(),
        })
    }

    /// Opens an existing replica now (a restarted secondary reports its state at once).
    pub fn open_existing(&self) -> anyhow::Result<()> {
        let Some(group) = crate::replica::stored_group(&self.paths.state_dir)? else {
            return Ok(());
        };
        if !self.paths.remove.is_empty() {
            return self.open_removing(&group);
        }
        // More images than the group has: the extra ones join it when the primary connects
        // with as many disks (`add_disk`). Fewer: refused (the group keeps every disk).
        let k = group.disks.len().min(self.paths.images.len());
        let spec = group.spec(&self.paths.images[..k]).with_context(|| {
            format!(
                "the replica in {} is a group of {} disks: give each of its images with \
                 --disk, in the group's order",
                self.paths.state_dir.display(),
                group.disks.len()
            )
        })?;
        if self.paths.images.len() > k {
            tracing::info!(
                group = k,
                given = self.paths.images.len(),
                "more --disk than the replica's group has: the new ones join the group when the primary connects with them"
            );
        }
        let (store, report) = ReplicaStore::open(&spec, &self.paths.state_dir)?;
        tracing::info!(?report, state = ?store.state(), "replica recovered");
        *self.store.lock().expect("store lock") = Some(store);
        Ok(())
    }

    /// `--remove-disk`: opens the whole group (the removed disks' images as the state names
    /// them, the others from `--disk` in order), which recovers it, then takes those disks
    /// out (see `ReplicaStore::remove_disks`).
    fn open_removing(&self, group: &crate::replica::StoredGroup) -> anyhow::Result<()> {
        let same = |a: &Path, b: &Path| {
            a == b
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(b)),
                    (Ok(x), Ok(y)) if x == y
                )
        };
        let mut given = self.paths.images.iter();
        let (mut all, mut gone) = (Vec::new(), Vec::new());
        for (d, disk) in group.disks.iter().enumerate() {
            match disk
                .image
                .as_ref()
                .filter(|i| self.paths.remove.iter().any(|r| same(r, i)))
            {
                Some(i) => {
                    all.push(i.clone());
                    gone.push(d);
                }
                None => all.push(given.next().cloned().with_context(|| {
                    format!(
                        "the replica's group has {} disks and --remove-disk takes {} out: give \
                         the others with --disk, in the group's order",
                        group.disks.len(),
                        gone.len()
                    )
                })?),
            }
        }
        if gone.len() != self.paths.remove.len() {
            let theirs: Vec<String> = group
                .disks
                .iter()
                .filter_map(|d| d.image.as_ref().map(|i| i.display().to_string()))
                .collect();
            anyhow::bail!(
                "--remove-disk names an image that is not a disk of the replica's group in {} \
                 (its disks: {})",
                self.paths.state_dir.display(),
                theirs.join(", ")
            );
        }
        let spec = group.spec(&all)?;
        let (mut store, report) = ReplicaStore::open(&spec, &self.paths.state_dir)?;
        tracing::info!(?report, state = ?store.state(), "replica recovered");
        let cg = store.remove_disks(&gone).with_context(|| {
            format!("taking {} out of the group", self.paths.remove[0].display())
        })?;
        for r in &self.paths.remove {
            tracing::warn!(image = %r.display(), cg, "--remove-disk: the disk is out of the group; its image holds CG {cg} and is not replicated any more");
        }
        *self.store.lock().expect("store lock") = Some(store);
        Ok(())
    }

    /// Compares the primary's lineage with this disk's before anything is written (see
    /// [`crate::lineage::decide`]): refuses what needs the operator's word, adopts an old
    /// primary's image that may rejoin, and records the primary's generation as this
    /// replica's. `Err`: the refusal, for the log and the primary.
    fn judge_lineage(
        &self,
        hello: &Hello,
        peer: &PeerInfo,
        store: &mut Option<ReplicaStore>,
    ) -> Result<(), String> {
        let image = self.paths.image();
        if self.promoted_here.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(format!(
                "the secondary was promoted (through its control socket) and its disk {} is a primary now: it takes no replication; stop this `drblk secondary`",
                image.display()
            ));
        }
        let mine = Lineage::load(image).map_err(|e| e.to_string())?;
        // A store promoted here is no replica any more: the lineage says what the disk is
        // (the store stays open for the status until something replaces it).
        let replica = store
            .as_ref()
            .filter(|s| s.state() != ReplicaState::Promoted);
        if store.is_some() && replica.is_none() && mine.is_none() {
            return Err(RejectReason::Promoted.to_string());
        }
        let target = match (replica, mine) {
            (Some(s), l) => Target::replica(l, s.last_committed_cg()),
            (None, Some(l)) if l.role != Role::Secondary => Target::image(image, l),
            (None, l) => Target::replica(l, None),
        };
        let is_replica = replica.is_some();
        let decision = target.decide(hello);
        let adopt_at = match decision {
            None => None,
            Some(d) if d.proceeds() => match (d, is_replica, target.role) {
                // An old primary's image at the point the primary's generation began.
                (Decision::Incremental { from_cg }, false, r) if r != Role::Secondary => {
                    Some(from_cg)
                }
                _ => None,
            },
            Some(d)
                if self.paths.discard_local_changes
                    && !self
                        .discard_used
                        .swap(true, std::sync::atomic::Ordering::SeqCst) =>
            {
                tracing::warn!(peer = %peer.site, decision = ?d, lost_chunks = target.tail_chunks, "--discard-local-changes: this disk's own writes are discarded; it takes the primary's copy as one staged group and stays whole until that commits");
                *store = None;
                match d {
                    // The primary's generation began at p: this disk holds p plus its own
                    // writes since its acknowledged CG, which its change record lists and
                    // the HelloAck asks the primary to ship.
                    Decision::DiscardTarget { full: false, .. } => {
                        let mine = target.lineage.as_ref().map(|l| l.generation);
                        hello.lineage.as_ref().and_then(|src| {
                            src.history
                                .iter()
                                .find(|a| Some(a.generation) == mine)
                                .map(|a| a.until_cg)
                        })
                    }
                    _ => None,
                }
                // CG 0 is no group of the primary's: it resyncs everything, staged.
                .or(Some(0))
            }
            Some(d) => {
                let mut why = target.refusal(d, image, &peer.site, hello);
                if self.paths.discard_local_changes {
                    why.push_str(" (this process already used its --discard-local-changes once: restart it to give it again)");
                }
                return Err(why);
            }
        };
        if let Some(cg) = adopt_at {
            // Releases the state directory's lock (a promoted store left open).
            *store = None;
            let spec = self.spec_of(hello);
            let (s, _) = ReplicaStore::adopt(&spec, &self.paths.state_dir, cg)
                .map_err(|e| format!("cannot take {} in as a replica: {e}", image.display()))?;
            tracing::info!(disk = %image.display(), disks = spec.disks.len(), cg, "disk taken in as a replica, consistent at CG {cg}");
            *store = Some(s);
        }
        // From here the disks are a replica of the primary's generation; every image of the
        // group holds the same lineage. Written after the store is settled: a crash in
        // between leaves a store whose lineage is re-judged (by the anchor's).
        if let Some(src) = &hello.lineage {
            for image in &self.paths.images {
                let current = Lineage::load(image).ok().flatten();
                if current
                    .as_ref()
                    .is_none_or(|l| l.role != Role::Secondary || l.generation != src.generation)
                {
                    let l = Lineage::replica_of(src.generation, &src.history);
                    l.store(image)
                        .map_err(|e| format!("writing the lineage of {}: {e}", image.display()))?;
                    tracing::info!(disk = %image.display(), lineage = %l.describe(), "replica of the primary's generation");
                }
            }
        }
        Ok(())
    }

    /// The store's group for `hello`: its disks' identities with this secondary's images,
    /// in order (the caller checked they are as many).
    fn spec_of(&self, hello: &Hello) -> GroupSpec {
        GroupSpec {
            disks: hello
                .disks
                .iter()
                .zip(&self.paths.images)
                .map(|(d, image)| crate::replica::DiskSpec {
                    image: image.clone(),
                    uuid: d.uuid,
                    size: d.size,
                })
                .collect(),
            chunk_size: u64::from(hello.chunk_size),
        }
    }

    /// Creates (sparse) the images of `disks`, the group's disks from index `first` on,
    /// that are missing or short, and remembers which were new (nothing in them worth
    /// comparing). `Err`: the refusal's text.
    fn prepare_images(
        &self,
        first: usize,
        disks: &[crate::replica::DiskSpec],
    ) -> Result<(), String> {
        for (i, d) in (first..).zip(disks) {
            match ensure_image(&d.image, d.size) {
                Ok(fresh) => {
                    let mut f = self.fresh_images.lock().expect("fresh images");
                    if f.len() < self.paths.images.len() {
                        f.resize(self.paths.images.len(), false);
                    }
                    f[i] = fresh;
                }
                Err(e) => {
                    if let Some(a) = IMAGE_FAILURES.admit() {
                        tracing::error!(error = %e, "cannot prepare the replica image{}", a.note());
                    }
                    return Err(format!("{e:#}"));
                }
            }
        }
        Ok(())
    }

    /// Refuses a primary whose group is not this secondary's disks: another number of
    /// disks (with what to give on the command line).
    fn check_group(&self, hello: &Hello) -> Result<(), RejectReason> {
        let (theirs, ours) = (hello.disks.len(), self.paths.images.len());
        if theirs == 0 {
            return Err(RejectReason::Other("the Hello announces no disk".into()));
        }
        if theirs != ours {
            let hint = if theirs < ours {
                "; to take a disk out of the group, restart this secondary without its --disk \
                 and with --remove-disk IMAGE"
            } else {
                ""
            };
            return Err(RejectReason::Other(format!(
                "the primary replicates a group of {theirs} disk{}; this secondary keeps {ours} \
                 ({}): give `drblk secondary` one --disk per disk of the primary, in the order \
                 of the primary's --disk options{hint}",
                if theirs == 1 { "" } else { "s" },
                self.paths
                    .images
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    fn with_store<T>(
        &self,
        f: impl FnOnce(&mut ReplicaStore) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let mut g = self.store.lock().expect("store lock");
        let Some(store) = g.as_mut() else {
            // Dropped by a failure of this connection (another data stream's extent): say
            // that failure again, not "no replica".
            if let Some(e) = self
                .counters
                .store_error
                .lock()
                .expect("counters lock")
                .clone()
            {
                anyhow::bail!("{e} (the replica reopens at the next connection)");
            }
            anyhow::bail!("no replica open (no Hello yet)");
        };
        match f(store) {
            Ok(v) => Ok(v),
            Err(e) => {
                // A failed store call poisons it: drop it so the next Hello reopens it, which
                // runs recovery. A call refused for the store's state (a promoted replica),
                // or for want of room before anything was written, changed nothing: keep it.
                let store_error = e.downcast_ref::<StoreError>();
                if store_error.is_some_and(|e| {
                    !matches!(e, StoreError::InvalidState(_) | StoreError::NoSpace { .. })
                }) {
                    *g = None;
                }
                if store_error.is_some_and(|e| !matches!(e, StoreError::InvalidState(_))) {
                    let again = match store_error {
                        Some(StoreError::NoSpace { cg, .. }) => {
                            self.counters.last_no_space_cg.swap(*cg, Relaxed) == *cg
                        }
                        _ => false,
                    };
                    let e = explain_full_disk(e, &self.paths.state_dir);
                    if !again {
                        self.counters.store_failures.fetch_add(1, Relaxed);
                    }
                    *self.counters.store_error.lock().expect("counters lock") =
                        Some(format!("{e:#}"));
                    return Err(e);
                }
                Err(e)
            }
        }
    }
}

impl StoreSink {
    /// A line for operators: "syncing 42.0 %", "consistent at CG 7 (primary's state as of
    /// 0.3 s ago)", or why there is no replica yet.
    pub fn describe(&self) -> String {
        describe_store(self.store.lock().expect("store lock").as_ref())
    }

    /// Failover on a running secondary: promotes the open replica (see
    /// [`crate::site::promote`]). The primary's session, if any, fails at its next extent
    /// and every later handshake is refused.
    pub fn promote(&self, force: bool) -> anyhow::Result<Promotion> {
        // Held until `promoted_here` is set: no drill starts during the promotion.
        let mut drill = self.drill.lock().expect("drill lock");
        self.stop_drill_for_promotion(&mut drill);
        let mut g = self.store.lock().expect("store lock");
        let store = g
            .as_mut()
            .context("no replica here yet: no primary ever connected")?;
        let group = crate::replica::stored_group(&self.paths.state_dir)?
            .context("the replica's state.json is gone")?;
        let lineage = Lineage::load(self.paths.image())?;
        let uuids: Vec<_> = group.disks.iter().map(|d| d.uuid).collect();
        let p = promote_store(store, &uuids, lineage, force)?;
        self.promoted_here
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Ok(p)
    }

    /// What `drblk ctl --control PATH status` answers.
    pub fn status_view(&self) -> SecondaryStatus {
        // One look at the store: its state, line and figures agree.
        let (state, cg, opened, chunk_size, journal_bytes, line) = {
            let g = self.store.lock().expect("store lock");
            let line = describe_store(g.as_ref());
            match g.as_ref() {
                Some(s) => (
                    s.state(),
                    s.last_committed_cg(),
                    true,
                    s.chunk_size(),
                    s.journal_bytes(),
                    line,
                ),
                None => (
                    ReplicaState::Syncing {
                        done_chunks: 0,
                        total_chunks: 0,
                    },
                    None,
                    false,
                    0,
                    0,
                    line,
                ),
            }
        };
        let age = match state {
            ReplicaState::Consistent {
                frozen_at_unix_us, ..
            } if frozen_at_unix_us > 0 => Some(
                crate::sys::clock::now_unix_micros().saturating_sub(frozen_at_unix_us) as f64 / 1e3,
            ),
            _ => None,
        };
        let drill = self.drill_status();
        let c = &self.counters;
        SecondaryStatus {
            disk: self.paths.image().display().to_string(),
            state_dir: self.paths.state_dir.display().to_string(),
            state: line,
            last_committed_cg: cg,
            primary_state_age_ms: age,
            lineage: Lineage::load(self.paths.image()).ok().flatten(),
            replica: opened.then_some(state),
            chunk_size,
            primary_connected: c.connected.load(Relaxed),
            connections: c.connections.load(Relaxed),
            groups_committed: c.groups_committed.load(Relaxed),
            received_bytes: c.received_bytes.load(Relaxed),
            applied_bytes: c.applied_bytes.load(Relaxed),
            journal_bytes,
            commit_seconds: c.commit.snapshot(),
            store_failures: c.store_failures.load(Relaxed),
            store_error: c.store_error.lock().expect("counters lock").clone(),
            drill: drill.running.then_some(drill),
        }
    }
}

/// The state line of a replica (or of none yet).
fn describe_store(store: Option<&ReplicaStore>) -> String {
    match store {
        None => "no replica yet: waiting for the primary's first connection".into(),
        Some(s) => match s.state() {
            ReplicaState::Syncing {
                done_chunks,
                total_chunks,
            } => format!(
                "inconsistent, syncing {:.1} % ({done_chunks} of {total_chunks} chunks)",
                if total_chunks > 0 {
                    done_chunks as f64 * 100.0 / total_chunks as f64
                } else {
                    0.0
                }
            ),
            ReplicaState::Consistent {
                cg,
                frozen_at_unix_us,
            } => {
                let now = crate::sys::clock::now_unix_micros();
                let mut line = format!(
                    "consistent at CG {cg} (the primary's state as of {:.1} s ago)",
                    now.saturating_sub(frozen_at_unix_us) as f64 / 1e6
                );
                // A disk joining the group is not in that cut yet.
                for d in 0..s.disks() {
                    if let Some((done, all)) = s.join_progress(d) {
                        line += &format!(
                            "; disk {d} ({}) joining the group, copied {:.1} %",
                            s.image_path(d).display(),
                            done as f64 * 100.0 / all.max(1) as f64
                        );
                    }
                }
                line
            }
            ReplicaState::Promoted => "promoted".into(),
        },
    }
}

/// The secondary's control socket.
struct SecondaryControl {
    sink: Arc<StoreSink>,
}

impl ControlHandler for SecondaryControl {
    fn handle(&self, req: Request) -> anyhow::Result<String> {
        match req {
            Request::Status => reply(self.sink.status_view()),
            Request::Promote { force } => {
                let p = self.sink.promote(force)?;
                reply(Promoted {
                    cg: p.cg,
                    generation: crate::replica::identity::uuid_hex(&p.lineage.generation),
                    report: p.report(),
                })
            }
            Request::DrillStart { sockets, space } => {
                reply(self.sink.drill_start(&sockets, space)?)
            }
            Request::DrillStatus => reply(self.sink.drill_status()),
            Request::DrillStop => reply(self.sink.drill_stop()?),
            other => anyhow::bail!(
                "this is a secondary: {other:?} is a primary's command (`drblk ctl --socket SOCKET`)"
            ),
        }
    }
}

/// Rate limits of the lines about refused primaries and about an image that cannot be
/// prepared: a primary retries every few seconds, and the reason does not change until an
/// operator acts.
static REFUSALS: crate::sys::log_limit::LogLimiter =
    crate::sys::log_limit::LogLimiter::new(std::time::Duration::from_secs(60));
static IMAGE_FAILURES: crate::sys::log_limit::LogLimiter =
    crate::sys::log_limit::LogLimiter::new(std::time::Duration::from_secs(60));

impl ReplicaSink for StoreSink {
    fn hello(&self, hello: &Hello, peer: &PeerInfo) -> Result<HelloAck, RejectReason> {
        self.check_group(hello)?;
        let mut g = self.store.lock().expect("store lock");
        if let Err(e) = self.judge_lineage(hello, peer, &mut g) {
            if let Some(a) = REFUSALS.admit() {
                tracing::error!(peer = %peer.addr, site = %peer.site, "refusing primary: {e}{}", a.note());
            }
            return Err(RejectReason::Other(e));
        }
        let full = self.spec_of(hello);
        if g.is_none() {
            // The images of a replica opened here: the stored group's (more disks join
            // below), or all of them for a new replica.
            let k = crate::replica::stored_group(&self.paths.state_dir)
                .ok()
                .flatten()
                .map_or(full.disks.len(), |s| s.disks.len().min(full.disks.len()));
            let spec = GroupSpec {
                disks: full.disks[..k].to_vec(),
                chunk_size: full.chunk_size,
            };
            if let Err(e) = self.prepare_images(0, &spec.disks) {
                return Err(RejectReason::Other(e));
            }
            match ReplicaStore::open(&spec, &self.paths.state_dir) {
                Ok((store, report)) => {
                    tracing::info!(?report, state = ?store.state(), disk = %uuid_hex(&spec.disks[0].uuid), disks = spec.disks.len(), "replica opened");
                    *g = Some(store);
                }
                Err(e) => {
                    if let Some(a) = REFUSALS.admit() {
                        tracing::error!(peer = %peer.addr, error = %e, "refusing primary{}", a.note());
                    }
                    return Err(RejectReason::Other(e.to_string()));
                }
            }
        }
        let store = g.as_mut().expect("opened above");
        if store.state() == ReplicaState::Promoted {
            return Err(RejectReason::Promoted);
        }
        // Anything staged by an earlier connection belongs to an abandoned group.
        if !matches!(store.state(), ReplicaState::Syncing { .. }) {
            let _ = store.discard_uncommitted();
        }
        // The replica's disks are the primary's first ones, in order; the primary's further
        // disks join the group.
        for d in 0..store.disks() {
            let theirs = &hello.disks[d];
            if store.disk_identity(d) != Some((theirs.uuid, theirs.size)) {
                let why = format!(
                    "disk {d} of the primary's group ({}, {} bytes) is not the disk this \
                     replica keeps as disk {d} ({}): give `drblk secondary` the --disk options \
                     in the order of the primary's",
                    uuid_hex(&theirs.uuid),
                    theirs.size,
                    store.image_path(d).display()
                );
                if let Some(a) = REFUSALS.admit() {
                    tracing::error!(peer = %peer.addr, "refusing primary: {why}{}", a.note());
                }
                return Err(RejectReason::Other(why));
            }
        }
        if store.disks() < full.disks.len() {
            let new = &full.disks[store.disks()..];
            if let Err(e) = self.prepare_images(store.disks(), new) {
                return Err(RejectReason::Other(e));
            }
            for d in new {
                if let Err(e) = store.add_disk(d) {
                    tracing::error!(disk = %d.image.display(), error = %e, "cannot add the disk to the group");
                    return Err(RejectReason::Other(format!(
                        "cannot add {} to the group: {e}",
                        d.image.display()
                    )));
                }
            }
        }
        let syncing = matches!(store.state(), ReplicaState::Syncing { .. });
        let fresh = self.fresh_images.lock().expect("fresh images").clone();
        let mut disks = Vec::new();
        for (d, (image, desc)) in self.paths.images.iter().zip(&hello.disks).enumerate() {
            // An old primary's change record next to the image: its own writes, which the
            // primary must overwrite. Kept (and sent at each connection) until a group
            // commits.
            let record = crate::track::default_record_path(image);
            let resync_also = if record.exists() {
                let r = crate::site::rejoin::tail_ranges(image, desc.size)
                    .unwrap_or_else(|| vec![(0, desc.size)]);
                let bytes: u64 = r.iter().map(|x| x.1).sum();
                tracing::info!(disk = %image.display(), ranges = r.len(), bytes, "asking the primary to overwrite what this disk wrote on its own (its change record)");
                self.tail_pending
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                r
            } else {
                Vec::new()
            };
            // A syncing (or joining) image that was there before (its state was reset, or
            // an earlier copy was interrupted): most of it may already be right.
            let joining = store.join_progress(d);
            let compare_first =
                (syncing || joining.is_some()) && !fresh.get(d).copied().unwrap_or(false);
            let state = match (joining, store.state()) {
                (Some((done_chunks, total_chunks)), _)
                | (
                    None,
                    ReplicaState::Syncing {
                        done_chunks,
                        total_chunks,
                    },
                ) => DiskState::Syncing {
                    done_chunks,
                    total_chunks,
                },
                _ => DiskState::Member,
            };
            disks.push((state, compare_first, resync_also));
        }
        tracing::info!(peer = %peer.addr, site = %peer.site, state = ?store.state(), disks = disks.len(), "primary connected");
        let c = &self.counters;
        c.connected.store(true, Relaxed);
        c.connections.fetch_add(1, Relaxed);
        c.staged_bytes.store(0, Relaxed);
        Ok(HelloAck {
            protocol_version: PROTOCOL_VERSION,
            last_committed_cg: store.last_committed_cg(),
            state: store.state(),
            site: self.site.clone(),
            disks: disks
                .into_iter()
                .map(|(state, compare_first, resync_also)| DiskAck {
                    state,
                    compare_first,
                    resync_also,
                })
                .collect(),
        })
    }

    fn extent(
        &self,
        disk: u16,
        cg: u64,
        first: u64,
        count: u64,
        data: WireChunk<'_>,
    ) -> anyhow::Result<()> {
        let disk = usize::from(disk);
        self.with_store(|s| {
            let d = match data {
                WireChunk::Data(d) => ChunkData::Bytes(d),
                WireChunk::Zero { .. } => ChunkData::Zero,
            };
            let bytes = match data {
                WireChunk::Data(d) => d.len() as u64,
                WireChunk::Zero { .. } => 0,
            };
            if matches!(s.state(), ReplicaState::Syncing { .. }) || s.joining(disk) {
                s.sync_extent(disk, first, count, d)?;
            } else {
                s.stage_extent(disk, cg, first, count, d)?;
                self.counters.staged_bytes.fetch_add(bytes, Relaxed);
            }
            self.counters.received_bytes.fetch_add(bytes, Relaxed);
            Ok(())
        })
    }

    fn commit(&self, cg: u64, frozen_at_unix_us: u64, extent_count: u64) -> anyhow::Result<()> {
        self.commit_then_finish(cg, frozen_at_unix_us, extent_count, &mut || {})
    }

    /// The group is made durable (recovery replays it after any crash), applied in place,
    /// then acknowledged. All under the store's lock, so no extent of the next group is
    /// staged before this group is applied.
    fn commit_then_finish(
        &self,
        cg: u64,
        frozen_at_unix_us: u64,
        _extent_count: u64,
        acknowledge: &mut dyn FnMut(),
    ) -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        // How old the group was when its commit arrived (both sites' clocks: a debug figure).
        let age_at_commit_ms = crate::sys::clock::unix_micros(std::time::SystemTime::now())
            .saturating_sub(frozen_at_unix_us) as f64
            / 1000.0;
        self.with_store(|s| {
            match s.state() {
                ReplicaState::Syncing { total_chunks, .. } => {
                    s.finish_sync(cg, frozen_at_unix_us)?;
                    acknowledge();
                    tracing::info!(
                        cg,
                        chunks = total_chunks,
                        "initial synchronisation complete: consistent"
                    );
                }
                _ => {
                    let t = std::time::Instant::now();
                    s.commit_durable(cg, frozen_at_unix_us)?;
                    let durable = t.elapsed();
                    // Acknowledged once applied: a primary that drained (or a test, or the
                    // demo) may read the replica image right after the acknowledgement.
                    // Acknowledging at `durable` would cut the RPO but break that promise;
                    // it needs a background apply and a status that says what the image
                    // holds. A checkpoint (an image fsync) is due every few seconds: it
                    // runs after the acknowledgement, so the primary drains the next group
                    // meanwhile (the journal keeps this one durable until it is done).
                    s.apply_in_place()?;
                    // A disk whose copy this group carried joins the group's cut now:
                    // before the acknowledgement, so the primary's status and the
                    // replica's agree on what the group holds.
                    s.finish_joins(cg)?;
                    acknowledge();
                    tracing::debug!(cg, age_at_commit_ms, ?durable, applied = ?(t.elapsed() - durable), "consistency group committed");
                    s.checkpoint_if_due()?;
                }
            }
            let c = &self.counters;
            c.commit.observe(started.elapsed());
            c.groups_committed.fetch_add(1, Relaxed);
            if let Some(was) = c.store_error.lock().expect("counters lock").take() {
                tracing::info!(cg, "groups commit again (the last failure was: {was})");
            }
            c.applied_bytes
                .fetch_add(c.staged_bytes.swap(0, Relaxed), Relaxed);
            // The images hold a group now: worth comparing with after any later reset.
            self.fresh_images
                .lock()
                .expect("fresh images")
                .iter_mut()
                .for_each(|f| *f = false);
            if self
                .tail_pending
                .swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                // The group held these disks' own writes (asked for in the HelloAck): the
                // records that listed them are done with. A crash before the removal only
                // ships them once more.
                for image in &self.paths.images {
                    let record = crate::track::default_record_path(image);
                    match std::fs::remove_file(&record) {
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => {
                            tracing::warn!(record = %record.display(), error = %e, "cannot remove the old primary's change record")
                        }
                        Ok(()) => {
                            tracing::info!(record = %record.display(), cg, "this disk's own writes are overwritten: its old change record is removed")
                        }
                    }
                }
            }
            if let Some(f) = &self.on_commit {
                f(cg, &self.paths.images);
            }
            Ok(())
        })
    }

    fn checksums(&self, disk: u16, first: u64, count: u64) -> anyhow::Result<Vec<u32>> {
        let g = self.store.lock().expect("store lock");
        let store = g.as_ref().context("no replica open")?;
        // While syncing, the image as it is (the primary ships what differs).
        Ok(store.checksums(usize::from(disk), first, count)?)
    }

    fn status(&self) -> (ReplicaState, Option<u64>) {
        match self.store.lock().expect("store lock").as_ref() {
            Some(s) => (s.state(), s.last_committed_cg()),
            None => (
                ReplicaState::Syncing {
                    done_chunks: 0,
                    total_chunks: 0,
                },
                None,
            ),
        }
    }

    fn disconnected(&self, reason: &str) {
        self.counters.connected.store(false, Relaxed);
        self.counters.staged_bytes.store(0, Relaxed);
        let mut staged = 0;
        if let Some(s) = self.store.lock().expect("store lock").as_mut() {
            if !matches!(s.state(), ReplicaState::Syncing { .. }) {
                staged = s.staged_chunks();
                let _ = s.discard_uncommitted();
            }
        }
        // A warning only when a group was cut short; a clean close at a group boundary is
        // a state change like any other.
        if staged > 0 {
            tracing::warn!(reason, staged_chunks = staged, "primary disconnected; its uncommitted group is discarded (the replica stays at its last committed group)");
        } else {
            tracing::info!(reason, "primary disconnected at a group boundary");
        }
    }
}

/// An ENOSPC from the store, with what to do about it (the primary shows this text).
fn explain_full_disk(e: anyhow::Error, dir: &Path) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    });
    if !full {
        return e;
    }
    // The image is allocated in full when it is opened, except where its filesystem
    // cannot preallocate (a warning said so then): name the file that ran out.
    let image = e.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(|s| matches!(s, StoreError::Io { path, .. } if !path.starts_with(dir)))
    });
    if image {
        return e.context(
            "no space left for the replica image (its filesystem could not preallocate it): \
             free space there; the primary retries and replication resumes by itself",
        );
    }
    let free = crate::sys::file::free_bytes(dir).unwrap_or(0);
    e.context(format!(
        "journal full: no space left in {} ({} free; a group needs its size there plus {} kept \
         free); free space there: the primary retries and replication resumes by itself",
        dir.display(),
        indicatif::HumanBytes(free),
        indicatif::HumanBytes(crate::replica::STAGING_RESERVE)
    ))
}

/// Creates the replica image (sparse) at `size` if it is missing or shorter; `true` if it
/// was missing (then it holds nothing worth comparing).
fn ensure_image(path: &Path, size: u64) -> anyhow::Result<bool> {
    let fresh = !path.exists();
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    Ok(fresh)
}

/// A running secondary.
pub struct Secondary {
    server: LinkServer,
    sink: Arc<StoreSink>,
    control: Option<ControlServer>,
    metrics: Option<crate::metrics::MetricsServer>,
}

impl Secondary {
    /// Opens (recovers) the replica if it exists and listens for the primary.
    pub fn start(
        paths: SecondaryPaths,
        identity: SiteIdentity,
        listen: SocketAddr,
        expected_peer: Option<String>,
        on_commit: Option<CommitObserver>,
    ) -> anyhow::Result<Secondary> {
        std::fs::create_dir_all(&paths.state_dir)
            .with_context(|| format!("creating {}", paths.state_dir.display()))?;
        let site = identity.site.clone();
        let state_dir = paths.state_dir.clone();
        let sink = StoreSink::new(paths, &site, on_commit);
        sink.open_existing()?;
        // After the replica's lock is ours (a drill only exists on an open replica): files
        // of a drill are an earlier run's, and drills do not survive their daemon.
        let drills = crate::drill::drill_dir(&state_dir);
        crate::drill::remove_stale(&drills, true)
            .with_context(|| format!("removing an old drill in {}", drills.display()))?;
        let mut cfg = ServerConfig::new(identity, listen);
        cfg.expected_peer = expected_peer;
        let server = LinkServer::start(cfg, sink.clone())?;
        tracing::info!(listen = %server.local_addr()?, site, "secondary listening");
        Ok(Secondary {
            server,
            sink,
            control: None,
            metrics: None,
        })
    }

    /// Serves `/metrics` on a bound listener ([`crate::metrics::MetricsServer::bind`]);
    /// returns where it listens.
    pub fn serve_metrics(
        &mut self,
        bound: crate::metrics::BoundMetrics,
    ) -> anyhow::Result<SocketAddr> {
        let sink = self.sink.clone();
        let m = bound.serve(Arc::new(move || {
            crate::metrics::secondary::render(sink.status_view())
        }))?;
        let local = m.local_addr();
        self.metrics = Some(m);
        Ok(local)
    }

    /// The UDP address the secondary listens on.
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.server.local_addr()?)
    }

    /// The replica's state and last committed CG.
    pub fn status(&self) -> (ReplicaState, Option<u64>) {
        self.sink.status()
    }

    /// A line for operators: "syncing 42.0 %", "consistent at CG 7 (primary's state as of
    /// 0.3 s ago)", or why there is no replica yet.
    pub fn describe(&self) -> String {
        self.sink.describe()
    }

    /// Answers `drblk ctl --control PATH status|promote` on `path` (mode 0600).
    pub fn serve_control(&mut self, path: &Path) -> anyhow::Result<()> {
        let handler = Arc::new(SecondaryControl {
            sink: self.sink.clone(),
        });
        self.control = Some(ControlServer::start(path, handler)?);
        *self.sink.control.lock().expect("control path") = Some(path.to_path_buf());
        tracing::info!(control = %path.display(), "control socket");
        Ok(())
    }

    /// The default limit on a drill's overlay plus preserved bytes (`--drill-space`).
    pub fn set_drill_space(&self, bytes: u64) {
        self.sink
            .drill_space
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Where drills keep their files (`--drill-dir`; default STATE_DIR/drill): files a
    /// drill left there are removed now.
    pub fn set_drill_dir(&self, dir: &Path) -> anyhow::Result<()> {
        crate::drill::remove_stale(dir, false)
            .with_context(|| format!("removing an old drill in {}", dir.display()))?;
        *self.sink.drill_dir.lock().expect("drill dir") = Some(dir.to_path_buf());
        Ok(())
    }

    /// The drill's status (`drill status`).
    pub fn drill_status(&self) -> crate::drill::DrillStatus {
        self.sink.drill_status()
    }

    /// Stops listening (dropping the server closes its endpoint).
    pub fn stop(self) {
        drop(self.control);
        // Its render closure holds the sink: gone before the wait below.
        drop(self.metrics);
        if let Some(d) = self.sink.drill.lock().expect("drill lock").take() {
            if let Err(e) = self.sink.end_drill(d, "the secondary is stopping") {
                tracing::warn!(error = %format!("{e:#}"), "removing the drill");
            }
        }
        drop(self.server);
        // The link's runtime shuts down in the background: a group's commit may still run
        // on a blocking thread, holding the replica (its locks). Wait for it (bounded), so a
        // secondary started right after on the same replica finds it free.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while Arc::strong_count(&self.sink) > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Runs `drblk secondary` until SIGINT/SIGTERM, logging the replica's state when it
/// changes.
pub fn run(args: crate::cli::SecondaryArgs) -> anyhow::Result<()> {
    let shutdown = crate::blk::daemon::Shutdown::default();
    crate::blk::daemon::install_signal_handler(shutdown.clone())
        .context("installing signal handlers")?;
    let listen: SocketAddr = crate::link::resolve(&args.listen)?;
    let identity = SiteIdentity::load_for_daemon(&args.certs, &args.site, &args.peer_site)?;
    // Before the replica is opened or created: an address in use changes nothing.
    let metrics = args
        .metrics
        .as_deref()
        .map(crate::metrics::MetricsServer::bind)
        .transpose()?;
    let paths = SecondaryPaths {
        images: args.disk.clone(),
        state_dir: args.state_dir(),
        discard_local_changes: args.discard_local_changes,
        remove: args.remove_disk.clone(),
    };
    let mut secondary =
        Secondary::start(paths, identity, listen, Some(args.peer_site.clone()), None)?;
    secondary.set_drill_space(args.drill_space);
    if let Some(dir) = &args.drill_dir {
        secondary.set_drill_dir(dir)?;
    }
    secondary.serve_control(&args.control())?;
    if let Some(bound) = metrics {
        secondary.serve_metrics(bound)?;
    }
    // One line per change of state (syncing → consistent, promoted, ...) and per 10 % of a
    // sync; the group-by-group detail is at debug level.
    let mut last = String::new();
    while !shutdown.requested() {
        secondary.sink.reap_drill();
        let line = secondary.describe();
        let key = state_change_key(&line);
        if key != last {
            tracing::info!("replica: {line}");
            last = key;
        } else {
            tracing::trace!("replica: {line}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    tracing::info!("secondary stopping");
    secondary.stop();
    Ok(())
}

/// What must change in the state line for it to be logged at info level: its first two
/// words ("consistent at", "inconsistent, syncing", "no replica"), and while syncing the
/// tens of percent.
fn state_change_key(line: &str) -> String {
    let kind: String = line.split(' ').take(2).collect::<Vec<_>>().join(" ");
    let tens = line
        .strip_prefix("inconsistent, syncing ")
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse::<f64>().ok())
        .map(|p| (p / 10.0).floor() as u32);
    match tens {
        Some(t) => format!("{kind} {t}"),
        None => kind,
    }
}

#[cfg(test)]
mod log_tests {
    use super::state_change_key;

    #[test]
    fn the_state_is_logged_when_it_changes_kind_or_a_sync_passes_ten_percent() {
        let k = |s: &str| state_change_key(s);
        assert_eq!(
            k("consistent at CG 7 (the primary's state as of 0.1 s ago)"),
            k("consistent at CG 9000 (the primary's state as of 0.3 s ago)")
        );
        assert_ne!(k("consistent at CG 7 (x)"), k("promoted"));
        let sync = |p: &str| k(&format!("inconsistent, syncing {p} % (1 of 2 chunks)"));
        assert_eq!(sync("41.0"), sync("49.9"));
        assert_ne!(sync("49.9"), sync("50.0"));
        assert_ne!(sync("99.0"), k("consistent at CG 1 (x)"));
    }
}
