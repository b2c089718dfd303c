//! The replication link between a primary and a secondary drblk (DESIGN §5).
//!
//! QUIC (quinn) with mutual TLS 1.3 (rustls + ring) between two sites holding certificates
//! of one private CA ([`certs`]). The primary is the QUIC client ([`LinkClient`], a
//! blocking API for drblk's synchronous CG thread); the secondary is the QUIC server
//! ([`LinkServer`]) handing everything it receives to a pluggable [`ReplicaSink`].
//!
//! * Wire protocol, framing and the chunk/commit ordering rule: [`proto`].
//! * Endpoint, TLS and transport configuration: [`tls`].
//! * Memory bounds: the primary bounds queued chunk bytes with a semaphore
//!   (`max_inflight_bytes`) plus quinn's `send_window`; the secondary bounds buffered bytes
//!   with the QUIC receive windows and reads one frame per data stream at a time, handing
//!   it to the sink synchronously (a slow sink back-pressures the primary through QUIC flow
//!   control). Frames are length-checked before any allocation.
//! * An acknowledgement ([`LinkClient::commit`] returning `Ok`) means the secondary's sink
//!   returned from [`ReplicaSink::commit`], i.e. the CG is durable there; QUIC delivery
//!   alone is never taken as durability.
//! * Bad links are simulated in tests by the impairment proxy of `drblk-testkit`.

pub mod certs;
pub mod client;
pub mod proto;
pub mod ratelimit;
pub mod server;
pub mod tls;

#[cfg(test)]
mod abuse_tests;
#[cfg(test)]
mod tests;

pub use certs::{CertError, SiteIdentity};
pub use client::{ClientConfig, ClientStats, LinkClient, ReplicaStatus};
pub use proto::{
    DiskAck, DiskDesc, DiskState, Hello, HelloAck, RejectReason, ReplicaState, PROTOCOL_VERSION,
};
pub use server::{ChunkData, LinkServer, ReplicaSink, ServerConfig, ServerStats};
pub use tls::{Congestion, Tuning};

/// Worker threads of a link's tokio runtime: two, but never more than the CPUs the calling
/// thread may run on (a daemon pinned to one CPU, e.g. with `taskset`). On one CPU a second
/// worker only takes tasks from the first and doubles the wakeups: measured with
/// `drblk-repl-bench` at 20,000 4 KiB writes/s, the secondary's link threads took 31 % of
/// its CPU with two workers and 18 % with one.
fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(2))
}

/// Errors of the replication link.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// TLS configuration is unusable (bad certificate, key or CA).
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// A local socket or runtime operation failed.
    #[error("I/O: {0}")]
    Io(String),
    /// The connection (QUIC/TLS handshake) could not be established.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The secondary refused the handshake.
    #[error("rejected by the secondary: {0}")]
    Rejected(String),
    /// The link is gone (peer closed it, idle timeout, protocol or storage error).
    /// Everything not yet acknowledged must be considered not replicated.
    #[error("link lost: {0}")]
    LinkLost(String),
    /// The peer violated the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An operation did not complete in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The secondary could not make a CG durable.
    #[error("commit of CG {cg} failed on the secondary: {reason}")]
    CommitFailed {
        /// The CG.
        cg: u64,
        /// The secondary's explanation.
        reason: String,
    },
    /// The caller passed an invalid argument (index out of range, wrong length, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A blocking method was called from inside an async runtime.
    #[error("blocking link API called from inside an async runtime")]
    InsideRuntime,
    /// Certificates could not be loaded.
    #[error(transparent)]
    Cert(std::sync::Arc<CertError>),
}

impl From<CertError> for LinkError {
    fn from(e: CertError) -> Self {
        LinkError::Cert(std::sync::Arc::new(e))
    }
}

/// Identity and geometry of a replicated disk, as both sides must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Disk identity.
    pub uuid: [u8; 16],
    /// Size in bytes.
    pub size: u64,
    /// Chunk (tracking) size in bytes.
    pub chunk_size: u32,
}

impl DiskInfo {
    /// Checks a primary's `Hello` against this (the secondary's) disk; the error is the
    /// `Reject` to send. Intended for [`ReplicaSink::hello`] implementations that keep one
    /// disk: a `Hello` of a group of several is refused with what to do.
    pub fn check(&self, hello: &Hello) -> Result<(), RejectReason> {
        let theirs = hello.single_disk()?;
        if theirs.uuid != self.uuid {
            return Err(RejectReason::DiskUuidMismatch {
                disk: 0,
                ours: self.uuid,
                theirs: theirs.uuid,
            });
        }
        if theirs.size != self.size {
            return Err(RejectReason::DiskSizeMismatch {
                disk: 0,
                ours: self.size,
                theirs: theirs.size,
            });
        }
        if hello.chunk_size != self.chunk_size {
            return Err(RejectReason::ChunkSizeMismatch {
                ours: self.chunk_size,
                theirs: hello.chunk_size,
            });
        }
        Ok(())
    }

    /// Checks the geometry is one the link supports.
    pub fn validate(&self) -> Result<(), LinkError> {
        self.geometry().map(|_| ())
    }

    /// The disk's chunk geometry, if the link supports it.
    pub fn geometry(&self) -> Result<crate::geometry::Geometry, LinkError> {
        let g = crate::geometry::Geometry::new(self.size, u64::from(self.chunk_size))
            .map_err(|e| LinkError::InvalidArgument(e.to_string()))?;
        g.check_replicable()
            .map_err(|e| LinkError::InvalidArgument(e.to_string()))?;
        Ok(g)
    }
}

/// Resolves "host:port" to one socket address.
pub fn resolve(addr: &str) -> anyhow::Result<std::net::SocketAddr> {
    use anyhow::Context;
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("resolving {addr:?} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))
}
