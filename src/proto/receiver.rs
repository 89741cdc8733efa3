//! The receiving side: reassembly, exactly-once delivery, redundant acks.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dedupe::{DedupeWindow, KeyWindow, Seen};
use crate::fec::{InsertOutcome, Reassembler, ReassemblerConfig};
use crate::wire::{AckFrame, Envelope, Frame, ShardFrame, STREAM_DELIVERED, STREAM_REFUSED};

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
    /// Who claims new messages before they are acked. Default [`Claims::Off`]: the dedupe
    /// window and keys decide alone.
    pub claims: Claims,
    /// Most claims awaited at once; past it new messages are dropped unacked (counted in
    /// [`ReceiverStats::claims_refused`]) and their senders retry. Default 4096.
    pub max_pending_claims: usize,
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
            claims: Claims::Off,
            max_pending_claims: 4096,
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
    /// Claims asked of the owner (claims mode).
    pub claims_requested: u64,
    /// Messages whose claim said they were delivered before (by an earlier incarnation of
    /// this server or by another replica): acked, not delivered again.
    pub claimed_before: u64,
    /// Claims that failed (the store was unreachable): the message was neither delivered nor
    /// acked; its sender retries or learns an unknown outcome.
    pub claim_failures: u64,
    /// New messages dropped unacked because `max_pending_claims` claims were awaited.
    pub claims_refused: u64,
    /// Gauge: claims awaited.
    pub claims_pending: usize,
}

/// Who claims a new message before it is acked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Claims {
    /// Nobody: the receiver delivers and acks a new message at once.
    #[default]
    Off,
    /// The receiver's owner, before delivery: the receiver asks with
    /// [`Receiver::poll_claim`] and delivers and acks on [`Receiver::claim_done`] (a
    /// [`Channel`](crate::channel::Channel) with a store claims there).
    Owner,
    /// The application, after delivery, inside its own transaction (the inbox pattern): the
    /// message is delivered at once and acked when the application confirms its claim
    /// ([`Receiver::confirm`]). Until then, copies of it are neither delivered nor acked.
    Application,
}

/// A claim the receiver needs before it may deliver (and ack) message `id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimRequest {
    /// The message id.
    pub id: u64,
    /// Its idempotency key, if it has one.
    pub key: Option<Bytes>,
    /// The incarnation of the peer that sent it; an answer for an earlier one is ignored.
    pub generation: u64,
}

/// The owner's answer to a [`ClaimRequest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// First claim: deliver the message and ack it.
    Now,
    /// Claimed before (delivered by this server earlier or by another replica): ack it,
    /// deliver nothing.
    Before,
    /// No answer (the store failed): neither deliver nor ack.
    Failed,
}

/// What became of a whole (stream) message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whole {
    /// Delivered now (or its key was delivered before): acked.
    New,
    /// Delivered before: acked again.
    Duplicate,
    /// Out of the window or malformed: neither delivered nor acked.
    Refused,
    /// Awaiting its claim; the answer comes from [`Receiver::poll_stream_answer`].
    Pending,
}

/// A message awaiting its claim.
#[derive(Debug)]
struct Pending {
    key: Option<Bytes>,
    /// The message, until it is delivered (`None`: the application has it).
    payload: Option<Bytes>,
    via_stream: bool,
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
    /// Awaiting its claim: neither delivered nor acked yet.
    Pending,
}

/// The receiving half of a surelink peer. Sans-I/O.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    reassembler: Reassembler,
    dedupe: DedupeWindow,
    keys: KeyWindow,
    deliveries: VecDeque<Delivered>,
    /// Payload bytes in `deliveries` and `pending`.
    queued_bytes: usize,
    pending: HashMap<u64, Pending>,
    claims_out: VecDeque<ClaimRequest>,
    /// (message id, status byte) for stream messages whose claim was answered.
    stream_answers: VecDeque<(u64, u8)>,
    /// Counts the peer's incarnations (`peer_lost_state`).
    generation: u64,
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
            pending: HashMap::new(),
            claims_out: VecDeque::new(),
            stream_answers: VecDeque::new(),
            generation: 0,
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
            claims_pending: self.pending.len(),
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
        // Claims awaited for the old incarnation's ids: their answers are ignored.
        for (_, p) in self.pending.drain() {
            self.queued_bytes -= p.payload.map_or(0, |b| b.len());
        }
        self.claims_out.clear();
        self.generation += 1;
    }

    /// Starts a fresh channel's dedupe window at `floor`: the client says every id below it
    /// was acked or given up (a server taking the channel over from another replica, with
    /// claims in a shared store). No effect once anything was received.
    pub fn start_at(&mut self, floor: u64) {
        if self.dedupe.floor() == 0 && self.dedupe.tracked() == 0 && self.pending.is_empty() {
            self.dedupe =
                DedupeWindow::starting_at(floor, self.config.dedupe_window, self.config.hole_ttl);
        }
    }

    /// The next claim to ask of the owner (claims mode).
    #[must_use]
    pub fn poll_claim(&mut self) -> Option<ClaimRequest> {
        self.claims_out.pop_front()
    }

    /// The owner's answer to a claim: the message is delivered and acked
    /// ([`ClaimOutcome::Now`]), acked only ([`ClaimOutcome::Before`]), or dropped
    /// ([`ClaimOutcome::Failed`]).
    pub fn claim_done(&mut self, now: Instant, request: &ClaimRequest, outcome: ClaimOutcome) {
        if request.generation != self.generation {
            return;
        }
        self.settle(now, request.id, outcome);
    }

    /// The application's answer for message `id` in [`Claims::Application`] mode, after
    /// its transaction: [`ClaimOutcome::Now`] (committed with its claim) or
    /// [`ClaimOutcome::Before`] (the claim existed: another replica or an earlier delivery
    /// handled it) ack it; [`ClaimOutcome::Failed`] (rolled back) leaves it unacked.
    pub fn confirm(&mut self, now: Instant, id: u64, outcome: ClaimOutcome) {
        if self.config.claims == Claims::Application {
            self.settle(now, id, outcome);
        }
    }

    fn settle(&mut self, now: Instant, id: u64, outcome: ClaimOutcome) {
        let Some(p) = self.pending.remove(&id) else {
            return;
        };
        if let Some(payload) = &p.payload {
            self.queued_bytes -= payload.len();
        }
        let status = match outcome {
            ClaimOutcome::Failed => {
                self.stats.claim_failures += 1;
                STREAM_REFUSED
            }
            ClaimOutcome::Now | ClaimOutcome::Before => {
                // Pending ids are held out of the window until now: this records them.
                let fresh = self.dedupe.check(now, id) == Seen::New;
                if let Some(k) = &p.key {
                    self.keys.check(now, k);
                }
                match p.payload {
                    Some(payload) if outcome == ClaimOutcome::Now && fresh => {
                        self.stats.delivered += 1;
                        self.queued_bytes += payload.len();
                        self.deliveries.push_back(Delivered {
                            id,
                            key: p.key,
                            payload,
                        });
                    }
                    // Delivered already (application claims) and claimed now: nothing more.
                    None if outcome == ClaimOutcome::Now => {}
                    _ => self.stats.claimed_before += 1,
                }
                self.ack(now, false);
                STREAM_DELIVERED
            }
        };
        if p.via_stream {
            self.stream_answers.push_back((id, status));
        }
    }

    /// The answer to a stream message whose claim was pending: (message id, status byte).
    #[must_use]
    pub fn poll_stream_answer(&mut self) -> Option<(u64, u8)> {
        self.stream_answers.pop_front()
    }

    /// The reassembler's counters (of the current connection).
    pub fn reassembly(&self) -> crate::fec::ReassemblerStats {
        self.reassembler.stats()
    }

    /// Whether the application is behind: `max_queued_bytes` of delivered messages wait to
    /// be taken. New messages are refused (unacked) until it catches up.
    pub fn backlogged(&self) -> bool {
        (!self.deliveries.is_empty() || !self.pending.is_empty())
            && self.queued_bytes >= self.config.max_queued_bytes
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
            match self.accept(now, d.message_id, d.payload, false) {
                Accepted::Delivered | Accepted::KeyDuplicate => fresh = true,
                Accepted::Duplicate => repeat = true,
                Accepted::Refused | Accepted::Pending => {}
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
    /// malformed; in claims mode a new message waits for its claim first.
    pub fn handle_whole(&mut self, now: Instant, id: u64, body: Bytes) -> Whole {
        match self.accept(now, id, body, true) {
            Accepted::Delivered | Accepted::KeyDuplicate => {
                self.ack(now, false);
                Whole::New
            }
            Accepted::Duplicate => {
                self.ack(now, true);
                Whole::Duplicate
            }
            Accepted::Refused => Whole::Refused,
            Accepted::Pending => Whole::Pending,
        }
    }

    /// Opens a rebuilt message body and delivers it unless its id, or its idempotency key,
    /// was delivered before. A body that is not a valid envelope is dropped unacked (counted):
    /// only a broken or hostile sender produces one, and acking it would claim a delivery.
    fn accept(&mut self, now: Instant, id: u64, body: Bytes, via_stream: bool) -> Accepted {
        if self.dedupe.contains(id) {
            self.stats.duplicates_suppressed += 1;
            return Accepted::Duplicate;
        }
        let Ok(envelope) = Envelope::decode(body) else {
            self.stats.invalid_envelopes += 1;
            return Accepted::Refused;
        };
        if self.config.claims != Claims::Off {
            return self.accept_claimed(now, id, envelope, via_stream);
        }
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

    /// Claims mode: a new id waits for its claim; the window and keys only answer for what
    /// this receiver itself saw claimed.
    fn accept_claimed(
        &mut self,
        now: Instant,
        id: u64,
        envelope: Envelope,
        via_stream: bool,
    ) -> Accepted {
        if let Some(p) = self.pending.get_mut(&id) {
            // Already asked; a stream re-send takes over the answer.
            p.via_stream |= via_stream;
            return Accepted::Pending;
        }
        if self.dedupe.peek(now, id) == Seen::OutOfWindow {
            self.stats.out_of_window += 1;
            return Accepted::Refused;
        }
        if let Some(key) = &envelope.key {
            if self.keys.contains(now, key) {
                self.dedupe.check(now, id);
                self.stats.duplicate_keys += 1;
                return Accepted::KeyDuplicate;
            }
        }
        if self.pending.len() >= self.config.max_pending_claims {
            self.stats.claims_refused += 1;
            return Accepted::Refused;
        }
        self.stats.claims_requested += 1;
        let payload = if self.config.claims == Claims::Application {
            // The application gets it now and claims it in its own transaction.
            self.stats.delivered += 1;
            self.queued_bytes += envelope.payload.len();
            self.deliveries.push_back(Delivered {
                id,
                key: envelope.key.clone(),
                payload: envelope.payload,
            });
            None
        } else {
            self.queued_bytes += envelope.payload.len();
            self.claims_out.push_back(ClaimRequest {
                id,
                key: envelope.key.clone(),
                generation: self.generation,
            });
            Some(envelope.payload)
        };
        self.pending.insert(
            id,
            Pending {
                key: envelope.key,
                payload,
                via_stream,
            },
        );
        Accepted::Pending
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
