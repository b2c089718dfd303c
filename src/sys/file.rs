//! File helpers shared by the data path and the replica store: exclusive lock files,
//! `fallocate` (holes, zeroed ranges) and directory fsyncs.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Fsyncs the directory `dir` (an empty path is the current directory), so that a file
/// created or renamed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// Takes an exclusive, non-blocking `flock` on `f`. `Ok(false)`: another open file holds it.
pub fn try_lock_exclusive(f: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid fd that `f` owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Takes a `flock` on `f` (exclusive, or shared), retrying for a second: a lock just
/// released in this process can still be held by a child being spawned concurrently (fork
/// copies the descriptor; it is closed only at exec). `Ok(false)`: someone else holds it.
pub fn lock_retrying(f: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    for _ in 0..100 {
        // SAFETY: flock on a valid fd that `f` owns.
        if unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(false)
}

/// `fallocate(2)` on `f` with `mode` over `[offset, offset + len)`; nothing for `len == 0`.
pub fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (off, n) = (
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    );
    // SAFETY: fallocate on a valid fd that `f` owns; the kernel checks the range.
    if unsafe { libc::fallocate(f.as_raw_fd(), mode, off, n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Deallocates `[offset, offset + len)` of `f` (later reads return zeroes), keeping its size.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zeroes `[offset, offset + len)` of `f` and keeps its blocks allocated (later writes
/// there need no new space, unlike after a hole punch). Filesystems without
/// `FALLOC_FL_ZERO_RANGE` (tmpfs) get zero bytes written instead.
pub fn zero_range_keep_allocated(f: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    match fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    ) {
        Err(e) if is_unsupported(&e) => {}
        r => return r,
    }
    const STEP: u64 = 1 << 20;
    let zeros = vec![0u8; len.min(STEP) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Allocates every block of `[0, len)` of `f` (extending it to `len` if shorter): later
/// writes inside it cannot fail for want of space (on ext4 and xfs, the conversion of the
/// preallocated "unwritten" blocks draws on the filesystem's own reserve). Fast on an
/// already allocated file. `Ok(false)`: the filesystem cannot preallocate.
pub fn preallocate(f: &File, len: u64) -> io::Result<bool> {
    match fallocate(f, 0, 0, len) {
        Ok(()) => Ok(true),
        Err(e) if is_unsupported(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Bytes of `f` that are allocated on its filesystem (`st_blocks` × 512).
pub fn allocated_bytes(f: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(f.metadata()?.blocks() * 512)
}

/// Writes back the dirty pages of `[offset, offset + len)` of `f` and waits for them
/// (`sync_file_range`: no metadata, no device cache flush — not a durability point).
pub fn write_back_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(
        f,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )
}

/// Starts writing back the dirty pages of `[offset, offset + len)` of `f` without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): a hint that makes a later fdatasync shorter.
pub fn start_write_back(f: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(f, offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

fn sync_file_range(f: &File, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let off = libc::off64_t::try_from(offset).map_err(invalid)?;
    let n = libc::off64_t::try_from(len).map_err(invalid)?;
    // SAFETY: sync_file_range on a valid fd that `f` owns; the kernel checks the range.
    if unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Drops `f`'s clean pages from the page cache (`POSIX_FADV_DONTNEED`; dirty pages stay).
pub fn drop_clean_cache(f: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise on a valid fd that `f` owns; offset 0, length 0 = whole file.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Starts reading `[off, off + len)` of `f` into the page cache without waiting (many
/// calls in a row keep the device busy in parallel). Best effort.
pub fn will_need(f: &File, off: u64, len: u64) {
    // SAFETY: posix_fadvise on a valid fd that `f` owns; a hint, no memory is touched.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        )
    };
}

/// Bytes an unprivileged process may still write on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))?;
    // SAFETY: statvfs fills the zeroed struct we own from a valid NUL-terminated path.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Whether `e` says the filesystem cannot do this `fallocate` mode (the caller writes
/// zeroes instead).
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Writes `buf` at `pos` through `direct` (O_DIRECT: `buf` aligned, whole blocks) if given,
/// and through `buffered` where there is none or the filesystem refuses it (EINVAL).
/// Returns whether the bytes went through `direct` (so bypassed the page cache).
pub fn write_direct_or_buffered(
    direct: Option<&File>,
    buffered: &File,
    buf: &[u8],
    pos: u64,
) -> io::Result<bool> {
    if let Some(direct) = direct {
        match std::os::unix::fs::FileExt::write_all_at(direct, buf, pos) {
            Ok(()) => return Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    std::os::unix::fs::FileExt::write_all_at(buffered, buf, pos).map(|()| false)
}

/// Runs preadv (`read`) or pwritev on `f` from `offset` until every byte of `iovecs` is
/// transferred: short transfers are resumed, EINTR retried, and the end of the file before
/// the last byte is `UnexpectedEof`.
///
/// # Safety
/// The iovecs must point to memory valid for the transfer's direction.
pub unsafe fn transfer_vectored(
    f: &File,
    iovecs: &mut [libc::iovec],
    offset: u64,
    read: bool,
) -> io::Result<()> {
    let fd = f.as_raw_fd();
    let mut start = 0usize;
    let mut pos = offset;
    while start < iovecs.len() {
        let rest = &mut iovecs[start..];
        let cnt = rest.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let off =
            libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: fd is open; the iovecs are valid per the caller's contract.
        let n = unsafe {
            if read {
                libc::preadv(fd, rest.as_ptr(), cnt, off)
            } else {
                libc::pwritev(fd, rest.as_ptr(), cnt, off)
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short transfer: the file ends before the range",
            ));
        }
        let mut n = n as usize;
        pos += n as u64;
        while n > 0 && start < iovecs.len() {
            let v = &mut iovecs[start];
            if n >= v.iov_len {
                n -= v.iov_len;
                start += 1;
            } else {
                // SAFETY: advancing within the same buffer by less than its length.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
        while start < iovecs.len() && iovecs[start].iov_len == 0 {
            start += 1;
        }
    }
    Ok(())
}

/// Fills `head` then `body` from `f` at `offset` with one `preadv` (a record's header and
/// payload: one system call instead of two); the end of the file before both are full is
/// `UnexpectedEof`.
pub fn read_exact_pair_at(
    f: &File,
    head: &mut [u8],
    body: &mut [u8],
    offset: u64,
) -> io::Result<()> {
    let mut iovecs = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.as_mut_ptr().cast(),
            iov_len: body.len(),
        },
    ];
    // SAFETY: both iovecs point into buffers borrowed mutably for this call, with their
    // lengths.
    unsafe { transfer_vectored(f, &mut iovecs, offset, true) }
}

/// `path` opened for writing with O_DIRECT (bypassing the page cache), or None where the
/// filesystem refuses it (tmpfs) or it cannot be opened: callers then write buffered.
pub fn open_direct_for_writing(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn read_exact_pair_at_fills_both_and_reports_a_short_file() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        f.write_all(&data).unwrap();
        let (mut head, mut body) = ([0u8; 48], vec![0u8; 4096]);
        read_exact_pair_at(&f, &mut head, &mut body, 100).unwrap();
        assert_eq!(&head[..], &data[100..148]);
        assert_eq!(&body[..], &data[148..148 + 4096]);
        let mut empty: [u8; 0] = [];
        read_exact_pair_at(&f, &mut head, &mut empty, 0).unwrap();
        assert_eq!(&head[..], &data[..48]);
        let e = read_exact_pair_at(&f, &mut head, &mut body, 9_000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = read_exact_pair_at(&f, &mut head, &mut body, u64::MAX - 10).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "no file offset");
    }

    #[test]
    fn sync_dir_syncs_a_directory_and_reports_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        sync_dir(dir.path()).unwrap();
        sync_dir(Path::new("")).unwrap();
        let e = sync_dir(&dir.path().join("absent")).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn lock_is_exclusive_between_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = File::create(&p).unwrap();
        let b = File::options().write(true).open(&p).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
    }

    /// An empty file `f` in `dir`, open for reading and writing.
    fn scratch_file(dir: &Path) -> File {
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("f"))
            .unwrap()
    }

    #[test]
    fn a_punched_hole_reads_as_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = scratch_file(dir.path());
        f.write_all(&[7u8; 16384]).unwrap();
        match punch_hole(&f, 4096, 8192) {
            Err(e) if is_unsupported(&e) => return,
            r => r.unwrap(),
        }
        let mut buf = [1u8; 16384];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 7));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 7));
        assert_eq!(f.metadata().unwrap().len(), 16384);
    }

    #[test]
    fn a_preallocated_file_stays_allocated_when_zeroed() {
        let dir = tempfile::tempdir().unwrap();
        let f = scratch_file(dir.path());
        f.set_len(1 << 20).unwrap();
        assert!(allocated_bytes(&f).unwrap() < 1 << 20, "starts sparse");
        if !preallocate(&f, 1 << 20).unwrap() {
            return;
        }
        assert!(allocated_bytes(&f).unwrap() >= 1 << 20);
        f.write_all_at(&[7u8; 65536], 4096).unwrap();
        zero_range_keep_allocated(&f, 4096, 65536).unwrap();
        let mut buf = vec![1u8; 65536 + 8192];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(
            allocated_bytes(&f).unwrap() >= 1 << 20,
            "zeroing freed blocks"
        );
        assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    }
}
