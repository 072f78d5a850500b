//! The saved state of a stopped micro-VM: what KVM holds per vCPU and per VM,
//! plus the devices. Serialized with MessagePack (rmp-serde); the KVM structs
//! travel as their raw bytes (kvm-bindings' serde support), so both hosts must
//! run the same binary on the same architecture, which the migration
//! handshake already requires.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, Xsave,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::devices::DeviceState;
use super::vcpu::io_error;
use super::KvmError;

/// Bumped whenever the layout below changes.
pub const STATE_VERSION: u32 = 2;
const STATE_MAGIC: &str = "postcopy-kvm-state";

/// MSR_IA32_TSC: restored before the deadline timer, which is relative to it.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's asynchronous page fault MSRs: the interrupt vector must be known
/// before the enable bit that names interrupt delivery is written (QEMU
/// writes them in this order too).
const MSR_KVM_ASYNC_PF_INT: u32 = 0x4b56_4d06;
#[cfg(test)]
const MSR_KVM_ASYNC_PF_EN: u32 = 0x4b56_4d02;

/// Everything a fresh VM needs to continue where the saved one stopped.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub magic: String,
    pub version: u32,
    pub mem_bytes: u64,
    pub vcpus: Vec<VcpuState>,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    /// The in-kernel PIT (channels, latches, speaker gate).
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    pub devices: DeviceState,
}

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The whole XSAVE area (legacy 4 KiB region plus any KVM_CAP_XSAVE2
    /// extension), little-endian.
    #[serde(with = "serde_bytes")]
    pub xsave: Vec<u8>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value), in the order they must be written back.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
    pub tsc_khz: Option<u32>,
}

impl VmState {
    pub fn new(mem_bytes: u64, devices: DeviceState) -> Self {
        VmState {
            magic: STATE_MAGIC.to_string(),
            version: STATE_VERSION,
            mem_bytes,
            vcpus: Vec::new(),
            pic_master: irqchip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: irqchip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: irqchip(KVM_IRQCHIP_IOAPIC),
            pit: kvm_pit_state2::default(),
            clock: kvm_clock_data::default(),
            devices,
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, KvmError> {
        rmp_serde::to_vec_named(self).map_err(|e| KvmError::State(format!("encode: {e}")))
    }

    /// Decodes and checks the envelope; the caller checks it fits its VM.
    pub fn decode(bytes: &[u8]) -> Result<Self, KvmError> {
        let state: VmState = rmp_serde::from_slice(bytes).map_err(|e| {
            // The decoder may quote the peer's bytes.
            let e = common::peer_text::escape(&e.to_string()).into_owned();
            KvmError::State(format!("cannot decode {} bytes: {e}", bytes.len()))
        })?;
        if state.magic != STATE_MAGIC {
            return Err(KvmError::State(format!(
                "not a KVM guest state (magic {:?})",
                state.magic
            )));
        }
        if state.version != STATE_VERSION {
            return Err(KvmError::State(format!(
                "state version {} but this binary reads {STATE_VERSION}",
                state.version
            )));
        }
        Ok(state)
    }

    /// Reads the per-VM part: interrupt controllers, PIT and the KVM clock.
    pub fn save_vm(&mut self, vm: &VmFd) -> Result<(), KvmError> {
        for chip in [&mut self.pic_master, &mut self.pic_slave, &mut self.ioapic] {
            vm.get_irqchip(chip)
                .map_err(|e| vm_err("KVM_GET_IRQCHIP", e))?;
        }
        self.pit = vm.get_pit2().map_err(|e| vm_err("KVM_GET_PIT2", e))?;
        self.clock = vm.get_clock().map_err(|e| vm_err("KVM_GET_CLOCK", e))?;
        Ok(())
    }

    pub fn restore_vm(&self, vm: &VmFd) -> Result<(), KvmError> {
        // Only the clock value travels: the TSC_STABLE / REALTIME / HOST_TSC
        // flags describe the source host.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| vm_err("KVM_SET_CLOCK", e))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(|e| vm_err("KVM_SET_IRQCHIP", e))?;
        }
        // After the irqchip: the PIT's state includes its output line.
        vm.set_pit2(&self.pit)
            .map_err(|e| vm_err("KVM_SET_PIT2", e))?;
        Ok(())
    }
}

fn irqchip(chip_id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id,
        ..Default::default()
    }
}

fn vm_err(ioctl: &'static str, e: kvm_ioctls::Error) -> KvmError {
    KvmError::Vm {
        ioctl,
        source: io_error(e),
    }
}

/// How to read and write one vCPU's state on this host: the MSRs worth
/// carrying and the size of the XSAVE area.
#[derive(Clone, Debug)]
pub struct VcpuStateLayout {
    /// MSR indices KVM lists and KVM_GET_MSRS can read, TSC deadline last.
    pub msrs: Vec<u32>,
    /// Entries (u32) beyond the legacy 4 KiB XSAVE region, from
    /// KVM_CAP_XSAVE2; None if KVM lacks KVM_GET_XSAVE2.
    pub xsave_extra: Option<usize>,
    pub xcrs: bool,
    pub tsc_khz: bool,
}

impl VcpuStateLayout {
    /// Keeps the MSRs in `listed` that `vcpu` can read, one by one: a batch
    /// read stops at the first MSR that fails.
    pub fn probe_msrs(vcpu: &VcpuFd, listed: &[u32]) -> Vec<u32> {
        let mut keep: Vec<u32> = listed
            .iter()
            .copied()
            .filter(|&index| {
                let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }]) else {
                    return false;
                };
                matches!(vcpu.get_msrs(&mut one), Ok(1))
            })
            .collect();
        keep.sort_by_key(|&i| msr_order(i));
        keep
    }

    /// Reads one stopped vCPU. KVM_GET_MP_STATE goes first (it may process
    /// pending INIT/SIPI and change the LAPIC) and the events last, as
    /// Firecracker and QEMU do.
    pub fn save(&self, vcpu: &VcpuFd, cpu: u32) -> Result<VcpuState, KvmError> {
        let err = |ioctl| move |e| vcpu_err(ioctl, cpu, e);
        let mp_state = vcpu.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = self.get_xsave(vcpu, cpu)?;
        let xcrs = if self.xcrs {
            Some(vcpu.get_xcrs().map_err(err("KVM_GET_XCRS"))?)
        } else {
            None
        };
        let debugregs = vcpu.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let msrs = self.get_msrs(vcpu, cpu)?;
        let tsc_khz = if self.tsc_khz {
            Some(vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?)
        } else {
            None
        };
        let events = vcpu.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Writes a saved vCPU into a fresh one (CPUID already set), in
    /// Firecracker's order: mp_state, registers, FPU, LAPIC, MSRs, events.
    pub fn restore(&self, vcpu: &VcpuFd, cpu: u32, state: &VcpuState) -> Result<(), KvmError> {
        let err = |ioctl| move |e| vcpu_err(ioctl, cpu, e);
        if let (Some(want), true) = (state.tsc_khz, self.tsc_khz) {
            let have = vcpu.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?;
            if have != want {
                if let Err(e) = vcpu.set_tsc_khz(want) {
                    log::warn!(
                        "vCPU {cpu}: TSC is {have} kHz here, {want} kHz on the source, and \
                         KVM_SET_TSC_KHZ failed ({}); the guest's TSC rate changes",
                        io_error(e)
                    );
                }
            }
        }
        vcpu.set_mp_state(state.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
        self.set_xsave(vcpu, cpu, &state.xsave)?;
        match (&state.xcrs, self.xcrs) {
            (Some(xcrs), true) => vcpu.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?,
            (Some(_), false) => {
                return Err(KvmError::State(
                    "the state has XCRs but KVM here lacks KVM_CAP_XCRS".into(),
                ))
            }
            (None, _) => {}
        }
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
        self.set_msrs(vcpu, cpu, &state.msrs)?;
        let mut events = state.events;
        // KVM_GET_VCPU_EVENTS does not flag the SIPI vector as valid; an AP
        // that got INIT but not yet SIPI needs it (QEMU sets it too).
        events.flags |= KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        vcpu.set_vcpu_events(&events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    fn get_msrs(&self, vcpu: &VcpuFd, cpu: u32) -> Result<Vec<(u32, u64)>, KvmError> {
        let mut out = Vec::with_capacity(self.msrs.len());
        for chunk in self.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries)
                .map_err(|e| KvmError::State(format!("MSR list: {e}")))?;
            let read = vcpu
                .get_msrs(&mut msrs)
                .map_err(|e| vcpu_err("KVM_GET_MSRS", cpu, e))?;
            if read != chunk.len() {
                return Err(KvmError::Msr {
                    ioctl: "KVM_GET_MSRS",
                    cpu,
                    index: chunk[read],
                });
            }
            out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
        }
        Ok(out)
    }

    fn set_msrs(&self, vcpu: &VcpuFd, cpu: u32, saved: &[(u32, u64)]) -> Result<(), KvmError> {
        for chunk in saved.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries)
                .map_err(|e| KvmError::State(format!("MSR list: {e}")))?;
            let written = vcpu
                .set_msrs(&msrs)
                .map_err(|e| vcpu_err("KVM_SET_MSRS", cpu, e))?;
            if written != chunk.len() {
                return Err(KvmError::Msr {
                    ioctl: "KVM_SET_MSRS",
                    cpu,
                    index: chunk[written].0,
                });
            }
        }
        Ok(())
    }

    fn get_xsave(&self, vcpu: &VcpuFd, cpu: u32) -> Result<Vec<u8>, KvmError> {
        let words: Vec<u32> = match self.xsave_extra {
            Some(extra) => {
                let mut xsave =
                    Xsave::new(extra).map_err(|e| KvmError::State(format!("XSAVE area: {e}")))?;
                // SAFETY: `xsave` has room for the size KVM_CAP_XSAVE2
                // reported, and this process never enables dynamic XSTATE
                // features (arch_prctl), so that size still holds.
                unsafe { vcpu.get_xsave2(&mut xsave) }
                    .map_err(|e| vcpu_err("KVM_GET_XSAVE2", cpu, e))?;
                let fam = xsave.as_fam_struct_ref();
                fam.xsave
                    .region
                    .iter()
                    .chain(xsave.as_slice())
                    .copied()
                    .collect()
            }
            None => {
                let xsave = vcpu
                    .get_xsave()
                    .map_err(|e| vcpu_err("KVM_GET_XSAVE", cpu, e))?;
                xsave.region.to_vec()
            }
        };
        Ok(words.iter().flat_map(|w| w.to_le_bytes()).collect())
    }

    fn set_xsave(&self, vcpu: &VcpuFd, cpu: u32, bytes: &[u8]) -> Result<(), KvmError> {
        let region_len = std::mem::size_of::<kvm_xsave>();
        if bytes.len() < region_len || bytes.len() & 3 != 0 {
            return Err(KvmError::State(format!(
                "vCPU {cpu}: XSAVE area of {} bytes",
                bytes.len()
            )));
        }
        let words: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let (region, extra) = words.split_at(region_len / 4);
        let local_extra = self.xsave_extra.unwrap_or(0);
        // A longer area from the source is fine if the tail is unused
        // (components absent from XSTATE_BV are zero); a shorter one is
        // padded with zeros.
        if extra.len() > local_extra && extra[local_extra..].iter().any(|&w| w != 0) {
            return Err(KvmError::State(format!(
                "vCPU {cpu}: XSAVE area of {} bytes does not fit the {} bytes KVM uses here",
                bytes.len(),
                region_len + 4 * local_extra
            )));
        }
        match self.xsave_extra {
            Some(n) => {
                let mut xsave =
                    Xsave::new(n).map_err(|e| KvmError::State(format!("XSAVE area: {e}")))?;
                // SAFETY: only the register region is written through the
                // reference, never the FAM length.
                let fam = unsafe { xsave.as_mut_fam_struct() };
                fam.xsave.region.copy_from_slice(region);
                let m = extra.len().min(n);
                xsave.as_mut_slice()[..m].copy_from_slice(&extra[..m]);
                // SAFETY: the area has the size KVM_CAP_XSAVE2 reported and
                // no dynamic XSTATE features are ever enabled here.
                unsafe { vcpu.set_xsave2(&xsave) }
                    .map_err(|e| vcpu_err("KVM_SET_XSAVE", cpu, e))?;
            }
            None => {
                let mut xsave = kvm_xsave::default();
                xsave.region.copy_from_slice(region);
                // SAFETY: without KVM_CAP_XSAVE2 KVM reads exactly the legacy
                // 4 KiB struct, which `xsave` is.
                unsafe { vcpu.set_xsave(&xsave) }.map_err(|e| vcpu_err("KVM_SET_XSAVE", cpu, e))?;
            }
        }
        Ok(())
    }
}

/// Where an MSR goes in the restore order (stable sort, so the rest keep
/// KVM's order): the TSC first, the deadline (relative to the TSC) last, the
/// async-PF vector before its enable.
fn msr_order(index: u32) -> u8 {
    match index {
        MSR_IA32_TSC => 0,
        MSR_KVM_ASYNC_PF_INT => 1,
        MSR_IA32_TSC_DEADLINE => 3,
        _ => 2,
    }
}

pub fn vcpu_err(ioctl: &'static str, cpu: u32, e: kvm_ioctls::Error) -> KvmError {
    KvmError::Vcpu {
        ioctl,
        cpu,
        source: io_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_restore_in_dependency_order() {
        let mut list = vec![
            MSR_IA32_TSC_DEADLINE,
            0x174,
            MSR_KVM_ASYNC_PF_EN,
            MSR_IA32_TSC,
            MSR_KVM_ASYNC_PF_INT,
            0x175,
        ];
        list.sort_by_key(|&i| msr_order(i));
        assert_eq!(
            list,
            vec![
                MSR_IA32_TSC,
                MSR_KVM_ASYNC_PF_INT,
                0x174,
                MSR_KVM_ASYNC_PF_EN,
                0x175,
                MSR_IA32_TSC_DEADLINE
            ]
        );
    }
}
