//! Where events go to become durable.
//!
//! A [`Journal`] takes events in one FIFO order, numbers them with increasing
//! sequence numbers and makes them durable in that order, so the durable part
//! is always a prefix of what was appended. [`Watermark`] publishes how far
//! that prefix reaches and lets callers wait for their event (group commit
//! releases a whole batch at once). An append that fails leaves nothing
//! behind: the caller has not applied the event yet and must not.
//!
//! [`SledJournal`] is the durable journal (group commit on `sled`, see
//! `writer.rs`); `history.rs` is what any journal stores (blocks of records)
//! as replay and snapshots read it; `recovery.rs` rebuilds the state from a snapshot and the
//! journal tail; `snapshot.rs` writes snapshots from the live engine's parts
//! and keeps the journal below them short; `codec.rs` is the on-disk format;
//! `archive.rs` keeps finished orders that left memory ([`Archive`]).
//! [`MemJournal`] keeps events in memory; tests use it to replay what the
//! engine did and compare.

pub mod archive;
pub mod codec;
pub mod epochs;
pub mod history;
pub mod idem_store;
mod memory;
pub mod recovery;
pub mod snapshot;
mod watermark;
pub mod writer;

pub use archive::{Archive, MemArchive, OpeningArchive, SledArchive};
pub use epochs::Epochs;
pub use history::History;
pub use idem_store::{IdemStore, MemIdemStore, SledIdemStore};
pub use memory::MemJournal;
pub use recovery::{Recovered, RecoveryError, recover};
pub use snapshot::{
    Capture, Mark, SnapshotPolicy, SnapshotReport, SnapshotSource, SnapshotStore, Snapshotter,
};
pub use watermark::Watermark;
pub use writer::{FlushPolicy, JournalStats, RELAXED_AHEAD_MS_MAX, SledJournal};

use crate::domain::{Event, State};

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

    /// How long ago (ms) the oldest event that is not durable yet was
    /// appended; 0 when everything appended is durable. Relaxed durability
    /// stops answering ahead of the disk once this grows too large.
    fn unflushed_age_ms(&self) -> u64 {
        0
    }

    /// Why the journal stopped taking events (a storage failure), if it
    /// did.
    fn failure(&self) -> Option<String> {
        None
    }

    /// The state as it was at the durable watermark, and that sequence
    /// number, rebuilt from what is on disk: reads are served from it while
    /// the journal refuses changes (after a failure the watermark no longer
    /// moves).
    ///
    /// # Errors
    /// `Unavailable` when it cannot be rebuilt (or this journal keeps no
    /// history to rebuild it from).
    fn durable_state(&self) -> Result<(State, Seq), JournalError> {
        Err(JournalError::Unavailable(
            "this journal cannot rebuild its durable state".into(),
        ))
    }

    /// What the writer has done, for metrics, if this journal keeps count.
    fn stats(&self) -> Option<&JournalStats> {
        None
    }

    /// The archive finished orders move to, kept beside this journal (see
    /// `archive.rs`), if it has one. Without one, orders stay in memory.
    fn archive(&self) -> Option<std::sync::Arc<dyn Archive>> {
        None
    }

    /// The store idempotency records move to when memory holds too many,
    /// kept beside this journal (see `idem_store.rs`), if it has one.
    /// Without one, every record stays in memory.
    fn idem_store(&self) -> Option<std::sync::Arc<dyn IdemStore>> {
        None
    }
}

/// A journal opened on a data dir, with the state rebuilt from it.
#[derive(Debug)]
pub struct Opened {
    /// The journal, ready for appends after the last good record.
    pub journal: std::sync::Arc<SledJournal>,
    /// The rebuilt state.
    pub recovered: Recovered,
}

/// The journal's directory inside a data dir.
pub fn journal_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("journal")
}

/// The order archive's database inside a data dir.
pub fn archive_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("archive")
}

/// The snapshots' directory inside a data dir.
pub fn snapshot_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("snapshots")
}

/// Opens the journal in `data_dir` (creating it if needed), rebuilds the
/// state (cutting a torn tail; with `repair`, any damage) and starts the
/// writer after the last good record.
///
/// # Errors
/// `RecoveryError::Storage` when the data dir cannot be used,
/// `RecoveryError::Corrupt` for damage before the tail without `repair`.
pub fn open(
    data_dir: &std::path::Path,
    policy: FlushPolicy,
    repair: bool,
) -> Result<Opened, RecoveryError> {
    let dir = journal_dir(data_dir);
    let db = writer::open_db(&dir).map_err(|e| RecoveryError::Storage(e.to_string()))?;
    let recovered = recover(&db, &dir, &snapshot_dir(data_dir), repair)?;
    let journal = SledJournal::start(db, &dir, recovered.last_seq, policy)
        .map_err(|e| RecoveryError::Storage(e.to_string()))?;
    Ok(Opened {
        journal: std::sync::Arc::new(journal),
        recovered,
    })
}
