//! The ram-sender's seccomp allow-list, on top of [`common::sandbox::BASE`]
//! (docs/security.md, "Per-role syscalls", is checked against it). It
//! reads guest memory through its read-only mapping, so beyond the base it
//! only writes the main stream, paces itself, and runs the dirty log.

use common::sandbox::{Ioctl, Policy, Syscall};
use common::uffd::requests::UFFDIO_WRITEPROTECT;
use common::{arg_eq, ioctl, syscall};

use crate::pagemap::PAGEMAP_SCAN;

pub static SYSCALLS: &[Syscall] = &[
    syscall!(
        SYS_sendto,
        "pages, round marks, fences, the package and EOS on the main stream and the bulk streams"
    ),
    syscall!(
        SYS_fcntl,
        arg_eq!(1, libc::F_SETFL),
        "ipc-channel's try_recv turns O_NONBLOCK on and off around a peek at the command channel"
    ),
    syscall!(
        SYS_clock_nanosleep,
        "dirty syncs at least 20 ms apart; the bandwidth limit"
    ),
];

pub static IOCTLS: &[Ioctl] = &[
    ioctl!(UFFDIO_WRITEPROTECT, "arms write-protection of guest memory once, before the first round (WP_ASYNC dirty tracking)"),
    ioctl!(PAGEMAP_SCAN, "reads the pages written since the last sync and protects them again (the dirty log)"),
];

pub static POLICY: Policy = Policy {
    role: "ram-sender",
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
