//! The command line: one subcommand per scenario, with the flags they share.
//!
//! Every run is bounded by `--duration` and `--max-requests`; clap refuses
//! values outside the bounds in [`crate::limits`] before anything starts.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::limits;

/// Storms a flashcore server like a real flash sale, then checks its books.
#[derive(Debug, Clone, Parser)]
#[command(name = "loadtest", version, about, long_about = None)]
pub struct Cli {
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: ScenarioCmd,
}

/// The four scenarios.
#[derive(Debug, Clone, Subcommand)]
pub enum ScenarioCmd {
    /// N buyers, each with its own token, race for a hot SKU with S units,
    /// then keep hammering it sold out.
    FlashSale(FlashSaleArgs),
    /// Browse, cart, checkout, pay, cancel and refund in realistic proportions,
    /// as fast as the connections allow.
    Mixed(MixedArgs),
    /// The mixed workload at a steady open-loop rate for a long time, watching
    /// latency and server memory drift.
    Soak(PacedArgs),
    /// Open-loop order arrivals at a fixed rate (set it above capacity);
    /// latency is measured from each request's intended start.
    Overload(PacedArgs),
}

impl ScenarioCmd {
    /// The flags every scenario shares.
    #[must_use]
    pub fn common(&self) -> &CommonArgs {
        match self {
            Self::FlashSale(a) => &a.common,
            Self::Mixed(a) => &a.common,
            Self::Soak(a) | Self::Overload(a) => &a.common,
        }
    }

    /// The scenario's name as written on the command line and in the report.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Self::FlashSale(_) => "flash-sale",
            Self::Mixed(_) => "mixed",
            Self::Soak(_) => "soak",
            Self::Overload(_) => "overload",
        }
    }
}

/// How durable the server's acknowledgements are (forwarded to `--spawn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Durability {
    /// A 2xx means the change is on disk.
    Strict,
    /// Acknowledged before the flush; the flush follows on a short timer.
    Relaxed,
}

impl Durability {
    /// The flag value, as `flashcore serve --durability` takes it.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Relaxed => "relaxed",
        }
    }
}

/// Flags every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// A running server, e.g. http://127.0.0.1:8080 (loopback only). Give
    /// it again for each node of a cluster: connections go round-robin over
    /// them, setup runs through the first and the book check reads through
    /// the last.
    #[arg(long, required_unless_present = "spawn", conflicts_with = "spawn")]
    pub url: Vec<String>,

    /// Start `flashcore serve` on a free loopback port with a temp data dir,
    /// and stop it after the run.
    #[arg(long)]
    pub spawn: bool,

    /// Concurrent keep-alive connections, one per worker (exact).
    #[arg(long, default_value_t = limits::CONNECTIONS_DEFAULT,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::CONNECTIONS_MAX)))]
    pub connections: u32,

    /// How long the load phase lasts, e.g. 15s, 2m, 1h.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub duration: Duration,

    /// The run stops after this many requests even if time is left.
    #[arg(long, default_value_t = limits::REQUESTS_DEFAULT,
          value_parser = clap::value_parser!(u64).range(1..=limits::REQUESTS_MAX))]
    pub max_requests: u64,

    /// Where report.json, latency.svg (and server.log with --spawn) go.
    #[arg(long, default_value = "target/loadtest")]
    pub out: PathBuf,

    /// The server's JWT secret, to mint tokens (with --url). --spawn makes its own.
    #[arg(long, env = "FLASHCORE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// The flashcore binary for --spawn [default: `flashcore` next to this executable].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,

    /// The durability mode: forwarded to a spawned server, recorded in the report.
    #[arg(long, value_enum, default_value_t = Durability::Strict)]
    pub durability: Durability,

    /// Forwarded to a spawned server's --reservation-ttl.
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    pub reservation_ttl: Duration,

    /// The time one request may take before it counts as unanswered.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// PID of a --url server, to sample its memory (RSS) over the run.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Live progress: a bar on a terminal, plain lines otherwise (auto), or off.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

/// How live progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    /// A bar when stdout is a terminal, else plain lines.
    Auto,
    /// Always the `indicatif` bar.
    Bar,
    /// One plain line a second.
    Plain,
    /// Nothing until the end table.
    Off,
}

/// `flash-sale` flags.
#[derive(Debug, Clone, Args)]
pub struct FlashSaleArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Distinct buyers, each with its own token (buyer-00001, ...).
    #[arg(long, default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::BUYERS_MAX)))]
    pub buyers: u32,

    /// Units of the hot SKU.
    #[arg(long, default_value_t = 2_000,
          value_parser = clap::value_parser!(u64).range(0..=limits::STOCK_MAX))]
    pub stock: u64,

    /// The hot SKU's per_user_limit.
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::PER_USER_LIMIT_MAX)))]
    pub per_user_limit: u32,
}

/// `mixed` flags.
#[derive(Debug, Clone, Args)]
pub struct MixedArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Distinct customers; each connection owns its own share of them.
    #[arg(long, default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::BUYERS_MAX)))]
    pub buyers: u32,
}

/// `soak` and `overload` flags.
#[derive(Debug, Clone, Args)]
pub struct PacedArgs {
    /// Shared flags.
    #[command(flatten)]
    pub common: CommonArgs,

    /// Distinct customers.
    #[arg(long, default_value_t = 2_000,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(limits::BUYERS_MAX)))]
    pub buyers: u32,

    /// Target arrivals per second, open loop.
    #[arg(long, default_value_t = 1_000,
          value_parser = clap::value_parser!(u64).range(1..=limits::RATE_MAX))]
    pub rate: u64,
}

/// Parses a humantime duration (`15s`, `2m`, `1h`) within [`limits::DURATION_MAX`].
///
/// # Errors
///
/// A malformed duration, zero, or one longer than the limit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be longer than zero".to_owned());
    }
    if duration > limits::DURATION_MAX {
        return Err(format!(
            "must be at most {}",
            humantime::format_duration(limits::DURATION_MAX)
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_demonstration_parses() {
        let cli = Cli::try_parse_from([
            "loadtest",
            "flash-sale",
            "--spawn",
            "--buyers",
            "20000",
            "--stock",
            "2000",
            "--connections",
            "64",
            "--duration",
            "15s",
            "--out",
            "target/loadtest",
        ])
        .unwrap();
        let ScenarioCmd::FlashSale(args) = &cli.scenario else {
            panic!("not flash-sale")
        };
        assert_eq!(args.buyers, 20_000);
        assert_eq!(args.stock, 2_000);
        assert_eq!(args.common.connections, 64);
        assert_eq!(args.common.duration, Duration::from_secs(15));
        assert!(args.common.spawn);
    }

    #[test]
    fn url_and_spawn_exclude_each_other_and_one_is_needed() {
        assert!(Cli::try_parse_from(["loadtest", "mixed"]).is_err());
        assert!(
            Cli::try_parse_from([
                "loadtest",
                "mixed",
                "--spawn",
                "--url",
                "http://127.0.0.1:1"
            ])
            .is_err()
        );
    }

    #[test]
    fn url_may_be_given_once_per_node() {
        let cli = Cli::try_parse_from([
            "loadtest",
            "flash-sale",
            "--url",
            "http://127.0.0.1:8081",
            "--url",
            "http://127.0.0.1:8082",
        ])
        .expect("parses");
        assert_eq!(cli.scenario.common().url.len(), 2);
    }

    #[test]
    fn bounds_are_enforced() {
        assert!(
            Cli::try_parse_from(["loadtest", "overload", "--spawn", "--duration", "25h"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["loadtest", "overload", "--spawn", "--duration", "0s"]).is_err()
        );
        assert!(
            Cli::try_parse_from(["loadtest", "overload", "--spawn", "--connections", "0"]).is_err()
        );
        assert!(Cli::try_parse_from(["loadtest", "overload", "--spawn", "--rate", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["loadtest", "flash-sale", "--spawn", "--stock", "1000000001"])
                .is_err()
        );
    }
}
