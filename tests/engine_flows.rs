//! The engine's order life cycle, in process: every state move, carts,
//! promotions, refunds, expiry, idempotency records and restarts from a
//! replayed journal.

mod support;

use std::sync::Arc;

use flashcore::domain::idem::{FirstAnswer, Lookup, Outcome};
use flashcore::domain::order::OrderStatus;
use flashcore::domain::promo::Promotion;
use flashcore::domain::{DomainError, IdemStamp, IdempotencyKey, PaymentRef, PromoCode, State};
use flashcore::engine::{Engine, EngineConfig, EngineError, OrderScope};
use flashcore::limits::RESERVATION_TTL_DEFAULT_MS;
use support::*;

fn pref(s: &str) -> PaymentRef {
    PaymentRef::parse(s).expect("valid payment ref")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_goes_from_reserved_to_delivered_and_moves_stock() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "tee", 2_500, 10, None).await;
    let order = e
        .place_order(user("ann"), &[line("tee", 3)], None, None)
        .await
        .expect("placed");
    assert_eq!(order.status, OrderStatus::Reserved);
    assert_eq!(
        (order.total_cents, order.lines[0].name.as_str()),
        (7_500, "Item tee")
    );
    let s = e.sku(sku("tee")).await.expect("sku");
    assert_eq!((s.levels.available, s.levels.reserved), (7, 3));

    let paid = e
        .pay(admin(), order.id, pref("p-1"), 7_500, None)
        .await
        .expect("paid");
    assert_eq!((paid.status, paid.paid_cents), (OrderStatus::Paid, 7_500));
    let s = e.sku(sku("tee")).await.expect("sku");
    assert_eq!((s.levels.reserved, s.levels.allocated), (0, 3));

    let shipped = e.ship(admin(), order.id).await.expect("shipped");
    assert_eq!(shipped.status, OrderStatus::Shipped);
    let s = e.sku(sku("tee")).await.expect("sku");
    assert_eq!(
        (s.levels.on_hand, s.levels.allocated, s.levels.shipped),
        (7, 0, 3)
    );

    let delivered = e.deliver(admin(), order.id).await.expect("delivered");
    let states: Vec<_> = delivered.history.iter().map(|h| h.status).collect();
    assert_eq!(
        states,
        [
            OrderStatus::Reserved,
            OrderStatus::Paid,
            OrderStatus::Shipped,
            OrderStatus::Delivered
        ]
    );
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn illegal_moves_and_strangers_change_nothing() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "mug", 900, 5, None).await;
    let order = e
        .place_order(user("ann"), &[line("mug", 1)], None, None)
        .await
        .expect("placed");
    let is_invalid = |r: Result<_, EngineError>| {
        matches!(
            r,
            Err(EngineError::Domain(DomainError::InvalidTransition { .. }))
        )
    };
    assert!(is_invalid(e.ship(admin(), order.id).await));
    assert!(is_invalid(e.deliver(admin(), order.id).await));
    assert!(matches!(
        e.cancel(customer("bob"), order.id).await,
        Err(EngineError::Forbidden(_))
    ));
    assert!(matches!(
        e.order(customer("bob"), order.id).await,
        Err(EngineError::Forbidden(_))
    ));
    assert!(matches!(
        e.pay(customer("ann"), order.id, pref("x"), 900, None).await,
        Err(EngineError::Forbidden(_))
    ));
    assert!(matches!(
        e.pay(admin(), order.id, pref("x"), 901, None).await,
        Err(EngineError::Domain(DomainError::PaymentMismatch { .. }))
    ));
    let unchanged = e.order(customer("ann"), order.id).await.expect("own order");
    assert_eq!(unchanged, order);
    let cancelled = e
        .cancel(customer("ann"), order.id)
        .await
        .expect("cancelled");
    assert_eq!(cancelled.status, OrderStatus::Cancelled);
    assert!(is_invalid(
        e.pay(admin(), order.id, pref("x"), 900, None).await
    ));
    assert!(is_invalid(e.cancel(admin(), order.id).await));
    let s = e.sku(sku("mug")).await.expect("sku");
    assert_eq!((s.levels.available, s.levels.reserved), (5, 0));
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_payment_callback_is_answered_with_the_order_unchanged() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "cap", 1_000, 5, None).await;
    let order = e
        .place_order(user("ann"), &[line("cap", 1)], None, None)
        .await
        .expect("placed");
    let first = e
        .pay(admin(), order.id, pref("pay-9"), 1_000, None)
        .await
        .expect("paid");
    let again = e
        .pay(admin(), order.id, pref("pay-9"), 1_000, None)
        .await
        .expect("repeat accepted");
    assert_eq!(first, again);
    assert!(matches!(
        e.pay(admin(), order.id, pref("pay-other"), 1_000, None)
            .await,
        Err(EngineError::Domain(DomainError::InvalidTransition { .. }))
    ));
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_line_order_takes_every_line_or_none() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 5, None).await;
    create(e, "b", 200, 1, None).await;
    let refused = e
        .place_order(user("ann"), &[line("a", 2), line("b", 2)], None, None)
        .await;
    assert!(matches!(
        refused,
        Err(EngineError::Domain(DomainError::OutOfStock { sku })) if sku.as_str() == "b"
    ));
    let a = e.sku(sku("a")).await.expect("sku");
    assert_eq!(
        (a.levels.available, a.levels.reserved),
        (5, 0),
        "line a was let go"
    );
    // Same SKU twice is merged into one line.
    let order = e
        .place_order(
            user("ann"),
            &[line("a", 1), line("b", 1), line("a", 2)],
            None,
            None,
        )
        .await
        .expect("placed");
    assert_eq!(order.lines.len(), 2);
    assert_eq!((order.lines[0].qty, order.lines[1].qty), (3, 1));
    assert!(matches!(
        e.place_order(user("ann"), &[line("nope", 1)], None, None)
            .await,
        Err(EngineError::NotFound { .. })
    ));
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promotion_is_spread_and_a_one_item_refund_returns_its_share() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 10_000, 5, None).await;
    create(e, "b", 10_000, 5, None).await;
    let code = PromoCode::parse("TEN-OFF").expect("valid");
    e.create_promotion(Promotion::new(code, 20_000, 1_000).expect("valid"))
        .await
        .expect("created");
    assert!(matches!(
        e.create_promotion(Promotion::new(code, 1, 1).expect("valid"))
            .await,
        Err(EngineError::AlreadyExists { .. })
    ));
    let order = e
        .place_order(user("ann"), &[line("a", 1), line("b", 1)], Some(code), None)
        .await
        .expect("placed");
    assert_eq!((order.discount_cents, order.total_cents), (1_000, 19_000));
    assert_eq!(
        (order.lines[0].discount_cents, order.lines[1].discount_cents),
        (500, 500)
    );
    e.pay(admin(), order.id, pref("p"), 19_000, None)
        .await
        .expect("paid");
    let refunded = e
        .refund(admin(), order.id, vec![line("a", 1)], false, None)
        .await
        .expect("refunded");
    assert_eq!(
        (refunded.refunded_cents, refunded.status),
        (9_500, OrderStatus::Paid)
    );
    assert!(matches!(
        e.refund(admin(), order.id, vec![line("a", 1)], false, None)
            .await,
        Err(EngineError::Domain(DomainError::Invalid(_)))
    ));
    let a = e.sku(sku("a")).await.expect("sku");
    assert_eq!(
        (a.levels.available, a.levels.allocated),
        (5, 0),
        "refunded before shipping"
    );
    let all = e
        .refund(admin(), order.id, vec![line("b", 1)], false, None)
        .await
        .expect("refunded");
    assert_eq!(
        (all.refunded_cents, all.status),
        (19_000, OrderStatus::Refunded)
    );
    assert!(matches!(
        e.place_order(
            user("ann"),
            &[line("a", 1)],
            Some(PromoCode::parse("NONE").expect("valid")),
            None
        )
        .await,
        Err(EngineError::NotFound { .. })
    ));
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_after_shipment_come_back_only_with_restock() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 4, None).await;
    let order = e
        .place_order(user("ann"), &[line("a", 4)], None, None)
        .await
        .expect("placed");
    e.pay(admin(), order.id, pref("p"), 400, None)
        .await
        .expect("paid");
    e.ship(admin(), order.id).await.expect("shipped");
    e.refund(admin(), order.id, vec![line("a", 1)], false, None)
        .await
        .expect("refunded, kept");
    let s = e.sku(sku("a")).await.expect("sku");
    assert_eq!(
        (s.levels.on_hand, s.levels.available, s.levels.shipped),
        (0, 0, 4)
    );
    e.refund(admin(), order.id, vec![line("a", 2)], true, None)
        .await
        .expect("refunded, restocked");
    let s = e.sku(sku("a")).await.expect("sku");
    assert_eq!(
        (s.levels.on_hand, s.levels.available, s.levels.shipped),
        (2, 2, 4)
    );
    assert_eq!(s.levels.stock_in, 6);
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaid_orders_expire_at_their_deadline_and_release_units() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 3, None).await;
    let order = e
        .place_order(user("ann"), &[line("a", 3)], None, None)
        .await
        .expect("placed");
    assert_eq!(order.expires_at_ms, T0_MS + RESERVATION_TTL_DEFAULT_MS);
    h.clock.advance_ms(RESERVATION_TTL_DEFAULT_MS - 1);
    assert_eq!(e.expire_due().await.expect("tick"), 0);
    h.clock.advance_ms(1);
    // A read of an overdue order expires it on the spot.
    let read = e.order(customer("ann"), order.id).await.expect("read");
    assert_eq!(read.status, OrderStatus::Expired);
    let s = e.sku(sku("a")).await.expect("sku");
    assert_eq!((s.levels.available, s.levels.reserved), (3, 0));
    let late = e.pay(admin(), order.id, pref("late"), 300, None).await;
    assert!(matches!(
        late,
        Err(EngineError::Domain(DomainError::InvalidTransition { .. }))
    ));
    // The timer path: many overdue orders expire in one sweep.
    for i in 0..3 {
        e.place_order(user(&format!("u{i}")), &[line("a", 1)], None, None)
            .await
            .expect("placed");
    }
    h.clock.advance_ms(RESERVATION_TTL_DEFAULT_MS);
    assert_eq!(e.expire_due().await.expect("sweep"), 3);
    let s = e.sku(sku("a")).await.expect("sku");
    assert_eq!(s.levels.available, 3);
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_places_the_cart_and_empties_it() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 5, None).await;
    create(e, "b", 50, 5, None).await;
    let ann = user("ann");
    assert!(matches!(
        e.checkout(ann, None, None).await,
        Err(EngineError::Domain(DomainError::Invalid(_)))
    ));
    e.set_cart_item(ann, sku("a"), 2).await.expect("set");
    e.set_cart_item(ann, sku("b"), 1).await.expect("set");
    e.set_cart_item(ann, sku("a"), 3).await.expect("replace");
    assert!(matches!(
        e.set_cart_item(ann, sku("zzz"), 1).await,
        Err(EngineError::NotFound { .. })
    ));
    let cart = e.cart(ann).await.expect("cart");
    assert_eq!(cart.items(), &[line("a", 3), line("b", 1)]);
    let order = e.checkout(ann, None, None).await.expect("checked out");
    assert_eq!(order.subtotal_cents, 350);
    assert!(e.cart(ann).await.expect("cart").is_empty());
    e.set_cart_item(ann, sku("b"), 9).await.expect("set");
    assert!(matches!(
        e.checkout(ann, None, None).await,
        Err(EngineError::Domain(DomainError::OutOfStock { .. }))
    ));
    assert_eq!(
        e.cart(ann).await.expect("cart").items(),
        &[line("b", 9)],
        "kept on failure"
    );
    e.clear_cart(ann).await.expect("cleared");
    assert!(e.cart(ann).await.expect("cart").is_empty());
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stamped_change_records_its_first_answer() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 5, None).await;
    let stamp = IdemStamp {
        user: user("ann"),
        key: IdempotencyKey::parse("k-1").expect("valid"),
        fingerprint: [7; 16],
    };
    assert_eq!(
        e.idempotency(stamp.user, &stamp.key, stamp.fingerprint)
            .expect("looked up"),
        Lookup::Fresh
    );
    let order = e
        .place_order(user("ann"), &[line("a", 1)], None, Some(stamp.clone()))
        .await
        .expect("placed");
    match e
        .idempotency(stamp.user, &stamp.key, stamp.fingerprint)
        .expect("looked up")
    {
        Lookup::Replay(outcome) => assert_eq!(
            e.first_answer(stamp.user, &outcome)
                .await
                .expect("answered"),
            FirstAnswer::Order(Arc::new(order.clone()))
        ),
        other => panic!("expected a replay, got {other:?}"),
    }
    assert_eq!(
        e.idempotency(stamp.user, &stamp.key, [8; 16])
            .expect("looked up"),
        Lookup::Conflict
    );
    // A refused change leaves no record.
    let refused = IdemStamp {
        key: IdempotencyKey::parse("k-2").expect("valid"),
        ..stamp.clone()
    };
    let _ = e
        .place_order(user("ann"), &[line("a", 99)], None, Some(refused.clone()))
        .await
        .expect_err("out of stock");
    assert_eq!(
        e.idempotency(refused.user, &refused.key, refused.fingerprint)
            .expect("looked up"),
        Lookup::Fresh
    );
    let state = assert_replay_matches(&h).await;
    assert_eq!(
        state.idem.lookup(stamp.user, &stamp.key, stamp.fingerprint),
        Lookup::Replay(Outcome::Order {
            id: order.id,
            history_len: 1
        })
    );
}

/// Contract v2: a keyed request refused by the business rules records
/// nothing. A flash sale's sold-out clicks, each with a key of its own (and
/// retries of them), cost no journal record and no idempotency record; once
/// stock comes back, a retry with the same key is decided afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sold_out_refusals_record_nothing_and_a_retry_is_decided_afresh() {
    use flashcore::http::error::ApiError;
    use flashcore::http::idempotency::InFlight;
    use flashcore::journal::Journal;

    const CLICKS: usize = 1_000;
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "drop", 100, 1, None).await;
    e.place_order(user("first"), &[line("drop", 1)], None, None)
        .await
        .expect("the only unit");
    let in_flight = Arc::new(InFlight::default());
    let click = |who: String, key: String| {
        let engine = e.clone();
        let in_flight = Arc::clone(&in_flight);
        async move {
            let key = IdempotencyKey::parse(&key).expect("valid key");
            in_flight
                .run(
                    &engine.clone(),
                    user(&who),
                    Some(key),
                    || [3; 16],
                    move |stamp| async move {
                        engine
                            .place_order(user(&who), &[line("drop", 1)], None, stamp)
                            .await
                            .map(|order| FirstAnswer::Order(Arc::new(order)))
                            .map_err(ApiError::from)
                    },
                )
                .await
        }
    };
    let seq_before = h.journal.last_seq();
    for i in 0..CLICKS {
        let answer = click(format!("u{}", i % 50), format!("click-{i}")).await;
        assert!(
            matches!(answer, Err(ApiError::OutOfStock(_))),
            "click {i}: {answer:?}"
        );
    }
    assert_eq!(
        h.journal.last_seq(),
        seq_before,
        "{CLICKS} refusals journaled nothing"
    );
    assert!(h.idem.is_empty(), "{} idempotency records", h.idem.len());
    // A retry of a refused click is decided again (refused again: still sold
    // out), and records nothing either.
    for _ in 0..10 {
        let answer = click("u0".into(), "click-0".into()).await;
        assert!(matches!(answer, Err(ApiError::OutOfStock(_))), "{answer:?}");
    }
    assert_eq!(h.journal.last_seq(), seq_before);
    assert!(h.idem.is_empty());
    assert_eq!(
        e.idempotency(
            user("u0"),
            &IdempotencyKey::parse("click-0").expect("valid"),
            [3; 16]
        )
        .expect("looked up"),
        Lookup::Fresh
    );

    e.restock(sku("drop"), 1, None).await.expect("restocked");
    let retried = click("u0".into(), "click-0".into())
        .await
        .expect("decided afresh: the unit is back");
    assert_eq!(h.idem.len(), 1, "the change is recorded under its key");
    assert_eq!(
        click("u0".into(), "click-0".into())
            .await
            .expect("replayed"),
        retried
    );
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_the_journal_resumes_everything_and_settles_what_a_crash_left() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 10, Some(5)).await;
    let kept = e
        .place_order(user("ann"), &[line("a", 2)], None, None)
        .await
        .expect("placed");
    let overdue = e
        .place_order(user("bob"), &[line("a", 1)], None, None)
        .await
        .expect("placed");
    e.pay(admin(), kept.id, pref("p"), 200, None)
        .await
        .expect("paid");
    // A crash between the two steps of a placement leaves a reservation that
    // no order took: hold one and never place it.
    let orphan = e.reserve(user("cyd"), sku("a"), 3).await.expect("held");
    std::mem::forget(orphan);
    let _ = e.sku(sku("a")).await.expect("sku");
    e.shutdown();

    let mut state = State::default();
    for event in h.journal.events() {
        state.apply(&event).expect("replays");
    }
    assert_eq!(state.open_reservations.len(), 1);
    h.clock.advance_ms(RESERVATION_TTL_DEFAULT_MS);
    let idem = Arc::clone(&state.idem);
    let restarted = Engine::start(
        EngineConfig::default(),
        h.journal.clone(),
        h.clock.clone(),
        state,
    )
    .expect("restarts");
    let s = restarted.sku(sku("a")).await.expect("sku");
    assert_eq!(
        (s.levels.available, s.levels.reserved, s.levels.allocated),
        (8, 0, 2),
        "the orphan was released and the overdue order expired"
    );
    let again = restarted.order(admin(), overdue.id).await.expect("order");
    assert_eq!(again.status, OrderStatus::Expired);
    let paid = restarted.order(admin(), kept.id).await.expect("order");
    assert_eq!(paid.status, OrderStatus::Paid);
    // New ids continue after the old ones.
    let next = restarted
        .place_order(user("ann"), &[line("a", 1)], None, None)
        .await
        .expect("placed");
    assert!(next.id > overdue.id);
    let listed = restarted
        .orders(OrderScope::User(user("ann")), 10)
        .await
        .expect("list");
    assert_eq!(
        listed.iter().map(|o| o.id).collect::<Vec<_>>(),
        vec![next.id, kept.id]
    );
    let h2 = Harness {
        engine: restarted,
        journal: h.journal.clone(),
        clock: h.clock.clone(),
        idem,
    };
    assert_replay_matches(&h2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_journal_refuses_changes_and_changes_nothing() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "a", 100, 10, None).await;
    h.journal.set_failing(true);
    assert!(matches!(
        e.place_order(user("ann"), &[line("a", 1)], None, None)
            .await,
        Err(EngineError::Storage(_))
    ));
    let s = e.sku(sku("a")).await.expect("reads go on");
    assert_eq!(s.levels.available, 10);
    h.journal.set_failing(false);
    e.place_order(user("ann"), &[line("a", 1)], None, None)
        .await
        .expect("works again");
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_after_shutdown_fail_with_stopped_instead_of_hanging() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "cap", 1_000, 5, None).await;
    e.shutdown();
    let within = std::time::Duration::from_secs(10);
    let reserved = tokio::time::timeout(within, e.reserve(user("ann"), sku("cap"), 1))
        .await
        .expect("a reservation after shutdown must not hang");
    assert!(
        matches!(reserved, Err(EngineError::Stopped)),
        "{reserved:?}"
    );
    let placed = tokio::time::timeout(
        within,
        e.place_order(user("ann"), &[line("cap", 1)], None, None),
    )
    .await
    .expect("a placement after shutdown must not hang");
    assert!(matches!(placed, Err(EngineError::Stopped)), "{placed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_line_order_is_one_journal_event_and_a_cart_order_two_steps() {
    let h = harness(EngineConfig::default());
    let e = &h.engine;
    create(e, "tee", 2_500, 10, Some(2)).await;
    // The first id journals its block's reservation (`engine/ids.rs`,
    // once per 65,536 ids): take one before counting.
    let warm = e
        .place_order(user("cat"), &[line("tee", 1)], None, None)
        .await
        .expect("placed");
    e.cancel(customer("cat"), warm.id).await.expect("cancel");
    let before = h.journal.events().len();
    let order = e
        .place_order(user("ann"), &[line("tee", 2)], None, None)
        .await
        .expect("placed");
    let events = h.journal.events();
    assert_eq!(
        events.len(),
        before + 1,
        "one event: {:?}",
        &events[before..]
    );
    assert!(
        matches!(&events[before], flashcore::domain::Event::OrderPlacedAtSku { order: o, .. } if o.id == order.id),
        "{:?}",
        events[before]
    );
    let s = e.sku(sku("tee")).await.expect("sku");
    assert_eq!((s.levels.available, s.levels.reserved), (8, 2));
    // The per-user limit counts it, and a read finds it at once.
    assert!(matches!(
        e.place_order(user("ann"), &[line("tee", 1)], None, None)
            .await,
        Err(EngineError::Domain(DomainError::LimitExceeded { .. }))
    ));
    assert_eq!(
        e.order(customer("ann"), order.id)
            .await
            .expect("read")
            .status,
        OrderStatus::Reserved
    );
    // It moves on like any order, and a cart checkout still takes the
    // reservation path (its cart must be checked by the shard).
    let cancelled = e.cancel(customer("ann"), order.id).await.expect("cancel");
    assert_eq!(cancelled.status, OrderStatus::Cancelled);
    e.set_cart_item(user("bob"), sku("tee"), 1)
        .await
        .expect("cart");
    let before = h.journal.events().len();
    e.checkout(user("bob"), None, None).await.expect("checkout");
    let kinds: Vec<_> = h.journal.events()[before..]
        .iter()
        .map(|e| matches!(e, flashcore::domain::Event::StockReserved { .. }))
        .collect();
    assert_eq!(kinds, [true, false], "a reservation, then the order");
    assert_replay_matches(&h).await;
}

// ----- the replay check itself can fail -----
//
// Each test below journals one event the live engine never saw, where the
// check must notice it: the oldest of more orders than one listing holds,
// a promotion, a cart and an idempotency record.

/// A harness with one SKU and `orders` placed orders; returns the oldest.
async fn many_orders(orders: usize) -> (Harness, flashcore::domain::order::Order) {
    let h = harness(EngineConfig::default());
    create(&h.engine, "a", 100, 10_000, None).await;
    let mut first = None;
    for i in 0..orders {
        let o = h
            .engine
            .place_order(user(&format!("u{}", i % 9)), &[line("a", 1)], None, None)
            .await
            .expect("placed");
        first.get_or_insert(o);
    }
    (h, first.expect("an order"))
}

fn journal_behind_the_engine(h: &Harness, event: &flashcore::domain::Event) {
    use flashcore::journal::Journal;
    h.journal.append(event).expect("appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "equals its replay")]
async fn the_replay_check_sees_the_oldest_of_many_orders() {
    let (h, first) = many_orders(520).await;
    h.engine
        .pay(admin(), first.id, pref("p"), first.total_cents, None)
        .await
        .expect("paid");
    h.engine.ship(admin(), first.id).await.expect("shipped");
    // Delivered in the journal only: it moves no stock, so only the order
    // (older than the newest 500) differs.
    journal_behind_the_engine(
        &h,
        &flashcore::domain::Event::OrderDelivered {
            order: first.id,
            at_ms: T0_MS,
        },
    );
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "live promotion")]
async fn the_replay_check_sees_promotions() {
    let (h, _) = many_orders(1).await;
    let promo = Promotion::new(PromoCode::parse("P").expect("valid"), 10, 1).expect("valid");
    journal_behind_the_engine(
        &h,
        &flashcore::domain::Event::PromotionCreated {
            promo,
            at_ms: T0_MS,
        },
    );
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "live cart")]
async fn the_replay_check_sees_carts() {
    let (h, _) = many_orders(1).await;
    journal_behind_the_engine(
        &h,
        &flashcore::domain::Event::CartItemSet {
            user: user("u0"),
            sku: sku("a"),
            qty: 2,
            at_ms: T0_MS,
        },
    );
    assert_replay_matches(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "idempotency records")]
async fn the_replay_check_sees_idempotency_records() {
    let (h, first) = many_orders(1).await;
    // Only a change makes a record, and it would show elsewhere first: put
    // a record in the live book alone.
    h.idem.record(
        &IdemStamp {
            user: user("u0"),
            key: IdempotencyKey::parse("k").expect("valid"),
            fingerprint: [7; 16],
        },
        T0_MS,
        Outcome::Order {
            id: first.id,
            history_len: 1,
        },
    );
    assert_replay_matches(&h).await;
}

/// v1 journaled a keyed refusal; v2 ignores such a record on replay, so the
/// live engine (which never made it) and the replay agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journaled_v1_refusal_replays_to_nothing() {
    let (h, _) = many_orders(1).await;
    journal_behind_the_engine(
        &h,
        &flashcore::domain::Event::IdempotentRefusal {
            idem: IdemStamp {
                user: user("u0"),
                key: IdempotencyKey::parse("k").expect("valid"),
                fingerprint: [7; 16],
            },
            refusal: flashcore::domain::idem::Refusal {
                status: 409,
                code: "out_of_stock".into(),
                message: "gone".into(),
            },
            at_ms: T0_MS,
        },
    );
    let state = assert_replay_matches(&h).await;
    assert!(state.idem.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_window_bounds_new_orders_only_on_the_engine_clock() {
    use flashcore::domain::sale::{SalePatch, SaleWindow};
    use flashcore::engine::NewSku;

    let h = harness(EngineConfig::default());
    let e = &h.engine;
    let (start, end) = (T0_MS + 60_000, T0_MS + 120_000);
    e.create_sku(NewSku {
        sku: sku("drop"),
        name: "Drop".into(),
        price_cents: 1_000,
        stock: 10,
        per_user_limit: None,
        sale: SaleWindow::new(Some(start), Some(end)).expect("valid"),
    })
    .await
    .expect("created");
    create(e, "tee", 500, 10, None).await;
    let not_started = |r: Result<_, EngineError>| matches!(r, Err(EngineError::Domain(DomainError::SaleNotStarted { starts_at_ms, .. })) if starts_at_ms == start);
    // Before the start: single-line (the hint), multi-line, reservation and
    // checkout are all refused, and nothing is held.
    assert!(not_started(
        e.place_order(user("ann"), &[line("drop", 1)], None, None)
            .await
            .map(|_| ())
    ));
    assert!(not_started(
        e.place_order(user("ann"), &[line("tee", 1), line("drop", 1)], None, None)
            .await
            .map(|_| ())
    ));
    assert!(not_started(
        e.reserve(user("ann"), sku("drop"), 1).await.map(|_| ())
    ));
    e.set_cart_item(user("bob"), sku("drop"), 2)
        .await
        .expect("a cart may hold it early");
    assert!(not_started(
        e.checkout(user("bob"), None, None).await.map(|_| ())
    ));
    let drop_sku = e.sku(sku("drop")).await.expect("sku");
    assert_eq!(drop_sku.levels.available, 10);
    assert_eq!(e.sku(sku("tee")).await.expect("sku").levels.available, 10);

    // From the start on, orders are taken.
    h.clock.set_ms(start);
    let paid = e
        .place_order(user("ann"), &[line("drop", 2)], None, None)
        .await
        .expect("placed at the start");
    let unpaid = e
        .checkout(user("bob"), None, None)
        .await
        .expect("checked out");
    let kept = e
        .place_order(user("cat"), &[line("drop", 1), line("tee", 1)], None, None)
        .await
        .expect("placed");

    // From the end on, new orders are refused, placed orders go on.
    h.clock.set_ms(end);
    assert!(matches!(
        e.place_order(user("dan"), &[line("drop", 1)], None, None).await,
        Err(EngineError::Domain(DomainError::SaleEnded { ends_at_ms, .. })) if ends_at_ms == end
    ));
    assert!(matches!(
        e.place_order(user("dan"), &[line("tee", 1), line("drop", 1)], None, None)
            .await,
        Err(EngineError::Domain(DomainError::SaleEnded { .. }))
    ));
    e.pay(admin(), paid.id, pref("p1"), paid.total_cents, None)
        .await
        .expect("paid after the end");
    e.ship(admin(), paid.id)
        .await
        .expect("shipped after the end");
    e.refund(admin(), paid.id, vec![line("drop", 1)], true, None)
        .await
        .expect("refunded after the end");
    e.cancel(customer("cat"), kept.id).await.expect("cancelled");
    // The unpaid checkout expires after the end and gives its units back.
    h.clock.set_ms(start + RESERVATION_TTL_DEFAULT_MS + 1);
    let expired = e.order(admin(), unpaid.id).await.expect("read");
    assert_eq!(expired.status, OrderStatus::Expired);

    // Clearing the end opens the sale again; a bad window changes nothing.
    assert!(matches!(
        e.update_sku(
            sku("drop"),
            None,
            None,
            None,
            SalePatch {
                starts_at_ms: Some(Some(end + 1)),
                ends_at_ms: None,
            },
        )
        .await,
        Err(EngineError::Domain(DomainError::Invalid(_)))
    ));
    let reopened = e
        .update_sku(
            sku("drop"),
            None,
            None,
            None,
            SalePatch {
                starts_at_ms: None,
                ends_at_ms: Some(None),
            },
        )
        .await
        .expect("patched");
    assert_eq!(
        reopened.sale,
        SaleWindow {
            starts_at_ms: Some(start),
            ends_at_ms: None
        }
    );
    e.place_order(user("dan"), &[line("drop", 1)], None, None)
        .await
        .expect("on sale again");
    // The window is journaled: a replay shows the same SKUs, window and all.
    let state = assert_replay_matches(&h).await;
    assert_eq!(
        state.skus[&sku("drop")].sale(),
        reopened.sale,
        "the replayed window"
    );
}
