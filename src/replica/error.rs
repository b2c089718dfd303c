//! Errors of the replica store.

use std::path::PathBuf;

use indicatif::HumanBytes;

use super::fault::CrashPoint;

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything the replica store can fail with.
// Variant fields are described by each variant's doc comment and error message.
#[allow(missing_docs)]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed. `what` says which operation, `path` on which file.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The stored replica belongs to another disk (or a differently shaped one).
    #[error(
        "replica in {dir} does not match: stored {field} is {stored}, requested {requested}; \
         refusing to open (use the right state directory, or remove it to start a new replica \
         with a full sync)"
    )]
    IdentityMismatch {
        dir: PathBuf,
        field: String,
        stored: String,
        requested: String,
    },

    /// A record inside a *committed* CG of the journal is corrupt. Nothing of that CG has
    /// been applied by this open. The image is at the last checkpoint CG, or — if an apply of
    /// this CG was interrupted before — possibly a mix; it must not be used as consistent.
    #[error(
        "journal {path} is corrupt at offset {offset} ({detail}), inside committed CG {cg} \
         (commit record at offset {commit_offset}); the CG was NOT applied and the replica \
         refuses to open. The image is not known to be consistent: call \
         ReplicaStore::reset_to_syncing(state_dir) and resynchronise fully from the primary \
         (or restore the journal from a copy)"
    )]
    Corrupt {
        path: PathBuf,
        offset: u64,
        cg: u64,
        commit_offset: u64,
        detail: String,
    },

    /// The state file cannot be parsed or is inconsistent.
    #[error("state file {path}: {detail}")]
    StateFile { path: PathBuf, detail: String },

    /// Another process (or another handle) has the replica open.
    #[error("replica state directory {0} is locked by another opener")]
    Locked(PathBuf),

    /// The call is not valid in the replica's current state (e.g. staging while syncing).
    #[error("invalid in current state: {0}")]
    InvalidState(String),

    /// A caller-supplied argument is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Staging stopped before the journal's filesystem ran out: nothing was written and the
    /// store is intact. The group being staged fails; the primary retries it later.
    #[error(
        "journal full: {} free in {dir}, CG {cg} needs more ({} staged so far, this extent {}, \
         {} kept free for checkpoints); free space there: the primary retries and replication \
         resumes by itself",
        HumanBytes(*.free), HumanBytes(*.staged), HumanBytes(*.needed), HumanBytes(*.reserve)
    )]
    NoSpace {
        dir: PathBuf,
        cg: u64,
        free: u64,
        staged: u64,
        needed: u64,
        reserve: u64,
    },

    /// The replica image cannot be given all its blocks (see `ReplicaStore::open`).
    #[error(
        "the replica image {path} needs {} allocated, has {} and its filesystem {} more free: \
         every block of the image is allocated when it is opened, so that a group whose \
         commit record is written can always be applied. Free space there (or use a block \
         device)",
        HumanBytes(*.size), HumanBytes(*.allocated), HumanBytes(*.free)
    )]
    NoSpaceForImage {
        path: PathBuf,
        size: u64,
        allocated: u64,
        free: u64,
    },

    /// An earlier operation failed half-way (I/O error or injected crash); the in-memory
    /// view can no longer be trusted. Drop the store and open it again (that runs recovery).
    #[error("replica store is poisoned by an earlier failure; reopen it to recover")]
    Poisoned,

    /// An injected crash point was reached (tests only). The store is poisoned.
    #[error("injected crash at {0:?}")]
    InjectedCrash(CrashPoint),
}

pub(crate) fn io(
    what: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { what, path, source }
}
