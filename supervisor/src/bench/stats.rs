//! Summaries the bench prints: median with min and max over repetitions,
//! and percentiles of latencies (hdrhistogram, nanosecond records, µs out).

use common::msg::StepSummary;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Median, min and max of one figure over the runs that produced it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Runs that gave a value.
    pub n: usize,
}

impl Spread {
    /// None for no values. The median of an even count is the mean of the
    /// two middle values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// Latencies in ns, summarised in µs.
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        // 1 ns to an hour, 0.1% resolution.
        Latencies(Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds"))
    }
}

impl Latencies {
    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.max(1));
    }

    pub fn summary(&self) -> StepSummary {
        let h = &self.0;
        if h.is_empty() {
            return StepSummary::default();
        }
        let us = |ns: u64| ns as f64 / 1e3;
        StepSummary {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
            mean: h.mean() / 1e3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        assert_eq!(Spread::of(&[]), None);
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0, f64::NAN]).unwrap();
        assert_eq!((s.median, s.n), (2.5, 4));
    }

    #[test]
    fn latencies_in_microseconds() {
        let mut l = Latencies::default();
        for us in 1..=100u64 {
            l.record_ns(us * 1000);
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50 - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99 - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max - 100.0).abs() < 0.1, "{s:?}");
    }
}
