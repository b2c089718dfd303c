//! The running session of a connected client: chunks queued onto the data streams, commits
//! and their acknowledgements, status requests and heartbeats on the control stream, and
//! loss detection (the first failure anywhere marks the link lost and wakes every waiter).
//!
//! Memory bound (see the module docs of `client`): `send_chunk` takes one permit of
//! `inflight` per frame byte before queuing a frame; `data_writer` gives them back only once
//! quinn has taken the frame into its send buffer (bounded by `send_window`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::connect::Established;
use super::{describe_close, lock, ClientConfig, ReplicaStatus};
use crate::link::proto::{self, close_code, encode_frame, HelloAck, Message, WirePayload};
use crate::link::ratelimit::TokenBucket;
use crate::link::LinkError;

/// Frames for one data stream, written with one `write_all`, and the in-flight permits
/// they hold.
type Job = (Vec<u8>, Vec<OwnedSemaphorePermit>);

/// Frames are gathered per stream up to this many bytes before they are handed to the
/// stream's writer: one wake-up and one write for many small extents. A commit (and a send
/// that has to wait for in-flight room) flushes every stream first.
const BATCH_BYTES: usize = 256 << 10;

#[derive(Default)]
struct Pending {
    checksums: HashMap<u64, oneshot::Sender<Vec<u32>>>,
    commits: HashMap<u64, oneshot::Sender<Result<(), String>>>,
    status: HashMap<u64, oneshot::Sender<ReplicaStatus>>,
    pings: HashMap<u64, oneshot::Sender<()>>,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) chunks: AtomicU64,
    pub(super) extents: AtomicU64,
    pub(super) zero: AtomicU64,
    pub(super) lz4: AtomicU64,
    pub(super) data: AtomicU64,
    pub(super) wire: AtomicU64,
    pub(super) acked: AtomicU64,
}

/// State of one connected link, shared by the blocking API and the link's tasks.
pub(super) struct Shared {
    pub(super) conn: quinn::Connection,
    pub(super) endpoint: quinn::Endpoint,
    pub(super) ctrl: tokio::sync::Mutex<quinn::SendStream>,
    data: Vec<mpsc::Sender<Job>>,
    /// Frames gathered per data stream, not yet handed to its writer.
    gathered: Vec<tokio::sync::Mutex<Job>>,
    pub(super) inflight: Arc<Semaphore>,
    max_inflight: usize,
    bucket: Option<TokenBucket>,
    pub(super) lost: Mutex<Option<String>>,
    /// The secondary's reason, when it answered `CommitFailed` (see
    /// `LinkClient::storage_failure`).
    pub(super) storage_failure: Mutex<Option<String>>,
    pending: Mutex<Pending>,
    /// Extents sent per CG label, not yet covered by a commit.
    uncommitted: Mutex<(BTreeMap<u64, u64>, Option<u64>)>,
    seq: AtomicU64,
    pub(super) counters: Counters,
    pub(super) cfg: ClientConfig,
    pub(super) ack: HelloAck,
}

impl Shared {
    /// Starts the session on a link that passed the handshake: one writer task per data
    /// stream, the control stream reader, and a task marking the link lost when the
    /// connection closes. Must run inside the link's runtime.
    pub(super) fn start(cfg: ClientConfig, link: Established) -> Arc<Shared> {
        let Established {
            endpoint,
            conn,
            ctrl_send: send,
            ctrl_recv: recv,
            data: streams,
            ack,
        } = link;
        // A disk the handshake accepted has a geometry; the bound without one is generous.
        let max_frame = cfg
            .disks
            .iter()
            .map(|d| {
                d.geometry().map_or(
                    crate::geometry::MAX_EXTENT_BYTES.max(u64::from(d.chunk_size)) as usize,
                    |g| g.max_extent_len(),
                )
            })
            .max()
            .unwrap_or(0)
            + proto::EXTENT_HEADER_MAX
            + proto::FRAME_OVERHEAD;
        let max_inflight = cfg
            .max_inflight_bytes
            .max(2 * max_frame)
            .min(u32::MAX as usize / 2);
        let mut txs = Vec::new();
        let mut rxs = Vec::new();
        for _ in 0..cfg.data_streams {
            let (tx, rx) = mpsc::channel(1024);
            txs.push(tx);
            rxs.push(rx);
        }
        let bucket = cfg
            .max_rate
            // The burst must hold the largest frame (an extent of up to 1 MiB).
            .map(|r| TokenBucket::new(r, (r / 10).max(max_frame as u64)));
        let last = ack.last_committed_cg;
        let shared = Arc::new(Shared {
            conn,
            endpoint,
            ctrl: tokio::sync::Mutex::new(send),
            gathered: txs
                .iter()
                .map(|_| tokio::sync::Mutex::new((Vec::new(), Vec::new())))
                .collect(),
            data: txs,
            inflight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            bucket,
            lost: Mutex::new(None),
            storage_failure: Mutex::new(None),
            pending: Mutex::new(Pending::default()),
            uncommitted: Mutex::new((BTreeMap::new(), last)),
            seq: AtomicU64::new(1),
            counters: Counters::default(),
            cfg,
            ack,
        });
        for (stream, rx) in streams.into_iter().zip(rxs) {
            tokio::spawn(data_writer(shared.clone(), stream, rx));
        }
        tokio::spawn(control_reader(shared.clone(), recv));
        tokio::spawn(heartbeats(shared.clone()));
        let s = shared.clone();
        tokio::spawn(async move {
            let e = s.conn.closed().await;
            s.mark_lost(describe_close(&e));
        });
        shared
    }

    fn lost_error(&self) -> LinkError {
        LinkError::LinkLost(
            lock(&self.lost)
                .clone()
                .unwrap_or_else(|| "connection closed".into()),
        )
    }

    pub(super) fn check_alive(&self) -> Result<(), LinkError> {
        if lock(&self.lost).is_some() {
            return Err(self.lost_error());
        }
        Ok(())
    }

    /// Records the first reason the link was lost and wakes every waiter.
    fn mark_lost(&self, reason: String) {
        {
            let mut l = lock(&self.lost);
            if l.is_none() {
                // Once a minute at most over all connections: a link that keeps failing
                // (a secondary failing every group) stays a few lines.
                static LOG: crate::sys::log_limit::LogLimiter =
                    crate::sys::log_limit::LogLimiter::new(std::time::Duration::from_secs(60));
                if let Some(a) = LOG.admit() {
                    tracing::warn!(peer = %self.cfg.server_addr, "replication link lost: {reason}{}", a.note());
                }
                *l = Some(reason);
            }
        }
        self.inflight.close();
        let mut p = lock(&self.pending);
        p.commits.clear();
        p.status.clear();
        p.pings.clear();
    }

    pub(super) async fn send_ctrl(&self, msg: &Message<'_>) -> Result<(), LinkError> {
        let frame = encode_frame(msg).map_err(|e| LinkError::Protocol(format!("encode: {e}")))?;
        let mut s = self.ctrl.lock().await;
        s.write_all(&frame)
            .await
            .map_err(|e| LinkError::LinkLost(format!("control stream: {e}")))
    }

    pub(super) async fn send_extent(
        &self,
        disk: u16,
        cg: u64,
        first: u64,
        count: u64,
        data: Option<&[u8]>,
    ) -> Result<(), LinkError> {
        self.check_alive()?;
        let geometry = self
            .cfg
            .disks
            .get(usize::from(disk))
            .ok_or_else(|| {
                LinkError::InvalidArgument(format!(
                    "disk {disk}: the group has {} disks",
                    self.cfg.disks.len()
                ))
            })?
            .geometry()?;
        let want = geometry.extent_len(first, count).ok_or_else(|| {
            LinkError::InvalidArgument(format!(
                "extent of {count} chunks from {first} of disk {disk}: empty, beyond the disk \
                 or across an extent region ({} chunks)",
                geometry.extent_chunks()
            ))
        })?;
        if let Some(data) = data {
            if data.len() != want {
                return Err(LinkError::InvalidArgument(format!(
                    "extent of {count} chunks from {first}: {} bytes, expected {want}",
                    data.len()
                )));
            }
        }
        {
            let u = lock(&self.uncommitted);
            if u.1.is_some_and(|c| cg <= c) {
                return Err(LinkError::InvalidArgument(format!(
                    "extent labelled CG {cg}, but CG {} was already committed",
                    u.1.unwrap_or(0)
                )));
            }
        }
        // Encode on the caller's thread (compression, checksum).
        let mut compressed = Vec::new();
        let payload = match data {
            None => WirePayload::Zero,
            Some(d) if self.cfg.detect_zero && d.iter().all(|&b| b == 0) => WirePayload::Zero,
            Some(d) if self.cfg.compress => {
                compressed = lz4_flex::block::compress(d);
                if compressed.len() <= d.len() - d.len() / 8 {
                    WirePayload::Lz4(&compressed)
                } else {
                    WirePayload::Raw(d)
                }
            }
            Some(d) => WirePayload::Raw(d),
        };
        match payload {
            WirePayload::Zero => self.counters.zero.fetch_add(count, Ordering::Relaxed),
            WirePayload::Lz4(_) => self.counters.lz4.fetch_add(count, Ordering::Relaxed),
            WirePayload::Raw(_) => 0,
        };
        let frame = encode_frame(&Message::Extent {
            disk,
            cg,
            first,
            count,
            payload,
        })
        .map_err(|e| LinkError::Protocol(format!("encode: {e}")))?;
        drop(compressed);
        if let Some(b) = &self.bucket {
            b.acquire(frame.len() as u64).await;
        }
        let n = frame.len().min(self.max_inflight) as u32;
        let permit = match self.inflight.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(tokio::sync::TryAcquireError::Closed) => return Err(self.lost_error()),
            Err(tokio::sync::TryAcquireError::NoPermits) => {
                // Gathered frames hold permits: hand them over before waiting for room.
                self.flush().await?;
                self.inflight
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| self.lost_error())?
            }
        };
        // Every version of a chunk travels on the stream of its disk's region, in order
        // (frames of a stream are gathered and handed over in call order, under its lock).
        // The disk shifts the choice so that the disks' first regions spread over streams.
        let stream =
            ((geometry.region_of(first) + u64::from(disk)) % self.data.len() as u64) as usize;
        {
            let mut batch = self.gathered[stream].lock().await;
            if batch.0.is_empty() {
                batch.0 = frame;
            } else {
                batch.0.extend_from_slice(&frame);
            }
            batch.1.push(permit);
            if batch.0.len() >= BATCH_BYTES {
                let job = std::mem::take(&mut *batch);
                self.data[stream]
                    .send(job)
                    .await
                    .map_err(|_| self.lost_error())?;
            }
        }
        *lock(&self.uncommitted).0.entry(cg).or_insert(0) += 1;
        self.counters.chunks.fetch_add(count, Ordering::Relaxed);
        self.counters.extents.fetch_add(1, Ordering::Relaxed);
        self.counters.data.fetch_add(want as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Hands every stream's gathered frames to its writer.
    pub(super) async fn flush(&self) -> Result<(), LinkError> {
        for (stream, gathered) in self.gathered.iter().enumerate() {
            let mut batch = gathered.lock().await;
            if !batch.0.is_empty() {
                let job = std::mem::take(&mut *batch);
                self.data[stream]
                    .send(job)
                    .await
                    .map_err(|_| self.lost_error())?;
            }
        }
        Ok(())
    }

    pub(super) async fn commit(&self, cg: u64, frozen_at_unix_us: u64) -> Result<(), LinkError> {
        self.check_alive()?;
        // The commit covers every extent sent before it: they must be on their way.
        self.flush().await?;
        let (tx, rx) = oneshot::channel();
        let extent_count = {
            let mut u = lock(&self.uncommitted);
            if u.1.is_some_and(|c| cg <= c) {
                return Err(LinkError::InvalidArgument(format!(
                    "commit of CG {cg} after CG {} (CGs must increase)",
                    u.1.unwrap_or(0)
                )));
            }
            let mut pending = lock(&self.pending);
            if pending.commits.contains_key(&cg) {
                return Err(LinkError::InvalidArgument(format!(
                    "commit of CG {cg} already pending"
                )));
            }
            pending.commits.insert(cg, tx);
            let later = u.0.split_off(&(cg + 1));
            let count = u.0.values().sum::<u64>();
            u.0 = later;
            u.1 = Some(cg);
            count
        };
        tracing::debug!(cg, extent_count, "sending commit");
        self.send_ctrl(&Message::Commit {
            cg,
            frozen_at_unix_us,
            extent_count,
        })
        .await?;
        match tokio::time::timeout(self.cfg.commit_timeout, rx).await {
            Err(_) => {
                lock(&self.pending).commits.remove(&cg);
                Err(LinkError::Timeout(format!("acknowledgement of CG {cg}")))
            }
            Ok(Err(_)) => Err(self.lost_error()),
            Ok(Ok(Err(reason))) => Err(LinkError::CommitFailed { cg, reason }),
            Ok(Ok(Ok(()))) => {
                self.counters.acked.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    pub(super) async fn status(&self) -> Result<ReplicaStatus, LinkError> {
        self.check_alive()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).status.insert(seq, tx);
        self.send_ctrl(&Message::StatusRequest { seq }).await?;
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Err(_) => {
                lock(&self.pending).status.remove(&seq);
                Err(LinkError::Timeout("status request".into()))
            }
            Ok(Err(_)) => Err(self.lost_error()),
            Ok(Ok(s)) => Ok(s),
        }
    }

    pub(super) async fn checksums(
        &self,
        disk: u16,
        first: u64,
        count: u64,
    ) -> Result<Vec<u32>, LinkError> {
        self.check_alive()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).checksums.insert(seq, tx);
        self.send_ctrl(&Message::ChecksumRequest {
            seq,
            disk,
            first,
            count,
        })
        .await?;
        // The secondary reads up to MAX_CHECKSUM_CHUNKS chunks: bounded like a commit.
        match tokio::time::timeout(self.cfg.commit_timeout, rx).await {
            Err(_) => {
                lock(&self.pending).checksums.remove(&seq);
                Err(LinkError::Timeout("checksum request".into()))
            }
            Ok(Err(_)) => Err(self.lost_error()),
            Ok(Ok(crcs)) if crcs.len() as u64 == count => Ok(crcs),
            Ok(Ok(crcs)) => Err(LinkError::Protocol(format!(
                "asked for {count} checksums, got {}",
                crcs.len()
            ))),
        }
    }

    pub(super) async fn ping(&self) -> Result<Duration, LinkError> {
        self.check_alive()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).pings.insert(seq, tx);
        let t = tokio::time::Instant::now();
        self.send_ctrl(&Message::Heartbeat {
            seq,
            sent_at_unix_us: proto::now_unix_us(),
        })
        .await?;
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Err(_) => {
                lock(&self.pending).pings.remove(&seq);
                Err(LinkError::Timeout("heartbeat".into()))
            }
            Ok(Err(_)) => Err(self.lost_error()),
            Ok(Ok(())) => Ok(t.elapsed()),
        }
    }

    /// Handles one message from the secondary on the control stream.
    fn on_control(&self, msg: Message<'_>) -> Result<(), String> {
        match msg {
            Message::CommitAck { cg } => match lock(&self.pending).commits.remove(&cg) {
                Some(tx) => {
                    let _ = tx.send(Ok(()));
                    Ok(())
                }
                None => Err(format!("CommitAck for CG {cg}, which is not pending")),
            },
            Message::CommitFailed { cg, reason } => {
                tracing::error!(cg, "secondary failed to commit CG {cg}: {reason}");
                lock(&self.storage_failure).get_or_insert_with(|| reason.clone());
                if let Some(tx) = lock(&self.pending).commits.remove(&cg) {
                    let _ = tx.send(Err(reason));
                }
                Ok(())
            }
            Message::Status {
                seq,
                state,
                last_committed_cg,
            } => {
                if let Some(tx) = lock(&self.pending).status.remove(&seq) {
                    let _ = tx.send(ReplicaStatus {
                        state,
                        last_committed_cg,
                    });
                }
                Ok(())
            }
            Message::Checksums { seq, crcs } => match lock(&self.pending).checksums.remove(&seq) {
                Some(tx) => {
                    let _ = tx.send(crcs);
                    Ok(())
                }
                None => Err(format!("Checksums {seq}, which were not asked for")),
            },
            Message::HeartbeatAck { seq, .. } => {
                if let Some(tx) = lock(&self.pending).pings.remove(&seq) {
                    let _ = tx.send(());
                }
                Ok(())
            }
            other => Err(format!("unexpected {} on the control stream", other.kind())),
        }
    }
}

/// A `Heartbeat` every `tuning.heartbeat` while the link lives, so that the secondary
/// tells an idle primary (no guest writes) from a stalled peer. Its answer is not waited
/// for: QUIC's idle timeout and the requests' own timeouts detect a dead secondary.
async fn heartbeats(shared: Arc<Shared>) {
    let mut t = tokio::time::interval(shared.cfg.tuning.heartbeat);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t.tick().await;
    loop {
        tokio::select! {
            _ = shared.conn.closed() => return,
            _ = t.tick() => {}
        }
        let seq = shared.seq.fetch_add(1, Ordering::Relaxed);
        let beat = Message::Heartbeat {
            seq,
            sent_at_unix_us: proto::now_unix_us(),
        };
        if shared.send_ctrl(&beat).await.is_err() {
            return;
        }
    }
}

async fn control_reader(shared: Arc<Shared>, mut recv: quinn::RecvStream) {
    let mut buf = Vec::new();
    loop {
        match proto::read_frame(&mut recv, &mut buf, proto::MAX_CONTROL_FRAME_LEN).await {
            Ok(true) => {}
            Ok(false) => {
                shared.mark_lost("secondary closed the control stream".into());
                shared
                    .conn
                    .close(close_code::NORMAL.into(), b"control stream closed");
                return;
            }
            Err(e) => {
                if shared.conn.close_reason().is_none() {
                    tracing::error!("malformed frame from the secondary: {e}; closing the link");
                    shared
                        .conn
                        .close(close_code::PROTOCOL_ERROR.into(), b"malformed frame");
                    shared.mark_lost(format!("malformed frame from the secondary: {e}"));
                }
                return;
            }
        }
        let res = proto::decode_payload(&buf)
            .map_err(|e| e.to_string())
            .and_then(|m| shared.on_control(m));
        if let Err(e) = res {
            tracing::error!("protocol error from the secondary: {e}; closing the link");
            shared
                .conn
                .close(close_code::PROTOCOL_ERROR.into(), b"protocol error");
            shared.mark_lost(format!("protocol error from the secondary: {e}"));
            return;
        }
    }
}

async fn data_writer(
    shared: Arc<Shared>,
    mut stream: quinn::SendStream,
    mut rx: mpsc::Receiver<Job>,
) {
    while let Some((frames, permits)) = rx.recv().await {
        let len = frames.len() as u64;
        // Handed over, not copied: quinn keeps the frames' buffer until they are acknowledged.
        if let Err(e) = stream.write_chunk(bytes::Bytes::from(frames)).await {
            shared.mark_lost(format!("data stream: {e}"));
            return;
        }
        shared.counters.wire.fetch_add(len, Ordering::Relaxed);
        drop(permits);
    }
    let _ = stream.finish();
}
