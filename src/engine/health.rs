//! Whether every actor of the engine is alive.
//!
//! actix runs each actor as a task on its arbiter; a panic in a handler
//! ends that task and drops the actor, while every other actor, and the
//! HTTP front, go on. Left alone, that SKU or shard would answer `503` for
//! ever while `/readyz` said 200. So each actor owns an [`Alive`] guard:
//! when an actor is dropped while the engine is not shutting down (a panic,
//! or any other unplanned stop), the guard marks the engine dead, with the
//! reason. The server watches for that, reports not ready, and stops the
//! process with a non-zero exit so that its supervisor restarts it from the
//! durable state (everything acknowledged is durable; nothing the dead
//! actor held in memory alone was ever acknowledged).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The engine's health, shared by its actors' guards.
#[derive(Debug)]
pub(crate) struct Health {
    /// Set by `Engine::shutdown` before the actors are stopped: a drop from
    /// then on is planned.
    stopping: AtomicBool,
    /// Why the engine is dead, once it is. Invariant: once `Some`, it stays.
    dead: watch::Sender<Option<String>>,
}

impl Health {
    pub(crate) fn new() -> Arc<Health> {
        Arc::new(Health {
            stopping: AtomicBool::new(false),
            dead: watch::Sender::new(None),
        })
    }

    /// The shutdown began: actors stopping from now on is planned.
    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether the shutdown began.
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Marks the engine dead (the first reason is kept).
    pub(crate) fn kill(&self, why: String) {
        tracing::error!(reason = %why, "an engine actor died; the engine is dead");
        self.dead.send_if_modified(|dead| {
            if dead.is_some() {
                return false;
            }
            *dead = Some(why);
            true
        });
    }

    /// Why the engine is dead, if it is.
    pub(crate) fn failure(&self) -> Option<String> {
        self.dead.borrow().clone()
    }

    /// Resolves with the reason once the engine is dead.
    pub(crate) fn dead(&self) -> impl Future<Output = String> + Send + 'static {
        let mut rx = self.dead.subscribe();
        async move {
            let why = match rx.wait_for(Option::is_some).await {
                Ok(dead) => Some(dead.clone().unwrap_or_default()),
                Err(_) => None,
            };
            match why {
                Some(why) => why,
                // The engine itself is gone: never dead, then.
                None => std::future::pending().await,
            }
        }
    }

    /// A guard for an actor called `what`.
    pub(crate) fn guard(self: &Arc<Health>, what: String) -> Alive {
        Alive {
            health: Arc::clone(self),
            what,
            armed: true,
        }
    }
}

/// Owned by an actor: its drop outside a shutdown marks the engine dead.
#[derive(Debug)]
pub(crate) struct Alive {
    health: Arc<Health>,
    what: String,
    /// Cleared by a planned stop of this one actor (a SKU going to sleep).
    armed: bool,
}

impl Alive {
    /// The actor is stopping by plan (a SKU actor handing its state back to
    /// the catalog): its drop means nothing.
    pub(crate) fn planned(mut self) {
        self.armed = false;
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        if !self.armed || self.health.stopping.load(Ordering::SeqCst) {
            return;
        }
        let how = if std::thread::panicking() {
            "panicked"
        } else {
            "stopped (after a panic in its handler, or unplanned)"
        };
        self.health.kill(format!("{} {how}", self.what));
    }
}
