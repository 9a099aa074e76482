//! A partition's spilled idempotency records on JetStream: the
//! [`IdemStore`] behind a cluster partition's journal, so records past the
//! book's memory budget leave the owner's memory for the servers (R3) and
//! follow the partition to its next owner.
//!
//! **Layout.** One stream, `FC_IDEM`, for every partition, with
//! `max_messages_per_subject = 1`: a record is the subject
//! `fc.idem.{p}.{key}` (`key` the 16-byte key hash in hex), framed by
//! [`codec::encode_idem_record`] (format version, length, CRC, the key
//! again), so a key written again replaces its record, as in the sled
//! store.
//!
//! **Expiry is the server's.** The stream's `max_age` is the keys' TTL
//! plus [`AGE_MARGIN`]: the servers drop a record on their own clock once
//! it is that old, counted from when it was spilled, which is after it was
//! recorded. So a record is never dropped before its TTL has run (the
//! margin covers clocks that disagree by minutes), and is kept at most a
//! TTL and the margin past its spill; a lookup ignores a record past its
//! TTL anyway. [`IdemStore::evict_before`] therefore has nothing to do,
//! and sweeping by hand would mean reading every record. The sled store
//! sweeps by an index of times instead, as sled has no expiry.
//!
//! Reads go to the stream leader, as the archive's do
//! (`cluster/archive.rs`); writes return once every PubAck (the quorum's
//! fsync) is in. Calls run on the node's runtime through
//! [`blocking::call`].

use std::time::Duration;

use async_nats::jetstream::Context;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use bytes::Bytes;
use tokio::runtime::Handle;

use crate::cluster::archive::{
    PUT_BATCH_MS, ensure_keyed_stream, hex, last_message, publish_acked, subjects,
};
use crate::cluster::blocking::{self, storage};
use crate::cluster::journal::{API_CALL_MS, ClusterJournalError};
use crate::domain::idem::{HashedRecord, IdemRecord, KeyHash};
use crate::journal::{IdemStore, JournalError, codec};
use crate::limits::IDEMPOTENCY_TTL_MS;

/// Kept past the TTL: a record spilled by a node whose clock runs ahead of
/// the servers' must still outlive its TTL on theirs.
pub const AGE_MARGIN: Duration = Duration::from_secs(10 * 60);

/// The store's stream, and how it is replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemStream {
    /// The stream's name.
    pub name: String,
    /// The subjects' prefix: partition `p` is under `{subject_prefix}.{p}`.
    pub subject_prefix: String,
    /// Replicas: as the journal stream's.
    pub replicas: usize,
}

impl IdemStream {
    /// The default layout: stream `FC_IDEM`, subjects `fc.idem.>`.
    pub fn new(replicas: usize) -> IdemStream {
        IdemStream {
            name: "FC_IDEM".into(),
            subject_prefix: "fc.idem".into(),
            replicas,
        }
    }

    /// How long the servers keep a record.
    pub fn max_age() -> Duration {
        Duration::from_millis(IDEMPOTENCY_TTL_MS) + AGE_MARGIN
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some("flashcore idempotency records that left memory".into()),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            storage: StorageType::File,
            num_replicas: self.replicas,
            allow_direct: false,
            max_messages_per_subject: 1,
            max_bytes: -1,
            max_messages: -1,
            max_age: IdemStream::max_age(),
            discard: DiscardPolicy::Old,
            ..Default::default()
        }
    }
}

/// Creates the store's stream, or binds to it if it exists and fits.
///
/// # Errors
/// `StreamMismatch` when an existing stream has other subjects, storage,
/// replicas, a `max_age` shorter than the TTL and margin, or other limits;
/// `Timeout` or `Nats` when the servers do not answer.
pub async fn ensure_idem_stream(
    context: &Context,
    spec: &IdemStream,
) -> Result<(), ClusterJournalError> {
    let info = ensure_keyed_stream(context, spec.config()).await?;
    let mismatch = |why: String| ClusterJournalError::StreamMismatch {
        stream: spec.name.clone(),
        why,
    };
    if info.max_age < IdemStream::max_age() {
        return Err(mismatch(format!(
            "max_age {:?} would drop records before their TTL",
            info.max_age
        )));
    }
    if info.max_bytes > 0 || info.max_messages > 0 {
        return Err(mismatch("it has limits that would drop records".into()));
    }
    Ok(())
}

/// One partition's spilled records on the store's stream.
#[derive(Clone)]
pub struct JetStreamIdemStore {
    context: Context,
    stream: String,
    /// `{subject_prefix}.{p}`.
    base: String,
    runtime: Handle,
}

impl std::fmt::Debug for JetStreamIdemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamIdemStore")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl JetStreamIdemStore {
    /// The store of `partition` in the stream `spec` (made by
    /// [`ensure_idem_stream`]); calls run on `runtime`, the node's.
    pub fn new(
        context: Context,
        spec: &IdemStream,
        partition: u32,
        runtime: Handle,
    ) -> JetStreamIdemStore {
        JetStreamIdemStore {
            context,
            stream: spec.name.clone(),
            base: format!("{}.{partition}", spec.subject_prefix),
            runtime,
        }
    }

    /// The subject a record is stored under (for tests that damage it).
    pub fn subject(&self, key: &KeyHash) -> String {
        format!("{}.{}", self.base, hex(&key.0))
    }
}

impl IdemStore for JetStreamIdemStore {
    fn put_batch(&self, records: &[HashedRecord]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut messages = Vec::with_capacity(records.len());
        for hashed in records {
            let bytes = codec::encode_idem_record(hashed)
                .map_err(|e| storage("idempotency store: encoding", e))?;
            messages.push((self.subject(&hashed.key), Bytes::from(bytes)));
        }
        let (context, stream) = (self.context.clone(), self.stream.clone());
        blocking::call(
            &self.runtime,
            "idempotency store: writing",
            PUT_BATCH_MS,
            async move { publish_acked(&context, &stream, messages).await },
        )
    }

    fn get(&self, key: &KeyHash) -> Result<Option<IdemRecord>, JournalError> {
        let (context, stream) = (self.context.clone(), self.stream.clone());
        let (subject, key) = (self.subject(key), *key);
        blocking::call(
            &self.runtime,
            "idempotency store: reading",
            API_CALL_MS,
            async move {
                let bytes = last_message(&context, &stream, &subject).await?;
                bytes
                    .map(|b| codec::decode_idem_record(&key, &b))
                    .transpose()
                    .map_err(|e| format!("a damaged record: {e}"))
            },
        )
    }

    fn evict_before(&self, _cutoff_ms: u64) -> Result<usize, JournalError> {
        // The stream's max_age drops records on the servers' clock (see the
        // module doc): nothing is left here to sweep.
        Ok(0)
    }

    /// Lists the partition's subjects (one stream-info call per 100,000):
    /// for tests and tools, never called on a request's path. 0 when the
    /// servers do not answer.
    fn len(&self) -> usize {
        let (context, stream) = (self.context.clone(), self.stream.clone());
        let filter = format!("{}.*", self.base);
        let counted = blocking::call(
            &self.runtime,
            "idempotency store: counting",
            API_CALL_MS,
            async move { subjects(&context, &stream, &filter).await.map(|s| s.len()) },
        );
        counted.unwrap_or_else(|error| {
            tracing::warn!(%error, "could not count the stored idempotency records");
            0
        })
    }
}
