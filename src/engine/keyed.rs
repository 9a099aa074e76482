//! Keyed requests (`Idempotency-Key`) through the [`Engine`] handle: the
//! book of first answers and the records kept in it.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Engine {
    /// Records that a keyed request was refused by the business rules, so a
    /// repeat gets the same answer (see `domain/idem.rs`), and waits until
    /// the record is durable (strict).
    ///
    /// # Errors
    /// Journal errors: then nothing was recorded.
    pub async fn record_refusal(
        &self,
        idem: IdemStamp,
        refusal: Refusal,
    ) -> Result<(), EngineError> {
        let event = Event::IdempotentRefusal {
            idem,
            refusal,
            at_ms: self.now_ms(),
        };
        let seq = self.inner.journal.append(&event)?;
        self.inner.idem.apply_refusal(&event);
        self.settle(seq).await
    }

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
