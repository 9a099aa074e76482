//! Idempotency keys across partitions: which partition a key's change
//! went to.
//!
//! On a node alone, a key's record lives in the one journal, in the same
//! record as its change. In a cluster, a request goes to the partition of
//! what it names, so a retry with the same body meets its record there;
//! but the same key with another body may name another partition, whose
//! book has never heard of the key. So the node that receives a keyed
//! change first *claims* the key for the partition it goes to: a create in
//! an R3 KV bucket (`fc_claims`, one key per user and key, kept for the
//! keys' 24 hours), which a quorum decides, so two nodes can never both
//! believe they hold a fresh claim.
//!
//! - No claim yet: the create wins, the request goes to its partition.
//! - A claim for the same partition: go there; its book answers (the first
//!   answer again, `422` for another body, or a fresh decision).
//! - A claim for another partition: ask that partition whether it holds a
//!   record for the key. It does: `422 idempotency_conflict`. It does not
//!   (the first request was refused, and refusals record nothing): the
//!   claim moves to this request's partition (an update expecting the
//!   revision read) and the request is decided afresh.
//!
//! What this leaves open: two *first* requests with different bodies sent
//! at the same moment through two nodes, the second asking the first's
//! partition before its change is journaled, may both change. A client
//! retries a key with the body it first sent; one that races two bodies
//! under one key gets what a node alone would give only if the two meet
//! at one partition.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use sha2::{Digest, Sha256};

use crate::domain::{IdempotencyKey, UserId};
use crate::limits::IDEMPOTENCY_TTL_MS;

/// The bucket of claims.
pub const CLAIMS_BUCKET: &str = "fc_claims";

/// Longest a claim call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Attempts at settling a claim that another node changes meanwhile.
const CLAIM_ATTEMPTS_MAX: usize = 3;

/// The claim's bucket key for `user`'s `key`: SHA-256 of both, 128 bits in
/// hex (the ids themselves may hold characters a KV key may not).
pub fn claim_key(user: &UserId, key: &IdempotencyKey) -> String {
    let mut hash = Sha256::new();
    hash.update(user.as_str().as_bytes());
    hash.update([0]);
    hash.update(key.as_str().as_bytes());
    let digest = hash.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Where a keyed request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// To its partition.
    Go,
    /// Nowhere: the key holds another request's change.
    Conflict,
}

/// Whether a partition holds a record for a key (the owner's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// A change was recorded under the key.
    Record,
    /// Nothing was.
    Free,
}

/// Creates or binds the claims bucket.
///
/// # Errors
/// When the servers refuse or do not answer.
pub async fn open_bucket(
    context: &jetstream::Context,
    replicas: usize,
) -> Result<kv::Store, String> {
    let config = kv::Config {
        bucket: CLAIMS_BUCKET.to_string(),
        description: "flashcore idempotency key claims".to_string(),
        history: 1,
        // Past the keys' own 24 hours (with a margin): a claim outlives the
        // record it points to, never the reverse.
        max_age: Duration::from_millis(IDEMPOTENCY_TTL_MS.saturating_mul(2)),
        num_replicas: replicas,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    crate::cluster::layout::kv_bucket(context, config)
        .await
        .map_err(|e| e.to_string())
}

/// Settles `key`'s claim for `partition` (see the module doc); `probe`
/// asks a partition whether it holds a record for the key.
///
/// # Errors
/// When the bucket or the probed partition does not answer.
pub async fn claim<F, Fut>(
    bucket: &kv::Store,
    key: &str,
    partition: u32,
    probe: F,
) -> Result<Claimed, String>
where
    F: Fn(u32) -> Fut,
    Fut: std::future::Future<Output = Result<Held, String>>,
{
    let value = bytes::Bytes::from(partition.to_string());
    for _ in 0..CLAIM_ATTEMPTS_MAX {
        let created = timed(bucket.create(key, value.clone())).await?;
        match created {
            Ok(_) => return Ok(Claimed::Go),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("claiming an idempotency key: {e}")),
        }
        // Read from the stream's leader: a direct get may come from a
        // replica that has not seen the claim yet.
        let subject = format!("{}{key}", bucket.prefix);
        let last = timed(bucket.stream.get_last_raw_message_by_subject(&subject)).await?;
        let message = match last {
            Ok(message) => message,
            // Gone between the create and the read (aged out): again.
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                continue;
            }
            Err(e) => return Err(format!("reading an idempotency key's claim: {e}")),
        };
        let holder = std::str::from_utf8(&message.payload)
            .ok()
            .and_then(|s| s.parse::<u32>().ok());
        if holder == Some(partition) {
            return Ok(Claimed::Go);
        }
        if let Some(holder) = holder
            && probe(holder).await? == Held::Record
        {
            return Ok(Claimed::Conflict);
        }
        // No change behind the claim (or a claim that does not parse):
        // it moves here, if nobody moved it meanwhile.
        // A refused update (someone moved it first: the server answers
        // 10071 or 10164, the crate names only the first) reads again.
        let moved = timed(bucket.update(key, value.clone(), message.sequence)).await?;
        if moved.is_ok() {
            return Ok(Claimed::Go);
        }
    }
    Err("an idempotency key's claim kept changing; retry".into())
}

async fn timed<T>(call: impl std::future::Future<Output = T>) -> Result<T, String> {
    tokio::time::timeout(CALL_TIMEOUT, call)
        .await
        .map_err(|_| "the claims bucket did not answer in time".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_keys_are_fixed_width_hex_and_tell_users_apart() {
        let key = IdempotencyKey::parse("k-1").expect("valid");
        let a = claim_key(&UserId::parse("ann").expect("valid"), &key);
        let b = claim_key(&UserId::parse("bob").expect("valid"), &key);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
