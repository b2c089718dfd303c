//! A recording structure ("OOS" or "CR" in the design): a chunk bitmap plus the count of writes
//! recorded in it that may still be modifying the disk.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use super::bitmap::Bitmap;
use super::sync::{lock, AtomicBool, AtomicUsize, Condvar, Mutex, Ordering};

/// A bitmap that writes are recorded in, with its in-flight write count.
///
/// Life cycle: created as the CR of a formation; either becomes the OOS at commit, or is
/// *retired* (abandonment, link loss, coordination abort): then every write still in flight
/// in it re-marks its chunks in the structure it was forwarded to, so no bit is lost.
pub(crate) struct Record {
    /// One bit per chunk.
    pub(crate) bits: Bitmap,
    /// Writes recorded here whose `WriteTicket` has not been dropped yet.
    inflight: AtomicUsize,
    /// Threads waiting in [`Record::wait_idle`].
    waiters: AtomicUsize,
    idle_lock: Mutex<()>,
    idle_cv: Condvar,
    /// Set (after `forward`) when this record has been merged into another one.
    forwarded: AtomicBool,
    forward: OnceLock<Arc<Record>>,
}

impl Record {
    /// An empty record over `chunks` chunks.
    pub(crate) fn new(chunks: u64) -> Self {
        Record {
            bits: Bitmap::new(chunks),
            inflight: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            idle_lock: Mutex::new(()),
            idle_cv: Condvar::new(),
            forwarded: AtomicBool::new(false),
            forward: OnceLock::new(),
        }
    }

    /// Records a write of chunks `first..=last`. Called under the recording queue's lock, so a
    /// queue switching its target (also under that lock) sees either the write counted and
    /// marked here, or not at all.
    pub(crate) fn enter(&self, first: u64, last: u64) {
        self.bits.set_range(first, last);
        self.inflight.fetch_add(1, Ordering::SeqCst);
    }

    /// The write of chunks `first..=last` has finished on disk.
    ///
    /// Re-marks the chunks ("set after write"): a drain that cleared the bit and read the chunk
    /// while this write was in progress (possible only where shipping runs concurrently with
    /// recording, i.e. an abandoned CG) finds it set again and ships it once more.
    ///
    /// Forwarding handshake: we set our bits, then read `forwarded`; the retirer sets
    /// `forwarded`, then reads our bits. Every one of these accesses is a read-modify-write,
    /// and an RMW always reads the latest value in its location's modification order: if our
    /// read of `forwarded` came before the retirer's set, the retirer's set acquires our
    /// release chain, so its later read of the bits sees our marks. Either we forward the marks
    /// ourselves or the retirer copies them; they are never lost. (Plain SeqCst loads would
    /// do on real hardware; RMWs make it hold under acquire/release too, which loom checks.)
    pub(crate) fn exit(&self, first: u64, last: u64) {
        self.bits.set_range(first, last);
        if self.forwarded.fetch_or(false, Ordering::SeqCst) {
            if let Some(target) = self.forward.get() {
                target.bits.set_range(first, last);
            }
        }
        // The marks above happen before the decrement, so whoever sees the count reach zero
        // (a drain waiting for quiescence) also sees the marks. Same RMW handshake with
        // `wait_idle` on (inflight, waiters): either we see the waiter and notify, or the
        // waiter's check sees our decrement.
        if self.inflight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.waiters.fetch_add(0, Ordering::SeqCst) > 0
        {
            // Take the lock so the notification cannot fall between a waiter's check and its
            // wait (the waiter checks under this lock).
            let _g = lock(&self.idle_lock);
            self.idle_cv.notify_all();
        }
    }

    /// Writes recorded here and not finished yet.
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// Waits until no write recorded here is in flight, or `deadline` passes. Returns whether
    /// the record is idle. Only meaningful once no queue records here any more.
    pub(crate) fn wait_idle(&self, deadline: Instant) -> bool {
        if self.inflight.load(Ordering::SeqCst) == 0 {
            return true;
        }
        // Announce ourselves before the check under the lock: pairs with `exit`, which
        // decrements then reads `waiters` (RMW handshake, see `exit`).
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let mut g = lock(&self.idle_lock);
        let idle = loop {
            if self.inflight.fetch_add(0, Ordering::SeqCst) == 0 {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            g = match self.idle_cv.wait_timeout(g, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => panic!("cg: lock poisoned by a panic in another thread"),
            };
        };
        drop(g);
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        idle
    }

    /// Retires this record into `target`: `target |= self`, and every write still in flight
    /// here re-marks its chunks in `target` when it finishes. The caller must already have
    /// switched every queue away from this record (so no new write is recorded here).
    pub(crate) fn forward_into(&self, target: &Arc<Record>) {
        // A record is retired at most once by construction (only a CR is retired, once).
        let first = self.forward.set(Arc::clone(target)).is_ok();
        debug_assert!(first, "record forwarded twice");
        // RMW set, then RMW reads of our bits (`or_into_rmw`): see the handshake in `exit`.
        self.forwarded.swap(true, Ordering::SeqCst);
        self.bits.or_into_rmw(&target.bits);
    }
}

#[cfg(all(test, not(feature = "loom")))]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn in_flight_write_remarks_forward_target() {
        let cr = Record::new(4);
        let oos = Arc::new(Record::new(4));
        cr.enter(1, 2);
        cr.forward_into(&oos);
        assert_eq!(oos.bits.count(), 2);
        oos.bits.clear(1);
        oos.bits.clear(2);
        // The write finishes after the forwarding: its chunks are marked in the target again.
        cr.exit(1, 2);
        assert!(oos.bits.test(1) && oos.bits.test(2));
        assert_eq!(cr.inflight(), 0);
    }

    #[test]
    fn wait_idle_times_out_and_wakes() {
        let r = Arc::new(Record::new(1));
        r.enter(0, 0);
        assert!(!r.wait_idle(Instant::now() + Duration::from_millis(5)));
        let r2 = Arc::clone(&r);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            r2.exit(0, 0);
        });
        assert!(r.wait_idle(Instant::now() + Duration::from_secs(10)));
        t.join().expect("thread");
    }
}
