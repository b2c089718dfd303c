//! The change record's file: format, checks and I/O. Version 1, little endian:
//!
//! | offset | size | what |
//! |---|---|---|
//! | 0, 4096 | 4 KiB each | superblock copies A and B (the valid one with the higher `seq` counts) |
//! | 8192 | `al_bytes` each | activity-log copies A and B (same rule) |
//! | 8192 + 2 `al_bytes` | 4 KiB a page | bitmap pages |
//!
//! - Superblock: magic `DRBLKTRK`, version, `seq`, disk uuid, disk size, chunk size, AL
//!   extent size, AL slots, `acked_cg`, flags (clean, all dirty), crc32c of what precedes.
//! - Activity log: magic `DRBLKAL1`, `seq`, slot count, one extent number per slot
//!   (`u64::MAX`: empty), crc32c.
//! - Bitmap page `p`: [`PAGE_BITS`] bits for chunks `p * PAGE_BITS ..`, the page number and
//!   a crc32c of both. An all-zero page (never written) is a valid empty page; a page that
//!   fails its check is read as all ones (every chunk it covers may differ): a torn page
//!   costs a larger resync, never a missed chunk.
//!
//! Two copies of the superblock and of the activity log, written alternately, so a write torn
//! by a crash leaves the previous copy intact.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SB_MAGIC: &[u8; 8] = b"DRBLKTRK";
const AL_MAGIC: &[u8; 8] = b"DRBLKAL1";
/// Format version.
pub const VERSION: u32 = 1;
const BLOCK: u64 = 4096;
/// Chunks per bitmap page.
pub const PAGE_BITS: u64 = (BLOCK - 8) * 8;
/// 64-bit words per bitmap page.
pub const PAGE_WORDS: usize = ((BLOCK - 8) / 8) as usize;

/// Superblock flag: written by a clean shutdown (the activity log is empty and the bitmap
/// exact).
pub const FLAG_CLEAN: u64 = 1;
/// Superblock flag: every chunk may differ (a full copy is under way).
pub const FLAG_ALL_DIRTY: u64 = 2;

/// What the superblock says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Write sequence number.
    pub seq: u64,
    /// Identity of the disk.
    pub uuid: [u8; 16],
    /// Disk size in bytes.
    pub disk_size: u64,
    /// Chunk (tracking unit) size.
    pub chunk_size: u64,
    /// Activity-log extent size in bytes.
    pub al_extent: u64,
    /// Activity-log slots.
    pub al_slots: u64,
    /// The secondary holds at least this CG; the record is a superset of what differs from
    /// any state of the secondary at or above it.
    pub acked_cg: u64,
    /// [`FLAG_CLEAN`], [`FLAG_ALL_DIRTY`].
    pub flags: u64,
}

impl Superblock {
    fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        b[0..8].copy_from_slice(SB_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..40].copy_from_slice(&self.uuid);
        for (i, v) in [
            self.disk_size,
            self.chunk_size,
            self.al_extent,
            self.al_slots,
            self.acked_cg,
            self.flags,
        ]
        .into_iter()
        .enumerate()
        {
            b[40 + 8 * i..48 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b[..88]);
        b[88..92].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Superblock> {
        let u = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if &b[0..8] != SB_MAGIC
            || u32::from_le_bytes(b[8..12].try_into().unwrap()) != VERSION
            || crc32c::crc32c(&b[..88]) != u32::from_le_bytes(b[88..92].try_into().unwrap())
        {
            return None;
        }
        Some(Superblock {
            seq: u(16),
            uuid: b[24..40].try_into().unwrap(),
            disk_size: u(40),
            chunk_size: u(48),
            al_extent: u(56),
            al_slots: u(64),
            acked_cg: u(72),
            flags: u(80),
        })
    }
}

/// Bytes of one activity-log copy with `slots` slots.
fn al_bytes(slots: u64) -> u64 {
    (24 + 8 * slots + 4).div_ceil(BLOCK) * BLOCK
}

/// The record file, open.
pub struct RecordFile {
    /// Where it lives.
    pub path: PathBuf,
    file: File,
    /// The superblock last written (or read).
    pub sb: Superblock,
    al_seq: u64,
}

/// What [`RecordFile::load`] found.
pub struct Loaded {
    /// The superblock.
    pub sb: Superblock,
    /// Extents in the activity log.
    pub al: Vec<u64>,
    /// Bitmap words (`PAGE_WORDS` per page), bad pages all ones.
    pub words: Vec<u64>,
    /// Pages that failed their check (read as all ones).
    pub bad_pages: u64,
}

impl RecordFile {
    fn pages(sb: &Superblock) -> u64 {
        let chunks = sb.disk_size.div_ceil(sb.chunk_size);
        chunks.div_ceil(PAGE_BITS)
    }

    fn page_offset(&self, p: u64) -> u64 {
        2 * BLOCK + 2 * al_bytes(self.sb.al_slots) + p * BLOCK
    }

    /// Reads the record at `path`: `Ok(None)` if there is none; an error (with what is
    /// wrong) if it cannot be trusted as a whole.
    pub fn load(path: &Path) -> io::Result<Option<Loaded>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let read = |off: u64, n: u64| read_block(&file, len, off, n);
        let sb = [0, BLOCK]
            .into_iter()
            .filter_map(|o| read(o, BLOCK).ok().and_then(|b| Superblock::decode(&b)))
            .max_by_key(|s| s.seq)
            .ok_or_else(|| bad("no valid superblock"))?;
        if sb.chunk_size == 0
            || sb.al_extent < sb.chunk_size
            || !sb.al_extent.is_power_of_two()
            || sb.al_slots == 0
            || sb.al_slots > 1 << 20
        {
            return Err(bad(&format!("implausible superblock {sb:?}")));
        }
        let ab = al_bytes(sb.al_slots);
        let al = [2 * BLOCK, 2 * BLOCK + ab]
            .into_iter()
            .filter_map(|o| {
                let b = read(o, ab).ok()?;
                let n = 24 + 8 * sb.al_slots as usize;
                let crc = u32::from_le_bytes(b[n..n + 4].try_into().unwrap());
                (&b[0..8] == AL_MAGIC && crc32c::crc32c(&b[..n]) == crc).then(|| {
                    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
                    let ext: Vec<u64> = b[24..n]
                        .chunks_exact(8)
                        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                        .filter(|&e| e != u64::MAX)
                        .collect();
                    (seq, ext)
                })
            })
            .max_by_key(|(seq, _)| *seq)
            .ok_or_else(|| bad("no valid activity log"))?;
        let rf = RecordFile {
            path: path.to_path_buf(),
            file,
            sb,
            al_seq: al.0,
        };
        let pages = Self::pages(&sb);
        let mut words = vec![0u64; pages as usize * PAGE_WORDS];
        let mut bad_pages = 0;
        for p in 0..pages {
            let b = read_block(&rf.file, len, rf.page_offset(p), BLOCK)?;
            let w = &mut words[p as usize * PAGE_WORDS..(p as usize + 1) * PAGE_WORDS];
            match decode_page(&b, p) {
                Some(()) => {
                    for (i, c) in b[..(BLOCK - 8) as usize].chunks_exact(8).enumerate() {
                        w[i] = u64::from_le_bytes(c.try_into().unwrap());
                    }
                }
                None => {
                    bad_pages += 1;
                    w.fill(u64::MAX);
                }
            }
        }
        Ok(Some(Loaded {
            sb,
            al: al.1,
            words,
            bad_pages,
        }))
    }

    /// Creates the record at `path` atomically (a temporary file, fsynced, renamed over it):
    /// superblock `sb`, an empty activity log, and the bitmap `words`.
    pub fn create(path: &Path, sb: Superblock, words: &[u64]) -> io::Result<RecordFile> {
        let tmp = path.with_extension("drblk-track.tmp");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let mut rf = RecordFile {
            path: path.to_path_buf(),
            file,
            sb,
            al_seq: 0,
        };
        let pages = Self::pages(&sb);
        file_len_for(&rf, pages)?;
        for p in 0..pages {
            let w = words
                .get(p as usize * PAGE_WORDS..(p as usize + 1) * PAGE_WORDS)
                .unwrap_or(&[]);
            if w.iter().any(|&x| x != 0) {
                rf.write_page(p, w)?;
            }
        }
        rf.write_al(&[])?;
        rf.write_al(&[])?; // both copies valid
        rf.sb.seq = 0;
        rf.write_sb(sb)?;
        rf.file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            crate::sys::file::sync_dir(dir)?;
        }
        Ok(rf)
    }

    /// Writes the next superblock copy (not synced).
    pub fn write_sb(&mut self, mut sb: Superblock) -> io::Result<()> {
        sb.seq = self.sb.seq + 1;
        let off = if sb.seq % 2 == 0 { 0 } else { BLOCK };
        self.file.write_all_at(&sb.encode(), off)?;
        self.sb = sb;
        Ok(())
    }

    /// Writes the next activity-log copy holding `extents` (not synced).
    pub fn write_al(&mut self, extents: &[u64]) -> io::Result<()> {
        let slots = self.sb.al_slots as usize;
        self.al_seq += 1;
        let ab = al_bytes(self.sb.al_slots);
        let mut b = vec![0u8; ab as usize];
        b[0..8].copy_from_slice(AL_MAGIC);
        b[8..16].copy_from_slice(&self.al_seq.to_le_bytes());
        b[16..24].copy_from_slice(&(slots as u64).to_le_bytes());
        for i in 0..slots {
            let e = extents.get(i).copied().unwrap_or(u64::MAX);
            b[24 + 8 * i..32 + 8 * i].copy_from_slice(&e.to_le_bytes());
        }
        let n = 24 + 8 * slots;
        let crc = crc32c::crc32c(&b[..n]);
        b[n..n + 4].copy_from_slice(&crc.to_le_bytes());
        let off = 2 * BLOCK + if self.al_seq % 2 == 0 { 0 } else { ab };
        self.file.write_all_at(&b, off)
    }

    /// Reads bitmap page `p` into `w` (`PAGE_WORDS` words); a bad page reads as all ones.
    pub fn read_page(&self, p: u64, w: &mut [u64]) -> io::Result<()> {
        let mut b = [0u8; BLOCK as usize];
        self.file.read_exact_at(&mut b, self.page_offset(p))?;
        if decode_page(&b, p).is_none() {
            w.fill(u64::MAX);
            return Ok(());
        }
        for (i, c) in b[..(BLOCK - 8) as usize].chunks_exact(8).enumerate() {
            w[i] = u64::from_le_bytes(c.try_into().unwrap());
        }
        Ok(())
    }

    /// Writes bitmap page `p` from `w` (`PAGE_WORDS` words, or fewer: the rest zero; not
    /// synced).
    pub fn write_page(&self, p: u64, w: &[u64]) -> io::Result<()> {
        let mut b = [0u8; BLOCK as usize];
        if w.iter().any(|&x| x != 0) {
            for (i, x) in w.iter().enumerate().take(PAGE_WORDS) {
                b[8 * i..8 * i + 8].copy_from_slice(&x.to_le_bytes());
            }
            b[(BLOCK - 8) as usize..(BLOCK - 4) as usize]
                .copy_from_slice(&(p as u32).to_le_bytes());
            let crc = crc32c::crc32c(&b[..(BLOCK - 4) as usize]);
            b[(BLOCK - 4) as usize..].copy_from_slice(&crc.to_le_bytes());
        }
        self.file.write_all_at(&b, self.page_offset(p))
    }

    /// fdatasync.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Number of bitmap pages.
    pub fn page_count(&self) -> u64 {
        Self::pages(&self.sb)
    }
}

/// `n` bytes at `off`, zeros past the end of a file of `len` bytes.
fn read_block(file: &File, len: u64, off: u64, n: u64) -> io::Result<Vec<u8>> {
    let mut b = vec![0u8; n as usize];
    if off + n <= len {
        file.read_exact_at(&mut b, off)?;
    }
    Ok(b)
}

fn file_len_for(rf: &RecordFile, pages: u64) -> io::Result<()> {
    rf.file.set_len(rf.page_offset(pages))
}

/// Checks page `p`'s bytes: all zero (never written, or empty) or a valid page `p`.
fn decode_page(b: &[u8], p: u64) -> Option<()> {
    if b.iter().all(|&x| x == 0) {
        return Some(());
    }
    let n = (BLOCK - 4) as usize;
    let crc = u32::from_le_bytes(b[n..].try_into().unwrap());
    let idx = u32::from_le_bytes(b[n - 4..n].try_into().unwrap());
    (crc32c::crc32c(&b[..n]) == crc && u64::from(idx) == p).then_some(())
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            seq: 0,
            uuid: [7; 16],
            disk_size: 100 << 20,
            chunk_size: 4096,
            al_extent: 1 << 20,
            al_slots: 8,
            acked_cg: 5,
            flags: 0,
        }
    }

    #[test]
    fn round_trip_torn_copies_and_bad_pages() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        assert!(RecordFile::load(&p).unwrap().is_none());
        let mut words = vec![0u64; PAGE_WORDS];
        words[3] = 0b1010;
        let mut rf = RecordFile::create(&p, sb(), &words).unwrap();
        rf.write_al(&[3, 9]).unwrap();
        rf.write_sb(Superblock {
            acked_cg: 6,
            ..sb()
        })
        .unwrap();
        rf.sync().unwrap();
        let l = RecordFile::load(&p).unwrap().unwrap();
        assert_eq!(
            (l.sb.acked_cg, l.al.clone(), l.words[3], l.bad_pages),
            (6, vec![3, 9], 0b1010, 0)
        );
        // Tear the newest superblock and AL copies: the previous ones count.
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        let sb_off = if rf.sb.seq % 2 == 0 { 0 } else { BLOCK };
        f.write_all_at(&[0xff; 40], sb_off + 10).unwrap();
        let al_off = 2 * BLOCK + if rf.al_seq % 2 == 0 { 0 } else { al_bytes(8) };
        f.write_all_at(&[0xff; 8], al_off + 24).unwrap();
        let l = RecordFile::load(&p).unwrap().unwrap();
        assert_eq!((l.sb.acked_cg, l.al.clone()), (5, vec![]));
        // A corrupt page reads as all ones.
        f.write_all_at(&[0x55], rf.page_offset(0) + 100).unwrap();
        let l = RecordFile::load(&p).unwrap().unwrap();
        assert_eq!((l.bad_pages, l.words[0]), (1, u64::MAX));
        // Both superblocks gone: refused.
        f.write_all_at(&[0; 8], 0).unwrap();
        f.write_all_at(&[0; 8], BLOCK).unwrap();
        assert!(RecordFile::load(&p).is_err());
    }
}
