//! Planned I/O faults for tests (feature `fault-injection`, off in every build a user
//! runs): a count of writes goes through, the next ones fail with ENOSPC or EIO, as a full
//! or failing disk would, without root or a special filesystem. The plan comes from an
//! environment variable: `ERRNO,skip=N,fail=M` (ERRNO `ENOSPC` or `EIO`) fails writes
//! number N+1 to N+M.
//!
//! - `DRBLK_FAULT_WRITES`: the guest's writes to a primary's image (`crate::blk::fault`).
//! - `DRBLK_FAULT_JOURNAL`: a secondary's appends of staged data (extent records) to its
//!   journal (a compaction's copies included), counted over the whole process (a replica
//!   reopened after a failure goes on counting).
//! - `DRBLK_FAULT_APPLY`: a secondary's image writes applying committed groups (replays at
//!   recovery included).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// Which writes fail, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteFaults {
    /// The errno they fail with.
    pub errno: i32,
    /// Writes that go through first.
    pub skip: u64,
    /// Writes that fail after those.
    pub fail: u64,
}

impl WriteFaults {
    /// Parses `ERRNO,skip=N,fail=M`.
    pub fn parse(text: &str) -> Result<WriteFaults, String> {
        let mut parts = text.split(',');
        let errno = match parts.next().map(str::trim) {
            Some("ENOSPC") => libc::ENOSPC,
            Some("EIO") => libc::EIO,
            other => return Err(format!("unknown errno {other:?} (ENOSPC or EIO)")),
        };
        let (mut skip, mut fail) = (0, 0);
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or(format!("{p:?}: expected key=value"))?;
            let v: u64 = v.trim().parse().map_err(|e| format!("{p:?}: {e}"))?;
            match k.trim() {
                "skip" => skip = v,
                "fail" => fail = v,
                k => return Err(format!("unknown key {k:?} (skip, fail)")),
            }
        }
        Ok(WriteFaults { errno, skip, fail })
    }

    /// The plan in the environment variable `var`, if set (a bad plan panics: tests only).
    pub fn from_env(var: &str) -> Option<WriteFaults> {
        let text = std::env::var(var).ok()?;
        match WriteFaults::parse(&text) {
            Ok(f) => Some(f),
            Err(e) => panic!("{var}={text:?}: {e}"),
        }
    }
}

/// Counts writes against a plan.
#[derive(Debug)]
pub struct FaultCounter {
    plan: WriteFaults,
    writes: AtomicU64,
}

impl FaultCounter {
    /// A counter for `plan`, at write 0.
    pub fn new(plan: WriteFaults) -> Self {
        FaultCounter {
            plan,
            writes: AtomicU64::new(0),
        }
    }

    /// The plan.
    pub fn plan(&self) -> WriteFaults {
        self.plan
    }

    /// Counts one write: `Err` if the plan fails it.
    pub fn next_write(&self) -> io::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst);
        if n >= self.plan.skip && n < self.plan.skip + self.plan.fail {
            return Err(io::Error::from_raw_os_error(self.plan.errno));
        }
        Ok(())
    }
}

/// The process-wide counter of a secondary's image writes while applying committed groups
/// (`DRBLK_FAULT_APPLY`; the initial sync's writes are not counted), if planned.
pub fn apply() -> Option<&'static FaultCounter> {
    static PLAN: OnceLock<Option<FaultCounter>> = OnceLock::new();
    planned(
        &PLAN,
        "DRBLK_FAULT_APPLY",
        "applying groups to the replica image",
    )
}

/// The process-wide counter of the journal's data appends (`DRBLK_FAULT_JOURNAL`), if
/// planned.
pub fn journal() -> Option<&'static FaultCounter> {
    static PLAN: OnceLock<Option<FaultCounter>> = OnceLock::new();
    planned(
        &PLAN,
        "DRBLK_FAULT_JOURNAL",
        "the staging journal's appends",
    )
}

/// The counter in `cell`, made from the plan in `var` on first use.
fn planned(
    cell: &'static OnceLock<Option<FaultCounter>>,
    var: &str,
    what: &str,
) -> Option<&'static FaultCounter> {
    cell.get_or_init(|| {
        let plan = WriteFaults::from_env(var)?;
        tracing::warn!(?plan, "fault injection: {what} fail as planned");
        Some(FaultCounter::new(plan))
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_fails_the_planned_writes_only() {
        let c = FaultCounter::new(WriteFaults::parse("ENOSPC,skip=2,fail=2").unwrap());
        let r: Vec<bool> = (0..6).map(|_| c.next_write().is_ok()).collect();
        assert_eq!(r, [true, true, false, false, true, true]);
    }

    #[test]
    fn plans_parse_and_bad_ones_are_refused() {
        assert_eq!(
            WriteFaults::parse("ENOSPC,skip=5,fail=2").unwrap(),
            WriteFaults {
                errno: libc::ENOSPC,
                skip: 5,
                fail: 2
            }
        );
        assert_eq!(WriteFaults::parse("EIO").unwrap().errno, libc::EIO);
        assert!(WriteFaults::parse("EPERM").is_err());
        assert!(WriteFaults::parse("EIO,skip").is_err());
        assert!(WriteFaults::parse("EIO,what=1").is_err());
    }
}
