//! Fault latency as an HdrHistogram whose counts array lives in shared
//! memory ([`crate::counters::SharedCounters`]): the fault-handler adds one
//! count per fault with a single atomic add, lock-free, and the supervisor
//! reads the array whenever it likes: the counts survive a fault-handler
//! restart, and the difference of two readings is exactly the histogram of
//! the faults in between (the report's timeline).
//!
//! The layout is the `hdrhistogram` crate's for 1 µs to 2^32 µs (71 min)
//! at 2 significant digits (values up to 255 µs exact, above that 128
//! sub-buckets per power of two: at most 0.8 % wide); [`histogram`] turns
//! a counts array back into that crate's `Histogram`, whose percentiles the
//! report quotes. A unit test holds the index function to the crate's.

use hdrhistogram::Histogram;

use crate::msg::LatencySummary;

/// Largest latency kept apart, µs; longer ones count as this.
pub const HIGH_US: u64 = 1 << 32;
/// Significant digits (the HdrHistogram precision).
pub const SIGFIG: u8 = 2;
/// Sub-buckets per half power of two at [`SIGFIG`] (2^7).
const HALF_MAGNITUDE: u32 = 7;
/// Length of the counts array: (power-of-two buckets + 1) × 128.
pub const BUCKETS: usize = 27 << HALF_MAGNITUDE;

/// The counts-array index of a latency of `us` µs (clamped to
/// [`HIGH_US`]): the index at which `hdrhistogram` counts it.
pub fn index(us: u64) -> usize {
    let v = us.min(HIGH_US);
    // hdrhistogram: bucket = leading_zero_count_base - lz(v | sub_bucket_mask),
    // with base 56 and mask 255 for a lowest value of 1 and 2 digits.
    let bucket = 56 - (v | 255).leading_zeros();
    ((bucket as u64) << HALF_MAGNITUDE) as usize + (v >> bucket) as usize
}

/// The lowest latency, µs, that counts at `index`.
pub fn lowest(index: usize) -> u64 {
    let half = 1usize << HALF_MAGNITUDE;
    if index < 2 * half {
        return index as u64;
    }
    let bucket = (index >> HALF_MAGNITUDE) - 1;
    ((index - (bucket << HALF_MAGNITUDE)) as u64) << bucket
}

/// An empty histogram of this layout.
pub fn empty() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIGH_US, SIGFIG).expect("valid bounds")
}

/// The histogram whose counts array is `counts` (shorter arrays are
/// zero-padded, longer ones cut at [`BUCKETS`]).
pub fn histogram(counts: &[u64]) -> Histogram<u64> {
    let mut h = empty();
    for (i, &n) in counts.iter().enumerate().take(BUCKETS) {
        if n > 0 {
            h.saturating_record_n(lowest(i), n);
        }
    }
    h
}

/// `now − before`, per index: the faults counted between two readings.
pub fn delta(now: &[u64], before: &[u64]) -> Vec<u64> {
    now.iter()
        .enumerate()
        .map(|(i, &n)| n.saturating_sub(before.get(i).copied().unwrap_or(0)))
        .collect()
}

/// Count, percentiles (nearest rank, as `hdrhistogram` computes them: the
/// highest value equivalent to the rank's, so at most 0.8 % above it) and
/// a log2 histogram (bucket N: [2^N, 2^(N+1)) µs, bucket 0 also holds 0).
pub fn summary(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary::default();
    }
    let q = |quantile: f64| h.value_at_quantile(quantile);
    let mut hist = Vec::new();
    for v in h.iter_recorded() {
        let low = h.lowest_equivalent(v.value_iterated_to());
        let bucket = 63usize.saturating_sub(low.max(1).leading_zeros() as usize);
        if hist.len() <= bucket {
            hist.resize(bucket + 1, 0);
        }
        hist[bucket] += v.count_at_value();
    }
    LatencySummary {
        count: h.len(),
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        p999: q(0.999),
        max: h.max(),
        hist_log2_us: hist,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where the crate itself counts `v`.
    fn crate_index(v: u64) -> usize {
        let mut h = empty();
        h.record(v).expect("in range");
        h.iter_all()
            .position(|x| x.count_at_value() > 0)
            .expect("counted somewhere")
    }

    #[test]
    fn the_layout_is_the_crates() {
        assert_eq!(empty().distinct_values(), BUCKETS);
        let mut values: Vec<u64> = (0..5000).collect();
        for shift in 8..32 {
            let p = 1u64 << shift;
            values.extend([p - 1, p, p + 1, p + p / 3, p + p / 2 + 7]);
        }
        values.push(HIGH_US);
        for v in values {
            let i = index(v);
            assert_eq!(i, crate_index(v), "index of {v}");
            assert!(lowest(i) <= v, "lowest of {i} is above {v}");
            assert_eq!(index(lowest(i)), i, "lowest of {i} maps back");
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn counts_become_the_same_histogram() {
        let mut direct = empty();
        let mut counts = vec![0u64; BUCKETS];
        for v in [0u64, 1, 7, 255, 256, 257, 1000, 65_000, 3_000_000] {
            direct.record(v).expect("in range");
            counts[index(v)] += 1;
        }
        let rebuilt = histogram(&counts);
        assert_eq!(rebuilt.len(), direct.len());
        for q in [0.0, 0.25, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(rebuilt.value_at_quantile(q), direct.value_at_quantile(q));
        }
    }

    #[test]
    fn percentiles_are_ordered_and_close() {
        let mut counts = vec![0u64; BUCKETS];
        for us in 1..=1000u64 {
            counts[index(us)] += 1;
        }
        let s = summary(&histogram(&counts));
        assert_eq!(s.count, 1000);
        assert!(s.p50 <= s.p90 && s.p90 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max);
        // Nearest rank, within the 0.8 % width of a sub-bucket.
        for (got, want) in [(s.p50, 500), (s.p90, 900), (s.p99, 990), (s.p999, 999)] {
            assert!(got >= want && got <= want + want / 100, "{got} vs {want}");
        }
        assert!(s.max >= 1000 && s.max <= 1008);
        // [1,2) has 1, [2,4) has 2, [4,8) has 4 ... [512,1024) has 489.
        assert_eq!(&s.hist_log2_us[..4], &[1, 2, 4, 8]);
        assert_eq!(s.hist_log2_us[9], 489);
        assert_eq!(s.hist_log2_us.iter().sum::<u64>(), 1000);
        assert_eq!(summary(&empty()).count, 0);
    }

    #[test]
    fn a_delta_is_the_window() {
        let mut before = vec![0u64; BUCKETS];
        before[index(10)] = 5;
        let mut now = before.clone();
        now[index(10)] += 2;
        now[index(5000)] += 1;
        let w = histogram(&delta(&now, &before));
        assert_eq!(w.len(), 3);
        assert_eq!(w.value_at_quantile(0.5), 10);
    }
}
