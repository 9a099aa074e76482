//! The server's background steps beside the per-second p99: a stall next to
//! its cause.
//!
//! During a run a [`Poller`] scrapes the target's `GET /metrics` about once a
//! second and keeps the `flashcore_step_last_second_max_seconds{step="..."}`
//! gauges: the longest run of each background step (journal write and sync,
//! snapshot capture and write, epoch drop, sweeps) in the server's last whole
//! second. Each scrape becomes a [`StepSample`] placed at the second it
//! describes (the scrape's start minus [`limits::METRICS_SAMPLE_LAG`]);
//! [`attribute`] merges the samples into the timeline's buckets, and
//! [`summarize`] picks the seconds worth reading (a snapshot phase, or among
//! the worst p99s) and splits the per-second p99s into seconds with and
//! without a snapshot phase.
//!
//! Never fatal: a scrape that fails, times out or answers non-200 is counted
//! and the run goes on; a server without the gauge gives an empty table.
//! A scrape answered with the very text of the scrape before is the server's
//! cached render, not a new second, and is counted as a repeat and dropped,
//! so no second is reported twice. The placement is an estimate: the server's
//! seconds are not aligned with the run's, so a step near a bucket's edge may
//! land in the bucket beside it, and now and then a second is not sampled
//! (`server_steps_samples` is 0 for its bucket).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use hyper::body::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{Call, Conn};
use crate::limits;
use crate::stats::TimelinePoint;

/// The gauge read from `/metrics`.
pub const GAUGE: &str = "flashcore_step_last_second_max_seconds";

/// The steps of a snapshot: its capture, its write, and the epoch drop after.
pub const SNAPSHOT_STEPS: [&str; 3] = ["capture", "snapshot_write", "epoch_drop"];

/// The server's steps in the order it exports them; the table's columns
/// follow it, and steps it does not list come after, by name.
pub const KNOWN_STEPS: [&str; 10] = [
    "journal_write",
    "journal_sync",
    "actor_capture",
    "capture",
    "snapshot_write",
    "epoch_drop",
    "expiry",
    "archive",
    "key_eviction",
    "spill",
];

/// What one `/metrics` text holds of the gauge.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedSteps {
    /// Longest run of each step in the last whole second, milliseconds
    /// (zeros included; the largest value when a step is listed twice).
    pub steps_max_ms: BTreeMap<String, f64>,
    /// Lines of the gauge that could not be read (no `step` label, a bad
    /// value, a bad name); other metrics are never counted here.
    pub bad_lines: u64,
}

/// Reads the [`GAUGE`] lines of a Prometheus text; every other line is
/// skipped.
#[must_use]
pub fn parse(text: &str) -> ParsedSteps {
    let mut parsed = ParsedSteps::default();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix(GAUGE) else {
            continue;
        };
        // `..._seconds_total` and the like are other metrics.
        if !rest.starts_with(['{', ' ', '\t']) {
            continue;
        }
        match parse_sample(rest) {
            Some((step, seconds)) => {
                let ms = seconds * 1000.0;
                let slot = parsed.steps_max_ms.entry(step).or_insert(ms);
                *slot = slot.max(ms);
            }
            None => parsed.bad_lines = parsed.bad_lines.saturating_add(1),
        }
    }
    parsed
}

/// `{labels} value [timestamp]` after the metric's name: the `step` label and
/// the value in seconds, or `None` when the line is malformed.
fn parse_sample(rest: &str) -> Option<(String, f64)> {
    let rest = rest.trim_start().strip_prefix('{')?;
    let (labels, after) = split_labels(rest)?;
    let step = labels
        .into_iter()
        .find_map(|(name, value)| (name == "step").then_some(value))?;
    let name_ok = !step.is_empty()
        && step.len() <= limits::STEP_NAME_BYTES_MAX
        && step
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !name_ok {
        return None;
    }
    let mut fields = after.split_whitespace();
    let seconds: f64 = fields.next()?.parse().ok()?;
    // An optional timestamp, then nothing.
    if let Some(timestamp) = fields.next() {
        timestamp.parse::<i64>().ok()?;
    }
    if fields.next().is_some() || !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some((step, seconds))
}

/// The label pairs up to the closing `}` (values unescaped), and the text
/// after it. Bounded by the line: each pass consumes at least one byte.
fn split_labels(mut rest: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        rest = rest.trim_start();
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let name = rest.get(..eq)?.trim();
        if name.is_empty() {
            return None;
        }
        let quoted = rest.get(eq + 1..)?.trim_start().strip_prefix('"')?;
        let (value, after) = read_quoted(quoted)?;
        labels.push((name.to_owned(), value));
        rest = after.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

/// A label value up to its closing quote, with `\\`, `\"` and `\n` unescaped.
fn read_quoted(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, text.get(i + 1..)?)),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                other => value.push(other),
            },
            other => value.push(other),
        }
    }
    None
}

/// One scrape's gauges, placed in the run.
#[derive(Debug, Clone, PartialEq)]
pub struct StepSample {
    /// Where in the run the second it describes lies, seconds since the load
    /// started (negative: before the load).
    pub at_s: f64,
    /// The nonzero steps, milliseconds.
    pub steps_max_ms: BTreeMap<String, f64>,
}

impl StepSample {
    /// A sample from a scrape sent `sent_s` seconds after the load started.
    #[must_use]
    pub fn from_scrape(sent_s: f64, parsed: &ParsedSteps) -> Self {
        Self {
            at_s: sent_s - limits::METRICS_SAMPLE_LAG.as_secs_f64(),
            steps_max_ms: parsed
                .steps_max_ms
                .iter()
                .filter(|(_, ms)| **ms > 0.0)
                .map(|(step, ms)| (step.clone(), *ms))
                .collect(),
        }
    }
}

/// Merges `samples` into the timeline: a sample belongs to the bucket that
/// holds its `at_s` (bucket *i* covers the time after bucket *i-1* ended up
/// to its own `t_s`; the first starts at 0), and each step keeps its largest
/// value there. Returns how many samples fell outside the run.
pub fn attribute(timeline: &mut [TimelinePoint], samples: &[StepSample]) -> u64 {
    debug_assert!(
        timeline.windows(2).all(|w| w[0].t_s <= w[1].t_s),
        "timeline in time order"
    );
    let mut outside = 0_u64;
    for sample in samples {
        let index = timeline.partition_point(|p| p.t_s < sample.at_s);
        let point = match timeline.get_mut(index) {
            Some(point) if sample.at_s >= 0.0 => point,
            _ => {
                outside = outside.saturating_add(1);
                continue;
            }
        };
        point.server_steps_samples = point.server_steps_samples.saturating_add(1);
        for (step, ms) in &sample.steps_max_ms {
            let slot = point.server_steps_max_ms.entry(step.clone()).or_insert(*ms);
            *slot = slot.max(*ms);
        }
    }
    outside
}

/// What the poller saw, for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollCounts {
    /// Scrapes sent.
    pub polls: u64,
    /// Scrapes with no answer in time, or an answer other than 200.
    pub failures: u64,
    /// Answers identical to the one before (the server's cached text).
    pub repeats: u64,
    /// Answers without a single readable gauge line.
    pub empty: u64,
    /// Gauge lines that could not be read.
    pub bad_lines: u64,
    /// Samples kept (one per fresh answer with the gauge).
    pub samples: u64,
    /// Samples whose second lies outside the run's timeline.
    pub outside_run: u64,
}

/// Spread of the per-second p99s over a set of seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct P99Spread {
    /// Seconds (timeline buckets) in the set.
    pub seconds: u64,
    /// Largest per-second p99, milliseconds (0 for no seconds).
    pub p99_max_ms: f64,
    /// Median per-second p99 (the upper one for an even count), milliseconds.
    pub p99_median_ms: f64,
}

impl P99Spread {
    fn of(mut p99s: Vec<f64>) -> Self {
        p99s.sort_by(f64::total_cmp);
        Self {
            seconds: u64::try_from(p99s.len()).unwrap_or(u64::MAX),
            p99_max_ms: p99s.last().copied().unwrap_or(0.0),
            p99_median_ms: p99s.get(p99s.len() / 2).copied().unwrap_or(0.0),
        }
    }
}

/// One second of the stall table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StallRow {
    /// End of the bucket, seconds since the load started.
    pub t_s: f64,
    /// Length of the bucket in seconds.
    pub span_s: f64,
    /// The bucket's p99, milliseconds.
    pub p99_ms: f64,
    /// A snapshot step ([`SNAPSHOT_STEPS`]) ran in it.
    pub snapshot: bool,
    /// Its p99 is among the run's [`limits::STALL_WORST_SECONDS`] worst.
    pub worst: bool,
    /// Scrapes that fell in it (0: its steps are unknown).
    pub samples: u32,
    /// The nonzero step maxima, milliseconds.
    pub steps_max_ms: BTreeMap<String, f64>,
}

/// `server_steps` in `report.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepsSummary {
    /// The scrapes.
    pub polls: PollCounts,
    /// Buckets with at least one sample.
    pub seconds_sampled: u64,
    /// Per-second p99 over the sampled seconds with a snapshot step.
    pub with_snapshot: P99Spread,
    /// Per-second p99 over the sampled seconds without one.
    pub without_snapshot: P99Spread,
    /// The seconds with a snapshot step or a worst-five p99, in time order.
    pub stalls: Vec<StallRow>,
    /// Seconds that qualified but were left out past
    /// [`limits::STALL_ROWS_MAX`] (the lowest p99s go first).
    pub stalls_left_out: u64,
}

fn has_snapshot_step(point: &TimelinePoint) -> bool {
    SNAPSHOT_STEPS.iter().any(|step| {
        point
            .server_steps_max_ms
            .get(*step)
            .is_some_and(|ms| *ms > 0.0)
    })
}

/// A bucket whose p99 means something: it has answers that were timed.
fn has_latency(point: &TimelinePoint) -> bool {
    point.requests > point.shed
}

/// The stall table and the with/without split of a timeline that went
/// through [`attribute`].
#[must_use]
pub fn summarize(timeline: &[TimelinePoint], polls: PollCounts) -> StepsSummary {
    let sampled: Vec<&TimelinePoint> = timeline
        .iter()
        .filter(|p| p.server_steps_samples > 0 && has_latency(p))
        .collect();
    let (with, without): (Vec<&TimelinePoint>, Vec<&TimelinePoint>) =
        sampled.iter().partition(|p| has_snapshot_step(p));

    // The worst seconds by p99 (the earlier one first on a tie).
    let mut by_p99: Vec<usize> = (0..timeline.len())
        .filter(|i| timeline.get(*i).is_some_and(has_latency))
        .collect();
    by_p99.sort_by(|a, b| p99_at(timeline, *b).total_cmp(&p99_at(timeline, *a)));
    let worst: Vec<usize> = by_p99
        .into_iter()
        .take(limits::STALL_WORST_SECONDS)
        .collect();

    let mut rows: Vec<StallRow> = timeline
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let snapshot = has_snapshot_step(p);
            let is_worst = worst.contains(&i);
            (snapshot || is_worst).then(|| StallRow {
                t_s: p.t_s,
                span_s: p.span_s,
                p99_ms: p.p99_ms,
                snapshot,
                worst: is_worst,
                samples: p.server_steps_samples,
                steps_max_ms: p.server_steps_max_ms.clone(),
            })
        })
        .collect();
    let mut left_out = 0_u64;
    if rows.len() > limits::STALL_ROWS_MAX {
        // Keep the worst-five rows and the highest p99s, then restore time order.
        rows.sort_by(|a, b| b.worst.cmp(&a.worst).then(b.p99_ms.total_cmp(&a.p99_ms)));
        left_out = u64::try_from(rows.len() - limits::STALL_ROWS_MAX).unwrap_or(u64::MAX);
        rows.truncate(limits::STALL_ROWS_MAX);
        rows.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    }
    assert!(rows.len() <= limits::STALL_ROWS_MAX);
    StepsSummary {
        polls,
        seconds_sampled: u64::try_from(sampled.len()).unwrap_or(u64::MAX),
        with_snapshot: P99Spread::of(with.iter().map(|p| p.p99_ms).collect()),
        without_snapshot: P99Spread::of(without.iter().map(|p| p.p99_ms).collect()),
        stalls: rows,
        stalls_left_out: left_out,
    }
}

fn p99_at(timeline: &[TimelinePoint], index: usize) -> f64 {
    timeline.get(index).map_or(0.0, |p| p.p99_ms)
}

/// The table's step columns: every step nonzero in some row, the server's
/// order first.
#[must_use]
pub fn columns(rows: &[StallRow]) -> Vec<String> {
    let seen: std::collections::BTreeSet<&str> = rows
        .iter()
        .flat_map(|r| r.steps_max_ms.keys().map(String::as_str))
        .collect();
    let mut out: Vec<String> = KNOWN_STEPS
        .iter()
        .filter(|s| seen.contains(*s))
        .map(|s| (*s).to_owned())
        .collect();
    out.extend(
        seen.iter()
            .filter(|s| !KNOWN_STEPS.contains(s))
            .map(|s| (*s).to_owned()),
    );
    out
}

/// What the poller hands back when it stops.
#[derive(Debug, Clone, Default)]
pub struct Polled {
    /// The samples, in scrape order.
    pub samples: Vec<StepSample>,
    /// The counts (`outside_run` is the caller's, from [`attribute`]).
    pub counts: PollCounts,
}

/// The background scraper of one run: spawned with [`Poller::spawn`],
/// stopped with [`Poller::finish`].
#[derive(Debug)]
pub struct Poller {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Polled>,
}

impl Poller {
    /// Starts scraping `addr`'s `/metrics`; samples are placed relative to
    /// `started` (the load's start).
    #[must_use]
    pub fn spawn(addr: SocketAddr, started: Instant) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(poll(addr, started, stopped));
        Self { stop, task }
    }

    /// Stops the scraper (a scrape in flight is abandoned) and returns what
    /// it saw; a poller that panicked has seen nothing.
    pub async fn finish(self) -> Polled {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

async fn poll(addr: SocketAddr, started: Instant, mut stopped: oneshot::Receiver<()>) -> Polled {
    let mut polled = Polled::default();
    let Ok(mut conn) = Conn::new(addr, limits::METRICS_POLL_TIMEOUT) else {
        return polled;
    };
    let mut last_body: Option<Bytes> = None;
    for _ in 0..limits::METRICS_POLLS_MAX {
        let sent = Instant::now();
        let call = Call::get("/metrics");
        let answer = tokio::select! {
            biased;
            _ = &mut stopped => break,
            answer = conn.send(&call) => answer,
        };
        let counts = &mut polled.counts;
        counts.polls = counts.polls.saturating_add(1);
        match answer {
            Ok(answer) if answer.status == 200 => {
                if last_body.as_ref() == Some(&answer.body) {
                    counts.repeats = counts.repeats.saturating_add(1);
                } else {
                    let parsed = parse(&String::from_utf8_lossy(&answer.body));
                    counts.bad_lines = counts.bad_lines.saturating_add(parsed.bad_lines);
                    if parsed.steps_max_ms.is_empty() {
                        counts.empty = counts.empty.saturating_add(1);
                    } else {
                        let sent_s = sent.saturating_duration_since(started).as_secs_f64();
                        polled
                            .samples
                            .push(StepSample::from_scrape(sent_s, &parsed));
                        counts.samples = counts.samples.saturating_add(1);
                    }
                    last_body = Some(answer.body);
                }
            }
            Ok(_) | Err(_) => counts.failures = counts.failures.saturating_add(1),
        }
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            () = tokio::time::sleep(limits::METRICS_POLL_GAP) => {}
        }
    }
    polled
}
