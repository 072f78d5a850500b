//! `postcopy report r.json [other.json] --plot t.svg|t.png`: the report's
//! timeline as four charts over one time axis (plotters): bandwidth,
//! pending pages, faults per second and fault latency, with the state
//! changes and other events of each report marked. Two reports of one
//! migration (source and destination) share the axis: each report's
//! `started_at_unix_ms` places its clock (the hosts' wall clocks must
//! agree, as on one machine or with NTP).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

use crate::report::Report;
use crate::snapshot::TimelineSample;

/// Chart size in pixels.
const SIZE: (u32, u32) = (1400, 1300);

/// Where the chart's font is looked for (plotters draws text with a
/// TrueType font it is given; Debian's fonts-dejavu-core holds the first).
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
/// An environment variable naming another font file.
pub const FONT_ENV: &str = "POSTCOPY_FONT";

#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("--plot {0}: the file name must end in .svg or .png")]
    Format(String),
    #[error("no timeline to plot in {0}: it was written by a version without one, or the migration ended before it started")]
    NoTimeline(String),
    #[error("the two reports are of different migrations ({0} and {1})")]
    Mismatch(String, String),
    #[error("both reports are the {0}'s: give the source's and the destination's")]
    SameSide(String),
    #[error("no TrueType font for the chart's text (looked at ${FONT_ENV} and {}); install fonts-dejavu-core or set {FONT_ENV}=FILE.ttf", FONT_PATHS.join(", "))]
    NoFont,
    #[error("font {0}: {1}")]
    BadFont(String, String),
    #[error("drawing {0}: {1}")]
    Draw(String, String),
}

/// One line of a chart.
struct Line {
    label: String,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// A vertical mark: an event of one report.
struct Mark {
    x: f64,
    label: String,
    color: RGBColor,
    /// Which host's label rows it goes in (0: the bottom ones).
    band: usize,
}

const SRC: RGBColor = RGBColor(31, 119, 180);
const DST: RGBColor = RGBColor(214, 95, 14);
const SRC_LIGHT: RGBColor = RGBColor(120, 170, 215);
const DST_LIGHT: RGBColor = RGBColor(240, 160, 100);
const ALERT: RGBColor = RGBColor(200, 30, 30);

/// Draws `reports` (one, or the source's and the destination's of one
/// migration) to `path` (`.svg` or `.png`).
pub fn plot(reports: &[&Report], path: &Path) -> Result<(), PlotError> {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("svg" | "png")) {
        return Err(PlotError::Format(name));
    }
    if let [a, b] = reports {
        if a.migration_id != b.migration_id {
            return Err(PlotError::Mismatch(
                a.migration_id.clone(),
                b.migration_id.clone(),
            ));
        }
        if a.side == b.side {
            return Err(PlotError::SameSide(a.side.clone()));
        }
    }
    for r in reports {
        if r.timeline.is_empty() {
            return Err(PlotError::NoTimeline(format!("the {}'s report", r.side)));
        }
    }
    load_font()?;
    let draw_err = |e: String| PlotError::Draw(name.clone(), e);
    if ext.as_deref() == Some("svg") {
        let root = SVGBackend::new(path, SIZE).into_drawing_area();
        draw(&root, reports).map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))
    } else {
        let root = BitMapBackend::new(path, SIZE).into_drawing_area();
        draw(&root, reports).map_err(|e| draw_err(e.to_string()))?;
        root.present().map_err(|e| draw_err(e.to_string()))
    }
}

/// Registers the chart font once per process.
fn load_font() -> Result<(), PlotError> {
    static LOADED: std::sync::OnceLock<Result<(), PlotError>> = std::sync::OnceLock::new();
    let r = LOADED.get_or_init(|| {
        let candidates: Vec<String> = std::env::var(FONT_ENV)
            .ok()
            .into_iter()
            .chain(FONT_PATHS.iter().map(|p| p.to_string()))
            .collect();
        let Some((path, bytes)) = candidates
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|b| (p, b)))
        else {
            return Err(PlotError::NoFont);
        };
        // plotters keeps fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        for style in [FontStyle::Normal, FontStyle::Bold] {
            register_font("sans-serif", style, bytes)
                .map_err(|_| PlotError::BadFont(path.clone(), "not a TrueType font".into()))?;
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(()),
        Err(PlotError::BadFont(p, e)) => Err(PlotError::BadFont(p.clone(), e.clone())),
        Err(_) => Err(PlotError::NoFont),
    }
}

/// Seconds on the common axis of a report's clock `t_ms`.
fn axis(r: &Report, t0: f64, t_ms: f64) -> f64 {
    (r.started_at_unix_ms - t0 + t_ms) / 1e3
}

fn host(r: &Report) -> &'static str {
    if r.side == "source" {
        "source"
    } else {
        "destination"
    }
}

/// Per-second rate of a running total between samples.
fn rate(r: &Report, t0: f64, get: impl Fn(&TimelineSample) -> Option<u64>) -> Vec<(f64, f64)> {
    r.timeline
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (get(&w[0])?, get(&w[1])?);
            let dt = (w[1].t_ms - w[0].t_ms) / 1e3;
            (dt > 0.0).then(|| (axis(r, t0, w[1].t_ms), b.saturating_sub(a) as f64 / dt))
        })
        .collect()
}

/// Short names of the states an event leads to: "precopy -> stopping"
/// gives "stopping".
fn state_to(detail: &str) -> &str {
    detail.rsplit(" -> ").next().unwrap_or(detail)
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    reports: &[&Report],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let t0 = reports
        .iter()
        .map(|r| r.started_at_unix_ms)
        .fold(f64::INFINITY, f64::min);
    let x_max = reports
        .iter()
        .flat_map(|r| {
            r.timeline
                .iter()
                .map(|s| s.t_ms)
                .chain(r.events.iter().map(|e| e.t_ms))
                .map(|t| axis(r, t0, t))
        })
        .fold(0.1f64, f64::max)
        * 1.02;
    let first = reports[0];
    let title = format!(
        "postcopy migration {}: {} guest, {} MiB, {} vCPU, {} ({})",
        first.migration_id.get(..8).unwrap_or(&first.migration_id),
        first.guest,
        first.mem_bytes >> 20,
        first.vcpus,
        first.status,
        reports
            .iter()
            .map(|r| format!("{}'s report", host(r)))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let root = root
        .margin(10, 0, 0, 0)
        .titled(&title, ("sans-serif", 26))?;
    let (strip, charts) = root.split_vertically(LABEL_STRIP);
    let panels = charts.split_evenly((4, 1));

    let line_color = |r: &Report, second: bool| match (r.side.as_str(), second) {
        ("source", false) => SRC,
        ("source", true) => SRC_LIGHT,
        (_, false) => DST,
        (_, true) => DST_LIGHT,
    };
    let mut marks: Vec<Mark> = Vec::new();
    for (host_index, r) in reports.iter().enumerate() {
        // Changes within 3 % of the axis share one label (a switchover
        // passes several states in milliseconds): "first › … › last".
        let prefix = if r.side == "source" { "src" } else { "dst" };
        let mut group: Vec<(f64, String, RGBColor)> = Vec::new();
        let flush = |group: &mut Vec<(f64, String, RGBColor)>, marks: &mut Vec<Mark>| {
            let Some((x, first, color)) = group.first().cloned() else {
                return;
            };
            let last = &group[group.len() - 1].1;
            let label = match group.len() {
                1 => first,
                2 => format!("{first} › {last}"),
                _ => format!("{first} › … › {last}"),
            };
            marks.push(Mark {
                x,
                label: format!("{prefix}: {label}"),
                color,
                band: reports.len() - 1 - host_index,
            });
            group.clear();
        };
        for e in &r.events {
            let x = axis(r, t0, e.t_ms);
            let (label, color) = if e.kind == "state" {
                (state_to(&e.detail).to_string(), line_color(r, false))
            } else {
                (format!("{} ({})", e.kind, e.detail), ALERT)
            };
            let joins = group
                .first()
                .is_some_and(|(gx, _, gc)| x - gx < x_max * 0.03 && *gc == color);
            if !joins {
                flush(&mut group, &mut marks);
            }
            group.push((x, label, color));
        }
        flush(&mut group, &mut marks);
    }

    labels(&strip, x_max, &marks)?;

    // 1. Bandwidth.
    let bw: Vec<Line> = reports
        .iter()
        .map(|r| Line {
            label: format!(
                "{} {} (Mbit/s)",
                host(r),
                if r.side == "source" {
                    "sent"
                } else {
                    "received"
                }
            ),
            color: line_color(r, false),
            points: r
                .timeline
                .iter()
                .skip(1)
                .map(|s| (axis(r, t0, s.t_ms), s.bandwidth_mbps))
                .collect(),
        })
        .collect();
    panel(
        &panels[0],
        "bandwidth (Mbit/s)",
        false,
        x_max,
        &bw,
        &marks,
        SeriesLabelPosition::UpperLeft,
        "",
    )?;

    // 2. Pending pages.
    let pending: Vec<Line> = reports
        .iter()
        .map(|r| Line {
            label: format!(
                "{}: {}",
                host(r),
                if r.side == "source" {
                    "pages left to send"
                } else {
                    "pages not yet received"
                }
            ),
            color: line_color(r, false),
            points: r
                .timeline
                .iter()
                .map(|s| (axis(r, t0, s.t_ms), s.pending_pages as f64))
                .collect(),
        })
        .collect();
    panel(
        &panels[1],
        "pending (pages)",
        false,
        x_max,
        &pending,
        &marks,
        SeriesLabelPosition::UpperRight,
        "",
    )?;

    // 3. Faults per second (the source counts page requests).
    let faults: Vec<Line> = reports
        .iter()
        .map(|r| {
            if r.side == "source" {
                Line {
                    label: "source: page requests read (1/s)".into(),
                    color: line_color(r, false),
                    points: rate(r, t0, |s| Some(s.requests)),
                }
            } else {
                Line {
                    label: "destination: faults (1/s)".into(),
                    color: line_color(r, false),
                    points: rate(r, t0, |s| s.faults),
                }
            }
        })
        .filter(|l| l.points.iter().any(|p| p.1 > 0.0))
        .collect();
    panel(
        &panels[2],
        "faults (1/s)",
        false,
        x_max,
        &faults,
        &marks,
        SeriesLabelPosition::UpperLeft,
        "no faults: the guest never waited for a page",
    )?;

    // 4. Fault latency of each interval, log10 scale.
    let mut latency = Vec::new();
    for r in reports.iter().filter(|r| r.side == "destination") {
        for (name, second, get) in [
            (
                "p50",
                false,
                (|l: &crate::snapshot::WindowLatency| l.p50) as fn(&_) -> u64,
            ),
            ("p99", true, |l| l.p99),
        ] {
            latency.push(Line {
                label: format!("destination: fault latency {name} per 50 ms (µs)"),
                color: line_color(r, second),
                points: r
                    .timeline
                    .iter()
                    .filter_map(|s| {
                        let l = s.latency_us.as_ref()?;
                        Some((axis(r, t0, s.t_ms), (get(l).max(1) as f64).log10()))
                    })
                    .collect(),
            });
        }
    }
    latency.retain(|l| !l.points.is_empty());
    panel(
        &panels[3],
        "fault latency (µs, log scale)",
        true,
        x_max,
        &latency,
        &marks,
        SeriesLabelPosition::UpperLeft,
        if reports.iter().any(|r| r.side == "destination") {
            "no faults: the guest never waited for a page"
        } else {
            "fault latency is measured on the destination: give its report too"
        },
    )?;
    Ok(())
}

/// About how wide a character of the labels is, pixels.
const CHAR_PX: f64 = 7.8;
/// Height of the strip above the charts that names the marks, pixels.
const LABEL_STRIP: u32 = 132;
/// Label rows per host.
const ROWS: usize = 3;
/// Left and right margins of the charts (the strip lines up with them).
const Y_LABELS: u32 = 90;
const MARGIN_LEFT: u32 = 12;
const MARGIN_RIGHT: u32 = 28;

/// The names of the marks, above the charts, on the charts' time axis:
/// [`ROWS`] rows per host, each label starting at its mark, or ending
/// there when it would collide or run past the right edge.
fn labels<DB: DrawingBackend>(
    strip: &DrawingArea<DB, Shift>,
    x_max: f64,
    marks: &[Mark],
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let mut chart = ChartBuilder::on(strip)
        .margin_left(MARGIN_LEFT + Y_LABELS)
        .margin_right(MARGIN_RIGHT)
        .build_cartesian_2d(0.0..x_max, 0.0..(2 * ROWS) as f64)?;
    // Where each row is taken already, in axis units; a label goes in the
    // first of its host's rows where it fits, starting at its mark, or
    // else ending there.
    let per_px = x_max / f64::from(SIZE.0 - MARGIN_LEFT - MARGIN_RIGHT - Y_LABELS);
    let mut taken: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 2 * ROWS];
    for m in marks {
        let width = m.label.chars().count() as f64 * CHAR_PX * per_px;
        let free = |row: &Vec<(f64, f64)>, a: f64, b: f64| {
            row.iter()
                .all(|&(x0, x1)| b + 4.0 * per_px < x0 || a > x1 + 4.0 * per_px)
        };
        let rows: Vec<usize> = (0..ROWS).rev().map(|r| ROWS * m.band + r).collect();
        let mut choice = None;
        'rows: for right in [false, true] {
            let (a, b) = if right {
                (m.x - width, m.x)
            } else {
                (m.x, m.x + width)
            };
            if a < 0.0 || b > x_max {
                continue;
            }
            for &r in &rows {
                if free(&taken[r], a, b) {
                    choice = Some((r, right, a, b));
                    break 'rows;
                }
            }
        }
        let (r, right, a, b) =
            choice.unwrap_or((rows[0], m.x + width > x_max, m.x - width, m.x + width));
        taken[r].push((a, b));
        let row = r as f64;
        let style = ("sans-serif", 15).into_font().color(&m.color).pos(Pos::new(
            if right { HPos::Right } else { HPos::Left },
            VPos::Bottom,
        ));
        chart.draw_series(std::iter::once(Text::new(
            m.label.clone(),
            (m.x, row),
            style,
        )))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(m.x, 0.0), (m.x, row)],
            m.color.mix(0.55).stroke_width(1),
        )))?;
    }
    Ok(())
}

/// One chart: `lines` over time (legend at `legend`), `marks` as vertical
/// lines, `empty` said when there is nothing to draw. `log`: the
/// values are log10 of the quantity and the axis says so.
#[allow(clippy::too_many_arguments)]
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    y_desc: &str,
    log: bool,
    x_max: f64,
    lines: &[Line],
    marks: &[Mark],
    legend: SeriesLabelPosition,
    empty: &str,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let top = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let (y_min, y_max) = if log {
        (0.0, top.ceil().max(1.0) + 0.5)
    } else {
        (0.0, if top > 0.0 { top * 1.25 } else { 1.0 })
    };
    let mut chart = ChartBuilder::on(area)
        .margin_left(MARGIN_LEFT)
        .margin_right(MARGIN_RIGHT)
        .margin_top(8)
        .x_label_area_size(44)
        .y_label_area_size(Y_LABELS)
        .build_cartesian_2d(0.0..x_max, y_min..y_max)?;
    let decades = (y_max - y_min).floor() as usize + 1;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x:.1}"))
        .y_label_formatter(&|y| {
            if log {
                let v = 10f64.powf(*y);
                if v >= 1e6 {
                    format!("{:.0} s", v / 1e6)
                } else if v >= 1e3 {
                    format!("{:.0} ms", v / 1e3)
                } else {
                    format!("{v:.0} µs")
                }
            } else if *y >= 1e6 {
                format!("{:.1}M", y / 1e6)
            } else if *y >= 1e4 {
                format!("{:.0}k", y / 1e3)
            } else {
                format!("{y:.0}")
            }
        })
        .y_labels(if log { decades } else { 6 })
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.08))
        .draw()?;
    for m in marks {
        chart.draw_series(std::iter::once(PathElement::new(
            vec![(m.x, y_min), (m.x, y_max)],
            m.color.mix(0.55).stroke_width(1),
        )))?;
    }
    for l in lines {
        let color = l.color;
        chart
            .draw_series(LineSeries::new(
                l.points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(l.label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    if lines.is_empty() {
        chart.draw_series(std::iter::once(Text::new(
            empty.to_string(),
            (x_max * 0.35, (y_min + y_max) / 2.0),
            ("sans-serif", 18).into_font().color(&BLACK.mix(0.6)),
        )))?;
    } else {
        chart
            .configure_series_labels()
            .position(legend)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 15))
            .draw()?;
    }
    Ok(())
}
