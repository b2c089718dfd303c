//! The vhost-user-blk device for one frontend connection.
//!
//! A [`BlkBackend`] lives exactly as long as one connection (vhost-user-backend's daemon
//! serves one connection and then stops its workers). Everything that must outlive a
//! connection — the open image, the replication engine — is in [`DeviceShared`], which the
//! daemon keeps and hands to the backend of every new connection.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blk::execute::Executor;
use crate::blk::queue::{QueueWorker, WorkerOptions};
use crate::blk::virtio::{DeviceLimits, CONFIG_SPACE_SIZE, CONFIG_WCE_OFFSET};

/// Device state that survives frontend reconnections.
pub struct DeviceShared {
    /// Executes requests against the image.
    pub executor: Arc<Executor>,
    /// Limits advertised and enforced.
    pub limits: DeviceLimits,
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Number of worker threads (queues are spread over them round-robin).
    pub threads: usize,
    /// Per-queue worker options (busy-poll budget).
    pub worker: WorkerOptions,
    /// Counters across connections.
    pub stats: DeviceStats,
}

/// Counters a user or a test can read.
#[derive(Default)]
pub struct DeviceStats {
    /// Requests completed (any status).
    pub requests: AtomicU64,
    /// Requests rejected by validation.
    pub rejected: AtomicU64,
    /// Frontend connections served.
    pub connections: AtomicU64,
    /// Frontends connected now (0 or 1: one connection at a time).
    pub frontends: AtomicU64,
    /// Requests by operation, per queue.
    pub ops: crate::blk::op_stats::GuestOps,
}

/// The per-connection backend handed to `VhostUserDaemon`.
pub struct BlkBackend {
    shared: Arc<DeviceShared>,
    mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    event_idx: AtomicBool,
    /// One per queue: serialises processing of a queue with `stop_vring`.
    workers: Vec<Mutex<QueueWorker>>,
    exits: Vec<(EventConsumer, EventNotifier)>,
}

impl BlkBackend {
    /// Creates the backend of a new connection. `mem` must be the same atomic memory object
    /// given to the daemon, so that memory-table updates are seen here.
    pub fn new(
        shared: Arc<DeviceShared>,
        mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> io::Result<Self> {
        let queues = usize::from(shared.limits.num_queues);
        let workers = (0..queues)
            .map(|q| Mutex::new(QueueWorker::new(q, shared.clone())))
            .collect();
        let exits = (0..shared.threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            shared,
            mem,
            event_idx: AtomicBool::new(false),
            workers,
            exits,
        })
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        usize::from(self.shared.limits.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.shared.queue_size)
    }

    fn features(&self) -> u64 {
        self.shared.limits.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&self, features: u64) {
        tracing::debug!(
            features = format_args!("{features:#x}"),
            "frontend acked features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
        for w in &self.workers {
            w.lock().expect("worker lock").set_event_idx(enabled);
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // vhost-user-backend forwards exactly what the frontend asked; answer exactly `size`
        // bytes, zero past the end of our structure.
        let space = self
            .shared
            .limits
            .config_space(self.shared.executor.writeback());
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SPACE_SIZE);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SPACE_SIZE);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // The only writable field is `wce` (CONFIG_WCE).
        if offset <= CONFIG_WCE_OFFSET && (offset as usize + buf.len()) > CONFIG_WCE_OFFSET as usize
        {
            let wce = buf[(CONFIG_WCE_OFFSET - offset) as usize];
            self.shared.executor.set_writeback(wce != 0);
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only the wce field of the config space is writable",
            ))
        }
    }

    fn update_memory(&self, _mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> io::Result<()> {
        // `self.mem` is the same atomic object: nothing to swap.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        queue_masks(self.shared.threads, self.num_queues())
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (c, n) = self.exits.get(thread_index)?;
        Some((c.try_clone().ok()?, n.try_clone().ok()?))
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // Taking the worker's lock waits for a batch in progress: every request it popped
        // is completed before GET_VRING_BASE reports the next avail index.
        let q = queue_index as usize;
        if let Some(w) = self.workers.get(q) {
            drop(w.lock().expect("worker lock"));
        }
        // Completions held by a freeze are published at "run", within the coordination
        // limit: wait for them so the frontend's view of the used ring is final.
        if let Some(engine) = self.shared.executor.tracking() {
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while q < self.num_queues()
                && engine.held(q) > 0
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        // `vrings` and `device_event` are this thread's own: the kick of its k-th queue
        // arrives as event k. The worker (and so the completion gate) is the device's queue.
        let rank = usize::from(device_event);
        let q = queue_of(self.shared.threads, thread_id, rank);
        let (Some(vring), Some(worker)) = (vrings.get(rank), self.workers.get(q)) else {
            return Err(io::Error::other(format!(
                "event {rank} of thread {thread_id}: no such queue"
            )));
        };
        let mut worker = worker.lock().expect("worker lock");
        worker.run(vring, &self.mem)
    }
}

/// Which queues each of `threads` epoll threads serves: queue `q` goes to thread
/// `q % threads`.
fn queue_masks(threads: usize, queues: usize) -> Vec<u64> {
    let mut masks = vec![0u64; threads];
    for q in 0..queues {
        masks[q % threads] |= 1 << q;
    }
    masks
}

/// The device queue of the `rank`-th queue (counting from 0, in queue order) that thread
/// `thread_id` serves, as [`queue_masks`] spreads them: vhost-user-backend numbers a
/// thread's kick events by that rank, not by the queue's index.
fn queue_of(threads: usize, thread_id: usize, rank: usize) -> usize {
    thread_id + rank * threads
}

/// Default busy-poll budget when `--poll` is given without a value.
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

#[cfg(test)]
mod queue_mapping_tests {
    use super::{queue_masks, queue_of};

    /// Every (thread, rank) names the queue whose bit is that rank's set bit in the
    /// thread's mask: the numbering vhost-user-backend uses for the thread's events.
    /// (With two threads, queue 1's kicks arrive as event 0 of thread 1; reading that as
    /// queue 0 ran queue 1's requests through queue 0's worker and completion gate, and a
    /// completion held by a freeze was then published on queue 0's ring.)
    #[test]
    fn a_threads_event_rank_names_the_queue_in_its_mask() {
        for threads in 1..=8 {
            for queues in threads..=16 {
                let masks = queue_masks(threads, queues);
                let mut seen = vec![false; queues];
                for (t, &mask) in masks.iter().enumerate() {
                    let bits: Vec<usize> = (0..64).filter(|b| mask >> b & 1 == 1).collect();
                    for (rank, &bit) in bits.iter().enumerate() {
                        let q = queue_of(threads, t, rank);
                        assert_eq!(q, bit, "threads {threads}, queues {queues}, thread {t}");
                        seen[q] = true;
                    }
                }
                assert!(seen.iter().all(|&s| s), "every queue has a thread");
            }
        }
        assert_eq!(queue_of(2, 1, 0), 1);
    }
}
