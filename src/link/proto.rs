//! Wire protocol of the replication link: messages, framing and limits.
//!
//! # Framing
//!
//! Every message travels in one frame:
//!
//! ```text
//! +----------------+---------------------------+-------------------------+
//! | len: u32 LE    | payload: `len` bytes      | crc32c(payload): u32 LE |
//! +----------------+---------------------------+-------------------------+
//! ```
//!
//! The payload is a [`Message`] encoded with `postcard` (compact, varint integers, enum
//! variants as a varint index, byte strings as length + raw bytes so chunk data is copied
//! once and can be borrowed on decode). A frame whose `len` exceeds the limit of the stream
//! it arrives on (at most [`MAX_FRAME_LEN`]), whose checksum does not match, or whose payload
//! does not decode is a protocol error: the receiver logs it and closes the connection.
//!
//! # Streams
//!
//! * **Control stream** — one bidirectional stream opened by the primary. It carries
//!   `Hello` → `HelloAck`/`Reject`, then `Commit` → `CommitAck`/`CommitFailed`,
//!   `StatusRequest` → `Status`, `Heartbeat` → `HeartbeatAck`, and `Progress`.
//! * **Data streams** — N unidirectional streams opened by the primary after `HelloAck`,
//!   carrying only `Extent` frames: `count` contiguous chunks from `first`, inside one
//!   extent region ([`crate::geometry::MAX_EXTENT_BYTES`], aligned). An extent goes on
//!   stream `region % N`, so two versions of the same chunk (whatever extents carry them)
//!   are always delivered in the order they were sent.
//!
//! # Groups of disks
//!
//! `Hello` announces the consistency group's disks (one or more, all of one chunk size);
//! `HelloAck` answers for each, in the same order; every `Extent` and `ChecksumRequest`
//! names its disk by that order's index. A commit covers the extents of every disk: one
//! group, one cut. (Today's secondary serves groups of one disk and refuses others with a
//! reason; `doc/design/multi-disk-groups.md` plans the rest.)
//!
//! # Ordering of chunks and commits
//!
//! Streams are independent, so a `Commit` may overtake extents sent before it. The rule:
//! `Commit { cg, extent_count }` covers every extent labelled with a CG `<= cg` that was
//! sent on this connection and not covered by an earlier commit, and `extent_count` is their
//! number. The secondary processes the commit only once it has handed exactly that many such
//! extents to its sink (it waits for stragglers, bounded in time); receiving more is a
//! protocol error. Extents labelled with a later CG may arrive meanwhile and are not counted.
//! This also covers an abandoned CG: its extents simply ride along with the next commit.
//!
//! # Versioning
//!
//! `Hello` is variant 0 of [`Message`] and its first two fields (`magic`, `protocol_version`)
//! are frozen forever, so a peer of any version can read them and answer a mismatch with a
//! clear `Reject` (the reason is also carried in the QUIC close reason as plain UTF-8).
//! New messages are appended as new variants and require a protocol version bump.

use serde::{Deserialize, Serialize};

/// Version of this wire protocol; both sides must use the same one.
/// 5: a group of disks (`Hello::disks`, `HelloAck::disks`, the disk of each `Extent` and
/// `ChecksumRequest`).
pub const PROTOCOL_VERSION: u16 = 5;

/// Most disks one `Hello` may announce (the consistency group's limit).
pub const MAX_GROUP_DISKS: usize = crate::cg::MAX_DISKS;

/// Magic number at the start of `Hello` ("DRBK").
pub const HELLO_MAGIC: u32 = 0x4452_424B;

/// ALPN protocol identifier negotiated by TLS on both sides.
pub const ALPN: &[u8] = b"drblk/1";

/// Hard upper bound of any frame payload (64 MiB).
pub const MAX_FRAME_LEN: usize = 64 << 20;

/// Upper bound of a frame on the control stream (control messages are small).
pub const MAX_CONTROL_FRAME_LEN: usize = 64 << 10;

/// Largest chunk size the link accepts (16 MiB; see [`crate::geometry`]).
pub const MAX_CHUNK_SIZE: u32 = crate::geometry::MAX_CHUNK_SIZE as u32;

/// Bytes of a frame around its payload (length prefix and checksum).
pub const FRAME_OVERHEAD: usize = 8;

/// Bytes an `Extent` message adds to its data, at most (variant, cg, first, count, tags,
/// lengths).
pub const EXTENT_HEADER_MAX: usize = 48;

/// How often a primary sends a `Heartbeat` on an established link, whatever else it sends:
/// the secondary closes a session silent for [`SILENCE_TIMEOUT`] (a stalled peer must not
/// keep a legitimate primary out).
pub const HEARTBEAT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Default of how long the secondary waits for any frame of an established session before
/// it closes it (six heartbeats).
pub const SILENCE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Longest site name or reason string carried on the wire.
pub const MAX_TEXT_LEN: usize = 1024;

/// QUIC application close codes used by the link.
pub mod close_code {
    /// Orderly shutdown by either side.
    pub const NORMAL: u32 = 0;
    /// The secondary rejected the handshake (reason in the close reason).
    pub const REJECTED: u32 = 1;
    /// A peer sent a malformed or unexpected message.
    pub const PROTOCOL_ERROR: u32 = 2;
    /// The secondary's storage failed to accept data.
    pub const SINK_ERROR: u32 = 3;
    /// The server is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// The peer's certificate is not for the expected site.
    pub const UNAUTHORIZED: u32 = 5;
}

/// The secondary's state as its handshake reports it: the replica store's own type.
pub use crate::replica::ReplicaState;

/// The primary's opening message on the control stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`HELLO_MAGIC`]. Frozen: must stay the first field.
    pub magic: u32,
    /// Always [`PROTOCOL_VERSION`] of the sender. Frozen: must stay the second field.
    pub protocol_version: u16,
    /// The group's disks, in the order `disk` indexes them (1 to [`MAX_GROUP_DISKS`]).
    pub disks: Vec<DiskDesc>,
    /// Tracking/shipping granularity in bytes (the same for every disk of the group).
    pub chunk_size: u32,
    /// Last CG the primary knows to be committed on the secondary (`None`: never).
    pub last_committed_cg: Option<u64>,
    /// Name of the sending site (as in its certificate).
    pub site: String,
    /// The primary's role and lineage (`None`: a sender that keeps none, e.g. a test
    /// client); the secondary decides with it what may be synchronised
    /// ([`crate::lineage::decide`]).
    pub lineage: Option<crate::lineage::Lineage>,
    /// The primary holds writes that are in no group the secondary committed (its side of
    /// a split brain, if the secondary was promoted meanwhile).
    pub unshipped: bool,
}

impl Hello {
    /// The disk, when the group announced has exactly one; otherwise the refusal of a
    /// secondary that serves one disk, saying what to do.
    pub fn single_disk(&self) -> Result<DiskDesc, RejectReason> {
        match self.disks[..] {
            [d] => Ok(d),
            [] => Err(RejectReason::Other("the Hello announces no disk".into())),
            _ => Err(RejectReason::Other(format!(
                "the primary replicates a group of {} disks; this secondary serves one disk: \
                 run one secondary per disk, or start the primary with one disk",
                self.disks.len()
            ))),
        }
    }
}

/// One disk of the group a `Hello` announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDesc {
    /// Identity of the disk.
    pub uuid: [u8; 16],
    /// Size in bytes.
    pub size: u64,
}

/// Where one disk of the group stands on the secondary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskState {
    /// Its image holds the group's last committed cut.
    Member,
    /// Its image is being filled by a full copy (none of the group's cuts yet).
    Syncing {
        /// Chunks of the copy done.
        done_chunks: u64,
        /// Chunks of the copy in total.
        total_chunks: u64,
    },
}

/// The secondary's answer about one disk of the group, in `HelloAck`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskAck {
    /// Where the disk stands.
    pub state: DiskState,
    /// Byte ranges `(offset, length)` the secondary itself wrote since the groups it
    /// shares with the primary (an old primary rejoining after a failover, its own
    /// unreplicated writes, discarded on the operator's word): the primary ships them on
    /// top of its own changes, in the first group of this connection.
    pub resync_also: Vec<(u64, u64)>,
    /// The secondary is syncing onto an image that was there before (its state was reset,
    /// or an earlier sync was interrupted): compare by checksums and ship only what
    /// differs, rather than the whole disk.
    pub compare_first: bool,
}

/// The secondary's acceptance of a `Hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// The secondary's protocol version (equal to the primary's when accepted).
    pub protocol_version: u16,
    /// Last CG committed on the secondary (`None`: never).
    pub last_committed_cg: Option<u64>,
    /// The secondary's replication state.
    pub state: ReplicaState,
    /// Name of the answering site.
    pub site: String,
    /// One answer per disk of the `Hello`, in its order.
    pub disks: Vec<DiskAck>,
}

/// Why a secondary refused a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The peers speak different protocol versions.
    VersionMismatch {
        /// Version of the secondary.
        ours: u16,
        /// Version of the primary.
        theirs: u16,
    },
    /// The primary replicates a different disk.
    DiskUuidMismatch {
        /// The disk's index in the group.
        disk: u16,
        /// Disk identity held by the secondary.
        ours: [u8; 16],
        /// Disk identity announced by the primary.
        theirs: [u8; 16],
    },
    /// The disk sizes differ.
    DiskSizeMismatch {
        /// The disk's index in the group.
        disk: u16,
        /// Size held by the secondary.
        ours: u64,
        /// Size announced by the primary.
        theirs: u64,
    },
    /// The chunk sizes differ.
    ChunkSizeMismatch {
        /// Chunk size of the secondary.
        ours: u32,
        /// Chunk size announced by the primary.
        theirs: u32,
    },
    /// The secondary already serves a primary connection.
    Busy,
    /// The secondary was promoted and no longer accepts replication.
    Promoted,
    /// Anything else, explained in text.
    Other(String),
}

/// Names a disk of a group in a refusal (the first one, or the only one, needs no name).
fn which(disk: u16) -> String {
    if disk == 0 {
        String::new()
    } else {
        format!("disk {disk} of the group: ")
    }
}

fn hex(u: &[u8; 16]) -> String {
    u.iter().map(|b| format!("{b:02x}")).collect()
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RejectReason::VersionMismatch { ours, theirs } => write!(
                f,
                "protocol version mismatch: secondary speaks v{ours}, primary v{theirs}; run the same drblk release on both sites"
            ),
            RejectReason::DiskUuidMismatch { disk, ours, theirs } => write!(
                f,
                "{}disk uuid mismatch: secondary holds {}, primary sends {}; the secondary keeps another disk's replica: point --replicate-to at this disk's secondary, or give the secondary a new --disk",
                which(*disk),
                hex(ours),
                hex(theirs)
            ),
            RejectReason::DiskSizeMismatch { disk, ours, theirs } => write!(
                f,
                "{}disk size mismatch: secondary holds {ours} bytes, primary sends {theirs} bytes; give the secondary a new --disk for this size",
                which(*disk)
            ),
            RejectReason::ChunkSizeMismatch { ours, theirs } => write!(
                f,
                "chunk size mismatch: secondary uses {ours} bytes, primary {theirs} bytes; restart the primary with --chunk-size {ours}, or give the secondary a new --disk"
            ),
            RejectReason::Busy => write!(
                f,
                "secondary already serves a primary connection (another primary's, of another site or another disk, or this primary's old session, which did not end in time); stop the other primary (one primary per replica), or retry"
            ),
            RejectReason::Promoted => write!(
                f,
                "secondary was promoted; replication refused: it is the primary now; to fail back, stop this primary and run its disk as the new primary's secondary (README: DR runbook)"
            ),
            RejectReason::Other(s) => write!(f, "{s}"),
        }
    }
}

/// Extent content as carried on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WirePayload<'a> {
    /// Uncompressed bytes.
    Raw(#[serde(with = "serde_bytes", borrow)] &'a [u8]),
    /// LZ4 block-compressed bytes (no size prefix); decompresses to the extent's length.
    Lz4(#[serde(with = "serde_bytes", borrow)] &'a [u8]),
    /// The extent is all zeroes.
    Zero,
}

/// One message of the link protocol. See the module documentation for who sends what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message<'a> {
    /// Primary → secondary, first frame of the control stream. Must stay variant 0.
    Hello(Hello),
    /// Secondary → primary: handshake accepted.
    HelloAck(HelloAck),
    /// Secondary → primary: handshake refused; the connection is closed afterwards.
    Reject(RejectReason),
    /// Primary → secondary on a data stream: one extent shipped for CG `cg`.
    Extent {
        /// The disk (index in the `Hello`'s list).
        disk: u16,
        /// CG the extent is shipped for.
        cg: u64,
        /// First chunk (offset / chunk_size).
        first: u64,
        /// Chunks (at least 1, inside one extent region).
        count: u64,
        /// Content.
        #[serde(borrow)]
        payload: WirePayload<'a>,
    },
    /// Primary → secondary: CG `cg` is complete (see the ordering rule).
    Commit {
        /// The CG to make visible.
        cg: u64,
        /// When the CG was frozen on the primary, µs since the Unix epoch.
        frozen_at_unix_us: u64,
        /// Number of extents with a CG label `<= cg` sent since the previous commit.
        extent_count: u64,
    },
    /// Secondary → primary: CG `cg` is durable and visible on the secondary.
    CommitAck {
        /// The committed CG.
        cg: u64,
    },
    /// Secondary → primary: CG `cg` could not be committed because the secondary's storage
    /// failed (a full or failing disk; the primary backs off). A protocol violation closes
    /// the connection instead.
    CommitFailed {
        /// The CG that failed.
        cg: u64,
        /// Why.
        reason: String,
    },
    /// Primary → secondary: ask for a `Status` report.
    StatusRequest {
        /// Echoed in the answer.
        seq: u64,
    },
    /// Secondary → primary: state report.
    Status {
        /// The request's sequence number.
        seq: u64,
        /// Current state of the secondary.
        state: ReplicaState,
        /// Last committed CG on the secondary.
        last_committed_cg: Option<u64>,
    },
    /// Either direction: liveness probe at application level.
    Heartbeat {
        /// Echoed in the answer.
        seq: u64,
        /// Sender's clock, µs since the Unix epoch.
        sent_at_unix_us: u64,
    },
    /// Answer to `Heartbeat`.
    HeartbeatAck {
        /// The heartbeat's sequence number.
        seq: u64,
        /// The heartbeat's `sent_at_unix_us`, echoed.
        sent_at_unix_us: u64,
    },
    /// Primary → secondary: progress of the initial full copy.
    Progress {
        /// Chunks of the initial copy shipped so far.
        done: u64,
        /// Chunks of the initial copy in total.
        total: u64,
    },
    /// Primary → secondary, between groups: the crc32c of each of `count` chunks from
    /// `first` of the replica image, as of the last committed group (verify, checksum
    /// resync). At most [`MAX_CHECKSUM_CHUNKS`].
    ChecksumRequest {
        /// Echoed in the answer.
        seq: u64,
        /// The disk (index in the `Hello`'s list).
        disk: u16,
        /// First chunk.
        first: u64,
        /// Chunks.
        count: u64,
    },
    /// Secondary → primary: the answer to `ChecksumRequest`.
    Checksums {
        /// The request's sequence number.
        seq: u64,
        /// crc32c of each chunk (the last chunk: of its bytes inside the disk).
        crcs: Vec<u32>,
    },
}

/// The most chunks one `ChecksumRequest` asks for (its answer stays well inside
/// [`MAX_CONTROL_FRAME_LEN`]).
pub const MAX_CHECKSUM_CHUNKS: u64 = 8192;

impl Message<'_> {
    /// Short name of the message kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::HelloAck(_) => "HelloAck",
            Message::Reject(_) => "Reject",
            Message::Extent { .. } => "Extent",
            Message::Commit { .. } => "Commit",
            Message::CommitAck { .. } => "CommitAck",
            Message::CommitFailed { .. } => "CommitFailed",
            Message::StatusRequest { .. } => "StatusRequest",
            Message::Status { .. } => "Status",
            Message::Heartbeat { .. } => "Heartbeat",
            Message::HeartbeatAck { .. } => "HeartbeatAck",
            Message::Progress { .. } => "Progress",
            Message::ChecksumRequest { .. } => "ChecksumRequest",
            Message::Checksums { .. } => "Checksums",
        }
    }
}

/// A malformed frame or message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix exceeds the stream's limit.
    #[error("frame too large: {len} bytes (limit {limit})")]
    Oversize {
        /// Announced length.
        len: usize,
        /// Limit of the stream.
        limit: usize,
    },
    /// The checksum does not match the payload.
    #[error("frame checksum mismatch: got {got:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Checksum in the frame.
        got: u32,
        /// Checksum of the received payload.
        computed: u32,
    },
    /// The payload is not a valid message.
    #[error("undecodable message: {0}")]
    Decode(#[from] postcard::Error),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Reading the stream failed.
    #[error("stream read failed: {0}")]
    Read(String),
}

/// Encodes `msg` as one complete frame (length, payload, checksum).
pub fn encode_frame(msg: &Message<'_>) -> Result<Vec<u8>, postcard::Error> {
    let hint = match msg {
        Message::Extent {
            payload: WirePayload::Raw(d) | WirePayload::Lz4(d),
            ..
        } => d.len() + EXTENT_HEADER_MAX + FRAME_OVERHEAD,
        _ => 256,
    };
    let mut buf = Vec::with_capacity(hint);
    buf.extend_from_slice(&[0u8; 4]);
    let mut buf = postcard::to_io(msg, buf)?;
    let len = buf.len() - 4;
    let crc = crc32c::crc32c(&buf[4..]);
    buf.extend_from_slice(&crc.to_le_bytes());
    let len32 = u32::try_from(len).map_err(|_| postcard::Error::SerializeBufferFull)?;
    buf[..4].copy_from_slice(&len32.to_le_bytes());
    Ok(buf)
}

/// Decodes a frame payload (already checked) into a message borrowing from it.
pub fn decode_payload(payload: &[u8]) -> Result<Message<'_>, FrameError> {
    Ok(postcard::from_bytes(payload)?)
}

/// Checks the checksum of a received payload.
pub fn check_crc(payload: &[u8], crc: u32) -> Result<(), FrameError> {
    let computed = crc32c::crc32c(payload);
    if computed != crc {
        return Err(FrameError::BadChecksum { got: crc, computed });
    }
    Ok(())
}

/// The frozen prefix of a `Hello` payload: variant index, magic and protocol version.
#[derive(Deserialize)]
struct HelloPrefix {
    variant: u32,
    magic: u32,
    protocol_version: u16,
}

/// Reads the frozen prefix of a first control frame: `Some(version)` if it is a `Hello`
/// with the right magic, whatever the rest of it looks like.
pub fn peek_hello_version(payload: &[u8]) -> Option<u16> {
    let (p, _) = postcard::take_from_bytes::<HelloPrefix>(payload).ok()?;
    (p.variant == 0 && p.magic == HELLO_MAGIC).then_some(p.protocol_version)
}

/// Reads one frame from a QUIC receive stream into `buf` (reused between calls).
///
/// Returns `Ok(false)` if the stream ended cleanly before a new frame, `Ok(true)` when `buf`
/// holds a checked payload.
pub async fn read_frame(
    stream: &mut quinn::RecvStream,
    buf: &mut Vec<u8>,
    limit: usize,
) -> Result<bool, FrameError> {
    let mut hdr = [0u8; 4];
    match stream.read_exact(&mut hdr).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(false),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Read(e.to_string())),
    }
    let len = u32::from_le_bytes(hdr) as usize;
    let limit = limit.min(MAX_FRAME_LEN);
    if len > limit {
        return Err(FrameError::Oversize { len, limit });
    }
    buf.clear();
    buf.resize(len + 4, 0);
    match stream.read_exact(&mut buf[..]).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Read(e.to_string())),
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&buf[len..]);
    buf.truncate(len);
    check_crc(buf, u32::from_le_bytes(crc))?;
    Ok(true)
}

pub use crate::sys::clock::now_unix_micros as now_unix_us;

/// Truncates a string to at most [`MAX_TEXT_LEN`] bytes on a char boundary.
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_TEXT_LEN {
        return s.to_string();
    }
    let mut end = MAX_TEXT_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_roundtrip_and_hello_prefix() {
        let hello = Message::Hello(Hello {
            magic: HELLO_MAGIC,
            protocol_version: 7,
            disks: vec![
                DiskDesc {
                    uuid: [1; 16],
                    size: 1 << 30,
                },
                DiskDesc {
                    uuid: [2; 16],
                    size: 1 << 20,
                },
            ],
            chunk_size: 65536,
            last_committed_cg: Some(3),
            site: "primary".into(),
            lineage: Some(crate::lineage::Lineage::new_primary()),
            unshipped: true,
        });
        let f = encode_frame(&hello).unwrap();
        let len = u32::from_le_bytes(f[..4].try_into().unwrap()) as usize;
        assert_eq!(f.len(), len + 8);
        let payload = &f[4..4 + len];
        check_crc(
            payload,
            u32::from_le_bytes(f[4 + len..].try_into().unwrap()),
        )
        .unwrap();
        assert_eq!(decode_payload(payload).unwrap(), hello);
        assert_eq!(peek_hello_version(payload), Some(7));
        // An extent never passes for a Hello.
        let data = vec![9u8; 1 << 20];
        let c = Message::Extent {
            disk: u16::MAX,
            cg: u64::MAX,
            first: u64::MAX,
            count: 256,
            payload: WirePayload::Raw(&data),
        };
        let f = encode_frame(&c).unwrap();
        assert!(f.len() <= data.len() + EXTENT_HEADER_MAX + FRAME_OVERHEAD);
        assert_eq!(peek_hello_version(&f[4..f.len() - 4]), None);
        assert_eq!(decode_payload(&f[4..f.len() - 4]).unwrap(), c);
    }

    #[test]
    fn garbage_never_panics() {
        for n in 0..2000usize {
            let v = drblk_testkit::rng::pattern(n as u64, n % 97);
            let _ = decode_payload(&v);
            let _ = peek_hello_version(&v);
        }
    }
}
