//! Keyed requests (`Idempotency-Key`) through the [`Engine`] handle: the
//! book of first answers. A record is made only by applying the change it
//! answers (`domain/idem.rs`); nothing here writes one.
//!
//! The book lives in memory up to its budget
//! ([`EngineConfig::idem_memory_records_max`]); past it,
//! [`Engine::spill_idempotency`] moves the oldest records to the journal's
//! store (`journal/idem_store.rs`), and a lookup that misses memory asks the
//! store. A record moves only once the change that made it is durable (so
//! the store never holds the answer of a change a failed batch took back)
//! and leaves memory only once the store holds it durably (so a record is
//! always in one of the two). A record refers to its order; its answer is
//! rendered again from the order as it is now, in memory or in the archive
//! ([`Engine::first_answer`]).

use super::*;
#[allow(clippy::wildcard_imports)]
use crate::steps::{self, Step};

use crate::domain::idem::{FirstAnswer, KeyHash, Outcome};

fn join_error(what: &'static str, e: tokio::task::JoinError) -> EngineError {
    EngineError::Task {
        what,
        source: Arc::new(e),
    }
}

impl Engine {
    /// Waits (strict) until everything journaled so far is durable: a
    /// replayed answer may come from a record whose change is still in the
    /// batch being written.
    ///
    /// # Errors
    /// `Storage` when that batch failed.
    pub async fn settle_everything(&self) -> Result<(), EngineError> {
        self.settle(self.inner.journal.last_seq()).await
    }

    /// What a request with this key and fingerprint should do: memory is
    /// asked first, then the store (a record there past its TTL is gone).
    ///
    /// # Errors
    /// `Storage` when the store cannot be read.
    pub fn idempotency(
        &self,
        user: UserId,
        key: &IdempotencyKey,
        fingerprint: [u8; 16],
    ) -> Result<Lookup, EngineError> {
        let hash = KeyHash::of(&user, key);
        match self.inner.idem.lookup_hash(&hash, fingerprint) {
            Lookup::Fresh => {}
            found => return Ok(found),
        }
        let Some(store) = self.inner.journal.idem_store() else {
            return Ok(Lookup::Fresh);
        };
        // A point read of sled's cache or one page, as the archive's.
        match store.get(&hash)? {
            Some(record) if !record.expired(self.now_ms()) => Ok(record.lookup(fingerprint)),
            _ => Ok(Lookup::Fresh),
        }
    }

    /// How many idempotency records are in memory (not counting those
    /// moved to disk).
    pub fn idempotency_records_in_memory(&self) -> usize {
        self.inner.idem.len()
    }

    /// The first answer a record of `user`'s holds, rendered again: an
    /// order's from the order as it is now (in memory, or read through the
    /// archive as `GET /v1/orders/{id}` does), taken back to the moment of
    /// the answer. The answer was `user`'s own, so no owner check applies
    /// (a payment's or a refund's answer went to an admin).
    ///
    /// # Errors
    /// `NotFound` when the order is gone (damage), `Overloaded`,
    /// `Storage` or `Task`, `Domain(Inconsistent)` when the order cannot
    /// have grown from the answer.
    pub async fn first_answer(
        &self,
        user: UserId,
        outcome: &Outcome,
    ) -> Result<FirstAnswer, EngineError> {
        let order = match outcome.order_id() {
            None => None,
            Some(id) => {
                let reader = Caller { user, admin: true };
                let read = move |engine: Engine| async move {
                    engine.act(reader, id, OrderOp::Peek).await
                };
                Some(self.durably(read).await?)
            }
        };
        Ok(outcome.render(order.as_ref())?)
    }

    /// Drops idempotency records past their TTL, in memory and in the
    /// store; returns how many.
    ///
    /// # Errors
    /// `Storage` when the store cannot be swept (memory was).
    pub async fn evict_idempotency(&self) -> Result<usize, EngineError> {
        let now_ms = self.now_ms();
        let book = Arc::clone(&self.inner.idem);
        let mut evicted = tokio::task::spawn_blocking(move || {
            steps::timed(Step::KeyEviction, || book.evict_expired(now_ms))
        })
        .await
        .map_err(|e| join_error("evicting idempotency records", e))?;
        if self.inner.read_only {
            return Ok(evicted);
        }
        if let Some(store) = self.inner.journal.idem_store() {
            let cutoff_ms = now_ms.saturating_sub(IDEMPOTENCY_TTL_MS);
            evicted += tokio::task::spawn_blocking(move || {
                steps::timed(Step::KeyEviction, || store.evict_before(cutoff_ms))
            })
            .await
            .map_err(|e| join_error("evicting idempotency records", e))??;
        }
        Ok(evicted)
    }

    /// When the book holds more than its budget, moves the oldest records
    /// to the journal's store until it holds 1/16 less than the budget
    /// (in writes of at most [`IDEMPOTENCY_SPILL_BATCH_MAX`]); returns how
    /// many left memory. Nothing moves without a store.
    ///
    /// # Errors
    /// `Storage` when the journal or the store fails: the
    /// records not written stay in memory.
    pub async fn spill_idempotency(&self) -> Result<usize, EngineError> {
        let budget = self.inner.config.idem_memory_records_max;
        let book = &self.inner.idem;
        if self.inner.read_only || book.len() <= budget {
            return Ok(0);
        }
        let Some(store) = self.inner.journal.idem_store() else {
            return Ok(0);
        };
        let target = budget.saturating_sub(budget / IDEMPOTENCY_SPILL_SLACK_DIVISOR);
        // Bounded by what was over at the start, plus one round for
        // records recorded meanwhile.
        let rounds = book
            .len()
            .saturating_sub(target)
            .div_ceil(IDEMPOTENCY_SPILL_BATCH_MAX)
            .saturating_add(1);
        let mut moved = 0;
        for _ in 0..rounds {
            let count = book
                .len()
                .saturating_sub(target)
                .min(IDEMPOTENCY_SPILL_BATCH_MAX);
            if count == 0 {
                break;
            }
            let picker = Arc::clone(book);
            let batch = tokio::task::spawn_blocking(move || {
                steps::timed(Step::Spill, || picker.oldest(count))
            })
            .await
            .map_err(|e| join_error("picking idempotency records", e))?;
            if batch.is_empty() {
                break;
            }
            // Each record was applied after its event was appended, so
            // everything up to here covers them: only records of durable
            // changes reach the store.
            let journal = &self.inner.journal;
            journal.watermark().wait(journal.last_seq()).await?;
            let writer = Arc::clone(&store);
            let batch = tokio::task::spawn_blocking(move || {
                steps::timed(Step::Spill, || writer.put_batch(&batch)).map(|()| batch)
            })
            .await
            .map_err(|e| join_error("writing idempotency records", e))??;
            moved += book.remove_moved(&batch);
        }
        Ok(moved)
    }
}
