//! The writer task of a [`JetStreamJournal`](super::JetStreamJournal):
//! it alone publishes to the partition's subject, one block at a time, and
//! decides what an unconfirmed publish did (see the parent module's doc).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::Context;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;

use super::{
    APPEND_RETRY_MS_MAX, BATCH_EVENTS_MAX, ClusterJournalError, HEADER_FIRST_SEQ, HEADER_LAST_SEQ,
    HEADER_TERM, HEADER_WRITER, Item, PUBLISH_ACK_MS, RETRY_PAUSE_MS_MAX, RETRY_PAUSE_MS_MIN,
    ResumePoint, Shared, StopKind, WriterTerm, read,
};
use crate::journal::Seq;

/// A block ready to publish.
struct Block {
    first: Seq,
    last: Seq,
    bytes: bytes::Bytes,
}

/// The writer task's state: it alone publishes to the subject.
pub(super) struct Writer {
    pub(super) context: Context,
    pub(super) subject: String,
    pub(super) stream: String,
    pub(super) term: WriterTerm,
    /// Random per writer instance: with the first sequence number it makes
    /// the `Nats-Msg-Id` and tells our blocks from anyone else's.
    pub(super) writer_id: String,
    pub(super) block_bytes_max: usize,
    /// Invariant: the stream sequence of the subject's last block, as of
    /// this writer's last confirmed publish (0: the subject is empty).
    pub(super) last_subject_seq: u64,
    pub(super) shared: Arc<Shared>,
}

/// What the subject's last message says about a block we published.
enum Landed {
    /// Our block is the subject's last, at this stream sequence.
    Yes(u64),
    /// The subject's last is still the one we expected: publish again.
    No,
}

impl Writer {
    pub(super) async fn run(mut self, mut rx: tokio::sync::mpsc::Receiver<Item>) {
        let mut batch: Vec<Item> = Vec::with_capacity(BATCH_EVENTS_MAX);
        loop {
            match rx.recv().await {
                Some(item) => batch.push(item),
                None => return, // closed and drained
            }
            while batch.len() < BATCH_EVENTS_MAX {
                match rx.try_recv() {
                    Ok(item) => batch.push(item),
                    Err(_) => break,
                }
            }
            for block in pack(&batch, self.block_bytes_max) {
                if let Err(e) = self.publish(&block).await {
                    let kind = match e {
                        ClusterJournalError::Fenced { .. } => StopKind::Fenced,
                        _ => StopKind::Unavailable,
                    };
                    self.shared.fail(block.first, kind, e.to_string());
                    rx.close();
                    return;
                }
                let durable = self.shared.watermark.durable();
                assert!(
                    durable < block.first,
                    "the watermark {durable} never covers a block before it is published"
                );
                *self.shared.point.lock().unwrap_or_else(|p| p.into_inner()) = ResumePoint {
                    last_seq: block.last,
                    last_subject_seq: self.last_subject_seq,
                };
                self.shared.watermark.advance(block.last);
            }
            batch.clear();
        }
    }

    /// Publishes one block until the server confirms it, expecting the
    /// subject's last to be `self.last_subject_seq`; on success that
    /// becomes the block's stream sequence.
    async fn publish(&mut self, block: &Block) -> Result<(), ClusterJournalError> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(APPEND_RETRY_MS_MAX);
        let expected = self.last_subject_seq;
        let headers = block_headers(block, expected, self.term, &self.writer_id);
        let mut pause_ms = RETRY_PAUSE_MS_MIN;
        let mut attempts: u32 = 0;
        loop {
            attempts += 1;
            let message = PublishMessage::build()
                .payload(block.bytes.clone())
                .headers(headers.clone());
            let outcome = tokio::time::timeout(Duration::from_millis(PUBLISH_ACK_MS), async {
                self.context
                    .send_publish(self.subject.clone(), message)
                    .await?
                    .await
            })
            .await;
            let landed = match outcome {
                Ok(Ok(ack)) => {
                    // A duplicate is our own earlier attempt (the id names
                    // this writer instance), at the sequence it landed at.
                    if ack.stream != self.stream {
                        return Err(ClusterJournalError::StreamMismatch {
                            stream: self.stream.clone(),
                            why: format!("{} is stored by stream {}", self.subject, ack.stream),
                        });
                    }
                    Some(ack.sequence)
                }
                Ok(Err(e)) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    return Err(ClusterJournalError::nats("a block over max_payload", e));
                }
                Ok(Err(e)) => {
                    // Wrong last sequence included: it is fencing unless our
                    // own earlier attempt is what moved the subject, which
                    // only the subject's last message tells. (nats-server
                    // 2.15 checks the expected sequence before the Msg-Id:
                    // a republish of a block that landed gets 10071, not a
                    // duplicate ack.)
                    tracing::warn!(subject = %self.subject, first_seq = block.first, attempts, error = %e, "publish not confirmed; checking the subject");
                    None
                }
                Err(_) => {
                    tracing::warn!(subject = %self.subject, first_seq = block.first, attempts, "publish ack timed out; checking the subject");
                    None
                }
            };
            if let Some(sequence) = landed {
                assert!(
                    sequence > expected,
                    "a block lands after the subject's last"
                );
                self.last_subject_seq = sequence;
                return Ok(());
            }
            // Ambiguous: find out from the subject's last message, as long
            // as the deadline allows.
            self.shared.unconfirmed.fetch_add(1, Ordering::Relaxed);
            loop {
                if Instant::now() >= deadline {
                    return Err(ClusterJournalError::Timeout {
                        what: "landing a block across retries",
                        after_ms: APPEND_RETRY_MS_MAX,
                    });
                }
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                pause_ms = (pause_ms * 2).min(RETRY_PAUSE_MS_MAX);
                match self.check_landed(block, expected).await {
                    Ok(Landed::Yes(sequence)) => {
                        self.last_subject_seq = sequence;
                        return Ok(());
                    }
                    Ok(Landed::No) => break, // publish again
                    Err(e @ ClusterJournalError::Fenced { .. }) => return Err(e),
                    Err(e) => {
                        tracing::warn!(subject = %self.subject, error = %e, "cannot read the subject's last block yet");
                    }
                }
            }
        }
    }

    /// Reads the subject's last message from the stream leader (a direct
    /// get may be answered by a replica that lags, which would make our
    /// landed block look absent) and decides.
    async fn check_landed(
        &self,
        block: &Block,
        expected: u64,
    ) -> Result<Landed, ClusterJournalError> {
        let fenced = |found| ClusterJournalError::Fenced {
            subject: self.subject.clone(),
            expected,
            found,
        };
        let ours = |head: &read::BlockHead| {
            head.writer.as_deref() == Some(self.writer_id.as_str()) && head.first_seq == block.first
        };
        match read::last_block(&self.context, &self.stream, &self.subject).await? {
            None if expected == 0 => Ok(Landed::No),
            None => Err(fenced(None)),
            Some(last) if last.subject_seq == expected => Ok(Landed::No),
            Some(last) if ours(&last) => Ok(Landed::Yes(last.subject_seq)),
            Some(last) => {
                // Someone else's block is last. Ours may still have landed
                // right after the expected one, before theirs: then it is
                // durable and acknowledged, and the next block finds the
                // fence.
                let after =
                    read::next_block(&self.context, &self.stream, &self.subject, expected).await?;
                match after {
                    Some(next) if ours(&next) => Ok(Landed::Yes(next.subject_seq)),
                    _ => Err(fenced(Some(last.subject_seq))),
                }
            }
        }
    }
}

/// The headers of a block: compare-and-set on the subject's last stream
/// sequence, the dedupe id, and what a reader needs.
fn block_headers(block: &Block, expected: u64, term: WriterTerm, writer_id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected.to_string().as_str(),
    );
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{}.{writer_id}", block.first).as_str(),
    );
    headers.insert(HEADER_FIRST_SEQ, block.first.to_string().as_str());
    headers.insert(HEADER_LAST_SEQ, block.last.to_string().as_str());
    headers.insert(HEADER_TERM, term.0.to_string().as_str());
    headers.insert(HEADER_WRITER, writer_id);
    headers
}

/// Packs a batch into blocks of consecutive records, each at most
/// `block_bytes_max` (a record always fits: see `start`).
fn pack(batch: &[Item], block_bytes_max: usize) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut bytes: Vec<u8> = Vec::new();
    let mut first: Option<Seq> = None;
    let mut last: Seq = 0;
    for item in batch {
        if let Some(start) = first {
            assert_eq!(
                item.seq,
                last + 1,
                "a batch's sequence numbers are contiguous"
            );
            if bytes.len() + item.bytes.len() > block_bytes_max {
                blocks.push(Block {
                    first: start,
                    last,
                    bytes: std::mem::take(&mut bytes).into(),
                });
                first = None;
            }
        }
        first.get_or_insert(item.seq);
        bytes.extend_from_slice(&item.bytes);
        last = item.seq;
    }
    if let Some(start) = first {
        blocks.push(Block {
            first: start,
            last,
            bytes: bytes.into(),
        });
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::super::HEADER_ROOM_BYTES;
    use super::*;
    use crate::domain::{Event, UserId};
    use crate::journal::codec;

    fn item(seq: Seq) -> Item {
        let event = Event::CartCleared {
            user: UserId::parse("u").expect("valid"),
            at_ms: seq,
        };
        Item {
            seq,
            bytes: codec::encode(seq, &event).expect("encodes"),
        }
    }

    #[test]
    fn blocks_cover_the_batch_in_order_and_stay_under_the_cap() {
        let batch: Vec<Item> = (5..105).map(item).collect();
        let record = batch[0].bytes.len();
        let blocks = pack(&batch, record * 7);
        let mut next = 5;
        for block in &blocks {
            assert_eq!(block.first, next);
            assert!(block.bytes.len() <= record * 7);
            let records: Vec<_> = codec::block_records(block.first, &block.bytes).collect();
            assert_eq!(records.len() as u64, block.last - block.first + 1);
            assert!(records.iter().all(|r| r.event.is_ok()));
            next = block.last + 1;
        }
        assert_eq!(next, 105);
        assert_eq!(blocks.len(), 100usize.div_ceil(7));
    }

    #[test]
    fn headers_fit_their_room() {
        let block = Block {
            first: u64::MAX - 1,
            last: u64::MAX,
            bytes: bytes::Bytes::new(),
        };
        let headers = block_headers(&block, u64::MAX, WriterTerm(u64::MAX), &"f".repeat(16));
        let wire: usize = headers
            .iter()
            .map(|(name, values)| {
                values
                    .iter()
                    .map(|v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                    .sum::<usize>()
            })
            .sum::<usize>()
            + "NATS/1.0\r\n\r\n".len();
        assert!(wire * 2 < HEADER_ROOM_BYTES, "{wire} bytes of headers");
    }
}
