//! Room for staging: the journal's filesystem is checked before a record is appended, so a
//! group that does not fit fails cleanly (nothing written, the store intact) instead of
//! tearing a record half-way, and a reserve stays free for what a checkpoint and a commit
//! must write (`state.json`, the commit and checkpoint records).
//!
//! How much a group needs: its data (each extent's bytes; an all-zero extent none) plus a
//! 48-byte header per extent, in the journal, on top of the committed groups not yet
//! checkpointed (at most `CheckpointPolicy::max_journal_bytes` plus one group) — plus
//! [`RESERVE`]. The image needs nothing more: it is fully allocated when it is opened.
//!
//! The filesystem is asked (`statvfs`) at most once a second while the bytes staged since
//! fit in what it said, and before every record once they may not: cheap while there is
//! room, exact when it runs short. Another process filling the filesystem in between is
//! still caught by the append's own ENOSPC (the store is then reopened and recovers).

use std::path::Path;
use std::time::{Duration, Instant};

/// Free space staging leaves on the journal's filesystem.
pub const RESERVE: u64 = 4 << 20;

/// How long an answer of the filesystem is trusted while staging stays inside it.
const TRUST: Duration = Duration::from_secs(1);

/// What the journal's filesystem had free, and what was staged since it was asked.
#[derive(Debug, Default)]
pub(super) struct SpaceGuard {
    free: u64,
    since: u64,
    asked_at: Option<Instant>,
    /// Tests: what the filesystem is said to have free, instead of asking it.
    #[cfg(test)]
    pub fixed_free: Option<u64>,
}

impl SpaceGuard {
    /// Room for `n` more bytes in `dir`, asking the filesystem if needed; `Err(free)` if
    /// staging them would eat into the reserve. A filesystem that cannot say is not held
    /// back (its append fails by itself when full).
    pub fn make_room(&mut self, dir: &Path, n: u64) -> Result<(), u64> {
        #[cfg(test)]
        if let Some(free) = self.fixed_free {
            return self.make_room_with(n, || free);
        }
        self.make_room_with(n, || crate::sys::file::free_bytes(dir).unwrap_or(u64::MAX))
    }

    fn make_room_with(&mut self, n: u64, ask: impl FnOnce() -> u64) -> Result<(), u64> {
        let fits = |g: &Self| g.since.saturating_add(n).saturating_add(RESERVE) <= g.free;
        if self.asked_at.is_none_or(|t| t.elapsed() >= TRUST) || !fits(self) {
            self.free = ask();
            self.since = 0;
            self.asked_at = Some(Instant::now());
        }
        if !fits(self) {
            return Err(self.free);
        }
        self.since += n;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn staging_asks_again_only_when_it_may_not_fit() {
        let asked = Cell::new(0);
        let free = Cell::new(RESERVE + 100);
        let mut g = SpaceGuard::default();
        let ask = || {
            asked.set(asked.get() + 1);
            free.get()
        };
        assert_eq!(g.make_room_with(40, ask), Ok(()));
        assert_eq!(g.make_room_with(40, ask), Ok(()));
        assert_eq!(
            asked.get(),
            1,
            "inside what the filesystem said: no new question"
        );
        // 40 + 40 + 40 > 100: asked again, and the filesystem still says 100 free.
        assert_eq!(g.make_room_with(40, ask), Ok(()));
        assert_eq!(asked.get(), 2);
        // 40 + 70 > 100: asked again; 70 alone fits.
        assert_eq!(g.make_room_with(70, ask), Ok(()));
        assert_eq!(asked.get(), 3);
        assert_eq!(g.make_room_with(110, ask), Err(RESERVE + 100));
        // Space returns: the same record fits now.
        free.set(RESERVE + 1000);
        assert_eq!(g.make_room_with(110, ask), Ok(()));
    }

    #[test]
    fn the_reserve_is_never_staged_into() {
        let mut g = SpaceGuard::default();
        assert_eq!(g.make_room_with(1, || RESERVE), Err(RESERVE));
        assert_eq!(g.make_room_with(0, || RESERVE), Ok(()));
    }
}
