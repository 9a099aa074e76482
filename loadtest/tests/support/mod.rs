//! A tiny fake flashcore for the tests: enough of the contract for every
//! scenario (SKUs, promotions, orders, cart, pay, cancel, refund), served by
//! a bare hyper server on 127.0.0.1:0, with deliberate faults to switch on.
//!
//! It is a model, not the server: one mutex, no journal. What matters is that
//! the load tester's real client, scenarios and book check run against real
//! HTTP answers, correct or broken.

#![allow(dead_code, clippy::unwrap_used, clippy::missing_panics_doc)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

/// The secret the fake checks tokens with.
pub const SECRET: &str = "fake-flashcore-secret-0123456789abcdef-0123456789";

/// A deliberate bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: a correct server.
    None,
    /// Grants past the stock (keeping on_hand = available + reserved + allocated).
    Oversell,
    /// Every second order reads 404 (its units stay reserved).
    LoseEveryOtherOrder,
    /// The first order reads with one more unit than was ordered.
    WrongQty,
    /// The first order reads as another user's.
    WrongUser,
    /// SKUs read with one unit too many available.
    Unbalanced,
    /// Out-of-stock answers still reserve a unit.
    ReserveOnRefusal,
}

#[derive(Debug, Clone)]
struct Sku {
    name: String,
    price_cents: u64,
    per_user_limit: Option<u64>,
    on_hand: u64,
    available: u64,
    reserved: u64,
    allocated: u64,
    shipped: u64,
}

#[derive(Debug, Default)]
struct State {
    skus: HashMap<String, Sku>,
    promos: HashMap<String, (u64, u64)>,
    orders: HashMap<String, Value>,
    order_seq: u64,
    carts: HashMap<String, Vec<(String, u64)>>,
    held: HashMap<(String, String), u64>,
    idempotency: HashMap<(String, String), (u16, Value)>,
    /// `GET /metrics` answers this text (404 while `None`), with a scrape
    /// counter appended so no two answers are alike.
    metrics: Option<String>,
    scrapes: u64,
}

/// A running fake.
pub struct Fake {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Fake {
    /// Starts a fake with `fault` on a free loopback port.
    pub async fn start(fault: Fault) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, fault, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, state, task }
    }

    /// The URL to give `--url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Makes `GET /metrics` answer `text` (plus a scrape counter).
    pub fn set_metrics(&self, text: &str) {
        self.state.lock().unwrap().metrics = Some(text.to_owned());
    }

    /// Scrapes of `/metrics` so far.
    pub fn scrapes(&self) -> u64 {
        self.state.lock().unwrap().scrapes
    }

    /// Adds an order directly (for book-check tests).
    pub fn insert_order(&self, order: Value) {
        let id = order["order_id"].as_str().unwrap().to_owned();
        self.state.lock().unwrap().orders.insert(id, order);
    }

    /// Adds a SKU directly (for book-check tests).
    pub fn insert_sku(&self, id: &str, stock: u64, reserved: u64) {
        let sku = Sku {
            name: id.into(),
            price_cents: 100,
            per_user_limit: None,
            on_hand: stock,
            available: stock - reserved,
            reserved,
            allocated: 0,
            shipped: 0,
        };
        self.state.lock().unwrap().skus.insert(id.into(), sku);
    }
}

fn reply(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    resp
}

fn error(status: u16, code: &str) -> (u16, Value) {
    (
        status,
        json!({ "error": { "code": code, "message": code } }),
    )
}

fn sku_json(id: &str, s: &Sku, fault: Fault) -> Value {
    let available = if fault == Fault::Unbalanced {
        s.available + 1
    } else {
        s.available
    };
    json!({
        "sku_id": id, "name": s.name, "price_cents": s.price_cents, "per_user_limit": s.per_user_limit,
        "on_hand": s.on_hand, "available": available, "reserved": s.reserved,
        "allocated": s.allocated, "shipped": s.shipped,
    })
}

/// (sub, role) of a valid bearer token.
fn auth(req: &Request<Incoming>) -> Option<(String, String)> {
    let header = req.headers().get("authorization")?.to_str().ok()?;
    let token = header.strip_prefix("Bearer ")?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let data = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .ok()?;
    Some((
        data.claims["sub"].as_str()?.to_owned(),
        data.claims["role"].as_str()?.to_owned(),
    ))
}

async fn handle(
    state: &Mutex<State>,
    fault: Fault,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let who = auth(&req);
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(body) = req.into_body().collect().await else {
        return reply(400, &json!({}));
    };
    let body: Value = serde_json::from_slice(&body.to_bytes()).unwrap_or(Value::Null);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut st = state.lock().unwrap();

    if parts.as_slice() == ["readyz"] {
        return reply(200, &json!({ "status": "ready" }));
    }
    if parts.as_slice() == ["metrics"] {
        st.scrapes += 1;
        let Some(text) = st.metrics.clone() else {
            let (s, b) = error(404, "not_found");
            return reply(s, &b);
        };
        let text = format!("{text}fake_scrapes_total {}\n", st.scrapes);
        let mut resp = Response::new(Full::new(Bytes::from(text)));
        resp.headers_mut()
            .insert("content-type", "text/plain; version=0.0.4".parse().unwrap());
        return resp;
    }
    let public = matches!(
        (&method, parts.as_slice()),
        (&Method::GET, ["v1", "skus", ..])
    );
    if !public && who.is_none() {
        let (s, b) = error(401, "unauthorized");
        return reply(s, &b);
    }
    let (user, role) = who.unwrap_or_default();
    if let Some(k) = &key
        && let Some((s, b)) = st.idempotency.get(&(user.clone(), k.clone()))
    {
        return reply(*s, b);
    }
    let (status, answer) = route(&mut st, fault, &method, &parts, &user, &role, &body);
    if let Some(k) = key {
        st.idempotency.insert((user, k), (status, answer.clone()));
    }
    reply(status, &answer)
}

#[allow(clippy::too_many_lines)]
fn route(
    st: &mut State,
    fault: Fault,
    method: &Method,
    parts: &[&str],
    user: &str,
    role: &str,
    body: &Value,
) -> (u16, Value) {
    let admin = role == "admin";
    match (method, parts) {
        (&Method::POST, ["v1", "skus"]) => {
            if !admin {
                return error(403, "forbidden");
            }
            let id = body["sku_id"].as_str().unwrap_or_default().to_owned();
            if st.skus.contains_key(&id) {
                return error(409, "already_exists");
            }
            let stock = body["stock"].as_u64().unwrap_or(0);
            let sku = Sku {
                name: body["name"].as_str().unwrap_or_default().into(),
                price_cents: body["price_cents"].as_u64().unwrap_or(0),
                per_user_limit: body["per_user_limit"].as_u64(),
                on_hand: stock,
                available: stock,
                reserved: 0,
                allocated: 0,
                shipped: 0,
            };
            let out = sku_json(&id, &sku, Fault::None);
            st.skus.insert(id, sku);
            (201, out)
        }
        (&Method::GET, ["v1", "skus"]) => {
            let all: Vec<Value> = st
                .skus
                .iter()
                .map(|(id, s)| sku_json(id, s, fault))
                .collect();
            (200, json!({ "skus": all }))
        }
        (&Method::GET, ["v1", "skus", id]) => match st.skus.get(*id) {
            Some(s) => (200, sku_json(id, s, fault)),
            None => error(404, "not_found"),
        },
        (&Method::POST, ["v1", "promotions"]) => {
            let code = body["code"].as_str().unwrap_or_default().to_owned();
            let promo = (
                body["threshold_cents"].as_u64().unwrap_or(0),
                body["off_cents"].as_u64().unwrap_or(0),
            );
            st.promos.insert(code.clone(), promo);
            (
                201,
                json!({ "code": code, "threshold_cents": promo.0, "off_cents": promo.1 }),
            )
        }
        (&Method::POST, ["v1", "orders"]) => {
            let items: Vec<(String, u64)> = body["items"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| {
                            (
                                i["sku_id"].as_str().unwrap_or_default().to_owned(),
                                i["qty"].as_u64().unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            place(st, fault, user, &items, body["promo_code"].as_str())
        }
        (&Method::GET, ["v1", "orders", id]) => {
            let Some(order) = st.orders.get(*id) else {
                return error(404, "not_found");
            };
            let n: u64 = id.trim_start_matches("ord-").parse().unwrap_or(0);
            let mut order = order.clone();
            if order["user_id"] != user && !admin {
                return error(403, "forbidden");
            }
            match fault {
                Fault::LoseEveryOtherOrder if n.is_multiple_of(2) => {
                    return error(404, "not_found");
                }
                Fault::WrongQty if n == 1 => {
                    let q = order["lines"][0]["qty"].as_u64().unwrap_or(0);
                    order["lines"][0]["qty"] = json!(q + 1);
                }
                Fault::WrongUser if n == 1 => order["user_id"] = json!("someone-else"),
                _ => {}
            }
            (200, order)
        }
        (&Method::GET, ["v1", "cart"]) => (200, cart_json(st, user)),
        (&Method::PUT, ["v1", "cart", "items", sku]) => {
            if !st.skus.contains_key(*sku) {
                return error(404, "not_found");
            }
            let qty = body["qty"].as_u64().unwrap_or(0);
            let cart = st.carts.entry(user.to_owned()).or_default();
            cart.retain(|(s, _)| s != sku);
            if qty > 0 {
                cart.push(((*sku).to_owned(), qty));
            }
            (200, cart_json(st, user))
        }
        (&Method::POST, ["v1", "cart", "checkout"]) => {
            let items = st.carts.get(user).cloned().unwrap_or_default();
            if items.is_empty() {
                return error(400, "invalid_request");
            }
            let answer = place(st, fault, user, &items, body["promo_code"].as_str());
            if answer.0 == 201 {
                st.carts.remove(user);
            }
            answer
        }
        (&Method::POST, ["v1", "orders", id, action]) => transition(st, id, action, user, admin),
        _ => error(404, "not_found"),
    }
}

fn cart_json(st: &State, user: &str) -> Value {
    let items: Vec<Value> = st
        .carts
        .get(user)
        .map(|c| {
            c.iter()
                .map(|(s, q)| json!({ "sku_id": s, "qty": q }))
                .collect()
        })
        .unwrap_or_default();
    json!({ "items": items })
}

fn place(
    st: &mut State,
    fault: Fault,
    user: &str,
    items: &[(String, u64)],
    promo: Option<&str>,
) -> (u16, Value) {
    for (sku_id, qty) in items {
        let Some(sku) = st.skus.get_mut(sku_id) else {
            return error(404, "not_found");
        };
        let held = st
            .held
            .get(&(user.to_owned(), sku_id.clone()))
            .copied()
            .unwrap_or(0);
        if sku.per_user_limit.is_some_and(|l| held + qty > l) {
            return error(409, "limit_exceeded");
        }
        if sku.available < *qty {
            match fault {
                Fault::Oversell => {}
                Fault::ReserveOnRefusal => {
                    sku.available -= sku.available.min(1);
                    sku.reserved += 1;
                    return error(409, "out_of_stock");
                }
                _ => return error(409, "out_of_stock"),
            }
        }
    }
    let mut lines = Vec::new();
    let mut subtotal = 0;
    for (sku_id, qty) in items {
        let sku = st.skus.get_mut(sku_id).unwrap();
        if sku.available < *qty {
            // Oversell: conjure the units so the counters still balance.
            sku.on_hand += qty - sku.available;
            sku.available = *qty;
        }
        sku.available -= qty;
        sku.reserved += qty;
        *st.held
            .entry((user.to_owned(), sku_id.clone()))
            .or_insert(0) += qty;
        subtotal += qty * sku.price_cents;
        lines.push(json!({
            "sku_id": sku_id, "name": sku.name, "qty": qty, "unit_price_cents": sku.price_cents,
            "discount_cents": 0, "refunded_qty": 0,
        }));
    }
    let discount = match promo.and_then(|p| st.promos.get(p)) {
        Some((threshold, off)) if subtotal >= *threshold => (*off).min(subtotal),
        _ => 0,
    };
    if let Some(first) = lines.first_mut() {
        // Simplified spread: the whole discount on the first line.
        first["discount_cents"] = json!(discount);
    }
    st.order_seq += 1;
    let id = format!("ord-{}", st.order_seq);
    let order = json!({
        "order_id": id, "user_id": user, "status": "reserved", "lines": lines,
        "subtotal_cents": subtotal, "discount_cents": discount, "total_cents": subtotal - discount,
        "paid_cents": 0, "refunded_cents": 0, "promo_code": promo, "payment_ref": null,
        "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:15:00Z", "history": [],
    });
    st.orders.insert(id, order.clone());
    (201, order)
}

fn transition(st: &mut State, id: &str, action: &str, user: &str, admin: bool) -> (u16, Value) {
    let Some(order) = st.orders.get(id).cloned() else {
        return error(404, "not_found");
    };
    let owner = order["user_id"].as_str().unwrap_or_default().to_owned();
    let status = order["status"].as_str().unwrap_or_default().to_owned();
    let lines: Vec<(String, u64)> = order["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["sku_id"].as_str().unwrap().to_owned(),
                l["qty"].as_u64().unwrap(),
            )
        })
        .collect();
    let mut order = order;
    match (action, status.as_str()) {
        ("pay", "reserved") if admin => {
            for (s, q) in &lines {
                let sku = st.skus.get_mut(s).unwrap();
                sku.reserved -= q;
                sku.allocated += q;
            }
            order["status"] = json!("paid");
            order["paid_cents"] = order["total_cents"].clone();
        }
        ("cancel", "reserved") if admin || owner == user => {
            for (s, q) in &lines {
                let sku = st.skus.get_mut(s).unwrap();
                sku.reserved -= q;
                sku.available += q;
                *st.held.get_mut(&(owner.clone(), s.clone())).unwrap() -= q;
            }
            order["status"] = json!("cancelled");
        }
        ("refund", "paid") if admin => {
            for (i, (s, q)) in lines.iter().enumerate() {
                let sku = st.skus.get_mut(s).unwrap();
                sku.allocated -= q;
                sku.available += q;
                *st.held.get_mut(&(owner.clone(), s.clone())).unwrap() -= q;
                order["lines"][i]["refunded_qty"] = json!(q);
            }
            order["status"] = json!("refunded");
            order["refunded_cents"] = order["paid_cents"].clone();
        }
        ("pay" | "refund", _) if !admin => return error(403, "forbidden"),
        _ => return error(409, "invalid_transition"),
    }
    st.orders.insert(id.to_owned(), order.clone());
    (200, order)
}
