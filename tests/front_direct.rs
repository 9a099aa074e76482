//! The direct route (`http::Front` serves `POST /v1/orders` without the
//! router) answers exactly as the router does: the same requests, good and
//! bad, are sent both ways, in process, and the answers compared (status,
//! headers that matter, body). Order ids differ between two fresh grants,
//! so those compare without them; a keyed replay compares byte for byte.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use flashcore::clock::SystemClock;
use flashcore::domain::sale::SaleWindow;
use flashcore::domain::{SkuId, State, UserId};
use flashcore::engine::{Engine, EngineConfig, NewSku};
use flashcore::http::auth::JwtKeys;
use flashcore::http::{AppState, Backend, Front, FrontConfig, router};
use flashcore::journal::MemJournal;
use serde_json::Value;
use tower::ServiceExt;

const SECRET: &[u8] = b"front-direct-test-secret-0123456789abcdef";

struct Answer {
    status: StatusCode,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }
}

async fn answer(response: axum::response::Response) -> Answer {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().expect("ASCII").to_owned())
    };
    let (status, retry_after, content_type) = (
        response.status(),
        header("retry-after"),
        header("content-type"),
    );
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body")
        .to_vec();
    Answer {
        status,
        retry_after,
        content_type,
        body,
    }
}

/// A request: `headers` as (name, value), `body` as given.
fn request(uri: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Request<Body> {
    let mut builder = Request::builder().method("POST").uri(uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(body)).expect("request")
}

/// What a case is, its URI, headers, body and expected status.
type Case<'a> = (&'a str, &'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16);

struct Setup {
    engine: Engine,
    state: AppState,
    customer: String,
    admin: String,
}

async fn setup() -> Setup {
    let engine = Engine::start(
        EngineConfig::default(),
        Arc::new(MemJournal::new()),
        Arc::new(SystemClock),
        State::default(),
    )
    .expect("engine");
    for (sku, stock) in [("hot", 1_000), ("gone", 0)] {
        engine
            .create_sku(NewSku {
                sku: SkuId::parse(sku).expect("sku"),
                name: sku.into(),
                price_cents: 100,
                stock,
                per_user_limit: Some(500),
                sale: SaleWindow::default(),
            })
            .await
            .expect("sku");
    }
    let backend = Arc::new(Backend::recovering());
    backend.install(engine.clone());
    let keys = JwtKeys::new(SECRET);
    let now = jsonwebtoken::get_current_timestamp();
    let customer = keys
        .issue(UserId::parse("ann").expect("user"), false, now, 3_600)
        .expect("token");
    let admin = keys
        .issue(UserId::parse("ops").expect("user"), true, now, 3_600)
        .expect("token");
    let state = AppState::new(backend, keys, FrontConfig::new(1_000)).expect("state");
    Setup {
        engine,
        state,
        customer,
        admin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_route_answers_as_the_router_does() {
    let s = setup().await;
    let front = Front::new(s.state.clone());
    let routed = router(s.state.clone());
    let bearer = format!("Bearer {}", s.customer);
    let admin = format!("Bearer {}", s.admin);
    let json = ("content-type", "application/json");
    let auth = ("authorization", bearer.as_str());
    let line = |sku: &str, qty: &str| format!(r#"{{"items":[{{"sku_id":"{sku}","qty":{qty}}}]}}"#);
    let huge = vec![b' '; 70 * 1024];
    let huge_len = huge.len().to_string();

    // (what, uri, headers, body, expected status): refusals and sold out.
    let cases: Vec<Case<'_>> = vec![
        (
            "no token",
            "/v1/orders",
            vec![json],
            line("hot", "1").into(),
            401,
        ),
        (
            "bad token",
            "/v1/orders",
            vec![json, ("authorization", "Bearer x.y.z")],
            line("hot", "1").into(),
            401,
        ),
        (
            "not bearer",
            "/v1/orders",
            vec![json, ("authorization", "Basic abc")],
            line("hot", "1").into(),
            401,
        ),
        (
            "no content type",
            "/v1/orders",
            vec![auth],
            line("hot", "1").into(),
            400,
        ),
        (
            "text content type",
            "/v1/orders",
            vec![auth, ("content-type", "text/plain")],
            line("hot", "1").into(),
            400,
        ),
        (
            "bad JSON",
            "/v1/orders",
            vec![auth, json],
            b"{\"items\":".to_vec(),
            400,
        ),
        (
            "empty body",
            "/v1/orders",
            vec![auth, json],
            Vec::new(),
            400,
        ),
        (
            "unknown field",
            "/v1/orders",
            vec![auth, json],
            br#"{"items":[{"sku_id":"hot","qty":1}],"x":1}"#.to_vec(),
            400,
        ),
        (
            "zero qty",
            "/v1/orders",
            vec![auth, json],
            line("hot", "0").into(),
            400,
        ),
        (
            "huge qty",
            "/v1/orders",
            vec![auth, json],
            line("hot", "10001").into(),
            400,
        ),
        (
            "negative qty",
            "/v1/orders",
            vec![auth, json],
            line("hot", "-1").into(),
            400,
        ),
        (
            "bad sku id",
            "/v1/orders",
            vec![auth, json],
            line("h t", "1").into(),
            400,
        ),
        (
            "no lines",
            "/v1/orders",
            vec![auth, json],
            br#"{"items":[]}"#.to_vec(),
            400,
        ),
        (
            "unknown SKU",
            "/v1/orders",
            vec![auth, json],
            line("nope", "1").into(),
            404,
        ),
        (
            "sold out",
            "/v1/orders",
            vec![auth, json],
            line("gone", "1").into(),
            409,
        ),
        (
            "sold out, query string",
            "/v1/orders?x=1",
            vec![auth, json],
            line("gone", "1").into(),
            409,
        ),
        (
            "sold out, unknown promotion",
            "/v1/orders",
            vec![auth, json],
            br#"{"items":[{"sku_id":"gone","qty":1}],"promo_code":"NOPE"}"#.to_vec(),
            404,
        ),
        (
            "over the limit",
            "/v1/orders",
            vec![auth, json],
            line("hot", "501").into(),
            409,
        ),
        (
            "two keys",
            "/v1/orders",
            vec![
                auth,
                json,
                ("idempotency-key", "a"),
                ("idempotency-key", "b"),
            ],
            line("hot", "1").into(),
            400,
        ),
        (
            "bad key",
            "/v1/orders",
            vec![auth, json, ("idempotency-key", "has space")],
            line("hot", "1").into(),
            400,
        ),
        (
            "declared too large",
            "/v1/orders",
            vec![auth, json, ("content-length", huge_len.as_str())],
            huge.clone(),
            413,
        ),
        (
            "too large",
            "/v1/orders",
            vec![auth, json],
            huge.clone(),
            413,
        ),
    ];
    for (what, uri, headers, body, expected) in &cases {
        let direct = answer(
            front
                .clone()
                .call(request(uri, headers, body.clone()))
                .await,
        )
        .await;
        let via_router = answer(
            routed
                .clone()
                .oneshot(request(uri, headers, body.clone()))
                .await
                .expect("infallible"),
        )
        .await;
        assert_eq!(direct.status.as_u16(), *expected, "{what}: direct status");
        assert_eq!(direct.status, via_router.status, "{what}: status");
        assert_eq!(direct.content_type, via_router.content_type, "{what}: type");
        assert_eq!(direct.retry_after, via_router.retry_after, "{what}: retry");
        assert_eq!(
            String::from_utf8_lossy(&direct.body),
            String::from_utf8_lossy(&via_router.body),
            "{what}: body"
        );
    }

    // Two fresh grants: equal but for the order's id and times.
    let mut orders = Vec::new();
    for direct in [true, false] {
        let req = request("/v1/orders", &[auth, json], line("hot", "2").into());
        let response = if direct {
            front.clone().call(req).await
        } else {
            routed.clone().oneshot(req).await.expect("infallible")
        };
        let got = answer(response).await;
        assert_eq!(got.status, StatusCode::CREATED, "grant, direct: {direct}");
        let mut order = got.json();
        for field in ["order_id", "created_at", "expires_at"] {
            assert!(order.get(field).is_some(), "an order has {field}: {order}");
            order[field] = Value::Null;
        }
        // The history's times too (two grants may straddle a millisecond).
        for change in order["history"].as_array_mut().expect("a history") {
            change["at"] = Value::Null;
        }
        orders.push((order, got.content_type));
    }
    assert_eq!(orders[0], orders[1], "two grants, direct then routed");

    // A keyed order placed by the router replays through the direct route
    // byte for byte, and a different body under its key conflicts the same.
    let keyed = [auth, json, ("idempotency-key", "replay-1")];
    let first = answer(
        routed
            .clone()
            .oneshot(request("/v1/orders", &keyed, line("hot", "3").into()))
            .await
            .expect("infallible"),
    )
    .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = answer(
        front
            .clone()
            .call(request("/v1/orders", &keyed, line("hot", "3").into()))
            .await,
    )
    .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.body, first.body, "a keyed replay, byte for byte");
    for direct in [true, false] {
        let req = request("/v1/orders", &keyed, line("hot", "4").into());
        let response = if direct {
            front.clone().call(req).await
        } else {
            routed.clone().oneshot(req).await.expect("infallible")
        };
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "a conflicting key, direct: {direct}"
        );
    }

    // Other methods and routes go through the router.
    let listed = answer(
        front
            .clone()
            .call(
                Request::builder()
                    .uri("/v1/orders")
                    .header("authorization", admin.as_str())
                    .body(Body::empty())
                    .expect("request"),
            )
            .await,
    )
    .await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.json()["orders"].as_array().map(Vec::len), Some(3));

    // Both ways are counted under the same route in the metrics.
    let metrics = answer(
        front
            .clone()
            .call(
                Request::builder()
                    .uri("/metrics")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await,
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let sold_out = text
        .lines()
        .find(|l| {
            l.starts_with("flashcore_http_requests_total{")
                && l.contains("route=\"/v1/orders\"")
                && l.contains("method=\"POST\"")
                && l.contains("status=\"409\"")
        })
        .unwrap_or_else(|| panic!("no 409 count for POST /v1/orders in:\n{text}"));
    let count: u64 = sold_out
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a count");
    // Sold out (twice: with and without a query string) and over the limit,
    // each sent both ways.
    assert_eq!(count, 6, "{sold_out}");
    s.engine.shutdown();
}
