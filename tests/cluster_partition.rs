//! A partition moving between nodes on three real servers
//! (`src/cluster/partition.rs`): node A serves a partition (engine on the
//! JetStream journal, snapshots in the object store) and takes orders;
//! node B takes the partition over while A still runs. B must hold every
//! order A acknowledged, with the SKU's books equal to them; A must not
//! acknowledge anything after B's barrier (it is fenced); B goes on.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use flashcore::clock::SystemClock;
use flashcore::cluster::journal::{JournalStream, ensure_stream};
use flashcore::cluster::partition::{OwnedPartition, Takeover, take_over};
use flashcore::cluster::snapshots::open_bucket;
use flashcore::domain::OrderId;
use flashcore::engine::{EngineConfig, EngineError};
use flashcore::journal::SnapshotPolicy;
use support::nats::NatsCluster;
use support::{admin, create, line, user};

const PARTITION: u32 = 7;

fn takeover(
    context: jetstream::Context,
    snapshots: jetstream::object_store::ObjectStore,
    term: u64,
) -> Takeover {
    Takeover {
        context,
        spec: JournalStream::new(3),
        snapshots,
        partition: PARTITION,
        term,
        engine: EngineConfig::default(),
        // Often, so that the takeover starts from a snapshot and the
        // journal below it has been purged.
        policy: SnapshotPolicy {
            every_events: 150,
            every_ms: 60_000,
        },
        clock: Arc::new(SystemClock),
        stores: None,
    }
}

/// Takes the partition over on a blocking thread (as a node does).
async fn take(t: Takeover) -> OwnedPartition {
    let runtime = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || take_over(t, &runtime))
        .await
        .expect("task")
        .expect("takes the partition over")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moves_to_another_node_with_every_acknowledged_order() {
    let cluster = NatsCluster::start(3);
    let connect =
        || async { jetstream::new(async_nats::connect(cluster.addrs()).await.expect("connect")) };
    let (node_a, node_b) = (connect().await, connect().await);
    ensure_stream(&node_a, &JournalStream::new(3))
        .await
        .expect("journal stream");
    let bucket = open_bucket(&node_a, "fc_snapshots", 3)
        .await
        .expect("snapshot bucket");

    let a = take(takeover(node_a, bucket.clone(), 1)).await;
    create(&a.engine, "hat", 100, 100_000, None).await;
    let mut acknowledged: Vec<(OrderId, u32)> = Vec::new();
    for i in 0..600u32 {
        let qty = 1 + i % 3;
        let order = a
            .engine
            .place_order(
                user(&format!("u{}", i % 40)),
                &[line("hat", qty)],
                None,
                None,
            )
            .await
            .expect("placed on A");
        acknowledged.push((order.id, qty));
    }
    // At least one snapshot, so B starts from the object store.
    for _ in 0..600 {
        if a.last_snapshot().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.last_snapshot().is_some(), "A wrote no snapshot");

    let b = take(takeover(node_b, bucket, 2)).await;
    assert!(b.replayed_through >= acknowledged.len() as u64);

    // A is fenced: its next change is refused, never acknowledged.
    let refused = a
        .engine
        .place_order(user("late"), &[line("hat", 1)], None, None)
        .await;
    assert!(
        matches!(refused, Err(EngineError::Storage(_))),
        "A acknowledged a change after B's barrier: {refused:?}"
    );
    assert!(
        a.journal.is_fenced(),
        "A's journal does not know it is fenced"
    );

    // B holds every order A acknowledged, and the books agree.
    for (id, qty) in &acknowledged {
        let order = b.engine.order(admin(), *id).await.expect("order on B");
        assert_eq!(order.lines[0].qty, *qty, "order {id:?}");
    }
    let reserved: u64 = acknowledged.iter().map(|(_, q)| u64::from(*q)).sum();
    let hat = b.engine.sku(support::sku("hat")).await.expect("sku on B");
    assert_eq!(hat.levels.reserved, reserved);
    assert_eq!(hat.levels.available, 100_000 - reserved);

    // B goes on, with ids A never answered.
    let next = b
        .engine
        .place_order(user("after"), &[line("hat", 1)], None, None)
        .await
        .expect("placed on B");
    assert!(
        acknowledged.iter().all(|(id, _)| *id != next.id),
        "B handed out {:?} again",
        next.id
    );

    tokio::task::spawn_blocking(move || {
        a.stop();
        b.stop();
    })
    .await
    .expect("stopped");
}
