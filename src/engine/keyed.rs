//! Keyed requests (`Idempotency-Key`) through the [`Engine`] handle: the
//! book of first answers. A record is made only by applying the change it
//! answers (`domain/idem.rs`); nothing here writes one.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Waits (strict) until everything journaled so far is durable: a
    /// replayed answer may come from a record whose change is still in the
    /// batch being written.
    ///
    /// # Errors
    /// `StorageUnavailable` when that batch failed.
    pub async fn settle_everything(&self) -> Result<(), EngineError> {
        self.settle(self.inner.journal.last_seq()).await
    }

    /// What a request with this key and fingerprint should do.
    pub fn idempotency(&self, user: UserId, key: &IdempotencyKey, fingerprint: [u8; 16]) -> Lookup {
        self.inner.idem.lookup(user, key, fingerprint)
    }

    /// Whether a request with a new key can be taken.
    pub fn idempotency_has_room(&self) -> bool {
        self.inner.idem.has_room()
    }

    /// Drops idempotency records past their TTL; returns how many.
    pub fn evict_idempotency(&self) -> usize {
        self.inner.idem.evict_expired(self.now_ms())
    }
}
