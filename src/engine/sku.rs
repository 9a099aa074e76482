//! `SkuActor`: the one owner of a SKU's stock while it is awake. Every
//! reservation, release, allocation, shipment, refund and restock of the
//! SKU passes through its mailbox, one at a time, so no two changes can race
//! and no unit can be granted twice. An idle SKU has no actor: its state
//! sleeps in the catalog, and the next message starts an actor with it
//! (`slot.rs` says how the hand-over keeps exactly one owner).
//!
//! A change is: pure decide (an `Err` changes nothing), append the event to
//! the journal (a full or failed journal changes nothing), apply, answer.
//! Order events that move this SKU's units were decided and journaled by an
//! order shard; the SKU only applies them ([`ApplyEvent`]).
//!
//! The actor publishes `available`, its sale window and the sequence number
//! of its last applied event in a [`SkuHint`], so a sold-out SKU can answer
//! `out_of_stock`, and a SKU outside its sale window `sale_not_started` or
//! `sale_ended`, without a mailbox round trip. The hint only ever refuses:
//! the actor stays the only authority that grants units, and checks the
//! window again itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::SendError;
use actix::{Actor, ActorContext, AsyncContext, Context, Handler, Message};
use tokio::sync::oneshot;

use crate::domain::event::SkuQty;
use crate::domain::idem::IdemBook;
use crate::domain::order::{Order, ReservedLine};
use crate::domain::promo::Promotion;
use crate::domain::sale::{SalePatch, SaleWindow};
use crate::domain::sku::{SkuState, SkuView};
use crate::domain::state::{apply_to_sku, moves_reservations};
use crate::domain::{DomainError, Event, IdemStamp, OrderId, SkuId, UserId};
use crate::engine::health::Alive;
use crate::engine::shard::{OrderShard, Place, Placed};
use crate::engine::slot::SkuHandle;
use crate::engine::snapshot::{Holes, OpenReservations};
use crate::engine::{Answer, Clock, Completion, EngineError, Reply};
use crate::faults;
use crate::journal::{Journal, Seq};
use crate::limits::SKU_IDLE_CHECK_MS_MAX;

/// A release the journal could not take is retried, 10 ms after the first
/// refusal, doubling to at most a second apart, for as long as the actor
/// lives: those units are held until it succeeds. (After a storage failure
/// the server reloads its durable state and this actor with it.)
const RELEASE_RETRY_FIRST_MS: u64 = 10;
const RELEASE_RETRY_MAX_MS: u64 = 1_000;

/// The hint's `sale_starts_at_ms` when the SKU has no start: every moment
/// is at or after it.
const NO_START_MS: u64 = 0;
/// The hint's `sale_ends_at_ms` when the SKU has no end: no moment reaches it.
const NO_END_MS: u64 = u64::MAX;

/// What a SKU actor publishes for callers that must not wait for it.
#[derive(Debug)]
pub(crate) struct SkuHint {
    available: AtomicU64,
    /// The sale window, `[sale_starts_at_ms, sale_ends_at_ms)`, with
    /// [`NO_START_MS`] and [`NO_END_MS`] for an open side.
    sale_starts_at_ms: AtomicU64,
    sale_ends_at_ms: AtomicU64,
    last_seq: AtomicU64,
}

impl Default for SkuHint {
    fn default() -> SkuHint {
        SkuHint {
            available: AtomicU64::new(0),
            sale_starts_at_ms: AtomicU64::new(NO_START_MS),
            sale_ends_at_ms: AtomicU64::new(NO_END_MS),
            last_seq: AtomicU64::new(0),
        }
    }
}

impl SkuHint {
    pub(crate) fn publish(&self, available: u64, sale: SaleWindow, seq: Seq) {
        // Sequence first: a reader that sees the new `available` or window
        // also sees a sequence number at least as new (release/acquire
        // pairing).
        self.last_seq.fetch_max(seq, Ordering::Release);
        self.sale_starts_at_ms
            .store(sale.starts_at_ms.unwrap_or(NO_START_MS), Ordering::Release);
        self.sale_ends_at_ms
            .store(sale.ends_at_ms.unwrap_or(NO_END_MS), Ordering::Release);
        self.available.store(available, Ordering::Release);
    }

    /// When the SKU cannot be ordered at `now_ms` (its sale has not started
    /// or has ended), the refusal and the sequence number it depends on;
    /// `None` when the actor must decide. Two atomic loads: as cheap as
    /// [`SkuHint::sold_out_for`].
    pub(crate) fn closed_at(&self, sku: SkuId, now_ms: u64) -> Option<(DomainError, Seq)> {
        let starts_at_ms = self.sale_starts_at_ms.load(Ordering::Acquire);
        let ends_at_ms = self.sale_ends_at_ms.load(Ordering::Acquire);
        let refusal = if now_ms < starts_at_ms {
            DomainError::SaleNotStarted { sku, starts_at_ms }
        } else if now_ms >= ends_at_ms {
            DomainError::SaleEnded { sku, ends_at_ms }
        } else {
            return None;
        };
        Some((refusal, self.last_seq.load(Ordering::Acquire)))
    }

    /// When fewer than `qty` units are available, the sequence number the
    /// answer depends on; `None` when the actor must decide.
    pub(crate) fn sold_out_for(&self, qty: u32) -> Option<Seq> {
        if self.available.load(Ordering::Acquire) < u64::from(qty) {
            Some(self.last_seq.load(Ordering::Acquire))
        } else {
            None
        }
    }

    /// The last sequence number the actor applied.
    pub(crate) fn last_seq(&self) -> Seq {
        self.last_seq.load(Ordering::Acquire)
    }
}

/// Units of one SKU held for an order that is being placed.
///
/// Dropping a `Reservation` that no order has taken releases its units (a
/// journaled `ReservationReleased`), so a caller that gives up half-way, or
/// is cancelled, never leaves units stuck.
pub struct Reservation {
    handle: Arc<SkuHandle>,
    id: OrderId,
    user: UserId,
    qty: u32,
    name: String,
    unit_price_cents: u64,
    armed: bool,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("id", &self.id)
            .field("sku", &self.handle.id)
            .field("qty", &self.qty)
            .finish()
    }
}

impl Reservation {
    /// The reservation's id.
    pub fn id(&self) -> OrderId {
        self.id
    }

    /// The SKU held.
    pub fn sku(&self) -> SkuId {
        self.handle.id
    }

    /// The units held.
    pub fn qty(&self) -> u32 {
        self.qty
    }

    /// The line an order makes of it: name and price as reserved. The name
    /// moves out (the reservation only needs its id, user and units).
    pub(crate) fn take_line(&mut self) -> ReservedLine {
        ReservedLine {
            sku: self.handle.id,
            name: std::mem::take(&mut self.name),
            qty: self.qty,
            unit_price_cents: self.unit_price_cents,
        }
    }

    /// The order that journaled it owns the units now: do not release.
    pub(crate) fn taken(mut self) {
        self.armed = false;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.armed {
            // Must reach the actor even when its mailbox is full: these units
            // are already held, and only this message gives them back.
            self.handle.do_send(ReleaseReservation {
                reservation: self.id,
                user: self.user,
                qty: self.qty,
                attempt: 0,
            });
        }
    }
}

/// The actor owning one SKU while it is awake (see `slot.rs`).
pub(crate) struct SkuActor {
    pub(super) state: SkuState,
    /// Its place in the catalog: the hint it publishes, where its state
    /// goes when it sleeps.
    handle: Arc<SkuHandle>,
    pub(super) journal: Arc<dyn Journal>,
    idem: Arc<IdemBook>,
    clock: Arc<dyn Clock>,
    /// Reservations are journaled under its lock (see `snapshot.rs`).
    open: Arc<OpenReservations>,
    /// Events from shards applied after a snapshot copied this SKU.
    pub(super) holes: Holes,
    /// The snapshot epoch `holes` notes for (see `slot.rs`).
    pub(super) holes_epoch: u64,
    /// Messages handled from the mailbox; equal to the handle's count of
    /// messages sent exactly when the mailbox is empty.
    handled: u64,
    /// Releases waiting to be retried (timers, outside the mailbox): the
    /// actor must not sleep while one is pending.
    retries: u32,
    /// When the last message was handled, by the engine's clock.
    last_active_ms: u64,
    /// Set once the state went back to the catalog: nothing may change it.
    asleep: bool,
    /// Marks the engine dead if this actor is dropped outside a shutdown
    /// or a sleep.
    alive: Option<Alive>,
}

impl SkuActor {
    /// The actor of `handle`'s SKU with `state`; `noting` is the epoch of
    /// a snapshot running while it starts (it notes holes from the start).
    pub(crate) fn new(state: SkuState, handle: Arc<SkuHandle>, noting: Option<u64>) -> SkuActor {
        let lives = Arc::clone(&handle.lives);
        let mut holes = Holes::default();
        if noting.is_some() {
            // Whatever this copy holds, an event applied from now on that a
            // snapshot copy of this SKU (taken asleep, before this start)
            // lacks is a hole; `Mark::new` keeps only those below the mark.
            holes.start(Seq::MAX);
        }
        SkuActor {
            alive: Some(
                lives
                    .health
                    .guard(format!("the actor of SKU {}", state.id())),
            ),
            last_active_ms: lives.clock.now_ms(),
            state,
            handle,
            journal: Arc::clone(&lives.journal),
            idem: Arc::clone(&lives.idem),
            clock: Arc::clone(&lives.clock),
            open: Arc::clone(&lives.open),
            holes,
            holes_epoch: noting.unwrap_or(0),
            handled: 0,
            retries: 0,
            asleep: false,
        }
    }

    /// Counts a message taken from the mailbox.
    pub(super) fn took(&mut self) {
        self.handled += 1;
        self.last_active_ms = self.clock.now_ms();
    }

    /// Hands the state back to the catalog and stops, if nothing holds the
    /// actor awake: a message in its mailbox, a pending retry, or holes
    /// noted for the snapshot that runs.
    fn try_sleep(&mut self, ctx: &mut Context<Self>) -> bool {
        if self.asleep {
            return true;
        }
        if self.holes.is_noting() && self.holes_epoch != self.handle.lives.epoch() {
            // A snapshot that ended (this actor woke after its last round).
            self.holes.forget();
        }
        if self.retries > 0 || self.holes.is_noting() {
            return false;
        }
        if !self.handle.put_to_sleep(self.handled, &self.state) {
            return false;
        }
        self.asleep = true;
        if let Some(alive) = self.alive.take() {
            alive.planned();
        }
        ctx.stop();
        true
    }

    /// Sleeps once idle for the configured time. Holes noted for a
    /// snapshot that has ended are dropped here too, idle or not, so they
    /// cannot pile up in a busy actor.
    fn idle_check(&mut self, ctx: &mut Context<Self>) {
        if self.holes.is_noting() && self.holes_epoch != self.handle.lives.epoch() {
            self.holes.forget();
        }
        let idle_ms = self.clock.now_ms().saturating_sub(self.last_active_ms);
        if idle_ms >= self.handle.lives.idle_ms {
            self.try_sleep(ctx);
        }
    }

    /// Journals a decided event, then applies it.
    fn commit(&mut self, event: &Event) -> Result<Seq, EngineError> {
        let seq = if moves_reservations(event) {
            self.open.commit(self.journal.as_ref(), event)?
        } else {
            self.journal.append(event)?
        };
        self.apply(event, seq);
        Ok(seq)
    }

    /// Applies an event that is already journaled.
    fn apply(&mut self, event: &Event, seq: Seq) {
        debug_assert!(!self.asleep, "a sleeping actor's state changed");
        if let Err(error) = apply_to_sku(&mut self.state, &self.idem, event) {
            // The decision ruled this out; a journaled event that does not
            // apply is a bug, and limping on would serve wrong stock.
            panic!(
                "SKU {} cannot apply journaled event {seq}: {error}",
                self.state.id()
            );
        }
        self.handle
            .hint
            .publish(self.state.levels().available, self.state.sale(), seq);
    }

    fn answer<T>(&self, reply: Reply<T>, result: Result<T, EngineError>) {
        let _ = reply.send(Answer {
            result,
            seen: self.handle.hint.last_seq(),
        });
    }
}

impl Actor for SkuActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let every_ms = (self.handle.lives.idle_ms / 2).clamp(1, SKU_IDLE_CHECK_MS_MAX);
        ctx.run_interval(Duration::from_millis(every_ms), Self::idle_check);
    }
}

/// Sleep now if nothing holds the actor awake, idle or not (tests and
/// operators); answers whether it did.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Sleep {
    pub(crate) reply: Reply<bool>,
}

impl Handler<Sleep> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: Sleep, ctx: &mut Context<Self>) {
        self.took();
        let slept = self.try_sleep(ctx);
        self.answer(msg.reply, Ok(slept));
    }
}

impl Handler<crate::engine::runtime::Stop> for SkuActor {
    type Result = ();

    /// The engine stops on a shared pool: stop here, whatever is queued.
    fn handle(&mut self, msg: crate::engine::runtime::Stop, ctx: &mut Context<Self>) {
        ctx.stop();
        drop(msg.done);
    }
}

/// Hold `qty` units for `user` under a new reservation id.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Reserve {
    pub(crate) handle: Arc<SkuHandle>,
    pub(crate) reservation: OrderId,
    pub(crate) user: UserId,
    pub(crate) qty: u32,
    pub(crate) reply: Reply<Reservation>,
}

impl Handler<Reserve> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: Reserve, ctx: &mut Context<Self>) {
        self.took();
        faults::panic_if("panic-sku", self.state.id().as_str());
        if faults::is_set("stop-sku", self.state.id().as_str()) {
            ctx.stop();
            return;
        }
        let now_ms = self.clock.now_ms();
        let result = self
            .state
            .decide_reserve(msg.reservation, msg.user, msg.qty, now_ms)
            .map_err(EngineError::from)
            .and_then(|event| self.commit(&event))
            .map(|_| Reservation {
                handle: msg.handle,
                id: msg.reservation,
                user: msg.user,
                qty: msg.qty,
                name: self.state.name().to_owned(),
                unit_price_cents: self.state.price_cents(),
                armed: true,
            });
        // If the caller is gone, the answer is dropped here and a granted
        // reservation releases itself.
        self.answer(msg.reply, result);
    }
}

/// One order on its way through the SKU actors of its lines and then to
/// its order shard: each SKU reserves its line and passes the placement on,
/// so a placement costs one hop per line and none of them waits. A refusal
/// (or a full mailbox ahead) answers the caller and drops the placement,
/// whose reservations give their units back.
pub(crate) struct Placement {
    pub(crate) order_id: OrderId,
    pub(crate) user: UserId,
    /// Lines still to reserve, last one next: the SKU, units, reservation id.
    pub(crate) pending: Vec<(Arc<SkuHandle>, u32, OrderId)>,
    /// Lines reserved so far.
    pub(crate) held: Vec<Reservation>,
    pub(crate) shard: Arc<actix::Addr<OrderShard>>,
    pub(crate) promo: Option<Promotion>,
    pub(crate) from_cart: Option<Vec<SkuQty>>,
    pub(crate) idem: Option<IdemStamp>,
    /// How long the order holds its units unpaid.
    pub(crate) ttl_ms: u64,
    pub(crate) reply: Reply<Option<Order>>,
}

impl Message for Placement {
    type Result = ();
}

impl Placement {
    /// Passes the placement to the next SKU, or to the order shard once every
    /// line is held. A full mailbox answers `Overloaded`.
    fn forward(self, seen: Seq) {
        let refused = match self.pending.last() {
            Some((next, ..)) => {
                let next = Arc::clone(next);
                match next.try_send(self) {
                    Ok(()) => return,
                    Err(SendError::Full(back) | SendError::Closed(back)) => back.reply,
                }
            }
            None => {
                let shard = Arc::clone(&self.shard);
                let place = Place {
                    order_id: self.order_id,
                    user: self.user,
                    reservations: self.held,
                    promo: self.promo,
                    from_cart: self.from_cart,
                    idem: self.idem,
                    reply: self.reply,
                };
                match shard.try_send(place) {
                    Ok(()) => return,
                    Err(SendError::Full(back) | SendError::Closed(back)) => back.reply,
                }
            }
        };
        // Everything held so far was dropped with the refused message.
        let _ = refused.send(Answer {
            result: Err(EngineError::Overloaded),
            seen,
        });
    }
}

impl SkuActor {
    /// Places a single-line order here in one step: the checks of a
    /// reservation, the order built with this SKU's name and price, one
    /// journaled `OrderPlacedAtSku` that moves the units, then the order
    /// handed to its shard. Half the journal events of a reservation plus an
    /// order, and no reservation to release if the caller goes away.
    fn place_here(&mut self, mut msg: Placement, qty: u32) {
        let now_ms = self.clock.now_ms();
        let line = ReservedLine {
            sku: self.state.id(),
            name: self.state.name().to_owned(),
            qty,
            unit_price_cents: self.state.price_cents(),
        };
        let placed = self
            .state
            .check_reserve(&msg.user, qty, now_ms)
            .and_then(|()| {
                Order::place(
                    msg.order_id,
                    msg.user,
                    vec![line],
                    msg.promo.as_ref(),
                    now_ms,
                    msg.ttl_ms,
                )
            })
            .map_err(EngineError::from)
            .and_then(|order| {
                let event = Event::OrderPlacedAtSku {
                    order: Box::new(order),
                    idem: msg.idem.take(),
                };
                self.commit(&event).map(|seq| (event, seq))
            });
        match placed {
            // Must arrive: the order is journaled (see `Placed`).
            Ok((event, seq)) => msg.shard.do_send(Placed {
                event,
                seq,
                reply: msg.reply,
            }),
            Err(error) => self.answer(msg.reply, Err(error)),
        }
    }
}

impl Handler<Placement> for SkuActor {
    type Result = ();

    fn handle(&mut self, mut msg: Placement, _: &mut Context<Self>) {
        self.took();
        faults::panic_if("panic-sku", self.state.id().as_str());
        if let [(_, qty, _)] = msg.pending.as_slice()
            && msg.held.is_empty()
            && msg.from_cart.is_none()
        {
            let qty = *qty;
            self.place_here(msg, qty);
            return;
        }
        let Some((handle, qty, reservation)) = msg.pending.pop() else {
            msg.forward(self.handle.hint.last_seq());
            return;
        };
        debug_assert_eq!(
            handle.id,
            self.state.id(),
            "a placement reached the wrong SKU"
        );
        let now_ms = self.clock.now_ms();
        let held = self
            .state
            .decide_reserve(reservation, msg.user, qty, now_ms)
            .map_err(EngineError::from)
            .and_then(|event| self.commit(&event));
        match held {
            Ok(_) => {
                msg.held.push(Reservation {
                    handle,
                    id: reservation,
                    user: msg.user,
                    qty,
                    name: self.state.name().to_owned(),
                    unit_price_cents: self.state.price_cents(),
                    armed: true,
                });
                msg.forward(self.handle.hint.last_seq());
            }
            Err(error) => {
                let Placement { reply, held, .. } = msg;
                drop(held);
                self.answer(reply, Err(error));
            }
        }
    }
}

/// Give back a reservation no order took.
#[derive(Message)]
#[rtype(result = "()")]
struct ReleaseReservation {
    reservation: OrderId,
    user: UserId,
    qty: u32,
    attempt: u32,
}

impl Handler<ReleaseReservation> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: ReleaseReservation, ctx: &mut Context<Self>) {
        if msg.attempt == 0 {
            self.took();
        } else {
            // A retry comes from this actor's own timer, not the mailbox.
            self.retries = self.retries.saturating_sub(1);
        }
        let event = Event::ReservationReleased {
            sku: self.state.id(),
            reservation: msg.reservation,
            user: msg.user,
            qty: msg.qty,
            at_ms: self.clock.now_ms(),
        };
        if let Err(error) = self.commit(&event) {
            if msg.attempt == 10 {
                tracing::warn!(
                    sku = %self.state.id(), reservation = %msg.reservation, qty = msg.qty, %error,
                    "a reservation cannot be released yet; retrying"
                );
            }
            let delay_ms = RELEASE_RETRY_FIRST_MS
                .saturating_mul(1 << msg.attempt.min(10))
                .min(RELEASE_RETRY_MAX_MS);
            let retry = ReleaseReservation {
                attempt: msg.attempt.saturating_add(1),
                ..msg
            };
            self.retries = self.retries.saturating_add(1);
            ctx.notify_later(retry, Duration::from_millis(delay_ms));
        }
    }
}

/// Apply an order event an order shard has journaled.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ApplyEvent {
    pub(crate) event: Arc<Event>,
    pub(crate) seq: Seq,
    /// Dropped once applied, which tells the caller its change is visible.
    pub(crate) done: Option<Arc<Completion>>,
}

impl Handler<ApplyEvent> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: ApplyEvent, _: &mut Context<Self>) {
        self.took();
        self.holes.applying(msg.seq);
        self.apply(&msg.event, msg.seq);
        drop(msg.done);
    }
}

/// Read the SKU.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct View {
    pub(crate) reply: Reply<SkuView>,
}

impl Handler<View> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: View, _: &mut Context<Self>) {
        self.took();
        let view = self.state.view();
        self.answer(msg.reply, Ok(view));
    }
}

/// Change name, price or limit.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Update {
    pub(crate) name: Option<String>,
    pub(crate) price_cents: Option<u64>,
    pub(crate) per_user_limit: Option<Option<u32>>,
    pub(crate) sale: SalePatch,
    pub(crate) reply: Reply<SkuView>,
}

impl Handler<Update> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: Update, _: &mut Context<Self>) {
        self.took();
        let now_ms = self.clock.now_ms();
        let result = self
            .state
            .decide_update(
                msg.name,
                msg.price_cents,
                msg.per_user_limit,
                msg.sale,
                now_ms,
            )
            .map_err(EngineError::from)
            .and_then(|event| self.commit(&event))
            .map(|_| self.state.view());
        self.answer(msg.reply, result);
    }
}

/// Add units.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Restock {
    pub(crate) qty: u64,
    pub(crate) idem: Option<IdemStamp>,
    pub(crate) reply: Reply<SkuView>,
}

impl Handler<Restock> for SkuActor {
    type Result = ();

    fn handle(&mut self, msg: Restock, _: &mut Context<Self>) {
        self.took();
        let now_ms = self.clock.now_ms();
        let result = self
            .state
            .decide_restock(msg.qty, msg.idem, now_ms)
            .map_err(EngineError::from)
            .and_then(|event| self.commit(&event))
            .map(|_| self.state.view());
        self.answer(msg.reply, result);
    }
}

/// A fresh reply channel.
pub(crate) fn reply_channel<T>() -> (Reply<T>, oneshot::Receiver<Answer<T>>) {
    oneshot::channel()
}
