//! The actor threads: an actix `System` on a thread of its own, plus extra
//! arbiters (one thread each). Actors are placed on arbiters by the engine;
//! nothing outside `engine/` sees actix.
//!
//! Shutdown order: `stop` asks the system to stop, which stops every
//! arbiter; then it joins the system thread, which joins the arbiters.

use std::thread::JoinHandle;

use actix::dev::channel;
use actix::{Actor, Addr, Arbiter, ArbiterHandle, Context, System};

use crate::engine::EngineError;
use crate::limits::ACTOR_THREADS_MAX;

/// Running actor threads.
pub(crate) struct ActorThreads {
    system: System,
    arbiters: Vec<ArbiterHandle>,
    thread: Option<JoinHandle<()>>,
}

impl ActorThreads {
    /// Starts `threads` actor threads (at least one).
    pub(crate) fn start(threads: usize) -> Result<ActorThreads, EngineError> {
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

    /// The arbiter for slot `index` (wrapping around).
    fn arbiter(&self, index: usize) -> &ArbiterHandle {
        &self.arbiters[index % self.arbiters.len()]
    }

    /// Starts `actor` on the arbiter for slot `index` (see [`spawn_on`]).
    pub(crate) fn spawn<A>(&self, index: usize, capacity: usize, actor: A) -> Addr<A>
    where
        A: Actor<Context = Context<A>> + Send,
    {
        spawn_on(self.arbiter(index), capacity, actor)
    }

    /// The arbiters, for whoever starts actors later (a SKU waking up).
    pub(crate) fn arbiters(&self) -> Vec<ArbiterHandle> {
        self.arbiters.clone()
    }

    /// Stops every actor and joins the threads.
    pub(crate) fn stop(&mut self) {
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

impl Drop for ActorThreads {
    fn drop(&mut self) {
        self.stop();
    }
}
