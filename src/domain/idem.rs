//! Idempotency records: the first successful answer to a request that
//! carried an `Idempotency-Key`, kept per user and key.
//!
//! A record is written by applying the very event that made the change (the
//! event carries an [`IdemStamp`]), so after a crash a key has a record if and
//! only if its change survived. A request the business rules refused (a
//! `409`: out of stock, over a limit, a move the order's state forbids, a
//! payment mismatch) is recorded too, by an event of its own
//! ([`Event::IdempotentRefusal`]), so a repeat gets the first answer again
//! even if stock has come back since. Bad input (`400`, `404`) and shed or
//! failed requests (`503`) leave no record: they changed nothing, so a retry
//! runs again. The book is shared by every actor that applies stamped
//! events, hence the concurrent map; it is bounded by
//! [`IDEMPOTENCY_RECORDS_MAX`] and records older than
//! [`IDEMPOTENCY_TTL_MS`] are dropped.

use std::collections::VecDeque;
use std::sync::Mutex;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::domain::order::Order;
use crate::domain::sku::SkuView;
use crate::domain::{Event, IdemStamp, IdempotencyKey, UserId};
use crate::limits::{IDEMPOTENCY_RECORDS_MAX, IDEMPOTENCY_TTL_MS};

/// The first answer to a keyed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// An order, as it was right after the change.
    Order(Order),
    /// A SKU, as it was right after the change.
    Sku(SkuView),
    /// A refusal of the business rules (out of stock, a limit, a state
    /// that does not allow the move, a payment mismatch), as answered.
    Refused(Refusal),
}

/// The answer a refused keyed request got, kept so a repeat gets it again.
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

/// Every idempotency record.
///
/// Bounded at [`IDEMPOTENCY_RECORDS_MAX`]. Refusals are the first to go
/// when the book is full (oldest first): a sold-out storm answers a refusal
/// to nearly every keyed request, and those must not crowd out the records
/// of changes, whose loss could let a change run twice; a forgotten refusal
/// only lets a retry run again, which is safe, since the refusal changed
/// nothing.
#[derive(Debug)]
pub struct IdemBook {
    records: DashMap<(UserId, IdempotencyKey), IdemRecord>,
    /// Refusals in the order they were recorded (some may be gone already).
    refusals: Mutex<VecDeque<(UserId, IdempotencyKey)>>,
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
            refusals: Mutex::new(VecDeque::new()),
            max,
        }
    }

    /// Whether a new key can be taken: the book is below its bound, or
    /// holds refusals that can make room.
    pub fn has_room(&self) -> bool {
        self.records.len() < self.max || !self.lock_refusals().is_empty()
    }

    fn lock_refusals(&self) -> std::sync::MutexGuard<'_, VecDeque<(UserId, IdempotencyKey)>> {
        // A queue of keys stays consistent across a panic.
        self.refusals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the oldest refusals until the book is below its bound (or none
    /// are left).
    fn make_room(&self) {
        let mut refusals = self.lock_refusals();
        while self.records.len() >= self.max {
            let Some(oldest) = refusals.pop_front() else {
                return;
            };
            self.records
                .remove_if(&oldest, |_, r| matches!(r.outcome, Outcome::Refused(_)));
        }
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
        if self.records.len() >= self.max {
            self.make_room();
        }
        let refused = matches!(outcome, Outcome::Refused(_));
        let slot = (stamp.user, stamp.key.clone());
        let record = IdemRecord {
            user: stamp.user,
            key: stamp.key.clone(),
            fingerprint: stamp.fingerprint,
            at_ms,
            outcome,
        };
        match self.records.entry(slot.clone()) {
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
        if refused {
            self.lock_refusals().push_back(slot);
        }
    }

    /// Applies an [`Event::IdempotentRefusal`] (other events carry their
    /// records with the change they made).
    pub fn apply_refusal(&self, event: &Event) {
        if let Event::IdempotentRefusal {
            idem,
            refusal,
            at_ms,
        } = event
        {
            self.record(idem, *at_ms, Outcome::Refused(refusal.clone()));
        }
    }

    /// Drops records older than the TTL; returns how many went.
    pub fn evict_expired(&self, now_ms: u64) -> usize {
        let cutoff = now_ms.saturating_sub(IDEMPOTENCY_TTL_MS);
        let before = self.records.len();
        self.records.retain(|_, record| record.at_ms >= cutoff);
        self.lock_refusals()
            .retain(|key| self.records.contains_key(key));
        before.saturating_sub(self.records.len())
    }

    /// Every record, sorted by user and key (for snapshots and comparisons).
    pub fn to_sorted_vec(&self) -> Vec<IdemRecord> {
        let mut all: Vec<IdemRecord> = self.records.iter().map(|r| r.value().clone()).collect();
        all.sort_by(|a, b| (a.user, &a.key).cmp(&(b.user, &b.key)));
        all
    }

    /// Builds a book from records (a snapshot).
    pub fn from_records(records: impl IntoIterator<Item = IdemRecord>) -> IdemBook {
        let book = IdemBook::default();
        let mut records: Vec<IdemRecord> = records.into_iter().collect();
        // Oldest first, so the refusal queue keeps its order.
        records.sort_by_key(|r| r.at_ms);
        for record in records {
            let slot = (record.user, record.key.clone());
            if matches!(record.outcome, Outcome::Refused(_)) {
                book.lock_refusals().push_back(slot.clone());
            }
            book.records.insert(slot, record);
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
    fn a_full_book_drops_the_oldest_refusals_never_a_change() {
        let book = IdemBook::bounded(3);
        let refusal = || {
            Outcome::Refused(Refusal {
                status: 409,
                code: "out_of_stock".into(),
                message: "gone".into(),
            })
        };
        book.record(&stamp("r1", 1), 1, refusal());
        book.record(&stamp("c1", 1), 2, outcome(1));
        book.record(&stamp("r2", 1), 3, refusal());
        assert!(book.has_room(), "refusals can make room");
        book.record(&stamp("c2", 1), 4, outcome(1));
        let keys: Vec<String> = book
            .to_sorted_vec()
            .iter()
            .map(|r| r.key.as_str().to_string())
            .collect();
        assert_eq!(keys, ["c1", "c2", "r2"], "the oldest refusal went");
        book.record(&stamp("c3", 1), 5, outcome(1));
        assert_eq!(book.len(), 3);
        assert!(book.lookup(stamp("c1", 1).user, &stamp("c1", 1).key, [1; 16]) != Lookup::Fresh);
        assert!(!book.has_room(), "full of changes: new keys wait");
        book.record(&stamp("c4", 1), 6, outcome(1));
        assert_eq!(book.len(), 4, "a change is never dropped to make room");
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
