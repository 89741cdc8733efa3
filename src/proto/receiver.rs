//! The receiving side: reassembly, exactly-once delivery, redundant acks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dedupe::{DedupeWindow, KeyWindow, Seen};
use crate::fec::{InsertOutcome, Reassembler, ReassemblerConfig};
use crate::wire::{AckFrame, Envelope, Frame, ShardFrame};

/// Settings of a [`Receiver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Reassembly caps.
    pub reassembler: ReassemblerConfig,
    /// Ids tracked above the dedupe window's low watermark. Default 65536.
    pub dedupe_window: u64,
    /// How long a never-delivered id may hold the watermark before it is skipped; must exceed
    /// the sender's deadline plus a round trip. Default 30 s.
    pub hole_ttl: Duration,
    /// Most ranges per ack. Default 16.
    pub max_ack_ranges: usize,
    /// Least time between two acks that only repeat what was acked (for shards of messages
    /// already delivered). Default 10 ms.
    pub reack_interval: Duration,
    /// How long an idempotency key is remembered after its message was delivered. Default
    /// 24 h (what payment APIs keep).
    pub key_ttl: Duration,
    /// Most idempotency keys remembered at once; past it the oldest is forgotten early
    /// (counted in [`ReceiverStats::keys_evicted`]). Default 65536.
    pub max_keys: usize,
    /// Most payload bytes delivered but not yet taken by the application
    /// ([`Receiver::poll_delivery`]). At the limit the receiver is *backlogged*: shards of
    /// blocks it has not finished are dropped unacked (counted in
    /// [`ReceiverStats::shards_refused_backlog`]), so the sender hedges and, if the
    /// application never catches up, its message times out with an unknown outcome: nothing
    /// is acked that was not delivered, and nothing queues without bound. One block may
    /// overshoot the limit (the shard that completes it delivers all of its messages), and a
    /// single message larger than the limit is still taken when nothing else waits. A
    /// [`Channel`](crate::channel::Channel) holds up to 4 more messages in the hand-off to
    /// its `Messages`, and answers stream messages only once the backlog clears.
    /// Default 16 MiB.
    pub max_queued_bytes: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            reassembler: ReassemblerConfig::default(),
            dedupe_window: 65_536,
            hole_ttl: Duration::from_secs(30),
            max_ack_ranges: 16,
            reack_interval: Duration::from_millis(10),
            key_ttl: Duration::from_secs(24 * 3600),
            max_keys: 65_536,
            max_queued_bytes: 16 << 20,
        }
    }
}

/// A message delivered to the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The message id (per sender).
    pub id: u64,
    /// The application's idempotency key, if the sender attached one. [`Receiver`] leaves it
    /// `None` (it delivers message bodies); [`Peer`](super::Peer) opens the envelope.
    pub key: Option<Bytes>,
    /// The message.
    pub payload: Bytes,
}

/// Counters of a [`Receiver`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Distinct shard frames received (a frame already held is not counted again).
    pub shards_received: u64,
    /// Messages delivered to the application.
    pub delivered: u64,
    /// Messages rebuilt again after delivery and suppressed.
    pub duplicates_suppressed: u64,
    /// Messages too far ahead of the dedupe window, dropped unacked.
    pub out_of_window: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Acks sent only to repeat earlier ones.
    pub reacks_sent: u64,
    /// Messages whose idempotency key was delivered before (under another id): acked, not
    /// delivered again.
    pub duplicate_keys: u64,
    /// Messages rebuilt intact whose envelope did not decode: dropped unacked.
    pub invalid_envelopes: u64,
    /// Unexpired idempotency keys forgotten because `max_keys` were held.
    pub keys_evicted: u64,
    /// Gauge: ids the dedupe window tracks above its low watermark (at most `dedupe_window`).
    pub ids_tracked: usize,
    /// Gauge: idempotency keys remembered (at most `max_keys`).
    pub keys_held: usize,
    /// Gauge: delivered messages not yet taken with [`Receiver::poll_delivery`].
    pub deliveries_queued: usize,
    /// Gauge: payload bytes of those messages (at most about `max_queued_bytes`).
    pub bytes_queued: usize,
    /// Shards dropped unacked because the application was behind (`max_queued_bytes`).
    pub shards_refused_backlog: u64,
}

/// What became of one rebuilt message.
enum Accepted {
    /// Delivered to the application.
    Delivered,
    /// Its id is new but its idempotency key was delivered before: acked, not delivered.
    KeyDuplicate,
    /// Its id was delivered before.
    Duplicate,
    /// Out of the window, or not a valid envelope: neither delivered nor acked.
    Refused,
}

/// The receiving half of a surelink peer. Sans-I/O.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    reassembler: Reassembler,
    dedupe: DedupeWindow,
    keys: KeyWindow,
    deliveries: VecDeque<Delivered>,
    /// Payload bytes in `deliveries`.
    queued_bytes: usize,
    out: VecDeque<Bytes>,
    last_ack: Option<Instant>,
    stats: ReceiverStats,
}

impl Receiver {
    /// A receiver with `config`.
    pub fn new(config: ReceiverConfig) -> Self {
        Receiver {
            reassembler: Reassembler::new(config.reassembler.clone()),
            dedupe: DedupeWindow::new(config.dedupe_window, config.hole_ttl),
            keys: KeyWindow::new(config.key_ttl, config.max_keys),
            config,
            deliveries: VecDeque::new(),
            queued_bytes: 0,
            out: VecDeque::new(),
            last_ack: None,
            stats: ReceiverStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            keys_evicted: self.keys.evicted(),
            ids_tracked: self.dedupe.tracked(),
            keys_held: self.keys.len(),
            deliveries_queued: self.deliveries.len(),
            bytes_queued: self.queued_bytes,
            ..self.stats
        }
    }

    /// The connection was replaced: reassembly starts over (block ids are per connection), while
    /// the dedupe window, which is per channel, carries over, so a message re-sent on the new
    /// connection is recognised and acked, not delivered again.
    pub fn new_connection(&mut self) {
        self.reassembler = Reassembler::new(self.config.reassembler.clone());
        self.out.clear();
        self.last_ack = None;
    }

    /// The peer came back without its state (it restarted): its message ids start over, so
    /// the dedupe window starts over too (otherwise its new messages would look like
    /// duplicates and never be delivered). Idempotency keys are kept: they are the
    /// application's, and a retry by key must still be recognised.
    pub fn peer_lost_state(&mut self) {
        self.new_connection();
        self.dedupe = DedupeWindow::new(self.config.dedupe_window, self.config.hole_ttl);
    }

    /// The reassembler's counters (of the current connection).
    pub fn reassembly(&self) -> crate::fec::ReassemblerStats {
        self.reassembler.stats()
    }

    /// Whether the application is behind: `max_queued_bytes` of delivered messages wait to
    /// be taken. New messages are refused (unacked) until it catches up.
    pub fn backlogged(&self) -> bool {
        !self.deliveries.is_empty() && self.queued_bytes >= self.config.max_queued_bytes
    }

    /// Whether a delivered message waits for [`Receiver::poll_delivery`].
    pub fn has_deliveries(&self) -> bool {
        !self.deliveries.is_empty()
    }

    /// Takes one shard frame.
    pub fn handle_shard(&mut self, now: Instant, frame: ShardFrame) {
        if self.backlogged() && !self.reassembler.is_finished(frame.header.block) {
            // It arrived (the sender's loss estimate must not count it lost), but holding it
            // would buffer without bound behind a slow application. Shards of finished blocks
            // still pass: they only repeat acks.
            self.stats.shards_received += 1;
            self.stats.shards_refused_backlog += 1;
            return;
        }
        let outcome = self.reassembler.insert(frame);
        // Distinct shards only: the sender's loss estimate compares this with what it sent,
        // and a duplicated packet must not hide a lost one.
        if !matches!(outcome, InsertOutcome::Duplicate) {
            self.stats.shards_received += 1;
        }
        let mut fresh = false;
        let mut repeat = false;
        while let Some(d) = self.reassembler.poll_delivery() {
            match self.accept(now, d.message_id, d.payload) {
                Accepted::Delivered | Accepted::KeyDuplicate => fresh = true,
                Accepted::Duplicate => repeat = true,
                Accepted::Refused => {}
            }
        }
        if let InsertOutcome::Stale { messages } = outcome {
            // A shard of a finished block: its ack was probably lost.
            repeat |= messages.clone().any(|id| self.dedupe.contains(id));
        }
        let reack_due = self
            .last_ack
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.reack_interval);
        if fresh || (repeat && reack_due) {
            self.ack(now, !fresh);
        }
    }

    /// Takes a whole message body (an envelope) that arrived outside the datagram path (a
    /// stream message). It is delivered if new, and acked unless it is out of the window or
    /// malformed; the answer says which (`Seen::OutOfWindow` for both refusals).
    pub fn handle_whole(&mut self, now: Instant, id: u64, body: Bytes) -> Seen {
        match self.accept(now, id, body) {
            Accepted::Delivered | Accepted::KeyDuplicate => {
                self.ack(now, false);
                Seen::New
            }
            Accepted::Duplicate => {
                self.ack(now, true);
                Seen::Duplicate
            }
            Accepted::Refused => Seen::OutOfWindow,
        }
    }

    /// Opens a rebuilt message body and delivers it unless its id, or its idempotency key,
    /// was delivered before. A body that is not a valid envelope is dropped unacked (counted):
    /// only a broken or hostile sender produces one, and acking it would claim a delivery.
    fn accept(&mut self, now: Instant, id: u64, body: Bytes) -> Accepted {
        if self.dedupe.contains(id) {
            self.stats.duplicates_suppressed += 1;
            return Accepted::Duplicate;
        }
        let Ok(envelope) = Envelope::decode(body) else {
            self.stats.invalid_envelopes += 1;
            return Accepted::Refused;
        };
        match self.dedupe.check(now, id) {
            Seen::New => {
                if let Some(key) = &envelope.key {
                    if !self.keys.check(now, key) {
                        // Delivered before under another id (an application retry): the
                        // effect happened, so ack this id too, but deliver nothing.
                        self.stats.duplicate_keys += 1;
                        return Accepted::KeyDuplicate;
                    }
                }
                self.stats.delivered += 1;
                self.queued_bytes += envelope.payload.len();
                self.deliveries.push_back(Delivered {
                    id,
                    key: envelope.key,
                    payload: envelope.payload,
                });
                Accepted::Delivered
            }
            Seen::Duplicate => {
                self.stats.duplicates_suppressed += 1;
                Accepted::Duplicate
            }
            Seen::OutOfWindow => {
                self.stats.out_of_window += 1;
                Accepted::Refused
            }
        }
    }

    fn ack(&mut self, now: Instant, repeat: bool) {
        let ranges = self.dedupe.ranges(self.config.max_ack_ranges.max(1));
        if ranges.is_empty() {
            return;
        }
        let frame = Frame::Ack(AckFrame {
            ack_delay_us: 0,
            shards_received: self.stats.shards_received,
            ranges,
        });
        self.out.push_back(frame.to_bytes());
        self.last_ack = Some(now);
        self.stats.acks_sent += 1;
        self.stats.reacks_sent += u64::from(repeat);
    }

    /// The next message for the application.
    #[must_use]
    pub fn poll_delivery(&mut self) -> Option<Delivered> {
        let d = self.deliveries.pop_front()?;
        self.queued_bytes -= d.payload.len();
        Some(d)
    }

    /// The next datagram (an ack) to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }
}
