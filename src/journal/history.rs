//! A journal's stored records, as recovery and the snapshotter see them.
//!
//! Every journal stores the same thing: **blocks** of records encoded by
//! `codec.rs`, each block named by the sequence number of its first record,
//! in increasing order. The sled journal keeps a block as a value in its
//! epoch trees (`epochs.rs`); the cluster journal keeps one as a message on
//! its partition's subject. Replay, the durable-state reader and the
//! snapshotter need only three things of either, which [`History`] names:
//! the blocks from a sequence number on, a capture point, and dropping the
//! blocks a snapshot made unneeded. So one replay (with its tail rule and
//! checks) serves both, and a cluster partition snapshots like a node alone.

use std::sync::Arc;

use crate::journal::Seq;

/// A stored block's bytes, without a copy where the store lends them.
#[derive(Debug, Clone)]
pub enum BlockBytes {
    /// A value read from sled.
    Sled(sled::IVec),
    /// Bytes owned outright.
    Owned(Vec<u8>),
    /// Bytes shared with the buffer they were read into (a JetStream
    /// message's payload).
    Shared(bytes::Bytes),
}

impl std::ops::Deref for BlockBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            BlockBytes::Sled(bytes) => bytes,
            BlockBytes::Owned(bytes) => bytes,
            BlockBytes::Shared(bytes) => bytes,
        }
    }
}

/// One block of records.
#[derive(Debug, Clone)]
pub struct StoredBlock {
    /// The sequence number of its first record.
    pub first: Seq,
    /// The encoded records, back to back (`codec::block_records`).
    pub bytes: BlockBytes,
}

/// Why the stored blocks could not be read or dropped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HistoryError {
    /// A block's name is not a sequence number: nothing after it can be
    /// placed. Damage, judged by recovery like any other.
    #[error("a block's key is not a sequence number: {0}")]
    BadKey(String),
    /// The store itself failed (I/O, a server that does not answer); its
    /// error is the source (sled's, the cluster journal's), so an
    /// `io::Error`'s kind survives (see `journal::io_kind`).
    #[error("{what}: {source}")]
    Storage {
        /// What was being done ("reading the journal").
        what: &'static str,
        /// The store's error.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl HistoryError {
    /// A [`HistoryError::Storage`].
    pub fn storage(
        what: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> HistoryError {
        HistoryError::Storage {
            what,
            source: Arc::new(source),
        }
    }
}

/// What [`History::drop_through`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Whole units dropped at once (sled epochs).
    pub epochs: u64,
    /// Blocks removed one by one.
    pub blocks: u64,
}

/// The blocks of a journal, in order.
pub type Blocks<'a> = Box<dyn Iterator<Item = Result<StoredBlock, HistoryError>> + 'a>;

/// A journal's stored blocks.
pub trait History: Send + Sync {
    /// The blocks from the one holding `from + 1` on, in order, to the end
    /// of what is stored when the read starts (at least).
    ///
    /// # Errors
    /// `Storage` when the read cannot start; each item may fail too.
    fn blocks_from(&self, from: Seq) -> Result<Blocks<'_>, HistoryError>;

    /// Called by the snapshotter right after it captured the state: the
    /// sled journal starts a new epoch there, so that the blocks before
    /// it can later go whole. Nothing by default.
    fn capture_point(&self) {}

    /// Drops the stored blocks whose records are all at or below `seq` (a
    /// snapshot covers them). Never the block being written to, so what
    /// stays is always a suffix of the journal.
    ///
    /// # Errors
    /// `Storage` when the store refuses; what was dropped stays dropped.
    fn drop_through(&self, seq: Seq) -> Result<Dropped, HistoryError>;
}
