//! The micro-VM booting Linux (the kernel and initramfs of
//! scripts/linux-guest.sh) against real KVM: two vCPUs come up through the
//! MP table, the guest's own workload audits its memory, the VM is saved and
//! restored into a copy of its memory and goes on auditing there; a page put
//! back to an older version is caught by the guest itself; a guest reboot
//! ends the VM through the i8042. Every trial is reported as ignored with
//! the reason ("skipped: ...") where KVM is not usable, where the kernel has
//! not been built, or where this KVM runs guest code too slowly to boot
//! Linux (measured, see `guest::kvm::linux_usable`).

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mem::{create_memfd, Access, Mapping};
use guest::kvm::linux::LinuxBoot;
use guest::kvm::{linux_usable, KvmError, KvmGuest};
use guest_init::{check_word, kernel_complaints, verdicts, Verdict, RUNNING_MARKER, STAMP_MAGIC};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Generous: a VMX/SVM host boots this in seconds.
const BOOT_DEADLINE: Duration = Duration::from_secs(180);
const BASE_CMDLINE: &str =
    "console=ttyS0 loglevel=5 reboot=k panic=-1 nomodule acpi=off i8042.noaux i8042.nomux i8042.dumbkbd";

fn linux_dir() -> PathBuf {
    std::env::var_os("POSTCOPY_LINUX_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest"))
}

/// Why the kernel and initramfs cannot be read, if they cannot.
fn files_missing() -> Option<String> {
    let dir = linux_dir();
    ["vmlinuz", "initrd.cpio.gz"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| !p.is_file())
        .map(|p| {
            format!(
                "no {} (build it with ./scripts/linux-guest.sh)",
                p.display()
            )
        })
}

fn skip_reason() -> Option<String> {
    files_missing().or_else(|| linux_usable().err())
}

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let skip = skip_reason();
    if let Some(reason) = &skip {
        eprintln!("skipped: {reason}");
    }
    let trial = |name: &'static str, f: fn() -> Result<(), Failed>| {
        let skip = skip.clone();
        Trial::ignorable_test(name, move || match skip {
            Some(reason) => {
                eprintln!("skipped: {name}: {reason}");
                Ok(Completion::ignored_with(format!("skipped: {reason}")))
            }
            None => f().map(|()| Completion::Completed),
        })
    };
    let files = files_missing();
    let loader_trial = |name: &'static str, f: fn() -> Result<(), Failed>| {
        let files = files.clone();
        Trial::ignorable_test(name, move || match files {
            Some(reason) => {
                eprintln!("skipped: {name}: {reason}");
                Ok(Completion::ignored_with(format!("skipped: {reason}")))
            }
            None => f().map(|()| Completion::Completed),
        })
    };
    let no_kvm = guest::kvm::kvm_usable().err();
    let kvm_trial = |name: &'static str, f: fn() -> Result<(), Failed>| {
        let no_kvm = no_kvm.clone();
        Trial::ignorable_test(name, move || match no_kvm {
            Some(reason) => {
                eprintln!("skipped: {name}: {reason}");
                Ok(Completion::ignored_with(format!("skipped: {reason}")))
            }
            None => f().map(|()| Completion::Completed),
        })
    };
    let trials = vec![
        kvm_trial(
            "saved_state_has_what_linux_needs",
            saved_state_has_what_linux_needs,
        ),
        loader_trial("linux_loader_lays_out_memory", loader_lays_out_memory),
        loader_trial("linux_loader_refuses_bad_input", loader_refuses_bad_input),
        trial("linux_2_vcpus_audit_save_restore", save_restore),
        trial(
            "linux_stale_page_is_caught_by_the_guest",
            stale_page_is_caught,
        ),
        trial("linux_reboot_ends_the_vm", reboot_ends_the_vm),
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
    _fd: OwnedFd,
    map: Arc<Mapping>,
}

fn memory(bytes: u64) -> Result<Memory, Failed> {
    let fd = create_memfd("kvm-linux-test", bytes).map_err(fail)?;
    let map = Arc::new(Mapping::new(fd.as_fd(), bytes as usize, Access::ReadWrite).map_err(fail)?);
    Ok(Memory { _fd: fd, map })
}

fn copy_of(from: &Mapping) -> Result<Memory, Failed> {
    let to = memory(from.len() as u64)?;
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
    let file = File::from(create_memfd("kvm-linux-serial", 0).map_err(fail)?);
    let reader = file.try_clone().map_err(fail)?;
    Ok((file, reader))
}

fn log_of(reader: &File) -> Result<String, Failed> {
    let len = reader.metadata().map_err(fail)?.len() as usize;
    let mut out = vec![0u8; len];
    reader.read_exact_at(&mut out, 0).map_err(fail)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn tail(s: &str) -> &str {
    let mut start = s.len().saturating_sub(3000);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// A fresh VM on fresh memory, booted (not yet running).
fn boot(vcpus: u32, mem_mib: u64, extra: &str) -> Result<(KvmGuest, Memory, File), Failed> {
    let mem = memory(mem_mib * MIB)?;
    let (sink, reader) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), vcpus, sink).map_err(kvm)?;
    guest.watch_serial_for(RUNNING_MARKER.as_bytes());
    let dir = linux_dir();
    let mut spec = LinuxBoot {
        kernel: File::open(dir.join("vmlinuz")).map_err(fail)?,
        initrd: Some(File::open(dir.join("initrd.cpio.gz")).map_err(fail)?),
        cmdline: format!("{BASE_CMDLINE} {extra}"),
    };
    guest.boot_linux(&mut spec).map_err(kvm)?;
    Ok((guest, mem, reader))
}

/// Runs until `done(log)` holds; fails on a vCPU failure, a failed
/// verdict or a kernel complaint, or after `deadline`.
fn run_until(
    guest: &mut KvmGuest,
    reader: &File,
    deadline: Duration,
    what: &str,
    done: impl Fn(&KvmGuest, &str) -> bool,
) -> Result<String, Failed> {
    let start = Instant::now();
    guest.run().map_err(kvm)?;
    loop {
        let log = log_of(reader)?;
        if let Some(f) = guest.failure() {
            return Err(fail(format!("vCPU failed: {f}\n{}", tail(&log))));
        }
        if let Some(Verdict::Fail(line)) = verdicts(&log)
            .into_iter()
            .find(|v| !matches!(v, Verdict::Ok { .. }))
        {
            return Err(fail(format!("the guest found a stale page: {line}")));
        }
        let complaints = kernel_complaints(&log);
        if !complaints.is_empty() {
            return Err(fail(format!("kernel complaints: {complaints:#?}")));
        }
        if done(guest, &log) {
            return Ok(log);
        }
        if start.elapsed() > deadline {
            return Err(fail(format!(
                "no {what} after {deadline:?}:\n{}",
                tail(&log)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Pages audited by the last `ok:` verdict in `log`.
fn last_audited(log: &str) -> Option<u64> {
    verdicts(log).into_iter().rev().find_map(|v| match v {
        Verdict::Ok { audited } => Some(audited),
        Verdict::Fail(_) => None,
    })
}

fn oks(log: &str) -> usize {
    verdicts(log)
        .iter()
        .filter(|v| matches!(v, Verdict::Ok { .. }))
        .count()
}

// ----------------------------------------------------------------- trials

fn read_u32(mem: &Mapping, at: u64) -> u32 {
    let mut b = [0u8; 4];
    mem.read(at as usize, &mut b);
    u32::from_le_bytes(b)
}

fn read_u64(mem: &Mapping, at: u64) -> u64 {
    let mut b = [0u8; 8];
    mem.read(at as usize, &mut b);
    u64::from_le_bytes(b)
}

/// The loader alone (no KVM): the zero page, e820 map, command line,
/// initramfs and MP table land where the boot protocol and the MP spec
/// put them. Offsets are boot_params' (Documentation/arch/x86/zero-page.rst).
fn loader_lays_out_memory() -> Result<(), Failed> {
    const ZERO_PAGE: u64 = 0x7000;
    let mem = memory(256 * MIB)?;
    let dir = linux_dir();
    let initrd_len = std::fs::metadata(dir.join("initrd.cpio.gz"))
        .map_err(fail)?
        .len();
    let cmdline = "console=ttyS0 postcopy.mem=10%";
    let mut spec = LinuxBoot {
        kernel: File::open(dir.join("vmlinuz")).map_err(fail)?,
        initrd: Some(File::open(dir.join("initrd.cpio.gz")).map_err(fail)?),
        cmdline: cmdline.into(),
    };
    let entry = guest::kvm::linux::load(&mem.map, 2, &mut spec).map_err(kvm)?;
    let m = &mem.map;
    let expect = |ok: bool, what: String| if ok { Ok(()) } else { Err(fail(what)) };
    expect(entry == 0x10_0200, format!("64-bit entry at {entry:#x}"))?;
    // Setup header: "HdrS", loader type, command line pointer.
    expect(
        read_u32(m, ZERO_PAGE + 0x202) == 0x5372_6448,
        "no HdrS in the zero page".into(),
    )?;
    let mut b = [0u8; 1];
    m.read((ZERO_PAGE + 0x210) as usize, &mut b);
    expect(b[0] == 0xff, format!("type_of_loader {:#x}", b[0]))?;
    let cmd_ptr = u64::from(read_u32(m, ZERO_PAGE + 0x228));
    let mut text = vec![0u8; cmdline.len() + 1];
    m.read(cmd_ptr as usize, &mut text);
    expect(
        &text[..cmdline.len()] == cmdline.as_bytes() && text[cmdline.len()] == 0,
        format!(
            "command line at {cmd_ptr:#x}: {:?}",
            String::from_utf8_lossy(&text)
        ),
    )?;
    // Initramfs: page-aligned, whole, at the top of RAM.
    let rd = u64::from(read_u32(m, ZERO_PAGE + 0x218));
    let rd_len = u64::from(read_u32(m, ZERO_PAGE + 0x21c));
    expect(
        rd_len == initrd_len
            && rd % PAGE == 0
            && rd + rd_len <= 256 * MIB
            && rd + rd_len + PAGE > 256 * MIB,
        format!("initramfs at {rd:#x}, {rd_len} bytes (file {initrd_len})"),
    )?;
    let mut magic = [0u8; 2];
    m.read(rd as usize, &mut magic);
    expect(
        magic == [0x1f, 0x8b],
        format!("initramfs does not start with gzip's magic: {magic:x?}"),
    )?;
    // e820: usable below the EBDA, reserved up to 1 MiB, usable above.
    let mut n = [0u8; 1];
    m.read((ZERO_PAGE + 0x1e8) as usize, &mut n);
    let e820: Vec<(u64, u64, u32)> = (0..u64::from(n[0]))
        .map(|i| {
            let at = ZERO_PAGE + 0x2d0 + 20 * i;
            (read_u64(m, at), read_u64(m, at + 8), read_u32(m, at + 16))
        })
        .collect();
    expect(
        e820 == [
            (0, 0x9_fc00, 1),
            (0x9_fc00, 0x6_0400, 2),
            (0x10_0000, 255 * MIB, 1),
        ],
        format!("e820 {e820:x?}"),
    )?;
    // MP floating pointer at 0xf0000, its table with 2 processor entries.
    let mut mp = [0u8; 16];
    m.read(0xf_0000, &mut mp);
    let sum = mp.iter().fold(0u8, |a, &x| a.wrapping_add(x));
    expect(
        &mp[..4] == b"_MP_" && sum == 0,
        format!("MP floating pointer {mp:x?}"),
    )?;
    let table = u64::from(read_u32(m, 0xf_0004));
    let mut head = [0u8; 44];
    m.read(table as usize, &mut head);
    // Walk the entries: processors are 20 bytes, every other kind 8.
    let count = u16::from_le_bytes([head[34], head[35]]);
    let (mut at, mut cpus) = (table + 44, 0);
    for _ in 0..count {
        let mut kind = [0u8; 1];
        m.read(at as usize, &mut kind);
        if kind[0] == 0 {
            cpus += 1;
            at += 20;
        } else {
            at += 8;
        }
    }
    expect(
        &head[..4] == b"PCMP" && cpus == 2,
        format!("MP table at {table:#x}: {cpus} CPUs"),
    )?;
    eprintln!("  entry {entry:#x}, initramfs at {rd:#x}, e820 {e820:x?}");
    Ok(())
}

/// The saved state of any KVM guest carries what a Linux guest depends on:
/// the kvmclock, async-PF, steal-time and PV-EOI MSRs, the TSC before its
/// deadline, the PIT, the UART; and a state from another version of the
/// layout is refused by name.
fn saved_state_has_what_linux_needs() -> Result<(), Failed> {
    use guest::kvm::state::{VmState, STATE_VERSION};
    let mem = memory(2 * MIB)?;
    let (sink, _) = serial()?;
    let mut guest = KvmGuest::new(Arc::clone(&mem.map), 2, sink).map_err(kvm)?;
    guest.boot(&guest::kvm::BUILTIN_SECTOR[..]).map_err(kvm)?;
    let bytes = guest.save().map_err(kvm)?;
    let state = VmState::decode(&bytes).map_err(kvm)?;
    for (cpu, v) in state.vcpus.iter().enumerate() {
        let pos = |index: u32| v.msrs.iter().position(|&(i, _)| i == index);
        for (index, name) in [
            (0x4b56_4d01, "MSR_KVM_SYSTEM_TIME_NEW"),
            (0x4b56_4d00, "MSR_KVM_WALL_CLOCK_NEW"),
            (0x4b56_4d02, "MSR_KVM_ASYNC_PF_EN"),
            (0x4b56_4d03, "MSR_KVM_STEAL_TIME"),
            (0x4b56_4d04, "MSR_KVM_PV_EOI_EN"),
            (0x10, "MSR_IA32_TSC"),
            (0x6e0, "MSR_IA32_TSC_DEADLINE"),
        ] {
            if pos(index).is_none() {
                return Err(fail(format!(
                    "vCPU {cpu}: {name} ({index:#x}) is not saved"
                )));
            }
        }
        if pos(0x10) > pos(0x6e0) {
            return Err(fail("the TSC deadline is restored before the TSC"));
        }
    }
    eprintln!(
        "  {} bytes, {} MSRs per vCPU, PIT channel 0 mode {}",
        bytes.len(),
        state.vcpus[0].msrs.len(),
        state.pit.channels[0].mode
    );
    // Another layout version is refused, naming both.
    let mut other = VmState::decode(&bytes).map_err(kvm)?;
    other.version = STATE_VERSION + 1;
    let err = match VmState::decode(&other.encode().map_err(kvm)?) {
        Ok(_) => return Err(fail("a state of another version was accepted")),
        Err(e) => e.to_string(),
    };
    if !err.contains(&format!("state version {}", STATE_VERSION + 1)) {
        return Err(fail(format!("unclear refusal: {err}")));
    }
    Ok(())
}

/// What the loader refuses, each with the reason named.
fn loader_refuses_bad_input() -> Result<(), Failed> {
    let dir = linux_dir();
    let load = |mem_mib: u64, kernel: File, cmdline: String| -> Result<String, Failed> {
        let mem = memory(mem_mib * MIB)?;
        let mut spec = LinuxBoot {
            kernel,
            initrd: Some(File::open(dir.join("initrd.cpio.gz")).map_err(fail)?),
            cmdline,
        };
        match guest::kvm::linux::load(&mem.map, 1, &mut spec) {
            Ok(_) => Err(fail("loaded")),
            Err(e) => Ok(e.to_string()),
        }
    };
    let kernel = || File::open(dir.join("vmlinuz")).map_err(fail);
    let junk = File::from(create_memfd("junk-kernel", 0).map_err(fail)?);
    junk.write_all_at(&[0x5a; 8192], 0).map_err(fail)?;
    for (got, needle) in [
        (
            load(256, junk, "x".into())?,
            "neither a vmlinux ELF nor a bootable bzImage",
        ),
        (
            load(32, kernel()?, "x".into())?,
            "32 MiB of memory cannot hold the kernel",
        ),
        (
            load(256, kernel()?, "y".repeat(5000))?,
            "the command line has 5000 bytes",
        ),
        (load(256, kernel()?, "a\0b".into())?, "no NUL"),
    ] {
        if !got.contains(needle) {
            return Err(fail(format!("expected {needle:?}, got {got:?}")));
        }
    }
    Ok(())
}

fn save_restore() -> Result<(), Failed> {
    let (mut source, mem, reader) = boot(2, 256, "postcopy.mem=25% postcopy.report_ms=200")?;
    let t = Instant::now();
    let log = run_until(
        &mut source,
        &reader,
        BOOT_DEADLINE,
        "workload marker",
        |g, _| g.marker_seen(),
    )?;
    eprintln!(
        "  booted to the workload's first full pass in {:?}",
        t.elapsed()
    );
    if !log.contains("threads=2 cpus=2") {
        return Err(fail(format!(
            "the workload does not see 2 online CPUs:\n{}",
            tail(&log)
        )));
    }
    let before = oks(&log);
    let log = run_until(
        &mut source,
        &reader,
        Duration::from_secs(60),
        "two more verdicts",
        |_, l| oks(l) >= before + 2,
    )?;
    source.stop().map_err(kvm)?;
    let audited = last_audited(&log).ok_or_else(|| fail("no ok verdict"))?;
    let state = source.save().map_err(kvm)?;
    eprintln!(
        "  {audited} pages audited on the source; state {} bytes",
        state.len()
    );

    let copy = copy_of(&mem.map)?;
    let (sink, dest_reader) = serial()?;
    let mut dest = KvmGuest::new(Arc::clone(&copy.map), 2, sink).map_err(kvm)?;
    dest.restore(&state).map_err(kvm)?;
    if !dest.marker_seen() {
        return Err(fail("the restored VM forgot that its workload runs"));
    }
    let log = run_until(
        &mut dest,
        &dest_reader,
        Duration::from_secs(60),
        "a later verdict",
        |_, l| last_audited(l).is_some_and(|n| n > audited),
    )?;
    dest.stop().map_err(kvm)?;
    eprintln!(
        "  restored copy: {} pages audited, serial {} bytes",
        last_audited(&log).unwrap_or(0),
        log.len()
    );
    // The source, stopped, never runs again; its memory is untouched since.
    Ok(())
}

/// Stamped pages in guest memory: (guest physical page, index, version).
fn stamped_pages(mem: &Mapping, limit: usize) -> Vec<(u64, u64, u64)> {
    let mut found = Vec::new();
    let mut words = [0u8; 24];
    let mut last = [0u8; 8];
    for page in (16 * MIB / PAGE)..(mem.len() as u64 / PAGE) {
        let off = (page * PAGE) as usize;
        mem.read(off, &mut words);
        let w = |i: usize| u64::from_le_bytes(words[i * 8..i * 8 + 8].try_into().unwrap());
        if w(0) != STAMP_MAGIC {
            continue;
        }
        mem.read(off + PAGE as usize - 8, &mut last);
        if u64::from_le_bytes(last) == check_word(w(1), w(2)) {
            found.push((page, w(1), w(2)));
            if found.len() == limit {
                break;
            }
        }
    }
    found
}

fn stale_page_is_caught() -> Result<(), Failed> {
    let (mut guest, mem, reader) = boot(1, 192, "postcopy.mem=20% postcopy.report_ms=200")?;
    run_until(
        &mut guest,
        &reader,
        BOOT_DEADLINE,
        "workload marker",
        |g, _| g.marker_seen(),
    )?;
    guest.stop().map_err(kvm)?;
    // Several pages, spread out: the writer may have read one of them
    // already and be about to write it, which would hide that one.
    let all = stamped_pages(&mem.map, usize::MAX);
    if all.len() < 64 {
        return Err(fail(format!("only {} stamped pages in memory", all.len())));
    }
    let chosen: Vec<_> = all.iter().step_by(all.len() / 8).take(8).copied().collect();
    for &(page, index, version) in &chosen {
        // One version back: what a page the migration forgot to resend holds.
        let old = version.saturating_sub(1);
        let off = (page * PAGE) as usize;
        mem.map.write(off + 16, &old.to_le_bytes());
        mem.map.write(
            off + PAGE as usize - 8,
            &check_word(index, old).to_le_bytes(),
        );
    }
    let indices: Vec<u64> = chosen.iter().map(|c| c.1).collect();
    guest.run().map_err(kvm)?;
    let start = Instant::now();
    loop {
        let log = log_of(&reader)?;
        if let Some(line) = log
            .lines()
            .find(|l| l.starts_with(guest_init::STALE_PREFIX))
        {
            let named = indices
                .iter()
                .any(|i| line.starts_with(&format!("stale: page {i} ")));
            if !named {
                return Err(fail(format!(
                    "a stale page, but not one of {indices:?}: {line}"
                )));
            }
            eprintln!("  caught: {line}");
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(fail(format!(
                "pages {indices:?} set back one version, the guest never said so:\n{}",
                tail(&log)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    guest.stop().map_err(kvm)?;
    Ok(())
}

fn reboot_ends_the_vm() -> Result<(), Failed> {
    let (mut guest, _mem, reader) = boot(1, 192, "postcopy.mode=bogus")?;
    guest.run().map_err(kvm)?;
    let start = Instant::now();
    let failure = loop {
        if let Some(f) = guest.failure() {
            break f;
        }
        if start.elapsed() > BOOT_DEADLINE {
            return Err(fail(format!(
                "the guest was told to reboot and still runs:\n{}",
                tail(&log_of(&reader)?)
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = guest.stop();
    let log = log_of(&reader)?;
    if !failure.reason.contains("i8042") {
        return Err(fail(format!("ended, but not through the i8042: {failure}")));
    }
    if !log.contains("postcopy-init: error: postcopy.mode=bogus") {
        return Err(fail(format!("no error line from /init:\n{}", tail(&log))));
    }
    eprintln!("  {failure}");
    Ok(())
}
