//! The book check's reads, through the real HTTP client, against a fake
//! server that serves deliberately broken answers.

mod support;

use std::time::Duration;

use loadtest::books::{AckedOrder, AckedState, BookInput, Line, SkuExpect, check};
use loadtest::token::Minter;
use serde_json::json;
use support::{Fake, Fault, SECRET};

fn order(id: &str, user: &str, qty: u64) -> serde_json::Value {
    json!({
        "order_id": id, "user_id": user, "status": "reserved",
        "lines": [{ "sku_id": "hot", "name": "hot", "qty": qty, "unit_price_cents": 100,
                    "discount_cents": 0, "refunded_qty": 0 }],
        "subtotal_cents": 100 * qty, "discount_cents": 0, "total_cents": 100 * qty,
        "paid_cents": 0, "refunded_cents": 0, "promo_code": null, "payment_ref": null,
        "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T00:15:00Z", "history": [],
    })
}

fn acked(id: &str, user: &str, qty: u64) -> AckedOrder {
    AckedOrder {
        order_id: id.into(),
        user_id: user.into(),
        lines: vec![Line {
            sku_id: "hot".into(),
            qty,
        }],
        state: AckedState::Reserved,
        uncertain: false,
    }
}

fn admin() -> String {
    Minter::new(SECRET, Duration::from_secs(600))
        .unwrap()
        .admin("ops")
        .unwrap()
}

#[tokio::test]
async fn clean_answers_pass_and_each_broken_one_is_caught() {
    let fake = Fake::start(Fault::None).await;
    fake.insert_sku("hot", 10, 3);
    fake.insert_order(order("a", "buyer-1", 1));
    fake.insert_order(order("b", "buyer-2", 1));
    fake.insert_order(order("c", "buyer-3", 1));
    let timeout = Duration::from_secs(5);
    let base = BookInput {
        skus: vec![SkuExpect {
            sku_id: "hot".into(),
            stock_in: 10,
        }],
        acked: vec![
            acked("a", "buyer-1", 1),
            acked("b", "buyer-2", 1),
            acked("c", "buyer-3", 1),
        ],
        ..BookInput::default()
    };
    let clean = check(fake.addr, timeout, &admin(), &base, 4).await.unwrap();
    assert!(clean.ok, "{clean:?}");
    assert_eq!(clean.orders_checked, 3);

    // We were told 201 for an order the server does not have.
    let mut input = base.clone();
    input.acked.push(acked("ghost", "buyer-4", 1));
    let report = check(fake.addr, timeout, &admin(), &input, 4)
        .await
        .unwrap();
    assert!(!report.ok);
    assert!(report.acked_missing >= 1, "{report:?}");
    assert!(
        report
            .violations
            .iter()
            .any(|v| v.contains("ghost") && v.contains("404")),
        "{report:?}"
    );

    // We were told 2 units; the server says 1.
    let mut input = base.clone();
    input.acked[0].lines[0].qty = 2;
    let report = check(fake.addr, timeout, &admin(), &input, 4)
        .await
        .unwrap();
    assert!(!report.ok);
    assert!(report.acked_missing >= 1, "{report:?}");

    // The SKU was stocked with 2, yet 3 units are granted.
    let mut input = base.clone();
    input.skus[0].stock_in = 2;
    let report = check(fake.addr, timeout, &admin(), &input, 4)
        .await
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.oversold, 1, "{report:?}");
}

#[tokio::test]
async fn a_server_with_unbalanced_counters_is_caught() {
    let fake = Fake::start(Fault::Unbalanced).await;
    fake.insert_sku("hot", 10, 1);
    fake.insert_order(order("a", "buyer-1", 1));
    let input = BookInput {
        skus: vec![SkuExpect {
            sku_id: "hot".into(),
            stock_in: 10,
        }],
        acked: vec![acked("a", "buyer-1", 1)],
        ..BookInput::default()
    };
    let report = check(fake.addr, Duration::from_secs(5), &admin(), &input, 1)
        .await
        .unwrap();
    assert_eq!(report.sku_invariant, 1, "{report:?}");
    assert!(!report.ok);
}

#[tokio::test]
async fn a_server_that_does_not_answer_leaves_the_books_unverified() {
    // Bind, then drop: nothing listens there any more.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let input = BookInput {
        skus: vec![SkuExpect {
            sku_id: "hot".into(),
            stock_in: 10,
        }],
        acked: vec![acked("a", "buyer-1", 1)],
        ..BookInput::default()
    };
    let report = check(addr, Duration::from_millis(200), &admin(), &input, 1)
        .await
        .unwrap();
    assert!(!report.ok);
    assert_eq!(report.unverified, 2, "{report:?}");
}
