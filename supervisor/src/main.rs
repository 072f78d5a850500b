//! `postcopy`: live migration with precopy then postcopy. See README.md.

use clap::Parser;
use std::process::ExitCode;

use supervisor::cli::{Cli, Cmd, SourceOpts};
use supervisor::report::Report;
use supervisor::{ctlsock, demo, dest, source};

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
        Cmd::StartPostcopy(_) => None,
    };
    if !matches!(cli.cmd, Cmd::StartPostcopy(_)) {
        match supervisor::spawn::resolve_role_user(role_user) {
            Ok(u) => supervisor::spawn::set_role_user(u),
            Err(e) => return usage_error(&e),
        }
    }
    match cli.cmd {
        Cmd::Demo(args) => match SourceOpts::from_args(&args.guest, &args.mig)
            .and_then(|opts| check_json(opts.json.as_deref()).map(|()| opts))
            .and_then(|opts| demo::demo(&args, opts.clone()).map(|r| (r, opts)))
        {
            Ok((report, opts)) => conclude(&report, opts.json.as_deref(), true),
            Err(e) => usage_error(&e),
        },
        Cmd::Migrate(args) => match SourceOpts::from_args(&args.guest, &args.mig)
            .and_then(|opts| check_json(opts.json.as_deref()).map(|()| opts))
        {
            Ok(opts) => {
                let json = opts.json.clone();
                let report = source::migrate(opts, args.to.clone(), &[]);
                conclude(&report, json.as_deref(), true)
            }
            Err(e) => usage_error(&e),
        },
        Cmd::Incoming(args) => {
            if let Err(e) = check_json(args.json.as_deref()) {
                return usage_error(&e);
            }
            let json = args.json.clone();
            let quiet = args.quiet;
            let report = dest::incoming(args);
            conclude(&report, json.as_deref(), !quiet)
        }
        Cmd::StartPostcopy(args) => {
            match ctlsock::send_command(args.socket.as_deref(), "start-postcopy") {
                Ok(_) => {
                    println!("postcopy requested");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("postcopy start-postcopy: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A report path that cannot be written is a usage error now, not a lost
/// report after the whole migration.
fn check_json(path: Option<&std::path::Path>) -> Result<(), String> {
    if let Some(p) = path {
        // The report is written beside it first, then renamed over it.
        let tmp = p.with_extension("json.tmp");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&tmp)
            .map_err(|e| format!("--json {}: {e}", p.display()))?;
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(())
}

fn usage_error(e: &str) -> ExitCode {
    eprintln!("postcopy: {e}");
    ExitCode::from(2)
}

fn conclude(report: &Report, json: Option<&std::path::Path>, summary: bool) -> ExitCode {
    if summary {
        print!("{}", report.summary());
    }
    if let Some(path) = json {
        if let Err(e) = report.write_json(path) {
            eprintln!("postcopy: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
