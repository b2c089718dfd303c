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
//!
//! Files: `connect.rs` sets a connection up (endpoint, TLS, `Hello`/`HelloAck`, data
//! streams); `session.rs` runs it (chunks, commits, status, heartbeats, loss detection);
//! this file holds the configuration and the blocking [`LinkClient`] owning the runtime.

mod connect;
mod session;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::certs::SiteIdentity;
use super::proto::{close_code, HelloAck, Message, ReplicaState};
use super::tls::Tuning;
use super::{DiskInfo, LinkError};
use crate::sys::priority::ShipThreads;
use session::Shared;

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
    /// The replicated disks, in the consistency group's order (a disk's position is its
    /// index on the link), 1 to [`MAX_GROUP_DISKS`](super::proto::MAX_GROUP_DISKS), all
    /// with the same chunk size.
    pub disks: Vec<DiskInfo>,
    /// Last CG the primary knows committed on the secondary, sent in `Hello`.
    pub last_committed_cg: Option<u64>,
    /// The primary's lineage, sent in the `Hello`.
    pub lineage: Option<crate::lineage::Lineage>,
    /// The primary holds writes not yet in a group the secondary committed.
    pub unshipped: bool,
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
    /// Niceness and CPUs of the link's threads (see [`crate::sys::priority`]).
    pub threads: ShipThreads,
}

impl ClientConfig {
    /// A configuration with defaults: 4 data streams, 64 MiB in flight, no rate limit,
    /// no compression, zero detection on, default tuning, bind on `0.0.0.0:0` (or `[::]:0`);
    /// one disk (set [`disks`](Self::disks) for a group of several).
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
            disks: vec![disk],
            last_committed_cg: None,
            lineage: None,
            unshipped: false,
            data_streams: 4,
            max_inflight_bytes: 64 << 20,
            max_rate: None,
            compress: false,
            detect_zero: true,
            tuning: Tuning::default(),
            connect_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(10),
            threads: ShipThreads::default(),
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
    /// Chunks queued (in extents).
    pub chunks_sent: u64,
    /// Extents queued (one message each).
    pub extents_sent: u64,
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
    /// Bytes sent in UDP datagrams (QUIC packets with their headers, acknowledgements and
    /// retransmissions included; without the IP and UDP headers).
    pub udp_tx_bytes: u64,
    /// UDP datagrams sent.
    pub udp_tx_datagrams: u64,
    /// Current QUIC round-trip estimate.
    pub rtt: Duration,
    /// QUIC packets lost so far (as detected by quinn).
    pub lost_packets: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Describes why the secondary's connection closed, for errors and logs.
fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            format!("closed by the secondary (code {}): {reason}", c.error_code)
        }
        quinn::ConnectionError::TimedOut => "idle timeout: no packet from the secondary".into(),
        quinn::ConnectionError::Reset => {
            "the secondary restarted (it reset the old connection); reconnecting".into()
        }
        other => other.to_string(),
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
        let threads = cfg.threads.clone();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(super::runtime_workers())
            .thread_name("drblk-link")
            .on_thread_start(move || threads.apply("link thread"))
            .enable_all()
            .build()
            .map_err(|e| LinkError::Io(format!("tokio runtime: {e}")))?;
        let connected = async move {
            let link = connect::establish(&cfg).await?;
            Ok::<_, LinkError>(Shared::start(cfg, link))
        };
        match rt.block_on(connected) {
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

    /// Ships the extent of `count` chunks from `first` of disk `disk` (its index in
    /// [`ClientConfig::disks`]) for CG `cg`, in one message. It must lie inside one extent
    /// region ([`crate::geometry::Geometry::extent_len`]) and `data` must be exactly its
    /// length (the last chunk of the disk may be short). An all-zero extent travels as a
    /// marker. Blocks while the in-flight bound or the rate limit is reached; returns once
    /// the extent is queued (not yet delivered or durable).
    pub fn send_extent(
        &self,
        disk: u16,
        cg: u64,
        first: u64,
        count: u64,
        data: &[u8],
    ) -> Result<(), LinkError> {
        self.block(self.shared.send_extent(disk, cg, first, count, Some(data)))?
    }

    /// Ships the extent of `count` chunks from `first` of disk `disk` for CG `cg` as all
    /// zeroes.
    pub fn send_zero_extent(
        &self,
        disk: u16,
        cg: u64,
        first: u64,
        count: u64,
    ) -> Result<(), LinkError> {
        self.block(self.shared.send_extent(disk, cg, first, count, None))?
    }

    /// Ships chunk `index` of disk 0 for CG `cg` (an extent of one chunk).
    pub fn send_chunk(&self, cg: u64, index: u64, data: &[u8]) -> Result<(), LinkError> {
        self.send_extent(0, cg, index, 1, data)
    }

    /// Ships chunk `index` of disk 0 for CG `cg` as all zeroes (e.g. after a discard).
    pub fn send_zero(&self, cg: u64, index: u64) -> Result<(), LinkError> {
        self.send_zero_extent(0, cg, index, 1)
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

    /// The secondary's crc32c of each of `count` (at most
    /// [`MAX_CHECKSUM_CHUNKS`](super::proto::MAX_CHECKSUM_CHUNKS)) chunks from `first` of
    /// disk `disk`, as of its last committed group. Ask between groups.
    pub fn checksums(&self, disk: u16, first: u64, count: u64) -> Result<Vec<u32>, LinkError> {
        self.block(self.shared.checksums(disk, first, count))?
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

    /// Encoded frame bytes written to the data streams so far (headers included): what the
    /// extents cost on the wire. Cheap (one atomic load).
    pub fn wire_bytes(&self) -> u64 {
        self.shared.counters.wire.load(Ordering::Relaxed)
    }

    /// `Some(reason)` once the secondary said it could not store a group (a full or failing
    /// disk there): the link itself was fine.
    /// Told by `CommitFailed`, or by the connection's close code (`SINK_ERROR`), which
    /// quinn keeps from the moment the close arrived: whichever call first saw the link
    /// fail, this answers the same.
    pub fn storage_failure(&self) -> Option<String> {
        if let Some(r) = lock(&self.shared.storage_failure).clone() {
            return Some(r);
        }
        match self.shared.conn.close_reason()? {
            quinn::ConnectionError::ApplicationClosed(c)
                if c.error_code == close_code::SINK_ERROR.into() =>
            {
                Some(String::from_utf8_lossy(&c.reason).into_owned())
            }
            _ => None,
        }
    }

    /// `Some(reason)` once the link is lost; every later call fails with `LinkLost`.
    pub fn lost(&self) -> Option<String> {
        lock(&self.shared.lost).clone()
    }

    /// Counters and QUIC path statistics.
    pub fn stats(&self) -> ClientStats {
        let c = &self.shared.counters;
        let stats = self.shared.conn.stats();
        let ps = stats.path;
        ClientStats {
            udp_tx_bytes: stats.udp_tx.bytes,
            udp_tx_datagrams: stats.udp_tx.datagrams,
            chunks_sent: c.chunks.load(Ordering::Relaxed),
            extents_sent: c.extents.load(Ordering::Relaxed),
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
