//! The receiving side: reassembly, exactly-once delivery, redundant acks.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::dedupe::{DedupeWindow, KeySeen, KeyWindow, Seen};
use crate::fec::{InsertOutcome, Reassembler, ReassemblerConfig};
use crate::wire::{
    AckFrame, Envelope, Frame, RefuseFrame, ShardFrame, REFUSE_BLOCK, REFUSE_CLOSED,
    REFUSE_KEYS_FULL, REFUSE_MALFORMED, REFUSE_OUT_OF_WINDOW, STREAM_DELIVERED, STREAM_REFUSED,
};

/// Settings of a [`Receiver`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Reassembly caps.
    pub reassembler: ReassemblerConfig,
    /// Ids tracked above the dedupe window's low watermark; an id further above is refused
    /// (REFUSE code 2). The peer's `SenderConfig::max_id_span` must not exceed it. Default
    /// 65536.
    pub dedupe_window: u64,
    /// How long a never-delivered id may hold the watermark before it is skipped, for a
    /// sender that sends no FLOOR (a FLOOR moves the watermark at the sender's deadline);
    /// must exceed the sender's deadline plus a round trip. The watermark never passes a
    /// message whose claim is pending. Also how long refused ids are remembered. Default
    /// 30 s.
    pub hole_ttl: Duration,
    /// Most ranges per ack. Default 16.
    pub max_ack_ranges: usize,
    /// Least time between two acks that only repeat what was acked (for shards of messages
    /// already delivered). Default 10 ms.
    pub reack_interval: Duration,
    /// How long an idempotency key is remembered after its message was delivered: exactly
    /// this long, never less. Default 24 h (what payment APIs keep).
    pub key_ttl: Duration,
    /// Most idempotency keys remembered at once. At the limit a message with a *new* key is
    /// refused (REFUSE code 3, counted in [`Refusals::keys_full`]; definitely not delivered,
    /// its sender may retry it later) until keys expire; a key is never forgotten early. Each
    /// key costs its length plus about
    /// [`KEY_OVERHEAD_BYTES`](super::dedupe::KEY_OVERHEAD_BYTES) (128) bytes, so the default
    /// 1,048,576 keys take at most about 160 MiB with 36-byte keys (UUIDs as text), and hold
    /// 24 h of keys up to about 12 keyed messages a second. A server that needs 24 h of keys
    /// at higher rates claims its messages in a store ([`Claims::Owner`]), where keys are
    /// not bounded by memory.
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
    /// Ack a delivered message only once the application took it ([`Receiver::taken`]),
    /// rather than when it is queued for the application ([`Receiver::poll_delivery`]).
    /// Copies arriving in between are neither delivered nor acked. A
    /// [`Channel`](crate::channel::Channel) sets it; the default `false` suits a caller
    /// that hands each message over as it polls it.
    pub ack_on_take: bool,
    /// Most refused message ids remembered (for `hole_ttl`), so that a copy arriving after a
    /// refusal is refused again, never delivered (the sender was told "not delivered").
    /// Past it, refusals that need remembering (out of window, keys full, block refused)
    /// become counted drops without a REFUSE frame: the sender retries or times out.
    /// Default 4096.
    pub max_refused_ids: usize,
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
            max_keys: 1 << 20,
            max_queued_bytes: 16 << 20,
            claims: Claims::Off,
            max_pending_claims: 4096,
            ack_on_take: false,
            max_refused_ids: 4096,
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

/// Messages a [`Receiver`] refused (answered with a REFUSE frame, or dropped counted when it
/// could not remember the refusal), by reason. A copy refused again counts again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Code 1: the envelope was malformed (reserved flag bits, an empty or oversized key).
    pub malformed: u64,
    /// Code 2: the id was too far above the dedupe window.
    pub out_of_window: u64,
    /// Code 3: `max_keys` unexpired keys were held and the message had a new key.
    pub keys_full: u64,
    /// Code 4: the block's `k` or `n` was above [`Limits`](crate::wire::Limits)'
    /// `max_data_shards` / `max_block_shards`.
    pub block: u64,
    /// Code 5: the application was gone ([`Receiver::application_gone`]).
    pub closed: u64,
    /// Refusals that could not be remembered (`max_refused_ids`), so no REFUSE was sent:
    /// dropped, counted here as well as by reason.
    pub unsent: u64,
}

impl Refusals {
    /// Refusals with reason `code` (a `REFUSE_*` code).
    pub fn get(&self, code: u64) -> u64 {
        match code {
            REFUSE_MALFORMED => self.malformed,
            REFUSE_OUT_OF_WINDOW => self.out_of_window,
            REFUSE_KEYS_FULL => self.keys_full,
            REFUSE_BLOCK => self.block,
            REFUSE_CLOSED => self.closed,
            _ => 0,
        }
    }

    /// Every refusal.
    pub fn total(&self) -> u64 {
        self.malformed + self.out_of_window + self.keys_full + self.block + self.closed
    }

    fn count(&mut self, code: u64) {
        match code {
            REFUSE_MALFORMED => self.malformed += 1,
            REFUSE_OUT_OF_WINDOW => self.out_of_window += 1,
            REFUSE_KEYS_FULL => self.keys_full += 1,
            REFUSE_BLOCK => self.block += 1,
            _ => self.closed += 1,
        }
    }
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
    /// Shards of blocks the reassembler no longer held or remembered whose every message
    /// had been delivered (late copies, resends after a reconnect): re-acked, not rebuilt
    /// (also counted in `reassembly.shards_stale`).
    pub shards_of_delivered: u64,
    /// Messages too far ahead of the dedupe window: refused, not acked.
    pub out_of_window: u64,
    /// Acks sent.
    pub acks_sent: u64,
    /// Acks sent only to repeat earlier ones.
    pub reacks_sent: u64,
    /// Messages whose idempotency key was delivered before (under another id): acked, not
    /// delivered again.
    pub duplicate_keys: u64,
    /// Messages rebuilt intact whose envelope did not decode: refused, not acked.
    pub invalid_envelopes: u64,
    /// Messages with a new idempotency key refused because `max_keys` unexpired keys were
    /// held (no key is ever forgotten early).
    pub keys_refused: u64,
    /// Refusals by reason.
    pub refused: Refusals,
    /// REFUSE frames sent.
    pub refuse_frames: u64,
    /// Shard frames of blocks whose code parameters were above the limits: refused before
    /// reassembly.
    pub shards_refused_block: u64,
    /// The sender's FLOOR moved the dedupe window's low watermark.
    pub floor_advances: u64,
    /// Messages delivered but never taken by the application, discarded when it went away
    /// ([`Receiver::application_gone`]): never acked.
    pub discarded: u64,
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
    /// Gauge: messages delivered but not yet taken (with `ack_on_take`): not acked yet.
    pub awaiting_take: usize,
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
    /// Refused, or dropped: neither delivered nor acked.
    Refused,
    /// Awaiting its claim: neither delivered nor acked yet.
    Pending,
    /// Its idempotency key's message awaits the application's take: neither delivered nor
    /// acked now (not recorded either: a later copy is judged again).
    Held,
}

/// Most ids waiting in REFUSE frames not yet sent; more are refused again when their copies
/// come back.
const MAX_REFUSE_QUEUE: usize = 64;

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
    /// Delivered (recorded in the window) but not to be named in acks: awaiting
    /// [`Receiver::taken`], or discarded when the application went away.
    withheld: BTreeSet<u64>,
    /// Keys of withheld messages (to release their claims in [`Claims::Owner`] mode), and
    /// the other way round: a retry by key of a message not yet taken is not acked either.
    withheld_keys: HashMap<u64, Bytes>,
    withheld_by_key: HashMap<Bytes, u64>,
    /// Withheld messages that arrived (or were re-sent) on a stream: their status byte, like
    /// their ack, waits for [`Receiver::taken`].
    withheld_streams: std::collections::HashSet<u64>,
    /// Messages of the sender's previous incarnations delivered but not yet taken, with their
    /// keys (see [`Receiver::peer_lost_state`]).
    old_withheld: HashMap<u64, Option<Bytes>>,
    /// The application is gone: nothing more is delivered.
    gone: bool,
    /// Refused ids (id → reason), remembered so a later copy is refused again.
    refused: HashMap<u64, u64>,
    refused_order: VecDeque<(Instant, u64)>,
    /// Ids waiting to go out in REFUSE frames, by reason.
    refuse_out: BTreeMap<u64, BTreeSet<u64>>,
    last_refuse: Option<Instant>,
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
            withheld: BTreeSet::new(),
            withheld_keys: HashMap::new(),
            withheld_by_key: HashMap::new(),
            withheld_streams: std::collections::HashSet::new(),
            old_withheld: HashMap::new(),
            gone: false,
            refused: HashMap::new(),
            refused_order: VecDeque::new(),
            refuse_out: BTreeMap::new(),
            last_refuse: None,
            stats: ReceiverStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            keys_refused: self.keys.refused(),
            ids_tracked: self.dedupe.tracked(),
            keys_held: self.keys.len(),
            deliveries_queued: self.deliveries.len(),
            bytes_queued: self.queued_bytes,
            claims_pending: self.pending.len(),
            awaiting_take: if self.gone { 0 } else { self.withheld.len() },
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
        self.refuse_out.clear();
        self.last_refuse = None;
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
        // The old incarnation's ids mean nothing to its successor (their acks go nowhere),
        // but a message of it still waiting for the application keeps holding its key: a
        // retry under that key from the new incarnation is not acked before the application
        // took the message (it could still drop it). The application takes messages in the
        // order they were handed over, so an old id is taken before a new one equal to it.
        for id in std::mem::take(&mut self.withheld) {
            let key = self.withheld_keys.remove(&id);
            self.old_withheld.insert(id, key);
        }
        self.withheld_keys.clear();
        self.withheld_streams.clear();
        self.refused.clear();
        self.refused_order.clear();
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

    /// The sender's FLOOR: every id below `floor` has its outcome at the sender. The dedupe
    /// window's low watermark moves up to it (never down, never past a pending claim), so
    /// ids beyond the old window are accepted again.
    pub fn handle_floor(&mut self, now: Instant, floor: u64) {
        if self.dedupe.advance_to(now, floor) {
            self.stats.floor_advances += 1;
        }
    }

    /// The dedupe window's low watermark: every id below it was delivered or settled.
    pub fn floor(&self) -> u64 {
        self.dedupe.floor()
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
        self.flush_refusals(now);
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
        self.dedupe.unpin(id);
        if let Some(payload) = &p.payload {
            self.queued_bytes -= payload.len();
        }
        let status = match outcome {
            ClaimOutcome::Failed => {
                self.stats.claim_failures += 1;
                STREAM_REFUSED
            }
            ClaimOutcome::Now if self.gone && p.payload.is_some() => {
                // Claimed while the application went away: the claim is the record of
                // delivery (another replica acks a re-send as claimed before), so the message
                // counts as handed over, to an application that is gone, like one that
                // crashed. It is neither acked nor refused here: its sender learns an
                // unknown outcome, or an ack from a replica that finds the claim.
                self.dedupe.check(now, id);
                self.stats.delivered += 1;
                self.stats.discarded += 1;
                if let Some(payload) = p.payload {
                    self.deliveries.push_back(Delivered {
                        id,
                        key: p.key,
                        payload,
                    });
                    self.queued_bytes += self.deliveries.back().map_or(0, |d| d.payload.len());
                }
                return;
            }
            ClaimOutcome::Now | ClaimOutcome::Before => {
                // Pending ids are held out of the window (and the floor stops below them)
                // until now: this records them.
                self.dedupe.check(now, id);
                if let Some(k) = &p.key {
                    // The store holds the keys in claims mode: the window only caches them,
                    // so a full window is no reason to refuse here (nor to count one).
                    if !self.keys.is_full(now) {
                        let _ = self.keys.check(now, k);
                    }
                }
                let mut withhold = false;
                match (outcome, p.payload) {
                    // A `Now` means this receiver owns the message: nobody else will
                    // deliver it, so it is delivered, whatever the window says.
                    (ClaimOutcome::Now, Some(payload)) => {
                        self.stats.delivered += 1;
                        self.queued_bytes += payload.len();
                        withhold = self.config.ack_on_take;
                        if withhold {
                            self.withhold(id, p.key.as_ref());
                        }
                        self.deliveries.push_back(Delivered {
                            id,
                            key: p.key,
                            payload,
                        });
                    }
                    // Delivered already (application claims) and claimed now: nothing more.
                    (ClaimOutcome::Now, None) => {}
                    _ => self.stats.claimed_before += 1,
                }
                if !withhold {
                    self.ack(now, false, &[id]);
                } else if p.via_stream {
                    // Answered once taken, like the ack.
                    self.withheld_streams.insert(id);
                    return;
                }
                STREAM_DELIVERED
            }
        };
        if p.via_stream {
            self.stream_answers.push_back((id, status));
        }
    }

    /// The application took delivered message `id` (with `ack_on_take`): it is acked now.
    /// Ids not awaiting a take are ignored.
    pub fn taken(&mut self, now: Instant, id: u64) {
        if let Some(key) = self.old_withheld.remove(&id) {
            // A message of the sender's previous incarnation: nothing to ack; its key no
            // longer holds retries back.
            if let Some(key) = key {
                self.withheld_by_key.remove(&key);
            }
            return;
        }
        if self.gone || !self.withheld.remove(&id) {
            return;
        }
        if let Some(key) = self.withheld_keys.remove(&id) {
            self.withheld_by_key.remove(&key);
        }
        if self.withheld_streams.remove(&id) {
            self.stream_answers.push_back((id, STREAM_DELIVERED));
        }
        self.ack(now, false, &[id]);
    }

    /// Records delivered message `id` as not to be acked until taken.
    fn withhold(&mut self, id: u64, key: Option<&Bytes>) {
        self.withheld.insert(id);
        if let Some(key) = key {
            self.withheld_keys.insert(id, key.clone());
            self.withheld_by_key.insert(key.clone(), id);
        }
    }

    /// The application will never take another message. Messages delivered but not taken
    /// are discarded: never acked (counted in [`ReceiverStats::discarded`]; with
    /// `ack_on_take` off they were acked already, which is why a channel sets it) and their
    /// senders told they were not delivered (REFUSE code 5); new messages are refused with
    /// code 5. In [`Claims::Owner`] mode a claimed message stays handed over instead (see
    /// `owner_gone`: the claim is the record of its delivery).
    pub fn application_gone(&mut self, now: Instant) {
        if self.gone {
            return;
        }
        self.gone = true;
        self.stats.discarded += self.old_withheld.len() as u64;
        self.old_withheld.clear();
        if self.config.claims == Claims::Owner {
            self.owner_gone(now);
            return;
        }
        let queued: Vec<Delivered> = self.deliveries.drain(..).collect();
        for d in queued {
            self.queued_bytes -= d.payload.len();
            if self.withheld.contains(&d.id) {
                continue;
            }
            self.stats.discarded += 1;
            if self.pending.get(&d.id).is_some_and(|p| p.payload.is_none()) {
                // Application claims: never handed over, so never claimed either.
                let p = self.pending.remove(&d.id).expect("checked");
                self.dedupe.unpin(d.id);
                self.refuse(now, d.id, REFUSE_CLOSED, p.via_stream);
                if p.via_stream {
                    self.stream_answers.push_back((d.id, STREAM_REFUSED));
                }
            }
            // Otherwise acked already (`ack_on_take` off): nothing to take back.
        }
        let discarded: Vec<u64> = self.withheld.iter().copied().collect();
        for id in discarded {
            self.stats.discarded += 1;
            self.refuse(now, id, REFUSE_CLOSED, false);
            if self.withheld_streams.remove(&id) {
                self.stream_answers.push_back((id, STREAM_REFUSED));
            }
        }
        self.withheld_by_key.clear();
        self.flush_refusals(now);
    }

    /// [`Receiver::application_gone`] in [`Claims::Owner`] mode. A claimed message is the
    /// record of a delivery (another replica acks a re-send of it as claimed before), so
    /// what was claimed stays handed over: delivered messages not yet taken stay unacked
    /// (their senders learn an unknown outcome, or an ack from a replica that finds the
    /// claim) and are still handed out by [`Receiver::poll_delivery`] (the owner passes them
    /// on to a queue nobody reads); claims in flight that answer `Now` are handed over the
    /// same way. Messages whose claim was not asked yet are refused (code 5), and so are new
    /// ones.
    fn owner_gone(&mut self, now: Instant) {
        self.stats.discarded += self.withheld.len() as u64;
        self.withheld.clear();
        self.withheld_keys.clear();
        self.withheld_by_key.clear();
        for request in std::mem::take(&mut self.claims_out) {
            if let Some(p) = self.pending.remove(&request.id) {
                self.queued_bytes -= p.payload.as_ref().map_or(0, Bytes::len);
                self.dedupe.unpin(request.id);
                self.refuse(now, request.id, REFUSE_CLOSED, p.via_stream);
                if p.via_stream {
                    self.stream_answers.push_back((request.id, STREAM_REFUSED));
                }
            }
        }
        self.flush_refusals(now);
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

    /// Delivered messages waiting for [`Receiver::poll_delivery`] (cheaper than
    /// [`Receiver::stats`], for per-datagram use).
    pub fn deliveries_queued(&self) -> usize {
        self.deliveries.len()
    }

    /// Whether delivered messages wait for [`Receiver::taken`] (with `ack_on_take`).
    pub fn awaiting_take(&self) -> bool {
        !self.gone && !self.withheld.is_empty()
    }

    /// Whether a delivered message waits for [`Receiver::poll_delivery`].
    pub fn has_deliveries(&self) -> bool {
        !self.deliveries.is_empty()
    }

    /// Takes one shard frame.
    pub fn handle_shard(&mut self, now: Instant, frame: ShardFrame) {
        let limits = &self.reassembler.config().limits;
        if frame.header.data_shards > limits.max_data_shards
            || frame.header.total_shards > limits.max_block_shards
        {
            // A code wider than any our encoder builds: refused before any rebuild work.
            self.stats.shards_received += 1;
            self.stats.shards_refused_block += 1;
            for id in frame.header.messages() {
                if !self.dedupe.contains(id) && !self.pending.contains_key(&id) {
                    self.refuse(now, id, REFUSE_BLOCK, false);
                }
            }
            self.flush_refusals(now);
            return;
        }
        // A shard of a block the reassembler no longer holds or remembers, whose every
        // message was delivered and handed over (the dedupe window holds it; none awaits
        // the application): stale like a remembered finished block's, instead of opening an
        // incomplete block that could evict one still being rebuilt. A message still
        // awaiting the application goes the usual way (a gone application refuses it
        // again). Validated first: the ids come from the header (at most 64).
        let block = frame.header.block;
        let finished = self.reassembler.is_finished(block);
        let forgotten_delivered = !finished
            && !self.reassembler.holds(block)
            && frame.validate(limits).is_ok()
            && frame
                .header
                .messages()
                .all(|id| self.dedupe.contains(id) && !self.withheld.contains(&id));
        if self.backlogged() && !forgotten_delivered && !finished {
            // It arrived (the sender's loss estimate must not count it lost), but holding it
            // would buffer without bound behind a slow application. Shards of finished blocks
            // still pass: they only repeat acks.
            self.stats.shards_received += 1;
            self.stats.shards_refused_backlog += 1;
            return;
        }
        let outcome = if forgotten_delivered {
            self.stats.shards_of_delivered += 1;
            self.reassembler.insert_delivered(frame)
        } else {
            self.reassembler.insert(frame)
        };
        // Distinct shards only: the sender's loss estimate compares this with what it sent,
        // and a duplicated packet must not hide a lost one.
        if !matches!(outcome, InsertOutcome::Duplicate) {
            self.stats.shards_received += 1;
        }
        let mut fresh = false;
        let mut triggers: Vec<u64> = Vec::new();
        while let Some(d) = self.reassembler.poll_delivery() {
            match self.accept(now, d.message_id, d.payload, false) {
                Accepted::Delivered => {
                    if !self.config.ack_on_take {
                        fresh = true;
                        triggers.push(d.message_id);
                    }
                }
                Accepted::KeyDuplicate => {
                    fresh = true;
                    triggers.push(d.message_id);
                }
                Accepted::Duplicate => triggers.push(d.message_id),
                Accepted::Refused | Accepted::Pending | Accepted::Held => {}
            }
        }
        if let InsertOutcome::Stale { messages } = outcome {
            // A shard of a finished block: its ack was probably lost.
            for id in messages {
                if self.refused.contains_key(&id) && !self.dedupe.contains(id) {
                    let reason = self.refused[&id];
                    self.refuse(now, id, reason, false);
                } else if self.dedupe.contains(id) {
                    triggers.push(id);
                }
            }
        }
        let reack_due = self
            .last_ack
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.reack_interval);
        if fresh || (!triggers.is_empty() && reack_due) {
            self.ack(now, !fresh, &triggers);
        }
        self.flush_refusals(now);
    }

    /// Takes a whole message body (an envelope) that arrived outside the datagram path (a
    /// stream message). It is delivered if new, and acked unless it is refused (out of the
    /// window, malformed, ...); in claims mode a new message waits for its claim first.
    /// With `ack_on_take`, a new message is acked once taken; the stream's answer
    /// ([`Whole::New`]) is the caller's to hold until then.
    pub fn handle_whole(&mut self, now: Instant, id: u64, body: Bytes) -> Whole {
        let whole = match self.accept(now, id, body, true) {
            Accepted::Delivered if self.config.ack_on_take => {
                // Answered once the application took it (`taken`), like its ack.
                self.withheld_streams.insert(id);
                Whole::Pending
            }
            Accepted::Delivered => {
                self.ack(now, false, &[id]);
                Whole::New
            }
            Accepted::KeyDuplicate => {
                self.ack(now, false, &[id]);
                Whole::New
            }
            Accepted::Duplicate if self.withheld.contains(&id) && !self.gone => {
                // Delivered but not yet taken: this copy is answered with the first.
                self.withheld_streams.insert(id);
                Whole::Pending
            }
            Accepted::Duplicate => {
                self.ack(now, true, &[id]);
                Whole::Duplicate
            }
            // Held: not delivered (its key's message is, but not yet taken); the stream
            // cannot wait for that, and a retry by key is then recognised.
            Accepted::Refused | Accepted::Held => Whole::Refused,
            Accepted::Pending => Whole::Pending,
        };
        self.flush_refusals(now);
        whole
    }

    /// Opens a rebuilt message body and delivers it unless its id, or its idempotency key,
    /// was delivered before. A body that is not a valid envelope is refused (counted): only
    /// a broken or hostile sender produces one, and acking it would claim a delivery.
    fn accept(&mut self, now: Instant, id: u64, body: Bytes, via_stream: bool) -> Accepted {
        if let Some(&reason) = self.refused.get(&id) {
            if !self.dedupe.contains(id) {
                // Refused before: the sender was told it is not delivered; it never will be.
                self.refuse(now, id, reason, via_stream);
                return Accepted::Refused;
            }
        }
        if let Some(p) = self.pending.get_mut(&id) {
            // Its claim is being made: this copy waits for the same answer (a stream re-send
            // takes the answer over), whether or not the application is still there.
            p.via_stream |= via_stream;
            return Accepted::Pending;
        }
        if self.gone && (self.withheld.contains(&id) || !self.dedupe.contains(id)) {
            self.refuse(now, id, REFUSE_CLOSED, via_stream);
            return Accepted::Refused;
        }
        if self.dedupe.contains(id) {
            self.stats.duplicates_suppressed += 1;
            return Accepted::Duplicate;
        }
        let envelope = match Envelope::decode(body) {
            Ok(envelope) => envelope,
            Err(_) => {
                self.stats.invalid_envelopes += 1;
                if !self.pending.contains_key(&id) {
                    self.refuse(now, id, REFUSE_MALFORMED, via_stream);
                }
                return Accepted::Refused;
            }
        };
        match self.dedupe.peek(now, id) {
            Seen::New => {}
            Seen::Duplicate => {
                self.stats.duplicates_suppressed += 1;
                return Accepted::Duplicate;
            }
            Seen::OutOfWindow => {
                self.stats.out_of_window += 1;
                self.refuse(now, id, REFUSE_OUT_OF_WINDOW, via_stream);
                return Accepted::Refused;
            }
        }
        if self.config.claims != Claims::Off {
            return self.accept_claimed(now, id, envelope, via_stream);
        }
        if let Some(key) = &envelope.key {
            if self.withheld_by_key.contains_key(key) {
                // A retry by key of a message the application has not taken yet: like a
                // copy of it, neither delivered nor acked (yet); the sender retries.
                return Accepted::Held;
            }
            match self.keys.check(now, key) {
                KeySeen::New => {}
                KeySeen::Seen => {
                    // Delivered before under another id (an application retry): the effect
                    // happened, so ack this id too, but deliver nothing.
                    self.dedupe.check(now, id);
                    self.stats.duplicate_keys += 1;
                    return Accepted::KeyDuplicate;
                }
                KeySeen::Full => {
                    self.refuse(now, id, REFUSE_KEYS_FULL, via_stream);
                    return Accepted::Refused;
                }
            }
        }
        self.dedupe.check(now, id);
        self.stats.delivered += 1;
        self.queued_bytes += envelope.payload.len();
        if self.config.ack_on_take {
            self.withhold(id, envelope.key.as_ref());
        }
        self.deliveries.push_back(Delivered {
            id,
            key: envelope.key,
            payload: envelope.payload,
        });
        Accepted::Delivered
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
        // (`accept` has answered copies of pending ids and judged the window.)
        if let Some(key) = &envelope.key {
            if self.withheld_by_key.contains_key(key) {
                // Its key's message awaits the application: nothing to ack yet.
                return Accepted::Held;
            }
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
        // The floor must not pass it while its claim is out (the claim may answer late).
        self.dedupe.pin(id);
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

    /// Refuses message `id` (definitely not delivered, and never will be): remembered, so a
    /// later copy is refused again, and queued for a REFUSE frame (unless it came on a
    /// stream, which answers for itself). A refusal that cannot be remembered is a counted
    /// drop, except for reasons that hold for every copy anyway (malformed, closed).
    fn refuse(&mut self, now: Instant, id: u64, reason: u64, via_stream: bool) {
        self.stats.refused.count(reason);
        self.expire_refused(now);
        // A malformed envelope is malformed in every copy, and a gone application stays
        // gone: only the other reasons could change, and must be remembered.
        let lasting = matches!(reason, REFUSE_MALFORMED | REFUSE_CLOSED);
        if !lasting && !self.refused.contains_key(&id) {
            if self.refused.len() >= self.config.max_refused_ids.max(1) {
                self.stats.refused.unsent += 1;
                return;
            }
            self.refused.insert(id, reason);
            self.refused_order.push_back((now, id));
        }
        if via_stream {
            return;
        }
        let queued: usize = self.refuse_out.values().map(BTreeSet::len).sum();
        if queued < MAX_REFUSE_QUEUE {
            self.refuse_out.entry(reason).or_default().insert(id);
        }
    }

    fn expire_refused(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.refused_order.front() {
            if now.saturating_duration_since(at) < self.config.hole_ttl {
                break;
            }
            self.refused_order.pop_front();
            self.refused.remove(&id);
        }
    }

    /// Sends the queued refusals, at most once per `reack_interval`.
    fn flush_refusals(&mut self, now: Instant) {
        if self.refuse_out.is_empty()
            || self
                .last_refuse
                .is_some_and(|t| now.saturating_duration_since(t) < self.config.reack_interval)
        {
            return;
        }
        let max = self.config.max_ack_ranges.clamp(
            1,
            usize::from(self.config.reassembler.limits.max_ack_ranges.max(1)),
        );
        for (reason, ids) in std::mem::take(&mut self.refuse_out) {
            let mut ranges: Vec<RangeInclusive<u64>> = Vec::new();
            for id in ids {
                match ranges.last_mut() {
                    Some(r) if *r.end() + 1 == id => *r = *r.start()..=id,
                    _ => ranges.push(id..=id),
                }
            }
            for chunk in ranges.chunks(max) {
                let frame = Frame::Refuse(RefuseFrame {
                    reason,
                    ranges: chunk.to_vec(),
                });
                self.out.push_back(frame.to_bytes());
                self.stats.refuse_frames += 1;
            }
        }
        self.last_refuse = Some(now);
    }

    /// When [`Receiver::handle_timeout`] should next be called: refusals wait out
    /// `reack_interval`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Refusals are queued only while one was sent within `reack_interval`.
        if self.refuse_out.is_empty() {
            return None;
        }
        self.last_refuse.map(|t| t + self.config.reack_interval)
    }

    /// Fires what is due at `now` (queued refusals).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.flush_refusals(now);
    }

    fn ack(&mut self, now: Instant, repeat: bool, triggers: &[u64]) {
        let max = self.config.max_ack_ranges.clamp(
            1,
            usize::from(self.config.reassembler.limits.max_ack_ranges.max(1)),
        );
        let ranges = self.dedupe.ack_ranges(max, triggers, &self.withheld);
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

    /// The next datagram (an ack or a refusal) to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }
}
