//! The live figures of a migration, on either host: one [`Snapshot`] (what
//! the control socket's `query` answers, what the progress bar shows) and
//! the sampled [`TimelineSample`]s of the report. Both are built from a
//! [`Reading`]: the shared counters the roles add to as they work, the
//! shared bitmaps, and what the driver last heard (dirty rate, pages left
//! in a round). Reading them costs a few atomic loads and, on the
//! destination, one pass over the 27 KiB latency histogram: cheap enough
//! for the drivers' event loop at 20 Hz. Field names follow the report's
//! (docs/report.md).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use common::counters::{Counter, SharedCounters};
use common::latency;
use common::msg::LatencySummary;
use common::state::MigrationState;
use common::types::PAGE_SIZE;

/// How often the timeline is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Rates in a [`Snapshot`] are measured over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// What a driver knows at one moment; borrowed, built for each sample.
pub struct Reading<'a> {
    /// QEMU's migration status.
    pub status: MigrationState,
    /// The supervisor's own state name (docs/state-machine.md).
    pub phase: &'a str,
    /// The shared counter block, once created (after setup).
    pub counters: Option<&'a SharedCounters>,
    /// Pages on the destination (the destination's `received` bitmap), or
    /// known sent (the source's `sent` bitmap), when this side has one.
    pub pages_done: Option<u64>,
    /// Source in precopy: pages left in the current round, as the
    /// ram-sender last said (it says so every 200 ms, and at each sync).
    /// None: pending is what `pages_done` leaves.
    pub round_left: Option<u64>,
    /// Source: pages dirtied per second over the last round.
    pub dirty_pages_per_s: Option<f64>,
}

/// A migration's figures at one moment (the control socket's `query`).
/// On the source the byte and page totals are what went out, on the
/// destination what came in; fault figures are the destination's (the
/// source counts the page requests it read).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `source` or `destination`.
    pub side: String,
    /// QEMU's migration status: `setup`, `active`, `postcopy-active`,
    /// `postcopy-paused`, `postcopy-recover`, `completed`, `failed`,
    /// `cancelled`.
    pub status: String,
    /// This supervisor's own state (docs/state-machine.md), e.g.
    /// `precopy`, `package out`, `running`.
    pub phase: String,
    /// Time since this supervisor started, ms (the clock of the report's
    /// `events` and `timeline`).
    pub elapsed_ms: f64,
    /// Guest memory, bytes, and in pages.
    pub mem_bytes: u64,
    pub total_pages: u64,
    /// Frame bytes on the data connections so far, headers included
    /// (source: sent on the main stream and the urgent connection;
    /// destination: read from them).
    pub bytes: u64,
    /// Source: of `bytes`, the main stream while the guest ran, while it
    /// was stopped, and after the switch plus urgent pages (the report's
    /// fields); 0 on the destination.
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    /// Source: pages sent as data, and as ZERO frames, all sends counted.
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Destination: pages in the `received` bitmap.
    pub pages_received: u64,
    /// Pages the destination still lacks, as far as this side knows:
    /// source precopy, the pages left in the current round; source after
    /// the package, the pages not yet sent; destination, the pages not yet
    /// received (a page dirtied again after it arrived is not counted).
    pub pending_pages: u64,
    /// 100 × (total_pages − pending_pages) / total_pages.
    pub percent: f64,
    /// Source: dirty syncs so far (the arming of tracking is the first).
    pub dirty_sync_count: u64,
    /// Source: pages dirtied per second over the last round.
    pub dirty_pages_per_s: Option<f64>,
    /// Data bytes per second over the last second, in Mbit/s.
    pub bandwidth_mbps: f64,
    /// `pending_pages` at `bandwidth_mbps`, ms; none while nothing moves.
    /// In precopy a lower bound: pages dirtied meanwhile come on top.
    pub eta_ms: Option<f64>,
    /// Page requests: read by the source's page-server, written by the
    /// destination's fault-handler.
    pub postcopy_requests: u64,
    /// Destination: fault events read from the userfaultfd.
    pub postcopy_faults: u64,
    /// Faults (source: page requests) per second over the last second.
    pub fault_rate: f64,
    /// Destination: pages placed in postcopy that came as urgent answers,
    /// and with the background push.
    pub pages_urgent: u64,
    pub pages_background: u64,
    /// Destination: QEMU's blocktime so far (every vCPU blocked at once), ms.
    pub postcopy_blocktime_ms: Option<f64>,
    /// Destination: every fault's latency so far (read → page placed), µs.
    pub fault_latency_us: Option<LatencySummary>,
}

/// Fault latency of the faults resolved within one timeline interval, µs
/// (the HdrHistogram of that interval).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowLatency {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

/// One point of the report's timeline, about every 50 ms (none while the
/// supervisor is blocked in a step that does not run its event loop, such
/// as accepting connections).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineSample {
    /// Time since this supervisor started, ms (the clock of `events`).
    pub t_ms: f64,
    /// QEMU's migration status at that moment.
    pub status: String,
    /// Frame bytes so far (as [`Snapshot::bytes`]).
    pub bytes: u64,
    /// Data rate since the previous sample, Mbit/s.
    pub bandwidth_mbps: f64,
    /// As [`Snapshot::pending_pages`].
    pub pending_pages: u64,
    /// Source: pages dirtied per second over the last round.
    pub dirty_pages_per_s: Option<f64>,
    /// Page requests so far (as [`Snapshot::postcopy_requests`]).
    pub requests: u64,
    /// Destination: fault events so far.
    pub faults: Option<u64>,
    /// Destination: latency of the faults resolved since the previous
    /// sample; none when none was.
    pub latency_us: Option<WindowLatency>,
}

/// The figures a driver keeps between samples: the timeline so far and
/// what rates need.
pub struct Telemetry {
    side: &'static str,
    started: Instant,
    mem_bytes: u64,
    timeline: Vec<TimelineSample>,
    last_sample: Option<Instant>,
    /// Latency counts at the last sample (windows are differences).
    latency_seen: Vec<u64>,
}

/// Totals read from a reading, before rates.
struct Totals {
    bytes: u64,
    requests: u64,
    faults: u64,
    pending: u64,
}

impl Telemetry {
    /// `started`: the supervisor's start (the clock of the report's events).
    pub fn new(side: &'static str, started: Instant, mem_bytes: u64) -> Self {
        Telemetry {
            side,
            started,
            mem_bytes,
            timeline: Vec::new(),
            last_sample: None,
            latency_seen: Vec::new(),
        }
    }

    /// Guest memory is known (the destination learns it at setup).
    pub fn set_mem_bytes(&mut self, mem_bytes: u64) {
        self.mem_bytes = mem_bytes;
    }

    fn total_pages(&self) -> u64 {
        self.mem_bytes / PAGE_SIZE as u64
    }

    fn totals(&self, r: &Reading) -> Totals {
        let c = |k| r.counters.map(|c| c.get(k)).unwrap_or(0);
        let source = self.side == "source";
        let bytes = if source {
            c(Counter::PrecopyBytes)
                + c(Counter::DowntimeBytes)
                + c(Counter::PushBytes)
                + c(Counter::UrgentBytes)
        } else {
            c(Counter::RecvBytes)
        };
        let pending = match (r.round_left, r.pages_done) {
            (Some(left), _) => left,
            (None, Some(done)) => self.total_pages().saturating_sub(done),
            (None, None) => self.total_pages(),
        };
        Totals {
            bytes,
            requests: c(if source {
                Counter::Requests
            } else {
                Counter::FaultRequests
            }),
            faults: c(Counter::Faults),
            pending,
        }
    }

    /// Adds a timeline sample if one is due (every [`SAMPLE_EVERY`]);
    /// returns whether it did.
    pub fn sample(&mut self, r: &Reading) -> bool {
        let now = Instant::now();
        if self
            .last_sample
            .is_some_and(|t| now.duration_since(t) < SAMPLE_EVERY)
        {
            return false;
        }
        self.last_sample = Some(now);
        let t_ms = ms(now.duration_since(self.started));
        let tot = self.totals(r);
        let bandwidth_mbps = match self.timeline.last() {
            Some(prev) if t_ms > prev.t_ms => {
                tot.bytes.saturating_sub(prev.bytes) as f64 * 8.0 / (t_ms - prev.t_ms) / 1e3
            }
            _ => 0.0,
        };
        let destination = self.side == "destination";
        let latency_us = match r.counters.filter(|_| destination) {
            Some(c) => {
                let counts = c.latency_counts();
                let window = latency::histogram(&latency::delta(&counts, &self.latency_seen));
                self.latency_seen = counts;
                (!window.is_empty()).then(|| WindowLatency {
                    count: window.len(),
                    p50: window.value_at_quantile(0.5),
                    p99: window.value_at_quantile(0.99),
                    max: window.max(),
                })
            }
            None => None,
        };
        self.timeline.push(TimelineSample {
            t_ms,
            status: r.status.name().to_string(),
            bytes: tot.bytes,
            bandwidth_mbps,
            pending_pages: tot.pending,
            dirty_pages_per_s: r.dirty_pages_per_s,
            requests: tot.requests,
            faults: destination.then_some(tot.faults),
            latency_us,
        });
        true
    }

    /// The last sample, whenever the previous one was (at the end).
    pub fn last_sample(&mut self, r: &Reading) {
        self.last_sample = None;
        self.sample(r);
    }

    /// The timeline so far.
    pub fn timeline(&self) -> &[TimelineSample] {
        &self.timeline
    }

    /// The figures now. Rates come from the timeline (its sample about a
    /// second back) and the reading.
    pub fn snapshot(&self, r: &Reading) -> Snapshot {
        let now = Instant::now();
        let elapsed_ms = ms(now.duration_since(self.started));
        let tot = self.totals(r);
        let c = |k| r.counters.map(|c| c.get(k)).unwrap_or(0);
        let source = self.side == "source";
        // The newest sample at least RATE_WINDOW old, else the oldest.
        let back = elapsed_ms - ms(RATE_WINDOW);
        let base = self
            .timeline
            .iter()
            .rev()
            .find(|s| s.t_ms <= back)
            .or(self.timeline.first());
        let (bandwidth_mbps, fault_rate) = match base {
            Some(b) if elapsed_ms > b.t_ms => {
                let secs = (elapsed_ms - b.t_ms) / 1e3;
                let events = if source {
                    tot.requests.saturating_sub(b.requests)
                } else {
                    tot.faults.saturating_sub(b.faults.unwrap_or(0))
                };
                (
                    tot.bytes.saturating_sub(b.bytes) as f64 * 8.0 / secs / 1e6,
                    events as f64 / secs,
                )
            }
            _ => (0.0, 0.0),
        };
        let total_pages = self.total_pages();
        let eta_ms = (bandwidth_mbps > 0.0 && !r.status.is_terminal())
            .then(|| tot.pending as f64 * PAGE_SIZE as f64 * 8.0 / (bandwidth_mbps * 1e3));
        let counters = r.counters.filter(|_| !source);
        Snapshot {
            side: self.side.to_string(),
            status: r.status.name().to_string(),
            phase: r.phase.to_string(),
            elapsed_ms,
            mem_bytes: self.mem_bytes,
            total_pages,
            bytes: tot.bytes,
            precopy_bytes: if source { c(Counter::PrecopyBytes) } else { 0 },
            downtime_bytes: if source { c(Counter::DowntimeBytes) } else { 0 },
            postcopy_bytes: if source {
                c(Counter::PushBytes) + c(Counter::UrgentBytes)
            } else {
                0
            },
            pages_sent: if source {
                c(Counter::PrecopyPages)
                    + c(Counter::DowntimePages)
                    + c(Counter::PushPages)
                    + c(Counter::UrgentPages)
            } else {
                0
            },
            zero_pages: if source {
                c(Counter::PrecopyZeroPages)
                    + c(Counter::DowntimeZeroPages)
                    + c(Counter::PushZeroPages)
                    + c(Counter::UrgentZeroPages)
            } else {
                0
            },
            pages_received: if source { 0 } else { r.pages_done.unwrap_or(0) },
            pending_pages: tot.pending,
            percent: if total_pages == 0 {
                0.0
            } else {
                100.0 * total_pages.saturating_sub(tot.pending) as f64 / total_pages as f64
            },
            dirty_sync_count: c(Counter::DirtySyncs),
            dirty_pages_per_s: r.dirty_pages_per_s,
            bandwidth_mbps,
            eta_ms,
            postcopy_requests: tot.requests,
            postcopy_faults: if source { 0 } else { tot.faults },
            fault_rate,
            pages_urgent: c(Counter::PlacedUrgent),
            pages_background: c(Counter::PlacedBackground),
            postcopy_blocktime_ms: counters.map(|c| c.get(Counter::BlocktimeUs) as f64 / 1e3),
            fault_latency_us: counters
                .map(|c| latency::summary(&latency::histogram(&c.latency_counts()))),
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading<'a>(c: &'a SharedCounters, done: u64) -> Reading<'a> {
        Reading {
            status: MigrationState::PostcopyActive,
            phase: "running",
            counters: Some(c),
            pages_done: Some(done),
            round_left: None,
            dirty_pages_per_s: None,
        }
    }

    #[test]
    fn samples_are_spaced_and_windows_hold_their_own_faults() {
        let (c, _fd) = SharedCounters::create("t").expect("counters");
        let mut t = Telemetry::new("destination", Instant::now(), 1 << 20);
        c.record_latency(100);
        assert!(t.sample(&reading(&c, 10)));
        assert!(!t.sample(&reading(&c, 10)), "a second sample at once");
        std::thread::sleep(SAMPLE_EVERY);
        c.record_latency(5000);
        c.record_latency(7000);
        c.add(Counter::Faults, 2);
        c.add(Counter::RecvBytes, 1 << 20);
        assert!(t.sample(&reading(&c, 200)));
        let tl = t.timeline();
        assert_eq!(tl.len(), 2);
        assert!(tl[1].t_ms > tl[0].t_ms);
        assert_eq!(tl[0].latency_us.as_ref().map(|l| l.count), Some(1));
        let w = tl[1].latency_us.as_ref().expect("a window");
        assert_eq!(w.count, 2);
        assert!(w.p50 >= 5000 && w.max >= 7000);
        assert_eq!(tl[1].pending_pages, 256 - 200);
        assert_eq!(tl[1].faults, Some(2));
        assert!(tl[1].bandwidth_mbps > 0.0);
        let s = t.snapshot(&reading(&c, 200));
        assert_eq!(s.fault_latency_us.as_ref().map(|l| l.count), Some(3));
        assert_eq!(s.postcopy_faults, 2);
        assert!(s.fault_rate > 0.0 && s.bandwidth_mbps > 0.0);
        assert!((s.percent - 100.0 * 200.0 / 256.0).abs() < 1e-9);
        assert!(s.eta_ms.is_some());
    }

    #[test]
    fn the_source_counts_what_went_out() {
        let (c, _fd) = SharedCounters::create("t").expect("counters");
        let t = Telemetry::new("source", Instant::now(), 1 << 20);
        c.add(Counter::PrecopyBytes, 1000);
        c.add(Counter::PushBytes, 10);
        c.add(Counter::UrgentBytes, 1);
        c.add(Counter::PrecopyPages, 3);
        c.add(Counter::DirtySyncs, 2);
        let r = Reading {
            status: MigrationState::Active,
            phase: "precopy",
            counters: Some(&c),
            pages_done: None,
            round_left: Some(17),
            dirty_pages_per_s: Some(5.0),
        };
        let s = t.snapshot(&r);
        assert_eq!(
            (s.bytes, s.precopy_bytes, s.postcopy_bytes),
            (1011, 1000, 11)
        );
        assert_eq!(
            (s.pages_sent, s.pending_pages, s.dirty_sync_count),
            (3, 17, 2)
        );
        assert_eq!(s.fault_latency_us, None);
        // Nothing moved yet: no rate, no ETA.
        assert_eq!(s.eta_ms, None);
    }
}
