//! Running totals kept in a memfd the supervisor creates and holds: on the
//! source what its roles have put on the wire, on the destination what the
//! fault-handler received and how the guest's faults went (their count, a
//! latency histogram, the blocktime). Each role adds to its own slots as it
//! goes, so the supervisor can read the figures at any moment: mid-round,
//! after a Quit, and after the role died, when no message from it will ever
//! come; a restarted role adds to the same totals.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::mem::{create_memfd, Access, Mapping, MemError};

const MAGIC: u64 = u64::from_le_bytes(*b"PCCOUNTS");
const HEADER_WORDS: usize = 2;
const H_MAGIC: usize = 0;
const H_SLOTS: usize = 1;

/// One running total. Bytes are frame bytes on the connection (headers
/// included); pages are pages sent as data, zero pages those sent as
/// ZERO frames (no page data).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum Counter {
    /// ram-sender, main stream, while the guest runs (precopy rounds and
    /// the early discard).
    PrecopyBytes,
    PrecopyPages,
    PrecopyZeroPages,
    /// ram-sender, main stream, between the guest's stop and the package
    /// on the wire (last dirty pages or discard set, package, EOS).
    DowntimeBytes,
    DowntimePages,
    DowntimeZeroPages,
    /// ram-sender, main stream, the postcopy background push.
    PushBytes,
    PushPages,
    PushZeroPages,
    /// ram-sender: dirty syncs so far, the arming of tracking at the start
    /// counted as the first (as QEMU counts its first bitmap sync).
    DirtySyncs,
    /// page-server, urgent connection: answers to page requests.
    UrgentBytes,
    UrgentPages,
    UrgentZeroPages,
    /// page-server: page requests read from the return path.
    Requests,
    /// fault-handler: fault events read from the userfaultfd.
    Faults,
    /// fault-handler: faults resolved without a request (the page was
    /// here already, or a zero page never materialised).
    FaultsLocal,
    /// fault-handler: page requests written to the return path.
    FaultRequests,
    /// fault-handler: pages placed in postcopy that came on the urgent
    /// connection, and on the main stream.
    PlacedUrgent,
    PlacedBackground,
    /// fault-handler: frame bytes read on the main stream and the urgent
    /// connection.
    RecvBytes,
    /// fault-handler: sum over faults of their latency (read → page
    /// placed), µs.
    FaultLatencyUs,
    /// fault-handler: QEMU's postcopy blocktime, µs: the time during which
    /// every vCPU (every worker thread of a process guest) was blocked on a
    /// fault at once.
    BlocktimeUs,
}

/// Number of slots in the block.
pub const SLOTS: usize = Counter::BlocktimeUs as usize + 1;

/// Guest threads whose blocktime is kept one by one (the CLI's vCPU limit).
pub const MAX_THREADS: usize = 64;

/// Words of the block: header, counters, the fault latency histogram
/// ([`crate::latency`]), then per thread (tid, blocked µs, faults).
const LATENCY_BASE: usize = HEADER_WORDS + SLOTS;
const THREAD_BASE: usize = LATENCY_BASE + crate::latency::BUCKETS;
const WORDS: usize = THREAD_BASE + 3 * MAX_THREADS;

/// One guest thread's time blocked on faults (QEMU's per-vCPU blocktime).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThreadBlocktime {
    /// Its thread id in the guest process (0: the kernel gave none).
    pub tid: u32,
    /// Time during which it waited for at least one page, µs.
    pub blocked_us: u64,
    /// Its faults that were resolved.
    pub faults: u64,
}

/// Errors mapping a counter block handed over by the supervisor.
#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error("counter block has bad magic {0:#x}")]
    BadMagic(u64),
    #[error("counter block holds {actual} slots, expected {expected}")]
    WrongSize { actual: u64, expected: u64 },
}

/// The source's counter block (see the module docs).
pub struct SharedCounters {
    map: Mapping,
}

impl SharedCounters {
    /// Creates an all-zero block in a fresh memfd (supervisor side).
    pub fn create(name: &str) -> Result<(SharedCounters, OwnedFd), CountersError> {
        let len = WORDS * 8;
        let fd = create_memfd(name, len as u64)?;
        let map = Mapping::new(fd.as_fd(), len, Access::ReadWrite)?;
        let w = map.atomic_words();
        w[H_SLOTS].store(SLOTS as u64, Ordering::Relaxed);
        w[H_MAGIC].store(MAGIC, Ordering::Release);
        Ok((SharedCounters { map }, fd))
    }

    /// Maps a block created by the supervisor (role side).
    pub fn open(fd: BorrowedFd<'_>) -> Result<SharedCounters, CountersError> {
        let map = Mapping::new(fd, WORDS * 8, Access::ReadWrite)?;
        let w = map.atomic_words();
        let magic = w[H_MAGIC].load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(CountersError::BadMagic(magic));
        }
        let actual = w[H_SLOTS].load(Ordering::Relaxed);
        if actual != SLOTS as u64 {
            return Err(CountersError::WrongSize {
                actual,
                expected: SLOTS as u64,
            });
        }
        Ok(SharedCounters { map })
    }

    fn slot(&self, c: Counter) -> &AtomicU64 {
        &self.map.atomic_words()[HEADER_WORDS + c as usize]
    }

    /// Adds `n` to a counter. Totals only grow, and each slot has one
    /// writer, so relaxed ordering is enough: a reader sees each total at
    /// some recent value.
    pub fn add(&self, c: Counter, n: u64) {
        if n != 0 {
            self.slot(c).fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.slot(c).load(Ordering::Relaxed)
    }

    /// Counts one fault latency of `us` µs in the histogram and in
    /// [`Counter::FaultLatencyUs`].
    pub fn record_latency(&self, us: u64) {
        let w = self.map.atomic_words();
        w[LATENCY_BASE + crate::latency::index(us)].fetch_add(1, Ordering::Relaxed);
        self.add(Counter::FaultLatencyUs, us);
    }

    /// The latency histogram's counts array as it is now (see
    /// [`crate::latency::histogram`]).
    pub fn latency_counts(&self) -> Vec<u64> {
        self.map.atomic_words()[LATENCY_BASE..THREAD_BASE]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// Adds `us` of blocked time and `faults` resolved faults to guest
    /// thread `tid`. False when [`MAX_THREADS`] other threads took every
    /// entry (the time is then not kept per thread).
    pub fn add_thread_blocktime(&self, tid: u32, us: u64, faults: u64) -> bool {
        let w = &self.map.atomic_words()[THREAD_BASE..];
        // Entries hold tid + 1, so that 0 marks a free one.
        let key = u64::from(tid) + 1;
        for e in w.chunks_exact(3) {
            let owner = match e[0].compare_exchange(0, key, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => key,
                Err(other) => other,
            };
            if owner == key {
                e[1].fetch_add(us, Ordering::Relaxed);
                e[2].fetch_add(faults, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Every guest thread's blocktime so far, in thread-id order.
    pub fn thread_blocktimes(&self) -> Vec<ThreadBlocktime> {
        let w = &self.map.atomic_words()[THREAD_BASE..];
        let mut v: Vec<ThreadBlocktime> = w
            .chunks_exact(3)
            .filter_map(|e| {
                let key = e[0].load(Ordering::Acquire);
                (key != 0).then(|| ThreadBlocktime {
                    tid: (key - 1) as u32,
                    blocked_us: e[1].load(Ordering::Relaxed),
                    faults: e[2].load(Ordering::Relaxed),
                })
            })
            .collect();
        v.sort_by_key(|t| t.tid);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_role_adds_and_the_supervisor_reads() {
        let (sup, fd) = SharedCounters::create("counters").expect("create");
        let role = SharedCounters::open(fd.as_fd()).expect("open");
        role.add(Counter::PushBytes, 4096);
        role.add(Counter::PushBytes, 8);
        role.add(Counter::Requests, 1);
        assert_eq!(sup.get(Counter::PushBytes), 4104);
        assert_eq!(sup.get(Counter::Requests), 1);
        assert_eq!(sup.get(Counter::PrecopyBytes), 0);
        // The counts outlive the role's mapping.
        drop(role);
        assert_eq!(sup.get(Counter::PushBytes), 4104);
    }

    #[test]
    fn latencies_and_thread_blocktimes_are_shared() {
        let (sup, fd) = SharedCounters::create("counters").expect("create");
        let role = SharedCounters::open(fd.as_fd()).expect("open");
        role.record_latency(40);
        role.record_latency(40);
        role.record_latency(9000);
        let counts = sup.latency_counts();
        assert_eq!(counts.len(), crate::latency::BUCKETS);
        assert_eq!(counts[crate::latency::index(40)], 2);
        assert_eq!(counts.iter().sum::<u64>(), 3);
        assert_eq!(sup.get(Counter::FaultLatencyUs), 9080);
        assert!(role.add_thread_blocktime(7, 100, 1));
        assert!(role.add_thread_blocktime(3, 5, 1));
        assert!(role.add_thread_blocktime(7, 50, 2));
        assert!(role.add_thread_blocktime(0, 1, 1));
        let t = sup.thread_blocktimes();
        let got: Vec<(u32, u64, u64)> = t.iter().map(|t| (t.tid, t.blocked_us, t.faults)).collect();
        assert_eq!(got, vec![(0, 1, 1), (3, 5, 1), (7, 150, 3)]);
        // The table is full after MAX_THREADS threads.
        for tid in 100..100 + MAX_THREADS as u32 - 3 {
            assert!(role.add_thread_blocktime(tid, 1, 1));
        }
        assert!(!role.add_thread_blocktime(9999, 1, 1));
        assert!(role.add_thread_blocktime(7, 1, 1));
    }

    #[test]
    fn a_foreign_memfd_is_refused() {
        let fd = create_memfd("not-counters", (WORDS * 8) as u64).expect("memfd");
        assert!(matches!(
            SharedCounters::open(fd.as_fd()),
            Err(CountersError::BadMagic(0))
        ));
    }
}
