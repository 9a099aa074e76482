//! Cluster mode in the front: every request goes to the partition that
//! holds what it names, on this node or through its owner.
//!
//! After admission (so a hostile client is refused here, before any other
//! node hears of it), [`dispatch`] finds the request's partition:
//!
//! - a SKU route: the SKU id's partition (`POST /v1/skus`: the body's);
//! - an order route: the id's partition (`id % P`: ids name it);
//! - `POST /v1/orders`: its lines' partition; lines in several partitions
//!   are refused with `400` naming them until cross-partition orders land
//!   (part 2), never half-placed;
//! - `GET /v1/skus` and `GET /v1/orders`: every partition, gathered and
//!   merged in the order a single node answers in;
//! - `POST /v1/promotions`: served on this node, in the cluster's
//!   promotions bucket (`cluster::node`);
//! - carts: refused with `400` in cluster mode for now (a checkout is an
//!   order across partitions).
//!
//! A keyed change (`Idempotency-Key`) first claims its key for its
//! partition (`cluster::claims`), so the same key with another body is a
//! `422` through any node.
//!
//! A partition this node serves runs the handler here with that
//! partition's engine; any other goes to its owner as a NATS request
//! (`cluster::forward`) and the owner's answer is returned as it is. A
//! partition with no owner, or an owner that does not answer in time, is
//! `503 partition_unavailable` with `Retry-After`.

use std::future::Future;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;

use crate::cluster::claims::Claimed;
use crate::cluster::forward::{self, ForwardedAnswer, ForwardedRequest};
use crate::cluster::layout::partition_of_sku;
use crate::cluster::node::{Node, RequestHandler};
use crate::domain::{IdempotencyKey, SkuId};
use crate::engine::Engine;
use crate::http::error::ApiError;
use crate::http::{AppState, Front, Verified};
use crate::limits::BODY_BYTES_MAX;

/// Partitions asked at once by a gathering read.
const GATHER_AT_ONCE: usize = 16;

/// Largest answer carried back from an owner: a NATS message's default
/// limit (1 MiB); the largest page (1,000 orders) fits.
const ANSWER_BYTES_MAX: usize = 1 << 20;

/// The engine of the partition a request was routed to (cluster mode).
#[derive(Debug, Clone)]
pub(crate) struct PartitionEngine(pub(crate) Engine);

/// Marks a request another node forwarded here for `partition` (or one of
/// this node's own gathering reads): it is served here or refused, never
/// sent on again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardedTo(pub(crate) u32);

/// The engine a handler works on: the routed partition's in cluster mode,
/// else the node's one engine.
#[derive(Debug)]
pub struct Routed(Option<Engine>);

impl Routed {
    /// No routed engine: the node's one engine.
    pub(crate) fn none() -> Routed {
        Routed(None)
    }

    /// The engine.
    ///
    /// # Errors
    /// `StorageUnavailable` while a single node recovers.
    pub fn engine(self, state: &AppState) -> Result<Engine, ApiError> {
        match self.0 {
            Some(engine) => Ok(engine),
            None => state.backend.engine(),
        }
    }
}

impl FromRequestParts<AppState> for Routed {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        Ok(Routed(
            parts
                .extensions
                .get::<PartitionEngine>()
                .map(|routed| routed.0.clone()),
        ))
    }
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// Served here without an engine (health, documents, the dashboard).
    Here,
    /// One partition's.
    Partition(u32),
    /// Every partition's, merged.
    Gather(Gathered),
    /// Not served in cluster mode yet.
    Refused(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gathered {
    Skus,
    Orders,
}

/// The request's target (see the module doc). `body` is the request's
/// body; a body that does not parse goes to partition 0, whose handler
/// answers the `400`.
fn target(method: &Method, path: &str, body: &[u8], partitions: u32) -> Target {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let sku_partition = |id: &str| {
        SkuId::parse(id)
            .map(|sku| partition_of_sku(&sku, partitions))
            .unwrap_or(0)
    };
    match segments.as_slice() {
        ["v1", "skus"] if method == Method::GET => Target::Gather(Gathered::Skus),
        ["v1", "skus"] => {
            let id = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("sku_id").and_then(|s| s.as_str()).map(str::to_owned));
            Target::Partition(id.as_deref().map_or(0, sku_partition))
        }
        ["v1", "skus", id] | ["v1", "skus", id, _] => Target::Partition(sku_partition(id)),
        ["v1", "orders"] if method == Method::GET => Target::Gather(Gathered::Orders),
        ["v1", "orders"] => order_lines_target(body, partitions, sku_partition),
        ["v1", "orders", id, ..] => match id.parse::<u64>() {
            Ok(id) => {
                Target::Partition(u32::try_from(id % u64::from(partitions.max(1))).unwrap_or(0))
            }
            // Not an order id: the handler answers 404 before it needs an
            // engine.
            Err(_) => Target::Here,
        },
        ["v1", "cart", ..] => Target::Refused(
            "carts are not served in cluster mode yet: place each order with \
             POST /v1/orders"
                .into(),
        ),
        _ => Target::Here,
    }
}

fn order_lines_target(body: &[u8], partitions: u32, sku_partition: impl Fn(&str) -> u32) -> Target {
    let value = serde_json::from_slice::<serde_json::Value>(body).ok();
    let lines = value
        .as_ref()
        .and_then(|v| v.get("items"))
        .and_then(|items| items.as_array());
    let Some(lines) = lines else {
        return Target::Partition(0);
    };
    let mut named: Vec<u32> = lines
        .iter()
        .filter_map(|line| line.get("sku_id").and_then(|s| s.as_str()))
        .map(&sku_partition)
        .collect();
    named.sort_unstable();
    named.dedup();
    match named.as_slice() {
        [] => Target::Partition(0),
        [one] => Target::Partition(*one),
        several => Target::Refused(format!(
            "the order's lines are in partitions {several:?} of {partitions}; cluster mode \
             places an order whose lines are all in one partition (orders across \
             partitions are not built yet): place one order per partition"
        )),
    }
}

/// Routes `request` (see the module doc); `inner` runs the handler here.
pub(crate) async fn dispatch<F, Fut>(node: &Node, request: Request, inner: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let (parts, body) = request.into_parts();
    // Admission read the body into memory already: this only joins it.
    let body = match axum::body::to_bytes(body, BODY_BYTES_MAX).await {
        Ok(body) => body,
        Err(_) => return ApiError::PayloadTooLarge.into_response(),
    };
    let forwarded = parts.extensions.get::<ForwardedTo>().copied();
    let target = match (
        forwarded,
        target(&parts.method, parts.uri.path(), &body, node.partitions()),
    ) {
        (_, Target::Here) => Target::Here,
        (_, Target::Refused(why)) => return ApiError::invalid(why).into_response(),
        // Forwarded here (or this node's own gathering read): this
        // partition, and no further.
        (Some(ForwardedTo(partition)), _) => Target::Partition(partition),
        (None, target) => target,
    };
    if let (Target::Partition(partition), None) = (&target, forwarded)
        && let Err(refused) = claim_key(node, &parts, *partition).await
    {
        return refused.into_response();
    }
    let mut request = Request::from_parts(parts, Body::from(body.clone()));
    match target {
        Target::Here | Target::Refused(_) => inner(request).await,
        Target::Partition(partition) => match node.local(partition) {
            Some(engine) => {
                request.extensions_mut().insert(PartitionEngine(engine));
                inner(request).await
            }
            None if forwarded.is_some() => ApiError::PartitionUnavailable(format!(
                "this node no longer serves partition {partition}; retry shortly"
            ))
            .into_response(),
            None => {
                let (parts, _) = request.into_parts();
                match node
                    .forward(partition, &forwarded_request(&parts, body))
                    .await
                {
                    Ok(answer) => answer_response(answer),
                    Err(why) => ApiError::PartitionUnavailable(why).into_response(),
                }
            }
        },
        Target::Gather(what) => {
            let (parts, _) = request.into_parts();
            gather(node, what, forwarded_request(&parts, body)).await
        }
    }
}

/// Claims a keyed change's `Idempotency-Key` for `partition` before it
/// goes there (`cluster::claims`): the same key with another body, whose
/// change went to another partition, is a `422` here as on a node alone.
/// A request without a key, or with one the handler will refuse, passes.
async fn claim_key(node: &Node, parts: &Parts, partition: u32) -> Result<(), ApiError> {
    if parts.method != Method::POST {
        return Ok(());
    }
    let Some(Verified(caller)) = parts.extensions.get::<Verified>().copied() else {
        return Ok(());
    };
    let key = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| IdempotencyKey::parse(v).ok());
    let Some(key) = key else {
        return Ok(());
    };
    match node.claim(caller.user, key, partition).await {
        Ok(Claimed::Go) => Ok(()),
        Ok(Claimed::Conflict) => Err(ApiError::IdempotencyConflict),
        Err(why) => Err(ApiError::PartitionUnavailable(why)),
    }
}

/// The headers named in `names` (lowercase) that `headers` holds as text,
/// as they travel between nodes.
fn carried_headers(headers: &axum::http::HeaderMap, names: &[&str]) -> Vec<(String, String)> {
    names
        .iter()
        .filter_map(|name| {
            let value = headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_string(), value.to_string()))
        })
        .collect()
}

/// A request as it travels to another node.
fn forwarded_request(parts: &Parts, body: Bytes) -> ForwardedRequest {
    let uri = parts.uri.path_and_query().map_or_else(
        || parts.uri.path().to_string(),
        |pq| pq.as_str().to_string(),
    );
    let headers = carried_headers(&parts.headers, &forward::REQUEST_HEADERS);
    ForwardedRequest {
        method: parts.method.as_str().to_string(),
        uri,
        headers,
        body,
    }
}

/// An owner's answer as this node's answer.
fn answer_response(answer: ForwardedAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut response = (status, answer.body).into_response();
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Why a cluster node is not ready, or `None` when it is: it takes part
/// (its first ownership pass ran) and every engine it serves is alive.
pub fn not_ready_reason(node: &Node) -> Option<String> {
    if let Some(why) = crate::fatal::reason() {
        return Some(format!("stopping after a fatal error: {why}"));
    }
    if !node.settled() {
        return Some("joining the cluster".into());
    }
    node.failure()
        .map(|why| format!("an engine is dead, the node is stopping: {why}"))
}

/// A gathering read: the same request to every partition (here or at its
/// owner), merged. Any partition that cannot answer makes the whole read
/// `503`: a list missing a partition would hide acknowledged changes.
async fn gather(node: &Node, what: Gathered, request: ForwardedRequest) -> Response {
    let partitions = node.partitions();
    let answers: Vec<Result<ForwardedAnswer, String>> = futures_util::stream::iter(0..partitions)
        .map(|partition| {
            let request = request.clone();
            async move { node.call(partition, &request).await }
        })
        .buffered(GATHER_AT_ONCE)
        .collect()
        .await;
    let mut pages = Vec::with_capacity(answers.len());
    for answer in answers {
        let answer = match answer {
            Ok(answer) => answer,
            Err(why) => return ApiError::PartitionUnavailable(why).into_response(),
        };
        if answer.status != 200 {
            // A bad parameter (the same everywhere) or an unavailable
            // partition: that answer is the answer.
            return answer_response(answer);
        }
        match serde_json::from_slice::<serde_json::Value>(&answer.body) {
            Ok(page) => pages.push(page),
            Err(e) => {
                return ApiError::PartitionUnavailable(format!(
                    "a partition answered a page that does not parse: {e}"
                ))
                .into_response();
            }
        }
    }
    let limit = requested_limit(&request.uri, what);
    let merged = match what {
        Gathered::Skus => merge_skus(pages, limit),
        Gathered::Orders => merge_orders(pages, limit),
    };
    axum::Json(merged).into_response()
}

/// The `limit` the request asked for (each partition checked it already),
/// or the route's default.
fn requested_limit(uri: &str, what: Gathered) -> usize {
    let asked = uri.split_once('?').and_then(|(_, query)| {
        query
            .split('&')
            .find_map(|pair| pair.strip_prefix("limit="))
            .and_then(|n| n.parse::<usize>().ok())
    });
    asked.unwrap_or(match what {
        Gathered::Skus => crate::limits::SKUS_PAGE_DEFAULT,
        Gathered::Orders => crate::limits::ORDERS_LIST_DEFAULT,
    })
}

fn items(page: serde_json::Value, field: &str) -> Vec<serde_json::Value> {
    match page {
        serde_json::Value::Object(mut map) => match map.remove(field) {
            Some(serde_json::Value::Array(items)) => items,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// Pages of SKUs in id order, merged into one: the first `limit` ids, and
/// `next` when any partition has more (or more were gathered than shown).
fn merge_skus(pages: Vec<serde_json::Value>, limit: usize) -> serde_json::Value {
    let mut more = false;
    let mut skus = Vec::new();
    for page in pages {
        more |= page.get("next").is_some_and(|n| !n.is_null());
        skus.extend(items(page, "skus"));
    }
    let id = |sku: &serde_json::Value| {
        sku.get("sku_id")
            .and_then(|s| s.as_str())
            .unwrap_or_default()
            .to_string()
    };
    skus.sort_by_key(id);
    more |= skus.len() > limit;
    skus.truncate(limit);
    let next = if more { skus.last().map(id) } else { None };
    serde_json::json!({ "skus": skus, "next": next })
}

/// Lists of orders (newest, that is highest id, first) merged into one.
fn merge_orders(pages: Vec<serde_json::Value>, limit: usize) -> serde_json::Value {
    let mut orders: Vec<serde_json::Value> = pages
        .into_iter()
        .flat_map(|page| items(page, "orders"))
        .collect();
    let id = |order: &serde_json::Value| {
        order
            .get("order_id")
            .and_then(|s| s.as_str())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0)
    };
    orders.sort_by_key(|order| std::cmp::Reverse(id(order)));
    orders.truncate(limit);
    serde_json::json!({ "orders": orders })
}

/// What the node calls with a request forwarded here for `partition`: it
/// runs through this node's whole front (admission, the handler, metrics)
/// marked [`ForwardedTo`], and its answer goes back.
pub fn forwarded_handler(front: Front) -> RequestHandler {
    Arc::new(
        move |partition, request| -> BoxFuture<'static, ForwardedAnswer> {
            let front = front.clone();
            Box::pin(async move { serve_forwarded(front, partition, request).await })
        },
    )
}

async fn serve_forwarded(
    front: Front,
    partition: u32,
    request: ForwardedRequest,
) -> ForwardedAnswer {
    let mut builder = axum::http::Request::builder()
        .method(request.method.as_str())
        .uri(request.uri.as_str());
    for (name, value) in &request.headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    let built = builder
        .extension(ForwardedTo(partition))
        .body(Body::from(request.body));
    let response = match built {
        Ok(request) => front.call(request).await,
        Err(e) => ApiError::invalid(format!("a forwarded request that does not parse: {e}"))
            .into_response(),
    };
    let (parts, body) = response.into_parts();
    let body = match axum::body::to_bytes(body, ANSWER_BYTES_MAX).await {
        Ok(body) => body,
        Err(_) => {
            return error_answer(ApiError::PartitionUnavailable(
                "the answer is too large to forward".into(),
            ));
        }
    };
    let headers = carried_headers(&parts.headers, &forward::ANSWER_HEADERS);
    ForwardedAnswer {
        status: parts.status.as_u16(),
        headers,
        body,
    }
}

fn error_answer(error: ApiError) -> ForwardedAnswer {
    let (status, code) = error.status_and_code();
    ForwardedAnswer {
        status: status.as_u16(),
        headers: vec![
            ("content-type".into(), "application/json".into()),
            (
                "retry-after".into(),
                crate::limits::RETRY_AFTER_SECONDS.to_string(),
            ),
        ],
        body: serde_json::json!({"error": {"code": code, "message": error.to_string()}})
            .to_string()
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_go_to_the_partition_of_what_they_name() {
        let p = 8;
        let sku = SkuId::parse("hoodie-black-m").expect("valid");
        let home = partition_of_sku(&sku, p);
        assert_eq!(
            target(&Method::GET, "/v1/skus/hoodie-black-m", b"", p),
            Target::Partition(home)
        );
        assert_eq!(
            target(&Method::POST, "/v1/skus/hoodie-black-m/restock", b"{}", p),
            Target::Partition(home)
        );
        assert_eq!(
            target(
                &Method::POST,
                "/v1/skus",
                br#"{"sku_id":"hoodie-black-m"}"#,
                p
            ),
            Target::Partition(home)
        );
        assert_eq!(
            target(&Method::GET, "/v1/orders/21/pay", b"", p),
            Target::Partition(5)
        );
        assert_eq!(target(&Method::GET, "/v1/orders/x", b"", p), Target::Here);
        assert_eq!(
            target(&Method::GET, "/v1/skus", b"", p),
            Target::Gather(Gathered::Skus)
        );
        assert_eq!(target(&Method::GET, "/healthz", b"", p), Target::Here);
        let one = br#"{"items":[{"sku_id":"hoodie-black-m","qty":1}]}"#;
        assert_eq!(
            target(&Method::POST, "/v1/orders", one, p),
            Target::Partition(home)
        );
        // Lines in two partitions: refused, naming them.
        let other = (0..100)
            .map(|i| format!("sku-{i}"))
            .find(|id| partition_of_sku(&SkuId::parse(id).expect("valid"), p) != home)
            .expect("another partition");
        let two = format!(
            r#"{{"items":[{{"sku_id":"hoodie-black-m","qty":1}},{{"sku_id":"{other}","qty":1}}]}}"#
        );
        assert!(matches!(
            target(&Method::POST, "/v1/orders", two.as_bytes(), p),
            Target::Refused(why) if why.contains("partitions")
        ));
    }

    #[test]
    fn gathered_pages_merge_in_the_order_of_one_node() {
        let pages = vec![
            serde_json::json!({"skus": [{"sku_id": "a"}, {"sku_id": "d"}], "next": null}),
            serde_json::json!({"skus": [{"sku_id": "b"}, {"sku_id": "c"}], "next": "c"}),
        ];
        let merged = merge_skus(pages, 3);
        assert_eq!(
            merged,
            serde_json::json!({"skus": [{"sku_id": "a"}, {"sku_id": "b"}, {"sku_id": "c"}], "next": "c"})
        );
        let last = merge_skus(
            vec![serde_json::json!({"skus": [{"sku_id": "a"}], "next": null})],
            3,
        );
        assert_eq!(last["next"], serde_json::Value::Null);
        let orders = merge_orders(
            vec![
                serde_json::json!({"orders": [{"order_id": "17"}, {"order_id": "9"}]}),
                serde_json::json!({"orders": [{"order_id": "12"}]}),
            ],
            2,
        );
        assert_eq!(
            orders,
            serde_json::json!({"orders": [{"order_id": "17"}, {"order_id": "12"}]})
        );
    }
}
