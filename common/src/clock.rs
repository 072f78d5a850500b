//! The one clock every process on a host shares: `CLOCK_MONOTONIC`, in
//! nanoseconds. Stamps taken with it in different processes of one host (and
//! in different network namespaces of one kernel) can be subtracted, which is
//! what the fault-path breakdown relies on (docs/protocol.md, PAGE_TIMES).

/// Now on `CLOCK_MONOTONIC`, ns since an arbitrary point fixed at boot.
/// Served by the vDSO where the clock source allows it (no syscall).
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own; CLOCK_MONOTONIC
    // always exists on Linux, so it cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    #[test]
    fn it_moves_forward() {
        let a = super::monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = super::monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} then {b}");
    }
}
