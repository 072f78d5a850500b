//! The fault-handler's seccomp allow-list, on top of
//! [`common::sandbox::BASE`] (docs/security.md, "Per-role syscalls", is
//! checked against it). It never maps guest memory: pages go in with
//! pwrite (precopy) or through the userfaultfd (postcopy).

use common::sandbox::{Ioctl, Policy, Syscall};
use common::uffd::requests::{UFFDIO_COPY, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_ZEROPAGE};
use common::{arg_eq, ioctl, syscall};

/// fallocate mode of a discard: punch a hole, keep the size.
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// setpriority's `who` for the calling thread.
const SELF: i32 = 0;

pub static SYSCALLS: &[Syscall] = &[
    syscall!(
        SYS_recvfrom,
        "pages from the main stream, the bulk streams and the urgent connection"
    ),
    syscall!(
        SYS_sendto,
        "page requests and PostcopyDone on the return path"
    ),
    syscall!(SYS_pwrite64, "precopy pages into the memfd"),
    syscall!(
        SYS_fallocate,
        arg_eq!(1, PUNCH_HOLE),
        "discarded pages and stale zero pages leave the memfd (hole punching only)"
    ),
    syscall!(SYS_read, "fault events from the userfaultfd"),
    syscall!(
        SYS_poll,
        "waits for faults with a timeout, so it sees completion"
    ),
    syscall!(
        SYS_setpriority,
        arg_eq!(1, SELF),
        "the main-stream reader drops back to nice 0 from the -10 it inherits (RLIMIT_NICE 0: lowering a priority is all it can do)"
    ),
    syscall!(
        SYS_getrandom,
        "std's HashMap seeds its hasher (the table of waiting faults)"
    ),
];

pub static IOCTLS: &[Ioctl] = &[
    ioctl!(UFFDIO_COPY, "places a page atomically and wakes the threads waiting on it"),
    ioctl!(UFFDIO_ZEROPAGE, "places a zero page atomically"),
    ioctl!(UFFDIO_WAKE, "wakes threads that faulted on a page already placed"),
    ioctl!(UFFDIO_UNREGISTER, "at completion, every page is in: guest memory leaves the userfaultfd, so no fault can reach a handler that is about to exit"),
];

pub static POLICY: Policy = Policy {
    role: "fault-handler",
    syscalls: SYSCALLS,
    ioctls: IOCTLS,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_compiles() {
        common::sandbox::compile(&POLICY).unwrap();
    }

    #[test]
    fn docs_hold_this_list() {
        let doc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/security.md");
        common::sandbox::check_doc(&doc, POLICY.role, &common::sandbox::table(SYSCALLS, IOCTLS))
            .unwrap();
    }
}
