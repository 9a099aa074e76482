//! The actor threads: an actix `System` on a thread of its own, plus extra
//! arbiters (one thread each), behind [`ActorPool`]. An engine starts a
//! pool of its own, or runs on one it is given (a cluster node's
//! partitions share one). Actors are placed on arbiters by the engine;
//! nothing outside `engine/` sees actix.
//!
//! Shutdown order: `stop` asks the system to stop, which stops every
//! arbiter; then it joins the system thread, which joins the arbiters.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use actix::dev::channel;
use actix::{Actor, Addr, Arbiter, ArbiterHandle, Context, System};

use crate::engine::EngineError;
use crate::limits::ACTOR_THREADS_MAX;

/// Running actor threads.
struct ActorThreads {
    system: System,
    arbiters: Vec<ArbiterHandle>,
    thread: Option<JoinHandle<()>>,
}

impl ActorThreads {
    /// Starts `threads` actor threads (at least one).
    fn start(threads: usize) -> Result<ActorThreads, EngineError> {
        let threads = threads.clamp(1, ACTOR_THREADS_MAX);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("flashcore-actors".into())
            .spawn(move || {
                let runner = System::new();
                let extra: Vec<Arbiter> = (1..threads).map(|_| Arbiter::new()).collect();
                let handles: Vec<ArbiterHandle> = std::iter::once(Arbiter::current())
                    .chain(extra.iter().map(Arbiter::handle))
                    .collect();
                if tx.send((System::current(), handles)).is_err() {
                    return;
                }
                if let Err(error) = runner.run() {
                    tracing::error!(%error, "actor system ended with an error");
                }
                for arbiter in extra {
                    arbiter.stop();
                    let _ = arbiter.join();
                }
            })
            .map_err(|e| EngineError::Spawn {
                what: "the actor thread",
                source: std::sync::Arc::new(e),
            })?;
        let (system, arbiters) = rx.recv().map_err(|_| EngineError::Stopped)?;
        Ok(ActorThreads {
            system,
            arbiters,
            thread: Some(thread),
        })
    }

    /// Stops every actor and joins the threads.
    fn stop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts `actor` on `arbiter`, with a mailbox of `capacity` messages that
/// is bounded from the first message on (a capacity set in `started` would
/// only apply once the actor runs, and the first callers would meet actix's
/// default of 16). On a stopped arbiter the actor never runs and its
/// mailbox is closed: sends fail as `Closed`.
pub(crate) fn spawn_on<A>(arbiter: &ArbiterHandle, capacity: usize, actor: A) -> Addr<A>
where
    A: Actor<Context = Context<A>> + Send,
{
    let (tx, rx) = channel::channel(capacity);
    arbiter.spawn_fn(move || {
        Context::with_receiver(rx).run(actor);
    });
    Addr::new(tx)
}

/// Actor threads that several engines share: a cluster node runs one
/// engine per partition it owns, and a thread pool each would put
/// `partitions x threads` threads on a machine with a few cores, most of
/// them idle, each with its own wake-ups. Cheap to clone; the threads stop
/// when [`ActorPool::stop`] is called or the last clone is dropped. An
/// engine on a pool it does not own stops its own actors, one message
/// each, and leaves the threads running (see `Engine::shutdown`).
#[derive(Clone)]
pub struct ActorPool {
    threads: Arc<Mutex<ActorThreads>>,
    arbiters: Vec<ArbiterHandle>,
}

impl std::fmt::Debug for ActorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActorPool")
            .field("threads", &self.arbiters.len())
            .finish_non_exhaustive()
    }
}

impl ActorPool {
    /// Starts `threads` actor threads (at least one, at most
    /// [`ACTOR_THREADS_MAX`]).
    ///
    /// # Errors
    /// `Spawn` when a thread cannot be started.
    pub fn start(threads: usize) -> Result<ActorPool, EngineError> {
        let threads = ActorThreads::start(threads)?;
        let arbiters = threads.arbiters.clone();
        Ok(ActorPool {
            threads: Arc::new(Mutex::new(threads)),
            arbiters,
        })
    }

    /// How many threads run actors.
    pub fn threads(&self) -> usize {
        self.arbiters.len()
    }

    /// Stops every actor of every engine on the pool and joins the
    /// threads. Engines on it should be shut down first.
    pub fn stop(&self) {
        crate::engine::lock(&self.threads).stop();
    }

    /// Starts `actor` on the arbiter for slot `index`, wrapping around
    /// (see [`spawn_on`]).
    pub(crate) fn spawn<A>(&self, index: usize, capacity: usize, actor: A) -> Addr<A>
    where
        A: Actor<Context = Context<A>> + Send,
    {
        spawn_on(&self.arbiters[index % self.arbiters.len()], capacity, actor)
    }

    /// The arbiters, for whoever starts actors later (a SKU waking up).
    pub(crate) fn arbiters(&self) -> Vec<ArbiterHandle> {
        self.arbiters.clone()
    }
}

/// Stop now: sent to each actor of an engine that shuts down on a shared
/// [`ActorPool`] (ignoring the mailbox bound, so a full mailbox does not
/// keep it running). The actor stops after this message, whatever is
/// queued behind it; `done` hears once it has.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub(crate) struct Stop {
    pub(crate) done: std::sync::mpsc::Sender<()>,
}

impl Drop for ActorThreads {
    fn drop(&mut self) {
        self.stop();
    }
}
