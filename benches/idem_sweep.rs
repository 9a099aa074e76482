//! `cargo bench --bench idem_sweep`: how long the request path's `record`
//! waits while the key book is swept or copied (issue 18: no full scan
//! under a lock the request path takes).
//!
//! The book is filled with `IDEM_BENCH_RECORDS` records (default 1,000,000),
//! the older half recorded a whole TTL before the newer half. A second
//! thread then records fresh keys one after another and keeps the longest
//! and the 99.9th percentile of each call, while this thread runs, one after
//! another: the snapshot copy (`to_snapshot`), the TTL eviction
//! (`evict_expired`, which drops the older half) and the pick of the oldest
//! records for a spill (`oldest`). A `record` waits on a lock only while a
//! sweep holds the lock of its part of the book, so the longest wait is the
//! longest the sweep held one (plus scheduling noise: on this 2-core
//! machine the two threads share the cores with whatever else runs).
//!
//! Not a timed test: it prints, it asserts only that the sweeps did their
//! work. (The count an eviction returns may be a little short while records
//! are being recorded: the old book counted its length before and after.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use flashcore::domain::idem::{IdemBook, Outcome};
use flashcore::domain::{IdemStamp, IdempotencyKey, OrderId, UserId};
use flashcore::limits::{IDEMPOTENCY_SPILL_BATCH_MAX, IDEMPOTENCY_TTL_MS};

const T0_MS: u64 = 1_767_225_600_000;

fn stamp(user: UserId, i: usize) -> IdemStamp {
    IdemStamp {
        user,
        key: IdempotencyKey::parse(&format!("key-{i:08}-0123456789abcdef")).expect("valid"),
        fingerprint: [7; 16],
    }
}

fn outcome(i: usize) -> Outcome {
    Outcome::Order {
        id: OrderId(i as u64),
        history_len: 1,
    }
}

/// What the racing `record` calls saw during one phase.
struct Waits {
    calls: usize,
    longest: Duration,
    p999: Duration,
}

/// Runs `sweep` while another thread records fresh keys; returns how long
/// the sweep took, its result, and the waits.
fn race<T: Send>(
    book: &Arc<IdemBook>,
    user: UserId,
    first_key: usize,
    at_ms: u64,
    sweep: impl FnOnce() -> T + Send,
) -> (Duration, T, Waits) {
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let racer = scope.spawn(|| {
            let mut waits = Vec::new();
            let mut i = first_key;
            while !stop.load(Ordering::Relaxed) {
                let s = stamp(user, i);
                let started = Instant::now();
                book.record(&s, at_ms, outcome(i));
                waits.push(started.elapsed());
                i += 1;
            }
            waits
        });
        // Let the racer start before the sweep does.
        std::thread::sleep(Duration::from_millis(20));
        let started = Instant::now();
        let result = sweep();
        let took = started.elapsed();
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let mut waits = racer.join().expect("the racer ends");
        waits.sort_unstable();
        let calls = waits.len();
        let longest = waits.last().copied().unwrap_or_default();
        let p999 = waits
            .get(calls.saturating_mul(999) / 1000)
            .copied()
            .unwrap_or_default();
        (
            took,
            result,
            Waits {
                calls,
                longest,
                p999,
            },
        )
    })
}

fn report(phase: &str, took: Duration, what: String, waits: &Waits) {
    println!(
        "{phase:<12} {:>9.1} ms  {what:<28} record(): {:>7} calls, longest {:>9.1} us, p99.9 {:>7.1} us",
        took.as_secs_f64() * 1e3,
        waits.calls,
        waits.longest.as_secs_f64() * 1e6,
        waits.p999.as_secs_f64() * 1e6,
    );
}

fn main() {
    let n: usize = std::env::var("IDEM_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let user = UserId::parse("bench-user").expect("valid");
    let book = Arc::new(IdemBook::default());
    let old_at_ms = T0_MS;
    let new_at_ms = T0_MS + IDEMPOTENCY_TTL_MS;
    for i in 0..n {
        let at_ms = if i < n / 2 { old_at_ms } else { new_at_ms };
        book.record(&stamp(user, i), at_ms, outcome(i));
    }
    assert_eq!(book.len(), n);
    println!("book of {n} records, half of them one TTL older");

    let now_ms = new_at_ms + 1;
    let (took, copied, waits) = race(&book, user, n, now_ms, || book.to_snapshot().len());
    report(
        "to_snapshot",
        took,
        format!("{copied} records copied"),
        &waits,
    );

    let (took, picked, waits) = race(&book, user, 2 * n, now_ms, || {
        book.oldest(IDEMPOTENCY_SPILL_BATCH_MAX).len()
    });
    report("oldest", took, format!("{picked} records picked"), &waits);

    let (took, evicted, waits) = race(&book, user, 3 * n, now_ms, || book.evict_expired(now_ms));
    report("evict", took, format!("{evicted} records evicted"), &waits);
    assert_eq!(book.evict_expired(now_ms), 0, "the older half went");
    assert!(book.len() >= n / 2);
}
