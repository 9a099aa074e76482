//! The one place that knows how records and snapshots look on disk.
//!
//! Only this module touches `bincode` (pinned at 2.0.1, whose maintainers
//! have stopped; keeping it behind this module means a replacement changes
//! one file). Every record and snapshot carries a format version.
//!
//! A journal record is framed as:
//!
//! ```text
//! version: u8 | payload length: u32 LE | crc32c(payload): u32 LE | payload
//! ```
//!
//! where the payload is the bincode encoding of `{seq, event}`. Records are
//! stored in `sled` in *blocks*: one value holds the consecutive records of
//! one group commit, under the big-endian sequence number of its first
//! record (so key order is sequence order). One sled insert per flush
//! instead of one per event is what lets sled keep up with group commit.
//! Decoding checks, in order: the version is known, the frame is whole, the
//! length is within the limit, the CRC matches, the payload decodes, and the
//! sequence number inside is the one expected at that place. A record that
//! fails any check is never applied.
//!
//! A snapshot file is framed the same way behind an 8-byte magic.
//!
//! Versions: 1 is the first format. 2 added sale windows: two `Event`
//! variants appended at the end (bincode numbers variants by position, so
//! every version 1 record decodes unchanged as version 2) and a sale window
//! in each snapshot SKU (a version 1 snapshot is read through its own types,
//! [`decode_snapshot_versioned`]). Records and snapshots are written in
//! [`FORMAT_VERSION`]; both versions are read.

use serde::{Deserialize, Serialize};

use crate::domain::Event;
use crate::domain::idem::{HashedRecord, IdemRecord, KeyHash};
use crate::domain::order::Order;
use crate::journal::Seq;

/// The current record and snapshot format, the one written.
pub const FORMAT_VERSION: u8 = 2;

/// The oldest format this build still reads.
pub const FORMAT_VERSION_MIN: u8 = 1;

/// Largest encoded event. The largest legal event (an order of 100 lines
/// with 200-character, 4-byte-per-character names, 64-byte ids and a
/// 255-byte idempotency key) is under 100 KiB. The bound also keeps sled's
/// tree nodes below its blob threshold (see `writer.rs`).
pub const RECORD_BYTES_MAX: usize = 112 << 10;

/// Largest snapshot payload: 16 GiB, far above any state that fits in memory
/// on the machines we target; a larger length field is corruption.
pub const SNAPSHOT_BYTES_MAX: u64 = 16 << 30;

const HEADER_BYTES: usize = 1 + 4 + 4;
/// The snapshot magic: 7 fixed bytes, then the snapshot body's format
/// (1: one whole state at one sequence number; 2: parts captured at their
/// own sequence numbers, see `snapshot.rs`; 3: the same with compact
/// idempotency records; 4: format 3's body, streamed, its length and CRC in
/// a trailer).
const SNAPSHOT_MAGIC: &[u8; 7] = b"FCSNAP\0";

/// The snapshot body format of a whole state at one sequence number.
pub const SNAPSHOT_FORMAT_WHOLE: u8 = 1;
/// The snapshot body format of parts captured at their own sequence
/// numbers, with idempotency records holding their user, key and whole
/// answer (read only).
pub const SNAPSHOT_FORMAT_PARTS: u8 = 2;
/// [`SNAPSHOT_FORMAT_PARTS`] with compact idempotency records (a key hash
/// and a reference to the answer, `domain/idem.rs`): the format written.
pub const SNAPSHOT_FORMAT_COMPACT: u8 = 3;
/// Format 3's body written as it is encoded, never whole in memory: the
/// magic, this format, the record version, the payload, then a trailer of
/// the payload's length (8 bytes) and CRC-32C (4 bytes), little-endian. A
/// header cannot hold them, since they are known only once the payload is
/// written. The format written.
pub const SNAPSHOT_FORMAT_STREAMED: u8 = 4;
/// The trailer of a [`SNAPSHOT_FORMAT_STREAMED`] snapshot.
const TRAILER_BYTES: usize = 8 + 4;

/// Why bytes did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// A format version this build does not know.
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    /// Fewer bytes than the frame says.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// The checksum does not match: the bytes are damaged.
    #[error("checksum mismatch")]
    BadChecksum,
    /// The payload does not decode.
    #[error("undecodable payload: {0}")]
    Undecodable(String),
    /// The record's own sequence number is not its key.
    #[error("record claims sequence {found}, stored under {expected}")]
    WrongSeq {
        /// The key it is stored under.
        expected: Seq,
        /// The number inside.
        found: Seq,
    },
    /// More bytes than the format allows.
    #[error("{0} bytes is over the size limit")]
    TooLarge(u64),
    /// An idempotency record stored under another key than its own.
    #[error("a record stored under another key")]
    WrongKey,
}

#[derive(Serialize)]
struct RecordRef<'a> {
    seq: Seq,
    event: &'a Event,
}

#[derive(Deserialize)]
struct Record {
    seq: Seq,
    event: Event,
}

/// An archived order as stored (see [`encode_order`]).
#[derive(Serialize)]
struct ArchivedRef<'a> {
    id: u64,
    order: &'a Order,
}

#[derive(Deserialize)]
struct Archived {
    id: u64,
    order: Order,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<RECORD_BYTES_MAX>()
}

fn snapshot_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
}

/// The `sled` key of a sequence number: big-endian, so keys sort by number.
pub fn key(seq: Seq) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of a `sled` key.
///
/// # Errors
/// `Truncated` when the key is not 8 bytes.
pub fn seq_of(key: &[u8]) -> Result<Seq, CodecError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| CodecError::Truncated("a key is 8 bytes"))?;
    Ok(Seq::from_be_bytes(bytes))
}

/// The header of a frame around `payload`: version, length, CRC.
fn header(payload: &[u8]) -> Result<[u8; HEADER_BYTES], CodecError> {
    let len =
        u32::try_from(payload.len()).map_err(|_| CodecError::TooLarge(payload.len() as u64))?;
    let mut header = [0u8; HEADER_BYTES];
    header[0] = FORMAT_VERSION;
    header[1..5].copy_from_slice(&len.to_le_bytes());
    header[5..].copy_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    Ok(header)
}

fn frame(payload: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    out.extend_from_slice(&header(payload)?);
    out.extend_from_slice(payload);
    Ok(())
}

/// A frame's version, payload and where the next frame starts, or why the
/// frame is unreadable. `Err((error, Some(next)))` means the frame's length
/// was readable (only its content is bad), so later frames can still be
/// found.
type Framed<'a> = Result<(u8, &'a [u8], usize), (CodecError, Option<usize>)>;

/// Reads the frame at the start of `bytes` (more frames may follow).
fn unframe_prefix(bytes: &[u8], limit: u64) -> Framed<'_> {
    let Some((&version, rest)) = bytes.split_first() else {
        return Err((CodecError::Truncated("empty record"), None));
    };
    if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
        return Err((CodecError::UnknownVersion(version), None));
    }
    if bytes.len() < HEADER_BYTES {
        return Err((CodecError::Truncated("short header"), None));
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if u64::from(len) > limit {
        return Err((CodecError::TooLarge(u64::from(len)), None));
    }
    let end = HEADER_BYTES + len as usize;
    let Some(payload) = bytes.get(HEADER_BYTES..end) else {
        return Err((
            CodecError::Truncated("payload shorter than its header says"),
            None,
        ));
    };
    if crc32c::crc32c(payload) != crc {
        return Err((CodecError::BadChecksum, Some(end)));
    }
    Ok((version, payload, end))
}

/// Checks a frame that must fill `bytes` exactly and returns its version
/// and payload.
fn unframe(bytes: &[u8], limit: u64) -> Result<(u8, &[u8]), CodecError> {
    let (version, payload, end) = unframe_prefix(bytes, limit).map_err(|(e, _)| e)?;
    if end != bytes.len() {
        return Err(CodecError::Truncated("payload length differs from header"));
    }
    Ok((version, payload))
}

fn decode_payload(seq: Seq, payload: &[u8]) -> Result<Event, CodecError> {
    let (record, used): (Record, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Undecodable(
            "trailing bytes after the record".into(),
        ));
    }
    if record.seq != seq {
        return Err(CodecError::WrongSeq {
            expected: seq,
            found: record.seq,
        });
    }
    Ok(record.event)
}

/// One record read from a block.
#[derive(Debug)]
pub struct BlockRecord {
    /// Its sequence number.
    pub seq: Seq,
    /// Where its frame starts in the block.
    pub offset: usize,
    /// The event, or why it cannot be used.
    pub event: Result<Event, CodecError>,
}

/// The records of a block, in order. After a damaged record whose frame
/// length is unreadable nothing more can be found, so iteration stops there.
#[derive(Debug)]
pub struct BlockRecords<'a> {
    bytes: &'a [u8],
    offset: usize,
    next_seq: Seq,
    stopped: bool,
}

impl Iterator for BlockRecords<'_> {
    type Item = BlockRecord;

    fn next(&mut self) -> Option<BlockRecord> {
        if self.stopped || self.offset >= self.bytes.len() {
            return None;
        }
        let seq = self.next_seq;
        let offset = self.offset;
        let rest = &self.bytes[offset..];
        let event = match unframe_prefix(rest, RECORD_BYTES_MAX as u64) {
            // Every known version decodes with today's `Event` (see the
            // module doc).
            Ok((_version, payload, end)) => {
                self.offset += end;
                decode_payload(seq, payload)
            }
            Err((error, Some(end))) => {
                self.offset += end;
                Err(error)
            }
            Err((error, None)) => {
                self.stopped = true;
                Err(error)
            }
        };
        self.next_seq = seq.saturating_add(1);
        Some(BlockRecord { seq, offset, event })
    }
}

/// Reads the records of the block stored under `first`.
pub fn block_records(first: Seq, bytes: &[u8]) -> BlockRecords<'_> {
    BlockRecords {
        bytes,
        offset: 0,
        next_seq: first,
        stopped: false,
    }
}

/// Encodes an event as the record stored under `seq`.
///
/// # Errors
/// `TooLarge` when the event does not fit [`RECORD_BYTES_MAX`] (the domain's
/// limits make that impossible), `Undecodable` if serde refuses it.
pub fn encode(seq: Seq, event: &Event) -> Result<Vec<u8>, CodecError> {
    // Room for the header, then the payload encoded in place behind it: one
    // allocation for a typical record, and no copy.
    let mut out = Vec::with_capacity(RECORD_BYTES_TYPICAL);
    out.resize(HEADER_BYTES, 0);
    bincode::serde::encode_into_std_write(RecordRef { seq, event }, &mut out, config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    let (room, payload) = out.split_at_mut(HEADER_BYTES);
    if payload.len() > RECORD_BYTES_MAX {
        return Err(CodecError::TooLarge(payload.len() as u64));
    }
    room.copy_from_slice(&header(payload)?);
    Ok(out)
}

/// The capacity [`encode`] starts with: an order placement's record fits.
const RECORD_BYTES_TYPICAL: usize = 256;

/// Decodes the record stored under `seq`.
///
/// # Errors
/// Any [`CodecError`]: the record must not be applied.
pub fn decode(seq: Seq, bytes: &[u8]) -> Result<Event, CodecError> {
    let (_version, payload) = unframe(bytes, RECORD_BYTES_MAX as u64)?;
    decode_payload(seq, payload)
}

/// Encodes an archived order: the same frame as a journal record (version,
/// length, CRC) around the bincode encoding of `{id, order}`, so damage
/// and an order stored under the wrong key are both caught on reading.
///
/// # Errors
/// `TooLarge` past [`RECORD_BYTES_MAX`] (the domain's limits make that
/// impossible), `Undecodable` if serde refuses it.
pub fn encode_order(order: &Order) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(
        ArchivedRef {
            id: order.id.0,
            order,
        },
        config(),
    )
    .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if payload.len() > RECORD_BYTES_MAX {
        return Err(CodecError::TooLarge(payload.len() as u64));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame(&payload, &mut out)?;
    Ok(out)
}

/// Decodes an archived order stored under the key of order `id`.
///
/// # Errors
/// Any [`CodecError`]; `WrongSeq` (read: wrong id) when the order inside is
/// not the one the key names.
pub fn decode_order(id: u64, bytes: &[u8]) -> Result<Order, CodecError> {
    let (_version, payload) = unframe(bytes, RECORD_BYTES_MAX as u64)?;
    let (archived, used): (Archived, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Undecodable(
            "trailing bytes after the order".into(),
        ));
    }
    if archived.id != id || archived.order.id.0 != id {
        return Err(CodecError::WrongSeq {
            expected: id,
            found: archived.order.id.0,
        });
    }
    Ok(archived.order)
}

/// Encodes an idempotency record moved to disk: the same frame as a journal
/// record (version, length, CRC) around the bincode encoding of
/// `{key, record}`, so damage and a record stored under another key are
/// both caught on reading.
///
/// # Errors
/// `TooLarge` past [`RECORD_BYTES_MAX`] (a record is at most a SKU's view),
/// `Undecodable` if serde refuses it.
pub fn encode_idem_record(hashed: &HashedRecord) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(hashed, config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if payload.len() > RECORD_BYTES_MAX {
        return Err(CodecError::TooLarge(payload.len() as u64));
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame(&payload, &mut out)?;
    Ok(out)
}

/// Decodes an idempotency record stored under `key`.
///
/// # Errors
/// Any [`CodecError`]; `WrongKey` when the record inside is another key's.
pub fn decode_idem_record(key: &KeyHash, bytes: &[u8]) -> Result<IdemRecord, CodecError> {
    let (_version, payload) = unframe(bytes, RECORD_BYTES_MAX as u64)?;
    let (hashed, used): (HashedRecord, usize) =
        bincode::serde::decode_from_slice(payload, config())
            .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Undecodable(
            "trailing bytes after the record".into(),
        ));
    }
    if hashed.key != *key {
        return Err(CodecError::WrongKey);
    }
    Ok(hashed.record)
}

/// Encodes a snapshot body (any serde value) behind the snapshot magic, as
/// format [`SNAPSHOT_FORMAT_WHOLE`].
///
/// # Errors
/// `Undecodable` if serde refuses the value, `TooLarge` past the limit.
pub fn encode_snapshot<T: Serialize>(body: &T) -> Result<Vec<u8>, CodecError> {
    encode_snapshot_as(SNAPSHOT_FORMAT_WHOLE, body)
}

/// The body format a snapshot's magic names, if the bytes start with one.
pub fn snapshot_format(bytes: &[u8]) -> Option<u8> {
    bytes
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .and_then(|rest| rest.first().copied())
}

/// Encodes a snapshot body behind the snapshot magic and `format`.
///
/// # Errors
/// `Undecodable` if serde refuses the value, `TooLarge` past the limit.
pub fn encode_snapshot_as<T: Serialize>(format: u8, body: &T) -> Result<Vec<u8>, CodecError> {
    let payload = bincode::serde::encode_to_vec(body, snapshot_config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if payload.len() as u64 > SNAPSHOT_BYTES_MAX || payload.len() > u32::MAX as usize {
        return Err(CodecError::TooLarge(payload.len() as u64));
    }
    let mut out = Vec::with_capacity(SNAPSHOT_MAGIC.len() + 1 + HEADER_BYTES + payload.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.push(format);
    frame(&payload, &mut out)?;
    Ok(out)
}

/// Counts and checksums what passes through to `inner`.
struct Summing<W> {
    inner: W,
    len: u64,
    crc: u32,
}

impl<W: std::io::Write> std::io::Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let written = &buf[..n];
        self.crc = crc32c::crc32c_append(self.crc, written);
        self.len = self.len.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Encodes a snapshot body into `out` as it goes, in
/// [`SNAPSHOT_FORMAT_STREAMED`]; returns the bytes written.
///
/// # Errors
/// `Undecodable` if serde refuses the value or `out` fails (its error as
/// text), `TooLarge` past the limit (`out` then holds a partial snapshot
/// the caller must discard).
pub fn encode_snapshot_streamed<T: Serialize>(
    body: &T,
    out: &mut dyn std::io::Write,
) -> Result<u64, CodecError> {
    let io = |e: std::io::Error| CodecError::Undecodable(format!("writing: {e}"));
    out.write_all(SNAPSHOT_MAGIC).map_err(io)?;
    out.write_all(&[SNAPSHOT_FORMAT_STREAMED, FORMAT_VERSION])
        .map_err(io)?;
    let mut summing = Summing {
        inner: &mut *out,
        len: 0,
        crc: 0,
    };
    bincode::serde::encode_into_std_write(body, &mut summing, snapshot_config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    let (len, crc) = (summing.len, summing.crc);
    if len > SNAPSHOT_BYTES_MAX {
        return Err(CodecError::TooLarge(len));
    }
    out.write_all(&len.to_le_bytes()).map_err(io)?;
    out.write_all(&crc.to_le_bytes()).map_err(io)?;
    Ok((SNAPSHOT_MAGIC.len() + 2 + TRAILER_BYTES) as u64 + len)
}

/// The payload of a [`SNAPSHOT_FORMAT_STREAMED`] snapshot, checked against
/// its trailer.
fn streamed_payload(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    let rest = bytes
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .and_then(|rest| rest.strip_prefix(&[SNAPSHOT_FORMAT_STREAMED]))
        .ok_or(CodecError::Truncated("not a streamed snapshot (magic)"))?;
    let (&version, rest) = rest
        .split_first()
        .ok_or(CodecError::Truncated("no version"))?;
    if rest.len() < TRAILER_BYTES {
        return Err(CodecError::Truncated("no trailer"));
    }
    let (payload, trailer) = rest.split_at(rest.len() - TRAILER_BYTES);
    let mut len = [0u8; 8];
    len.copy_from_slice(&trailer[..8]);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&trailer[8..]);
    if u64::from_le_bytes(len) != payload.len() as u64 {
        return Err(CodecError::Truncated("payload length differs from trailer"));
    }
    if crc32c::crc32c(payload) != u32::from_le_bytes(crc) {
        return Err(CodecError::BadChecksum);
    }
    Ok((version, payload))
}

fn snapshot_payload(bytes: &[u8]) -> Result<(u8, &[u8]), CodecError> {
    if snapshot_format(bytes) == Some(SNAPSHOT_FORMAT_STREAMED) {
        return streamed_payload(bytes);
    }
    let framed = bytes
        .strip_prefix(SNAPSHOT_MAGIC.as_slice())
        .and_then(|rest| rest.split_first())
        .filter(|(format, _)| {
            matches!(
                **format,
                SNAPSHOT_FORMAT_WHOLE | SNAPSHOT_FORMAT_PARTS | SNAPSHOT_FORMAT_COMPACT
            )
        })
        .map(|(_, framed)| framed)
        .ok_or(CodecError::Truncated("not a snapshot (magic)"))?;
    unframe(framed, SNAPSHOT_BYTES_MAX)
}

fn decode_snapshot_body<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, CodecError> {
    let (body, used): (T, usize) = bincode::serde::decode_from_slice(payload, snapshot_config())
        .map_err(|e| CodecError::Undecodable(e.to_string()))?;
    if used != payload.len() {
        return Err(CodecError::Undecodable(
            "trailing bytes after the snapshot".into(),
        ));
    }
    Ok(body)
}

/// Decodes a snapshot written by [`encode_snapshot`] in the current format.
///
/// # Errors
/// Any [`CodecError`] (`UnknownVersion` for an older format too): the
/// snapshot must not be used.
pub fn decode_snapshot<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, CodecError> {
    let (version, payload) = snapshot_payload(bytes)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::UnknownVersion(version));
    }
    decode_snapshot_body(payload)
}

/// A snapshot body in the format it was written in.
#[derive(Debug, PartialEq, Eq)]
pub enum Versioned<Current, V1> {
    /// [`FORMAT_VERSION`].
    Current(Current),
    /// Version 1 (before sale windows).
    V1(V1),
}

/// Decodes a snapshot of any format this build reads: `Current` as
/// [`FORMAT_VERSION`] wrote it, `V1` as version 1 did. The caller converts.
///
/// # Errors
/// Any [`CodecError`]: the snapshot must not be used.
pub fn decode_snapshot_versioned<Current, V1>(
    bytes: &[u8],
) -> Result<Versioned<Current, V1>, CodecError>
where
    Current: for<'de> Deserialize<'de>,
    V1: for<'de> Deserialize<'de>,
{
    const _: () = assert!(FORMAT_VERSION == 2, "name the reader of each version here");
    match snapshot_payload(bytes)? {
        (1, payload) => decode_snapshot_body(payload).map(Versioned::V1),
        (FORMAT_VERSION, payload) => decode_snapshot_body(payload).map(Versioned::Current),
        (version, _) => Err(CodecError::UnknownVersion(version)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::event::{RefundStock, RefundedLine, ReleaseReason, SkuQty};
    use crate::domain::order::{Order, OrderLine, OrderStatus, StatusChange};
    use crate::domain::promo::Promotion;
    use crate::domain::{IdemStamp, IdempotencyKey, OrderId, PaymentRef, PromoCode, SkuId, UserId};
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,64}"
    }

    fn sku() -> impl Strategy<Value = SkuId> {
        id().prop_map(|s| SkuId::parse(&s).expect("valid by construction"))
    }

    fn user() -> impl Strategy<Value = UserId> {
        id().prop_map(|s| UserId::parse(&s).expect("valid by construction"))
    }

    fn stamp() -> impl Strategy<Value = Option<IdemStamp>> {
        proptest::option::of((user(), "[!-~]{1,255}", any::<[u8; 16]>()).prop_map(
            |(user, key, fingerprint)| IdemStamp {
                user,
                key: IdempotencyKey::parse(&key).expect("valid by construction"),
                fingerprint,
            },
        ))
    }

    fn sale() -> impl Strategy<Value = crate::domain::sale::SaleWindow> {
        (
            proptest::option::of(any::<u64>()),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(
                |(starts_at_ms, ends_at_ms)| crate::domain::sale::SaleWindow {
                    starts_at_ms,
                    ends_at_ms,
                },
            )
    }

    fn lines() -> impl Strategy<Value = Vec<SkuQty>> {
        prop::collection::vec(
            (sku(), 1u32..=10_000).prop_map(|(sku, qty)| SkuQty { sku, qty }),
            0..5,
        )
    }

    fn order() -> impl Strategy<Value = Order> {
        (
            any::<u64>(),
            user(),
            prop::collection::vec((sku(), ".{1,20}", 1u32..=10_000, any::<u64>()), 1..4),
            any::<u64>(),
        )
            .prop_map(|(id, user, lines, at)| Order {
                id: OrderId(id),
                user,
                status: OrderStatus::Reserved,
                lines: lines
                    .into_iter()
                    .map(|(sku, name, qty, price)| OrderLine {
                        sku,
                        name,
                        qty,
                        unit_price_cents: price,
                        discount_cents: 0,
                        refunded_qty: 0,
                    })
                    .collect(),
                subtotal_cents: at / 3,
                discount_cents: 0,
                total_cents: at / 3,
                paid_cents: 0,
                refunded_cents: 0,
                promo_code: PromoCode::parse("P").ok(),
                payment_ref: None,
                created_at_ms: at,
                expires_at_ms: at / 2,
                history: vec![StatusChange {
                    status: OrderStatus::Reserved,
                    at_ms: at,
                }],
            })
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (
                sku(),
                ".{1,200}",
                any::<u64>(),
                proptest::option::of(any::<u32>()),
                any::<u64>(),
                any::<u64>()
            )
                .prop_map(|(sku, name, price_cents, per_user_limit, stock, at_ms)| {
                    Event::SkuCreated {
                        sku,
                        name,
                        price_cents,
                        per_user_limit,
                        stock,
                        at_ms,
                    }
                }),
            (
                sku(),
                proptest::option::of(".{1,10}"),
                proptest::option::of(any::<u64>()),
                proptest::option::of(proptest::option::of(any::<u32>())),
                any::<u64>()
            )
                .prop_map(|(sku, name, price_cents, per_user_limit, at_ms)| {
                    Event::SkuUpdated {
                        sku,
                        name,
                        price_cents,
                        per_user_limit,
                        at_ms,
                    }
                }),
            (sku(), ".{1,20}", any::<u64>(), sale(), any::<u64>()).prop_map(
                |(sku, name, stock, sale, at_ms)| {
                    Event::SkuCreatedWithSale {
                        sku,
                        name,
                        price_cents: stock / 2,
                        per_user_limit: None,
                        stock,
                        sale,
                        at_ms,
                    }
                }
            ),
            (
                sku(),
                proptest::option::of(".{1,10}"),
                proptest::option::of(proptest::option::of(any::<u32>())),
                sale(),
                any::<u64>()
            )
                .prop_map(|(sku, name, per_user_limit, sale, at_ms)| {
                    Event::SkuUpdatedWithSale {
                        sku,
                        name,
                        price_cents: None,
                        per_user_limit,
                        sale,
                        at_ms,
                    }
                }),
            (sku(), any::<u64>(), stamp(), any::<u64>()).prop_map(|(sku, qty, idem, at_ms)| {
                Event::Restocked {
                    sku,
                    qty,
                    idem,
                    at_ms,
                }
            }),
            (sku(), any::<u64>(), user(), any::<u32>(), any::<u64>()).prop_map(
                |(sku, r, user, qty, at_ms)| Event::StockReserved {
                    sku,
                    reservation: OrderId(r),
                    user,
                    qty,
                    at_ms
                }
            ),
            (sku(), any::<u64>(), user(), any::<u32>(), any::<u64>()).prop_map(
                |(sku, r, user, qty, at_ms)| Event::ReservationReleased {
                    sku,
                    reservation: OrderId(r),
                    user,
                    qty,
                    at_ms
                }
            ),
            (id(), 1u64..1_000, any::<u64>()).prop_map(|(code, off, at_ms)| {
                Event::PromotionCreated {
                    promo: Promotion::new(PromoCode::parse(&code).expect("valid"), off, off)
                        .expect("valid"),
                    at_ms,
                }
            }),
            (
                order(),
                prop::collection::vec(any::<u64>().prop_map(OrderId), 0..4),
                any::<bool>(),
                stamp()
            )
                .prop_map(|(order, reservations, from_cart, idem)| {
                    Event::OrderPlaced {
                        order: Box::new(order),
                        reservations,
                        from_cart,
                        idem,
                    }
                }),
            (order(), stamp()).prop_map(|(order, idem)| Event::OrderPlacedAtSku {
                order: Box::new(order),
                idem,
            }),
            (
                any::<u64>(),
                id(),
                any::<u64>(),
                lines(),
                stamp(),
                any::<u64>()
            )
                .prop_map(|(order, r, amount_cents, lines, idem, at_ms)| {
                    Event::OrderPaid {
                        order: OrderId(order),
                        payment_ref: PaymentRef::parse(&r).expect("valid"),
                        amount_cents,
                        lines,
                        idem,
                        at_ms,
                    }
                }),
            (any::<u64>(), user(), any::<bool>(), lines(), any::<u64>()).prop_map(
                |(order, user, cancel, lines, at_ms)| Event::OrderReleased {
                    order: OrderId(order),
                    user,
                    reason: if cancel {
                        ReleaseReason::Cancelled
                    } else {
                        ReleaseReason::Expired
                    },
                    lines,
                    at_ms
                }
            ),
            (any::<u64>(), lines(), any::<u64>()).prop_map(|(order, lines, at_ms)| {
                Event::OrderShipped {
                    order: OrderId(order),
                    lines,
                    at_ms,
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(order, at_ms)| Event::OrderDelivered {
                order: OrderId(order),
                at_ms
            }),
            (any::<u64>(), user(), lines(), 0u8..3, stamp(), any::<u64>()).prop_map(
                |(order, user, lines, stock, idem, at_ms)| Event::OrderRefunded {
                    order: OrderId(order),
                    user,
                    lines: lines
                        .into_iter()
                        .enumerate()
                        .map(|(i, l)| RefundedLine {
                            line: i as u32,
                            sku: l.sku,
                            qty: l.qty,
                            cents: u64::from(l.qty) * 3
                        })
                        .collect(),
                    stock: [
                        RefundStock::Unallocate,
                        RefundStock::Restock,
                        RefundStock::Keep
                    ][stock as usize],
                    idem,
                    at_ms
                }
            ),
            (user(), sku(), any::<u32>(), any::<u64>()).prop_map(|(user, sku, qty, at_ms)| {
                Event::CartItemSet {
                    user,
                    sku,
                    qty,
                    at_ms,
                }
            }),
            (user(), any::<u64>()).prop_map(|(user, at_ms)| Event::CartCleared { user, at_ms }),
            (
                prop::collection::vec(any::<u64>().prop_map(OrderId), 0..50),
                any::<u64>()
            )
                .prop_map(|(ids, at_ms)| Event::OrdersArchived { ids, at_ms }),
            (order(), any::<u64>()).prop_map(|(order, at_ms)| Event::OrderRestored {
                order: Box::new(order),
                at_ms,
            }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(through, at_ms)| Event::OrderIdsReserved { through, at_ms }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(term, at_ms)| Event::OwnerChanged { term, at_ms }),
            (stamp(), ".{0,40}", any::<u64>()).prop_filter_map(
                "a key",
                |(idem, message, at_ms)| {
                    idem.map(|idem| Event::IdempotentRefusal {
                        idem,
                        refusal: crate::domain::idem::Refusal {
                            status: 409,
                            code: "out_of_stock".into(),
                            message,
                        },
                        at_ms,
                    })
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_event_round_trips(seq in any::<u64>(), event in event()) {
            let bytes = encode(seq, &event).expect("encodes");
            prop_assert_eq!(decode(seq, &bytes), Ok(event));
        }

        #[test]
        fn any_single_byte_flip_is_caught(seq in any::<u64>(), event in event(), at in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode(seq, &event).expect("encodes");
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(decode(seq, &bytes).is_err());
        }

        #[test]
        fn any_truncation_is_caught(seq in any::<u64>(), event in event(), cut in any::<usize>()) {
            let bytes = encode(seq, &event).expect("encodes");
            let cut = cut % bytes.len();
            prop_assert!(decode(seq, &bytes[..cut]).is_err());
        }

        #[test]
        fn arbitrary_bytes_never_panic(seq in any::<u64>(), bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(seq, &bytes);
            let _ = decode_snapshot::<Vec<u64>>(&bytes);
        }
    }

    fn finished(order: Order) -> Order {
        Order {
            status: OrderStatus::Delivered,
            history: vec![
                StatusChange {
                    status: OrderStatus::Reserved,
                    at_ms: 1,
                },
                StatusChange {
                    status: OrderStatus::Delivered,
                    at_ms: 2,
                },
            ],
            ..order
        }
    }

    proptest! {
        #[test]
        fn archived_orders_round_trip(order in order()) {
            let order = finished(order);
            let bytes = encode_order(&order).expect("encodes");
            prop_assert_eq!(decode_order(order.id.0, &bytes), Ok(order));
        }

        #[test]
        fn any_byte_flip_of_an_archived_order_is_caught(order in order(), at in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode_order(&order).expect("encodes");
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(decode_order(order.id.0, &bytes).is_err());
        }

        #[test]
        fn any_truncation_of_an_archived_order_is_caught(order in order(), cut in any::<usize>()) {
            let bytes = encode_order(&order).expect("encodes");
            let cut = cut % bytes.len();
            prop_assert!(decode_order(order.id.0, &bytes[..cut]).is_err());
        }
    }

    fn idem_record() -> impl Strategy<Value = HashedRecord> {
        use crate::domain::idem::{Outcome, RefundedMark};
        let outcome = prop_oneof![
            (any::<u64>(), 1u32..6).prop_map(|(id, history_len)| Outcome::Order {
                id: OrderId(id),
                history_len
            }),
            (
                any::<u64>(),
                1u32..6,
                any::<u64>(),
                prop::collection::vec(any::<u32>(), 1..5)
            )
                .prop_map(|(id, history_len, refunded_cents, refunded_qty)| {
                    Outcome::Refunded(Box::new(RefundedMark {
                        id: OrderId(id),
                        history_len,
                        refunded_cents,
                        refunded_qty,
                    }))
                }),
        ];
        (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u64>(), outcome).prop_map(
            |(key, fingerprint, at_ms, outcome)| HashedRecord {
                key: KeyHash(key),
                record: IdemRecord {
                    fingerprint,
                    at_ms,
                    outcome,
                },
            },
        )
    }

    proptest! {
        #[test]
        fn idempotency_records_round_trip(hashed in idem_record()) {
            let bytes = encode_idem_record(&hashed).expect("encodes");
            prop_assert_eq!(decode_idem_record(&hashed.key, &bytes), Ok(hashed.record));
        }

        #[test]
        fn any_byte_flip_of_an_idempotency_record_is_caught(hashed in idem_record(), at in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode_idem_record(&hashed).expect("encodes");
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            prop_assert!(decode_idem_record(&hashed.key, &bytes).is_err());
        }

        #[test]
        fn any_truncation_of_an_idempotency_record_is_caught(hashed in idem_record(), cut in any::<usize>()) {
            let bytes = encode_idem_record(&hashed).expect("encodes");
            let cut = cut % bytes.len();
            prop_assert!(decode_idem_record(&hashed.key, &bytes[..cut]).is_err());
        }
    }

    #[test]
    fn an_idempotency_record_under_another_key_is_refused() {
        let hashed = HashedRecord {
            key: KeyHash([1; 16]),
            record: IdemRecord {
                fingerprint: [2; 16],
                at_ms: 3,
                outcome: crate::domain::idem::Outcome::Order {
                    id: OrderId(4),
                    history_len: 1,
                },
            },
        };
        let bytes = encode_idem_record(&hashed).expect("encodes");
        assert_eq!(
            decode_idem_record(&KeyHash([9; 16]), &bytes),
            Err(CodecError::WrongKey)
        );
    }

    #[test]
    fn an_archived_order_under_another_id_is_refused() {
        let order = Order {
            id: OrderId(9),
            ..finished(
                Order::place(
                    OrderId(9),
                    UserId::parse("u").expect("valid"),
                    vec![crate::domain::order::ReservedLine {
                        sku: SkuId::parse("s").expect("valid"),
                        name: "S".into(),
                        qty: 1,
                        unit_price_cents: 5,
                    }],
                    None,
                    1,
                    1,
                )
                .expect("places"),
            )
        };
        let bytes = encode_order(&order).expect("encodes");
        assert!(matches!(
            decode_order(10, &bytes),
            Err(CodecError::WrongSeq { .. })
        ));
    }

    #[test]
    fn a_record_written_before_the_archive_events_still_decodes() {
        // `{seq: 5, event: OrderDelivered {order: 7, at_ms: 1000}}` as the
        // format was written before `OrdersArchived` and `OrderRestored`
        // were appended, spelled out by hand: seq 5, variant index 10,
        // order 7, then 1000 as a bincode varint (251, u16 LE).
        let payload = [5u8, 10, 7, 251, 0xe8, 0x03];
        let mut bytes = Vec::new();
        frame(&payload, &mut bytes).expect("frames");
        assert_eq!(
            decode(5, &bytes),
            Ok(Event::OrderDelivered {
                order: OrderId(7),
                at_ms: 1_000
            })
        );
        // And the new variants take the next indices, after every old one
        // and after the two of the sale windows (16 and 17).
        let archived = Event::OrdersArchived {
            ids: vec![OrderId(1)],
            at_ms: 0,
        };
        assert_eq!(encode(0, &archived).expect("encodes")[HEADER_BYTES + 1], 18);
    }

    #[test]
    fn a_record_under_the_wrong_key_is_refused() {
        let event = Event::CartCleared {
            user: UserId::parse("u").expect("valid"),
            at_ms: 1,
        };
        let bytes = encode(7, &event).expect("encodes");
        assert_eq!(
            decode(8, &bytes),
            Err(CodecError::WrongSeq {
                expected: 8,
                found: 7
            })
        );
    }

    #[test]
    fn an_unknown_version_is_refused() {
        let event = Event::CartCleared {
            user: UserId::parse("u").expect("valid"),
            at_ms: 1,
        };
        let mut bytes = encode(1, &event).expect("encodes");
        bytes[0] = FORMAT_VERSION + 1;
        assert_eq!(
            decode(1, &bytes),
            Err(CodecError::UnknownVersion(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn a_block_reads_back_record_by_record_and_stops_at_damage() {
        let user = UserId::parse("u").expect("valid");
        let events: Vec<Event> = (0..5)
            .map(|i| Event::CartCleared { user, at_ms: i })
            .collect();
        let mut block = Vec::new();
        for (i, event) in events.iter().enumerate() {
            block.extend(encode(10 + i as u64, event).expect("encodes"));
        }
        let read: Vec<_> = block_records(10, &block).collect();
        assert_eq!(read.len(), 5);
        for (i, record) in read.iter().enumerate() {
            assert_eq!(record.seq, 10 + i as u64);
            assert_eq!(record.event.as_ref().ok(), Some(&events[i]));
        }
        // A bad checksum in the third record: the fourth is still found.
        let mut damaged = block.clone();
        let third = read[2].offset;
        damaged[third + HEADER_BYTES + 1] ^= 0x10;
        let outcome: Vec<bool> = block_records(10, &damaged)
            .map(|r| r.event.is_ok())
            .collect();
        assert_eq!(outcome, vec![true, true, false, true, true]);
        // A torn block: everything before the tear reads.
        let torn = &block[..read[3].offset + 4];
        let outcome: Vec<bool> = block_records(10, torn).map(|r| r.event.is_ok()).collect();
        assert_eq!(outcome, vec![true, true, true, false]);
        // Stored under the wrong first sequence number, every record is refused.
        assert!(block_records(11, &block).all(|r| r.event.is_err()));
    }

    /// `SkuCreated` (SKU `tee`, price 1500, limit 2, 7 units, at 1000) as
    /// format 1 wrote it under sequence 3, before sale windows.
    const V1_SKU_CREATED_HEX: &str = "01130000003549c56f03000374656503546565fbdc05010207fbe803";

    #[test]
    fn a_format_1_record_still_decodes() {
        let bytes: Vec<u8> = (0..V1_SKU_CREATED_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&V1_SKU_CREATED_HEX[i..i + 2], 16).expect("hex"))
            .collect();
        assert_eq!(bytes[0], 1, "written by format 1");
        assert_eq!(
            decode(3, &bytes),
            Ok(Event::SkuCreated {
                sku: SkuId::parse("tee").expect("valid"),
                name: "Tee".into(),
                price_cents: 1_500,
                per_user_limit: Some(2),
                stock: 7,
                at_ms: 1_000,
            })
        );
        // A version-0 frame is not a format.
        let mut zero = bytes.clone();
        zero[0] = 0;
        assert_eq!(decode(3, &zero), Err(CodecError::UnknownVersion(0)));
    }

    #[test]
    fn new_records_are_written_in_the_current_format() {
        let event = Event::CartCleared {
            user: UserId::parse("u").expect("valid"),
            at_ms: 1,
        };
        assert_eq!(encode(1, &event).expect("encodes")[0], FORMAT_VERSION);
        let snapshot = encode_snapshot(&7u64).expect("encodes");
        // The magic, the body's format, then a frame in the record format.
        assert_eq!(snapshot[SNAPSHOT_MAGIC.len()], SNAPSHOT_FORMAT_WHOLE);
        assert_eq!(snapshot[SNAPSHOT_MAGIC.len() + 1], FORMAT_VERSION);
    }

    #[test]
    fn keys_sort_like_sequence_numbers() {
        assert!(key(255) < key(256));
        assert_eq!(seq_of(&key(42)), Ok(42));
        assert!(seq_of(&[1, 2]).is_err());
    }

    #[test]
    fn snapshots_round_trip_and_catch_damage() {
        let body = vec![1u64, 2, 3, u64::MAX];
        let mut bytes = encode_snapshot(&body).expect("encodes");
        assert_eq!(decode_snapshot::<Vec<u64>>(&bytes), Ok(body));
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        assert_eq!(
            decode_snapshot::<Vec<u64>>(&bytes),
            Err(CodecError::BadChecksum)
        );
    }

    #[test]
    fn streamed_snapshots_round_trip_and_catch_any_byte_damaged_or_cut() {
        let body: Vec<u64> = (0..200).map(|i| i * 7_919).collect();
        let mut bytes = Vec::new();
        let written = encode_snapshot_streamed(&body, &mut bytes).expect("encodes");
        assert_eq!(written, bytes.len() as u64);
        assert_eq!(snapshot_format(&bytes), Some(SNAPSHOT_FORMAT_STREAMED));
        assert_eq!(decode_snapshot::<Vec<u64>>(&bytes), Ok(body.clone()));
        // The same body as format 3 frames it: only the framing differs.
        let framed = encode_snapshot_as(SNAPSHOT_FORMAT_COMPACT, &body).expect("encodes");
        assert_eq!(
            &framed[framed.len() - (bytes.len() - TRAILER_BYTES - 9)..],
            &bytes[9..bytes.len() - TRAILER_BYTES]
        );
        for at in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[at] ^= 0x20;
            assert!(
                decode_snapshot::<Vec<u64>>(&damaged).is_err(),
                "a flip at {at} of {} is caught",
                bytes.len()
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                decode_snapshot::<Vec<u64>>(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
