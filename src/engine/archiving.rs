//! The archive sweep of an [`OrderShard`]: which finished orders leave
//! memory, writing them to the archive, and journaling `OrdersArchived` once
//! the archive holds them durably (see `journal/archive.rs` for why that
//! order makes a crash harmless). The shard's timer runs [`OrderShard::sweep_archive`];
//! tests drive it by hand with [`ArchiveDue`].

use std::cmp::Reverse;

use actix::{ActorFutureExt, AsyncContext, Context, Handler, Message, WrapFuture};

use crate::clock::SliceBudget;
use crate::domain::order::Order;
use crate::domain::{Event, OrderId};
use crate::engine::shard::{OrderShard, finished_at_ms, sweep_budget};
use crate::engine::{EngineError, Reply};
use crate::limits::{ARCHIVE_BATCH_MAX, ARCHIVE_SWEEP_MS};

impl OrderShard {
    /// Takes up to [`ARCHIVE_BATCH_MAX`] finished orders past the retention
    /// window off the queue, oldest first, until `budget` is spent, as
    /// copies to write to the archive.
    fn due_for_archive(&mut self, now_ms: u64, budget: &mut SliceBudget) -> Vec<Order> {
        let Some(after_ms) = self.shared.archive_after_ms else {
            return Vec::new();
        };
        let mut due = Vec::new();
        // Each turn pops an entry or stops: bounded by the queue.
        while due.len() < ARCHIVE_BATCH_MAX && !budget.spent() {
            let Some(Reverse((at_ms, id))) = self.finished.peek().copied() else {
                break;
            };
            if at_ms.saturating_add(after_ms) > now_ms {
                break;
            }
            self.finished.pop();
            match self.book.get(id) {
                // Stale entries: archived or moved on since (a newer entry
                // stands for the later move).
                Some(order) if order.status.is_final() && finished_at_ms(order) == at_ms => {
                    due.push(order.clone());
                }
                _ => {}
            }
        }
        due
    }

    /// Puts orders whose archive write failed back on the queue.
    fn requeue(&mut self, orders: &[Order]) {
        for order in orders {
            self.finished
                .push(Reverse((finished_at_ms(order), order.id)));
        }
    }

    /// Journals `OrdersArchived` for the written orders that are still in
    /// memory exactly as written (one changed since stays live; the next
    /// sweep writes it again). Returns how many left memory.
    ///
    /// # Errors
    /// The journal's, when it refuses the event; the orders go back on the
    /// queue (they stay in memory and in the archive, which is harmless).
    fn finish_archive(&mut self, written: &[Order], now_ms: u64) -> Result<usize, EngineError> {
        let mut ids: Vec<OrderId> = written
            .iter()
            .filter(|copy| self.book.get(copy.id) == Some(*copy))
            .map(|copy| copy.id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(0);
        }
        let count = ids.len();
        let event = Event::OrdersArchived { ids, at_ms: now_ms };
        match self.commit(event, None) {
            Ok(_) => Ok(count),
            Err(error) => {
                self.requeue(written);
                Err(error)
            }
        }
    }

    /// The timer's archive sweep: writes one batch on a blocking thread and
    /// journals it when it is durable.
    pub(super) fn sweep_archive(&mut self, now_ms: u64, ctx: &mut Context<Self>) {
        if self.archiving || self.shared.read_only || now_ms < self.next_sweep_ms {
            return;
        }
        let Some(archive) = self.shared.archive.clone() else {
            return;
        };
        self.next_sweep_ms = now_ms.saturating_add(ARCHIVE_SWEEP_MS);
        let batch = self.due_for_archive(now_ms, &mut sweep_budget());
        if batch.is_empty() {
            return;
        }
        self.archiving = true;
        let write = async move {
            tokio::task::spawn_blocking(move || {
                let written = archive.put_batch(&batch);
                (batch, written)
            })
            .await
        };
        ctx.spawn(write.into_actor(self).map(|outcome, shard, _| {
            shard.archiving = false;
            let now_ms = shard.shared.clock.now_ms();
            match outcome {
                Ok((batch, Ok(()))) => {
                    if let Err(error) = shard.finish_archive(&batch, now_ms) {
                        tracing::warn!(%error, "could not journal an archive batch; retrying later");
                    }
                }
                Ok((batch, Err(error))) => {
                    tracing::warn!(%error, "could not write an archive batch; retrying later");
                    shard.requeue(&batch);
                }
                // The blocking pool is gone: the engine is stopping.
                Err(error) => tracing::warn!(%error, "an archive write did not finish"),
            }
        }));
    }

    /// The order from the archive, when it is not in memory.
    pub(super) fn archived_copy(&self, id: OrderId) -> Result<Option<Order>, EngineError> {
        if self.book.get(id).is_some() {
            return Ok(None);
        }
        match &self.shared.archive {
            Some(archive) => Ok(archive.get(id)?),
            None => Ok(None),
        }
    }
}

/// Archive every finished order past the retention window now, writing
/// synchronously (tests drive time by hand with this; the timer writes on a
/// blocking thread instead). Answers how many left memory.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ArchiveDue {
    pub(crate) reply: Reply<usize>,
}

impl Handler<ArchiveDue> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: ArchiveDue, _: &mut Context<Self>) {
        let now_ms = self.shared.clock.now_ms();
        let result = (|| {
            let Some(archive) = self.shared.archive.clone() else {
                return Ok(0);
            };
            if self.shared.read_only || self.archiving {
                return Ok(0);
            }
            let mut archived = 0;
            loop {
                // Driven by hand: bounded by count only.
                let batch = self.due_for_archive(now_ms, &mut SliceBudget::unlimited());
                if batch.is_empty() {
                    break;
                }
                if let Err(error) = archive.put_batch(&batch) {
                    self.requeue(&batch);
                    return Err(EngineError::from(error));
                }
                archived += self.finish_archive(&batch, now_ms)?;
            }
            Ok(archived)
        })();
        self.answer(msg.reply, result);
    }
}
