//! `cargo bench --bench catalog`: a catalog of `BENCH_SKUS` SKUs (default
//! 1,000,000), idle, as the engine keeps them: no actor, plain state in the
//! catalog.
//!
//! 1. **Load**: the engine started on a state of that many SKUs (what
//!    recovery hands over), timed; then that many SKUs created one by one
//!    through `Engine::create_sku` on a journal that keeps nothing, timed,
//!    with the bytes per idle SKU as live heap (a counting allocator) and
//!    as resident memory (`/proc/self/statm`; no state is built beside the
//!    engine there, so the resident growth is the catalog's).
//!    Then one order on each of `BENCH_WOKEN` SKUs (default 10,000) wakes
//!    their actors: prints what an awake SKU costs, and what goes back
//!    when they sleep again.
//! 2. **Create and restart**: the same number of SKUs created through
//!    `Engine::create_sku` on the real journal (sled, relaxed durability, 16
//!    creators at once), a snapshot taken of them (all asleep), the engine
//!    stopped, then the restart timed: recovery (snapshot load and replay)
//!    and the engine's start.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use flashcore::clock::ManualClock;
use flashcore::domain::event::SkuQty;
use flashcore::domain::sale::SaleWindow;
use flashcore::domain::sku::SkuState;
use flashcore::domain::{SkuId, State, UserId};
use flashcore::engine::{DurabilityMode, Engine, EngineConfig, NewSku};
use flashcore::journal::{self, FlushPolicy, MemJournal, SnapshotPolicy, Snapshotter};

/// Keeps the live heap: bytes allocated less bytes freed.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

fn size(layout: Layout) -> i64 {
    i64::try_from(layout.size()).unwrap_or(i64::MAX)
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds
// `GlobalAlloc`'s contract; the counter is a plain atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(size(layout), Ordering::Relaxed);
        // SAFETY: the caller's layout, unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(size(layout), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grown = i64::try_from(new_size).unwrap_or(i64::MAX) - size(layout);
        LIVE.fetch_add(grown, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Resident bytes of this process.
fn rss() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Gives freed heap pages back to the system, so resident memory shows
/// what is held rather than what the allocator kept for later.
fn trim() {
    // SAFETY: `malloc_trim` only releases free memory of glibc's heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn per(bytes: i64, n: usize) -> f64 {
    bytes as f64 / n.max(1) as f64
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn sku_id(i: usize) -> SkuId {
    SkuId::parse(&format!("sku-{i:08}")).expect("valid")
}

fn new_sku(i: usize) -> NewSku {
    NewSku {
        sku: sku_id(i),
        name: format!("Catalog item number {i}"),
        price_cents: 1_000 + (i as u64 % 5_000),
        stock: 100,
        per_user_limit: None,
        sale: SaleWindow::default(),
    }
}

fn state_of(n: usize) -> State {
    let mut state = State::default();
    for i in 0..n {
        let new = new_sku(i);
        let created = SkuState::decide_create(
            new.sku,
            new.name,
            new.price_cents,
            new.per_user_limit,
            new.stock,
            new.sale,
            0,
        )
        .expect("valid");
        state.apply(&created).expect("applies");
    }
    state
}

async fn load(n: usize, woken: usize) {
    let config = EngineConfig::default();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000));
    // The load path: the engine started on a state of `n` SKUs, as
    // recovery hands it over (the state's own build is not the engine's).
    let state = state_of(n);
    let started = Instant::now();
    let engine = Engine::start(
        config.clone(),
        Arc::new(MemJournal::counting()),
        clock.clone(),
        state,
    )
    .expect("starts");
    let start_s = started.elapsed().as_secs_f64();
    engine.shutdown();
    drop(engine);
    println!("load: {n} SKUs");
    println!("  {start_s:.2} s to start the engine on a state of {n} SKUs");

    // The create path, for memory: no state built beside the engine, so
    // resident memory shows what the catalog holds.
    trim();
    let (heap0, rss0) = (live(), rss());
    let engine = Engine::start(
        config,
        Arc::new(MemJournal::counting()),
        clock,
        State::default(),
    )
    .expect("starts");
    let started = Instant::now();
    for i in 0..n {
        engine.create_sku(new_sku(i)).await.expect("created");
    }
    let create_s = started.elapsed().as_secs_f64();
    let (heap1, rss1) = (live(), rss());
    trim();
    let rss1_trimmed = rss();
    println!("  {create_s:.2} s to create {n} SKUs one by one (no disk)");
    println!(
        "  idle SKU: {:.0} bytes of live heap, {:.0} bytes resident \
         ({:.0} after malloc_trim)",
        per(heap1 - heap0, n),
        per(rss1 - rss0, n),
        per(rss1_trimmed - rss0, n)
    );
    println!("  awake actors: {}", engine.awake_skus());

    let woken = woken.min(n);
    let before = live();
    let user = UserId::parse("bench-user").expect("valid");
    for i in 0..woken {
        engine
            .place_order(
                user,
                &[SkuQty {
                    sku: sku_id(i),
                    qty: 1,
                }],
                None,
                None,
            )
            .await
            .expect("placed");
    }
    let awake_bytes = live() - before;
    let awake = engine.awake_skus();
    let slept = engine.sleep_skus().await.expect("slept");
    let after_sleep = live() - before;
    println!(
        "  {woken} SKUs woken by an order each: {awake} awake, {:.0} bytes each \
         with their order; after sleeping again ({slept} slept): {:.0} bytes each",
        per(awake_bytes, woken),
        per(after_sleep, woken)
    );
    engine.shutdown();
}

async fn create_and_restart(n: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = EngineConfig {
        durability: DurabilityMode::Relaxed,
        ..EngineConfig::default()
    };
    let opened = journal::open(dir.path(), FlushPolicy::Relaxed, false).expect("open");
    let engine = Engine::start(
        config.clone(),
        opened.journal.clone(),
        Arc::new(ManualClock::new(1_767_225_600_000)),
        opened.recovered.state,
    )
    .expect("starts");
    // Started first: it writes a snapshot when it stops (something changed).
    let mut snapshotter = Snapshotter::start(
        Arc::new(engine.clone()),
        opened.journal.clone(),
        journal::snapshot_dir(dir.path()),
        SnapshotPolicy::default(),
    );
    const CREATORS: usize = 16;
    let started = Instant::now();
    let tasks: Vec<_> = (0..CREATORS)
        .map(|c| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for i in (c..n).step_by(CREATORS) {
                    engine.create_sku(new_sku(i)).await.expect("created");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("creator");
    }
    let create_s = started.elapsed().as_secs_f64();
    println!("create and restart: {n} SKUs on the real journal (relaxed)");
    println!(
        "  {create_s:.2} s to create them through the engine ({:.0} a second)",
        n as f64 / create_s
    );
    snapshotter.stop();
    match snapshotter.last() {
        Some(report) => println!(
            "  snapshot of them all: {} bytes, copied in {} ms, {} ms in all",
            report.bytes, report.capture_ms, report.total_ms
        ),
        None => println!("  no snapshot was written"),
    }
    drop(snapshotter);
    engine.shutdown();
    opened.journal.close();
    drop(engine);
    drop(opened.journal);

    let started = Instant::now();
    let reopened = journal::open(dir.path(), FlushPolicy::Relaxed, false).expect("reopen");
    let recovered_s = started.elapsed().as_secs_f64();
    let skus = reopened.recovered.state.skus.len();
    let replayed = reopened.recovered.replayed;
    let engine = Engine::start(
        config,
        reopened.journal.clone(),
        Arc::new(ManualClock::new(1_767_225_600_000)),
        reopened.recovered.state,
    )
    .expect("restarts");
    let restart_s = started.elapsed().as_secs_f64();
    println!(
        "  restart: {restart_s:.2} s ({recovered_s:.2} s recovery: {skus} SKUs from the \
         snapshot, {replayed} events replayed; {:.2} s the engine's start)",
        restart_s - recovered_s
    );
    let last = engine
        .sku(sku_id(n - 1))
        .await
        .expect("the last SKU is there");
    assert_eq!(last.levels.available, 100);
    engine.shutdown();
    reopened.journal.close();
}

fn main() {
    let n = env("BENCH_SKUS", 1_000_000).max(1);
    let woken = env("BENCH_WOKEN", 10_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        load(n, woken).await;
        create_and_restart(n).await;
    });
}
