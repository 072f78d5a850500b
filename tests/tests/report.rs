//! The report as an operator reads it: a real migration (source and
//! destination, process guest, forced into postcopy) writes both JSON
//! reports; their timelines, blocktimes and latency percentiles must hold
//! together; `postcopy report` summarises them and `--plot` draws them; a
//! file that is not a report gets an error that names it. The checks on a
//! report are shown to catch reports doctored to break them.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::{check, free_port, postcopy, report, run, start, text, TempDir};

/// Waits until something listens on 127.0.0.1:`port` (read from
/// /proc/net/tcp, without connecting to it).
fn await_listen(port: u16) -> Result<(), String> {
    let want = format!(":{port:04X} 00000000:0000 0A");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let table = std::fs::read_to_string("/proc/net/tcp").map_err(|e| e.to_string())?;
        if table.lines().any(|l| l.contains(&want)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("nothing listens on port {port} after 10 s"))
}

/// Migrates a 64 MiB two-worker process guest, switching to postcopy after
/// two dirty syncs (at 32 MiB/s the `ab` workload, which rewrites every
/// page, cannot converge before); returns the source's and the
/// destination's reports.
fn migrate(dir: &TempDir) -> Result<(Value, Value), String> {
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let port = free_port();
    let dest = start(postcopy().args([
        "incoming",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--accept-timeout",
        "60",
        "--json",
        dj.to_str().expect("utf-8 path"),
    ]));
    await_listen(port)?;
    let src = run(
        postcopy().args([
            "migrate",
            "--to",
            &format!("127.0.0.1:{port}"),
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--postcopy",
            "manual",
            "--postcopy-after-syncs",
            "2",
            "--max-bandwidth",
            "32M",
            "--max-postcopy-bandwidth",
            "16M",
            "--json",
            sj.to_str().expect("utf-8 path"),
        ]),
        Duration::from_secs(120),
    )?;
    let dst = dest.finish(Duration::from_secs(30))?;
    check(src.status.success(), format!("source: {}", src.describe()))?;
    check(
        dst.status.success(),
        format!("destination: {}", dst.describe()),
    )?;
    Ok((report(&sj)?, report(&dj)?))
}

fn f(v: &Value, field: &str) -> f64 {
    v.get(field).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn u(v: &Value, field: &str) -> u64 {
    v.get(field).and_then(Value::as_u64).unwrap_or(0)
}

/// What is wrong with a report's timeline, blocktime and percentiles
/// (empty: nothing).
fn problems(r: &Value) -> Vec<String> {
    let mut p = Vec::new();
    let side = text(r, "side").to_string();
    let empty = Vec::new();
    let tl = r["timeline"].as_array().unwrap_or(&empty);
    if tl.len() < 3 {
        p.push(format!("{side}: {} timeline samples", tl.len()));
    }
    for w in tl.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if f(b, "t_ms").partial_cmp(&f(a, "t_ms")) != Some(std::cmp::Ordering::Greater) {
            p.push(format!("{side}: t_ms {} then {}", a["t_ms"], b["t_ms"]));
        }
        for total in ["bytes", "requests", "faults"] {
            if u(b, total) < u(a, total) {
                p.push(format!(
                    "{side}: {total} went down at t_ms {}: {} -> {}",
                    b["t_ms"], a[total], b[total]
                ));
            }
        }
    }
    for s in tl {
        if let Some(l) = s.get("latency_us").filter(|l| !l.is_null()) {
            if !(u(l, "p50") <= u(l, "p99") && u(l, "p99") <= u(l, "max") && u(l, "count") > 0) {
                p.push(format!("{side}: window latency out of order: {l}"));
            }
        }
    }
    if side == "source" {
        // The last sample read the same counters as the totals.
        let total = u(r, "precopy_bytes") + u(r, "downtime_bytes") + u(r, "postcopy_bytes");
        let last = tl.last().map(|s| u(s, "bytes")).unwrap_or(0);
        if last != total {
            p.push(format!(
                "source: timeline ends at {last} bytes, totals say {total}"
            ));
        }
    }
    let l = &r["fault_latency_us"];
    let pct = ["p50", "p90", "p99", "p999", "max"].map(|k| u(l, k));
    if pct.windows(2).any(|w| w[0] > w[1]) {
        p.push(format!("{side}: percentiles out of order: {l}"));
    }
    if u(l, "count") != u(r, "postcopy_faults") {
        p.push(format!(
            "{side}: {} latencies for {} faults",
            l["count"], r["postcopy_faults"]
        ));
    }
    let all = f(r, "postcopy_blocktime_ms");
    let per = r["postcopy_vcpu_blocktime"].as_array().unwrap_or(&empty);
    if all.is_nan() || all < 0.0 {
        p.push(format!("{side}: blocktime {}", r["postcopy_blocktime_ms"]));
    }
    for b in per {
        if all > f(b, "blocktime_ms") {
            p.push(format!("{side}: blocktime {all} ms above a vCPU's: {b}"));
        }
    }
    if (per.len() as u64) < u(r, "vcpus") && all != 0.0 {
        p.push(format!(
            "{side}: {} of {} vCPUs ever blocked, yet all were blocked for {all} ms",
            per.len(),
            r["vcpus"]
        ));
    }
    if per.len() as u64 > u(r, "vcpus") {
        p.push(format!(
            "{side}: {} vCPU entries for {} vCPUs",
            per.len(),
            r["vcpus"]
        ));
    }
    p
}

fn write(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_string(v).expect("json")).expect("write report");
}

#[test]
fn reports_of_both_hosts_are_consistent_summarised_and_plotted() -> Result<(), String> {
    let dir = TempDir::new("report");
    let (s, d) = migrate(&dir)?;
    for r in [&s, &d] {
        check(
            r["switched_to_postcopy"] == true && u(r, "postcopy_faults") > 0,
            format!("no postcopy faults to check: {r:#}"),
        )?;
        let p = problems(r);
        check(p.is_empty(), format!("{p:#?}"))?;
    }
    check(
        s["postcopy_vcpu_blocktime"] == d["postcopy_vcpu_blocktime"],
        "the source's per-vCPU blocktime differs from the destination's",
    )?;
    let id = text(&s, "migration_id");

    // The checks catch each kind of fault they guard against.
    let mut doctored = Vec::new();
    let mut r = s.clone();
    let tl = r["timeline"].as_array_mut().expect("timeline");
    tl.swap(1, 2);
    doctored.push(("samples out of order", r));
    let mut r = s.clone();
    let n = r["timeline"].as_array().expect("timeline").len();
    r["timeline"][n - 1]["bytes"] = 0.into();
    doctored.push(("bytes going down", r));
    let mut r = d.clone();
    r["postcopy_blocktime_ms"] = 1e9.into();
    doctored.push(("blocktime above a vCPU's", r));
    let mut r = d.clone();
    r["fault_latency_us"]["p99"] = (u(&d["fault_latency_us"], "max") + 1).into();
    doctored.push(("percentiles out of order", r));
    let mut r = d.clone();
    r["postcopy_vcpu_blocktime"]
        .as_array_mut()
        .expect("list")
        .truncate(1);
    r["postcopy_blocktime_ms"] = 1.0.into();
    doctored.push(("all blocked with a vCPU never blocked", r));
    for (what, r) in &doctored {
        check(!problems(r).is_empty(), format!("{what} went unnoticed"))?;
    }

    // The summary of a saved report.
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let out = run(
        postcopy().args(["report", sj.to_str().expect("utf-8")]),
        Duration::from_secs(30),
    )?;
    check(out.status.success(), out.describe())?;
    for want in [
        format!("migration {id} completed"),
        "blocktime".into(),
        "timeline:".into(),
    ] {
        check(
            out.stdout.contains(&want),
            format!("no {want:?} in {}", out.describe()),
        )?;
    }

    // Both hosts on one chart, as SVG and PNG.
    let svg = dir.path("t.svg");
    let out = run(
        postcopy().args([
            "report",
            sj.to_str().expect("utf-8"),
            dj.to_str().expect("utf-8"),
            "--plot",
            svg.to_str().expect("utf-8"),
        ]),
        Duration::from_secs(60),
    )?;
    check(out.status.success(), out.describe())?;
    check(
        out.stdout.contains("destination's report"),
        format!("both summaries: {}", out.describe()),
    )?;
    let chart = std::fs::read_to_string(&svg).map_err(|e| format!("no chart: {e}"))?;
    for want in [
        // Axes with units.
        "time (s)",
        "bandwidth (Mbit/s)",
        "pending (pages)",
        "faults (1/s)",
        "fault latency (µs, log scale)",
        // Legends of both hosts.
        "source sent (Mbit/s)",
        "destination received (Mbit/s)",
        "destination: faults (1/s)",
        "fault latency p99",
        // State changes of both hosts.
        "src: precopy",
        "package sent",
        "dst: ",
        "running",
        "completed",
    ] {
        check(chart.contains(want), format!("the chart has no {want:?}"))?;
    }
    let png = dir.path("t.png");
    let out = run(
        postcopy().args([
            "report",
            dj.to_str().expect("utf-8"),
            "--plot",
            png.to_str().expect("utf-8"),
        ]),
        Duration::from_secs(60),
    )?;
    check(out.status.success(), out.describe())?;
    let bytes = std::fs::read(&png).map_err(|e| format!("no PNG: {e}"))?;
    check(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000,
        format!("not a PNG chart ({} bytes)", bytes.len()),
    )?;

    // Two reports that do not belong together.
    let mut other = d.clone();
    other["migration_id"] = "0123456789abcdef0123456789abcdef".into();
    let oj = dir.path("other.json");
    write(&oj, &other);
    let out = run(
        postcopy().args([
            "report",
            sj.to_str().expect("utf-8"),
            oj.to_str().expect("utf-8"),
            "--plot",
            svg.to_str().expect("utf-8"),
        ]),
        Duration::from_secs(30),
    )?;
    check(
        !out.status.success() && out.stderr.contains("different migrations"),
        out.describe(),
    )?;
    Ok(())
}

#[test]
fn a_file_that_is_not_a_report_gets_an_error_naming_it() -> Result<(), String> {
    let dir = TempDir::new("bad-report");
    let cases: [(&str, &str, &str); 6] = [
        (
            "truncated.json",
            "{\"status\": \"completed\", \"side\": ",
            "is not JSON",
        ),
        (
            "running.json",
            "{\"status\": \"running\"}\n",
            "holds no report yet",
        ),
        ("array.json", "[1, 2, 3]", "is not a postcopy report"),
        (
            "wrong-type.json",
            "{\"side\": \"source\", \"status\": \"completed\", \"timeline\": \"soon\"}",
            "is not a postcopy report",
        ),
        ("no-side.json", "{\"status\": \"completed\"}", "`side`"),
        ("missing.json", "", "cannot read"),
    ];
    for (name, content, want) in cases {
        let path = dir.path(name);
        if name != "missing.json" {
            std::fs::write(&path, content).map_err(|e| e.to_string())?;
        }
        let out = run(
            postcopy().args(["report", path.to_str().expect("utf-8")]),
            Duration::from_secs(30),
        )?;
        check(
            out.status.code() == Some(2) && out.stderr.contains(want) && out.stderr.contains(name),
            format!("{name}: want exit 2 and {want:?}\n{}", out.describe()),
        )?;
    }
    // A report without a timeline summarises, but does not plot.
    let path = dir.path("old.json");
    std::fs::write(
        &path,
        "{\"side\": \"source\", \"status\": \"failed\", \"migration_id\": \"x\"}",
    )
    .map_err(|e| e.to_string())?;
    let out = run(
        postcopy().args([
            "report",
            path.to_str().expect("utf-8"),
            "--plot",
            dir.path("t.svg").to_str().expect("utf-8"),
        ]),
        Duration::from_secs(30),
    )?;
    check(
        out.status.code() == Some(1)
            && out.stdout.contains("migration x failed")
            && out.stderr.contains("no timeline"),
        out.describe(),
    )?;
    let out = run(
        postcopy().args([
            "report",
            path.to_str().expect("utf-8"),
            "--plot",
            dir.path("t.jpg").to_str().expect("utf-8"),
        ]),
        Duration::from_secs(30),
    )?;
    check(
        out.status.code() == Some(1) && out.stderr.contains(".svg or .png"),
        out.describe(),
    )?;
    Ok(())
}
