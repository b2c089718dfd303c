//! Secondary side of the link: accepts one primary at a time and hands what it receives to
//! a pluggable [`ReplicaSink`].
//!
//! Per connection: the QUIC/TLS handshake (client certificate verified against the CA;
//! failures are logged with rustls' reason), then `Hello` on the control stream: protocol
//! version checked by the link, the leaf certificate must be valid for the site name the
//! primary claims, the server must not already serve a primary (`Busy`), and
//! [`ReplicaSink::hello`] decides on disk identity and geometry. After `HelloAck` the data
//! streams are read (one task per stream, one frame at a time; each extent is validated and
//! handed to [`ReplicaSink::extent`]), and commits are processed in order by one task that
//! first waits until all extents the commit covers were handed to the sink, then calls
//! [`ReplicaSink::commit_then_finish`] and sends `CommitAck` when the sink says the group is
//! durable (it may go on applying it after that).
//!
//! Any malformed frame or protocol violation closes the connection with a log line; the
//! server keeps accepting the next connection. Sink methods are called on one thread of their
//! own (`sink_thread.rs`), so they may block on disk I/O.
//!
//! Files: `accept.rs` accepts and handshakes connections and refuses peers; `session.rs`
//! runs an accepted connection (data streams, extent validation, commits); `sink_thread.rs`
//! is the thread every call into the sink runs on; this file holds
//! the sink interface, the configuration and the [`LinkServer`] owning the runtime.

mod accept;
mod session;
mod sink_thread;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::certs::SiteIdentity;
use super::proto::{close_code, Hello, HelloAck, RejectReason, ReplicaState};
use super::tls::{self, Tuning};
use super::LinkError;

/// Content of a received extent, as handed to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkData<'a> {
    /// The extent's bytes (already decompressed; exactly the extent's length).
    Data(&'a [u8]),
    /// The extent is all zeroes; `len` is its length.
    Zero {
        /// Length of the extent in bytes.
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
/// Calls for one connection: `hello`, then any number of `extent` (concurrently from
/// several data streams, but versions of one chunk arrive in sending order, whatever
/// extents carry them),
/// `commit` (sequential, in CG order), `progress`, `status`, and finally `disconnected`.
pub trait ReplicaSink: Send + Sync + 'static {
    /// Accepts or refuses a primary. The link already checked the protocol version and
    /// that the peer's certificate matches `hello.site`; the sink checks the disk identity
    /// and geometry (see [`DiskInfo::check`](super::DiskInfo::check)) and answers with its
    /// state.
    fn hello(&self, hello: &Hello, peer: &PeerInfo) -> Result<HelloAck, RejectReason>;

    /// Stages one extent shipped for CG `cg`: `count` chunks from `first` of disk `disk`
    /// (its index in the `Hello`'s list), inside that disk and one extent region (the link
    /// checked it). An error closes the connection.
    fn extent(
        &self,
        disk: u16,
        cg: u64,
        first: u64,
        count: u64,
        data: ChunkData<'_>,
    ) -> anyhow::Result<()>;

    /// Makes everything staged with a CG label `<= cg` durable and visible atomically.
    /// The primary gets `CommitAck` only after this returns `Ok`; an error is reported as
    /// `CommitFailed` and the connection is closed.
    fn commit(&self, cg: u64, frozen_at_unix_us: u64, extent_count: u64) -> anyhow::Result<()>;

    /// [`commit`](Self::commit), calling `acknowledge` as soon as the group is durable,
    /// then finishing whatever the group still needs (applying it in place) before it
    /// returns; the link acknowledges the group to the primary when `acknowledge` is
    /// called, so the primary's recovery point does not wait for that work. An error after
    /// `acknowledge` closes the connection (the group stays durable). The default commits,
    /// then acknowledges.
    fn commit_then_finish(
        &self,
        cg: u64,
        frozen_at_unix_us: u64,
        extent_count: u64,
        acknowledge: &mut dyn FnMut(),
    ) -> anyhow::Result<()> {
        self.commit(cg, frozen_at_unix_us, extent_count)?;
        acknowledge();
        Ok(())
    }

    /// Current state and last committed CG, for `Status` reports.
    fn status(&self) -> (ReplicaState, Option<u64>);

    /// Progress of the initial full copy, as reported by the primary.
    fn progress(&self, _done: u64, _total: u64) {}

    /// crc32c of each of `count` chunks from `first` of disk `disk` of the replica, as of
    /// its last committed group (the link checked the range). The default keeps no image.
    fn checksums(&self, _disk: u16, _first: u64, _count: u64) -> anyhow::Result<Vec<u32>> {
        anyhow::bail!("this secondary keeps no image to compare")
    }

    /// The connection ended; chunks staged since the last commit belong to an abandoned CG.
    fn disconnected(&self, _reason: &str) {}
}

/// A shared sink is a sink (the server holds one reference, its owner another).
impl<T: ReplicaSink> ReplicaSink for std::sync::Arc<T> {
    fn hello(&self, hello: &Hello, peer: &PeerInfo) -> Result<HelloAck, RejectReason> {
        (**self).hello(hello, peer)
    }
    fn extent(
        &self,
        disk: u16,
        cg: u64,
        first: u64,
        count: u64,
        data: ChunkData<'_>,
    ) -> anyhow::Result<()> {
        (**self).extent(disk, cg, first, count, data)
    }
    fn commit(&self, cg: u64, frozen_at_unix_us: u64, extent_count: u64) -> anyhow::Result<()> {
        (**self).commit(cg, frozen_at_unix_us, extent_count)
    }
    fn commit_then_finish(
        &self,
        cg: u64,
        frozen_at_unix_us: u64,
        extent_count: u64,
        acknowledge: &mut dyn FnMut(),
    ) -> anyhow::Result<()> {
        (**self).commit_then_finish(cg, frozen_at_unix_us, extent_count, acknowledge)
    }
    fn status(&self) -> (ReplicaState, Option<u64>) {
        (**self).status()
    }
    fn progress(&self, done: u64, total: u64) {
        (**self).progress(done, total)
    }
    fn checksums(&self, disk: u16, first: u64, count: u64) -> anyhow::Result<Vec<u32>> {
        (**self).checksums(disk, first, count)
    }
    fn disconnected(&self, reason: &str) {
        (**self).disconnected(reason)
    }
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
    /// How long a commit may wait for its missing extents with no extent arriving at all.
    pub commit_stall_timeout: Duration,
    /// How long a session may send no frame at all (a primary sends a heartbeat every
    /// [`crate::link::proto::HEARTBEAT_INTERVAL`]) before it is closed, freeing the secondary for
    /// another connection.
    pub silence_timeout: Duration,
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
            silence_timeout: crate::link::proto::SILENCE_TIMEOUT,
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
    /// Chunks handed to the sink (in extents).
    pub chunks: u64,
    /// Extents handed to the sink (one message each).
    pub extents: u64,
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
    extents: AtomicU64,
    commits: AtomicU64,
}

struct ServerShared {
    cfg: ServerConfig,
    sink: Arc<dyn ReplicaSink>,
    /// Where every call into `sink` runs.
    sink_thread: sink_thread::SinkThread,
    busy: AtomicBool,
    /// The session being served (while `busy`): a new connection from the same site for
    /// the same disks replaces it (`accept.rs`).
    current: Mutex<Option<Serving>>,
    /// Told when `busy` is cleared.
    freed: tokio::sync::Notify,
    counters: Counters,
    /// Rate limit of the lines about refused connection attempts (`accept.rs`).
    refusals: crate::sys::log_limit::LogLimiter,
    /// Rate limit of the lines about primaries rejected after their `Hello`.
    rejections: crate::sys::log_limit::LogLimiter,
}

/// Who the server serves: a restarted primary is recognised by its site and its disks.
#[derive(Clone)]
struct Serving {
    site: String,
    disks: Vec<super::proto::DiskDesc>,
    chunk_size: u32,
    conn: quinn::Connection,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
            .worker_threads(super::runtime_workers())
            .thread_name("drblk-link-srv")
            .enable_all()
            .build()
            .map_err(|e| LinkError::Io(format!("tokio runtime: {e}")))?;
        let sc = tls::server_config(&cfg.identity, &cfg.tuning, cfg.max_data_streams)?;
        let endpoint = {
            let _g = rt.enter();
            tls::endpoint(cfg.listen, Some((sc, &cfg.identity)), &cfg.tuning)?
        };
        let shared = Arc::new(ServerShared {
            cfg,
            sink: Arc::new(sink),
            sink_thread: sink_thread::SinkThread::start()
                .map_err(|e| LinkError::Io(format!("sink thread: {e}")))?,
            busy: AtomicBool::new(false),
            current: Mutex::new(None),
            freed: tokio::sync::Notify::new(),
            counters: Counters::default(),
            refusals: crate::sys::log_limit::LogLimiter::new(Duration::from_secs(10)),
            rejections: crate::sys::log_limit::LogLimiter::new(Duration::from_secs(10)),
        });
        let accept = rt.spawn(accept::accept_loop(shared.clone(), endpoint.clone()));
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
            extents: c.extents.load(Ordering::Relaxed),
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
        self.shared.sink_thread.close();
    }
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.stop();
    }
}
