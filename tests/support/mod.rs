//! Shared helpers: the in-process engine harness, (in `server`) the real
//! binary as a child process with a small HTTP client, and (in `load`) the
//! crash workload and its checks, (in `damage`) journal damage, and (in
//! `nats`) a local NATS cluster for cluster mode.
#![allow(dead_code)]

pub mod damage;
pub mod load;
pub mod nats;
pub mod server;

use std::collections::BTreeSet;
use std::sync::Arc;

use flashcore::domain::event::SkuQty;
use flashcore::domain::idem::IdemBook;
use flashcore::domain::order::{Order, OrderStatus};
use flashcore::domain::sale::SaleWindow;
use flashcore::domain::sku::SkuView;
use flashcore::domain::{Event, SkuId, State, UserId};
use flashcore::engine::{Caller, Engine, EngineConfig, ManualClock, NewSku};
use flashcore::journal::MemJournal;

/// Unix time at which test clocks start: 2026-01-01.
pub const T0_MS: u64 = 1_767_225_600_000;

pub struct Harness {
    pub engine: Engine,
    pub journal: Arc<MemJournal>,
    pub clock: Arc<ManualClock>,
    /// The engine's own idempotency book (the `State`'s, which the engine
    /// keeps), so replay can be compared with every live record.
    pub idem: Arc<IdemBook>,
}

pub fn harness(config: EngineConfig) -> Harness {
    let journal = Arc::new(MemJournal::new());
    let clock = Arc::new(ManualClock::new(T0_MS));
    let state = State::default();
    let idem = Arc::clone(&state.idem);
    let engine =
        Engine::start(config, journal.clone(), clock.clone(), state).expect("engine starts");
    Harness {
        engine,
        journal,
        clock,
        idem,
    }
}

pub fn sku(id: &str) -> SkuId {
    SkuId::parse(id).expect("valid sku id")
}

pub fn user(id: &str) -> UserId {
    UserId::parse(id).expect("valid user id")
}

pub fn admin() -> Caller {
    Caller {
        user: user("admin"),
        admin: true,
    }
}

pub fn customer(id: &str) -> Caller {
    Caller {
        user: user(id),
        admin: false,
    }
}

pub fn line(id: &str, qty: u32) -> SkuQty {
    SkuQty { sku: sku(id), qty }
}

pub async fn create(
    engine: &Engine,
    id: &str,
    price: u64,
    stock: u64,
    limit: Option<u32>,
) -> SkuView {
    engine
        .create_sku(NewSku {
            sku: sku(id),
            name: format!("Item {id}"),
            price_cents: price,
            stock,
            per_user_limit: limit,
            sale: SaleWindow::default(),
        })
        .await
        .expect("SKU created")
}

/// Replays `events` into a fresh `State` and checks every invariant there.
pub fn replay(events: &[Event]) -> State {
    let mut state = State::default();
    for (index, event) in events.iter().enumerate() {
        state
            .apply(event)
            .unwrap_or_else(|e| panic!("event {} does not replay: {e}", index + 1));
    }
    state.check().expect("replayed state keeps every invariant");
    state
}

/// Replays every journaled event into a fresh `State`, checks every
/// invariant there, and compares all of it with what the live engine
/// shows: every SKU, every order (and the count in each state, so the live
/// engine holds no order the journal lacks), every promotion, the cart of
/// every user the journal names, and every idempotency record.
pub async fn assert_replay_matches(h: &Harness) -> State {
    // Reading an order expires it first when it is overdue, which journals
    // the expiry: read every live order, then replay what is journaled by
    // then.
    let ids: Vec<_> = replay(&h.journal.events())
        .orders
        .orders()
        .map(|o| o.id)
        .collect();
    let mut live_orders: Vec<Order> = Vec::with_capacity(ids.len());
    for id in ids {
        let order = h
            .engine
            .order(admin(), id)
            .await
            .unwrap_or_else(|e| panic!("replayed order {id} is not live: {e}"));
        live_orders.push(order);
    }
    let events = h.journal.events();
    let state = replay(&events);

    let live = h.engine.skus().await.expect("skus");
    let replayed: Vec<SkuView> = state.skus.values().map(|s| s.view()).collect();
    assert_eq!(live, replayed, "live SKUs equal the replayed SKUs");

    let replayed_orders: Vec<Order> = state.orders.orders().cloned().collect();
    assert_eq!(
        live_orders.len(),
        replayed_orders.len(),
        "no order appeared while comparing"
    );
    for (live, replayed) in live_orders.iter().zip(&replayed_orders) {
        assert_eq!(live, replayed, "live order {} equals its replay", live.id);
    }
    let replayed_counts: Vec<(OrderStatus, u64)> = OrderStatus::ALL
        .iter()
        .map(|&s| {
            (
                s,
                replayed_orders.iter().filter(|o| o.status == s).count() as u64,
            )
        })
        .collect();
    assert_eq!(
        h.engine.order_counts().await.expect("counts"),
        replayed_counts,
        "live orders by state equal the replayed ones"
    );

    for promo in state.promotions.iter() {
        assert_eq!(
            h.engine.promotion(promo.code).ok().as_ref(),
            Some(promo),
            "live promotion {} equals its replay",
            promo.code
        );
    }

    let mut users: BTreeSet<UserId> = replayed_orders.iter().map(|o| o.user).collect();
    for event in &events {
        if let Event::CartItemSet { user, .. } | Event::CartCleared { user, .. } = event {
            users.insert(*user);
        }
    }
    for user in users {
        assert_eq!(
            h.engine.cart(user).await.expect("cart"),
            state.orders.cart(&user),
            "live cart of {user} equals its replay"
        );
    }

    assert_eq!(
        h.idem.to_sorted_vec(),
        state.idem.to_sorted_vec(),
        "live idempotency records equal the replayed ones"
    );
    state
}
