//! The per-queue completion gate: completions are published, or held in order while the queue
//! is frozen, under the queue's own lock; and the data path's [`Tracking`] interface.

use std::io;
use std::mem;

use super::engine::{Engine, FreezeObserver};
use super::sync::lock;
use super::{Completion, Publisher};
use crate::blk::tracking::{Tracking, WriteGuard};

impl Engine {
    /// Completion path, queue `q`: publishes `items` (and anything held before them) through
    /// `publish`, or holds them in order while the queue is frozen. `items` is left empty.
    ///
    /// The check of `frozen` and the publish happen under the queue's lock, so once a freeze
    /// has taken that lock no publish is in progress and none starts until run.
    ///
    /// # Panics
    /// If `q` is not a queue of this engine (a programming error).
    pub fn complete(&self, q: usize, items: &mut Vec<Completion>, publish: &dyn Fn(&[Completion])) {
        let mut g = lock(&self.queues[q]);
        if g.frozen {
            g.held.append(items);
            return;
        }
        if !g.held.is_empty() {
            // Left over from a run without a publisher: they go first, to keep the order.
            g.held.append(items);
            let held = mem::take(&mut g.held);
            publish(&held);
        } else if !items.is_empty() {
            publish(items);
            items.clear();
        }
    }

    /// Sets (or clears) the publisher used at "run" to publish the completions held during a
    /// freeze. Held items survive a clear; without a publisher at run they stay held until the
    /// queue's next [`Engine::complete`] (published first) or [`Engine::discard_held`].
    ///
    /// # Panics
    /// If `q` is not a queue of this engine.
    pub fn set_publisher(&self, q: usize, p: Option<Publisher>) {
        lock(&self.queues[q]).publisher = p;
    }

    /// Number of completions queue `q` holds right now (a frozen queue, or leftovers).
    pub fn held(&self, q: usize) -> usize {
        lock(&self.queues[q]).held.len()
    }

    /// Installs a function called while every queue is frozen (after the swap, before run),
    /// so tests and diagnostics can observe the guest-visible state inside the window.
    pub fn set_freeze_observer(&self, f: Option<FreezeObserver>) {
        *lock(&self.freeze_observer) = f;
    }

    /// Drops the completions held for queue `q` (its connection went away); returns how many.
    ///
    /// # Panics
    /// If `q` is not a queue of this engine.
    pub fn discard_held(&self, q: usize) -> usize {
        mem::take(&mut lock(&self.queues[q]).held).len()
    }
}

impl Tracking for Engine {
    fn begin_write(&self, queue: usize, offset: u64, len: u64) -> io::Result<WriteGuard> {
        Engine::begin_write(self, queue, offset, len)
    }
    fn complete(&self, queue: usize, items: &mut Vec<Completion>, publish: &dyn Fn(&[Completion])) {
        Engine::complete(self, queue, items, publish)
    }
    fn set_publisher(&self, queue: usize, publisher: Option<Publisher>) {
        Engine::set_publisher(self, queue, publisher)
    }
    fn held(&self, queue: usize) -> usize {
        Engine::held(self, queue)
    }
    fn discard_held(&self, queue: usize) -> usize {
        Engine::discard_held(self, queue)
    }
}
