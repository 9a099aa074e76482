//! Validation of request values against the contract's limits.
//!
//! Ids validate themselves (`ids.rs`); this module covers names, money,
//! quantities and the shape of line lists. Each check returns
//! `DomainError::Invalid` with a message a client can act on.

use crate::domain::DomainError;
use crate::domain::event::SkuQty;
use crate::limits::{
    LINES_MAX, NAME_CHARS_MAX, PER_USER_LIMIT_MAX, PRICE_CENTS_MAX, QTY_MAX, RESTOCK_QTY_MAX,
    STOCK_MAX,
};

/// A SKU name: 1..=200 characters, no control characters.
///
/// # Errors
/// `Invalid` when empty, too long or holding a control character.
pub fn name(text: &str) -> Result<(), DomainError> {
    let chars = text.chars().count();
    if chars == 0 || chars > NAME_CHARS_MAX {
        return Err(DomainError::invalid(format!(
            "name must be 1 to {NAME_CHARS_MAX} characters"
        )));
    }
    if text.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            "name must not contain control characters",
        ));
    }
    Ok(())
}

/// A unit price: 0..=10^12 cents.
///
/// # Errors
/// `Invalid` when above the limit.
pub fn price_cents(cents: u64) -> Result<(), DomainError> {
    in_range("price_cents", cents, 0, PRICE_CENTS_MAX)
}

/// Stock on creation: 0..=10^9.
///
/// # Errors
/// `Invalid` when above the limit.
pub fn stock(units: u64) -> Result<(), DomainError> {
    in_range("stock", units, 0, STOCK_MAX)
}

/// A restock: 1..=10^9.
///
/// # Errors
/// `Invalid` when out of range.
pub fn restock_qty(units: u64) -> Result<(), DomainError> {
    in_range("qty", units, 1, RESTOCK_QTY_MAX)
}

/// A per-user limit: 1..=10000, or none.
///
/// # Errors
/// `Invalid` when out of range.
pub fn per_user_limit(limit: Option<u32>) -> Result<(), DomainError> {
    match limit {
        None => Ok(()),
        Some(n) => in_range(
            "per_user_limit",
            u64::from(n),
            1,
            u64::from(PER_USER_LIMIT_MAX),
        ),
    }
}

/// A line quantity: 1..=10000.
///
/// # Errors
/// `Invalid` when out of range.
pub fn qty(units: u32) -> Result<(), DomainError> {
    in_range("qty", u64::from(units), 1, u64::from(QTY_MAX))
}

/// A cart quantity: 0 (removes the line) ..=10000.
///
/// # Errors
/// `Invalid` when out of range.
pub fn cart_qty(units: u32) -> Result<(), DomainError> {
    in_range("qty", u64::from(units), 0, u64::from(QTY_MAX))
}

fn in_range(what: &str, value: u64, low: u64, high: u64) -> Result<(), DomainError> {
    if value < low || value > high {
        return Err(DomainError::invalid(format!(
            "{what} must be {low} to {high}"
        )));
    }
    Ok(())
}

/// Checks the lines of an order and merges repeated SKUs into the first
/// line that names them (contract: "same SKU twice is merged").
///
/// # Errors
/// `Invalid` for no lines, more than 100, a quantity out of range, or a
/// merged quantity above 10000.
pub fn merge_lines(lines: &[SkuQty]) -> Result<Vec<SkuQty>, DomainError> {
    if lines.is_empty() || lines.len() > LINES_MAX {
        return Err(DomainError::invalid(format!(
            "items must have 1 to {LINES_MAX} lines"
        )));
    }
    let mut merged: Vec<SkuQty> = Vec::with_capacity(lines.len());
    for line in lines {
        qty(line.qty)?;
        match merged.iter_mut().find(|m| m.sku == line.sku) {
            Some(existing) => {
                existing.qty = existing
                    .qty
                    .checked_add(line.qty)
                    .filter(|&q| q <= QTY_MAX)
                    .ok_or_else(|| {
                        DomainError::invalid(format!(
                            "SKU {} totals more than {QTY_MAX} units",
                            line.sku
                        ))
                    })?;
            }
            None => merged.push(*line),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SkuId;

    fn l(s: &str, qty: u32) -> SkuQty {
        SkuQty {
            sku: SkuId::parse(s).expect("valid"),
            qty,
        }
    }

    #[test]
    fn limits_follow_the_contract() {
        assert!(name("Tee").is_ok());
        assert!(name(&"é".repeat(200)).is_ok());
        assert!(name(&"é".repeat(201)).is_err());
        assert!(name("").is_err());
        assert!(name("a\nb").is_err());
        assert!(price_cents(1_000_000_000_000).is_ok());
        assert!(price_cents(1_000_000_000_001).is_err());
        assert!(stock(0).is_ok() && stock(1_000_000_001).is_err());
        assert!(restock_qty(0).is_err() && restock_qty(1).is_ok());
        assert!(per_user_limit(None).is_ok() && per_user_limit(Some(0)).is_err());
        assert!(per_user_limit(Some(10_000)).is_ok() && per_user_limit(Some(10_001)).is_err());
        assert!(qty(0).is_err() && qty(10_000).is_ok() && qty(10_001).is_err());
        assert!(cart_qty(0).is_ok());
    }

    #[test]
    fn repeated_skus_merge_into_the_first_line() {
        assert_eq!(
            merge_lines(&[l("a", 1), l("b", 2), l("a", 3)]),
            Ok(vec![l("a", 4), l("b", 2)])
        );
        assert!(merge_lines(&[l("a", 6_000), l("a", 5_000)]).is_err());
        assert!(merge_lines(&[]).is_err());
        assert!(merge_lines(&[l("a", 0)]).is_err());
        let many: Vec<_> = (0..=LINES_MAX).map(|_| l("a", 1)).collect();
        assert!(
            merge_lines(&many).is_err(),
            "the raw line count is bounded too"
        );
    }
}
