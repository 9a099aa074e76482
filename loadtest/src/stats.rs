//! What every answer teaches us: outcome counts and latency histograms.
//!
//! Each worker records into its own [`Recorder`] (behind an uncontended
//! mutex that the progress view locks a few times a second). At the end the
//! recorders are merged with [`merge_endpoints`]; hdrhistogram merging is
//! exact, so merged percentiles are those of one histogram fed every sample.
//!
//! Latencies are microseconds, clamped at [`limits::LATENCY_US_MAX`].
//! Answers are split four ways ([`Class`]): `ok` (2xx), `rejected` (the
//! business refusals a sale expects: `out_of_stock`, `limit_exceeded`), `shed`
//! (503 `overloaded`, with its own histogram) and `errors` (everything else,
//! including requests that got no answer, which have no latency).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::client::{Answer, Failure};
use crate::limits;

/// Latency samples in microseconds.
pub type LatencyHistogram = Histogram<u64>;

/// An empty histogram with the tool's precision; it grows as values arrive.
#[must_use]
pub fn new_histogram() -> LatencyHistogram {
    // Cannot fail: the precision is a constant checked at compile time in limits.rs.
    Histogram::new(limits::LATENCY_SIGFIG).expect("LATENCY_SIGFIG is within 0..=5")
}

/// Records `value_us` (clamped to [`limits::LATENCY_US_MAX`]), growing the
/// histogram as needed; `saturating_record` alone would clamp to the current
/// size of an auto-resizing histogram and lose the value.
pub fn record_us(histogram: &mut LatencyHistogram, value_us: u64) {
    let value_us = value_us.min(limits::LATENCY_US_MAX);
    if histogram.record(value_us).is_err() {
        histogram.saturating_record(value_us);
    }
}

/// A duration as whole microseconds, clamped to [`limits::LATENCY_US_MAX`].
#[must_use]
pub fn duration_us(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .min(limits::LATENCY_US_MAX)
}

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// An answer with this status and, for non-2xx, the error code if any.
    Answered {
        /// HTTP status.
        status: u16,
        /// `error.code` of a non-2xx body.
        code: Option<String>,
    },
    /// No answer: the request may or may not have happened.
    NoAnswer(Failure),
}

impl Outcome {
    /// The outcome of an answer.
    #[must_use]
    pub fn of(result: &Result<Answer, Failure>) -> Self {
        match result {
            Ok(answer) => Self::Answered {
                status: answer.status,
                code: answer.error_code(),
            },
            Err(failure) => Self::NoAnswer(*failure),
        }
    }

    /// Which of the four counts it goes to.
    #[must_use]
    pub fn class(&self) -> Class {
        match self {
            Self::Answered { status, .. } if (200..300).contains(status) => Class::Ok,
            Self::Answered {
                status: 409,
                code: Some(code),
            } if code == "out_of_stock" || code == "limit_exceeded" => Class::Rejected,
            Self::Answered {
                status: 503,
                code: Some(code),
            } if code == "overloaded" => Class::Shed,
            Self::Answered { .. } | Self::NoAnswer(_) => Class::Error,
        }
    }

    /// A key for tables: `201`, `409 out_of_stock`, `no answer: timeout`.
    #[must_use]
    pub fn key(&self) -> String {
        match self {
            Self::Answered {
                status,
                code: Some(code),
            } => format!("{status} {code}"),
            Self::Answered { status, code: None } => status.to_string(),
            Self::NoAnswer(failure) => format!("no answer: {}", failure.label()),
        }
    }
}

/// The four ways an answer is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx.
    Ok,
    /// An expected business refusal (409 `out_of_stock` / `limit_exceeded`).
    Rejected,
    /// 503 `overloaded`: the server shed the request.
    Shed,
    /// Anything else, including no answer.
    Error,
}

/// Counts that add: requests and their split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// All requests sent (or attempted).
    pub requests: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Expected business refusals.
    pub rejected: u64,
    /// 503 `overloaded`.
    pub shed: u64,
    /// Unexpected answers and requests with no answer.
    pub errors: u64,
    /// Open-loop requests that found no free connection at their intended
    /// start, and whose latency therefore includes the wait.
    pub waited: u64,
}

impl Counts {
    fn count(&mut self, class: Class, waited: bool) {
        self.requests = self.requests.saturating_add(1);
        let slot = match class {
            Class::Ok => &mut self.ok,
            Class::Rejected => &mut self.rejected,
            Class::Shed => &mut self.shed,
            Class::Error => &mut self.errors,
        };
        *slot = slot.saturating_add(1);
        if waited {
            self.waited = self.waited.saturating_add(1);
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Self) {
        self.requests = self.requests.saturating_add(other.requests);
        self.ok = self.ok.saturating_add(other.ok);
        self.rejected = self.rejected.saturating_add(other.rejected);
        self.shed = self.shed.saturating_add(other.shed);
        self.errors = self.errors.saturating_add(other.errors);
        self.waited = self.waited.saturating_add(other.waited);
    }

    /// Requests that got an answer the server served (ok + rejected).
    #[must_use]
    pub fn served(&self) -> u64 {
        self.ok.saturating_add(self.rejected)
    }
}

/// Everything recorded for one endpoint.
#[derive(Debug, Clone)]
pub struct EndpointStats {
    /// Counts by class.
    pub counts: Counts,
    /// Counts by status and error code (`201`, `409 out_of_stock`, ...).
    pub outcomes: BTreeMap<String, u64>,
    /// Latency of every answer except shed ones.
    pub latency: LatencyHistogram,
    /// Latency of shed (503 `overloaded`) answers.
    pub shed_latency: LatencyHistogram,
    /// Latency of 2xx answers alone (a sale's grants, apart from its refusals).
    pub ok_latency: LatencyHistogram,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self {
            counts: Counts::default(),
            outcomes: BTreeMap::new(),
            latency: new_histogram(),
            shed_latency: new_histogram(),
            ok_latency: new_histogram(),
        }
    }
}

impl EndpointStats {
    /// Records one request.
    pub fn record(&mut self, outcome: &Outcome, latency_us: u64, waited: bool) {
        let class = outcome.class();
        self.counts.count(class, waited);
        let slot = self.outcomes.entry(outcome.key()).or_insert(0);
        *slot = slot.saturating_add(1);
        match (class, outcome) {
            (_, Outcome::NoAnswer(_)) => {}
            (Class::Shed, _) => record_us(&mut self.shed_latency, latency_us),
            (Class::Ok, _) => {
                record_us(&mut self.latency, latency_us);
                record_us(&mut self.ok_latency, latency_us);
            }
            _ => record_us(&mut self.latency, latency_us),
        }
    }

    /// Adds `other` into `self`: counts add, histograms merge exactly.
    ///
    /// # Errors
    ///
    /// A histogram could not take the other's values (it auto-resizes, so this
    /// does not happen for histograms made by [`new_histogram`]).
    pub fn merge(&mut self, other: &Self) -> Result<()> {
        self.counts.add(&other.counts);
        for (key, n) in &other.outcomes {
            let slot = self.outcomes.entry(key.clone()).or_insert(0);
            *slot = slot.saturating_add(*n);
        }
        self.latency
            .add(&other.latency)
            .context("merging latency histograms")?;
        self.shed_latency
            .add(&other.shed_latency)
            .context("merging shed histograms")?;
        self.ok_latency
            .add(&other.ok_latency)
            .context("merging 2xx histograms")?;
        Ok(())
    }
}

/// What one worker saw since the progress view last drained it.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Counts in this interval.
    pub counts: Counts,
    /// Latency of answers (except shed ones) in this interval.
    pub latency: LatencyHistogram,
    /// Units in the orders answered 201 in this interval (what was sold).
    pub granted_units: u64,
}

impl Default for Interval {
    fn default() -> Self {
        Self {
            counts: Counts::default(),
            latency: new_histogram(),
            granted_units: 0,
        }
    }
}

impl Interval {
    /// Moves everything in `other` into `self` and leaves `other` empty.
    pub fn drain_from(&mut self, other: &mut Self) {
        self.counts.add(&other.counts);
        // Same precision and auto-resize on both sides: cannot fail.
        let _ = self.latency.add(&other.latency);
        self.granted_units = self.granted_units.saturating_add(other.granted_units);
        other.granted_units = 0;
        other.counts = Counts::default();
        other.latency.reset();
    }
}

/// One worker's record: totals per endpoint, and the current interval.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Totals per endpoint label (`POST /v1/orders`, ...).
    pub endpoints: BTreeMap<&'static str, EndpointStats>,
    /// Since the last drain.
    pub interval: Interval,
}

impl Recorder {
    /// Records one request to `endpoint`.
    pub fn record(
        &mut self,
        endpoint: &'static str,
        outcome: &Outcome,
        latency_us: u64,
        waited: bool,
    ) {
        self.endpoints
            .entry(endpoint)
            .or_default()
            .record(outcome, latency_us, waited);
        let class = outcome.class();
        self.interval.counts.count(class, waited);
        if matches!(outcome, Outcome::Answered { .. }) && class != Class::Shed {
            record_us(&mut self.interval.latency, latency_us);
        }
    }
}

/// Merges per-worker endpoint tables into one.
///
/// # Errors
///
/// A histogram merge failed (see [`EndpointStats::merge`]).
pub fn merge_endpoints<'a, I>(parts: I) -> Result<BTreeMap<&'static str, EndpointStats>>
where
    I: IntoIterator<Item = &'a BTreeMap<&'static str, EndpointStats>>,
{
    let mut merged: BTreeMap<&'static str, EndpointStats> = BTreeMap::new();
    for part in parts {
        for (endpoint, stats) in part {
            merged.entry(endpoint).or_default().merge(stats)?;
        }
    }
    Ok(merged)
}

/// All endpoints folded into one.
///
/// # Errors
///
/// A histogram merge failed (see [`EndpointStats::merge`]).
pub fn total(endpoints: &BTreeMap<&'static str, EndpointStats>) -> Result<EndpointStats> {
    let mut all = EndpointStats::default();
    for stats in endpoints.values() {
        all.merge(stats)?;
    }
    Ok(all)
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyMs {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest sample.
    pub max: f64,
}

impl LatencyMs {
    /// Reads the percentiles of `histogram` (all zero when it is empty).
    #[must_use]
    pub fn of(histogram: &LatencyHistogram) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50: us_to_ms(histogram.value_at_quantile(0.50)),
            p90: us_to_ms(histogram.value_at_quantile(0.90)),
            p99: us_to_ms(histogram.value_at_quantile(0.99)),
            p999: us_to_ms(histogram.value_at_quantile(0.999)),
            max: us_to_ms(histogram.max()),
        }
    }
}

/// Microseconds to milliseconds, rounded to the microsecond.
#[must_use]
pub fn us_to_ms(value_us: u64) -> f64 {
    // u64 -> f64 loses precision only above 2^53 us (285 years).
    #[allow(clippy::cast_precision_loss)]
    let ms = value_us as f64 / 1000.0;
    ms
}

/// One point of the run over time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// End of the bucket, seconds since the load started.
    pub t_s: f64,
    /// Length of the bucket in seconds.
    pub span_s: f64,
    /// Requests finished in the bucket.
    pub requests: u64,
    /// Served answers (ok + rejected) per second.
    pub throughput_rps: f64,
    /// 2xx answers in the bucket.
    pub ok: u64,
    /// Errors in the bucket.
    pub errors: u64,
    /// Shed answers in the bucket.
    pub shed: u64,
    /// Median latency of answers (except shed ones) in the bucket.
    pub p50_ms: f64,
    /// p99 latency of answers (except shed ones) in the bucket.
    pub p99_ms: f64,
    /// Units in the orders answered 201 in the bucket (reports written
    /// before this field read as 0).
    #[serde(default)]
    pub granted_units: u64,
    /// The server's resident memory at the end of the bucket, when known.
    pub server_rss_kib: Option<u64>,
    /// Scrapes of the server's `/metrics` whose second falls in the bucket
    /// (0: the server's steps are unknown here, not absent). Reports written
    /// before this field read as 0.
    #[serde(default)]
    pub server_steps_samples: u32,
    /// The longest run of each server background step in the bucket,
    /// milliseconds, over those scrapes (`server_steps.rs`); steps that did
    /// not run are left out. Reports written before this field read as empty.
    #[serde(default)]
    pub server_steps_max_ms: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Outcome {
        Outcome::Answered {
            status: 201,
            code: None,
        }
    }

    #[test]
    fn classes() {
        assert_eq!(ok().class(), Class::Ok);
        let sold_out = Outcome::Answered {
            status: 409,
            code: Some("out_of_stock".into()),
        };
        assert_eq!(sold_out.class(), Class::Rejected);
        assert_eq!(sold_out.key(), "409 out_of_stock");
        let shed = Outcome::Answered {
            status: 503,
            code: Some("overloaded".into()),
        };
        assert_eq!(shed.class(), Class::Shed);
        let storage = Outcome::Answered {
            status: 503,
            code: Some("storage_unavailable".into()),
        };
        assert_eq!(storage.class(), Class::Error);
        assert_eq!(Outcome::NoAnswer(Failure::Timeout).class(), Class::Error);
        assert_eq!(
            Outcome::NoAnswer(Failure::Timeout).key(),
            "no answer: timeout"
        );
        let bare = Outcome::Answered {
            status: 500,
            code: None,
        };
        assert_eq!(bare.class(), Class::Error);
    }

    #[test]
    fn merging_workers_gives_the_percentiles_of_all_samples() {
        // Worker A saw 1..=500 ms, worker B 501..=1000 ms: together 1..=1000.
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        for ms in 1..=500_u64 {
            a.record("POST /v1/orders", &ok(), ms * 1000, false);
        }
        for ms in 501..=1000_u64 {
            b.record("POST /v1/orders", &ok(), ms * 1000, false);
        }
        b.record(
            "POST /v1/orders",
            &Outcome::NoAnswer(Failure::Broken),
            0,
            false,
        );
        b.record("GET /v1/skus", &ok(), 7000, false);

        let merged = merge_endpoints([&a.endpoints, &b.endpoints]).unwrap();
        let orders = &merged["POST /v1/orders"];
        assert_eq!(orders.counts.requests, 1001);
        assert_eq!(orders.counts.ok, 1000);
        assert_eq!(orders.counts.errors, 1);
        assert_eq!(orders.outcomes["201"], 1000);
        assert_eq!(orders.outcomes["no answer: connection broken"], 1);
        assert_eq!(
            orders.latency.len(),
            1000,
            "no-answer requests have no latency"
        );

        let p = LatencyMs::of(&orders.latency);
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(p.p50, 500.0), "p50 {}", p.p50);
        assert!(close(p.p90, 900.0), "p90 {}", p.p90);
        assert!(close(p.p99, 990.0), "p99 {}", p.p99);
        assert!(close(p.p999, 999.0), "p999 {}", p.p999);
        assert!(close(p.max, 1000.0), "max {}", p.max);

        // A single worker with the other half alone has very different numbers.
        let alone = LatencyMs::of(&a.endpoints["POST /v1/orders"].latency);
        assert!(close(alone.p99, 495.0), "p99 alone {}", alone.p99);

        let all = total(&merged).unwrap();
        assert_eq!(all.counts.requests, 1002);
        assert_eq!(all.latency.len(), 1001);
    }

    #[test]
    fn shed_answers_have_their_own_histogram() {
        let mut stats = EndpointStats::default();
        let shed = Outcome::Answered {
            status: 503,
            code: Some("overloaded".into()),
        };
        stats.record(&shed, 100, true);
        stats.record(&ok(), 5_000, false);
        assert_eq!(stats.counts.shed, 1);
        assert_eq!(stats.counts.waited, 1);
        assert_eq!(stats.shed_latency.len(), 1);
        assert_eq!(stats.latency.len(), 1);
        assert!((LatencyMs::of(&stats.latency).max - 5.0).abs() < 0.01);
    }

    #[test]
    fn intervals_drain() {
        let mut rec = Recorder::default();
        rec.record("GET /v1/skus", &ok(), 1_000, false);
        rec.record("GET /v1/skus", &ok(), 2_000, false);
        let mut acc = Interval::default();
        acc.drain_from(&mut rec.interval);
        assert_eq!(acc.counts.requests, 2);
        assert_eq!(acc.latency.len(), 2);
        assert_eq!(rec.interval.counts.requests, 0);
        assert!(rec.interval.latency.is_empty());
        assert_eq!(
            rec.endpoints["GET /v1/skus"].counts.requests, 2,
            "totals stay"
        );
    }

    #[test]
    fn huge_latencies_are_clamped_not_lost() {
        let mut stats = EndpointStats::default();
        stats.record(&ok(), u64::MAX, false);
        assert_eq!(stats.latency.len(), 1);
        assert_eq!(
            duration_us(Duration::from_secs(u64::MAX)),
            limits::LATENCY_US_MAX
        );
    }
}
