//! Booting a Linux kernel directly, the way the x86 boot protocol
//! (Documentation/arch/x86/boot.rst, "64-bit boot protocol") lets a boot
//! loader do it: the bzImage's protected-mode part at 1 MiB (linux-loader),
//! the initramfs at the top of RAM, the zero page (boot_params with the
//! setup header, the e820 map and the command line pointer), an MP table for
//! the CPUs, and vCPU 0 in 64-bit mode on an identity map of the first GiB,
//! at the kernel's 64-bit entry with RSI = the zero page. The other vCPUs
//! wait for INIT/SIPI from the kernel, as on a PC.
//!
//! Guest-physical layout below 1 MiB (all of it inside RAM slot 0):
//!
//! | address | what |
//! |---|---|
//! | 0x500 | GDT (null, -, 64-bit code, data, TSS) |
//! | 0x520 | IDT (empty; the kernel loads its own before it enables interrupts) |
//! | 0x7000 | zero page (`boot_params`) |
//! | 0x8ff0 | boot stack top |
//! | 0x9000-0xbfff | PML4, PDPT, PD (2 MiB pages over 1 GiB) |
//! | 0x20000 | command line |
//! | 0x9fc00-0xfffff | reserved in the e820 map; MP table at 0xf0000 |

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use std::fs::File;
use std::io::{Read, Seek};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use common::mem::Mapping;

use super::{mptable, KvmError};

/// What to boot: a kernel (a bzImage, or an uncompressed vmlinux ELF, which
/// skips the decompressor), an optional initramfs, a command line.
#[derive(Debug)]
pub struct LinuxBoot {
    pub kernel: File,
    pub initrd: Option<File>,
    pub cmdline: String,
}

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const ZERO_PAGE_ADDR: u64 = 0x7000;
const BOOT_STACK_TOP: u64 = 0x8ff0;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
const CMDLINE_ADDR: u64 = 0x2_0000;
/// Top of conventional memory in the e820 map: the last KiB below 640 KiB
/// is the EBDA on a PC.
const EBDA_START: u64 = 0x9_fc00;
const MPTABLE_ADDR: u64 = 0xf_0000;
/// Where the kernel is loaded (the boot protocol's 0x100000).
pub const HIMEM_START: u64 = 0x10_0000;
/// Where a relocatable kernel decompresses itself at the earliest
/// (CONFIG_PHYSICAL_START of x86-64 defconfigs and Debian's): what it needs
/// from there is `init_size` in the setup header.
const KERNEL_RUN_ADDR: u64 = 0x100_0000;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The bzImage's 64-bit entry point is 0x200 into its protected-mode part.
const ENTRY_64_OFFSET: u64 = 0x200;
/// xloadflags bit 0: the kernel has that 64-bit entry point.
const XLF_KERNEL_64: u16 = 1;
/// Boot loader type "undefined" (boot.rst: 0xff).
const LOADER_TYPE_OTHER: u8 = 0xff;

/// GDT selectors used for the first instructions.
const CODE64_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn err(what: impl Into<String>) -> KvmError {
    KvmError::Linux(what.into())
}

/// Writes kernel, initramfs, zero page, command line, MP table, GDT and
/// page tables into `mem`. Returns the 64-bit entry address.
pub fn load(mem: &Mapping, vcpus: u32, boot: &mut LinuxBoot) -> Result<u64, KvmError> {
    let mem_bytes = mem.len() as u64;
    let guest_mem = guest_memory(mem)?;
    let mut magic = [0u8; 4];
    boot.kernel
        .read_exact(&mut magic)
        .and_then(|()| boot.kernel.rewind())
        .map_err(|e| err(format!("reading the kernel: {e}")))?;
    let (loaded, mut hdr, entry) = if magic == *b"\x7fELF" {
        let loaded = Elf::load(
            &guest_mem,
            None,
            &mut boot.kernel,
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|e| err(format!("the kernel is not a loadable vmlinux: {e}")))?;
        // An ELF kernel has no setup header: the loader fills in what
        // boot.rst asks of it, and the entry is the ELF's, startup_64.
        let hdr = setup_header {
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            kernel_alignment: 0x100_0000,
            initrd_addr_max: 0x7fff_ffff,
            cmdline_size: 2048,
            ..Default::default()
        };
        let entry = loaded.kernel_load.0;
        (loaded, hdr, entry)
    } else {
        let loaded = BzImage::load(
            &guest_mem,
            Some(GuestAddress(HIMEM_START)),
            &mut boot.kernel,
            Some(GuestAddress(HIMEM_START)),
        )
        .map_err(|e| {
            err(format!(
                "the kernel is neither a vmlinux ELF nor a bootable bzImage: {e}"
            ))
        })?;
        let hdr = loaded
            .setup_header
            .ok_or_else(|| err("the kernel has no setup header"))?;
        if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(err(format!(
                "the kernel has no 64-bit entry point (boot protocol {:#x}, xloadflags {:#x}; \
                 2.12+ with XLF_KERNEL_64 needed)",
                { hdr.version },
                { hdr.xloadflags }
            )));
        }
        (loaded, hdr, HIMEM_START + ENTRY_64_OFFSET)
    };
    let kernel_top = loaded
        .kernel_end
        .max(KERNEL_RUN_ADDR + u64::from(hdr.init_size));

    // The initramfs goes at the top of RAM, below what the kernel can reach.
    if let Some(initrd) = boot.initrd.as_mut() {
        let mut bytes = Vec::new();
        initrd
            .read_to_end(&mut bytes)
            .map_err(|e| err(format!("reading the initramfs: {e}")))?;
        let size = bytes.len() as u64;
        let ceiling = mem_bytes.min(u64::from(hdr.initrd_addr_max) + 1);
        let addr = ceiling
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|&a| a >= kernel_top)
            .ok_or_else(|| {
                err(format!(
                    "{} MiB of memory cannot hold the kernel (it needs up to {:#x}) and a \
                     {size}-byte initramfs",
                    mem_bytes >> 20,
                    kernel_top
                ))
            })?;
        mem.write(addr as usize, &bytes);
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    } else if kernel_top > mem_bytes {
        return Err(err(format!(
            "{} MiB of memory cannot hold the kernel (it needs up to {kernel_top:#x})",
            mem_bytes >> 20
        )));
    }

    let cmdline = boot.cmdline.as_bytes();
    let max = (hdr.cmdline_size as usize).max(255);
    if cmdline.len() >= max || cmdline.contains(&0) {
        return Err(err(format!(
            "the command line has {} bytes (this kernel takes at most {}, no NUL)",
            cmdline.len(),
            max - 1
        )));
    }
    mem.write(CMDLINE_ADDR as usize, cmdline);
    mem.write(CMDLINE_ADDR as usize + cmdline.len(), &[0]);

    hdr.type_of_loader = LOADER_TYPE_OTHER;
    hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let e820 = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, mem_bytes - HIMEM_START, E820_RAM),
    ];
    for (i, &(addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_ADDR)),
        &guest_mem,
    )
    .map_err(|e| err(format!("writing the zero page: {e}")))?;

    let vcpus = u8::try_from(vcpus).map_err(|_| err(format!("{vcpus} vCPUs for an MP table")))?;
    mem.write(
        MPTABLE_ADDR as usize,
        &mptable::build(MPTABLE_ADDR as u32, vcpus),
    );
    write_gdt(mem);
    write_page_tables(mem);
    Ok(entry)
}

/// `mem` as vm-memory's guest memory, for linux-loader. The region borrows
/// the mapping (vm-memory does not unmap a region built from a raw pointer)
/// and is dropped before `load` returns.
fn guest_memory(mem: &Mapping) -> Result<GuestMemoryMmap, KvmError> {
    // SAFETY: the pointer and length are exactly the live read-write
    // mapping `mem`, which outlives the returned value (used only inside
    // `load`); vm-memory does not unmap regions it did not map.
    let region = unsafe {
        MmapRegion::build_raw(
            mem.host_addr() as *mut u8,
            mem.len(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .map_err(|e| err(format!("guest memory for the loader: {e}")))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| err("guest memory for the loader: region does not fit"))?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| err(format!("guest memory for the loader: {e}")))
}

/// A GDT entry from its parts (Intel SDM vol. 3, 3.4.5).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0xffff)
}

/// Null, unused, 64-bit code, data, TSS: what the selectors name.
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x008b, 0, 0xfffff),
];

fn write_gdt(mem: &Mapping) {
    let bytes: Vec<u8> = GDT
        .iter()
        .flat_map(|&(f, b, l)| gdt_entry(f, b, l).to_le_bytes())
        .collect();
    mem.write(GDT_ADDR as usize, &bytes);
    mem.write(IDT_ADDR as usize, &0u64.to_le_bytes());
}

/// Identity map of the first GiB in 2 MiB pages: enough for the kernel's
/// first instructions, which build their own tables.
fn write_page_tables(mem: &Mapping) {
    mem.write(PML4_ADDR as usize, &(PDPT_ADDR | 0x3).to_le_bytes());
    mem.write(PDPT_ADDR as usize, &(PD_ADDR | 0x3).to_le_bytes());
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    mem.write(PD_ADDR as usize, &pd);
}

/// The segment register a GDT entry loads.
fn segment(selector: u16) -> kvm_segment {
    let (flags, base, limit) = GDT[usize::from(selector >> 3)];
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// vCPU 0's special registers at the 64-bit entry: long mode, paging on
/// the identity map, flat segments.
pub fn boot_sregs(sregs: &mut kvm_sregs) {
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = segment(CODE64_SELECTOR);
    let data = segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(TSS_SELECTOR);
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= CR4_PAE;
    // Caches on (CD and NW clear), as firmware leaves them.
    sregs.cr0 = (sregs.cr0 & !(CR0_CD | CR0_NW)) | CR0_PE | CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// vCPU 0's general registers at the entry: RSI = the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rsp: BOOT_STACK_TOP,
        rbp: BOOT_STACK_TOP,
        rsi: ZERO_PAGE_ADDR,
        rflags: 0x2,
        ..Default::default()
    }
}

/// The x87 and SSE control words after FNINIT and at reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_like_the_sdm() {
        // The classic flat descriptors.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        let cs = segment(CODE64_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.type_, cs.present, cs.s), (1, 0, 0xb, 1, 1));
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        let tr = segment(TSS_SELECTOR);
        assert_eq!((tr.s, tr.type_), (0, 0xb));
    }
}
