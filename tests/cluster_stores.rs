//! A partition's archive and spilled idempotency records on three real
//! servers (`src/cluster/archive.rs`, `src/cluster/idem_store.rs`): what
//! is written reads back through another connection, lists newest first
//! within the limit, is stored once however often it is written, and
//! damage is refused, and writes go on once the stream's leader server is
//! killed; and through takeovers (`src/cluster/partition.rs`),
//! the orders one owner archived and the idempotency records it moved out
//! of memory answer at the next owner, which holds neither in memory.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, Context};
use flashcore::clock::SystemClock;
use flashcore::cluster::archive::{ArchiveStream, JetStreamArchive, ensure_archive_stream};
use flashcore::cluster::idem_store::{IdemStream, JetStreamIdemStore, ensure_idem_stream};
use flashcore::cluster::journal::{JournalStream, ensure_stream};
use flashcore::cluster::partition::{OwnedPartition, StoreStreams, Takeover, take_over};
use flashcore::cluster::snapshots::open_bucket;
use flashcore::domain::event::IdemStamp;
use flashcore::domain::idem::{FirstAnswer, HashedRecord, IdemRecord, KeyHash, Lookup, Outcome};
use flashcore::domain::order::{Order, ReservedLine};
use flashcore::domain::{IdempotencyKey, OrderId, UserId};
use flashcore::engine::{EngineConfig, EngineError, IdSpace, OrderScope};
use flashcore::journal::{Archive, IdemStore, Journal, JournalError, SnapshotPolicy, codec};
use support::nats::NatsCluster;
use support::{admin, create, line, user};

const PARTITION: u32 = 3;
const PARTITIONS: u32 = 8;

async fn connect(cluster: &NatsCluster) -> Context {
    jetstream::new(async_nats::connect(cluster.addrs()).await.expect("connect"))
}

/// An order of partition 3 of 8: its `k`-th id.
fn order(k: u64, who: &str, qty: u32) -> Order {
    let line = ReservedLine {
        sku: support::sku("tee"),
        name: "Tee".into(),
        qty,
        unit_price_cents: 1_000,
    };
    let id = OrderId(k * u64::from(PARTITIONS) + u64::from(PARTITION));
    Order::place(id, user(who), vec![line], None, 1_000 + k, 60_000).expect("places")
}

fn ids(orders: &[Order]) -> Vec<u64> {
    orders.iter().map(|o| o.id.0).collect()
}

async fn messages(js: &Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

async fn publish(js: &Context, subject: String, bytes: Vec<u8>) {
    js.publish(subject, bytes.into())
        .await
        .expect("publish")
        .await
        .expect("acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_reads_back_lists_newest_first_stores_once_and_refuses_damage() {
    let cluster = NatsCluster::start(3);
    let (js_a, js_b) = (connect(&cluster).await, connect(&cluster).await);
    let spec = ArchiveStream::new(3);
    ensure_archive_stream(&js_a, &spec).await.expect("made");
    ensure_archive_stream(&js_b, &spec)
        .await
        .expect("bound again");
    let runtime = tokio::runtime::Handle::current();
    let stride = u64::from(PARTITIONS);
    let a = JetStreamArchive::new(js_a.clone(), &spec, PARTITION, stride, runtime.clone());
    let b = JetStreamArchive::new(js_b.clone(), &spec, PARTITION, stride, runtime.clone());
    let other = JetStreamArchive::new(js_b.clone(), &spec, PARTITION + 1, stride, runtime);

    // 100 orders across two pages (the partition's 1,024th id opens the
    // second), alternating two users, and one user whose id has a dot.
    let mut orders: Vec<Order> = (1_000..1_100)
        .map(|k| order(k, if k % 2 == 0 { "ann" } else { "bob" }, 1))
        .collect();
    orders.push(order(7, "a.nn", 1));
    // Written from a blocking thread, as the archive sweep writes.
    let (writer, batch) = (a.clone(), orders.clone());
    tokio::task::spawn_blocking(move || writer.put_batch(&batch))
        .await
        .expect("task")
        .expect("written once every PubAck is in");

    // Read through another connection, from a runtime worker (the engine's
    // GET path).
    for sample in [&orders[0], &orders[57], &orders[99], &orders[100]] {
        assert_eq!(b.get(sample.id).expect("reads").as_ref(), Some(sample));
    }
    assert_eq!(b.get(order(5, "ann", 1).id).expect("reads"), None);
    assert_eq!(
        other.get(orders[0].id).expect("reads"),
        None,
        "partition 4's"
    );

    let newest_ann: Vec<u64> = (1_090..1_100)
        .rev()
        .filter(|k| k % 2 == 0)
        .map(|k| k * 8 + 3)
        .collect();
    assert_eq!(
        ids(&b.list_user(&user("ann"), 5).expect("lists")),
        newest_ann
    );
    let bob = b.list_user(&user("bob"), 500).expect("lists");
    assert_eq!(bob.len(), 50);
    assert!(bob.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert!(bob.iter().all(|o| o.user == user("bob")));
    assert_eq!(ids(&b.list_user(&user("a.nn"), 10).expect("lists")), [59]);
    assert!(b.list_user(&user("nobody"), 10).expect("lists").is_empty());

    let all = b.list_all(10).expect("lists");
    assert_eq!(
        ids(&all),
        (1_090..1_100).rev().map(|k| k * 8 + 3).collect::<Vec<_>>()
    );
    let every = b.list_all(500).expect("lists");
    assert_eq!(every.len(), 101, "both pages and the old order");
    assert!(every.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(every.last().map(|o| o.id.0), Some(59));
    assert!(other.list_all(10).expect("lists").is_empty());
    assert!(b.list_all(0).expect("lists").is_empty());

    // Written again (a sweep after a crash), and one changed: stored once,
    // the last write wins.
    let before = messages(&js_a, &spec.name).await;
    let mut again = orders[..10].to_vec();
    again[3] = order(1_003, "bob", 2);
    a.put_batch(&again).expect("written again");
    assert_eq!(messages(&js_a, &spec.name).await, before, "stored once");
    assert_eq!(b.get(again[3].id).expect("reads"), Some(again[3].clone()));
    assert_eq!(b.list_user(&user("bob"), 500).expect("lists").len(), 50);

    // Damage is refused, never read as an order: garbage, a flipped byte,
    // another order's bytes under this id.
    let garbage = orders[20].id;
    publish(&js_a, a.order_subject(garbage), b"not an order".to_vec()).await;
    let mut flipped = codec::encode_order(&orders[21]).expect("encodes");
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    publish(&js_a, a.order_subject(orders[21].id), flipped).await;
    let swapped = codec::encode_order(&orders[22]).expect("encodes");
    publish(&js_a, a.order_subject(orders[23].id), swapped).await;
    for id in [garbage, orders[21].id, orders[23].id] {
        assert!(
            matches!(b.get(id), Err(JournalError::Remote { .. })),
            "order {id} read despite damage"
        );
    }
    assert!(matches!(
        b.list_user(&user("ann"), 500),
        Err(JournalError::Remote { .. })
    ));
}

fn hashed(key: u8, at_ms: u64) -> HashedRecord {
    HashedRecord {
        key: KeyHash([key; 16]),
        record: IdemRecord {
            fingerprint: [key; 16],
            at_ms,
            outcome: Outcome::Order {
                id: OrderId(u64::from(key)),
                history_len: 1,
            },
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_idempotency_store_keeps_the_last_record_per_key_and_refuses_damage() {
    let cluster = NatsCluster::start(3);
    let (js_a, js_b) = (connect(&cluster).await, connect(&cluster).await);
    let spec = IdemStream::new(3);
    ensure_idem_stream(&js_a, &spec).await.expect("made");
    ensure_idem_stream(&js_b, &spec).await.expect("bound again");
    let mut stream = js_a.get_stream(&spec.name).await.expect("stream");
    let config = stream.info().await.expect("info").config.clone();
    assert!(
        config.max_age >= Duration::from_millis(flashcore::limits::IDEMPOTENCY_TTL_MS),
        "the servers never drop a record before its TTL"
    );
    let runtime = tokio::runtime::Handle::current();
    let a = JetStreamIdemStore::new(js_a.clone(), &spec, PARTITION, runtime.clone());
    let b = JetStreamIdemStore::new(js_b.clone(), &spec, PARTITION, runtime.clone());
    let other = JetStreamIdemStore::new(js_b.clone(), &spec, PARTITION + 1, runtime);

    let records: Vec<HashedRecord> = (1..=50).map(|k| hashed(k, 100)).collect();
    let writer = a.clone();
    tokio::task::spawn_blocking(move || writer.put_batch(&records))
        .await
        .expect("task")
        .expect("written");
    assert_eq!(
        b.get(&KeyHash([7; 16])).expect("reads"),
        Some(hashed(7, 100).record)
    );
    assert_eq!(b.get(&KeyHash([99; 16])).expect("reads"), None);
    assert_eq!(other.get(&KeyHash([7; 16])).expect("reads"), None);
    // A key used again after its TTL: the newer record replaces the older.
    a.put_batch(&[hashed(7, 900)]).expect("written");
    assert_eq!(
        b.get(&KeyHash([7; 16])).expect("reads"),
        Some(hashed(7, 900).record)
    );
    assert_eq!(b.len(), 50, "one record per key");
    assert_eq!(other.len(), 0);
    // Expiry is the servers' (max_age): nothing is swept by hand.
    assert_eq!(b.evict_before(u64::MAX).expect("sweeps"), 0);
    assert_eq!(b.len(), 50);

    publish(&js_a, a.subject(&KeyHash([9; 16])), b"garbage".to_vec()).await;
    let tens = codec::encode_idem_record(&hashed(10, 100)).expect("encodes");
    publish(&js_a, a.subject(&KeyHash([11; 16])), tens).await;
    for key in [9u8, 11] {
        assert!(
            matches!(b.get(&KeyHash([key; 16])), Err(JournalError::Remote { .. })),
            "key {key} read despite damage"
        );
    }
}

fn takeover(
    context: Context,
    snapshots: jetstream::object_store::ObjectStore,
    term: u64,
    stores: Option<StoreStreams>,
) -> Takeover {
    Takeover {
        context,
        spec: JournalStream::new(3),
        snapshots,
        partition: PARTITION,
        term,
        engine: EngineConfig {
            archive_after_ms: Some(1),
            idem_memory_records_max: 4,
            order_ids: IdSpace::partition(PARTITION, PARTITIONS),
            ..EngineConfig::default()
        },
        policy: SnapshotPolicy {
            every_events: 20,
            every_ms: 60_000,
        },
        clock: Arc::new(SystemClock),
        stores,
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

fn key(i: usize) -> IdempotencyKey {
    IdempotencyKey::parse(&format!("key-{i}")).expect("valid")
}

fn who(i: usize) -> UserId {
    user(&format!("u{}", i % 4))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_orders_and_spilled_keys_follow_their_partition() {
    let cluster = NatsCluster::start(3);
    let nodes = [
        connect(&cluster).await,
        connect(&cluster).await,
        connect(&cluster).await,
    ];
    ensure_stream(&nodes[0], &JournalStream::new(3))
        .await
        .expect("journal stream");
    let stores = StoreStreams::new(3);
    ensure_archive_stream(&nodes[0], &stores.archive)
        .await
        .expect("archive stream");
    ensure_idem_stream(&nodes[0], &stores.idem)
        .await
        .expect("idempotency stream");
    let bucket = open_bucket(&nodes[0], "fc_snapshots", 3)
        .await
        .expect("snapshot bucket");

    // Node A: 20 keyed orders, the first 10 cancelled and archived, the
    // records past the budget (4) moved to the store.
    let a = take(takeover(
        nodes[0].clone(),
        bucket.clone(),
        1,
        Some(stores.clone()),
    ))
    .await;
    create(&a.engine, "cap", 100, 1_000, None).await;
    let mut placed = Vec::new();
    for i in 0..20 {
        let stamp = IdemStamp {
            user: who(i),
            key: key(i),
            fingerprint: [i as u8 + 1; 16],
        };
        let order = a
            .engine
            .place_order(who(i), &[line("cap", 1)], None, Some(stamp))
            .await
            .expect("placed on A");
        placed.push(order);
    }
    for order in &placed[..10] {
        a.engine.cancel(admin(), order.id).await.expect("cancelled");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        a.engine.archive_due().await.expect("archives");
        let counts = a.engine.order_counts().await.expect("counts");
        let finished: u64 = counts
            .iter()
            .filter(|(status, _)| status.is_final())
            .map(|(_, n)| n)
            .sum();
        if finished == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{finished} finished orders still in memory"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let moved = a.engine.spill_idempotency().await.expect("spills");
    assert_eq!(moved, 16, "down to the budget");
    assert_eq!(a.engine.idempotency_records_in_memory(), 4);
    // A snapshot after the spill: the next owner starts from it, so the
    // moved records are in no memory and no journal block it replays.
    let spilled_at = a.journal.last_seq();
    for i in 0..25 {
        a.engine
            .place_order(user(&format!("filler{i}")), &[line("cap", 1)], None, None)
            .await
            .expect("placed");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while a.last_snapshot().is_none_or(|s| s.start <= spilled_at) {
        assert!(
            Instant::now() < deadline,
            "A wrote no snapshot after the spill"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Node B, without the stores: what left A's memory is nowhere here. This
    // is what every cluster node did before; it shows the check below can fail.
    let b = take(takeover(nodes[1].clone(), bucket.clone(), 2, None)).await;
    assert!(matches!(
        b.engine.order(admin(), placed[0].id).await,
        Err(EngineError::NotFound { .. })
    ));
    let fresh = (0..20)
        .filter(|&i| {
            matches!(
                b.engine.idempotency(who(i), &key(i), [i as u8 + 1; 16]),
                Ok(Lookup::Fresh)
            )
        })
        .count();
    assert!(
        fresh >= 1,
        "every record was still in B's memory: the test proves nothing"
    );

    // Node C, with the stores: every archived order reads, lists merge
    // archived and live orders, and every key gets its first answer.
    let c = take(takeover(nodes[2].clone(), bucket, 3, Some(stores))).await;
    for order in &placed[..10] {
        let read = c
            .engine
            .order(admin(), order.id)
            .await
            .expect("archived order");
        assert_eq!(read.id, order.id);
        assert!(read.status.is_final(), "{:?}", read.status);
    }
    let listed = c
        .engine
        .orders(OrderScope::User(who(0)), 500)
        .await
        .expect("lists");
    let expected: Vec<u64> = placed
        .iter()
        .rev()
        .filter(|o| o.user == who(0))
        .map(|o| o.id.0)
        .collect();
    assert_eq!(ids(&listed), expected, "archived and live, newest first");
    for (i, order) in placed.iter().enumerate() {
        let fingerprint = [i as u8 + 1; 16];
        let found = c
            .engine
            .idempotency(who(i), &key(i), fingerprint)
            .expect("looks up");
        let Lookup::Replay(outcome) = found else {
            panic!("key {i}: {found:?}, not its first answer");
        };
        match c
            .engine
            .first_answer(who(i), &outcome)
            .await
            .expect("renders")
        {
            FirstAnswer::Order(first) => assert_eq!(first.id, order.id, "key {i}"),
            FirstAnswer::Sku(sku) => panic!("key {i}: a SKU answer {sku:?}"),
        }
        assert!(matches!(
            c.engine.idempotency(who(i), &key(i), [0; 16]),
            Ok(Lookup::Conflict)
        ));
    }

    tokio::task::spawn_blocking(move || {
        a.stop();
        b.stop();
        c.stop();
    })
    .await
    .expect("stopped");
}

/// Calls `f` until it answers `Ok`, for at most `patience`; answers how
/// long that took.
async fn until_ok<T: Send + 'static>(
    patience: Duration,
    f: impl Fn() -> Result<T, JournalError> + Send + Sync + Clone + 'static,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        let attempt = f.clone();
        match tokio::task::spawn_blocking(attempt).await.expect("task") {
            Ok(value) => return (value, started.elapsed()),
            Err(e) => assert!(
                started.elapsed() < patience,
                "still failing after {patience:?}: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_goes_on_when_its_streams_leader_server_is_killed() {
    let mut cluster = NatsCluster::start(3);
    let (js_a, js_b) = (connect(&cluster).await, connect(&cluster).await);
    let spec = ArchiveStream::new(3);
    ensure_archive_stream(&js_a, &spec).await.expect("made");
    let runtime = tokio::runtime::Handle::current();
    let stride = u64::from(PARTITIONS);
    let a = JetStreamArchive::new(js_a.clone(), &spec, PARTITION, stride, runtime.clone());
    let b = JetStreamArchive::new(js_b.clone(), &spec, PARTITION, stride, runtime);
    let before: Vec<Order> = (0..50).map(|k| order(k, "ann", 1)).collect();
    let (writer, batch) = (a.clone(), before.clone());
    until_ok(Duration::from_secs(5), move || writer.put_batch(&batch)).await;

    let mut stream = js_a.get_stream(&spec.name).await.expect("stream");
    let info = stream.info().await.expect("info");
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("a leader");
    let leader: usize = leader.trim_start_matches('n').parse().expect("n<i>");
    cluster.kill(leader);

    // Writes fail until a new leader is elected (the sweep retries), then
    // go on.
    let after: Vec<Order> = (50..100).map(|k| order(k, "ann", 1)).collect();
    let (writer, batch) = (a.clone(), after.clone());
    let (_, took) = until_ok(Duration::from_secs(30), move || writer.put_batch(&batch)).await;
    eprintln!("archive writes went on {took:?} after the stream leader was killed");

    // Everything acknowledged reads back from the new leader, through the
    // other connection.
    let reader = b.clone();
    let (all, _) = until_ok(Duration::from_secs(30), move || reader.list_all(500)).await;
    let expected: Vec<u64> = (0..100).rev().map(|k| k * 8 + 3).collect();
    assert_eq!(ids(&all), expected);
    for order in before.iter().chain(&after) {
        assert_eq!(b.get(order.id).expect("reads").as_ref(), Some(order));
    }
}
