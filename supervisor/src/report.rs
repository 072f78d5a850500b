//! The migration report: a JSON object (`--json FILE`, fields in
//! docs/report.md) and a human summary; `postcopy report FILE` reads one
//! back. Field names are part of the interface: later versions add, never
//! rename.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use common::control::{ExitStatus, RoleInfo, VerifyResult};
use common::msg::{FaultPath, LatencySummary};

use crate::snapshot::TimelineSample;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct VerifyReport {
    /// "none", "ab" or "digest".
    pub method: String,
    pub pages_checked: u64,
    /// None when nothing was checked: never a 0 that was not measured.
    pub mismatches: Option<u64>,
    pub mismatch_pages: Vec<u64>,
    pub detail: String,
}

/// One earlier attempt, as it ended.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Attempt {
    pub migration_id: String,
    pub status: String,
    pub error: Option<String>,
    pub total_time_ms: f64,
    pub source_guest: Option<String>,
}

impl Report {
    /// Adds an event, timed from `since` (the supervisor's start), and logs it.
    pub fn note(&mut self, since: std::time::Instant, kind: &str, detail: String) {
        log::info!("{kind}: {detail}");
        self.events.push(ReportEvent {
            t_ms: since.elapsed().as_secs_f64() * 1e3,
            kind: kind.to_string(),
            detail,
        });
    }
}

impl VerifyReport {
    pub fn none(detail: &str) -> Self {
        VerifyReport {
            method: "none".into(),
            pages_checked: 0,
            mismatches: None,
            mismatch_pages: vec![],
            detail: detail.into(),
        }
    }

    pub fn from_result(v: VerifyResult) -> Self {
        VerifyReport {
            method: v.method,
            pages_checked: v.pages_checked,
            mismatches: Some(v.mismatches),
            mismatch_pages: v.mismatch_pages,
            detail: v.detail,
        }
    }

    pub fn failed(&self) -> bool {
        self.mismatches.is_some_and(|m| m > 0)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoleReport {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub restarts: u32,
    /// Exit code, "signal N", or null while still running.
    pub exit: serde_json::Value,
}

impl From<&RoleInfo> for RoleReport {
    fn from(r: &RoleInfo) -> Self {
        RoleReport {
            name: r.name.clone(),
            host: r.host.clone(),
            pid: r.pid,
            restarts: r.restarts,
            exit: match r.exit {
                None => serde_json::Value::Null,
                Some(ExitStatus::Code(c)) => c.into(),
                Some(ExitStatus::Signal(s)) => format!("signal {s}").into(),
            },
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RoundReport {
    pub sync: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub bytes: u64,
    pub ms: f64,
    pub pending_pages: u64,
    pub bandwidth_mbps: f64,
    pub dirty_pages_per_s: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SwitchoverReport {
    /// Stop the source guest.
    pub stop: f64,
    /// The last dirty sync.
    pub final_sync: f64,
    /// Send the discard set (postcopy) or the last dirty pages (precopy).
    pub discard: f64,
    /// Save the guest state and send the package.
    pub package: f64,
    /// From the package on the wire to the destination guest running.
    pub dest_start: f64,
    /// On the destination: dropping the final discard set (it overlaps the
    /// source's discard and package steps), then registering the
    /// userfaultfd, then loading and starting the guest (part of dest_start).
    pub dest_discard: f64,
    pub dest_listen: f64,
    pub dest_load_run: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ReportEvent {
    /// Milliseconds since the supervisor started.
    pub t_ms: f64,
    /// `state`, `restart`, `resync`, `pause`, `recover`.
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub status: String,
    pub error: Option<String>,
    pub side: String,
    /// How the hosts talked: `tls1.3` (mutual TLS on every connection) or
    /// `tcp`.
    pub transport: String,
    pub migration_id: String,
    pub guest: String,
    pub workload: String,
    pub vcpus: u32,
    pub mem_bytes: u64,
    pub page_size: u64,
    pub postcopy_mode: String,
    pub downtime_limit_ms: u64,
    /// Main-stream cap before the switch to postcopy, bytes/s (0 = none).
    pub max_bandwidth: u64,
    /// Main-stream cap after it, bytes/s (0 = none).
    pub max_postcopy_bandwidth: u64,
    /// The page-server's read-ahead after each request, pages
    /// (`--prefetch-pages`).
    pub prefetch_pages: u32,
    /// Bulk streams (TCP connections carrying pages), the main stream
    /// included (`--streams`; 0 on the destination until the source's
    /// Setup says).
    pub streams: u32,
    pub total_time_ms: f64,
    pub setup_time_ms: f64,
    pub downtime_ms: Option<f64>,
    pub precopy_bytes: u64,
    pub downtime_bytes: u64,
    pub postcopy_bytes: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub dirty_sync_count: u32,
    pub throughput_mbps: f64,
    pub verify: VerifyReport,
    pub roles: Vec<RoleReport>,
    /// What happened when: state changes, role restarts, resyncs, pauses.
    pub events: Vec<ReportEvent>,
    pub switched_to_postcopy: bool,
    pub switchover_reason: Option<String>,
    pub switchover_ms: Option<SwitchoverReport>,
    pub discarded_pages: u64,
    /// Of discarded_pages: dropped on the destination before the guest
    /// stopped (see docs/state-machine.md, "Early discard").
    pub prediscard_pages: u64,
    pub prediscard_ms: Option<f64>,
    pub postcopy_phase_ms: Option<f64>,
    pub postcopy_requests: u64,
    pub postcopy_faults: u64,
    pub pages_urgent: u64,
    pub pages_background: u64,
    /// QEMU's postcopy blocktime: time during which every vCPU (worker
    /// thread) was blocked on a fault at once, ms.
    pub postcopy_blocktime_ms: Option<f64>,
    /// QEMU's per-vCPU blocktime: each guest thread that faulted.
    pub postcopy_vcpu_blocktime: Vec<VcpuBlocktime>,
    pub fault_latency_us: Option<LatencySummary>,
    pub rounds: Vec<RoundReport>,
    /// What became of the source guest: "released" after a completed
    /// migration, "running" after one that failed before switchover.
    pub source_guest: Option<String>,
    pub source_verify: Option<VerifyReport>,
    pub serial_log_source: Option<String>,
    pub serial_log_destination: Option<String>,
    /// Bytes in the destination's serial log when its guest was stopped
    /// for the memory check.
    pub serial_bytes_destination: Option<u64>,
    /// Bytes in it when the destination said `DestCompleted`: a guest that
    /// still runs after completion writes more (a Linux guest must).
    pub serial_bytes_destination_at_completion: Option<u64>,
    /// Earlier attempts to migrate this guest (`migrate --keep-guest`,
    /// then `postcopy retry`), oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub attempts: Vec<Attempt>,
    /// Wall-clock time this supervisor started, ms since the Unix epoch:
    /// `events` and `timeline` count from it, and it puts two hosts'
    /// reports on one time axis.
    pub started_at_unix_ms: f64,
    /// The figures about every 50 ms (docs/report.md).
    pub timeline: Vec<TimelineSample>,
    /// What the migration cost and where a fault's time went (issue 11):
    /// its fields appear at the top level of the JSON.
    #[serde(flatten)]
    pub cost: CostReport,
}

/// One guest thread's blocktime (QEMU's per-vCPU blocktime).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VcpuBlocktime {
    /// Its thread id in the destination guest process.
    pub tid: u32,
    /// Time it waited for at least one page, ms.
    pub blocktime_ms: f64,
    /// Its faults.
    pub faults: u64,
}

impl VcpuBlocktime {
    pub fn from_stats(s: &common::msg::PostcopyStats) -> Vec<VcpuBlocktime> {
        s.vcpu_blocktime
            .iter()
            .map(|b| VcpuBlocktime {
                tid: b.tid,
                blocktime_ms: b.blocked_us as f64 / 1e3,
                faults: b.faults,
            })
            .collect()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// Why a saved report cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path} is not a postcopy report: {detail}")]
    NotAReport { path: String, detail: String },
    #[error("{path} holds no report yet: the migration was still running when it was read, or ended without writing it")]
    Running { path: String },
}

impl Report {
    /// Reads a report written by `--json`. Errors name the file and what
    /// is wrong with it: unreadable, not JSON, JSON of another shape (a
    /// field of the wrong type, no `side`), or the placeholder of a
    /// migration that never finished.
    pub fn load(path: &Path) -> Result<Report, LoadError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: p.clone(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| LoadError::Json {
                path: p.clone(),
                source,
            })?;
        if value.get("status").and_then(|v| v.as_str()) == Some("running")
            && value.get("side").is_none()
        {
            return Err(LoadError::Running { path: p });
        }
        let report: Report = serde_json::from_value(value).map_err(|e| LoadError::NotAReport {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        if !matches!(report.side.as_str(), "source" | "destination") {
            return Err(LoadError::NotAReport {
                path: p,
                detail: format!(
                    "`side` is {:?}, expected \"source\" or \"destination\"",
                    report.side
                ),
            });
        }
        Ok(report)
    }
}

// ---------------------------------------------------------------- cost
// Kept apart from the fields above so that work on the report by others
// merges without conflicts.

/// CPU time of this host's part of the migration and the fault-path
/// breakdown.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CostReport {
    /// CPU seconds (user + system) on this host, None until measured.
    pub cpu: Option<CpuReport>,
    /// Source report: where the time of faults answered on the urgent
    /// connection went, step by step, µs (from the destination's
    /// fault-handler; `docs/protocol.md`, PAGE_TIMES).
    pub fault_path_us: Option<Box<FaultPath>>,
}

/// CPU seconds (user + system, from getrusage of this process and wait4 of
/// each reaped child) spent on this host.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CpuReport {
    /// This supervisor, its whole life (setup and waiting included).
    pub supervisor_s: f64,
    /// Each data role of this host (ram-sender, page-server; fault-handler)
    /// as it ended; a role not reaped is missing.
    pub roles_s: std::collections::BTreeMap<String, f64>,
    /// Earlier instances of data roles that died and were started again.
    pub replaced_roles_s: f64,
    /// The guest process (its workers or vCPUs: the workload, not the
    /// migration).
    pub guest_s: f64,
    /// supervisor_s plus roles_s: what migrating cost this host.
    pub migration_s: f64,
    /// migration_s per GiB of guest memory.
    pub migration_s_per_gib: f64,
}

impl CpuReport {
    /// Measures now, after the roles of `side` (`source`/`destination`)
    /// listed in `roles` were reaped.
    pub fn measure(roles: &[RoleReport], side: &str, mem_bytes: u64) -> CpuReport {
        let supervisor_s = crate::events::own_cpu().as_secs_f64();
        let mut roles_s = std::collections::BTreeMap::new();
        let mut guest_s = 0.0;
        for r in roles.iter().filter(|r| r.host == side) {
            let Some(cpu) = crate::events::child_cpu(r.pid) else {
                continue;
            };
            if r.name == "postcopy-guest" {
                guest_s += cpu.as_secs_f64();
            } else if !r.name.starts_with("postcopy ") {
                *roles_s.entry(r.name.clone()).or_insert(0.0) += cpu.as_secs_f64();
            }
        }
        // Reaped children not listed (a `postcopy incoming` of the demo is
        // listed, as another host) are replaced role instances.
        let replaced_roles_s: f64 = crate::events::reaped_children_cpu()
            .iter()
            .filter(|(pid, _)| !roles.iter().any(|r| r.pid == *pid))
            .map(|(_, d)| d.as_secs_f64())
            .sum();
        let migration_s = supervisor_s + roles_s.values().sum::<f64>() + replaced_roles_s;
        let gib = mem_bytes as f64 / f64::from(1u32 << 30);
        CpuReport {
            supervisor_s,
            roles_s,
            replaced_roles_s,
            guest_s,
            migration_s,
            migration_s_per_gib: if gib > 0.0 { migration_s / gib } else { 0.0 },
        }
    }
}

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Report {
    pub fn succeeded(&self) -> bool {
        self.status == "completed" && !self.verify.failed()
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let ms = |v: Option<f64>| {
            v.map(|v| format!("{v:.1} ms"))
                .unwrap_or_else(|| "-".into())
        };
        s.push_str(&format!(
            "migration {} {} in {:.0} ms over {} (setup {:.0} ms, downtime {}){}\n",
            if self.migration_id.is_empty() {
                "(none arrived)"
            } else {
                &self.migration_id
            },
            self.status,
            self.total_time_ms,
            self.transport,
            self.setup_time_ms,
            ms(self.downtime_ms),
            if self.side == "destination" {
                ", destination's report"
            } else {
                ""
            }
        ));
        if let Some(e) = &self.error {
            s.push_str(&format!("  error: {e}\n"));
        }
        // Nothing to say about a guest that never arrived.
        if self.guest.is_empty() {
            return s;
        }
        s.push_str(&format!(
            "  guest {} / {}, {}, {} vCPU{}; postcopy {}\n",
            self.guest,
            self.workload,
            size(self.mem_bytes),
            self.vcpus,
            if self.vcpus == 1 { "" } else { "s" },
            self.postcopy_mode
        ));
        if self.side == "destination" {
            // The byte totals are the source's; the destination's are in
            // its timeline.
            if let Some(last) = self.timeline.last() {
                s.push_str(&format!(
                    "  received {} in {} dirty syncs\n",
                    size(last.bytes),
                    self.dirty_sync_count
                ));
            }
        } else {
            s.push_str(&format!(
                "  precopy {} in {} dirty syncs; downtime {}; postcopy {}; {} pages sent, {} zero pages; {:.0} Mbit/s\n",
                size(self.precopy_bytes),
                self.dirty_sync_count,
                size(self.downtime_bytes),
                size(self.postcopy_bytes),
                self.pages_sent,
                self.zero_pages,
                self.throughput_mbps
            ));
        }
        if self.switched_to_postcopy {
            s.push_str(&format!(
                "  switched to postcopy{}\n",
                self.switchover_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ));
            if let Some(l) = &self.fault_latency_us {
                s.push_str(&format!(
                    "  postcopy {}: {} requests, {} faults, {} urgent + {} background pages, {} discarded; fault latency p50 {} µs p99 {} µs p99.9 {} µs max {} µs\n",
                    ms(self.postcopy_phase_ms),
                    self.postcopy_requests,
                    self.postcopy_faults,
                    self.pages_urgent,
                    self.pages_background,
                    self.discarded_pages,
                    l.p50,
                    l.p99,
                    l.p999,
                    l.max,
                ));
                let per: Vec<String> = self
                    .postcopy_vcpu_blocktime
                    .iter()
                    .map(|b| format!("{:.1} ms", b.blocktime_ms))
                    .collect();
                s.push_str(&format!(
                    "  blocktime {} (all vCPUs at once); per vCPU {}\n",
                    ms(self.postcopy_blocktime_ms),
                    if per.is_empty() {
                        "-".to_string()
                    } else {
                        per.join(", ")
                    }
                ));
            }
        }
        match self.verify.mismatches {
            Some(m) => s.push_str(&format!(
                "  verify {}: {} pages checked, {} mismatches{}\n",
                self.verify.method,
                self.verify.pages_checked,
                m,
                if m > 0 {
                    format!(" (first: {:?})", self.verify.mismatch_pages)
                } else {
                    String::new()
                }
            )),
            None => s.push_str(&format!(
                "  verify {}: not checked{}\n",
                self.verify.method,
                if self.verify.detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", self.verify.detail)
                }
            )),
        }
        if let Some(g) = &self.source_guest {
            s.push_str(&format!("  source guest: {g}\n"));
        }
        if let Some(v) = &self.source_verify {
            if let Some(m) = v.mismatches {
                s.push_str(&format!(
                    "  source memory check ({}): {} pages, {} mismatches\n",
                    v.method, v.pages_checked, m
                ));
            }
        }
        if let (Some(first), Some(last)) = (self.timeline.first(), self.timeline.last()) {
            let peak = self
                .timeline
                .iter()
                .map(|t| t.bandwidth_mbps)
                .fold(0.0, f64::max);
            s.push_str(&format!(
                "  timeline: {} samples from {:.1} s to {:.1} s; peak {:.0} Mbit/s\n",
                self.timeline.len(),
                first.t_ms / 1e3,
                last.t_ms / 1e3,
                peak
            ));
        }
        let marks: Vec<String> = self
            .events
            .iter()
            .filter(|e| e.kind != "state")
            .map(|e| format!("{:.1} s {} ({})", e.t_ms / 1e3, e.kind, e.detail))
            .collect();
        if !marks.is_empty() {
            s.push_str(&format!("  events: {}\n", marks.join("; ")));
        }
        if let Some(p) = &self.serial_log_destination {
            s.push_str(&format!(
                "  serial logs: source {}, destination {} ({} bytes after switchover)\n",
                self.serial_log_source.as_deref().unwrap_or("-"),
                p,
                self.serial_bytes_destination.unwrap_or(0)
            ));
        }
        s
    }
}

/// What a report file holds while the migration runs.
const PLACEHOLDER: &str = "{\"status\": \"running\"}\n";

/// The `--json` file. It is opened and written (with a placeholder saying
/// the migration runs) before anything starts, and the report later goes
/// through the same handle in the same way: a path that cannot take the
/// report fails up front, as a command-line error, never after the whole
/// migration.
#[derive(Debug)]
pub struct ReportFile {
    path: PathBuf,
    file: File,
}

impl ReportFile {
    /// Opens (creates if missing) `path` and writes the placeholder.
    /// Errors: the open or the write failed (a directory, a missing
    /// parent, a read-only or full file system, a file that takes no
    /// writes); the message names the path.
    pub fn create(path: &Path) -> Result<ReportFile, String> {
        let fail = |e: std::io::Error| format!("--json {}: {e}", path.display());
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(fail)?;
        let mut f = ReportFile {
            path: path.to_path_buf(),
            file,
        };
        f.replace(PLACEHOLDER).map_err(fail)?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file's content with the report as one JSON object.
    pub fn write(&mut self, report: &Report) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(report).map_err(std::io::Error::other)?;
        self.replace(&(text + "\n"))
    }

    /// Writes from the start, then cuts what an older, longer content left
    /// behind: a reader never finds the file empty.
    fn replace(&mut self, text: &str) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(text.as_bytes())?;
        self.file.set_len(text.len() as u64)?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("postcopy-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir.join(name)
    }

    #[test]
    fn the_report_replaces_the_placeholder_and_older_content() {
        let p = scratch("r.json");
        std::fs::write(&p, "x".repeat(100_000)).expect("old content");
        let mut f = ReportFile::create(&p).expect("create");
        assert_eq!(std::fs::read_to_string(&p).expect("read"), PLACEHOLDER);
        let r = Report {
            status: "completed".into(),
            ..Default::default()
        };
        f.write(&r).expect("write");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
        assert_eq!(v["status"], "completed");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn unwritable_paths_fail_up_front_naming_the_path() {
        let dir = scratch("a-directory");
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = scratch("missing-dir").join("r.json");
        // Root may open these, but they take no report.
        for p in [dir.as_path(), &missing, Path::new("/proc/version")] {
            let e = ReportFile::create(p).expect_err("should fail");
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
    }
}
