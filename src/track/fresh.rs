//! A change record written from outside a running primary: the default place of a disk's
//! record, and the empty record `drblk promote` leaves, from which the promoted disk tracks
//! every change since the promotion point.

use std::io;
use std::path::{Path, PathBuf};

use super::file::{RecordFile, Superblock, FLAG_CLEAN, PAGE_BITS, PAGE_WORDS};

/// The record of a file image when `--track-file` does not say: `IMAGE.drblk-track`.
pub fn default_record_path(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".drblk-track");
    p.into()
}

/// Writes (atomically) a clean, empty record: the disk differs in nothing from its peer's
/// CG `acked_cg`. A `drblk serve` that opens it resumes CG numbering above `acked_cg` and
/// ships only what is written from then on.
pub fn write_empty(
    path: &Path,
    uuid: [u8; 16],
    disk_size: u64,
    chunk_size: u64,
    acked_cg: u64,
) -> io::Result<()> {
    let chunks = disk_size.div_ceil(chunk_size);
    let words = vec![0u64; (chunks.div_ceil(PAGE_BITS) * PAGE_WORDS as u64) as usize];
    let sb = Superblock {
        seq: 0,
        uuid,
        disk_size,
        chunk_size,
        al_extent: crate::config::defaults::AL_EXTENT_SIZE.max(chunk_size),
        al_slots: crate::config::defaults::AL_EXTENTS,
        acked_cg,
        flags: FLAG_CLEAN,
    };
    RecordFile::create(path, sb, &words).map(drop)
}
