//! Partition leases: which node owns a partition, and for how long it may
//! believe so.
//!
//! One key per partition (`p{partition}`) in a replicated KV bucket with
//! history 1 and `max_age` = the lease TTL, so the *servers'* clock expires
//! a lease that is not renewed. A node acquires with a create (a write
//! expecting no live value under the key), renews with a write expecting
//! the revision it last wrote (every TTL/3), and releases with a delete
//! marker expecting that revision, so the next owner need not wait a TTL.
//! Every one of these is a compare-and-set decided by the stream leader on a
//! quorum: two nodes can never both get a success for the same revision.
//!
//! **Safety is not here.** A node that was paused, partitioned or slow can
//! still *believe* it owns a partition for a moment after the servers gave
//! it to another; the journal fences that (its appends expect the
//! partition's last sequence). What the lease gives is liveness and a
//! bound on that belief: a holder stops acting as owner once its deadline
//! on the **monotonic** clock has passed, and that deadline is counted from
//! the instant the acquire or renew request was *sent*, before the round
//! trip. The server stamps the write after it was sent, so it keeps the key
//! at least until that stamp + TTL, later than the node's deadline. A
//! SIGSTOPped node does not extend its belief: `Instant` runs on while it
//! is stopped. The deadline is also shortened by [`CLOCK_MARGIN_DIVISOR`]
//! for clock rates that differ between the node and the servers.
//!
//! **The term.** Each acquisition gets a term: the revision (stream
//! sequence) of the write that acquired it. Revisions only grow in a bucket
//! (while it is not deleted and made again), so a later acquisition of any
//! partition has a larger term; the journal
//! may write it into its barrier to tell the owners apart. The acquiring
//! write cannot carry its own revision, so its value says `term: None`
//! ("this entry's revision"); every renewal writes the term explicitly.
//!
//! **Server and crate behaviours this relies on** (nats-server 2.12+,
//! async-nats 0.52):
//! - a refused compare-and-set comes back with code 10071 *or* 10164 (the
//!   latter when contenders race); the crate only recognises 10071, so
//!   `wrong_revision` reads the code itself. The crate also lists 10163
//!   ("expected last sequence per subject not ready", not seen in our
//!   runs): it stays a `Nats` error, which callers retry;
//! - the server refuses a `max_age` under 100 ms (code 10052; [`TTL_MIN`]
//!   is well above) and sets the bucket's duplicate window to it; it
//!   expires a key late, never early: 0.03 to 0.26 s after a 1 s TTL on a
//!   local 3-server cluster (2.15.1), so another node gets a lapsed lease
//!   a little after the TTL, not at it;
//! - `max_age` removes the message outright (no marker: the bucket has no
//!   `limit_markers`), so a create after expiry expects revision 0;
//! - a released key holds a delete marker until it too ages out, so a
//!   create there must expect the marker's revision: it is read from the
//!   stream *leader* (not a direct get, which any replica may answer from a
//!   stale copy and so make every contender believe the key is held);
//! - expiry follows the wall clock of the stream leader against the stamp
//!   the (maybe previous) leader wrote: servers whose clocks disagree by
//!   more than the margin can expire a lease before its holder's deadline.
//!   The journal's fencing keeps that safe; it only costs a failover.
//!
//! Every call to the servers runs under [`CALL_TIMEOUT`] (a renewal under
//! the time left on the lease, if shorter).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// Longest a single call to the servers may take. A quorum write with
/// fsync is milliseconds; this leaves room for a stream leader election
/// after a server dies (a few seconds), and no more: a caller that hears
/// nothing for longer treats the servers as unreachable and retries.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest lease TTL accepted: a renewal every TTL/3 must fit several
/// quorum round trips, and the node's margin (TTL/20) must exceed the
/// scheduling jitter of a loaded machine.
pub const TTL_MIN: Duration = Duration::from_secs(1);

/// Longest lease TTL accepted: a dead node's partitions wait this long for
/// a new owner.
pub const TTL_MAX: Duration = Duration::from_secs(600);

/// Renewals per TTL: with 3, two renewals in a row may fail before the
/// lease lapses.
pub const RENEWS_PER_TTL: u32 = 3;

/// After a failed renewal (timeout, no quorum), the keeper retries after
/// TTL / this, until the deadline: a bounded number of tries, no busy loop.
pub const RETRIES_PER_TTL: u32 = 10;

/// The holder believes itself owner for TTL - TTL / this after sending: 5%
/// of slack for clock rates that differ between node and servers.
pub const CLOCK_MARGIN_DIVISOR: u32 = 20;

/// Longest node id, in bytes (it is stored in every lease value).
pub const NODE_ID_BYTES_MAX: usize = 64;

/// At most this many keys are listed by [`Leases::owners`]: far more
/// partitions than a cluster has.
pub const OWNERS_MAX: usize = 4096;

/// Attempts in one [`Leases::acquire`]: the key may expire, or its marker
/// change, between the failed create and the read that explains it.
const ACQUIRE_STEPS_MAX: usize = 3;

const KV_OPERATION: &str = "KV-Operation";
const NATS_MARKER_REASON: &str = "Nats-Marker-Reason";

/// What a lease call was doing when it failed (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Creating or binding the bucket.
    Open,
    /// Creating a partition's key.
    Acquire,
    /// Writing the key again at the held revision.
    Renew,
    /// Deleting the key at the held revision.
    Release,
    /// Listing the keys and their values.
    Owners,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Open => "open the lease bucket",
            Op::Acquire => "acquire a lease",
            Op::Renew => "renew a lease",
            Op::Release => "release a lease",
            Op::Owners => "list the lease owners",
        })
    }
}

/// Why a lease call failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The lease is no longer ours: another write took the key (revision
    /// mismatch) or its deadline passed. Stop acting as owner.
    #[error("the lease on partition {partition} is lost")]
    Lost {
        /// The partition.
        partition: u32,
    },
    /// The servers did not answer in time; the lease may or may not have
    /// been written.
    #[error("{op}: no answer within {after_ms} ms")]
    Timeout {
        /// The call.
        op: Op,
        /// How long it waited.
        after_ms: u64,
    },
    /// The servers or the client refused the call.
    #[error("{op}: {source}")]
    Nats {
        /// The call.
        op: Op,
        /// What async-nats said.
        #[source]
        source: async_nats::Error,
    },
    /// The bucket exists with another TTL: nodes must agree on it.
    #[error(
        "lease bucket {bucket} exists with a TTL of {existing_ms} ms, this node wants {wanted_ms} ms"
    )]
    TtlMismatch {
        /// The bucket.
        bucket: String,
        /// Its `max_age`.
        existing_ms: u64,
        /// The TTL asked for.
        wanted_ms: u64,
    },
    /// The TTL asked for is outside [`TTL_MIN`]..=[`TTL_MAX`].
    #[error("lease TTL {ttl_ms} ms is outside {min_ms}..={max_ms} ms")]
    TtlOutOfRange {
        /// The TTL asked for.
        ttl_ms: u64,
        /// [`TTL_MIN`].
        min_ms: u64,
        /// [`TTL_MAX`].
        max_ms: u64,
    },
    /// The node id is empty, too long, or not `[A-Za-z0-9_-]`.
    #[error("node id must be 1..={NODE_ID_BYTES_MAX} bytes of [A-Za-z0-9_-]")]
    BadNodeId,
    /// A value in the bucket is not a lease value.
    #[error("the lease value under {key} does not decode: {source}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
}

/// What a key holds.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct LeaseValue {
    node: String,
    /// `None` in the acquiring write: the term is that entry's revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    term: Option<u64>,
    /// The holder's wall clock when it acquired (for display only).
    acquired_unix_ms: u64,
}

/// A lease this node holds. Not `Clone`: it is the one token of ownership.
///
/// Invariant: `revision >= term`, and `deadline` never moves back.
#[derive(Debug)]
pub struct Held {
    partition: u32,
    /// The revision of the acquiring write.
    term: u64,
    /// The revision of our last successful write to the key.
    revision: u64,
    /// Until when we may act as owner (monotonic).
    deadline: Instant,
    acquired_unix_ms: u64,
}

impl Held {
    /// The partition held.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The term of this acquisition: larger than that of every earlier
    /// acquisition in the bucket.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// The revision of the last write to the key that was ours.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Until when this node may act as owner.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Whether the deadline is still ahead.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// The time left before the deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

/// A partition's current holder, as the bucket shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The partition.
    pub partition: u32,
    /// The node holding it.
    pub node: String,
    /// The term of its acquisition.
    pub term: u64,
    /// Since the holder acquired it (its wall clock against ours).
    pub held_for: Duration,
    /// Since the last renewal (the server's stamp against our wall clock).
    pub renewed_ago: Duration,
}

/// The lease bucket, seen by one node.
#[derive(Debug)]
pub struct Leases {
    store: kv::Store,
    node: String,
    ttl: Duration,
}

impl Leases {
    /// Creates the bucket (history 1, `max_age` = `ttl`, `replicas`
    /// copies on file storage) or binds it if it exists with the same TTL.
    ///
    /// # Errors
    ///
    /// [`LeaseError::TtlMismatch`] if it exists with another TTL;
    /// [`LeaseError::TtlOutOfRange`], [`LeaseError::BadNodeId`] for bad
    /// arguments; `Timeout` or `Nats` if the servers fail.
    pub async fn open(
        js: &jetstream::Context,
        bucket: &str,
        node: &str,
        ttl: Duration,
        replicas: usize,
    ) -> Result<Leases, LeaseError> {
        if !(TTL_MIN..=TTL_MAX).contains(&ttl) {
            return Err(LeaseError::TtlOutOfRange {
                ttl_ms: millis(ttl),
                min_ms: millis(TTL_MIN),
                max_ms: millis(TTL_MAX),
            });
        }
        let node_ok = !node.is_empty()
            && node.len() <= NODE_ID_BYTES_MAX
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !node_ok {
            return Err(LeaseError::BadNodeId);
        }
        let config = kv::Config {
            bucket: bucket.to_string(),
            description: "flashcore partition leases".to_string(),
            history: 1,
            max_age: ttl,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let created = timed(Op::Open, CALL_TIMEOUT, js.create_key_value(config)).await?;
        let store = match created {
            Ok(store) => store,
            Err(create_error) => {
                // Most likely it exists with another configuration: say
                // which TTL it has if that is the difference.
                let bound = timed(Op::Open, CALL_TIMEOUT, js.get_key_value(bucket)).await?;
                if let Ok(store) = bound {
                    check_ttl(&store, ttl)?;
                }
                return Err(nats(Op::Open, create_error));
            }
        };
        check_ttl(&store, ttl)?;
        Ok(Leases {
            store,
            node: node.to_string(),
            ttl,
        })
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease TTL (the bucket's `max_age`).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long after sending a write its holder may believe in it.
    fn belief(&self) -> Duration {
        self.ttl - self.ttl / CLOCK_MARGIN_DIVISOR
    }

    /// Takes `partition` if no one holds it.
    ///
    /// Returns `Ok(None)` if another node (or an earlier call of ours whose
    /// answer was lost) holds it.
    ///
    /// # Errors
    ///
    /// `Timeout` or `Nats` if the servers fail; the key may then be ours
    /// without our knowing, and expires after a TTL.
    pub async fn acquire(&self, partition: u32) -> Result<Option<Held>, LeaseError> {
        let key = key(partition);
        let acquired_unix_ms = unix_ms();
        let value = encode(&LeaseValue {
            node: self.node.clone(),
            term: None,
            acquired_unix_ms,
        });
        let mut expected = 0;
        for _ in 0..ACQUIRE_STEPS_MAX {
            let sent = Instant::now();
            let write = self.store.update(&key, value.clone().into(), expected);
            match timed(Op::Acquire, CALL_TIMEOUT, write).await? {
                Ok(revision) => {
                    assert!(
                        revision > expected,
                        "a write's revision follows the one it replaced"
                    );
                    return Ok(Some(Held {
                        partition,
                        term: revision,
                        revision,
                        deadline: sent + self.belief(),
                        acquired_unix_ms,
                    }));
                }
                Err(e) if wrong_revision(&e) => {}
                Err(e) => return Err(nats(Op::Acquire, e)),
            }
            // The key holds something: a live lease, or a delete marker
            // (released), or nothing any more (expired meanwhile).
            match self.last(Op::Acquire, &key).await? {
                Last::Missing => expected = 0,
                Last::Marker { revision } => expected = revision,
                Last::Value { .. } => return Ok(None),
            }
        }
        // The key changed under us at every step: someone else is at it.
        Ok(None)
    }

    /// Writes the key again at the held revision, moving the deadline to
    /// TTL (less the margin) after this call was sent.
    ///
    /// If the revision differs but the key holds our own node and term,
    /// an earlier renewal of ours whose answer was lost did land: the
    /// revision is adopted and the write tried once more.
    ///
    /// # Errors
    ///
    /// [`LeaseError::Lost`] if the deadline had passed (no call is made) or
    /// the key is no longer ours; the `Held` then stays invalid. `Timeout`
    /// or `Nats` if the servers fail: the lease may still be renewed before
    /// its deadline.
    pub async fn renew(&self, held: &mut Held) -> Result<(), LeaseError> {
        let lost = LeaseError::Lost {
            partition: held.partition,
        };
        if !held.is_valid() {
            return Err(lost);
        }
        let key = key(held.partition);
        let value = encode(&LeaseValue {
            node: self.node.clone(),
            term: Some(held.term),
            acquired_unix_ms: held.acquired_unix_ms,
        });
        let mut adopted = false;
        loop {
            let sent = Instant::now();
            let limit = CALL_TIMEOUT.min(held.remaining());
            let write = self.store.update(&key, value.clone().into(), held.revision);
            match timed(Op::Renew, limit, write).await? {
                Ok(revision) => {
                    assert!(
                        revision > held.revision,
                        "a renewal follows the held revision"
                    );
                    let deadline = sent + self.belief();
                    assert!(deadline >= held.deadline, "the deadline never moves back");
                    held.revision = revision;
                    held.deadline = deadline;
                    return Ok(());
                }
                Err(e) if wrong_revision(&e) => {}
                Err(e) => return Err(nats(Op::Renew, e)),
            }
            if adopted {
                held.deadline = Instant::now().min(held.deadline);
                return Err(lost);
            }
            match self.last(Op::Renew, &key).await? {
                Last::Value {
                    revision, value, ..
                } if revision > held.revision
                    && value.node == self.node
                    && value.term == Some(held.term) =>
                {
                    held.revision = revision;
                    adopted = true;
                }
                _ => {
                    held.deadline = Instant::now().min(held.deadline);
                    return Err(lost);
                }
            }
            if !held.is_valid() {
                return Err(lost);
            }
        }
    }

    /// Deletes the key if it still holds our revision, so another node can
    /// acquire at once. A key that is no longer ours is left alone
    /// (`Ok`): there is nothing to release.
    ///
    /// # Errors
    ///
    /// `Timeout` or `Nats` if the servers fail: the lease then expires
    /// after its TTL.
    pub async fn release(&self, held: Held) -> Result<(), LeaseError> {
        let key = key(held.partition);
        let delete = self.store.delete_expect_revision(&key, Some(held.revision));
        match timed(Op::Release, CALL_TIMEOUT, delete).await? {
            Ok(()) => Ok(()),
            Err(e) if wrong_revision(&e) => Ok(()),
            Err(e) => Err(nats(Op::Release, e)),
        }
    }

    /// Every partition with a live lease, by partition (for `GET
    /// /v1/cluster`). At most [`OWNERS_MAX`] keys are looked at; keys that
    /// are not `p{number}` are skipped.
    ///
    /// # Errors
    ///
    /// `Timeout` or `Nats` if the servers fail; `Corrupt` if a value is not
    /// a lease.
    pub async fn owners(&self) -> Result<Vec<Owner>, LeaseError> {
        let keys = timed(Op::Owners, CALL_TIMEOUT, self.keys()).await??;
        let mut owners = Vec::with_capacity(keys.len());
        for (partition, key) in keys {
            let Last::Value {
                revision,
                value,
                stamp_ms,
            } = self.last(Op::Owners, &key).await?
            else {
                continue;
            };
            let now_ms = unix_ms();
            owners.push(Owner {
                partition,
                node: value.node,
                term: value.term.unwrap_or(revision),
                held_for: Duration::from_millis(now_ms.saturating_sub(value.acquired_unix_ms)),
                renewed_ago: Duration::from_millis(now_ms.saturating_sub(stamp_ms)),
            });
        }
        owners.sort_by_key(|o| o.partition);
        Ok(owners)
    }

    /// The partitions' keys in the bucket, at most [`OWNERS_MAX`].
    async fn keys(&self) -> Result<Vec<(u32, String)>, LeaseError> {
        use futures_util::StreamExt;

        let mut keys = self.store.keys().await.map_err(|e| nats(Op::Owners, e))?;
        let mut found = Vec::new();
        while found.len() < OWNERS_MAX {
            let Some(key) = keys.next().await else {
                break;
            };
            let key = key.map_err(|e| nats(Op::Owners, e))?;
            if let Some(partition) = key.strip_prefix('p').and_then(|n| n.parse::<u32>().ok()) {
                found.push((partition, key));
            }
        }
        Ok(found)
    }

    /// The last message under `key`, read from the stream leader.
    async fn last(&self, op: Op, key: &str) -> Result<Last, LeaseError> {
        let subject = format!("{}{key}", self.store.prefix);
        let read = self.store.stream.get_last_raw_message_by_subject(&subject);
        let message = match timed(op, CALL_TIMEOUT, read).await? {
            Ok(message) => message,
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(Last::Missing);
            }
            Err(e) => return Err(nats(op, e)),
        };
        let marker = message.headers.get(KV_OPERATION).is_some()
            || message.headers.get(NATS_MARKER_REASON).is_some();
        if marker {
            return Ok(Last::Marker {
                revision: message.sequence,
            });
        }
        let value =
            serde_json::from_slice(&message.payload).map_err(|source| LeaseError::Corrupt {
                key: key.to_string(),
                source,
            })?;
        let stamp_ms = u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        Ok(Last::Value {
            revision: message.sequence,
            value,
            stamp_ms,
        })
    }

    /// Spawns a task that renews `held` every TTL/3 until it is lost or
    /// released; see [`LeaseKeeper`].
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime (it spawns a task).
    pub fn keep(self: Arc<Leases>, held: Held) -> LeaseKeeper {
        let (valid_tx, valid_rx) = watch::channel(held.is_valid());
        let (stop_tx, stop_rx) = oneshot::channel();
        let deadline = Arc::new(Mutex::new(held.deadline));
        let partition = held.partition;
        let term = held.term;
        let task = tokio::spawn(keep_renewing(
            Arc::clone(&self),
            held,
            valid_tx,
            Arc::clone(&deadline),
            stop_rx,
        ));
        LeaseKeeper {
            leases: self,
            partition,
            term,
            valid: valid_rx,
            deadline,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }
}

/// What a key's last message is.
enum Last {
    /// Nothing: never written, or expired.
    Missing,
    /// A delete or purge marker (released).
    Marker { revision: u64 },
    /// A lease value (held, unless its holder's deadline passed), and the
    /// server's stamp on it in Unix ms.
    Value {
        revision: u64,
        value: LeaseValue,
        stamp_ms: u64,
    },
}

/// A held lease renewed by a task of its own.
///
/// [`LeaseKeeper::is_valid`] and the [`watch`] from
/// [`LeaseKeeper::valid`] turn false the moment the lease is lost or its
/// deadline passes without a successful renewal (a timer, not only a
/// failed call), and never turn true again: a node that lost a partition
/// acquires it anew, with a new term. Dropping the keeper stops the task
/// without releasing (the lease then expires); [`LeaseKeeper::release`]
/// stops it and releases.
#[derive(Debug)]
pub struct LeaseKeeper {
    leases: Arc<Leases>,
    partition: u32,
    term: u64,
    valid: watch::Receiver<bool>,
    /// The held lease's deadline, shared so `is_valid` needs no task.
    deadline: Arc<Mutex<Instant>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Held>>,
}

impl LeaseKeeper {
    /// The partition held.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// The term of the acquisition.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Whether this node may still act as owner: not lost, deadline ahead.
    pub fn is_valid(&self) -> bool {
        let deadline = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        *self.valid.borrow() && Instant::now() < deadline
    }

    /// A receiver that turns false when the lease is lost.
    pub fn valid(&self) -> watch::Receiver<bool> {
        self.valid.clone()
    }

    /// Stops renewing and releases the key if it is still ours.
    ///
    /// # Errors
    ///
    /// As [`Leases::release`]; [`LeaseError::Lost`] if the task is gone.
    pub async fn release(mut self) -> Result<(), LeaseError> {
        if let Some(stop) = self.stop.take() {
            // An Err means the task already ended; it is joined below.
            let _ = stop.send(());
        }
        let Some(task) = self.task.take() else {
            return Err(LeaseError::Lost {
                partition: self.partition,
            });
        };
        match task.await {
            Ok(held) => self.leases.release(held).await,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(LeaseError::Lost {
                partition: self.partition,
            }),
        }
    }
}

/// The keeper's task: renew every TTL/3; on a failure retry every
/// TTL/10 until the deadline; stop on loss, deadline or request. Returns
/// the `Held` so it can be released.
async fn keep_renewing(
    leases: Arc<Leases>,
    mut held: Held,
    valid: watch::Sender<bool>,
    shared_deadline: Arc<Mutex<Instant>>,
    mut stop: oneshot::Receiver<()>,
) -> Held {
    let every = leases.ttl / RENEWS_PER_TTL;
    let retry = leases.ttl / RETRIES_PER_TTL;
    // The first renewal is due TTL/3 after the acquiring write was sent.
    let mut next = held
        .deadline
        .checked_sub(leases.belief())
        .map_or_else(Instant::now, |sent| sent + every);
    loop {
        let deadline = tokio::time::Instant::from_std(held.deadline);
        tokio::select! {
            biased;
            _ = &mut stop => break,
            () = tokio::time::sleep_until(deadline) => break,
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {}
        }
        let outcome = tokio::select! {
            biased;
            () = tokio::time::sleep_until(deadline) => break,
            outcome = leases.renew(&mut held) => outcome,
        };
        match outcome {
            Ok(()) => {
                *shared_deadline.lock().unwrap_or_else(|p| p.into_inner()) = held.deadline;
                next = Instant::now() + every;
            }
            Err(LeaseError::Lost { .. }) => break,
            Err(e) => {
                tracing::warn!(partition = held.partition, error = %e, "lease renewal failed; retrying");
                next = (Instant::now() + retry).min(held.deadline);
            }
        }
    }
    // Whatever ended the loop, this node no longer renews: it is not owner.
    valid.send_replace(false);
    held
}

/// [`LeaseError::TtlMismatch`] unless the bucket's `max_age` is `ttl`.
fn check_ttl(store: &kv::Store, ttl: Duration) -> Result<(), LeaseError> {
    let existing = store.stream.cached_info().config.max_age;
    if existing == ttl {
        return Ok(());
    }
    Err(LeaseError::TtlMismatch {
        bucket: store.name.clone(),
        existing_ms: millis(existing),
        wanted_ms: millis(ttl),
    })
}

/// Whether a write failed because the key's revision was not the one
/// expected. async-nats 0.52 maps only the server's code 10071 to
/// `WrongLastRevision`; nats-server 2.12+ also answers 10164 (the same
/// refusal, "wrong last sequence" without the number: seen when contenders
/// race), which the crate reports as `Other`. So the code is looked for in
/// the error's sources too.
fn wrong_revision(error: &kv::UpdateError) -> bool {
    use jetstream::ErrorCode;

    error.kind() == kv::UpdateErrorKind::WrongLastRevision
        || matches!(
            jetstream_code(error),
            Some(
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            )
        )
}

/// The JetStream API error code in `error`'s source chain, if any.
fn jetstream_code(error: &(dyn std::error::Error + 'static)) -> Option<jetstream::ErrorCode> {
    // async-nats wraps at most a few levels deep (kv -> publish -> API).
    const SOURCES_MAX: usize = 8;
    let mut next = Some(error);
    for _ in 0..SOURCES_MAX {
        let current = next?;
        if let Some(api) = current.downcast_ref::<jetstream::Error>() {
            return Some(api.error_code());
        }
        next = current.source();
    }
    None
}

fn key(partition: u32) -> String {
    format!("p{partition}")
}

/// The value as JSON, as the `Bytes` that async-nats takes (`.into()`).
fn encode(value: &LeaseValue) -> Vec<u8> {
    serde_json::to_vec(value).expect("a string and two integers serialise")
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn nats(op: Op, e: impl std::error::Error + Send + Sync + 'static) -> LeaseError {
    LeaseError::Nats {
        op,
        source: Box::new(e),
    }
}

/// Runs `call` for at most `limit`.
async fn timed<T>(
    op: Op,
    limit: Duration,
    call: impl std::future::Future<Output = T>,
) -> Result<T, LeaseError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| LeaseError::Timeout {
            op,
            after_ms: millis(limit),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_round_trips_and_the_acquiring_one_has_no_term() {
        let value = LeaseValue {
            node: "n1".into(),
            term: None,
            acquired_unix_ms: 7,
        };
        let bytes = encode(&value);
        assert_eq!(&bytes[..], br#"{"node":"n1","acquired_unix_ms":7}"#);
        let back: LeaseValue = serde_json::from_slice(&bytes).expect("decodes");
        assert_eq!(back, value);
    }

    #[test]
    fn the_belief_is_shorter_than_the_ttl_and_renewals_fit() {
        const { assert!(RENEWS_PER_TTL >= 2 && RETRIES_PER_TTL > RENEWS_PER_TTL) };
        let margin = TTL_MIN / CLOCK_MARGIN_DIVISOR;
        assert!(margin > Duration::ZERO);
        assert!(TTL_MIN / RENEWS_PER_TTL < TTL_MIN - margin);
    }
}
