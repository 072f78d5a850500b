//! Fault latency: every fault's time from being read off the userfaultfd to
//! its page being placed, kept exactly (a u32 of µs per fault) and summarised
//! into percentiles and a log2 histogram at the end.

use common::msg::LatencySummary;
use std::time::Duration;

#[derive(Default)]
pub struct Latencies {
    us: Vec<u32>,
    total_us: u64,
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        let us = d.as_micros().min(u128::from(u32::MAX)) as u32;
        self.us.push(us);
        self.total_us += u64::from(us);
    }

    /// Sum of all latencies: the time guest threads spent blocked.
    pub fn total_us(&self) -> u64 {
        self.total_us
    }

    pub fn summary(&self) -> LatencySummary {
        let mut v = self.us.clone();
        v.sort_unstable();
        // Nearest rank, in whole per-mille so 99.9% of 1000 is exactly 999.
        let pct = |permille: usize| -> u64 {
            if v.is_empty() {
                return 0;
            }
            let rank = (permille * v.len()).div_ceil(1000);
            u64::from(v[rank.clamp(1, v.len()) - 1])
        };
        let mut hist = Vec::new();
        for &us in &v {
            let bucket = if us == 0 {
                0
            } else {
                31 - us.leading_zeros() as usize
            };
            if hist.len() <= bucket {
                hist.resize(bucket + 1, 0);
            }
            hist[bucket] += 1;
        }
        LatencySummary {
            count: v.len() as u64,
            p50: pct(500),
            p90: pct(900),
            p99: pct(990),
            p999: pct(999),
            max: v.last().copied().map(u64::from).unwrap_or(0),
            hist_log2_us: hist,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_buckets() {
        let mut l = Latencies::default();
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, 500);
        assert_eq!(s.p90, 900);
        assert_eq!(s.p99, 990);
        assert_eq!(s.p999, 999);
        assert_eq!(s.max, 1000);
        // [1,2) has 1, [2,4) has 2, [4,8) has 4 ... [512,1024) has 489.
        assert_eq!(&s.hist_log2_us[..4], &[1, 2, 4, 8]);
        assert_eq!(s.hist_log2_us[9], 489);
        assert_eq!(s.hist_log2_us.iter().sum::<u64>(), 1000);
        assert_eq!(l.total_us(), 500500);
        assert_eq!(Latencies::default().summary().count, 0);
    }
}
