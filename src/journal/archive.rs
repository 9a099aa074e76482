//! The order archive: finished orders that left memory, on disk.
//!
//! [`Archive`] is what the engine sees (in cluster mode a partition's is on
//! the NATS servers, `cluster/archive.rs`); the engine decides *when* an order moves
//! (`engine/shard.rs`), this module only stores and reads. The move is: the
//! archive takes the orders and makes them durable ([`Archive::put_batch`]
//! returns only then), and only afterwards is `Event::OrdersArchived`
//! journaled, whose replay drops them from memory. So a crash between the
//! two leaves an order in the archive *and* in memory, which is harmless (it
//! is live until the event; the next sweep writes the same key again), and
//! never an order in neither.
//!
//! [`SledArchive`] keeps two trees in a sled database of its own
//! (`<data dir>/archive`), apart from the journal's: sled 0.34 writes its
//! page-table snapshot only when a database is opened, and an open reads
//! every log segment written since the previous open. In the journal's
//! database the archive made that read grow with the history (11 s after
//! 1,000,000 orders, `cargo bench --bench soak`), so every restart did too.
//! On its own, the journal's database holds only the window since the older
//! snapshot, and the archive is opened by [`OpeningArchive`] on a thread of
//! its own while the server starts and serves: reads of archived orders
//! wait for it, nothing else does. Durability is the journal's path: sled's
//! flush, then `fdatasync` of the data file (sled's flush alone does not
//! reach the drive).
//!
//! Archives written before the split (trees in the journal's database) are
//! moved over by [`OpeningArchive`] once, in batches, each durable in the
//! new database before the old trees are dropped.
//!
//! - `archive.orders`: big-endian order id -> the order, framed by
//!   [`codec::encode_order`] (format version, length, CRC, the id again).
//! - `archive.by_user`: user id, a 0 byte (never in an id), then the
//!   bitwise-not of the big-endian order id -> nothing. A prefix scan of a
//!   user reads their orders newest first.
//!
//! Writing the same order again overwrites both keys with the same bytes:
//! archiving twice stores it once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::domain::order::Order;
use crate::domain::{OrderId, UserId};
use crate::journal::writer::{self, DurableDb};
use crate::journal::{JournalError, codec};
use crate::limits::{ARCHIVE_CACHE_BYTES, ARCHIVE_MIGRATE_BATCH, ARCHIVE_OPEN_WAIT_MS};

/// Where finished orders go when they leave memory.
pub trait Archive: Send + Sync + std::fmt::Debug + 'static {
    /// Stores the orders and returns once they are durable. Storing an order
    /// that is already there replaces it.
    ///
    /// # Errors
    /// `Io`, `Sled` or `Remote` when the store cannot write or sync; some orders may
    /// have been written, none is promised.
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError>;

    /// The archived order with this id.
    ///
    /// # Errors
    /// `Io`, `Sled` or `Remote` when the store cannot be read, `Codec` or
    /// `BadKey` when the stored bytes are damaged.
    fn get(&self, id: OrderId) -> Result<Option<Order>, JournalError>;

    /// A user's archived orders, newest first, at most `limit`.
    ///
    /// # Errors
    /// As [`Archive::get`].
    fn list_user(&self, user: &UserId, limit: usize) -> Result<Vec<Order>, JournalError>;

    /// Everyone's archived orders, newest first, at most `limit`.
    ///
    /// # Errors
    /// As [`Archive::get`].
    fn list_all(&self, limit: usize) -> Result<Vec<Order>, JournalError>;
}

const ORDERS_TREE: &str = "archive.orders";
const BY_USER_TREE: &str = "archive.by_user";

/// The `archive.orders` key of an order: big-endian, so keys sort by id.
fn order_key(id: OrderId) -> [u8; 8] {
    id.0.to_be_bytes()
}

/// The prefix of a user's `archive.by_user` keys.
fn user_prefix(user: &UserId) -> Vec<u8> {
    let mut key = Vec::with_capacity(user.as_str().len() + 9);
    key.extend_from_slice(user.as_str().as_bytes());
    key.push(0);
    key
}

/// A user's `archive.by_user` key for an order: newest sorts first.
fn user_key(user: &UserId, id: OrderId) -> Vec<u8> {
    let mut key = user_prefix(user);
    key.extend_from_slice(&(!id.0).to_be_bytes());
    key
}

/// The order id at the end of an `archive.by_user` key.
fn id_of_user_key(key: &[u8]) -> Result<OrderId, JournalError> {
    let tail = key
        .len()
        .checked_sub(8)
        .and_then(|start| key.get(start..))
        .and_then(|tail| <[u8; 8]>::try_from(tail).ok())
        .ok_or(JournalError::BadKey {
            what: "archive: a user index key",
            len: key.len(),
            expected: 8,
        })?;
    Ok(OrderId(!u64::from_be_bytes(tail)))
}

/// A sled error of the archive's, saying what was being done.
fn storage(what: &'static str) -> impl FnOnce(sled::Error) -> JournalError {
    move |e| JournalError::sled(what, e)
}

fn decode(id: u64, bytes: &[u8]) -> Result<Order, JournalError> {
    codec::decode_order(id, bytes)
        .map_err(|e| JournalError::codec(format!("archive: order {id} is damaged"), e))
}

/// The archive in its own sled database (see the module doc).
#[derive(Debug)]
pub struct SledArchive {
    db: DurableDb,
    orders: sled::Tree,
    by_user: sled::Tree,
}

impl SledArchive {
    /// Opens (or creates) the archive's database in `dir`, waiting briefly
    /// for its lock as the journal does.
    ///
    /// # Errors
    /// `Io`, `Sled` or `Locked` when the database, its trees or its data file cannot
    /// be opened.
    pub fn open(dir: &Path) -> Result<SledArchive, JournalError> {
        let db = writer::open_db_cached(dir, ARCHIVE_CACHE_BYTES)?;
        SledArchive::in_db(&db, dir)
    }

    /// The archive's trees in `db`, the database in `dir`.
    fn in_db(db: &sled::Db, dir: &Path) -> Result<SledArchive, JournalError> {
        let orders = db
            .open_tree(ORDERS_TREE)
            .map_err(storage("archive: opening"))?;
        let by_user = db
            .open_tree(BY_USER_TREE)
            .map_err(storage("archive: opening"))?;
        Ok(SledArchive {
            db: DurableDb::new(db, dir)?,
            orders,
            by_user,
        })
    }

    /// How many orders are archived. Walks the tree: for tools and
    /// benches, not for a request.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }

    /// Moves an archive written before the split (the same two trees in
    /// the journal's database `old`) into this one: each batch is durable
    /// here before anything is removed there, and writing an order twice
    /// stores it once, so a crash at any point loses nothing. Returns how
    /// many orders moved.
    fn migrate_from(&self, old: &sled::Db) -> Result<u64, JournalError> {
        let names = old.tree_names();
        if !names.iter().any(|n| n.as_ref() == ORDERS_TREE.as_bytes()) {
            return Ok(0);
        }
        let old_orders = old
            .open_tree(ORDERS_TREE)
            .map_err(storage("archive: opening the old archive"))?;
        let mut moved = 0u64;
        loop {
            let mut batch = Vec::with_capacity(ARCHIVE_MIGRATE_BATCH);
            for entry in old_orders.iter().take(ARCHIVE_MIGRATE_BATCH) {
                let (key, bytes) = entry.map_err(storage("archive: reading the old archive"))?;
                let id = codec::seq_of(&key)
                    .map_err(|e| JournalError::codec("archive: a bad key", e))?;
                batch.push((key, decode(id, &bytes)?));
            }
            if batch.is_empty() {
                break;
            }
            let orders: Vec<Order> = batch.iter().map(|(_, order)| order.clone()).collect();
            self.put_batch(&orders)?;
            let mut gone = sled::Batch::default();
            for (key, _) in &batch {
                gone.remove(key);
            }
            old_orders
                .apply_batch(gone)
                .map_err(storage("archive: emptying the old archive"))?;
            moved += batch.len() as u64;
        }
        for name in [ORDERS_TREE, BY_USER_TREE] {
            old.drop_tree(name)
                .map_err(storage("archive: dropping the old archive"))?;
        }
        old.flush()
            .map_err(storage("archive: flushing the journal"))?;
        Ok(moved)
    }
}

/// What [`OpeningArchive`] holds: not yet, the archive, or why not.
#[derive(Debug)]
enum Opening {
    Pending,
    Open(Arc<SledArchive>),
    Failed(JournalError),
}

/// The [`SledArchive`], opened on a thread of its own (see the module doc):
/// every call waits for the open, at most [`ARCHIVE_OPEN_WAIT_MS`], then
/// answers `ArchiveOpening`, or why it could not open (a `503` to a read
/// of an archived order).
#[derive(Debug)]
pub struct OpeningArchive {
    state: Mutex<Opening>,
    opened: Condvar,
    opener: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl OpeningArchive {
    /// Starts opening the archive in `dir`, moving in an archive written
    /// into the journal's database `journal_db` before the split.
    ///
    /// # Errors
    /// `Spawn` when the thread cannot start.
    pub fn start(dir: PathBuf, journal_db: sled::Db) -> Result<Arc<OpeningArchive>, JournalError> {
        let archive = Arc::new(OpeningArchive {
            state: Mutex::new(Opening::Pending),
            opened: Condvar::new(),
            opener: Mutex::new(None),
        });
        let opener = {
            let archive = Arc::clone(&archive);
            std::thread::Builder::new()
                .name("flashcore-archive-open".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    let opened = SledArchive::open(&dir).and_then(|sled| {
                        let moved = sled.migrate_from(&journal_db)?;
                        if moved > 0 {
                            tracing::info!(
                                moved,
                                "moved the archive out of the journal's database"
                            );
                        }
                        Ok(sled)
                    });
                    drop(journal_db);
                    let state = match opened {
                        Ok(sled) => {
                            tracing::info!(
                                took_ms = started.elapsed().as_millis() as u64,
                                "the order archive is open"
                            );
                            Opening::Open(Arc::new(sled))
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "the order archive cannot be opened");
                            Opening::Failed(e)
                        }
                    };
                    *archive.lock() = state;
                    archive.opened.notify_all();
                })
                .map_err(|e| JournalError::Spawn {
                    what: "the archive's opener",
                    source: Arc::new(e),
                })?
        };
        *archive
            .opener
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(opener);
        Ok(archive)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Opening> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The open archive, waiting for it at most [`ARCHIVE_OPEN_WAIT_MS`].
    ///
    /// # Errors
    /// `ArchiveOpening` while it is still opening after that, or why it
    /// could not be opened.
    pub fn wait(&self) -> Result<Arc<SledArchive>, JournalError> {
        let state = self.lock();
        let (state, _) = self
            .opened
            .wait_timeout_while(state, Duration::from_millis(ARCHIVE_OPEN_WAIT_MS), |s| {
                matches!(s, Opening::Pending)
            })
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match &*state {
            Opening::Open(sled) => Ok(Arc::clone(sled)),
            Opening::Failed(why) => Err(why.clone()),
            Opening::Pending => Err(JournalError::ArchiveOpening),
        }
    }

    /// Waits for the opener to finish (so that the archive's database can
    /// be let go of, and opened again by a later start in this process).
    pub fn join_opener(&self) {
        let opener = self
            .opener
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(opener) = opener
            && opener.join().is_err()
        {
            tracing::error!("the archive's opener panicked");
        }
    }
}

impl Archive for OpeningArchive {
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError> {
        self.wait()?.put_batch(orders)
    }

    fn get(&self, id: OrderId) -> Result<Option<Order>, JournalError> {
        self.wait()?.get(id)
    }

    fn list_user(&self, user: &UserId, limit: usize) -> Result<Vec<Order>, JournalError> {
        self.wait()?.list_user(user, limit)
    }

    fn list_all(&self, limit: usize) -> Result<Vec<Order>, JournalError> {
        self.wait()?.list_all(limit)
    }
}

impl Archive for SledArchive {
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError> {
        if orders.is_empty() {
            return Ok(());
        }
        // Single inserts, never a sled batch: a batch takes sled's one
        // process-wide write lock, which every insert and flush of the
        // journal writer would wait on for the whole batch. Atomicity is
        // not needed: an order leaves memory only after this returns (and
        // its `OrdersArchived` is journaled), and until then it is read
        // from memory first, so a crash that keeps part of a batch leaves
        // orders that are both live and archived, which reads and listings
        // already take (the live copy wins), and which the next sweep
        // writes again. Each order's record goes before its index key, so
        // an index key always finds its order.
        for order in orders {
            let bytes = codec::encode_order(order)
                .map_err(|e| JournalError::codec("archive: encoding", e))?;
            self.orders
                .insert(order_key(order.id), bytes)
                .map_err(storage("archive: writing"))?;
            self.by_user
                .insert(user_key(&order.user, order.id), &[] as &[u8])
                .map_err(storage("archive: writing"))?;
        }
        self.db.flush()
    }

    fn get(&self, id: OrderId) -> Result<Option<Order>, JournalError> {
        match self.orders.get(order_key(id)) {
            Ok(Some(bytes)) => decode(id.0, &bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(JournalError::sled("archive: reading", e)),
        }
    }

    fn list_user(&self, user: &UserId, limit: usize) -> Result<Vec<Order>, JournalError> {
        let mut found = Vec::with_capacity(limit.min(64));
        for entry in self.by_user.scan_prefix(user_prefix(user)).take(limit) {
            let (key, _) = entry.map_err(storage("archive: reading"))?;
            let id = id_of_user_key(&key)?;
            // Written before the index key, in one flush: an index key
            // without its order is damage, but it must not hide the rest.
            match self.get(id)? {
                Some(order) => found.push(order),
                None => tracing::warn!(order = %id, "archive index names a missing order"),
            }
        }
        Ok(found)
    }

    fn list_all(&self, limit: usize) -> Result<Vec<Order>, JournalError> {
        let mut found = Vec::with_capacity(limit.min(64));
        for entry in self.orders.iter().rev().take(limit) {
            let (key, bytes) = entry.map_err(storage("archive: reading"))?;
            let id =
                codec::seq_of(&key).map_err(|e| JournalError::codec("archive: a bad key", e))?;
            found.push(decode(id, &bytes)?);
        }
        Ok(found)
    }
}

/// An archive in memory, for tests and benches: it keeps the encoded
/// bytes, so the codec is exercised exactly as on disk.
#[derive(Debug, Default)]
pub struct MemArchive {
    orders: Mutex<BTreeMap<OrderId, Vec<u8>>>,
}

impl MemArchive {
    /// An empty archive.
    pub fn new() -> MemArchive {
        MemArchive::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<OrderId, Vec<u8>>> {
        // One insert or read at a time: a poisoned map is still whole.
        self.orders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many orders are archived.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Archive for MemArchive {
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError> {
        let mut encoded = Vec::with_capacity(orders.len());
        for order in orders {
            let bytes = codec::encode_order(order)
                .map_err(|e| JournalError::codec("archive: encoding", e))?;
            encoded.push((order.id, bytes));
        }
        self.lock().extend(encoded);
        Ok(())
    }

    fn get(&self, id: OrderId) -> Result<Option<Order>, JournalError> {
        let bytes = self.lock().get(&id).cloned();
        bytes.map(|b| decode(id.0, &b)).transpose()
    }

    fn list_user(&self, user: &UserId, limit: usize) -> Result<Vec<Order>, JournalError> {
        let all: Vec<(OrderId, Vec<u8>)> = self
            .lock()
            .iter()
            .rev()
            .map(|(id, b)| (*id, b.clone()))
            .collect();
        let mut found = Vec::new();
        for (id, bytes) in all {
            if found.len() >= limit {
                break;
            }
            let order = decode(id.0, &bytes)?;
            if order.user == *user {
                found.push(order);
            }
        }
        Ok(found)
    }

    fn list_all(&self, limit: usize) -> Result<Vec<Order>, JournalError> {
        let all: Vec<(OrderId, Vec<u8>)> = self
            .lock()
            .iter()
            .rev()
            .take(limit)
            .map(|(id, b)| (*id, b.clone()))
            .collect();
        all.into_iter().map(|(id, b)| decode(id.0, &b)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SkuId;
    use crate::domain::order::ReservedLine;

    fn order(id: u64, user: &str) -> Order {
        let line = ReservedLine {
            sku: SkuId::parse("tee").expect("valid"),
            name: "Tee".into(),
            qty: 1,
            unit_price_cents: 1_000,
        };
        let user = UserId::parse(user).expect("valid");
        Order::place(OrderId(id), user, vec![line], None, 1_000, 60_000).expect("places")
    }

    #[test]
    fn an_archive_in_the_journals_database_moves_to_its_own_once() {
        let data = tempfile::tempdir().expect("tempdir");
        let journal_dir = crate::journal::journal_dir(data.path());
        let archive_dir = crate::journal::archive_dir(data.path());
        let orders: Vec<Order> = (1..=2_500)
            .map(|i| order(i, if i % 2 == 0 { "even" } else { "odd" }))
            .collect();
        {
            // The layout before the split: the trees in the journal's database.
            let db = writer::open_db(&journal_dir).expect("opens");
            let old = SledArchive::in_db(&db, &journal_dir).expect("opens");
            old.put_batch(&orders).expect("stores");
            db.insert(b"journal-record", b"stays".as_slice())
                .expect("inserts");
        }
        let db = writer::open_db(&journal_dir).expect("opens");
        let opening = OpeningArchive::start(archive_dir.clone(), db.clone()).expect("starts");
        let archive = opening.wait().expect("opens");
        assert_eq!(archive.len(), orders.len());
        assert_eq!(
            opening.get(OrderId(1_234)).expect("reads"),
            Some(orders[1_233].clone())
        );
        let odd = opening
            .list_user(&UserId::parse("odd").expect("valid"), 3)
            .expect("lists");
        let ids: Vec<u64> = odd.iter().map(|o| o.id.0).collect();
        assert_eq!(
            ids,
            vec![2_499, 2_497, 2_495],
            "newest first, only the user's"
        );
        assert!(
            !db.tree_names()
                .iter()
                .any(|n| n.as_ref() == ORDERS_TREE.as_bytes()
                    || n.as_ref() == BY_USER_TREE.as_bytes()),
            "the old trees are gone"
        );
        assert_eq!(
            db.get(b"journal-record").expect("reads").as_deref(),
            Some(b"stays".as_slice())
        );
        opening.join_opener();
        drop((archive, opening, db));
        // Opened again: nothing to move, everything still there.
        let db = writer::open_db(&journal_dir).expect("opens");
        let opening = OpeningArchive::start(archive_dir, db).expect("starts");
        assert_eq!(opening.wait().expect("opens").len(), orders.len());
        assert_eq!(
            opening.get(OrderId(1)).expect("reads"),
            Some(orders[0].clone())
        );
    }

    #[test]
    fn an_archive_that_cannot_open_answers_unavailable() {
        let data = tempfile::tempdir().expect("tempdir");
        let db = writer::open_db(&crate::journal::journal_dir(data.path())).expect("opens");
        // A file where the archive's directory should be.
        let archive_dir = crate::journal::archive_dir(data.path());
        std::fs::write(&archive_dir, b"not a directory").expect("writes");
        let opening = OpeningArchive::start(archive_dir, db).expect("starts");
        assert!(matches!(
            opening.get(OrderId(1)),
            Err(JournalError::Io { .. })
        ));
        assert!(matches!(
            opening.put_batch(&[order(1, "u")]),
            Err(JournalError::Io { .. })
        ));
    }

    #[test]
    fn user_keys_sort_newest_first_and_read_back_their_id() {
        let user = UserId::parse("u").expect("valid");
        let older = user_key(&user, OrderId(5));
        let newer = user_key(&user, OrderId(6));
        assert!(newer < older);
        assert_eq!(id_of_user_key(&older).expect("whole"), OrderId(5));
        // A user that is a prefix of another never sees its orders.
        let longer = UserId::parse("u1").expect("valid");
        assert!(!user_key(&longer, OrderId(1)).starts_with(&user_prefix(&user)));
        assert!(id_of_user_key(&[1, 2, 3]).is_err());
    }
}
