//! The staging journal file: append, scan (recovery), reset, compaction.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{io, Error, Result};
use super::fault::{CrashPoint, Fault};
use super::format::{Header, RecordType, HEADER_LEN, MAGIC};
use super::key::ChunkKey;
use super::state::sync_dir;

pub const JOURNAL_FILE: &str = "journal";
pub const JOURNAL_NEW: &str = "journal.new";

/// Where the newest staged version of one chunk lives in the journal: chunk `pos` of the
/// extent record at `offset` (whose first chunk is therefore `key - pos`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub cg: u64,
    /// Offset of the record's header.
    pub offset: u64,
    /// The record's payload length (0 for a zero extent).
    pub len: u32,
    /// Chunks in the record.
    pub count: u32,
    /// This chunk's position in the record.
    pub pos: u32,
    pub zero: bool,
}

impl Entry {
    /// First chunk of the record, given this entry's chunk `key`.
    pub fn first(&self, key: ChunkKey) -> ChunkKey {
        key.minus(self.pos as u64)
    }

    /// This chunk's bytes inside the record's payload (empty for a zero record).
    pub fn payload_range(&self, chunk_size: u64) -> std::ops::Range<usize> {
        if self.zero {
            return 0..0;
        }
        // Every chunk of an extent but the disk's last one is whole, and that one can only
        // be the last chunk of its extent.
        let start = (self.pos as u64 * chunk_size).min(self.len as u64) as usize;
        let end = ((self.pos as u64 + 1) * chunk_size).min(self.len as u64) as usize;
        start..end
    }

    /// Bytes of the journal this chunk keeps alive, for deciding when to compact: its
    /// payload plus its share of the record header (rounded up, so that the shares of a
    /// record's chunks add up to at least the header, and never more than one header per
    /// chunk — which keeps the bound in the module docs).
    pub fn live_bytes(&self, chunk_size: u64) -> u64 {
        self.payload_range(chunk_size).len() as u64
            + (HEADER_LEN as u64).div_ceil(self.count.max(1) as u64)
    }
}

pub use crate::geometry::Geometry;

/// Appended bytes after which their write-back is started (see `Journal::start_write_back`).
const WRITE_BACK_EVERY: u64 = 4 << 20;

/// A journal file longer than this is truncated when it is reset rather than reused (see
/// [`Journal::reset`]): a burst (one huge group) does not keep its space for ever.
pub const REUSE_MAX: u64 = 1 << 30;

pub struct Journal {
    pub path: PathBuf,
    dir: PathBuf,
    file: File,
    pub gen: u64,
    /// The CG the image durably holds: the checkpoint record's, or a newer one once
    /// `sync_image_and_state` made the image hold it without resetting the journal (a
    /// compaction's new journal then starts from it).
    pub base_cg: u64,
    pub base_frozen: u64,
    /// Append offset (= logical length).
    pub len: u64,
    /// Offset just after the last commit or checkpoint record appended: what precedes it
    /// is committed (dropped by the next checkpoint), what follows is staged or abandoned
    /// (the part a compaction reclaims). On open, the whole file.
    pub committed_end: u64,
    /// Where the last early write-back stopped (see [`WRITE_BACK_EVERY`]).
    written_back: u64,
    /// Reused buffer: a small record's header and payload go out in one write.
    scratch: Vec<u8>,
}

/// What a recovery scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub gen: u64,
    pub base_cg: u64,
    pub base_frozen: u64,
    /// Newest committed version per chunk over all commit records (later commits win).
    pub committed: HashMap<ChunkKey, Entry>,
    /// Last valid commit record: (cg, frozen_at).
    pub last_commit: Option<(u64, u64)>,
    /// Data/zero records (extents) after the last commit record (dropped).
    pub uncommitted_records: u64,
    /// Offset at which the valid part of the journal ends, if bytes follow it.
    pub torn_at: Option<u64>,
    /// Offset just after the last commit record (or the checkpoint record): what follows
    /// belongs to no committed CG.
    pub committed_end: u64,
}

fn new_gen(old: u64) -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let g = t ^ ((std::process::id() as u64) << 40) ^ old.rotate_left(17);
    if g == old || g == 0 {
        old.wrapping_add(1).max(1)
    } else {
        g
    }
}

impl Journal {
    fn open_file(path: &Path) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io("open journal", path))
    }

    /// Open `dir/journal` without interpreting it (call [`Journal::scan`] then
    /// [`Journal::reset`]).
    pub fn open(dir: &Path) -> Result<Journal> {
        let path = dir.join(JOURNAL_FILE);
        let file = Self::open_file(&path)?;
        let len = file.metadata().map_err(io("stat", &path))?.len();
        Ok(Journal {
            path,
            dir: dir.to_path_buf(),
            file,
            gen: 0,
            base_cg: 0,
            base_frozen: 0,
            len,
            committed_end: len,
            written_back: len,
            scratch: Vec::new(),
        })
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io("fdatasync", &self.path))
    }

    /// Append one record; returns its offset. Not synced.
    pub fn append(&mut self, h: Header, payload: &[u8]) -> Result<u64> {
        let off = self.len;
        #[cfg(feature = "fault-injection")]
        if matches!(h.rtype, RecordType::Data | RecordType::Zero) {
            if let Some(f) = crate::sys::fault_plan::journal() {
                f.next_write().map_err(io("write", &self.path))?;
            }
        }
        let raw = h.encode(payload);
        if payload.len() <= 64 << 10 {
            // One system call per small record (most extents are a few blocks).
            let mut buf = std::mem::take(&mut self.scratch);
            buf.clear();
            buf.extend_from_slice(&raw);
            buf.extend_from_slice(payload);
            let r = self.write_at(&buf, off);
            self.scratch = buf;
            r?;
        } else {
            self.write_at(&raw, off)?;
            self.write_at(payload, off + HEADER_LEN as u64)?;
        }
        self.len = off + h.record_len();
        if matches!(h.rtype, RecordType::Commit | RecordType::Checkpoint) {
            self.committed_end = self.len;
        }
        self.start_write_back();
        Ok(off)
    }

    /// Starts writing back what was appended since the last call, once it reaches
    /// [`WRITE_BACK_EVERY`], without waiting: a group's records go to the device while the
    /// rest of it arrives, so the commit's fdatasync finds little left to write. Not a
    /// durability point (the commit's fdatasync is); best effort.
    fn start_write_back(&mut self) {
        if self.len < self.written_back {
            self.written_back = 0; // reset (or truncated)
        }
        if self.len - self.written_back >= WRITE_BACK_EVERY {
            let _ = crate::sys::file::start_write_back(
                &self.file,
                self.written_back,
                self.len - self.written_back,
            );
            self.written_back = self.len;
        }
    }

    /// The journal file's size on disk (a torn tail included).
    pub fn file_len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(io("stat", &self.path))?.len())
    }

    /// Cuts the journal at `end` (see [`Scan::committed_end`]): drops records of no
    /// committed CG, giving their space back before recovery writes anything.
    pub fn truncate_uncommitted(&mut self, end: u64) -> Result<()> {
        self.file.set_len(end).map_err(io("truncate", &self.path))?;
        self.sync()?;
        self.len = end;
        self.committed_end = end;
        Ok(())
    }

    /// Write only the first half of a record (crash injection: torn write).
    pub fn append_torn(&mut self, h: Header) -> Result<()> {
        let raw = h.encode(&[]);
        self.write_at(&raw[..HEADER_LEN / 2], self.len)
    }

    fn write_at(&self, b: &[u8], off: u64) -> Result<()> {
        self.file
            .write_all_at(b, off)
            .map_err(io("write", &self.path))
    }

    /// Read and verify the whole record that `e` (the entry of chunk `key`) points into;
    /// returns its payload in `buf`.
    pub fn read_record(&self, key: ChunkKey, e: &Entry, buf: &mut Vec<u8>) -> Result<()> {
        buf.resize(e.len as usize, 0);
        self.read_record_into(key, e, buf)
    }

    /// [`read_record`](Self::read_record) into `buf`, which is exactly the payload's length.
    pub fn read_record_into(&self, key: ChunkKey, e: &Entry, buf: &mut [u8]) -> Result<()> {
        let mut hb = [0u8; HEADER_LEN];
        let corrupt = |detail: String| Error::Corrupt {
            path: self.path.clone(),
            offset: e.offset,
            cg: e.cg,
            commit_offset: 0,
            detail,
        };
        crate::sys::file::read_exact_pair_at(&self.file, &mut hb, buf, e.offset)
            .map_err(io("read", &self.path))?;
        let h = Header::decode(&hb).ok_or_else(|| corrupt("bad record header".into()))?;
        if !Header::crc_ok(&hb, buf) {
            return Err(corrupt("crc mismatch".into()));
        }
        let want = if e.zero {
            RecordType::Zero
        } else {
            RecordType::Data
        };
        if h.rtype != want
            || h.gen != self.gen
            || h.disk != key.disk()
            || h.arg != e.first(key).chunk()
            || h.aux != e.count as u64
            || h.cg != e.cg
            || h.len != e.len
        {
            return Err(corrupt(format!("record is not the staged one: {h:?}")));
        }
        Ok(())
    }

    /// Start a new generation with a checkpoint record at offset 0 saying that the image
    /// holds `base_cg`. Synced.
    ///
    /// The file is reused, not truncated (unless it grew past [`REUSE_MAX`]): the next
    /// generation's records overwrite the old ones in place, in blocks the filesystem has
    /// already allocated and pages already cached, so neither the appends nor the commits'
    /// fdatasyncs pay for allocating them again (a truncate and its re-allocation cost a
    /// checkpoint hundreds of milliseconds, and each 4 KiB append several microseconds).
    /// What follows the new generation's records is an old generation's: a stale tail,
    /// where the scan stops (see [`Journal::scan`]). Crash safety: before the new checkpoint
    /// record reaches the disk the old journal is whole, and every CG it commits is at or
    /// below `base_cg` (the state file says `base_cg` already), so replaying it is
    /// idempotent; after, its first record names the new generation and `base_cg`.
    pub fn reset(&mut self, base_cg: u64, base_frozen: u64, fault: &Fault) -> Result<()> {
        if self.file_len()? > REUSE_MAX {
            self.file.set_len(0).map_err(io("truncate", &self.path))?;
        }
        self.len = 0;
        self.committed_end = 0;
        fault.hit(CrashPoint::MidJournalReset)?;
        self.gen = new_gen(self.gen);
        self.base_cg = base_cg;
        self.base_frozen = base_frozen;
        let h = Header::new(RecordType::Checkpoint, self.gen, base_cg, 0, base_frozen, 0);
        self.append(h, &[])?;
        self.sync()
    }

    /// Rewrite the journal so that it holds only `live`: write `journal.new` (new
    /// generation) with one record per run of live chunks (consecutive chunks of the same
    /// old record, hence of the same CG and inside one extent region), fsync, rename over
    /// `journal`, fsync the directory. Updates the entries in `live` (the caller recomputes
    /// its live byte count). A crash at any point leaves either the old or the new journal,
    /// both of which hold the same uncommitted data (which recovery drops anyway).
    pub fn compact(
        &mut self,
        live: &mut HashMap<ChunkKey, Entry>,
        chunk_size: u64,
        fault: &Fault,
    ) -> Result<()> {
        let new_path = self.dir.join(JOURNAL_NEW);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&new_path)
            .map_err(io("create", &new_path))?;
        let mut newj = Journal {
            path: new_path.clone(),
            dir: self.dir.clone(),
            file,
            gen: new_gen(self.gen),
            base_cg: self.base_cg,
            base_frozen: self.base_frozen,
            len: 0,
            committed_end: 0,
            written_back: 0,
            scratch: Vec::new(),
        };
        newj.append(
            Header::new(
                RecordType::Checkpoint,
                newj.gen,
                self.base_cg,
                0,
                self.base_frozen,
                0,
            ),
            &[],
        )?;
        let cs = chunk_size;
        let mut buf = Vec::new();
        // (first chunk of the run, new entry for its first chunk)
        let mut moved: Vec<(ChunkKey, Entry)> = Vec::new();
        for group in by_record(live) {
            let (index0, e0) = group[0];
            self.read_record(index0, &e0, &mut buf)?;
            let rt = if e0.zero {
                RecordType::Zero
            } else {
                RecordType::Data
            };
            for run in runs(&group) {
                let (first, ef) = run[0];
                let (_, el) = run[run.len() - 1];
                let bytes = ef.payload_range(cs).start..el.payload_range(cs).end;
                let payload = &buf[bytes];
                let (count, len) = (run.len() as u32, payload.len() as u32);
                let h = Header::new(rt, newj.gen, ef.cg, first.chunk(), count as u64, len)
                    .on_disk(first.disk());
                let off = newj.append(h, payload)?;
                moved.push((
                    first,
                    Entry {
                        cg: ef.cg,
                        offset: off,
                        len,
                        count,
                        pos: 0,
                        zero: ef.zero,
                    },
                ));
            }
        }
        newj.sync()?;
        fault.hit(CrashPoint::MidCompaction)?;
        fs::rename(&new_path, &self.path).map_err(io("rename journal.new onto", &self.path))?;
        sync_dir(&self.dir)?;
        newj.path = self.path.clone();
        *self = newj;
        for (first, e) in moved {
            for pos in 0..e.count {
                *live.get_mut(&first.plus(pos as u64)).unwrap() = Entry { pos, ..e };
            }
        }
        Ok(())
    }

    /// Read the whole journal, verifying every record.
    ///
    /// - A record that is incomplete or fails its checks, with no valid commit record of
    ///   this journal after it, is a torn tail: the scan ends there (`torn_at`).
    /// - If a valid commit record of this journal does follow it, the bad record lies inside
    ///   a committed CG: `Error::Corrupt` naming both offsets.
    /// - A commit record whose chunk count disagrees with the records before it is corrupt.
    /// - A reset reuses the file (see [`Journal::reset`]): after the last record of this
    ///   generation come an earlier generation's bytes, which end the scan as a torn tail
    ///   does (no commit record of this generation can follow them: a commit record is
    ///   only written once every record before it is durable).
    ///
    /// `disks` are the group's disks in index order: an extent must lie inside its disk.
    pub fn scan(&mut self, disks: &[Geometry]) -> Result<Scan> {
        let file_len = self.file.metadata().map_err(io("stat", &self.path))?.len();
        let mut scan = Scan::default();
        let mut pending: HashMap<ChunkKey, Entry> = HashMap::new();
        let mut off = 0u64;
        let mut hb = [0u8; HEADER_LEN];
        let mut payload = Vec::new();
        let mut have_gen = false;
        while off < file_len {
            let bad: Option<String> = 'rec: {
                if file_len - off < HEADER_LEN as u64 {
                    break 'rec Some("incomplete header".into());
                }
                self.file
                    .read_exact_at(&mut hb, off)
                    .map_err(io("read", &self.path))?;
                let Some(h) = Header::decode(&hb) else {
                    break 'rec Some("bad magic/version/type".into());
                };
                if off + h.record_len() > file_len {
                    break 'rec Some("record extends past end of file".into());
                }
                let extent_len = || disks.get(usize::from(h.disk))?.extent_len(h.arg, h.aux);
                let len_ok = match h.rtype {
                    RecordType::Data => extent_len() == Some(h.len as usize),
                    RecordType::Zero => extent_len().is_some() && h.len == 0,
                    RecordType::Commit | RecordType::Checkpoint => h.len == 0,
                };
                if !len_ok {
                    break 'rec Some(format!("implausible record {h:?}"));
                }
                payload.resize(h.len as usize, 0);
                self.file
                    .read_exact_at(&mut payload, off + HEADER_LEN as u64)
                    .map_err(io("read", &self.path))?;
                if !Header::crc_ok(&hb, &payload) {
                    break 'rec Some("crc mismatch".into());
                }
                if off == 0 {
                    if h.rtype != RecordType::Checkpoint {
                        break 'rec Some("journal does not start with a checkpoint".into());
                    }
                    have_gen = true;
                    scan.committed_end = h.record_len();
                    scan.gen = h.gen;
                    scan.base_cg = h.cg;
                    scan.base_frozen = h.aux;
                } else if h.gen != scan.gen {
                    break 'rec Some(format!("record of another journal generation {:#x}", h.gen));
                } else {
                    match h.rtype {
                        RecordType::Checkpoint => {
                            break 'rec Some("checkpoint not at start".into())
                        }
                        RecordType::Data | RecordType::Zero => {
                            // Same rule as staging: per chunk, the newest CG wins and for
                            // equal CGs the later record (a chunk of an older CG inside an
                            // extent is kept out of the index, as `stage_extent` does).
                            for pos in 0..h.aux as u32 {
                                let e = Entry {
                                    cg: h.cg,
                                    offset: off,
                                    len: h.len,
                                    count: h.aux as u32,
                                    pos,
                                    zero: h.rtype == RecordType::Zero,
                                };
                                let key = ChunkKey::new(h.disk, h.arg + pos as u64);
                                if pending.get(&key).is_none_or(|old| old.cg <= h.cg) {
                                    pending.insert(key, e);
                                }
                            }
                            scan.uncommitted_records += 1;
                        }
                        RecordType::Commit => {
                            let n = pending.values().filter(|e| e.cg <= h.cg).count() as u64;
                            if n != h.arg || h.cg <= scan.base_cg {
                                return Err(Error::Corrupt {
                                    path: self.path.clone(),
                                    offset: off,
                                    cg: h.cg,
                                    commit_offset: off,
                                    detail: format!(
                                        "commit record says {} chunks, journal holds {n} \
                                         (base CG {})",
                                        h.arg, scan.base_cg
                                    ),
                                });
                            }
                            scan.uncommitted_records = 0;
                            pending.retain(|&i, e| {
                                if e.cg <= h.cg {
                                    scan.committed.insert(i, *e);
                                    false
                                } else {
                                    true
                                }
                            });
                            scan.last_commit = Some((h.cg, h.aux));
                            scan.committed_end = off + h.record_len();
                        }
                    }
                }
                off += h.record_len();
                None
            };
            if let Some(detail) = bad {
                let gen = have_gen.then_some(scan.gen);
                if let Some((cg, commit_offset)) = self.find_commit_after(off + 1, file_len, gen)? {
                    return Err(Error::Corrupt {
                        path: self.path.clone(),
                        offset: off,
                        cg,
                        commit_offset,
                        detail,
                    });
                }
                // Normal after a crash mid-group (a torn record), and after any reset: the
                // file is reused (see `reset`), so an earlier generation's bytes follow.
                tracing::info!(journal = %self.path.display(), offset = off, %detail,
                    "journal ends here: what follows is a torn record or an earlier generation's (dropped)");
                scan.torn_at = Some(off);
                break;
            }
        }
        self.gen = scan.gen;
        self.base_cg = scan.base_cg;
        self.base_frozen = scan.base_frozen;
        self.len = off;
        Ok(scan)
    }

    /// Search `[from, end)` byte by byte for a valid commit record (of generation `gen`,
    /// or of any generation if unknown). Returns (cg, offset).
    fn find_commit_after(
        &self,
        from: u64,
        end: u64,
        gen: Option<u64>,
    ) -> Result<Option<(u64, u64)>> {
        const BLOCK: usize = 1 << 20;
        let mut buf = vec![0u8; BLOCK + HEADER_LEN];
        let mut pos = from;
        while pos + HEADER_LEN as u64 <= end {
            let n = ((end - pos) as usize).min(buf.len());
            self.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(io("read", &self.path))?;
            let last_start = n.saturating_sub(HEADER_LEN);
            for i in 0..=last_start {
                if buf[i..i + 4] != MAGIC {
                    continue;
                }
                let raw = &buf[i..i + HEADER_LEN];
                if let Some(h) = Header::decode(raw) {
                    if h.rtype == RecordType::Commit
                        && h.len == 0
                        && gen.is_none_or(|g| g == h.gen)
                        && Header::crc_ok(raw, &[])
                    {
                        return Ok(Some((h.cg, pos + i as u64)));
                    }
                }
            }
            pos += last_start as u64 + 1;
        }
        Ok(None)
    }
}

/// The entries of `live` grouped by the record they point into (in journal order), each
/// group sorted by chunk index.
pub fn by_record(live: &HashMap<ChunkKey, Entry>) -> Vec<Vec<(ChunkKey, Entry)>> {
    let mut all: Vec<(ChunkKey, Entry)> = live.iter().map(|(&i, &e)| (i, e)).collect();
    all.sort_unstable_by_key(|&(i, e)| (e.offset, i));
    let mut groups: Vec<Vec<(ChunkKey, Entry)>> = Vec::new();
    for (i, e) in all {
        match groups.last_mut() {
            Some(g) if g[0].1.offset == e.offset => g.push((i, e)),
            _ => groups.push(vec![(i, e)]),
        }
    }
    groups
}

/// Split the entries of one record (sorted by index) into runs of consecutive chunks
/// (which then sit at consecutive positions of the record).
pub fn runs(group: &[(ChunkKey, Entry)]) -> impl Iterator<Item = &[(ChunkKey, Entry)]> {
    group.chunk_by(|a, b| a.0.plus(1) == b.0 && a.1.offset == b.1.offset)
}
