//! The live view of a sale: `GET /v1/stream` (server-sent events) and
//! `GET /dashboard` (the page that draws them).
//!
//! Three parts, so that the hot path pays two relaxed atomic adds and
//! nothing else:
//!
//! - [`Live::record`], called by the front for every answer: one counter per
//!   outcome class and one latency bucket (a fixed log-scale histogram of
//!   atomics, four buckets per power of two of microseconds).
//! - One sampler task ([`spawn_sampler`]), once a second: it takes the
//!   differences of those counters since its last look (requests per second
//!   by outcome, p99 of the last second), the shed count, the journal's
//!   batch size and flush time (from its writer's statistics), and the stock
//!   of the first [`DASHBOARD_SKUS_MAX`] SKUs in id order; serializes that
//!   snapshot once, and publishes it on a `watch` channel.
//! - Each stream only forwards the latest published snapshot, so a thousand
//!   dashboards cost a thousand copies of one string a second and no work on
//!   the engine. Streams are bounded ([`STREAM_CLIENTS_MAX`], beyond it
//!   `503 overloaded`) and each lives at most [`STREAM_LIFETIME_MS`] (the
//!   browser reconnects). A client that goes away ends its stream at the
//!   next write (hyper drops the body, and with it the permit).
//!
//! Shutdown: the sampler stops when the server starts stopping and drops the
//! channel's sender, which ends every stream at once, so a graceful
//! shutdown never waits on an open dashboard.
//!
//! Only public counters go out: the SKUs' stock (as `GET /v1/skus` shows it)
//! and server-wide counts. Nothing about users or orders.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::clock::{Clock, SystemClock};
use crate::domain::SkuId;
use crate::domain::sku::SkuView;
use crate::engine::Engine;
use crate::http::admission::{ClientKey, Permit, Pool, Refused};
use crate::http::error::ApiError;
use crate::http::views::{ClusterJson, rfc3339};
use crate::http::{Admitted, AppState};
use crate::limits::{
    CLIENT_SHARE_DIVISOR, DASHBOARD_SKUS_MAX, LIVE_SAMPLE_MS, STREAM_CLIENTS_MAX,
    STREAM_LIFETIME_MS, STREAM_RETRY_MS,
};

/// The page, built into the binary: it fetches nothing but `/v1/stream`.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// The dashboard's policy apart from its two hashes: nothing from another
/// origin ("nothing fetched from outside", enforced by the browser), the
/// stream from this server, never inside another site's frame, no `<base>`
/// or form that could send the page elsewhere.
const DASHBOARD_CSP_REST: &str = "connect-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The text between the page's only `<tag>` and its `</tag>`, byte for byte
/// what the browser hashes, or `None` unless the page has exactly one such
/// element, opened without attributes (a `src` or `nonce` would change what
/// the hash covers). A `\r` is refused too: the browser hashes the text after
/// turning CRLF into LF, so a checkout with CRLF would not match.
fn inline_text<'a>(html: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    if html.matches(&format!("<{tag}")).count() != 1 || html.matches(&close).count() != 1 {
        return None;
    }
    let start = html.find(&open)? + open.len();
    let end = start + html[start..].find(&close)?;
    let text = &html[start..end];
    (!text.contains('\r')).then_some(text)
}

/// A CSP hash source for inline `text`: `'sha256-<base64 of its SHA-256>'`.
fn csp_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// The Content-Security-Policy for `html`: its one inline script and one
/// inline style admitted by hash, no `'unsafe-inline'` (an injected script
/// or style would not match), and [`DASHBOARD_CSP_REST`].
///
/// When the page's script or style cannot be told apart (not exactly one
/// bare `<script>` and one `<style>`), both sources are `'none'`: nothing
/// inline runs or applies, so a page edited that way fails closed, never
/// open. The unit tests keep the embedded page out of that branch.
fn dashboard_csp_for(html: &str) -> String {
    let (script, style) = match (inline_text(html, "script"), inline_text(html, "style")) {
        (Some(script), Some(style)) => (csp_hash(script), csp_hash(style)),
        _ => ("'none'".to_owned(), "'none'".to_owned()),
    };
    format!("default-src 'none'; script-src {script}; style-src {style}; {DASHBOARD_CSP_REST}")
}

/// The embedded page's policy, hashed once, on the first request: the hash
/// always follows the page it is built with.
fn dashboard_csp() -> &'static str {
    static CSP: OnceLock<String> = OnceLock::new();
    CSP.get_or_init(|| dashboard_csp_for(DASHBOARD_HTML))
}

/// Outcome classes, the index into [`Live`]'s counters.
const CLASS_2XX: usize = 0;
const CLASS_409: usize = 1;
const CLASS_429: usize = 2;
const CLASS_503: usize = 3;
const CLASS_4XX_OTHER: usize = 4;
const CLASS_OTHER: usize = 5;
const CLASSES: usize = 6;

/// Latency buckets: 0..=7 µs one each, then four per power of two up to
/// about 2^32 µs (71 minutes); slower answers land in the last one.
const LATENCY_BUCKETS: usize = 128;

/// The outcome class of an HTTP status.
fn class_of(status: u16) -> usize {
    match status {
        200..=299 => CLASS_2XX,
        409 => CLASS_409,
        429 => CLASS_429,
        503 => CLASS_503,
        400..=499 => CLASS_4XX_OTHER,
        _ => CLASS_OTHER,
    }
}

/// The bucket of a latency in microseconds (about 19% wide above 8 µs).
fn bucket_of(us: u64) -> usize {
    if us < 8 {
        // Below 8: exact, and `us` fits.
        return usize::try_from(us).unwrap_or(0);
    }
    let exp = u64::from(63 - us.leading_zeros()); // >= 3
    let sub = (us >> (exp - 2)) & 3;
    let index = (exp - 1) * 4 + sub;
    usize::try_from(index).map_or(LATENCY_BUCKETS - 1, |i| i.min(LATENCY_BUCKETS - 1))
}

/// The highest latency (µs) that lands in bucket `index`.
fn bucket_high_us(index: usize) -> u64 {
    let index = index as u64;
    if index < 8 {
        return index;
    }
    let exp = index / 4 + 1;
    let sub = index % 4;
    let low = (4 + sub) << (exp - 2);
    low + (1 << (exp - 2)) - 1
}

/// The p99 (µs, the top of its bucket, so never understated) of the
/// latencies counted in `buckets`, or `None` when there are none.
fn p99_us(buckets: &[u64]) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The smallest bucket that holds the ceil(0.99 * total)-th answer.
    let rank = total.saturating_mul(99).div_ceil(100).max(1);
    let mut seen = 0_u64;
    for (index, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Some(bucket_high_us(index));
        }
    }
    buckets.len().checked_sub(1).map(bucket_high_us)
}

/// `now - before` for a counter that only grows, except when it was
/// replaced by a fresh one (the journal after a storage reload): then all
/// of `now` is new.
fn grew(now: u64, before: u64) -> u64 {
    now.checked_sub(before).unwrap_or(now)
}

/// Counts per second over `elapsed_s`.
fn rate(count: u64, elapsed_s: f64) -> f64 {
    if elapsed_s <= 0.0 {
        return 0.0;
    }
    #[allow(clippy::cast_precision_loss)] // per-second counts, far below 2^53
    let r = count as f64 / elapsed_s;
    (r * 10.0).round() / 10.0
}

/// The front's live counters and the latest snapshot (see the module doc).
pub struct Live {
    /// Answers by outcome class, since start.
    outcomes: [AtomicU64; CLASSES],
    /// Answers by latency bucket, since start.
    latency: [AtomicU64; LATENCY_BUCKETS],
    /// A place per open stream, with per-client shares.
    streams: Pool,
    /// The latest serialized snapshot; empty until the first sample.
    latest: watch::Receiver<Arc<str>>,
    /// The sender, until the sampler takes it (it alone publishes, and its
    /// end ends every stream).
    publisher: Mutex<Option<watch::Sender<Arc<str>>>>,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("streams_open", &self.streams_open())
            .finish_non_exhaustive()
    }
}

impl Default for Live {
    fn default() -> Live {
        let (publisher, latest) = watch::channel(Arc::from(""));
        Live {
            outcomes: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            streams: Pool::new(STREAM_CLIENTS_MAX, CLIENT_SHARE_DIVISOR),
            latest,
            publisher: Mutex::new(Some(publisher)),
        }
    }
}

impl Live {
    /// Counts one answer: its status class and its latency. Two relaxed
    /// atomic adds; called by the front for every request.
    pub fn record(&self, status: StatusCode, took: Duration) {
        self.outcomes[class_of(status.as_u16())].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.latency[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Streams open now.
    pub fn streams_open(&self) -> usize {
        STREAM_CLIENTS_MAX.saturating_sub(self.streams.available())
    }

    fn outcome_counts(&self) -> [u64; CLASSES] {
        std::array::from_fn(|i| self.outcomes[i].load(Ordering::Relaxed))
    }

    fn latency_counts(&self) -> [u64; LATENCY_BUCKETS] {
        std::array::from_fn(|i| self.latency[i].load(Ordering::Relaxed))
    }
}

/// Counts by outcome class, as the stream names them.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Outcomes<T> {
    #[serde(rename = "2xx")]
    ok: T,
    #[serde(rename = "409")]
    conflict: T,
    #[serde(rename = "429")]
    rate_limited: T,
    #[serde(rename = "503")]
    unavailable: T,
    #[serde(rename = "4xx")]
    other_4xx: T,
    /// 1xx, 3xx and 5xx other than 503.
    other: T,
}

impl<T: Copy> Outcomes<T> {
    fn from_classes(c: [T; CLASSES]) -> Outcomes<T> {
        Outcomes {
            ok: c[CLASS_2XX],
            conflict: c[CLASS_409],
            rate_limited: c[CLASS_429],
            unavailable: c[CLASS_503],
            other_4xx: c[CLASS_4XX_OTHER],
            other: c[CLASS_OTHER],
        }
    }
}

/// The journal over the last interval.
#[derive(Debug, Clone, Serialize)]
struct JournalLive {
    /// Group commits per second.
    batches_per_s: f64,
    /// Mean events per group commit over the interval (`null`: none).
    batch_events_mean: Option<f64>,
    /// Mean write + flush + fdatasync time per group commit, ms.
    flush_ms_mean: Option<f64>,
    /// Events appended but not durable yet.
    durable_lag_events: u64,
}

/// One SKU's public counters.
#[derive(Debug, Clone, Serialize)]
struct SkuLive {
    sku_id: String,
    name: String,
    on_hand: u64,
    available: u64,
    reserved: u64,
    /// Paid for: `allocated + shipped`.
    sold: u64,
    /// Units that went from `available` into orders per second, net of
    /// units released (a second with more released than ordered shows 0).
    ordered_per_s: f64,
    /// Since when `available` has been 0, as first sampled (`null`: units
    /// left).
    sold_out_at: Option<String>,
}

/// One event of the stream.
#[derive(Debug, Clone, Serialize)]
struct Snapshot {
    /// When it was taken.
    at: String,
    /// Milliseconds since the previous sample (the rates' denominator).
    interval_ms: u64,
    /// `GET /readyz` would answer 200.
    ready: bool,
    requests_per_s: Outcomes<f64>,
    requests_total: Outcomes<u64>,
    /// p99 latency of the answers of the last interval (`null`: none).
    p99_ms: Option<f64>,
    /// Requests shed (`503 overloaded` at the door) per second, and in all.
    shed_per_s: f64,
    shed_total: u64,
    journal: Option<JournalLive>,
    /// The longest run of each background step in the last whole second,
    /// ms, by step name (`steps.rs`): a stall beside its cause.
    steps_max_ms: BTreeMap<&'static str, f64>,
    stream_clients: usize,
    /// SKUs in the catalog; `skus` holds the first [`DASHBOARD_SKUS_MAX`].
    skus_total: usize,
    /// The SKUs could not be read this time: `skus` is the last good read.
    skus_stale: bool,
    skus: Vec<SkuLive>,
    /// Cluster mode: the cluster as `GET /v1/cluster` shows it (nodes,
    /// partitions, owners, lease ages); `null` on a single node, or when
    /// the cluster's buckets did not answer in time. The SKUs above are
    /// then those of the partitions this node owns.
    cluster: Option<ClusterJson>,
}

/// The journal's counters at the previous sample.
#[derive(Debug, Clone, Copy, Default)]
struct JournalSeen {
    batches: u64,
    events: u64,
    flush_us_sum: u64,
}

/// What the sampler remembers between two samples.
struct Sampler {
    at: Instant,
    outcomes: [u64; CLASSES],
    latency: [u64; LATENCY_BUCKETS],
    shed: u64,
    journal: JournalSeen,
    /// Per shown SKU: units in orders (`reserved + allocated + shipped`).
    ordered: HashMap<SkuId, u64>,
    /// Per shown SKU: when `available` was first seen at 0 (unix ms).
    sold_out_ms: HashMap<SkuId, u64>,
    skus: Vec<SkuLive>,
    skus_total: usize,
}

impl Sampler {
    fn new(live: &Live, shed: u64) -> Sampler {
        Sampler {
            at: Instant::now(),
            outcomes: live.outcome_counts(),
            latency: live.latency_counts(),
            shed,
            journal: JournalSeen::default(),
            ordered: HashMap::new(),
            sold_out_ms: HashMap::new(),
            skus: Vec::new(),
            skus_total: 0,
        }
    }

    /// The journal's numbers since the previous sample.
    fn journal(&mut self, engine: &Engine, elapsed_s: f64) -> Option<JournalLive> {
        let report = engine.journal_report();
        let stats = report.stats?;
        let flush_us_sum = stats
            .flush_us
            .lock()
            .map_or(self.journal.flush_us_sum, |h| {
                // hdrhistogram keeps no sum; its mean is exact to its precision.
                #[allow(
                    clippy::cast_precision_loss,
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss
                )]
                let sum = (h.mean() * h.len() as f64) as u64;
                sum
            });
        let now = JournalSeen {
            batches: stats.batches.load(Ordering::Relaxed),
            events: stats.events.load(Ordering::Relaxed),
            flush_us_sum,
        };
        let batches = grew(now.batches, self.journal.batches);
        let events = grew(now.events, self.journal.events);
        let flush_us = grew(now.flush_us_sum, self.journal.flush_us_sum);
        self.journal = now;
        #[allow(clippy::cast_precision_loss)] // per-second counts
        let per_batch = |n: u64, scale: f64| {
            (batches > 0).then(|| ((n as f64 / batches as f64 / scale) * 100.0).round() / 100.0)
        };
        Some(JournalLive {
            batches_per_s: rate(batches, elapsed_s),
            batch_events_mean: per_batch(events, 1.0),
            flush_ms_mean: per_batch(flush_us, 1000.0),
            durable_lag_events: report.last_seq.saturating_sub(report.durable_seq),
        })
    }

    /// Replaces the SKU rows with a fresh read.
    fn skus(&mut self, views: &[SkuView], total: usize, elapsed_s: f64, now_ms: u64) {
        let mut ordered = HashMap::with_capacity(views.len());
        let mut sold_out_ms = HashMap::with_capacity(views.len());
        self.skus = views
            .iter()
            .map(|view| {
                let l = view.levels;
                let sold = l.allocated.saturating_add(l.shipped);
                let units = sold.saturating_add(l.reserved);
                let before = self.ordered.get(&view.sku).copied().unwrap_or(units);
                ordered.insert(view.sku, units);
                let sold_out = (l.available == 0).then(|| {
                    let since = self.sold_out_ms.get(&view.sku).copied().unwrap_or(now_ms);
                    sold_out_ms.insert(view.sku, since);
                    rfc3339(since)
                });
                SkuLive {
                    sku_id: view.sku.to_string(),
                    name: view.name.clone(),
                    on_hand: l.on_hand,
                    available: l.available,
                    reserved: l.reserved,
                    sold,
                    ordered_per_s: rate(units.saturating_sub(before), elapsed_s),
                    sold_out_at: sold_out,
                }
            })
            .collect();
        self.ordered = ordered;
        self.sold_out_ms = sold_out_ms;
        self.skus_total = total;
    }

    /// Takes one snapshot. The SKU read is bounded by `sku_read`: a slow
    /// engine leaves last second's rows (marked stale), never a late event.
    async fn sample(&mut self, state: &AppState, sku_read: Duration) -> Snapshot {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.at);
        let elapsed_s = elapsed.as_secs_f64();
        self.at = now;
        let outcomes = state.live.outcome_counts();
        let per_class: [u64; CLASSES] =
            std::array::from_fn(|i| grew(outcomes[i], self.outcomes[i]));
        self.outcomes = outcomes;
        let latency = state.live.latency_counts();
        let last_second: Vec<u64> = latency
            .iter()
            .zip(self.latency.iter())
            .map(|(now, before)| grew(*now, *before))
            .collect();
        self.latency = latency;
        let shed = state.metrics.shed.get();
        let shed_now = grew(shed, self.shed);
        self.shed = shed;

        let engine = state.backend.engine().ok();
        let journal = engine.as_ref().and_then(|e| self.journal(e, elapsed_s));
        let (read, cluster) = match (state.cluster(), &engine) {
            (Some(node), _) => {
                let skus = local_skus_head(node.engines(), sku_read);
                let view = tokio::time::timeout(sku_read, node.view());
                let (skus, view) = tokio::join!(skus, view);
                let view = view.ok().and_then(Result::ok);
                (skus, view.as_ref().map(ClusterJson::from))
            }
            (None, Some(engine)) => {
                let read = tokio::time::timeout(sku_read, engine.skus_head(DASHBOARD_SKUS_MAX))
                    .await
                    .ok()
                    .and_then(Result::ok);
                (read, None)
            }
            (None, None) => (None, None),
        };
        let now_ms = SystemClock.now_ms();
        let skus_stale = match read {
            Some((views, total)) => {
                self.skus(&views, total, elapsed_s, now_ms);
                false
            }
            None => true,
        };
        #[allow(clippy::cast_precision_loss)] // microseconds of one answer
        let p99_ms = p99_us(&last_second).map(|us| us as f64 / 1000.0);
        Snapshot {
            at: rfc3339(now_ms),
            interval_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            ready: state.backend.not_ready_reason().is_none(),
            requests_per_s: Outcomes::from_classes(per_class.map(|n| rate(n, elapsed_s))),
            requests_total: Outcomes::from_classes(outcomes),
            p99_ms,
            shed_per_s: rate(shed_now, elapsed_s),
            shed_total: shed,
            journal,
            steps_max_ms: crate::steps::report()
                .into_iter()
                .map(|r| {
                    #[allow(clippy::cast_precision_loss)] // microseconds of one step
                    let ms = (r.last_second_max_us as f64 / 10.0).round() / 100.0;
                    (r.step.name(), ms)
                })
                .collect(),
            stream_clients: state.live.streams_open(),
            skus_total: self.skus_total,
            skus_stale,
            skus: self.skus.clone(),
            cluster,
        }
    }
}

/// The first [`DASHBOARD_SKUS_MAX`] SKUs by id of a cluster node's own
/// partitions, and how many they hold; `None` if one partition did not
/// answer within `wait` (the dashboard then shows last second's rows).
/// Each node's dashboard shows its own partitions: a gather from every
/// node once a second per open dashboard would cost every partition a
/// request a second for a picture.
async fn local_skus_head(
    engines: Vec<(u32, Engine)>,
    wait: Duration,
) -> Option<(Vec<SkuView>, usize)> {
    let reads = engines
        .iter()
        .map(|(_, engine)| engine.skus_head(DASHBOARD_SKUS_MAX));
    let heads = tokio::time::timeout(wait, futures_util::future::try_join_all(reads))
        .await
        .ok()?
        .ok()?;
    let mut total = 0usize;
    let mut views = Vec::new();
    for (head, count) in heads {
        total = total.saturating_add(count);
        views.extend(head);
    }
    views.sort_by_key(|view| view.sku);
    views.truncate(DASHBOARD_SKUS_MAX);
    Some((views, total))
}

/// Starts the one sampler: a snapshot every [`LIVE_SAMPLE_MS`] until `stop`
/// turns true. Its end drops the publisher, which ends every open stream.
/// A second call finds the publisher taken and starts nothing.
pub fn spawn_sampler(state: AppState, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
    let publisher = state
        .live
        .publisher
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    tokio::spawn(async move {
        let Some(publisher) = publisher else {
            tracing::warn!("the live sampler is already running");
            return;
        };
        let period = Duration::from_millis(LIVE_SAMPLE_MS);
        let mut sampler = Sampler::new(&state.live, state.metrics.shed.get());
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The first tick is at once: the first event comes a period later,
        // with a whole period's rates.
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let snapshot = tokio::select! {
                s = sampler.sample(&state, period / 2) => s,
                _ = stop.wait_for(|s| *s) => return,
            };
            match serde_json::to_string(&snapshot) {
                Ok(json) => {
                    publisher.send_replace(Arc::from(json));
                }
                Err(e) => tracing::warn!(error = %e, "cannot serialize the live snapshot"),
            }
        }
    })
}

/// One stream's state between two events.
struct Follower {
    latest: watch::Receiver<Arc<str>>,
    ends_at: tokio::time::Instant,
    first: bool,
    /// Held for the life of the stream (dropped with it).
    _permit: Permit,
}

/// The next event: the latest snapshot once it changes (the current one
/// first), until the sampler stops or the stream's lifetime is over.
async fn next_event(mut f: Follower) -> Option<(Result<Event, Infallible>, Follower)> {
    loop {
        if !f.first || f.latest.borrow().is_empty() {
            tokio::select! {
                changed = f.latest.changed() => changed.ok()?,
                () = tokio::time::sleep_until(f.ends_at) => return None,
            }
        }
        let json = Arc::clone(&f.latest.borrow_and_update());
        if json.is_empty() {
            continue;
        }
        let mut event = Event::default().data(&*json);
        if f.first {
            event = event.retry(Duration::from_millis(STREAM_RETRY_MS));
            f.first = false;
        }
        return Some((Ok(event), f));
    }
}

/// `GET /v1/stream`: one JSON event a second (see the module doc).
///
/// # Errors
/// `Overloaded` when [`STREAM_CLIENTS_MAX`] streams are open.
pub async fn stream(
    State(state): State<AppState>,
    admitted: Option<Extension<Admitted>>,
) -> Result<Response, ApiError> {
    // Through the front, admission names the client; a request that did
    // not come through it counts as one anonymous client.
    let client = match admitted {
        Some(Extension(admitted)) => admitted.client,
        None => Some(ClientKey::addr(std::net::Ipv4Addr::UNSPECIFIED.into())),
    };
    let permit = state.live.streams.try_acquire(client).map_err(|why| {
        ApiError::Overloaded(match why {
            Refused::Full => "too many live streams are open; retry later".into(),
            Refused::ShareUsed => {
                "this client has its whole share of live streams open; close one".into()
            }
        })
    })?;
    let follower = Follower {
        latest: state.live.latest.clone(),
        ends_at: tokio::time::Instant::now() + Duration::from_millis(STREAM_LIFETIME_MS),
        first: true,
        _permit: permit,
    };
    let events = futures_util::stream::unfold(follower, next_event);
    Ok(Sse::new(events).into_response())
}

/// `GET /dashboard`: the page, with its policy; `nosniff` so the answer is
/// only ever read as the HTML it says it is, and no `Referer` leaves it.
pub async fn dashboard() -> Response {
    (
        [
            (CONTENT_TYPE, "text/html; charset=utf-8"),
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, dashboard_csp()),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (REFERRER_POLICY, "no-referrer"),
        ],
        DASHBOARD_HTML,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_ordered() {
        let mut last = 0;
        for us in 0..100_000_u64 {
            let b = bucket_of(us);
            assert!(
                b == last || b == last + 1,
                "{us} µs jumps from {last} to {b}"
            );
            assert!(us <= bucket_high_us(b), "{us} µs above its bucket's top");
            if b > 0 {
                assert!(us > bucket_high_us(b - 1), "{us} µs fits the bucket below");
            }
            last = b;
        }
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn buckets_are_at_most_a_quarter_wide() {
        for b in 8..LATENCY_BUCKETS {
            let (low, high) = (bucket_high_us(b - 1) + 1, bucket_high_us(b));
            assert!((high - low) * 4 <= low, "bucket {b}: {low}..={high}");
        }
    }

    #[test]
    fn p99_is_the_bucket_of_the_99th_percent() {
        let mut buckets = [0_u64; LATENCY_BUCKETS];
        assert_eq!(p99_us(&buckets), None);
        // 990 fast answers (100 µs) and 10 slow ones (50 ms).
        buckets[bucket_of(100)] = 990;
        buckets[bucket_of(50_000)] = 10;
        let p99 = p99_us(&buckets).unwrap();
        assert!(
            (100..=bucket_high_us(bucket_of(100))).contains(&p99),
            "{p99}"
        );
        // One more slow answer pushes the 99th percent into the slow ones.
        buckets[bucket_of(50_000)] = 11;
        let p99 = p99_us(&buckets).unwrap();
        assert!((50_000..=62_500).contains(&p99), "{p99}");
    }

    #[test]
    fn outcome_classes() {
        assert_eq!(class_of(201), CLASS_2XX);
        assert_eq!(class_of(409), CLASS_409);
        assert_eq!(class_of(429), CLASS_429);
        assert_eq!(class_of(503), CLASS_503);
        assert_eq!(class_of(404), CLASS_4XX_OTHER);
        assert_eq!(class_of(500), CLASS_OTHER);
        assert_eq!(class_of(304), CLASS_OTHER);
    }

    #[test]
    fn record_counts_class_and_latency() {
        let live = Live::default();
        live.record(StatusCode::CREATED, Duration::from_micros(300));
        live.record(StatusCode::CONFLICT, Duration::from_micros(300));
        live.record(StatusCode::CONFLICT, Duration::from_secs(3));
        let outcomes = live.outcome_counts();
        assert_eq!(outcomes[CLASS_2XX], 1);
        assert_eq!(outcomes[CLASS_409], 2);
        let latency = live.latency_counts();
        assert_eq!(latency[bucket_of(300)], 2);
        assert_eq!(latency[bucket_of(3_000_000)], 1);
        assert_eq!(latency.iter().sum::<u64>(), 3);
    }

    /// The directive `name` of `csp`, without its name.
    fn directive<'a>(csp: &'a str, name: &str) -> &'a str {
        let found: Vec<&str> = csp
            .split(';')
            .map(str::trim)
            .filter_map(|d| d.strip_prefix(name)?.strip_prefix(' '))
            .collect();
        assert_eq!(found.len(), 1, "{name} once in {csp}");
        found[0]
    }

    /// What is between `open` and the next `close` in `html`, found
    /// independently of [`inline_text`].
    fn between<'a>(html: &'a str, open: &str, close: &str) -> &'a str {
        let (_, rest) = html.split_once(open).expect("opens");
        rest.split_once(close).expect("closes").0
    }

    #[test]
    fn the_csp_admits_exactly_the_pages_script_and_style_by_hash() {
        let csp = dashboard_csp();
        assert!(!csp.contains("unsafe"), "{csp}");
        for (name, open, close) in [
            ("script-src", "<script>", "</script>"),
            ("style-src", "<style>", "</style>"),
        ] {
            // Recomputed here from the page as the browser sees it.
            let text = between(DASHBOARD_HTML, open, close);
            let digest = Sha256::digest(text.as_bytes());
            let want = format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            );
            assert_eq!(directive(csp, name), want, "{name}");
        }
        assert_eq!(directive(csp, "default-src"), "'none'");
        assert_eq!(directive(csp, "frame-ancestors"), "'none'");
        assert_eq!(directive(csp, "connect-src"), "'self'");
    }

    #[test]
    fn the_page_has_nothing_inline_that_the_hashes_do_not_cover() {
        // Attributes are not covered by a hash: a style attribute would not
        // apply and an event handler attribute would not run.
        let lower = DASHBOARD_HTML.to_ascii_lowercase();
        for banned in [
            " style=",
            " onload=",
            " onclick=",
            " onerror=",
            "javascript:",
        ] {
            assert!(!lower.contains(banned), "{banned} in the page");
        }
        assert!(inline_text(DASHBOARD_HTML, "script").is_some());
        assert!(inline_text(DASHBOARD_HTML, "style").is_some());
    }

    #[test]
    fn a_page_it_cannot_hash_gets_a_policy_that_runs_nothing() {
        for html in [
            "<style>a{}</style><script>1</script><script>2</script>",
            "<style>a{}</style><script src=x></script>",
            "<style>a{}</style>",
            "<style>a{}</style><script>1\r\n</script>",
        ] {
            assert_eq!(
                dashboard_csp_for(html),
                "default-src 'none'; script-src 'none'; style-src 'none'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
                 frame-ancestors 'none'",
                "{html}"
            );
        }
        let csp = dashboard_csp_for("<style></style><script></script>");
        // SHA-256 of nothing, a known vector.
        let empty = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='";
        assert_eq!(directive(&csp, "script-src"), empty);
        assert_eq!(directive(&csp, "style-src"), empty);
    }

    #[test]
    fn a_replaced_counter_counts_from_zero() {
        assert_eq!(grew(10, 4), 6);
        assert_eq!(grew(3, 40), 3);
        assert!((rate(15, 1.5) - 10.0).abs() < 1e-9);
        assert!(rate(15, 0.0).abs() < 1e-9);
    }
}
