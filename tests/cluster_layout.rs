//! The partition count is fixed when the cluster is created
//! (`src/cluster/layout.rs`): the first node writes it, a node with the
//! same count joins, a node with another count is refused, naming both.

mod support;

use async_nats::jetstream;
use flashcore::cluster::layout::{LayoutError, cluster_bucket, settle_partitions};
use support::nats::NatsCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_another_partition_count_is_refused() {
    let cluster = NatsCluster::start(3);
    let connect =
        || async { jetstream::new(async_nats::connect(cluster.addrs()).await.expect("connect")) };
    let (first, second, third) = (connect().await, connect().await, connect().await);

    let bucket = cluster_bucket(&first, "fc_cluster", 3)
        .await
        .expect("bucket");
    assert_eq!(
        settle_partitions(&bucket, 64).await.expect("first node"),
        64
    );
    let bucket = cluster_bucket(&second, "fc_cluster", 3)
        .await
        .expect("bucket");
    assert_eq!(
        settle_partitions(&bucket, 64).await.expect("same count"),
        64
    );

    let bucket = cluster_bucket(&third, "fc_cluster", 3)
        .await
        .expect("bucket");
    let refused = settle_partitions(&bucket, 32).await;
    match refused {
        Err(LayoutError::Mismatch { existing, asked }) => assert_eq!((existing, asked), (64, 32)),
        other => panic!("another count must be refused: {other:?}"),
    }
    assert!(matches!(
        settle_partitions(&bucket, 0).await,
        Err(LayoutError::OutOfRange(0))
    ));
    // The refusal changed nothing.
    assert_eq!(settle_partitions(&bucket, 64).await.expect("still 64"), 64);
}
