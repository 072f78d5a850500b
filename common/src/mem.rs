//! Guest memory and shared state live in memfds. This module is the one place
//! that creates them, maps them and touches the mappings through raw pointers;
//! everything else copies pages in and out through its safe methods.

use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use std::ffi::CString;
use std::num::NonZeroUsize;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicU8};

use crate::types::{PageIndex, RemoteAddr, PAGE_SIZE};

/// Errors from creating or mapping memfds.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("memfd_create({name}) failed: {source}")]
    Create { name: String, source: nix::Error },
    #[error("could not size memfd {name} to {len} bytes: {source}")]
    Truncate {
        name: String,
        len: u64,
        source: nix::Error,
    },
    #[error("mmap of {len} bytes failed: {source}")]
    Map { len: usize, source: nix::Error },
    #[error("memfd is {actual} bytes, expected {expected}")]
    Size { actual: u64, expected: u64 },
    #[error("could not punch a hole at offset {offset:#x} (+{len:#x}): {source}")]
    PunchHole {
        offset: u64,
        len: u64,
        source: nix::Error,
    },
    #[error("writing guest memory at offset {offset:#x} failed: {source}")]
    Write { offset: u64, source: nix::Error },
    #[error("fstat of a memfd failed: {0}")]
    Stat(nix::Error),
    #[error("could not reopen memfd {path} read-only: {source}")]
    Reopen { path: String, source: nix::Error },
}

/// Creates a memfd of `len` bytes (close-on-exec; sparse until written).
pub fn create_memfd(name: &str, len: u64) -> Result<OwnedFd, MemError> {
    let cname = CString::new(name).expect("memfd names have no NUL");
    let fd = memfd_create(cname.as_c_str(), MFdFlags::MFD_CLOEXEC).map_err(|source| {
        MemError::Create {
            name: name.to_string(),
            source,
        }
    })?;
    nix::unistd::ftruncate(&fd, len as i64).map_err(|source| MemError::Truncate {
        name: name.to_string(),
        len,
        source,
    })?;
    Ok(fd)
}

/// A read-only fd for the same memfd as `fd` (through `/proc/self/fd`),
/// for a process that must only read it: a shared mapping of a read-only
/// fd can never be made writable, not even with `mprotect`, whereas one of
/// a read-write fd can. Opens a file, so call it before the sandbox.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> Result<OwnedFd, MemError> {
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    nix::fcntl::open(
        path.as_str(),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|source| MemError::Reopen { path, source })
}

/// Size of a memfd (or any file) in bytes.
pub fn fd_size(fd: BorrowedFd<'_>) -> Result<u64, MemError> {
    let st = nix::sys::stat::fstat(fd).map_err(MemError::Stat)?;
    Ok(st.st_size as u64)
}

/// Drops the contents of `[offset, offset+len)` of a memfd: the range reads as
/// zeros afterwards and, under userfaultfd missing mode, faults again.
pub fn punch_hole(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<(), MemError> {
    fallocate(
        fd,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        offset as i64,
        len as i64,
    )
    .map_err(|source| MemError::PunchHole {
        offset,
        len,
        source,
    })
}

/// Writes `data` into a memfd at `offset` with pwrite. For whole pages this
/// beats a copy through a mapping: shmem skips zeroing pages that are about
/// to be overwritten, and no page tables are touched.
pub fn write_at(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) -> Result<(), MemError> {
    let mut done = 0usize;
    while done < data.len() {
        match nix::sys::uio::pwrite(fd, &data[done..], (offset + done as u64) as i64) {
            Ok(0) => {
                return Err(MemError::Write {
                    offset: offset + done as u64,
                    source: nix::Error::EIO,
                })
            }
            Ok(n) => done += n,
            Err(nix::Error::EINTR) => {}
            Err(source) => {
                return Err(MemError::Write {
                    offset: offset + done as u64,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// How a mapping may be used.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A shared mapping of a memfd. Unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    access: Access,
}

// SAFETY: the mapping is plain shared memory; every access through `Mapping`
// goes through raw copies or atomics, which are fine from any thread.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` hands out no references to non-atomic memory.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps all `len` bytes of `fd`, shared.
    pub fn new(fd: BorrowedFd<'_>, len: usize, access: Access) -> Result<Self, MemError> {
        let actual = fd_size(fd)?;
        if actual < len as u64 {
            return Err(MemError::Size {
                actual,
                expected: len as u64,
            });
        }
        let prot = match access {
            Access::ReadOnly => ProtFlags::PROT_READ,
            Access::ReadWrite => ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
        };
        let nz = NonZeroUsize::new(len).ok_or(MemError::Size {
            actual,
            expected: 0,
        })?;
        // SAFETY: a fresh shared mapping of a file we hold; no address hint,
        // so it cannot overlap anything that exists.
        let ptr = unsafe { mmap(None, nz, prot, MapFlags::MAP_SHARED, fd, 0) }
            .map_err(|source| MemError::Map { len, source })?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
            access,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where this mapping sits in this process: what the guest tells the
    /// roles so they can name its pages to userfaultfd and pagemap.
    pub fn remote_addr(&self) -> RemoteAddr {
        RemoteAddr(self.ptr.as_ptr() as u64)
    }

    /// Host virtual address of the mapping, for KVM_SET_USER_MEMORY_REGION.
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "access [{offset:#x}, +{len:#x}) outside a mapping of {:#x} bytes",
            self.len
        );
    }

    /// Copies `out.len()` bytes starting at `offset` out of the mapping. The
    /// other side may be writing concurrently; the copy is then torn, which
    /// dirty tracking catches and resends.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        self.check(offset, out.len());
        // SAFETY: the range is inside the mapping (checked above) and `out`
        // is a distinct local buffer, so they do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                out.as_mut_ptr(),
                out.len(),
            )
        }
    }

    /// A raw pointer to `len` bytes at `offset`, for the kernel to read
    /// (sendmsg from the mapping); panics if the range is outside. Never
    /// make a Rust reference of it: other processes write this memory.
    pub fn ptr_at(&self, offset: usize, len: usize) -> *const u8 {
        self.check(offset, len);
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// Copies one page out.
    pub fn read_page(&self, page: PageIndex, out: &mut [u8]) {
        debug_assert_eq!(out.len(), PAGE_SIZE);
        self.read(page.offset().0 as usize, out)
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) {
        assert_eq!(
            self.access,
            Access::ReadWrite,
            "write to a read-only mapping"
        );
        self.check(offset, data.len());
        // SAFETY: the range is inside a writable mapping (checked above) and
        // `data` is a distinct buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        }
    }

    /// The mapping as bytes that may change under us (other processes write
    /// it): reads and writes go through atomics.
    pub fn atomic_bytes(&self) -> &[AtomicU8] {
        // SAFETY: the mapping is valid for `len` bytes for as long as `self`
        // lives, and AtomicU8 has the size and alignment of u8.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) }
    }

    /// The mapping as 64-bit words that may change under us.
    pub fn atomic_words(&self) -> &[AtomicU64] {
        // SAFETY: mmap returns page-aligned memory, so it is aligned for
        // AtomicU64; the slice stops before the end of the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU64>(), self.len / 8) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; nothing borrowed from it outlives self.
        if let Err(e) = unsafe { munmap(self.ptr.cast(), self.len) } {
            log::warn!("munmap of {} bytes failed: {e}", self.len);
        }
    }
}

/// True if every byte of `page` is zero.
pub fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn map_write_read_and_punch() {
        let fd = create_memfd("test", 4 * PAGE_SIZE as u64).unwrap();
        let rw = Mapping::new(fd.as_fd(), 4 * PAGE_SIZE, Access::ReadWrite).unwrap();
        let ro = Mapping::new(fd.as_fd(), 4 * PAGE_SIZE, Access::ReadOnly).unwrap();
        rw.write(PAGE_SIZE, &[7u8; PAGE_SIZE]);
        let mut out = vec![0u8; PAGE_SIZE];
        ro.read(PAGE_SIZE, &mut out);
        assert!(out.iter().all(|&b| b == 7));
        assert!(!is_zero(&out));
        punch_hole(fd.as_fd(), PAGE_SIZE as u64, PAGE_SIZE as u64).unwrap();
        ro.read(PAGE_SIZE, &mut out);
        assert!(is_zero(&out));
    }

    #[test]
    #[should_panic(expected = "outside a mapping")]
    fn out_of_bounds_read_panics() {
        let fd = create_memfd("test", PAGE_SIZE as u64).unwrap();
        let ro = Mapping::new(fd.as_fd(), PAGE_SIZE, Access::ReadOnly).unwrap();
        let mut out = vec![0u8; 8];
        ro.read(PAGE_SIZE - 4, &mut out);
    }

    #[test]
    fn mapping_larger_than_file_is_refused() {
        let fd = create_memfd("test", PAGE_SIZE as u64).unwrap();
        assert!(matches!(
            Mapping::new(fd.as_fd(), 2 * PAGE_SIZE, Access::ReadOnly),
            Err(MemError::Size { .. })
        ));
    }
}
