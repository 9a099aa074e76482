//! Per-user rate limits (contract: "Rate limits", `--rate-limit off|N/s`).
//!
//! A token bucket per caller, holding one second's worth (burst = rate):
//! the caller is the verified token's `sub`, or the client address for a
//! request without a valid token. Admin tokens are not limited. A request
//! over its rate is answered `429 rate_limited` with `Retry-After` before
//! any other work: before its body is read, before a slot is taken, before
//! the engine. The buckets are `governor`'s GCRA cells in its keyed
//! `DashMap` store: one atomic word per caller, no lock on the hot path.
//!
//! Memory: a bucket that has refilled is indistinguishable from a fresh
//! one, so `retain_recent` drops it; the server runs [`RateLimiter::evict`]
//! every [`RATE_LIMIT_EVICT_EVERY_MS`], so the map holds only callers of
//! the last second or two. Should it still pass [`RATE_LIMIT_KEYS_MAX`]
//! (a flood of distinct callers faster than eviction), the buckets are
//! replaced by an empty set: briefly lenient, never unbounded.
//!
//! Token cost: the `sub` is read only from a verified token, through the
//! cache of verified tokens in `auth.rs`, so a known token costs a map
//! lookup here and nothing more in the extractor.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::header::AUTHORIZATION;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::domain::UserId;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::limits::{RATE_LIMIT_EVICT_EVERY_MS, RATE_LIMIT_KEYS_MAX, RATE_LIMIT_PER_SECOND_MAX};

/// Whose bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateKey {
    /// A verified token's `sub`.
    User(UserId),
    /// The client address of a request without a valid token.
    Addr(IpAddr),
}

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

/// The buckets of every caller, at one rate.
pub struct RateLimiter {
    quota: Quota,
    /// Replaced whole when it passes [`RATE_LIMIT_KEYS_MAX`] (see the module doc).
    buckets: RwLock<Arc<DefaultKeyedRateLimiter<RateKey>>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keys", &self.buckets().len())
            .finish()
    }
}

impl RateLimiter {
    /// `per_second` requests a second per caller, bursts of as many.
    pub fn new(per_second: NonZeroU32) -> RateLimiter {
        let quota = Quota::per_second(per_second);
        RateLimiter {
            quota,
            buckets: RwLock::new(Arc::new(governor::RateLimiter::dashmap(quota))),
            clock: DefaultClock::default(),
        }
    }

    fn buckets(&self) -> Arc<DefaultKeyedRateLimiter<RateKey>> {
        Arc::clone(&self.buckets.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Takes one request from `key`'s bucket.
    ///
    /// # Errors
    /// When the bucket is empty: the whole seconds until it holds one again
    /// (at least 1).
    pub fn check(&self, key: &RateKey) -> Result<(), u64> {
        self.buckets().check_key(key).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            whole_seconds(wait)
        })
    }

    /// Drops the buckets that have refilled; replaces them all if there
    /// are still more than [`RATE_LIMIT_KEYS_MAX`]. Returns how many are
    /// kept.
    pub fn evict(&self) -> usize {
        let buckets = self.buckets();
        buckets.retain_recent();
        if buckets.len() <= RATE_LIMIT_KEYS_MAX {
            buckets.shrink_to_fit();
            return buckets.len();
        }
        tracing::warn!(
            keys = buckets.len(),
            "more rate-limited callers than the bound; starting their buckets afresh"
        );
        *self.buckets.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(governor::RateLimiter::dashmap(self.quota));
        0
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

/// Whose bucket `request` draws from, or `None` for an admin.
fn key_of(state: &AppState, request: &Request) -> Option<RateKey> {
    let token = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    if let Some(Ok(caller)) = token.map(|t| state.keys.verify(t.trim())) {
        return (!caller.admin).then_some(RateKey::User(caller.user));
    }
    // No token, or one that will be refused (`401`): the address pays.
    let addr = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::from([0, 0, 0, 0]), |info| info.0.ip());
    Some(RateKey::Addr(addr))
}

/// The middleware hook: `Some(429)` when `request` is over its rate.
pub fn refuse(state: &AppState, request: &Request) -> Option<Response> {
    let limiter = state.rate_limiter.as_ref()?;
    let key = key_of(state, request)?;
    match limiter.check(&key) {
        Ok(()) => None,
        Err(retry_after_s) => Some(ApiError::RateLimited(retry_after_s).into_response()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
