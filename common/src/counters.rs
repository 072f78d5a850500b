//! Running totals of what the source's roles have put on the wire, kept in a
//! memfd the supervisor creates and holds. Each role adds to its own slots as
//! it writes, so the supervisor can read what actually went out at any
//! moment: mid-round, after a Quit, and after the role died, when no
//! message from it will ever come.

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
}

/// Number of slots in the block.
pub const SLOTS: usize = Counter::Requests as usize + 1;

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
        let len = (HEADER_WORDS + SLOTS) * 8;
        let fd = create_memfd(name, len as u64)?;
        let map = Mapping::new(fd.as_fd(), len, Access::ReadWrite)?;
        let w = map.atomic_words();
        w[H_SLOTS].store(SLOTS as u64, Ordering::Relaxed);
        w[H_MAGIC].store(MAGIC, Ordering::Release);
        Ok((SharedCounters { map }, fd))
    }

    /// Maps a block created by the supervisor (role side).
    pub fn open(fd: BorrowedFd<'_>) -> Result<SharedCounters, CountersError> {
        let map = Mapping::new(fd, (HEADER_WORDS + SLOTS) * 8, Access::ReadWrite)?;
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
    fn a_foreign_memfd_is_refused() {
        let fd = create_memfd("not-counters", ((HEADER_WORDS + SLOTS) * 8) as u64).expect("memfd");
        assert!(matches!(
            SharedCounters::open(fd.as_fd()),
            Err(CountersError::BadMagic(0))
        ));
    }
}
