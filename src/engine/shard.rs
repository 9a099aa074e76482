//! `OrderShard`: an actor owning the orders and carts of the users hashed to
//! it, and driving each of its orders through its states.
//!
//! Every order move is decided here with the pure domain, journaled, applied
//! to the shard's book, and then its SKU moves are sent to the SKU actors.
//! Those messages must arrive (the event is already in the journal), so they
//! bypass the mailbox bound; they are few (one per SKU line) and only follow
//! a change this shard accepted through its own bounded mailbox. The caller
//! is told when every SKU has applied its part ([`Completion`]), so a client
//! that cancels and then reads the SKU sees its units back.
//!
//! Each shard keeps a deadline heap of its reserved orders and expires the
//! overdue ones on a timer, earliest first, for at most
//! [`SWEEP_SLICE_US`](crate::limits::SWEEP_SLICE_US) and
//! [`EXPIRY_BATCH_MAX`](crate::limits::EXPIRY_BATCH_MAX) orders a tick; an
//! overdue order is also expired before any other move or read of it, so it
//! never reads as reserved past its deadline.
//!
//! On the same timer a shard moves finished orders older than the retention
//! window to the archive, in batches of at most
//! [`ARCHIVE_BATCH_MAX`](crate::limits::ARCHIVE_BATCH_MAX) picked for at
//! most [`SWEEP_SLICE_US`](crate::limits::SWEEP_SLICE_US) a tick (a batch
//! may fill over several ticks; a shard with nothing more due sweeps again
//! after [`ARCHIVE_SWEEP_MS`](crate::limits::ARCHIVE_SWEEP_MS), one with a
//! backlog at the next tick): the archive write and its sync
//! run on a blocking thread, so the shard's mailbox keeps moving; once they
//! are durable the shard journals `OrdersArchived` for the orders still as
//! they were written, which drops them from memory. One batch per shard is
//! in flight at a time. An order asked for that is not in memory is read
//! from the archive; a change to it journals `OrderRestored` first.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, AsyncContext, Context, Handler, Message};
use dashmap::DashMap;

use crate::clock::SliceBudget;
use crate::domain::book::OrderBook;
use crate::domain::cart::Cart;
use crate::domain::event::{ReleaseReason, SkuQty};
use crate::domain::idem::IdemBook;
use crate::domain::order::{Order, OrderStatus};
use crate::domain::promo::Promotion;
use crate::domain::state::moves_reservations;
use crate::domain::{Event, IdemStamp, OrderId, PaymentRef, SkuId, UserId};
use crate::engine::health::Alive;
use crate::engine::sku::{ApplyEvent, Reservation};
use crate::engine::slot::Catalog;
use crate::engine::snapshot::{Holes, OpenReservations};
use crate::engine::{Answer, Caller, Clock, Completion, EngineError, Reply};
use crate::faults;
use crate::journal::{Archive, Journal, Seq};
use crate::limits::{
    EXPIRY_BATCH_MAX, EXPIRY_TICK_MS, LINES_MAX, SWEEP_CLOCK_EVERY, SWEEP_SLICE_US,
};

/// The time budget of one sweep in one tick ([`SWEEP_SLICE_US`]).
pub(super) fn sweep_budget() -> SliceBudget {
    SliceBudget::new(Duration::from_micros(SWEEP_SLICE_US), SWEEP_CLOCK_EVERY)
}

/// Every SKU's handle, by id.
pub(crate) type SkuRegistry = Catalog;

/// Which shard holds each order.
pub(crate) type OrderRoutes = DashMap<OrderId, u16>;

/// What shards share.
pub(crate) struct ShardContext {
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) idem: Arc<IdemBook>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) skus: Arc<SkuRegistry>,
    pub(crate) routes: Arc<OrderRoutes>,
    pub(crate) ttl_ms: u64,
    /// Reservations are journaled under its lock (see `snapshot.rs`).
    pub(crate) open: Arc<OpenReservations>,
    /// Where finished orders go, if the journal keeps an archive.
    pub(crate) archive: Option<Arc<dyn Archive>>,
    /// How long a finished order stays in memory; `None`: for ever.
    pub(crate) archive_after_ms: Option<u64>,
    /// Shards of a reader of the durable state journal nothing (no
    /// expiries either: the journal refuses them).
    pub(crate) read_only: bool,
}

/// An actor owning a partition of orders and carts.
pub(crate) struct OrderShard {
    index: u16,
    pub(super) book: OrderBook,
    deadlines: BinaryHeap<Reverse<(u64, OrderId)>>,
    /// Finished orders by the time they finished, oldest first: the
    /// archive sweep's queue. An entry whose order has moved on since (a
    /// refund of a delivered order) is stale and skipped; the move pushed a
    /// new one.
    pub(super) finished: BinaryHeap<Reverse<(u64, OrderId)>>,
    /// Copies of the due finished orders picked for the next archive
    /// write: a pick is bounded by time each tick, so a batch may take
    /// several ticks to fill.
    pub(super) picked: Vec<Order>,
    /// Whether an archive batch is being written (at most one at a time).
    pub(super) archiving: bool,
    /// When the next archive sweep may run, unix milliseconds.
    pub(super) next_sweep_ms: u64,
    pub(super) shared: Arc<ShardContext>,
    last_seq: Seq,
    /// Orders placed at SKUs applied after a snapshot copied this book.
    pub(super) holes: Holes,
    /// Orders by state, kept up to date on every commit (for metrics).
    counts: [u64; OrderStatus::ALL.len()],
    /// Marks the engine dead if this shard is dropped outside a shutdown.
    _alive: Alive,
}

fn status_index(status: OrderStatus) -> usize {
    OrderStatus::ALL
        .iter()
        .position(|s| *s == status)
        .unwrap_or(0)
}

impl OrderShard {
    pub(crate) fn new(
        index: u16,
        book: OrderBook,
        shared: Arc<ShardContext>,
        seq: Seq,
        alive: Alive,
    ) -> Self {
        let deadlines = book
            .orders()
            .filter(|o| o.status == OrderStatus::Reserved)
            .map(|o| Reverse((o.expires_at_ms, o.id)))
            .collect();
        let finished = book
            .orders()
            .filter(|o| o.status.is_final())
            .map(|o| Reverse((finished_at_ms(o), o.id)))
            .collect();
        let mut counts = [0; OrderStatus::ALL.len()];
        for order in book.orders() {
            counts[status_index(order.status)] += 1;
        }
        OrderShard {
            index,
            book,
            deadlines,
            finished,
            picked: Vec::new(),
            archiving: false,
            next_sweep_ms: 0,
            shared,
            last_seq: seq,
            holes: Holes::default(),
            counts,
            _alive: alive,
        }
    }

    pub(super) fn answer<T>(&self, reply: Reply<T>, result: Result<T, EngineError>) {
        let _ = reply.send(Answer {
            result,
            seen: self.last_seq,
        });
    }

    /// Journals a decided event, applies it, and sends its SKU moves. Gives
    /// the event back (shared with the SKU actors it went to, if any).
    pub(super) fn commit(
        &mut self,
        event: Event,
        done: Option<&Arc<Completion>>,
    ) -> Result<(Seq, Arc<Event>), EngineError> {
        let seq = if moves_reservations(&event) {
            self.shared
                .open
                .commit(self.shared.journal.as_ref(), &event)?
        } else {
            self.shared.journal.append(&event)?
        };
        self.book_keep(Cow::Borrowed(&event), seq);
        let event = Arc::new(event);
        for sku in event.touched_skus() {
            match self.shared.skus.get(&sku) {
                Some(handle) => handle.do_send(ApplyEvent {
                    event: Arc::clone(&event),
                    seq,
                    done: done.cloned(),
                }),
                // SKUs are never removed, and an order only names SKUs
                // that existed when it was placed.
                None => panic!("event {seq} moves units of unregistered SKU {sku}"),
            }
        }
        Ok((seq, event))
    }

    /// Applies a journaled event to the book and keeps the shard's indexes
    /// (orders by state, routes, deadlines) up to date.
    /// An event the caller still needs is copied into the book where it
    /// must be (`Cow::Borrowed`); one it hands over moves in (`Cow::Owned`).
    fn book_keep(&mut self, event: Cow<'_, Event>, seq: Seq) {
        let prior = event.order_id().and_then(|id| self.book.get(id));
        let before = prior.map(|o| o.status);
        let finished_before = prior.map(finished_at_ms);
        // What the indexes need, taken before an owned event moves away.
        let placed = match &*event {
            Event::OrderPlaced { order, .. } | Event::OrderPlacedAtSku { order, .. } => {
                Some((order.id, order.expires_at_ms))
            }
            _ => None,
        };
        let restored = match &*event {
            Event::OrderRestored { order, .. } => Some(order.id),
            _ => None,
        };
        if let Event::OrdersArchived { ids, .. } = &*event {
            for id in ids {
                if let Some(order) = self.book.get(*id) {
                    self.counts[status_index(order.status)] -= 1;
                }
                self.shared.routes.remove(id);
            }
        }
        let id = placed
            .map(|(id, _)| id)
            .or(restored)
            .or_else(|| event.order_id());
        let applied = match event {
            Cow::Borrowed(event) => self.book.apply(&self.shared.idem, event),
            Cow::Owned(event) => self.book.apply_owned(&self.shared.idem, event),
        };
        if let Err(error) = applied {
            // A journaled event that does not apply is a bug, and limping on
            // would serve wrong orders.
            panic!(
                "order shard {} cannot apply journaled event {seq}: {error}",
                self.index
            );
        }
        // An order placed at its SKU was journaled there, possibly before
        // events this shard journaled since.
        self.last_seq = self.last_seq.max(seq);
        if let Some(order) = id.and_then(|id| self.book.get(id)) {
            let after = order.status;
            if let Some(before) = before {
                self.counts[status_index(before)] -= 1;
            }
            self.counts[status_index(after)] += 1;
            // A final order is queued for the archive under the time of its
            // last history entry, and a queue entry whose time no longer
            // matches is dropped as stale: so a change that adds an entry
            // and keeps the order final (a partial refund of a delivered
            // order) queues it again, or it would stay in memory for good.
            let finished_now = finished_at_ms(order);
            if after.is_final() && (before != Some(after) || finished_before != Some(finished_now))
            {
                self.finished.push(Reverse((finished_now, order.id)));
            }
        }
        if let Some(id) = restored {
            self.shared.routes.insert(id, self.index);
        }
        if let Some((id, expires_at_ms)) = placed {
            self.shared.routes.insert(id, self.index);
            self.deadlines.push(Reverse((expires_at_ms, id)));
        }
    }

    /// Expires the order if it is unpaid past its deadline.
    fn expire_if_overdue(
        &mut self,
        id: OrderId,
        now_ms: u64,
        done: Option<&Arc<Completion>>,
    ) -> Result<(), EngineError> {
        let Some(order) = self.book.get(id) else {
            return Ok(());
        };
        if self.shared.read_only || !order.is_overdue(now_ms) {
            return Ok(());
        }
        let event = order.decide_release(ReleaseReason::Expired, now_ms)?;
        self.commit(event, done).map(|_| ())
    }

    /// Expires up to [`EXPIRY_BATCH_MAX`] overdue orders, earliest deadline
    /// first, until `budget` is spent; returns how many. The rest wait for
    /// the next tick.
    fn expire_due(
        &mut self,
        now_ms: u64,
        done: Option<&Arc<Completion>>,
        budget: &mut SliceBudget,
    ) -> usize {
        let mut expired = 0;
        // Each turn pops a deadline or stops: bounded by the heap.
        while expired < EXPIRY_BATCH_MAX && !budget.spent() {
            let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() else {
                break;
            };
            if deadline > now_ms {
                break;
            }
            self.deadlines.pop();
            let overdue = self.book.get(id).is_some_and(|o| o.is_overdue(now_ms));
            if !overdue {
                continue; // paid or cancelled since: nothing to do
            }
            match self.expire_if_overdue(id, now_ms, done) {
                Ok(()) => expired += 1,
                Err(error) => {
                    // Journal full or failing: keep the deadline for the next tick.
                    self.deadlines.push(Reverse((deadline, id)));
                    tracing::warn!(order = %id, %error, "could not expire an order; retrying");
                    break;
                }
            }
        }
        expired
    }

    fn order_for(&self, id: OrderId, caller: &Caller) -> Result<&Order, EngineError> {
        let order = self
            .book
            .get(id)
            .ok_or_else(|| EngineError::order_not_found(id))?;
        if !caller.admin && caller.user != order.user {
            return Err(EngineError::Forbidden(format!(
                "order {id} belongs to another user"
            )));
        }
        Ok(order)
    }
}

impl Actor for OrderShard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if self.shared.read_only {
            return;
        }
        ctx.run_interval(Duration::from_millis(EXPIRY_TICK_MS), |shard, ctx| {
            let now_ms = shard.shared.clock.now_ms();
            crate::steps::timed(crate::steps::Step::Expiry, || {
                shard.expire_due(now_ms, None, &mut sweep_budget())
            });
            crate::steps::timed(crate::steps::Step::Archive, || {
                shard.sweep_archive(now_ms, ctx);
            });
        });
    }
}

impl Handler<crate::engine::runtime::Stop> for OrderShard {
    type Result = ();

    /// The engine stops on a shared pool: stop here, whatever is queued.
    fn handle(&mut self, msg: crate::engine::runtime::Stop, ctx: &mut Context<Self>) {
        actix::ActorContext::stop(ctx);
        drop(msg.done);
    }
}

/// Place an order from reservations.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Place {
    pub(crate) order_id: OrderId,
    pub(crate) user: UserId,
    pub(crate) reservations: Vec<Reservation>,
    pub(crate) promo: Option<Promotion>,
    /// For a checkout: the cart lines the order was built from. The cart
    /// must still hold exactly these, else the answer is `None` (retry).
    pub(crate) from_cart: Option<Vec<SkuQty>>,
    pub(crate) idem: Option<IdemStamp>,
    pub(crate) reply: Reply<Option<Order>>,
}

impl Handler<Place> for OrderShard {
    type Result = ();

    fn handle(&mut self, mut msg: Place, _: &mut Context<Self>) {
        let now_ms = self.shared.clock.now_ms();
        let result = (|| {
            if let Some(expected) = &msg.from_cart
                && self.book.cart(&msg.user).items() != expected.as_slice()
            {
                return Ok(None);
            }
            let lines: Vec<_> = msg
                .reservations
                .iter_mut()
                .map(Reservation::take_line)
                .collect();
            let order = Order::place(
                msg.order_id,
                msg.user,
                lines,
                msg.promo.as_ref(),
                now_ms,
                self.shared.ttl_ms,
            )?;
            let event = Event::OrderPlaced {
                order: Box::new(order),
                reservations: msg.reservations.iter().map(Reservation::id).collect(),
                from_cart: msg.from_cart.is_some(),
                idem: msg.idem.take(),
            };
            let (_, event) = self.commit(event, None)?;
            // No SKU holds this event (placing moves no units): take it back.
            match Arc::try_unwrap(event) {
                Ok(Event::OrderPlaced { order, .. }) => Ok(Some(*order)),
                _ => self
                    .book
                    .get(msg.order_id)
                    .cloned()
                    .map(Some)
                    .ok_or_else(|| EngineError::order_not_found(msg.order_id)),
            }
        })();
        if matches!(result, Ok(Some(_))) {
            // Journaled: the order owns the units now.
            msg.reservations.into_iter().for_each(Reservation::taken);
        }
        // Otherwise the reservations drop here and release their units.
        self.answer(msg.reply, result);
    }
}

/// A single-line order its SKU actor placed and journaled in one step
/// (`OrderPlacedAtSku`): the shard takes it into its book and answers the
/// caller. It must arrive (the order is in the journal and holds units), so
/// it bypasses the mailbox bound, like the SKU moves a shard sends; it only
/// follows a placement the SKU's own bounded mailbox accepted.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Placed {
    pub(crate) event: Event,
    pub(crate) seq: Seq,
    pub(crate) reply: Reply<Option<Order>>,
}

impl Handler<Placed> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: Placed, _: &mut Context<Self>) {
        let order = match &msg.event {
            Event::OrderPlacedAtSku { order, .. } => Order::clone(order),
            other => panic!(
                "order shard {} was handed {other:?} as a placed order",
                self.index
            ),
        };
        self.holes.applying(msg.seq);
        self.book_keep(Cow::Owned(msg.event), msg.seq);
        self.answer(msg.reply, Ok(Some(order)));
    }
}

/// What is asked of an existing order.
#[derive(Debug, Clone)]
pub(crate) enum OrderOp {
    Get,
    /// A read that changes nothing, not even an overdue order's expiry (an
    /// idempotency record's answer is rendered from it).
    Peek,
    Pay {
        payment_ref: PaymentRef,
        amount_cents: u64,
        idem: Option<IdemStamp>,
    },
    Cancel,
    Ship,
    Deliver,
    Refund {
        lines: Vec<SkuQty>,
        restock: bool,
        idem: Option<IdemStamp>,
    },
}

/// The answer to an [`Act`]: the order, and a signal that fires once every
/// SKU has applied the move (immediately when there was none).
pub(crate) struct Acted {
    pub(crate) order: Order,
    pub(crate) applied: tokio::sync::oneshot::Receiver<()>,
}

/// Read or move an order.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Act {
    pub(crate) order_id: OrderId,
    pub(crate) caller: Caller,
    pub(crate) op: OrderOp,
    pub(crate) reply: Reply<Acted>,
}

impl Handler<Act> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: Act, _: &mut Context<Self>) {
        let now_ms = self.shared.clock.now_ms();
        let (done, applied) = Completion::new();
        let result = (|| {
            // Not in memory: the archive's copy, if it holds one.
            let mut archived = self.archived_copy(msg.order_id)?;
            match &archived {
                Some(order) => check_owner(order, &msg.caller)?,
                None => {
                    self.order_for(msg.order_id, &msg.caller)?;
                }
            }
            let admin_only = !matches!(msg.op, OrderOp::Get | OrderOp::Peek | OrderOp::Cancel);
            if admin_only && !msg.caller.admin {
                return Err(EngineError::Forbidden("this needs an admin".into()));
            }
            if archived.is_none() && !matches!(msg.op, OrderOp::Peek) {
                self.expire_if_overdue(msg.order_id, now_ms, Some(&done))?;
            }
            let order = match &archived {
                Some(order) => order,
                None => self.order_for(msg.order_id, &msg.caller)?,
            };
            let event = decide(order, msg.op, now_ms)?;
            if let Some(event) = event {
                if let Some(order) = archived.take() {
                    // Back into memory first, as the archive holds it; the
                    // change then applies to it like to any live order.
                    let restore = Event::OrderRestored {
                        order: Box::new(order),
                        at_ms: now_ms,
                    };
                    self.commit(restore, Some(&done))?;
                }
                self.commit(event, Some(&done))?;
            }
            if let Some(order) = archived {
                return Ok(order);
            }
            let order = self
                .book
                .get(msg.order_id)
                .cloned()
                .ok_or_else(|| EngineError::order_not_found(msg.order_id))?;
            Ok(order)
        })();
        drop(done);
        let result = result.map(|order| Acted { order, applied });
        self.answer(msg.reply, result);
    }
}

/// Decides what `op` does to `order`: `None` for a read or a repeat that
/// changes nothing.
fn decide(order: &Order, op: OrderOp, now_ms: u64) -> Result<Option<Event>, EngineError> {
    let event = match op {
        OrderOp::Get | OrderOp::Peek => None,
        OrderOp::Pay {
            payment_ref,
            amount_cents,
            idem,
        } => {
            faults::panic_if("panic-shard-pay", "1");
            order.decide_pay(payment_ref, amount_cents, idem, now_ms)?
        }
        OrderOp::Cancel => Some(order.decide_release(ReleaseReason::Cancelled, now_ms)?),
        OrderOp::Ship => Some(order.decide_ship(now_ms)?),
        OrderOp::Deliver => Some(order.decide_deliver(now_ms)?),
        OrderOp::Refund {
            lines,
            restock,
            idem,
        } => Some(order.decide_refund(&lines, restock, idem, now_ms)?),
    };
    Ok(event)
}

/// `Forbidden` unless the caller owns the order or is an admin.
fn check_owner(order: &Order, caller: &Caller) -> Result<(), EngineError> {
    if !caller.admin && caller.user != order.user {
        return Err(EngineError::Forbidden(format!(
            "order {} belongs to another user",
            order.id
        )));
    }
    Ok(())
}

/// When an order entered its current state: the last entry of its history.
pub(super) fn finished_at_ms(order: &Order) -> u64 {
    order
        .history
        .last()
        .map_or(order.created_at_ms, |c| c.at_ms)
}

/// List orders, newest first.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct List {
    /// Only this user's orders, or everyone's.
    pub(crate) user: Option<UserId>,
    pub(crate) limit: usize,
    pub(crate) reply: Reply<Vec<Order>>,
}

impl Handler<List> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: List, _: &mut Context<Self>) {
        let orders = match &msg.user {
            Some(user) => self.book.list_user(user, msg.limit),
            None => self.book.list_all(msg.limit),
        };
        let orders = orders.into_iter().cloned().collect();
        self.answer(msg.reply, Ok(orders));
    }
}

/// Read, change or empty a cart.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CartOp {
    pub(crate) user: UserId,
    /// `None` reads; `Some((sku, qty))` sets a line; see `clear`.
    pub(crate) set: Option<(SkuId, u32)>,
    /// Empty the cart.
    pub(crate) clear: bool,
    pub(crate) reply: Reply<Cart>,
}

impl Handler<CartOp> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: CartOp, _: &mut Context<Self>) {
        let now_ms = self.shared.clock.now_ms();
        let cart = self.book.cart(&msg.user);
        let result = (|| {
            let event = match (msg.set, msg.clear) {
                (Some((sku, qty)), _) => Some(cart.decide_set(msg.user, sku, qty, now_ms)?),
                (None, true) if !cart.is_empty() => Some(Event::CartCleared {
                    user: msg.user,
                    at_ms: now_ms,
                }),
                (None, _) => None,
            };
            if let Some(event) = event {
                self.commit(event, None)?;
            }
            let cart = self.book.cart(&msg.user);
            debug_assert!(cart.items().len() <= LINES_MAX);
            Ok::<_, EngineError>(cart)
        })();
        self.answer(msg.reply, result);
    }
}

/// Expire every overdue order now (tests drive time by hand with this).
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct ExpireDue {
    pub(crate) reply: Reply<(usize, tokio::sync::oneshot::Receiver<()>)>,
}

impl Handler<ExpireDue> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: ExpireDue, _: &mut Context<Self>) {
        let now_ms = self.shared.clock.now_ms();
        let (done, applied) = Completion::new();
        // Driven by hand (tests): bounded by count only, so it is the same
        // on a slow machine.
        let expired = self.expire_due(now_ms, Some(&done), &mut SliceBudget::unlimited());
        drop(done);
        self.answer(msg.reply, Ok((expired, applied)));
    }
}

/// Orders by state, for metrics.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct CountByStatus {
    pub(crate) reply: Reply<Vec<(OrderStatus, u64)>>,
}

impl Handler<CountByStatus> for OrderShard {
    type Result = ();

    fn handle(&mut self, msg: CountByStatus, _: &mut Context<Self>) {
        let counts = OrderStatus::ALL.iter().copied().zip(self.counts).collect();
        self.answer(msg.reply, Ok(counts));
    }
}
