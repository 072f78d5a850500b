//! Where the time of a fault goes: stamps along each fault answered on the
//! urgent connection (fault read → request written → request read on the
//! source → page sent → page read → placed), the source's two from its
//! PAGE_TIMES frame (docs/protocol.md), gathered per step into histograms
//! and summarised as percentiles for the report (`fault_path_us`). Both
//! "written"/"sent" stamps are taken just before the write that carries the
//! request or the page, so its syscall counts as time in flight (and on one
//! kernel the reader can never see the bytes before the stamp).

use std::collections::HashMap;

use common::msg::{FaultPath, StepSummary};
use hdrhistogram::Histogram;

/// Stamps of one fault on this host, ns of `CLOCK_MONOTONIC`; 0 = not yet.
#[derive(Copy, Clone, Default)]
struct Stamps {
    fault_read: u64,
    request_written: u64,
    page_read: u64,
    placed: u64,
}

/// The steps, in the order of `FaultPath`'s fields.
#[derive(Copy, Clone)]
enum Step {
    FaultToRequest,
    RequestInFlight,
    SourceService,
    PageInFlight,
    PageToPlaced,
    NetworkRoundTrip,
    Total,
    PushTotal,
}
const STEPS: usize = 8;

pub struct FaultPathRecorder {
    /// Requests sent, by page, until their answer is placed.
    asked: HashMap<u64, Stamps>,
    /// Answers placed, by page, until their PAGE_TIMES arrives.
    placed: HashMap<u64, Stamps>,
    /// One histogram per step, ns.
    steps: Vec<Histogram<u64>>,
    faults: u64,
    /// Requests whose page came on the main stream.
    by_push: u64,
    /// Every answer so far had its source stamps inside its round trip.
    shared_clock: bool,
}

impl Default for FaultPathRecorder {
    fn default() -> Self {
        FaultPathRecorder {
            asked: HashMap::new(),
            placed: HashMap::new(),
            // 1 ns to an hour at 3 significant digits (0.1% resolution).
            steps: (0..STEPS)
                .map(|_| Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("bounds"))
                .collect(),
            faults: 0,
            by_push: 0,
            shared_clock: true,
        }
    }
}

impl FaultPathRecorder {
    /// A fault read at `fault_read` becomes a request for `page`, whose
    /// write starts at `request_written`.
    pub fn asking(&mut self, page: u64, fault_read: u64, request_written: u64) {
        self.asked.insert(
            page,
            Stamps {
                fault_read,
                request_written,
                ..Stamps::default()
            },
        );
    }

    /// The urgent answer whose first page is `page` was read at
    /// `page_read` and placed at `placed`.
    pub fn placed(&mut self, page: u64, page_read: u64, placed: u64) {
        if let Some(mut s) = self.asked.remove(&page) {
            s.page_read = page_read;
            s.placed = placed;
            self.placed.insert(page, s);
        }
    }

    /// Pages `first..end` came on the main stream and were placed at
    /// `placed`: a request for any of them was answered by the push.
    pub fn placed_by_push(&mut self, first: u64, end: u64, placed: u64) {
        if self.asked.is_empty() {
            return;
        }
        for p in first..end {
            if let Some(s) = self.asked.remove(&p) {
                self.by_push += 1;
                self.record(Step::PushTotal, placed.saturating_sub(s.fault_read));
            }
        }
    }

    /// The source's stamps for the request of `page` (PAGE_TIMES).
    pub fn source_times(&mut self, page: u64, request_read: u64, page_sent: u64) {
        let Some(s) = self.placed.remove(&page) else {
            return;
        };
        self.faults += 1;
        let service = page_sent.saturating_sub(request_read);
        let trip = s.page_read.saturating_sub(s.request_written);
        self.record(
            Step::FaultToRequest,
            s.request_written.saturating_sub(s.fault_read),
        );
        self.record(Step::SourceService, service);
        self.record(Step::NetworkRoundTrip, trip.saturating_sub(service));
        self.record(Step::PageToPlaced, s.placed.saturating_sub(s.page_read));
        self.record(Step::Total, s.placed.saturating_sub(s.fault_read));
        if s.request_written <= request_read
            && request_read <= page_sent
            && page_sent <= s.page_read
        {
            self.record(Step::RequestInFlight, request_read - s.request_written);
            self.record(Step::PageInFlight, s.page_read - page_sent);
        } else {
            self.shared_clock = false;
        }
    }

    fn record(&mut self, step: Step, ns: u64) {
        self.steps[step as usize].saturating_record(ns.max(1));
    }

    fn summary(&self, step: Step) -> StepSummary {
        let h = &self.steps[step as usize];
        let us = |ns: u64| ns as f64 / 1e3;
        if h.is_empty() {
            return StepSummary::default();
        }
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

    /// The breakdown so far; None before any fault was answered on the
    /// urgent connection.
    pub fn finish(&self) -> Option<Box<FaultPath>> {
        if self.faults == 0 {
            return None;
        }
        let one_way = |s| self.shared_clock.then(|| self.summary(s));
        Some(Box::new(FaultPath {
            faults: self.faults,
            answered_by_push: self.by_push,
            push_fault_read_to_placed: self.summary(Step::PushTotal),
            shared_clock: self.shared_clock,
            fault_read_to_request_written: self.summary(Step::FaultToRequest),
            request_written_to_request_read: one_way(Step::RequestInFlight),
            request_read_to_page_sent: self.summary(Step::SourceService),
            page_sent_to_page_read: one_way(Step::PageInFlight),
            page_read_to_placed: self.summary(Step::PageToPlaced),
            network_round_trip: self.summary(Step::NetworkRoundTrip),
            fault_read_to_placed: self.summary(Step::Total),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One fault on a shared clock: fault 0, request 10 µs, source reads
    /// it at 30, sends at 35, the page is read at 60 and placed at 64.
    fn one(r: &mut FaultPathRecorder, page: u64, base: u64, src_offset: i64) {
        r.asking(page, base, base + 10_000);
        r.placed(page, base + 60_000, base + 64_000);
        let src = |t: u64| (t as i64 + src_offset) as u64;
        r.source_times(page, src(base + 30_000), src(base + 35_000));
    }

    #[test]
    fn steps_add_up_on_a_shared_clock() {
        let mut r = FaultPathRecorder::default();
        one(&mut r, 5, 1_000_000, 0);
        let f = r.finish().expect("one fault");
        assert_eq!(f.faults, 1);
        assert!(f.shared_clock);
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(f.fault_read_to_request_written.p50, 10.0), "{f:?}");
        assert!(near(
            f.request_written_to_request_read.as_ref().unwrap().p50,
            20.0
        ));
        assert!(near(f.request_read_to_page_sent.p50, 5.0));
        assert!(near(f.page_sent_to_page_read.as_ref().unwrap().p50, 25.0));
        assert!(near(f.page_read_to_placed.p50, 4.0));
        assert!(near(f.network_round_trip.p50, 45.0));
        assert!(near(f.fault_read_to_placed.p50, 64.0));
    }

    #[test]
    fn another_clock_keeps_only_the_round_trip() {
        let mut r = FaultPathRecorder::default();
        // The source's clock runs an hour ahead: its stamps fall outside
        // the round trip, so no one-way step may be reported.
        one(&mut r, 5, 1_000_000, 3_600_000_000_000);
        let f = r.finish().expect("one fault");
        assert!(!f.shared_clock);
        assert!(f.request_written_to_request_read.is_none());
        assert!(f.page_sent_to_page_read.is_none());
        assert!((f.network_round_trip.p50 - 45.0).abs() < 0.1, "{f:?}");
        assert!((f.request_read_to_page_sent.p50 - 5.0).abs() < 0.01);
    }

    #[test]
    fn unasked_and_push_answered_pages_are_kept_apart() {
        let mut r = FaultPathRecorder::default();
        // Times for a page nobody asked for change nothing.
        r.source_times(9, 1, 2);
        assert!(r.finish().is_none());
        // A request whose page came on the main stream is counted apart.
        r.asking(3, 100, 200);
        r.placed_by_push(0, 64, 5_100);
        one(&mut r, 4, 1_000_000, 0);
        let f = r.finish().expect("one fault");
        assert_eq!((f.faults, f.answered_by_push), (1, 1));
        assert!(
            (f.push_fault_read_to_placed.p50 - 5.0).abs() < 0.01,
            "{f:?}"
        );
        assert!((f.fault_read_to_placed.p50 - 64.0).abs() < 0.1, "{f:?}");
    }
}
