//! `cargo bench --bench memory`: heap bytes held per live order, per
//! finished order once archived, and per idempotency record.
//!
//! Idempotency records are measured twice: through the engine (a keyed
//! order less a plain one, so everything a key costs), and in the book
//! alone at a few sizes, since a hash table's slack makes the cost per
//! record a sawtooth between its resizes (the lowest and highest are
//! printed).
//!
//! A counting global allocator keeps the live heap (bytes allocated less
//! bytes freed, every thread). An in-process engine on a journal that
//! numbers events and drops them (so the journal holds nothing) places
//! `BENCH_ORDERS` single-line orders (default 100,000) from 1,000 users and
//! prints the growth of the live heap per order; then it places as many
//! again with an `Idempotency-Key` each and prints the extra per record;
//! then it delivers every order, lets the retention window pass and
//! archives them (to an archive that keeps nothing, so only what memory
//! still holds is counted) and prints what is left per order.
//!
//! Counts include everything an order costs: the order itself, the shard's
//! indexes (by id, by user, deadline and finished queues, the route map)
//! and the SKU's per-user counters.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use flashcore::clock::ManualClock;
use flashcore::domain::event::SkuQty;
use flashcore::domain::idem::{IdemBook, Outcome};
use flashcore::domain::order::Order;
use flashcore::domain::{
    Event, IdemStamp, IdempotencyKey, OrderId, PaymentRef, SkuId, State, UserId,
};
use flashcore::engine::{Caller, Engine, EngineConfig, NewSku};
use flashcore::journal::{Archive, Journal, JournalError, MemJournal, Seq, Watermark};

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

const USERS: usize = 1_000;
const ARCHIVE_AFTER_MS: u64 = 1_000;

/// An archive that keeps nothing: what is left after archiving is what
/// memory still holds.
#[derive(Debug)]
struct Nowhere;

impl Archive for Nowhere {
    fn put_batch(&self, _: &[Order]) -> Result<(), JournalError> {
        Ok(())
    }
    fn get(&self, _: OrderId) -> Result<Option<Order>, JournalError> {
        Ok(None)
    }
    fn list_user(&self, _: &UserId, _: usize) -> Result<Vec<Order>, JournalError> {
        Ok(Vec::new())
    }
    fn list_all(&self, _: usize) -> Result<Vec<Order>, JournalError> {
        Ok(Vec::new())
    }
}

/// A journal that numbers events and keeps none, with [`Nowhere`] beside it.
struct Counted {
    inner: MemJournal,
}

impl Journal for Counted {
    fn append(&self, event: &Event) -> Result<Seq, JournalError> {
        self.inner.append(event)
    }
    fn watermark(&self) -> &Watermark {
        self.inner.watermark()
    }
    fn last_seq(&self) -> Seq {
        self.inner.last_seq()
    }
    fn archive(&self) -> Option<Arc<dyn Archive>> {
        Some(Arc::new(Nowhere))
    }
}

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

fn per(bytes: i64, n: usize) -> f64 {
    bytes as f64 / n as f64
}

async fn place(engine: &Engine, users: &[UserId], n: usize, keyed: bool) -> Vec<Order> {
    let sku = SkuId::parse("tee").expect("valid");
    let mut orders = Vec::with_capacity(n);
    for i in 0..n {
        let user = users[i % users.len()];
        let idem = keyed.then(|| IdemStamp {
            user,
            key: IdempotencyKey::parse(&format!("key-{i:08}-0123456789abcdef")).expect("valid"),
            fingerprint: [7; 16],
        });
        let order = engine
            .place_order(user, &[SkuQty { sku, qty: 1 }], None, idem)
            .await
            .expect("placed");
        orders.push(order);
    }
    orders
}

/// Heap bytes per record of an idempotency book holding `n` placement
/// records under keys like the engine pass's (user and key as a client
/// sends them; only their hash is kept).
fn book_bytes_per_record(users: &[UserId], n: usize) -> f64 {
    let stamps: Vec<IdemStamp> = (0..n)
        .map(|i| IdemStamp {
            user: users[i % users.len()],
            key: IdempotencyKey::parse(&format!("key-{i:08}-0123456789abcdef")).expect("valid"),
            fingerprint: [7; 16],
        })
        .collect();
    let before = live();
    let book = IdemBook::default();
    for (i, stamp) in stamps.iter().enumerate() {
        let outcome = Outcome::Order {
            id: OrderId(i as u64),
            history_len: 1,
        };
        book.record(stamp, 1_767_225_600_000 + i as u64, outcome);
    }
    let bytes = live() - before;
    assert_eq!(book.len(), n);
    drop(book);
    per(bytes, n)
}

fn main() {
    let n: usize = std::env::var("BENCH_ORDERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let clock = Arc::new(ManualClock::new(1_767_225_600_000));
        let journal = Arc::new(Counted {
            inner: MemJournal::counting(),
        });
        let config = EngineConfig {
            archive_after_ms: Some(ARCHIVE_AFTER_MS),
            order_shards: 8,
            ..EngineConfig::default()
        };
        let engine =
            Engine::start(config, journal, clock.clone(), State::default()).expect("starts");
        engine
            .create_sku(NewSku {
                sku: SkuId::parse("tee").expect("valid"),
                name: "A tee-shirt of the flash sale".into(),
                price_cents: 1_999,
                stock: 1_000_000_000,
                per_user_limit: None,
                sale: flashcore::domain::sale::SaleWindow::default(),
            })
            .await
            .expect("created");
        let users: Vec<UserId> = (0..USERS)
            .map(|i| UserId::parse(&format!("user-{i:06}")).expect("valid"))
            .collect();
        // Warm up every user's entries, so they are not counted per order.
        let warm = place(&engine, &users, USERS, false).await;
        drop(warm);

        let start = live();
        let plain = place(&engine, &users, n, false).await;
        let after_plain = live();
        let keyed = place(&engine, &users, n, true).await;
        let after_keyed = live();
        let order_bytes = after_plain - start;
        let keyed_bytes = after_keyed - after_plain;
        println!("orders: {n} single-line orders from {USERS} users, 8 shards");
        println!(
            "live order (reserved):  {:>8.0} bytes each",
            per(order_bytes, n)
        );
        println!(
            "idempotency record:     {:>8.0} bytes each (a keyed order less a plain one)",
            per(keyed_bytes - order_bytes, n)
        );

        let sizes = [n, n + n / 4, n + n / 2, n + 3 * n / 4];
        let costs: Vec<f64> = sizes
            .iter()
            .map(|&size| book_bytes_per_record(&users, size))
            .collect();
        let lowest = costs.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = costs.iter().copied().fold(0.0, f64::max);
        println!(
            "idempotency record:     {:>8.0} bytes each in the book alone at {n} records \
             ({lowest:.0} to {highest:.0} at {} to {} records)",
            costs[0],
            sizes[0],
            sizes[3]
        );

        let admin = Caller {
            user: UserId::parse("admin").expect("valid"),
            admin: true,
        };
        let before_finish = live();
        for order in plain.iter().chain(&keyed) {
            let pay = PaymentRef::parse(&format!("p-{}", order.id)).expect("valid");
            engine
                .pay(admin, order.id, pay, order.total_cents, None)
                .await
                .expect("paid");
            engine.ship(admin, order.id).await.expect("shipped");
            engine.deliver(admin, order.id).await.expect("delivered");
        }
        let delivered_growth = live() - before_finish;
        println!(
            "delivered order:        {:>8.0} bytes each (what its history adds)",
            per(order_bytes, n) + per(delivered_growth, 2 * n)
        );
        drop(plain);
        drop(keyed);
        clock.advance_ms(ARCHIVE_AFTER_MS);
        let before_archive = live();
        let archived = engine.archive_due().await.expect("archives");
        let freed = before_archive - live();
        println!(
            "archived:               {archived} orders; memory freed {:>8.0} bytes each",
            per(freed, archived.max(1))
        );
        println!(
            "left in memory:         {:>8.0} bytes per archived order \
             (SKU per-user counters and idempotency records stay; a record no longer keeps its order)",
            per(live() - start, 2 * n)
        );
        engine.shutdown();
    });
}
