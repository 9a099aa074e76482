//! Shared helpers: the in-process engine harness, (in `server`) the real
//! binary as a child process with a small HTTP client, and (in `load`) the
//! crash workload and its checks.
#![allow(dead_code)]

pub mod load;
pub mod server;

use std::sync::Arc;

use flashcore::domain::event::SkuQty;
use flashcore::domain::order::Order;
use flashcore::domain::sku::SkuView;
use flashcore::domain::{Event, SkuId, State, UserId};
use flashcore::engine::{Caller, Engine, EngineConfig, ManualClock, NewSku, OrderScope};
use flashcore::journal::MemJournal;

/// Unix time at which test clocks start: 2026-01-01.
pub const T0_MS: u64 = 1_767_225_600_000;

pub struct Harness {
    pub engine: Engine,
    pub journal: Arc<MemJournal>,
    pub clock: Arc<ManualClock>,
}

pub fn harness(config: EngineConfig) -> Harness {
    let journal = Arc::new(MemJournal::new());
    let clock = Arc::new(ManualClock::new(T0_MS));
    let engine = Engine::start(config, journal.clone(), clock.clone(), State::default())
        .expect("engine starts");
    Harness {
        engine,
        journal,
        clock,
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
        })
        .await
        .expect("SKU created")
}

/// Replays every journaled event into a fresh `State`, checks every
/// invariant there, and compares it with what the live engine shows.
pub async fn assert_replay_matches(h: &Harness) -> State {
    let events: Vec<Event> = h.journal.events();
    let mut state = State::default();
    for (index, event) in events.iter().enumerate() {
        state
            .apply(event)
            .unwrap_or_else(|e| panic!("event {} does not replay: {e}", index + 1));
    }
    state.check().expect("replayed state keeps every invariant");
    let live = h.engine.skus().await.expect("skus");
    let replayed: Vec<SkuView> = state.skus.values().map(|s| s.view()).collect();
    assert_eq!(live, replayed, "live SKUs equal the replayed SKUs");
    let live_orders: Vec<Order> = h.engine.orders(OrderScope::All, 500).await.expect("orders");
    let replayed_orders: Vec<Order> = state.orders.list_all(500).into_iter().cloned().collect();
    assert_eq!(
        live_orders, replayed_orders,
        "live orders equal the replayed orders"
    );
    state
}
