//! `postcopy-init`: the Linux guest's `/init`, built static. Mounts /proc
//! and /dev, reads its parameters from /proc/cmdline (see the library),
//! starts one writer per thread over its own slice of pages, and prints a
//! verdict line on the console every `report_ms`. It never exits (init
//! must not): bad parameters are reported and the machine is reset, which
//! ends the VM.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_init::workload::{Pages, Totals, Writer};
use guest_init::{
    Mode, Params, Share, Verdict, ERROR_PREFIX, FAIL_PREFIX, PAGE, RUNNING_MARKER, STALE_PREFIX,
};

/// One whole line to the console (a single write, so lines of different
/// threads never interleave).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{line}\n").as_bytes());
    let _ = out.flush();
}

fn main() {
    setup_console();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let params = match Params::from_cmdline(&cmdline) {
        Ok(p) => p,
        Err(e) => give_up(&e),
    };
    if let Err(e) = run(params) {
        give_up(&e);
    }
}

fn give_up(why: &str) -> ! {
    say(&format!("{ERROR_PREFIX}{why}"));
    // SAFETY: sync and reboot take no pointers; as init we may reboot. The
    // VMM ends the VM on the reset.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_RESTART);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, fstype) = (c(source), c(target), c(fstype));
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        );
    }
}

/// The kernel opens /dev/console for init when the initramfs has it; this
/// initramfs holds only /init, so the console comes from devtmpfs.
fn setup_console() {
    mount("proc", "/proc", "proc");
    mount("devtmpfs", "/dev", "devtmpfs");
    if let Ok(console) = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 of an fd we own onto the standard fds.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

fn mem_total() -> Result<u64, String> {
    let info =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("/proc/meminfo: {e}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no MemTotal in /proc/meminfo".into())
}

fn run(p: Params) -> Result<(), String> {
    let total = mem_total()?;
    let bytes = match p.mem {
        Share::Percent(pct) => (total as f64 * pct / 100.0) as u64,
        Share::Bytes(b) => b,
    };
    let pages = bytes / PAGE as u64;
    // SAFETY: sysconf takes no pointers.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u32;
    let threads = p.threads.unwrap_or(cpus).max(1);
    if pages < u64::from(threads) * 2 {
        return Err(format!(
            "{bytes} bytes of {total} is too little for {threads} threads"
        ));
    }
    say(&format!(
        "postcopy-init: mode={} threads={threads} cpus={cpus} pages={pages} ({} MiB of {} MiB) rate={}",
        p.mode.name(),
        (pages * PAGE as u64) >> 20,
        total >> 20,
        p.rate
    ));
    // The page cache of the initramfs root (tmpfs): one file, a range per
    // writer.
    let file = match p.mode {
        Mode::PageCache => Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open("/pagecache")
                .map_err(|e| format!("/pagecache: {e}"))?,
        ),
        _ => None,
    };
    let totals = Arc::new(Totals::default());
    let per = pages / u64::from(threads);
    for t in 0..u64::from(threads) {
        let count = if t + 1 == u64::from(threads) {
            pages - per * t
        } else {
            per
        };
        let slice = match &file {
            Some(f) => Pages::File {
                file: f.try_clone().map_err(|e| format!("/pagecache: {e}"))?,
                first: per * t,
                pages: count,
            },
            None => Pages::anon(count)?,
        };
        let mut writer = Writer::new(slice, per * t, t, &p);
        let totals = Arc::clone(&totals);
        std::thread::Builder::new()
            .name(format!("writer{t}"))
            .spawn(move || loop {
                writer.run(1024, &totals);
            })
            .map_err(|e| format!("cannot start writer {t}: {e}"))?;
    }
    report(&p, &totals, u64::from(threads))
}

/// Every `report_ms`: a verdict line; once, the marker when every page is
/// stamped; once, the first stale page found.
fn report(p: &Params, totals: &Totals, threads: u64) -> ! {
    let start = Instant::now();
    let mut announced = false;
    let mut told_stale = false;
    loop {
        std::thread::sleep(Duration::from_millis(p.report_ms));
        if !announced && totals.stamped.load(Ordering::SeqCst) == threads {
            // The guest's uptime: kernel start to every page stamped.
            let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
            let uptime = uptime.split_whitespace().next().unwrap_or("?");
            say(&format!("{RUNNING_MARKER} (uptime {uptime} s)"));
            announced = true;
        }
        let audited = totals.audited.load(Ordering::SeqCst);
        let writes = totals.writes.load(Ordering::SeqCst);
        let secs = start.elapsed().as_secs_f64();
        match (totals.stale.load(Ordering::SeqCst), totals.first_stale()) {
            (0, _) | (_, None) => say(&Verdict::ok_line(audited, secs, writes)),
            (n, Some(first)) => {
                if !told_stale {
                    say(&format!("{STALE_PREFIX}{first}"));
                    told_stale = true;
                }
                say(&format!(
                    "{FAIL_PREFIX}{n} stale pages of {audited} audited (t={secs:.1}s), first: {first}"
                ))
            }
        }
    }
}
