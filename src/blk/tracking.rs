//! The one place where the data path meets replication.
//!
//! A replicated disk needs two things from the data path, and nothing more:
//! - **write tracking**: every write (also discard and write-zeroes) is announced with
//!   [`Tracking::begin_write`] *before* it touches the disk, and the returned [`WriteGuard`]
//!   is dropped once the disk write has finished (successfully or not);
//! - **a completion gate**: a queue hands its finished requests to [`Tracking::complete`],
//!   which publishes them now or holds them, in order, while a consistency group is frozen
//!   (and publishes them later through the queue's [`Publisher`]).
//!
//! The consistency-group engine implements this trait; the data path never names it.

use std::io;
use std::sync::Arc;

/// A used-ring entry to publish; opaque to replication, which only holds and orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the request.
    pub head: u16,
    /// Bytes written into guest memory.
    pub len: u32,
}

/// Publishes used-ring entries and notifies the guest. Called under the queue's gate: it must
/// not call back into the [`Tracking`] implementation.
pub type Publisher = Arc<dyn Fn(&[Completion]) + Send + Sync>;

/// What replication needs to hear when a tracked write has finished on disk.
pub trait WriteEnd: Send + Sync {
    /// The write that covered tracking units `first..=last` has finished on disk.
    fn end_write(&self, first: u64, last: u64);
}

/// Proof that a write was tracked; drop it when the disk write has finished (successfully or
/// not). Until then replication does not read what the write covers.
#[must_use = "drop the guard when the disk write has finished"]
pub struct WriteGuard {
    end: Option<Arc<dyn WriteEnd>>,
    first: u64,
    last: u64,
    /// A second party told when the write has finished (the activity log of a persisted
    /// change record, in its own units), after `end`.
    also: Option<(Arc<dyn WriteEnd>, u64, u64)>,
}

impl WriteGuard {
    /// A guard that calls `end.end_write(first, last)` when dropped.
    pub fn new(end: Arc<dyn WriteEnd>, first: u64, last: u64) -> Self {
        WriteGuard {
            end: Some(end),
            first,
            last,
            also: None,
        }
    }

    /// Also calls `end.end_write(first, last)` when dropped (after the first one).
    pub fn and_then(mut self, end: Arc<dyn WriteEnd>, first: u64, last: u64) -> Self {
        self.also = Some((end, first, last));
        self
    }

    /// A guard for a write that recorded nothing (an empty range).
    pub fn untracked() -> Self {
        WriteGuard {
            end: None,
            first: 0,
            last: 0,
            also: None,
        }
    }

    /// Whether the write was recorded anywhere.
    pub fn is_tracked(&self) -> bool {
        self.end.is_some()
    }
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            end.end_write(self.first, self.last);
        }
        if let Some((end, first, last)) = self.also.take() {
            end.end_write(first, last);
        }
    }
}

impl std::fmt::Debug for WriteGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGuard")
            .field("units", &(self.first..=self.last))
            .field("tracked", &self.end.is_some())
            .finish()
    }
}

/// Write tracking and the completion gate of one disk (see the module doc).
pub trait Tracking: Send + Sync {
    /// Queue `queue` is about to write `[offset, offset + len)`. May block briefly (never
    /// beyond the engine's own limits); fails only for an invalid queue or range.
    fn begin_write(&self, queue: usize, offset: u64, len: u64) -> io::Result<WriteGuard>;

    /// Publishes `items` of queue `queue` (and anything held before them) through `publish`,
    /// or holds them in order. `items` is left empty.
    fn complete(&self, queue: usize, items: &mut Vec<Completion>, publish: &dyn Fn(&[Completion]));

    /// Sets (or clears) how completions held for `queue` are published later.
    fn set_publisher(&self, queue: usize, publisher: Option<Publisher>);

    /// Completions `queue` holds right now.
    fn held(&self, queue: usize) -> usize;

    /// Drops the completions held for `queue` (its frontend went away); returns how many.
    fn discard_held(&self, queue: usize) -> usize;
}
