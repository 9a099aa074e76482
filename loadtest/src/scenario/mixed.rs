//! Customers doing what shoppers do: the `mixed` and `soak` workload.
//!
//! Each worker owns its own customers (no two workers share one), so its view
//! of their carts and orders is exact as long as the server answers. Every
//! step is one request, picked by weight:
//!
//! | share | request |
//! | --- | --- |
//! | 10 % | `GET /v1/skus` |
//! | 35 % | `GET /v1/skus/{id}` |
//! | 15 % | `PUT /v1/cart/items/{id}` |
//! | 6 % | `POST /v1/cart/checkout` (a third with a promo code) |
//! | 12 % | `POST /v1/orders` (one or two lines) |
//! | 10 % | `POST /v1/orders/{id}/pay` (admin, the payment callback) |
//! | 5 % | `POST /v1/orders/{id}/cancel` |
//! | 3 % | `POST /v1/orders/{id}/refund` (admin, every unit) |
//! | 4 % | `GET /v1/orders/{id}` |
//!
//! A step that has nothing to act on (pay with no reserved order) browses a
//! SKU instead. A cart change that got no answer makes the cart unknown; the
//! customer's next step reads it back (`GET /v1/cart`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper::Method;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::json;

use super::{Ctx, Load, WorkerOutput, endpoint};
use crate::books::{AckedOrder, AckedState, Line, path_segment};
use crate::client::{Answer, Call, Failure};
use crate::limits;
use crate::rng::SmallRng;
use crate::stats::Class;
use crate::token::Minter;

/// The SKUs and promotion a mixed run created.
#[derive(Debug)]
pub struct Catalog {
    /// SKU ids, in creation order.
    pub skus: Vec<Arc<str>>,
    /// SKU id to index.
    index: HashMap<String, usize>,
    /// A promotion code customers sometimes use.
    pub promo_code: Option<String>,
}

impl Catalog {
    /// A catalog of these SKUs.
    #[must_use]
    pub fn new(skus: Vec<Arc<str>>, promo_code: Option<String>) -> Self {
        let index = skus
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i))
            .collect();
        Self {
            skus,
            index,
            promo_code,
        }
    }
}

/// One customer as its worker sees it.
#[derive(Debug)]
pub struct Customer {
    user_id: Arc<str>,
    token: Arc<str>,
    /// SKU index to qty.
    cart: BTreeMap<usize, u64>,
    cart_known: bool,
    /// Indexes into the worker's acked orders.
    orders: Vec<usize>,
}

impl Customer {
    /// A customer with an empty cart.
    #[must_use]
    pub fn new(user_id: Arc<str>, token: Arc<str>) -> Self {
        Self {
            user_id,
            token,
            cart: BTreeMap::new(),
            cart_known: true,
            orders: Vec::new(),
        }
    }
}

/// Mints customer `i` of a mixed run.
///
/// # Errors
///
/// Signing failed.
pub fn mint_customer(minter: &Minter, user_id: &str) -> Result<Customer> {
    let token = minter
        .customer(user_id)
        .with_context(|| format!("minting a token for {user_id}"))?;
    Ok(Customer::new(user_id.into(), token.into()))
}

/// What the worker knows about an order beyond [`AckedOrder`].
#[derive(Debug, Clone, Copy)]
struct OrderMeta {
    total_cents: u64,
    /// The server refused a change we expected to work (it may have expired):
    /// do not pick it again.
    stale: bool,
}

#[derive(Debug, Deserialize)]
struct CreatedOrder {
    order_id: String,
    total_cents: u64,
    lines: Vec<CreatedLine>,
}

#[derive(Debug, Deserialize)]
struct CreatedLine {
    sku_id: String,
    qty: u64,
}

#[derive(Debug, Deserialize)]
struct CartView {
    items: Vec<CreatedLine>,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    BrowseList,
    BrowseSku,
    CartPut,
    Checkout,
    Order,
    Pay,
    Cancel,
    Refund,
    GetOrder,
}

/// Weights in percent; they add up to 100.
const WEIGHTS: [(Action, u64); 9] = [
    (Action::BrowseList, 10),
    (Action::BrowseSku, 35),
    (Action::CartPut, 15),
    (Action::Checkout, 6),
    (Action::Order, 12),
    (Action::Pay, 10),
    (Action::Cancel, 5),
    (Action::Refund, 3),
    (Action::GetOrder, 4),
];
const WEIGHT_TOTAL: u64 = 100;
const _: () = {
    let mut sum = 0;
    let mut i = 0;
    while i < WEIGHTS.len() {
        sum += WEIGHTS[i].1;
        i += 1;
    }
    assert!(sum == WEIGHT_TOTAL);
};

/// A worker's customers.
#[derive(Debug)]
pub struct MixedAgent {
    key_prefix: String,
    catalog: Arc<Catalog>,
    admin_token: Arc<str>,
    customers: Vec<Customer>,
    meta: Vec<OrderMeta>,
    rng: SmallRng,
    seq: u64,
    out: WorkerOutput,
}

impl MixedAgent {
    /// An agent for worker `worker` with its own customers.
    #[must_use]
    pub fn new(
        run_id: &str,
        worker: u32,
        catalog: Arc<Catalog>,
        admin_token: Arc<str>,
        customers: Vec<Customer>,
        seed: u64,
    ) -> Self {
        Self {
            key_prefix: format!("{run_id}-w{worker}"),
            catalog,
            admin_token,
            customers,
            meta: Vec::new(),
            rng: SmallRng::new(seed ^ u64::from(worker).wrapping_mul(0x9E37_79B9)),
            seq: 0,
            out: WorkerOutput::default(),
        }
    }

    fn next_key(&mut self) -> String {
        self.seq = self.seq.saturating_add(1);
        format!("{}-{}", self.key_prefix, self.seq)
    }

    fn pick_action(&mut self) -> Action {
        let mut roll = self.rng.below(WEIGHT_TOTAL);
        for (action, weight) in WEIGHTS {
            if roll < weight {
                return action;
            }
            roll -= weight;
        }
        Action::BrowseSku
    }

    /// One request by a random customer.
    pub async fn step(&mut self, ctx: &mut Ctx<'_>, load: &Load) {
        if self.customers.is_empty() {
            return;
        }
        let c = self.rng.index(self.customers.len());
        let known = self.customers.get(c).is_some_and(|cu| cu.cart_known);
        if !known {
            self.read_cart(ctx, c).await;
            return;
        }
        let done = match self.pick_action() {
            Action::BrowseList => {
                let _ = ctx.send(endpoint::SKUS_LIST, &Call::get("/v1/skus")).await;
                true
            }
            Action::BrowseSku => false,
            Action::CartPut => {
                self.cart_put(ctx, c).await;
                true
            }
            Action::Checkout => self.checkout(ctx, c, load).await,
            Action::Order => {
                self.order(ctx, c, load).await;
                true
            }
            Action::Pay => self.pay(ctx, c).await,
            Action::Cancel => self.cancel(ctx, c).await,
            Action::Refund => self.refund(ctx, c).await,
            Action::GetOrder => self.get_order(ctx, c).await,
        };
        if !done {
            self.browse_sku(ctx).await;
        }
    }

    fn random_sku(&mut self) -> (usize, Arc<str>) {
        let i = self.rng.index(self.catalog.skus.len());
        let id = self
            .catalog
            .skus
            .get(i)
            .cloned()
            .unwrap_or_else(|| Arc::from(""));
        (i, id)
    }

    fn random_qty(&mut self) -> u64 {
        self.rng
            .below(u64::from(limits::MIXED_QTY_MAX))
            .saturating_add(1)
    }

    async fn browse_sku(&mut self, ctx: &mut Ctx<'_>) {
        let (_, sku) = self.random_sku();
        let path = format!("/v1/skus/{}", path_segment(&sku));
        let _ = ctx.send(endpoint::SKUS_GET, &Call::get(&path)).await;
    }

    async fn read_cart(&mut self, ctx: &mut Ctx<'_>, c: usize) {
        let Some(token) = self.customers.get(c).map(|cu| cu.token.clone()) else {
            return;
        };
        let (result, _) = ctx
            .send(endpoint::CART_GET, &Call::get("/v1/cart").token(&token))
            .await;
        if let Ok(answer) = result
            && answer.status == 200
        {
            self.set_cart(c, &answer);
        }
    }

    /// Takes the cart from a 200 cart body; an unreadable one stays unknown.
    fn set_cart(&mut self, c: usize, answer: &Answer) {
        let parsed = answer.json::<CartView>().ok();
        let Some(customer) = self.customers.get_mut(c) else {
            return;
        };
        match parsed {
            Some(view) => {
                customer.cart = view
                    .items
                    .iter()
                    .filter_map(|item| Some((*self.catalog.index.get(&item.sku_id)?, item.qty)))
                    .collect();
                // A SKU not of this run in the cart: we cannot reason about it.
                customer.cart_known = customer.cart.len() == view.items.len();
            }
            None => customer.cart_known = false,
        }
    }

    async fn cart_put(&mut self, ctx: &mut Ctx<'_>, c: usize) {
        let (_, sku) = self.random_sku();
        let qty = self.random_qty();
        let Some(token) = self.customers.get(c).map(|cu| cu.token.clone()) else {
            return;
        };
        let path = format!("/v1/cart/items/{}", path_segment(&sku));
        let body = Bytes::from(json!({ "qty": qty }).to_string());
        let call = Call::json(Method::PUT, &path, body).token(&token);
        let (result, _) = ctx.send(endpoint::CART_PUT, &call).await;
        match result {
            Ok(answer) if answer.status == 200 => self.set_cart(c, &answer),
            Ok(answer) if answer.status < 500 => {}
            _ => {
                if let Some(customer) = self.customers.get_mut(c) {
                    customer.cart_known = false;
                }
            }
        }
    }

    /// Remembers a 201 order; returns the units it holds (0 when its body
    /// was unreadable).
    fn remember(
        &mut self,
        c: usize,
        answer: &Answer,
        lines: Option<Vec<Line>>,
        load: &Load,
    ) -> u64 {
        let Ok(created) = answer.json::<CreatedOrder>() else {
            self.out.unreadable_acks = self.out.unreadable_acks.saturating_add(1);
            return 0;
        };
        let Some(customer) = self.customers.get_mut(c) else {
            return 0;
        };
        let lines = lines.unwrap_or_else(|| {
            created
                .lines
                .iter()
                .map(|l| Line {
                    sku_id: l.sku_id.clone(),
                    qty: l.qty,
                })
                .collect()
        });
        let units = lines.iter().map(|l| l.qty).sum();
        customer.orders.push(self.out.acked.len());
        self.out.acked.push(AckedOrder {
            order_id: created.order_id,
            user_id: customer.user_id.to_string(),
            lines,
            state: AckedState::Reserved,
            uncertain: false,
        });
        self.meta.push(OrderMeta {
            total_cents: created.total_cents,
            stale: false,
        });
        self.out.last_granted_ms = Some(load.elapsed_ms());
        units
    }

    fn unknown_lines(&mut self, lines: &[Line]) {
        for line in lines {
            self.out.unknown(&line.sku_id, line.qty);
        }
    }

    fn promo(&mut self) -> Option<String> {
        let code = self.catalog.promo_code.clone()?;
        (self.rng.below(3) == 0).then_some(code)
    }

    async fn checkout(&mut self, ctx: &mut Ctx<'_>, c: usize, load: &Load) -> bool {
        let Some(customer) = self.customers.get(c) else {
            return false;
        };
        if customer.cart.is_empty() {
            return false;
        }
        let token = customer.token.clone();
        let cart_lines: Vec<Line> = customer
            .cart
            .iter()
            .filter_map(|(i, qty)| {
                Some(Line {
                    sku_id: self.catalog.skus.get(*i)?.to_string(),
                    qty: *qty,
                })
            })
            .collect();
        let body = match self.promo() {
            Some(code) => json!({ "promo_code": code }),
            None => json!({}),
        };
        let key = self.next_key();
        let call = Call::json(
            Method::POST,
            "/v1/cart/checkout",
            Bytes::from(body.to_string()),
        )
        .token(&token)
        .idempotency_key(&key);
        let (result, outcome) = ctx.send(endpoint::CART_CHECKOUT, &call).await;
        match result {
            Ok(answer) if answer.status == 201 => {
                // The body's lines are what the server took from the cart.
                let units = self.remember(c, &answer, None, load);
                ctx.granted(units);
                if let Some(customer) = self.customers.get_mut(c) {
                    customer.cart.clear();
                }
            }
            Ok(_) if outcome.class() == Class::Rejected => {}
            Ok(answer) if answer.status < 500 => self.forget_cart(c),
            _ => {
                self.unknown_lines(&cart_lines);
                self.forget_cart(c);
            }
        }
        true
    }

    fn forget_cart(&mut self, c: usize) {
        if let Some(customer) = self.customers.get_mut(c) {
            customer.cart_known = false;
        }
    }

    async fn order(&mut self, ctx: &mut Ctx<'_>, c: usize, load: &Load) {
        let (first, sku_a) = self.random_sku();
        let mut lines = vec![Line {
            sku_id: sku_a.to_string(),
            qty: self.random_qty(),
        }];
        if self.rng.below(3) == 0 {
            let (second, sku_b) = self.random_sku();
            if second != first {
                lines.push(Line {
                    sku_id: sku_b.to_string(),
                    qty: self.random_qty(),
                });
            }
        }
        let Some(token) = self.customers.get(c).map(|cu| cu.token.clone()) else {
            return;
        };
        let items: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| json!({ "sku_id": l.sku_id, "qty": l.qty }))
            .collect();
        let body = match self.promo() {
            Some(code) => json!({ "items": items, "promo_code": code }),
            None => json!({ "items": items }),
        };
        let key = self.next_key();
        let call = Call::json(Method::POST, "/v1/orders", Bytes::from(body.to_string()))
            .token(&token)
            .idempotency_key(&key);
        let (result, _) = ctx.send(endpoint::ORDERS_CREATE, &call).await;
        match result {
            Ok(answer) if answer.status == 201 => {
                let units = self.remember(c, &answer, Some(lines), load);
                ctx.granted(units);
            }
            Ok(answer) if answer.status < 500 => {}
            _ => self.unknown_lines(&lines),
        }
    }

    /// A random order of customer `c` in `state`, whose state we are sure of.
    fn pick_order(&mut self, c: usize, state: AckedState) -> Option<usize> {
        let candidates: Vec<usize> = self
            .customers
            .get(c)?
            .orders
            .iter()
            .copied()
            .filter(|i| {
                let sure = self
                    .out
                    .acked
                    .get(*i)
                    .is_some_and(|o| o.state == state && !o.uncertain);
                sure && self.meta.get(*i).is_some_and(|m| !m.stale)
            })
            .collect();
        let pick = self.rng.index(candidates.len());
        candidates.get(pick).copied()
    }

    /// Applies the answer to a state change of order `i`.
    fn settle(&mut self, i: usize, result: &Result<Answer, Failure>, to: AckedState) {
        match result {
            Ok(answer) if answer.status == 200 => {
                if let Some(order) = self.out.acked.get_mut(i) {
                    order.state = to;
                }
            }
            Ok(answer) if answer.status < 500 => {
                if let Some(meta) = self.meta.get_mut(i) {
                    meta.stale = true;
                }
            }
            _ => {
                if let Some(order) = self.out.acked.get_mut(i) {
                    order.uncertain = true;
                }
            }
        }
    }

    async fn pay(&mut self, ctx: &mut Ctx<'_>, c: usize) -> bool {
        let Some(i) = self.pick_order(c, AckedState::Reserved) else {
            return false;
        };
        let (Some(order), Some(meta)) = (self.out.acked.get(i), self.meta.get(i)) else {
            return false;
        };
        let path = format!("/v1/orders/{}/pay", path_segment(&order.order_id));
        let total_cents = meta.total_cents;
        let key = self.next_key();
        let body = json!({ "payment_ref": format!("pay-{key}"), "amount_cents": total_cents });
        let admin = self.admin_token.clone();
        let call = Call::json(Method::POST, &path, Bytes::from(body.to_string()))
            .token(&admin)
            .idempotency_key(&key);
        let (result, _) = ctx.send(endpoint::ORDERS_PAY, &call).await;
        self.settle(i, &result, AckedState::Paid);
        true
    }

    async fn cancel(&mut self, ctx: &mut Ctx<'_>, c: usize) -> bool {
        let Some(i) = self.pick_order(c, AckedState::Reserved) else {
            return false;
        };
        let Some(order) = self.out.acked.get(i) else {
            return false;
        };
        let Some(token) = self.customers.get(c).map(|cu| cu.token.clone()) else {
            return false;
        };
        let path = format!("/v1/orders/{}/cancel", path_segment(&order.order_id));
        let call = Call {
            method: Method::POST,
            path: &path,
            token: Some(&token),
            idempotency_key: None,
            body: None,
        };
        let (result, _) = ctx.send(endpoint::ORDERS_CANCEL, &call).await;
        self.settle(i, &result, AckedState::Cancelled);
        true
    }

    async fn refund(&mut self, ctx: &mut Ctx<'_>, c: usize) -> bool {
        let Some(i) = self.pick_order(c, AckedState::Paid) else {
            return false;
        };
        let Some(order) = self.out.acked.get(i) else {
            return false;
        };
        let path = format!("/v1/orders/{}/refund", path_segment(&order.order_id));
        let lines: Vec<serde_json::Value> = order
            .lines
            .iter()
            .map(|l| json!({ "sku_id": l.sku_id, "qty": l.qty }))
            .collect();
        let body = json!({ "lines": lines });
        let key = self.next_key();
        let admin = self.admin_token.clone();
        let call = Call::json(Method::POST, &path, Bytes::from(body.to_string()))
            .token(&admin)
            .idempotency_key(&key);
        let (result, _) = ctx.send(endpoint::ORDERS_REFUND, &call).await;
        self.settle(i, &result, AckedState::Refunded);
        true
    }

    async fn get_order(&mut self, ctx: &mut Ctx<'_>, c: usize) -> bool {
        let Some(customer) = self.customers.get(c) else {
            return false;
        };
        let pick = self.rng.index(customer.orders.len());
        let Some(order) = customer
            .orders
            .get(pick)
            .and_then(|i| self.out.acked.get(*i))
        else {
            return false;
        };
        let path = format!("/v1/orders/{}", path_segment(&order.order_id));
        let token = customer.token.clone();
        let _ = ctx
            .send(endpoint::ORDERS_GET, &Call::get(&path).token(&token))
            .await;
        true
    }

    /// What this worker learned.
    #[must_use]
    pub fn finish(self) -> WorkerOutput {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_follow_their_weights() {
        let catalog = Arc::new(Catalog::new(vec![Arc::from("a")], None));
        let mut agent = MixedAgent::new("r", 0, catalog, Arc::from("t"), Vec::new(), 42);
        let mut browse = 0_u32;
        for _ in 0..10_000 {
            if matches!(agent.pick_action(), Action::BrowseSku) {
                browse += 1;
            }
        }
        assert!(
            (3_000..4_000).contains(&browse),
            "browse-sku share {browse} of 10000"
        );
    }
}
