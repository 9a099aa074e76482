//! One part of the idempotency book ([`IdemBook`](super::idem::IdemBook)):
//! its records by key, and the same keys in the order they were recorded,
//! the sweeps' queue.
//!
//! The book is split into parts by key, each under its own lock; this
//! module holds no lock. Every sweep of the book (the TTL eviction, the
//! snapshot's copy, the pick of the oldest records for a spill) walks a
//! part's queue from its front in slices of at most a given number of
//! entries, so the one holding the part's lock for a slice holds it for a
//! bounded time, whatever the part holds; the book releases the lock
//! between slices.
//!
//! Records arrive in the order of their times, up to the skew between the
//! actor threads that record them (a few milliseconds) and a wall clock
//! stepped back; a book built from a snapshot is filled in time order. So
//! the queue's front holds the oldest records, and the TTL eviction stops
//! at the first record not yet expired: a record recorded out of order is
//! dropped that much later, never earlier.
//!
//! # Invariants
//!
//! - Every record has at least one *live* entry in the queue: an entry
//!   whose key the map holds with a time whose low 32 bits are the
//!   entry's. Entries of records dropped, moved to disk or replaced (a key
//!   used again after its TTL) are *stale*: every walk skips them and they
//!   leave the queue when they reach its front. (A stale entry could pass
//!   for live only if a key's two records were recorded a multiple of
//!   2^32 ms, 49.7 days, apart while the older was never dropped; then the
//!   eviction merely waits for the newer one's TTL, and the copy drops the
//!   duplicate.)
//! - The time that decides expiry is always the map's record's, never the
//!   entry's.
//! - Positions are absolute: an entry keeps its position (the number of
//!   entries pushed before it) however many leave the front, so a walk in
//!   slices resumes where it stopped.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

use crate::domain::idem::{HashedRecord, IdemRecord, KeyHash, KeyHasher};
use crate::limits::IDEMPOTENCY_TTL_MS;

/// Entries in one chunk of a queue: 20 KiB. Every chunk but the last is
/// full, so a queue wastes at most two chunks (the front one's popped
/// entries, the back one's room) instead of a growing buffer's up to half.
const CHUNK_ENTRIES: usize = 1_024;

/// A queue entry: a key and the low 32 bits of its record's time (enough
/// to tell a live entry from a stale one, see the module doc), 20 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Queued {
    key: KeyHash,
    at_ms_low: u32,
}

impl Queued {
    fn of(key: KeyHash, at_ms: u64) -> Queued {
        Queued {
            key,
            // The low bits, on purpose: they tell two times of one key apart.
            at_ms_low: (at_ms & u64::from(u32::MAX)) as u32,
        }
    }
}

/// A FIFO of [`Queued`] entries in fixed-size chunks, with absolute
/// positions.
///
/// Invariant: every chunk but the last holds [`CHUNK_ENTRIES`]; `head` <=
/// the front chunk's length.
#[derive(Debug, Default)]
pub(crate) struct TimeQueue {
    chunks: VecDeque<Vec<Queued>>,
    /// Entries of the front chunk already popped.
    head: usize,
    /// Entries popped since the queue was made: the front's position.
    popped: u64,
}

impl TimeQueue {
    /// How many entries are queued.
    pub(crate) fn len(&self) -> usize {
        let Some(last) = self.chunks.back() else {
            return 0;
        };
        let full = self.chunks.len().saturating_sub(1);
        (full * CHUNK_ENTRIES + last.len()).saturating_sub(self.head)
    }

    /// Whether none is.
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The front entry's position.
    pub(crate) fn front_pos(&self) -> u64 {
        self.popped
    }

    /// The position the next entry pushed gets.
    pub(crate) fn end_pos(&self) -> u64 {
        self.popped.saturating_add(self.len() as u64)
    }

    fn push_back(&mut self, entry: Queued) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK_ENTRIES => last.push(entry),
            _ => {
                let mut chunk = Vec::with_capacity(CHUNK_ENTRIES);
                chunk.push(entry);
                self.chunks.push_back(chunk);
            }
        }
    }

    fn front(&self) -> Option<Queued> {
        self.chunks.front()?.get(self.head).copied()
    }

    fn pop_front(&mut self) -> Option<Queued> {
        let entry = self.front()?;
        self.head += 1;
        self.popped = self.popped.saturating_add(1);
        let front_len = self.chunks.front().map_or(0, Vec::len);
        if self.head == front_len {
            if self.chunks.len() > 1 {
                self.chunks.pop_front();
            } else if let Some(only) = self.chunks.front_mut() {
                // Empty now: keep the one chunk's room for what comes next.
                only.clear();
            }
            self.head = 0;
        }
        debug_assert!(self.head <= self.chunks.front().map_or(0, Vec::len));
        Some(entry)
    }

    /// The entry at absolute position `pos`, if it is still queued.
    fn get(&self, pos: u64) -> Option<Queued> {
        let offset = usize::try_from(pos.checked_sub(self.popped)?).ok()?;
        let index = offset.checked_add(self.head)?;
        self.chunks
            .get(index / CHUNK_ENTRIES)?
            .get(index % CHUNK_ENTRIES)
            .copied()
    }
}

/// How a slice of a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slice {
    /// Records dropped (eviction) or copied (a copy) in the slice.
    pub(crate) records: usize,
    /// Where the next slice starts (absolute position).
    pub(crate) next_pos: u64,
    /// Whether the walk is over (nothing left to do in this part).
    pub(crate) done: bool,
}

/// One part of the book: records by key, and their keys in the order
/// recorded (see the module doc for the invariants).
#[derive(Debug, Default)]
pub(crate) struct Part {
    records: HashMap<KeyHash, IdemRecord, BuildHasherDefault<KeyHasher>>,
    queue: TimeQueue,
}

impl Part {
    /// The record under `key`.
    pub(crate) fn get(&self, key: &KeyHash) -> Option<&IdemRecord> {
        self.records.get(key)
    }

    /// How many records the part holds.
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// The queue (positions, length).
    pub(crate) fn queue(&self) -> &TimeQueue {
        &self.queue
    }

    /// Inserts a record: a key held keeps its record (the first answer
    /// wins) unless the new one is a TTL or more younger (the key was
    /// dropped and used again, see [`IdemBook::record`](super::idem::IdemBook::record)).
    pub(crate) fn insert(&mut self, key: KeyHash, record: IdemRecord) {
        let entry = Queued::of(key, record.at_ms);
        match self.records.entry(key) {
            Entry::Vacant(vacant) => {
                // Queued first: a failure between the two leaves a stale
                // entry, never a record no sweep finds.
                self.queue.push_back(entry);
                vacant.insert(record);
            }
            Entry::Occupied(mut held) => {
                if record.at_ms.saturating_sub(held.get().at_ms) < IDEMPOTENCY_TTL_MS {
                    return;
                }
                self.queue.push_back(entry);
                held.insert(record);
            }
        }
    }

    /// The record a queue entry stands for, if the entry is live.
    fn live(&self, entry: Queued) -> Option<&IdemRecord> {
        self.records
            .get(&entry.key)
            .filter(|record| Queued::of(entry.key, record.at_ms) == entry)
    }

    /// Drops the records past their TTL at `now_ms` from the queue's front,
    /// looking at `entries_max` entries at most; done at the first record
    /// not yet expired or when the queue is empty.
    pub(crate) fn evict_slice(&mut self, now_ms: u64, entries_max: usize) -> Slice {
        let mut evicted = 0;
        for _ in 0..entries_max {
            let Some(front) = self.queue.front() else {
                break;
            };
            // One lookup for the check and the removal.
            if let Entry::Occupied(held) = self.records.entry(front.key)
                && Queued::of(front.key, held.get().at_ms) == front
            {
                if !held.get().expired(now_ms) {
                    return Slice {
                        records: evicted,
                        next_pos: self.queue.front_pos(),
                        done: true,
                    };
                }
                held.remove();
                evicted += 1;
            }
            self.queue.pop_front();
        }
        Slice {
            records: evicted,
            next_pos: self.queue.front_pos(),
            done: self.queue.is_empty(),
        }
    }

    /// Pops the stale entries at the queue's front (those of records just
    /// moved to disk), `entries_max` at most; done at the first live entry.
    pub(crate) fn trim_slice(&mut self, entries_max: usize) -> Slice {
        for _ in 0..entries_max {
            let Some(front) = self.queue.front() else {
                break;
            };
            if self.live(front).is_some() {
                return Slice {
                    records: 0,
                    next_pos: self.queue.front_pos(),
                    done: true,
                };
            }
            self.queue.pop_front();
        }
        Slice {
            records: 0,
            next_pos: self.queue.front_pos(),
            done: self.queue.is_empty(),
        }
    }

    /// Copies the records of the live entries from position `from_pos`
    /// (or the front, if it has moved past it) up to `end_pos`, looking at
    /// `entries_max` entries and copying `records_max` records at most.
    /// `out` should have room for `entries_max` more (reserved before the
    /// lock is taken), so it never grows under the lock.
    pub(crate) fn copy_slice(
        &self,
        from_pos: u64,
        end_pos: u64,
        entries_max: usize,
        records_max: usize,
        out: &mut Vec<HashedRecord>,
    ) -> Slice {
        let end_pos = end_pos.min(self.queue.end_pos());
        let mut pos = from_pos.max(self.queue.front_pos());
        let mut copied = 0;
        let mut seen = 0;
        while pos < end_pos && seen < entries_max && copied < records_max {
            if let Some(entry) = self.queue.get(pos)
                && let Some(record) = self.live(entry)
            {
                out.push(HashedRecord {
                    key: entry.key,
                    record: record.clone(),
                });
                copied += 1;
            }
            pos = pos.saturating_add(1);
            seen += 1;
        }
        Slice {
            records: copied,
            next_pos: pos,
            done: pos >= end_pos,
        }
    }

    /// Drops `moved`'s record if the part still holds it exactly as
    /// written (its queue entry turns stale).
    pub(crate) fn remove_if_same(&mut self, moved: &HashedRecord) -> bool {
        if self.records.get(&moved.key) != Some(&moved.record) {
            return false;
        }
        self.records.remove(&moved.key).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::OrderId;
    use crate::domain::idem::Outcome;

    fn key(i: u32) -> KeyHash {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&i.to_le_bytes());
        KeyHash(bytes)
    }

    fn record(at_ms: u64) -> IdemRecord {
        IdemRecord {
            fingerprint: [1; 16],
            at_ms,
            outcome: Outcome::Order {
                id: OrderId(at_ms),
                history_len: 1,
            },
        }
    }

    #[test]
    fn a_queue_entry_is_small() {
        assert_eq!(std::mem::size_of::<Queued>(), 20);
    }

    #[test]
    fn the_queue_is_fifo_across_chunks_with_stable_positions() {
        let mut queue = TimeQueue::default();
        let n = 3 * CHUNK_ENTRIES + 7;
        for i in 0..n {
            queue.push_back(Queued::of(key(i as u32), i as u64));
        }
        assert_eq!(queue.len(), n);
        assert_eq!(queue.end_pos(), n as u64);
        for i in 0..CHUNK_ENTRIES + 3 {
            assert_eq!(queue.pop_front(), Some(Queued::of(key(i as u32), i as u64)));
        }
        assert_eq!(queue.front_pos(), (CHUNK_ENTRIES + 3) as u64);
        assert_eq!(queue.len(), n - CHUNK_ENTRIES - 3);
        assert_eq!(queue.get(0), None, "popped");
        assert_eq!(queue.get(n as u64), None, "not pushed yet");
        for pos in CHUNK_ENTRIES + 3..n {
            assert_eq!(
                queue.get(pos as u64),
                Some(Queued::of(key(pos as u32), pos as u64))
            );
        }
        while queue.pop_front().is_some() {}
        assert!(queue.is_empty());
        assert_eq!(queue.chunks.len(), 1, "one chunk kept for reuse");
        queue.push_back(Queued::of(key(1), 1));
        assert_eq!(queue.get(n as u64), Some(Queued::of(key(1), 1)));
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn an_eviction_slice_stops_at_its_bound() {
        let mut part = Part::default();
        for i in 0..100 {
            part.insert(key(i), record(u64::from(i)));
        }
        let now_ms = IDEMPOTENCY_TTL_MS + 1_000;
        let slice = part.evict_slice(now_ms, 30);
        assert_eq!(slice.records, 30);
        assert!(!slice.done);
        assert_eq!(part.len(), 70);
        assert_eq!(slice.next_pos, 30);
        // The rest, slice after slice, then done.
        assert_eq!(part.evict_slice(now_ms, 60).records, 60);
        let last = part.evict_slice(now_ms, 60);
        assert_eq!((last.records, last.done), (10, true));
        assert_eq!(part.len(), 0);
    }

    #[test]
    fn an_eviction_slice_stops_at_the_first_live_record() {
        let mut part = Part::default();
        for i in 0..10 {
            part.insert(key(i), record(u64::from(i) * 1_000));
        }
        // Records 0..=4 are past their TTL at this time, 5.. are not.
        let now_ms = IDEMPOTENCY_TTL_MS + 4_500;
        let slice = part.evict_slice(now_ms, 1_000);
        assert_eq!((slice.records, slice.done), (5, true));
        assert_eq!(part.len(), 5);
        assert!(part.get(&key(5)).is_some());
        // A stale entry (its record moved) is skipped, not a stop.
        assert!(part.remove_if_same(&HashedRecord {
            key: key(5),
            record: record(5_000),
        }));
        let slice = part.evict_slice(IDEMPOTENCY_TTL_MS + 6_500, 1_000);
        assert_eq!((slice.records, slice.done), (1, true), "key 6 only");
        assert_eq!(part.queue().len(), 3);
    }

    #[test]
    fn a_copy_slice_stops_at_its_bounds_and_resumes() {
        let mut part = Part::default();
        for i in 0..50 {
            part.insert(key(i), record(u64::from(i)));
        }
        let end = part.queue().end_pos();
        let mut out = Vec::new();
        let first = part.copy_slice(0, end, 20, usize::MAX, &mut out);
        assert_eq!((first.records, first.next_pos, first.done), (20, 20, false));
        // Meanwhile the front moves past where the copy stopped, and a
        // record is replaced by a newer one (its old entry turns stale).
        part.evict_slice(IDEMPOTENCY_TTL_MS + 24, 1_000);
        part.insert(key(30), record(IDEMPOTENCY_TTL_MS + 30));
        let second = part.copy_slice(first.next_pos, end, 1_000, 5, &mut out);
        assert_eq!((second.records, second.next_pos), (5, 29), "24..29");
        let third = part.copy_slice(second.next_pos, end, 1_000, usize::MAX, &mut out);
        assert!(third.done);
        assert_eq!(third.records, 20, "29 and 31..50; 30's entry is stale");
        assert_eq!(third.next_pos, end, "the newer entry is past the end");
        assert_eq!(out.len(), 45);
    }

    #[test]
    fn a_trim_pops_stale_entries_only() {
        let mut part = Part::default();
        for i in 0..10 {
            part.insert(key(i), record(u64::from(i)));
        }
        for i in 0..4 {
            let moved = HashedRecord {
                key: key(i),
                record: record(u64::from(i)),
            };
            assert!(part.remove_if_same(&moved));
            assert!(!part.remove_if_same(&moved), "gone already");
        }
        assert_eq!(part.queue().len(), 10);
        let slice = part.trim_slice(3);
        assert!(!slice.done);
        assert_eq!(part.queue().len(), 7);
        assert!(part.trim_slice(100).done);
        assert_eq!(part.queue().len(), 6);
        assert_eq!(part.len(), 6);
    }
}
