//! The crash workload and its checks, shared by `tests/crash.rs` (SIGKILL)
//! and `tests/powercut.rs` (power cuts under the server).
//!
//! Workers place strict orders on three SKUs and pay, cancel or ship some of
//! them, recording every change the server acknowledged (2xx) in a [`Book`].
//! [`verify`] then checks a restarted server against the book: every
//! acknowledged order is there, its lines unchanged, its status at least as
//! far as acknowledged; no change is half-applied (each SKU's counters equal
//! what the orders hold); every SKU balances and nothing is oversold; unpaid
//! orders past their deadline are expired. It reports every problem at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use flashcore::domain::UserId;
use flashcore::http::auth::JwtKeys;

use super::server::{Api, Client, SECRET, Server};

/// Client threads per round.
pub const WORKERS: usize = 6;
/// Orders one user places at most, so a user's orders fit one listing (the
/// API lists 500 at most); a worker then goes on as a new user.
pub const ORDERS_PER_USER_MAX: usize = 450;
/// Orders one worker places at most (far more than a round's load).
pub const ORDERS_PER_WORKER_MAX: usize = 100_000;
/// The catalog: id, price in cents, stock.
pub const SKUS: [(&str, u64, u64); 3] = [
    ("big", 150, 1_000_000),
    ("mid", 700, 100_000),
    ("small", 2_500, 40),
];
/// Problems listed in a failure message before the rest are only counted.
const PROBLEMS_SHOWN_MAX: usize = 25;
/// Tries to find a moment when the SKUs read the same before and after the orders.
const QUIET_TRIES_MAX: usize = 100;

/// How far an order got, as acknowledged to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Acked {
    Placed,
    Paid,
    Shipped,
    Cancelled,
}

/// An acknowledged order.
#[derive(Debug, Clone)]
pub struct Record {
    pub user: String,
    pub lines: Vec<(String, u64)>,
    pub total: u64,
    pub state: Acked,
}

/// Every acknowledged order by id.
pub type Book = Arc<Mutex<HashMap<String, Record>>>;

/// Every user the workers placed orders as.
pub type Users = Arc<Mutex<Vec<String>>>;

/// A customer token for `user`, signed as the test servers expect.
fn customer_token(user: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    JwtKeys::new(SECRET.as_bytes())
        .issue(UserId::parse(user).expect("valid user"), false, now, 3_600)
        .expect("signs")
}

/// A round count from the environment variable `var`, else `default`.
pub fn rounds(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Creates the catalog's SKUs; panics unless each is acknowledged.
pub fn create_skus(server: &Server) {
    let mut api = Api::new(server);
    for (sku, price, stock) in SKUS {
        let r = api.create_sku(sku, price, stock, None);
        assert_eq!(
            r.status,
            201,
            "create SKU {sku}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
}

/// Starts [`WORKERS`] workers on `server`, each as new users (added to
/// `users`). They run until the server goes away.
pub fn spawn_workers(
    server: &Server,
    round: usize,
    rng: &mut StdRng,
    book: &Book,
    users: &Users,
) -> Vec<JoinHandle<()>> {
    let admin = server.admin();
    (0..WORKERS)
        .map(|t| {
            let worker = Worker {
                addr: server.addr,
                name: format!("r{round}w{t}"),
                admin: admin.clone(),
                book: Arc::clone(book),
                users: Arc::clone(users),
            };
            let seed = rng.random();
            std::thread::spawn(move || worker.run(seed))
        })
        .collect()
}

/// One client's part of the load.
struct Worker {
    addr: SocketAddr,
    /// Its users are `{name}u0`, `{name}u1`, ...
    name: String,
    admin: String,
    book: Book,
    users: Users,
}

fn parse_lines(order: &Value) -> Vec<(String, u64)> {
    order["lines"]
        .as_array()
        .map(|ls| {
            ls.iter()
                .map(|l| {
                    (
                        l["sku_id"].as_str().unwrap_or_default().to_string(),
                        l["qty"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Worker {
    /// A new user to place orders as.
    fn new_user(&self, index: usize) -> (String, String) {
        let user = format!("{}u{index}", self.name);
        self.users.lock().expect("users").push(user.clone());
        let token = customer_token(&user);
        (user, token)
    }

    /// Hammers the server until the connection dies (or it placed
    /// [`ORDERS_PER_WORKER_MAX`] orders).
    fn run(self, seed: u64) {
        let Worker {
            addr, admin, book, ..
        } = &self;
        let (addr, admin) = (*addr, admin.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        // The server may be killed before this thread even connects.
        let Ok(mut client) = Client::try_connect(addr) else {
            return;
        };
        let mut user_index = 0;
        let (mut user, mut customer) = self.new_user(user_index);
        let mut mine: Vec<String> = Vec::new();
        for _ in 0..ORDERS_PER_WORKER_MAX {
            if mine.len() == ORDERS_PER_USER_MAX {
                user_index += 1;
                (user, customer) = self.new_user(user_index);
                mine.clear();
            }
            let roll: u32 = rng.random_range(0..100);
            let result = if roll < 55 || mine.is_empty() {
                let n = rng.random_range(1..=2);
                let lines: Vec<(String, u64)> = (0..n)
                    .map(|i| {
                        (
                            SKUS[(i + rng.random_range(0..3)) % 3].0.to_string(),
                            rng.random_range(1..=2),
                        )
                    })
                    .collect();
                let items: Vec<String> = lines
                    .iter()
                    .map(|(s, q)| format!(r#"{{"sku_id":"{s}","qty":{q}}}"#))
                    .collect();
                let body = format!(r#"{{"items":[{}]}}"#, items.join(","));
                let h = [
                    ("Content-Type", "application/json"),
                    ("Authorization", &format!("Bearer {customer}")),
                ];
                client
                    .try_send("POST", "/v1/orders", &h, Some(&body))
                    .map(|r| {
                        if r.status == 201 {
                            let o = r.json();
                            let id = o["order_id"].as_str().unwrap_or_default().to_string();
                            let total = o["total_cents"].as_u64().unwrap_or(0);
                            book.lock().expect("book").insert(
                                id.clone(),
                                Record {
                                    user: user.clone(),
                                    lines: parse_lines(&o),
                                    total,
                                    state: Acked::Placed,
                                },
                            );
                            mine.push(id);
                        }
                    })
            } else {
                let id = mine[rng.random_range(0..mine.len())].clone();
                let record = book.lock().expect("book").get(&id).cloned();
                let Some(record) = record else { continue };
                let (path, body, token, next) = match (roll, record.state) {
                    (55..=79, Acked::Placed) => (
                        format!("/v1/orders/{id}/pay"),
                        Some(format!(
                            r#"{{"payment_ref":"pay-{id}","amount_cents":{}}}"#,
                            record.total
                        )),
                        &admin,
                        Acked::Paid,
                    ),
                    (80..=89, Acked::Placed) => (
                        format!("/v1/orders/{id}/cancel"),
                        None,
                        &customer,
                        Acked::Cancelled,
                    ),
                    (90..=99, Acked::Paid) => (
                        format!("/v1/orders/{id}/ship"),
                        None,
                        &admin,
                        Acked::Shipped,
                    ),
                    _ => continue,
                };
                let mut h = vec![("Authorization", format!("Bearer {token}"))];
                if body.is_some() {
                    h.push(("Content-Type", "application/json".to_string()));
                }
                let pairs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                client
                    .try_send("POST", &path, &pairs, body.as_deref())
                    .map(|r| {
                        if r.status == 200
                            && let Some(rec) = book.lock().expect("book").get_mut(&id)
                        {
                            rec.state = rec.state.max(next);
                        }
                    })
            };
            if result.is_err() {
                return; // the server is gone
            }
        }
    }
}

fn status_rank(status: &str) -> Option<Acked> {
    match status {
        "reserved" | "expired" => Some(Acked::Placed),
        "paid" | "refunded" => Some(Acked::Paid),
        "shipped" | "delivered" => Some(Acked::Shipped),
        "cancelled" => Some(Acked::Cancelled),
        _ => None,
    }
}

/// Every SKU of the catalog, or why one cannot be read.
fn read_skus(api: &mut Api) -> Result<Vec<Value>, String> {
    SKUS.iter()
        .map(|(sku, ..)| {
            let r = api.call("GET", &format!("/v1/skus/{sku}"), None, None, None);
            if r.status == 200 {
                Ok(r.json())
            } else {
                Err(format!(
                    "SKU {sku} reads {}: {}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                ))
            }
        })
        .collect()
}

/// A consistent view: the SKUs (or why they cannot be read) and every order
/// of `users`, read while the SKUs did not change (orders expire on the
/// shards' timers while we read).
fn read_books(
    server: &Server,
    users: &[String],
    label: &str,
) -> (Result<Vec<Value>, String>, Vec<Value>) {
    if let Err(e) = std::net::TcpStream::connect(server.addr) {
        panic!(
            "{label}: the server stopped answering ({e}); its log:\n{}",
            server.log()
        );
    }
    let mut api = Api::new(server);
    let admin = server.admin();
    for _ in 0..QUIET_TRIES_MAX {
        let before = read_skus(&mut api);
        let mut orders: Vec<Value> = Vec::new();
        for user in users {
            let r = api.call(
                "GET",
                &format!("/v1/orders?limit=500&user_id={user}"),
                Some(&admin),
                None,
                None,
            );
            assert_eq!(r.status, 200, "{label}: list orders of {user}");
            orders.extend(r.json()["orders"].as_array().cloned().unwrap_or_default());
        }
        // A damaged catalog stays damaged: no need to wait for quiet.
        if before.is_err() || read_skus(&mut api) == before {
            return (before, orders);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{label}: no quiet moment to read the books");
}

/// Checks `server` against every acknowledged change in `book`; panics with
/// every problem found (`label` says which round and what happened before).
pub fn verify(server: &Server, book: &Book, users: &Users, label: &str) {
    let checked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        check_books(server, book, users, label);
    }));
    if let Err(panic) = checked {
        eprintln!(
            "{label}: the check failed; the server's log:\n{}",
            server.log()
        );
        std::panic::resume_unwind(panic);
    }
}

/// The checks of [`verify`].
fn check_books(server: &Server, book: &Book, users: &Users, label: &str) {
    let users = users.lock().expect("users").clone();
    let (skus, orders) = read_books(server, &users, label);
    let mut problems: Vec<String> = Vec::new();
    let skus = skus.unwrap_or_else(|e| {
        problems.push(format!("the catalog is damaged: {e}"));
        Vec::new()
    });
    let by_id: HashMap<String, &Value> = orders
        .iter()
        .map(|o| (o["order_id"].as_str().unwrap_or_default().to_string(), o))
        .collect();
    let now = std::time::SystemTime::now();
    let mut missing: Vec<String> = Vec::new();
    let book = book.lock().expect("book");
    let mut ids: Vec<&String> = book.keys().collect();
    ids.sort();
    for id in ids {
        let record = &book[id];
        let Some(order) = by_id.get(id) else {
            missing.push(format!("{id} ({:?})", record.state));
            continue;
        };
        if order["user_id"] != record.user.as_str() {
            problems.push(format!(
                "order {id}: user {} not {}",
                order["user_id"], record.user
            ));
        }
        let lines = parse_lines(order);
        if lines != record.lines {
            problems.push(format!(
                "order {id}: lines {lines:?} not {:?}",
                record.lines
            ));
        }
        let status = order["status"].as_str().unwrap_or_default();
        let Some(rank) = status_rank(status) else {
            problems.push(format!("order {id}: unknown status {status}"));
            continue;
        };
        let regressed = match record.state {
            Acked::Cancelled => status != "cancelled",
            // Shipped without an acknowledged payment?
            Acked::Placed => rank == Acked::Shipped,
            acked => rank < acked || rank == Acked::Cancelled,
        };
        if regressed {
            problems.push(format!(
                "order {id}: acknowledged {:?} reads {status}",
                record.state
            ));
        }
        // Deadlines hold across restarts: an unpaid order past its deadline reads expired.
        if status == "reserved" {
            let expires =
                humantime::parse_rfc3339(order["expires_at"].as_str().unwrap_or_default())
                    .expect("rfc3339");
            if expires + Duration::from_secs(1) <= now {
                problems.push(format!("order {id} is reserved past its deadline"));
            }
        }
    }
    let acked = book.len();
    drop(book);
    // No half-applied change: each SKU's counters are exactly what orders hold.
    let mut reserved: HashMap<String, u64> = HashMap::new();
    let mut allocated: HashMap<String, u64> = HashMap::new();
    let mut shipped: HashMap<String, u64> = HashMap::new();
    for order in &orders {
        for line in order["lines"].as_array().expect("lines") {
            let sku = line["sku_id"].as_str().unwrap_or_default().to_string();
            let left =
                line["qty"].as_u64().unwrap_or(0) - line["refunded_qty"].as_u64().unwrap_or(0);
            match order["status"].as_str().unwrap_or_default() {
                "reserved" => *reserved.entry(sku).or_default() += left,
                "paid" => *allocated.entry(sku).or_default() += left,
                "shipped" | "delivered" => *shipped.entry(sku).or_default() += left,
                _ => {}
            }
        }
    }
    for ((sku, _, stock), s) in SKUS.iter().zip(&skus) {
        let (sku, stock) = (*sku, *stock);
        let get = |f: &str| s[f].as_u64().unwrap_or(u64::MAX);
        let held = |m: &HashMap<String, u64>| m.get(sku).copied().unwrap_or(0);
        if get("on_hand") != get("available") + get("reserved") + get("allocated") {
            problems.push(format!("{sku} does not balance: {s}"));
        }
        for (field, orders_hold) in [
            ("reserved", held(&reserved)),
            ("allocated", held(&allocated)),
            ("shipped", held(&shipped)),
        ] {
            if get(field) != orders_hold {
                problems.push(format!(
                    "{sku} {field} is {} but the orders hold {orders_hold}",
                    get(field)
                ));
            }
        }
        if get("on_hand") + get("shipped") != stock {
            problems.push(format!(
                "{sku}: on_hand + shipped is not the stock {stock} (oversold or lost): {s}"
            ));
        }
    }
    if missing.is_empty() && problems.is_empty() {
        return;
    }
    let shown = |v: &[String]| {
        let mut text = v
            .iter()
            .take(PROBLEMS_SHOWN_MAX)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if v.len() > PROBLEMS_SHOWN_MAX {
            text.push_str(&format!(", and {} more", v.len() - PROBLEMS_SHOWN_MAX));
        }
        text
    };
    let log = server.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    panic!(
        "{label}: {} of {acked} acknowledged orders missing: [{}]; {} other problems: [{}]\n\
         server log (last lines):\n{}",
        missing.len(),
        shown(&missing),
        problems.len(),
        shown(&problems),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}
