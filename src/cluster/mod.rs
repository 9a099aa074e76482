//! Cluster mode (`serve --cluster`): several nodes over NATS JetStream.
//!
//! A node alone (no `--cluster`) never touches this module: its journal is
//! the sled one in `journal/`. In cluster mode the pieces that a node's disk
//! holds alone move to JetStream, each behind the trait the engine already
//! uses, so the engine does not know which it runs on:
//!
//! - the journal of each partition is a subject of a replicated (R3) stream,
//!   appended with compare-and-set on the subject's last sequence, so a node
//!   that lost its partition can never append to it again (fencing);
//! - which node owns a partition is a lease in a replicated KV bucket,
//!   renewed by revision, expired by the server's clock;
//! - a partition's archive of finished orders and its idempotency records
//!   past the memory budget are keys of two more replicated streams
//!   (`archive.rs`, `idem_store.rs`), so they follow the partition, not a
//!   node's memory or disk.
//!
//! Every call to the servers carries a timeout: a server that does not
//! answer is a failure the caller sees, never a task that waits for ever.

pub mod archive;
mod blocking;
pub mod claims;
pub mod forward;
pub mod idem_store;
pub mod journal;
pub mod layout;
pub mod lease;
pub mod node;
pub mod partition;
pub mod snapshots;
