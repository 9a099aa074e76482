//! Refund arithmetic (contract: "Promotions and refunds").
//!
//! Refunding `k` of a line's `qty` units, when `r` were refunded before,
//! returns `k * unit_price_cents - (floor(d * (r + k) / qty) - floor(d * r /
//! qty))`, where `d` is the line's `discount_cents`. The discount terms
//! telescope, so refunding every unit of a line, in any number of steps,
//! returns exactly `qty * unit_price_cents - d`, and every line together
//! returns exactly the order's `paid_cents`.

use crate::domain::DomainError;

/// The discount that `units` of a line carry: `floor(d * units / qty)`.
fn discount_share(discount_cents: u64, units: u32, qty: u32) -> Result<u64, DomainError> {
    if qty == 0 {
        return Err(DomainError::inconsistent("a line with no units"));
    }
    let share = u128::from(discount_cents) * u128::from(units) / u128::from(qty);
    u64::try_from(share).map_err(|_| DomainError::Overflow { what: "refund" })
}

/// What refunding `units` more units of a line returns.
///
/// # Errors
/// `Invalid` when `units` is zero or more than the line has left,
/// `Overflow` when the amount does not fit (it always does within limits).
pub fn refund_cents(
    unit_price_cents: u64,
    qty: u32,
    discount_cents: u64,
    refunded_before: u32,
    units: u32,
) -> Result<u64, DomainError> {
    let left = qty
        .checked_sub(refunded_before)
        .ok_or_else(|| DomainError::inconsistent("a line with more units refunded than it has"))?;
    if units == 0 || units > left {
        return Err(DomainError::invalid(format!(
            "can refund 1 to {left} units of this line"
        )));
    }
    let after = refunded_before + units; // <= qty: no overflow
    let gross = u64::from(units)
        .checked_mul(unit_price_cents)
        .ok_or(DomainError::Overflow { what: "refund" })?;
    let share = discount_share(discount_cents, after, qty)?
        - discount_share(discount_cents, refunded_before, qty)?;
    gross
        .checked_sub(share)
        .ok_or_else(|| DomainError::inconsistent("a line discount larger than its price"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_contract_example_refunds_half_the_discount_per_unit() {
        // Two lines of 100.00 with 5.00 off each: one unit of a line returns 95.00.
        assert_eq!(refund_cents(10_000, 1, 500, 0, 1), Ok(9_500));
        // A line of 3 units at 1.00 with 0.10 off: 0.97, 0.97, 0.96 (3 + 3 + 4 cents off).
        assert_eq!(refund_cents(100, 3, 10, 0, 1), Ok(97));
        assert_eq!(refund_cents(100, 3, 10, 1, 1), Ok(97));
        assert_eq!(refund_cents(100, 3, 10, 2, 1), Ok(96));
        assert_eq!(refund_cents(100, 3, 10, 0, 3), Ok(290));
    }

    #[test]
    fn refunding_more_than_is_left_is_refused() {
        assert!(matches!(
            refund_cents(100, 3, 0, 2, 2),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            refund_cents(100, 3, 0, 0, 0),
            Err(DomainError::Invalid(_))
        ));
    }

    proptest! {
        #[test]
        fn refunding_every_unit_in_any_steps_returns_the_line_total(
            price in 0u64..=1_000_000_000_000,
            qty in 1u32..=10_000,
            discount_ratio in 0.0f64..=1.0,
            whole in proptest::bool::weighted(0.25),
            cuts in proptest::collection::vec(1u32..=10_000, 0..20),
        ) {
            let line = price * u64::from(qty);
            // A quarter of the cases take the whole line off (a promotion
            // worth the whole subtotal): every step then returns 0.
            let discount = if whole { line } else { ((line as f64) * discount_ratio) as u64 };
            let discount = discount.min(line);
            let mut refunded = 0u32;
            let mut returned = 0u64;
            for cut in cuts.into_iter().chain(std::iter::once(qty)) {
                let units = cut.min(qty - refunded);
                if units == 0 { break; }
                returned += refund_cents(price, qty, discount, refunded, units).expect("in range");
                refunded += units;
            }
            prop_assert_eq!(refunded, qty);
            prop_assert_eq!(returned, line - discount);
        }
    }
}
