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
//! Snapshots (`snapshot.rs`) hold the state's parts each at its own
//! sequence number; replay brings them to one (see [`Cut`]) and then goes
//! on as from any snapshot. What recovery checks does not change with the
//! snapshot: the tail rule above, every record's checks, and the whole
//! state's invariants after replay.

use std::path::Path;

use crate::domain::{Event, State};
use crate::journal::history::{Blocks, HistoryError, StoredBlock};
use crate::journal::snapshot::{
    self, Cut, DirStore, SnapshotError, SnapshotStore, TRUNCATE_BATCH, remove_keys,
};
use crate::journal::{Epochs, History, JournalError, Seq, codec};

pub use crate::journal::snapshot::{
    SNAPSHOT_EVERY_EVENTS, SNAPSHOT_EVERY_MS, SnapshotPolicy, Snapshotter, write_snapshot,
};

/// Why the state could not be rebuilt. Damage names its sequence number;
/// a storage failure keeps its cause (and so its `io::ErrorKind`, see
/// `journal::io_kind`), by where it happened.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// The journal's database or a file beside it could not be opened,
    /// written or synced (an unusable data dir, a lock held by another
    /// server, an I/O error).
    #[error("storage error during recovery: {0}")]
    Storage(#[from] JournalError),
    /// The journal's stored blocks could not be read.
    #[error("storage error during recovery: {0}")]
    History(#[from] HistoryError),
    /// The snapshots could not be listed or written.
    #[error("storage error during recovery: {0}")]
    Snapshot(#[from] SnapshotError),
    /// The newest snapshot holds more than the journal made durable.
    #[error(
        "storage error during recovery: the newest snapshot ({snapshot}) is past the \
         durable journal ({durable})"
    )]
    SnapshotAhead {
        /// The snapshot's sequence number.
        snapshot: Seq,
        /// The journal's durable watermark.
        durable: Seq,
    },
    /// The journal ends before what it had made durable.
    #[error(
        "storage error during recovery: the journal ends at {last}, before its durable \
         mark {durable}"
    )]
    Short {
        /// Its last record.
        last: Seq,
        /// Its durable watermark.
        durable: Seq,
    },
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

/// Reads the journal's blocks from the one holding `from + 1` on.
fn blocks_from(history: &dyn History, from: Seq) -> Result<Blocks<'_>, RecoveryError> {
    Ok(history.blocks_from(from)?)
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
    /// Reading the store failed (nothing after it is read).
    Storage(HistoryError),
}

/// Records decoded ahead of the apply stage, per message, and messages in
/// flight: enough to keep both cores busy, little memory.
const DECODE_CHUNK: usize = 1_024;
const DECODE_CHUNKS_AHEAD: usize = 8;

/// The decoding stage: reads blocks after `from` (up to `until`) and
/// decodes their records, until done or the apply stage hangs up.
fn decode_stage(
    history: &dyn History,
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
    let blocks = match history.blocks_from(from) {
        Ok(blocks) => blocks,
        Err(e) => {
            let _ = out.send(vec![Decoded::Storage(e)]);
            return;
        }
    };
    'blocks: for entry in blocks {
        let StoredBlock {
            first,
            bytes: block,
        } = match entry {
            Ok(block) => block,
            Err(HistoryError::BadKey(why)) => {
                push(Decoded::BadKey(why), &mut chunk);
                break;
            }
            Err(e @ HistoryError::Storage { .. }) => {
                push(Decoded::Storage(e), &mut chunk);
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
            E::UnknownVersion(_) | E::Undecodable(_) | E::WrongSeq { .. } | E::WrongKey => {
                DamageKind::Invalid
            }
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
    history: &dyn History,
    state: &mut State,
    cut: &Cut,
    until: Seq,
) -> Result<(Seq, Option<Damage>), RecoveryError> {
    let from = cut.start;
    std::thread::scope(|scope| {
        // The channel lives inside the scope: returning early (at damage)
        // drops `rx` before the scope joins the decoder, so a decoder
        // blocked on a full channel gets an error and stops instead of
        // waiting for ever.
        let (tx, rx) = crossbeam_channel::bounded(DECODE_CHUNKS_AHEAD);
        scope.spawn(move || decode_stage(history, from, until, &tx));
        apply_stage(&rx, state, cut)
    })
    .map(|(last, damage)| (last, damage.map(|d| describe_event(history, d))))
}

/// Fills in the text of the event a [`DamageKind::DoesNotApply`] names, read
/// again from the journal: replay moves each event into the state, so the
/// text is only made on this rare path.
fn describe_event(history: &dyn History, mut damage: Damage) -> Damage {
    let DamageKind::DoesNotApply { event } = &mut damage.kind else {
        return damage;
    };
    let found = blocks_from(history, damage.seq.saturating_sub(1))
        .ok()
        .and_then(|mut blocks| blocks.next())
        .and_then(Result::ok)
        .and_then(|block| {
            codec::block_records(block.first, &block.bytes)
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
    cut: &Cut,
) -> Result<(Seq, Option<Damage>), RecoveryError> {
    let mut last = cut.start;
    for item in rx.iter().flatten() {
        match item {
            Decoded::Storage(e) => return Err(RecoveryError::History(e)),
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
                // Between the snapshot's lowest and highest marks, each
                // event goes only to the parts that do not hold it yet.
                let applied = if seq <= cut.top {
                    state.apply_parts(event, |part| !cut.covers(part, seq))
                } else {
                    state.apply_owned(event)
                };
                if let Err(e) = applied {
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
fn good_record_after(history: &dyn History, damaged: Seq) -> Result<Option<Seq>, RecoveryError> {
    for entry in blocks_from(history, damaged)? {
        let block = match entry {
            Ok(block) => block,
            Err(HistoryError::BadKey(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        let good = codec::block_records(block.first, &block.bytes)
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
fn records_from(epochs: &Epochs, seq: Seq) -> Result<Dropped, RecoveryError> {
    let mut dropped = Dropped {
        records: 0,
        last: seq,
    };
    for entry in blocks_from(epochs, seq.saturating_sub(1))? {
        let block = match entry {
            Ok(block) => block,
            Err(HistoryError::BadKey(_)) => continue,
            Err(e) => return Err(e.into()),
        };
        for record in codec::block_records(block.first, &block.bytes).filter(|r| r.seq >= seq) {
            dropped.records += 1;
            dropped.last = dropped.last.max(record.seq);
        }
    }
    Ok(dropped)
}

/// Deletes every record from `seq` on, durably: the blocks after it go, and
/// the block holding it keeps only the records before it.
fn cut(epochs: &Epochs, dir: &Path, seq: Seq) -> Result<Dropped, RecoveryError> {
    let storage = |e: sled::Error| JournalError::sled("cutting the journal", e);
    let dropped = records_from(epochs, seq)?;
    // The blocks after the damage go first, newest first, and the block
    // holding it last: a cut interrupted (a crash, a signal) leaves the
    // damage where it was, with a contiguous journal before it, so the next
    // start judges it exactly as this one did. (At start-up, before any
    // request: sled batches are fine here.)
    for epoch in epochs.list().map_err(storage)?.into_iter().rev() {
        loop {
            let keys: Vec<sled::IVec> = epoch
                .tree
                .range(codec::key(seq.saturating_add(1))..)
                .keys()
                .rev()
                .take(TRUNCATE_BATCH)
                .collect::<Result<_, _>>()
                .map_err(storage)?;
            if keys.is_empty() {
                break;
            }
            remove_keys(&epoch.tree, &keys).map_err(storage)?;
        }
    }
    if let Some((tree, key, block)) = epochs.holding(seq).map_err(storage)? {
        let first =
            codec::seq_of(&key).map_err(|e| JournalError::codec("cutting the journal", e))?;
        let keep = codec::block_records(first, &block)
            .find(|r| r.seq == seq)
            .map(|r| r.offset);
        match keep {
            Some(0) => {
                tree.remove(&key).map_err(storage)?;
            }
            Some(offset) => {
                tree.insert(&key, &block[..offset]).map_err(storage)?;
            }
            None => {} // the cut starts after this block
        }
    }
    epochs.flush().map_err(storage)?;
    let data_path = dir.join("db");
    std::fs::File::open(&data_path)
        .and_then(|f| f.sync_data())
        .map_err(|e| JournalError::io("cannot sync the cut", &data_path, e))?;
    Ok(dropped)
}

/// Rebuilds the state from `snapshots` and the journal in `db`, all its
/// epochs (stored in
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
    let epochs = Epochs::new(db);
    let Replayed {
        state,
        from,
        last_seq,
        damage,
    } = replay_everything(&epochs, &DirStore::new(snapshots))?;
    let mut cut_at = None;
    if let Some(damage) = damage {
        let seq = damage.seq;
        let good_after = good_record_after(&epochs, seq)?;
        let torn_tail = damage.kind == DamageKind::Torn && good_after.is_none();
        let why = match good_after {
            Some(good) => format!("{}; record {good} after it is good", damage.why),
            None => damage.why.clone(),
        };
        if torn_tail {
            let dropped = cut(&epochs, journal_dir, seq)?;
            tracing::warn!(seq, records = dropped.records, %why, "cut a torn journal tail");
        } else if repair {
            let dropped = cut(&epochs, journal_dir, seq)?;
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
    recovered(state, &from, last_seq, cut_at)
}

/// The newest snapshot with every stored record after it applied.
struct Replayed {
    state: State,
    from: Cut,
    last_seq: Seq,
    damage: Option<Damage>,
}

fn replay_everything(
    history: &dyn History,
    snapshots: &dyn SnapshotStore,
) -> Result<Replayed, RecoveryError> {
    let (mut state, from) = snapshot::load(snapshots)?;
    let (last_seq, damage) = replay(history, &mut state, &from, Seq::MAX)?;
    if last_seq < from.top && damage.is_none() {
        // The snapshot holds events the journal does not: it was written
        // only once they were durable, so the journal lost them.
        return Err(RecoveryError::Corrupt {
            seq: last_seq + 1,
            why: format!(
                "the journal ends at {last_seq}, before the snapshot's sequence {}",
                from.top
            ),
        });
    }
    Ok(Replayed {
        state,
        from,
        last_seq,
        damage,
    })
}

/// Checks the rebuilt state's invariants and reports it.
fn recovered(
    state: State,
    from: &Cut,
    last_seq: Seq,
    cut_at: Option<Seq>,
) -> Result<Recovered, RecoveryError> {
    state.check_stock().map_err(|e| RecoveryError::Corrupt {
        seq: last_seq,
        why: format!("the rebuilt state breaks an invariant: {e}"),
    })?;
    Ok(Recovered {
        replayed: last_seq.saturating_sub(from.start),
        state,
        last_seq,
        snapshot_seq: from.top,
        cut_at,
    })
}

/// Rebuilds the state from `snapshots` and a journal whose blocks are never
/// torn: each landed whole or not at all (a JetStream message), and the
/// journal is shared by the cluster, so no node cuts it on its own. Any
/// damage stops the start, naming the sequence number.
///
/// # Errors
/// `Corrupt` for any damage, `Storage` when the data cannot be read.
pub fn recover_from(
    history: &dyn History,
    snapshots: &dyn SnapshotStore,
) -> Result<Recovered, RecoveryError> {
    let Replayed {
        state,
        from,
        last_seq,
        damage,
    } = replay_everything(history, snapshots)?;
    if let Some(damage) = damage {
        return Err(RecoveryError::Corrupt {
            seq: damage.seq,
            why: damage.why,
        });
    }
    recovered(state, &from, last_seq, None)
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
    history: &dyn History,
    snapshots: &dyn SnapshotStore,
    durable: Seq,
) -> Result<State, RecoveryError> {
    let (mut state, cut) = snapshot::load(snapshots)?;
    let snapshot_seq = cut.top;
    if snapshot_seq > durable {
        return Err(RecoveryError::SnapshotAhead {
            snapshot: snapshot_seq,
            durable,
        });
    }
    let (last, damage) = replay(history, &mut state, &cut, durable)?;
    if let Some(damage) = damage {
        return Err(RecoveryError::Corrupt {
            seq: damage.seq,
            why: damage.why,
        });
    }
    if last != durable {
        return Err(RecoveryError::Short { last, durable });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;

    use super::*;
    use crate::journal::io_kind;

    #[test]
    fn a_data_dir_that_cannot_be_used_keeps_its_io_kind() {
        let parent = tempfile::tempdir().expect("tempdir");
        // A file where the data dir should be: nothing can be created in it.
        let data_dir = parent.path().join("data");
        std::fs::write(&data_dir, b"not a directory").expect("writes");
        let error = crate::journal::open(&data_dir, crate::journal::FlushPolicy::Strict, false)
            .expect_err("a file is no data dir");
        assert!(
            matches!(
                &error,
                RecoveryError::Storage(JournalError::Io { path, .. }) if path.starts_with(&data_dir)
            ),
            "{error:?}"
        );
        assert_eq!(io_kind(&error), Some(ErrorKind::NotADirectory), "{error}");
        assert!(
            error
                .to_string()
                .contains("cannot create journal directory"),
            "{error}"
        );
    }

    #[test]
    fn snapshots_that_cannot_be_listed_keep_their_io_kind() {
        let parent = tempfile::tempdir().expect("tempdir");
        let file = parent.path().join("snapshots");
        std::fs::write(&file, b"not a directory").expect("writes");
        let error: RecoveryError = DirStore::new(&file)
            .list()
            .expect_err("a file is no snapshot dir")
            .into();
        assert!(matches!(
            error,
            RecoveryError::Snapshot(SnapshotError::Io { .. })
        ));
        assert_eq!(io_kind(&error), Some(ErrorKind::NotADirectory), "{error}");
    }

    #[test]
    fn a_full_disk_under_the_history_or_the_journal_stays_a_full_disk() {
        let full = || std::io::Error::from(ErrorKind::StorageFull);
        let read = RecoveryError::from(HistoryError::storage(
            "reading the journal",
            sled::Error::Io(full()),
        ));
        assert_eq!(io_kind(&read), Some(ErrorKind::StorageFull), "{read}");
        let denied = RecoveryError::from(JournalError::io(
            "cannot fsync",
            Path::new("/data/journal/db"),
            std::io::Error::from(ErrorKind::PermissionDenied),
        ));
        assert_eq!(io_kind(&denied), Some(ErrorKind::PermissionDenied));
        // Through a journal that stopped on it, and a durable state that
        // could not be rebuilt because of it.
        let stopped =
            JournalError::stopped(JournalError::sled("sled flush", sled::Error::Io(full())));
        assert_eq!(stopped.io_kind(), Some(ErrorKind::StorageFull));
        let rebuilt = JournalError::DurableState(std::sync::Arc::new(read));
        assert_eq!(rebuilt.io_kind(), Some(ErrorKind::StorageFull));
        // Damage is not I/O.
        let damage = RecoveryError::Corrupt {
            seq: 3,
            why: "x".into(),
        };
        assert_eq!(io_kind(&damage), None);
    }
}
