//! The write path: recording a write in its queue's current structure before it touches the
//! disk, and ending it when it finishes.

use std::io;
use std::sync::Arc;

use super::engine::{Engine, WriteTicket};
use super::record::Record;
use super::sync::lock;
use crate::blk::tracking::{WriteEnd, WriteGuard};

impl WriteEnd for Record {
    fn end_write(&self, first: u64, last: u64) {
        self.exit(first, last);
    }
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl Engine {
    /// Write path, queue worker `q`, before a write/discard/write-zeroes touches the disk range
    /// `[offset, offset + len)`.
    ///
    /// Records the chunks in this queue's current structure and, if the forming CG still has
    /// to ship one of them, preserves the part it overwrites first (copy-on-write). May block while writes recorded
    /// before the last swap finish (bounded by `max_drain_time`): so a caller must not hold
    /// another unfinished `WriteTicket` when it calls this (a synchronous per-queue data path
    /// never does). Fails only for an invalid queue or range. `len == 0` records nothing.
    pub fn begin_write(&self, q: usize, offset: u64, len: u64) -> io::Result<WriteTicket> {
        let gate = self
            .queues
            .get(q)
            .ok_or_else(|| invalid("cg: no such queue"))?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.cfg.disk_size)
            .ok_or_else(|| invalid("cg: write beyond the end of the disk"))?;
        if len == 0 {
            return Ok(WriteGuard::untracked());
        }
        let (first, last) = self.geometry.chunks_of(offset, len);
        // Recording happens under the queue lock, like the swap of this queue's target: the
        // write is counted and marked either in the old structure (before the swap: shipped in
        // the CG being formed, and the drain waits for this ticket) or in the new one.
        let (rec, drain) = {
            let g = lock(gate);
            g.target.enter(first, last);
            (Arc::clone(&g.target), g.drain.clone())
        };
        let ticket = WriteGuard::new(rec, first, last);
        if let Some(d) = drain {
            self.preserve_range(&d, offset, end);
        }
        Ok(ticket)
    }
}
