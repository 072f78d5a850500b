//! What the bench makes of its runs: ratios of our headlines to their
//! baselines, the targets judged, and the Markdown tables.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::baseline::{HostBaseline, LinkBaseline};
use super::link::LinkKind;
use super::stats::Spread;
use super::{BenchResult, Figures, Ratio, ScenarioResult, TargetResult};

/// The headline figures, in table order, with their labels.
const FIGURES: &[(&str, &str)] = &[
    ("pause_ms", "pause (source stop → destination running), ms"),
    (
        "postcopy_phase_ms",
        "postcopy phase (stop → every page in), ms",
    ),
    (
        "blocktime_ms",
        "blocktime (time every vCPU was blocked, QEMU's definition), ms",
    ),
    ("page_requests", "page requests"),
    (
        "fault_p50_us",
        "fault latency p50 (fault read → placed), µs",
    ),
    ("fault_p99_us", "fault latency p99, µs"),
    ("precopy_gbps", "precopy throughput, Gbit/s"),
    ("total_ms", "total time, ms"),
    ("cpu_s_per_gib_source", "CPU s per GiB of guest, source"),
    (
        "cpu_s_per_gib_destination",
        "CPU s per GiB of guest, destination",
    ),
    ("postcopy_mib", "sent in postcopy, MiB"),
    ("placed_pages_per_s", "pages placed per s in postcopy"),
];

/// Figures compared with QEMU's where QEMU ran.
const WITH_QEMU: &[&str] = &[
    "pause_ms",
    "postcopy_phase_ms",
    "blocktime_ms",
    "page_requests",
    "total_ms",
    "cpu_s_per_gib_source",
    "cpu_s_per_gib_destination",
];

/// The fault-path steps (`fault_path_us` in our source report), in path
/// order.
const STEPS: &[(&str, &str)] = &[
    (
        "fault_read_to_request_written",
        "fault read → request written",
    ),
    (
        "request_written_to_request_read",
        "request written → request read on the source",
    ),
    ("request_read_to_page_sent", "request read → page sent"),
    ("page_sent_to_page_read", "page sent → page read"),
    (
        "page_read_to_placed",
        "page read → placed (UFFDIO_COPY, wakes the thread)",
    ),
    (
        "network_round_trip",
        "both network legs (no shared clock needed)",
    ),
    ("fault_read_to_placed", "whole path, fault read → placed"),
    (
        "push_fault_read_to_placed",
        "requested pages that came on the main stream instead: fault read → placed",
    ),
];

/// Three significant digits, no exponent.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(s: Option<&Spread>) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => num(s.median),
        Some(s) => format!("{} [{}–{}]", num(s.median), num(s.min), num(s.max)),
    }
}

/// One line for the progress log.
pub fn brief(f: &Figures) -> String {
    let mut out = String::new();
    for (k, label) in [
        ("pause_ms", "pause ms"),
        ("postcopy_phase_ms", "postcopy ms"),
        ("blocktime_ms", "blocktime ms"),
        ("fault_p99_us", "p99 µs"),
        ("precopy_gbps", "precopy Gbit/s"),
        ("total_ms", "total ms"),
    ] {
        if let Some(v) = f.get(k) {
            let _ = write!(out, ", {label} {}", num(*v));
        }
    }
    out
}

fn median(m: Option<&BTreeMap<String, Spread>>, k: &str) -> Option<f64> {
    m.and_then(|m| m.get(k)).map(|s| s.median)
}

/// ours / value; a baseline of 0 (QEMU reports blocktime in whole ms)
/// gives an infinite ratio unless ours is 0 too (JSON: null), so a target
/// against it is judged, never dropped.
fn ratio(figure: &str, ours: f64, baseline: String, value: f64) -> Option<Ratio> {
    (value >= 0.0 && value.is_finite()).then(|| Ratio {
        figure: figure.into(),
        ours,
        baseline,
        baseline_value: value,
        ratio: if value > 0.0 {
            ours / value
        } else if ours == 0.0 {
            1.0
        } else {
            f64::INFINITY
        },
    })
}

/// Line rate of `link`: what one TCP connection carried in the baseline.
const LINE_RATE: &str = "line rate (bytes sent in postcopy at raw TCP bulk speed), ms";

/// Each of our headlines over its baseline, medians of this run.
pub fn ratios(
    s: &ScenarioResult,
    links: &BTreeMap<String, LinkBaseline>,
    host: Option<&HostBaseline>,
) -> Vec<Ratio> {
    let ours = s.summary.get("ours");
    let qemu = s.summary.get("qemu");
    let mut out = vec![];
    for &k in WITH_QEMU {
        if let (Some(o), Some(q)) = (median(ours, k), median(qemu, k)) {
            out.extend(ratio(k, o, "QEMU, same run (median)".into(), q));
        }
    }
    let link = s.scenario.link.name();
    let lb = links.get(link);
    let tcp = lb.and_then(|b| b.tcp_bulk_gbps).map(|s| s.median);
    let rtt = lb.map(|b| b.request_response_us.p50).filter(|&v| v > 0.0);
    if let (Some(o), Some(t)) = (median(ours, "precopy_gbps"), tcp) {
        out.extend(ratio(
            "precopy_gbps",
            o,
            format!("raw TCP bulk on {link}, Gbit/s"),
            t,
        ));
    }
    if let (Some(o), Some(mib), Some(t)) = (
        median(ours, "postcopy_phase_ms"),
        median(ours, "postcopy_mib"),
        tcp,
    ) {
        let line_ms = mib * 1048576.0 * 8.0 / (t * 1e9) * 1e3;
        out.extend(ratio("postcopy_phase_ms", o, LINE_RATE.into(), line_ms));
    }
    let bare = host
        .and_then(|h| h.bare_fault_us.as_ref())
        .filter(|b| b.total.count > 0);
    if let Some(o) = median(ours, "fault_p50_us") {
        if let Some(b) = bare {
            out.extend(ratio(
                "fault_p50_us",
                o,
                "bare userfaultfd fault round trip p50, µs".into(),
                b.total.p50,
            ));
        }
        if let Some(r) = rtt {
            out.extend(ratio(
                "fault_p50_us",
                o,
                format!("request/response round trip p50 on {link}, µs"),
                r,
            ));
        }
    }
    if let (Some(o), Some(b)) = (median(ours, "fault_p99_us"), bare) {
        out.extend(ratio(
            "fault_p99_us",
            o,
            "bare userfaultfd fault round trip p99, µs".into(),
            b.total.p99,
        ));
    }
    if let (Some(o), Some(r)) = (median(ours, "path.network_round_trip.p50_us"), rtt) {
        out.extend(ratio(
            "path.network_round_trip.p50_us",
            o,
            format!("request/response round trip p50 on {link}, µs"),
            r,
        ));
    }
    if let (Some(o), Some(c)) = (
        median(ours, "placed_pages_per_s"),
        host.and_then(|h| h.uffdio_copy_64_pages_per_s),
    ) {
        out.extend(ratio(
            "placed_pages_per_s",
            o,
            "UFFDIO_COPY of 64 pages per call, pages/s".into(),
            c.median,
        ));
    }
    out
}

fn find<'a>(s: &'a ScenarioResult, figure: &str, baseline_starts: &str) -> Option<&'a Ratio> {
    s.ratios
        .iter()
        .find(|r| r.figure == figure && r.baseline.starts_with(baseline_starts))
}

/// A target on the ratio of `figure` to the baseline whose name starts
/// with `base`: met when the ratio is at most `limit` (at least, with
/// `at_least`).
fn against(
    s: &ScenarioResult,
    target: &str,
    figure: &str,
    base: &str,
    limit: f64,
    at_least: bool,
) -> Option<TargetResult> {
    let r = find(s, figure, base)?;
    Some(TargetResult {
        target: target.into(),
        scenario: s.scenario.name.into(),
        measured: format!(
            "{} / {} = {}",
            num(r.ours),
            num(r.baseline_value),
            num(r.ratio)
        ),
        value: r.ratio,
        limit,
        met: if at_least {
            r.ratio >= limit
        } else {
            r.ratio <= limit
        },
    })
}

/// The targets, judged on this run's medians.
pub fn targets(result: &BenchResult) -> Vec<TargetResult> {
    let mut out = vec![];
    for s in &result.scenarios {
        let loopback = s.scenario.link == LinkKind::Loopback;
        out.extend(against(
            s,
            "pause ≤ 1/3 of QEMU's",
            "pause_ms",
            "QEMU",
            1.0 / 3.0,
            false,
        ));
        if loopback {
            out.extend(against(
                s,
                "postcopy phase ≤ 0.7× QEMU's on loopback",
                "postcopy_phase_ms",
                "QEMU",
                0.7,
                false,
            ));
            out.extend(against(
                s,
                "CPU-seconds per GiB ≤ QEMU's (source)",
                "cpu_s_per_gib_source",
                "QEMU",
                1.0,
                false,
            ));
            out.extend(against(
                s,
                "CPU-seconds per GiB ≤ QEMU's (destination)",
                "cpu_s_per_gib_destination",
                "QEMU",
                1.0,
                false,
            ));
        }
        out.extend(against(
            s,
            "blocktime ≤ 1/2 of QEMU's",
            "blocktime_ms",
            "QEMU",
            0.5,
            false,
        ));
        if s.scenario.link == LinkKind::Veth && s.scenario.with_qemu {
            out.extend(against(
                s,
                "postcopy phase within 5% of line rate on the 1 Gbit/s link",
                "postcopy_phase_ms",
                "line rate",
                1.05,
                false,
            ));
        }
        if s.scenario.name.starts_with("load-") {
            out.extend(against(
                s,
                "fault latency p50 within 2× the bare fault round trip",
                "fault_p50_us",
                "bare",
                2.0,
                false,
            ));
            if let Some(p99) = median(s.summary.get("ours"), "fault_p99_us") {
                out.push(TargetResult {
                    target: "fault latency p99 ≤ 150 µs while the push saturates loopback".into(),
                    scenario: s.scenario.name.into(),
                    measured: format!("{} µs", num(p99)),
                    value: p99,
                    limit: 150.0,
                    met: p99 <= 150.0,
                });
            }
        }
        if s.scenario.name.starts_with("precopy-") {
            out.extend(against(
                s,
                "precopy throughput ≥ 0.8× raw TCP on the same link",
                "precopy_gbps",
                "raw TCP",
                0.8,
                true,
            ));
        }
    }
    out
}

/// The whole result as Markdown.
pub fn markdown(r: &BenchResult) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "# postcopy bench\n");
    let _ = writeln!(
        o,
        "Started {} UTC, {:.0} s{}. Command: `{}`\n",
        r.started_utc,
        r.seconds,
        if r.interrupted { ", INTERRUPTED" } else { "" },
        r.command
    );
    let _ = writeln!(
        o,
        "Machine: {}, {} CPUs{}, {} GiB, Linux {}, clocksource {}, /dev/kvm {}. QEMU: {}.\n",
        m.cpu_model,
        m.cpus,
        if m.virtualized {
            " (a virtual machine)"
        } else {
            ""
        },
        m.mem_gib,
        m.kernel,
        m.clocksource,
        if m.kvm { "yes" } else { "no" },
        m.qemu
    );
    let _ = writeln!(
        o,
        "Medians of {} repetitions with [min–max]; ours and QEMU alternate run by run.\n",
        r.reps
    );

    if !r.targets.is_empty() {
        let _ = writeln!(o, "## Targets\n");
        let _ = writeln!(o, "| target | scenario | measured | limit | met |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        for t in &r.targets {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                t.target,
                t.scenario,
                t.measured,
                num(t.limit),
                if t.met { "yes" } else { "**no**" }
            );
        }
        o.push('\n');
    }

    let _ = writeln!(o, "## Baselines (same run, same endpoints)\n");
    let _ = writeln!(
        o,
        "| link | raw TCP bulk, Gbit/s | request/response (24 B → 4120 B) p50 / p99, µs |"
    );
    let _ = writeln!(o, "|---|---|---|");
    for (name, b) in &r.link_baselines {
        let rr = &b.request_response_us;
        let _ = writeln!(
            o,
            "| {name} | {} | {} / {}{} |",
            cell(b.tcp_bulk_gbps.as_ref()),
            num(rr.p50),
            num(rr.p99),
            b.error
                .as_ref()
                .map(|e| format!(" (error: {e})"))
                .unwrap_or_default()
        );
    }
    if let Some(h) = &r.host_baseline {
        let _ = writeln!(
            o,
            "\nUFFDIO_COPY into a fresh memfd mapping: {} pages/s one page per call, {} pages/s 64 pages per call.",
            cell(h.uffdio_copy_pages_per_s.as_ref()),
            cell(h.uffdio_copy_64_pages_per_s.as_ref())
        );
        if let Some(b) = &h.bare_fault_us {
            let _ = writeln!(
                o,
                "Bare userfaultfd fault round trip (one process, two threads, not pinned), µs p50 / p99: \
                 fault → read {} / {}, read → placed {} / {}, placed → running {} / {}, whole {} / {}.",
                num(b.fault_to_read.p50),
                num(b.fault_to_read.p99),
                num(b.read_to_placed.p50),
                num(b.read_to_placed.p99),
                num(b.placed_to_running.p50),
                num(b.placed_to_running.p99),
                num(b.total.p50),
                num(b.total.p99)
            );
        }
        if let Some(e) = &h.error {
            let _ = writeln!(o, "Host baseline error: {e}");
        }
    }
    o.push('\n');

    for s in &r.scenarios {
        scenario_md(&mut o, s);
    }
    scale_md(&mut o, r);
    o
}

fn scenario_md(o: &mut String, s: &ScenarioResult) {
    let _ = writeln!(o, "## `{}`\n", s.scenario.name);
    let _ = writeln!(
        o,
        "{}. {}. QEMU: {}.\n",
        s.description, s.scenario.about, s.qemu
    );
    let ours = s.summary.get("ours");
    let qemu = s.summary.get("qemu");
    if qemu.is_some() {
        let _ = writeln!(o, "| figure | ours | QEMU | ours / QEMU |");
        let _ = writeln!(o, "|---|---|---|---|");
    } else {
        let _ = writeln!(o, "| figure | ours |");
        let _ = writeln!(o, "|---|---|");
    }
    for &(k, label) in FIGURES {
        let a = ours.and_then(|m| m.get(k));
        let b = qemu.and_then(|m| m.get(k));
        if a.is_none() && b.is_none() {
            continue;
        }
        if qemu.is_some() {
            let rat = match (a, b) {
                (Some(a), Some(b)) if b.median > 0.0 => num(a.median / b.median),
                _ => "–".into(),
            };
            let _ = writeln!(o, "| {label} | {} | {} | {rat} |", cell(a), cell(b));
        } else {
            let _ = writeln!(o, "| {label} | {} |", cell(a));
        }
    }
    let others: Vec<&Ratio> = s
        .ratios
        .iter()
        .filter(|r| !r.baseline.starts_with("QEMU"))
        .collect();
    if !others.is_empty() {
        let _ = writeln!(o, "\n| ours (median) | baseline | ours / baseline |");
        let _ = writeln!(o, "|---|---|---|");
        for r in others {
            let _ = writeln!(
                o,
                "| {} {} | {} {} | {} |",
                r.figure,
                num(r.ours),
                r.baseline,
                num(r.baseline_value),
                num(r.ratio)
            );
        }
    }
    let has_path = ours.is_some_and(|m| m.keys().any(|k| k.starts_with("path.")));
    if has_path {
        let _ = writeln!(
            o,
            "\nWhere a fault's time goes (ours; medians over runs of each run's p50 and p99, µs):\n"
        );
        let _ = writeln!(o, "| step | p50 | p99 |");
        let _ = writeln!(o, "|---|---|---|");
        for &(step, label) in STEPS {
            let p50 = ours.and_then(|m| m.get(&format!("path.{step}.p50_us")));
            let p99 = ours.and_then(|m| m.get(&format!("path.{step}.p99_us")));
            if p50.is_some() {
                let _ = writeln!(o, "| {label} | {} | {} |", cell(p50), cell(p99));
            }
        }
    }
    let failed: Vec<_> = s.runs.iter().filter(|r| !r.ok).collect();
    if !failed.is_empty() {
        let _ = writeln!(o, "\nFailed runs:\n");
        for r in failed {
            let _ = writeln!(
                o,
                "- {} r{}: {} ({})",
                r.engine,
                r.rep,
                r.error.as_deref().unwrap_or("?"),
                r.dir
            );
        }
    }
    o.push('\n');
}

/// The load scenarios side by side: cost should grow with size, the pause
/// should not.
fn scale_md(o: &mut String, r: &BenchResult) {
    let rows: Vec<&ScenarioResult> = r
        .scenarios
        .iter()
        .filter(|s| {
            s.scenario.name.starts_with("load-")
                && s.scenario.settings.streams == 1
                && s.summary.contains_key("ours")
        })
        .collect();
    if rows.len() < 2 {
        return;
    }
    let _ = writeln!(
        o,
        "## Scale (process guest, ab, 2 workers, postcopy after 2 dirty syncs, no caps, loopback)\n"
    );
    let _ = writeln!(
        o,
        "| memory | total, s | total per GiB, s | pause, ms | postcopy phase, ms | fault p99, µs | CPU s/GiB source / destination |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for s in rows {
        let m = s.summary.get("ours");
        let gib = s.scenario.mem_bytes as f64 / (1u64 << 30) as f64;
        let g = |k: &str| median(m, k);
        let _ = writeln!(
            o,
            "| {} MiB | {} | {} | {} | {} | {} | {} / {} |",
            s.scenario.mem_bytes >> 20,
            g("total_ms").map(|v| num(v / 1e3)).unwrap_or_default(),
            g("total_ms")
                .map(|v| num(v / 1e3 / gib))
                .unwrap_or_default(),
            cell(m.and_then(|m| m.get("pause_ms"))),
            cell(m.and_then(|m| m.get("postcopy_phase_ms"))),
            cell(m.and_then(|m| m.get("fault_p99_us"))),
            g("cpu_s_per_gib_source").map(num).unwrap_or_default(),
            g("cpu_s_per_gib_destination").map(num).unwrap_or_default()
        );
    }
    o.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spread(v: f64) -> Spread {
        Spread {
            median: v,
            min: v,
            max: v,
            n: 3,
        }
    }

    /// kvm-loopback with the given medians for ours and QEMU.
    fn result(figures: &[(&str, f64, f64)]) -> BenchResult {
        let scenario = super::super::plan::all()
            .into_iter()
            .find(|s| s.name == "kvm-loopback")
            .unwrap();
        let mut summary = BTreeMap::new();
        for (i, engine) in ["ours", "qemu"].into_iter().enumerate() {
            summary.insert(
                engine.to_string(),
                figures
                    .iter()
                    .map(|f| (f.0.to_string(), spread(if i == 0 { f.1 } else { f.2 })))
                    .collect(),
            );
        }
        let mut s = ScenarioResult {
            description: String::new(),
            migrate_args: vec![],
            qemu: "compared".into(),
            runs: vec![],
            summary,
            ratios: vec![],
            scenario,
        };
        s.ratios = ratios(&s, &BTreeMap::new(), None);
        BenchResult {
            command: String::new(),
            started_utc: String::new(),
            quick: false,
            reps: 3,
            machine: super::super::Machine {
                kernel: String::new(),
                cpus: 2,
                cpu_model: String::new(),
                mem_gib: 1.0,
                virtualized: true,
                kvm: true,
                clocksource: String::new(),
                qemu: String::new(),
            },
            host_baseline: None,
            link_baselines: BTreeMap::new(),
            scenarios: vec![s],
            targets: vec![],
            stale_namespaces_removed: vec![],
            interrupted: false,
            seconds: 0.0,
        }
    }

    fn judged<'a>(t: &'a [TargetResult], name: &str) -> &'a TargetResult {
        t.iter()
            .find(|t| t.target.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not judged: {t:?}"))
    }

    #[test]
    fn targets_are_judged_on_the_ratios() {
        let r = result(&[
            ("pause_ms", 3.0, 10.0),
            ("postcopy_phase_ms", 800.0, 1000.0),
            ("blocktime_ms", 2.7, 0.0),
        ]);
        let t = targets(&r);
        let pause = judged(&t, "pause");
        assert!(pause.met && (pause.value - 0.3).abs() < 1e-9, "{pause:?}");
        let phase = judged(&t, "postcopy phase");
        assert!(!phase.met && (phase.value - 0.8).abs() < 1e-9, "{phase:?}");
        // QEMU's 0 ms (whole-ms blocktime) is judged, and lost.
        let block = judged(&t, "blocktime");
        assert!(!block.met && block.value.is_infinite(), "{block:?}");
        // Both 0: a tie.
        let r = result(&[("blocktime_ms", 0.0, 0.0)]);
        assert_eq!(judged(&targets(&r), "blocktime").value, 1.0);
    }

    #[test]
    fn numbers_keep_three_digits() {
        assert_eq!(num(0.0), "0");
        assert_eq!(num(0.1234), "0.123");
        assert_eq!(num(6.04), "6.04");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(4391.2), "4391");
    }
}
