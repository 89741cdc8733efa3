//! The sans-I/O protocol core: sender and receiver state machines.
//!
//! **Outside the stable API**: public for the fuzz targets, benchmarks and tests, and may
//! change in any release. Applications use [`crate::channel`], which re-exports the types of
//! this module that appear in its API ([`SenderConfig`], [`ReceiverConfig`], [`Delivered`],
//! [`link::Receipt`], …); those are stable through `channel`.
//!
//! No sockets, no clock, no global RNG: a [`Peer`] is driven by `now` and incoming datagrams
//! and produces datagrams to send, the next timer, and events. The async channel over quinn
//! moves bytes and sleeps; everything that decides is here, and deterministic given its
//! inputs.
//!
//! - [`Sender`]: assigns message ids, sends each block's data shards plus parity shards
//!   (adaptive by default: `k` and `m` planned by [`crate::tune`] for the per-shard loss it
//!   measures from the peer's acks; otherwise `first_flight_repair`), spaced so each shard
//!   gets a packet of its own, takes acks (ranges) and measures the ack round trip;
//!   when a block has no ack after the round trip's p95 (with a floor) it sends *fresh* parity
//!   (a hedge), again with backoff, within a byte budget; at the deadline a message fails with
//!   an unknown outcome.
//! - [`Receiver`]: reassembles, delivers each message once (a dedupe window with a low
//!   watermark), and acks with ranges. Every ack names the range from id 0, the ids that
//!   triggered it and recent ranges, and a shard of an already-delivered message triggers a
//!   repeat ack (rate-limited), so a lost ack costs one hedge, not a failure. What it will
//!   not deliver it refuses (a REFUSE frame with a reason), so the sender fails it at once.
//!
//! Each sender tells its peer's receiver its floor (a FLOOR frame: every id below has its
//! outcome), so a message lost for good frees the receiver's dedupe window at the sender's
//! deadline, and a receiver that restarted catches up with the sender's ids.

pub mod admission;
mod answer;
mod dedupe;
mod governor;
pub mod keys;
pub mod link;
mod receiver;
mod repair;
mod rtt;
mod sender;

use std::time::Instant;

use bytes::Bytes;

pub use answer::{Answer, AnswerError, AnswerSink, Answering};
pub use dedupe::{DedupeWindow, Seen, MAX_PASSED_RANGES};
pub use keys::{
    payload_digest, request_digest, Digest, Holder, KeyRecord, KeyVerdict, Scope, SharedKeys,
    ANONYMOUS, KEY_OVERHEAD_BYTES,
};
pub use link::Link;
pub use receiver::{
    ClaimOutcome, ClaimRequest, Claims, Delivered, Lease, Receiver, ReceiverConfig, ReceiverStats,
    Refusals, ReplyIn, Whole, MESSAGE_OVERHEAD_BYTES,
};
pub use repair::{WindowConfig, WindowSendStats};
pub use rtt::RttEstimator;
pub use sender::{
    FailReason, HedgeTo, SendError, Sender, SenderConfig, SenderEvent, SenderStats, MAX_DEADLINE,
};

use crate::wire::{
    decode_stream_message, DecodeError, Frame, Limits, STREAM_DELIVERED, STREAM_REFUSED,
    STREAM_REPLAYED,
};

/// Frames a [`Peer`] dropped, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InvalidFrames {
    /// Datagrams that failed to decode, per [`DecodeError::reason`].
    pub by_reason: std::collections::BTreeMap<&'static str, u64>,
}

impl InvalidFrames {
    /// All invalid frames.
    pub fn total(&self) -> u64 {
        self.by_reason.values().sum()
    }
}

/// When a stream message gets its status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamStatus {
    /// Now: send this byte.
    Now(u8),
    /// Once message `id`'s claim is answered or the application took it
    /// ([`Receiver::poll_stream_answer`]).
    Later(u64),
    /// Never: end the stream without a status byte (outcome unknown to the sender).
    Unanswered,
}

/// One end of a surelink connection: a [`Sender`] and a [`Receiver`] sharing one datagram
/// flow. Route every received datagram to [`Peer::handle_datagram`].
#[derive(Debug)]
pub struct Peer {
    /// The sending half.
    pub sender: Sender,
    /// The receiving half.
    pub receiver: Receiver,
    limits: Limits,
    invalid: InvalidFrames,
}

impl Peer {
    /// A peer from its two halves' settings.
    pub fn new(sender: SenderConfig, receiver: ReceiverConfig) -> Self {
        Peer {
            limits: receiver.reassembler.limits.clone(),
            sender: Sender::new(sender),
            receiver: Receiver::new(receiver),
            invalid: InvalidFrames::default(),
        }
    }

    /// Takes one received datagram. Frames that do not decode are counted and dropped.
    pub fn handle_datagram(&mut self, now: Instant, datagram: Bytes) {
        match Frame::decode(datagram, &self.limits) {
            Ok(Frame::Shard(shard)) => self.receiver.handle_shard(now, shard),
            Ok(Frame::Ack(ack)) => self.sender.handle_ack(now, &ack),
            Ok(Frame::Floor(floor)) => self.receiver.handle_floor(now, floor.floor),
            Ok(Frame::Refuse(refuse)) => self.sender.handle_refuse(now, &refuse),
            // Protocol 2 only: on a protocol-1 connection it is a frame type the protocol does
            // not have (dropped and counted, as a version-1 peer would).
            Ok(Frame::Replayed(replayed)) if self.receiver.protocol() >= 2 => {
                self.sender.handle_replayed(now, &replayed)
            }
            Ok(Frame::Replayed(_)) => self.count_invalid_reason("unknown_type"),
            Ok(Frame::Message(message)) if self.receiver.protocol() >= 2 => {
                self.receiver.handle_message(now, message);
                self.sender.set_reverse_loss(self.receiver.incoming_loss());
            }
            Ok(Frame::Repair(repair)) if self.receiver.protocol() >= 2 => {
                self.receiver.handle_repair(now, &repair)
            }
            Ok(Frame::Message(_)) | Ok(Frame::Repair(_)) => {
                self.count_invalid_reason("unknown_type")
            }
            // Hello and Close are the channel's business (connection start and end).
            Ok(Frame::Hello(_)) | Ok(Frame::Close(_)) => {}
            Err(e) => self.count_invalid(&e),
        }
    }

    /// Takes a whole stream message (the stream path for large messages): the message is
    /// delivered unless it was before, and the answer is the status byte to send back
    /// ([`STREAM_DELIVERED`] or [`STREAM_REFUSED`]), now or, in claims mode, once the claim
    /// is answered ([`StreamStatus::Later`], then [`Receiver::poll_stream_answer`]). A
    /// message that does not decode is counted and refused. While the receiver is
    /// [backlogged](Receiver::backlogged) the caller should hold stream messages back (and
    /// answer later): this takes them regardless.
    pub fn handle_stream_message(&mut self, now: Instant, message: Bytes) -> StreamStatus {
        match decode_stream_message(message) {
            Ok((id, body)) => match self.receiver.handle_whole(now, id, body) {
                Whole::New | Whole::Duplicate => StreamStatus::Now(STREAM_DELIVERED),
                Whole::Replayed => StreamStatus::Now(STREAM_REPLAYED),
                Whole::Refused => StreamStatus::Now(STREAM_REFUSED),
                Whole::Pending => StreamStatus::Later(id),
                Whole::Unanswered => StreamStatus::Unanswered,
            },
            Err(e) => {
                self.count_invalid(&e);
                StreamStatus::Now(STREAM_REFUSED)
            }
        }
    }

    fn count_invalid(&mut self, e: &DecodeError) {
        self.count_invalid_reason(e.reason());
    }

    /// Counts an invalid input found outside the decoder (e.g. a stream that was too long).
    pub fn count_invalid_reason(&mut self, reason: &'static str) {
        *self.invalid.by_reason.entry(reason).or_default() += 1;
    }

    /// Invalid frames received so far.
    pub fn invalid_frames(&self) -> &InvalidFrames {
        &self.invalid
    }

    /// The next datagram to send: acks first (they are small and unblock the peer), then
    /// shards.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.receiver
            .poll_transmit()
            .or_else(|| self.sender.poll_transmit())
    }

    /// When [`Peer::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.sender.poll_timeout(), self.receiver.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The connection under this peer was replaced by a new one for the same channel: see
    /// [`Sender::new_connection`] and [`Receiver::new_connection`].
    pub fn new_connection(&mut self, now: Instant) {
        self.sender.new_connection(now);
        self.receiver.new_connection();
    }

    /// The connection was replaced and the peer has no state for this channel (it
    /// restarted): see [`Sender::peer_lost_state`] and [`Receiver::peer_lost_state`].
    pub fn peer_lost_state(&mut self, now: Instant) {
        self.sender.peer_lost_state(now);
        self.receiver.peer_lost_state();
    }

    /// The connection was replaced by one to a server that did not hold this channel but
    /// shares a claims store with the one that did: unacked messages are re-sent with their
    /// ids (the store recognises those already delivered), while the peer's own messages
    /// start over, as after [`Peer::peer_lost_state`].
    pub fn peer_claims_only(&mut self, now: Instant) {
        self.sender.new_connection(now);
        self.receiver.peer_lost_state();
    }

    /// Fires what is due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sender.handle_timeout(now);
        self.receiver.handle_timeout(now);
    }
}

#[cfg(all(test, feature = "sim"))]
mod tests;

#[cfg(test)]
mod review_tests;
