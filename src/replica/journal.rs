//! The staging journal file: append, scan (recovery), reset, compaction.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{io, Error, Result};
use super::fault::{CrashPoint, Fault};
use super::format::{Header, RecordType, HEADER_LEN, MAGIC};
use super::state::sync_dir;

pub const JOURNAL_FILE: &str = "journal";
pub const JOURNAL_NEW: &str = "journal.new";

/// Where the newest staged version of one chunk lives in the journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub cg: u64,
    /// Offset of the record's header.
    pub offset: u64,
    /// Payload length (0 for a zero chunk).
    pub len: u32,
    pub zero: bool,
}

impl Entry {
    pub fn record_len(&self) -> u64 {
        HEADER_LEN as u64 + self.len as u64
    }
}

pub use crate::geometry::Geometry;

pub struct Journal {
    pub path: PathBuf,
    dir: PathBuf,
    file: File,
    pub gen: u64,
    pub base_cg: u64,
    pub base_frozen: u64,
    /// Append offset (= logical length).
    pub len: u64,
}

/// What a recovery scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub gen: u64,
    pub base_cg: u64,
    pub base_frozen: u64,
    /// Newest committed version per chunk over all commit records (later commits win).
    pub committed: HashMap<u64, Entry>,
    /// Last valid commit record: (cg, frozen_at).
    pub last_commit: Option<(u64, u64)>,
    /// Data/zero records after the last commit record (dropped).
    pub uncommitted_records: u64,
    /// Offset at which the valid part of the journal ends, if bytes follow it.
    pub torn_at: Option<u64>,
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
        })
    }

    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io("fdatasync", &self.path))
    }

    /// Append one record; returns its offset. Not synced.
    pub fn append(&mut self, h: Header, payload: &[u8]) -> Result<u64> {
        let off = self.len;
        let raw = h.encode(payload);
        self.write_at(&raw, off)?;
        if !payload.is_empty() {
            self.write_at(payload, off + HEADER_LEN as u64)?;
        }
        self.len = off + h.record_len();
        Ok(off)
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

    /// Read and verify the record of `e` for chunk `index`; returns the payload.
    pub fn read_entry(&self, index: u64, e: &Entry, buf: &mut Vec<u8>) -> Result<()> {
        let mut hb = [0u8; HEADER_LEN];
        buf.resize(e.len as usize, 0);
        let corrupt = |detail: String| Error::Corrupt {
            path: self.path.clone(),
            offset: e.offset,
            cg: e.cg,
            commit_offset: 0,
            detail,
        };
        self.file
            .read_exact_at(&mut hb, e.offset)
            .map_err(io("read", &self.path))?;
        self.file
            .read_exact_at(buf, e.offset + HEADER_LEN as u64)
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
        if h.rtype != want || h.gen != self.gen || h.arg != index || h.cg != e.cg || h.len != e.len
        {
            return Err(corrupt(format!("record is not the staged one: {h:?}")));
        }
        Ok(())
    }

    /// Truncate the journal to nothing and start a new generation with a checkpoint record
    /// at offset 0 saying that the image holds `base_cg`. Synced.
    pub fn reset(&mut self, base_cg: u64, base_frozen: u64, fault: &Fault) -> Result<()> {
        self.file.set_len(0).map_err(io("truncate", &self.path))?;
        self.len = 0;
        fault.hit(CrashPoint::MidJournalReset)?;
        self.gen = new_gen(self.gen);
        self.base_cg = base_cg;
        self.base_frozen = base_frozen;
        let h = Header::new(RecordType::Checkpoint, self.gen, base_cg, 0, base_frozen, 0);
        self.append(h, &[])?;
        self.sync()
    }

    /// Rewrite the journal so that it holds only `live` (one record per chunk): write
    /// `journal.new` (new generation), fsync, rename over `journal`, fsync the directory.
    /// Updates the offsets in `live`. A crash at any point leaves either the old or the new
    /// journal, both of which hold the same uncommitted data (which recovery drops anyway).
    pub fn compact(&mut self, live: &mut HashMap<u64, Entry>, fault: &Fault) -> Result<()> {
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
        let mut order: Vec<u64> = live.keys().copied().collect();
        order.sort_unstable();
        let mut buf = Vec::new();
        let mut moved = Vec::with_capacity(order.len());
        for index in order {
            let e = live[&index];
            self.read_entry(index, &e, &mut buf)?;
            let rt = if e.zero {
                RecordType::Zero
            } else {
                RecordType::Data
            };
            let off = newj.append(Header::new(rt, newj.gen, e.cg, index, 0, e.len), &buf)?;
            moved.push((index, off));
        }
        newj.sync()?;
        fault.hit(CrashPoint::MidCompaction)?;
        fs::rename(&new_path, &self.path).map_err(io("rename journal.new onto", &self.path))?;
        sync_dir(&self.dir)?;
        newj.path = self.path.clone();
        *self = newj;
        for (index, off) in moved {
            live.get_mut(&index).unwrap().offset = off;
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
    pub fn scan(&mut self, geo: Geometry) -> Result<Scan> {
        let file_len = self.file.metadata().map_err(io("stat", &self.path))?.len();
        let mut scan = Scan::default();
        let mut pending: HashMap<u64, Entry> = HashMap::new();
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
                let len_ok = match h.rtype {
                    RecordType::Data => geo.chunk_len(h.arg) == Some(h.len as usize),
                    RecordType::Zero => h.arg < geo.chunks() && h.len == 0,
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
                            let e = Entry {
                                cg: h.cg,
                                offset: off,
                                len: h.len,
                                zero: h.rtype == RecordType::Zero,
                            };
                            pending.insert(h.arg, e);
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
                            pending.retain(|&i, e| {
                                if e.cg <= h.cg {
                                    scan.committed.insert(i, *e);
                                    false
                                } else {
                                    true
                                }
                            });
                            scan.last_commit = Some((h.cg, h.aux));
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
                tracing::warn!(journal = %self.path.display(), offset = off, %detail,
                    "torn or corrupt journal tail after the last commit; treated as end of journal");
                scan.torn_at = Some(off);
                break;
            }
        }
        scan.uncommitted_records = pending.len() as u64;
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
