//! What a run leaves behind: `report.json` and the end table.
//!
//! [`Report`] is the file's schema. The fields the issue fixes are at the top
//! level: `scenario`, `requests`, `ok`, `rejected`, `errors`,
//! `throughput_rps`, `latency_ms` {`p50`,`p90`,`p99`,`p999`,`max`} and
//! `books` {`ok`, `oversold`, `acked_missing`, ...}; per-endpoint detail,
//! the timeline and the server's exit follow. `throughput_rps` counts served
//! answers (ok + rejected) per second of load; `latency_ms` covers every
//! answer except shed ones (503 `overloaded`), which have `shed_latency_ms`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::books::BookReport;
use crate::server_steps::{self, StepsSummary};
use crate::stats::{Counts, EndpointStats, LatencyMs, TimelinePoint};

/// `report.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// `flash-sale`, `mixed`, `soak` or `overload`.
    pub scenario: String,
    /// Every request sent (or attempted).
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Expected business refusals (409 `out_of_stock`, `limit_exceeded`).
    pub rejected: u64,
    /// 503 `overloaded` answers.
    pub shed: u64,
    /// Unexpected answers and requests that got no answer.
    pub errors: u64,
    /// Served answers (ok + rejected) per second of load.
    pub throughput_rps: f64,
    /// 2xx answers per second of load.
    pub ok_rps: f64,
    /// Latency of every answer except shed ones.
    pub latency_ms: LatencyMs,
    /// Latency of shed answers.
    pub shed_latency_ms: LatencyMs,
    /// Latency of 2xx answers alone (in a sale: the grants).
    pub ok_latency_ms: LatencyMs,
    /// The book check.
    pub books: BookReport,
    /// How the run was set up.
    pub run: RunInfo,
    /// Per endpoint.
    pub endpoints: Vec<EndpointReport>,
    /// Scenario facts (the hot SKU, its stock, when it sold out, the rate...).
    pub detail: serde_json::Map<String, serde_json::Value>,
    /// Throughput and latency over time.
    pub timeline: Vec<TimelinePoint>,
    /// The server's background steps beside the per-second p99: the stall
    /// table and p99 with and without a snapshot phase (absent in reports
    /// written before it).
    #[serde(default)]
    pub server_steps: Option<StepsSummary>,
    /// The server, when we spawned it or know its pid.
    pub server: ServerInfo,
}

/// How the run was set up and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// `spawned 127.0.0.1:port` or the `--url`.
    pub target: String,
    /// `strict` or `relaxed` (as spawned, or as told with `--url`).
    pub durability: String,
    /// Keep-alive connections.
    pub connections: u32,
    /// TCP connections opened in all (equal to `connections` when keep-alive
    /// held throughout).
    pub connects: u64,
    /// `--duration` in seconds.
    pub duration_s: f64,
    /// `--max-requests`.
    pub max_requests: u64,
    /// Wall time of the load phase, seconds.
    pub elapsed_s: f64,
    /// Ended by Ctrl-C.
    pub stopped_early: bool,
    /// Open-loop requests that found no free connection when due (their
    /// latency includes the wait).
    pub waited: u64,
    /// Open-loop arrivals due before the end that were never sent: every
    /// connection was busy.
    pub backlog_unsent: u64,
    /// Cores of this machine (the load tester shares them with a spawned server).
    pub cores: u32,
    /// This tool's version.
    pub loadtest_version: String,
}

/// One endpoint's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointReport {
    /// `POST /v1/orders`, ...
    pub endpoint: String,
    /// Counts by class.
    #[serde(flatten)]
    pub counts: Counts,
    /// Counts by status and error code.
    pub outcomes: BTreeMap<String, u64>,
    /// All requests per second.
    pub requests_per_s: f64,
    /// Served answers per second.
    pub throughput_rps: f64,
    /// Latency of every answer except shed ones.
    pub latency_ms: LatencyMs,
    /// Latency of shed answers.
    pub shed_latency_ms: LatencyMs,
    /// Latency of 2xx answers alone.
    pub ok_latency_ms: LatencyMs,
}

/// The server's side of the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    /// We started it with --spawn.
    pub spawned: bool,
    /// Its process id, if known.
    pub pid: Option<u32>,
    /// Its log file (spawned only).
    pub log: Option<String>,
    /// How it exited after SIGTERM (spawned only).
    pub exit: Option<String>,
    /// Exited 0 within the grace period, as the contract says.
    pub exit_clean: Option<bool>,
    /// Resident memory at the first timeline point, KiB.
    pub rss_first_kib: Option<u64>,
    /// Resident memory at the last timeline point, KiB.
    pub rss_last_kib: Option<u64>,
    /// Largest resident memory seen, KiB.
    pub rss_max_kib: Option<u64>,
}

/// Per-second rate of `count` over `elapsed_s`.
#[must_use]
pub fn per_s(count: u64, elapsed_s: f64) -> f64 {
    if elapsed_s <= 0.0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)] // counts far below 2^53
    let rate = count as f64 / elapsed_s;
    rate
}

/// The per-endpoint rows.
#[must_use]
pub fn endpoint_reports(
    endpoints: &BTreeMap<&'static str, EndpointStats>,
    elapsed_s: f64,
) -> Vec<EndpointReport> {
    endpoints
        .iter()
        .map(|(endpoint, stats)| EndpointReport {
            endpoint: (*endpoint).to_owned(),
            counts: stats.counts,
            outcomes: stats.outcomes.clone(),
            requests_per_s: per_s(stats.counts.requests, elapsed_s),
            throughput_rps: per_s(stats.counts.served(), elapsed_s),
            latency_ms: LatencyMs::of(&stats.latency),
            shed_latency_ms: LatencyMs::of(&stats.shed_latency),
            ok_latency_ms: LatencyMs::of(&stats.ok_latency),
        })
        .collect()
}

impl Report {
    /// Writes `report.json` into `dir`.
    ///
    /// # Errors
    ///
    /// The file could not be written.
    pub fn write_json(&self, dir: &Path) -> Result<std::path::PathBuf> {
        let path = dir.join("report.json");
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// The end table: one row per endpoint with its outcomes beneath, the
    /// totals, and the book check.
    #[must_use]
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{} against {} ({} durability), {} connections, {:.1} s",
            self.scenario,
            self.run.target,
            self.run.durability,
            self.run.connections,
            self.run.elapsed_s
        );
        let _ = writeln!(
            out,
            "{:<30} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "endpoint", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        let row = |out: &mut String, name: &str, requests: u64, rps: f64, l: &LatencyMs| {
            let _ = writeln!(
                out,
                "{name:<30} {requests:>10} {rps:>10.1} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        };
        for e in &self.endpoints {
            row(
                &mut out,
                &e.endpoint,
                e.counts.requests,
                e.requests_per_s,
                &e.latency_ms,
            );
            let outcomes: Vec<String> = e
                .outcomes
                .iter()
                .map(|(k, n)| format!("{k}: {n}"))
                .collect();
            let _ = writeln!(out, "    {}", outcomes.join(", "));
            if e.counts.ok > 0 && e.counts.ok < e.counts.requests {
                let s = &e.ok_latency_ms;
                let _ = writeln!(
                    out,
                    "    2xx alone, latency ms: p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
                    s.p50, s.p99, s.p999, s.max
                );
            }
            if e.counts.shed > 0 {
                let s = &e.shed_latency_ms;
                let _ = writeln!(
                    out,
                    "    shed (503 overloaded) latency ms: p50 {:.2}  p99 {:.2}  max {:.2}",
                    s.p50, s.p99, s.max
                );
            }
        }
        row(
            &mut out,
            "all",
            self.requests,
            per_s(self.requests, self.run.elapsed_s),
            &self.latency_ms,
        );
        let _ = writeln!(
            out,
            "ok {}  rejected {}  shed {}  errors {}  | throughput {:.1} served/s ({:.1} ok/s)",
            self.ok, self.rejected, self.shed, self.errors, self.throughput_rps, self.ok_rps
        );
        if self.run.waited > 0 || self.run.backlog_unsent > 0 {
            let _ = writeln!(
                out,
                "open loop: {} requests waited for a free connection (latency counted from their \
                 intended start); {} arrivals were never sent",
                self.run.waited, self.run.backlog_unsent
            );
        }
        if self.run.connects > u64::from(self.run.connections) {
            let _ = writeln!(
                out,
                "connections opened: {} for {} workers (reopened after a break, or after idling {} s)",
                self.run.connects,
                self.run.connections,
                crate::limits::IDLE_REOPEN_AFTER.as_secs()
            );
        }
        if let Some(steps) = &self.server_steps {
            write_stalls(&mut out, steps);
        }
        let b = &self.books;
        if b.ok {
            let _ = writeln!(
                out,
                "books: OK ({} acked orders and {} SKUs checked; {} units of unanswered requests allowed either way)",
                b.orders_checked, b.skus_checked, b.unknown_units
            );
        } else {
            let _ = writeln!(
                out,
                "books: VIOLATED: oversold {}  acked_missing {}  inconsistent {}  sku_invariant {}  \
                 phantom_units {}  unverified {}",
                b.oversold,
                b.acked_missing,
                b.inconsistent,
                b.sku_invariant,
                b.phantom_units,
                b.unverified
            );
            for v in &b.violations {
                let _ = writeln!(out, "  - {v}");
            }
        }
        if let Some(exit) = &self.server.exit {
            let _ = writeln!(
                out,
                "server: {exit}{}",
                if self.server.exit_clean == Some(true) {
                    ""
                } else {
                    " (not a clean exit 0)"
                }
            );
        }
        out
    }
}

/// The stall table: each listed second's p99 beside the server's step maxima,
/// then the p99 with and without a snapshot phase.
fn write_stalls(out: &mut String, steps: &StepsSummary) {
    let polls = &steps.polls;
    let _ = writeln!(
        out,
        "server steps: {} of {} scrapes of /metrics sampled {} seconds ({} failed, {} repeated, {} without the gauge)",
        polls.samples,
        polls.polls,
        steps.seconds_sampled,
        polls.failures,
        polls.repeats,
        polls.empty
    );
    if steps.seconds_sampled == 0 {
        return;
    }
    let columns = server_steps::columns(&steps.stalls);
    let _ = write!(out, "{:>13} {:>9}", "second", "p99 ms");
    for c in &columns {
        let _ = write!(out, " {c:>14}");
    }
    let _ = writeln!(
        out,
        "   (step maxima, ms; - did not run, ? not sampled; * a snapshot step, ! a worst-{} p99)",
        crate::limits::STALL_WORST_SECONDS
    );
    for row in &steps.stalls {
        let start_s = (row.t_s - row.span_s).max(0.0);
        let mark = match (row.snapshot, row.worst) {
            (true, true) => "*!",
            (true, false) => "* ",
            (false, true) => " !",
            (false, false) => "  ",
        };
        let _ = write!(
            out,
            "{:>13} {:>9.2}",
            format!("{start_s:.1}-{:.1}", row.t_s),
            row.p99_ms
        );
        for c in &columns {
            match row.steps_max_ms.get(c) {
                Some(ms) => {
                    let _ = write!(out, " {ms:>14.3}");
                }
                // Not run in a sampled second; unknown in an unsampled one.
                None if row.samples > 0 => {
                    let _ = write!(out, " {:>14}", "-");
                }
                None => {
                    let _ = write!(out, " {:>14}", "?");
                }
            }
        }
        let _ = writeln!(out, " {mark}");
    }
    if steps.stalls_left_out > 0 {
        let _ = writeln!(
            out,
            "  ({} more seconds qualified; every second is in report.json's timeline)",
            steps.stalls_left_out
        );
    }
    let (w, wo) = (&steps.with_snapshot, &steps.without_snapshot);
    let _ = writeln!(
        out,
        "per-second p99: with a snapshot step {} s, max {:.2} ms, median {:.2} ms | without {} s, max {:.2} ms, median {:.2} ms",
        w.seconds, w.p99_max_ms, w.p99_median_ms, wo.seconds, wo.p99_max_ms, wo.p99_median_ms
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Outcome, Recorder};

    fn sample() -> Report {
        let mut rec = Recorder::default();
        for ms in 1..=100_u64 {
            rec.record(
                "POST /v1/orders",
                &Outcome::Answered {
                    status: 201,
                    code: None,
                },
                ms * 1000,
                false,
            );
        }
        rec.record(
            "POST /v1/orders",
            &Outcome::Answered {
                status: 409,
                code: Some("out_of_stock".into()),
            },
            500,
            false,
        );
        let endpoints = endpoint_reports(&rec.endpoints, 2.0);
        Report {
            scenario: "flash-sale".into(),
            requests: 101,
            ok: 100,
            rejected: 1,
            shed: 0,
            errors: 0,
            throughput_rps: 50.5,
            ok_rps: 50.0,
            latency_ms: endpoints[0].latency_ms,
            shed_latency_ms: LatencyMs::default(),
            ok_latency_ms: endpoints[0].ok_latency_ms,
            books: BookReport {
                ok: true,
                orders_checked: 100,
                skus_checked: 1,
                ..BookReport::default()
            },
            run: RunInfo {
                target: "spawned 127.0.0.1:1".into(),
                durability: "strict".into(),
                connections: 4,
                connects: 4,
                duration_s: 2.0,
                max_requests: 1000,
                elapsed_s: 2.0,
                stopped_early: false,
                waited: 0,
                backlog_unsent: 0,
                cores: 2,
                loadtest_version: "0".into(),
            },
            endpoints,
            detail: serde_json::Map::new(),
            timeline: Vec::new(),
            server_steps: None,
            server: ServerInfo::default(),
        }
    }

    #[test]
    fn the_report_has_the_fields_the_issue_names() {
        let json = serde_json::to_value(sample()).unwrap();
        for field in [
            "scenario",
            "requests",
            "ok",
            "rejected",
            "errors",
            "throughput_rps",
        ] {
            assert!(json.get(field).is_some(), "missing {field}");
        }
        for field in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                json["latency_ms"][field].is_number(),
                "missing latency_ms.{field}"
            );
        }
        for field in ["ok", "oversold", "acked_missing"] {
            assert!(json["books"].get(field).is_some(), "missing books.{field}");
        }
        assert_eq!(json["scenario"], "flash-sale");
        assert_eq!(json["requests"], 101);
        assert_eq!(json["books"]["ok"], true);
        let p99 = json["latency_ms"]["p99"].as_f64().unwrap();
        assert!((p99 - 99.0).abs() < 0.1, "p99 {p99}");
        let orders = &json["endpoints"][0];
        assert_eq!(orders["endpoint"], "POST /v1/orders");
        assert_eq!(orders["outcomes"]["409 out_of_stock"], 1);
        assert_eq!(
            orders["requests"], 101,
            "counts are flattened into the endpoint"
        );
    }

    #[test]
    fn the_report_round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let report = sample();
        let path = report.write_json(dir.path()).unwrap();
        let back: Report = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn the_table_shows_endpoints_outcomes_and_books() {
        let mut report = sample();
        let table = report.table();
        assert!(table.contains("POST /v1/orders"));
        assert!(table.contains("409 out_of_stock: 1"));
        assert!(table.contains("books: OK"));
        report.books.ok = false;
        report.books.oversold = 3;
        report
            .books
            .violations
            .push("SKU hot: 5 units granted, only 2 stocked".into());
        let table = report.table();
        assert!(table.contains("VIOLATED: oversold 3"));
        assert!(table.contains("only 2 stocked"));
    }
}
