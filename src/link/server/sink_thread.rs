//! The one thread that calls into the [`ReplicaSink`](super::ReplicaSink).
//!
//! Why one thread: the sink works under one lock (the replica store), so its calls run one
//! at a time whoever makes them. Calling it from the runtime's threads through
//! `block_in_place` made tokio hand each worker's core to a fresh blocking thread on every
//! extent: dozens of short-lived threads, each allocating in its own malloc arena, and the
//! secondary's RSS grew for as long as a session lasted (issue 15's soak). Here the sink's
//! work, and the buffers it touches, stay on one long-lived thread; the runtime's workers
//! only run QUIC and never block.
//!
//! Jobs run in the order they were queued. A data stream's reader queues up to
//! `READ_AHEAD` frames (see `session.rs`) and every other caller one job at a time, so the
//! queue's bound is a backstop. Why this cannot deadlock: a job may block on the runtime (a
//! commit sends its `CommitAck` from inside the sink), but nothing on the runtime blocks
//! waiting for this thread: callers await.

use std::panic::AssertUnwindSafe;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce() + Send>;

/// Jobs queued before a caller waits for room (each reader task queues one at a time).
const QUEUE: usize = 64;

/// The sink's thread; see the module's documentation.
pub(super) struct SinkThread {
    /// `None` once the server stops: later calls fail; queued jobs still run.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

/// The server stopped, or the job panicked (the panic was logged).
#[derive(Debug)]
pub(super) struct SinkGone;

impl SinkThread {
    pub(super) fn start() -> std::io::Result<SinkThread> {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        std::thread::Builder::new()
            .name("drblk-link-sink".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    // A panicking sink call fails its caller (the result's sender is
                    // dropped); the thread lives on for the next session.
                    if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a call into the replica sink panicked");
                    }
                }
            })?;
        Ok(SinkThread {
            jobs: Mutex::new(Some(tx)),
        })
    }

    /// Runs `f` on the sink's thread and returns its result.
    pub(super) async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SinkGone> {
        self.queue(f).await?.await.map_err(|_| SinkGone)
    }

    /// Queues `f` to run on the sink's thread and returns once it is queued, with the
    /// receiver of its result (closed if it panicked or never ran): a caller may queue its
    /// next job before this one has run.
    pub(super) async fn queue<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, SinkGone> {
        let jobs = super::lock(&self.jobs).clone().ok_or(SinkGone)?;
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(f());
        });
        jobs.send(job).await.map_err(|_| SinkGone)?;
        Ok(result)
    }

    /// No more jobs: the thread ends once those queued have run.
    pub(super) fn close(&self) {
        super::lock(&self.jobs).take();
    }
}

impl std::fmt::Display for SinkGone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the replica sink's call did not complete (server stopping, or it panicked)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_run_in_order_on_one_thread_and_survive_a_panic() {
        let t = SinkThread::start().unwrap();
        let name = t
            .call(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("drblk-link-sink"));
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let o = order.clone();
                t.call(move || o.lock().unwrap().push(i))
            })
            .collect();
        for c in calls {
            c.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
        assert!(t.call(|| panic!("boom")).await.is_err());
        assert_eq!(
            t.call(|| 7).await.unwrap(),
            7,
            "the thread outlives a panic"
        );
        t.close();
        assert!(t.call(|| 1).await.is_err(), "no calls after close");
    }
}
