//! The life of a SKU: asleep in the catalog as plain state, or awake as an
//! actor. A catalog holds millions of SKUs while a sale touches a few, so an
//! idle SKU is only its [`SkuState`] in its [`SkuHandle`] (no actor, no
//! mailbox); the first message for it starts its actor with that state, and
//! an actor idle for [`EngineConfig::sku_idle_ms`](super::EngineConfig)
//! hands the state back and stops.
//!
//! Invariant: at any moment a SKU's state lives in exactly one place, its
//! handle's `life` (asleep) or one running actor (awake), and every change
//! to its stock goes through that place. Both moves happen under the
//! handle's lock held exclusively; every message to the actor is sent under
//! that lock held shared (senders do not wait for each other) and counted
//! (`sent`); the actor counts what it handled. It may go to sleep only when
//! the two counts are equal under the exclusive lock: no sender is then
//! half-way, its mailbox is empty, and no one can put a message in it,
//! because the next sender finds the SKU asleep and starts a new actor. So
//! no message is lost and no two actors of one SKU ever run.
//!
//! A sleeping SKU answers reads from its state under the lock, without
//! waking; its [`SkuHint`] stays in the handle, so sold-out and sale-window
//! refusals cost no actor either.
//!
//! Snapshots (see `snapshot.rs`): a sleeping SKU is copied under its lock,
//! at the journal's last sequence number read there. An actor started
//! while a snapshot runs notes its holes from its first message (it may be
//! a SKU copied asleep, whose pending events are holes of that copy), and
//! an actor noting holes for the running snapshot does not sleep, so the
//! snapshot's last round finds every one of them awake.

use std::borrow::Borrow;
use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use actix::prelude::SendError;
use actix::{Addr, ArbiterHandle, Handler, Message};
use tokio::sync::oneshot;

use crate::domain::SkuId;
use crate::domain::idem::IdemBook;
use crate::domain::sku::{IdleSku, SkuState, SkuView};
use crate::engine::health::Health;
use crate::engine::runtime::spawn_on;
use crate::engine::sku::{SkuActor, SkuHint};
use crate::engine::snapshot::OpenReservations;
use crate::engine::{Answer, Clock, EngineError, lock};
use crate::journal::{Journal, Seq};

/// Where a SKU's state is.
// Millions of SKUs sleep and a few are awake: the state inline saves each
// sleeping SKU an allocation and a pointer.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Life {
    /// In the catalog, at rest: no actor runs.
    Asleep(IdleSku),
    /// In a running actor.
    Awake { addr: Addr<SkuActor> },
    /// Only between taking the state out and storing the new actor's
    /// address, under the lock; never seen by anyone else.
    Moving,
}

/// A SKU in the catalog: its id, its hint, and where its state is.
pub(crate) struct SkuHandle {
    pub(crate) id: SkuId,
    /// Published by the actor (and set at load): read without any lock.
    pub(crate) hint: SkuHint,
    life: RwLock<Life>,
    /// Messages sent to the awake actor, each counted under `life`'s lock
    /// (shared) once it is in the mailbox; reset when an actor starts.
    sent: AtomicU64,
    pub(crate) lives: Arc<Lives>,
}

/// What starting a SKU actor needs, shared by every handle of an engine.
pub(crate) struct Lives {
    arbiters: Vec<ArbiterHandle>,
    next_arbiter: AtomicUsize,
    /// Set when the engine stops on a shared pool: no SKU wakes again
    /// (on a pool of its own, the stopped arbiters refuse instead).
    closed: AtomicBool,
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) idem: Arc<IdemBook>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) open: Arc<OpenReservations>,
    pub(crate) health: Arc<Health>,
    pub(crate) mailbox: usize,
    /// How long an actor may be idle before it sleeps.
    pub(crate) idle_ms: u64,
    /// The ids of the awake SKUs (changed under each SKU's own lock).
    awake: Mutex<BTreeSet<SkuId>>,
    /// Odd while a snapshot runs; each snapshot adds two.
    snapshot_epoch: AtomicU64,
    /// SKU actors started since the engine started.
    wakes: AtomicU64,
}

impl Lives {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        arbiters: Vec<ArbiterHandle>,
        journal: Arc<dyn Journal>,
        idem: Arc<IdemBook>,
        clock: Arc<dyn Clock>,
        open: Arc<OpenReservations>,
        health: Arc<Health>,
        mailbox: usize,
        idle_ms: u64,
    ) -> Lives {
        Lives {
            arbiters,
            next_arbiter: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            journal,
            idem,
            clock,
            open,
            health,
            mailbox,
            idle_ms,
            awake: Mutex::new(BTreeSet::new()),
            snapshot_epoch: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
        }
    }

    /// The current snapshot epoch (odd while a snapshot runs).
    pub(crate) fn epoch(&self) -> u64 {
        self.snapshot_epoch.load(Ordering::SeqCst)
    }

    /// A snapshot begins: returns its (odd) epoch.
    pub(crate) fn begin_snapshot(&self) -> u64 {
        self.snapshot_epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The snapshot ended (or failed).
    pub(crate) fn end_snapshot(&self) {
        self.snapshot_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// How many SKU actors were started since the engine started.
    pub(crate) fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// How many SKU actors run.
    pub(crate) fn awake_count(&self) -> usize {
        lock(&self.awake).len()
    }

    /// The ids of the awake SKUs, in id order, at most `limit`.
    pub(crate) fn awake_ids(&self, limit: usize) -> Vec<SkuId> {
        lock(&self.awake).iter().take(limit).copied().collect()
    }

    /// No SKU wakes from now on. A wake holds its SKU's exclusive lock
    /// from this check to its address being set, so whoever closes and
    /// then reads every SKU under its shared lock sees every actor that
    /// will ever run.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn arbiter(&self) -> Option<&ArbiterHandle> {
        let n = self.arbiters.len();
        if n == 0 || self.closed.load(Ordering::SeqCst) {
            return None;
        }
        let index = self.next_arbiter.fetch_add(1, Ordering::Relaxed) % n;
        self.arbiters.get(index)
    }
}

impl SkuHandle {
    /// A SKU asleep with `state`, which holds the journal up to `seq`.
    pub(crate) fn asleep(state: SkuState, seq: Seq, lives: &Arc<Lives>) -> Arc<SkuHandle> {
        let hint = SkuHint::default();
        hint.publish(state.levels().available, state.sale(), seq);
        Arc::new(SkuHandle {
            id: state.id(),
            hint,
            life: RwLock::new(Life::Asleep(state.rest())),
            sent: AtomicU64::new(0),
            lives: Arc::clone(lives),
        })
    }

    /// Shared: senders to an awake actor, reads and copies of a sleeping
    /// SKU. The lock is never held across anything that blocks.
    fn shared(&self) -> RwLockReadGuard<'_, Life> {
        // `life` changes in single assignments: a poisoned lock still
        // guards a whole value.
        self.life.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Exclusive: waking and sleeping.
    fn exclusive(&self) -> RwLockWriteGuard<'_, Life> {
        self.life.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the actor if the SKU sleeps (under the exclusive lock) and
    /// gives its address; `None` when it cannot be started (the engine
    /// stopped).
    fn wake<'a>(self: &Arc<Self>, life: &'a mut Life) -> Option<&'a Addr<SkuActor>> {
        if matches!(life, Life::Asleep(_)) {
            let arbiter = self.lives.arbiter()?;
            let Life::Asleep(state) = std::mem::replace(life, Life::Moving) else {
                return None;
            };
            let noting = Some(self.lives.epoch()).filter(|epoch| epoch % 2 == 1);
            let actor = SkuActor::new(state.wake(self.id), Arc::clone(self), noting);
            let addr = spawn_on(arbiter, self.lives.mailbox, actor);
            // No sender holds the lock: the new actor has been sent nothing.
            self.sent.store(0, Ordering::SeqCst);
            lock(&self.lives.awake).insert(self.id);
            self.lives.wakes.fetch_add(1, Ordering::Relaxed);
            *life = Life::Awake { addr };
        }
        match life {
            Life::Awake { addr } => Some(addr),
            Life::Asleep(_) | Life::Moving => None,
        }
    }

    /// Sends with `send` to the awake actor under the shared lock, or, if
    /// the SKU sleeps, wakes it and sends under the exclusive lock; counts
    /// the message once `send` took it.
    fn deliver<M, E>(
        self: &Arc<Self>,
        msg: M,
        send: impl FnOnce(&Addr<SkuActor>, M) -> Result<(), E>,
        closed: impl FnOnce(M) -> E,
    ) -> Result<(), E> {
        {
            let life = self.shared();
            if let Life::Awake { addr } = &*life {
                send(addr, msg)?;
                self.sent.fetch_add(1, Ordering::SeqCst);
                return Ok(());
            }
        }
        let mut life = self.exclusive();
        match self.wake(&mut life) {
            Some(addr) => {
                send(addr, msg)?;
                self.sent.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            None => Err(closed(msg)),
        }
    }

    /// Sends `msg` to the SKU's actor, waking it if it sleeps; a full
    /// mailbox gives the message back as `Full`.
    pub(crate) fn try_send<M>(self: &Arc<Self>, msg: M) -> Result<(), SendError<M>>
    where
        SkuActor: Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        self.deliver(msg, |addr, msg| addr.try_send(msg), SendError::Closed)
    }

    /// [`SkuHandle::try_send`], a full mailbox as `Overloaded`.
    pub(crate) fn send<M>(self: &Arc<Self>, msg: M) -> Result<(), EngineError>
    where
        SkuActor: Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        self.try_send(msg).map_err(|error| match error {
            SendError::Full(_) => EngineError::Overloaded,
            SendError::Closed(_) => EngineError::Stopped,
        })
    }

    /// Sends a message that must arrive (past the mailbox bound), waking
    /// the SKU if it sleeps. Dropped only when the engine has stopped.
    pub(crate) fn do_send<M>(self: &Arc<Self>, msg: M)
    where
        SkuActor: Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        let sent: Result<(), ()> = self.deliver(
            msg,
            |addr, msg| {
                addr.do_send(msg);
                Ok(())
            },
            |_| (),
        );
        if sent.is_err() {
            tracing::debug!(sku = %self.id, "a message to a SKU of a stopped engine was dropped");
        }
    }

    /// Sends a message that must arrive, only if the SKU is awake; answers
    /// whether it was.
    pub(crate) fn do_send_if_awake<M>(&self, msg: M) -> bool
    where
        SkuActor: Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        match &*self.shared() {
            Life::Awake { addr } => {
                addr.do_send(msg);
                self.sent.fetch_add(1, Ordering::SeqCst);
                true
            }
            Life::Asleep(_) | Life::Moving => false,
        }
    }

    /// Reads the SKU: a sleeping one answers from its state at once, an
    /// awake one through its mailbox (`make` builds the message).
    pub(crate) fn read<M>(
        self: &Arc<Self>,
        make: impl FnOnce(oneshot::Sender<Answer<SkuView>>) -> M,
    ) -> Result<oneshot::Receiver<Answer<SkuView>>, EngineError>
    where
        SkuActor: Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        let (reply, rx) = oneshot::channel();
        match &*self.shared() {
            Life::Asleep(state) => {
                let _ = reply.send(Answer {
                    result: Ok(state.view(self.id)),
                    seen: self.hint.last_seq(),
                });
            }
            Life::Awake { addr } => {
                addr.try_send(make(reply)).map_err(|error| match error {
                    SendError::Full(_) => EngineError::Overloaded,
                    SendError::Closed(_) => EngineError::Stopped,
                })?;
                self.sent.fetch_add(1, Ordering::SeqCst);
            }
            Life::Moving => return Err(EngineError::Stopped),
        }
        Ok(rx)
    }

    /// A snapshot's copy of a sleeping SKU, at the journal's last sequence
    /// number; or, for an awake one, the message `make` builds sent to it.
    pub(crate) fn capture<M>(self: &Arc<Self>, make: impl FnOnce() -> M) -> Option<(SkuState, Seq)>
    where
        SkuActor: Handler<M>,
        M: Message<Result = ()> + Send + 'static,
    {
        match &*self.shared() {
            // Under the lock: no actor runs, so the copy holds every event
            // this SKU applied, all journaled before this read.
            Life::Asleep(state) => Some((state.to_state(self.id), self.lives.journal.last_seq())),
            Life::Awake { addr } => {
                addr.do_send(make());
                self.sent.fetch_add(1, Ordering::SeqCst);
                None
            }
            Life::Moving => None,
        }
    }

    /// The actor hands `state` back and may stop, if every message sent to
    /// it was handled (`handled`). Called by the actor itself. Under the
    /// exclusive lock no sender is half-way, so an equal count means an
    /// empty mailbox that no one can reach any more.
    pub(crate) fn put_to_sleep(&self, handled: u64, state: &SkuState) -> bool {
        let mut life = self.exclusive();
        if !matches!(&*life, Life::Awake { .. }) || self.sent.load(Ordering::SeqCst) != handled {
            return false;
        }
        *life = Life::Asleep(state.clone().rest());
        lock(&self.lives.awake).remove(&self.id);
        true
    }

    /// Whether the SKU's actor runs.
    pub(crate) fn is_awake(&self) -> bool {
        matches!(&*self.shared(), Life::Awake { .. })
    }
}

/// A handle ordered by its SKU's id, so the catalog is one sorted set of
/// pointers (no second copy of each id).
struct ById(Arc<SkuHandle>);

impl PartialEq for ById {
    fn eq(&self, other: &ById) -> bool {
        self.0.id == other.0.id
    }
}
impl Eq for ById {}
impl PartialOrd for ById {
    fn partial_cmp(&self, other: &ById) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ById {
    fn cmp(&self, other: &ById) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}
impl Borrow<SkuId> for ById {
    fn borrow(&self) -> &SkuId {
        &self.0.id
    }
}

/// Every SKU's handle, in id order: lookups, and pages for listing. SKUs
/// are never removed.
#[derive(Default)]
pub(crate) struct Catalog {
    handles: RwLock<BTreeSet<ById>>,
}

impl Catalog {
    /// A catalog of `handles` (in any order; sorted input builds fastest).
    pub(crate) fn from_handles(handles: impl IntoIterator<Item = Arc<SkuHandle>>) -> Catalog {
        Catalog {
            handles: RwLock::new(handles.into_iter().map(ById).collect()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeSet<ById>> {
        // Inserts cannot leave the set half-changed: a poisoned lock still
        // guards a whole set.
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The handle of `id`.
    pub(crate) fn get(&self, id: &SkuId) -> Option<Arc<SkuHandle>> {
        self.read().get(id).map(|h| Arc::clone(&h.0))
    }

    /// Whether `id` is in the catalog.
    pub(crate) fn contains(&self, id: &SkuId) -> bool {
        self.read().contains(id)
    }

    /// How many SKUs there are.
    pub(crate) fn len(&self) -> usize {
        self.read().len()
    }

    /// Adds a handle; `false` (and nothing changed) when its id is taken.
    pub(crate) fn insert(&self, handle: Arc<SkuHandle>) -> bool {
        self.handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(ById(handle))
    }

    /// At most `limit` handles after `after` (from the first when `None`).
    pub(crate) fn page(&self, after: Option<SkuId>, limit: usize) -> Vec<Arc<SkuHandle>> {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.read()
            .range::<SkuId, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|h| Arc::clone(&h.0))
            .collect()
    }

    /// Every handle (a snapshot's list).
    pub(crate) fn all(&self) -> Vec<Arc<SkuHandle>> {
        self.read().iter().map(|h| Arc::clone(&h.0)).collect()
    }
}
