//! Every bound and default of the load tester, each with its reason.
//!
//! A run is bounded in time (`--duration`, at most [`DURATION_MAX`]) and in
//! requests (`--max-requests`, at most [`REQUESTS_MAX`]); every loop in the
//! tool is bounded by one of these or by a named constant here.

use std::time::Duration;

/// Default `--connections`: the demonstration runs 64.
pub const CONNECTIONS_DEFAULT: u32 = 64;
/// The server bounds its connections at 10,000 by default; beyond that a run
/// measures refusals, not the server.
pub const CONNECTIONS_MAX: u32 = 10_000;

/// The longest run: a day-long soak is the longest anyone has asked for.
pub const DURATION_MAX: Duration = Duration::from_secs(24 * 60 * 60);

/// Default `--max-requests`: far above what 15 s on loopback can send, so the
/// duration is what normally ends a run.
pub const REQUESTS_DEFAULT: u64 = 2_000_000;
/// Every acknowledged order is remembered (about 200 bytes) for the book check,
/// so the request cap also caps that memory (a few GiB at most).
pub const REQUESTS_MAX: u64 = 20_000_000;

/// Buyers' tokens are minted before the run (about 200 bytes each).
pub const BUYERS_MAX: u32 = 1_000_000;
/// The contract's bound on `stock` when a SKU is created.
pub const STOCK_MAX: u64 = 1_000_000_000;
/// The contract's bound on a SKU's `per_user_limit`.
pub const PER_USER_LIMIT_MAX: u32 = 10_000;
/// Open-loop arrivals per second; a million a second is far past what one
/// loopback machine can send, so a larger number is a typo.
pub const RATE_MAX: u64 = 1_000_000;

/// Default time one request may take before it counts as unanswered.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// A TCP connect on loopback that takes this long is not going to succeed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connect a worker waits this long, so a dead server is not
/// hammered in a busy loop (each attempt still counts against the budget).
pub const RECONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// The server closes a connection that sends no request head for 10 s; one
/// idle this long is reopened before use rather than raced against that close
/// (a request sent as the server closes would count as unanswered).
pub const IDLE_REOPEN_AFTER: Duration = Duration::from_secs(5);
/// The largest answer we read: a `GET /v1/orders` page of 500 orders fits.
pub const RESPONSE_BODY_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A spawned server must answer `/readyz` 200 within this; a fresh data dir
/// has nothing to recover, so this only covers a slow start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often `/readyz` is polled while waiting.
pub const READY_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A spawned server that does not exit this long after SIGTERM gets SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(20);
/// How often we look whether a stopping server has exited.
pub const STOP_POLL_INTERVAL: Duration = Duration::from_millis(50);
/// A free port can be taken by someone else between our probe and the
/// server's bind; try that many ports before giving up.
pub const SPAWN_ATTEMPTS: u32 = 3;
/// Lines of the server's log shown when it fails to start.
pub const LOG_TAIL_LINES: usize = 20;

/// An open-loop worker waiting for a far arrival looks at the stop flag this
/// often, so Ctrl-C ends even a one-request-a-minute soak promptly.
pub const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// The live view is refreshed this often (about four times a second).
pub const PROGRESS_TICK: Duration = Duration::from_millis(250);
/// Without a terminal, one plain progress line this often.
pub const PLAIN_PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// The timeline keeps at most this many points (buckets widen for long runs),
/// so a day-long soak still makes a readable chart and a small report.
pub const TIMELINE_POINTS_MAX: u64 = 600;

/// Latencies are recorded in microseconds and clamped at an hour, longer than
/// any run's wait plus timeout.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// hdrhistogram precision: 3 significant figures keeps p99.9 honest.
pub const LATENCY_SIGFIG: u8 = 3;
const _: () = assert!(
    LATENCY_SIGFIG <= 5,
    "hdrhistogram allows 0..=5 significant figures"
);

/// Tokens stay valid this long after the run's planned end, so the book check
/// and a slow shutdown never meet an expired token.
pub const TOKEN_TTL_MARGIN: Duration = Duration::from_secs(60 * 60);
/// Random bytes in a secret we generate for `--spawn` (hex-encoded).
pub const SECRET_BYTES: usize = 48;
/// The server refuses secrets shorter than this.
pub const SECRET_BYTES_MIN: usize = 32;

/// The book check reads orders over at most this many connections.
pub const BOOK_CHECK_CONNECTIONS_MAX: u32 = 32;
/// A read in the book check that gets no answer (or 503) is tried this often.
pub const BOOK_CHECK_ATTEMPTS: u32 = 5;
/// Pause between two tries of one book-check read.
pub const BOOK_CHECK_RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Violations listed by name in the report and on screen; the counts are
/// always complete.
pub const VIOLATIONS_LISTED_MAX: usize = 50;

/// SKUs in the mixed and soak catalog.
pub const MIXED_SKUS: u32 = 20;
/// Stock of each mixed SKU: enough that a long mixed run rarely sells out.
pub const MIXED_SKU_STOCK: u64 = 100_000_000;
/// Largest qty a mixed buyer puts on a line.
pub const MIXED_QTY_MAX: u32 = 3;

/// The server's background steps (`/metrics`, `server_steps.rs`): after each
/// answer the poller waits this long before the next scrape. The server serves
/// a cached `/metrics` text to scrapes less than 1 s after its last render, so
/// a fixed 1 s ticker would get every other text from the cache; waiting a
/// little over a second after the answer lands each scrape on a fresh render.
pub const METRICS_POLL_GAP: Duration = Duration::from_millis(1_010);
/// One scrape that takes longer counts as failed (the run goes on).
pub const METRICS_POLL_TIMEOUT: Duration = Duration::from_millis(500);
/// A scrape reports the longest run of each step in the server's last whole
/// second; that second's middle lies, on average, this long before the scrape.
pub const METRICS_SAMPLE_LAG: Duration = Duration::from_secs(1);
/// Scrapes in one run: one a second over the longest run, with room to spare.
pub const METRICS_POLLS_MAX: u64 = DURATION_MAX.as_secs() + 60;
/// A step's name longer than this (or not `[a-z0-9_]`) is a bad line: the
/// server's names are short, and the report keys them.
pub const STEP_NAME_BYTES_MAX: usize = 64;
/// Seconds with the worst p99 that the stall table always lists.
pub const STALL_WORST_SECONDS: usize = 5;
/// Rows of the stall table, so a day-long soak with a snapshot every minute
/// still prints a readable table (the timeline keeps every second).
pub const STALL_ROWS_MAX: usize = 40;
const _: () = assert!(STALL_WORST_SECONDS <= STALL_ROWS_MAX);
const _: () = assert!(
    METRICS_POLL_TIMEOUT.as_millis() < METRICS_POLL_GAP.as_millis(),
    "a scrape ends before the next is due"
);
