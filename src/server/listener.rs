//! The accept loop: HTTP/1.1 with keep-alive and pipelining, guarded
//! against hostile clients (contract, guarantee 6).
//!
//! - A bound on open connections: a semaphore permit per connection; at the
//!   bound, new connections wait in the kernel's backlog.
//! - A connection that has not sent a whole request head within 10 s of
//!   opening, or of its previous request, is closed (hyper's header read
//!   timeout, which `axum::serve` does not set).
//! - A request head over 16 KiB is refused with `431`.
//! - Accept errors (such as running out of file descriptors) are logged and
//!   retried after a short pause instead of ending the loop.
//!
//! Shutdown: stop accepting, let every connection finish its request in
//! flight (up to a grace period), then return.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::limits::{BODY_BYTES_MAX, HEADER_BYTES_MAX, HEADER_READ_TIMEOUT_MS, SHUTDOWN_GRACE_MS};

/// How long the loop pauses after a failed accept.
const ACCEPT_BACKOFF_MS: u64 = 20;

/// Serves `app` on `listener` until `shutdown` turns true, then drains.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(HEADER_READ_TIMEOUT_MS))
        .max_header_size(HEADER_BYTES_MAX)
        // Room for a full head and a pipelined body or two, no more.
        .max_buf_size(HEADER_BYTES_MAX + BODY_BYTES_MAX)
        .keep_alive(true)
        .pipeline_flush(false);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // closed: never happens, the loop owns it
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(ACCEPT_BACKOFF_MS)).await;
                continue;
            }
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let service = TowerToHyperService::new(app.clone());
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("every connection finished"),
        () = tokio::time::sleep(Duration::from_millis(SHUTDOWN_GRACE_MS)) => {
            tracing::warn!("shutdown grace period over; closing the remaining connections");
        }
    }
}
