//! The primary's side of replication: ships consistency groups over the QUIC link.
//!
//! [`Replicator`] is the [`ChunkSink`] of the CG cycle. On every (re)connection it reads
//! the secondary's state from the handshake and decides what must be shipped:
//! - a secondary that is new or still syncing gets a full copy (every chunk marked dirty;
//!   zero chunks travel as markers); it reports itself as syncing until the copy's group
//!   commits;
//! - a secondary consistent at the group this primary last committed — or at a later group
//!   of this primary whose acknowledgement the link lost — gets only what changed since (the
//!   engine merged every uncommitted chunk back into its dirty set when the link was lost):
//!   an incremental resync;
//! - a secondary consistent at any other group (this primary restarted and lost its
//!   bitmaps) gets every chunk again, staged as one group above its last, so it stays
//!   consistent at its old group until the new one commits.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::cg::{Extent, Group};
use crate::link::{ClientConfig, LinkClient, ReplicaState};
use crate::replicate::compare::{compare, Comparison};
use crate::replicate::cycle::ChunkSink;
use crate::sys::clock::unix_micros;
use crate::track::ChangeRecord;

/// What the operator sees of the link.
#[derive(Default)]
pub struct LinkStatus {
    /// Connected to the secondary.
    pub connected: AtomicBool,
    /// The secondary's state as last reported ("syncing 42.0 %", "consistent at CG 7").
    pub remote_state: Mutex<String>,
    /// The same, typed (None before the first connection and after a refusal).
    pub remote: Mutex<Option<ReplicaState>>,
    /// Chunks marked to ship when the secondary's current sync began (the measure of its
    /// progress).
    pub sync_total_chunks: AtomicU64,
    /// Connections made (1 = the first).
    pub connects: AtomicU64,
    /// Chunks marked for shipping by full resyncs.
    pub full_resyncs: AtomicU64,
    /// Checksum resyncs (a secondary at a group this primary has no record of): the disks
    /// were compared chunk by chunk and only what differs is shipped.
    pub checksum_resyncs: AtomicU64,
    /// Chunks those resyncs compared, and found different.
    pub resync_compared: AtomicU64,
    /// See `resync_compared`.
    pub resync_differing: AtomicU64,
    /// `drblk ctl verify`: the run asked for, running, and the last one's report.
    pub verify: Verify,
    /// Bytes written to the link's data streams over all connections (frames: extents
    /// with their headers), to compare with what the guest wrote.
    pub wire_bytes: AtomicU64,
    /// Bytes of UDP datagrams sent over all connections (QUIC headers, acknowledgements and
    /// retransmissions included; IP/UDP headers not). Updated at each commit.
    pub udp_bytes: AtomicU64,
    /// Groups the secondary could not store (a full or failing disk there).
    pub secondary_failures: AtomicU64,
    /// The secondary's reason for the last such failure, until a group commits again.
    pub secondary_error: Mutex<Option<String>>,
}

/// Joins the secondary's reason and what the next group needs, in the status.
const NEEDS: &str = " — the next group needs about ";

/// How long the primary waits before shipping again after the secondary failed to store
/// `consecutive` groups in a row (1 = the first failure): doubling from 1 s up to 30 s, so
/// a full disk there costs a handful of attempts a minute instead of a reconnect storm,
/// and replication resumes within 30 s of space returning.
pub fn storage_retry_delay(consecutive: u32) -> Duration {
    let first = Duration::from_secs(1);
    let shift = consecutive.saturating_sub(1).min(5);
    (first * (1 << shift)).min(Duration::from_secs(30))
}

/// How long one verify slice may run between two groups.
const VERIFY_SLICE: Duration = Duration::from_millis(200);

/// `drblk ctl verify` between the control socket and the cycle thread.
#[derive(Default)]
pub struct Verify {
    /// The run in progress and the last report.
    pub state: Mutex<VerifyState>,
    /// Signalled when a run ends.
    pub done: std::sync::Condvar,
}

/// See [`Verify`].
#[derive(Default)]
pub struct VerifyState {
    /// The run in progress (picked up by the cycle thread between groups).
    pub running: Option<VerifyRun>,
    /// The last finished run.
    pub last: Option<VerifyReport>,
    /// Id of the next run.
    pub next_id: u64,
}

/// A verify run in progress.
pub struct VerifyRun {
    /// Its id.
    pub id: u64,
    /// Mark differing chunks for the next group.
    pub repair: bool,
    /// The disk being compared (the group's disks, in order).
    pub disk: usize,
    /// The next chunk of that disk to compare.
    pub cursor: u64,
    /// The last committed group when it began.
    pub cg: Option<u64>,
    /// What it found so far.
    pub found: Comparison,
}

/// What a verify run found (`drblk ctl verify` prints it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    /// The run's id.
    pub id: u64,
    /// The group both sites held when it began.
    pub cg: u64,
    /// Differing chunks were marked for the next group.
    pub repaired: bool,
    /// The comparison.
    #[serde(flatten)]
    pub found: Comparison,
    /// Why it stopped early (the link was lost).
    pub error: Option<String>,
}

impl VerifyReport {
    fn from(run: VerifyRun, error: Option<String>) -> VerifyReport {
        VerifyReport {
            id: run.id,
            cg: run.cg.unwrap_or(0),
            repaired: run.repair && error.is_none(),
            found: run.found,
            error,
        }
    }
}

/// Ships groups to a secondary; reconnects with backoff when the link is lost.
pub struct Replicator {
    cfg: ClientConfig,
    /// What is formed, drained and committed as one; disk `d` is `cfg.disks[d]` on the
    /// link.
    group: Arc<Group>,
    client: Option<LinkClient>,
    /// The current client's frame and UDP bytes already added to the status.
    seen: (u64, u64),
    /// Extents sent since the figures were last brought up to date.
    unaccounted: u32,
    status: Arc<LinkStatus>,
    /// Each disk's persisted change record, told before a full copy marks every chunk.
    records: Vec<Option<Arc<ChangeRecord>>>,
    /// Per disk: its engine was seeded from a change record that knew an acknowledged group,
    /// and it has not connected yet. A secondary ahead of that group holds a group whose
    /// acknowledgement was lost with the crash, and the record covers what differs from it
    /// too. A disk not seeded is compared by checksums instead.
    seeded: Vec<bool>,
    /// A connection succeeded in this process: from then on every engine holds every
    /// change since the group both sites share.
    tracked_since_connect: bool,
    /// Groups the secondary failed to store in a row, and when to ship again.
    storage_failing: u32,
    retry_at: Option<Instant>,
    failure_log: crate::sys::log_limit::LogLimiter,
}

impl Replicator {
    /// A replicator for `group`, connecting with `cfg` (the first connection is made by the
    /// cycle before its first group; failures are retried with backoff). `cfg.disks`
    /// describes the group's disks, in order.
    pub fn new(cfg: ClientConfig, group: Arc<Group>) -> Self {
        assert_eq!(
            group.disks(),
            cfg.disks.len(),
            "the link describes every disk of the group"
        );
        let n = group.disks();
        Replicator {
            cfg,
            group,
            client: None,
            seen: (0, 0),
            unaccounted: 0,
            status: Arc::new(LinkStatus::default()),
            records: vec![None; n],
            seeded: vec![false; n],
            tracked_since_connect: false,
            storage_failing: 0,
            retry_at: None,
            failure_log: crate::sys::log_limit::LogLimiter::new(Duration::from_secs(60)),
        }
    }

    /// A group of one disk: [`with_records`](Self::with_records) with `record`, trusted
    /// when it knew an acknowledged group.
    pub fn with_record(self, record: Option<Arc<ChangeRecord>>) -> Self {
        let seeded = record.is_some() && self.group.last_committed() > 0;
        self.with_records(vec![record], vec![seeded])
    }

    /// Keeps each disk's `records[d]` up to date with full copies, and trusts what it
    /// seeded disk `d`'s engine with where `seeded[d]` (see the field). `seeded` is decided
    /// before the engines' numbering is aligned for the group, which would make every disk
    /// look seeded.
    pub fn with_records(
        mut self,
        records: Vec<Option<Arc<ChangeRecord>>>,
        seeded: Vec<bool>,
    ) -> Self {
        assert_eq!(records.len(), self.group.disks(), "a record per disk");
        assert_eq!(seeded.len(), self.group.disks(), "a seeded flag per disk");
        self.records = records;
        self.seeded = seeded;
        self
    }

    /// Compares every chunk of disk `d` with the secondary's and marks those that differ
    /// (see [`crate::replicate::compare`]). The disk's record says "everything may differ"
    /// until the engine holds every difference.
    fn checksum_resync(&self, client: &LinkClient, d: usize, stop: &AtomicBool) -> io::Result<()> {
        if let Some(r) = &self.records[d] {
            r.mark_all_dirty();
            r.hold_all_dirty(true);
        }
        let mut cmp = Comparison::default();
        let engine = self.group.engine(d);
        compare(
            client,
            d as u16,
            engine,
            0..engine.num_chunks(),
            Duration::MAX,
            Some(stop),
            &mut cmp,
            |c| engine.mark_range(c, c),
        )?;
        let s = &self.status;
        s.checksum_resyncs.fetch_add(1, Ordering::Relaxed);
        s.resync_compared.fetch_add(cmp.compared, Ordering::Relaxed);
        s.resync_differing
            .fetch_add(cmp.differing, Ordering::Relaxed);
        tracing::info!(
            disk = d,
            compared = cmp.compared,
            differing = cmp.differing,
            written_meanwhile = cmp.skipped_dirty,
            seconds = cmp.seconds,
            "checksum resync: {} of {} chunks differ and are shipped (with what the guest writes)",
            cmp.differing,
            cmp.compared + cmp.skipped_dirty
        );
        Ok(())
    }

    /// A slice (at most `VERIFY_SLICE` of work) of the verify run asked for, if any:
    /// between groups, so replication goes on while a large disk is verified.
    fn verify_slice(&mut self) -> io::Result<()> {
        let Some(client) = &self.client else {
            return Ok(());
        };
        let mut g = self.status.verify.state.lock().expect("verify lock");
        let Some(run) = g.running.as_mut() else {
            return Ok(());
        };
        if run.cg.is_none() {
            run.cg = Some(self.group.last_committed());
        }
        let engine = self.group.engine(run.disk);
        let repair = run.repair;
        let r = compare(
            client,
            run.disk as u16,
            engine,
            run.cursor..engine.num_chunks(),
            VERIFY_SLICE,
            None,
            &mut run.found,
            |c| {
                if repair {
                    engine.mark_range(c, c);
                }
            },
        );
        match r {
            Ok(next) => {
                run.cursor = next;
                if next >= engine.num_chunks() && run.disk + 1 < self.group.disks() {
                    // The next disk, in the next slice.
                    run.disk += 1;
                    run.cursor = 0;
                } else if next >= engine.num_chunks() {
                    let run = g.running.take().expect("running");
                    tracing::info!(
                        id = run.id,
                        differing = run.found.differing,
                        compared = run.found.compared,
                        repair,
                        "verify done"
                    );
                    g.last = Some(VerifyReport::from(run, None));
                    self.status.verify.done.notify_all();
                }
                Ok(())
            }
            Err(e) => {
                let run = g.running.take().expect("running");
                g.last = Some(VerifyReport::from(run, Some(e.to_string())));
                self.status.verify.done.notify_all();
                Err(e)
            }
        }
    }

    /// Compares the `unknown` disks by checksums (see `connect`): the group's numbering is
    /// not theirs, so what differs on them is found, not assumed.
    fn compare_unknown(
        &self,
        client: &LinkClient,
        unknown: &[usize],
        stop: &AtomicBool,
    ) -> io::Result<()> {
        for &d in unknown {
            tracing::info!(secondary = %self.cfg.server_addr, disk = d, "this disk's change record knew no acknowledged group: comparing it by checksums");
            self.checksum_resync(client, d, stop)?;
        }
        Ok(())
    }

    /// Marks every chunk of disk `d` for the next group (a full copy of it).
    fn mark_all(&self, d: usize) {
        if let Some(r) = &self.records[d] {
            // On disk first: a crash during the copy must not trust the record's bitmap.
            r.mark_all_dirty();
        }
        self.group.engine(d).mark_all();
    }

    /// Chunks dirty on every disk (what the next group ships).
    fn dirty_chunks(&self) -> u64 {
        (0..self.group.disks())
            .map(|d| {
                let st = self.group.engine(d).stats();
                st.oos_dirty + st.cr_dirty
            })
            .sum()
    }

    /// The link's status, shared with the control socket.
    pub fn status(&self) -> Arc<LinkStatus> {
        self.status.clone()
    }

    /// The secondary's address.
    pub fn peer(&self) -> SocketAddr {
        self.cfg.server_addr
    }

    fn connect(&mut self, stop: &AtomicBool) -> io::Result<()> {
        let mut cfg = self.cfg.clone();
        let last = self.group.last_committed();
        cfg.last_committed_cg = (last > 0).then_some(last);
        cfg.unshipped = self.dirty_chunks() > 0;
        let client = LinkClient::connect(cfg).map_err(|e| {
            if let crate::link::LinkError::Rejected(why) = &e {
                // What the operator must see in `drblk ctl status`: a promoted secondary,
                // a split brain, a refused rejoin.
                *self.status.remote_state.lock().expect("status lock") =
                    format!("refused this primary: {why}");
                *self.status.remote.lock().expect("status lock") = None;
            }
            io::Error::other(e.to_string())
        })?;
        let ack = client.hello_ack().clone();
        // The client checked that the ack answers for every disk it announced.
        let disks = self.group.disks();
        let joining = |d: usize| {
            matches!(ack.disks[d].state, crate::link::DiskState::Syncing { .. })
                && !matches!(ack.state, ReplicaState::Syncing { .. })
        };
        // Disks whose history this process does not know: at its first connection, those
        // its change record did not seed (the group's numbering, aligned to the others,
        // says nothing of them). One joining the group is copied below instead.
        let unknown: Vec<usize> = (0..disks)
            .filter(|&d| !self.tracked_since_connect && !self.seeded[d] && !joining(d))
            .collect();
        self.status.connects.fetch_add(1, Ordering::Relaxed);
        let next = self.group.next_cg();
        match (ack.state, ack.last_committed_cg) {
            // The secondary holds our last committed group, or a later one we formed whose
            // acknowledgement the link lost. Either way everything changed since our last
            // committed group is dirty again (`link_lost` merged what was shipped since back
            // into the dirty set), so shipping it on top of the secondary's group is exact.
            (ReplicaState::Consistent { cg, .. }, _) if last > 0 && cg >= last && cg < next => {
                tracing::info!(secondary = %self.cfg.server_addr, cg, our_last = last, "secondary consistent at a group of ours: incremental resync");
                self.compare_unknown(&client, &unknown, stop)?;
            }
            (ReplicaState::Consistent { cg, .. }, _)
                if self.seeded.iter().any(|&s| s) && cg >= last =>
            {
                tracing::info!(secondary = %self.cfg.server_addr, cg, record_acked = last, "secondary consistent at or above the change record's group: incremental resync of what the record marked");
                self.compare_unknown(&client, &unknown, stop)?;
                self.group.resume_numbering(cg);
            }
            (ReplicaState::Consistent { cg, .. }, _) => {
                tracing::info!(secondary = %self.cfg.server_addr, cg, our_last = last, "secondary holds a group this primary has no record of: comparing the disks by checksums; what differs is shipped as one group above it");
                for d in (0..disks).filter(|&d| !joining(d)) {
                    self.checksum_resync(&client, d, stop)?;
                }
                self.group.resume_numbering(cg);
            }
            (ReplicaState::Syncing { .. }, committed) => {
                if let Some(cg) = committed {
                    self.group.resume_numbering(cg);
                }
                for (d, disk_ack) in ack.disks.iter().enumerate() {
                    if disk_ack.compare_first {
                        tracing::info!(secondary = %self.cfg.server_addr, disk = d, "secondary is syncing onto an image it had: comparing by checksums, shipping what differs");
                        self.checksum_resync(&client, d, stop)?;
                    } else {
                        tracing::info!(secondary = %self.cfg.server_addr, disk = d, "secondary is new or syncing: full copy");
                        self.mark_all(d);
                        self.status.full_resyncs.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            (ReplicaState::Promoted, _) => {
                return Err(io::Error::other(
                    "the secondary was promoted and accepts no replication",
                ))
            }
        }
        if let ReplicaState::Consistent { .. } = ack.state {
            // A disk joining the secondary's consistent group: copied in full (or compared,
            // if its image was there) in the next group, which makes it part of the cut.
            for d in (0..disks).filter(|&d| joining(d)) {
                if ack.disks[d].compare_first {
                    tracing::info!(secondary = %self.cfg.server_addr, disk = d, "disk joins the group onto an image the secondary had: comparing by checksums, shipping what differs");
                    self.checksum_resync(&client, d, stop)?;
                } else {
                    tracing::info!(secondary = %self.cfg.server_addr, disk = d, "disk joins the group: full copy of it in the next group");
                    self.mark_all(d);
                    self.status.full_resyncs.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        for (d, disk_ack) in ack.disks.iter().enumerate() {
            if disk_ack.resync_also.is_empty() {
                continue;
            }
            // An old primary rejoining: its own writes since the groups we share are shipped
            // on top of ours (the secondary keeps asking until a group commits).
            let disk = &self.cfg.disks[d];
            let chunk = u64::from(disk.chunk_size);
            let last_chunk = disk.size.div_ceil(chunk).saturating_sub(1);
            let mut marked = 0u64;
            for &(off, len) in &disk_ack.resync_also {
                if len == 0 || off >= disk.size {
                    continue;
                }
                let (a, b) = (off / chunk, ((off + len - 1) / chunk).min(last_chunk));
                self.group.engine(d).mark_range(a, b);
                marked += b - a + 1;
            }
            tracing::info!(secondary = %self.cfg.server_addr, disk = d, ranges = disk_ack.resync_also.len(), chunks = marked, "the secondary wrote these chunks on its own (an old primary rejoining): shipping ours over them");
        }
        for r in self.records.iter().flatten() {
            // Every arm above left the engines holding every difference (a failed checksum
            // resync returned before this, keeping the hold).
            r.hold_all_dirty(false);
        }
        *self.status.remote_state.lock().expect("status lock") = ack.state.to_string();
        *self.status.remote.lock().expect("status lock") = Some(ack.state);
        if matches!(ack.state, ReplicaState::Syncing { .. }) || (0..disks).any(joining) {
            self.status
                .sync_total_chunks
                .store(self.dirty_chunks(), Ordering::Relaxed);
        }
        self.status.connected.store(true, Ordering::SeqCst);
        self.seeded.iter_mut().for_each(|s| *s = false);
        self.tracked_since_connect = true;
        self.client = Some(client);
        self.seen = (0, 0);
        Ok(())
    }

    /// The connected client. Connecting happens only in [`ChunkSink::prepare`], between
    /// groups: a connection decides what the next group must contain (a full copy, say), so
    /// a group formed before it cannot be completed over it.
    fn client(&mut self) -> io::Result<&LinkClient> {
        self.client.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                "not connected to the secondary",
            )
        })
    }

    /// Adds what the current client sent since the last call to the status's byte counts.
    fn account(&mut self) {
        let Some(c) = &self.client else { return };
        let st = c.stats();
        let (wire, udp) = (st.wire_bytes, st.udp_tx_bytes);
        let s = &self.status;
        s.wire_bytes
            .fetch_add(wire.saturating_sub(self.seen.0), Ordering::Relaxed);
        s.udp_bytes
            .fetch_add(udp.saturating_sub(self.seen.1), Ordering::Relaxed);
        self.seen = (wire.max(self.seen.0), udp.max(self.seen.1));
        self.unaccounted = 0;
    }

    fn lost(&mut self, e: impl std::fmt::Display) -> io::Error {
        self.status.connected.store(false, Ordering::SeqCst);
        self.account();
        if let Some(c) = self.client.take() {
            if let Some(reason) = c.storage_failure() {
                self.secondary_failed(reason);
            }
            c.close();
        }
        io::Error::new(io::ErrorKind::ConnectionAborted, e.to_string())
    }
}

impl Replicator {
    /// The secondary could not store a group: its data stays dirty here (the cycle merges
    /// it back), and the next attempt waits `storage_retry_delay`. Logged the first time,
    /// then once a minute at most while it lasts.
    fn secondary_failed(&mut self, reason: String) {
        self.storage_failing += 1;
        let wait = storage_retry_delay(self.storage_failing);
        self.retry_at = Some(Instant::now() + wait);
        self.status
            .secondary_failures
            .fetch_add(1, Ordering::Relaxed);
        if let Some(a) = self.failure_log.admit() {
            tracing::error!(secondary = %self.cfg.server_addr, failures = self.storage_failing, retry_in = ?wait, "the secondary cannot store groups: {reason}; the data stays dirty here and is shipped again{}", a.note());
        }
        *self.status.secondary_error.lock().expect("status lock") = Some(reason);
    }

    /// A group committed: the secondary stores groups again.
    fn secondary_recovered(&mut self) {
        if self.storage_failing == 0 {
            return;
        }
        tracing::info!(secondary = %self.cfg.server_addr, failures = self.storage_failing, "the secondary stores groups again");
        self.storage_failing = 0;
        self.retry_at = None;
        *self.status.secondary_error.lock().expect("status lock") = None;
    }
}

impl ChunkSink for Replicator {
    fn extent(&mut self, ext: Extent, data: &[u8]) -> io::Result<()> {
        let r = self
            .client()?
            .send_extent(ext.disk, ext.cg, ext.first, ext.count, data);
        // The byte counts are brought up to date at each commit, and during long drains
        // every 1024 extents (reading them takes the connection's lock).
        self.unaccounted += 1;
        if self.unaccounted >= 1024 {
            self.account();
        }
        r.map_err(|e| self.lost(e))
    }

    fn commit(&mut self, cg: u64, frozen_at: SystemTime) -> io::Result<()> {
        let r = self.client()?.commit(cg, unix_micros(frozen_at));
        match r {
            Ok(()) => {
                self.account();
                self.secondary_recovered();
                for r in self.records.iter().flatten() {
                    r.committed();
                }
                let state = ReplicaState::Consistent {
                    cg,
                    frozen_at_unix_us: unix_micros(frozen_at),
                };
                *self.status.remote_state.lock().expect("status lock") = state.to_string();
                *self.status.remote.lock().expect("status lock") = Some(state);
                Ok(())
            }
            Err(e) => Err(self.lost(e)),
        }
    }

    fn prepare(&mut self, stop: &AtomicBool) -> io::Result<()> {
        if self.client.is_some() {
            if let Err(e) = self.verify_slice() {
                // The link failed under the comparison: reconnect below.
                let _ = self.lost(e);
            } else {
                return Ok(());
            }
        }
        if let Some(at) = self.retry_at {
            // The secondary failed to store a group. Say how much its journal needs for
            // the next one (what is dirty here now: the failed group merged back), then
            // give it time (space to be freed).
            let need = self.dirty_chunks() * self.group.engine(0).config().chunk_size;
            if let Some(e) = self
                .status
                .secondary_error
                .lock()
                .expect("status lock")
                .as_mut()
            {
                // Only a full disk needs room; a failing one needs repair.
                if !e.contains(NEEDS) && (e.contains("journal full") || e.contains("No space")) {
                    e.push_str(&format!(
                        "{NEEDS}{} free in its journal's directory (plus {})",
                        indicatif::HumanBytes(need),
                        indicatif::HumanBytes(crate::replica::STAGING_RESERVE)
                    ));
                }
            }
            while Instant::now() < at && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let first = self.status.connects.load(Ordering::Relaxed) == 0;
        let mut backoff = Duration::from_millis(100);
        let mut next_log = Instant::now();
        let mut last_error = String::new();
        while !stop.load(Ordering::SeqCst) {
            match self.connect(stop) {
                Ok(()) => {
                    if first {
                        tracing::info!(secondary = %self.cfg.server_addr, "connected to the secondary");
                    } else {
                        tracing::info!(secondary = %self.cfg.server_addr, "link re-established");
                    }
                    return Ok(());
                }
                Err(e) => {
                    // The same failure again within a minute is not logged again: a link
                    // down for hours stays a handful of lines.
                    let text = e.to_string();
                    if Instant::now() >= next_log || text != last_error {
                        if text.starts_with("rejected by the secondary") {
                            tracing::error!(secondary = %self.cfg.server_addr, retry_in = ?backoff, "{text}");
                        } else {
                            tracing::warn!(secondary = %self.cfg.server_addr, error = %e, retry_in = ?backoff, "secondary unreachable; the guest is unaffected, changes are tracked");
                        }
                        next_log = Instant::now() + Duration::from_secs(60);
                        last_error = text;
                    }
                    let until = Instant::now() + backoff;
                    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        Err(io::Error::other("stopped"))
    }

    fn recover(&mut self, error: &io::Error, stop: &AtomicBool) -> io::Result<()> {
        let _ = self.lost(error);
        self.prepare(stop)
    }
}

#[cfg(test)]
mod tests {
    use super::storage_retry_delay;
    use std::time::Duration;

    #[test]
    fn storage_failures_back_off_doubling_to_thirty_seconds() {
        let secs: Vec<u64> = (1..=8).map(|n| storage_retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(storage_retry_delay(0), Duration::from_secs(1));
        assert_eq!(storage_retry_delay(u32::MAX), Duration::from_secs(30));
    }
}
