//! Cluster mode end to end: real `nats-server`s (`support/nats.rs`) and
//! real `flashcore serve --cluster` nodes, each test ending with the book
//! check: every acknowledged order is there through any node, no unit is
//! sold twice, and each SKU's units add up.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::nats::NatsCluster;
use support::server::{Api, Client, Server, Stream, hdrs};

/// Small enough that three nodes each own a few, large enough that the
/// SKUs below land in several.
const PARTITIONS: u32 = 8;

/// A dead node's partitions move after about this long.
const LEASE_TTL: &str = "2s";

/// How long a node may take to join and become ready (a busy 2-core
/// machine running the whole suite).
const NODE_START: Duration = Duration::from_secs(90);

/// How long the partitions may take to spread over the nodes, or to move
/// off a dead one: the contract's 10 s, with room for the machine.
const SETTLE: Duration = Duration::from_secs(60);

fn node(nats: &NatsCluster, dir: &Path, id: &str) -> Server {
    node_with(nats, dir, id, &[])
}

/// A node started with `extra` arguments after the cluster's.
fn node_with(nats: &NatsCluster, dir: &Path, id: &str, extra: &[&str]) -> Server {
    let urls = nats.urls();
    let partitions = PARTITIONS.to_string();
    let mut args = vec![
        "--cluster",
        urls.as_str(),
        "--node-id",
        id,
        "--partitions",
        partitions.as_str(),
        "--lease-ttl",
        LEASE_TTL,
    ];
    args.extend_from_slice(extra);
    Server::launch(dir, &args, &[], true, NODE_START)
        .unwrap_or_else(|e| panic!("node {id} did not start: {e}\n{}", nats.logs()))
}

fn cluster_view(server: &Server) -> Option<Value> {
    let mut client = Client::try_connect(server.addr).ok()?;
    let answer = client.try_send("GET", "/v1/cluster", &[], None).ok()?;
    (answer.status == 200).then(|| answer.json())
}

/// The dashboard's next event on `server` with a cluster section that shows
/// `nodes` live nodes and an owner for every partition (`GET /v1/stream`,
/// read raw): partitions still move while the nodes even out their shares.
fn live_cluster(server: &Server, nodes: usize) -> Value {
    let mut stream = Stream::open(server.addr);
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < SETTLE {
        let Some(event) = stream.next() else {
            panic!("the stream ended; last event: {last}");
        };
        let cluster = &event["cluster"];
        let settled = cluster["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == nodes)
            && cluster["owners"]
                .as_array()
                .is_some_and(|o| o.iter().all(|o| o["node_id"].is_string()));
        if settled {
            return event;
        }
        last = event;
    }
    panic!("no dashboard event showed {nodes} nodes: {last}");
}

/// `GET path`, asked again while it answers 503 partition_unavailable or
/// overloaded: a partition still moving (the nodes even out their shares
/// after a join), or an owner this node has not seen yet, answers so for a
/// moment, and a request the test gave up on still holds this client's
/// share until it ends: the contract, not a loss. Any other answer is
/// final.
fn get_settled(api: &mut Api<'_>, path: &str, token: Option<&str>) -> support::server::Response {
    let started = Instant::now();
    loop {
        let answer = api.call("GET", path, token, None, None);
        let transient = ["partition_unavailable", "overloaded"];
        if answer.status == 503
            && transient.contains(&answer.code().as_str())
            && started.elapsed() < SETTLE
        {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        return answer;
    }
}

/// Waits until every partition is owned by one of `nodes` live nodes and
/// each owns at least one; returns the view.
fn wait_spread(server: &Server, nodes: usize) -> Value {
    let started = Instant::now();
    loop {
        if let Some(view) = cluster_view(server) {
            let owners = view["owners"].as_array().cloned().unwrap_or_default();
            let live = view["nodes"].as_array().cloned().unwrap_or_default();
            let names: HashSet<&str> = live.iter().filter_map(|n| n["node_id"].as_str()).collect();
            // Owned by a live node (a dead node's lease lingers until the
            // servers expire it).
            let all_owned = owners.len() == PARTITIONS as usize
                && owners
                    .iter()
                    .all(|o| o["node_id"].as_str().is_some_and(|n| names.contains(n)));
            let spread = live.len() == nodes
                && live
                    .iter()
                    .all(|n| n["partitions_owned"].as_u64().unwrap_or(0) >= 1);
            if all_owned && spread {
                return view;
            }
            if started.elapsed() > SETTLE {
                panic!("partitions not spread over {nodes} nodes in time: {view}");
            }
        } else if started.elapsed() > SETTLE {
            panic!("GET /v1/cluster does not answer:\n{}", server.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create_sku(server: &Server, id: &str, stock: u64) {
    let mut api = Api::new(server);
    let started = Instant::now();
    loop {
        let created = api.create_sku(id, 1_000, stock, None);
        match created.status {
            201 => return,
            503 if started.elapsed() < SETTLE => std::thread::sleep(Duration::from_millis(100)),
            _ => panic!(
                "creating {id}: {} {}",
                created.status,
                String::from_utf8_lossy(&created.body)
            ),
        }
    }
}

/// An acknowledged order: its id and SKU.
#[derive(Debug, Clone)]
struct Acked {
    order_id: String,
    sku: String,
}

/// Places one single-line order of one unit through the nodes in `addrs`
/// (starting at `first`), retrying the same key on `503` and on a node that
/// is gone, until an answer decides it: `Some` for 201, `None` for
/// `409 out_of_stock`.
fn place(
    addrs: &[std::net::SocketAddr],
    first: usize,
    token: &str,
    sku: &str,
    key: &str,
) -> Option<Acked> {
    let body = format!(r#"{{"items":[{{"sku_id":"{sku}","qty":1}}]}}"#);
    let headers = [
        ("Content-Type", "application/json".to_string()),
        ("Authorization", format!("Bearer {token}")),
        ("Idempotency-Key", key.to_string()),
    ];
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        assert!(
            started.elapsed() < SETTLE,
            "order {key} for {sku} undecided after {SETTLE:?}"
        );
        let addr = addrs[(first + attempt) % addrs.len()];
        attempt += 1;
        let answer = Client::try_connect(addr)
            .and_then(|mut c| c.try_send("POST", "/v1/orders", &hdrs(&headers), Some(&body)));
        let Ok(answer) = answer else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        match answer.status {
            201 => {
                let order = answer.json();
                return Some(Acked {
                    order_id: order["order_id"].as_str().expect("an id").to_string(),
                    sku: sku.to_string(),
                });
            }
            409 => {
                assert_eq!(answer.code(), "out_of_stock", "{key}");
                return None;
            }
            503 => {
                assert!(
                    answer.header("retry-after").is_some(),
                    "a 503 without Retry-After: {}",
                    String::from_utf8_lossy(&answer.body)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
            other => panic!(
                "order {key}: {other} {}",
                String::from_utf8_lossy(&answer.body)
            ),
        }
    }
}

/// One order of one unit of `sku`, sent once through `server`.
fn order_raw(
    server: &Server,
    token: &str,
    sku: &str,
    key: &str,
    promo: Option<&str>,
) -> support::server::Response {
    let promo = promo.map_or(String::new(), |code| format!(r#","promo_code":"{code}""#));
    let body = format!(r#"{{"items":[{{"sku_id":"{sku}","qty":1}}]{promo}}}"#);
    Api::new(server).call("POST", "/v1/orders", Some(token), Some(key), Some(&body))
}

/// A SKU of `stock` in another partition than `sku`'s.
fn skus_in_other_partition(stock: &BTreeMap<String, u64>, sku: &str) -> String {
    let partition = |id: &str| {
        flashcore::cluster::layout::partition_of_sku(
            &flashcore::domain::SkuId::parse(id).expect("valid"),
            PARTITIONS,
        )
    };
    stock
        .keys()
        .find(|other| partition(other) != partition(sku))
        .expect("the SKUs span partitions")
        .clone()
}

/// The book check through `server`: every acknowledged order is there with
/// its SKU, ids are unique, and each SKU holds as reserved exactly the
/// units its acknowledged orders took, never more than its stock.
fn check_books(server: &Server, acked: &[Acked], stock: &BTreeMap<String, u64>) {
    let admin = server.admin();
    let mut api = Api::new(server);
    let ids: HashSet<&str> = acked.iter().map(|a| a.order_id.as_str()).collect();
    assert_eq!(ids.len(), acked.len(), "an order id was answered twice");
    for order in acked {
        let path = format!("/v1/orders/{}", order.order_id);
        let answer = get_settled(&mut api, &path, Some(&admin));
        assert_eq!(
            answer.status,
            200,
            "acknowledged order {} lost: {}",
            order.order_id,
            String::from_utf8_lossy(&answer.body)
        );
        let found = answer.json();
        assert_eq!(found["lines"][0]["sku_id"], order.sku.as_str());
    }
    for (sku, stock) in stock {
        let answer = get_settled(&mut api, &format!("/v1/skus/{sku}"), None);
        assert_eq!(
            answer.status,
            200,
            "{sku}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        let view = answer.json();
        let sold = acked.iter().filter(|a| &a.sku == sku).count() as u64;
        assert!(sold <= *stock, "{sku}: {sold} sold of {stock}");
        assert_eq!(view["reserved"], sold, "{sku}: {view}");
        assert_eq!(view["available"], stock - sold, "{sku}: {view}");
    }
}

#[test]
fn a_sale_through_three_nodes_sells_each_unit_once_and_survives_a_node_killed() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut nodes: Vec<Server> = (0..3)
        .map(|i| node(&nats, dirs[i].path(), &format!("n{i}")))
        .collect();
    wait_spread(&nodes[0], 3);

    // The dashboard of any node shows the cluster: every partition with an
    // owner among the live nodes, and each node's count adding up to P.
    let live = live_cluster(&nodes[1], 3);
    let cluster = &live["cluster"];
    assert_eq!(cluster["node_id"], "n1", "{cluster}");
    let owners = cluster["owners"].as_array().expect("owners");
    assert_eq!(owners.len(), PARTITIONS as usize, "{cluster}");
    let node_ids: HashSet<&str> = cluster["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert!(
        owners.iter().all(|o| o["node_id"]
            .as_str()
            .is_some_and(|id| node_ids.contains(id))),
        "{cluster}"
    );
    let owned: u64 = cluster["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["partitions_owned"].as_u64())
        .sum();
    assert_eq!(owned, u64::from(PARTITIONS), "{cluster}");

    // SKUs in several partitions (the cluster view tells which node owns
    // what; the test only needs them spread).
    let stock: BTreeMap<String, u64> = (0..6).map(|i| (format!("drop-{i}"), 40)).collect();
    for (i, (sku, units)) in stock.iter().enumerate() {
        create_sku(&nodes[i % 3], sku, *units);
    }

    // A key replayed through another node gets the first answer.
    let token = nodes[0].customer("replayer");
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let first = place(&addrs[..1], 0, &token, "drop-0", "replay-1").expect("placed");
    let again = place(&addrs[1..2], 0, &token, "drop-0", "replay-1").expect("replayed");
    assert_eq!(
        first.order_id, again.order_id,
        "a replay through another node"
    );
    // The same key with another body through a third node is a 422, also
    // when the other body's SKU is in another partition.
    let elsewhere = skus_in_other_partition(&stock, "drop-0");
    let conflict = order_raw(&nodes[2], &token, &elsewhere, "replay-1", None);
    assert_eq!(
        conflict.status,
        422,
        "{}",
        String::from_utf8_lossy(&conflict.body)
    );
    assert_eq!(conflict.code(), "idempotency_conflict");

    // A promotion created through one node prices an order through another;
    // its code is taken through every node.
    let admin = nodes[1].admin();
    let promo = r#"{"code":"DROP1","threshold_cents":0,"off_cents":100}"#;
    let created =
        Api::new(&nodes[1]).call("POST", "/v1/promotions", Some(&admin), None, Some(promo));
    assert_eq!(
        created.status,
        201,
        "{}",
        String::from_utf8_lossy(&created.body)
    );
    let again = Api::new(&nodes[2]).call("POST", "/v1/promotions", Some(&admin), None, Some(promo));
    assert_eq!(
        again.status,
        409,
        "{}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(again.code(), "already_exists");
    let started = Instant::now();
    let discounted = loop {
        let answer = order_raw(&nodes[2], &token, "drop-1", "promo-1", Some("DROP1"));
        // The other nodes learn of the promotion through their watch of
        // the bucket, within milliseconds.
        if answer.status == 400 && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        assert_eq!(
            answer.status,
            201,
            "{}",
            String::from_utf8_lossy(&answer.body)
        );
        break answer.json();
    };
    assert_eq!(discounted["discount_cents"], 100, "{discounted}");
    let promo_order = Acked {
        order_id: discounted["order_id"].as_str().expect("an id").to_string(),
        sku: "drop-1".into(),
    };
    let acked = Arc::new(Mutex::new(vec![first, promo_order]));

    // The storm: buyers on every node, each order decided by retrying its
    // key, while node 2 is killed half-way.
    let skus: Vec<String> = stock.keys().cloned().collect();
    let buyers: Vec<_> = (0..6)
        .map(|b| {
            let (addrs, skus, acked) = (addrs.clone(), skus.clone(), Arc::clone(&acked));
            let token = nodes[0].customer(&format!("buyer-{b}"));
            std::thread::spawn(move || {
                for k in 0..45 {
                    let sku = &skus[(b + k) % skus.len()];
                    let key = format!("b{b}-{k}");
                    if let Some(order) = place(&addrs, b + k, &token, sku, &key) {
                        acked.lock().expect("lock").push(order);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1_500));
    nodes[2].kill();
    let killed = Instant::now();
    for buyer in buyers {
        buyer.join().expect("a buyer panicked");
    }
    // Its partitions have moved: every partition owned by a live node.
    let view = wait_spread(&nodes[0], 2);
    let moved = killed.elapsed();
    assert!(
        view["owners"]
            .as_array()
            .expect("owners")
            .iter()
            .all(|o| o["node_id"] != "n2"),
        "{view}"
    );
    eprintln!("partitions moved off the killed node within {moved:?}");

    let acked = acked.lock().expect("lock").clone();
    check_books(&nodes[0], &acked, &stock);
    check_books(&nodes[1], &acked, &stock);

    // Restarted, the killed node is ready, takes its share back, and the
    // books read the same through it.
    let restarted = Instant::now();
    nodes[2] = node(&nats, dirs[2].path(), "n2");
    wait_spread(&nodes[2], 3);
    eprintln!(
        "the killed node was back in its share within {:?}",
        restarted.elapsed()
    );
    check_books(&nodes[2], &acked, &stock);

    // The lists gather every partition, through any node.
    let admin = nodes[1].admin();
    let listed = Api::new(&nodes[1]).call("GET", "/v1/orders?limit=500", Some(&admin), None, None);
    assert_eq!(
        listed.status,
        200,
        "{}",
        String::from_utf8_lossy(&listed.body)
    );
    let listed = listed.json();
    let listed: HashSet<String> = listed["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| o["order_id"].as_str().expect("id").to_string())
        .collect();
    let wanted: HashSet<String> = acked.iter().map(|a| a.order_id.clone()).collect();
    assert_eq!(listed, wanted);
    let skus = Api::new(&nodes[2])
        .call("GET", "/v1/skus?limit=3", None, None, None)
        .json();
    assert_eq!(skus["skus"].as_array().expect("skus").len(), 3);
    assert_eq!(skus["skus"][0]["sku_id"], "drop-0");
    assert_eq!(skus["next"], "drop-2");
}

#[test]
fn a_partition_between_owners_answers_503_and_its_orders_survive_the_move() {
    let nats = NatsCluster::start(3);
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let mut a = node(&nats, dir_a.path(), "a");
    wait_spread(&a, 1);
    create_sku(&a, "solo", 10);
    let token = a.customer("early");
    let placed = place(&[a.addr], 0, &token, "solo", "k-1").expect("placed");

    // A dies holding every partition; b starts while a's leases still run.
    a.kill();
    let killed = Instant::now();
    let b = node(&nats, dir_b.path(), "b");
    let mut api = Api::new(&b);
    let mut saw_503 = false;
    // Until a's leases lapse (2 s) nobody serves its partitions.
    let answer = loop {
        let answer = api.call("GET", "/v1/skus/solo", None, None, None);
        if answer.status == 503 {
            assert_eq!(answer.code(), "partition_unavailable");
            assert!(answer.header("retry-after").is_some());
            saw_503 = true;
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        break answer;
    };
    let took = killed.elapsed();
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        saw_503 || took >= Duration::from_secs(2),
        "no 503 seen, yet it moved in {took:?}"
    );
    eprintln!("partition moved {took:?} after the kill (503 seen meanwhile: {saw_503})");
    assert!(took < SETTLE, "moved only after {took:?}");
    // A replay of the first key through the new owner: the first answer.
    let again = place(&[b.addr], 0, &token, "solo", "k-1").expect("replayed");
    assert_eq!(again.order_id, placed.order_id);
    let stock = BTreeMap::from([("solo".to_string(), 10)]);
    check_books(&b, &[placed], &stock);
}

/// The node that owns `sku`'s partition now, by id.
fn owner_of(server: &Server, sku: &str) -> String {
    let partition = flashcore::cluster::layout::partition_of_sku(
        &flashcore::domain::SkuId::parse(sku).expect("valid"),
        PARTITIONS,
    );
    let view = cluster_view(server).expect("the cluster view");
    view["owners"][partition as usize]["node_id"]
        .as_str()
        .unwrap_or_else(|| panic!("partition {partition} has no owner: {view}"))
        .to_string()
}

#[test]
fn a_node_stopped_past_its_lease_steps_down_and_never_sells_from_stale_stock() {
    let nats = NatsCluster::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    let nodes: Vec<Server> = (0..2)
        .map(|i| node(&nats, dirs[i].path(), &format!("s{i}")))
        .collect();
    wait_spread(&nodes[0], 2);
    let stock = BTreeMap::from([("scarce".to_string(), 12)]);
    create_sku(&nodes[0], "scarce", 12);
    let owner = owner_of(&nodes[0], "scarce");
    let (paused, other) = if owner == "s0" { (0, 1) } else { (1, 0) };
    let token = nodes[other].customer("patient");
    let mut acked = Vec::new();
    for k in 0..4 {
        let addrs = [nodes[paused].addr];
        acked.extend(place(&addrs, 0, &token, "scarce", &format!("before-{k}")));
    }

    // The owner stops (SIGSTOP) with the SKU's stock in its memory; the
    // other node takes the partition once the lease lapses and sells on.
    nodes[paused].signal("-STOP");
    let stopped = Instant::now();
    for k in 0..4 {
        let addrs = [nodes[other].addr];
        acked.extend(place(&addrs, 0, &token, "scarce", &format!("during-{k}")));
    }
    let moved = stopped.elapsed();
    eprintln!("the paused owner's partition sold again {moved:?} after SIGSTOP");
    assert_eq!(owner_of(&nodes[other], "scarce"), format!("s{other}"));

    // Resumed, the old owner still holds the old stock in memory; it must
    // not sell from it: through it, orders go to the new owner, and what
    // it might still append is refused by the journal.
    nodes[paused].signal("-CONT");
    for k in 0..10 {
        let addrs = [nodes[paused].addr];
        acked.extend(place(&addrs, 0, &token, "scarce", &format!("after-{k}")));
    }
    assert_eq!(
        acked.len(),
        12,
        "every unit sold once, the rest out of stock"
    );
    check_books(&nodes[0], &acked, &stock);
    check_books(&nodes[1], &acked, &stock);
}

#[test]
fn the_sale_goes_on_when_the_journal_streams_leader_server_is_killed() {
    let mut nats = NatsCluster::start(3);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    let nodes: Vec<Server> = (0..2)
        .map(|i| node(&nats, dirs[i].path(), &format!("m{i}")))
        .collect();
    wait_spread(&nodes[0], 2);
    let stock: BTreeMap<String, u64> = (0..4).map(|i| (format!("item-{i}"), 100)).collect();
    for sku in stock.keys() {
        create_sku(&nodes[0], sku, 100);
    }
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let token = nodes[0].customer("steady");
    let mut acked = Vec::new();
    for (k, sku) in stock.keys().enumerate() {
        acked.extend(place(&addrs, k, &token, sku, &format!("warm-{k}")));
    }

    let leader = journal_leader(&nats);
    nats.kill(leader);
    let killed = Instant::now();
    // Every SKU orderable again: one order each, retried through both
    // nodes until it is decided.
    for (k, sku) in stock.keys().enumerate() {
        acked.extend(place(&addrs, k, &token, sku, &format!("after-kill-{k}")));
    }
    let back = killed.elapsed();
    eprintln!("every SKU orderable {back:?} after the journal's leader server was killed");
    nats.restart(leader);
    for (k, sku) in stock.keys().enumerate() {
        acked.extend(place(&addrs, k, &token, sku, &format!("after-restart-{k}")));
    }
    assert_eq!(acked.len(), 12);
    check_books(&nodes[0], &acked, &stock);
    check_books(&nodes[1], &acked, &stock);
}

/// The index of the server leading the journal stream.
fn journal_leader(nats: &NatsCluster) -> usize {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(nats.addrs()).await.expect("connects");
        let js = async_nats::jetstream::new(client);
        let spec = flashcore::cluster::journal::JournalStream::new(3);
        let mut stream = js.get_stream(&spec.name).await.expect("the journal stream");
        let info = stream.info().await.expect("stream info");
        let leader = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("a leader");
        leader
            .trim_start_matches('n')
            .parse()
            .unwrap_or_else(|_| panic!("a server name n<i>, not {leader}"))
    })
}

/// Waits until the journal of `id`'s partition holds an `OrdersArchived`
/// naming it: the order is in the archive stream and has left its owner's
/// memory (and will not be in the next owner's, which replays that event).
fn wait_archived(nats: &NatsCluster, id: u64) {
    use flashcore::cluster::journal::{JournalStream, blocks_after};
    use flashcore::domain::{Event, OrderId};
    use flashcore::journal::codec;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(nats.addrs()).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let spec = JournalStream::new(3);
        let partition = u32::try_from(id % u64::from(PARTITIONS)).expect("small");
        let started = Instant::now();
        loop {
            if let Ok(read) = blocks_after(&js, &spec, partition, 0).await {
                let archived = read
                    .blocks
                    .iter()
                    .flat_map(|b| codec::block_records(b.first_seq, &b.bytes))
                    .any(|r| {
                        matches!(r.event, Ok(Event::OrdersArchived { ref ids, .. })
                            if ids.contains(&OrderId(id)))
                    });
                if archived {
                    return;
                }
            }
            assert!(started.elapsed() < SETTLE, "order {id} never archived");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

#[test]
fn an_order_archived_by_a_killed_node_reads_through_the_next_owner() {
    let nats = NatsCluster::start(3);
    let (dir_a, dir_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let extra = ["--archive-after", "50ms", "--idem-memory-records", "1"];
    let mut a = node_with(&nats, dir_a.path(), "a", &extra);
    wait_spread(&a, 1);
    create_sku(&a, "kept", 10);
    let token = a.customer("ann");
    let first = place(&[a.addr], 0, &token, "kept", "ka-1").expect("placed");
    let path = format!("/v1/orders/{}", first.order_id);
    let cancel = Api::new(&a).call("POST", &format!("{path}/cancel"), Some(&token), None, None);
    assert_eq!(
        cancel.status,
        200,
        "{}",
        String::from_utf8_lossy(&cancel.body)
    );
    let second = place(&[a.addr], 0, &token, "kept", "ka-2").expect("placed");
    wait_archived(&nats, first.order_id.parse().expect("decimal"));
    // Two records over a budget of one: the node moves the older to the
    // partition's store on the servers (its pass runs every second).
    let started = Instant::now();
    while !a.log().contains("idempotency records moved to the store") {
        assert!(started.elapsed() < SETTLE, "no record moved:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The owner dies; a new node takes every partition over from the
    // journal, in which the cancelled order left memory.
    a.kill();
    let b = node_with(&nats, dir_b.path(), "b", &extra);
    wait_spread(&b, 1);
    let read = get_settled(&mut Api::new(&b), &path, Some(&token));
    assert_eq!(read.status, 200, "{}", String::from_utf8_lossy(&read.body));
    assert_eq!(read.json()["status"], "cancelled");
    let listed = get_settled(&mut Api::new(&b), "/v1/orders", Some(&token));
    assert_eq!(
        listed.status,
        200,
        "{}",
        String::from_utf8_lossy(&listed.body)
    );
    let ids: Vec<String> = listed.json()["orders"]
        .as_array()
        .expect("orders")
        .iter()
        .map(|o| o["order_id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        ids,
        [second.order_id.clone(), first.order_id.clone()],
        "newest first"
    );
    // The first key again, through the new owner: the first answer, rendered
    // from the archived order.
    let again = place(&[b.addr], 0, &token, "kept", "ka-1").expect("replayed");
    assert_eq!(again.order_id, first.order_id);
    let stock = BTreeMap::from([("kept".to_string(), 10)]);
    check_books(&b, &[second], &stock);
}
