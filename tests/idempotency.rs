//! Idempotency records, compact and bounded by memory (issue 12): a record
//! refers to its order, and a replay renders the *first* answer again, byte
//! for byte, however the order moved on since (paid, shipped, refunded
//! again, archived); records past the memory budget move to disk and still
//! answer, also after a restart; records past their TTL leave disk too.
//!
//! Keyed requests go through `InFlight::run`, the HTTP layer's own path
//! (look up, settle, render), and answers are compared as the JSON bodies
//! the routes send.

mod support;

use std::path::Path;
use std::sync::Arc;

use flashcore::domain::idem::{FirstAnswer, Lookup};
use flashcore::domain::order::{Order, OrderStatus};
use flashcore::domain::{IdempotencyKey, PaymentRef, State};
use flashcore::engine::{Engine, EngineConfig, ManualClock};
use flashcore::http::error::ApiError;
use flashcore::http::idempotency::InFlight;
use flashcore::http::views::{OrderJson, SkuJson};
use flashcore::journal::{
    self, FlushPolicy, IdemStore, Journal, MemArchive, MemIdemStore, MemJournal, SnapshotPolicy,
    Snapshotter,
};
use flashcore::limits::IDEMPOTENCY_TTL_MS;
use support::*;

const AFTER_MS: u64 = 60_000;

struct Shop {
    engine: Engine,
    journal: Arc<MemJournal>,
    archive: Arc<MemArchive>,
    store: Arc<MemIdemStore>,
    clock: Arc<ManualClock>,
    keys: Arc<InFlight>,
}

fn config(budget: usize) -> EngineConfig {
    EngineConfig {
        archive_after_ms: Some(AFTER_MS),
        idem_memory_records_max: budget,
        ..EngineConfig::default()
    }
}

fn shop(budget: usize) -> Shop {
    let archive = Arc::new(MemArchive::new());
    let store = Arc::new(MemIdemStore::new());
    let journal = Arc::new(
        MemJournal::with_archive(Arc::clone(&archive)).with_idem_store(Arc::clone(&store)),
    );
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::start(
        config(budget),
        journal.clone(),
        clock.clone(),
        State::default(),
    )
    .expect("engine starts");
    Shop {
        engine,
        journal,
        archive,
        store,
        clock,
        keys: Arc::new(InFlight::default()),
    }
}

/// Replays the shop's journal into a new engine over the same archive and
/// store, as a restart without a snapshot does.
fn restart(shop: &Shop, budget: usize) -> Shop {
    shop.engine.shutdown();
    let mut state = State::default();
    let events = shop.journal.events();
    for event in &events {
        state.apply(event).expect("replays");
    }
    let journal = Arc::new(
        MemJournal::with_archive(Arc::clone(&shop.archive))
            .with_idem_store(Arc::clone(&shop.store)),
    );
    for event in &events {
        journal.append(event).expect("copied");
    }
    let engine = Engine::start(config(budget), journal.clone(), shop.clock.clone(), state)
        .expect("engine restarts");
    Shop {
        engine,
        journal,
        archive: Arc::clone(&shop.archive),
        store: Arc::clone(&shop.store),
        clock: Arc::clone(&shop.clock),
        keys: Arc::new(InFlight::default()),
    }
}

fn body(answer: &FirstAnswer) -> Vec<u8> {
    match answer {
        FirstAnswer::Order(order) => {
            serde_json::to_vec(&OrderJson::from(order.as_ref())).expect("serialises")
        }
        FirstAnswer::Sku(sku) => serde_json::to_vec(&SkuJson::from(sku)).expect("serialises"),
    }
}

fn key(k: &str) -> IdempotencyKey {
    IdempotencyKey::parse(k).expect("valid key")
}

fn order_of(answer: &FirstAnswer) -> Order {
    match answer {
        FirstAnswer::Order(order) => Order::clone(order),
        FirstAnswer::Sku(sku) => panic!("expected an order, got {sku:?}"),
    }
}

/// A keyed single-line order of `who`, through the HTTP layer's path.
async fn keyed_place(
    engine: &Engine,
    keys: &Arc<InFlight>,
    who: &str,
    k: &str,
    sku_id: &str,
) -> Result<FirstAnswer, ApiError> {
    let placer = engine.clone();
    let (who_id, sku_id) = (user(who), sku_id.to_owned());
    keys.run(
        engine,
        who_id,
        Some(key(k)),
        || [1; 16],
        move |stamp| async move {
            placer
                .place_order(who_id, &[line(&sku_id, 1)], None, stamp)
                .await
                .map(|order| FirstAnswer::Order(Arc::new(order)))
                .map_err(ApiError::from)
        },
    )
    .await
}

/// A keyed refund by the admin, through the HTTP layer's path.
async fn keyed_refund(
    shop: &Shop,
    k: &str,
    order: &Order,
    sku_id: &str,
    qty: u32,
) -> Result<FirstAnswer, ApiError> {
    let engine = shop.engine.clone();
    let id = order.id;
    let lines = vec![line(sku_id, qty)];
    let fingerprint = [u8::try_from(qty).unwrap_or(0); 16];
    shop.keys
        .run(
            &shop.engine,
            admin().user,
            Some(key(k)),
            move || fingerprint,
            move |stamp| async move {
                engine
                    .refund(admin(), id, lines, false, stamp)
                    .await
                    .map(|order| FirstAnswer::Order(Arc::new(order)))
                    .map_err(ApiError::from)
            },
        )
        .await
}

/// A keyed payment by the admin, through the HTTP layer's path.
async fn keyed_pay(shop: &Shop, k: &str, order: &Order) -> Result<FirstAnswer, ApiError> {
    let engine = shop.engine.clone();
    let (id, total) = (order.id, order.total_cents);
    shop.keys
        .run(
            &shop.engine,
            admin().user,
            Some(key(k)),
            || [2; 16],
            move |stamp| async move {
                let pref = PaymentRef::parse(&format!("p-{id}")).expect("valid");
                engine
                    .pay(admin(), id, pref, total, stamp)
                    .await
                    .map(|order| FirstAnswer::Order(Arc::new(order)))
                    .map_err(ApiError::from)
            },
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_place_and_pay_replay_their_first_answers_after_the_order_moved_on() {
    let s = shop(1_000);
    let e = &s.engine;
    create(e, "a", 1_999, 10, None).await;
    let placed = keyed_place(e, &s.keys, "ann", "k-place", "a")
        .await
        .expect("placed");
    let order = order_of(&placed);
    let paid = keyed_pay(&s, "k-pay", &order).await.expect("paid");
    e.ship(admin(), order.id).await.expect("shipped");
    e.deliver(admin(), order.id).await.expect("delivered");

    let again = keyed_place(e, &s.keys, "ann", "k-place", "a")
        .await
        .expect("replayed");
    assert_eq!(
        body(&again),
        body(&placed),
        "the first answer, byte for byte"
    );
    assert_eq!(order_of(&again).status, OrderStatus::Reserved);
    let paid_again = keyed_pay(&s, "k-pay", &order).await.expect("replayed");
    assert_eq!(body(&paid_again), body(&paid));
    assert_eq!(order_of(&paid_again).status, OrderStatus::Paid);
    assert_eq!(
        e.order(admin(), order.id).await.expect("read").status,
        OrderStatus::Delivered,
        "the order itself moved on"
    );
    assert_eq!(
        e.sku(sku("a")).await.expect("read").levels.shipped,
        1,
        "one unit only"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_partial_refund_replays_its_first_answer_after_a_second_refund() {
    let s = shop(1_000);
    let e = &s.engine;
    create(e, "a", 300, 10, None).await;
    create(e, "b", 50, 10, None).await;
    let order = e
        .place_order(user("ann"), &[line("a", 3), line("b", 2)], None, None)
        .await
        .expect("placed");
    let pref = PaymentRef::parse("p-1").expect("valid");
    e.pay(admin(), order.id, pref, order.total_cents, None)
        .await
        .expect("paid");
    let first = keyed_refund(&s, "k-refund-1", &order, "a", 1)
        .await
        .expect("refunded");
    e.ship(admin(), order.id).await.expect("shipped");
    let second = keyed_refund(&s, "k-refund-2", &order, "b", 2)
        .await
        .expect("refunded");
    assert_eq!(order_of(&second).refunded_cents, 400);

    let again = keyed_refund(&s, "k-refund-1", &order, "a", 1)
        .await
        .expect("replayed");
    assert_eq!(
        body(&again),
        body(&first),
        "the first answer, byte for byte"
    );
    let again = order_of(&again);
    assert_eq!(again.refunded_cents, 300);
    assert_eq!(again.status, OrderStatus::Paid);
    assert_eq!(
        again
            .lines
            .iter()
            .map(|l| l.refunded_qty)
            .collect::<Vec<_>>(),
        [1, 0]
    );
    let second_again = keyed_refund(&s, "k-refund-2", &order, "b", 2)
        .await
        .expect("replayed");
    assert_eq!(body(&second_again), body(&second));
    // The same key with another refund is a conflict, not a refund.
    assert!(matches!(
        keyed_refund(&s, "k-refund-1", &order, "a", 2).await,
        Err(ApiError::IdempotencyConflict)
    ));
    assert_eq!(
        e.order(admin(), order.id)
            .await
            .expect("read")
            .refunded_cents,
        400
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_order_replays_after_it_was_archived_and_after_a_restart() {
    let s = shop(1_000);
    let e = &s.engine;
    create(e, "a", 1_999, 10, None).await;
    let placed = keyed_place(e, &s.keys, "ann", "k-place", "a")
        .await
        .expect("placed");
    let order = order_of(&placed);
    let paid = keyed_pay(&s, "k-pay", &order).await.expect("paid");
    e.ship(admin(), order.id).await.expect("shipped");
    e.deliver(admin(), order.id).await.expect("delivered");
    s.clock.advance_ms(AFTER_MS);
    assert_eq!(e.archive_due().await.expect("archives"), 1);
    assert_eq!(s.archive.len(), 1, "the order left memory for the archive");

    let again = keyed_place(e, &s.keys, "ann", "k-place", "a")
        .await
        .expect("replayed");
    assert_eq!(body(&again), body(&placed));
    assert_eq!(
        body(&keyed_pay(&s, "k-pay", &order).await.expect("replayed")),
        body(&paid)
    );
    assert_eq!(s.archive.len(), 1, "a replay reads; it restores nothing");

    let s = restart(&s, 1_000);
    let again = keyed_place(&s.engine, &s.keys, "ann", "k-place", "a")
        .await
        .expect("replayed");
    assert_eq!(body(&again), body(&placed));
}

/// Places `n` keyed orders, one a millisecond, and answers their first
/// answers' bodies by key.
async fn many_keyed(s: &Shop, n: usize) -> Vec<(String, Vec<u8>)> {
    let mut answers = Vec::with_capacity(n);
    for i in 0..n {
        let k = format!("key-{i:04}");
        let who = format!("u{}", i % 5);
        let answer = keyed_place(&s.engine, &s.keys, &who, &k, "a")
            .await
            .expect("placed");
        answers.push((k, body(&answer)));
        s.clock.advance_ms(1);
    }
    answers
}

async fn assert_every_key_replays(
    engine: &Engine,
    keys: &Arc<InFlight>,
    answers: &[(String, Vec<u8>)],
) {
    for (i, (k, first)) in answers.iter().enumerate() {
        let who = format!("u{}", i % 5);
        let again = keyed_place(engine, keys, &who, k, "a")
            .await
            .expect("replayed");
        assert_eq!(&body(&again), first, "key {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_past_the_memory_budget_move_to_disk_and_still_answer() {
    const BUDGET: usize = 16;
    const KEYS: usize = 100;
    let s = shop(BUDGET);
    create(&s.engine, "a", 100, 10_000, None).await;
    let answers = many_keyed(&s, KEYS).await;
    let idem_len = |e: &Engine| e.idempotency_records_in_memory();
    assert_eq!(idem_len(&s.engine), KEYS, "nothing moves before a spill");
    let moved = s.engine.spill_idempotency().await.expect("spills");
    assert!(
        idem_len(&s.engine) <= BUDGET,
        "{} in memory",
        idem_len(&s.engine)
    );
    assert_eq!(moved, KEYS - idem_len(&s.engine));
    assert_eq!(s.store.len(), moved);
    // The oldest went: the newest key is still in memory, the oldest not.
    let oldest = s
        .engine
        .idempotency(user("u0"), &key("key-0000"), [1; 16])
        .expect("looked up");
    assert!(matches!(oldest, Lookup::Replay(_)), "found on disk");
    assert_eq!(
        s.engine
            .idempotency(user("u0"), &key("key-0000"), [9; 16])
            .expect("looked up"),
        Lookup::Conflict,
        "a key on disk still refuses another request"
    );
    let seq = s.journal.last_seq();
    assert_every_key_replays(&s.engine, &s.keys, &answers).await;
    assert_eq!(s.journal.last_seq(), seq, "replays journal nothing");
    assert_eq!(
        s.engine.sku(sku("a")).await.expect("read").levels.reserved,
        u64::try_from(KEYS).expect("small"),
        "one order per key"
    );

    // A restart replays the journal: the records come back to memory as
    // well (the copy on disk is the same answer), and still answer.
    let s = restart(&s, BUDGET);
    assert_every_key_replays(&s.engine, &s.keys, &answers).await;
    s.engine.spill_idempotency().await.expect("spills");
    assert!(s.engine.idempotency_records_in_memory() <= BUDGET);
    assert_every_key_replays(&s.engine, &s.keys, &answers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_on_disk_past_their_ttl_are_dropped() {
    const BUDGET: usize = 4;
    let s = shop(BUDGET);
    create(&s.engine, "a", 100, 10_000, None).await;
    let answers = many_keyed(&s, 20).await;
    s.engine.spill_idempotency().await.expect("spills");
    let on_disk = s.store.len();
    assert!(on_disk >= 16, "{on_disk} on disk");
    // Within the TTL nothing goes.
    s.clock.advance_ms(IDEMPOTENCY_TTL_MS - 100);
    assert_eq!(s.engine.evict_idempotency().await.expect("sweeps"), 0);
    assert_eq!(s.store.len(), on_disk);
    s.clock.advance_ms(1_000);
    assert_eq!(s.engine.evict_idempotency().await.expect("sweeps"), 20);
    assert!(s.store.is_empty());
    assert_eq!(s.engine.idempotency_records_in_memory(), 0);
    let (k, _) = &answers[0];
    assert_eq!(
        s.engine
            .idempotency(user("u0"), &key(k), [1; 16])
            .expect("looked up"),
        Lookup::Fresh,
        "the key is free again"
    );
}

/// A record on disk whose TTL passed is not answered even before the sweep
/// drops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_on_disk_past_its_ttl_is_not_answered() {
    let s = shop(1);
    create(&s.engine, "a", 100, 10_000, None).await;
    let _ = many_keyed(&s, 3).await;
    s.engine.spill_idempotency().await.expect("spills");
    assert!(s.store.len() >= 2);
    s.clock.advance_ms(IDEMPOTENCY_TTL_MS + 10);
    assert_eq!(
        s.engine
            .idempotency(user("u0"), &key("key-0000"), [1; 16])
            .expect("looked up"),
        Lookup::Fresh
    );
}

struct Node {
    engine: Engine,
    journal: Arc<journal::SledJournal>,
}

fn boot(dir: &Path, clock: &Arc<ManualClock>, budget: usize) -> Node {
    let opened = journal::open(dir, FlushPolicy::Strict, false).expect("opens");
    let engine = Engine::start(
        config(budget),
        opened.journal.clone(),
        clock.clone(),
        opened.recovered.state,
    )
    .expect("engine starts");
    Node {
        engine,
        journal: opened.journal,
    }
}

/// On the real journal: records moved to sled, then a snapshot that holds
/// only those left in memory and a journal cut below it. After the restart
/// the moved records exist only on disk, and every key still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_disk_records_answer_after_a_restart_from_a_snapshot() {
    const BUDGET: usize = 8;
    const KEYS: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0_MS));
    let node = boot(dir.path(), &clock, BUDGET);
    // Started before the changes: it snapshots what came after its start.
    let policy = SnapshotPolicy {
        every_events: 1_000_000,
        every_ms: 3_600_000,
    };
    let mut snapshotter = Snapshotter::start(
        Arc::new(node.engine.clone()),
        node.journal.clone(),
        journal::snapshot_dir(dir.path()),
        policy,
    );
    let keys = Arc::new(InFlight::default());
    create(&node.engine, "a", 100, 10_000, None).await;
    let mut answers = Vec::with_capacity(KEYS);
    for i in 0..KEYS {
        let k = format!("key-{i:04}");
        let who = format!("u{}", i % 5);
        let answer = keyed_place(&node.engine, &keys, &who, &k, "a")
            .await
            .expect("placed");
        answers.push((k, body(&answer)));
        clock.advance_ms(1);
    }
    let moved = node.engine.spill_idempotency().await.expect("spills");
    assert!(moved >= KEYS - BUDGET, "{moved} moved");
    let on_disk = node
        .journal
        .idem_store()
        .expect("the journal keeps a store")
        .len();
    assert_eq!(on_disk, moved);
    // Takes the last snapshot (and drops the journal below the one before).
    snapshotter.stop();
    node.engine.shutdown();
    node.journal.close();
    drop(node);

    let node = boot(dir.path(), &clock, BUDGET);
    assert!(
        node.engine.idempotency_records_in_memory() <= BUDGET,
        "{} records came back to memory: the snapshot holds only those left there",
        node.engine.idempotency_records_in_memory()
    );
    let seq = node.journal.last_seq();
    assert_every_key_replays(&node.engine, &keys, &answers).await;
    assert_eq!(node.journal.last_seq(), seq, "nothing ran twice");
    node.engine.shutdown();
    node.journal.close();
}
