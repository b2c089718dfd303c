//! The write fence of a demoted disk: once raised, every write fails, and the one raising
//! it learns when the writes that got past it before have finished.
//!
//! # Why no write slips through
//! A writer increments its queue's in-flight count, *then* reads the flag; the demoter sets
//! the flag, *then* reads the counts (all `SeqCst`). So either the writer sees the flag and
//! fails, or the demoter sees the writer's count and waits until its write has reached the
//! disk — and with it the change tracking — before the final group is formed. Counts are
//! per queue (one cache line each): a queue has one worker, so they never bounce.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Queues the fence keeps counts for (the most `drblk serve --queues` allows).
const MAX_QUEUES: usize = 64;

#[repr(align(64))]
#[derive(Default)]
struct Count(AtomicU64);

/// See the module docs.
pub struct Fence {
    raised: AtomicBool,
    inflight: Vec<Count>,
}

impl Default for Fence {
    fn default() -> Self {
        Fence {
            raised: AtomicBool::new(false),
            inflight: (0..MAX_QUEUES).map(|_| Count::default()).collect(),
        }
    }
}

/// [`Fence::raise`] on a fence that is raised already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlreadyRaised;

/// A write let through; dropped when it has finished.
pub struct Passage<'a>(&'a AtomicU64);

impl Drop for Passage<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fence {
    /// Lets a write of `queue` through, unless the fence is raised.
    pub fn pass(&self, queue: usize) -> io::Result<Passage<'_>> {
        let c = &self.inflight[queue % MAX_QUEUES].0;
        c.fetch_add(1, Ordering::SeqCst);
        let p = Passage(c);
        if self.raised.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the disk was demoted: it takes no writes",
            ));
        }
        Ok(p)
    }

    /// Raises the fence and waits (at most `timeout`) until no write is past it.
    /// `Err`: it was raised already (by someone else, who alone may lower it).
    /// `Ok(false)`: writes were still running at the deadline (the fence stays raised).
    pub fn raise(&self, timeout: Duration) -> Result<bool, AlreadyRaised> {
        if self
            .raised
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(AlreadyRaised);
        }
        let deadline = Instant::now() + timeout;
        while self.inflight.iter().any(|c| c.0.load(Ordering::SeqCst) > 0) {
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(true)
    }

    /// Lowers the fence (a demotion that did not go through).
    pub fn lower(&self) {
        self.raised.store(false, Ordering::SeqCst);
    }

    /// Whether it is raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_fence_refuses_writes_and_waits_for_those_past_it() {
        let f = std::sync::Arc::new(Fence::default());
        let p = f.pass(3).unwrap();
        let f2 = f.clone();
        let t = std::thread::spawn(move || f2.raise(Duration::from_secs(600)).unwrap());
        while !f.is_raised() {
            std::thread::yield_now();
        }
        assert!(f.pass(0).is_err());
        std::thread::sleep(Duration::from_millis(20));
        assert!(!t.is_finished(), "raise returned with a write past it");
        drop(p);
        assert!(t.join().unwrap());
        // A second raiser is refused: only the first may lower it.
        assert_eq!(f.raise(Duration::from_secs(600)), Err(AlreadyRaised));
        f.lower();
        assert!(f.pass(1).is_ok());
    }
}
