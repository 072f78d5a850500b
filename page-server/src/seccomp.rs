//! The page-server's seccomp allow-list, on top of
//! [`common::sandbox::BASE`] (docs/security.md, "Per-role syscalls", is
//! checked against it). It reads guest memory through its read-only
//! mapping: beyond the base it only reads requests and writes pages.

use common::sandbox::{Ioctl, Policy, Syscall};
use common::syscall;

pub static SYSCALLS: &[Syscall] = &[
    syscall!(
        SYS_recvfrom,
        "page requests and PostcopyDone from the return path"
    ),
    syscall!(SYS_sendto, "requested pages on the urgent connection"),
];

pub static IOCTLS: &[Ioctl] = &[];

pub static POLICY: Policy = Policy {
    role: "page-server",
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
