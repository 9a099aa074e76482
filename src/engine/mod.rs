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
//!
//! By concern: `config.rs` (how it runs), `reply.rs` (how actors answer),
//! `archiving.rs` (the shards' archive sweep),
//! `catalog.rs`, `orders.rs`, `carts.rs` and `keyed.rs` (the handle's
//! methods), `sku.rs` and `shard.rs` (the actors), `slot.rs` (the catalog:
//! a SKU sleeps there as plain state until a message starts its actor, and
//! goes back when the actor is idle), `health.rs` (a dead actor
//! marks the engine dead), `durable.rs` (reads from the last durable state
//! while the journal refuses changes), `runtime.rs` (the actor threads),
//! `snapshot.rs` (every actor copies its own part for a snapshot), `ids.rs`
//! (order ids from durably reserved blocks, never reused after a crash).

mod archiving;
mod carts;
mod catalog;
mod config;
mod durable;
mod error;
mod health;
mod ids;
mod keyed;
mod orders;
mod reply;
mod runtime;
mod shard;
mod sku;
mod slot;
mod snapshot;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use actix::Addr;
use futures_util::future::try_join_all;
use tokio::sync::oneshot;

pub use crate::clock::{Clock, ManualClock, SystemClock};
pub use config::{Caller, DurabilityMode, EngineConfig, NewSku, OrderScope};
pub use error::EngineError;
pub use ids::IdSpace;
pub use runtime::ActorPool;
pub use sku::Reservation;

use crate::domain::cart::Cart;
use crate::domain::event::{ReleaseReason, SkuQty};
use crate::domain::idem::{IdemBook, Lookup};
use crate::domain::order::Order;
use crate::domain::promo::{CreateRefusal, Promotion, Promotions};
use crate::domain::sale::{SalePatch, SaleWindow};
use crate::domain::sku::{SkuState, SkuView};
use crate::domain::{
    DomainError, Event, IdemStamp, IdempotencyKey, OrderId, OrderStatus, PaymentRef, PromoCode,
    SkuId, State, UserId, validate,
};
use crate::journal::{Journal, JournalStats, RELAXED_AHEAD_MS_MAX, Seq};
use crate::limits::{
    ACTOR_THREADS_DEFAULT, ARCHIVE_AFTER_DEFAULT_MS, CHECKOUT_ATTEMPTS_MAX, ENGINE_STOP_WAIT_MS,
    IDEMPOTENCY_MEMORY_RECORDS_MAX, IDEMPOTENCY_SPILL_BATCH_MAX, IDEMPOTENCY_SPILL_SLACK_DIVISOR,
    IDEMPOTENCY_TTL_MS, ORDER_SHARD_MAILBOX, ORDER_SHARDS_DEFAULT, ORDER_SHARDS_MAX,
    ORDERS_LIST_MAX, RESERVATION_TTL_DEFAULT_MS, SKU_IDLE_DEFAULT_MS, SKU_MAILBOX, SKUS_MAX,
    SKUS_PAGE_MAX,
};
use archiving::ArchiveDue;
use health::Health;
use reply::send;
pub(crate) use reply::{Answer, Completion, Reply};
use runtime::Stop;
use shard::{
    Act, CartOp, CountByStatus, ExpireDue, List, OrderOp, OrderRoutes, OrderShard, ShardContext,
    SkuRegistry,
};
use sku::{Placement, Reserve, Restock, SkuActor, Sleep, Update, View, reply_channel};
use slot::{Lives, SkuHandle};

struct Inner {
    config: EngineConfig,
    journal: Arc<dyn Journal>,
    /// Every SKU, in id order (lookups and pages); SKUs are never removed.
    skus: Arc<SkuRegistry>,
    /// What waking a SKU needs, and which SKUs are awake.
    lives: Arc<Lives>,
    routes: Arc<OrderRoutes>,
    shards: Vec<Arc<Addr<OrderShard>>>,
    shared: Arc<ShardContext>,
    promotions: RwLock<Promotions>,
    idem: Arc<IdemBook>,
    /// Order ids, from durably reserved blocks (`ids.rs`).
    ids: ids::OrderIds,
    /// Serialises SKU creation (the registry's bound and id check).
    create_lock: Mutex<()>,
    /// The threads the actors run on.
    actors: ActorPool,
    /// Whether `actors` is this engine's alone (stopped with it), or shared
    /// (only this engine's actors are stopped, see [`Inner::stop_actors`]).
    owns_actors: bool,
    /// Set once the actors were told to stop.
    actors_stopped: AtomicBool,
    /// Whether every actor is alive.
    health: Arc<Health>,
    /// A reader of the last durable state (journals nothing).
    read_only: bool,
    /// Built on the first read that meets a failed journal: the engine
    /// answering reads from the last durable state until a reload.
    reader: tokio::sync::OnceCell<Engine>,
}

impl Inner {
    /// Stops the actors; calls made afterwards fail with `Stopped`. On
    /// threads of its own the engine stops them (and every actor with
    /// them). On a shared pool it stops its own actors only: no SKU wakes
    /// from now on, and each shard and awake SKU gets [`Stop`] past its
    /// mailbox bound; this waits until every one has handled it (or its
    /// mailbox is gone), at most [`ENGINE_STOP_WAIT_MS`], so that no actor
    /// of this engine touches its journal once this returns.
    fn stop_actors(&self) {
        self.health.stopping();
        if self.actors_stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.owns_actors {
            self.actors.stop();
            return;
        }
        self.lives.close();
        let (done, stopped) = std::sync::mpsc::channel();
        for shard in &self.shards {
            shard.do_send(Stop { done: done.clone() });
        }
        for sku in self.skus.all() {
            sku.do_send_if_awake(Stop { done: done.clone() });
        }
        // Each `Stop` holds a sender: the channel closes once every one
        // was handled or dropped with its mailbox.
        drop(done);
        let deadline = Instant::now() + Duration::from_millis(ENGINE_STOP_WAIT_MS);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match stopped.recv_timeout(left) {
                Ok(()) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        wait_ms = ENGINE_STOP_WAIT_MS,
                        "an engine's actors did not all stop in time"
                    );
                    return;
                }
            }
        }
    }
}

impl Drop for Inner {
    /// An engine on a shared pool that is dropped without a shutdown still
    /// stops its actors: nothing else would (their threads go on).
    fn drop(&mut self) {
        self.stop_actors();
    }
}

/// The journal as the engine's callers may see it (for metrics).
#[derive(Debug)]
pub struct JournalReport<'a> {
    /// What the writer has done, if the journal keeps count.
    pub stats: Option<&'a JournalStats>,
    /// The last sequence number handed out.
    pub last_seq: Seq,
    /// The last durable sequence number.
    pub durable_seq: Seq,
    /// Whether it stopped after a storage failure.
    pub failed: bool,
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

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values stay consistent across a panic (a unit, the actor
    // threads' handle, a SKU's life, which changes in one assignment), so
    // a poisoned lock is still usable.
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
    /// `Storage` when the journal refuses those changes; `Domain`
    /// when the state does not accept them (a damaged journal).
    pub fn start(
        config: EngineConfig,
        journal: Arc<dyn Journal>,
        clock: Arc<dyn Clock>,
        mut state: State,
    ) -> Result<Engine, EngineError> {
        settle_state(&mut state, journal.as_ref(), clock.now_ms())?;
        // Everything the actors start with was appended up to here.
        let seq = journal.last_seq();
        Engine::launch(config, journal, clock, state, seq, false)
    }

    /// Starts the actors on `state`, which is the journal's state at `seq`.
    /// A `read_only` engine serves reads of a durable state while the
    /// journal refuses changes (see `durable.rs`): it journals nothing, not
    /// even expiries.
    fn launch(
        config: EngineConfig,
        journal: Arc<dyn Journal>,
        clock: Arc<dyn Clock>,
        state: State,
        seq: Seq,
        read_only: bool,
    ) -> Result<Engine, EngineError> {
        let (threads, owns_actors) = match &config.actors {
            Some(pool) => (pool.clone(), false),
            None => (ActorPool::start(config.actor_threads)?, true),
        };
        let health = Health::new();
        let State {
            skus,
            orders,
            promotions,
            idem,
            next_id,
            ..
        } = state;

        // The SKUs first, asleep (no actor runs until a message wakes one):
        // a shard may move units (an expiry) as soon as it runs, and every
        // SKU it names must be registered by then.
        // Empty: `settle_state` released what the state held.
        let open = Arc::new(snapshot::OpenReservations::default());
        let lives = Arc::new(Lives::new(
            threads.arbiters(),
            Arc::clone(&journal),
            Arc::clone(&idem),
            Arc::clone(&clock),
            Arc::clone(&open),
            Arc::clone(&health),
            config.sku_mailbox,
            config.sku_idle_ms.max(1),
        ));
        let registry: Arc<SkuRegistry> = Arc::new(SkuRegistry::from_handles(
            skus.into_values()
                .map(|sku| SkuHandle::asleep(sku, seq, &lives)),
        ));
        let shared = Arc::new(ShardContext {
            journal: Arc::clone(&journal),
            idem: Arc::clone(&idem),
            clock: Arc::clone(&clock),
            skus: Arc::clone(&registry),
            routes: Arc::new(OrderRoutes::new()),
            ttl_ms: config.reservation_ttl_ms,
            open,
            archive: journal.archive(),
            archive_after_ms: config.archive_after_ms,
            read_only,
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

        let order_ids = config.order_ids;
        let inner = Inner {
            routes: Arc::clone(&shared.routes),
            config,
            journal,
            skus: registry,
            lives,
            shards,
            shared,
            promotions: RwLock::new(promotions),
            idem,
            ids: ids::OrderIds::new(next_id, order_ids),
            create_lock: Mutex::new(()),
            actors: threads,
            owns_actors,
            actors_stopped: AtomicBool::new(false),
            health,
            read_only,
            reader: tokio::sync::OnceCell::new(),
        };
        Ok(Engine {
            inner: Arc::new(inner),
        })
    }

    /// Stops the actors. Calls made afterwards fail with `Stopped`.
    pub fn shutdown(&self) {
        self.inner.stop_actors();
        if let Some(reader) = self.inner.reader.get() {
            reader.shutdown();
        }
    }

    /// Why the engine is dead (an actor panicked or stopped unplanned), if
    /// it is. A dead engine must not be served: its calls to that actor
    /// fail for ever. Restart the process from the durable state.
    pub fn failure(&self) -> Option<String> {
        self.inner.health.failure()
    }

    /// Why the journal refuses changes (disk full, I/O error), if it does.
    pub fn storage_failure(&self) -> Option<crate::journal::JournalError> {
        self.inner.journal.failure()
    }

    /// The journal as metrics show it.
    pub fn journal_report(&self) -> JournalReport<'_> {
        let journal = self.inner.journal.as_ref();
        JournalReport {
            stats: journal.stats(),
            last_seq: journal.last_seq(),
            durable_seq: journal.watermark().durable(),
            failed: journal.failure().is_some(),
        }
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

    /// A new order id (see `ids.rs`).
    async fn next_order_id(&self) -> Result<OrderId, EngineError> {
        let now_ms = self.inner.shared.clock.now_ms();
        self.inner
            .ids
            .allocate(self.inner.journal.as_ref(), now_ms)
            .await
    }

    fn shard_of_user(&self, user: &UserId) -> &Arc<Addr<OrderShard>> {
        &self.inner.shards[shard_index(user, self.inner.shards.len())]
    }

    /// The shard of an order: the one that holds it, or for an archived
    /// order, its owner's (which reads it from the archive). The archive is
    /// written before an order leaves memory, so an order is always found
    /// in one of the two.
    fn shard_of_order(&self, id: OrderId) -> Result<&Arc<Addr<OrderShard>>, EngineError> {
        let routed = self.inner.routes.get(&id).map(|i| usize::from(*i));
        let index = match routed {
            Some(index) => index,
            None => {
                let archived = match &self.inner.shared.archive {
                    // A point read of sled's cache or one page: short enough
                    // to run on the async worker.
                    Some(archive) => archive.get(id)?,
                    None => None,
                };
                let order = archived.ok_or_else(|| EngineError::order_not_found(id))?;
                shard_index(&order.user, self.inner.shards.len())
            }
        };
        self.inner
            .shards
            .get(index)
            .ok_or_else(|| EngineError::order_not_found(id))
    }
}

/// Which shard holds `user`'s orders and cart.
fn shard_index(user: &UserId, shards: usize) -> usize {
    // Stable across builds: snapshots record progress per shard.
    crate::domain::book::shard_of(user, shards)
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
