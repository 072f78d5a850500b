//! The writers of the workload: each owns a slice of pages (anonymous
//! memory, or a range of a page-cache file), stamps every page once, then
//! audits each page against the version it last wrote there before it
//! writes the next. A [`Writer`] runs in steps so the same code serves
//! `/init` (forever, one thread per writer) and the host's tests (a few
//! steps, a page spoiled, a few more).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{read_stamp, stamp_words, write_stamp, Mode, Params, Stamp, PAGE};

const WORDS: usize = PAGE / 8;

/// Counters every writer adds to; the reporter reads them.
#[derive(Debug, Default)]
pub struct Totals {
    pub audited: AtomicU64,
    pub writes: AtomicU64,
    pub stale: AtomicU64,
    /// Writers whose first pass is done.
    pub stamped: AtomicU64,
    first_stale: Mutex<Option<String>>,
}

impl Totals {
    fn stale(&self, what: String) {
        self.stale.fetch_add(1, Ordering::SeqCst);
        let mut first = self.first_stale.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(what);
    }

    /// The first stale page found, described.
    pub fn first_stale(&self) -> Option<String> {
        self.first_stale
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Where a writer's pages live.
#[derive(Debug)]
pub enum Pages {
    /// Anonymous memory: the slice's own private mapping.
    Anon { base: *mut u64, pages: u64 },
    /// A page-cache file; the slice starts `first` pages into it.
    File { file: File, first: u64, pages: u64 },
}

// SAFETY: an Anon mapping is owned by the one Pages value that made it and
// is only touched through it.
unsafe impl Send for Pages {}

impl Pages {
    /// `pages` pages of fresh anonymous memory.
    pub fn anon(pages: u64) -> Result<Pages, String> {
        let len = pages as usize * PAGE;
        // SAFETY: a fresh private anonymous mapping; the result is checked.
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
            return Err(format!(
                "mmap of {len} bytes failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Pages::Anon {
            base: base.cast(),
            pages,
        })
    }

    pub fn len(&self) -> u64 {
        match self {
            Pages::Anon { pages, .. } | Pages::File { pages, .. } => *pages,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Page `i` of an anonymous slice, as words.
    fn anon_page(&mut self, i: u64) -> &mut [u64] {
        let Pages::Anon { base, pages } = *self else {
            unreachable!("only called on Anon");
        };
        assert!(i < pages, "page {i} of {pages}");
        // SAFETY: i < pages, the mapping is ours, page-aligned and lives
        // as long as self; the borrow of self keeps it exclusive.
        unsafe { std::slice::from_raw_parts_mut(base.add(i as usize * WORDS), WORDS) }
    }

    /// The stamp words of page `i` (`buf` is a page of scratch).
    pub fn read(&mut self, i: u64, buf: &mut [u64]) -> [u64; 4] {
        match self {
            Pages::Anon { .. } => stamp_words(self.anon_page(i)),
            Pages::File { file, first, .. } => {
                if file
                    .read_exact_at(as_bytes_mut(buf), (*first + i) * PAGE as u64)
                    .is_err()
                {
                    buf.fill(0);
                }
                stamp_words(buf)
            }
        }
    }

    /// Writes `version` of page `index` into page `i`.
    pub fn write(&mut self, i: u64, index: u64, version: u64, buf: &mut [u64]) {
        match self {
            Pages::Anon { .. } => write_stamp(self.anon_page(i), index, version),
            Pages::File { file, first, .. } => {
                write_stamp(buf, index, version);
                // A failed write shows as a stale page at the next audit.
                let _ = file.write_all_at(as_bytes_mut(buf), (*first + i) * PAGE as u64);
            }
        }
    }

    /// Overwrites page `i` with arbitrary bytes (tests: what a broken
    /// migration could leave there).
    pub fn spoil(&mut self, i: u64, bytes: &[u8]) {
        match self {
            Pages::Anon { .. } => {
                let page = self.anon_page(i);
                as_bytes_mut(page)[..bytes.len()].copy_from_slice(bytes);
            }
            Pages::File { file, first, .. } => {
                file.write_all_at(bytes, (*first + i) * PAGE as u64)
                    .expect("spoil a page-cache page");
            }
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        if let Pages::Anon { base, pages } = *self {
            // SAFETY: the mapping made in `anon`, unmapped once.
            unsafe { libc::munmap(base.cast(), pages as usize * PAGE) };
        }
    }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and any byte pattern is a valid u64.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
}

/// Paces a writer to `rate` page writes per second (0 = flat out).
#[derive(Debug)]
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

/// xorshift64: no dependencies in /init.
#[derive(Debug)]
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

/// Where a writer is.
#[derive(Debug)]
enum Phase {
    /// First pass, stamping version 1; next page.
    Stamping { next: u64 },
    /// seq and pagecache: the pages from `next` on hold `version`, those
    /// before it one more.
    Seq { version: u64, next: u64 },
    /// random: every page's expected version (kept by the writer, in guest
    /// memory too: a stale table and stale pages would have to agree to
    /// hide), and the cold-page sweep's position.
    Random {
        versions: Vec<u64>,
        rng: Rng,
        sweep: u64,
    },
}

/// One writer over its slice.
#[derive(Debug)]
pub struct Writer {
    pages: Pages,
    /// Global index of the slice's first page (stamped into every page).
    first_index: u64,
    thread: u64,
    mode: Mode,
    hot_percent: u32,
    hot_ratio: u32,
    seed: u64,
    pacer: Pacer,
    phase: Phase,
    buf: Vec<u64>,
}

impl Writer {
    pub fn new(pages: Pages, first_index: u64, thread: u64, p: &Params) -> Writer {
        Writer {
            pages,
            first_index,
            thread,
            mode: p.mode,
            hot_percent: p.hot_percent,
            hot_ratio: p.hot_ratio,
            seed: p.seed,
            pacer: Pacer {
                rate: p.rate,
                start: Instant::now(),
                done: 0,
            },
            phase: Phase::Stamping { next: 0 },
            buf: vec![0u64; WORDS],
        }
    }

    /// The writer's pages (tests spoil them between steps).
    pub fn pages_mut(&mut self) -> &mut Pages {
        &mut self.pages
    }

    /// True once every page holds a stamp.
    pub fn stamped(&self) -> bool {
        !matches!(self.phase, Phase::Stamping { .. })
    }

    /// Does `steps` page operations (a write, or an audit and a write, or
    /// a sweep audit).
    pub fn run(&mut self, steps: u64, totals: &Totals) {
        let n = self.pages.len();
        for _ in 0..steps {
            match &mut self.phase {
                Phase::Stamping { next } => {
                    let i = *next;
                    self.pages.write(i, self.first_index + i, 1, &mut self.buf);
                    totals.writes.fetch_add(1, Ordering::Relaxed);
                    *next += 1;
                    if *next == n {
                        totals.stamped.fetch_add(1, Ordering::SeqCst);
                        self.phase = match self.mode {
                            Mode::Seq | Mode::PageCache => Phase::Seq {
                                version: 1,
                                next: 0,
                            },
                            Mode::Random => Phase::Random {
                                versions: vec![1; n as usize],
                                rng: Rng(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                                    ^ (self.thread + 1)),
                                sweep: 0,
                            },
                        };
                    }
                }
                Phase::Seq { version, next } => {
                    let (i, v) = (*next, *version);
                    *next += 1;
                    if *next == n {
                        *next = 0;
                        *version += 1;
                    }
                    self.step(i, v, totals);
                }
                Phase::Random {
                    versions,
                    rng,
                    sweep,
                } => {
                    let r = rng.next();
                    // One step in 9 is a sweep audit of the next cold page.
                    if r % 9 == 0 {
                        let i = *sweep;
                        *sweep = (*sweep + 1) % n;
                        let v = versions[i as usize];
                        self.audit(i, v, totals);
                    } else {
                        let hot = (n * u64::from(self.hot_percent) / 100).clamp(1, n);
                        let i = if (r >> 4) % 100 < u64::from(self.hot_ratio) {
                            (r >> 12) % hot
                        } else {
                            (r >> 12) % n
                        };
                        let v = versions[i as usize];
                        versions[i as usize] = v + 1;
                        self.step(i, v, totals);
                    }
                }
            }
            self.pacer.tick();
        }
    }

    /// Audits page `i` against `expected`, then writes `expected + 1`.
    fn step(&mut self, i: u64, expected: u64, totals: &Totals) {
        self.audit(i, expected, totals);
        self.pages
            .write(i, self.first_index + i, expected + 1, &mut self.buf);
        totals.writes.fetch_add(1, Ordering::Relaxed);
    }

    fn audit(&mut self, i: u64, expected: u64, totals: &Totals) {
        let index = self.first_index + i;
        let found = read_stamp(self.pages.read(i, &mut self.buf));
        totals.audited.fetch_add(1, Ordering::Relaxed);
        if found
            != (Stamp::Version {
                index,
                version: expected,
            })
        {
            totals.stale(format!(
                "page {index} (thread {}) holds {found}, expected version {expected}",
                self.thread
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check_word;

    fn params(mode: Mode) -> Params {
        Params {
            mode,
            ..Params::default()
        }
    }

    fn pages(mode: Mode, n: u64) -> Pages {
        match mode {
            Mode::PageCache => {
                let path = std::env::temp_dir().join(format!(
                    "guest-init-test-{}-{:?}",
                    std::process::id(),
                    std::thread::current().id()
                ));
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&path)
                    .unwrap();
                std::fs::remove_file(&path).unwrap();
                Pages::File {
                    file,
                    first: 3,
                    pages: n,
                }
            }
            _ => Pages::anon(n).unwrap(),
        }
    }

    /// A writer that ran long enough to audit every page a few times.
    fn warmed(mode: Mode) -> (Writer, Totals) {
        let totals = Totals::default();
        let mut w = Writer::new(pages(mode, 64), 1000, 0, &params(mode));
        w.run(64 * 20, &totals);
        assert!(w.stamped());
        assert_eq!(
            totals.stale.load(Ordering::SeqCst),
            0,
            "{:?}",
            totals.first_stale()
        );
        assert!(totals.audited.load(Ordering::SeqCst) > 64);
        (w, totals)
    }

    fn caught(mode: Mode, spoil: impl Fn(&mut Pages)) -> String {
        let (mut w, totals) = warmed(mode);
        spoil(w.pages_mut());
        w.run(64 * 40, &totals);
        totals
            .first_stale()
            .unwrap_or_else(|| panic!("{mode:?}: a spoiled page went unseen"))
    }

    fn stamp_bytes(index: u64, version: u64) -> Vec<u8> {
        let mut page = vec![0u64; WORDS];
        write_stamp(&mut page, index, version);
        page.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn every_mode_runs_clean() {
        for mode in [Mode::Seq, Mode::Random, Mode::PageCache] {
            warmed(mode);
        }
    }

    #[test]
    fn a_page_set_back_one_version_is_caught() {
        for mode in [Mode::Seq, Mode::Random, Mode::PageCache] {
            let what = caught(mode, |p| {
                // Page 5 (index 1005) as it was a version ago (or two: the
                // writer may be on either side of it in its pass).
                let mut buf = vec![0u64; WORDS];
                let Stamp::Version { version, .. } = read_stamp(p.read(5, &mut buf)) else {
                    panic!("page 5 is not stamped");
                };
                p.spoil(5, &stamp_bytes(1005, version - 1));
            });
            assert!(what.starts_with("page 1005 "), "{mode:?}: {what}");
        }
    }

    #[test]
    fn a_lost_page_is_caught() {
        for mode in [Mode::Seq, Mode::Random, Mode::PageCache] {
            let what = caught(mode, |p| p.spoil(9, &[0u8; PAGE]));
            assert!(
                what.contains("page 1009 ") && what.contains("nothing"),
                "{what}"
            );
        }
    }

    #[test]
    fn a_torn_page_is_caught() {
        let what = caught(Mode::Seq, |p| {
            // The head of the next version, the tail of this one.
            let mut buf = vec![0u64; WORDS];
            let Stamp::Version { version, .. } = read_stamp(p.read(7, &mut buf)) else {
                panic!("page 7 is not stamped");
            };
            p.spoil(7, &stamp_bytes(1007, version + 1)[..PAGE / 2]);
        });
        assert!(what.contains("garbled"), "{what}");
    }

    #[test]
    fn a_misplaced_page_is_caught() {
        let what = caught(Mode::Seq, |p| {
            // Page 12's contents at page 11.
            let mut buf = vec![0u64; WORDS];
            let words = p.read(12, &mut buf);
            assert_eq!(words[3], check_word(1012, words[2]));
            p.spoil(11, &stamp_bytes(1012, words[2]));
        });
        assert!(what.contains("of page 1012"), "{what}");
    }
}
