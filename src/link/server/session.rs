//! The running session with one primary, after `HelloAck`: one task per data stream reads
//! one frame at a time, validates each extent and hands it to
//! [`ReplicaSink::extent`](super::ReplicaSink::extent); the control stream reader answers
//! status requests and heartbeats and queues commits; one commit task processes commits in
//! CG order, first waiting until every extent a commit covers was handed to the sink, then
//! calling [`ReplicaSink::commit`](super::ReplicaSink::commit), and only then sending
//! `CommitAck`.

use crate::geometry::Geometry;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{lock, ChunkData, PeerInfo, ServerShared};
use crate::link::proto::{self, close_code, encode_frame, Hello, Message, WirePayload};

/// Per-connection state after `HelloAck`.
pub(super) struct Session {
    srv: Arc<ServerShared>,
    conn: quinn::Connection,
    peer: PeerInfo,
    /// The geometry of each disk `Hello` announced (the sink accepted them); empty if one
    /// is invalid (then every extent is refused).
    geometries: Vec<Geometry>,
    ctrl: tokio::sync::Mutex<quinn::SendStream>,
    /// Extents handed to the sink per CG label, and the last processed commit.
    counts: Mutex<(BTreeMap<u64, u64>, Option<u64>)>,
    progress: watch::Sender<u64>,
    /// When the last frame arrived, in ms since `started` (see `silence_watchdog`).
    last_frame_ms: std::sync::atomic::AtomicU64,
    /// Calls into the sink running now (a long commit, a status waiting for the replica's
    /// lock): the session's readers may not read meanwhile, which is not silence.
    in_sink: std::sync::atomic::AtomicU32,
    started: std::time::Instant,
}

/// Names an extent in errors; formatted only when one is (not on every extent).
#[derive(Clone, Copy)]
struct ExtentName {
    count: u64,
    first: u64,
    disk: u16,
}

impl std::fmt::Display for ExtentName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ExtentName { count, first, disk } = self;
        write!(f, "extent of {count} chunks from {first} of disk {disk}")
    }
}

/// Most distinct uncommitted CG labels a primary may have outstanding.
const MAX_OPEN_CGS: usize = 4096;

impl Session {
    /// The session state of a primary whose `Hello` was accepted; `ctrl` is the send half
    /// of its control stream, `last_committed_cg` the sink's answer to `Hello`.
    pub(super) fn new(
        srv: Arc<ServerShared>,
        conn: quinn::Connection,
        peer: PeerInfo,
        hello: &Hello,
        ctrl: quinn::SendStream,
        last_committed_cg: Option<u64>,
    ) -> Arc<Session> {
        let (progress, _) = watch::channel(0u64);
        Arc::new(Session {
            srv,
            conn,
            peer,
            geometries: hello
                .disks
                .iter()
                .map(|d| Geometry::new(d.size, u64::from(hello.chunk_size)))
                .collect::<Result<_, _>>()
                .unwrap_or_default(),
            ctrl: tokio::sync::Mutex::new(ctrl),
            counts: Mutex::new((BTreeMap::new(), last_committed_cg)),
            progress,
            last_frame_ms: Default::default(),
            in_sink: Default::default(),
            started: std::time::Instant::now(),
        })
    }

    /// Starts the session's tasks once `HelloAck` was sent: the control stream reader, the
    /// commit task, and a reader task per data stream the primary opens.
    pub(super) fn start(self: &Arc<Self>, recv: quinn::RecvStream) {
        let (ctx, crx) = mpsc::channel(16);
        tokio::spawn(control_reader(self.clone(), recv, ctx));
        tokio::spawn(commit_worker(self.clone(), crx));
        tokio::spawn(silence_watchdog(self.clone()));
        let s = self.clone();
        tokio::spawn(async move {
            loop {
                match s.conn.accept_uni().await {
                    Ok(r) => {
                        tokio::spawn(data_reader(s.clone(), r));
                    }
                    Err(_) => return,
                }
            }
        });
    }

    /// Runs `f` (a call into the sink) counted in `in_sink`, and counts it as hearing from
    /// the primary when it ends (its readers could not read while it ran).
    fn in_sink<T>(&self, f: impl FnOnce() -> T) -> T {
        /// Ends the count however `f` ends (a panicking sink call must not leave the
        /// session "busy" for good, which would blind the silence watchdog).
        struct Done<'a>(&'a Session);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                // Heard first: a watchdog tick in between must not see "not busy" with an
                // old time.
                self.0.heard();
                self.0.in_sink.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.in_sink.fetch_add(1, Ordering::SeqCst);
        let _done = Done(self);
        f()
    }

    /// Runs `f` with the sink on the sink's thread, counted in `in_sink`. `None`: the call
    /// did not complete, and the connection is closed.
    async fn with_sink<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn super::ReplicaSink) -> T + Send + 'static,
    ) -> Option<T> {
        let s = Arc::clone(self);
        match self
            .srv
            .sink_thread
            .call(move || s.in_sink(|| f(&*s.srv.sink)))
            .await
        {
            Ok(x) => Some(x),
            Err(e) => {
                self.sink_gone(e);
                None
            }
        }
    }

    /// A sink call did not complete (it panicked, or the server is stopping): the session
    /// cannot go on; closed so that the primary reconnects.
    fn sink_gone(&self, e: super::sink_thread::SinkGone) {
        if self.conn.close_reason().is_none() {
            tracing::error!(peer = %self.peer.addr, "{e}; closing the connection");
            self.conn
                .close(close_code::SINK_ERROR.into(), e.to_string().as_bytes());
        }
    }

    /// A frame arrived: the primary is alive.
    fn heard(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_frame_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Logs a protocol violation and closes the connection.
    fn protocol_error(&self, what: &str) {
        if self.conn.close_reason().is_none() {
            self.srv
                .counters
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                peer = %self.peer.addr, site = %self.peer.site,
                "protocol error from the primary: {what}; closing the connection"
            );
            self.conn.close(
                close_code::PROTOCOL_ERROR.into(),
                proto::clip(what).as_bytes(),
            );
        }
    }

    pub(super) async fn send_ctrl(&self, msg: &Message<'_>) -> Result<(), String> {
        let frame = encode_frame(msg).map_err(|e| e.to_string())?;
        let mut s = self.ctrl.lock().await;
        s.write_all(&frame).await.map_err(|e| e.to_string())
    }

    /// Validates one extent frame and hands it to the sink. Runs on the sink's thread.
    fn on_extent(&self, msg: Message<'_>, scratch: &mut Vec<u8>) -> Result<(), String> {
        // The sink's `disconnected` (which drops what this session staged) runs on this
        // same thread once the connection is closed: checked here, a frame read before the
        // close can never be staged after it, into the next session's group.
        if self.conn.close_reason().is_some() {
            return Err("connection closed".into());
        }
        let Message::Extent {
            disk,
            cg,
            first,
            count,
            payload,
        } = msg
        else {
            return Err(format!("unexpected {} on a data stream", msg.kind()));
        };
        let what = ExtentName { count, first, disk };
        let len = self
            .geometries
            .get(usize::from(disk))
            .and_then(|g| g.extent_len(first, count))
            .ok_or_else(|| {
                format!(
                    "{what}: empty, beyond the disk, across an extent region, or of a disk the \
                     group ({} disks) does not have",
                    self.geometries.len()
                )
            })?;
        if lock(&self.counts).1.is_some_and(|c| cg <= c) {
            return Err(format!("{what} for CG {cg}, which is already committed"));
        }
        let data = match payload {
            WirePayload::Zero => ChunkData::Zero { len },
            WirePayload::Raw(d) if d.len() == len => ChunkData::Data(d),
            WirePayload::Raw(d) => {
                return Err(format!("{what}: {} bytes, expected {len}", d.len()))
            }
            WirePayload::Lz4(c) => {
                scratch.clear();
                scratch.resize(len, 0);
                match lz4_flex::block::decompress_into(c, scratch) {
                    Ok(n) if n == len => ChunkData::Data(scratch),
                    Ok(n) => return Err(format!("{what}: lz4 gave {n} bytes, expected {len}")),
                    Err(e) => return Err(format!("{what}: bad lz4 data: {e}")),
                }
            }
        };
        let sink = &self.srv.sink;
        self.in_sink(|| sink.extent(disk, cg, first, count, data))
            .map_err(|e| format!("sink failed to stage the {what} of CG {cg}: {e:#}"))
            .map_err(|e| {
                // A storage failure is not the primary's fault: distinct close code. Logged
                // once a minute at most: the primary retries such groups with a backoff.
                static LOG: crate::sys::log_limit::LogLimiter =
                    crate::sys::log_limit::LogLimiter::new(Duration::from_secs(60));
                if let Some(a) = LOG.admit() {
                    tracing::error!(peer = %self.peer.addr, "{e}; closing the connection{}", a.note());
                }
                self.conn
                    .close(close_code::SINK_ERROR.into(), proto::clip(&e).as_bytes());
                e
            })?;
        {
            let mut c = lock(&self.counts);
            if c.1.is_some_and(|last| cg <= last) {
                return Err(format!(
                    "{what} for CG {cg} arrived after its commit was complete"
                ));
            }
            if !c.0.contains_key(&cg) && c.0.len() >= MAX_OPEN_CGS {
                return Err(format!("more than {MAX_OPEN_CGS} uncommitted CGs"));
            }
            *c.0.entry(cg).or_insert(0) += 1;
        }
        self.srv.counters.chunks.fetch_add(count, Ordering::Relaxed);
        self.srv.counters.extents.fetch_add(1, Ordering::Relaxed);
        self.progress.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Waits until the extents a commit covers were all staged, then commits.
    async fn on_commit(self: &Arc<Self>, cg: u64, frozen: u64, count: u64) -> Result<(), String> {
        let mut rx = self.progress.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let c = lock(&self.counts);
                if c.1.is_some_and(|last| cg <= last) {
                    return Err(format!("commit of CG {cg} after CG {:?}", c.1));
                }
                let have: u64 = c.0.range(..=cg).map(|(_, n)| *n).sum();
                if have == count {
                    break;
                }
                if have > count {
                    return Err(format!(
                        "commit of CG {cg} announces {count} extents, {have} received"
                    ));
                }
            }
            match tokio::time::timeout(self.srv.cfg.commit_stall_timeout, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("session ended".into()),
                Err(_) => {
                    // A protocol error (the close says why), not `CommitFailed`: that one
                    // means the secondary's storage failed, which the primary backs off
                    // from; a stalled link is reconnected at once.
                    return Err(format!(
                        "commit of CG {cg}: extents missing, none arrived for {:?}",
                        self.srv.cfg.commit_stall_timeout
                    ));
                }
            }
        }
        {
            let mut c = lock(&self.counts);
            let later = c.0.split_off(&(cg + 1));
            c.0 = later;
            c.1 = Some(cg);
        }
        // The sink acknowledges as soon as the group is durable (through `ack`, from its
        // blocking thread), then may finish its work (apply the group in place) before it
        // returns: the primary's RPO does not wait for that work.
        let sink = self.srv.sink.clone();
        let (session, handle) = (Arc::clone(self), tokio::runtime::Handle::current());
        let acked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acked2 = Arc::clone(&acked);
        let res = self
            .srv
            .sink_thread
            .call(move || {
                let s = Arc::clone(&session);
                // As in `on_extent`: after the close, `disconnected` may have dropped this
                // group's extents; committing then would commit a group without its data.
                if s.conn.close_reason().is_some() {
                    return Err(anyhow::anyhow!(
                        "connection closed before CG {cg} was committed"
                    ));
                }
                s.in_sink(|| {
                    sink.commit_then_finish(cg, frozen, count, &mut || {
                        if !acked2.swap(true, Ordering::SeqCst) {
                            session.srv.counters.commits.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(cg, count, "CG committed");
                            // A lost link shows up in the next frame; the group is durable anyway.
                            let _ = handle.block_on(session.send_ctrl(&Message::CommitAck { cg }));
                        }
                    })
                })
            })
            .await
            .map_err(|e| anyhow::anyhow!("commit: {e}"))
            .and_then(|r| r);
        let acked = acked.load(Ordering::SeqCst);
        match res {
            Ok(()) if acked => Ok(()),
            Ok(()) => {
                self.srv.counters.commits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cg, count, "CG committed");
                self.send_ctrl(&Message::CommitAck { cg }).await
            }
            Err(e) if acked => {
                // Durable and acknowledged, but finishing it failed: the sink recovers it
                // when it is opened again. Close so that the primary reconnects.
                let reason = proto::clip(&format!("{e:#}"));
                tracing::error!(
                    cg,
                    "sink failed after committing CG {cg}: {reason}; closing"
                );
                self.conn
                    .close(close_code::SINK_ERROR.into(), reason.as_bytes());
                Ok(())
            }
            Err(e) => {
                let reason = proto::clip(&format!("{e:#}"));
                tracing::error!(cg, "sink failed to commit CG {cg}: {reason}; closing");
                let _ = self
                    .send_ctrl(&Message::CommitFailed {
                        cg,
                        reason: reason.clone(),
                    })
                    .await;
                // Give the frame a moment to leave before closing.
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.conn
                    .close(close_code::SINK_ERROR.into(), reason.as_bytes());
                Ok(())
            }
        }
    }
}

/// Closes a session from which no frame arrived for `silence_timeout`: a peer that
/// handshook and then stalled (or a primary whose process hangs) would otherwise hold the
/// secondary — one primary at a time — until QUIC's idle timeout, which the peer's
/// keep-alives postpone forever. A commit the sink is still working on does not count as
/// silence: the primary keeps sending heartbeats meanwhile.
async fn silence_watchdog(s: Arc<Session>) {
    let limit = s.srv.cfg.silence_timeout;
    let tick = (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = s.conn.closed() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let last = Duration::from_millis(s.last_frame_ms.load(Ordering::Relaxed));
        let busy = s.in_sink.load(Ordering::SeqCst) > 0;
        if !busy && s.started.elapsed().saturating_sub(last) >= limit {
            tracing::warn!(peer = %s.peer.addr, site = %s.peer.site, "no frame from the primary for {limit:?}; closing the session");
            s.conn
                .close(close_code::NORMAL.into(), b"silent for too long");
            return;
        }
    }
}

/// Frames of one data stream queued on the sink's thread before its reader waits for the
/// oldest to be staged. Reading the next frames while the sink stages earlier ones keeps
/// the sink's thread busy: waiting for each frame's job cost two cross-thread wake-ups per
/// extent, and with 4 KiB extents that, not the CPU, bounded what a secondary could stage.
/// Frames of one stream still stage in their order (jobs run in queue order); a failed one
/// closes the connection from the sink's thread, so the frames queued after it are refused
/// (`on_extent` checks the close first).
const READ_AHEAD: usize = 8;

/// A frame's buffers and whether staging it succeeded, back from the sink's thread.
type Staged = (Vec<u8>, Vec<u8>, bool);

async fn data_reader(s: Arc<Session>, mut recv: quinn::RecvStream) {
    let largest = s.geometries.iter().map(|g| g.max_extent_len()).max();
    let limit = largest.unwrap_or(0) + proto::EXTENT_HEADER_MAX;
    let mut queued: std::collections::VecDeque<tokio::sync::oneshot::Receiver<Staged>> =
        std::collections::VecDeque::new();
    // Buffers of staged frames, reused (at most READ_AHEAD + 1 pairs live).
    let mut spare: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        // Take back what the sink has staged; wait for the oldest while the window is full.
        loop {
            let full = queued.len() >= READ_AHEAD;
            let Some(oldest) = queued.front_mut() else {
                break;
            };
            let staged = if full {
                oldest.await.ok()
            } else {
                match oldest.try_recv() {
                    Ok(x) => Some(x),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::oneshot::error::TryRecvError::Closed) => None,
                }
            };
            queued.pop_front();
            match staged {
                Some((buf, scratch, true)) => spare.push((buf, scratch)),
                // Refused: the job closed the connection and said why.
                Some((_, _, false)) => return,
                None => return s.sink_gone(super::sink_thread::SinkGone),
            }
        }
        let (mut buf, mut scratch) = spare.pop().unwrap_or_default();
        match proto::read_frame(&mut recv, &mut buf, limit).await {
            Ok(true) => s.heard(),
            Ok(false) => return,
            Err(proto::FrameError::Read(_)) => return, // connection gone; logged elsewhere
            Err(e) => return s.protocol_error(&format!("data stream: {e}")),
        }
        // Decoded, checked and staged on the sink's thread: the frame's buffers go there
        // and come back through `queued`.
        let job = s.srv.sink_thread.queue({
            let s = s.clone();
            move || {
                let res = match proto::decode_payload(&buf) {
                    Ok(m) => s.on_extent(m, &mut scratch),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = &res {
                    s.protocol_error(e);
                }
                (buf, scratch, res.is_ok())
            }
        });
        match job.await {
            Ok(rx) => queued.push_back(rx),
            Err(e) => return s.sink_gone(e),
        }
    }
}

async fn control_reader(
    s: Arc<Session>,
    mut recv: quinn::RecvStream,
    commits: mpsc::Sender<(u64, u64, u64)>,
) {
    let mut buf = Vec::new();
    loop {
        match proto::read_frame(&mut recv, &mut buf, proto::MAX_CONTROL_FRAME_LEN).await {
            Ok(true) => s.heard(),
            Ok(false) => {
                tracing::info!(peer = %s.peer.addr, "primary closed the control stream");
                s.conn.close(close_code::NORMAL.into(), b"bye");
                return;
            }
            Err(proto::FrameError::Read(_)) => return,
            Err(e) => return s.protocol_error(&format!("control stream: {e}")),
        }
        let msg = match proto::decode_payload(&buf) {
            Ok(m) => m,
            Err(e) => return s.protocol_error(&format!("control stream: {e}")),
        };
        let res = match msg {
            Message::Commit {
                cg,
                frozen_at_unix_us,
                extent_count,
            } => commits
                .send((cg, frozen_at_unix_us, extent_count))
                .await
                .map_err(|_| "commit worker gone".to_string()),
            Message::StatusRequest { seq } => {
                let Some((state, last)) = s.with_sink(|k| k.status()).await else {
                    return;
                };
                s.send_ctrl(&Message::Status {
                    seq,
                    state,
                    last_committed_cg: last,
                })
                .await
            }
            Message::Heartbeat {
                seq,
                sent_at_unix_us,
            } => {
                s.send_ctrl(&Message::HeartbeatAck {
                    seq,
                    sent_at_unix_us,
                })
                .await
            }
            Message::Progress { done, total } => {
                match s.with_sink(move |k| k.progress(done, total)).await {
                    Some(()) => Ok(()),
                    None => return,
                }
            }
            Message::ChecksumRequest {
                seq,
                disk,
                first,
                count,
            } => {
                let inside = s.geometries.get(usize::from(disk)).is_some_and(|g| {
                    first.checked_add(count).is_some_and(|e| e <= g.chunks())
                        && count.saturating_mul(g.chunk_size())
                            <= crate::replicate::compare::MAX_REQUEST_BYTES
                });
                if count == 0 || count > proto::MAX_CHECKSUM_CHUNKS || !inside {
                    return s.protocol_error(&format!(
                        "checksum request for {count} chunks from {first} of disk {disk}: outside the disk or over {}",
                        proto::MAX_CHECKSUM_CHUNKS
                    ));
                }
                let Some(crcs) = s.with_sink(move |k| k.checksums(disk, first, count)).await else {
                    return;
                };
                match crcs {
                    Ok(crcs) => s.send_ctrl(&Message::Checksums { seq, crcs }).await,
                    Err(e) => {
                        let reason = proto::clip(&format!("checksums: {e:#}"));
                        tracing::error!("{reason}; closing");
                        s.conn
                            .close(close_code::SINK_ERROR.into(), reason.as_bytes());
                        return;
                    }
                }
            }
            other => {
                return s.protocol_error(&format!(
                    "unexpected {} on the control stream",
                    other.kind()
                ))
            }
        };
        if let Err(e) = res {
            tracing::debug!("control stream: {e}");
            return;
        }
    }
}

async fn commit_worker(s: Arc<Session>, mut rx: mpsc::Receiver<(u64, u64, u64)>) {
    while let Some((cg, frozen, count)) = rx.recv().await {
        if let Err(e) = s.on_commit(cg, frozen, count).await {
            return s.protocol_error(&e);
        }
    }
}
