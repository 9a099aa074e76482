//! The HTTP contract end to end, against the real binary on a free loopback
//! port with a temp data dir: every endpoint, the auth matrix, bad input,
//! idempotency (also across a SIGKILL), a flash sale, hostile clients, load
//! shedding and a clean SIGTERM.

mod support;

use std::collections::HashSet;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::server::{Api, Client, Server, closed_by_server};

fn body_str(r: &support::server::Response) -> String {
    String::from_utf8_lossy(&r.body).into_owned()
}

#[test]
fn every_endpoint_works_as_the_contract_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let admin = server.admin();
    let ann = server.customer("ann");

    assert_eq!(api.call("GET", "/healthz", None, None, None).status, 200);
    assert_eq!(api.call("GET", "/readyz", None, None, None).status, 200);

    // SKUs.
    let r = api.create_sku("tee", 2_500, 10, Some(5));
    assert_eq!(r.status, 201, "{}", body_str(&r));
    let sku = r.json();
    for (field, value) in [
        ("on_hand", 10),
        ("available", 10),
        ("reserved", 0),
        ("allocated", 0),
        ("shipped", 0),
    ] {
        assert_eq!(sku[field], value, "{field}");
    }
    assert_eq!(sku["per_user_limit"], 5);
    assert_eq!(api.create_sku("tee", 1, 1, None).code(), "already_exists");
    api.create_sku("mug", 1_000, 4, None);
    let list = api.call("GET", "/v1/skus", None, None, None).json();
    let ids: Vec<&str> = list["skus"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["sku_id"].as_str())
        .collect();
    assert_eq!(ids, ["mug", "tee"]);
    let r = api.call(
        "PATCH",
        "/v1/skus/tee",
        Some(&admin),
        None,
        Some(r#"{"price_cents": 2000, "per_user_limit": null}"#),
    );
    assert_eq!(
        (
            r.status,
            r.json()["price_cents"].clone(),
            r.json()["per_user_limit"].clone()
        ),
        (200, Value::from(2000), Value::Null)
    );
    let r = api.call(
        "POST",
        "/v1/skus/tee/restock",
        Some(&admin),
        Some("rs-1"),
        Some(r#"{"qty": 5}"#),
    );
    assert_eq!(
        (r.status, r.json()["on_hand"].clone()),
        (200, Value::from(15))
    );

    // Promotions, orders with a discount spread over the lines.
    let r = api.call(
        "POST",
        "/v1/promotions",
        Some(&admin),
        None,
        Some(r#"{"code":"TEN","threshold_cents":3000,"off_cents":1000}"#),
    );
    assert_eq!(r.status, 201, "{}", body_str(&r));
    assert_eq!(r.json()["code"], "TEN");
    let r = api.call(
        "POST",
        "/v1/orders",
        Some(&ann),
        None,
        Some(r#"{"items":[{"sku_id":"tee","qty":1},{"sku_id":"mug","qty":2}],"promo_code":"TEN"}"#),
    );
    assert_eq!(r.status, 201, "{}", body_str(&r));
    let order = r.json();
    let id = order["order_id"].as_str().expect("id").to_string();
    assert_eq!(order["status"], "reserved");
    assert_eq!(
        (
            order["subtotal_cents"].clone(),
            order["discount_cents"].clone(),
            order["total_cents"].clone()
        ),
        (4_000.into(), 1_000.into(), 3_000.into())
    );
    assert_eq!(
        (
            order["lines"][0]["discount_cents"].clone(),
            order["lines"][1]["discount_cents"].clone()
        ),
        (500.into(), 500.into())
    );
    assert_eq!(order["lines"][0]["name"], "Item tee");
    assert_eq!(
        order["lines"][0]["unit_price_cents"], 2_000,
        "the price at placement"
    );
    assert!(
        order["created_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert!(order["expires_at"].as_str().is_some());
    assert_eq!(order["history"][0]["status"], "reserved");
    // The snapshot: a later price change does not touch it.
    api.call(
        "PATCH",
        "/v1/skus/tee",
        Some(&admin),
        None,
        Some(r#"{"price_cents": 9999}"#),
    );
    let read = api
        .call("GET", &format!("/v1/orders/{id}"), Some(&ann), None, None)
        .json();
    assert_eq!(read["lines"][0]["unit_price_cents"], 2_000);

    // Payment: mismatch, then the right amount, then a harmless repeat.
    let pay = |amount: u64| format!(r#"{{"payment_ref":"psp-1","amount_cents":{amount}}}"#);
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/pay"),
        Some(&admin),
        None,
        Some(&pay(2_999)),
    );
    assert_eq!((r.status, r.code()), (409, "payment_mismatch".into()));
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/pay"),
        Some(&admin),
        None,
        Some(&pay(3_000)),
    );
    assert_eq!(
        (
            r.status,
            r.json()["status"].clone(),
            r.json()["paid_cents"].clone()
        ),
        (200, "paid".into(), 3_000.into())
    );
    let again = api.call(
        "POST",
        &format!("/v1/orders/{id}/pay"),
        Some(&admin),
        None,
        Some(&pay(3_000)),
    );
    assert_eq!((again.status, again.json()), (200, r.json()));
    assert_eq!(api.sku("mug")["allocated"], 2);

    // Refund one mug before shipping: its share of the discount stays.
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/refund"),
        Some(&admin),
        Some("rf-1"),
        Some(r#"{"lines":[{"sku_id":"mug","qty":1}]}"#),
    );
    assert_eq!(
        (r.status, r.json()["refunded_cents"].clone()),
        (200, 750.into()),
        "{}",
        body_str(&r)
    );
    assert_eq!(api.sku("mug")["available"], 3);
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/refund"),
        Some(&admin),
        None,
        Some(r#"{"lines":[{"sku_id":"mug","qty":2}]}"#),
    );
    assert_eq!((r.status, r.code()), (400, "invalid_request".into()));

    // Ship, deliver, refund the rest after shipment with restock.
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/ship"),
        Some(&admin),
        None,
        None,
    );
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, "shipped".into())
    );
    assert_eq!(api.sku("mug")["shipped"], 1);
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/deliver"),
        Some(&admin),
        None,
        None,
    );
    assert_eq!(r.json()["status"], "delivered");
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/refund"),
        Some(&admin),
        None,
        Some(r#"{"lines":[{"sku_id":"mug","qty":1},{"sku_id":"tee","qty":1}],"restock":true}"#),
    );
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, "refunded".into())
    );
    assert_eq!(
        r.json()["refunded_cents"],
        r.json()["paid_cents"],
        "every unit refunded returns exactly what was paid"
    );
    let refunded = r.json();
    let history: Vec<&str> = refunded["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["status"].as_str())
        .collect();
    assert_eq!(
        history,
        ["reserved", "paid", "shipped", "delivered", "refunded"]
    );
    assert_eq!(
        api.sku("mug")["on_hand"],
        4,
        "the returned mug came back to stock"
    );

    // Cancel, and a customer cannot ship.
    let r = api.order(&ann, &[("tee", 1)], None);
    let id2 = r.json()["order_id"].as_str().expect("id").to_string();
    assert_eq!(
        api.call(
            "POST",
            &format!("/v1/orders/{id2}/ship"),
            Some(&ann),
            None,
            None
        )
        .code(),
        "forbidden"
    );
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id2}/cancel"),
        Some(&ann),
        None,
        None,
    );
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, "cancelled".into())
    );
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id2}/cancel"),
        Some(&ann),
        None,
        None,
    );
    assert_eq!((r.status, r.code()), (409, "invalid_transition".into()));

    // Listing: own orders newest first, limits, admin filter.
    let bob = server.customer("bob");
    api.order(&bob, &[("tee", 1)], None);
    let own = api
        .call("GET", "/v1/orders?limit=1", Some(&ann), None, None)
        .json();
    assert_eq!(own["orders"].as_array().map(Vec::len), Some(1));
    assert_eq!(own["orders"][0]["order_id"].as_str(), Some(id2.as_str()));
    let all = api
        .call("GET", "/v1/orders", Some(&admin), None, None)
        .json();
    assert_eq!(all["orders"].as_array().map(Vec::len), Some(3));
    let bobs = api
        .call("GET", "/v1/orders?user_id=bob", Some(&admin), None, None)
        .json();
    assert!(
        bobs["orders"]
            .as_array()
            .expect("list")
            .iter()
            .all(|o| o["user_id"] == "bob")
    );
    assert_eq!(
        api.call("GET", "/v1/orders?user_id=bob", Some(&ann), None, None)
            .code(),
        "forbidden"
    );
    assert_eq!(
        api.call("GET", "/v1/orders?limit=501", Some(&ann), None, None)
            .code(),
        "invalid_request"
    );

    // The cart and checkout.
    let r = api.call(
        "PUT",
        "/v1/cart/items/tee",
        Some(&ann),
        None,
        Some(r#"{"qty":2}"#),
    );
    assert_eq!(
        r.json(),
        serde_json::json!({"items":[{"sku_id":"tee","qty":2}]})
    );
    api.call(
        "PUT",
        "/v1/cart/items/mug",
        Some(&ann),
        None,
        Some(r#"{"qty":1}"#),
    );
    api.call(
        "PUT",
        "/v1/cart/items/mug",
        Some(&ann),
        None,
        Some(r#"{"qty":0}"#),
    );
    assert_eq!(
        api.call("GET", "/v1/cart", Some(&ann), None, None).json()["items"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let r = api.call("POST", "/v1/cart/checkout", Some(&ann), Some("co-1"), None);
    assert_eq!(
        (r.status, r.json()["lines"][0]["qty"].clone()),
        (201, 2.into()),
        "{}",
        body_str(&r)
    );
    assert_eq!(
        api.call("GET", "/v1/cart", Some(&ann), None, None).json(),
        serde_json::json!({"items": []})
    );
    api.call(
        "PUT",
        "/v1/cart/items/mug",
        Some(&ann),
        None,
        Some(r#"{"qty":1}"#),
    );
    assert_eq!(
        api.call("DELETE", "/v1/cart", Some(&ann), None, None)
            .status,
        204
    );
    assert_eq!(
        api.call("POST", "/v1/cart/checkout", Some(&ann), None, Some("{}"))
            .code(),
        "invalid_request"
    );

    // Metrics.
    let m = api.call("GET", "/metrics", None, None, None);
    let text = body_str(&m);
    for name in [
        "flashcore_http_requests_total",
        "flashcore_http_request_duration_seconds_bucket",
        "flashcore_orders{status=\"refunded\"} 1",
        "flashcore_sku_available{sku=\"tee\"}",
        "flashcore_journal_batch_events_bucket",
        "flashcore_journal_flush_seconds_bucket",
        "flashcore_journal_durable_lag_events",
        "process_resident_memory_bytes",
        "flashcore_step_last_second_max_seconds{step=\"capture\"}",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }
    // The journal's steps ran for every change above, and are counted.
    for step in ["journal_write", "journal_sync"] {
        let prefix = format!("flashcore_step_seconds_count{{step=\"{step}\"}} ");
        let count: u64 = text
            .lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("metrics lack {prefix}:\n{text}"));
        assert!(count > 0, "{step} ran: {text}");
    }
}

#[test]
fn the_auth_matrix_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    api.create_sku("a", 100, 10, None);
    let ann = server.customer("ann");
    let order = api.order(&ann, &[("a", 1)], None).json();
    let path = format!("/v1/orders/{}", order["order_id"].as_str().expect("id"));
    let expired = server.token("ann", false, -60);
    let forged = {
        let keys = flashcore::http::auth::JwtKeys::new(b"another-secret-another-secret-xx!");
        keys.issue(
            flashcore::domain::UserId::parse("ann").expect("valid"),
            true,
            2_000_000_000 - 10,
            1_000_000,
        )
        .expect("signs")
    };
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("no token", None, 401, "unauthorized"),
        ("garbage", Some("x.y.z".into()), 401, "unauthorized"),
        ("bad signature", Some(forged), 401, "unauthorized"),
        ("expired", Some(expired), 401, "unauthorized"),
        (
            "another user's order",
            Some(server.customer("bob")),
            403,
            "forbidden",
        ),
        ("the owner", Some(server.customer("ann")), 200, ""),
        ("an admin", Some(server.admin()), 200, ""),
    ];
    for (what, token, status, code) in cases {
        let r = api.call("GET", &path, token.as_deref(), None, None);
        assert_eq!(r.status, status, "{what}: {}", body_str(&r));
        if !code.is_empty() {
            assert_eq!(r.code(), code, "{what}");
        }
    }
    // A customer on admin routes.
    let customer = server.customer("ann");
    for (method, path, body) in [
        (
            "POST",
            "/v1/skus",
            Some(r#"{"sku_id":"z","name":"Z","price_cents":1,"stock":1}"#),
        ),
        ("PATCH", "/v1/skus/a", Some(r#"{"price_cents":1}"#)),
        ("POST", "/v1/skus/a/restock", Some(r#"{"qty":1}"#)),
        (
            "POST",
            "/v1/promotions",
            Some(r#"{"code":"P","threshold_cents":10,"off_cents":1}"#),
        ),
        (
            "POST",
            &format!("{path}/pay"),
            Some(r#"{"payment_ref":"x","amount_cents":100}"#),
        ),
        ("POST", &format!("{path}/ship"), None),
        ("POST", &format!("{path}/deliver"), None),
        (
            "POST",
            &format!("{path}/refund"),
            Some(r#"{"lines":[{"sku_id":"a","qty":1}]}"#),
        ),
    ] {
        let r = api.call(method, path, Some(&customer), None, body);
        assert_eq!(
            (r.status, r.code()),
            (403, "forbidden".into()),
            "{method} {path}"
        );
    }
    // Malformed Authorization headers.
    for header in ["Basic abc", "Bearer", "Bearer ", "token"] {
        let r = api
            .client
            .send("GET", "/v1/cart", &[("Authorization", header)], None);
        assert_eq!(
            (r.status, r.code()),
            (401, "unauthorized".into()),
            "{header:?}"
        );
    }
    // Public routes need no token.
    for path in ["/healthz", "/readyz", "/metrics", "/v1/skus", "/v1/skus/a"] {
        assert_eq!(
            api.call("GET", path, None, None, None).status,
            200,
            "{path}"
        );
    }
}

/// What, method, path, token, body, expected status and code.
type BadInput<'a> = (
    &'a str,
    &'a str,
    String,
    Option<&'a str>,
    Option<String>,
    u16,
    &'a str,
);

#[test]
fn thirty_odd_bad_inputs_get_a_clear_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    api.create_sku("a", 100, 10, Some(2));
    api.create_sku("b", 100, 1, None);
    let admin = server.admin();
    let ann = server.customer("ann");
    let bob = server.customer("bob");
    let order = api.order(&ann, &[("a", 1)], None).json();
    let oid = order["order_id"].as_str().expect("id").to_string();
    let before = api.books();
    let long_id = "x".repeat(65);
    let big_name = "n".repeat(201);
    let huge = format!(
        r#"{{"items":[{}]}}"#,
        vec![r#"{"sku_id":"a","qty":1}"#; 3_000].join(",")
    );
    let lines_101 = format!(
        r#"{{"items":[{}]}}"#,
        (0..101)
            .map(|i| format!(r#"{{"sku_id":"s{i}","qty":1}}"#))
            .collect::<Vec<_>>()
            .join(",")
    );
    let order_path = format!("/v1/orders/{oid}");
    #[rustfmt::skip]
    let cases: Vec<BadInput> = vec![
        ("bad JSON", "POST", "/v1/orders".into(), Some(&ann), Some("{not json".into()), 400, "invalid_request"),
        ("empty body", "POST", "/v1/orders".into(), Some(&ann), Some("".into()), 400, "invalid_request"),
        ("JSON array", "POST", "/v1/orders".into(), Some(&ann), Some("[]".into()), 400, "invalid_request"),
        ("missing items", "POST", "/v1/orders".into(), Some(&ann), Some("{}".into()), 400, "invalid_request"),
        ("no lines", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[]}"#.into()), 400, "invalid_request"),
        ("qty 0", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":0}]}"#.into()), 400, "invalid_request"),
        ("qty 10001", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":10001}]}"#.into()), 400, "invalid_request"),
        ("qty negative", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":-1}]}"#.into()), 400, "invalid_request"),
        ("qty overflow", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":99999999999999999999}]}"#.into()), 400, "invalid_request"),
        ("qty a string", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":"1"}]}"#.into()), 400, "invalid_request"),
        ("merged qty over the max", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":6000},{"sku_id":"a","qty":5000}]}"#.into()), 400, "invalid_request"),
        ("101 lines", "POST", "/v1/orders".into(), Some(&ann), Some(lines_101), 400, "invalid_request"),
        ("bad sku id", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a b","qty":1}]}"#.into()), 400, "invalid_request"),
        ("sku id too long", "POST", "/v1/orders".into(), Some(&ann), Some(format!(r#"{{"items":[{{"sku_id":"{long_id}","qty":1}}]}}"#)), 400, "invalid_request"),
        ("unknown sku", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"nope","qty":1}]}"#.into()), 404, "not_found"),
        ("unknown promo", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":1}],"promo_code":"NOPE"}"#.into()), 404, "not_found"),
        ("unknown field", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":1}],"coupon":"x"}"#.into()), 400, "invalid_request"),
        ("over the per-user limit", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":2}]}"#.into()), 409, "limit_exceeded"),
        ("over the limit, another user", "POST", "/v1/orders".into(), Some(&bob), Some(r#"{"items":[{"sku_id":"a","qty":3}]}"#.into()), 409, "limit_exceeded"),
        ("out of stock", "POST", "/v1/orders".into(), Some(&bob), Some(r#"{"items":[{"sku_id":"b","qty":2}]}"#.into()), 409, "out_of_stock"),
        ("one line out of stock", "POST", "/v1/orders".into(), Some(&bob), Some(r#"{"items":[{"sku_id":"a","qty":1},{"sku_id":"b","qty":2}]}"#.into()), 409, "out_of_stock"),
        ("body over 64 KiB", "POST", "/v1/orders".into(), Some(&ann), Some(huge), 413, "payload_too_large"),
        ("order id not a number", "GET", "/v1/orders/abc".into(), Some(&ann), None, 404, "not_found"),
        ("order id zero", "GET", "/v1/orders/0".into(), Some(&ann), None, 404, "not_found"),
        ("unknown order", "GET", "/v1/orders/999999".into(), Some(&ann), None, 404, "not_found"),
        ("unknown route", "GET", "/v1/nothing".into(), None, None, 404, "not_found"),
        ("wrong method", "DELETE", "/v1/skus".into(), Some(&admin), None, 405, "method_not_allowed"),
        ("name too long", "POST", "/v1/skus".into(), Some(&admin), Some(format!(r#"{{"sku_id":"n","name":"{big_name}","price_cents":1,"stock":1}}"#)), 400, "invalid_request"),
        ("empty name", "POST", "/v1/skus".into(), Some(&admin), Some(r#"{"sku_id":"n","name":"","price_cents":1,"stock":1}"#.into()), 400, "invalid_request"),
        ("price over 10^12", "POST", "/v1/skus".into(), Some(&admin), Some(r#"{"sku_id":"n","name":"N","price_cents":1000000000001,"stock":1}"#.into()), 400, "invalid_request"),
        ("stock over 10^9", "POST", "/v1/skus".into(), Some(&admin), Some(r#"{"sku_id":"n","name":"N","price_cents":1,"stock":1000000001}"#.into()), 400, "invalid_request"),
        ("limit 0", "POST", "/v1/skus".into(), Some(&admin), Some(r#"{"sku_id":"n","name":"N","price_cents":1,"stock":1,"per_user_limit":0}"#.into()), 400, "invalid_request"),
        ("restock 0", "POST", "/v1/skus/a/restock".into(), Some(&admin), Some(r#"{"qty":0}"#.into()), 400, "invalid_request"),
        ("restock over 10^9", "POST", "/v1/skus/a/restock".into(), Some(&admin), Some(r#"{"qty":1000000001}"#.into()), 400, "invalid_request"),
        ("restock unknown sku", "POST", "/v1/skus/nope/restock".into(), Some(&admin), Some(r#"{"qty":1}"#.into()), 404, "not_found"),
        ("empty patch", "PATCH", "/v1/skus/a".into(), Some(&admin), Some("{}".into()), 400, "invalid_request"),
        ("promotion off 0", "POST", "/v1/promotions".into(), Some(&admin), Some(r#"{"code":"P","threshold_cents":10,"off_cents":0}"#.into()), 400, "invalid_request"),
        ("promotion off over any order", "POST", "/v1/promotions".into(), Some(&admin), Some(r#"{"code":"P","threshold_cents":10,"off_cents":1000000000000000001}"#.into()), 400, "invalid_request"),
        ("bad payment ref", "POST", format!("{order_path}/pay"), Some(&admin), Some(r#"{"payment_ref":"a b","amount_cents":100}"#.into()), 400, "invalid_request"),
        ("refund of a reserved order", "POST", format!("{order_path}/refund"), Some(&admin), Some(r#"{"lines":[{"sku_id":"a","qty":1}]}"#.into()), 409, "invalid_transition"),
        ("ship a reserved order", "POST", format!("{order_path}/ship"), Some(&admin), None, 409, "invalid_transition"),
        ("cart qty over the max", "PUT", "/v1/cart/items/a".into(), Some(&ann), Some(r#"{"qty":10001}"#.into()), 400, "invalid_request"),
        ("cart unknown sku", "PUT", "/v1/cart/items/nope".into(), Some(&ann), Some(r#"{"qty":1}"#.into()), 404, "not_found"),
        ("list limit 0", "GET", "/v1/orders?limit=0".into(), Some(&ann), None, 400, "invalid_request"),
        ("unknown query field", "GET", "/v1/orders?sort=asc".into(), Some(&ann), None, 400, "invalid_request"),
        ("bad idempotency key", "POST", "/v1/orders".into(), Some(&ann), Some(r#"{"items":[{"sku_id":"a","qty":1}]}"#.into()), 400, "invalid_request"),
    ];
    assert!(cases.len() >= 30);
    for (what, method, path, token, body, status, code) in &cases {
        let mut headers: Vec<(&str, String)> = Vec::new();
        if body.is_some() {
            headers.push(("Content-Type", "application/json".into()));
        }
        if let Some(t) = token {
            headers.push(("Authorization", format!("Bearer {t}")));
        }
        if *what == "bad idempotency key" {
            headers.push(("Idempotency-Key", "has space".into()));
        }
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = api.client.send(method, path, &pairs, body.as_deref());
        assert_eq!(r.status, *status, "{what}: {}", body_str(&r));
        assert_eq!(r.code(), *code, "{what}");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what} has a message"
        );
    }
    // A wrong content type.
    let r = api.client.send(
        "POST",
        "/v1/orders",
        &[
            ("Authorization", &format!("Bearer {ann}")),
            ("Content-Type", "text/plain"),
        ],
        Some(r#"{"items":[{"sku_id":"a","qty":1}]}"#),
    );
    assert_eq!((r.status, r.code()), (400, "invalid_request".into()));
    assert_eq!(api.books(), before, "no bad input changed anything");
    assert_eq!(
        api.call("GET", "/healthz", None, None, None).status,
        200,
        "still up"
    );
}

#[test]
fn order_ids_that_are_not_decimal_numbers_are_unknown_orders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    api.create_sku("a", 100, 10, None);
    let admin = server.admin();
    let ann = server.customer("ann");
    assert_eq!(api.order(&ann, &[("a", 1)], None).status, 201);
    let before = api.books();
    let pay = r#"{"payment_ref":"p1","amount_cents":100}"#;
    let refund = r#"{"lines":[{"sku_id":"a","qty":1}]}"#;
    // Not decimal numbers, zero, and decimal numbers past u64::MAX (or the
    // largest u64, which no order has): all unknown orders.
    let ids = [
        "does-not-exist",
        "abc",
        "-1",
        "+1",
        "1e3",
        "0x10",
        "1.0",
        "%20",
        "%FF",
        "0",
        "18446744073709551615",
        "18446744073709551616",
        "123456789012345678901234567890",
    ];
    for id in ids {
        let base = format!("/v1/orders/{id}");
        let calls: [(&str, String, &str, Option<&str>); 7] = [
            ("GET", base.clone(), &ann, None),
            ("GET", base.clone(), &admin, None),
            ("POST", format!("{base}/pay"), &admin, Some(pay)),
            ("POST", format!("{base}/cancel"), &ann, None),
            ("POST", format!("{base}/ship"), &admin, None),
            ("POST", format!("{base}/deliver"), &admin, None),
            ("POST", format!("{base}/refund"), &admin, Some(refund)),
        ];
        for (method, path, token, body) in calls {
            let r = api.call(method, &path, Some(token), None, body);
            assert_eq!(
                (r.status, r.code()),
                (404, "not_found".into()),
                "{method} {path}: {}",
                body_str(&r)
            );
            assert!(
                r.json()["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
    }
    assert_eq!(api.books(), before, "nothing changed");
}

#[test]
fn a_promotion_worth_more_than_its_threshold_takes_at_most_the_subtotal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let admin = server.admin();
    let ann = server.customer("ann");
    api.create_sku("tee", 2_500, 10, None);
    api.create_sku("pin", 1, 10, None);
    let promo = |body: &str| {
        let mut api = Api::new(&server);
        api.call("POST", "/v1/promotions", Some(&admin), None, Some(body))
    };
    let r = promo(r#"{"code":"BIG","threshold_cents":1000,"off_cents":1000000}"#);
    assert_eq!(r.status, 201, "{}", body_str(&r));
    assert_eq!(
        (
            r.json()["threshold_cents"].clone(),
            r.json()["off_cents"].clone()
        ),
        (1_000.into(), 1_000_000.into())
    );
    let r = promo(r#"{"code":"ANY","threshold_cents":0,"off_cents":5}"#);
    assert_eq!(r.status, 201, "{}", body_str(&r));

    // The discount is the whole subtotal, spread exactly over the lines.
    let r = api.call(
        "POST",
        "/v1/orders",
        Some(&ann),
        None,
        Some(r#"{"items":[{"sku_id":"tee","qty":1},{"sku_id":"pin","qty":3}],"promo_code":"BIG"}"#),
    );
    assert_eq!(r.status, 201, "{}", body_str(&r));
    let order = r.json();
    assert_eq!(
        (
            order["subtotal_cents"].clone(),
            order["discount_cents"].clone(),
            order["total_cents"].clone(),
            order["promo_code"].clone()
        ),
        (2_503.into(), 2_503.into(), 0.into(), "BIG".into())
    );
    assert_eq!(
        (
            order["lines"][0]["discount_cents"].clone(),
            order["lines"][1]["discount_cents"].clone()
        ),
        (2_500.into(), 3.into())
    );
    // Below the threshold: nothing off.
    let small = api
        .call(
            "POST",
            "/v1/orders",
            Some(&ann),
            None,
            Some(r#"{"items":[{"sku_id":"pin","qty":1}],"promo_code":"BIG"}"#),
        )
        .json();
    assert_eq!(
        (
            small["discount_cents"].clone(),
            small["total_cents"].clone()
        ),
        (0.into(), 1.into())
    );
    // A threshold of 0 and 5 off a 1-cent order: 1 off.
    let tiny = api
        .call(
            "POST",
            "/v1/orders",
            Some(&ann),
            None,
            Some(r#"{"items":[{"sku_id":"pin","qty":1}],"promo_code":"ANY"}"#),
        )
        .json();
    assert_eq!(
        (tiny["discount_cents"].clone(), tiny["total_cents"].clone()),
        (1.into(), 0.into())
    );

    // A free order is paid with 0, and refunds add up to exactly 0.
    let id = order["order_id"].as_str().expect("id").to_string();
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/pay"),
        Some(&admin),
        None,
        Some(r#"{"payment_ref":"free","amount_cents":0}"#),
    );
    assert_eq!(
        (
            r.status,
            r.json()["status"].clone(),
            r.json()["paid_cents"].clone()
        ),
        (200, "paid".into(), 0.into()),
        "{}",
        body_str(&r)
    );
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/refund"),
        Some(&admin),
        None,
        Some(r#"{"lines":[{"sku_id":"pin","qty":1}]}"#),
    );
    assert_eq!(
        (r.status, r.json()["refunded_cents"].clone()),
        (200, 0.into()),
        "{}",
        body_str(&r)
    );
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/refund"),
        Some(&admin),
        None,
        Some(r#"{"lines":[{"sku_id":"pin","qty":2},{"sku_id":"tee","qty":1}]}"#),
    );
    assert_eq!(
        (
            r.status,
            r.json()["status"].clone(),
            r.json()["refunded_cents"].clone(),
            r.json()["paid_cents"].clone()
        ),
        (200, "refunded".into(), 0.into(), 0.into()),
        "{}",
        body_str(&r)
    );
    assert_eq!(api.sku("tee")["available"], 10, "refunded before shipment");
}

#[test]
fn idempotency_keys_replay_conflict_wait_and_survive_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Room for one user's 16 racing duplicates below within its share of
    // the requests in flight (1/16 of them).
    let mut server = Server::start(dir.path(), &["--max-in-flight", "512"]);
    let mut api = Api::new(&server);
    api.create_sku("a", 100, 1_000, None);
    let ann = server.customer("ann");
    let first = api.order(&ann, &[("a", 2)], Some("key-1"));
    assert_eq!(first.status, 201);
    let replay = api.order(&ann, &[("a", 2)], Some("key-1"));
    assert_eq!(
        (replay.status, replay.body.clone()),
        (201, first.body.clone()),
        "the first answer again"
    );
    let conflict = api.order(&ann, &[("a", 3)], Some("key-1"));
    assert_eq!(
        (conflict.status, conflict.code()),
        (422, "idempotency_conflict".into())
    );
    // The same key of another user is another key.
    let bob = server.customer("bob");
    assert_eq!(api.order(&bob, &[("a", 3)], Some("key-1")).status, 201);
    // Whitespace and key order do not make another request.
    let respaced = api.call(
        "POST",
        "/v1/orders",
        Some(&ann),
        Some("key-1"),
        Some(r#"{ "items" : [ { "qty" : 2 , "sku_id" : "a" } ] }"#),
    );
    assert_eq!(
        (respaced.status, respaced.body.clone()),
        (201, first.body.clone())
    );
    assert_eq!(api.sku("a")["reserved"], 5, "only two orders were placed");

    // Concurrent duplicates: one order, the same answer for all.
    let addr = server.addr;
    let token = Arc::new(server.customer("cyd"));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let token = Arc::clone(&token);
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let h = [
                    ("Content-Type", "application/json"),
                    ("Authorization", &format!("Bearer {token}")),
                    ("Idempotency-Key", "same"),
                ];
                let r = c.send(
                    "POST",
                    "/v1/orders",
                    &h,
                    Some(r#"{"items":[{"sku_id":"a","qty":1}]}"#),
                );
                (r.status, r.body)
            })
        })
        .collect();
    let answers: HashSet<(u16, Vec<u8>)> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    assert_eq!(answers.len(), 1, "every duplicate got the same answer");
    assert_eq!(answers.iter().next().map(|a| a.0), Some(201));
    assert_eq!(api.sku("a")["reserved"], 6);

    // A refusal of the business rules records nothing (contract v2): once
    // the stock came back, the same key and body is decided afresh.
    let admin = server.admin();
    api.create_sku("scarce", 100, 1, None);
    let refused = api.order(&ann, &[("scarce", 2)], Some("key-2"));
    assert_eq!(
        (refused.status, refused.code()),
        (409, "out_of_stock".into())
    );
    let restocked = api.call(
        "POST",
        "/v1/skus/scarce/restock",
        Some(&admin),
        None,
        Some(r#"{"qty":5}"#),
    );
    assert_eq!(restocked.status, 200);
    let decided_again = api.order(&ann, &[("scarce", 2)], Some("key-2"));
    assert_eq!(
        decided_again.status,
        201,
        "decided afresh, not the refusal again: {}",
        body_str(&decided_again)
    );
    let replayed = api.order(&ann, &[("scarce", 2)], Some("key-2"));
    assert_eq!(
        (replayed.status, replayed.body.clone()),
        (201, decided_again.body.clone()),
        "the change is recorded: its answer again"
    );
    // A key whose first use was refused recorded nothing, so another body
    // is no conflict.
    let too_many = api.order(&ann, &[("scarce", 100)], Some("key-4"));
    assert_eq!(
        (too_many.status, too_many.code()),
        (409, "out_of_stock".into())
    );
    assert_eq!(api.order(&ann, &[("scarce", 1)], Some("key-4")).status, 201);
    // Bad input is not kept: fixed, the same key runs.
    let bad = api.call(
        "POST",
        "/v1/orders",
        Some(&ann),
        Some("key-3"),
        Some(r#"{"items":[]}"#),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(api.order(&ann, &[("scarce", 1)], Some("key-3")).status, 201);

    // Keyed pay and restock replay too; after SIGKILL and restart as well.
    let oid = first.json()["order_id"].as_str().expect("id").to_string();
    let pay = api.call(
        "POST",
        &format!("/v1/orders/{oid}/pay"),
        Some(&admin),
        Some("pay-key"),
        Some(r#"{"payment_ref":"p1","amount_cents":200}"#),
    );
    assert_eq!(pay.status, 200);
    let restock = api.call(
        "POST",
        "/v1/skus/a/restock",
        Some(&admin),
        Some("rs-key"),
        Some(r#"{"qty":10}"#),
    );
    assert_eq!(restock.status, 200);
    server.kill();
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let after = api.order(&ann, &[("a", 2)], Some("key-1"));
    assert_eq!(
        (after.status, after.body),
        (201, first.body),
        "replayed after a kill"
    );
    let pay_again = api.call(
        "POST",
        &format!("/v1/orders/{oid}/pay"),
        Some(&admin),
        Some("pay-key"),
        Some(r#"{"payment_ref":"p1","amount_cents":200}"#),
    );
    assert_eq!((pay_again.status, pay_again.body), (200, pay.body));
    let restock_again = api.call(
        "POST",
        "/v1/skus/a/restock",
        Some(&admin),
        Some("rs-key"),
        Some(r#"{"qty":10}"#),
    );
    assert_eq!(
        (restock_again.status, restock_again.body),
        (200, restock.body),
        "the first answer, not a second restock"
    );
    assert_eq!(api.sku("a")["on_hand"], 1_010);
    assert_eq!(
        api.order(&ann, &[("a", 9)], Some("key-1")).code(),
        "idempotency_conflict"
    );
    let placed_again = api.order(&ann, &[("scarce", 2)], Some("key-2"));
    assert_eq!(
        (placed_again.status, placed_again.body),
        (201, decided_again.body),
        "the change made on the retry is kept across a kill"
    );
    assert_eq!(
        api.sku("scarce")["reserved"],
        4,
        "key-2, key-3 and key-4 placed once each"
    );
}

#[test]
fn a_flash_sale_of_a_thousand_buyers_sells_exactly_the_hundred_units() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    api.create_sku("drop", 9_900, 100, Some(1));
    let addr = server.addr;
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..1_000)
            .map(|i| server.customer(&format!("buyer-{i}")))
            .collect(),
    );
    let barrier = Arc::new(std::sync::Barrier::new(50));
    let threads: Vec<_> = (0..50)
        .map(|t| {
            let (tokens, barrier) = (Arc::clone(&tokens), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                barrier.wait();
                let mut outcomes = Vec::new();
                for i in (t..1_000).step_by(50) {
                    let h = [
                        ("Content-Type", "application/json"),
                        ("Authorization", &format!("Bearer {}", tokens[i])),
                    ];
                    let r = client.send(
                        "POST",
                        "/v1/orders",
                        &h,
                        Some(r#"{"items":[{"sku_id":"drop","qty":1}]}"#),
                    );
                    let id = if r.status == 201 {
                        r.json()["order_id"].as_str().map(str::to_string)
                    } else {
                        None
                    };
                    outcomes.push((
                        r.status,
                        if r.status == 201 {
                            String::new()
                        } else {
                            r.code()
                        },
                        id,
                    ));
                }
                outcomes
            })
        })
        .collect();
    let outcomes: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    let granted: Vec<String> = outcomes.iter().filter_map(|o| o.2.clone()).collect();
    assert_eq!(granted.len(), 100, "exactly the stock was sold");
    assert!(
        outcomes
            .iter()
            .all(|(status, code, _)| *status == 201 || (*status == 409 && code == "out_of_stock"))
    );
    let sku = api.sku("drop");
    assert_eq!(
        (
            sku["available"].clone(),
            sku["reserved"].clone(),
            sku["on_hand"].clone()
        ),
        (0.into(), 100.into(), 100.into())
    );
    let admin = server.admin();
    for id in &granted {
        let r = api.call("GET", &format!("/v1/orders/{id}"), Some(&admin), None, None);
        assert_eq!(
            (r.status, r.json()["status"].clone()),
            (200, "reserved".into())
        );
    }
}

#[test]
fn hostile_clients_are_cut_off_and_others_still_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    // A request head over 16 KiB: 431 (or a closed connection).
    let mut c = server.client();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    c.write_raw(big.as_bytes()).expect("write");
    match c.read_response() {
        Ok(r) => assert_eq!(r.status, 431),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        ),
    }
    // Pipelining: two requests in one write, two answers in order.
    let mut c = server.client();
    c.write_raw(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/nothing HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("write");
    assert_eq!(c.read_response().expect("first").status, 200);
    assert_eq!(c.read_response().expect("second").status, 404);
    // Keep-alive: many requests on one connection.
    for _ in 0..20 {
        assert_eq!(c.send("GET", "/healthz", &[], None).status, 200);
    }
    // Slow clients: many connections that never finish their head are
    // closed after about 10 s, while a normal client is served meanwhile.
    let started = Instant::now();
    let mut slow: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
            std::io::Write::write_all(&mut s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .expect("partial head");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s
        })
        .collect();
    // More than the 128 in-flight slots send a whole order head and then
    // trickle its body: a body is read before its request takes a slot, so
    // they hold none, and one user holds at most its share of the body
    // reads (the rest are shed at once); others are served, and each body
    // that got a place is cut with a 408 (`tests/hostile.rs` has the rest).
    let mut api = Api::new(&server);
    api.create_sku("hat", 100, 10, None);
    let buyer = server.customer("buyer");
    let mut trickling: Vec<std::net::TcpStream> = (0..200)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(server.addr).expect("connect");
            let head = format!(
                "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {buyer}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
            );
            std::io::Write::write_all(&mut s, head.as_bytes()).expect("head and a byte");
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            s
        })
        .collect();
    let mut fresh = server.client();
    assert_eq!(
        fresh.send("GET", "/healthz", &[], None).status,
        200,
        "served despite 200 stalled clients"
    );
    let shopper = server.customer("shopper");
    let order = api.order(&shopper, &[("hat", 1)], None);
    assert_eq!(
        order.status,
        201,
        "an order is served despite 200 trickling bodies: {}",
        body_str(&order)
    );
    let mut buf = [0u8; 64];
    let read = trickling[0].read(&mut buf);
    assert!(
        matches!(read, Ok(n) if buf[..n].starts_with(b"HTTP/1.1 408")),
        "a trickled body is answered 408: {read:?} {:?}",
        String::from_utf8_lossy(&buf)
    );
    trickling.clear();
    let mut buf = [0u8; 64];
    let read = slow[0].read(&mut buf);
    let waited = started.elapsed();
    assert!(
        matches!(read, Ok(0) | Err(_)) || buf.starts_with(b"HTTP/1.1 408"),
        "the stalled connection was closed"
    );
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(15),
        "closed after about 10 s, took {waited:?}"
    );
    slow.clear();
    // An idle keep-alive connection is closed too.
    let idle_started = Instant::now();
    let mut idle = server.client();
    assert_eq!(idle.send("GET", "/healthz", &[], None).status, 200);
    assert!(idle.read_response().is_err(), "closed while idle");
    assert!(idle_started.elapsed() < Duration::from_secs(15));
}

#[test]
fn load_is_shed_with_a_fast_503_and_accepted_orders_are_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &["--max-in-flight", "2"]);
    let mut api = Api::new(&server);
    api.create_sku("hot", 100, 1_000_000, None);
    let addr = server.addr;
    let tokens: Arc<Vec<String>> =
        Arc::new((0..64).map(|i| server.customer(&format!("u{i}"))).collect());
    let threads: Vec<_> = (0..64)
        .map(|t| {
            let tokens = Arc::clone(&tokens);
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                let (mut placed, mut shed) = (0u64, 0u64);
                for _ in 0..50 {
                    let h = [
                        ("Content-Type", "application/json"),
                        ("Authorization", &format!("Bearer {}", tokens[t])),
                    ];
                    let r = client.send(
                        "POST",
                        "/v1/orders",
                        &h,
                        Some(r#"{"items":[{"sku_id":"hot","qty":1}]}"#),
                    );
                    match r.status {
                        201 => placed += 1,
                        503 => {
                            assert_eq!(r.code(), "overloaded");
                            assert_eq!(r.header("retry-after"), Some("1"));
                            shed += 1;
                        }
                        other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
                    }
                }
                (placed, shed)
            })
        })
        .collect();
    let (mut placed, mut shed) = (0, 0);
    for t in threads {
        let (p, s) = t.join().expect("thread");
        placed += p;
        shed += s;
    }
    assert!(shed > 0, "64 clients against 2 slots: some are shed");
    assert!(placed > 0);
    assert_eq!(
        api.sku("hot")["reserved"],
        placed,
        "every accepted order holds its unit"
    );
}

#[test]
fn sigterm_finishes_in_flight_work_and_exits_zero() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// What a request got.
    #[derive(Debug)]
    enum Got {
        /// A whole answer: status and body.
        Answer(u16, Vec<u8>),
        /// Nothing at all: the connection was closed or refused first.
        Nothing(String),
        /// Part of an answer, then the connection went: never allowed.
        Torn(Vec<u8>),
    }

    /// Sends one order on `stream` and reads the whole answer.
    fn order(stream: &mut std::net::TcpStream, token: &str) -> Got {
        let body = r#"{"items":[{"sku_id":"a","qty":1}]}"#;
        let request = format!(
            "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        if let Err(e) = stream.write_all(request.as_bytes()) {
            return Got::Nothing(format!("write: {e}"));
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok());
                if let Some(length) = length
                    && got.len() >= end + 4 + length
                {
                    let status = head
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    return Got::Answer(status, got[end + 4..end + 4 + length].to_vec());
                }
            }
            match stream.read(&mut buf) {
                Ok(0) if got.is_empty() => return Got::Nothing("closed".into()),
                Ok(0) => return Got::Torn(got),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if got.is_empty() => return Got::Nothing(format!("read: {e}")),
                Err(_) => return Got::Torn(got),
            }
        }
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    api.create_sku("a", 100, 1_000_000, None);
    let addr = server.addr;
    let tokens: Arc<Vec<String>> =
        Arc::new((0..24).map(|i| server.customer(&format!("u{i}"))).collect());
    let answered = Arc::new(AtomicUsize::new(0));
    let signalled = Arc::new(AtomicBool::new(false));
    // 24 buyers order as fast as they can, each on its own connection
    // (a new one when the server closes it), until the server is gone.
    let buyers: Vec<_> = (0..24)
        .map(|t| {
            let (tokens, answered, signalled) = (
                Arc::clone(&tokens),
                Arc::clone(&answered),
                Arc::clone(&signalled),
            );
            std::thread::spawn(move || {
                let mut outcomes: Vec<(bool, bool, Got)> = Vec::new();
                let mut stream: Option<std::net::TcpStream> = None;
                for _ in 0..5_000 {
                    let s = match stream.as_mut() {
                        Some(s) => s,
                        None => match std::net::TcpStream::connect(addr) {
                            Ok(s) => {
                                s.set_read_timeout(Some(Duration::from_secs(30)))
                                    .expect("timeout");
                                stream.insert(s)
                            }
                            Err(e) => {
                                let after = signalled.load(Ordering::SeqCst);
                                assert!(after, "refused before SIGTERM: {e}");
                                break;
                            }
                        },
                    };
                    let sent_after = signalled.load(Ordering::SeqCst);
                    let got = order(s, &tokens[t]);
                    let known_after = signalled.load(Ordering::SeqCst);
                    if let Got::Answer(..) = got {
                        answered.fetch_add(1, Ordering::SeqCst);
                    } else {
                        stream = None;
                    }
                    outcomes.push((sent_after, known_after, got));
                }
                outcomes
            })
        })
        .collect();
    // SIGTERM in the middle of the load.
    let waited = Instant::now();
    while answered.load(Ordering::SeqCst) < 300 {
        assert!(waited.elapsed() < Duration::from_secs(30), "no load");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before_signal = answered.load(Ordering::SeqCst);
    // Set before the signal: a request sent while it was false was on its
    // way (or being handled) when SIGTERM came.
    signalled.store(true, Ordering::SeqCst);
    let status = server.terminate();

    let mut placed: Vec<String> = Vec::new();
    // Requests sent before SIGTERM and answered after it.
    let mut across_signal = 0;
    for buyer in buyers {
        for (sent_after, known_after, got) in buyer.join().expect("buyer") {
            let across = usize::from(!sent_after && known_after);
            match got {
                Got::Answer(201, body) => {
                    let order: Value = serde_json::from_slice(&body).expect("JSON");
                    placed.push(order["order_id"].as_str().expect("id").to_string());
                    across_signal += across;
                }
                Got::Answer(503, body) => {
                    let e: Value = serde_json::from_slice(&body).expect("JSON");
                    assert!(e["error"]["code"].is_string(), "a clean 503");
                    across_signal += across;
                }
                Got::Answer(other, body) => {
                    panic!("unexpected {other}: {}", String::from_utf8_lossy(&body))
                }
                Got::Nothing(why) => assert!(
                    sent_after && known_after,
                    "a request sent before SIGTERM got no answer: {why}"
                ),
                Got::Torn(part) => panic!(
                    "an answer cut short by the shutdown: {:?}",
                    String::from_utf8_lossy(&part)
                ),
            }
        }
    }
    assert!(
        across_signal > 0,
        "requests were in flight when SIGTERM came ({before_signal} answered before it)"
    );
    assert!(status.success(), "exit status {status}:\n{}", server.log());
    assert!(server.log().contains("stopped"));
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let admin = server.admin();
    for id in &placed {
        let r = api.call("GET", &format!("/v1/orders/{id}"), Some(&admin), None, None);
        assert_eq!(
            (r.status, r.json()["status"].clone()),
            (200, "reserved".into()),
            "acknowledged order {id} is there after the restart"
        );
    }
    let reserved = api.sku("a")["reserved"].as_u64().expect("reserved");
    assert!(
        reserved >= placed.len() as u64,
        "{reserved} reserved, {} acknowledged",
        placed.len()
    );
}

#[test]
fn a_catalog_seed_cut_short_is_completed_on_the_next_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let catalog = dir.path().join("catalog.json");
    let write = |skus: &[&str]| {
        let skus: Vec<String> = skus
            .iter()
            .map(|s| format!(r#"{{"sku_id":"{s}","name":"{s}","price_cents":100,"stock":5}}"#))
            .collect();
        let promos = r#"[{"code":"P","threshold_cents":10,"off_cents":1}]"#;
        let text = format!(r#"{{"skus":[{}],"promotions":{promos}}}"#, skus.join(","));
        std::fs::write(&catalog, text).expect("write");
    };
    write(&["one", "two"]);
    let cat = catalog.display().to_string();
    let mut server = Server::start(&data, &["--catalog", &cat]);
    assert!(server.terminate().success());
    // As if the process died during a seed: the marker is still there.
    std::fs::write(data.join(".catalog-seeding"), b"").expect("marker");
    write(&["one", "two", "three"]);
    let server = Server::start(&data, &["--catalog", &cat]);
    let mut api = Api::new(&server);
    let list = api.call("GET", "/v1/skus", None, None, None).json();
    let ids: Vec<&str> = list["skus"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|s| s["sku_id"].as_str())
        .collect();
    assert_eq!(ids, ["one", "three", "two"]);
    assert!(!data.join(".catalog-seeding").exists());
    // Without the marker, a data dir with history ignores the catalog.
    drop(server);
    write(&["four"]);
    let server = Server::start(&data, &["--catalog", &cat]);
    let mut api = Api::new(&server);
    assert_eq!(
        api.call("GET", "/v1/skus/four", None, None, None).status,
        404
    );
}

/// Blocks until the server closes `stream` (EOF or reset) or `limit`
/// passes; returns when it closed.
fn wait_for_close(stream: &mut std::net::TcpStream, limit: Instant) -> Option<Instant> {
    let mut buf = [0u8; 512];
    loop {
        let left = limit.checked_duration_since(Instant::now())?;
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match stream.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return None;
            }
            Err(_) => return Some(Instant::now()),
        }
    }
}

#[test]
fn every_idle_connection_is_closed_10_s_after_opening_or_its_last_answer() {
    use std::io::Write;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let addr = server.addr;
    let started = Instant::now();

    // A keep-alive connection that asks once, then idles: closed about
    // 10 s after its answer.
    let idler = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(c.send("GET", "/healthz", &[], None).status, 200);
        let answered = Instant::now();
        let mut stream = c.into_stream();
        let closed = wait_for_close(&mut stream, answered + Duration::from_secs(15));
        closed.map(|at| at - answered)
    });
    // A keep-alive connection that asks every 2 s: never idle for 10 s,
    // so it stays open well past 10 s.
    let busy = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        let opened = Instant::now();
        let mut answered = 0;
        while opened.elapsed() < Duration::from_secs(14) {
            let r = c
                .try_send("GET", "/healthz", &[], None)
                .unwrap_or_else(|e| panic!("closed after {:?}: {e}", opened.elapsed()));
            assert_eq!(r.status, 200);
            answered += 1;
            std::thread::sleep(Duration::from_secs(2));
        }
        answered
    });

    // 520 connections that send nothing, 40 that send part of a head and
    // stop, 20 that send one byte.
    let mut hostile: Vec<(&str, std::net::TcpStream)> = Vec::new();
    for i in 0..580 {
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        let (what, bytes): (&str, &[u8]) = match i % 29 {
            0 => ("one byte", b"G"),
            1 | 2 => ("a partial head", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"),
            _ => ("nothing", b""),
        };
        s.write_all(bytes).expect("write");
        hostile.push((what, s));
    }
    let opened_all = Instant::now();
    assert!(
        opened_all - started < Duration::from_secs(5),
        "opening took {:?}",
        opened_all - started
    );
    // Others are served meanwhile.
    let mut fresh = server.client();
    assert_eq!(fresh.send("GET", "/healthz", &[], None).status, 200);
    drop(fresh);

    // Well before 10 s, none is closed; at 11 s after the last opened, all.
    std::thread::sleep(
        (started + Duration::from_secs(8)).saturating_duration_since(Instant::now()),
    );
    let early = hostile.iter().filter(|(_, s)| closed_by_server(s)).count();
    assert_eq!(early, 0, "closed before 8 s");
    std::thread::sleep(
        (opened_all + Duration::from_secs(11)).saturating_duration_since(Instant::now()),
    );
    let still_open: Vec<&str> = hostile
        .iter()
        .filter(|(_, s)| !closed_by_server(s))
        .map(|(what, _)| *what)
        .collect();
    assert!(
        still_open.is_empty(),
        "{} of {} idle connections still open 11 s after opening: {:?}",
        still_open.len(),
        hostile.len(),
        still_open.iter().take(5).collect::<Vec<_>>()
    );

    let idle_for = idler.join().expect("idler");
    let idle_for = idle_for.expect("the idle keep-alive connection was never closed");
    assert!(
        idle_for >= Duration::from_secs(9) && idle_for <= Duration::from_millis(11_500),
        "an idle keep-alive connection is closed about 10 s after its answer, not {idle_for:?}"
    );
    assert!(busy.join().expect("busy") >= 7, "asked every 2 s for 14 s");
}

/// Unix milliseconds now, and as the RFC 3339 text the server shows.
fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[test]
fn sale_windows_bound_new_orders_and_survive_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = Server::start(dir.path(), &[]);
    let admin = server.admin();
    let ann = server.customer("ann");
    let day_ms = 24 * 60 * 60 * 1000;
    let later = rfc3339(now_ms() + day_ms);
    let mut api = Api::new(&server);

    // Validation: a bad time or an end not after the start is a 400 and
    // creates nothing.
    for (what, window) in [
        (
            "end before start",
            format!(
                r#""sale_starts_at":"{later}","sale_ends_at":"{}""#,
                rfc3339(now_ms())
            ),
        ),
        (
            "end equals start",
            format!(r#""sale_starts_at":"{later}","sale_ends_at":"{later}""#),
        ),
        ("not a time", r#""sale_starts_at":"tomorrow""#.to_string()),
        (
            "not UTC",
            r#""sale_starts_at":"2030-01-01T00:00:00+02:00""#.to_string(),
        ),
        ("wrong type", r#""sale_ends_at":17"#.to_string()),
    ] {
        let body = format!(r#"{{"sku_id":"bad","name":"Bad","price_cents":1,"stock":1,{window}}}"#);
        let r = api.call("POST", "/v1/skus", Some(&admin), None, Some(&body));
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request".into()),
            "{what}: {}",
            body_str(&r)
        );
    }
    assert_eq!(
        api.call("GET", "/v1/skus/bad", None, None, None).status,
        404
    );

    // Before the start: orders and checkouts are refused, with the time.
    let body = format!(
        r#"{{"sku_id":"later","name":"Later","price_cents":100,"stock":5,"sale_starts_at":"{later}"}}"#
    );
    let r = api.call("POST", "/v1/skus", Some(&admin), None, Some(&body));
    assert_eq!(r.status, 201, "{}", body_str(&r));
    assert_eq!(r.json()["sale_starts_at"], later.as_str());
    assert_eq!(r.json()["sale_ends_at"], Value::Null);
    let r = api.order(&ann, &[("later", 1)], None);
    assert_eq!((r.status, r.code()), (409, "sale_not_started".into()));
    let message = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        message.contains(&later),
        "the message names the start: {message}"
    );
    api.create_sku("tee", 100, 5, None);
    let r = api.order(&ann, &[("tee", 1), ("later", 1)], None);
    assert_eq!(r.code(), "sale_not_started", "a multi-line order too");
    let r = api.call(
        "PUT",
        "/v1/cart/items/later",
        Some(&ann),
        None,
        Some(r#"{"qty":1}"#),
    );
    assert_eq!(r.status, 200, "a cart may hold it early");
    let r = api.call("POST", "/v1/cart/checkout", Some(&ann), None, None);
    assert_eq!((r.status, r.code()), (409, "sale_not_started".into()));
    assert_eq!(api.sku("later")["available"], 5);
    assert_eq!(api.sku("tee")["available"], 5, "nothing held");

    // A short window: closed, open, then ended; placed orders go on after.
    let (start, end) = (now_ms() + 1_500, now_ms() + 3_500);
    let body = format!(
        r#"{{"sku_id":"soon","name":"Soon","price_cents":100,"stock":5,"sale_starts_at":"{}","sale_ends_at":"{}"}}"#,
        rfc3339(start),
        rfc3339(end)
    );
    let r = api.call("POST", "/v1/skus", Some(&admin), None, Some(&body));
    assert_eq!(r.status, 201, "{}", body_str(&r));
    assert_eq!(
        api.order(&ann, &[("soon", 1)], None).code(),
        "sale_not_started"
    );
    std::thread::sleep(Duration::from_millis(start.saturating_sub(now_ms()) + 50));
    let placed = api.order(&ann, &[("soon", 2)], None);
    assert_eq!(placed.status, 201, "{}", body_str(&placed));
    let other = api.order(&ann, &[("soon", 1)], None);
    assert_eq!(other.status, 201, "{}", body_str(&other));
    std::thread::sleep(Duration::from_millis(end.saturating_sub(now_ms()) + 50));
    let r = api.order(&ann, &[("soon", 1)], None);
    assert_eq!(
        (r.status, r.code()),
        (409, "sale_ended".into()),
        "{}",
        body_str(&r)
    );
    let id = placed.json()["order_id"].as_str().expect("id").to_string();
    let total = placed.json()["total_cents"].as_u64().expect("total");
    let pay = format!(r#"{{"payment_ref":"p-soon","amount_cents":{total}}}"#);
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/pay"),
        Some(&admin),
        None,
        Some(&pay),
    );
    assert_eq!(r.status, 200, "paid after the end: {}", body_str(&r));
    let r = api.call(
        "POST",
        &format!("/v1/orders/{id}/ship"),
        Some(&admin),
        None,
        None,
    );
    assert_eq!(r.status, 200, "shipped after the end: {}", body_str(&r));
    let other_id = other.json()["order_id"].as_str().expect("id").to_string();
    let r = api.call(
        "POST",
        &format!("/v1/orders/{other_id}/cancel"),
        Some(&ann),
        None,
        None,
    );
    assert_eq!(r.status, 200, "cancelled after the end: {}", body_str(&r));

    // PATCH: a bad window changes nothing; null clears.
    let r = api.call(
        "PATCH",
        "/v1/skus/soon",
        Some(&admin),
        None,
        Some(&format!(r#"{{"sale_starts_at":"{}"}}"#, rfc3339(end + 1))),
    );
    assert_eq!((r.status, r.code()), (400, "invalid_request".into()));
    assert_eq!(api.sku("soon")["sale_starts_at"], rfc3339(start).as_str());
    let r = api.call(
        "PATCH",
        "/v1/skus/soon",
        Some(&admin),
        None,
        Some(r#"{"sale_ends_at":null}"#),
    );
    assert_eq!(r.status, 200, "{}", body_str(&r));
    assert_eq!(r.json()["sale_ends_at"], Value::Null);
    assert_eq!(
        api.order(&ann, &[("soon", 1)], None).status,
        201,
        "on sale again"
    );
    let ends = rfc3339(now_ms() + 2 * day_ms);
    let r = api.call(
        "PATCH",
        "/v1/skus/tee",
        Some(&admin),
        None,
        Some(&format!(
            r#"{{"sale_starts_at":"{later}","sale_ends_at":"{ends}"}}"#
        )),
    );
    assert_eq!(r.status, 200, "{}", body_str(&r));
    assert_eq!(
        api.order(&ann, &[("tee", 1)], None).code(),
        "sale_not_started"
    );

    // Across a clean stop (a snapshot) and a SIGKILL (the journal).
    drop(api);
    assert!(server.terminate().success());
    let mut server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    assert_eq!(api.sku("later")["sale_starts_at"], later.as_str());
    assert_eq!(api.sku("tee")["sale_ends_at"], ends.as_str());
    assert_eq!(api.sku("soon")["sale_ends_at"], Value::Null);
    assert_eq!(
        api.order(&ann, &[("later", 1)], None).code(),
        "sale_not_started"
    );
    let r = api.call(
        "PATCH",
        "/v1/skus/later",
        Some(&admin),
        None,
        Some(r#"{"sale_starts_at":null}"#),
    );
    assert_eq!(r.status, 200, "{}", body_str(&r));
    drop(api);
    server.kill();
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    assert_eq!(api.sku("later")["sale_starts_at"], Value::Null);
    assert_eq!(api.sku("tee")["sale_starts_at"], later.as_str());
    assert_eq!(
        api.order(&ann, &[("later", 1)], None).status,
        201,
        "cleared before the kill"
    );
    assert_eq!(
        api.order(&ann, &[("tee", 1)], None).code(),
        "sale_not_started"
    );
}

#[test]
fn the_sku_listing_is_paged_in_id_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    for id in ["e", "a", "c", "b", "d"] {
        assert_eq!(api.create_sku(id, 1, 1, None).status, 201);
    }
    let mut page = |query: &str| {
        let r = api.call("GET", &format!("/v1/skus{query}"), None, None, None);
        assert_eq!(r.status, 200, "{query}: {}", body_str(&r));
        let json = r.json();
        let ids: Vec<String> = json["skus"]
            .as_array()
            .expect("skus")
            .iter()
            .map(|s| s["sku_id"].as_str().expect("id").to_string())
            .collect();
        (ids, json["next"].clone())
    };
    assert_eq!(
        page(""),
        (
            vec!["a", "b", "c", "d", "e"]
                .into_iter()
                .map(String::from)
                .collect(),
            Value::Null
        )
    );
    assert_eq!(
        page("?limit=2"),
        (vec!["a".into(), "b".into()], Value::from("b"))
    );
    assert_eq!(
        page("?limit=2&after=b"),
        (vec!["c".into(), "d".into()], Value::from("d"))
    );
    assert_eq!(page("?after=d&limit=2"), (vec!["e".into()], Value::Null));
    assert_eq!(
        page("?limit=5"),
        (
            vec!["a", "b", "c", "d", "e"]
                .into_iter()
                .map(String::from)
                .collect(),
            Value::Null
        )
    );
    assert_eq!(page("?limit=4").1, Value::from("d"));
    // `after` need not exist: it is a bound.
    assert_eq!(
        page("?after=bb&limit=1"),
        (vec!["c".into()], Value::from("c"))
    );
    assert_eq!(page("?after=e"), (Vec::new(), Value::Null));
    assert_eq!(page("?limit=1000").0.len(), 5);
    for query in [
        "?limit=0",
        "?limit=1001",
        "?limit=x",
        "?limit=-1",
        "?after=a%20b",
        "?page=2",
    ] {
        let r = api.call("GET", &format!("/v1/skus{query}"), None, None, None);
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_request".into()),
            "{query}"
        );
    }
}

#[test]
fn the_openapi_document_is_served_and_names_every_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let r = api.call("GET", "/openapi.json", None, None, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc = r.json();
    flashcore::http::openapi::check(&doc).expect("valid OpenAPI 3.1");
    for route in flashcore::http::openapi::documented_routes() {
        let method = route.method.as_str().to_ascii_lowercase();
        assert!(
            doc["paths"][route.path][&method].is_object(),
            "{method} {}",
            route.path
        );
    }
    // Every route of the table is served: none answers "no route" (the
    // event stream never ends by itself; tests/dashboard.rs reads it).
    for route in flashcore::http::openapi::documented_routes() {
        if route.path == "/v1/stream" {
            continue;
        }
        let path = route
            .path
            .replace("{sku_id}", "nope")
            .replace("{order_id}", "999");
        let r = api.call(route.method.as_str(), &path, None, None, None);
        let answer = body_str(&r);
        assert!(
            !answer.contains("no route for"),
            "{} {path}: {answer}",
            route.method
        );
    }
}

#[test]
fn rate_limits_bound_each_user_and_address_but_never_admins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::launch(
        dir.path(),
        &[],
        &[("FLASHCORE_RATE_LIMIT", "5/s")],
        true,
        Duration::from_secs(60),
    )
    .expect("starts");
    let admin = server.admin();
    let ann = server.customer("ann");
    let bob = server.customer("bob");
    let mut api = Api::new(&server);
    // The admin is never limited: setup and a burst of 40.
    assert_eq!(api.create_sku("gone", 100, 0, None).status, 201);
    assert_eq!(api.create_sku("tee", 100, 5, None).status, 201);
    for _ in 0..40 {
        let r = api.call("GET", "/v1/orders", Some(&admin), None, None);
        assert_eq!(r.status, 200, "an admin is never limited");
    }

    // Ann bursts: some answers are 429 with Retry-After and the error body.
    let mut limited = 0;
    for _ in 0..20 {
        let r = api.call("GET", "/v1/cart", Some(&ann), None, None);
        match r.status {
            200 => {}
            429 => {
                limited += 1;
                assert_eq!(r.code(), "rate_limited");
                let retry: u64 = r
                    .header("retry-after")
                    .and_then(|v| v.parse().ok())
                    .expect("Retry-After in whole seconds");
                assert!(retry >= 1, "{retry}");
            }
            other => panic!("unexpected {other}: {}", body_str(&r)),
        }
    }
    assert!(
        limited >= 10,
        "a burst of 20 at 5/s is mostly refused: {limited}"
    );
    // A refused order changes nothing.
    let r = api.order(&ann, &[("tee", 1)], None);
    assert_eq!(r.code(), "rate_limited");
    // ... and is refused before its body is read: a body that never comes
    // does not delay the answer.
    let mut raw = server.client();
    let head = format!(
        "POST /v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ann}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    );
    let asked = Instant::now();
    raw.write_raw(head.as_bytes()).expect("sent");
    let r = raw.read_response().expect("answered");
    assert_eq!(r.status, 429);
    assert!(asked.elapsed() < Duration::from_secs(5), "answered at once");
    drop(raw);

    // Bob is still served while Ann is limited.
    let r = api.call("GET", "/v1/cart", Some(&bob), None, None);
    assert_eq!(r.status, 200);
    let r = api.order(&bob, &[("gone", 1)], None);
    assert_eq!((r.status, r.code()), (409, "out_of_stock".into()));
    assert_eq!(api.sku("tee")["available"], 5, "nothing held by a 429");

    // Without a token, the client address pays; a token's user does not.
    let mut anonymous_limited = 0;
    for _ in 0..20 {
        let r = api.call("GET", "/v1/skus/tee", None, None, None);
        if r.status == 429 {
            anonymous_limited += 1;
            assert_eq!(r.code(), "rate_limited");
        }
    }
    assert!(anonymous_limited >= 10, "{anonymous_limited}");
    let r = api.call("GET", "/v1/cart", Some(&bob), None, None);
    assert_eq!(r.status, 200, "Bob's bucket is his own");
    // Routes outside /v1 are not limited.
    for _ in 0..20 {
        assert_eq!(api.call("GET", "/healthz", None, None, None).status, 200);
    }
    // A bucket refills: after a second Ann is served again.
    std::thread::sleep(Duration::from_millis(1_100));
    assert_eq!(
        api.call("GET", "/v1/cart", Some(&ann), None, None).status,
        200
    );
    drop(api);
    drop(server);

    // Off by default: no 429, ever.
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let ann = server.customer("ann");
    let mut api = Api::new(&server);
    for _ in 0..60 {
        assert_eq!(
            api.call("GET", "/v1/cart", Some(&ann), None, None).status,
            200
        );
        assert_eq!(api.call("GET", "/v1/skus", None, None, None).status, 200);
    }
}

/// The methods the document gives `path`, upper case, with `HEAD` beside
/// `GET` (axum answers `HEAD` on a `GET` route, as RFC 9110 asks).
fn documented_methods(doc: &Value, path: &str) -> HashSet<String> {
    let mut methods = HashSet::new();
    for method in doc["paths"][path].as_object().expect("a path").keys() {
        let method = method.to_ascii_uppercase();
        if method == "GET" {
            methods.insert("HEAD".to_string());
        }
        methods.insert(method);
    }
    methods
}

fn concrete(path: &str) -> String {
    path.replace("{sku_id}", "nope")
        .replace("{order_id}", "999")
}

#[test]
fn a_known_path_answers_a_method_it_does_not_take_with_405_and_allow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let admin = server.admin();
    let doc = api.call("GET", "/openapi.json", None, None, None).json();
    let paths: Vec<String> = doc["paths"]
        .as_object()
        .expect("paths")
        .keys()
        .cloned()
        .collect();
    // The document and the route table are one list (and the router is
    // built from the table): every path of the table is documented.
    let table: HashSet<String> = flashcore::http::openapi::documented_routes()
        .iter()
        .map(|r| r.path.to_string())
        .collect();
    assert_eq!(table, paths.iter().cloned().collect::<HashSet<_>>());
    // HEAD is left out below: its answer has no body to read.
    let all = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"];
    let mut wrong = 0;
    for path in &paths {
        let allowed = documented_methods(&doc, path);
        for method in all {
            if allowed.contains(method) {
                continue;
            }
            // With a token and without: 405 comes before admission.
            for token in [None, Some(admin.as_str())] {
                let r = api.call(method, &concrete(path), token, None, None);
                assert_eq!(
                    (r.status, r.code()),
                    (405, "method_not_allowed".to_string()),
                    "{method} {path}: {}",
                    body_str(&r)
                );
                let allow: HashSet<String> = r
                    .header("allow")
                    .unwrap_or_else(|| panic!("{method} {path}: no Allow"))
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .collect();
                assert_eq!(allow, allowed, "{method} {path}: Allow lists what it takes");
                wrong += 1;
            }
        }
    }
    assert!(wrong > 100, "{wrong} wrong methods tried");
    // HEAD on a GET route is a GET without the body; on a POST-only path
    // it is a 405 (checked by status, the answer has no body).
    let mut raw = server.client();
    raw.write_raw(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut head = String::new();
    raw.into_stream().read_to_string(&mut head).expect("read");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.contains("\"status\""), "no body: {head}");
    let mut raw = server.client();
    raw.write_raw(b"HEAD /v1/skus/x/restock HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut head = String::new();
    raw.into_stream().read_to_string(&mut head).expect("read");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert!(head.to_ascii_lowercase().contains("allow: post"), "{head}");
    // An unknown path is still a 404, with no Allow.
    for (method, path) in [
        ("GET", "/v1/nothing"),
        ("DELETE", "/v1/skus/a/b/c"),
        ("POST", "/v1/orders/1/nothing"),
    ] {
        let r = api.call(method, path, None, None, None);
        assert_eq!(
            (r.status, r.code()),
            (404, "not_found".to_string()),
            "{method} {path}"
        );
        assert_eq!(r.header("allow"), None);
    }
}

/// The schema of a component's property.
fn property<'a>(doc: &'a Value, schema: &str, field: &str) -> &'a Value {
    &doc["components"]["schemas"][schema]["properties"][field]
}

/// The bounds of a numeric schema, as u64.
fn range(schema: &Value) -> (Option<u64>, Option<u64>) {
    (schema["minimum"].as_u64(), schema["maximum"].as_u64())
}

#[test]
fn the_document_carries_the_contracts_bounds_statuses_and_links_and_the_server_agrees() {
    use flashcore::limits::*;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(dir.path(), &[]);
    let mut api = Api::new(&server);
    let admin = server.admin();
    let doc = api.call("GET", "/openapi.json", None, None, None).json();
    let id = "^[A-Za-z0-9_.-]{1,64}$";
    for (schema, field) in [
        ("NewSkuBody", "sku_id"),
        ("OrderLine", "sku_id"),
        ("LineBody", "sku_id"),
        ("PromotionBody", "code"),
        ("PayBody", "payment_ref"),
        ("PlaceOrderBody", "promo_code"),
        ("CheckoutBody", "promo_code"),
    ] {
        let s = property(&doc, schema, field);
        if schema == "OrderLine" {
            continue; // an answer, not a request
        }
        assert_eq!(s["pattern"], id, "{schema}.{field}");
        assert_eq!(s["maxLength"], ID_BYTES_MAX, "{schema}.{field}");
        assert_eq!(s["minLength"], 1, "{schema}.{field}");
    }
    let name = property(&doc, "NewSkuBody", "name");
    assert_eq!(
        (name["minLength"].as_u64(), name["maxLength"].as_u64()),
        (Some(1), Some(NAME_CHARS_MAX as u64))
    );
    assert_eq!(
        property(&doc, "PatchSkuBody", "name")["maxLength"],
        NAME_CHARS_MAX
    );
    let qty = u64::from(QTY_MAX);
    for (schema, field, low, high) in [
        ("NewSkuBody", "price_cents", 0, PRICE_CENTS_MAX),
        ("PatchSkuBody", "price_cents", 0, PRICE_CENTS_MAX),
        ("NewSkuBody", "stock", 0, STOCK_MAX),
        (
            "NewSkuBody",
            "per_user_limit",
            1,
            u64::from(PER_USER_LIMIT_MAX),
        ),
        (
            "PatchSkuBody",
            "per_user_limit",
            1,
            u64::from(PER_USER_LIMIT_MAX),
        ),
        ("NewSkuBody", "buckets", 1, u64::from(BUCKETS_MAX)),
        ("RestockBody", "qty", 1, RESTOCK_QTY_MAX),
        ("LineBody", "qty", 1, qty),
        ("CartItemBody", "qty", 0, qty),
        ("PromotionBody", "threshold_cents", 0, PROMO_CENTS_MAX),
        ("PromotionBody", "off_cents", 1, PROMO_CENTS_MAX),
        ("PayBody", "amount_cents", 0, u64::MAX),
    ] {
        let s = property(&doc, schema, field);
        assert_eq!(range(s), (Some(low), Some(high)), "{schema}.{field}: {s}");
    }
    for (schema, field) in [("PlaceOrderBody", "items"), ("RefundBody", "lines")] {
        let s = property(&doc, schema, field);
        assert_eq!(
            (s["minItems"].as_u64(), s["maxItems"].as_u64()),
            (Some(1), Some(LINES_MAX as u64)),
            "{schema}.{field}"
        );
    }
    assert_eq!(
        doc["components"]["schemas"]["PatchSkuBody"]["minProperties"],
        1
    );
    let ops = |path: &str, method: &str| doc["paths"][path][method].clone();
    let param = |op: &Value, name: &str| -> Value {
        op["parameters"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or(Value::Null)
    };
    let skus = ops("/v1/skus", "get");
    assert_eq!(
        range(&param(&skus, "limit")["schema"]),
        (Some(1), Some(SKUS_PAGE_MAX as u64))
    );
    assert_eq!(param(&skus, "after")["schema"]["pattern"], id);
    let orders = ops("/v1/orders", "get");
    assert_eq!(
        range(&param(&orders, "limit")["schema"]),
        (Some(1), Some(ORDERS_LIST_MAX as u64))
    );
    assert_eq!(param(&orders, "user_id")["schema"]["pattern"], id);
    assert_eq!(
        param(&ops("/v1/skus/{sku_id}", "get"), "sku_id")["schema"]["pattern"],
        id
    );
    let key = param(&ops("/v1/orders", "post"), "Idempotency-Key")["schema"].clone();
    assert_eq!(
        (key["minLength"].as_u64(), key["maxLength"].as_u64()),
        (Some(1), Some(IDEMPOTENCY_KEY_BYTES_MAX as u64))
    );

    // Statuses, security, Retry-After, per route.
    for route in flashcore::http::openapi::documented_routes() {
        let method = route.method.as_str().to_ascii_lowercase();
        let op = ops(route.path, &method);
        let what = format!("{method} {}", route.path);
        let statuses: HashSet<String> = op["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .cloned()
            .collect();
        assert!(statuses.contains(&route.status.to_string()), "{what}");
        assert!(statuses.contains("503"), "{what}");
        for status in ["429", "503"] {
            if statuses.contains(status) {
                assert!(
                    op["responses"][status]["headers"]["Retry-After"].is_object(),
                    "{what} {status}"
                );
            }
        }
        match route.access {
            flashcore::http::routes::Access::Public => {
                assert_eq!(op["security"], serde_json::json!([]), "{what}");
                assert!(!statuses.contains("401"), "{what}");
            }
            access => {
                assert_eq!(op["security"][0]["bearer"], serde_json::json!([]), "{what}");
                assert!(statuses.contains("401"), "{what}");
                if access == flashcore::http::routes::Access::Admin {
                    assert!(statuses.contains("403"), "{what}");
                    assert!(
                        op["description"]
                            .as_str()
                            .is_some_and(|d| d.contains("Admin only")),
                        "{what}"
                    );
                }
            }
        }
        if route.path.contains('{') {
            assert!(statuses.contains("404"), "{what}");
        }
        if route.idempotent {
            assert!(statuses.contains("422"), "{what}");
        }
    }
    for (path, method, status) in [
        ("/v1/orders", "post", "404"),
        ("/v1/orders", "post", "409"),
        ("/v1/cart/checkout", "post", "409"),
        ("/v1/orders/{order_id}/pay", "post", "409"),
        ("/v1/orders", "get", "403"),
    ] {
        assert!(
            ops(path, method)["responses"][status].is_object(),
            "{method} {path} {status}"
        );
    }
    // Links: from what creates an order or a SKU to every route taking its id.
    let routes = flashcore::http::openapi::documented_routes();
    for (path, status, param) in [
        ("/v1/orders", "201", "order_id"),
        ("/v1/cart/checkout", "201", "order_id"),
        ("/v1/skus", "201", "sku_id"),
    ] {
        let links = ops(path, "post")["responses"][status]["links"].clone();
        let targets: HashSet<&str> = links
            .as_object()
            .unwrap_or_else(|| panic!("{path}: links"))
            .values()
            .filter_map(|l| l["operationId"].as_str())
            .collect();
        for target in routes
            .iter()
            .filter(|r| r.path.contains(&format!("{{{param}}}")))
        {
            let id = ops(target.path, &target.method.as_str().to_ascii_lowercase())["operationId"]
                .clone();
            assert!(
                targets.contains(id.as_str().expect("an id")),
                "{path} -> {id}"
            );
        }
    }

    // The server agrees at the edges the document gives.
    let sku = |extra: &str| {
        format!(r#"{{"sku_id":"edge","name":"Edge","price_cents":1,"stock":1{extra}}}"#)
    };
    let cases: Vec<(String, u16)> = vec![
        (sku(r#","buckets":0"#), 400),
        (sku(r#","buckets":65"#), 400),
        (sku(r#","buckets":null"#), 400),
        (
            sku(&format!(r#","price_cents":{}"#, PRICE_CENTS_MAX + 1))
                .replace(r#""price_cents":1,"#, ""),
            400,
        ),
        (
            sku(&format!(r#","stock":{}"#, STOCK_MAX + 1))
                .replace(r#""stock":1,"#, "")
                .replace(r#","stock":1"#, ""),
            400,
        ),
        (sku(r#","sale_starts_at":"2026-01-01T00:00:00+01:00""#), 400),
        (sku(r#","sale_starts_at":"2026-02-29T00:00:00Z""#), 400),
        (
            sku(r#","buckets":64,"sale_starts_at":"2028-02-29T00:00:00.5+00:00""#),
            201,
        ),
    ];
    for (body, status) in cases {
        let r = api.call("POST", "/v1/skus", Some(&admin), None, Some(&body));
        assert_eq!(r.status, status, "{body}: {}", body_str(&r));
    }
    // buckets is refused before anything changes: the id is still free.
    let r = api.call("GET", "/v1/skus/edge", None, None, None);
    assert_eq!(r.json()["sale_starts_at"], "2028-02-29T00:00:00.500Z");

    // GET /v1/cluster on a single node.
    let r = api.call("GET", "/v1/cluster", None, None, None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json(),
        serde_json::json!({"node_id": null, "partitions": 1})
    );
}
