//! `state.json`: identity of the replica group and its replication state, replaced
//! atomically.
//!
//! Format 2 (this release) names every disk of the consistency group, in the group's order:
//! `{format: 2, chunk_size, mode, last_committed_cg, frozen_at_unix_us, disks: [{uuid, size,
//! image}]}`. Format 1 (one disk: `disk_uuid`, `disk_size` at the top) is read as a group of
//! one and rewritten as format 2 at the next state write; an older binary then refuses the
//! file ("unsupported format 2"), which is safe: it never misreads a group.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{io, Error, Result};

pub const STATE_FILE: &str = "state.json";
pub const STATE_TMP: &str = "state.json.tmp";
pub const STATE_FORMAT: u32 = 2;

/// Persistent mode of the whole group. `Syncing` does not persist progress (see the module
/// docs of `replica`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// `total_chunks` over every disk of the group.
    Syncing {
        total_chunks: u64,
    },
    Consistent,
    Promoted,
}

/// One disk of the group, as the state file names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskEntry {
    /// Hex, 32 digits.
    pub uuid: String,
    pub size: u64,
    /// The replica image this disk was last opened with (for operators and promotion; the
    /// uuid, not the path, is what identifies the disk). Absent in a format-1 file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    /// The disk was added to a consistent group and is not part of its cut yet: its image
    /// is being copied (this many chunks in all). Absent for a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joining: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub chunk_size: u64,
    pub mode: Mode,
    /// Last CG made visible in the images (0 = none). With `Consistent` this is the CG every
    /// image holds; the journal may hold one newer committed CG not yet checkpointed.
    pub last_committed_cg: u64,
    pub frozen_at_unix_us: u64,
    /// The group's disks, in order: a disk's position is its index in journal records and
    /// on the link.
    pub disks: Vec<DiskEntry>,
    /// Disks taken out of the group (`drblk secondary --remove-disk`), each left holding
    /// the group it was removed at.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedDisk>,
}

/// A disk taken out of the group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedDisk {
    /// Hex, 32 digits.
    pub uuid: String,
    /// Its replica image, which holds the group `left_at_cg` and is not written any more.
    pub image: Option<PathBuf>,
    /// The group the image holds.
    pub left_at_cg: u64,
}

/// Format 1: one disk.
#[derive(Deserialize)]
struct StateFileV1 {
    disk_uuid: String,
    disk_size: u64,
    chunk_size: u64,
    mode: Mode,
    last_committed_cg: u64,
    frozen_at_unix_us: u64,
}

impl From<StateFileV1> for StateFile {
    fn from(v1: StateFileV1) -> StateFile {
        StateFile {
            format: STATE_FORMAT,
            chunk_size: v1.chunk_size,
            mode: v1.mode,
            last_committed_cg: v1.last_committed_cg,
            frozen_at_unix_us: v1.frozen_at_unix_us,
            disks: vec![DiskEntry {
                uuid: v1.disk_uuid,
                size: v1.disk_size,
                image: None,
                joining: None,
            }],
            removed: Vec::new(),
        }
    }
}

pub use super::identity::uuid_hex;

/// Reads `state.json` (None: there is none), in either format.
pub fn read(dir: &Path) -> Result<Option<StateFile>> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path)(e)),
    };
    let bad = |detail: String| Error::StateFile {
        path: path.clone(),
        detail,
    };
    #[derive(Deserialize)]
    struct Format {
        format: u32,
    }
    let Format { format } =
        serde_json::from_str(&text).map_err(|e| bad(format!("cannot parse: {e}")))?;
    let st: StateFile = match format {
        1 => serde_json::from_str::<StateFileV1>(&text)
            .map_err(|e| bad(format!("cannot parse: {e}")))?
            .into(),
        STATE_FORMAT => {
            serde_json::from_str(&text).map_err(|e| bad(format!("cannot parse: {e}")))?
        }
        f => {
            return Err(bad(format!(
                "unsupported format {f} (this drblk reads 1 and 2)"
            )))
        }
    };
    if st.disks.is_empty() || st.disks.len() > crate::cg::MAX_DISKS {
        return Err(bad(format!(
            "{} disks (a group has 1 to {})",
            st.disks.len(),
            crate::cg::MAX_DISKS
        )));
    }
    Ok(Some(st))
}

/// Write temp file, fsync it, rename over `state.json`, fsync the directory.
/// `before_rename` is the crash-injection hook between fsync and rename.
pub fn write_atomic(
    dir: &Path,
    st: &StateFile,
    before_rename: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let tmp = dir.join(STATE_TMP);
    let dst = dir.join(STATE_FILE);
    let mut text = serde_json::to_string_pretty(st).expect("state serialises");
    text.push('\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    before_rename()?;
    fs::rename(&tmp, &dst).map_err(io("rename onto state.json", &tmp))?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    crate::sys::file::sync_dir(dir).map_err(io("fsync directory", dir))
}

pub fn remove_if_exists(p: &PathBuf) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("remove", p)(e)),
    }
}
