//! `cargo bench --bench journal`: the durable journal on this machine's disk.
//!
//! - `durable`: 64 concurrent producers each append an event and wait until
//!   it is durable (strict mode: sled flush + fdatasync per batch), in a loop.
//!   Prints durable events/s, per-append latency, batch sizes and flush
//!   latency percentiles.
//! - `recovery`: journals 1,000,000 events of a flash sale (reservations and
//!   placed orders), then times a cold recovery of them all; then writes a
//!   snapshot, journals 100,000 more, and times snapshot + tail.
//! - `size`: the data dir's size after 1,000,000 orders (500,000 placements
//!   and 500,000 payments... see below), with the snapshotter running.
//!
//! Knobs: `BENCH_SECONDS` (durable run time, default 5), `BENCH_PRODUCERS`
//! (64), `BENCH_EVENTS` (1,000,000), `BENCH_ONLY` (one scenario),
//! `BENCH_DIR` (where to put the data dirs; default: a temp dir on the same
//! disk as ./target).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flashcore::domain::order::{Order, ReservedLine};
use flashcore::domain::{Event, OrderId, SkuId, UserId};
use flashcore::journal::{
    self, FlushPolicy, Journal, SledJournal, SnapshotPolicy, Snapshotter, recovery,
};
use hdrhistogram::Histogram;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn bench_root() -> PathBuf {
    std::env::var("BENCH_DIR").map_or_else(|_| PathBuf::from("target/bench-data"), PathBuf::from)
}

fn fresh_dir(name: &str) -> tempfile::TempDir {
    let root = bench_root();
    std::fs::create_dir_all(&root).expect("bench dir");
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in(root)
        .expect("temp dir")
}

fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let p = entry.path();
            total += if p.is_dir() {
                dir_bytes(&p)
            } else {
                entry.metadata().map_or(0, |m| m.len())
            };
        }
    }
    total
}

fn pct(h: &Histogram<u64>) -> String {
    format!(
        "p50 {} p90 {} p99 {} p99.9 {} max {}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.9),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max()
    )
}

const SKU: &str = "hot";

fn sku() -> SkuId {
    SkuId::parse(SKU).expect("sku")
}

/// The events of a flash sale: the SKU, then per order its reservation and
/// its placement; every fourth order is paid.
struct Sale {
    next_id: u64,
    orders: u64,
}

impl Sale {
    fn new() -> Sale {
        Sale {
            next_id: 1,
            orders: 0,
        }
    }

    fn opening() -> Event {
        Event::SkuCreated {
            sku: sku(),
            name: "Limited sneaker, size 42".into(),
            price_cents: 18_900,
            per_user_limit: Some(2),
            stock: 1_000_000_000,
            at_ms: 1_767_225_600_000,
        }
    }

    /// The next events (two or three) of one order.
    fn order(&mut self) -> Vec<Event> {
        let user = UserId::parse(&format!("buyer-{:07}", self.orders % 1_000_000)).expect("user");
        let at_ms = 1_767_225_600_000 + self.orders;
        let reservation = OrderId(self.next_id);
        let id = OrderId(self.next_id + 1);
        self.next_id += 2;
        self.orders += 1;
        let line = ReservedLine {
            sku: sku(),
            name: "Limited sneaker, size 42".into(),
            qty: 1,
            unit_price_cents: 18_900,
        };
        let order = Order::place(id, user, vec![line], None, at_ms, 900_000).expect("order");
        let mut events = vec![
            Event::StockReserved {
                sku: sku(),
                reservation,
                user,
                qty: 1,
                at_ms,
            },
            Event::OrderPlaced {
                order: Box::new(order),
                reservations: vec![reservation],
                from_cart: false,
                idem: None,
            },
        ];
        if self.orders.is_multiple_of(4) {
            events.push(Event::OrderPaid {
                order: id,
                payment_ref: flashcore::domain::PaymentRef::parse(&format!("pay-{}", id.0))
                    .expect("ref"),
                amount_cents: 18_900,
                lines: vec![flashcore::domain::event::SkuQty { sku: sku(), qty: 1 }],
                idem: None,
                at_ms,
            });
        }
        events
    }
}

/// Appends events as fast as the queue takes them (retrying on `Full`).
fn pour(journal: &SledJournal, events: impl Iterator<Item = Event>) -> u64 {
    let mut n = 0;
    for event in events {
        loop {
            match journal.append(&event) {
                Ok(_) => break,
                Err(journal::JournalError::Full) => std::thread::sleep(Duration::from_micros(200)),
                Err(e) => panic!("append: {e}"),
            }
        }
        n += 1;
    }
    n
}

fn durable(seconds: f64, producers: u64, inflight: usize) {
    let dir = fresh_dir("durable-");
    let opened = journal::open(dir.path(), FlushPolicy::Strict, false).expect("open");
    let journal = opened.journal;
    journal.append(&Sale::opening()).expect("append");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (stats_before, elapsed, latency) = runtime.block_on(async {
        let mut tasks = Vec::new();
        for p in 0..producers {
            let (journal, measuring, stop, done) = (
                Arc::clone(&journal),
                Arc::clone(&measuring),
                Arc::clone(&stop),
                Arc::clone(&done),
            );
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
                let event = Event::CartItemSet {
                    user: UserId::parse(&format!("producer-{p}")).expect("user"),
                    sku: sku(),
                    qty: 1,
                    at_ms: 1,
                };
                let mut in_flight = std::collections::VecDeque::new();
                while !stop.load(Ordering::Relaxed) {
                    while in_flight.len() < inflight {
                        match journal.append(&event) {
                            Ok(seq) => in_flight.push_back((seq, Instant::now())),
                            Err(_) => break,
                        }
                    }
                    let Some((seq, started)) = in_flight.pop_front() else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    journal.watermark().wait(seq).await.expect("durable");
                    if measuring.load(Ordering::Relaxed) {
                        let _ = hist.record(started.elapsed().as_micros().max(1) as u64);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                hist
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = (
            journal.stats().batches.load(Ordering::Relaxed),
            journal.stats().events.load(Ordering::Relaxed),
        );
        journal.stats().batch_events.lock().expect("stats").reset();
        journal.stats().flush_us.lock().expect("stats").reset();
        measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        measuring.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for task in tasks {
            latency.add(task.await.expect("producer")).expect("bounds");
        }
        (before, elapsed, latency)
    });
    let events = done.load(Ordering::Relaxed);
    let batches = journal.stats().batches.load(Ordering::Relaxed) - stats_before.0;
    let flushes_per_s = batches as f64 / elapsed.as_secs_f64();
    println!(
        "durable    {producers} producers x {inflight} in flight: {:.0} durable events/s, {:.0} flushes/s (each sled flush + fdatasync)",
        events as f64 / elapsed.as_secs_f64(),
        flushes_per_s
    );
    println!("  append-to-durable latency us: {}", pct(&latency));
    println!(
        "  batch size (events):          {}",
        pct(&journal.stats().batch_events.lock().expect("stats"))
    );
    println!(
        "  flush latency us:             {}",
        pct(&journal.stats().flush_us.lock().expect("stats"))
    );
    journal.close();
}

fn recovery_times(events: u64) {
    let dir = fresh_dir("recovery-");
    {
        let opened = journal::open(dir.path(), FlushPolicy::Relaxed, false).expect("open");
        let journal = opened.journal;
        let mut sale = Sale::new();
        let mut stream = std::iter::once(Sale::opening())
            .chain(std::iter::from_fn(move || Some(sale.order())).flatten())
            .take(events as usize);
        let started = Instant::now();
        let n = pour(&journal, &mut stream);
        journal.close();
        println!(
            "recovery   journaled {n} events in {:.2} s (relaxed mode), {:.1} MB on disk",
            started.elapsed().as_secs_f64(),
            dir_bytes(dir.path()) as f64 / 1e6
        );
    }
    let jdir = journal::journal_dir(dir.path());
    let sdir = journal::snapshot_dir(dir.path());
    let db = journal::writer::open_db(&jdir).expect("open");
    let started = Instant::now();
    let recovered = recovery::recover(&db, &jdir, &sdir, false).expect("recover");
    println!(
        "  cold recovery of {} events (no snapshot): {:.3} s, {} orders",
        recovered.replayed,
        started.elapsed().as_secs_f64(),
        recovered.state.orders.len()
    );
    let started = Instant::now();
    recovery::write_snapshot(&sdir, &recovered.state, recovered.last_seq).expect("snapshot");
    println!(
        "  snapshot of that state: {:.3} s, {:.1} MB",
        started.elapsed().as_secs_f64(),
        dir_bytes(&sdir) as f64 / 1e6
    );
    let last = recovered.last_seq;
    drop(recovered);
    let tail = events / 10;
    {
        let journal = SledJournal::start(db, &jdir, last, FlushPolicy::Relaxed).expect("start");
        let mut sale = Sale::new();
        sale.next_id = 10_000_000_000;
        sale.orders = 5_000_000;
        let stream = std::iter::from_fn(move || Some(sale.order()))
            .flatten()
            .take(tail as usize);
        pour(&journal, stream);
        journal.close();
    }
    let db = journal::writer::open_db(&jdir).expect("open");
    let started = Instant::now();
    let recovered = recovery::recover(&db, &jdir, &sdir, false).expect("recover");
    println!(
        "  recovery from snapshot at {} + tail of {} events: {:.3} s",
        recovered.snapshot_seq,
        recovered.replayed,
        started.elapsed().as_secs_f64()
    );
}

/// The state the poured events make, as the snapshotter's source: this
/// bench drives the journal without an engine.
#[derive(Default)]
struct Replica {
    state: std::sync::Mutex<(flashcore::domain::State, u64)>,
}

impl journal::SnapshotSource for Replica {
    fn capture(&self) -> Result<journal::Capture, journal::CaptureError> {
        let held = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Ok(journal::Capture::whole(&held.0, held.1))
    }
}

impl Replica {
    fn pour(&self, journal: &SledJournal, events: impl Iterator<Item = Event>) -> u64 {
        let mut n = 0;
        for event in events {
            let seq = loop {
                match journal.append(&event) {
                    Ok(seq) => break seq,
                    Err(journal::JournalError::Full) => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(e) => panic!("append: {e}"),
                }
            };
            let mut held = self.state.lock().expect("replica");
            held.0.apply(&event).expect("applies");
            held.1 = seq;
            n += 1;
        }
        n
    }
}

fn size_after_orders(orders: u64) {
    let dir = fresh_dir("size-");
    let opened = journal::open(dir.path(), FlushPolicy::Relaxed, false).expect("open");
    let journal = opened.journal;
    let replica = Arc::new(Replica::default());
    let mut snapshotter = Snapshotter::start(
        Arc::clone(&replica) as Arc<dyn journal::SnapshotSource>,
        Arc::clone(&journal),
        journal::snapshot_dir(dir.path()),
        SnapshotPolicy::default(),
    );
    let mut sale = Sale::new();
    let started = Instant::now();
    let mut poured = replica.pour(&journal, std::iter::once(Sale::opening()));
    for _ in 0..orders {
        poured += replica.pour(&journal, sale.order().into_iter());
    }
    snapshotter.stop();
    journal.close();
    let first = journal
        .db()
        .first()
        .ok()
        .flatten()
        .and_then(|(k, _)| journal::codec::seq_of(&k).ok())
        .unwrap_or(0);
    println!(
        "size       journal keeps blocks from seq {first} of {poured}; sled reports {:.1} MB on disk",
        journal.db().size_on_disk().unwrap_or(0) as f64 / 1e6
    );
    println!(
        "size       {orders} orders ({poured} events) in {:.1} s with the snapshotter: data dir {:.1} MB (journal {:.1} MB, snapshots {:.1} MB)",
        started.elapsed().as_secs_f64(),
        dir_bytes(dir.path()) as f64 / 1e6,
        dir_bytes(&journal::journal_dir(dir.path())) as f64 / 1e6,
        dir_bytes(&journal::snapshot_dir(dir.path())) as f64 / 1e6,
    );
}

fn main() {
    let only = std::env::var("BENCH_ONLY").ok();
    let wants = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let seconds = env_u64("BENCH_SECONDS", 5) as f64;
    let producers = env_u64("BENCH_PRODUCERS", 64);
    let events = env_u64("BENCH_EVENTS", 1_000_000);
    println!(
        "journal bench: data under {}, {} cores",
        bench_root().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if wants("durable") {
        // Each producer waits for its one event (a client with one request
        // open), then with a few in flight (an actor that journals and
        // moves on, like the engine's).
        durable(seconds, producers, 1);
        durable(seconds, producers, env_u64("BENCH_INFLIGHT", 4) as usize);
    }
    if wants("recovery") {
        recovery_times(events);
    }
    if wants("size") {
        size_after_orders(events);
    }
}
