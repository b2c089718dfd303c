//! `state.json`: identity of the replica and its replication state, replaced atomically.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::error::{io, Error, Result};

pub const STATE_FILE: &str = "state.json";
pub const STATE_TMP: &str = "state.json.tmp";
pub const STATE_FORMAT: u32 = 1;

/// Persistent mode. `Syncing` does not persist progress (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Syncing { total_chunks: u64 },
    Consistent,
    Promoted,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    /// Hex, 32 digits.
    pub disk_uuid: String,
    pub disk_size: u64,
    pub chunk_size: u64,
    pub mode: Mode,
    /// Last CG made visible in the image (0 = none). With `Consistent` this is the CG the
    /// image holds; the journal may hold one newer committed CG not yet checkpointed.
    pub last_committed_cg: u64,
    pub frozen_at_unix_us: u64,
}

pub use super::identity::uuid_hex;

pub fn read(dir: &Path) -> Result<Option<StateFile>> {
    let path = dir.join(STATE_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", &path)(e)),
    };
    let st: StateFile = serde_json::from_str(&text).map_err(|e| Error::StateFile {
        path: path.clone(),
        detail: format!("cannot parse: {e}"),
    })?;
    if st.format != STATE_FORMAT {
        return Err(Error::StateFile {
            path,
            detail: format!("unsupported format {}", st.format),
        });
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
