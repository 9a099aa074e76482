//! The engine as a [`SnapshotSource`]: every actor copies its own part, at
//! its own sequence number, and the snapshot thread does the rest (see
//! `journal/snapshot.rs` for why this is exact).
//!
//! Three rounds, each a message to every awake SKU actor and order shard (a
//! sleeping SKU is copied in round 1 under its lock, without an actor; see
//! `slot.rs` and [`capture_parts`]):
//!
//! 1. **Capture**: the actor clones its part and reads the journal's last
//!    sequence number `L` in the same handler; from then on it notes every
//!    event at or below `L` that reaches it from another actor (a *hole*:
//!    journaled before the copy, applied after).
//! 2. **Flush**: answered at once. Once every actor has answered, every
//!    event at or below the highest `L` has been journaled by a handler that
//!    has finished, so its messages to other actors are in their mailboxes.
//! 3. **Finish**: mailboxes are FIFO, so this reaches each actor after
//!    those messages: it answers its holes and stops noting.
//!
//! An actor pauses only for the clone of its part; rounds 2 and 3 cost a
//! message each. The messages bypass the mailbox bound (`do_send`): they
//! are one per actor per round, and a snapshot must not fail because a
//! sale is busy.
//!
//! The open reservations live here too ([`OpenReservations`]): changed
//! under a lock held across the journal append, so a copy under that lock
//! holds exactly the events up to the sequence number read there.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix::{Context, Handler, Message};
use tokio::sync::oneshot;

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::domain::book::OrderBook;
use crate::domain::state::{OpenReservation, track_open_reservations};
use crate::journal::{Capture, CaptureError, JournalError, Mark, SnapshotSource};
use crate::steps::{self, Step};

/// The reservations that no order has taken yet, as the journal has them.
#[derive(Debug, Default)]
pub(crate) struct OpenReservations {
    open: Mutex<BTreeMap<OrderId, OpenReservation>>,
}

impl OpenReservations {
    /// Journals a reservation event (made, released, taken) and applies it,
    /// under one lock.
    ///
    /// # Errors
    /// The journal's: nothing changed.
    pub(crate) fn commit(&self, journal: &dyn Journal, event: &Event) -> Result<Seq, JournalError> {
        let mut open = lock(&self.open);
        let seq = journal.append(event)?;
        if let Err(error) = track_open_reservations(&mut open, event) {
            // The decision ruled this out; a snapshot of a wrong map would
            // fail recovery's checks, so stop here (the journal is right).
            panic!("journaled event {seq} does not fit the open reservations: {error}");
        }
        Ok(seq)
    }

    /// A copy, and the sequence number it holds everything up to.
    fn capture(&self, journal: &dyn Journal) -> (BTreeMap<OrderId, OpenReservation>, Seq) {
        let open = lock(&self.open);
        (open.clone(), journal.last_seq())
    }
}

/// What an actor notes while a snapshot is being taken.
#[derive(Debug, Default)]
pub(crate) struct Holes {
    /// The sequence number of the copy, while the snapshot runs.
    mark: Option<Seq>,
    /// Events at or below `mark` applied after the copy.
    seqs: Vec<Seq>,
}

impl Holes {
    /// Starts noting after a copy at `mark` (forgetting an earlier snapshot
    /// that never finished).
    pub(crate) fn start(&mut self, mark: Seq) {
        self.mark = Some(mark);
        self.seqs.clear();
    }

    /// Whether it notes holes (a snapshot is between its copy and its last
    /// round).
    pub(crate) fn is_noting(&self) -> bool {
        self.mark.is_some()
    }

    /// Stops noting and forgets what was noted (a snapshot that ended).
    pub(crate) fn forget(&mut self) {
        self.mark = None;
        self.seqs = Vec::new();
    }

    /// Notes that the event at `seq` came from another actor and is being
    /// applied now.
    pub(crate) fn applying(&mut self, seq: Seq) {
        if self.mark.is_some_and(|mark| seq <= mark) {
            self.seqs.push(seq);
        }
    }

    fn finish(&mut self) -> Vec<Seq> {
        self.mark = None;
        std::mem::take(&mut self.seqs)
    }
}

/// Round 1 for a SKU actor, in a snapshot's epoch.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CaptureSku(oneshot::Sender<(SkuState, Seq)>, u64);

/// Round 1 for an order shard.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CaptureShard(oneshot::Sender<(OrderBook, Seq)>);

/// Round 2.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Flush(oneshot::Sender<()>);

/// Round 3.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Finish(oneshot::Sender<Vec<Seq>>);

impl Handler<CaptureSku> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: CaptureSku, _: &mut Context<Self>) {
        let started = std::time::Instant::now();
        self.took();
        let seq = self.journal.last_seq();
        self.holes.start(seq);
        self.holes_epoch = msg.1;
        let part = self.state.clone();
        steps::record(Step::ActorCapture, started.elapsed());
        let _ = msg.0.send((part, seq));
    }
}

impl Handler<CaptureShard> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: CaptureShard, _: &mut Context<Self>) {
        let started = std::time::Instant::now();
        let seq = self.shared.journal.last_seq();
        self.holes.start(seq);
        // A root clone: the book's maps are persistent (`book.rs`).
        let part = self.book.clone();
        steps::record(Step::ActorCapture, started.elapsed());
        let _ = msg.0.send((part, seq));
    }
}

impl Handler<Flush> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: Flush, _: &mut Context<Self>) {
        self.took();
        let _ = msg.0.send(());
    }
}

impl Handler<Flush> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: Flush, _: &mut Context<Self>) {
        let _ = msg.0.send(());
    }
}

impl Handler<Finish> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: Finish, _: &mut Context<Self>) {
        self.took();
        let _ = msg.0.send(self.holes.finish());
    }
}

impl Handler<Finish> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: Finish, _: &mut Context<Self>) {
        let _ = msg.0.send(self.holes.finish());
    }
}

/// Sends one message to each of `addrs` (`do_send`: see the module doc),
/// then waits for every answer (blocking: the snapshot thread).
fn ask_all<A, M, T>(
    addrs: impl Iterator<Item = Addr<A>>,
    make: impl Fn(oneshot::Sender<T>) -> M,
) -> Result<Vec<T>, CaptureError>
where
    A: actix::Actor<Context = Context<A>> + Handler<M>,
    M: Message<Result = ()> + Send + 'static,
{
    let answers: Vec<_> = addrs
        .map(|addr| {
            let (tx, rx) = oneshot::channel();
            addr.do_send(make(tx));
            rx
        })
        .collect();
    answers.into_iter().map(wait).collect()
}

fn wait<T>(rx: oneshot::Receiver<T>) -> Result<T, CaptureError> {
    rx.blocking_recv().map_err(|_| CaptureError::ActorStopped)
}

/// Sends one message to each awake SKU actor (`do_send`, through its
/// handle), and waits for every answer, by SKU.
fn ask_awake<M, T>(
    inner: &Inner,
    make: impl Fn(oneshot::Sender<T>) -> M,
) -> Result<Vec<(SkuId, T)>, CaptureError>
where
    SkuActor: Handler<M>,
    M: Message<Result = ()> + Send + 'static,
{
    let awake = inner.lives.awake_ids(usize::MAX);
    let mut answers = Vec::with_capacity(awake.len());
    for id in awake {
        let Some(handle) = inner.skus.get(&id) else {
            continue;
        };
        let (tx, rx) = oneshot::channel();
        if handle.do_send_if_awake(make(tx)) {
            answers.push((id, rx));
        }
    }
    answers
        .into_iter()
        .map(|(id, rx)| wait(rx).map(|answer| (id, answer)))
        .collect()
}

/// Round 1 for the SKUs: a sleeping SKU is copied under its lock (see
/// `slot.rs`), an awake one copies itself.
fn capture_skus(skus: &[Arc<SkuHandle>], epoch: u64) -> Result<Vec<(SkuState, Seq)>, CaptureError> {
    let mut parts: Vec<Option<(SkuState, Seq)>> = Vec::with_capacity(skus.len());
    let mut asked = Vec::new();
    for handle in skus {
        let (tx, rx) = oneshot::channel();
        match handle.capture(|| CaptureSku(tx, epoch)) {
            Some(part) => parts.push(Some(part)),
            None => {
                asked.push((parts.len(), rx));
                parts.push(None);
            }
        }
    }
    for (index, rx) in asked {
        if let Some(part) = parts.get_mut(index) {
            *part = Some(wait(rx)?);
        }
    }
    parts
        .into_iter()
        .map(|part| part.ok_or(CaptureError::PartMissing))
        .collect()
}

/// The three rounds of the module doc, plus the engine's own parts.
///
/// With sleeping SKUs (`slot.rs`): round 1 copies a sleeping SKU under its
/// lock; rounds 2 and 3 go to every SKU awake by then. Every actor that
/// may still be sending an event at or below the highest mark is awake at
/// round 2 (an actor sleeps only between messages, after its sends), and
/// every SKU that notes holes is awake at round 3 (it does not sleep while
/// it notes for the running snapshot).
fn capture_parts(inner: &Inner) -> Result<Capture, CaptureError> {
    let journal = inner.journal.as_ref();
    // Listed under the creation lock: a SKU missing from the list is
    // journaled after `catalog_seq`, and replay creates it.
    let (catalog_seq, skus) = {
        let _serial = lock(&inner.create_lock);
        (journal.last_seq(), inner.skus.all())
    };
    let (promotions, promotions_seq) = {
        let promotions = inner.promotions.read().unwrap_or_else(|p| p.into_inner());
        (promotions.clone(), journal.last_seq())
    };
    let (open_reservations, reservations_seq) = inner.shared.open.capture(journal);

    let epoch = inner.lives.begin_snapshot();
    let rounds = capture_rounds(inner, &skus, epoch);
    inner.lives.end_snapshot();
    let (sku_parts, shard_parts, mut sku_holes, shard_holes) = rounds?;

    // Last: a superset of the records of every event a part holds.
    inner.idem.evict_expired(inner.shared.clock.now_ms());
    let idem = inner.idem.to_snapshot();
    let next_id = inner.ids.snapshot_floor();
    Ok(Capture {
        catalog_seq,
        skus: sku_parts
            .into_iter()
            .map(|(sku, seq)| {
                let holes = sku_holes.remove(&sku.id()).unwrap_or_default();
                (sku, Mark::new(seq, holes))
            })
            .collect(),
        shards: shard_parts
            .into_iter()
            .zip(shard_holes)
            .map(|((book, seq), holes)| (book, Mark::new(seq, holes)))
            .collect(),
        promotions,
        promotions_seq,
        open_reservations,
        reservations_seq,
        idem,
        next_id,
    })
}

type Rounds = (
    Vec<(SkuState, Seq)>,
    Vec<(OrderBook, Seq)>,
    std::collections::HashMap<SkuId, Vec<Seq>>,
    Vec<Vec<Seq>>,
);

fn capture_rounds(
    inner: &Inner,
    skus: &[Arc<SkuHandle>],
    epoch: u64,
) -> Result<Rounds, CaptureError> {
    let shard_addrs = || inner.shards.iter().map(|addr| Addr::clone(addr));
    let sku_parts = capture_skus(skus, epoch)?;
    let shard_parts = ask_all(shard_addrs(), CaptureShard)?;
    ask_awake(inner, Flush)?;
    ask_all(shard_addrs(), Flush)?;
    let sku_holes = ask_awake(inner, Finish)?.into_iter().collect();
    let shard_holes = ask_all(shard_addrs(), Finish)?;
    Ok((sku_parts, shard_parts, sku_holes, shard_holes))
}

impl SnapshotSource for Engine {
    fn capture(&self) -> Result<Capture, CaptureError> {
        if self.inner.read_only {
            return Err(CaptureError::ReadOnly);
        }
        if let Some(why) = self.failure() {
            return Err(CaptureError::EngineDead(why));
        }
        capture_parts(&self.inner)
    }
}
