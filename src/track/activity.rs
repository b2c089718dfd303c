//! The activity log in memory: which extents are "hot" (listed in the on-disk activity
//! log), and how many writes are using each.
//!
//! One atomic word per extent: [`IN_AL`], [`REFERENCED`] (the clock's second chance) and
//! the number of writes between their `acquire` and the end of their disk write. A write
//! into an extent that is in the log only increments its count (no lock, no I/O). Any other
//! write takes the slow path under the log's mutex: the record adds the extent to the
//! on-disk log (evicting one whose count is zero) before the write may proceed.
//!
//! Why an evicted extent loses nothing: the evictor clears `IN_AL` with a compare-exchange
//! from "in the log, count 0". From then on a write into it takes the slow path and waits
//! for the mutex, which the evictor holds until the extent's dirty bits are on disk. A
//! write that incremented the count before that had already recorded its chunks in the
//! engine before the count could drop to zero (`acquire`, then `Engine::begin_write`, then
//! the disk write, then `release`), so the evictor's snapshot of the engine sees them.

use std::sync::atomic::{AtomicU32, Ordering};

/// The extent is in the activity log (on disk).
pub const IN_AL: u32 = 1 << 31;
/// Used since the clock hand last passed.
pub const REFERENCED: u32 = 1 << 30;
const COUNT: u32 = REFERENCED - 1;

/// Per-extent state words.
pub struct ExtentStates {
    words: Vec<AtomicU32>,
}

impl ExtentStates {
    /// `extents` extents, none in the log.
    pub fn new(extents: u64) -> Self {
        ExtentStates {
            words: (0..extents).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    /// Fast path: if extent `e` is in the log, count one more write into it and return true.
    pub fn try_enter(&self, e: u64) -> bool {
        let w = &self.words[e as usize];
        let mut s = w.load(Ordering::Acquire);
        while s & IN_AL != 0 {
            match w.compare_exchange_weak(
                s,
                (s | REFERENCED) + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => s = now,
            }
        }
        false
    }

    /// A write into extent `e` has finished.
    pub fn exit(&self, e: u64) {
        let prev = self.words[e as usize].fetch_sub(1, Ordering::AcqRel);
        debug_assert!(prev & COUNT > 0, "extent {e}: exit without enter");
    }

    /// Slow path, under the log's mutex, once `e` is in the on-disk log: mark it in the
    /// log with one write counted.
    pub fn admit(&self, e: u64) {
        self.words[e as usize].fetch_add(IN_AL | REFERENCED | 1, Ordering::AcqRel);
    }

    /// Clock step, under the log's mutex: if `e` was referenced, clear that and return
    /// false; if no write is using it, take it out of the log and return true.
    pub fn try_evict(&self, e: u64) -> bool {
        let w = &self.words[e as usize];
        let s = w.load(Ordering::Acquire);
        if s & REFERENCED != 0 {
            w.fetch_and(!REFERENCED, Ordering::AcqRel);
            return false;
        }
        s & COUNT == 0
            && w.compare_exchange(s, s & !IN_AL, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// Put `e` back in the log (an eviction that could not be made durable).
    pub fn readmit(&self, e: u64) {
        self.words[e as usize].fetch_or(IN_AL, Ordering::AcqRel);
    }

    /// Whether `e` is in the log.
    pub fn in_log(&self, e: u64) -> bool {
        self.words[e as usize].load(Ordering::Acquire) & IN_AL != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_evict_and_second_chance() {
        let s = ExtentStates::new(4);
        assert!(!s.try_enter(1));
        s.admit(1);
        assert!(s.try_enter(1));
        // Busy: referenced (second chance), then still counted.
        assert!(!s.try_evict(1));
        assert!(!s.try_evict(1));
        s.exit(1);
        s.exit(1);
        assert!(s.try_evict(1));
        assert!(!s.in_log(1));
        assert!(!s.try_enter(1));
    }
}
