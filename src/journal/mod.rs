//! Where events go to become durable.
//!
//! A [`Journal`] takes events in one FIFO order, numbers them with increasing
//! sequence numbers and makes them durable in that order, so the durable part
//! is always a prefix of what was appended. [`Watermark`] publishes how far
//! that prefix reaches and lets callers wait for their event (group commit
//! releases a whole batch at once). An append that fails leaves nothing
//! behind: the caller has not applied the event yet and must not.
//!
//! [`MemJournal`] keeps events in memory; tests use it to replay what the
//! engine did and compare.

mod memory;
mod watermark;

pub use memory::MemJournal;
pub use watermark::Watermark;

use crate::domain::Event;

/// A journal sequence number. The first event is 1; 0 means "nothing".
pub type Seq = u64;

/// Why the journal did not take or keep an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The queue to the writer is full: shed load (`503 overloaded`).
    #[error("the journal queue is full")]
    Full,
    /// The journal cannot make changes durable (disk full, I/O error), or
    /// has stopped after such a failure (`503 storage_unavailable`).
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// The journal as the engine sees it.
pub trait Journal: Send + Sync + 'static {
    /// Appends an event and returns its sequence number. Sequence numbers
    /// increase in the order appends return, and that is the order in which
    /// events become durable.
    ///
    /// # Errors
    /// `Full` when the writer's queue is full, `Unavailable` after a storage
    /// failure; the event was not taken.
    fn append(&self, event: &Event) -> Result<Seq, JournalError>;

    /// How far the durable prefix reaches.
    fn watermark(&self) -> &Watermark;

    /// The highest sequence number handed out so far, durable or not.
    fn last_seq(&self) -> Seq;
}
