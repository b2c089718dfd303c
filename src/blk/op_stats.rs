//! Guest requests by operation: how many, how many failed, bytes moved and how long the
//! backend took (from taking the request off the ring to its status being written).
//!
//! One set of counters per queue, so that queue workers on different CPUs never write the
//! same cache line; a status sums them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::blk::request::RequestKind;
use crate::metrics::histogram::{Histogram, HistogramSnapshot};

/// The operations counted, in the order of [`OPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
}

/// Every [`Op`], in index order.
pub const OPS: [Op; 6] = [
    Op::Read,
    Op::Write,
    Op::Flush,
    Op::Discard,
    Op::WriteZeroes,
    Op::GetId,
];

impl Op {
    /// The operation of a request.
    pub fn of(kind: &RequestKind) -> Op {
        match kind {
            RequestKind::In => Op::Read,
            RequestKind::Out => Op::Write,
            RequestKind::Flush => Op::Flush,
            RequestKind::Discard(_) => Op::Discard,
            RequestKind::WriteZeroes(_) => Op::WriteZeroes,
            RequestKind::GetId => Op::GetId,
        }
    }

    /// Its name in the status and in metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::GetId => "get_id",
        }
    }
}

#[derive(Debug, Default)]
struct OpCounters {
    latency: Histogram,
    errors: AtomicU64,
    bytes: AtomicU64,
}

/// The counters of every queue (up to the most queues a disk offers).
#[derive(Debug)]
pub struct GuestOps {
    queues: Vec<[OpCounters; OPS.len()]>,
}

impl Default for GuestOps {
    fn default() -> Self {
        GuestOps {
            queues: (0..crate::config::defaults::MAX_QUEUES)
                .map(|_| std::array::from_fn(|_| OpCounters::default()))
                .collect(),
        }
    }
}

impl GuestOps {
    /// Counts one request of `queue`: `bytes` moved, `ok` or failed, taking `took`.
    pub fn record(&self, queue: usize, op: Op, bytes: u64, ok: bool, took: Duration) {
        let Some(q) = self.queues.get(queue) else {
            return;
        };
        let c = &q[op as usize];
        c.latency.observe(took);
        if ok {
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every operation's figures, summed over the queues; operations never seen are left out.
    pub fn snapshot(&self) -> Vec<OpStatus> {
        OPS.iter()
            .enumerate()
            .filter_map(|(i, op)| {
                let mut latency = HistogramSnapshot::default();
                let (mut errors, mut bytes) = (0, 0);
                for q in &self.queues {
                    latency.add(&q[i].latency);
                    errors += q[i].errors.load(Ordering::Relaxed);
                    bytes += q[i].bytes.load(Ordering::Relaxed);
                }
                (latency.count > 0).then(|| OpStatus {
                    op: op.name().to_string(),
                    requests: latency.count,
                    errors,
                    bytes,
                    latency_seconds: latency,
                })
            })
            .collect()
    }
}

/// One operation's figures in the status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpStatus {
    /// `read`, `write`, `flush`, `discard`, `write_zeroes` or `get_id`.
    pub op: String,
    /// Requests completed.
    pub requests: u64,
    /// Of those, completed with an error status.
    pub errors: u64,
    /// Bytes read or written (discard and write-zeroes: the bytes of their ranges) by the
    /// requests that succeeded.
    pub bytes: u64,
    /// How long the backend took per request.
    pub latency_seconds: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_summed_per_operation_and_unseen_operations_left_out() {
        let ops = GuestOps::default();
        ops.record(0, Op::Write, 4096, true, Duration::from_micros(30));
        ops.record(3, Op::Write, 4096, true, Duration::from_micros(40));
        ops.record(1, Op::Write, 4096, false, Duration::from_micros(40));
        ops.record(2, Op::Read, 512, true, Duration::from_micros(10));
        ops.record(9999, Op::Read, 512, true, Duration::from_micros(10)); // no such queue
        let s = ops.snapshot();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].op.as_str(), s[0].requests, s[0].bytes),
            ("read", 1, 512)
        );
        assert_eq!(
            (s[1].op.as_str(), s[1].requests, s[1].errors, s[1].bytes),
            ("write", 3, 1, 8192)
        );
    }
}
