//! The pure domain: no I/O, no async, no clock (time is an argument).
//!
//! Everything that can change is described by a value of [`Event`], and the
//! `apply` functions here are the only way state changes, live in the actors
//! and on replay in recovery, so the two can never drift apart. The `decide_*`
//! functions check a request against the state and return the event to apply;
//! an `Err` from them changes nothing. `apply` re-checks every invariant it
//! relies on and returns [`DomainError::Inconsistent`] instead of going wrong:
//! that error means a bug or a damaged journal, never bad input.

pub mod book;
pub mod cart;
pub mod event;
pub mod idem;
mod idem_part;
pub mod ids;
pub mod order;
pub mod promo;
pub mod refund;
pub mod sale;
pub mod sku;
pub mod state;
pub mod stock;
pub mod validate;

pub use event::{Event, IdemStamp};
pub use ids::{IdempotencyKey, OrderId, PaymentRef, PromoCode, SkuId, UserId};
pub use order::{Action, Order, OrderLine, OrderStatus};
pub use state::State;
pub use stock::StockLevels;

/// Why the domain refused a request, or found its own state broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The request itself is malformed or out of range (`400`).
    #[error("{0}")]
    Invalid(String),
    /// Arithmetic on the request would overflow; refused, never wrapped (`400`).
    #[error("{what} is out of range")]
    Overflow {
        /// What could not be computed.
        what: &'static str,
    },
    /// Not enough `available` units for a line (`409 out_of_stock`).
    #[error("not enough stock of SKU {sku}")]
    OutOfStock {
        /// The SKU that ran short.
        sku: SkuId,
    },
    /// The SKU's `per_user_limit` would be passed (`409 limit_exceeded`).
    #[error("SKU {sku} allows at most {limit} units per user")]
    LimitExceeded {
        /// The limited SKU.
        sku: SkuId,
        /// Its per-user limit.
        limit: u32,
    },
    /// The SKU's sale has not started (`409 sale_not_started`).
    #[error("the sale of SKU {sku} starts at {}", sale::Rfc3339(*starts_at_ms))]
    SaleNotStarted {
        /// The SKU.
        sku: SkuId,
        /// Its `sale_starts_at`.
        starts_at_ms: u64,
    },
    /// The SKU's sale has ended (`409 sale_ended`).
    #[error("the sale of SKU {sku} ended at {}", sale::Rfc3339(*ends_at_ms))]
    SaleEnded {
        /// The SKU.
        sku: SkuId,
        /// Its `sale_ends_at`.
        ends_at_ms: u64,
    },
    /// The order's state does not allow the action (`409 invalid_transition`).
    #[error("an order that is {from} cannot be {action}")]
    InvalidTransition {
        /// The order's state.
        from: OrderStatus,
        /// What was asked.
        action: Action,
    },
    /// A payment whose amount is not the order's total (`409 payment_mismatch`).
    #[error("paid {paid_cents} cents, but the order total is {total_cents} cents")]
    PaymentMismatch {
        /// The order's total.
        total_cents: u64,
        /// The amount the provider reported.
        paid_cents: u64,
    },
    /// Applying an event found the state in a shape the event's decision ruled
    /// out. A bug or a damaged journal; never caused by a request.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
}

impl DomainError {
    /// A `400 invalid_request` with a human message.
    pub fn invalid(message: impl Into<String>) -> DomainError {
        DomainError::Invalid(message.into())
    }

    /// An [`DomainError::Inconsistent`] with a message.
    pub fn inconsistent(message: impl Into<String>) -> DomainError {
        DomainError::Inconsistent(message.into())
    }
}

/// Checked addition that reports what overflowed.
///
/// # Errors
/// `DomainError::Overflow` instead of wrapping.
pub fn add(a: u64, b: u64, what: &'static str) -> Result<u64, DomainError> {
    a.checked_add(b).ok_or(DomainError::Overflow { what })
}

/// Checked multiplication that reports what overflowed.
///
/// # Errors
/// `DomainError::Overflow` instead of wrapping.
pub fn mul(a: u64, b: u64, what: &'static str) -> Result<u64, DomainError> {
    a.checked_mul(b).ok_or(DomainError::Overflow { what })
}

/// Checked subtraction for a move that the decision already ruled safe: an
/// underflow here means the state is broken.
///
/// # Errors
/// `DomainError::Inconsistent` instead of wrapping.
pub fn sub(a: u64, b: u64, what: &'static str) -> Result<u64, DomainError> {
    a.checked_sub(b)
        .ok_or_else(|| DomainError::inconsistent(format!("{what} would fall below zero")))
}
