//! Per-user rate limits (contract: "Rate limits", `--rate-limit off|N/s`).
//!
//! A token bucket per client (`admission::ClientKey`), holding one second's
//! worth (burst = rate): a verified token's `sub`, or the client address
//! (IPv6 by /64, through `--trusted-proxies` when set) for a request
//! without a valid token. Admin tokens are not limited. A request over its
//! rate is answered `429 rate_limited` with `Retry-After` before any other
//! work: before its body is read, before a slot is taken, before the
//! engine. The buckets are `governor`'s GCRA cells (one atomic word per
//! client, no lock on the hot path) in a store of our own, [`Buckets`], so
//! that they can be evicted oldest first.
//!
//! Memory: a bucket that has refilled is indistinguishable from a fresh
//! one, so it is dropped; the server runs [`RateLimiter::evict`] every
//! [`RATE_LIMIT_EVICT_EVERY_MS`], so the map holds only callers of the last
//! second or two. Should it still pass [`RATE_LIMIT_KEYS_MAX`] (a flood of
//! distinct callers faster than eviction), the buckets with the oldest
//! arrival times go first, down to nine tenths of the bound: the callers
//! least active lose their history, the busy ones keep theirs. The
//! request path itself evicts too once the map is twice the bound, so a
//! flood between two evictions cannot grow it further.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;

use crate::http::AppState;
use crate::http::admission::ClientKey;
use crate::http::error::ApiError;
use crate::limits::{RATE_LIMIT_EVICT_EVERY_MS, RATE_LIMIT_KEYS_MAX, RATE_LIMIT_PER_SECOND_MAX};

/// Whose bucket a request draws from.
pub type RateKey = ClientKey;

/// Parses `--rate-limit`: `off`, or `N/s` with N in 1..=[`RATE_LIMIT_PER_SECOND_MAX`].
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_rate(text: &str) -> Result<Option<NonZeroU32>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad =
        || format!("expected `off` or `N/s` with N 1 to {RATE_LIMIT_PER_SECOND_MAX}, got {text:?}");
    let number = text.strip_suffix("/s").ok_or_else(bad)?;
    let n: u32 = number.parse().map_err(|_| bad())?;
    if n > RATE_LIMIT_PER_SECOND_MAX {
        return Err(bad());
    }
    NonZeroU32::new(n).map(Some).ok_or_else(bad)
}

/// The GCRA cells of every client: its theoretical arrival time in
/// nanoseconds since the limiter started (0 for a fresh bucket), as
/// `governor` keeps it. Shared between the limiter (through
/// [`SharedBuckets`]) and the evictor.
#[derive(Debug, Default)]
pub struct Buckets {
    cells: DashMap<RateKey, AtomicU64>,
    /// One request-path eviction at a time.
    evicting: AtomicBool,
}

impl Buckets {
    /// Clients with a bucket.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether no client has a bucket.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// Drops the buckets with the oldest arrival times until at most
    /// `keep` are left; returns how many went. A bucket's arrival time is
    /// when it will be full again, so the oldest are those of the clients
    /// least active: dropping one starts it full, lenient only to them.
    pub fn evict_oldest(&self, keep: usize) -> usize {
        let len = self.cells.len();
        if len <= keep {
            return 0;
        }
        let mut times: Vec<u64> = self
            .cells
            .iter()
            .map(|cell| cell.value().load(Ordering::Relaxed))
            .collect();
        let excess = times.len().saturating_sub(keep);
        if excess == 0 {
            return 0;
        }
        let (_, cutoff, _) = times.select_nth_unstable(excess - 1);
        let cutoff = *cutoff;
        let mut dropped = 0usize;
        // Ties at the cutoff may take a few more than `excess`; arrivals
        // since the copy may take a few less: the next round evens it out.
        self.cells.retain(|_, cell| {
            let old = dropped < excess && cell.load(Ordering::Relaxed) <= cutoff;
            dropped += usize::from(old);
            !old
        });
        dropped
    }
}

/// [`Buckets`] as `governor`'s state store.
#[derive(Debug, Clone, Default)]
pub struct SharedBuckets(Arc<Buckets>);

impl StateStore for SharedBuckets {
    type Key = RateKey;

    fn measure_and_replace<T, F, E>(&self, key: &RateKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let measure = |cell: &AtomicU64| {
            // The compare-and-swap loop of governor's own in-memory cell.
            let mut prev = cell.load(Ordering::Acquire);
            loop {
                let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
                match cell.compare_exchange_weak(
                    prev,
                    next.into(),
                    Ordering::Release,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return Ok(result),
                    Err(actual) => prev = actual,
                }
            }
        };
        if let Some(cell) = self.0.cells.get(key) {
            return measure(cell.value());
        }
        if self.0.cells.len() >= 2 * RATE_LIMIT_KEYS_MAX
            && !self.0.evicting.swap(true, Ordering::Acquire)
        {
            self.0.evict_oldest(RATE_LIMIT_KEYS_MAX * 9 / 10);
            self.0.evicting.store(false, Ordering::Release);
        }
        let cell = self.0.cells.entry(*key).or_default();
        measure(cell.value())
    }
}

impl ShrinkableKeyedStateStore<RateKey> for SharedBuckets {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = u64::from(drop_below);
        self.0
            .cells
            .retain(|_, cell| cell.load(Ordering::Relaxed) > drop_below);
    }

    fn shrink_to_fit(&self) {
        self.0.cells.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.0.cells.len()
    }

    fn is_empty(&self) -> bool {
        self.0.cells.is_empty()
    }
}

type Limiter = governor::RateLimiter<RateKey, SharedBuckets, DefaultClock, NoOpMiddleware>;

/// The buckets of every caller, at one rate.
pub struct RateLimiter {
    limiter: Limiter,
    buckets: Arc<Buckets>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keys", &self.buckets.len())
            .finish()
    }
}

impl RateLimiter {
    /// `per_second` requests a second per caller, bursts of as many.
    pub fn new(per_second: NonZeroU32) -> RateLimiter {
        let store = SharedBuckets::default();
        let buckets = Arc::clone(&store.0);
        let clock = DefaultClock::default();
        RateLimiter {
            limiter: governor::RateLimiter::new(
                Quota::per_second(per_second),
                store,
                clock.clone(),
            ),
            buckets,
            clock,
        }
    }

    /// Takes one request from `key`'s bucket.
    ///
    /// # Errors
    /// When the bucket is empty: the whole seconds until it holds one again
    /// (at least 1).
    pub fn check(&self, key: &RateKey) -> Result<(), u64> {
        self.limiter.check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            whole_seconds(wait)
        })
    }

    /// Drops the buckets that have refilled, then the oldest while there
    /// are more than [`RATE_LIMIT_KEYS_MAX`] (down to nine tenths of it).
    /// Returns how many are kept.
    pub fn evict(&self) -> usize {
        self.limiter.retain_recent();
        if self.buckets.len() > RATE_LIMIT_KEYS_MAX {
            let dropped = self.buckets.evict_oldest(RATE_LIMIT_KEYS_MAX * 9 / 10);
            tracing::warn!(
                dropped,
                kept = self.buckets.len(),
                "more rate-limited callers than the bound; dropped the oldest buckets"
            );
        }
        self.limiter.shrink_to_fit();
        self.buckets.len()
    }

    /// Runs [`RateLimiter::evict`] every [`RATE_LIMIT_EVICT_EVERY_MS`]
    /// until the limiter is dropped everywhere else.
    pub fn spawn_evictor(self: &Arc<RateLimiter>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(RATE_LIMIT_EVICT_EVERY_MS));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                limiter.evict();
            }
        });
    }
}

/// Whole seconds, rounded up, at least 1 (`Retry-After`).
fn whole_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

/// The middleware hook: `Some(429)` when `client` (`None`: an admin) is
/// over its rate.
pub fn refuse(state: &AppState, client: Option<ClientKey>) -> Option<Response> {
    let limiter = state.rate_limiter.as_ref()?;
    match limiter.check(&client?) {
        Ok(()) => None,
        Err(retry_after_s) => Some(ApiError::RateLimited(retry_after_s).into_response()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::domain::UserId;

    #[test]
    fn past_the_bound_the_oldest_buckets_go_first_never_all() {
        let buckets = Buckets::default();
        let key = |i: u32| RateKey::addr(IpAddr::from(i.to_be_bytes()));
        // Arrival times 1..=1000, inserted in a scrambled order.
        for i in 0..1_000u32 {
            let at = u64::from((i * 7_919) % 1_000 + 1);
            buckets.cells.insert(key(i), AtomicU64::new(at));
        }
        assert_eq!(buckets.evict_oldest(1_000), 0, "within the bound");
        assert_eq!(buckets.evict_oldest(900), 100);
        assert_eq!(buckets.len(), 900);
        let oldest_kept = buckets
            .cells
            .iter()
            .map(|c| c.value().load(Ordering::Relaxed))
            .min()
            .expect("kept some");
        assert_eq!(oldest_kept, 101, "exactly the 100 oldest went");
    }

    #[test]
    fn a_flood_of_new_clients_stays_bounded() {
        let limiter = RateLimiter::new(NonZeroU32::new(2).expect("nonzero"));
        let flood = u32::try_from(2 * RATE_LIMIT_KEYS_MAX + 10).expect("fits");
        for i in 0..flood {
            let _ = limiter.check(&RateKey::addr(IpAddr::from((i + 1).to_be_bytes())));
        }
        assert!(
            limiter.buckets.len() <= 2 * RATE_LIMIT_KEYS_MAX,
            "the request path bounds the map: {}",
            limiter.buckets.len()
        );
        assert!(limiter.evict() <= RATE_LIMIT_KEYS_MAX);
    }

    #[test]
    fn the_flag_takes_off_or_a_rate_per_second() {
        assert_eq!(parse_rate("off"), Ok(None));
        assert_eq!(parse_rate("20/s"), Ok(NonZeroU32::new(20)));
        for bad in ["", "0/s", "20", "20/m", "-1/s", "x/s", "99999999999/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bucket_holds_one_seconds_worth_and_keys_are_apart() {
        let limiter = RateLimiter::new(NonZeroU32::new(3).expect("nonzero"));
        let ann = RateKey::User(UserId::parse("ann").expect("valid"));
        let bob = RateKey::User(UserId::parse("bob").expect("valid"));
        for _ in 0..3 {
            assert_eq!(limiter.check(&ann), Ok(()));
        }
        assert_eq!(limiter.check(&ann), Err(1), "empty: retry in a second");
        assert_eq!(
            limiter.check(&bob),
            Ok(()),
            "another caller's bucket is full"
        );
        assert_eq!(limiter.evict(), 2, "both still refilling");
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(10)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1_001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }
}
