//! `latency.svg`: the sale's story over the run, for people.
//!
//! Two panels on one time axis. Above: served requests per second (left
//! axis) and p99 latency in milliseconds (right axis), one point per
//! timeline bucket. Below: units sold so far (the units of every order
//! answered 201, cumulative), with the stock as a dashed line when it is
//! in range. The sold-out moment (the first `409 out_of_stock` a buyer
//! saw) is a red line across both panels, so one look shows how fast the
//! stock went and what the server did meanwhile.
//!
//! The run's final bucket is usually a sliver (the load stopped mid-second).
//! A rate or a p99 over a fraction of a second is noise, so a final bucket
//! shorter than the others is **dropped** from the rate and p99 lines (the
//! chart says so and for how long it was); its units still count in the
//! units sold, which are counts, not rates. Plain SVG text, so any browser
//! shows it.

use std::path::{Path, PathBuf};

use anyhow::{Result, anyhow};
use plotters::prelude::*;

use crate::stats::TimelinePoint;

/// Canvas size in pixels.
const CHART_SIZE_PX: (u32, u32) = (1100, 820);
/// Height of the upper panel (rates), pixels; the rest is units sold.
const RATES_PANEL_PX: u32 = 460;
/// Head room above the highest point.
const HEADROOM: f64 = 1.15;
/// A final bucket shorter than this share of a whole one is partial.
const PARTIAL_SHARE: f64 = 0.9;

/// What the run tells about the sale, beside the timeline.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sale {
    /// When a buyer first saw `409 out_of_stock`, seconds since the start.
    pub sold_out_s: Option<f64>,
    /// The stock on sale, when the scenario had one hot SKU.
    pub stock_units: Option<u64>,
}

impl Sale {
    /// From the report's `detail` (`first_sold_out_ms`, `stock`).
    #[must_use]
    pub fn from_detail(detail: &serde_json::Map<String, serde_json::Value>) -> Sale {
        #[allow(clippy::cast_precision_loss)] // milliseconds of a run
        let sold_out_s = detail
            .get("first_sold_out_ms")
            .and_then(serde_json::Value::as_u64)
            .map(|ms| ms as f64 / 1000.0);
        Sale {
            sold_out_s,
            stock_units: detail.get("stock").and_then(serde_json::Value::as_u64),
        }
    }
}

/// The series the chart draws, prepared from the timeline.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Story {
    /// `(t_s, throughput_rps, p99_ms)` of every whole bucket.
    pub rates: Vec<(f64, f64, f64)>,
    /// `(t_s, units sold so far)`, from `(0, 0)` through every bucket.
    pub sold: Vec<(f64, u64)>,
    /// The length (s) of the final bucket when it was partial and left out
    /// of `rates`.
    pub dropped_partial_s: Option<f64>,
}

/// Prepares the series: cumulative units sold, and the rates without a
/// partial final bucket (see the module doc).
///
/// The timeline only knows what each bucket sold, not when within it. A
/// straight line across the bucket in which the stock ran out would show
/// units still selling after the sold-out moment, so that bucket's units
/// are drawn as sold by `sold_out_s` (the first `out_of_stock` means the
/// stock was gone then; later grants in the same bucket, from released
/// units, are few).
#[must_use]
pub fn story(timeline: &[TimelinePoint], sold_out_s: Option<f64>) -> Story {
    let mut sold = Vec::with_capacity(timeline.len() + 2);
    sold.push((0.0, 0_u64));
    let mut total = 0_u64;
    for p in timeline {
        total = total.saturating_add(p.granted_units);
        let bucket_start_s = sold.last().map_or(0.0, |last| last.0);
        if let Some(t) = sold_out_s.filter(|t| *t > bucket_start_s && *t < p.t_s) {
            sold.push((t, total));
        }
        sold.push((p.t_s, total));
    }
    // A whole bucket is as long as the longest of the others.
    let whole_s = timeline
        .iter()
        .rev()
        .skip(1)
        .map(|p| p.span_s)
        .fold(0.0_f64, f64::max);
    let dropped_partial_s = match timeline.last() {
        Some(last) if timeline.len() > 1 && last.span_s < whole_s * PARTIAL_SHARE => {
            Some(last.span_s)
        }
        _ => None,
    };
    let keep = timeline.len() - usize::from(dropped_partial_s.is_some());
    let rates = timeline[..keep]
        .iter()
        .map(|p| (p.t_s, p.throughput_rps, p.p99_ms))
        .collect();
    Story {
        rates,
        sold,
        dropped_partial_s,
    }
}

/// Draws the chart for `timeline` into `dir/latency.svg`.
///
/// # Errors
///
/// The file could not be written.
pub fn write_svg(
    dir: &Path,
    title: &str,
    timeline: &[TimelinePoint],
    sale: Sale,
) -> Result<PathBuf> {
    let path = dir.join("latency.svg");
    draw(&path, title, &story(timeline, sale.sold_out_s), sale)
        .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    Ok(path)
}

/// The red sold-out line from `0` to `top` at `t_s`.
fn sold_out_line(t_s: f64, top: f64) -> LineSeries<SVGBackend<'static>, (f64, f64)> {
    LineSeries::new(vec![(t_s, 0.0), (t_s, top)], RED.stroke_width(2))
}

fn draw(
    path: &Path,
    title: &str,
    story: &Story,
    sale: Sale,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, CHART_SIZE_PX).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let (upper, lower) = root.split_vertically(RATES_PANEL_PX);
    let t_max = story
        .sold
        .iter()
        .map(|p| p.0)
        .chain(sale.sold_out_s)
        .fold(1.0_f64, f64::max);
    draw_rates(&upper, story, sale, t_max)?;
    draw_sold(&lower, story, sale, t_max)?;
    root.present()?;
    Ok(())
}

/// The upper panel: throughput and p99.
fn draw_rates(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    story: &Story,
    sale: Sale,
    t_max: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let rps_max = story.rates.iter().map(|p| p.1).fold(1.0_f64, f64::max) * HEADROOM;
    let p99_max = story.rates.iter().map(|p| p.2).fold(0.1_f64, f64::max) * HEADROOM;
    let x_desc = match story.dropped_partial_s {
        Some(s) => format!(
            "seconds since the load started (the final {s:.3} s, a partial bucket, is left out of these rates)"
        ),
        None => "seconds since the load started".to_owned(),
    };
    let mut chart = ChartBuilder::on(area)
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .right_y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..rps_max)?
        .set_secondary_coord(0.0..t_max, 0.0..p99_max);
    chart
        .configure_mesh()
        .x_desc(x_desc)
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
            story.rates.iter().map(|p| (p.0, p.1)),
            throughput,
        ))?
        .label("throughput, req/s (left axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], throughput));
    let p99 = MAGENTA.stroke_width(2);
    chart
        .draw_secondary_series(LineSeries::new(story.rates.iter().map(|p| (p.0, p.2)), p99))?
        .label("p99 latency, ms (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], p99));
    if let Some(t) = sale.sold_out_s {
        chart
            .draw_series(sold_out_line(t, rps_max))?
            .label("sold out")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], RED.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

/// The lower panel: units sold so far, the stock, the sold-out moment.
fn draw_sold(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    story: &Story,
    sale: Sale,
    t_max: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let sold_max = story.sold.last().map_or(0, |p| p.1);
    // The stock is drawn only when it is near the units sold: the overload
    // scenario's billion units would flatten the line to nothing.
    let stock = sale
        .stock_units
        .filter(|s| *s <= sold_max.saturating_mul(2).max(1));
    #[allow(clippy::cast_precision_loss)] // unit counts far below 2^53
    let units_max = (sold_max.max(stock.unwrap_or(0)).max(1) as f64) * HEADROOM;
    // No right axis, but the same width as the panel above, so the time
    // axes line up.
    let mut chart = ChartBuilder::on(area)
        .margin(20)
        .margin_right(100)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(0.0..t_max, 0.0..units_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the load started")
        .y_desc("units sold (cumulative)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let sold = GREEN.stroke_width(3);
    #[allow(clippy::cast_precision_loss)]
    chart
        .draw_series(LineSeries::new(
            story.sold.iter().map(|p| (p.0, p.1 as f64)),
            sold,
        ))?
        .label("units sold, cumulative (orders answered 201)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], sold));
    if let Some(stock) = stock {
        #[allow(clippy::cast_precision_loss)]
        let level = stock as f64;
        let style = BLACK.mix(0.6).stroke_width(1);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, level), (t_max, level)],
                6,
                4,
                style,
            ))?
            .label(format!("stock: {stock} units"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    if let Some(t) = sale.sold_out_s {
        chart.draw_series(sold_out_line(t, units_max))?;
        let label = format!("sold out at {t:.2} s");
        chart.draw_series(std::iter::once(Text::new(
            label,
            (t, units_max / HEADROOM * 0.5),
            ("sans-serif", 15).into_font().color(&RED),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A second of the run: `units` sold, and a rate that tells buckets apart.
    fn point(t_s: f64, span_s: f64, units: u64) -> TimelinePoint {
        TimelinePoint {
            t_s,
            span_s,
            requests: 1000,
            throughput_rps: 1000.0 + t_s,
            ok: 900,
            errors: 0,
            shed: 0,
            p50_ms: 1.0,
            p99_ms: 2.0 + t_s / 10.0,
            granted_units: units,
            server_rss_kib: None,
            server_steps_samples: 0,
            server_steps_max_ms: std::collections::BTreeMap::new(),
        }
    }

    fn sale_run() -> Vec<TimelinePoint> {
        vec![
            point(1.0, 1.0, 40),
            point(2.0, 1.0, 35),
            point(3.0, 1.0, 25),
            point(4.0, 1.0, 0),
            // The load stopped 0.2 s into the fifth second.
            point(4.2, 0.2, 0),
        ]
    }

    #[test]
    fn a_partial_final_bucket_is_left_out_of_the_rates_but_not_the_units() {
        let mut run = sale_run();
        run[4].granted_units = 3;
        let s = story(&run, None);
        assert_eq!(s.rates.len(), 4, "{:?}", s.rates);
        assert!(
            (s.rates[3].0 - 4.0).abs() < 1e-9,
            "the last whole second is kept"
        );
        assert_eq!(s.dropped_partial_s, Some(0.2));
        assert_eq!(s.sold.last(), Some(&(4.2, 103)), "its units still count");
    }

    #[test]
    fn whole_buckets_are_all_kept() {
        let run: Vec<_> = (1..=5).map(|s| point(f64::from(s), 1.0, 1)).collect();
        let s = story(&run, None);
        assert_eq!(s.rates.len(), 5);
        assert_eq!(s.dropped_partial_s, None);
        // A single short bucket is the whole run: kept.
        let s = story(&[point(0.3, 0.3, 2)], None);
        assert_eq!(s.rates.len(), 1);
        assert_eq!(s.dropped_partial_s, None);
    }

    #[test]
    fn units_sold_start_at_zero_and_never_fall() {
        let s = story(&sale_run(), None);
        assert_eq!(s.sold[0], (0.0, 0));
        assert!(
            s.sold
                .windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[0].0 < w[1].0)
        );
        assert_eq!(s.sold.last().map(|p| p.1), Some(100));
        assert_eq!(s.sold.len(), 6, "one point per bucket after the origin");
    }

    #[test]
    fn the_stock_is_gone_at_the_sold_out_moment_not_at_the_end_of_its_second() {
        let s = story(&sale_run(), Some(2.4));
        assert_eq!(
            s.sold[..5],
            [(0.0, 0), (1.0, 40), (2.0, 75), (2.4, 100), (3.0, 100)]
        );
        // On a bucket's end, no point is added.
        assert_eq!(story(&sale_run(), Some(3.0)).sold.len(), 6);
    }

    #[test]
    fn the_sale_comes_from_the_report_detail() {
        let mut detail = serde_json::Map::new();
        assert_eq!(Sale::from_detail(&detail), Sale::default());
        detail.insert("first_sold_out_ms".into(), serde_json::json!(2_750));
        detail.insert("stock".into(), serde_json::json!(100));
        let sale = Sale::from_detail(&detail);
        assert_eq!(sale.stock_units, Some(100));
        assert!((sale.sold_out_s.unwrap() - 2.75).abs() < 1e-9);
    }

    #[test]
    fn the_chart_tells_the_sale_story() {
        let dir = tempfile::tempdir().unwrap();
        let sale = Sale {
            sold_out_s: Some(3.1),
            stock_units: Some(100),
        };
        let path = write_svg(dir.path(), "flash-sale: the story", &sale_run(), sale).unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100.min(svg.len())]);
        for text in [
            "flash-sale: the story",
            "p99 latency (ms)",
            "throughput (served requests / s)",
            "units sold (cumulative)",
            "sold out at 3.10 s",
            "stock: 100 units",
            "the final 0.200 s, a partial bucket, is left out of these rates",
        ] {
            assert!(svg.contains(text), "no {text:?} in the chart");
        }
        // Throughput, p99, units sold, and the sold-out line on both panels.
        assert!(svg.matches("<polyline").count() >= 5, "{svg}");
    }

    #[test]
    fn without_a_sell_out_there_is_no_mark() {
        let dir = tempfile::tempdir().unwrap();
        let run: Vec<_> = (1..=3).map(|s| point(f64::from(s), 1.0, 5)).collect();
        let path = write_svg(dir.path(), "mixed", &run, Sale::default()).unwrap();
        let svg = std::fs::read_to_string(path).unwrap();
        assert!(svg.contains("units sold (cumulative)"));
        assert!(!svg.contains("sold out"), "no sell-out happened");
        assert!(!svg.contains("partial bucket"));
    }

    #[test]
    fn an_empty_run_still_draws() {
        let dir = tempfile::tempdir().unwrap();
        assert!(write_svg(dir.path(), "empty", &[], Sale::default()).is_ok());
    }
}
