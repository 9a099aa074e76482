//! Sale windows: when a SKU may be ordered (contract: `sale_starts_at`,
//! `sale_ends_at`).
//!
//! A window bounds only new orders and checkouts of its SKU; payment,
//! shipping, cancelling, expiry and refunds of placed orders go on after it
//! ends. The window is `[starts_at, ends_at)`: an order at exactly the start
//! is taken, one at exactly the end is refused. Time is an argument, as
//! everywhere in the domain; the engine passes its clock's reading.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::domain::{DomainError, SkuId};

/// When a SKU sells, in unix milliseconds; `None` bounds nothing.
///
/// Persisted (journal events, snapshots): fields are only ever appended
/// with a new format version.
///
/// Invariant: `starts_at_ms < ends_at_ms` when both are set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SaleWindow {
    /// The first moment orders are taken.
    pub starts_at_ms: Option<u64>,
    /// The first moment orders are refused again.
    pub ends_at_ms: Option<u64>,
}

/// A change to a window (`PATCH`): per field, absent keeps it, `Some(None)`
/// clears it, `Some(Some(t))` sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SalePatch {
    /// New start.
    pub starts_at_ms: Option<Option<u64>>,
    /// New end.
    pub ends_at_ms: Option<Option<u64>>,
}

impl SalePatch {
    /// Whether the patch names neither field.
    pub fn is_empty(&self) -> bool {
        self.starts_at_ms.is_none() && self.ends_at_ms.is_none()
    }
}

impl SaleWindow {
    /// A window, checked.
    ///
    /// # Errors
    /// `Invalid` when both ends are set and the end is not after the start.
    pub fn new(
        starts_at_ms: Option<u64>,
        ends_at_ms: Option<u64>,
    ) -> Result<SaleWindow, DomainError> {
        if let (Some(start), Some(end)) = (starts_at_ms, ends_at_ms)
            && end <= start
        {
            return Err(DomainError::invalid(format!(
                "sale_ends_at ({}) must be after sale_starts_at ({})",
                Rfc3339(end),
                Rfc3339(start)
            )));
        }
        Ok(SaleWindow {
            starts_at_ms,
            ends_at_ms,
        })
    }

    /// This window with `patch` applied, checked.
    ///
    /// # Errors
    /// As [`SaleWindow::new`], on the window that would result.
    pub fn patched(self, patch: SalePatch) -> Result<SaleWindow, DomainError> {
        SaleWindow::new(
            patch.starts_at_ms.unwrap_or(self.starts_at_ms),
            patch.ends_at_ms.unwrap_or(self.ends_at_ms),
        )
    }

    /// Whether `sku` may be ordered at `now_ms`.
    ///
    /// # Errors
    /// `SaleNotStarted` before the start, `SaleEnded` from the end on.
    pub fn check(&self, sku: SkuId, now_ms: u64) -> Result<(), DomainError> {
        match (self.starts_at_ms, self.ends_at_ms) {
            (Some(starts_at_ms), _) if now_ms < starts_at_ms => {
                Err(DomainError::SaleNotStarted { sku, starts_at_ms })
            }
            (_, Some(ends_at_ms)) if now_ms >= ends_at_ms => {
                Err(DomainError::SaleEnded { sku, ends_at_ms })
            }
            _ => Ok(()),
        }
    }
}

/// Unix milliseconds shown as RFC 3339 UTC (millisecond precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc3339(pub u64);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match UNIX_EPOCH.checked_add(Duration::from_millis(self.0)) {
            Some(at) => write!(f, "{}", humantime::format_rfc3339_millis(at)),
            None => write!(f, "{} ms after the epoch", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sku() -> SkuId {
        SkuId::parse("tee").expect("valid")
    }

    #[test]
    fn the_window_is_closed_before_the_start_and_from_the_end() {
        let w = SaleWindow::new(Some(1_000), Some(2_000)).expect("valid");
        assert_eq!(
            w.check(sku(), 999),
            Err(DomainError::SaleNotStarted {
                sku: sku(),
                starts_at_ms: 1_000
            })
        );
        assert_eq!(w.check(sku(), 1_000), Ok(()));
        assert_eq!(w.check(sku(), 1_999), Ok(()));
        assert_eq!(
            w.check(sku(), 2_000),
            Err(DomainError::SaleEnded {
                sku: sku(),
                ends_at_ms: 2_000
            })
        );
        assert_eq!(SaleWindow::default().check(sku(), 0), Ok(()));
        assert_eq!(SaleWindow::default().check(sku(), u64::MAX), Ok(()));
    }

    #[test]
    fn the_end_must_follow_the_start() {
        assert!(SaleWindow::new(Some(5), Some(5)).is_err());
        assert!(SaleWindow::new(Some(6), Some(5)).is_err());
        assert!(SaleWindow::new(Some(5), None).is_ok());
        assert!(SaleWindow::new(None, Some(5)).is_ok());
        let w = SaleWindow::new(Some(5), Some(10)).expect("valid");
        // A patch is checked on the window it makes.
        let moved_past_end = SalePatch {
            starts_at_ms: Some(Some(20)),
            ends_at_ms: None,
        };
        assert!(w.patched(moved_past_end).is_err());
        let cleared = SalePatch {
            starts_at_ms: Some(None),
            ends_at_ms: None,
        };
        assert_eq!(
            w.patched(cleared),
            Ok(SaleWindow {
                starts_at_ms: None,
                ends_at_ms: Some(10)
            })
        );
    }

    #[test]
    fn refusals_name_the_time() {
        let e = DomainError::SaleNotStarted {
            sku: sku(),
            starts_at_ms: 1_767_225_600_000,
        };
        assert!(e.to_string().contains("2026-01-01T00:00:00.000Z"), "{e}");
    }
}
