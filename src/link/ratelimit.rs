//! Token bucket limiting the primary's send rate (bytes per second).

use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// An async token bucket: `acquire(n)` waits until `n` bytes may be sent.
///
/// The bucket holds at most `burst` tokens; a request larger than `burst` is allowed
/// once the bucket is full and drives it negative, so any chunk size works.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A bucket refilling at `rate` bytes/s holding at most `burst` bytes.
    pub fn new(rate: u64, burst: u64) -> TokenBucket {
        let rate = rate.max(1) as f64;
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Waits until `n` bytes may be sent, then consumes them. Waiting is fair in the
    /// order callers take the internal lock; each sleep is bounded by `n / rate`.
    pub async fn acquire(&self, n: u64) {
        let mut st = self.state.lock().await;
        loop {
            let now = Instant::now();
            let (tokens, last) = *st;
            let tokens =
                (tokens + now.duration_since(last).as_secs_f64() * self.rate).min(self.burst);
            let need = (n as f64).min(self.burst);
            if tokens >= need {
                *st = (tokens - n as f64, now);
                return;
            }
            *st = (tokens, now);
            let wait = (need - tokens) / self.rate;
            tokio::time::sleep(Duration::from_secs_f64(wait.min(10.0))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_enforced() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let b = TokenBucket::new(1_000_000, 100_000);
            let t = Instant::now();
            for _ in 0..30 {
                b.acquire(100_000).await; // 3 MB at 1 MB/s, first 100 kB free
            }
            let s = t.elapsed().as_secs_f64();
            assert!(s > 2.7 && s < 3.5, "{s}");
        });
    }
}
