//! What a guest is, as the supervisor describes it to the guest process and to
//! the peer supervisor: kind, memory size, vCPUs, workload. The guest crate
//! runs it; the supervisor verifies memory against it.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::types::{PAGE_SHIFT, PAGE_SIZE};

/// Which built-in guest runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestKind {
    /// Worker threads on a memfd mapping.
    Process,
    /// A KVM micro-VM run by the project's own VMM.
    Kvm,
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestKind::Process => "process",
            GuestKind::Kvm => "kvm",
        })
    }
}

/// Parameters of the `random` workload.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RandomParams {
    /// Pages in the hot set (at the start of each worker's slice).
    pub hot_pages: u64,
    /// Percent of writes that land in the hot set.
    pub hot_percent: u32,
    /// Writes per second per worker; 0 = as fast as it can.
    pub write_rate: u64,
    /// Seed of the per-worker generators.
    pub seed: u64,
}

/// What the guest does with its memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Workload {
    /// Zero the first byte of every page, then increment the first byte of
    /// every page in ascending order, forever (QEMU's migration-test pattern).
    Ab,
    /// Writes at random pages.
    Random(RandomParams),
    /// Fills memory with a pattern, then touches nothing.
    Idle,
    /// A KVM guest running a boot sector given by the user.
    BootSector,
    /// A KVM guest booting Linux, whose `/init` stamps and audits its memory.
    Linux(LinuxSpec),
}

/// What a Linux guest boots. The files are read by the source's guest
/// process only; the destination gets the guest's memory and state, never
/// the files, and does not open these paths.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinuxSpec {
    /// bzImage path on the source host.
    pub kernel: String,
    /// Initramfs path on the source host.
    pub initrd: Option<String>,
    /// The whole kernel command line.
    pub cmdline: String,
}

/// Longest kernel command line or path a Linux guest spec may carry, bytes
/// (x86's COMMAND_LINE_SIZE is 2048; PATH_MAX is 4096).
pub const LINUX_SPEC_MAX_TEXT: usize = 4096;

/// Smallest memory the Linux guest is offered in: Debian's kernel
/// decompresses itself at 16 MiB into about 60 MiB, then needs room for the
/// initramfs and its workload.
pub const LINUX_MIN_MEM: u64 = 128 << 20;

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::Ab => "ab",
            Workload::Random(_) => "random",
            Workload::Idle => "idle",
            Workload::BootSector => "boot-sector",
            Workload::Linux(_) => "linux",
        }
    }
}

/// Start of the range the built-in KVM workload cycles over.
pub const KVM_AB_START: u64 = 1 << 20;
/// Smallest memory a KVM guest can boot in: the sector sits at 0x7c00.
pub const KVM_MIN_MEM: u64 = 0x8000;
/// Largest memory the KVM guest supports: it runs in 32-bit protected mode and
/// the top of the 4 GiB space holds the local APIC and IOAPIC.
pub const KVM_MAX_MEM: u64 = 3 << 30;

/// The whole description of a guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestConfig {
    pub kind: GuestKind,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub workload: Workload,
    /// KVM: a 512-byte boot sector; None runs the built-in workload sector.
    #[serde(with = "serde_bytes")]
    pub boot_sector: Option<Vec<u8>>,
}

impl GuestConfig {
    /// Byte ranges over which the `ab` rule holds: for a process guest one
    /// slice per worker; for the built-in KVM sector, 1 MiB to the top.
    pub fn ab_ranges(&self) -> Vec<(u64, u64)> {
        match self.kind {
            GuestKind::Process => {
                let pages = self.mem_bytes >> PAGE_SHIFT;
                (0..self.vcpus)
                    .map(|i| {
                        let (first, count) = worker_slice(pages, self.vcpus, i);
                        (first << PAGE_SHIFT, (first + count) << PAGE_SHIFT)
                    })
                    .filter(|(a, b)| a < b)
                    .collect()
            }
            GuestKind::Kvm => vec![(KVM_AB_START, self.mem_bytes)],
        }
    }
}

/// The pages worker `i` of `workers` owns: `(first page, count)`. Slices are
/// contiguous and differ in size by at most one page.
pub fn worker_slice(pages: u64, workers: u32, i: u32) -> (u64, u64) {
    let n = u64::from(workers.max(1));
    let i = u64::from(i);
    let base = pages / n;
    let extra = pages % n;
    let first = i * base + i.min(extra);
    let count = base + u64::from(i < extra);
    (first, count)
}

/// Checks the `ab` rule over `[start, end)` of `mem`: every page's first byte
/// equals the previous page's, except at most one place where it is one less
/// (mod 256). Returns the pages (byte offsets / 4096) that break it.
pub fn ab_violations(first_bytes: impl Iterator<Item = (u64, u8)>) -> AbCheck {
    let mut check = AbCheck::default();
    let mut prev: Option<u8> = None;
    let mut steps = 0u64;
    for (page, b) in first_bytes {
        check.pages_checked += 1;
        if let Some(p) = prev {
            if b == p {
                // fine
            } else if b == p.wrapping_sub(1) && steps == 0 {
                steps += 1;
            } else {
                check.bad_pages.push(page);
            }
        }
        prev = Some(b);
    }
    check
}

/// Result of an `ab` check over one range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AbCheck {
    pub pages_checked: u64,
    /// Pages whose first byte breaks the rule.
    pub bad_pages: Vec<u64>,
}

/// Page size the guests use.
pub const GUEST_PAGE_SIZE: usize = PAGE_SIZE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_memory_once() {
        for (pages, workers) in [(10u64, 3u32), (7, 7), (3, 5), (262144, 2)] {
            let mut next = 0;
            for i in 0..workers {
                let (first, count) = worker_slice(pages, workers, i);
                assert_eq!(first, next);
                next = first + count;
            }
            assert_eq!(next, pages);
        }
    }

    fn check(bytes: &[u8]) -> AbCheck {
        ab_violations(bytes.iter().enumerate().map(|(i, &b)| (i as u64, b)))
    }

    #[test]
    fn ab_rule() {
        assert!(check(&[5, 5, 5, 5]).bad_pages.is_empty());
        assert!(check(&[6, 6, 5, 5]).bad_pages.is_empty());
        assert!(check(&[0, 0, 255, 255]).bad_pages.is_empty());
        // Two boundaries: a stale page in the middle.
        assert_eq!(check(&[6, 5, 5, 4, 4]).bad_pages, vec![3]);
        // A page from the future.
        assert_eq!(check(&[5, 5, 6, 6]).bad_pages, vec![2]);
        // A page that is two passes behind.
        assert_eq!(check(&[7, 7, 5, 7]).bad_pages, vec![2, 3]);
        assert_eq!(check(&[1, 2, 3]).pages_checked, 3);
    }
}
