//! `EngineError`: every way an engine call can fail.
//!
//! The HTTP front maps each variant to a status and code in one place
//! (`http/error.rs`); nothing here knows about HTTP.

use std::sync::Arc;

use crate::domain::DomainError;
use crate::journal::JournalError;

/// Why an engine call failed.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The journal cannot make changes durable, or its stores cannot be
    /// read; nothing was changed. The journal's error says which failure.
    #[error("storage unavailable: {0}")]
    Storage(#[source] JournalError),
    /// A thread the engine needs could not start.
    #[error("storage unavailable: cannot start {what}: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why not.
        source: Arc<std::io::Error>,
    },
    /// A blocking task (reading or writing a store) ended without an
    /// answer: it panicked or was cancelled.
    #[error("storage unavailable: {what}: {source}")]
    Task {
        /// What the task was doing.
        what: &'static str,
        /// How it ended.
        source: Arc<tokio::task::JoinError>,
    },
    /// Every order id was handed out.
    #[error("storage unavailable: the order id space is exhausted")]
    IdsExhausted,
    /// The engine is shutting down.
    #[error("the engine is stopping")]
    Stopped,
}

impl From<JournalError> for EngineError {
    fn from(error: JournalError) -> EngineError {
        match error {
            JournalError::Full => EngineError::Overloaded,
            other => EngineError::Storage(other),
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
