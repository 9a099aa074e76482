//! Races that must not oversell: thousands of concurrent buyers against one
//! SKU, overlapping multi-SKU orders, and one user racing a per-user limit.
//! Every buyer starts behind a barrier, so the calls really overlap; then
//! the books are checked against a replay of the journal.

mod support;

use std::sync::Arc;

use flashcore::domain::DomainError;
use flashcore::domain::order::OrderStatus;
use flashcore::engine::{ActorPool, EngineConfig, EngineError};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use support::*;
use tokio::sync::Barrier;

/// A mailbox big enough that no buyer is shed: these tests are about who
/// gets the units, not about load shedding.
fn roomy() -> EngineConfig {
    EngineConfig {
        sku_mailbox: 20_000,
        shard_mailbox: 20_000,
        ..EngineConfig::default()
    }
}

#[derive(Debug, Default, PartialEq)]
struct Tally {
    granted: usize,
    sold_out: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_buyers_get_exactly_the_hundred_units_over_twenty_seeds() {
    const BUYERS: usize = 10_000;
    const UNITS: u64 = 100;
    for seed in 0..20u64 {
        let h = harness(roomy());
        create(&h.engine, "drop", 4_900, UNITS, None).await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..BUYERS).collect();
        order.shuffle(&mut rng);
        let barrier = Arc::new(Barrier::new(BUYERS));
        let mut tasks = Vec::with_capacity(BUYERS);
        for buyer in order {
            let engine = h.engine.clone();
            let barrier = Arc::clone(&barrier);
            let yields = rng.random_range(0..3);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                for _ in 0..yields {
                    tokio::task::yield_now().await;
                }
                engine
                    .place_order(
                        user(&format!("buyer-{buyer}")),
                        &[line("drop", 1)],
                        None,
                        None,
                    )
                    .await
            }));
        }
        let mut tally = Tally::default();
        for task in tasks {
            match task.await.expect("buyer task") {
                Ok(order) => {
                    assert_eq!(order.status, OrderStatus::Reserved);
                    tally.granted += 1;
                }
                Err(EngineError::Domain(DomainError::OutOfStock { .. })) => tally.sold_out += 1,
                Err(other) => panic!("seed {seed}: a buyer got {other:?}"),
            }
        }
        assert_eq!(
            tally,
            Tally {
                granted: UNITS as usize,
                sold_out: BUYERS - UNITS as usize
            },
            "seed {seed}"
        );
        let s = h.engine.sku(sku("drop")).await.expect("sku");
        assert_eq!(
            (s.levels.available, s.levels.reserved),
            (0, UNITS),
            "seed {seed}"
        );
        let state = assert_replay_matches(&h).await;
        assert_eq!(state.orders.len(), UNITS as usize, "seed {seed}");
        h.engine.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_multi_sku_orders_never_deadlock_or_leave_partial_holds() {
    const BUYERS: usize = 3_000;
    let skus = ["a", "b", "c", "d"];
    for seed in 0..5u64 {
        let h = harness(roomy());
        for id in skus {
            create(&h.engine, id, 100, 150, None).await;
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let barrier = Arc::new(Barrier::new(BUYERS));
        let mut tasks = Vec::with_capacity(BUYERS);
        for buyer in 0..BUYERS {
            // Two to four SKUs, in a random order, one to three units each.
            let mut picked = skus.to_vec();
            picked.shuffle(&mut rng);
            picked.truncate(rng.random_range(2..=4));
            let lines: Vec<_> = picked
                .iter()
                .map(|id| line(id, rng.random_range(1..=3)))
                .collect();
            let engine = h.engine.clone();
            let barrier = Arc::clone(&barrier);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let result = engine
                    .place_order(user(&format!("b{buyer}")), &lines, None, None)
                    .await;
                (lines, result)
            }));
        }
        let deadline = std::time::Duration::from_secs(60);
        let mut units = std::collections::HashMap::new();
        let mut placed = 0;
        for task in tasks {
            let (lines, result) = tokio::time::timeout(deadline, task)
                .await
                .expect("no deadlock: every order finishes")
                .expect("buyer task");
            match result {
                Ok(order) => {
                    placed += 1;
                    assert_eq!(order.lines.len(), lines.len(), "all lines or none");
                    for l in lines {
                        *units.entry(l.sku).or_insert(0u64) += u64::from(l.qty);
                    }
                }
                Err(EngineError::Domain(DomainError::OutOfStock { .. })) => {}
                Err(other) => panic!("seed {seed}: {other:?}"),
            }
        }
        assert!(placed > 0, "seed {seed}: some orders get through");
        for id in skus {
            let s = h.engine.sku(sku(id)).await.expect("sku");
            let held = units.get(&sku(id)).copied().unwrap_or(0);
            assert_eq!(
                s.levels.reserved, held,
                "seed {seed}: SKU {id} holds only placed units"
            );
            assert_eq!(s.levels.available + held, 150, "seed {seed}: SKU {id}");
        }
        // Replay also proves no reservation was left open.
        let state = assert_replay_matches(&h).await;
        assert!(
            state.open_reservations.is_empty(),
            "seed {seed}: no partial holds"
        );
        h.engine.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_user_firing_fifty_parallel_orders_gets_exactly_the_limit() {
    for round in 0..10 {
        let h = harness(roomy());
        create(&h.engine, "limited", 1_000, 1_000, Some(2)).await;
        let barrier = Arc::new(Barrier::new(50));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let engine = h.engine.clone();
                let barrier = Arc::clone(&barrier);
                tokio::spawn(async move {
                    barrier.wait().await;
                    engine
                        .place_order(user("greedy"), &[line("limited", 1)], None, None)
                        .await
                })
            })
            .collect();
        let mut granted = 0;
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => granted += 1,
                Err(EngineError::Domain(DomainError::LimitExceeded { limit: 2, .. })) => {}
                Err(other) => panic!("round {round}: {other:?}"),
            }
        }
        assert_eq!(granted, 2, "round {round}");
        let s = h.engine.sku(sku("limited")).await.expect("sku");
        assert_eq!(s.levels.reserved, 2, "round {round}");
        assert_replay_matches(&h).await;
        h.engine.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_mailbox_sheds_at_once_and_loses_nothing_accepted() {
    let config = EngineConfig {
        sku_mailbox: 4,
        ..EngineConfig::default()
    };
    let h = harness(config);
    create(&h.engine, "hot", 100, 1_000_000, None).await;
    let barrier = Arc::new(Barrier::new(2_000));
    let tasks: Vec<_> = (0..2_000)
        .map(|i| {
            let engine = h.engine.clone();
            let barrier = Arc::clone(&barrier);
            tokio::spawn(async move {
                barrier.wait().await;
                engine
                    .place_order(user(&format!("u{i}")), &[line("hot", 1)], None, None)
                    .await
            })
        })
        .collect();
    let (mut placed, mut shed) = (0u64, 0u64);
    for task in tasks {
        match task.await.expect("task") {
            Ok(_) => placed += 1,
            Err(EngineError::Overloaded) => shed += 1,
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!(shed > 0, "a mailbox of 4 cannot take 2,000 callers at once");
    let s = h.engine.sku(sku("hot")).await.expect("sku");
    assert_eq!(
        s.levels.reserved, placed,
        "every accepted order holds its unit"
    );
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engines_sharing_a_pool_stop_alone() {
    // Two engines on one actor thread, as a cluster node's partitions run.
    let pool = ActorPool::start(1).expect("the pool starts");
    let config = EngineConfig {
        actors: Some(pool.clone()),
        ..EngineConfig::default()
    };
    let left = harness(config.clone());
    let right = harness(config);
    create(&left.engine, "left-awake", 100, 10, None).await;
    create(&left.engine, "left-asleep", 100, 10, None).await;
    create(&right.engine, "right", 100, 1_000, None).await;
    left.engine.sleep_skus().await.expect("the SKUs sleep");
    left.engine
        .reserve(user("ann"), sku("left-awake"), 1)
        .await
        .expect("the left engine sells");
    right
        .engine
        .reserve(user("bob"), sku("right"), 1)
        .await
        .expect("the right engine sells");
    // The shutdown meets both kinds of SKU: one awake, one asleep.
    assert!(matches!(left.engine.is_awake(sku("left-awake")), Ok(true)));
    assert!(matches!(
        left.engine.is_awake(sku("left-asleep")),
        Ok(false)
    ));

    // The left engine stops while the right one sells on the same thread.
    let buyers: Vec<_> = (0..50)
        .map(|i| {
            let engine = right.engine.clone();
            tokio::spawn(async move {
                engine
                    .reserve(user(&format!("u{i}")), sku("right"), 1)
                    .await
            })
        })
        .collect();
    left.engine.shutdown();
    for buyer in buyers {
        buyer
            .await
            .expect("the buyer task ends")
            .expect("the right engine sells while the left one stops");
    }
    for id in ["left-awake", "left-asleep"] {
        let refused = left.engine.reserve(user("ann"), sku(id), 1).await;
        assert!(refused.is_err(), "{id}: a stopped engine grants nothing");
    }
    // The other engine, and the thread they shared, go on.
    right
        .engine
        .reserve(user("cid"), sku("right"), 1)
        .await
        .expect("the right engine still sells after the left one stopped");
    assert_eq!(left.engine.failure(), None, "a shutdown is not a death");
    assert_eq!(right.engine.failure(), None);
    right.engine.shutdown();
    pool.stop();
}
