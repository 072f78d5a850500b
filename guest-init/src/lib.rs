//! What the Linux guest's `/init` (the `postcopy-init` program) and the host
//! agree on: its parameters on the kernel command line, the stamp it keeps in
//! every page it owns, and the lines it prints on the serial console. The
//! program itself is `main.rs`; the VMM, the supervisor and the tests use
//! this library to build its command line and to read its verdicts.
//!
//! The workload writes version stamps over its share of memory and audits
//! every page before it writes the next version (and, in `random` mode, in a
//! sweep over the cold pages too): a page that went back to an older
//! version, lost its contents, or arrived torn or at the wrong place is
//! reported as stale. The rule is the one QEMU's migration tests apply to
//! their `ab` guest, widened to every page and every version.

use std::fmt;

pub mod workload;

/// Prefix of every parameter on the kernel command line: `postcopy.mode=seq`.
/// A dotted name is never passed to `/init` as an argument or environment
/// variable and the kernel does not complain about it; `/init` reads it from
/// /proc/cmdline.
pub const PARAM_PREFIX: &str = "postcopy.";

/// Printed once, after the first pass has stamped every page, followed by
/// ` (uptime SECONDS s)` (the guest's /proc/uptime then): from here on
/// every page is audited. The VMM takes it as "booted".
pub const RUNNING_MARKER: &str = "postcopy-init: running";

/// Start of a verdict line that found nothing wrong.
pub const OK_PREFIX: &str = "ok: ";
/// Start of the line that names the first stale page.
pub const STALE_PREFIX: &str = "stale: ";
/// Start of a verdict line after a stale page was found.
pub const FAIL_PREFIX: &str = "FAIL: ";
/// Start of a line saying the parameters were refused.
pub const ERROR_PREFIX: &str = "postcopy-init: error: ";

/// First word of a stamped page.
pub const STAMP_MAGIC: u64 = 0x706f_7374_636f_7079; // "postcopy"
/// Bytes in a page.
pub const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;

/// How the workload writes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every thread stamps its pages in ascending order, pass after pass
    /// (QEMU's `ab` pattern with a whole version per page).
    Seq,
    /// Random pages, `hot_percent` of writes into a hot set at the start of
    /// each thread's slice; a sweep audits the cold pages as it goes.
    Random,
    /// Like `seq`, but through a file in the initramfs root (tmpfs): the
    /// pages are the kernel's page cache, written with pwrite and read back
    /// with pread.
    PageCache,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Seq => "seq",
            Mode::Random => "random",
            Mode::PageCache => "pagecache",
        }
    }
}

/// How much memory the workload takes.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Share {
    /// Percent of MemTotal.
    Percent(f64),
    /// Bytes.
    Bytes(u64),
}

/// The workload's parameters, from `postcopy.NAME=VALUE` on the kernel
/// command line (every one optional).
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// `postcopy.mode=seq|random|pagecache` (default seq).
    pub mode: Mode,
    /// `postcopy.mem=50%` or `postcopy.mem=64M`: memory stamped (default 50%).
    pub mem: Share,
    /// `postcopy.threads=N`: writer threads (default: one per online CPU).
    pub threads: Option<u32>,
    /// `postcopy.rate=N`: page writes per second per thread, 0 = flat out
    /// (default 0).
    pub rate: u64,
    /// `postcopy.hot=10`: random mode, hot set in percent of each slice.
    pub hot_percent: u32,
    /// `postcopy.hot_ratio=90`: random mode, percent of writes into it.
    pub hot_ratio: u32,
    /// `postcopy.seed=1`: random mode.
    pub seed: u64,
    /// `postcopy.report_ms=500`: interval of the verdict lines.
    pub report_ms: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            mode: Mode::Seq,
            mem: Share::Percent(50.0),
            threads: None,
            rate: 0,
            hot_percent: 10,
            hot_ratio: 90,
            seed: 1,
            report_ms: 500,
        }
    }
}

fn parse_bytes(v: &str) -> Result<u64, String> {
    let (num, mult) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{v:?} is not a size (e.g. 64M)"))
}

impl Params {
    /// Reads the `postcopy.*` words of a kernel command line; other words
    /// are ignored. An unknown `postcopy.` name or a bad value is an error
    /// naming it.
    pub fn from_cmdline(cmdline: &str) -> Result<Params, String> {
        let mut p = Params::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix(PARAM_PREFIX) else {
                continue;
            };
            let (key, v) = rest
                .split_once('=')
                .ok_or_else(|| format!("{word}: expected {PARAM_PREFIX}NAME=VALUE"))?;
            let num = |max: u64| -> Result<u64, String> {
                v.parse::<u64>()
                    .ok()
                    .filter(|n| *n <= max)
                    .ok_or_else(|| format!("{word}: expected a number up to {max}"))
            };
            match key {
                "mode" => {
                    p.mode = match v {
                        "seq" => Mode::Seq,
                        "random" => Mode::Random,
                        "pagecache" => Mode::PageCache,
                        _ => return Err(format!("{word}: mode is seq, random or pagecache")),
                    }
                }
                "mem" => {
                    p.mem = match v.strip_suffix('%') {
                        Some(pct) => {
                            let pct: f64 = pct
                                .parse()
                                .ok()
                                .filter(|x: &f64| *x > 0.0 && *x <= 95.0)
                                .ok_or_else(|| format!("{word}: a percentage in (0, 95]"))?;
                            Share::Percent(pct)
                        }
                        None => Share::Bytes(parse_bytes(v).map_err(|e| format!("{word}: {e}"))?),
                    }
                }
                "threads" => p.threads = Some(num(256)?.max(1) as u32),
                "rate" => p.rate = num(u64::MAX)?,
                "hot" => p.hot_percent = num(100)? as u32,
                "hot_ratio" => p.hot_ratio = num(100)? as u32,
                "seed" => p.seed = num(u64::MAX)?,
                "report_ms" => p.report_ms = num(3_600_000)?.max(10),
                _ => return Err(format!("{word}: unknown parameter {PARAM_PREFIX}{key}")),
            }
        }
        Ok(p)
    }

    /// The command-line words that give these parameters back.
    pub fn to_cmdline(&self) -> String {
        let mem = match self.mem {
            Share::Percent(p) => format!("{p}%"),
            Share::Bytes(b) => b.to_string(),
        };
        let mut out = format!(
            "{PARAM_PREFIX}mode={} {PARAM_PREFIX}mem={mem} {PARAM_PREFIX}rate={} \
             {PARAM_PREFIX}hot={} {PARAM_PREFIX}hot_ratio={} {PARAM_PREFIX}seed={} \
             {PARAM_PREFIX}report_ms={}",
            self.mode.name(),
            self.rate,
            self.hot_percent,
            self.hot_ratio,
            self.seed,
            self.report_ms
        );
        if let Some(t) = self.threads {
            out.push_str(&format!(" {PARAM_PREFIX}threads={t}"));
        }
        out
    }
}

/// The check word at the end of a stamped page: ties index and version
/// together so a torn page (new head, old tail) or a page from elsewhere
/// shows.
pub fn check_word(index: u64, version: u64) -> u64 {
    // splitmix64 of the pair.
    let mut z = index
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(version)
        .wrapping_add(0x6a09_e667_f3bc_c909);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Writes the stamp of `version` of page `index` into `page` (one page of
/// u64 words): magic, index, version at the start, the check word at the end.
pub fn write_stamp(page: &mut [u64], index: u64, version: u64) {
    page[0] = STAMP_MAGIC;
    page[1] = index;
    page[2] = version;
    page[WORDS - 1] = check_word(index, version);
}

/// What a page holds, read back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Stamp {
    /// Every stamp word is zero: never written, or its contents were lost.
    Empty,
    /// A whole stamp.
    Version { index: u64, version: u64 },
    /// Stamp words that do not agree (torn, or not a stamp).
    Garbled { words: [u64; 4] },
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stamp::Empty => f.write_str("nothing (zeros)"),
            Stamp::Version { index, version } => write!(f, "version {version} of page {index}"),
            Stamp::Garbled { words } => write!(
                f,
                "a garbled stamp (magic {:#x}, index {}, version {}, check {:#x})",
                words[0], words[1], words[2], words[3]
            ),
        }
    }
}

/// Reads the stamp words of a page.
pub fn read_stamp(words: [u64; 4]) -> Stamp {
    let [magic, index, version, check] = words;
    if words == [0; 4] {
        Stamp::Empty
    } else if magic == STAMP_MAGIC && check == check_word(index, version) {
        Stamp::Version { index, version }
    } else {
        Stamp::Garbled { words }
    }
}

/// The four stamp words of a page: first three and last.
pub fn stamp_words(page: &[u64]) -> [u64; 4] {
    [page[0], page[1], page[2], page[WORDS - 1]]
}

/// A verdict line as the host reads it from the serial log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `ok: N pages audited, 0 stale ...`
    Ok { audited: u64 },
    /// `stale: ...` or `FAIL: ...`
    Fail(String),
}

impl Verdict {
    /// Parses one line of serial output; None if it is not a verdict line
    /// (kernel messages, progress).
    pub fn parse(line: &str) -> Option<Verdict> {
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(rest) = line.strip_prefix(OK_PREFIX) {
            let (n, tail) = rest.split_once(" pages audited, ")?;
            if !tail.starts_with("0 stale") {
                return Some(Verdict::Fail(line.to_string()));
            }
            return Some(Verdict::Ok {
                audited: n.parse().ok()?,
            });
        }
        if line.starts_with(STALE_PREFIX)
            || line.starts_with(FAIL_PREFIX)
            || line.starts_with(ERROR_PREFIX)
        {
            return Some(Verdict::Fail(line.to_string()));
        }
        None
    }

    /// The verdict line the program prints while nothing was found.
    pub fn ok_line(audited: u64, secs: f64, writes: u64) -> String {
        format!("{OK_PREFIX}{audited} pages audited, 0 stale (t={secs:.1}s, {writes} writes)")
    }
}

/// Kernel messages that mean something went wrong in the guest: a WARN_ON,
/// a BUG or oops, a panic, a soft or hard lockup, an RCU stall, and any
/// clocksource message (at the default loglevel 5 only warnings and worse
/// are printed, so a clocksource line there is the watchdog's complaint).
pub const KERNEL_COMPLAINTS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "Kernel panic",
    "soft lockup",
    "hard LOCKUP",
    "rcu_sched self-detected stall",
    "rcu: INFO:",
    "clocksource",
];

/// The lines of a serial log that carry a [`KERNEL_COMPLAINTS`] pattern.
pub fn kernel_complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| KERNEL_COMPLAINTS.iter().any(|p| l.contains(p)))
        .collect()
}

/// The guest's uptime, seconds, when its workload started auditing (from
/// the [`RUNNING_MARKER`] line), if the log has it.
pub fn boot_seconds(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.starts_with(RUNNING_MARKER))?;
    let rest = line.split_once("(uptime ")?.1;
    rest.split_whitespace().next()?.parse().ok()
}

/// All verdicts in a serial log, in order.
pub fn verdicts(log: &str) -> Vec<Verdict> {
    log.lines().filter_map(Verdict::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip() {
        let p = Params {
            mode: Mode::Random,
            mem: Share::Percent(30.0),
            threads: Some(2),
            rate: 5000,
            hot_percent: 5,
            hot_ratio: 80,
            seed: 7,
            report_ms: 250,
        };
        let line = format!("console=ttyS0 {} quiet", p.to_cmdline());
        assert_eq!(Params::from_cmdline(&line).unwrap(), p);
        let b = Params::from_cmdline("postcopy.mem=64M").unwrap();
        assert_eq!(b.mem, Share::Bytes(64 << 20));
        assert_eq!(Params::from_cmdline("ro quiet").unwrap(), Params::default());
    }

    #[test]
    fn bad_params_are_named() {
        for (line, needle) in [
            ("postcopy.mode=fast", "postcopy.mode=fast"),
            ("postcopy.mem=0%", "postcopy.mem=0%"),
            ("postcopy.mem=12Q", "postcopy.mem=12Q"),
            ("postcopy.colour=red", "postcopy.colour"),
            ("postcopy.rate", "expected postcopy.NAME=VALUE"),
            ("postcopy.hot=101", "postcopy.hot=101"),
        ] {
            let e = Params::from_cmdline(line).unwrap_err();
            assert!(e.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn stamps_catch_torn_and_misplaced_pages() {
        let mut page = vec![0u64; WORDS];
        assert_eq!(read_stamp(stamp_words(&page)), Stamp::Empty);
        write_stamp(&mut page, 9, 4);
        assert_eq!(
            read_stamp(stamp_words(&page)),
            Stamp::Version {
                index: 9,
                version: 4
            }
        );
        // Head of version 5, tail of version 4: torn.
        page[2] = 5;
        assert!(matches!(
            read_stamp(stamp_words(&page)),
            Stamp::Garbled { .. }
        ));
        // A whole stamp of another page is read as such (the caller compares
        // the index).
        write_stamp(&mut page, 10, 4);
        assert_eq!(
            read_stamp(stamp_words(&page)),
            Stamp::Version {
                index: 10,
                version: 4
            }
        );
    }

    #[test]
    fn complaints_are_found() {
        let log = "[    0.1] Linux version 6.1\n[   30.2] watchdog: BUG: soft lockup - CPU#0 stuck for 22s!\n\
                   [   31.0] clocksource: timekeeping watchdog on CPU1: Marking clocksource 'tsc' as unstable\n\
                   ok: 5 pages audited, 0 stale (t=1.0s, 5 writes)\n";
        let found = kernel_complaints(log);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(kernel_complaints("ok: 1 pages audited, 0 stale\n").is_empty());
    }

    #[test]
    fn verdict_lines() {
        let log = "Linux version 6.1\nok: 100 pages audited, 0 stale (t=1.0s, 5 writes)\n\
                   stale: page 3 holds nothing\nFAIL: 1 stale page\n";
        let v = verdicts(log);
        assert_eq!(v[0], Verdict::Ok { audited: 100 });
        assert!(matches!(v[1], Verdict::Fail(_)));
        assert_eq!(v.len(), 3);
        let log = format!("x\n{RUNNING_MARKER} (uptime 2.31 s)\nok: 1 pages audited, 0 stale\n");
        assert_eq!(boot_seconds(&log), Some(2.31));
        assert_eq!(boot_seconds("ok: 1 pages audited, 0 stale\n"), None);
        assert_eq!(
            Verdict::parse(&Verdict::ok_line(7, 2.0, 9)),
            Some(Verdict::Ok { audited: 7 })
        );
    }
}
