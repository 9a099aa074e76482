//! Time, injected: the engine and the journal's snapshotter read the clock
//! only through [`Clock`], so tests can move time by hand and nothing
//! sleeps. It sits below both (layers point one way).
//!
//! [`SliceBudget`] is the one exception: it bounds how long a sweep holds a
//! thread, which is real elapsed time whatever the injected clock shows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    /// Now, in unix milliseconds.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock showing `now_ms`.
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock {
            now_ms: AtomicU64::new(now_ms),
        }
    }

    /// Moves the clock forward.
    pub fn advance_ms(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set_ms(&self, now_ms: u64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// How long one slice of a sweep may run (issue 18: sweeps bounded by time,
/// not by count): the expiry and archive sweeps on an actor thread, the
/// idempotency store's disk work. Measured on the monotonic clock, looked
/// at once every `every` items so the look costs little beside the items.
///
/// Invariant: `until_look` <= `every`.
#[derive(Debug, Clone, Copy)]
pub struct SliceBudget {
    started: Instant,
    limit: Option<Duration>,
    every: u32,
    until_look: u32,
}

impl SliceBudget {
    /// A slice of at most `limit`, the clock looked at every `every` items
    /// (at least 1). The slice starts now.
    pub fn new(limit: Duration, every: u32) -> SliceBudget {
        let every = every.max(1);
        SliceBudget {
            started: Instant::now(),
            limit: Some(limit),
            every,
            until_look: every,
        }
    }

    /// A slice with no time bound (a sweep driven by hand, which only its
    /// count bounds).
    pub fn unlimited() -> SliceBudget {
        SliceBudget {
            started: Instant::now(),
            limit: None,
            every: u32::MAX,
            until_look: u32::MAX,
        }
    }

    /// Counts one item done; true once the slice has run for its limit
    /// (known at the look after every `every` items). The caller stops, or
    /// rests and [`restarts`](SliceBudget::restart).
    pub fn spent(&mut self) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        self.until_look = self.until_look.saturating_sub(1);
        if self.until_look > 0 {
            return false;
        }
        self.until_look = self.every;
        self.started.elapsed() >= limit
    }

    /// Starts a new slice now.
    pub fn restart(&mut self) {
        self.started = Instant::now();
        self.until_look = self.every;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_spent_at_the_first_look_past_its_limit() {
        let mut budget = SliceBudget::new(Duration::ZERO, 4);
        assert!(!budget.spent() && !budget.spent() && !budget.spent());
        assert!(budget.spent(), "the fourth item looks at the clock");
        budget.restart();
        assert!(!budget.spent(), "a new slice");
        let mut long = SliceBudget::new(Duration::from_secs(3_600), 1);
        assert!((0..1_000).all(|_| !long.spent()));
        let mut forever = SliceBudget::unlimited();
        assert!((0..1_000).all(|_| !forever.spent()));
    }

    #[test]
    fn a_slice_ends_after_its_time() {
        // `started` is taken first: the budget's own start is then no
        // earlier, so its limit passing means at least as long here.
        let started = Instant::now();
        let mut budget = SliceBudget::new(Duration::from_millis(2), 1);
        let mut items = 0u64;
        while !budget.spent() {
            items += 1;
            assert!(started.elapsed() < Duration::from_secs(5), "never spent");
        }
        assert!(started.elapsed() >= Duration::from_millis(2));
        assert!(items > 0);
    }
}
