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
//! v1 kept refusals too. Its journal records ([`Event::IdempotentRefusal`])
//! and the refusals in its snapshots ([`StoredOutcome::Refused`]) still decode;
//! replay ignores the former and [`IdemBook::from_snapshot`] drops the latter.
//!
//! The book is shared by every actor that applies stamped events, hence the
//! concurrent map; it is bounded by [`IDEMPOTENCY_RECORDS_MAX`] and records
//! older than [`IDEMPOTENCY_TTL_MS`] are dropped.
//!
//! [`Event::IdempotentRefusal`]: crate::domain::Event::IdempotentRefusal

use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::domain::order::Order;
use crate::domain::sku::{SkuView, SkuViewV1};
use crate::domain::{IdemStamp, IdempotencyKey, UserId};
use crate::limits::{IDEMPOTENCY_RECORDS_MAX, IDEMPOTENCY_TTL_MS};

/// The first answer to a keyed change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// An order, as it was right after the change: shared with the order
    /// book until the order changes again (the book then copies it), so a
    /// record costs no copy of the order and copying the book is cheap.
    Order(Arc<Order>),
    /// A SKU, as it was right after the change.
    Sku(SkuView),
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

/// One key's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdemRecord {
    /// The key's scope.
    pub user: UserId,
    /// The key.
    pub key: IdempotencyKey,
    /// The first request's fingerprint.
    pub fingerprint: [u8; 16],
    /// When it was recorded, unix milliseconds.
    pub at_ms: u64,
    /// The first answer.
    pub outcome: Outcome,
}

/// A record's outcome as snapshots store it. Append-only, like the event
/// enum: a variant's index is its encoding, and v1 snapshots hold refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredOutcome {
    /// [`Outcome::Order`] (serialised as the order itself).
    Order(Arc<Order>),
    /// [`Outcome::Sku`].
    Sku(SkuView),
    /// A refusal, written by v1 only; dropped when loaded.
    Refused(Refusal),
}

/// One key's record as snapshots store it (the shape of [`IdemRecord`],
/// with a [`StoredOutcome`]).
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

impl From<IdemRecord> for StoredIdemRecord {
    fn from(record: IdemRecord) -> StoredIdemRecord {
        StoredIdemRecord {
            user: record.user,
            key: record.key,
            fingerprint: record.fingerprint,
            at_ms: record.at_ms,
            outcome: match record.outcome {
                Outcome::Order(order) => StoredOutcome::Order(order),
                Outcome::Sku(sku) => StoredOutcome::Sku(sku),
            },
        }
    }
}

impl StoredIdemRecord {
    /// The live record, or `None` for a v1 refusal (v2 keeps none).
    pub fn into_record(self) -> Option<IdemRecord> {
        let outcome = match self.outcome {
            StoredOutcome::Order(order) => Outcome::Order(order),
            StoredOutcome::Sku(sku) => Outcome::Sku(sku),
            StoredOutcome::Refused(_) => return None,
        };
        Some(IdemRecord {
            user: self.user,
            key: self.key,
            fingerprint: self.fingerprint,
            at_ms: self.at_ms,
            outcome,
        })
    }
}

/// What a new keyed request finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// No record: run the request.
    Fresh,
    /// The same request ran before: answer with its first outcome.
    Replay(Box<Outcome>),
    /// The key was used for a different request.
    Conflict,
}

/// Every idempotency record: one per keyed change.
///
/// Bounded at [`IDEMPOTENCY_RECORDS_MAX`]: a new key is taken only while
/// there is room ([`IdemBook::has_room`]); a record is never dropped to make
/// room, since its loss could let a change run twice.
#[derive(Debug)]
pub struct IdemBook {
    records: DashMap<(UserId, IdempotencyKey), IdemRecord>,
    /// The bound ([`IDEMPOTENCY_RECORDS_MAX`]; smaller in tests).
    max: usize,
}

impl Default for IdemBook {
    fn default() -> IdemBook {
        IdemBook::bounded(IDEMPOTENCY_RECORDS_MAX)
    }
}

impl IdemBook {
    /// What a request with this key and fingerprint should do.
    pub fn lookup(&self, user: UserId, key: &IdempotencyKey, fingerprint: [u8; 16]) -> Lookup {
        match self.records.get(&(user, key.clone())) {
            None => Lookup::Fresh,
            Some(record) if record.fingerprint == fingerprint => {
                Lookup::Replay(Box::new(record.outcome.clone()))
            }
            Some(_) => Lookup::Conflict,
        }
    }

    /// An empty book holding at most `max` records.
    pub fn bounded(max: usize) -> IdemBook {
        IdemBook {
            records: DashMap::new(),
            max,
        }
    }

    /// Whether a new key can be taken: the book is below its bound.
    pub fn has_room(&self) -> bool {
        self.records.len() < self.max
    }

    /// How many records there are.
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
            user: stamp.user,
            key: stamp.key.clone(),
            fingerprint: stamp.fingerprint,
            at_ms,
            outcome,
        };
        match self.records.entry((stamp.user, stamp.key.clone())) {
            dashmap::Entry::Vacant(vacant) => {
                vacant.insert(record);
            }
            dashmap::Entry::Occupied(mut held) => {
                if at_ms.saturating_sub(held.get().at_ms) < IDEMPOTENCY_TTL_MS {
                    return;
                }
                held.insert(record);
            }
        }
    }

    /// Drops records older than the TTL; returns how many went.
    pub fn evict_expired(&self, now_ms: u64) -> usize {
        let cutoff = now_ms.saturating_sub(IDEMPOTENCY_TTL_MS);
        let before = self.records.len();
        self.records.retain(|_, record| record.at_ms >= cutoff);
        before.saturating_sub(self.records.len())
    }

    /// Every record, sorted by user and key (for snapshots and comparisons).
    pub fn to_sorted_vec(&self) -> Vec<IdemRecord> {
        let mut all: Vec<IdemRecord> = self.records.iter().map(|r| r.value().clone()).collect();
        all.sort_by(|a, b| (a.user, &a.key).cmp(&(b.user, &b.key)));
        all
    }

    /// Every record as a snapshot stores it, sorted by user and key.
    pub fn to_snapshot(&self) -> Vec<StoredIdemRecord> {
        self.to_sorted_vec()
            .into_iter()
            .map(StoredIdemRecord::from)
            .collect()
    }

    /// Builds a book from a snapshot's records, dropping the refusals a v1
    /// snapshot may hold.
    pub fn from_snapshot(records: impl IntoIterator<Item = StoredIdemRecord>) -> IdemBook {
        let book = IdemBook::default();
        for record in records
            .into_iter()
            .filter_map(StoredIdemRecord::into_record)
        {
            book.records
                .insert((record.user, record.key.clone()), record);
        }
        book
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

    fn outcome(price: u64) -> Outcome {
        Outcome::Sku(SkuView {
            sku: SkuId::parse("s").expect("valid"),
            name: "S".into(),
            price_cents: price,
            per_user_limit: None,
            sale: crate::domain::sale::SaleWindow::default(),
            levels: StockLevels::new(1),
        })
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
            Lookup::Replay(Box::new(outcome(1)))
        );
        assert_eq!(book.lookup(s.user, &s.key, [2; 16]), Lookup::Conflict);
        let other_user = UserId::parse("v").expect("valid");
        assert_eq!(
            book.lookup(other_user, &s.key, s.fingerprint),
            Lookup::Fresh
        );
    }

    #[test]
    fn a_full_book_takes_no_new_key_and_drops_no_change() {
        let book = IdemBook::bounded(2);
        book.record(&stamp("c1", 1), 1, outcome(1));
        assert!(book.has_room());
        book.record(&stamp("c2", 1), 2, outcome(1));
        assert!(!book.has_room(), "full: new keys wait");
        book.record(&stamp("c3", 1), 3, outcome(1));
        assert_eq!(book.len(), 3, "a change is never dropped to make room");
    }

    #[test]
    fn a_v1_snapshot_loads_without_its_refusals() {
        let s = stamp("c", 1);
        let change = StoredIdemRecord::from(IdemRecord {
            user: s.user,
            key: s.key.clone(),
            fingerprint: s.fingerprint,
            at_ms: 1,
            outcome: outcome(1),
        });
        let refused = StoredIdemRecord {
            key: IdempotencyKey::parse("r").expect("valid"),
            outcome: StoredOutcome::Refused(Refusal {
                status: 409,
                code: "out_of_stock".into(),
                message: "gone".into(),
            }),
            ..change.clone()
        };
        let book = IdemBook::from_snapshot([refused, change.clone()]);
        assert_eq!(book.to_snapshot(), [change]);
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
            Lookup::Replay(Box::new(outcome(1))),
            "within the TTL the first answer stays"
        );
        book.record(&s, 5 + IDEMPOTENCY_TTL_MS, outcome(3));
        assert_eq!(
            book.lookup(s.user, &s.key, s.fingerprint),
            Lookup::Replay(Box::new(outcome(3)))
        );
        assert_eq!(book.evict_expired(5 + IDEMPOTENCY_TTL_MS + 10), 0);
    }
}
