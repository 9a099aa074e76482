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
    /// Moves finished orders past the retention window off the queue into
    /// the next batch (`picked`), as copies, oldest first, until the batch
    /// holds [`ARCHIVE_BATCH_MAX`] or `budget` is spent. Answers whether the
    /// queue may still hold due orders (the batch or the budget ran out
    /// first).
    fn pick_due(&mut self, now_ms: u64, budget: &mut SliceBudget) -> bool {
        let Some(after_ms) = self.shared.archive_after_ms else {
            return false;
        };
        // Each turn pops an entry or stops: bounded by the queue.
        while self.picked.len() < ARCHIVE_BATCH_MAX {
            let Some(Reverse((at_ms, id))) = self.finished.peek().copied() else {
                return false;
            };
            if at_ms.saturating_add(after_ms) > now_ms {
                return false;
            }
            if budget.spent() {
                return true;
            }
            self.finished.pop();
            match self.book.get(id) {
                // Stale entries: archived or moved on since (a newer entry
                // stands for the later move).
                Some(order) if order.status.is_final() && finished_at_ms(order) == at_ms => {
                    self.picked.push(order.clone());
                }
                _ => {}
            }
        }
        true
    }

    /// Puts orders whose archive write failed back on the queue.
    fn requeue(&mut self, orders: &[Order]) {
        for order in orders {
            self.finished
                .push(Reverse((finished_at_ms(order), order.id)));
        }
    }

    /// Journals `OrdersArchived` for the written orders that are still in
    /// memory exactly as written. One that changed since its pick stays
    /// live and goes back on the queue as it is now, if it is still
    /// finished, so the next sweep writes it again: a change that keeps an
    /// order finished (a partial refund of a delivered order) queues
    /// nothing of its own, and without this the order would stay in memory
    /// until a restart. Returns how many left memory.
    ///
    /// # Errors
    /// The journal's, when it refuses the event; the orders go back on the
    /// queue (they stay in memory and in the archive, which is harmless).
    fn finish_archive(&mut self, written: &[Order], now_ms: u64) -> Result<usize, EngineError> {
        let mut ids: Vec<OrderId> = Vec::with_capacity(written.len());
        let mut changed: Vec<(u64, OrderId)> = Vec::new();
        for copy in written {
            match self.book.get(copy.id) {
                Some(live) if live == copy => ids.push(copy.id),
                Some(live) if live.status.is_final() => {
                    changed.push((finished_at_ms(live), live.id));
                }
                // Gone (archived by an earlier batch), or live again.
                _ => {}
            }
        }
        if !changed.is_empty() {
            // Look again at the next tick rather than a sweep interval
            // later: those due are picked at once, the rest wait as usual.
            self.next_sweep_ms = 0;
        }
        for entry in changed {
            self.finished.push(Reverse(entry));
        }
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

    /// The timer's archive sweep: picks due orders for at most one slice a
    /// tick, and once the batch is full or nothing more is due, writes it
    /// on a blocking thread and journals it when it is durable.
    ///
    /// A pick goes on at every tick until then, and after a full batch the
    /// next pick starts at the next tick: only a shard with nothing more
    /// due waits [`ARCHIVE_SWEEP_MS`]. So the slice bounds how long a tick
    /// holds the actor, not how fast a backlog drains (one slice per
    /// [`ARCHIVE_SWEEP_MS`] drained a few hundred orders a second across
    /// all shards on a busy machine).
    pub(super) fn sweep_archive(&mut self, now_ms: u64, ctx: &mut Context<Self>) {
        if self.archiving || self.shared.read_only {
            return;
        }
        if self.picked.is_empty() && now_ms < self.next_sweep_ms {
            return;
        }
        let Some(archive) = self.shared.archive.clone() else {
            return;
        };
        let more = self.pick_due(now_ms, &mut sweep_budget());
        let full = self.picked.len() >= ARCHIVE_BATCH_MAX;
        if more && !full {
            return; // the slice is spent: the pick goes on at the next tick
        }
        self.next_sweep_ms = if full {
            now_ms
        } else {
            now_ms.saturating_add(ARCHIVE_SWEEP_MS)
        };
        let batch = std::mem::take(&mut self.picked);
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
                // Driven by hand: bounded by count only. A batch the timer
                // began to pick goes first.
                self.pick_due(now_ms, &mut SliceBudget::unlimited());
                let batch = std::mem::take(&mut self.picked);
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
