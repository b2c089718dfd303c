//! Executing validated requests against the disk, straight from/to guest memory.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use crate::blk::backing::Backing;
use crate::blk::fence::Fence;
use crate::blk::request::{status, Request, RequestKind};
use crate::blk::tracking::{Tracking, WriteGuard};
use crate::blk::virtio::{ID_BYTES, SECTOR_SIZE};

/// State shared by every queue of one disk: the image and its identity.
pub struct Executor {
    disk: Arc<dyn Backing>,
    serial: [u8; ID_BYTES],
    /// Writeback cache enabled (virtio CONFIG_WCE). When off, every write is made durable
    /// before its completion (write-through).
    writeback: AtomicBool,
    /// Write tracking and the completion gate, when the disk is replicated: it sees every
    /// write before the write touches the disk.
    tracking: Option<Arc<dyn Tracking>>,
    /// Raised when the disk is demoted: writes fail from then on.
    fence: Fence,
    /// Failed requests are logged through this.
    failures: crate::sys::log_limit::LogLimiter,
}

/// Outcome of one request: its status byte and how many bytes were written to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Status byte.
    pub status: u8,
    /// Bytes written into guest buffers (excluding the status byte).
    pub written: u32,
}

impl Executor {
    /// Creates an executor for `disk` with GET_ID answering `serial` (truncated to 20 bytes).
    pub fn new(disk: Arc<dyn Backing>, serial: &str, tracking: Option<Arc<dyn Tracking>>) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Executor {
            disk,
            serial: id,
            writeback: AtomicBool::new(true),
            tracking,
            fence: Fence::default(),
            failures: crate::sys::log_limit::LogLimiter::new(std::time::Duration::from_secs(10)),
        }
    }

    /// The disk (or a drill's view).
    pub fn disk(&self) -> &Arc<dyn Backing> {
        &self.disk
    }

    /// Sets the cache mode the guest asked for (virtio-blk `wce`).
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
        tracing::info!(
            mode = if on { "writeback" } else { "writethrough" },
            "guest set cache mode"
        );
    }

    /// Whether the writeback cache is on.
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// Executes `req` for queue `queue`. Errors become IOERR with a log line; never a panic.
    pub fn execute(&self, queue: usize, req: &Request, mem: &GuestMemoryMmap<()>) -> Outcome {
        match self.run(queue, req, mem) {
            Ok(written) => Outcome {
                status: status::OK,
                written,
            },
            Err(e) => {
                // A full or failing disk fails every request: one line per 10 s, counted.
                if let Some(a) = self.failures.admit() {
                    tracing::warn!(queue, kind = ?req.kind, sector = req.sector, error = %e, "request failed{}", a.note());
                }
                Outcome {
                    status: status::IOERR,
                    written: 0,
                }
            }
        }
    }

    /// The write fence (raised by a demotion).
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Write tracking and the completion gate, if the disk is replicated.
    pub fn tracking(&self) -> Option<&Arc<dyn Tracking>> {
        self.tracking.as_ref()
    }

    /// Records a write of `[offset, offset+len)` before it touches the disk. The ticket is
    /// dropped once the disk write has finished (successfully or not): until then the drain
    /// does not read the chunks it covers.
    fn record(&self, queue: usize, offset: u64, len: u64) -> io::Result<Option<WriteGuard>> {
        match &self.tracking {
            Some(e) => e.begin_write(queue, offset, len).map(Some),
            None => Ok(None),
        }
    }

    fn run(&self, queue: usize, req: &Request, mem: &GuestMemoryMmap<()>) -> io::Result<u32> {
        let offset = req.sector * SECTOR_SIZE;
        match &req.kind {
            RequestKind::In => {
                let iov = host_buffers(mem, req)?;
                // SAFETY: every buffer was resolved from guest memory that stays mapped while
                // `mem` (a snapshot of the memory table) is alive; the parser checked that each
                // descriptor is write-only (device-writable) and lies inside guest memory.
                unsafe { self.disk.readv_at(&iov, offset)? };
                Ok(req.data_len as u32)
            }
            RequestKind::Out => {
                let iov = host_buffers(mem, req)?;
                let _passage = self.fence.pass(queue)?;
                let _guard = self.record(queue, offset, req.data_len)?;
                // SAFETY: as above; pwritev only reads the guest buffers.
                unsafe { self.disk.writev_at(&iov, offset)? };
                if !self.writeback() {
                    self.disk.flush()?;
                }
                Ok(0)
            }
            RequestKind::Flush => {
                self.disk.flush()?;
                Ok(0)
            }
            RequestKind::GetId => {
                let mut pos = 0usize;
                for &(addr, len) in &req.data {
                    if pos >= ID_BYTES {
                        break;
                    }
                    let n = (len as usize).min(ID_BYTES - pos);
                    mem.write_slice(&self.serial[pos..pos + n], addr)
                        .map_err(io::Error::other)?;
                    pos += n;
                }
                Ok(pos as u32)
            }
            RequestKind::Discard(segs) => {
                let _passage = self.fence.pass(queue)?;
                for s in segs {
                    let (off, len) = s.byte_range();
                    let _guard = self.record(queue, off, len)?;
                    self.disk.discard(off, len)?;
                }
                Ok(0)
            }
            RequestKind::WriteZeroes(segs) => {
                let _passage = self.fence.pass(queue)?;
                for s in segs {
                    let (off, len) = s.byte_range();
                    let _guard = self.record(queue, off, len)?;
                    self.disk.write_zeroes(off, len, s.unmap)?;
                }
                if !self.writeback() {
                    self.disk.flush()?;
                }
                Ok(0)
            }
        }
    }
}

/// Resolves the request's data buffers to host (pointer, length) pairs, splitting any buffer
/// that spans two memory regions.
fn host_buffers(mem: &GuestMemoryMmap<()>, req: &Request) -> io::Result<Vec<(*mut u8, usize)>> {
    let mut out = Vec::with_capacity(req.data.len());
    for &(addr, len) in &req.data {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len as usize) {
            let slice = slice.map_err(io::Error::other)?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}
