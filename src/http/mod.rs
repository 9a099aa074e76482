//! The HTTP front: exactly the contract of `../shared/API.md`, thin over the
//! [`Engine`].
//!
//! Layers, outside in: metrics (per matched route), the body limit (a
//! declared `Content-Length` over 64 KiB is a `413` before any byte is read),
//! the body read (the whole body, at most 64 KiB, within 10 s, else `413` or
//! a bare `408`; before the request holds a slot, so a client trickling its
//! body cannot hold one), load shedding (a bound on requests in flight;
//! beyond it a `503 overloaded` with `Retry-After` at once), then the routes. Unknown routes and methods, bad JSON,
//! wrong content types and bad parameters all answer with the JSON error
//! body (`error.rs`). Nothing here blocks a worker thread.

pub mod auth;
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
use std::task::Poll;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::engine::Engine;
use crate::http::auth::JwtKeys;
use crate::http::error::ApiError;
use crate::http::idempotency::InFlight;
use crate::http::live::Live;
use crate::http::metrics::{Metrics, RouteMetrics};
use crate::limits::{BODY_BYTES_MAX, BODY_READ_TIMEOUT_MS, BODY_READS_MAX, REQUESTS_IN_FLIGHT_MAX};

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
    /// Requests in flight (load shedding).
    pub slots: Arc<Semaphore>,
    /// Request bodies being read (before a slot is taken).
    pub body_reads: Arc<Semaphore>,
    /// The live dashboard's counters and snapshot (`live.rs`).
    pub live: Arc<Live>,
    /// Per-caller rate limits, when on (`--rate-limit`).
    pub rate_limiter: Option<Arc<ratelimit::RateLimiter>>,
}

impl AppState {
    /// State for a backend and keys.
    ///
    /// # Errors
    /// When the metrics cannot be registered.
    pub fn new(
        backend: Arc<Backend>,
        keys: JwtKeys,
        max_in_flight: usize,
        rate_limit: Option<std::num::NonZeroU32>,
    ) -> Result<AppState, prometheus::Error> {
        Ok(AppState(Arc::new(Shared {
            backend,
            keys: Arc::new(keys),
            inflight: Arc::new(InFlight::default()),
            metrics: Arc::new(Metrics::new()?),
            slots: Arc::new(Semaphore::new(
                max_in_flight.clamp(1, REQUESTS_IN_FLIGHT_MAX),
            )),
            body_reads: Arc::new(Semaphore::new(BODY_READS_MAX)),
            live: Arc::new(Live::default()),
            rate_limiter: rate_limit.map(|rate| Arc::new(ratelimit::RateLimiter::new(rate))),
        })))
    }
}

/// The one middleware: sheds load on the API routes (a request that finds
/// every slot taken is answered `503` at once, and a declared body over the
/// limit `413`, before any work), then records the route, status and
/// latency of every request.
async fn front(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (route, api) = {
        let path = request
            .extensions()
            .get::<MatchedPath>()
            .map_or("unmatched", MatchedPath::as_str);
        (state.metrics.route(path), path.starts_with("/v1/"))
    };
    observed(&state, &route, api, request, |request| next.run(request)).await
}

/// [`front`]'s work around `inner`, for the router and the direct route
/// alike: admission on API routes, then the metrics.
async fn observed<F, Fut>(
    state: &AppState,
    route: &RouteMetrics,
    api: bool,
    request: Request,
    inner: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let started = Instant::now();
    let method = request.method().clone();
    let response = if api {
        admit(state, request, inner).await
    } else {
        inner(request).await
    };
    let took = started.elapsed();
    route.observe(&state.metrics, &method, response.status().as_u16(), took);
    state.live.record(response.status(), took);
    response
}

async fn admit<F, Fut>(state: &AppState, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    // Over its rate: answered before anything else (`ratelimit.rs`).
    if let Some(refused) = ratelimit::refuse(state, &request) {
        return refused;
    }
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > BODY_BYTES_MAX as u64) {
        return ApiError::PayloadTooLarge.into_response();
    }
    let request = match read_body(state, request, declared).await {
        Ok(request) => request,
        Err(refused) => return refused,
    };
    let Ok(_slot) = Arc::clone(&state.slots).try_acquire_owned() else {
        state.metrics.shed.inc();
        return ApiError::overloaded().into_response();
    };
    state.metrics.in_flight.inc();
    let response = inner(request).await;
    state.metrics.in_flight.dec();
    response
}

/// Reads the whole body into memory (at most [`BODY_BYTES_MAX`], within
/// [`BODY_READ_TIMEOUT_MS`]) and gives the request back with it. A request
/// without a body passes untouched.
async fn read_body(
    state: &AppState,
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
    let Ok(_reading) = Arc::clone(&state.body_reads).try_acquire_owned() else {
        state.metrics.shed.inc();
        return Err(ApiError::overloaded().into_response());
    };
    let (parts, body) = request.into_parts();
    let mut read = std::pin::pin!(axum::body::to_bytes(body, BODY_BYTES_MAX));
    // A small body usually came in with its head: then it is read at the
    // first poll, and no timer is armed for it.
    let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
    let read = match first {
        Poll::Ready(read) => Ok(read),
        Poll::Pending => {
            let limit = Duration::from_millis(BODY_READ_TIMEOUT_MS);
            tokio::time::timeout(limit, read).await
        }
    };
    match read {
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, Body::from(bytes))),
        Ok(Err(error)) => {
            let too_large = error
                .into_inner()
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            Err(if too_large {
                ApiError::PayloadTooLarge.into_response()
            } else {
                ApiError::invalid("cannot read the body").into_response()
            })
        }
        // The contract lets the HTTP layer answer 408 bare; what is left of
        // the body is unread, so the connection cannot carry another request.
        Err(_elapsed) => {
            Err((StatusCode::REQUEST_TIMEOUT, [(CONNECTION, "close")]).into_response())
        }
    }
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
    /// The state and the hot route's metrics; `None` serves everything
    /// through the router.
    direct: Option<(AppState, Arc<RouteMetrics>)>,
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
    /// The router of `state`, with the hot route served directly.
    pub fn new(state: AppState) -> Front {
        let orders = state.metrics.route(ORDERS_PATH);
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
            return observed(state, orders, true, request, |request| {
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
    handlers::place_order(State(state), auth, key, body)
        .await
        .into_response()
}

/// The router with every route and layer. The routes come from the one
/// table the OpenAPI document is built from too (`routes.rs`).
pub fn router(state: AppState) -> Router {
    let mut by_path: std::collections::BTreeMap<&str, axum::routing::MethodRouter<AppState>> =
        std::collections::BTreeMap::new();
    for route in routes::table() {
        let merged = match by_path.remove(route.doc.path) {
            Some(earlier) => earlier.merge(route.handler),
            None => route.handler,
        };
        by_path.insert(route.doc.path, merged);
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        router = router.route(path, methods);
    }
    router
        .route_layer(middleware::from_fn_with_state(state.clone(), front))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(state)
}
