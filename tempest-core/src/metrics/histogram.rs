//! A lock-free latency histogram with log-linear buckets.
//!
//! Recording is a few atomic adds, so the data plane can record from every
//! worker without a lock. Buckets have 8 linear steps per power of two (at
//! most 12.5% relative error), from 1 to 2^40 of the recorded unit, which is
//! microseconds for every latency Tempest records.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
const MAX_EXP: u32 = 40;
/// Number of buckets.
pub const BUCKETS: usize = (SUB + (MAX_EXP as u64 - SUB_BITS as u64 + 1) * SUB) as usize;

/// The bucket a value falls in.
fn index(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = (63 - v.leading_zeros()).min(MAX_EXP);
    if exp == MAX_EXP && v >= (1u64 << (MAX_EXP + 1)) {
        return BUCKETS - 1;
    }
    let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
    (SUB + u64::from(exp - SUB_BITS) * SUB + sub) as usize
}

/// The bucket value `v` is counted in (see [`bucket_upper`]).
pub fn bucket_index(v: u64) -> usize {
    index(v)
}

/// The largest value that falls in bucket `i` (its inclusive upper bound).
pub fn bucket_upper(i: usize) -> u64 {
    let i = i as u64;
    if i < SUB {
        return i;
    }
    let exp = (i - SUB) / SUB + u64::from(SUB_BITS);
    let sub = (i - SUB) % SUB;
    let width = 1u64 << (exp - u64::from(SUB_BITS));
    (1u64 << exp) + (sub + 1) * width - 1
}

/// A concurrent histogram of `u64` values.
pub struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        AtomicHistogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    /// Records `n` observations of `value`.
    pub fn record_n(&self, value: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.buckets[index(value)].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        self.sum.fetch_add(value.saturating_mul(n), Relaxed);
        self.max.fetch_max(value, Relaxed);
    }

    /// Records one observation.
    pub fn record(&self, value: u64) {
        self.record_n(value, 1);
    }

    /// A consistent-enough copy (each field read once, no lock).
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            sum: self.sum.load(Relaxed),
            max: self.max.load(Relaxed),
            buckets,
        }
    }
}

/// A histogram's state at one moment.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct HistogramSnapshot {
    /// Observations.
    pub count: u64,
    /// Their sum.
    pub sum: u64,
    /// The largest.
    pub max: u64,
    /// Counts per bucket (see [`bucket_upper`]); empty for an empty snapshot.
    pub buckets: Vec<u64>,
}

impl HistogramSnapshot {
    /// The value at quantile `q` (0..=1): the upper bound of the bucket that
    /// holds it, but never more than the largest value seen. 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(i).min(self.max);
            }
        }
        self.max
    }

    /// Mean value, 0 when empty.
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    /// What was recorded after `earlier` (a snapshot of the same histogram):
    /// bucket counts, count and sum are differences; `max` is the upper
    /// bound of the highest bucket that grew, capped at the overall max (the
    /// largest value of the interval is not kept). Empty when nothing grew.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        if self.count <= earlier.count {
            return HistogramSnapshot::default();
        }
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, &c)| c.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        let max = buckets
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, |i| bucket_upper(i).min(self.max));
        HistogramSnapshot {
            count: buckets.iter().sum(),
            sum: self.sum.saturating_sub(earlier.sum),
            max,
            buckets,
        }
    }

    /// Cumulative counts at the given upper bounds (Prometheus `le` buckets).
    pub fn cumulative(&self, bounds: &[u64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(bounds.len());
        let mut acc = 0;
        let mut i = 0;
        for &b in bounds {
            while i < self.buckets.len() && bucket_upper(i) <= b {
                acc += self.buckets[i];
                i += 1;
            }
            out.push(acc);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_values_in_order() {
        let mut last = 0;
        for v in (0..100_000u64).chain([1 << 20, (1 << 40) - 1, 1 << 40, u64::MAX]) {
            let i = index(v);
            assert!(i < BUCKETS);
            assert!(i >= last || v < 100_000, "index went back at {v}");
            if v < 1 << 40 {
                assert!(bucket_upper(i) >= v, "{v} above its bucket {i}");
                if i > 0 {
                    assert!(bucket_upper(i - 1) < v, "{v} belongs lower than {i}");
                }
            }
            last = i;
        }
    }

    #[test]
    fn quantiles_within_error() {
        let h = AtomicHistogram::default();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 10_000);
        assert_eq!(s.sum, 10_000 * 10_001 / 2);
        for (q, want) in [(0.5, 5000.0), (0.99, 9900.0), (1.0, 10_000.0)] {
            let got = s.quantile(q) as f64;
            assert!((got - want).abs() / want <= 0.125, "q{q}: {got} vs {want}");
        }
        assert_eq!(s.quantile(1.0), 10_000);
    }

    #[test]
    fn since_is_the_interval() {
        let h = AtomicHistogram::default();
        h.record_n(3, 2);
        h.record(100_000);
        let first = h.snapshot();
        h.record(10);
        h.record(20);
        let second = h.snapshot();
        let d = second.since(&first);
        assert_eq!((d.count, d.sum), (2, 30));
        assert_eq!(d.max, bucket_upper(bucket_index(20)));
        assert_eq!(d.quantile(0.5), 10);
        assert_eq!(second.since(&second), HistogramSnapshot::default());
        assert_eq!(first.since(&HistogramSnapshot::default()).count, 3);
    }

    #[test]
    fn cumulative_counts() {
        let h = AtomicHistogram::default();
        h.record_n(3, 2);
        h.record(100);
        h.record(5000);
        let s = h.snapshot();
        assert_eq!(
            s.cumulative(&[1, 3, 100, 1000, 10_000]),
            vec![0, 2, 2, 3, 4]
        );
    }
}
