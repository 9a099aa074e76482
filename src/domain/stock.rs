//! A SKU's stock counters and the moves between them (contract: "The stock
//! model").
//!
//! Invariants, checked after every move: `on_hand = available + reserved +
//! allocated` and `stock_in = on_hand + shipped`, where `stock_in` counts the
//! initial stock, restocks and restocked returns. `available >= 0` holds by
//! type. Every move is checked arithmetic: a move the counters cannot take is
//! an error and leaves them untouched.

use serde::{Deserialize, Serialize};

use crate::domain::{DomainError, add, sub};
use crate::limits::ON_HAND_MAX;

/// The counters of one SKU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StockLevels {
    /// Units physically in the warehouse.
    pub on_hand: u64,
    /// What a new order can take: `on_hand - reserved - allocated`.
    pub available: u64,
    /// Held for orders that are not paid yet.
    pub reserved: u64,
    /// Paid for, waiting to ship.
    pub allocated: u64,
    /// Units that left the warehouse, cumulative.
    pub shipped: u64,
    /// Everything ever stocked: initial stock, restocks, restocked returns.
    pub stock_in: u64,
}

impl StockLevels {
    /// Counters of a new SKU with `stock` units.
    pub fn new(stock: u64) -> StockLevels {
        StockLevels {
            on_hand: stock,
            available: stock,
            reserved: 0,
            allocated: 0,
            shipped: 0,
            stock_in: stock,
        }
    }

    /// Checks both balance equations.
    ///
    /// # Errors
    /// `DomainError::Inconsistent` naming the equation that fails.
    pub fn check(&self) -> Result<(), DomainError> {
        let held = self
            .available
            .checked_add(self.reserved)
            .and_then(|s| s.checked_add(self.allocated));
        if held != Some(self.on_hand) {
            return Err(DomainError::inconsistent(format!(
                "on_hand {} != available {} + reserved {} + allocated {}",
                self.on_hand, self.available, self.reserved, self.allocated
            )));
        }
        if self.on_hand.checked_add(self.shipped) != Some(self.stock_in) {
            return Err(DomainError::inconsistent(format!(
                "stock_in {} != on_hand {} + shipped {}",
                self.stock_in, self.on_hand, self.shipped
            )));
        }
        Ok(())
    }

    /// Applies `change` to a copy, checks the result and only then commits it,
    /// so a failed move leaves the counters exactly as they were.
    fn moved(
        &mut self,
        change: impl FnOnce(&mut StockLevels) -> Result<(), DomainError>,
    ) -> Result<(), DomainError> {
        let mut next = *self;
        change(&mut next)?;
        next.check()?;
        *self = next;
        Ok(())
    }

    /// Order placed: `available -> reserved`.
    ///
    /// # Errors
    /// `Inconsistent` when fewer than `qty` units are available (the decision
    /// must have checked).
    pub fn reserve(&mut self, qty: u64) -> Result<(), DomainError> {
        self.moved(|s| {
            s.available = sub(s.available, qty, "available")?;
            s.reserved = add(s.reserved, qty, "reserved")?;
            Ok(())
        })
    }

    /// Order cancelled or expired, or a reservation dropped:
    /// `reserved -> available`.
    ///
    /// # Errors
    /// `Inconsistent` when fewer than `qty` units are reserved.
    pub fn release(&mut self, qty: u64) -> Result<(), DomainError> {
        self.moved(|s| {
            s.reserved = sub(s.reserved, qty, "reserved")?;
            s.available = add(s.available, qty, "available")?;
            Ok(())
        })
    }

    /// Payment confirmed: `reserved -> allocated`.
    ///
    /// # Errors
    /// `Inconsistent` when fewer than `qty` units are reserved.
    pub fn allocate(&mut self, qty: u64) -> Result<(), DomainError> {
        self.moved(|s| {
            s.reserved = sub(s.reserved, qty, "reserved")?;
            s.allocated = add(s.allocated, qty, "allocated")?;
            Ok(())
        })
    }

    /// Shipped: `allocated` and `on_hand` fall, `shipped` rises.
    ///
    /// # Errors
    /// `Inconsistent` when fewer than `qty` units are allocated.
    pub fn ship(&mut self, qty: u64) -> Result<(), DomainError> {
        self.moved(|s| {
            s.allocated = sub(s.allocated, qty, "allocated")?;
            s.on_hand = sub(s.on_hand, qty, "on_hand")?;
            s.shipped = add(s.shipped, qty, "shipped")?;
            Ok(())
        })
    }

    /// Refund before shipment: `allocated -> available`.
    ///
    /// # Errors
    /// `Inconsistent` when fewer than `qty` units are allocated.
    pub fn unallocate(&mut self, qty: u64) -> Result<(), DomainError> {
        self.moved(|s| {
            s.allocated = sub(s.allocated, qty, "allocated")?;
            s.available = add(s.available, qty, "available")?;
            Ok(())
        })
    }

    /// Restock, or a return after shipment with restock: `on_hand`,
    /// `available` and `stock_in` rise.
    ///
    /// # Errors
    /// `Overflow` when `on_hand` would pass [`ON_HAND_MAX`].
    pub fn stock_in(&mut self, qty: u64) -> Result<(), DomainError> {
        self.moved(|s| {
            s.on_hand = add(s.on_hand, qty, "on_hand")?;
            if s.on_hand > ON_HAND_MAX {
                return Err(DomainError::Overflow { what: "on_hand" });
            }
            s.available = add(s.available, qty, "available")?;
            s.stock_in = add(s.stock_in, qty, "stock_in")?;
            Ok(())
        })
    }

    /// Whether a restock of `qty` may be taken; used by decisions so that
    /// the error reaches the caller before anything is journaled. Checked
    /// against everything ever stocked, not only `on_hand`: every shipped
    /// unit may still come back as a restocked return, which cannot be
    /// refused once its refund is decided, so `on_hand` plus every possible
    /// return must stay within [`ON_HAND_MAX`].
    pub fn can_stock_in(&self, qty: u64) -> bool {
        self.stock_in
            .checked_add(qty)
            .is_some_and(|total| total <= ON_HAND_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_lifecycle_balances() {
        let mut s = StockLevels::new(10);
        s.reserve(4).expect("reserve");
        s.allocate(3).expect("allocate");
        s.release(1).expect("release");
        s.ship(2).expect("ship");
        s.unallocate(1).expect("unallocate");
        s.stock_in(5).expect("restock");
        assert_eq!(
            s,
            StockLevels {
                on_hand: 13,
                available: 13,
                reserved: 0,
                allocated: 0,
                shipped: 2,
                stock_in: 15
            }
        );
        s.check().expect("balanced");
    }

    #[test]
    fn an_impossible_move_changes_nothing() {
        let mut s = StockLevels::new(2);
        let before = s;
        assert!(matches!(s.reserve(3), Err(DomainError::Inconsistent(_))));
        assert!(s.release(1).is_err());
        assert!(s.allocate(1).is_err());
        assert!(s.ship(1).is_err());
        assert!(s.unallocate(1).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn restocks_leave_room_for_every_shipped_unit_to_come_back() {
        let mut s = StockLevels::new(ON_HAND_MAX - 10);
        s.reserve(10).expect("reserve");
        s.allocate(10).expect("allocate");
        s.ship(10).expect("ship");
        assert_eq!(s.on_hand, ON_HAND_MAX - 20);
        assert!(s.can_stock_in(10), "up to the cap, counting shipped units");
        assert!(!s.can_stock_in(11), "the shipped units may return");
        s.stock_in(10).expect("restock");
        s.stock_in(10).expect("every shipped unit returns");
        assert_eq!(s.on_hand, ON_HAND_MAX);
        s.check().expect("balanced");
    }

    #[test]
    fn stocking_past_the_cap_is_an_overflow() {
        let mut s = StockLevels::new(ON_HAND_MAX);
        assert!(!s.can_stock_in(1));
        assert_eq!(
            s.stock_in(1),
            Err(DomainError::Overflow { what: "on_hand" })
        );
        assert_eq!(s.on_hand, ON_HAND_MAX);
    }
}
