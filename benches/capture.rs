//! `cargo bench --bench capture`: what a snapshot costs the request path as
//! the live state grows. The engine in process on the real sled journal
//! (relaxed, so filling it is quick), `CAPTURE_ORDERS` live orders (default
//! 450,000; reserved, never expiring: the clock stands still) from
//! `CAPTURE_USERS` users over 8 SKUs, then `CAPTURE_SNAPSHOTS` snapshots
//! (default 3), each after 20,000 more orders. Per snapshot: the longest
//! pause of one actor for its copy (what a request queued behind it
//! waited), the whole capture, the snapshot's write, the epoch drop after
//! it, and its size. The numbers should not grow with the state.
//!
//! `CAPTURE_ORDERS=2000000 cargo bench --bench capture` is the 2 M run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashcore::domain::event::SkuQty;
use flashcore::domain::{SkuId, UserId};
use flashcore::engine::{DurabilityMode, Engine, EngineConfig, ManualClock, NewSku};
use flashcore::journal::{self, FlushPolicy, SnapshotPolicy, Snapshotter};
use flashcore::steps::{self, Step};

const SKUS: usize = 8;
/// Orders placed between two snapshots.
const BETWEEN: u64 = 20_000;
/// Callers placing orders at once.
const CALLERS: u64 = 256;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sku(i: usize) -> SkuId {
    SkuId::parse(&format!("cap-{i}")).expect("valid id")
}

/// Places orders `from..to` with `CALLERS` callers.
async fn place(engine: &Engine, from: u64, to: u64, users: u64) -> u64 {
    let next = Arc::new(AtomicU64::new(from));
    let failed = Arc::new(AtomicU64::new(0));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (engine, next, failed) = (engine.clone(), Arc::clone(&next), Arc::clone(&failed));
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= to {
                        break;
                    }
                    let user = UserId::parse(&format!("user-{}", n % users)).expect("valid id");
                    let line = SkuQty {
                        sku: sku((n % SKUS as u64) as usize),
                        qty: 1,
                    };
                    if engine.place_order(user, &[line], None, None).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("caller");
    }
    failed.load(Ordering::Relaxed)
}

fn main() {
    flashcore::memory::limit_arenas();
    let orders = env_u64("CAPTURE_ORDERS", 450_000);
    let users = env_u64("CAPTURE_USERS", orders / 4).max(1);
    let snapshots = env_u64("CAPTURE_SNAPSHOTS", 3).max(1);
    let temp = tempfile::Builder::new()
        .prefix("flashcore-capture-")
        .tempdir()
        .expect("tempdir");
    let dir = temp.path();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let opened = journal::open(dir, FlushPolicy::Relaxed, false).expect("open");
    let config = EngineConfig {
        durability: DurabilityMode::Relaxed,
        ..EngineConfig::default()
    };
    let engine = Engine::start(
        config,
        opened.journal.clone(),
        Arc::new(ManualClock::new(1_700_000_000_000)),
        opened.recovered.state,
    )
    .expect("engine");
    let began = Instant::now();
    let failed = runtime.block_on(async {
        for i in 0..SKUS {
            engine
                .create_sku(NewSku {
                    sku: sku(i),
                    name: format!("Capture item {i}"),
                    price_cents: 1_999,
                    stock: 1_000_000_000,
                    per_user_limit: None,
                    sale: flashcore::domain::sale::SaleWindow::default(),
                })
                .await
                .expect("SKU created");
        }
        place(&engine, 0, orders, users).await
    });
    println!(
        "capture: {orders} live orders of {users} users placed in {:.1} s ({failed} failed)",
        began.elapsed().as_secs_f64()
    );
    // A snapshot is due after one new event, polled every 250 ms.
    let mut snapshotter = Snapshotter::start(
        Arc::new(engine.clone()),
        opened.journal.clone(),
        journal::snapshot_dir(dir),
        SnapshotPolicy {
            every_events: 1,
            every_ms: 60_000,
        },
    );
    println!(
        "{:>9} {:>14} {:>11} {:>12} {:>12} {:>9}",
        "live", "pause_max_us", "capture_ms", "snapshot_ms", "drop_max_ms", "MB"
    );
    let mut last_top = 0;
    let mut placed = orders;
    for _ in 0..snapshots {
        let drops_before = steps::histogram(Step::EpochDrop);
        let deadline = Instant::now() + Duration::from_secs(600);
        let report = loop {
            if let Some(report) = snapshotter.last().filter(|r| r.top > last_top) {
                break report;
            }
            assert!(Instant::now() < deadline, "no snapshot in 10 minutes");
            std::thread::sleep(Duration::from_millis(20));
        };
        last_top = report.top;
        let drop_max_us = steps::longest_since(Step::EpochDrop, &drops_before);
        #[allow(clippy::cast_precision_loss)] // figures for a person
        {
            println!(
                "{placed:>9} {:>14} {:>11} {:>12} {:>12.1} {:>9.1}",
                report.pause_us_max,
                report.capture_ms,
                report.total_ms,
                drop_max_us as f64 / 1000.0,
                report.bytes as f64 / 1e6
            );
        }
        // More orders, so the next snapshot has something new.
        runtime.block_on(place(&engine, placed, placed + BETWEEN, users));
        placed += BETWEEN;
    }
    snapshotter.stop();
    engine.shutdown();
    opened.journal.close();
}
