//! How the engine runs, and the plain values its callers hand it: who
//! calls, which orders to list, a new SKU.

#[allow(clippy::wildcard_imports)]
use super::*;

/// When a change counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DurabilityMode {
    /// Answer only once everything the answer depends on is durable.
    #[default]
    Strict,
    /// Answer at once; the journal flushes on a short timer.
    Relaxed,
}

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Actor threads (actix arbiters), when the engine starts its own.
    pub actor_threads: usize,
    /// Threads shared with other engines to run the actors on, instead of
    /// `actor_threads` of its own (a cluster node's partitions).
    pub actors: Option<ActorPool>,
    /// Order shards.
    pub order_shards: usize,
    /// How long an unpaid order holds its units.
    pub reservation_ttl_ms: u64,
    /// When a change counts as done.
    pub durability: DurabilityMode,
    /// Mailbox of each SKU actor.
    pub sku_mailbox: usize,
    /// Mailbox of each order shard.
    pub shard_mailbox: usize,
    /// How long a finished order stays in memory before it moves to the
    /// journal's archive (`None`: for ever). Only a journal that keeps an
    /// archive ([`Journal::archive`]) archives anything.
    pub archive_after_ms: Option<u64>,
    /// The idempotency book's memory budget, in records: past it the
    /// oldest move to the journal's store ([`Journal::idem_store`]) when
    /// [`Engine::maintain_idempotency`] runs. Without a store they stay.
    pub idem_memory_records_max: usize,
    /// How long a SKU actor may go without a message before it hands its
    /// state back to the catalog and stops (woken again by the next one).
    pub sku_idle_ms: u64,
    /// Which order ids this engine hands out (all of them on a node alone;
    /// its partition's in cluster mode).
    pub order_ids: IdSpace,
}

impl Default for EngineConfig {
    fn default() -> EngineConfig {
        EngineConfig {
            actor_threads: ACTOR_THREADS_DEFAULT,
            actors: None,
            order_shards: ORDER_SHARDS_DEFAULT,
            reservation_ttl_ms: RESERVATION_TTL_DEFAULT_MS,
            durability: DurabilityMode::Strict,
            sku_mailbox: SKU_MAILBOX,
            shard_mailbox: ORDER_SHARD_MAILBOX,
            archive_after_ms: Some(ARCHIVE_AFTER_DEFAULT_MS),
            idem_memory_records_max: IDEMPOTENCY_MEMORY_RECORDS_MAX,
            sku_idle_ms: SKU_IDLE_DEFAULT_MS,
            order_ids: IdSpace::default(),
        }
    }
}

/// Who is calling: their user id, and whether they are an admin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The caller's user id (their token's `sub`).
    pub user: UserId,
    /// Whether their role is `admin`.
    pub admin: bool,
}

/// Which orders to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderScope {
    /// One user's.
    User(UserId),
    /// Everyone's.
    All,
}

/// A new SKU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSku {
    /// Its id.
    pub sku: SkuId,
    /// Its name.
    pub name: String,
    /// Its unit price.
    pub price_cents: u64,
    /// Its initial stock.
    pub stock: u64,
    /// Most units per user, or none.
    pub per_user_limit: Option<u32>,
    /// When it sells (the default: at any time).
    pub sale: SaleWindow,
}
