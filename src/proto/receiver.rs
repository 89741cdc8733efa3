//! The receiving side: reassembly, exactly-once delivery, redundant acks.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::answer::{Answer, AnswerError, Answering};
use super::dedupe::{DedupeWindow, Seen};
use super::keys::{
    payload_digest, request_digest, Digest, Holder, KeyVerdict, Scope, SharedKeys, ANONYMOUS,
    DEFAULT_MAX_REPLY_BYTES,
};
use crate::fec::window::{WindowDecoder, WindowLimits};
use crate::fec::{InsertOutcome, Reassembler, ReassemblerConfig};
use crate::wire::{
    AckFrame, Envelope, Frame, Kind, MessageFrame, RefuseFrame, RepairFrame, ReplayedFrame,
    ShardFrame, REFUSE_BLOCK, REFUSE_CLOSED, REFUSE_DECLINED, REFUSE_KEYS_FULL, REFUSE_KEY_REUSED,
    REFUSE_MALFORMED, REFUSE_OUT_OF_WINDOW, REFUSE_PASSED, STREAM_DELIVERED, STREAM_REFUSED,
    STREAM_REPLAYED,
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
    /// [`KEY_OVERHEAD_BYTES`](super::keys::KEY_OVERHEAD_BYTES) (192) bytes, so the default
    /// 1,048,576 keys take at most about 240 MiB with 36-byte keys (UUIDs as text), and hold
    /// 24 h of keys up to about 12 keyed messages a second. A server that needs 24 h of keys
    /// at higher rates claims its messages in a store ([`Claims::Owner`]), where keys are
    /// not bounded by memory.
    pub max_keys: usize,
    /// Most bytes (payload, plus [`MESSAGE_OVERHEAD_BYTES`] per message, so that empty
    /// messages count too) delivered but not yet taken by the application
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
    /// Bounds of the sliding-window decoder (protocol 2): symbols kept for the last
    /// `max_window` sources. Default 64 sources, 16 KiB symbols.
    pub window: WindowLimits,
    /// Most bytes of requests' replies the key record keeps (each for its key's TTL, so that
    /// a retried request gets the same reply). At the limit a request with a new key is
    /// refused (REFUSE code 3, like a full key record); no reply is forgotten early. Default
    /// 64 MiB.
    pub max_reply_bytes: usize,
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
            window: WindowLimits::default(),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
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
    /// Inbox pattern ([`Claims::Application`] with a store): the reservation its channel
    /// holds for it, which the application's claim settles inside its transaction
    /// ([`Claim::of`](crate::store::Claim::of) copies it). `None` otherwise.
    pub lease: Option<Lease>,
    /// A message, or (protocol 2) a request: its sender waits for a reply
    /// ([`Delivered::reply`]).
    pub kind: Kind,
    /// How the application answers it, when it awaits an answer (a request, or any message
    /// with explicit acks); set by the channel.
    pub(crate) answering: Answering,
}

impl Delivered {
    pub(crate) fn new(id: u64, key: Option<Bytes>, payload: Bytes, kind: Kind) -> Self {
        Delivered {
            id,
            key,
            payload,
            lease: None,
            kind,
            answering: Answering::default(),
        }
    }

    /// Whether it is a request (protocol 2): its sender waits for this application's
    /// [`Delivered::reply`] (or a [`Delivered::nack`]). A request is acked only by its
    /// answer, whatever the channel's ack mode.
    pub fn is_request(&self) -> bool {
        self.kind == Kind::Request
    }

    /// Whether this message awaits the application's answer ([`Delivered::ack`],
    /// [`Delivered::nack`], [`Delivered::reply`]): a request always, any message with
    /// [`Config::explicit_ack`](crate::channel::Config::explicit_ack). Dropping every clone of
    /// such a message without an answer gives it back ([`Answer::GiveBack`]).
    pub fn awaits_answer(&self) -> bool {
        self.answering.is_awaited()
    }

    /// The application is done with it: it is acked now (its key counts as delivered). A
    /// request answered this way gets an empty reply.
    pub fn ack(&self) -> Result<(), AnswerError> {
        match self.kind {
            Kind::Request => self.answering.answer(Answer::Reply(Bytes::new())),
            _ => self.answering.answer(Answer::Ack),
        }
    }

    /// The application did not process it, and will not: it is refused (its sender learns
    /// for certain that it was not delivered; a retry under its key is delivered afresh).
    pub fn nack(&self) -> Result<(), AnswerError> {
        self.answering.answer(Answer::Nack)
    }

    /// Answers a request with `reply`: it is acked, and the reply goes to its sender on the
    /// same coded path as any message. The reply is kept with the request's idempotency key
    /// for the key's lifetime: a retried request gets these bytes again.
    pub fn reply(&self, reply: impl Into<Bytes>) -> Result<(), AnswerError> {
        self.answering.answer(Answer::Reply(reply.into()))
    }

    /// Sets how the application answers it (the channel's part).
    pub fn set_answering(&mut self, answering: Answering) {
        self.answering = answering;
    }
}

/// A reply that arrived (protocol 2) for one of this end's requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyIn {
    /// The reply's own message id (in the peer's id space).
    pub id: u64,
    /// The request it answers (this end's message id).
    pub to: u64,
    /// The reply.
    pub payload: Bytes,
}

/// A reservation in a shared claims store (two-phase claims, [`crate::store`]): who holds it
/// and its fencing epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The claimant that holds the reservation.
    pub claimant: u64,
    /// Its fencing epoch.
    pub epoch: u64,
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
    /// Code 6: the floor passed the id before it was delivered.
    pub passed: u64,
    /// Code 8: the application declined it (a nack).
    pub declined: u64,
    /// Code 7: the key was delivered (or waits for the application) with another payload.
    pub key_reused: u64,
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
            REFUSE_PASSED => self.passed,
            REFUSE_KEY_REUSED => self.key_reused,
            REFUSE_DECLINED => self.declined,
            _ => 0,
        }
    }

    /// Every refusal.
    pub fn total(&self) -> u64 {
        self.malformed
            + self.out_of_window
            + self.keys_full
            + self.block
            + self.closed
            + self.passed
            + self.key_reused
            + self.declined
    }

    fn count(&mut self, code: u64) {
        match code {
            REFUSE_MALFORMED => self.malformed += 1,
            REFUSE_OUT_OF_WINDOW => self.out_of_window += 1,
            REFUSE_KEYS_FULL => self.keys_full += 1,
            REFUSE_BLOCK => self.block += 1,
            REFUSE_PASSED => self.passed += 1,
            REFUSE_KEY_REUSED => self.key_reused += 1,
            REFUSE_DECLINED => self.declined += 1,
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
    /// Messages whose idempotency key was delivered before (under another id) by this
    /// receiver: acked as replays, not delivered again.
    pub duplicate_keys: u64,
    /// Messages whose idempotency key another receiver sharing the key record (another
    /// channel of the same server) delivered before: acked as replays, not delivered again.
    pub duplicate_keys_elsewhere: u64,
    /// Copies of ids below what the dedupe window remembers (it cannot tell whether they were
    /// delivered): neither delivered, nor acked, nor refused.
    pub unknown_ids: u64,
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
    /// Gauge: bytes of those messages, payload plus
    /// [`MESSAGE_OVERHEAD_BYTES`] each (at most about `max_queued_bytes`).
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
    /// Messages the sliding window rebuilt from repairs (protocol 2), before judging.
    pub window_recovered: u64,
    /// Whole messages (protocol 2) too long to be window sources: judged, not kept.
    pub window_dropped: u64,
    /// Replies received (protocol 2) for this end's requests: acked at once.
    pub replies_received: u64,
    /// Replies sent again from the key record, answering a retried request.
    pub replies_replayed: u64,
    /// Messages the application declined (nack): refused with code 8.
    pub declined: u64,
    /// Messages the application dropped without an answer: given back, never answered.
    pub given_back: u64,
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
    /// SHA-256 of its payload when it has a key (kept with the key: a key reused with another
    /// payload is a conflict); zeros without a key.
    pub digest: Digest,
    /// The incarnation of the peer that sent it; an answer for an earlier one is ignored.
    pub generation: u64,
    /// Whether it is a request (protocol 2): its reply is kept with its claim.
    pub request: bool,
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
    /// The key was claimed before with another payload: refuse the message (REFUSE code 7),
    /// deliver nothing.
    Conflict,
}

/// What became of a whole (stream) message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Whole {
    /// Delivered now (or, with protocol 1, its key was delivered before): acked.
    New,
    /// Protocol 2: its key was delivered before with the same payload: acked as a replay.
    Replayed,
    /// No answer can be given now (its key's message awaits the application, or the id is
    /// below what the receiver remembers): outcome unknown to the sender.
    Unanswered,
    /// Delivered before: acked again.
    Duplicate,
    /// Out of the window or malformed: neither delivered nor acked.
    Refused,
    /// Awaiting its claim; the answer comes from [`Receiver::poll_stream_answer`].
    Pending,
}

/// Where one message stands, for as long as the receiver answers for it beyond the dedupe
/// window. A message absent from [`Receiver::messages`] is either delivered and acked (the
/// window holds it), or unknown (new, or forgotten).
///
/// ```text
///            ┌──claim (claims mode)──▶ Claiming ──Now──▶ Handed ──take──▶ (acked; window)
///  received ─┤                            ├──Before──▶ (acked, or Replayed)
///            │                            └──Failed/Conflict──▶ (dropped / Refused)
///            ├──new id, new key──────────────────────▶ Handed ──take──▶ (acked; window)
///            │                                            └──application gone──▶ Discarded
///            │            Handed ──nack──▶ Refused(8) ──hole_ttl──▶ (window)
///            │            Handed ──dropped unanswered──▶ Released ──hole_ttl──▶ (window)
///            ├──key delivered, same payload (protocol 2)──▶ Replayed ──hole_ttl──▶ (window)
///            │                 (a request: its kept reply goes out too)
///            ├──a reply (protocol 2)──▶ the channel's, acked at once (window)
///            └──refused (window, keys, block, passed, key reused, closed)──▶ Refused ──hole_ttl──▶ ·
/// ```
///
/// Rules stated once:
/// - An id in any state but `Claiming` is in the dedupe window as delivered or is not
///   deliverable; an ack never names an id that has a state here (a `Handed` message is acked
///   on its take, a `Replayed` one in REPLAYED frames, a `Discarded` one never).
/// - `Refused` and `Replayed` are remembered for `hole_ttl`, at most `max_refused_ids` of
///   them; `Handed` and `Discarded` are bounded by the delivery queue (`max_queued_bytes`),
///   `Claiming` by `max_pending_claims`.
#[derive(Debug)]
enum Msg {
    /// Awaiting its claim. `payload` until it is delivered (`None`: application claims, the
    /// application has it).
    Claiming {
        key: Option<Bytes>,
        digest: Digest,
        payload: Option<Bytes>,
        via_stream: bool,
        kind: Kind,
    },
    /// Delivered to the queue, not yet taken by the application: not acked; its key is held.
    /// `received`: the application received it and owes its answer (a request, or explicit
    /// acks): it stays `Handed` when the application drops its `Messages`, since the answer
    /// may still come (a shutdown that finishes its work).
    Handed {
        key: Option<Bytes>,
        via_stream: bool,
        received: bool,
    },
    /// Delivered to a queue the application dropped: never acked; copies are refused (5).
    Discarded,
    /// Handed over, then given back untaken when the application went away, and so open to
    /// another delivery (its claim released for another replica, or its key freed for
    /// another channel): neither acked nor refused here, now or for a copy (another copy may
    /// be delivered elsewhere before a refusal would reach its sender); its sender learns an
    /// unknown outcome and retries under its key. Also a message the application dropped
    /// without an answer ([`Answer::GiveBack`]). Kept `hole_ttl`.
    Released,
    /// Refused with `reason`: a later copy is refused again, until the floor passes the id
    /// (from then on it is refused as passed).
    Refused { reason: u64 },
    /// Protocol 2: acked as a replay of its key; named in REPLAYED frames, not in ACKs, for
    /// `hole_ttl`.
    Replayed,
}

impl Msg {
    /// Whether the id is delivered in the dedupe window and yet must not be acked: a replay
    /// (kept `hole_ttl`; acking it later is true, the key was delivered), a message the
    /// application declined or gave back (kept until the sender's FLOOR passes it: acking
    /// it would be false). Never pruned by the window's floor.
    fn answered_after_delivery(&self) -> bool {
        matches!(
            self,
            Msg::Replayed
                | Msg::Released
                | Msg::Refused {
                    reason: REFUSE_DECLINED
                }
        )
    }

    /// Whether the state counts against `max_refused_ids`.
    fn remembered(&self) -> bool {
        matches!(self, Msg::Refused { .. } | Msg::Replayed)
    }
}

/// A message of one of the sender's previous incarnations (its ids mean nothing to the
/// current one, so acks for it go nowhere) that still matters here.
#[derive(Debug)]
enum Old {
    /// Handed to the application, not yet taken: its key stays held (a retry from the new
    /// incarnation is not acked before the take) and is delivered at the take.
    Handed { key: Option<(Bytes, Holder)> },
    /// Its claim was asked before the peer restarted: the store's answer still decides
    /// (a `Now` recorded the delivery, so the message must be handed over).
    Claiming {
        key: Option<Bytes>,
        digest: Digest,
        payload: Option<Bytes>,
    },
}

/// What became of one rebuilt message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accepted {
    /// Delivered to the application.
    Delivered,
    /// Its id is new but its idempotency key was delivered before: acked, not delivered.
    KeyDuplicate,
    /// Protocol 2: as `KeyDuplicate`, answered with a REPLAYED frame instead of an ack.
    Replayed,
    /// Its id was delivered before.
    Duplicate,
    /// A reply (protocol 2) to one of this end's requests: taken by the channel, acked now.
    Reply,
    /// A copy of a message delivered and not yet taken: answered with it, on its take.
    HandedCopy,
    /// Refused, or dropped: neither delivered nor acked.
    Refused,
    /// Awaiting its claim: neither delivered nor acked yet.
    Pending,
    /// Its idempotency key's message awaits the application's take (or its id is below what
    /// the window remembers): neither delivered nor acked now, not recorded either (a later
    /// copy is judged again).
    Held,
}

/// What a receiver sends besides acks, coalesced by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Notice {
    Refuse(u64),
    Replayed,
}

/// Bytes a queued message counts against `max_queued_bytes` besides its payload: its place
/// in the queue and its state, so that empty messages cannot queue without bound.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64;

/// What a queued message counts against `max_queued_bytes`.
fn cost(payload: &Bytes) -> usize {
    payload.len() + MESSAGE_OVERHEAD_BYTES
}

/// The largest block of one message that passes while the receiver is backlogged (a reply
/// may be in it): the reassembler's caps bound what such blocks hold.
const SMALL_BLOCK: u64 = 1024;

/// Most replies received and not yet taken by the channel ([`Receiver::poll_reply`]); more
/// are left unacked (their sender sends them again).
const MAX_REPLIES_QUEUED: usize = 4096;

/// Most ids waiting in REFUSE/REPLAYED frames not yet sent; more are answered again when their
/// copies come back.
const MAX_NOTICE_QUEUE: usize = 64;

/// The receiving half of a surelink peer. Sans-I/O.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    reassembler: Reassembler,
    /// The sliding-window decoder (protocol 2): sources and repairs of this connection.
    window: WindowDecoder,
    dedupe: DedupeWindow,
    /// The idempotency-key record (this receiver's own, or shared by a server's channels).
    keys: SharedKeys,
    /// Whose keys this receiver's messages carry.
    scope: Scope,
    /// This receiver's name in the key record.
    token: u64,
    /// The protocol version the peer speaks (2: REPLAYED frames, stream status 2).
    protocol: u8,
    /// Delivered messages not yet handed out, with the incarnation they came from.
    deliveries: VecDeque<(Delivered, u64)>,
    /// Payload bytes in `deliveries` and in `Claiming` messages.
    queued_bytes: usize,
    /// Every message's state beyond the dedupe window; see [`Msg`].
    messages: BTreeMap<u64, Msg>,
    /// `Handed` messages in `messages`.
    handed: usize,
    /// `Claiming` messages in `messages`.
    claiming: usize,
    /// Remembered states (`Msg::remembered`) in `messages`.
    remembered: usize,
    /// When replays expire, in order: `(since, id)` (stale entries are skipped).
    expiry: VecDeque<(Instant, u64)>,
    /// Refusals below this were pruned (the floor passed them).
    pruned_to: u64,
    claims_out: VecDeque<ClaimRequest>,
    /// (message id, status byte) for stream messages whose answer waited.
    /// (`None`: end the stream without an answer, the outcome unknown.)
    stream_answers: VecDeque<(u64, Option<u8>)>,
    /// Counts the peer's incarnations (`peer_lost_state`).
    generation: u64,
    /// Messages of the sender's previous incarnations the receiver still answers for, by
    /// (generation, id): see [`Old`] and [`Receiver::peer_lost_state`].
    old: BTreeMap<(u64, u64), Old>,
    /// (id, generation) of messages handed out by `poll_delivery` and awaiting their take, in
    /// the order the application receives them: a take names an id, this says of which
    /// incarnation.
    handed_out: VecDeque<(u64, u64)>,
    out: VecDeque<Bytes>,
    last_ack: Option<Instant>,
    /// The application is gone: nothing more is delivered.
    gone: bool,
    /// Ids waiting to go out in REFUSE and REPLAYED frames.
    notices_out: BTreeMap<Notice, BTreeSet<u64>>,
    last_notice: Option<Instant>,
    /// Replies received for this end's requests, for the channel ([`Receiver::poll_reply`]).
    replies_in: VecDeque<ReplyIn>,
    /// Replies to send: `(request id, reply)` ([`Receiver::poll_reply_out`]).
    replies_out: VecDeque<(u64, Bytes)>,
    /// Replies to record with their claims first (claims mode): `(request id, reply)`.
    replies_to_record: VecDeque<(u64, Bytes)>,
    /// Window sources of this connection: (distinct ones received, the newest `seq` + 1).
    sources: (u64, u64),
    /// The sender's FLOOR: every id below has its outcome there.
    peer_floor: u64,
    /// Set while judging what arrived during a backlog: only replies are taken.
    only_replies: bool,
    /// Declined and given-back states below this were pruned (the sender's FLOOR passed them).
    unackable_pruned_to: u64,

    stats: ReceiverStats,
}

impl Receiver {
    /// A receiver with `config`, with its own key record, speaking protocol 2.
    pub fn new(config: ReceiverConfig) -> Self {
        let keys =
            SharedKeys::with_replies(config.key_ttl, config.max_keys, config.max_reply_bytes);
        let token = keys.with(|r| r.holder_token());
        Receiver {
            reassembler: Reassembler::new(config.reassembler.clone()),
            window: WindowDecoder::new(config.window),
            dedupe: DedupeWindow::new(config.dedupe_window, config.hole_ttl),
            keys,
            scope: ANONYMOUS,
            token,
            protocol: 2,
            config,
            deliveries: VecDeque::new(),
            queued_bytes: 0,
            messages: BTreeMap::new(),
            handed: 0,
            claiming: 0,
            remembered: 0,
            expiry: VecDeque::new(),
            pruned_to: 0,
            claims_out: VecDeque::new(),
            stream_answers: VecDeque::new(),
            generation: 0,
            old: BTreeMap::new(),
            handed_out: VecDeque::new(),
            out: VecDeque::new(),
            last_ack: None,
            gone: false,
            notices_out: BTreeMap::new(),
            last_notice: None,
            replies_in: VecDeque::new(),
            replies_out: VecDeque::new(),
            replies_to_record: VecDeque::new(),
            sources: (0, 0),
            peer_floor: 0,
            only_replies: false,
            unackable_pruned_to: 0,
            stats: ReceiverStats::default(),
        }
    }

    /// Judges keys in `keys` (shared with the other channels of a server) under `scope` (the
    /// client's identity) instead of in a record of its own. Call before anything is
    /// received.
    pub fn share_keys(&mut self, keys: SharedKeys, scope: Scope) {
        self.token = keys.with(|r| r.holder_token());
        self.keys = keys;
        self.scope = scope;
    }

    /// The protocol version the peer speaks: with 1, a replay is acked like a delivery (no
    /// REPLAYED frame, stream status 0).
    pub fn set_protocol(&mut self, version: u8) {
        self.protocol = version;
    }

    /// The protocol version the peer speaks ([`Receiver::set_protocol`]).
    pub fn protocol(&self) -> u8 {
        self.protocol
    }

    /// Counters.
    pub fn stats(&self) -> ReceiverStats {
        ReceiverStats {
            ids_tracked: self.dedupe.tracked(),
            keys_held: self.keys.len(),
            deliveries_queued: self.deliveries.len(),
            bytes_queued: self.queued_bytes,
            claims_pending: self.claiming,
            awaiting_take: if self.gone { 0 } else { self.handed },
            ..self.stats
        }
    }

    /// The connection was replaced: reassembly starts over (block ids are per connection), while
    /// the dedupe window, which is per channel, carries over, so a message re-sent on the new
    /// connection is recognised and acked, not delivered again.
    pub fn new_connection(&mut self) {
        self.reassembler = Reassembler::new(self.config.reassembler.clone());
        self.window = WindowDecoder::new(self.config.window);
        self.sources = (0, 0);
        self.out.clear();
        self.last_ack = None;
        self.notices_out.clear();
        self.last_notice = None;
    }

    /// The peer came back without its state (it restarted): its message ids start over, so
    /// the dedupe window starts over too (otherwise its new messages would look like
    /// duplicates and never be delivered). Idempotency keys are kept: they are the
    /// application's, and a retry by key must still be recognised.
    pub fn peer_lost_state(&mut self) {
        self.new_connection();
        self.dedupe = DedupeWindow::new(self.config.dedupe_window, self.config.hole_ttl);
        // The old incarnation's ids mean nothing to its successor (their acks go nowhere),
        // but a message of it still waiting for the application keeps holding its key: a
        // retry under that key from the new incarnation is not acked before the application
        // took the message (it could still drop it). Claims asked for the old incarnation's
        // ids still decide: a `Now` answer means the store recorded the delivery.
        let generation = self.generation;
        for (id, m) in std::mem::take(&mut self.messages) {
            let old = match m {
                Msg::Handed { key, .. } => Old::Handed {
                    key: key.map(|k| (k, self.holder(id))),
                },
                Msg::Claiming {
                    key,
                    digest,
                    payload,
                    ..
                } => {
                    self.dedupe.unpin(id);
                    Old::Claiming {
                        key,
                        digest,
                        payload,
                    }
                }
                _ => continue,
            };
            self.old.insert((generation, id), old);
        }
        self.handed = 0;
        self.claiming = 0;
        self.remembered = 0;
        self.expiry.clear();
        self.pruned_to = 0;
        self.peer_floor = 0;
        self.unackable_pruned_to = 0;
        self.claims_out.clear();
        self.generation += 1;
    }

    /// Starts a fresh channel's dedupe window at `floor`: the client says every id below it
    /// was acked or given up (a server taking the channel over from another replica, with
    /// claims in a shared store). No effect once anything was received.
    pub fn start_at(&mut self, floor: u64) {
        if self.dedupe.floor() == 0 && self.dedupe.tracked() == 0 && self.messages.is_empty() {
            self.dedupe =
                DedupeWindow::starting_at(floor, self.config.dedupe_window, self.config.hole_ttl);
        }
    }

    /// The sender's FLOOR: every id below `floor` has its outcome at the sender. The dedupe
    /// window's low watermark moves up to it (never down, never past a pending claim), so
    /// ids beyond the old window are accepted again; ids it passes undelivered are refused
    /// if they ever come (REFUSE code 6).
    pub fn handle_floor(&mut self, now: Instant, floor: u64) {
        self.peer_floor = self.peer_floor.max(floor);
        if self.dedupe.advance_to(now, floor) {
            self.stats.floor_advances += 1;
        }
    }

    /// The dedupe window's low watermark: every id below it was delivered, or passed.
    pub fn floor(&self) -> u64 {
        self.dedupe.floor()
    }

    /// The next claim to ask of the owner (claims mode).
    #[must_use]
    pub fn poll_claim(&mut self) -> Option<ClaimRequest> {
        self.claims_out.pop_front()
    }

    /// The owner's answer to a claim: the message is delivered and acked
    /// ([`ClaimOutcome::Now`]), acked only ([`ClaimOutcome::Before`]), refused
    /// ([`ClaimOutcome::Conflict`]) or dropped ([`ClaimOutcome::Failed`]).
    pub fn claim_done(&mut self, now: Instant, request: &ClaimRequest, outcome: ClaimOutcome) {
        if request.generation != self.generation {
            self.settle_old(now, request.generation, request.id, outcome);
            return;
        }
        self.settle(now, request.id, outcome);
        self.flush_notices(now);
    }

    /// Application claims (the inbox pattern): the owner reserved message `request.id` for
    /// this receiver (`lease`; `None` without a store), so it is handed to the application
    /// now, with the lease its transaction settles; it is acked on
    /// [`Receiver::confirm`]. After the application went away it is dropped unacked (the
    /// lease ends by itself).
    pub fn reserved(&mut self, request: &ClaimRequest, lease: Option<Lease>) {
        if request.generation != self.generation {
            if let Some(Old::Claiming { payload, key, .. }) =
                self.old.get_mut(&(request.generation, request.id))
            {
                if let Some(payload) = payload.take() {
                    if self.gone {
                        self.queued_bytes -= cost(&payload);
                        self.old.remove(&(request.generation, request.id));
                        self.stats.discarded += 1;
                        return;
                    }
                    self.stats.delivered += 1;
                    let key = key.clone();
                    self.deliveries.push_back((
                        Delivered {
                            lease,
                            ..Delivered::new(request.id, key, payload, Kind::Message)
                        },
                        request.generation,
                    ));
                }
            }
            return;
        }
        let Some(Msg::Claiming {
            payload, key, kind, ..
        }) = self.messages.get_mut(&request.id)
        else {
            return;
        };
        let Some(payload) = payload.take() else {
            return;
        };
        let (key, kind) = (key.clone(), *kind);
        if self.gone {
            self.queued_bytes -= cost(&payload);
            self.unset(request.id);
            self.dedupe.unpin(request.id);
            self.stats.discarded += 1;
            self.stats.unknown_ids += 1;
            return;
        }
        self.stats.delivered += 1;
        self.deliveries.push_back((
            Delivered {
                lease,
                ..Delivered::new(request.id, key, payload, kind)
            },
            self.generation,
        ));
    }

    /// A claim of a previous incarnation's message answered (or, with application claims,
    /// the application confirmed one): nothing is acked (the ids mean nothing now), but a
    /// `Now` for a message not yet handed over hands it over, since the store recorded its
    /// delivery.
    fn settle_old(&mut self, now: Instant, generation: u64, id: u64, outcome: ClaimOutcome) {
        let Some(Old::Claiming {
            key,
            digest,
            payload,
        }) = self.old.remove(&(generation, id))
        else {
            return;
        };
        if let Some(p) = &payload {
            self.queued_bytes -= cost(p);
        }
        match (outcome, payload) {
            (ClaimOutcome::Now, Some(payload)) => {
                self.stats.delivered += 1;
                if self.gone {
                    self.stats.discarded += 1;
                }
                let holder = Holder {
                    receiver: self.token,
                    generation,
                    id,
                };
                if let Some(k) = &key {
                    let scope = self.scope;
                    self.keys.with(|r| {
                        let _ = r.judge(now, scope, k, digest, holder);
                    });
                }
                if self.config.ack_on_take && !self.gone {
                    self.old.insert(
                        (generation, id),
                        Old::Handed {
                            key: key.clone().map(|k| (k, holder)),
                        },
                    );
                } else if let Some(k) = &key {
                    let scope = self.scope;
                    self.keys.with(|r| r.taken(now, scope, k, holder));
                }
                self.queued_bytes += cost(&payload);
                self.deliveries
                    .push_back((Delivered::new(id, key, payload, Kind::Message), generation));
            }
            (ClaimOutcome::Now | ClaimOutcome::Before, _) => {
                if let Some(k) = &key {
                    self.remember_key(now, k, digest);
                }
            }
            _ => {}
        }
    }

    /// The application's answer for message `id` in [`Claims::Application`] mode, after
    /// its transaction: [`ClaimOutcome::Now`] (committed with its claim) or
    /// [`ClaimOutcome::Before`] (the claim existed: another replica or an earlier delivery
    /// handled it) ack it; [`ClaimOutcome::Failed`] (rolled back) leaves it unacked;
    /// [`ClaimOutcome::Conflict`] (its key was claimed with another payload) refuses it.
    ///
    /// After the peer restarted, an id can name a message of each incarnation: a confirmation
    /// settles the oldest unsettled one (the application confirms in the order it received
    /// them).
    pub fn confirm(&mut self, now: Instant, id: u64, outcome: ClaimOutcome) {
        if self.config.claims != Claims::Application {
            return;
        }
        let old = self
            .old
            .iter()
            .find(|(&(_, i), o)| i == id && matches!(o, Old::Claiming { .. }))
            .map(|(&(g, _), _)| g);
        match old {
            Some(generation) => self.settle_old(now, generation, id, outcome),
            None => {
                self.settle(now, id, outcome);
                self.flush_notices(now);
            }
        }
    }

    fn holder(&self, id: u64) -> Holder {
        Holder {
            receiver: self.token,
            generation: self.generation,
            id,
        }
    }

    /// Sets message `id`'s state (keeping the counts and the expiry queue).
    fn set(&mut self, now: Instant, id: u64, m: Msg) {
        if let Some(old) = self.messages.remove(&id) {
            self.count(&old, false);
        }
        if matches!(m, Msg::Replayed) {
            self.expiry.push_back((now, id));
        }
        self.count(&m, true);
        self.messages.insert(id, m);
    }

    /// Removes message `id`'s state.
    fn unset(&mut self, id: u64) -> Option<Msg> {
        let m = self.messages.remove(&id)?;
        self.count(&m, false);
        Some(m)
    }

    fn count(&mut self, m: &Msg, add: bool) {
        let counter = match m {
            Msg::Handed { .. } => &mut self.handed,
            Msg::Claiming { .. } => &mut self.claiming,
            m if m.remembered() => &mut self.remembered,
            _ => return,
        };
        if add {
            *counter += 1;
        } else {
            *counter -= 1;
        }
    }

    /// Replays older than `hole_ttl` are forgotten (their ids are delivered: acks name them
    /// again); refusals the floor passed are forgotten (their ids are passed: refused
    /// forever).
    fn expire(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.expiry.front() {
            if now.saturating_duration_since(at) < self.config.hole_ttl {
                break;
            }
            self.expiry.pop_front();
            if matches!(self.messages.get(&id), Some(Msg::Replayed)) {
                self.unset(id);
            }
        }
        // Declined and given-back ids are delivered in the window, so they stay until their
        // sender's FLOOR says it has their outcome (it sends no more copies): only then may a
        // copy read as delivered. A sender that sends no FLOOR leaves them until the bound.
        if self.peer_floor > self.unackable_pruned_to {
            let settled: Vec<u64> = self
                .messages
                .range(self.unackable_pruned_to..self.peer_floor)
                .filter(|(_, m)| m.answered_after_delivery() && !matches!(m, Msg::Replayed))
                .map(|(&id, _)| id)
                .collect();
            for id in settled {
                self.unset(id);
            }
            self.unackable_pruned_to = self.peer_floor;
        }
        let floor = self.dedupe.floor();
        if floor > self.pruned_to {
            let passed: Vec<u64> = self
                .messages
                .range(self.pruned_to..floor)
                // Not those answered after their delivery: their ids are delivered in the
                // window, so a copy would be acked as a duplicate (they go with `expiry`).
                .filter(|(_, m)| matches!(m, Msg::Refused { .. }) && !m.answered_after_delivery())
                .map(|(&id, _)| id)
                .collect();
            for id in passed {
                self.unset(id);
            }
            self.pruned_to = floor;
        }
    }

    fn settle(&mut self, now: Instant, id: u64, outcome: ClaimOutcome) {
        if !matches!(self.messages.get(&id), Some(Msg::Claiming { .. })) {
            return;
        }
        let Some(Msg::Claiming {
            key,
            digest,
            payload,
            via_stream,
            kind,
        }) = self.unset(id)
        else {
            unreachable!("checked above");
        };
        self.dedupe.unpin(id);
        if let Some(payload) = &payload {
            self.queued_bytes -= cost(payload);
        }
        let status = match outcome {
            ClaimOutcome::Failed => {
                // Not delivered as this copy, but its payment may be (another copy with its
                // key, handed over meanwhile, or a retry): a stream gets no answer, its
                // sender an unknown outcome.
                self.stats.claim_failures += 1;
                None
            }
            ClaimOutcome::Conflict => {
                self.refuse(now, id, REFUSE_KEY_REUSED, via_stream);
                Some(STREAM_REFUSED)
            }
            ClaimOutcome::Now if self.gone && payload.is_some() => {
                // Settled while the application went away (its owner releases the claim:
                // nobody will take it): given back, never answered here.
                self.stats.discarded += 1;
                self.release_handed(now, id, via_stream);
                return;
            }
            ClaimOutcome::Now | ClaimOutcome::Before => {
                // Pending ids are held out of the window (and the floor stops below them)
                // until now: this records them.
                self.dedupe.check(now, id);
                match (outcome, payload) {
                    // A `Now` means this receiver owns the message: nobody else will
                    // deliver it, so it is delivered, whatever the window says.
                    (ClaimOutcome::Now, Some(payload)) => {
                        // The store holds the keys in claims mode: the record only caches
                        // them, so a full record is no reason to refuse here.
                        if let Some(k) = &key {
                            let holder = self.holder(id);
                            let scope = self.scope;
                            self.keys.with(|r| {
                                let _ = r.judge(now, scope, k, digest, holder);
                                if !self.config.ack_on_take {
                                    r.taken(now, scope, k, holder);
                                }
                            });
                        }
                        self.deliver(now, id, key, kind, payload, via_stream);
                        if self.config.ack_on_take {
                            // Answered once taken, like the ack.
                            return;
                        }
                        self.ack(now, false, &[id]);
                        Some(STREAM_DELIVERED)
                    }
                    // Delivered already (application claims) and claimed now: nothing more.
                    (ClaimOutcome::Now, None) => {
                        if let Some(k) = &key {
                            self.remember_key(now, k, digest);
                        }
                        self.ack(now, false, &[id]);
                        Some(STREAM_DELIVERED)
                    }
                    _ => {
                        self.stats.claimed_before += 1;
                        if let Some(k) = &key {
                            self.remember_key(now, k, digest);
                        }
                        Some(self.replayed(now, id, false))
                    }
                }
            }
        };
        if via_stream {
            self.stream_answers.push_back((id, status));
        }
    }

    fn remember_key(&mut self, now: Instant, key: &Bytes, digest: Digest) {
        let (scope, by) = (self.scope, self.token);
        self.keys.with(|r| r.remember(now, scope, key, digest, by));
    }

    /// Message `id` is acked without a delivery (its key, or its claim, was delivered
    /// before): with protocol 2 it is remembered as `Replayed` and named in a REPLAYED frame
    /// (never in an ACK); with protocol 1, or when it cannot be remembered, acked. Returns
    /// the stream status for it.
    fn replayed(&mut self, now: Instant, id: u64, via_stream: bool) -> u8 {
        self.expire(now);
        if self.protocol >= 2 && self.remembered < self.config.max_refused_ids.max(1) {
            self.set(now, id, Msg::Replayed);
            if !via_stream {
                // At once, like the ack of a delivery (copies are answered again, at most
                // every `reack_interval`).
                let frame = Frame::Replayed(ReplayedFrame {
                    ranges: vec![id..=id],
                });
                self.out.push_back(frame.to_bytes());
            }
            STREAM_REPLAYED
        } else {
            self.ack(now, false, &[id]);
            STREAM_DELIVERED
        }
    }

    /// Delivers message `id` to the queue; with `ack_on_take` it is `Handed` until taken.
    fn deliver(
        &mut self,
        now: Instant,
        id: u64,
        key: Option<Bytes>,
        kind: Kind,
        payload: Bytes,
        via_stream: bool,
    ) {
        self.stats.delivered += 1;
        self.queued_bytes += cost(&payload);
        if self.config.ack_on_take {
            self.set(
                now,
                id,
                Msg::Handed {
                    key: key.clone(),
                    via_stream,
                    received: false,
                },
            );
        }
        self.deliveries
            .push_back((Delivered::new(id, key, payload, kind), self.generation));
    }

    /// The application took delivered message `id` (with `ack_on_take`): it is acked now, and
    /// its key counts as delivered from now. Ids not awaiting a take are ignored.
    pub fn taken(&mut self, now: Instant, id: u64) {
        self.answered(now, id, Answer::Ack);
    }

    /// The application answered delivered message `id` (with `ack_on_take`; see
    /// [`Answer`]): [`Answer::Ack`] is [`Receiver::taken`]; [`Answer::Reply`] takes it with
    /// its reply, which its key keeps and which goes out ([`Receiver::poll_reply_out`]);
    /// [`Answer::Nack`] refuses it (code 8) and frees its key; [`Answer::GiveBack`] frees
    /// its key and never answers it (`Released`). In [`Claims::Owner`] mode the store
    /// recorded its delivery before the hand-over: the link releases that claim on a nack or
    /// a give-back. Ids not awaiting an answer are ignored.
    pub fn answered(&mut self, now: Instant, id: u64, answer: Answer) {
        // Which incarnation's message: the first handed out with this id.
        let generation = match self.handed_out.iter().position(|&(i, _)| i == id) {
            Some(at) => self
                .handed_out
                .remove(at)
                .map_or(self.generation, |(_, g)| g),
            None => self.generation,
        };
        let keep = matches!(answer, Answer::Ack | Answer::Reply(_));
        if generation != self.generation {
            // A message of a previous incarnation: nothing to ack (and its reply has no
            // request to go to); its key is delivered now, or freed.
            if let Some(Old::Handed {
                key: Some((key, holder)),
            }) = self.old.remove(&(generation, id))
            {
                let scope = self.scope;
                let reply = match &answer {
                    // Its request has nobody to go to, but its key keeps the reply: a retry
                    // from the peer's new incarnation gets it.
                    Answer::Reply(reply) => Some(reply.clone()),
                    _ => None,
                };
                self.keys.with(|r| match keep {
                    true => r.taken_with(now, scope, &key, holder, reply),
                    false => r.release(scope, &key, holder),
                });
            }
            return;
        }
        if !matches!(self.messages.get(&id), Some(Msg::Handed { .. })) {
            return;
        }
        if let (Answer::Reply(reply), Claims::Owner) = (&answer, self.config.claims) {
            // Recorded with its claim first (`Receiver::reply_recorded`), so that a retry on
            // any replica gets it; until then copies wait with the message.
            self.replies_to_record.push_back((id, reply.clone()));
            return;
        }
        self.finish_answer(now, id, answer);
    }

    /// Claims mode: the reply to request `id` was recorded with its claim (or could not
    /// be): it is answered now.
    pub fn reply_recorded(&mut self, now: Instant, id: u64, reply: Bytes) {
        if !matches!(self.messages.get(&id), Some(Msg::Handed { .. })) {
            return;
        }
        self.finish_answer(now, id, Answer::Reply(reply));
    }

    /// The next reply to record with its request's claim before it goes out: `(request id,
    /// reply)` ([`Receiver::reply_recorded`]).
    #[must_use]
    pub fn poll_reply_record(&mut self) -> Option<(u64, Bytes)> {
        self.replies_to_record.pop_front()
    }

    /// Claims mode: the store says request `request` was settled before (here or on
    /// another replica) and keeps `reply` with it: the reply goes out to this copy's id and
    /// the record caches it under the key. The claim's `Before` follows
    /// ([`Receiver::claim_done`]).
    pub fn replay_reply(&mut self, now: Instant, request: &ClaimRequest, reply: Bytes) {
        if request.generation != self.generation {
            return;
        }
        self.stats.replies_replayed += 1;
        if let Some(key) = &request.key {
            let (scope, by) = (self.scope, self.token);
            let r = reply.clone();
            self.keys
                .with(|rec| rec.remember_with(now, scope, key, request.digest, by, Some(r)));
        }
        self.replies_out.push_back((request.id, reply));
    }

    /// Ends message `id`'s hand-over with the application's answer (current incarnation,
    /// `Handed`).
    fn finish_answer(&mut self, now: Instant, id: u64, answer: Answer) {
        let keep = matches!(answer, Answer::Ack | Answer::Reply(_));
        let Some(Msg::Handed {
            key, via_stream, ..
        }) = self.unset(id)
        else {
            return;
        };
        let (scope, holder) = (self.scope, self.holder(id));
        let reply = match &answer {
            Answer::Reply(reply) => Some(reply.clone()),
            _ => None,
        };
        if let Some(key) = &key {
            self.keys.with(|r| match keep {
                true => r.taken_with(now, scope, key, holder, reply.clone()),
                false => r.release(scope, key, holder),
            });
        }
        match answer {
            Answer::Ack | Answer::Reply(_) => {
                if via_stream {
                    self.stream_answers.push_back((id, Some(STREAM_DELIVERED)));
                }
                self.ack(now, false, &[id]);
                if let Some(reply) = reply {
                    self.replies_out.push_back((id, reply));
                }
            }
            Answer::Nack => {
                self.stats.declined += 1;
                // Remembered whatever the count (bounded by the ids in flight: the floor
                // prunes it), so that a copy is refused again, never acked as delivered.
                self.set(
                    now,
                    id,
                    Msg::Refused {
                        reason: REFUSE_DECLINED,
                    },
                );
                self.refuse(now, id, REFUSE_DECLINED, via_stream);
                if via_stream {
                    self.stream_answers.push_back((id, Some(STREAM_REFUSED)));
                }
                self.flush_notices(now);
            }
            Answer::GiveBack => {
                self.stats.given_back += 1;
                self.release_handed(now, id, via_stream);
            }
        }
    }

    /// The loss of the peer's datagrams on the way here, as this connection's window sources
    /// show it: `(lost, sent)`, where `sent` counts the sources up to the newest received
    /// (a few of the newest "lost" may still be on their way).
    pub fn incoming_loss(&self) -> (u64, u64) {
        (
            self.sources.1 - self.sources.0.min(self.sources.1),
            self.sources.1,
        )
    }

    /// The application received message `id` (handed over, awaiting its answer): if it drops
    /// its `Messages` now, the answer may still come ([`Receiver::application_gone`] keeps it).
    pub fn received(&mut self, id: u64) {
        if let Some(Msg::Handed { received, .. }) = self.messages.get_mut(&id) {
            *received = true;
        }
    }

    /// The next reply received for one of this end's requests.
    #[must_use]
    pub fn poll_reply(&mut self) -> Option<ReplyIn> {
        self.replies_in.pop_front()
    }

    /// The next reply to send: `(request id, reply)`, for the peer's request `id` (answered
    /// now, or retried under a key whose reply is kept).
    #[must_use]
    pub fn poll_reply_out(&mut self) -> Option<(u64, Bytes)> {
        self.replies_out.pop_front()
    }

    /// The application will never take another message. Messages delivered but not taken
    /// are discarded: never acked (counted in [`ReceiverStats::discarded`]; with
    /// `ack_on_take` off they were acked already, which is why a channel sets it), their keys
    /// released, and their senders told they were not delivered (REFUSE code 5); new messages
    /// are refused with code 5. In [`Claims::Owner`] mode a claimed message stays handed over
    /// instead (see `owner_gone`: the claim is the record of its delivery).
    pub fn application_gone(&mut self, now: Instant) {
        if self.gone {
            return;
        }
        self.gone = true;
        // Messages the application received and still owes an answer stay handed out: their
        // answers may come.
        let messages = &self.messages;
        let generation = self.generation;
        self.handed_out.retain(|&(id, g)| {
            g == generation && matches!(messages.get(&id), Some(Msg::Handed { received: true, .. }))
        });
        let old: Vec<(u64, u64)> = self
            .old
            .iter()
            .filter(|(_, o)| matches!(o, Old::Handed { .. }))
            .map(|(&k, _)| k)
            .collect();
        for k in old {
            self.stats.discarded += 1;
            if let Some(Old::Handed {
                key: Some((key, holder)),
            }) = self.old.remove(&k)
            {
                let scope = self.scope;
                self.keys.with(|r| r.release(scope, &key, holder));
            }
        }
        if self.config.claims == Claims::Owner {
            self.owner_gone(now);
            return;
        }
        self.drop_unasked();
        for (d, generation) in std::mem::take(&mut self.deliveries) {
            self.queued_bytes -= cost(&d.payload);
            if generation != self.generation {
                // A previous incarnation's: counted with `old` above.
                continue;
            }
            match self.messages.get(&d.id) {
                Some(Msg::Handed { .. }) => {}
                Some(Msg::Claiming { payload: None, .. }) => {
                    // Application claims: never taken, so never claimed either. No refusal:
                    // another copy, or another replica sharing the application's store, may
                    // deliver it before a refusal from here would reach its sender.
                    self.stats.discarded += 1;
                    if let Some(Msg::Claiming { via_stream, .. }) = self.unset(d.id) {
                        self.dedupe.unpin(d.id);
                        self.stats.unknown_ids += 1;
                        if via_stream {
                            self.stream_answers.push_back((d.id, None));
                        }
                    }
                }
                // Otherwise acked already (`ack_on_take` off): nothing to take back.
                _ => self.stats.discarded += 1,
            }
        }
        let handed: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| {
                matches!(
                    m,
                    Msg::Handed {
                        received: false,
                        ..
                    }
                )
            })
            .map(|(&id, _)| id)
            .collect();
        for id in handed {
            let Some(Msg::Handed {
                key, via_stream, ..
            }) = self.unset(id)
            else {
                continue;
            };
            self.stats.discarded += 1;
            if let Some(key) = key {
                // Freed for another channel, which may deliver it before a refusal from here
                // would reach the sender: no answer here (unknown).
                let (scope, holder) = (self.scope, self.holder(id));
                self.keys.with(|r| r.release(scope, &key, holder));
                self.release_handed(now, id, via_stream);
                continue;
            }
            self.set(now, id, Msg::Discarded);
            self.refuse(now, id, REFUSE_CLOSED, via_stream);
            if via_stream {
                self.stream_answers.push_back((id, Some(STREAM_REFUSED)));
            }
        }
        self.flush_notices(now);
    }

    /// Message `id`, handed over and not taken, is given back ([`Msg::Released`]): never
    /// answered here.
    fn release_handed(&mut self, now: Instant, id: u64, via_stream: bool) {
        self.stats.unknown_ids += 1;
        self.set(now, id, Msg::Released);
        if via_stream {
            self.stream_answers.push_back((id, None));
        }
    }

    /// [`Receiver::application_gone`] in [`Claims::Owner`] mode. A message settled and handed
    /// over but not taken stays settled (the window two-phase claims leave: another replica
    /// may have acked a copy of it as settled already), so it counts as delivered here too:
    /// its key as taken, its id as in the window. Claims in flight end unanswered (their
    /// owner releases what they reserved or settled). Messages whose claim was not asked yet,
    /// and new ones, get no answer: another replica may deliver them.
    fn owner_gone(&mut self, now: Instant) {
        let handed: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| {
                matches!(
                    m,
                    Msg::Handed {
                        received: false,
                        ..
                    }
                )
            })
            .map(|(&id, _)| id)
            .collect();
        for id in handed {
            if let Some(Msg::Handed { key: Some(key), .. }) = self.unset(id) {
                let (scope, holder) = (self.scope, self.holder(id));
                self.keys.with(|r| r.taken(now, scope, &key, holder));
            }
            self.stats.discarded += 1;
        }
        self.drop_unasked();
        self.flush_notices(now);
    }

    /// Messages whose claim was not asked yet when the application went away (claims modes):
    /// dropped unanswered.
    fn drop_unasked(&mut self) {
        for request in std::mem::take(&mut self.claims_out) {
            if let Some(Msg::Claiming {
                payload,
                via_stream,
                ..
            }) = self.unset(request.id)
            {
                self.queued_bytes -= payload.as_ref().map_or(0, cost);
                self.dedupe.unpin(request.id);
                // Another replica sharing the store may deliver it (a hedge copy, a failover)
                // before a refusal from here would reach its sender: no answer, the sender
                // learns an unknown outcome.
                self.stats.unknown_ids += 1;
                if via_stream {
                    self.stream_answers.push_back((request.id, None));
                }
            }
        }
    }

    /// The answer to a stream message whose answer waited (its claim, or its take): (message
    /// id, status byte; `None`: end the stream without one, the outcome unknown).
    #[must_use]
    pub fn poll_stream_answer(&mut self) -> Option<(u64, Option<u8>)> {
        self.stream_answers.pop_front()
    }

    /// The reassembler's counters (of the current connection).
    pub fn reassembly(&self) -> crate::fec::ReassemblerStats {
        self.reassembler.stats()
    }

    /// Whether the application is behind: `max_queued_bytes` of delivered messages wait to
    /// be taken. New messages are refused (unacked) until it catches up.
    pub fn backlogged(&self) -> bool {
        (!self.deliveries.is_empty() || self.claiming > 0)
            && self.queued_bytes >= self.config.max_queued_bytes
    }

    /// Payload bytes delivered (or claimed) and not yet handed out, against
    /// `max_queued_bytes`.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// Delivered messages waiting for [`Receiver::poll_delivery`] (cheaper than
    /// [`Receiver::stats`], for per-datagram use).
    pub fn deliveries_queued(&self) -> usize {
        self.deliveries.len()
    }

    /// Whether message `id` is new here: no state, and the dedupe window would take it.
    pub fn is_new(&mut self, now: Instant, id: u64) -> bool {
        !self.messages.contains_key(&id) && self.dedupe.peek(now, id) == Seen::New
    }

    /// Whether delivered messages wait for [`Receiver::taken`] (with `ack_on_take`).
    pub fn awaiting_take(&self) -> bool {
        !self.gone && self.handed > 0
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
                // Only ids this receiver would judge: not one delivered, passed, below its
                // base (it may have been delivered), or with a state.
                let fresh = !self.messages.contains_key(&id)
                    && matches!(self.dedupe.peek(now, id), Seen::New | Seen::OutOfWindow);
                if fresh {
                    self.refuse(now, id, REFUSE_BLOCK, false);
                }
            }
            self.flush_notices(now);
            return;
        }
        // A shard of a block the reassembler no longer holds or remembers, whose every
        // message was delivered and acked (the dedupe window holds it; none has a state
        // here): stale like a remembered finished block's, instead of opening an incomplete
        // block that could evict one still being rebuilt. Validated first: the ids come from
        // the header (at most 64).
        let block = frame.header.block;
        let finished = self.reassembler.is_finished(block);
        let forgotten_delivered = !finished
            && !self.reassembler.holds(block)
            && frame.validate(limits).is_ok()
            && frame
                .header
                .messages()
                .all(|id| self.dedupe.contains(id) && !self.messages.contains_key(&id));
        // While backlogged, a small block of one message still passes: it may be a reply
        // (protocol 2), which the channel takes whatever the application does; any other
        // message it rebuilds is dropped unjudged (`only_replies`).
        let small_single = frame.header.lengths.len() == 1
            && frame.header.total_len() <= SMALL_BLOCK
            && self.protocol >= 2;
        let only_replies = self.backlogged() && !forgotten_delivered && !finished;
        if only_replies && !small_single {
            // It arrived (the sender's loss estimate must not count it lost), but holding it
            // would buffer without bound behind a slow application. Shards of finished blocks
            // still pass: they only repeat acks.
            self.stats.shards_received += 1;
            self.stats.shards_refused_backlog += 1;
            return;
        }
        self.only_replies = only_replies;
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
            let accepted = self.judge(now, d.message_id, d.payload, &mut fresh, &mut triggers);
            if accepted == Accepted::Held {
                // Not judged for good: a later copy (a hedge) is rebuilt and judged again.
                self.reassembler.undeliver(d.block, d.message_id);
            }
        }
        self.only_replies = false;
        if let InsertOutcome::Stale { messages } = outcome {
            // A shard of a finished block: its answer was probably lost.
            for id in messages {
                if self.answer_copy(now, id, false, false) == Some(Accepted::Duplicate) {
                    triggers.push(id);
                }
            }
        }
        self.answer(now, fresh, &triggers);
    }

    /// Acks what a datagram brought: at once when something was delivered (`fresh`), else
    /// a repeat for copies at most every `reack_interval`; then pending notices.
    fn answer(&mut self, now: Instant, fresh: bool, triggers: &[u64]) {
        let reack_due = self
            .last_ack
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.reack_interval);
        if fresh || (!triggers.is_empty() && reack_due) {
            self.ack(now, !fresh, triggers);
        }
        self.flush_notices(now);
    }

    /// Judges one message that came off the datagram path (rebuilt from a block, received
    /// whole, or rebuilt by the window) and notes what its answer needs.
    fn judge(
        &mut self,
        now: Instant,
        id: u64,
        body: Bytes,
        fresh: &mut bool,
        triggers: &mut Vec<u64>,
    ) -> Accepted {
        let accepted = self.accept(now, id, body, false);
        match accepted {
            Accepted::Delivered => {
                if !self.config.ack_on_take {
                    *fresh = true;
                    triggers.push(id);
                }
            }
            Accepted::KeyDuplicate | Accepted::Reply => {
                *fresh = true;
                triggers.push(id);
            }
            Accepted::Duplicate => triggers.push(id),
            Accepted::Held
            | Accepted::Replayed
            | Accepted::HandedCopy
            | Accepted::Refused
            | Accepted::Pending => {}
        }
        accepted
    }

    /// Takes one whole message (protocol 2, [`MessageFrame`]): judged like a rebuilt one,
    /// and kept as a source of the window code, with whatever it lets the window rebuild.
    pub fn handle_message(&mut self, now: Instant, frame: MessageFrame) {
        // Distinct frames only, as for shards: a duplicated datagram must not hide a lost
        // one from the sender's loss estimate.
        if !self.window.knows(frame.seq) {
            self.stats.shards_received += 1;
            // Window sources are numbered from 0 per connection, one each: the gaps below
            // the newest are the peer's datagrams lost on the way (or still on it).
            self.sources.0 += 1;
            self.sources.1 = self.sources.1.max(frame.seq + 1);
        }
        if self.backlogged() {
            // As for shards: it arrived, but holding it would buffer without bound behind
            // a slow application. Left out of the window too (nothing it would rebuild could
            // be delivered now), so a repair may rebuild it once the application has caught
            // up. A copy of a message delivered before is still answered.
            self.stats.shards_refused_backlog += 1;
            // A reply is the channel's: taken whatever the application does.
            if self.dedupe.contains(frame.id) || Envelope::is_reply(&frame.body) {
                let mut fresh = false;
                let mut triggers: Vec<u64> = Vec::new();
                self.only_replies = true;
                self.judge(now, frame.id, frame.body, &mut fresh, &mut triggers);
                self.only_replies = false;
                self.answer(now, fresh, &triggers);
            }
            return;
        }
        match crate::fec::window::source_symbol(frame.id, &frame.body) {
            Some(symbol) => self.window.on_source(frame.seq, Bytes::from(symbol)),
            None => self.stats.window_dropped += 1,
        }
        let mut fresh = false;
        let mut triggers: Vec<u64> = Vec::new();
        self.judge(now, frame.id, frame.body, &mut fresh, &mut triggers);
        self.judge_recovered(now, &mut fresh, &mut triggers);
        self.answer(now, fresh, &triggers);
    }

    /// Takes one repair (protocol 2, [`RepairFrame`]); the messages it rebuilds are judged.
    pub fn handle_repair(&mut self, now: Instant, frame: &RepairFrame) {
        if !self.window.repair_seen(frame.repair) {
            self.stats.shards_received += 1;
        }
        if self.backlogged() {
            self.stats.shards_refused_backlog += 1;
            return;
        }
        self.window.on_repair(frame);
        let mut fresh = false;
        let mut triggers: Vec<u64> = Vec::new();
        self.judge_recovered(now, &mut fresh, &mut triggers);
        if triggers.is_empty() {
            // A repair over messages delivered before: their ack may have been lost (at a
            // low message rate no later message's ack covers them soon), so it is repeated,
            // at most every `reack_interval`, as for a shard of a finished block.
            triggers = self
                .window
                .known_ids(frame.first, frame.count)
                .into_iter()
                .filter(|&id| self.dedupe.contains(id) && !self.messages.contains_key(&id))
                .collect();
        }
        self.answer(now, fresh, &triggers);
    }

    fn judge_recovered(&mut self, now: Instant, fresh: &mut bool, triggers: &mut Vec<u64>) {
        while let Some((_, id, body)) = self.window.poll_recovered() {
            self.stats.window_recovered += 1;
            self.judge(now, id, body, fresh, triggers);
        }
    }

    /// The window decoder's counters.
    pub fn window_stats(&self) -> crate::fec::window::WindowStats {
        self.window.stats()
    }

    /// Answers a copy of message `id` that needs no rebuilding (its block finished before),
    /// or judges a rebuilt copy before its envelope is opened: `None` when the id is new and
    /// must be judged further, else what became of the copy.
    /// A passed id is answered here only without a body (`body` false: a shard of a finished
    /// block): silently, since its key cannot be looked at; with a body the caller looks at
    /// the key first (see `accept`).
    fn answer_copy(
        &mut self,
        now: Instant,
        id: u64,
        via_stream: bool,
        body: bool,
    ) -> Option<Accepted> {
        self.expire(now);
        let answer = match self.messages.get_mut(&id) {
            Some(Msg::Refused { reason }) => {
                // Refused before: the sender was told it is not delivered; it never will be.
                let reason = *reason;
                self.refuse(now, id, reason, via_stream);
                Accepted::Refused
            }
            Some(Msg::Discarded) => {
                self.refuse(now, id, REFUSE_CLOSED, via_stream);
                Accepted::Refused
            }
            Some(Msg::Released) => {
                self.stats.unknown_ids += 1;
                Accepted::Held
            }
            Some(Msg::Claiming { via_stream: v, .. }) => {
                // Its claim is being made: this copy waits for the same answer (a stream
                // re-send takes the answer over), whether or not the application is there.
                *v |= via_stream;
                Accepted::Pending
            }
            Some(Msg::Handed { via_stream: v, .. }) => {
                // Delivered, not yet taken: this copy is answered with the first, on its take.
                *v |= via_stream;
                Accepted::HandedCopy
            }
            Some(Msg::Replayed) => {
                if !via_stream {
                    self.notice(Notice::Replayed, id);
                }
                Accepted::Replayed
            }
            None => match self.dedupe.peek(now, id) {
                Seen::New | Seen::OutOfWindow => return None,
                Seen::Duplicate => {
                    self.stats.duplicates_suppressed += 1;
                    Accepted::Duplicate
                }
                Seen::Passed if body => return None,
                Seen::Passed => {
                    self.stats.unknown_ids += 1;
                    Accepted::Held
                }
                Seen::Unknown => {
                    self.stats.unknown_ids += 1;
                    Accepted::Held
                }
            },
        };
        Some(answer)
    }

    /// Takes a whole message body (an envelope) that arrived outside the datagram path (a
    /// stream message). It is delivered if new, and acked unless it is refused (out of the
    /// window, malformed, ...); in claims mode a new message waits for its claim first.
    /// With `ack_on_take`, a new message is acked once taken; the stream's answer comes from
    /// [`Receiver::poll_stream_answer`] then ([`Whole::Pending`]).
    pub fn handle_whole(&mut self, now: Instant, id: u64, body: Bytes) -> Whole {
        let whole = match self.accept(now, id, body, true) {
            Accepted::Delivered if self.config.ack_on_take => Whole::Pending,
            Accepted::Delivered | Accepted::KeyDuplicate | Accepted::Reply => {
                self.ack(now, false, &[id]);
                Whole::New
            }
            Accepted::Replayed => Whole::Replayed,
            Accepted::HandedCopy | Accepted::Pending => Whole::Pending,
            Accepted::Duplicate => {
                self.ack(now, true, &[id]);
                Whole::Duplicate
            }
            Accepted::Refused => Whole::Refused,
            // Its key's message awaits the application (it may yet be taken, or dropped), or
            // the id is below what the window remembers: no answer is true now.
            Accepted::Held => Whole::Unanswered,
        };
        self.flush_notices(now);
        whole
    }

    /// Opens a rebuilt message body and delivers it unless its id, or its idempotency key,
    /// was delivered before. A body that is not a valid envelope is refused (counted): only
    /// a broken or hostile sender produces one, and acking it would claim a delivery.
    fn accept(&mut self, now: Instant, id: u64, body: Bytes, via_stream: bool) -> Accepted {
        if let Some(answer) = self.answer_copy(now, id, via_stream, true) {
            return answer;
        }
        let envelope = match Envelope::decode(body) {
            Ok(envelope) => envelope,
            Err(_) if self.gone => {
                self.refuse(now, id, REFUSE_CLOSED, via_stream);
                return Accepted::Refused;
            }
            Err(_) => {
                self.stats.invalid_envelopes += 1;
                self.refuse(now, id, REFUSE_MALFORMED, via_stream);
                return Accepted::Refused;
            }
        };
        if envelope.kind != Kind::Message && self.protocol < 2 {
            // Requests and replies are protocol 2's: a version-1 receiver refuses them.
            self.stats.invalid_envelopes += 1;
            self.refuse(now, id, REFUSE_MALFORMED, via_stream);
            return Accepted::Refused;
        }
        if let Kind::Reply { to } = envelope.kind {
            return self.accept_reply(now, id, to, envelope.payload, via_stream);
        }
        if self.only_replies {
            // Rebuilt while the application is behind: not judged now (a later copy is).
            return Accepted::Held;
        }
        let request = envelope.kind == Kind::Request;
        // Only a key needs the digest (SHA-256 over the payload: not paid for keyless ones).
        let digest = match (&envelope.key, request) {
            (None, _) => [0; 32],
            (Some(_), false) => payload_digest(&envelope.payload),
            (Some(_), true) => request_digest(&envelope.payload),
        };
        // A request's key names where its reply is kept.
        let request_key = envelope.key.as_ref().filter(|_| request).cloned();
        let passed = self.dedupe.peek(now, id) == Seen::Passed;
        if self.gone || passed {
            // "Not delivered" must be true of the payment, not only of this copy: a key the
            // record knows (delivered or held elsewhere) is answered for what it is.
            if let Some(key) = &envelope.key {
                let scope = self.scope;
                match self.keys.with(|r| r.peek(now, scope, key, digest)) {
                    Some(KeyVerdict::Replay { by }) => {
                        return self.key_replay(now, id, by, via_stream, request_key.as_ref())
                    }
                    Some(KeyVerdict::Held(_)) => return Accepted::Held,
                    Some(KeyVerdict::Conflict) => {
                        self.refuse(now, id, REFUSE_KEY_REUSED, via_stream);
                        return Accepted::Refused;
                    }
                    // The key is neither delivered nor held here now, but "not delivered" must
                    // stay true of the payment until the refusal reaches its sender, and a
                    // copy under the same key can be delivered meanwhile by another channel
                    // (another client in the anonymous namespace, a restarted client's new
                    // channel) or, with a claims store, another replica that this receiver
                    // cannot ask. So no answer is true but "unknown" (dropped, counted): the
                    // sender retries under its key. (Found by the `channel` fuzz target: a
                    // refusal for an application gone, raced by the same key delivered on
                    // another channel 10 ms later.)
                    None => {
                        self.stats.unknown_ids += 1;
                        return Accepted::Held;
                    }
                    Some(KeyVerdict::New | KeyVerdict::Full) => {}
                }
            }
            if self.config.claims != Claims::Off {
                // Another replica sharing the store may deliver it (a hedge copy, a
                // failover) before a refusal from here would reach its sender.
                self.stats.unknown_ids += 1;
                return Accepted::Held;
            }
            let reason = if passed { REFUSE_PASSED } else { REFUSE_CLOSED };
            self.refuse(now, id, reason, via_stream);
            return Accepted::Refused;
        }
        if self.dedupe.peek(now, id) == Seen::OutOfWindow {
            self.stats.out_of_window += 1;
            self.refuse(now, id, REFUSE_OUT_OF_WINDOW, via_stream);
            return Accepted::Refused;
        }
        if self.config.claims != Claims::Off {
            return self.accept_claimed(now, id, envelope, digest, via_stream);
        }
        if let Some(key) = &envelope.key {
            let (scope, holder) = (self.scope, self.holder(id));
            match self
                .keys
                .with(|r| r.judge_kind(now, scope, key, digest, holder, request))
            {
                KeyVerdict::New => {}
                KeyVerdict::Held(_) => return Accepted::Held,
                KeyVerdict::Replay { by } => {
                    return self.key_replay(now, id, by, via_stream, request_key.as_ref())
                }
                KeyVerdict::Conflict => {
                    self.refuse(now, id, REFUSE_KEY_REUSED, via_stream);
                    return Accepted::Refused;
                }
                KeyVerdict::Full => {
                    self.stats.keys_refused += 1;
                    self.refuse(now, id, REFUSE_KEYS_FULL, via_stream);
                    return Accepted::Refused;
                }
            }
            if !self.config.ack_on_take {
                self.keys.with(|r| r.taken(now, scope, key, holder));
            }
        }
        self.dedupe.check(now, id);
        self.deliver(
            now,
            id,
            envelope.key,
            envelope.kind,
            envelope.payload,
            via_stream,
        );
        Accepted::Delivered
    }

    /// A reply (protocol 2) to this end's request `to`: the channel's, not the application's,
    /// so it is taken at once (acked), whether or not the application is there, and outside
    /// claims (no other replica has the request it answers).
    fn accept_reply(
        &mut self,
        now: Instant,
        id: u64,
        to: u64,
        payload: Bytes,
        via_stream: bool,
    ) -> Accepted {
        match self.dedupe.peek(now, id) {
            Seen::OutOfWindow => {
                self.stats.out_of_window += 1;
                self.refuse(now, id, REFUSE_OUT_OF_WINDOW, via_stream);
                return Accepted::Refused;
            }
            Seen::Passed => {
                // Its sender gave up on it (its FLOOR passed it): refused, as any passed id.
                self.refuse(now, id, REFUSE_PASSED, via_stream);
                return Accepted::Refused;
            }
            _ => {}
        }
        if self.replies_in.len() >= MAX_REPLIES_QUEUED {
            // Not taken, not acked: its sender sends it again.
            self.stats.unknown_ids += 1;
            return Accepted::Held;
        }
        self.dedupe.check(now, id);
        self.stats.replies_received += 1;
        self.replies_in.push_back(ReplyIn { id, to, payload });
        Accepted::Reply
    }

    /// A new id whose key was delivered before (by receiver `by`) with the same payload: the
    /// effect happened, so the id is recorded and acked (as a replay), and nothing delivered.
    /// A retried request (`request_key`) is answered with the reply its key keeps; when the
    /// record has none (a claims store said it was delivered, the reply is not known here)
    /// it is left unanswered: its sender learns an unknown outcome.
    fn key_replay(
        &mut self,
        now: Instant,
        id: u64,
        by: u64,
        via_stream: bool,
        request_key: Option<&Bytes>,
    ) -> Accepted {
        if let Some(key) = request_key {
            let scope = self.scope;
            match self.keys.with(|r| r.reply(scope, key)) {
                Some(reply) => {
                    self.stats.replies_replayed += 1;
                    self.replies_out.push_back((id, reply));
                }
                None => {
                    self.stats.unknown_ids += 1;
                    return Accepted::Held;
                }
            }
        }
        self.dedupe.check(now, id);
        if by == self.token {
            self.stats.duplicate_keys += 1;
        } else {
            self.stats.duplicate_keys_elsewhere += 1;
        }
        if self.replayed(now, id, via_stream) == STREAM_REPLAYED {
            Accepted::Replayed
        } else {
            Accepted::KeyDuplicate
        }
    }

    /// Claims mode: a new id waits for its claim; the key record only answers for what this
    /// receiver itself saw claimed.
    fn accept_claimed(
        &mut self,
        now: Instant,
        id: u64,
        envelope: Envelope,
        digest: Digest,
        via_stream: bool,
    ) -> Accepted {
        if let Some(key) = &envelope.key {
            let scope = self.scope;
            let request_key = envelope
                .key
                .as_ref()
                .filter(|_| envelope.kind == Kind::Request);
            // A request's reply may be in the store only (delivered by another replica):
            // without it here the store is asked.
            let replay_here =
                request_key.is_none() || self.keys.with(|r| r.reply(scope, key).is_some());
            match self.keys.with(|r| r.peek(now, scope, key, digest)) {
                Some(KeyVerdict::Held(_)) => return Accepted::Held,
                Some(KeyVerdict::Replay { by }) if replay_here => {
                    return self.key_replay(now, id, by, via_stream, request_key)
                }
                Some(KeyVerdict::Conflict) => {
                    self.refuse(now, id, REFUSE_KEY_REUSED, via_stream);
                    return Accepted::Refused;
                }
                _ => {}
            }
        }
        if self.claiming >= self.config.max_pending_claims {
            self.stats.claims_refused += 1;
            return Accepted::Refused;
        }
        self.stats.claims_requested += 1;
        // Both modes ask first: the owner reserves it (and, in owner mode, settles it before
        // the hand-over); in application mode it is then handed over with its lease
        // (`Receiver::reserved`) and the application's transaction settles it.
        self.queued_bytes += cost(&envelope.payload);
        self.claims_out.push_back(ClaimRequest {
            id,
            key: envelope.key.clone(),
            digest,
            generation: self.generation,
            request: envelope.kind == Kind::Request,
        });
        let payload = Some(envelope.payload);
        // The floor must not pass it while its claim is out (the claim may answer late).
        self.dedupe.pin(id);
        self.set(
            now,
            id,
            Msg::Claiming {
                key: envelope.key,
                digest,
                payload,
                via_stream,
                kind: envelope.kind,
            },
        );
        Accepted::Pending
    }

    /// Refuses message `id` (definitely not delivered, and never will be): remembered, so a
    /// later copy is refused again, and queued for a REFUSE frame (unless it came on a
    /// stream, which answers for itself). A refusal that cannot be remembered is a counted
    /// drop, except for reasons that hold for every copy anyway (malformed, closed, passed).
    fn refuse(&mut self, now: Instant, id: u64, reason: u64, via_stream: bool) {
        self.stats.refused.count(reason);
        self.expire(now);
        // A malformed envelope is malformed in every copy, a gone application stays gone and
        // a passed id stays passed: only the other reasons could change, and must be
        // remembered.
        let lasting = matches!(reason, REFUSE_MALFORMED | REFUSE_CLOSED | REFUSE_PASSED);
        if !lasting && !self.messages.contains_key(&id) {
            if self.remembered >= self.config.max_refused_ids.max(1) {
                self.stats.refused.unsent += 1;
                return;
            }
            self.set(now, id, Msg::Refused { reason });
        }
        if !via_stream {
            self.notice(Notice::Refuse(reason), id);
        }
    }

    fn notice(&mut self, notice: Notice, id: u64) {
        let queued: usize = self.notices_out.values().map(BTreeSet::len).sum();
        if queued < MAX_NOTICE_QUEUE {
            self.notices_out.entry(notice).or_default().insert(id);
        }
    }

    /// Sends the queued refusals and replays, at most once per `reack_interval`.
    fn flush_notices(&mut self, now: Instant) {
        if self.notices_out.is_empty()
            || self
                .last_notice
                .is_some_and(|t| now.saturating_duration_since(t) < self.config.reack_interval)
        {
            return;
        }
        let max = self.max_ranges();
        for (notice, ids) in std::mem::take(&mut self.notices_out) {
            let mut ranges: Vec<RangeInclusive<u64>> = Vec::new();
            for id in ids {
                match ranges.last_mut() {
                    Some(r) if *r.end() + 1 == id => *r = *r.start()..=id,
                    _ => ranges.push(id..=id),
                }
            }
            for chunk in ranges.chunks(max) {
                let ranges = chunk.to_vec();
                let frame = match notice {
                    Notice::Refuse(reason) => {
                        self.stats.refuse_frames += 1;
                        Frame::Refuse(RefuseFrame { reason, ranges })
                    }
                    Notice::Replayed => Frame::Replayed(ReplayedFrame { ranges }),
                };
                self.out.push_back(frame.to_bytes());
            }
        }
        self.last_notice = Some(now);
    }

    fn max_ranges(&self) -> usize {
        self.config.max_ack_ranges.clamp(
            1,
            usize::from(self.config.reassembler.limits.max_ack_ranges.max(1)),
        )
    }

    /// When [`Receiver::handle_timeout`] should next be called: notices wait out
    /// `reack_interval`.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        // Notices are queued only while one was sent within `reack_interval`.
        if self.notices_out.is_empty() {
            return None;
        }
        self.last_notice.map(|t| t + self.config.reack_interval)
    }

    /// Fires what is due at `now` (queued notices).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.flush_notices(now);
    }

    fn ack(&mut self, now: Instant, repeat: bool, triggers: &[u64]) {
        // Ids with a state here are never named: see `Msg`.
        let ranges = self
            .dedupe
            .ack_ranges(self.max_ranges(), triggers, &self.messages);
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
        let (d, generation) = self.deliveries.pop_front()?;
        self.queued_bytes -= cost(&d.payload);
        let awaits_take = if generation == self.generation {
            matches!(self.messages.get(&d.id), Some(Msg::Handed { .. }))
        } else {
            matches!(self.old.get(&(generation, d.id)), Some(Old::Handed { .. }))
        };
        if awaits_take && !self.gone {
            self.handed_out.push_back((d.id, generation));
        }
        Some(d)
    }

    /// The next datagram (an ack, a refusal or a replay notice) to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }
}
