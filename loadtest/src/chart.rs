//! `latency.svg`: throughput and p99 latency over the run, for people.
//!
//! Two line series on one time axis: served requests per second (left axis)
//! and p99 latency in milliseconds (right axis), one point per timeline
//! bucket. Plain SVG text, so any browser shows it.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::stats::TimelinePoint;

/// Canvas size in pixels.
const CHART_SIZE_PX: (u32, u32) = (1100, 600);
/// Head room above the highest point.
const HEADROOM: f64 = 1.15;

/// Draws the chart for `timeline` into `dir/latency.svg`.
///
/// # Errors
///
/// The file could not be written.
pub fn write_svg(dir: &Path, title: &str, timeline: &[TimelinePoint]) -> Result<PathBuf> {
    let path = dir.join("latency.svg");
    draw(&path, title, timeline).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    Ok(path)
}

fn draw(
    path: &Path,
    title: &str,
    timeline: &[TimelinePoint],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, CHART_SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let t_max = timeline.iter().map(|p| p.t_s).fold(1.0_f64, f64::max);
    let rps_max = timeline
        .iter()
        .map(|p| p.throughput_rps)
        .fold(1.0_f64, f64::max)
        * HEADROOM;
    let p99_max = timeline.iter().map(|p| p.p99_ms).fold(0.1_f64, f64::max) * HEADROOM;

    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .right_y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..rps_max)?
        .set_secondary_coord(0.0..t_max, 0.0..p99_max);

    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("throughput (served requests / s)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency (ms)")
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;

    let throughput = BLUE.stroke_width(2);
    chart
        .draw_series(LineSeries::new(
            timeline.iter().map(|p| (p.t_s, p.throughput_rps)),
            throughput,
        ))?
        .label("throughput, req/s (left axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], throughput));
    let p99 = RED.stroke_width(2);
    chart
        .draw_secondary_series(LineSeries::new(
            timeline.iter().map(|p| (p.t_s, p.p99_ms)),
            p99,
        ))?
        .label("p99 latency, ms (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], p99));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chart_has_both_series_and_labelled_axes() {
        let dir = tempfile::tempdir().unwrap();
        let timeline: Vec<TimelinePoint> = (1..=10_u32)
            .map(|s| TimelinePoint {
                t_s: f64::from(s),
                span_s: 1.0,
                requests: 1000,
                throughput_rps: 1000.0 + f64::from(s),
                ok: 900,
                errors: 0,
                shed: 0,
                p50_ms: 1.0,
                p99_ms: 2.0 + f64::from(s) / 10.0,
                server_rss_kib: None,
            })
            .collect();
        let path = write_svg(dir.path(), "flash-sale: throughput and p99", &timeline).unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        assert!(svg.contains("p99 latency (ms)"));
        assert!(svg.contains("throughput (served requests / s)"));
        assert!(svg.contains("seconds since the load started"));
        assert!(svg.matches("<polyline").count() >= 2, "two series");
    }

    #[test]
    fn an_empty_run_still_draws() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_svg(dir.path(), "empty", &[]).is_ok());
    }
}
