//! The HTTP front: exactly the contract of `../shared/API.md`, thin over the
//! [`Engine`].
//!
//! Every route goes through admission (contract, guarantee 6), in an order
//! a hostile client cannot turn against others, each step before anything
//! is held:
//!
//! 1. who the client is (`admission.rs`): the token, verified from the
//!    head alone, else the address (IPv6 by /64, `--trusted-proxies`);
//! 2. its rate (`ratelimit.rs`, when on; not the health probes, whose
//!    answer costs no more than a `429`);
//! 3. on a route that needs a token, `401` for a missing or bad one;
//! 4. the body limit (a declared `Content-Length` over 64 KiB is a `413`);
//! 5. the body read, in a place of the body-read pool and of the client's
//!    share of it: the whole body, at most 64 KiB, at a minimum rate after
//!    a short grace and within 10 s in all, else `413` or a bare `408`.
//!    It comes before the request holds a slot, so a client trickling its
//!    body holds no slot;
//! 6. a slot (requests in flight), within the client's share of them;
//!    beyond either bound `503 overloaded` with `Retry-After` at once;
//! 7. the route, then the metrics.
//!
//! Unknown routes (`404`), methods a known path does not take (`405` with
//! `Allow`), bad JSON, wrong content types and bad
//! parameters all answer with the JSON error body (`error.rs`). Nothing
//! here blocks a worker thread.

pub mod admission;
pub mod auth;
pub mod cluster;
pub mod error;
pub mod extract;
mod handlers;
pub mod idempotency;
pub mod live;
pub mod metrics;
pub mod openapi;
pub mod ratelimit;
pub mod routes;
pub mod views;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower::ServiceExt;

use crate::engine::{Caller, Engine};
use crate::http::admission::{ClientKey, Pool, Refused, TrustedProxies};
use crate::http::auth::JwtKeys;
use crate::http::error::ApiError;
use crate::http::idempotency::InFlight;
use crate::http::live::Live;
use crate::http::metrics::{Metrics, RouteMetrics};
use crate::http::routes::Access;
use crate::limits::{
    BODY_BYTES_MAX, BODY_MIN_BYTES_PER_S, BODY_READ_GRACE_MS, BODY_READ_TIMEOUT_MS, BODY_READS_MAX,
    CLIENT_SHARE_DIVISOR, REQUESTS_IN_FLIGHT_MAX,
};
use http_body_util::BodyExt;

/// What the front talks to: the [`Engine`], its only door to the state and
/// the storage. The server swaps the engine when it goes back to its last
/// durable state after a storage failure; until recovery has finished there
/// is none, and changes answer `503`.
#[derive(Default)]
pub struct Backend {
    engine: RwLock<Option<Engine>>,
    recovering: AtomicBool,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("ready", &self.not_ready_reason().is_none())
            .finish()
    }
}

impl Backend {
    /// A backend that is still recovering.
    pub fn recovering() -> Backend {
        Backend {
            recovering: AtomicBool::new(true),
            ..Backend::default()
        }
    }

    /// The engine serving requests.
    ///
    /// # Errors
    /// `StorageUnavailable` while recovering.
    pub fn engine(&self) -> Result<Engine, ApiError> {
        self.engine
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                ApiError::StorageUnavailable("the server is recovering; retry shortly".into())
            })
    }

    /// Installs a freshly started engine (recovery finished).
    pub fn install(&self, engine: Engine) {
        *self.engine.write().unwrap_or_else(|p| p.into_inner()) = Some(engine);
        self.recovering.store(false, Ordering::SeqCst);
    }

    /// Takes the engine out (to stop it or to reload).
    pub fn take(&self) -> Option<Engine> {
        self.recovering.store(true, Ordering::SeqCst);
        self.engine
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Why the server is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(why) = crate::fatal::reason() {
            return Some(format!("stopping after a fatal error: {why}"));
        }
        if self.recovering.load(Ordering::SeqCst) {
            return Some("recovering".into());
        }
        let engine = self.engine().ok()?;
        if let Some(why) = engine.failure() {
            return Some(format!("the engine is dead, the server is stopping: {why}"));
        }
        engine
            .storage_failure()
            .map(|why| format!("storage failed: {why}"))
    }
}

/// Everything a handler needs, behind one `Arc` (cloned per request).
#[derive(Clone, Debug)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
#[derive(Debug)]
pub struct Shared {
    /// The engine.
    pub backend: Arc<Backend>,
    /// Token keys.
    pub keys: Arc<JwtKeys>,
    /// Idempotency keys being executed.
    pub inflight: Arc<InFlight>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Requests in flight (load shedding), with per-client shares.
    pub slots: Pool,
    /// Request bodies being read (before a slot is taken), with per-client
    /// shares.
    pub body_reads: Pool,
    /// The live dashboard's counters and snapshot (`live.rs`).
    pub live: Arc<Live>,
    /// Per-caller rate limits, when on (`--rate-limit`).
    pub rate_limiter: Option<Arc<ratelimit::RateLimiter>>,
    /// Whose `X-Forwarded-For` is believed (`--trusted-proxies`).
    pub trusted_proxies: TrustedProxies,
    /// The last `/metrics` text and when it was rendered: scrapes within
    /// [`crate::limits::METRICS_CACHE_MS`] get it again, and concurrent
    /// scrapes wait for one render instead of each asking the actors.
    pub metrics_text: tokio::sync::Mutex<Option<(Instant, axum::body::Bytes)>>,
    /// This node's part of a cluster (`serve --cluster`), set once before
    /// the front is built; unset on a node alone.
    pub cluster: std::sync::OnceLock<crate::cluster::node::Node>,
}

/// How the front admits requests (`serve`'s flags).
#[derive(Debug, Clone)]
pub struct FrontConfig {
    /// Most requests handled at once (`--max-in-flight`).
    pub max_in_flight: usize,
    /// Requests a second per caller (`--rate-limit`), or `None` for off.
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// Whose `X-Forwarded-For` is believed (`--trusted-proxies`).
    pub trusted_proxies: TrustedProxies,
}

impl FrontConfig {
    /// `max_in_flight` requests at once, no rate limit, no proxy trusted.
    pub fn new(max_in_flight: usize) -> FrontConfig {
        FrontConfig {
            max_in_flight,
            rate_limit: None,
            trusted_proxies: TrustedProxies::default(),
        }
    }
}

impl AppState {
    /// State for a backend and keys.
    ///
    /// # Errors
    /// When the metrics cannot be registered.
    pub fn new(
        backend: Arc<Backend>,
        keys: JwtKeys,
        config: FrontConfig,
    ) -> Result<AppState, prometheus::Error> {
        let max_in_flight = config.max_in_flight.clamp(1, REQUESTS_IN_FLIGHT_MAX);
        Ok(AppState(Arc::new(Shared {
            backend,
            keys: Arc::new(keys),
            inflight: Arc::new(InFlight::default()),
            metrics: Arc::new(Metrics::new()?),
            slots: Pool::new(max_in_flight, CLIENT_SHARE_DIVISOR),
            body_reads: Pool::new(BODY_READS_MAX, CLIENT_SHARE_DIVISOR),
            live: Arc::new(Live::default()),
            rate_limiter: config
                .rate_limit
                .map(|rate| Arc::new(ratelimit::RateLimiter::new(rate))),
            trusted_proxies: config.trusted_proxies,
            metrics_text: tokio::sync::Mutex::new(None),
            cluster: std::sync::OnceLock::new(),
        })))
    }

    /// This node's cluster, in cluster mode.
    pub fn cluster(&self) -> Option<&crate::cluster::node::Node> {
        self.0.cluster.get()
    }

    /// Puts the front in cluster mode: requests go to their partitions
    /// (`cluster.rs`). Call it before building the [`Front`]; a second
    /// call changes nothing.
    pub fn set_cluster(&self, node: crate::cluster::node::Node) {
        // Set once: the first node stays.
        let _ = self.0.cluster.set(node);
    }
}

/// What admission learned of a request, for the handlers: the client it
/// counts as (`None`: an admin, exempt from shares).
#[derive(Debug, Clone, Copy)]
pub struct Admitted {
    /// The client, for the shares a handler takes itself (event streams).
    pub client: Option<ClientKey>,
}

/// A caller whose token admission verified, so the extractors do not
/// verify it again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Verified(pub(crate) Caller);

/// What the front knows of a route: its metrics, who may call it, whether
/// it takes a body, and whether it is a health probe (not rate limited).
#[derive(Debug)]
pub(crate) struct RouteInfo {
    metrics: Arc<RouteMetrics>,
    access: Access,
    /// Only a route that takes a body reads one (in a place of the
    /// body-read pool); every such route needs a token, so an anonymous
    /// client never holds a place.
    takes_body: bool,
    probe: bool,
}

impl RouteInfo {
    fn new(state: &AppState, doc: &routes::RouteDoc) -> RouteInfo {
        debug_assert!(
            doc.request.is_none() || doc.access != Access::Public,
            "a public route that reads a body would let anyone hold body reads"
        );
        RouteInfo {
            metrics: state.metrics.route(doc.path),
            access: doc.access,
            takes_body: doc.request.is_some(),
            probe: matches!(doc.path, "/healthz" | "/readyz"),
        }
    }
}

/// The `in_flight` gauge up while held, down when dropped (also when the
/// request's future is dropped mid-handler by a client that went away).
struct InFlightGauge<'a>(&'a prometheus::IntGauge);

impl<'a> InFlightGauge<'a> {
    fn up(gauge: &'a prometheus::IntGauge) -> InFlightGauge<'a> {
        gauge.inc();
        InFlightGauge(gauge)
    }
}

impl Drop for InFlightGauge<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The one middleware, per route: admission, then the metrics.
async fn front(
    State((state, info)): State<(AppState, Arc<RouteInfo>)>,
    request: Request,
    next: Next,
) -> Response {
    let routed = state.clone();
    observed(&state, &info, request, |request| async move {
        match routed.cluster() {
            Some(node) => cluster::dispatch(node, request, |request| next.run(request)).await,
            None => next.run(request).await,
        }
    })
    .await
}

/// [`front`]'s work around `inner`, for the router and the direct route
/// alike: admission, then the metrics.
async fn observed<F, Fut>(
    state: &AppState,
    route: &RouteInfo,
    request: Request,
    inner: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let method = request.method().clone();
    let response = admit(state, route, request, inner).await;
    let took = started.elapsed();
    route
        .metrics
        .observe(&state.metrics, &method, response.status().as_u16(), took);
    state.live.record(response.status(), took);
    response
}

/// The caller of a request that sent `Authorization`, verified from the
/// head alone; `None` without the header.
fn caller_of(state: &AppState, request: &Request) -> Option<Result<Caller, ApiError>> {
    request.headers().get(axum::http::header::AUTHORIZATION)?;
    Some(extract::bearer_caller(request.headers(), &state.keys))
}

/// A refusal of `pool` as an answer, counted.
fn refused(state: &AppState, why: Refused) -> Response {
    state.metrics.shed.inc();
    match why {
        Refused::Full => ApiError::overloaded().into_response(),
        Refused::ShareUsed => ApiError::Overloaded(
            "this client holds its whole share of the server; retry shortly".into(),
        )
        .into_response(),
    }
}

async fn admit<F, Fut>(
    state: &AppState,
    route: &RouteInfo,
    mut request: Request,
    inner: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let caller = caller_of(state, &request);
    let verified = caller.as_ref().and_then(|c| c.as_ref().ok()).copied();
    let client = admission::client_of(verified, &request, &state.trusted_proxies);
    // Over its rate: answered before anything else (`ratelimit.rs`).
    // A request another node forwarded was rate limited there (limits are
    // per node, where the client came in).
    let forwarded = request.extensions().get::<cluster::ForwardedTo>().is_some();
    if !route.probe
        && !forwarded
        && let Some(refused) = ratelimit::refuse(state, client)
    {
        return refused;
    }
    // A route that needs a token refuses a request without a good one
    // before it reads a byte of its body or holds a place.
    if route.access != Access::Public {
        match caller {
            None => {
                return ApiError::Unauthorized("missing Authorization: Bearer token".into())
                    .into_response();
            }
            Some(Err(refused)) => return refused.into_response(),
            Some(Ok(_)) => {}
        }
    }
    if let Some(caller) = verified {
        request.extensions_mut().insert(Verified(caller));
    }
    request.extensions_mut().insert(Admitted { client });
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > BODY_BYTES_MAX as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    // A route that takes no body never reads one: what a client sent
    // anyway is left unread (hyper closes the connection after the answer)
    // and holds no place.
    let request = if route.takes_body {
        match read_body(state, client, request, declared).await {
            Ok(request) => request,
            Err(refused) => return refused,
        }
    } else {
        request
    };
    let _slot = match state.slots.try_acquire(client) {
        Ok(slot) => slot,
        Err(why) => return refused(state, why),
    };
    let _gauge = InFlightGauge::up(&state.metrics.in_flight);
    inner(request).await
}

/// Reads the whole body into memory (at most [`BODY_BYTES_MAX`]) in a
/// place of the body-read pool within `client`'s share, and gives the
/// request back with it. A request without a body passes untouched.
///
/// A body has [`BODY_READ_GRACE_MS`], then must keep arriving at
/// [`BODY_MIN_BYTES_PER_S`] on average, and gets [`BODY_READ_TIMEOUT_MS`]
/// in all: a client that sends a byte and stops holds its place for the
/// grace, not the whole limit.
async fn read_body(
    state: &AppState,
    client: Option<ClientKey>,
    request: Request,
    declared: Option<u64>,
) -> Result<Request, Response> {
    // A declared length, a chunked body, or (in process) a body that knows
    // it has bytes: whatever its framing, the limit applies to it here.
    let has_body = match declared {
        Some(len) => len > 0,
        None => {
            request.headers().contains_key(TRANSFER_ENCODING)
                || !HttpBody::is_end_stream(request.body())
        }
    };
    if !has_body {
        return Ok(request);
    }
    let _reading = state
        .body_reads
        .try_acquire(client)
        .map_err(|why| refused(state, why))?;
    let (parts, mut body) = request.into_parts();
    let started = tokio::time::Instant::now();
    // The frames as they came: one (the usual case) is passed on as it is.
    let mut frames: Vec<axum::body::Bytes> = Vec::with_capacity(1);
    let mut received = 0usize;
    loop {
        // A small body usually came in with its head: then it is read at
        // the first poll, and no timer is armed for it.
        let frame = match futures_util::FutureExt::now_or_never(body.frame()) {
            Some(frame) => frame,
            None => {
                let received = u64::try_from(received).unwrap_or(u64::MAX);
                let allowed_ms = BODY_READ_GRACE_MS
                    .saturating_add(received.saturating_mul(1_000) / BODY_MIN_BYTES_PER_S)
                    .min(BODY_READ_TIMEOUT_MS);
                let deadline = started + Duration::from_millis(allowed_ms);
                match tokio::time::timeout_at(deadline, body.frame()).await {
                    Ok(frame) => frame,
                    // The contract lets the HTTP layer answer 408 bare; what
                    // is left of the body is unread, so the connection
                    // cannot carry another request.
                    Err(_elapsed) => {
                        return Err(
                            (StatusCode::REQUEST_TIMEOUT, [(CONNECTION, "close")]).into_response()
                        );
                    }
                }
            }
        };
        match frame {
            None => break,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    received = received.saturating_add(data.len());
                    if received > BODY_BYTES_MAX {
                        return Err(ApiError::PayloadTooLarge.into_response());
                    }
                    frames.push(data);
                }
            }
            Some(Err(_)) => return Err(ApiError::invalid("cannot read the body").into_response()),
        }
    }
    let bytes = match frames.len() {
        1 => frames.swap_remove(0),
        _ => axum::body::Bytes::from(frames.concat()),
    };
    Ok(Request::from_parts(parts, Body::from(bytes)))
}

/// The path of the flash sale's hot route.
const ORDERS_PATH: &str = "/v1/orders";

/// The whole front as the accept loop calls it: the router, and beside it
/// the hot route, `POST /v1/orders` (every click of a drop), served directly.
///
/// The direct route runs the same code as the router's: [`observed`]
/// (admission, shedding, the body read, metrics), the same extractors in
/// the handler's order, the same handler. What it skips is the router's
/// per-request machinery (route lookup, boxed services and futures, the
/// matched-path and parameter extensions), about a quarter of the cost of a
/// sold-out answer. A test sends the same requests, good and bad, both ways
/// and compares the answers.
#[derive(Clone)]
pub struct Front {
    router: Router,
    /// The state and the hot route's admission and metrics; `None` serves
    /// everything through the router.
    direct: Option<(AppState, Arc<RouteInfo>)>,
}

impl std::fmt::Debug for Front {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Front")
            .field("direct", &self.direct.is_some())
            .finish()
    }
}

impl From<Router> for Front {
    fn from(router: Router) -> Front {
        Front {
            router,
            direct: None,
        }
    }
}

impl Front {
    /// The router of `state`, with the hot route served directly (on a
    /// node alone; in cluster mode every request is routed to its
    /// partition, so everything goes through the router).
    pub fn new(state: AppState) -> Front {
        if state.cluster().is_some() {
            return Front::from(router(state));
        }
        let doc = routes::table()
            .into_iter()
            .map(|route| route.doc)
            .find(|doc| doc.method == Method::POST && doc.path == ORDERS_PATH)
            .expect("the route table has POST /v1/orders");
        let orders = Arc::new(RouteInfo::new(&state, &doc));
        Front {
            router: router(state.clone()),
            direct: Some((state, orders)),
        }
    }

    /// Answers one request.
    pub async fn call<B>(self, request: axum::http::Request<B>) -> Response
    where
        B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
        B::Error: Into<axum::BoxError>,
    {
        if let Some((state, orders)) = &self.direct
            && request.method() == Method::POST
            && request.uri().path() == ORDERS_PATH
        {
            let request = request.map(Body::new);
            return observed(state, orders, request, |request| {
                place_order_direct(state.clone(), request)
            })
            .await;
        }
        match self.router.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

/// `POST /v1/orders` without the router: the handler's extractors, in its
/// order, then the handler.
async fn place_order_direct(state: AppState, request: Request) -> Response {
    use axum::extract::{FromRequest, FromRequestParts};
    let (mut parts, body) = request.into_parts();
    let auth = match extract::Auth::from_request_parts(&mut parts, &state).await {
        Ok(auth) => auth,
        Err(refused) => return refused.into_response(),
    };
    let key = match extract::IdemKey::from_request_parts(&mut parts, &state).await {
        Ok(key) => key,
        Err(refused) => return refused.into_response(),
    };
    let request = Request::from_parts(parts, body);
    let body = match extract::ApiJson::from_request(request, &state).await {
        Ok(body) => body,
        Err(refused) => return refused.into_response(),
    };
    handlers::place_order(State(state), auth, key, cluster::Routed::none(), body)
        .await
        .into_response()
}

/// The router with every route and layer. The routes come from the one
/// table the OpenAPI document is built from too (`routes.rs`).
pub fn router(state: AppState) -> Router {
    let mut by_path: std::collections::BTreeMap<&str, axum::routing::MethodRouter<AppState>> =
        std::collections::BTreeMap::new();
    for route in routes::table() {
        // Each method of each path is admitted by what it is (its access,
        // whether it is a probe) and counted under its own metrics.
        let info = Arc::new(RouteInfo::new(&state, &route.doc));
        let handler = route
            .handler
            .route_layer(middleware::from_fn_with_state((state.clone(), info), front));
        let merged = match by_path.remove(route.doc.path) {
            Some(earlier) => earlier.merge(handler),
            None => handler,
        };
        by_path.insert(route.doc.path, merged);
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        // Another method on a known path: 405 with the methods it takes.
        let allow = routes::allow(path);
        let methods = methods.fallback(move |request: Request| {
            let allow = allow.clone();
            async move { handlers::method_not_allowed(&request, allow) }
        });
        router = router.route(path, methods);
    }
    router
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}
