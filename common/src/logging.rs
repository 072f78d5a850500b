//! Logging for every process: env_logger, each line tagged with the host
//! and role of the process and its pid (`[  1.234 src/page-server 4242
//! INFO] ...`), so interleaved output from both hosts stays readable.
//!
//! `RUST_LOG` takes env_logger's directives, and also directives that name
//! a process instead of a module: `page-server=debug` (that role on either
//! host), `dst/fault-handler=trace`, `src/*=info`, `dst=debug` (every
//! process of one host), `*/supervisor=info`. Such a directive sets the
//! level of everything logged in the processes it names; module
//! directives (`fault_handler::handler=trace`) still apply everywhere.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static HOST: OnceLock<String> = OnceLock::new();

/// The environment variable a supervisor sets for the processes it starts:
/// which host they run for (`src` or `dst`).
pub const HOST_ENV: &str = "POSTCOPY_LOG_HOST";

/// The process names a `RUST_LOG` directive may select.
const ROLES: [&str; 5] = [
    "supervisor",
    "postcopy-guest",
    "ram-sender",
    "page-server",
    "fault-handler",
];

/// Starts logging for a supervisor on `host` (`src`/`dst`): processes it
/// starts afterwards log as that host too. Call before any thread starts.
pub fn init_supervisor(host: &'static str) {
    std::env::set_var(HOST_ENV, host);
    init(host, "supervisor");
}

/// Starts logging for a role (its host comes from [`HOST_ENV`]).
pub fn init_role(role: &'static str) {
    let host = std::env::var(HOST_ENV).unwrap_or_else(|_| "?".into());
    init(&host, role);
}

/// The host this process logs as (`src`, `dst`, `?` for a role started
/// without one), once logging started.
pub fn host() -> &'static str {
    HOST.get().map(String::as_str).unwrap_or("?")
}

fn init(host: &str, role: &'static str) {
    START.get_or_init(Instant::now);
    let host = HOST.get_or_init(|| host.to_string()).clone();
    let spec = std::env::var("RUST_LOG").unwrap_or_default();
    let filter = filter_for(&spec, &host, role);
    let pid = std::process::id();
    let tag = format!("{host}/{role}");
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format(move |buf, record| {
            let t = START
                .get()
                .map(|s| s.elapsed().as_secs_f64())
                .unwrap_or(0.0);
            writeln!(
                buf,
                "[{t:9.3} {tag} {pid} {}] {}",
                record.level(),
                record.args()
            )
        })
        .try_init();
}

fn is_level(s: &str) -> bool {
    matches!(
        s.to_ascii_lowercase().as_str(),
        "off" | "error" | "warn" | "info" | "debug" | "trace"
    )
}

/// Whether `selector` names processes (`Some`), and if so whether it names
/// this one; `None` for a module path.
fn selects(selector: &str, host: &str, role: &str) -> Option<bool> {
    let part = |want: &str, got: &str| want == "*" || want == got;
    if let Some((h, r)) = selector.split_once('/') {
        return Some(part(h, host) && part(r, role));
    }
    if ROLES.contains(&selector) {
        return Some(selector == role);
    }
    if matches!(selector, "src" | "dst") {
        return Some(selector == host);
    }
    None
}

/// The env_logger filter of the process `host`/`role` out of a `RUST_LOG`
/// value (see the module docs); `warn` when it sets no level.
pub fn filter_for(spec: &str, host: &str, role: &str) -> String {
    let mut global: Option<&str> = None;
    let mut mine: Option<&str> = None;
    let mut modules: Vec<&str> = Vec::new();
    for d in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let (selector, level) = match d.split_once('=') {
            Some((s, l)) => (s.trim(), Some(l.trim())),
            None => (d, None),
        };
        if level.is_none() && is_level(selector) {
            global = Some(selector);
            continue;
        }
        match selects(selector, host, role) {
            // A process named without a level: everything, as env_logger
            // does for a module named alone.
            Some(true) => mine = Some(level.unwrap_or("trace")),
            Some(false) => {}
            None => modules.push(d),
        }
    }
    let level = mine.or(global).unwrap_or("warn");
    let mut out = vec![level];
    out.extend(modules);
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_directives_pick_their_processes() {
        let f = |spec, host, role| filter_for(spec, host, role);
        assert_eq!(f("", "src", "page-server"), "warn");
        assert_eq!(f("info", "src", "page-server"), "info");
        assert_eq!(f("info,page-server=debug", "src", "page-server"), "debug");
        assert_eq!(f("info,page-server=debug", "src", "ram-sender"), "info");
        assert_eq!(
            f("dst/fault-handler=trace", "dst", "fault-handler"),
            "trace"
        );
        assert_eq!(f("dst/fault-handler=trace", "src", "fault-handler"), "warn");
        assert_eq!(f("src/*=info", "src", "ram-sender"), "info");
        assert_eq!(f("src/*=info", "dst", "ram-sender"), "warn");
        assert_eq!(f("*/supervisor=debug", "dst", "supervisor"), "debug");
        assert_eq!(f("dst=debug", "dst", "postcopy-guest"), "debug");
        assert_eq!(f("dst=debug", "src", "postcopy-guest"), "warn");
        assert_eq!(f("fault-handler", "dst", "fault-handler"), "trace");
        // Module directives pass through to every process.
        assert_eq!(
            f(
                "error,common::uffd=debug,ram-sender=info",
                "src",
                "ram-sender"
            ),
            "info,common::uffd=debug"
        );
        assert_eq!(
            f("fault_handler::handler=trace", "dst", "fault-handler"),
            "warn,fault_handler::handler=trace"
        );
    }
}
