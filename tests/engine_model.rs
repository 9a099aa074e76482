//! A proptest state machine: random sequences of reserve, pay, cancel,
//! expire, ship, deliver, refund and restock run against the real engine and
//! against a small reference model written separately from the domain code.
//! After every step the engine's SKU counters and orders must equal what the
//! model derives, and every invariant of the contract must hold; at the end
//! the journal must replay to the same state.

mod support;

use std::collections::HashMap;

use flashcore::domain::order::{Order, OrderStatus};
use flashcore::domain::{DomainError, PaymentRef};
use flashcore::engine::{EngineConfig, EngineError};
use proptest::prelude::*;
use support::*;

const USERS: u8 = 3;
const PRICES: [u64; 3] = [250, 1_000, 7];
const STOCK: [u64; 3] = [5, 3, 8];
const LIMITS: [Option<u32>; 3] = [Some(3), None, None];
const TTL_MS: u64 = 60_000;

#[derive(Debug, Clone)]
enum Op {
    Place {
        user: u8,
        lines: Vec<(u8, u32)>,
    },
    Pay {
        order: usize,
        exact: bool,
    },
    Cancel {
        order: usize,
        by_owner: bool,
    },
    Ship {
        order: usize,
    },
    Deliver {
        order: usize,
    },
    Refund {
        order: usize,
        line: usize,
        qty: u32,
        restock: bool,
    },
    Restock {
        sku: u8,
        qty: u64,
    },
    Tick {
        ms: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..USERS, prop::collection::vec((0u8..3, 1u32..=3), 1..=3))
            .prop_map(|(user, lines)| Op::Place { user, lines }),
        3 => (any::<usize>(), prop::bool::weighted(0.85))
            .prop_map(|(order, exact)| Op::Pay { order, exact }),
        1 => (any::<usize>(), prop::bool::weighted(0.8))
            .prop_map(|(order, by_owner)| Op::Cancel { order, by_owner }),
        2 => any::<usize>().prop_map(|order| Op::Ship { order }),
        1 => any::<usize>().prop_map(|order| Op::Deliver { order }),
        2 => (any::<usize>(), 0usize..3, 1u32..=3, any::<bool>())
            .prop_map(|(order, line, qty, restock)| Op::Refund { order, line, qty, restock }),
        1 => (0u8..3, 1u64..=4).prop_map(|(sku, qty)| Op::Restock { sku, qty }),
        1 => prop_oneof![Just(1_000u64), Just(TTL_MS)].prop_map(|ms| Op::Tick { ms }),
    ]
}

/// The reference model: an order and what it holds.
#[derive(Debug, Clone)]
struct MOrder {
    order: Order,
    owner: u8,
    lines: Vec<(u8, u32)>,
    status: OrderStatus,
    refunded: Vec<u32>,
    shipped: Vec<u32>,
    paid: bool,
}

#[derive(Debug, Default)]
struct Model {
    stock_in: [u64; 3],
    orders: Vec<MOrder>,
    now_ms: u64,
}

/// Counters the model expects for one SKU.
#[derive(Debug, PartialEq, Eq, Default)]
struct Counters {
    on_hand: u64,
    available: u64,
    reserved: u64,
    allocated: u64,
    shipped: u64,
    stock_in: u64,
}

impl Model {
    fn counters(&self, sku: u8) -> Counters {
        let mut c = Counters {
            stock_in: self.stock_in[usize::from(sku)],
            ..Counters::default()
        };
        for o in &self.orders {
            for (i, (s, qty)) in o.lines.iter().enumerate() {
                if *s != sku {
                    continue;
                }
                let left = u64::from(qty - o.refunded[i]);
                match o.status {
                    OrderStatus::Reserved => c.reserved += left,
                    OrderStatus::Paid => c.allocated += left,
                    _ => {}
                }
                c.shipped += u64::from(o.shipped[i]);
            }
        }
        c.on_hand = c.stock_in - c.shipped;
        c.available = c.on_hand - c.reserved - c.allocated;
        c
    }

    fn user_units(&self, user: u8, sku: u8) -> u64 {
        self.orders
            .iter()
            .filter(|o| o.owner == user && !o.status.is_terminal())
            .flat_map(|o| o.lines.iter().zip(&o.refunded))
            .filter(|((s, _), _)| *s == sku)
            .map(|((_, qty), refunded)| u64::from(qty - refunded))
            .sum()
    }

    fn expire_overdue(&mut self) {
        let now = self.now_ms;
        for o in &mut self.orders {
            if o.status == OrderStatus::Reserved && now >= o.order.expires_at_ms {
                o.status = OrderStatus::Expired;
            }
        }
    }
}

fn sku_name(i: u8) -> String {
    format!("s{i}")
}

fn merge(lines: &[(u8, u32)]) -> Vec<(u8, u32)> {
    let mut merged: Vec<(u8, u32)> = Vec::new();
    for &(s, q) in lines {
        match merged.iter_mut().find(|(m, _)| *m == s) {
            Some(m) => m.1 += q,
            None => merged.push((s, q)),
        }
    }
    merged
}

fn kind(r: &Result<Order, EngineError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(EngineError::Domain(DomainError::InvalidTransition { .. })) => "invalid_transition",
        Err(EngineError::Domain(DomainError::PaymentMismatch { .. })) => "payment_mismatch",
        Err(EngineError::Domain(DomainError::Invalid(_))) => "invalid",
        Err(EngineError::Domain(DomainError::OutOfStock { .. })) => "out_of_stock",
        Err(EngineError::Domain(DomainError::LimitExceeded { .. })) => "limit_exceeded",
        Err(EngineError::Forbidden(_)) => "forbidden",
        Err(_) => "other",
    }
}

async fn run(ops: Vec<Op>) {
    let config = EngineConfig {
        reservation_ttl_ms: TTL_MS,
        ..EngineConfig::default()
    };
    let h = harness(config);
    let e = &h.engine;
    let mut m = Model {
        now_ms: T0_MS,
        ..Model::default()
    };
    for i in 0..3u8 {
        create(
            e,
            &sku_name(i),
            PRICES[usize::from(i)],
            STOCK[usize::from(i)],
            LIMITS[usize::from(i)],
        )
        .await;
        m.stock_in[usize::from(i)] = STOCK[usize::from(i)];
    }
    for (step, op) in ops.into_iter().enumerate() {
        let pick = |m: &Model, i: usize| (!m.orders.is_empty()).then(|| i % m.orders.len());
        match op.clone() {
            Op::Place { user: u, lines } => {
                let merged = merge(&lines);
                let fits = merged.iter().all(|(s, q)| {
                    let c = m.counters(*s);
                    let within = LIMITS[usize::from(*s)]
                        .is_none_or(|l| m.user_units(u, *s) + u64::from(*q) <= u64::from(l));
                    c.available >= u64::from(*q) && within
                });
                let items: Vec<_> = lines.iter().map(|(s, q)| line(&sku_name(*s), *q)).collect();
                let got = e
                    .place_order(user(&format!("u{u}")), &items, None, None)
                    .await;
                match (fits, got) {
                    (true, Ok(order)) => {
                        let total: u64 = merged
                            .iter()
                            .map(|(s, q)| PRICES[usize::from(*s)] * u64::from(*q))
                            .sum();
                        assert_eq!(order.total_cents, total, "step {step}");
                        let n = merged.len();
                        m.orders.push(MOrder {
                            order,
                            owner: u,
                            lines: merged,
                            status: OrderStatus::Reserved,
                            refunded: vec![0; n],
                            shipped: vec![0; n],
                            paid: false,
                        });
                    }
                    (
                        false,
                        Err(EngineError::Domain(
                            DomainError::OutOfStock { .. } | DomainError::LimitExceeded { .. },
                        )),
                    ) => {}
                    (fits, got) => panic!("step {step} {op:?}: model fits={fits}, engine {got:?}"),
                }
            }
            Op::Pay { order, exact } => {
                let Some(i) = pick(&m, order) else { continue };
                let o = &mut m.orders[i];
                let amount = o.order.total_cents + u64::from(!exact);
                let expected = match (o.status, exact) {
                    (OrderStatus::Reserved, true) => "ok",
                    (OrderStatus::Reserved, false) => "payment_mismatch",
                    (_, true) if o.paid => "ok",
                    (_, false) if o.paid => "payment_mismatch",
                    _ => "invalid_transition",
                };
                let pref = PaymentRef::parse(&format!("pay-{}", o.order.id)).expect("valid");
                let got = e.pay(admin(), o.order.id, pref, amount, None).await;
                assert_eq!(kind(&got), expected, "step {step} {op:?} on {:?}", o.status);
                if expected == "ok" && o.status == OrderStatus::Reserved {
                    o.status = OrderStatus::Paid;
                    o.paid = true;
                }
            }
            Op::Cancel { order, by_owner } => {
                let Some(i) = pick(&m, order) else { continue };
                let o = &mut m.orders[i];
                let who = if by_owner {
                    o.owner
                } else {
                    (o.owner + 1) % USERS
                };
                let expected = match (by_owner, o.status) {
                    (false, _) => "forbidden",
                    (true, OrderStatus::Reserved) => "ok",
                    (true, _) => "invalid_transition",
                };
                let got = e.cancel(customer(&format!("u{who}")), o.order.id).await;
                assert_eq!(kind(&got), expected, "step {step} {op:?} on {:?}", o.status);
                if expected == "ok" {
                    o.status = OrderStatus::Cancelled;
                }
            }
            Op::Ship { order } => {
                let Some(i) = pick(&m, order) else { continue };
                let o = &mut m.orders[i];
                let expected = if o.status == OrderStatus::Paid {
                    "ok"
                } else {
                    "invalid_transition"
                };
                let got = e.ship(admin(), o.order.id).await;
                assert_eq!(kind(&got), expected, "step {step} {op:?} on {:?}", o.status);
                if expected == "ok" {
                    o.status = OrderStatus::Shipped;
                    for (k, (_, qty)) in o.lines.iter().enumerate() {
                        o.shipped[k] = qty - o.refunded[k];
                    }
                }
            }
            Op::Deliver { order } => {
                let Some(i) = pick(&m, order) else { continue };
                let o = &mut m.orders[i];
                let expected = if o.status == OrderStatus::Shipped {
                    "ok"
                } else {
                    "invalid_transition"
                };
                let got = e.deliver(admin(), o.order.id).await;
                assert_eq!(kind(&got), expected, "step {step} {op:?} on {:?}", o.status);
                if expected == "ok" {
                    o.status = OrderStatus::Delivered;
                }
            }
            Op::Refund {
                order,
                line: l,
                qty,
                restock,
            } => {
                let Some(i) = pick(&m, order) else { continue };
                let o = &mut m.orders[i];
                let k = l % o.lines.len();
                let (s, ordered) = o.lines[k];
                let left = ordered - o.refunded[k];
                let refundable = matches!(
                    o.status,
                    OrderStatus::Paid | OrderStatus::Shipped | OrderStatus::Delivered
                );
                let expected = match (refundable, qty <= left) {
                    (false, _) => "invalid_transition",
                    (true, false) => "invalid",
                    (true, true) => "ok",
                };
                let got = e
                    .refund(
                        admin(),
                        o.order.id,
                        vec![line(&sku_name(s), qty)],
                        restock,
                        None,
                    )
                    .await;
                assert_eq!(kind(&got), expected, "step {step} {op:?} on {:?}", o.status);
                if expected == "ok" {
                    if o.status != OrderStatus::Paid && restock {
                        m.stock_in[usize::from(s)] += u64::from(qty);
                    }
                    o.refunded[k] += qty;
                    if o.lines.iter().zip(&o.refunded).all(|((_, q), r)| q == r) {
                        o.status = OrderStatus::Refunded;
                    }
                    if let Ok(order) = got {
                        assert!(order.refunded_cents <= order.paid_cents);
                    }
                }
            }
            Op::Restock { sku: s, qty } => {
                e.restock(sku(&sku_name(s)), qty, None)
                    .await
                    .expect("restocked");
                m.stock_in[usize::from(s)] += qty;
            }
            Op::Tick { ms } => {
                h.clock.advance_ms(ms);
                m.now_ms += ms;
                e.expire_due().await.expect("expiry sweep");
                m.expire_overdue();
            }
        }
        // The books after every step.
        for i in 0..3u8 {
            let view = e.sku(sku(&sku_name(i))).await.expect("sku");
            let l = view.levels;
            let got = Counters {
                on_hand: l.on_hand,
                available: l.available,
                reserved: l.reserved,
                allocated: l.allocated,
                shipped: l.shipped,
                stock_in: l.stock_in,
            };
            assert_eq!(got, m.counters(i), "step {step} after {op:?}: SKU s{i}");
        }
        for mo in &m.orders {
            let got = e.order(admin(), mo.order.id).await.expect("order");
            assert_eq!(
                got.status, mo.status,
                "step {step} after {op:?}: order {}",
                mo.order.id
            );
            let refunded: Vec<u32> = got.lines.iter().map(|l| l.refunded_qty).collect();
            assert_eq!(refunded, mo.refunded, "step {step}: order {}", mo.order.id);
            assert!(got.refunded_cents <= got.paid_cents);
        }
    }
    let state = assert_replay_matches(&h).await;
    let mut by_status: HashMap<OrderStatus, usize> = HashMap::new();
    for o in state.orders.orders() {
        *by_status.entry(o.status).or_default() += 1;
    }
    let counts = h.engine.order_counts().await.expect("counts");
    for (status, count) in counts {
        assert_eq!(
            by_status.get(&status).copied().unwrap_or(0) as u64,
            count,
            "{status}"
        );
    }
    h.engine.shutdown();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_follows_the_reference_model(ops in prop::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run(ops));
    }
}
