//! The KVM micro-VM: a minimal VMM on kvm-ioctls. Guest RAM is the shared
//! memfd mapping the guest process was given (slot 0 at guest physical 0),
//! the interrupt controllers and the PIT are KVM's, and the user-space
//! devices are a 16550 on COM1 (IRQ 4), the i8042 reset and port 0x92
//! ([`devices`]). A vCPU is one thread in KVM_RUN ([`vcpu`]); stopping,
//! saving and restoring work on parked vCPUs ([`state`]).
//!
//! It boots either of two things:
//! - a 512-byte boot sector (see guest/boot/README.md), loaded at 0x7c00;
//!   vCPU 0 starts in real mode at 0000:7c00 with DL = 0x80, as a PC BIOS
//!   would hand over (no BIOS services, interrupts off), plus ESI = RAM size
//!   in bytes ([`KvmGuest::boot`]);
//! - a Linux kernel (bzImage or vmlinux) with an initramfs and a command
//!   line, entered in 64-bit mode ([`linux`], [`KvmGuest::boot_linux`]).

pub mod devices;
pub mod linux;
mod mptable;
pub mod state;
mod vcpu;

use kvm_bindings::{
    kvm_msr_entry, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use std::fs::File;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::guest::KVM_MAX_MEM;
use common::mem::Mapping;

use devices::{Devices, IrqLine, COM1_IRQ};
use linux::LinuxBoot;
use state::{vcpu_err, VcpuStateLayout, VmState};
use vcpu::{io_error, Shared};

pub use vcpu::VcpuFailure;

/// The built-in workload sector (guest/boot/workload.S): the `ab` pattern
/// over [1 MiB, RAM size), one '`B`' on COM1 per pass.
pub const BUILTIN_SECTOR: &[u8; 512] = include_bytes!("../../boot/workload.bin");

/// Where a boot sector is loaded, and where vCPU 0 starts.
pub const BOOT_SECTOR_ADDR: u64 = 0x7c00;
/// Size of a boot sector.
pub const BOOT_SECTOR_LEN: usize = 512;
/// The BIOS boot drive number handed over in DL (first hard disk).
const BOOT_DRIVE: u64 = 0x80;

/// KVM needs three pages for the real-mode TSS and one for the identity map
/// of EPT-less real mode, outside RAM; this is where QEMU and Firecracker put
/// them, just below the BIOS area at the top of 4 GiB, far above 3 GiB of RAM.
const TSS_ADDR: usize = 0xfffb_d000;
const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Errors of the micro-VM. Ioctl failures name the ioctl and the errno.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("KVM is not usable here: /dev/kvm: {0}")]
    Open(std::io::Error),
    #[error("KVM is not usable here: {ioctl} failed: {source}")]
    CreateVm {
        ioctl: &'static str,
        source: std::io::Error,
    },
    #[error("KVM is not usable here: it lacks {0}, which this VMM needs")]
    MissingCap(&'static str),
    #[error("{ioctl} failed: {source}")]
    Vm {
        ioctl: &'static str,
        source: std::io::Error,
    },
    #[error("{ioctl} on vCPU {cpu} failed: {source}")]
    Vcpu {
        ioctl: &'static str,
        cpu: u32,
        source: std::io::Error,
    },
    #[error("{ioctl} on vCPU {cpu} failed at MSR {index:#x}")]
    Msr {
        ioctl: &'static str,
        cpu: u32,
        index: u32,
    },
    #[error("guest memory of {got} bytes: the KVM guest takes 4 KiB multiples up to {max} bytes")]
    MemSize { got: u64, max: u64 },
    #[error("{asked} vCPUs asked, KVM here takes 1 to {max}")]
    VcpuCount { asked: u32, max: usize },
    #[error("a boot sector is {BOOT_SECTOR_LEN} bytes, got {0}")]
    SectorSize(usize),
    #[error("{0} bytes of memory cannot hold a boot sector at 0x7c00")]
    TooSmallForSector(u64),
    #[error("{op} needs {needs}")]
    Sequence {
        op: &'static str,
        needs: &'static str,
    },
    #[error("cannot start the vCPU {cpu} thread: {source}")]
    Thread { cpu: u32, source: std::io::Error },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(std::io::Error),
    #[error("{0}")]
    VcpuFailed(VcpuFailure),
    #[error("bad saved KVM guest state: {0}")]
    State(String),
    #[error("cannot boot Linux: {0}")]
    Linux(String),
    #[error("cannot set up COM1's interrupt: {0}")]
    SerialIrq(std::io::Error),
    #[error("KVM speed probe: {0}")]
    Probe(String),
}

/// Ok(()) if /dev/kvm opens, a VM can be created and KVM has what this VMM
/// needs; otherwise the reason, e.g. "KVM is not usable here: /dev/kvm: No
/// such file or directory (os error 2)".
pub fn kvm_usable() -> Result<(), String> {
    let kvm = open_kvm().map_err(|e| e.to_string())?;
    create_vm(&kvm).map(drop).map_err(|e| e.to_string())
}

/// Guest instructions per second below which a Linux guest is not worth
/// booting: a kernel boot runs some 10^9 instructions, so at this rate it
/// already takes minutes. A KVM on VMX/SVM runs 10^8-10^9; kvm_pvm running a
/// guest that is not PVM-enabled (the development machine, measured with
/// [`guest_speed`]) runs 3 * 10^5 to 1.2 * 10^6.
pub const LINUX_MIN_GUEST_SPEED: f64 = 2e7;

/// Iterations of the probe loop (two instructions each).
const PROBE_ITERATIONS: u32 = 400_000;

/// Measures how fast this KVM runs guest code: a boot sector counts down
/// [`PROBE_ITERATIONS`] times (`dec ecx; jnz`), then writes COM1. Returns
/// guest instructions per second, measured from `run()` to the write, at
/// most 10 s (a slower KVM is reported at the rate that bound implies).
pub fn guest_speed() -> Result<f64, KvmError> {
    let mem_bytes = 1 << 20;
    let fd = common::mem::create_memfd("postcopy-kvm-probe", mem_bytes)
        .map_err(|e| KvmError::Probe(e.to_string()))?;
    let mem = Arc::new(
        Mapping::new(
            std::os::fd::AsFd::as_fd(&fd),
            mem_bytes as usize,
            common::mem::Access::ReadWrite,
        )
        .map_err(|e| KvmError::Probe(e.to_string()))?,
    );
    let sink = common::mem::create_memfd("postcopy-kvm-probe-serial", 0)
        .map_err(|e| KvmError::Probe(e.to_string()))?;
    let mut guest = KvmGuest::new(mem, 1, File::from(sink))?;
    let mut sector = [0u8; BOOT_SECTOR_LEN];
    let n = PROBE_ITERATIONS.to_le_bytes();
    let code = [
        0x66, 0xb9, n[0], n[1], n[2], n[3], // mov ecx, N
        0x66, 0x49, // l: dec ecx
        0x75, 0xfc, // jnz l
        0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'.', // mov al, '.'
        0xee, // out dx, al
        0xfa, 0xf4, // cli; hlt
    ];
    sector[..code.len()].copy_from_slice(&code);
    sector[510] = 0x55;
    sector[511] = 0xaa;
    guest.boot(&sector)?;
    let bound = Duration::from_secs(10);
    let start = Instant::now();
    guest.run()?;
    while guest.serial_bytes() == 0 && start.elapsed() < bound {
        if let Some(f) = guest.failure() {
            return Err(KvmError::VcpuFailed(f));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let took = start.elapsed();
    guest.stop()?;
    Ok(2.0 * f64::from(PROBE_ITERATIONS) / took.as_secs_f64())
}

/// Ok(()) if KVM is usable and runs guest code fast enough to boot Linux
/// (see [`LINUX_MIN_GUEST_SPEED`]); otherwise the reason, with the rate
/// measured.
pub fn linux_usable() -> Result<(), String> {
    kvm_usable()?;
    // The best of three: a busy host may deschedule one probe's vCPU, but
    // not make a KVM that runs guest code natively look like an emulator
    // three times over (the two differ a thousandfold).
    let mut speed = 0f64;
    for _ in 0..3 {
        speed = speed.max(guest_speed().map_err(|e| format!("the KVM speed probe failed: {e}"))?);
        if speed >= LINUX_MIN_GUEST_SPEED {
            break;
        }
    }
    if speed < LINUX_MIN_GUEST_SPEED {
        let pvm = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            " (this KVM is kvm_pvm: a guest kernel that is not PVM-enabled runs this slowly on it)"
        } else {
            ""
        };
        return Err(format!(
            "KVM here runs guest code at {:.2} M instructions/s{pvm}, below the {:.0} M/s a \
             Linux boot needs to finish in minutes",
            speed / 1e6,
            LINUX_MIN_GUEST_SPEED / 1e6
        ));
    }
    Ok(())
}

fn open_kvm() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| KvmError::Open(io_error(e)))?;
    let required = [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        (Cap::MpState, "KVM_CAP_MP_STATE"),
        (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
        (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
        (Cap::Xsave, "KVM_CAP_XSAVE"),
        (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    ];
    for (cap, name) in required {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}

fn create_vm(kvm: &Kvm) -> Result<VmFd, KvmError> {
    kvm.create_vm().map_err(|e| KvmError::CreateVm {
        ioctl: "KVM_CREATE_VM",
        source: io_error(e),
    })
}

fn vm_err(ioctl: &'static str) -> impl Fn(kvm_ioctls::Error) -> KvmError {
    move |e| KvmError::Vm {
        ioctl,
        source: io_error(e),
    }
}

/// Where a guest is in its life. `restore` only takes a fresh guest, `run`
/// only one that was booted or restored.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    Fresh,
    Stopped,
    Running,
}

/// A vCPU, parked (its fd here) or running (its fd in its thread).
enum Slot {
    Parked(VcpuFd),
    Running(JoinHandle<VcpuFd>),
    /// Its thread could not start or panicked: the fd is gone.
    Lost,
}

/// A KVM micro-VM over a shared guest-memory mapping.
pub struct KvmGuest {
    vcpus: Vec<Slot>,
    shared: Arc<Shared>,
    layout: VcpuStateLayout,
    phase: Phase,
    vm: VmFd,
    _kvm: Kvm,
    /// Declared last so it is dropped last: KVM has this mapping's address
    /// in slot 0, and every vCPU and VM fd is closed before it is unmapped.
    mem: Arc<Mapping>,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("vcpus", &self.vcpus.len())
            .field("phase", &self.phase)
            .field("mem_bytes", &self.mem.len())
            .field("serial_bytes", &self.serial_bytes())
            .finish()
    }
}

impl KvmGuest {
    /// Creates the VM: slot 0 = all of `mem` at guest physical 0, KVM's
    /// irqchip (PIC, IOAPIC, a local APIC per vCPU: APs wait for INIT/SIPI),
    /// `vcpus` vCPUs with KVM's supported CPUID. COM1 output goes to
    /// `serial`. Guest memory is not touched.
    pub fn new(mem: Arc<Mapping>, vcpus: u32, serial: File) -> Result<KvmGuest, KvmError> {
        let mem_bytes = mem.len() as u64;
        if mem_bytes == 0 || mem_bytes > KVM_MAX_MEM || mem_bytes & 0xfff != 0 {
            return Err(KvmError::MemSize {
                got: mem_bytes,
                max: KVM_MAX_MEM,
            });
        }
        let kvm = open_kvm()?;
        let max_vcpus = kvm.get_max_vcpus();
        if vcpus == 0 || vcpus as usize > max_vcpus {
            return Err(KvmError::VcpuCount {
                asked: vcpus,
                max: max_vcpus,
            });
        }
        vcpu::install_kick_handler().map_err(KvmError::Signal)?;
        let vm = create_vm(&kvm)?;
        vm.set_identity_map_address(IDENTITY_MAP_ADDR)
            .map_err(vm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
        // The PIT's speaker port (0x61) stays in the kernel too.
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(vm_err("KVM_CREATE_PIT2"))?;
        let com1_irq = IrqLine::new().map_err(KvmError::SerialIrq)?;
        vm.register_irqfd(com1_irq.eventfd(), COM1_IRQ)
            .map_err(vm_err("KVM_IRQFD"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes,
            userspace_addr: mem.host_addr(),
        };
        // SAFETY: the region is exactly the mapping `mem`, which this struct
        // holds (as its last field) until the VM and every vCPU fd are
        // closed, so KVM never sees an address that could be reused.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut fds = Vec::with_capacity(vcpus as usize);
        for cpu in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(cpu))
                .map_err(|e| vcpu_err("KVM_CREATE_VCPU", cpu, e))?;
            fd.set_cpuid2(&cpuid_for(&cpuid, cpu))
                .map_err(|e| vcpu_err("KVM_SET_CPUID2", cpu, e))?;
            fds.push(fd);
        }

        let listed = kvm
            .get_msr_index_list()
            .map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?;
        let xsave2 = vm.check_extension_int(Cap::Xsave2);
        let legacy = std::mem::size_of::<kvm_bindings::kvm_xsave>();
        let layout = VcpuStateLayout {
            msrs: VcpuStateLayout::probe_msrs(&fds[0], listed.as_slice()),
            xsave_extra: (xsave2 > 0).then(|| (xsave2 as usize).saturating_sub(legacy).div_ceil(4)),
            xcrs: kvm.check_extension(Cap::Xcrs),
            tsc_khz: kvm.check_extension(Cap::GetTscKhz),
        };
        log::debug!(
            "KVM guest: {mem_bytes} bytes, {vcpus} vCPUs, {} of {} listed MSRs readable, \
             XSAVE area {} bytes",
            layout.msrs.len(),
            listed.as_slice().len(),
            legacy + 4 * layout.xsave_extra.unwrap_or(0)
        );

        Ok(KvmGuest {
            vcpus: fds.into_iter().map(Slot::Parked).collect(),
            shared: Arc::new(Shared {
                stop: Default::default(),
                devices: Devices::new(serial, com1_irq),
                failure: Mutex::new(None),
            }),
            layout,
            phase: Phase::Fresh,
            vm,
            _kvm: kvm,
            mem,
        })
    }

    /// Source side only: copies `sector` to 0x7c00 and puts vCPU 0 in real
    /// mode at 0000:7c00 with DL = 0x80 and ESI = RAM size in bytes.
    pub fn boot(&mut self, sector: &[u8]) -> Result<(), KvmError> {
        if self.phase != Phase::Fresh {
            return Err(KvmError::Sequence {
                op: "boot()",
                needs: "a fresh guest (not booted, restored or run)",
            });
        }
        if sector.len() != BOOT_SECTOR_LEN {
            return Err(KvmError::SectorSize(sector.len()));
        }
        if (self.mem.len() as u64) < BOOT_SECTOR_ADDR + BOOT_SECTOR_LEN as u64 {
            return Err(KvmError::TooSmallForSector(self.mem.len() as u64));
        }
        let Slot::Parked(bsp) = &self.vcpus[0] else {
            unreachable!("a fresh guest has every vCPU parked");
        };
        let mut sregs = bsp
            .get_sregs()
            .map_err(|e| vcpu_err("KVM_GET_SREGS", 0, e))?;
        // The reset state is real mode at f000:fff0; only CS moves.
        sregs.cs.selector = 0;
        sregs.cs.base = 0;
        bsp.set_sregs(&sregs)
            .map_err(|e| vcpu_err("KVM_SET_SREGS", 0, e))?;
        let mut regs = bsp.get_regs().map_err(|e| vcpu_err("KVM_GET_REGS", 0, e))?;
        regs.rip = BOOT_SECTOR_ADDR;
        regs.rdx = BOOT_DRIVE;
        regs.rsi = self.mem.len() as u64;
        regs.rsp = BOOT_SECTOR_ADDR;
        regs.rflags = 0x2; // reserved bit 1; IF clear
        bsp.set_regs(&regs)
            .map_err(|e| vcpu_err("KVM_SET_REGS", 0, e))?;
        self.mem.write(BOOT_SECTOR_ADDR as usize, sector);
        self.phase = Phase::Stopped;
        Ok(())
    }

    /// Source side only: loads `boot` (see [`linux`]) and puts vCPU 0 at
    /// the kernel's 64-bit entry; every vCPU gets the PC's LINT0/LINT1
    /// wiring (ExtINT from the PIC, NMI) and fast strings.
    pub fn boot_linux(&mut self, boot: &mut LinuxBoot) -> Result<(), KvmError> {
        if self.phase != Phase::Fresh {
            return Err(KvmError::Sequence {
                op: "boot_linux()",
                needs: "a fresh guest (not booted, restored or run)",
            });
        }
        let entry = linux::load(&self.mem, self.vcpus.len() as u32, boot)?;
        for (cpu, slot) in self.vcpus.iter().enumerate() {
            let Slot::Parked(fd) = slot else {
                unreachable!("a fresh guest has every vCPU parked");
            };
            let cpu = cpu as u32;
            let mut lapic = fd
                .get_lapic()
                .map_err(|e| vcpu_err("KVM_GET_LAPIC", cpu, e))?;
            set_lint(&mut lapic);
            fd.set_lapic(&lapic)
                .map_err(|e| vcpu_err("KVM_SET_LAPIC", cpu, e))?;
            let misc = Msrs::from_entries(&[kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: MISC_ENABLE_FAST_STRING,
                ..Default::default()
            }])
            .map_err(|e| KvmError::State(format!("MSR list: {e}")))?;
            fd.set_msrs(&misc)
                .map_err(|e| vcpu_err("KVM_SET_MSRS", cpu, e))?;
            if cpu != 0 {
                continue;
            }
            let mut sregs = fd
                .get_sregs()
                .map_err(|e| vcpu_err("KVM_GET_SREGS", cpu, e))?;
            linux::boot_sregs(&mut sregs);
            fd.set_sregs(&sregs)
                .map_err(|e| vcpu_err("KVM_SET_SREGS", cpu, e))?;
            fd.set_regs(&linux::boot_regs(entry))
                .map_err(|e| vcpu_err("KVM_SET_REGS", cpu, e))?;
            fd.set_fpu(&linux::boot_fpu())
                .map_err(|e| vcpu_err("KVM_SET_FPU", cpu, e))?;
        }
        self.phase = Phase::Stopped;
        Ok(())
    }

    /// Starts (or resumes after `stop`) one thread per vCPU in KVM_RUN.
    pub fn run(&mut self) -> Result<(), KvmError> {
        match self.phase {
            Phase::Running => return Ok(()),
            Phase::Fresh => {
                return Err(KvmError::Sequence {
                    op: "run()",
                    needs: "boot() or restore() first",
                })
            }
            Phase::Stopped => {}
        }
        if let Some(failure) = self.failure() {
            return Err(KvmError::VcpuFailed(failure));
        }
        self.shared.stop.store(false, Ordering::SeqCst);
        self.phase = Phase::Running;
        for (cpu, slot) in self.vcpus.iter_mut().enumerate() {
            let Slot::Parked(fd) = std::mem::replace(slot, Slot::Lost) else {
                unreachable!("a stopped guest has every vCPU parked");
            };
            let cpu = cpu as u32;
            let shared = Arc::clone(&self.shared);
            // The thread keeps the memory mapped for as long as it has the
            // vCPU, even if this struct were leaked around it.
            let mem = Arc::clone(&self.mem);
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{cpu}"))
                .spawn(move || {
                    let fd = vcpu::vcpu_thread(fd, cpu, &shared);
                    drop(mem);
                    fd
                })
                .map_err(|source| {
                    // The fd went down with the closure: this guest cannot
                    // save or run again, and says so.
                    self.shared.record_failure(VcpuFailure {
                        cpu,
                        reason: format!("its thread could not start: {source}"),
                    });
                    KvmError::Thread { cpu, source }
                })?;
            *slot = Slot::Running(handle);
        }
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary and returns once all are
    /// parked. Idempotent. Err if a vCPU had failed (they are parked anyway).
    pub fn stop(&mut self) -> Result<(), KvmError> {
        if self.phase == Phase::Running {
            self.shared.stop.store(true, Ordering::SeqCst);
            let started = Instant::now();
            let mut warned = false;
            loop {
                let mut pending = 0;
                for slot in &self.vcpus {
                    if let Slot::Running(handle) = slot {
                        if !handle.is_finished() {
                            pending += 1;
                            vcpu::kick(handle.as_pthread_t());
                        }
                    }
                }
                if pending == 0 {
                    break;
                }
                if !warned && started.elapsed() > Duration::from_secs(5) {
                    warned = true;
                    log::warn!("{pending} vCPU(s) still not stopped after 5 s; still kicking");
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            for (cpu, slot) in self.vcpus.iter_mut().enumerate() {
                if let Slot::Running(handle) = std::mem::replace(slot, Slot::Lost) {
                    match handle.join() {
                        Ok(fd) => *slot = Slot::Parked(fd),
                        Err(_) => self.shared.record_failure(VcpuFailure {
                            cpu: cpu as u32,
                            reason: "its thread panicked".into(),
                        }),
                    }
                }
            }
            self.phase = Phase::Stopped;
        }
        match self.failure() {
            Some(failure) => Err(KvmError::VcpuFailed(failure)),
            None => Ok(()),
        }
    }

    /// The first vCPU failure (triple fault, internal error, failed entry),
    /// if any; visible while the others still run.
    pub fn failure(&self) -> Option<VcpuFailure> {
        self.shared.failure()
    }

    /// True between `run()` and `stop()`.
    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// With the vCPUs stopped: everything needed to continue exactly there,
    /// serialized (see [`state`]).
    pub fn save(&self) -> Result<Vec<u8>, KvmError> {
        if self.phase == Phase::Running {
            return Err(KvmError::Sequence {
                op: "save()",
                needs: "stopped vCPUs (call stop() first)",
            });
        }
        if let Some(failure) = self.failure() {
            return Err(KvmError::VcpuFailed(failure));
        }
        let mut state = VmState::new(self.mem.len() as u64, self.shared.devices.state());
        state.save_vm(&self.vm)?;
        for (cpu, slot) in self.vcpus.iter().enumerate() {
            let Slot::Parked(fd) = slot else {
                unreachable!("a stopped guest without failures has every vCPU parked");
            };
            state.vcpus.push(self.layout.save(fd, cpu as u32)?);
        }
        state.encode()
    }

    /// Loads a state from `save()` into this fresh guest (new(), no boot());
    /// `run()` then continues it.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), KvmError> {
        if self.phase != Phase::Fresh {
            return Err(KvmError::Sequence {
                op: "restore()",
                needs: "a fresh guest (not booted, restored or run)",
            });
        }
        let state = VmState::decode(bytes)?;
        if state.mem_bytes != self.mem.len() as u64 {
            return Err(KvmError::State(format!(
                "saved with {} bytes of RAM, this guest has {}",
                state.mem_bytes,
                self.mem.len()
            )));
        }
        if state.vcpus.len() != self.vcpus.len() {
            return Err(KvmError::State(format!(
                "saved with {} vCPUs, this guest has {}",
                state.vcpus.len(),
                self.vcpus.len()
            )));
        }
        state.restore_vm(&self.vm)?;
        for (cpu, (slot, saved)) in self.vcpus.iter().zip(&state.vcpus).enumerate() {
            let Slot::Parked(fd) = slot else {
                unreachable!("a fresh guest has every vCPU parked");
            };
            self.layout.restore(fd, cpu as u32, saved)?;
        }
        self.shared
            .devices
            .set_state(&state.devices)
            .map_err(KvmError::State)?;
        self.phase = Phase::Stopped;
        Ok(())
    }

    /// How many vCPUs this VM has.
    pub fn vcpus(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Bytes the guest has written to COM1, including before a restore.
    pub fn serial_bytes(&self) -> u64 {
        self.shared.devices.serial_bytes()
    }

    /// Watch COM1's output for `marker` (see [`KvmGuest::marker_seen`]).
    pub fn watch_serial_for(&self, marker: &'static [u8]) {
        self.shared.devices.watch_for(marker);
    }

    /// True once `marker` went by on COM1, here or before a restore.
    pub fn marker_seen(&self) -> bool {
        self.shared.devices.marker_seen()
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        // Joins the vCPU threads, so no vCPU fd outlives the VM's memory.
        if let Err(e) = self.stop() {
            log::debug!("KVM guest dropped after: {e}");
        }
    }
}

// The guest process moves its KvmGuest between threads.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<KvmGuest>();
};

const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast-string REP MOVS/STOS, set by every BIOS.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// Local APIC register offsets of LINT0 and LINT1 (Intel SDM vol. 3, 11.5.1).
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_DELIVERY_EXTINT: u32 = 0x7 << 8;
const APIC_DELIVERY_NMI: u32 = 0x4 << 8;
/// CPUID.1:ECX bit 31: running under a hypervisor (Linux then looks for
/// KVM's leaves and uses kvmclock).
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;

/// LINT0 takes the PIC's interrupts (ExtINT), LINT1 the NMI, as a PC BIOS
/// leaves them (the MP table says the same).
fn set_lint(lapic: &mut kvm_bindings::kvm_lapic_state) {
    for (offset, mode) in [
        (APIC_LVT_LINT0, APIC_DELIVERY_EXTINT),
        (APIC_LVT_LINT1, APIC_DELIVERY_NMI),
    ] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | mode;
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[offset + i] = b as _;
        }
    }
}

/// KVM's supported CPUID with this vCPU's APIC ID where CPUID reports it,
/// and the hypervisor bit.
fn cpuid_for(supported: &CpuId, cpu: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            // EBX[31:24]: initial APIC ID.
            0x1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (cpu << 24);
                entry.ecx |= CPUID_1_ECX_HYPERVISOR;
            }
            // EDX: x2APIC ID, in every sub-leaf of the topology leaves.
            0xb | 0x1f => entry.edx = cpu,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::process::Command;

    /// The committed workload.bin is what workload.S assembles to, with the
    /// command in its header (skipped, loudly, where binutils is missing).
    #[test]
    fn builtin_sector_matches_its_source() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot");
        let Some(bin) = reassemble(&dir.join("workload.S")) else {
            eprintln!("skipped: GNU as/ld (binutils) not found");
            return;
        };
        assert_eq!(bin.as_slice(), BUILTIN_SECTOR.as_slice());
        assert_eq!(&BUILTIN_SECTOR[510..], &[0x55, 0xaa]);
    }

    /// The interrupt test's sector (guest/tests/kvm_vmm.rs) is what
    /// interrupts.S assembles to.
    #[test]
    fn interrupts_sector_matches_its_source() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("boot");
        let Some(bin) = reassemble(&dir.join("interrupts.S")) else {
            eprintln!("skipped: GNU as/ld (binutils) not found");
            return;
        };
        let committed = std::fs::read(dir.join("interrupts.bin")).unwrap();
        assert_eq!(bin, committed);
        assert_eq!(&committed[510..], &[0x55, 0xaa]);
    }

    /// Assembles a boot sector source the way guest/boot/README.md says.
    fn reassemble(source: &Path) -> Option<Vec<u8>> {
        Command::new("as").arg("--version").output().ok()?;
        // One directory per source: the tests run side by side.
        let stem = source.file_stem().unwrap_or_default().to_string_lossy();
        let tmp =
            std::env::temp_dir().join(format!("postcopy-sector-{}-{stem}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        let obj = tmp.join("w.o");
        let bin = tmp.join("w.bin");
        let ok = Command::new("as")
            .args(["--32", "-o"])
            .arg(&obj)
            .arg(source)
            .status()
            .unwrap()
            .success();
        assert!(ok, "as failed on {}", source.display());
        let ok = Command::new("ld")
            .args([
                "-m",
                "elf_i386",
                "-Ttext=0x7c00",
                "--oformat",
                "binary",
                "-o",
            ])
            .arg(&bin)
            .arg(&obj)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ld failed on {}", source.display());
        let out = std::fs::read(&bin).unwrap();
        std::fs::remove_dir_all(&tmp).ok();
        Some(out)
    }

    #[test]
    fn cpuid_carries_the_apic_id() {
        let mut supported = CpuId::new(2).unwrap();
        supported.as_mut_slice()[0].function = 1;
        supported.as_mut_slice()[0].ebx = 0xaabb_ccdd;
        supported.as_mut_slice()[1].function = 0xb;
        let c = cpuid_for(&supported, 3);
        assert_eq!(c.as_slice()[0].ebx, 0x03bb_ccdd);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
