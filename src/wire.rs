//! The wire format: frames carried one per QUIC DATAGRAM.
//!
//! **Outside the stable API**: public for the fuzz targets, benchmarks and tests, and may
//! change in any release. Applications use [`crate::channel`]; a peer in another language
//! follows the protocol specification (`docs/PROTOCOL.md`), not this module.
//!
//! This module turns bytes into [`Frame`]s and back. It knows nothing of codes, time or
//! sockets. [`Frame::decode`] never panics and never allocates in proportion to a length the
//! peer claims: every count and length is checked against the bytes that remain and against
//! [`Limits`] before it is used. Shard payloads are zero-copy [`Bytes`] slices of the datagram.
//! Encoding cannot fail for frames that satisfy the documented invariants (every frame that
//! `decode` returns does).
//!
//! The protocol as a whole (connection set-up, the Hello, the code's matrix, acks, refusals,
//! what a receiver does with bad input) is specified in `docs/PROTOCOL.md`, whose test vectors
//! `tests/protocol_vectors.rs` checks against this module.
//!
//! # Layout
//!
//! Every frame starts with one type byte: the high nibble is the wire version (`1`), the low
//! nibble the frame type. A datagram holds exactly one frame; bytes left over after it are an
//! error ([`DecodeError::TrailingBytes`]). `varint` is a QUIC variable-length integer (RFC 9000
//! §16: 1, 2, 4 or 8 bytes, the two high bits of the first byte give the length, values below
//! 2^62); decoders accept non-minimal encodings, encoders write minimal ones.
//!
//! ## Shard (`0x11`)
//!
//! One Reed-Solomon shard of a *block*. A block is one or more messages with consecutive ids,
//! concatenated (`total` bytes) and cut into `k` data shards of `S` bytes (the last one padded
//! with zeros for coding), plus up to `n - k` parity shards of `S` bytes. `k` must equal
//! `max(1, ceil(total / S))`. Data shards travel trimmed: data shard `i` carries
//! `min(S, total - i*S)` bytes; parity shards carry exactly `S`.
//!
//! | field          | encoding      | meaning                                                    |
//! |----------------|---------------|------------------------------------------------------------|
//! | type           | u8 = `0x11`   | version 1, shard                                           |
//! | block          | varint        | block id, unique per sender per connection                 |
//! | k              | varint        | data shards, `1 ..= n`                                     |
//! | n              | varint        | total shards the block may ever have, `≤ Limits::max_shards`|
//! | index          | varint        | this shard, `< n`; `< k` is data, `≥ k` is parity          |
//! | S              | varint        | shard size, `1 ..= Limits::max_shard_size`                 |
//! | first_message  | varint        | id of the block's first message                            |
//! | count          | varint        | messages in the block, `1 ..= Limits::max_block_messages`   |
//! | lengths        | count×varint  | each message's length, `≤ Limits::max_message_len`         |
//! | checksum       | u32 (BE)      | CRC-32 (IEEE) of the `total` message bytes                 |
//! | payload        | rest          | the shard bytes (length as above)                          |
//!
//! ## Ack (`0x12`)
//!
//! Acknowledges message ids as ranges, QUIC style (RFC 9000 §19.3): ranges are sent in
//! descending order, each described by its distance from the previous one.
//!
//! | field           | encoding | meaning                                                       |
//! |-----------------|----------|---------------------------------------------------------------|
//! | type            | u8 = `0x12` |                                                            |
//! | ack_delay       | varint   | microseconds between receiving the newest acked message and sending this ack (this crate's receiver acks at once and sends 0) |
//! | shards_received | varint   | distinct shard frames the receiver has received from the peer so far, for loss estimation (not restarted when the channel moves to a new connection) |
//! | largest         | varint   | largest acked message id                                      |
//! | extra_ranges    | varint   | ranges after the first, `< Limits::max_ack_ranges`            |
//! | first_range     | varint   | ids below `largest` also acked: the first range is `largest - first_range ..= largest` |
//! | (gap, len) ×extra_ranges | varint, varint | next range ends at `previous_start - gap - 2` and spans `len + 1` ids |
//!
//! ## Hello (`0x13`)
//!
//! | field      | encoding   | meaning                                             |
//! |------------|------------|-----------------------------------------------------|
//! | type       | u8 = `0x13`|                                                     |
//! | channel_id | 16 bytes   | random id of the channel, stable across reconnects  |
//! | floor      | varint, optional | every message id below it has its outcome (acked or given up); absent means 0 |
//!
//! Sent by the client as the whole of the connection's first bidirectional stream (it
//! finishes the stream after the frame). The server answers on that stream with one byte,
//! [`HELLO_NEW`], [`HELLO_RESUMED`] or [`HELLO_CLAIMS`], once it has attached the connection
//! to the channel; a refusal closes the connection instead. The client sends nothing else
//! before it has read the answer. A Hello that arrives as a datagram is ignored.
//!
//! ## Close (`0x14`)
//!
//! | field      | encoding   | meaning                                          |
//! |------------|------------|--------------------------------------------------|
//! | type       | u8 = `0x14`|                                                  |
//! | code       | varint     | application close code                           |
//! | reason_len | varint     | `≤ Limits::max_close_reason`                     |
//! | reason     | bytes      | human-readable reason (not interpreted)          |
//!
//! Not sent by this crate, and ignored when received: a channel ends with QUIC's
//! CONNECTION_CLOSE and an application close code (`GOODBYE`, 3, for an orderly end).
//!
//! ## Floor (`0x16`), sender → receiver
//!
//! | field | encoding    | meaning                                                          |
//! |-------|-------------|------------------------------------------------------------------|
//! | type  | u8 = `0x16` |                                                                  |
//! | floor | varint      | every message id below it has its outcome at the sender (acked, or given up at its deadline, or refused): the receiver may treat them as settled |
//!
//! The receiver moves its dedupe window's low watermark up to `floor` (never down, and never
//! past a message whose claim is still pending), so one lost message frees the window at
//! the sender's deadline, and a receiver that restarted without state catches up with the
//! sender's ids. The sender repeats it (at most every 10 ms, at most three times per value)
//! until an ack's range from id 0 shows the receiver caught up, so one lost FLOOR costs
//! little.
//!
//! ## Refuse (`0x17`), receiver → sender
//!
//! The receiver will not deliver these messages, now or later: the sender fails them at
//! once (definitely not delivered; a retry with the same idempotency key is safe).
//!
//! | field  | encoding    | meaning                                                         |
//! |--------|-------------|-----------------------------------------------------------------|
//! | type   | u8 = `0x17` |                                                                 |
//! | reason | varint      | why, one of the `REFUSE_*` codes below (others: unknown reason) |
//! | count  | varint      | ranges that follow, `1 ..= Limits::max_ack_ranges`              |
//! | (first, extra) ×count | varint, varint | refused ids `first ..= first + extra` (≤ 2^62 - 1) |
//!
//! Reason codes: [`REFUSE_MALFORMED`] (1) the envelope is malformed (reserved flag bits, an
//! empty or oversized key); [`REFUSE_OUT_OF_WINDOW`] (2) the id is too far above the
//! receiver's dedupe window; [`REFUSE_KEYS_FULL`] (3) the receiver holds its most
//! idempotency keys and cannot take a new one; [`REFUSE_BLOCK`] (4) the block's code
//! parameters (`k`, `n`) are above what the receiver accepts; [`REFUSE_CLOSED`] (5) the
//! receiving application is gone.
//!
//! ## Envelope (inside every message)
//!
//! What the application sends is wrapped before it is coded into blocks (or written to a
//! stream), so that the receiver can dedupe by the application's idempotency key:
//!
//! | field    | encoding | meaning                                                     |
//! |----------|----------|-------------------------------------------------------------|
//! | flags    | u8       | bit 0: a key follows; bit 1: a request, bit 2: a reply (protocol 2, not both); other bits must be 0 |
//! | key_len  | varint   | only with bit 0; `1 ..= MAX_KEY_LEN`                        |
//! | key      | bytes    | the idempotency key, opaque                                 |
//! | to       | varint   | only with bit 2: the message id of the request it answers   |
//! | payload  | rest     | the application's message                                   |
//!
//! ## Stream message (`0x15`, on a bidirectional QUIC stream)
//!
//! Messages too large for the datagram path travel one per bidirectional stream: the type
//! byte, the message id (a varint, from the same id space as the datagram path) and the
//! envelope up to the end of the stream. The receiver answers with one status byte and ends
//! the stream: `0` delivered (now or before), `1` refused (not delivered). A stream that ends
//! without a status byte is no answer (outcome unknown; the sender retries it with the same id
//! on the next connection); a stream the receiver resets (error code 1: too long, or not
//! finished in time) was not delivered.

use std::ops::RangeInclusive;

use bytes::{Buf, BufMut, Bytes};

/// Message lengths of a block: inline up to four (the common case: a block of one message, or
/// a few small ones), so decoding a shard frame does not allocate for them.
pub type Lengths = smallvec::SmallVec<[u32; 4]>;

/// The wire version this crate speaks (the high nibble of every type byte).
pub const VERSION: u8 = 1;

/// The largest value a QUIC varint can carry: 2^62 - 1.
pub const MAX_VARINT: u64 = (1 << 62) - 1;

/// The most shards a block can have: Reed-Solomon over GF(2^8) has 256 code symbols.
pub const MAX_SHARDS: u16 = 256;

const TYPE_SHARD: u8 = 0x1;
const TYPE_ACK: u8 = 0x2;
const TYPE_HELLO: u8 = 0x3;
const TYPE_CLOSE: u8 = 0x4;
const TYPE_STREAM_MESSAGE: u8 = 0x5;
const TYPE_FLOOR: u8 = 0x6;
const TYPE_REFUSE: u8 = 0x7;
const TYPE_REPLAYED: u8 = 0x8;
const TYPE_MESSAGE: u8 = 0x9;
const TYPE_REPAIR: u8 = 0xa;

/// REFUSE reason: the message's envelope is malformed (reserved flag bits, an empty or
/// oversized idempotency key).
pub const REFUSE_MALFORMED: u64 = 1;
/// REFUSE reason: the message id is too far above the receiver's dedupe window.
pub const REFUSE_OUT_OF_WINDOW: u64 = 2;
/// REFUSE reason: the receiver holds as many idempotency keys as it may and cannot take a
/// new one before some expire.
pub const REFUSE_KEYS_FULL: u64 = 3;
/// REFUSE reason: the block's code parameters (`k` data shards, `n` shards) are above what
/// the receiver accepts ([`Limits::max_data_shards`], [`Limits::max_block_shards`]).
pub const REFUSE_BLOCK: u64 = 4;
/// REFUSE reason: the receiving application is gone; nothing more will be delivered.
pub const REFUSE_CLOSED: u64 = 5;
/// REFUSE reason: the receiver's floor passed the id before it was delivered (its hole
/// outlived the receiver's hole TTL, or the sender's FLOOR passed it); it never will be.
pub const REFUSE_PASSED: u64 = 6;
/// REFUSE reason: the message's idempotency key was delivered (or waits for the application)
/// with another payload. The message is not delivered; a retry under that key never will be.
pub const REFUSE_KEY_REUSED: u64 = 7;
/// REFUSE reason (protocol 2): the receiving application declined the message (a nack): it
/// did not process it. A retry under its idempotency key is delivered afresh.
pub const REFUSE_DECLINED: u64 = 8;

const fn type_byte(frame_type: u8) -> u8 {
    (VERSION << 4) | frame_type
}

/// Bounds the decoder enforces on what a peer may claim.
///
/// Both ends should use the same limits; the encoder in [`crate::fec`] never produces a frame
/// its own limits would reject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most shards (`n`) a block may have: the format's ceiling, checked by the decoder.
    /// Default 256, which is also the ceiling.
    pub max_shards: u16,
    /// Most data shards (`k`) of a block a receiver accepts: blocks above it decode but are
    /// refused ([`REFUSE_BLOCK`]) before any rebuild, because a wide code with tiny shards
    /// costs the receiver far more per byte (inverting a `k × k` matrix). Default 64: the
    /// encoder cuts a message of `max_message_len` (64 KiB) into 58 data shards at the
    /// smallest datagram size QUIC allows (1162 bytes of datagram payload), the tuner plans
    /// at most 8 (`TunerConfig::max_data_shards`) and batching at most 16. The encoder never
    /// builds a block above it.
    pub max_data_shards: u16,
    /// Most shards (`n`, data and parity) of a block a receiver accepts; above it the block
    /// is refused like one above `max_data_shards`. Default 128: the encoder codes a block
    /// of `k` data shards for `max(k × repair_ratio, min_repair)` parity (at most 58 + 58
    /// with the defaults) and never above this.
    pub max_block_shards: u16,
    /// Largest shard size `S` in bytes. Default 16 KiB (QUIC datagrams are bounded by the path
    /// MTU, about 1.2–1.5 KB on the Internet; loopback allows more).
    pub max_shard_size: u32,
    /// Largest single message carried in a block, in bytes. Default 64 KiB.
    pub max_message_len: u32,
    /// Most messages one block may carry. Default 64, which is also the ceiling (the
    /// reassembler tracks delivered messages of a block in a 64-bit mask).
    pub max_block_messages: u16,
    /// Most ranges one ack may carry. Default 64.
    pub max_ack_ranges: u16,
    /// Longest close reason, in bytes. Default 256.
    pub max_close_reason: u16,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_shards: MAX_SHARDS,
            max_data_shards: 64,
            max_block_shards: 128,
            max_shard_size: 16 * 1024,
            max_message_len: 64 * 1024,
            max_block_messages: 64,
            max_ack_ranges: 64,
            max_close_reason: 256,
        }
    }
}

impl Limits {
    /// These limits with every field clamped to what the format can represent
    /// (`max_shards ≤ 256`, `max_block_messages ≤ 64`, nothing below 1).
    pub fn clamped(&self) -> Limits {
        Limits {
            max_shards: self.max_shards.clamp(1, MAX_SHARDS),
            max_data_shards: self.max_data_shards.clamp(1, MAX_SHARDS),
            max_block_shards: self.max_block_shards.clamp(2, MAX_SHARDS),
            max_shard_size: self.max_shard_size.max(1),
            max_message_len: self.max_message_len,
            max_block_messages: self.max_block_messages.clamp(1, 64),
            max_ack_ranges: self.max_ack_ranges.max(1),
            max_close_reason: self.max_close_reason,
        }
    }
}

/// Why a datagram could not be decoded. Each malformed case has its own variant so that
/// receivers can count invalid frames by reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The datagram ended in the middle of a field.
    #[error("frame truncated")]
    Truncated,
    /// The datagram was empty.
    #[error("empty datagram")]
    Empty,
    /// The type byte names a wire version this crate does not speak.
    #[error("unsupported wire version {0}")]
    UnsupportedVersion(u8),
    /// The type byte names an unknown frame type.
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    /// A shard frame claimed `k = 0` data shards.
    #[error("block has zero data shards")]
    ZeroDataShards,
    /// A shard frame claimed more data shards than total shards.
    #[error("block has k = {k} data shards of n = {n}")]
    DataShardsExceedTotal {
        /// Claimed data shards.
        k: u64,
        /// Claimed total shards.
        n: u64,
    },
    /// A shard frame claimed more total shards than the limit.
    #[error("block has n = {n} shards, limit {max}")]
    TooManyShards {
        /// Claimed total shards.
        n: u64,
        /// The configured limit.
        max: u16,
    },
    /// A shard index was not below `n`.
    #[error("shard index {index} out of range for n = {n}")]
    IndexOutOfRange {
        /// Claimed index.
        index: u64,
        /// Claimed total shards.
        n: u64,
    },
    /// The shard size was zero or above the limit.
    #[error("shard size {size} out of range (1..={max})")]
    ShardSizeOutOfRange {
        /// Claimed shard size.
        size: u64,
        /// The configured limit.
        max: u32,
    },
    /// A block claimed to carry no messages.
    #[error("block carries no messages")]
    NoMessages,
    /// A block claimed more messages than the limit.
    #[error("block carries {count} messages, limit {max}")]
    TooManyMessages {
        /// Claimed message count.
        count: u64,
        /// The configured limit.
        max: u16,
    },
    /// A message id in the block would exceed the varint range.
    #[error("message ids overflow")]
    MessageIdOverflow,
    /// A message was longer than the limit.
    #[error("message of {len} bytes, limit {max}")]
    MessageTooLong {
        /// Claimed length.
        len: u64,
        /// The configured limit.
        max: u32,
    },
    /// `k` does not match the block's total length and shard size.
    #[error("block layout mismatch: k = {k}, but {total} bytes in shards of {shard_size} need {expected}")]
    LayoutMismatch {
        /// Claimed data shards.
        k: u64,
        /// Sum of the message lengths.
        total: u64,
        /// Claimed shard size.
        shard_size: u64,
        /// The data shard count the layout implies.
        expected: u64,
    },
    /// The shard payload is shorter than the block layout says it must be.
    #[error("shard payload of {actual} bytes, block layout needs {expected}")]
    ShardLenMismatch {
        /// Length the layout implies.
        expected: u64,
        /// Length present.
        actual: u64,
    },
    /// Bytes were left over after a complete frame.
    #[error("{0} trailing bytes after frame")]
    TrailingBytes(usize),
    /// An ack claimed more ranges than the limit.
    #[error("ack with {count} ranges, limit {max}")]
    TooManyAckRanges {
        /// Claimed range count.
        count: u64,
        /// The configured limit.
        max: u16,
    },
    /// An ack range would extend below message id 0.
    #[error("ack range underflows")]
    InvalidAckRange,
    /// A refuse frame had no ranges, or a range past 2^62 - 1.
    #[error("refuse frame without ranges or with a range past 2^62 - 1")]
    InvalidRefuseRange,
    /// A close reason was longer than the limit.
    #[error("close reason of {len} bytes, limit {max}")]
    ReasonTooLong {
        /// Claimed length.
        len: u64,
        /// The configured limit.
        max: u16,
    },
    /// An envelope's flags had bits set that this version does not define.
    #[error("envelope flags {0:#04x} unknown")]
    UnknownFlags(u8),
    /// An envelope's idempotency key was empty or longer than [`MAX_KEY_LEN`].
    #[error("idempotency key of {len} bytes, allowed 1..={max}", max = MAX_KEY_LEN)]
    KeyLength {
        /// Claimed length.
        len: u64,
    },
    /// A repair frame's window was empty, wider than 128 sources, or past 2^62 - 1.
    #[error("repair window of {count} sources from {first} out of range (1..=128)")]
    BadWindow {
        /// Claimed first source.
        first: u64,
        /// Claimed source count.
        count: u64,
    },
}

impl DecodeError {
    /// A short, stable name for the error's kind, for counting invalid frames by reason.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::Empty => "empty",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::UnknownType(_) => "unknown_type",
            DecodeError::ZeroDataShards => "zero_data_shards",
            DecodeError::DataShardsExceedTotal { .. } => "k_exceeds_n",
            DecodeError::TooManyShards { .. } => "too_many_shards",
            DecodeError::IndexOutOfRange { .. } => "index_out_of_range",
            DecodeError::ShardSizeOutOfRange { .. } => "shard_size_out_of_range",
            DecodeError::NoMessages => "no_messages",
            DecodeError::TooManyMessages { .. } => "too_many_messages",
            DecodeError::MessageIdOverflow => "message_id_overflow",
            DecodeError::MessageTooLong { .. } => "message_too_long",
            DecodeError::LayoutMismatch { .. } => "layout_mismatch",
            DecodeError::ShardLenMismatch { .. } => "shard_len_mismatch",
            DecodeError::TrailingBytes(_) => "trailing_bytes",
            DecodeError::TooManyAckRanges { .. } => "too_many_ack_ranges",
            DecodeError::InvalidAckRange => "invalid_ack_range",
            DecodeError::InvalidRefuseRange => "invalid_refuse_range",
            DecodeError::ReasonTooLong { .. } => "reason_too_long",
            DecodeError::UnknownFlags(_) => "unknown_envelope_flags",
            DecodeError::KeyLength { .. } => "key_length",
            DecodeError::BadWindow { .. } => "bad_window",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Varints (RFC 9000 §16)
// ---------------------------------------------------------------------------------------------

/// Bytes a varint encoding of `v` takes (minimal encoding).
///
/// Values above [`MAX_VARINT`] are reported as 8 bytes; [`put_varint`] does not accept them.
pub const fn varint_len(v: u64) -> usize {
    if v < (1 << 6) {
        1
    } else if v < (1 << 14) {
        2
    } else if v < (1 << 30) {
        4
    } else {
        8
    }
}

/// Writes `v` as a minimal QUIC varint.
///
/// # Panics
/// If `v > MAX_VARINT`. Every value this crate produces (ids count up from zero, sizes are
/// bounded by [`Limits`]) is far below it; a decoded frame never holds such a value.
pub fn put_varint<B: BufMut>(buf: &mut B, v: u64) {
    assert!(v <= MAX_VARINT, "varint value {v} exceeds 2^62-1");
    match varint_len(v) {
        1 => buf.put_u8(v as u8),
        2 => buf.put_u16(0x4000 | v as u16),
        4 => buf.put_u32(0x8000_0000 | v as u32),
        _ => buf.put_u64(0xc000_0000_0000_0000 | v),
    }
}

/// Reads one QUIC varint from the front of `buf`.
pub fn get_varint<B: Buf>(buf: &mut B) -> Result<u64, DecodeError> {
    if !buf.has_remaining() {
        return Err(DecodeError::Truncated);
    }
    let first = buf.chunk()[0];
    let len = 1usize << (first >> 6);
    if buf.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(match len {
        1 => u64::from(buf.get_u8() & 0x3f),
        2 => u64::from(buf.get_u16() & 0x3fff),
        4 => u64::from(buf.get_u32() & 0x3fff_ffff),
        _ => buf.get_u64() & 0x3fff_ffff_ffff_ffff,
    })
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// One decoded datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A Reed-Solomon shard of a block of messages.
    Shard(ShardFrame),
    /// An acknowledgement of message ids.
    Ack(AckFrame),
    /// The first frame of a channel: who is talking.
    Hello(HelloFrame),
    /// The peer is closing the channel.
    Close(CloseFrame),
    /// Sender → receiver: every message id below `floor` has its outcome at the sender.
    Floor(FloorFrame),
    /// Receiver → sender: these messages will not be delivered.
    Refuse(RefuseFrame),
    /// Receiver → sender (protocol 2): these messages were not delivered again because their
    /// idempotency key was delivered before with the same payload: they are acked as
    /// replays.
    Replayed(ReplayedFrame),
    /// Sender → receiver (protocol 2): one whole message, a source of the window code.
    Message(MessageFrame),
    /// Sender → receiver (protocol 2): a repair over consecutive sources.
    Repair(RepairFrame),
}

/// Sender → receiver (protocol 2): one message whose envelope fits one datagram, sent whole
/// as source `seq` of the sliding-window code ([`crate::fec::window`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageFrame {
    /// The source's sequence number, per connection from 0, `≤ 2^62 - 1`.
    pub seq: u64,
    /// The message id, `≤ 2^62 - 1`.
    pub id: u64,
    /// The envelope (the rest of the datagram), `≤ Limits::max_message_len` bytes.
    pub body: Bytes,
}

/// Sender → receiver (protocol 2): a repair symbol over sources `first .. first + count`
/// ([`crate::fec::window`] states the coefficients).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepairFrame {
    /// The repair's number, per connection from 0 (it picks the coefficients).
    pub repair: u64,
    /// The window's first source, `first + count - 1 ≤ 2^62 - 1`.
    pub first: u64,
    /// Sources covered, `1 ..= 128`.
    pub count: u64,
    /// `Σ c(repair, s) · symbol(s)`, `1 ..= Limits::max_shard_size` bytes.
    pub payload: Bytes,
}

/// Receiver → sender (protocol 2): messages acked as replays of an earlier delivery of their
/// idempotency key (same payload). The receiver names them here instead of in ACK ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayedFrame {
    /// Replayed ids, `1 ..= Limits::max_ack_ranges` ranges, each within `0 ..= 2^62 - 1`.
    pub ranges: Vec<RangeInclusive<u64>>,
}

impl ReplayedFrame {
    /// Whether `id` is named by this frame.
    pub fn contains(&self, id: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&id))
    }
}

/// Sender → receiver: every message id below `floor` has its outcome at the sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloorFrame {
    /// The sender's lowest id still awaiting its outcome (its next id when none is). At most
    /// 2^62 - 1.
    pub floor: u64,
}

/// Receiver → sender: messages the receiver will not deliver, now or later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefuseFrame {
    /// Why (a `REFUSE_*` code; others are unknown reasons). At most 2^62 - 1.
    pub reason: u64,
    /// Refused ids, `1 ..= Limits::max_ack_ranges` ranges, each within `0 ..= 2^62 - 1`.
    pub ranges: Vec<RangeInclusive<u64>>,
}

impl RefuseFrame {
    /// Whether `id` is refused by this frame.
    pub fn contains(&self, id: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&id))
    }
}

/// What every shard of one block carries: the code parameters and the block's layout.
///
/// Two shards belong to the same block exactly when their headers are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlockHeader {
    /// Block id, unique per sender per connection.
    pub block: u64,
    /// Data shards `k` (`1 ..= total_shards`).
    pub data_shards: u16,
    /// Total shards `n` the block may ever have (data plus the most parity the sender will send).
    pub total_shards: u16,
    /// Shard size `S` in bytes (`≥ 1`).
    pub shard_size: u32,
    /// Id of the first message; the block carries ids `first_message ..` consecutively.
    pub first_message: u64,
    /// Length of each message, in id order. Never empty.
    pub lengths: Lengths,
    /// CRC-32 (IEEE) of the concatenated messages.
    pub checksum: u32,
}

impl BlockHeader {
    /// Sum of the message lengths: the bytes the data shards carry.
    pub fn total_len(&self) -> u64 {
        self.lengths.iter().map(|&l| u64::from(l)).sum()
    }

    /// Ids of the messages in this block.
    pub fn messages(&self) -> RangeInclusive<u64> {
        let count = self.lengths.len().max(1) as u64;
        self.first_message..=self.first_message + (count - 1)
    }

    /// Number of parity shards the block may ever have (`n - k`).
    pub fn parity_shards(&self) -> u16 {
        self.total_shards - self.data_shards
    }

    /// Bytes that shard `index` carries on the wire: data shards are trimmed, parity shards
    /// are exactly `S`.
    pub fn shard_wire_len(&self, index: u16) -> usize {
        let s = u64::from(self.shard_size);
        if index >= self.data_shards {
            return s as usize;
        }
        let start = u64::from(index) * s;
        self.total_len().saturating_sub(start).min(s) as usize
    }

    /// Data shards a block of `total` bytes needs at shard size `shard_size` (at least 1).
    pub fn data_shards_for(total: u64, shard_size: u32) -> u64 {
        total.div_ceil(u64::from(shard_size.max(1))).max(1)
    }

    /// Bytes a shard frame of this block takes before its payload, for shard `index`.
    pub fn frame_overhead(&self, index: u16) -> usize {
        1 + varint_len(self.block)
            + varint_len(u64::from(self.data_shards))
            + varint_len(u64::from(self.total_shards))
            + varint_len(u64::from(index))
            + varint_len(u64::from(self.shard_size))
            + varint_len(self.first_message)
            + varint_len(self.lengths.len() as u64)
            + self
                .lengths
                .iter()
                .map(|&l| varint_len(u64::from(l)))
                .sum::<usize>()
            + 4
    }

    /// Writes a shard frame of this block: header, `index`, then `payload`.
    ///
    /// `payload` must be `shard_wire_len(index)` bytes for the frame to decode.
    pub fn encode_shard<B: BufMut>(&self, index: u16, payload: &[u8], buf: &mut B) {
        self.encode_head(buf);
        put_varint(buf, u64::from(index));
        self.encode_tail(buf);
        buf.put_slice(payload);
    }

    /// The part of a shard frame before the index: type, block, k, n. Same for every shard of
    /// the block; a sender can write it once and reuse it.
    pub fn encode_head<B: BufMut>(&self, buf: &mut B) {
        buf.put_u8(type_byte(TYPE_SHARD));
        put_varint(buf, self.block);
        put_varint(buf, u64::from(self.data_shards));
        put_varint(buf, u64::from(self.total_shards));
    }

    /// The part of a shard frame between the index and the payload: S, first message, count,
    /// lengths, checksum. Same for every shard of the block.
    pub fn encode_tail<B: BufMut>(&self, buf: &mut B) {
        put_varint(buf, u64::from(self.shard_size));
        put_varint(buf, self.first_message);
        put_varint(buf, self.lengths.len() as u64);
        for &len in &self.lengths {
            put_varint(buf, u64::from(len));
        }
        buf.put_u32(self.checksum);
    }
}

/// A shard frame: one shard of a block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardFrame {
    /// The block this shard belongs to.
    pub header: BlockHeader,
    /// This shard's index: `< k` data, `≥ k` parity.
    pub index: u16,
    /// The shard bytes (trimmed for data shards), a slice of the received datagram.
    pub payload: Bytes,
}

impl ShardFrame {
    /// Checks every rule [`Frame::decode`] enforces on a shard frame. Decoded frames always
    /// pass; this is for frames built by hand, which the reassembler does not trust.
    pub fn validate(&self, limits: &Limits) -> Result<(), DecodeError> {
        let h = &self.header;
        validate_shard(
            u64::from(h.data_shards),
            u64::from(h.total_shards),
            u64::from(self.index),
            u64::from(h.shard_size),
            h.first_message,
            &h.lengths,
            self.payload.len(),
            &limits.clamped(),
        )
    }

    /// Whether this is a data shard (`index < k`).
    pub fn is_data(&self) -> bool {
        self.index < self.header.data_shards
    }
}

/// An acknowledgement of message ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AckFrame {
    /// Microseconds between receiving the newest acked message and sending this ack
    /// ([`crate::proto::Receiver`] acks at once and sends 0).
    pub ack_delay_us: u64,
    /// Distinct shard frames the receiver has received from the peer so far (the sender's
    /// loss estimate compares it with the shards it sent). [`crate::proto::Receiver`] keeps
    /// counting across the connections of a channel: it does not restart at a reconnect.
    pub shards_received: u64,
    /// Acked ids, as ranges in strictly descending order with at least one unacked id between
    /// neighbours. Never empty.
    pub ranges: Vec<RangeInclusive<u64>>,
}

impl AckFrame {
    /// Whether `id` is acked by this frame.
    pub fn contains(&self, id: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(&id))
    }
}

/// The first frame of a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelloFrame {
    /// Random channel id, stable across reconnects of the same channel.
    pub channel_id: [u8; 16],
    /// The client's lowest message id still awaiting its outcome (its next id when none
    /// is): every id below has been acked or given up, so a server that starts the channel
    /// afresh from a shared claims store may treat them as handled. At most 2^62 - 1.
    pub floor: u64,
}

/// The peer is closing the channel. Reserved: this crate never sends it and ignores it when
/// received (a channel ends with QUIC's CONNECTION_CLOSE and an application close code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    /// Application close code.
    pub code: u64,
    /// Human-readable reason, not interpreted.
    pub reason: Bytes,
}

impl Frame {
    /// Decodes one datagram. Never panics; allocates at most `Limits::max_block_messages`
    /// lengths or `Limits::max_ack_ranges` ranges, and only after checking that the bytes for
    /// them are present.
    pub fn decode(mut datagram: Bytes, limits: &Limits) -> Result<Frame, DecodeError> {
        let limits = limits.clamped();
        if datagram.is_empty() {
            return Err(DecodeError::Empty);
        }
        let ty = datagram.get_u8();
        if ty >> 4 != VERSION {
            return Err(DecodeError::UnsupportedVersion(ty >> 4));
        }
        let frame = match ty & 0x0f {
            TYPE_SHARD => return decode_shard(datagram, &limits).map(Frame::Shard),
            TYPE_ACK => Frame::Ack(decode_ack(&mut datagram, &limits)?),
            TYPE_HELLO => {
                if datagram.remaining() < 16 {
                    return Err(DecodeError::Truncated);
                }
                let mut channel_id = [0u8; 16];
                datagram.copy_to_slice(&mut channel_id);
                let floor = if datagram.has_remaining() {
                    get_varint(&mut datagram)?
                } else {
                    0
                };
                Frame::Hello(HelloFrame { channel_id, floor })
            }
            TYPE_CLOSE => {
                let code = get_varint(&mut datagram)?;
                let len = get_varint(&mut datagram)?;
                if len > u64::from(limits.max_close_reason) {
                    return Err(DecodeError::ReasonTooLong {
                        len,
                        max: limits.max_close_reason,
                    });
                }
                if (datagram.remaining() as u64) < len {
                    return Err(DecodeError::Truncated);
                }
                let reason = datagram.split_to(len as usize);
                Frame::Close(CloseFrame { code, reason })
            }
            TYPE_FLOOR => Frame::Floor(FloorFrame {
                floor: get_varint(&mut datagram)?,
            }),
            TYPE_REFUSE => Frame::Refuse(decode_refuse(&mut datagram, &limits)?),
            TYPE_REPLAYED => Frame::Replayed(ReplayedFrame {
                ranges: decode_id_ranges(&mut datagram, &limits)?,
            }),
            TYPE_MESSAGE => {
                let seq = get_varint(&mut datagram)?;
                let id = get_varint(&mut datagram)?;
                if datagram.remaining() as u64 > u64::from(limits.max_message_len) {
                    return Err(DecodeError::MessageTooLong {
                        len: datagram.remaining() as u64,
                        max: limits.max_message_len,
                    });
                }
                return Ok(Frame::Message(MessageFrame {
                    seq,
                    id,
                    body: datagram,
                }));
            }
            TYPE_REPAIR => {
                let repair = get_varint(&mut datagram)?;
                let first = get_varint(&mut datagram)?;
                let count = get_varint(&mut datagram)?;
                let window = crate::fec::window::MAX_WINDOW;
                if count == 0 || count > window || first > MAX_VARINT - (count - 1) {
                    return Err(DecodeError::BadWindow { first, count });
                }
                if datagram.is_empty() {
                    return Err(DecodeError::Truncated);
                }
                if datagram.remaining() as u64 > u64::from(limits.max_shard_size) {
                    return Err(DecodeError::ShardSizeOutOfRange {
                        size: datagram.remaining() as u64,
                        max: limits.max_shard_size,
                    });
                }
                return Ok(Frame::Repair(RepairFrame {
                    repair,
                    first,
                    count,
                    payload: datagram,
                }));
            }
            _ => return Err(DecodeError::UnknownType(ty)),
        };
        if datagram.has_remaining() {
            return Err(DecodeError::TrailingBytes(datagram.remaining()));
        }
        Ok(frame)
    }

    /// Writes this frame. Infallible for frames that satisfy the invariants documented on
    /// their fields, which every decoded frame does.
    pub fn encode<B: BufMut>(&self, buf: &mut B) {
        match self {
            Frame::Shard(s) => s.header.encode_shard(s.index, &s.payload, buf),
            Frame::Ack(a) => {
                buf.put_u8(type_byte(TYPE_ACK));
                put_varint(buf, a.ack_delay_us);
                put_varint(buf, a.shards_received);
                let first = a.ranges.first().cloned().unwrap_or(0..=0);
                put_varint(buf, *first.end());
                put_varint(buf, a.ranges.len().saturating_sub(1) as u64);
                put_varint(buf, first.end().saturating_sub(*first.start()));
                let mut prev_start = *first.start();
                for r in a.ranges.iter().skip(1) {
                    put_varint(buf, prev_start.saturating_sub(*r.end()).saturating_sub(2));
                    put_varint(buf, r.end().saturating_sub(*r.start()));
                    prev_start = *r.start();
                }
            }
            Frame::Hello(h) => {
                buf.put_u8(type_byte(TYPE_HELLO));
                buf.put_slice(&h.channel_id);
                put_varint(buf, h.floor);
            }
            Frame::Close(c) => {
                buf.put_u8(type_byte(TYPE_CLOSE));
                put_varint(buf, c.code);
                put_varint(buf, c.reason.len() as u64);
                buf.put_slice(&c.reason);
            }
            Frame::Floor(f) => {
                buf.put_u8(type_byte(TYPE_FLOOR));
                put_varint(buf, f.floor);
            }
            Frame::Refuse(r) => {
                buf.put_u8(type_byte(TYPE_REFUSE));
                put_varint(buf, r.reason);
                put_id_ranges(buf, &r.ranges);
            }
            Frame::Replayed(r) => {
                buf.put_u8(type_byte(TYPE_REPLAYED));
                put_id_ranges(buf, &r.ranges);
            }
            Frame::Message(m) => {
                buf.put_u8(type_byte(TYPE_MESSAGE));
                put_varint(buf, m.seq);
                put_varint(buf, m.id);
                buf.put_slice(&m.body);
            }
            Frame::Repair(r) => {
                buf.put_u8(type_byte(TYPE_REPAIR));
                put_varint(buf, r.repair);
                put_varint(buf, r.first);
                put_varint(buf, r.count);
                buf.put_slice(&r.payload);
            }
        }
    }

    /// This frame encoded into a new buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = Vec::with_capacity(64);
        self.encode(&mut buf);
        Bytes::from(buf)
    }
}

// ---------------------------------------------------------------------------------------------
// Envelopes and stream messages
// ---------------------------------------------------------------------------------------------

/// Longest idempotency key, in bytes (the usual limit of payment APIs).
pub const MAX_KEY_LEN: usize = 255;

const FLAG_KEY: u8 = 0x01;
const FLAG_REQUEST: u8 = 0x02;
const FLAG_REPLY: u8 = 0x04;

/// What a message is to the application (protocol 2 adds requests and replies; envelope
/// flags bits 1 and 2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A message (flags bits 1 and 2 clear): the only kind protocol 1 has.
    #[default]
    Message,
    /// A request (bit 1, protocol 2): its sender waits for the receiving application's reply.
    Request,
    /// A reply (bit 2, protocol 2) to the peer's request with message id `to` (in the peer's
    /// id space).
    Reply {
        /// The request's message id.
        to: u64,
    },
}

/// A message as the application sent it: an optional idempotency key, its kind and the
/// payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The application's idempotency key, `1 ..= MAX_KEY_LEN` bytes.
    pub key: Option<Bytes>,
    /// A message, a request or a reply.
    pub kind: Kind,
    /// The application's message.
    pub payload: Bytes,
}

impl Envelope {
    /// Bytes a message's envelope adds in front of the payload.
    pub fn overhead(key: Option<&[u8]>) -> usize {
        Self::overhead_of(key, Kind::Message)
    }

    /// Bytes an envelope of `kind` adds in front of the payload.
    pub fn overhead_of(key: Option<&[u8]>, kind: Kind) -> usize {
        let to = match kind {
            Kind::Reply { to } => varint_len(to),
            _ => 0,
        };
        1 + key.map_or(0, |k| varint_len(k.len() as u64) + k.len()) + to
    }

    /// Encodes a message's envelope. The key must be `1 ..= MAX_KEY_LEN` bytes (callers
    /// check it).
    pub fn encode(key: Option<&[u8]>, payload: &[u8]) -> Bytes {
        Self::encode_kind(key, Kind::Message, payload)
    }

    /// Encodes an envelope of `kind` (requests and replies: protocol 2 only). The key must be
    /// `1 ..= MAX_KEY_LEN` bytes and a reply's `to` at most [`MAX_VARINT`] (callers check).
    pub fn encode_kind(key: Option<&[u8]>, kind: Kind, payload: &[u8]) -> Bytes {
        let mut buf = Vec::with_capacity(Self::overhead_of(key, kind) + payload.len());
        let mut flags = if key.is_some() { FLAG_KEY } else { 0 };
        match kind {
            Kind::Message => {}
            Kind::Request => flags |= FLAG_REQUEST,
            Kind::Reply { .. } => flags |= FLAG_REPLY,
        }
        buf.put_u8(flags);
        if let Some(k) = key {
            put_varint(&mut buf, k.len() as u64);
            buf.put_slice(k);
        }
        if let Kind::Reply { to } = kind {
            put_varint(&mut buf, to);
        }
        buf.put_slice(payload);
        Bytes::from(buf)
    }

    /// Whether `body` is a reply's envelope (its flags say so; the rest is not checked).
    pub fn is_reply(body: &[u8]) -> bool {
        body.first()
            .is_some_and(|&f| f & FLAG_REPLY != 0 && f & FLAG_REQUEST == 0)
    }

    /// Decodes an envelope; the key and the payload are zero-copy slices of `body`.
    pub fn decode(mut body: Bytes) -> Result<Envelope, DecodeError> {
        if body.is_empty() {
            return Err(DecodeError::Empty);
        }
        let flags = body.get_u8();
        if flags & !(FLAG_KEY | FLAG_REQUEST | FLAG_REPLY) != 0
            || flags & (FLAG_REQUEST | FLAG_REPLY) == FLAG_REQUEST | FLAG_REPLY
        {
            return Err(DecodeError::UnknownFlags(flags));
        }
        let key = if flags & FLAG_KEY != 0 {
            let len = get_varint(&mut body)?;
            if len == 0 || len > MAX_KEY_LEN as u64 {
                return Err(DecodeError::KeyLength { len });
            }
            if (body.remaining() as u64) < len {
                return Err(DecodeError::Truncated);
            }
            Some(body.split_to(len as usize))
        } else {
            None
        };
        let kind = if flags & FLAG_REQUEST != 0 {
            Kind::Request
        } else if flags & FLAG_REPLY != 0 {
            Kind::Reply {
                to: get_varint(&mut body)?,
            }
        } else {
            Kind::Message
        };
        Ok(Envelope {
            key,
            kind,
            payload: body,
        })
    }
}

/// Status byte a receiver answers a stream message with: delivered, now or before.
pub const STREAM_DELIVERED: u8 = 0;
/// Status byte a receiver answers a stream message with: refused, not delivered.
pub const STREAM_REFUSED: u8 = 1;
/// Status byte (protocol 2) a receiver answers a stream message with: not delivered again,
/// because its idempotency key was delivered before with the same payload (a replay; acked).
pub const STREAM_REPLAYED: u8 = 2;

/// A server's answer to a Hello (one byte on the Hello's stream): the channel id is new to
/// it, so it holds no state (no dedupe window) for the channel.
pub const HELLO_NEW: u8 = 1;
/// A server's answer to a Hello: it still holds the channel's state, so messages re-sent
/// with their ids are recognised.
pub const HELLO_RESUMED: u8 = 2;
/// A server's answer to a Hello: it did not hold the channel, but every delivery is claimed
/// in a store it shares with other replicas, so messages re-sent with their ids are
/// recognised there (the client re-sends what is unacked); its own message ids start over.
pub const HELLO_CLAIMS: u8 = 3;

/// The head of a stream message: the type byte and the message id. The envelope follows.
pub fn encode_stream_head(id: u64) -> Bytes {
    let mut buf = Vec::with_capacity(9);
    buf.put_u8(type_byte(TYPE_STREAM_MESSAGE));
    put_varint(&mut buf, id);
    Bytes::from(buf)
}

/// Splits a whole stream message into its id and its envelope bytes.
pub fn decode_stream_message(mut stream: Bytes) -> Result<(u64, Bytes), DecodeError> {
    if stream.is_empty() {
        return Err(DecodeError::Empty);
    }
    let ty = stream.get_u8();
    if ty >> 4 != VERSION {
        return Err(DecodeError::UnsupportedVersion(ty >> 4));
    }
    if ty & 0x0f != TYPE_STREAM_MESSAGE {
        return Err(DecodeError::UnknownType(ty));
    }
    let id = get_varint(&mut stream)?;
    Ok((id, stream))
}

fn decode_shard(mut buf: Bytes, limits: &Limits) -> Result<ShardFrame, DecodeError> {
    let block = get_varint(&mut buf)?;
    let k = get_varint(&mut buf)?;
    let n = get_varint(&mut buf)?;
    let index = get_varint(&mut buf)?;
    let size = get_varint(&mut buf)?;
    let first_message = get_varint(&mut buf)?;
    let count = get_varint(&mut buf)?;

    // Checked before the allocation for the lengths; the rest in `validate_shard`.
    if count > u64::from(limits.max_block_messages) {
        return Err(DecodeError::TooManyMessages {
            count,
            max: limits.max_block_messages,
        });
    }
    // Each length takes at least one byte: refuse before allocating if they cannot be there.
    if (buf.remaining() as u64) < count {
        return Err(DecodeError::Truncated);
    }
    let mut lengths = Lengths::with_capacity(count as usize);
    for _ in 0..count {
        let len = get_varint(&mut buf)?;
        if len > u64::from(limits.max_message_len) {
            return Err(DecodeError::MessageTooLong {
                len,
                max: limits.max_message_len,
            });
        }
        lengths.push(len as u32);
    }
    if buf.remaining() < 4 {
        return Err(DecodeError::Truncated);
    }
    let checksum = buf.get_u32();
    validate_shard(
        k,
        n,
        index,
        size,
        first_message,
        &lengths,
        buf.len(),
        limits,
    )?;

    // All bounded by validate_shard: k, n, index ≤ 256; size ≤ u32::MAX.
    Ok(ShardFrame {
        header: BlockHeader {
            block,
            data_shards: k as u16,
            total_shards: n as u16,
            shard_size: size as u32,
            first_message,
            lengths,
            checksum,
        },
        index: index as u16,
        payload: buf,
    })
}

/// Every rule a shard frame must satisfy, in the order they are reported.
#[allow(clippy::too_many_arguments)]
fn validate_shard(
    k: u64,
    n: u64,
    index: u64,
    size: u64,
    first_message: u64,
    lengths: &[u32],
    payload_len: usize,
    limits: &Limits,
) -> Result<(), DecodeError> {
    if n > u64::from(limits.max_shards) {
        return Err(DecodeError::TooManyShards {
            n,
            max: limits.max_shards,
        });
    }
    if k == 0 {
        return Err(DecodeError::ZeroDataShards);
    }
    if k > n {
        return Err(DecodeError::DataShardsExceedTotal { k, n });
    }
    if index >= n {
        return Err(DecodeError::IndexOutOfRange { index, n });
    }
    if size == 0 || size > u64::from(limits.max_shard_size) {
        return Err(DecodeError::ShardSizeOutOfRange {
            size,
            max: limits.max_shard_size,
        });
    }
    let count = lengths.len() as u64;
    if count == 0 {
        return Err(DecodeError::NoMessages);
    }
    if count > u64::from(limits.max_block_messages) {
        return Err(DecodeError::TooManyMessages {
            count,
            max: limits.max_block_messages,
        });
    }
    if first_message > MAX_VARINT - (count - 1) {
        return Err(DecodeError::MessageIdOverflow);
    }
    if let Some(&len) = lengths.iter().find(|&&l| l > limits.max_message_len) {
        return Err(DecodeError::MessageTooLong {
            len: u64::from(len),
            max: limits.max_message_len,
        });
    }
    let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
    let expected_k = BlockHeader::data_shards_for(total, size as u32);
    if expected_k != k {
        return Err(DecodeError::LayoutMismatch {
            k,
            total,
            shard_size: size,
            expected: expected_k,
        });
    }
    let expected = if index >= k {
        size
    } else {
        total.saturating_sub(index * size).min(size)
    };
    let actual = payload_len as u64;
    if actual < expected {
        return Err(DecodeError::ShardLenMismatch { expected, actual });
    }
    if actual > expected {
        return Err(DecodeError::TrailingBytes((actual - expected) as usize));
    }
    Ok(())
}

fn put_id_ranges<B: BufMut>(buf: &mut B, ranges: &[RangeInclusive<u64>]) {
    put_varint(buf, ranges.len() as u64);
    for range in ranges {
        put_varint(buf, *range.start());
        put_varint(buf, range.end().saturating_sub(*range.start()));
    }
}

fn decode_refuse(buf: &mut Bytes, limits: &Limits) -> Result<RefuseFrame, DecodeError> {
    let reason = get_varint(buf)?;
    let ranges = decode_id_ranges(buf, limits)?;
    Ok(RefuseFrame { reason, ranges })
}

/// `count` then `(first, extra)` × count, as REFUSE and REPLAYED carry them.
fn decode_id_ranges(
    buf: &mut Bytes,
    limits: &Limits,
) -> Result<Vec<RangeInclusive<u64>>, DecodeError> {
    let count = get_varint(buf)?;
    if count == 0 {
        return Err(DecodeError::InvalidRefuseRange);
    }
    if count > u64::from(limits.max_ack_ranges) {
        return Err(DecodeError::TooManyAckRanges {
            count,
            max: limits.max_ack_ranges,
        });
    }
    // Every range takes at least two bytes.
    if (buf.remaining() as u64) < 2 * count {
        return Err(DecodeError::Truncated);
    }
    let mut ranges = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let first = get_varint(buf)?;
        let extra = get_varint(buf)?;
        let last = first
            .checked_add(extra)
            .filter(|&l| l <= MAX_VARINT)
            .ok_or(DecodeError::InvalidRefuseRange)?;
        ranges.push(first..=last);
    }
    Ok(ranges)
}

fn decode_ack(buf: &mut Bytes, limits: &Limits) -> Result<AckFrame, DecodeError> {
    let ack_delay_us = get_varint(buf)?;
    let shards_received = get_varint(buf)?;
    let largest = get_varint(buf)?;
    let extra = get_varint(buf)?;
    if extra >= u64::from(limits.max_ack_ranges) {
        return Err(DecodeError::TooManyAckRanges {
            count: extra.saturating_add(1),
            max: limits.max_ack_ranges,
        });
    }
    // The first range takes at least one byte, every further range at least two.
    if (buf.remaining() as u64) < 1 + 2 * extra {
        return Err(DecodeError::Truncated);
    }
    let first = get_varint(buf)?;
    let mut start = largest
        .checked_sub(first)
        .ok_or(DecodeError::InvalidAckRange)?;
    let mut ranges = Vec::with_capacity(1 + extra as usize);
    ranges.push(start..=largest);
    for _ in 0..extra {
        let gap = get_varint(buf)?;
        let len = get_varint(buf)?;
        let end = start
            .checked_sub(gap + 2)
            .ok_or(DecodeError::InvalidAckRange)?;
        start = end.checked_sub(len).ok_or(DecodeError::InvalidAckRange)?;
        ranges.push(start..=end);
    }
    Ok(AckFrame {
        ack_delay_us,
        shards_received,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(bytes: &[u8]) -> Result<Frame, DecodeError> {
        Frame::decode(Bytes::copy_from_slice(bytes), &Limits::default())
    }

    fn header(lengths: Vec<u32>, shard_size: u32, parity: u16) -> BlockHeader {
        let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
        let k = BlockHeader::data_shards_for(total, shard_size) as u16;
        BlockHeader {
            block: 7,
            data_shards: k,
            total_shards: k + parity,
            shard_size,
            first_message: 100,
            lengths: lengths.into(),
            checksum: 0xdead_beef,
        }
    }

    fn shard_bytes(h: &BlockHeader, index: u16) -> Vec<u8> {
        let mut buf = Vec::new();
        let payload = vec![0xa5u8; h.shard_wire_len(index)];
        h.encode_shard(index, &payload, &mut buf);
        buf
    }

    #[test]
    fn varint_boundaries_round_trip() {
        for v in [0, 63, 64, 16383, 16384, (1 << 30) - 1, 1 << 30, MAX_VARINT] {
            let mut buf = Vec::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "length of {v}");
            assert_eq!(get_varint(&mut &buf[..]), Ok(v));
        }
    }

    #[test]
    fn varint_rfc9000_examples() {
        // RFC 9000 Appendix A.1 sample encodings, including a non-minimal one.
        let cases: [(&[u8], u64); 5] = [
            (
                &[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c],
                151_288_809_941_952_652,
            ),
            (&[0x9d, 0x7f, 0x3e, 0x7d], 494_878_333),
            (&[0x7b, 0xbd], 15_293),
            (&[0x25], 37),
            (&[0x40, 0x25], 37),
        ];
        for (bytes, v) in cases {
            assert_eq!(get_varint(&mut &bytes[..]), Ok(v));
        }
        assert_eq!(get_varint(&mut &[0x40][..]), Err(DecodeError::Truncated));
    }

    #[test]
    fn golden_shard_frame() {
        let h = BlockHeader {
            block: 1,
            data_shards: 1,
            total_shards: 3,
            shard_size: 5,
            first_message: 9,
            lengths: Lengths::from_slice(&[5]),
            checksum: 0x0102_0304,
        };
        let mut buf = Vec::new();
        h.encode_shard(2, b"hello", &mut buf);
        let golden = [
            0x11, // v1 shard
            0x01, // block 1
            0x01, 0x03, 0x02, // k=1, n=3, index=2
            0x05, // S=5
            0x09, // first message 9
            0x01, 0x05, // one message of 5 bytes
            0x01, 0x02, 0x03, 0x04, // checksum
            b'h', b'e', b'l', b'l', b'o',
        ];
        assert_eq!(buf, golden);
        assert_eq!(buf.len(), h.frame_overhead(2) + 5);
        match decode(&golden).unwrap() {
            Frame::Shard(s) => {
                assert_eq!(s.header, h);
                assert_eq!(s.index, 2);
                assert!(!s.is_data());
                assert_eq!(&s.payload[..], b"hello");
            }
            other => panic!("decoded {other:?}"),
        }
    }

    #[test]
    fn golden_ack_frame() {
        let ack = AckFrame {
            ack_delay_us: 300,
            shards_received: 2,
            ranges: vec![10..=12, 5..=7, 0..=0],
        };
        let golden = [
            0x12, // v1 ack
            0x41, 0x2c, // delay 300
            0x02, // shards received
            0x0c, // largest 12
            0x02, // two extra ranges
            0x02, // first range: 10..=12
            0x01, 0x02, // gap 1 (ids 8, 9), len 2: 5..=7
            0x03, 0x00, // gap 3 (ids 1..=4), len 0: 0..=0
        ];
        assert_eq!(&Frame::Ack(ack.clone()).to_bytes()[..], golden);
        assert_eq!(decode(&golden), Ok(Frame::Ack(ack)));
    }

    #[test]
    fn golden_hello_and_close() {
        let hello = [
            0x13, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0x41, 0x2c,
        ];
        let f = decode(&hello).unwrap();
        assert_eq!(
            f,
            Frame::Hello(HelloFrame {
                channel_id: core::array::from_fn(|i| i as u8),
                floor: 300,
            })
        );
        assert_eq!(&f.to_bytes()[..], hello);
        // Without the optional floor: 0.
        assert_eq!(
            decode(&hello[..17]),
            Ok(Frame::Hello(HelloFrame {
                channel_id: core::array::from_fn(|i| i as u8),
                floor: 0,
            }))
        );

        let close = [0x14, 0x07, 0x02, b'o', b'k'];
        let f = decode(&close).unwrap();
        assert_eq!(
            f,
            Frame::Close(CloseFrame {
                code: 7,
                reason: Bytes::from_static(b"ok")
            })
        );
        assert_eq!(&f.to_bytes()[..], close);
    }

    #[test]
    fn rejects_type_and_version() {
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
        assert_eq!(decode(&[0x21]), Err(DecodeError::UnsupportedVersion(2)));
        assert_eq!(decode(&[0x01]), Err(DecodeError::UnsupportedVersion(0)));
        assert_eq!(decode(&[0x15]), Err(DecodeError::UnknownType(0x15)));
        assert_eq!(decode(&[0x10]), Err(DecodeError::UnknownType(0x10)));
    }

    /// Writes a shard frame with arbitrary (possibly invalid) header values.
    fn raw_shard(
        k: u64,
        n: u64,
        index: u64,
        size: u64,
        lengths: &[u64],
        payload: usize,
    ) -> Vec<u8> {
        let mut buf = vec![0x11, 0x00];
        for v in [k, n, index, size, 0, lengths.len() as u64] {
            put_varint(&mut buf, v);
        }
        for &l in lengths {
            put_varint(&mut buf, l);
        }
        buf.extend_from_slice(&[0; 4]);
        buf.extend(std::iter::repeat_n(0xa5, payload));
        buf
    }

    #[test]
    fn rejects_each_malformed_shard() {
        use DecodeError::*;
        // Sanity: the raw writer makes valid frames when asked to.
        assert!(decode(&raw_shard(2, 4, 3, 10, &[15], 10)).is_ok());
        assert!(decode(&raw_shard(2, 4, 1, 10, &[15], 5)).is_ok());

        assert_eq!(
            decode(&raw_shard(0, 4, 0, 10, &[15], 10)),
            Err(ZeroDataShards)
        );
        assert_eq!(
            decode(&raw_shard(5, 4, 0, 10, &[15], 10)),
            Err(DataShardsExceedTotal { k: 5, n: 4 })
        );
        assert_eq!(
            decode(&raw_shard(2, 257, 0, 10, &[15], 10)),
            Err(TooManyShards { n: 257, max: 256 })
        );
        assert_eq!(
            decode(&raw_shard(2, 4, 4, 10, &[15], 10)),
            Err(IndexOutOfRange { index: 4, n: 4 })
        );
        assert_eq!(
            decode(&raw_shard(1, 4, 0, 0, &[0], 0)),
            Err(ShardSizeOutOfRange {
                size: 0,
                max: 16384
            })
        );
        assert_eq!(
            decode(&raw_shard(1, 4, 0, 16385, &[5], 5)),
            Err(ShardSizeOutOfRange {
                size: 16385,
                max: 16384
            })
        );
        assert_eq!(decode(&raw_shard(1, 4, 0, 10, &[], 0)), Err(NoMessages));
        assert_eq!(
            decode(&raw_shard(1, 4, 0, 10, &[0; 65], 0)),
            Err(TooManyMessages { count: 65, max: 64 })
        );
        assert_eq!(
            decode(&raw_shard(1, 4, 0, 10, &[65537], 10)),
            Err(MessageTooLong {
                len: 65537,
                max: 65536
            })
        );
        assert_eq!(
            decode(&raw_shard(3, 4, 0, 10, &[15], 10)),
            Err(LayoutMismatch {
                k: 3,
                total: 15,
                shard_size: 10,
                expected: 2
            })
        );
        // Data shard 1 of a 15-byte block in 10-byte shards carries 5 bytes.
        assert_eq!(
            decode(&raw_shard(2, 4, 1, 10, &[15], 4)),
            Err(ShardLenMismatch {
                expected: 5,
                actual: 4
            })
        );
        assert_eq!(
            decode(&raw_shard(2, 4, 1, 10, &[15], 6)),
            Err(TrailingBytes(1))
        );
        // Parity shards carry exactly S.
        assert_eq!(
            decode(&raw_shard(2, 4, 2, 10, &[15], 9)),
            Err(ShardLenMismatch {
                expected: 10,
                actual: 9
            })
        );
        assert_eq!(
            decode(&raw_shard(2, 4, 2, 10, &[15], 11)),
            Err(TrailingBytes(1))
        );
        // A huge claimed count with nothing behind it fails without allocating for it.
        let mut huge = vec![0x11, 0x00, 0x01, 0x02, 0x00, 0x01, 0x00];
        put_varint(&mut huge, 60);
        assert_eq!(decode(&huge), Err(Truncated));
        // Ids that would pass 2^62.
        let mut ovf = vec![0x11, 0x00, 0x01, 0x02, 0x00, 0x01];
        put_varint(&mut ovf, MAX_VARINT);
        ovf.extend_from_slice(&[0x02, 0x00, 0x00, 0, 0, 0, 0]);
        assert_eq!(decode(&ovf), Err(MessageIdOverflow));
    }

    #[test]
    fn limits_are_configurable() {
        let limits = Limits {
            max_shards: 8,
            max_data_shards: 8,
            max_block_shards: 8,
            max_shard_size: 100,
            max_message_len: 50,
            max_block_messages: 2,
            max_ack_ranges: 2,
            max_close_reason: 3,
        };
        let d = |b: Vec<u8>| Frame::decode(Bytes::from(b), &limits);
        assert!(d(raw_shard(1, 8, 7, 50, &[50], 50)).is_ok());
        assert_eq!(
            d(raw_shard(1, 9, 0, 50, &[50], 50)),
            Err(DecodeError::TooManyShards { n: 9, max: 8 })
        );
        assert_eq!(
            d(raw_shard(1, 8, 0, 101, &[50], 50)),
            Err(DecodeError::ShardSizeOutOfRange {
                size: 101,
                max: 100
            })
        );
        assert_eq!(
            d(raw_shard(1, 8, 0, 60, &[51], 51)),
            Err(DecodeError::MessageTooLong { len: 51, max: 50 })
        );
        assert_eq!(
            d(raw_shard(1, 8, 0, 60, &[1, 1, 1], 3)),
            Err(DecodeError::TooManyMessages { count: 3, max: 2 })
        );
        let ack = |n: usize| {
            Frame::Ack(AckFrame {
                ack_delay_us: 0,
                shards_received: 0,
                ranges: (0..n as u64).rev().map(|i| 3 * i..=3 * i).collect(),
            })
            .to_bytes()
            .to_vec()
        };
        assert!(d(ack(2)).is_ok());
        assert_eq!(
            d(ack(3)),
            Err(DecodeError::TooManyAckRanges { count: 3, max: 2 })
        );
        assert_eq!(
            d(vec![0x14, 0x00, 0x04, 1, 2, 3, 4]),
            Err(DecodeError::ReasonTooLong { len: 4, max: 3 })
        );
    }

    #[test]
    fn floor_and_refuse_golden_bytes_and_bounds() {
        let floor = [0x16, 0x43, 0xe8];
        let f = decode(&floor).unwrap();
        assert_eq!(f, Frame::Floor(FloorFrame { floor: 1000 }));
        assert_eq!(&f.to_bytes()[..], floor);
        assert_eq!(decode(&[0x16]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x16, 1, 2]), Err(DecodeError::TrailingBytes(1)));

        // Reason 2, two ranges: 7..=9 and 20..=20.
        let refuse = [0x17, 0x02, 0x02, 0x07, 0x02, 0x14, 0x00];
        let f = decode(&refuse).unwrap();
        assert_eq!(
            f,
            Frame::Refuse(RefuseFrame {
                reason: REFUSE_OUT_OF_WINDOW,
                ranges: vec![7..=9, 20..=20],
            })
        );
        assert_eq!(&f.to_bytes()[..], refuse);
        assert_eq!(
            decode(&[0x17, 0x02, 0x00]),
            Err(DecodeError::InvalidRefuseRange)
        );
        // 65 ranges claimed with nothing behind them: refused before allocating.
        assert_eq!(
            decode(&[0x17, 0x02, 0x40, 0x41]),
            Err(DecodeError::TooManyAckRanges { count: 65, max: 64 })
        );
        assert_eq!(decode(&[0x17, 0x02, 0x3f, 0]), Err(DecodeError::Truncated));
        // first + extra past 2^62 - 1.
        let mut over = vec![0x17, 0x01, 0x01];
        put_varint(&mut over, MAX_VARINT);
        put_varint(&mut over, 1);
        assert_eq!(decode(&over), Err(DecodeError::InvalidRefuseRange));
    }

    #[test]
    fn rejects_bad_acks_and_trailing_bytes() {
        // largest 3, first range 4: would start below zero.
        assert_eq!(
            decode(&[0x12, 0, 0, 3, 0, 4]),
            Err(DecodeError::InvalidAckRange)
        );
        // largest 3, first 0 (3..=3), then gap 2 would end at 3-4 < 0.
        assert_eq!(
            decode(&[0x12, 0, 0, 3, 1, 0, 2, 0]),
            Err(DecodeError::InvalidAckRange)
        );
        // Claims 63 extra ranges with no bytes behind them.
        assert_eq!(
            decode(&[0x12, 0, 0, 3, 0x3f, 0]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode(&[0x12, 0, 0, 3, 0, 0, 9]),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(decode(&[0x13, 1, 2, 3]), Err(DecodeError::Truncated));
        let mut hello = vec![0x13; 19]; // type, id, floor 19, one byte too many
        hello[0] = 0x13;
        assert_eq!(decode(&hello), Err(DecodeError::TrailingBytes(1)));
        assert_eq!(decode(&[0x14, 0, 5, b'a']), Err(DecodeError::Truncated));
    }

    #[test]
    fn every_truncation_of_a_valid_shard_is_rejected() {
        let h = header(vec![300, 20, 0, 700], 256, 3);
        for index in 0..h.total_shards {
            let full = shard_bytes(&h, index);
            assert!(decode(&full).is_ok());
            for cut in 0..full.len() {
                assert!(decode(&full[..cut]).is_err(), "index {index} cut {cut}");
            }
        }
    }

    #[test]
    fn payload_is_a_zero_copy_slice() {
        let h = header(vec![40], 40, 1);
        let datagram = Bytes::from(shard_bytes(&h, 0));
        let Ok(Frame::Shard(s)) = Frame::decode(datagram.clone(), &Limits::default()) else {
            panic!("decode failed");
        };
        let start = datagram.len() - 40;
        assert_eq!(s.payload.as_ptr(), datagram[start..].as_ptr());
    }

    fn arb_header() -> impl Strategy<Value = (BlockHeader, u16)> {
        (
            any::<u64>().prop_map(|b| b & MAX_VARINT),
            prop::collection::vec(0u32..5000, 1..8),
            1u32..2000,
            0u16..10,
            0u64..(1 << 40),
            any::<u32>(),
        )
            .prop_filter_map(
                "k + parity ≤ 256",
                |(block, lengths, s, parity, first, crc)| {
                    let total: u64 = lengths.iter().map(|&l| u64::from(l)).sum();
                    let k = BlockHeader::data_shards_for(total, s);
                    (k + u64::from(parity) <= 256).then(|| BlockHeader {
                        block,
                        data_shards: k as u16,
                        total_shards: k as u16 + parity,
                        shard_size: s,
                        first_message: first,
                        lengths: lengths.into(),
                        checksum: crc,
                    })
                },
            )
            .prop_flat_map(|h| {
                let n = h.total_shards;
                (Just(h), 0..n)
            })
    }

    fn arb_ack() -> impl Strategy<Value = AckFrame> {
        (
            any::<u64>().prop_map(|v| v & MAX_VARINT),
            any::<u64>().prop_map(|v| v & MAX_VARINT),
            0u64..(1 << 40),
            prop::collection::vec((0u64..1000, 0u64..1000), 0..63),
        )
            .prop_map(|(delay, rx, largest, rest)| {
                // Build descending ranges that stop before id 0.
                let mut ranges = Vec::new();
                let mut end = largest;
                let mut first = true;
                for (gap, len) in std::iter::once((0, rest.len() as u64 % 7)).chain(rest) {
                    let e = if first {
                        end
                    } else {
                        match end.checked_sub(gap + 2) {
                            Some(e) => e,
                            None => break,
                        }
                    };
                    first = false;
                    let s = e.saturating_sub(len);
                    ranges.push(s..=e);
                    end = s;
                }
                AckFrame {
                    ack_delay_us: delay,
                    shards_received: rx,
                    ranges,
                }
            })
    }

    #[test]
    fn envelope_rejects_bad_keys_and_flags() {
        assert_eq!(Envelope::decode(Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            Envelope::decode(Bytes::from_static(&[0x08, 1, 2])),
            Err(DecodeError::UnknownFlags(0x08))
        );
        // A request and a reply at once is no kind.
        assert_eq!(
            Envelope::decode(Bytes::from_static(&[0x06, 1, 2])),
            Err(DecodeError::UnknownFlags(0x06))
        );
        // A reply whose request id is cut short.
        assert_eq!(
            Envelope::decode(Bytes::from_static(&[0x04, 0x40])),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            Envelope::decode(Bytes::from_static(&[0x01, 0])),
            Err(DecodeError::KeyLength { len: 0 })
        );
        let mut long = vec![0x01];
        put_varint(&mut long, 256);
        long.extend(std::iter::repeat_n(7u8, 256));
        assert_eq!(
            Envelope::decode(Bytes::from(long)),
            Err(DecodeError::KeyLength { len: 256 })
        );
        assert_eq!(
            Envelope::decode(Bytes::from_static(&[0x01, 5, b'a'])),
            Err(DecodeError::Truncated)
        );
        let plain = Envelope::decode(Bytes::from_static(&[0, b'h', b'i'])).unwrap();
        assert_eq!((plain.key, &plain.payload[..]), (None, &b"hi"[..]));
        assert_eq!(
            decode_stream_message(Bytes::from_static(&[0x11, 0])),
            Err(DecodeError::UnknownType(0x11))
        );
    }

    proptest! {
        #[test]
        fn shard_round_trip((h, index) in arb_header(), fill in any::<u8>()) {
            let payload = vec![fill; h.shard_wire_len(index)];
            let mut buf = Vec::new();
            h.encode_shard(index, &payload, &mut buf);
            prop_assert_eq!(buf.len(), h.frame_overhead(index) + payload.len());
            let f = Frame::decode(Bytes::from(buf.clone()), &Limits::default()).unwrap();
            let expected = Frame::Shard(ShardFrame { header: h, index, payload: Bytes::from(payload) });
            prop_assert_eq!(&f, &expected);
            prop_assert_eq!(f.to_bytes().to_vec(), buf);
        }

        #[test]
        fn ack_round_trip(ack in arb_ack()) {
            let f = Frame::Ack(ack);
            let bytes = f.to_bytes();
            prop_assert_eq!(Frame::decode(bytes, &Limits::default()), Ok(f));
        }

        #[test]
        fn hello_round_trip(id in any::<[u8; 16]>(), floor in 0..MAX_VARINT) {
            let f = Frame::Hello(HelloFrame { channel_id: id, floor });
            prop_assert_eq!(Frame::decode(f.to_bytes(), &Limits::default()), Ok(f));
        }

        #[test]
        fn floor_round_trip(floor in 0..MAX_VARINT) {
            let f = Frame::Floor(FloorFrame { floor });
            prop_assert_eq!(Frame::decode(f.to_bytes(), &Limits::default()), Ok(f));
        }

        #[test]
        fn refuse_round_trip(
            reason in 0..MAX_VARINT,
            ranges in prop::collection::vec((0u64..(1 << 50), 0u64..1000), 1..=64),
        ) {
            let f = Frame::Refuse(RefuseFrame {
                reason,
                ranges: ranges.into_iter().map(|(a, n)| a..=a + n).collect(),
            });
            prop_assert_eq!(Frame::decode(f.to_bytes(), &Limits::default()), Ok(f));
        }

        #[test]
        fn close_round_trip(code in 0..MAX_VARINT, reason in prop::collection::vec(any::<u8>(), 0..=256)) {
            let f = Frame::Close(CloseFrame { code, reason: Bytes::from(reason) });
            prop_assert_eq!(Frame::decode(f.to_bytes(), &Limits::default()), Ok(f));
        }

        #[test]
        fn envelope_round_trip(
            key in prop::option::of(prop::collection::vec(any::<u8>(), 1..=MAX_KEY_LEN)),
            kind in prop_oneof![
                Just(Kind::Message),
                Just(Kind::Request),
                (0..=MAX_VARINT).prop_map(|to| Kind::Reply { to }),
            ],
            payload in prop::collection::vec(any::<u8>(), 0..300),
        ) {
            let bytes = Envelope::encode_kind(key.as_deref(), kind, &payload);
            prop_assert_eq!(bytes.len(), Envelope::overhead_of(key.as_deref(), kind) + payload.len());
            let e = Envelope::decode(bytes).unwrap();
            prop_assert_eq!(e.key.as_deref(), key.as_deref());
            prop_assert_eq!(e.kind, kind);
            prop_assert_eq!(&e.payload[..], &payload[..]);
        }

        #[test]
        fn envelope_and_stream_decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(e) = Envelope::decode(Bytes::from(bytes.clone())) {
                let again = Envelope::encode_kind(e.key.as_deref(), e.kind, &e.payload);
                prop_assert_eq!(Envelope::decode(again), Ok(e));
            }
            if let Ok((id, rest)) = decode_stream_message(Bytes::from(bytes)) {
                let mut again = encode_stream_head(id).to_vec();
                again.extend_from_slice(&rest);
                prop_assert_eq!(decode_stream_message(Bytes::from(again)), Ok((id, rest)));
            }
        }

        #[test]
        fn decode_never_panics_and_round_trips(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(f) = Frame::decode(Bytes::from(bytes), &Limits::default()) {
                prop_assert_eq!(Frame::decode(f.to_bytes(), &Limits::default()), Ok(f));
            }
        }
    }
}
