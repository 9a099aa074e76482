//! Every bound and default in flashcore, each with its reason.
//!
//! A limit that is not written here does not exist. The contract's limits
//! (`../shared/API.md`) come first; the engine's own capacities follow. The
//! relations between them are checked at compile time at the bottom, so that a
//! change to one bound that would let arithmetic overflow does not build.

/// Longest id (`sku_id`, `user_id`, promotion `code`, `payment_ref`), in bytes.
/// The contract: `[A-Za-z0-9_.-]{1,64}`.
pub const ID_BYTES_MAX: usize = 64;

/// Longest SKU name, in characters (contract: 1..=200).
pub const NAME_CHARS_MAX: usize = 200;

/// Largest quantity on one order line or cart line (contract: 1..=10000).
pub const QTY_MAX: u32 = 10_000;

/// Most lines on one order or in one cart (contract).
pub const LINES_MAX: usize = 100;

/// Highest unit price (contract: 0..=10^12 cents).
pub const PRICE_CENTS_MAX: u64 = 1_000_000_000_000;

/// Most units a SKU may be created with (contract: 0..=10^9).
pub const STOCK_MAX: u64 = 1_000_000_000;

/// Largest single restock (contract: 1..=10^9).
pub const RESTOCK_QTY_MAX: u64 = 1_000_000_000;

/// Highest `per_user_limit` (contract: 1..=10000 or null).
pub const PER_USER_LIMIT_MAX: u32 = 10_000;

/// Most buckets a SKU's stock may be split into over partitions (contract,
/// cluster mode: `buckets` 1..=64, default 1; a single node checks it and
/// keeps one actor).
pub const BUCKETS_MAX: u32 = 64;

/// Highest `on_hand` a SKU may ever reach through restocks and returns. Far
/// below `u64::MAX`, so that the sum of every counter of a SKU cannot wrap.
pub const ON_HAND_MAX: u64 = 1_000_000_000_000_000;

/// Longest `Idempotency-Key`, in bytes (contract: 1..=255 visible ASCII).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;

/// Largest order subtotal: every line at the top quantity and price.
pub const ORDER_CENTS_MAX: u64 = QTY_MAX as u64 * LINES_MAX as u64 * PRICE_CENTS_MAX;

/// Highest promotion threshold and discount: no order can be worth more.
pub const PROMO_CENTS_MAX: u64 = ORDER_CENTS_MAX;

/// Most SKUs in the catalog. An idle SKU is plain state in the catalog (no
/// actor, no mailbox; `benches/catalog.rs` measures what it costs, a few
/// hundred bytes), so the bound is memory: ten million idle SKUs are a few
/// GiB. Nothing walks every SKU per request or per second: `GET /v1/skus`
/// is paged, metrics and the dashboard read a bounded head, and only a
/// snapshot (once a minute at most) copies them all.
pub const SKUS_MAX: usize = 10_000_000;

/// How long a SKU actor may go without a message before it hands its state
/// back to the catalog and stops (`EngineConfig::sku_idle_ms`). A drop's
/// SKUs get orders every moment and stay awake; a catalog's long tail,
/// touched once in a while, costs no actor. A minute keeps a SKU awake
/// across the pauses of a browsing customer, and waking one again costs a
/// spawn (microseconds).
pub const SKU_IDLE_DEFAULT_MS: u64 = 60_000;
/// How often, at most, an awake SKU actor looks whether it has been idle
/// long enough (it looks every half idle time when that is shorter).
pub const SKU_IDLE_CHECK_MS_MAX: u64 = 1_000;

/// Most SKUs `/metrics` shows one by one: the awake ones first (the SKUs a
/// sale is touching), then the first by id. A scrape must not walk a
/// catalog of millions.
pub const METRICS_SKUS_MAX: usize = 100;

/// Default `?limit=` of `GET /v1/skus` (contract).
pub const SKUS_PAGE_DEFAULT: usize = 100;
/// Highest `?limit=` of `GET /v1/skus` (contract): one page asks this many
/// actors at once.
pub const SKUS_PAGE_MAX: usize = 1_000;

/// Most promotions; they are all kept in memory.
pub const PROMOTIONS_MAX: usize = 10_000;

/// Default and highest `?limit=` of `GET /v1/orders` (contract).
pub const ORDERS_LIST_DEFAULT: usize = 50;
/// See [`ORDERS_LIST_DEFAULT`].
pub const ORDERS_LIST_MAX: usize = 500;

/// How long an unpaid order holds its units (contract default: 15 minutes).
pub const RESERVATION_TTL_DEFAULT_MS: u64 = 15 * 60 * 1000;
/// Longest reservation TTL an operator may configure: a week. Longer holds
/// would keep units away from buyers for no business reason.
pub const RESERVATION_TTL_MAX_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// How often each order shard looks for unpaid orders past their deadline.
/// The contract wants an expired order to read as expired within one second;
/// reads also expire an overdue order on the spot, so this only bounds how
/// long units stay away from `available`.
pub const EXPIRY_TICK_MS: u64 = 100;

/// Most orders one shard expires in one tick, so a burst of deadlines cannot
/// stall the shard's mailbox; the rest wait for the next tick.
pub const EXPIRY_BATCH_MAX: usize = 2_000;

/// The longest one sweep may run on an actor thread in one tick (issue 18:
/// sweeps bounded by time, not by count): the order expiry and the archive
/// sweep's pick each stop after this long and leave the rest for the next
/// tick, so a request queued behind a sweep waits about this long at most
/// for it. A tick comes every [`EXPIRY_TICK_MS`], so a sweep takes at
/// most 0.2% of a core per shard.
pub const SWEEP_SLICE_US: u64 = 200;

/// Items a sweep handles between two looks at the monotonic clock
/// ([`crate::clock::SliceBudget`]). A look costs about 25 ns (vDSO); an
/// expiry (a journal append, an apply, a message to each SKU) or an archive
/// pick (a copy of the order) costs a microsecond or more, so looking every
/// 8 items costs little and overshoots the slice by 8 items at most.
pub const SWEEP_CLOCK_EVERY: u32 = 8;

/// How long a finished order (`delivered`, `cancelled`, `expired`,
/// `refunded`) stays in memory before it moves to the archive on disk
/// (`--archive-after`). Ten minutes keeps the orders people look at right
/// after a sale in memory, and lets a shop run for months with memory that
/// follows live work, not history.
pub const ARCHIVE_AFTER_DEFAULT_MS: u64 = 10 * 60 * 1000;
/// Longest `--archive-after`: a year; beyond that, turn archiving off
/// rather than keep history in memory by accident.
pub const ARCHIVE_AFTER_MAX_MS: u64 = 366 * 24 * 60 * 60 * 1000;

/// How often each order shard sweeps finished orders into the archive when
/// its last sweep left nothing due. One sweep is one archive write and one
/// sync, so this bounds the extra fsyncs an idle-looking shop pays to a few
/// a second across all shards; a shard with a backlog writes full batches
/// ([`ARCHIVE_BATCH_MAX`]) back to back instead, so the backlog drains as
/// fast as the time-bounded picks ([`SWEEP_SLICE_US`] a tick) go.
pub const ARCHIVE_SWEEP_MS: u64 = 1_000;

/// Most orders one shard archives in one sweep: one `OrdersArchived` event
/// (about 5 bytes an id) and one archive write of bounded size; the rest
/// wait for the next sweep.
pub const ARCHIVE_BATCH_MAX: usize = 1_000;

/// How long an idempotency record is kept (contract: at least 24 hours).
pub const IDEMPOTENCY_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// How long a read of an archived order waits for the archive's database
/// to open (it opens beside the start-up; see `journal/archive.rs`) before
/// it answers `503`.
pub const ARCHIVE_OPEN_WAIT_MS: u64 = 30_000;

/// The archive database's page cache. Archived orders are read rarely (a
/// customer's old order, a late refund), so it is smaller than the
/// journal's.
pub const ARCHIVE_CACHE_BYTES: u64 = 16 << 20;

/// Orders moved per durable batch when an archive written inside the
/// journal's database is moved into its own.
pub const ARCHIVE_MIGRATE_BATCH: usize = 1_000;

/// glibc arenas at most (`src/memory.rs`): the freed pages of a burst stay
/// in fewer places, so RSS follows the live heap.
pub const MALLOC_ARENAS_MAX: usize = 2;

/// How often records past [`IDEMPOTENCY_TTL_MS`] are dropped.
pub const IDEMPOTENCY_EVICT_EVERY_MS: u64 = 60_000;

/// The memory budget of the idempotency book, in records. Past it, the
/// oldest records move to disk (the journal's database, `idem.records`)
/// and are looked up there; nothing is refused for want of room. A
/// compact record costs 56 bytes in its part's map and a 20-byte entry in
/// its part's time queue, 100 to 145 with the hash tables' slack
/// (`benches/memory.rs`): 4 million are under 600 MB at worst, and hold
/// the last hour of a sale taking over 1,000 keyed orders a second in
/// memory.
pub const IDEMPOTENCY_MEMORY_RECORDS_MAX: usize = 4_000_000;

/// Records moved to disk in one durable write (single inserts, paced by
/// [`IDEMPOTENCY_DISK_SLICE_US`], then one flush and `fdatasync`): about
/// 100 bytes each on disk, so a few MB.
pub const IDEMPOTENCY_SPILL_BATCH_MAX: usize = 32_768;

/// How far below its budget a spill takes the book, as a fraction of the
/// budget (1/16): a spill then moves many records at once instead of a
/// few on every check.
pub const IDEMPOTENCY_SPILL_SLACK_DIVISOR: usize = 16;

/// Expired records the disk eviction reads ahead at once (their time keys,
/// 24 bytes each); it goes on, read after read, until none is left. Each is
/// then dropped by single removals in paced slices.
pub const IDEMPOTENCY_DISK_EVICT_BATCH_MAX: usize = 10_000;

/// How long the idempotency store's disk work (a spill's inserts, the TTL
/// eviction's removals) runs before it rests. Single sled operations only:
/// a sled batch takes sled's process-wide write lock (`concurrency_control`),
/// which every journal insert and flush waits on, while a single insert or
/// removal takes it shared. The slice bounds how long this work holds the
/// cores the request path shares it with (2 on the target machine).
pub const IDEMPOTENCY_DISK_SLICE_US: u64 = 200;

/// How long the idempotency store's disk work rests between two slices:
/// four slices' worth, so it takes at most a fifth of a core. A spill of
/// [`IDEMPOTENCY_SPILL_BATCH_MAX`] records (two inserts each, a few
/// microseconds) then takes about a second; the disk eviction of a day's
/// burst of a million records, about a minute, once.
pub const IDEMPOTENCY_DISK_REST_US: u64 = 800;

/// Parts of the idempotency book (`domain/idem.rs`), each under its own
/// lock: a lookup or a `record` on an actor thread locks its key's part
/// only, and waits only for a sweep's slice of that part. A power of two
/// up to 256 (a part is picked by one byte of the key's hash).
pub const IDEMPOTENCY_BOOK_PARTS: usize = 64;

/// Queue entries one slice of a sweep of the idempotency book looks at
/// under one part's lock (the TTL eviction, a snapshot's copy, the pick of
/// the oldest records for a spill); the lock is released between slices.
/// Sized so a slice stays well under the sweeps' 200 us
/// ([`SWEEP_SLICE_US`]) with room for a slower or busier machine: the
/// dearest walk, the copy (a lookup and a clone an entry), costs about
/// 110 ns an entry at a million records on the 2-core target machine, so a
/// slice holds a lock about 55 us (median; p99 about 150 us on a loaded
/// machine), the eviction's about 27 us (measured once by hand; the
/// request path's wait behind the sweeps is `cargo bench --bench idem_sweep`).
pub const IDEMPOTENCY_SWEEP_SLICE_ENTRIES: usize = 512;

/// Mailbox of one SKU actor. Sized above the number of requests the HTTP
/// front lets in at once, so it only fills when callers bypass the front;
/// when it is full, callers get `Overloaded` at once instead of queueing.
pub const SKU_MAILBOX: usize = 4_096;

/// Mailbox of one order shard; see [`SKU_MAILBOX`].
pub const ORDER_SHARD_MAILBOX: usize = 4_096;

/// Default number of order shards. Orders are spread by user, so a shard
/// holds one user's orders and cart together. More shards than actor threads
/// lets the threads share the work evenly.
pub const ORDER_SHARDS_DEFAULT: usize = 8;
/// Most order shards.
pub const ORDER_SHARDS_MAX: usize = 256;

/// Default number of actor threads (actix arbiters).
pub const ACTOR_THREADS_DEFAULT: usize = 1;
/// Most actor threads.
pub const ACTOR_THREADS_MAX: usize = 64;

/// How long an engine on a shared actor pool waits for its actors to stop
/// at shutdown: each has one message to handle first, so this is only
/// reached by an actor stuck in a handler; the shutdown then goes on (the
/// journal is closed next, so such an actor can no longer change anything
/// durable).
pub const ENGINE_STOP_WAIT_MS: u64 = 5_000;

/// Most attempts of a checkout whose cart changed while its lines were being
/// reserved: the cart is read again each time.
pub const CHECKOUT_ATTEMPTS_MAX: u32 = 3;

// No order total can overflow, with room left for sums across orders.
const _: () = assert!(ORDER_CENTS_MAX <= u64::MAX / 2);
// A refund computes `discount * units` in u128, but its inputs fit u64.
const _: () = assert!((QTY_MAX as u64) * PRICE_CENTS_MAX <= u64::MAX / 2);
// Restocks and returns can always be added to a full SKU without wrapping.
const _: () = assert!(ON_HAND_MAX + RESTOCK_QTY_MAX <= u64::MAX / 4);
// A per-user limit can never exceed what a single line may take in total.
const _: () = assert!(PER_USER_LIMIT_MAX <= QTY_MAX * LINES_MAX as u32);
const _: () = assert!(EXPIRY_TICK_MS < 1_000);
const _: () = assert!(SKUS_PAGE_DEFAULT <= SKUS_PAGE_MAX && SKUS_PAGE_MAX <= SKU_MAILBOX);
// An archive sweep rides the expiry timer, so it cannot run more often.
const _: () = assert!(ARCHIVE_SWEEP_MS >= EXPIRY_TICK_MS);
// One `OrdersArchived` of a full batch (at most 10 bytes an id, varint)
// stays far below a journal record's bound (`codec::RECORD_BYTES_MAX`).
const _: () = assert!(ARCHIVE_BATCH_MAX * 10 < 64 * 1024);
// The slack a spill leaves below the budget is at least one write's worth.
const _: () = assert!(
    IDEMPOTENCY_SPILL_BATCH_MAX <= IDEMPOTENCY_MEMORY_RECORDS_MAX / IDEMPOTENCY_SPILL_SLACK_DIVISOR
);

// ----- The HTTP front -----

/// Largest request body (contract: over 64 KiB is `413`).
pub const BODY_BYTES_MAX: usize = 64 * 1024;

/// Largest request head (contract: headers over 16 KiB are refused).
pub const HEADER_BYTES_MAX: usize = 16 * 1024;

/// How long a connection may take to send a whole request head, from its
/// opening or from its previous request (contract: 10 s).
pub const HEADER_READ_TIMEOUT_MS: u64 = 10_000;

/// How long a request may take to send its whole body once its head is in.
/// Bodies are read before the request takes an in-flight slot, so a client
/// that trickles its body holds a body-read place for at most this long and
/// never a slot (`408` and the connection closed after it).
pub const BODY_READ_TIMEOUT_MS: u64 = 10_000;

/// Most request bodies being read at once: at most this many times
/// [`BODY_BYTES_MAX`] (64 MiB) is buffered. Beyond it a request with a body
/// is shed (`503 overloaded`).
pub const BODY_READS_MAX: usize = 1_024;

/// How long a body may take before the minimum rate applies: a body that
/// came with its head, or a few packets behind it, is never timed.
pub const BODY_READ_GRACE_MS: u64 = 2_000;

/// The slowest a body may arrive once the grace is over (Apache's
/// `mod_reqtimeout` `MinRate` default): each byte received buys the body
/// 1/500 s more, up to [`BODY_READ_TIMEOUT_MS`] in all. A client that
/// sends one byte and stops is cut after the grace, not after 10 s, so a
/// body-read place is held for seconds, not for the whole limit.
pub const BODY_MIN_BYTES_PER_S: u64 = 500;

/// Each pool's share for one client (a verified user, else an address;
/// IPv6 by /64): at most 1/this of the pool, so no single client can hold
/// more than a small fraction of it and the rest stay open to everyone
/// else (contract, guarantee 6). Admins are not bound by shares.
pub const CLIENT_SHARE_DIVISOR: usize = 16;

/// A client's share of open connections, by default: 1/8 of
/// `--max-connections` (1,250 of the default 10,000). Connections are
/// shared more generously than the other pools because an address may be
/// a household or an office behind one NAT; `--max-connections-per-client`
/// sets it. Connections from a trusted proxy are not counted per address.
pub const CONNECTIONS_CLIENT_SHARE_DIVISOR: usize = 8;

/// Most addresses `--trusted-proxies` may name.
pub const TRUSTED_PROXIES_MAX: usize = 64;

/// Most `X-Forwarded-For` entries looked at, from the right: the
/// proxies in front of the server are few.
pub const FORWARDED_HOPS_MAX: usize = 16;

/// How long a `/metrics` scrape's text is served again: a scrape asks
/// every order shard and SKU actors (up to [`DASHBOARD_SKUS_MAX`]), so
/// scrapes in a loop must not reach the actors more than once a second.
pub const METRICS_CACHE_MS: u64 = 1_000;

/// Longest a `/metrics` render may wait on the actors; past it the last
/// text is served again (an actor that does not answer must not blind the
/// monitoring).
pub const METRICS_RENDER_TIMEOUT_MS: u64 = 2_000;

/// Default bound on open connections (contract: `--max-connections`).
pub const CONNECTIONS_DEFAULT: usize = 10_000;
/// The accept queue asked of the kernel (which caps it at
/// `net.core.somaxconn`, 4096 by default on current Linux): a flash sale
/// opens with a burst of connections, and a handshake the full queue drops
/// leaves a client that believes it is connected to a server that never
/// saw it (`listener::bind`).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// Highest `--max-connections`: each connection holds a file descriptor and
/// buffers, and the open-file limit is raised to fit this many.
pub const CONNECTIONS_MAX: usize = 1_000_000;

/// Requests being handled at once, by default (`--max-in-flight`). Beyond
/// this the front answers `503 overloaded` at once instead of queueing, so
/// memory stays flat however many arrive and the accepted requests keep
/// their latency: by Little's law, 128 in flight at the ~10,000 strict
/// orders a second this 2-core machine serves is about 13 ms of queue.
pub const REQUESTS_IN_FLIGHT_DEFAULT: usize = 128;
/// Highest `--max-in-flight`.
pub const REQUESTS_IN_FLIGHT_MAX: usize = 1_024;

/// What a shed request is told to wait before retrying, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// Highest `--rate-limit N/s`: far above what one caller could need, low
/// enough that a bucket's arithmetic (nanoseconds per request) stays exact.
pub const RATE_LIMIT_PER_SECOND_MAX: u32 = 1_000_000;

/// How often buckets that have refilled are dropped. A bucket refills
/// within a second (burst = one second's worth), so the map holds only the
/// callers of about the last two seconds.
pub const RATE_LIMIT_EVICT_EVERY_MS: u64 = 1_000;

/// Most rate-limit buckets kept (about 100 bytes each, 10 MiB). Callers of
/// the last two seconds stay far below it (the server answers ~10,000
/// requests a second); past it, the buckets of the callers seen longest
/// ago are dropped first, down to nine tenths of the bound, never all at
/// once (a dropped bucket starts full again, so eviction is lenient only
/// to the callers least active).
pub const RATE_LIMIT_KEYS_MAX: usize = 100_000;

/// Shortest JWT secret (contract: at least 32 bytes).
pub const JWT_SECRET_BYTES_MIN: usize = 32;

/// Longest `Authorization` token accepted before any parsing.
pub const TOKEN_BYTES_MAX: usize = 4 * 1024;

/// Tokens remembered as verified (about 300 bytes each). A flash sale of a
/// hundred thousand buyers fits; beyond, the memory is cleared and filled
/// again.
pub const VERIFIED_TOKENS_MAX: usize = 100_000;

/// How long shutdown waits for requests in flight before closing anyway.
pub const SHUTDOWN_GRACE_MS: u64 = 30_000;

/// How often a server whose disk failed probes it with a small write.
pub const STORAGE_PROBE_MS: u64 = 1_000;

/// Largest catalog file seeded at start.
pub const CATALOG_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// SKUs of the catalog file created at once while seeding: their creations
/// share journal flushes (group commit) instead of costing an fsync each,
/// and the batch stays far below what the journal queue holds.
pub const CATALOG_SEED_IN_FLIGHT: usize = 256;

const _: () = assert!(HEADER_BYTES_MAX >= 8 * 1024, "hyper's minimum read buffer");
const _: () =
    assert!(REQUESTS_IN_FLIGHT_MAX < SKU_MAILBOX && REQUESTS_IN_FLIGHT_MAX < ORDER_SHARD_MAILBOX);

// ----- The live dashboard (`GET /v1/stream`, `GET /dashboard`) -----

/// How often the live sampler takes its snapshot, and so how often each
/// stream gets an event (contract: one event a second).
pub const LIVE_SAMPLE_MS: u64 = 1_000;

/// Most `GET /v1/stream` clients at once; beyond, `503 overloaded`. Each
/// holds a connection (of [`CONNECTIONS_DEFAULT`]) and gets a copy of the
/// snapshot every second, so an unbounded number of dashboards could crowd
/// out the buyers the sale is for. A thousand screens is far more than any
/// operations room.
pub const STREAM_CLIENTS_MAX: usize = 1_000;

/// Longest life of one stream; then it ends and the browser's
/// `EventSource` reconnects by itself. A client that vanished without
/// closing its socket is found out by TCP within minutes, but this bound
/// holds even when it is not, so no dead client's stream lives for ever.
pub const STREAM_LIFETIME_MS: u64 = 60 * 60 * 1000;

/// What each stream tells the browser to wait before reconnecting.
pub const STREAM_RETRY_MS: u64 = 1_000;

/// Most SKUs in a live snapshot: the first ones in `sku_id` order (the
/// event also says how many there are in all). The sampler asks each of
/// them for its counters every second, and every client gets them all, so
/// a catalog of thousands must not be sent whole.
pub const DASHBOARD_SKUS_MAX: usize = 50;

const _: () = assert!(STREAM_CLIENTS_MAX < CONNECTIONS_DEFAULT);
const _: () = assert!(DASHBOARD_SKUS_MAX <= SKUS_MAX && DASHBOARD_SKUS_MAX < SKU_MAILBOX);
const _: () = assert!(METRICS_SKUS_MAX <= SKUS_PAGE_MAX);
const _: () = assert!(SKU_IDLE_CHECK_MS_MAX <= SKU_IDLE_DEFAULT_MS);
const _: () = assert!(STREAM_RETRY_MS < STREAM_LIFETIME_MS && LIVE_SAMPLE_MS < STREAM_LIFETIME_MS);

// ----- Tokens and the secret (issue 17) -----

/// Furthest a token's `exp` may be ahead of now, and the longest `--ttl`
/// of `flashcore token`: a year (365 days). A token is a bearer credential
/// with no revocation list; one that never expires is a leaked key for
/// ever, so the server refuses it even when its signature is good.
pub const TOKEN_TTL_MAX_S: u64 = 365 * 24 * 60 * 60;

/// Fewest distinct byte values a JWT secret must hold. Not an entropy
/// measure (a human-chosen secret can pass it): it catches placeholders,
/// one byte repeated ("aaaa...") or a short word repeated to reach the
/// length ("changeme", "password" and "secret" have 7 or fewer distinct
/// letters), while a random secret passes for certain in practice (32 random
/// hex digits have fewer than 8 distinct values with odds of about 4 in
/// 10^8; the 96 the server generates, never in practice).
pub const JWT_SECRET_DISTINCT_BYTES_MIN: usize = 8;

const _: () = assert!(JWT_SECRET_DISTINCT_BYTES_MIN <= JWT_SECRET_BYTES_MIN);
