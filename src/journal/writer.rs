//! `SledJournal`: the durable journal, with group commit.
//!
//! Appends are numbered and encoded on the caller's thread, under one lock,
//! and handed to a single writer thread through a bounded `crossbeam`
//! channel (a full channel is `Full`: the caller sheds load). The writer
//! drains whatever is waiting, inserts it into `sled` as one batch, calls
//! `Db::flush`, and then `fdatasync`s sled's data file, because sled 0.34.7's
//! flush ends in `sync_file_range`, which neither flushes the drive's cache
//! nor the file's size: not durable on power loss (strace shows
//! `sync_file_range` then our `fdatasync`). Only then does it move the
//! [`Watermark`], releasing every waiter of the batch at once. No fsync ever
//! runs on an actor or tokio thread.
//!
//! In `strict` mode the writer flushes as soon as anything waits, so a
//! batch is whatever arrived during the previous flush. In `relaxed` mode it
//! gathers for up to [`RELAXED_FLUSH_MS`] first: callers are answered before
//! the flush. So that a stalled disk cannot let answers run ahead without
//! bound, the journal keeps when events were appended (`AppendTimes`);
//! once the oldest event not yet durable is older than
//! [`RELAXED_AHEAD_MS_MAX`], the engine makes relaxed answers wait too.
//!
//! A failed write or flush stops the journal: the failed batch and
//! everything after it are marked failed (their waiters get `NotDurable`),
//! later appends are refused, the durable watermark stops moving (a sync
//! that finishes after the failure fails its waiters instead), and the
//! server goes back to the last durable state before changes are taken
//! again.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use hdrhistogram::Histogram;

use crate::domain::{Event, State};
use crate::files::{Existing, create_dir_durably, sync_dir, write_file_durably};
use crate::journal::epochs::Epoch;
use crate::journal::history::{Dropped, HistoryError};
use crate::journal::{
    Archive, Epochs, History, IdemStore, Journal, JournalError, OpeningArchive, Seq, SledArchive,
    SledIdemStore, Watermark, codec,
};

/// Most events waiting for the writer. At ~8 us per durable event at the
/// group-commit rate, a full queue is about half a second of work: beyond
/// that, shedding answers faster than queueing would.
pub const QUEUE_EVENTS_MAX: usize = 65_536;

/// Most events in one batch, so one flush stays short and its waiters are
/// released in bounded time.
pub const BATCH_EVENTS_MAX: usize = 8_192;

/// In relaxed mode, the longest an appended event waits for its flush.
pub const RELAXED_FLUSH_MS: u64 = 5;

/// In relaxed mode, how far answers may run ahead of the disk: once the
/// oldest event not yet durable was appended longer ago than this (an
/// fsync that stalls, a disk that slows), answers wait for the disk like
/// strict ones. So a power cut loses at most the changes answered in the
/// last this-many milliseconds before the disk stopped keeping up (plus
/// the one flush under way), never an unbounded backlog. Four flush
/// periods: a healthy fdatasync fits, a stalled one does not.
pub const RELAXED_AHEAD_MS_MAX: u64 = 4 * RELAXED_FLUSH_MS;

/// Sequence numbers per slot of the append-time ring (see [`AppendTimes`]):
/// small, so that even at a few thousand events a second a slot spans a
/// few milliseconds and relaxed answers do not wait for the disk early.
const AGE_SLOT_SEQS: u64 = 4;

/// Slots of the append-time ring (2 MiB): it covers 1 M sequence numbers
/// in flight, more than the queue, the batches being written and the
/// batches waiting for their sync can hold together.
const AGE_SLOTS: usize = 262_144;

const _: () = assert!(
    (QUEUE_EVENTS_MAX + (SYNC_QUEUE_BATCHES_MAX + 2) * BATCH_EVENTS_MAX) as u64
        <= AGE_SLOT_SEQS * AGE_SLOTS as u64,
    "the append-time ring covers every event that can be in flight"
);

/// Flushed batches waiting for their fdatasync: a handful at most, since
/// one fdatasync covers all of them.
const SYNC_QUEUE_BATCHES_MAX: usize = 64;

/// How long a reopen waits for sled's lock: 50 attempts 100 ms apart. A
/// lock still held after that belongs to another process.
const LOCK_ATTEMPTS_MAX: u32 = 50;
const LOCK_RETRY_MS: u64 = 100;

/// sled's page cache: the journal is written, and read only on start and by
/// the snapshotter, so a small cache is enough.
const SLED_CACHE_BYTES: u64 = 64 << 20;

/// sled's segment size. sled writes any log item above a quarter of a
/// segment to a separate blob file that it never fsyncs; a leaf node holds
/// at most 17 entries, so with blocks of at most [`BLOCK_BYTES_MAX`] (and
/// records of at most [`codec::RECORD_BYTES_MAX`]) a node stays under
/// 17 x 128 KiB, far below the 4 MiB threshold of 16 MiB segments.
const SLED_SEGMENT_BYTES: usize = 16 << 20;

/// Largest block of records stored as one sled value (a block may exceed
/// it by one record).
pub const BLOCK_BYTES_MAX: usize = 16 << 10;

const _: () = assert!(
    17 * (BLOCK_BYTES_MAX + codec::RECORD_BYTES_MAX) < SLED_SEGMENT_BYTES / 4 - 20,
    "a sled leaf node must stay below the blob threshold"
);

/// When a journal answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// Flush as soon as anything waits.
    Strict,
    /// Gather for up to [`RELAXED_FLUSH_MS`], then flush.
    Relaxed,
}

/// What the writer has done, for metrics and benches.
#[derive(Debug)]
pub struct JournalStats {
    /// Events per batch.
    pub batch_events: Mutex<Histogram<u64>>,
    /// Duration of write + flush + fdatasync, in microseconds.
    pub flush_us: Mutex<Histogram<u64>>,
    /// Batches written.
    pub batches: AtomicU64,
    /// Events written.
    pub events: AtomicU64,
    /// Bytes written (record bytes).
    pub bytes: AtomicU64,
    /// The epoch the writer appends to (see `epochs.rs`).
    pub epoch: AtomicU64,
}

impl JournalStats {
    fn new() -> JournalStats {
        // Constant, valid bounds: building cannot fail.
        let hist = |high| {
            Mutex::new(Histogram::new_with_bounds(1, high, 3).expect("constant histogram bounds"))
        };
        JournalStats {
            batch_events: hist(BATCH_EVENTS_MAX as u64 + 1),
            flush_us: hist(60_000_000),
            batches: AtomicU64::new(0),
            events: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }
}

struct Item {
    seq: Seq,
    bytes: Vec<u8>,
}

/// When events were appended, coarsely: for each slot of [`AGE_SLOT_SEQS`]
/// consecutive sequence numbers, the time (ms since the journal started)
/// its first event was appended. The age of the oldest event not yet
/// durable is then known to within a slot, erring old (it is the slot's
/// first append, at or before that event's), at the cost of one clock read
/// per [`AGE_SLOT_SEQS`] appends.
struct AppendTimes {
    started: Instant,
    /// The first sequence number this journal appends (its slot's time is
    /// that append's, since earlier ones were durable before the start).
    first_seq: Seq,
    slots: Vec<AtomicU64>,
    /// The last sequence number appended (mirrors the append side, for
    /// readers that must not take its lock).
    last_seq: AtomicU64,
}

impl AppendTimes {
    fn new(last_seq: Seq) -> AppendTimes {
        AppendTimes {
            started: Instant::now(),
            first_seq: last_seq.saturating_add(1),
            slots: (0..AGE_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            last_seq: AtomicU64::new(last_seq),
        }
    }

    fn slot(seq: Seq) -> usize {
        // The remainder is below AGE_SLOTS, a usize.
        ((seq / AGE_SLOT_SEQS) % AGE_SLOTS as u64) as usize
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes the append of `seq` (called in sequence order), with the
    /// durable watermark as it was. An append to a journal that was wholly
    /// durable restarts its slot's clock: no older event in the slot is
    /// waiting, and an idle spell must not read as a stalled disk.
    fn appended(&self, seq: Seq, durable: Seq) {
        if seq.is_multiple_of(AGE_SLOT_SEQS)
            || seq == self.first_seq
            || durable.saturating_add(1) >= seq
        {
            self.slots[Self::slot(seq)].store(self.now_ms(), Ordering::Release);
        }
        self.last_seq.store(seq, Ordering::Release);
    }

    /// How long ago the oldest event after `durable` was appended (at
    /// most a slot's worth too old); 0 when everything is durable.
    fn oldest_after(&self, durable: Seq) -> u64 {
        let last = self.last_seq.load(Ordering::Acquire);
        if durable >= last {
            return 0;
        }
        if last - durable >= AGE_SLOT_SEQS * AGE_SLOTS as u64 {
            return u64::MAX;
        }
        let oldest = durable + 1;
        let appended_ms = self.slots[Self::slot(oldest)].load(Ordering::Acquire);
        self.now_ms().saturating_sub(appended_ms)
    }
}

struct AppendSide {
    last_seq: Seq,
    tx: Option<Sender<Item>>,
}

/// Shared between the journal handle and its writer thread.
struct Shared {
    watermark: Watermark,
    appended: AppendTimes,
    stats: JournalStats,
    failed: AtomicBool,
    failure: Mutex<Option<JournalError>>,
    /// Set by a snapshot: the writer starts a new epoch before its next
    /// batch.
    next_epoch: AtomicBool,
}

impl Shared {
    fn fail(&self, from: Seq, why: JournalError) {
        tracing::error!(from_seq = from, error = %why, io_kind = ?why.io_kind(), "journal write failed; refusing changes");
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        *failure = Some(why);
        self.failed.store(true, Ordering::SeqCst);
        self.watermark.fail_from(from);
    }

    /// Moves the watermark to `last` after a successful sync, unless the
    /// journal failed meanwhile: then those waiters hear of the failure
    /// instead. Decided under the failure lock, so once a failure is
    /// visible the durable watermark never moves again, and the state
    /// rebuilt at it (reads during the outage) stays what it says.
    fn advance_unless_failed(&self, first: Seq, last: Seq) -> bool {
        let _failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if self.failed.load(Ordering::SeqCst) {
            self.watermark.fail_from(first);
            return false;
        }
        self.watermark.advance(last);
        true
    }
}

/// The durable journal.
pub struct SledJournal {
    db: sled::Db,
    epochs: Epochs,
    append: Mutex<AppendSide>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    dir: PathBuf,
    /// Finished orders, in two trees of the same database.
    archive: Arc<OpeningArchive>,
    /// Idempotency records moved out of memory, in this journal's database.
    idem_store: Arc<SledIdemStore>,
}

impl std::fmt::Debug for SledJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledJournal")
            .field("dir", &self.dir)
            .finish()
    }
}

/// Opens (creating if needed) the sled database in `dir`.
///
/// The directory is created durably (with its parent, the data dir), sled's
/// `conf` is checked and if need be rewritten first (see
/// [`ensure_sled_conf`]), and after the open the directory is fsynced
/// again, so the data file's and the blob directory's entries are durable
/// before any record is acknowledged.
///
/// # Errors
/// `Io` naming the directory when it cannot be created or synced, `Locked`
/// when another process holds the database's lock (another server may be
/// using it) after waiting for it, `Open` when sled cannot open it.
pub fn open_db(dir: &Path) -> Result<sled::Db, JournalError> {
    open_db_cached(dir, SLED_CACHE_BYTES)
}

/// [`open_db`] with a page cache of `cache_bytes` (each database has its
/// own; the order archive, read rarely, takes a smaller one).
///
/// # Errors
/// As [`open_db`].
pub fn open_db_cached(dir: &Path, cache_bytes: u64) -> Result<sled::Db, JournalError> {
    create_dir_durably(dir)
        .map_err(|e| JournalError::io("cannot create journal directory", dir, e))?;
    ensure_sled_conf(dir)?;
    let config = sled_config(dir, cache_bytes);
    // sled releases its file lock when the last of its threads lets go of a
    // closed database, a moment after the close: a reopen (a restart after a
    // storage failure, a tool right after the server) waits for it, briefly.
    let mut attempts = 0;
    let db = loop {
        match config.open() {
            Ok(db) => break db,
            Err(e) if lock_is_held(&e, dir) => {
                if attempts >= LOCK_ATTEMPTS_MAX {
                    return Err(JournalError::Locked {
                        path: dir.to_path_buf(),
                        source: Arc::new(e),
                    });
                }
                attempts += 1;
                std::thread::sleep(Duration::from_millis(LOCK_RETRY_MS));
            }
            Err(e) => {
                return Err(JournalError::Open {
                    path: dir.to_path_buf(),
                    source: Arc::new(e),
                });
            }
        }
    };
    // The entries sled created (its data file, `blobs/`) must be durable too.
    sync_dir(dir).map_err(|e| JournalError::io("cannot fsync", dir, e))?;
    Ok(db)
}

/// The configuration every database is opened with.
fn sled_config(dir: &Path, cache_bytes: u64) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(cache_bytes)
        .flush_every_ms(None)
        .segment_size(SLED_SEGMENT_BYTES)
        .mode(sled::Mode::LowSpace)
}

/// Whether sled's open failed because another open database holds the
/// lock on its `db` file. sled 0.34.7 reports that as an `io::Error` of
/// kind `Other` whose only trace of the cause is its text, so instead of
/// reading the text this asks the operating system: it tries the same
/// exclusive, non-blocking lock (`flock`, as sled's `fs2` does) on a file
/// description of its own, which conflicts with sled's even within this
/// process, and lets it go at once.
pub fn lock_is_held(error: &sled::Error, dir: &Path) -> bool {
    if !matches!(error, sled::Error::Io(_)) {
        return false;
    }
    let Ok(file) = File::open(dir.join("db")) else {
        return false; // no data file: nothing holds a lock on it
    };
    matches!(file.try_lock(), Err(std::fs::TryLockError::WouldBlock))
}

/// A sled database beside the journal's writer (the order archive, the
/// idempotency store) that makes its own writes durable: sled's flush, then
/// `fdatasync` of its data file, because sled 0.34's flush ends in
/// `sync_file_range` and does not reach the drive.
#[derive(Debug)]
pub struct DurableDb {
    db: sled::Db,
    /// sled's data file, opened for syncing.
    data_file: Mutex<File>,
    /// Its path, to name it in errors.
    data_path: PathBuf,
}

impl DurableDb {
    /// `db`, opened by [`open_db`] in `dir`, with its data file.
    ///
    /// # Errors
    /// `Io` when the data file cannot be opened.
    pub fn new(db: &sled::Db, dir: &Path) -> Result<DurableDb, JournalError> {
        let data_path = dir.join("db");
        let data_file = File::open(&data_path)
            .map_err(|e| JournalError::io("cannot open for syncing", &data_path, e))?;
        Ok(DurableDb {
            db: db.clone(),
            data_file: Mutex::new(data_file),
            data_path,
        })
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write to the database so far durable.
    ///
    /// # Errors
    /// What failed, the flush or the sync.
    pub fn flush(&self) -> Result<(), JournalError> {
        self.db
            .flush()
            .map_err(|e| JournalError::sled("flushing", e))?;
        let file = self
            .data_file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.sync_data()
            .map_err(|e| JournalError::io("cannot fsync", &self.data_path, e))
    }
}

/// The bytes of sled's `conf` for the configuration [`open_db`] uses:
/// exactly what sled 0.34.7 writes (a test compares them with sled's own).
pub fn sled_conf_bytes() -> Vec<u8> {
    let mut bytes =
        format!("segment_size: {SLED_SEGMENT_BYTES}\nuse_compression: false\nversion: 0.34\n")
            .into_bytes();
    let crc = crc32fast::hash(&bytes);
    bytes.extend_from_slice(&crc.to_le_bytes());
    bytes
}

/// sled writes its `conf` in place on the first open and never fsyncs it;
/// a power cut can leave a torn one, which sled then refuses to open
/// ("failed to parse ...") and the server could never start again. So
/// before every open: a `conf` that is missing, short or fails its CRC is
/// written again, atomically and durably, from the known values (it can
/// only have been written from them); a whole one is kept as it is, and
/// sled checks that it matches the configuration.
///
/// # Errors
/// `Io` when the file cannot be read or written.
pub fn ensure_sled_conf(dir: &Path) -> Result<(), JournalError> {
    let path = dir.join("conf");
    let whole = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() > 4 => {
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            crc32fast::hash(body).to_le_bytes() == crc
        }
        Ok(_) => false,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(JournalError::io("cannot read", &path, e)),
    };
    if whole {
        return Ok(());
    }
    if path.exists() {
        tracing::warn!(path = %path.display(), "sled's conf is torn (a power cut while sled wrote it); writing it again");
    }
    write_file_durably(&path, &sled_conf_bytes(), None, Existing::Replace)
        .map_err(|e| JournalError::io("cannot write", &path, e))
}

impl SledJournal {
    /// Starts the journal on an opened database whose records end at
    /// `last_seq` (all durable), with its writer thread.
    ///
    /// # Errors
    /// `Io` when sled's data file cannot be opened for syncing, `Spawn`
    /// when a thread cannot start, `Sled` when its epoch cannot be opened.
    pub fn start(
        db: sled::Db,
        dir: &Path,
        last_seq: Seq,
        policy: FlushPolicy,
    ) -> Result<SledJournal, JournalError> {
        let archive_dir = dir
            .parent()
            .map(super::archive_dir)
            .ok_or_else(|| JournalError::NoDataDir(dir.to_path_buf()))?;
        let archive = OpeningArchive::start(archive_dir, db.clone())?;
        let epochs = Epochs::new(&db);
        let epoch = epochs
            .for_writer()
            .map_err(|e| JournalError::sled("cannot open the journal's epoch", e))?;
        let idem_store = Arc::new(SledIdemStore::open(&db, dir)?);
        let data_path = dir.join("db");
        let data_file = File::open(&data_path)
            .map_err(|e| JournalError::io("cannot open for syncing", &data_path, e))?;
        let shared = Arc::new(Shared {
            watermark: Watermark::new(last_seq),
            appended: AppendTimes::new(last_seq),
            stats: JournalStats::new(),
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            next_epoch: AtomicBool::new(false),
        });
        shared.stats.epoch.store(epoch.number, Ordering::Relaxed);
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_EVENTS_MAX);
        let (sync_tx, sync_rx) = crossbeam_channel::bounded(SYNC_QUEUE_BATCHES_MAX);
        let spawn_error = |e: std::io::Error| JournalError::Spawn {
            what: "the journal thread",
            source: Arc::new(e),
        };
        let syncer = {
            let shared = Arc::clone(&shared);
            let blobs = dir.join("blobs");
            std::thread::Builder::new()
                .name("flashcore-fsync".into())
                .spawn(move || sync_loop(&sync_rx, &data_file, &blobs, &shared))
                .map_err(spawn_error)?
        };
        let writer = {
            let (epochs, shared) = (epochs.clone(), Arc::clone(&shared));
            std::thread::Builder::new()
                .name("flashcore-journal".into())
                .spawn(move || {
                    let stages = Stages {
                        rx: &rx,
                        to_sync: &sync_tx,
                        shared: &shared,
                        epochs: &epochs,
                    };
                    write_loop(&stages, epoch, policy);
                    drop(sync_tx);
                    if syncer.join().is_err() {
                        tracing::error!("the journal sync thread panicked");
                    }
                })
                .map_err(spawn_error)?
        };
        Ok(SledJournal {
            db,
            epochs,
            append: Mutex::new(AppendSide {
                last_seq,
                tx: Some(tx),
            }),
            shared,
            writer: Mutex::new(Some(writer)),
            dir: dir.to_path_buf(),
            archive,
            idem_store,
        })
    }

    /// The error an append gets once the journal stopped: the failure
    /// that stopped it is its cause.
    fn stopped(&self) -> JournalError {
        let failure = self
            .shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // `failed` is set after `failure`, under the same lock.
        let cause = failure.unwrap_or(JournalError::WriterStopped);
        JournalError::Stopped {
            cause: Arc::new(cause),
        }
    }

    /// The sled database (the snapshotter and recovery read it).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The journal's epochs (the snapshotter drops the old ones).
    pub fn epochs(&self) -> &Epochs {
        &self.epochs
    }

    /// Asks the writer to start a new epoch before its next batch: a
    /// snapshot does at its capture point, so the epochs before it can be
    /// dropped whole once a later snapshot covers them.
    pub fn next_epoch(&self) {
        self.shared.next_epoch.store(true, Ordering::SeqCst);
    }

    /// The archive of finished orders, beside this journal, once open.
    ///
    /// # Errors
    /// As [`OpeningArchive::wait`].
    pub fn sled_archive(&self) -> Result<Arc<SledArchive>, JournalError> {
        self.archive.wait()
    }

    /// What the writer has done (also through [`Journal::stats`]).
    pub fn stats(&self) -> &JournalStats {
        &self.shared.stats
    }

    /// Stops taking events, waits until everything taken is durable, and
    /// stops the writer. Idempotent.
    pub fn close(&self) {
        let tx = self
            .append
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .tx
            .take();
        drop(tx);
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer
            && writer.join().is_err()
        {
            tracing::error!("the journal writer panicked");
        }
        self.archive.join_opener();
    }
}

impl Drop for SledJournal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Journal for SledJournal {
    fn append(&self, event: &Event) -> Result<Seq, JournalError> {
        let mut side = self.append.lock().unwrap_or_else(|p| p.into_inner());
        if self.shared.failed.load(Ordering::SeqCst) {
            return Err(self.stopped());
        }
        let seq = side.last_seq + 1;
        let bytes = codec::encode(seq, event)
            .map_err(|e| JournalError::codec("cannot encode an event", e))?;
        let tx = side.tx.as_ref().ok_or(JournalError::Closed)?;
        match tx.try_send(Item { seq, bytes }) {
            Ok(()) => {
                side.last_seq = seq;
                let durable = self.shared.watermark.durable();
                self.shared.appended.appended(seq, durable);
                Ok(seq)
            }
            Err(TrySendError::Full(_)) => Err(JournalError::Full),
            Err(TrySendError::Disconnected(_)) => Err(JournalError::WriterStopped),
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

    fn unflushed_age_ms(&self) -> u64 {
        self.shared
            .appended
            .oldest_after(self.shared.watermark.durable())
    }

    fn failure(&self) -> Option<JournalError> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn durable_state(&self) -> Result<(State, Seq), JournalError> {
        let snapshots = self
            .dir
            .parent()
            .map(super::snapshot_dir)
            .ok_or_else(|| JournalError::NoDataDir(self.dir.clone()))?;
        let durable = self.shared.watermark.durable();
        let store = super::snapshot::DirStore::new(&snapshots);
        let state = super::recovery::durable_state(&self.epochs, &store, durable)
            .map_err(|e| JournalError::DurableState(Arc::new(e)))?;
        Ok((state, durable))
    }

    fn stats(&self) -> Option<&JournalStats> {
        Some(&self.shared.stats)
    }

    fn archive(&self) -> Option<Arc<dyn Archive>> {
        Some(Arc::clone(&self.archive) as Arc<dyn Archive>)
    }

    fn idem_store(&self) -> Option<Arc<dyn IdemStore>> {
        Some(Arc::clone(&self.idem_store) as Arc<dyn IdemStore>)
    }
}

/// The journal's epochs, with the writer's capture point: at a snapshot's
/// capture the writer moves to a new epoch (see `epochs.rs`).
impl History for SledJournal {
    fn blocks_from(&self, from: Seq) -> Result<crate::journal::history::Blocks<'_>, HistoryError> {
        History::blocks_from(&self.epochs, from)
    }

    fn capture_point(&self) {
        self.next_epoch();
    }

    fn drop_through(&self, seq: Seq) -> Result<Dropped, HistoryError> {
        History::drop_through(&self.epochs, seq)
    }
}

/// Gathers one batch: blocks for the first event, then takes what waits
/// (and in relaxed mode, what arrives within the flush delay).
fn gather(rx: &Receiver<Item>, batch: &mut Vec<Item>, policy: FlushPolicy) -> bool {
    match rx.recv() {
        Ok(item) => batch.push(item),
        Err(_) => return false, // closed and drained
    }
    let deadline = Instant::now() + Duration::from_millis(RELAXED_FLUSH_MS);
    while batch.len() < BATCH_EVENTS_MAX {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) if policy == FlushPolicy::Strict => break,
            Err(_) => match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(item) => batch.push(item),
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            },
        }
    }
    true
}

/// Inserts a batch as blocks of consecutive records (each at most
/// [`BLOCK_BYTES_MAX`], under its first sequence number) and flushes sled,
/// which writes them to its data file (and `sync_file_range`s it).
fn write_batch(batch: &[Item], db: &sled::Tree) -> Result<u64, JournalError> {
    let mut bytes = 0u64;
    let mut block: Vec<u8> = Vec::new();
    let mut first: Option<Seq> = None;
    for item in batch {
        if first.is_some()
            && block.len() + item.bytes.len() > BLOCK_BYTES_MAX
            && let Some(seq) = first.take()
        {
            db.insert(codec::key(seq), std::mem::take(&mut block))
                .map_err(|e| JournalError::sled("sled insert", e))?;
        }
        first.get_or_insert(item.seq);
        block.extend_from_slice(&item.bytes);
        bytes += item.bytes.len() as u64;
    }
    if let Some(seq) = first {
        db.insert(codec::key(seq), block)
            .map_err(|e| JournalError::sled("sled insert", e))?;
    }
    db.flush()
        .map_err(|e| JournalError::sled("sled flush", e))?;
    Ok(bytes)
}

/// What the write stage works with.
struct Stages<'a> {
    rx: &'a Receiver<Item>,
    to_sync: &'a Sender<(Seq, Seq, u64, usize, Instant)>,
    shared: &'a Shared,
    epochs: &'a Epochs,
}

/// The write stage: batches, blocks, sled flush; then hands the batch's last
/// sequence number to the sync stage and goes on with the next batch while
/// that one is being synced. Between two batches it moves to a new epoch
/// when a snapshot asked.
fn write_loop(stages: &Stages<'_>, mut epoch: Epoch, policy: FlushPolicy) {
    let shared = stages.shared;
    let mut batch: Vec<Item> = Vec::with_capacity(BATCH_EVENTS_MAX);
    while gather(stages.rx, &mut batch, policy) {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            continue;
        };
        let (first, last) = (first.seq, last.seq);
        debug_assert!(
            batch.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "a batch is contiguous"
        );
        if shared.failed.load(Ordering::SeqCst) {
            // Already failed: these were marked failed with the batch that broke.
            batch.clear();
            continue;
        }
        if shared.next_epoch.swap(false, Ordering::SeqCst) {
            match stages.epochs.open_after(epoch.number) {
                Ok(next) => {
                    epoch = next;
                    shared.stats.epoch.store(epoch.number, Ordering::Relaxed);
                }
                Err(e) => {
                    shared.fail(first, JournalError::sled("cannot start a journal epoch", e));
                    batch.clear();
                    continue;
                }
            }
        }
        let started = Instant::now();
        let written = write_batch(&batch, &epoch.tree);
        crate::steps::record(crate::steps::Step::JournalWrite, started.elapsed());
        match written {
            Ok(bytes) => {
                if stages
                    .to_sync
                    .send((first, last, bytes, batch.len(), started))
                    .is_err()
                {
                    shared.fail(first, JournalError::WriterStopped);
                }
            }
            Err(why) => shared.fail(first, why),
        }
        batch.clear();
    }
}

/// `fsync`s any blob file sled wrote since the last call (sled writes
/// values above its blob threshold to files of their own, without syncing
/// them). The record and block bounds keep every tree node far below that
/// threshold, so this finds nothing; it is the belt to those braces.
fn sync_new_blobs(
    blobs: &Path,
    synced: &mut std::collections::HashSet<std::ffi::OsString>,
) -> Result<(), JournalError> {
    let Ok(entries) = std::fs::read_dir(blobs) else {
        return Ok(()); // no blob directory yet: nothing to sync
    };
    let mut any = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if synced.contains(&name) {
            continue;
        }
        File::open(entry.path())
            .and_then(|f| f.sync_all())
            .map_err(|e| JournalError::io("cannot fsync sled blob", &entry.path(), e))?;
        tracing::warn!(blob = %entry.path().display(), "sled wrote a blob; synced it");
        synced.insert(name);
        any = true;
    }
    if any {
        sync_dir(blobs).map_err(|e| JournalError::io("cannot fsync", blobs, e))?;
    }
    Ok(())
}

/// The sync stage: `fdatasync` of sled's data file, which covers every
/// batch sled flushed before it started, then the watermark moves. Runs
/// beside the write stage, so a flush and a sync overlap.
fn sync_loop(
    rx: &Receiver<(Seq, Seq, u64, usize, Instant)>,
    data_file: &File,
    blobs: &Path,
    shared: &Shared,
) {
    let mut synced_blobs = std::collections::HashSet::new();
    while let Ok(head) = rx.recv() {
        // Everything flushed so far is covered by one fdatasync.
        let mut batches = vec![head];
        batches.extend(rx.try_iter());
        let first = batches[0].0;
        if shared.failed.load(Ordering::SeqCst) {
            // A later batch already failed: these were flushed but will not
            // be synced now. Their waiters must hear so, not wait for ever
            // (the changes may still appear after a reload, like any change
            // that got no answer).
            shared.watermark.fail_from(first);
            continue;
        }
        let sync_started = Instant::now();
        let synced = data_file
            .sync_data()
            .map_err(|e| JournalError::io("cannot fdatasync", &blobs.with_file_name("db"), e))
            .and_then(|()| sync_new_blobs(blobs, &mut synced_blobs));
        crate::steps::record(crate::steps::Step::JournalSync, sync_started.elapsed());
        if let Err(why) = synced {
            shared.fail(first, why);
            continue;
        }
        let last = batches.last().map_or(first, |b| b.1);
        if !shared.advance_unless_failed(first, last) {
            continue;
        }
        let stats = &shared.stats;
        let mut flush_us = stats.flush_us.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch_events = stats.batch_events.lock().unwrap_or_else(|p| p.into_inner());
        for (_, _, bytes, events, started) in &batches {
            let took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let _ = flush_us.record(took_us.max(1));
            let _ = batch_events.record(*events as u64);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats.events.fetch_add(*events as u64, Ordering::Relaxed);
            stats.bytes.fetch_add(*bytes, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_database_is_recognised_by_its_lock_not_by_the_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let held = open_db(dir.path()).expect("opens");
        // A second open in this process meets sled's lock like another
        // process would (flock locks belong to the open file, not the
        // process).
        let second = sled_config(dir.path(), SLED_CACHE_BYTES).open();
        let Err(error) = second else {
            panic!("a second open of a held database succeeded");
        };
        assert!(matches!(error, sled::Error::Io(_)), "{error:?}");
        assert!(lock_is_held(&error, dir.path()), "{error}");
        // The same error text means nothing on its own: a database nobody
        // holds is not locked, whatever the error says.
        let free = tempfile::tempdir().expect("tempdir");
        std::fs::write(free.path().join("db"), b"").expect("writes");
        let text = sled::Error::Io(std::io::Error::other("could not acquire lock on db"));
        assert!(!lock_is_held(&text, free.path()));
        // Nor is an error that is not sled's I/O, even on a held database.
        let bug = sled::Error::ReportableBug("acquire lock".into());
        assert!(!lock_is_held(&bug, dir.path()));
        drop(held);
    }

    #[test]
    fn a_failed_write_keeps_its_io_kind_through_the_stopped_journal() {
        let full = JournalError::io(
            "cannot fdatasync",
            Path::new("/data/journal/db"),
            std::io::Error::from(std::io::ErrorKind::StorageFull),
        );
        let stopped = JournalError::Stopped {
            cause: Arc::new(full.clone()),
        };
        assert_eq!(full.io_kind(), Some(std::io::ErrorKind::StorageFull));
        assert_eq!(stopped.io_kind(), Some(std::io::ErrorKind::StorageFull));
        let through_sled = JournalError::sled(
            "sled flush",
            sled::Error::Io(std::io::Error::from(std::io::ErrorKind::PermissionDenied)),
        );
        assert_eq!(
            through_sled.io_kind(),
            Some(std::io::ErrorKind::PermissionDenied)
        );
        assert_eq!(JournalError::NotDurable.io_kind(), None);
        assert!(
            stopped.to_string().contains("/data/journal/db"),
            "the message names the file as before: {stopped}"
        );
    }
}
