//! Keeping the log bounded when something fails per request or per chunk: the first
//! failure is logged at once, later ones at most once per interval, each line saying how
//! many were left out since the one before and when the first of them happened.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// What the caller logs when [`LogLimiter::admit`] lets an event through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Events left out since the last logged one.
    pub suppressed: u64,
    /// When the first of them happened (None if there were none).
    pub first_suppressed: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
    first_suppressed: Option<SystemTime>,
}

/// A rate limit for one kind of log line.
#[derive(Debug)]
pub struct LogLimiter {
    interval: Duration,
    state: Mutex<State>,
}

impl LogLimiter {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        LogLimiter {
            interval,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
                first_suppressed: None,
            }),
        }
    }

    /// Whether to log this event now (and what to say about the ones left out).
    pub fn admit(&self) -> Option<Admitted> {
        self.admit_at(Instant::now(), SystemTime::now())
    }

    /// [`LogLimiter::admit`] at a given time (for tests).
    pub fn admit_at(&self, now: Instant, wall: SystemTime) -> Option<Admitted> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match s.last {
            Some(last) if now.saturating_duration_since(last) < self.interval => {
                s.suppressed += 1;
                s.first_suppressed.get_or_insert(wall);
                None
            }
            _ => {
                s.last = Some(now);
                Some(Admitted {
                    suppressed: std::mem::take(&mut s.suppressed),
                    first_suppressed: s.first_suppressed.take(),
                })
            }
        }
    }
}

impl Admitted {
    /// " (N more since HH:MM:SS not logged)" or "".
    pub fn note(&self) -> String {
        match (self.suppressed, self.first_suppressed) {
            (0, _) => String::new(),
            (n, Some(t)) => format!(
                " ({n} more since {} not logged)",
                humantime::format_rfc3339_seconds(t)
            ),
            (n, None) => format!(" ({n} more not logged)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_is_logged_then_one_per_interval_with_a_count_of_the_rest() {
        let l = LogLimiter::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let w0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |s: u64| (t0 + Duration::from_millis(s), w0 + Duration::from_millis(s));
        let first = l.admit_at(at(0).0, at(0).1).unwrap();
        assert_eq!(first.suppressed, 0);
        assert_eq!(first.note(), "");
        // 100 000 failures in the next 9.9 s: none logged.
        for i in 1..=100_000u64 {
            let (t, w) = at(i * 99 / 1000);
            assert!(l.admit_at(t, w).is_none());
        }
        let next = l.admit_at(at(10_000).0, at(10_000).1).unwrap();
        assert_eq!(next.suppressed, 100_000);
        assert_eq!(
            next.note(),
            " (100000 more since 2027-01-15T08:00:00Z not logged)"
        );
        // Quiet for a while: the next one is logged at once, with nothing left out.
        let later = l.admit_at(at(60_000).0, at(60_000).1).unwrap();
        assert_eq!(later.suppressed, 0);
    }
}
