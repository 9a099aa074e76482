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
//! A record is small (56 bytes in its part's map and a 20-byte entry in its
//! part's time queue, see `benches/memory.rs`):
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
//! The book is shared by every actor that applies stamped events, hence
//! its parts, each a map and a time queue under its own lock
//! (`idem_part.rs`). No sweep scans the book under a lock: the TTL
//! eviction, the snapshot's copy and the pick of the oldest records walk
//! each part's queue from its oldest end, a bounded slice under the lock at
//! a time ([`IDEMPOTENCY_SWEEP_SLICE_ENTRIES`]), so a `record` on an actor
//! thread never waits long for one. It has no bound that refuses a key: the engine moves the
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

use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::idem_part::Part;
use crate::domain::order::Order;
use crate::domain::sku::{SkuView, SkuViewV1};
use crate::domain::{DomainError, IdemStamp, IdempotencyKey, OrderId, UserId};
use crate::limits::{IDEMPOTENCY_BOOK_PARTS, IDEMPOTENCY_SWEEP_SLICE_ENTRIES, IDEMPOTENCY_TTL_MS};

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

/// The idempotency records in memory: one per keyed change, unless it has
/// moved to disk (see the module doc). Never refuses a record.
///
/// Split into [`IDEMPOTENCY_BOOK_PARTS`] parts by key, each under its own
/// lock (`idem_part.rs`): a lookup or a `record` locks one part, and every
/// sweep (the TTL eviction, the snapshot's copy, the pick of the oldest
/// records) walks the parts one after another in slices of at most
/// [`IDEMPOTENCY_SWEEP_SLICE_ENTRIES`] entries, releasing the lock between
/// slices. No sweep holds a lock the request path takes for longer than one
/// slice, however large the book.
pub struct IdemBook {
    parts: Box<[RwLock<Part>]>,
}

impl Default for IdemBook {
    fn default() -> IdemBook {
        IdemBook {
            parts: (0..IDEMPOTENCY_BOOK_PARTS)
                .map(|_| RwLock::new(Part::default()))
                .collect(),
        }
    }
}

impl std::fmt::Debug for IdemBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdemBook")
            .field("records", &self.to_sorted_vec())
            .finish()
    }
}

// A part is picked by one byte of the key's hash.
const _: () = assert!(IDEMPOTENCY_BOOK_PARTS.is_power_of_two() && IDEMPOTENCY_BOOK_PARTS <= 256);

/// A part, read. A part's every step leaves it whole (a record is queued
/// before it is inserted, dropped before its entry is popped), so one a
/// panic poisoned is used as it is.
fn read(part: &RwLock<Part>) -> RwLockReadGuard<'_, Part> {
    part.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A part, written; see [`read`].
fn write(part: &RwLock<Part>) -> RwLockWriteGuard<'_, Part> {
    part.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How many slices of at most [`IDEMPOTENCY_SWEEP_SLICE_ENTRIES`] walk
/// `entries`, plus one (for the slice that finds the walk over).
fn slices_for(entries: u64) -> u64 {
    entries
        .div_ceil(IDEMPOTENCY_SWEEP_SLICE_ENTRIES as u64)
        .saturating_add(1)
}

impl IdemBook {
    /// The part that holds `key`. Byte 8 of the hash: the part's map hashes
    /// with bytes 0 to 7 ([`KeyHasher`]), so both spread independently.
    fn part(&self, key: &KeyHash) -> &RwLock<Part> {
        &self.parts[usize::from(key.0[8]) % IDEMPOTENCY_BOOK_PARTS]
    }

    /// What a request with this key and fingerprint should do, as far as
    /// memory knows (`Fresh` may still be on disk).
    pub fn lookup(&self, user: UserId, key: &IdempotencyKey, fingerprint: [u8; 16]) -> Lookup {
        self.lookup_hash(&KeyHash::of(&user, key), fingerprint)
    }

    /// [`IdemBook::lookup`] by the key's hash.
    pub fn lookup_hash(&self, key: &KeyHash, fingerprint: [u8; 16]) -> Lookup {
        match read(self.part(key)).get(key) {
            None => Lookup::Fresh,
            Some(record) => record.lookup(fingerprint),
        }
    }

    /// How many records there are in memory.
    pub fn len(&self) -> usize {
        self.parts.iter().map(|part| read(part).len()).sum()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.parts.iter().all(|part| read(part).len() == 0)
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
        write(self.part(&key)).insert(key, record);
    }

    /// Drops records older than the TTL; returns how many went. Each part
    /// from the front of its queue, a slice under its lock at a time, up to
    /// its first record not yet expired (see `idem_part.rs`: a record
    /// recorded out of time order goes when the ones before it have).
    pub fn evict_expired(&self, now_ms: u64) -> usize {
        let mut evicted = 0usize;
        for part in self.parts.iter() {
            // Bounded by what was queued at the start: a record recorded
            // meanwhile is fresh, so the walk stops at it.
            let slices_max = slices_for(read(part).queue().len() as u64);
            for _ in 0..slices_max {
                let slice = write(part).evict_slice(now_ms, IDEMPOTENCY_SWEEP_SLICE_ENTRIES);
                evicted = evicted.saturating_add(slice.records);
                if slice.done {
                    break;
                }
                // Let a `record` waiting on the lock have it: a writer
                // that unlocks may take the lock again before the woken
                // waiter runs.
                std::thread::yield_now();
            }
        }
        evicted
    }

    /// Copies up to `records_max` records of `part` from position `*pos`
    /// up to `end_pos`, a slice at a time; `*pos` moves on to where the
    /// copy stopped. Returns how many it copied.
    fn copy_part(
        part: &RwLock<Part>,
        pos: &mut u64,
        end_pos: u64,
        records_max: usize,
        out: &mut Vec<HashedRecord>,
    ) -> usize {
        let mut copied = 0usize;
        let slices_max = slices_for(end_pos.saturating_sub(*pos));
        for _ in 0..slices_max {
            if *pos >= end_pos || copied >= records_max {
                break;
            }
            // Room first, with no lock held: growing a vector of a million
            // records copies it, which must not happen under the lock.
            out.reserve(IDEMPOTENCY_SWEEP_SLICE_ENTRIES.min(records_max - copied));
            let slice = read(part).copy_slice(
                *pos,
                end_pos,
                IDEMPOTENCY_SWEEP_SLICE_ENTRIES,
                records_max - copied,
                out,
            );
            *pos = slice.next_pos;
            copied = copied.saturating_add(slice.records);
            if slice.done {
                break;
            }
            // No yield: a read lock is not taken while a writer waits
            // (std's lock on Linux), so a waiting `record` goes first.
        }
        copied
    }

    /// Where each part's queue starts and ends now: the cursors of a walk
    /// over the records held at this moment.
    fn cursors(&self) -> Vec<(u64, u64)> {
        self.parts
            .iter()
            .map(|part| {
                let part = read(part);
                (part.queue().front_pos(), part.queue().end_pos())
            })
            .collect()
    }

    /// About the `count` oldest records, copied (to move them to disk).
    /// No sort of the book: twice `count` candidates are copied from the
    /// fronts of the parts' queues (an even share from each, and again
    /// among the parts that had more while some had fewer), a slice under
    /// a lock at a time, and the oldest `count` of them kept. Keys spread
    /// evenly over the parts, so a part's share of the oldest records is
    /// close to `count / parts`, well within twice that. Records recorded
    /// meanwhile may be missed or make the answer a little short; the
    /// caller asks again.
    pub fn oldest(&self, count: usize) -> Vec<HashedRecord> {
        if count == 0 {
            return Vec::new();
        }
        let wanted = count.saturating_mul(2);
        let mut cursors = self.cursors();
        let mut out = Vec::with_capacity(wanted.min(self.len()));
        // Each round ends with `wanted` records or with at least one part
        // walked to its end, so there are at most as many as parts.
        for _ in 0..=IDEMPOTENCY_BOOK_PARTS {
            let open = cursors.iter().filter(|(pos, end)| pos < end).count();
            let need = wanted.saturating_sub(out.len());
            if need == 0 || open == 0 {
                break;
            }
            let quota = need.div_ceil(open);
            for (part, (pos, end)) in self.parts.iter().zip(cursors.iter_mut()) {
                let room = wanted.saturating_sub(out.len()).min(quota);
                if *pos < *end && room > 0 {
                    IdemBook::copy_part(part, pos, *end, room, &mut out);
                }
            }
        }
        // Candidates only, with no lock held.
        out.sort_unstable_by_key(|hashed| (hashed.record.at_ms, hashed.key));
        out.truncate(count);
        out
    }

    /// Drops the records that moved to disk, each only if memory still
    /// holds it exactly as written; returns how many went.
    pub fn remove_moved(&self, moved: &[HashedRecord]) -> usize {
        let mut removed = 0usize;
        let mut touched = vec![0u64; IDEMPOTENCY_BOOK_PARTS];
        for hashed in moved {
            let index = usize::from(hashed.key.0[8]) % IDEMPOTENCY_BOOK_PARTS;
            if write(&self.parts[index]).remove_if_same(hashed) {
                removed += 1;
                touched[index] = touched[index].saturating_add(1);
            }
        }
        // The moved records were at the queues' fronts: pop their stale
        // entries now rather than have every walk step over them.
        for (part, dropped) in self.parts.iter().zip(touched) {
            if dropped == 0 {
                continue;
            }
            for _ in 0..slices_for(dropped) {
                if write(part).trim_slice(IDEMPOTENCY_SWEEP_SLICE_ENTRIES).done {
                    break;
                }
                std::thread::yield_now();
            }
        }
        removed
    }

    /// Every record with its key, sorted by key (for snapshots and
    /// comparisons). Copied part after part, a slice under a lock at a
    /// time, then sorted with no lock held.
    ///
    /// Holds every record held when the copy began and not dropped,
    /// moved or replaced before the copy reached it; records recorded
    /// meanwhile may be in it or not. So a snapshot's copy, made after its
    /// parts, holds the record of every event they hold (replay brings
    /// the rest), except those that expired or went to disk meanwhile.
    pub fn to_sorted_vec(&self) -> Vec<HashedRecord> {
        let mut all = Vec::with_capacity(self.len());
        for (part, (mut pos, end)) in self.parts.iter().zip(self.cursors()) {
            IdemBook::copy_part(part, &mut pos, end, usize::MAX, &mut all);
        }
        all.sort_unstable_by_key(|hashed| hashed.key);
        // A key has one record; a duplicate entry (see `idem_part.rs`)
        // copied it twice.
        all.dedup_by_key(|hashed| hashed.key);
        all
    }

    /// Every record as a snapshot stores it, sorted by key.
    pub fn to_snapshot(&self) -> Vec<HashedRecord> {
        self.to_sorted_vec()
    }

    /// Builds a book from a snapshot's records. They are inserted oldest
    /// first (a snapshot sorts them by key), so the queues are in time
    /// order.
    pub fn from_snapshot(records: impl IntoIterator<Item = HashedRecord>) -> IdemBook {
        let mut records: Vec<HashedRecord> = records.into_iter().collect();
        records.sort_unstable_by_key(|hashed| (hashed.record.at_ms, hashed.key));
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
        let mut hashed = Vec::new();
        for stored in records {
            if let Some(record) = stored.into_hashed()? {
                hashed.push(record);
            }
        }
        Ok(IdemBook::from_snapshot(hashed))
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
        // Recorded in time order, as live records are: about 40 a part.
        let book = IdemBook::default();
        let n = 40 * IDEMPOTENCY_BOOK_PARTS as u64;
        for i in 0..n {
            book.record(&stamp(&format!("k{i}"), 1), 1_000 + i, order_outcome(i));
        }
        let count = n as usize / 4;
        let moved = book.oldest(count);
        assert_eq!(moved.len(), count);
        let mut keys: Vec<KeyHash> = moved.iter().map(|h| h.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), count, "no record twice");
        // The oldest quarter exactly: a part's share of it (10 on average,
        // 14 in the largest part here) is within the 20 candidates it gives.
        assert!(moved.iter().all(|h| h.record.at_ms < 1_000 + count as u64));
        assert_eq!(book.oldest(usize::MAX).len(), n as usize, "all of them");
        assert!(book.oldest(0).is_empty());

        // One of them is recorded again after its TTL: memory's copy is newer.
        let again = moved[0].clone();
        let i = again.record.at_ms - 1_000;
        book.record(
            &stamp(&format!("k{i}"), 1),
            again.record.at_ms + IDEMPOTENCY_TTL_MS,
            order_outcome(99),
        );
        assert_eq!(
            book.remove_moved(&moved),
            count - 1,
            "the changed record stays"
        );
        assert_eq!(book.len(), n as usize - (count - 1));
        assert_eq!(
            book.lookup_hash(&again.key, [1; 16]),
            Lookup::Replay(order_outcome(99))
        );
        // The next pick takes the next oldest, not the moved ones again.
        let next = book.oldest(count);
        assert_eq!(next.len(), count);
        assert!(next.iter().all(|h| !moved[1..].contains(h)));
    }

    #[test]
    fn a_snapshot_round_trip_keeps_the_book_and_its_time_order() {
        let book = IdemBook::default();
        for i in 0..1_000u64 {
            book.record(&stamp(&format!("k{i}"), 1), i * 10, order_outcome(i));
        }
        let snapshot = book.to_snapshot();
        assert!(snapshot.windows(2).all(|w| w[0].key < w[1].key), "by key");
        let loaded = IdemBook::from_snapshot(snapshot);
        assert_eq!(loaded, book);
        // Loaded oldest first: the eviction drops exactly the expired ones.
        assert_eq!(loaded.evict_expired(IDEMPOTENCY_TTL_MS + 5_000), 500);
        assert_eq!(loaded.len(), 500);
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

    /// One step of the model test.
    #[derive(Debug, Clone)]
    enum Step {
        /// Time moves on by this much, then a change under the key is recorded.
        Record {
            key: u8,
            fp: u8,
            advance_ms: u64,
        },
        Lookup {
            key: u8,
            fp: u8,
        },
        /// Time moves on by this much, then the expired records are dropped.
        Evict {
            advance_ms: u64,
        },
        /// The oldest `count` records move to disk and leave memory.
        Spill {
            count: usize,
        },
        /// The book goes through a snapshot and back.
        Reload,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        let advance = prop_oneof![
            Just(0u64),
            1u64..1_000,
            Just(IDEMPOTENCY_TTL_MS / 3),
            Just(IDEMPOTENCY_TTL_MS),
        ];
        prop_oneof![
            4 => (0u8..24, 0u8..2, advance.clone())
                .prop_map(|(key, fp, advance_ms)| Step::Record { key, fp, advance_ms }),
            3 => (0u8..24, 0u8..2).prop_map(|(key, fp)| Step::Lookup { key, fp }),
            1 => advance.prop_map(|advance_ms| Step::Evict { advance_ms }),
            1 => (0usize..12).prop_map(|count| Step::Spill { count }),
            1 => Just(Step::Reload),
        ]
    }

    /// The model: a sorted map, the insert rule written out, eviction by a
    /// full scan.
    fn model_insert(
        model: &mut std::collections::BTreeMap<KeyHash, IdemRecord>,
        key: KeyHash,
        record: IdemRecord,
    ) {
        match model.get(&key) {
            Some(held) if record.at_ms.saturating_sub(held.at_ms) < IDEMPOTENCY_TTL_MS => {}
            _ => {
                model.insert(key, record);
            }
        }
    }

    fn key_of(key: u8) -> (IdemStamp, KeyHash) {
        let s = stamp(&format!("k{key}"), 0);
        let hash = KeyHash::of(&s.user, &s.key);
        (s, hash)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        #[test]
        fn the_book_agrees_with_a_model(steps in proptest::collection::vec(step(), 1..80)) {
            use proptest::prelude::*;
            let mut book = IdemBook::default();
            let mut model = std::collections::BTreeMap::new();
            let mut now_ms = 1_000u64;
            let mut serial = 0u64;
            for step in steps {
                match step {
                    Step::Record { key, fp, advance_ms } => {
                        now_ms += advance_ms;
                        serial += 1;
                        let (mut s, hash) = key_of(key);
                        s.fingerprint = [fp; 16];
                        book.record(&s, now_ms, order_outcome(serial));
                        model_insert(&mut model, hash, IdemRecord {
                            fingerprint: [fp; 16],
                            at_ms: now_ms,
                            outcome: order_outcome(serial),
                        });
                    }
                    Step::Lookup { key, fp } => {
                        let (s, hash) = key_of(key);
                        let expected = model
                            .get(&hash)
                            .map_or(Lookup::Fresh, |r: &IdemRecord| r.lookup([fp; 16]));
                        prop_assert_eq!(book.lookup(s.user, &s.key, [fp; 16]), expected);
                    }
                    Step::Evict { advance_ms } => {
                        now_ms += advance_ms;
                        let before = model.len();
                        model.retain(|_, r: &mut IdemRecord| !r.expired(now_ms));
                        prop_assert_eq!(book.evict_expired(now_ms), before - model.len());
                    }
                    Step::Spill { count } => {
                        let moved = book.oldest(count);
                        prop_assert_eq!(moved.len(), count.min(model.len()));
                        for hashed in &moved {
                            prop_assert_eq!(model.get(&hashed.key), Some(&hashed.record));
                        }
                        prop_assert_eq!(book.remove_moved(&moved), moved.len());
                        for hashed in &moved {
                            model.remove(&hashed.key);
                        }
                    }
                    Step::Reload => {
                        book = IdemBook::from_snapshot(book.to_snapshot());
                    }
                }
                prop_assert_eq!(book.len(), model.len());
                let held: Vec<HashedRecord> = model
                    .iter()
                    .map(|(key, record)| HashedRecord { key: *key, record: record.clone() })
                    .collect();
                prop_assert_eq!(book.to_sorted_vec(), held);
            }
        }
    }

    #[test]
    fn records_raced_against_sweeps_are_never_lost() {
        use std::collections::HashMap;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Barrier, Mutex};

        const WRITERS: usize = 3;
        const PER_WRITER: usize = 20_000;
        const OLD: usize = 30_000;
        let now_ms = 10 * IDEMPOTENCY_TTL_MS;
        let user = UserId::parse("u").expect("valid");
        let hash = |writer: usize, i: usize| {
            let key = IdempotencyKey::parse(&format!("w{writer}-{i}")).expect("valid");
            KeyHash::of(&user, &key)
        };
        let book = IdemBook::default();
        for i in 0..OLD {
            book.insert(
                hash(9, i),
                IdemRecord {
                    fingerprint: [9; 16],
                    at_ms: 0,
                    outcome: order_outcome(i as u64),
                },
            );
        }
        let progress: Vec<AtomicUsize> = (0..WRITERS).map(|_| AtomicUsize::new(0)).collect();
        let disk: Mutex<HashMap<KeyHash, IdemRecord>> = Mutex::new(HashMap::new());
        let stop = AtomicBool::new(false);
        let start = Barrier::new(WRITERS + 1);
        let mut copies = 0usize;
        std::thread::scope(|scope| {
            for (writer, done) in progress.iter().enumerate() {
                let (book, start) = (&book, &start);
                scope.spawn(move || {
                    start.wait();
                    for i in 0..PER_WRITER {
                        let s = IdemStamp {
                            user,
                            key: IdempotencyKey::parse(&format!("w{writer}-{i}")).expect("valid"),
                            fingerprint: [1; 16],
                        };
                        book.record(&s, now_ms, order_outcome(i as u64));
                        done.store(i + 1, Ordering::SeqCst);
                    }
                });
            }
            start.wait();
            while !stop.load(Ordering::SeqCst) {
                let all_done = progress
                    .iter()
                    .all(|p| p.load(Ordering::SeqCst) == PER_WRITER);
                // A spill: the oldest go to "disk" first, then leave memory.
                let moved = book.oldest(2_000);
                disk.lock()
                    .expect("no panic holds it")
                    .extend(moved.iter().map(|h| (h.key, h.record.clone())));
                book.remove_moved(&moved);
                book.evict_expired(now_ms);
                // Every record recorded before the copy began is in it or on disk.
                let seen: Vec<usize> = progress.iter().map(|p| p.load(Ordering::SeqCst)).collect();
                let copy = book.to_snapshot();
                copies += 1;
                let disk = disk.lock().expect("no panic holds it");
                for (writer, upto) in seen.into_iter().enumerate() {
                    for i in 0..upto {
                        let key = hash(writer, i);
                        let in_copy = copy.binary_search_by_key(&key, |h| h.key).is_ok();
                        assert!(
                            in_copy || disk.contains_key(&key),
                            "copy {copies}: record {i} of writer {writer} lost"
                        );
                    }
                }
                if all_done {
                    stop.store(true, Ordering::SeqCst);
                }
            }
        });
        assert!(copies >= 1);
        book.evict_expired(now_ms);
        let disk = disk.into_inner().expect("no panic holds it");
        let mut fresh_in_memory = 0;
        for writer in 0..WRITERS {
            for i in 0..PER_WRITER {
                let key = hash(writer, i);
                match book.lookup_hash(&key, [1; 16]) {
                    Lookup::Replay(outcome) => {
                        assert_eq!(outcome, order_outcome(i as u64));
                        fresh_in_memory += 1;
                    }
                    Lookup::Fresh => assert!(disk.contains_key(&key), "{writer}/{i} lost"),
                    Lookup::Conflict => panic!("{writer}/{i} changed"),
                }
            }
        }
        assert_eq!(book.len(), fresh_in_memory, "no expired record is left");
        assert_eq!(book.evict_expired(now_ms), 0);
    }
}
