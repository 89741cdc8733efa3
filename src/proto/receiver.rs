//! The receiving side: reassembly, exactly-once delivery, redundant acks.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dedupe::{DedupeWindow, Seen};
use crate::fec::{InsertOutcome, Reassembler, ReassemblerConfig};
use crate::wire::{AckFrame, Frame, ShardFrame};

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
    /// already delivered). Default 2 ms.
    pub reack_interval: Duration,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            reassembler: ReassemblerConfig::default(),
            dedupe_window: 65_536,
            hole_ttl: Duration::from_secs(30),
            max_ack_ranges: 16,
            reack_interval: Duration::from_millis(2),
        }
    }
}

/// A message delivered to the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The message id (per sender).
    pub id: u64,
    /// The message.
    pub payload: Bytes,
}

/// Counters of a [`Receiver`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Shard frames received.
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
}

/// The receiving half of a surelink peer. Sans-I/O.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    reassembler: Reassembler,
    dedupe: DedupeWindow,
    deliveries: VecDeque<Delivered>,
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
            config,
            deliveries: VecDeque::new(),
            out: VecDeque::new(),
            last_ack: None,
            stats: ReceiverStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// The connection was replaced: reassembly starts over (block ids are per connection), while
    /// the dedupe window, which is per channel, carries over, so a message re-sent on the new
    /// connection is recognised and acked, not delivered again.
    pub fn new_connection(&mut self) {
        self.reassembler = Reassembler::new(self.config.reassembler.clone());
        self.out.clear();
        self.last_ack = None;
    }

    /// The reassembler's counters (of the current connection).
    pub fn reassembly(&self) -> crate::fec::ReassemblerStats {
        self.reassembler.stats()
    }

    /// Takes one shard frame.
    pub fn handle_shard(&mut self, now: Instant, frame: ShardFrame) {
        self.stats.shards_received += 1;
        let outcome = self.reassembler.insert(frame);
        let mut fresh = false;
        let mut repeat = false;
        while let Some(d) = self.reassembler.poll_delivery() {
            match self.dedupe.check(now, d.message_id) {
                Seen::New => {
                    self.stats.delivered += 1;
                    fresh = true;
                    self.deliveries.push_back(Delivered {
                        id: d.message_id,
                        payload: d.payload,
                    });
                }
                Seen::Duplicate => {
                    self.stats.duplicates_suppressed += 1;
                    repeat = true;
                }
                Seen::OutOfWindow => self.stats.out_of_window += 1,
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
        self.deliveries.pop_front()
    }

    /// The next datagram (an ack) to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }
}
