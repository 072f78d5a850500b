//! The command-line clients of the control socket (docs/control.md):
//! `postcopy status | watch | start-postcopy | cancel | pause | recover |
//! set | retry | quit`. Each finds the only migration running on this host
//! unless `--control` names one.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::cli::ClientArgs;
use crate::ctlsock::{self, Client};

fn connect(args: &ClientArgs) -> Result<Client, String> {
    let path = ctlsock::find(args.control.as_deref(), args.side())?;
    Client::connect(&path)
}

fn fail(what: &str, e: &str) -> ExitCode {
    eprintln!("postcopy {what}: {}", common::peer_text::escape(e));
    ExitCode::FAILURE
}

/// Sends one command; prints `done` when it was taken.
pub fn command(what: &str, args: &ClientArgs, request: Value, done: &str) -> ExitCode {
    match connect(args).and_then(|mut c| c.call(request)) {
        Ok(_) => {
            println!("{done}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(what, &e),
    }
}

/// `postcopy status [--json]`.
pub fn status(args: &ClientArgs, as_json: bool) -> ExitCode {
    match connect(args).and_then(|mut c| c.call(json!({"cmd": "query"}))) {
        Ok(v) if as_json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            print!("{}", describe(&v));
            ExitCode::SUCCESS
        }
        Err(e) => fail("status", &e),
    }
}

fn f64_at(v: &Value, path: &[&str]) -> Option<f64> {
    let mut at = v;
    for k in path {
        at = at.get(k)?;
    }
    at.as_f64()
}

fn str_at<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("?")
}

/// The human form of a `query` answer: state, progress, what applies now.
pub fn describe(v: &Value) -> String {
    let mut out = String::new();
    let side = str_at(v, "side");
    out.push_str(&format!(
        "{side}: {} (state {}), {:.1} s\n",
        str_at(v, "status"),
        str_at(v, "state"),
        f64_at(v, &["elapsed_ms"]).unwrap_or(0.0) / 1e3
    ));
    if let Some(id) = v.get("migration_id").and_then(Value::as_str) {
        if !id.is_empty() {
            out.push_str(&format!("  migration {id}\n"));
        }
    }
    let mib = |b: f64| b / (1u64 << 20) as f64;
    if let Some(live) = v.get("live") {
        let pending = f64_at(live, &["pending_pages"]).unwrap_or(0.0);
        let total = f64_at(live, &["total_pages"]).unwrap_or(0.0);
        out.push_str(&format!(
            "  {:.1}% of {} pages; {} pending; dirty {:.0} pages/s; {:.0} Mbit/s",
            f64_at(live, &["percent"]).unwrap_or(0.0),
            total as u64,
            pending as u64,
            f64_at(live, &["dirty_pages_per_s"]).unwrap_or(0.0),
            f64_at(live, &["bandwidth_mbps"]).unwrap_or(0.0),
        ));
        match f64_at(live, &["eta_ms"]) {
            Some(eta) => out.push_str(&format!("; ETA {:.1} s\n", eta / 1e3)),
            None => out.push('\n'),
        }
    }
    let sent = f64_at(v, &["precopy_bytes"]).unwrap_or(0.0)
        + f64_at(v, &["downtime_bytes"]).unwrap_or(0.0)
        + f64_at(v, &["postcopy_bytes"]).unwrap_or(0.0);
    out.push_str(&format!(
        "  sent {:.1} MiB in {} pages, {} dirty syncs\n",
        mib(sent),
        f64_at(v, &["pages_sent"]).unwrap_or(0.0) as u64,
        f64_at(v, &["dirty_sync_count"]).unwrap_or(0.0) as u64
    ));
    if let Some(d) = f64_at(v, &["downtime_ms"]) {
        out.push_str(&format!("  downtime {d:.1} ms\n"));
    }
    if let Some(live) = v.get("live") {
        let requests = f64_at(live, &["postcopy_requests"]).unwrap_or(0.0);
        if requests > 0.0 {
            out.push_str(&format!(
                "  postcopy: {} page requests, {:.0}/s",
                requests as u64,
                f64_at(live, &["fault_rate"]).unwrap_or(0.0)
            ));
            match (
                f64_at(live, &["fault_latency_us", "p50"]),
                f64_at(live, &["fault_latency_us", "p99"]),
            ) {
                (Some(p50), Some(p99)) => out.push_str(&format!(
                    "; fault latency p50 {p50:.0} µs p99 {p99:.0} µs\n"
                )),
                _ => out.push('\n'),
            }
        }
    }
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        out.push_str(&format!("  error: {}\n", common::peer_text::escape(e)));
    }
    if let Some(Value::Object(allowed)) = v.get("allowed") {
        let now: Vec<&str> = allowed
            .iter()
            .filter(|(_, why)| why.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
            .collect();
        out.push_str(&format!(
            "  applies now: {}\n",
            if now.is_empty() {
                "nothing".to_string()
            } else {
                now.join(", ").replace('_', "-")
            }
        ));
    }
    out
}

/// `postcopy watch`: the live view, redrawn twice a second, with each
/// event on a line of its own, until the migration ends.
pub fn watch(args: &ClientArgs) -> ExitCode {
    let path = match ctlsock::find(args.control.as_deref(), args.side()) {
        Ok(p) => p,
        Err(e) => return fail("watch", &e),
    };
    let mut events = match Client::connect(&path).and_then(|mut c| {
        c.call(json!({"cmd": "subscribe"}))?;
        c.wait_forever();
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => return fail("watch", &e),
    };
    // Events come on their own connection, read by their own thread.
    let (tx, rx) = std::sync::mpsc::channel::<Option<Value>>();
    std::thread::spawn(move || loop {
        match events.next_line() {
            Ok(Some(v)) => {
                if tx.send(Some(v)).is_err() {
                    return;
                }
            }
            _ => {
                let _ = tx.send(None);
                return;
            }
        }
    });
    let tty = std::io::stdout().is_terminal();
    let mut query = match Client::connect(&path) {
        Ok(c) => c,
        Err(e) => return fail("watch", &e),
    };
    let mut last_line = String::new();
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    // The supervisor closes the socket when it ends: that, not a final
    // status, ends the watch (a `--keep-guest` source shows a final status
    // while it settles whether it keeps its guest, and then waits on).
    let mut last_status = String::new();
    let ended = |tty: bool, status: &str| {
        if tty {
            println!();
        }
        match status {
            "completed" | "failed" | "cancelled" => println!("the migration ended: {status}"),
            _ => println!("the migration's control socket closed"),
        }
        ExitCode::SUCCESS
    };
    loop {
        while let Ok(ev) = rx.try_recv() {
            let Some(ev) = ev else {
                return ended(tty, &last_status);
            };
            if tty {
                print!("\r\x1b[2K");
            }
            println!(
                "[{:>9.1} ms] {}: {}",
                f64_at(&ev, &["t_ms"]).unwrap_or(0.0),
                str_at(&ev, "event"),
                common::peer_text::escape(str_at(&ev, "detail"))
            );
            last_line.clear();
        }
        if last_draw.elapsed() >= Duration::from_millis(500) {
            last_draw = Instant::now();
            let v = match query.call(json!({"cmd": "query"})) {
                Ok(v) => v,
                Err(_) => return ended(tty, &last_status),
            };
            let text = describe(&v);
            let line: String = text
                .lines()
                .take(2)
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" | ");
            if tty {
                print!("\r\x1b[2K{line}");
            } else if line != last_line {
                println!("{line}");
            }
            last_line = line;
            let _ = std::io::stdout().flush();
            last_status = str_at(&v, "status").to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
