//! A partition's order archive on JetStream: the [`Archive`] behind a
//! cluster partition's journal, so finished orders leave the owner's memory
//! for the servers (R3, like the journal) and follow the partition to
//! whichever node owns it next, instead of staying on a node's disk or in
//! its memory for ever.
//!
//! **Why a stream, and this layout.** One stream, `FC_ARCHIVE`, holds every
//! partition's archive (one Raft group, as the journal stream is one for
//! all partitions), with `max_messages_per_subject = 1`: each subject is a
//! key whose last write wins, so archiving an order twice stores it once.
//! A KV bucket is the same thing with a fixed subject prefix and no way to
//! list a page of keys by wildcard without reading them all; the stream
//! lets reads name exactly the subjects they want. Subjects, for partition
//! `p`:
//!
//! - `fc.archive.{p}.o.{page}.{id}`: the order, framed by
//!   [`codec::encode_order`] (format version, length, CRC, the id again),
//!   exactly as the sled archive stores it. `page` is the order's index in
//!   its partition's id space (`id / stride`) divided by [`PAGE_ORDERS`].
//! - `fc.archive.{p}.p.{page}`: an empty message marking a page that holds
//!   archived orders.
//! - `fc.archive.{p}.u.{user}.{page}.{id}`: an empty message, the user's
//!   index entry. `user` is the user id in hex: ids may hold `.`, which
//!   separates subject tokens.
//! - `fc.archive.{p}.v.{user}.{page}`: an empty message marking a page
//!   that holds archived orders of the user.
//!
//! **Reads.** `get` is the subject's last message, read from the stream
//! leader (`STREAM.MSG.GET`, never a direct get a lagging replica may
//! answer: after a failover the new owner must see what the old one
//! archived, and the order is in memory nowhere else). A listing (newest
//! first, at most `limit`) lists the page markers (everyone's, or the
//! user's) with a subject filter (stream info, answered by the leader),
//! then the entries of the newest page, and of the next while it has fewer
//! than `limit` ids, and reads those orders: it reads one name per page of
//! history and the names of a page or two, never every order's. The
//! engine asks for at most [`ORDERS_LIST_MAX`] (500), under a page.
//!
//! **Writes.** [`Archive::put_batch`] publishes every order, then its index
//! entry, then the batch's page markers, at most [`PUBLISH_WINDOW`] unacked
//! at once, and returns only once every PubAck is in: each is the R3
//! quorum's fsync (servers run `sync_interval: always`). A failed batch may
//! have stored some of it; the engine keeps the orders in memory and writes
//! them again (the same subjects: replaced, not doubled). An index entry
//! whose order did not land is skipped on read, as the sled archive skips
//! one.
//!
//! Calls run on the node's runtime through [`blocking::call`], whatever
//! thread the engine calls from.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{self, DiscardPolicy, LastRawMessageErrorKind, StorageType};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use tokio::runtime::Handle;

use crate::cluster::blocking::{self, storage};
use crate::cluster::journal::{API_CALL_MS, ClusterJournalError, PUBLISH_ACK_MS};
use crate::domain::order::Order;
use crate::domain::{OrderId, UserId};
use crate::journal::{Archive, JournalError, codec};
use crate::limits::{ARCHIVE_BATCH_MAX, ORDERS_LIST_MAX};

/// Orders of one partition per page: a `list_all` reads the names of one
/// page (or a few, when the newest is thin) instead of the history; a
/// thousand names is one stream-info answer of a few tens of KB.
pub const PAGE_ORDERS: u64 = 1_024;

/// Most publishes awaiting their PubAck at once: the acks of a window come
/// back together after one quorum fsync, and a batch of
/// [`ARCHIVE_BATCH_MAX`] orders is about a dozen windows.
pub const PUBLISH_WINDOW: usize = 256;

/// Most orders read at once by a listing (each a leader read).
const READS_AT_ONCE: usize = 32;

/// How long a whole `put_batch` may take: a dozen windows, each a quorum
/// round trip in milliseconds when healthy; past this, a leader election or
/// a dead quorum, and the sweep tries again later.
pub const PUT_BATCH_MS: u64 = 30_000;

/// How long a listing may take: up to [`ORDERS_LIST_MAX`] reads
/// [`READS_AT_ONCE`] at a time, and the names of a few pages.
pub const LIST_MS: u64 = 10_000;

const _: () = assert!(PUBLISH_WINDOW <= 3 * ARCHIVE_BATCH_MAX);
const _: () = assert!(ORDERS_LIST_MAX as u64 <= PAGE_ORDERS);

/// The archive stream, and how it is replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveStream {
    /// The stream's name.
    pub name: String,
    /// The subjects' prefix: partition `p` is under `{subject_prefix}.{p}`.
    pub subject_prefix: String,
    /// Replicas: as the journal stream's.
    pub replicas: usize,
}

impl ArchiveStream {
    /// The default layout: stream `FC_ARCHIVE`, subjects `fc.archive.>`.
    pub fn new(replicas: usize) -> ArchiveStream {
        ArchiveStream {
            name: "FC_ARCHIVE".into(),
            subject_prefix: "fc.archive".into(),
            replicas,
        }
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some("flashcore finished orders that left memory".into()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: StorageType::File,
            num_replicas: self.replicas,
            // Reads go to the leader (see the module doc).
            allow_direct: false,
            // A subject is a key: its last write replaces the one before.
            max_messages_per_subject: 1,
            max_bytes: -1,
            max_messages: -1,
            max_age: Duration::ZERO,
            discard: DiscardPolicy::Old,
            // An archived order is kept for ever.
            deny_delete: true,
            deny_purge: true,
            ..Default::default()
        }
    }
}

/// Creates the archive stream, or binds to it if it exists and fits.
///
/// # Errors
/// `StreamMismatch` when an existing stream has other subjects, storage,
/// replicas or limits; `Timeout` or `Nats` when the servers do not answer.
pub async fn ensure_archive_stream(
    context: &Context,
    spec: &ArchiveStream,
) -> Result<(), ClusterJournalError> {
    let info = ensure_keyed_stream(context, spec.config()).await?;
    let limited = info.max_bytes > 0 || info.max_messages > 0 || !info.max_age.is_zero();
    if limited {
        return Err(ClusterJournalError::StreamMismatch {
            stream: spec.name.clone(),
            why: "it has limits that would drop archived orders".into(),
        });
    }
    Ok(())
}

/// Creates or binds a stream whose subjects are keys (one message each),
/// checking what both stores need; answers its configuration.
pub(crate) async fn ensure_keyed_stream(
    context: &Context,
    wanted: stream::Config,
) -> Result<stream::Config, ClusterJournalError> {
    let timed = |what: &'static str| {
        move |_| ClusterJournalError::Timeout {
            what,
            after_ms: API_CALL_MS,
        }
    };
    let mut stream = tokio::time::timeout(
        Duration::from_millis(API_CALL_MS),
        context.get_or_create_stream(wanted.clone()),
    )
    .await
    .map_err(timed("creating a store stream"))?
    .map_err(|e| ClusterJournalError::Nats {
        what: "creating a store stream",
        source: e.into(),
    })?;
    let info = tokio::time::timeout(Duration::from_millis(API_CALL_MS), stream.info())
        .await
        .map_err(timed("reading a store stream"))?
        .map_err(|e| ClusterJournalError::Nats {
            what: "reading a store stream",
            source: e.into(),
        })?
        .config
        .clone();
    let mismatch = |why: String| ClusterJournalError::StreamMismatch {
        stream: wanted.name.clone(),
        why,
    };
    if info.subjects != wanted.subjects {
        return Err(mismatch(format!("subjects {:?}", info.subjects)));
    }
    if info.storage != StorageType::File || info.num_replicas != wanted.num_replicas {
        return Err(mismatch(format!(
            "storage {:?} with {} replicas",
            info.storage, info.num_replicas
        )));
    }
    if info.max_messages_per_subject != 1 {
        return Err(mismatch(format!(
            "{} messages per subject, not 1",
            info.max_messages_per_subject
        )));
    }
    Ok(info)
}

/// Publishes `messages` in order, at most [`PUBLISH_WINDOW`] unacked at
/// once, and returns once every one has its PubAck from `stream`.
pub(crate) async fn publish_acked(
    context: &Context,
    stream: &str,
    messages: Vec<(String, Bytes)>,
) -> Result<(), String> {
    for window in messages.chunks(PUBLISH_WINDOW) {
        let mut acks = Vec::with_capacity(window.len());
        for (subject, payload) in window {
            let ack = context
                .publish(subject.clone(), payload.clone())
                .await
                .map_err(|e| format!("publishing {subject}: {e}"))?;
            acks.push(ack);
        }
        let acked = tokio::time::timeout(
            Duration::from_millis(PUBLISH_ACK_MS),
            futures_util::future::try_join_all(
                acks.into_iter().map(std::future::IntoFuture::into_future),
            ),
        )
        .await
        .map_err(|_| format!("no PubAck in {PUBLISH_ACK_MS} ms"))?
        .map_err(|e| format!("a publish was refused: {e}"))?;
        // Paired with the subjects: every ack is from the stream we meant.
        if let Some(other) = acked.iter().find(|ack| ack.stream != stream) {
            return Err(format!(
                "stored in stream {}, not {stream}: the subjects overlap another stream",
                other.stream
            ));
        }
        assert_eq!(acked.len(), window.len(), "one ack per publish");
    }
    Ok(())
}

/// The subject's last message, read from the stream leader; `None` when
/// the subject holds none.
pub(crate) async fn last_message(
    context: &Context,
    stream: &str,
    subject: &str,
) -> Result<Option<Bytes>, String> {
    let stream = context
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(Some(message.payload)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("reading {subject}: {e}")),
    }
}

/// The subjects matching `filter` (stream info, answered by the leader).
pub(crate) async fn subjects(
    context: &Context,
    stream: &str,
    filter: &str,
) -> Result<Vec<String>, String> {
    let stream = context
        .get_stream_no_info(stream)
        .await
        .map_err(|e| e.to_string())?;
    let found = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| format!("listing {filter}: {e}"))?;
    found
        .map_ok(|(subject, _count)| subject)
        .try_collect()
        .await
        .map_err(|e| format!("listing {filter}: {e}"))
}

/// The number in a subject's last token (an order id or a page).
fn last_number(subject: &str) -> Option<u64> {
    subject.rsplit('.').next().and_then(|t| t.parse().ok())
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// A user id as one subject token: hex, since ids may hold `.`.
fn user_token(user: &UserId) -> String {
    hex(user.as_str().as_bytes())
}

/// Subject names of one partition's archive.
#[derive(Debug, Clone)]
struct Names {
    /// `{subject_prefix}.{p}`.
    base: String,
    /// The partition's id stride (its ids are `k * stride + p`).
    stride: u64,
}

impl Names {
    fn page(&self, id: OrderId) -> u64 {
        (id.0 / self.stride.max(1)) / PAGE_ORDERS
    }

    fn order(&self, id: OrderId) -> String {
        format!("{}.o.{}.{}", self.base, self.page(id), id.0)
    }

    fn page_orders(&self, page: u64) -> String {
        format!("{}.o.{page}.*", self.base)
    }

    fn user_entry(&self, user: &UserId, id: OrderId) -> String {
        let page = self.page(id);
        format!("{}.u.{}.{page}.{}", self.base, user_token(user), id.0)
    }

    fn user_page_orders(&self, user: &UserId, page: u64) -> String {
        format!("{}.u.{}.{page}.*", self.base, user_token(user))
    }

    fn user_page_marker(&self, user: &UserId, page: u64) -> String {
        format!("{}.v.{}.{page}", self.base, user_token(user))
    }

    fn user_page_markers(&self, user: &UserId) -> String {
        format!("{}.v.{}.*", self.base, user_token(user))
    }

    fn page_marker(&self, page: u64) -> String {
        format!("{}.p.{page}", self.base)
    }

    fn page_markers(&self) -> String {
        format!("{}.p.*", self.base)
    }
}

/// One partition's archive on the archive stream (see the module doc).
#[derive(Clone)]
pub struct JetStreamArchive {
    context: Context,
    stream: String,
    names: Names,
    runtime: Handle,
}

impl std::fmt::Debug for JetStreamArchive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamArchive")
            .field("base", &self.names.base)
            .finish_non_exhaustive()
    }
}

impl JetStreamArchive {
    /// The archive of `partition` (whose ids are `k * stride + partition`)
    /// in the stream `spec` (made by [`ensure_archive_stream`]); calls run
    /// on `runtime`, the node's.
    pub fn new(
        context: Context,
        spec: &ArchiveStream,
        partition: u32,
        stride: u64,
        runtime: Handle,
    ) -> JetStreamArchive {
        JetStreamArchive {
            context,
            stream: spec.name.clone(),
            names: Names {
                base: format!("{}.{partition}", spec.subject_prefix),
                stride: stride.max(1),
            },
            runtime,
        }
    }

    /// The subject an order is stored under (for tests that damage it).
    pub fn order_subject(&self, id: OrderId) -> String {
        self.names.order(id)
    }

    /// Reads the orders `ids` in that order, skipping ids whose order is
    /// missing (an index entry whose order did not land).
    async fn read_all(
        context: Context,
        stream: String,
        names: Names,
        ids: Vec<OrderId>,
    ) -> Result<Vec<Order>, String> {
        let reads = ids.into_iter().map(|id| {
            let (context, stream, subject) = (context.clone(), stream.clone(), names.order(id));
            async move {
                let bytes = last_message(&context, &stream, &subject).await?;
                bytes
                    .map(|b| decode(id, &b))
                    .transpose()
                    .map(|order| (id, order))
            }
        });
        let read: Vec<(OrderId, Option<Order>)> = futures_util::stream::iter(reads)
            .buffered(READS_AT_ONCE)
            .try_collect()
            .await?;
        let mut found = Vec::with_capacity(read.len());
        for (id, order) in read {
            match order {
                Some(order) => found.push(order),
                None => tracing::warn!(order = %id, "archive index names a missing order"),
            }
        }
        Ok(found)
    }
}

fn decode(id: OrderId, bytes: &[u8]) -> Result<Order, String> {
    codec::decode_order(id.0, bytes).map_err(|e| format!("order {id} is damaged: {e}"))
}

/// Order ids in `subjects`, newest (highest) first, at most `limit`.
fn newest_ids(subjects: &[String], limit: usize) -> Vec<OrderId> {
    let mut ids: Vec<u64> = subjects.iter().filter_map(|s| last_number(s)).collect();
    ids.sort_unstable_by(|a, b| b.cmp(a));
    ids.dedup();
    ids.truncate(limit);
    ids.into_iter().map(OrderId).collect()
}

impl Archive for JetStreamArchive {
    fn put_batch(&self, orders: &[Order]) -> Result<(), JournalError> {
        if orders.is_empty() {
            return Ok(());
        }
        let names = &self.names;
        let mut messages = Vec::with_capacity(orders.len() * 2 + 1);
        let mut pages = BTreeSet::new();
        let mut user_pages = BTreeSet::new();
        for order in orders {
            let bytes = codec::encode_order(order).map_err(|e| storage("archive: encoding", e))?;
            // The order before its index entry: an entry always finds its
            // order unless a publish after it failed (skipped on read).
            messages.push((names.order(order.id), Bytes::from(bytes)));
            messages.push((names.user_entry(&order.user, order.id), Bytes::new()));
            pages.insert(names.page(order.id));
            user_pages.insert((order.user, names.page(order.id)));
        }
        // Markers last: a marker names a page whose entries were written.
        messages.extend(
            pages
                .into_iter()
                .map(|page| (names.page_marker(page), Bytes::new())),
        );
        messages.extend(
            user_pages
                .into_iter()
                .map(|(user, page)| (names.user_page_marker(&user, page), Bytes::new())),
        );
        let (context, stream) = (self.context.clone(), self.stream.clone());
        blocking::call(
            &self.runtime,
            "archive: writing",
            PUT_BATCH_MS,
            async move { publish_acked(&context, &stream, messages).await },
        )
    }

    fn get(&self, id: OrderId) -> Result<Option<Order>, JournalError> {
        let (context, stream) = (self.context.clone(), self.stream.clone());
        let subject = self.names.order(id);
        blocking::call(&self.runtime, "archive: reading", API_CALL_MS, async move {
            let bytes = last_message(&context, &stream, &subject).await?;
            bytes.map(|b| decode(id, &b)).transpose()
        })
    }

    fn list_user(&self, user: &UserId, limit: usize) -> Result<Vec<Order>, JournalError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (context, stream, names) = (
            self.context.clone(),
            self.stream.clone(),
            self.names.clone(),
        );
        let user = *user;
        blocking::call(&self.runtime, "archive: listing", LIST_MS, async move {
            let ids = newest_paged(
                &context,
                &stream,
                &names.user_page_markers(&user),
                |page| names.user_page_orders(&user, page),
                limit,
            )
            .await?;
            let orders = JetStreamArchive::read_all(context, stream, names, ids).await?;
            // Paired with the index: an entry leads only to its user's order.
            if let Some(other) = orders.iter().find(|o| o.user != user) {
                return Err(format!("the index of {user} names order {}", other.id));
            }
            Ok(orders)
        })
    }

    fn list_all(&self, limit: usize) -> Result<Vec<Order>, JournalError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let (context, stream, names) = (
            self.context.clone(),
            self.stream.clone(),
            self.names.clone(),
        );
        blocking::call(&self.runtime, "archive: listing", LIST_MS, async move {
            let ids = newest_paged(
                &context,
                &stream,
                &names.page_markers(),
                |page| names.page_orders(page),
                limit,
            )
            .await?;
            JetStreamArchive::read_all(context, stream, names, ids).await
        })
    }
}

/// The newest `limit` order ids of a paged listing: the pages named by the
/// markers matching `markers`, newest first, each listed with
/// `page_filter` until `limit` ids are found. Reads the markers and the
/// names of the newest pages only (each at most [`PAGE_ORDERS`]).
async fn newest_paged(
    context: &Context,
    stream: &str,
    markers: &str,
    page_filter: impl Fn(u64) -> String,
    limit: usize,
) -> Result<Vec<OrderId>, String> {
    let markers = subjects(context, stream, markers).await?;
    let mut pages: Vec<u64> = markers.iter().filter_map(|s| last_number(s)).collect();
    pages.sort_unstable_by(|a, b| b.cmp(a));
    pages.dedup();
    let mut ids = Vec::with_capacity(limit);
    // Bounded by the pages.
    for page in pages {
        if ids.len() >= limit {
            break;
        }
        let entries = subjects(context, stream, &page_filter(page)).await?;
        ids.extend(newest_ids(&entries, limit - ids.len()));
    }
    assert!(ids.len() <= limit, "at most the limit");
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(stride: u64) -> Names {
        Names {
            base: "fc.archive.3".into(),
            stride,
        }
    }

    #[test]
    fn subjects_name_the_page_and_the_user_in_valid_tokens() {
        let n = names(64);
        // Partition 3 of 64: ids 3, 67, ...; the 1,024th of its ids opens page 1.
        assert_eq!(n.order(OrderId(3)), "fc.archive.3.o.0.3");
        assert_eq!(n.order(OrderId(1_023 * 64 + 3)), "fc.archive.3.o.0.65475");
        assert_eq!(n.order(OrderId(1_024 * 64 + 3)), "fc.archive.3.o.1.65539");
        let user = UserId::parse("a.b-C_9").expect("valid");
        let entry = n.user_entry(&user, OrderId(67));
        assert_eq!(entry, "fc.archive.3.u.612e622d435f39.0.67");
        assert_eq!(entry.split('.').count(), 7, "the user's dot is hex");
        assert_eq!(last_number(&entry), Some(67));
        assert_eq!(
            n.user_page_orders(&user, 0),
            "fc.archive.3.u.612e622d435f39.0.*"
        );
        assert_eq!(
            n.user_page_marker(&user, 0),
            "fc.archive.3.v.612e622d435f39.0"
        );
        assert_eq!(n.page_marker(2), "fc.archive.3.p.2");
    }

    #[test]
    fn newest_ids_sort_down_and_stop_at_the_limit() {
        let subjects: Vec<String> = [5u64, 70, 12, 70, 3]
            .iter()
            .map(|id| format!("fc.archive.3.u.75.{id}"))
            .chain(["fc.archive.3.u.75.bad".to_string()])
            .collect();
        assert_eq!(
            newest_ids(&subjects, 3),
            vec![OrderId(70), OrderId(12), OrderId(5)]
        );
        assert!(newest_ids(&subjects, 0).is_empty());
    }
}
