//! Test-only fault injection: hooks at a few named points that the tests
//! use to show that a panicking actor or a slow recovery is handled.
//!
//! Compiled in only with the `faults` feature, which the tests turn on
//! (through the crate's dev-dependency on itself); in a normal build every
//! hook is an empty inline function and the binary has none of this.
//! With the feature, the hooks read `FLASHCORE_FAULTS` once, a comma-separated
//! list of `point=value`:
//!
//! - `panic-sku=<sku_id>`: the SKU actor of that SKU panics on its next
//!   order placement or reservation;
//! - `stop-sku=<sku_id>`: the SKU actor of that SKU stops (no panic) on its
//!   next reservation;
//! - `panic-shard-pay=1`: an order shard panics when asked to pay an order;
//! - `stall-recovery-ms=<ms>`: recovery sleeps that long before reading the
//!   journal.

/// The environment variable the hooks read.
pub const FAULTS_ENV: &str = "FLASHCORE_FAULTS";

#[cfg(feature = "faults")]
fn value(point: &str) -> Option<&'static str> {
    use std::collections::HashMap;
    use std::sync::OnceLock;
    static FAULTS: OnceLock<HashMap<String, String>> = OnceLock::new();
    let faults = FAULTS.get_or_init(|| {
        std::env::var(FAULTS_ENV)
            .unwrap_or_default()
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    });
    faults.get(point).map(String::as_str)
}

/// Panics when the fault `point` is set to `subject`.
#[cfg(feature = "faults")]
pub fn panic_if(point: &str, subject: &str) {
    if value(point) == Some(subject) {
        panic!("injected fault: {point}={subject}");
    }
}

/// Whether the fault `point` is set to `subject`.
#[cfg(feature = "faults")]
pub fn is_set(point: &str, subject: &str) -> bool {
    value(point) == Some(subject)
}

/// Sleeps for the milliseconds the fault `point` is set to, if any.
#[cfg(feature = "faults")]
pub fn stall(point: &str) {
    if let Some(ms) = value(point).and_then(|v| v.parse::<u64>().ok()) {
        tracing::warn!(point, ms, "injected fault: stalling");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Without the `faults` feature: nothing.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn panic_if(_point: &str, _subject: &str) {}

/// Without the `faults` feature: nothing.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn stall(_point: &str) {}

/// Without the `faults` feature: never.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn is_set(_point: &str, _subject: &str) -> bool {
    false
}
