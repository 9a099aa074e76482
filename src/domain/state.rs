//! `State`: everything flashcore knows, in one value, and the one `apply`
//! that changes it.
//!
//! Live, the state is split among actors (each SKU actor owns its
//! [`SkuState`], each order shard a part of the [`OrderBook`]), and each
//! actor applies events with the same functions `State::apply` calls here:
//! [`apply_to_sku`] and [`OrderBook::apply`]. Recovery and snapshots replay
//! the journal into one `State`. Besides what the actors hold, a `State` keeps
//! the reservations that no order has taken yet, so recovery can release the
//! ones a crash left behind.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::domain::book::OrderBook;
use crate::domain::idem::{IdemBook, Outcome};
use crate::domain::promo::Promotions;
use crate::domain::sku::SkuState;
use crate::domain::{DomainError, Event, OrderId, OrderStatus, SkuId, UserId};

/// A reservation not yet taken by an order nor released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenReservation {
    /// The SKU.
    pub sku: SkuId,
    /// Who holds it.
    pub user: UserId,
    /// How many units.
    pub qty: u32,
}

/// How [`State::check`] compares per-user counts with the orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PerUser {
    Skip,
    Exact,
    AtLeast,
}

/// Everything, in one value.
#[derive(Debug, Default)]
pub struct State {
    /// Every SKU.
    pub skus: BTreeMap<SkuId, SkuState>,
    /// Every order and cart.
    pub orders: OrderBook,
    /// Every promotion.
    pub promotions: Promotions,
    /// Every idempotency record (shared with the actors once live).
    pub idem: Arc<IdemBook>,
    /// Reservations no order has taken yet.
    pub open_reservations: BTreeMap<OrderId, OpenReservation>,
    /// The next order or reservation id to hand out.
    pub next_id: u64,
}

/// One part of the state, as the live engine splits it: what a snapshot
/// captures at its own sequence number (see `journal/snapshot.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The open reservations.
    Reservations,
    /// The promotions.
    Promotions,
    /// One SKU's stock and settings.
    Sku(SkuId),
    /// The orders and cart of one user (held by that user's order shard).
    Orders(UserId),
}

/// Keeps a map of open reservations up to date with a reservation event
/// (made, released, taken by an order); other events change nothing.
///
/// # Errors
/// `Inconsistent` when an event releases or takes a reservation that is not
/// open as it says, or makes one twice; on `Err` the map may have lost the
/// lines of an order before the bad one (the state must then be dropped).
pub fn track_open_reservations(
    open: &mut BTreeMap<OrderId, OpenReservation>,
    event: &Event,
) -> Result<(), DomainError> {
    match event {
        Event::StockReserved {
            sku,
            reservation,
            user,
            qty,
            ..
        } => {
            let made = OpenReservation {
                sku: *sku,
                user: *user,
                qty: *qty,
            };
            if open.insert(*reservation, made).is_some() {
                return Err(DomainError::inconsistent(format!(
                    "reservation {reservation} made twice"
                )));
            }
        }
        Event::ReservationReleased {
            sku,
            reservation,
            user,
            qty,
            ..
        } => {
            let expected = OpenReservation {
                sku: *sku,
                user: *user,
                qty: *qty,
            };
            if open.remove(reservation) != Some(expected) {
                return Err(DomainError::inconsistent(format!(
                    "release of reservation {reservation} that is not open as {expected:?}"
                )));
            }
        }
        Event::OrderPlaced {
            order,
            reservations,
            ..
        } => {
            for (line, reservation) in order.lines.iter().zip(reservations) {
                let expected = OpenReservation {
                    sku: line.sku,
                    user: order.user,
                    qty: line.qty,
                };
                if open.remove(reservation) != Some(expected) {
                    return Err(DomainError::inconsistent(format!(
                        "order {} takes reservation {reservation}, not open as {expected:?}",
                        order.id
                    )));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Whether an event changes the open reservations.
pub fn moves_reservations(event: &Event) -> bool {
    matches!(
        event,
        Event::StockReserved { .. } | Event::ReservationReleased { .. } | Event::OrderPlaced { .. }
    )
}

/// Applies an event to one SKU, recording the idempotency outcome of a
/// stamped restock. Used live by the SKU actor and on replay.
///
/// # Errors
/// As [`SkuState::apply`]; on `Err` nothing changed.
pub fn apply_to_sku(sku: &mut SkuState, idem: &IdemBook, event: &Event) -> Result<(), DomainError> {
    sku.apply(event)?;
    if let (Event::Restocked { .. }, Some(stamp)) = (event, event.idem()) {
        idem.record(stamp, event.at_ms(), Outcome::Sku(Box::new(sku.view())));
    }
    Ok(())
}

impl State {
    /// Applies one event to everything it touches.
    ///
    /// # Errors
    /// `Inconsistent` when the event does not fit the state: the journal is
    /// damaged or a bug let a bad event through. The state must then be
    /// dropped; replay stops there.
    pub fn apply(&mut self, event: &Event) -> Result<(), DomainError> {
        self.apply_to_catalog(event)?;
        self.orders.apply(&self.idem, event)
    }

    /// [`State::apply`] for an event the caller no longer needs (replay): a
    /// placed order moves into the book instead of being copied.
    ///
    /// # Errors
    /// As [`State::apply`].
    pub fn apply_owned(&mut self, event: Event) -> Result<(), DomainError> {
        self.apply_to_catalog(&event)?;
        self.orders.apply_owned(&self.idem, event)
    }

    /// The part of `apply` before the order book: reservations, SKUs and
    /// promotions.
    fn apply_to_catalog(&mut self, event: &Event) -> Result<(), DomainError> {
        self.track_reservations(event)?;
        match event {
            Event::SkuCreated { sku, .. } | Event::SkuCreatedWithSale { sku, .. } => {
                if self.skus.contains_key(sku) {
                    return Err(DomainError::inconsistent(format!(
                        "SKU {sku} created twice"
                    )));
                }
                self.skus.insert(*sku, SkuState::from_created(event)?);
            }
            Event::PromotionCreated { .. } => self.promotions.apply(event)?,
            // v1 kept a keyed refusal under its key; v2 keeps only changes
            // (`idem.rs`), so an old journal's refusal is read and ignored.
            Event::IdempotentRefusal { .. } => {}
            _ => {
                for sku in event.touched_skus() {
                    let state = self.skus.get_mut(&sku).ok_or_else(|| {
                        DomainError::inconsistent(format!("event for unknown SKU {sku}"))
                    })?;
                    apply_to_sku(state, &self.idem, event)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps the open reservations and the id sequence up to date, checking
    /// that an order takes exactly the reservations it names.
    fn track_reservations(&mut self, event: &Event) -> Result<(), DomainError> {
        self.bump_ids(event);
        track_open_reservations(&mut self.open_reservations, event)
    }

    fn bump_ids(&mut self, event: &Event) {
        match event {
            Event::StockReserved { reservation, .. } => self.bump_next_id(*reservation),
            Event::OrderPlaced { order, .. } | Event::OrderPlacedAtSku { order, .. } => {
                self.bump_next_id(order.id);
            }
            Event::OrderIdsReserved { through, .. } => self.bump_next_id(OrderId(*through)),
            _ => {}
        }
    }

    /// [`State::apply_owned`] applied only to the parts `wants` names: a
    /// snapshot whose parts were captured at different sequence numbers is
    /// brought to one by replaying each event into the parts that had not
    /// seen it. The id sequence only ever rises, so it always takes the
    /// event.
    ///
    /// # Errors
    /// As [`State::apply`], for the parts applied.
    pub fn apply_parts(
        &mut self,
        event: Event,
        wants: impl Fn(Part) -> bool,
    ) -> Result<(), DomainError> {
        self.bump_ids(&event);
        if wants(Part::Reservations) {
            track_open_reservations(&mut self.open_reservations, &event)?;
        }
        match &event {
            Event::SkuCreated { sku, .. } | Event::SkuCreatedWithSale { sku, .. } => {
                if wants(Part::Sku(*sku)) {
                    if self.skus.contains_key(sku) {
                        return Err(DomainError::inconsistent(format!(
                            "SKU {sku} created twice"
                        )));
                    }
                    self.skus.insert(*sku, SkuState::from_created(&event)?);
                }
            }
            Event::PromotionCreated { .. } => {
                if wants(Part::Promotions) {
                    self.promotions.apply(&event)?;
                }
            }
            Event::IdempotentRefusal { .. } => {}
            _ => {
                for sku in event.touched_skus().filter(|sku| wants(Part::Sku(*sku))) {
                    let state = self.skus.get_mut(&sku).ok_or_else(|| {
                        DomainError::inconsistent(format!("event for unknown SKU {sku}"))
                    })?;
                    apply_to_sku(state, &self.idem, &event)?;
                }
            }
        }
        match self.user_of(&event) {
            Some(user) if wants(Part::Orders(user)) => self.orders.apply_owned(&self.idem, event),
            _ => Ok(()),
        }
    }

    /// Whose orders or cart an event changes, if anyone's.
    fn user_of(&self, event: &Event) -> Option<UserId> {
        match event {
            Event::OrderPlaced { order, .. } | Event::OrderPlacedAtSku { order, .. } => {
                Some(order.user)
            }
            Event::CartItemSet { user, .. } | Event::CartCleared { user, .. } => Some(*user),
            // Not in memory: it comes back with this event.
            Event::OrderRestored { order, .. } => Some(order.user),
            // One shard's batch: every id has an owner of the same shard, so
            // any one of them names the part (all are in memory until this
            // event drops them).
            Event::OrdersArchived { ids, .. } => ids
                .iter()
                .find_map(|id| self.orders.get(*id))
                .map(|order| order.user),
            _ => event
                .order_id()
                .and_then(|id| self.orders.get(id))
                .map(|order| order.user),
        }
    }

    fn bump_next_id(&mut self, id: OrderId) {
        self.next_id = self.next_id.max(id.0.saturating_add(1));
    }

    /// Checks every invariant of the contract across the whole state: each
    /// SKU balances, and its `reserved`, `allocated` and per-user counts are
    /// exactly what the orders and open reservations hold.
    ///
    /// # Errors
    /// `Inconsistent` describing the first broken invariant.
    /// Assumes no order was archived: see [`State::check_archived`].
    pub fn check(&self) -> Result<(), DomainError> {
        self.check_with(PerUser::Exact)
    }

    /// [`State::check`] for a state some of whose orders were archived: a
    /// SKU's per-user count may then exceed what the live orders hold (an
    /// archived delivered order still counts), but never fall below it.
    ///
    /// # Errors
    /// `Inconsistent` describing the first broken invariant.
    pub fn check_archived(&self) -> Result<(), DomainError> {
        self.check_with(PerUser::AtLeast)
    }

    /// [`State::check`] without the per-user counts (which cost a map per
    /// SKU with an entry per buyer): what recovery asserts after replay.
    ///
    /// # Errors
    /// `Inconsistent` describing the first broken invariant.
    pub fn check_stock(&self) -> Result<(), DomainError> {
        self.check_with(PerUser::Skip)
    }

    fn check_with(&self, per_user: PerUser) -> Result<(), DomainError> {
        let counting = per_user != PerUser::Skip;
        #[derive(Default)]
        struct Expected {
            reserved: u64,
            allocated: u64,
            users: HashMap<UserId, u64>,
        }
        let mut expected: HashMap<SkuId, Expected> = HashMap::new();
        for open in self.open_reservations.values() {
            let e = expected.entry(open.sku).or_default();
            e.reserved += u64::from(open.qty);
            if counting {
                *e.users.entry(open.user).or_default() += u64::from(open.qty);
            }
        }
        for order in self.orders.orders() {
            for line in &order.lines {
                let e = expected.entry(line.sku).or_default();
                let left = u64::from(line.units_left());
                match order.status {
                    OrderStatus::Reserved => e.reserved += left,
                    OrderStatus::Paid => e.allocated += left,
                    _ => {}
                }
                if counting && !order.status.is_terminal() && left > 0 {
                    *e.users.entry(order.user).or_default() += left;
                }
            }
            if order.refunded_cents > order.paid_cents {
                return Err(DomainError::inconsistent(format!(
                    "order {} refunded more than was paid",
                    order.id
                )));
            }
        }
        for (id, sku) in &self.skus {
            let levels = sku.levels();
            levels.check()?;
            let e = expected.remove(id).unwrap_or_default();
            if levels.reserved != e.reserved || levels.allocated != e.allocated {
                return Err(DomainError::inconsistent(format!(
                    "SKU {id}: reserved {} allocated {}, but orders hold {} and {}",
                    levels.reserved, levels.allocated, e.reserved, e.allocated
                )));
            }
            if counting {
                let counted: HashMap<UserId, u64> =
                    sku.all_user_units().map(|(u, n)| (*u, *n)).collect();
                // Archived delivered orders still count against the limit,
                // in the SKU's own per-user counter, while the book no longer
                // holds them: the counter may exceed what live orders hold,
                // never fall below it. Without archived orders it is exact.
                let short = e
                    .users
                    .iter()
                    .any(|(user, held)| counted.get(user).copied().unwrap_or(0) < *held);
                if short || (per_user == PerUser::Exact && counted != e.users) {
                    return Err(DomainError::inconsistent(format!(
                        "SKU {id}: per-user counts {counted:?}, but orders hold {:?}",
                        e.users
                    )));
                }
            }
        }
        if let Some(sku) = expected.keys().next() {
            return Err(DomainError::inconsistent(format!(
                "orders hold units of unknown SKU {sku}"
            )));
        }
        Ok(())
    }
}
