//! `postcopy`: live migration with precopy then postcopy. See README.md.

use clap::Parser;
use std::process::ExitCode;

use serde_json::json;
use supervisor::cli::{Cli, Cmd, SourceOpts};
use supervisor::report::{Report, ReportFile};
use supervisor::{client, demo, dest, source};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let tag: &'static str = match std::env::var("POSTCOPY_LOG_TAG").ok().as_deref() {
        Some("dst") => "dst",
        _ => match cli.cmd {
            Cmd::Incoming(_) => "dst",
            _ => "src",
        },
    };
    common::logging::init(tag);
    let role_user = match &cli.cmd {
        Cmd::Demo(a) => a.mig.role_user.as_deref(),
        Cmd::Migrate(a) => a.mig.role_user.as_deref(),
        Cmd::Incoming(a) => a.role_user.as_deref(),
        _ => None,
    };
    if matches!(cli.cmd, Cmd::Demo(_) | Cmd::Migrate(_) | Cmd::Incoming(_)) {
        match supervisor::spawn::resolve_role_user(role_user) {
            Ok(u) => supervisor::spawn::set_role_user(u),
            Err(e) => return usage_error(&e),
        }
    }
    match cli.cmd {
        Cmd::Demo(args) => match SourceOpts::from_args(&args.guest, &args.mig)
            .and_then(|opts| Ok((report_file(opts.json.as_deref())?, opts)))
            .and_then(|(json, opts)| Ok((demo::demo(&args, opts)?, json)))
        {
            Ok((report, json)) => conclude(&report, json, true),
            Err(e) => usage_error(&e),
        },
        Cmd::Migrate(args) => match SourceOpts::from_args(&args.guest, &args.mig)
            .and_then(|opts| Ok((report_file(opts.json.as_deref())?, opts)))
        {
            Ok((json, mut opts)) => {
                opts.keep_guest = args.keep_guest;
                let report = source::migrate(opts, args.to.clone(), &[]);
                conclude(&report, json, true)
            }
            Err(e) => usage_error(&e),
        },
        Cmd::Incoming(args) => {
            let json = match report_file(args.json.as_deref()) {
                Ok(j) => j,
                Err(e) => return usage_error(&e),
            };
            let quiet = args.quiet;
            let report = dest::incoming(args);
            conclude(&report, json, !quiet)
        }
        Cmd::Recover(a) => client::command(
            "recover",
            &a.client,
            json!({"cmd": "recover", "to": a.to}),
            "recovery requested",
        ),
        Cmd::StartPostcopy(a) => client::command(
            "start-postcopy",
            &a,
            json!({"cmd": "start-postcopy"}),
            "postcopy requested",
        ),
        Cmd::Status(a) => client::status(&a.client, a.json),
        Cmd::Watch(a) => client::watch(&a),
        Cmd::Cancel(a) => {
            client::command("cancel", &a, json!({"cmd": "cancel"}), "cancel requested")
        }
        Cmd::Pause(a) => client::command("pause", &a, json!({"cmd": "pause"}), "paused"),
        Cmd::Set(a) => client::command(
            "set",
            &a.client,
            json!({"cmd": "set", "key": a.key, "value": a.value}),
            &format!("{} set to {}", a.key, a.value),
        ),
        Cmd::Retry(a) => client::command(
            "retry",
            &a.client,
            json!({"cmd": "retry", "to": a.to}),
            "migrating again",
        ),
        Cmd::Quit(a) => client::command("quit", &a, json!({"cmd": "quit"}), "quitting"),
    }
}

/// A report path that cannot be written is a usage error now, not a lost
/// report after the whole migration: the file is opened and written here,
/// and the report goes through that same handle at the end.
fn report_file(path: Option<&std::path::Path>) -> Result<Option<ReportFile>, String> {
    path.map(ReportFile::create).transpose()
}

fn usage_error(e: &str) -> ExitCode {
    eprintln!("postcopy: {e}");
    ExitCode::from(2)
}

fn conclude(report: &Report, json: Option<ReportFile>, summary: bool) -> ExitCode {
    if summary {
        print!("{}", report.summary());
    }
    if let Some(mut file) = json {
        if let Err(e) = file.write(report) {
            eprintln!("postcopy: cannot write {}: {e}", file.path().display());
            return ExitCode::FAILURE;
        }
    }
    if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
