//! A catalog of sleeping SKUs: an idle SKU is plain state in the catalog,
//! its actor starts on the first message and hands the state back when it
//! sleeps. These tests check that nothing is lost or granted twice across
//! sleep and wake-up: exact stock and per-user counts after a sleep, no
//! oversell while orders race actors that keep going to sleep, and a
//! restart (from a snapshot plus the journal) that restores sleeping and
//! awake SKUs alike.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use flashcore::clock::SystemClock;
use flashcore::domain::{DomainError, PaymentRef, State};
use flashcore::engine::{Engine, EngineConfig, EngineError, ManualClock, OrderScope};
use flashcore::journal::{self, FlushPolicy, Journal, MemJournal, SnapshotPolicy, Snapshotter};
use support::*;

fn out_of_stock(result: &Result<flashcore::domain::order::Order, EngineError>) -> bool {
    matches!(
        result,
        Err(EngineError::Domain(DomainError::OutOfStock { .. }))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_sku_wakes_on_the_next_order_with_its_exact_stock() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "tee", 1_000, 10, Some(3)).await;
    create(e, "mug", 500, 5, None).await;
    // Created asleep: no actor until the first order.
    assert!(!e.is_awake(sku("tee")).expect("known"));
    assert_eq!(e.awake_skus(), 0);

    let first = e
        .place_order(user("alice"), &[line("tee", 2)], None, None)
        .await
        .expect("placed");
    assert!(e.is_awake(sku("tee")).expect("known"));
    assert!(
        !e.is_awake(sku("mug")).expect("known"),
        "untouched SKUs sleep"
    );

    assert_eq!(e.sleep_skus().await.expect("slept"), 1);
    assert!(!e.is_awake(sku("tee")).expect("known"));
    // A read answers from the catalog, without waking the SKU.
    let tee = e.sku(sku("tee")).await.expect("read");
    assert_eq!(
        (
            tee.levels.available,
            tee.levels.reserved,
            tee.levels.on_hand
        ),
        (8, 2, 10)
    );
    assert!(!e.is_awake(sku("tee")).expect("known"));

    // The per-user count slept with the stock: 2 + 2 passes the limit of 3.
    let over = e
        .place_order(user("alice"), &[line("tee", 2)], None, None)
        .await;
    assert!(
        matches!(
            over,
            Err(EngineError::Domain(DomainError::LimitExceeded {
                limit: 3,
                ..
            }))
        ),
        "{over:?}"
    );
    assert_eq!(e.sleep_skus().await.expect("slept"), 1);

    // A payment reaches a sleeping SKU through its order shard, and wakes it.
    e.pay(
        admin(),
        first.id,
        PaymentRef::parse("pay-1").expect("valid"),
        first.total_cents,
        None,
    )
    .await
    .expect("paid");
    let tee = e.sku(sku("tee")).await.expect("read");
    assert_eq!((tee.levels.reserved, tee.levels.allocated), (0, 2));
    assert_eq!(e.sleep_skus().await.expect("slept"), 1);

    // Two lines, both SKUs asleep: the placement wakes one after the other.
    e.place_order(user("bob"), &[line("tee", 3), line("mug", 5)], None, None)
        .await
        .expect("placed");
    e.sleep_skus().await.expect("slept");
    e.place_order(user("carol"), &[line("tee", 3)], None, None)
        .await
        .expect("placed");
    e.sleep_skus().await.expect("slept");
    e.place_order(user("dan"), &[line("tee", 2)], None, None)
        .await
        .expect("placed: the last 2 units");
    e.sleep_skus().await.expect("slept");
    // Sold out while asleep: the hint refuses without waking the SKU.
    let wakes = e.sku_wakes();
    let refused = e
        .place_order(user("eve"), &[line("tee", 1)], None, None)
        .await;
    assert!(out_of_stock(&refused), "{refused:?}");
    assert_eq!(e.sku_wakes(), wakes, "the hint answered");
    assert!(!e.is_awake(sku("tee")).expect("known"));

    let tee = e.sku(sku("tee")).await.expect("read");
    assert_eq!(
        (
            tee.levels.available,
            tee.levels.reserved,
            tee.levels.allocated,
            tee.levels.on_hand
        ),
        (0, 8, 2, 10)
    );
    // Restock and settings changes wake it too, and count from the same stock.
    e.restock(sku("tee"), 4, None).await.expect("restocked");
    assert_eq!(e.sleep_skus().await.expect("slept"), 1);
    let tee = e.sku(sku("tee")).await.expect("read");
    assert_eq!((tee.levels.available, tee.levels.on_hand), (4, 14));
    assert_replay_matches(&h).await;
}

/// Orders from many tasks race SKU actors that go to sleep after a
/// millisecond of idleness and are put to sleep again and again by a task
/// of their own: exactly the stocked units are sold, every round, and the
/// journal replays into the very books the engine shows (two actors of one
/// SKU would grant the same units twice, which replay refuses).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_racing_sleep_and_wake_never_oversell() {
    const ROUNDS: usize = 12;
    const STOCK: u64 = 40;
    const BUYERS: usize = 120;
    let journal = Arc::new(MemJournal::new());
    let state = State::default();
    let idem = Arc::clone(&state.idem);
    let config = EngineConfig {
        actor_threads: 2,
        sku_idle_ms: 1,
        sku_mailbox: 20_000,
        ..EngineConfig::default()
    };
    let engine = Engine::start(config, journal.clone(), Arc::new(SystemClock), state)
        .expect("engine starts");
    let h = Harness {
        engine,
        journal,
        clock: Arc::new(ManualClock::new(T0_MS)),
        idem,
    };
    let e = &h.engine;
    create(e, "side", 100, 1_000_000, None).await;
    for round in 0..ROUNDS {
        let hot = format!("hot{round}");
        create(e, &hot, 100, STOCK, None).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(BUYERS + 1));
        let sold = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let sleeper = {
            let (e, done) = (e.clone(), Arc::clone(&done));
            tokio::spawn(async move {
                let mut slept = 0;
                while !done.load(Ordering::SeqCst) {
                    slept += e.sleep_skus().await.unwrap_or(0);
                    tokio::task::yield_now().await;
                }
                slept
            })
        };
        let buyers: Vec<_> = (0..BUYERS)
            .map(|b| {
                let (e, barrier, sold) = (e.clone(), Arc::clone(&barrier), Arc::clone(&sold));
                let hot = hot.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    let u = user(&format!("r{round}b{b}"));
                    // Every third buyer takes a line of another SKU too, so
                    // placements hop between SKUs that may be asleep.
                    let lines = if b % 3 == 0 {
                        vec![line("side", 1), line(&hot, 1)]
                    } else {
                        vec![line(&hot, 1)]
                    };
                    match e.place_order(u, &lines, None, None).await {
                        Ok(order) => {
                            sold.fetch_add(1, Ordering::SeqCst);
                            if b % 2 == 0 {
                                // Cancelled and bought again: units go back
                                // through a SKU that may have slept since.
                                let _ = e.cancel(admin(), order.id).await;
                                if e.place_order(u, &lines, None, None).await.is_err() {
                                    sold.fetch_sub(1, Ordering::SeqCst);
                                }
                            }
                        }
                        Err(error) => assert!(
                            matches!(
                                error,
                                EngineError::Domain(DomainError::OutOfStock { .. })
                                    | EngineError::Overloaded
                            ),
                            "unexpected refusal: {error:?}"
                        ),
                    }
                })
            })
            .collect();
        barrier.wait().await;
        for b in buyers {
            b.await.expect("buyer");
        }
        done.store(true, Ordering::SeqCst);
        sleeper.await.expect("sleeper");
        let view = e.sku(sku(&hot)).await.expect("read");
        let sold = sold.load(Ordering::SeqCst) as u64;
        assert!(sold <= STOCK, "round {round}: sold {sold} of {STOCK}");
        assert_eq!(view.levels.reserved, sold, "round {round}: {view:?}");
        assert_eq!(view.levels.available, STOCK - sold, "round {round}");
    }
    assert!(
        e.sku_wakes() > ROUNDS as u64,
        "the SKUs slept and woke during the load ({} wakes)",
        e.sku_wakes()
    );
    let orders = e.orders(OrderScope::All, 500).await.expect("orders");
    assert!(!orders.is_empty());
    assert_replay_matches(&h).await;
}

struct Node {
    engine: Engine,
    journal: Arc<journal::SledJournal>,
}

fn boot(dir: &Path) -> (Node, journal::Recovered) {
    let opened = journal::open(dir, FlushPolicy::Strict, false).expect("open");
    let mut recovered = opened.recovered;
    recovered.state.check().expect("the rebuilt state holds");
    let state = std::mem::take(&mut recovered.state);
    let engine = Engine::start(
        EngineConfig::default(),
        opened.journal.clone(),
        Arc::new(ManualClock::new(T0_MS)),
        state,
    )
    .expect("engine starts");
    let node = Node {
        engine,
        journal: opened.journal,
    };
    (node, recovered)
}

fn stop(node: Node) {
    node.engine.shutdown();
    node.journal.close();
}

type Books = (
    Vec<flashcore::domain::sku::SkuView>,
    Vec<flashcore::domain::order::Order>,
);

async fn books(e: &Engine) -> Books {
    (
        e.skus().await.expect("skus"),
        e.orders(OrderScope::All, 500).await.expect("orders"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_restores_sleeping_and_awake_skus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node, _) = boot(dir.path());
    let e = &node.engine;
    // Started first: it writes a snapshot when it stops, if anything
    // changed since it started.
    let mut snapshotter = Snapshotter::start(
        Arc::new(e.clone()),
        node.journal.clone(),
        journal::snapshot_dir(dir.path()),
        SnapshotPolicy::default(),
    );
    for id in ["sleepy", "busy", "never"] {
        create(e, id, 100, 10, Some(5)).await;
    }
    let asleep_order = e
        .place_order(user("ann"), &[line("sleepy", 3)], None, None)
        .await
        .expect("placed");
    assert_eq!(e.sleep_skus().await.expect("slept"), 1);
    e.place_order(user("ann"), &[line("busy", 4)], None, None)
        .await
        .expect("placed");
    assert!(e.is_awake(sku("busy")).expect("known"));
    assert!(!e.is_awake(sku("sleepy")).expect("known"));
    assert!(!e.is_awake(sku("never")).expect("known"));

    // A snapshot of two sleeping SKUs and an awake one.
    snapshotter.stop();
    let taken = snapshotter.last().expect("a snapshot was written");
    // After it, in the journal only: a sleeping SKU wakes, an awake one
    // sleeps.
    e.place_order(user("bea"), &[line("sleepy", 2)], None, None)
        .await
        .expect("placed");
    assert_eq!(e.sleep_skus().await.expect("slept"), 2);
    e.restock(sku("busy"), 5, None).await.expect("restocked");
    let before = books(e).await;
    let last = node.journal.last_seq();
    stop(node);

    let (node, recovered) = boot(dir.path());
    assert_eq!(recovered.snapshot_seq, taken.top, "the snapshot was used");
    assert_eq!(recovered.last_seq, last);
    let e = &node.engine;
    assert_eq!(e.awake_skus(), 0, "every SKU starts asleep");
    assert_eq!(books(e).await, before);
    // The per-user counts came back too: ann holds 3 of sleepy's limit 5.
    let over = e
        .place_order(user("ann"), &[line("sleepy", 3)], None, None)
        .await;
    assert!(
        matches!(
            over,
            Err(EngineError::Domain(DomainError::LimitExceeded { .. }))
        ),
        "{over:?}"
    );
    e.pay(
        admin(),
        asleep_order.id,
        PaymentRef::parse("pay-sleepy").expect("valid"),
        asleep_order.total_cents,
        None,
    )
    .await
    .expect("paid after the restart");
    let sleepy = e.sku(sku("sleepy")).await.expect("read");
    assert_eq!(
        (
            sleepy.levels.available,
            sleepy.levels.reserved,
            sleepy.levels.allocated
        ),
        (5, 2, 3)
    );
    let busy = e.sku(sku("busy")).await.expect("read");
    assert_eq!((busy.levels.available, busy.levels.on_hand), (11, 15));
    stop(node);
}
