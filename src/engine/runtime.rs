//! The actor threads: an actix `System` on a thread of its own, plus extra
//! arbiters (one thread each). Actors are placed on arbiters by the engine;
//! nothing outside `engine/` sees actix.
//!
//! Shutdown order: `stop` asks the system to stop, which stops every
//! arbiter; then it joins the system thread, which joins the arbiters.

use std::thread::JoinHandle;

use actix::{Arbiter, ArbiterHandle, System};

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
            .map_err(|e| {
                EngineError::StorageUnavailable(format!("cannot start actor thread: {e}"))
            })?;
        let (system, arbiters) = rx.recv().map_err(|_| EngineError::Stopped)?;
        Ok(ActorThreads {
            system,
            arbiters,
            thread: Some(thread),
        })
    }

    /// The arbiter for slot `index` (wrapping around).
    pub(crate) fn arbiter(&self, index: usize) -> &ArbiterHandle {
        &self.arbiters[index % self.arbiters.len()]
    }

    /// How many actor threads run.
    pub(crate) fn len(&self) -> usize {
        self.arbiters.len()
    }

    /// Stops every actor and joins the threads.
    pub(crate) fn stop(&mut self) {
        self.system.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ActorThreads {
    fn drop(&mut self) {
        self.stop();
    }
}
