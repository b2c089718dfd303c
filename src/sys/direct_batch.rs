//! Batches of O_DIRECT writes (and reads) of one file, submitted together through
//! io_uring.
//!
//! The secondary applies each committed group as thousands of scattered 4 KiB writes into
//! an image that nothing reads in the cycle. Through the page cache every one of them costs
//! a new page (on a VM with free-page reporting, a page the host must fault in again), a
//! copy, and later a write-back; written around the cache and many at a time, the device
//! moves the bytes and the CPU only queues them.
//!
//! # Why the arena is never touched while the kernel reads it
//! [`DirectBatch::write`] copies each write into the arena and pushes its submission entry,
//! but nothing is submitted until [`DirectBatch::finish`] (called by `write` itself when
//! the arena or the ring is full), and `finish` returns only once every submitted write
//! has completed. So while the kernel reads the arena, nobody writes it. If waiting fails
//! in a way that leaves writes in flight, the batch is broken for good and its arena is
//! leaked, never freed or reused.
//!
//! The kernel does a batch's writes in any order: the writes of one batch must not
//! overlap (an applied group writes each chunk once).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use io_uring::{opcode, types, IoUring};

use crate::blk::disk::{AlignedBuf, DIRECT_ALIGN};

/// Writes in one submission, at most.
const DEPTH: u32 = 512;
/// Bytes of queued writes, at most: larger runs are not batched.
const ARENA_BYTES: usize = 4 << 20;

/// One queued write: where it goes and where its bytes sit in the arena.
#[derive(Clone, Copy)]
struct Queued {
    pos: u64,
    start: usize,
    len: usize,
}

/// A batch of aligned writes to one O_DIRECT file (see the module docs).
pub struct DirectBatch {
    ring: IoUring,
    /// Where queued writes' bytes wait (aligned for O_DIRECT). `None` once leaked: writes
    /// were left in flight by a failed wait, and the batch refuses further work.
    arena: Option<AlignedBuf>,
    /// Arena bytes in use.
    used: usize,
    queued: Vec<Queued>,
}

impl DirectBatch {
    /// A batch for one file; fails where io_uring is unavailable (old kernel, seccomp,
    /// `kernel.io_uring_disabled`).
    pub fn new() -> io::Result<DirectBatch> {
        Ok(DirectBatch {
            ring: IoUring::new(DEPTH)?,
            arena: Some(AlignedBuf::new(ARENA_BYTES)),
            used: 0,
            queued: Vec::with_capacity(DEPTH as usize),
        })
    }

    /// Whether a write of `len` bytes at `pos` can be batched: aligned for O_DIRECT and
    /// small enough for the arena.
    pub fn fits(pos: u64, len: usize) -> bool {
        let a = DIRECT_ALIGN;
        len > 0 && len <= ARENA_BYTES && len % a == 0 && pos % a as u64 == 0
    }

    /// Queues `data` to be written at `pos` of `direct` (the O_DIRECT file; `buffered` is
    /// the same file without it, used where O_DIRECT is refused). Requires
    /// [`fits`](Self::fits). Submits and waits for the queued writes first if there is no
    /// room. Every batch must end with [`finish`](Self::finish) on the same files.
    pub fn write(
        &mut self,
        direct: &File,
        buffered: &File,
        data: &[u8],
        pos: u64,
    ) -> io::Result<()> {
        debug_assert!(Self::fits(pos, data.len()));
        if self.arena.is_none() {
            return Err(io::Error::other(
                "an earlier batch of image writes could not be waited for",
            ));
        }
        if self.used + data.len() > ARENA_BYTES || self.queued.len() == DEPTH as usize {
            self.finish(direct, buffered)?;
        }
        let start = self.used;
        let arena = self
            .arena
            .as_mut()
            .expect("checked above; finish leaks it only on error");
        let dst = &mut arena.as_mut_slice()[start..start + data.len()];
        dst.copy_from_slice(data);
        let sqe = opcode::Write::new(
            types::Fd(direct.as_raw_fd()),
            dst.as_ptr(),
            data.len() as u32,
        )
        .offset(pos)
        .build()
        .user_data(self.queued.len() as u64);
        // SAFETY: the entry points into the arena, which nobody writes or frees until the
        // write has completed (module docs); the fd is `direct`, which the caller keeps
        // open until `finish`, which waits for the write.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        self.queued.push(Queued {
            pos,
            start,
            len: data.len(),
        });
        self.used += data.len();
        Ok(())
    }

    /// Submits every queued write and waits for all of them. A write the kernel did only
    /// in part is finished with `pwrite`; one refused as unaligned for this file (EINVAL:
    /// a file system without O_DIRECT) is written through `buffered`. Returns the first
    /// error, after every write has completed.
    pub fn finish(&mut self, direct: &File, buffered: &File) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        let results = match wait_all(&mut self.ring, self.queued.len()) {
            Ok(r) => r,
            Err(e) => {
                // Writes may still be in flight from this arena: never reuse it (and
                // forget them, so a later `finish` does not wait for them again).
                std::mem::forget(self.arena.take());
                self.queued.clear();
                self.used = 0;
                return Err(e);
            }
        };
        let mut first_error: Option<io::Error> = None;
        let arena = self
            .arena
            .as_ref()
            .expect("queued writes exist only while the arena does");
        for (i, res) in results {
            let q = self.queued[i as usize];
            let bytes = &arena.as_slice()[q.start..q.start + q.len];
            let outcome = match res {
                r if r >= 0 && r as usize == q.len => Ok(()),
                r if r >= 0 => direct.write_all_at(&bytes[r as usize..], q.pos + r as u64),
                r if -r == libc::EINVAL => buffered.write_all_at(bytes, q.pos),
                r => Err(io::Error::from_raw_os_error(-r)),
            };
            if let Err(e) = outcome {
                first_error.get_or_insert(e);
            }
        }
        self.queued.clear();
        self.used = 0;
        first_error.map_or(Ok(()), Err)
    }
}

/// Scattered O_DIRECT reads of one file, all submitted at once: a drill keeps the old
/// content of every block a group overwrites, and reading thousands of scattered blocks of
/// an uncached image one by one (or into new page-cache pages) would hold the apply up.
///
/// The reads land in the reader's own arena and are copied out once all have completed,
/// so the kernel never writes into a caller's memory after `read` returns; if waiting
/// fails with reads in flight, the arena is leaked and the reader refuses further work.
pub struct DirectReads {
    ring: IoUring,
    arena: Option<AlignedBuf>,
}

impl DirectReads {
    /// A reader with room for `arena_bytes` per call; fails where io_uring is unavailable.
    pub fn new(arena_bytes: usize) -> io::Result<DirectReads> {
        Ok(DirectReads {
            ring: IoUring::new(DEPTH)?,
            arena: Some(AlignedBuf::new(arena_bytes)),
        })
    }

    /// Reads each `(pos, len)` of `ranges` into `buf`, one after another from its start
    /// (`buf` is their total length, at most the arena). Aligned ranges are read from
    /// `direct` (O_DIRECT) many at a time, others (a short last block) from `buffered`; a
    /// range that ends past the end of the file reads zeroes there.
    pub fn read(
        &mut self,
        direct: &File,
        buffered: &File,
        ranges: &[(u64, usize)],
        buf: &mut [u8],
    ) -> io::Result<()> {
        let total: usize = ranges.iter().map(|r| r.1).sum();
        let Some(arena) = self.arena.as_mut() else {
            return Err(io::Error::other(
                "an earlier batch of reads could not be waited for",
            ));
        };
        if total != buf.len() || total > arena.as_slice().len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the ranges do not match the buffer, or exceed the reader's arena",
            ));
        }
        let a = DIRECT_ALIGN;
        let mut at = 0;
        let mut inflight: Vec<(u64, usize, usize)> = Vec::new();
        let mut first_error: Option<io::Error> = None;
        let mut i = 0;
        while i < ranges.len() || !inflight.is_empty() {
            // Queue what fits in the ring; read unaligned ranges at once.
            while i < ranges.len() && inflight.len() < DEPTH as usize {
                let (pos, len) = ranges[i];
                let dst = &mut arena.as_mut_slice()[at..at + len];
                if len % a == 0 && pos % a as u64 == 0 && at % a == 0 {
                    let sqe = opcode::Read::new(
                        types::Fd(direct.as_raw_fd()),
                        dst.as_mut_ptr(),
                        len as u32,
                    )
                    .offset(pos)
                    .build()
                    .user_data(inflight.len() as u64);
                    // SAFETY: the entry points into the arena, which nothing else touches
                    // until the read has completed (every read is waited for below); the
                    // fd is `direct`, borrowed for this whole call.
                    if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                        break;
                    }
                    inflight.push((pos, at, len));
                } else if let Err(e) = read_full_at(buffered, dst, pos) {
                    first_error.get_or_insert(e);
                }
                at += len;
                i += 1;
            }
            if inflight.is_empty() {
                continue;
            }
            let results = match wait_all(&mut self.ring, inflight.len()) {
                Ok(r) => r,
                Err(e) => {
                    // Reads may still be in flight into the arena: never reuse it.
                    std::mem::forget(self.arena.take());
                    return Err(e);
                }
            };
            for (k, res) in results {
                let (pos, start, len) = inflight[k as usize];
                let dst = &mut arena.as_mut_slice()[start..start + len];
                let outcome = match res {
                    r if r >= 0 && r as usize == len => Ok(()),
                    // Short (the end of the file) or refused: the rest the usual way.
                    r if r >= 0 => read_full_at(buffered, &mut dst[r as usize..], pos + r as u64),
                    r if -r == libc::EINVAL => read_full_at(buffered, dst, pos),
                    r => Err(io::Error::from_raw_os_error(-r)),
                };
                if let Err(e) = outcome {
                    first_error.get_or_insert(e);
                }
            }
            inflight.clear();
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        buf.copy_from_slice(&arena.as_slice()[..total]);
        Ok(())
    }
}

/// Submits what is queued on `ring` and waits until `n` operations have completed;
/// returns each one's `(user_data, result)`. An error means some may still be in flight:
/// the caller must never reuse (or free) the memory they use.
pub(super) fn wait_all(ring: &mut IoUring, n: usize) -> io::Result<Vec<(u64, i32)>> {
    let mut results = Vec::with_capacity(n);
    while results.len() < n {
        match ring.submit_and_wait(n - results.len()) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) => {}
            Err(e) => return Err(e),
        }
        results.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    }
    Ok(results)
}

/// Reads `buf` from `pos`, zeroes past the end of the file.
fn read_full_at(f: &File, buf: &mut [u8], pos: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    const SIZE: usize = 128 << 20;

    fn files(dir: &std::path::Path) -> (File, File) {
        let path = dir.join("img");
        let buffered = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        buffered.set_len(SIZE as u64).unwrap();
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .unwrap_or_else(|_| buffered.try_clone().unwrap());
        (direct, buffered)
    }

    #[test]
    fn batched_writes_land_where_asked_across_several_submissions() {
        let Ok(mut batch) = DirectBatch::new() else {
            eprintln!("io_uring unavailable here: nothing to test");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (direct, buffered) = files(dir.path());
        // More writes than the ring holds and more bytes than the arena: `write` must
        // submit and wait on its own, and nothing may be lost or misplaced. 1061 is prime,
        // so the slots are scattered and distinct.
        let n = 1061u64;
        let slot = 72u64 << 10;
        let mut expected = Vec::new();
        for i in 0..n {
            let len = if i % 7 == 0 { 64 << 10 } else { 4096 };
            let pos = (i * 613 % n) * slot;
            let data: Vec<u8> = (0..len).map(|b| (b as u64 ^ i ^ 0x5a) as u8).collect();
            assert!(DirectBatch::fits(pos, len));
            batch.write(&direct, &buffered, &data, pos).unwrap();
            expected.push((pos, data));
        }
        batch.finish(&direct, &buffered).unwrap();
        let mut model = vec![0u8; SIZE];
        for (pos, data) in &expected {
            model[*pos as usize..*pos as usize + data.len()].copy_from_slice(data);
        }
        let mut got = vec![0u8; SIZE];
        buffered.read_exact_at(&mut got, 0).unwrap();
        assert!(got == model, "the file differs from the writes");
    }

    #[test]
    fn scattered_reads_come_back_in_order_whatever_their_alignment() {
        let Ok(mut reads) = DirectReads::new(8 << 20) else {
            eprintln!("io_uring unavailable here: nothing to test");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let (_, buffered) = files(dir.path());
        let content: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
        buffered.write_all_at(&content, 0).unwrap();
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("img"))
            .unwrap_or_else(|_| buffered.try_clone().unwrap());
        // More ranges than the ring holds, scattered, some unaligned, one past the end.
        let mut ranges: Vec<(u64, usize)> = (0..1061u64)
            .map(|i| ((i * 613 % 1061) * (72 << 10), 4096))
            .collect();
        ranges.push((4096 * 3 + 100, 1000));
        ranges.push((SIZE as u64 - 4096, 8192));
        let total = ranges.iter().map(|r| r.1).sum();
        let mut buf = vec![0xeeu8; total];
        reads.read(&direct, &buffered, &ranges, &mut buf).unwrap();
        let mut at = 0;
        for &(pos, len) in &ranges {
            for (k, &b) in buf[at..at + len].iter().enumerate() {
                let p = pos as usize + k;
                let want = if p < SIZE { content[p] } else { 0 };
                assert_eq!(b, want, "byte {k} of the range at {pos}");
            }
            at += len;
        }
        // A buffer that does not match the ranges is refused, not overrun.
        assert!(reads
            .read(&direct, &buffered, &ranges, &mut buf[1..])
            .is_err());
    }

    #[test]
    fn only_aligned_runs_that_fit_the_arena_are_batched() {
        assert!(DirectBatch::fits(0, 4096));
        assert!(DirectBatch::fits(8192, ARENA_BYTES));
        assert!(!DirectBatch::fits(512, 4096));
        assert!(!DirectBatch::fits(0, 4095));
        assert!(!DirectBatch::fits(0, 0));
        assert!(!DirectBatch::fits(0, ARENA_BYTES + 4096));
    }
}
