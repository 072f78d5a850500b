//! One migration of ours: `postcopy incoming` on the destination's end of
//! the link (handed a listening socket, so there is no race to bind) and
//! `postcopy migrate` on the source's, both this same binary, each writing
//! its JSON report; the figures come from those reports.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::link::Endpoints;
use super::plan::Scenario;
use super::proc::Proc;
use super::Figures;

/// Longest a single migration may take before it counts as hung.
fn limit(s: &Scenario) -> Duration {
    Duration::from_secs(120 + 60 * (s.mem_bytes >> 30))
}

/// fd number at which `incoming` finds its listening socket.
const LISTEN_FD: i32 = 3;

/// Runs one migration; the reports stay in `dir`.
pub fn run(s: &Scenario, ep: &Endpoints, sector: &Path, dir: &Path) -> Result<Figures, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let listener = ep.listen()?;
    let target = listener.local_addr().map_err(|e| e.to_string())?;
    let (to, relay) = ep.reach(target)?;
    let (src_json, dst_json) = (dir.join("source.json"), dir.join("destination.json"));

    let mut dst_cmd = ep.command(false, &exe);
    dst_cmd
        .args(["incoming", "--listen-fd", &LISTEN_FD.to_string()])
        .arg("--accept-timeout")
        .arg("300")
        .arg("--json")
        .arg(&dst_json)
        .arg("--serial-log")
        .arg(dir.join("destination.serial"))
        .env("POSTCOPY_LOG_TAG", "dst");
    crate::spawn::hand_over(&mut dst_cmd, listener.as_raw_fd(), LISTEN_FD);
    let mut dst = Proc::start("postcopy incoming", dst_cmd, &dir.join("destination.log"))?;
    drop(listener);

    let mut src_cmd = ep.command(true, &exe);
    src_cmd
        .args(["migrate", "--to", &to.to_string()])
        .args(s.migrate_args(sector))
        .arg("--json")
        .arg(&src_json)
        .arg("--serial-log")
        .arg(dir.join("source.serial"));
    let mut src = Proc::start("postcopy migrate", src_cmd, &dir.join("source.log"))?;
    let src_status = src.wait(limit(s));
    // The destination ends by itself once the migration ended either way.
    let dst_status = dst.wait(Duration::from_secs(60));
    let relay_stats = relay.as_ref().map(|r| r.stats());
    drop(relay);
    src_status?;
    dst_status?;
    let src_r = read(&src_json)?;
    let dst_r = read(&dst_json)?;
    if let Some(st) = relay_stats {
        let _ = std::fs::write(
            dir.join("relay.json"),
            serde_json::to_string_pretty(&st).unwrap_or_default(),
        );
    }
    let status = src_r["status"].as_str().unwrap_or("?");
    if status != "completed" {
        return Err(format!(
            "migration {status}: {}",
            src_r["error"].as_str().unwrap_or("(no error given)")
        ));
    }
    if src_r["verify"]["mismatches"].as_u64() != Some(0) {
        return Err(format!(
            "memory check found mismatches or checked nothing: {}",
            src_r["verify"]
        ));
    }
    Ok(figures(&src_r, &dst_r))
}

fn read(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The headline figures of one of our migrations (names as in the bench's
/// JSON, units in the names).
pub fn figures(src: &Value, dst: &Value) -> Figures {
    let mut f = BTreeMap::new();
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            f.insert(k.to_string(), v);
        }
    };
    let num = |v: &Value| v.as_f64();
    put("pause_ms", num(&src["downtime_ms"]));
    put("total_ms", num(&src["total_time_ms"]));
    put("postcopy_phase_ms", num(&src["postcopy_phase_ms"]));
    put("blocktime_ms", num(&src["postcopy_blocktime_ms"]));
    if src["switched_to_postcopy"].as_bool() == Some(true) {
        put("page_requests", num(&src["postcopy_requests"]));
        put("fault_p50_us", num(&src["fault_latency_us"]["p50"]));
        put("fault_p99_us", num(&src["fault_latency_us"]["p99"]));
        put("faults", num(&src["fault_latency_us"]["count"]));
        put(
            "postcopy_mib",
            num(&src["postcopy_bytes"]).map(|b| b / 1048576.0),
        );
        let placed =
            num(&src["pages_urgent"]).unwrap_or(0.0) + num(&src["pages_background"]).unwrap_or(0.0);
        if let Some(ms) = num(&src["postcopy_phase_ms"]).filter(|&ms| ms > 0.0) {
            put("placed_pages_per_s", Some(placed / (ms / 1e3)));
        }
    }
    // Precopy throughput: what the rounds carried over the time they took.
    if let Some(rounds) = src["rounds"].as_array() {
        let bytes: f64 = rounds.iter().filter_map(|r| r["bytes"].as_f64()).sum();
        let ms: f64 = rounds.iter().filter_map(|r| r["ms"].as_f64()).sum();
        if ms > 0.0 && bytes > 0.0 {
            put("precopy_gbps", Some(bytes * 8.0 / (ms / 1e3) / 1e9));
        }
    }
    put(
        "cpu_s_per_gib_source",
        num(&src["cpu"]["migration_s_per_gib"]),
    );
    put(
        "cpu_s_per_gib_destination",
        num(&dst["cpu"]["migration_s_per_gib"]),
    );
    if let Some(path) = src["fault_path_us"].as_object() {
        for (step, v) in path {
            if v["count"].as_u64().unwrap_or(0) == 0 {
                continue;
            }
            if let Some(p50) = v["p50"].as_f64() {
                put(&format!("path.{step}.p50_us"), Some(p50));
                put(&format!("path.{step}.p99_us"), v["p99"].as_f64());
            }
        }
    }
    f
}
