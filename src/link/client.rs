//! Primary side of the link: a blocking client for drblk's synchronous CG thread.
//!
//! [`LinkClient`] owns a small tokio runtime. Its methods block the calling thread (they
//! must not be called from inside an async runtime; they return
//! [`LinkError::InsideRuntime`] instead of panicking).
//!
//! Backpressure: [`LinkClient::send_chunk`] encodes the chunk on the caller's thread, waits
//! for the optional rate limiter, then for permits of a semaphore holding
//! `max_inflight_bytes` (one permit per frame byte), and queues the frame for the data
//! stream `index % data_streams`. The permits are returned once quinn has taken the frame
//! into its send buffer, itself bounded by `send_window`. So the primary holds at most
//! `max_inflight_bytes + send_window` bytes of chunk data, and `send_chunk` blocks while the
//! link is slower than the producer.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::certs::SiteIdentity;
use super::proto::{
    self, close_code, encode_frame, Hello, HelloAck, Message, ReplicaState, WirePayload,
};
use super::ratelimit::TokenBucket;
use super::tls::{self, Tuning};
use super::{DiskInfo, LinkError};

/// Configuration of the primary's link client.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// This site's certificates (CA, own chain and key).
    pub identity: SiteIdentity,
    /// UDP address of the secondary.
    pub server_addr: SocketAddr,
    /// Site name of the secondary: its certificate must be valid for this DNS name.
    pub server_name: String,
    /// Local address to bind (port 0: any).
    pub bind: SocketAddr,
    /// The replicated disk.
    pub disk: DiskInfo,
    /// Last CG the primary knows committed on the secondary, sent in `Hello`.
    pub last_committed_cg: Option<u64>,
    /// Number of unidirectional data streams (1..=16).
    pub data_streams: usize,
    /// Bound of chunk bytes queued in the client, not yet handed to QUIC.
    pub max_inflight_bytes: usize,
    /// Optional rate limit in bytes per second (of encoded frames).
    pub max_rate: Option<u64>,
    /// LZ4-compress chunks (kept only when it saves at least 1/8).
    pub compress: bool,
    /// Send all-zero chunks as a zero marker.
    pub detect_zero: bool,
    /// Transport tuning.
    pub tuning: Tuning,
    /// Bound of the QUIC/TLS handshake plus `Hello`/`HelloAck`.
    pub connect_timeout: Duration,
    /// Bound of a `commit` waiting for its acknowledgement (the idle timeout detects a
    /// dead link sooner; this bounds a live but stuck secondary).
    pub commit_timeout: Duration,
    /// Bound of `status` and `ping`.
    pub request_timeout: Duration,
    /// Niceness of the link's threads (see [`crate::sys::priority`]).
    pub thread_nice: i32,
}

impl ClientConfig {
    /// A configuration with defaults: 4 data streams, 64 MiB in flight, no rate limit,
    /// no compression, zero detection on, default tuning, bind on `0.0.0.0:0` (or `[::]:0`).
    pub fn new(
        identity: SiteIdentity,
        server_addr: SocketAddr,
        server_name: &str,
        disk: DiskInfo,
    ) -> ClientConfig {
        let bind = if server_addr.is_ipv6() {
            "[::]:0".parse()
        } else {
            "0.0.0.0:0".parse()
        }
        .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        ClientConfig {
            identity,
            server_addr,
            server_name: server_name.to_string(),
            bind,
            disk,
            last_committed_cg: None,
            data_streams: 4,
            max_inflight_bytes: 64 << 20,
            max_rate: None,
            compress: false,
            detect_zero: true,
            tuning: Tuning::default(),
            connect_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            thread_nice: 0,
        }
    }
}

/// The secondary's answer to a status request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The secondary's state.
    pub state: ReplicaState,
    /// Last CG committed on the secondary.
    pub last_committed_cg: Option<u64>,
}

/// Counters of a client.
#[derive(Debug, Clone, Default)]
pub struct ClientStats {
    /// Chunks queued with `send_chunk`/`send_zero`.
    pub chunks_sent: u64,
    /// Chunks sent as zero markers.
    pub zero_chunks: u64,
    /// Chunks sent LZ4-compressed.
    pub compressed_chunks: u64,
    /// Uncompressed chunk bytes queued.
    pub data_bytes: u64,
    /// Encoded frame bytes written to data streams.
    pub wire_bytes: u64,
    /// CGs acknowledged.
    pub commits_acked: u64,
    /// Current QUIC round-trip estimate.
    pub rtt: Duration,
    /// QUIC packets lost so far (as detected by quinn).
    pub lost_packets: u64,
}

type Job = (Vec<u8>, OwnedSemaphorePermit);

#[derive(Default)]
struct Pending {
    commits: HashMap<u64, oneshot::Sender<Result<(), String>>>,
    status: HashMap<u64, oneshot::Sender<ReplicaStatus>>,
    pings: HashMap<u64, oneshot::Sender<()>>,
}

#[derive(Default)]
struct Counters {
    chunks: AtomicU64,
    zero: AtomicU64,
    lz4: AtomicU64,
    data: AtomicU64,
    wire: AtomicU64,
    acked: AtomicU64,
}

struct Shared {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
    ctrl: tokio::sync::Mutex<quinn::SendStream>,
    data: Vec<mpsc::Sender<Job>>,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
    bucket: Option<TokenBucket>,
    lost: Mutex<Option<String>>,
    pending: Mutex<Pending>,
    /// Chunks sent per CG label, not yet covered by a commit.
    uncommitted: Mutex<(BTreeMap<u64, u64>, Option<u64>)>,
    seq: AtomicU64,
    counters: Counters,
    cfg: ClientConfig,
    ack: HelloAck,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn lost_error(&self) -> LinkError {
        LinkError::LinkLost(
            lock(&self.lost)
                .clone()
                .unwrap_or_else(|| "connection closed".into()),
        )
    }

    fn check_alive(&self) -> Result<(), LinkError> {
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
                tracing::warn!(peer = %self.cfg.server_addr, "replication link lost: {reason}");
                *l = Some(reason);
            }
        }
        self.inflight.close();
        let mut p = lock(&self.pending);
        p.commits.clear();
        p.status.clear();
        p.pings.clear();
    }

    async fn send_ctrl(&self, msg: &Message<'_>) -> Result<(), LinkError> {
        let frame = encode_frame(msg).map_err(|e| LinkError::Protocol(format!("encode: {e}")))?;
        let mut s = self.ctrl.lock().await;
        s.write_all(&frame)
            .await
            .map_err(|e| LinkError::LinkLost(format!("control stream: {e}")))
    }

    async fn send_chunk(&self, cg: u64, index: u64, data: Option<&[u8]>) -> Result<(), LinkError> {
        self.check_alive()?;
        let d = &self.cfg.disk;
        let want = d.geometry()?.chunk_len(index).ok_or_else(|| {
            LinkError::InvalidArgument(format!("chunk index {index} beyond the disk"))
        })?;
        if let Some(data) = data {
            if data.len() != want {
                return Err(LinkError::InvalidArgument(format!(
                    "chunk {index}: {} bytes, expected {want}",
                    data.len()
                )));
            }
        }
        {
            let u = lock(&self.uncommitted);
            if u.1.is_some_and(|c| cg <= c) {
                return Err(LinkError::InvalidArgument(format!(
                    "chunk labelled CG {cg}, but CG {} was already committed",
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
            WirePayload::Zero => self.counters.zero.fetch_add(1, Ordering::Relaxed),
            WirePayload::Lz4(_) => self.counters.lz4.fetch_add(1, Ordering::Relaxed),
            WirePayload::Raw(_) => 0,
        };
        let frame = encode_frame(&Message::Chunk { cg, index, payload })
            .map_err(|e| LinkError::Protocol(format!("encode: {e}")))?;
        drop(compressed);
        if let Some(b) = &self.bucket {
            b.acquire(frame.len() as u64).await;
        }
        let n = frame.len().min(self.max_inflight) as u32;
        let permit = self
            .inflight
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| self.lost_error())?;
        let stream = (index % self.data.len() as u64) as usize;
        self.data[stream]
            .send((frame, permit))
            .await
            .map_err(|_| self.lost_error())?;
        *lock(&self.uncommitted).0.entry(cg).or_insert(0) += 1;
        self.counters.chunks.fetch_add(1, Ordering::Relaxed);
        self.counters.data.fetch_add(want as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn commit(&self, cg: u64, frozen_at_unix_us: u64) -> Result<(), LinkError> {
        self.check_alive()?;
        let (tx, rx) = oneshot::channel();
        let chunk_count = {
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
        tracing::debug!(cg, chunk_count, "sending commit");
        self.send_ctrl(&Message::Commit {
            cg,
            frozen_at_unix_us,
            chunk_count,
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

    async fn status(&self) -> Result<ReplicaStatus, LinkError> {
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

    async fn ping(&self) -> Result<Duration, LinkError> {
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
    while let Some((frame, permit)) = rx.recv().await {
        if let Err(e) = stream.write_all(&frame).await {
            shared.mark_lost(format!("data stream: {e}"));
            return;
        }
        shared
            .counters
            .wire
            .fetch_add(frame.len() as u64, Ordering::Relaxed);
        drop(permit);
    }
    let _ = stream.finish();
}

fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            format!("closed by the secondary (code {}): {reason}", c.error_code)
        }
        quinn::ConnectionError::TimedOut => "idle timeout: no packet from the secondary".into(),
        other => other.to_string(),
    }
}

async fn connect_async(cfg: ClientConfig) -> Result<Arc<Shared>, LinkError> {
    cfg.disk.validate()?;
    if !(1..=16).contains(&cfg.data_streams) {
        return Err(LinkError::InvalidArgument(format!(
            "data_streams {} not in 1..=16",
            cfg.data_streams
        )));
    }
    let max_frame = cfg.disk.chunk_size as usize + proto::CHUNK_HEADER_MAX + proto::FRAME_OVERHEAD;
    let max_inflight = cfg
        .max_inflight_bytes
        .max(2 * max_frame)
        .min(u32::MAX as usize / 2);
    let cc = tls::client_config(&cfg.identity, &cfg.tuning)?;
    let endpoint = tls::endpoint(cfg.bind, None, &cfg.tuning)?;
    let t0 = tokio::time::Instant::now();
    let remaining = || cfg.connect_timeout.saturating_sub(t0.elapsed());
    let connecting = endpoint
        .connect_with(cc, cfg.server_addr, &cfg.server_name)
        .map_err(|e| LinkError::Connect(e.to_string()))?;
    let conn = match tokio::time::timeout(remaining(), connecting).await {
        Err(_) => return Err(LinkError::Timeout("QUIC/TLS handshake".into())),
        Ok(Err(e)) => {
            tracing::warn!(peer = %cfg.server_addr, "handshake with the secondary failed: {e}");
            return Err(LinkError::Connect(describe_close(&e)));
        }
        Ok(Ok(c)) => c,
    };
    let handshake = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| describe_close(&e))?;
        let hello = Message::Hello(Hello {
            magic: proto::HELLO_MAGIC,
            protocol_version: proto::PROTOCOL_VERSION,
            disk_uuid: cfg.disk.uuid,
            disk_size: cfg.disk.size,
            chunk_size: cfg.disk.chunk_size,
            last_committed_cg: cfg.last_committed_cg,
            site: cfg.identity.site.clone(),
        });
        let frame = encode_frame(&hello).map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let got = proto::read_frame(&mut recv, &mut buf, proto::MAX_CONTROL_FRAME_LEN).await;
        Ok::<_, String>((send, recv, got, buf))
    };
    let (send, recv, got, buf) = match tokio::time::timeout(remaining(), handshake).await {
        Err(_) => {
            conn.close(close_code::NORMAL.into(), b"handshake timeout");
            return Err(LinkError::Timeout("Hello/HelloAck".into()));
        }
        Ok(Err(e)) => return Err(handshake_failure(&conn, e).await),
        Ok(Ok(x)) => x,
    };
    let ack = match got {
        Ok(true) => match proto::decode_payload(&buf) {
            Ok(Message::HelloAck(ack)) => ack,
            Ok(Message::Reject(r)) => {
                tracing::warn!(peer = %cfg.server_addr, "secondary rejected the connection: {r}");
                conn.close(close_code::NORMAL.into(), b"rejected");
                return Err(LinkError::Rejected(r.to_string()));
            }
            Ok(m) => {
                conn.close(close_code::PROTOCOL_ERROR.into(), b"expected HelloAck");
                return Err(LinkError::Protocol(format!(
                    "expected HelloAck, got {}",
                    m.kind()
                )));
            }
            Err(e) => {
                conn.close(close_code::PROTOCOL_ERROR.into(), b"undecodable HelloAck");
                return Err(LinkError::Protocol(format!("undecodable HelloAck: {e}")));
            }
        },
        Ok(false) => return Err(handshake_failure(&conn, "control stream closed".into()).await),
        Err(e) => return Err(handshake_failure(&conn, e.to_string()).await),
    };
    if ack.protocol_version != proto::PROTOCOL_VERSION {
        conn.close(close_code::PROTOCOL_ERROR.into(), b"version");
        return Err(LinkError::Protocol(format!(
            "secondary acknowledged with protocol v{}",
            ack.protocol_version
        )));
    }
    let mut streams = Vec::new();
    for _ in 0..cfg.data_streams {
        match tokio::time::timeout(remaining().max(Duration::from_secs(1)), conn.open_uni()).await {
            Ok(Ok(s)) => streams.push(s),
            Ok(Err(e)) => return Err(LinkError::LinkLost(describe_close(&e))),
            Err(_) => {
                conn.close(close_code::NORMAL.into(), b"stream limit");
                return Err(LinkError::Connect(format!(
                    "secondary does not allow {} data streams",
                    cfg.data_streams
                )));
            }
        }
    }
    tracing::info!(
        peer = %cfg.server_addr,
        secondary = %ack.site,
        state = %ack.state,
        last_committed_cg = ?ack.last_committed_cg,
        streams = cfg.data_streams,
        "replication link up"
    );
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..cfg.data_streams {
        let (tx, rx) = mpsc::channel(1024);
        txs.push(tx);
        rxs.push(rx);
    }
    let bucket = cfg
        .max_rate
        .map(|r| TokenBucket::new(r, (r / 10).max(2 * max_frame as u64)));
    let last = ack.last_committed_cg;
    let shared = Arc::new(Shared {
        conn: conn.clone(),
        endpoint,
        ctrl: tokio::sync::Mutex::new(send),
        data: txs,
        inflight: Arc::new(Semaphore::new(max_inflight)),
        max_inflight,
        bucket,
        lost: Mutex::new(None),
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
    let s = shared.clone();
    tokio::spawn(async move {
        let e = s.conn.closed().await;
        s.mark_lost(describe_close(&e));
    });
    Ok(shared)
}

/// Turns a handshake-phase failure into the most telling error: the secondary's close
/// reason (e.g. a `Reject` reason or a TLS alert) if the connection was closed.
async fn handshake_failure(conn: &quinn::Connection, what: String) -> LinkError {
    let reason = tokio::time::timeout(Duration::from_millis(500), conn.closed())
        .await
        .ok();
    match reason {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == close_code::REJECTED.into() =>
        {
            let r = String::from_utf8_lossy(&c.reason).to_string();
            tracing::warn!("secondary rejected the connection: {r}");
            LinkError::Rejected(r)
        }
        Some(e) => {
            tracing::warn!(
                "handshake with the secondary failed: {}",
                describe_close(&e)
            );
            LinkError::Connect(describe_close(&e))
        }
        None => {
            conn.close(close_code::NORMAL.into(), b"handshake failed");
            LinkError::Connect(what)
        }
    }
}

/// A connected primary-side link with a blocking API.
pub struct LinkClient {
    rt: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LinkClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkClient")
            .field("server", &self.shared.cfg.server_addr)
            .field("lost", &*lock(&self.shared.lost))
            .finish()
    }
}

impl LinkClient {
    /// Connects to the secondary: QUIC + mutual TLS handshake, `Hello`/`HelloAck`, opens
    /// the data streams. Blocks up to `cfg.connect_timeout`.
    pub fn connect(cfg: ClientConfig) -> Result<LinkClient, LinkError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(LinkError::InsideRuntime);
        }
        let nice = cfg.thread_nice;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("drblk-link")
            .on_thread_start(move || {
                if let Err(e) = crate::sys::priority::set_current_thread_nice(nice) {
                    tracing::warn!(error = %e, nice, "cannot lower the link threads' priority");
                }
            })
            .enable_all()
            .build()
            .map_err(|e| LinkError::Io(format!("tokio runtime: {e}")))?;
        match rt.block_on(connect_async(cfg)) {
            Ok(shared) => Ok(LinkClient {
                rt: Some(rt),
                shared,
            }),
            Err(e) => {
                rt.shutdown_timeout(Duration::from_millis(200));
                Err(e)
            }
        }
    }

    fn block<F: std::future::Future>(&self, f: F) -> Result<F::Output, LinkError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(LinkError::InsideRuntime);
        }
        match &self.rt {
            Some(rt) => Ok(rt.block_on(f)),
            None => Err(LinkError::LinkLost("client closed".into())),
        }
    }

    /// The secondary's handshake answer (its state and last committed CG).
    pub fn hello_ack(&self) -> &HelloAck {
        &self.shared.ack
    }

    /// Ships chunk `index` for CG `cg`. `data` must be exactly the chunk's length (the last
    /// chunk of the disk may be short). Blocks while the in-flight bound or the rate limit
    /// is reached; returns once the chunk is queued (not yet delivered or durable).
    pub fn send_chunk(&self, cg: u64, index: u64, data: &[u8]) -> Result<(), LinkError> {
        self.block(self.shared.send_chunk(cg, index, Some(data)))?
    }

    /// Ships chunk `index` for CG `cg` as all zeroes (e.g. after a discard).
    pub fn send_zero(&self, cg: u64, index: u64) -> Result<(), LinkError> {
        self.block(self.shared.send_chunk(cg, index, None))?
    }

    /// Commits CG `cg`: every chunk labelled `<= cg` sent since the previous commit. Blocks
    /// until the secondary acknowledges that the CG is durable, the commit fails, the link
    /// is lost ([`LinkError::LinkLost`]) or `commit_timeout` passes. CGs must increase.
    pub fn commit(&self, cg: u64, frozen_at_unix_us: u64) -> Result<(), LinkError> {
        self.block(self.shared.commit(cg, frozen_at_unix_us))?
    }

    /// Asks the secondary for its state (bounded by `request_timeout`).
    pub fn status(&self) -> Result<ReplicaStatus, LinkError> {
        self.block(self.shared.status())?
    }

    /// Application-level round trip over the control stream.
    pub fn ping(&self) -> Result<Duration, LinkError> {
        self.block(self.shared.ping())?
    }

    /// Tells the secondary how far the initial full copy is.
    pub fn report_progress(&self, done: u64, total: u64) -> Result<(), LinkError> {
        self.shared.check_alive()?;
        self.block(self.shared.send_ctrl(&Message::Progress { done, total }))?
    }

    /// `Some(reason)` once the link is lost; every later call fails with `LinkLost`.
    pub fn lost(&self) -> Option<String> {
        lock(&self.shared.lost).clone()
    }

    /// Counters and QUIC path statistics.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared.counters;
        let ps = self.shared.conn.stats().path;
        ClientStats {
            chunks_sent: c.chunks.load(Ordering::Relaxed),
            zero_chunks: c.zero.load(Ordering::Relaxed),
            compressed_chunks: c.lz4.load(Ordering::Relaxed),
            data_bytes: c.data.load(Ordering::Relaxed),
            wire_bytes: c.wire.load(Ordering::Relaxed),
            commits_acked: c.acked.load(Ordering::Relaxed),
            rtt: ps.rtt,
            lost_packets: ps.lost_packets,
        }
    }

    /// Closes the link in an orderly way (bounded: at most about one second).
    pub fn close(mut self) {
        self.shutdown(true);
    }

    fn shutdown(&mut self, graceful: bool) {
        let Some(rt) = self.rt.take() else {
            return;
        };
        {
            let mut l = lock(&self.shared.lost);
            if l.is_none() {
                *l = Some("client closed".into());
            }
        }
        self.shared.inflight.close();
        let s = self.shared.clone();
        let fut = async move {
            {
                let mut c = s.ctrl.lock().await;
                let _ = c.finish();
            }
            s.conn.close(close_code::NORMAL.into(), b"bye");
            let _ = tokio::time::timeout(Duration::from_secs(1), s.endpoint.wait_idle()).await;
        };
        if graceful && tokio::runtime::Handle::try_current().is_err() {
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(2), fut).await;
            });
        } else {
            self.shared.conn.close(close_code::NORMAL.into(), b"bye");
        }
        rt.shutdown_background();
    }
}

impl Drop for LinkClient {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}
