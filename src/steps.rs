//! How long each background step took: the journal's write and fdatasync,
//! a snapshot's capture (each actor's pause, and the whole), its write, the
//! epoch drop after it, and the sweeps. A stall in the request path shows
//! up next to its cause: `/metrics` exports each step as a histogram and as
//! the longest run in the last whole second, and the dashboard draws those
//! maxima beside the p99.
//!
//! One process-wide table (like a metrics registry): the steps run on
//! threads that share nothing else (the journal writer, the fsync thread,
//! actor threads, the snapshot thread), and a step is recorded with one
//! short lock of its own row, far below the step's own cost.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A background step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The journal writer's sled insert and flush of one batch.
    JournalWrite,
    /// The journal's `fdatasync` (one covers every batch flushed before).
    JournalSync,
    /// One actor's copy of its part for a snapshot, inside its handler:
    /// what its mailbox waits for.
    ActorCapture,
    /// A snapshot's whole capture (every actor, the key book, the rest).
    Capture,
    /// A snapshot's encoding, write and sync, on the snapshot thread.
    SnapshotWrite,
    /// Dropping the journal's epochs below the snapshot before.
    EpochDrop,
    /// One expiry tick of an order shard.
    Expiry,
    /// One archive sweep of an order shard (its actor-side part).
    Archive,
    /// One slice of the key book's eviction of expired records.
    KeyEviction,
    /// Moving idempotency records to disk (one slice).
    Spill,
}

impl Step {
    /// Every step, in the order exported.
    pub const ALL: [Step; 10] = [
        Step::JournalWrite,
        Step::JournalSync,
        Step::ActorCapture,
        Step::Capture,
        Step::SnapshotWrite,
        Step::EpochDrop,
        Step::Expiry,
        Step::Archive,
        Step::KeyEviction,
        Step::Spill,
    ];

    /// Its name in `/metrics` and on the dashboard.
    pub fn name(self) -> &'static str {
        match self {
            Step::JournalWrite => "journal_write",
            Step::JournalSync => "journal_sync",
            Step::ActorCapture => "actor_capture",
            Step::Capture => "capture",
            Step::SnapshotWrite => "snapshot_write",
            Step::EpochDrop => "epoch_drop",
            Step::Expiry => "expiry",
            Step::Archive => "archive",
            Step::KeyEviction => "key_eviction",
            Step::Spill => "spill",
        }
    }

    fn index(self) -> usize {
        Step::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// Longest step a histogram records: ten minutes (anything longer is
/// recorded as this).
const STEP_US_MAX: u64 = 600_000_000;

/// One step's row.
struct Row {
    /// Every run, in microseconds.
    hist: Histogram<u64>,
    /// The second (since the table was made) `max_us` belongs to.
    second: u64,
    /// The longest run in `second`.
    max_us: u64,
    /// The longest run in the second before `second`.
    before_us: u64,
}

struct Table {
    started: Instant,
    rows: Vec<Mutex<Row>>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| Table {
        started: Instant::now(),
        rows: Step::ALL
            .iter()
            .map(|_| {
                Mutex::new(Row {
                    // Constant, valid bounds: building cannot fail.
                    hist: Histogram::new_with_bounds(1, STEP_US_MAX, 2)
                        .expect("constant histogram bounds"),
                    second: 0,
                    max_us: 0,
                    before_us: 0,
                })
            })
            .collect(),
    })
}

fn second_now(table: &Table) -> u64 {
    table.started.elapsed().as_secs()
}

/// Records that `step` ran for `took`.
pub fn record(step: Step, took: Duration) {
    let table = table();
    let now = second_now(table);
    let us = u64::try_from(took.as_micros())
        .unwrap_or(u64::MAX)
        .clamp(1, STEP_US_MAX);
    let Some(row) = table.rows.get(step.index()) else {
        return;
    };
    let mut row = row.lock().unwrap_or_else(|p| p.into_inner());
    let _ = row.hist.record(us);
    if row.second != now {
        row.before_us = if row.second + 1 == now { row.max_us } else { 0 };
        row.second = now;
        row.max_us = 0;
    }
    row.max_us = row.max_us.max(us);
}

/// Runs `f`, recording how long it took as `step`.
pub fn timed<T>(step: Step, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    record(step, started.elapsed());
    out
}

/// Every run of `step` so far, in microseconds.
pub fn histogram(step: Step) -> Histogram<u64> {
    let table = table();
    let row = table.rows.get(step.index()).unwrap_or(&table.rows[0]);
    row.lock().unwrap_or_else(|p| p.into_inner()).hist.clone()
}

/// The longest run of `step` since `before` (a [`histogram`] taken then).
pub fn longest_since(step: Step, before: &Histogram<u64>) -> u64 {
    let mut after = histogram(step);
    match after.subtract(before) {
        Ok(()) => after.max(),
        Err(_) => 0,
    }
}

/// What one step did, for `/metrics` and the dashboard.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The step.
    pub step: Step,
    /// Every run so far, in microseconds.
    pub hist: Histogram<u64>,
    /// The longest run in the last whole second (0: none ran).
    pub last_second_max_us: u64,
}

/// Every step's report.
pub fn report() -> Vec<StepReport> {
    let table = table();
    let now = second_now(table);
    Step::ALL
        .iter()
        .zip(&table.rows)
        .map(|(step, row)| {
            let row = row.lock().unwrap_or_else(|p| p.into_inner());
            let last_second_max_us = if row.second + 1 == now {
                row.max_us
            } else if row.second == now {
                row.before_us
            } else {
                0
            };
            StepReport {
                step: *step,
                hist: row.hist.clone(),
                last_second_max_us,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_counted_under_its_step_only() {
        let count = |step: Step| {
            report()
                .into_iter()
                .find(|r| r.step == step)
                .map_or(0, |r| r.hist.len())
        };
        let (spill, expiry) = (count(Step::Spill), count(Step::Expiry));
        record(Step::Spill, Duration::from_millis(3));
        assert_eq!(timed(Step::Spill, || 7), 7);
        assert!(count(Step::Spill) >= spill + 2);
        assert_eq!(count(Step::Expiry), expiry, "other steps unchanged");
        let names: Vec<_> = Step::ALL.iter().map(|s| s.name()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names.len(), unique.len());
    }
}
