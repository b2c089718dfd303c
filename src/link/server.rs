//! Secondary side of the link: accepts one primary at a time and hands what it receives to
//! a pluggable [`ReplicaSink`].
//!
//! Per connection: the QUIC/TLS handshake (client certificate verified against the CA;
//! failures are logged with rustls' reason), then `Hello` on the control stream: protocol
//! version checked by the link, the leaf certificate must be valid for the site name the
//! primary claims, the server must not already serve a primary (`Busy`), and
//! [`ReplicaSink::hello`] decides on disk identity and geometry. After `HelloAck` the data
//! streams are read (one task per stream, one frame at a time; each chunk is validated and
//! handed to [`ReplicaSink::chunk`]), and commits are processed in order by one task that
//! first waits until all chunks the commit covers were handed to the sink, then calls
//! [`ReplicaSink::commit`] and only then sends `CommitAck`.
//!
//! Any malformed frame or protocol violation closes the connection with a log line; the
//! server keeps accepting the next connection. Sink methods are called from runtime
//! threads via `block_in_place`/`spawn_blocking`, so they may block on disk I/O.

use crate::geometry::Geometry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch, Semaphore};

use super::certs::SiteIdentity;
use super::proto::{self, close_code, encode_frame, Hello, HelloAck, Message, RejectReason};
use super::proto::{ReplicaState, WirePayload};
use super::tls::{self, Tuning};
use super::LinkError;

/// Content of a received chunk, as handed to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkData<'a> {
    /// The chunk's bytes (already decompressed; exactly the chunk's length).
    Data(&'a [u8]),
    /// The chunk is all zeroes; `len` is its length.
    Zero {
        /// Length of the chunk in bytes.
        len: usize,
    },
}

/// Who connected, as far as TLS and `Hello` tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// UDP address of the primary.
    pub addr: SocketAddr,
    /// Site name claimed in `Hello` (verified against the certificate).
    pub site: String,
}

/// The secondary's storage, as seen by the link. Implemented by drblk's staging journal.
///
/// Calls for one connection: `hello`, then any number of `chunk` (concurrently from
/// several data streams, but versions of one chunk index arrive in sending order),
/// `commit` (sequential, in CG order), `progress`, `status`, and finally `disconnected`.
pub trait ReplicaSink: Send + Sync + 'static {
    /// Accepts or refuses a primary. The link already checked the protocol version and
    /// that the peer's certificate matches `hello.site`; the sink checks the disk identity
    /// and geometry (see [`DiskInfo::check`](super::DiskInfo::check)) and answers with its
    /// state.
    fn hello(&self, hello: &Hello, peer: &PeerInfo) -> Result<HelloAck, RejectReason>;

    /// Stages one chunk shipped for CG `cg`. An error closes the connection.
    fn chunk(&self, cg: u64, index: u64, data: ChunkData<'_>) -> anyhow::Result<()>;

    /// Makes everything staged with a CG label `<= cg` durable and visible atomically.
    /// The primary gets `CommitAck` only after this returns `Ok`; an error is reported as
    /// `CommitFailed` and the connection is closed.
    fn commit(&self, cg: u64, frozen_at_unix_us: u64, chunk_count: u64) -> anyhow::Result<()>;

    /// Current state and last committed CG, for `Status` reports.
    fn status(&self) -> (ReplicaState, Option<u64>);

    /// Progress of the initial full copy, as reported by the primary.
    fn progress(&self, _done: u64, _total: u64) {}

    /// The connection ended; chunks staged since the last commit belong to an abandoned CG.
    fn disconnected(&self, _reason: &str) {}
}

/// Configuration of the secondary's link server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// This site's certificates.
    pub identity: SiteIdentity,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// If set, only a primary whose certificate is valid for this site name is accepted.
    pub expected_peer: Option<String>,
    /// Most data streams a primary may open.
    pub max_data_streams: u32,
    /// Transport tuning.
    pub tuning: Tuning,
    /// Bound of the QUIC/TLS handshake and of waiting for `Hello`.
    pub handshake_timeout: Duration,
    /// How long a commit may wait for its missing chunks with no chunk arriving at all.
    pub commit_stall_timeout: Duration,
    /// Most concurrent connection attempts being handshaken.
    pub max_handshakes: usize,
}

impl ServerConfig {
    /// A configuration with defaults: 16 data streams, 10 s handshake, 30 s commit stall,
    /// 16 concurrent handshakes, default tuning.
    pub fn new(identity: SiteIdentity, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            identity,
            listen,
            expected_peer: None,
            max_data_streams: 16,
            tuning: Tuning::default(),
            handshake_timeout: Duration::from_secs(10),
            commit_stall_timeout: Duration::from_secs(30),
            max_handshakes: 16,
        }
    }
}

/// Counters of a server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Connections whose TLS handshake succeeded.
    pub connections: u64,
    /// Connection attempts failing TLS (bad or missing certificate, wrong ALPN, ...).
    pub tls_failures: u64,
    /// Handshakes answered with `Reject`.
    pub rejected: u64,
    /// Connections closed for a protocol violation or malformed frame.
    pub protocol_errors: u64,
    /// Chunks handed to the sink.
    pub chunks: u64,
    /// CGs acknowledged.
    pub commits: u64,
}

#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    tls_failures: AtomicU64,
    rejected: AtomicU64,
    protocol_errors: AtomicU64,
    chunks: AtomicU64,
    commits: AtomicU64,
}

struct ServerShared {
    cfg: ServerConfig,
    sink: Arc<dyn ReplicaSink>,
    busy: AtomicBool,
    counters: Counters,
}

/// Per-connection state after `HelloAck`.
struct Session {
    srv: Arc<ServerShared>,
    conn: quinn::Connection,
    peer: PeerInfo,
    disk_size: u64,
    chunk_size: u32,
    ctrl: tokio::sync::Mutex<quinn::SendStream>,
    /// Chunks handed to the sink per CG label, and the last processed commit.
    counts: Mutex<(BTreeMap<u64, u64>, Option<u64>)>,
    progress: watch::Sender<u64>,
}

/// Most distinct uncommitted CG labels a primary may have outstanding.
const MAX_OPEN_CGS: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
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

    async fn send_ctrl(&self, msg: &Message<'_>) -> Result<(), String> {
        let frame = encode_frame(msg).map_err(|e| e.to_string())?;
        let mut s = self.ctrl.lock().await;
        s.write_all(&frame).await.map_err(|e| e.to_string())
    }

    /// Validates one chunk frame and hands it to the sink.
    fn on_chunk(&self, msg: Message<'_>, scratch: &mut Vec<u8>) -> Result<(), String> {
        let Message::Chunk { cg, index, payload } = msg else {
            return Err(format!("unexpected {} on a data stream", msg.kind()));
        };
        let len = Geometry::new(self.disk_size, u64::from(self.chunk_size))
            .ok()
            .and_then(|g| g.chunk_len(index))
            .ok_or_else(|| format!("chunk index {index} beyond the disk"))?;
        if lock(&self.counts).1.is_some_and(|c| cg <= c) {
            return Err(format!(
                "chunk {index} for CG {cg}, which is already committed"
            ));
        }
        let data = match payload {
            WirePayload::Zero => ChunkData::Zero { len },
            WirePayload::Raw(d) if d.len() == len => ChunkData::Data(d),
            WirePayload::Raw(d) => {
                return Err(format!("chunk {index}: {} bytes, expected {len}", d.len()))
            }
            WirePayload::Lz4(c) => {
                scratch.clear();
                scratch.resize(len, 0);
                match lz4_flex::block::decompress_into(c, scratch) {
                    Ok(n) if n == len => ChunkData::Data(scratch),
                    Ok(n) => {
                        return Err(format!("chunk {index}: lz4 gave {n} bytes, expected {len}"))
                    }
                    Err(e) => return Err(format!("chunk {index}: bad lz4 data: {e}")),
                }
            }
        };
        let sink = &self.srv.sink;
        tokio::task::block_in_place(|| sink.chunk(cg, index, data))
            .map_err(|e| format!("sink failed to stage chunk {index} of CG {cg}: {e:#}"))
            .map_err(|e| {
                // A storage failure is not the primary's fault: distinct close code.
                tracing::error!(peer = %self.peer.addr, "{e}; closing the connection");
                self.conn
                    .close(close_code::SINK_ERROR.into(), proto::clip(&e).as_bytes());
                e
            })?;
        {
            let mut c = lock(&self.counts);
            if c.1.is_some_and(|last| cg <= last) {
                return Err(format!(
                    "chunk {index} for CG {cg} arrived after its commit was complete"
                ));
            }
            if !c.0.contains_key(&cg) && c.0.len() >= MAX_OPEN_CGS {
                return Err(format!("more than {MAX_OPEN_CGS} uncommitted CGs"));
            }
            *c.0.entry(cg).or_insert(0) += 1;
        }
        self.srv.counters.chunks.fetch_add(1, Ordering::Relaxed);
        self.progress.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Waits until the chunks a commit covers were all staged, then commits.
    async fn on_commit(&self, cg: u64, frozen: u64, count: u64) -> Result<(), String> {
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
                        "commit of CG {cg} announces {count} chunks, {have} received"
                    ));
                }
            }
            match tokio::time::timeout(self.srv.cfg.commit_stall_timeout, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err("session ended".into()),
                Err(_) => {
                    let reason = format!(
                        "commit of CG {cg}: chunks missing, none arrived for {:?}",
                        self.srv.cfg.commit_stall_timeout
                    );
                    let _ = self
                        .send_ctrl(&Message::CommitFailed {
                            cg,
                            reason: reason.clone(),
                        })
                        .await;
                    return Err(reason);
                }
            }
        }
        {
            let mut c = lock(&self.counts);
            let later = c.0.split_off(&(cg + 1));
            c.0 = later;
            c.1 = Some(cg);
        }
        let sink = self.srv.sink.clone();
        let res = tokio::task::spawn_blocking(move || sink.commit(cg, frozen, count))
            .await
            .map_err(|e| anyhow::anyhow!("sink commit panicked: {e}"))
            .and_then(|r| r);
        match res {
            Ok(()) => {
                self.srv.counters.commits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(cg, count, "CG committed");
                self.send_ctrl(&Message::CommitAck { cg }).await
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

async fn data_reader(s: Arc<Session>, mut recv: quinn::RecvStream) {
    let limit = s.chunk_size as usize + proto::CHUNK_HEADER_MAX;
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    loop {
        match proto::read_frame(&mut recv, &mut buf, limit).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(proto::FrameError::Read(_)) => return, // connection gone; logged elsewhere
            Err(e) => return s.protocol_error(&format!("data stream: {e}")),
        }
        let res = match proto::decode_payload(&buf) {
            Ok(m) => s.on_chunk(m, &mut scratch),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = res {
            return s.protocol_error(&e);
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
            Ok(true) => {}
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
                chunk_count,
            } => commits
                .send((cg, frozen_at_unix_us, chunk_count))
                .await
                .map_err(|_| "commit worker gone".to_string()),
            Message::StatusRequest { seq } => {
                let sink = s.srv.sink.clone();
                let (state, last) = tokio::task::block_in_place(|| sink.status());
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
                let sink = s.srv.sink.clone();
                tokio::task::block_in_place(|| sink.progress(done, total));
                Ok(())
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

/// Sends `Reject`, waits (bounded) until the primary has read it, then closes.
async fn reject(
    srv: &ServerShared,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    addr: SocketAddr,
    site: &str,
    r: RejectReason,
) {
    srv.counters.rejected.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(peer = %addr, site, "rejecting primary: {r}");
    let text = proto::clip(&r.to_string());
    if let Ok(frame) = encode_frame(&Message::Reject(r)) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }
    conn.close(close_code::REJECTED.into(), text.as_bytes());
}

async fn handle_connection(
    srv: Arc<ServerShared>,
    incoming: quinn::Incoming,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
) {
    let addr = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %addr, "connection attempt failed: {e}");
            return;
        }
    };
    let conn = match tokio::time::timeout(srv.cfg.handshake_timeout, connecting).await {
        Err(_) => {
            srv.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, "QUIC/TLS handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            srv.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, "QUIC/TLS handshake failed, peer refused: {e}");
            return;
        }
        Ok(Ok(c)) => c,
    };
    srv.counters.connections.fetch_add(1, Ordering::Relaxed);
    let chain = tls::peer_chain(&conn).unwrap_or_default();
    if let Some(expected) = &srv.cfg.expected_peer {
        if !tls::cert_matches_site(&chain, expected) {
            srv.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, "peer certificate is not for site {expected:?}; refused");
            conn.close(
                close_code::UNAUTHORIZED.into(),
                b"certificate not for the expected site",
            );
            return;
        }
    }
    // Hello, bounded in time.
    let first = async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        match proto::read_frame(&mut recv, &mut buf, proto::MAX_CONTROL_FRAME_LEN).await {
            Ok(true) => Ok((send, recv, buf)),
            Ok(false) => Err("control stream ended before Hello".to_string()),
            Err(e) => Err(format!("malformed first frame: {e}")),
        }
    };
    let (send, recv, buf) = match tokio::time::timeout(srv.cfg.handshake_timeout, first).await {
        Err(_) => {
            tracing::warn!(peer = %addr, "no Hello within {:?}; closing", srv.cfg.handshake_timeout);
            conn.close(close_code::PROTOCOL_ERROR.into(), b"no Hello");
            return;
        }
        Ok(Err(e)) => {
            srv.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, "handshake failed: {e}; closing");
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                proto::clip(&e).as_bytes(),
            );
            return;
        }
        Ok(Ok(x)) => x,
    };
    match proto::peek_hello_version(&buf) {
        Some(proto::PROTOCOL_VERSION) => {}
        Some(v) => {
            let r = RejectReason::VersionMismatch {
                ours: proto::PROTOCOL_VERSION,
                theirs: v,
            };
            return reject(&srv, &conn, send, addr, "?", r).await;
        }
        None => {
            srv.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, "first frame is not a Hello; closing");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"expected Hello");
            return;
        }
    }
    let hello = match proto::decode_payload(&buf) {
        Ok(Message::Hello(h)) => h,
        Ok(m) => {
            tracing::warn!(peer = %addr, "expected Hello, got {}; closing", m.kind());
            conn.close(close_code::PROTOCOL_ERROR.into(), b"expected Hello");
            return;
        }
        Err(e) => {
            srv.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %addr, "undecodable Hello: {e}; closing");
            conn.close(close_code::PROTOCOL_ERROR.into(), b"undecodable Hello");
            return;
        }
    };
    let site = proto::clip(&hello.site);
    if !tls::cert_matches_site(&chain, &site) {
        let r = RejectReason::Other(format!(
            "Hello claims site {site:?}, but the client certificate is not for that name"
        ));
        return reject(&srv, &conn, send, addr, &site, r).await;
    }
    if srv
        .busy
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return reject(&srv, &conn, send, addr, &site, RejectReason::Busy).await;
    }
    let peer = PeerInfo {
        addr,
        site: site.clone(),
    };
    let sink = srv.sink.clone();
    let ack = match tokio::task::block_in_place(|| sink.hello(&hello, &peer)) {
        Ok(ack) => ack,
        Err(r) => {
            srv.busy.store(false, Ordering::Release);
            return reject(&srv, &conn, send, addr, &site, r).await;
        }
    };
    let (progress, _) = watch::channel(0u64);
    let session = Arc::new(Session {
        srv: srv.clone(),
        conn: conn.clone(),
        peer,
        disk_size: hello.disk_size,
        chunk_size: hello.chunk_size,
        ctrl: tokio::sync::Mutex::new(send),
        counts: Mutex::new((BTreeMap::new(), ack.last_committed_cg)),
        progress,
    });
    let ack = HelloAck {
        protocol_version: proto::PROTOCOL_VERSION,
        ..ack
    };
    if let Err(e) = session.send_ctrl(&Message::HelloAck(ack.clone())).await {
        tracing::warn!(peer = %addr, "sending HelloAck failed: {e}");
    } else {
        tracing::info!(
            peer = %addr, site = %site, state = %ack.state,
            last_committed_cg = ?ack.last_committed_cg,
            "primary connected"
        );
        let (ctx, crx) = mpsc::channel(16);
        tokio::spawn(control_reader(session.clone(), recv, ctx));
        tokio::spawn(commit_worker(session.clone(), crx));
        let s = session.clone();
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
    drop(handshake_permit);
    let reason = match conn.closed().await {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "closed by the primary (code {}): {}",
            c.error_code,
            String::from_utf8_lossy(&c.reason)
        ),
        quinn::ConnectionError::LocallyClosed => "closed locally".into(),
        quinn::ConnectionError::TimedOut => "idle timeout: no packet from the primary".into(),
        e => e.to_string(),
    };
    tracing::info!(peer = %addr, site = %site, "primary disconnected: {reason}");
    // Let the session's tasks observe the closed connection before the sink is told.
    drop(session);
    let sink = srv.sink.clone();
    let r2 = reason.clone();
    let _ = tokio::task::spawn_blocking(move || sink.disconnected(&r2)).await;
    srv.busy.store(false, Ordering::Release);
}

/// A running secondary link server (owns its runtime).
pub struct LinkServer {
    rt: Option<tokio::runtime::Runtime>,
    endpoint: quinn::Endpoint,
    shared: Arc<ServerShared>,
    accept: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for LinkServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkServer")
            .field("listen", &self.endpoint.local_addr().ok())
            .finish()
    }
}

impl LinkServer {
    /// Binds the endpoint and starts accepting primaries in the background.
    pub fn start(cfg: ServerConfig, sink: impl ReplicaSink) -> Result<LinkServer, LinkError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(LinkError::InsideRuntime);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("drblk-link-srv")
            .enable_all()
            .build()
            .map_err(|e| LinkError::Io(format!("tokio runtime: {e}")))?;
        let sc = tls::server_config(&cfg.identity, &cfg.tuning, cfg.max_data_streams)?;
        let endpoint = {
            let _g = rt.enter();
            tls::endpoint(cfg.listen, Some(sc), &cfg.tuning)?
        };
        let shared = Arc::new(ServerShared {
            cfg,
            sink: Arc::new(sink),
            busy: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let ep = endpoint.clone();
        let srv = shared.clone();
        let accept = rt.spawn(async move {
            let handshakes = Arc::new(Semaphore::new(srv.cfg.max_handshakes.max(1)));
            while let Some(incoming) = ep.accept().await {
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::warn!(peer = %incoming.remote_address(), "too many handshakes; refused");
                    incoming.refuse();
                    continue;
                };
                tokio::spawn(handle_connection(srv.clone(), incoming, permit));
            }
        });
        tracing::info!(listen = ?endpoint.local_addr().ok(), "replication link server listening");
        Ok(LinkServer {
            rt: Some(rt),
            endpoint,
            shared,
            accept: Some(accept),
        })
    }

    /// Starts a server and blocks the calling thread while it runs (until the endpoint is
    /// closed; in practice for the life of the daemon).
    pub fn serve(cfg: ServerConfig, sink: impl ReplicaSink) -> Result<(), LinkError> {
        let mut s = LinkServer::start(cfg, sink)?;
        if let (Some(rt), Some(accept)) = (&s.rt, s.accept.take()) {
            let _ = rt.block_on(accept);
        }
        s.stop();
        Ok(())
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        self.endpoint
            .local_addr()
            .map_err(|e| LinkError::Io(e.to_string()))
    }

    /// Counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        ServerStats {
            connections: c.connections.load(Ordering::Relaxed),
            tls_failures: c.tls_failures.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
            chunks: c.chunks.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
        }
    }

    /// Closes every connection and stops the server (bounded: about one second).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.endpoint
            .close(close_code::SHUTDOWN.into(), b"server shutting down");
        if let Some(rt) = self.rt.take() {
            if tokio::runtime::Handle::try_current().is_err() {
                let ep = self.endpoint.clone();
                rt.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
                });
            }
            rt.shutdown_background();
        }
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.stop();
    }
}
