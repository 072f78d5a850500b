//! CPU priority of the threads on a fault's path.
//!
//! A destination vCPU blocked on a missing page waits for four threads:
//! the fault-handler's fault thread (reads the fault, writes the request),
//! the source's page-server (reads it, writes the page), and the
//! fault-handler's urgent reader (reads the page, places it). On a busy
//! host each of them competes for a CPU with the bulk work of the same
//! migration (the push and its placement) and with the guest itself; at
//! the same nice value a woken urgent thread can wait a whole scheduler
//! slice (milliseconds) behind them. These threads run at
//! [`URGENT_NICE`] instead: they sleep almost always, so their weight
//! only decides who runs first when one wakes.
//!
//! Lowering a nice value takes privilege, which a role drops in
//! [`crate::sandbox::enter`] (and this container has no
//! `CAP_SYS_RESOURCE` to raise `RLIMIT_NICE` for later): so a role calls
//! [`make_urgent`] before it, while still root, and the threads it starts
//! later inherit the value. A thread doing bulk work (the fault-handler's
//! main-stream reader) goes back to nice 0 with [`make_bulk`], which needs
//! no privilege. Without root [`make_urgent`] fails with a warning and the
//! migration goes on at nice 0.

/// Nice value of the urgent threads: -10, about 9.3 times the CPU weight
/// of a nice-0 thread (the kernel's `sched_prio_to_weight`: 9548 against
/// 1024).
pub const URGENT_NICE: i32 = -10;

/// Sets the calling thread (only: Linux applies `PRIO_PROCESS` with 0 to
/// the calling thread) to [`URGENT_NICE`]. Threads it starts later inherit
/// it. On failure logs a warning and carries on.
pub fn make_urgent() {
    // SAFETY: setpriority with integer arguments only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, URGENT_NICE) } != 0 {
        log::warn!(
            "cannot set nice {URGENT_NICE} on the {} thread: {}; it runs at the default priority",
            std::thread::current().name().unwrap_or("main"),
            std::io::Error::last_os_error()
        );
    }
}

/// Sets the calling thread back to nice 0 (bulk work: it must not take
/// the CPU from the fault path). Raising a nice value needs no privilege;
/// on failure logs a warning.
pub fn make_bulk() {
    // SAFETY: setpriority with integer arguments only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 0) } != 0 {
        log::warn!(
            "cannot set nice 0 on the {} thread: {}",
            std::thread::current().name().unwrap_or("main"),
            std::io::Error::last_os_error()
        );
    }
}
