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
    Capture, CaptureError, Mark, SnapshotError, SnapshotPolicy, SnapshotReport, SnapshotSource,
    SnapshotStore, Snapshotter,
};
pub use watermark::Watermark;
pub use writer::{FlushPolicy, JournalStats, RELAXED_AHEAD_MS_MAX, SledJournal};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::domain::{Event, State};

/// A journal sequence number. The first event is 1; 0 means "nothing".
pub type Seq = u64;

/// Why the journal did not take or keep an event.
///
/// Each failure is a variant of its own and keeps what caused it (the
/// `io::Error` with its kind, sled's error, the codec's), so a caller can
/// tell a full disk from a lock held by another process without reading
/// text. Causes sit behind `Arc` because the error is cloned (a failed
/// batch fails every waiter with the same error). Which HTTP status each
/// becomes is decided in `http/error.rs` alone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    /// The queue to the writer is full: shed load (`503 overloaded`).
    #[error("the journal queue is full")]
    Full,
    /// A file or directory could not be created, opened, read, written or
    /// synced; the `io::Error` keeps its kind (`StorageFull`,
    /// `PermissionDenied`, ...).
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot fsync").
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: Arc<std::io::Error>,
    },
    /// A thread the journal needs could not start.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why not.
        source: Arc<std::io::Error>,
    },
    /// sled failed (its own I/O, or damage it found).
    #[error("{what}: {source}")]
    Sled {
        /// What was being done.
        what: &'static str,
        /// sled's error.
        source: Arc<sled::Error>,
    },
    /// sled cannot open the database in `path` (a `conf` that does not
    /// match, damage it found, its own I/O).
    #[error("cannot open the database in {}: {source}", path.display())]
    Open {
        /// The database's directory.
        path: PathBuf,
        /// sled's error.
        source: Arc<sled::Error>,
    },
    /// Another process holds the database's lock, still after waiting for
    /// it (another server on the same data dir).
    #[error(
        "cannot open the database in {}: its lock is held by another process \
         (another server on this data dir?): {source}",
        path.display()
    )]
    Locked {
        /// The database's directory.
        path: PathBuf,
        /// sled's error.
        source: Arc<sled::Error>,
    },
    /// Bytes that do not encode (an event over the size limit) or stored
    /// bytes that do not decode (damage).
    #[error("{what}: {source}")]
    Codec {
        /// What was being encoded or decoded ("order 7 is damaged").
        what: String,
        /// The codec's error.
        source: codec::CodecError,
    },
    /// A stored key has the wrong length: damage.
    #[error("{what}: {len} bytes, not {expected}")]
    BadKey {
        /// Which key.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The length it must have.
        expected: usize,
    },
    /// The batch that held this change failed: it is not durable.
    #[error("the journal could not make this change durable")]
    NotDurable,
    /// The journal refuses events since an earlier failure (`cause`), until
    /// the engine reloads (redb's `PreviousIo`).
    #[error("the journal stopped after a storage failure: {cause}")]
    Stopped {
        /// The failure that stopped it.
        #[source]
        cause: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The journal was closed (the server is stopping).
    #[error("the journal is closed")]
    Closed,
    /// The writer thread is gone (it ended or panicked).
    #[error("the journal writer stopped")]
    WriterStopped,
    /// Every sequence number was handed out.
    #[error("sequence numbers exhausted")]
    SeqExhausted,
    /// The journal's directory has no parent, the data dir, where the
    /// archive and the snapshots live.
    #[error("{} has no data dir", .0.display())]
    NoDataDir(PathBuf),
    /// This journal keeps no history to rebuild its durable state from.
    #[error("this journal cannot rebuild its durable state")]
    NoHistory,
    /// Rebuilding the durable state failed.
    #[error("rebuilding the durable state: {0}")]
    DurableState(#[source] Arc<RecoveryError>),
    /// The order archive is still being opened; retry shortly.
    #[error("the order archive is still opening; retry shortly")]
    ArchiveOpening,
    /// A store on another server (the cluster's JetStream) failed or did
    /// not answer.
    #[error("{what}: {source}")]
    Remote {
        /// What was being done.
        what: &'static str,
        /// The remote store's error.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl JournalError {
    /// An [`JournalError::Io`].
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> JournalError {
        JournalError::Io {
            what,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    /// A [`JournalError::Sled`].
    pub fn sled(what: &'static str, source: sled::Error) -> JournalError {
        JournalError::Sled {
            what,
            source: Arc::new(source),
        }
    }

    /// A [`JournalError::Codec`].
    pub fn codec(what: impl Into<String>, source: codec::CodecError) -> JournalError {
        JournalError::Codec {
            what: what.into(),
            source,
        }
    }

    /// A [`JournalError::Remote`].
    pub fn remote(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> JournalError {
        JournalError::Remote {
            what,
            source: Arc::from(source.into()),
        }
    }

    /// A [`JournalError::Stopped`] by `cause`.
    pub fn stopped(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> JournalError {
        JournalError::Stopped {
            cause: Arc::from(cause.into()),
        }
    }

    /// The kind of the operating system's error under this one, if an
    /// `io::Error` caused it (see [`io_kind`]).
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        io_kind(self)
    }
}

/// The kind of the first `io::Error` in `error`'s chain of sources (itself
/// included), looking through `Arc`s and into `sled::Error::Io`: whether a
/// failure was a full disk (`StorageFull`) or a permission, whatever layer
/// reports it.
pub fn io_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause = Some(error);
    // Bounded: a chain of sources is short, and never a cycle.
    for _ in 0..IO_KIND_DEPTH_MAX {
        let error = cause?;
        // A cause kept as `Arc<dyn Error>` (a remote store's, a stopped
        // writer's) is looked into, not past.
        if let Some(inner) = error.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>() {
            cause = Some(&**inner);
            continue;
        }
        if let Some(io) = error
            .downcast_ref::<std::io::Error>()
            .or_else(|| error.downcast_ref::<Arc<std::io::Error>>().map(|a| &**a))
        {
            return Some(io.kind());
        }
        if let Some(sled::Error::Io(io)) = error
            .downcast_ref::<sled::Error>()
            .or_else(|| error.downcast_ref::<Arc<sled::Error>>().map(|a| &**a))
        {
            return Some(io.kind());
        }
        cause = error.source();
    }
    None
}

/// How deep [`io_kind`] looks into a chain of sources.
const IO_KIND_DEPTH_MAX: usize = 16;

/// The journal as the engine sees it.
pub trait Journal: Send + Sync + 'static {
    /// Appends an event and returns its sequence number. Sequence numbers
    /// increase in the order appends return, and that is the order in which
    /// events become durable.
    ///
    /// # Errors
    /// `Full` when the writer's queue is full, `Stopped` (or another kind) after a storage
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

    /// Why the journal stopped taking events (the storage failure, with
    /// its cause), if it did.
    fn failure(&self) -> Option<JournalError> {
        None
    }

    /// The state as it was at the durable watermark, and that sequence
    /// number, rebuilt from what is on disk: reads are served from it while
    /// the journal refuses changes (after a failure the watermark no longer
    /// moves).
    ///
    /// # Errors
    /// `DurableState` when it cannot be rebuilt (`NoHistory` when this journal keeps no
    /// history to rebuild it from).
    fn durable_state(&self) -> Result<(State, Seq), JournalError> {
        Err(JournalError::NoHistory)
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
/// `RecoveryError::Storage` when the data dir cannot be used (another
/// server holds it: `JournalError::Locked`),
/// `RecoveryError::Corrupt` for damage before the tail without `repair`.
pub fn open(
    data_dir: &std::path::Path,
    policy: FlushPolicy,
    repair: bool,
) -> Result<Opened, RecoveryError> {
    let dir = journal_dir(data_dir);
    let db = writer::open_db(&dir)?;
    let recovered = recover(&db, &dir, &snapshot_dir(data_dir), repair)?;
    let journal = SledJournal::start(db, &dir, recovered.last_seq, policy)?;
    Ok(Opened {
        journal: std::sync::Arc::new(journal),
        recovered,
    })
}
