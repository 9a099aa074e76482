//! Idempotency records: the first answer to a change that carried an
//! `Idempotency-Key`, kept per user and key.
//!
//! A record is written by applying the very event that made the change (the
//! event carries an [`IdemStamp`]), so after a crash a key has a record if and
//! only if its change survived. Only changes are recorded (contract v2): a
//! request the business rules refused (a `409`: out of stock, over a limit, a
//! move the order's state forbids, a payment mismatch), bad input (`400`,
//! `404`) and shed or failed requests (`503`) leave no record, in the journal
//! or here. They changed nothing, so a retry is decided afresh, and a flash
//! sale's refused clicks cost neither disk nor memory.
//!
//! # Compact records
//!
//! A record is small (about 56 bytes in the map, see `benches/memory.rs`):
//!
//! - the map key is a [`KeyHash`], 128 bits of SHA-256 over the user and the
//!   key (stable across builds and processes: replay recomputes it from the
//!   full user and key in the event's [`IdemStamp`]);
//! - the request's 16-byte fingerprint and when it was recorded;
//! - an [`Outcome`] that *refers* to the order rather than holding it: its
//!   id and how far its history had come (and, after a refund, what had
//!   been refunded). Every later move of an order only appends to its
//!   history, sets its payment once and raises refunded amounts, so
//!   [`Order::as_of`] renders the first answer again, exactly, from the
//!   order as it is now (in memory or in the archive). A SKU answer (an admin
//!   restock, rare) is kept whole, boxed.
//!
//! The book is shared by every actor that applies stamped events, hence the
//! concurrent map. It has no bound that refuses a key: the engine moves the
//! oldest records to disk when the book grows past its memory budget
//! (`engine/keyed.rs`, `journal/idem_store.rs`) and looks a key up there when
//! memory misses. Records older than [`IDEMPOTENCY_TTL_MS`] are dropped.
//!
//! v1 kept refusals too. Its journal records ([`Event::IdempotentRefusal`])
//! and the refusals in its snapshots ([`StoredOutcome::Refused`]) still decode;
//! replay ignores the former and [`IdemBook::from_stored`] drops the latter.
//! Snapshots before the compact records held whole orders
//! ([`StoredIdemRecord`]): they load through [`StoredIdemRecord::into_hashed`].
//!
//! [`Event::IdempotentRefusal`]: crate::domain::Event::IdempotentRefusal

use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::order::Order;
use crate::domain::sku::{SkuView, SkuViewV1};
use crate::domain::{DomainError, IdemStamp, IdempotencyKey, OrderId, UserId};
use crate::limits::IDEMPOTENCY_TTL_MS;

/// 128 bits of SHA-256 over a user and a key: what the book is keyed by.
///
/// Stable across builds and processes (it is written to snapshots and to
/// disk); user ids never hold a 0 byte and keys are visible ASCII, so the
/// 0 between them keeps `("ab", "c")` and `("a", "bc")` apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyHash(pub [u8; 16]);

impl KeyHash {
    /// The hash of `user`'s `key`.
    pub fn of(user: &UserId, key: &IdempotencyKey) -> KeyHash {
        let mut hash = Sha256::new();
        hash.update(b"flashcore.idempotency.v1\0");
        hash.update(user.as_str().as_bytes());
        hash.update([0]);
        hash.update(key.as_str().as_bytes());
        let digest = hash.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        KeyHash(out)
    }
}

impl Hash for KeyHash {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already a cryptographic hash of what a client sent: its first 64
        // bits are as good as any hash of it (and cannot be steered into
        // collisions), so the map uses them as they are.
        let mut word = [0u8; 8];
        word.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(word));
    }
}

/// The hasher of the book's map: passes a [`KeyHash`]'s first 64 bits through.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by `KeyHash`; anything else still hashes.
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 ^= word;
    }
}

/// The first answer to a keyed change, as a record keeps it: a reference
/// to the order (rendered again by [`Outcome::render`]) or a SKU.
///
/// Append-only, like the event enum: snapshots and the disk store encode a
/// variant by its index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// An order before any refund (a placement or a payment): the order as
    /// it was when its history had `history_len` entries.
    Order {
        /// The order.
        id: OrderId,
        /// How many history entries it had.
        history_len: u32,
    },
    /// An order after a refund (rare: an admin's): also what had been
    /// refunded by then.
    Refunded(Box<RefundedMark>),
    /// A SKU, as it was right after the change.
    Sku(Box<SkuView>),
}

/// What a refund's first answer needs beyond the order's id and history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundedMark {
    /// The order.
    pub id: OrderId,
    /// How many history entries it had.
    pub history_len: u32,
    /// Its `refunded_cents` then.
    pub refunded_cents: u64,
    /// Each line's `refunded_qty` then, in line order.
    pub refunded_qty: Vec<u32>,
}

impl Outcome {
    /// The reference to `order` as it is now.
    ///
    /// # Errors
    /// `Overflow` for a history longer than `u32` counts (the state machine
    /// allows five entries).
    pub fn of_order(order: &Order) -> Result<Outcome, DomainError> {
        let history_len = u32::try_from(order.history.len())
            .map_err(|_| DomainError::Overflow { what: "history" })?;
        let refunded = order.refunded_cents > 0 || order.lines.iter().any(|l| l.refunded_qty > 0);
        if !refunded {
            return Ok(Outcome::Order {
                id: order.id,
                history_len,
            });
        }
        Ok(Outcome::Refunded(Box::new(RefundedMark {
            id: order.id,
            history_len,
            refunded_cents: order.refunded_cents,
            refunded_qty: order.lines.iter().map(|l| l.refunded_qty).collect(),
        })))
    }

    /// The order this outcome refers to, if it is an order's.
    pub fn order_id(&self) -> Option<OrderId> {
        match self {
            Outcome::Order { id, .. } => Some(*id),
            Outcome::Refunded(mark) => Some(mark.id),
            Outcome::Sku(_) => None,
        }
    }

    /// The first answer again. `order` is the referred order as it is now
    /// (`None` for a SKU outcome, which holds its answer).
    ///
    /// # Errors
    /// `Inconsistent` when `order` is not the referred one or cannot have
    /// grown from the answer (a bug or damage).
    pub fn render(&self, order: Option<&Order>) -> Result<FirstAnswer, DomainError> {
        let missing = || DomainError::inconsistent("an order's outcome rendered without it");
        let as_of = |id: OrderId, history_len: u32, cents: u64, qty: &[u32]| {
            let order = order.ok_or_else(missing)?;
            if order.id != id {
                return Err(DomainError::inconsistent(format!(
                    "the outcome of order {id} rendered from order {}",
                    order.id
                )));
            }
            let history_len = usize::try_from(history_len)
                .map_err(|_| DomainError::Overflow { what: "history" })?;
            order
                .as_of(history_len, cents, qty)
                .map(|o| FirstAnswer::Order(Arc::new(o)))
        };
        match self {
            Outcome::Order { id, history_len } => as_of(*id, *history_len, 0, &[]),
            Outcome::Refunded(mark) => as_of(
                mark.id,
                mark.history_len,
                mark.refunded_cents,
                &mark.refunded_qty,
            ),
            Outcome::Sku(view) => Ok(FirstAnswer::Sku(SkuView::clone(view))),
        }
    }
}

/// A first answer as the client gets it (fresh or rendered again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstAnswer {
    /// An order (shared: concurrent duplicates of a request get it too).
    Order(Arc<Order>),
    /// A SKU.
    Sku(SkuView),
}

/// One key's record (the key is the map's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// The first request's fingerprint.
    pub fingerprint: [u8; 16],
    /// When it was recorded, unix milliseconds.
    pub at_ms: u64,
    /// The first answer.
    pub outcome: Outcome,
}

impl IdemRecord {
    /// Whether the record has passed its TTL at `now_ms`.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.at_ms < now_ms.saturating_sub(IDEMPOTENCY_TTL_MS)
    }

    /// What a request with `fingerprint` should do, given this record.
    pub fn lookup(&self, fingerprint: [u8; 16]) -> Lookup {
        if self.fingerprint == fingerprint {
            Lookup::Replay(self.outcome.clone())
        } else {
            Lookup::Conflict
        }
    }
}

/// A record with its key: how snapshots and the disk store keep one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashedRecord {
    /// The user's key, hashed.
    pub key: KeyHash,
    /// The record.
    pub record: IdemRecord,
}

/// A refusal as v1 kept it under a key. v2 keeps none; the type stays so
/// old journals ([`Event::IdempotentRefusal`](crate::domain::Event::IdempotentRefusal)) and snapshots decode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// The contract's error code.
    pub code: String,
    /// The message.
    pub message: String,
}

/// A record's outcome as snapshots before the compact records stored it.
/// Only for reading them. Append-only, like the event enum: a variant's
/// index is its encoding, and v1 snapshots hold refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredOutcome {
    /// The order, whole, as it was right after the change.
    Order(Arc<Order>),
    /// The SKU, as it was right after the change.
    Sku(SkuView),
    /// A refusal, written by v1 only; dropped when loaded.
    Refused(Refusal),
}

/// One key's record as snapshots before the compact records stored it
/// (user and key in full, the answer whole). Only for reading them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdemRecord {
    /// The key's scope.
    pub user: UserId,
    /// The key.
    pub key: IdempotencyKey,
    /// The first request's fingerprint.
    pub fingerprint: [u8; 16],
    /// When it was recorded, unix milliseconds.
    pub at_ms: u64,
    /// The first answer.
    pub outcome: StoredOutcome,
}

/// [`StoredOutcome`] as snapshot format 1 stored it (a SKU without its
/// sale window). Only for reading old snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredOutcomeV1 {
    /// [`StoredOutcome::Order`].
    Order(Order),
    /// [`StoredOutcome::Sku`], before sale windows.
    Sku(SkuViewV1),
    /// [`StoredOutcome::Refused`].
    Refused(Refusal),
}

/// [`StoredIdemRecord`] as snapshot format 1 stored it. Only for reading
/// old snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdemRecordV1 {
    user: UserId,
    key: IdempotencyKey,
    fingerprint: [u8; 16],
    at_ms: u64,
    outcome: StoredOutcomeV1,
}

impl From<StoredIdemRecordV1> for StoredIdemRecord {
    fn from(v: StoredIdemRecordV1) -> StoredIdemRecord {
        StoredIdemRecord {
            user: v.user,
            key: v.key,
            fingerprint: v.fingerprint,
            at_ms: v.at_ms,
            outcome: match v.outcome {
                StoredOutcomeV1::Order(order) => StoredOutcome::Order(Arc::new(order)),
                StoredOutcomeV1::Sku(sku) => StoredOutcome::Sku(sku.into()),
                StoredOutcomeV1::Refused(refusal) => StoredOutcome::Refused(refusal),
            },
        }
    }
}

impl StoredIdemRecord {
    /// The compact record, or `None` for a v1 refusal (v2 keeps none). The
    /// stored order *is* the first answer, so the reference taken from it
    /// renders that answer again.
    ///
    /// # Errors
    /// As [`Outcome::of_order`].
    pub fn into_hashed(self) -> Result<Option<HashedRecord>, DomainError> {
        let outcome = match self.outcome {
            StoredOutcome::Order(order) => Outcome::of_order(&order)?,
            StoredOutcome::Sku(sku) => Outcome::Sku(Box::new(sku)),
            StoredOutcome::Refused(_) => return Ok(None),
        };
        Ok(Some(HashedRecord {
            key: KeyHash::of(&self.user, &self.key),
            record: IdemRecord {
                fingerprint: self.fingerprint,
                at_ms: self.at_ms,
                outcome,
            },
        }))
    }
}

/// What a new keyed request finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No record: run the request.
    Fresh,
    /// The same request ran before: answer with its first outcome.
    Replay(Outcome),
    /// The key was used for a different request.
    Conflict,
}

type Records = DashMap<KeyHash, IdemRecord, BuildHasherDefault<KeyHasher>>;

/// How many time buckets [`IdemBook::oldest`] sorts records into.
const AGE_BUCKETS: usize = 1_024;

/// The idempotency records in memory: one per keyed change, unless it has
/// moved to disk (see the module doc). Never refuses a record.
#[derive(Debug, Default)]
pub struct IdemBook {
    records: Records,
}

impl IdemBook {
    /// What a request with this key and fingerprint should do, as far as
    /// memory knows (`Fresh` may still be on disk).
    pub fn lookup(&self, user: UserId, key: &IdempotencyKey, fingerprint: [u8; 16]) -> Lookup {
        self.lookup_hash(&KeyHash::of(&user, key), fingerprint)
    }

    /// [`IdemBook::lookup`] by the key's hash.
    pub fn lookup_hash(&self, key: &KeyHash, fingerprint: [u8; 16]) -> Lookup {
        match self.records.get(key) {
            None => Lookup::Fresh,
            Some(record) => record.lookup(fingerprint),
        }
    }

    /// How many records there are in memory.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Records the outcome of a stamped change. A record that exists is kept
    /// (the first answer wins), unless it had passed its TTL when this change
    /// was made: then the key was dropped and used again, as the live book
    /// does, and replay must end with the newer answer too.
    pub fn record(&self, stamp: &IdemStamp, at_ms: u64, outcome: Outcome) {
        let record = IdemRecord {
            fingerprint: stamp.fingerprint,
            at_ms,
            outcome,
        };
        self.insert(KeyHash::of(&stamp.user, &stamp.key), record);
    }

    fn insert(&self, key: KeyHash, record: IdemRecord) {
        match self.records.entry(key) {
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(record);
            }
            dashmap::Entry::Occupied(mut held) => {
                if record.at_ms.saturating_sub(held.get().at_ms) < IDEMPOTENCY_TTL_MS {
                    return;
                }
                held.insert(record);
            }
        }
    }

    /// Drops records older than the TTL; returns how many went.
    pub fn evict_expired(&self, now_ms: u64) -> usize {
        let before = self.records.len();
        self.records.retain(|_, record| !record.expired(now_ms));
        before.saturating_sub(self.records.len())
    }

    /// About the `count` oldest records, copied (to move them to disk).
    /// Three passes, no sort: the range of ages, then how many records
    /// fall in each of [`AGE_BUCKETS`] slices of it, then the records of
    /// the oldest slices up to `count`. Records recorded meanwhile may be
    /// missed or make the answer a little short; the caller asks again.
    pub fn oldest(&self, count: usize) -> Vec<HashedRecord> {
        if count == 0 {
            return Vec::new();
        }
        let mut range: Option<(u64, u64)> = None;
        for entry in self.records.iter() {
            let at = entry.value().at_ms;
            range = Some(range.map_or((at, at), |(lo, hi)| (lo.min(at), hi.max(at))));
        }
        let Some((lo, hi)) = range else {
            return Vec::new();
        };
        let span = u128::from(hi - lo) + 1;
        let bucket = |at_ms: u64| -> usize {
            let offset = u128::from(at_ms.saturating_sub(lo));
            // offset < span, so the quotient is below AGE_BUCKETS.
            usize::try_from(offset * AGE_BUCKETS as u128 / span)
                .unwrap_or(AGE_BUCKETS - 1)
                .min(AGE_BUCKETS - 1)
        };
        let mut counts = vec![0usize; AGE_BUCKETS];
        for entry in self.records.iter() {
            counts[bucket(entry.value().at_ms)] += 1;
        }
        // The last bucket taken, and how many of it fit.
        let mut taken = 0usize;
        let mut last = AGE_BUCKETS - 1;
        let mut room_in_last = usize::MAX;
        for (index, in_bucket) in counts.iter().enumerate() {
            if taken.saturating_add(*in_bucket) >= count {
                last = index;
                room_in_last = count - taken;
                break;
            }
            taken += in_bucket;
        }
        let mut out = Vec::with_capacity(count.min(self.records.len()));
        for entry in self.records.iter() {
            if out.len() >= count {
                break;
            }
            let b = bucket(entry.value().at_ms);
            if b > last {
                continue;
            }
            if b == last {
                if room_in_last == 0 {
                    continue;
                }
                room_in_last -= 1;
            }
            out.push(HashedRecord {
                key: *entry.key(),
                record: entry.value().clone(),
            });
        }
        out
    }

    /// Drops the records that moved to disk, each only if memory still
    /// holds it exactly as written; returns how many went.
    pub fn remove_moved(&self, moved: &[HashedRecord]) -> usize {
        moved
            .iter()
            .filter(|m| {
                self.records
                    .remove_if(&m.key, |_, held| *held == m.record)
                    .is_some()
            })
            .count()
    }

    /// Every record with its key, sorted by key (for snapshots and
    /// comparisons).
    pub fn to_sorted_vec(&self) -> Vec<HashedRecord> {
        let mut all: Vec<HashedRecord> = self
            .records
            .iter()
            .map(|r| HashedRecord {
                key: *r.key(),
                record: r.value().clone(),
            })
            .collect();
        all.sort_by_key(|a| a.key);
        all
    }

    /// Every record as a snapshot stores it, sorted by key.
    pub fn to_snapshot(&self) -> Vec<HashedRecord> {
        self.to_sorted_vec()
    }

    /// Builds a book from a snapshot's records.
    pub fn from_snapshot(records: impl IntoIterator<Item = HashedRecord>) -> IdemBook {
        let book = IdemBook::default();
        for hashed in records {
            book.insert(hashed.key, hashed.record);
        }
        book
    }

    /// Builds a book from the records of a snapshot written before the
    /// compact records, dropping the refusals a v1 snapshot may hold.
    ///
    /// # Errors
    /// As [`StoredIdemRecord::into_hashed`].
    pub fn from_stored(
        records: impl IntoIterator<Item = StoredIdemRecord>,
    ) -> Result<IdemBook, DomainError> {
        let book = IdemBook::default();
        for stored in records {
            if let Some(hashed) = stored.into_hashed()? {
                book.insert(hashed.key, hashed.record);
            }
        }
        Ok(book)
    }
}

impl PartialEq for IdemBook {
    fn eq(&self, other: &IdemBook) -> bool {
        self.to_sorted_vec() == other.to_sorted_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::sku::SkuView;
    use crate::domain::{SkuId, StockLevels};

    fn stamp(key: &str, fp: u8) -> IdemStamp {
        IdemStamp {
            user: UserId::parse("u").expect("valid"),
            key: IdempotencyKey::parse(key).expect("valid"),
            fingerprint: [fp; 16],
        }
    }

    fn view(price: u64) -> SkuView {
        SkuView {
            sku: SkuId::parse("s").expect("valid"),
            name: "S".into(),
            price_cents: price,
            per_user_limit: None,
            sale: crate::domain::sale::SaleWindow::default(),
            levels: StockLevels::new(1),
        }
    }

    fn outcome(price: u64) -> Outcome {
        Outcome::Sku(Box::new(view(price)))
    }

    fn order_outcome(id: u64) -> Outcome {
        Outcome::Order {
            id: OrderId(id),
            history_len: 1,
        }
    }

    #[test]
    fn a_record_is_small() {
        // The map holds (KeyHash, IdemRecord): 16 + 40 bytes a record, plus
        // the table's control byte and slack.
        assert_eq!(std::mem::size_of::<Outcome>(), 16);
        assert_eq!(std::mem::size_of::<IdemRecord>(), 40);
        assert_eq!(std::mem::size_of::<(KeyHash, IdemRecord)>(), 56);
    }

    #[test]
    fn the_key_hash_is_stable_and_separates_user_from_key() {
        let user = UserId::parse("ab").expect("valid");
        let key = IdempotencyKey::parse("c").expect("valid");
        let other_user = UserId::parse("a").expect("valid");
        let other_key = IdempotencyKey::parse("bc").expect("valid");
        assert_ne!(
            KeyHash::of(&user, &key),
            KeyHash::of(&other_user, &other_key)
        );
        // Written to snapshots and to disk: it must never change. The bytes
        // are the first 16 of `sha256sum` over "flashcore.idempotency.v1\0ab\0c",
        // computed outside this code.
        assert_eq!(
            KeyHash::of(&user, &key).0,
            [
                0x16, 0x32, 0xf5, 0x9b, 0x84, 0xc7, 0x1d, 0x00, 0xa5, 0xfb, 0xda, 0x2a, 0xfc, 0x05,
                0x56, 0x9c
            ]
        );
    }

    #[test]
    fn the_first_answer_wins_and_a_different_request_conflicts() {
        let book = IdemBook::default();
        let s = stamp("k", 1);
        assert_eq!(book.lookup(s.user, &s.key, s.fingerprint), Lookup::Fresh);
        book.record(&s, 10, outcome(1));
        book.record(&s, 11, outcome(2));
        assert_eq!(
            book.lookup(s.user, &s.key, s.fingerprint),
            Lookup::Replay(outcome(1))
        );
        assert_eq!(book.lookup(s.user, &s.key, [2; 16]), Lookup::Conflict);
        let other_user = UserId::parse("v").expect("valid");
        assert_eq!(
            book.lookup(other_user, &s.key, s.fingerprint),
            Lookup::Fresh
        );
    }

    #[test]
    fn old_snapshot_records_load_compact_without_their_refusals() {
        let s = stamp("c", 1);
        let change = StoredIdemRecord {
            user: s.user,
            key: s.key.clone(),
            fingerprint: s.fingerprint,
            at_ms: 1,
            outcome: StoredOutcome::Sku(view(1)),
        };
        let refused = StoredIdemRecord {
            key: IdempotencyKey::parse("r").expect("valid"),
            outcome: StoredOutcome::Refused(Refusal {
                status: 409,
                code: "out_of_stock".into(),
                message: "gone".into(),
            }),
            ..change.clone()
        };
        let book = IdemBook::from_stored([refused, change]).expect("loads");
        assert_eq!(book.len(), 1);
        assert_eq!(
            book.lookup(s.user, &s.key, s.fingerprint),
            Lookup::Replay(outcome(1))
        );
    }

    #[test]
    fn records_live_at_least_the_ttl() {
        let book = IdemBook::default();
        book.record(&stamp("old", 1), 0, outcome(1));
        book.record(&stamp("new", 1), IDEMPOTENCY_TTL_MS, outcome(1));
        assert_eq!(book.evict_expired(IDEMPOTENCY_TTL_MS), 0);
        assert_eq!(book.evict_expired(IDEMPOTENCY_TTL_MS + 1), 1);
        assert_eq!(book.len(), 1);
    }

    #[test]
    fn a_key_used_again_after_its_ttl_keeps_the_newer_answer() {
        // Replay meets both records of a key the live book dropped after its
        // TTL and was then given again: the newer one must win, as it did live.
        let book = IdemBook::default();
        let s = stamp("k", 1);
        book.record(&s, 5, outcome(1));
        book.record(&s, 5 + IDEMPOTENCY_TTL_MS - 1, outcome(2));
        assert_eq!(
            book.lookup(s.user, &s.key, s.fingerprint),
            Lookup::Replay(outcome(1)),
            "within the TTL the first answer stays"
        );
        book.record(&s, 5 + IDEMPOTENCY_TTL_MS, outcome(3));
        assert_eq!(
            book.lookup(s.user, &s.key, s.fingerprint),
            Lookup::Replay(outcome(3))
        );
        assert_eq!(book.evict_expired(5 + IDEMPOTENCY_TTL_MS + 10), 0);
    }

    #[test]
    fn the_oldest_records_are_picked_and_moved_only_if_unchanged() {
        let book = IdemBook::default();
        // Recorded out of order: ages, not insertion, decide.
        for i in [7u64, 3, 9, 1, 5, 8, 2, 6, 4, 0] {
            book.record(
                &stamp(&format!("k{i}"), 1),
                1_000 + i * 10,
                order_outcome(i),
            );
        }
        let mut picked: Vec<u64> = book
            .oldest(4)
            .iter()
            .map(|h| (h.record.at_ms - 1_000) / 10)
            .collect();
        picked.sort_unstable();
        assert_eq!(picked, [0, 1, 2, 3]);
        assert_eq!(book.oldest(100).len(), 10);
        assert!(book.oldest(0).is_empty());

        let moved = book.oldest(4);
        // One of them is recorded again after its TTL: memory's copy is newer.
        let again = moved
            .iter()
            .find(|h| h.record.at_ms == 1_000)
            .expect("the oldest is picked")
            .clone();
        book.record(
            &stamp("k0", 1),
            1_000 + IDEMPOTENCY_TTL_MS,
            order_outcome(99),
        );
        assert_eq!(book.remove_moved(&moved), 3, "the changed record stays");
        assert_eq!(book.len(), 7);
        assert_eq!(
            book.lookup_hash(&again.key, [1; 16]),
            Lookup::Replay(order_outcome(99))
        );
    }

    #[test]
    fn a_reference_renders_the_order_as_it_was() {
        use crate::domain::order::ReservedLine;
        let order = Order::place(
            OrderId(3),
            UserId::parse("u").expect("valid"),
            vec![ReservedLine {
                sku: SkuId::parse("s").expect("valid"),
                name: "S".into(),
                qty: 1,
                unit_price_cents: 10,
            }],
            None,
            1,
            100,
        )
        .expect("placed");
        let placed = Outcome::of_order(&order).expect("small");
        assert_eq!(placed, order_outcome(3));
        assert_eq!(
            placed.render(Some(&order)),
            Ok(FirstAnswer::Order(Arc::new(order.clone())))
        );
        assert!(placed.render(None).is_err());
        let mut other = order.clone();
        other.id = OrderId(4);
        assert!(placed.render(Some(&other)).is_err());
        assert_eq!(outcome(1).render(None), Ok(FirstAnswer::Sku(view(1))));
    }
}
