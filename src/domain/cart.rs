//! A user's cart: SKU lines waiting for checkout.
//!
//! A cart holds at most 100 lines of 1..=10000 units; setting a line to 0
//! removes it. Lines keep the order in which they were first added, which is
//! the order of the lines of the order a checkout places.

use serde::{Deserialize, Serialize};

use crate::domain::event::SkuQty;
use crate::domain::{DomainError, Event, SkuId, UserId, validate};
use crate::limits::LINES_MAX;

/// One user's cart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cart {
    items: Vec<SkuQty>,
}

impl Cart {
    /// The lines, in the order they were added.
    pub fn items(&self) -> &[SkuQty] {
        &self.items
    }

    /// Whether the cart has no lines.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Decides setting `sku` to `qty` units (0 removes the line).
    ///
    /// # Errors
    /// `Invalid` for a quantity out of range or a 101st line.
    pub fn decide_set(
        &self,
        user: UserId,
        sku: SkuId,
        qty: u32,
        at_ms: u64,
    ) -> Result<Event, DomainError> {
        validate::cart_qty(qty)?;
        let present = self.items.iter().any(|l| l.sku == sku);
        if qty > 0 && !present && self.items.len() >= LINES_MAX {
            return Err(DomainError::invalid(format!(
                "a cart holds at most {LINES_MAX} lines"
            )));
        }
        Ok(Event::CartItemSet {
            user,
            sku,
            qty,
            at_ms,
        })
    }

    /// Applies a `CartItemSet` to this cart.
    ///
    /// # Errors
    /// `Inconsistent` when the cart would pass its line limit.
    pub fn set(&mut self, sku: SkuId, qty: u32) -> Result<(), DomainError> {
        match self.items.iter().position(|l| l.sku == sku) {
            Some(index) if qty == 0 => {
                self.items.remove(index);
            }
            Some(index) => self.items[index].qty = qty,
            None if qty == 0 => {}
            None => {
                if self.items.len() >= LINES_MAX {
                    return Err(DomainError::inconsistent("a cart past its line limit"));
                }
                self.items.push(SkuQty { sku, qty });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> SkuId {
        SkuId::parse(x).expect("valid")
    }

    #[test]
    fn lines_are_set_replaced_and_removed_in_place() {
        let mut c = Cart::default();
        c.set(s("a"), 2).expect("set");
        c.set(s("b"), 1).expect("set");
        c.set(s("a"), 5).expect("set");
        assert_eq!(
            c.items(),
            &[
                SkuQty {
                    sku: s("a"),
                    qty: 5
                },
                SkuQty {
                    sku: s("b"),
                    qty: 1
                }
            ]
        );
        c.set(s("a"), 0).expect("removed");
        c.set(s("z"), 0)
            .expect("removing a missing line is harmless");
        assert_eq!(
            c.items(),
            &[SkuQty {
                sku: s("b"),
                qty: 1
            }]
        );
    }

    #[test]
    fn a_full_cart_takes_no_new_line() {
        let mut c = Cart::default();
        for i in 0..LINES_MAX {
            c.set(s(&format!("s{i}")), 1).expect("fits");
        }
        let u = UserId::parse("u").expect("valid");
        assert!(c.decide_set(u, s("new"), 1, 0).is_err());
        assert!(
            c.decide_set(u, s("s0"), 3, 0).is_ok(),
            "changing a line still works"
        );
        assert!(c.decide_set(u, s("new"), 0, 0).is_ok());
        assert!(c.decide_set(u, s("s0"), 10_001, 0).is_err());
    }
}
