//! Background writeback of the replica image, so that a checkpoint (which must fsync the
//! image) finds little left to write and a CG's apply never waits for the disk.
//!
//! Applying a CG only writes into the page cache; the journal keeps the CG durable until
//! the next checkpoint (see `apply.rs`). Left alone, the kernel would hold those pages
//! dirty for up to 30 s and the checkpoint's fsync would write them all at once. After
//! every apply the store "kicks" this thread, which writes the image back outside the
//! store's lock while the next CG is staged.
//!
//! It writes back one window of the image at a time (`sync_file_range`, waiting for each):
//! a CG's blocks are scattered over the disk, and one fdatasync would queue them all at
//! once in front of the journal's fdatasync, which the next acknowledgement waits for.
//!
//! The thread syncs through its own open file description (`/proc/self/fd/N` reopened, not
//! a `dup`): a write-back error is then reported to it *and* to the store's descriptor,
//! so the checkpoint's own fsync still fails on it (errors are reported once per open
//! file description).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

#[derive(Default)]
struct Wanted {
    dirty: bool,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    wanted: Mutex<Wanted>,
    cv: Condvar,
}

/// The writeback thread of one open replica; stopped and joined on drop.
pub(super) struct ImageFlusher {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl ImageFlusher {
    /// Start the thread for `image` (the store's open image of `len` bytes, at `path` for
    /// messages).
    pub fn start(image: &File, len: u64, path: &Path) -> std::io::Result<Self> {
        let own = File::open(format!("/proc/self/fd/{}", image.as_raw_fd()))?;
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("drblk-flush".into())
            .spawn(move || loop {
                {
                    let mut w = s.wanted.lock().unwrap_or_else(|p| p.into_inner());
                    while !w.dirty && !w.stop {
                        w = s.cv.wait(w).unwrap_or_else(|p| p.into_inner());
                    }
                    if w.stop {
                        return;
                    }
                    w.dirty = false;
                }
                if let Err(e) = write_back(&own, len) {
                    // The next checkpoint's fsync sees the same error and fails the store.
                    tracing::warn!(image = %path.display(), error = %e, "background writeback of the replica image failed");
                }
            })?;
        Ok(ImageFlusher {
            shared,
            thread: Some(thread),
        })
    }

    /// Data was written to the image: write it back soon.
    pub fn kick(&self) {
        let mut w = self.shared.wanted.lock().unwrap_or_else(|p| p.into_inner());
        w.dirty = true;
        self.shared.cv.notify_one();
    }
}

/// Bytes of the image written back per step.
const WINDOW: u64 = 32 << 20;

/// Start write-back of the dirty pages of `[0, len)` one window at a time and wait for
/// each window (not a durability point: the checkpoint's fsync is).
fn write_back(f: &File, len: u64) -> std::io::Result<()> {
    let mut off = 0;
    while off < len {
        let n = WINDOW.min(len - off);
        crate::sys::file::write_back_range(f, off, n)?;
        off += n;
    }
    Ok(())
}

impl Drop for ImageFlusher {
    fn drop(&mut self) {
        self.shared
            .wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .stop = true;
        self.shared.cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
