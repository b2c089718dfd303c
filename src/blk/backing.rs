//! What a served device reads and writes: the image itself ([`Disk`]) on a primary, or a
//! drill's copy-on-write view of a replica on a secondary (`crate::drill`). The executor
//! sees only this trait, so both go through the same parsing, validation and queues.

use std::io;
use std::path::Path;

use crate::blk::disk::Disk;

/// Storage behind a vhost-user-blk device. Every call is bounds-checked by the
/// implementation: nothing may read or write outside `[0, size)`.
pub trait Backing: Send + Sync {
    /// The path shown to operators (the image, or the drill's overlay directory).
    fn path(&self) -> &Path;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn readonly(&self) -> bool;
    /// Reads into the host buffers `iov` (each `(ptr, len)`), starting at `offset`.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes for the duration of the call.
    unsafe fn readv_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()>;
    /// Writes the host buffers `iov` starting at `offset` (the buffers are only read).
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads for the duration of the call.
    unsafe fn writev_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Deallocates a range: later reads return zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes a range read as zeroes; with `unmap` it may be deallocated.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

/// `Ok` if `[offset, offset + len)` lies inside a disk of `size` bytes; the one error a
/// request past the end gets, whatever serves it.
pub fn check_range(offset: u64, len: u64, size: u64) -> io::Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("range {offset}+{len} is outside the disk ({size} bytes)"),
        )),
    }
}

impl Backing for Disk {
    fn path(&self) -> &Path {
        Disk::path(self)
    }
    fn size(&self) -> u64 {
        Disk::size(self)
    }
    fn readonly(&self) -> bool {
        Disk::readonly(self)
    }
    unsafe fn readv_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { Disk::readv_at(self, iov, offset) }
    }
    unsafe fn writev_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { Disk::writev_at(self, iov, offset) }
    }
    fn flush(&self) -> io::Result<()> {
        Disk::flush(self)
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        Disk::discard(self, offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        Disk::write_zeroes(self, offset, len, unmap)
    }
}
