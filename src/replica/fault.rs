//! Deterministic crash injection.
//!
//! A test arms one [`CrashPoint`] with [`super::ReplicaStore::set_crash_point`]. When the
//! store reaches that point it stops exactly there, as if the process had died:
//! - [`CrashMode::ReturnError`]: the operation returns [`super::Error::InjectedCrash`]
//!   and the store is poisoned; the test drops it (no cleanup runs: `Drop` does nothing
//!   but close file descriptors, which is what the kernel does on `kill -9`) and reopens.
//! - [`CrashMode::Abort`]: `std::process::abort()` — for a child-process test.
//!
//! Everything written with `write(2)` before the point is in the page cache and therefore
//! survives a process crash; nothing here models power loss (unsynced data vanishing).

/// Where to crash. See the table in `mod.rs` for what recovery does at each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashPoint {
    /// After a data/zero record was appended by `stage_extent` / `stage_chunk`.
    AfterStage,
    /// Compaction wrote and fsynced `journal.new` but did not rename it over `journal`.
    MidCompaction,
    /// `commit`: staged data fsynced, commit record not yet written.
    BeforeCommitRecord,
    /// `commit`: only the first half of the commit record was written (torn write).
    TornCommitRecord,
    /// `commit`: the whole commit record was written but not yet fsynced.
    AfterCommitRecordWrite,
    /// `commit`: the commit record is durable; nothing applied yet (the primary may have
    /// been acknowledged).
    AfterCommitDurable,
    /// `commit`: the first `k` runs of staged chunks (in apply order; a run is one image
    /// write of consecutive chunks from one record) were written to the image.
    MidApply(u64),
    /// Checkpoint: all committed chunks written to the images, none fsynced yet.
    BeforeImageSync,
    /// Checkpoint of a group of several disks: images `0..k` fsynced, image `k` and later
    /// not yet (`k >= 1`; never reached with one disk).
    BetweenImageSyncs(u64),
    /// `commit`/`finish_sync`: the temporary state file was written and fsynced, not renamed.
    MidStateWrite,
    /// Checkpoint: state file says the last committed CG; journal not yet reset.
    BeforeJournalReset,
    /// Journal reset: the new generation's checkpoint record not yet written (the old
    /// journal whole, or cut to nothing if it passed `journal::REUSE_MAX`).
    MidJournalReset,
    /// `sync_extent` / `sync_chunk`: after the extent was written to the image.
    AfterSyncChunk,
    /// `finish_sync`: image fsynced, state not yet written.
    BeforeFinishSyncState,
}

/// What to do at the armed crash point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Return `Error::InjectedCrash` and poison the store.
    ReturnError,
    /// Abort the whole process (`std::process::abort`), for child-process tests.
    Abort,
}

/// All crash points without parameters, plus a few `MidApply` values (for tests).
pub const ALL_SIMPLE: &[CrashPoint] = &[
    CrashPoint::AfterStage,
    CrashPoint::MidCompaction,
    CrashPoint::BeforeCommitRecord,
    CrashPoint::TornCommitRecord,
    CrashPoint::AfterCommitRecordWrite,
    CrashPoint::AfterCommitDurable,
    CrashPoint::BeforeImageSync,
    CrashPoint::MidStateWrite,
    CrashPoint::BeforeJournalReset,
    CrashPoint::MidJournalReset,
    CrashPoint::AfterSyncChunk,
    CrashPoint::BeforeFinishSyncState,
];

impl CrashPoint {
    /// Parse the form used by the `DRBLK_SECONDARY_CRASH_AT` environment variable:
    /// the variant name, `MidApply:<k>` or `BetweenImageSyncs:<k>`.
    pub fn parse(s: &str) -> Option<CrashPoint> {
        if let Some(k) = s.strip_prefix("MidApply:") {
            return k.parse().ok().map(CrashPoint::MidApply);
        }
        if let Some(k) = s.strip_prefix("BetweenImageSyncs:") {
            return k.parse().ok().map(CrashPoint::BetweenImageSyncs);
        }
        ALL_SIMPLE.iter().copied().find(|p| format!("{p:?}") == s)
    }

    /// Whether a crash at this point inside `commit` leaves the CG committed after
    /// recovery (process crash: the commit record's bytes reached the page cache).
    pub fn commit_survives(self) -> bool {
        !matches!(
            self,
            CrashPoint::AfterStage
                | CrashPoint::MidCompaction
                | CrashPoint::BeforeCommitRecord
                | CrashPoint::TornCommitRecord
        )
    }
}

/// The armed crash point of one store.
#[derive(Debug, Default)]
pub struct Fault {
    armed: Option<(CrashPoint, CrashMode)>,
}

impl Fault {
    pub fn arm(&mut self, point: Option<(CrashPoint, CrashMode)>) {
        self.armed = point;
    }

    /// Arm from `DRBLK_SECONDARY_CRASH_AT` (always with [`CrashMode::Abort`]), if set. Only in
    /// test builds and with the `fault-injection` feature: a release binary never aborts
    /// because of its environment.
    #[cfg(any(test, feature = "fault-injection"))]
    pub fn from_env() -> Fault {
        let armed = std::env::var("DRBLK_SECONDARY_CRASH_AT")
            .ok()
            .and_then(|s| CrashPoint::parse(&s))
            .map(|p| (p, CrashMode::Abort));
        Fault { armed }
    }

    /// Nothing armed (builds without fault injection).
    #[cfg(not(any(test, feature = "fault-injection")))]
    pub fn from_env() -> Fault {
        Fault::default()
    }

    pub fn is_armed(&self, p: CrashPoint) -> bool {
        self.armed.is_some_and(|(a, _)| a == p)
    }

    /// Called at each crash point.
    #[inline]
    pub fn hit(&self, p: CrashPoint) -> super::error::Result<()> {
        match self.armed {
            Some((a, mode)) if a == p => match mode {
                CrashMode::ReturnError => Err(super::error::Error::InjectedCrash(p)),
                CrashMode::Abort => {
                    tracing::error!(point = ?p, "injected crash: aborting");
                    std::process::abort()
                }
            },
            _ => Ok(()),
        }
    }
}
