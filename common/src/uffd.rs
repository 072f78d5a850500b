//! A small safe wrapper over userfaultfd. The guest creates one for its own
//! address space; the supervisor keeps a dup; ram-sender and fault-handler
//! issue ioctls on it from their own processes (the ioctls act on the
//! creator's address space, named by [`RemoteAddr`]).
//!
//! The `userfaultfd` crate was left out on purpose: it lacks WP_ASYNC and the
//! newer feature bits and its -sys crate needs libclang at build time.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use crate::types::{RemoteAddr, PAGE_SIZE};

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;

/// Feature bits from linux/userfaultfd.h.
pub mod features {
    pub const PAGEFAULT_FLAG_WP: u64 = 1 << 0;
    pub const MISSING_SHMEM: u64 = 1 << 5;
    pub const THREAD_ID: u64 = 1 << 8;
    pub const MINOR_SHMEM: u64 = 1 << 10;
    pub const WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
    pub const WP_UNPOPULATED: u64 = 1 << 13;
    pub const WP_ASYNC: u64 = 1 << 15;

    /// Names of the bits we care about, for error messages.
    pub fn names(bits: u64) -> String {
        let table = [
            (PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP"),
            (MISSING_SHMEM, "MISSING_SHMEM"),
            (THREAD_ID, "THREAD_ID"),
            (MINOR_SHMEM, "MINOR_SHMEM"),
            (WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM"),
            (WP_UNPOPULATED, "WP_UNPOPULATED"),
            (WP_ASYNC, "WP_ASYNC"),
        ];
        let named: Vec<&str> = table
            .iter()
            .filter(|(b, _)| bits & b != 0)
            .map(|(_, n)| *n)
            .collect();
        if named.is_empty() {
            format!("{bits:#x}")
        } else {
            named.join("|")
        }
    }
}

/// Features a migration source needs for dirty tracking of a memfd mapping.
pub const DIRTY_TRACKING_FEATURES: u64 =
    features::WP_ASYNC | features::WP_HUGETLBFS_SHMEM | features::PAGEFAULT_FLAG_WP;
/// Features a postcopy destination needs to fault in a memfd mapping.
pub const POSTCOPY_FEATURES: u64 = features::MISSING_SHMEM | features::THREAD_ID;

const REGISTER_MODE_MISSING: u64 = 1;
const REGISTER_MODE_WP: u64 = 2;
const COPY_MODE_DONTWAKE: u64 = 1;
const WRITEPROTECT_MODE_WP: u64 = 1;
const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Copy, Clone)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

nix::ioctl_readwrite!(ioctl_api, 0xAA, 0x3F, UffdioApi);
nix::ioctl_readwrite!(ioctl_register, 0xAA, 0x00, UffdioRegister);
nix::ioctl_read!(ioctl_unregister, 0xAA, 0x01, UffdioRange);
nix::ioctl_read!(ioctl_wake, 0xAA, 0x02, UffdioRange);
nix::ioctl_readwrite!(ioctl_copy, 0xAA, 0x03, UffdioCopy);
nix::ioctl_readwrite!(ioctl_zeropage, 0xAA, 0x04, UffdioZeropage);
nix::ioctl_readwrite!(ioctl_writeprotect, 0xAA, 0x06, UffdioWriteprotect);

/// The request numbers of the ioctls above, for the roles' seccomp lists.
pub mod requests {
    use super::*;
    use std::mem::size_of;

    pub const UFFDIO_UNREGISTER: u64 =
        nix::request_code_read!(0xAA, 0x01, size_of::<UffdioRange>()) as u64;
    pub const UFFDIO_WAKE: u64 =
        nix::request_code_read!(0xAA, 0x02, size_of::<UffdioRange>()) as u64;
    pub const UFFDIO_COPY: u64 =
        nix::request_code_readwrite!(0xAA, 0x03, size_of::<UffdioCopy>()) as u64;
    pub const UFFDIO_ZEROPAGE: u64 =
        nix::request_code_readwrite!(0xAA, 0x04, size_of::<UffdioZeropage>()) as u64;
    pub const UFFDIO_WRITEPROTECT: u64 =
        nix::request_code_readwrite!(0xAA, 0x06, size_of::<UffdioWriteprotect>()) as u64;

    // The numbers linux/userfaultfd.h gives on x86-64.
    #[cfg(target_arch = "x86_64")]
    const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
    #[cfg(target_arch = "x86_64")]
    const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
    #[cfg(target_arch = "x86_64")]
    const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
    #[cfg(target_arch = "x86_64")]
    const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
    #[cfg(target_arch = "x86_64")]
    const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
}

/// What can go wrong with a userfaultfd.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("userfaultfd() failed: {0} (kernel-mode faults need root or CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd=1)")]
    Create(io::Error),
    #[error("UFFDIO_API failed: {0}")]
    Api(io::Error),
    #[error("this kernel's userfaultfd lacks {missing} (has {have:#x}, needs {need:#x})")]
    MissingFeatures {
        missing: String,
        have: u64,
        need: u64,
    },
    #[error("UFFDIO_REGISTER of {start} (+{len:#x}) failed: {source}")]
    Register {
        start: RemoteAddr,
        len: u64,
        source: io::Error,
    },
    #[error("UFFDIO_UNREGISTER of {start} (+{len:#x}) failed: {source}")]
    Unregister {
        start: RemoteAddr,
        len: u64,
        source: io::Error,
    },
    #[error("UFFDIO_WRITEPROTECT of {start} (+{len:#x}) failed: {source}")]
    WriteProtect {
        start: RemoteAddr,
        len: u64,
        source: io::Error,
    },
    #[error("UFFDIO_COPY to {dst} (+{len:#x}) failed: {source}")]
    Copy {
        dst: RemoteAddr,
        len: u64,
        source: io::Error,
    },
    #[error("UFFDIO_ZEROPAGE at {dst} (+{len:#x}) failed: {source}")]
    Zeropage {
        dst: RemoteAddr,
        len: u64,
        source: io::Error,
    },
    #[error("UFFDIO_WAKE of {start} (+{len:#x}) failed: {source}")]
    Wake {
        start: RemoteAddr,
        len: u64,
        source: io::Error,
    },
    #[error("reading userfaultfd events failed: {0}")]
    Read(io::Error),
}

/// A page fault read from the userfaultfd.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address in the guest process (page aligned).
    pub addr: RemoteAddr,
    pub write: bool,
    /// Thread id of the faulting thread (0 without THREAD_ID).
    pub tid: u32,
}

/// Result of placing pages.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    /// All bytes placed; waiting threads were woken.
    Done,
    /// Something was already there after `placed` bytes (EEXIST).
    Exists { placed: u64 },
}

/// A userfaultfd, with the address space of the process that created it.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// Creates a userfaultfd for this process's address space, non-blocking.
    /// `kernel_faults` must be true for KVM guests (and is what postcopy
    /// needs anyway: a user-mode-only uffd makes KVM_RUN fail).
    pub fn create(kernel_faults: bool) -> Result<Uffd, UffdError> {
        let mut flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        if !kernel_faults {
            flags |= UFFD_USER_MODE_ONLY;
        }
        // SAFETY: userfaultfd takes only flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return Err(UffdError::Create(last_err()));
        }
        // SAFETY: the syscall just returned this fd and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Uffd { fd })
    }

    /// Wraps a userfaultfd received from another process (already through
    /// UFFDIO_API).
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd { fd }
    }

    /// Which features this kernel offers, probed on a throwaway uffd.
    pub fn probe_features(kernel_faults: bool) -> Result<u64, UffdError> {
        let u = Uffd::create(kernel_faults)?;
        u.api(0)
    }

    /// Creates a uffd and enables `need`; fails naming the missing bits.
    pub fn with_features(kernel_faults: bool, need: u64) -> Result<Uffd, UffdError> {
        let have = Uffd::probe_features(kernel_faults)?;
        if have & need != need {
            return Err(UffdError::MissingFeatures {
                missing: features::names(need & !have),
                have,
                need,
            });
        }
        let u = Uffd::create(kernel_faults)?;
        u.api(need)?;
        Ok(u)
    }

    fn api(&self, features: u64) -> Result<u64, UffdError> {
        let mut arg = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes a UffdioApi we own.
        unsafe { ioctl_api(self.fd.as_raw_fd(), &mut arg) }
            .map_err(|e| UffdError::Api(e.into()))?;
        Ok(arg.features)
    }

    /// Registers `[start, start+len)` for missing faults.
    pub fn register_missing(&self, start: RemoteAddr, len: u64) -> Result<(), UffdError> {
        self.register(start, len, REGISTER_MODE_MISSING)
    }

    /// Registers `[start, start+len)` for write-protect tracking.
    pub fn register_wp(&self, start: RemoteAddr, len: u64) -> Result<(), UffdError> {
        self.register(start, len, REGISTER_MODE_WP)
    }

    fn register(&self, start: RemoteAddr, len: u64, mode: u64) -> Result<(), UffdError> {
        let mut arg = UffdioRegister {
            range: UffdioRange {
                start: start.0,
                len,
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes a UffdioRegister we own;
        // the kernel checks the range against the creator's address space.
        unsafe { ioctl_register(self.fd.as_raw_fd(), &mut arg) }.map_err(|e| {
            UffdError::Register {
                start,
                len,
                source: e.into(),
            }
        })?;
        Ok(())
    }

    pub fn unregister(&self, start: RemoteAddr, len: u64) -> Result<(), UffdError> {
        let mut arg = UffdioRange {
            start: start.0,
            len,
        };
        // SAFETY: UFFDIO_UNREGISTER reads a UffdioRange we own.
        unsafe { ioctl_unregister(self.fd.as_raw_fd(), &mut arg) }.map_err(|e| {
            UffdError::Unregister {
                start,
                len,
                source: e.into(),
            }
        })?;
        Ok(())
    }

    /// Sets (or clears) write protection on a range registered in WP mode.
    pub fn write_protect(
        &self,
        start: RemoteAddr,
        len: u64,
        protect: bool,
    ) -> Result<(), UffdError> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange {
                start: start.0,
                len,
            },
            mode: if protect { WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads a UffdioWriteprotect we own.
        unsafe { ioctl_writeprotect(self.fd.as_raw_fd(), &mut arg) }.map_err(|e| {
            UffdError::WriteProtect {
                start,
                len,
                source: e.into(),
            }
        })?;
        Ok(())
    }

    /// Atomically places `src` (whole pages) at `dst` and wakes the threads
    /// waiting on it. Stops at the first page that already exists.
    pub fn copy(&self, dst: RemoteAddr, src: &[u8], wake: bool) -> Result<Placed, UffdError> {
        debug_assert_eq!(src.len() % PAGE_SIZE, 0);
        let len = src.len() as u64;
        let mut done = 0u64;
        while done < len {
            let mut arg = UffdioCopy {
                dst: dst.0 + done,
                src: src.as_ptr() as u64 + done,
                len: len - done,
                mode: if wake { 0 } else { COPY_MODE_DONTWAKE },
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len - done` bytes from `src`, which
            // is a live slice of at least that many bytes past `done`, and
            // writes only into the uffd owner's registered range.
            let r = unsafe { ioctl_copy(self.fd.as_raw_fd(), &mut arg) };
            if arg.copy > 0 {
                done += arg.copy as u64;
            }
            match r {
                Ok(_) => {}
                Err(nix::Error::EAGAIN) => continue,
                Err(nix::Error::EEXIST) => return Ok(Placed::Exists { placed: done }),
                Err(e) => {
                    return Err(UffdError::Copy {
                        dst: RemoteAddr(dst.0 + done),
                        len: len - done,
                        source: e.into(),
                    })
                }
            }
        }
        Ok(Placed::Done)
    }

    /// Places zero pages at `[dst, dst+len)` and wakes waiters.
    pub fn zeropage(&self, dst: RemoteAddr, len: u64) -> Result<Placed, UffdError> {
        let mut done = 0u64;
        while done < len {
            let mut arg = UffdioZeropage {
                range: UffdioRange {
                    start: dst.0 + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads and writes a struct we own and
            // only fills the uffd owner's registered range.
            let r = unsafe { ioctl_zeropage(self.fd.as_raw_fd(), &mut arg) };
            if arg.zeropage > 0 {
                done += arg.zeropage as u64;
            }
            match r {
                Ok(_) => {}
                Err(nix::Error::EAGAIN) => continue,
                Err(nix::Error::EEXIST) => return Ok(Placed::Exists { placed: done }),
                Err(e) => {
                    return Err(UffdError::Zeropage {
                        dst: RemoteAddr(dst.0 + done),
                        len: len - done,
                        source: e.into(),
                    })
                }
            }
        }
        Ok(Placed::Done)
    }

    /// Wakes threads waiting on faults in `[start, start+len)`; they retry
    /// the access (and fault again if the page is still missing).
    pub fn wake(&self, start: RemoteAddr, len: u64) -> Result<(), UffdError> {
        let mut arg = UffdioRange {
            start: start.0,
            len,
        };
        // SAFETY: UFFDIO_WAKE reads a UffdioRange we own.
        unsafe { ioctl_wake(self.fd.as_raw_fd(), &mut arg) }.map_err(|e| UffdError::Wake {
            start,
            len,
            source: e.into(),
        })?;
        Ok(())
    }

    /// Reads pending page-fault events without blocking; returns how many
    /// were appended to `out` (0 when none are pending).
    pub fn read_faults(&self, out: &mut Vec<Fault>) -> Result<usize, UffdError> {
        const MSG: usize = 32;
        let mut buf = [0u8; MSG * 64];
        // SAFETY: read into a local buffer of exactly buf.len() bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = last_err();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(0),
                _ => Err(UffdError::Read(e)),
            };
        }
        let mut count = 0;
        for msg in buf[..n as usize].chunks_exact(MSG) {
            if msg[0] != EVENT_PAGEFAULT {
                log::warn!("ignoring userfaultfd event {:#x}", msg[0]);
                continue;
            }
            let flags = u64::from_ne_bytes(msg[8..16].try_into().expect("8"));
            let addr = u64::from_ne_bytes(msg[16..24].try_into().expect("8"));
            let tid = u32::from_ne_bytes(msg[24..28].try_into().expect("4"));
            out.push(Fault {
                addr: RemoteAddr(addr & !(PAGE_SIZE as u64 - 1)),
                write: flags & PAGEFAULT_FLAG_WRITE != 0,
                tid,
            });
            count += 1;
        }
        Ok(count)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}
