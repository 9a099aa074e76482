//! Prometheus metrics (`GET /metrics`, text format).
//!
//! Request counts by route, method and status and latency histograms by
//! route are kept by the `prometheus` crate as requests finish. The rest is
//! read when scraped: orders by state and per-SKU stock from the engine, and
//! the journal's batch sizes, flush latency and durable lag from its
//! writer's statistics.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::http::Method;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::engine::{Engine, JournalReport};
use crate::limits::METRICS_SKUS_MAX;

/// Bucket bounds of the request latency histogram, in seconds.
const LATENCY_BUCKETS_S: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Bucket bounds for the journal's batch sizes (events) ...
const BATCH_BUCKETS: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 512, 8_192];
/// ... and its flush latency (microseconds).
const FLUSH_BUCKETS_US: [u64; 10] = [
    100, 200, 300, 500, 750, 1_000, 2_000, 5_000, 20_000, 100_000,
];

/// The statuses the front answers, each with a counter resolved once per
/// route and method (another status takes the slow path: a label lookup).
const STATUSES: [u16; 17] = [
    200, 201, 204, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 431, 500, 503,
];

/// The methods with a counter slot, as [`STATUSES`].
const METHODS: [Method; 5] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
];

/// One route's latency histogram and request counters, resolved from the
/// label vectors once, so a finished request costs a few atomic adds and no
/// label hashing or allocation.
pub struct RouteMetrics {
    route: Box<str>,
    latency: Histogram,
    /// `METHODS.len() x STATUSES.len()` counters, filled on first use.
    counts: Vec<OnceLock<IntCounter>>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish()
    }
}

impl RouteMetrics {
    /// Records a finished request of this route.
    pub fn observe(&self, metrics: &Metrics, method: &Method, status: u16, took: Duration) {
        self.latency.observe(took.as_secs_f64());
        let lookup = || {
            metrics.requests.with_label_values(&[
                &*self.route,
                method.as_str(),
                &status.to_string(),
            ])
        };
        let slot = METHODS
            .iter()
            .position(|m| m == method)
            .zip(STATUSES.iter().position(|&s| s == status));
        match slot {
            Some((m, s)) => self.counts[m * STATUSES.len() + s]
                .get_or_init(lookup)
                .inc(),
            None => lookup().inc(),
        }
    }
}

/// The front's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// Per-route handles, one entry per route the router has (bounded by it).
    routes: RwLock<HashMap<Box<str>, Arc<RouteMetrics>>>,
    /// Requests being handled.
    pub in_flight: IntGauge,
    /// Requests shed with `503 overloaded` before any work.
    pub shed: IntCounter,
    /// `/metrics` texts rendered (the rest of the scrapes were served the
    /// last text again).
    pub renders: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Builds and registers the metrics.
    ///
    /// # Errors
    /// A `prometheus` error for an invalid definition (they are constant).
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "flashcore_http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "flashcore_http_request_duration_seconds",
                "HTTP request latency by route",
            )
            .buckets(LATENCY_BUCKETS_S.to_vec()),
            &["route"],
        )?;
        let in_flight = IntGauge::new(
            "flashcore_http_requests_in_flight",
            "requests being handled",
        )?;
        let shed = IntCounter::new(
            "flashcore_http_shed_total",
            "requests answered 503 overloaded at the door",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        let renders = IntCounter::new(
            "flashcore_metrics_renders_total",
            "metrics texts rendered from the engine (scrapes within a second share one)",
        )?;
        registry.register(Box::new(shed.clone()))?;
        registry.register(Box::new(renders.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            latency,
            routes: RwLock::new(HashMap::new()),
            in_flight,
            shed,
            renders,
        })
    }

    /// The handles of `route` (a matched route pattern, or `unmatched`):
    /// the router's routes are a fixed set, so this map stays small.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        if let Some(known) = self
            .routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(route)
        {
            return Arc::clone(known);
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let entry = routes.entry(route.into()).or_insert_with(|| {
            Arc::new(RouteMetrics {
                route: route.into(),
                latency: self.latency.with_label_values(&[route]),
                counts: (0..METHODS.len() * STATUSES.len())
                    .map(|_| OnceLock::new())
                    .collect(),
            })
        });
        Arc::clone(entry)
    }

    /// The text exposition: the registry, then what is read at scrape time.
    pub async fn render(&self, engine: Option<&Engine>) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        let mut text = String::from_utf8(out).unwrap_or_default();
        if let Some(engine) = engine {
            if let Ok(counts) = engine.order_counts().await {
                let _ = writeln!(text, "# HELP flashcore_orders orders by state");
                let _ = writeln!(text, "# TYPE flashcore_orders gauge");
                for (status, count) in counts {
                    let _ = writeln!(text, "flashcore_orders{{status=\"{status}\"}} {count}");
                }
            }
            // A bounded read: the awake SKUs first, never the whole catalog.
            if let Ok((skus, total, awake)) = engine.skus_watched(METRICS_SKUS_MAX).await {
                write_gauge(
                    &mut text,
                    "flashcore_skus",
                    "SKUs in the catalog",
                    total as u64,
                );
                write_gauge(
                    &mut text,
                    "flashcore_skus_awake",
                    "SKUs whose actor runs (the rest sleep in the catalog)",
                    awake as u64,
                );
                for (name, help) in [
                    ("on_hand", "units in the warehouse"),
                    ("available", "units a new order can take"),
                    ("reserved", "units held for unpaid orders"),
                    ("allocated", "units paid for, waiting to ship"),
                    ("shipped", "units shipped, cumulative"),
                ] {
                    let _ = writeln!(text, "# HELP flashcore_sku_{name} {help}");
                    let _ = writeln!(text, "# TYPE flashcore_sku_{name} gauge");
                    for sku in &skus {
                        let l = sku.levels;
                        let value = match name {
                            "on_hand" => l.on_hand,
                            "available" => l.available,
                            "reserved" => l.reserved,
                            "allocated" => l.allocated,
                            _ => l.shipped,
                        };
                        let _ =
                            writeln!(text, "flashcore_sku_{name}{{sku=\"{}\"}} {value}", sku.sku);
                    }
                }
            }
        }
        if let Some(report) = engine.map(Engine::journal_report) {
            write_journal(&mut text, &report);
        }
        write_steps(&mut text);
        if let Some(rss) = resident_bytes() {
            write_gauge(
                &mut text,
                "process_resident_memory_bytes",
                "resident memory of this process",
                rss,
            );
        }
        text
    }
}

fn write_counter(text: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        text,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
    );
}

fn write_gauge(text: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        text,
        "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
    );
}

/// A Prometheus histogram from an hdrhistogram: cumulative counts at fixed
/// bounds (`scale` converts the recorded unit to the exported one).
fn write_histogram(
    text: &mut String,
    name: &str,
    help: &str,
    hist: &hdrhistogram::Histogram<u64>,
    bounds: &[u64],
    scale: f64,
) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} histogram");
    write_histogram_series(text, name, "", hist, bounds, scale);
}

/// One series of a histogram (its buckets, sum and count), with `labels`
/// (e.g. `step="capture"`, or empty) on every line: the `# HELP` and
/// `# TYPE` lines come once per histogram, before its series.
fn write_histogram_series(
    text: &mut String,
    name: &str,
    labels: &str,
    hist: &hdrhistogram::Histogram<u64>,
    bounds: &[u64],
    scale: f64,
) {
    let (bucket_labels, own_labels) = if labels.is_empty() {
        (String::new(), String::new())
    } else {
        (format!("{labels},"), format!("{{{labels}}}"))
    };
    for bound in bounds {
        let count = hist.count_between(0, *bound);
        let _ = writeln!(
            text,
            "{name}_bucket{{{bucket_labels}le=\"{}\"}} {count}",
            *bound as f64 * scale
        );
    }
    let total = hist.len();
    let sum = hist.mean() * total as f64 * scale;
    let _ = writeln!(
        text,
        "{name}_bucket{{{bucket_labels}le=\"+Inf\"}} {total}\n{name}_sum{own_labels} {sum}\n{name}_count{own_labels} {total}"
    );
}

/// Bounds of the background steps' histograms, microseconds: 100 us to
/// 10 s.
const STEP_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// Every background step (`steps.rs`): a histogram of its runs and the
/// longest run in the last whole second, labelled by step.
fn write_steps(text: &mut String) {
    let reports = crate::steps::report();
    let name = "flashcore_step_seconds";
    let _ = writeln!(
        text,
        "# HELP {name} background steps (journal write and sync, snapshot capture and write, epoch drop, sweeps)\n# TYPE {name} histogram"
    );
    for report in &reports {
        let labels = format!("step=\"{}\"", report.step.name());
        write_histogram_series(text, name, &labels, &report.hist, &STEP_BUCKETS_US, 1e-6);
    }
    let name = "flashcore_step_last_second_max_seconds";
    let _ = writeln!(
        text,
        "# HELP {name} longest run of each background step in the last whole second\n# TYPE {name} gauge"
    );
    for report in &reports {
        #[allow(clippy::cast_precision_loss)] // microseconds of one step
        let seconds = report.last_second_max_us as f64 * 1e-6;
        let _ = writeln!(text, "{name}{{step=\"{}\"}} {seconds}", report.step.name());
    }
}

/// Resident memory from `/proc/self/statm` (Linux), in bytes.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// The journal's counters, gauges and histograms.
fn write_journal(text: &mut String, report: &JournalReport<'_>) {
    let (last_seq, durable, failed) = (report.last_seq, report.durable_seq, report.failed);
    write_gauge(
        text,
        "flashcore_journal_durable_lag_events",
        "events appended but not yet durable",
        last_seq.saturating_sub(durable),
    );
    write_gauge(
        text,
        "flashcore_journal_failed",
        "1 after a storage failure until the journal is reopened",
        u64::from(failed),
    );
    let Some(stats) = report.stats else {
        return;
    };
    write_counter(
        text,
        "flashcore_journal_batches_total",
        "group commits written",
        stats.batches.load(Ordering::Relaxed),
    );
    write_counter(
        text,
        "flashcore_journal_events_total",
        "events made durable",
        stats.events.load(Ordering::Relaxed),
    );
    write_counter(
        text,
        "flashcore_journal_bytes_total",
        "record bytes written",
        stats.bytes.load(Ordering::Relaxed),
    );

    if let Ok(hist) = stats.batch_events.lock() {
        write_histogram(
            text,
            "flashcore_journal_batch_events",
            "events per group commit",
            &hist,
            &BATCH_BUCKETS,
            1.0,
        );
    }
    if let Ok(hist) = stats.flush_us.lock() {
        write_histogram(
            text,
            "flashcore_journal_flush_seconds",
            "sled flush plus fdatasync per group commit",
            &hist,
            &FLUSH_BUCKETS_US,
            1e-6,
        );
    }
}
