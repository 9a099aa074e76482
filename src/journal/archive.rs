//! The order archive: finished orders that left memory, on disk.
//!
//! [`Archive`] is what the engine sees (a later multi-machine version can
//! put another store behind it); the engine decides *when* an order moves
//! (`engine/shard.rs`), this module only stores and reads. The move is: the
//! archive takes the orders and makes them durable ([`Archive::put_batch`]
//! returns only then), and only afterwards is `Event::OrdersArchived`
//! journaled, whose replay drops them from memory. So a crash between the
//! two leaves an order in the archive *and* in memory, which is harmless (it
//! is live until the event; the next sweep writes the same key again), and
//! never an order in neither.
//!
//! [`SledArchive`] keeps two trees in the journal's own sled database
//! rather than a second database: one sled instance means one page cache
//! (sled's cache is sized per database), one set of files in the data dir,
//! and one durability path already proven by the journal (sled's flush, then
//! `fdatasync` of its data file, because sled's flush alone does not reach
//! the drive). The journal's recovery reads only sled's default tree, so the
//! archive's trees never meet the journal's records.
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
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use crate::domain::order::Order;
use crate::domain::{OrderId, UserId};
use crate::journal::{JournalError, codec};

/// Where finished orders go when they leave memory.
pub trait Archive: Send + Sync + std::fmt::Debug + 'static {
    /// Stores the orders and returns once they are durable. Storing an order
    /// that is already there replaces it.
    ///
    /// # Errors
    /// `Unavailable` when the store cannot write or sync; some orders may
    /// have been written, none is promised.
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError>;

    /// The archived order with this id.
    ///
    /// # Errors
    /// `Unavailable` when the store cannot be read or the stored bytes are
    /// damaged.
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
        .ok_or_else(|| JournalError::Unavailable("archive: a user index key is short".into()))?;
    Ok(OrderId(!u64::from_be_bytes(tail)))
}

fn storage(what: &str, e: impl std::fmt::Display) -> JournalError {
    JournalError::Unavailable(format!("archive: {what}: {e}"))
}

fn decode(id: u64, bytes: &[u8]) -> Result<Order, JournalError> {
    codec::decode_order(id, bytes).map_err(|e| storage(&format!("order {id} is damaged"), e))
}

/// The archive in the journal's sled database (see the module doc).
#[derive(Debug)]
pub struct SledArchive {
    db: sled::Db,
    orders: sled::Tree,
    by_user: sled::Tree,
    /// sled's data file, synced after sled's flush (as the journal does).
    data_file: Mutex<File>,
}

impl SledArchive {
    /// Opens the archive's trees in `db`, the database in `dir`.
    ///
    /// # Errors
    /// `Unavailable` when the trees or the data file cannot be opened.
    pub fn open(db: &sled::Db, dir: &Path) -> Result<SledArchive, JournalError> {
        let orders = db
            .open_tree(ORDERS_TREE)
            .map_err(|e| storage("opening", e))?;
        let by_user = db
            .open_tree(BY_USER_TREE)
            .map_err(|e| storage("opening", e))?;
        let data_path = dir.join("db");
        let data_file = File::open(&data_path)
            .map_err(|e| storage(&format!("opening {}", data_path.display()), e))?;
        Ok(SledArchive {
            db: db.clone(),
            orders,
            by_user,
            data_file: Mutex::new(data_file),
        })
    }

    /// How many orders are archived.
    pub fn len(&self) -> usize {
        self.orders.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.orders.is_empty()
    }
}

impl Archive for SledArchive {
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError> {
        if orders.is_empty() {
            return Ok(());
        }
        let mut by_id = sled::Batch::default();
        let mut by_user = sled::Batch::default();
        for order in orders {
            let bytes = codec::encode_order(order).map_err(|e| storage("encoding", e))?;
            by_id.insert(&order_key(order.id), bytes);
            by_user.insert(user_key(&order.user, order.id), &[] as &[u8]);
        }
        self.orders
            .apply_batch(by_id)
            .map_err(|e| storage("writing", e))?;
        self.by_user
            .apply_batch(by_user)
            .map_err(|e| storage("writing", e))?;
        self.db.flush().map_err(|e| storage("flushing", e))?;
        let file = self
            .data_file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        file.sync_data().map_err(|e| storage("syncing", e))?;
        Ok(())
    }

    fn get(&self, id: OrderId) -> Result<Option<Order>, JournalError> {
        match self.orders.get(order_key(id)) {
            Ok(Some(bytes)) => decode(id.0, &bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(storage("reading", e)),
        }
    }

    fn list_user(&self, user: &UserId, limit: usize) -> Result<Vec<Order>, JournalError> {
        let mut found = Vec::with_capacity(limit.min(64));
        for entry in self.by_user.scan_prefix(user_prefix(user)).take(limit) {
            let (key, _) = entry.map_err(|e| storage("reading", e))?;
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
            let (key, bytes) = entry.map_err(|e| storage("reading", e))?;
            let id = codec::seq_of(&key).map_err(|e| storage("a bad key", e))?;
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
            let bytes = codec::encode_order(order).map_err(|e| storage("encoding", e))?;
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
