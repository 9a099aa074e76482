//! A partition's snapshots in a JetStream object store, so that whichever
//! node takes the partition over loads the newest one (a node's own disk
//! would hold it only for the node that wrote it).
//!
//! One replicated bucket holds the snapshots of every partition, named
//! `p{partition}/snapshot-{seq}` (numbers zero-padded, so names sort as
//! numbers). The object store publishes an object's chunks first and its
//! metadata last, and an object is listed and readable only once its
//! metadata landed: a snapshot interrupted by a crash or a failed `fill` is
//! never seen (its chunks stay as garbage until the bucket is purged). The
//! snapshot format's own length and CRC trailer (`codec.rs`) is checked on
//! load as for a file, so a short or damaged object is refused too.
//!
//! [`SnapshotStore`] is synchronous (the snapshotter runs on a thread of its
//! own, recovery on a blocking one), so each call runs on the given tokio
//! runtime with `Handle::block_on`, under a timeout. Never call it from a
//! runtime's worker thread.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::runtime::Handle;

use crate::journal::codec::SNAPSHOT_BYTES_MAX;
use crate::journal::{Seq, SnapshotError, SnapshotStore};

/// How long listing, reading or removing a snapshot may take: a quorum
/// that does not answer in this time is a failure the snapshotter reports
/// (it tries again at the next snapshot), not a thread stuck for ever.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long writing one snapshot may take. A partition's snapshot is a
/// 64th of a node's state; at 450,000 live orders a node's whole snapshot
/// is about 50 MB, so even a slow quorum (a few MB/s) fits.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(600);

/// Bytes handed from the encoding thread to the upload at a time, and
/// chunks that may wait between the two: about 4 MiB in flight at most.
const PIPE_CHUNK_BYTES: usize = 256 << 10;
const PIPE_CHUNKS_MAX: usize = 16;

/// The object store's chunk size: fewer, larger messages than the default
/// 128 KiB, still far below a server's default 1 MiB max payload.
const OBJECT_CHUNK_BYTES: usize = 512 << 10;

/// Snapshots of one partition in a replicated object store bucket.
#[derive(Clone)]
pub struct ObjectSnapshots {
    store: object_store::ObjectStore,
    partition: u32,
    runtime: Handle,
}

impl std::fmt::Debug for ObjectSnapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectSnapshots")
            .field("partition", &self.partition)
            .finish_non_exhaustive()
    }
}

/// Why the snapshot bucket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The server refused or did not answer.
    #[error("opening the snapshot bucket {bucket}: {source}")]
    Nats {
        /// The bucket's name.
        bucket: String,
        /// The server's answer.
        #[source]
        source: async_nats::Error,
    },
    /// No answer within [`CALL_TIMEOUT`].
    #[error("opening the snapshot bucket {0}: no answer in time")]
    Timeout(String),
}

/// Creates the bucket (or binds it if it exists) with `replicas` copies.
///
/// # Errors
/// [`OpenError`] when the servers refuse or do not answer.
pub async fn open_bucket(
    context: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<object_store::ObjectStore, OpenError> {
    let nats = |source: async_nats::Error| OpenError::Nats {
        bucket: bucket.to_string(),
        source,
    };
    let open = async {
        match context.get_object_store(bucket).await {
            Ok(store) => Ok(store),
            Err(_) => context
                .create_object_store(object_store::Config {
                    bucket: bucket.to_string(),
                    description: Some("flashcore partition snapshots".into()),
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats(e.into())),
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, open)
        .await
        .map_err(|_| OpenError::Timeout(bucket.to_string()))?
}

impl ObjectSnapshots {
    /// The snapshots of `partition` in `store`; calls run on `runtime`.
    pub fn new(store: object_store::ObjectStore, partition: u32, runtime: Handle) -> Self {
        ObjectSnapshots {
            store,
            partition,
            runtime,
        }
    }

    fn prefix(&self) -> String {
        format!("p{:05}/snapshot-", self.partition)
    }

    fn name(&self, seq: Seq) -> String {
        format!("{}{seq:020}", self.prefix())
    }

    fn call<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
        &self,
        what: &'static str,
        future: impl Future<Output = Result<T, E>>,
    ) -> Result<T, SnapshotError> {
        match self
            .runtime
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, future).await })
        {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(SnapshotError::remote(what, e)),
            Err(elapsed) => Err(SnapshotError::remote(what, elapsed)),
        }
    }
}

impl SnapshotStore for ObjectSnapshots {
    fn list(&self) -> Result<Vec<Seq>, SnapshotError> {
        let prefix = self.prefix();
        let store = self.store.clone();
        let names = self.call("listing snapshots", async move {
            let mut names = Vec::new();
            let mut list = store.list().await?;
            while let Some(info) = list.next().await {
                names.push(info?.name);
            }
            Ok::<_, async_nats::Error>(names)
        })?;
        let mut seqs: Vec<Seq> = names
            .iter()
            .filter_map(|name| name.strip_prefix(&prefix)?.parse().ok())
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    }

    fn read(&self, seq: Seq) -> Result<Vec<u8>, SnapshotError> {
        let name = self.name(seq);
        let store = self.store.clone();
        self.call("reading a snapshot", async move {
            let object = store.get(&name).await?;
            let mut bytes = Vec::new();
            // One byte past the bound, to tell "too large" from "at it".
            object
                .take(SNAPSHOT_BYTES_MAX.saturating_add(1))
                .read_to_end(&mut bytes)
                .await?;
            if bytes.len() as u64 > SNAPSHOT_BYTES_MAX {
                return Err(format!("{name} is larger than {SNAPSHOT_BYTES_MAX} bytes").into());
            }
            Ok::<_, async_nats::Error>(bytes)
        })
    }

    fn write_with(
        &self,
        seq: Seq,
        fill: &mut dyn FnMut(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), SnapshotError> {
        let storage = |why: Box<dyn std::error::Error + Send + Sync>| {
            tracing::debug!(seq, error = %why, "a snapshot write failed");
            SnapshotError::remote("writing a snapshot", why)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(PIPE_CHUNKS_MAX);
        let store = self.store.clone();
        let meta = object_store::ObjectMetadata {
            name: self.name(seq),
            chunk_size: Some(OBJECT_CHUNK_BYTES),
            metadata: HashMap::new(),
            ..Default::default()
        };
        let upload = self.runtime.spawn(async move {
            let mut reader = PipeReader::new(rx);
            tokio::time::timeout(PUT_TIMEOUT, store.put(meta, &mut reader)).await
        });
        let mut writer = PipeWriter {
            tx,
            chunk: Vec::with_capacity(PIPE_CHUNK_BYTES),
        };
        let filled = fill(&mut writer).and_then(|()| writer.finish());
        if let Err(e) = filled {
            // Stop the upload before the pipe closes: the object's metadata
            // is never published, so nothing half-written is ever listed.
            upload.abort();
            return Err(storage(e.into()));
        }
        match self.runtime.block_on(upload) {
            Ok(Ok(Ok(_info))) => Ok(()),
            Ok(Ok(Err(e))) => Err(storage(e.into())),
            Ok(Err(elapsed)) => Err(storage(elapsed.into())),
            Err(e) => Err(storage(e.into())),
        }
    }

    fn remove(&self, seq: Seq) -> Result<(), SnapshotError> {
        let name = self.name(seq);
        let store = self.store.clone();
        self.call(
            "removing a snapshot",
            async move { store.delete(&name).await },
        )
    }
}

/// What the encoding thread sends the upload.
enum Piece {
    Bytes(Vec<u8>),
    /// Everything was written: only after this does the upload see the end.
    End,
}

/// The encoding side of the pipe: buffers writes into chunks and sends
/// them, waiting when the upload is behind.
struct PipeWriter {
    tx: tokio::sync::mpsc::Sender<Piece>,
    chunk: Vec<u8>,
}

impl PipeWriter {
    fn send(&mut self, piece: Piece) -> std::io::Result<()> {
        self.tx
            .blocking_send(piece)
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }

    fn finish(&mut self) -> std::io::Result<()> {
        std::io::Write::flush(self)?;
        self.send(Piece::End)
    }
}

impl std::io::Write for PipeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let room = PIPE_CHUNK_BYTES - self.chunk.len();
        let taken = room.min(buf.len());
        self.chunk.extend_from_slice(&buf[..taken]);
        if self.chunk.len() >= PIPE_CHUNK_BYTES {
            self.flush()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(PIPE_CHUNK_BYTES));
        self.send(Piece::Bytes(chunk))
    }
}

/// The upload side of the pipe. A pipe that closes before [`Piece::End`]
/// is an error, never a short object.
struct PipeReader {
    rx: tokio::sync::mpsc::Receiver<Piece>,
    current: Vec<u8>,
    offset: usize,
    ended: bool,
}

impl PipeReader {
    fn new(rx: tokio::sync::mpsc::Receiver<Piece>) -> Self {
        PipeReader {
            rx,
            current: Vec::new(),
            offset: 0,
            ended: false,
        }
    }
}

impl AsyncRead for PipeReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if self.offset < self.current.len() {
                let n = (self.current.len() - self.offset).min(buf.remaining());
                let from = self.offset;
                buf.put_slice(&self.current[from..from + n]);
                self.offset += n;
                return Poll::Ready(Ok(()));
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(Piece::Bytes(bytes))) => {
                    self.current = bytes;
                    self.offset = 0;
                }
                Poll::Ready(Some(Piece::End)) => self.ended = true,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the snapshot's writer stopped before the end",
                    )));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
