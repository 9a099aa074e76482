//! One SKU: its settings, its stock counters and its per-user unit counts,
//! with the decisions and applications of every change to them.
//!
//! A SKU counts, per user, the units held in live orders and open
//! reservations, less those refunded (contract: `per_user_limit`). A count
//! that falls to zero is removed, so the map only holds current buyers.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::event::{RefundStock, SkuQty};
use crate::domain::sale::{SalePatch, SaleWindow};
use crate::domain::stock::StockLevels;
use crate::domain::{DomainError, Event, IdemStamp, OrderId, SkuId, UserId, add, sub, validate};

/// What a client sees of a SKU (contract: "SKU"), also kept as the first
/// answer of an idempotent restock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuView {
    /// The SKU's id.
    pub sku: SkuId,
    /// Its name.
    pub name: String,
    /// Its unit price.
    pub price_cents: u64,
    /// Most units per user, or none.
    pub per_user_limit: Option<u32>,
    /// When it sells (snapshot format 2).
    pub sale: SaleWindow,
    /// Its counters.
    pub levels: StockLevels,
}

/// [`SkuView`] as snapshot format 1 stored it (in idempotency records):
/// without a sale window. Only for reading old snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuViewV1 {
    sku: SkuId,
    name: String,
    price_cents: u64,
    per_user_limit: Option<u32>,
    levels: StockLevels,
}

impl From<SkuViewV1> for SkuView {
    fn from(v: SkuViewV1) -> SkuView {
        SkuView {
            sku: v.sku,
            name: v.name,
            price_cents: v.price_cents,
            per_user_limit: v.per_user_limit,
            sale: SaleWindow::default(),
            levels: v.levels,
        }
    }
}

/// [`SkuState`] as snapshot format 1 stored it: without a sale window.
/// Only for reading old snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuStateV1 {
    id: SkuId,
    name: String,
    price_cents: u64,
    per_user_limit: Option<u32>,
    levels: StockLevels,
    user_units: HashMap<UserId, u64>,
}

impl From<SkuStateV1> for SkuState {
    fn from(v: SkuStateV1) -> SkuState {
        SkuState {
            id: v.id,
            name: v.name,
            price_cents: v.price_cents,
            per_user_limit: v.per_user_limit,
            levels: v.levels,
            user_units: v.user_units.into_iter().collect(),
            sale: SaleWindow::default(),
        }
    }
}

/// Units held per buyer of one SKU.
type UserUnits = imbl::HashMap<UserId, u64>;

/// A SKU and everything that changes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuState {
    id: SkuId,
    name: String,
    price_cents: u64,
    per_user_limit: Option<u32>,
    levels: StockLevels,
    /// Units each buyer holds. Persistent (a hash trie): a snapshot's copy
    /// of a SKU with a hundred thousand buyers is a root clone, not a walk
    /// while the SKU's mailbox waits; serialised as a plain map, as the
    /// `std` map it replaced was.
    user_units: UserUnits,
    /// When it sells. Last, so the snapshot shape of the fields above is
    /// format 1's ([`SkuStateV1`]).
    sale: SaleWindow,
}

/// A SKU at rest: its [`SkuState`] without the id (its catalog entry
/// keeps that) and with every field at its smallest (a boxed name, the
/// per-user counts boxed and absent when empty), so a catalog of millions
/// of idle SKUs costs a few hundred bytes each. Nothing changes it: it is
/// turned back into a `SkuState` to be changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleSku {
    name: Box<str>,
    price_cents: u64,
    per_user_limit: Option<u32>,
    levels: StockLevels,
    sale: SaleWindow,
    /// Boxed: 8 bytes (a pointer, null when no one holds units) instead
    /// of an empty map's 40 (imbl's: a size, a root and its hasher), for each
    /// of millions of idle SKUs; the extra allocation is paid only by a SKU
    /// with buyers.
    #[allow(clippy::box_collection)]
    user_units: Option<Box<UserUnits>>,
}

impl IdleSku {
    /// The SKU `id` as a [`SkuState`] again, moving every field.
    pub fn wake(self, id: SkuId) -> SkuState {
        SkuState {
            id,
            name: self.name.into_string(),
            price_cents: self.price_cents,
            per_user_limit: self.per_user_limit,
            levels: self.levels,
            user_units: self.user_units.map(|units| *units).unwrap_or_default(),
            sale: self.sale,
        }
    }

    /// A copy as the [`SkuState`] of `id` (a snapshot's).
    pub fn to_state(&self, id: SkuId) -> SkuState {
        self.clone().wake(id)
    }

    /// What a client sees of the SKU `id`.
    pub fn view(&self, id: SkuId) -> SkuView {
        SkuView {
            sku: id,
            name: self.name.to_string(),
            price_cents: self.price_cents,
            per_user_limit: self.per_user_limit,
            sale: self.sale,
            levels: self.levels,
        }
    }
}

impl SkuState {
    /// The SKU at rest (see [`IdleSku`]), moving every field.
    pub fn rest(self) -> IdleSku {
        IdleSku {
            name: self.name.into_boxed_str(),
            price_cents: self.price_cents,
            per_user_limit: self.per_user_limit,
            levels: self.levels,
            sale: self.sale,
            user_units: if self.user_units.is_empty() {
                None
            } else {
                Some(Box::new(self.user_units))
            },
        }
    }

    /// Decides the creation of a SKU (the registry checks the id is free).
    /// Without a sale window it is a `SkuCreated`, which format 1 readers
    /// know too; with one, a `SkuCreatedWithSale`.
    ///
    /// # Errors
    /// `Invalid` when a value is out of the contract's range or the window
    /// ends before it starts.
    pub fn decide_create(
        sku: SkuId,
        name: String,
        price_cents: u64,
        per_user_limit: Option<u32>,
        stock: u64,
        sale: SaleWindow,
        at_ms: u64,
    ) -> Result<Event, DomainError> {
        validate::name(&name)?;
        validate::price_cents(price_cents)?;
        validate::per_user_limit(per_user_limit)?;
        validate::stock(stock)?;
        let sale = SaleWindow::new(sale.starts_at_ms, sale.ends_at_ms)?;
        if sale == SaleWindow::default() {
            return Ok(Event::SkuCreated {
                sku,
                name,
                price_cents,
                per_user_limit,
                stock,
                at_ms,
            });
        }
        Ok(Event::SkuCreatedWithSale {
            sku,
            name,
            price_cents,
            per_user_limit,
            stock,
            sale,
            at_ms,
        })
    }

    /// Builds a SKU from its `SkuCreated` event.
    ///
    /// # Errors
    /// `Inconsistent` for any other event.
    pub fn from_created(event: &Event) -> Result<SkuState, DomainError> {
        match event {
            Event::SkuCreated {
                sku,
                name,
                price_cents,
                per_user_limit,
                stock,
                ..
            } => Ok(SkuState {
                id: *sku,
                name: name.clone(),
                price_cents: *price_cents,
                per_user_limit: *per_user_limit,
                levels: StockLevels::new(*stock),
                user_units: UserUnits::new(),
                sale: SaleWindow::default(),
            }),
            Event::SkuCreatedWithSale {
                sku,
                name,
                price_cents,
                per_user_limit,
                stock,
                sale,
                ..
            } => Ok(SkuState {
                id: *sku,
                name: name.clone(),
                price_cents: *price_cents,
                per_user_limit: *per_user_limit,
                levels: StockLevels::new(*stock),
                user_units: UserUnits::new(),
                sale: *sale,
            }),
            _ => Err(DomainError::inconsistent(
                "a SKU built from a non-creation event",
            )),
        }
    }

    /// The SKU's id.
    pub fn id(&self) -> SkuId {
        self.id
    }

    /// The SKU's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The SKU's unit price.
    pub fn price_cents(&self) -> u64 {
        self.price_cents
    }

    /// The counters.
    pub fn levels(&self) -> StockLevels {
        self.levels
    }

    /// When it sells.
    pub fn sale(&self) -> SaleWindow {
        self.sale
    }

    /// Units `user` currently counts against the per-user limit.
    pub fn user_units(&self, user: &UserId) -> u64 {
        self.user_units.get(user).copied().unwrap_or(0)
    }

    /// Every user's count, for invariant checks.
    pub fn all_user_units(&self) -> impl Iterator<Item = (&UserId, &u64)> {
        self.user_units.iter()
    }

    /// What a client sees.
    pub fn view(&self) -> SkuView {
        SkuView {
            sku: self.id,
            name: self.name.clone(),
            price_cents: self.price_cents,
            per_user_limit: self.per_user_limit,
            sale: self.sale,
            levels: self.levels,
        }
    }

    /// Decides a change of settings. A change that names no window field
    /// is a `SkuUpdated`; one that does is a `SkuUpdatedWithSale` carrying
    /// the whole window it leaves.
    ///
    /// # Errors
    /// `Invalid` when a value is out of range, the window would end before
    /// it starts, or nothing would change.
    pub fn decide_update(
        &self,
        name: Option<String>,
        price_cents: Option<u64>,
        per_user_limit: Option<Option<u32>>,
        sale: SalePatch,
        at_ms: u64,
    ) -> Result<Event, DomainError> {
        if name.is_none() && price_cents.is_none() && per_user_limit.is_none() && sale.is_empty() {
            return Err(DomainError::invalid(
                "give at least one of name, price_cents, per_user_limit, sale_starts_at, sale_ends_at",
            ));
        }
        if let Some(name) = &name {
            validate::name(name)?;
        }
        if let Some(price) = price_cents {
            validate::price_cents(price)?;
        }
        if let Some(limit) = per_user_limit {
            validate::per_user_limit(limit)?;
        }
        if !sale.is_empty() {
            return Ok(Event::SkuUpdatedWithSale {
                sku: self.id,
                name,
                price_cents,
                per_user_limit,
                sale: self.sale.patched(sale)?,
                at_ms,
            });
        }
        Ok(Event::SkuUpdated {
            sku: self.id,
            name,
            price_cents,
            per_user_limit,
            at_ms,
        })
    }

    /// Decides a restock.
    ///
    /// # Errors
    /// `Invalid` for a quantity out of range, `Overflow` when `on_hand`
    /// would pass its cap.
    pub fn decide_restock(
        &self,
        qty: u64,
        idem: Option<IdemStamp>,
        at_ms: u64,
    ) -> Result<Event, DomainError> {
        validate::restock_qty(qty)?;
        if !self.levels.can_stock_in(qty) {
            return Err(DomainError::Overflow { what: "on_hand" });
        }
        Ok(Event::Restocked {
            sku: self.id,
            qty,
            idem,
            at_ms,
        })
    }

    /// Decides a reservation of `qty` units for `user`.
    ///
    /// # Errors
    /// `Invalid` for a quantity out of range, `OutOfStock` when fewer units
    /// are available, `LimitExceeded` when the user's count would pass the
    /// per-user limit.
    pub fn decide_reserve(
        &self,
        reservation: OrderId,
        user: UserId,
        qty: u32,
        at_ms: u64,
    ) -> Result<Event, DomainError> {
        self.check_reserve(&user, qty, at_ms)?;
        Ok(Event::StockReserved {
            sku: self.id,
            reservation,
            user,
            qty,
            at_ms,
        })
    }

    /// Whether `user` may hold `qty` more units at `at_ms`: the checks of
    /// [`SkuState::decide_reserve`], for an order placed here in one step
    /// (`OrderPlacedAtSku`).
    ///
    /// # Errors
    /// `Invalid` for a quantity out of range, `SaleNotStarted`, `SaleEnded`,
    /// `OutOfStock`, `LimitExceeded`.
    pub fn check_reserve(&self, user: &UserId, qty: u32, at_ms: u64) -> Result<(), DomainError> {
        validate::qty(qty)?;
        self.sale.check(self.id, at_ms)?;
        if self.levels.available < u64::from(qty) {
            return Err(DomainError::OutOfStock { sku: self.id });
        }
        if let Some(limit) = self.per_user_limit {
            let after = self.user_units(user).saturating_add(u64::from(qty));
            if after > u64::from(limit) {
                return Err(DomainError::LimitExceeded {
                    sku: self.id,
                    limit,
                });
            }
        }
        Ok(())
    }

    /// `user`'s count after adding (`add`) or removing `units`.
    fn user_units_after(
        &self,
        user: &UserId,
        units: u32,
        add_units: bool,
    ) -> Result<u64, DomainError> {
        let count = self.user_units(user);
        if add_units {
            add(count, u64::from(units), "user units")
        } else {
            sub(count, u64::from(units), "user units")
        }
    }

    /// This SKU's units in a list of order moves (0 when absent).
    fn units_in(&self, lines: &[SkuQty]) -> u32 {
        lines
            .iter()
            .filter(|l| l.sku == self.id)
            .map(|l| l.qty)
            .sum()
    }

    /// Stores the settings a `SkuUpdated` (or `SkuUpdatedWithSale`) names.
    fn set(
        &mut self,
        name: Option<&String>,
        price_cents: Option<u64>,
        per_user_limit: Option<Option<u32>>,
    ) {
        if let Some(name) = name {
            self.name.clone_from(name);
        }
        if let Some(price) = price_cents {
            self.price_cents = price;
        }
        if let Some(limit) = per_user_limit {
            self.per_user_limit = limit;
        }
    }

    /// Applies an event to this SKU; events about other SKUs, and events
    /// that do not touch SKUs, change nothing. On `Err` nothing changed: the
    /// new counters and count are computed first and stored only when every
    /// check passed (without copying the per-user map, which can be large).
    ///
    /// # Errors
    /// `Inconsistent` when a move does not fit the counters (a bug or a
    /// damaged journal), `Overflow` when a restock passes the cap.
    pub fn apply(&mut self, event: &Event) -> Result<(), DomainError> {
        let mut levels = self.levels;
        let mut user_count: Option<(UserId, u64)> = None;
        match event {
            Event::SkuUpdated {
                sku,
                name,
                price_cents,
                per_user_limit,
                ..
            } if *sku == self.id => {
                // Settings cannot fail: store them at once.
                self.set(name.as_ref(), *price_cents, *per_user_limit);
            }
            Event::SkuUpdatedWithSale {
                sku,
                name,
                price_cents,
                per_user_limit,
                sale,
                ..
            } if *sku == self.id => {
                self.set(name.as_ref(), *price_cents, *per_user_limit);
                self.sale = *sale;
            }
            Event::Restocked { sku, qty, .. } if *sku == self.id => levels.stock_in(*qty)?,
            Event::StockReserved { sku, user, qty, .. } if *sku == self.id => {
                levels.reserve(u64::from(*qty))?;
                user_count = Some((*user, self.user_units_after(user, *qty, true)?));
            }
            Event::OrderPlacedAtSku { order, .. }
                if order.lines.iter().any(|l| l.sku == self.id) =>
            {
                let units: u32 = order
                    .lines
                    .iter()
                    .filter(|l| l.sku == self.id)
                    .map(|l| l.qty)
                    .sum();
                levels.reserve(u64::from(units))?;
                user_count = Some((order.user, self.user_units_after(&order.user, units, true)?));
            }
            Event::ReservationReleased { sku, user, qty, .. } if *sku == self.id => {
                levels.release(u64::from(*qty))?;
                user_count = Some((*user, self.user_units_after(user, *qty, false)?));
            }
            Event::OrderPaid { lines, .. } => levels.allocate(u64::from(self.units_in(lines)))?,
            Event::OrderReleased { user, lines, .. } => {
                let units = self.units_in(lines);
                levels.release(u64::from(units))?;
                user_count = Some((*user, self.user_units_after(user, units, false)?));
            }
            Event::OrderShipped { lines, .. } => levels.ship(u64::from(self.units_in(lines)))?,
            Event::OrderRefunded {
                user, lines, stock, ..
            } => {
                let units: u32 = lines
                    .iter()
                    .filter(|l| l.sku == self.id)
                    .map(|l| l.qty)
                    .sum();
                match stock {
                    RefundStock::Unallocate => levels.unallocate(u64::from(units))?,
                    RefundStock::Restock => levels.stock_in(u64::from(units))?,
                    RefundStock::Keep => {}
                }
                user_count = Some((*user, self.user_units_after(user, units, false)?));
            }
            _ => {}
        }
        levels.check()?;
        // Every check passed; nothing below can fail.
        self.levels = levels;
        match user_count {
            Some((user, 0)) => {
                self.user_units.remove(&user);
            }
            Some((user, count)) => {
                self.user_units.insert(user, count);
            }
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_idle_sku_keeps_no_empty_map() {
        assert_eq!(std::mem::size_of::<UserUnits>(), 40);
        assert_eq!(std::mem::size_of::<Option<Box<UserUnits>>>(), 8);
    }

    use super::*;

    fn sku_with(stock: u64, limit: Option<u32>) -> SkuState {
        let e = SkuState::decide_create(
            SkuId::parse("tee").expect("valid"),
            "Tee".into(),
            1_000,
            limit,
            stock,
            SaleWindow::default(),
            0,
        )
        .expect("valid");
        SkuState::from_created(&e).expect("created")
    }

    fn user(u: &str) -> UserId {
        UserId::parse(u).expect("valid")
    }

    #[test]
    fn a_sku_at_rest_wakes_exactly_as_it_was() {
        let mut s = sku_with(9, Some(4));
        let e = s.decide_reserve(OrderId(1), user("a"), 3, 1).expect("fits");
        s.apply(&e).expect("applied");
        let idle = s.clone().rest();
        assert_eq!(idle.view(s.id()), s.view());
        assert_eq!(idle.to_state(s.id()), s);
        assert_eq!(idle.wake(s.id()), s);
        let empty = sku_with(1, None);
        assert_eq!(empty.clone().rest().wake(empty.id()), empty);
    }

    #[test]
    fn reserving_takes_available_units_and_counts_them_per_user() {
        let mut s = sku_with(5, None);
        let e = s.decide_reserve(OrderId(1), user("a"), 3, 1).expect("fits");
        s.apply(&e).expect("applied");
        assert_eq!((s.levels().available, s.levels().reserved), (2, 3));
        assert_eq!(s.user_units(&user("a")), 3);
        assert_eq!(
            s.decide_reserve(OrderId(2), user("b"), 3, 1),
            Err(DomainError::OutOfStock { sku: s.id() })
        );
    }

    #[test]
    fn the_per_user_limit_counts_held_units() {
        let mut s = sku_with(100, Some(2));
        let e = s.decide_reserve(OrderId(1), user("a"), 2, 1).expect("fits");
        s.apply(&e).expect("applied");
        assert!(matches!(
            s.decide_reserve(OrderId(2), user("a"), 1, 1),
            Err(DomainError::LimitExceeded { limit: 2, .. })
        ));
        assert!(s.decide_reserve(OrderId(2), user("b"), 2, 1).is_ok());
        let release = Event::ReservationReleased {
            sku: s.id(),
            reservation: OrderId(1),
            user: user("a"),
            qty: 2,
            at_ms: 2,
        };
        s.apply(&release).expect("applied");
        assert_eq!(s.user_units(&user("a")), 0);
        assert_eq!(s.all_user_units().count(), 0, "zero counts are dropped");
    }

    #[test]
    fn a_move_the_counters_cannot_take_changes_nothing() {
        let mut s = sku_with(1, None);
        let before = s.clone();
        let bad = Event::OrderShipped {
            order: OrderId(1),
            lines: vec![SkuQty {
                sku: s.id(),
                qty: 1,
            }],
            at_ms: 1,
        };
        assert!(matches!(s.apply(&bad), Err(DomainError::Inconsistent(_))));
        assert_eq!(s, before);
    }

    #[test]
    fn updates_need_a_field_and_valid_values() {
        let s = sku_with(1, None);
        let keep = SalePatch::default();
        assert!(s.decide_update(None, None, None, keep, 1).is_err());
        assert!(
            s.decide_update(Some(String::new()), None, None, keep, 1)
                .is_err()
        );
        assert!(s.decide_update(None, None, Some(Some(0)), keep, 1).is_err());
        let mut s2 = s.clone();
        let e = s
            .decide_update(None, Some(5), Some(None), keep, 1)
            .expect("valid");
        s2.apply(&e).expect("applied");
        assert_eq!(s2.price_cents(), 5);
    }

    fn windowed(starts_at_ms: Option<u64>, ends_at_ms: Option<u64>) -> SkuState {
        let sale = SaleWindow::new(starts_at_ms, ends_at_ms).expect("valid");
        let e = SkuState::decide_create(
            SkuId::parse("drop").expect("valid"),
            "Drop".into(),
            100,
            None,
            10,
            sale,
            0,
        )
        .expect("valid");
        assert!(matches!(e, Event::SkuCreatedWithSale { .. }));
        SkuState::from_created(&e).expect("created")
    }

    #[test]
    fn reservations_are_refused_outside_the_sale_window() {
        let s = windowed(Some(1_000), Some(2_000));
        assert!(matches!(
            s.decide_reserve(OrderId(1), user("a"), 1, 999),
            Err(DomainError::SaleNotStarted {
                starts_at_ms: 1_000,
                ..
            })
        ));
        assert!(s.decide_reserve(OrderId(1), user("a"), 1, 1_000).is_ok());
        assert!(matches!(
            s.check_reserve(&user("a"), 1, 2_000),
            Err(DomainError::SaleEnded {
                ends_at_ms: 2_000,
                ..
            })
        ));
        // The window comes before stock: a sold-out SKU not yet on sale
        // says when it starts.
        let mut sold_out = windowed(Some(1_000), None);
        let e = sold_out
            .decide_reserve(OrderId(2), user("b"), 10, 1_500)
            .expect("fits");
        sold_out.apply(&e).expect("applied");
        assert!(matches!(
            sold_out.decide_reserve(OrderId(3), user("c"), 1, 500),
            Err(DomainError::SaleNotStarted { .. })
        ));
    }

    #[test]
    fn placed_orders_move_on_after_the_window_ends() {
        let mut s = windowed(None, Some(2_000));
        let e = s
            .decide_reserve(OrderId(1), user("a"), 3, 1_000)
            .expect("fits");
        s.apply(&e).expect("applied");
        // After the end: a release (cancel or expiry) still applies.
        let release = Event::OrderReleased {
            order: OrderId(1),
            user: user("a"),
            reason: crate::domain::event::ReleaseReason::Expired,
            lines: vec![SkuQty {
                sku: s.id(),
                qty: 3,
            }],
            at_ms: 5_000,
        };
        s.apply(&release).expect("applied");
        assert_eq!(s.levels().available, 10);
    }

    #[test]
    fn a_patch_sets_clears_and_checks_the_window() {
        let mut s = windowed(Some(1_000), Some(2_000));
        let bad = SalePatch {
            starts_at_ms: Some(Some(3_000)),
            ends_at_ms: None,
        };
        assert!(s.decide_update(None, None, None, bad, 1).is_err());
        let clear_start = SalePatch {
            starts_at_ms: Some(None),
            ends_at_ms: None,
        };
        let e = s
            .decide_update(None, None, None, clear_start, 1)
            .expect("valid");
        s.apply(&e).expect("applied");
        assert_eq!(
            s.sale(),
            SaleWindow {
                starts_at_ms: None,
                ends_at_ms: Some(2_000)
            }
        );
        assert_eq!(s.view().sale, s.sale());
        assert!(s.check_reserve(&user("a"), 1, 0).is_ok());
        // A change without window fields keeps the window and the old event.
        let e = s
            .decide_update(None, Some(7), None, SalePatch::default(), 2)
            .expect("valid");
        assert!(matches!(e, Event::SkuUpdated { .. }));
        s.apply(&e).expect("applied");
        assert_eq!(s.sale().ends_at_ms, Some(2_000));
    }
}
