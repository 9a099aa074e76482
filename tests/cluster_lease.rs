//! Partition leases (`src/cluster/lease.rs`) against a real 3-server NATS
//! cluster: one holder per partition under races, renewal across TTLs,
//! expiry that never precedes the old holder's deadline, release, a paused
//! server, and a killed one.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use flashcore::cluster::lease::{LeaseError, Leases};
use support::nats::NatsCluster;

const BUCKET: &str = "leases";

/// Short enough to see several TTLs in a test, at the module's minimum.
const TTL: Duration = Duration::from_secs(1);

/// How long a test waits for the cluster to elect a new stream leader
/// after a server is killed (the servers' election timeout is seconds).
const FAILOVER_WAIT: Duration = Duration::from_secs(20);

async fn js(addrs: Vec<String>) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(addrs)
        .await
        .expect("connect to the cluster");
    jetstream::new(client)
}

/// A node with its own connection to every server.
async fn node(cluster: &NatsCluster, name: &str) -> Arc<Leases> {
    node_on(cluster.addrs(), name).await
}

async fn node_on(addrs: Vec<String>, name: &str) -> Arc<Leases> {
    let js = js(addrs).await;
    Arc::new(
        Leases::open(&js, BUCKET, name, TTL, 3)
            .await
            .unwrap_or_else(|e| panic!("{name} opens the lease bucket: {e}")),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn one_holder_per_partition_in_every_round() {
    const NODES: usize = 3;
    const PARTITIONS: u32 = 4;
    const ROUNDS: usize = 12;
    let cluster = NatsCluster::start(3);
    let mut nodes = Vec::new();
    for i in 0..NODES {
        nodes.push(node(&cluster, &format!("node{i}")).await);
    }
    let mut last_term = [0_u64; PARTITIONS as usize];
    for round in 0..ROUNDS {
        for partition in 0..PARTITIONS {
            let barrier = Arc::new(tokio::sync::Barrier::new(NODES));
            let tasks: Vec<_> = nodes
                .iter()
                .map(|n| {
                    let (n, barrier) = (Arc::clone(n), Arc::clone(&barrier));
                    tokio::spawn(async move {
                        barrier.wait().await;
                        n.acquire(partition).await
                    })
                })
                .collect();
            let mut winners = Vec::new();
            for (i, task) in tasks.into_iter().enumerate() {
                let outcome = task.await.expect("task");
                let held =
                    outcome.unwrap_or_else(|e| panic!("round {round}: node{i} acquire: {e}"));
                if let Some(held) = held {
                    winners.push((i, held));
                }
            }
            assert_eq!(
                winners.len(),
                1,
                "round {round} partition {partition}: exactly one holder, got nodes {:?}",
                winners.iter().map(|(i, _)| i).collect::<Vec<_>>()
            );
            let (winner, held) = winners.pop().expect("one winner");
            assert!(held.is_valid());
            assert!(
                held.term() > last_term[partition as usize],
                "terms grow with each acquisition"
            );
            last_term[partition as usize] = held.term();

            let owners = nodes[0].owners().await.expect("owners");
            let owner = owners
                .iter()
                .find(|o| o.partition == partition)
                .expect("the partition has an owner");
            assert_eq!(owner.node, format!("node{winner}"));
            assert_eq!(owner.term, held.term());
            // Released, so the next round races over a delete marker.
            nodes[winner].release(held).await.expect("release");
        }
    }
    assert!(nodes[0].owners().await.expect("owners").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_lease_outlives_its_ttl_and_release_frees_it_at_once() {
    let cluster = NatsCluster::start(3);
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    // A node with another TTL is refused, naming both.
    let other = Leases::open(&js(cluster.addrs()).await, BUCKET, "c", TTL * 2, 3).await;
    assert!(
        matches!(
            other,
            Err(LeaseError::TtlMismatch {
                existing_ms: 1000,
                wanted_ms: 2000,
                ..
            })
        ),
        "{other:?}"
    );

    // By hand: three renewals over more than two TTLs.
    let mut held = a.acquire(7).await.expect("acquire").expect("free");
    let term = held.term();
    for _ in 0..3 {
        tokio::time::sleep(TTL * 3 / 4).await;
        assert!(b.acquire(7).await.expect("b tries").is_none(), "b refused");
        a.renew(&mut held)
            .await
            .expect("renewed before the deadline");
        assert!(held.remaining() > TTL / 2);
    }
    assert_eq!(held.term(), term, "renewing keeps the term");

    // By the keeper: five TTLs, b refused all along.
    let keeper = Arc::clone(&a).keep(held);
    let valid = keeper.valid();
    let started = Instant::now();
    while started.elapsed() < TTL * 5 {
        assert!(keeper.is_valid(), "kept valid at {:?}", started.elapsed());
        assert!(b.acquire(7).await.expect("b tries").is_none(), "b refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(*valid.borrow());
    let owners = b.owners().await.expect("owners");
    assert_eq!(owners.len(), 1);
    assert_eq!((owners[0].partition, owners[0].node.as_str()), (7, "a"));
    assert_eq!(owners[0].term, term);
    assert!(owners[0].held_for >= TTL * 5);
    assert!(owners[0].renewed_ago < TTL, "{:?}", owners[0].renewed_ago);

    // Released: b acquires at once, well before a TTL.
    keeper.release().await.expect("release");
    assert!(!*valid.borrow(), "a released lease is no longer valid");
    let released = Instant::now();
    let held_b = b
        .acquire(7)
        .await
        .expect("b acquires")
        .expect("free after release");
    assert!(released.elapsed() < TTL / 4, "{:?}", released.elapsed());
    assert!(held_b.term() > term);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unrenewed_lease_is_invalid_before_another_node_gets_it() {
    let cluster = NatsCluster::start(3);
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;

    let mut held = a.acquire(3).await.expect("acquire").expect("free");
    let deadline = held.deadline();
    // b polls until the servers expire a's key.
    let (taken_at, held_b) = loop {
        if let Some(h) = b.acquire(3).await.expect("b tries") {
            break (Instant::now(), h);
        }
        assert!(
            deadline.elapsed() < TTL * 3,
            "the key never expired: {}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        taken_at >= deadline,
        "b acquired {:?} before a's deadline",
        deadline - taken_at
    );
    eprintln!(
        "b took the key {:?} after a's deadline",
        taken_at - deadline
    );
    assert!(!held.is_valid());
    assert!(matches!(
        a.renew(&mut held).await,
        Err(LeaseError::Lost { partition: 3 })
    ));
    assert!(held_b.term() > held.term());
    assert!(held_b.is_valid());
    // a's release of a lease it lost leaves b's alone.
    a.release(held).await.expect("nothing to release");
    let owners = a.owners().await.expect("owners");
    assert_eq!(owners[0].node, "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_keeper_cut_off_by_a_paused_server_turns_invalid_at_its_deadline() {
    let cluster = NatsCluster::start(3);
    // a talks to n0 alone; b to the two others.
    let a = node_on(vec![cluster.url(0)], "a").await;
    let b = node_on(vec![cluster.url(1), cluster.url(2)], "b").await;

    let held = a.acquire(1).await.expect("acquire").expect("free");
    let keeper = Arc::clone(&a).keep(held);
    let mut valid = keeper.valid();
    tokio::time::sleep(TTL).await;
    assert!(keeper.is_valid(), "renewed while n0 runs");

    cluster.pause(0);
    let paused = Instant::now();
    // The watch turns false within a TTL of the pause (the last renewal
    // was sent less than TTL/3 before it), by the timer.
    tokio::time::timeout(TTL + TTL / 2, valid.wait_for(|v| !*v))
        .await
        .expect("the watch turns false by the deadline")
        .expect("keeper alive");
    let invalid_at = Instant::now();
    assert!(!keeper.is_valid());
    assert!(
        invalid_at - paused <= TTL + TTL / 10,
        "{:?}",
        invalid_at - paused
    );

    // b gets it only after that (after a stream leader election if n0 led).
    let started = Instant::now();
    let taken_at = loop {
        match b.acquire(1).await {
            Ok(Some(_)) => break Instant::now(),
            Ok(None) | Err(LeaseError::Timeout { .. } | LeaseError::Nats { .. }) => {}
            Err(e) => panic!("b acquire: {e}"),
        }
        assert!(started.elapsed() < FAILOVER_WAIT, "b never acquired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        taken_at >= invalid_at,
        "b acquired before a stopped believing"
    );
    eprintln!(
        "paused -> a invalid {:?}, -> b owner {:?}",
        invalid_at - paused,
        taken_at - paused
    );
    cluster.resume(0);
    drop(keeper);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_keep_working_when_a_server_is_killed() {
    let mut cluster = NatsCluster::start(3);
    let a = node(&cluster, "a").await;
    let b = node(&cluster, "b").await;
    let held = a.acquire(0).await.expect("acquire").expect("free");
    let keeper = Arc::clone(&a).keep(held);

    // Kill a server that does not lead the bucket's stream: no election,
    // so the keeper renews on without a gap.
    let js = js(cluster.addrs()).await;
    let info = js
        .get_stream(format!("KV_{BUCKET}"))
        .await
        .expect("the bucket's stream")
        .get_info()
        .await
        .expect("stream info");
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .expect("the stream has a leader");
    let follower = (0..3)
        .find(|i| format!("n{i}") != leader)
        .expect("a follower");
    cluster.kill(follower);
    let started = Instant::now();
    while started.elapsed() < TTL * 3 {
        assert!(keeper.is_valid(), "kept through a follower's death");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.acquire(0).await.expect("b tries").is_none());
    let mut held_b = b.acquire(5).await.expect("acquire").expect("free");
    b.renew(&mut held_b).await.expect("renew on two servers");
    keeper.release().await.expect("release");
    b.release(held_b).await.expect("release");

    // Bring it back and kill the leader instead: after an election (a short,
    // bounded wait) acquire and renew work again.
    cluster.restart(follower);
    cluster.wait_jetstream();
    let leader_index: usize = leader
        .strip_prefix('n')
        .and_then(|n| n.parse().ok())
        .expect("server names are n{i}");
    cluster.kill(leader_index);
    let killed = Instant::now();
    // A fresh partition per attempt: an attempt that timed out may still
    // have landed, and its key would refuse the next one.
    let mut partition = 100;
    let mut held = loop {
        partition += 1;
        match a.acquire(partition).await {
            Ok(Some(held)) => break held,
            Ok(None) => panic!("partition {partition} was never held"),
            Err(e @ (LeaseError::Timeout { .. } | LeaseError::Nats { .. })) => {
                assert!(
                    killed.elapsed() < FAILOVER_WAIT,
                    "no acquire within {FAILOVER_WAIT:?}: {e}"
                );
            }
            Err(e) => panic!("acquire: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("acquire after the leader's death: {:?}", killed.elapsed());
    a.renew(&mut held).await.expect("renew after the election");
    assert!(b.acquire(partition).await.expect("b tries").is_none());
}
