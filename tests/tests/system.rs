//! Whole-system tests: the real `postcopy` binary, real role processes, real
//! userfaultfd and KVM, real TCP (loopback, or between two network
//! namespaces). Each migration's memory is checked the way QEMU's migration
//! tests do (the `ab` rule) or page by page (digests). KVM trials report
//! "skipped: <reason>" as ignored where KVM is not usable, never as passed.

use libtest_mimic::Arguments;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tests::{
    bin_dir, check, free_port, kvm_skip_reason, num, postcopy, report, run, start, text, Running,
    TempDir, TwoHosts,
};

type TestResult = Result<(), String>;

fn main() {
    let mut args = Arguments::from_args();
    // Every migration keeps both CPUs busy: one at a time keeps them honest.
    args.test_threads.get_or_insert(1);
    let skip = kvm_skip_reason();
    if let Some(reason) = &skip {
        eprintln!("skipped: KVM tests: {reason}");
    }
    let plain = tests::plain_trial;
    let kvm = |name: &'static str, f: fn() -> TestResult| tests::kvm_trial(name, f, skip.clone());
    let trials = vec![
        plain("cli_rejects_unknown_values", cli_rejects_unknown_values),
        plain(
            "hello_with_wrong_version_is_refused",
            hello_with_wrong_version_is_refused,
        ),
        plain("source_names_both_versions", source_names_both_versions),
        plain("precopy_ab", precopy_ab),
        plain("precopy_random_digest", precopy_random_digest),
        plain("precopy_idle", precopy_idle),
        plain("postcopy_ab_two_vcpus", postcopy_ab_two_vcpus),
        plain("postcopy_random_digest", postcopy_random_digest),
        plain("manual_start_postcopy", manual_start_postcopy),
        plain("three_streams_process", three_streams_process),
        kvm("three_streams_kvm", three_streams_kvm),
        plain("roles_are_separate_processes", roles_are_separate_processes),
        plain("roles_are_sandboxed", roles_are_sandboxed),
        plain("sandbox_kills_ram_sender", sandbox_kills_ram_sender),
        plain("sandbox_kills_page_server", sandbox_kills_page_server),
        plain("sandbox_kills_fault_handler", sandbox_kills_fault_handler),
        plain("unknown_role_user_is_refused", unknown_role_user_is_refused),
        plain("two_hosts_over_veth", two_hosts_over_veth),
        plain("link_cut_before_switchover", link_cut_before_switchover),
        plain("destination_refuses_postcopy", destination_refuses_postcopy),
        plain("stalled_destination_is_lost", stalled_destination_is_lost),
        plain("kvm_unusable_fails_clearly", kvm_unusable_fails_clearly),
        kvm("kvm_precopy", kvm_precopy),
        kvm("kvm_postcopy_two_vcpus", kvm_postcopy_two_vcpus),
        kvm(
            "kvm_boot_sector_with_verify_range",
            kvm_boot_sector_with_verify_range,
        ),
        plain(
            "unwritable_report_path_is_refused_up_front",
            unwritable_report_path_is_refused_up_front,
        ),
        plain(
            "interrupted_precopy_counts_what_went_out",
            interrupted_precopy_counts_what_went_out,
        ),
        plain(
            "failed_postcopy_counts_what_went_out",
            failed_postcopy_counts_what_went_out,
        ),
        plain(
            "postcopy_bandwidth_is_capped_apart",
            postcopy_bandwidth_is_capped_apart,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------- helpers

/// Runs `postcopy demo ARGS --json FILE` and returns its report; the
/// command must exit 0.
fn demo(args: &[&str], limit_s: u64) -> Result<Value, String> {
    let dir = TempDir::new("demo");
    let json = dir.path("r.json");
    let out = run(
        postcopy().arg("demo").args(args).arg("--json").arg(&json),
        Duration::from_secs(limit_s),
    )?;
    let r = report(&json).map_err(|e| format!("{e}\n{}", out.describe()))?;
    check(
        out.status.success(),
        format!("demo {args:?} failed\n{}\nreport: {r:#}", out.describe()),
    )?;
    Ok(r)
}

/// The checks every completed migration must pass.
fn completed(r: &Value) -> TestResult {
    check(
        text(r, "status") == "completed",
        format!("status is not completed: {r:#}"),
    )?;
    check(r["error"].is_null(), format!("error set: {}", r["error"]))?;
    check(
        r["verify"]["mismatches"].as_u64() == Some(0),
        format!("verify: {:#}", r["verify"]),
    )?;
    let pages = num(r, "mem_bytes")? / 4096;
    let checked = num(r, "verify.pages_checked")?;
    check(
        checked > 0 && checked <= pages,
        format!("verify checked {checked} pages of {pages}"),
    )?;
    for role in r["roles"].as_array().ok_or("no roles")? {
        check(
            role["restarts"].as_u64() == Some(0),
            format!("a role restarted: {role}"),
        )?;
    }
    Ok(())
}

fn postcopied(r: &Value) -> TestResult {
    check(
        r["switched_to_postcopy"].as_bool() == Some(true),
        format!("did not switch to postcopy: {r:#}"),
    )?;
    check(num(r, "postcopy_bytes")? > 0, "postcopy_bytes is 0")?;
    check(
        r["fault_latency_us"]["p99"].is_u64(),
        format!("no fault_latency_us.p99: {}", r["fault_latency_us"]),
    )?;
    for part in ["stop", "final_sync", "discard", "package", "dest_start"] {
        check(
            r["switchover_ms"][part].is_number(),
            format!("switchover_ms.{part} missing: {}", r["switchover_ms"]),
        )?;
    }
    check(r["downtime_ms"].is_number(), "no downtime_ms")?;
    Ok(())
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> TestResult {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "timed out after {} s waiting for {what}",
        limit.as_secs()
    ))
}

// ---------------------------------------------------------------- CLI and protocol

fn cli_rejects_unknown_values() -> TestResult {
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["demo", "--postcopy", "sometimes"],
            &["invalid value 'sometimes'", "never", "auto", "manual"],
        ),
        (
            &["demo", "--workload", "bogus"],
            &["invalid value 'bogus'", "ab", "random", "idle"],
        ),
        (
            &["demo", "--guest", "xen"],
            &["invalid value 'xen'", "process", "kvm"],
        ),
        (
            &["demo", "--verify", "maybe"],
            &["invalid value 'maybe'", "digest"],
        ),
        (&["demo", "--mem", "12Q"], &["12Q", "suffix"]),
        (
            &["demo", "--workload", "random", "--verify", "ab"],
            &["--verify ab needs the ab workload"],
        ),
        (
            &["demo", "--postcopy-after-syncs", "3"],
            &["--postcopy manual"],
        ),
        (&["demo", "--guest", "kvm", "--mem", "8G"], &["at most"]),
    ];
    for (args, needles) in cases {
        let out = run(postcopy().args(*args), Duration::from_secs(10))?;
        check(
            out.status.code() == Some(2),
            format!("{args:?} should exit 2\n{}", out.describe()),
        )?;
        for n in *needles {
            check(
                out.stderr.contains(n),
                format!("{args:?}: stderr lacks {n:?}\n{}", out.describe()),
            )?;
        }
    }
    Ok(())
}

fn hello(version: u16, kind: u8) -> Vec<u8> {
    let mut b = vec![0u8; 32];
    b[0..4].copy_from_slice(b"PCPY");
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6] = kind;
    b[8..24].copy_from_slice(&[0x42; 16]);
    b
}

fn hello_with_wrong_version_is_refused() -> TestResult {
    let port = free_port();
    let dest = start(postcopy().args([
        "incoming",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--accept-timeout",
        "10",
    ]));
    let connect = || -> Result<TcpStream, String> {
        let t = Instant::now();
        loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => return Ok(s),
                Err(e) if t.elapsed() > Duration::from_secs(5) => {
                    return Err(format!("incoming never listened: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    };
    // A peer speaking version 99.
    let mut s = connect()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(&hello(99, 1)).map_err(|e| e.to_string())?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .map_err(|e| format!("no hello reply: {e}"))?;
    check(
        &reply[0..4] == b"PCPY",
        format!("reply magic {:?}", &reply[0..4]),
    )?;
    check(
        u16::from_le_bytes([reply[4], reply[5]]) == common::wire::PROTOCOL_VERSION,
        format!(
            "reply names version {}",
            u16::from_le_bytes([reply[4], reply[5]])
        ),
    )?;
    check(
        reply[6] == 2,
        format!("reply status {} is not 'version mismatch' (2)", reply[6]),
    )?;
    // Not a postcopy peer at all.
    let mut s = connect()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nxxxxxx")
        .map_err(|e| e.to_string())?;
    s.read_exact(&mut reply)
        .map_err(|e| format!("no hello reply: {e}"))?;
    check(
        reply[6] == 1,
        format!("reply status {} is not 'bad magic' (1)", reply[6]),
    )?;
    // The destination keeps waiting for a real source, then gives up.
    let out = dest.finish(Duration::from_secs(20))?;
    check(
        out.stderr.contains(&format!(
            "we speak version {}, peer speaks version 99",
            common::wire::PROTOCOL_VERSION
        )),
        format!(
            "destination log does not name both versions\n{}",
            out.describe()
        ),
    )?;
    check(
        out.stderr.contains("bad magic"),
        format!(
            "destination log does not mention the bad magic\n{}",
            out.describe()
        ),
    )?;
    check(
        !out.status.success(),
        "incoming with no migration should fail",
    )?;
    Ok(())
}

fn source_names_both_versions() -> TestResult {
    // A fake destination that answers every hello as a version-7 peer.
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let fake = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut h = [0u8; 32];
            let _ = s.read_exact(&mut h);
            let mut reply = [0u8; 16];
            reply[0..4].copy_from_slice(b"PCPY");
            reply[4..6].copy_from_slice(&7u16.to_le_bytes());
            reply[6] = 2;
            let _ = s.write_all(&reply);
        }
    });
    let dir = TempDir::new("version");
    let json = dir.path("r.json");
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "16M",
            ])
            .arg("--json")
            .arg(&json),
        Duration::from_secs(60),
    )?;
    let _ = fake.join();
    check(
        !out.status.success(),
        format!("migrate should fail\n{}", out.describe()),
    )?;
    let r = report(&json)?;
    let err = r["error"].as_str().unwrap_or("");
    check(
        err.contains(&format!("version {}", common::wire::PROTOCOL_VERSION))
            && err.contains("version 7"),
        format!("error does not name both versions: {err}"),
    )?;
    check(text(&r, "status") == "failed", "status is not failed")?;
    check(num(&r, "pages_sent")? == 0, "pages moved")?;
    check(
        text(&r, "source_guest") == "running",
        format!("source guest: {}", r["source_guest"]),
    )?;
    Ok(())
}

// ---------------------------------------------------------------- precopy

fn precopy_ab() -> TestResult {
    let r = demo(
        &[
            "--mem",
            "128M",
            "--workload",
            "ab",
            "--postcopy",
            "never",
            "--vcpus",
            "2",
        ],
        120,
    )?;
    completed(&r)?;
    check(r["verify"]["method"] == "ab", "verify method is not ab")?;
    check(
        num(&r, "dirty_sync_count")? >= 2,
        "fewer than 2 dirty syncs",
    )?;
    check(
        num(&r, "precopy_bytes")? + num(&r, "zero_pages")? * 4096 >= 128 << 20,
        format!(
            "precopy_bytes {} plus zero pages do not cover memory",
            r["precopy_bytes"]
        ),
    )?;
    check(
        r["switched_to_postcopy"] == false,
        "switched to postcopy with --postcopy never",
    )?;
    check(
        num(&r, "postcopy_bytes")? == 0,
        "postcopy bytes in a precopy migration",
    )?;
    Ok(())
}

fn precopy_random_digest() -> TestResult {
    let r = demo(
        &[
            "--mem",
            "128M",
            "--workload",
            "random",
            "--postcopy",
            "never",
            "--verify",
            "digest",
        ],
        120,
    )?;
    completed(&r)?;
    check(
        r["verify"]["method"] == "digest",
        "verify method is not digest",
    )?;
    check(
        num(&r, "verify.pages_checked")? == 32768,
        "digest did not check every page",
    )?;
    // Most of a random guest's memory was never written: zero pages.
    check(num(&r, "zero_pages")? > 0, "no zero pages detected")?;
    check(
        num(&r, "dirty_sync_count")? >= 2,
        "fewer than 2 dirty syncs",
    )?;
    Ok(())
}

fn precopy_idle() -> TestResult {
    let r = demo(
        &["--mem", "64M", "--workload", "idle", "--postcopy", "never"],
        120,
    )?;
    completed(&r)?;
    check(r["verify"]["method"] == "digest", "idle verifies by digest")?;
    check(num(&r, "pages_sent")? >= 16384, "not every page was sent")?;
    Ok(())
}

// ---------------------------------------------------------------- postcopy

fn postcopy_ab_two_vcpus() -> TestResult {
    let r = demo(
        &[
            "--mem",
            "256M",
            "--workload",
            "ab",
            "--vcpus",
            "2",
            "--postcopy",
            "auto",
            "--max-bandwidth",
            "64M",
        ],
        180,
    )?;
    completed(&r)?;
    postcopied(&r)?;
    check(num(&r, "postcopy_requests")? > 0, "no page was requested")?;
    check(num(&r, "discarded_pages")? > 0, "nothing was discarded")?;
    Ok(())
}

fn postcopy_random_digest() -> TestResult {
    // Pages sent in precopy and dirtied before the switch must be fetched
    // fresh: the digests of the source's frozen pages catch a stale one.
    let r = demo(
        &[
            "--mem",
            "256M",
            "--workload",
            "random",
            "--write-rate",
            "0",
            "--hot-set",
            "50%",
            "--postcopy",
            "auto",
            "--max-bandwidth",
            "64M",
            "--verify",
            "digest",
        ],
        180,
    )?;
    completed(&r)?;
    postcopied(&r)?;
    check(num(&r, "discarded_pages")? > 0, "nothing was discarded")?;
    check(
        num(&r, "verify.pages_checked")? == 65536,
        "digest did not check every page",
    )?;
    Ok(())
}

// ---------------------------------------------------------------- streams

/// `--streams 3`: a plain precopy, then a postcopy migration (discard,
/// package, push on all three streams), each with 0 mismatches; the
/// report says 3 streams and the totals add up.
fn three_streams(guest: &[&str], verify: &str) -> TestResult {
    let mut precopy = guest.to_vec();
    precopy.extend(["--mem", "256M", "--streams", "3", "--postcopy", "never"]);
    precopy.extend(["--verify", verify]);
    let r = demo(&precopy, 180)?;
    completed(&r)?;
    check(num(&r, "streams")? == 3, "streams is not 3")?;
    check(r["switched_to_postcopy"] == false, "switched with never")?;
    let mut post = guest.to_vec();
    post.extend([
        "--mem",
        "256M",
        "--streams",
        "3",
        "--postcopy",
        "auto",
        "--max-bandwidth",
        "64M",
        "--verify",
        verify,
    ]);
    let r = demo(&post, 240)?;
    completed(&r)?;
    postcopied(&r)?;
    check(num(&r, "streams")? == 3, "streams is not 3")?;
    check(num(&r, "discarded_pages")? > 0, "nothing was discarded")?;
    totals_add_up(&r)
}

fn three_streams_process() -> TestResult {
    three_streams(
        &[
            "--workload",
            "random",
            "--write-rate",
            "0",
            "--hot-set",
            "50%",
        ],
        "digest",
    )?;
    // With TLS every bulk stream has a handshake and session of its own.
    three_streams(&["--workload", "ab", "--vcpus", "2", "--tls"], "ab")
}

fn three_streams_kvm() -> TestResult {
    three_streams(&["--guest", "kvm", "--vcpus", "2"], "auto")
}

fn manual_start_postcopy() -> TestResult {
    let dir = TempDir::new("manual");
    let json = dir.path("r.json");
    let sock = dir.path("cmd.sock");
    // ab dirties 128 MiB many times a second: at 16 MiB/s precopy alone
    // never converges.
    let mut m = start(
        postcopy()
            .args([
                "demo",
                "--mem",
                "128M",
                "--postcopy",
                "manual",
                "--max-bandwidth",
                "16M",
            ])
            .arg("--control")
            .arg(&sock)
            .arg("--json")
            .arg(&json),
    );
    wait_for("the command socket", Duration::from_secs(30), || {
        sock.exists()
    })?;
    std::thread::sleep(Duration::from_secs(12));
    check(m.running(), "the migration ended without start-postcopy")?;
    let out = run(
        postcopy().arg("start-postcopy").arg("--control").arg(&sock),
        Duration::from_secs(10),
    )?;
    check(
        out.status.success(),
        format!("start-postcopy failed\n{}", out.describe()),
    )?;
    let out = m.finish(Duration::from_secs(120))?;
    let r = report(&json)?;
    check(
        out.status.success(),
        format!("demo failed\n{}\n{r:#}", out.describe()),
    )?;
    completed(&r)?;
    postcopied(&r)?;
    check(
        text(&r, "switchover_reason").contains("start-postcopy"),
        format!("switchover reason: {}", r["switchover_reason"]),
    )?;
    check(
        num(&r, "dirty_sync_count")? >= 2,
        "switched before a full round",
    )?;
    Ok(())
}

/// Processes whose command name is `comm`.
/// Processes under `root` (itself included) whose command name is `comm`:
/// other migrations on the machine do not count.
fn pids_named(root: u32, comm: &str) -> Vec<u32> {
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so cut after ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let under_root = |mut pid: u32| {
        for _ in 0..64 {
            if pid == root {
                return true;
            }
            match parent(pid) {
                Some(p) if p > 1 => pid = p,
                _ => return false,
            }
        }
        false
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map(|c| c.trim() == comm)
            .unwrap_or(false)
            && under_root(pid)
        {
            out.push(pid);
        }
    }
    out
}

/// What each open fd of `pid` points to.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn roles_are_separate_processes() -> TestResult {
    let dir = TempDir::new("roles");
    let json = dir.path("r.json");
    let mut m = start(
        postcopy()
            .args([
                "demo",
                "--mem",
                "128M",
                "--postcopy",
                "auto",
                "--max-bandwidth",
                "24M",
            ])
            .arg("--json")
            .arg(&json),
    );
    let root = m.pid();
    let roles = ["ram-sender", "page-server", "fault-handler"];
    let mut seen: Vec<(String, u32)> = Vec::new();
    let mut guests_seen = 0;
    let t = Instant::now();
    while m.running() && t.elapsed() < Duration::from_secs(120) {
        for name in roles {
            for pid in pids_named(root, name) {
                let pair = (name.to_string(), pid);
                if !seen.contains(&pair) {
                    seen.push(pair);
                }
                // A role holds only what it was handed: sockets, the
                // memfds, the userfaultfd, the guest's pagemap, stdio.
                for target in fd_targets(pid) {
                    let ok = target.starts_with("socket:")
                        || target.starts_with("/memfd:")
                        || target == "anon_inode:[userfaultfd]"
                        || (target.starts_with("/proc/") && target.ends_with("/pagemap"))
                        || target == "/dev/null"
                        || target.starts_with("pipe:");
                    check(ok, format!("{name} (pid {pid}) holds {target}"))?;
                }
            }
        }
        guests_seen = guests_seen.max(pids_named(root, "postcopy-guest").len());
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = m.finish(Duration::from_secs(30))?;
    let r = report(&json)?;
    check(
        out.status.success(),
        format!("demo failed\n{}", out.describe()),
    )?;
    completed(&r)?;
    check(
        guests_seen == 2,
        format!("saw {guests_seen} guest processes at once, expected 2"),
    )?;
    for name in roles {
        let pids: Vec<u32> = seen
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .collect();
        check(
            pids.len() == 1,
            format!("{name}: pids {pids:?}, expected one for the whole migration"),
        )?;
        let reported = r["roles"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|x| x["name"] == name)
            .ok_or(format!("{name} missing from the report"))?;
        check(
            reported["pid"].as_u64() == Some(u64::from(pids[0])),
            format!(
                "{name}: report pid {} but ran as {}",
                reported["pid"], pids[0]
            ),
        )?;
        check(
            reported["exit"] == 0,
            format!("{name} exit: {}", reported["exit"]),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------- two hosts

fn two_hosts_over_veth() -> TestResult {
    let hosts = TwoHosts::new("mig")?;
    let dir = TempDir::new("veth");
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let (dest, addr) = hosts.incoming(4710, &[], &dj);
    let args = [
        "--mem",
        "128M",
        "--vcpus",
        "2",
        "--postcopy",
        "auto",
        "--max-bandwidth",
        "48M",
    ];
    let out = run(
        &mut hosts.migrate(&addr, &args, &sj),
        Duration::from_secs(180),
    )?;
    let dout = dest.finish(Duration::from_secs(30))?;
    let r = report(&sj)?;
    check(
        out.status.success(),
        format!("migrate failed\n{}\n{r:#}", out.describe()),
    )?;
    check(
        dout.status.success(),
        format!("incoming failed\n{}", dout.describe()),
    )?;
    completed(&r)?;
    let d = report(&dj)?;
    check(
        text(&d, "status") == "completed",
        format!("destination: {d:#}"),
    )?;
    check(
        d["migration_id"] == r["migration_id"],
        "the two sides name different migrations",
    )?;
    // Processes on both hosts are in the source's report.
    let hosts_in_report: Vec<&str> = r["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["host"].as_str())
        .collect();
    check(
        hosts_in_report.contains(&"source") && hosts_in_report.contains(&"destination"),
        format!("roles: {}", r["roles"]),
    )?;
    Ok(())
}

fn link_cut_before_switchover() -> TestResult {
    let hosts = TwoHosts::new("cut")?;
    let dir = TempDir::new("cut");
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let (dest, addr) = hosts.incoming(4711, &["--link-timeout", "3"], &dj);
    // 256 MiB at 16 MiB/s: the first round alone takes 16 s.
    let args = [
        "--mem",
        "256M",
        "--postcopy",
        "auto",
        "--max-bandwidth",
        "16M",
        "--link-timeout",
        "3",
    ];
    let src = start(&mut hosts.migrate(&addr, &args, &sj));
    std::thread::sleep(Duration::from_secs(4));
    hosts.cut()?;
    let t = Instant::now();
    let out = src.finish(Duration::from_secs(60))?;
    let detect = t.elapsed();
    let r = report(&sj)?;
    check(!out.status.success(), "the source should report failure")?;
    check(
        text(&r, "status") == "failed",
        format!("status: {}", r["status"]),
    )?;
    check(
        r["switched_to_postcopy"] == false,
        "the cut should come before the switchover",
    )?;
    check(
        text(&r, "source_guest") == "running",
        format!(
            "source guest after the cut: {} ({})",
            r["source_guest"], r["error"]
        ),
    )?;
    check(
        r["source_verify"]["mismatches"].as_u64() == Some(0),
        format!("source memory check: {}", r["source_verify"]),
    )?;
    check(
        detect < Duration::from_secs(30),
        format!("took {:?} to notice the cut", detect),
    )?;
    let dout = dest.finish(Duration::from_secs(60))?;
    check(!dout.status.success(), "the destination should give up")?;
    let d = report(&dj)?;
    check(
        text(&d, "status") == "failed",
        format!("destination status: {}", d["status"]),
    )?;
    Ok(())
}

fn destination_refuses_postcopy() -> TestResult {
    // An unprivileged destination cannot create a userfaultfd that takes
    // kernel-mode faults (vm.unprivileged_userfaultfd=0): it must refuse at
    // setup, before any page moves.
    let unpriv = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .map(|s| s.trim() == "0")
        .unwrap_or(false);
    check(unpriv, "this test needs vm.unprivileged_userfaultfd=0")?;
    let port = free_port();
    let dir = TempDir::new("refuse");
    let json = dir.path("r.json");
    let dest = start(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin_dir().join("postcopy"))
            .args([
                "incoming",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--accept-timeout",
                "30",
            ]),
    );
    std::thread::sleep(Duration::from_millis(300));
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "64M",
            ])
            .arg("--json")
            .arg(&json),
        Duration::from_secs(60),
    )?;
    let _ = dest.finish(Duration::from_secs(30));
    let r = report(&json)?;
    check(!out.status.success(), "migrate should fail")?;
    let err = r["error"].as_str().unwrap_or("");
    check(
        err.contains("refused") && err.contains("postcopy") && err.contains("userfaultfd"),
        format!("error does not say why: {err}"),
    )?;
    check(
        num(&r, "pages_sent")? == 0 && num(&r, "precopy_bytes")? == 0,
        "pages moved",
    )?;
    check(
        text(&r, "source_guest") == "running",
        format!("source guest: {}", r["source_guest"]),
    )?;
    Ok(())
}

fn stalled_destination_is_lost() -> TestResult {
    // A destination supervisor that stops answering (SIGSTOP) keeps its TCP
    // connections alive: only the heartbeat notices it.
    let dir = TempDir::new("stall");
    let json = dir.path("r.json");
    let mut m = start(
        postcopy()
            .args([
                "demo",
                "--mem",
                "256M",
                "--postcopy",
                "auto",
                "--max-bandwidth",
                "16M",
                "--link-timeout",
                "3",
            ])
            .arg("--json")
            .arg(&json),
    );
    let root = m.pid();
    let mut dest = None;
    wait_for(
        "the destination's processes",
        Duration::from_secs(30),
        || {
            dest = pids_named(root, "postcopy")
                .into_iter()
                .find(|&p| p != root);
            dest.is_some() && !pids_named(root, "fault-handler").is_empty()
        },
    )?;
    let dest = dest.ok_or("no destination")?;
    std::thread::sleep(Duration::from_secs(2));
    check(m.running(), "the migration ended before the stall")?;
    // SAFETY: signals a process of this test's own demo.
    unsafe { libc::kill(dest as i32, libc::SIGSTOP) };
    let t = Instant::now();
    let out = m.finish(Duration::from_secs(60));
    // SAFETY: as above; let it die if it is still there.
    unsafe { libc::kill(dest as i32, libc::SIGCONT) };
    let out = out?;
    let r = report(&json)?;
    check(!out.status.success(), "the source should fail")?;
    check(
        text(&r, "error").contains("no word from the destination"),
        format!("error: {}", r["error"]),
    )?;
    check(
        t.elapsed() < Duration::from_secs(20),
        format!("took {:?} to notice", t.elapsed()),
    )?;
    check(
        text(&r, "source_guest") == "running",
        format!("source guest: {}", r["source_guest"]),
    )?;
    Ok(())
}

// ---------------------------------------------------------------- KVM

fn kvm_unusable_fails_clearly() -> TestResult {
    // Hide /dev/kvm in a private mount namespace: the command must fail
    // saying why, not pass or hang.
    let exe = bin_dir().join("postcopy");
    let script = format!(
        "mount --bind /dev/null /dev/kvm 2>/dev/null || mount -t tmpfs none /dev; exec {} demo --guest kvm --mem 64M --warmup-ms 0",
        exe.display()
    );
    let out = run(
        Command::new("unshare").args(["-m", "sh", "-c", &script]),
        Duration::from_secs(60),
    )?;
    check(
        !out.status.success(),
        format!("must fail without KVM\n{}", out.describe()),
    )?;
    let all = format!("{}{}", out.stdout, out.stderr);
    check(
        all.contains("KVM is not usable"),
        format!("no clear message\n{}", out.describe()),
    )?;
    Ok(())
}

fn serial_after_switchover(r: &Value) -> TestResult {
    check(
        num(r, "serial_bytes_destination")? > 0,
        "the destination guest wrote no marker after the switchover",
    )?;
    let path = r["serial_log_destination"]
        .as_str()
        .ok_or("no destination serial log")?;
    let len = std::fs::metadata(Path::new(path))
        .map(|m| m.len())
        .unwrap_or(0);
    check(len > 0, format!("{path} is empty"))?;
    Ok(())
}

fn kvm_precopy() -> TestResult {
    let r = demo(
        &["--guest", "kvm", "--mem", "256M", "--postcopy", "never"],
        240,
    )?;
    completed(&r)?;
    check(text(&r, "guest") == "kvm", "guest is not kvm")?;
    check(r["verify"]["method"] == "ab", "verify is not ab")?;
    check(
        r["switched_to_postcopy"] == false,
        "switched with --postcopy never",
    )?;
    serial_after_switchover(&r)
}

fn kvm_postcopy_two_vcpus() -> TestResult {
    let r = demo(
        &[
            "--guest",
            "kvm",
            "--mem",
            "256M",
            "--vcpus",
            "2",
            "--postcopy",
            "auto",
            "--max-bandwidth",
            "64M",
        ],
        240,
    )?;
    completed(&r)?;
    postcopied(&r)?;
    check(num(&r, "postcopy_requests")? > 0, "no page was requested")?;
    check(num(&r, "vcpus")? == 2, "not 2 vCPUs")?;
    serial_after_switchover(&r)
}

fn kvm_boot_sector_with_verify_range() -> TestResult {
    let sector = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/boot/ab-fixed.bin");
    let r = demo(
        &[
            "--guest",
            "kvm",
            "--mem",
            "600M",
            "--boot-sector",
            sector.to_str().ok_or("path")?,
            "--verify",
            "ab",
            "--verify-range",
            "0x100000-0x20100000",
            "--postcopy",
            "auto",
        ],
        300,
    )?;
    completed(&r)?;
    check(
        num(&r, "verify.pages_checked")? == 0x20000,
        "not every page of the range was checked",
    )?;
    check(
        text(&r, "workload") == "boot-sector",
        "workload is not boot-sector",
    )?;
    serial_after_switchover(&r)
}

// ---------------------------------------------------------------- operator interface

fn unwritable_report_path_is_refused_up_front() -> TestResult {
    let dir = TempDir::new("json");
    let a_dir = dir.path("jdir");
    std::fs::create_dir(&a_dir).map_err(|e| e.to_string())?;
    let missing = dir.path("no-such-dir").join("r.json");
    let read_only = dir.path("read-only.json");
    std::fs::write(&read_only, "{}").map_err(|e| e.to_string())?;
    let mut perms = std::fs::metadata(&read_only)
        .map_err(|e| e.to_string())?
        .permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&read_only, perms).map_err(|e| e.to_string())?;
    // Root opens /proc/version for writing; only the write fails.
    let paths: [(&Path, bool); 4] = [
        (&a_dir, false),
        (&missing, false),
        (Path::new("/proc/version"), false),
        // Root ignores file modes: the read-only file is tried as nobody.
        (&read_only, true),
    ];
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let commands: [&[&str]; 3] = [
        &["demo", "--mem", "64M"],
        &["migrate", "--to", &listen, "--mem", "64M"],
        &["incoming", "--listen", &listen, "--accept-timeout", "60"],
    ];
    for (path, unprivileged) in paths {
        for args in commands {
            let mut cmd = if unprivileged {
                let mut c = Command::new("setpriv");
                // The directory must be reachable for the file's own mode
                // to be what refuses.
                c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                    .arg(bin_dir().join("postcopy"));
                c
            } else {
                postcopy()
            };
            cmd.args(args).arg("--json").arg(path);
            let t = Instant::now();
            let out = run(&mut cmd, Duration::from_secs(60))?;
            let what = format!("{args:?} --json {}", path.display());
            check(
                out.status.code() == Some(2),
                format!("{what} should exit 2 at once\n{}", out.describe()),
            )?;
            check(
                out.stderr.contains(&format!("--json {}", path.display())),
                format!(
                    "{what}: the error does not name the path\n{}",
                    out.describe()
                ),
            )?;
            // Nothing started: no guest, no migration, no summary.
            check(
                !out.stdout.contains("migration") && t.elapsed() < Duration::from_secs(5),
                format!(
                    "{what}: ran for {:?} before refusing\n{}",
                    t.elapsed(),
                    out.describe()
                ),
            )?;
        }
    }
    check(a_dir.is_dir(), "the directory was replaced")?;
    check(
        std::fs::read_to_string(&read_only).map_err(|e| e.to_string())? == "{}",
        "the read-only file was changed",
    )?;
    Ok(())
}

/// 16 MiB/s, the cap the totals tests migrate at.
const CAP: f64 = 16.0 * 1024.0 * 1024.0;

/// `bytes` moved at `CAP` within a factor of 2 over `secs`.
fn at_cap(what: &str, bytes: u64, secs: f64) -> TestResult {
    let rate = bytes as f64 / secs;
    check(
        rate > CAP / 2.0 && rate < CAP * 2.0,
        format!(
            "{what}: {bytes} bytes in {secs:.2} s is {:.1} MiB/s, not about 16",
            rate / 1048576.0
        ),
    )
}

/// The totals every report must keep consistent, finished or not.
fn totals_add_up(r: &Value) -> TestResult {
    let bytes = num(r, "precopy_bytes")? + num(r, "downtime_bytes")? + num(r, "postcopy_bytes")?;
    let pages = num(r, "pages_sent")?;
    check(
        pages > 0 && pages * 4096 <= bytes,
        format!("{pages} pages sent but {bytes} bytes in all"),
    )?;
    let secs = r["total_time_ms"].as_f64().ok_or("no total_time_ms")? / 1e3;
    let mbps = r["throughput_mbps"].as_f64().ok_or("no throughput_mbps")?;
    let want = bytes as f64 * 8.0 / secs / 1e6;
    check(
        mbps > 0.0 && (mbps - want).abs() <= want * 0.01,
        format!("throughput_mbps {mbps}, but {bytes} bytes in {secs:.2} s is {want:.1}"),
    )
}

fn interrupted_precopy_counts_what_went_out() -> TestResult {
    // 256 MiB at 16 MiB/s: the first round takes 16 s, so SIGINT lands
    // in it, before any round finished.
    let dir = TempDir::new("sigint");
    let json = dir.path("r.json");
    let m = start(
        postcopy()
            .args([
                "demo",
                "--mem",
                "256M",
                "--workload",
                "ab",
                "--postcopy",
                "never",
                "--max-bandwidth",
                "16M",
            ])
            .arg("--json")
            .arg(&json),
    );
    let root = m.pid();
    wait_for("the ram-sender", Duration::from_secs(30), || {
        !pids_named(root, "ram-sender").is_empty()
    })?;
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: signals the demo this test started.
    unsafe { libc::kill(root as i32, libc::SIGINT) };
    let out = m.finish(Duration::from_secs(60))?;
    let r = report(&json)?;
    check(
        out.status.code() == Some(1) && text(&r, "status") == "cancelled",
        format!("status {}\n{}", r["status"], out.describe()),
    )?;
    check(
        r["rounds"].as_array().is_some_and(Vec::is_empty),
        "a round finished",
    )?;
    let secs = r["total_time_ms"].as_f64().ok_or("no total_time_ms")? / 1e3;
    at_cap("precopy", num(&r, "precopy_bytes")?, secs)?;
    check(
        num(&r, "downtime_bytes")? == 0 && num(&r, "postcopy_bytes")? == 0,
        "bytes counted after a stop that never came",
    )?;
    // The arming of dirty tracking is the first sync.
    check(
        num(&r, "dirty_sync_count")? == 1,
        format!("dirty_sync_count {}", r["dirty_sync_count"]),
    )?;
    totals_add_up(&r)
}

/// Starts a demo in manual mode, lets precopy run for `precopy`, asks for
/// postcopy and returns the running demo, its report path and when the
/// request was taken.
fn demo_switching_after(
    dir: &TempDir,
    args: &[&str],
    precopy: Duration,
) -> Result<(Running, PathBuf, Instant), String> {
    let json = dir.path("r.json");
    let sock = dir.path("cmd.sock");
    let mut m = start(
        postcopy()
            .arg("demo")
            .args(args)
            .args(["--postcopy", "manual"])
            .arg("--control")
            .arg(&sock)
            .arg("--json")
            .arg(&json),
    );
    let root = m.pid();
    wait_for("the ram-sender", Duration::from_secs(30), || {
        !pids_named(root, "ram-sender").is_empty()
    })?;
    std::thread::sleep(precopy);
    check(m.running(), "the migration ended before start-postcopy")?;
    let out = run(
        postcopy().arg("start-postcopy").arg("--control").arg(&sock),
        Duration::from_secs(10),
    )?;
    check(
        out.status.success(),
        format!("start-postcopy failed\n{}", out.describe()),
    )?;
    Ok((m, json, Instant::now()))
}

fn failed_postcopy_counts_what_went_out() -> TestResult {
    // An idle guest faults on nothing, so after the switch the paced push
    // carries the pages: 112 MiB left at 16 MiB/s takes 7 s. The
    // ram-sender is killed in the middle of it, with no restart allowed
    // (a restart would complete the migration).
    let dir = TempDir::new("pushfail");
    let args = [
        "--mem",
        "128M",
        "--workload",
        "idle",
        "--max-bandwidth",
        "16M",
        "--max-postcopy-bandwidth",
        "16M",
        "--max-restarts",
        "0",
    ];
    let (m, json, t_switch) = demo_switching_after(&dir, &args, Duration::from_secs(1))?;
    let root = m.pid();
    std::thread::sleep(Duration::from_millis(2500));
    let sender = pids_named(root, "ram-sender");
    check(sender.len() == 1, format!("ram-sender pids {sender:?}"))?;
    // SAFETY: kills a role of the demo this test started.
    unsafe { libc::kill(sender[0] as i32, libc::SIGKILL) };
    let pushed_for = t_switch.elapsed().as_secs_f64();
    let out = m.finish(Duration::from_secs(60))?;
    let r = report(&json)?;
    check(
        out.status.code() == Some(1) && text(&r, "status") == "failed",
        format!("status {}\n{}", r["status"], out.describe()),
    )?;
    check(
        text(&r, "error").contains("ram-sender"),
        format!("error: {}", r["error"]),
    )?;
    check(
        r["switched_to_postcopy"] == true,
        "the kill came before the switch",
    )?;
    check(num(&r, "precopy_bytes")? > 0, "precopy_bytes is 0")?;
    at_cap("postcopy push", num(&r, "postcopy_bytes")?, pushed_for)?;
    // Arming, then the final sync at the switch.
    check(
        num(&r, "dirty_sync_count")? == 2,
        format!("dirty_sync_count {}", r["dirty_sync_count"]),
    )?;
    totals_add_up(&r)
}

/// Bytes per second the postcopy push carried: pages that arrived on the
/// main stream after the switch over the postcopy phase.
fn push_rate(r: &Value) -> Result<f64, String> {
    let secs = r["postcopy_phase_ms"]
        .as_f64()
        .ok_or("no postcopy_phase_ms")?
        / 1e3;
    Ok(num(r, "pages_background")? as f64 * 4096.0 / secs)
}

fn postcopy_bandwidth_is_capped_apart() -> TestResult {
    // The same switch twice, precopy capped at 16 MiB/s both times: an idle
    // guest leaves the ~48 MiB not sent by then to the push.
    let base = [
        "--mem",
        "64M",
        "--workload",
        "idle",
        "--max-bandwidth",
        "16M",
    ];
    let finish = |m: Running, json: &Path| -> Result<Value, String> {
        let out = m.finish(Duration::from_secs(120))?;
        let r = report(json)?;
        check(
            out.status.success(),
            format!("demo failed\n{}\n{r:#}", out.describe()),
        )?;
        completed(&r)?;
        postcopied(&r)?;
        check(
            num(&r, "pages_background")? > 4096,
            format!("the push carried only {} pages", r["pages_background"]),
        )?;
        Ok(r)
    };

    // --max-bandwidth caps precopy only: the push runs unpaced.
    let dir = TempDir::new("unpaced");
    let (m, json, _) = demo_switching_after(&dir, &base, Duration::from_secs(1))?;
    let r = finish(m, &json)?;
    check(
        num(&r, "max_bandwidth")? == 16 << 20 && num(&r, "max_postcopy_bandwidth")? == 0,
        format!(
            "caps in the report: {} / {}",
            r["max_bandwidth"], r["max_postcopy_bandwidth"]
        ),
    )?;
    let rate = push_rate(&r)?;
    check(
        rate > 2.0 * CAP,
        format!(
            "unpaced push ran at {:.1} MiB/s, not faster than the precopy cap",
            rate / 1048576.0
        ),
    )?;

    // --max-postcopy-bandwidth caps it.
    let dir = TempDir::new("paced");
    let mut args = base.to_vec();
    args.extend(["--max-postcopy-bandwidth", "16M"]);
    let (m, json, _) = demo_switching_after(&dir, &args, Duration::from_secs(1))?;
    let r = finish(m, &json)?;
    check(
        num(&r, "max_postcopy_bandwidth")? == 16 << 20,
        format!("max_postcopy_bandwidth {}", r["max_postcopy_bandwidth"]),
    )?;
    let rate = push_rate(&r)?;
    check(
        rate < 1.3 * CAP,
        format!(
            "push capped at 16 MiB/s ran at {:.1} MiB/s",
            rate / 1048576.0
        ),
    )?;
    Ok(())
}

// ---------------------------------------------------------------- role sandbox

/// Makes `role` call `socket(AF_INET, ...)` right after its seccomp filter
/// went on (the test trigger of docs/security.md), with `incoming` and
/// `migrate` run separately so each side's report lists its own roles: the
/// role must die of SIGSYS (31), its supervisor must say it was killed by
/// its sandbox with the syscall number (41), and the other side must fail
/// too, naming it.
fn forbidden_call_kills(role: &str) -> TestResult {
    const SOCKET: u32 = 41;
    const SIGSYS: u32 = 31;
    let dir = TempDir::new("forbidden");
    let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let dest = start(
        postcopy()
            .env("POSTCOPY_TEST_FORBIDDEN_SYSCALL", role)
            .args(["incoming", "--listen", &addr, "--accept-timeout", "60"])
            .arg("--json")
            .arg(&dj),
    );
    std::thread::sleep(Duration::from_millis(300));
    let src = run(
        postcopy()
            .env("POSTCOPY_TEST_FORBIDDEN_SYSCALL", role)
            .args([
                "migrate",
                "--to",
                &addr,
                "--mem",
                "64M",
                "--postcopy",
                "auto",
            ])
            .arg("--json")
            .arg(&sj),
        Duration::from_secs(90),
    )?;
    let dst = dest.finish(Duration::from_secs(30))?;
    let (s, d) = (report(&sj)?, report(&dj)?);
    let both = format!(
        "source:\n{}\nsource report: {s:#}\ndestination:\n{}\ndestination report: {d:#}",
        src.describe(),
        dst.describe()
    );
    check(
        !src.status.success() && !dst.status.success(),
        format!("a side exited 0\n{both}"),
    )?;
    let (own, other) = if role == "fault-handler" {
        (&d, &s)
    } else {
        (&s, &d)
    };
    let said = format!("role {role} was killed by its sandbox (syscall {SOCKET})");
    check(
        text(own, "status") == "failed" && text(own, "error").contains(&said),
        format!("{role}'s side does not say {said:?}\n{both}"),
    )?;
    check(
        text(other, "status") == "failed" && text(other, "error").contains(&said),
        format!("the other side does not say {said:?}\n{both}"),
    )?;
    let entry = own["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["name"] == role)
        .ok_or(format!("{role} missing from its side's report\n{both}"))?;
    check(
        entry["exit"] == format!("signal {SIGSYS}").as_str(),
        format!(
            "{role} exit: {}, expected signal {SIGSYS}\n{both}",
            entry["exit"]
        ),
    )?;
    // The other roles of its side were not killed by a sandbox.
    for r in own["roles"].as_array().into_iter().flatten() {
        check(
            r["name"] == role || r["exit"] != format!("signal {SIGSYS}").as_str(),
            format!("{} died of SIGSYS too\n{both}", r["name"]),
        )?;
    }
    check(
        src.stderr.contains("sandbox: forbidden syscall 41")
            || dst.stderr.contains("sandbox: forbidden syscall 41"),
        format!("no line from the role's SIGSYS handler\n{both}"),
    )?;
    Ok(())
}

fn sandbox_kills_ram_sender() -> TestResult {
    forbidden_call_kills("ram-sender")
}

fn sandbox_kills_page_server() -> TestResult {
    forbidden_call_kills("page-server")
}

fn sandbox_kills_fault_handler() -> TestResult {
    forbidden_call_kills("fault-handler")
}

/// The `Name:` line of /proc/PID/status, split into fields.
fn status_fields(pid: u32, name: &str) -> Option<Vec<String>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))?;
    Some(line.split_whitespace().skip(1).map(String::from).collect())
}

/// Inodes of the sockets listed in /proc/PID/net/FILE (unix, tcp, tcp6):
/// those of PID's network namespace.
fn socket_inodes(pid: u32, file: &str) -> Vec<String> {
    let col = if file == "unix" { 6 } else { 9 };
    std::fs::read_to_string(format!("/proc/{pid}/net/{file}"))
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(col).map(String::from))
        .collect()
}

/// What one sandboxed role's fd table must look like: fd 0 /dev/null, 1
/// and 2 pipes the supervisor reads, 3 the fd socket (Unix), 4 the note
/// pipe; besides fd 3, exactly two Unix sockets (ipc-channel: the command
/// receiver and the report sender), at most `tcp` TCP sockets (its data
/// connections; one it is done with may be closed), and otherwise only the
/// kinds of fd it is handed. A role that is ending may have closed some:
/// Ok(true) when every one of these was there (a full view), Ok(false)
/// when some were gone. With
/// `memory_read_only`, guest memory is open read-only (a source role can
/// then never map it writable). The sockets were made in the namespace of
/// `net_pid` (the supervisor), not in the role's own empty one.
fn check_role_fds(
    name: &str,
    pid: u32,
    net_pid: u32,
    tcp: usize,
    kinds: &[&str],
    memory_read_only: bool,
) -> Result<bool, String> {
    let unix = socket_inodes(net_pid, "unix");
    let inet: Vec<String> = socket_inodes(net_pid, "tcp")
        .into_iter()
        .chain(socket_inodes(net_pid, "tcp6"))
        .collect();
    let mut fds: Vec<(u32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().parse().ok()?;
            Some((n, std::fs::read_link(e.path()).ok()?.display().to_string()))
        })
        .collect();
    fds.sort();
    if fds.is_empty() {
        return Ok(false);
    }
    let all = format!("{name} (pid {pid}) fds: {fds:?}");
    let inode = |t: &str| {
        t.strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .map(String::from)
    };
    let at = |n: u32| fds.iter().find(|(f, _)| *f == n).map(|(_, t)| t.as_str());
    // A role that is ending closes fds as it goes: an fd may be missing,
    // never different.
    check(
        at(0).is_none_or(|t| t == "/dev/null"),
        format!("fd 0: {all}"),
    )?;
    for n in [1, 2] {
        check(
            at(n).is_none_or(|t| t.starts_with("pipe:")),
            format!("fd {n} is not a pipe to the supervisor: {all}"),
        )?;
    }
    check(
        at(3).is_none_or(|t| inode(t).is_some_and(|i| unix.contains(&i))),
        format!("fd 3 is not the fd socket: {all}"),
    )?;
    check(
        at(4).is_none_or(|t| t.starts_with("pipe:")),
        format!("fd 4 is not the note pipe: {all}"),
    )?;
    let (mut n_unix, mut n_tcp) = (0, 0);
    for (n, t) in fds.iter().filter(|(n, _)| *n > 4) {
        if let Some(i) = inode(t) {
            // A TCP socket whose connection is over may have left the
            // kernel's table: whatever is not Unix counts as a connection.
            if unix.contains(&i) {
                n_unix += 1;
            } else {
                check(
                    inet.contains(&i) || n_tcp < tcp,
                    format!("fd {n} is a socket neither Unix nor TCP: {all}"),
                )?;
                n_tcp += 1;
            }
            continue;
        }
        if memory_read_only && t.starts_with("/memfd:postcopy-guest-memory") {
            let info =
                std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{n}")).unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok());
            check(
                flags.is_some_and(|f| f & 3 == 0),
                format!("fd {n} ({t}) is not read-only (flags {flags:?}): {all}"),
            )?;
        }
        let kind = if t.starts_with("/memfd:") {
            "memfd"
        } else if t == "anon_inode:[userfaultfd]" {
            "userfaultfd"
        } else if t.starts_with("/proc/") && t.ends_with("/pagemap") {
            "pagemap"
        } else {
            t.as_str()
        };
        check(
            kinds.contains(&kind),
            format!("fd {n} ({t}) was not handed to it: {all}"),
        )?;
    }
    check(
        n_unix <= 2,
        format!("{n_unix} ipc-channel sockets, expected 2: {all}"),
    )?;
    // A connection the role is done with (the main stream after its end)
    // may be closed already.
    check(
        n_tcp <= tcp,
        format!("{n_tcp} TCP sockets, expected at most {tcp}: {all}"),
    )?;
    Ok(at(0).is_some()
        && at(1).is_some()
        && at(2).is_some()
        && at(3).is_some()
        && at(4).is_some()
        && n_unix == 2
        && n_tcp > 0)
}

/// A namespace of PID, as /proc/PID/ns/KIND names it (`net:[4026531840]`).
fn namespace(pid: u32, kind: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|p| p.display().to_string())
}

/// During a real migration over TLS (precopy, then postcopy) every role
/// runs with a seccomp filter, no_new_privs, a non-zero uid and gid, its
/// own network and mount namespaces (not the supervisor's) and an empty
/// root, and holds only the fds it was handed plus ipc-channel's two
/// sockets.
fn roles_are_sandboxed() -> TestResult {
    let dir = TempDir::new("sandboxed");
    let json = dir.path("r.json");
    let mut m = start(
        postcopy()
            .args([
                "demo",
                "--tls",
                "--mem",
                "128M",
                "--postcopy",
                "auto",
                "--max-bandwidth",
                "24M",
            ])
            .arg("--json")
            .arg(&json),
    );
    let root = m.pid();
    let (host_net, host_mnt) = (namespace(root, "net"), namespace(root, "mnt"));
    check(
        host_net.is_some() && host_mnt.is_some(),
        "cannot read the supervisor's namespaces",
    )?;
    // name, TCP connections, kinds of other handed fds, memory read-only
    let roles: [(&str, usize, &[&str], bool); 3] = [
        ("ram-sender", 1, &["memfd", "userfaultfd", "pagemap"], true),
        ("page-server", 2, &["memfd"], true),
        ("fault-handler", 3, &["memfd", "userfaultfd"], false),
    ];
    let mut checked: Vec<&str> = Vec::new();
    let t = Instant::now();
    while m.running() && t.elapsed() < Duration::from_secs(120) {
        for (name, tcp, kinds, ro) in roles {
            for pid in pids_named(root, name) {
                // Between its start and its sandbox a role is still setting
                // up: judge it once the filter is on.
                let Some(seccomp) = status_fields(pid, "Seccomp") else {
                    continue;
                };
                if seccomp != ["2"] {
                    continue;
                }
                let field = |f: &str| status_fields(pid, f).unwrap_or_default();
                check(
                    field("NoNewPrivs") == ["1"],
                    format!("{name} (pid {pid}) NoNewPrivs {:?}", field("NoNewPrivs")),
                )?;
                for ids in ["Uid", "Gid"] {
                    let v = field(ids);
                    check(
                        v.len() == 4 && v.iter().all(|x| x != "0"),
                        format!("{name} (pid {pid}) {ids}: {v:?}, expected no 0"),
                    )?;
                }
                check(
                    field("Groups").iter().all(|g| g != "0"),
                    format!("{name} (pid {pid}) still in group 0"),
                )?;
                for (kind, host) in [("net", &host_net), ("mnt", &host_mnt)] {
                    let ns = namespace(pid, kind);
                    check(
                        ns.is_none() || ns != *host,
                        format!(
                            "{name} (pid {pid}) shares the supervisor's {kind} namespace {ns:?}"
                        ),
                    )?;
                }
                let top = std::fs::read_link(format!("/proc/{pid}/root")).ok();
                check(
                    top.as_deref().is_none_or(|r| r != Path::new("/")),
                    format!("{name} (pid {pid}) still has the host's / as its root"),
                )?;
                check_role_nice(name, pid)?;
                match check_role_fds(name, pid, root, tcp, kinds, ro) {
                    Ok(true) => {}
                    // Ending, or gone: judged, but not a full view.
                    Ok(false) => continue,
                    // Gone in between: its fd table vanished under us.
                    Err(_) if status_fields(pid, "Seccomp").is_none() => continue,
                    Err(e) => return Err(e),
                }
                if !checked.contains(&name) {
                    checked.push(name);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = m.finish(Duration::from_secs(30))?;
    let r = report(&json)?;
    check(
        out.status.success(),
        format!("demo failed\n{}", out.describe()),
    )?;
    completed(&r)?;
    postcopied(&r)?;
    check(
        text(&r, "transport") == "tls1.3",
        format!("transport {:?}", r["transport"]),
    )?;
    for (name, _, _, _) in roles {
        check(
            checked.contains(&name),
            format!("never saw {name} running with its sandbox on and all its fds"),
        )?;
    }
    Ok(())
}

/// The fault path outranks bulk work for the CPU (common::priority): every
/// page-server thread and the fault-handler's urgent reader at nice -10,
/// the ram-sender and the fault-handler's main-stream reader (its main
/// thread) at 0. Threads that vanish while we look are skipped.
fn check_role_nice(name: &str, pid: u32) -> TestResult {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Ok(());
    };
    let tasks: Vec<_> = tasks.flatten().collect();
    // The fault-handler's main thread drops to 0 right after starting the
    // urgent reader; once the fault thread exists that is long done.
    let settled = tasks.iter().any(|t| {
        std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "faults")
    });
    for task in tasks {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces: fields after it.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        // After ")": state is field 3, nice is field 19.
        let nice: i32 = rest
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{name} (pid {pid}) stat without a nice field: {stat}"))?;
        let tid = task.file_name().to_string_lossy().into_owned();
        let want = match (name, comm) {
            ("page-server", _) | ("fault-handler", "urgent" | "faults") => Some(-10),
            ("ram-sender", _) | ("fault-handler", "bulk1" | "bulk2" | "bulk3") => Some(0),
            ("fault-handler", _) if settled && tid == pid.to_string() => Some(0),
            _ => None,
        };
        if let Some(want) = want {
            check(
                nice == want,
                format!("{name} (pid {pid}) thread {comm:?} ({tid}) runs at nice {nice}, expected {want}"),
            )?;
        }
    }
    Ok(())
}

/// A role user that does not exist is a command-line error (exit 2) that
/// names it, before anything starts.
fn unknown_role_user_is_refused() -> TestResult {
    for cmd in ["demo", "incoming"] {
        let mut c = postcopy();
        c.arg(cmd)
            .args(["--role-user", "no-such-user-for-postcopy"]);
        if cmd == "incoming" {
            c.args(["--listen", "127.0.0.1:1"]);
        }
        let out = run(&mut c, Duration::from_secs(20))?;
        check(
            out.status.code() == Some(2)
                && out
                    .stderr
                    .contains("--role-user no-such-user-for-postcopy: no such user"),
            format!("{cmd} with an unknown --role-user\n{}", out.describe()),
        )?;
    }
    Ok(())
}
