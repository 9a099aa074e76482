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
//!   every line, decrements it (`HINCRBY`), numbers the order (`INCR`) and
//!   stores it with one `HSET`, all or nothing. Redis runs it alone, so there
//!   is no oversell. The script does only that: no JSON and no hashing in
//!   Lua; the front builds the Order JSON from what it
//!   already knows plus the names and prices the script read.
//! - **One multiplexed connection**, pipelining every request's script call.
//! - **Durable before 201** when Redis runs with `appendonly yes` and
//!   `appendfsync always` (as `loadtest/wrk/compare.sh` starts it): Redis
//!   fsyncs the AOF before it answers the script.
//! - **Verified tokens are cached** (bounded), so a buyer's repeated token
//!   costs a map lookup under a read lock, not an HMAC.
//! - **The seckill shortcut**: once Redis has answered "sold out" (0
//!   available) for a SKU, a local `AtomicBool` for that SKU answers `409
//!   out_of_stock` to requests without an `Idempotency-Key`, with no Redis
//!   round trip. A request with a key still goes to Redis, since an earlier
//!   grant under that key must be answered again.
//! - **`Idempotency-Key`** as the contract says: scoped to the user, a repeat
//!   with the same request gets the same order back, a different request
//!   `422 idempotency_conflict`, and refusals record nothing. Only a keyed
//!   request pays for it: the key and the request's canonical lines go to the
//!   script only then, and only then does the script take their SHA-1. A
//!   replay reads the order's lines (id, quantity, price) as stored and the
//!   SKUs' current names (nothing here renames a SKU).
//! - **Little per-request work in the front**: the headers are read in place
//!   (no `HeaderMap` copy), the body is parsed borrowing its ids, one line
//!   needs no merge, the `EVALSHA` command is packed straight into redis's
//!   `Cmd`, and each answer is serialized once into one buffer.
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

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::Parser;
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
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
/// An Order JSON of one line is about 450 bytes; one allocation covers it.
const ORDER_JSON_BYTES_TYPICAL: usize = 512;

/// The order counter, bumped by `INCR` inside the script.
const ORDER_COUNTER_KEY: &str = "orders:next";

/// The whole order decision, run by Redis alone (so atomic).
///
/// ARGV: the line count n, user id, created time (ms), then the quantity of
/// each line; a keyed request adds its canonical lines and the key's TTL (s).
/// KEYS: the order counter, `sku:{id}` per line, then the idempotency key for
/// a keyed request only. Replies: `ok|replay, order_id, created_ms, lines,
/// name per line`, where `lines` is `sku_id:qty:price_cents,` per line (ids
/// hold no `:` or `,`); `out_of_stock, line number, available`;
/// `not_found, line number`; `conflict`. Refusals write nothing.
///
/// Quantities are subtracted as the strings `-qty`, so no Lua number is
/// formatted; `tonumber` reads the two numbers compared.
const RESERVE_LUA: &str = r#"
local n = tonumber(ARGV[1])
local idem = KEYS[n + 2]
local print = nil
if idem then
  print = redis.sha1hex(ARGV[n + 4])
  local prior = redis.call("HMGET", idem, "print", "order_id")
  if prior[1] then
    if prior[1] ~= print then return {"conflict"} end
    local o = redis.call("HMGET", "order:" .. prior[2], "created_ms", "lines")
    local reply = {"replay", prior[2], o[1], o[2]}
    for sku_id in string.gmatch(o[2], "([^:,]+):[^,]*,") do
      reply[#reply + 1] = redis.call("HGET", "sku:" .. sku_id, "name")
    end
    return reply
  end
end
local skus = {}
for i = 1, n do
  local sku = redis.call("HMGET", KEYS[i + 1], "available", "name", "price_cents")
  if not sku[1] then return {"not_found", i} end
  if tonumber(sku[1]) < tonumber(ARGV[i + 3]) then return {"out_of_stock", i, sku[1]} end
  skus[i] = sku
end
local id = redis.call("INCR", KEYS[1])
local lines = {}
local reply = {"ok", id, ARGV[3], ""}
for i = 1, n do
  redis.call("HINCRBY", KEYS[i + 1], "available", "-" .. ARGV[i + 3])
  lines[i] = string.sub(KEYS[i + 1], 5) .. ":" .. ARGV[i + 3] .. ":" .. skus[i][3] .. ","
  reply[i + 4] = skus[i][2]
end
reply[4] = table.concat(lines)
redis.call("HSET", "order:" .. id, "user_id", ARGV[2], "created_ms", ARGV[3], "lines", reply[4])
if idem then
  redis.call("HSET", idem, "print", print, "order_id", id)
  redis.call("EXPIRE", idem, ARGV[n + 5])
end
return reply
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
    /// kept; at most `VERIFIED_TOKENS_MAX`. Hits take the read lock.
    verified: RwLock<HashMap<Box<str>, Verified>>,
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
            verified: RwLock::new(HashMap::new()),
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
            let verified = self.verified.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(known) = verified.get(token) {
                if known.exp_secs >= now_secs {
                    return Ok(Arc::clone(&known.user));
                }
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
        let mut verified = self
            .verified
            .write()
            .unwrap_or_else(PoisonError::into_inner);
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
    /// The first line known to be sold out, if any.
    fn first<'a, 'b>(&self, lines: &'a [Line<'b>]) -> Option<&'a Line<'b>> {
        let flags = self.flags.read().unwrap_or_else(PoisonError::into_inner);
        if flags.is_empty() {
            return None;
        }
        lines.iter().find(|l| {
            flags
                .get(l.sku_id.as_ref())
                .is_some_and(|f| f.load(Ordering::Acquire))
        })
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

/// `{items: [{sku_id, qty}], promo_code?}`, borrowing from the body.
#[derive(Debug, Deserialize)]
struct PlaceOrderBody<'a> {
    #[serde(borrow)]
    items: Vec<Line<'a>>,
    #[serde(default, borrow)]
    promo_code: Option<Cow<'a, str>>,
}

/// One line of a request (an id with escapes in its JSON is owned).
#[derive(Debug, Clone, Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    sku_id: Cow<'a, str>,
    qty: u32,
}

/// `POST /v1/orders`.
async fn place_order(State(app): State<Arc<App>>, request: Request) -> Result<Response, ApiError> {
    let _permit = app
        .in_flight
        .try_acquire()
        .map_err(|_| ApiError::Overloaded("too many requests in flight".into()))?;
    let (parts, body) = request.into_parts();
    let user = app.tokens.verify(&parts.headers)?;
    let key = idempotency_key(&parts.headers)?;
    let body = read_body(body).await?;
    let request: PlaceOrderBody<'_> = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Invalid(format!("invalid JSON body: {e}")))?;
    let lines = merge_lines(request.items)?;
    if let Some(code) = request.promo_code {
        return Err(ApiError::NotFound(format!("promotion {code} not found")));
    }
    if key.is_none()
        && let Some(line) = app.sold_out.first(&lines)
    {
        return Err(ApiError::OutOfStock(line.sku_id.as_ref().into()));
    }
    let created_ms = now_ms()?;
    let reply = reserve(&app, &user, key, created_ms, &lines).await?;
    let line_of = |n: &redis::Value| {
        let n = usize::try_from(int(n)?).ok()?;
        lines.get(n.checked_sub(1)?)
    };
    match reply.as_slice() {
        [kind, order_id, created_ms, stored, names @ ..]
            if matches!(text(kind), Some("ok" | "replay")) =>
        {
            let order = order_json(&user, order_id, created_ms, stored, names)?;
            Ok(json_response(StatusCode::CREATED, order))
        }
        [kind, n, available] if text(kind) == Some("out_of_stock") => {
            let line = line_of(n).ok_or_else(|| unexpected(&reply))?;
            if text(available) == Some("0") {
                app.sold_out.mark(&line.sku_id);
            }
            Err(ApiError::OutOfStock(line.sku_id.as_ref().into()))
        }
        [kind, n] if text(kind) == Some("not_found") => {
            let line = line_of(n).ok_or_else(|| unexpected(&reply))?;
            Err(ApiError::NotFound(format!("SKU {} not found", line.sku_id)))
        }
        [kind] if text(kind) == Some("conflict") => Err(ApiError::IdempotencyConflict),
        _ => Err(unexpected(&reply)),
    }
}

/// The body, at most `BODY_BYTES_MAX` bytes.
async fn read_body(body: Body) -> Result<axum::body::Bytes, ApiError> {
    match Limited::new(body, BODY_BYTES_MAX).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::PayloadTooLarge),
        Err(e) => Err(ApiError::Invalid(format!(
            "the body could not be read: {e}"
        ))),
    }
}

/// Runs the script for these lines (`EVALSHA`, loading the script again if
/// Redis has forgotten it) and returns its reply's items.
async fn reserve(
    app: &App,
    user: &str,
    key: Option<&str>,
    created_ms: u64,
    lines: &[Line<'_>],
) -> Result<Vec<redis::Value>, ApiError> {
    let line_count = lines.len();
    let keyed = usize::from(key.is_some());
    let mut call = redis::cmd("EVALSHA");
    call.arg(app.script.get_hash())
        .arg(1 + line_count + keyed)
        .arg(ORDER_COUNTER_KEY);
    for line in lines {
        call.arg(format_args!("sku:{}", line.sku_id).to_string());
    }
    if let Some(k) = key {
        call.arg(format!("idem:{user}:{k}"));
    }
    call.arg(line_count).arg(user).arg(created_ms);
    for line in lines {
        call.arg(line.qty);
    }
    if key.is_some() {
        call.arg(canonical(lines)).arg(IDEMPOTENCY_TTL_SECS);
    }
    let mut redis = app.redis.clone();
    let reply = match call.query_async(&mut redis).await {
        Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            app.script
                .load_async(&mut redis)
                .await
                .map_err(redis_error)?;
            call.query_async(&mut redis).await
        }
        reply => reply,
    };
    match reply.map_err(redis_error)? {
        redis::Value::Array(items) => Ok(items),
        other => Err(unexpected(&[other])),
    }
}

/// A script reply item as text, if it is a string.
fn text(value: &redis::Value) -> Option<&str> {
    match value {
        redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
        redis::Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

/// A script reply item as an integer (Lua numbers arrive as integers).
fn int(value: &redis::Value) -> Option<i64> {
    match value {
        redis::Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

fn unexpected(reply: &[redis::Value]) -> ApiError {
    ApiError::Internal(format!("unexpected script reply {reply:?}"))
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
/// them, as flashcore does. The usual single line is checked and kept.
fn merge_lines(items: Vec<Line<'_>>) -> Result<Vec<Line<'_>>, ApiError> {
    if items.is_empty() || items.len() > LINES_MAX {
        return Err(ApiError::Invalid(format!(
            "items must have 1 to {LINES_MAX} lines"
        )));
    }
    let qty_error = || ApiError::Invalid(format!("qty must be 1 to {QTY_MAX}"));
    for item in &items {
        if !valid_id(&item.sku_id) {
            return Err(ApiError::Invalid(format!(
                "{:?} is not a valid sku_id",
                item.sku_id
            )));
        }
        if !(1..=QTY_MAX).contains(&item.qty) {
            return Err(qty_error());
        }
    }
    if items.len() == 1 {
        return Ok(items);
    }
    let count = items.len();
    let mut merged: Vec<Line<'_>> = Vec::with_capacity(count);
    for item in items {
        match merged.iter_mut().find(|m| m.sku_id == item.sku_id) {
            Some(m) => {
                m.qty = m
                    .qty
                    .checked_add(item.qty)
                    .filter(|q| *q <= QTY_MAX)
                    .ok_or_else(qty_error)?;
            }
            None => merged.push(item),
        }
    }
    assert!(!merged.is_empty() && merged.len() <= count);
    Ok(merged)
}

/// The contract's id rule.
fn valid_id(id: &str) -> bool {
    (1..=ID_BYTES_MAX).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// The merged request as a keyed request's fingerprint covers it: ids
/// cannot hold `:` or `,`, so this is unambiguous.
fn canonical(lines: &[Line<'_>]) -> String {
    use std::fmt::Write as _;
    let mut text = String::with_capacity(lines.len() * 16);
    for line in lines {
        // Writing to a String cannot fail.
        let _ = write!(text, "{}:{},", line.sku_id, line.qty);
    }
    text
}

fn now_ms() -> Result<u64, ApiError> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| ApiError::Internal("the clock is before 1970".into()))?;
    u64::try_from(since.as_millis()).map_err(|_| ApiError::Internal("the clock is too far".into()))
}

/// RFC 3339 with milliseconds, `2026-01-02T03:04:05.678Z`.
fn rfc3339(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms))
}

// ----- The answer -----

/// flashcore's Order JSON, borrowing from the script's reply.
#[derive(Debug, Serialize)]
struct OrderJson<'a> {
    order_id: Cow<'a, str>,
    user_id: &'a str,
    status: &'static str,
    lines: Vec<LineJson<'a>>,
    subtotal_cents: u64,
    discount_cents: u64,
    total_cents: u64,
    paid_cents: u64,
    refunded_cents: u64,
    promo_code: Option<&'a str>,
    payment_ref: Option<&'a str>,
    #[serde(serialize_with = "display")]
    created_at: humantime::Rfc3339Timestamp,
    #[serde(serialize_with = "display")]
    expires_at: humantime::Rfc3339Timestamp,
    history: [HistoryJson; 1],
}

#[derive(Debug, Serialize)]
struct LineJson<'a> {
    sku_id: &'a str,
    name: &'a str,
    qty: u32,
    unit_price_cents: u64,
    discount_cents: u64,
    refunded_qty: u32,
}

#[derive(Debug, Serialize)]
struct HistoryJson {
    status: &'static str,
    #[serde(serialize_with = "display")]
    at: humantime::Rfc3339Timestamp,
}

/// Serializes a value as the string its `Display` writes.
fn display<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Builds the order from the script's reply: its id, creation time, the
/// lines as stored (`sku_id:qty:price_cents,` each) and a name per line.
fn order_json<'a>(
    user: &'a str,
    order_id: &'a redis::Value,
    created_ms: &redis::Value,
    stored: &'a redis::Value,
    names: &'a [redis::Value],
) -> Result<OrderJson<'a>, ApiError> {
    let bad = |what: &str| ApiError::Internal(format!("a stored order has a bad {what}"));
    let order_id: Cow<'a, str> = match order_id {
        redis::Value::Int(n) => Cow::Owned(n.to_string()),
        other => Cow::Borrowed(text(other).ok_or_else(|| bad("order_id"))?),
    };
    let created_ms = int(created_ms)
        .and_then(|ms| u64::try_from(ms).ok())
        .ok_or_else(|| bad("created_ms"))?;
    let stored = text(stored).ok_or_else(|| bad("lines"))?;
    let mut subtotal_cents: u64 = 0;
    let mut lines = Vec::with_capacity(names.len());
    let mut names = names.iter();
    for line in stored.split_terminator(',') {
        let mut fields = line.split(':');
        let (Some(sku_id), Some(qty), Some(price), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("line"));
        };
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
        let name = names.next().and_then(text).ok_or_else(|| bad("name"))?;
        lines.push(LineJson {
            sku_id,
            name,
            qty,
            unit_price_cents,
            discount_cents: 0,
            refunded_qty: 0,
        });
        if lines.len() > LINES_MAX {
            return Err(bad("line count"));
        }
    }
    if lines.is_empty() || names.next().is_some() {
        return Err(bad("line count"));
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

/// The answer when an answer cannot be serialized.
const INTERNAL_ERROR_JSON: &str =
    r#"{"error":{"code":"internal","message":"the answer could not be serialized"}}"#;

/// A JSON answer, serialized once into one buffer.
fn json_response<T: Serialize>(mut status: StatusCode, body: T) -> Response {
    let mut bytes = Vec::with_capacity(ORDER_JSON_BYTES_TYPICAL);
    if serde_json::to_writer(&mut bytes, &body).is_err() {
        // Not reached: these bodies hold only strings and numbers.
        status = StatusCode::INTERNAL_SERVER_ERROR;
        bytes = INTERNAL_ERROR_JSON.as_bytes().to_vec();
    }
    let content_type = HeaderValue::from_static("application/json");
    (status, [(header::CONTENT_TYPE, content_type)], bytes).into_response()
}

// ----- Errors -----

/// Every way a request fails; `into_response` alone picks the status.
#[derive(Debug)]
enum ApiError {
    Invalid(String),
    Unauthorized(String),
    Forbidden(String),
    NotFound(String),
    /// The SKU that is short.
    OutOfStock(Box<str>),
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

/// The contract's error body.
#[derive(Serialize)]
struct ErrorJson<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    code: &'static str,
    message: &'a str,
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
                format!("not enough stock of SKU {sku}"),
            ),
            E::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is over {BODY_BYTES_MAX} bytes"),
            ),
            E::IdempotencyConflict => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_conflict",
                "this Idempotency-Key was used for a different request".to_owned(),
            ),
            E::Overloaded(m) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded", m),
            E::StorageUnavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", m),
            E::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", m),
        };
        let body = ErrorJson {
            error: ErrorFields {
                code,
                message: &message,
            },
        };
        let mut response = json_response(status, body);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, RETRY_AFTER_SECS.into());
        }
        response
    }
}
