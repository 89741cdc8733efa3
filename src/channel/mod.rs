//! The stable API: a [`Channel`] carries payments between two ends over QUIC, each send
//! ending in a [`Receipt`] (delivered) or a [`SendError`] that says whether the payment may
//! have been delivered.
//!
//! One driver task per channel owns the channel's protocol state. It feeds it received
//! datagrams, stream messages, dial and claim results and timeouts, performs what it asks
//! (sends, dials, store calls), completes each `send` with the message's outcome, and
//! forwards delivered messages to [`Messages`]. Time is tokio's clock, so a channel over the
//! simulator runs in virtual time under a paused clock.
//!
//! # Three ways to get a channel
//!
//! - [`Channel::connect`] (client) and [`Listener`] / [`Server`] (server): the client sends a
//!   Hello with a random 128-bit channel id on a bidirectional stream (the protocol: `docs/PROTOCOL.md`); the server keeps the
//!   channel's state (its dedupe window above all) by that id. When the connection is lost
//!   the client reconnects with backoff and re-sends every unacked message with its original
//!   id on the new connection; the server attaches the new connection to the same channel,
//!   so nothing is delivered twice. The server keeps a detached channel for
//!   [`Config::channel_ttl`], which must exceed the client's [`Reconnect::give_up_after`].
//!   [`Channel::connect_replicas`] does the same over several replicas of one service.
//! - [`Listener`] accepts on a `quinn::Endpoint` of its own; [`Server`] is the registry
//!   behind it, for an application that runs its own accept loop (say, an endpoint that
//!   serves other ALPN protocols too) and hands each connection to
//!   [`Server::accept_connection`].
//! - [`Channel::open`] over a `quinn::Connection` the application already has. Both ends
//!   call it. The channel lives as long as that connection (no reconnects).
//!
//! Each gives a pair: the [`Channel`] (the sending half, cheap to clone) and its
//! [`Messages`] (what the peer sent, in order of arrival). The channel runs while either half
//! is alive: a server that only receives may drop the `Channel` and keep the `Messages`; a
//! client that only sends keeps the `Channel` (dropping its `Messages` refuses anything the
//! server sends back).
//!
//! # Sending
//!
//! [`Channel::send`] takes anything that converts into [`Bytes`] (`Vec<u8>`, `String`,
//! `&'static str`, `Bytes`) and waits for the outcome. Per send, [`SendOptions`] carries an
//! idempotency key (the peer delivers at most one message per key, however often the
//! application retries) and a deadline of its own (shorter or longer than the channel's); [`Channel::send_with`]
//! takes them, and [`Channel::send_with_key`] is the shorthand for a key alone. Payments
//! should always carry a key: it is what makes a retry after an unknown outcome safe.
//!
//! # What an outcome means
//!
//! `Ok(Receipt)`: the peer's application took the message from its [`Messages`] (once), or
//! (with a claims store, [`Config::store`]) a replica claimed it and handed it over. So
//! `send` completes only while the other end reads: a test that awaits a send and only then
//! reads the other end's `Messages` in the same task waits for ever. An error says whether
//! the message may have been delivered ([`SendError::may_have_been_delivered`]); where it
//! may, retry with the same idempotency key ([`Channel::send_with_key`]) and the peer
//! delivers it at most once.
//!
//! # Cancellation and shutdown
//!
//! A `send` whose future is dropped is not cancelled: once handed to the channel the
//! message keeps its in-flight slot until its outcome, which is counted
//! ([`ChannelStats::sends_abandoned`]). [`Channel::close`] drains (sends in flight get their
//! outcomes, new ones fail with [`SendError::Closed`]) and then closes the connection with
//! [`GOODBYE`]; the server then ends its state for the channel at once. Dropping every
//! `Channel` clone and the [`Messages`] ends the channel the same way. Once [`Messages`] is
//! dropped nothing more is acked: messages handed over but not taken, and those arriving
//! after it, are not delivered, and their senders get [`SendError::Refused`] (with a claims
//! store, a message already claimed counts as handed over instead: it stays unacked here).
//! [`Listener::shutdown`] / [`Server::shutdown`] stop accepting and drain every channel
//! within a grace period.
//!
//! # Configuration and TLS
//!
//! [`Config`] holds every setting and limit of a channel, each with its default in its
//! documentation; start from `Config::default()` and change fields. TLS configs come from
//! [`client_config`] / [`server_config`] (certificates you have), [`client_config_with`]
//! (a CA file or a pinned certificate, a client certificate), [`server_config_mtls`]
//! (clients must present a certificate), with certificates and keys read by
//! [`Identity::from_files`], [`load_certs`] and [`load_key`] (PEM or DER). For development,
//! `Identity::self_signed` (feature `rcgen`) makes a self-signed certificate for a name.
//!
//! # Two paths
//!
//! Messages up to [`Config::stream_threshold`] bytes travel as coded shards in DATAGRAM frames
//! (the fast path). Larger ones, up to [`Config::max_message_size`], travel one per
//! bidirectional QUIC stream, with the same ids, the same dedupe window and the same
//! outcomes; the receiver answers on the stream once the message was handed to [`Messages`].
//! A channel therefore owns its connection's bidirectional streams (set [`Config::streams`]
//! to `false` on a connection whose streams the application uses itself).
//!
//! # Who decides
//!
//! Every decision (which connection, when to redial or fail over, when a send has its
//! outcome, when to claim and hand over, when to stop) is made by the sans-I/O
//! [`Link`](crate::proto::link::Link); the driver task only performs its actions.
//!
//! # No 0-RTT
//!
//! Payment data never travels in 0-RTT (RFC 9001 §9.2, RFC 8446 §8: early data can be
//! replayed). [`Channel::connect`] waits for the full handshake before it sends anything,
//! and [`server_config`] turns 0-RTT off on the server.

pub mod congestion;
mod connect;
mod dial;
mod driver;
mod error;
mod identity;
mod io;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use quinn::rustls;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

pub use crate::proto::admission::{AdmissionConfig, AdmissionStats};
pub use crate::proto::link::GOODBYE;
#[doc(inline)]
pub use crate::proto::link::{Receipt, Reconnect, Reply};
pub use crate::proto::AnswerError;
#[doc(inline)]
pub use crate::proto::{
    Delivered, HedgeTo, ReceiverConfig, ReceiverStats, SenderConfig, SenderStats,
};
pub use crate::wire::Kind;
pub use connect::{
    ack_frequency_config, client_config, congestion_controller, server_config,
    server_config_with_protocols, transport_config, AcceptError, ConfigError, ConnectError,
    IncomingFilter, Listener, Server, ALPN, ALPN_PROTOCOLS, ALPN_V2,
};
pub use error::{RefuseReason, RejectReason, RequestError, SendError};
pub use identity::{
    client_config_with, load_certs, load_key, server_config_mtls,
    server_config_mtls_with_protocols, Identity, IdentityError, ServerTrust,
};

/// Settings of a [`Channel`], a [`Listener`] or a [`Server`]. Every field states its
/// default; the datagram size is taken from the connection.
///
/// New fields may be added in minor releases (`#[non_exhaustive]`): start from
/// `Config::default()` and change what you need.
///
/// ```
/// use std::time::Duration;
/// use surelink::channel::Config;
///
/// let mut config = Config::default();
/// config.sender.deadline = Duration::from_secs(2); // every send's deadline (default 5 s)
/// config.sender.max_in_flight = 256; // sends beyond it wait (default 4,096)
/// config.receiver.key_ttl = Duration::from_secs(7 * 24 * 3600); // default 24 h
/// config.reconnect.give_up_after = Duration::from_secs(30); // default 10 s
/// assert_eq!(config.max_message_size, 256 * 1024);
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// The sending half: redundancy, hedging, the deadline of every send (`deadline`,
    /// default 5 s; one send can ask for less or more with [`SendOptions::deadline`]), messages in
    /// flight (`max_in_flight`, default 4,096: further sends wait). Every field of
    /// [`SenderConfig`] states its default. Its fields below `deadline` and
    /// `max_in_flight` tune the protocol itself: leave them unless a measurement says so.
    pub sender: SenderConfig,
    /// The receiving half: how long idempotency keys are kept (`key_ttl`, default 24 h) and
    /// how many (`max_keys`, default 1,048,576), how many bytes may wait for the application
    /// (`max_queued_bytes`, default 16 MiB), the dedupe window (65,536 ids) and reassembly
    /// caps. Every field of [`ReceiverConfig`] states its default; its `claims` field is set
    /// by the channel from [`Config::store`] and [`Config::application_claims`].
    pub receiver: ReceiverConfig,
    /// Largest message `send` takes, in bytes; above it `send` fails with
    /// [`SendError::TooLarge`] and sends nothing. Default 256 KiB.
    pub max_message_size: usize,
    /// Messages above this many bytes travel on a stream instead of datagrams. Default 8 KiB
    /// (coding a message into more shards costs more than a stream's retransmission saves).
    /// Capped at the wire's `max_message_len`.
    pub stream_threshold: usize,
    /// Whether large messages use (and the channel accepts) bidirectional streams. Default
    /// `true`. With `false`, messages above `stream_threshold` fail with
    /// [`SendError::TooLarge`].
    pub streams: bool,
    /// How long a server waits for a new connection's Hello. Default 10 s.
    pub hello_timeout: Duration,
    /// How a client reconnects ([`Channel::connect`]): first retry after 20 ms, backoff
    /// doubling up to 1 s, giving up after 10 s (the defaults of [`Reconnect`]).
    pub reconnect: Reconnect,
    /// How long a server keeps a channel whose connection was lost, waiting for the client
    /// to reconnect. Default 60 s.
    pub channel_ttl: Duration,
    /// Most channels a [`Server`] holds at once; past it new channels are refused. Default
    /// 10,000.
    pub max_channels: usize,
    /// Where deliveries are claimed before they are acked (see [`crate::store`]). `None`
    /// (the default): this channel's dedupe window decides, and idempotency keys are
    /// shared by every channel of one [`Server`] (kept `receiver.key_ttl`, in this process's
    /// memory): a client that restarts and retries a key on a new channel is acked without a
    /// second delivery. A channel from [`Channel::open`] keeps its keys to itself. Keys are
    /// per client: under mutual TLS each client certificate has its own, without it every
    /// client shares one namespace ([`Server`] says more). With a store shared by replicas, a
    /// message is delivered at most once across them; a [`Server`] with a store also takes
    /// over channels it never held (a client that failed over from another replica re-sends
    /// its unacked messages, and the store recognises those delivered there), after binding
    /// the channel to its client in the store
    /// ([`DedupeStore::bind_channel`](crate::store::DedupeStore::bind_channel)): a channel
    /// bound to another client is refused, and one the store cannot answer for is closed
    /// with [`GOODBYE`] so that its client retries.
    ///
    /// Any store converts, no annotation needed:
    ///
    /// ```
    /// use std::sync::Arc;
    /// use surelink::channel::Config;
    /// use surelink::store::MemoryStore;
    ///
    /// let store = Arc::new(MemoryStore::default());
    /// let mut replica_a = Config::default();
    /// replica_a.store = Some(store.clone());
    /// let mut replica_b = Config::default();
    /// replica_b.store = Some(store);
    /// ```
    pub store: Option<std::sync::Arc<dyn crate::store::DedupeStore>>,
    /// The inbox pattern: the application claims each message itself, in the same database
    /// transaction as its effect (e.g. `PgStore::claim_in` beside its ledger row), and then
    /// confirms it with [`Channel::confirm`]; only then is the message acked. Messages are
    /// delivered before they are claimed, so one the application could not commit (it calls
    /// [`Channel::release`]) may come again. Takes precedence over `store` for deliveries; a
    /// [`Server`] with it takes over channels like one with a store. With a `store` as well,
    /// the channel first *reserves* each message in it (so that other replicas hold back)
    /// and hands it over with its reservation ([`Delivered::lease`](crate::proto::Delivered::lease)),
    /// which the application's claim settles (`PgStore::claim_in` with
    /// [`Claim::of`](crate::store::Claim::of)). Default `false`.
    pub application_claims: bool,
    /// Explicit acks: a message is acked only when the application answers it
    /// ([`Delivered::ack`], [`Delivered::nack`], or [`Delivered::reply`] for a request),
    /// rather than when [`Messages::recv`] returns it, so that an ack means the work was
    /// done ("commit, then ack"). A nack refuses the message (its sender learns
    /// [`SendError::Declined`]: not processed). Dropping a message without an answer gives
    /// it back: it is neither acked nor refused, its sender learns an unknown outcome, and a
    /// retry under its key is delivered afresh (so an application that may have committed
    /// before dropping it keeps its keys with its work: the inbox pattern). At most
    /// `max_unanswered` (64) received messages await their answers at once; then the
    /// channel hands over no more until answers come. Requests are always answered this way,
    /// whatever this says. A message the application received and still owes an answer is
    /// not given back when it drops `Messages` (a shutdown may finish its work): its answer
    /// still counts. With a `store` (not `application_claims`) a message is claimed before
    /// it is handed over; a nack or a drop releases that claim (best effort: a replica that
    /// dies first leaves it claimed, and a retry is then acked as a replay). Default `false`.
    pub explicit_ack: bool,
    /// A [`Listener`]'s admission of new connections: a QUIC Retry (address validation) for
    /// unvalidated addresses above a number of handshakes in progress, a cap on them, and a
    /// cap per IP address ([`AdmissionConfig`]:
    /// 64, 1,024 and 32 by default).
    pub admission: crate::proto::admission::AdmissionConfig,
    /// Most messages the application received and has not answered yet (requests, and with
    /// `explicit_ack` every message): past it the channel hands over no more until answers
    /// come. Default 64.
    pub max_unanswered: usize,
    /// With a `store`: how long a reservation holds a message against the other replicas
    /// (two-phase claims, [`crate::store`]). A replica that dies holding reservations is
    /// taken over this long after it reserved them (plus one store round trip); shorter
    /// leases take over sooner, but a replica whose store round trip exceeds it lets others
    /// take over messages it still works on (its settles are then fenced: safe, but the work
    /// is lost). Default 2 s.
    pub lease: Duration,
    /// A channel over several replicas ([`Channel::connect_replicas`]) abandons a
    /// connection on which nothing was heard for this long while messages await their
    /// outcome, and fails over to the next replica (a dead replica is otherwise noticed only
    /// at the connection's idle timeout). Default 1 s.
    pub failover_after: Duration,
    /// A channel over several replicas keeps a warm standby: a second connection, handshake
    /// and Hello done, to the next replica that answers, so a failover does not wait for a
    /// handshake. Default `true`.
    pub warm_standby: bool,
    /// A channel over several replicas moves to its warm standby when the standby's score
    /// (round trip × (1 + 10 × loss), sampled every second on both connections) stays below
    /// this share of the primary's for three samples in a row. `0` never switches. Default
    /// 0.5: a replica must be twice as good to be worth a move.
    pub switch_ratio: f64,
    /// How long a draining close waits for claims in flight before its goodbye (a stopped
    /// channel still waits for them at least a minute). While the channel runs, a
    /// failed claim is retried (same claimant, doubling backoff up to 1 s) for as long as it
    /// takes, its message neither delivered nor acked meanwhile: the failed attempt may have
    /// been written, and giving up could leave a message claimed that nobody delivers.
    /// Default 5 s.
    pub claim_timeout: Duration,
    /// Longest one claim attempt may take; past it the attempt counts as failed and is
    /// retried (a store that hangs becomes an error, not a claim pending forever). Default
    /// 1 s.
    pub claim_attempt_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            sender: SenderConfig::default(),
            receiver: ReceiverConfig::default(),
            max_message_size: 256 * 1024,
            stream_threshold: 8 * 1024,
            streams: true,
            hello_timeout: Duration::from_secs(10),
            reconnect: Reconnect::default(),
            channel_ttl: Duration::from_secs(60),
            max_channels: 10_000,
            store: None,
            application_claims: false,
            explicit_ack: false,
            admission: crate::proto::admission::AdmissionConfig::default(),
            max_unanswered: 64,
            lease: crate::proto::link::DEFAULT_LEASE,
            claim_timeout: Duration::from_secs(5),
            claim_attempt_timeout: Duration::from_secs(1),
            failover_after: Duration::from_secs(1),
            warm_standby: true,
            switch_ratio: 0.5,
        }
    }
}

impl Config {
    /// The core's share of these settings.
    fn link(&self) -> crate::proto::link::LinkConfig {
        let mut receiver = self.receiver.clone();
        receiver.claims =
            crate::proto::link::claims_mode(self.store.is_some(), self.application_claims);
        crate::proto::link::LinkConfig {
            sender: self.sender.clone(),
            receiver,
            stream_threshold: self.stream_threshold,
            streams: self.streams,
            reconnect: self.reconnect.clone(),
            channel_ttl: self.channel_ttl,
            failover_after: self.failover_after,
            warm_standby: self.warm_standby,
            switch_ratio: self.switch_ratio,
            claim_timeout: self.claim_timeout,
            claim_attempt_timeout: self.claim_attempt_timeout,
            reserve: self.store.is_some(),
            lease: self.lease,
            max_unanswered: self.max_unanswered,
            ..crate::proto::link::LinkConfig::default()
        }
    }
}

/// A channel's random 128-bit id, stable across reconnects.
pub type ChannelId = [u8; 16];

/// Counters of a [`Channel`], and the estimates its sender plans with.
///
/// Where to find what an operator usually asks:
///
/// | question | field |
/// |---|---|
/// | how lossy is the path? | [`loss_estimate`](Self::loss_estimate), [`loss_observed`](Self::loss_observed) |
/// | is the loss bursty? | [`loss_dispersion`](Self::loss_dispersion) (about 1 when independent), [`loss_burstiness`](Self::loss_burstiness) |
/// | how fast are acks? | [`rtt_p50`](Self::rtt_p50), [`rtt_p95`](Self::rtt_p95) |
/// | what did redundancy cost? | `sender.data_shards`, `sender.repair_shards`, `sender.first_flight_bytes` |
/// | how often did it hedge? | `sender.hedges_fired`, `sender.hedges_skipped`, [`hedge_budget_used`](Self::hedge_budget_used), `sender.retransmits` |
/// | what did parity save? | `reassembly.blocks_rebuilt` (messages rebuilt without waiting for a resend) |
/// | were duplicates stopped? | `receiver.duplicates_suppressed`, `receiver.duplicate_keys`, `receiver.shards_of_delivered`, `reassembly.shards_stale` |
/// | is the application keeping up? | [`in_flight`](Self::in_flight) (sends awaiting outcomes), `receiver.bytes_queued` and `receiver.shards_refused_backlog` (deliveries not yet taken) |
/// | is memory bounded? | `reassembly.blocks_buffered`, `reassembly.bytes_buffered`, `reassembly.blocks_evicted`, `receiver.ids_tracked`, `receiver.keys_held` |
/// | is someone sending garbage? | [`invalid_frames`](Self::invalid_frames) by reason, `reassembly.shards_contradicting`, `reassembly.checksum_failures` |
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct ChannelStats {
    /// The per-shard loss rate the sender plans redundancy for (an upper confidence bound
    /// on recent loss; see [`crate::tune::LossEstimator`]).
    pub loss_estimate: f64,
    /// The plain per-shard loss rate over the estimator's window, once measured.
    pub loss_observed: Option<f64>,
    /// Median ack round trip (send to ack, as the hedge timer sees it).
    pub rtt_p50: Duration,
    /// 95th percentile ack round trip.
    pub rtt_p95: Duration,
    /// Loss structure: how much more often first flights miss than independent loss at the
    /// measured rate explains (about 1 for independent loss, well above under bursts); see
    /// [`crate::proto::Sender::loss_burstiness`]. It describes messages coded as blocks;
    /// on a protocol-2 path small messages travel as window sources, and
    /// [`ChannelStats::loss_dispersion`] is the figure to read. Shards lost to the channel's own
    /// congestion are counted apart ([`SenderStats::shards_excluded_congested`]), never as
    /// the path's loss.
    pub loss_burstiness: Option<f64>,
    /// Loss structure from the peer's shard counts: about 1 for independent loss, about
    /// `2L - 1` for bursts of `L` packets; see [`crate::proto::Sender::loss_dispersion`].
    pub loss_dispersion: Option<f64>,
    /// How far the path's round trip (quinn's) sits above its least of the last ten
    /// minutes: the queue the channel's traffic stands in. Past a quarter of the least round
    /// trip (5 ms at least, [`SenderConfig::congestion_delay`]) the sender sheds
    /// redundancy; see [`crate::proto::Sender::queueing_delay`].
    pub queueing_delay: Option<Duration>,
    /// Parity shards per data shard the queueing delay leaves room for now (the planned
    /// parity is cut to it; the ceiling on a path that does not queue).
    pub redundancy_cap: f64,
    /// Share of the first-hedge allowance spent (see [`SenderConfig::hedge_budget`]).
    pub hedge_budget_used: f64,
    /// The sending half's counters.
    pub sender: SenderStats,
    /// The receiving half's counters.
    pub receiver: ReceiverStats,
    /// Reassembly of the current connection: shards accepted, duplicate, stale, contradicting
    /// or over budget, blocks rebuilt from repair, checksum failures.
    pub reassembly: crate::fec::ReassemblerStats,
    /// Datagrams (and stream messages) received that did not decode, by reason.
    pub invalid_frames: std::collections::BTreeMap<&'static str, u64>,
    /// Datagrams quinn refused to send.
    pub send_errors: u64,
    /// Connections this channel moved to after losing one.
    pub reconnects: u64,
    /// Of those, connections to another replica than the one lost
    /// ([`Channel::connect_replicas`]).
    pub failovers: u64,
    /// Of the failovers, those that moved to the warm standby (no handshake to wait for).
    pub standby_failovers: u64,
    /// Moves to the warm standby because it measured much better than the replica in use
    /// (not counted in `failovers`; see [`Config::switch_ratio`]).
    pub switches: u64,
    /// Per replica ([`Channel::connect_replicas`] order): its score while this channel had
    /// a connection to it, smoothed: round trip in milliseconds × (1 + 10 × packet loss).
    /// `None` until measured. Lower is better.
    pub replica_scores: Vec<Option<f64>>,
    /// Gauge: whether a warm standby connection is ready.
    pub standby_ready: bool,
    /// Messages sent on streams.
    pub stream_messages_sent: u64,
    /// Messages received on streams (delivered or duplicate).
    pub stream_messages_received: u64,
    /// UDP bytes sent, over every connection this channel used (QUIC headers, acks and
    /// retransmissions included).
    pub udp_bytes_sent: u64,
    /// UDP bytes received, over every connection this channel used.
    pub udp_bytes_received: u64,
    /// Gauge: messages sent and awaiting their outcome, datagram and stream path together
    /// (at most [`SenderConfig::max_in_flight`]; further sends wait). A send whose own
    /// deadline passed stays counted while the sender still carries its message.
    pub in_flight: usize,
    /// Sends whose caller stopped waiting (the `send` future was dropped) before the outcome
    /// came: the message kept its slot until then, and its outcome was counted in `sender`.
    pub sends_abandoned: u64,
    /// Messages whose idempotency key another channel of the same [`Server`] delivered
    /// (a client that restarted and retried on a new channel): acked, not delivered again.
    pub duplicate_keys_elsewhere: u64,
    /// Gauge, with a claims store: messages reserved in the store and not yet settled (or
    /// settling). Other replicas hold back copies of them until their leases end.
    pub reservations_held: usize,
    /// With a claims store: reservations answered busy (another replica held the message;
    /// asked again when its lease ended).
    pub claims_busy: u64,
    /// With a claims store: reservations this channel took over from a replica whose lease
    /// had ended (it died, or was too slow).
    pub reservation_takeovers: u64,
    /// With a claims store: settles rejected because another replica had taken the
    /// reservation over (the message was not handed over here; that replica delivers it).
    pub fenced_settles: u64,
    /// With a claims store: settles that came after their own lease had ended (nobody had
    /// taken it over; the application or the store was slow).
    pub leases_expired: u64,
}

impl ChannelStats {
    /// Copies the core's counters, and the driver's own (`driver`: send errors, bytes of
    /// closed connections, abandoned sends), into these stats.
    fn publish(&mut self, link: &crate::proto::Link, driver: &ChannelStats) {
        let (peer, counters) = (link.peer(), link.stats());
        self.sender = peer.sender.stats();
        self.loss_estimate = peer.sender.loss_estimate();
        self.loss_observed = peer.sender.loss_observed();
        self.loss_burstiness = peer.sender.loss_burstiness();
        self.loss_dispersion = peer.sender.loss_dispersion();
        self.queueing_delay = peer.sender.queueing_delay();
        self.redundancy_cap = peer.sender.redundancy_cap();
        self.rtt_p50 = peer.sender.rtt().quantile(0.5);
        self.rtt_p95 = peer.sender.rtt().quantile(0.95);
        self.hedge_budget_used = peer.sender.hedge_budget_used();
        self.receiver = peer.receiver.stats();
        self.reassembly = peer.receiver.reassembly();
        // Cloned only when it changed: this runs once per datagram.
        if peer.invalid_frames().total() != self.invalid_frames.values().sum::<u64>() {
            self.invalid_frames = peer.invalid_frames().by_reason.clone();
        }
        self.send_errors = driver.send_errors;
        self.reconnects = counters.reconnects;
        self.failovers = counters.failovers;
        self.standby_failovers = counters.standby_failovers;
        self.switches = counters.switches;
        self.standby_ready = counters.standby_ready;
        self.replica_scores = counters.replica_scores;
        self.stream_messages_sent = counters.stream_messages_sent;
        self.stream_messages_received = counters.stream_messages_received;
        self.udp_bytes_sent = driver.udp_bytes_sent;
        self.udp_bytes_received = driver.udp_bytes_received;
        self.in_flight = counters.in_flight;
        self.sends_abandoned = driver.sends_abandoned;
        self.duplicate_keys_elsewhere = counters.duplicate_keys_elsewhere;
        self.reservations_held = counters.reservations_held;
        self.claims_busy = counters.claims_busy;
        self.reservation_takeovers = counters.takeovers;
        self.fenced_settles = counters.fenced_settles;
        self.leases_expired = counters.leases_expired;
    }
}

enum Command {
    Send {
        key: Option<Bytes>,
        payload: Bytes,
        deadline: Option<Duration>,
        /// The core's outcome; [`Channel::send_with`] turns its error into a [`SendError`].
        reply: oneshot::Sender<Result<driver::Done, crate::proto::link::SendError>>,
        /// The message's in-flight slot: the driver holds it until the outcome.
        permit: OwnedSemaphorePermit,
        /// A request: the outcome is its reply.
        request: bool,
    },
    Close {
        drain: bool,
        done: Option<oneshot::Sender<()>>,
    },
    Confirm {
        id: u64,
        outcome: crate::proto::ClaimOutcome,
    },
    /// The application took message `id` from [`Messages`].
    Took { id: u64 },
    /// The application received message `id`, which awaits its answer.
    Received { id: u64 },
    /// The application answered message `id`.
    Answer {
        id: u64,
        answer: crate::proto::Answer,
    },
    /// [`Messages`] was dropped.
    AppGone,
    /// The last [`Channel`] handle was dropped.
    HandlesDropped,
}

/// How one message is sent: an idempotency key and a deadline of its own. Pass it to
/// [`Channel::send_with`]; the default is no key and the channel's deadline
/// ([`SenderConfig::deadline`], 5 s unless configured).
///
/// ```
/// # use surelink::channel::{self, Channel, Config, Identity, Listener};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let identity = Identity::self_signed(["localhost"])?;
/// # let mut roots = surelink::rustls::RootCertStore::empty();
/// # roots.add(identity.cert_chain[0].clone())?;
/// # let server_config = channel::server_config(identity.cert_chain, identity.key)?;
/// # let endpoint = surelink::quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
/// # let addr = endpoint.local_addr()?;
/// # let mut listener = Listener::new(endpoint, Config::default());
/// # let client = surelink::quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
/// # let client_config = Some(channel::client_config(roots)?);
/// # let (channel, _) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
/// # let (_, mut messages) = listener.accept().await.expect("a channel");
/// # let server = tokio::spawn(async move { while messages.recv().await.is_some() {} });
/// use std::time::Duration;
/// use surelink::channel::SendOptions;
///
/// let options = SendOptions::default()
///     .key("order-7731/capture") // at most one delivery per key, however often retried
///     .deadline(Duration::from_millis(800)); // this payment's own deadline
/// match channel.send_with("capture 12.50 EUR", options).await {
///     Ok(receipt) => println!("delivered as message {} in {:?}", receipt.id, receipt.latency),
///     Err(e) if e.may_have_been_delivered() => println!("unknown outcome: retry with the same key"),
///     Err(e) => println!("not delivered: {e}"),
/// }
/// # channel.close().await;
/// # server.await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct SendOptions {
    key: Option<Bytes>,
    deadline: Option<Duration>,
}

impl SendOptions {
    /// The application's idempotency key (1 to 255 bytes): the peer delivers at most one
    /// message per key within its key TTL ([`ReceiverConfig::key_ttl`], 24 h by default),
    /// however often the application retries. A retry of a message that was delivered is
    /// acked without being delivered again. Keys must be unique across the application's
    /// clients (a UUID, or a merchant id and order number). Default: no key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// This message's own deadline, instead of the channel's ([`SenderConfig::deadline`]):
    /// shorter or longer (a terminal's authorization may wait 40-60 s; the receiver's hole
    /// TTL, 30 s by default, does not make a longer one unsafe: an id its floor passed is
    /// never acked, only refused). When it passes without an ack (for a request: without
    /// its reply) the send fails with [`SendError::Timeout`] (or `NoReply`; outcome
    /// unknown), and its in-flight slot is freed. Default: the channel's.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// What every clone of a [`Channel`] shares; dropping the last tells the driver.
struct Handle {
    id: ChannelId,
    commands: mpsc::UnboundedSender<Command>,
    permits: Arc<Semaphore>,
    stats: Arc<Mutex<ChannelStats>>,
    /// The connection in use, for its byte counters and peer identity.
    current: Arc<Mutex<Option<quinn::Connection>>>,
    max_message_size: usize,
    /// Whose keys the peer sends ([`Channel::key_scope`]).
    key_scope: crate::proto::Scope,
    /// The protocol version ([`Channel::protocol`]).
    protocol: u8,
}

/// Never the channel id: it is a bearer token (without mutual TLS it is all a client needs to
/// reattach), so `{:?}` shows only the short hashed tag the logs use.
impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("tag", &driver::tag(&self.id))
            .field("protocol", &self.protocol)
            .field("max_message_size", &self.max_message_size)
            .finish_non_exhaustive()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::HandlesDropped);
    }
}

/// The sending side of a channel; cheap to clone, and every clone sends on the same
/// channel (concurrent sends are the normal case: up to [`SenderConfig::max_in_flight`]
/// await their outcomes at once).
///
/// Get one from [`Channel::connect`] (a client), a [`Listener`] or [`Server`] (a server), or
/// [`Channel::open`] (a connection you already have), with the channel's [`Messages`].
/// When every clone and the `Messages` are dropped, the channel ends (after the sends in
/// flight have their outcomes) and closes its connection with a goodbye.
///
/// ```
/// # use surelink::channel::{self, Channel, Config, Identity, Listener};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let identity = Identity::self_signed(["localhost"])?;
/// # let mut roots = surelink::rustls::RootCertStore::empty();
/// # roots.add(identity.cert_chain[0].clone())?;
/// # let server_config = channel::server_config(identity.cert_chain, identity.key)?;
/// # let endpoint = surelink::quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
/// # let addr = endpoint.local_addr()?;
/// # let mut listener = Listener::new(endpoint, Config::default());
/// # let client = surelink::quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
/// # let client_config = Some(channel::client_config(roots)?);
/// # let (channel, _) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
/// # let (_, mut messages) = listener.accept().await.expect("a channel");
/// # let server = tokio::spawn(async move { while messages.recv().await.is_some() {} });
/// // Payments from many tasks share one channel.
/// let mut sends = tokio::task::JoinSet::new();
/// for n in 0..10 {
///     let channel = channel.clone();
///     sends.spawn(async move {
///         channel.send_with_key(format!("till-7/{n}"), format!("payment {n}")).await
///     });
/// }
/// while let Some(outcome) = sends.join_next().await {
///     let receipt = outcome??;
///     assert!(receipt.latency < std::time::Duration::from_secs(5));
/// }
/// assert_eq!(channel.stats().sender.acked, 10);
/// # channel.close().await;
/// # server.await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Channel {
    inner: Arc<Handle>,
}

/// The receiving side of a channel: messages delivered by the peer, each once, in order of
/// arrival. Dropping it tells the channel that nobody takes messages any more (see
/// [`Messages::recv`]).
///
/// A message is acked to its sender only when [`Messages::recv`] returns it, so a sender's
/// `Ok(Receipt)` means this application took it. The queue is bounded
/// ([`ReceiverConfig::max_queued_bytes`]): an application that stops reading slows its
/// senders rather than growing memory.
///
/// ```
/// # use surelink::channel::{self, Channel, Config, Identity, Listener};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let identity = Identity::self_signed(["localhost"])?;
/// # let mut roots = surelink::rustls::RootCertStore::empty();
/// # roots.add(identity.cert_chain[0].clone())?;
/// # let server_config = channel::server_config(identity.cert_chain, identity.key)?;
/// # let endpoint = surelink::quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
/// # let addr = endpoint.local_addr()?;
/// # let mut listener = Listener::new(endpoint, Config::default());
/// # let client = surelink::quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
/// # let client_config = Some(channel::client_config(roots)?);
/// # let (channel, _) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
/// # let sender = tokio::spawn(async move {
/// #     channel.send_with_key("order-1", "pay 10.00 EUR").await.unwrap();
/// #     channel.close().await;
/// # });
/// // A server's channel: it only receives, so the sending half can go.
/// let (_channel, mut messages) = listener.accept().await.expect("a channel");
/// while let Some(message) = messages.recv().await {
///     // `message.id` is unique per channel; `message.key` is the sender's idempotency key.
///     assert_eq!(message.key.as_deref(), Some(&b"order-1"[..]));
///     assert_eq!(message.payload, "pay 10.00 EUR");
/// }
/// // `None`: the client closed the channel and every message was taken.
/// # sender.await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Messages {
    rx: mpsc::UnboundedReceiver<Delivered>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Messages {
    /// The next message, or `None` once the channel has stopped and every message was taken.
    /// Cancel-safe: a message is taken (and reported taken, which acks it) only when this
    /// returns it.
    ///
    /// A message that awaits its answer ([`Delivered::awaits_answer`]: a request, or any
    /// message with [`Config::explicit_ack`]) is acked only by that answer.
    pub async fn recv(&mut self) -> Option<Delivered> {
        let message = self.rx.recv().await?;
        let id = message.id;
        let _ = self.commands.send(match message.awaits_answer() {
            true => Command::Received { id },
            false => Command::Took { id },
        });
        Some(message)
    }
}

impl Drop for Messages {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::AppGone);
    }
}

impl Channel {
    /// Runs a channel over `connection`, which must have DATAGRAM frames enabled (quinn's
    /// default). Both ends call this; each end can send and receive. The channel ends with
    /// the connection (no reconnects: see [`Channel::connect`]). Must be called inside a
    /// tokio runtime.
    ///
    /// ```
    /// use surelink::channel::{self, Channel, Config, Identity};
    /// use surelink::quinn::Endpoint;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let identity = Identity::self_signed(["localhost"])?;
    /// let mut roots = surelink::rustls::RootCertStore::empty();
    /// roots.add(identity.cert_chain[0].clone())?;
    /// let server_config = channel::server_config(identity.cert_chain, identity.key)?;
    /// let server = Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    /// let mut client = Endpoint::client("127.0.0.1:0".parse()?)?;
    /// client.set_default_client_config(channel::client_config(roots)?);
    ///
    /// // Connections the application made itself (surelink's configs, so the ALPN matches).
    /// let connecting = client.connect(server.local_addr()?, "localhost")?;
    /// let incoming = server.accept().await.expect("a connection");
    /// let (client_conn, server_conn) = tokio::try_join!(connecting, incoming)?;
    ///
    /// let (a, _) = Channel::open(client_conn, Config::default())?;
    /// let (_, mut b) = Channel::open(server_conn, Config::default())?;
    /// let (receipt, message) = tokio::join!(a.send("hello"), b.recv());
    /// assert_eq!(message.expect("a message").payload, "hello");
    /// assert_eq!(receipt?.id, 0);
    /// # Ok(())
    /// # }
    /// ```
    pub fn open(
        connection: quinn::Connection,
        config: Config,
    ) -> Result<(Channel, Messages), SendError> {
        driver::spawn(
            connection,
            config,
            rand::random(),
            driver::Reattach::Never,
            0,
            None,
        )
        .map_err(SendError::from)
    }

    /// This channel's id. It names the channel to the server: keep it secret (the server
    /// also checks, under mutual TLS, that a reconnecting client is the same one).
    pub fn id(&self) -> ChannelId {
        self.inner.id
    }

    /// Whose idempotency keys the peer sends on this channel, the client of its claims
    /// ([`Claim::client`](crate::store::Claim::client)): on a server (the accepting end of
    /// the connection), the SHA-256 of the client's end-entity certificate under mutual TLS;
    /// otherwise, and on a client, [`ANONYMOUS`](crate::proto::ANONYMOUS) (every client
    /// without a certificate shares one key namespace).
    pub fn key_scope(&self) -> [u8; 32] {
        self.inner.key_scope
    }

    /// The protocol version this channel speaks, negotiated over ALPN by its first
    /// connection: `2` ([`ALPN_V2`]) or `1` ([`ALPN`], a peer of an older version). A channel
    /// keeps it for its life, across reconnects and failovers. A connection with neither
    /// ALPN id ([`Channel::open`] over an application's own connection) speaks 2.
    pub fn protocol(&self) -> u8 {
        self.inner.protocol
    }

    /// Sends `payload` and waits for its outcome. Waits first while `max_in_flight` messages
    /// are awaiting theirs (backpressure, not an unbounded queue).
    ///
    /// Cancel-safe in the sense a payment needs: once the message was handed to the channel,
    /// dropping this future (e.g. under `tokio::time::timeout`) does not cancel it. It keeps
    /// its in-flight slot until its outcome, which is still counted (`stats().sender`,
    /// `stats().sends_abandoned`); retry it with the same idempotency key to learn it.
    ///
    /// Without a key, a retry after an unknown outcome
    /// ([`SendError::may_have_been_delivered`]) may deliver the payment twice: payments
    /// should go through [`Channel::send_with_key`] or [`Channel::send_with`].
    pub async fn send(&self, payload: impl Into<Bytes>) -> Result<Receipt, SendError> {
        self.send_with(payload, SendOptions::default()).await
    }

    /// Like [`Channel::send`], with the application's idempotency key (1 to 255 bytes): the
    /// peer delivers at most one message per key within its key TTL (default 24 h), however
    /// often the application retries. A retry of a message that was delivered is acked
    /// without being delivered again.
    ///
    /// ```
    /// # use surelink::channel::{self, Channel, Config, Identity, Listener};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let identity = Identity::self_signed(["localhost"])?;
    /// # let mut roots = surelink::rustls::RootCertStore::empty();
    /// # roots.add(identity.cert_chain[0].clone())?;
    /// # let server_config = channel::server_config(identity.cert_chain, identity.key)?;
    /// # let endpoint = surelink::quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    /// # let addr = endpoint.local_addr()?;
    /// # let mut listener = Listener::new(endpoint, Config::default());
    /// # let client = surelink::quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    /// # let client_config = Some(channel::client_config(roots)?);
    /// # let (channel, _) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
    /// # let (_, mut messages) = listener.accept().await.expect("a channel");
    /// # let server = tokio::spawn(async move {
    /// #     let mut delivered = 0;
    /// #     while messages.recv().await.is_some() { delivered += 1; }
    /// #     delivered
    /// # });
    /// let first = channel.send_with_key("order-42", "pay 99.00 EUR").await?;
    /// // The application did not hear the outcome (say it crashed) and retries: the
    /// // receiver recognises the key, acks again, and does not deliver it twice.
    /// let retry = channel.send_with_key("order-42", "pay 99.00 EUR").await?;
    /// assert_ne!(first.id, retry.id);
    /// # channel.close().await;
    /// assert_eq!(server.await?, 1); // the server's application saw one payment
    /// # Ok(())
    /// # }
    /// ```
    pub async fn send_with_key(
        &self,
        key: impl Into<Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<Receipt, SendError> {
        self.send_with(payload, SendOptions::default().key(key))
            .await
    }

    /// Like [`Channel::send`], with per-send options: an idempotency key and a deadline of
    /// its own ([`SendOptions`], which has an example).
    pub async fn send_with(
        &self,
        payload: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<Receipt, SendError> {
        let payload = payload.into();
        let span = tracing::debug_span!(
            "surelink.send",
            len = payload.len(),
            keyed = options.key.is_some(),
            id = tracing::field::Empty
        );
        let result =
            tracing::Instrument::instrument(self.submit(payload, options), span.clone()).await;
        let _entered = span.enter();
        match &result {
            Ok(r) => {
                span.record("id", r.id);
                tracing::debug!(latency = ?r.latency, shards = r.shards_sent, hedges = r.hedges, "acked");
            }
            Err(e) => tracing::debug!(error = %e, "no receipt"),
        }
        result
    }

    async fn submit(&self, payload: Bytes, options: SendOptions) -> Result<Receipt, SendError> {
        match self.submit_as(payload, options, false).await? {
            driver::Done::Sent(receipt) => Ok(receipt),
            // A send is never answered with a reply.
            driver::Done::Replied(_) => Err(SendError::Closed),
        }
    }

    /// Sends `payload` as a request (protocol 2) and waits for the peer application's reply
    /// ([`Delivered::reply`]), within the channel's deadline ([`SenderConfig::deadline`]).
    ///
    /// Every request ends in one of three outcomes:
    /// - its [`Reply`];
    /// - a definite "not processed" ([`RequestError::may_have_been_delivered`] is `false`:
    ///   refused, declined by the application with [`Delivered::nack`], or never sent);
    /// - unknown ([`may_have_been_delivered`](RequestError::may_have_been_delivered) is
    ///   `true`: no ack or no reply before the deadline, the connection lost). Retry with the
    ///   same idempotency key ([`Channel::request_with`]): the peer never processes a keyed
    ///   request twice, and answers a retry of one it processed with the **same reply**, byte
    ///   for byte, which it keeps with the key for the key's lifetime. A retry that arrives
    ///   while the first is still being processed waits (it is neither delivered nor
    ///   answered) until the first's reply exists, and then gets it.
    ///
    /// Cancel-safe like [`Channel::send`]: a dropped request keeps its slot until its
    /// outcome. A request travels on the datagram path only (at most
    /// [`Config::stream_threshold`] bytes with its key), and only to a peer of protocol 2
    /// ([`Channel::protocol`]); otherwise it fails at once, nothing sent.
    ///
    /// ```
    /// # use surelink::channel::{self, Channel, Config, Identity, Listener, SendOptions};
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let identity = Identity::self_signed(["localhost"])?;
    /// # let mut roots = surelink::rustls::RootCertStore::empty();
    /// # roots.add(identity.cert_chain[0].clone())?;
    /// # let server_config = channel::server_config(identity.cert_chain, identity.key)?;
    /// # let endpoint = surelink::quinn::Endpoint::server(server_config, "127.0.0.1:0".parse()?)?;
    /// # let addr = endpoint.local_addr()?;
    /// # let mut listener = Listener::new(endpoint, Config::default());
    /// # let client = surelink::quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    /// # let client_config = Some(channel::client_config(roots)?);
    /// # let (channel, _messages) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
    /// # let (_, mut messages) = listener.accept().await.expect("a channel");
    /// // The host: answers each authorization request.
    /// let host = tokio::spawn(async move {
    ///     while let Some(request) = messages.recv().await {
    ///         let approved = request.payload.starts_with(b"auth");
    ///         request.reply(if approved { "approved" } else { "declined" })?;
    ///     }
    ///     Ok::<_, surelink::channel::AnswerError>(())
    /// });
    /// // The terminal: one request, retried under its key while the outcome is unknown.
    /// let options = SendOptions::default().key("till-7/auth-0042");
    /// let reply = loop {
    ///     match channel.request_with("auth 25.00 EUR", options.clone()).await {
    ///         Ok(reply) => break reply,
    ///         Err(e) if e.may_have_been_delivered() => continue, // same key: never twice
    ///         Err(e) => return Err(e.into()),
    ///     }
    /// };
    /// assert_eq!(reply.payload, "approved");
    /// # channel.close().await;
    /// # host.await??;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn request(&self, payload: impl Into<Bytes>) -> Result<Reply, RequestError> {
        self.request_with(payload, SendOptions::default()).await
    }

    /// Like [`Channel::request`], with per-request options: an idempotency key (strongly
    /// advised: without one a retry may be processed twice) and a deadline of its own for
    /// the whole round trip ([`SendOptions`]).
    pub async fn request_with(
        &self,
        payload: impl Into<Bytes>,
        options: SendOptions,
    ) -> Result<Reply, RequestError> {
        let payload = payload.into();
        let span = tracing::debug_span!(
            "surelink.request",
            len = payload.len(),
            keyed = options.key.is_some(),
        );
        let result =
            tracing::Instrument::instrument(self.submit_as(payload, options, true), span).await;
        match result? {
            driver::Done::Replied(reply) => Ok(reply),
            // A request is never completed with a receipt alone.
            driver::Done::Sent(receipt) => Err(SendError::NoReply { id: receipt.id }),
        }
    }

    async fn submit_as(
        &self,
        payload: Bytes,
        options: SendOptions,
        request: bool,
    ) -> Result<driver::Done, SendError> {
        let SendOptions { key, deadline } = options;
        let len = payload.len() + key.as_ref().map_or(0, Bytes::len);
        let max = self.inner.max_message_size;
        if len > max {
            return Err(SendError::TooLarge { len, max });
        }
        let permit = self
            .inner
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| SendError::Closed)?;
        let (reply, outcome) = oneshot::channel();
        // From here on the driver owns the message and its slot.
        self.inner
            .commands
            .send(Command::Send {
                key,
                payload,
                deadline,
                reply,
                permit,
                request,
            })
            .map_err(|_| SendError::Closed)?;
        match outcome.await {
            Ok(outcome) => outcome.map_err(SendError::from),
            Err(_) => Err(SendError::Closed),
        }
    }

    /// Inbox pattern ([`Config::application_claims`]): the application's transaction for
    /// message `id` ended with its claim made (`Claimed::Now`, committed) or found already
    /// made (`Claimed::Before`: another replica or an earlier delivery handled it): the
    /// message is acked now. `Claimed::Conflict` (its key was claimed with another payload;
    /// the application rolled back): the message is refused, and its sender learns
    /// `SendError::KeyReused`. `Claimed::Busy` (the message's reservation was taken over by
    /// another replica, which delivers it; the application rolled back): it stays unacked
    /// here, like [`Channel::release`].
    ///
    /// Claim with [`Claim::of`](crate::store::Claim::of)`(channel.id(), &message)`
    /// `.with_client(channel.key_scope())`, so that keys are the client's own under mutual
    /// TLS.
    pub fn confirm(&self, id: u64, claimed: crate::store::Claimed) {
        let outcome = match claimed {
            crate::store::Claimed::Now => crate::proto::ClaimOutcome::Now,
            crate::store::Claimed::Before => crate::proto::ClaimOutcome::Before,
            crate::store::Claimed::Conflict => crate::proto::ClaimOutcome::Conflict,
            // Taken over by another replica (or held by one): not this one's to ack.
            crate::store::Claimed::Busy => crate::proto::ClaimOutcome::Failed,
        };
        let _ = self.inner.commands.send(Command::Confirm { id, outcome });
    }

    /// Inbox pattern: the application's transaction for message `id` rolled back. The
    /// message stays unacked: its sender retries (a copy may be delivered again) or learns an
    /// unknown outcome.
    pub fn release(&self, id: u64) {
        let _ = self.inner.commands.send(Command::Confirm {
            id,
            outcome: crate::proto::ClaimOutcome::Failed,
        });
    }

    /// Closes the channel in order: new sends fail with [`SendError::Closed`], sends in
    /// flight get their outcomes (each within its deadline), then the connection closes with
    /// a goodbye ([`GOODBYE`]), on which the peer ends its state for this channel at once.
    /// Returns once the connection is closed.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        let command = Command::Close {
            drain: true,
            done: Some(done),
        };
        if self.inner.commands.send(command).is_ok() {
            let _ = closed.await;
        }
    }

    /// Completes once the channel has stopped, whatever stopped it: [`Channel::close`] or
    /// [`Channel::abort`], the peer's goodbye, a refusal, every handle dropped, or a client
    /// that gave up reconnecting ([`Reconnect::give_up_after`]). A long-lived terminal can
    /// wait on it (in a `select!` beside its work) and open a new channel, instead of
    /// learning it from a send's [`SendError::Closed`]. Sends fail with `Closed` from the
    /// moment the channel's connections closed; this completes when its last message was
    /// handed over or given up too. Cancel-safe.
    pub async fn closed(&self) {
        // The driver holds the receiving end of the commands until it stops.
        self.inner.commands.closed().await
    }

    /// Whether the channel has stopped (see [`Channel::closed`]).
    pub fn is_closed(&self) -> bool {
        self.inner.commands.is_closed()
    }

    /// Closes the channel and its connection now, without draining: messages still in
    /// flight fail with [`SendError::ConnectionLost`] (their outcome is unknown).
    pub fn abort(&self) {
        let _ = self.inner.commands.send(Command::Close {
            drain: false,
            done: None,
        });
    }

    /// The certificate chain the peer presented in the TLS handshake (end entity first), on
    /// the connection in use: the server's on a client; on a server, the client's when the
    /// server requires client certificates ([`server_config_mtls`]), otherwise `None`. `None`
    /// too while the channel has no connection.
    pub fn peer_identity(&self) -> Option<Vec<rustls::pki_types::CertificateDer<'static>>> {
        let current = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        current
            .as_ref()?
            .peer_identity()?
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .ok()
            .map(|chain| *chain)
    }

    /// Counters, as of the driver's last step (UDP bytes as of now).
    pub fn stats(&self) -> ChannelStats {
        let mut st = self
            .inner
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let current = self.inner.current.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = current.as_ref() {
            let s = c.stats();
            st.udp_bytes_sent += s.udp_tx.bytes;
            st.udp_bytes_received += s.udp_rx.bytes;
        }
        st
    }
}
