//! The KVM micro-VM against real KVM: boot both `ab` sectors, stop, check the
//! memory the way QEMU's migration tests do, save and restore into a copy of
//! the memory, and make sure halted and crashed guests neither hang `stop()`
//! nor hide their failure. Where KVM is not usable every trial is reported
//! as ignored with the reason ("skipped: ..."), never as passed.

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::guest::{ab_violations, KVM_AB_START, KVM_MAX_MEM};
use common::mem::{create_memfd, Access, Mapping};
use guest::kvm::{kvm_usable, KvmError, KvmGuest, BUILTIN_SECTOR};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The independently written sector (tests/fixtures/boot/ab-fixed.S).
const FIXTURE_SECTOR: &[u8; 512] = include_bytes!("../../tests/fixtures/boot/ab-fixed.bin");
const FIXTURE_RANGE: (u64, u64) = (0x10_0000, 0x2010_0000);
const FIXTURE_MARKER: u8 = b'*';
/// guest/boot/interrupts.S: one 'U' per PIT tick-and-UART-interrupt round.
const INTERRUPTS_SECTOR: &[u8; 512] = include_bytes!("../boot/interrupts.bin");
const INTERRUPTS_MARKER: u8 = b'U';
const BUILTIN_MARKER: u8 = b'B';

type TrialResult = Result<Completion, Failed>;

fn main() {
    let mut args = Arguments::from_args();
    // The trials each keep the machine's two CPUs busy; one at a time keeps
    // their timing meaningful.
    args.test_threads.get_or_insert(1);
    let skip = kvm_usable().err();
    if let Some(reason) = &skip {
        eprintln!("skipped: {reason}");
    }
    let kvm_trial = |name: &'static str, f: fn() -> Result<(), Failed>| {
        let skip = skip.clone();
        Trial::ignorable_test(name, move || match skip {
            Some(reason) => {
                eprintln!("skipped: {name}: {reason}");
                Ok(Completion::ignored_with(format!("skipped: {reason}")))
            }
            None => f().map(|()| Completion::Completed),
        })
    };
    let trials = vec![
        Trial::ignorable_test("fixture_sector_matches_its_source", fixture_matches_source),
        kvm_trial("builtin_sector_ab_64mib", builtin_ab),
        kvm_trial("save_restore_into_a_copy", save_restore),
        kvm_trial(
            "pit_pic_and_uart_interrupts_survive_save_restore",
            interrupts_survive_save_restore,
        ),
        kvm_trial("fixture_sector_ab_600mib_2_vcpus", fixture_ab),
        kvm_trial("halted_guest_stops", halted_guest_stops),
        kvm_trial("triple_fault_is_reported", triple_fault_is_reported),
        kvm_trial("bad_sizes_are_refused", bad_sizes_are_refused),
    ];
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------- helpers

fn fail(msg: impl std::fmt::Display) -> Failed {
    Failed::from(msg.to_string())
}

fn kvm(e: KvmError) -> Failed {
    fail(format!("KVM guest: {e}"))
}

struct Memory {
    fd: OwnedFd,
    map: Arc<Mapping>,
}

fn memory(name: &str, bytes: u64) -> Result<Memory, Failed> {
    let fd = create_memfd(name, bytes).map_err(fail)?;
    let map = Arc::new(Mapping::new(fd.as_fd(), bytes as usize, Access::ReadWrite).map_err(fail)?);
    Ok(Memory { fd, map })
}

/// A fresh memfd holding a copy of `from`, like a destination that received
/// every page.
fn copy_of(from: &Mapping) -> Result<Memory, Failed> {
    let to = memory("kvm-test-copy", from.len() as u64)?;
    let mut buf = vec![0u8; MIB as usize];
    for off in (0..from.len()).step_by(buf.len()) {
        let n = buf.len().min(from.len() - off);
        from.read(off, &mut buf[..n]);
        to.map.write(off, &buf[..n]);
    }
    Ok(to)
}

/// A serial sink (memfd) and a handle to read it back.
fn serial() -> Result<(File, File), Failed> {
    let file = File::from(create_memfd("kvm-test-serial", 0).map_err(fail)?);
    let reader = file.try_clone().map_err(fail)?;
    Ok((file, reader))
}

fn serial_contents(reader: &File) -> Result<Vec<u8>, Failed> {
    let len = reader.metadata().map_err(fail)?.len() as usize;
    let mut out = vec![0u8; len];
    reader.read_exact_at(&mut out, 0).map_err(fail)?;
    Ok(out)
}

fn sector(code: &[u8]) -> [u8; 512] {
    let mut s = [0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

fn first_byte(mem: &Mapping, offset: u64) -> u8 {
    mem.atomic_bytes()[offset as usize].load(std::sync::atomic::Ordering::Relaxed)
}

/// The `ab` rule over `[start, end)`.
fn check_ab(mem: &Mapping, start: u64, end: u64) -> Result<(), Failed> {
    let pages = (start..end)
        .step_by(PAGE as usize)
        .map(|off| (off / PAGE, first_byte(mem, off)));
    let check = ab_violations(pages);
    if check.pages_checked != (end - start) / PAGE {
        return Err(fail(format!(
            "checked {} pages, expected {}",
            check.pages_checked,
            (end - start) / PAGE
        )));
    }
    if !check.bad_pages.is_empty() {
        let shown: Vec<String> = check
            .bad_pages
            .iter()
            .take(8)
            .map(|&p| format!("page {p:#x} = {}", first_byte(mem, p * PAGE)))
            .collect();
        return Err(fail(format!(
            "ab rule broken at {} pages over [{start:#x}, {end:#x}): {} (page {:#x} = {})",
            check.bad_pages.len(),
            shown.join(", "),
            start / PAGE,
            first_byte(mem, start)
        )));
    }
    Ok(())
}

/// Memory agrees with the serial count: each pass increments every page,
/// then writes one marker, so after `markers` markers the first and last page
/// hold `markers` or `markers + 1` (mod 256).
fn check_passes(mem: &Mapping, start: u64, end: u64, markers: u64) -> Result<(), Failed> {
    let m = markers as u8;
    for off in [start, end - PAGE] {
        let b = first_byte(mem, off);
        if b != m && b != m.wrapping_add(1) {
            return Err(fail(format!(
                "page at {off:#x} holds {b} after {markers} markers (expected {m} or {})",
                m.wrapping_add(1)
            )));
        }
    }
    Ok(())
}

/// Runs until at least `markers` markers were written and `min` has passed.
fn run_until(
    guest: &mut KvmGuest,
    markers: u64,
    min: Duration,
    max: Duration,
) -> Result<(), Failed> {
    let start = Instant::now();
    guest.run().map_err(kvm)?;
    while start.elapsed() < min || guest.serial_bytes() < markers {
        if let Some(f) = guest.failure() {
            return Err(fail(format!("vCPU failed while running: {f}")));
        }
        if start.elapsed() > max {
            return Err(fail(format!(
                "only {} markers after {max:?} (wanted {markers})",
                guest.serial_bytes()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    guest.stop().map_err(kvm)?;
    eprintln!(
        "  ran {:?}, {} markers; stop took {:?}",
        start.elapsed(),
        guest.serial_bytes(),
        t.elapsed()
    );
    Ok(())
}

fn check_serial(reader: &File, guest: &KvmGuest, marker: u8, earlier: u64) -> Result<(), Failed> {
    let out = serial_contents(reader)?;
    if out.len() as u64 + earlier != guest.serial_bytes() {
        return Err(fail(format!(
            "serial file has {} bytes (+{earlier} before restore), serial_bytes() says {}",
            out.len(),
            guest.serial_bytes()
        )));
    }
    if let Some(pos) = out.iter().position(|&b| b != marker) {
        return Err(fail(format!(
            "serial byte {pos} is {:#x}, expected marker {marker:#x}",
            out[pos]
        )));
    }
    Ok(())
}

// ----------------------------------------------------------------- trials

fn fixture_matches_source() -> TrialResult {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/boot");
    if let Err(e) = Command::new("as").arg("--version").output() {
        let reason = format!("skipped: cannot run GNU as (binutils): {e}");
        eprintln!("{reason}");
        return Ok(Completion::ignored_with(reason));
    }
    let tmp = std::env::temp_dir().join(format!("postcopy-fixture-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(fail)?;
    let obj = tmp.join("ab-fixed.o");
    let bin = tmp.join("ab-fixed.bin");
    let ok = Command::new("as")
        .args(["--32", "-o"])
        .arg(&obj)
        .arg(dir.join("ab-fixed.S"))
        .status()
        .map_err(fail)?
        .success()
        && Command::new("ld")
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
            .map_err(fail)?
            .success();
    let built = std::fs::read(&bin);
    std::fs::remove_dir_all(&tmp).ok();
    if !ok {
        return Err(fail("as/ld failed on ab-fixed.S"));
    }
    if built.map_err(fail)?.as_slice() != FIXTURE_SECTOR.as_slice() {
        return Err(fail("ab-fixed.bin is not what ab-fixed.S assembles to"));
    }
    Ok(Completion::Completed)
}

fn builtin_ab() -> Result<(), Failed> {
    let mem = memory("kvm-test", 64 * MIB)?;
    let (sink, reader) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), 1, sink).map_err(kvm)?;
    guest.boot(BUILTIN_SECTOR).map_err(kvm)?;
    run_until(
        &mut guest,
        1,
        Duration::from_millis(300),
        Duration::from_secs(60),
    )?;
    // stop() is idempotent.
    guest.stop().map_err(kvm)?;
    let markers = guest.serial_bytes();
    check_ab(&mem.map, KVM_AB_START, 64 * MIB)?;
    check_passes(&mem.map, KVM_AB_START, 64 * MIB, markers)?;
    check_serial(&reader, &guest, BUILTIN_MARKER, 0)?;
    // Stopped means stopped: memory does not move any more.
    let before = first_byte(&mem.map, KVM_AB_START);
    std::thread::sleep(Duration::from_millis(50));
    if first_byte(&mem.map, KVM_AB_START) != before || guest.serial_bytes() != markers {
        return Err(fail("the guest kept running after stop()"));
    }
    // Short run/stop cycles land stops everywhere in the loop, including in
    // the middle of the I/O exits: memory and marker count must still agree.
    for i in 0..40u64 {
        guest.run().map_err(kvm)?;
        std::thread::sleep(Duration::from_micros(500 + 700 * (i % 7)));
        guest.stop().map_err(kvm)?;
        check_ab(&mem.map, KVM_AB_START, 64 * MIB)?;
        check_passes(&mem.map, KVM_AB_START, 64 * MIB, guest.serial_bytes())?;
    }
    check_serial(&reader, &guest, BUILTIN_MARKER, 0)?;
    eprintln!("  after 40 short runs: {} markers", guest.serial_bytes());
    Ok(())
}

/// The PIT ticks, the PIC delivers, the UART raises its interrupt through
/// the irqfd: before a save and, restored into a copy, after it. A state
/// whose PIT was left out shows why it travels: no tick, no marker.
fn interrupts_survive_save_restore() -> Result<(), Failed> {
    use guest::kvm::state::VmState;
    let src = memory("kvm-test-irq", MIB)?;
    let (sink, reader) = serial()?;
    let mut source = KvmGuest::new(Arc::clone(&src.map), 1, sink).map_err(kvm)?;
    source.boot(INTERRUPTS_SECTOR).map_err(kvm)?;
    run_until(&mut source, 3, Duration::ZERO, Duration::from_secs(60))?;
    check_serial(&reader, &source, INTERRUPTS_MARKER, 0)?;
    let m1 = source.serial_bytes();
    let state = source.save().map_err(kvm)?;

    let dst = copy_of(&src.map)?;
    let (sink, reader) = serial()?;
    let mut dest = KvmGuest::new(Arc::clone(&dst.map), 1, sink).map_err(kvm)?;
    dest.restore(&state).map_err(kvm)?;
    run_until(&mut dest, m1 + 3, Duration::ZERO, Duration::from_secs(60))?;
    check_serial(&reader, &dest, INTERRUPTS_MARKER, m1)?;

    // The same state without the PIT: the timer never ticks again.
    let mut broken = VmState::decode(&state).map_err(kvm)?;
    broken.pit = Default::default();
    let other = copy_of(&src.map)?;
    let (sink, _reader) = serial()?;
    let mut lost = KvmGuest::new(Arc::clone(&other.map), 1, sink).map_err(kvm)?;
    lost.restore(&broken.encode().map_err(kvm)?).map_err(kvm)?;
    lost.run().map_err(kvm)?;
    // Seen running: a dozen markers' worth of time, and not one.
    std::thread::sleep(Duration::from_secs(3));
    lost.stop().map_err(kvm)?;
    if lost.serial_bytes() != m1 {
        return Err(fail(format!(
            "a guest restored without its PIT still wrote {} markers",
            lost.serial_bytes() - m1
        )));
    }
    Ok(())
}

fn save_restore() -> Result<(), Failed> {
    let src = memory("kvm-test-src", 64 * MIB)?;
    let (sink, _reader) = serial()?;
    let mut source = KvmGuest::new(Arc::clone(&src.map), 1, sink).map_err(kvm)?;
    source.boot(BUILTIN_SECTOR).map_err(kvm)?;
    run_until(
        &mut source,
        2,
        Duration::from_millis(300),
        Duration::from_secs(60),
    )?;
    let m1 = source.serial_bytes();
    let state = source.save().map_err(kvm)?;
    eprintln!("  state: {} bytes", state.len());
    let src_first = first_byte(&src.map, KVM_AB_START);

    let dst = copy_of(&src.map)?;
    drop(src.fd);
    let (sink, reader) = serial()?;
    let mut dest = KvmGuest::new(Arc::clone(&dst.map), 1, sink).map_err(kvm)?;
    dest.restore(&state).map_err(kvm)?;
    if dest.serial_bytes() != m1 {
        return Err(fail(format!(
            "restored serial count {} != saved {m1}",
            dest.serial_bytes()
        )));
    }
    if dest.restore(&state).is_ok() {
        return Err(fail("a second restore() was accepted"));
    }
    run_until(
        &mut dest,
        m1 + 2,
        Duration::from_millis(300),
        Duration::from_secs(60),
    )?;
    let m2 = dest.serial_bytes();
    check_ab(&dst.map, KVM_AB_START, 64 * MIB)?;
    check_passes(&dst.map, KVM_AB_START, 64 * MIB, m2)?;
    check_serial(&reader, &dest, BUILTIN_MARKER, m1)?;
    let dst_first = first_byte(&dst.map, KVM_AB_START);
    if dst_first == src_first && (m2 - m1) % 256 != 0 {
        return Err(fail("the restored guest's memory did not advance"));
    }
    // The source stayed stopped and was not touched by the destination.
    if first_byte(&src.map, KVM_AB_START) != src_first || source.serial_bytes() != m1 {
        return Err(fail("the source moved while stopped"));
    }
    // The restored guest saves again (a second migration).
    dest.save().map_err(kvm)?;
    Ok(())
}

fn fixture_ab() -> Result<(), Failed> {
    let bytes = 600 * MIB;
    let mem = memory("kvm-test-600", bytes)?;
    let (sink, reader) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), 2, sink).map_err(kvm)?;
    guest.boot(FIXTURE_SECTOR).map_err(kvm)?;
    run_until(
        &mut guest,
        1,
        Duration::from_millis(300),
        Duration::from_secs(180),
    )?;
    let (start, end) = FIXTURE_RANGE;
    check_ab(&mem.map, start, end)?;
    check_passes(&mem.map, start, end, guest.serial_bytes())?;
    check_serial(&reader, &guest, FIXTURE_MARKER, 0)?;
    // Above the range nothing was written.
    if (end..bytes)
        .step_by(PAGE as usize)
        .any(|o| first_byte(&mem.map, o) != 0)
    {
        return Err(fail("the fixture wrote above its range"));
    }
    // The AP never got SIPI; its state still saves.
    guest.save().map_err(kvm)?;
    Ok(())
}

fn halted_guest_stops() -> Result<(), Failed> {
    let mem = memory("kvm-test-hlt", 4 * MIB)?;
    let (sink, _reader) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), 2, sink).map_err(kvm)?;
    // cli; hlt; jmp back to hlt
    guest
        .boot(&sector(&[0xfa, 0xf4, 0xeb, 0xfd]))
        .map_err(kvm)?;
    for round in 0..3 {
        guest.run().map_err(kvm)?;
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        guest.stop().map_err(kvm)?;
        if t.elapsed() > Duration::from_secs(2) {
            return Err(fail(format!(
                "stop() of a halted guest took {:?}",
                t.elapsed()
            )));
        }
        eprintln!("  round {round}: stop took {:?}", t.elapsed());
        guest.stop().map_err(kvm)?;
        if let Some(f) = guest.failure() {
            return Err(fail(format!("a halted guest reported a failure: {f}")));
        }
        guest.save().map_err(kvm)?;
    }
    // Both vCPUs (a halted BSP, an AP waiting for SIPI) move to a copy and
    // stay as they were.
    let state = guest.save().map_err(kvm)?;
    let copy = copy_of(&mem.map)?;
    let (sink, _reader) = serial()?;
    let mut dest = KvmGuest::new(Arc::clone(&copy.map), 2, sink).map_err(kvm)?;
    dest.restore(&state).map_err(kvm)?;
    dest.run().map_err(kvm)?;
    std::thread::sleep(Duration::from_millis(100));
    dest.stop().map_err(kvm)?;
    dest.save().map_err(kvm)?;
    Ok(())
}

/// Loads an empty IDT, enters protected mode and executes ud2: #UD and the
/// #GP and #DF that follow find no IDT entry, so the CPU shuts down. (In real
/// mode, a CPU-less KVM such as this project's test machine's kvm_pvm
/// emulates interrupt delivery and was seen to ignore the IVT limit, so the
/// crash is done in protected mode.) Assembled from:
///
/// ```text
///   .code16
///   cli; lidtw idt0; lgdtw gdtr
///   movl %cr0, %eax; orb $1, %al; movl %eax, %cr0
///   ljmpw $0x08, $pm
///   .code32
/// pm: ud2
///   .p2align 3
/// gdt: .quad 0; .quad 0x00cf9a000000ffff
/// gdtr: .word 15; .long gdt
/// idt0: .word 0; .long 0
/// ```
const CRASH_CODE: [u8; 60] = [
    0xfa, 0x0f, 0x01, 0x1e, 0x36, 0x7c, 0x0f, 0x01, 0x16, 0x30, 0x7c, 0x0f, 0x20, 0xc0, 0x0c, 0x01,
    0x0f, 0x22, 0xc0, 0xea, 0x18, 0x7c, 0x08, 0x00, 0x0f, 0x0b, 0x8d, 0xb6, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x9a, 0xcf, 0x00,
    0x0f, 0x00, 0x20, 0x7c, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
];

fn triple_fault_is_reported() -> Result<(), Failed> {
    let mem = memory("kvm-test-crash", 4 * MIB)?;
    let (sink, _reader) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), 1, sink).map_err(kvm)?;
    guest.boot(&sector(&CRASH_CODE)).map_err(kvm)?;
    guest.run().map_err(kvm)?;
    let start = Instant::now();
    let failure = loop {
        if let Some(f) = guest.failure() {
            break f;
        }
        if start.elapsed() > Duration::from_secs(20) {
            guest.stop().ok();
            return Err(fail("no failure reported 20 s after a triple fault"));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    eprintln!("  reported: {failure}");
    if !failure.to_string().contains("SHUTDOWN") {
        return Err(fail(format!("unexpected failure: {failure}")));
    }
    let t = Instant::now();
    match guest.stop() {
        Err(KvmError::VcpuFailed(f)) if f == failure => {}
        other => return Err(fail(format!("stop() after a triple fault gave {other:?}"))),
    }
    if t.elapsed() > Duration::from_secs(2) {
        return Err(fail(format!("stop() took {:?}", t.elapsed())));
    }
    if !matches!(guest.save(), Err(KvmError::VcpuFailed(_))) {
        return Err(fail("save() of a crashed guest did not report the failure"));
    }
    if !matches!(guest.run(), Err(KvmError::VcpuFailed(_))) {
        return Err(fail("run() of a crashed guest did not report the failure"));
    }
    Ok(())
}

fn bad_sizes_are_refused() -> Result<(), Failed> {
    // Sparse: nothing is allocated, only the address space.
    let big = memory("kvm-test-big", KVM_MAX_MEM + PAGE)?;
    let (sink, _) = serial()?;
    match KvmGuest::new(Arc::clone(&big.map), 1, sink) {
        Err(e @ KvmError::MemSize { .. }) => eprintln!("  {e}"),
        other => return Err(fail(format!("3 GiB + 4 KiB gave {other:?}"))),
    }
    let mem = memory("kvm-test-small", 4 * MIB)?;
    let (sink, _) = serial()?;
    match KvmGuest::new(Arc::clone(&mem.map), 0, sink) {
        Err(e @ KvmError::VcpuCount { .. }) => eprintln!("  {e}"),
        other => return Err(fail(format!("0 vCPUs gave {other:?}"))),
    }
    let (sink, _) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), 1, sink).map_err(kvm)?;
    if !matches!(guest.run(), Err(KvmError::Sequence { .. })) {
        return Err(fail("run() before boot() was accepted"));
    }
    if !matches!(guest.boot(&[0u8; 100]), Err(KvmError::SectorSize(100))) {
        return Err(fail("a 100-byte sector was accepted"));
    }
    if !matches!(guest.restore(b"garbage"), Err(KvmError::State(_))) {
        return Err(fail("a garbage state was accepted"));
    }
    Ok(())
}
