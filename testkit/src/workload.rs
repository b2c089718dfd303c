//! A dependent-write workload and its checker, shared by the consistency and replication
//! tests. Each write fills one 4 KiB block with its id; writes to one block are never in
//! flight together; the history records what the frontend saw complete before each issue.

#![allow(clippy::needless_range_loop)] // queues and slots are indexed side by side

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::test_frontend::{Desc, TestFrontend, DATA_BASE};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_OUT;

/// Block size of the workload.
pub const BLOCK: u64 = 4096;
/// Writes in flight per queue.
pub const DEPTH: usize = 6;

/// What the workload did, in the order the frontend saw it.
#[derive(Default)]
pub struct History {
    /// Blocks of the disk.
    pub blocks: u64,
    /// Block of each write, by id (ids start at 1).
    pub block: Vec<u64>,
    /// For each write id: how many completions the frontend had seen when it issued it.
    pub seen_at_issue: Vec<usize>,
    /// Completed write ids in the order the frontend saw their completions.
    pub completions: Vec<u64>,
}

impl History {
    /// An empty history for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        History {
            blocks: size / BLOCK,
            ..Default::default()
        }
    }

    /// Checks a replica image: every block holds one whole write, and for the newest write
    /// W* in the image, every write completed before W* was issued is in the image (or was
    /// overwritten by a later write to its block). Writes to one block are never in flight
    /// together, so ids per block grow with time.
    pub fn check(&self, image: &[u8]) -> Result<usize, String> {
        let mut visible = vec![0u64; self.blocks as usize];
        for b in 0..self.blocks as usize {
            let blk = &image[b * BLOCK as usize..(b + 1) * BLOCK as usize];
            let id = u64::from_le_bytes(blk[..8].try_into().unwrap());
            if blk
                .chunks_exact(8)
                .any(|w| u64::from_le_bytes(w.try_into().unwrap()) != id)
            {
                return Err(format!("block {b} is torn"));
            }
            if id != 0
                && (id as usize > self.block.len() || self.block[id as usize - 1] != b as u64)
            {
                return Err(format!(
                    "block {b} holds write {id}, which was not written there"
                ));
            }
            visible[b] = id;
        }
        let Some(&newest) = visible.iter().max() else {
            return Ok(0);
        };
        if newest == 0 {
            return Ok(0);
        }
        let mut required = vec![0u64; self.blocks as usize];
        for &d in &self.completions[..self.seen_at_issue[newest as usize - 1]] {
            let b = self.block[d as usize - 1] as usize;
            required[b] = required[b].max(d);
        }
        for b in 0..self.blocks as usize {
            if visible[b] < required[b] {
                return Err(format!(
                    "dependent-write violation: write {newest} is in the CG but write {} (block {b}), completed before it was issued, is not (block holds {})",
                    required[b], visible[b]
                ));
            }
        }
        Ok(visible.iter().filter(|&&v| v != 0).count())
    }
}

/// Drives the workload on queues 0 and 1 of `f` until `done()`; returns the writes issued.
pub fn drive(
    f: &mut TestFrontend,
    history: &Arc<Mutex<History>>,
    size: u64,
    done: impl FnMut() -> bool,
) -> u64 {
    let mode = Mode {
        seed: 0x853c49e6748fea9b,
        finish_inflight: true,
        ping_pong: false,
    };
    run(std::slice::from_mut(f), history, size, mode, done)
}

/// Like [`drive`], for a device that may die under the workload (`kill -9`): block choices
/// come from `seed`, and it returns as soon as `done()` without waiting for the writes in
/// flight. Those stay out of `history.completions` (whether they reached the disk is
/// unknown); the checker needs only what the frontend saw complete before each issue.
pub fn drive_until_killed(
    f: &mut TestFrontend,
    history: &Arc<Mutex<History>>,
    size: u64,
    seed: u64,
    done: impl FnMut() -> bool,
) -> u64 {
    let mode = Mode {
        seed: seed | 1,
        finish_inflight: false,
        ping_pong: false,
    };
    run(std::slice::from_mut(f), history, size, mode, done)
}

/// The workload over the disks of a group, one frontend per disk, each of `size` bytes:
/// the history's blocks are the disks' blocks one disk after the other, so
/// [`History::check`] runs on the images concatenated in the group's order. Dependencies
/// cross the disks: a write to one disk is issued after writes to the others completed.
/// With `ping_pong`, strictly so: one write in flight at a time, on each disk in turn, so
/// every write depends on the previous one, which was on another disk.
pub fn drive_group(
    fs: &mut [TestFrontend],
    history: &Arc<Mutex<History>>,
    size: u64,
    ping_pong: bool,
    done: impl FnMut() -> bool,
) -> u64 {
    let mode = Mode {
        seed: 0x2545f4914f6cdd1d,
        finish_inflight: true,
        ping_pong,
    };
    run(fs, history, size, mode, done)
}

/// [`drive_group`] for a group that may die under the workload (`kill -9`), as
/// [`drive_until_killed`] does for one disk.
pub fn drive_group_until_killed(
    fs: &mut [TestFrontend],
    history: &Arc<Mutex<History>>,
    size: u64,
    seed: u64,
    done: impl FnMut() -> bool,
) -> u64 {
    let mode = Mode {
        seed: seed | 1,
        finish_inflight: false,
        ping_pong: false,
    };
    run(fs, history, size, mode, done)
}

struct Mode {
    /// Block choices.
    seed: u64,
    /// Wait for the writes in flight when `done()` (a complete history).
    finish_inflight: bool,
    /// One write in flight at a time, on each disk in turn.
    ping_pong: bool,
}

fn run(
    fs: &mut [TestFrontend],
    history: &Arc<Mutex<History>>,
    size: u64,
    mode: Mode,
    mut done: impl FnMut() -> bool,
) -> u64 {
    let blocks = size / BLOCK;
    // The workload: DEPTH writes in flight per queue, each to a block with no write in flight.
    let mut rng = mode.seed;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let n = fs.len();
    let mut inflight: Vec<Vec<Vec<Option<u64>>>> = vec![vec![vec![None; DEPTH]; 2]; n];
    let mut busy_blocks = HashSet::new();
    let mut writes = 0u64;
    // Ping-pong: the disk whose turn it is, and whether a write is in flight.
    let mut turn = 0usize;
    let mut one_in_flight = false;
    loop {
        for (d, f) in fs.iter_mut().enumerate() {
            // Consume used entries (the device's view); a slot whose status byte is set is
            // done.
            for q in 0..2 {
                f.poll_used(q).unwrap();
            }
            for q in 0..2 {
                for slot in 0..DEPTH {
                    if let Some(id) = inflight[d][q][slot] {
                        let st = f.slot_status(q, slot);
                        if st != 0xff {
                            assert_eq!(st, 0, "write {id} failed");
                            let mut h = history.lock().unwrap();
                            h.completions.push(id);
                            busy_blocks.remove(&h.block[id as usize - 1]);
                            inflight[d][q][slot] = None;
                            one_in_flight = false;
                        }
                    }
                    if inflight[d][q][slot].is_some() {
                        continue;
                    }
                    if mode.ping_pong && (one_in_flight || turn != d) {
                        continue;
                    }
                    // A block of this disk (the history numbers the group's blocks).
                    let b = loop {
                        let b = d as u64 * blocks + next() % blocks;
                        if !busy_blocks.contains(&b) {
                            break b;
                        }
                    };
                    busy_blocks.insert(b);
                    let id = {
                        let mut h = history.lock().unwrap();
                        h.block.push(b);
                        let seen = h.completions.len();
                        h.seen_at_issue.push(seen);
                        h.block.len() as u64
                    };
                    let buf = DATA_BASE + ((q * DEPTH + slot) as u64) * BLOCK;
                    let data: Vec<u8> = std::iter::repeat_n(id.to_le_bytes(), (BLOCK / 8) as usize)
                        .flatten()
                        .collect();
                    f.write_mem(buf, &data).unwrap();
                    f.submit_request(
                        q,
                        slot,
                        VIRTIO_BLK_T_OUT,
                        (b - d as u64 * blocks) * BLOCK / 512,
                        &[Desc::r(buf, BLOCK as u32)],
                    )
                    .unwrap();
                    inflight[d][q][slot] = Some(id);
                    writes += 1;
                    one_in_flight = true;
                    turn = (d + 1) % n;
                }
            }
        }
        if done() {
            break;
        }
    }
    if !mode.finish_inflight {
        return writes;
    }
    // Let the writes in flight finish, so the history is complete.
    for (d, f) in fs.iter().enumerate() {
        for q in 0..2 {
            for slot in 0..DEPTH {
                if let Some(id) = inflight[d][q][slot] {
                    let t = std::time::Instant::now();
                    while f.slot_status(q, slot) == 0xff
                        && t.elapsed() < std::time::Duration::from_secs(120)
                    {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                    let mut h = history.lock().unwrap();
                    h.completions.push(id);
                }
            }
        }
    }
    writes
}
