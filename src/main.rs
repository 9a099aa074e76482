//! The `flashcore` command line: `serve` runs the server, `token` prints a
//! JWT for a user. Flags read environment variables too (contract: "The
//! command line").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use flashcore::domain::UserId;
use flashcore::engine::{DurabilityMode, EngineConfig};
use flashcore::http::admission::TrustedProxies;
use flashcore::http::auth::{JwtKeys, SECRET_ENV, load_secret};
use flashcore::journal::SnapshotPolicy;
use flashcore::journal::recovery::SNAPSHOT_EVERY_EVENTS;
use flashcore::limits::{
    ACTOR_THREADS_MAX, ARCHIVE_AFTER_MAX_MS, CONNECTIONS_DEFAULT, CONNECTIONS_MAX,
    IDEMPOTENCY_MEMORY_RECORDS_MAX, ORDER_SHARDS_DEFAULT, ORDER_SHARDS_MAX,
    REQUESTS_IN_FLIGHT_DEFAULT, REQUESTS_IN_FLIGHT_MAX, RESERVATION_TTL_MAX_MS, TOKEN_TTL_MAX_S,
};
use flashcore::server::{ClusterConfig, ServeConfig, run};

/// A trading core for e-commerce flash sales.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Print a token for a user, signed with the server's secret.
    Token(TokenArgs),
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum Durability {
    /// Answer a change only once it is on disk.
    Strict,
    /// Answer at once; flush at least every 5 ms.
    Relaxed,
}

#[derive(Parser, Debug)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "FLASHCORE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Data directory (journal, snapshots, secret).
    #[arg(long, env = "FLASHCORE_DATA_DIR", default_value = "./var")]
    data_dir: PathBuf,
    /// Catalog seeded into a fresh data dir; ignored once there is history.
    #[arg(long, env = "FLASHCORE_CATALOG", default_value = "data/catalog.json")]
    catalog: PathBuf,
    /// How long an unpaid order holds its units.
    #[arg(long, env = "FLASHCORE_RESERVATION_TTL", default_value = "15m", value_parser = humantime::parse_duration)]
    reservation_ttl: Duration,
    /// How long a finished order (delivered, cancelled, expired, refunded)
    /// stays in memory before it moves to the archive on disk; reads go on
    /// finding it there.
    #[arg(long, env = "FLASHCORE_ARCHIVE_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    archive_after: Duration,
    /// When a change counts as done.
    #[arg(
        long,
        env = "FLASHCORE_DURABILITY",
        value_enum,
        default_value = "strict"
    )]
    durability: Durability,
    /// Most open connections.
    #[arg(long, env = "FLASHCORE_MAX_CONNECTIONS", default_value_t = CONNECTIONS_DEFAULT)]
    max_connections: usize,
    /// Most requests handled at once; beyond it, `503 overloaded` at once.
    #[arg(long, env = "FLASHCORE_MAX_IN_FLIGHT", default_value_t = REQUESTS_IN_FLIGHT_DEFAULT)]
    max_in_flight: usize,
    /// Requests a second per user (or client address without a token):
    /// `off` or `N/s`. Admins are not limited.
    #[arg(long, env = "FLASHCORE_RATE_LIMIT", default_value = "off", value_parser = parse_rate_limit)]
    rate_limit: RateLimit,
    /// Proxies whose `X-Forwarded-For` is believed: `CIDR,...` (default
    /// none). Only then does a client behind them count as its own address
    /// for rate limits and shares.
    #[arg(long, env = "FLASHCORE_TRUSTED_PROXIES", default_value = "", value_parser = TrustedProxies::parse)]
    trusted_proxies: TrustedProxies,
    /// Most open connections from one address (IPv6 by /64); default an
    /// eighth of --max-connections. A trusted proxy is not bound by it.
    #[arg(long, env = "FLASHCORE_MAX_CONNECTIONS_PER_CLIENT")]
    max_connections_per_client: Option<usize>,
    /// Cut a journal damaged before its tail instead of refusing to start
    /// (every change from the damage on is lost).
    #[arg(long)]
    repair: bool,
    /// Threads for the HTTP front (tokio workers).
    #[arg(long, env = "FLASHCORE_HTTP_THREADS", default_value_t = 2)]
    http_threads: usize,
    /// Threads for the actors (actix arbiters).
    #[arg(long, env = "FLASHCORE_ACTOR_THREADS", default_value_t = 1)]
    actor_threads: usize,
    /// Order shards.
    #[arg(long, env = "FLASHCORE_ORDER_SHARDS", default_value_t = ORDER_SHARDS_DEFAULT)]
    order_shards: usize,
    /// Take a snapshot after this many new durable events (tests use a
    /// small value to cut the power while snapshots are written).
    /// Cluster mode: the NATS servers, comma-separated
    /// (`nats://127.0.0.1:4222,...`). Without it the node is alone on its
    /// data dir.
    #[arg(long, env = "FLASHCORE_CLUSTER", value_delimiter = ',')]
    cluster: Vec<String>,
    /// Cluster mode: this node's id (letters, digits, `-`, `_`), stable
    /// across restarts.
    #[arg(long, env = "FLASHCORE_NODE_ID")]
    node_id: Option<String>,
    /// Cluster mode: the partition count, fixed when the cluster is created.
    #[arg(long, env = "FLASHCORE_PARTITIONS", default_value_t = flashcore::cluster::layout::PARTITIONS_DEFAULT)]
    partitions: u32,
    /// Cluster mode: how long a partition's lease lasts unrenewed (a dead
    /// node's partitions move after about this long).
    #[arg(long, env = "FLASHCORE_LEASE_TTL", default_value = "3s", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Cluster mode: copies of every stream and bucket (3; 1 for a
    /// single-server trial).
    #[arg(long, env = "FLASHCORE_REPLICAS", default_value_t = 3, hide = true)]
    replicas: usize,
    #[arg(long, env = "FLASHCORE_SNAPSHOT_EVERY_EVENTS", default_value_t = SNAPSHOT_EVERY_EVENTS, hide = true)]
    snapshot_every_events: u64,
    /// Idempotency records an engine keeps in memory before the oldest move
    /// to its store (tests use a small value to see records leave memory).
    #[arg(long, env = "FLASHCORE_IDEM_MEMORY_RECORDS", default_value_t = IDEMPOTENCY_MEMORY_RECORDS_MAX, hide = true)]
    idem_memory_records: usize,
}

#[derive(Parser, Debug)]
struct TokenArgs {
    /// The user id (the token's `sub`).
    #[arg(long)]
    user: String,
    /// Make it an admin token.
    #[arg(long)]
    admin: bool,
    /// How long it is valid (at most 365 days: the server refuses longer).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// Data directory holding the secret (when FLASHCORE_JWT_SECRET is unset).
    #[arg(long, env = "FLASHCORE_DATA_DIR", default_value = "./var")]
    data_dir: PathBuf,
}

/// `--rate-limit`: requests a second per caller, or `None` for `off` (a
/// type of its own, so clap does not read the flag as optional).
#[derive(Debug, Clone, Copy)]
struct RateLimit(Option<std::num::NonZeroU32>);

fn parse_rate_limit(text: &str) -> Result<RateLimit, String> {
    flashcore::http::ratelimit::parse_rate(text).map(RateLimit)
}

/// How long the exit waits for blocking tasks still running (a recovery
/// that a signal interrupted).
const SHUTDOWN_BLOCKING_WAIT_MS: u64 = 1_000;

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let ttl_ms = u64::try_from(args.reservation_ttl.as_millis()).unwrap_or(u64::MAX);
    if ttl_ms == 0 || ttl_ms > RESERVATION_TTL_MAX_MS {
        bail!("--reservation-ttl must be between 1ms and 7 days");
    }
    let archive_after_ms = u64::try_from(args.archive_after.as_millis()).unwrap_or(u64::MAX);
    if archive_after_ms == 0 || archive_after_ms > ARCHIVE_AFTER_MAX_MS {
        bail!("--archive-after must be between 1ms and 366 days");
    }
    if !(1..=REQUESTS_IN_FLIGHT_MAX).contains(&args.max_in_flight) {
        bail!("--max-in-flight must be 1 to {REQUESTS_IN_FLIGHT_MAX}");
    }
    if args
        .max_connections_per_client
        .is_some_and(|n| n == 0 || n > args.max_connections)
    {
        bail!("--max-connections-per-client must be between 1 and --max-connections");
    }
    if args.max_connections == 0 || args.max_connections > CONNECTIONS_MAX {
        bail!("--max-connections must be 1 to {CONNECTIONS_MAX}");
    }
    if !(1..=64).contains(&args.http_threads)
        || !(1..=ACTOR_THREADS_MAX).contains(&args.actor_threads)
    {
        bail!("--http-threads must be 1 to 64 and --actor-threads 1 to {ACTOR_THREADS_MAX}");
    }
    if !(1..=ORDER_SHARDS_MAX).contains(&args.order_shards) {
        bail!("--order-shards must be 1 to {ORDER_SHARDS_MAX}");
    }
    if args.snapshot_every_events == 0 {
        bail!("--snapshot-every-events must be at least 1");
    }
    if !(1..=IDEMPOTENCY_MEMORY_RECORDS_MAX).contains(&args.idem_memory_records) {
        bail!("--idem-memory-records must be 1 to {IDEMPOTENCY_MEMORY_RECORDS_MAX}");
    }
    let cluster = cluster_config(&args)?;
    let config = ServeConfig {
        cluster,
        listen: args.listen,
        data_dir: args.data_dir,
        catalog: Some(args.catalog),
        engine: EngineConfig {
            actor_threads: args.actor_threads,
            order_shards: args.order_shards,
            reservation_ttl_ms: ttl_ms,
            archive_after_ms: Some(archive_after_ms),
            idem_memory_records_max: args.idem_memory_records,
            durability: match args.durability {
                Durability::Strict => DurabilityMode::Strict,
                Durability::Relaxed => DurabilityMode::Relaxed,
            },
            ..EngineConfig::default()
        },
        max_connections: args.max_connections,
        max_connections_per_client: args.max_connections_per_client,
        max_in_flight: args.max_in_flight,
        repair: args.repair,
        snapshots: SnapshotPolicy {
            every_events: args.snapshot_every_events,
            ..SnapshotPolicy::default()
        },
        jwt_secret: std::env::var(SECRET_ENV).ok(),
        rate_limit: args.rate_limit.0,
        trusted_proxies: args.trusted_proxies,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.http_threads)
        .thread_name("flashcore-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let served = runtime.block_on(run(config, shutdown_signal()));
    // A stop during recovery leaves the recovery task running on a blocking
    // thread; dropping the runtime would wait for it. Nothing it does needs
    // finishing (a restart recovers again), so do not wait long.
    runtime.shutdown_timeout(Duration::from_millis(SHUTDOWN_BLOCKING_WAIT_MS));
    served?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
/// The cluster settings, when `--cluster` is given.
fn cluster_config(args: &ServeArgs) -> anyhow::Result<Option<ClusterConfig>> {
    let servers: Vec<String> = args
        .cluster
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    if servers.is_empty() {
        return Ok(None);
    }
    let Some(node_id) = args.node_id.clone() else {
        bail!("--cluster needs --node-id (or FLASHCORE_NODE_ID), stable across restarts");
    };
    if !(1..=flashcore::cluster::layout::PARTITIONS_MAX).contains(&args.partitions) {
        bail!(
            "--partitions must be 1 to {}",
            flashcore::cluster::layout::PARTITIONS_MAX
        );
    }
    if matches!(args.durability, Durability::Relaxed) {
        // The cluster journal does not report the age of what is not yet
        // acknowledged, so relaxed answers would not wait for a stalled
        // quorum (README, "Cluster mode").
        bail!("--cluster runs strict durability only: drop --durability relaxed");
    }
    if !(1..=5).contains(&args.replicas) {
        bail!("--replicas must be 1 to 5");
    }
    Ok(Some(ClusterConfig {
        servers,
        node_id,
        partitions: args.partitions,
        lease_ttl: args.lease_ttl,
        replicas: args.replicas,
    }))
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

fn token(args: TokenArgs) -> anyhow::Result<()> {
    let user = UserId::parse(&args.user).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
    // The server refuses a token whose `exp` is more than a year ahead, so
    // a longer one would be printed only to be refused.
    if args.ttl.is_zero() || args.ttl > Duration::from_secs(TOKEN_TTL_MAX_S) {
        bail!(
            "--ttl must be between 1s and a year ({} days): the server refuses a token \
             whose exp is further ahead; got {:.2} days",
            TOKEN_TTL_MAX_S / 86_400,
            args.ttl.as_secs_f64() / 86_400.0
        );
    }
    let secret = load_secret(std::env::var(SECRET_ENV).ok(), &args.data_dir)?;
    let keys = JwtKeys::new(&secret);
    let now = jsonwebtoken_now();
    let token = keys.issue(user, args.admin, now, args.ttl.as_secs().max(1))?;
    println!("{token}");
    Ok(())
}

fn jsonwebtoken_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn main() -> anyhow::Result<()> {
    // Before anything is created: the data dir and all in it are the
    // server's user's alone (contract: "Authentication").
    flashcore::memory::restrict_new_files();
    flashcore::memory::limit_arenas();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Serve(args) => serve(*args),
        Command::Token(args) => token(args),
    }
}
