//! The report's figures as PNG (plotters' bitmap backend): the report and the meter's rows
//! in; `exported_vs_truth.png` (per-VM CPU seconds against schedstat and energy against the
//! ground truth), `error_cdf.png` (CDFs of the per-window relative errors) and
//! `model_fit.png` (metered watts against busy CPUs, the true function and the fitted
//! model) out.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context as _, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::meter::{self, Row};
use super::report::Report;

/// Fonts tried in turn (Debian's `fonts-dejavu-core`, `fonts-liberation`).
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];
const SIZE: (u32, u32) = (1200, 800);

/// plotters draws text with a registered TrueType font; register the first one found.
fn register_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).is_file())
        .ok_or_else(|| {
            anyhow!("no font for the plots: install fonts-dejavu-core (`cargo xtask setup` does)")
        })?;
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    // Registered once for the life of the process, as plotters' API wants it.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable TrueType font"))
}

/// Draws every plot into `out`; returns their paths.
pub fn draw(report: &Report, rows: &[Row], out: &Path) -> Result<Vec<PathBuf>> {
    register_font()?;
    let paths = [
        out.join("exported_vs_truth.png"),
        out.join("error_cdf.png"),
        out.join("model_fit.png"),
    ];
    exported_vs_truth(report, &paths[0])
        .map_err(|e| anyhow!("drawing {}: {e}", paths[0].display()))?;
    error_cdf(report, &paths[1]).map_err(|e| anyhow!("drawing {}: {e}", paths[1].display()))?;
    model_fit(report, rows, &paths[2])
        .map_err(|e| anyhow!("drawing {}: {e}", paths[2].display()))?;
    Ok(paths.to_vec())
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;
type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;
type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A chart with a title, labelled axes and a mesh over `x` × `y`.
fn axes<'a, 'b>(
    area: &'a Area<'b>,
    title: impl AsRef<str>,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_label, y_label): (&str, &str),
) -> std::result::Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(title.as_ref(), ("sans-serif", 26))
        .margin(15)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x, y)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 16))
        .draw()?;
    Ok(chart)
}

/// The series' legend box at `position`.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> DrawResult {
    chart
        .configure_series_labels()
        .position(position)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

const PALETTE: [RGBColor; 7] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

/// A scatter of (truth, exported) pairs per scenario with the y = x line.
fn scatter(
    area: &Area<'_>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> DrawResult {
    let max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(a, b)| a.max(*b)))
        .fold(0.0, f64::max)
        .max(1e-3)
        * 1.05;
    let mut chart = axes(area, title, (0.0..max, 0.0..max), (x_label, y_label))?;
    chart
        .draw_series(LineSeries::new(
            [(0.0, 0.0), (max, max)],
            BLACK.stroke_width(1),
        ))?
        .label("exported = truth")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
    for (i, (name, points)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 5, color.filled())),
            )?
            .label(name.as_str())
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    Ok(())
}

fn exported_vs_truth(report: &Report, path: &Path) -> DrawResult {
    let root = BitMapBackend::new(path, (SIZE.0 * 2, SIZE.1)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(SIZE.0);
    let per =
        |f: &dyn Fn(&super::probe::VmWindow) -> (f64, f64)| -> Vec<(String, Vec<(f64, f64)>)> {
            report
                .scenarios
                .iter()
                .map(|s| {
                    (
                        s.run.name.clone(),
                        s.run
                            .windows
                            .iter()
                            .flat_map(|w| w.vms.iter().map(f))
                            .collect(),
                    )
                })
                .collect()
        };
    scatter(
        &left,
        "VM CPU time per window: exported vs schedstat",
        "schedstat (CPU seconds)",
        "exported (CPU seconds)",
        &per(&|v| (v.cpu_seconds_schedstat, v.cpu_seconds_exported)),
    )?;
    scatter(
        &right,
        "VM package energy per window: exported vs ground truth",
        "truth: dynamic energy by CPU time (J)",
        "exported (J)",
        &per(&|v| (v.energy_joules_truth, v.energy_joules_exported)),
    )?;
    root.present()?;
    Ok(())
}

/// Empirical CDF points of `values` (sorted).
fn cdf(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.sort_by(f64::total_cmp);
    #[expect(clippy::cast_precision_loss, reason = "a few hundred windows")]
    let n = values.len() as f64;
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            #[expect(clippy::cast_precision_loss, reason = "a few hundred windows")]
            let p = (i + 1) as f64 / n;
            (v, p)
        })
        .collect()
}

fn error_cdf(report: &Report, path: &Path) -> DrawResult {
    let vms = || {
        report
            .scenarios
            .iter()
            .flat_map(|s| s.run.windows.iter().flat_map(|w| &w.vms))
    };
    let rel = |a: f64, b: f64| if b > 0.0 { (a - b).abs() / b } else { 0.0 };
    let curves = [
        (
            "CPU time vs schedstat (VM-windows over 0.25 CPU-s)",
            vms()
                .filter(|v| v.cpu_seconds_schedstat >= super::report::CPU_RAN_SECONDS)
                .map(|v| rel(v.cpu_seconds_exported, v.cpu_seconds_schedstat))
                .collect::<Vec<_>>(),
        ),
        (
            "VM share of node energy, |exported - truth|",
            vms()
                .map(|v| (v.share_exported - v.share_truth).abs())
                .collect(),
        ),
        (
            "VM energy vs truth (VMs over 1 J)",
            vms()
                .filter(|v| v.energy_joules_truth >= 1.0)
                .map(|v| rel(v.energy_joules_exported, v.energy_joules_truth))
                .collect(),
        ),
        (
            "block I/O vs /proc/<pid>/io (I/O windows)",
            vms()
                .filter(|v| v.io_read_bytes_proc + v.io_write_bytes_proc >= 1e6)
                .map(|v| {
                    rel(
                        v.io_read_bytes_exported + v.io_write_bytes_exported,
                        v.io_read_bytes_proc + v.io_write_bytes_proc,
                    )
                })
                .collect(),
        ),
    ];
    let max_x = curves
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max)
        .max(0.01)
        * 1.05;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = axes(
        &root,
        "Error CDFs over all windows",
        (0.0..max_x, 0.0..1.02),
        (
            "relative error (ratio; share: absolute, in share of node energy)",
            "fraction of windows ≤ x",
        ),
    )?;
    for (i, (name, values)) in curves.into_iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points = cdf(values);
        // A step line: each point's cumulative fraction holds up to the next value.
        let mut steps = Vec::with_capacity(points.len() * 2 + 1);
        let mut last = 0.0;
        for (x, p) in &points {
            steps.push((*x, last));
            steps.push((*x, *p));
            last = *p;
        }
        chart
            .draw_series(LineSeries::new(steps, color.stroke_width(3)))?
            .label(format!("{name} (n = {})", points.len()))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

fn model_fit(report: &Report, rows: &[Row], path: &Path) -> DrawResult {
    let rows: Vec<&Row> = rows.iter().filter(|r| !r.scenario.is_empty()).collect();
    let max_b = rows
        .iter()
        .map(|r| r.busy_cpus)
        .fold(0.0, f64::max)
        .max(0.5)
        * 1.05;
    let max_w = rows
        .iter()
        .map(|r| r.watts)
        .chain(report.model.predicted_watts.iter().copied())
        .fold(meter::watts(max_b), f64::max)
        * 1.05;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "Power model fit: {} one-second rows, in-sample MAPE {}",
        rows.len(),
        report
            .model
            .mape_in_sample
            .map_or_else(|| "n/a".to_owned(), |m| format!("{:.2} %", m * 100.0))
    );
    let mut chart = axes(
        &root,
        title,
        (0.0..max_b, 0.0..max_w),
        ("busy CPUs (/proc/stat)", "package power (W)"),
    )?;
    let metered = PALETTE[0];
    chart
        .draw_series(
            rows.iter()
                .map(|r| Circle::new((r.busy_cpus, r.watts), 3, metered.mix(0.5).filled())),
        )?
        .label("metered (synthetic meter)")
        .legend(move |(x, y)| Circle::new((x + 10, y), 4, metered.filled()));
    let predicted = PALETTE[1];
    chart
        .draw_series(
            rows.iter()
                .zip(&report.model.predicted_watts)
                .map(|(r, p)| Cross::new((r.busy_cpus, *p), 4, predicted.stroke_width(2))),
        )?
        .label("model prediction (all features)")
        .legend(move |(x, y)| Cross::new((x + 10, y), 4, predicted.stroke_width(2)));
    let truth: Vec<(f64, f64)> = (0..=100)
        .map(|i| f64::from(i) / 100.0 * max_b)
        .map(|b| (b, meter::watts(b)))
        .collect();
    chart
        .draw_series(LineSeries::new(truth, BLACK.stroke_width(2)))?
        .label(meter::FUNCTION)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    let m = &report.model;
    let slope = m.coefficients.get("busy_cpus").copied().unwrap_or(0.0);
    let line = [
        (0.0, m.intercept_watts.max(0.0)),
        (max_b, (m.intercept_watts + slope * max_b).max(0.0)),
    ];
    chart
        .draw_series(LineSeries::new(line, PALETTE[3].stroke_width(2)))?
        .label(format!(
            "fit at zero I/O: {:.2} W + {:.2} W per busy CPU",
            m.intercept_watts, slope
        ))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], PALETTE[3].stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}
