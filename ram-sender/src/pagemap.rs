//! Dirty tracking through PAGEMAP_SCAN (Linux 6.7+) on the guest's pagemap fd.
//! The guest registered its memory with a WP_ASYNC userfaultfd: a write to a
//! protected page just clears the protection. A scan with WP_MATCHING reports
//! the pages written since the last scan and protects them again, atomically
//! per page, so no write between two scans is lost.

use std::os::fd::{AsRawFd, OwnedFd};

use common::bitmap::Bitmap;
use common::types::{RemoteAddr, PAGE_SHIFT};

const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Copy, Clone, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);

/// The PAGEMAP_SCAN request number, for the seccomp list.
pub const PAGEMAP_SCAN: u64 =
    nix::request_code_readwrite!(b'f', 16, std::mem::size_of::<PmScanArg>()) as u64;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("PAGEMAP_SCAN is not supported by this kernel (needs Linux 6.7+): {0}")]
    Unsupported(nix::Error),
    #[error("PAGEMAP_SCAN of {start} (+{len:#x}) failed: {source}")]
    Failed {
        start: RemoteAddr,
        len: u64,
        source: nix::Error,
    },
    #[error("PAGEMAP_SCAN reported a region {start:#x}..{end:#x} outside the guest mapping")]
    OutOfRange { start: u64, end: u64 },
}

/// The guest's `/proc/<pid>/pagemap`, scanned from this process.
pub struct Pagemap {
    fd: OwnedFd,
    regions: Vec<PageRegion>,
}

impl Pagemap {
    pub fn new(fd: OwnedFd) -> Self {
        Pagemap {
            fd,
            regions: vec![PageRegion::default(); 4096],
        }
    }

    /// Marks in `dirty` every page of `[base, base+len)` written since the
    /// last scan (or the initial write-protect) and, with `rearm`,
    /// write-protects them again. The last scan, with the guest stopped,
    /// skips the re-protection: it is most of the cost when all is dirty.
    /// Returns how many pages it found.
    pub fn collect_written(
        &mut self,
        base: RemoteAddr,
        len: u64,
        dirty: &mut Bitmap,
        rearm: bool,
    ) -> Result<u64, ScanError> {
        let end = base.0 + len;
        let mut cur = base.0;
        let mut found = 0u64;
        while cur < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: if rearm {
                    PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
                } else {
                    PM_SCAN_CHECK_WPASYNC
                },
                start: cur,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: PAGE_IS_WRITTEN,
                category_anyof_mask: 0,
                return_mask: PAGE_IS_WRITTEN,
            };
            // SAFETY: the kernel reads `arg` and writes at most `vec_len`
            // PageRegions into `self.regions`, which holds that many.
            let n = match unsafe { pagemap_scan(self.fd.as_raw_fd(), &mut arg) } {
                Ok(n) => n as usize,
                Err(e @ (nix::Error::ENOTTY | nix::Error::EINVAL))
                    if cur == base.0 && found == 0 =>
                {
                    return Err(ScanError::Unsupported(e))
                }
                Err(source) => {
                    return Err(ScanError::Failed {
                        start: RemoteAddr(cur),
                        len: end - cur,
                        source,
                    })
                }
            };
            for r in &self.regions[..n] {
                if r.start < base.0 || r.end > end || r.start >= r.end {
                    return Err(ScanError::OutOfRange {
                        start: r.start,
                        end: r.end,
                    });
                }
                let first = (r.start - base.0) >> PAGE_SHIFT;
                let count = (r.end - r.start) >> PAGE_SHIFT;
                dirty.set_range(first, count);
                found += count;
            }
            if arg.walk_end <= cur {
                break;
            }
            cur = arg.walk_end;
        }
        Ok(found)
    }
}
