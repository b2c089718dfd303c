//! Wall-clock times as the link, the state files and the status carry them: microseconds
//! since the Unix epoch (0 for a clock set before 1970).

use std::time::{SystemTime, UNIX_EPOCH};

/// `t` in microseconds since the Unix epoch.
pub fn unix_micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Now, in microseconds since the Unix epoch.
pub fn now_unix_micros() -> u64 {
    unix_micros(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn before_the_epoch_is_zero_and_after_is_exact() {
        assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(unix_micros(UNIX_EPOCH + Duration::from_micros(1234)), 1234);
    }
}
