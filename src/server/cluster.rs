//! `flashcore serve --cluster`: a node of a cluster over NATS JetStream.
//!
//! Start-up order: check the JWT secret (required: every node verifies
//! every token, so they must share it), join the cluster (connect, bind
//! the stream and buckets, check the partition count), bind the listener,
//! build the front in cluster mode, then start the ownership loop, which
//! takes this node's share of the partitions; `/readyz` answers 200 once
//! its first pass has run.
//!
//! Nothing is read from or written to the data dir: the journal, the
//! snapshots and the leases are in JetStream. The catalog file is not
//! seeded either (a cluster's catalog is made once, through any node).
//!
//! Shutdown order (SIGTERM or Ctrl-C): stop accepting and finish the
//! requests in flight, then hand every partition back (each engine stops,
//! its journal closes with everything taken durable, a last snapshot, then
//! the lease is released so the next owner need not wait a TTL), exit 0.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::clock::{Clock, SystemClock};
use crate::cluster::node::{Node, NodeConfig};
use crate::engine::Engine;
use crate::fatal;
use crate::http::auth::{SecretError, load_secret};
use crate::http::{Backend, Front, live};
use crate::limits::{IDEMPOTENCY_EVICT_EVERY_MS, LISTEN_BACKLOG};
use crate::server::{ServeConfig, ServerError, listener};

/// How often the node's engines are checked for a dead actor.
const ENGINE_WATCH_EVERY: Duration = Duration::from_secs(1);

/// How often the engines' idempotency books are checked against their
/// memory budget (a length compare each when under it), as a node alone's
/// supervisor does at its probe interval.
const IDEM_UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// How a node joins its cluster (`--cluster`, `--node-id`, ...).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The NATS servers (`nats://host:port`).
    pub servers: Vec<String>,
    /// This node's id, stable across restarts.
    pub node_id: String,
    /// The partition count (fixed when the cluster is created).
    pub partitions: u32,
    /// The lease TTL.
    pub lease_ttl: Duration,
    /// Copies of every stream and bucket.
    pub replicas: usize,
}

/// Runs a cluster node until `shutdown` resolves (see the module doc).
///
/// # Errors
/// A missing or weak secret, a cluster that cannot be joined, a listener
/// that cannot bind, or a fatal error while running.
pub(super) async fn run(
    config: ServeConfig,
    cluster: ClusterConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let Some(secret) = config.jwt_secret.clone() else {
        return Err(ServerError::Secret(SecretError::Required));
    };
    let secret = load_secret(Some(secret), &config.data_dir)?;
    let listener = listener::bind(config.listen, LISTEN_BACKLOG)
        .map_err(|e| ServerError::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let address = listener
        .local_addr()
        .map_err(|e| ServerError::Io(e.to_string()))?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let node = Node::join(NodeConfig {
        servers: cluster.servers.clone(),
        node_id: cluster.node_id.clone(),
        url: format!("http://{address}"),
        partitions: cluster.partitions,
        lease_ttl: cluster.lease_ttl,
        replicas: cluster.replicas,
        engine: config.engine.clone(),
        snapshots: config.snapshots,
        clock,
    })
    .await?;
    tracing::info!(
        %address,
        node = %cluster.node_id,
        partitions = cluster.partitions,
        "joined the cluster; listening"
    );
    let state = super::front_state(&config, Arc::new(Backend::recovering()), &secret)?;
    state.set_cluster(node.clone());
    let (stop_tx, stop_rx) = watch::channel(false);
    let sampler = live::spawn_sampler(state.clone(), stop_rx.clone());
    let front = Front::new(state);
    node.start(crate::http::cluster::forwarded_handler(front.clone()));
    let server = tokio::spawn(listener::serve(
        listener,
        front,
        super::connection_limits(&config),
        stop_rx.clone(),
    ));
    let watcher = tokio::spawn(watch_engines(node.clone(), stop_rx.clone()));
    let keeper = tokio::spawn(keep_books(node.clone(), stop_rx));
    let stopped = tokio::select! {
        () = shutdown => Ok(()),
        why = fatal::wait() => Err(ServerError::Fatal(why)),
    };
    match &stopped {
        Ok(()) => tracing::info!("shutting down: no new connections, finishing requests in flight"),
        Err(e) => {
            tracing::error!(error = %e, "fatal: finishing requests in flight, then exiting non-zero");
            super::exit_after_grace();
        }
    }
    // Sent once; a receiver gone means its task ended already.
    let _ = stop_tx.send(true);
    for (task, what) in [
        (server, "listener"),
        (sampler, "live sampler"),
        (watcher, "engine watcher"),
        (keeper, "idempotency upkeep"),
    ] {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "the {what} task failed");
        }
    }
    node.stop().await;
    tracing::info!("stopped");
    stopped
}

/// Reports a fatal error once an engine this node serves has a dead actor:
/// the process stops, and the partitions move to other nodes.
async fn watch_engines(node: Node, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(ENGINE_WATCH_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Some(why) = node.failure() {
            fatal::report(format!("an engine is dead: {why}"));
            return;
        }
    }
}

/// Keeps each served engine's idempotency book as a node alone does
/// (`server/mod.rs`, `supervise`): records past their TTL dropped once a
/// minute, records past the memory budget moved to the partition's store
/// on the servers every [`IDEM_UPKEEP_EVERY`]. A task of its own, so that
/// servers slow to take the records never delay the dead-engine watch.
async fn keep_books(node: Node, mut stop: watch::Receiver<bool>) {
    let mut last_eviction = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(IDEM_UPKEEP_EVERY) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let evict = last_eviction.elapsed() >= Duration::from_millis(IDEMPOTENCY_EVICT_EVERY_MS);
        if evict {
            last_eviction = Instant::now();
        }
        for (partition, engine) in node.engines() {
            // A stop does not wait for a slow store: a spill cut short
            // leaves its records in memory (and maybe also in the store),
            // which is harmless.
            tokio::select! {
                () = keep_idempotency(partition, &engine, evict) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Drops a partition engine's idempotency records past their TTL (when
/// `evict`), then moves those past its memory budget to its store (a
/// length compare when under it). Failures are logged and retried at the
/// next pass: the records stay in memory meanwhile.
async fn keep_idempotency(partition: u32, engine: &Engine, evict: bool) {
    if evict {
        match engine.evict_idempotency().await {
            Ok(0) => {}
            Ok(evicted) => {
                tracing::info!(
                    partition,
                    evicted,
                    "idempotency records past their TTL dropped"
                );
            }
            Err(error) => {
                tracing::warn!(partition, %error, "could not drop idempotency records past their TTL");
            }
        }
    }
    match engine.spill_idempotency().await {
        Ok(0) => {}
        Ok(moved) => tracing::info!(partition, moved, "idempotency records moved to the store"),
        Err(error) => {
            tracing::warn!(partition, %error, "could not move idempotency records to the store");
        }
    }
}
