//! The channel's whole policy as a sans-I/O state machine: a [`Link`].
//!
//! A [`Peer`] decides about shards and acks on one connection; a `Link` owns the peer and
//! decides everything around it that a [`Channel`](crate::channel::Channel) used to decide
//! in its async driver: which connection is in use, when to reconnect, back off or give up,
//! when to fail over to another replica or to the warm standby, when to switch to a better
//! replica, how each send's outcome is reported (datagram path and stream path), how claims
//! are retried, when delivered messages are handed to the application, and how the channel
//! shuts down.
//!
//! It is driven like quinn-proto's `Connection`: feed it `(now, input)` with
//! [`Link::handle`], then drain [`Link::poll_action`] and sleep until [`Link::poll_timeout`]
//! (then feed [`Input::Timer`]). It never reads a clock, opens a socket or spawns a task:
//! connections, dials, streams, claims and sends are opaque ids chosen by the caller, so
//! every decision can be tested deterministically with virtual `Instant`s.
//!
//! # The driver's part
//!
//! The async shell (`channel/driver.rs`) turns quinn and tokio events into [`Input`]s and
//! performs each [`Action`]: it sends datagrams, dials, closes connections, runs streams and
//! store calls, and moves messages to and from the application. It decides nothing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Answer, ClaimOutcome, ClaimRequest, Claims, Delivered, Digest, FailReason, Lease, Peer,
    ReceiverConfig, Scope, SenderConfig, SenderEvent, StreamStatus, ANONYMOUS,
};
use crate::wire::{
    encode_stream_head, Envelope, Frame, Kind, Limits, MAX_KEY_LEN, REFUSE_KEY_REUSED,
    STREAM_DELIVERED, STREAM_REPLAYED,
};

mod claims;
mod connections;
mod handoff;
mod requests;
mod sends;
#[cfg(test)]
mod shared_tests;
mod streams;
#[cfg(test)]
mod tests;

/// A connection, as the driver names it. Ids are never reused within one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// How a client channel reconnects after its connection is lost. Every field states its
/// default; new fields may be added (`#[non_exhaustive]`): change a `Reconnect::default()`.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconnect {
    /// Wait before the second attempt (the first is immediate). Default 20 ms.
    pub first_backoff: Duration,
    /// Longest wait between attempts (the wait doubles). Default 1 s.
    pub max_backoff: Duration,
    /// Give up this long after the loss; every message in flight then fails with
    /// [`SendError::ConnectionLost`]. Default 10 s.
    pub give_up_after: Duration,
    /// Longest one connection attempt (handshake and Hello) may take before the next one
    /// starts (on the next replica, for a channel with several). Default 2 s.
    pub attempt_timeout: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect {
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(1),
            give_up_after: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(2),
        }
    }
}

/// What a server said, answering a Hello, about the channel's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// It holds no state for the channel: unacked messages must not be re-sent.
    New,
    /// It still holds the channel: unacked messages are re-sent with their ids.
    Resumed,
    /// It did not hold the channel but claims every delivery in a shared store: unacked
    /// messages are re-sent with their ids; its own ids start over.
    Claims,
}

/// Which end of a channel a link is, and where its next connection comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// A channel over one connection the application gave it: it ends with that connection.
    Plain,
    /// A client over `replicas` servers (at least one), connected first to `current`: it
    /// redials, fails over and keeps a warm standby.
    Client {
        /// How many replicas (addresses) the driver can dial, by index.
        replicas: usize,
        /// The replica of the first connection.
        current: usize,
        /// What the first connection's server answered.
        attached: Attached,
    },
    /// A server: when the connection is lost it waits [`LinkConfig::channel_ttl`] for the
    /// client to come back ([`Input::Reattached`]).
    Server,
}

/// Settings of a [`Link`] (the channel's [`Config`](crate::channel::Config) without the
/// driver's parts).
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The sending half.
    pub sender: SenderConfig,
    /// The receiving half (its `claims` says who claims deliveries).
    pub receiver: ReceiverConfig,
    /// Messages above this many bytes (envelope included) travel on a stream.
    pub stream_threshold: usize,
    /// Whether the stream path is used.
    pub streams: bool,
    /// How a client reconnects.
    pub reconnect: Reconnect,
    /// How long a server keeps a channel whose connection was lost.
    pub channel_ttl: Duration,
    /// Silence (while messages await outcomes) after which a client of several replicas
    /// fails over.
    pub failover_after: Duration,
    /// Whether a client of several replicas keeps a warm standby.
    pub warm_standby: bool,
    /// The standby's score must stay below this share of the primary's to switch (`0`:
    /// never).
    pub switch_ratio: f64,
    /// How long a draining close waits for claims in flight before its goodbye (a stopped
    /// channel still waits for them at least a minute). While the channel runs a
    /// failed claim is retried for as long as it takes: the failed attempt may have been
    /// written (an error after COMMIT), so giving up could leave a message claimed that
    /// nobody delivers.
    pub claim_timeout: Duration,
    /// Longest one claim attempt may take; past it the attempt counts as failed (a hung
    /// store becomes an error, retried with the same claimant).
    pub claim_attempt_timeout: Duration,
    /// Delivered messages handed to the application and not yet taken ([`Input::Took`]).
    pub handoff: usize,
    /// Idempotency keys shared with the other channels of the same server (without a claims
    /// store): a key delivered on any of them is not delivered again on this one, and a key
    /// whose message waits for the application on one of them is not acked on another.
    pub shared_keys: Option<SharedKeys>,
    /// Whose idempotency keys this channel's peer sends: the SHA-256 of the client's
    /// certificate under mutual TLS, else [`ANONYMOUS`] (every client without an identity
    /// shares one namespace). Default [`ANONYMOUS`].
    pub key_scope: Scope,
    /// The protocol version the connection negotiated (ALPN `surelink/1` or `surelink/2`):
    /// with 1, replays are acked like deliveries. Default 2.
    pub protocol: u8,
    /// Random bits that make this link's claimant tokens ([`Action::Claim`]) its own.
    pub claimant_seed: u64,
    /// Whether the channel has a claims store that takes reservations: always in
    /// [`Claims::Owner`] mode; in [`Claims::Application`] mode (the inbox pattern) the link
    /// then reserves each message before the application gets it, with its lease in
    /// [`Delivered::lease`]. Default `false`.
    pub reserve: bool,
    /// How long a reservation holds a message against other replicas: a replica that dies
    /// holding one is taken over this long after its last reservation. Default 2 s.
    pub lease: Duration,
    /// Most messages the application received and has not answered yet (requests, and
    /// every message with explicit acks): past it, the hand-off gives no more until
    /// answers come. Default 64.
    pub max_unanswered: usize,
}

pub use crate::proto::SharedKeys;

/// How long a reservation holds a message against other replicas by default
/// ([`LinkConfig::lease`]).
pub const DEFAULT_LEASE: Duration = Duration::from_secs(2);

/// The step of a claim a link asks the store for ([`Action::Claim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimStep {
    /// Reserve the message for `lease` (`DedupeStore::reserve`).
    Reserve {
        /// The lease.
        lease: Duration,
    },
    /// Settle the reservation of fencing epoch `epoch` (`DedupeStore::settle`).
    Settle {
        /// The epoch the reservation was given.
        epoch: u64,
    },
    /// Release the reservation (best effort; no answer is expected: `attempt` is 0).
    Release {
        /// The epoch the reservation was given.
        epoch: u64,
    },
    /// A request settled at `epoch` was answered: record its `reply` with the claim
    /// (`DedupeStore::record_reply`), before the reply goes out, so that a retry on any
    /// replica gets it.
    RecordReply {
        /// The epoch its settle was given.
        epoch: u64,
        /// The application's reply.
        reply: Bytes,
    },
    /// A request the store says was settled before: fetch the reply kept with it
    /// (`DedupeStore::reply`).
    FetchReply,
}

/// The store's answer to an [`Action::Claim`] ([`Input::ClaimAnswered`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreAnswer {
    /// Reserved for this claimant with fencing epoch `epoch`; `took_over` from an owner
    /// whose lease had ended.
    Reserved {
        /// The fencing epoch.
        epoch: u64,
        /// Whether another owner's reservation was taken over.
        took_over: bool,
    },
    /// Another claimant holds it for `retry_in` more.
    Busy {
        /// Until its lease ends.
        retry_in: Duration,
    },
    /// Settled: deliver it now; `late`: after its lease had ended.
    Settled {
        /// Whether the lease had ended first.
        late: bool,
    },
    /// The settle was rejected: the reservation is no longer this claimant's.
    Fenced,
    /// Settled before (here or elsewhere): ack it, deliver nothing.
    Before,
    /// Its key was claimed with another payload: refuse it.
    Conflict,
    /// [`ClaimStep::RecordReply`]: the reply was recorded (`false`: it could not be, the
    /// claim is no longer this claimant's, or the store keeps no replies).
    Recorded {
        /// Whether it was.
        recorded: bool,
    },
    /// [`ClaimStep::FetchReply`]: the reply kept with the claim (`None`: none yet, or the
    /// store keeps none).
    Reply(Option<Bytes>),
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            sender: SenderConfig::default(),
            receiver: ReceiverConfig::default(),
            stream_threshold: 8 * 1024,
            streams: true,
            reconnect: Reconnect::default(),
            channel_ttl: Duration::from_secs(60),
            failover_after: Duration::from_secs(1),
            warm_standby: true,
            switch_ratio: 0.5,
            claim_timeout: Duration::from_secs(5),
            claim_attempt_timeout: Duration::from_secs(1),
            handoff: 4,
            shared_keys: None,
            key_scope: ANONYMOUS,
            protocol: 2,
            claimant_seed: 0,
            reserve: false,
            lease: DEFAULT_LEASE,
            max_unanswered: 64,
        }
    }
}

/// What the application learns when a message was acknowledged: it was delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The message id on this channel.
    pub id: u64,
    /// From `send` to the ack.
    pub latency: Duration,
    /// Shards sent for the message's block (0 for a message sent on a stream).
    pub shards_sent: usize,
    /// Hedges and retransmissions sent for it.
    pub hedges: u32,
    /// The peer did not deliver this message again: its idempotency key was delivered before
    /// with the same payload (by this channel or another of the same server, or a replica
    /// sharing its store), so this receipt acknowledges that earlier delivery. Only a
    /// protocol-2 peer says so; with protocol 1 it is always `false`.
    pub replayed: bool,
}

/// Why a message has no receipt. Every variant says whether the message may have been
/// delivered; where it may, retry with the same idempotency key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// No ack before the deadline: the outcome is unknown.
    #[error("message {id}: no ack before the deadline; outcome unknown, retry with the same idempotency key")]
    Timeout {
        /// The message id.
        id: u64,
    },
    /// The connection was lost (and not regained) while the message was in flight: the
    /// outcome is unknown.
    #[error("connection lost while the message was in flight; outcome unknown, retry with the same idempotency key: {reason}")]
    ConnectionLost {
        /// What happened.
        reason: String,
    },
    /// The message was refused before anything was sent (it was not delivered).
    #[error("message refused, nothing sent: {0}")]
    Rejected(#[from] crate::proto::SendError),
    /// The message is larger than this channel carries; nothing was sent.
    #[error("message of {len} bytes, this channel carries at most {max}; nothing sent")]
    TooLarge {
        /// The message's length (payload and key).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The peer refused the message (outside its dedupe window, or malformed): it was not
    /// delivered.
    #[error("message {id}: refused by the peer (reason {reason}), not delivered")]
    Refused {
        /// The message id.
        id: u64,
        /// The wire's REFUSE reason (`wire::REFUSE_*`); 0 when none was given (a stream
        /// refused by its status byte or reset).
        reason: u64,
    },
    /// The idempotency key was delivered before with another payload (another amount,
    /// another terminal, a bug): this message was not delivered, and never will be under that
    /// key. Do not retry it with the same key: find out which payment the key was used for.
    #[error(
        "message {id}: its idempotency key was already used for another payload; not delivered"
    )]
    KeyReused {
        /// The message id.
        id: u64,
    },
    /// The peer does not accept QUIC DATAGRAM frames, or the path is too small for them.
    #[error("the connection does not carry QUIC datagrams")]
    DatagramsUnsupported,
    /// The channel is closing or has stopped; nothing was sent.
    #[error("channel closed; nothing sent")]
    Closed,
    /// The peer's application declined the message or request (a nack): it did not process
    /// it. A retry under its key is delivered afresh.
    #[error("message {id}: declined by the peer's application, not processed")]
    Declined {
        /// The message id.
        id: u64,
    },
    /// The peer's application took the request, but no reply came before the deadline: it
    /// was processed, and its reply is unknown. Retry with the same idempotency key to get
    /// the reply its key keeps.
    #[error("request {id}: processed by the peer, but no reply before the deadline; retry with the same idempotency key to get its reply")]
    NoReply {
        /// The request's message id.
        id: u64,
    },
    /// The channel speaks protocol 1 (a peer of an older version), which has no requests;
    /// nothing was sent.
    #[error("the peer speaks protocol 1, which has no requests; nothing sent")]
    RequestsUnsupported,
}

impl SendError {
    /// Whether the message may have been delivered: `true` for an unknown outcome
    /// ([`SendError::Timeout`], [`SendError::ConnectionLost`]; retry with the same idempotency
    /// key, and the peer delivers it at most once), `false` when it certainly was not (retrying
    /// is safe with or without the key).
    pub fn may_have_been_delivered(&self) -> bool {
        matches!(
            self,
            SendError::Timeout { .. }
                | SendError::ConnectionLost { .. }
                | SendError::NoReply { .. }
        )
    }
}

/// The reply to a request ([`Action::Replied`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The request's message id on this channel.
    pub id: u64,
    /// The peer application's reply.
    pub payload: Bytes,
    /// From the request to its reply.
    pub latency: Duration,
    /// Whether the peer said, before the reply came, that the request was a replay of an
    /// earlier one with its key (the reply is the one its key keeps).
    pub replayed: bool,
}

/// How a connection ended, as the driver classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// The path failed or the peer went away: another connection may work.
    Retryable,
    /// The peer refused us (TLS, protocol, a refusal code): another attempt would fail too.
    Fatal,
    /// This side closed it.
    LocallyClosed,
    /// The peer said goodbye ([`GOODBYE`]): it ended the channel on purpose.
    Goodbye,
}

/// Application close code of an orderly end: the closing side drained its channel and the
/// other side drops the channel's state at once (a server does not keep it for
/// `channel_ttl`).
pub const GOODBYE: u32 = 3;

/// How a stream send ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The peer answered with this status byte.
    Status(u8),
    /// Its deadline passed.
    Deadline,
    /// The peer reset or stopped the stream: it did not deliver the message.
    Refused,
    /// The connection broke.
    Connection(String),
}

/// A connection the driver dialled, handshake and Hello done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dialed {
    /// The driver's name for it.
    pub conn: ConnId,
    /// What the server answered to the Hello.
    pub attached: Attached,
    /// The connection's datagram size (`None`: it carries no datagrams).
    pub max_datagram_size: Option<usize>,
    /// The protocol version the connection negotiated (ALPN, 1 or 2): the channel speaks
    /// the lower of it and [`LinkConfig::protocol`] on it (a replica of another version
    /// during an upgrade).
    pub protocol: u8,
}

/// One path measurement of a connection (quinn's `rtt()` and path counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathSample {
    /// Smoothed round trip.
    pub rtt: Duration,
    /// Packets sent on the path so far.
    pub sent_packets: u64,
    /// Packets lost on the path so far.
    pub lost_packets: u64,
}

/// Something that happened, for [`Link::handle`].
#[derive(Clone, Debug)]
pub enum Input {
    /// A datagram arrived on connection `conn`.
    Datagram {
        /// The connection.
        conn: ConnId,
        /// Its bytes.
        data: Bytes,
    },
    /// Connection `conn` ended.
    ConnectionLost {
        /// The connection.
        conn: ConnId,
        /// How.
        how: Lost,
        /// What quinn said.
        reason: String,
    },
    /// A dial asked by [`Action::Dial`] finished.
    DialDone {
        /// The dial's id.
        dial: u64,
        /// The connection, or why not and whether another attempt could work
        /// (`refused`: it could not).
        result: Result<Dialed, DialFailure>,
    },
    /// (Server) the client came back on a new connection.
    Reattached {
        /// The new connection.
        conn: ConnId,
        /// Its datagram size.
        max_datagram_size: Option<usize>,
        /// The protocol version it negotiated (see [`Dialed::protocol`]).
        protocol: u8,
    },
    /// A stream send asked by [`Action::OpenStream`] ended.
    StreamDone {
        /// The message id.
        id: u64,
        /// The connection it ran on.
        conn: ConnId,
        /// How it ended.
        end: StreamEnd,
    },
    /// A whole message arrived on a stream; answer it with [`Action::AnswerStream`].
    StreamMessage {
        /// The driver's name for the answer.
        answer: u64,
        /// The message (head and envelope).
        message: Bytes,
    },
    /// An inbound stream was invalid (too long, too slow); it was reset.
    StreamInvalid {
        /// Why, for the counters.
        reason: &'static str,
    },
    /// A claim attempt asked by [`Action::Claim`] finished: the store's answer, or its
    /// error (including the attempt's timeout).
    ClaimAnswered {
        /// The attempt.
        attempt: u64,
        /// The answer.
        result: Result<StoreAnswer, String>,
    },
    /// The application took message `id` from its queue.
    Took {
        /// The message id.
        id: u64,
    },
    /// The application dropped its receiving handle: nobody takes messages any more.
    AppGone,
    /// The application sends a message; the outcome comes as [`Action::Complete`] with
    /// `token`, and the send's slot is freed with [`Action::FreeSlot`].
    Send {
        /// The driver's name for this send.
        token: u64,
        /// The idempotency key.
        key: Option<Bytes>,
        /// The message.
        payload: Bytes,
        /// Its own deadline, instead of the sender's (at most the sender's).
        deadline: Option<Duration>,
    },
    /// The application sends a request (protocol 2): the outcome comes as
    /// [`Action::Replied`] (its reply) or [`Action::Complete`] (an error) with `token`, and
    /// the slot is freed with [`Action::FreeSlot`].
    Request {
        /// The driver's name for this request.
        token: u64,
        /// The idempotency key.
        key: Option<Bytes>,
        /// The request.
        payload: Bytes,
        /// Its own deadline for the whole round trip, instead of the sender's (at most the
        /// sender's).
        deadline: Option<Duration>,
    },
    /// The application received message `id`, which awaits its answer
    /// ([`Input::Answered`]): it leaves the hand-off (at most
    /// [`LinkConfig::max_unanswered`] await their answers at once).
    Received {
        /// The message id.
        id: u64,
    },
    /// The application answered message `id` it was handed (see [`Answer`]).
    Answered {
        /// The message id.
        id: u64,
        /// The answer.
        answer: Answer,
    },
    /// Inbox pattern: the application's claim for message `id`.
    Confirm {
        /// The message id.
        id: u64,
        /// Its outcome.
        outcome: ClaimOutcome,
    },
    /// The application closes the channel: with `drain`, new sends fail with
    /// [`SendError::Closed`], sends in flight get their outcomes, then a goodbye closes the
    /// connection; without, it ends now.
    Close {
        /// Whether to drain first.
        drain: bool,
    },
    /// Every sending handle of the application was dropped.
    HandlesDropped,
    /// Path samples asked by [`Action::SamplePaths`].
    Samples(Vec<(ConnId, PathSample)>),
    /// Whether connection `conn` carries what is offered to it: `congested` when datagrams
    /// queue up before the wire (the transport's send buffer holds more than a few packets'
    /// worth). While the primary is congested the sender sheds redundancy: first flights
    /// carry data shards only and speculative hedges are skipped (data and
    /// retransmissions still go), so redundancy never adds to the congestion it would
    /// otherwise read as loss.
    Congestion {
        /// The connection.
        conn: ConnId,
        /// Whether it is congested now.
        congested: bool,
    },
    /// The transport's smoothed round trip on connection `conn` (quinn's, from its own
    /// acknowledgements of every packet): the sender's measure of queueing, which its own
    /// acks cannot give once every block is resent before its ack (a queue longer than
    /// the hedge delay). Reported every few milliseconds while the channel is busy.
    PathRtt {
        /// The connection.
        conn: ConnId,
        /// Its smoothed round trip.
        rtt: Duration,
    },
    /// Time passed: [`Link::poll_timeout`] is due.
    Timer,
}

/// Why a dial failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DialFailure {
    /// Whether the server refused us (TLS, protocol): another attempt would be refused too.
    pub refused: bool,
    /// What happened.
    pub reason: String,
}

/// Something the driver must do, from [`Link::poll_action`].
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send a datagram on `conn`.
    Transmit {
        /// The connection.
        conn: ConnId,
        /// The datagram.
        datagram: Bytes,
    },
    /// Dial replica `replica` (handshake and Hello with `floor`) within `timeout`; answer
    /// with [`Input::DialDone`].
    Dial {
        /// The dial's id.
        dial: u64,
        /// Which replica.
        replica: usize,
        /// The Hello's floor: every id below has its outcome.
        floor: u64,
        /// Longest the attempt may take.
        timeout: Duration,
    },
    /// Close connection `conn` with an application code and reason; forget it.
    Close {
        /// The connection.
        conn: ConnId,
        /// Application close code.
        code: u32,
        /// Why.
        reason: &'static str,
    },
    /// Send message `id` on a new bidirectional stream of `conn` and read its status byte
    /// until `deadline`; answer with [`Input::StreamDone`].
    OpenStream {
        /// The connection.
        conn: ConnId,
        /// The message id.
        id: u64,
        /// The stream head.
        head: Bytes,
        /// The envelope.
        body: Bytes,
        /// When to give up.
        deadline: Instant,
    },
    /// Answer an inbound stream message with a status byte (`None`: drop the answer, the
    /// stream's reader gives up; a newer copy took it over).
    AnswerStream {
        /// The answer's name from [`Input::StreamMessage`].
        answer: u64,
        /// The status byte.
        status: Option<u8>,
    },
    /// Reserve, settle or release message `id` in the store (`step`) within `timeout`;
    /// answer with [`Input::ClaimAnswered`] (a release, `attempt` 0, needs no answer).
    /// Every attempt for one message carries the same `claimant`, so a store that committed
    /// an earlier attempt whose answer was lost recognises the row as this claim's own.
    Claim {
        /// The attempt's id.
        attempt: u64,
        /// The message id.
        id: u64,
        /// Its idempotency key.
        key: Option<Bytes>,
        /// SHA-256 of its payload (a key claimed before with another digest is a
        /// conflict: [`ClaimOutcome::Conflict`]).
        digest: Digest,
        /// Who claims: the same for every attempt of this message on this link.
        claimant: u64,
        /// Longest the attempt may take.
        timeout: Duration,
        /// Which step of the two-phase claim.
        step: ClaimStep,
    },
    /// Hand a message to the application.
    Deliver(Delivered),
    /// A request has its reply.
    Replied {
        /// The request's token.
        token: u64,
        /// The reply.
        reply: Reply,
    },
    /// A send has its outcome.
    Complete {
        /// The send's token.
        token: u64,
        /// Its outcome.
        outcome: Result<Receipt, SendError>,
    },
    /// The send's in-flight slot is free (its message left the sender).
    FreeSlot {
        /// The send's token.
        token: u64,
    },
    /// Measure these connections' paths; answer with [`Input::Samples`].
    SamplePaths {
        /// The connections.
        conns: Vec<ConnId>,
    },
    /// The link has ended: nothing more will come. Every send has its outcome.
    Stop {
        /// Why.
        reason: String,
    },
}

/// Counters the link keeps itself (the peer's are in [`Link::peer`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkStats {
    /// Connections moved to after losing one.
    pub reconnects: u64,
    /// Of those, to another replica than the one lost.
    pub failovers: u64,
    /// Of the failovers, those to the warm standby.
    pub standby_failovers: u64,
    /// Moves to a much better standby.
    pub switches: u64,
    /// Smoothed score per replica (lower is better).
    pub replica_scores: Vec<Option<f64>>,
    /// Whether a warm standby is ready.
    pub standby_ready: bool,
    /// Messages sent on streams.
    pub stream_messages_sent: u64,
    /// Messages received on streams.
    pub stream_messages_received: u64,
    /// Sends awaiting their outcome (both paths).
    pub in_flight: usize,
    /// Sends whose in-flight slot is still held.
    pub slots_held: usize,
    /// Claim attempts that failed or timed out.
    pub claim_attempts_failed: u64,
    /// Reservations held now: reserved in the store, not yet settled (or settling).
    pub reservations_held: usize,
    /// Reservations answered busy: another replica held the message (asked again when its
    /// lease ends).
    pub claims_busy: u64,
    /// Reservations taken over from an owner whose lease had ended.
    pub takeovers: u64,
    /// Settles rejected because the reservation had been taken over (the message was not
    /// handed over here).
    pub fenced_settles: u64,
    /// Settles that came after their own lease had ended (nobody had taken it over).
    pub leases_expired: u64,
    /// Reservations given up and released (the application went away, the channel stopped).
    pub reservations_released: u64,
    /// Messages whose idempotency key another channel of the same server delivered: acked,
    /// not delivered again ([`LinkConfig::shared_keys`]).
    pub duplicate_keys_elsewhere: u64,
    /// New stream messages refused (not delivered) because the parked ones (waiting while the
    /// application is behind) already held `max_queued_bytes`.
    pub streams_refused_parked: u64,
    /// Replies sent for the peer's requests (the application's, and those a retried
    /// request's key kept).
    pub replies_sent: u64,
    /// Replies dropped before they were sent (more than 4,096 waited for room in the
    /// sender, or one could not be coded): their requests' senders learn `NoReply`.
    pub replies_dropped: u64,
    /// Replies that arrived for no request waiting (it timed out, or its reply came twice).
    pub replies_unmatched: u64,
    /// Requests processed by the peer (acked) whose reply did not come before the deadline.
    pub replies_missing: u64,
    /// Replies recorded in the claims store before they went out.
    pub replies_recorded: u64,
    /// Retried requests the store said were settled but kept no reply for (yet): left
    /// unanswered.
    pub replies_unknown: u64,
}

/// Why messages in flight failed when the server came back without the channel.
pub const PEER_LOST_STATE: &str =
    "the server came back without this channel's state (it restarted), so the message was not re-sent";

/// How often a warm standby that is not the most preferred replica tries to move to a more
/// preferred one (a replica that came back rejoins as the standby).
const STANDBY_UPGRADE: Duration = Duration::from_secs(5);
/// How often the primary and the standby are scored.
const RANK_EVERY: Duration = Duration::from_secs(1);
/// Consecutive samples in which the standby must score better before the channel moves.
const SWITCH_AFTER: u32 = 3;
/// The least score difference (about milliseconds of round trip) worth a move: on a LAN or
/// loopback, where round trips are fractions of a millisecond, ratios are noise.
const SWITCH_MIN_GAIN_MS: f64 = 10.0;
/// Packets a sample must cover before its loss counts.
const LOSS_SAMPLE_MIN: u64 = 50;

/// A score from a round trip and a loss rate: lower is better.
fn score(rtt_ms: f64, loss: Option<f64>) -> f64 {
    rtt_ms * (1.0 + 10.0 * loss.unwrap_or(0.0))
}

#[derive(Debug, Default)]
struct Ranking {
    scores: Vec<Option<f64>>,
    rtt: Vec<Option<f64>>,
    loss: Vec<Option<f64>>,
    primary_path: Option<(u64, u64)>,
    standby_path: Option<(u64, u64)>,
    better: u32,
    next: Option<Instant>,
}

#[derive(Debug)]
struct StreamSend {
    head: Bytes,
    body: Bytes,
    token: u64,
    started: Instant,
    deadline: Instant,
    /// The connection and generation its send runs on; `None` while it waits for one.
    running_on: Option<(ConnId, u64)>,
    /// Whether it carries an idempotency key.
    keyed: bool,
    /// Streams opened for it so far.
    attempts: u32,
}

#[derive(Debug)]
struct Waiting {
    token: u64,
    /// Completed already (its own deadline passed); the slot is freed when the sender
    /// lets go of the message.
    completed: bool,
    /// A request: its reply completes it.
    request: Option<Requested>,
}

/// A request awaiting its reply ([`Waiting::request`]).
#[derive(Debug)]
struct Requested {
    sent: Instant,
    /// Its message was acked (the peer's application answered it): the entry now waits for
    /// the reply alone, until its deadline; `replayed` as the ack said.
    acked: Option<bool>,
}

#[derive(Debug)]
struct Standby {
    conn: ConnId,
    attached: Attached,
    replica: usize,
    size: Option<usize>,
    protocol: u8,
}

#[derive(Debug)]
struct Redial {
    give_up: Instant,
    backoff: Duration,
    index: usize,
    last: String,
    dial: Option<u64>,
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct StandbyDial {
    candidates: Vec<usize>,
    pos: usize,
    /// Between rounds; `None`: one round only (an upgrade).
    pause: Option<Duration>,
    dial: Option<(u64, usize)>,
    retry_at: Option<Instant>,
}

#[derive(Debug)]
struct ClaimJob {
    request: ClaimRequest,
    claimant: u64,
    backoff: Duration,
    /// The attempt in flight.
    attempt: Option<u64>,
    retry_at: Option<Instant>,
    /// What the next attempt asks: a reservation, or (once reserved) its settle.
    step: ClaimStep,
    /// Whether its settle was asked (it may be retrying after an error).
    started: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Closing with a drain: new sends refused, in-flight ones finish; claims in flight
    /// are waited for until `claims_until` (traffic that keeps coming cannot hold the
    /// close back: claims left then finish after the goodbye).
    Draining {
        claims_until: Instant,
    },
    /// The connection is closed; queued deliveries and pending claims finish until `until`.
    Finishing {
        until: Instant,
    },
    Stopped,
}

/// The channel's policy; see the [module docs](self).
#[derive(Debug)]
pub struct Link {
    peer: Peer,
    config: LinkConfig,
    role: Role,
    phase: Phase,
    primary: Option<ConnId>,
    /// What the primary's server answered (hedges go to a standby only when both claim).
    primary_attached: Attached,
    /// The replica in use (client).
    current: usize,
    generation: u64,
    fresh_since: u64,
    standby: Option<Standby>,
    standby_dial: Option<StandbyDial>,
    redial: Option<Redial>,
    next_dial: u64,
    detached_until: Option<Instant>,
    waiting: HashMap<u64, Waiting>,
    /// `(deadline, id)` of sends in `waiting` with a per-send deadline (entries of sends
    /// gone are skipped when they come due): no scan of every send on each timer.
    send_deadlines: BTreeSet<(Instant, u64)>,
    streams: HashMap<u64, StreamSend>,
    /// Stream messages that arrived while the application was behind, with their answers'
    /// names: judged once it catches up. At most `max_queued_bytes` of them; dropped (no
    /// answer) when the connection they came on is replaced.
    parked: VecDeque<(u64, Bytes)>,
    /// Bytes in `parked`.
    parked_bytes: usize,
    /// Stream messages whose answer waits (their claim, or their take): answer names by id.
    stream_waiting: HashMap<u64, u64>,
    /// Ordered (by attempt), so that timers fire and jobs end in one order: the core is
    /// deterministic.
    claims: std::collections::BTreeMap<u64, ClaimJob>,
    next_claim: u64,
    room: usize,
    app_gone: bool,
    handles_dropped: bool,
    waiting_since: Option<Instant>,
    standby_upgrade_at: Option<Instant>,
    ranking: Ranking,
    switching: bool,
    stats: LinkStats,
    actions: VecDeque<Action>,
    /// Messages in flight that may have reached another replica than the one in use (sent
    /// before a failover to a replica sharing the claims store, or copied to the standby): a
    /// refusal by the replica in use does not say they were not delivered.
    crossed: std::collections::HashSet<u64>,
    /// Replies for the peer waiting for room in the sender: `(request id, reply)`.
    replies_waiting: VecDeque<(u64, Bytes)>,
    /// Messages settled in the store and handed over, not yet taken or answered, by id:
    /// their claim, claimant and epoch, with which a request's reply is recorded and a nack
    /// or a drop releases the claim.
    settled_handed: HashMap<u64, (ClaimRequest, u64, u64)>,
    /// Messages the application received and has not answered, by id (an id may name one
    /// message of each of the peer's incarnations).
    unanswered: HashMap<u64, usize>,
    /// Their number, and the hand-off room they owe (received past `max_unanswered`).
    unanswered_total: usize,
    room_owed: usize,
}

/// Least time a stopping channel waits for its claims in flight.
const STOPPING_CLAIMS_WAIT: Duration = Duration::from_secs(60);

/// Why a reset stream's outcome is unknown.
const RESET_UNKNOWN: &str =
    "the peer reset the stream before judging it, and the payment may have \
     been delivered before (an earlier copy of this message, or its idempotency key); retry with \
     the same key";

/// Why a refused message's outcome is unknown all the same.
const REFUSED_AFTER_FAILOVER: &str = "refused by the replica in use, but it was sent to another \
     replica before, which may have delivered it";

impl Link {
    /// A link over its first connection `conn` (datagram size `max_datagram_size`), as
    /// `role`; a server taking a channel over starts its dedupe window at `floor`.
    pub fn new(
        now: Instant,
        mut config: LinkConfig,
        role: Role,
        conn: ConnId,
        max_datagram_size: usize,
        floor: u64,
    ) -> Self {
        config.sender.encoder.max_datagram_size = max_datagram_size;
        // A message is acked only once the application took it (`Input::Took`).
        config.receiver.ack_on_take = true;
        let mut peer = Peer::new(config.sender.clone(), config.receiver.clone());
        if let Some(keys) = &config.shared_keys {
            peer.receiver.share_keys(keys.clone(), config.key_scope);
        }
        peer.receiver.set_protocol(config.protocol);
        peer.sender.set_protocol(config.protocol);
        peer.receiver.start_at(floor);
        let (current, primary_attached) = match &role {
            Role::Client {
                current, attached, ..
            } => (*current, *attached),
            _ => (0, Attached::Resumed),
        };
        let mut link = Link {
            peer,
            room: config.handoff.max(1),
            config,
            role,
            phase: Phase::Running,
            primary: Some(conn),
            primary_attached,
            current,
            generation: 0,
            fresh_since: 0,
            standby: None,
            standby_dial: None,
            redial: None,
            next_dial: 0,
            detached_until: None,
            waiting: HashMap::new(),
            send_deadlines: BTreeSet::new(),
            streams: HashMap::new(),
            parked: VecDeque::new(),
            parked_bytes: 0,
            stream_waiting: HashMap::new(),
            claims: std::collections::BTreeMap::new(),
            next_claim: 0,
            app_gone: false,
            handles_dropped: false,
            waiting_since: None,
            standby_upgrade_at: None,
            ranking: Ranking::default(),
            switching: false,
            stats: LinkStats::default(),
            actions: VecDeque::new(),
            crossed: std::collections::HashSet::new(),
            replies_waiting: VecDeque::new(),
            settled_handed: HashMap::new(),
            unanswered: HashMap::new(),
            unanswered_total: 0,
            room_owed: 0,
        };
        link.start_standby(now);
        if link.replicas() >= 2 {
            link.ranking.next = Some(now + RANK_EVERY);
        }
        link
    }

    /// The protocol peer (its sender's and receiver's counters and estimates).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The link's own counters.
    pub fn stats(&self) -> LinkStats {
        let mut s = self.stats.clone();
        s.standby_ready = self.standby.is_some();
        s.in_flight = self.in_flight();
        s.slots_held = self.waiting.len() + self.streams.len();
        s.replica_scores = self.ranking.scores.clone();
        s.duplicate_keys_elsewhere = self.peer.receiver.stats().duplicate_keys_elsewhere;
        s.reservations_held = self.reservations_held();
        s
    }

    /// The connection in use, if any.
    pub fn primary(&self) -> Option<ConnId> {
        self.primary
    }

    /// Whether the link has stopped (after [`Action::Stop`]).
    pub fn is_stopped(&self) -> bool {
        self.phase == Phase::Stopped
    }

    /// Whether the link's connections are closed (it may still hand over deliveries and
    /// finish claims before it stops).
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Finishing { .. } | Phase::Stopped)
    }

    /// The next thing to do.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Input::Timer`] is next due.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Stopped {
            return None;
        }
        let streams = self
            .streams
            .values()
            .filter(|s| s.running_on.is_none())
            .map(|s| s.deadline);
        let sends = self.send_deadlines.first().map(|&(at, _)| at);
        let claims = self.claims.values().filter_map(|c| c.retry_at);
        let finishing = match self.phase {
            Phase::Finishing { until } if !self.claims.is_empty() => Some(until),
            Phase::Draining { claims_until }
                if !self.claims.is_empty()
                    || (!self.app_gone && self.peer.receiver.awaiting_take()) =>
            {
                Some(claims_until)
            }
            _ => None,
        };
        let redial = self
            .redial
            .as_ref()
            .map(|r| r.retry_at.unwrap_or(r.give_up));
        // A finishing link has settled every send and takes no datagram: the peer's timers
        // (hedges, deadlines) are not handled then, so they must not wake it (a past one
        // would wake it forever).
        let peer = match self.phase {
            Phase::Finishing { .. } => None,
            _ => self.peer.poll_timeout(),
        };
        [
            peer,
            self.detached_until,
            self.failover_deadline(),
            self.standby_upgrade_at,
            self.ranking.next,
            redial,
            self.standby_dial.as_ref().and_then(|d| d.retry_at),
            finishing,
        ]
        .into_iter()
        .flatten()
        .chain(streams)
        .chain(sends)
        .chain(claims)
        .min()
    }

    /// Takes one input at `now`; then drain [`Link::poll_action`].
    pub fn handle(&mut self, now: Instant, input: Input) {
        if self.phase == Phase::Stopped {
            // Answer what still asks, so that nothing waits forever.
            match input {
                Input::Send { token, .. } | Input::Request { token, .. } => {
                    self.complete(token, Err(SendError::Closed))
                }
                Input::DialDone { result: Ok(d), .. } => self.close(d.conn, 0, "channel stopped"),
                Input::Reattached { conn, .. } => self.close(conn, 0, "channel stopped"),
                Input::StreamMessage { answer, .. } => {
                    self.actions.push_back(Action::AnswerStream {
                        answer,
                        status: None,
                    })
                }
                _ => {}
            }
            return;
        }
        if let Phase::Finishing { .. } = self.phase {
            self.handle_finishing(now, input);
            self.flush(now);
            self.maybe_stop(now);
            return;
        }
        match input {
            Input::Datagram { conn, data } => self.datagram(now, conn, data),
            Input::ConnectionLost { conn, how, reason } => {
                if Some(conn) == self.primary {
                    self.lost(now, how, reason);
                } else if self.standby.as_ref().is_some_and(|s| s.conn == conn) {
                    tracing::debug!("surelink channel: warm standby lost");
                    self.standby = None;
                    self.peer.sender.set_secondary(false);
                    self.start_standby(now);
                }
            }
            Input::DialDone { dial, result } => self.dial_done(now, dial, result),
            Input::Reattached {
                conn,
                max_datagram_size,
                protocol,
            } => {
                if self.role == Role::Server {
                    let attached = (conn, max_datagram_size, protocol);
                    self.attach(now, attached, Attached::Resumed, None);
                } else {
                    self.close(conn, 0, "unexpected connection");
                }
            }
            Input::StreamDone { id, conn, end } => self.stream_done(now, id, conn, end),
            Input::StreamMessage { answer, message } => {
                self.stats.stream_messages_received += 1;
                if self.peer.receiver.backlogged() || !self.parked.is_empty() {
                    self.park(now, answer, message);
                } else {
                    self.take_stream_message(now, answer, message);
                }
            }
            Input::StreamInvalid { reason } => self.peer.count_invalid_reason(reason),
            Input::ClaimAnswered { attempt, result } => self.claim_answered(now, attempt, result),
            Input::Took { id } => self.took(now, id),
            Input::AppGone => self.app_gone(now),
            Input::Send {
                token,
                key,
                payload,
                deadline,
            } => self.send(now, token, key, Kind::Message, payload, deadline),
            Input::Request {
                token,
                key,
                payload,
                deadline,
            } => self.request(now, token, key, payload, deadline),
            Input::Answered { id, answer } => self.answered(now, id, answer),
            Input::Received { id } => self.received(id),
            Input::Confirm { id, outcome } => self.peer.receiver.confirm(now, id, outcome),
            Input::Close { drain: false } => self.finish(
                now,
                "the channel was closed by the application".into(),
                0,
                "closed",
            ),
            Input::Close { drain: true } => {
                if self.phase == Phase::Running {
                    self.phase = Phase::Draining {
                        claims_until: now + self.config.claim_timeout,
                    };
                }
            }
            Input::HandlesDropped => self.handles_dropped = true,
            Input::Samples(samples) => self.rank(now, &samples),
            Input::Congestion { conn, congested } => {
                if self.primary == Some(conn) {
                    self.peer.sender.set_congested(congested);
                }
            }
            Input::PathRtt { conn, rtt } => {
                if self.primary == Some(conn) {
                    self.peer.sender.on_path_rtt(now, rtt);
                }
            }
            Input::Timer => self.timer(now),
        }
        if !self.is_closed() {
            self.flush(now);
        }
        // A draining channel also lets its claims in flight finish, and its application take
        // what it was handed (within `claim_timeout`), so that their acks go out before the
        // goodbye.
        if let Phase::Draining { claims_until } = self.phase {
            // Messages delivered but not yet taken are acked when the application takes
            // them: a closing application that still reads gets those acks out first.
            let untaken =
                (!self.app_gone && self.peer.receiver.awaiting_take()) || self.awaiting_answers();
            if self.waiting.is_empty()
                && self.streams.is_empty()
                && ((self.claims.is_empty() && !untaken) || now >= claims_until)
            {
                self.finish(
                    now,
                    "the channel was closed by the application".into(),
                    GOODBYE,
                    "goodbye",
                );
            }
        }
        // Nobody can send and nobody takes deliveries: the channel has no use. Sends in
        // flight get their outcomes first (a dropped `send` future's message still counts).
        if self.phase == Phase::Running
            && self.handles_dropped
            && self.app_gone
            && !self.awaiting_answers()
            && self.waiting.is_empty()
            && self.streams.is_empty()
        {
            self.finish(now, "every handle was dropped".into(), GOODBYE, "goodbye");
        }
        self.maybe_stop(now);
    }

    fn handle_finishing(&mut self, now: Instant, input: Input) {
        match input {
            Input::ClaimAnswered { attempt, result } => self.claim_answered(now, attempt, result),
            Input::Took { id } => self.took(now, id),
            Input::Answered { id, answer } => self.answered(now, id, answer),
            Input::Received { id } => self.received(id),
            Input::AppGone => self.app_gone(now),
            Input::Send { token, .. } | Input::Request { token, .. } => {
                self.complete(token, Err(SendError::Closed))
            }
            Input::DialDone { result: Ok(d), .. } => self.close(d.conn, 0, "channel stopped"),
            Input::Reattached { conn, .. } => self.close(conn, 0, "channel stopped"),
            Input::StreamMessage { answer, .. } => self.actions.push_back(Action::AnswerStream {
                answer,
                status: None,
            }),
            Input::Timer => self.claim_timers(now),
            Input::Confirm { id, outcome } => self.peer.receiver.confirm(now, id, outcome),
            _ => {}
        }
    }

    fn maybe_stop(&mut self, now: Instant) {
        let Phase::Finishing { until } = self.phase else {
            return;
        };
        // Messages handed to the application and not yet taken keep the link until they are
        // taken (their acks, and their keys' takes, are recorded) or the application goes
        // away (their keys are released): a take nobody records could let a key be delivered
        // again.
        let deliveries = (!self.app_gone
            && (self.peer.receiver.has_deliveries() || self.peer.receiver.awaiting_take()))
            || self.awaiting_answers();
        let claims = !self.claims.is_empty() && now < until;
        if !deliveries && !claims {
            self.phase = Phase::Stopped;
            self.actions.push_back(Action::Stop {
                reason: "stopped".into(),
            });
        }
    }

    fn close(&mut self, conn: ConnId, code: u32, reason: &'static str) {
        self.actions.push_back(Action::Close { conn, code, reason });
    }

    fn datagram(&mut self, now: Instant, conn: ConnId, data: Bytes) {
        if Some(conn) == self.primary {
            self.waiting_since = self.waiting_since.map(|_| now);
            self.peer.handle_datagram(now, data);
        } else if self.standby.as_ref().is_some_and(|s| s.conn == conn) {
            if let Ok(Frame::Ack(ack)) = Frame::decode(data, &Limits::default()) {
                self.peer.sender.handle_secondary_ack(now, &ack);
            }
        }
    }

    fn timer(&mut self, now: Instant) {
        if self.ranking.next.is_some_and(|at| at <= now) {
            self.ranking.next = (self.replicas() >= 2).then_some(now + RANK_EVERY);
            let conns: Vec<ConnId> = self
                .primary
                .into_iter()
                .chain(self.standby.as_ref().map(|s| s.conn))
                .collect();
            if !conns.is_empty() {
                self.actions.push_back(Action::SamplePaths { conns });
            }
        }
        if self.standby_upgrade_at.is_some_and(|at| at <= now) {
            self.standby_upgrade_at = None;
            self.upgrade_standby(now);
        }
        if let Some(d) = &mut self.standby_dial {
            if d.retry_at.is_some_and(|at| at <= now) {
                d.retry_at = None;
                d.pos = 0;
                self.standby_attempt(now);
            }
        }
        if let Some(r) = &mut self.redial {
            if r.retry_at.is_some_and(|at| at <= now) {
                r.retry_at = None;
                self.redial_attempt(now);
            } else if r.retry_at.is_none() && r.give_up <= now {
                let reason = format!(
                    "no connection within {:?}; last error: {}",
                    self.config.reconnect.give_up_after, r.last
                );
                self.finish(now, reason, 0, "channel stopped");
                return;
            }
        }
        if self.failover_deadline().is_some_and(|at| at <= now) {
            tracing::info!("surelink channel: replica silent; failing over");
            if let Some(c) = self.primary {
                self.close(c, 0, "silent: failing over");
            }
            self.waiting_since = None;
            self.lost(now, Lost::Retryable, "timed out".into());
            return;
        }
        self.peer.handle_timeout(now);
        let expired: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| s.running_on.is_none() && s.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(s) = self.streams.remove(&id) {
                self.peer.sender.reserved_done(now, id);
                self.complete(s.token, Err(SendError::Timeout { id }));
            }
        }
        // Per-send deadlines shorter than the sender's: the outcome is unknown now; the
        // slot stays held until the sender lets the message go.
        while self
            .send_deadlines
            .first()
            .is_some_and(|&(at, _)| at <= now)
        {
            let (_, id) = self.send_deadlines.pop_first().expect("checked");
            if self.reply_overdue(id) {
                continue;
            }
            let Some(w) = self.waiting.get_mut(&id).filter(|w| !w.completed) else {
                continue;
            };
            w.completed = true;
            let token = w.token;
            self.actions.push_back(Action::Complete {
                token,
                outcome: Err(SendError::Timeout { id }),
            });
        }
        self.claim_timers(now);
        if self.detached_until.is_some_and(|t| t <= now) {
            let reason = format!(
                "the peer did not reconnect within {:?}",
                self.config.channel_ttl
            );
            self.finish(now, reason, 0, "channel stopped");
        }
    }

    /// The channel ends: every pending send learns that its outcome is unknown; queued
    /// deliveries and claims in flight still finish (a claim that succeeds records a
    /// delivery, so its message must be delivered).
    fn finish(&mut self, now: Instant, reason: String, code: u32, close: &'static str) {
        tracing::debug!(%reason, "surelink channel: stopped");
        self.flush(now);
        self.send_deadlines.clear();
        let waiting: Vec<(u64, Waiting)> = self.waiting.drain().collect();
        for (_, w) in waiting {
            if w.completed {
                self.actions.push_back(Action::FreeSlot { token: w.token });
            } else {
                self.complete(
                    w.token,
                    Err(SendError::ConnectionLost {
                        reason: reason.clone(),
                    }),
                );
            }
        }
        let streams: Vec<(u64, StreamSend)> = self.streams.drain().collect();
        for (id, s) in streams {
            self.peer.sender.reserved_done(now, id);
            self.complete(
                s.token,
                Err(SendError::ConnectionLost {
                    reason: reason.clone(),
                }),
            );
        }
        if let Some(c) = self.primary.take() {
            self.close(c, code, close);
        }
        if let Some(s) = self.standby.take() {
            self.close(s.conn, code, close);
        }
        for (_, answer) in std::mem::take(&mut self.stream_waiting) {
            self.actions.push_back(Action::AnswerStream {
                answer,
                status: None,
            });
        }
        self.drop_parked();
        self.redial = None;
        self.standby_dial = None;
        self.detached_until = None;
        self.ranking.next = None;
        self.standby_upgrade_at = None;
        // Claims in flight get `claim_timeout` to finish, or a minute when that is shorter: a
        // claim that may have been written and is given up leaves a message claimed that
        // nobody delivers (the one-phase claim's gap), so a stopping channel waits longer
        // for a store that is briefly away.
        self.phase = Phase::Finishing {
            until: now + self.config.claim_timeout.max(STOPPING_CLAIMS_WAIT),
        };
        self.hand_over();
    }

    /// Collects what the peer produced: deliveries, claims, stream answers, datagrams and
    /// outcomes.
    fn flush(&mut self, now: Instant) {
        self.hand_over();
        self.record_replies(now);
        self.exchange_replies(now);
        while !self.parked.is_empty() && !self.peer.receiver.backlogged() {
            let (answer, message) = self.parked.pop_front().expect("not empty");
            self.parked_bytes -= message.len();
            self.take_stream_message(now, answer, message);
            self.hand_over();
        }
        // A claim is the record of a delivery, so a message is claimed only when the
        // application has room for it, and handed over as soon as the claim succeeds: a
        // replica that crashes cannot hold messages claimed but not handed over, and an
        // application that stopped reading leaves messages unclaimed, for another replica to
        // deliver after a failover. (Claims in flight are thereby at most the hand-off's
        // room: four per channel by default, enough for a store that answers in a
        // millisecond; a store that hangs slows the channel down rather than widen the gap.)
        while self.claims.len() + self.peer.receiver.deliveries_queued() < self.room {
            let Some(request) = self.peer.receiver.poll_claim() else {
                break;
            };
            self.start_claim(request);
        }
        // Without a store the inbox pattern hands a message over as its claim starts.
        self.hand_over();
        self.settle_next();

        while let Some((id, status)) = self.peer.receiver.poll_stream_answer() {
            if let Some(answer) = self.stream_waiting.remove(&id) {
                self.actions
                    .push_back(Action::AnswerStream { answer, status });
            }
        }
        while let Some(datagram) = self.peer.sender.poll_secondary() {
            self.crossed.extend(self.waiting.keys().copied());
            if let Some(s) = &self.standby {
                self.actions.push_back(Action::Transmit {
                    conn: s.conn,
                    datagram,
                });
            }
        }
        // Once the application dropped its `Messages` the receiver acks nothing it was not
        // given (acks wait for the take) and refuses what arrives (REFUSE code 5), so its
        // output still goes out.
        while let Some(datagram) = self.peer.poll_transmit() {
            // Without a connection, datagrams are dropped: what matters is re-sent on the
            // next connection (`Peer::new_connection`).
            if let Some(conn) = self.primary {
                self.actions.push_back(Action::Transmit { conn, datagram });
            }
        }
        if self.crossed.len() > 2 * (self.waiting.len() + self.streams.len()) + 64 {
            let (waiting, streams) = (&self.waiting, &self.streams);
            self.crossed
                .retain(|id| waiting.contains_key(id) || streams.contains_key(id));
        }
        while let Some(event) = self.peer.sender.poll_event() {
            let (id, outcome) = match event {
                SenderEvent::Acked {
                    id,
                    latency,
                    shards_sent,
                    hedges,
                    replayed,
                } => (
                    id,
                    Ok(Receipt {
                        id,
                        latency,
                        shards_sent,
                        hedges,
                        replayed,
                    }),
                ),
                SenderEvent::Failed {
                    id,
                    reason: FailReason::PeerLostState,
                } => (
                    id,
                    Err(SendError::ConnectionLost {
                        reason: PEER_LOST_STATE.into(),
                    }),
                ),
                SenderEvent::Failed {
                    id,
                    reason: FailReason::Refused(_),
                } if self.crossed.contains(&id) => (
                    id,
                    Err(SendError::ConnectionLost {
                        reason: REFUSED_AFTER_FAILOVER.into(),
                    }),
                ),
                SenderEvent::Failed {
                    id,
                    reason: FailReason::Refused(REFUSE_KEY_REUSED),
                } => (id, Err(SendError::KeyReused { id })),
                SenderEvent::Failed {
                    id,
                    reason: FailReason::Refused(crate::wire::REFUSE_DECLINED),
                } => (id, Err(SendError::Declined { id })),
                SenderEvent::Failed {
                    id,
                    reason: FailReason::Refused(reason),
                } => (id, Err(SendError::Refused { id, reason })),
                SenderEvent::Failed { id, .. } => (id, Err(SendError::Timeout { id })),
            };
            self.crossed.remove(&id);
            if let Ok(receipt) = &outcome {
                if self.request_acked(id, receipt.replayed) {
                    continue;
                }
            }
            if let Some(w) = self.waiting.remove(&id) {
                if w.completed {
                    self.actions.push_back(Action::FreeSlot { token: w.token });
                } else {
                    self.complete(w.token, outcome);
                }
            }
        }
        let waiting = self.in_flight() > 0;
        self.waiting_since = match (waiting, self.waiting_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
    }
}

/// The claims mode a channel's receiver runs in.
pub fn claims_mode(store: bool, application: bool) -> Claims {
    if application {
        Claims::Application
    } else if store {
        Claims::Owner
    } else {
        Claims::Off
    }
}
