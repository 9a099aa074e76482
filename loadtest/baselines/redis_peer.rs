//! The peer flashcore's hot path is measured against: `POST /v1/orders` the
//! way a flash sale is usually built, an axum front over Redis.
//!
//! It takes the same request body and the same tokens as flashcore (HS256
//! JWTs in `Authorization: Bearer`, signed with `FLASHCORE_JWT_SECRET`) and
//! answers with the same Order JSON and error body (the contract's
//! `POST /v1/orders`). It is written to be the bar, not a straw man:
//!
//! - **One round trip per order.** One Lua script, loaded once at start and
//!   called by `EVALSHA` (reloaded if Redis forgets it), checks the stock of
//!   every line, decrements it, numbers the order (`INCR`) and stores it as a
//!   hash, all or nothing. Redis runs it alone, so there is no oversell.
//! - **One multiplexed connection**, pipelining every request's script call.
//! - **Durable before 201** when Redis runs with `appendonly yes` and
//!   `appendfsync always` (as `loadtest/wrk/compare.sh` starts it): Redis
//!   fsyncs the AOF before it answers the script.
//! - **Verified tokens are cached** (bounded), so a buyer's repeated token
//!   costs a map lookup, not an HMAC.
//! - **The seckill shortcut**: once Redis has answered "sold out" (0
//!   available) for a SKU, a local `AtomicBool` for that SKU answers `409
//!   out_of_stock` to requests without an `Idempotency-Key`, with no Redis
//!   round trip. A request with a key still goes to Redis, since an earlier
//!   grant under that key must be answered again.
//! - **`Idempotency-Key`** as the contract says: scoped to the user, a repeat
//!   with the same request gets the same order back, a different request
//!   `422 idempotency_conflict`, and refusals record nothing. The request's
//!   fingerprint (SHA-1 of its canonical lines) is taken inside the script.
//!
//! Out of scope (this is a benchmark peer for one route, not a second
//! flashcore): restocks (a restock would have to clear the sold-out flag,
//! which nothing here does, so after one the peer keeps refusing without
//! asking Redis until it restarts), promotions (any `promo_code` is `404`),
//! expiry of reservations, the other routes, and reconnecting to Redis (if
//! the connection drops, changes are `503 storage_unavailable` until the
//! peer is restarted), Redis Cluster (the script writes `order:{id}`, a key
//! it cannot declare up front), and HTTP-level connection limits: unlike
//! flashcore's accept loop, `axum::serve` neither caps connections nor times
//! out a slow request head, so only requests in flight are bounded here.
//! SKUs are seeded straight into Redis, as hashes
//! `sku:{sku_id}` with `name`, `price_cents` and `available`:
//!
//! ```text
//! redis-cli HSET sku:bulk name Bulk price_cents 100 available 1000000000
//! ```
//!
//! Bounds: a body of at most 64 KiB, tokens of at most 4 KiB, at most
//! `IN_FLIGHT_MAX` requests handled at once (beyond, `503 overloaded` with
//! `Retry-After`), at most `REDIS_IN_FLIGHT_MAX` script calls on the wire, a
//! response timeout on each, bounded token and sold-out maps.
//!
//! ```text
//! cargo run --release -p loadtest --example redis_peer -- \
//!     --listen 127.0.0.1:18092 --redis-url redis://127.0.0.1:6379/ --secret "$FLASHCORE_JWT_SECRET"
//! ```
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

// ----- Limits, each with its reason -----

/// The contract's body limit (over it: `413 payload_too_large`).
const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest bearer token looked at; flashcore's bound too.
const TOKEN_BYTES_MAX: usize = 4 * 1024;
/// The contract's minimum secret length.
const JWT_SECRET_BYTES_MIN: usize = 32;
/// Tokens remembered as verified (a few hundred bytes each): a sale of a
/// hundred thousand buyers fits; beyond, the map is cleared and refilled.
const VERIFIED_TOKENS_MAX: usize = 100_000;
/// SKUs whose sold-out flag is kept; beyond, sold-out SKUs simply go to
/// Redis every time (correct, only slower).
const SOLD_OUT_SKUS_MAX: usize = 100_000;
/// The contract's id rule: `[A-Za-z0-9_.-]{1,64}`.
const ID_BYTES_MAX: usize = 64;
/// The contract's bounds on an order's lines and on a line's quantity.
const LINES_MAX: usize = 100;
const QTY_MAX: u32 = 10_000;
/// The contract's price bound; with `QTY_MAX` and `LINES_MAX` a subtotal
/// cannot overflow.
const PRICE_CENTS_MAX: u64 = 1_000_000_000_000;
const _: () = assert!(PRICE_CENTS_MAX * QTY_MAX as u64 * LINES_MAX as u64 <= u64::MAX / 2);
/// The contract's `Idempotency-Key`: 1..=255 visible ASCII characters.
const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Keys are kept at least 24 hours (contract).
const IDEMPOTENCY_TTL_SECS: u64 = 24 * 60 * 60;
/// flashcore's default reservation deadline (not enforced here).
const RESERVATION_TTL_MS: u64 = 15 * 60 * 1000;
/// Requests handled at once; more are shed with 503 rather than queued.
const IN_FLIGHT_MAX: usize = 4096;
/// Script calls waiting on the one connection at once.
const REDIS_IN_FLIGHT_MAX: usize = 1024;
/// A script call not answered within this is `503 overloaded`: with
/// `appendfsync always` a healthy answer takes a few fsyncs at most.
const REDIS_RESPONSE_TIMEOUT_MS: u64 = 2_000;
const REDIS_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// `Retry-After` on a 503.
const RETRY_AFTER_SECS: u64 = 1;
/// flashcore's HTTP runtime has two workers; so does this one.
const WORKER_THREADS_DEFAULT: usize = 2;

/// The order counter, bumped by `INCR` inside the script.
const ORDER_COUNTER_KEY: &str = "orders:next";
/// `KEYS[2]` when the request carries no `Idempotency-Key`; never read.
const NO_IDEMPOTENCY_KEY: &str = "idem:-";

/// The whole order decision, run by Redis alone (so atomic).
///
/// KEYS: the order counter, the idempotency key (or `NO_IDEMPOTENCY_KEY`),
/// then `sku:{id}` per line. ARGV: has-key flag, user id, created and
/// expiry times (ms), canonical request, key TTL (s), then `sku_id, qty`
/// per line. Replies (all strings): `ok|replay, order_id, created_ms,
/// lines_json`; `out_of_stock, sku_id, available`; `not_found, sku_id`;
/// `conflict`. Refusals write nothing.
const RESERVE_LUA: &str = r#"
local has_key = ARGV[1] == "1"
local print = nil
if has_key then
  print = redis.sha1hex(ARGV[5])
  local prior = redis.call("HMGET", KEYS[2], "print", "order_id")
  if prior[1] then
    if prior[1] ~= print then return {"conflict"} end
    local o = redis.call("HMGET", "order:" .. prior[2], "created_ms", "lines")
    return {"replay", prior[2], o[1], o[2]}
  end
end
local n = #KEYS - 2
local skus = {}
for i = 1, n do
  local sku = redis.call("HMGET", KEYS[i + 2], "available", "name", "price_cents")
  local sku_id = ARGV[5 + 2 * i]
  if not sku[1] then return {"not_found", sku_id} end
  if tonumber(sku[1]) < tonumber(ARGV[6 + 2 * i]) then
    return {"out_of_stock", sku_id, sku[1]}
  end
  skus[i] = sku
end
local id = redis.call("INCR", KEYS[1])
local lines = {}
for i = 1, n do
  local qty = ARGV[6 + 2 * i]
  redis.call("HINCRBY", KEYS[i + 2], "available", -tonumber(qty))
  lines[i] = {ARGV[5 + 2 * i], qty, skus[i][2], skus[i][3]}
end
local lines_json = cjson.encode(lines)
redis.call("HSET", "order:" .. id, "user_id", ARGV[2], "status", "reserved",
  "created_ms", ARGV[3], "expires_ms", ARGV[4], "lines", lines_json)
if has_key then
  redis.call("HSET", KEYS[2], "print", print, "order_id", id)
  redis.call("EXPIRE", KEYS[2], ARGV[6])
end
return {"ok", tostring(id), ARGV[3], lines_json}
"#;

// ----- Command line -----

/// The peer's flags.
#[derive(Debug, Parser)]
#[command(about = "axum + Redis peer for flashcore's POST /v1/orders")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18092")]
    listen: SocketAddr,
    /// Redis to use (one multiplexed connection).
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,
    /// The HS256 secret shared with flashcore (at least 32 bytes).
    #[arg(long, env = "FLASHCORE_JWT_SECRET", hide_env_values = true)]
    secret: String,
    /// Tokio worker threads.
    #[arg(long, default_value_t = WORKER_THREADS_DEFAULT)]
    workers: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.secret.len() >= JWT_SECRET_BYTES_MIN,
        "the secret must be at least {JWT_SECRET_BYTES_MIN} bytes"
    );
    anyhow::ensure!((1..=64).contains(&args.workers), "--workers must be 1..=64");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.workers)
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(serve(args))
}

/// Connects, loads the script, serves until SIGTERM or Ctrl-C, then lets
/// the requests in flight finish.
async fn serve(args: Args) -> anyhow::Result<()> {
    let client = redis::Client::open(args.redis_url.as_str()).context("the Redis URL")?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(REDIS_CONNECT_TIMEOUT_MS)))
        .set_response_timeout(Some(Duration::from_millis(REDIS_RESPONSE_TIMEOUT_MS)))
        .set_concurrency_limit(REDIS_IN_FLIGHT_MAX);
    let mut redis = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .context("connecting to Redis")?;
    let script = redis::Script::new(RESERVE_LUA);
    script
        .load_async(&mut redis)
        .await
        .context("loading the script into Redis")?;
    let app = Arc::new(App {
        tokens: Tokens::new(args.secret.as_bytes()),
        sold_out: SoldOut::default(),
        in_flight: Semaphore::new(IN_FLIGHT_MAX),
        redis,
        script,
    });
    let router = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/orders", post(place_order))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(app);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    eprintln!("redis_peer: listening on {}", args.listen);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serving")
}

/// Resolves on SIGTERM or Ctrl-C (or if neither can be listened for).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => eprintln!("redis_peer: no SIGTERM handler: {e}"),
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

// ----- Shared state -----

/// What every request shares. The Redis connection is a cheap clone of one
/// multiplexed connection.
struct App {
    tokens: Tokens,
    sold_out: SoldOut,
    /// Caps the requests being handled; never waited on.
    in_flight: Semaphore,
    redis: MultiplexedConnection,
    script: redis::Script,
}

/// The claims flashcore issues.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    role: String,
    exp: u64,
}

/// HS256 verification with a bounded cache of verified tokens.
struct Tokens {
    key: DecodingKey,
    validation: Validation,
    /// Token -> what it proved. Only customer tokens that verified are
    /// kept; at most `VERIFIED_TOKENS_MAX`.
    verified: Mutex<HashMap<Box<str>, Verified>>,
}

/// A customer token that verified.
struct Verified {
    user: Arc<str>,
    exp_secs: u64,
}

impl Tokens {
    fn new(secret: &[u8]) -> Tokens {
        // Another install (there is none here) would do as well.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Tokens {
            key: DecodingKey::from_secret(secret),
            validation,
            verified: Mutex::new(HashMap::new()),
        }
    }

    /// The customer behind the request's bearer token.
    fn verify(&self, headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
        let unauthorized = |why: &str| ApiError::Unauthorized(why.to_owned());
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| unauthorized("a bearer token is needed"))?;
        if token.len() > TOKEN_BYTES_MAX {
            return Err(unauthorized("the token is too long"));
        }
        let now_secs = jsonwebtoken::get_current_timestamp();
        {
            let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(known) = verified.get(token) {
                if known.exp_secs >= now_secs {
                    return Ok(Arc::clone(&known.user));
                }
                verified.remove(token);
                return Err(unauthorized("the token has expired"));
            }
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| unauthorized(&format!("the token does not verify: {e}")))?;
        if !valid_id(&data.claims.sub) {
            return Err(unauthorized("the token's sub is not a valid user id"));
        }
        match data.claims.role.as_str() {
            "customer" => {}
            "admin" => return Err(ApiError::Forbidden("orders are placed by customers".into())),
            _ => {
                return Err(unauthorized(
                    "the token's role is neither customer nor admin",
                ));
            }
        }
        let user: Arc<str> = data.claims.sub.into();
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= VERIFIED_TOKENS_MAX {
            verified.clear();
        }
        let known = Verified {
            user: Arc::clone(&user),
            exp_secs: data.claims.exp,
        };
        verified.insert(token.into(), known);
        assert!(verified.len() <= VERIFIED_TOKENS_MAX);
        Ok(user)
    }
}

/// SKUs Redis has called sold out (0 available). The flag is an
/// `AtomicBool` so that a restock, were there one, could clear it without
/// the write lock; nothing clears it here (see the module doc).
#[derive(Default)]
struct SoldOut {
    flags: RwLock<HashMap<Box<str>, AtomicBool>>,
}

impl SoldOut {
    /// The first line's SKU known to be sold out, if any.
    fn first<'a>(&self, lines: &'a [Line]) -> Option<&'a str> {
        let flags = self.flags.read().unwrap_or_else(PoisonError::into_inner);
        if flags.is_empty() {
            return None;
        }
        lines
            .iter()
            .map(|l| l.sku_id.as_str())
            .find(|sku| flags.get(*sku).is_some_and(|f| f.load(Ordering::Acquire)))
    }

    fn mark(&self, sku_id: &str) {
        let mut flags = self.flags.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(flag) = flags.get(sku_id) {
            flag.store(true, Ordering::Release);
        } else if flags.len() < SOLD_OUT_SKUS_MAX {
            flags.insert(sku_id.into(), AtomicBool::new(true));
        }
        assert!(flags.len() <= SOLD_OUT_SKUS_MAX);
    }
}

// ----- The route -----

/// `{items: [{sku_id, qty}], promo_code?}`.
#[derive(Debug, Deserialize)]
struct PlaceOrderBody {
    items: Vec<Line>,
    #[serde(default)]
    promo_code: Option<String>,
}

/// One line of a request.
#[derive(Debug, Clone, Deserialize)]
struct Line {
    sku_id: String,
    qty: u32,
}

/// `POST /v1/orders`.
async fn place_order(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let _permit = app
        .in_flight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded("too many requests in flight".into()))?;
    let user = app.tokens.verify(&headers)?;
    let key = idempotency_key(&headers)?;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::Invalid(e.body_text()),
    })?;
    let request: PlaceOrderBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(e.to_string()))?;
    let lines = merge_lines(&request.items)?;
    if let Some(code) = request.promo_code {
        return Err(ApiError::NotFound(format!("no promotion {code:?}")));
    }
    if key.is_none()
        && let Some(sku_id) = app.sold_out.first(&lines)
    {
        return Err(ApiError::OutOfStock(sku_id.to_owned()));
    }
    let created_ms = now_ms()?;
    let expires_ms = created_ms.saturating_add(RESERVATION_TTL_MS);
    let mut call = app.script.prepare_invoke();
    call.key(ORDER_COUNTER_KEY);
    match key {
        Some(k) => call.key(format!("idem:{user}:{k}")),
        None => call.key(NO_IDEMPOTENCY_KEY),
    };
    call.arg(if key.is_some() { "1" } else { "0" })
        .arg(&*user)
        .arg(created_ms)
        .arg(expires_ms)
        .arg(canonical(&lines))
        .arg(IDEMPOTENCY_TTL_SECS);
    for line in &lines {
        call.key(format!("sku:{}", line.sku_id));
        call.arg(&line.sku_id).arg(line.qty);
    }
    let mut redis = app.redis.clone();
    let reply: Vec<String> = call.invoke_async(&mut redis).await.map_err(redis_error)?;
    match reply.first().map(String::as_str) {
        Some("ok" | "replay") if reply.len() == 4 => {
            let order = order_json(&reply[1], &user, &reply[2], &reply[3])?;
            json(StatusCode::CREATED, &order)
        }
        Some("out_of_stock") if reply.len() == 3 => {
            if reply[2] == "0" {
                app.sold_out.mark(&reply[1]);
            }
            Err(ApiError::OutOfStock(reply[1].clone()))
        }
        Some("not_found") if reply.len() == 2 => {
            Err(ApiError::NotFound(format!("no SKU {:?}", reply[1])))
        }
        Some("conflict") => Err(ApiError::IdempotencyConflict),
        _ => Err(ApiError::Internal(format!(
            "unexpected script reply {reply:?}"
        ))),
    }
}

/// The request's `Idempotency-Key`, if any, checked against the contract.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(k)
            if (1..=IDEMPOTENCY_KEY_BYTES_MAX).contains(&k.len())
                && k.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Ok(Some(k))
        }
        _ => Err(ApiError::Invalid(format!(
            "an Idempotency-Key is 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
        ))),
    }
}

/// Checks the lines and merges repeated SKUs into the first line naming
/// them, as flashcore does.
fn merge_lines(items: &[Line]) -> Result<Vec<Line>, ApiError> {
    if items.is_empty() || items.len() > LINES_MAX {
        return Err(ApiError::Invalid(format!(
            "items must have 1 to {LINES_MAX} lines"
        )));
    }
    let mut merged: Vec<Line> = Vec::with_capacity(items.len());
    for item in items {
        if !valid_id(&item.sku_id) {
            return Err(ApiError::Invalid(format!(
                "{:?} is not a valid sku_id",
                item.sku_id
            )));
        }
        if !(1..=QTY_MAX).contains(&item.qty) {
            return Err(ApiError::Invalid(format!("qty must be 1 to {QTY_MAX}")));
        }
        match merged.iter_mut().find(|m| m.sku_id == item.sku_id) {
            Some(m) => {
                m.qty = m
                    .qty
                    .checked_add(item.qty)
                    .filter(|q| *q <= QTY_MAX)
                    .ok_or_else(|| ApiError::Invalid(format!("qty must be 1 to {QTY_MAX}")))?;
            }
            None => merged.push(item.clone()),
        }
    }
    assert!(!merged.is_empty() && merged.len() <= items.len());
    Ok(merged)
}

/// The contract's id rule.
fn valid_id(id: &str) -> bool {
    (1..=ID_BYTES_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The merged request as the script fingerprints it: ids cannot hold `:`
/// or `,`, so this is unambiguous.
fn canonical(lines: &[Line]) -> String {
    let mut text = String::with_capacity(lines.len() * 16);
    for line in lines {
        text.push_str(&line.sku_id);
        text.push(':');
        text.push_str(&line.qty.to_string());
        text.push(',');
    }
    text
}

fn now_ms() -> Result<u64, ApiError> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ApiError::Internal("the clock is before 1970".into()))?;
    u64::try_from(since.as_millis()).map_err(|_| ApiError::Internal("the clock is too far".into()))
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

// ----- The answer -----

/// flashcore's Order JSON.
#[derive(Debug, Serialize)]
struct OrderJson<'a> {
    order_id: &'a str,
    user_id: &'a str,
    status: &'static str,
    lines: Vec<LineJson>,
    subtotal_cents: u64,
    discount_cents: u64,
    total_cents: u64,
    paid_cents: u64,
    refunded_cents: u64,
    promo_code: Option<String>,
    payment_ref: Option<String>,
    created_at: String,
    expires_at: String,
    history: [HistoryJson; 1],
}

#[derive(Debug, Serialize)]
struct LineJson {
    sku_id: String,
    name: String,
    qty: u32,
    unit_price_cents: u64,
    discount_cents: u64,
    refunded_qty: u32,
}

#[derive(Debug, Serialize)]
struct HistoryJson {
    status: &'static str,
    at: String,
}

/// Builds the order from the script's reply: its id, creation time and the
/// lines as stored (`[[sku_id, qty, name, price_cents], ...]`, all strings).
fn order_json<'a>(
    order_id: &'a str,
    user: &'a str,
    created_ms: &str,
    lines_json: &str,
) -> Result<OrderJson<'a>, ApiError> {
    let bad = |what: &str| ApiError::Internal(format!("a stored order has a bad {what}"));
    let created_ms: u64 = created_ms.parse().map_err(|_| bad("created_ms"))?;
    let stored: Vec<[String; 4]> = serde_json::from_str(lines_json).map_err(|_| bad("lines"))?;
    let mut subtotal_cents: u64 = 0;
    let mut lines = Vec::with_capacity(stored.len());
    for [sku_id, qty, name, price] in stored {
        let qty: u32 = qty.parse().map_err(|_| bad("qty"))?;
        let unit_price_cents: u64 = price
            .parse()
            .ok()
            .filter(|p| *p <= PRICE_CENTS_MAX)
            .ok_or_else(|| bad("price_cents"))?;
        subtotal_cents = unit_price_cents
            .checked_mul(u64::from(qty))
            .and_then(|l| subtotal_cents.checked_add(l))
            .ok_or_else(|| bad("total"))?;
        lines.push(LineJson {
            sku_id,
            name,
            qty,
            unit_price_cents,
            discount_cents: 0,
            refunded_qty: 0,
        });
    }
    Ok(OrderJson {
        order_id,
        user_id: user,
        status: "reserved",
        lines,
        subtotal_cents,
        discount_cents: 0,
        total_cents: subtotal_cents,
        paid_cents: 0,
        refunded_cents: 0,
        promo_code: None,
        payment_ref: None,
        created_at: rfc3339(created_ms),
        expires_at: rfc3339(created_ms.saturating_add(RESERVATION_TTL_MS)),
        history: [HistoryJson {
            status: "reserved",
            at: rfc3339(created_ms),
        }],
    })
}

fn json<T: Serialize>(status: StatusCode, body: &T) -> Result<Response, ApiError> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

// ----- Errors -----

/// Every way a request fails; `into_response` alone picks the status.
#[derive(Debug)]
enum ApiError {
    Invalid(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    OutOfStock(String),
    PayloadTooLarge,
    IdempotencyConflict,
    Overloaded(String),
    StorageUnavailable(String),
    Internal(String),
}

/// A Redis failure: a timeout sheds, anything else means the change could
/// not be made durable (or its fate is unknown, as the contract allows).
fn redis_error(e: redis::RedisError) -> ApiError {
    if e.is_timeout() {
        ApiError::Overloaded("Redis did not answer in time".into())
    } else {
        ApiError::StorageUnavailable(format!("Redis: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        use ApiError as E;
        let (status, code, message) = match self {
            E::Invalid(m) => (StatusCode::BAD_REQUEST, "invalid_request", m),
            E::Unauthorized(m) => (StatusCode::UNAUTHORIZED, "unauthorized", m),
            E::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m),
            E::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m),
            E::OutOfStock(sku) => (
                StatusCode::CONFLICT,
                "out_of_stock",
                format!("not enough stock of {sku}"),
            ),
            E::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is over {BODY_BYTES_MAX} bytes"),
            ),
            E::IdempotencyConflict => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                "this Idempotency-Key was used with a different request".to_owned(),
            ),
            E::Overloaded(m) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", m),
            E::StorageUnavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", m),
            E::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
        };
        let body = serde_json::json!({ "error": { "code": code, "message": message } });
        let mut response = (status, axum_json(&body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        response
    }
}

/// A JSON body with its content type, without axum's `json` feature.
fn axum_json(body: &serde_json::Value) -> impl IntoResponse + use<> {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}
