//! Reading a partition's journal back from its subject, and purging the
//! blocks a snapshot covers.
//!
//! Every read that decides something (where the journal ends, whether a
//! block landed, where to start) goes to the stream leader
//! (`STREAM.MSG.GET`), not to a direct get: with `allow_direct` any replica
//! may answer a direct get, and one that lags would show an older last
//! message (async-nats says as much: read-after-write is not guaranteed).
//!
//! **Where a read starts.** Blocks carry their first and last sequence
//! numbers in headers, and both grow with the stream sequence, so the block
//! holding `after + 1` is found by a binary search over stream sequences,
//! each probe one "next message of the subject at or after" get (at most
//! [`SEARCH_PROBES_MAX`], each a block of at most `BLOCK_BYTES_MAX`). The
//! blocks from there are streamed by an ordered consumer filtered on the
//! subject, up to the subject's last message as of the start of the read.
//! So a read costs a few probes plus the blocks after `after`, whatever
//! lies before it.
//!
//! **Purging.** [`purge_through`] drops the blocks whose records are all at
//! or below a sequence number, with one purge filtered on the subject and
//! bounded by the stream sequence of the first block to keep (JetStream
//! purges "up to but not including" that sequence). The subject's last
//! block is always kept, even when the snapshot covers it: it is where the
//! journal resumes (its last sequence number) and what the writer's
//! compare-and-set expects; an emptied subject would restart numbering at 1.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, Context};
use futures_util::StreamExt;

use super::{
    API_CALL_MS, ClusterJournalError, HEADER_FIRST_SEQ, HEADER_LAST_SEQ, HEADER_WRITER,
    JournalStream, ResumePoint, timed,
};
use crate::journal::Seq;
use crate::journal::codec;

/// Most probes of the binary search for a read's first block: the first
/// probe, then each at least halves a range of stream sequences (64 bits).
pub const SEARCH_PROBES_MAX: u32 = 66;

/// A block read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    /// Its first record's sequence number.
    pub first_seq: Seq,
    /// Its last record's sequence number.
    pub last_seq: Seq,
    /// Its stream sequence.
    pub subject_seq: u64,
    /// Its records, as [`codec::block_records`] reads them (every one
    /// checked to decode).
    pub bytes: bytes::Bytes,
}

/// What a read found: the blocks holding everything after the point asked
/// for (the first may start before it), and where the journal resumes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadBack {
    /// In order, contiguous.
    pub blocks: Vec<StoredBlock>,
    /// The journal's end as of the start of the read.
    pub resume: ResumePoint,
}

/// A block's headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockHead {
    pub subject_seq: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub writer: Option<String>,
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}

fn block_head(
    subject_seq: u64,
    headers: Option<&HeaderMap>,
) -> Result<BlockHead, ClusterJournalError> {
    let bad = |why| ClusterJournalError::BadBlock { subject_seq, why };
    let headers = headers.ok_or_else(|| bad("no headers"))?;
    let first_seq =
        header_u64(headers, HEADER_FIRST_SEQ).ok_or_else(|| bad("no first sequence"))?;
    let last_seq = header_u64(headers, HEADER_LAST_SEQ).ok_or_else(|| bad("no last sequence"))?;
    if first_seq == 0 || last_seq < first_seq {
        return Err(bad("first and last sequence numbers out of order"));
    }
    Ok(BlockHead {
        subject_seq,
        first_seq,
        last_seq,
        writer: headers.get(HEADER_WRITER).map(|v| v.as_str().to_owned()),
    })
}

async fn stream_handle(
    context: &Context,
    stream: &str,
) -> Result<jetstream::stream::Stream<()>, ClusterJournalError> {
    timed(
        "binding the journal stream",
        API_CALL_MS,
        context.get_stream_no_info(stream),
    )
    .await
}

/// Gets a message from the leader: the subject's last one, or with
/// `from`, its first one at or after that stream sequence. `None` when
/// there is none.
async fn leader_get(
    handle: &jetstream::stream::Stream<()>,
    subject: &str,
    from: Option<u64>,
) -> Result<Option<StreamMessage>, ClusterJournalError> {
    let builder = handle.raw_message_builder();
    let request = match from {
        None => builder.last_by_subject(subject),
        Some(sequence) => builder.sequence(sequence).next_by_subject(subject),
    };
    match tokio::time::timeout(Duration::from_millis(API_CALL_MS), request.send()).await {
        Ok(Ok(message)) => Ok(Some(message)),
        Ok(Err(e)) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Ok(Err(e)) => Err(ClusterJournalError::nats("reading a journal block", e)),
        Err(_) => Err(ClusterJournalError::Timeout {
            what: "reading a journal block",
            after_ms: API_CALL_MS,
        }),
    }
}

/// The subject's last block's headers, from the stream leader.
pub(super) async fn last_block(
    context: &Context,
    stream: &str,
    subject: &str,
) -> Result<Option<BlockHead>, ClusterJournalError> {
    let handle = stream_handle(context, stream).await?;
    last_head(&handle, subject).await
}

/// The headers of the subject's last block on `handle`, from the leader.
async fn last_head(
    handle: &jetstream::stream::Stream<()>,
    subject: &str,
) -> Result<Option<BlockHead>, ClusterJournalError> {
    leader_get(handle, subject, None)
        .await?
        .map(|m| block_head(m.sequence, Some(&m.headers)))
        .transpose()
}

/// The headers of the subject's first block after stream sequence
/// `after`, from the stream leader.
pub(super) async fn next_block(
    context: &Context,
    stream: &str,
    subject: &str,
    after: u64,
) -> Result<Option<BlockHead>, ClusterJournalError> {
    let handle = stream_handle(context, stream).await?;
    leader_get(&handle, subject, Some(after + 1))
        .await?
        .map(|m| block_head(m.sequence, Some(&m.headers)))
        .transpose()
}

/// Where the journal of `partition` ends: its last sequence number and the
/// stream sequence of its last block (zeros when it is empty). Reads one
/// message.
///
/// # Errors
/// `BadBlock` when the last message is not a block; `Timeout` or `Nats`
/// when the servers do not answer.
pub async fn resume_point(
    context: &Context,
    spec: &JournalStream,
    partition: u32,
) -> Result<ResumePoint, ClusterJournalError> {
    let last = last_block(context, &spec.name, &spec.subject(partition)).await?;
    Ok(last.map_or(ResumePoint::default(), |last| ResumePoint {
        last_seq: last.last_seq,
        last_subject_seq: last.subject_seq,
    }))
}

/// The stream sequence of the first block of `subject` whose last record
/// is after `seq`, given its last block `last` (whose last record is).
///
/// With `next(s)` the subject's first block at or after stream sequence
/// `s`, the answer is `next(s)` for the least `s` whose block ends after
/// `seq`; both grow with `s`, so a binary search over `s` finds it. The
/// subject's first block is probed first: after a purge it is usually the
/// answer.
async fn first_block_after(
    handle: &jetstream::stream::Stream<()>,
    subject: &str,
    seq: Seq,
    last: &BlockHead,
) -> Result<u64, ClusterJournalError> {
    assert!(last.last_seq > seq, "the search has an answer");
    // Invariants: the least `s` is in [low, high]; `found` is `next(high)`,
    // whose block ends after `seq`.
    let (mut low, mut high, mut found) = (1u64, last.subject_seq, last.subject_seq);
    for _ in 0..SEARCH_PROBES_MAX {
        if low >= high {
            return Ok(found);
        }
        // The first probe is the subject's first block.
        let middle = if low == 1 { 1 } else { low + (high - low) / 2 };
        let message = leader_get(handle, subject, Some(middle)).await?.ok_or(
            ClusterJournalError::BadBlock {
                subject_seq: middle,
                why: "no block before the last one (purged during the search?)",
            },
        )?;
        let head = block_head(message.sequence, Some(&message.headers))?;
        if head.subject_seq < middle || head.subject_seq > found {
            return Err(ClusterJournalError::BadBlock {
                subject_seq: head.subject_seq,
                why: "the server answered a block outside the range asked for",
            });
        }
        if head.last_seq > seq {
            (high, found) = (middle, head.subject_seq);
        } else {
            // Every `s` up to this block's sequence leads to this block.
            low = head.subject_seq + 1;
        }
    }
    Err(ClusterJournalError::BadBlock {
        subject_seq: found,
        why: "the search for the first block to read did not converge",
    })
}

/// Reads the journal of `partition` after `after`: every block holding a
/// record after it, in order, up to the subject's last block as of the
/// start of the read, each checked to follow the previous one and to
/// decode; and the resume point for [`super::JetStreamJournal::start`].
/// The whole tail is held in memory (the snapshot keeps it short).
///
/// # Errors
/// `Gap` when a block does not start where the previous one ended (or the
/// first one after `after + 1`); `Corrupt` or `BadBlock` for a block that
/// does not decode; `Behind` when the journal ends before `after`;
/// `Timeout` or `Nats` when the servers do not answer.
pub async fn blocks_after(
    context: &Context,
    spec: &JournalStream,
    partition: u32,
    after: Seq,
) -> Result<ReadBack, ClusterJournalError> {
    let subject = spec.subject(partition);
    let handle = stream_handle(context, &spec.name).await?;
    let Some(last) = last_head(&handle, &subject).await? else {
        return match after {
            0 => Ok(ReadBack {
                blocks: Vec::new(),
                resume: ResumePoint::default(),
            }),
            _ => Err(ClusterJournalError::Behind { after, last_seq: 0 }),
        };
    };
    let resume = ResumePoint {
        last_seq: last.last_seq,
        last_subject_seq: last.subject_seq,
    };
    if last.last_seq < after {
        return Err(ClusterJournalError::Behind {
            after,
            last_seq: last.last_seq,
        });
    }
    if last.last_seq == after {
        return Ok(ReadBack {
            blocks: Vec::new(),
            resume,
        });
    }
    let start = first_block_after(&handle, &subject, after, &last).await?;
    let blocks = read_blocks(&handle, &subject, start, after, &last).await?;
    Ok(ReadBack { blocks, resume })
}

/// Streams the blocks of `subject` from stream sequence `start` through
/// `last`, checking each.
async fn read_blocks(
    handle: &jetstream::stream::Stream<()>,
    subject: &str,
    start: u64,
    after: Seq,
    last: &BlockHead,
) -> Result<Vec<StoredBlock>, ClusterJournalError> {
    let consumer = timed(
        "creating a reader of the journal",
        API_CALL_MS,
        handle.create_consumer(OrderedConfig {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        }),
    )
    .await?;
    let mut messages = timed(
        "starting to read the journal",
        API_CALL_MS,
        consumer.messages(),
    )
    .await?;
    let mut blocks = Vec::new();
    let mut next = after + 1;
    // At most one message per stream sequence up to the last block, twice
    // over if the consumer starts again from the first (see below).
    for _ in 0..last.subject_seq.saturating_mul(2).saturating_add(2) {
        let message =
            match tokio::time::timeout(Duration::from_millis(API_CALL_MS), messages.next()).await {
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(e))) => {
                    return Err(ClusterJournalError::nats("reading the journal", e));
                }
                Ok(None) => {
                    return Err(ClusterJournalError::BadBlock {
                        subject_seq: last.subject_seq,
                        why: "the reader ended before the last block",
                    });
                }
                Err(_) => {
                    return Err(ClusterJournalError::Timeout {
                        what: "reading the next journal block",
                        after_ms: API_CALL_MS,
                    });
                }
            };
        let subject_seq = message
            .info()
            .map_err(|e| ClusterJournalError::nats("reading a block's stream sequence", e))?
            .stream_sequence;
        // async-nats 0.52's ordered consumer, recreated before its first
        // message (a missed heartbeat, a leader change), starts again from
        // the subject's first message instead of `start`, and a recreation
        // later on may deliver again what it delivered: skip both.
        if subject_seq < start
            || blocks
                .last()
                .is_some_and(|b: &StoredBlock| subject_seq <= b.subject_seq)
        {
            continue;
        }
        let head = block_head(subject_seq, message.headers.as_ref())?;
        let block = checked_block(head, message.payload.clone(), next)?;
        next = block.last_seq + 1;
        let done = block.subject_seq >= last.subject_seq;
        blocks.push(block);
        if done {
            break;
        }
    }
    let read_to = blocks.last().map_or(0, |b| b.subject_seq);
    if read_to != last.subject_seq || next != last.last_seq + 1 {
        return Err(ClusterJournalError::BadBlock {
            subject_seq: read_to,
            why: "the read did not end at the subject's last block",
        });
    }
    Ok(blocks)
}

/// Checks that a block holds `next` (the first one read may start before
/// it; every later one must start at it) and that every record decodes.
fn checked_block(
    head: BlockHead,
    bytes: bytes::Bytes,
    next: Seq,
) -> Result<StoredBlock, ClusterJournalError> {
    if head.first_seq > next || head.last_seq < next {
        return Err(ClusterJournalError::Gap {
            expected: next,
            found: head.first_seq,
        });
    }
    let mut records: u64 = 0;
    for record in codec::block_records(head.first_seq, &bytes) {
        if let Err(source) = record.event {
            return Err(ClusterJournalError::Corrupt {
                subject_seq: head.subject_seq,
                seq: record.seq,
                source,
            });
        }
        records += 1;
    }
    if records != head.last_seq - head.first_seq + 1 {
        return Err(ClusterJournalError::BadBlock {
            subject_seq: head.subject_seq,
            why: "it holds another number of records than its headers say",
        });
    }
    Ok(StoredBlock {
        first_seq: head.first_seq,
        last_seq: head.last_seq,
        subject_seq: head.subject_seq,
        bytes,
    })
}

/// Drops the blocks of `partition` whose records are all at or below
/// `seq`; a block that straddles `seq` stays, and so does the subject's
/// last block (see the module doc). Returns how many messages were purged.
///
/// # Errors
/// `BadBlock` when a message is not a block; `Timeout` or `Nats` when the
/// servers do not answer.
pub async fn purge_through(
    context: &Context,
    spec: &JournalStream,
    partition: u32,
    seq: Seq,
) -> Result<u64, ClusterJournalError> {
    let subject = spec.subject(partition);
    let handle = stream_handle(context, &spec.name).await?;
    let Some(last) = last_head(&handle, &subject).await? else {
        return Ok(0);
    };
    let keep_from = if last.last_seq <= seq {
        last.subject_seq
    } else {
        first_block_after(&handle, &subject, seq, &last).await?
    };
    let purged = timed(
        "purging the journal",
        API_CALL_MS,
        handle
            .purge()
            .filter(subject)
            .sequence(keep_from)
            .into_future(),
    )
    .await?;
    Ok(purged.purged)
}
