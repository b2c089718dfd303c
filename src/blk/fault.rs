//! Disk faults for tests (feature `fault-injection`, off in every build a user runs): the
//! image of `drblk serve` fails chosen guest writes with ENOSPC or EIO, as a full or failing
//! disk would, without root or a special filesystem.
//!
//! `DRBLK_FAULT_WRITES=ERRNO,skip=N,fail=M` (see [`crate::sys::fault_plan`]): the image's
//! writes number N+1 to N+M (counting every guest write, discard and write-zeroes the
//! backing receives) fail with that error and change nothing; the others go through.

use std::io;
use std::path::Path;
use std::sync::Arc;

use crate::blk::backing::Backing;
use crate::sys::fault_plan::{FaultCounter, WriteFaults};

/// A backing whose writes fail as its plan says.
pub struct FaultyBacking {
    inner: Arc<dyn Backing>,
    faults: FaultCounter,
}

impl FaultyBacking {
    /// `inner` with `plan`.
    pub fn new(inner: Arc<dyn Backing>, plan: WriteFaults) -> Self {
        FaultyBacking {
            inner,
            faults: FaultCounter::new(plan),
        }
    }

    fn next_write(&self) -> io::Result<()> {
        self.faults.next_write()
    }
}

/// The image wrapped by `DRBLK_FAULT_WRITES`'s plan, or as it is.
pub fn wrap(disk: Arc<dyn Backing>) -> Arc<dyn Backing> {
    match WriteFaults::from_env("DRBLK_FAULT_WRITES") {
        Some(plan) => {
            tracing::warn!(?plan, "fault injection: the image's writes fail as planned");
            Arc::new(FaultyBacking::new(disk, plan))
        }
        None => disk,
    }
}

impl Backing for FaultyBacking {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn readonly(&self) -> bool {
        self.inner.readonly()
    }
    unsafe fn readv_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.readv_at(iov, offset) }
    }
    unsafe fn writev_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        self.next_write()?;
        // SAFETY: forwarded from the caller.
        unsafe { self.inner.writev_at(iov, offset) }
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.next_write()?;
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.next_write()?;
        self.inner.write_zeroes(offset, len, unmap)
    }
}
