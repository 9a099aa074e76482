//! The order archive through the real binary: orders archived by the
//! shards' own timers (`--archive-after 1s`) read back identically, list
//! once, refund, and survive a restart with the per-user limit still
//! counted; and SIGKILLs while archiving under load lose nothing and
//! duplicate nothing (the workload and checks of `tests/crash.rs`).

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use support::load::{self, Book, Users};
use support::server::{Api, Server};

const ARGS: [&str; 4] = ["--archive-after", "1s", "--reservation-ttl", "2s"];

/// The live order count in a state, from `/metrics` (archived orders are
/// not in memory, so not counted).
fn live_orders(api: &mut Api, status: &str) -> u64 {
    let text = api.call("GET", "/metrics", None, None, None).body;
    let text = String::from_utf8_lossy(&text);
    let needle = format!("flashcore_orders{{status=\"{status}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(u64::MAX)
}

/// Waits until no order in memory is in a finished state.
fn wait_archived(api: &mut Api) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while ["delivered", "cancelled", "expired", "refunded"]
        .iter()
        .any(|s| live_orders(api, s) != 0)
    {
        assert!(Instant::now() < deadline, "finished orders never archived");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// How many orders the archive holds, read from the data dir of a stopped
/// server.
fn archived_on_disk(data_dir: &Path) -> usize {
    let dir = flashcore::journal::archive_dir(data_dir);
    let archive = flashcore::journal::SledArchive::open(&dir).expect("opens");
    archive.len()
}

fn post(api: &mut Api, token: &str, path: &str, body: Option<&str>) -> Value {
    let r = api.call("POST", path, Some(token), None, body);
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

fn get(api: &mut Api, token: &str, path: &str) -> Value {
    let r = api.call("GET", path, Some(token), None, None);
    assert_eq!(
        r.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

#[test]
fn archived_orders_read_list_refund_and_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &ARGS);
    let (ann, admin) = (server.customer("ann"), server.admin());
    let mut api = Api::new(&server);
    assert_eq!(api.create_sku("ltd", 500, 100, Some(3)).status, 201);

    let placed = api.order(&ann, &[("ltd", 2)], None).json();
    let id = placed["order_id"].as_str().expect("id").to_string();
    post(
        &mut api,
        &admin,
        &format!("/v1/orders/{id}/pay"),
        Some(r#"{"payment_ref":"p-1","amount_cents":1000}"#),
    );
    post(&mut api, &admin, &format!("/v1/orders/{id}/ship"), None);
    post(&mut api, &admin, &format!("/v1/orders/{id}/deliver"), None);
    let other = api.order(&ann, &[("ltd", 1)], None).json();
    let other_id = other["order_id"].as_str().expect("id").to_string();
    post(
        &mut api,
        &ann,
        &format!("/v1/orders/{other_id}/cancel"),
        None,
    );
    let before = get(&mut api, &ann, &format!("/v1/orders/{id}"));
    let list_before = get(&mut api, &ann, "/v1/orders");

    wait_archived(&mut api);
    assert_eq!(live_orders(&mut api, "delivered"), 0);
    assert_eq!(get(&mut api, &ann, &format!("/v1/orders/{id}")), before);
    assert_eq!(get(&mut api, &ann, "/v1/orders"), list_before);
    let one = get(&mut api, &ann, "/v1/orders?limit=1");
    assert_eq!(one["orders"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        one["orders"][0]["order_id"],
        other_id.as_str(),
        "newest first"
    );
    let bob = server.customer("bob");
    let r = api.call("GET", &format!("/v1/orders/{id}"), Some(&bob), None, None);
    assert_eq!(r.status, 403, "owner checks unchanged");
    let r = api.order(&ann, &[("ltd", 2)], None);
    assert_eq!(r.code(), "limit_exceeded", "archived units still count");

    drop(api);
    server.terminate();
    assert_eq!(archived_on_disk(dir.path()), 2);
    let server = Server::start(dir.path(), &ARGS);
    let mut api = Api::new(&server);
    assert_eq!(get(&mut api, &ann, &format!("/v1/orders/{id}")), before);
    assert_eq!(get(&mut api, &ann, "/v1/orders"), list_before, "once each");
    let r = api.order(&ann, &[("ltd", 2)], None);
    assert_eq!(r.code(), "limit_exceeded", "still counted after a restart");

    let refunded = post(
        &mut api,
        &admin,
        &format!("/v1/orders/{id}/refund"),
        Some(r#"{"lines":[{"sku_id":"ltd","qty":2}],"restock":true}"#),
    );
    assert_eq!(refunded["status"], "refunded");
    assert_eq!(refunded["refunded_cents"], 1000);
    assert_eq!(get(&mut api, &ann, &format!("/v1/orders/{id}")), refunded);
    assert_eq!(api.sku("ltd")["on_hand"], 100);
    let r = api.order(&ann, &[("ltd", 2)], None);
    assert_eq!(r.status, 201, "refunded units no longer count");
}

/// Rounds unless `ARCHIVE_CRASH_ROUNDS` says otherwise.
const ROUNDS_DEFAULT: usize = 12;

/// Every user's listing holds each order once.
fn assert_listed_once(server: &Server, users: &Users, label: &str) -> usize {
    let mut api = Api::new(server);
    let admin = server.admin();
    let mut total = 0;
    for user in users.lock().expect("users").iter() {
        let listed = get(
            &mut api,
            &admin,
            &format!("/v1/orders?limit=500&user_id={user}"),
        );
        let ids: Vec<&str> = listed["orders"]
            .as_array()
            .expect("orders")
            .iter()
            .map(|o| o["order_id"].as_str().unwrap_or_default())
            .collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{label}: {user} sees a duplicate");
        total += ids.len();
    }
    total
}

#[test]
fn sigkills_while_archiving_lose_nothing_and_duplicate_nothing() {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0xa2c4);
    eprintln!("archive crash test seed {seed} (set CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let rounds = load::rounds("ARCHIVE_CRASH_ROUNDS", ROUNDS_DEFAULT);
    let dir = tempfile::tempdir().expect("tempdir");
    let book: Book = Arc::new(Mutex::new(HashMap::new()));
    let users: Users = Arc::default();
    load::create_skus(&Server::start(dir.path(), &ARGS));
    for round in 0..rounds {
        let mut server = Server::start(dir.path(), &ARGS);
        load::verify(&server, &book, &users, &format!("round {round}"));
        assert_listed_once(&server, &users, &format!("round {round}"));
        let workers = load::spawn_workers(&server, round, &mut rng, &book, &users);
        // Long enough for orders to finish, age past 1 s and be swept.
        std::thread::sleep(Duration::from_millis(rng.random_range(800..3_000)));
        server.kill();
        for w in workers {
            w.join().expect("worker");
        }
    }
    let mut server = Server::start(dir.path(), &ARGS);
    load::verify(&server, &book, &users, "after the last round");
    let listed = assert_listed_once(&server, &users, "after the last round");
    let acked = book.lock().expect("book").len();
    assert!(listed >= acked, "{listed} listed, {acked} acknowledged");
    let mut api = Api::new(&server);
    wait_archived(&mut api);
    drop(api);
    server.terminate();
    let archived = archived_on_disk(dir.path());
    eprintln!("{rounds} SIGKILLs: {acked} acknowledged orders, {archived} archived, none lost");
    assert!(
        archived > rounds,
        "archiving ran: {archived} orders archived"
    );
    let server = Server::start(dir.path(), &ARGS);
    load::verify(
        &server,
        &book,
        &users,
        "after archiving everything finished",
    );
    assert_eq!(
        assert_listed_once(&server, &users, "after archiving everything finished"),
        listed
    );
}
