//! One replica image of the group: its file, geometry, background writeback, observer and
//! the chunks a sync has written into it. The store writes every image only through here.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::flush::{ImageFlusher, Touched};
use super::journal::Geometry;
use super::{error, ChunkData, Error, ImageObserver, Result};
use crate::blk::disk::{AlignedBuf, DIRECT_ALIGN};
use crate::sys::direct_batch::DirectBatch;

/// A write at least this long may leave its pages in large folios.
const LARGE_WRITE: u64 = 64 << 10;

pub(super) struct DiskImage {
    pub path: PathBuf,
    pub file: File,
    is_file: bool,
    pub geo: Geometry,
    /// Background writeback (None if its thread could not start).
    flusher: Option<ImageFlusher>,
    /// Told before each change of this image (a running drill, `crate::drill`).
    pub observer: Option<Arc<dyn ImageObserver>>,
    /// Chunks written by the current sync, one bit each.
    sync_done: Vec<u64>,
    /// How many of them.
    pub synced: u64,
    /// A write of a large run since the last [`drop_cache`](Self::drop_cache): its pages may
    /// sit in large folios (see there).
    large_writes: std::sync::atomic::AtomicBool,
    /// The image opened with O_DIRECT, for a sync's large extents (None where refused).
    direct: Option<File>,
    /// The aligned copy of an extent that `direct` writes from (reused).
    bounce: std::sync::Mutex<Option<AlignedBuf>>,
    /// Applied runs queued for one submission through `direct` (None without O_DIRECT or
    /// io_uring: then every run is written through the page cache).
    batch: std::sync::Mutex<Option<DirectBatch>>,
}

impl DiskImage {
    /// Opens (with `create`: creates and sizes) the image of a disk of `geo`, locks it
    /// against other drblk processes and gives it every block (`preallocate_image`).
    pub fn open(path: &Path, geo: Geometry, create: bool) -> Result<DiskImage> {
        let disk_size = geo.disk_size();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(error::io("open image", path))?;
        if !crate::sys::file::lock_retrying(&file, true).map_err(error::io("flock", path))? {
            return Err(Error::InvalidArgument(format!(
                "image {} is in use by another drblk process (a `drblk serve` on it?): stop it first",
                path.display()
            )));
        }
        let is_file = file.metadata().map_err(error::io("stat", path))?.is_file();
        // Works for block devices too (their st_size is 0).
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(error::io("seek", path))?;
        if size < disk_size {
            if create && is_file {
                file.set_len(disk_size)
                    .map_err(error::io("extend image", path))?;
                file.sync_all().map_err(error::io("fsync", path))?;
            } else {
                return Err(Error::InvalidArgument(format!(
                    "image {} is {size} bytes, smaller than the disk ({disk_size})",
                    path.display()
                )));
            }
        }
        if is_file {
            preallocate_image(&file, path, disk_size)?;
        }
        let flusher = match ImageFlusher::start(&file, disk_size, path) {
            Ok(f) => Some(f),
            Err(e) => {
                // Only slower: each checkpoint then writes back everything applied since.
                tracing::warn!(image = %path.display(), error = %e, "no background writeback of the replica image");
                None
            }
        };
        let direct = is_file
            .then(|| crate::sys::file::open_direct_for_writing(path))
            .flatten();
        let batch = match &direct {
            Some(_) => DirectBatch::new()
                .inspect_err(|e| {
                    tracing::info!(image = %path.display(), error = %e, "io_uring unavailable: applied groups are written through the page cache")
                })
                .ok(),
            None => None,
        };
        Ok(DiskImage {
            path: path.to_path_buf(),
            file,
            is_file,
            geo,
            flusher,
            observer: None,
            sync_done: vec![0; geo.chunks().div_ceil(64) as usize],
            synced: 0,
            large_writes: Default::default(),
            direct,
            bounce: Default::default(),
            batch: std::sync::Mutex::new(batch),
        })
    }

    /// The byte offset and length of `count` chunks from `first` (contiguous, inside the
    /// disk).
    pub fn range(&self, first: u64, count: u64) -> (u64, u64) {
        let off = self.geo.chunk_offset(first);
        let last = first + count - 1;
        let end = self.geo.chunk_offset(last) + self.geo.chunk_len(last).unwrap_or(0) as u64;
        (off, end - off)
    }

    /// Write `count` chunks from `first` (contiguous, inside the disk). The caller has told
    /// the observer (once per group in `apply_committed`, per extent in `sync_extent`).
    pub fn write(&self, first: u64, count: u64, data: ChunkData<'_>) -> Result<()> {
        let (off, len) = self.range(first, count);
        if len >= LARGE_WRITE {
            self.large_writes
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        match data {
            ChunkData::Bytes(b) => {
                debug_assert_eq!(b.len() as u64, len);
                self.file
                    .write_all_at(b, off)
                    .map_err(error::io("write image", &self.path))
            }
            ChunkData::Zero => {
                if self.is_file {
                    // Not a hole punch: the image keeps every block it was given at open,
                    // so applying a committed group never needs new space (module doc).
                    return crate::sys::file::zero_range_keep_allocated(&self.file, off, len)
                        .map_err(error::io("zero range in image", &self.path));
                }
                let zeros = vec![0u8; len as usize];
                self.file
                    .write_all_at(&zeros, off)
                    .map_err(error::io("write image", &self.path))
            }
        }
    }

    /// [`write`](Self::write) for a sync's extents, which nothing reads soon: a large
    /// aligned run goes around the page cache (O_DIRECT, from an aligned copy), so the
    /// device's DMA moves its bytes instead of this CPU copying them into new page-cache
    /// pages (that copy was a third of the secondary's CPU time in an initial copy, which
    /// then ran at half the link's speed), and none are left dirty for `finish_sync`'s
    /// fsync. Small, unaligned or zero runs, and filesystems without O_DIRECT, go through
    /// `write`. O_DIRECT writes invalidate cached pages of their range, so a reader of the
    /// image (a drill) sees them at once.
    pub fn write_uncached(&self, first: u64, count: u64, data: ChunkData<'_>) -> Result<()> {
        let (off, len) = self.range(first, count);
        let align = DIRECT_ALIGN as u64;
        let (Some(direct), ChunkData::Bytes(b)) = (&self.direct, &data) else {
            return self.write(first, count, data);
        };
        if len < LARGE_WRITE || off % align != 0 || len % align != 0 {
            return self.write(first, count, data);
        }
        let mut bounce = self.bounce.lock().unwrap_or_else(|e| e.into_inner());
        if bounce.as_ref().is_none_or(|a| a.as_slice().len() < b.len()) {
            *bounce = Some(AlignedBuf::new(b.len()));
        }
        let buf = &mut bounce.as_mut().expect("just made").as_mut_slice()[..b.len()];
        buf.copy_from_slice(b);
        let bypassed =
            crate::sys::file::write_direct_or_buffered(Some(direct), &self.file, buf, off)
                .map_err(error::io("write image", &self.path))?;
        if !bypassed {
            // Refused (EINVAL) and written buffered: its pages may sit in large folios.
            self.large_writes
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// [`write`](Self::write) for a run of an applied group, queued to be written around
    /// the page cache together with the group's other runs (see
    /// [`DirectBatch`]): nothing reads the image in the cycle, so caching its pages only
    /// costs (a new page, a copy and a write-back per 4 KiB). Returns false, having done
    /// nothing, where the run cannot be batched (unaligned, too large, no O_DIRECT or no
    /// io_uring): then `write` it. The runs of one batch must not overlap; it ends with
    /// [`finish_batch`](Self::finish_batch), before anything else writes the image.
    pub fn write_batched(&self, first: u64, count: u64, bytes: &[u8]) -> Result<bool> {
        let (off, len) = self.range(first, count);
        debug_assert_eq!(bytes.len() as u64, len);
        let (Some(direct), mut batch) = (&self.direct, self.lock_batch()) else {
            return Ok(false);
        };
        let Some(batch) = batch.as_mut() else {
            return Ok(false);
        };
        if !DirectBatch::fits(off, bytes.len()) {
            return Ok(false);
        }
        batch
            .write(direct, &self.file, bytes, off)
            .map_err(error::io("write image", &self.path))?;
        Ok(true)
    }

    /// Waits for every run [`write_batched`](Self::write_batched) queued.
    pub fn finish_batch(&self) -> Result<()> {
        let (Some(direct), mut batch) = (&self.direct, self.lock_batch()) else {
            return Ok(());
        };
        match batch.as_mut() {
            Some(b) => b
                .finish(direct, &self.file)
                .map_err(error::io("write image", &self.path)),
            None => Ok(()),
        }
    }

    fn lock_batch(&self) -> std::sync::MutexGuard<'_, Option<DirectBatch>> {
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// fsync the image.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_all().map_err(error::io("fsync", &self.path))
    }

    /// Hands the windows an apply wrote to the background writeback.
    pub fn kick(&self, touched: Touched) {
        if let Some(f) = &self.flusher {
            f.kick(touched);
        }
    }

    /// Drop the image's (now clean) pages from the page cache. The secondary never reads
    /// its images in the cycle, and pages cached from large writes (the initial copy's
    /// 1 MiB extents) sit in large folios, which make each later 4 KiB write and its
    /// write-back walk the whole folio (several times slower). Best effort.
    /// Only after large writes: dropping a whole image's cache takes tens of milliseconds
    /// (inside a checkpoint), and 4 KiB writes leave nothing worth dropping.
    pub fn drop_cache(&self) {
        if !self
            .large_writes
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Err(e) = crate::sys::file::drop_clean_cache(&self.file) {
            tracing::debug!(image = %self.path.display(), error = %e, "could not drop the image's cached pages");
        }
    }

    /// Counts chunks `first..first + count` as written by the sync; returns how many were
    /// not yet.
    pub fn mark_synced(&mut self, first: u64, count: u64) -> u64 {
        let mut new = 0;
        for index in first..first + count {
            let (w, b) = ((index / 64) as usize, 1u64 << (index % 64));
            if self.sync_done[w] & b == 0 {
                self.sync_done[w] |= b;
                new += 1;
            }
        }
        self.synced += new;
        new
    }

    /// Forgets what a sync wrote (a new sync begins).
    pub fn clear_synced(&mut self) {
        self.sync_done.iter_mut().for_each(|w| *w = 0);
        self.synced = 0;
    }
}

/// Gives the image file every block of the disk. Why: a group whose commit record is
/// written must always be applicable — an apply that stopped half-way for want of space
/// leaves an image no state file describes, and every replay stops at the same place. With
/// all blocks allocated, applying writes only into them (zeroes included: see
/// `DiskImage::write`), so on ext4 and xfs a full filesystem stops replication in the
/// journal, before the commit record, where the group fails cleanly and is retried. Not on a
/// copy-on-write filesystem (btrfs, ZFS: overwrites need new blocks) or one that cannot
/// preallocate: there a full filesystem stops the apply, and the journal's replay applies
/// the group once space returns. Cheap when the file is already allocated (the
/// usual reopen); on ext4 and xfs a new image gets "unwritten" extents, not zeroes written.
/// The cost is thin provisioning: the replica takes the disk's full size at once.
fn preallocate_image(f: &File, image: &Path, size: u64) -> Result<()> {
    let before = crate::sys::file::allocated_bytes(f).unwrap_or(0);
    match crate::sys::file::preallocate(f, size) {
        Ok(true) => {
            if before < size {
                tracing::info!(image = %image.display(), size, "replica image allocated in full");
            }
            Ok(())
        }
        Ok(false) => {
            tracing::warn!(image = %image.display(), "this filesystem cannot preallocate the replica image: if it fills up, applying a committed group stops until space is added (the journal keeps the group; it is applied then)");
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(Error::NoSpaceForImage {
            path: image.to_path_buf(),
            size,
            allocated: crate::sys::file::allocated_bytes(f).unwrap_or(0),
            free: crate::sys::file::free_bytes(image).unwrap_or(0),
        }),
        Err(e) => Err(error::io("allocate", image)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncached_writes_read_back_through_a_cached_reader() {
        // 4 KiB chunks, 70 of them and a short last one: extents of 64 KiB and more go
        // around the page cache (on filesystems with O_DIRECT), the rest through it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        let size = 70 * 4096 + 1000;
        let geo = Geometry::new(size, 4096).unwrap();
        let image = DiskImage::open(&path, geo, true).unwrap();
        let reader = File::open(&path).unwrap();
        let mut seen = vec![0u8; size as usize];
        // The reader caches the old (zero) content first.
        reader.read_exact_at(&mut seen, 0).unwrap();
        let mut want = vec![0u8; size as usize];
        for (first, count, fill) in [
            (0u64, 16u64, 1u8),
            (16, 1, 2),
            (20, 40, 3),
            (60, 10, 4),
            (70, 1, 5),
        ] {
            let (off, len) = image.range(first, count);
            let bytes: Vec<u8> = (0..len).map(|i| fill ^ (i % 251) as u8).collect();
            image
                .write_uncached(first, count, ChunkData::Bytes(&bytes))
                .unwrap();
            want[off as usize..(off + len) as usize].copy_from_slice(&bytes);
        }
        image.write_uncached(5, 3, ChunkData::Zero).unwrap();
        want[5 * 4096..8 * 4096].fill(0);
        reader.read_exact_at(&mut seen, 0).unwrap();
        assert!(seen == want, "a reader sees every write at once");
        image.sync().unwrap();
        assert!(std::fs::read(&path).unwrap() == want);
    }
}
