//! The command line (README "CLI reference" is its user-facing description).

use crate::chaos::Chaos;
use crate::net::Transport;
use crate::tls::{Tls, TlsFiles};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

use common::control::{PostcopyMode, VerifyMethod};
use common::guest::{
    GuestConfig, GuestKind, LinuxSpec, RandomParams, Workload, KVM_AB_START, KVM_MAX_MEM,
    KVM_MIN_MEM, LINUX_MIN_MEM,
};
use common::types::{parse_size, MemLayout, PAGE_SIZE};

#[derive(Parser, Debug)]
#[command(
    name = "postcopy",
    version,
    about = "Live migration with precopy then postcopy, as a pipeline of small processes"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Migrate a guest between two ends on this machine over loopback TCP,
    /// then check its memory and print the report.
    Demo(DemoArgs),
    /// Start a guest here, let it run, and migrate it to `--to`.
    Migrate(MigrateArgs),
    /// Wait for a migration on `--listen` and run the guest it brings.
    Incoming(IncomingArgs),
    /// Switch a running migration (started with --postcopy manual or auto)
    /// to postcopy now (QMP migrate-start-postcopy).
    StartPostcopy(ClientArgs),
    /// Try the destination again now, of a postcopy migration paused by a
    /// lost link or by `pause` (it retries by itself with backoff after a
    /// lost link), at `--to` if given (QMP migrate-recover).
    Recover(RecoverArgs),
    /// Print a running migration's state and figures (`--json`: the
    /// control socket's `query` answer as it is).
    Status(StatusArgs),
    /// Follow a running migration: a live view that redraws, and its
    /// events, until it ends.
    Watch(ClientArgs),
    /// Cancel a migration before the switch: the source guest runs on
    /// (QMP migrate_cancel). Refused once the destination may hold the only
    /// live copy.
    Cancel(ClientArgs),
    /// Break the link of a migration in postcopy on purpose; `recover`
    /// resumes it (QMP migrate-pause).
    Pause(ClientArgs),
    /// Change a parameter while the migration runs: max-bandwidth,
    /// max-postcopy-bandwidth (bytes/s, `64M`, 0 = unlimited),
    /// downtime-limit (ms), postcopy (auto, manual, never).
    Set(SetArgs),
    /// Migrate again a guest kept after a cancel or failure (`migrate
    /// --keep-guest`), to `--to` if given.
    Retry(RecoverArgs),
    /// End a `migrate --keep-guest` waiting with its guest after a cancel
    /// or failure (the guest goes with it).
    Quit(ClientArgs),
    /// Print the summary of a report saved with `--json`; with `--plot`,
    /// draw its timeline (both hosts on one time axis when the other
    /// host's report of the same migration is given too).
    Report(ReportArgs),
    /// Measure: scenarios of migrations (ours beside QEMU's where
    /// installed) and baselines on the same links, written as JSON and
    /// Markdown tables.
    Bench(crate::bench::BenchArgs),
}

/// Which migration a client talks to.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The migration's control socket (default: the only source running
    /// on this host, else the only destination).
    #[arg(long, alias = "socket")]
    pub control: Option<PathBuf>,
    /// Talk to the destination's control socket (`incoming`) instead.
    #[arg(long)]
    pub destination: bool,
}

impl ClientArgs {
    /// The side to look for when `--control` is not given.
    pub fn side(&self) -> Option<&'static str> {
        self.destination.then_some("destination")
    }
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Print the control socket's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// A report written by `--json` (the source's or the destination's).
    pub report: PathBuf,
    /// The other host's report of the same migration.
    pub other: Option<PathBuf>,
    /// Draw bandwidth, pending pages, faults and fault latency over time,
    /// with the state changes marked, to this file (`.svg` or `.png`).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct RecoverArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// A new address for the destination, ADDR:PORT.
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct SetArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// max-bandwidth, max-postcopy-bandwidth, downtime-limit or postcopy.
    pub key: String,
    pub value: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestArg {
    Process,
    Kvm,
    /// The KVM micro-VM booting Linux (--kernel, --initrd, --cmdline).
    Linux,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    Ab,
    Random,
    Idle,
    /// linux: stamps through a page-cache file.
    Pagecache,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum PostcopyArg {
    Never,
    Auto,
    Manual,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum VerifyArg {
    None,
    Auto,
    Ab,
    Digest,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// A bandwidth: a size per second (`64M`), 0 for unlimited, at least 1 MiB/s.
pub fn bandwidth_arg(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Ok(0),
        b if b < 1 << 20 => Err(format!(
            "{b} bytes/s is too slow to migrate anything: use 0 (unlimited) or at least 1M"
        )),
        b => Ok(b),
    }
}

#[derive(Args, Debug, Clone)]
pub struct GuestArgs {
    /// Which guest to run.
    #[arg(long, value_enum, default_value = "process")]
    pub guest: GuestArg,
    /// Guest memory (256M, 1G, ...).
    #[arg(long, value_parser = size_arg, default_value = "1G")]
    pub mem: u64,
    /// Worker threads (process guest) or vCPUs (KVM guest).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub vcpus: u32,
    /// What the process guest does with its memory.
    #[arg(long, value_enum, default_value = "ab")]
    pub workload: WorkloadArg,
    /// random: size of the hot set, as a size or a percentage of memory.
    #[arg(long, default_value = "10%")]
    pub hot_set: String,
    /// random: percent of writes that land in the hot set.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub hot_ratio: u32,
    /// random: writes per second per worker (0 = as fast as possible).
    #[arg(long, default_value_t = 20000)]
    pub write_rate: u64,
    /// random: seed of the generators.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// kvm: a 512-byte boot sector to run instead of the built-in workload.
    #[arg(long)]
    pub boot_sector: Option<PathBuf>,
    /// linux: the kernel, a bzImage or vmlinux (default: built by
    /// scripts/linux-guest.sh into target/linux-guest/).
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// linux: the initramfs (default: the one beside the default kernel,
    /// whose /init is the project's workload).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// linux: the kernel command line, without the workload's words (those
    /// come first, from --workload, --write-rate, ...; a postcopy.* word
    /// here overrides them).
    #[arg(long, default_value = LINUX_BASE_CMDLINE)]
    pub cmdline: String,
    /// How long the guest runs, once booted (ab: memory zeroed; idle: memory
    /// filled; KVM: first serial marker; linux: the workload's first pass),
    /// before the migration starts.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,
}

#[derive(Args, Debug, Clone)]
pub struct MigrationArgs {
    /// When to switch to postcopy.
    #[arg(long, value_enum, default_value = "auto")]
    pub postcopy: PostcopyArg,
    /// manual: switch after this many dirty syncs.
    #[arg(long)]
    pub postcopy_after_syncs: Option<u32>,
    /// Longest acceptable stop of the guest, in ms.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub downtime_limit: u64,
    /// Precopy bandwidth limit of the main stream, bytes per second (0 =
    /// unlimited; otherwise at least 1M).
    #[arg(long, value_parser = bandwidth_arg, default_value = "0")]
    pub max_bandwidth: u64,
    /// Bandwidth limit of the main stream after the switch to postcopy
    /// (the background push), bytes per second (0 = unlimited; otherwise
    /// at least 1M). Requested pages are never limited.
    #[arg(long, value_parser = bandwidth_arg, default_value = "0")]
    pub max_postcopy_bandwidth: u64,
    /// Postcopy read-ahead: after answering a page request, the source also
    /// sends up to this many of the following pages on the urgent
    /// connection (0 = none, at most 256). Off by default: measured on a
    /// guest that walks memory in order, it helped in one run and hurt in
    /// two (docs/protocol.md, REQUEST).
    #[arg(long, default_value_t = common::msg::PREFETCH_PAGES, value_parser = clap::value_parser!(u32).range(0..=256))]
    pub prefetch_pages: u32,
    /// Bulk streams (TCP connections carrying pages), the main stream
    /// included, 1..=16, in precopy and after the switch. Each page is
    /// pinned to one stream (docs/protocol.md, "Parallel bulk streams").
    /// Default: min(4, CPUs / 2), at least 1: each stream costs a sending
    /// and a receiving thread, so on a machine with few CPUs more streams
    /// only take CPU time from the guest and the fault path (1 on 2 CPUs).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=common::wire::MAX_STREAMS as i64))]
    pub streams: Option<u32>,
    /// How to check the destination's memory afterwards.
    #[arg(long, value_enum, default_value = "auto")]
    pub verify: VerifyArg,
    /// Byte range for `--verify ab` (START-END, hex or sizes).
    #[arg(long)]
    pub verify_range: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// kvm: where the source guest's serial output goes.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// The control socket (docs/control.md; default:
    /// /run/postcopy/migrate-PID.sock).
    #[arg(long, alias = "command-socket", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Seconds of silence after which the peer counts as lost.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub link_timeout: u64,
    /// How often each data role (ram-sender, page-server; on the
    /// destination the fault-handler) may be started again after it died
    /// before the migration fails instead.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub max_restarts: u32,
    /// Kill data roles at chosen points (tests of restart and recovery):
    /// `ROLE@PHASE[+DELAY],...` or `random:N:SEED` (see
    /// docs/state-machine.md).
    #[arg(long, value_parser = chaos_arg)]
    pub chaos: Option<Chaos>,
    /// User the roles drop to once they hold their fds (default: `postcopy`
    /// if it exists, else `nobody`; a uid-0 user keeps them as root).
    #[arg(long, value_name = "USER")]
    pub role_user: Option<String>,
    /// No live progress and no summary on stdout (the --json report is
    /// still written).
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// Mutual TLS 1.3 on every connection between the hosts: all three
/// files, or none (plain TCP).
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This host's certificate, PEM (then any intermediates). With
    /// --tls-key and --tls-ca every connection between the hosts is mutual
    /// TLS 1.3.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This host's private key, PEM.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The CA, PEM, that the peer's certificate must chain to.
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            ca: self.tls_ca.clone()?,
        })
    }

    /// TLS with these files (their problems named), or plain TCP without.
    pub fn transport(&self, hostname: Option<String>) -> Result<Transport, String> {
        match self.files() {
            None if hostname.is_some() => {
                Err("--tls-hostname needs --tls-cert, --tls-key and --tls-ca".into())
            }
            None => Ok(Transport::Tcp),
            Some(f) => Ok(Transport::Tls(std::sync::Arc::new(Tls::load(
                &f, hostname,
            )?))),
        }
    }
}

fn chaos_arg(s: &str) -> Result<Chaos, String> {
    Chaos::parse(s)
}

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mig: MigrationArgs,
    /// kvm: where the destination guest's serial output goes.
    #[arg(long)]
    pub dest_serial_log: Option<PathBuf>,
    /// Mutual TLS 1.3 with a throwaway test CA and certificates the demo
    /// makes (in a temporary directory) for both ends.
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    /// Destination, ADDR:PORT.
    #[arg(long)]
    pub to: String,
    /// With TLS: the name the destination's certificate must carry
    /// (default: the host of --to).
    #[arg(long, value_name = "NAME")]
    pub tls_hostname: Option<String>,
    #[command(flatten)]
    pub guest: GuestArgs,
    #[command(flatten)]
    pub mig: MigrationArgs,
    /// After a cancel, or a failure that left the guest running here, keep
    /// the guest and wait for `postcopy retry` (or `postcopy quit`) on the
    /// control socket instead of ending.
    #[arg(long)]
    pub keep_guest: bool,
}

#[derive(Args, Debug, Clone)]
pub struct IncomingArgs {
    /// Address to listen on, ADDR:PORT.
    #[arg(long, required_unless_present = "listen_fd")]
    pub listen: Option<String>,
    /// An already listening socket (used by `demo`).
    #[arg(long, hide = true)]
    pub listen_fd: Option<i32>,
    /// Write the destination's report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// kvm: where the destination guest's serial output goes.
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Give up if no migration arrives within this many seconds (0 = wait).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=31_536_000))]
    pub accept_timeout: u64,
    /// Seconds of silence after which the peer counts as lost.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(2..=3600))]
    pub link_timeout: u64,
    /// How often the fault-handler may be started again after it died
    /// before the migration fails instead.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub max_restarts: u32,
    /// The control socket (docs/control.md; default:
    /// /run/postcopy/incoming-PID.sock).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Kill the fault-handler at chosen points (see `migrate --chaos`).
    #[arg(long, value_parser = chaos_arg)]
    pub chaos: Option<Chaos>,
    /// No live progress and no summary on stdout (the --json report is
    /// still written; the demo runs its destination so).
    #[arg(long)]
    pub quiet: bool,
    /// User the roles drop to once they hold their fds (default: `postcopy`
    /// if it exists, else `nobody`; a uid-0 user keeps them as root).
    #[arg(long, value_name = "USER")]
    pub role_user: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// What `tls` came to (loaded before the wait starts).
    #[arg(skip)]
    pub transport: Transport,
}

/// Everything the source needs, checked.
#[derive(Debug, Clone)]
pub struct SourceOpts {
    pub guest: GuestConfig,
    pub postcopy: PostcopyMode,
    pub postcopy_after_syncs: Option<u32>,
    pub downtime_limit: Duration,
    /// Main-stream caps before and after the switch, bytes/s; 0 = none.
    pub max_bandwidth: u64,
    pub max_postcopy_bandwidth: u64,
    /// `--prefetch-pages`: the page-server's read-ahead, pages.
    pub prefetch_pages: u32,
    /// Bulk streams, the main stream included.
    pub streams: u32,
    pub warmup: Duration,
    pub verify: VerifyMethod,
    pub verify_ranges: Vec<(u64, u64)>,
    pub json: Option<PathBuf>,
    pub serial_log: Option<PathBuf>,
    pub control: Option<PathBuf>,
    /// `migrate --keep-guest`.
    pub keep_guest: bool,
    pub link_timeout: Duration,
    pub max_restarts: u32,
    pub chaos: Option<Chaos>,
    /// No live progress, no summary.
    pub quiet: bool,
    /// Plain TCP or mutual TLS 1.3 (set from `--tls-*` once the files are
    /// loaded).
    pub transport: Transport,
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text
        .split_once('-')
        .ok_or_else(|| format!("--verify-range {text:?}: expected START-END"))?;
    let start = parse_size(a).map_err(|e| format!("--verify-range start: {e}"))?;
    let end = parse_size(b).map_err(|e| format!("--verify-range end: {e}"))?;
    if start >= end {
        return Err(format!("--verify-range {text:?}: start must be below end"));
    }
    // The rule compares neighbours: fewer than two whole pages prove nothing.
    let whole = (end / PAGE_SIZE as u64).saturating_sub(start.div_ceil(PAGE_SIZE as u64));
    if whole < 2 {
        return Err(format!(
            "--verify-range {text:?} holds {whole} whole pages; the ab rule needs at least 2"
        ));
    }
    Ok((start, end))
}

/// The Linux guest's default command line: COM1 as the console, warnings
/// and worse printed (loglevel 5), a reboot or panic through the i8042 (it
/// ends the VM), no ACPI (the CPUs come from the MP table), no legacy
/// probing the micro-VM cannot answer.
pub const LINUX_BASE_CMDLINE: &str =
    "console=ttyS0 loglevel=5 reboot=k panic=-1 nomodule acpi=off i8042.noaux i8042.nomux i8042.dumbkbd";

/// Where scripts/linux-guest.sh puts the default kernel and initramfs:
/// `POSTCOPY_LINUX_GUEST_DIR`, else `linux-guest/` beside the directory of
/// this binary (target/release/postcopy -> target/linux-guest/).
pub fn default_linux_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("POSTCOPY_LINUX_GUEST_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(|t| t.join("linux-guest")))
        .unwrap_or_else(|| PathBuf::from("target/linux-guest"))
}

/// An absolute path to a readable file, or an error naming the option.
fn linux_file(opt: &str, path: &std::path::Path, default: bool) -> Result<String, String> {
    let hint = if default {
        " (build the default one with ./scripts/linux-guest.sh, or name one)"
    } else {
        ""
    };
    let abs =
        std::fs::canonicalize(path).map_err(|e| format!("{opt} {}: {e}{hint}", path.display()))?;
    std::fs::File::open(&abs).map_err(|e| format!("{opt} {}: {e}", abs.display()))?;
    Ok(abs.display().to_string())
}

/// Checks the kernel's first bytes: an ELF, or a bzImage's "HdrS" at 0x202.
fn check_kernel_image(path: &str) -> Result<(), String> {
    use std::io::Read;
    let mut head = [0u8; 0x206];
    let mut f = std::fs::File::open(path).map_err(|e| format!("--kernel {path}: {e}"))?;
    let n = f
        .read(&mut head)
        .map_err(|e| format!("--kernel {path}: {e}"))?;
    if n >= 4 && head[..4] == *b"\x7fELF" || n == head.len() && head[0x202..] == *b"HdrS" {
        Ok(())
    } else {
        Err(format!(
            "--kernel {path}: neither a bzImage (no HdrS at 0x202) nor a vmlinux ELF"
        ))
    }
}

/// The Linux guest's spec: files checked, command line assembled.
fn linux_spec(g: &GuestArgs) -> Result<LinuxSpec, String> {
    let dir = default_linux_dir();
    let kernel = match &g.kernel {
        Some(p) => linux_file("--kernel", p, false)?,
        None => linux_file("--kernel", &dir.join("vmlinuz"), true)?,
    };
    check_kernel_image(&kernel)?;
    let initrd = match (&g.initrd, &g.kernel) {
        (Some(p), _) => Some(linux_file("--initrd", p, false)?),
        // The default initramfs goes with the default kernel; a kernel of
        // the user's own boots without one unless named.
        (None, None) => Some(linux_file("--initrd", &dir.join("initrd.cpio.gz"), true)?),
        (None, Some(_)) => None,
    };
    let mode = match g.workload {
        WorkloadArg::Ab => "seq",
        WorkloadArg::Random => "random",
        WorkloadArg::Pagecache => "pagecache",
        WorkloadArg::Idle => {
            return Err("--guest linux runs --workload ab (seq), random or pagecache".into())
        }
    };
    let hot = match g.hot_set.strip_suffix('%') {
        Some(p) => p
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|p| (0.0..=100.0).contains(p))
            .map(|p| p.round() as u32)
            .ok_or_else(|| format!("--hot-set {:?}: a percentage 0-100%", g.hot_set))?,
        None => return Err("--guest linux takes --hot-set as a percentage (e.g. 10%)".into()),
    };
    // Verdicts every 250 ms: after a failure the source judges whether its
    // guest still runs from two samples of the serial output 300 ms apart.
    let words = format!(
        "postcopy.mode={mode} postcopy.threads={} postcopy.rate={} postcopy.hot={hot} \
         postcopy.hot_ratio={} postcopy.seed={} postcopy.report_ms=250",
        g.vcpus, g.write_rate, g.hot_ratio, g.seed
    );
    Ok(LinuxSpec {
        kernel,
        initrd,
        cmdline: format!("{words} {}", g.cmdline.trim()),
    })
}

fn hot_pages(text: &str, mem: u64) -> Result<u64, String> {
    let pages = mem / PAGE_SIZE as u64;
    let n = if let Some(pct) = text.strip_suffix('%') {
        let pct: f64 = pct
            .trim()
            .parse()
            .map_err(|_| format!("--hot-set {text:?}: bad percentage"))?;
        if !(0.0..=100.0).contains(&pct) {
            return Err(format!("--hot-set {text:?}: percentage must be 0-100"));
        }
        (pages as f64 * pct / 100.0) as u64
    } else {
        parse_size(text).map_err(|e| format!("--hot-set: {e}"))? / PAGE_SIZE as u64
    };
    Ok(n.clamp(1, pages))
}

impl SourceOpts {
    pub fn from_args(g: &GuestArgs, m: &MigrationArgs) -> Result<Self, String> {
        MemLayout::new(g.mem).map_err(|e| format!("--mem: {e}"))?;
        let kind = match g.guest {
            GuestArg::Process => GuestKind::Process,
            GuestArg::Kvm | GuestArg::Linux => GuestKind::Kvm,
        };
        let linux = g.guest == GuestArg::Linux;
        if !linux && (g.kernel.is_some() || g.initrd.is_some() || g.cmdline != LINUX_BASE_CMDLINE) {
            return Err("--kernel, --initrd and --cmdline go with --guest linux".into());
        }
        let boot_sector = match &g.boot_sector {
            None => None,
            Some(_) if kind != GuestKind::Kvm || linux => {
                return Err("--boot-sector needs --guest kvm".into())
            }
            Some(path) => {
                let bytes = std::fs::read(path)
                    .map_err(|e| format!("--boot-sector {}: {e}", path.display()))?;
                if bytes.len() != 512 || bytes[510..] != [0x55, 0xAA] {
                    return Err(format!(
                        "--boot-sector {}: a boot sector is 512 bytes ending in 0x55 0xAA (got {} bytes{})",
                        path.display(),
                        bytes.len(),
                        if bytes.len() == 512 { ", bad signature" } else { "" }
                    ));
                }
                Some(bytes)
            }
        };
        let workload = match (kind, g.workload) {
            _ if linux => Workload::Linux(linux_spec(g)?),
            (_, WorkloadArg::Pagecache) => {
                return Err("--workload pagecache is for --guest linux".into())
            }
            (GuestKind::Kvm, _) if boot_sector.is_some() => Workload::BootSector,
            (GuestKind::Kvm, WorkloadArg::Ab) => Workload::Ab,
            (GuestKind::Kvm, w) => {
                return Err(format!(
                    "--guest kvm runs the built-in ab sector or --boot-sector; --workload {} is for the process guest",
                    format!("{w:?}").to_lowercase()
                ))
            }
            (GuestKind::Process, WorkloadArg::Ab) => Workload::Ab,
            (GuestKind::Process, WorkloadArg::Idle) => Workload::Idle,
            (GuestKind::Process, WorkloadArg::Random) => Workload::Random(RandomParams {
                hot_pages: hot_pages(&g.hot_set, g.mem)?,
                hot_percent: g.hot_ratio,
                write_rate: g.write_rate,
                seed: g.seed,
            }),
        };
        if kind == GuestKind::Kvm {
            if g.mem > KVM_MAX_MEM {
                return Err(format!(
                    "--guest kvm supports at most {} MiB of memory (the top of the 4 GiB space holds the APIC), got {} MiB",
                    KVM_MAX_MEM >> 20,
                    g.mem >> 20
                ));
            }
            if linux && g.mem < LINUX_MIN_MEM {
                return Err(format!(
                    "--guest linux needs at least {} MiB of memory (the kernel unpacks itself at 16 MiB into ~60 MiB, then the initramfs and the workload)",
                    LINUX_MIN_MEM >> 20
                ));
            }
            if !linux && boot_sector.is_none() && g.mem < KVM_AB_START + 2 * PAGE_SIZE as u64 {
                return Err(
                    "--guest kvm needs at least 1 MiB + 8 KiB of memory: its workload runs above 1 MiB"
                        .into(),
                );
            }
            if g.mem < KVM_MIN_MEM {
                return Err(format!(
                    "--guest kvm needs at least {} KiB of memory (the boot sector is loaded at 0x7c00)",
                    KVM_MIN_MEM >> 10
                ));
            }
        }
        let guest = GuestConfig {
            kind,
            mem_bytes: g.mem,
            vcpus: g.vcpus,
            workload,
            boot_sector,
        };
        let range = m.verify_range.as_deref().map(parse_range).transpose()?;
        if let Some((_, end)) = range {
            if end > g.mem {
                return Err(format!(
                    "--verify-range ends at {end:#x}, beyond guest memory ({:#x})",
                    g.mem
                ));
            }
        }
        // The ab rule holds for ab workloads and for boot sectors that follow
        // the convention (over the range the user names); not for random or
        // idle memory.
        let ab_ok = guest.workload == Workload::Ab
            || (guest.workload == Workload::BootSector && range.is_some());
        let verify = match m.verify {
            VerifyArg::None => VerifyMethod::None,
            VerifyArg::Digest => VerifyMethod::Digest,
            VerifyArg::Ab if ab_ok => VerifyMethod::Ab,
            VerifyArg::Ab => {
                return Err(format!(
                    "--verify ab needs the ab workload (or --verify-range for a boot sector); this guest runs {}",
                    guest.workload.name()
                ))
            }
            VerifyArg::Auto if ab_ok => VerifyMethod::Ab,
            VerifyArg::Auto => VerifyMethod::Digest,
        };
        let verify_ranges = match (verify, range) {
            // Each worker of an ab process guest runs its own pattern: a
            // user range is checked slice by slice.
            (VerifyMethod::Ab, Some((a, b))) if guest.kind == GuestKind::Process => guest
                .ab_ranges()
                .into_iter()
                .map(|(s, e)| (s.max(a), e.min(b)))
                .filter(|(s, e)| s < e)
                .collect(),
            (VerifyMethod::Ab, Some(r)) => vec![r],
            (VerifyMethod::Ab, None) => guest.ab_ranges(),
            _ => vec![],
        };
        let postcopy = match m.postcopy {
            PostcopyArg::Never => PostcopyMode::Never,
            PostcopyArg::Auto => PostcopyMode::Auto,
            PostcopyArg::Manual => PostcopyMode::Manual,
        };
        if m.postcopy_after_syncs.is_some() && postcopy != PostcopyMode::Manual {
            return Err("--postcopy-after-syncs goes with --postcopy manual".into());
        }
        Ok(SourceOpts {
            guest,
            postcopy,
            postcopy_after_syncs: m.postcopy_after_syncs,
            downtime_limit: Duration::from_millis(m.downtime_limit),
            max_bandwidth: m.max_bandwidth,
            max_postcopy_bandwidth: m.max_postcopy_bandwidth,
            prefetch_pages: m.prefetch_pages,
            streams: m.streams.unwrap_or_else(default_streams),
            warmup: Duration::from_millis(g.warmup_ms),
            verify,
            verify_ranges,
            json: m.json.clone(),
            serial_log: m.serial_log.clone(),
            control: m.control.clone(),
            keep_guest: false,
            link_timeout: Duration::from_secs(m.link_timeout),
            max_restarts: m.max_restarts,
            chaos: m.chaos.clone(),
            quiet: m.quiet,
            transport: Transport::Tcp,
        })
    }
}

/// `--streams` when not given: min(4, CPUs / 2), at least 1.
pub fn default_streams() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    (cpus / 2).clamp(1, 4)
}
