//! One thread per vCPU running KVM_RUN, and the kick that gets it out.
//!
//! Stopping follows the kernel's documented recipe (Documentation/virt/kvm/
//! api.rst, `immediate_exit`): the stopper sets a flag, then sends the vCPU
//! thread [`kick_signal`]. The handler sets `immediate_exit` in that thread's
//! `kvm_run`, so a KVM_RUN that is about to start returns EINTR at once, and
//! one already running (even halted, or an AP waiting for SIPI) is
//! interrupted by the signal itself. Before the thread gives its vCPU back it
//! enters KVM_RUN once more with `immediate_exit` set: that completes an I/O
//! exit it just handled, so the saved registers are those after the
//! instruction, never in the middle of it.

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::devices::Devices;

/// What the vCPU threads and the controlling thread share.
#[derive(Debug)]
pub struct Shared {
    /// Set by `stop()` before it kicks; cleared by `run()` before it spawns.
    pub stop: AtomicBool,
    pub devices: Devices,
    /// The first vCPU failure; later ones are only logged.
    pub failure: Mutex<Option<VcpuFailure>>,
}

impl Shared {
    pub fn record_failure(&self, failure: VcpuFailure) {
        log::error!("{failure}");
        let mut slot = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(failure);
        }
    }

    pub fn failure(&self) -> Option<VcpuFailure> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Why a vCPU stopped on its own: the guest crashed it or KVM refused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuFailure {
    pub cpu: u32,
    pub reason: String,
}

impl fmt::Display for VcpuFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vCPU {} stopped: {}", self.cpu, self.reason)
    }
}

/// Offset of the kick signal from SIGRTMIN. glibc keeps the signals below
/// SIGRTMIN for itself; nothing else in the guest process uses this one.
const KICK_SIGNAL_OFFSET: libc::c_int = 2;

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// This thread's `kvm_run`, while it runs a vCPU; null otherwise.
    static KICK_TARGET: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_signal: libc::c_int) {
    // Only a plain thread-local read (const-initialised, no destructor) and a
    // volatile store: both async-signal-safe.
    let run = KICK_TARGET.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // `vcpu_thread` while it owns the VcpuFd (which keeps the mapping)
        // and cleared before it gives the VcpuFd away.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick handler, once per process.
pub fn install_kick_handler() -> std::io::Result<()> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let outcome = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = on_kick as extern "C" fn(libc::c_int) as usize;
        // No SA_RESTART: KVM_RUN must come back with EINTR.
        action.sa_flags = 0;
        // SAFETY: `action.sa_mask` is a valid sigset_t owned by us.
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        // SAFETY: installs a handler that only touches a thread-local and
        // this thread's kvm_run (see `on_kick`); the old action is not needed.
        let rc = unsafe { libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    outcome.map_err(std::io::Error::from_raw_os_error)
}

/// Sends the kick to a vCPU thread that has not been joined yet.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: the caller holds the thread's JoinHandle, so the pthread_t is
    // still valid (even if the thread has returned), and the signal has a
    // handler installed by `install_kick_handler`.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        log::warn!(
            "pthread_kill of a vCPU thread failed: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}

fn unblock_kick_signal() {
    // SAFETY: plain sigset_t manipulation on a local, then a change of this
    // thread's own signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// What an exit asks the loop to do next.
enum Next {
    Continue,
    /// A user-space HLT exit (none with the in-kernel irqchip): wait for stop.
    Halted,
    Fail(String),
}

/// The body of a vCPU thread: runs until `shared.stop` is set or the vCPU
/// fails, then hands the vCPU back.
pub fn vcpu_thread(mut vcpu: VcpuFd, cpu: u32, shared: &Shared) -> VcpuFd {
    unblock_kick_signal();
    vcpu.set_kvm_immediate_exit(0);
    let run_ptr: *mut kvm_run = vcpu.get_kvm_run();
    KICK_TARGET.with(|t| t.set(run_ptr));

    let failed = loop {
        // The flag is read after immediate_exit was last cleared, and the
        // stopper sets it before it kicks: a kick is never lost.
        if shared.stop.load(Ordering::SeqCst) {
            break false;
        }
        let next = match vcpu.run() {
            Ok(exit) => handle_exit(exit, &shared.devices),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) => Next::Fail(format!("KVM_RUN failed: {}", io_error(e))),
        };
        match next {
            Next::Continue => {}
            Next::Halted => {
                while !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            Next::Fail(reason) => {
                let reason = with_location(&mut vcpu, reason);
                shared.record_failure(VcpuFailure { cpu, reason });
                break true;
            }
        }
    };

    if !failed {
        if let Err(reason) = complete_pending(&mut vcpu, &shared.devices) {
            shared.record_failure(VcpuFailure { cpu, reason });
        }
    }
    KICK_TARGET.with(|t| t.set(std::ptr::null_mut()));
    vcpu.set_kvm_immediate_exit(0);
    vcpu
}

/// Re-enters KVM_RUN with `immediate_exit` set so KVM finishes the
/// instruction behind the last I/O exit; a string instruction may exit again,
/// which is handled the same way.
fn complete_pending(vcpu: &mut VcpuFd, devices: &Devices) -> Result<(), String> {
    for _ in 0..1024 {
        vcpu.set_kvm_immediate_exit(1);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => return Ok(()),
            Err(e) => return Err(format!("KVM_RUN (completing I/O) failed: {}", io_error(e))),
            Ok(exit) => match handle_exit(exit, devices) {
                Next::Continue | Next::Halted => {}
                Next::Fail(reason) => return Err(reason),
            },
        }
    }
    Err("KVM_RUN with immediate_exit kept exiting with I/O".to_string())
}

fn handle_exit(exit: VcpuExit<'_>, devices: &Devices) -> Next {
    match exit {
        VcpuExit::IoOut(port, data) => {
            devices.io_out(port, data);
            if devices.take_reset() {
                return Next::Fail(
                    "the guest reset the machine through the i8042 (a reboot or a panic); \
                     the VM ends here"
                        .into(),
                );
            }
        }
        VcpuExit::IoIn(port, data) => devices.io_in(port, data),
        VcpuExit::MmioRead(addr, data) => devices.mmio(addr, Some(data)),
        VcpuExit::MmioWrite(addr, _) => devices.mmio(addr, None),
        VcpuExit::Intr => {}
        VcpuExit::Hlt => return Next::Halted,
        VcpuExit::Shutdown => {
            return Next::Fail("the guest shut down (KVM_EXIT_SHUTDOWN: triple fault)".into())
        }
        VcpuExit::InternalError => return Next::Fail("KVM_EXIT_INTERNAL_ERROR".into()),
        VcpuExit::FailEntry(reason, cpu) => {
            return Next::Fail(format!(
                "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on host CPU {cpu}"
            ))
        }
        VcpuExit::SystemEvent(kind, data) => {
            return Next::Fail(format!("KVM_EXIT_SYSTEM_EVENT type {kind} data {data:x?}"))
        }
        other => return Next::Fail(format!("unexpected exit {other:?}")),
    }
    Next::Continue
}

/// Adds what KVM knows about the failure: the internal-error sub-code and
/// where the guest was.
fn with_location(vcpu: &mut VcpuFd, reason: String) -> String {
    let mut out = reason;
    let run = vcpu.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal` member of the
        // union is the one KVM filled in; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        out.push_str(&format!(
            " (suberror {}, data {:x?})",
            internal.suberror,
            &internal.data[..n]
        ));
    }
    if let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        out.push_str(&format!(
            " at cs:rip {:#06x}:{:#x} (cr0 {:#x})",
            sregs.cs.selector, regs.rip, sregs.cr0
        ));
    }
    out
}

/// A kvm-ioctls error as an io::Error, whose message names the errno.
pub fn io_error(e: kvm_ioctls::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.errno())
}
