//! Comparing the primary's disk with the secondary's replica by checksums (DESIGN.md §4,
//! *Verify*): the secondary computes the crc32c of its chunks; only checksums cross the
//! link. Used by `drblk ctl verify` and by the checksum resync that replaces a full copy
//! when no change record says what differs.
//!
//! # Why a chunk compared equal really is equal
//! It runs in the cycle thread between groups: the secondary holds (applied) its last
//! committed group and nothing is in flight. A chunk is compared only if the engine has it
//! clean both before the primary's read and after it: a write marks its chunk from
//! `begin_write` on, before it touches the disk, and no bit is cleared while no group
//! commits. So the bytes read are the primary's state as of that group — exactly what the
//! secondary holds, if it holds the same group. A chunk dirty at either moment is skipped:
//! it ships with the next group anyway.

use std::io;
use std::time::{Duration, Instant};

use crate::cg::Engine;
use crate::geometry::Geometry;
use crate::link::proto::MAX_CHECKSUM_CHUNKS;
use crate::link::LinkClient;
use crate::replica::chunk_crcs;

/// How many differing chunks a report lists.
const LISTED: usize = 32;

/// Bytes of disk one checksum request covers at most.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;

/// What a comparison found so far.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Comparison {
    /// Chunks compared.
    pub compared: u64,
    /// Chunks skipped because the guest wrote them meanwhile (they ship anyway).
    pub skipped_dirty: u64,
    /// Chunks that differ.
    pub differing: u64,
    /// The first differing chunks (at most 32).
    pub first_differing: Vec<u64>,
    /// Bytes of disk compared.
    pub bytes: u64,
    /// Seconds spent comparing.
    pub seconds: f64,
}

/// Compares `chunks` of disk `disk` (whose engine is `engine`), calling `on_differ` for
/// each differing chunk; stops early (returning the chunk to resume at) when `budget` has
/// passed. Returns `chunks.end` when done.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    client: &LinkClient,
    disk: u16,
    engine: &Engine,
    chunks: std::ops::Range<u64>,
    budget: Duration,
    stop: Option<&std::sync::atomic::AtomicBool>,
    out: &mut Comparison,
    mut on_differ: impl FnMut(u64),
) -> io::Result<u64> {
    let t0 = Instant::now();
    let cfg = engine.config();
    let geo = Geometry::new(cfg.disk_size, cfg.chunk_size)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let (first, end) = (chunks.start, chunks.end.min(geo.chunks()));
    let chunk = geo.chunk_size() as usize;
    let mut buf = Vec::new();
    let mut ours = Vec::new();
    // At most 32 MiB per request, whatever the chunk size.
    let per_request = MAX_CHECKSUM_CHUNKS.min((MAX_REQUEST_BYTES / geo.chunk_size()).max(1));
    let mut i = first;
    while i < end {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst)) {
            return Err(io::Error::other("stopped"));
        }
        let n = per_request.min(end - i);
        let words = n.div_ceil(64) as usize;
        let (mut before, mut after) = (vec![0u64; words], vec![0u64; words]);
        engine.unacked_in(i, i + n, &mut before);
        let off = geo.chunk_offset(i);
        let len = geo.chunk_offset(i + n - 1) + geo.chunk_len(i + n - 1).unwrap_or(0) as u64 - off;
        buf.resize(len as usize, 0);
        engine.source().read_at(&mut buf, off)?;
        engine.unacked_in(i, i + n, &mut after);
        ours.clear();
        chunk_crcs(&buf, chunk, &mut ours);
        let theirs = client
            .checksums(disk, i, n)
            .map_err(|e| io::Error::other(format!("checksums from the secondary: {e}")))?;
        for k in 0..n as usize {
            let dirty = (before[k / 64] | after[k / 64]) >> (k % 64) & 1 == 1;
            if dirty {
                out.skipped_dirty += 1;
                continue;
            }
            out.compared += 1;
            out.bytes += geo.chunk_len(i + k as u64).unwrap_or(0) as u64;
            if ours[k] != theirs[k] {
                out.differing += 1;
                if out.first_differing.len() < LISTED {
                    out.first_differing.push(i + k as u64);
                }
                on_differ(i + k as u64);
            }
        }
        i += n;
        if t0.elapsed() >= budget {
            break;
        }
    }
    out.seconds += t0.elapsed().as_secs_f64();
    Ok(i)
}
