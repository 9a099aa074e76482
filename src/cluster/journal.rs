//! `JetStreamJournal`: a partition's journal on a replicated JetStream
//! stream, behind the same [`Journal`] trait as the sled one.
//!
//! **Layout.** A partition's journal is one subject, `{prefix}.{partition}`,
//! of a stream holding `{prefix}.>`. Several partitions may share a stream
//! (one Raft group for all of them instead of one each), so nothing here
//! ever relies on the stream's last sequence: only on the subject's. A
//! message is a **block**: consecutive records encoded exactly as the sled
//! journal stores them ([`codec::encode`] concatenated, read back with
//! [`codec::block_records`]), with headers naming its first and last
//! sequence numbers and its writer.
//!
//! **Appending.** Like [`SledJournal`](crate::journal::SledJournal):
//! `append` numbers and encodes under one lock and hands the record to the
//! writer through a bounded queue (full: [`JournalError::Full`]), never
//! waiting. One writer task per partition drains what waits, packs it into
//! blocks no larger than the server's `max_payload` allows, and publishes
//! them one at a time (order matters: never two in flight), each with
//! `Nats-Expected-Last-Subject-Sequence` set to the subject's last stream
//! sequence as this writer knows it. The ack's sequence becomes that known
//! last, and the [`Watermark`] moves to the block's last record.
//!
//! **Fencing.** The compare-and-set is what makes a partition's journal
//! single-writer: a node that lost its lease and still appends finds the
//! subject moved (JetStream error 10071, `wrong last sequence`) and stops
//! for good: its waiters fail, later appends are refused, and
//! [`JetStreamJournal::is_fenced`] tells its owner to step down. Nothing a
//! fenced writer did not get an ack for is ever acknowledged.
//!
//! **Ambiguous acks.** A publish whose ack does not come (timeout, lost
//! connection, leader election) may or may not have landed. The writer never
//! appends blindly after one: it reads the subject's last message from the
//! stream leader. Our block (same writer id and first sequence number in its
//! headers): it landed. The last we expected: it did not, and the same
//! block goes again with the same `Nats-Msg-Id` (so if it did land after
//! all, the server's duplicate window drops the copy) and the same expected
//! sequence. Someone else's block: fenced (if ours is the one right after
//! the expected one, it landed first and is acknowledged, and the next
//! block meets the fence). The server checks the expected sequence before
//! the `Nats-Msg-Id` (2.15.1: a republish of a block that landed gets
//! 10071, not a duplicate ack), which is why a `wrong last sequence` goes
//! through the same check instead of fencing at once. This goes on for at most
//! [`APPEND_RETRY_MS_MAX`]; past that the writer fails like a broken disk
//! (`JournalError::Stopped`), never acknowledging what it could not confirm.
//!
//! The writer task is in `journal/writer.rs`; reading back (recovery,
//! resume points) and purging below a snapshot are in `journal/read.rs`.
//!
//! Every call to a server runs under one of the timeouts below.

mod read;
mod writer;

pub use read::{ReadBack, StoredBlock, blocks_after, purge_through, resume_point};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, Context};
use tokio::sync::mpsc::error::TrySendError;

use crate::domain::Event;
use crate::journal::codec::{self, CodecError};
use crate::journal::{Archive, IdemStore, Journal, JournalError, Seq, Watermark};

/// Most records waiting for the writer: as for the sled journal
/// (`writer::QUEUE_EVENTS_MAX`), about half a second of work at the
/// group-commit rate; beyond that shedding answers faster than queueing.
pub const QUEUE_EVENTS_MAX: usize = 65_536;

/// Most records the writer takes from the queue before publishing them, so
/// one batch's blocks are published (and its waiters released) in bounded
/// time.
pub const BATCH_EVENTS_MAX: usize = 8_192;

/// Our own cap on a block, below the server's `max_payload` (1 MiB by
/// default): a record of [`codec::RECORD_BYTES_MAX`] fits twice, and a
/// block stays small enough that the reads which fetch single blocks (the
/// search for where to start, the ambiguous-ack check) stay cheap.
pub const BLOCK_BYTES_MAX: usize = 256 << 10;

/// Room left for the headers inside `max_payload` (the server counts
/// headers and payload together). Our headers take under 300 bytes: the
/// four `Fc-*` and two `Nats-*` names, and values of at most 20 digits or
/// a 16-digit hex writer id; see [`block_headers`].
pub const HEADER_ROOM_BYTES: usize = 1_024;

/// The largest encoded record: [`codec::RECORD_BYTES_MAX`] of payload and
/// the codec's frame header (9 bytes), rounded up. A block always holds at
/// least one record, so the block size must take this.
pub const RECORD_FRAME_BYTES_MAX: usize = codec::RECORD_BYTES_MAX + 64;

const _: () = assert!(
    RECORD_FRAME_BYTES_MAX <= BLOCK_BYTES_MAX,
    "a block can hold the largest record"
);

/// How long one publish may wait for its ack. A healthy R3 ack is a
/// quorum's fsync (`sync_interval: always`), milliseconds; past this, the
/// leader is stalled or gone and the ambiguous-ack check takes over (well
/// inside [`APPEND_RETRY_MS_MAX`], so several checks fit).
pub const PUBLISH_ACK_MS: u64 = 2_000;

/// How long one JetStream API call (stream create/info, message get,
/// purge, consumer create) may take. Answered by the stream leader in
/// milliseconds; 5 s covers a slow server without letting a dead one hold
/// the caller.
pub const API_CALL_MS: u64 = 5_000;

/// How long the writer keeps trying to land one block across timeouts and
/// failovers before it fails like a broken disk. A SIGKILLed stream leader
/// is replaced after the Raft election timeout (NATS: 4 to 9 s after the
/// last heartbeat), and the client reconnects meanwhile; 20 s covers that
/// with room, and stays far inside [`DUPLICATE_WINDOW`].
pub const APPEND_RETRY_MS_MAX: u64 = 20_000;

/// Pause between two checks of an ambiguous publish (doubled up to
/// [`RETRY_PAUSE_MS_MAX`]): a leader election takes seconds, so hammering
/// the servers meanwhile only adds load.
const RETRY_PAUSE_MS_MIN: u64 = 50;
const RETRY_PAUSE_MS_MAX: u64 = 1_000;

/// The stream's duplicate window: how long the server remembers a
/// `Nats-Msg-Id`. A block is republished with the same id only within
/// [`APPEND_RETRY_MS_MAX`] of its first attempt, so a republish of a block
/// that did land is always recognised; the server keeps one entry per
/// message (a block, not an event) in the window, so two minutes (also the
/// server's default) costs little.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

const _: () = assert!(
    APPEND_RETRY_MS_MAX * 4 <= DUPLICATE_WINDOW.as_secs() * 1_000,
    "a republish always falls inside the duplicate window"
);
const _: () = assert!(
    PUBLISH_ACK_MS * 4 <= APPEND_RETRY_MS_MAX,
    "several attempts fit in the retry window"
);

/// Header: the block's first flashcore sequence number.
pub const HEADER_FIRST_SEQ: &str = "Fc-First-Seq";
/// Header: the block's last flashcore sequence number (reads check
/// contiguity and find blocks from headers alone).
pub const HEADER_LAST_SEQ: &str = "Fc-Last-Seq";
/// Header: the writer's term (the partition lease's revision, say).
pub const HEADER_TERM: &str = "Fc-Term";
/// Header: the writer instance's random id, so that even two writers
/// started with the same term never take each other's block for their own.
pub const HEADER_WRITER: &str = "Fc-Writer";

/// The stream holding the journals, and how it is replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStream {
    /// The stream's name.
    pub name: String,
    /// The subjects' prefix: partition `p` is `{subject_prefix}.{p}`.
    pub subject_prefix: String,
    /// Replicas: 3 in production and tests; 1 only for a one-server
    /// development setup (an R1 stream loses acknowledged records with its
    /// server's disk).
    pub replicas: usize,
}

impl JournalStream {
    /// The default layout: stream `FC_JOURNAL`, subjects `fc.journal.{p}`.
    pub fn new(replicas: usize) -> JournalStream {
        JournalStream {
            name: "FC_JOURNAL".into(),
            subject_prefix: "fc.journal".into(),
            replicas,
        }
    }

    /// The subject of a partition's journal.
    pub fn subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subject_prefix)
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: StorageType::File,
            num_replicas: self.replicas,
            // Direct gets let any replica answer reads of a subject's last
            // message (for tools and monitoring); the writer's own checks
            // use the leader, see `read.rs`.
            allow_direct: true,
            // No limit of any kind: the stream never drops a record by
            // itself, and `Old` is moot without limits (`New` with a limit
            // would refuse appends rather than drop, but there is none).
            // Only `purge_through`, below a snapshot, removes blocks.
            max_bytes: -1,
            max_messages: -1,
            max_messages_per_subject: -1,
            max_age: Duration::ZERO,
            discard: DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            // Blocks are removed by purge only, never one by one.
            deny_delete: true,
            ..Default::default()
        }
    }
}

/// Why a cluster journal operation failed. Each kind has its own
/// consequence: `Fenced` means step down; `Timeout` and `Nats` mean the
/// servers are unreachable (retry later); `Gap`, `Corrupt` and `Behind`
/// mean the stored journal is not what it must be (stop loudly).
#[derive(Debug, thiserror::Error)]
pub enum ClusterJournalError {
    /// Another writer appended to the partition's subject: this one lost
    /// it.
    #[error("fenced: {subject} moved past stream sequence {expected} (found {found:?})")]
    Fenced {
        /// The partition's subject.
        subject: String,
        /// The subject's last stream sequence this writer expected.
        expected: u64,
        /// The subject's last stream sequence found, if known.
        found: Option<u64>,
    },
    /// A server call did not finish in time.
    #[error("timed out after {after_ms} ms: {what}")]
    Timeout {
        /// What was under way.
        what: &'static str,
        /// The limit that expired.
        after_ms: u64,
    },
    /// A block does not start where the previous one ended.
    #[error(
        "gap in the journal: expected a block holding {expected}, found one starting at {found}"
    )]
    Gap {
        /// The sequence number the next block had to hold.
        expected: Seq,
        /// The first sequence number of the block found.
        found: Seq,
    },
    /// A stored block's headers are missing or inconsistent.
    #[error("bad block at stream sequence {subject_seq}: {why}")]
    BadBlock {
        /// Where it is stored.
        subject_seq: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A stored record does not decode.
    #[error("record {seq} at stream sequence {subject_seq} does not decode")]
    Corrupt {
        /// Where its block is stored.
        subject_seq: u64,
        /// The record's sequence number.
        seq: Seq,
        /// Why.
        #[source]
        source: CodecError,
    },
    /// The journal ends before the point a read was asked to start after
    /// (a snapshot claims more than the journal holds).
    #[error("the journal ends at {last_seq}, before {after}")]
    Behind {
        /// Where the read was to start after.
        after: Seq,
        /// The journal's last sequence number.
        last_seq: Seq,
    },
    /// The stream exists with a configuration this journal cannot use.
    #[error("stream {stream} does not fit: {why}")]
    StreamMismatch {
        /// The stream's name.
        stream: String,
        /// What differs.
        why: String,
    },
    /// The server's `max_payload` cannot hold a block with one record.
    #[error("the server's max_payload ({max_payload} bytes) cannot hold a record and its headers")]
    PayloadTooSmall {
        /// The server's limit.
        max_payload: usize,
    },
    /// A NATS or JetStream call failed.
    #[error("{what}")]
    Nats {
        /// What was under way.
        what: &'static str,
        /// The client's error.
        #[source]
        source: async_nats::Error,
    },
}

impl ClusterJournalError {
    fn nats(what: &'static str, source: impl Into<async_nats::Error>) -> ClusterJournalError {
        ClusterJournalError::Nats {
            what,
            source: source.into(),
        }
    }
}

/// Runs `future` under `limit_ms`, naming it in the timeout error.
async fn timed<T, E>(
    what: &'static str,
    limit_ms: u64,
    future: impl Future<Output = Result<T, E>>,
) -> Result<T, ClusterJournalError>
where
    E: Into<async_nats::Error>,
{
    match tokio::time::timeout(Duration::from_millis(limit_ms), future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ClusterJournalError::nats(what, e)),
        Err(_) => Err(ClusterJournalError::Timeout {
            what,
            after_ms: limit_ms,
        }),
    }
}

/// Creates the journal stream, or binds to it if it exists and fits.
///
/// # Errors
/// `StreamMismatch` when an existing stream has other subjects, storage,
/// replicas, limits or no direct gets; `Timeout` or `Nats` when the servers
/// do not answer.
pub async fn ensure_stream(
    context: &Context,
    spec: &JournalStream,
) -> Result<jetstream::stream::Stream, ClusterJournalError> {
    let wanted = spec.config();
    let mut stream = timed(
        "creating the journal stream",
        API_CALL_MS,
        context.get_or_create_stream(wanted.clone()),
    )
    .await?;
    let info = timed("reading the journal stream", API_CALL_MS, stream.info())
        .await?
        .config
        .clone();
    let mismatch = |why: String| ClusterJournalError::StreamMismatch {
        stream: spec.name.clone(),
        why,
    };
    if info.subjects != wanted.subjects {
        return Err(mismatch(format!("subjects {:?}", info.subjects)));
    }
    if info.storage != StorageType::File || info.num_replicas != spec.replicas {
        return Err(mismatch(format!(
            "storage {:?} with {} replicas",
            info.storage, info.num_replicas
        )));
    }
    if !info.allow_direct {
        return Err(mismatch("direct gets are off".into()));
    }
    let limited = info.max_bytes > 0
        || info.max_messages > 0
        || info.max_messages_per_subject > 0
        || !info.max_age.is_zero();
    if limited {
        return Err(mismatch(
            "it has limits that would drop acknowledged records".into(),
        ));
    }
    if info.duplicate_window.as_millis() < u128::from(APPEND_RETRY_MS_MAX) * 4 {
        return Err(mismatch(format!(
            "duplicate window {:?} is shorter than a republish can come",
            info.duplicate_window
        )));
    }
    Ok(stream)
}

/// Where a journal continues: its last sequence number and the stream
/// sequence of the subject's last message (0 and 0 for an empty journal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResumePoint {
    /// The last flashcore sequence number stored.
    pub last_seq: Seq,
    /// The stream sequence of the block holding it (0: none).
    pub last_subject_seq: u64,
}

/// Who writes: the term (the lease revision that made this node the
/// partition's owner) goes into every block's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterTerm(pub u64);

/// Why a journal stopped taking events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopKind {
    /// Another writer took the partition: step down.
    Fenced,
    /// The servers could not confirm a block in time, or refused it.
    Unavailable,
}

struct Item {
    seq: Seq,
    bytes: Vec<u8>,
}

struct AppendSide {
    /// Invariant: the last sequence number handed out; every record up to it
    /// was queued in order.
    last_seq: Seq,
    tx: Option<tokio::sync::mpsc::Sender<Item>>,
}

struct Shared {
    watermark: Watermark,
    failed: AtomicBool,
    failure: Mutex<Option<(StopKind, String)>>,
    /// The last durable block's last sequence number and stream sequence,
    /// set together (a pair of atomics could be read half-updated).
    ///
    /// Invariant: `point.last_seq == watermark.durable()` once the writer
    /// has advanced the watermark, and never below it.
    point: Mutex<ResumePoint>,
    /// Publishes whose outcome was not confirmed by an ack (timeouts, lost
    /// connections, errors) and went through the check of the subject's
    /// last message.
    unconfirmed: AtomicU64,
}

impl Shared {
    fn fail(&self, from: Seq, kind: StopKind, why: String) {
        tracing::error!(from_seq = from, ?kind, error = %why, "cluster journal stopped; refusing changes");
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert((kind, why));
        self.failed.store(true, Ordering::SeqCst);
        self.watermark.fail_from(from);
    }
}

/// A partition's journal on JetStream.
pub struct JetStreamJournal {
    subject: String,
    append: Mutex<AppendSide>,
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The partition's archive and idempotency store, when it keeps them
    /// on the servers (`archive.rs`, `idem_store.rs`); without them the
    /// engine keeps finished orders and every record in memory.
    archive: Option<Arc<dyn Archive>>,
    idem_store: Option<Arc<dyn IdemStore>>,
}

impl std::fmt::Debug for JetStreamJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamJournal")
            .field("subject", &self.subject)
            .finish()
    }
}

impl JetStreamJournal {
    /// Starts the journal of `partition` after `after` (read with
    /// [`resume_point`] or [`blocks_after`]), its writer task spawned on
    /// `runtime`. `term` goes into every block's headers.
    ///
    /// # Errors
    /// `PayloadTooSmall` when the server's `max_payload` cannot hold a
    /// record with its headers.
    pub fn start(
        context: Context,
        spec: &JournalStream,
        partition: u32,
        after: ResumePoint,
        term: WriterTerm,
        runtime: &tokio::runtime::Handle,
    ) -> Result<JetStreamJournal, ClusterJournalError> {
        let max_payload = context.client().server_info().max_payload;
        let block_bytes_max = max_payload
            .checked_sub(HEADER_ROOM_BYTES)
            .filter(|&room| room >= RECORD_FRAME_BYTES_MAX)
            .ok_or(ClusterJournalError::PayloadTooSmall { max_payload })?
            .min(BLOCK_BYTES_MAX);
        let subject = spec.subject(partition);
        let shared = Arc::new(Shared {
            watermark: Watermark::new(after.last_seq),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            point: Mutex::new(after),
            unconfirmed: AtomicU64::new(0),
        });
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_EVENTS_MAX);
        let writer = writer::Writer {
            context,
            subject: subject.clone(),
            stream: spec.name.clone(),
            term,
            writer_id: format!("{:016x}", rand::random::<u64>()),
            block_bytes_max,
            last_subject_seq: after.last_subject_seq,
            shared: Arc::clone(&shared),
        };
        let task = runtime.spawn(writer.run(rx));
        Ok(JetStreamJournal {
            subject,
            append: Mutex::new(AppendSide {
                last_seq: after.last_seq,
                tx: Some(tx),
            }),
            shared,
            task: Mutex::new(Some(task)),
            archive: None,
            idem_store: None,
        })
    }

    /// The journal with the partition's archive and idempotency store
    /// beside it (the engine reads them through [`Journal::archive`] and
    /// [`Journal::idem_store`]).
    #[must_use]
    pub fn keeping(
        mut self,
        archive: Arc<dyn Archive>,
        idem_store: Arc<dyn IdemStore>,
    ) -> JetStreamJournal {
        self.archive = Some(archive);
        self.idem_store = Some(idem_store);
        self
    }

    /// Whether another writer took the partition (the owner must step
    /// down).
    pub fn is_fenced(&self) -> bool {
        self.stop_kind() == Some(StopKind::Fenced)
    }

    /// Why the journal stopped, if it did.
    pub fn stop_kind(&self) -> Option<StopKind> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(kind, _)| *kind)
    }

    /// The journal's resume point as this writer knows it: the last
    /// durable sequence number and its block's stream sequence.
    pub fn durable_point(&self) -> ResumePoint {
        *self.shared.point.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many publishes were not confirmed by their ack and had to be
    /// checked against the subject (for metrics and tests).
    pub fn unconfirmed_publishes(&self) -> u64 {
        self.shared.unconfirmed.load(Ordering::Relaxed)
    }

    /// Stops taking events; the writer publishes what it already took and
    /// ends. Await [`JetStreamJournal::closed`] to wait for it.
    pub fn close(&self) {
        let tx = self
            .append
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tx
            .take();
        drop(tx);
    }

    /// Closes the journal and waits until the writer has ended.
    pub async fn closed(&self) {
        self.close();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task
            && task.await.is_err()
        {
            tracing::error!(subject = %self.subject, "the cluster journal writer panicked");
        }
    }
}

impl Drop for JetStreamJournal {
    fn drop(&mut self) {
        // The writer ends by itself once the queue is closed and drained.
        self.close();
    }
}

impl Journal for JetStreamJournal {
    fn append(&self, event: &Event) -> Result<Seq, JournalError> {
        let mut side = self.append.lock().unwrap_or_else(|p| p.into_inner());
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(JournalError::stopped(
                self.failure().unwrap_or(JournalError::WriterStopped),
            ));
        }
        let seq = side
            .last_seq
            .checked_add(1)
            .ok_or(JournalError::SeqExhausted)?;
        let bytes = codec::encode(seq, event)
            .map_err(|e| JournalError::codec("cannot encode an event", e))?;
        let tx = side.tx.as_ref().ok_or(JournalError::Closed)?;
        match tx.try_send(Item { seq, bytes }) {
            Ok(()) => {
                side.last_seq = seq;
                Ok(seq)
            }
            Err(TrySendError::Full(_)) => Err(JournalError::Full),
            Err(TrySendError::Closed(_)) => Err(JournalError::WriterStopped),
        }
    }

    fn watermark(&self) -> &Watermark {
        &self.shared.watermark
    }

    fn last_seq(&self) -> Seq {
        self.append
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_seq
    }

    fn archive(&self) -> Option<Arc<dyn Archive>> {
        self.archive.clone()
    }

    fn idem_store(&self) -> Option<Arc<dyn IdemStore>> {
        self.idem_store.clone()
    }

    fn failure(&self) -> Option<JournalError> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, why)| JournalError::remote("the cluster journal", why.clone()))
    }
}
