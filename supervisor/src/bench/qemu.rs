//! QEMU's postcopy on the same boot sector, the same memory size, the same
//! link and the same settings, driven over QMP (re-implemented here after
//! the harness in `../shared/anchors/qemu`, which shows how): source and
//! destination `qemu-system-x86_64` with KVM, precopy until the chosen
//! dirty sync, `migrate-start-postcopy`, then QEMU's own figures
//! (`query-migrate`, STOP/RESUME/MIGRATION events), the destination's
//! memory checked with the `ab` rule, and CPU time from /proc without the
//! vCPU threads.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::link::Endpoints;
use super::plan::{Scenario, SECTOR_RANGE};
use super::proc::{interrupted, Proc};
use super::Figures;

/// The QEMU binary: `$QEMU` if set (None if no such file), else
/// `qemu-system-x86_64` on the PATH.
pub fn find() -> Option<PathBuf> {
    if let Some(q) = std::env::var_os("QEMU") {
        return Some(PathBuf::from(q)).filter(|p| p.is_file());
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("qemu-system-x86_64"))
        .find(|p| p.is_file())
}

/// `qemu-system-x86_64 --version`, first line.
pub fn version(qemu: &Path) -> Option<String> {
    let out = Command::new(qemu).arg("--version").output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

struct Qmp {
    name: &'static str,
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Events seen, with QEMU's timestamps (s).
    events: Vec<(String, f64, Value)>,
}

impl Qmp {
    fn connect(path: &Path, name: &'static str, proc: &mut Proc) -> Result<Qmp, String> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(st) = proc.try_wait() {
                        return Err(format!("{name} QEMU exited ({st}) before QMP was up"));
                    }
                    if t.elapsed() > Duration::from_secs(30) {
                        return Err(format!("{name} QMP {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut q = Qmp {
            name,
            w: s,
            r,
            events: vec![],
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("{name}: not a QMP greeting: {greeting}"));
        }
        q.cmd("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        if self
            .r
            .read_line(&mut line)
            .map_err(|e| format!("{}: QMP: {e}", self.name))?
            == 0
        {
            return Err(format!("{}: QMP connection closed", self.name));
        }
        serde_json::from_str(&line).map_err(|e| format!("{}: QMP: {e}: {line}", self.name))
    }

    fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let mut req = json!({ "execute": execute });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            req["arguments"] = arguments.clone();
        }
        writeln!(self.w, "{req}").map_err(|e| format!("{}: QMP: {e}", self.name))?;
        loop {
            let msg = self.read()?;
            if let Some(ev) = msg.get("event").and_then(Value::as_str) {
                let ts = &msg["timestamp"];
                let t = ts["seconds"].as_f64().unwrap_or(0.0)
                    + ts["microseconds"].as_f64().unwrap_or(0.0) / 1e6;
                self.events.push((ev.to_string(), t, msg["data"].clone()));
                continue;
            }
            if let Some(r) = msg.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = msg.get("error") {
                return Err(format!("{}: {execute} {arguments}: {e}", self.name));
            }
        }
    }

    /// Time of the first event `name` (MIGRATION: with `status`).
    fn event(&self, name: &str, status: Option<&str>) -> Option<f64> {
        self.events
            .iter()
            .find(|(n, _, d)| n == name && status.is_none_or(|s| d["status"] == s))
            .map(|(_, t, _)| *t)
    }
}

/// CPU seconds of QEMU `pid` outside its vCPU threads (the process total
/// includes threads that have exited).
fn cpu_outside_vcpus(pid: u32) -> Option<f64> {
    let ticks = |stat: &str| -> Option<f64> {
        // Fields after the command name (which may hold spaces): state is
        // field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
    };
    let total = ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)?;
    let mut vcpu = 0.0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") && comm.trim_end().ends_with("/KVM") {
            vcpu += std::fs::read_to_string(t.path().join("stat"))
                .ok()
                .and_then(|s| ticks(&s))
                .unwrap_or(0.0);
        }
    }
    // SAFETY: sysconf takes a constant and reads nothing of ours.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((total - vcpu) / hz)
}

/// Markers the sector wrote after the BIOS handed over.
fn markers(serial: &Path) -> usize {
    let data = std::fs::read(serial).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    match text.find("Booting from Hard Disk") {
        Some(i) => text[i..].matches('*').count(),
        None => 0,
    }
}

fn qemu_cmd(
    ep: &Endpoints,
    src: bool,
    qemu: &Path,
    s: &Scenario,
    image: &Path,
    serial: &Path,
    qmp: &Path,
) -> Command {
    let mut c = ep.command(src, qemu);
    c.args(["-name", if src { "src" } else { "dst" }])
        .args(["-accel", "kvm", "-machine", "pc", "-smp", "1"])
        .args(["-m", &format!("{}M", s.mem_bytes >> 20)])
        .args(["-nographic", "-monitor", "none", "-nic", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=ide", image.display()));
    if !src {
        c.args(["-incoming", "defer"]);
    }
    c
}

/// Runs QEMU's migration of scenario `s` once; files stay in `dir`.
pub fn run(
    qemu: &Path,
    s: &Scenario,
    ep: &Endpoints,
    image: &Path,
    dir: &Path,
) -> Result<Figures, String> {
    // Unix socket paths must stay short: they live in /tmp.
    let tag = format!("/tmp/pcb-{}-{}", std::process::id(), dir_tag(dir));
    let (src_qmp, dst_qmp) = (
        PathBuf::from(format!("{tag}-src.qmp")),
        PathBuf::from(format!("{tag}-dst.qmp")),
    );
    let _cleanup = RemoveOnDrop(vec![src_qmp.clone(), dst_qmp.clone()]);
    let (src_serial, dst_serial) = (dir.join("source.serial"), dir.join("destination.serial"));

    let mut src = Proc::start(
        "qemu source",
        qemu_cmd(ep, true, qemu, s, image, &src_serial, &src_qmp),
        &dir.join("source.log"),
    )?;
    let mut qs = Qmp::connect(&src_qmp, "source", &mut src)?;
    // The guest is dirtying once two full passes were marked.
    let t = Instant::now();
    while markers(&src_serial) < 2 {
        if interrupted() {
            return Err("interrupted".into());
        }
        if t.elapsed() > Duration::from_secs(120) || src.try_wait().is_some() {
            return Err("the source guest did not start dirtying".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    // A free port on the destination's end: found by binding, then given
    // to QEMU.
    let port = ep.listen()?.local_addr().map_err(|e| e.to_string())?.port();
    let target = SocketAddr::new(ep.dst_ip, port);
    let mut dst = Proc::start(
        "qemu destination",
        qemu_cmd(ep, false, qemu, s, image, &dst_serial, &dst_qmp),
        &dir.join("destination.log"),
    )?;
    let mut qd = Qmp::connect(&dst_qmp, "destination", &mut dst)?;
    let caps: Vec<Value> = ["postcopy-ram", "postcopy-blocktime", "events"]
        .iter()
        .map(|c| json!({"capability": c, "state": true}))
        .collect();
    for q in [&mut qs, &mut qd] {
        q.cmd("migrate-set-capabilities", json!({ "capabilities": caps }))?;
    }
    let st = s.settings;
    qs.cmd(
        "migrate-set-parameters",
        json!({
            "max-bandwidth": st.max_bandwidth,
            "downtime-limit": st.downtime_limit_ms,
            "max-postcopy-bandwidth": st.max_postcopy_bandwidth,
        }),
    )?;
    qd.cmd(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{target}") }),
    )?;
    let (to, relay) = ep.reach(target)?;

    let cpu0 = (
        cpu_outside_vcpus(src.pid()).unwrap_or(0.0),
        cpu_outside_vcpus(dst.pid()).unwrap_or(0.0),
    );
    qs.cmd("migrate", json!({ "uri": format!("tcp:{to}") }))?;
    let t = Instant::now();
    let limit = Duration::from_secs(120 + 60 * (s.mem_bytes >> 30));
    let mut postcopy_sent = false;
    let info = loop {
        if interrupted() {
            return Err("interrupted".into());
        }
        let info = qs.cmd("query-migrate", json!({}))?;
        let status = info["status"].as_str().unwrap_or("");
        if matches!(status, "completed" | "failed" | "cancelled") {
            break info;
        }
        let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        let want = st.after_syncs.map(u64::from);
        if !postcopy_sent && status == "active" && want.is_some_and(|n| syncs >= n) {
            qs.cmd("migrate-start-postcopy", json!({}))?;
            postcopy_sent = true;
        }
        if t.elapsed() > limit {
            return Err(format!("QEMU's migration still {status} after {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if info["status"] != "completed" {
        return Err(format!("QEMU's migration {}: {}", info["status"], info));
    }
    let t = Instant::now();
    let dinfo = loop {
        let d = qd.cmd("query-migrate", json!({}))?;
        if matches!(d["status"].as_str(), Some("completed" | "failed")) {
            break d;
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("QEMU's destination still {}", d["status"]));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let cpu1 = (
        cpu_outside_vcpus(src.pid()).unwrap_or(0.0),
        cpu_outside_vcpus(dst.pid()).unwrap_or(0.0),
    );
    drop(relay);
    // Events still queued arrive with any reply.
    qs.cmd("query-version", json!({}))?;
    qd.cmd("query-version", json!({}))?;
    if dinfo["status"] != "completed" {
        return Err(format!("QEMU's destination {}", dinfo["status"]));
    }

    // The destination's memory, checked like ours.
    qd.cmd("stop", json!({}))?;
    let dump = PathBuf::from(format!("/dev/shm/pcb-{}-ram", std::process::id()));
    let _dump_cleanup = RemoveOnDrop(vec![dump.clone()]);
    qd.cmd(
        "pmemsave",
        json!({"val": SECTOR_RANGE.0, "size": SECTOR_RANGE.1 - SECTOR_RANGE.0,
               "filename": dump.display().to_string()}),
    )?;
    let mem = std::fs::read(&dump).map_err(|e| format!("{}: {e}", dump.display()))?;
    let check = common::guest::ab_violations(
        mem.iter()
            .step_by(common::types::PAGE_SIZE)
            .enumerate()
            .map(|(i, &b)| (i as u64, b)),
    );
    let _ = qs.cmd("quit", json!({}));
    let _ = qd.cmd("quit", json!({}));
    let _ = src.wait(Duration::from_secs(20));
    let _ = dst.wait(Duration::from_secs(20));
    let record = json!({
        "source_query_migrate": info,
        "destination_query_migrate": dinfo,
        "source_events": qs.events.iter().map(|(n, t, d)| json!({"event": n, "t": t, "data": d})).collect::<Vec<_>>(),
        "destination_events": qd.events.iter().map(|(n, t, d)| json!({"event": n, "t": t, "data": d})).collect::<Vec<_>>(),
        "ab_pages_checked": check.pages_checked,
        "ab_bad_pages": check.bad_pages.len(),
    });
    let _ = std::fs::write(
        dir.join("qemu.json"),
        serde_json::to_string_pretty(&record).unwrap_or_default(),
    );
    if !check.bad_pages.is_empty() || check.pages_checked == 0 {
        return Err(format!(
            "QEMU's destination memory breaks the ab rule at {} of {} pages",
            check.bad_pages.len(),
            check.pages_checked
        ));
    }

    let mut f = BTreeMap::new();
    let ram = &info["ram"];
    let gib = s.mem_bytes as f64 / (1u64 << 30) as f64;
    if let (Some(stop), Some(resume)) = (qs.event("STOP", None), qd.event("RESUME", None)) {
        f.insert("pause_ms".into(), (resume - stop) * 1e3);
    }
    let active = qs.event("MIGRATION", Some("active"));
    let post = qs.event("MIGRATION", Some("postcopy-active"));
    let done = qs.event("MIGRATION", Some("completed"));
    if let (Some(p), Some(d)) = (post, done) {
        f.insert("postcopy_phase_ms".into(), (d - p) * 1e3);
    }
    if let (Some(a), Some(p), Some(b)) = (active, post, ram["precopy-bytes"].as_f64()) {
        if p > a {
            f.insert("precopy_gbps".into(), b * 8.0 / (p - a) / 1e9);
        }
    }
    let mut put = |k: &str, v: Option<f64>| {
        if let Some(v) = v {
            f.insert(k.to_string(), v);
        }
    };
    put("total_ms", info["total-time"].as_f64());
    put("page_requests", ram["postcopy-requests"].as_f64());
    put("blocktime_ms", dinfo["postcopy-blocktime"].as_f64());
    put(
        "postcopy_mib",
        ram["postcopy-bytes"].as_f64().map(|b| b / 1048576.0),
    );
    put("cpu_s_per_gib_source", Some((cpu1.0 - cpu0.0) / gib));
    put("cpu_s_per_gib_destination", Some((cpu1.1 - cpu0.1) / gib));
    Ok(f)
}

/// A short tag for a run directory (its last component).
fn dir_tag(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
