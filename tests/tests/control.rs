//! The control socket (issue 9, docs/control.md) as an orchestrator and an
//! operator use it: a whole migration driven through the socket alone,
//! clients that send garbage or never read beside it, `postcopy status`
//! and the other CLI clients during a demo, and pause / recover.

use libtest_mimic::Arguments;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use tests::{check, free_port, num, postcopy, report, run, start, text, Outcome, TempDir};

type TestResult = Result<(), String>;

fn main() {
    let mut args = Arguments::from_args();
    // Every migration keeps both CPUs busy: one at a time.
    args.test_threads.get_or_insert(1);
    let plain = tests::plain_trial;
    let trials = vec![
        plain(
            "whole_migration_through_the_control_socket",
            whole_migration_through_the_control_socket,
        ),
        plain("cli_clients_during_a_demo", cli_clients_during_a_demo),
        plain(
            "pause_then_recover_on_command",
            pause_then_recover_on_command,
        ),
        plain(
            "cancel_on_an_idle_destination_ends_it",
            cancel_on_an_idle_destination_ends_it,
        ),
        plain(
            "subscribers_that_leave_leave_nothing_behind",
            subscribers_that_leave_leave_nothing_behind,
        ),
    ];
    libtest_mimic::run(&args, trials).exit();
}

/// A JSON-lines connection to a control socket.
struct Conn {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn open(path: &Path) -> Result<Conn, String> {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t.elapsed() > Duration::from_secs(20) => {
                    return Err(format!("{}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        Ok(Conn {
            w: s.try_clone().map_err(|e| e.to_string())?,
            r: BufReader::new(s),
        })
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("the control socket closed".into()),
            Ok(_) => serde_json::from_str(&l).map_err(|e| format!("{e}: {l:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends a request; returns its reply (events in between are kept).
    fn call(&mut self, req: Value, events: &mut Vec<Value>) -> Result<Value, String> {
        writeln!(self.w, "{req}").map_err(|e| e.to_string())?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                events.push(v);
            } else {
                return Ok(v);
            }
        }
    }
}

fn ok(reply: &Value) -> Result<&Value, String> {
    match reply["ok"].as_bool() {
        Some(true) => Ok(&reply["result"]),
        _ => Err(format!("refused: {reply}")),
    }
}

/// Issue 9, Done when 2: `incoming` and `migrate --postcopy manual`, then
/// everything through the source's control socket: subscribe, query, set
/// the bandwidth (seen in the next query), start postcopy, and the events
/// followed to `completed`. Beside it, a client sends garbage, one says
/// nothing, and one asks and never reads its answers: the migration
/// completes with 0 mismatches and the subscriber misses nothing.
fn whole_migration_through_the_control_socket() -> TestResult {
    let dir = TempDir::new("ctl-whole");
    let port = free_port();
    let dest = start(
        postcopy()
            .args(["incoming", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--control")
            .arg(dir.path("dest.sock"))
            .arg("--json")
            .arg(dir.path("dest.json")),
    );
    let sock = dir.path("src.sock");
    let src = start(
        postcopy()
            .args(["migrate", "--to", &format!("127.0.0.1:{port}")])
            .args(["--mem", "256M", "--workload", "ab", "--postcopy", "manual"])
            .args(["--max-bandwidth", "16M", "--verify", "ab"])
            .arg("--control")
            .arg(&sock)
            .arg("--json")
            .arg(dir.path("src.json")),
    );
    let mut events = Vec::new();
    let mut sub = Conn::open(&sock)?;
    ok(&sub.call(json!({"cmd": "subscribe", "id": 1}), &mut events)?)?;

    // Hostile neighbours, all at once.
    let mut garbage = Conn::open(&sock)?;
    for bad in [
        "{not json",
        r#"{"cmd": 42}"#,
        r#"{"cmd": "self-destruct"}"#,
        r#"{"cmd": "set", "key": "max-bandwidth", "value": "fast"}"#,
        "\u{1b}[2J\u{7}",
    ] {
        writeln!(garbage.w, "{bad}").map_err(|e| e.to_string())?;
        let reply = garbage.line()?;
        check(
            reply["ok"] == false && reply["error"].as_str().is_some_and(|e| !e.is_empty()),
            format!("garbage {bad:?} got {reply}"),
        )?;
    }
    let _silent = UnixStream::connect(&sock).map_err(|e| e.to_string())?;
    let mut deaf = UnixStream::connect(&sock).map_err(|e| e.to_string())?;
    deaf.set_write_timeout(Some(Duration::from_secs(5))).ok();
    let deaf_writer = std::thread::spawn(move || {
        // Thousands of queries, no answer ever read: the socket drops it.
        for _ in 0..20_000 {
            if writeln!(deaf, r#"{{"cmd":"query"}}"#).is_err() {
                return;
            }
        }
    });
    let long = "x".repeat(200 << 10);
    let mut huge = UnixStream::connect(&sock).map_err(|e| e.to_string())?;
    let _ = writeln!(huge, "{long}");

    let mut q = Conn::open(&sock)?;
    let first = ok(&q.call(json!({"cmd": "query"}), &mut events)?)?.clone();
    check(
        text(&first, "side") == "source" && first["allowed"]["cancel"] == true,
        format!("first query: {first}"),
    )?;
    // Precopy runs at 16 MB/s; raise the cap while it runs.
    let t = Instant::now();
    loop {
        let v = ok(&q.call(json!({"cmd": "query"}), &mut events)?)?.clone();
        if text(&v, "status") == "active" && num(&v, "live.pages_sent")? > 0 {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            format!("precopy never ran: {v}"),
        )?;
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&q.call(
        json!({"cmd": "set", "key": "max-bandwidth", "value": "64M", "id": "bw"}),
        &mut events,
    )?)?;
    let v = ok(&q.call(json!({"cmd": "query"}), &mut events)?)?.clone();
    check(
        num(&v, "max_bandwidth")? == 64 << 20,
        format!("max_bandwidth after set: {}", v["max_bandwidth"]),
    )?;
    let refused = q.call(json!({"cmd": "recover"}), &mut events)?;
    check(
        refused["ok"] == false && text(&refused, "error").contains("not paused"),
        format!("recover in precopy: {refused}"),
    )?;
    std::thread::sleep(Duration::from_millis(1000));
    ok(&q.call(json!({"cmd": "start-postcopy"}), &mut events)?)?;

    // Follow the events to the end.
    let t = Instant::now();
    loop {
        let v = sub.line()?;
        let end = v["event"] == "end";
        events.push(v);
        if end {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(120),
            "no end event in 120 s",
        )?;
    }
    let out = src.finish(Duration::from_secs(60))?;
    let _ = deaf_writer.join();
    let d = dest.finish(Duration::from_secs(30))?;
    let r = report(&dir.path("src.json"))?;
    completed(&r, &out)?;
    check(d.status.success(), format!("destination\n{}", d.describe()))?;
    let detail = |kind: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["event"] == kind)
            .map(|e| e["detail"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let states = detail("state");
    for want in ["-> precopy", "-> package sent", "-> completed"] {
        check(
            states.iter().any(|s| s.ends_with(want)),
            format!("no state event {want:?} in {states:?}"),
        )?;
    }
    check(
        detail("set").iter().any(|s| s.starts_with("max-bandwidth")),
        format!("no set event: {events:?}"),
    )?;
    check(
        detail("end") == vec!["the migration ended: completed".to_string()],
        format!("end events {:?}", detail("end")),
    )?;
    // Every event of the report reached the subscriber, in order.
    let kinds: Vec<&str> = r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    let seen: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    check(
        kinds == seen,
        format!("report events {kinds:?}\nsubscriber saw {seen:?}"),
    )?;
    check(
        r["switched_to_postcopy"] == true
            && text(&r, "switchover_reason").contains("start-postcopy"),
        format!("switch: {}", r["switchover_reason"]),
    )
}

fn completed(r: &Value, out: &Outcome) -> TestResult {
    check(
        out.status.success() && text(r, "status") == "completed",
        format!("not completed: {}\n{}", r["error"], out.describe()),
    )?;
    check(
        r["verify"]["mismatches"].as_u64() == Some(0) && num(r, "verify.pages_checked")? > 0,
        format!("verify: {}", r["verify"]),
    )
}

/// `postcopy ARGS --control SOCK`.
fn cli(sock: &Path, args: &[&str]) -> Result<Outcome, String> {
    run(
        postcopy().args(args).arg("--control").arg(sock),
        Duration::from_secs(30),
    )
}

/// Issue 9, Done when 3: `postcopy status` during a demo prints the state
/// and live figures; requests that don't apply get a clear error (exit 1):
/// pause and recover in precopy, retry while running, start-postcopy on
/// the destination, cancel after the switch.
fn cli_clients_during_a_demo() -> TestResult {
    let dir = TempDir::new("ctl-cli");
    let sock = dir.path("src.sock");
    let demo = start(
        postcopy()
            .args([
                "demo",
                "--mem",
                "256M",
                "--workload",
                "ab",
                "--postcopy",
                "manual",
            ])
            .args(["--max-bandwidth", "16M", "--max-postcopy-bandwidth", "16M"])
            .arg("--control")
            .arg(&sock)
            .arg("--json")
            .arg(dir.path("r.json")),
    );
    let t = Instant::now();
    let status = loop {
        let o = cli(&sock, &["status"])?;
        if o.status.success()
            && o.stdout.contains("(state precopy)")
            && o.stdout.contains("pending")
        {
            break o;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            format!("status never showed precopy\n{}", o.describe()),
        )?;
        std::thread::sleep(Duration::from_millis(200));
    };
    for want in [
        "source: active (state precopy)",
        "pages",
        "Mbit/s",
        "applies now:",
        "start-postcopy",
    ] {
        check(
            status.stdout.contains(want),
            format!("status lacks {want:?}:\n{}", status.stdout),
        )?;
    }
    let refused = |args: &[&str], why: &str| -> TestResult {
        let o = cli(&sock, args)?;
        check(
            !o.status.success() && o.stderr.contains(why),
            format!(
                "postcopy {args:?} should fail with {why:?}\n{}",
                o.describe()
            ),
        )
    };
    refused(&["pause"], "pause applies in postcopy")?;
    refused(&["recover"], "not paused")?;
    refused(&["retry"], "the migration is running")?;
    refused(&["set", "max-bandwidth", "12"], "too slow")?;
    refused(&["set", "colour", "red"], "unknown parameter")?;
    let o = run(
        postcopy().args(["start-postcopy", "--destination"]),
        Duration::from_secs(30),
    )?;
    check(
        !o.status.success() && o.stderr.contains("the source's"),
        format!("start-postcopy on the destination\n{}", o.describe()),
    )?;
    let o = cli(&sock, &["start-postcopy"])?;
    check(
        o.status.success(),
        format!("start-postcopy\n{}", o.describe()),
    )?;
    // In postcopy (the push capped at 16 MB/s lasts seconds): no cancel.
    let t = Instant::now();
    loop {
        let o = cli(&sock, &["status", "--json"])?;
        let v: Value =
            serde_json::from_str(&o.stdout).map_err(|e| format!("{e}: {}", o.describe()))?;
        if text(&v, "status") == "postcopy-active" {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30) && text(&v, "status") != "completed",
            format!("never saw postcopy-active: {}", v["status"]),
        )?;
        std::thread::sleep(Duration::from_millis(50));
    }
    refused(&["cancel"], "only live copy")?;
    let out = demo.finish(Duration::from_secs(120))?;
    completed(&report(&dir.path("r.json"))?, &out)?;
    let o = cli(&sock, &["status"])?;
    check(
        !o.status.success() && o.stderr.contains("cannot reach"),
        format!("status after the end\n{}", o.describe()),
    )
}

/// `pause` in postcopy drops the link on purpose: both sides report
/// postcopy-paused and nothing reconnects by itself; `recover` resumes and
/// the migration completes with 0 mismatches.
fn pause_then_recover_on_command() -> TestResult {
    let dir = TempDir::new("ctl-pause");
    let sock = dir.path("src.sock");
    let demo = start(
        postcopy()
            .args([
                "demo",
                "--mem",
                "256M",
                "--workload",
                "ab",
                "--postcopy",
                "manual",
            ])
            .args(["--max-bandwidth", "32M", "--max-postcopy-bandwidth", "8M"])
            .arg("--control")
            .arg(&sock)
            .arg("--json")
            .arg(dir.path("r.json")),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let o = cli(&sock, &["start-postcopy"])?;
    check(
        o.status.success(),
        format!("start-postcopy\n{}", o.describe()),
    )?;
    let t = Instant::now();
    loop {
        let o = cli(&sock, &["pause"])?;
        if o.status.success() {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            format!("pause never applied\n{}", o.describe()),
        )?;
        std::thread::sleep(Duration::from_millis(50));
    }
    // Longer than the first reconnect backoffs: it must stay paused.
    std::thread::sleep(Duration::from_secs(3));
    let o = cli(&sock, &["status", "--json"])?;
    let v: Value = serde_json::from_str(&o.stdout).map_err(|e| format!("{e}: {}", o.describe()))?;
    check(
        text(&v, "status") == "postcopy-paused" && v["allowed"]["recover"] == true,
        format!("after pause: {} {}", v["status"], v["allowed"]),
    )?;
    let o = cli(&sock, &["recover"])?;
    check(o.status.success(), format!("recover\n{}", o.describe()))?;
    let out = demo.finish(Duration::from_secs(180))?;
    let r = report(&dir.path("r.json"))?;
    completed(&r, &out)?;
    let kinds: Vec<&str> = r["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    check(
        kinds.contains(&"pause") && kinds.contains(&"recover"),
        format!("events {kinds:?}"),
    )
}

/// An `incoming` with its control socket, waiting for a migration that
/// does not come (nothing connects to its port).
fn idle_destination(tag: &str) -> Result<(TempDir, tests::Running, std::path::PathBuf), String> {
    let dir = TempDir::new(tag);
    let sock = dir.path("dest.sock");
    let dest = start(
        postcopy()
            .args([
                "incoming",
                "--listen",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .arg("--control")
            .arg(&sock)
            .arg("--json")
            .arg(dir.path("dest.json")),
    );
    // Once the socket is there, the destination says what applies (a
    // moment after it binds the socket).
    let mut c = Conn::open(&sock)?;
    let t = Instant::now();
    loop {
        let v = ok(&c.call(json!({"cmd": "query"}), &mut Vec::new())?)?.clone();
        if v["allowed"]["cancel"] == true {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            format!("the idle destination never offered cancel: {v}"),
        )?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((dir, dest, sock))
}

/// `cancel` on a destination that waits for its source (the docs: cancel
/// applies there until the guest ran) ends it at once, cancelled. It used
/// to sit unanswered until the client gave up, and then cancelled the
/// next migration that arrived, whenever that was.
fn cancel_on_an_idle_destination_ends_it() -> TestResult {
    let (dir, dest, sock) = idle_destination("ctl-idle-cancel")?;
    let mut sub = Conn::open(&sock)?;
    ok(&sub.call(json!({"cmd": "subscribe"}), &mut Vec::new())?)?;
    // The answer comes although the destination ends at once (it used to
    // be cut by the process's end, as could the subscriber's `closed`).
    let o = cli(&sock, &["cancel"])?;
    check(o.status.success(), format!("cancel\n{}", o.describe()))?;
    let mut last = Value::Null;
    while let Ok(v) = sub.line() {
        last = v;
    }
    check(
        last["event"] == "closed",
        format!("the subscriber's last line: {last}"),
    )?;
    let d = dest.finish(Duration::from_secs(30))?;
    let r = report(&dir.path("dest.json"))?;
    check(
        text(&r, "status") == "cancelled" && !d.status.success(),
        format!(
            "destination after cancel: {}\n{}",
            r["status"],
            d.describe()
        ),
    )
}

/// Open file descriptors of process `pid`.
fn fds(pid: u32) -> Result<usize, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .map_err(|e| format!("/proc/{pid}/fd: {e}"))
}

/// Clients that subscribe and go, hundreds of them, on a supervisor that
/// has no events to send (a destination waiting for its source): each
/// subscription's thread and fd must go with its client. They stayed
/// until the next event, so a few thousand `postcopy watch` runs left the
/// destination unable to accept its migration ("Too many open files" at
/// the usual limit of 1024).
fn subscribers_that_leave_leave_nothing_behind() -> TestResult {
    let (_dir, mut dest, sock) = idle_destination("ctl-subs")?;
    let before = fds(dest.pid())?;
    for i in 0..300 {
        let mut c = Conn::open(&sock)?;
        ok(&c.call(json!({"cmd": "subscribe"}), &mut Vec::new())?)
            .map_err(|e| format!("subscription {i}: {e}"))?;
    }
    // The client threads notice their clients left; give them time.
    let t = Instant::now();
    loop {
        let now = fds(dest.pid())?;
        if now <= before + 4 {
            break;
        }
        check(
            t.elapsed() < Duration::from_secs(30),
            format!("{now} fds open after 300 subscribers left (before: {before})"),
        )?;
        std::thread::sleep(Duration::from_millis(200));
    }
    check(dest.running(), "the destination ended")?;
    let o = cli(&sock, &["status"])?;
    check(
        o.status.success() && o.stdout.contains("destination: setup"),
        format!("status after the subscribers\n{}", o.describe()),
    )
}
