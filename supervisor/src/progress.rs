//! The live progress bar of `migrate`, `incoming` and `demo` (indicatif),
//! drawn from a [`Snapshot`]: phase, percent, pages pending, dirty rate,
//! bandwidth, ETA, and in postcopy the fault rate and latency. Drawn on
//! stderr at most 10 times a second, and only when both stdout and stderr
//! are terminals and `--quiet` was not given; it never goes into the JSON.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::snapshot::Snapshot;

/// Redraws per second at most.
const REDRAW_HZ: u8 = 10;

pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar on stderr, or none when `quiet` or not on a terminal.
    pub fn new(quiet: bool) -> Self {
        let on_terminal = std::io::stdout().is_terminal() && std::io::stderr().is_terminal();
        if quiet || !on_terminal {
            return Progress { bar: None };
        }
        let bar =
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(REDRAW_HZ));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>16} [{bar:24}] {percent:>3}% {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Progress { bar: Some(bar) }
    }

    /// True when it draws.
    pub fn enabled(&self) -> bool {
        self.bar.is_some()
    }

    /// Shows `s` (cheap: the bar redraws on its own clock).
    pub fn tick(&self, s: &Snapshot) {
        let Some(bar) = &self.bar else { return };
        if s.total_pages > 0 {
            bar.set_length(s.total_pages);
            bar.set_position(s.total_pages.saturating_sub(s.pending_pages));
        }
        bar.set_prefix(s.status.clone());
        bar.set_message(line(s));
    }

    /// Removes the bar (before the summary is printed).
    pub fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The text after the bar.
pub fn line(s: &Snapshot) -> String {
    let mut parts = vec![format!("{} pending", s.pending_pages)];
    if let Some(d) = s.dirty_pages_per_s.filter(|_| s.status == "active") {
        parts.push(format!("dirty {d:.0} pg/s"));
    }
    parts.push(format!("{:.0} Mbit/s", s.bandwidth_mbps));
    if let Some(eta) = s.eta_ms {
        parts.push(format!(
            "ETA {}",
            eta_text(Duration::from_secs_f64(eta / 1e3))
        ));
    }
    if s.status.starts_with("postcopy") {
        if s.side == "source" {
            parts.push(format!("{:.0} req/s", s.fault_rate));
        } else {
            parts.push(format!("{:.0} faults/s", s.fault_rate));
            if let Some(l) = s.fault_latency_us.as_ref().filter(|l| l.count > 0) {
                parts.push(format!("latency p50 {} µs p99 {} µs", l.p50, l.p99));
            }
        }
    }
    parts.push(s.phase.clone());
    parts.join(" · ")
}

fn eta_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.1} s")
    } else {
        format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_says_what_the_phase_needs() {
        let mut s = Snapshot {
            side: "destination".into(),
            status: "postcopy-active".into(),
            phase: "running".into(),
            pending_pages: 42,
            bandwidth_mbps: 900.0,
            eta_ms: Some(75_000.0),
            fault_rate: 120.0,
            fault_latency_us: Some(common::msg::LatencySummary {
                count: 3,
                p50: 40,
                p99: 300,
                ..Default::default()
            }),
            ..Default::default()
        };
        let l = line(&s);
        for want in [
            "42 pending",
            "900 Mbit/s",
            "ETA 1m15s",
            "120 faults/s",
            "p99 300 µs",
        ] {
            assert!(l.contains(want), "{want:?} missing from {l:?}");
        }
        s.status = "active".into();
        s.dirty_pages_per_s = Some(7.0);
        let l = line(&s);
        assert!(l.contains("dirty 7 pg/s") && !l.contains("faults/s"), "{l}");
        // Not a terminal here (tests run with captured output).
        assert!(!Progress::new(false).enabled() || std::io::stderr().is_terminal());
        assert!(!Progress::new(true).enabled());
    }
}
