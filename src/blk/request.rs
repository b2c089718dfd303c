//! Parsing and validating one virtio-blk request from a descriptor chain.
//!
//! The checklist (every item is one [`ChainError`]): the header is readable and long
//! enough; the status descriptor is the last one, writable and at least one byte; every data
//! descriptor lies in guest memory and points the way its request type needs; data lengths
//! are multiples of 512; `sector + sectors` fits the disk with checked arithmetic; GET_ID's
//! buffer holds the 20-byte id; discard/write-zeroes segments respect the advertised limits.
//! Nothing here touches the disk: a [`Request`] that comes out is safe to execute.

use thiserror::Error;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::blk::virtio::{DeviceLimits, ID_BYTES, SECTOR_SIZE};

/// virtio-blk request header length (type, reserved, sector).
const HEADER_LEN: u32 = 16;
/// Length of one discard / write-zeroes segment.
const SEGMENT_LEN: u32 = 16;
/// The write-zeroes "unmap" flag of a segment.
pub const SEGMENT_FLAG_UNMAP: u32 = 1;

/// Status byte values written back to the guest.
pub mod status {
    use super::*;
    /// Success.
    pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
    /// Device or driver error.
    pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    /// Request type or flag not supported.
    pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `data` bytes starting at `sector`.
    In,
    /// Write `data` bytes starting at `sector`.
    Out,
    /// Make completed writes durable.
    Flush,
    /// Return the serial number.
    GetId,
    /// Deallocate ranges.
    Discard(Vec<Segment>),
    /// Zero ranges.
    WriteZeroes(Vec<Segment>),
}

/// One range of a discard or write-zeroes request, already bounds-checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub sectors: u32,
    /// Whether the range may be deallocated (write-zeroes only).
    pub unmap: bool,
}

impl Segment {
    /// Byte offset and length on the disk.
    pub fn byte_range(&self) -> (u64, u64) {
        (
            self.sector * SECTOR_SIZE,
            u64::from(self.sectors) * SECTOR_SIZE,
        )
    }
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The operation.
    pub kind: RequestKind,
    /// Start sector (IN/OUT).
    pub sector: u64,
    /// Data buffers in guest memory, in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Total data length in bytes.
    pub data_len: u64,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

impl Request {
    /// The bytes it moves: its data (read, write, get-id) or its ranges (discard,
    /// write-zeroes).
    pub fn bytes(&self) -> u64 {
        match &self.kind {
            RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) => {
                segs.iter().map(|s| s.byte_range().1).sum()
            }
            RequestKind::Flush => 0,
            _ => self.data_len,
        }
    }

    /// Whether the request modifies the disk (and so is recorded for replication).
    pub fn is_write(&self) -> bool {
        matches!(
            self.kind,
            RequestKind::Out | RequestKind::Discard(_) | RequestKind::WriteZeroes(_)
        )
    }
}

/// Why a chain was rejected.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ChainError {
    /// The chain has no descriptor at all or cannot be walked.
    #[error("empty or unreadable descriptor chain")]
    EmptyChain,
    /// The first descriptor is write-only or shorter than the 16-byte header.
    #[error("request header descriptor is write-only or shorter than 16 bytes")]
    BadHeader,
    /// The header lies outside guest memory.
    #[error("request header is outside guest memory")]
    HeaderOutsideMemory,
    /// The last descriptor is not writable, is empty, or lies outside guest memory.
    #[error("status descriptor missing, read-only, empty or outside guest memory")]
    BadStatus,
    /// A data descriptor lies (partly) outside guest memory.
    #[error("data descriptor outside guest memory")]
    DataOutsideMemory,
    /// A data descriptor points the wrong way for the request type.
    #[error("data descriptor direction does not match the request type")]
    WrongDirection,
    /// More data descriptors than seg_max.
    #[error("too many data segments")]
    TooManySegments,
    /// Data length is not a multiple of 512 bytes.
    #[error("data length is not a multiple of 512")]
    Unaligned,
    /// The request reaches past the end of the disk (or its arithmetic overflows).
    #[error("request reaches past the end of the disk")]
    OutOfRange,
    /// GET_ID with a buffer shorter than 20 bytes.
    #[error("GET_ID buffer shorter than 20 bytes")]
    ShortIdBuffer,
    /// A write-class request on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Discard/write-zeroes payload malformed or over the advertised limits.
    #[error("discard/write-zeroes segments malformed or over the advertised limits")]
    BadSegments,
    /// A discard segment with the unmap flag or reserved flags set.
    #[error("unsupported discard/write-zeroes flags")]
    UnsupportedFlags,
    /// Unknown request type.
    #[error("unsupported request type")]
    UnsupportedType,
}

impl ChainError {
    /// The status byte the guest gets for this rejection.
    pub fn status(self) -> u8 {
        match self {
            ChainError::UnsupportedType | ChainError::UnsupportedFlags => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// A rejected request: the reason, and where to put the status byte if there is a usable
/// status descriptor (otherwise the chain is returned to the guest with no status written).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Why.
    pub reason: ChainError,
    /// A valid status location, if the chain has one.
    pub status_addr: Option<GuestAddress>,
}

/// Parses and validates the descriptors of one chain (as yielded by `DescriptorChain`).
pub fn parse<M: GuestMemoryBackend>(
    descs: impl Iterator<Item = Descriptor>,
    mem: &M,
    limits: &DeviceLimits,
) -> Result<Request, Rejected> {
    // Bounded by the chain iterator's own TTL (queue or indirect-table size).
    let descs: Vec<Descriptor> = descs.collect();
    let reject = |reason, status_addr| Rejected {
        reason,
        status_addr,
    };
    let (header, rest) = descs
        .split_first()
        .ok_or(reject(ChainError::EmptyChain, None))?;

    // The status descriptor first, so every later rejection can be reported to the guest.
    let status_addr = match rest.last() {
        Some(s) if s.is_write_only() && s.len() >= 1 && mem.check_range(s.addr(), 1) => {
            Some(s.addr())
        }
        _ => None,
    };
    let Some(status_addr) = status_addr else {
        return Err(reject(ChainError::BadStatus, None));
    };
    let data_descs = &rest[..rest.len() - 1];
    let fail = |reason| Err(reject(reason, Some(status_addr)));

    if header.is_write_only() || header.len() < HEADER_LEN {
        return fail(ChainError::BadHeader);
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    if mem.read_slice(&mut hdr, header.addr()).is_err() {
        return fail(ChainError::HeaderOutsideMemory);
    }
    let req_type = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));

    let (kind_tag, wants_write_only) = match req_type {
        VIRTIO_BLK_T_IN => (VIRTIO_BLK_T_IN, Some(true)),
        VIRTIO_BLK_T_OUT => (VIRTIO_BLK_T_OUT, Some(false)),
        VIRTIO_BLK_T_FLUSH => (VIRTIO_BLK_T_FLUSH, None),
        VIRTIO_BLK_T_GET_ID => (VIRTIO_BLK_T_GET_ID, Some(true)),
        VIRTIO_BLK_T_DISCARD => (VIRTIO_BLK_T_DISCARD, Some(false)),
        VIRTIO_BLK_T_WRITE_ZEROES => (VIRTIO_BLK_T_WRITE_ZEROES, Some(false)),
        _ => return fail(ChainError::UnsupportedType),
    };

    if data_descs.len() > limits.seg_max as usize {
        return fail(ChainError::TooManySegments);
    }
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len: u64 = 0;
    for d in data_descs {
        if let Some(w) = wants_write_only {
            if d.is_write_only() != w {
                return fail(ChainError::WrongDirection);
            }
        }
        if d.len() == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return fail(ChainError::DataOutsideMemory);
        }
        data_len += u64::from(d.len());
        data.push((d.addr(), d.len()));
    }

    let readonly_write = |kind_is_write: bool| limits.readonly && kind_is_write;
    let kind = match kind_tag {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if readonly_write(kind_tag == VIRTIO_BLK_T_OUT) {
                return fail(ChainError::ReadOnly);
            }
            if data_len % SECTOR_SIZE != 0 {
                return fail(ChainError::Unaligned);
            }
            let end = sector.checked_add(data_len / SECTOR_SIZE);
            if end.is_none_or(|e| e > limits.capacity_sectors) {
                return fail(ChainError::OutOfRange);
            }
            if kind_tag == VIRTIO_BLK_T_IN {
                RequestKind::In
            } else {
                RequestKind::Out
            }
        }
        VIRTIO_BLK_T_FLUSH => RequestKind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if data_len < ID_BYTES as u64 {
                return fail(ChainError::ShortIdBuffer);
            }
            RequestKind::GetId
        }
        _ => {
            let is_discard = kind_tag == VIRTIO_BLK_T_DISCARD;
            if limits.readonly {
                return fail(ChainError::ReadOnly);
            }
            let (max_seg, max_sectors) = if is_discard {
                (limits.max_discard_seg, limits.max_discard_sectors)
            } else {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            };
            if data_len == 0
                || data_len % u64::from(SEGMENT_LEN) != 0
                || data_len / u64::from(SEGMENT_LEN) > u64::from(max_seg)
            {
                return fail(ChainError::BadSegments);
            }
            let mut raw = vec![0u8; data_len as usize];
            let mut pos = 0usize;
            for &(addr, len) in &data {
                if mem
                    .read_slice(&mut raw[pos..pos + len as usize], addr)
                    .is_err()
                {
                    return fail(ChainError::DataOutsideMemory);
                }
                pos += len as usize;
            }
            let block_sectors = u64::from(limits.logical_block_size) / SECTOR_SIZE;
            let mut segs = Vec::with_capacity(raw.len() / SEGMENT_LEN as usize);
            for s in raw.chunks_exact(SEGMENT_LEN as usize) {
                let seg_sector = u64::from_le_bytes(s[0..8].try_into().expect("8 bytes"));
                let sectors = u32::from_le_bytes(s[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
                let allowed = if is_discard { 0 } else { SEGMENT_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return fail(ChainError::UnsupportedFlags);
                }
                if sectors > max_sectors
                    || seg_sector % block_sectors != 0
                    || u64::from(sectors) % block_sectors != 0
                {
                    return fail(ChainError::BadSegments);
                }
                let end = seg_sector.checked_add(u64::from(sectors));
                if end.is_none_or(|e| e > limits.capacity_sectors) {
                    return fail(ChainError::OutOfRange);
                }
                segs.push(Segment {
                    sector: seg_sector,
                    sectors,
                    unmap: flags & SEGMENT_FLAG_UNMAP != 0,
                });
            }
            if is_discard {
                RequestKind::Discard(segs)
            } else {
                RequestKind::WriteZeroes(segs)
            }
        }
    };

    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status_addr,
    })
}

#[cfg(test)]
mod tests;
