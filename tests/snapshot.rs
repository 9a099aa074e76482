//! Snapshots taken from the live actors while orders race through them:
//! every snapshot, the last one and the ones taken mid-load, rebuilds
//! exactly the state the engine had, and the whole state's invariants hold
//! (per-user counts included).

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flashcore::domain::PaymentRef;
use flashcore::domain::sale::SaleWindow;
use flashcore::engine::{Engine, EngineConfig, ManualClock, NewSku, OrderScope};
use flashcore::journal::{self, FlushPolicy, Journal, SnapshotPolicy, Snapshotter};
use support::*;

struct Node {
    engine: Engine,
    journal: Arc<journal::SledJournal>,
}

fn boot(dir: &Path, config: EngineConfig) -> (Node, journal::Recovered) {
    // Relaxed: answers do not wait for the disk, so actors run further
    // apart and snapshots catch their parts at different sequence numbers.
    let opened = journal::open(dir, FlushPolicy::Relaxed, false).expect("open");
    let mut recovered = opened.recovered;
    // Finished orders are archived as the load runs (per-user counts may
    // then exceed what the live orders hold, never fall below).
    recovered
        .state
        .check_archived()
        .expect("the rebuilt state holds every invariant");
    let state = std::mem::take(&mut recovered.state);
    let engine = Engine::start(
        config,
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

/// One buyer's traffic: single-line orders paid and shipped (moves between
/// shard and SKU), two-line orders (reservations) cancelled, delivered.
async fn buyer(e: Engine, who: usize, rounds: usize) {
    for i in 0..rounds {
        let u = user(&format!("b{who}"));
        let single = e.place_order(u, &[line("a", 1)], None, None).await;
        if let Ok(o) = single {
            let paid = e
                .pay(
                    admin(),
                    o.id,
                    PaymentRef::parse(&format!("p{who}x{i}")).expect("valid"),
                    o.total_cents,
                    None,
                )
                .await;
            if paid.is_ok() && i % 2 == 0 {
                let _ = e.ship(admin(), o.id).await;
                let _ = e.deliver(admin(), o.id).await;
            }
        }
        let double = e
            .place_order(u, &[line("b", 1), line("c", 2)], None, None)
            .await;
        if let Ok(o) = double
            && i % 3 == 0
        {
            let _ = e.cancel(admin(), o.id).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_taken_under_load_rebuild_exactly_the_live_state() {
    snapshots_under_load(false).await;
}

/// The same, while the SKU actors are put to sleep again and again: a
/// snapshot meets SKUs asleep in the catalog, awake, and waking or falling
/// asleep between its rounds, and must still hold each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_skus_that_sleep_and_wake_rebuild_exactly_the_live_state() {
    snapshots_under_load(true).await;
}

async fn snapshots_under_load(churn: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    // Several actor threads, so SKUs and shards really run side by side.
    // Finished orders archived at once, so snapshots and replay also meet
    // `OrdersArchived` (and parts whose orders left memory).
    let config = EngineConfig {
        actor_threads: 2,
        durability: flashcore::engine::DurabilityMode::Relaxed,
        archive_after_ms: Some(0),
        ..EngineConfig::default()
    };
    let (node, _) = boot(dir.path(), config.clone());
    for id in ["a", "c"] {
        create(&node.engine, id, 100, 100_000, None).await;
    }
    // A SKU with a sale window (open now), so replay meets the events of
    // format 2 too.
    node.engine
        .create_sku(NewSku {
            sku: sku("b"),
            name: "Item b".into(),
            price_cents: 100,
            stock: 100_000,
            per_user_limit: None,
            sale: SaleWindow::new(Some(T0_MS - 1_000), Some(T0_MS + 86_400_000)).expect("valid"),
        })
        .await
        .expect("SKU created");
    let policy = SnapshotPolicy {
        every_events: 50,
        every_ms: 10,
    };
    let mut snapshotter = Snapshotter::start(
        Arc::new(node.engine.clone()),
        node.journal.clone(),
        journal::snapshot_dir(dir.path()),
        policy,
    );
    let wakes_before = node.engine.sku_wakes();
    let stop_sleeper = Arc::new(std::sync::atomic::AtomicBool::new(!churn));
    let sleeper = {
        let (e, stop) = (node.engine.clone(), Arc::clone(&stop_sleeper));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = e.sleep_skus().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    // Rounds of buyers until a snapshot was taken while they ran: the
    // snapshotter runs at nice 19, so on a machine busy with other work
    // one round can end before any snapshot does (bounded: 60 s).
    let mut mid_load = Vec::new();
    let patience = std::time::Instant::now();
    while mid_load.is_empty() && patience.elapsed() < Duration::from_secs(60) {
        let buyers: Vec<_> = (0..32)
            .map(|who| tokio::spawn(buyer(node.engine.clone(), who, 400)))
            .collect();
        while !buyers.iter().all(tokio::task::JoinHandle::is_finished) {
            if let Some(report) = snapshotter.last()
                && mid_load.last() != Some(&report)
            {
                mid_load.push(report);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for b in buyers {
            b.await.expect("buyer");
        }
    }
    stop_sleeper.store(true, std::sync::atomic::Ordering::SeqCst);
    sleeper.await.expect("sleeper");
    if churn {
        let wakes = node.engine.sku_wakes() - wakes_before;
        eprintln!("SKU wake-ups during the load: {wakes}");
        assert!(wakes > 3, "the SKUs slept and woke ({wakes} wake-ups)");
    }
    eprintln!("mid-load snapshots: {mid_load:?}");
    let archived = node.engine.archive_due().await.expect("archive sweep");
    eprintln!("archived by the last sweep: {archived}");
    assert!(snapshotter.healthy());
    assert!(
        !mid_load.is_empty(),
        "snapshots were taken during the load: {mid_load:?}"
    );
    let before = books(&node.engine).await;
    let last = node.journal.last_seq();
    snapshotter.stop();
    node.engine.shutdown();
    node.journal.close();
    drop(node);

    // From the last snapshot.
    let (node, recovered) = boot(dir.path(), config.clone());
    assert_eq!(recovered.last_seq, last);
    assert_eq!(books(&node.engine).await, before);
    node.engine.shutdown();
    node.journal.close();
    drop(node);

    // From the one before (taken under load, its parts at different
    // sequence numbers), plus the journal after it.
    let newest = std::fs::read_dir(journal::snapshot_dir(dir.path()))
        .expect("snapshots")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .max()
        .expect("a snapshot");
    std::fs::remove_file(&newest).expect("removed");
    let (node, recovered) = boot(dir.path(), config);
    assert!(recovered.snapshot_seq > 0, "an older snapshot was used");
    assert_eq!(recovered.last_seq, last);
    assert_eq!(books(&node.engine).await, before);
    node.engine.shutdown();
    node.journal.close();
}
