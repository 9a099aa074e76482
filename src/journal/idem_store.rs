//! Idempotency records that left memory, on disk.
//!
//! [`IdemStore`] is what the engine sees (in cluster mode a partition's is
//! on the NATS servers, `cluster/idem_store.rs`); the engine decides *when* a record
//! moves (`engine/keyed.rs`: past the book's memory budget, oldest first),
//! this module only stores, reads and drops what has passed its TTL. The
//! move is: the store takes the records and makes them durable
//! ([`IdemStore::put_batch`] returns only then), and only afterwards does
//! memory drop them. So a record is always in memory, on disk or both; a
//! crash between the two leaves it in both, which is harmless (memory is
//! asked first and holds the same answer, or a newer one for a key used
//! again after its TTL). A record moves only once the change that made it
//! is durable in the journal, so the store never holds the record of a
//! change a failed batch took back.
//!
//! [`SledIdemStore`] keeps two trees in the journal's sled database (one
//! cache and one set of files with the journal; the records are bounded by
//! their TTL, so sled's open, which reads what was written since the last
//! one, stays bounded too). Writes are made durable as the archive's are
//! ([`DurableDb`]: sled's flush, then `fdatasync` of its data file).
//!
//! Every write is a single sled insert or removal, in slices of at most
//! [`IDEMPOTENCY_DISK_SLICE_US`] with rests between them, never a sled
//! batch: `apply_batch` takes sled's process-wide write lock
//! (`concurrency_control::write`, one static for every database in the
//! process), which stops the journal writer's inserts and flushes for the
//! whole batch, while a single operation takes it shared. The trees:
//!
//! - `idem.records`: the 16-byte key hash -> the record, framed by
//!   [`codec::encode_idem_record`] (format version, length, CRC, the key
//!   again);
//! - `idem.by_time`: big-endian `at_ms`, then the key hash -> nothing. A
//!   scan from the start finds the records past their TTL, oldest first.
//!
//! Writing a key again replaces its record (a key used again after its TTL:
//! the newer answer wins, as in memory); the older record's time entry then
//! points at a newer record and is dropped alone when its time comes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::SliceBudget;

use crate::domain::idem::{HashedRecord, IdemRecord, KeyHash};
use crate::journal::writer::DurableDb;
use crate::journal::{JournalError, codec};
use crate::limits::{
    IDEMPOTENCY_DISK_EVICT_BATCH_MAX, IDEMPOTENCY_DISK_REST_US, IDEMPOTENCY_DISK_SLICE_US,
    SWEEP_CLOCK_EVERY,
};

/// Where idempotency records go when they leave memory.
pub trait IdemStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores the records and returns once they are durable. A key already
    /// there gets the new record.
    ///
    /// # Errors
    /// `Io`, `Sled` or `Remote` when the store cannot write or sync; some records may
    /// have been written, none is promised.
    fn put_batch(&self, records: &[HashedRecord]) -> Result<(), JournalError>;

    /// The record stored under `key`, whatever its age.
    ///
    /// # Errors
    /// `Io`, `Sled` or `Remote` when the store cannot be read, `Codec` or `BadKey` when the bytes are damaged.
    fn get(&self, key: &KeyHash) -> Result<Option<IdemRecord>, JournalError>;

    /// Drops every record recorded before `cutoff_ms`; returns how many.
    /// Not synced: a drop lost in a crash is done again by the next sweep.
    ///
    /// # Errors
    /// `Io`, `Sled` or `Remote` when the store cannot be read or written.
    fn evict_before(&self, cutoff_ms: u64) -> Result<usize, JournalError>;

    /// How many records are stored.
    fn len(&self) -> usize;

    /// Whether none is.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

const RECORDS_TREE: &str = "idem.records";
const BY_TIME_TREE: &str = "idem.by_time";

/// The `idem.by_time` key of a record: its time first, so keys sort by age.
fn time_key(at_ms: u64, key: &KeyHash) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&at_ms.to_be_bytes());
    out[8..].copy_from_slice(&key.0);
    out
}

/// The time and key hash of an `idem.by_time` key.
fn of_time_key(bytes: &[u8]) -> Result<(u64, KeyHash), JournalError> {
    let whole = <[u8; 24]>::try_from(bytes).map_err(|_| JournalError::BadKey {
        what: "idempotency store: a time key",
        len: bytes.len(),
        expected: 24,
    })?;
    let mut at = [0u8; 8];
    at.copy_from_slice(&whole[..8]);
    let mut key = [0u8; 16];
    key.copy_from_slice(&whole[8..]);
    Ok((u64::from_be_bytes(at), KeyHash(key)))
}

/// Paces the store's disk work: slices of at most
/// [`IDEMPOTENCY_DISK_SLICE_US`], each followed by a rest of
/// [`IDEMPOTENCY_DISK_REST_US`] (the work runs on a blocking thread, never
/// on the request path, and shares the cores with it).
struct Pacer {
    budget: SliceBudget,
}

impl Pacer {
    fn new() -> Pacer {
        Pacer {
            budget: SliceBudget::new(
                Duration::from_micros(IDEMPOTENCY_DISK_SLICE_US),
                SWEEP_CLOCK_EVERY,
            ),
        }
    }

    /// Counts one record done; rests when the slice is spent.
    fn done_one(&mut self) {
        if self.budget.spent() {
            std::thread::sleep(Duration::from_micros(IDEMPOTENCY_DISK_REST_US));
            self.budget.restart();
        }
    }
}

/// A sled error of the store's, saying what was being done.
fn storage(what: &'static str) -> impl FnOnce(sled::Error) -> JournalError {
    move |e| JournalError::sled(what, e)
}

fn decode(key: &KeyHash, bytes: &[u8]) -> Result<IdemRecord, JournalError> {
    codec::decode_idem_record(key, bytes)
        .map_err(|e| JournalError::codec("idempotency store: a damaged record", e))
}

/// The store in the journal's sled database (see the module doc).
#[derive(Debug)]
pub struct SledIdemStore {
    db: DurableDb,
    records: sled::Tree,
    by_time: sled::Tree,
}

impl SledIdemStore {
    /// Opens the store's trees in `db`, the database in `dir`.
    ///
    /// # Errors
    /// `Sled` or `Io` when the trees or the data file cannot be opened.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<SledIdemStore, JournalError> {
        let records = db
            .open_tree(RECORDS_TREE)
            .map_err(storage("idempotency store: opening"))?;
        let by_time = db
            .open_tree(BY_TIME_TREE)
            .map_err(storage("idempotency store: opening"))?;
        Ok(SledIdemStore {
            db: DurableDb::new(db, dir)?,
            records,
            by_time,
        })
    }
}

impl IdemStore for SledIdemStore {
    fn put_batch(&self, records: &[HashedRecord]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        // Single inserts in paced slices, never a sled batch (see the
        // module doc); one flush for them all.
        let mut pacer = Pacer::new();
        for hashed in records {
            let bytes = codec::encode_idem_record(hashed)
                .map_err(|e| JournalError::codec("idempotency store: encoding", e))?;
            // The time index first: a crash between the two leaves an
            // index entry without its record (dropped alone when its time
            // comes), never a record that no sweep would find.
            self.by_time
                .insert(time_key(hashed.record.at_ms, &hashed.key), &[] as &[u8])
                .map_err(storage("idempotency store: writing"))?;
            self.records
                .insert(hashed.key.0, bytes)
                .map_err(storage("idempotency store: writing"))?;
            pacer.done_one();
        }
        self.db.flush()
    }

    fn get(&self, key: &KeyHash) -> Result<Option<IdemRecord>, JournalError> {
        match self.records.get(key.0) {
            Ok(Some(bytes)) => decode(key, &bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(JournalError::sled("idempotency store: reading", e)),
        }
    }

    fn evict_before(&self, cutoff_ms: u64) -> Result<usize, JournalError> {
        // One remove at a time, never a sled batch: a batch takes sled's
        // process-wide write lock, which the journal writer's every insert
        // and flush would wait on. A crash between the record's removal and
        // its index entry's leaves an index entry without its record,
        // dropped alone when its time comes again.
        let end = time_key(cutoff_ms, &KeyHash([0; 16]));
        let mut evicted = 0;
        let mut pacer = Pacer::new();
        loop {
            let doomed: Vec<sled::IVec> = self
                .by_time
                .range(..end)
                .keys()
                .take(IDEMPOTENCY_DISK_EVICT_BATCH_MAX)
                .collect::<Result<_, _>>()
                .map_err(storage("idempotency store: reading"))?;
            if doomed.is_empty() {
                return Ok(evicted);
            }
            for time in doomed {
                let (at_ms, key) = of_time_key(&time)?;
                // The key may hold a newer record (used again after its
                // TTL): that one stays.
                if let Some(record) = self.get(&key)?
                    && record.at_ms == at_ms
                {
                    self.records
                        .remove(key.0)
                        .map_err(storage("idempotency store: writing"))?;
                    evicted += 1;
                }
                self.by_time
                    .remove(time)
                    .map_err(storage("idempotency store: writing"))?;
                pacer.done_one();
            }
        }
    }

    fn len(&self) -> usize {
        self.records.len()
    }
}

/// A store in memory, for tests and benches: it keeps the encoded bytes,
/// so the codec is exercised exactly as on disk.
#[derive(Debug, Default)]
pub struct MemIdemStore {
    records: Mutex<BTreeMap<KeyHash, Vec<u8>>>,
}

impl MemIdemStore {
    /// An empty store.
    pub fn new() -> MemIdemStore {
        MemIdemStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<KeyHash, Vec<u8>>> {
        // One insert, read or removal at a time: a poisoned map is whole.
        self.records
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl IdemStore for MemIdemStore {
    fn put_batch(&self, records: &[HashedRecord]) -> Result<(), JournalError> {
        let mut encoded = Vec::with_capacity(records.len());
        for hashed in records {
            let bytes = codec::encode_idem_record(hashed)
                .map_err(|e| JournalError::codec("idempotency store: encoding", e))?;
            encoded.push((hashed.key, bytes));
        }
        self.lock().extend(encoded);
        Ok(())
    }

    fn get(&self, key: &KeyHash) -> Result<Option<IdemRecord>, JournalError> {
        let bytes = self.lock().get(key).cloned();
        bytes.map(|b| decode(key, &b)).transpose()
    }

    fn evict_before(&self, cutoff_ms: u64) -> Result<usize, JournalError> {
        let mut records = self.lock();
        let mut doomed = Vec::new();
        for (key, bytes) in records.iter() {
            if decode(key, bytes)?.at_ms < cutoff_ms {
                doomed.push(*key);
            }
        }
        for key in &doomed {
            records.remove(key);
        }
        Ok(doomed.len())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OrderId;
    use crate::domain::idem::Outcome;

    fn hashed(key: u8, at_ms: u64) -> HashedRecord {
        HashedRecord {
            key: KeyHash([key; 16]),
            record: IdemRecord {
                fingerprint: [key; 16],
                at_ms,
                outcome: Outcome::Order {
                    id: OrderId(u64::from(key)),
                    history_len: 1,
                },
            },
        }
    }

    #[test]
    fn time_keys_sort_by_age_and_read_back() {
        let key = KeyHash([9; 16]);
        assert!(time_key(5, &key) < time_key(6, &KeyHash([0; 16])));
        assert_eq!(of_time_key(&time_key(5, &key)).expect("whole"), (5, key));
        assert!(of_time_key(&[1, 2, 3]).is_err());
    }

    #[test]
    fn the_sled_store_keeps_records_and_drops_only_expired_ones() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::Config::new()
            .path(dir.path())
            .open()
            .expect("sled opens");
        let store = SledIdemStore::open(&db, dir.path()).expect("store opens");
        store
            .put_batch(&[hashed(1, 100), hashed(2, 200), hashed(3, 300)])
            .expect("written");
        // Key 1 used again later: its newer record must survive the sweep
        // of the older one's time.
        store.put_batch(&[hashed(1, 400)]).expect("written");
        assert_eq!(store.len(), 3);
        assert_eq!(
            store.get(&KeyHash([2; 16])).expect("reads"),
            Some(hashed(2, 200).record)
        );
        assert_eq!(store.evict_before(250).expect("sweeps"), 1, "key 2 only");
        assert_eq!(store.get(&KeyHash([2; 16])).expect("reads"), None);
        assert_eq!(
            store.get(&KeyHash([1; 16])).expect("reads"),
            Some(hashed(1, 400).record)
        );
        assert_eq!(store.evict_before(250).expect("sweeps"), 0);
        assert_eq!(store.evict_before(u64::MAX).expect("sweeps"), 2);
        assert!(store.is_empty());
        assert_eq!(store.by_time.len(), 0, "no time entry is left behind");
    }

    #[test]
    fn a_record_under_another_key_is_refused() {
        let store = MemIdemStore::new();
        let bytes = codec::encode_idem_record(&hashed(1, 1)).expect("encodes");
        store.lock().insert(KeyHash([2; 16]), bytes);
        assert!(store.get(&KeyHash([2; 16])).is_err());
    }
}
