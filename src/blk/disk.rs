//! The disk image: a raw file, accessed with positional vectored I/O.
//!
//! Everything that touches the image file goes through [`Disk`], so bounds are checked in
//! exactly one place: no call here can read or write outside `[0, size)`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Alignment O_DIRECT needs for buffers, offsets and lengths on common filesystems.
pub const DIRECT_ALIGN: usize = 4096;

/// Errors opening or creating the image.
#[derive(Debug, Error)]
pub enum OpenError {
    /// The image does not exist and no size was given to create it.
    #[error("image {0} does not exist; pass --size to create it")]
    Missing(PathBuf),
    /// The image could not be opened or created.
    #[error("cannot open image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Another process (a `drblk serve`, a `drblk secondary`) has the image open.
    #[error("image {0} is in use by another drblk process (a `drblk serve` or a `drblk secondary` on it); stop that one first")]
    InUse(PathBuf),
    /// The size is zero or not a multiple of the logical block size.
    #[error("image {path} has size {size}, which is not a non-zero multiple of {block} bytes")]
    BadSize {
        /// The image path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The logical block size.
        block: u32,
    },
}

/// How to open an image.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    /// Path of the raw image.
    pub path: PathBuf,
    /// Create the image (sparse) with this size if it does not exist.
    pub create_size: Option<u64>,
    /// Open read-only.
    pub readonly: bool,
    /// Open with O_DIRECT (bypass the host page cache).
    pub direct: bool,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
}

/// An open raw image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    size: u64,
    readonly: bool,
    direct: bool,
}

impl Disk {
    /// Opens (or creates, sparse) the image described by `opts`.
    pub fn open(opts: &DiskOptions) -> Result<Disk, OpenError> {
        let open_err = |source| OpenError::Open {
            path: opts.path.clone(),
            source,
        };
        let exists = opts.path.exists();
        if !exists && opts.create_size.is_none() {
            return Err(OpenError::Missing(opts.path.clone()));
        }
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.readonly);
        if !exists {
            oo.create(true).write(true);
        }
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = oo.open(&opts.path).map_err(open_err)?;
        // One writer per image: a second `drblk serve`, or a `drblk secondary` keeping it
        // as a replica, is refused (readers share).
        if !crate::sys::file::lock_retrying(&file, !opts.readonly).map_err(open_err)? {
            return Err(OpenError::InUse(opts.path.clone()));
        }
        if !exists {
            // A new image is sparse: set_len allocates nothing.
            let size = opts.create_size.unwrap_or(0);
            file.set_len(size).map_err(open_err)?;
            tracing::info!(path = %opts.path.display(), size, "created sparse image");
        }
        let size = file.metadata().map_err(open_err)?.len();
        if size == 0 || size % u64::from(opts.logical_block_size) != 0 {
            return Err(OpenError::BadSize {
                path: opts.path.clone(),
                size,
                block: opts.logical_block_size,
            });
        }
        Ok(Disk {
            file,
            path: opts.path.clone(),
            size,
            readonly: opts.readonly,
            direct: opts.direct,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Whether the image was opened with O_DIRECT.
    pub fn direct(&self) -> bool {
        self.direct
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::blk::backing::check_range(offset, len, self.size)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.readonly {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "image is read-only",
            ));
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        if self.direct && !is_aligned(buf.as_ptr() as usize, buf.len(), offset) {
            let (a_off, a_len) = align_out(offset, buf.len());
            let mut big = AlignedBuf::new(a_len);
            self.pread_exact_raw(big.as_mut_ptr(), a_len, a_off)?;
            let skip = (offset - a_off) as usize;
            buf.copy_from_slice(&big.as_slice()[skip..skip + buf.len()]);
            return Ok(());
        }
        self.pread_exact_raw(buf.as_mut_ptr(), buf.len(), offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        if self.direct && !is_aligned(buf.as_ptr() as usize, buf.len(), offset) {
            // Read-modify-write through an aligned bounce buffer.
            let (a_off, a_len) = align_out(offset, buf.len());
            let mut big = AlignedBuf::new(a_len);
            self.pread_exact_raw(big.as_mut_ptr(), a_len, a_off)?;
            let skip = (offset - a_off) as usize;
            big.as_mut_slice()[skip..skip + buf.len()].copy_from_slice(buf);
            return self.pwrite_all_raw(big.as_slice().as_ptr(), a_len, a_off);
        }
        self.pwrite_all_raw(buf.as_ptr(), buf.len(), offset)
    }

    /// Reads into the host buffers `iov` (each `(ptr, len)`), starting at `offset`.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for writes for the duration of the call.
    pub unsafe fn readv_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.transfer_at(iov, offset, true) }
    }

    /// Writes the host buffers `iov` (each `(ptr, len)`) starting at `offset`. The buffers
    /// are only read; they are `*mut` because guest memory hands out one pointer type and a
    /// conversion would cost an allocation per request.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for reads for the duration of the call.
    pub unsafe fn writev_at(&self, iov: &[(*mut u8, usize)], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        // SAFETY: forwarded from the caller; a write only reads the buffers.
        unsafe { self.transfer_at(iov, offset, false) }
    }

    /// One vectored transfer, bounds-checked; with O_DIRECT, unaligned guest buffers go
    /// through the aligned bounce path one buffer at a time.
    ///
    /// # Safety
    /// Every `(ptr, len)` must be valid for the transfer's direction during the call.
    unsafe fn transfer_at(
        &self,
        iov: &[(*mut u8, usize)],
        offset: u64,
        read: bool,
    ) -> io::Result<()> {
        let total: usize = iov.iter().map(|v| v.1).sum();
        self.check_range(offset, total as u64)?;
        if self.direct && !iov.iter().all(|v| is_aligned(v.0 as usize, v.1, 0)) {
            let mut pos = offset;
            for &(ptr, len) in iov {
                if read {
                    // SAFETY: the caller guarantees (ptr, len) is valid for writes.
                    self.read_at(unsafe { std::slice::from_raw_parts_mut(ptr, len) }, pos)?;
                } else {
                    // SAFETY: the caller guarantees (ptr, len) is valid for reads.
                    self.write_at(unsafe { std::slice::from_raw_parts(ptr, len) }, pos)?;
                }
                pos += len as u64;
            }
            return Ok(());
        }
        let mut iovecs: Vec<libc::iovec> = iov
            .iter()
            .map(|&(p, l)| libc::iovec {
                iov_base: p.cast(),
                iov_len: l,
            })
            .collect();
        // SAFETY: the caller guarantees the buffers are valid for this direction.
        unsafe { self.vectored(&mut iovecs, offset, read) }
    }

    /// Runs preadv/pwritev until every byte is transferred (short transfers are resumed).
    ///
    /// # Safety
    /// The iovecs must point to memory valid for the transfer's direction.
    unsafe fn vectored(
        &self,
        iovecs: &mut [libc::iovec],
        offset: u64,
        read: bool,
    ) -> io::Result<()> {
        // SAFETY: passed on from this function's contract.
        unsafe { crate::sys::file::transfer_vectored(&self.file, iovecs, offset, read) }
    }

    fn pread_exact_raw(&self, ptr: *mut u8, len: usize, offset: u64) -> io::Result<()> {
        let mut v = [libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        }];
        // SAFETY: callers pass a buffer they own of at least `len` bytes.
        unsafe { self.vectored(&mut v, offset, true) }
    }

    fn pwrite_all_raw(&self, ptr: *const u8, len: usize, offset: u64) -> io::Result<()> {
        let mut v = [libc::iovec {
            iov_base: ptr as *mut libc::c_void,
            iov_len: len,
        }];
        // SAFETY: callers pass a buffer they own of at least `len` bytes.
        unsafe { self.vectored(&mut v, offset, false) }
    }

    /// Makes every completed write durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        if self.readonly {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates `[offset, offset+len)`: later reads return zeroes.
    pub fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        crate::sys::file::punch_hole(&self.file, offset, len)
    }

    /// Makes `[offset, offset+len)` read as zeroes; with `unmap` the range may be deallocated.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        match crate::sys::file::fallocate(&self.file, mode, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems without ZERO_RANGE (or PUNCH_HOLE): write zeroes by hand.
            Err(e) if crate::sys::file::is_unsupported(&e) => self.write_zeroes_slow(offset, len),
            Err(e) => Err(e),
        }
    }

    fn write_zeroes_slow(&self, mut offset: u64, len: u64) -> io::Result<()> {
        const STEP: usize = 1 << 20;
        let zero = AlignedBuf::new(STEP);
        let end = offset + len;
        while offset < end {
            let n = ((end - offset) as usize).min(STEP);
            self.pwrite_all_raw(zero.as_slice().as_ptr(), n, offset)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn is_aligned(addr: usize, len: usize, offset: u64) -> bool {
    addr % DIRECT_ALIGN == 0 && len % DIRECT_ALIGN == 0 && offset % DIRECT_ALIGN as u64 == 0
}

fn align_out(offset: u64, len: usize) -> (u64, usize) {
    let a = DIRECT_ALIGN as u64;
    let start = offset / a * a;
    let end = (offset + len as u64).div_ceil(a) * a;
    (start, (end - start) as usize)
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
    /// Mapped with `mmap` (large buffers), not taken from the allocator.
    mapped: bool,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: a shared AlignedBuf only hands out `&[u8]` (and a const pointer), like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

/// Buffers at least this large are mapped: the kernel zeroes their pages when first
/// touched, so an arena of which little is used costs neither the time to zero it (a
/// drill's 16 MiB read-ahead arena: milliseconds) nor its memory.
const MAP_AT_LEAST: usize = 1 << 20;

impl AlignedBuf {
    /// Allocates `len` zeroed bytes aligned to [`DIRECT_ALIGN`].
    pub fn new(len: usize) -> Self {
        if len >= MAP_AT_LEAST {
            // SAFETY: a new private anonymous mapping; nothing else refers to it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            // Page-aligned (DIRECT_ALIGN is one page); without memory, as the allocator.
            if ptr == libc::MAP_FAILED {
                std::alloc::handle_alloc_error(Self::layout(len));
            }
            return AlignedBuf {
                ptr: ptr.cast(),
                len,
                mapped: true,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf {
            ptr,
            len,
            mapped: false,
        }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), DIRECT_ALIGN).expect("valid layout")
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The buffer's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for len bytes and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// The buffer's start, for memory the kernel writes (no reference to it is made).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    /// The buffer's start, for parts of it read while the kernel may write others.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.mapped {
            // SAFETY: mapped in `new` with this length; nothing refers to it any more.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        } else {
            // SAFETY: allocated in `new` with the same layout.
            unsafe { std::alloc::dealloc(self.ptr, Self::layout(self.len)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: &Path, size: u64) -> DiskOptions {
        DiskOptions {
            path: path.to_owned(),
            create_size: Some(size),
            readonly: false,
            direct: false,
            logical_block_size: 512,
        }
    }

    #[test]
    fn aligned_buffers_small_and_mapped_are_zeroed_aligned_and_writable() {
        for len in [
            1,
            4096,
            MAP_AT_LEAST - 4096,
            MAP_AT_LEAST,
            3 * MAP_AT_LEAST + 4096,
        ] {
            let mut b = AlignedBuf::new(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0, "{len}");
            assert!(b.as_slice().iter().all(|&x| x == 0), "{len}");
            b.as_mut_slice().fill(0x5a);
            assert!(b.as_slice().iter().all(|&x| x == 0x5a), "{len}");
        }
    }

    #[test]
    fn create_read_write_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let d = Disk::open(&opts(&p, 1 << 20)).unwrap();
        assert_eq!(d.size(), 1 << 20);
        d.write_at(&[7u8; 512], 4096).unwrap();
        let mut b = [0u8; 512];
        d.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [7u8; 512]);
        assert!(d.write_at(&[1u8; 512], (1 << 20) - 256).is_err());
        assert!(d.read_at(&mut b, u64::MAX - 10).is_err());
        d.write_zeroes(4096, 512, false).unwrap();
        d.read_at(&mut b, 4096).unwrap();
        assert_eq!(b, [0u8; 512]);
        d.discard(0, 65536).unwrap();
        d.flush().unwrap();
    }

    #[test]
    fn missing_without_size_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(&dir.path().join("nope.img"), 0);
        o.create_size = None;
        let e = Disk::open(&o).unwrap_err().to_string();
        assert!(e.contains("--size"), "{e}");
    }

    #[test]
    fn readonly_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        Disk::open(&opts(&p, 65536)).unwrap();
        let mut o = opts(&p, 65536);
        o.readonly = true;
        let d = Disk::open(&o).unwrap();
        assert!(d.write_at(&[1u8; 512], 0).is_err());
        assert!(d.discard(0, 512).is_err());
    }

    #[test]
    fn direct_unaligned_bounces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        let mut o = opts(&p, 1 << 20);
        o.direct = true;
        let d = match Disk::open(&o) {
            Ok(d) => d,
            Err(_) => return, // tmpfs without O_DIRECT
        };
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        d.write_at(&data, 512 + 3).unwrap();
        let mut back = vec![0u8; 1000];
        d.read_at(&mut back, 515).unwrap();
        assert_eq!(back, data);
    }
}
