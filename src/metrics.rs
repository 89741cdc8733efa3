//! Operations: the metrics every channel records, and the spans and log events it emits.
//!
//! # Metrics
//!
//! surelink records counters, gauges and a histogram through the [`metrics`] facade. Until
//! the application installs a recorder every call is a no-op (a handle that does nothing);
//! which exporter runs (Prometheus, StatsD, OpenTelemetry, …) is the application's choice.
//! Install it before opening channels: a channel registers its series when it starts, so
//! one opened earlier records nothing. With Prometheus (`metrics-exporter-prometheus`), as
//! `payment_server --metrics ADDR` does:
//!
//! ```no_run
//! use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let addr: std::net::SocketAddr = "127.0.0.1:9464".parse()?;
//! PrometheusBuilder::new()
//!     .with_http_listener(addr) // Prometheus text at http://127.0.0.1:9464/metrics
//!     .set_buckets_for_metric(
//!         Matcher::Full(surelink::metrics::SEND_LATENCY.into()),
//!         surelink::metrics::LATENCY_BUCKETS,
//!     )?
//!     .install()?;
//! // Channels and servers opened from here on record into it.
//! # Ok(())
//! # }
//! ```
//!
//! Every channel records into the same series, summed over the process: a server's series
//! are its figures over all its channels. Every series a channel records carries the label
//! `role`: `client` (a channel from [`Channel::connect`] or [`Channel::connect_replicas`]),
//! `server` (one accepted by a [`Listener`] or [`Server`]) or `plain` (one from
//! [`Channel::open`]), so a process that is both a client and a server keeps the two apart.
//!
//! There is no per-channel label: a server holds up to `Config::max_channels` channels and a
//! channel's id is a bearer token (never exported, never logged), so a label per channel
//! would be unbounded and meaningless to an operator. Per-channel figures are in
//! [`Channel::stats`]; an application that wants them as series exports them with labels of
//! its own (a terminal or merchant id it knows). Every counter below moves with one field of
//! [`ChannelStats`] (named in the table), so summed over the process's channels the series
//! equal what `stats()` says, once each channel's driver has taken its last step.
//!
//! [`Channel::connect`]: crate::channel::Channel::connect
//! [`Channel::connect_replicas`]: crate::channel::Channel::connect_replicas
//! [`Channel::open`]: crate::channel::Channel::open
//! [`Channel::stats`]: crate::channel::Channel::stats
//! [`Listener`]: crate::channel::Listener
//! [`Server`]: crate::channel::Server
//!
//! Counters recorded from `ChannelStats` are updated at each step of a channel's driver;
//! outcomes, latency and deliveries as they happen; wire bytes and the loss estimate once a
//! second per channel and when it ends.
//!
//! ## Sending
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `surelink_messages_sent_total` | counter | `role` | messages given an id and sent, on either path (`stats().sender.messages_sent`) |
//! | `surelink_messages_acked_total` | counter | `role` | sends whose outcome was `Ok(Receipt)`: the peer's application took the message (or a replica claimed it) |
//! | `surelink_messages_failed_total` | counter | `role`, `reason` | sends whose outcome was an error, by `reason`: `deadline` (no ack within the deadline; outcome unknown), `connection_lost` (outcome unknown), `peer_lost_state` (the server came back without the channel's state; outcome unknown), `refused` (the peer refused it; not delivered), `rejected` (refused before sending: bad key, backpressure, cannot be coded), `too_large`, `key_reused` (its key was delivered before with another payload; not delivered), `datagrams_unsupported`, `closed` (the channel was closing), `declined` (the peer's application declined it), `no_reply` (a request processed, its reply not in time), `requests_unsupported` |
//! | `surelink_send_latency_seconds` | histogram | `role` | from `send` to the ack, of every acked send (`Receipt::latency`) |
//! | `surelink_in_flight` | gauge | `role` | messages sent and awaiting their outcome, over the open channels (`stats().in_flight`) |
//! | `surelink_loss_estimate` | gauge | `role` | mean over the open channels of the per-shard loss rate each plans its redundancy for (`stats().loss_estimate`: a prior and an upper confidence bound, so it reads 2–3% on a clean path: plan, not measurement) |
//! | `surelink_loss_observed` | gauge | `role` | mean over the channels that measured it of the per-shard loss they measured (`stats().loss_observed`): alert on this one |
//!
//! Every send that reached a channel gets exactly one outcome, so `acked + failed` counts
//! them all (a `send` refused by the handle itself, before the channel saw it, as too large
//! or on a channel already stopped, is not counted). `sent` counts only messages that got an
//! id, so it excludes the `rejected`, `too_large` and `closed` failures.
//!
//! ## Redundancy spent
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `surelink_shards_sent_total` | counter | `role` | shard frames sent, of every kind (`stats().sender.shards_sent`) |
//! | `surelink_data_shards_sent_total` | counter | `role` | data shards of first flights (`sender.data_shards`) |
//! | `surelink_repair_shards_sent_total` | counter | `role` | parity shards of first flights (`sender.repair_shards`) |
//! | `surelink_shard_bytes_sent_total` | counter | `role`, `kind` | bytes of shard frames: `kind="first_flight"` (`sender.first_flight_bytes`), `"hedge"` (`sender.hedge_bytes`), `"retransmit"` (`sender.retransmit_bytes`) |
//! | `surelink_hedges_total` | counter | `role` | first hedges fired (fresh repair at the round trip's p95; `sender.hedges_fired`) |
//! | `surelink_hedges_skipped_total` | counter | `role` | first hedges skipped because the hedge budget was spent (`sender.hedges_skipped`) |
//! | `surelink_retransmits_total` | counter | `role` | later resends of blocks still unacked (`sender.retransmits`) |
//! | `surelink_hedges_to_secondary_total` | counter | `role` | hedges that sent a whole copy to a secondary replica (`sender.hedges_to_secondary`) |
//! | `surelink_stream_messages_sent_total` | counter | `role` | messages sent on streams (the large-message path; `stream_messages_sent`) |
//! | `surelink_udp_bytes_sent_total` | counter | `role` | UDP bytes sent over every connection of the channels, QUIC overhead included (`udp_bytes_sent`) |
//! | `surelink_udp_bytes_received_total` | counter | `role` | UDP bytes received (`udp_bytes_received`) |
//!
//! The redundancy ratio is `surelink_shards_sent_total / surelink_data_shards_sent_total`
//! (1 would be no redundancy at all); the parity planned up front is
//! `repair_shards / data_shards`; what loss added later is the hedge and retransmit bytes
//! against the first flights'.
//!
//! ## Receiving
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `surelink_messages_delivered_total` | counter | `role` | messages handed to the application's `Messages`, each message once (on a server: what its application received) |
//! | `surelink_shards_received_total` | counter | `role` | distinct shard frames received (`receiver.shards_received`) |
//! | `surelink_blocks_rebuilt_total` | counter | `role` | blocks finished with parity, without waiting for a resend (`reassembly.blocks_rebuilt`) |
//! | `surelink_duplicates_suppressed_total` | counter | `role`, `kind` | copies acked and not delivered again: `kind="id"` (a message id delivered before; `receiver.duplicates_suppressed`), `"key"` (an idempotency key delivered before under another id; `receiver.duplicate_keys`), `"key_elsewhere"` (a key delivered by another channel of the same server; `duplicate_keys_elsewhere`), `"claimed_before"` (the claims store had it; `receiver.claimed_before`) |
//! | `surelink_messages_refused_total` | counter | `role`, `reason` | messages refused (a REFUSE to the sender, never delivered), by `reason`: `malformed` (envelope), `out_of_window`, `keys_full`, `block` (code above the limits), `closed` (the application was gone), `passed` (the floor passed the id before it was delivered), `key_reused` (its key was delivered with another payload) (`receiver.refused`) |
//! | `surelink_invalid_frames_total` | counter | `role`, `reason` | input that broke the wire format: every datagram or stream message that did not decode, by the decoder's reason (`stats().invalid_frames`: `truncated`, `unknown_type`, `unsupported_version`, `index_out_of_range`, `trailing_bytes`, …, and `stream_too_long`, `stream_timeout`), and from reassembly `bad_checksum` (a block whose bytes failed their CRC; `reassembly.checksum_failures`), `contradicting_shard` (`reassembly.shards_contradicting`) and `malformed_shard` (`reassembly.shards_malformed`) |
//! | `surelink_claim_failures_total` | counter | `role` | claims the store failed to answer (retried; `receiver.claim_failures`) |
//! | `surelink_reservations_held` | gauge | `role` | messages reserved in the claims store and not yet settled, over the open channels (`stats().reservations_held`); other replicas hold copies of them back until their leases end |
//! | `surelink_reservations_busy_total` | counter | `role` | reservations answered busy: another replica held the message (`claims_busy`) |
//! | `surelink_reservation_takeovers_total` | counter | `role` | reservations taken over from a replica whose lease had ended: it died or was too slow (`reservation_takeovers`) |
//! | `surelink_settles_fenced_total` | counter | `role` | settles rejected because another replica had taken the reservation over; the message was not handed over here (`fenced_settles`) |
//! | `surelink_leases_expired_total` | counter | `role` | settles that came after their own lease had ended, nobody having taken it over (`leases_expired`) |
//!
//! ## Channels and connections
//!
//! | name | type | labels | meaning |
//! |---|---|---|---|
//! | `surelink_channels_open` | gauge | `role` | channels whose driver runs (on a server: the channels it holds, `Server::channels()`, a detached one waiting for its client included; a closing channel counts until its last hand-over, a moment after the server forgot it) |
//! | `surelink_connections_open` | gauge | `role` | QUIC connections the channels hold (a client's warm standby included) |
//! | `surelink_reconnects_total` | counter | `role` | connections a channel moved to after losing one (on a server: clients that came back; `reconnects`) |
//! | `surelink_failovers_total` | counter | `role` | of those, moves to another replica (`failovers`) |
//! | `surelink_takeovers_total` | counter | `role` | a reconnect that replaced a connection of the same channel still open (logged at warn) |
//! | `surelink_connections_refused_total` | counter | `reason` | connections a server refused, by `reason`: `tls` (the TLS handshake failed: no common ALPN, a client certificate refused), `handshake` (it failed otherwise or timed out), `connection_lost` (before its Hello), `hello_timeout`, `invalid_hello`, `too_many_channels`, `datagrams_unsupported`, `not_owner` (the channel belongs to another client identity), `shutting_down`, `store_unavailable` (the claims store could not say who owns a channel this server does not hold; closed with the goodbye code so the client tries again), `handshake_cap` (ignored: `Config::admission.max_handshakes` handshakes were in progress, or `max_handshakes_per_address` from its address), `filtered` (refused by `Listener::with_filter`) |
//! | `surelink_retries_sent_total` | counter | | QUIC Retries a `Listener` sent: unvalidated addresses while more than `Config::admission.retry_above` handshakes were in progress |
//! | `surelink_handshakes_in_progress` | gauge | | handshakes a `Listener` has started and not finished (at most `Config::admission.max_handshakes`; past it attempts are ignored, counted in `surelink_connections_refused_total` with reason `handshake_cap`) |
//! | `surelink_log_lines_suppressed_total` | counter | | failure log lines (refused handshakes and connections) not written because more than 5 came in a second; each line written says how many were suppressed before it (`suppressed`) |
//! | `surelink_replies_received_total` | counter | `role` | requests answered: their replies came back (protocol 2) |
//! | `surelink_send_errors_total` | counter | `role` | datagrams quinn refused to send (`send_errors`) |
//! | `surelink_sends_abandoned_total` | counter | `role` | sends whose caller stopped waiting before the outcome (`sends_abandoned`) |
//!
//! # Spans and log events
//!
//! Spans are named `surelink.<what>`: `surelink.channel` (a channel's driver task; fields
//! `tag`, a hash of the channel id that is safe to log, and `role`), `surelink.connect` (a
//! client's connection attempt), `surelink.accept` (a server reading a connection's Hello;
//! field `remote`), `surelink.send` (one send; fields `len`, `keyed`, `id`),
//! `surelink.deliver` (one delivery; `id`, `len`).
//!
//! Levels: `warn` for what an operator should look at (a connection refused for an invalid
//! Hello, another client identity, the channel limit or a failed TLS handshake; a channel
//! taken over by a second connection; the server lost a channel's state; a claim failed),
//! `info` for lifecycle events (a refusal while shutting down, a Hello that never came, a
//! failover), `debug` for each connection, send and delivery.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ::metrics::{Counter, Gauge, Histogram, Unit};

use crate::channel::{ChannelStats, Receipt, SendError};

/// Name of the send-latency histogram (seconds), for an exporter's bucket settings.
pub const SEND_LATENCY: &str = "surelink_send_latency_seconds";

/// Bucket bounds (seconds) for [`SEND_LATENCY`] when it is exported as a histogram: from a
/// loopback round trip to the default 10 s deadline.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A counter that follows one field of [`ChannelStats`].
struct Follow {
    name: &'static str,
    /// A second label besides `role`, fixed for this series.
    label: Option<(&'static str, &'static str)>,
    unit: Unit,
    help: &'static str,
    get: fn(&ChannelStats) -> u64,
}

const fn follow(
    name: &'static str,
    label: Option<(&'static str, &'static str)>,
    unit: Unit,
    help: &'static str,
    get: fn(&ChannelStats) -> u64,
) -> Follow {
    Follow {
        name,
        label,
        unit,
        help,
        get,
    }
}

const COUNT: Unit = Unit::Count;
const BYTES: Unit = Unit::Bytes;

/// Every counter that follows a field of [`ChannelStats`]. (The reassembly's counters start
/// again at each connection: a drop is a new connection, not a negative count.)
#[rustfmt::skip]
const FOLLOWED: &[Follow] = &[
    follow("surelink_messages_sent_total", None, COUNT, "Messages given an id and sent, on either path.", |s| s.sender.messages_sent),
    follow("surelink_shards_sent_total", None, COUNT, "Shard frames sent, of every kind.", |s| s.sender.shards_sent),
    follow("surelink_data_shards_sent_total", None, COUNT, "Data shards of first flights.", |s| s.sender.data_shards),
    follow("surelink_repair_shards_sent_total", None, COUNT, "Parity shards of first flights.", |s| s.sender.repair_shards),
    follow("surelink_shard_bytes_sent_total", Some(("kind", "first_flight")), BYTES, "Bytes of shard frames sent, by kind.", |s| s.sender.first_flight_bytes),
    follow("surelink_shard_bytes_sent_total", Some(("kind", "hedge")), BYTES, "Bytes of shard frames sent, by kind.", |s| s.sender.hedge_bytes),
    follow("surelink_shard_bytes_sent_total", Some(("kind", "retransmit")), BYTES, "Bytes of shard frames sent, by kind.", |s| s.sender.retransmit_bytes),
    follow("surelink_hedges_total", None, COUNT, "First hedges fired.", |s| s.sender.hedges_fired),
    follow("surelink_hedges_skipped_total", None, COUNT, "First hedges skipped because the hedge budget was spent.", |s| s.sender.hedges_skipped),
    follow("surelink_retransmits_total", None, COUNT, "Later resends of blocks still unacked.", |s| s.sender.retransmits),
    follow("surelink_hedges_to_secondary_total", None, COUNT, "Hedges that sent a whole copy to a secondary replica.", |s| s.sender.hedges_to_secondary),
    follow("surelink_stream_messages_sent_total", None, COUNT, "Messages sent on streams.", |s| s.stream_messages_sent),
    follow("surelink_shards_received_total", None, COUNT, "Distinct shard frames received.", |s| s.receiver.shards_received),
    follow("surelink_blocks_rebuilt_total", None, COUNT, "Blocks finished with parity, without waiting for a resend.", |s| s.reassembly.blocks_rebuilt),
    follow("surelink_duplicates_suppressed_total", Some(("kind", "id")), COUNT, "Copies acked and not delivered again, by kind.", |s| s.receiver.duplicates_suppressed),
    follow("surelink_duplicates_suppressed_total", Some(("kind", "key")), COUNT, "Copies acked and not delivered again, by kind.", |s| s.receiver.duplicate_keys),
    follow("surelink_duplicates_suppressed_total", Some(("kind", "key_elsewhere")), COUNT, "Copies acked and not delivered again, by kind.", |s| s.duplicate_keys_elsewhere),
    follow("surelink_duplicates_suppressed_total", Some(("kind", "claimed_before")), COUNT, "Copies acked and not delivered again, by kind.", |s| s.receiver.claimed_before),
    follow("surelink_messages_refused_total", Some(("reason", "malformed")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.malformed),
    follow("surelink_messages_refused_total", Some(("reason", "out_of_window")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.out_of_window),
    follow("surelink_messages_refused_total", Some(("reason", "keys_full")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.keys_full),
    follow("surelink_messages_refused_total", Some(("reason", "block")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.block),
    follow("surelink_messages_refused_total", Some(("reason", "closed")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.closed),
    follow("surelink_messages_refused_total", Some(("reason", "passed")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.passed),
    follow("surelink_messages_refused_total", Some(("reason", "key_reused")), COUNT, "Messages refused (never delivered), by reason.", |s| s.receiver.refused.key_reused),
    follow(INVALID_FRAMES, Some(("reason", "bad_checksum")), COUNT, INVALID_FRAMES_HELP, |s| s.reassembly.checksum_failures),
    follow(INVALID_FRAMES, Some(("reason", "contradicting_shard")), COUNT, INVALID_FRAMES_HELP, |s| s.reassembly.shards_contradicting),
    follow(INVALID_FRAMES, Some(("reason", "malformed_shard")), COUNT, INVALID_FRAMES_HELP, |s| s.reassembly.shards_malformed),
    follow("surelink_claim_failures_total", None, COUNT, "Claims the store failed to answer.", |s| s.receiver.claim_failures),
    follow("surelink_reservations_busy_total", None, COUNT, "Reservations answered busy: another replica held the message.", |s| s.claims_busy),
    follow("surelink_reservation_takeovers_total", None, COUNT, "Reservations taken over from a replica whose lease had ended.", |s| s.reservation_takeovers),
    follow("surelink_settles_fenced_total", None, COUNT, "Settles rejected: another replica had taken the reservation over.", |s| s.fenced_settles),
    follow("surelink_leases_expired_total", None, COUNT, "Settles that came after their own lease had ended.", |s| s.leases_expired),
    follow("surelink_reconnects_total", None, COUNT, "Connections a channel moved to after losing one.", |s| s.reconnects),
    follow("surelink_failovers_total", None, COUNT, "Moves to another replica after losing a connection.", |s| s.failovers),
    follow("surelink_send_errors_total", None, COUNT, "Datagrams quinn refused to send.", |s| s.send_errors),
    follow("surelink_sends_abandoned_total", None, COUNT, "Sends whose caller stopped waiting before the outcome.", |s| s.sends_abandoned),
];

const INVALID_FRAMES: &str = "surelink_invalid_frames_total";
const INVALID_FRAMES_HELP: &str = "Input that broke the wire format, by reason.";
const ACKED: &str = "surelink_messages_acked_total";
const REPLIES: &str = "surelink_replies_received_total";
const FAILED: &str = "surelink_messages_failed_total";
const DELIVERED: &str = "surelink_messages_delivered_total";
const IN_FLIGHT: &str = "surelink_in_flight";
const RESERVATIONS: &str = "surelink_reservations_held";
const LOSS: &str = "surelink_loss_estimate";
const LOSS_OBSERVED: &str = "surelink_loss_observed";
const UDP_SENT: &str = "surelink_udp_bytes_sent_total";
const UDP_RECEIVED: &str = "surelink_udp_bytes_received_total";
const CHANNELS: &str = "surelink_channels_open";
const CONNECTIONS: &str = "surelink_connections_open";
const TAKEOVERS: &str = "surelink_takeovers_total";
const REFUSED: &str = "surelink_connections_refused_total";
const RETRIES: &str = "surelink_retries_sent_total";
const HANDSHAKES: &str = "surelink_handshakes_in_progress";

/// Gives the installed recorder the unit and help text of every surelink metric (an
/// exporter prints them, e.g. Prometheus's `# HELP` lines). The first channel or server of
/// the process calls it; call it yourself after installing a recorder if one was created
/// before.
pub fn describe() {
    let mut last = "";
    for f in FOLLOWED {
        // Series of one name sit next to each other in the table.
        if f.name != last {
            ::metrics::describe_counter!(f.name, f.unit, f.help);
            last = f.name;
        }
    }
    let counters = [
        (REPLIES, "Requests answered: their replies came back."),
        (
            ACKED,
            "Sends acked: the peer's application took the message.",
        ),
        (FAILED, "Sends that failed, by reason."),
        (DELIVERED, "Messages handed to the application, each once."),
        (
            TAKEOVERS,
            "Reconnects that replaced a connection of the same channel still open.",
        ),
        (REFUSED, "Connections a server refused, by reason."),
        (
            RETRIES,
            "QUIC Retries a listener sent to validate addresses (Config::admission).",
        ),
        (
            LOG_LINES_SUPPRESSED,
            "Failure log lines suppressed by the rate limit (a few a second are written).",
        ),
        (INVALID_FRAMES, INVALID_FRAMES_HELP),
    ];
    for (name, help) in counters {
        ::metrics::describe_counter!(name, Unit::Count, help);
    }
    ::metrics::describe_counter!(
        UDP_SENT,
        Unit::Bytes,
        "UDP bytes sent, QUIC overhead included."
    );
    ::metrics::describe_counter!(UDP_RECEIVED, Unit::Bytes, "UDP bytes received.");
    ::metrics::describe_gauge!(CHANNELS, Unit::Count, "Channels whose driver runs.");
    ::metrics::describe_gauge!(
        CONNECTIONS,
        Unit::Count,
        "QUIC connections the channels hold."
    );
    ::metrics::describe_gauge!(IN_FLIGHT, Unit::Count, "Messages awaiting their outcome.");
    ::metrics::describe_gauge!(
        HANDSHAKES,
        Unit::Count,
        "Handshakes a listener started and has not finished."
    );
    ::metrics::describe_gauge!(
        RESERVATIONS,
        Unit::Count,
        "Messages reserved in the claims store and not yet settled."
    );
    ::metrics::describe_gauge!(
        LOSS,
        "Mean over the open channels of the per-shard loss rate they plan redundancy for."
    );
    ::metrics::describe_gauge!(
        LOSS_OBSERVED,
        "Mean over the channels that measured it of the per-shard loss rate they measured."
    );
    ::metrics::describe_histogram!(SEND_LATENCY, Unit::Seconds, "From send to the ack.");
}

/// [`describe`], once per process (channels and servers start often).
pub(crate) fn describe_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(describe);
}

/// The value of label `reason` for a failed send.
pub(crate) fn failure_reason(e: &SendError) -> &'static str {
    match e {
        SendError::Timeout { .. } => "deadline",
        SendError::ConnectionLost { reason } if reason == crate::proto::link::PEER_LOST_STATE => {
            "peer_lost_state"
        }
        SendError::ConnectionLost { .. } => "connection_lost",
        SendError::Rejected(_) => "rejected",
        SendError::TooLarge { .. } => "too_large",
        SendError::Refused { .. } => "refused",
        SendError::KeyReused { .. } => "key_reused",
        SendError::DatagramsUnsupported => "datagrams_unsupported",
        SendError::Closed => "closed",
        SendError::Declined { .. } => "declined",
        SendError::NoReply { .. } => "no_reply",
        SendError::RequestsUnsupported => "requests_unsupported",
    }
}

/// Failure log lines (refused handshakes and connections) a server writes per second at
/// most: a flood of failures is counted in full, and logged as a sample with how many lines
/// were suppressed before it.
pub const FAILURE_LOG_LINES_PER_SECOND: u32 = 5;

/// Counter: failure log lines suppressed by the rate limit ([`FAILURE_LOG_LINES_PER_SECOND`]).
pub const LOG_LINES_SUPPRESSED: &str = "surelink_log_lines_suppressed_total";

/// The rate limit on failure logs: `Some(suppressed)` when a line may be written now (with
/// how many were suppressed since the last one written), `None` when it is suppressed
/// (counted).
pub(crate) fn failure_log() -> Option<u64> {
    use std::sync::Mutex;
    use std::time::Instant;
    // (the current second's start, lines written in it, lines suppressed since the last one)
    static GATE: Mutex<Option<(Instant, u32, u64)>> = Mutex::new(None);
    let mut gate = GATE.lock().unwrap_or_else(|e| e.into_inner());
    let now = Instant::now();
    let (start, written, suppressed) = gate.get_or_insert((now, 0, 0));
    if now.saturating_duration_since(*start) >= std::time::Duration::from_secs(1) {
        *start = now;
        *written = 0;
    }
    if *written >= FAILURE_LOG_LINES_PER_SECOND {
        *suppressed += 1;
        ::metrics::counter!(LOG_LINES_SUPPRESSED).increment(1);
        return None;
    }
    *written += 1;
    Some(std::mem::take(suppressed))
}

/// Records, and logs, a QUIC handshake a server endpoint could not complete. A
/// [`Listener`](crate::channel::Listener) calls it for each; an application that accepts
/// connections itself (`quinn::Endpoint::accept`, then
/// [`Server::accept_connection`](crate::channel::Server::accept_connection), which records
/// its own refusals) calls it where awaiting a `quinn::Incoming` failed.
///
/// A TLS failure (no common ALPN protocol, a client certificate the server does not accept,
/// or one the client refused) is logged at `warn` and counted with reason `tls`; a
/// handshake that timed out or failed otherwise at `info`, reason `handshake`; at most
/// [`FAILURE_LOG_LINES_PER_SECOND`] lines a second with the other failure logs.
pub fn handshake_failed(remote: std::net::SocketAddr, error: &quinn::ConnectionError) {
    use quinn::ConnectionError as E;
    // RFC 9001 §4.8: a TLS alert travels as a transport error code 0x0100 + alert.
    let crypto = |code: u64| (0x100..0x200).contains(&code);
    let tls = match error {
        E::TransportError(e) => crypto(u64::from(e.code)),
        E::ConnectionClosed(c) => crypto(u64::from(c.error_code)),
        _ => false,
    };
    if let Some(suppressed) = failure_log() {
        if tls {
            tracing::warn!(%remote, %error, suppressed, "surelink: TLS handshake failed; connection refused");
        } else {
            tracing::info!(%remote, %error, suppressed, "surelink: handshake failed");
        }
    }
    let reason = if tls { "tls" } else { "handshake" };
    ::metrics::counter!(REFUSED, "reason" => reason).increment(1);
}

/// Records a [`Listener`](crate::channel::Listener)'s admission decision: Retries sent, and
/// the handshakes in progress.
pub(crate) fn admission(
    admit: crate::proto::admission::Admit,
    gate: &std::sync::Mutex<crate::proto::admission::Admission>,
) {
    if admit == crate::proto::admission::Admit::Retry {
        ::metrics::counter!(RETRIES).increment(1);
    }
    let in_progress = gate
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .stats()
        .in_progress;
    ::metrics::gauge!(HANDSHAKES).set(in_progress as f64);
}

/// A handshake a [`Listener`](crate::channel::Listener) admitted ended: its admission
/// makes room, and the gauge follows.
pub(crate) fn admission_ended(
    gate: &std::sync::Mutex<crate::proto::admission::Admission>,
    address: std::net::IpAddr,
) {
    let in_progress = {
        let mut gate = gate.lock().unwrap_or_else(|e| e.into_inner());
        gate.handshake_ended(address);
        gate.stats().in_progress
    };
    ::metrics::gauge!(HANDSHAKES).set(in_progress as f64);
}

/// Counts a connection a server refused (`reason` as in the module's table).
pub(crate) fn connection_refused(reason: &'static str) {
    ::metrics::counter!(REFUSED, "reason" => reason).increment(1);
}

/// The role labels, and the per-role mean of the loss estimate.
const ROLES: [&str; 3] = ["client", "server", "plain"];

fn role_index(role: &crate::proto::link::Role) -> usize {
    match role {
        crate::proto::link::Role::Client { .. } => 0,
        crate::proto::link::Role::Server => 1,
        crate::proto::link::Role::Plain => 2,
    }
}

/// Sum and count of the loss estimates of the open channels, per role.
static LOSS_SUMS: Mutex<[(f64, u64); 3]> = Mutex::new([(0.0, 0); 3]);
/// The same for the loss they measured (channels that have measured it).
static OBSERVED_SUMS: Mutex<[(f64, u64); 3]> = Mutex::new([(0.0, 0); 3]);

/// Moves one channel's share of a mean over the open channels (`sums`, per role) from
/// `*mine` to `value` (`None`: no share); the new mean if it changed.
fn move_share(
    sums: &Mutex<[(f64, u64); 3]>,
    role: usize,
    mine: &mut Option<f64>,
    value: Option<f64>,
) -> Option<f64> {
    if value == *mine {
        return None;
    }
    let mut sums = sums.lock().unwrap_or_else(|e| e.into_inner());
    let (sum, n) = &mut sums[role];
    if let Some(old) = *mine {
        *sum -= old;
        *n -= 1;
    }
    if let Some(new) = value {
        *sum += new;
        *n += 1;
    }
    *mine = value;
    Some(if *n == 0 {
        // No rounding left behind for the next channel.
        *sum = 0.0;
        0.0
    } else {
        *sum / *n as f64
    })
}

/// How often a channel refreshes its wire bytes and its share of the loss gauge.
const TICK: Duration = Duration::from_secs(1);

/// One channel's recording: handles registered when it starts, and the figures it last
/// recorded, so that each step records what changed since.
pub(crate) struct ChannelMetrics {
    role: usize,
    followed: Vec<Counter>,
    last: Vec<u64>,
    invalid: std::collections::BTreeMap<&'static str, u64>,
    acked: Counter,
    latency: Histogram,
    replies: Counter,
    delivered: Counter,
    in_flight: Gauge,
    last_in_flight: usize,
    reservations: Gauge,
    last_reservations: usize,
    udp: (Counter, Counter),
    last_udp: (u64, u64),
    channels: Gauge,
    connections: Gauge,
    open_connections: u64,
    /// This channel's share of [`LOSS_SUMS`], once it has one.
    loss: Option<f64>,
    /// Its share of [`OBSERVED_SUMS`], once it measured its loss.
    observed: Option<f64>,
    next_tick: Option<Instant>,
    closed: bool,
}

impl ChannelMetrics {
    /// Registers a new channel's series and counts it open.
    pub(crate) fn new(role: &crate::proto::link::Role) -> Self {
        describe_once();
        let role = role_index(role);
        let label = ROLES[role];
        let followed = FOLLOWED
            .iter()
            .map(|f| match f.label {
                None => ::metrics::counter!(f.name, "role" => label),
                Some((k, v)) => ::metrics::counter!(f.name, "role" => label, k => v),
            })
            .collect();
        let channels = ::metrics::gauge!(CHANNELS, "role" => label);
        channels.increment(1.0);
        ChannelMetrics {
            role,
            followed,
            last: vec![0; FOLLOWED.len()],
            invalid: Default::default(),
            acked: ::metrics::counter!(ACKED, "role" => label),
            latency: ::metrics::histogram!(SEND_LATENCY, "role" => label),
            replies: ::metrics::counter!(REPLIES, "role" => label),
            delivered: ::metrics::counter!(DELIVERED, "role" => label),
            in_flight: ::metrics::gauge!(IN_FLIGHT, "role" => label),
            last_in_flight: 0,
            reservations: ::metrics::gauge!(RESERVATIONS, "role" => label),
            last_reservations: 0,
            udp: (
                ::metrics::counter!(UDP_SENT, "role" => label),
                ::metrics::counter!(UDP_RECEIVED, "role" => label),
            ),
            last_udp: (0, 0),
            channels,
            connections: ::metrics::gauge!(CONNECTIONS, "role" => label),
            open_connections: 0,
            loss: None,
            observed: None,
            next_tick: None,
            closed: false,
        }
    }

    /// The channel's `role` label.
    pub(crate) fn role(&self) -> &'static str {
        ROLES[self.role]
    }

    /// A send's outcome.
    pub(crate) fn outcome(&self, outcome: &Result<Receipt, SendError>) {
        match outcome {
            Ok(receipt) => {
                self.acked.increment(1);
                self.latency.record(receipt.latency.as_secs_f64());
            }
            Err(e) => {
                let reason = failure_reason(e);
                ::metrics::counter!(FAILED, "role" => self.role(), "reason" => reason).increment(1);
            }
        }
    }

    /// A request's reply came back.
    pub(crate) fn replied(&self) {
        self.replies.increment(1);
    }

    /// A message handed to the application's `Messages`.
    pub(crate) fn delivered(&self) {
        self.delivered.increment(1);
    }

    /// A connection the channel now holds.
    pub(crate) fn connection_opened(&mut self) {
        self.open_connections += 1;
        self.connections.increment(1.0);
    }

    /// A connection the channel no longer holds.
    pub(crate) fn connection_closed(&mut self) {
        if self.open_connections > 0 {
            self.open_connections -= 1;
            self.connections.decrement(1.0);
        }
    }

    /// A reconnect replaced a connection of this channel that was still open.
    pub(crate) fn takeover(&self) {
        ::metrics::counter!(TAKEOVERS, "role" => self.role()).increment(1);
    }

    /// Records what changed since the last call in `stats` (the channel's, just published).
    /// Once a second it also asks `udp` for the bytes of every connection the channel used
    /// (closed ones included) and refreshes its share of the loss gauge.
    pub(crate) fn update(
        &mut self,
        now: Instant,
        stats: &ChannelStats,
        udp: impl FnOnce() -> (u64, u64),
    ) {
        if self.closed {
            return;
        }
        for ((f, counter), last) in FOLLOWED.iter().zip(&self.followed).zip(&mut self.last) {
            let value = (f.get)(stats);
            if value != *last {
                // Below the last value: the counter started again (a new connection's
                // reassembly), so all of it is new.
                counter.increment(value.checked_sub(*last).unwrap_or(value));
                *last = value;
            }
        }
        let invalid: u64 = stats.invalid_frames.values().sum();
        if invalid != self.invalid.values().sum::<u64>() {
            for (&reason, &n) in &stats.invalid_frames {
                let before = self.invalid.get(reason).copied().unwrap_or(0);
                if n != before {
                    // (Below: counted again from zero, as the reassembly's counters.)
                    ::metrics::counter!(INVALID_FRAMES, "role" => self.role(), "reason" => reason)
                        .increment(n.checked_sub(before).unwrap_or(n));
                }
            }
            self.invalid = stats.invalid_frames.clone();
        }
        if stats.in_flight != self.last_in_flight {
            self.in_flight.increment(stats.in_flight as f64);
            self.in_flight.decrement(self.last_in_flight as f64);
            self.last_in_flight = stats.in_flight;
        }
        if stats.reservations_held != self.last_reservations {
            self.reservations.increment(stats.reservations_held as f64);
            self.reservations.decrement(self.last_reservations as f64);
            self.last_reservations = stats.reservations_held;
        }
        if self.next_tick.is_none_or(|t| now >= t) {
            self.next_tick = Some(now + TICK);
            self.udp(udp());
            self.loss(Some(stats.loss_estimate), stats.loss_observed);
        }
    }

    fn udp(&mut self, (sent, received): (u64, u64)) {
        if sent > self.last_udp.0 {
            self.udp.0.increment(sent - self.last_udp.0);
            self.last_udp.0 = sent;
        }
        if received > self.last_udp.1 {
            self.udp.1.increment(received - self.last_udp.1);
            self.last_udp.1 = received;
        }
    }

    /// Moves this channel's shares of the loss gauges to `estimate` and `observed` (`None`:
    /// it leaves them, or has not measured yet).
    fn loss(&mut self, estimate: Option<f64>, observed: Option<f64>) {
        if let Some(mean) = move_share(&LOSS_SUMS, self.role, &mut self.loss, estimate) {
            ::metrics::gauge!(LOSS, "role" => self.role()).set(mean);
        }
        if let Some(mean) = move_share(&OBSERVED_SUMS, self.role, &mut self.observed, observed) {
            ::metrics::gauge!(LOSS_OBSERVED, "role" => self.role()).set(mean);
        }
    }

    /// The channel stopped: its last wire bytes (`udp`, every connection closed by now), and
    /// it leaves the gauges. Dropping it unclosed (a runtime shut down under the driver)
    /// leaves the gauges too.
    pub(crate) fn close(&mut self, udp: (u64, u64)) {
        if self.closed {
            return;
        }
        self.udp(udp);
        self.leave();
    }

    fn leave(&mut self) {
        self.closed = true;
        self.loss(None, None);
        self.in_flight.decrement(self.last_in_flight as f64);
        self.last_in_flight = 0;
        self.reservations.decrement(self.last_reservations as f64);
        self.last_reservations = 0;
        self.connections.decrement(self.open_connections as f64);
        self.open_connections = 0;
        self.channels.decrement(1.0);
    }
}

impl Drop for ChannelMetrics {
    fn drop(&mut self) {
        if !self.closed {
            self.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every metric is in the module's tables, by its exact name.
    #[test]
    fn every_metric_is_documented() {
        let docs: String = include_str!("metrics.rs")
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .collect();
        let mut names: Vec<&str> = FOLLOWED.iter().map(|f| f.name).collect();
        names.extend([
            ACKED,
            FAILED,
            DELIVERED,
            IN_FLIGHT,
            RESERVATIONS,
            LOSS,
            LOSS_OBSERVED,
            UDP_SENT,
            UDP_RECEIVED,
            CHANNELS,
            CONNECTIONS,
            TAKEOVERS,
            REFUSED,
            SEND_LATENCY,
        ]);
        for name in names {
            assert!(name.starts_with("surelink_"), "{name}");
            assert!(
                docs.contains(&format!("| `{name}` |")),
                "{name} is not documented"
            );
        }
    }

    #[test]
    fn failure_logs_are_rate_limited_and_say_what_they_suppressed() {
        // A flood: a few lines pass, the rest are suppressed and counted; the next second's
        // first line reports them.
        let passed: Vec<u64> = (0..1000).filter_map(|_| failure_log()).collect();
        // (Other tests of this process may log failures too: at most the limit passed.)
        assert!(
            passed.len() <= FAILURE_LOG_LINES_PER_SECOND as usize,
            "{} lines passed",
            passed.len()
        );
        std::thread::sleep(std::time::Duration::from_millis(1010));
        let next = failure_log().expect("a new second");
        assert!(
            next >= 1000 - passed.len() as u64,
            "reported {next} suppressed"
        );
    }

    #[test]
    fn failure_reasons() {
        assert_eq!(failure_reason(&SendError::Timeout { id: 1 }), "deadline");
        assert_eq!(failure_reason(&SendError::Closed), "closed");
        let lost = |reason: &str| SendError::ConnectionLost {
            reason: reason.into(),
        };
        assert_eq!(
            failure_reason(&lost(crate::proto::link::PEER_LOST_STATE)),
            "peer_lost_state"
        );
        assert_eq!(failure_reason(&lost("timed out")), "connection_lost");
    }
}
