//! Fault latency and blocktime. Every fault's latency (read off the
//! userfaultfd → its page placed, or resolved locally) goes into the shared
//! HdrHistogram (common::latency); the blocktime follows QEMU's postcopy
//! blocktime: per guest thread, the time it waited for at least one page,
//! and overall, the time during which every vCPU waited at once. Both are
//! added to the shared counter block, so they survive this process.

use std::collections::HashMap;
use std::time::Instant;

use common::counters::{Counter, SharedCounters};

/// One guest thread with faults outstanding.
struct Blocked {
    /// Its faults read and not yet resolved.
    outstanding: u32,
    /// When the first of them was read.
    since: Instant,
}

/// The blocked guest threads (held under one lock by the fault-handler).
pub struct FaultClock {
    vcpus: usize,
    blocked: HashMap<u32, Blocked>,
    /// While every vCPU is blocked: since when.
    all_since: Option<Instant>,
}

impl FaultClock {
    /// `vcpus`: how many threads the guest runs (at least 1).
    pub fn new(vcpus: u32) -> Self {
        FaultClock {
            vcpus: vcpus.max(1) as usize,
            blocked: HashMap::new(),
            all_since: None,
        }
    }

    /// A fault of thread `tid` was read at `at`.
    pub fn fault(&mut self, tid: u32, at: Instant) {
        let b = self.blocked.entry(tid).or_insert(Blocked {
            outstanding: 0,
            since: at,
        });
        b.outstanding += 1;
        if self.all_since.is_none() && self.blocked.len() >= self.vcpus {
            self.all_since = Some(at);
        }
    }

    /// A fault of thread `tid` read at `read_at` is resolved at `now`: its
    /// latency is counted, and the thread's blocked time (and the time all
    /// were blocked) ends if this was its last outstanding fault.
    pub fn resolved(&mut self, tid: u32, read_at: Instant, now: Instant, shared: &SharedCounters) {
        shared.record_latency(micros(now.saturating_duration_since(read_at)));
        let Some(b) = self.blocked.get_mut(&tid) else {
            return;
        };
        b.outstanding -= 1;
        if b.outstanding > 0 {
            shared.add_thread_blocktime(tid, 0, 1);
            return;
        }
        let since = b.since;
        self.blocked.remove(&tid);
        if !shared.add_thread_blocktime(tid, micros(now.saturating_duration_since(since)), 1) {
            log::debug!("no blocktime entry left for guest thread {tid}");
        }
        // With more blocked threads than vCPUs (a thread of the guest that
        // is no vCPU faulted too) all may still be blocked.
        if self.blocked.len() < self.vcpus {
            if let Some(all) = self.all_since.take() {
                shared.add(
                    Counter::BlocktimeUs,
                    micros(now.saturating_duration_since(all)),
                );
            }
        }
    }
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn blocktime_counts_only_when_every_vcpu_waits() {
        let (shared, _fd) = SharedCounters::create("clock").expect("counters");
        let t = Instant::now();
        let mut c = FaultClock::new(2);
        // Thread 1 waits 0..100 ms; thread 2 waits 40..60 ms and 80..150 ms.
        c.fault(1, at(t, 0));
        c.fault(2, at(t, 40));
        c.resolved(2, at(t, 40), at(t, 60), &shared);
        c.fault(2, at(t, 80));
        c.resolved(1, at(t, 0), at(t, 100), &shared);
        c.resolved(2, at(t, 80), at(t, 150), &shared);
        // All blocked: 40..60 and 80..100.
        assert_eq!(shared.get(Counter::BlocktimeUs), 40_000);
        let per: Vec<(u32, u64, u64)> = shared
            .thread_blocktimes()
            .iter()
            .map(|b| (b.tid, b.blocked_us, b.faults))
            .collect();
        assert_eq!(per, vec![(1, 100_000, 1), (2, 90_000, 2)]);
        assert_eq!(
            crate_count(&shared),
            3,
            "every resolved fault is in the histogram"
        );
        assert_eq!(shared.get(Counter::FaultLatencyUs), 190_000);
    }

    #[test]
    fn a_thread_with_two_faults_waits_until_the_last() {
        let (shared, _fd) = SharedCounters::create("clock").expect("counters");
        let t = Instant::now();
        let mut c = FaultClock::new(1);
        c.fault(7, at(t, 0));
        c.fault(7, at(t, 5));
        c.resolved(7, at(t, 0), at(t, 10), &shared);
        c.resolved(7, at(t, 5), at(t, 30), &shared);
        // One vCPU: blocked whenever thread 7 was.
        assert_eq!(shared.get(Counter::BlocktimeUs), 30_000);
        let b = shared.thread_blocktimes();
        assert_eq!((b[0].blocked_us, b[0].faults), (30_000, 2));
    }

    #[test]
    fn fewer_threads_than_vcpus_never_block_all() {
        let (shared, _fd) = SharedCounters::create("clock").expect("counters");
        let t = Instant::now();
        let mut c = FaultClock::new(4);
        c.fault(1, at(t, 0));
        c.fault(2, at(t, 1));
        c.resolved(1, at(t, 0), at(t, 50), &shared);
        c.resolved(2, at(t, 1), at(t, 50), &shared);
        assert_eq!(shared.get(Counter::BlocktimeUs), 0);
    }

    fn crate_count(shared: &SharedCounters) -> u64 {
        shared.latency_counts().iter().sum()
    }
}
