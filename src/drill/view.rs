//! A drill's view of the replica: the image as of the drill's group, writable, without
//! touching the image.
//!
//! Per 4 KiB block, a read comes from the first of: the overlay (the drill's own writes),
//! the preserved copy (the block's content at the drill's group, saved before a later group
//! overwrote it), the replica image (unchanged since the drill's group). Both files live in
//! the drill's directory; two bitmaps say which blocks they hold. The overlay is sparse, at
//! the block's own offset. The preserved file is a log: a group's preserved blocks are
//! appended in one sequential pass (O_DIRECT where the filesystem allows it, so no dirty
//! pages wait for write-back inside the journal's fsyncs), and a map says where each one
//! went. Scattered 4 KiB writes into a sparse file cost the apply an allocation each.
//!
//! # Why a read never sees a later group
//! The store calls [`DrillView::before_write`] before it changes a range of the image, and
//! writes only after that returns. `before_write` copies the blocks the drill still reads
//! from the image into the preserved file and sets their bits, all under the maps' write
//! lock. A read holds the read lock from looking a block up until it has read it from the
//! image. So a read that found a block "in the image" finished before the copy began (and
//! before the image changed), and every later read finds it preserved.
//!
//! # Why a block read ahead at staging is still the drill's when its group applies
//! While a group's extents arrive, [`ImageObserver::will_write`] has the blocks they cover
//! that the drill still reads from the image read by a thread of the view's own, so that
//! the apply finds most of them read. A block is kept from its read-ahead only if, at the apply, the drill still
//! reads it from the image. Every change of the image is told to the view first, and the
//! view then keeps the block (it reads from the preserved copy from then on) or ends the
//! drill; a block's source never goes back to the image. So a block still read from the
//! image has not changed since the view began, and any read of it since then (completed:
//! the apply waits for every read ahead before it keeps anything) holds its content.
//!
//! # Space
//! Overlay and preserved blocks share one limit, [`Space`], with the views of the drill's
//! other disks (a group's drill). A drill write that would pass it fails
//! (the guest sees an I/O error); a group whose preservation would pass it ends the drill
//! instead — replication never waits for a drill, and never fails because of one. An ended
//! view fails every request with the reason.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::blk::backing::Backing;
use crate::replica::ImageObserver;
use crate::sys::read_ahead::{BlockReadAhead, ReadAheadThread};

/// Granularity of the overlay and of preservation.
pub const BLOCK: u64 = 4096;

/// Largest buffer one step of a zeroing or preserving pass uses.
const STEP: u64 = 1 << 20;

/// Blocks read ahead at most (16 MiB): a group of 20,000 random writes a second at the
/// default interval is about 2,000; what does not fit is read when the group applies.
const READ_AHEAD_BLOCKS: usize = 4096;

/// One bit per block.
struct Bits(Vec<u64>);

impl Bits {
    fn new(blocks: u64) -> Bits {
        Bits(vec![0; blocks.div_ceil(64) as usize])
    }
    fn get(&self, b: u64) -> bool {
        self.0[(b / 64) as usize] & (1 << (b % 64)) != 0
    }
    fn set(&mut self, b: u64) {
        self.0[(b / 64) as usize] |= 1 << (b % 64);
    }
    fn clear(&mut self, b: u64) {
        self.0[(b / 64) as usize] &= !(1 << (b % 64));
    }
}

/// Where a block's content is read from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Overlay,
    Preserved,
    Image,
}

struct Maps {
    overlay: Bits,
    /// Overlay blocks the drill zeroed (discard, write-zeroes): holes in the overlay file,
    /// read as zeroes, not counted against the space.
    zeroed: Bits,
    preserved: Bits,
    /// Where each preserved block lies in the preserved log.
    preserved_at: std::collections::HashMap<u64, u64>,
    /// Bytes appended to the preserved log (whole blocks).
    preserved_len: u64,
    overlay_blocks: u64,
    preserved_blocks: u64,
    /// Preserved blocks that were taken from the read-ahead.
    preserved_read_ahead: u64,
    /// The buffer groups' blocks are kept through (allocated at the first).
    step_buf: Option<crate::blk::disk::AlignedBuf>,
    /// Why the drill ended; every request fails from then on.
    ended: Option<String>,
}

impl Maps {
    fn source(&self, b: u64) -> Source {
        if self.overlay.get(b) {
            Source::Overlay
        } else if self.preserved.get(b) {
            Source::Preserved
        } else {
            Source::Image
        }
    }
}

/// The limit on a drill's overlay plus preserved blocks, shared by the views of all its
/// disks: one disk of a group may use what the others do not.
#[derive(Debug)]
pub struct Space {
    limit_blocks: u64,
    used_blocks: AtomicU64,
}

impl Space {
    /// A limit of `bytes` (whole blocks).
    pub fn new(bytes: u64) -> Arc<Space> {
        Arc::new(Space {
            limit_blocks: bytes / BLOCK,
            used_blocks: AtomicU64::new(0),
        })
    }

    /// The limit in bytes.
    pub fn bytes(&self) -> u64 {
        self.limit_blocks * BLOCK
    }

    /// Takes `blocks` if they fit under the limit (all or nothing, atomically: two views
    /// taking at once never pass it together).
    fn take(&self, blocks: u64) -> bool {
        self.used_blocks
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + blocks <= self.limit_blocks).then_some(used + blocks)
            })
            .is_ok()
    }

    /// Returns `blocks` taken but not used (or freed).
    fn give_back(&self, blocks: u64) {
        self.used_blocks.fetch_sub(blocks, Ordering::AcqRel);
    }
}

/// Figures for the drill's status.
#[derive(Clone, Debug, Default)]
pub struct ViewFigures {
    /// Bytes the drill wrote (its overlay).
    pub overlay_bytes: u64,
    /// Bytes of the replica kept for the drill because later groups overwrote them.
    pub preserved_bytes: u64,
    /// Drill writes that failed (the drill space was full).
    pub failed_writes: u64,
    /// Why the drill ended, if it did.
    pub ended: Option<String>,
}

/// A writable view of the replica image as of one group. See the module docs.
pub struct DrillView {
    dir: PathBuf,
    image: File,
    overlay: File,
    /// The overlay opened with O_DIRECT for the drill's writes (None where the filesystem
    /// refuses it, e.g. tmpfs). Reads use `overlay`: a direct write drops the cached pages
    /// it covers, so buffered reads see it.
    overlay_direct: Option<File>,
    /// The preserved log (reads, and writes where O_DIRECT is refused).
    preserved: File,
    /// The preserved log opened with O_DIRECT for appends (None where refused).
    preserved_direct: Option<File>,
    /// The image opened with O_DIRECT for reading the blocks to keep, and the reader that
    /// reads a step's blocks at once (None where either is refused: then `image`, with
    /// readahead hints).
    image_direct: Option<(File, Mutex<crate::sys::direct_batch::DirectReads>)>,
    /// Blocks the staged groups will overwrite, read ahead of their apply (None without
    /// `image_direct`, or where io_uring is refused).
    read_ahead: Option<ReadAheadThread>,
    size: u64,
    space: Arc<Space>,
    maps: RwLock<Maps>,
    failed_writes: AtomicU64,
}

impl DrillView {
    /// A view of `image` (its current content: the caller makes sure no group is being
    /// applied and installs the view as the store's observer before the next one) with
    /// its files in `dir` (created; must not hold an earlier drill's), its overlay and
    /// preserved blocks counted in `space`.
    pub fn create(image: &Path, dir: &Path, size: u64, space: Arc<Space>) -> io::Result<DrillView> {
        std::fs::create_dir_all(dir)?;
        let make = |name: &str| -> io::Result<File> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(name))?;
            f.set_len(size)?;
            Ok(f)
        };
        let blocks = size.div_ceil(BLOCK);
        let overlay = make("overlay")?;
        let direct = |name: &str| crate::sys::file::open_direct_for_writing(&dir.join(name));
        let overlay_direct = direct("overlay");
        let preserved = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join("preserved"))?;
        let image_direct = {
            use std::os::unix::fs::OpenOptionsExt;
            let file = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(image)
                .ok();
            let reads = crate::sys::direct_batch::DirectReads::new(STEP as usize).ok();
            file.zip(reads).map(|(f, r)| (f, Mutex::new(r)))
        };
        let read_ahead = image_direct
            .as_ref()
            .and_then(|(f, _)| f.try_clone().ok())
            .and_then(|f| {
                ReadAheadThread::spawn(f, READ_AHEAD_BLOCKS, BLOCK as usize, "drblk-drill-ra").ok()
            });
        Ok(DrillView {
            dir: dir.to_path_buf(),
            image: File::open(image)?,
            image_direct,
            read_ahead,
            overlay,
            overlay_direct,
            preserved,
            preserved_direct: direct("preserved"),
            size,
            space,
            maps: RwLock::new(Maps {
                overlay: Bits::new(blocks),
                zeroed: Bits::new(blocks),
                preserved: Bits::new(blocks),
                preserved_at: std::collections::HashMap::new(),
                preserved_len: 0,
                overlay_blocks: 0,
                preserved_blocks: 0,
                preserved_read_ahead: 0,
                step_buf: None,
                ended: None,
            }),
            failed_writes: AtomicU64::new(0),
        })
    }

    /// Ends the view (every later request fails with `reason`); the first reason stays.
    pub fn end(&self, reason: &str) {
        let mut m = self
            .maps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        end_locked(&mut m, reason);
    }

    /// Current figures.
    pub fn figures(&self) -> ViewFigures {
        let m = self
            .maps
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        ViewFigures {
            overlay_bytes: m.overlay_blocks * BLOCK,
            preserved_bytes: m.preserved_blocks * BLOCK,
            failed_writes: self.failed_writes.load(Ordering::Relaxed),
            ended: m.ended.clone(),
        }
    }

    /// The limit on overlay plus preserved bytes (of all the drill's disks).
    pub fn space(&self) -> u64 {
        self.space.bytes()
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::blk::backing::check_range(offset, len, self.size)
    }

    /// Reads `buf.len()` bytes of the drill's view at `pos` from a run of preserved blocks
    /// (consecutive blocks of the view, wherever the log holds them): one read per stretch
    /// of blocks that the log also holds one after the other (a group keeps its blocks in
    /// disk order, so large reads of a drill guest mostly need one).
    fn read_preserved(&self, m: &Maps, buf: &mut [u8], pos: u64) -> io::Result<()> {
        let logged_at = |b: u64| {
            m.preserved_at.get(&b).copied().ok_or_else(|| {
                io::Error::other(format!("block {b} is marked preserved but not in the log"))
            })
        };
        let end = pos + buf.len() as u64;
        let mut at = pos;
        while at < end {
            let b = at / BLOCK;
            let first = logged_at(b)?;
            // Extend over the next blocks while the log holds each right after the last.
            let mut next = b + 1;
            while next * BLOCK < end
                && m.preserved_at.get(&next) == Some(&(first + (next - b) * BLOCK))
            {
                next += 1;
            }
            let stop = (next * BLOCK).min(end);
            let part = &mut buf[(at - pos) as usize..(stop - pos) as usize];
            self.preserved.read_exact_at(part, first + at % BLOCK)?;
            at = stop;
        }
        Ok(())
    }

    /// The bytes of block `b` that lie inside the disk.
    fn block_range(&self, b: u64) -> (u64, u64) {
        let start = b * BLOCK;
        (start, (start + BLOCK).min(self.size))
    }

    /// Reads `buf.len()` bytes at `offset` as the drill sees them (read lock held).
    fn read_locked(&self, m: &Maps, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if let Some(why) = &m.ended {
            return Err(ended_error(why));
        }
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            // One run of blocks with the same source.
            let src = m.source(pos / BLOCK);
            let mut run_end = ((pos / BLOCK) + 1) * BLOCK;
            while run_end < end && m.source(run_end / BLOCK) == src {
                run_end += BLOCK;
            }
            let run_end = run_end.min(end);
            let at = (pos - offset) as usize;
            let part = &mut buf[at..at + (run_end - pos) as usize];
            match src {
                Source::Overlay => self.overlay.read_exact_at(part, pos)?,
                Source::Image => self.image.read_exact_at(part, pos)?,
                Source::Preserved => self.read_preserved(m, part, pos)?,
            }
            pos = run_end;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay (`None`: zeroes), reading the rest of
    /// partly covered blocks from the drill's view first.
    fn write(&self, offset: u64, len: u64, data: Option<&[u8]>) -> io::Result<()> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut m = self
            .maps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(why) = &m.ended {
            return Err(ended_error(why));
        }
        let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let counted = |m: &Maps, b: u64| m.overlay.get(b) && !m.zeroed.get(b);
        // Blocks a zeroing covers whole become holes: no data, no space.
        let whole = |b: u64| {
            let (bs, be) = self.block_range(b);
            data.is_none() && bs >= offset && be <= offset + len
        };
        let new = (first..=last)
            .filter(|&b| !counted(&m, b) && !whole(b))
            .count() as u64;
        if !self.space.take(new) {
            let n = self.failed_writes.fetch_add(1, Ordering::Relaxed) + 1;
            // The first failure and then every power of two: bounded however the guest
            // insists.
            if n.is_power_of_two() {
                tracing::error!(
                    dir = %self.dir.display(),
                    failed_writes = n,
                    space = self.space(),
                    "drill write refused: the drill space is full; stop the drill (`drill stop`) or start the next one with a larger --drill-space"
                );
            }
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("the drill space ({} MiB) is full", self.space() >> 20),
            ));
        }
        // `new` is an upper bound of the blocks this write adds (zeroing may free some, a
        // failing write adds fewer): what it did not add goes back.
        let before = m.overlay_blocks;
        let written = self.write_locked(&mut m, offset, len, data);
        self.space.give_back(before + new - m.overlay_blocks);
        written
    }

    /// The body of [`Self::write`], with the maps locked and the space taken.
    fn write_locked(
        &self,
        m: &mut Maps,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let counted = |m: &Maps, b: u64| m.overlay.get(b) && !m.zeroed.get(b);
        let whole = |b: u64| {
            let (bs, be) = self.block_range(b);
            data.is_none() && bs >= offset && be <= offset + len
        };
        let start = first * BLOCK;
        let stop = ((last + 1) * BLOCK).min(self.size);
        // In steps, so a large zeroing never allocates its whole length.
        let mut pos = start;
        while pos < stop {
            let step_end = (pos + STEP).min(stop);
            let mut aligned = crate::blk::disk::AlignedBuf::new((step_end - pos) as usize);
            let buf = aligned.as_mut_slice();
            // Partly covered blocks at the edges keep the rest of their content.
            for b in [pos / BLOCK, (step_end - 1) / BLOCK] {
                let (bs, be) = self.block_range(b);
                if bs < offset || be > offset + len {
                    let at = (bs - pos) as usize;
                    self.read_locked(m, &mut buf[at..at + (be - bs) as usize], bs)?;
                }
            }
            if let Some(d) = data {
                let lo = pos.max(offset);
                let hi = step_end.min(offset + len);
                buf[(lo - pos) as usize..(hi - pos) as usize]
                    .copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize]);
            } else {
                let lo = pos.max(offset);
                let hi = step_end.min(offset + len);
                buf[(lo - pos) as usize..(hi - pos) as usize].fill(0);
            }
            if data.is_none() {
                // Zeroing: the edge blocks keep their data, the whole ones become holes.
                let (fb, lb) = (pos / BLOCK, (step_end - 1) / BLOCK);
                for b in [fb, lb] {
                    if !whole(b) {
                        let (bs, be) = self.block_range(b);
                        let at = (bs - pos) as usize;
                        self.write_overlay(&buf[at..at + (be - bs) as usize], bs)?;
                    }
                }
                let (hs, he) = (
                    if whole(fb) { fb } else { fb + 1 },
                    if whole(lb) { lb + 1 } else { lb },
                );
                if hs < he {
                    let (s0, _) = self.block_range(hs);
                    let (_, e0) = self.block_range(he - 1);
                    match crate::sys::file::punch_hole(&self.overlay, s0, e0 - s0) {
                        Ok(()) => {}
                        // No holes here: zeroes by hand (`buf` is zero there).
                        Err(e) if crate::sys::file::is_unsupported(&e) => {
                            let at = (s0 - pos) as usize;
                            self.write_overlay(&buf[at..at + (e0 - s0) as usize], s0)?;
                        }
                        Err(e) => return Err(e),
                    }
                }
            } else {
                self.write_overlay(buf, pos)?;
            }
            for b in pos / BLOCK..=(step_end - 1) / BLOCK {
                let was = counted(m, b);
                m.overlay.set(b);
                if whole(b) {
                    m.zeroed.set(b);
                    if was {
                        m.overlay_blocks -= 1;
                    }
                } else {
                    m.zeroed.clear(b);
                    if !was {
                        m.overlay_blocks += 1;
                    }
                }
            }
            pos = step_end;
        }
        Ok(())
    }
}

impl DrillView {
    /// Reads `blocks` (in order) from the image into `buf` (one block each; a short last
    /// block of the disk is padded with zeroes) and appends `buf` to the preserved log at
    /// `log_end`, with O_DIRECT where the filesystem allows it. Blocks `read_ahead` holds
    /// (read since the view began, and still read from the image: see the module docs)
    /// are taken from it. Returns how many were.
    fn copy_step(
        &self,
        blocks: &[u64],
        buf: &mut [u8],
        log_end: u64,
        mut read_ahead: Option<&mut BlockReadAhead>,
    ) -> io::Result<usize> {
        let bs = BLOCK as usize;
        let mut from_read_ahead = 0;
        if let Some((direct, reads)) = &self.image_direct {
            // The blocks not read ahead, as runs of consecutive ones: (first index in
            // `blocks`, count).
            let mut missing: Vec<(usize, usize)> = Vec::new();
            for (i, &b) in blocks.iter().enumerate() {
                let taken = read_ahead
                    .as_deref_mut()
                    .is_some_and(|ra| ra.take(b, &mut buf[i * bs..(i + 1) * bs]));
                if taken {
                    from_read_ahead += 1;
                    continue;
                }
                match missing.last_mut() {
                    Some((s, n)) if *s + *n == i && blocks[i - 1] + 1 == b => *n += 1,
                    _ => missing.push((i, 1)),
                }
            }
            // Every run at once, around the page cache (the image is not cached: the
            // apply writes it around the page cache too).
            let runs: Vec<(u64, usize)> = missing
                .iter()
                .map(|&(i, n)| (blocks[i] * BLOCK, n * bs))
                .collect();
            let mut reads = reads.lock().unwrap_or_else(|e| e.into_inner());
            if from_read_ahead == 0 {
                reads.read(direct, &self.image, &runs, buf)?;
            } else if !runs.is_empty() {
                // Read into one buffer, then each run to its place among the others.
                let total = runs.iter().map(|r| r.1).sum();
                let mut got = vec![0u8; total];
                reads.read(direct, &self.image, &runs, &mut got)?;
                let mut at = 0;
                for &(i, n) in &missing {
                    buf[i * bs..(i + n) * bs].copy_from_slice(&got[at..at + n * bs]);
                    at += n * bs;
                }
            }
            // A short last block of the disk reads zeroes past its end (it is never read
            // ahead).
            if let Some(&last) = blocks.last() {
                let (s, t) = self.block_range(last);
                let at = (blocks.len() - 1) * bs;
                buf[at + (t - s) as usize..].fill(0);
            }
        } else {
            self.read_blocks_buffered(blocks, buf)?;
        }
        crate::sys::file::write_direct_or_buffered(
            self.preserved_direct.as_ref(),
            &self.preserved,
            buf,
            log_end,
        )?;
        Ok(from_read_ahead)
    }

    /// [`copy_step`](Self::copy_step)'s reads through the page cache.
    fn read_blocks_buffered(&self, blocks: &[u64], buf: &mut [u8]) -> io::Result<()> {
        // Consecutive blocks are read with one call.
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            let (s, t) = (
                self.block_range(blocks[i]).0,
                self.block_range(blocks[j - 1]).1,
            );
            let at = i * BLOCK as usize;
            let len = (t - s) as usize;
            self.image.read_exact_at(&mut buf[at..at + len], s)?;
            buf[at + len..j * BLOCK as usize].fill(0);
            i = j;
        }
        Ok(())
    }

    /// Writes whole blocks into the overlay: with O_DIRECT where the filesystem allows it
    /// (`buf` is aligned), so a busy drill leaves no dirty pages for the state
    /// directory's filesystem to write back inside the journal's fsyncs (ext4 orders a
    /// commit after the data of newly allocated blocks); buffered otherwise.
    fn write_overlay(&self, buf: &[u8], pos: u64) -> io::Result<()> {
        let direct = self
            .overlay_direct
            .as_ref()
            .filter(|_| buf.len() as u64 % BLOCK == 0);
        crate::sys::file::write_direct_or_buffered(direct, &self.overlay, buf, pos).map(drop)
    }
}

/// Logs (debug) how long keeping a group's blocks for the drill took, however it ends,
/// and how many of them were read ahead.
struct Took {
    t: std::time::Instant,
    blocks: usize,
    read_ahead: usize,
}
impl Drop for Took {
    fn drop(&mut self) {
        tracing::debug!(blocks = self.blocks, read_ahead = self.read_ahead, took = ?self.t.elapsed(), "kept the replica's blocks a group overwrites for the drill");
    }
}

fn ended_error(why: &str) -> io::Error {
    io::Error::other(format!("the drill ended: {why}"))
}

/// The secondary reaps an ended drill within a second and logs why (`drill status` says
/// it too); a stop by the operator is logged there as well.
fn end_locked(m: &mut Maps, reason: &str) {
    if m.ended.is_none() {
        m.ended = Some(reason.to_owned());
    }
}

impl ImageObserver for DrillView {
    /// Keeps the blocks of the ranges that the drill still reads from the image: their
    /// content goes to the preserved file before the store writes. All runs are asked of
    /// the device first (readahead), then copied: a group's cold blocks are read in
    /// parallel, not one after another.
    fn before_writes(&self, ranges: &[(u64, u64)]) {
        let mut m = self
            .maps
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.ended.is_some() {
            return;
        }
        // Runs of blocks still read from the image, at most STEP bytes each.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(offset, len) in ranges {
            let len = len.min(self.size.saturating_sub(offset));
            if len == 0 {
                continue;
            }
            let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
            let mut b = first;
            while b <= last {
                if m.source(b) != Source::Image {
                    b += 1;
                    continue;
                }
                let mut e = b + 1;
                while e <= last && m.source(e) == Source::Image && (e - b) * BLOCK < STEP {
                    e += 1;
                }
                match runs.last_mut() {
                    // Ranges may share a block: never count it twice.
                    Some(r) if r.1 > b => r.1 = r.1.max(e),
                    _ => runs.push((b, e)),
                }
                b = e;
            }
        }
        let needed: u64 = runs.iter().map(|r| r.1 - r.0).sum();
        if needed == 0 {
            return;
        }
        if !self.space.take(needed) {
            let reason = format!(
                "keeping the replica's content for the drill needs more than --drill-space ({} MiB); replication went on, the drill's view could not",
                self.space() >> 20
            );
            end_locked(&mut m, &reason);
            return;
        }
        let bytes = |&(b, e): &(u64, u64)| (self.block_range(b).0, self.block_range(e - 1).1);
        if runs.len() > 1 && self.image_direct.is_none() {
            for r in &runs {
                let (s, t) = bytes(r);
                crate::sys::file::will_need(&self.image, s, t - s);
            }
        }
        // Copied in steps of at most STEP bytes: each step's blocks are read from the image
        // (or taken from the read-ahead) into one aligned buffer and appended to the log
        // with one write.
        let t = std::time::Instant::now();
        let blocks: Vec<u64> = runs.iter().flat_map(|&(b, e)| b..e).collect();
        let mut took = Took {
            t,
            blocks: blocks.len(),
            read_ahead: 0,
        };
        // Every read ahead has completed before any is taken. If waiting fails, the reader
        // has dropped them all: the blocks are read below.
        let mut read_ahead = self.read_ahead.as_ref().and_then(|ra| {
            ra.collect()
                .map_err(|e| tracing::debug!("reading ahead for the drill stopped: {e}"))
                .ok()
        });
        let per_step = (STEP / BLOCK) as usize;
        // One buffer for the drill's life: a new one would cost a page fault per 4 KiB
        // at every group.
        let mut aligned = m
            .step_buf
            .take()
            .unwrap_or_else(|| crate::blk::disk::AlignedBuf::new(STEP as usize));
        for (k, step) in blocks.chunks(per_step).enumerate() {
            let buf = &mut aligned.as_mut_slice()[..step.len() * BLOCK as usize];
            let copied = self.copy_step(step, buf, m.preserved_len, read_ahead.as_deref_mut());
            match copied {
                Ok(n) => {
                    took.read_ahead += n;
                    m.preserved_read_ahead += n as u64;
                }
                Err(e) => {
                    // This step and the ones after it were taken but not kept.
                    self.space.give_back((blocks.len() - k * per_step) as u64);
                    let reason = format!(
                        "cannot keep the replica's content for the drill in {}: {e}; replication went on, the drill's view could not",
                        self.dir.display()
                    );
                    end_locked(&mut m, &reason);
                    return;
                }
            }
            let base = m.preserved_len;
            for (i, &b) in step.iter().enumerate() {
                m.preserved.set(b);
                m.preserved_at.insert(b, base + i as u64 * BLOCK);
            }
            m.preserved_len += buf.len() as u64;
            m.preserved_blocks += step.len() as u64;
        }
        m.step_buf = Some(aligned);
        if let Some(ra) = read_ahead.as_deref_mut() {
            // What the drill no longer reads from the image is of no more use.
            ra.next_round(|b| m.source(b) == Source::Image);
        }
    }

    /// Has the blocks the drill still reads from the image read ahead, so that
    /// `before_writes` finds them read when the group applies: queued for the read-ahead
    /// thread (reads around the page cache into its arena; queueing costs this thread
    /// nothing more), or else read ahead into the page cache.
    ///
    /// Never waits for the maps: a drill write holds their write lock across its device
    /// write (O_DIRECT), and this runs on the replica's staging thread once per extent, so
    /// waiting would put a busy drill's writes (a writer-preferring lock: every queued one)
    /// in front of replication. When the maps are busy the range is read ahead unchecked:
    /// a hint, at worst wasted.
    fn will_write(&self, offset: u64, len: u64) {
        let len = len.min(self.size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        if self.read_ahead.is_none() && self.image_direct.is_some() {
            // Kept blocks are read around the page cache, all of a step at once: reading
            // them ahead into it would only read them twice.
            return;
        }
        let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let maps = match self.maps.try_read() {
            Ok(m) => Some(m),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        if maps.as_ref().is_some_and(|m| m.ended.is_some()) {
            return;
        }
        let reads_image = |b: u64| maps.as_ref().is_none_or(|m| m.source(b) == Source::Image);
        match &self.read_ahead {
            Some(ra) => {
                // Whole blocks only: a short last block is read when the group applies.
                let whole = self.size / BLOCK;
                let blocks: Vec<u64> = (first..=last)
                    .filter(|&b| b < whole && reads_image(b))
                    .collect();
                drop(maps);
                ra.hint(blocks);
            }
            None => {
                if (first..=last).any(reads_image) {
                    crate::sys::file::will_need(&self.image, offset, len);
                }
            }
        }
    }

    fn closed(&self) {
        self.end("the replica was closed (reopened after an error, replaced or promoted); the drill cannot keep its view");
    }
}

impl Backing for DrillView {
    fn path(&self) -> &Path {
        &self.dir
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn readonly(&self) -> bool {
        false
    }
    unsafe fn readv_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        let total: usize = iov.iter().map(|v| v.1).sum();
        self.check_range(offset, total as u64)?;
        let mut buf = vec![0u8; total];
        {
            let m = self
                .maps
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.read_locked(&m, &mut buf, offset)?;
        }
        let mut at = 0;
        for &(p, l) in iov {
            // SAFETY: the caller guarantees (p, l) is valid for writes; `buf` holds `total`
            // bytes, the sum of the lengths.
            unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr().add(at), p, l) };
            at += l;
        }
        Ok(())
    }
    unsafe fn writev_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        let mut buf = Vec::with_capacity(iov.iter().map(|v| v.1).sum());
        for &(p, l) in iov {
            // SAFETY: the caller guarantees (p, l) is valid for reads.
            buf.extend_from_slice(unsafe { std::slice::from_raw_parts(p, l) });
        }
        self.write(offset, buf.len() as u64, Some(&buf))
    }
    /// A drill does not survive its daemon (it is removed at the next start), so there is
    /// nothing to make durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write(offset, len, None)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
        self.write(offset, len, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(size: u64, space: u64) -> (tempfile::TempDir, PathBuf, DrillView) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        let content: Vec<u8> = (0..size).map(|i| (i / BLOCK) as u8 + 1).collect();
        std::fs::write(&image, content).unwrap();
        let v =
            DrillView::create(&image, &dir.path().join("drill"), size, Space::new(space)).unwrap();
        (dir, image, v)
    }

    fn read(v: &DrillView, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let m = v.maps.read().unwrap();
        v.read_locked(&m, &mut buf, off).unwrap();
        buf
    }

    /// A small deterministic rng: `next(n)` is below `n`.
    fn xorshift(mut x: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        }
    }

    /// The store's side: tell the view, then change the image.
    fn apply(v: &DrillView, image: &Path, off: u64, data: &[u8]) {
        v.before_write(off, data.len() as u64);
        let f = OpenOptions::new().write(true).open(image).unwrap();
        f.write_all_at(data, off).unwrap();
    }

    #[test]
    fn staging_never_waits_for_the_drills_own_writes() {
        let (_d, _image, v) = setup(16 * BLOCK, 1 << 20);
        let v = Arc::new(v);
        // A drill write in progress holds the maps' write lock (here: until the hint returns).
        let held = v.maps.write().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let v2 = v.clone();
        std::thread::spawn(move || {
            v2.will_write(3 * BLOCK, 2 * BLOCK);
            let _ = tx.send(());
        });
        // Waiting on the lock would never return while it is held: the bound is only for
        // a failing run, not a speed limit.
        let returned = rx.recv_timeout(std::time::Duration::from_secs(60));
        drop(held);
        assert!(
            returned.is_ok(),
            "the staging thread's hint waited for the drill's write lock"
        );
    }

    #[test]
    fn the_view_stays_at_its_group_while_the_image_changes() {
        let (_d, image, v) = setup(16 * BLOCK, 1 << 20);
        let before = read(&v, 0, 16 * BLOCK as usize);
        apply(&v, &image, 3 * BLOCK + 100, &[0xee; 5000]);
        apply(&v, &image, 3 * BLOCK, &[0xdd; 4096]);
        assert_eq!(read(&v, 0, 16 * BLOCK as usize), before);
        // Only the two blocks touched were kept, each once.
        assert_eq!(v.figures().preserved_bytes, 2 * BLOCK);
    }

    #[test]
    fn preserved_blocks_logged_out_of_order_read_back_at_any_offset() {
        // 40 blocks and a short last one; a small rng decides the groups' ranges.
        let size = 40 * BLOCK + 1000;
        let (_d, image, v) = setup(size, 1 << 30);
        let before = read(&v, 0, size as usize);
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for group in 0..30u8 {
            // Several ranges per group, sorted as the store tells them (the log holds the
            // groups' blocks in the order they come, not in the disk's).
            let mut ranges: Vec<(u64, u64)> = (0..3)
                .map(|_| {
                    let off = next(size);
                    (off, (1 + next(3 * BLOCK)).min(size - off))
                })
                .collect();
            ranges.sort_unstable();
            v.before_writes(&ranges);
            let f = OpenOptions::new().write(true).open(&image).unwrap();
            for &(off, len) in &ranges {
                f.write_all_at(&vec![0xa0 + group; len as usize], off)
                    .unwrap();
            }
            // Any range of the view, unaligned, reads as at the drill's group.
            for _ in 0..20 {
                let off = next(size);
                let len = 1 + next((size - off).min(5 * BLOCK));
                assert!(
                    read(&v, off, len as usize) == before[off as usize..(off + len) as usize],
                    "group {group}: {len} bytes at {off} differ"
                );
            }
        }
        assert!(read(&v, 0, size as usize) == before);
        let m = v.maps.read().unwrap();
        assert_eq!(m.preserved_len, m.preserved_blocks * BLOCK);
        assert!(m.preserved_blocks > 10, "{} blocks", m.preserved_blocks);
    }

    #[test]
    fn blocks_read_ahead_at_staging_are_kept_as_they_were_when_the_view_began() {
        // The store's order, one group ahead: group g+1's extents are staged (read ahead)
        // before group g applies, so some blocks read ahead for g+1 are changed by g, and
        // the drill writes in between too.
        let size = 64 * BLOCK + 1000;
        let (_d, image, v) = setup(size, 1 << 30);
        let mut model = read(&v, 0, size as usize);
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let group = |next: &mut dyn FnMut(u64) -> u64| -> Vec<(u64, u64)> {
            let mut r: Vec<(u64, u64)> = (0..4)
                .map(|_| {
                    let off = next(size);
                    (off, (1 + next(2 * BLOCK)).min(size - off))
                })
                .collect();
            r.sort_unstable();
            r
        };
        // The first range of each group is not hinted: its blocks are read at the apply.
        let mut staged = group(&mut next);
        for &(off, len) in &staged[1..] {
            v.will_write(off, len);
        }
        for g in 0..40u8 {
            let applying = std::mem::replace(&mut staged, group(&mut next));
            for &(off, len) in &staged[1..] {
                v.will_write(off, len);
            }
            if g % 3 == 0 {
                let off = next(size - 600);
                v.write(off, 512, Some(&[0x50 + g; 512])).unwrap();
                model[off as usize..off as usize + 512].fill(0x50 + g);
            }
            v.before_writes(&applying);
            let f = OpenOptions::new().write(true).open(&image).unwrap();
            for &(off, len) in &applying {
                f.write_all_at(&vec![0xa0 + g; len as usize], off).unwrap();
            }
            assert!(read(&v, 0, size as usize) == model, "after group {g}");
        }
        let m = v.maps.read().unwrap();
        if v.read_ahead.is_some() {
            assert!(
                m.preserved_read_ahead > 0 && m.preserved_read_ahead < m.preserved_blocks,
                "{} of {} kept blocks were read ahead",
                m.preserved_read_ahead,
                m.preserved_blocks
            );
        }
    }

    #[test]
    fn drill_writes_read_back_and_never_reach_the_image() {
        let (_d, image, v) = setup(8 * BLOCK, 1 << 20);
        let orig = std::fs::read(&image).unwrap();
        v.write(BLOCK + 512, 1024, Some(&[7; 1024])).unwrap();
        let got = read(&v, BLOCK, BLOCK as usize);
        assert_eq!(&got[..512], &orig[BLOCK as usize..BLOCK as usize + 512]);
        assert_eq!(&got[512..1536], &[7; 1024][..]);
        assert_eq!(
            &got[1536..],
            &orig[BLOCK as usize + 1536..2 * BLOCK as usize]
        );
        assert_eq!(std::fs::read(&image).unwrap(), orig);
        // A later group over the same block changes neither the drill's view nor needs a
        // copy (the overlay holds the block).
        apply(&v, &image, BLOCK, &[9; 4096]);
        assert_eq!(read(&v, BLOCK, BLOCK as usize), got);
        assert_eq!(v.figures().preserved_bytes, 0);
        v.write_zeroes(0, 8 * BLOCK, false).unwrap();
        assert_eq!(read(&v, 0, 8 * BLOCK as usize), vec![0; 8 * BLOCK as usize]);
    }

    #[test]
    fn a_full_drill_space_fails_drill_writes_and_ends_the_drill_on_preservation() {
        let (_d, image, v) = setup(8 * BLOCK, 2 * BLOCK);
        v.write(0, 2 * BLOCK, Some(&[1; 8192])).unwrap();
        let e = v.write(4 * BLOCK, 512, Some(&[1; 512])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        assert_eq!(v.figures().failed_writes, 1);
        // Still usable for reads; a group that needs a copy ends it.
        read(&v, 0, BLOCK as usize);
        apply(&v, &image, 5 * BLOCK, &[3; 4096]);
        let f = v.figures();
        assert!(f.ended.unwrap().contains("--drill-space"));
        let mut buf = vec![0u8; 512];
        let m = v.maps.read().unwrap();
        assert!(v.read_locked(&m, &mut buf, 0).is_err());
    }

    #[test]
    fn zeroing_punches_holes_that_cost_no_space() {
        let (_d, _image, v) = setup(64 * BLOCK + 512, 4 * BLOCK);
        // A discard of the whole disk (edges and the short last block included) fits in
        // four blocks of space: only the partly covered block at the start is data.
        v.discard(512, 64 * BLOCK).unwrap();
        let got = read(&v, 0, (64 * BLOCK + 512) as usize);
        assert_eq!(got[..512], [1u8; 512]);
        assert!(got[512..].iter().all(|&x| x == 0));
        assert_eq!(v.figures().overlay_bytes, BLOCK);
        // Data written over a zeroed block counts again; zeroing it again frees it.
        v.write(8 * BLOCK, BLOCK, Some(&[5; 4096])).unwrap();
        assert_eq!(v.figures().overlay_bytes, 2 * BLOCK);
        assert_eq!(read(&v, 8 * BLOCK, 4096), vec![5; 4096]);
        v.write_zeroes(8 * BLOCK, BLOCK, true).unwrap();
        assert_eq!(v.figures().overlay_bytes, BLOCK);
        assert_eq!(read(&v, 8 * BLOCK, 4096), vec![0; 4096]);
        // What zeroing freed is free in the space too.
        assert_eq!(v.space.used_blocks.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_views_of_a_groups_drill_share_one_space() {
        let dir = tempfile::tempdir().unwrap();
        let space = Space::new(3 * BLOCK);
        let views: Vec<(PathBuf, DrillView)> = (0..2)
            .map(|k| {
                let image = dir.path().join(format!("img{k}"));
                std::fs::write(&image, vec![k as u8; 8 * BLOCK as usize]).unwrap();
                let v = DrillView::create(
                    &image,
                    &dir.path().join(format!("drill{k}")),
                    8 * BLOCK,
                    space.clone(),
                )
                .unwrap();
                (image, v)
            })
            .collect();
        // Disk 0 uses two blocks, disk 1 the third: the fourth fails on either disk.
        views[0].1.write(0, 2 * BLOCK, Some(&[1; 8192])).unwrap();
        views[1].1.write(0, BLOCK, Some(&[1; 4096])).unwrap();
        for (_, v) in &views {
            let e = v.write(5 * BLOCK, 1, Some(&[1])).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        }
        // A group that needs a block kept on disk 1 ends that view; disk 0's goes on.
        apply(&views[1].1, &views[1].0, 6 * BLOCK, &[3; 4096]);
        assert!(views[1]
            .1
            .figures()
            .ended
            .unwrap()
            .contains("--drill-space"));
        assert!(views[0].1.figures().ended.is_none());
        // Freed space is everybody's again.
        views[0].1.discard(0, 2 * BLOCK).unwrap();
        views[1].1.write(5 * BLOCK, 1, Some(&[1])).unwrap_err(); // ended
        views[0]
            .1
            .write(5 * BLOCK, BLOCK, Some(&[2; 4096]))
            .unwrap();
        assert_eq!(space.used_blocks.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn requests_outside_the_disk_are_refused() {
        let (_d, _image, v) = setup(4 * BLOCK, 1 << 20);
        assert!(v.write(4 * BLOCK - 512, 1024, Some(&[0; 1024])).is_err());
        assert!(v.discard(u64::MAX - 10, 20).is_err());
    }
}
