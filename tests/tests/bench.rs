//! `postcopy bench` end to end, on its tiny scenarios: the JSON and the
//! Markdown are written and hold what they claim (every run completed, the
//! baselines measured, figures present and finite), QEMU is reported as
//! skipped when it is not there, and no network namespace survives the
//! bench, neither a normal end, nor SIGINT, nor a SIGKILL (the next bench
//! removes what a killed one left). No timing is asserted.

use libtest_mimic::Arguments;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{check, postcopy, report, run, start, TempDir};

type TestResult = Result<(), String>;

fn main() {
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let plain = tests::plain_trial;
    let trials = vec![
        plain(
            "quick_tiny_writes_json_and_tables",
            quick_tiny_writes_json_and_tables,
        ),
        plain(
            "interrupted_bench_leaves_nothing",
            interrupted_bench_leaves_nothing,
        ),
        plain(
            "killed_bench_is_cleaned_up_by_the_next",
            killed_bench_is_cleaned_up_by_the_next,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// `postcopy bench --quick` on the tiny scenarios, QEMU pointed at nothing.
fn bench(out: &std::path::Path, scenarios: &[&str], reps: &str) -> Command {
    let mut c = postcopy();
    c.args(["bench", "--quick", "--reps", reps, "--out"])
        .arg(out)
        .env("QEMU", "/nonexistent/qemu-system-x86_64");
    for s in scenarios {
        c.args(["--scenario", s]);
    }
    c
}

/// Namespaces named after bench `pid`.
fn namespaces_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let own = format!("pcb{pid}");
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.strip_prefix(&own)
                .is_some_and(|t| t.starts_with('s') || t.starts_with('d'))
        })
        .map(str::to_string)
        .collect()
}

fn finite(v: &Value, what: &str) -> Result<f64, String> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| format!("{what} is not a finite number: {v}"))
}

fn quick_tiny_writes_json_and_tables() -> TestResult {
    let dir = TempDir::new("bench");
    let out_dir = dir.path("out");
    let running = start(&mut bench(&out_dir, &["tiny", "tiny-relay"], "2"));
    let pid = running.pid();
    let out = running.finish(Duration::from_secs(300))?;
    check(
        out.status.success(),
        format!("bench failed\n{}", out.describe()),
    )?;
    check(
        out.stderr.contains("qemu: skipped (not installed)"),
        format!("the bench does not say it skipped QEMU\n{}", out.describe()),
    )?;
    check(
        namespaces_of(pid).is_empty(),
        format!("namespaces left behind: {:?}", namespaces_of(pid)),
    )?;
    let r = report(&out_dir.join("bench.json"))?;
    check(
        r["machine"]["qemu"] == "skipped (not installed)",
        format!("machine.qemu: {}", r["machine"]["qemu"]),
    )?;
    check(r["interrupted"] == false, "marked interrupted")?;

    // Baselines: both links, and the host's.
    for link in ["loopback", "veth-1g-relay"] {
        let b = &r["link_baselines"][link];
        check(
            b["error"].is_null(),
            format!("{link} baseline: {}", b["error"]),
        )?;
        let gbps = finite(&b["tcp_bulk_gbps"]["median"], "tcp bulk")?;
        check(gbps > 0.0, format!("{link}: tcp bulk {gbps}"))?;
        let rr = &b["request_response_us"];
        check(
            rr["count"].as_u64().unwrap_or(0) > 0 && finite(&rr["p50"], "rtt p50")? > 0.0,
            format!("{link}: no round trips measured: {rr}"),
        )?;
    }
    let h = &r["host_baseline"];
    check(
        h["error"].is_null(),
        format!("host baseline: {}", h["error"]),
    )?;
    check(
        finite(&h["uffdio_copy_pages_per_s"]["median"], "uffd copy")? > 0.0,
        "UFFDIO_COPY rate",
    )?;
    let bare = &h["bare_fault_us"]["total"];
    check(
        bare["count"].as_u64().unwrap_or(0) > 0 && finite(&bare["p50"], "bare p50")? > 0.0,
        format!("bare fault: {bare}"),
    )?;

    // Each scenario: every run completed, the headlines are there.
    let scenarios = r["scenarios"].as_array().ok_or("no scenarios")?;
    check(
        scenarios.len() == 2,
        format!("{} scenarios", scenarios.len()),
    )?;
    for s in scenarios {
        let name = s["scenario"]["name"].as_str().unwrap_or("?");
        let runs = s["runs"].as_array().ok_or("no runs")?;
        check(runs.len() == 2, format!("{name}: {} runs", runs.len()))?;
        for run in runs {
            check(
                run["ok"] == true && run["engine"] == "ours",
                format!("{name}: run failed: {run}"),
            )?;
        }
        let ours = &s["summary"]["ours"];
        for fig in [
            "pause_ms",
            "postcopy_phase_ms",
            "blocktime_ms",
            "page_requests",
            "fault_p50_us",
            "fault_p99_us",
            "total_ms",
            "cpu_s_per_gib_source",
            "cpu_s_per_gib_destination",
        ] {
            let sp = &ours[fig];
            let (med, min, max) = (
                finite(&sp["median"], fig)?,
                finite(&sp["min"], fig)?,
                finite(&sp["max"], fig)?,
            );
            check(
                min <= med && med <= max && sp["n"] == 2,
                format!("{name}: {fig}: {sp}"),
            )?;
        }
        check(
            finite(&ours["total_ms"]["median"], "total")? > 0.0
                && finite(&ours["cpu_s_per_gib_source"]["median"], "cpu")? > 0.0,
            format!("{name}: zero total time or CPU: {ours}"),
        )?;
        // Every ratio is ours over its baseline.
        for rt in s["ratios"].as_array().ok_or("no ratios")? {
            let (o, b, q) = (
                finite(&rt["ours"], "ratio.ours")?,
                finite(&rt["baseline_value"], "ratio.baseline")?,
                finite(&rt["ratio"], "ratio")?,
            );
            check(
                b > 0.0 && (o / b - q).abs() <= 1e-9 * q.abs().max(1.0),
                format!("{name}: ratio {rt}"),
            )?;
        }
        check(
            s["ratios"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["figure"] == "precopy_gbps")),
            format!("{name}: precopy throughput not compared with raw TCP"),
        )?;
    }

    // The table says the same.
    let md =
        std::fs::read_to_string(out_dir.join("bench.md")).map_err(|e| format!("bench.md: {e}"))?;
    for needle in [
        "# postcopy bench",
        "## Baselines",
        "## `tiny`",
        "## `tiny-relay`",
        "| pause (source stop → destination running), ms |",
        "QEMU: skipped (not installed)",
    ] {
        check(
            md.contains(needle),
            format!("bench.md lacks {needle:?}\n{md}"),
        )?;
    }
    Ok(())
}

/// Waits until bench `pid` has made its namespaces (it is in the relay
/// scenario's baselines or runs).
fn await_namespaces(pid: u32) -> Result<(), String> {
    let t = Instant::now();
    while namespaces_of(pid).is_empty() {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the bench never made its namespaces".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn interrupted_bench_leaves_nothing() -> TestResult {
    let dir = TempDir::new("bench-int");
    let out_dir = dir.path("out");
    let running = start(&mut bench(&out_dir, &["tiny-relay"], "3"));
    let pid = running.pid();
    await_namespaces(pid)?;
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on the child this test started, by pid.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let out = running.finish(Duration::from_secs(60))?;
    check(
        out.status.code() == Some(1),
        format!("an interrupted bench exits 1\n{}", out.describe()),
    )?;
    check(
        namespaces_of(pid).is_empty(),
        format!("namespaces left behind: {:?}", namespaces_of(pid)),
    )?;
    let r = report(&out_dir.join("bench.json"))?;
    check(
        r["interrupted"] == true,
        format!("bench.json does not say interrupted: {}", r["interrupted"]),
    )?;
    Ok(())
}

fn killed_bench_is_cleaned_up_by_the_next() -> TestResult {
    let dir = TempDir::new("bench-kill");
    let out_dir = dir.path("out");
    let running = start(&mut bench(&out_dir, &["tiny-relay"], "3"));
    let pid = running.pid();
    await_namespaces(pid)?;
    // SAFETY: kill(2) on the child this test started, by pid.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = running.finish(Duration::from_secs(30));
    let left = namespaces_of(pid);
    check(
        !left.is_empty(),
        "a SIGKILLed bench cannot clean up: its namespaces should still be there",
    )?;
    // The next bench removes them before it starts.
    let out = run(
        &mut bench(&dir.path("out2"), &["tiny"], "1"),
        Duration::from_secs(300),
    )?;
    check(
        out.status.success(),
        format!("bench failed\n{}", out.describe()),
    )?;
    check(
        namespaces_of(pid).is_empty(),
        format!(
            "stale namespaces survived the next bench: {:?}",
            namespaces_of(pid)
        ),
    )?;
    let r = report(&dir.path("out2").join("bench.json"))?;
    let removed: Vec<&str> = r["stale_namespaces_removed"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    check(
        left.iter().all(|n| removed.contains(&n.as_str())),
        format!("left {left:?}, the next bench says it removed {removed:?}"),
    )?;
    Ok(())
}
