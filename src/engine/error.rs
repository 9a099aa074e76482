//! `EngineError`: every way an engine call can fail.
//!
//! The HTTP front maps each variant to a status and code in one place
//! (`http/error.rs`); nothing here knows about HTTP.

use crate::domain::DomainError;
use crate::journal::JournalError;

/// Why an engine call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// The domain refused the request (bad input, out of stock, limit, ...).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// No such SKU, order or promotion.
    #[error("{what} {id} not found")]
    NotFound {
        /// What kind of thing.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// Creating a SKU or promotion whose id is taken.
    #[error("{what} {id} already exists")]
    AlreadyExists {
        /// What kind of thing.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// The caller may not do this to this order.
    #[error("{0}")]
    Forbidden(String),
    /// A queue is full: shed the request at once rather than queue it.
    #[error("the server is overloaded; retry shortly")]
    Overloaded,
    /// The journal cannot make changes durable; nothing was changed.
    #[error("storage unavailable: {0}")]
    StorageUnavailable(String),
    /// The engine is shutting down.
    #[error("the engine is stopping")]
    Stopped,
}

impl From<JournalError> for EngineError {
    fn from(error: JournalError) -> EngineError {
        match error {
            JournalError::Full => EngineError::Overloaded,
            JournalError::Unavailable(why) => EngineError::StorageUnavailable(why),
        }
    }
}

impl EngineError {
    /// A `NotFound` for a SKU.
    pub fn sku_not_found(id: impl std::fmt::Display) -> EngineError {
        EngineError::NotFound {
            what: "SKU",
            id: id.to_string(),
        }
    }

    /// A `NotFound` for an order.
    pub fn order_not_found(id: impl std::fmt::Display) -> EngineError {
        EngineError::NotFound {
            what: "order",
            id: id.to_string(),
        }
    }
}
