//! Orders: the state machine, the order itself, and the decisions and
//! applications of every move an order makes.
//!
//! [`transition`] alone decides which moves are legal. An order's name and
//! unit prices are the snapshot taken when it was placed; later catalog
//! changes never touch it. Money is `u64` cents and every sum is checked.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::domain::event::{RefundStock, RefundedLine, ReleaseReason, SkuQty};
use crate::domain::promo::{Promotion, spread_discount};
use crate::domain::refund::refund_cents;
use crate::domain::{
    DomainError, Event, IdemStamp, OrderId, PaymentRef, PromoCode, SkuId, UserId, add, mul,
};
use crate::limits::{LINES_MAX, ORDER_CENTS_MAX, QTY_MAX};

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Units held, waiting for payment until the deadline.
    Reserved,
    /// Paid; units allocated, waiting to ship.
    Paid,
    /// Left the warehouse.
    Shipped,
    /// Arrived.
    Delivered,
    /// Cancelled before payment; units released.
    Cancelled,
    /// Unpaid past its deadline; units released.
    Expired,
    /// Every unit refunded.
    Refunded,
}

impl OrderStatus {
    /// The contract's word for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
            OrderStatus::Refunded => "refunded",
        }
    }

    /// Every state, for metrics.
    pub const ALL: [OrderStatus; 7] = [
        OrderStatus::Reserved,
        OrderStatus::Paid,
        OrderStatus::Shipped,
        OrderStatus::Delivered,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
        OrderStatus::Refunded,
    ];

    /// Whether the order is finished (`delivered`, `cancelled`, `expired`,
    /// `refunded`): only a refund of a delivered order can still change it,
    /// so it may leave memory for the archive.
    pub fn is_final(self) -> bool {
        self == OrderStatus::Delivered || self.is_terminal()
    }

    /// Whether no move leads out of this state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            OrderStatus::Cancelled | OrderStatus::Expired | OrderStatus::Refunded
        )
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is asked of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Record a payment.
    Pay,
    /// Cancel before payment.
    Cancel,
    /// Expire past the deadline.
    Expire,
    /// Ship.
    Ship,
    /// Mark delivered.
    Deliver,
    /// Refund some units, keeping the state.
    Refund,
    /// Refund the last units, ending in `refunded`.
    RefundAll,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Pay => "paid",
            Action::Cancel => "cancelled",
            Action::Expire => "expired",
            Action::Ship => "shipped",
            Action::Deliver => "delivered",
            Action::Refund | Action::RefundAll => "refunded",
        })
    }
}

/// The order state machine; nothing else decides legality.
///
/// # Errors
/// `DomainError::InvalidTransition` for every move the contract does not list.
pub fn transition(from: OrderStatus, action: Action) -> Result<OrderStatus, DomainError> {
    use {Action as A, OrderStatus as S};
    match (from, action) {
        (S::Reserved, A::Pay) => Ok(S::Paid),
        (S::Reserved, A::Cancel) => Ok(S::Cancelled),
        (S::Reserved, A::Expire) => Ok(S::Expired),
        (S::Paid, A::Ship) => Ok(S::Shipped),
        (S::Shipped, A::Deliver) => Ok(S::Delivered),
        (S::Paid | S::Shipped | S::Delivered, A::Refund) => Ok(from),
        (S::Paid | S::Shipped | S::Delivered, A::RefundAll) => Ok(S::Refunded),
        (from, action) => Err(DomainError::InvalidTransition { from, action }),
    }
}

/// One line of an order, with the name and price snapshot taken at placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    /// The SKU.
    pub sku: SkuId,
    /// Its name when the order was placed.
    pub name: String,
    /// Units ordered.
    pub qty: u32,
    /// Its unit price when the order was placed.
    pub unit_price_cents: u64,
    /// This line's share of the order discount.
    pub discount_cents: u64,
    /// Units refunded so far.
    pub refunded_qty: u32,
}

impl OrderLine {
    /// Units not refunded yet.
    pub fn units_left(&self) -> u32 {
        self.qty.saturating_sub(self.refunded_qty)
    }
}

/// One entry of an order's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    /// The state entered.
    pub status: OrderStatus,
    /// When, in unix milliseconds.
    pub at_ms: u64,
}

/// A line as reserved, before the order is placed: the SKU actor's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReservedLine {
    /// The SKU.
    pub sku: SkuId,
    /// Its name at reservation time.
    pub name: String,
    /// Units held.
    pub qty: u32,
    /// Its price at reservation time.
    pub unit_price_cents: u64,
}

/// An order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its id.
    pub id: OrderId,
    /// Its owner.
    pub user: UserId,
    /// Where it is.
    pub status: OrderStatus,
    /// Its lines; one per SKU.
    pub lines: Vec<OrderLine>,
    /// Sum of `qty * unit_price_cents`.
    pub subtotal_cents: u64,
    /// The promotion's discount, spread over the lines.
    pub discount_cents: u64,
    /// `subtotal_cents - discount_cents`: what must be paid.
    pub total_cents: u64,
    /// What was paid.
    pub paid_cents: u64,
    /// What was refunded; never more than `paid_cents`.
    pub refunded_cents: u64,
    /// The promotion used, if any.
    pub promo_code: Option<PromoCode>,
    /// The payment's reference, once paid.
    pub payment_ref: Option<PaymentRef>,
    /// When it was placed, unix milliseconds.
    pub created_at_ms: u64,
    /// When an unpaid order expires, unix milliseconds.
    pub expires_at_ms: u64,
    /// Every state it entered, in order.
    pub history: Vec<StatusChange>,
}

impl Order {
    /// Builds a newly placed order from its reserved lines: totals, the
    /// promotion's discount spread over the lines, the deadline.
    ///
    /// # Errors
    /// `Invalid` for no lines, too many, a repeated SKU or a quantity out of
    /// range; `Overflow` when a total does not fit.
    pub fn place(
        id: OrderId,
        user: UserId,
        lines: Vec<ReservedLine>,
        promo: Option<&Promotion>,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<Order, DomainError> {
        if lines.is_empty() || lines.len() > LINES_MAX {
            return Err(DomainError::invalid(format!(
                "an order has 1 to {LINES_MAX} lines"
            )));
        }
        let mut line_cents = Vec::with_capacity(lines.len());
        for (index, line) in lines.iter().enumerate() {
            if line.qty == 0 || line.qty > QTY_MAX {
                return Err(DomainError::invalid(format!("qty must be 1 to {QTY_MAX}")));
            }
            if lines[..index].iter().any(|earlier| earlier.sku == line.sku) {
                return Err(DomainError::invalid(format!(
                    "SKU {} appears on two lines",
                    line.sku
                )));
            }
            line_cents.push(mul(u64::from(line.qty), line.unit_price_cents, "subtotal")?);
        }
        let subtotal_cents = line_cents
            .iter()
            .try_fold(0u64, |sum, &c| add(sum, c, "subtotal"))?;
        if subtotal_cents > ORDER_CENTS_MAX {
            return Err(DomainError::Overflow { what: "subtotal" });
        }
        let discount_cents = promo.map_or(0, |p| p.discount_for(subtotal_cents));
        let shares = spread_discount(&line_cents, discount_cents)?;
        let expires_at_ms = add(now_ms, ttl_ms, "expires_at")?;
        Ok(Order {
            id,
            user,
            status: OrderStatus::Reserved,
            lines: lines
                .into_iter()
                .zip(shares)
                .map(|(line, discount_cents)| OrderLine {
                    sku: line.sku,
                    name: line.name,
                    qty: line.qty,
                    unit_price_cents: line.unit_price_cents,
                    discount_cents,
                    refunded_qty: 0,
                })
                .collect(),
            subtotal_cents,
            discount_cents,
            total_cents: subtotal_cents - discount_cents, // discount <= subtotal
            paid_cents: 0,
            refunded_cents: 0,
            promo_code: promo.filter(|_| discount_cents > 0).map(|p| p.code),
            payment_ref: None,
            created_at_ms: now_ms,
            expires_at_ms,
            history: vec![StatusChange {
                status: OrderStatus::Reserved,
                at_ms: now_ms,
            }],
        })
    }

    /// The order as it was when its history had `history_len` entries, its
    /// `refunded_cents` was `refunded_cents` and its lines had
    /// `refunded_qty` refunded (empty: none): an idempotent request's first
    /// answer, rendered again from the order as it is now.
    ///
    /// Exact because every later move only appends to the history, sets
    /// the payment once (leaving `reserved`, so a history without `paid`
    /// has none) and raises the refunded amounts; the rest of an order
    /// never changes after it is placed.
    ///
    /// # Errors
    /// `Inconsistent` when this order cannot have grown from that one: a
    /// history shorter than `history_len` (or `history_len` 0), more
    /// refunded than now, or another number of lines.
    pub fn as_of(
        &self,
        history_len: usize,
        refunded_cents: u64,
        refunded_qty: &[u32],
    ) -> Result<Order, DomainError> {
        let bad =
            |what: &str| DomainError::inconsistent(format!("order {} was never {what}", self.id));
        let history = self
            .history
            .get(..history_len)
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad(&format!("{history_len} steps into its history")))?;
        let status = history
            .last()
            .map(|change| change.status)
            .ok_or_else(|| bad("without a history"))?;
        if refunded_cents > self.refunded_cents {
            return Err(bad(&format!("refunded {refunded_cents} cents")));
        }
        if !refunded_qty.is_empty() && refunded_qty.len() != self.lines.len() {
            return Err(bad(&format!("{} lines long", refunded_qty.len())));
        }
        let mut then = self.clone();
        for (index, line) in then.lines.iter_mut().enumerate() {
            let qty = refunded_qty.get(index).copied().unwrap_or(0);
            if qty > line.refunded_qty {
                return Err(bad(&format!("refunded {qty} units of SKU {}", line.sku)));
            }
            line.refunded_qty = qty;
        }
        let paid = history.iter().any(|c| c.status == OrderStatus::Paid);
        if !paid {
            then.paid_cents = 0;
            then.payment_ref = None;
        }
        then.status = status;
        then.refunded_cents = refunded_cents;
        then.history.truncate(history_len);
        Ok(then)
    }

    /// Whether this order is unpaid past its deadline: it must expire before
    /// anything else happens to it.
    pub fn is_overdue(&self, now_ms: u64) -> bool {
        self.status == OrderStatus::Reserved && now_ms >= self.expires_at_ms
    }

    /// Every line's full quantity, as SKU moves.
    fn all_units(&self) -> Vec<SkuQty> {
        self.lines
            .iter()
            .map(|l| SkuQty {
                sku: l.sku,
                qty: l.qty,
            })
            .collect()
    }

    /// The units not refunded yet, as SKU moves.
    fn units_left(&self) -> Vec<SkuQty> {
        self.lines
            .iter()
            .filter(|l| l.units_left() > 0)
            .map(|l| SkuQty {
                sku: l.sku,
                qty: l.units_left(),
            })
            .collect()
    }

    /// Decides a payment callback: `Some(event)` records the payment; `None`
    /// is a repeat of the recorded payment (same `payment_ref` and amount),
    /// which changes nothing and is not an error.
    ///
    /// # Errors
    /// `PaymentMismatch` when the amount is not the total (or not what the
    /// same reference paid before); `InvalidTransition` otherwise.
    pub fn decide_pay(
        &self,
        payment_ref: PaymentRef,
        amount_cents: u64,
        idem: Option<IdemStamp>,
        now_ms: u64,
    ) -> Result<Option<Event>, DomainError> {
        if self.status != OrderStatus::Reserved && self.payment_ref == Some(payment_ref) {
            if amount_cents != self.paid_cents {
                return Err(DomainError::PaymentMismatch {
                    total_cents: self.paid_cents,
                    paid_cents: amount_cents,
                });
            }
            return Ok(None);
        }
        transition(self.status, Action::Pay)?;
        if amount_cents != self.total_cents {
            return Err(DomainError::PaymentMismatch {
                total_cents: self.total_cents,
                paid_cents: amount_cents,
            });
        }
        Ok(Some(Event::OrderPaid {
            order: self.id,
            payment_ref,
            amount_cents,
            lines: self.all_units(),
            idem,
            at_ms: now_ms,
        }))
    }

    /// Decides a cancellation or an expiry.
    ///
    /// # Errors
    /// `InvalidTransition` unless the order is reserved.
    pub fn decide_release(&self, reason: ReleaseReason, now_ms: u64) -> Result<Event, DomainError> {
        let action = match reason {
            ReleaseReason::Cancelled => Action::Cancel,
            ReleaseReason::Expired => Action::Expire,
        };
        transition(self.status, action)?;
        Ok(Event::OrderReleased {
            order: self.id,
            user: self.user,
            reason,
            lines: self.all_units(),
            at_ms: now_ms,
        })
    }

    /// Decides a shipment of every unit not refunded.
    ///
    /// # Errors
    /// `InvalidTransition` unless the order is paid.
    pub fn decide_ship(&self, now_ms: u64) -> Result<Event, DomainError> {
        transition(self.status, Action::Ship)?;
        Ok(Event::OrderShipped {
            order: self.id,
            lines: self.units_left(),
            at_ms: now_ms,
        })
    }

    /// Decides a delivery.
    ///
    /// # Errors
    /// `InvalidTransition` unless the order is shipped.
    pub fn decide_deliver(&self, now_ms: u64) -> Result<Event, DomainError> {
        transition(self.status, Action::Deliver)?;
        Ok(Event::OrderDelivered {
            order: self.id,
            at_ms: now_ms,
        })
    }

    /// Decides a refund of some units. Repeated SKUs in the request add up.
    ///
    /// # Errors
    /// `InvalidTransition` unless paid, shipped or delivered; `Invalid` for no
    /// lines, a SKU the order does not have, or more units than are left.
    pub fn decide_refund(
        &self,
        request: &[SkuQty],
        restock: bool,
        idem: Option<IdemStamp>,
        now_ms: u64,
    ) -> Result<Event, DomainError> {
        transition(self.status, Action::Refund)?;
        if request.is_empty() || request.len() > LINES_MAX {
            return Err(DomainError::invalid(format!(
                "a refund has 1 to {LINES_MAX} lines"
            )));
        }
        // Units asked per order line, adding up repeated SKUs.
        let mut asked = vec![0u32; self.lines.len()];
        for part in request {
            let index = self
                .lines
                .iter()
                .position(|l| l.sku == part.sku)
                .ok_or_else(|| {
                    DomainError::invalid(format!("the order has no line for SKU {}", part.sku))
                })?;
            asked[index] = asked[index]
                .checked_add(part.qty)
                .ok_or(DomainError::Overflow { what: "qty" })?;
        }
        let mut lines = Vec::new();
        let mut total_cents = 0u64;
        for (index, (line, &qty)) in self.lines.iter().zip(&asked).enumerate() {
            if qty == 0 {
                continue;
            }
            let cents = refund_cents(
                line.unit_price_cents,
                line.qty,
                line.discount_cents,
                line.refunded_qty,
                qty,
            )
            .map_err(|e| match e {
                DomainError::Invalid(_) => DomainError::invalid(format!(
                    "can refund at most {} more units of SKU {}",
                    line.units_left(),
                    line.sku
                )),
                other => other,
            })?;
            total_cents = add(total_cents, cents, "refund")?;
            lines.push(RefundedLine {
                line: u32::try_from(index).map_err(|_| DomainError::Overflow { what: "line" })?,
                sku: line.sku,
                qty,
                cents,
            });
        }
        if add(self.refunded_cents, total_cents, "refund")? > self.paid_cents {
            return Err(DomainError::inconsistent("a refund above what was paid"));
        }
        let stock = match (self.status, restock) {
            (OrderStatus::Paid, _) => RefundStock::Unallocate,
            (_, true) => RefundStock::Restock,
            (_, false) => RefundStock::Keep,
        };
        Ok(Event::OrderRefunded {
            order: self.id,
            user: self.user,
            lines,
            stock,
            idem,
            at_ms: now_ms,
        })
    }

    /// The state `action` leads to, for an event being applied: an illegal
    /// move there means the journal or the code is broken.
    fn next_status(&self, action: Action) -> Result<OrderStatus, DomainError> {
        transition(self.status, action).map_err(|e| {
            DomainError::inconsistent(format!("order {} replayed an illegal move: {e}", self.id))
        })
    }

    /// Enters `status` at `at_ms` (a partial refund keeps the state and adds
    /// no history).
    fn enter(&mut self, status: OrderStatus, at_ms: u64) {
        if status != self.status {
            self.status = status;
            self.history.push(StatusChange { status, at_ms });
        }
    }

    /// Checks that an event's SKU moves are this order's lines: every unit,
    /// or (`left_only`) the units not refunded.
    fn check_moves(&self, moves: &[SkuQty], left_only: bool) -> Result<(), DomainError> {
        let expected = self.lines.iter().filter_map(|l| {
            let qty = if left_only { l.units_left() } else { l.qty };
            (qty > 0).then_some(SkuQty { sku: l.sku, qty })
        });
        if !moves.iter().copied().eq(expected) {
            return Err(DomainError::inconsistent(format!(
                "order {}: event moves {moves:?}, not the units the order holds",
                self.id
            )));
        }
        Ok(())
    }

    /// Applies an event about this order. Every check runs before anything
    /// changes, so on `Err` the order is unchanged.
    ///
    /// # Errors
    /// `Inconsistent` when the event does not fit the order (a bug or a
    /// damaged journal).
    pub fn apply(&mut self, event: &Event) -> Result<(), DomainError> {
        if event.order_id() != Some(self.id) {
            return Err(DomainError::inconsistent(format!(
                "event for {:?} applied to order {}",
                event.order_id(),
                self.id
            )));
        }
        match event {
            Event::OrderPaid {
                payment_ref,
                amount_cents,
                lines,
                at_ms,
                ..
            } => {
                self.check_moves(lines, false)?;
                if *amount_cents != self.total_cents {
                    return Err(DomainError::inconsistent("a payment that is not the total"));
                }
                let status = self.next_status(Action::Pay)?;
                self.paid_cents = *amount_cents;
                self.payment_ref = Some(*payment_ref);
                self.enter(status, *at_ms);
            }
            Event::OrderReleased {
                reason,
                lines,
                at_ms,
                ..
            } => {
                self.check_moves(lines, false)?;
                let status = self.next_status(match reason {
                    ReleaseReason::Cancelled => Action::Cancel,
                    ReleaseReason::Expired => Action::Expire,
                })?;
                self.enter(status, *at_ms);
            }
            Event::OrderShipped { lines, at_ms, .. } => {
                self.check_moves(lines, true)?;
                let status = self.next_status(Action::Ship)?;
                self.enter(status, *at_ms);
            }
            Event::OrderDelivered { at_ms, .. } => {
                let status = self.next_status(Action::Deliver)?;
                self.enter(status, *at_ms);
            }
            Event::OrderRefunded { lines, at_ms, .. } => {
                // Check every part (adding up repeats of a line) first.
                let mut refunded_cents = self.refunded_cents;
                let mut units_left_after: u64 =
                    self.lines.iter().map(|l| u64::from(l.units_left())).sum();
                for (i, part) in lines.iter().enumerate() {
                    let line = usize::try_from(part.line)
                        .ok()
                        .and_then(|index| self.lines.get(index))
                        .filter(|l| l.sku == part.sku)
                        .ok_or_else(|| DomainError::inconsistent("refund of an unknown line"))?;
                    let asked: u64 = lines[..=i]
                        .iter()
                        .filter(|p| p.line == part.line)
                        .map(|p| u64::from(p.qty))
                        .sum();
                    if part.qty == 0 || asked > u64::from(line.units_left()) {
                        return Err(DomainError::inconsistent("refund of units not left"));
                    }
                    refunded_cents = add(refunded_cents, part.cents, "refunded")?;
                    units_left_after -= u64::from(part.qty);
                }
                if refunded_cents > self.paid_cents {
                    return Err(DomainError::inconsistent("refunded more than was paid"));
                }
                let status = self.next_status(if units_left_after == 0 {
                    Action::RefundAll
                } else {
                    Action::Refund
                })?;
                // Every check passed: change.
                for part in lines {
                    if let Some(line) = usize::try_from(part.line)
                        .ok()
                        .and_then(|i| self.lines.get_mut(i))
                    {
                        line.refunded_qty += part.qty;
                    }
                }
                self.refunded_cents = refunded_cents;
                self.enter(status, *at_ms);
            }
            _ => return Err(DomainError::inconsistent("not an order event")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku(s: &str) -> SkuId {
        SkuId::parse(s).expect("valid sku")
    }

    fn line(s: &str, qty: u32, price: u64) -> ReservedLine {
        ReservedLine {
            sku: sku(s),
            name: format!("name of {s}"),
            qty,
            unit_price_cents: price,
        }
    }

    fn order(lines: &[ReservedLine], promo: Option<&Promotion>) -> Order {
        Order::place(
            OrderId(7),
            UserId::parse("alice").expect("valid"),
            lines.to_vec(),
            promo,
            1_000,
            60_000,
        )
        .expect("placeable")
    }

    fn step(order: &mut Order, decide: impl FnOnce(&Order) -> Result<Event, DomainError>) {
        let event = decide(order).expect("decided");
        order.apply(&event).expect("applied");
    }

    #[test]
    fn the_state_machine_allows_exactly_the_contract_moves() {
        use {Action as A, OrderStatus as S};
        let actions = [
            A::Pay,
            A::Cancel,
            A::Expire,
            A::Ship,
            A::Deliver,
            A::Refund,
            A::RefundAll,
        ];
        let mut allowed = Vec::new();
        for from in S::ALL {
            for action in actions {
                if let Ok(to) = transition(from, action) {
                    allowed.push((from, action, to));
                }
            }
        }
        assert_eq!(
            allowed,
            vec![
                (S::Reserved, A::Pay, S::Paid),
                (S::Reserved, A::Cancel, S::Cancelled),
                (S::Reserved, A::Expire, S::Expired),
                (S::Paid, A::Ship, S::Shipped),
                (S::Paid, A::Refund, S::Paid),
                (S::Paid, A::RefundAll, S::Refunded),
                (S::Shipped, A::Deliver, S::Delivered),
                (S::Shipped, A::Refund, S::Shipped),
                (S::Shipped, A::RefundAll, S::Refunded),
                (S::Delivered, A::Refund, S::Delivered),
                (S::Delivered, A::RefundAll, S::Refunded),
            ]
        );
        for terminal in [S::Cancelled, S::Expired, S::Refunded] {
            assert!(terminal.is_terminal());
            assert!(actions.iter().all(|&a| transition(terminal, a).is_err()));
        }
    }

    #[test]
    fn placing_snapshots_prices_and_spreads_the_promotion() {
        let promo =
            Promotion::new(PromoCode::parse("TEN").expect("valid"), 20_000, 1_000).expect("valid");
        let o = order(&[line("a", 1, 10_000), line("b", 1, 10_000)], Some(&promo));
        assert_eq!(o.subtotal_cents, 20_000);
        assert_eq!(o.discount_cents, 1_000);
        assert_eq!(o.total_cents, 19_000);
        assert_eq!(o.lines[0].discount_cents, 500);
        assert_eq!(o.lines[1].discount_cents, 500);
        assert_eq!(o.expires_at_ms, 61_000);
        assert_eq!(o.promo_code, Some(promo.code));
        let small = order(&[line("a", 1, 100)], Some(&promo));
        assert_eq!((small.discount_cents, small.promo_code), (0, None));
    }

    #[test]
    fn placing_refuses_bad_lines() {
        let user = UserId::parse("u").expect("valid");
        let place =
            |lines: &[ReservedLine]| Order::place(OrderId(1), user, lines.to_vec(), None, 0, 1);
        assert!(place(&[]).is_err());
        assert!(place(&[line("a", 0, 1)]).is_err());
        assert!(place(&[line("a", 1, 1), line("a", 2, 1)]).is_err());
        let too_many: Vec<_> = (0..=LINES_MAX)
            .map(|i| line(&format!("s{i}"), 1, 1))
            .collect();
        assert!(place(&too_many).is_err());
        assert_eq!(
            Order::place(OrderId(1), user, vec![line("a", 1, 1)], None, u64::MAX, 1),
            Err(DomainError::Overflow { what: "expires_at" })
        );
    }

    #[test]
    fn payment_must_match_and_repeats_are_harmless() {
        let mut o = order(&[line("a", 2, 500)], None);
        let r = PaymentRef::parse("pay-1").expect("valid");
        assert!(matches!(
            o.decide_pay(r, 999, None, 2_000),
            Err(DomainError::PaymentMismatch { .. })
        ));
        match o.decide_pay(r, 1_000, None, 2_000) {
            Ok(Some(e)) => o.apply(&e).expect("applied"),
            other => panic!("expected a payment, got {other:?}"),
        }
        assert_eq!(o.status, OrderStatus::Paid);
        assert_eq!(o.decide_pay(r, 1_000, None, 3_000), Ok(None));
        let other = PaymentRef::parse("pay-2").expect("valid");
        assert!(matches!(
            o.decide_pay(other, 1_000, None, 3_000),
            Err(DomainError::InvalidTransition { .. })
        ));
    }

    #[test]
    fn a_full_refund_in_steps_returns_exactly_what_was_paid() {
        let promo = Promotion::new(PromoCode::parse("P").expect("valid"), 10, 10).expect("valid");
        let mut o = order(&[line("a", 3, 100), line("b", 1, 7)], Some(&promo));
        let r = PaymentRef::parse("p").expect("valid");
        if let Ok(Some(e)) = o.decide_pay(r, o.total_cents, None, 2) {
            o.apply(&e).expect("paid");
        }
        let a = sku("a");
        let b = sku("b");
        step(&mut o, |o| {
            o.decide_refund(&[SkuQty { sku: a, qty: 1 }], false, None, 3)
        });
        assert_eq!(o.status, OrderStatus::Paid);
        assert!(
            o.decide_refund(&[SkuQty { sku: a, qty: 3 }], false, None, 4)
                .is_err()
        );
        step(&mut o, |o| {
            o.decide_refund(
                &[
                    SkuQty { sku: a, qty: 1 },
                    SkuQty { sku: a, qty: 1 },
                    SkuQty { sku: b, qty: 1 },
                ],
                false,
                None,
                4,
            )
        });
        assert_eq!(o.status, OrderStatus::Refunded);
        assert_eq!(o.refunded_cents, o.paid_cents);
        assert_eq!(
            o.history.last().map(|h| h.status),
            Some(OrderStatus::Refunded)
        );
    }

    #[test]
    fn shipping_moves_only_units_not_refunded() {
        let mut o = order(&[line("a", 3, 100)], None);
        let r = PaymentRef::parse("p").expect("valid");
        if let Ok(Some(e)) = o.decide_pay(r, 300, None, 2) {
            o.apply(&e).expect("paid");
        }
        step(&mut o, |o| {
            o.decide_refund(
                &[SkuQty {
                    sku: sku("a"),
                    qty: 1,
                }],
                false,
                None,
                3,
            )
        });
        match o.decide_ship(4) {
            Ok(Event::OrderShipped { lines, .. }) => {
                assert_eq!(
                    lines,
                    vec![SkuQty {
                        sku: sku("a"),
                        qty: 2
                    }]
                );
            }
            other => panic!("expected a shipment, got {other:?}"),
        }
    }

    #[test]
    fn refund_stock_depends_on_shipment_and_restock() {
        let mut o = order(&[line("a", 1, 100)], None);
        let r = PaymentRef::parse("p").expect("valid");
        if let Ok(Some(e)) = o.decide_pay(r, 100, None, 2) {
            o.apply(&e).expect("paid");
        }
        let one = [SkuQty {
            sku: sku("a"),
            qty: 1,
        }];
        let stock_of = |e: Result<Event, DomainError>| match e {
            Ok(Event::OrderRefunded { stock, .. }) => stock,
            other => panic!("expected a refund, got {other:?}"),
        };
        assert_eq!(
            stock_of(o.decide_refund(&one, true, None, 3)),
            RefundStock::Unallocate
        );
        step(&mut o, |o| o.decide_ship(3));
        assert_eq!(
            stock_of(o.decide_refund(&one, true, None, 4)),
            RefundStock::Restock
        );
        assert_eq!(
            stock_of(o.decide_refund(&one, false, None, 4)),
            RefundStock::Keep
        );
    }

    #[test]
    fn as_of_renders_every_earlier_moment_exactly() {
        let mut o = order(&[line("a", 3, 100), line("b", 2, 50)], None);
        let mark = |o: &Order| {
            let qty: Vec<u32> = o.lines.iter().map(|l| l.refunded_qty).collect();
            (o.clone(), o.history.len(), o.refunded_cents, qty)
        };
        let mut moments = vec![mark(&o)];
        let r = PaymentRef::parse("p").expect("valid");
        if let Ok(Some(e)) = o.decide_pay(r, o.total_cents, None, 2) {
            o.apply(&e).expect("paid");
        }
        moments.push(mark(&o));
        step(&mut o, |o| {
            o.decide_refund(
                &[SkuQty {
                    sku: sku("a"),
                    qty: 1,
                }],
                false,
                None,
                3,
            )
        });
        moments.push(mark(&o));
        step(&mut o, |o| o.decide_ship(4));
        step(&mut o, |o| {
            o.decide_refund(
                &[SkuQty {
                    sku: sku("b"),
                    qty: 1,
                }],
                false,
                None,
                5,
            )
        });
        moments.push(mark(&o));
        step(&mut o, |o| o.decide_deliver(6));
        step(&mut o, |o| {
            o.decide_refund(
                &[
                    SkuQty {
                        sku: sku("a"),
                        qty: 2,
                    },
                    SkuQty {
                        sku: sku("b"),
                        qty: 1,
                    },
                ],
                false,
                None,
                7,
            )
        });
        assert_eq!(o.status, OrderStatus::Refunded);
        moments.push(mark(&o));
        for (then, history_len, cents, qty) in &moments {
            assert_eq!(o.as_of(*history_len, *cents, qty).as_ref(), Ok(then));
        }
        // A placement's reference: one entry, nothing refunded.
        assert_eq!(o.as_of(1, 0, &[]), Ok(moments[0].0.clone()));
        assert!(o.as_of(0, 0, &[]).is_err());
        assert!(o.as_of(6, 0, &[]).is_err());
        assert!(o.as_of(2, o.refunded_cents + 1, &[]).is_err());
        assert!(o.as_of(2, 0, &[4, 0]).is_err());
        assert!(o.as_of(2, 0, &[0]).is_err());
    }

    #[test]
    fn apply_refuses_an_event_that_does_not_fit() {
        let mut o = order(&[line("a", 1, 100)], None);
        let before = o.clone();
        let wrong = Event::OrderShipped {
            order: o.id,
            lines: vec![],
            at_ms: 5,
        };
        assert!(matches!(o.apply(&wrong), Err(DomainError::Inconsistent(_))));
        let other_order = Event::OrderDelivered {
            order: OrderId(99),
            at_ms: 5,
        };
        assert!(o.apply(&other_order).is_err());
        assert_eq!(o, before);
    }
}
