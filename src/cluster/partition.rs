//! Taking a partition over: the newest snapshot from the object store, the
//! journal after it from the stream, a barrier, then an engine.
//!
//! The order is what makes a takeover safe without any lock across nodes:
//!
//! 1. Recover the state (`recovery::recover_from`) from the partition's
//!    newest snapshot and every journal block after it.
//! 2. Read the journal's resume point again: if it moved since the read
//!    (another node still appends), give up: the caller tries later.
//! 3. Start the journal writer at that point and append an
//!    `OwnerChanged { term }` barrier with compare-and-set on the subject's
//!    last sequence, and wait for it. Once it is stored, the previous
//!    owner's next append expects an older last sequence and is refused:
//!    that node is fenced and can never acknowledge another change here.
//!    If the barrier itself is refused, someone else got there first.
//! 4. Start the engine on the recovered state and the snapshotter (object
//!    store, purging the journal below the snapshot before last). The
//!    engine's journal carries the partition's archive and idempotency
//!    store on the servers ([`StoreStreams`]), so finished orders and
//!    spilled records the previous owner moved there are read here.
//!
//! A lease (`lease.rs`) decides who *tries* (liveness); the compare-and-set
//! decides who *succeeds* (safety).

use std::sync::Arc;

use async_nats::jetstream::{Context, object_store::ObjectStore};
use tokio::runtime::Handle;

use crate::clock::Clock;
use crate::cluster::archive::{ArchiveStream, JetStreamArchive};
use crate::cluster::idem_store::{IdemStream, JetStreamIdemStore};
use crate::cluster::journal::{
    self, ClusterJournalError, JetStreamJournal, JournalStream, WriterTerm,
};
use crate::cluster::snapshots::ObjectSnapshots;
use crate::domain::Event;
use crate::engine::{Engine, EngineConfig, EngineError};
use crate::journal::history::{self, BlockBytes, Dropped, History, HistoryError};
use crate::journal::{Journal, JournalError, RecoveryError, Seq, SnapshotPolicy, Snapshotter};

/// A partition's journal blocks on the stream, as replay and the
/// snapshotter read them. Calls run on `runtime` (`Handle::block_on`), so
/// use it from a blocking thread, never from a runtime worker.
#[derive(Clone)]
pub struct JetStreamHistory {
    context: Context,
    spec: JournalStream,
    partition: u32,
    runtime: Handle,
}

impl std::fmt::Debug for JetStreamHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamHistory")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl JetStreamHistory {
    /// The journal of `partition` in the stream `spec`.
    pub fn new(context: Context, spec: JournalStream, partition: u32, runtime: Handle) -> Self {
        JetStreamHistory {
            context,
            spec,
            partition,
            runtime,
        }
    }
}

fn storage(e: ClusterJournalError) -> HistoryError {
    HistoryError::storage("the cluster journal", e)
}

impl History for JetStreamHistory {
    fn blocks_from(&self, from: Seq) -> Result<history::Blocks<'_>, HistoryError> {
        let read = self.runtime.block_on(journal::blocks_after(
            &self.context,
            &self.spec,
            self.partition,
            from,
        ));
        let blocks = match read {
            Ok(read) => read.blocks,
            // Nothing after `from`: an empty tail, not damage.
            Err(ClusterJournalError::Behind { .. }) => Vec::new(),
            Err(e) => return Err(storage(e)),
        };
        Ok(Box::new(blocks.into_iter().map(|block| {
            Ok(history::StoredBlock {
                first: block.first_seq,
                bytes: BlockBytes::Shared(block.bytes),
            })
        })))
    }

    fn drop_through(&self, seq: Seq) -> Result<Dropped, HistoryError> {
        let purged = self
            .runtime
            .block_on(journal::purge_through(
                &self.context,
                &self.spec,
                self.partition,
                seq,
            ))
            .map_err(storage)?;
        Ok(Dropped {
            epochs: 0,
            blocks: purged,
        })
    }
}

/// Why a partition could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The stored state does not rebuild (damage, or a store that does not
    /// answer).
    #[error("rebuilding partition {partition}: {source}")]
    Recovery {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: RecoveryError,
    },
    /// The journal grew while it was read: another node still appends.
    #[error("partition {partition}'s journal moved from {read} to {now} while it was read")]
    Moved {
        /// The partition.
        partition: u32,
        /// The last sequence number replayed.
        read: Seq,
        /// The last one stored now.
        now: Seq,
    },
    /// The journal could not be read or started.
    #[error("partition {partition}'s journal: {source}")]
    Journal {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: ClusterJournalError,
    },
    /// The barrier was refused: another node took the partition first (or
    /// the servers failed before it was stored).
    #[error("partition {partition}: the takeover barrier was not stored: {source}")]
    Barrier {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: JournalError,
    },
    /// The engine did not start on the recovered state.
    #[error("partition {partition}: starting the engine: {source}")]
    Engine {
        /// The partition.
        partition: u32,
        /// Why.
        #[source]
        source: EngineError,
    },
}

/// The streams a partition keeps what leaves memory in: its archive of
/// finished orders and its idempotency records past the memory budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStreams {
    /// The archive stream.
    pub archive: ArchiveStream,
    /// The idempotency records' stream.
    pub idem: IdemStream,
}

impl StoreStreams {
    /// The default layout, with `replicas` copies.
    pub fn new(replicas: usize) -> StoreStreams {
        StoreStreams {
            archive: ArchiveStream::new(replicas),
            idem: IdemStream::new(replicas),
        }
    }
}

/// What taking a partition over needs.
#[derive(Clone)]
pub struct Takeover {
    /// The JetStream context (this node's connection).
    pub context: Context,
    /// The journal stream.
    pub spec: JournalStream,
    /// The snapshot bucket.
    pub snapshots: ObjectStore,
    /// The partition.
    pub partition: u32,
    /// The lease's term: it goes into the barrier and every block.
    pub term: u64,
    /// The engine's settings.
    pub engine: EngineConfig,
    /// When snapshots are taken.
    pub policy: SnapshotPolicy,
    /// The clock the engine runs on.
    pub clock: Arc<dyn Clock>,
    /// Where finished orders and spilled idempotency records go (streams
    /// made beforehand); `None` keeps them in the engine's memory.
    pub stores: Option<StoreStreams>,
}

/// A partition this node owns: its engine, journal and snapshotter.
pub struct OwnedPartition {
    /// The partition.
    pub partition: u32,
    /// The engine serving it.
    pub engine: Engine,
    /// Its journal (fenced once another node takes the partition).
    pub journal: Arc<JetStreamJournal>,
    /// The last sequence number the takeover replayed.
    pub replayed_through: Seq,
    snapshotter: Snapshotter,
}

impl std::fmt::Debug for OwnedPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedPartition")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

impl OwnedPartition {
    /// Whether the snapshotter still runs.
    pub fn snapshots_healthy(&self) -> bool {
        self.snapshotter.healthy()
    }

    /// The last snapshot written, if any.
    pub fn last_snapshot(&self) -> Option<crate::journal::SnapshotReport> {
        self.snapshotter.last()
    }

    /// Stops serving: the snapshotter (after a last snapshot, if it can),
    /// the engine, then the journal writer. Blocking: call it from a
    /// blocking thread.
    pub fn stop(mut self) {
        self.snapshotter.stop();
        self.engine.shutdown();
        self.journal.close();
    }
}

/// Takes `partition` over (see the module doc). Blocking: it runs the
/// recovery on the calling thread and the servers' calls on `runtime`;
/// call it from a blocking thread.
///
/// # Errors
/// [`TakeoverError`]; nothing is left running on error.
pub fn take_over(takeover: Takeover, runtime: &Handle) -> Result<OwnedPartition, TakeoverError> {
    let Takeover {
        context,
        spec,
        snapshots,
        partition,
        term,
        engine,
        policy,
        clock,
        stores,
    } = takeover;
    let history = JetStreamHistory::new(context.clone(), spec.clone(), partition, runtime.clone());
    let store = ObjectSnapshots::new(snapshots, partition, runtime.clone());
    let recovered = crate::journal::recovery::recover_from(&history, &store)
        .map_err(|source| TakeoverError::Recovery { partition, source })?;
    let resume = runtime
        .block_on(journal::resume_point(&context, &spec, partition))
        .map_err(|source| TakeoverError::Journal { partition, source })?;
    if resume.last_seq != recovered.last_seq {
        return Err(TakeoverError::Moved {
            partition,
            read: recovered.last_seq,
            now: resume.last_seq,
        });
    }
    let journal = JetStreamJournal::start(
        context.clone(),
        &spec,
        partition,
        resume,
        WriterTerm(term),
        runtime,
    )
    .map_err(|source| TakeoverError::Journal { partition, source })?;
    let journal = Arc::new(match stores {
        Some(streams) => {
            let stride = engine.order_ids.stride;
            let archive = JetStreamArchive::new(
                context.clone(),
                &streams.archive,
                partition,
                stride,
                runtime.clone(),
            );
            let idem = JetStreamIdemStore::new(context, &streams.idem, partition, runtime.clone());
            journal.keeping(Arc::new(archive), Arc::new(idem))
        }
        None => journal,
    });
    let barrier = journal
        .append(&Event::OwnerChanged {
            term,
            at_ms: clock.now_ms(),
        })
        .and_then(|seq| runtime.block_on(journal.watermark().wait(seq)));
    if let Err(source) = barrier {
        journal.close();
        return Err(TakeoverError::Barrier { partition, source });
    }
    let engine = match Engine::start(
        engine,
        Arc::clone(&journal) as Arc<dyn Journal>,
        clock,
        recovered.state,
    ) {
        Ok(engine) => engine,
        Err(source) => {
            journal.close();
            return Err(TakeoverError::Engine { partition, source });
        }
    };
    let snapshotter = Snapshotter::start_with(
        Arc::new(engine.clone()),
        Arc::clone(&journal) as Arc<dyn Journal>,
        Arc::new(history),
        Box::new(store),
        policy,
    );
    tracing::info!(
        partition,
        term,
        replayed_through = recovered.last_seq,
        snapshot = recovered.snapshot_seq,
        "took the partition over"
    );
    Ok(OwnedPartition {
        partition,
        engine,
        journal,
        replayed_through: recovered.last_seq,
        snapshotter,
    })
}
