//! `postcopy bench`: runs scenarios (guest, memory, workload, link,
//! settings) a few times each, ours alternating with QEMU's where QEMU runs
//! the same scenario, measures baselines on the same endpoints in the same
//! run, and writes the medians (with min and max) as JSON and as Markdown
//! tables, each headline beside the baseline it is bounded by.

pub mod baseline;
pub mod link;
pub mod ours;
pub mod output;
pub mod plan;
pub mod proc;
pub mod qemu;
pub mod relay;
pub mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use serde::Serialize;

use baseline::{Effort, HostBaseline, LinkBaseline};
use link::{Endpoints, LinkKind};
use plan::Scenario;
use stats::Spread;

/// A run's figures by name (units in the names: `_ms`, `_us`, `_gbps`, ...).
pub type Figures = BTreeMap<String, f64>;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// The quick set: one KVM scenario beside QEMU on loopback, 256 MiB
    /// under load, 256 MiB precopy over the shaped link (under 5 minutes).
    #[arg(long)]
    pub quick: bool,
    /// Repetitions of each scenario and engine (ours and QEMU alternate).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub reps: u32,
    /// Run only this scenario (repeatable; `--list` names them all).
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Print the scenarios and exit.
    #[arg(long)]
    pub list: bool,
    /// Add the 8 GiB scale scenario to the full set (needs 16 GiB free).
    #[arg(long)]
    pub with_8g: bool,
    /// Do not run QEMU, even where installed.
    #[arg(long)]
    pub no_qemu: bool,
    /// Where the results go: bench.json, bench.md and runs/ (one folder per
    /// migration with both reports and logs).
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// One migration of one engine.
#[derive(Clone, Debug, Serialize)]
pub struct RunRecord {
    pub engine: &'static str,
    pub rep: u32,
    pub ok: bool,
    pub error: Option<String>,
    /// Wall time of the whole run, bench overhead included.
    pub seconds: f64,
    /// Its files (reports, logs, serial output).
    pub dir: String,
    pub figures: Figures,
}

/// A figure of ours against its baseline.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub figure: String,
    pub ours: f64,
    /// What it is compared with.
    pub baseline: String,
    pub baseline_value: f64,
    /// ours / baseline.
    pub ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ScenarioResult {
    pub scenario: Scenario,
    pub description: String,
    /// The `postcopy migrate` options of our runs.
    pub migrate_args: Vec<String>,
    /// `compared`, or why QEMU did not run.
    pub qemu: String,
    pub runs: Vec<RunRecord>,
    /// Per engine, per figure: median, min, max over the runs that completed.
    pub summary: BTreeMap<String, BTreeMap<String, Spread>>,
    pub ratios: Vec<Ratio>,
}

/// One of the targets, judged on this run.
#[derive(Clone, Debug, Serialize)]
pub struct TargetResult {
    pub target: String,
    pub scenario: String,
    /// What was measured, in words and numbers.
    pub measured: String,
    pub value: f64,
    pub limit: f64,
    /// `value <= limit` (or `>=` for throughput).
    pub met: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_gib: f64,
    pub virtualized: bool,
    pub kvm: bool,
    pub clocksource: String,
    /// QEMU's version, or `skipped (...)`.
    pub qemu: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub command: String,
    pub started_utc: String,
    pub quick: bool,
    pub reps: u32,
    pub machine: Machine,
    pub host_baseline: Option<HostBaseline>,
    pub link_baselines: BTreeMap<String, LinkBaseline>,
    pub scenarios: Vec<ScenarioResult>,
    pub targets: Vec<TargetResult>,
    /// Stale namespaces of earlier benches removed at start.
    pub stale_namespaces_removed: Vec<String>,
    pub interrupted: bool,
    pub seconds: f64,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn machine(qemu: &str) -> Machine {
    let cpuinfo = read_trim("/proc/cpuinfo");
    let meminfo = read_trim("/proc/meminfo");
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Machine {
        kernel: read_trim("/proc/sys/kernel/osrelease"),
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cpu_model: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default(),
        mem_gib: (mem_kib / 1048576.0 * 10.0).round() / 10.0,
        virtualized: cpuinfo.contains(" hypervisor"),
        kvm: Path::new("/dev/kvm").exists(),
        clocksource: read_trim("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        qemu: qemu.to_string(),
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of now.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn say(t0: Instant, text: &str) {
    eprintln!("[{:7.1} s] {text}", t0.elapsed().as_secs_f64());
}

/// `postcopy bench`: exit status 0 when every run completed and checked
/// out, 1 otherwise (the tables say which), 2 for a bad command line.
pub fn main(args: BenchArgs) -> ExitCode {
    if args.list {
        for s in plan::all() {
            println!("{:18} {}\n{:18} {}", s.name, s.describe(), "", s.about);
        }
        return ExitCode::SUCCESS;
    }
    let scenarios = match plan::select(&args.scenarios, args.quick, args.with_8g) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("postcopy bench: {e}");
            return ExitCode::from(2);
        }
    };
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "postcopy bench: needs root (userfaultfd for the guests, network namespaces, KVM)"
        );
        return ExitCode::from(2);
    }
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(sig, proc::interrupt_flag()) {
            eprintln!("postcopy bench: cannot watch signals: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(&args, scenarios) {
        Ok(result) => {
            let all_ok =
                !result.interrupted && result.scenarios.iter().all(|s| s.runs.iter().all(|r| r.ok));
            if all_ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("postcopy bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &BenchArgs, scenarios: Vec<Scenario>) -> Result<BenchResult, String> {
    let t0 = Instant::now();
    let stale = link::remove_stale();
    if !stale.is_empty() {
        say(
            t0,
            &format!(
                "removed namespaces of earlier benches: {}",
                stale.join(", ")
            ),
        );
    }
    let qemu_path = if args.no_qemu { None } else { qemu::find() };
    let qemu_text = match (&qemu_path, args.no_qemu) {
        (_, true) => "skipped (--no-qemu)".to_string(),
        (None, false) => "skipped (not installed)".to_string(),
        (Some(q), false) => qemu::version(q).unwrap_or_else(|| q.display().to_string()),
    };
    say(t0, &format!("qemu: {qemu_text}"));
    let runs_dir = args.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(|e| format!("{}: {e}", runs_dir.display()))?;
    let sector = args.out.join("ab-fixed.img");
    std::fs::write(&sector, plan::SECTOR).map_err(|e| format!("{}: {e}", sector.display()))?;
    let sector = std::fs::canonicalize(&sector).map_err(|e| e.to_string())?;

    let mut result = BenchResult {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        started_utc: utc_now(),
        quick: args.quick,
        reps: args.reps,
        machine: machine(&qemu_text),
        host_baseline: None,
        link_baselines: BTreeMap::new(),
        scenarios: vec![],
        targets: vec![],
        stale_namespaces_removed: stale,
        interrupted: false,
        seconds: 0.0,
    };

    // Baselines first: the host's, then each link the scenarios use.
    let effort = Effort::new(args.quick);
    say(t0, "baseline: host (UFFDIO_COPY, bare userfaultfd fault)");
    let host = baseline::host(effort);
    if let Some(e) = &host.error {
        say(t0, &format!("baseline: host: {e}"));
    }
    result.host_baseline = Some(host);
    let mut links: Vec<LinkKind> = vec![LinkKind::Loopback];
    for s in &scenarios {
        if !links.contains(&s.link) {
            links.push(s.link);
        }
    }
    for &kind in &links {
        if proc::interrupted() {
            break;
        }
        say(
            t0,
            &format!("baseline: {} (TCP bulk, round trip)", kind.name()),
        );
        let b = match Endpoints::set_up(kind) {
            Ok(ep) => baseline::link(&ep, effort),
            Err(e) => LinkBaseline {
                error: Some(e),
                ..LinkBaseline::default()
            },
        };
        if let Some(e) = &b.error {
            say(t0, &format!("baseline: {}: {e}", kind.name()));
        }
        result.link_baselines.insert(kind.name().to_string(), b);
    }

    for s in &scenarios {
        if proc::interrupted() {
            break;
        }
        let r = run_scenario(args, s, qemu_path.as_deref(), &sector, &runs_dir, t0);
        result.scenarios.push(r);
        finish(&mut result, args, t0)?;
    }
    result.interrupted = proc::interrupted();
    finish(&mut result, args, t0)?;
    let md = output::markdown(&result);
    print!("{md}");
    say(
        t0,
        &format!(
            "wrote {} and {}",
            args.out.join("bench.json").display(),
            args.out.join("bench.md").display()
        ),
    );
    Ok(result)
}

/// Summaries, ratios and targets as far as the run got, written out (after
/// each scenario, so an interrupted bench keeps what it measured).
fn finish(result: &mut BenchResult, args: &BenchArgs, t0: Instant) -> Result<(), String> {
    for s in &mut result.scenarios {
        s.summary = summarize(&s.runs);
        s.ratios = output::ratios(s, &result.link_baselines, result.host_baseline.as_ref());
    }
    result.targets = output::targets(result);
    result.seconds = t0.elapsed().as_secs_f64();
    let json = serde_json::to_string_pretty(result).map_err(|e| e.to_string())?;
    let path = args.out.join("bench.json");
    std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    let path = args.out.join("bench.md");
    std::fs::write(&path, output::markdown(result)).map_err(|e| format!("{}: {e}", path.display()))
}

fn summarize(runs: &[RunRecord]) -> BTreeMap<String, BTreeMap<String, Spread>> {
    let mut out: BTreeMap<String, BTreeMap<String, Spread>> = BTreeMap::new();
    for engine in ["ours", "qemu"] {
        let ok: Vec<&RunRecord> = runs.iter().filter(|r| r.engine == engine && r.ok).collect();
        let names: std::collections::BTreeSet<&String> =
            ok.iter().flat_map(|r| r.figures.keys()).collect();
        let mut m = BTreeMap::new();
        for name in names {
            let values: Vec<f64> = ok
                .iter()
                .filter_map(|r| r.figures.get(name))
                .copied()
                .collect();
            if let Some(sp) = Spread::of(&values) {
                m.insert(name.clone(), sp);
            }
        }
        if !m.is_empty() {
            out.insert(engine.to_string(), m);
        }
    }
    out
}

fn run_scenario(
    args: &BenchArgs,
    s: &Scenario,
    qemu_path: Option<&Path>,
    sector: &Path,
    runs_dir: &Path,
    t0: Instant,
) -> ScenarioResult {
    let kvm = Path::new("/dev/kvm").exists();
    let qemu = match (s.with_qemu, qemu_path) {
        (false, _) => "not compared".to_string(),
        (true, None) if args.no_qemu => "skipped (--no-qemu)".to_string(),
        (true, None) => "skipped (not installed)".to_string(),
        (true, Some(_)) if !kvm => "skipped (no /dev/kvm)".to_string(),
        (true, Some(_)) => "compared".to_string(),
    };
    let mut result = ScenarioResult {
        scenario: s.clone(),
        description: s.describe(),
        migrate_args: s.migrate_args(sector),
        qemu: qemu.clone(),
        runs: vec![],
        summary: BTreeMap::new(),
        ratios: vec![],
    };
    say(t0, &format!("scenario {}: {}", s.name, result.description));
    if s.guest == plan::Guest::KvmSector && !kvm {
        say(t0, &format!("scenario {}: skipped: no /dev/kvm", s.name));
        result.qemu = "skipped (no /dev/kvm)".into();
        return result;
    }
    let ep = match Endpoints::set_up(s.link) {
        Ok(ep) => ep,
        Err(e) => {
            result.runs.push(RunRecord {
                engine: "ours",
                rep: 0,
                ok: false,
                error: Some(format!("link {}: {e}", s.link.name())),
                seconds: 0.0,
                dir: String::new(),
                figures: Figures::new(),
            });
            return result;
        }
    };
    let engines: Vec<&'static str> = if qemu == "compared" {
        vec!["ours", "qemu"]
    } else {
        vec!["ours"]
    };
    for rep in 1..=args.reps {
        for &engine in &engines {
            if proc::interrupted() {
                return result;
            }
            let dir = runs_dir.join(format!("{}-{engine}-r{rep}", s.name));
            let _ = std::fs::remove_dir_all(&dir);
            let t = Instant::now();
            let got = std::fs::create_dir_all(&dir)
                .map_err(|e| format!("{}: {e}", dir.display()))
                .and_then(|()| match engine {
                    "ours" => ours::run(s, &ep, sector, &dir),
                    _ => qemu::run(
                        qemu_path.expect("compared only with QEMU"),
                        s,
                        &ep,
                        sector,
                        &dir,
                    ),
                });
            let seconds = t.elapsed().as_secs_f64();
            let (ok, error, figures) = match got {
                Ok(f) => (true, None, f),
                Err(e) => (false, Some(e), Figures::new()),
            };
            say(
                t0,
                &format!(
                    "  {engine} r{rep}: {} in {seconds:.1} s{}",
                    if ok { "ok" } else { "FAILED" },
                    match &error {
                        Some(e) => format!(": {e}"),
                        None => output::brief(&figures),
                    }
                ),
            );
            result.runs.push(RunRecord {
                engine,
                rep,
                ok,
                error,
                seconds,
                dir: dir.display().to_string(),
                figures,
            });
        }
    }
    result
}
