//! An in-process replica image next to the primary (`--local-replica`): each committed
//! consistency group is applied to it, so it only ever holds committed groups.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use super::cycle::ChunkSink;
use crate::cg::ChunkImage;

/// An in-process replica: stages each CG's chunks (one version per chunk, the newest CG
/// wins) and applies them to a replica image only when the CG commits. The image therefore
/// only ever holds committed CGs.
pub struct LocalReplica {
    image: File,
    chunk_size: u64,
    staged: HashMap<u64, (u64, Vec<u8>)>,
    on_commit: Option<CommitHook>,
}

/// Called after a commit was applied to the replica image.
pub type CommitHook = Box<dyn FnMut(u64, &File) + Send>;

impl LocalReplica {
    /// A replica image at `path` (created/truncated to `size`), with chunks of `chunk_size`.
    pub fn create(path: &Path, size: u64, chunk_size: u64) -> io::Result<Self> {
        let image = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        image.set_len(size)?;
        Ok(LocalReplica {
            image,
            chunk_size,
            staged: HashMap::new(),
            on_commit: None,
        })
    }

    /// Calls `f(cg, image)` after each commit has been applied (tests check the image there).
    pub fn on_commit(mut self, f: impl FnMut(u64, &File) + Send + 'static) -> Self {
        self.on_commit = Some(Box::new(f));
        self
    }
}

impl ChunkSink for LocalReplica {
    fn chunk(&mut self, img: ChunkImage) -> io::Result<()> {
        match self.staged.get(&img.index) {
            Some((cg, _)) if *cg > img.cg => {}
            _ => {
                self.staged.insert(img.index, (img.cg, img.data));
            }
        }
        Ok(())
    }

    fn recover(&mut self, _error: &io::Error, _stop: &AtomicBool) -> io::Result<()> {
        // The engine merged everything uncommitted back into its dirty set: it ships again.
        self.staged.clear();
        Ok(())
    }

    fn commit(&mut self, cg: u64, _frozen_at: SystemTime) -> io::Result<()> {
        for (index, (_, data)) in self.staged.drain() {
            self.image.write_all_at(&data, index * self.chunk_size)?;
        }
        if let Some(f) = self.on_commit.as_mut() {
            f(cg, &self.image);
        }
        Ok(())
    }
}
