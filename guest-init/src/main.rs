//! `postcopy-init`: the Linux guest's `/init`, built static. Mounts /proc
//! and /dev, reads its parameters from /proc/cmdline (see the library),
//! starts one writer per thread over its own slice of pages, and prints a
//! verdict line on the console every `report_ms`. It never exits (init
//! must not): bad parameters are reported and the machine is reset, which
//! ends the VM.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_init::{
    read_stamp, stamp_words, write_stamp, Mode, Params, Share, Stamp, Verdict, ERROR_PREFIX,
    FAIL_PREFIX, PAGE, RUNNING_MARKER, STALE_PREFIX,
};

const WORDS: usize = PAGE / 8;

/// Counters every writer adds to; the reporter reads them.
#[derive(Default)]
struct Totals {
    audited: AtomicU64,
    writes: AtomicU64,
    stale: AtomicU64,
    /// Threads whose first pass is done.
    stamped: AtomicU64,
    first_stale: Mutex<Option<String>>,
}

impl Totals {
    fn stale(&self, what: String) {
        if self.stale.fetch_add(1, Ordering::SeqCst) == 0 {
            say(&format!("{STALE_PREFIX}{what}"));
            *self.first_stale.lock().unwrap_or_else(|e| e.into_inner()) = Some(what);
        }
    }
}

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

/// Where a writer's pages live.
enum Pages {
    /// Anonymous memory: the slice's own mapping.
    Anon { base: *mut u64, pages: u64 },
    /// A page-cache file; the slice starts at `first` pages into it.
    File {
        file: Arc<File>,
        first: u64,
        pages: u64,
    },
}

// SAFETY: each writer owns its Anon mapping alone.
unsafe impl Send for Pages {}

impl Pages {
    fn len(&self) -> u64 {
        match self {
            Pages::Anon { pages, .. } | Pages::File { pages, .. } => *pages,
        }
    }

    fn read(&self, i: u64, buf: &mut [u64]) -> [u64; 4] {
        match self {
            Pages::Anon { base, .. } => {
                // SAFETY: i < pages; the mapping is ours and page-aligned.
                let page =
                    unsafe { std::slice::from_raw_parts(base.add(i as usize * WORDS), WORDS) };
                stamp_words(page)
            }
            Pages::File { file, first, .. } => {
                let bytes = as_bytes_mut(buf);
                if file
                    .read_exact_at(bytes, (first + i) * PAGE as u64)
                    .is_err()
                {
                    buf.fill(0);
                }
                stamp_words(buf)
            }
        }
    }

    fn write(&self, i: u64, index: u64, version: u64, buf: &mut [u64]) {
        match self {
            Pages::Anon { base, .. } => {
                // SAFETY: as in `read`; this thread is the only writer.
                let page =
                    unsafe { std::slice::from_raw_parts_mut(base.add(i as usize * WORDS), WORDS) };
                write_stamp(page, index, version);
            }
            Pages::File { file, first, .. } => {
                write_stamp(buf, index, version);
                let _ = file.write_all_at(as_bytes_mut(buf), (first + i) * PAGE as u64);
            }
        }
    }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
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
    let file = if p.mode == Mode::PageCache {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open("/pagecache")
            .map_err(|e| format!("/pagecache: {e}"))?;
        Some(Arc::new(f))
    } else {
        None
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
                file: Arc::clone(f),
                first: per * t,
                pages: count,
            },
            None => {
                let len = count as usize * PAGE;
                // SAFETY: a fresh private anonymous mapping, checked below.
                let base = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if base == libc::MAP_FAILED {
                    return Err(format!("mmap of {len} bytes failed"));
                }
                Pages::Anon {
                    base: base.cast(),
                    pages: count,
                }
            }
        };
        let totals = Arc::clone(&totals);
        let p = p.clone();
        let first_index = per * t;
        std::thread::Builder::new()
            .name(format!("writer{t}"))
            .spawn(move || writer(slice, first_index, t, &p, &totals))
            .map_err(|e| format!("cannot start writer {t}: {e}"))?;
    }
    report(&p, &totals, u64::from(threads))
}

fn report(p: &Params, totals: &Totals, threads: u64) -> ! {
    let start = Instant::now();
    let mut announced = false;
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
        match totals.stale.load(Ordering::SeqCst) {
            0 => say(&Verdict::ok_line(audited, secs, writes)),
            n => {
                let first = totals
                    .first_stale
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_default();
                say(&format!(
                    "{FAIL_PREFIX}{n} stale pages of {audited} audited (t={secs:.1}s), first: {first}"
                ))
            }
        }
    }
}

/// Paces a writer to `rate` page writes per second (0 = flat out).
struct Pacer {
    rate: u64,
    start: Instant,
    done: u64,
}

impl Pacer {
    fn tick(&mut self) {
        if self.rate == 0 {
            return;
        }
        self.done += 1;
        if !self.done.is_multiple_of(16) {
            return;
        }
        let due = Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// A small xorshift generator (no dependencies in /init).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Audits page `i` (global index `index`) against `expected`, then writes
/// `expected + 1`. Returns false if the page was stale.
fn step(
    pages: &Pages,
    i: u64,
    index: u64,
    expected: u64,
    buf: &mut [u64],
    totals: &Totals,
    thread: u64,
) -> bool {
    let ok = audit(pages, i, index, expected, buf, totals, thread);
    pages.write(i, index, expected + 1, buf);
    totals.writes.fetch_add(1, Ordering::Relaxed);
    ok
}

fn audit(
    pages: &Pages,
    i: u64,
    index: u64,
    expected: u64,
    buf: &mut [u64],
    totals: &Totals,
    thread: u64,
) -> bool {
    let found = read_stamp(pages.read(i, buf));
    totals.audited.fetch_add(1, Ordering::Relaxed);
    if found
        == (Stamp::Version {
            index,
            version: expected,
        })
    {
        return true;
    }
    totals.stale(format!(
        "page {index} (thread {thread}) holds {found}, expected version {expected}"
    ));
    false
}

fn writer(pages: Pages, first_index: u64, thread: u64, p: &Params, totals: &Totals) {
    let mut buf = vec![0u64; WORDS];
    let n = pages.len();
    let mut pacer = Pacer {
        rate: p.rate,
        start: Instant::now(),
        done: 0,
    };
    // First pass: stamp version 1 everywhere (nothing to audit yet).
    for i in 0..n {
        pages.write(i, first_index + i, 1, &mut buf);
        totals.writes.fetch_add(1, Ordering::Relaxed);
        pacer.tick();
    }
    totals.stamped.fetch_add(1, Ordering::SeqCst);
    match p.mode {
        Mode::Seq | Mode::PageCache => {
            let mut version = 1;
            loop {
                for i in 0..n {
                    step(
                        &pages,
                        i,
                        first_index + i,
                        version,
                        &mut buf,
                        totals,
                        thread,
                    );
                    pacer.tick();
                }
                version += 1;
            }
        }
        Mode::Random => {
            // Expected versions, kept by this thread (in guest memory too: a
            // stale table and stale pages would have to agree to hide).
            let mut versions = vec![1u64; n as usize];
            let hot = (n * u64::from(p.hot_percent) / 100).clamp(1, n);
            let mut rng = Rng(p.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (thread + 1));
            let mut sweep = 0u64;
            loop {
                for _ in 0..64 {
                    let r = rng.next();
                    let i = if r % 100 < u64::from(p.hot_ratio) {
                        (r >> 8) % hot
                    } else {
                        (r >> 8) % n
                    };
                    let v = versions[i as usize];
                    step(&pages, i, first_index + i, v, &mut buf, totals, thread);
                    versions[i as usize] = v + 1;
                    pacer.tick();
                }
                // The sweep reaches the pages the dice leave alone.
                for _ in 0..8 {
                    audit(
                        &pages,
                        sweep,
                        first_index + sweep,
                        versions[sweep as usize],
                        &mut buf,
                        totals,
                        thread,
                    );
                    sweep = (sweep + 1) % n;
                }
            }
        }
    }
}
