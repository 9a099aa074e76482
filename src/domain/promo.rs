//! Promotions and how an order-level discount is spread over the lines.
//!
//! A promotion takes `off_cents` off an order whose subtotal reaches
//! `threshold_cents`, but never more than the subtotal: `off_cents` may
//! exceed `threshold_cents` (contract v2), and the order's discount is then
//! `min(off_cents, subtotal)`, so a total never goes below 0. The discount is spread over the lines in proportion to
//! each line's subtotal, rounded down; the cents left over go one each to the
//! lines with the largest remainders, ties to the earlier line. So the line
//! discounts add up exactly, and a one-line refund later returns the line's
//! fair share (see `refund.rs`).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::{DomainError, Event, PromoCode};
use crate::limits::{PROMO_CENTS_MAX, PROMOTIONS_MAX};

/// A promotion: `off_cents` off any order whose subtotal reaches
/// `threshold_cents`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Promotion {
    /// The code buyers enter.
    pub code: PromoCode,
    /// Smallest subtotal the promotion applies to.
    pub threshold_cents: u64,
    /// What it takes off.
    pub off_cents: u64,
}

impl Promotion {
    /// Validates a new promotion: `threshold_cents` and `off_cents` at most
    /// [`PROMO_CENTS_MAX`] (no order is worth more), and `off_cents` at
    /// least 1 (a promotion that takes nothing off is refused as a likely
    /// mistake). `off_cents` may exceed `threshold_cents`:
    /// [`Promotion::discount_for`] caps the discount at the subtotal.
    ///
    /// # Errors
    /// `DomainError::Invalid` when the amounts are out of range.
    pub fn new(
        code: PromoCode,
        threshold_cents: u64,
        off_cents: u64,
    ) -> Result<Promotion, DomainError> {
        if threshold_cents > PROMO_CENTS_MAX {
            return Err(DomainError::invalid(format!(
                "threshold_cents must be at most {PROMO_CENTS_MAX}"
            )));
        }
        if off_cents == 0 || off_cents > PROMO_CENTS_MAX {
            return Err(DomainError::invalid(format!(
                "off_cents must be 1 to {PROMO_CENTS_MAX}"
            )));
        }
        Ok(Promotion {
            code,
            threshold_cents,
            off_cents,
        })
    }

    /// The order discount for a subtotal: `off_cents` once it reaches the
    /// threshold, else nothing. Never more than the subtotal.
    pub fn discount_for(&self, subtotal_cents: u64) -> u64 {
        if subtotal_cents >= self.threshold_cents {
            self.off_cents.min(subtotal_cents)
        } else {
            0
        }
    }
}

/// Every promotion, by code.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Promotions {
    by_code: HashMap<PromoCode, Promotion>,
}

impl Promotions {
    /// The promotion with this code.
    pub fn get(&self, code: &PromoCode) -> Option<&Promotion> {
        self.by_code.get(code)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.by_code.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_code.is_empty()
    }

    /// Every promotion, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Promotion> {
        self.by_code.values()
    }

    /// Decides whether a promotion may be created.
    ///
    /// # Errors
    /// [`CreateRefusal::AlreadyExists`] when the code is taken,
    /// [`CreateRefusal::Full`] when [`PROMOTIONS_MAX`] promotions exist.
    pub fn decide_create(&self, promo: Promotion, at_ms: u64) -> Result<Event, CreateRefusal> {
        if self.by_code.contains_key(&promo.code) {
            return Err(CreateRefusal::AlreadyExists);
        }
        if self.by_code.len() >= PROMOTIONS_MAX {
            return Err(CreateRefusal::Full);
        }
        Ok(Event::PromotionCreated { promo, at_ms })
    }

    /// Applies a `PromotionCreated`; other events do not touch promotions.
    ///
    /// # Errors
    /// `Inconsistent` when the code is taken (the decision rules it out).
    pub fn apply(&mut self, event: &Event) -> Result<(), DomainError> {
        if let Event::PromotionCreated { promo, .. } = event
            && self.by_code.insert(promo.code, *promo).is_some()
        {
            return Err(DomainError::inconsistent(format!(
                "promotion {} created twice",
                promo.code
            )));
        }
        Ok(())
    }
}

/// Why a promotion (or SKU) could not be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateRefusal {
    /// The id is taken (`409 already_exists`).
    AlreadyExists,
    /// The bound on how many there may be is reached.
    Full,
}

/// Spreads `discount_cents` over lines with the given subtotals: in
/// proportion, rounded down, the leftover cents one each to the largest
/// remainders, ties to the earlier line.
///
/// # Errors
/// `Invalid` when the discount exceeds the sum of the subtotals, `Overflow`
/// when the subtotals do not add up within `u64`.
pub fn spread_discount(line_cents: &[u64], discount_cents: u64) -> Result<Vec<u64>, DomainError> {
    let total = line_cents
        .iter()
        .try_fold(0u64, |sum, &c| sum.checked_add(c));
    let total = total.ok_or(DomainError::Overflow { what: "subtotal" })?;
    if discount_cents > total {
        return Err(DomainError::invalid("discount exceeds the subtotal"));
    }
    if discount_cents == 0 || total == 0 {
        return Ok(vec![0; line_cents.len()]);
    }
    let mut shares = Vec::with_capacity(line_cents.len());
    let mut remainders = Vec::with_capacity(line_cents.len());
    let mut given = 0u64;
    for (index, &cents) in line_cents.iter().enumerate() {
        // discount <= total, so share <= cents: fits u64.
        let product = u128::from(discount_cents) * u128::from(cents);
        let share = u64::try_from(product / u128::from(total))
            .map_err(|_| DomainError::Overflow { what: "discount" })?;
        let remainder = product % u128::from(total);
        shares.push(share);
        remainders.push((remainder, index));
        given += share; // sum of floors <= discount: cannot wrap
    }
    let leftover = discount_cents - given;
    // Fewer leftover cents than lines, by construction of the floors.
    debug_assert!(leftover < line_cents.len() as u64);
    // Largest remainder first; on a tie the earlier line (smaller index).
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, index) in remainders.iter().take(leftover as usize) {
        shares[index] += 1;
    }
    debug_assert_eq!(shares.iter().sum::<u64>(), discount_cents);
    Ok(shares)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::refund::refund_cents;
    use crate::limits::{ORDER_CENTS_MAX, PRICE_CENTS_MAX, QTY_MAX};
    use proptest::prelude::*;

    #[test]
    fn the_contract_example_splits_evenly() {
        assert_eq!(
            spread_discount(&[10_000, 10_000], 1_000),
            Ok(vec![500, 500])
        );
    }

    #[test]
    fn leftover_cents_go_to_the_largest_remainders_then_the_earlier_line() {
        // 10 over three equal lines: 3.33 each, one cent left, the first line gets it.
        assert_eq!(spread_discount(&[100, 100, 100], 10), Ok(vec![4, 3, 3]));
        // 7 over 1:2 -> 2.33 and 4.67: the second line has the larger remainder.
        assert_eq!(spread_discount(&[100, 200], 7), Ok(vec![2, 5]));
        // A zero-priced line takes no share.
        assert_eq!(spread_discount(&[0, 300], 7), Ok(vec![0, 7]));
    }

    #[test]
    fn a_discount_above_the_subtotal_is_refused() {
        assert!(spread_discount(&[100], 101).is_err());
    }

    #[test]
    fn promotions_apply_from_their_threshold() {
        let p = Promotion::new(PromoCode::parse("P").expect("valid"), 20_000, 1_000)
            .expect("valid promotion");
        assert_eq!(p.discount_for(19_999), 0);
        assert_eq!(p.discount_for(20_000), 1_000);
        assert!(Promotion::new(p.code, 100, 0).is_err(), "nothing off");
        assert!(Promotion::new(p.code, 100, PROMO_CENTS_MAX + 1).is_err());
        assert!(Promotion::new(p.code, PROMO_CENTS_MAX + 1, 1).is_err());
    }

    #[test]
    fn a_promotion_worth_more_than_its_threshold_takes_at_most_the_subtotal() {
        let code = PromoCode::parse("BIG").expect("valid");
        let p = Promotion::new(code, 100, 1_000).expect("off above the threshold");
        assert_eq!(p.discount_for(99), 0);
        assert_eq!(p.discount_for(100), 100, "the whole subtotal");
        assert_eq!(p.discount_for(700), 700);
        assert_eq!(p.discount_for(5_000), 1_000);
        let any = Promotion::new(code, 0, PROMO_CENTS_MAX).expect("the largest");
        assert_eq!(any.discount_for(0), 0);
        assert_eq!(any.discount_for(ORDER_CENTS_MAX), ORDER_CENTS_MAX);
    }

    #[test]
    fn a_discount_of_the_whole_subtotal_spreads_and_refunds_to_zero() {
        // Lines of 3 x 1.00 and 1 x 0.07, everything off.
        let lines = [300, 7];
        let shares = spread_discount(&lines, 307).expect("fits");
        assert_eq!(shares, vec![300, 7]);
        let mut returned = 0;
        for unit in 0..3 {
            returned += refund_cents(100, 3, shares[0], unit, 1).expect("in range");
        }
        returned += refund_cents(7, 1, shares[1], 0, 1).expect("in range");
        assert_eq!(returned, 0, "a free order refunds exactly what was paid");
    }

    /// Line prices and quantities, and a promotion: its threshold somewhere
    /// up to twice the subtotal, and its `off_cents` often at or above the
    /// subtotal (the whole subtotal off), else anything.
    fn order_and_promo() -> impl Strategy<Value = (Vec<(u64, u32)>, u64, u64, Vec<u32>)> {
        let lines = proptest::collection::vec((0u64..=PRICE_CENTS_MAX, 1u32..=QTY_MAX), 1..=20);
        (
            lines,
            0.0f64..=2.0,
            0u8..4,
            1u64..=PROMO_CENTS_MAX,
            proptest::collection::vec(1u32..=QTY_MAX, 0..8),
        )
            .prop_map(|(lines, threshold_ratio, kind, any_off, cuts)| {
                let subtotal: u64 = lines.iter().map(|&(p, q)| p * u64::from(q)).sum();
                let threshold = ((subtotal as f64 * threshold_ratio) as u64).min(PROMO_CENTS_MAX);
                let off = match kind {
                    0 => subtotal.max(1),
                    1 => subtotal.saturating_add(1).min(PROMO_CENTS_MAX),
                    2 => PROMO_CENTS_MAX,
                    _ => any_off,
                };
                (lines, threshold, off, cuts)
            })
    }

    proptest! {
        #[test]
        fn line_discounts_add_up_exactly(
            lines in proptest::collection::vec(0u64..=10_000_000_000_000_000, 1..=100),
            ratio in 0.0f64..=1.0,
            whole in proptest::bool::weighted(0.25),
        ) {
            let total: u64 = lines.iter().sum();
            let discount = if whole { total } else { ((total as f64 * ratio) as u64).min(total) };
            let shares = spread_discount(&lines, discount).expect("fits");
            prop_assert_eq!(shares.iter().sum::<u64>(), discount);
            for (share, cents) in shares.iter().zip(&lines) {
                prop_assert!(share <= cents, "a line never gets more off than it costs");
                if whole {
                    prop_assert_eq!(share, cents, "everything off: each line entirely");
                }
            }
        }

        #[test]
        fn any_promotion_spreads_and_refunds_exactly(
            (lines, threshold, off, cuts) in order_and_promo(),
        ) {
            let promo = Promotion::new(PromoCode::parse("P").expect("valid"), threshold, off)
                .expect("valid promotion");
            let line_cents: Vec<u64> = lines.iter().map(|&(p, q)| p * u64::from(q)).collect();
            let subtotal: u64 = line_cents.iter().sum();
            let discount = promo.discount_for(subtotal);
            prop_assert!(discount <= subtotal, "a total never below 0");
            if subtotal >= threshold {
                prop_assert_eq!(discount, off.min(subtotal));
            }
            let shares = spread_discount(&line_cents, discount).expect("fits");
            prop_assert_eq!(shares.iter().sum::<u64>(), discount);
            // Refunding every unit, in steps, returns exactly the total paid.
            let mut returned = 0u64;
            for (&(price, qty), &share) in lines.iter().zip(&shares) {
                let mut refunded = 0u32;
                for cut in cuts.iter().copied().chain(std::iter::once(qty)) {
                    let units = cut.min(qty - refunded);
                    if units == 0 {
                        break;
                    }
                    returned += refund_cents(price, qty, share, refunded, units).expect("in range");
                    refunded += units;
                }
                prop_assert_eq!(refunded, qty);
            }
            prop_assert_eq!(returned, subtotal - discount);
        }
    }
}
