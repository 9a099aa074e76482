//! The engine: SKU actors, order shards, and the [`Engine`] handle that is
//! the only way in.
//!
//! `Engine` is a cheap cloneable handle; its async methods can be called from
//! any tokio runtime and hide actix entirely (the actors run on their own
//! threads, see `runtime.rs`). Every call sends one message with `try_send`:
//! a full mailbox is [`EngineError::Overloaded`] at once, never a queue
//! without end. Every answer carries the journal sequence number of the
//! state it saw; in strict durability the engine waits until that number is
//! durable before answering, so no client ever sees a change (or a refusal
//! caused by one) that a crash could take back.
//!
//! An order is placed in two steps: each line is reserved at its SKU actor
//! (concurrently, as [`Reservation`]s that release themselves if dropped),
//! then the user's order shard journals one `OrderPlaced` that takes them
//! all. So an order holds all of its lines or none, no actor ever waits for
//! another (no deadlock is possible), and a caller cancelled half-way leaves
//! nothing held. A single-line order (not a cart checkout, whose cart only
//! its shard can check) is placed in one step instead: its SKU actor builds
//! and journals one `OrderPlacedAtSku` that holds the units, and hands the
//! order to its shard, which must take it.

mod clock;
mod error;
mod health;
mod runtime;
mod shard;
mod sku;

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use actix::Addr;
use futures_util::future::try_join_all;
use tokio::sync::oneshot;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::EngineError;
pub use sku::Reservation;

use crate::domain::cart::Cart;
use crate::domain::event::{ReleaseReason, SkuQty};
use crate::domain::idem::{IdemBook, Lookup, Refusal};
use crate::domain::order::Order;
use crate::domain::promo::{CreateRefusal, Promotion, Promotions};
use crate::domain::sku::{SkuState, SkuView};
use crate::domain::{
    DomainError, Event, IdemStamp, IdempotencyKey, OrderId, OrderStatus, PaymentRef, PromoCode,
    SkuId, State, UserId, validate,
};
use crate::journal::{Journal, RELAXED_AHEAD_MS_MAX, Seq};
use crate::limits::{
    ACTOR_THREADS_DEFAULT, CHECKOUT_ATTEMPTS_MAX, ORDER_SHARD_MAILBOX, ORDER_SHARDS_DEFAULT,
    ORDER_SHARDS_MAX, ORDERS_LIST_MAX, RESERVATION_TTL_DEFAULT_MS, SKU_MAILBOX, SKUS_MAX,
};
use health::Health;
use runtime::ActorThreads;
use shard::{
    Act, CartOp, CountByStatus, ExpireDue, List, OrderOp, OrderRoutes, OrderShard, ShardContext,
    SkuRegistry,
};
use sku::{Placement, Reserve, Restock, SkuActor, SkuHandle, SkuHint, Update, View, reply_channel};

/// When a change counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DurabilityMode {
    /// Answer only once everything the answer depends on is durable.
    #[default]
    Strict,
    /// Answer at once; the journal flushes on a short timer.
    Relaxed,
}

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Actor threads (actix arbiters).
    pub actor_threads: usize,
    /// Order shards.
    pub order_shards: usize,
    /// How long an unpaid order holds its units.
    pub reservation_ttl_ms: u64,
    /// When a change counts as done.
    pub durability: DurabilityMode,
    /// Mailbox of each SKU actor.
    pub sku_mailbox: usize,
    /// Mailbox of each order shard.
    pub shard_mailbox: usize,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            actor_threads: ACTOR_THREADS_DEFAULT,
            order_shards: ORDER_SHARDS_DEFAULT,
            reservation_ttl_ms: RESERVATION_TTL_DEFAULT_MS,
            durability: DurabilityMode::Strict,
            sku_mailbox: SKU_MAILBOX,
            shard_mailbox: ORDER_SHARD_MAILBOX,
        }
    }
}

/// Who is calling: their user id, and whether they are an admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's user id (their token's `sub`).
    pub user: UserId,
    /// Whether their role is `admin`.
    pub admin: bool,
}

/// Which orders to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderScope {
    /// One user's.
    User(UserId),
    /// Everyone's.
    All,
}

/// A new SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSku {
    /// Its id.
    pub sku: SkuId,
    /// Its name.
    pub name: String,
    /// Its unit price.
    pub price_cents: u64,
    /// Its initial stock.
    pub stock: u64,
    /// Most units per user, or none.
    pub per_user_limit: Option<u32>,
}

/// An actor's answer: the result, and the journal sequence number of the
/// state it saw (the answer may only be given once that is durable).
pub(crate) struct Answer<T> {
    pub(crate) result: Result<T, EngineError>,
    pub(crate) seen: Seq,
}

/// Where an actor sends its answer.
pub(crate) type Reply<T> = oneshot::Sender<Answer<T>>;

/// Fires its receiver when the last clone is dropped: each SKU actor drops
/// its clone once it has applied its part of an order move.
pub(crate) struct Completion(Option<oneshot::Sender<()>>);

impl Completion {
    pub(crate) fn new() -> (Arc<Completion>, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Arc::new(Completion(Some(tx))), rx)
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Sends without waiting: a full mailbox is `Overloaded` at once.
fn send<A, M>(addr: &Addr<A>, msg: M) -> Result<(), EngineError>
where
    A: actix::Actor<Context = actix::Context<A>> + actix::Handler<M>,
    M: actix::Message<Result = ()> + Send + 'static,
{
    addr.try_send(msg).map_err(|error| match error {
        actix::prelude::SendError::Full(_) => EngineError::Overloaded,
        actix::prelude::SendError::Closed(_) => EngineError::Stopped,
    })
}

struct Inner {
    config: EngineConfig,
    journal: Arc<dyn Journal>,
    skus: Arc<SkuRegistry>,
    routes: Arc<OrderRoutes>,
    shards: Vec<Arc<Addr<OrderShard>>>,
    shared: Arc<ShardContext>,
    promotions: RwLock<Promotions>,
    idem: Arc<IdemBook>,
    next_id: AtomicU64,
    /// Serialises SKU creation (the registry's bound and id check).
    create_lock: Mutex<()>,
    next_slot: AtomicUsize,
    threads: Mutex<ActorThreads>,
    /// Whether every actor is alive.
    health: Arc<Health>,
}

/// The handle to a running engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("skus", &self.inner.skus.len())
            .field("shards", &self.inner.shards.len())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values stay consistent across a panic (a unit and the
    // actor threads' handle), so a poisoned lock is still usable.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Engine {
    /// Starts the engine on `state` (empty, or rebuilt by recovery).
    ///
    /// Before anything runs, the state is brought up to date, each change
    /// journaled like any other: reservations that no order took (a crash
    /// came between the two steps of a placement) are released, and reserved
    /// orders past their deadline are expired.
    ///
    /// # Errors
    /// `StorageUnavailable` when the journal refuses those changes; `Domain`
    /// when the state does not accept them (a damaged journal).
    pub fn start(
        config: EngineConfig,
        journal: Arc<dyn Journal>,
        clock: Arc<dyn Clock>,
        mut state: State,
    ) -> Result<Engine, EngineError> {
        settle_state(&mut state, journal.as_ref(), clock.now_ms())?;
        let threads = ActorThreads::start(config.actor_threads)?;
        let health = Health::new();
        // Everything the actors start with was appended up to here.
        let seq = journal.last_seq();
        let State {
            skus,
            orders,
            promotions,
            idem,
            next_id,
            ..
        } = state;

        let registry: Arc<SkuRegistry> = Arc::new(SkuRegistry::new());
        let inner_skus = Arc::clone(&registry);
        let shared = Arc::new(ShardContext {
            journal: Arc::clone(&journal),
            idem: Arc::clone(&idem),
            clock: Arc::clone(&clock),
            skus: inner_skus,
            routes: Arc::new(OrderRoutes::new()),
            ttl_ms: config.reservation_ttl_ms,
        });
        let shard_count = config.order_shards.clamp(1, ORDER_SHARDS_MAX);
        let books = orders.split(shard_count, |user| shard_index(user, shard_count));
        let mut shards = Vec::with_capacity(shard_count);
        for (index, book) in books.into_iter().enumerate() {
            let index16 = u16::try_from(index).map_err(|_| EngineError::Stopped)?;
            for order in book.orders() {
                shared.routes.insert(order.id, index16);
            }
            let alive = health.guard(format!("order shard {index}"));
            let shard = OrderShard::new(index16, book, Arc::clone(&shared), seq, alive);
            shards.push(Arc::new(threads.spawn(index, config.shard_mailbox, shard)));
        }

        let inner = Inner {
            routes: Arc::clone(&shared.routes),
            config,
            journal,
            skus: registry,
            shards,
            shared,
            promotions: RwLock::new(promotions),
            idem,
            next_id: AtomicU64::new(next_id.max(1)),
            create_lock: Mutex::new(()),
            next_slot: AtomicUsize::new(0),
            threads: Mutex::new(threads),
            health,
        };
        let engine = Engine {
            inner: Arc::new(inner),
        };
        for (_, sku) in skus {
            engine.spawn_sku(sku, seq);
        }
        Ok(engine)
    }

    /// Starts the actor of a SKU and registers it.
    fn spawn_sku(&self, state: SkuState, seq: Seq) {
        let inner = &self.inner;
        let id = state.id();
        let hint = Arc::new(SkuHint::default());
        hint.publish(state.levels().available, seq);
        let slot = inner.next_slot.fetch_add(1, Ordering::Relaxed);
        let threads = lock(&inner.threads);
        let actor = SkuActor::new(
            state,
            Arc::clone(&hint),
            Arc::clone(&inner.journal),
            Arc::clone(&inner.idem),
            Arc::clone(&inner.shared.clock),
            inner.health.guard(format!("the actor of SKU {id}")),
        );
        let addr = threads.spawn(slot, inner.config.sku_mailbox, actor);
        drop(threads);
        inner
            .skus
            .insert(id, Arc::new(SkuHandle { id, addr, hint }));
    }

    /// Stops the actors. Calls made afterwards fail with `Stopped`.
    pub fn shutdown(&self) {
        self.inner.health.stopping();
        lock(&self.inner.threads).stop();
    }

    /// Why the engine is dead (an actor panicked or stopped unplanned), if
    /// it is. A dead engine must not be served: its calls to that actor
    /// fail for ever. Restart the process from the durable state.
    pub fn failure(&self) -> Option<String> {
        self.inner.health.failure()
    }

    /// Resolves with the reason once the engine is dead (see [`failure`]).
    ///
    /// [`failure`]: Engine::failure
    pub fn dead(&self) -> impl Future<Output = String> + Send + 'static {
        self.inner.health.dead()
    }

    fn now_ms(&self) -> u64 {
        self.inner.shared.clock.now_ms()
    }

    /// Waits, in strict mode, until `seen` is durable. In relaxed mode it
    /// answers at once, unless the disk has fallen more than
    /// [`RELAXED_AHEAD_MS_MAX`] behind: then it waits like strict mode, so
    /// what a crash can take back stays bounded by time.
    async fn settle(&self, seen: Seq) -> Result<(), EngineError> {
        let journal = &self.inner.journal;
        let wait = match self.inner.config.durability {
            DurabilityMode::Strict => true,
            DurabilityMode::Relaxed => journal.unflushed_age_ms() > RELAXED_AHEAD_MS_MAX,
        };
        if wait {
            journal.watermark().wait(seen).await?;
        }
        Ok(())
    }

    /// Answers `error` once the state it was decided on (up to `seen`) is
    /// durable: no client may see a refusal that a crash could take back.
    async fn refuse<T>(&self, seen: Seq, error: EngineError) -> Result<T, EngineError> {
        self.settle(seen).await?;
        Err(error)
    }

    /// Awaits an actor's answer, then settles it.
    async fn answer<T>(&self, rx: oneshot::Receiver<Answer<T>>) -> Result<T, EngineError> {
        let answer = rx.await.map_err(|_| EngineError::Stopped)?;
        self.settle(answer.seen).await?;
        answer.result
    }

    fn sku_handle(&self, sku: &SkuId) -> Result<Arc<SkuHandle>, EngineError> {
        self.inner
            .skus
            .get(sku)
            .map(|h| Arc::clone(&h))
            .ok_or_else(|| EngineError::sku_not_found(sku))
    }

    fn next_order_id(&self) -> OrderId {
        OrderId(self.inner.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn shard_of_user(&self, user: &UserId) -> &Arc<Addr<OrderShard>> {
        &self.inner.shards[shard_index(user, self.inner.shards.len())]
    }

    fn shard_of_order(&self, id: OrderId) -> Result<&Arc<Addr<OrderShard>>, EngineError> {
        let index = self
            .inner
            .routes
            .get(&id)
            .map(|i| usize::from(*i))
            .ok_or_else(|| EngineError::order_not_found(id))?;
        self.inner
            .shards
            .get(index)
            .ok_or_else(|| EngineError::order_not_found(id))
    }

    // ----- catalog -----

    /// Creates a SKU.
    ///
    /// # Errors
    /// `AlreadyExists` for a taken id, `Domain(Invalid)` for values out of
    /// range or a full catalog, journal errors.
    pub async fn create_sku(&self, new: NewSku) -> Result<SkuView, EngineError> {
        let (view, seq) = {
            let serial = lock(&self.inner.create_lock);
            let refused = if self.inner.skus.contains_key(&new.sku) {
                Some(EngineError::AlreadyExists {
                    what: "SKU",
                    id: new.sku.to_string(),
                })
            } else if self.inner.skus.len() >= SKUS_MAX {
                Some(DomainError::invalid(format!("the catalog is full ({SKUS_MAX} SKUs)")).into())
            } else {
                None
            };
            if let Some(error) = refused {
                // The SKUs this answer saw may still be on their way to disk.
                let seen = self.inner.journal.last_seq();
                drop(serial);
                return self.refuse(seen, error).await;
            }
            let event = SkuState::decide_create(
                new.sku,
                new.name,
                new.price_cents,
                new.per_user_limit,
                new.stock,
                self.now_ms(),
            )?;
            let seq = self.inner.journal.append(&event)?;
            let state = SkuState::from_created(&event)?;
            let view = state.view();
            self.spawn_sku(state, seq);
            (view, seq)
        };
        self.settle(seq).await?;
        Ok(view)
    }

    /// Changes a SKU's name, price or per-user limit (`Some(None)` makes it
    /// unlimited). Orders placed earlier keep their snapshot.
    ///
    /// # Errors
    /// `NotFound`, `Domain(Invalid)`, `Overloaded`, journal errors.
    pub async fn update_sku(
        &self,
        sku: SkuId,
        name: Option<String>,
        price_cents: Option<u64>,
        per_user_limit: Option<Option<u32>>,
    ) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        let (reply, rx) = reply_channel();
        send(
            &handle.addr,
            Update {
                name,
                price_cents,
                per_user_limit,
                reply,
            },
        )?;
        self.answer(rx).await
    }

    /// Adds units to a SKU.
    ///
    /// # Errors
    /// `NotFound`, `Domain(Invalid | Overflow)`, `Overloaded`, journal errors.
    pub async fn restock(
        &self,
        sku: SkuId,
        qty: u64,
        idem: Option<IdemStamp>,
    ) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        let (reply, rx) = reply_channel();
        send(&handle.addr, Restock { qty, idem, reply })?;
        self.answer(rx).await
    }

    /// Reads a SKU.
    ///
    /// # Errors
    /// `NotFound`, `Overloaded`.
    pub async fn sku(&self, sku: SkuId) -> Result<SkuView, EngineError> {
        let handle = self.sku_handle(&sku)?;
        let (reply, rx) = reply_channel();
        send(&handle.addr, View { reply })?;
        self.answer(rx).await
    }

    /// Reads every SKU, sorted by id.
    ///
    /// # Errors
    /// `Overloaded` when a SKU's mailbox is full.
    pub async fn skus(&self) -> Result<Vec<SkuView>, EngineError> {
        let handles: Vec<Arc<SkuHandle>> = self
            .inner
            .skus
            .iter()
            .map(|h| Arc::clone(h.value()))
            .collect();
        let mut pending = Vec::with_capacity(handles.len());
        for handle in &handles {
            let (reply, rx) = reply_channel();
            send(&handle.addr, View { reply })?;
            pending.push(rx);
        }
        let mut views = try_join_all(pending.into_iter().map(|rx| self.answer(rx))).await?;
        views.sort_by_key(|v| v.sku);
        Ok(views)
    }

    /// Creates a promotion.
    ///
    /// # Errors
    /// `AlreadyExists`, `Domain(Invalid)` (also when there are too many),
    /// journal errors.
    pub async fn create_promotion(&self, promo: Promotion) -> Result<Promotion, EngineError> {
        let seq = {
            let mut promotions = self
                .inner
                .promotions
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let decided = promotions
                .decide_create(promo, self.now_ms())
                .map_err(|refusal| match refusal {
                    CreateRefusal::AlreadyExists => EngineError::AlreadyExists {
                        what: "promotion",
                        id: promo.code.to_string(),
                    },
                    CreateRefusal::Full => {
                        DomainError::invalid("there are too many promotions").into()
                    }
                });
            match decided {
                Ok(event) => {
                    let seq = self.inner.journal.append(&event)?;
                    promotions.apply(&event)?;
                    Ok(seq)
                }
                // The promotions this answer saw may still be on their way to disk.
                Err(error) => Err((error, self.inner.journal.last_seq())),
            }
        };
        let seq = match seq {
            Ok(seq) => seq,
            Err((error, seen)) => return self.refuse(seen, error).await,
        };
        self.settle(seq).await?;
        Ok(promo)
    }

    /// The promotion with this code.
    ///
    /// # Errors
    /// `NotFound` when there is none.
    pub fn promotion(&self, code: PromoCode) -> Result<Promotion, EngineError> {
        self.inner
            .promotions
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&code)
            .copied()
            .ok_or_else(|| EngineError::NotFound {
                what: "promotion",
                id: code.to_string(),
            })
    }

    // ----- orders -----

    /// Holds `qty` units of `sku` for `user`: the first step of placing an
    /// order. Dropping the reservation gives the units back. A sold-out SKU
    /// answers `OutOfStock` without asking its actor.
    ///
    /// # Errors
    /// `NotFound`, `Domain(OutOfStock | LimitExceeded | Invalid)`,
    /// `Overloaded`, journal errors.
    pub async fn reserve(
        &self,
        user: UserId,
        sku: SkuId,
        qty: u32,
    ) -> Result<Reservation, EngineError> {
        validate::qty(qty)?;
        let handle = self.sku_handle(&sku)?;
        self.reserve_at(handle, user, qty).await
    }

    /// Answers `OutOfStock` when a SKU's hint says it cannot serve the
    /// units (`sold_out` is [`SkuHint::sold_out_for`]), once the state that
    /// answer saw is durable.
    async fn refuse_if_sold_out(
        &self,
        sku: SkuId,
        sold_out: Option<Seq>,
    ) -> Result<(), EngineError> {
        match sold_out {
            None => Ok(()),
            Some(seen) => {
                self.refuse(seen, DomainError::OutOfStock { sku }.into())
                    .await
            }
        }
    }

    async fn reserve_at(
        &self,
        handle: Arc<SkuHandle>,
        user: UserId,
        qty: u32,
    ) -> Result<Reservation, EngineError> {
        self.refuse_if_sold_out(handle.id, handle.hint.sold_out_for(qty))
            .await?;
        let (reply, rx) = reply_channel();
        let reserve = Reserve {
            handle: Arc::clone(&handle),
            reservation: self.next_order_id(),
            user,
            qty,
            reply,
        };
        send(&handle.addr, reserve)?;
        let answer = rx.await.map_err(|_| EngineError::Stopped)?;
        match answer.result {
            // The order that takes it waits for durability; waiting here too
            // would cost a second flush.
            Ok(reservation) => Ok(reservation),
            Err(error) => self.refuse(answer.seen, error).await,
        }
    }

    /// Places an order for `user`: every line or none.
    ///
    /// # Errors
    /// `Domain(Invalid)` for bad lines, `NotFound` for an unknown SKU or
    /// promotion, `Domain(OutOfStock | LimitExceeded)`, `Overloaded`,
    /// journal errors.
    pub async fn place_order(
        &self,
        user: UserId,
        items: &[SkuQty],
        promo: Option<PromoCode>,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        // The flash-sale fast path: a single line of a sold-out SKU is
        // refused from the hint, before any allocation.
        if let [line] = items {
            validate::qty(line.qty)?;
            let sold_out = self
                .inner
                .skus
                .get(&line.sku)
                .ok_or_else(|| EngineError::sku_not_found(line.sku))?
                .hint
                .sold_out_for(line.qty);
            if sold_out.is_some() {
                if let Some(code) = promo {
                    self.promotion(code)?;
                }
                self.refuse_if_sold_out(line.sku, sold_out).await?;
            }
        }
        let lines = validate::merge_lines(items)?;
        let promo = promo.map(|code| self.promotion(code)).transpose()?;
        let placed = self.place_lines(user, &lines, promo, None, idem).await?;
        placed.ok_or(EngineError::Stopped)
    }

    /// Places an order from `user`'s cart and empties it.
    ///
    /// # Errors
    /// As [`Engine::place_order`]; `Domain(Invalid)` for an empty cart.
    pub async fn checkout(
        &self,
        user: UserId,
        promo: Option<PromoCode>,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        let promo = promo.map(|code| self.promotion(code)).transpose()?;
        for _ in 0..CHECKOUT_ATTEMPTS_MAX {
            let cart = self.cart(user).await?;
            if cart.is_empty() {
                return Err(DomainError::invalid("the cart is empty").into());
            }
            let items = cart.items().to_vec();
            let placed = self
                .place_lines(user, &items, promo, Some(items.clone()), idem.clone())
                .await?;
            if let Some(order) = placed {
                return Ok(order);
            }
        }
        Err(DomainError::invalid("the cart kept changing during checkout; try again").into())
    }

    async fn place_lines(
        &self,
        user: UserId,
        lines: &[SkuQty],
        promo: Option<Promotion>,
        from_cart: Option<Vec<SkuQty>>,
        idem: Option<IdemStamp>,
    ) -> Result<Option<Order>, EngineError> {
        let mut pending = Vec::with_capacity(lines.len());
        // Reversed: the placement pops its next line off the end.
        for line in lines.iter().rev() {
            let handle = self.sku_handle(&line.sku)?;
            // Refuse a sold-out line before holding anything.
            self.refuse_if_sold_out(handle.id, handle.hint.sold_out_for(line.qty))
                .await?;
            pending.push((handle, line.qty, self.next_order_id()));
        }
        let first = pending
            .last()
            .map(|(handle, ..)| Arc::clone(handle))
            .ok_or_else(|| DomainError::invalid("an order needs at least one line"))?;
        let (reply, rx) = reply_channel();
        let placement = Placement {
            order_id: self.next_order_id(),
            user,
            pending,
            held: Vec::with_capacity(lines.len()),
            shard: Arc::clone(self.shard_of_user(&user)),
            promo,
            from_cart,
            idem,
            ttl_ms: self.inner.config.reservation_ttl_ms,
            reply,
        };
        send(&first.addr, placement)?;
        self.answer(rx).await
    }

    async fn act(&self, caller: Caller, id: OrderId, op: OrderOp) -> Result<Order, EngineError> {
        let shard = self.shard_of_order(id)?;
        let (reply, rx) = reply_channel();
        send(
            shard,
            Act {
                order_id: id,
                caller,
                op,
                reply,
            },
        )?;
        let acted = self.answer(rx).await?;
        // Every SKU has applied the move once this resolves (an error only
        // means the completion was dropped, which also happens after that).
        let _ = acted.applied.await;
        Ok(acted.order)
    }

    /// Reads an order (its owner or an admin). An unpaid order past its
    /// deadline is expired first.
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, `Overloaded`, journal errors.
    pub async fn order(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Get).await
    }

    /// Lists orders, newest first, at most `limit` (capped at 500).
    ///
    /// # Errors
    /// `Overloaded`, journal errors.
    pub async fn orders(&self, scope: OrderScope, limit: usize) -> Result<Vec<Order>, EngineError> {
        let limit = limit.min(ORDERS_LIST_MAX);
        let shards: Vec<&Arc<Addr<OrderShard>>> = match scope {
            OrderScope::User(user) => vec![self.shard_of_user(&user)],
            OrderScope::All => self.inner.shards.iter().collect(),
        };
        let user = match scope {
            OrderScope::User(user) => Some(user),
            OrderScope::All => None,
        };
        let mut pending = Vec::with_capacity(shards.len());
        for shard in shards {
            let (reply, rx) = reply_channel();
            send(shard, List { user, limit, reply })?;
            pending.push(rx);
        }
        let parts = try_join_all(pending.into_iter().map(|rx| self.answer(rx))).await?;
        let mut orders: Vec<Order> = parts.into_iter().flatten().collect();
        orders.sort_by_key(|o| std::cmp::Reverse(o.id));
        orders.truncate(limit);
        Ok(orders)
    }

    /// Records the payment provider's callback (admin). A repeat with the
    /// same `payment_ref` and amount answers with the order unchanged.
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, `Domain(PaymentMismatch | InvalidTransition)`,
    /// `Overloaded`, journal errors.
    pub async fn pay(
        &self,
        caller: Caller,
        id: OrderId,
        payment_ref: PaymentRef,
        amount_cents: u64,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        let op = OrderOp::Pay {
            payment_ref,
            amount_cents,
            idem,
        };
        self.act(caller, id, op).await
    }

    /// Cancels a reserved order (its owner or an admin).
    ///
    /// # Errors
    /// `NotFound`, `Forbidden`, `Domain(InvalidTransition)`, `Overloaded`,
    /// journal errors.
    pub async fn cancel(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Cancel).await
    }

    /// Ships a paid order (admin).
    ///
    /// # Errors
    /// As [`Engine::cancel`].
    pub async fn ship(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Ship).await
    }

    /// Marks a shipped order delivered (admin).
    ///
    /// # Errors
    /// As [`Engine::cancel`].
    pub async fn deliver(&self, caller: Caller, id: OrderId) -> Result<Order, EngineError> {
        self.act(caller, id, OrderOp::Deliver).await
    }

    /// Refunds units of a paid, shipped or delivered order (admin).
    ///
    /// # Errors
    /// As [`Engine::cancel`]; `Domain(Invalid)` for more units than are left.
    pub async fn refund(
        &self,
        caller: Caller,
        id: OrderId,
        lines: Vec<SkuQty>,
        restock: bool,
        idem: Option<IdemStamp>,
    ) -> Result<Order, EngineError> {
        for line in &lines {
            validate::qty(line.qty)?;
        }
        let op = OrderOp::Refund {
            lines,
            restock,
            idem,
        };
        self.act(caller, id, op).await
    }

    /// Expires every unpaid order past its deadline now, and waits until the
    /// units are back (the shards also do this on a timer).
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn expire_due(&self) -> Result<usize, EngineError> {
        let mut pending = Vec::with_capacity(self.inner.shards.len());
        for shard in &self.inner.shards {
            let (reply, rx) = reply_channel();
            send(shard, ExpireDue { reply })?;
            pending.push(rx);
        }
        let mut expired = 0;
        for rx in pending {
            let (count, applied) = self.answer(rx).await?;
            let _ = applied.await;
            expired += count;
        }
        Ok(expired)
    }

    /// How many orders are in each state.
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn order_counts(&self) -> Result<Vec<(OrderStatus, u64)>, EngineError> {
        let mut totals: Vec<(OrderStatus, u64)> =
            OrderStatus::ALL.iter().map(|s| (*s, 0)).collect();
        for shard in &self.inner.shards {
            let (reply, rx) = reply_channel();
            send(shard, CountByStatus { reply })?;
            let counts = rx.await.map_err(|_| EngineError::Stopped)?.result?;
            for ((_, total), (_, count)) in totals.iter_mut().zip(counts) {
                *total += count;
            }
        }
        Ok(totals)
    }

    // ----- carts -----

    async fn cart_op(
        &self,
        user: UserId,
        set: Option<(SkuId, u32)>,
        clear: bool,
    ) -> Result<Cart, EngineError> {
        let (reply, rx) = reply_channel();
        send(
            self.shard_of_user(&user),
            CartOp {
                user,
                set,
                clear,
                reply,
            },
        )?;
        self.answer(rx).await
    }

    /// Reads `user`'s cart.
    ///
    /// # Errors
    /// `Overloaded`, `Stopped`.
    pub async fn cart(&self, user: UserId) -> Result<Cart, EngineError> {
        self.cart_op(user, None, false).await
    }

    /// Sets a cart line (`qty` 0 removes it).
    ///
    /// # Errors
    /// `NotFound` for an unknown SKU, `Domain(Invalid)`, `Overloaded`,
    /// journal errors.
    pub async fn set_cart_item(
        &self,
        user: UserId,
        sku: SkuId,
        qty: u32,
    ) -> Result<Cart, EngineError> {
        validate::cart_qty(qty)?;
        self.sku_handle(&sku)?;
        self.cart_op(user, Some((sku, qty)), false).await
    }

    /// Empties `user`'s cart.
    ///
    /// # Errors
    /// `Overloaded`, journal errors.
    pub async fn clear_cart(&self, user: UserId) -> Result<(), EngineError> {
        self.cart_op(user, None, true).await.map(|_| ())
    }

    // ----- idempotency -----

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

/// Which shard holds `user`'s orders and cart.
fn shard_index(user: &UserId, shards: usize) -> usize {
    // A fixed-key hasher: the same user lands on the same shard for the
    // life of the process (placement is recomputed at every start).
    let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(user);
    usize::try_from(hash % (shards.max(1) as u64)).unwrap_or(0)
}

/// Releases reservations that no order took and expires overdue orders,
/// journaling each change and applying it to `state` with the same `apply`.
fn settle_state(state: &mut State, journal: &dyn Journal, now_ms: u64) -> Result<(), EngineError> {
    let mut changes: Vec<Event> = state
        .open_reservations
        .iter()
        .map(|(id, open)| Event::ReservationReleased {
            sku: open.sku,
            reservation: *id,
            user: open.user,
            qty: open.qty,
            at_ms: now_ms,
        })
        .collect();
    for order in state.orders.orders() {
        if order.is_overdue(now_ms) {
            changes.push(order.decide_release(ReleaseReason::Expired, now_ms)?);
        }
    }
    for event in changes {
        journal.append(&event)?;
        state.apply(&event)?;
    }
    Ok(())
}
