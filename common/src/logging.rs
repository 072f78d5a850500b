//! Logging for every process: env_logger, each line tagged with the process's
//! role and pid so interleaved output from both hosts stays readable.

use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Starts logging for this process. `RUST_LOG` overrides the default (warn).
pub fn init(tag: &'static str) {
    START.get_or_init(Instant::now);
    let pid = std::process::id();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
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
