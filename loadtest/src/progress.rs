//! The live view and the timeline: drains every worker's recorder a few times
//! a second.
//!
//! On a terminal, an `indicatif` bar shows elapsed time, req/s, errors and the
//! running p99 (of the last timeline bucket, about one second); otherwise one
//! plain line per [`limits::PLAIN_PROGRESS_INTERVAL`], so logs stay readable.
//! The same drains build the [`TimelinePoint`] series for the chart: buckets of
//! one second, widened for long runs so there are at most
//! [`limits::TIMELINE_POINTS_MAX`] points.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::oneshot;

use crate::cli::ProgressMode;
use crate::limits;
use crate::stats::{Counts, Interval, Recorder, TimelinePoint, us_to_ms};
use crate::target::rss_kib;

/// The bucket width for a run of `duration`: one second, or wider so the
/// timeline stays within [`limits::TIMELINE_POINTS_MAX`] points.
#[must_use]
pub fn bucket_for(duration: Duration) -> Duration {
    let secs = duration
        .as_secs()
        .div_ceil(limits::TIMELINE_POINTS_MAX)
        .max(1);
    Duration::from_secs(secs)
}

enum View {
    Bar(ProgressBar),
    Plain { last_line: Instant },
    Off,
}

/// Drains recorders into the live view and the timeline until told to stop.
pub struct Collector {
    recorders: Vec<Arc<Mutex<Recorder>>>,
    started: Instant,
    planned: Duration,
    bucket: Duration,
    rss_pid: Option<u32>,
    view: View,
}

impl Collector {
    /// A collector for a run that started at `started` and lasts `planned`;
    /// `rss_pid` is the server process to sample memory from, if known.
    #[must_use]
    pub fn new(
        recorders: Vec<Arc<Mutex<Recorder>>>,
        started: Instant,
        planned: Duration,
        rss_pid: Option<u32>,
        mode: ProgressMode,
    ) -> Self {
        let bar = match mode {
            ProgressMode::Auto => std::io::stdout().is_terminal(),
            ProgressMode::Bar => true,
            ProgressMode::Plain | ProgressMode::Off => false,
        };
        let view = if bar {
            let bar = ProgressBar::with_draw_target(
                Some(planned.as_secs().max(1)),
                ProgressDrawTarget::stdout(),
            );
            let style = ProgressStyle::with_template(
                "[{elapsed_precise}] {bar:30.cyan/blue} {pos:>4}/{len}s  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            View::Bar(bar)
        } else if mode == ProgressMode::Off {
            View::Off
        } else {
            View::Plain { last_line: started }
        };
        Self {
            recorders,
            started,
            planned,
            bucket: bucket_for(planned),
            rss_pid,
            view,
        }
    }

    fn drain(&self, into: &mut Interval) {
        for rec in &self.recorders {
            let mut rec = rec.lock().unwrap_or_else(PoisonError::into_inner);
            into.drain_from(&mut rec.interval);
        }
    }

    fn point(&self, acc: &Interval, bucket_start: Instant, now: Instant) -> TimelinePoint {
        let span_s = now.saturating_duration_since(bucket_start).as_secs_f64();
        #[allow(clippy::cast_precision_loss)] // counts far below 2^53
        let throughput_rps = if span_s > 0.0 {
            acc.counts.served() as f64 / span_s
        } else {
            0.0
        };
        let (p50_ms, p99_ms) = if acc.latency.is_empty() {
            (0.0, 0.0)
        } else {
            (
                us_to_ms(acc.latency.value_at_quantile(0.50)),
                us_to_ms(acc.latency.value_at_quantile(0.99)),
            )
        };
        TimelinePoint {
            t_s: now.saturating_duration_since(self.started).as_secs_f64(),
            span_s,
            requests: acc.counts.requests,
            throughput_rps,
            ok: acc.counts.ok,
            errors: acc.counts.errors,
            shed: acc.counts.shed,
            p50_ms,
            p99_ms,
            granted_units: acc.granted_units,
            server_rss_kib: self.rss_pid.and_then(rss_kib),
            server_steps_samples: 0,
            server_steps_max_ms: std::collections::BTreeMap::new(),
        }
    }

    fn show(&mut self, totals: &Counts, last: Option<&TimelinePoint>, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        let (rps, p99) = last.map_or((0.0, 0.0), |p| (p.throughput_rps, p.p99_ms));
        let msg = format!(
            "{rps:>8.0} req/s  p99 {p99:>7.2} ms  ok {}  rejected {}  shed {}  errors {}",
            totals.ok, totals.rejected, totals.shed, totals.errors
        );
        match &mut self.view {
            View::Bar(bar) => {
                bar.set_position(elapsed.as_secs().min(self.planned.as_secs()));
                bar.set_message(msg);
            }
            View::Plain { last_line } => {
                if now.saturating_duration_since(*last_line) >= limits::PLAIN_PROGRESS_INTERVAL {
                    *last_line = now;
                    println!("[{:>6.1}s] {msg}", elapsed.as_secs_f64());
                }
            }
            View::Off => {}
        }
    }

    /// Runs until `done` fires (all workers finished); returns the timeline.
    pub async fn run(mut self, mut done: oneshot::Receiver<()>) -> Vec<TimelinePoint> {
        let mut ticker = tokio::time::interval(limits::PROGRESS_TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut timeline: Vec<TimelinePoint> = Vec::new();
        let mut acc = Interval::default();
        let mut totals = Counts::default();
        let mut bucket_start = self.started;
        // Buckets end on a fixed grid (start + k * bucket), so ticks that land a
        // hair early do not stretch a bucket by a whole tick.
        let mut bucket_end = self.started + self.bucket;
        loop {
            let finished = tokio::select! {
                _ = ticker.tick() => false,
                _ = &mut done => true,
            };
            let mut fresh = Interval::default();
            self.drain(&mut fresh);
            totals.add(&fresh.counts);
            acc.drain_from(&mut fresh);
            let now = Instant::now();
            let tolerance = limits::PROGRESS_TICK / 4;
            let full = now + tolerance >= bucket_end;
            if full || (finished && acc.counts.requests > 0) {
                timeline.push(self.point(&acc, bucket_start, now));
                acc = Interval::default();
                bucket_start = now;
                while bucket_end <= now + tolerance {
                    bucket_end += self.bucket;
                }
            }
            self.show(&totals, timeline.last(), now);
            if finished {
                break;
            }
        }
        if let View::Bar(bar) = &self.view {
            // Keep the bar where it stopped (an early stop shows as such).
            bar.abandon();
        }
        timeline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_widen_for_long_runs() {
        assert_eq!(bucket_for(Duration::from_secs(15)), Duration::from_secs(1));
        assert_eq!(bucket_for(Duration::from_secs(600)), Duration::from_secs(1));
        assert_eq!(
            bucket_for(Duration::from_secs(3600)),
            Duration::from_secs(6)
        );
        assert_eq!(
            bucket_for(Duration::from_millis(10)),
            Duration::from_secs(1)
        );
    }
}
