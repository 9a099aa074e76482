//! Snapshots: the state written down at a point of the journal, so that a
//! restart loads it and replays only the tail, and the journal below it can
//! go.
//!
//! # Design: parts at their own sequence numbers, no second copy
//!
//! Live, the state is split among actors: each SKU actor owns its stock,
//! each order shard its users' orders and carts; the engine keeps the
//! promotions and the open reservations under locks of their own, and a
//! shared idempotency book. A snapshot asks each of them for a copy of its
//! part ([`SnapshotSource::capture`]); the snapshot thread encodes and
//! writes them, so an actor pauses only for the clone of its own part (its
//! mailbox waits that long; nothing else does), never for the encoding or
//! the disk. Earlier the snapshotter kept a second copy of the whole state
//! and replayed every durable event into it: double the memory and about
//! 5% of the CPU, for ever. Copy-on-write maps (`im`) would make the clone
//! free but every live update slower and add a dependency; a barrier event
//! through the journal would still meet the actors at different moments.
//! Per-part marks are the simplest design that is exact:
//!
//! - A part is copied inside its owner's handler, which also reads the
//!   journal's last sequence number `L` there. Every event the owner
//!   journals itself was appended before that read, and every event another
//!   actor journaled for it (a shard's payment for a SKU, a SKU's one-step
//!   order for a shard) is applied after its append: so the copy holds no
//!   event above `L`, and every event up to `L` except those still on their
//!   way in its mailbox. Those are its *holes*: the owner notes every event
//!   at or below `L` it applies after the copy, and the engine collects the
//!   list once every such message has arrived (a flush round to every actor,
//!   then a finish round, through the same FIFO mailboxes). Its [`Mark`] is
//!   `L` and the holes.
//! - The promotions and the open reservations change under a lock held
//!   across the journal append, so their copy (taken under the lock) holds
//!   exactly the events up to the `L` read there.
//! - The idempotency book is copied last: with the records that moved to
//!   disk (`idem_store.rs`, durable before they left memory, and not part of
//!   the snapshot) it holds every record of every event a part holds (and
//!   maybe more, which replay records again as it was: a record is kept,
//!   never replaced, within its TTL). Snapshots hold the compact records
//!   (body format 3); formats 1 and 2 held whole answers and are converted
//!   on load.
//!
//! Recovery replays from the lowest mark (or hole) on, applying each event
//! only to the parts whose mark does not cover it (`State::apply_parts`),
//! and above the highest mark to everything, as before; then it checks the
//! whole state's invariants as it always did. A snapshot is written only
//! once its highest mark is durable (a snapshot must never hold an event a
//! crash could take back), atomically and durably (`write_file_durably`).
//!
//! At each capture the journal writer moves to a new epoch (`epochs.rs`).
//! After writing snapshot N, the epochs wholly below snapshot N-1's replay
//! start are dropped (whole sled trees, no block deletes), so a damaged
//! newest snapshot can always fall back to the one before; older snapshot
//! files are deleted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::domain::DomainError;
use crate::domain::book::{OrderBook, shard_of};
use crate::domain::idem::{HashedRecord, IdemBook, StoredIdemRecord, StoredIdemRecordV1};
use crate::domain::promo::Promotions;
use crate::domain::sku::{SkuState, SkuStateV1};
use crate::domain::state::{OpenReservation, Part};
use crate::domain::{OrderId, SkuId, State};
use crate::files::{Existing, create_dir_durably, write_file_durably_with};
use crate::journal::epochs::Dropped;
use crate::journal::history::HistoryError;
use crate::journal::{History, Journal, JournalError, Seq, SledJournal, codec};
use crate::steps::{self, Step};

/// Take a snapshot after this many new durable events...
pub const SNAPSHOT_EVERY_EVENTS: u64 = 250_000;
/// ...or after this long, if anything changed.
pub const SNAPSHOT_EVERY_MS: u64 = 60_000;
/// How often the snapshotter looks whether a snapshot is due.
const SNAPSHOT_POLL_MS: u64 = 250;
/// Journal blocks removed per sled batch when recovery cuts a tail (at
/// start-up, before any request).
pub(crate) const TRUNCATE_BATCH: usize = 10_000;
/// Snapshot files kept: the newest, and the one before as a fallback.
pub const SNAPSHOTS_KEPT: usize = 2;
/// How long a snapshot waits for its highest mark to become durable. In
/// strict mode that is one flush; a journal that cannot get there in this
/// long is failing, and the snapshot is given up (the next one tries again).
const DURABLE_WAIT_MS: u64 = 30_000;

/// How far a part of a snapshot reaches: every event touching the part with
/// a sequence number up to `seq` is in it, except the `holes`; none above.
///
/// Invariant: `holes` is sorted, without repeats, and every hole `<= seq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The journal's last sequence number when the part was copied.
    pub seq: Seq,
    /// Events at or below `seq` that were on their way to the part.
    pub holes: Vec<Seq>,
}

impl Mark {
    /// A mark at `seq`, with `holes` (sorted and checked here).
    pub fn new(seq: Seq, mut holes: Vec<Seq>) -> Mark {
        holes.sort_unstable();
        holes.dedup();
        holes.retain(|hole| *hole <= seq);
        Mark { seq, holes }
    }

    /// Whether the part holds the event at `seq` (if it touches the part).
    pub fn covers(&self, seq: Seq) -> bool {
        seq <= self.seq && self.holes.binary_search(&seq).is_err()
    }

    /// The last sequence number below which the part holds everything.
    fn start(&self) -> Seq {
        self.holes
            .first()
            .map_or(self.seq, |hole| hole.saturating_sub(1).min(self.seq))
    }
}

/// Every part of the live state, each with how far it reaches: what a
/// [`SnapshotSource`] hands the snapshotter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Capture {
    /// The journal's last sequence number when the SKUs were listed: a SKU
    /// created later is missing, and its creation comes after this.
    pub catalog_seq: Seq,
    /// Every SKU listed, with its mark.
    pub skus: Vec<(SkuState, Mark)>,
    /// Every order shard's book, by shard index (users are placed by
    /// [`shard_of`] over this many shards).
    pub shards: Vec<(OrderBook, Mark)>,
    /// The promotions...
    pub promotions: Promotions,
    /// ...as of this sequence number.
    pub promotions_seq: Seq,
    /// The open reservations...
    pub open_reservations: BTreeMap<OrderId, OpenReservation>,
    /// ...as of this sequence number.
    pub reservations_seq: Seq,
    /// The idempotency records in memory (copied after every other part;
    /// those moved to disk are in the journal's database already).
    pub idem: Vec<HashedRecord>,
    /// The next id to hand out (read after every other part).
    pub next_id: u64,
}

impl Capture {
    /// A whole state at `seq` as one capture (one shard, every mark at
    /// `seq`): for tools and benches that hold a whole state, not actors.
    pub fn whole(state: &State, seq: Seq) -> Capture {
        let mark = Mark::new(seq, Vec::new());
        Capture {
            catalog_seq: seq,
            skus: state
                .skus
                .values()
                .map(|sku| (sku.clone(), mark.clone()))
                .collect(),
            shards: vec![(state.orders.clone(), mark.clone())],
            promotions: state.promotions.clone(),
            promotions_seq: seq,
            open_reservations: state.open_reservations.clone(),
            reservations_seq: seq,
            idem: state.idem.to_snapshot(),
            next_id: state.next_id,
        }
    }

    /// The highest sequence number any part holds: the snapshot's name.
    pub fn top(&self) -> Seq {
        self.marks()
            .map(|m| m.seq)
            .chain([self.catalog_seq, self.promotions_seq, self.reservations_seq])
            .max()
            .unwrap_or(0)
    }

    /// The sequence number after which replay starts: every part holds
    /// every event up to it.
    pub fn start(&self) -> Seq {
        self.marks()
            .map(Mark::start)
            .chain([self.catalog_seq, self.promotions_seq, self.reservations_seq])
            .min()
            .unwrap_or(0)
    }

    fn marks(&self) -> impl Iterator<Item = &Mark> {
        self.skus
            .iter()
            .map(|(_, m)| m)
            .chain(self.shards.iter().map(|(_, m)| m))
    }
}

/// Why the live engine did not hand over its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptureError {
    /// An actor stopped before it answered.
    #[error("an actor stopped during the snapshot")]
    ActorStopped,
    /// A SKU's part was neither copied under its lock nor by its actor.
    #[error("a SKU could not be copied")]
    PartMissing,
    /// This engine only serves reads of the durable state.
    #[error("a reader of the durable state takes no snapshots")]
    ReadOnly,
    /// The engine died (an actor panicked); the reason as its health has it.
    #[error("the engine is dead: {0}")]
    EngineDead(String),
}

/// Why a snapshot could not be listed, read, decoded, written or removed,
/// or a new one taken. I/O keeps its `io::Error` (a full disk is
/// `StorageFull`); damage keeps the codec's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SnapshotError {
    /// A snapshot file or their directory could not be used.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done ("cannot read").
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        source: Arc<std::io::Error>,
    },
    /// A snapshot's bytes do not decode (damage, or a format this build
    /// does not know).
    #[error("it does not decode: {0}")]
    Codec(#[from] codec::CodecError),
    /// A snapshot's idempotency records do not load.
    #[error("its idempotency records do not load: {0}")]
    Records(#[source] DomainError),
    /// A snapshot decodes, but does not agree with its name or itself.
    #[error("{0}")]
    Inconsistent(String),
    /// The live engine did not hand over its parts.
    #[error("capturing the state: {0}")]
    Capture(#[from] CaptureError),
    /// The journal failed before the captured state was durable.
    #[error("the journal failed before the snapshot was durable: {0}")]
    JournalFailed(#[source] JournalError),
    /// The captured state did not become durable in time.
    #[error("sequence {seq} did not become durable in {waited_ms} ms")]
    NotDurable {
        /// The capture's highest sequence number.
        seq: Seq,
        /// How long the snapshotter waited.
        waited_ms: u64,
    },
    /// The journal below the previous snapshot could not be dropped.
    #[error("truncating the journal: {0}")]
    Truncate(#[source] HistoryError),
    /// A store on other servers (the cluster's object store) failed or did
    /// not answer.
    #[error("{what}: {source}")]
    Remote {
        /// What was being done.
        what: &'static str,
        /// The store's error.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
}

impl SnapshotError {
    /// A [`SnapshotError::Io`].
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> SnapshotError {
        SnapshotError::Io {
            what,
            path: path.to_path_buf(),
            source: Arc::new(source),
        }
    }

    /// A [`SnapshotError::Remote`].
    pub fn remote(
        what: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> SnapshotError {
        SnapshotError::Remote {
            what,
            source: Arc::from(source.into()),
        }
    }
}

/// Where a snapshot's parts come from: the live engine.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Copies every part of the live state with its mark. Blocking: called
    /// on the snapshot thread, never on an actor or async thread.
    ///
    /// # Errors
    /// Why it could not (the engine stopped, an actor died).
    fn capture(&self) -> Result<Capture, CaptureError>;
}

/// Where snapshot files live. A later multi-machine version keeps them
/// elsewhere; recovery and the snapshotter only use these four calls.
pub trait SnapshotStore: Send + Sync + 'static {
    /// The snapshots kept, by sequence number, newest first.
    ///
    /// # Errors
    /// `Io` or `Remote` when they cannot be listed.
    fn list(&self) -> Result<Vec<Seq>, SnapshotError>;
    /// A snapshot's bytes.
    ///
    /// # Errors
    /// `Io` or `Remote` when they cannot be read.
    fn read(&self, seq: Seq) -> Result<Vec<u8>, SnapshotError>;
    /// Writes a snapshot atomically and durably, its bytes produced by
    /// `fill` as they are written (a snapshot is never whole in memory).
    ///
    /// # Errors
    /// `Io` or `Remote` on any failure, `fill`'s included (the snapshots
    /// before it stay).
    fn write_with(
        &self,
        seq: Seq,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), SnapshotError>;

    /// Writes a snapshot's bytes atomically and durably.
    ///
    /// # Errors
    /// As [`SnapshotStore::write_with`].
    fn write(&self, seq: Seq, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.write_with(seq, &mut |out| out.write_all(bytes))
    }
    /// Deletes a snapshot.
    ///
    /// # Errors
    /// `Io` or `Remote` when it cannot be removed.
    fn remove(&self, seq: Seq) -> Result<(), SnapshotError>;
}

/// Snapshots as files `snapshot-<seq>.bin` in a directory.
#[derive(Debug, Clone)]
pub struct DirStore {
    dir: PathBuf,
}

impl DirStore {
    /// The store in `dir` (created on the first write).
    pub fn new(dir: &Path) -> DirStore {
        DirStore {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, seq: Seq) -> PathBuf {
        self.dir.join(format!("snapshot-{seq:020}.bin"))
    }
}

impl SnapshotStore for DirStore {
    fn list(&self) -> Result<Vec<Seq>, SnapshotError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SnapshotError::io("cannot read", &self.dir, e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| SnapshotError::io("cannot list", &self.dir, e))?;
            let name = entry.file_name();
            if let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_prefix("snapshot-"))
                .and_then(|n| n.strip_suffix(".bin"))
                .and_then(|n| n.parse::<Seq>().ok())
            {
                found.push(seq);
            }
        }
        found.sort_unstable_by_key(|seq| std::cmp::Reverse(*seq));
        Ok(found)
    }

    fn read(&self, seq: Seq) -> Result<Vec<u8>, SnapshotError> {
        let path = self.path(seq);
        std::fs::read(&path).map_err(|e| SnapshotError::io("cannot read", &path, e))
    }

    fn write_with(
        &self,
        seq: Seq,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), SnapshotError> {
        // The directory's own entry (in the data dir) must be durable before
        // the journal below the snapshot is dropped.
        create_dir_durably(&self.dir)
            .map_err(|e| SnapshotError::io("cannot create the snapshot dir", &self.dir, e))?;
        let path = self.path(seq);
        write_file_durably_with(&path, None, Existing::Replace, fill)
            .map_err(|e| SnapshotError::io("cannot write a snapshot", &path, e))
    }

    fn remove(&self, seq: Seq) -> Result<(), SnapshotError> {
        let path = self.path(seq);
        std::fs::remove_file(&path).map_err(|e| SnapshotError::io("cannot remove", &path, e))
    }
}

/// Format 1: one whole state at one sequence number, owned (for reading).
#[derive(Deserialize)]
struct WholeBody {
    seq: Seq,
    skus: BTreeMap<SkuId, SkuState>,
    orders: OrderBook,
    promotions: Promotions,
    /// v1 snapshots may hold refusals: loading drops them.
    idem: Vec<StoredIdemRecord>,
    open_reservations: BTreeMap<OrderId, OpenReservation>,
    next_id: u64,
}

/// [`WholeBody`] as record format 1 wrote it (before sale windows): its
/// SKUs and the SKUs in its idempotency records have no window. Read only,
/// converted on load.
#[derive(Deserialize)]
struct WholeBodyV1 {
    seq: Seq,
    skus: BTreeMap<SkuId, SkuStateV1>,
    orders: OrderBook,
    promotions: Promotions,
    idem: Vec<StoredIdemRecordV1>,
    open_reservations: BTreeMap<OrderId, OpenReservation>,
    next_id: u64,
}

impl From<WholeBodyV1> for WholeBody {
    fn from(v: WholeBodyV1) -> WholeBody {
        WholeBody {
            seq: v.seq,
            skus: v
                .skus
                .into_iter()
                .map(|(id, sku)| (id, sku.into()))
                .collect(),
            orders: v.orders,
            promotions: v.promotions,
            idem: v.idem.into_iter().map(StoredIdemRecord::from).collect(),
            open_reservations: v.open_reservations,
            next_id: v.next_id,
        }
    }
}

/// Format 3: the parts of a [`Capture`], with the snapshot's own numbers
/// first (checked against the file name and against the parts on load).
#[derive(Serialize, Deserialize)]
struct PartsBody {
    top: Seq,
    start: Seq,
    capture: Capture,
}

/// Format 2: [`PartsBody`] before the compact idempotency records (each
/// record held its user, key and whole answer). Read only, converted on
/// load (serialisable only for the test that writes one as format 2 did).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct PartsBodyV2 {
    top: Seq,
    start: Seq,
    capture: CaptureV2,
}

/// [`Capture`] as format 2 wrote it: the same fields, in the same order,
/// with the records of [`StoredIdemRecord`]'s shape.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct CaptureV2 {
    catalog_seq: Seq,
    skus: Vec<(SkuState, Mark)>,
    shards: Vec<(OrderBook, Mark)>,
    promotions: Promotions,
    promotions_seq: Seq,
    open_reservations: BTreeMap<OrderId, OpenReservation>,
    reservations_seq: Seq,
    idem: Vec<StoredIdemRecord>,
    next_id: u64,
}

impl CaptureV2 {
    /// The capture with compact records (and the stored records apart, to
    /// be converted by the caller).
    fn split(self) -> (Capture, Vec<StoredIdemRecord>) {
        let capture = Capture {
            catalog_seq: self.catalog_seq,
            skus: self.skus,
            shards: self.shards,
            promotions: self.promotions,
            promotions_seq: self.promotions_seq,
            open_reservations: self.open_reservations,
            reservations_seq: self.reservations_seq,
            idem: Vec::new(),
            next_id: self.next_id,
        };
        (capture, self.idem)
    }
}

/// Which parts of a loaded state hold which events: replay applies an event
/// after `start` only to the parts that do not hold it, and one after `top`
/// to every part.
#[derive(Debug, Clone, Default)]
pub(crate) struct Cut {
    /// Every part holds every event up to here.
    pub(crate) start: Seq,
    /// No part holds an event after here.
    pub(crate) top: Seq,
    skus: HashMap<SkuId, Mark>,
    shards: Vec<Mark>,
    reservations: Seq,
    promotions: Seq,
}

impl Cut {
    /// A state that holds exactly the events up to `seq`.
    pub(crate) fn whole(seq: Seq) -> Cut {
        Cut {
            start: seq,
            top: seq,
            ..Cut::default()
        }
    }

    /// Whether `part` holds the event at `seq` (between `start` and `top`).
    pub(crate) fn covers(&self, part: Part, seq: Seq) -> bool {
        match part {
            Part::Reservations => seq <= self.reservations,
            Part::Promotions => seq <= self.promotions,
            // A SKU missing from the snapshot was created after it.
            Part::Sku(id) => self.skus.get(&id).is_some_and(|m| m.covers(seq)),
            Part::Orders(user) => self
                .shards
                .get(shard_of(&user, self.shards.len()))
                .is_some_and(|m| m.covers(seq)),
        }
    }
}

/// Decodes a snapshot's bytes into a state and its cut.
fn decode(seq: Seq, bytes: &[u8]) -> Result<(State, Cut), SnapshotError> {
    match codec::snapshot_format(bytes) {
        Some(codec::SNAPSHOT_FORMAT_WHOLE) => {
            let body: WholeBody =
                match codec::decode_snapshot_versioned::<WholeBody, WholeBodyV1>(bytes)? {
                    codec::Versioned::Current(body) => body,
                    codec::Versioned::V1(old) => old.into(),
                };
            if body.seq != seq {
                return Err(SnapshotError::Inconsistent(format!(
                    "it names sequence {}",
                    body.seq
                )));
            }
            let state = State {
                skus: body.skus,
                orders: body.orders,
                promotions: body.promotions,
                idem: Arc::new(IdemBook::from_stored(body.idem).map_err(SnapshotError::Records)?),
                open_reservations: body.open_reservations,
                next_id: body.next_id,
            };
            Ok((state, Cut::whole(seq)))
        }
        Some(codec::SNAPSHOT_FORMAT_PARTS) => {
            let body: PartsBodyV2 = codec::decode_snapshot(bytes)?;
            let (capture, stored) = body.capture.split();
            let idem = IdemBook::from_stored(stored).map_err(SnapshotError::Records)?;
            from_parts(seq, body.top, body.start, capture, idem)
        }
        Some(codec::SNAPSHOT_FORMAT_COMPACT | codec::SNAPSHOT_FORMAT_STREAMED) => {
            let body: PartsBody = codec::decode_snapshot(bytes)?;
            let mut capture = body.capture;
            let idem = IdemBook::from_snapshot(std::mem::take(&mut capture.idem));
            from_parts(seq, body.top, body.start, capture, idem)
        }
        _ => Err(SnapshotError::Inconsistent("not a snapshot (magic)".into())),
    }
}

/// A state and its cut from a snapshot's parts, checked against the
/// snapshot's own numbers (`top`, `start`) and its file name (`seq`).
fn from_parts(
    seq: Seq,
    top: Seq,
    start: Seq,
    capture: Capture,
    idem: IdemBook,
) -> Result<(State, Cut), SnapshotError> {
    if top != seq || capture.top() != seq || capture.start() != start {
        return Err(SnapshotError::Inconsistent(format!(
            "it names sequence {} (start {}), its parts {} (start {})",
            top,
            start,
            capture.top(),
            capture.start()
        )));
    }
    let mut cut = Cut {
        start,
        top,
        skus: HashMap::with_capacity(capture.skus.len()),
        shards: Vec::with_capacity(capture.shards.len()),
        reservations: capture.reservations_seq,
        promotions: capture.promotions_seq,
    };
    let listed = capture.skus.len();
    // Listed in id order (the catalog's), so the map is built in bulk,
    // with full nodes, rather than one insert at a time.
    let skus: BTreeMap<SkuId, SkuState> = capture
        .skus
        .into_iter()
        .map(|(sku, mark)| {
            cut.skus.insert(sku.id(), mark);
            (sku.id(), sku)
        })
        .collect();
    if skus.len() != listed {
        return Err(SnapshotError::Inconsistent("a SKU appears twice".into()));
    }
    let books = capture.shards.into_iter().map(|(book, mark)| {
        cut.shards.push(mark);
        book
    });
    let orders = OrderBook::merge(books.collect::<Vec<_>>());
    let state = State {
        skus,
        orders,
        promotions: capture.promotions,
        idem: Arc::new(idem),
        open_reservations: capture.open_reservations,
        next_id: capture.next_id,
    };
    Ok((state, cut))
}

/// Loads the newest snapshot that decodes; a damaged one is skipped with a
/// warning (the journal still holds what the one before it does not cover).
pub(crate) fn load(store: &dyn SnapshotStore) -> Result<(State, Cut), SnapshotError> {
    for seq in store.list()? {
        let bytes = match store.read(seq) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(seq, error = %e, "cannot read snapshot; trying an older one");
                continue;
            }
        };
        match decode(seq, &bytes) {
            Ok(loaded) => return Ok(loaded),
            Err(e) => {
                tracing::warn!(seq, error = %e, "damaged snapshot; trying an older one");
            }
        }
    }
    Ok((State::default(), Cut::whole(0)))
}

/// Writes a snapshot of a whole `state` at `seq` (as one capture whose
/// parts all stand at `seq`) atomically and durably: tools, tests and
/// benches that hold a whole state use it.
///
/// # Errors
/// `Io` on any I/O failure (the previous snapshots stay).
pub fn write_snapshot(dir: &Path, state: &State, seq: Seq) -> Result<PathBuf, SnapshotError> {
    let store = DirStore::new(dir);
    write_capture(&store, Capture::whole(state, seq))?;
    Ok(store.path(seq))
}

/// Encodes and writes a capture (format 2); returns its top and start.
fn write_capture(
    store: &dyn SnapshotStore,
    capture: Capture,
) -> Result<(Seq, Seq, usize), SnapshotError> {
    let (top, start) = (capture.top(), capture.start());
    let body = PartsBody {
        top,
        start,
        capture,
    };
    // Encoded straight into the file, a slice at a time (`crate::files`): no
    // buffer of the whole state.
    let mut written = 0u64;
    store.write_with(top, &mut |out| {
        written = codec::encode_snapshot_streamed(&body, out)
            .map_err(|e| std::io::Error::other(format!("encoding a snapshot: {e}")))?;
        Ok(())
    })?;
    Ok((top, start, usize::try_from(written).unwrap_or(usize::MAX)))
}

/// Removes `keys` in one sled batch; returns how many.
pub(crate) fn remove_keys(db: &sled::Tree, keys: &[sled::IVec]) -> Result<u64, sled::Error> {
    let mut batch = sled::Batch::default();
    for key in keys {
        batch.remove(key);
    }
    db.apply_batch(batch)?;
    Ok(keys.len() as u64)
}

/// How often snapshots are taken.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotPolicy {
    /// After this many new durable events.
    pub every_events: u64,
    /// After this long, if anything changed.
    pub every_ms: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> SnapshotPolicy {
        SnapshotPolicy {
            every_events: SNAPSHOT_EVERY_EVENTS,
            every_ms: SNAPSHOT_EVERY_MS,
        }
    }
}

/// What one snapshot took, for logs, metrics and the soak bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotReport {
    /// Its name: the highest sequence number it holds.
    pub top: Seq,
    /// Where replay from it starts.
    pub start: Seq,
    /// Its size on disk.
    pub bytes: u64,
    /// How long copying the parts took (every actor's turn, the key book
    /// and the rest, one after another).
    pub capture_ms: u64,
    /// The longest any one actor paused for its copy (its handler), in
    /// microseconds: what a request queued behind it waited.
    pub pause_us_max: u64,
    /// How long it took in all (copy, wait for the disk, encode, write).
    pub total_ms: u64,
}

/// The background snapshotter.
pub struct Snapshotter {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
    last: Arc<Mutex<Option<SnapshotReport>>>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").finish()
    }
}

struct Taker {
    source: Arc<dyn SnapshotSource>,
    journal: Arc<dyn Journal>,
    history: Arc<dyn History>,
    store: Box<dyn SnapshotStore>,
    /// The highest mark of the last snapshot (or what the journal held at
    /// the start: nothing new, nothing to write).
    top: Seq,
    /// The replay start of the last snapshot this thread wrote: once the
    /// next one is written, the journal up to here can go.
    start: Option<Seq>,
    last_at: Instant,
    last: Arc<Mutex<Option<SnapshotReport>>>,
}

impl Taker {
    fn due(&self, policy: SnapshotPolicy) -> bool {
        let new = self.journal.watermark().durable().saturating_sub(self.top);
        new >= policy.every_events
            || (new > 0 && self.last_at.elapsed() >= Duration::from_millis(policy.every_ms))
    }

    /// Waits until everything up to `seq` is durable.
    fn wait_durable(&self, seq: Seq) -> Result<(), SnapshotError> {
        let deadline = Instant::now() + Duration::from_millis(DURABLE_WAIT_MS);
        loop {
            if self.journal.watermark().durable() >= seq {
                return Ok(());
            }
            if let Some(why) = self.journal.failure() {
                return Err(SnapshotError::JournalFailed(why));
            }
            if Instant::now() >= deadline {
                return Err(SnapshotError::NotDurable {
                    seq,
                    waited_ms: DURABLE_WAIT_MS,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn snapshot(&mut self) -> Result<(), SnapshotError> {
        let started = Instant::now();
        let pauses_before = steps::histogram(Step::ActorCapture);
        let capture = self.source.capture()?;
        steps::record(Step::Capture, started.elapsed());
        let capture_ms = elapsed_ms(started);
        let pause_us_max = steps::longest_since(Step::ActorCapture, &pauses_before);
        // The capture point: the sled writer starts a new epoch, so that
        // once a later snapshot covers this one's start, the epochs before
        // it go whole (`epochs.rs`) instead of block by block.
        self.history.capture_point();
        // A snapshot must never hold an event a crash could take back.
        self.wait_durable(capture.top())?;
        let (top, start, bytes) = steps::timed(Step::SnapshotWrite, || {
            write_capture(self.store.as_ref(), capture)
        })?;
        // The snapshot before this one stays as a fallback, with the records
        // after its start; what lies below can go.
        let dropped = match self.start {
            Some(previous) => steps::timed(Step::EpochDrop, || self.history.drop_through(previous))
                .map_err(SnapshotError::Truncate)?,
            None => Dropped::default(),
        };
        for seq in self.store.list()?.into_iter().skip(SNAPSHOTS_KEPT) {
            if let Err(e) = self.store.remove(seq) {
                tracing::warn!(seq, error = %e, "cannot remove an old snapshot");
            }
        }
        let report = SnapshotReport {
            top,
            start,
            bytes: bytes as u64,
            capture_ms,
            pause_us_max,
            total_ms: elapsed_ms(started),
        };
        tracing::info!(
            seq = top,
            start,
            bytes,
            dropped_epochs = dropped.epochs,
            removed_blocks = dropped.blocks,
            capture_ms,
            pause_us_max,
            took_ms = report.total_ms,
            "snapshot written"
        );
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        self.top = top;
        self.start = Some(start);
        self.last_at = Instant::now();
        Ok(())
    }
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl Snapshotter {
    /// Starts the snapshotter: it takes a snapshot of `source` when one is
    /// due by `policy`, and on `stop` a last one if anything changed (so
    /// the next start replays little). Stop it before the engine behind
    /// `source`.
    pub fn start(
        source: Arc<dyn SnapshotSource>,
        journal: Arc<SledJournal>,
        dir: PathBuf,
        policy: SnapshotPolicy,
    ) -> Snapshotter {
        let history: Arc<dyn History> = Arc::clone(&journal) as Arc<dyn History>;
        Snapshotter::start_with(
            source,
            journal,
            history,
            Box::new(DirStore::new(&dir)),
            policy,
        )
    }

    /// [`Snapshotter::start`] for any journal: `history` is its stored
    /// blocks (usually the journal itself) and `store` where snapshots go.
    pub fn start_with(
        source: Arc<dyn SnapshotSource>,
        journal: Arc<dyn Journal>,
        history: Arc<dyn History>,
        store: Box<dyn SnapshotStore>,
        policy: SnapshotPolicy,
    ) -> Snapshotter {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let last = Arc::new(Mutex::new(None));
        let top = journal.watermark().durable();
        let taker = Taker {
            source,
            journal,
            history,
            store,
            top,
            start: None,
            last_at: Instant::now(),
            last: Arc::clone(&last),
        };
        let thread = {
            let (stop, healthy) = (Arc::clone(&stop), Arc::clone(&healthy));
            std::thread::Builder::new()
                .name("flashcore-snapshot".into())
                .spawn(move || {
                    // Encoding and writing a snapshot takes a core for a
                    // second or more: it runs at the lowest priority, so
                    // the request path keeps the cores it needs.
                    if !crate::memory::lower_thread_priority() {
                        tracing::warn!("cannot lower the snapshot thread's priority");
                    }
                    if let Err(e) = snapshot_loop(taker, policy, &stop) {
                        healthy.store(false, Ordering::SeqCst);
                        tracing::error!(error = %e, "the snapshotter stopped; the journal will grow until restart");
                    }
                })
        };
        let thread = match thread {
            Ok(thread) => Some(thread),
            Err(e) => {
                healthy.store(false, Ordering::SeqCst);
                tracing::error!(error = %e, "cannot start the snapshotter");
                None
            }
        };
        Snapshotter {
            stop,
            thread,
            healthy,
            last,
        }
    }

    /// Whether the snapshotter still runs.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// What the last snapshot took, if one was written.
    pub fn last(&self) -> Option<SnapshotReport> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops it (after a final snapshot) and waits.
    pub fn stop(&mut self) {
        {
            let (flag, wake) = &*self.stop;
            *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
            wake.notify_all();
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("the snapshotter panicked");
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn snapshot_loop(
    mut taker: Taker,
    policy: SnapshotPolicy,
    stop: &(Mutex<bool>, Condvar),
) -> Result<(), SnapshotError> {
    let (flag, wake) = stop;
    loop {
        let stopping = {
            let guard = flag.lock().unwrap_or_else(|p| p.into_inner());
            let (guard, _) = wake
                .wait_timeout_while(guard, Duration::from_millis(SNAPSHOT_POLL_MS), |stop| {
                    !*stop
                })
                .unwrap_or_else(|p| p.into_inner());
            *guard
        };
        if stopping {
            if taker.journal.watermark().durable() > taker.top {
                taker.snapshot()?;
            }
            return Ok(());
        }
        if taker.due(policy) {
            taker.snapshot()?;
        }
    }
}

#[cfg(test)]
mod format_tests {
    use super::*;
    use crate::domain::sale::SaleWindow;

    fn unhex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// A snapshot written by format 1 (before sale windows), at sequence 2:
    /// SKU `tee` (price 1500, limit 2, 7 units) restocked by 3 under the key
    /// `k1` of `admin`. Bytes taken from the build before format 2.
    const V1_SNAPSHOT_HEX: &str = "4643534e41500001015100000036bab2b90201037465650374656503546565fbdc0501020a0a0000000a0000000000010561646d696e026b3107070707070707070707070707070707fbd007010374656503546565fbdc0501020a0a0000000a0000";

    #[test]
    fn a_format_1_snapshot_still_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirStore::new(dir.path());
        std::fs::write(store.path(2), unhex(V1_SNAPSHOT_HEX)).expect("written");
        let (state, cut) = load(&store).expect("loads");
        assert_eq!(cut.top, 2);
        let sku = SkuId::parse("tee").expect("valid");
        let tee = state.skus.get(&sku).expect("the SKU is there");
        assert_eq!(tee.name(), "Tee");
        assert_eq!(tee.price_cents(), 1_500);
        assert_eq!(tee.levels().on_hand, 10);
        assert_eq!(tee.sale(), SaleWindow::default());
        let records = state.idem.to_sorted_vec();
        assert_eq!(records.len(), 1, "the keyed restock's record");
        match &records[0].record.outcome {
            crate::domain::idem::Outcome::Sku(view) => {
                assert_eq!(view.levels.on_hand, 10);
                assert_eq!(view.sale, SaleWindow::default());
            }
            other => panic!("expected a SKU outcome, got {other:?}"),
        }
    }

    #[test]
    fn a_format_2_snapshot_keeps_the_sale_window() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut state = State::default();
        let sale = SaleWindow::new(Some(1_000), Some(9_000)).expect("valid");
        let created = SkuState::decide_create(
            SkuId::parse("drop").expect("valid"),
            "Drop".into(),
            100,
            None,
            5,
            sale,
            0,
        )
        .expect("valid");
        state.apply(&created).expect("applied");
        write_snapshot(dir.path(), &state, 1).expect("written");
        let (loaded, cut) = load(&DirStore::new(dir.path())).expect("loads");
        assert_eq!(cut.top, 1);
        let drop = loaded
            .skus
            .get(&SkuId::parse("drop").expect("valid"))
            .expect("there");
        assert_eq!(drop.sale(), sale);
    }

    /// A format 2 snapshot (parts, records holding user, key and the whole
    /// order) loads with compact records that render the stored answer.
    #[test]
    fn a_format_2_parts_snapshot_loads_its_records_compact() {
        use crate::domain::idem::{FirstAnswer, Lookup, Refusal, StoredIdemRecord, StoredOutcome};
        use crate::domain::order::{Order, ReservedLine};
        use crate::domain::{IdempotencyKey, UserId};

        let ann = UserId::parse("ann").expect("valid");
        let order = Order::place(
            OrderId(7),
            ann,
            vec![ReservedLine {
                sku: SkuId::parse("tee").expect("valid"),
                name: "Tee".into(),
                qty: 1,
                unit_price_cents: 1_500,
            }],
            None,
            1_000,
            60_000,
        )
        .expect("placed");
        let mut book = OrderBook::default();
        let placed = crate::domain::Event::OrderPlacedAtSku {
            order: Box::new(order.clone()),
            idem: None,
        };
        book.apply(&IdemBook::default(), &placed).expect("placed");
        let record = |key: &str, outcome: StoredOutcome| StoredIdemRecord {
            user: ann,
            key: IdempotencyKey::parse(key).expect("valid"),
            fingerprint: [5; 16],
            at_ms: 1_000,
            outcome,
        };
        let mark = Mark::new(3, Vec::new());
        let body = PartsBodyV2 {
            top: 3,
            start: 3,
            capture: CaptureV2 {
                catalog_seq: 3,
                skus: Vec::new(),
                shards: vec![(book, mark)],
                promotions: Promotions::default(),
                promotions_seq: 3,
                open_reservations: BTreeMap::new(),
                reservations_seq: 3,
                idem: vec![
                    record("k-place", StoredOutcome::Order(Arc::new(order.clone()))),
                    record(
                        "k-refused",
                        StoredOutcome::Refused(Refusal {
                            status: 409,
                            code: "out_of_stock".into(),
                            message: "gone".into(),
                        }),
                    ),
                ],
                next_id: 8,
            },
        };
        let bytes =
            codec::encode_snapshot_as(codec::SNAPSHOT_FORMAT_PARTS, &body).expect("encodes");
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirStore::new(dir.path());
        std::fs::write(store.path(3), bytes).expect("written");
        let (state, cut) = load(&store).expect("loads");
        assert_eq!(cut.top, 3);
        assert_eq!(state.idem.len(), 1, "the refusal is dropped");
        let key = IdempotencyKey::parse("k-place").expect("valid");
        let Lookup::Replay(outcome) = state.idem.lookup(ann, &key, [5; 16]) else {
            panic!("the placement's record is kept");
        };
        assert_eq!(
            outcome.render(state.orders.get(order.id)),
            Ok(FirstAnswer::Order(Arc::new(order)))
        );
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn a_damaged_snapshot_keeps_the_codec_error_and_is_skipped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirStore::new(dir.path());
        write_snapshot(dir.path(), &State::default(), 5).expect("written");
        let whole = store.read(5).expect("reads");
        assert!(decode(5, &whole).is_ok(), "the whole one decodes");

        // A flipped byte past the header: the CRC catches it.
        let mut flipped = whole.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(
            matches!(
                decode(5, &flipped),
                Err(SnapshotError::Codec(codec::CodecError::BadChecksum))
            ),
            "{:?}",
            decode(5, &flipped).err()
        );
        // Bytes that are no snapshot at all, and one under another name.
        assert!(matches!(
            decode(5, b"not a snapshot"),
            Err(SnapshotError::Inconsistent(_))
        ));
        assert!(matches!(
            decode(6, &whole),
            Err(SnapshotError::Inconsistent(_))
        ));

        // load skips the damaged one for an older one that decodes.
        write_snapshot(dir.path(), &State::default(), 3).expect("written");
        std::fs::write(store.path(5), &flipped).expect("damaged");
        let (_, cut) = load(&store).expect("loads");
        assert_eq!(cut.top, 3, "the damaged newest is skipped");
    }

    #[test]
    fn a_snapshot_that_cannot_be_read_or_removed_keeps_its_io_kind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DirStore::new(dir.path());
        let missing = store.read(9).expect_err("no such snapshot");
        assert!(matches!(missing, SnapshotError::Io { .. }), "{missing:?}");
        assert_eq!(
            crate::journal::io_kind(&missing),
            Some(std::io::ErrorKind::NotFound)
        );
        let gone = store.remove(9).expect_err("no such snapshot");
        assert_eq!(
            crate::journal::io_kind(&gone),
            Some(std::io::ErrorKind::NotFound)
        );
        assert!(
            gone.to_string().contains("snapshot-"),
            "names the file: {gone}"
        );
    }
}
