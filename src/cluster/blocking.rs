//! Calling the servers from the engine's synchronous store traits
//! ([`Archive`](crate::journal::Archive),
//! [`IdemStore`](crate::journal::IdemStore)).
//!
//! Those traits are called from three kinds of thread: blocking threads
//! (`spawn_blocking`: the archive sweep, the spill), actix arbiter threads
//! (an order shard reading an archived order; each arbiter runs its own
//! current-thread runtime) and workers of the node's multi-thread runtime
//! (`GET /v1/orders`, an idempotency lookup, a key probe). `Handle::block_on`
//! panics on the last two. So [`call`] spawns the future on the node's
//! runtime (where the NATS connection task runs) and waits on a plain
//! channel: on a runtime worker inside `block_in_place`, so the worker's
//! other tasks move to another thread instead of starving (the connection
//! task itself may be among them); elsewhere by simply blocking, as a disk
//! read would.
//!
//! Never call it from a current-thread runtime that also drives the NATS
//! connection: the wait would block the only thread that could answer it.
//!
//! Every call carries a timeout, and every failure becomes
//! [`JournalError::Remote`] through [`storage`], the one place that
//! maps this module's failures to the journal's error.

use std::future::Future;
use std::time::Duration;

use tokio::runtime::{Handle, RuntimeFlavor};

use crate::journal::JournalError;

/// The one mapping of a store failure to the journal's error: `what` names
/// the store and the step, `e` the cause.
pub(crate) fn storage(what: &'static str, e: impl std::fmt::Display) -> JournalError {
    JournalError::remote(what, e.to_string())
}

/// Runs `future` on `runtime` under `limit_ms` and waits for it from a
/// synchronous caller (see the module doc).
///
/// # Errors
/// `Remote` (naming `what`) when the future fails, times out, or the
/// runtime is gone.
pub(crate) fn call<T, E, F>(
    runtime: &Handle,
    what: &'static str,
    limit_ms: u64,
    future: F,
) -> Result<T, JournalError>
where
    F: Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime.spawn(async move {
        let outcome = match tokio::time::timeout(Duration::from_millis(limit_ms), future).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer in {limit_ms} ms")),
        };
        // The caller waits for this send; it is gone only if it panicked.
        let _ = tx.send(outcome);
    });
    let wait = move || rx.recv();
    let received = match Handle::try_current() {
        Ok(current) if current.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    };
    match received {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(why)) => Err(storage(what, why)),
        // The task was dropped unrun: the runtime is shutting down.
        Err(_) => Err(storage(what, "the node's runtime has stopped")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_answers_from_a_worker_a_blocking_thread_and_a_plain_thread() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let handle = runtime.handle().clone();
        let ok = || async { Ok::<u32, String>(7) };
        // A plain thread.
        assert_eq!(call(&handle, "t", 1_000, ok()).expect("answers"), 7);
        // A runtime worker: block_in_place, no panic, no starvation.
        let h = handle.clone();
        let on_worker = runtime.block_on(async move {
            tokio::spawn(async move { call(&h, "t", 1_000, ok()) })
                .await
                .expect("task")
        });
        assert_eq!(on_worker.expect("answers"), 7);
        // A blocking thread.
        let h = handle.clone();
        let on_blocking = runtime.block_on(async move {
            tokio::task::spawn_blocking(move || call(&h, "t", 1_000, ok()))
                .await
                .expect("task")
        });
        assert_eq!(on_blocking.expect("answers"), 7);
        // A current-thread runtime of its own (an actix arbiter).
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let h = handle.clone();
        assert_eq!(
            current
                .block_on(async move { call(&h, "t", 1_000, ok()) })
                .expect("answers"),
            7
        );
        // Failures and timeouts are `Remote`, naming the step.
        let failed = call(&handle, "reading x", 1_000, async {
            Err::<u32, String>("refused".into())
        });
        assert!(
            matches!(
                &failed,
                Err(JournalError::Remote {
                    what: "reading x",
                    ..
                })
            ),
            "{failed:?}"
        );
        assert_eq!(
            failed.err().map(|e| e.to_string()).as_deref(),
            Some("reading x: refused")
        );
        let slow = call(&handle, "t", 20, async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<u32, String>(1)
        });
        assert!(
            matches!(&slow, Err(e @ JournalError::Remote { .. }) if e.to_string().contains("20 ms")),
            "{slow:?}"
        );
    }
}
