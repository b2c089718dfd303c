//! One virtqueue's worker: pop chains, validate, execute, complete, notify.
//!
//! Requests of a queue are executed one after the other and completed in the order they were
//! taken from the avail ring. That order is what makes a backend restart lossless: when a
//! backend dies, QEMU restarts the ring at the used index, which then is exactly the first
//! request whose completion the guest has not seen.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

use crate::blk::device::DeviceShared;
use crate::blk::op_stats::Op;
use crate::blk::request;
use crate::blk::tracking::Completion;

/// Options of every queue worker.
#[derive(Clone, Copy, Debug, Default)]
pub struct WorkerOptions {
    /// Keep polling the avail ring this long after the last request before sleeping
    /// (None: sleep at once and wait for a kick).
    pub poll: Option<Duration>,
}

/// Worker state of one queue (per connection).
pub struct QueueWorker {
    queue: usize,
    shared: Arc<DeviceShared>,
    event_idx: bool,
    completions: Vec<Completion>,
    /// Whether the engine has this connection's publisher for held completions.
    publisher_installed: bool,
}

impl QueueWorker {
    /// A worker for queue `queue`.
    pub fn new(queue: usize, shared: Arc<DeviceShared>) -> Self {
        QueueWorker {
            queue,
            shared,
            event_idx: false,
            completions: Vec::new(),
            publisher_installed: false,
        }
    }

    /// Whether the driver negotiated VIRTIO_RING_F_EVENT_IDX.
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
    }

    /// Handles a kick: process until the ring is empty with notifications re-enabled, then
    /// (in poll mode) keep polling for the configured budget.
    pub fn run(
        &mut self,
        vring: &VringRwLock,
        mem: &GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> io::Result<()> {
        if let (Some(engine), false) = (self.shared.executor.tracking(), self.publisher_installed) {
            // At "run" the engine publishes what it held during a freeze through this vring.
            let v = vring.clone();
            engine.set_publisher(
                self.queue,
                Some(Arc::new(move |items: &[Completion]| {
                    if let Err(e) = publish_completions(&v, items) {
                        tracing::warn!(error = %e, "publishing held completions failed");
                    }
                })),
            );
            self.publisher_installed = true;
        }
        let poll = self.shared.worker.poll;
        let mut idle_since = Instant::now();
        loop {
            // Suppress kicks while we are draining: the enable below re-checks for work that
            // arrived in between, so nothing is missed (the standard virtio pattern; with
            // EVENT_IDX this moves avail_event, without it toggles VRING_USED_F_NO_NOTIFY).
            vring.disable_notification().map_err(io::Error::other)?;
            if !vring.get_ref().is_enabled() {
                // Disabled while we were busy: stop, with notifications on so that a kick
                // after re-enabling resumes.
                vring.enable_notification().map_err(io::Error::other)?;
                return Ok(());
            }
            if self.drain(vring, mem)? > 0 {
                idle_since = Instant::now();
                continue;
            }
            if let Some(budget) = poll {
                let live = {
                    let v = vring.get_ref();
                    v.is_enabled() && v.get_queue().ready()
                };
                if idle_since.elapsed() < budget && live {
                    std::hint::spin_loop();
                    continue;
                }
            }
            if !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    /// Processes every available chain once; returns how many.
    fn drain(
        &mut self,
        vring: &VringRwLock,
        atomic: &GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> io::Result<usize> {
        let mem = atomic.memory();
        let shared = self.shared.clone();
        let limits = &shared.limits;
        let exec = &shared.executor;
        let mut n = 0;
        loop {
            // vhost-user-backend checks "enabled" only when a kick arrives; a worker still
            // busy with an earlier kick (or polling) must stop as soon as the ring is disabled.
            let chain = {
                let mut v = vring.get_mut();
                if !v.is_enabled() {
                    break;
                }
                v.get_queue_mut().pop_descriptor_chain(mem.clone())
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used_len = match request::parse(chain, &*mem, limits) {
                Ok(req) => {
                    let started = Instant::now();
                    let out = exec.execute(self.queue, &req, &mem);
                    let used = if mem.write_obj(out.status, req.status_addr).is_err() {
                        0
                    } else {
                        out.written + 1
                    };
                    shared.stats.ops.record(
                        self.queue,
                        Op::of(&req.kind),
                        req.bytes(),
                        out.status == request::status::OK,
                        started.elapsed(),
                    );
                    used
                }
                Err(rej) => {
                    let count = shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
                    // Rate-limited: a hostile guest must not flood the log.
                    if count < 16 || count.is_power_of_two() {
                        tracing::warn!(queue = self.queue, head, reason = %rej.reason, rejected_total = count + 1, "rejected malformed request");
                    }
                    match rej.status_addr {
                        Some(addr) if mem.write_obj(rej.reason.status(), addr).is_ok() => 1,
                        _ => 0,
                    }
                }
            };
            self.completions.push(Completion {
                head,
                len: used_len,
            });
            n += 1;
            // Publish in batches so a long ring does not delay the first completions.
            if self.completions.len() >= 32 {
                self.publish(vring)?;
            }
        }
        self.publish(vring)?;
        Ok(n)
    }

    /// Puts the collected completions on the used ring (in order) and notifies if needed.
    fn publish(&mut self, vring: &VringRwLock) -> io::Result<()> {
        if self.completions.is_empty() {
            return Ok(());
        }
        self.shared
            .stats
            .requests
            .fetch_add(self.completions.len() as u64, Ordering::Relaxed);
        match self.shared.executor.tracking() {
            // The engine's per-queue gate publishes now, or holds the completions (in order)
            // while a consistency group is being frozen.
            Some(engine) => {
                let result = std::cell::Cell::new(Ok(()));
                engine.complete(self.queue, &mut self.completions, &|items| {
                    result.set(publish_completions(vring, items));
                });
                self.completions.clear();
                result.into_inner()
            }
            None => {
                let r = publish_completions(vring, &self.completions);
                self.completions.clear();
                r
            }
        }
    }
}

/// Adds `items` to the used ring in order and signals the guest if it wants a notification.
pub fn publish_completions(vring: &VringRwLock, items: &[Completion]) -> io::Result<()> {
    let mut state = vring.get_mut();
    for c in items {
        state.add_used(c.head, c.len).map_err(io::Error::other)?;
    }
    if state.needs_notification().map_err(io::Error::other)? {
        state.signal_used_queue()?;
    }
    Ok(())
}

#[cfg(all(test, not(feature = "loom")))]
mod tests;
