//! `flashcore serve`: start-up, the storage supervisor, and shutdown.
//!
//! Start-up order: raise the open-file limit, check the data dir (a
//! `jwt-secret` others may read stops the start before anything changes;
//! then group and other permissions come off the rest), load the
//! JWT secret, bind the listener (so `/healthz` answers and `/readyz` says
//! 503 while recovering), recover the state (newest snapshot + journal tail,
//! then release what a crash left held and expire what passed its deadline,
//! all journaled), seed the catalog into a fresh data dir, start the
//! snapshotter, and only then become ready.
//!
//! The supervisor watches the journal. After a storage failure (disk full,
//! I/O error) the journal refuses changes (`503 storage_unavailable`),
//! `/readyz` says 503, and reads go on; every second the supervisor probes
//! the disk with a small synced write, and once that succeeds it reloads the
//! last durable state from disk (dropping exactly the changes that never
//! became durable) and takes changes again.
//!
//! Shutdown order (SIGTERM or Ctrl-C): stop accepting, finish the requests
//! in flight, stop the engine, close the journal (everything taken becomes
//! durable), take a last snapshot, exit 0.

mod cluster;
mod listener;

pub use cluster::ClusterConfig;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::domain::promo::Promotion;
use crate::engine::{
    Clock, DurabilityMode, Engine, EngineConfig, EngineError, NewSku, SystemClock,
};
use crate::fatal;
use crate::http::admission::TrustedProxies;
use crate::http::auth::{JwtKeys, SecretError, check_secret_file, load_secret};
use crate::http::views::{NewSkuBody, PromotionBody};
use crate::http::{AppState, Backend, Front, FrontConfig, live};
use crate::journal::{self, FlushPolicy, RecoveryError, SledJournal, SnapshotPolicy, Snapshotter};
use crate::limits::{
    CATALOG_BYTES_MAX, CATALOG_SEED_IN_FLIGHT, CONNECTIONS_CLIENT_SHARE_DIVISOR,
    IDEMPOTENCY_EVICT_EVERY_MS, LISTEN_BACKLOG, STORAGE_PROBE_MS,
};

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The data dir (journal, snapshots, secret).
    pub data_dir: PathBuf,
    /// The catalog seeded into a fresh data dir.
    pub catalog: Option<PathBuf>,
    /// How the engine runs (durability, TTL, threads).
    pub engine: EngineConfig,
    /// Most open connections.
    pub max_connections: usize,
    /// Most open connections from one address (IPv6 by /64); `None` is an
    /// eighth of `max_connections`.
    pub max_connections_per_client: Option<usize>,
    /// Most requests handled at once; beyond, `503 overloaded`.
    pub max_in_flight: usize,
    /// Cut a damaged journal instead of refusing to start.
    pub repair: bool,
    /// How often snapshots are taken.
    pub snapshots: SnapshotPolicy,
    /// The JWT secret from the environment, if set.
    pub jwt_secret: Option<String>,
    /// Requests a second per caller (`--rate-limit`), or `None` for off.
    pub rate_limit: Option<std::num::NonZeroU32>,
    /// Whose `X-Forwarded-For` is believed (`--trusted-proxies`).
    pub trusted_proxies: TrustedProxies,
    /// Cluster mode (`--cluster`): the state lives in NATS JetStream, not
    /// in the data dir.
    pub cluster: Option<ClusterConfig>,
}

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data dir or listener cannot be used.
    #[error("{0}")]
    Io(String),
    /// The state cannot be rebuilt.
    #[error(transparent)]
    Recovery(#[from] RecoveryError),
    /// The JWT secret cannot be had.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The engine refused to start or to seed the catalog.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// An invariant broke while running (a panic, a dead actor): the
    /// process stopped so that its supervisor restarts it from the durable
    /// state.
    #[error("stopped after a fatal error: {0}")]
    Fatal(String),
    /// The node could not join its cluster.
    #[error("joining the cluster: {0}")]
    Cluster(#[from] crate::cluster::node::NodeError),
    /// The catalog file is unusable.
    #[error("catalog {path}: {why}")]
    Catalog {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// How long a fatal stop may take to finish the requests in flight and
/// close the journal before the process exits regardless.
const FATAL_EXIT_GRACE_MS: u64 = 10_000;

/// How often a snapshotter that stopped after an error is started again.
const SNAPSHOTTER_RESTART_MS: u64 = 10_000;

/// The exit code of a fatal stop that did not finish within its grace.
const FATAL_EXIT_CODE: i32 = 70;

/// The storage side that the supervisor owns: what the backend serves,
/// plus the snapshotter.
struct Storage {
    config: ServeConfig,
    backend: Arc<Backend>,
    /// The journal the backend's engine writes to (the server opens and
    /// closes it; the front sees it only through the engine).
    journal: Mutex<Option<Arc<SledJournal>>>,
    snapshotter: Mutex<Option<Snapshotter>>,
}

fn policy(mode: DurabilityMode) -> FlushPolicy {
    match mode {
        DurabilityMode::Strict => FlushPolicy::Strict,
        DurabilityMode::Relaxed => FlushPolicy::Relaxed,
    }
}

/// Writes and fsyncs a small file in the data dir: does the disk take writes?
fn probe(data_dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let path = data_dir.join(".probe");
    let mut file = std::fs::File::create(&path)?;
    file.write_all(&[0u8; 4096])?;
    file.sync_all()?;
    drop(file);
    std::fs::remove_file(&path)
}

/// The catalog file's shape.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalog {
    #[serde(default)]
    skus: Vec<NewSkuBody>,
    #[serde(default)]
    promotions: Vec<PromotionBody>,
}

fn read_catalog(path: &Path) -> Result<Option<Catalog>, ServerError> {
    let bad = |why: String| ServerError::Catalog {
        path: path.to_path_buf(),
        why,
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(bad(e.to_string())),
    };
    if meta.len() > CATALOG_BYTES_MAX {
        return Err(bad(format!("over {CATALOG_BYTES_MAX} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| bad(format!("invalid: {e}")))
}

impl Storage {
    /// Opens the journal, rebuilds the state and starts the engine and the
    /// snapshotter (blocking: run it off the async workers).
    fn open(&self) -> Result<(Engine, Arc<SledJournal>, bool), ServerError> {
        let data_dir = &self.config.data_dir;
        crate::faults::stall("stall-recovery-ms");
        let opened = journal::open(
            data_dir,
            policy(self.config.engine.durability),
            self.config.repair,
        )?;
        let recovered = opened.recovered;
        let fresh = recovered.last_seq == 0 && recovered.snapshot_seq == 0;
        tracing::info!(
            snapshot = recovered.snapshot_seq,
            replayed = recovered.replayed,
            last_seq = recovered.last_seq,
            cut_at = ?recovered.cut_at,
            orders = recovered.state.orders.len(),
            skus = recovered.state.skus.len(),
            "state rebuilt"
        );
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let engine = Engine::start(
            self.config.engine.clone(),
            opened.journal.clone(),
            Arc::clone(&clock),
            recovered.state,
        )?;
        let snapshotter = Snapshotter::start(
            Arc::new(engine.clone()),
            opened.journal.clone(),
            journal::snapshot_dir(data_dir),
            self.config.snapshots,
        );
        *self.snapshotter.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshotter);
        Ok((engine, opened.journal, fresh))
    }

    /// Starts the snapshotter again if it stopped after an error (a full
    /// disk while writing a snapshot, say), at most once per
    /// [`SNAPSHOTTER_RESTART_MS`]: a dead snapshotter serves on but lets the
    /// journal and the restart time grow without bound.
    fn restart_snapshotter_if_dead(&self, last_start: &mut Instant) {
        let mut snapshotter = self.snapshotter.lock().unwrap_or_else(|p| p.into_inner());
        let dead = snapshotter.as_ref().is_some_and(|s| !s.healthy());
        if !dead || last_start.elapsed() < Duration::from_millis(SNAPSHOTTER_RESTART_MS) {
            return;
        }
        let Some(journal) = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            return;
        };
        let Ok(engine) = self.backend.engine() else {
            return;
        };
        if let Some(mut old) = snapshotter.take() {
            old.stop();
        }
        tracing::warn!("the snapshotter had stopped after an error; starting it again");
        *last_start = Instant::now();
        *snapshotter = Some(Snapshotter::start(
            Arc::new(engine),
            journal,
            journal::snapshot_dir(&self.config.data_dir),
            self.config.snapshots,
        ));
    }

    /// Stops the snapshotter (after a last snapshot, which asks the
    /// engine's actors for their parts, so it goes first), the engine, and
    /// the journal (after everything taken is durable).
    fn close(&self) {
        if let Some(mut snapshotter) = self
            .snapshotter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            snapshotter.stop();
        }
        if let Some(engine) = self.backend.take() {
            engine.shutdown();
        }
        let journal = self
            .journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(journal) = &journal {
            journal.close();
        }
    }
}

/// The marker of a catalog seed under way: created (durably) before the
/// first SKU of a fresh data dir, removed after the last. A crash in between
/// leaves it, and the next start completes the seed.
fn seed_marker(data_dir: &Path) -> PathBuf {
    data_dir.join(".catalog-seeding")
}

/// Seeds the catalog into a fresh data dir (or completes a seed a crash
/// cut short: what exists already is kept).
async fn seed(engine: &Engine, path: &Path, data_dir: &Path) -> Result<(), ServerError> {
    let Some(catalog) = read_catalog(path)? else {
        tracing::warn!(path = %path.display(), "no catalog file; starting with an empty catalog");
        return Ok(());
    };
    let bad = |why: String| ServerError::Catalog {
        path: path.to_path_buf(),
        why,
    };
    let marker = seed_marker(data_dir);
    let io = |e: std::io::Error| ServerError::Io(format!("{}: {e}", marker.display()));
    std::fs::File::create(&marker)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    crate::files::sync_dir(data_dir)
        .map_err(|e| ServerError::Io(format!("{}: {e}", data_dir.display())))?;
    let kept = |result: Result<(), EngineError>| match result {
        Err(EngineError::AlreadyExists { .. }) => Ok(()),
        other => other,
    };
    // Many creations at once share the journal's flushes (group commit):
    // a large catalog seeds in seconds, not one fsync per SKU.
    let mut skus = catalog.skus.into_iter();
    loop {
        let mut batch = Vec::with_capacity(CATALOG_SEED_IN_FLIGHT);
        for sku in skus.by_ref().take(CATALOG_SEED_IN_FLIGHT) {
            let id = sku.sku_id;
            let sale = sku.sale().map_err(|e| bad(format!("SKU {id}: {e}")))?;
            let new = NewSku {
                sku: sku.sku_id,
                name: sku.name,
                price_cents: sku.price_cents,
                stock: sku.stock,
                per_user_limit: sku.per_user_limit,
                sale,
            };
            batch.push(async move { (id, engine.create_sku(new).await.map(|_| ())) });
        }
        if batch.is_empty() {
            break;
        }
        for (id, created) in futures_util::future::join_all(batch).await {
            kept(created).map_err(|e| bad(format!("SKU {id}: {e}")))?;
        }
    }
    for promo in catalog.promotions {
        let promotion = Promotion::new(promo.code, promo.threshold_cents, promo.off_cents)
            .map_err(|e| bad(format!("promotion {}: {e}", promo.code)))?;
        let created = engine.create_promotion(promotion).await.map(|_| ());
        kept(created).map_err(|e| bad(format!("promotion {}: {e}", promo.code)))?;
    }
    std::fs::remove_file(&marker).map_err(io)?;
    crate::files::sync_dir(data_dir)
        .map_err(|e| ServerError::Io(format!("{}: {e}", data_dir.display())))?;
    tracing::info!(path = %path.display(), "catalog seeded");
    Ok(())
}

async fn start_storage(storage: &Arc<Storage>) -> Result<(), ServerError> {
    let opener = Arc::clone(storage);
    let (engine, journal, fresh) = tokio::task::spawn_blocking(move || opener.open())
        .await
        .map_err(|e| ServerError::Io(format!("recovery task: {e}")))??;
    let data_dir = &storage.config.data_dir;
    if (fresh || seed_marker(data_dir).exists())
        && let Some(catalog) = &storage.config.catalog
    {
        seed(&engine, catalog, data_dir).await?;
    }
    if let Err(error) = engine.evict_idempotency().await {
        tracing::warn!(%error, "could not drop idempotency records past their TTL; retrying later");
    }
    *storage.journal.lock().unwrap_or_else(|p| p.into_inner()) = Some(journal);
    storage.backend.install(engine);
    tracing::info!("ready");
    Ok(())
}

/// Watches the journal; after a failure, probes the disk and reloads the
/// last durable state once it takes writes again, retrying a reload that
/// fails until one succeeds. Also drops idempotency records past their TTL,
/// once a minute, and moves records past the book's memory budget to disk.
async fn supervise(storage: Arc<Storage>, mut stop: watch::Receiver<bool>) {
    let mut reload_failed: Option<String> = None;
    let mut last_eviction = Instant::now();
    let mut last_snapshotter_start = Instant::now();
    loop {
        let dead = match storage.backend.engine() {
            Ok(engine) => futures_util::future::Either::Left(engine.dead()),
            Err(_) => futures_util::future::Either::Right(std::future::pending()),
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(STORAGE_PROBE_MS)) => {}
            _ = stop.wait_for(|s| *s) => return,
            why = dead => {
                fatal::report(format!("the engine is dead: {why}"));
                return;
            }
        }
        if last_eviction.elapsed() >= Duration::from_millis(IDEMPOTENCY_EVICT_EVERY_MS) {
            last_eviction = Instant::now();
            if let Ok(engine) = storage.backend.engine() {
                match engine.evict_idempotency().await {
                    Ok(0) => {}
                    Ok(evicted) => {
                        tracing::info!(evicted, "idempotency records past their TTL dropped");
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not drop idempotency records past their TTL");
                    }
                }
            }
        }
        if let Ok(engine) = storage.backend.engine() {
            // Past its memory budget, the key book moves its oldest records
            // to disk (a length compare when it is not).
            match engine.spill_idempotency().await {
                Ok(0) => {}
                Ok(moved) => tracing::info!(moved, "idempotency records moved to disk"),
                Err(error) => tracing::warn!(%error, "could not move idempotency records to disk"),
            }
        }
        let failure = storage
            .backend
            .engine()
            .ok()
            .and_then(|e| e.storage_failure())
            .map(|e| e.to_string());
        if failure.is_none() {
            storage.restart_snapshotter_if_dead(&mut last_snapshotter_start);
        }
        let why = match (reload_failed.clone(), failure) {
            (Some(why), _) | (None, Some(why)) => why,
            (None, None) => continue,
        };
        let dir = storage.config.data_dir.clone();
        // A signal must not wait for a probe or a reload (a dead disk can
        // hang either): the blocking work is left behind, like a recovery
        // that a signal interrupts.
        let probed = tokio::select! {
            probed = tokio::task::spawn_blocking(move || probe(&dir)) => probed,
            _ = stop.wait_for(|s| *s) => return,
        };
        match probed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, failure = %why, "the disk still refuses writes");
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "probe task failed");
                continue;
            }
        }
        tracing::warn!(failure = %why, "the disk takes writes again; reloading the last durable state");
        let closer = Arc::clone(&storage);
        if let Err(e) = tokio::task::spawn_blocking(move || closer.close()).await {
            tracing::error!(error = %e, "closing the failed storage");
        }
        let started = tokio::select! {
            started = start_storage(&storage) => started,
            _ = stop.wait_for(|s| *s) => return,
        };
        match started {
            Ok(()) => reload_failed = None,
            Err(e) => {
                tracing::error!(error = %e, "reloading failed; retrying in a second");
                reload_failed = Some(e.to_string());
            }
        }
    }
}

/// Runs the server until `shutdown` resolves, then shuts down in order.
///
/// # Errors
/// Any [`ServerError`] that prevents starting; a failure after start-up is
/// logged and handled by the supervisor instead.
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    fatal::install_panic_hook();
    if let Some(cluster) = config.cluster.clone() {
        return cluster::run(config, cluster, shutdown).await;
    }
    let wanted = u64::try_from(config.max_connections)
        .unwrap_or(u64::MAX)
        .saturating_add(1_024);
    match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) if limit < wanted => {
            tracing::warn!(
                limit,
                wanted,
                "the open-file limit is below --max-connections"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    crate::files::create_dir_durably(&config.data_dir).map_err(|e| {
        ServerError::Io(format!(
            "cannot create the data dir {}: {e}",
            config.data_dir.display()
        ))
    })?;
    // A secret others may have read refuses the start before anything in
    // the data dir is changed; then what an earlier build left readable is
    // made the server's user's alone.
    check_secret_file(&config.data_dir)?;
    crate::files::restrict_to_owner(&config.data_dir).map_err(|e| {
        ServerError::Io(format!(
            "cannot make the data dir {} its owner's alone: {e}",
            config.data_dir.display()
        ))
    })?;
    probe(&config.data_dir).map_err(|e| {
        ServerError::Io(format!(
            "the data dir {} does not take writes: {e}",
            config.data_dir.display()
        ))
    })?;
    let secret = load_secret(config.jwt_secret.clone(), &config.data_dir)?;
    let backend = Arc::new(Backend::recovering());
    let state = front_state(&config, Arc::clone(&backend), &secret)?;
    let listener = listener::bind(config.listen, LISTEN_BACKLOG)
        .map_err(|e| ServerError::Io(format!("cannot listen on {}: {e}", config.listen)))?;
    let address = listener
        .local_addr()
        .map_err(|e| ServerError::Io(e.to_string()))?;
    tracing::info!(%address, data_dir = %config.data_dir.display(), "listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    // Stops with the same signal, and its end ends every open live stream,
    // so the listener's drain below does not wait on dashboards.
    let sampler = live::spawn_sampler(state.clone(), stop_rx.clone());
    let server = tokio::spawn(listener::serve(
        listener,
        Front::new(state),
        connection_limits(&config),
        stop_rx.clone(),
    ));
    let storage = Arc::new(Storage {
        config,
        backend,
        journal: Mutex::new(None),
        snapshotter: Mutex::new(None),
    });
    let supervisor = tokio::spawn(supervise(Arc::clone(&storage), stop_rx));
    tokio::pin!(shutdown);
    let fatal_stop = fatal::wait();
    tokio::pin!(fatal_stop);
    // Why the server stops: a signal (during recovery or after), or a fatal
    // error. Each future is awaited to completion at most once.
    let stopped: Result<(), ServerError> = tokio::select! {
        started = start_storage(&storage) => match started {
            Err(e) => Err(e),
            Ok(()) => tokio::select! {
                () = &mut shutdown => Ok(()),
                why = &mut fatal_stop => Err(ServerError::Fatal(why)),
            },
        },
        () = &mut shutdown => {
            tracing::info!("stopped while recovering");
            Ok(())
        }
        why = &mut fatal_stop => Err(ServerError::Fatal(why)),
    };
    match &stopped {
        Ok(()) => {
            tracing::info!("shutting down: no new connections, finishing requests in flight");
        }
        Err(ServerError::Fatal(why)) => {
            tracing::error!(reason = %why, "fatal: not ready; finishing requests in flight, then exiting non-zero");
            exit_after_grace();
        }
        Err(_) => {}
    }
    let _ = stop_tx.send(true);
    if let Err(e) = server.await {
        tracing::error!(error = %e, "the listener task failed");
    }
    if let Err(e) = sampler.await {
        tracing::error!(error = %e, "the live sampler failed");
    }
    if let Err(e) = supervisor.await {
        tracing::error!(error = %e, "the supervisor task failed");
    }
    let closer = Arc::clone(&storage);
    tokio::task::spawn_blocking(move || closer.close())
        .await
        .map_err(|e| ServerError::Io(format!("closing: {e}")))?;
    tracing::info!("stopped");
    stopped
}

/// The front's state for `config` on `backend`, with the rate limiter's
/// evictor running when limits are on (a node alone and a cluster node
/// alike).
fn front_state(
    config: &ServeConfig,
    backend: Arc<Backend>,
    secret: &[u8],
) -> Result<AppState, ServerError> {
    let state = AppState::new(
        backend,
        JwtKeys::new(secret),
        FrontConfig {
            max_in_flight: config.max_in_flight,
            rate_limit: config.rate_limit,
            trusted_proxies: config.trusted_proxies.clone(),
        },
    )
    .map_err(|e| ServerError::Io(format!("metrics: {e}")))?;
    if let Some(limiter) = &state.rate_limiter {
        limiter.spawn_evictor();
    }
    Ok(state)
}

/// The accept loop's connection bounds for `config`.
fn connection_limits(config: &ServeConfig) -> listener::ConnectionLimits {
    listener::ConnectionLimits {
        max: config.max_connections,
        per_client: config
            .max_connections_per_client
            .unwrap_or(config.max_connections / CONNECTIONS_CLIENT_SHARE_DIVISOR),
        trusted_proxies: config.trusted_proxies.clone(),
    }
}

/// After a fatal error, the orderly stop gets [`FATAL_EXIT_GRACE_MS`]; a
/// stop that hangs (on whatever broke) must not keep a dead server up.
fn exit_after_grace() {
    let spawned = std::thread::Builder::new()
        .name("flashcore-fatal-exit".into())
        .spawn(|| {
            std::thread::sleep(Duration::from_millis(FATAL_EXIT_GRACE_MS));
            tracing::error!("the fatal stop did not finish in time; exiting now");
            std::process::exit(FATAL_EXIT_CODE);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the exit timer; exiting now");
        std::process::exit(FATAL_EXIT_CODE);
    }
}
