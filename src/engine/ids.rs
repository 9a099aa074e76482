//! Order ids that never name two orders, across any crash (contract v3).
//!
//! Ids come from one counter, but the counter alone is not enough: after a
//! crash the state is rebuilt from what was durable, and in relaxed mode
//! answers run a few milliseconds ahead of the disk, so the ids of orders
//! answered just before a power cut may be nowhere on disk. A counter
//! rebuilt from the orders would hand them out again, to other users'
//! orders, and a client still holding "order 3486" (and a payment callback
//! for it) would meet someone else's order.
//!
//! So ids are handed out from **reserved blocks**. An `OrderIdsReserved`
//! event journals the highest id that may be used; an id is answered only
//! once the reservation covering it is durable (the caller waits for it,
//! which in practice never happens: the next block is reserved when half of
//! the current one is left, long before it is needed); and replay raises
//! the counter past every reservation it meets, so a start hands out only
//! ids above everything reserved before. What a crash takes back is at most
//! the rest of a block: a gap in the ids, never a reuse.
//!
//! In strict mode the order's own record comes after its reservation in the
//! one FIFO journal and every answer waits for its record, so the wait here
//! is only ever for the rare block whose reservation is still in flight.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::domain::{Event, OrderId};
use crate::engine::EngineError;
use crate::journal::{Journal, Seq};

/// Ids reserved by one `OrderIdsReserved` event. A crash wastes at most
/// this many ids (a gap); at 100,000 orders a second a block lasts about
/// 0.6 s, so the journal carries about two small records a second at most.
pub const ID_BLOCK: u64 = 1 << 16;

/// The next block is reserved once fewer than this many ids are left in
/// the current one, so its record is durable long before its first id is
/// answered.
const ID_LOW_WATER: u64 = ID_BLOCK / 2;

/// Reservations remembered with their sequence numbers: an id older than
/// all of them is covered by one at or before the oldest, which is durable
/// once the oldest is.
const RESERVATIONS_KEPT: usize = 4;

/// Which ids an engine hands out: those equal to `offset` modulo `stride`.
///
/// A node alone uses every id (`stride` 1). In cluster mode partition `p`
/// of `P` hands out the ids `k * P + p`, so the ids of different partitions
/// never meet and an id names its partition (`id % P`): a request for an
/// order goes to its partition without a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdSpace {
    /// The distance between two ids (at least 1).
    pub stride: u64,
    /// Every id's remainder modulo `stride` (below `stride`).
    pub offset: u64,
}

impl Default for IdSpace {
    fn default() -> IdSpace {
        IdSpace {
            stride: 1,
            offset: 0,
        }
    }
}

impl IdSpace {
    /// The ids of `partition` of `partitions`.
    pub fn partition(partition: u32, partitions: u32) -> IdSpace {
        assert!(
            partition < partitions,
            "partition {partition} of {partitions}"
        );
        IdSpace {
            stride: u64::from(partitions),
            offset: u64::from(partition),
        }
    }

    /// The lowest id of this space at or above `id` (at least 1), or `None`
    /// past the id space.
    fn at_or_above(self, id: u64) -> Option<u64> {
        let id = id.max(1);
        let stride = self.stride.max(1);
        let below = id % stride;
        let up = (self.offset % stride + stride - below) % stride;
        id.checked_add(up)
    }
}

/// The id counter and its reservations.
#[derive(Debug)]
pub(crate) struct OrderIds {
    space: IdSpace,
    next: AtomicU64,
    /// The highest id reserved (a copy of the newest entry of `blocks`,
    /// read without the lock on every allocation).
    reserved: AtomicU64,
    /// Recent reservations, oldest first: (highest id reserved, the
    /// sequence number of its event).
    blocks: Mutex<VecDeque<(u64, Seq)>>,
}

impl OrderIds {
    /// Starts after a rebuilt state whose next id is `next`: everything
    /// below it was used or reserved before (replay raised it past every
    /// reservation), so nothing at or above it is reserved yet.
    pub(crate) fn new(next: u64, space: IdSpace) -> OrderIds {
        let next = next.max(1);
        // Past the id space the counter stays at its end and `allocate`
        // refuses.
        let first = space.at_or_above(next).unwrap_or(u64::MAX);
        OrderIds {
            space,
            next: AtomicU64::new(first),
            reserved: AtomicU64::new(next - 1),
            blocks: Mutex::new(VecDeque::with_capacity(RESERVATIONS_KEPT + 1)),
        }
    }

    /// The lowest id a snapshot may start the counter at: above every id
    /// handed out and every id reserved, so a start from the snapshot
    /// reuses none (a higher value only leaves a gap).
    pub(crate) fn snapshot_floor(&self) -> u64 {
        let next = self.next.load(Ordering::SeqCst);
        let reserved = self.reserved.load(Ordering::SeqCst);
        next.max(reserved.saturating_add(1))
    }

    /// A new id, once the reservation covering it is durable.
    ///
    /// # Errors
    /// `Overloaded`, `Storage` or `IdsExhausted` when the reservation cannot be
    /// journaled or made durable (the id is never used); `Domain` when the
    /// id space is exhausted.
    pub(crate) async fn allocate(
        &self,
        journal: &dyn Journal,
        now_ms: u64,
    ) -> Result<OrderId, EngineError> {
        let stride = self.space.stride.max(1);
        let id = self.next.fetch_add(stride, Ordering::SeqCst);
        if id >= u64::MAX - 2 * ID_BLOCK.saturating_mul(stride) {
            return Err(EngineError::IdsExhausted);
        }
        let seq = self.cover(id, journal, now_ms)?;
        if journal.watermark().durable() < seq {
            journal.watermark().wait(seq).await?;
        }
        Ok(OrderId(id))
    }

    /// Reserves the next block if `id` is near the end of what is reserved,
    /// and returns the sequence number of the reservation covering `id`.
    fn cover(&self, id: u64, journal: &dyn Journal, now_ms: u64) -> Result<Seq, EngineError> {
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let reserved = self.reserved.load(Ordering::SeqCst);
        if id.saturating_add(ID_LOW_WATER.saturating_mul(self.space.stride.max(1))) > reserved {
            // A block holds ID_BLOCK of this space's ids.
            let through = reserved
                .max(id)
                .saturating_add(ID_BLOCK.saturating_mul(self.space.stride.max(1)));
            match journal.append(&Event::OrderIdsReserved {
                through,
                at_ms: now_ms,
            }) {
                Ok(seq) => {
                    blocks.push_back((through, seq));
                    if blocks.len() > RESERVATIONS_KEPT {
                        blocks.pop_front();
                    }
                    self.reserved.store(through, Ordering::SeqCst);
                }
                // Ids are left in the current block: use them, and try
                // again with the next id.
                Err(_) if id <= reserved => {}
                Err(e) => return Err(EngineError::from(e)),
            }
        }
        // The first reservation at or above `id` covers it; an id older than
        // every kept one was covered by a reservation before the oldest,
        // which is durable once the oldest is. None kept: the id is below
        // the start's floor (impossible), so nothing needs waiting for.
        let seq = blocks
            .iter()
            .find(|(through, _)| *through >= id)
            .or(blocks.front())
            .map_or(0, |(_, seq)| *seq);
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::State;
    use crate::journal::{JournalError, MemJournal, Watermark};

    fn reservations(journal: &MemJournal) -> Vec<u64> {
        journal
            .events()
            .iter()
            .filter_map(|e| match e {
                Event::OrderIdsReserved { through, .. } => Some(*through),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn ids_rise_inside_reserved_blocks_and_a_restart_starts_above_them() {
        let journal = MemJournal::new();
        let ids = OrderIds::new(1, IdSpace::default());
        let mut last = 0;
        // Reservations at ids 1, 32,770 and 98,306.
        for _ in 0..(2 * ID_BLOCK) {
            let id = ids.allocate(&journal, 0).await.expect("an id").0;
            assert!(id > last, "{id} after {last}");
            let reserved = reservations(&journal);
            assert!(
                reserved.last().is_some_and(|through| *through >= id),
                "{id} is not covered by {reserved:?}"
            );
            last = id;
        }
        let reserved = reservations(&journal);
        assert_eq!(reserved.len(), 3, "{reserved:?}");
        assert!(ids.snapshot_floor() > *reserved.last().expect("one"));

        // A restart rebuilds the counter from the journal alone (the orders
        // of the last ids were lost): it starts above every reservation.
        let mut state = State::default();
        for event in journal.events() {
            state.apply_owned(event).expect("applies");
        }
        let restarted = OrderIds::new(state.next_id, IdSpace::default());
        let first = restarted.allocate(&journal, 0).await.expect("an id").0;
        assert!(first > *reserved.last().expect("one"), "{first}");
    }

    #[tokio::test]
    async fn a_partition_hands_out_only_its_own_ids_and_restarts_above_them() {
        let journal = MemJournal::new();
        for (partition, partitions) in [(0, 64), (3, 8), (63, 64)] {
            let space = IdSpace::partition(partition, partitions);
            let ids = OrderIds::new(1, space);
            let mut last = 0;
            for _ in 0..(ID_BLOCK + 10) {
                let id = ids.allocate(&journal, 0).await.expect("an id").0;
                assert_eq!(id % u64::from(partitions), u64::from(partition), "{id}");
                assert!(id > last, "{id} after {last}");
                last = id;
            }
            let mut state = State::default();
            for event in journal.events() {
                state.apply_owned(event).expect("applies");
            }
            let restarted = OrderIds::new(state.next_id, space);
            let first = restarted.allocate(&journal, 0).await.expect("an id").0;
            assert_eq!(first % u64::from(partitions), u64::from(partition));
            assert!(first > last, "{first} after {last}");
        }
    }

    /// A journal whose appends become durable only when the test says.
    struct Slow {
        last: std::sync::Mutex<Seq>,
        watermark: Watermark,
        refuse: std::sync::atomic::AtomicBool,
    }

    impl Journal for Slow {
        fn append(&self, _: &Event) -> Result<Seq, JournalError> {
            if self.refuse.load(Ordering::SeqCst) {
                return Err(JournalError::Full);
            }
            let mut last = self.last.lock().expect("lock");
            *last += 1;
            Ok(*last)
        }
        fn watermark(&self) -> &Watermark {
            &self.watermark
        }
        fn last_seq(&self) -> Seq {
            *self.last.lock().expect("lock")
        }
    }

    #[tokio::test]
    async fn an_id_waits_for_its_reservation_and_is_refused_without_one() {
        let journal = std::sync::Arc::new(Slow {
            last: std::sync::Mutex::new(0),
            watermark: Watermark::new(0),
            refuse: std::sync::atomic::AtomicBool::new(false),
        });
        let ids = std::sync::Arc::new(OrderIds::new(1, IdSpace::default()));
        let waiting = {
            let (journal, ids) = (std::sync::Arc::clone(&journal), std::sync::Arc::clone(&ids));
            tokio::spawn(async move { ids.allocate(journal.as_ref(), 0).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "answered before its reservation was durable"
        );
        journal.watermark.advance(1);
        let id = waiting.await.expect("task").expect("an id");
        assert_eq!(id, OrderId(1));

        // Ids left in the block: a journal that refuses does not stop them.
        journal.refuse.store(true, Ordering::SeqCst);
        ids.next.store(ID_BLOCK - 1, Ordering::SeqCst);
        assert_eq!(
            ids.allocate(journal.as_ref(), 0).await.expect("covered"),
            OrderId(ID_BLOCK - 1)
        );
        // Past the block, no id without a reservation.
        ids.next.store(ID_BLOCK + 2, Ordering::SeqCst);
        assert!(matches!(
            ids.allocate(journal.as_ref(), 0).await,
            Err(EngineError::Overloaded)
        ));
    }
}
