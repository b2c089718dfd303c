//! A latency histogram that many threads add to without a lock, and its snapshot — the form
//! in which the status carries it and `/metrics` exposes it (Prometheus buckets: cumulative
//! counts at fixed upper bounds, plus sum and count).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the buckets: 1-2.5-5 steps from 5 µs to 10 s, which covers a
/// queue freeze (µs), a guest request (tens of µs to ms) and a group's apply (ms to s).
pub const BOUNDS: [f64; 20] = [
    5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3,
    100e-3, 250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0,
];

/// Counts of observations per bucket (non-cumulative; the last one is "above every bound"),
/// their sum and their number. Relaxed atomics: a scrape may see an observation counted
/// in `count` but not yet in its bucket, which the next scrape corrects.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Adds one observation.
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let secs = ns as f64 / 1e9;
        let i = BOUNDS.partition_point(|&b| b < secs);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Its state now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut s = HistogramSnapshot::default();
        s.add(self);
        s
    }
}

/// A histogram's state, as the status carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// `(upper bound in seconds, observations at or below it)`, cumulative, bounds rising;
    /// observations above the last bound are counted in `count` only.
    pub buckets: Vec<(f64, u64)>,
    /// The sum of all observations, seconds.
    pub sum_seconds: f64,
    /// The number of observations.
    pub count: u64,
}

impl Default for HistogramSnapshot {
    fn default() -> Self {
        HistogramSnapshot {
            buckets: BOUNDS.iter().map(|&b| (b, 0)).collect(),
            sum_seconds: 0.0,
            count: 0,
        }
    }
}

impl HistogramSnapshot {
    /// The upper bound of the bucket holding the `q` quantile (0 < q <= 1): "p99 ≤ this";
    /// None without observations or above the last bound.
    pub fn quantile_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q * self.count as f64).ceil().max(1.0) as u64;
        self.buckets.iter().find(|b| b.1 >= rank).map(|b| b.0)
    }

    /// Adds `h`'s observations (to sum several queues' histograms into one).
    pub fn add(&mut self, h: &Histogram) {
        let mut below = 0;
        for (i, slot) in self.buckets.iter_mut().enumerate() {
            below += h.buckets[i].load(Ordering::Relaxed);
            slot.1 += below;
        }
        self.sum_seconds += h.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        self.count += h.count.load(Ordering::Relaxed);
        // A racing observe may have reached a bucket before `count`: keep the buckets at or
        // below the count, as Prometheus requires.
        for slot in &mut self.buckets {
            slot.1 = slot.1.min(self.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(3)); // <= 5 µs
        h.observe(Duration::from_micros(10)); // exactly a bound: counted at it
        h.observe(Duration::from_millis(3)); // <= 5 ms
        h.observe(Duration::from_secs(60)); // above every bound
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert!((s.sum_seconds - 60.003013).abs() < 1e-9);
        let at = |b: f64| s.buckets.iter().find(|x| x.0 == b).unwrap().1;
        assert_eq!(at(5e-6), 1);
        assert_eq!(at(10e-6), 2);
        assert_eq!(at(2.5e-3), 2);
        assert_eq!(at(5e-3), 3);
        assert_eq!(at(10.0), 3);
        assert!(s
            .buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }

    #[test]
    fn snapshots_of_several_histograms_add_up() {
        let (a, b) = (Histogram::default(), Histogram::default());
        a.observe(Duration::from_micros(20));
        b.observe(Duration::from_micros(20));
        b.observe(Duration::from_millis(20));
        let mut s = a.snapshot();
        s.add(&b);
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets.iter().find(|x| x.0 == 25e-6).unwrap().1, 2);
        assert_eq!(s.buckets.last().unwrap().1, 3);
    }
}
