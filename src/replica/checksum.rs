//! Checksums of the replica image, for the primary's verify and checksum resync: only the
//! crc32c of each chunk crosses the link, never the data.

use std::os::unix::fs::FileExt;

use super::{error, Error, ReplicaStore, Result};

/// Bytes read at a time.
const READ_BYTES: u64 = 1 << 20;

/// crc32c of each `chunk`-sized piece of `buf` (the last may be shorter).
pub fn chunk_crcs(buf: &[u8], chunk: usize, out: &mut Vec<u32>) {
    out.extend(buf.chunks(chunk).map(crc32c::crc32c));
}

impl ReplicaStore {
    /// crc32c of each of `count` chunks from `first` of disk `disk`'s image (a last, shorter chunk:
    /// of its bytes inside the disk), as of the last committed group. Refused while a
    /// committed group still awaits its apply (the image is not at that group yet).
    pub fn checksums(&self, disk: usize, first: u64, count: u64) -> Result<Vec<u32>> {
        self.check_usable()?;
        if self.pending_apply.is_some() {
            return Err(Error::InvalidState(
                "checksums while a committed CG awaits apply_committed()".into(),
            ));
        }
        let image = self.image(disk)?;
        let geo = image.geo;
        let end = first
            .checked_add(count)
            .filter(|&e| e <= geo.chunks())
            .ok_or_else(|| {
                Error::InvalidArgument(format!("chunks {first}+{count} outside the disk"))
            })?;
        let chunk = geo.chunk_size();
        let per_read = (READ_BYTES / chunk).max(1);
        let mut out = Vec::with_capacity(count as usize);
        let mut buf = Vec::new();
        let mut i = first;
        while i < end {
            let n = per_read.min(end - i);
            let off = geo.chunk_offset(i);
            let len =
                (geo.chunk_offset(i + n - 1) + geo.chunk_len(i + n - 1).unwrap_or(0) as u64) - off;
            buf.resize(len as usize, 0);
            image
                .file
                .read_exact_at(&mut buf, off)
                .map_err(error::io("read", &image.path))?;
            chunk_crcs(&buf, chunk as usize, &mut out);
            i += n;
        }
        Ok(out)
    }
}
