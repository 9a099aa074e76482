//! A node of a cluster: which partitions it serves, and the loop that
//! spreads partitions over the nodes.
//!
//! **Presence.** Every node writes its id and URL into a KV bucket whose
//! `max_age` is the lease TTL, every TTL/3: the bucket's keys are the live
//! nodes. A node that stops gracefully deletes its key.
//!
//! **The ownership loop** runs every TTL/3:
//! 1. it lets go of every partition whose lease is no longer valid (lost,
//!    or its deadline on the monotonic clock passed) or whose journal was
//!    fenced (another node appended a barrier): from that moment the node
//!    answers for it only by forwarding or with `503`;
//! 2. it computes its share, `ceil(P / live nodes)`;
//! 3. under its share, it acquires free partitions (no lease) starting at a
//!    place given by its id, so nodes starting together reach for
//!    different ones, and takes each over (`partition.rs`) on a blocking
//!    thread, several at once;
//! 4. over its share (a node joined), it hands partitions back: stop the
//!    engine (a last snapshot), then release the lease, so the next owner
//!    need not wait a TTL.
//!
//! A graceful stop hands every partition back the same way.
//!
//! **Serving.** The owner of a partition subscribes to its request subject
//! (`forward.rs`) and runs what comes through the node's own front, which
//! this module knows only as a [`RequestHandler`].

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, object_store::ObjectStore};
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::cluster::claims::{self, Claimed, Held};
use crate::cluster::forward::{self, ForwardedAnswer, ForwardedRequest};
use crate::cluster::journal::{self, JetStreamJournal, JournalStream};
use crate::cluster::layout;
use crate::cluster::lease::{LeaseKeeper, Leases};
use crate::cluster::partition::{self, OwnedPartition, StoreStreams, Takeover};
use crate::cluster::snapshots;
use crate::domain::idem::Lookup;
use crate::domain::promo::Promotion;
use crate::domain::{IdempotencyKey, PromoCode, UserId};
use crate::engine::{ActorPool, Engine, EngineConfig, IdSpace};
use crate::journal::SnapshotPolicy;
use crate::limits::PROMOTIONS_MAX;

/// The bucket of partition leases.
pub const LEASES_BUCKET: &str = "fc_leases";
/// The bucket of live nodes.
pub const NODES_BUCKET: &str = "fc_nodes";
/// The bucket of the cluster's settings (its partition count).
pub const SETTINGS_BUCKET: &str = "fc_cluster";
/// The object store of partition snapshots.
pub const SNAPSHOTS_BUCKET: &str = "fc_snapshots";
/// The bucket of promotions (one key per code, kept for ever).
pub const PROMOTIONS_BUCKET: &str = "fc_promotions";

/// Partitions taken over at once: each is a recovery (object store and
/// stream reads) and an engine start; a few at a time keep a node that
/// inherits many partitions from starving the ones it already serves.
pub const TAKEOVERS_AT_ONCE: usize = 8;

/// Partitions handed back per pass of the loop: a node that joins gets its
/// share over a few passes, while the sale goes on in the rest.
pub const HANDBACKS_PER_PASS: usize = 8;

/// Longest a request from another node may wait for this node's front
/// (it answers `503 overloaded` at once past its slots, so this only
/// bounds a stuck handler).
const SERVE_TIMEOUT: Duration = forward::FORWARD_TIMEOUT;

/// How long a starting node keeps trying to reach its servers.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// The pause between two attempts at joining.
const JOIN_RETRY: Duration = Duration::from_millis(500);

/// Longest a call made during a graceful stop may take.
const STOP_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The front's entry point for a request another node forwarded here.
pub type RequestHandler =
    Arc<dyn Fn(u32, ForwardedRequest) -> BoxFuture<'static, ForwardedAnswer> + Send + Sync>;

/// How a node joins its cluster.
#[derive(Clone)]
pub struct NodeConfig {
    /// The NATS servers (`nats://host:port`).
    pub servers: Vec<String>,
    /// This node's id, stable across restarts.
    pub node_id: String,
    /// This node's URL, as other nodes and `GET /v1/cluster` show it.
    pub url: String,
    /// The partition count (fixed when the cluster is created).
    pub partitions: u32,
    /// The lease TTL.
    pub lease_ttl: Duration,
    /// Copies of every stream and bucket (3 in production).
    pub replicas: usize,
    /// How each partition's engine runs (its order id space is set here).
    pub engine: EngineConfig,
    /// When partitions take snapshots.
    pub snapshots: SnapshotPolicy,
    /// The clock the engines run on.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("servers", &self.servers)
            .field("node_id", &self.node_id)
            .field("partitions", &self.partitions)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

/// Why a node could not join.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A server address does not parse.
    #[error("--cluster: {0}")]
    BadServer(String),
    /// The servers could not be reached.
    #[error("connecting to NATS at {servers}: {source}")]
    Connect {
        /// The servers tried.
        servers: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
    },
    /// The journal stream could not be made or bound.
    #[error(transparent)]
    Journal(#[from] journal::ClusterJournalError),
    /// The partition count is wrong or could not be settled.
    #[error(transparent)]
    Layout(#[from] layout::LayoutError),
    /// The lease bucket could not be opened.
    #[error(transparent)]
    Lease(#[from] crate::cluster::lease::LeaseError),
    /// The snapshot bucket could not be opened.
    #[error(transparent)]
    Snapshots(#[from] snapshots::OpenError),
    /// The nodes bucket could not be opened.
    #[error("opening the nodes bucket: {0}")]
    Nodes(String),
    /// The actor threads the partitions share could not be started.
    #[error("starting the actor threads: {0}")]
    Actors(crate::engine::EngineError),
}

/// Why a promotion was not created.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromotionError {
    /// A promotion with this code exists.
    #[error("promotion {0} already exists")]
    AlreadyExists(String),
    /// [`PROMOTIONS_MAX`] promotions exist.
    #[error("there are too many promotions ({PROMOTIONS_MAX})")]
    Full,
    /// The bucket did not answer.
    #[error("the cluster's promotions bucket: {0}")]
    Unavailable(String),
}

impl NodeError {
    /// Whether trying again may succeed (servers not up or not ready yet),
    /// as opposed to a setting that is wrong.
    fn may_pass(&self) -> bool {
        use crate::cluster::lease::LeaseError;
        match self {
            NodeError::BadServer(_) | NodeError::Actors(_) => false,
            NodeError::Layout(e) => matches!(e, layout::LayoutError::Nats(_)),
            NodeError::Lease(e) => {
                matches!(e, LeaseError::Timeout { .. } | LeaseError::Nats { .. })
            }
            NodeError::Journal(e) => {
                !matches!(e, journal::ClusterJournalError::StreamMismatch { .. })
            }
            NodeError::Connect { .. } | NodeError::Snapshots(_) | NodeError::Nodes(_) => true,
        }
    }
}

/// A live node as its presence key says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    /// Its id.
    pub node_id: String,
    /// Its URL.
    pub url: String,
}

/// A partition's owner as `GET /v1/cluster` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionOwner {
    /// The partition.
    pub partition: u32,
    /// Its owner, or `None` between owners.
    pub node_id: Option<String>,
    /// How long ago its lease was last written, in ms.
    pub lease_age_ms: u64,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// This node.
    pub node_id: String,
    /// The partition count.
    pub partitions: u32,
    /// Live nodes, by id, with the partitions each owns.
    pub nodes: Vec<(NodeInfo, u32)>,
    /// Every partition.
    pub owners: Vec<PartitionOwner>,
}

/// A partition this node serves.
struct Served {
    engine: Engine,
    journal: Arc<JetStreamJournal>,
    keeper: Mutex<Option<LeaseKeeper>>,
    owned: Mutex<Option<OwnedPartition>>,
    listener: JoinHandle<()>,
}

impl Served {
    /// Whether this node may still answer for the partition.
    fn valid(&self) -> bool {
        !self.journal.is_fenced()
            && crate::engine::lock(&self.keeper)
                .as_ref()
                .is_some_and(LeaseKeeper::is_valid)
    }
}

struct Inner {
    config: NodeConfig,
    client: async_nats::Client,
    context: jetstream::Context,
    spec: JournalStream,
    stores: StoreStreams,
    snapshots: ObjectStore,
    leases: Arc<Leases>,
    nodes: kv::Store,
    promotions_bucket: kv::Store,
    claims: kv::Store,
    /// Every promotion of the cluster this node has seen (its watch of the
    /// bucket), adopted by every engine it serves.
    promotions: RwLock<HashMap<PromoCode, Promotion>>,
    served: RwLock<HashMap<u32, Arc<Served>>>,
    handler: OnceLock<RequestHandler>,
    runtime: Handle,
    /// Set once the first pass of the ownership loop has run.
    settled: AtomicBool,
    stopping: AtomicBool,
    looping: Mutex<Option<JoinHandle<()>>>,
    watching: Mutex<Option<JoinHandle<()>>>,
}

/// The handle to this node's part of the cluster (cheap to clone).
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node_id", &self.inner.config.node_id)
            .field("partitions", &self.inner.config.partitions)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Connects, creates or binds the stream and buckets, and checks the
    /// partition count. Nothing is owned yet: [`Node::start`] begins the
    /// ownership loop once a handler is set.
    ///
    /// # Errors
    /// [`NodeError`].
    pub async fn join(mut config: NodeConfig) -> Result<Node, NodeError> {
        // One pool of actor threads for every partition this node will own
        // (`--actor-threads`), not a pool each: 64 partitions would
        // otherwise be 64 threads, mostly idle, on a machine of a few cores.
        if config.engine.actors.is_none() {
            let pool = ActorPool::start(config.engine.actor_threads).map_err(NodeError::Actors)?;
            config.engine.actors = Some(pool);
        }
        // Servers started together with the nodes (a script, a machine
        // booting) take a few seconds to listen and elect their JetStream
        // leaders: what may pass is retried until JOIN_PATIENCE; a setting
        // that is wrong is refused at once.
        let deadline = Instant::now() + JOIN_PATIENCE;
        loop {
            match Node::join_once(config.clone()).await {
                Ok(node) => return Ok(node),
                Err(e) if e.may_pass() && Instant::now() < deadline => {
                    tracing::warn!(error = %e, "joining the cluster; retrying");
                    tokio::time::sleep(JOIN_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn join_once(config: NodeConfig) -> Result<Node, NodeError> {
        let servers = config.servers.join(",");
        let addrs = config
            .servers
            .iter()
            .map(|s| {
                s.parse::<async_nats::ServerAddr>()
                    .map_err(|e| NodeError::BadServer(format!("{s}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = async_nats::ConnectOptions::new()
            .name(format!("flashcore {}", config.node_id))
            .connection_timeout(Duration::from_secs(5))
            // A server that stops answering (paused, cut off) is left for
            // another within a few seconds, not the default two minutes.
            .ping_interval(Duration::from_secs(2))
            .connect(addrs)
            .await
            .map_err(|source| NodeError::Connect {
                servers: servers.clone(),
                source,
            })?;
        let context = jetstream::new(client.clone());
        let spec = JournalStream::new(config.replicas);
        journal::ensure_stream(&context, &spec).await?;
        let stores = StoreStreams::new(config.replicas);
        crate::cluster::archive::ensure_archive_stream(&context, &stores.archive).await?;
        crate::cluster::idem_store::ensure_idem_stream(&context, &stores.idem).await?;
        let settings = layout::cluster_bucket(&context, SETTINGS_BUCKET, config.replicas).await?;
        layout::settle_partitions(&settings, config.partitions).await?;
        let leases = Arc::new(
            Leases::open(
                &context,
                LEASES_BUCKET,
                &config.node_id,
                config.lease_ttl,
                config.replicas,
            )
            .await?,
        );
        let snapshots = snapshots::open_bucket(&context, SNAPSHOTS_BUCKET, config.replicas).await?;
        let nodes = open_nodes_bucket(&context, config.lease_ttl, config.replicas).await?;
        let promotions_bucket =
            layout::cluster_bucket(&context, PROMOTIONS_BUCKET, config.replicas)
                .await
                .map_err(|e| NodeError::Nodes(format!("the promotions bucket: {e}")))?;
        let claims = claims::open_bucket(&context, config.replicas)
            .await
            .map_err(NodeError::Nodes)?;
        Ok(Node {
            inner: Arc::new(Inner {
                config,
                client,
                context,
                spec,
                stores,
                snapshots,
                leases,
                nodes,
                promotions_bucket,
                claims,
                promotions: RwLock::new(HashMap::new()),
                served: RwLock::new(HashMap::new()),
                handler: OnceLock::new(),
                runtime: Handle::current(),
                settled: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                looping: Mutex::new(None),
                watching: Mutex::new(None),
            }),
        })
    }

    /// Starts the ownership loop; requests forwarded here go to `handler`.
    pub fn start(&self, handler: RequestHandler) {
        // A second call keeps the first handler and loop.
        if self.inner.handler.set(handler).is_err() {
            return;
        }
        let node = self.clone();
        let task = tokio::spawn(async move { node.ownership_loop().await });
        *crate::engine::lock(&self.inner.looping) = Some(task);
        let node = self.clone();
        let task = tokio::spawn(async move { node.watch_promotions().await });
        *crate::engine::lock(&self.inner.watching) = Some(task);
    }

    /// Creates a promotion for the whole cluster: a create in the
    /// promotions bucket (a quorum write, so exactly one of two racing
    /// creates of a code wins), then every engine here adopts it; the other
    /// nodes' watches bring it to theirs.
    ///
    /// # Errors
    /// [`PromotionError`].
    pub async fn create_promotion(&self, promo: Promotion) -> Result<Promotion, PromotionError> {
        let bucket = &self.inner.promotions_bucket;
        let count = tokio::time::timeout(STOP_CALL_TIMEOUT, bucket.status())
            .await
            .map_err(|_| PromotionError::Unavailable("no answer in time".into()))?
            .map_err(|e| PromotionError::Unavailable(e.to_string()))?
            .values();
        if count >= PROMOTIONS_MAX as u64 {
            return Err(PromotionError::Full);
        }
        let value =
            serde_json::to_vec(&promo).map_err(|e| PromotionError::Unavailable(e.to_string()))?;
        let created = tokio::time::timeout(
            STOP_CALL_TIMEOUT,
            bucket.create(promo.code.as_str(), value.into()),
        )
        .await
        .map_err(|_| PromotionError::Unavailable("no answer in time".into()))?;
        match created {
            Ok(_) => {
                self.adopt(promo);
                Ok(promo)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(PromotionError::AlreadyExists(promo.code.to_string()))
            }
            Err(e) => Err(PromotionError::Unavailable(e.to_string())),
        }
    }

    /// Settles the claim of `user`'s `key` for `partition`
    /// (`claims.rs`): whether the keyed request may go there.
    ///
    /// # Errors
    /// When the claims bucket or the partition holding the claim does not
    /// answer.
    pub async fn claim(
        &self,
        user: UserId,
        key: IdempotencyKey,
        partition: u32,
    ) -> Result<Claimed, String> {
        let bucket_key = claims::claim_key(&user, &key);
        claims::claim(&self.inner.claims, &bucket_key, partition, |holder| {
            self.probe(holder, user, key.clone())
        })
        .await
    }

    /// Whether `partition` holds a record for `user`'s `key`: asked of its
    /// engine here, or of its owner.
    async fn probe(
        &self,
        partition: u32,
        user: UserId,
        key: IdempotencyKey,
    ) -> Result<Held, String> {
        if let Some(engine) = self.local(partition) {
            return probe_engine(&engine, user, &key);
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(forward::PROBE, "idempotency");
        let payload = format!("{}\n{}", user.as_str(), key.as_str());
        let send = self.inner.client.request_with_headers(
            forward::subject(partition),
            headers,
            payload.into(),
        );
        let reply = tokio::time::timeout(forward::FORWARD_TIMEOUT, send)
            .await
            .map_err(|_| format!("partition {partition}'s owner did not answer in time"))?
            .map_err(|e| format!("partition {partition}'s owner: {e}"))?;
        match &reply.payload[..] {
            b"record" => Ok(Held::Record),
            b"free" => Ok(Held::Free),
            other => Err(format!(
                "partition {partition}'s owner: {}",
                String::from_utf8_lossy(other)
            )),
        }
    }

    /// Keeps `promo` and hands it to every engine served here.
    fn adopt(&self, promo: Promotion) {
        self.inner
            .promotions
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(promo.code, promo);
        for (_, engine) in self.engines() {
            engine.adopt_promotion(promo);
        }
    }

    /// Follows the promotions bucket (every value, then every new one),
    /// re-watching after an error.
    async fn watch_promotions(self) {
        loop {
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            match self
                .inner
                .promotions_bucket
                .watch_all_from_revision(1)
                .await
            {
                Ok(mut entries) => {
                    while let Some(entry) = entries.next().await {
                        let entry = match entry {
                            Ok(entry) => entry,
                            Err(e) => {
                                tracing::warn!(error = %e, "watching promotions");
                                break;
                            }
                        };
                        if entry.operation != kv::Operation::Put {
                            continue;
                        }
                        match serde_json::from_slice::<Promotion>(&entry.value) {
                            Ok(promo) => self.adopt(promo),
                            Err(e) => {
                                tracing::error!(key = %entry.key, error = %e, "a promotion that does not parse");
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "watching promotions"),
            }
            tokio::time::sleep(self.inner.config.lease_ttl / 3).await;
        }
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.inner.config.node_id
    }

    /// The partition count.
    pub fn partitions(&self) -> u32 {
        self.inner.config.partitions
    }

    /// Whether the first ownership pass has run (this node takes part).
    pub fn settled(&self) -> bool {
        self.inner.settled.load(Ordering::SeqCst)
    }

    /// Why a serving partition's engine died, if one did.
    pub fn failure(&self) -> Option<String> {
        let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
        served.iter().find_map(|(p, s)| {
            s.engine
                .failure()
                .map(|why| format!("partition {p}: {why}"))
        })
    }

    /// The engine of `partition` if this node serves it and may still
    /// answer for it (lease valid, journal not fenced).
    pub fn local(&self, partition: u32) -> Option<Engine> {
        let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
        let entry = served.get(&partition)?;
        entry.valid().then(|| entry.engine.clone())
    }

    /// The engines this node serves, by partition.
    pub fn engines(&self) -> Vec<(u32, Engine)> {
        let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
        let mut engines: Vec<(u32, Engine)> = served
            .iter()
            .filter(|(_, s)| s.valid())
            .map(|(p, s)| (*p, s.engine.clone()))
            .collect();
        engines.sort_by_key(|(p, _)| *p);
        engines
    }

    /// Sends `request` to `partition`'s owner and waits for its answer.
    ///
    /// # Errors
    /// A message saying why no owner answered (none now, or none in
    /// time): the front answers `503 partition_unavailable`.
    pub async fn forward(
        &self,
        partition: u32,
        request: &ForwardedRequest,
    ) -> Result<ForwardedAnswer, String> {
        let (headers, body) = request.encode();
        let send =
            self.inner
                .client
                .request_with_headers(forward::subject(partition), headers, body);
        let reply = match tokio::time::timeout(forward::FORWARD_TIMEOUT, send).await {
            Err(_) => {
                return Err(format!(
                    "partition {partition}'s owner did not answer in time"
                ));
            }
            Ok(Err(e)) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::NoResponders => {
                        format!("partition {partition} has no owner right now")
                    }
                    async_nats::RequestErrorKind::TimedOut => {
                        format!("partition {partition}'s owner did not answer in time")
                    }
                    _ => format!("partition {partition}'s owner could not be reached: {e}"),
                });
            }
            Ok(Ok(reply)) => reply,
        };
        ForwardedAnswer::decode(reply.headers.as_ref(), reply.payload)
            .map_err(|e| format!("partition {partition}'s owner answered badly: {e}"))
    }

    /// Runs `request` for `partition`: through this node's front if it
    /// serves the partition, else at its owner.
    ///
    /// # Errors
    /// As [`Node::forward`].
    pub async fn call(
        &self,
        partition: u32,
        request: &ForwardedRequest,
    ) -> Result<ForwardedAnswer, String> {
        if self.local(partition).is_some()
            && let Some(handler) = self.inner.handler.get()
        {
            return Ok(handler(partition, request.clone()).await);
        }
        self.forward(partition, request).await
    }

    /// The cluster as the buckets say now.
    ///
    /// # Errors
    /// When the servers do not answer.
    pub async fn view(&self) -> Result<ClusterView, String> {
        let owners = self
            .inner
            .leases
            .owners()
            .await
            .map_err(|e| e.to_string())?;
        let live = live_nodes(&self.inner.nodes).await?;
        let mut by_partition: Vec<PartitionOwner> = (0..self.partitions())
            .map(|partition| PartitionOwner {
                partition,
                node_id: None,
                lease_age_ms: 0,
            })
            .collect();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for owner in owners {
            if let Some(slot) = by_partition.get_mut(owner.partition as usize) {
                *counts.entry(owner.node.clone()).or_default() += 1;
                slot.node_id = Some(owner.node);
                slot.lease_age_ms =
                    u64::try_from(owner.renewed_ago.as_millis()).unwrap_or(u64::MAX);
            }
        }
        let nodes = live
            .into_iter()
            .map(|info| {
                let owned = counts.get(&info.node_id).copied().unwrap_or(0);
                (info, owned)
            })
            .collect();
        Ok(ClusterView {
            node_id: self.id().to_string(),
            partitions: self.partitions(),
            nodes,
            owners: by_partition,
        })
    }

    /// Stops gracefully: the loop, then every partition handed back (a
    /// last snapshot each, then the lease released), then the presence key.
    pub async fn stop(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
        let tasks = [
            crate::engine::lock(&self.inner.looping).take(),
            crate::engine::lock(&self.inner.watching).take(),
        ];
        for task in tasks.into_iter().flatten() {
            task.abort();
            // Aborted or ended: either way it no longer runs.
            let _ = task.await;
        }
        let partitions: Vec<u32> = {
            let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
            served.keys().copied().collect()
        };
        let handbacks = partitions.into_iter().map(|p| self.hand_back(p));
        futures_util::future::join_all(handbacks).await;
        let gone = self.inner.nodes.delete(self.id());
        if let Err(e) = tokio::time::timeout(STOP_CALL_TIMEOUT, gone).await {
            tracing::warn!(error = %e, "removing this node's presence key");
        }
        let drained = tokio::time::timeout(STOP_CALL_TIMEOUT, self.inner.client.drain()).await;
        if drained.is_err() {
            tracing::warn!("the NATS connection did not drain in time");
        }
    }

    async fn ownership_loop(self) {
        let every = self.inner.config.lease_ttl / 3;
        loop {
            if self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            if let Err(why) = self.pass().await {
                tracing::warn!(node = self.id(), error = %why, "ownership pass failed; retrying");
            }
            self.inner.settled.store(true, Ordering::SeqCst);
            tokio::time::sleep(every).await;
        }
    }

    /// One pass of the ownership loop (see the module doc).
    async fn pass(&self) -> Result<(), String> {
        self.let_go_of_lost().await;
        let info = NodeInfo {
            node_id: self.id().to_string(),
            url: self.inner.config.url.clone(),
        };
        let value = serde_json::to_vec(&info).map_err(|e| e.to_string())?;
        tokio::time::timeout(
            self.inner.config.lease_ttl / 3,
            self.inner.nodes.put(self.id(), value.into()),
        )
        .await
        .map_err(|_| "writing this node's presence: no answer in time".to_string())?
        .map_err(|e| format!("writing this node's presence: {e}"))?;
        let live = live_nodes(&self.inner.nodes).await?.len().max(1);
        let partitions = self.partitions();
        let share = partitions.div_ceil(u32::try_from(live).unwrap_or(u32::MAX)) as usize;
        let mine = self.served_count();
        if mine < share {
            self.take_more(share - mine).await?;
        } else if mine > share {
            let extra = self.handback_candidates(mine - share);
            let handbacks = extra.into_iter().map(|p| self.hand_back(p));
            futures_util::future::join_all(handbacks).await;
        }
        Ok(())
    }

    fn served_count(&self) -> usize {
        self.inner
            .served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Stops serving every partition this node may no longer answer for.
    async fn let_go_of_lost(&self) {
        let lost: Vec<(u32, Arc<Served>)> = {
            let mut served = self.inner.served.write().unwrap_or_else(|p| p.into_inner());
            let gone: Vec<u32> = served
                .iter()
                .filter(|(_, s)| !s.valid())
                .map(|(p, _)| *p)
                .collect();
            gone.into_iter()
                .filter_map(|p| served.remove(&p).map(|s| (p, s)))
                .collect()
        };
        for (partition, served) in lost {
            tracing::warn!(
                node = self.id(),
                partition,
                fenced = served.journal.is_fenced(),
                "lost the partition: no longer serving it"
            );
            served.listener.abort();
            // Its lease is gone: drop the keeper without releasing.
            drop(crate::engine::lock(&served.keeper).take());
            let owned = crate::engine::lock(&served.owned).take();
            if let Some(owned) = owned {
                // Fenced or lapsed, its last snapshot is best effort: the
                // next owner replays from the stream either way.
                let stopped = tokio::task::spawn_blocking(move || owned.stop()).await;
                if let Err(e) = stopped {
                    tracing::error!(partition, error = %e, "stopping a lost partition panicked");
                }
            }
        }
    }

    /// The partitions to hand back: the highest-numbered first.
    fn handback_candidates(&self, extra: usize) -> Vec<u32> {
        let served = self.inner.served.read().unwrap_or_else(|p| p.into_inner());
        let mut mine: Vec<u32> = served.keys().copied().collect();
        mine.sort_unstable_by(|a, b| b.cmp(a));
        mine.truncate(extra.min(HANDBACKS_PER_PASS));
        mine
    }

    /// Acquires and takes over up to `wanted` free partitions.
    async fn take_more(&self, wanted: usize) -> Result<(), String> {
        let held: BTreeSet<u32> = self
            .inner
            .leases
            .owners()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|o| o.partition)
            .collect();
        let partitions = self.partitions();
        let start = layout::home_of_node(self.id(), partitions);
        let free: Vec<u32> = (0..partitions)
            .map(|i| (start + i) % partitions)
            .filter(|p| !held.contains(p))
            .collect();
        let mut taken = 0;
        for batch in free.chunks(TAKEOVERS_AT_ONCE) {
            if taken >= wanted || self.inner.stopping.load(Ordering::SeqCst) {
                break;
            }
            let room = (wanted - taken).min(batch.len());
            let tries = batch[..room].iter().map(|p| self.acquire_and_take(*p));
            let results = futures_util::future::join_all(tries).await;
            taken += results.into_iter().filter(|took| *took).count();
        }
        Ok(())
    }

    /// Acquires `partition`'s lease and takes it over; whether it worked.
    async fn acquire_and_take(&self, partition: u32) -> bool {
        let held = match self.inner.leases.acquire(partition).await {
            Ok(Some(held)) => held,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(partition, error = %e, "acquiring a lease");
                return false;
            }
        };
        let term = held.term();
        let keeper = Arc::clone(&self.inner.leases).keep(held);
        let config = &self.inner.config;
        let takeover = Takeover {
            context: self.inner.context.clone(),
            spec: self.inner.spec.clone(),
            snapshots: self.inner.snapshots.clone(),
            partition,
            term,
            engine: EngineConfig {
                order_ids: IdSpace::partition(partition, config.partitions),
                ..config.engine.clone()
            },
            policy: config.snapshots,
            clock: Arc::clone(&config.clock),
            stores: Some(self.inner.stores.clone()),
        };
        let runtime = self.inner.runtime.clone();
        let started = Instant::now();
        let taken =
            tokio::task::spawn_blocking(move || partition::take_over(takeover, &runtime)).await;
        let owned = match taken {
            Ok(Ok(owned)) => owned,
            Ok(Err(e)) => {
                tracing::warn!(partition, error = %e, "taking a partition over");
                if let Err(e) = keeper.release().await {
                    tracing::warn!(partition, error = %e, "releasing after a failed takeover");
                }
                return false;
            }
            Err(e) => {
                tracing::error!(partition, error = %e, "a takeover panicked");
                return false;
            }
        };
        if !keeper.is_valid() {
            // The takeover outlived the lease: another node may hold it now.
            let stopped = tokio::task::spawn_blocking(move || owned.stop()).await;
            if stopped.is_err() {
                tracing::error!(
                    partition,
                    "stopping a partition whose lease lapsed panicked"
                );
            }
            return false;
        }
        let listener = match self.listen(partition).await {
            Ok(listener) => listener,
            Err(e) => {
                tracing::warn!(partition, error = %e, "subscribing to a partition's requests");
                let stopped = tokio::task::spawn_blocking(move || owned.stop()).await;
                if stopped.is_err() {
                    tracing::error!(partition, "stopping a partition panicked");
                }
                if let Err(e) = keeper.release().await {
                    tracing::warn!(partition, error = %e, "releasing after a failed subscribe");
                }
                return false;
            }
        };
        let known: Vec<Promotion> = self
            .inner
            .promotions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .copied()
            .collect();
        for promo in known {
            owned.engine.adopt_promotion(promo);
        }
        let served = Arc::new(Served {
            engine: owned.engine.clone(),
            journal: Arc::clone(&owned.journal),
            keeper: Mutex::new(Some(keeper)),
            owned: Mutex::new(Some(owned)),
            listener,
        });
        self.inner
            .served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(partition, served);
        tracing::info!(
            node = self.id(),
            partition,
            term,
            took_ms = started.elapsed().as_millis() as u64,
            "serving the partition"
        );
        true
    }

    /// Subscribes to `partition`'s requests and serves each on a task.
    ///
    /// Every subscriber of the subject gets every request (no queue
    /// group): a node that subscribed and then stopped answering for the
    /// partition (SIGSTOPped past its lease, say) stays subscribed until
    /// it runs again, and a queue group would hand it a share of the
    /// requests to time out on. A node answers only while it may still
    /// answer for the partition, and stays silent otherwise, so the one
    /// answer a request gets is the owner's.
    async fn listen(&self, partition: u32) -> Result<JoinHandle<()>, String> {
        let mut subscription = self
            .inner
            .client
            .subscribe(forward::subject(partition))
            .await
            .map_err(|e| e.to_string())?;
        // Make sure the server has the subscription before anyone is sent
        // here (a request published before it would find no responder).
        tokio::time::timeout(STOP_CALL_TIMEOUT, self.inner.client.flush())
            .await
            .map_err(|_| "flushing the subscription: no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
        let handler = self
            .inner
            .handler
            .get()
            .cloned()
            .ok_or_else(|| "no request handler is set".to_string())?;
        let client = self.inner.client.clone();
        let node = Arc::downgrade(&self.inner);
        Ok(tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let Some(reply) = message.reply.clone() else {
                    continue;
                };
                let Some(inner) = node.upgrade() else {
                    return;
                };
                let Some(engine) = (Node { inner }).local(partition) else {
                    continue;
                };
                if message
                    .headers
                    .as_ref()
                    .is_some_and(|h| h.get(forward::PROBE).is_some())
                {
                    let answer = answer_probe(&engine, &message.payload);
                    if let Err(e) = client.publish(reply, answer.into()).await {
                        tracing::warn!(partition, error = %e, "answering a key probe");
                    }
                    continue;
                }
                let (handler, client) = (Arc::clone(&handler), client.clone());
                tokio::spawn(async move {
                    let answer =
                        match ForwardedRequest::decode(message.headers.as_ref(), message.payload) {
                            Ok(request) => {
                                match tokio::time::timeout(
                                    SERVE_TIMEOUT,
                                    handler(partition, request),
                                )
                                .await
                                {
                                    Ok(answer) => answer,
                                    // The asking node gave up by now too.
                                    Err(_) => return,
                                }
                            }
                            Err(e) => ForwardedAnswer {
                                status: 400,
                                headers: vec![("content-type".into(), "application/json".into())],
                                body: serde_json::json!({"error": {
                                    "code": "invalid_request",
                                    "message": e.to_string(),
                                }})
                                .to_string()
                                .into(),
                            },
                        };
                    let (headers, body) = answer.encode();
                    if let Err(e) = client.publish_with_headers(reply, headers, body).await {
                        tracing::warn!(partition, error = %e, "answering a forwarded request");
                    }
                });
            }
        }))
    }

    /// Stops serving `partition` and releases its lease (graceful).
    async fn hand_back(&self, partition: u32) {
        let served = self
            .inner
            .served
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&partition);
        let Some(served) = served else {
            return;
        };
        served.listener.abort();
        let owned = crate::engine::lock(&served.owned).take();
        if let Some(owned) = owned {
            // The engine stops and the journal closes (everything taken
            // becomes durable, a last snapshot is written) before the lease
            // goes: the next owner replays a journal nobody appends to.
            let stopped = tokio::task::spawn_blocking(move || owned.stop()).await;
            if stopped.is_err() {
                tracing::error!(partition, "handing a partition back panicked");
            }
        }
        let keeper = crate::engine::lock(&served.keeper).take();
        if let Some(keeper) = keeper {
            match tokio::time::timeout(STOP_CALL_TIMEOUT, keeper.release()).await {
                Ok(Ok(())) => {
                    tracing::info!(node = self.id(), partition, "handed the partition back")
                }
                Ok(Err(e)) => {
                    tracing::warn!(partition, error = %e, "releasing a handed-back lease")
                }
                Err(_) => tracing::warn!(partition, "releasing a handed-back lease: no answer"),
            }
        }
    }
}

/// Whether `engine` holds a record for `user`'s `key`.
fn probe_engine(engine: &Engine, user: UserId, key: &IdempotencyKey) -> Result<Held, String> {
    // No real request has an all-zero fingerprint: any record is "another
    // request's".
    match engine.idempotency(user, key, [0; 16]) {
        Ok(Lookup::Fresh) => Ok(Held::Free),
        Ok(_) => Ok(Held::Record),
        Err(e) => Err(e.to_string()),
    }
}

/// The owner's answer to a key probe (`user\nkey`): `record`, `free`, or
/// why it cannot tell.
fn answer_probe(engine: &Engine, payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    let Some((user, key)) = text.split_once('\n') else {
        return "a probe is user\\nkey".into();
    };
    let (Ok(user), Ok(key)) = (UserId::parse(user), IdempotencyKey::parse(key)) else {
        return "a probe names a valid user and key".into();
    };
    match probe_engine(engine, user, &key) {
        Ok(Held::Record) => "record".into(),
        Ok(Held::Free) => "free".into(),
        Err(e) => e,
    }
}

/// Creates or binds the nodes bucket: history 1, `max_age` = the lease TTL.
async fn open_nodes_bucket(
    context: &jetstream::Context,
    ttl: Duration,
    replicas: usize,
) -> Result<kv::Store, NodeError> {
    let config = kv::Config {
        bucket: NODES_BUCKET.to_string(),
        description: "flashcore live nodes".to_string(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    layout::kv_bucket(context, config)
        .await
        .map_err(|e| NodeError::Nodes(e.to_string()))
}

/// The live nodes, by id.
async fn live_nodes(nodes: &kv::Store) -> Result<Vec<NodeInfo>, String> {
    let read = async {
        let mut keys = nodes.keys().await.map_err(|e| e.to_string())?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| e.to_string())?;
            if let Some(value) = nodes.get(&key).await.map_err(|e| e.to_string())?
                && let Ok(info) = serde_json::from_slice::<NodeInfo>(&value)
            {
                found.push(info);
            }
            if found.len() >= layout::PARTITIONS_MAX as usize {
                break;
            }
        }
        found.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok::<_, String>(found)
    };
    tokio::time::timeout(STOP_CALL_TIMEOUT, read)
        .await
        .map_err(|_| "listing the live nodes: no answer in time".to_string())?
}
