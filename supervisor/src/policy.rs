//! When precopy ends, and how (docs/state-machine.md, "Switching"). After
//! each dirty sync the supervisor asks [`Policy::decide`]:
//!
//! * **converged**: nothing is pending, or what is pending (dirty pages, counted as full pages, plus
//!   the guest state) can be sent within the downtime limit at the link's
//!   bandwidth → stop the guest and complete in precopy. The bandwidth is
//!   bytes over time spent writing them (pacing included, reading and
//!   zero-checking pages not) in the last round that sent at least 4 MiB (a
//!   round of zero pages measures nothing); before such a round,
//!   `--max-bandwidth` if set, else an assumed 100 MB/s;
//! * **postcopy** (`auto`), once the link's bandwidth is known (measured or
//!   limited): from the second sync on, precopy will not converge if the
//!   guest dirties memory at least as fast as the link sends it; from the
//!   third sync on, also if the pending set shrank by less than 10% since
//!   the previous sync. `manual`: on `start-postcopy` or after
//!   `--postcopy-after-syncs N`. Either way, only if the guest state alone fits
//!   the downtime limit (the part that cannot be fetched later);
//! * otherwise another round.

use std::time::Duration;

use common::control::PostcopyMode;
use common::msg::RoundStats;
use common::types::PAGE_SIZE;

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Continue,
    /// Precopy converged: expected downtime in ms.
    Complete {
        expected_ms: f64,
    },
    Switchover {
        reason: String,
    },
}

#[derive(Clone, Debug)]
pub struct Policy {
    mode: PostcopyMode,
    downtime_limit: Duration,
    after_syncs: Option<u32>,
    state_bytes: u64,
    prev_pending: Option<u64>,
    max_bandwidth: u64,
    measured: Option<f64>,
}

/// Rounds that send less than this measure no bandwidth.
const MIN_MEASURED_BYTES: u64 = 4 << 20;
/// Bandwidth assumed before anything was measured, bytes/s.
const ASSUMED_BANDWIDTH: f64 = 100e6;

impl Policy {
    pub fn new(
        mode: PostcopyMode,
        downtime_limit: Duration,
        after_syncs: Option<u32>,
        state_bytes: u64,
        max_bandwidth: u64,
    ) -> Self {
        Policy {
            mode,
            downtime_limit,
            after_syncs,
            state_bytes,
            prev_pending: None,
            max_bandwidth,
            measured: None,
        }
    }

    /// The guest's estimate of its saved state, bytes (known once the
    /// guest is up).
    pub fn set_state_bytes(&mut self, bytes: u64) {
        self.state_bytes = bytes;
    }

    /// Precopy starts over (after a resync): the pending history is moot;
    /// the measured bandwidth still holds.
    pub fn restart(&mut self) {
        self.prev_pending = None;
    }

    /// The bandwidth decisions use, bytes/s.
    pub fn bandwidth(&self) -> f64 {
        match (self.measured, self.max_bandwidth) {
            (Some(m), _) => m,
            (None, 0) => ASSUMED_BANDWIDTH,
            (None, max) => max as f64,
        }
    }

    /// `set postcopy`: the policy from now on.
    pub fn set_mode(&mut self, mode: PostcopyMode) {
        self.mode = mode;
    }

    /// `set downtime-limit`.
    pub fn set_downtime_limit(&mut self, limit: Duration) {
        self.downtime_limit = limit;
    }

    /// `set max-bandwidth`: the cap the estimate starts from, bytes/s (0 =
    /// none); a measured bandwidth still wins.
    pub fn set_max_bandwidth(&mut self, max: u64) {
        self.max_bandwidth = max;
    }

    pub fn mode(&self) -> PostcopyMode {
        self.mode
    }

    /// A start-postcopy command arrived between syncs: switch now if the
    /// guest state fits the downtime limit at the current estimate.
    pub fn requested(&self) -> Decision {
        if self.mode == PostcopyMode::Never {
            return Decision::Continue;
        }
        let bw = self.bandwidth().max(1.0);
        if self.state_bytes as f64 / bw <= self.downtime_limit.as_secs_f64() {
            Decision::Switchover {
                reason: "start-postcopy was requested".into(),
            }
        } else {
            log::warn!(
                "start-postcopy deferred: the guest state alone does not fit the downtime limit"
            );
            Decision::Continue
        }
    }

    /// Decides after a sync. `requested`: a start-postcopy command arrived.
    pub fn decide(&mut self, s: &RoundStats, requested: bool) -> Decision {
        if s.round_bytes >= MIN_MEASURED_BYTES && s.wire_us > 0 {
            self.measured = Some(s.round_bytes as f64 / (s.wire_us as f64 / 1e6));
        }
        let bw = self.bandwidth().max(1.0);
        let pending_bytes = s.pending_pages * PAGE_SIZE as u64;
        let expected = (pending_bytes + self.state_bytes) as f64 / bw;
        let limit = self.downtime_limit.as_secs_f64();
        let prev = self.prev_pending.replace(s.pending_pages);
        // Nothing pending: another round cannot make the stop any shorter.
        if expected <= limit || s.pending_pages == 0 {
            return Decision::Complete {
                expected_ms: expected * 1e3,
            };
        }
        if self.mode == PostcopyMode::Never {
            return Decision::Continue;
        }
        let state_fits = self.state_bytes as f64 / bw <= limit;
        let reason = if requested {
            Some("start-postcopy was requested".to_string())
        } else if self.mode == PostcopyMode::Manual {
            self.after_syncs
                .filter(|&n| s.sync_count >= n)
                .map(|n| format!("{n} dirty syncs done (--postcopy-after-syncs)"))
        } else if self.measured.is_none() && self.max_bandwidth == 0 {
            // Nothing says what the link carries yet: no grounds to give
            // up on precopy.
            None
        } else {
            let dirty_bytes_rate = s.dirty_rate * PAGE_SIZE as f64;
            if s.sync_count >= 2 && dirty_bytes_rate >= bw {
                Some(format!(
                    "guest dirties {:.0} MB/s, link sends {:.0} MB/s",
                    dirty_bytes_rate / 1e6,
                    bw / 1e6
                ))
            } else if s.sync_count >= 3 && prev.is_some_and(|p| s.pending_pages * 10 > p * 9) {
                Some(format!(
                    "pending set not shrinking ({} → {} pages); expected downtime {:.0} ms > limit {:.0} ms",
                    prev.unwrap_or(0),
                    s.pending_pages,
                    expected * 1e3,
                    limit * 1e3
                ))
            } else {
                None
            }
        };
        match reason {
            Some(reason) if state_fits => Decision::Switchover { reason },
            Some(reason) => {
                log::warn!("not switching to postcopy ({reason}): the guest state alone does not fit the downtime limit");
                Decision::Continue
            }
            None => Decision::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(sync: u32, pending: u64, bw: f64, dirty_pps: f64) -> RoundStats {
        RoundStats {
            sync_count: sync,
            pending_pages: pending,
            bandwidth: bw,
            round_bytes: 64 << 20,
            wire_us: ((64u64 << 20) as f64 / bw * 1e6) as u64,
            dirty_rate: dirty_pps,
            ..Default::default()
        }
    }

    fn policy(mode: PostcopyMode) -> Policy {
        Policy::new(mode, Duration::from_millis(300), None, 4096, 0)
    }

    #[test]
    fn converges_when_pending_fits() {
        let mut p = policy(PostcopyMode::Never);
        // 1000 pages at 1 GB/s: ~4 ms.
        assert!(matches!(
            p.decide(&round(2, 1000, 1e9, 10.0), false),
            Decision::Complete { .. }
        ));
    }

    #[test]
    fn nothing_pending_completes_even_over_the_limit() {
        // A 1 ms limit that even the guest state cannot meet: with no page
        // pending, iterating on would change nothing.
        let mut p = Policy::new(
            PostcopyMode::Auto,
            Duration::from_millis(1),
            None,
            1 << 20,
            0,
        );
        assert!(matches!(
            p.decide(&round(2, 0, 1e6, 0.0), false),
            Decision::Complete { .. }
        ));
    }

    #[test]
    fn never_keeps_going() {
        let mut p = policy(PostcopyMode::Never);
        for sync in 2..10 {
            assert_eq!(
                p.decide(&round(sync, 1 << 20, 1e8, 1e6), false),
                Decision::Continue
            );
        }
    }

    #[test]
    fn auto_switches_on_dirty_rate() {
        let mut p = policy(PostcopyMode::Auto);
        // 100 MB/s link, guest dirties 25600 pages/s = 105 MB/s.
        assert!(matches!(
            p.decide(&round(2, 100_000, 1e8, 25_600.0), false),
            Decision::Switchover { .. }
        ));
    }

    #[test]
    fn auto_switches_when_not_shrinking() {
        let mut p = policy(PostcopyMode::Auto);
        assert_eq!(
            p.decide(&round(2, 100_000, 1e8, 100.0), false),
            Decision::Continue
        );
        // Shrank by 5%: not enough.
        assert!(matches!(
            p.decide(&round(3, 95_000, 1e8, 100.0), false),
            Decision::Switchover { .. }
        ));
        // Shrinking well: keep iterating.
        let mut p = policy(PostcopyMode::Auto);
        p.decide(&round(2, 100_000, 1e8, 100.0), false);
        assert_eq!(
            p.decide(&round(3, 50_000, 1e8, 100.0), false),
            Decision::Continue
        );
    }

    #[test]
    fn manual_waits_for_the_command_or_sync_count() {
        let mut p = policy(PostcopyMode::Manual);
        for sync in 2..6 {
            assert_eq!(
                p.decide(&round(sync, 1 << 20, 1e8, 1e6), false),
                Decision::Continue
            );
        }
        assert!(matches!(
            p.decide(&round(6, 1 << 20, 1e8, 1e6), true),
            Decision::Switchover { .. }
        ));
        let mut p = Policy::new(
            PostcopyMode::Manual,
            Duration::from_millis(300),
            Some(3),
            0,
            0,
        );
        assert_eq!(
            p.decide(&round(2, 1 << 20, 1e8, 1e6), false),
            Decision::Continue
        );
        assert!(matches!(
            p.decide(&round(3, 1 << 20, 1e8, 1e6), false),
            Decision::Switchover { .. }
        ));
    }

    #[test]
    fn request_between_syncs_goes_through_the_policy() {
        assert!(matches!(
            policy(PostcopyMode::Manual).requested(),
            Decision::Switchover { .. }
        ));
        assert_eq!(policy(PostcopyMode::Never).requested(), Decision::Continue);
        let p = Policy::new(
            PostcopyMode::Manual,
            Duration::from_millis(300),
            None,
            1 << 30,
            0,
        );
        assert_eq!(p.requested(), Decision::Continue);
    }

    #[test]
    fn huge_state_blocks_the_switch() {
        // 1 GB of state over a 100 MB/s link cannot fit 300 ms.
        let mut p = Policy::new(
            PostcopyMode::Auto,
            Duration::from_millis(300),
            None,
            1 << 30,
            0,
        );
        assert_eq!(
            p.decide(&round(2, 1 << 20, 1e8, 1e6), true),
            Decision::Continue
        );
    }

    #[test]
    fn zero_page_rounds_measure_no_bandwidth() {
        // A first round of zero pages "sends" 20 KB/s; that says nothing
        // about the link: the limit (or the assumption) stands.
        let mut p = Policy::new(
            PostcopyMode::Auto,
            Duration::from_millis(300),
            None,
            4096,
            128 << 20,
        );
        let mut r = round(2, 170_000, 20e3, 100_000.0);
        r.round_bytes = 30_000;
        assert!(matches!(p.decide(&r, false), Decision::Switchover { .. }));
        assert_eq!(p.bandwidth(), (128u64 << 20) as f64);
        // Without a limit, an unmeasured link is no reason to switch.
        let mut p = policy(PostcopyMode::Auto);
        assert_eq!(p.decide(&r, false), Decision::Continue);
        let mut p = policy(PostcopyMode::Never);
        r.pending_pages = 100;
        assert!(matches!(p.decide(&r, false), Decision::Complete { .. }));
        assert_eq!(p.bandwidth(), 100e6);
    }
}
