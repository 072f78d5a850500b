//! Nothing lost (issue 7): the faults found in the state handling, a cancel
//! while the guest stops, a destination with a dead return path, every data
//! role killed in every phase (process and KVM guests), a lost link in
//! postcopy (recovered by itself, and by `postcopy recover`), and a
//! randomized run of kills. Every migration must complete with its memory
//! check at 0 mismatches, or end with the source guest running.

use libtest_mimic::Arguments;
use serde_json::Value;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::control::{recv_control, ControlMsg, SetupAccepted};
use common::types::{MemLayout, PAGE_SIZE};
use common::wire::{send_control, ConnKind, Frame, FrameReader, HelloStatus, HELLO_LEN};

/// Connection kinds as the hello's byte 6 names them (docs/protocol.md).
const MAIN: u8 = 2;
const RETURN_PATH: u8 = 3;
use tests::{
    check, free_port, kvm_skip_reason, num, postcopy, report, run, start, text, TempDir, TwoHosts,
};

type TestResult = Result<(), String>;

fn main() {
    let mut args = Arguments::from_args();
    // Every migration keeps both CPUs busy: one at a time.
    args.test_threads.get_or_insert(1);
    let skip = kvm_skip_reason();
    let plain = tests::plain_trial;
    let kvm = |name: &'static str, f: fn() -> TestResult| tests::kvm_trial(name, f, skip.clone());
    let trials = vec![
        plain(
            "completed_migration_is_kept_pinned_40_times",
            completed_migration_is_kept_pinned_40_times,
        ),
        plain(
            "cancel_while_the_guest_stops_resumes_it",
            cancel_while_the_guest_stops_resumes_it,
        ),
        plain(
            "cancel_right_after_start_postcopy_resumes_the_guest",
            cancel_right_after_start_postcopy_resumes_the_guest,
        ),
        plain(
            "cancel_in_precopy_keeps_the_guest",
            cancel_in_precopy_keeps_the_guest,
        ),
        plain(
            "kept_guest_stays_through_unreachable_retries",
            kept_guest_stays_through_unreachable_retries,
        ),
        plain(
            "kept_source_says_so_only_once_settled",
            kept_source_says_so_only_once_settled,
        ),
        plain(
            "destination_paused_before_its_guest_ran_keeps_the_migration",
            destination_paused_before_its_guest_ran_keeps_the_migration,
        ),
        plain(
            "link_resets_in_postcopy_do_not_use_up_the_restarts",
            link_resets_in_postcopy_do_not_use_up_the_restarts,
        ),
        plain(
            "link_resets_in_precopy_use_up_the_restarts",
            link_resets_in_precopy_use_up_the_restarts,
        ),
        plain(
            "link_lost_with_the_package_in_flight_resumes_precopy",
            link_lost_with_the_package_in_flight_resumes_precopy,
        ),
        plain(
            "fault_handler_dying_at_completion_still_completes",
            fault_handler_dying_at_completion_still_completes,
        ),
        plain(
            "source_killed_in_precopy_ends_the_destination_at_once",
            source_killed_in_precopy_ends_the_destination_at_once,
        ),
        plain(
            "destination_paused_in_precopy_gives_up_in_time",
            destination_paused_in_precopy_gives_up_in_time,
        ),
        plain(
            "dead_return_path_prevents_the_switch",
            dead_return_path_prevents_the_switch,
        ),
        plain(
            "kill_each_role_in_each_phase_process",
            kill_each_role_in_each_phase_process,
        ),
        kvm(
            "kill_each_role_in_each_phase_kvm",
            kill_each_role_in_each_phase_kvm,
        ),
        plain(
            "kill_sender_and_handler_with_three_streams",
            kill_sender_and_handler_with_three_streams,
        ),
        plain(
            "link_down_5s_in_postcopy_recovers",
            link_down_5s_in_postcopy_recovers,
        ),
        plain(
            "link_down_in_postcopy_with_three_streams_recovers",
            link_down_in_postcopy_with_three_streams_recovers,
        ),
        plain(
            "link_down_30s_recovered_by_command",
            link_down_30s_recovered_by_command,
        ),
        plain(
            "cut_again_during_recovery_pauses_again",
            cut_again_during_recovery_pauses_again,
        ),
        plain("fifty_random_kills", fifty_random_kills),
    ];
    libtest_mimic::run(&args, trials).exit();
}

// ---------------------------------------------------------------- helpers

/// Runs `postcopy demo ARGS --json FILE`; returns its report and whether
/// it exited 0.
fn demo(args: &[&str], limit_s: u64) -> Result<(Value, bool, String), String> {
    demo_with(postcopy().arg("demo"), args, limit_s)
}

fn demo_with(
    cmd: &mut Command,
    args: &[&str],
    limit_s: u64,
) -> Result<(Value, bool, String), String> {
    let dir = TempDir::new("faults");
    let json = dir.path("r.json");
    let out = run(
        cmd.args(args).arg("--json").arg(&json),
        Duration::from_secs(limit_s),
    )?;
    let r = report(&json).map_err(|e| format!("{e}\n{}", out.describe()))?;
    Ok((r, out.status.success(), out.describe()))
}

/// `postcopy incoming` on a free loopback port with `extra` options and
/// its report at `json`, given 300 ms to listen; returns it and its
/// address.
fn listening(extra: &[&str], json: &std::path::Path) -> (tests::Running, String) {
    let to = format!("127.0.0.1:{}", free_port());
    let dest = start(
        postcopy()
            .args(["incoming", "--listen", &to])
            .args(extra)
            .arg("--json")
            .arg(json),
    );
    std::thread::sleep(Duration::from_millis(300));
    (dest, to)
}

/// A completed migration whose memory check found nothing wrong.
fn completed_ok(r: &Value, ok: bool, out: &str) -> TestResult {
    check(
        ok && text(r, "status") == "completed",
        format!("not completed: {}\n{out}", r["error"]),
    )?;
    check(
        r["verify"]["mismatches"].as_u64() == Some(0) && num(r, "verify.pages_checked")? > 0,
        format!("verify: {}", r["verify"]),
    )
}

/// Restarts of `role` in the report (both hosts are listed by the demo).
fn restarts(r: &Value, role: &str) -> u64 {
    r["roles"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|x| x["name"] == role)
        .filter_map(|x| x["restarts"].as_u64())
        .sum()
}

fn events(r: &Value, kind: &str) -> Vec<String> {
    r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["kind"] == kind)
        .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Direct children of `pid` called `comm`.
fn children(pid: u32, comm: &str) -> Vec<u32> {
    let list =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    list.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p: &u32| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == comm)
                .unwrap_or(false)
        })
        .collect()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: a signal to a process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

// ---------------------------------------------------------------- fault 1

/// Fault 1: the destination's DestRunning and DestCompleted both arrive
/// while the source still waits for its ram-sender's PackageSent; judged
/// by the protocol, that order is legal and the migration completes. A
/// tiny idle guest on one CPU makes that order common.
fn completed_migration_is_kept_pinned_40_times() -> TestResult {
    for i in 0..40 {
        let (r, ok, out) = demo_with(
            Command::new("taskset")
                .args(["-c", "1"])
                .arg(tests::bin_dir().join("postcopy"))
                .arg("demo"),
            &[
                "--guest",
                "process",
                "--mem",
                "12K",
                "--workload",
                "idle",
                "--warmup-ms",
                "0",
            ],
            60,
        )?;
        completed_ok(&r, ok, &out).map_err(|e| format!("run {i}: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------- fault 2

/// A source started with `migrate --keep-guest` (an `ab` process guest,
/// `--verify ab`, manual postcopy, precopy capped so it lasts) towards an
/// `incoming` of its own on loopback, once precopy runs.
struct Kept {
    dir: TempDir,
    dest: tests::Running,
    src: tests::Running,
    ctl: std::path::PathBuf,
    guest: u32,
}

fn kept_migration(tag: &str) -> Result<Kept, String> {
    let dir = TempDir::new(tag);
    let port = free_port();
    let dest = start(
        postcopy()
            .args(["incoming", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--json")
            .arg(dir.path("dest1.json")),
    );
    let ctl = dir.path("ctl.sock");
    let src = start(
        postcopy()
            .args(["migrate", "--to", &format!("127.0.0.1:{port}")])
            .args(["--mem", "64M", "--workload", "ab", "--postcopy", "manual"])
            .args(["--verify", "ab", "--max-bandwidth", "32M", "--keep-guest"])
            .arg("--control")
            .arg(&ctl)
            .arg("--json")
            .arg(dir.path("src.json")),
    );
    let t = Instant::now();
    let guest = loop {
        if let Some(&g) = children(src.pid(), "postcopy-guest").first() {
            break g;
        }
        if t.elapsed() > Duration::from_secs(20) {
            return Err("the source guest never started".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // Warm-up (500 ms) and setup: precopy runs after this.
    std::thread::sleep(Duration::from_millis(1500));
    Ok(Kept {
        dir,
        dest,
        src,
        ctl,
        guest,
    })
}

/// `postcopy ARGS --control CTL`.
fn ctl_cmd(ctl: &std::path::Path, args: &[&str]) -> Result<tests::Outcome, String> {
    run(
        postcopy().args(args).arg("--control").arg(ctl),
        Duration::from_secs(30),
    )
}

/// Waits until the kept source's control socket says its attempt ended
/// and a retry applies; returns its `query` answer (the report's fields).
fn await_kept(k: &mut Kept) -> Result<Value, String> {
    await_retry_offered(&mut k.src, &k.ctl)
}

/// [`await_kept`] for source `src` with control socket `ctl`.
fn await_retry_offered(src: &mut tests::Running, ctl: &std::path::Path) -> Result<Value, String> {
    let t = Instant::now();
    loop {
        if !src.running() {
            return Err("the source ended instead of keeping its guest".into());
        }
        let o = ctl_cmd(ctl, &["status", "--json"])?;
        if let Ok(v) = serde_json::from_str::<Value>(&o.stdout) {
            if v["allowed"]["retry"] == Value::Bool(true) {
                return Ok(v);
            }
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("no retry offered after 60 s\n{}", o.describe()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// After a cancel: the kept source guest runs and its memory follows the
/// `ab` rule; then a second migration of that same guest, to a new
/// destination, completes with its memory check at 0 mismatches.
fn kept_then_migrated_again(mut k: Kept) -> TestResult {
    let first = await_kept(&mut k)?;
    guest_kept_only(&first, "(the kept source's query)")?;
    let d1 = k
        .dest
        .finish(Duration::from_secs(30))
        .map_err(|e| format!("the first destination: {e}"))?;
    check(
        !d1.status.success(),
        format!(
            "the first destination exited 0 after a cancel\n{}",
            d1.describe()
        ),
    )?;
    let port = free_port();
    let dest2 = start(
        postcopy()
            .args(["incoming", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--json")
            .arg(k.dir.path("dest2.json")),
    );
    // Precopy at full speed converges in manual mode.
    let o = ctl_cmd(&k.ctl, &["set", "max-bandwidth", "0"])?;
    check(
        o.status.success(),
        format!("set while kept: {}", o.describe()),
    )?;
    let o = ctl_cmd(&k.ctl, &["retry", "--to", &format!("127.0.0.1:{port}")])?;
    check(o.status.success(), format!("retry: {}", o.describe()))?;
    let out = k.src.finish(Duration::from_secs(120))?;
    let r = report(&k.dir.path("src.json"))?;
    completed_ok(&r, out.status.success(), &out.describe())
        .map_err(|e| format!("the second migration of the kept guest: {e}"))?;
    // The report is the last attempt's, its timeline too: every sample is
    // from after its `retry` event (it used to hold the first attempt's
    // samples as well, bytes falling back to 0 in the middle).
    let retry_at = r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["kind"] == "retry")
        .and_then(|e| e["t_ms"].as_f64())
        .ok_or_else(|| format!("no retry event: {}", r["events"]))?;
    let samples = r["timeline"].as_array().cloned().unwrap_or_default();
    check(
        !samples.is_empty()
            && samples
                .iter()
                .all(|s| s["t_ms"].as_f64().is_some_and(|t| t >= retry_at)),
        format!(
            "timeline of the retried attempt (retry at {retry_at} ms): first sample {}, {} samples",
            samples.first().cloned().unwrap_or_default(),
            samples.len()
        ),
    )?;
    check(
        r["attempts"][0]["status"] == "cancelled"
            && r["attempts"][0]["migration_id"] != r["migration_id"],
        format!("attempts: {}", r["attempts"]),
    )?;
    // The very same guest process went on.
    check(
        !std::path::Path::new(&format!("/proc/{}", k.guest)).exists(),
        "the guest should be released after the completed migration",
    )?;
    let d2 = dest2.finish(Duration::from_secs(30))?;
    check(
        d2.status.success(),
        format!("the second destination\n{}", d2.describe()),
    )
}

fn guest_kept_only(r: &Value, out: &str) -> TestResult {
    check(
        text(r, "status") == "cancelled",
        format!("status {} ({})\n{out}", r["status"], r["error"]),
    )?;
    check(
        text(r, "source_guest").starts_with("running"),
        format!("source_guest {}\n{out}", r["source_guest"]),
    )?;
    check(
        r["source_verify"]["mismatches"].as_u64() == Some(0),
        format!("source memory: {}", r["source_verify"]),
    )
}

/// Fault 2: the guest is stopped (SIGSTOP) so it cannot answer `Stop`;
/// start-postcopy, then SIGINT 0.5 s later: the cancel must resume the
/// guest, whose `Stop` was already on its way. Then it migrates again.
fn cancel_while_the_guest_stops_resumes_it() -> TestResult {
    let k = kept_migration("cancel-stop")?;
    signal(k.guest, libc::SIGSTOP);
    signal(k.src.pid(), libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(500));
    signal(k.src.pid(), libc::SIGINT);
    std::thread::sleep(Duration::from_millis(200));
    signal(k.guest, libc::SIGCONT);
    kept_then_migrated_again(k)
}

/// The same without SIGSTOP: a cancel 6 ms after start-postcopy, both on
/// the control socket.
fn cancel_right_after_start_postcopy_resumes_the_guest() -> TestResult {
    let k = kept_migration("cancel-6ms")?;
    let c = k.ctl.clone();
    let switch = std::thread::spawn(move || ctl_cmd(&c, &["start-postcopy"]));
    std::thread::sleep(Duration::from_millis(6));
    let o = ctl_cmd(&k.ctl, &["cancel"])?;
    let _ = switch.join();
    if !o.status.success() {
        // The switch beat the cancel, which must then say why it cannot
        // apply, and the migration completes.
        check(
            o.stderr.contains("only live copy") || o.stderr.contains("the migration is over"),
            format!("a refused cancel must say why\n{}", o.describe()),
        )?;
        let out = k.src.finish(Duration::from_secs(120))?;
        let r = report(&k.dir.path("src.json"))?;
        return completed_ok(&r, out.status.success(), &out.describe());
    }
    kept_then_migrated_again(k)
}

/// A cancel in precopy (SIGINT): the source guest runs on, memory intact,
/// and migrates again.
fn cancel_in_precopy_keeps_the_guest() -> TestResult {
    let k = kept_migration("cancel-pre")?;
    signal(k.src.pid(), libc::SIGINT);
    kept_then_migrated_again(k)
}

/// `migrate --keep-guest` to a port nobody listens on: the attempt fails
/// in setup and the guest is kept; a retry to another such port fails the
/// same way and the guest is still kept, running, retryable, with the
/// first attempt listed and `elapsed_ms` moving while it waits. When the
/// kept guest dies, the supervisor ends and its report says the guest is
/// gone (it used to say "ended by quit").
fn kept_guest_stays_through_unreachable_retries() -> TestResult {
    let dir = TempDir::new("kept-unreachable");
    let ctl = dir.path("ctl.sock");
    let mut src = start(
        postcopy()
            .args(["migrate", "--to", &format!("127.0.0.1:{}", free_port())])
            .args(["--mem", "16M", "--workload", "ab", "--verify", "ab"])
            .arg("--keep-guest")
            .arg("--control")
            .arg(&ctl)
            .arg("--json")
            .arg(dir.path("src.json")),
    );
    let first = await_retry_offered(&mut src, &ctl)?;
    check(
        text(&first, "status") == "failed"
            && text(&first, "error").contains("cannot connect")
            && text(&first, "source_guest").starts_with("running"),
        format!(
            "first attempt: {} {} {}",
            first["status"], first["error"], first["source_guest"]
        ),
    )?;
    let guest = children(src.pid(), "postcopy-guest");
    check(guest.len() == 1, format!("guest processes {guest:?}"))?;
    let o = ctl_cmd(
        &ctl,
        &["retry", "--to", &format!("127.0.0.1:{}", free_port())],
    )?;
    check(o.status.success(), format!("retry: {}", o.describe()))?;
    // Until the retry's attempt is over, retry is not offered.
    let t = Instant::now();
    let second = loop {
        let v = await_retry_offered(&mut src, &ctl)?;
        if v["migration_id"] != first["migration_id"] {
            break v;
        }
        check(
            t.elapsed() < Duration::from_secs(60),
            "the retry never started",
        )?;
        std::thread::sleep(Duration::from_millis(100));
    };
    check(
        text(&second, "status") == "failed"
            && text(&second, "source_guest").starts_with("running")
            && second["attempts"].as_array().map(Vec::len) == Some(1)
            && second["attempts"][0]["migration_id"] == first["migration_id"],
        format!(
            "second attempt: {} {} attempts {}",
            second["status"], second["source_guest"], second["attempts"]
        ),
    )?;
    check(
        children(src.pid(), "postcopy-guest") == guest,
        "the kept guest is not the same process",
    )?;
    let elapsed = |v: &Value| v["elapsed_ms"].as_f64().unwrap_or(0.0);
    std::thread::sleep(Duration::from_millis(300));
    let later = await_retry_offered(&mut src, &ctl)?;
    check(
        elapsed(&later) > elapsed(&second),
        format!(
            "elapsed_ms stands still while kept: {} then {}",
            elapsed(&second),
            elapsed(&later)
        ),
    )?;
    signal(guest[0], libc::SIGKILL);
    let out = src.finish(Duration::from_secs(30))?;
    let r = report(&dir.path("src.json")).map_err(|e| format!("{e}\n{}", out.describe()))?;
    check(
        !out.status.success() && text(&r, "source_guest").starts_with("gone"),
        format!(
            "after the kept guest died: source_guest {}\n{}",
            r["source_guest"],
            out.describe()
        ),
    )
}

/// While a `--keep-guest` source settles its guest after a cancel, its
/// `query` never says the migration is over (an orchestrator or `postcopy
/// watch` would give up on a guest that is about to be kept), and `watch`
/// follows the kept source until `quit` ends it.
fn kept_source_says_so_only_once_settled() -> TestResult {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let k = kept_migration("kept-settle")?;
    let watch = start(postcopy().arg("watch").arg("--control").arg(&k.ctl));
    let conn = UnixStream::connect(&k.ctl).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut lines = BufReader::new(&conn);
    let mut ask = |req: &str| -> Result<Value, String> {
        (&conn)
            .write_all(format!("{req}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut l = String::new();
        lines.read_line(&mut l).map_err(|e| e.to_string())?;
        serde_json::from_str(&l).map_err(|e| format!("{e}: {l:?}"))
    };
    let c = k.ctl.clone();
    let cancel = std::thread::spawn(move || ctl_cmd(&c, &["cancel"]));
    let t = Instant::now();
    let mut seen = Vec::new();
    loop {
        let v = ask(r#"{"cmd":"query"}"#)?["result"].clone();
        let retry = v["allowed"]["retry"].clone();
        if retry == true {
            break;
        }
        let status = text(&v, "status").to_string();
        if matches!(status.as_str(), "cancelled" | "failed") {
            seen.push(retry.to_string());
            check(
                retry != "the migration is over",
                format!("{status}, but retry: {retry}"),
            )?;
        }
        check(
            t.elapsed() < Duration::from_secs(60),
            format!("no retry offered after the cancel (seen {seen:?})"),
        )?;
    }
    let o = cancel.join().map_err(|_| "cancel thread")??;
    check(o.status.success(), format!("cancel\n{}", o.describe()))?;
    // Well after the guest was kept, the watch goes on.
    std::thread::sleep(Duration::from_millis(1500));
    let mut watch = watch;
    check(watch.running(), "watch ended while the guest is kept")?;
    let o = ctl_cmd(&k.ctl, &["quit"])?;
    check(o.status.success(), format!("quit\n{}", o.describe()))?;
    let w = watch.finish(Duration::from_secs(30))?;
    check(
        w.status.success() && w.stdout.contains("the migration ended: cancelled"),
        format!("watch\n{}", w.describe()),
    )?;
    let out = k.src.finish(Duration::from_secs(30))?;
    let r = report(&k.dir.path("src.json"))?;
    check(
        text(&r, "source_guest") == "ended by quit",
        format!("source_guest {}\n{}", r["source_guest"], out.describe()),
    )
}

/// The destination pauses with the package in but its guest not yet run
/// (the guest is held with SIGSTOP; the source supervisor is stopped right
/// after the package, so the destination's link times out). A cancel
/// there, on the socket or by SIGINT, is refused: the destination could
/// not send the `Abort {guest_ran: false}` that lets the source resume,
/// and the source would stay paused for good with its guest frozen (which
/// is what happened). With both let go, the source reconnects by itself
/// and the migration completes with 0 mismatches.
fn destination_paused_before_its_guest_ran_keeps_the_migration() -> TestResult {
    let dir = TempDir::new("dest-paused-cancel");
    let port = free_port();
    let dctl = dir.path("dest.sock");
    let mut dest = start(
        postcopy()
            .args(["incoming", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--link-timeout", "2"])
            .arg("--control")
            .arg(&dctl)
            .arg("--json")
            .arg(dir.path("dest.json")),
    );
    let sctl = dir.path("src.sock");
    let src = start(
        postcopy()
            .args(["migrate", "--to", &format!("127.0.0.1:{port}")])
            .args(["--mem", "64M", "--workload", "ab", "--postcopy", "manual"])
            .args(["--verify", "ab", "--max-bandwidth", "32M"])
            .args(["--max-postcopy-bandwidth", "8M"])
            .arg("--control")
            .arg(&sctl)
            .arg("--json")
            .arg(dir.path("src.json")),
    );
    let status = |ctl: &std::path::Path| -> Result<Value, String> {
        let o = ctl_cmd(ctl, &["status", "--json"])?;
        serde_json::from_str(&o.stdout).map_err(|e| format!("{e}: {}", o.describe()))
    };
    let until = |ctl: &std::path::Path, what: &str, pred: &dyn Fn(&Value) -> bool| {
        let t = Instant::now();
        loop {
            // The socket may not be there yet.
            let v = status(ctl);
            if let Ok(v) = &v {
                if pred(v) {
                    return Ok(v.clone());
                }
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Err(format!("never {what}: {v:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Precopy runs: the destination guest has said it is ready; stopped
    // now, it cannot load the package.
    until(&sctl, "in precopy", &|v| text(v, "state") == "precopy")?;
    let t = Instant::now();
    let guest = loop {
        if let Some(&g) = children(dest.pid(), "postcopy-guest").first() {
            break g;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            "the destination guest never started",
        )?;
        std::thread::sleep(Duration::from_millis(20));
    };
    signal(guest, libc::SIGSTOP);
    let o = ctl_cmd(&sctl, &["start-postcopy"])?;
    check(
        o.status.success(),
        format!("start-postcopy\n{}", o.describe()),
    )?;
    until(&sctl, "postcopy-active", &|v| {
        text(v, "status") == "postcopy-active"
    })?;
    // The destination has the package; its guest cannot load it.
    until(&dctl, "past precopy", &|v| {
        !matches!(text(v, "state"), "precopy" | "preparing")
    })?;
    // `pause` waits for the destination's guest to run (before, the
    // destination might not have the package): silence the source instead.
    let o = ctl_cmd(&sctl, &["pause"])?;
    check(
        !o.status.success() && o.stderr.contains("not confirmed the package"),
        format!(
            "pause before the destination's guest runs\n{}",
            o.describe()
        ),
    )?;
    signal(src.pid(), libc::SIGSTOP);
    let d = until(&dctl, "paused", &|v| text(v, "state") == "paused");
    signal(src.pid(), libc::SIGCONT);
    let d = d?;
    check(
        d["allowed"]["cancel"] != true,
        format!("the paused destination offers cancel: {}", d["allowed"]),
    )?;
    let o = ctl_cmd(&dctl, &["cancel"])?;
    check(
        !o.status.success() && o.stderr.contains("link to the source is down"),
        format!("cancel on the paused destination\n{}", o.describe()),
    )?;
    signal(dest.pid(), libc::SIGINT);
    std::thread::sleep(Duration::from_millis(500));
    check(dest.running(), "SIGINT ended the paused destination")?;
    signal(guest, libc::SIGCONT);
    let out = src.finish(Duration::from_secs(120))?;
    let r = report(&dir.path("src.json"))?;
    completed_ok(&r, out.status.success(), &out.describe())?;
    let d = dest.finish(Duration::from_secs(30))?;
    check(d.status.success(), format!("destination\n{}", d.describe()))
}

/// Resets `s` (RST, not FIN): SO_LINGER 0, then shutdown.
fn reset(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket this test owns, with a linger struct
    // of the size given.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    let _ = s.shutdown(std::net::Shutdown::Both);
}

/// A relay's new connection: reads its hello, connects to `to` and passes
/// the hello on. Returns the hello, both ends and a second handle of each
/// for the way back (outbound's to read, inbound's to write), or None if
/// any step failed.
#[allow(clippy::type_complexity)]
fn relay_connect(
    mut inbound: TcpStream,
    to: &str,
) -> Option<([u8; HELLO_LEN], TcpStream, TcpStream, TcpStream, TcpStream)> {
    use std::io::Write;
    let mut hello = [0u8; HELLO_LEN];
    inbound.read_exact(&mut hello).ok()?;
    let mut outbound = TcpStream::connect(to).ok()?;
    outbound.write_all(&hello).ok()?;
    let back_r = outbound.try_clone().ok()?;
    let back_w = inbound.try_clone().ok()?;
    Some((hello, inbound, outbound, back_r, back_w))
}

/// A TCP relay to `to` that, once `armed`, resets every main stream (told
/// by its hello) after it carried `limit` more bytes towards `to`: a
/// middlebox that cuts long streams while new connections get through.
/// Returns its address; it runs until the test process ends.
fn resetting_relay(
    to: String,
    limit: u64,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<String, String> {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let Some((hello, mut inbound, mut outbound, mut back_r, mut back_w)) =
                relay_connect(inbound, &to)
            else {
                continue;
            };
            let main = hello[6] == MAIN;
            let armed = armed.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                let mut carried = 0u64;
                while let Ok(n) = inbound.read(&mut buf) {
                    if n == 0 || outbound.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if main && armed.load(Ordering::Relaxed) {
                        carried += n as u64;
                        if carried > limit {
                            reset(&inbound);
                            reset(&outbound);
                            return;
                        }
                    }
                }
                let _ = outbound.shutdown(std::net::Shutdown::Write);
            });
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = back_r.read(&mut buf) {
                    if n == 0 || back_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = back_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

/// In postcopy, behind a middlebox that resets the main stream after every
/// 8 MiB, the roles see `Connection reset by peer` or `Broken pipe`: link
/// trouble, which must not use up `--max-restarts` (1 here). Each resync
/// resumes from the destination's received pages, and the migration
/// completes with 0 mismatches. It used to fail after the package on the
/// second reset: the source kept its guest frozen and the destination
/// tore its running guest down, the guest lost on both hosts.
fn link_resets_in_postcopy_do_not_use_up_the_restarts() -> TestResult {
    let dir = TempDir::new("resets");
    let (dest, to) = listening(&[], &dir.path("dest.json"));
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let relay = resetting_relay(to.clone(), 8 << 20, armed.clone())?;
    let ctl = dir.path("src.sock");
    let src = start(
        postcopy()
            .args(["migrate", "--to", &relay])
            .args(["--mem", "128M", "--workload", "ab", "--verify", "ab"])
            .args(["--postcopy", "manual", "--max-bandwidth", "16M"])
            .args(["--max-restarts", "1"])
            .arg("--control")
            .arg(&ctl)
            .arg("--json")
            .arg(dir.path("src.json")),
    );
    let t = Instant::now();
    loop {
        let o = ctl_cmd(&ctl, &["start-postcopy"])?;
        if o.status.success() {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            format!("start-postcopy never applied\n{}", o.describe()),
        )?;
        std::thread::sleep(Duration::from_millis(200));
    }
    loop {
        let o = ctl_cmd(&ctl, &["status", "--json"])?;
        if o.stdout.contains("\"status\":\"postcopy-active\"") {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(60),
            format!("never in postcopy\n{}", o.describe()),
        )?;
        std::thread::sleep(Duration::from_millis(20));
    }
    armed.store(true, std::sync::atomic::Ordering::Relaxed);
    let out = src.finish(Duration::from_secs(180))?;
    let r = report(&dir.path("src.json")).map_err(|e| format!("{e}\n{}", out.describe()))?;
    completed_ok(&r, out.status.success(), &out.describe())?;
    let resets = events(&r, "resync")
        .into_iter()
        .filter(|e| e.contains("(os error"))
        .count();
    check(
        resets >= 2,
        format!(
            "expected at least 2 resyncs for socket errors (more than --max-restarts 1): {:?}",
            events(&r, "resync")
        ),
    )?;
    let d = dest.finish(Duration::from_secs(30))?;
    check(d.status.success(), format!("destination\n{}", d.describe()))
}

/// Before the package the same resets count against `--max-restarts`:
/// every resync starts precopy over, so behind that middlebox 64 MiB never
/// get across, and the migration must fail once the restarts are used up,
/// the source guest running with its memory intact (not start precopy over
/// for ever).
fn link_resets_in_precopy_use_up_the_restarts() -> TestResult {
    let dir = TempDir::new("resets-pre");
    let (dest, to) = listening(&[], &dir.path("dest.json"));
    let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relay = resetting_relay(to.clone(), 8 << 20, armed)?;
    let out = run(
        postcopy()
            .args(["migrate", "--to", &relay])
            .args(["--mem", "64M", "--workload", "ab", "--verify", "ab"])
            .args(["--postcopy", "never", "--max-restarts", "2"])
            .arg("--json")
            .arg(dir.path("src.json")),
        Duration::from_secs(120),
    )?;
    let r = report(&dir.path("src.json")).map_err(|e| format!("{e}\n{}", out.describe()))?;
    check(
        // Either side's budget may run out first.
        text(&r, "status") == "failed" && text(&r, "error").contains("--max-restarts"),
        format!(
            "status {} error {}\n{}",
            r["status"],
            r["error"],
            out.describe()
        ),
    )?;
    check(
        text(&r, "source_guest").starts_with("running")
            && r["source_verify"]["mismatches"].as_u64() == Some(0),
        format!(
            "source guest {} memory {}",
            r["source_guest"], r["source_verify"]
        ),
    )?;
    let _ = dest.finish(Duration::from_secs(60));
    Ok(())
}

/// A TCP relay to `to` that goes dark when the first main stream carries
/// a frame of type `eat` (read frame by frame): that frame is not
/// forwarded, and from then on no connection open at that moment carries
/// a byte either way for `dark`, after which the relay resets them all.
/// Connections opened later are carried normally, and a second frame of
/// that type passes. A link that dies at exactly that frame, every time.
/// Returns its address; it runs until the test process ends.
fn dark_at_frame_relay(to: String, eat: u8, dark: Duration) -> Result<String, String> {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener
        .local_addr()
        .map_err(|e| e.to_string())?
        .to_string();
    // The generation of connections that goes dark, and whether it did.
    let eaten = Arc::new(AtomicBool::new(false));
    let dark_gen = Arc::new(AtomicU64::new(u64::MAX));
    let generation = Arc::new(AtomicU64::new(0));
    // Once this connection's generation went dark: wait it out, reset.
    let go_dark = move |gen: u64, dark_gen: &AtomicU64, a: &TcpStream, b: &TcpStream| -> bool {
        if dark_gen.load(Ordering::SeqCst) != gen {
            return false;
        }
        std::thread::sleep(dark);
        reset(a);
        reset(b);
        true
    };
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let Some((hello, mut inbound, mut outbound, mut back_r, mut back_w)) =
                relay_connect(inbound, &to)
            else {
                continue;
            };
            // A control hello starts a new generation (a reconnect).
            if hello[6] == 1 {
                generation.fetch_add(1, Ordering::SeqCst);
            }
            let gen = generation.load(Ordering::SeqCst);
            let main = hello[6] == MAIN;
            let (eaten, dark_gen2) = (eaten.clone(), dark_gen.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    if main && !eaten.load(Ordering::SeqCst) {
                        // Frame by frame until the one to eat.
                        let mut head = [0u8; 8];
                        if inbound.read_exact(&mut head).is_err() {
                            break;
                        }
                        if head[0] == eat {
                            eaten.store(true, Ordering::SeqCst);
                            dark_gen2.store(gen, Ordering::SeqCst);
                            go_dark(gen, &dark_gen2, &inbound, &outbound);
                            return;
                        }
                        let len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
                        let mut payload = vec![0u8; len as usize];
                        if inbound.read_exact(&mut payload).is_err() {
                            break;
                        }
                        if go_dark(gen, &dark_gen2, &inbound, &outbound) {
                            return;
                        }
                        if outbound.write_all(&head).is_err()
                            || outbound.write_all(&payload).is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    let Ok(n) = inbound.read(&mut buf) else { break };
                    if go_dark(gen, &dark_gen2, &inbound, &outbound) {
                        return;
                    }
                    if n == 0 || outbound.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = outbound.shutdown(std::net::Shutdown::Write);
            });
            let dark_gen3 = dark_gen.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = back_r.read(&mut buf) {
                    if go_dark(gen, &dark_gen3, &back_r, &back_w) {
                        return;
                    }
                    if n == 0 || back_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = back_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    Ok(addr)
}

const PACKAGE: u8 = 0x05;
const ROUND: u8 = 0x03;

/// The link dies with the package in flight: the source has handed it
/// over (its guest stays frozen: the destination might run it), but the
/// destination, still in precopy, never gets it. It used to fail there,
/// and the source stayed paused for good with its guest frozen. Now the
/// destination pauses too, the source comes back after the dark spell,
/// learns from the resync that the package never arrived, resumes its
/// guest in precopy, and the migration completes with 0 mismatches.
fn link_lost_with_the_package_in_flight_resumes_precopy() -> TestResult {
    let dir = TempDir::new("package-lost");
    let (dest, to) = listening(&["--link-timeout", "2"], &dir.path("dst.json"));
    let relay = dark_at_frame_relay(to, PACKAGE, Duration::from_secs(5))?;
    let out = run(
        postcopy()
            .args(["migrate", "--to", &relay])
            .args(["--mem", "64M", "--workload", "ab", "--verify", "ab"])
            .args(["--postcopy", "manual", "--postcopy-after-syncs", "2"])
            .args(["--max-bandwidth", "64M", "--link-timeout", "2"])
            .arg("--json")
            .arg(dir.path("src.json")),
        Duration::from_secs(120),
    )?;
    let dst = dest.finish(Duration::from_secs(30))?;
    let both = format!("{}\ndestination:\n{}", out.describe(), dst.describe());
    let r = report(&dir.path("src.json")).map_err(|e| format!("{e}\n{both}"))?;
    completed_ok(&r, out.status.success(), &both)?;
    check(
        !events(&r, "pause").is_empty()
            && events(&r, "state").iter().any(|e| e == "resync -> precopy"),
        format!(
            "the source did not pause and go back to precopy: {}\n{both}",
            r["events"]
        ),
    )?;
    let d = report(&dir.path("dst.json"))?;
    check(
        !events(&d, "pause").is_empty(),
        format!("the destination did not pause: {}", d["events"]),
    )?;
    check(dst.status.success(), format!("destination failed\n{both}"))
}

/// The fault-handler places the last page and tells the source
/// (POSTCOPY_DONE), then dies before telling its supervisor (injected with
/// `POSTCOPY_TEST_FAULT_HANDLER_DIES_AT_COMPLETION`; a late duplicate page
/// once did it by accident). The resync that follows finds every page
/// here. It used to start no handler and say nothing more: the source,
/// told nothing is missing, waited for `DestCompleted`, the destination
/// for pages, until the destination failed with its guest running and the
/// source frozen. Now the destination completes from the shared bitmap.
fn fault_handler_dying_at_completion_still_completes() -> TestResult {
    let mut cmd = postcopy();
    cmd.arg("demo")
        .env("POSTCOPY_TEST_FAULT_HANDLER_DIES_AT_COMPLETION", "1");
    let (r, ok, out) = demo_with(
        &mut cmd,
        &[
            "--mem",
            "64M",
            "--workload",
            "ab",
            "--postcopy",
            "manual",
            "--postcopy-after-syncs",
            "1",
            "--max-bandwidth",
            "32M",
            "--verify",
            "ab",
        ],
        90,
    )?;
    completed_ok(&r, ok, &out)?;
    check(
        r["switched_to_postcopy"] == true && !events(&r, "resync").is_empty(),
        format!(
            "no postcopy, or no resync after the handler died: {}\n{out}",
            r["events"]
        ),
    )
}

/// The source supervisor is killed (SIGKILL) in precopy: its connections
/// close, which a source that handed the package over never does, so the
/// destination does not pause for it but fails at once, naming the lost
/// control connection (a silent link, as above, is what pauses).
fn source_killed_in_precopy_ends_the_destination_at_once() -> TestResult {
    let dir = TempDir::new("source-killed");
    let (dest, to) = listening(&[], &dir.path("dst.json"));
    let sctl = dir.path("src.sock");
    let mut src = start(
        postcopy()
            .args(["migrate", "--to", &to])
            .args(["--mem", "64M", "--workload", "ab", "--postcopy", "manual"])
            .args(["--max-bandwidth", "8M"])
            .arg("--control")
            .arg(&sctl),
    );
    let t = Instant::now();
    loop {
        let o = ctl_cmd(&sctl, &["status", "--json"]);
        if o.is_ok_and(|o| o.stdout.contains("\"state\":\"precopy\"")) {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30) && src.running(),
            "the source never reached precopy",
        )?;
        std::thread::sleep(Duration::from_millis(50));
    }
    signal(src.pid(), libc::SIGKILL);
    let t = Instant::now();
    let d = dest.finish(Duration::from_secs(30))?;
    let waited = t.elapsed();
    let r = report(&dir.path("dst.json"))?;
    check(
        !d.status.success()
            && text(&r, "status") == "failed"
            && text(&r, "error").contains("control connection")
            && events(&r, "pause").is_empty(),
        format!(
            "destination: status {} error {} events {}\n{}",
            r["status"],
            r["error"],
            r["events"],
            d.describe()
        ),
    )?;
    check(
        waited < Duration::from_secs(10),
        format!("the destination took {waited:?} to end"),
    )
}

/// The link dies in precopy (a ROUND eaten), before any package: the
/// source fails and runs its guest on; the destination pauses, as it
/// cannot tell this from a package in flight, and gives up by itself after
/// its bound (10 s with a 2 s link timeout), naming why.
fn destination_paused_in_precopy_gives_up_in_time() -> TestResult {
    let dir = TempDir::new("precopy-lost");
    let (dest, to) = listening(&["--link-timeout", "2"], &dir.path("dst.json"));
    let relay = dark_at_frame_relay(to, ROUND, Duration::from_secs(4))?;
    let t = Instant::now();
    let out = run(
        postcopy()
            .args(["migrate", "--to", &relay])
            .args(["--mem", "64M", "--workload", "ab", "--verify", "ab"])
            .args(["--postcopy", "manual", "--max-bandwidth", "64M"])
            .args(["--link-timeout", "2"])
            .arg("--json")
            .arg(dir.path("src.json")),
        Duration::from_secs(60),
    )?;
    let r = report(&dir.path("src.json")).map_err(|e| format!("{e}\n{}", out.describe()))?;
    check(
        text(&r, "status") == "failed"
            && text(&r, "source_guest").starts_with("running")
            && r["source_verify"]["mismatches"].as_u64() == Some(0),
        format!(
            "source: status {} guest {} memory {}\n{}",
            r["status"],
            r["source_guest"],
            r["source_verify"],
            out.describe()
        ),
    )?;
    let dst = dest.finish(Duration::from_secs(60))?;
    let waited = t.elapsed();
    let d = report(&dir.path("dst.json"))?;
    check(
        !dst.status.success()
            && text(&d, "error").contains("did not come back within 10 s")
            && !events(&d, "pause").is_empty(),
        format!(
            "destination: error {} events {}\n{}",
            d["error"],
            d["events"],
            dst.describe()
        ),
    )?;
    check(
        waited < Duration::from_secs(45),
        format!("the destination took {waited:?} to give up"),
    )
}

// ---------------------------------------------------------------- fault 3

/// Fault 3: a destination that accepts the migration, then closes its
/// return path during precopy (and answers nothing else). The source must
/// not switch: no package, the source guest still running.
fn dead_return_path_prevents_the_switch() -> TestResult {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let fake = std::thread::spawn(move || -> Result<bool, String> {
        let accept = || -> Result<(TcpStream, u8), String> {
            let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h).map_err(|e| e.to_string())?;
            common::wire::server_reply(&mut s, HelloStatus::Ok).map_err(|e| e.to_string())?;
            Ok((s, h[6]))
        };
        let (mut c, _) = accept()?;
        let layout = MemLayout::new(PAGE_SIZE as u64).map_err(|e| e.to_string())?;
        let mut cr = FrameReader::new(
            c.try_clone().map_err(|e| e.to_string())?,
            ConnKind::Control,
            layout,
        );
        let mem = match recv_control(&mut cr).map_err(|e| e.to_string())? {
            ControlMsg::Setup(s) => s.guest.mem_bytes,
            other => return Err(format!("expected Setup, got {other:?}")),
        };
        send_control(
            &mut c,
            &ControlMsg::SetupAccepted(SetupAccepted {
                postcopy_ready: true,
                uffd_features: 0,
            }),
        )
        .map_err(|e| e.to_string())?;
        let mut data = Vec::new();
        for _ in 0..3 {
            data.push(accept()?);
        }
        // The return path goes away; everything else stays.
        for (s, kind) in &data {
            if *kind == RETURN_PATH {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
        let main = data
            .iter()
            .find(|(_, k)| *k == MAIN)
            .ok_or("no main stream")?
            .0
            .try_clone()
            .map_err(|e| e.to_string())?;
        // Heartbeats from here, so the source does not give up on us for
        // silence; and read the main stream to its end.
        let mut beat = c.try_clone().map_err(|e| e.to_string())?;
        std::thread::spawn(move || {
            while send_control(&mut beat, &ControlMsg::Heartbeat).is_ok() {
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        std::thread::spawn(move || while recv_control(&mut cr).is_ok() {});
        let mut r = FrameReader::new(
            main,
            ConnKind::Main,
            MemLayout::new(mem).map_err(|e| e.to_string())?,
        );
        let mut package = false;
        while let Ok(f) = r.next_frame() {
            package |= matches!(f, Frame::Package(_));
        }
        Ok(package)
    });
    let dir = TempDir::new("dead-return");
    let sj = dir.path("src.json");
    let out = run(
        postcopy()
            .args([
                "migrate",
                "--to",
                &format!("127.0.0.1:{port}"),
                "--mem",
                "64M",
                "--workload",
                "ab",
                "--postcopy",
                "manual",
                "--postcopy-after-syncs",
                "1",
                "--verify",
                "ab",
                "--link-timeout",
                "3",
                "--json",
            ])
            .arg(&sj),
        Duration::from_secs(120),
    )?;
    let r = report(&sj)?;
    let package = fake.join().map_err(|_| "the fake destination panicked")??;
    check(!package, format!("a package was sent\n{}", out.describe()))?;
    check(
        !out.status.success() && text(&r, "status") == "failed",
        format!("status {}\n{}", r["status"], out.describe()),
    )?;
    check(
        r["downtime_ms"].is_null(),
        format!("the source guest was stopped for good: {r:#}"),
    )?;
    check(
        text(&r, "source_guest").starts_with("running"),
        format!("source_guest {}", r["source_guest"]),
    )?;
    check(
        r["source_verify"]["mismatches"].as_u64() == Some(0),
        format!("source memory: {}", r["source_verify"]),
    )
}

// ---------------------------------------------------------------- restarts

const PHASES: [&str; 3] = ["precopy", "switchover", "postcopy"];
const ROLES: [&str; 3] = ["ram-sender", "page-server", "fault-handler"];

/// One demo per role and phase, each killing that role once (SIGKILL) at
/// that point: every migration completes with 0 mismatches and the
/// restart counted.
fn kill_matrix(guest: &[&str]) -> TestResult {
    kill_roles(guest, &ROLES, &PHASES)
}

/// [`kill_matrix`] over the given roles and phases.
fn kill_roles(guest: &[&str], roles: &[&str], phases: &[&str]) -> TestResult {
    for &role in roles {
        for &phase in phases {
            let delay = match phase {
                "precopy" => "+300ms",
                "switchover" => "",
                _ => "+150ms",
            };
            let spec = format!("{role}@{phase}{delay}");
            let mut args = guest.to_vec();
            args.extend([
                "--mem",
                "128M",
                "--postcopy",
                "manual",
                "--postcopy-after-syncs",
                "1",
                "--max-bandwidth",
                "64M",
                "--max-postcopy-bandwidth",
                "32M",
                "--chaos",
                &spec,
            ]);
            let (r, ok, out) = demo(&args, 180)?;
            completed_ok(&r, ok, &out).map_err(|e| format!("{spec}: {e}"))?;
            check(
                restarts(&r, role) >= 1,
                format!("{spec}: no restart of {role} counted: {}", r["roles"]),
            )?;
            check(
                r["switched_to_postcopy"] == true,
                format!("{spec}: never switched"),
            )?;
        }
    }
    Ok(())
}

fn kill_each_role_in_each_phase_process() -> TestResult {
    kill_matrix(&["--guest", "process", "--workload", "ab", "--vcpus", "2"])
}

fn kill_each_role_in_each_phase_kvm() -> TestResult {
    kill_matrix(&["--guest", "kvm"])
}

/// With three bulk streams, the roles that hold them (ram-sender: the
/// writers; fault-handler: the readers) die mid-precopy and mid-postcopy:
/// every stream is opened again with the successor, nothing is lost.
fn kill_sender_and_handler_with_three_streams() -> TestResult {
    kill_roles(
        &[
            "--guest",
            "process",
            "--workload",
            "ab",
            "--vcpus",
            "2",
            "--streams",
            "3",
        ],
        &["ram-sender", "fault-handler"],
        &["precopy", "postcopy"],
    )
}

/// Kills drawn at random (seeded), three per migration, until at least 50
/// have fired: every migration completes with 0 mismatches. The source
/// counts its own kills; the destination's are its fault-handler restarts
/// beyond the resyncs the source asked for.
fn fifty_random_kills() -> TestResult {
    let mut fired = 0usize;
    let mut runs = 0;
    let mut seed = 1u64;
    while fired < 50 {
        check(
            runs < 60,
            format!("only {fired} kills fired in {runs} runs"),
        )?;
        let spec = format!("random:3:{seed}");
        let dir = TempDir::new("random-kills");
        let (sj, dj) = (dir.path("src.json"), dir.path("dst.json"));
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let dest = start(
            postcopy()
                .args(["incoming", "--listen", &addr, "--accept-timeout", "60"])
                .args(["--chaos", &spec, "--max-restarts", "10", "--json"])
                .arg(&dj),
        );
        std::thread::sleep(Duration::from_millis(300));
        let src = run(
            postcopy()
                .args([
                    "migrate",
                    "--to",
                    &addr,
                    "--mem",
                    "64M",
                    "--workload",
                    "ab",
                    "--vcpus",
                    "2",
                    "--postcopy",
                    "manual",
                    "--postcopy-after-syncs",
                    "1",
                    "--max-bandwidth",
                    "32M",
                    "--max-postcopy-bandwidth",
                    "16M",
                    "--max-restarts",
                    "10",
                    "--chaos",
                    &spec,
                    "--json",
                ])
                .arg(&sj),
            Duration::from_secs(180),
        )?;
        let dst = dest.finish(Duration::from_secs(30))?;
        let (s, d) = (report(&sj)?, report(&dj)?);
        completed_ok(&s, src.status.success(), &src.describe())
            .map_err(|e| format!("{spec}: {e}\ndestination: {}", dst.describe()))?;
        fired += events(&s, "chaos").len() + events(&d, "chaos").len();
        runs += 1;
        seed += 1;
    }
    eprintln!(
        "random kills: {fired} fired in {runs} migrations (seeds 1..={})",
        seed - 1
    );
    Ok(())
}

// ---------------------------------------------------------------- recovery

/// A postcopy migration between two hosts whose push is slow enough (an
/// idle guest, paced push) to cut the link in the middle of it. Returns
/// the hosts, the running source and destination, the report paths and
/// the source's command socket.
struct Cut {
    hosts: TwoHosts,
    dir: TempDir,
    src: tests::Running,
    dst: tests::Running,
    sock: std::path::PathBuf,
}

fn postcopy_between_hosts(tag: &str) -> Result<Cut, String> {
    postcopy_between_hosts_with(tag, &[])
}

/// [`postcopy_between_hosts`] with more arguments for the source.
fn postcopy_between_hosts_with(tag: &str, more: &[&str]) -> Result<Cut, String> {
    let hosts = TwoHosts::new(tag)?;
    let dir = TempDir::new(tag);
    let sock = dir.path("cmd.sock");
    let port = free_port();
    let (dst, addr) = hosts.incoming(port, &["--link-timeout", "2"], &dir.path("dst.json"));
    let mut args = vec![
        "--mem",
        "256M",
        "--workload",
        "idle",
        "--postcopy",
        "manual",
        "--max-postcopy-bandwidth",
        "16M",
        "--link-timeout",
        "2",
        "--control",
        sock.to_str().expect("utf-8 path"),
    ];
    args.extend(more);
    let src = start(
        hosts
            .migrate(&addr, &args, &dir.path("src.json"))
            .stdin(std::process::Stdio::null()),
    );
    // Switch as soon as precopy runs; the push then takes ~16 s.
    let t = Instant::now();
    loop {
        let out = Command::new(tests::bin_dir().join("postcopy"))
            .args(["start-postcopy", "--control"])
            .arg(&sock)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            break;
        }
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "start-postcopy never went through: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The guest stops, the package goes, the push starts.
    std::thread::sleep(Duration::from_millis(1500));
    Ok(Cut {
        hosts,
        dir,
        src,
        dst,
        sock,
    })
}

/// Waits for both ends; the source's report once it completed, recovered.
fn recovered(c: Cut) -> Result<Value, String> {
    let src = c.src.finish(Duration::from_secs(180))?;
    let dst = c.dst.finish(Duration::from_secs(30))?;
    let r = report(&c.dir.path("src.json"))?;
    let both = format!(
        "source:\n{}\ndestination:\n{}",
        src.describe(),
        dst.describe()
    );
    completed_ok(&r, src.status.success(), &both)?;
    check(
        !events(&r, "pause").is_empty() && !events(&r, "recover").is_empty(),
        format!(
            "no pause and recovery in the events: {}\n{both}",
            r["events"]
        ),
    )?;
    let d = report(&c.dir.path("dst.json"))?;
    check(
        !events(&d, "pause").is_empty(),
        format!("the destination did not pause: {}", d["events"]),
    )?;
    Ok(r)
}

/// The link goes down for 5 s in postcopy: both sides pause, the source
/// reconnects by itself, the migration completes.
fn link_down_5s_in_postcopy_recovers() -> TestResult {
    let c = postcopy_between_hosts("cut5")?;
    c.hosts.cut()?;
    std::thread::sleep(Duration::from_secs(5));
    c.hosts.restore()?;
    recovered(c).map(drop)
}

/// The same cut with three bulk streams: the recovery replaces all of
/// them, and the push goes on over three fresh streams.
fn link_down_in_postcopy_with_three_streams_recovers() -> TestResult {
    let c = postcopy_between_hosts_with("cut5s3", &["--streams", "3"])?;
    c.hosts.cut()?;
    std::thread::sleep(Duration::from_secs(5));
    c.hosts.restore()?;
    let r = recovered(c)?;
    check(
        r["streams"].as_u64() == Some(3),
        format!("streams {}", r["streams"]),
    )
}

/// A 30 s cut, far beyond the 2 s link timeout: the paused migration does
/// not fail while its tries to reconnect fail; `postcopy recover` makes it
/// try at once when the link is back.
fn link_down_30s_recovered_by_command() -> TestResult {
    let c = postcopy_between_hosts("cut30")?;
    c.hosts.cut()?;
    std::thread::sleep(Duration::from_secs(30));
    let mut c = c;
    check(c.src.running(), "the source gave up during the cut")?;
    c.hosts.restore()?;
    let out = Command::new(tests::bin_dir().join("postcopy"))
        .args(["recover", "--control"])
        .arg(&c.sock)
        .output()
        .map_err(|e| e.to_string())?;
    check(
        out.status.success(),
        format!("postcopy recover: {}", String::from_utf8_lossy(&out.stderr)),
    )?;
    recovered(c).map(drop)
}

/// Cut again right after the source reconnected (its `recover` event,
/// followed on the control socket), for longer than the 2 s link timeout:
/// the migration in recovery pauses again rather than failing, then
/// recovers by itself and completes.
fn cut_again_during_recovery_pauses_again() -> TestResult {
    use std::io::{BufRead, BufReader, Write};
    let mut c = postcopy_between_hosts("cut-again")?;
    let conn = std::os::unix::net::UnixStream::connect(&c.sock).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(Duration::from_secs(60))).ok();
    (&conn)
        .write_all(b"{\"cmd\":\"subscribe\"}\n")
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(&conn);
    c.hosts.cut()?;
    std::thread::sleep(Duration::from_secs(3));
    c.hosts.restore()?;
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the control socket closed before the source reconnected".into());
        }
        if line.contains("\"event\":\"recover\"") {
            break;
        }
    }
    c.hosts.cut()?;
    std::thread::sleep(Duration::from_secs(5));
    check(c.src.running(), "the source gave up during the second cut")?;
    c.hosts.restore()?;
    let r = recovered(c)?;
    check(
        events(&r, "pause").len() >= 2,
        format!("expected two pauses: {}", r["events"]),
    )
}
