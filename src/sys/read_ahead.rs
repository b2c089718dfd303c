//! Reads of single blocks of one O_DIRECT file, started early and collected later.
//!
//! A drill keeps the old content of every block a group overwrites before the group is
//! applied. Read only then, thousands of scattered blocks of an uncached image hold the
//! apply (and so the RPO) up by tens of milliseconds; read while the group's extents are
//! still arriving, they are ready when it commits. [`BlockReadAhead::start`] queues a read
//! into a slot of its own arena and submits it, without waiting;
//! [`settle`](BlockReadAhead::settle) waits for all of them;
//! [`take`](BlockReadAhead::take) hands a block's bytes over and frees its slot.
//! [`ReadAheadThread`] starts them from a thread of its own, so that the thread that asks
//! only queues block numbers.
//!
//! Whether the bytes read are still the block's content is the caller's to know (a drill
//! knows which blocks nothing has written since it started).
//!
//! # Why the arena is never touched while the kernel writes it
//! A slot is read or reused only once its read has completed (`settle` waits for every
//! read in flight; completions are collected without waiting as new reads start). If
//! waiting fails with reads in flight, the arena is leaked, never freed or reused, and the
//! reader does nothing more. Dropping the reader waits for its reads first.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use io_uring::{opcode, types, IoUring};

use crate::blk::disk::AlignedBuf;

/// Reads in flight at most (the completion queue holds twice as many: never overflows).
const DEPTH: u32 = 256;
/// Reads queued before they are submitted together (fewer system calls); `settle`
/// submits the rest.
const SUBMIT_EVERY: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    InFlight,
    Read,
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    index: u32,
    state: State,
    /// The round (see [`BlockReadAhead::next_round`]) the read started in.
    round: u64,
}

/// Blocks of one file read ahead into a fixed number of slots (see the module docs).
pub struct BlockReadAhead {
    ring: IoUring,
    /// `slots × block` bytes, aligned for O_DIRECT; `None` once leaked (see the module docs).
    arena: Option<AlignedBuf>,
    block: usize,
    slots: HashMap<u64, Slot>,
    /// The block each slot holds (user data of its read is the slot index).
    owner: Vec<u64>,
    free: Vec<u32>,
    in_flight: usize,
    unsubmitted: usize,
    round: u64,
}

impl BlockReadAhead {
    /// A reader of blocks of `block` bytes (a multiple of the O_DIRECT alignment) with
    /// room for `slots` of them; fails where io_uring is unavailable.
    pub fn new(slots: usize, block: usize) -> io::Result<BlockReadAhead> {
        Ok(BlockReadAhead {
            ring: IoUring::new(DEPTH)?,
            arena: Some(AlignedBuf::new(slots * block)),
            block,
            slots: HashMap::with_capacity(slots),
            owner: vec![0; slots],
            free: (0..slots as u32).rev().collect(),
            in_flight: 0,
            unsubmitted: 0,
            round: 0,
        })
    }

    /// Starts reading block `b` of `direct` (at `b × block`) unless it is read or being
    /// read already, or there is no free slot (then it is not read ahead: a hint). Waits
    /// for a read to complete if `DEPTH` are in flight. The caller keeps `direct` open
    /// until [`settle`](Self::settle).
    pub fn start(&mut self, direct: &File, b: u64) {
        if self.slots.contains_key(&b) || self.arena.is_none() || self.free.is_empty() {
            return;
        }
        if self.in_flight == DEPTH as usize && !self.room_in_ring() {
            return;
        }
        let index = self.free.pop().expect("checked above");
        let block = self.block;
        let arena = self.arena.as_mut().expect("checked above");
        // A pointer, not a slice of the arena: other slots may be being written by the
        // kernel right now.
        // SAFETY: the slot lies inside the arena (index < slots).
        let dst = unsafe { arena.as_mut_ptr().add(index as usize * block) };
        let sqe = opcode::Read::new(types::Fd(direct.as_raw_fd()), dst, block as u32)
            .offset(b * block as u64)
            .build()
            .user_data(u64::from(index));
        // SAFETY: the entry points into a free slot of the arena, which nothing reads or
        // reuses until its read has completed (module docs); the caller keeps the fd open.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            self.free.push(index);
            return;
        }
        self.owner[index as usize] = b;
        self.slots.insert(
            b,
            Slot {
                index,
                state: State::InFlight,
                round: self.round,
            },
        );
        self.in_flight += 1;
        self.unsubmitted += 1;
        if self.unsubmitted >= SUBMIT_EVERY {
            self.submit();
        }
    }

    /// Makes room for one more read when `DEPTH` are in flight: collects what completed,
    /// else waits for one read (about a device's latency) rather than drop the hint.
    /// Returns whether there is room (a failed wait leaves the block to be read the usual
    /// way).
    fn room_in_ring(&mut self) -> bool {
        self.collect();
        if self.in_flight < DEPTH as usize {
            return true;
        }
        if self.ring.submit_and_wait(1).is_ok() {
            self.unsubmitted = 0;
        }
        self.collect();
        self.in_flight < DEPTH as usize
    }

    /// Submits the reads queued so far, without waiting for them.
    pub fn submit(&mut self) {
        if self.unsubmitted == 0 {
            return;
        }
        // A failed submit leaves them queued: the next one (or `settle`) tries again.
        if let Ok(n) = self.ring.submit() {
            self.unsubmitted = self.unsubmitted.saturating_sub(n);
        }
    }

    /// Records the reads that have completed, without waiting.
    fn collect(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (index, res) in done {
            self.record(index, res);
        }
    }

    /// Records one completed read: whole, or not handed over (short past the end of the
    /// file, or refused: the caller reads it the usual way).
    fn record(&mut self, index: u64, res: i32) {
        let b = self.owner[index as usize];
        if let Some(s) = self.slots.get_mut(&b) {
            s.state = if res == self.block as i32 {
                State::Read
            } else {
                State::Failed
            };
        }
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Waits until every read started has completed. An error means some may not have:
    /// the reader then drops what it read and does nothing more.
    pub fn settle(&mut self) -> io::Result<()> {
        self.collect();
        if self.in_flight == 0 {
            return Ok(());
        }
        match super::direct_batch::wait_all(&mut self.ring, self.in_flight) {
            Ok(results) => {
                for (index, res) in results {
                    self.record(index, res);
                }
                self.unsubmitted = 0;
                Ok(())
            }
            Err(e) => {
                // Forgotten, not waited for again: their arena is never reused.
                std::mem::forget(self.arena.take());
                self.slots.clear();
                self.free.clear();
                self.in_flight = 0;
                self.unsubmitted = 0;
                Err(e)
            }
        }
    }

    /// Copies block `b` into `dst` (one block) and frees its slot, if its read completed
    /// whole (after [`settle`](Self::settle)); otherwise leaves `dst` alone.
    pub fn take(&mut self, b: u64, dst: &mut [u8]) -> bool {
        let Some(s) = self.slots.get(&b).copied() else {
            return false;
        };
        let (Some(arena), State::Read) = (self.arena.as_ref(), s.state) else {
            return false;
        };
        // SAFETY: this slot's read has completed (State::Read) and nothing writes it until
        // it is freed below; other slots may still be written by the kernel, so no slice
        // of the whole arena is made.
        let src = unsafe {
            std::slice::from_raw_parts(
                arena.as_ptr().add(s.index as usize * self.block),
                self.block,
            )
        };
        dst.copy_from_slice(src);
        self.slots.remove(&b);
        self.free.push(s.index);
        true
    }

    /// Ends a round (a group applied): frees the slots of blocks `keep` no longer wants,
    /// of failed reads, and of reads started before this round (so a read serves the apply
    /// it was started before and the next one: a group staged but never applied does not
    /// hold slots for long). Reads in flight keep their slots.
    pub fn next_round(&mut self, keep: impl Fn(u64) -> bool) {
        let round = self.round;
        let mut freed = Vec::new();
        self.slots.retain(|&b, s| {
            let wanted = s.state == State::InFlight
                || (s.state == State::Read && s.round == round && keep(b));
            if !wanted {
                freed.push(s.index);
            }
            wanted
        });
        self.free.extend(freed);
        self.round += 1;
    }

    /// Blocks read ahead or being read.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for BlockReadAhead {
    fn drop(&mut self) {
        // The kernel may still write into the arena: wait (`settle` leaks it if it cannot).
        self.submit();
        let _ = self.settle();
    }
}

/// A [`BlockReadAhead`] of one file whose reads are started by a thread of its own: the
/// thread that asks for them (the replica's staging thread, with the next extent waiting)
/// only queues block numbers, and the reads' submission (a few microseconds each in the
/// kernel) happens beside it.
pub struct ReadAheadThread {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    reader: Mutex<BlockReadAhead>,
    queue: Mutex<Queue>,
    wake: Condvar,
    file: File,
}

#[derive(Default)]
struct Queue {
    blocks: Vec<u64>,
    /// The thread waits for blocks (a hint wakes it).
    idle: bool,
    stop: bool,
}

impl ReadAheadThread {
    /// Reads ahead blocks of `block` bytes of `file` (opened with O_DIRECT) into `slots`
    /// slots, from a thread named `name`.
    pub fn spawn(file: File, slots: usize, block: usize, name: &str) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            reader: Mutex::new(BlockReadAhead::new(slots, block)?),
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            file,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || s.run())?;
        Ok(ReadAheadThread {
            shared,
            thread: Some(thread),
        })
    }

    /// Asks for `blocks` to be read ahead (a hint: see [`BlockReadAhead::start`]).
    pub fn hint(&self, blocks: impl IntoIterator<Item = u64>) {
        let mut q = self.shared.queue();
        q.blocks.extend(blocks);
        // Woken for a piece's worth, not for every block: a wakeup costs more than a read's
        // submission. What is left when the group applies, `collect` starts.
        if q.idle && q.blocks.len() >= SUBMIT_EVERY {
            q.idle = false;
            self.shared.wake.notify_one();
        }
    }

    /// Starts what was asked for and not started yet, waits for every read, and returns
    /// the reader to take blocks from (and to end the round with).
    pub fn collect(&self) -> io::Result<MutexGuard<'_, BlockReadAhead>> {
        // The reader first, then the queue (the thread's order: see `Shared::run`).
        let mut reader = self.shared.reader();
        let blocks = std::mem::take(&mut self.shared.queue().blocks);
        for b in blocks {
            reader.start(&self.shared.file, b);
        }
        reader.settle()?;
        Ok(reader)
    }
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn reader(&self) -> MutexGuard<'_, BlockReadAhead> {
        self.reader.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self) {
        loop {
            {
                let mut q = self.queue();
                while q.blocks.is_empty() && !q.stop {
                    q.idle = true;
                    q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
                }
                if q.stop {
                    return;
                }
            }
            // A piece at a time, taken from the queue under the reader's lock (reader, then
            // queue, as `collect`): a block is always either queued or started, so a
            // collect starts or waits for every block hinted before it. The lock is held a
            // few microseconds per block: a collect waits for at most one piece.
            loop {
                let mut reader = self.reader();
                let piece = {
                    let mut q = self.queue();
                    let at = q.blocks.len().saturating_sub(SUBMIT_EVERY);
                    q.blocks.split_off(at)
                };
                if piece.is_empty() {
                    break;
                }
                for b in piece {
                    reader.start(&self.file, b);
                }
                reader.submit();
            }
        }
    }
}

impl Drop for ReadAheadThread {
    fn drop(&mut self) {
        self.shared.queue().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};

    const BLOCK: usize = 4096;

    /// The image, opened with O_DIRECT and without; `None` where O_DIRECT is refused.
    fn image(dir: &std::path::Path, blocks: usize) -> Option<(File, File)> {
        let path = dir.join("img");
        let content: Vec<u8> = (0..blocks * BLOCK).map(|i| (i / BLOCK) as u8).collect();
        std::fs::write(&path, content).unwrap();
        let buffered = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap();
        Some((direct, buffered))
    }

    /// A reader with `slots` slots and an image of `blocks` blocks; `None` where io_uring
    /// or O_DIRECT is refused (the test then has nothing to check).
    fn reader_and_image(
        slots: usize,
        blocks: usize,
    ) -> Option<(BlockReadAhead, tempfile::TempDir, File, File)> {
        let ra = BlockReadAhead::new(slots, BLOCK).ok()?;
        let dir = tempfile::tempdir().unwrap();
        let (direct, buffered) = image(dir.path(), blocks)?;
        Some((ra, dir, direct, buffered))
    }

    #[test]
    fn blocks_read_ahead_are_handed_over_once_each() {
        let Some((mut ra, _dir, direct, _)) = reader_and_image(64, 200) else {
            return;
        };
        // More than one submission's worth, in no order, one twice.
        let wanted: Vec<u64> = (0..40).map(|k| (k * 37) % 200).chain([37]).collect();
        for &b in &wanted {
            ra.start(&direct, b);
        }
        assert_eq!(ra.len(), 40);
        ra.settle().unwrap();
        let mut buf = vec![0u8; BLOCK];
        for k in 0..40u64 {
            let b = (k * 37) % 200;
            assert!(ra.take(b, &mut buf), "block {b}");
            assert!(buf.iter().all(|&x| x == b as u8), "block {b}");
            assert!(!ra.take(b, &mut buf), "block {b} handed over twice");
        }
        assert!(!ra.take(1, &mut buf), "never started");
        assert_eq!(ra.len(), 0);
    }

    #[test]
    fn a_full_arena_skips_blocks_and_a_block_past_the_end_is_not_handed_over() {
        let Some((mut ra, _dir, direct, _)) = reader_and_image(4, 8) else {
            return;
        };
        for b in [0, 1, 2, 50, 3] {
            ra.start(&direct, b);
        }
        ra.settle().unwrap();
        let mut buf = vec![0xffu8; BLOCK];
        assert!(!ra.take(50, &mut buf), "past the end of the file");
        assert_eq!(buf, vec![0xff; BLOCK], "left alone");
        assert!(!ra.take(3, &mut buf), "no room was left for it");
        for b in 0..3 {
            assert!(ra.take(b, &mut buf));
        }
        // The failed read's slot is freed at the round's end; then there is room again.
        ra.next_round(|_| true);
        ra.start(&direct, 3);
        ra.settle().unwrap();
        assert!(ra.take(3, &mut buf));
        assert_eq!(buf, vec![3; BLOCK]);
    }

    #[test]
    fn rounds_free_unwanted_and_old_blocks() {
        let Some((mut ra, _dir, direct, buffered)) = reader_and_image(16, 16) else {
            return;
        };
        for b in 0..4 {
            ra.start(&direct, b);
        }
        ra.settle().unwrap();
        // Block 1 is no longer wanted (say, kept another way).
        ra.next_round(|b| b != 1);
        assert_eq!(ra.len(), 3);
        ra.start(&direct, 8);
        ra.settle().unwrap();
        // Blocks 0, 2 and 3 started a round earlier: gone; 8 stays one more round.
        ra.next_round(|_| true);
        assert_eq!(ra.len(), 1);
        // A reader that ends with reads in flight waits for them (no write into freed
        // memory); the file changing afterwards is the caller's concern, not this one's.
        buffered
            .write_all_at(&[9; BLOCK], 9 * BLOCK as u64)
            .unwrap();
        ra.start(&direct, 9);
        drop(ra);
    }

    #[test]
    fn a_read_ahead_thread_reads_what_it_is_hinted_and_collect_waits_for_all_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let Some((direct, _)) = image(dir.path(), 300) else {
            return;
        };
        let Ok(t) = ReadAheadThread::spawn(direct, 256, BLOCK, "test-ra") else {
            return;
        };
        // Hints in pieces, as extents arrive; the last ones may not have been started by
        // the thread when `collect` runs, and are started by it.
        for k in 0..20u64 {
            t.hint((0..10).map(|i| (k * 10 + i) * 7 % 300));
        }
        let mut reader = t.collect().unwrap();
        let mut buf = vec![0u8; BLOCK];
        let mut kept = 0;
        for b in 0..300u64 {
            if reader.take(b, &mut buf) {
                assert!(buf.iter().all(|&x| x == b as u8), "block {b}");
                kept += 1;
            }
        }
        assert_eq!(kept, 200);
        reader.next_round(|_| true);
        drop(reader);
        // Hinted and never collected: dropping the thread waits for what it started.
        t.hint(0..50);
        drop(t);
    }
}
