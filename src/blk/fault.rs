//! Disk faults for tests (feature `fault-injection`, off in every build a user runs): the
//! image of `drblk serve` fails chosen guest writes with ENOSPC or EIO, as a full or failing
//! disk would, without root or a special filesystem.
//!
//! `DRBLK_FAULT_WRITES=ERRNO,skip=N,fail=M` (ERRNO `ENOSPC` or `EIO`): the image's writes
//! number N+1 to N+M (counting every guest write, discard and write-zeroes the backing
//! receives) fail with that error and change nothing; the others go through.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::blk::backing::Backing;

/// Which writes fail, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFaults {
    /// The errno they fail with.
    pub errno: i32,
    /// Writes that go through first.
    pub skip: u64,
    /// Writes that fail after those.
    pub fail: u64,
}

impl WriteFaults {
    /// Parses `ERRNO,skip=N,fail=M`.
    pub fn parse(text: &str) -> Result<WriteFaults, String> {
        let mut parts = text.split(',');
        let errno = match parts.next().map(str::trim) {
            Some("ENOSPC") => libc::ENOSPC,
            Some("EIO") => libc::EIO,
            other => return Err(format!("unknown errno {other:?} (ENOSPC or EIO)")),
        };
        let (mut skip, mut fail) = (0, 0);
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or(format!("{p:?}: expected key=value"))?;
            let v: u64 = v.trim().parse().map_err(|e| format!("{p:?}: {e}"))?;
            match k.trim() {
                "skip" => skip = v,
                "fail" => fail = v,
                k => return Err(format!("unknown key {k:?} (skip, fail)")),
            }
        }
        Ok(WriteFaults { errno, skip, fail })
    }

    /// The plan in `DRBLK_FAULT_WRITES`, if set.
    pub fn from_env() -> Option<WriteFaults> {
        let text = std::env::var("DRBLK_FAULT_WRITES").ok()?;
        match WriteFaults::parse(&text) {
            Ok(f) => Some(f),
            Err(e) => panic!("DRBLK_FAULT_WRITES={text:?}: {e}"),
        }
    }
}

/// A backing whose writes fail as its plan says.
pub struct FaultyBacking {
    inner: Arc<dyn Backing>,
    plan: WriteFaults,
    writes: AtomicU64,
}

impl FaultyBacking {
    /// `inner` with `plan`.
    pub fn new(inner: Arc<dyn Backing>, plan: WriteFaults) -> Self {
        FaultyBacking {
            inner,
            plan,
            writes: AtomicU64::new(0),
        }
    }

    fn next_write(&self) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n >= self.plan.skip && n < self.plan.skip + self.plan.fail {
            return Err(io::Error::from_raw_os_error(self.plan.errno));
        }
        Ok(())
    }
}

/// The image wrapped by `DRBLK_FAULT_WRITES`'s plan, or as it is.
pub fn wrap(disk: Arc<dyn Backing>) -> Arc<dyn Backing> {
    match WriteFaults::from_env() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse_and_bad_ones_are_refused() {
        assert_eq!(
            WriteFaults::parse("ENOSPC,skip=5,fail=2").unwrap(),
            WriteFaults {
                errno: libc::ENOSPC,
                skip: 5,
                fail: 2
            }
        );
        assert_eq!(WriteFaults::parse("EIO").unwrap().errno, libc::EIO);
        assert!(WriteFaults::parse("EPERM").is_err());
        assert!(WriteFaults::parse("EIO,skip").is_err());
        assert!(WriteFaults::parse("EIO,what=1").is_err());
    }
}
