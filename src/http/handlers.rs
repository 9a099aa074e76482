//! The endpoints of `../shared/API.md`, one thin handler each: extract,
//! call the engine, render. Authorization that depends on the order (owner
//! or admin) is the engine's; role checks are the extractors'.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};

use crate::cluster::node::PromotionError;
use crate::domain::event::SkuQty;
use crate::domain::idem::FirstAnswer;
use crate::domain::promo::Promotion;
use crate::domain::{SkuId, UserId, validate};
use crate::engine::{NewSku, OrderScope};
use crate::http::AppState;
use crate::http::cluster::Routed;
use crate::http::error::ApiError;
use crate::http::extract::{
    Admin, ApiJson, ApiPath, ApiQuery, Auth, IdemKey, OptionalJson, OrderPath,
};
use crate::http::idempotency::fingerprint;
use crate::http::views::{
    CartItemBody, CartJson, CheckoutBody, ClusterJson, ListQuery, NewSkuBody, OrderJson,
    OrderListJson, PatchSkuBody, PayBody, PlaceOrderBody, PromotionBody, PromotionJson, RefundBody,
    RestockBody, SkuJson, SkuListJson, SkuListQuery,
};
use crate::limits::{
    METRICS_CACHE_MS, METRICS_RENDER_TIMEOUT_MS, ORDERS_LIST_DEFAULT, ORDERS_LIST_MAX,
    SKUS_PAGE_DEFAULT, SKUS_PAGE_MAX,
};

type Answer = Result<Response, ApiError>;

fn sku_id(text: &str) -> Result<SkuId, ApiError> {
    SkuId::parse(text).map_err(|e| ApiError::invalid(e.to_string()))
}

/// What an order's JSON usually fits in (axum's `Json` starts at 128 bytes
/// and grows two or three times for one).
const JSON_BODY_TYPICAL_BYTES: usize = 640;

/// A JSON answer, serialised into one buffer of the usual size.
fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let mut body = Vec::with_capacity(JSON_BODY_TYPICAL_BYTES);
    match serde_json::to_writer(&mut body, value) {
        Ok(()) => (status, [(CONTENT_TYPE, "application/json")], body).into_response(),
        // The views are plain structs of strings and numbers: this is a bug.
        Err(error) => {
            tracing::error!(%error, "cannot serialise an answer");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot serialise the answer",
            )
                .into_response()
        }
    }
}

/// Renders a first answer (fresh or replayed) with the route's status.
fn outcome(status: StatusCode, outcome: FirstAnswer) -> Response {
    match outcome {
        FirstAnswer::Order(order) => json(status, &OrderJson::from(order.as_ref())),
        FirstAnswer::Sku(sku) => json(status, &SkuJson::from(&sku)),
    }
}

/// `GET /healthz`: the process is up.
pub async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: recovery has finished and the journal takes changes.
pub async fn readyz(State(state): State<AppState>) -> Answer {
    let why = match state.cluster() {
        Some(node) => crate::http::cluster::not_ready_reason(node),
        None => state.backend.not_ready_reason(),
    };
    match why {
        None => Ok(Json(serde_json::json!({ "status": "ready" })).into_response()),
        Some(why) => Err(ApiError::StorageUnavailable(why)),
    }
}

/// `GET /metrics`.
///
/// A render asks every order shard and the watched SKU actors, so its text
/// is kept for [`METRICS_CACHE_MS`]: scrapes in a loop, or many at once,
/// reach the actors at most once in that time.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = {
        let mut cached = state.metrics_text.lock().await;
        match &*cached {
            Some((at, text)) if at.elapsed() < Duration::from_millis(METRICS_CACHE_MS) => {
                text.clone()
            }
            stale => {
                let engine = state.backend.engine().ok();
                state.metrics.renders.inc();
                let limit = Duration::from_millis(METRICS_RENDER_TIMEOUT_MS);
                match tokio::time::timeout(limit, state.metrics.render(engine.as_ref())).await {
                    Ok(text) => {
                        let text = Bytes::from(text);
                        *cached = Some((Instant::now(), text.clone()));
                        text
                    }
                    // An actor that does not answer must not blind the
                    // monitoring that would show it: the last text again
                    // (or nothing yet), and the next scrape tries anew.
                    Err(_elapsed) => {
                        tracing::warn!("rendering the metrics timed out; serving the last text");
                        stale
                            .as_ref()
                            .map(|(_, text)| text.clone())
                            .unwrap_or_default()
                    }
                }
            }
        }
    };
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// A known path with a method it does not take (`allow`: the methods it
/// does take, for the `Allow` header).
pub fn method_not_allowed(request: &axum::extract::Request, allow: String) -> ApiError {
    ApiError::MethodNotAllowed {
        message: format!(
            "{} does not take {}; it takes {allow}",
            request.uri().path(),
            request.method()
        ),
        allow,
    }
}

/// Unknown route.
pub async fn not_found(request: axum::extract::Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

/// `GET /v1/cluster`: a single node is no cluster, one partition; a
/// cluster's node shows the nodes and every partition's owner.
pub async fn cluster(State(state): State<AppState>) -> Answer {
    let Some(node) = state.cluster() else {
        return Ok(json(StatusCode::OK, &ClusterJson::single_node()));
    };
    let view = node
        .view()
        .await
        .map_err(|why| ApiError::Overloaded(format!("the cluster's buckets: {why}")))?;
    Ok(json(StatusCode::OK, &ClusterJson::from(&view)))
}

// ----- SKUs -----

/// `POST /v1/skus` (admin).
pub async fn create_sku(
    State(state): State<AppState>,
    Admin(_): Admin,
    routed: Routed,
    ApiJson(body): ApiJson<NewSkuBody>,
) -> Answer {
    // A single node checks `buckets` and keeps one actor (contract:
    // "Cluster mode").
    body.buckets()?;
    let sale = body.sale()?;
    let engine = routed.engine(&state)?;
    let view = engine
        .create_sku(NewSku {
            sku: body.sku_id,
            name: body.name,
            price_cents: body.price_cents,
            stock: body.stock,
            per_user_limit: body.per_user_limit,
            sale,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(SkuJson::from(&view))).into_response())
}

/// `GET /v1/skus/{sku_id}`.
pub async fn get_sku(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    routed: Routed,
) -> Answer {
    let sku = sku_id(&id)?;
    let view = routed.engine(&state)?.sku(sku).await?;
    Ok(json(StatusCode::OK, &SkuJson::from(&view)))
}

/// `GET /v1/skus`: one page in id order, `?limit=` and `?after=`.
pub async fn list_skus(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SkuListQuery>,
    routed: Routed,
) -> Answer {
    let limit = match query.limit.as_deref() {
        None => SKUS_PAGE_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=SKUS_PAGE_MAX).contains(n))
            .ok_or_else(|| ApiError::invalid(format!("limit must be 1 to {SKUS_PAGE_MAX}")))?,
    };
    let after = query.after.as_deref().map(sku_id).transpose()?;
    let (views, next) = routed.engine(&state)?.skus_page(after, limit).await?;
    Ok(Json(SkuListJson::new(&views, next.as_ref())).into_response())
}

/// `PATCH /v1/skus/{sku_id}` (admin).
pub async fn patch_sku(
    State(state): State<AppState>,
    Admin(_): Admin,
    ApiPath(id): ApiPath<String>,
    routed: Routed,
    ApiJson(body): ApiJson<PatchSkuBody>,
) -> Answer {
    let sku = sku_id(&id)?;
    let sale = body.sale()?;
    let view = routed
        .engine(&state)?
        .update_sku(sku, body.name, body.price_cents, body.per_user_limit, sale)
        .await?;
    Ok(Json(SkuJson::from(&view)).into_response())
}

/// `POST /v1/skus/{sku_id}/restock` (admin, idempotent).
pub async fn restock(
    State(state): State<AppState>,
    Admin(caller): Admin,
    IdemKey(key): IdemKey,
    ApiPath(id): ApiPath<String>,
    routed: Routed,
    ApiJson(body): ApiJson<RestockBody>,
) -> Answer {
    let sku = sku_id(&id)?;
    validate::restock_qty(body.qty)?;
    let engine = routed.engine(&state)?;
    let print = || fingerprint("restock", sku.as_str(), &body);
    let answer = state
        .inflight
        .run(&engine, caller.user, key, print, {
            let (engine, qty) = (engine.clone(), body.qty);
            move |stamp| async move { Ok(FirstAnswer::Sku(engine.restock(sku, qty, stamp).await?)) }
        })
        .await?;
    Ok(outcome(StatusCode::OK, answer))
}

/// `POST /v1/promotions` (admin). In cluster mode the promotion goes into
/// the cluster's bucket, from which every partition's engine adopts it.
pub async fn create_promotion(
    State(state): State<AppState>,
    Admin(_): Admin,
    routed: Routed,
    ApiJson(body): ApiJson<PromotionBody>,
) -> Answer {
    let promo = Promotion::new(body.code, body.threshold_cents, body.off_cents)?;
    let created = match state.cluster() {
        Some(node) => node.create_promotion(promo).await.map_err(|e| match e {
            PromotionError::AlreadyExists(_) => ApiError::AlreadyExists(e.to_string()),
            PromotionError::Full => ApiError::invalid(e.to_string()),
            PromotionError::Unavailable(_) => ApiError::StorageUnavailable(e.to_string()),
        })?,
        None => routed.engine(&state)?.create_promotion(promo).await?,
    };
    Ok((StatusCode::CREATED, Json(PromotionJson::from(&created))).into_response())
}

// ----- orders -----

/// `POST /v1/orders` (idempotent).
pub async fn place_order(
    State(state): State<AppState>,
    Auth(caller): Auth,
    IdemKey(key): IdemKey,
    routed: Routed,
    ApiJson(body): ApiJson<PlaceOrderBody>,
) -> Answer {
    let items: Vec<SkuQty> = body.items.iter().copied().map(Into::into).collect();
    // Bad lines are a 400 before any key is taken (one line: no merge, no
    // allocation; the flash-sale case).
    match items.as_slice() {
        [line] => validate::qty(line.qty)?,
        lines => drop(validate::merge_lines(lines)?),
    }
    let engine = routed.engine(&state)?;
    let print = || fingerprint("place", "", &body);
    let answer = state
        .inflight
        .run(&engine, caller.user, key, print, {
            let (engine, promo) = (engine.clone(), body.promo_code);
            move |stamp| async move {
                let order = engine
                    .place_order(caller.user, &items, promo, stamp)
                    .await?;
                Ok(FirstAnswer::Order(Arc::new(order)))
            }
        })
        .await?;
    Ok(outcome(StatusCode::CREATED, answer))
}

/// `GET /v1/orders/{order_id}` (owner or admin).
pub async fn get_order(
    State(state): State<AppState>,
    Auth(caller): Auth,
    OrderPath(id): OrderPath,
    routed: Routed,
) -> Answer {
    let order = routed.engine(&state)?.order(caller, id).await?;
    Ok(json(StatusCode::OK, &OrderJson::from(&order)))
}

/// `GET /v1/orders`: a customer's own; an admin's everyone's or `?user_id=`.
pub async fn list_orders(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiQuery(query): ApiQuery<ListQuery>,
    routed: Routed,
) -> Answer {
    let limit = match query.limit.as_deref() {
        None => ORDERS_LIST_DEFAULT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=ORDERS_LIST_MAX).contains(n))
            .ok_or_else(|| ApiError::invalid(format!("limit must be 1 to {ORDERS_LIST_MAX}")))?,
    };
    let wanted = query
        .user_id
        .as_deref()
        .map(UserId::parse)
        .transpose()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    let scope = match (caller.admin, wanted) {
        (true, Some(user)) => OrderScope::User(user),
        (true, None) => OrderScope::All,
        (false, Some(user)) if user != caller.user => {
            return Err(ApiError::Forbidden(
                "customers only see their own orders".into(),
            ));
        }
        (false, _) => OrderScope::User(caller.user),
    };
    let orders = routed.engine(&state)?.orders(scope, limit).await?;
    Ok(Json(OrderListJson::new(&orders)).into_response())
}

/// `POST /v1/orders/{order_id}/pay` (admin: the payment provider's callback;
/// idempotent).
pub async fn pay(
    State(state): State<AppState>,
    Admin(caller): Admin,
    IdemKey(key): IdemKey,
    OrderPath(id): OrderPath,
    routed: Routed,
    ApiJson(body): ApiJson<PayBody>,
) -> Answer {
    let engine = routed.engine(&state)?;
    let print = || fingerprint("pay", &id.to_string(), &body);
    let answer = state
        .inflight
        .run(&engine, caller.user, key, print, {
            let (engine, payment_ref, amount) =
                (engine.clone(), body.payment_ref, body.amount_cents);
            move |stamp| async move {
                let order = engine.pay(caller, id, payment_ref, amount, stamp).await?;
                Ok(FirstAnswer::Order(Arc::new(order)))
            }
        })
        .await?;
    Ok(outcome(StatusCode::OK, answer))
}

/// `POST /v1/orders/{order_id}/cancel` (owner or admin).
pub async fn cancel(
    State(state): State<AppState>,
    Auth(caller): Auth,
    OrderPath(id): OrderPath,
    routed: Routed,
) -> Answer {
    let order = routed.engine(&state)?.cancel(caller, id).await?;
    Ok(Json(OrderJson::from(&order)).into_response())
}

/// `POST /v1/orders/{order_id}/ship` (admin).
pub async fn ship(
    State(state): State<AppState>,
    Admin(caller): Admin,
    OrderPath(id): OrderPath,
    routed: Routed,
) -> Answer {
    let order = routed.engine(&state)?.ship(caller, id).await?;
    Ok(Json(OrderJson::from(&order)).into_response())
}

/// `POST /v1/orders/{order_id}/deliver` (admin).
pub async fn deliver(
    State(state): State<AppState>,
    Admin(caller): Admin,
    OrderPath(id): OrderPath,
    routed: Routed,
) -> Answer {
    let order = routed.engine(&state)?.deliver(caller, id).await?;
    Ok(Json(OrderJson::from(&order)).into_response())
}

/// `POST /v1/orders/{order_id}/refund` (admin, idempotent).
pub async fn refund(
    State(state): State<AppState>,
    Admin(caller): Admin,
    IdemKey(key): IdemKey,
    OrderPath(id): OrderPath,
    routed: Routed,
    ApiJson(body): ApiJson<RefundBody>,
) -> Answer {
    let lines: Vec<_> = body.lines.iter().copied().map(Into::into).collect();
    let engine = routed.engine(&state)?;
    let print = || fingerprint("refund", &id.to_string(), &body);
    let answer = state
        .inflight
        .run(&engine, caller.user, key, print, {
            let (engine, restock) = (engine.clone(), body.restock);
            move |stamp| async move {
                let order = engine.refund(caller, id, lines, restock, stamp).await?;
                Ok(FirstAnswer::Order(Arc::new(order)))
            }
        })
        .await?;
    Ok(outcome(StatusCode::OK, answer))
}

// ----- carts -----

/// `GET /v1/cart`.
pub async fn get_cart(State(state): State<AppState>, Auth(caller): Auth, routed: Routed) -> Answer {
    let cart = routed.engine(&state)?.cart(caller.user).await?;
    Ok(Json(CartJson::from(&cart)).into_response())
}

/// `PUT /v1/cart/items/{sku_id}`.
pub async fn put_cart_item(
    State(state): State<AppState>,
    Auth(caller): Auth,
    ApiPath(id): ApiPath<String>,
    routed: Routed,
    ApiJson(body): ApiJson<CartItemBody>,
) -> Answer {
    let sku = sku_id(&id)?;
    let cart = routed
        .engine(&state)?
        .set_cart_item(caller.user, sku, body.qty)
        .await?;
    Ok(Json(CartJson::from(&cart)).into_response())
}

/// `DELETE /v1/cart`.
pub async fn clear_cart(
    State(state): State<AppState>,
    Auth(caller): Auth,
    routed: Routed,
) -> Answer {
    routed.engine(&state)?.clear_cart(caller.user).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /v1/cart/checkout` (idempotent): places the cart, empties it.
pub async fn checkout(
    State(state): State<AppState>,
    Auth(caller): Auth,
    IdemKey(key): IdemKey,
    routed: Routed,
    OptionalJson(body): OptionalJson<CheckoutBody>,
) -> Answer {
    let engine = routed.engine(&state)?;
    let print = || fingerprint("checkout", "", &body);
    let answer = state
        .inflight
        .run(&engine, caller.user, key, print, {
            let (engine, promo) = (engine.clone(), body.promo_code);
            move |stamp| async move {
                let order = engine.checkout(caller.user, promo, stamp).await?;
                Ok(FirstAnswer::Order(Arc::new(order)))
            }
        })
        .await?;
    Ok(outcome(StatusCode::CREATED, answer))
}
