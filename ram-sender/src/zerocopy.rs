//! Pages go to the main stream straight from the guest memory mapping: a
//! zero check reads the page in place, and a data run is handed to the
//! kernel with `sendmsg` pointing into the mapping (the frame prefix in
//! the first iovec), so no user-space copy is made on the source. With
//! TLS the record must be sealed in user space: the run is copied into the
//! frame buffer first, as before. Extra bulk streams (`--streams`) get a
//! copy too, in their writer's queue (crate::streams).
//!
//! The guest may write a page while it is checked or sent (precopy): the
//! copy on the wire is then torn or stale, which the dirty log catches and
//! resends, exactly as with a copy into a buffer. In postcopy the source
//! is stopped and nothing changes under us.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use common::mem::Mapping;
use common::tls::SendHalf;
use common::types::PAGE_SIZE;

/// Whether the page at byte `offset` of `mem` is all zero, read in place
/// (64-bit loads that may race with the guest's writes).
pub fn page_is_zero(mem: &Mapping, offset: usize) -> bool {
    let words = &mem.atomic_words()[offset / 8..(offset + PAGE_SIZE) / 8];
    // Eight words at a time: an early exit every 64 bytes.
    words.chunks_exact(8).all(|c| {
        c.iter()
            .fold(0u64, |acc, w| acc | w.load(Ordering::Relaxed))
            == 0
    })
}

/// Writes `prefix` then `len` bytes of `mem` from `offset` to `out`, whole:
/// with plain TCP by `sendmsg` from the mapping (no copy), with TLS through
/// a copy into `scratch` (at least `prefix.len() + len` bytes).
pub fn send_run(
    out: &mut SendHalf,
    prefix: &[u8],
    mem: &Mapping,
    offset: usize,
    len: usize,
    scratch: &mut [u8],
) -> io::Result<()> {
    match out {
        SendHalf::Plain(s) => {
            let data = mem.ptr_at(offset, len);
            let mut sent = 0usize;
            let total = prefix.len() + len;
            while sent < total {
                let mut iov = [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; 2];
                let mut n = 0;
                if sent < prefix.len() {
                    iov[0] = libc::iovec {
                        iov_base: prefix[sent..].as_ptr() as *mut libc::c_void,
                        iov_len: prefix.len() - sent,
                    };
                    n = 1;
                }
                let from = sent.saturating_sub(prefix.len());
                iov[n] = libc::iovec {
                    // SAFETY: `from < len`, inside the range ptr_at checked.
                    iov_base: unsafe { data.add(from) } as *mut libc::c_void,
                    iov_len: len - from,
                };
                n += 1;
                // SAFETY: a zeroed msghdr is valid; only the iovec fields
                // are set.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_mut_ptr();
                msg.msg_iovlen = n;
                // SAFETY: sendmsg reads `n` iovecs, each inside the prefix
                // slice or the mapping (which outlives this call); the
                // kernel only reads them. MSG_NOSIGNAL: a broken link is an
                // EPIPE error, not a signal.
                let r = unsafe { libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
                if r < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                if r == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                sent += r as usize;
            }
            Ok(())
        }
        SendHalf::Tls(_) => {
            let total = prefix.len() + len;
            scratch[..prefix.len()].copy_from_slice(prefix);
            mem.read(offset, &mut scratch[prefix.len()..total]);
            out.write_all(&scratch[..total])
        }
    }
}
