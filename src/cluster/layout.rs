//! Where things live in a cluster: how many partitions there are, and which
//! partition a SKU or a user belongs to.
//!
//! The partition count `P` is fixed when the cluster is created: every
//! partition's journal, snapshots and lease are named by its number, and a
//! SKU's partition is its hash modulo `P`, so a node that counted
//! differently would look for a SKU's stock in the wrong journal. The first
//! node to start writes `P` into the cluster's KV bucket with `create`;
//! every later node reads it and refuses to start with another `P`.
//!
//! The hash is CRC-32C of the id's bytes: fixed by its specification, so it
//! never changes with a library version or a platform (a `std` hasher is
//! allowed to), and already in the tree for the journal's checksums.

use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::domain::{SkuId, UserId};

/// Partitions unless `--partitions` says otherwise: a few per core of a
/// small cluster, so that partitions spread evenly over 3 to 16 nodes.
pub const PARTITIONS_DEFAULT: u32 = 64;

/// Most partitions: each is a journal subject, a lease and a snapshot
/// series, and a node reads every lease a few times a TTL.
pub const PARTITIONS_MAX: u32 = 4_096;

/// How long a call to the servers may take here.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The key in the cluster bucket holding `P`.
const PARTITIONS_KEY: &str = "partitions";

/// The partition a SKU's stock lives in.
pub fn partition_of_sku(sku: &SkuId, partitions: u32) -> u32 {
    crc32c::crc32c(sku.as_str().as_bytes()) % partitions.max(1)
}

/// A user's home partition (their cart, and orders with lines in several
/// partitions).
pub fn home_of_user(user: &UserId, partitions: u32) -> u32 {
    crc32c::crc32c(user.as_str().as_bytes()) % partitions.max(1)
}

/// Where a node starts looking for free partitions: nodes starting
/// together reach for different ones instead of racing for the same.
pub fn home_of_node(node: &str, partitions: u32) -> u32 {
    crc32c::crc32c(node.as_bytes()) % partitions.max(1)
}

/// Why the partition count could not be settled.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The count asked for is out of range.
    #[error("--partitions must be 1..={PARTITIONS_MAX}, not {0}")]
    OutOfRange(u32),
    /// The cluster was created with another count.
    #[error(
        "this cluster has {existing} partitions, fixed when it was created; \
         this node was started with {asked}: start it with --partitions {existing}"
    )]
    Mismatch {
        /// The cluster's count.
        existing: u32,
        /// This node's.
        asked: u32,
    },
    /// What the bucket holds is not a count.
    #[error("the cluster bucket's partition count is unreadable: {0:?}")]
    Unreadable(String),
    /// The servers refused or did not answer.
    #[error("settling the partition count: {0}")]
    Nats(#[source] async_nats::Error),
}

/// Settles the cluster's partition count in `bucket`: the first node writes
/// `asked`; every later one must have asked for the same.
///
/// # Errors
/// [`LayoutError`]: a count out of range, another count already fixed, or
/// servers that refuse or do not answer.
pub async fn settle_partitions(bucket: &kv::Store, asked: u32) -> Result<u32, LayoutError> {
    if asked == 0 || asked > PARTITIONS_MAX {
        return Err(LayoutError::OutOfRange(asked));
    }
    let timed = |what: &'static str| {
        move |_| {
            LayoutError::Nats(format!("{what}: no answer in {} s", CALL_TIMEOUT.as_secs()).into())
        }
    };
    let created = tokio::time::timeout(
        CALL_TIMEOUT,
        bucket.create(PARTITIONS_KEY, asked.to_string().into()),
    )
    .await
    .map_err(timed("writing the partition count"))?;
    if created.is_ok() {
        return Ok(asked);
    }
    let existing = tokio::time::timeout(CALL_TIMEOUT, bucket.get(PARTITIONS_KEY))
        .await
        .map_err(timed("reading the partition count"))?
        .map_err(|e| LayoutError::Nats(e.into()))?
        .ok_or_else(|| LayoutError::Unreadable("no value".into()))?;
    let text = String::from_utf8_lossy(&existing);
    let existing: u32 = text
        .parse()
        .map_err(|_| LayoutError::Unreadable(text.to_string()))?;
    if existing != asked {
        return Err(LayoutError::Mismatch { existing, asked });
    }
    Ok(existing)
}

/// Creates or binds the cluster's small KV bucket (its settings), with
/// `replicas` copies.
///
/// # Errors
/// `Nats` when the servers refuse or do not answer.
pub async fn cluster_bucket(
    context: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<kv::Store, LayoutError> {
    kv_bucket(
        context,
        kv::Config {
            bucket: name.to_string(),
            history: 1,
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        },
    )
    .await
}

/// Binds the KV bucket `config` names, or creates it with `config` when it
/// does not exist, within [`CALL_TIMEOUT`]: every bucket of the cluster
/// (settings, promotions, live nodes, key claims) opens this way.
///
/// # Errors
/// `Nats` when the servers refuse or do not answer.
pub async fn kv_bucket(
    context: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, LayoutError> {
    let name = config.bucket.clone();
    let open = async {
        match context.get_key_value(&name).await {
            Ok(store) => Ok(store),
            Err(_) => context
                .create_key_value(config)
                .await
                .map_err(|e| LayoutError::Nats(e.into())),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, open)
        .await
        .map_err(|_| {
            LayoutError::Nats(format!("opening the {name} bucket: no answer in time").into())
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        let sku = SkuId::parse("hoodie-black-m").expect("valid");
        // Fixed by CRC-32C's specification: a change here moves every SKU.
        assert_eq!(
            partition_of_sku(&sku, 64),
            crc32c::crc32c(b"hoodie-black-m") % 64
        );
        assert_eq!(partition_of_sku(&sku, 1), 0);
        let mut counts = [0u32; 8];
        for i in 0..8_000 {
            let sku = SkuId::parse(&format!("sku-{i}")).expect("valid");
            counts[partition_of_sku(&sku, 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&n| (800..1_200).contains(&n)),
            "{counts:?}"
        );
    }
}
