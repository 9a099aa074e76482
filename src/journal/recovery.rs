//! Recovery and snapshots: rebuilding the state from the newest valid
//! snapshot plus the journal tail, and keeping snapshots fresh so that the
//! tail (and the data dir) stays short.
//!
//! The tail rule (mini-redis's clean-EOF versus torn-frame split): records
//! are read in sequence order, and the first one that cannot be used is
//! *damage at* its number, of one of three kinds ([`DamageKind`]). Only a
//! record that fails its length or CRC check with no good record after it
//! is a torn tail from a crash mid-write: it is cut, with a warning, and
//! the journal goes on from the last good record (nothing torn was ever
//! acknowledged: answers wait for the fsync). Anything else — damage with
//! good records after it, a missing sequence number, a record that passes
//! its checks but does not decode, or one that decodes but does not apply
//! to the state before it (which may be an acknowledged change) — stops the
//! start, naming the sequence number (and the event), unless the operator
//! passes the repair flag, which cuts there, says what it drops, and loses
//! everything after it.
//!
//! Snapshots are written by a background thread that keeps its own copy of
//! the state, applying durable records with the same `apply` as everything
//! else, so a snapshot is exactly what recovery would rebuild at its
//! sequence number and the hot path never pauses for it. After writing
//! snapshot N, the thread drops the journal records covered by snapshot
//! N-1, so a damaged newest snapshot can always fall back to the one before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::clock::Clock;
use crate::domain::book::OrderBook;
use crate::domain::idem::{IdemBook, StoredIdemRecord, StoredIdemRecordV1};
use crate::domain::promo::Promotions;
use crate::domain::sku::{SkuState, SkuStateV1};
use crate::domain::state::OpenReservation;
use crate::domain::{Event, OrderId, SkuId, State};
use crate::journal::files::{Existing, create_dir_durably, write_file_durably};
use crate::journal::{Journal, Seq, SledJournal, codec};

/// Take a snapshot after this many new durable events...
pub const SNAPSHOT_EVERY_EVENTS: u64 = 250_000;
/// ...or after this long, if anything changed.
pub const SNAPSHOT_EVERY_MS: u64 = 60_000;
/// How often the snapshotter catches up with the journal.
const SNAPSHOT_POLL_MS: u64 = 250;
/// Records deleted per sled batch when truncating the journal.
const TRUNCATE_BATCH: usize = 10_000;

/// Why the state could not be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryError {
    /// Damage that is not a torn tail (damage before the tail, or a record
    /// that decodes but does not apply): history is broken at `seq`.
    #[error(
        "the journal is damaged at sequence {seq} ({why}), and that is not a torn tail; \
         refusing to start. Restore a backup, or start with --repair to cut the journal \
         at {seq} and lose every change from there on"
    )]
    Corrupt {
        /// The first damaged sequence number.
        seq: Seq,
        /// What is wrong with it.
        why: String,
    },
    /// The storage itself failed (unreadable data dir, I/O error).
    #[error("storage error during recovery: {0}")]
    Storage(String),
}

/// The snapshot format, owned (for reading).
#[derive(Deserialize)]
struct SnapshotBody {
    seq: Seq,
    skus: BTreeMap<SkuId, SkuState>,
    orders: OrderBook,
    promotions: Promotions,
    /// v1 snapshots may hold refusals: loading drops them.
    idem: Vec<StoredIdemRecord>,
    open_reservations: BTreeMap<OrderId, OpenReservation>,
    next_id: u64,
}

/// Snapshot format 1 (before sale windows): its SKUs and the SKUs in its
/// idempotency records have no window. Read only, converted on load.
#[derive(Deserialize)]
struct SnapshotBodyV1 {
    seq: Seq,
    skus: BTreeMap<SkuId, SkuStateV1>,
    orders: OrderBook,
    promotions: Promotions,
    idem: Vec<StoredIdemRecordV1>,
    open_reservations: BTreeMap<OrderId, OpenReservation>,
    next_id: u64,
}

impl From<SnapshotBodyV1> for SnapshotBody {
    fn from(v: SnapshotBodyV1) -> SnapshotBody {
        SnapshotBody {
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

/// The snapshot format, borrowed (for writing); the same shape as
/// [`SnapshotBody`].
#[derive(Serialize)]
struct SnapshotRef<'a> {
    seq: Seq,
    skus: &'a BTreeMap<SkuId, SkuState>,
    orders: &'a OrderBook,
    promotions: &'a Promotions,
    idem: Vec<StoredIdemRecord>,
    open_reservations: &'a BTreeMap<OrderId, OpenReservation>,
    next_id: u64,
}

/// A rebuilt state.
#[derive(Debug)]
pub struct Recovered {
    /// The state at `last_seq`.
    pub state: State,
    /// The last good sequence number.
    pub last_seq: Seq,
    /// The snapshot it started from (0: none).
    pub snapshot_seq: Seq,
    /// Records replayed after the snapshot.
    pub replayed: u64,
    /// Where the journal was cut, if it was.
    pub cut_at: Option<Seq>,
}

fn snapshot_path(dir: &Path, seq: Seq) -> PathBuf {
    dir.join(format!("snapshot-{seq:020}.bin"))
}

/// Snapshot files in `dir`, newest first.
fn list_snapshots(dir: &Path) -> Result<Vec<(Seq, PathBuf)>, RecoveryError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(RecoveryError::Storage(format!(
                "cannot read {}: {e}",
                dir.display()
            )));
        }
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| RecoveryError::Storage(e.to_string()))?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix("snapshot-"))
            .and_then(|n| n.strip_suffix(".bin"))
            .and_then(|n| n.parse::<Seq>().ok())
        else {
            continue;
        };
        found.push((seq, entry.path()));
    }
    found.sort_by_key(|(seq, _)| std::cmp::Reverse(*seq));
    Ok(found)
}

/// Loads the newest snapshot that decodes; a damaged one is skipped with a
/// warning (the journal still holds what the one before it does not cover).
fn load_snapshot(dir: &Path) -> Result<(State, Seq), RecoveryError> {
    for (seq, path) in list_snapshots(dir)? {
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read snapshot; trying an older one");
                continue;
            }
        };
        let decoded =
            codec::decode_snapshot_versioned::<SnapshotBody, SnapshotBodyV1>(&bytes).map(|body| {
                match body {
                    codec::Versioned::Current(body) => body,
                    codec::Versioned::V1(old) => old.into(),
                }
            });
        match decoded {
            Ok(body) if body.seq == seq => {
                let state = State {
                    skus: body.skus,
                    orders: body.orders,
                    promotions: body.promotions,
                    idem: Arc::new(IdemBook::from_snapshot(body.idem)),
                    open_reservations: body.open_reservations,
                    next_id: body.next_id,
                };
                return Ok((state, seq));
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "snapshot names another sequence; trying an older one");
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "damaged snapshot; trying an older one");
            }
        }
    }
    Ok((State::default(), 0))
}

/// Reads the journal's blocks from the one holding `from + 1` on.
fn blocks_from(db: &sled::Db, from: Seq) -> Result<sled::Iter, RecoveryError> {
    let want = codec::key(from.saturating_add(1));
    // The block holding `from + 1` starts at or before it.
    let start = match db.range(..=want).next_back() {
        Some(Ok((key, _))) => key.to_vec(),
        Some(Err(e)) => return Err(RecoveryError::Storage(format!("reading the journal: {e}"))),
        None => want.to_vec(),
    };
    Ok(db.range(start..))
}

fn read_error(e: sled::Error) -> RecoveryError {
    RecoveryError::Storage(format!("reading the journal: {e}"))
}

/// What the decoding stage of a replay hands to the applying stage. Records
/// travel by value in chunks: boxing each event to even out the variants
/// would cost an allocation per record on the path recovery time depends on.
#[allow(clippy::large_enum_variant)]
enum Decoded {
    /// A block starts at this sequence number.
    Block(Seq),
    /// A record of the current block.
    Record(Seq, Result<Event, codec::CodecError>),
    /// A key that is not a sequence number (nothing after it is read).
    BadKey(String),
    /// Reading sled failed (nothing after it is read).
    Storage(String),
}

/// Records decoded ahead of the apply stage, per message, and messages in
/// flight: enough to keep both cores busy, little memory.
const DECODE_CHUNK: usize = 1_024;
const DECODE_CHUNKS_AHEAD: usize = 8;

/// The decoding stage: reads blocks after `from` (up to `until`) and
/// decodes their records, until done or the apply stage hangs up.
fn decode_stage(
    db: &sled::Db,
    from: Seq,
    until: Seq,
    out: &crossbeam_channel::Sender<Vec<Decoded>>,
) {
    let mut chunk = Vec::with_capacity(DECODE_CHUNK);
    let push = |item: Decoded, chunk: &mut Vec<Decoded>| -> bool {
        chunk.push(item);
        if chunk.len() >= DECODE_CHUNK {
            return out.send(std::mem::take(chunk)).is_ok();
        }
        true
    };
    let blocks = match blocks_from(db, from) {
        Ok(blocks) => blocks,
        Err(e) => {
            let _ = out.send(vec![Decoded::Storage(e.to_string())]);
            return;
        }
    };
    'blocks: for entry in blocks {
        let (key, block) = match entry {
            Ok(entry) => entry,
            Err(e) => {
                push(Decoded::Storage(read_error(e).to_string()), &mut chunk);
                break;
            }
        };
        let first = match codec::seq_of(&key) {
            Ok(seq) => seq,
            Err(e) => {
                push(Decoded::BadKey(e.to_string()), &mut chunk);
                break;
            }
        };
        if first > until {
            break;
        }
        if !push(Decoded::Block(first), &mut chunk) {
            return;
        }
        for record in codec::block_records(first, &block) {
            if record.seq > until {
                break 'blocks;
            }
            let item = Decoded::Record(record.seq, record.event);
            if !push(item, &mut chunk) {
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = out.send(chunk);
    }
}

/// What is wrong at a place in the journal, which decides what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DamageKind {
    /// The record fails its length or CRC check: a write torn by a crash.
    /// At the tail (nothing good after it) it is cut; nothing torn was
    /// ever acknowledged, since acknowledgement waits for the fsync.
    Torn,
    /// The record passes its checks but is not what belongs there (an
    /// unknown format version, a payload that does not decode, another
    /// sequence number), or records are missing. Never a torn write.
    Invalid,
    /// The record decodes but does not apply to the state before it: it
    /// may be an acknowledged change, so it is never cut silently.
    DoesNotApply {
        /// The event, as text, for the operator.
        event: String,
    },
}

/// The first damage a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The first damaged sequence number.
    pub seq: Seq,
    /// What kind of damage.
    pub kind: DamageKind,
    /// What is wrong, for the operator.
    pub why: String,
}

impl Damage {
    fn invalid(seq: Seq, why: String) -> Damage {
        Damage {
            seq,
            kind: DamageKind::Invalid,
            why,
        }
    }

    fn of_record(seq: Seq, error: &codec::CodecError) -> Damage {
        use codec::CodecError as E;
        let kind = match error {
            E::Truncated(_) | E::BadChecksum | E::TooLarge(_) => DamageKind::Torn,
            E::UnknownVersion(_) | E::Undecodable(_) | E::WrongSeq { .. } => DamageKind::Invalid,
        };
        Damage {
            seq,
            kind,
            why: error.to_string(),
        }
    }
}

/// Longest event text a damage report carries.
const EVENT_TEXT_CHARS_MAX: usize = 600;

/// Applies the durable records after `from` (up to `until`, inclusive) to
/// `state`. Returns the last applied sequence number and the first damage
/// found, if any (the caller decides what damage means). Decoding runs on a
/// thread of its own, a stage ahead of applying, so a replay keeps two
/// cores busy.
fn replay(
    db: &sled::Db,
    state: &mut State,
    from: Seq,
    until: Seq,
) -> Result<(Seq, Option<Damage>), RecoveryError> {
    std::thread::scope(|scope| {
        // The channel lives inside the scope: returning early (at damage)
        // drops `rx` before the scope joins the decoder, so a decoder
        // blocked on a full channel gets an error and stops instead of
        // waiting for ever.
        let (tx, rx) = crossbeam_channel::bounded(DECODE_CHUNKS_AHEAD);
        scope.spawn(move || decode_stage(db, from, until, &tx));
        apply_stage(&rx, state, from)
    })
    .map(|(last, damage)| (last, damage.map(|d| describe_event(db, d))))
}

/// Fills in the text of the event a [`DamageKind::DoesNotApply`] names, read
/// again from the journal: replay moves each event into the state, so the
/// text is only made on this rare path.
fn describe_event(db: &sled::Db, mut damage: Damage) -> Damage {
    let DamageKind::DoesNotApply { event } = &mut damage.kind else {
        return damage;
    };
    let found = blocks_from(db, damage.seq.saturating_sub(1))
        .ok()
        .and_then(|mut blocks| blocks.next())
        .and_then(Result::ok)
        .and_then(|(key, block)| {
            let first = codec::seq_of(&key).ok()?;
            codec::block_records(first, &block)
                .find(|r| r.seq == damage.seq)
                .and_then(|r| r.event.ok())
        });
    *event = found.map_or_else(|| "(cannot be read again)".to_string(), |e| event_text(&e));
    damage.why = format!("{}: {event}", damage.why);
    damage
}

/// The applying stage of [`replay`].
fn apply_stage(
    rx: &crossbeam_channel::Receiver<Vec<Decoded>>,
    state: &mut State,
    from: Seq,
) -> Result<(Seq, Option<Damage>), RecoveryError> {
    let mut last = from;
    for item in rx.iter().flatten() {
        match item {
            Decoded::Storage(why) => return Err(RecoveryError::Storage(why)),
            Decoded::BadKey(why) => {
                return Ok((
                    last,
                    Some(Damage::invalid(last + 1, format!("bad key: {why}"))),
                ));
            }
            Decoded::Block(first) => {
                if first > last + 1 {
                    let why = format!("missing; the next block starts at {first}");
                    return Ok((last, Some(Damage::invalid(last + 1, why))));
                }
            }
            Decoded::Record(seq, event) => {
                if seq <= last {
                    if event.is_err() {
                        // Damage in a part a snapshot covers: what follows
                        // it in the block cannot be trusted to be found.
                        let why = "unreadable block".to_string();
                        return Ok((last, Some(Damage::invalid(last + 1, why))));
                    }
                    continue;
                }
                let event = match event {
                    Ok(event) => event,
                    Err(error) => return Ok((last, Some(Damage::of_record(seq, &error)))),
                };
                if let Err(e) = state.apply_owned(event) {
                    let damage = Damage {
                        seq,
                        why: format!("a record that decodes but does not apply ({e})"),
                        kind: DamageKind::DoesNotApply {
                            event: String::new(),
                        },
                    };
                    return Ok((last, Some(damage)));
                }
                last = seq;
            }
        }
    }
    Ok((last, None))
}

/// An event as text for a damage report, bounded.
fn event_text(event: &Event) -> String {
    let mut text = format!("{event:?}");
    if text.chars().count() > EVENT_TEXT_CHARS_MAX {
        text = text.chars().take(EVENT_TEXT_CHARS_MAX).collect();
        text.push('…');
    }
    text
}

/// The first good record after `damaged`, if any: then the damage is not a
/// tail.
fn good_record_after(db: &sled::Db, damaged: Seq) -> Result<Option<Seq>, RecoveryError> {
    for entry in blocks_from(db, damaged)? {
        let (key, block) = entry.map_err(read_error)?;
        let Ok(first) = codec::seq_of(&key) else {
            continue;
        };
        let good = codec::block_records(first, &block)
            .find(|r| r.seq > damaged && r.event.is_ok())
            .map(|r| r.seq);
        if good.is_some() {
            return Ok(good);
        }
    }
    Ok(None)
}

/// What a cut dropped.
#[derive(Debug, Clone, Copy)]
struct Dropped {
    /// Records dropped (readable or not).
    records: u64,
    /// The last sequence number dropped.
    last: Seq,
}

/// Counts the records from `seq` on (what a cut there drops).
fn records_from(db: &sled::Db, seq: Seq) -> Result<Dropped, RecoveryError> {
    let mut dropped = Dropped {
        records: 0,
        last: seq,
    };
    for entry in blocks_from(db, seq.saturating_sub(1))? {
        let (key, block) = entry.map_err(read_error)?;
        let Ok(first) = codec::seq_of(&key) else {
            continue;
        };
        for record in codec::block_records(first, &block).filter(|r| r.seq >= seq) {
            dropped.records += 1;
            dropped.last = dropped.last.max(record.seq);
        }
    }
    Ok(dropped)
}

/// Deletes every record from `seq` on, durably: the blocks after it go, and
/// the block holding it keeps only the records before it.
fn cut(db: &sled::Db, dir: &Path, seq: Seq) -> Result<Dropped, RecoveryError> {
    let storage = |e: sled::Error| RecoveryError::Storage(format!("cutting the journal: {e}"));
    let dropped = records_from(db, seq)?;
    // The blocks after the damage go first, newest first, and the block
    // holding it last: a cut interrupted (a crash, a signal) leaves the
    // damage where it was, with a contiguous journal before it, so the next
    // start judges it exactly as this one did.
    loop {
        let keys: Vec<sled::IVec> = db
            .range(codec::key(seq.saturating_add(1))..)
            .keys()
            .rev()
            .take(TRUNCATE_BATCH)
            .collect::<Result<_, _>>()
            .map_err(storage)?;
        if keys.is_empty() {
            break;
        }
        remove_keys(db, &keys).map_err(storage)?;
    }
    let holder = match db.range(..=codec::key(seq)).next_back() {
        Some(entry) => Some(entry.map_err(storage)?),
        None => None,
    };
    if let Some((key, block)) = holder {
        let first = codec::seq_of(&key).map_err(|e| RecoveryError::Storage(e.to_string()))?;
        let keep = codec::block_records(first, &block)
            .find(|r| r.seq == seq)
            .map(|r| r.offset);
        match keep {
            Some(0) => {
                db.remove(&key).map_err(storage)?;
            }
            Some(offset) => {
                db.insert(&key, &block[..offset]).map_err(storage)?;
            }
            None => {} // the cut starts after this block
        }
    }
    db.flush().map_err(storage)?;
    std::fs::File::open(dir.join("db"))
        .and_then(|f| f.sync_data())
        .map_err(|e| RecoveryError::Storage(format!("syncing the cut: {e}")))?;
    Ok(dropped)
}

/// Rebuilds the state from `snapshots` and the journal in `db` (stored in
/// `journal_dir`), cutting a torn tail. With `repair`, damage before the
/// tail is cut too instead of refusing.
///
/// # Errors
/// `Corrupt` for damage before the tail without `repair`; `Storage` when the
/// data cannot be read or the cut cannot be made durable.
pub fn recover(
    db: &sled::Db,
    journal_dir: &Path,
    snapshots: &Path,
    repair: bool,
) -> Result<Recovered, RecoveryError> {
    let (mut state, snapshot_seq) = load_snapshot(snapshots)?;
    let (last_seq, damage) = replay(db, &mut state, snapshot_seq, Seq::MAX)?;
    let mut cut_at = None;
    if let Some(damage) = damage {
        let seq = damage.seq;
        let good_after = good_record_after(db, seq)?;
        let torn_tail = damage.kind == DamageKind::Torn && good_after.is_none();
        let why = match good_after {
            Some(good) => format!("{}; record {good} after it is good", damage.why),
            None => damage.why.clone(),
        };
        if torn_tail {
            let dropped = cut(db, journal_dir, seq)?;
            tracing::warn!(seq, records = dropped.records, %why, "cut a torn journal tail");
        } else if repair {
            let dropped = cut(db, journal_dir, seq)?;
            tracing::error!(
                seq,
                records = dropped.records,
                last_dropped = dropped.last,
                %why,
                "REPAIR: cut the journal at damage that is not a torn tail; \
                 every change from here on is lost"
            );
        } else {
            return Err(RecoveryError::Corrupt { seq, why });
        }
        cut_at = Some(seq);
    }
    state.check_stock().map_err(|e| RecoveryError::Corrupt {
        seq: last_seq,
        why: format!("the rebuilt state breaks an invariant: {e}"),
    })?;
    Ok(Recovered {
        replayed: last_seq - snapshot_seq,
        state,
        last_seq,
        snapshot_seq,
        cut_at,
    })
}

/// The state as it was at `durable` (every record up to it durable): the
/// newest snapshot plus the journal up to there, nothing after, whatever
/// sled holds in memory beyond it (a failed batch). Read-only: nothing is
/// cut or written. Serves reads while the journal refuses changes.
///
/// # Errors
/// `Corrupt` when the records up to `durable` do not replay, `Storage`
/// when they cannot be read.
pub fn durable_state(
    db: &sled::Db,
    snapshots: &Path,
    durable: Seq,
) -> Result<State, RecoveryError> {
    let (mut state, snapshot_seq) = load_snapshot(snapshots)?;
    if snapshot_seq > durable {
        return Err(RecoveryError::Storage(format!(
            "the newest snapshot ({snapshot_seq}) is past the durable journal ({durable})"
        )));
    }
    let (last, damage) = replay(db, &mut state, snapshot_seq, durable)?;
    if let Some(damage) = damage {
        return Err(RecoveryError::Corrupt {
            seq: damage.seq,
            why: damage.why,
        });
    }
    if last != durable {
        return Err(RecoveryError::Storage(format!(
            "the journal ends at {last}, before its durable mark {durable}"
        )));
    }
    Ok(state)
}

/// Writes a snapshot of `state` at `seq` atomically and durably: a
/// temporary file, fsync, rename, fsync of the directory.
///
/// # Errors
/// `Storage` on any I/O failure (the previous snapshots stay).
pub fn write_snapshot(dir: &Path, state: &State, seq: Seq) -> Result<PathBuf, RecoveryError> {
    let body = SnapshotRef {
        seq,
        skus: &state.skus,
        orders: &state.orders,
        promotions: &state.promotions,
        idem: state.idem.to_snapshot(),
        open_reservations: &state.open_reservations,
        next_id: state.next_id,
    };
    let bytes = codec::encode_snapshot(&body)
        .map_err(|e| RecoveryError::Storage(format!("encoding a snapshot: {e}")))?;
    let io = |what: &str, e: std::io::Error| RecoveryError::Storage(format!("{what}: {e}"));
    // The directory's own entry (in the data dir) must be durable before
    // the journal below the snapshot is dropped.
    create_dir_durably(dir).map_err(|e| io("creating the snapshot dir", e))?;
    let path = snapshot_path(dir, seq);
    write_file_durably(&path, &bytes, None, Existing::Replace)
        .map_err(|e| io("writing a snapshot", e))?;
    Ok(path)
}

/// Removes the journal blocks whose records all lie at or below `seq`
/// (covered by a snapshot); returns how many blocks went. Not synced: if the
/// removal is lost in a crash, recovery simply skips what the snapshot
/// covers.
fn truncate_through(db: &sled::Db, seq: Seq) -> Result<u64, sled::Error> {
    if seq == 0 {
        return Ok(0);
    }
    let mut removed = 0;
    loop {
        // A block ends where the next one starts; the block holding `seq`
        // itself may hold later records too, so it stays.
        let keys: Vec<sled::IVec> = db
            .range(..=codec::key(seq.saturating_add(1)))
            .keys()
            .take(TRUNCATE_BATCH + 1)
            .collect::<Result<_, _>>()?;
        let mut doomed = Vec::new();
        for pair in keys.windows(2) {
            let next_first = codec::seq_of(&pair[1]).unwrap_or(0);
            if next_first.saturating_sub(1) <= seq {
                doomed.push(pair[0].clone());
            }
        }
        if doomed.is_empty() {
            return Ok(removed);
        }
        removed += remove_keys(db, &doomed)?;
    }
}

/// Removes `keys` in one sled batch; returns how many.
fn remove_keys(db: &sled::Db, keys: &[sled::IVec]) -> Result<u64, sled::Error> {
    let mut batch = sled::Batch::default();
    for key in keys {
        batch.remove(key);
    }
    db.apply_batch(batch)?;
    Ok(keys.len() as u64)
}

/// The background snapshotter.
pub struct Snapshotter {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").finish()
    }
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

struct Shadow {
    state: State,
    /// The engine's clock, for dropping idempotency records past their TTL.
    clock: Arc<dyn Clock>,
    seq: Seq,
    snapshot_seq: Seq,
    last_snapshot_at: Instant,
}

impl Shadow {
    /// Applies the durable records it has not seen yet.
    fn catch_up(&mut self, journal: &SledJournal) -> Result<(), RecoveryError> {
        let durable = journal.watermark().durable();
        if durable <= self.seq {
            return Ok(());
        }
        let (last, damage) = replay(journal.db(), &mut self.state, self.seq, durable)?;
        self.seq = last;
        match damage {
            Some(damage) => Err(RecoveryError::Corrupt {
                seq: damage.seq,
                why: damage.why,
            }),
            None => Ok(()),
        }
    }

    fn snapshot(&mut self, journal: &SledJournal, dir: &Path) -> Result<(), RecoveryError> {
        let started = Instant::now();
        // The live book drops records past their TTL every minute; the copy
        // must too, or snapshots would carry every key ever used, and a
        // restart would load them into a full book and keep them past a
        // key's reuse.
        self.state.idem.evict_expired(self.clock.now_ms());
        write_snapshot(dir, &self.state, self.seq)?;
        // The snapshot before this one stays as a fallback, with the
        // records after it; what it covers can go.
        let removed = truncate_through(journal.db(), self.snapshot_seq)
            .map_err(|e| RecoveryError::Storage(format!("truncating the journal: {e}")))?;
        // Keep the newest two snapshots.
        for (seq, path) in list_snapshots(dir)?.into_iter().skip(2) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(seq, error = %e, "cannot remove an old snapshot");
            }
        }
        tracing::info!(
            seq = self.seq,
            removed_records = removed,
            took_ms = started.elapsed().as_millis() as u64,
            "snapshot written"
        );
        self.snapshot_seq = self.seq;
        self.last_snapshot_at = Instant::now();
        Ok(())
    }

    fn due(&self, policy: SnapshotPolicy) -> bool {
        let new = self.seq.saturating_sub(self.snapshot_seq);
        new >= policy.every_events
            || (new > 0
                && self.last_snapshot_at.elapsed() >= Duration::from_millis(policy.every_ms))
    }
}

impl Snapshotter {
    /// Starts the snapshotter. It rebuilds its own copy of the state from
    /// the newest snapshot and the durable journal in the background, then
    /// follows the journal. On `stop` it takes a last snapshot if anything
    /// changed, so the next start replays little.
    pub fn start(
        journal: Arc<SledJournal>,
        dir: PathBuf,
        policy: SnapshotPolicy,
        clock: Arc<dyn Clock>,
    ) -> Snapshotter {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let healthy = Arc::new(AtomicBool::new(true));
        let thread = {
            let (stop, healthy) = (Arc::clone(&stop), Arc::clone(&healthy));
            std::thread::Builder::new()
                .name("flashcore-snapshot".into())
                .spawn(move || {
                    if let Err(e) = snapshot_loop(&journal, &dir, policy, clock, &stop) {
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
        }
    }

    /// Whether the snapshotter still runs.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    /// Stops it (after a final snapshot) and waits.
    pub fn stop(&mut self) {
        {
            let (flag, wake) = &*self.stop;
            *flag.lock().unwrap_or_else(|p| p.into_inner()) = true;
            wake.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the snapshotter panicked");
            }
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn snapshot_loop(
    journal: &SledJournal,
    dir: &Path,
    policy: SnapshotPolicy,
    clock: Arc<dyn Clock>,
    stop: &(Mutex<bool>, Condvar),
) -> Result<(), RecoveryError> {
    let (state, snapshot_seq) = load_snapshot(dir)?;
    let mut shadow = Shadow {
        state,
        clock,
        seq: snapshot_seq,
        snapshot_seq,
        last_snapshot_at: Instant::now(),
    };
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
        shadow.catch_up(journal)?;
        if stopping {
            if shadow.seq > shadow.snapshot_seq {
                shadow.snapshot(journal, dir)?;
            }
            return Ok(());
        }
        if shadow.due(policy) {
            shadow.snapshot(journal, dir)?;
        }
    }
}

#[cfg(test)]
mod tests {
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
        std::fs::write(snapshot_path(dir.path(), 2), unhex(V1_SNAPSHOT_HEX)).expect("written");
        let (state, seq) = load_snapshot(dir.path()).expect("loads");
        assert_eq!(seq, 2);
        let sku = SkuId::parse("tee").expect("valid");
        let tee = state.skus.get(&sku).expect("the SKU is there");
        assert_eq!(tee.name(), "Tee");
        assert_eq!(tee.price_cents(), 1_500);
        assert_eq!(tee.levels().on_hand, 10);
        assert_eq!(tee.sale(), SaleWindow::default());
        let records = state.idem.to_sorted_vec();
        assert_eq!(records.len(), 1, "the keyed restock's record");
        match &records[0].outcome {
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
        let (loaded, seq) = load_snapshot(dir.path()).expect("loads");
        assert_eq!(seq, 1);
        let drop = loaded
            .skus
            .get(&SkuId::parse("drop").expect("valid"))
            .expect("there");
        assert_eq!(drop.sale(), sale);
    }
}
