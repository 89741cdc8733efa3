//! The sending side: ids, first flight, acks, hedges, deadlines.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::governor::Governor;
use super::repair::{RepairWindow, WindowConfig};
use super::rtt::RttEstimator;
use crate::fec::{Block, EncodeError, Encoder, EncoderConfig};
use crate::tune::{self, EstimatorConfig, LossEstimator, LossModel, Target, TunerConfig};
use crate::wire::{
    AckFrame, Envelope, FloorFrame, Frame, Kind, RefuseFrame, MAX_KEY_LEN, REFUSE_OUT_OF_WINDOW,
};

/// How many times the same FLOOR is sent without an ack showing the receiver caught up.
const FLOOR_REPEATS: u32 = 3;

/// Adaptive redundancy: the sender estimates the link's loss per shard from its acks
/// ([`LossEstimator`]) and plans each message's code from it ([`tune::plan`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AdaptiveConfig {
    /// What each first flight must achieve. Default: residual loss 0.5% (the p99 target of
    /// [`Target::for_quantile`]), no linger.
    pub target: Target,
    /// The planner's search bounds and costs.
    pub tuner: TunerConfig,
    /// The loss estimator's windows and prior.
    pub estimator: EstimatorConfig,
}

/// Messages `resend_gaps` looks at per ack, oldest first.
const GAP_SCAN: usize = 32;

/// Resends that leave at the same instant; more wait a `repair_spacing` per this many.
const RESEND_BURST: u32 = 16;

/// A message sent this much before one just acked, and not acked itself, was lost.
const GAP_SLACK: Duration = Duration::from_millis(10);

/// The longest deadline a message may have: a day (what payment APIs keep keys for; a
/// longer one is cut to it, and one near `Duration::MAX` cannot overflow the clock).
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// Shards judged by the loss estimate before window repairs are spent on it.
const MEASURED_SHARDS: u64 = 32;

/// Round-trip samples before the hedge delay trusts their percentile.
const YOUNG_SAMPLES: usize = 16;

/// Acked messages whose least latency is the round trip now (see `Sender::loss_guard`).
const RECENT_LATENCIES: usize = 8;

/// Plans cached per `(coded length, loss estimate in steps of 0.1%)`; bounded.
const PLAN_CACHE: usize = 64;

/// Settings of a [`Sender`].
#[derive(Clone, Debug, PartialEq)]
pub struct SenderConfig {
    /// The coder's settings (datagram size, message size limit, batching).
    pub encoder: EncoderConfig,
    /// Code small messages sent close together into one block ([`Encoder::push`], bounded by
    /// `encoder.batch`). Default off: each message is its own block, sent at once.
    pub batching: bool,
    /// Adaptive redundancy (the default): each message's data shards `k` and first-flight
    /// parity `m` come from the tuner, for the loss the sender measures. `None`: every block
    /// is coded as the encoder cuts it, with `first_flight_repair` parity shards.
    pub adaptive: Option<AdaptiveConfig>,
    /// Parity shards sent with every block's data shards when `adaptive` is `None`. Default 1.
    pub first_flight_repair: usize,
    /// Gap between consecutive shards of a first flight whose frames are small enough for two
    /// to share a packet (the j-th shard leaves `j × repair_spacing` after the first).
    /// quinn packs datagrams queued together into one packet, so without a gap one lost
    /// packet takes several shards of a block at once (measured over quinn: 1240 packets for
    /// 2137 shard datagrams), and the code's residual loss is not what the tuner computed.
    /// Zero sends everything at once. Default 1 ms.
    pub repair_spacing: Duration,
    /// Quantile of the ack round trip after which a block without an ack is hedged.
    /// Default 0.95.
    pub hedge_quantile: f64,
    /// Least hedge delay. Default 5 ms.
    pub hedge_floor: Duration,
    /// The hedge fires at `quantile × (1 + hedge_slack) + hedge_margin`. Default 0.1: the
    /// quantile is estimated from acks that beat the hedge, so the hedge must sit a little
    /// beyond it for the estimate not to drift down.
    pub hedge_slack: f64,
    /// Added to the quantile, so an ack arriving exactly at the quantile is not raced by its
    /// own hedge timer. Default 1 ms (tokio's timer granularity). Measured over quinn in
    /// virtual time, where such ties are systematic: without it a loss-free link hedged
    /// 75% of messages.
    pub hedge_margin: Duration,
    /// Each further hedge of a block waits this many times longer. Default 2.
    pub hedge_backoff: f64,
    /// Longest wait between two resends of a block, whatever the backoff says, so a message
    /// gets several tries before its deadline even after an outage. Default 1 s.
    pub max_hedge_interval: Duration,
    /// Least fresh repair shards per hedge. Default 1. A hedge carries a block's worth
    /// (`k` shards) when that is more: a first flight still unacked at the hedge time has
    /// usually lost more than one shard too many, because losses come in bursts (measured
    /// on the sweep, Gilbert-Elliott 5% with bursts of 4, seeds 1-5: p99 191-193 ms with one
    /// shard, 92-104 ms with `k`, against quinn+BBR's 120-150; under independent loss of
    /// 0-20% no change in p99 and under +0.05x wire bytes, since few blocks are hedged).
    /// Under congestion the first (speculative) hedge is skipped; resends still carry `k`.
    pub hedge_repair: usize,
    /// First-hedge bytes allowed as a share of first-flight bytes. Default 0.05. Only a
    /// block's first hedge is speculative and budgeted; later resends of a block still
    /// unacked after twice the hedge delay are retransmissions, spaced by `hedge_backoff`
    /// like QUIC's own probe timeouts, and always sent (otherwise a blackout would turn
    /// every message sent during it into a failure).
    pub hedge_budget: f64,
    /// Hedge bytes allowed on top of the share, so a young channel can hedge. Default 64 KiB.
    pub hedge_burst: usize,
    /// A message not acked this long after `send` fails with an unknown outcome. Default 5 s.
    pub deadline: Duration,
    /// Most messages in flight; `send` refuses more (backpressure). Default 4096.
    pub max_in_flight: usize,
    /// Most ids between the sender's floor (its lowest id awaiting an outcome) and a new
    /// id: `send` refuses an id at `floor + max_id_span` or beyond with
    /// [`SendError::Backpressure`], because the receiver's dedupe window (its
    /// `ReceiverConfig::dedupe_window`, which this must not exceed) would refuse it. One
    /// message that never gets through holds the floor until its deadline. Default 65536,
    /// the receiver's default window.
    pub max_id_span: u64,
    /// The most of the peer's reported `ack_delay` subtracted from a round-trip sample, and
    /// a sample is never cut below the least round trip measured: a peer cannot shrink the
    /// hedge delay by claiming long ack delays. Default 25 ms.
    pub max_ack_delay: Duration,
    /// Least time between two FLOOR frames. Default 10 ms.
    pub floor_interval: Duration,
    /// Queueing delay that counts as congestion: when the round trip (the least of the last
    /// few; the transport's when it reports them, first flights' otherwise) exceeds the
    /// least of the last ten minutes by more than this (or by more than a quarter of that
    /// least round trip, whichever is longer), the path is queueing what it is offered: the
    /// sender sheds redundancy as for [`Sender::set_congested`], loss seen then is left out
    /// of the loss estimate, and the parity allowed per data shard halves every round trip
    /// ([`Sender::redundancy_cap`]). Default 5 ms. Jitter only adds to the round trip: on
    /// a path whose smoothed round trip jitters by more than the target above its least,
    /// parity is shed part of the time; raise it for such paths.
    pub congestion_delay: Duration,
    /// While the path is silent (no ack for three median round trips, at least
    /// `2 × hedge delay` and 50 ms, while messages await acks) per-block hedges stop and one
    /// probe (the oldest unacked block, whole) goes at this interval, so the first packet
    /// through a returned link is at most this late; the first ack after the silence sends
    /// every block then due again at once. Default 100 ms.
    pub probe_interval: Duration,
    /// Round-trip estimate before the first ack. Default 100 ms.
    pub initial_rtt: Duration,
    /// Ack round-trip samples kept for the percentile. Default 512.
    pub rtt_samples: usize,
    /// Where hedges go while a secondary replica is available. Default [`HedgeTo::Same`].
    /// A copy on a secondary is delivered at most once only if the replicas share a claims
    /// store: the caller marks a secondary available only then.
    pub hedge_to: HedgeTo,
    /// The sliding-window code across messages (protocol 2): a message whose envelope
    /// fits one datagram is sent whole as a window source, and repairs over the unacked
    /// sources replace its own first-flight parity ([`WindowConfig`]). `None`: every
    /// message is its own block, as in protocol 1. Used only once the peer speaks
    /// protocol 2 ([`Sender::set_protocol`]). Default on.
    pub window: Option<WindowConfig>,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            encoder: EncoderConfig::default(),
            batching: false,
            adaptive: Some(AdaptiveConfig::default()),
            first_flight_repair: 1,
            window: Some(WindowConfig::default()),
            repair_spacing: Duration::from_millis(1),
            hedge_quantile: 0.95,
            hedge_floor: Duration::from_millis(5),
            hedge_slack: 0.1,
            hedge_margin: Duration::from_millis(1),
            hedge_backoff: 2.0,
            max_hedge_interval: Duration::from_secs(1),
            hedge_repair: 1,
            hedge_budget: 0.05,
            hedge_burst: 64 * 1024,
            deadline: Duration::from_secs(5),
            max_in_flight: 4096,
            max_id_span: 65_536,
            max_ack_delay: Duration::from_millis(25),
            floor_interval: Duration::from_millis(10),
            congestion_delay: Duration::from_millis(5),
            probe_interval: Duration::from_millis(100),
            initial_rtt: Duration::from_millis(100),
            rtt_samples: 512,
            hedge_to: HedgeTo::Same,
        }
    }
}

/// Why [`Sender::send`] refused a message. Nothing was sent; the application may retry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// `max_in_flight` messages are awaiting acks, or the next id would be `max_id_span`
    /// past the oldest awaiting its outcome; wait for an outcome and retry.
    #[error("backpressure: {in_flight} messages in flight (at max_in_flight, or the oldest holds max_id_span)")]
    Backpressure {
        /// Messages in flight.
        in_flight: usize,
    },
    /// The idempotency key is empty or longer than [`MAX_KEY_LEN`] bytes.
    #[error("idempotency key of {len} bytes, allowed 1..={max}", max = MAX_KEY_LEN)]
    InvalidKey {
        /// The key's length.
        len: usize,
    },
    /// The message cannot be encoded (too long for the datagram path, or a configuration
    /// that leaves no room for shards).
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Why a message failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// No ack before the deadline. The outcome is unknown: the message may or may not have
    /// been delivered. Retry with the same idempotency key.
    DeadlineExceeded,
    /// On a new connection the message could not be encoded again (the path's datagrams
    /// shrank). The outcome is unknown: it may have been delivered on the old connection.
    NotResendable,
    /// The peer came back without the channel's state (it restarted, or forgot the channel):
    /// re-sending with the same id could deliver the message twice, so it is not re-sent.
    /// The outcome is unknown: the peer may have delivered it before it lost its state.
    PeerLostState,
    /// The receiver refused it (a REFUSE frame, with one of the wire's `REFUSE_*` reason
    /// codes): it was not delivered and will not be. A retry with the same idempotency key
    /// is safe (it may be refused again for the same reason).
    Refused(u64),
}

/// What happened to a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderEvent {
    /// The receiver acknowledged it: it was delivered.
    Acked {
        /// The message id.
        id: u64,
        /// From `send` to the ack.
        latency: Duration,
        /// Shards sent for its block (first flight and hedges).
        shards_sent: usize,
        /// Hedges fired for its block.
        hedges: u32,
        /// Protocol 2: the receiver did not deliver it again because its idempotency key
        /// was delivered before with the same payload (a replay of an earlier delivery).
        replayed: bool,
    },
    /// It failed; see the reason.
    Failed {
        /// The message id.
        id: u64,
        /// Why.
        reason: FailReason,
    },
}

/// Counters of a [`Sender`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Messages accepted by `send`.
    pub messages_sent: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages failed.
    pub failed: u64,
    /// Data shards sent (first flights).
    pub data_shards: u64,
    /// Parity shards sent in first flights.
    pub repair_shards: u64,
    /// First hedges fired (speculative: at the round trip's p95).
    pub hedges_fired: u64,
    /// First hedges skipped because the budget was spent.
    pub hedges_skipped: u64,
    /// Later resends of a block still unacked (retransmissions under exponential backoff;
    /// not budgeted).
    pub retransmits: u64,
    /// Bytes of first flights.
    pub first_flight_bytes: u64,
    /// Bytes of first hedges.
    pub hedge_bytes: u64,
    /// Bytes of retransmissions.
    pub retransmit_bytes: u64,
    /// Shard frames the peer reported receiving (from its latest ack).
    pub peer_shards_received: u64,
    /// Shard frames sent (every kind).
    pub shards_sent: u64,
    /// Hedges that sent a whole copy of a message to a secondary replica
    /// ([`SenderConfig::hedge_to`]).
    pub hedges_to_secondary: u64,
    /// Shard frames sent to a secondary replica.
    pub secondary_shards: u64,
    /// Messages the receiver refused ([`FailReason::Refused`]).
    pub refused: u64,
    /// FLOOR frames sent.
    pub floors_sent: u64,
    /// Probes sent while the path was silent ([`SenderConfig::probe_interval`]).
    pub probes: u64,
    /// Times the path fell silent (no ack while messages awaited theirs).
    pub silences: u64,
    /// Messages acked only after their block was hedged: their first flight missed.
    pub acked_after_hedge: u64,
    /// Shards sent while the path was congested, whose loss was left out of the loss
    /// estimate (congestion, not the path's loss).
    pub shards_excluded_congested: u64,
    /// Parity shards and speculative hedges not sent because the path was congested
    /// ([`Sender::set_congested`]): redundancy shed first, so it never adds to the
    /// congestion.
    pub shed_congested: u64,
    /// Blocks resent at once because an ack of a later message showed them lost
    /// (also counted in `retransmits`).
    pub gap_resends: u64,
}

/// Where a hedge goes when a secondary replica is available (see
/// [`Sender::set_secondary`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HedgeTo {
    /// Fresh repair shards to the same replica (the primary). The default.
    #[default]
    Same,
    /// A whole copy of the message to the secondary instead.
    Other,
    /// Both: repair shards to the primary and a whole copy to the secondary.
    Both,
}

/// Block ids of copies sent to a secondary start here, far from the primary's, so the two
/// id spaces never meet on one connection (the secondary becomes primary at a failover).
const SECONDARY_BLOCKS: u64 = 1 << 48;

#[derive(Debug)]
struct Message {
    block: Option<u64>,
    sent_at: Instant,
    deadline: Instant,
    /// Kept until the outcome, to re-send on a new connection.
    payload: Bytes,
    /// A request or a reply (protocol 2): an end waits for it, so as a window source on a
    /// lossy path it gets a repair right behind it.
    urgent: bool,
}

#[derive(Debug)]
struct BlockState {
    block: Block,
    /// Whether anything of it was sent again (a hedge, a retransmission, a probe): an ack
    /// then does not say which transmission it answers.
    resent: bool,
    /// Shards of its first flight.
    first_flight: usize,
    unacked: usize,
    shards_sent: usize,
    hedges: u32,
    attempts: u32,
    next_hedge: Instant,
    /// Its first flight went out while the path was silent (whole, without parity).
    into_silence: bool,
    /// When anything of it was last sent.
    last_tx: Instant,
}

/// The sending half of a surelink peer. Sans-I/O: feed it `now`, acks and timeouts; take
/// datagrams from [`Sender::poll_transmit`] and outcomes from [`Sender::poll_event`].
#[derive(Debug)]
pub struct Sender {
    config: SenderConfig,
    encoder: Encoder,
    next_id: u64,
    messages: BTreeMap<u64, Message>,
    /// `(deadline, id)` of every message in `messages`: the next deadline without a scan.
    deadlines: BTreeSet<(Instant, u64)>,
    blocks: HashMap<u64, BlockState>,
    /// `(next hedge, block)` of every block in `blocks`: due hedges without a scan (at
    /// 20,000 messages a second, scanning every block and message on each timer took more
    /// than half of the sender's CPU and the channel fell behind).
    hedge_due: BTreeSet<(Instant, u64)>,
    rtt: RttEstimator,
    /// Blocks built, first flight not yet sent, with their planned parity (`None`: choose
    /// when sent).
    pending: VecDeque<(Block, Option<usize>)>,
    /// First-flight parity waiting out `repair_spacing`, in due order.
    spaced: BTreeMap<(Instant, u64), (u64, Bytes)>,
    /// Orders frames due at the same instant in `spaced`.
    spaced_seq: u64,
    out: VecDeque<Bytes>,
    /// Whether a secondary replica can take hedge copies.
    secondary: bool,
    /// Encodes copies for the secondary, in their own block-id space.
    copies: Encoder,
    secondary_out: VecDeque<Bytes>,
    events: VecDeque<SenderEvent>,
    stats: SenderStats,
    loss: LossEstimator,
    /// `(lost, sent)` of the peer's datagrams the other way ([`Sender::set_reverse_loss`]).
    reverse_loss: (u64, u64),
    /// `(coded length, loss step, further data shards the round trip allows) → (k, m)`.
    plans: HashMap<(usize, u32, u32), (u16, u16)>,
    /// Ids handed out by [`Sender::reserve_id`] whose outcome the caller has not reported,
    /// with the time they are given up (the deadline; `None` until the sender next sees the
    /// time).
    reserved: BTreeMap<u64, Option<Instant>>,
    /// Whether some reserved id has no deadline yet.
    reserved_unstamped: bool,
    /// The least raw ack round trip seen (before any ack delay is subtracted).
    min_latency: Option<Duration>,
    /// The last FLOOR sent, when, and how many times that value went out.
    floor_sent: u64,
    floor_sent_at: Option<Instant>,
    floor_repeats: u32,
    /// What the peer's acks say its floor is at least (from their range starting at 0).
    peer_floor: u64,
    /// The path does not carry what is offered ([`Sender::set_congested`]).
    congested: bool,
    /// Queueing delay and the redundancy cap it allows.
    governor: Governor,
    /// The transport's last reported round trip on this connection
    /// ([`Sender::on_path_rtt`]); while there is one, the governor takes the transport's
    /// reports instead of first flights' acks.
    last_path_rtt: Option<Duration>,
    /// When the last ack arrived.
    last_ack_at: Option<Instant>,
    /// First flights of acked messages expected to miss under independent loss at the
    /// measured rate, summed (the model side of [`Sender::loss_burstiness`]).
    expected_misses: f64,
    /// `(k, n, loss step) → residual loss` under independent loss; bounded.
    residuals: HashMap<(usize, usize, u32), f64>,
    /// The path is silent: the next probe is due then.
    next_probe: Option<Instant>,
    /// Round-trip samples come only from messages sent at or after this: the end of the last
    /// silence, or the start of the current connection. A message that waited through an
    /// outage measures the outage, not the path; taken as a sample it would push the hedge
    /// delay (a high percentile) to seconds, and every block lost in the outage would wait
    /// that long for its repair once the path returned.
    samples_from: Option<Instant>,
    /// The sliding-window code's sending state (protocol 2).
    window: RepairWindow,
    /// The raw latency of the last few acked messages, newest last: their median is the
    /// round trip now, queue included.
    recent_latency: VecDeque<Duration>,
    /// Resends made at the current instant (see `RESEND_BURST`), and that instant.
    resend_burst: u32,
    resend_burst_at: Option<Instant>,
    /// The protocol version the peer speaks: the window code needs 2.
    protocol: u8,
}

impl Sender {
    /// A sender with `config`.
    pub fn new(config: SenderConfig) -> Self {
        let estimator = config
            .adaptive
            .as_ref()
            .map(|a| a.estimator)
            .unwrap_or_default();
        // The most parity per data shard any plan asks for.
        let ceiling = config
            .adaptive
            .as_ref()
            .map_or(config.first_flight_repair as f64, |a| {
                f64::from(a.tuner.max_repair)
            });
        let governor = Governor::new(config.congestion_delay, ceiling);
        let config_window = config.window.clone().unwrap_or_default();
        Sender {
            encoder: Encoder::new(config.encoder.clone()),
            copies: Encoder::starting_at(config.encoder.clone(), SECONDARY_BLOCKS),
            rtt: RttEstimator::new(config.initial_rtt, config.rtt_samples),
            config,
            next_id: 0,
            messages: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            blocks: HashMap::new(),
            hedge_due: BTreeSet::new(),
            pending: VecDeque::new(),
            spaced: BTreeMap::new(),
            spaced_seq: 0,
            out: VecDeque::new(),
            secondary: false,
            secondary_out: VecDeque::new(),
            events: VecDeque::new(),
            stats: SenderStats::default(),
            loss: LossEstimator::new(estimator),
            reverse_loss: (0, 0),
            plans: HashMap::new(),
            reserved: BTreeMap::new(),
            reserved_unstamped: false,
            min_latency: None,
            floor_sent: 0,
            floor_sent_at: None,
            floor_repeats: 0,
            peer_floor: 0,
            congested: false,
            governor,
            last_path_rtt: None,
            last_ack_at: None,
            next_probe: None,
            expected_misses: 0.0,
            residuals: HashMap::new(),
            samples_from: None,
            window: RepairWindow::new(config_window),
            recent_latency: VecDeque::with_capacity(RECENT_LATENCIES),
            resend_burst: 0,
            resend_burst_at: None,
            protocol: 2,
        }
    }

    /// The protocol version the peer speaks: with 1, no MESSAGE or REPAIR frame is sent
    /// (every message is its own block). Default 2.
    pub fn set_protocol(&mut self, version: u8) {
        self.protocol = version;
    }

    /// What the peer's datagrams lost on the way the other way (`(lost, sent)`, from the
    /// receiver's window sources): the window's repair rate plans with it until the sender
    /// judged enough shards of its own.
    pub fn set_reverse_loss(&mut self, loss: (u64, u64)) {
        self.reverse_loss = loss;
    }

    /// Whether messages go as window sources now.
    fn windowed(&self) -> bool {
        self.protocol >= 2 && self.config.window.is_some()
    }

    /// Repairs per window source the sender plans for now: `gain × (p - r) / (1 - p)` for
    /// the estimated loss `p` and the plan's residual target `r` (at least
    /// `ln(p / r) / horizon` for the plain measured `p`), raised with the loss's measured dispersion (bursts need more
    /// repairs close together), within the configured bounds and never above the parity
    /// per data shard the queueing delay allows ([`Sender::redundancy_cap`]).
    pub fn window_ratio(&self) -> f64 {
        let config = self.window.config();
        // The measured rate, not its upper bound: a repair serves every source in the
        // window, so one plan's uncertainty is averaged over many messages (the bound is
        // for the start, before much was measured).
        let p = if self.loss.window().1 >= MEASURED_SHARDS {
            self.loss.mean()
        } else if self.reverse_loss.1 >= MEASURED_SHARDS {
            // Nothing of its own judged yet, but the peer's datagrams showed this path's loss
            // the other way (an end that answers requests sends its first message after many
            // arrived): planned for until its own estimate has the shards (measured on the
            // request sweep at 10% loss, seeds 1-5: the first second's round-trip p99 was
            // 95-121 ms with the replies unrepaired).
            self.reverse_loss.0 as f64 / self.reverse_loss.1 as f64
        } else {
            // A start that does not flood: no repair is spent on the prior alone. On a path
            // whose capacity the messages nearly fill, a few dozen early repairs are a queue
            // that takes a second to drain (measured at 1,000 kbit/s: p99 84-90 ms against
            // quinn+BBR's 59, 61 with 32 shards measured first); a lossy path's first
            // messages are hedged meanwhile.
            return 0.0;
        };
        let p = p.clamp(0.0, 0.5);
        // Loss below the residual the plan aims for needs no repair (a lone loss is left
        // to its hedge, as a block code's plan would leave it).
        let residual = self
            .config
            .adaptive
            .as_ref()
            .map_or(0.0, |a| a.target.residual);
        let dispersion = self.loss.dispersion().unwrap_or(1.0).max(1.0);
        let ratio = config.gain * (p - residual).max(0.0) / (1.0 - p) * dispersion.sqrt();
        // At low loss the rate alone buys too few repairs to follow a loss soon enough: a
        // lost message needs a repair within about `horizon` sources, and with `r` repairs a
        // source one comes within `h` sources with probability 1 - e^(-r·h); so at least
        // ln(p / residual) / horizon (measured, seeds 1-5: p99 at 1% loss 66 -> 46 ms, at 5%
        // 66 -> 51). From the plain measured rate: the prior buys nothing here.
        let measured = self.loss.observed().unwrap_or(0.0);
        let low = if config.horizon > 0.0 && measured > residual && residual > 0.0 {
            (measured / residual).ln() / config.horizon
        } else {
            0.0
        };
        let ratio = ratio.max(low);
        // (The window's config is sanitised: min ≤ max, both finite.)
        let ratio = if ratio.is_finite() { ratio } else { 0.0 };
        ratio
            .clamp(config.min_ratio, config.max_ratio)
            .min(self.governor.cap())
    }

    /// The window code's counters.
    pub fn window_stats(&self) -> super::repair::WindowSendStats {
        self.window.stats()
    }

    /// Whether the path is congested now (the transport queues what it is given): while
    /// it is, first flights carry their data shards only and speculative hedges are
    /// skipped (both counted in [`SenderStats::shed_congested`]); retransmissions of blocks
    /// still unacked after twice the hedge delay go on. The caller learns it from the
    /// transport (e.g. quinn's datagram send buffer filling up).
    pub fn set_congested(&mut self, congested: bool) {
        self.congested = congested;
    }

    /// Takes the transport's smoothed round trip (e.g. quinn's, which measures every packet
    /// unambiguously): from then on the queueing delay, and the redundancy it leaves room
    /// for, come from these samples rather than from first flights' acks, which stop once
    /// every block is resent before its ack.
    pub fn on_path_rtt(&mut self, now: Instant, rtt: Duration) {
        if self.last_path_rtt.is_none() {
            // The first report on this connection: first flights' samples give way.
            self.governor.reset();
        }
        self.governor.on_sample(now, rtt);
        self.last_path_rtt = Some(rtt);
    }

    /// The queueing delay the sender measures: the least of the last few round trips (the
    /// transport's, once [`Sender::on_path_rtt`] reports them; first flights' otherwise)
    /// minus the least of the last ten minutes.
    /// Redundancy (parity, speculative hedges) is spare traffic: past a target (a quarter
    /// of that least round trip, at least [`SenderConfig::congestion_delay`]) it is shed, as
    /// LEDBAT (RFC 6817) yields to a queue, so a bottleneck's drops never ask for more of
    /// it.
    pub fn queueing_delay(&self) -> Option<Duration> {
        self.governor.queueing_delay()
    }

    /// Parity shards per data shard the queueing delay allows now: halved every round trip
    /// the queue stays past the target; below it, grown each base round trip by up to 0.1
    /// (in proportion to how far under the target the delay is), up to the most any plan
    /// asks for. First flights carry at most this much parity (fractions carried
    /// from block to block), and a message is not split into several data shards beyond
    /// what this much parity can protect.
    pub fn redundancy_cap(&self) -> f64 {
        self.governor.cap()
    }

    /// Whether the sender is shedding redundancy for congestion: the transport said so
    /// ([`Sender::set_congested`]), or the queueing delay ([`Sender::queueing_delay`]) is
    /// past its target (see [`SenderConfig::congestion_delay`]).
    pub fn congested(&self) -> bool {
        self.congested || self.queueing()
    }

    /// No ack for this long, while messages await theirs, makes the path silent.
    fn silence_after(&self) -> Duration {
        (self.rtt.quantile(0.5) * 3)
            .max(self.hedge_delay(0) * 2)
            .max(Duration::from_millis(50))
    }

    /// When the path counts as silent if no ack comes first: `silence_after` past both the
    /// last ack and the oldest message awaiting one.
    fn silence_at(&self) -> Option<Instant> {
        let oldest = self.messages.values().next()?.sent_at;
        let since = self.last_ack_at.map_or(oldest, |t| t.max(oldest));
        Some(since + self.silence_after())
    }

    /// Whether silence can begin: blocks await acks, and hedges do not go to a secondary
    /// replica (another path, which keeps hedging).
    fn may_fall_silent(&self) -> bool {
        let to_secondary = self.secondary && self.config.hedge_to != HedgeTo::Same;
        !to_secondary && !self.blocks.is_empty()
    }

    /// How much more often first flights miss than independent loss explains: messages acked
    /// only after a hedge ([`SenderStats::acked_after_hedge`]) over the number the
    /// binomial model predicts for their codes at the measured per-shard loss. About 1 under
    /// independent loss; well above 1 when losses come in bursts that take several shards
    /// of a block at once (or when acks are late for other reasons: a slow receiver).
    /// `None` until the model expects at least one miss.
    pub fn loss_burstiness(&self) -> Option<f64> {
        (self.expected_misses >= 1.0)
            .then(|| self.stats.acked_after_hedge as f64 / self.expected_misses)
    }

    /// Loss structure from the peer's shard counts: the index of dispersion (variance over
    /// mean) of shards lost per group of 32 consecutive judged shards, over the last 64
    /// groups ([`LossEstimator::dispersion`]). About 1 under independent loss (measured on
    /// the sweep at 5-20%: 0.8-1.8), about `2L - 1` for bursts of mean length `L` packets
    /// (Gilbert-Elliott 5% in bursts of 4: 5-10; 6% in bursts of 8: 10-21). Late acks do not
    /// move it (unlike [`Sender::loss_burstiness`]), nor does loss while the sender is
    /// congested (left out of the estimate). `None` until 8 groups with some loss.
    pub fn loss_dispersion(&self) -> Option<f64> {
        self.loss.dispersion()
    }

    /// What independent loss predicts for a first flight of `n` shards needing `k`.
    fn expected_miss(&mut self, k: usize, n: usize) -> f64 {
        let Some(p) = self.loss.observed() else {
            return 0.0;
        };
        let step = (p * 1000.0).round().clamp(0.0, 1000.0) as u32;
        if let Some(&r) = self.residuals.get(&(k, n, step)) {
            return r;
        }
        let r = LossModel::Bernoulli(f64::from(step) / 1000.0).residual(k, n);
        if self.residuals.len() >= PLAN_CACHE {
            self.residuals.clear();
        }
        self.residuals.insert((k, n, step), r);
        r
    }

    /// Whether the path is silent now (probing, per-block hedges paused).
    pub fn silent(&self) -> bool {
        self.next_probe.is_some()
    }

    /// Sends the oldest unacked block whole, as a probe of a silent path.
    fn probe(&mut self, now: Instant) {
        let Some(block) = self.messages.values().find_map(|m| m.block) else {
            return;
        };
        let Some(b) = self.blocks.get_mut(&block) else {
            return;
        };
        let count = usize::from(b.block.header().data_shards).max(1);
        let mut frames = b.block.next_repair(count);
        if frames.len() < count {
            frames.extend(b.block.data_frames().into_iter().take(count - frames.len()));
        }
        b.shards_sent += frames.len();
        b.resent = true;
        b.last_tx = now;
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        self.stats.probes += 1;
        self.stats.retransmit_bytes += bytes as u64;
        self.emit(now, frames);
    }

    /// Whether the smoothed round trip shows the path queueing.
    fn queueing(&self) -> bool {
        self.governor.queueing()
    }

    /// The link's loss rate the sender plans for (an upper confidence bound; see
    /// [`LossEstimator::estimate`]).
    pub fn loss_estimate(&self) -> f64 {
        self.loss.estimate()
    }

    /// The plain per-shard loss rate measured over the estimator's window, once any shard has
    /// been judged.
    pub fn loss_observed(&self) -> Option<f64> {
        self.loss.observed()
    }

    /// The code `(k, m)` a message of `len` payload bytes gets now (without a key), or `None`
    /// when redundancy is not adaptive.
    pub fn current_plan(&mut self, len: usize) -> Option<(u16, u16)> {
        self.plan_for(Envelope::overhead(None) + len)
            .map(|(k, m, _)| (k, m))
    }

    /// The code `(k, m)` for a message of `coded_len` bytes, and whether `m` is meant for
    /// exactly that `k` (else the block's own parity is worked out once it is built: the
    /// encoder may need more data shards than asked for).
    fn plan_for(&mut self, coded_len: usize) -> Option<(u16, u16, bool)> {
        let (k, m) = self.loss_plan(coded_len)?;
        // Splitting a message into k shards pays off only with the parity to match; where
        // the queueing delay leaves no room for it, k shards are k packets of headers for
        // nothing (measured at a 1,000 kbit/s bottleneck: 4.6 data shards a message, twice
        // the bytes). As few shards as the message needs then (one, unless it is larger
        // than a datagram), with the parity the loss estimate asks for that block, cut to
        // what the governor allows.
        if k > 1 && (self.congested() || f64::from(m) > self.governor.cap() * f64::from(k)) {
            return Some((1, 0, false));
        }
        Some((k, m, true))
    }

    /// The code the loss estimate asks for, before the queueing delay has its say.
    fn loss_plan(&mut self, coded_len: usize) -> Option<(u16, u16)> {
        let adaptive = self.config.adaptive.as_ref()?;
        let estimate = self.loss.estimate();
        // Planned for the top of the estimate's 0.1% step, so a cached plan is never weaker
        // than a fresh one.
        let step = (estimate * 1000.0).ceil().clamp(0.0, 1000.0) as u32;
        // The round trip bounds how far a message is split (its data shards' spacing must
        // not exceed it): plans are cached per the bound it gives.
        // (The transport's, when lower: before the first ack its handshake has measured the
        // path, while our estimate is still the configured initial round trip.)
        let rtt = self
            .rtt
            .quantile(0.5)
            .min(self.last_path_rtt.unwrap_or(Duration::MAX));
        let spacing = self.config.repair_spacing;
        let most = u128::from(adaptive.tuner.max_data_shards);
        let splits = if spacing.is_zero() || rtt.is_zero() {
            most
        } else {
            (rtt.as_nanos() / spacing.as_nanos()).min(most)
        } as u32;
        if let Some(&plan) = self.plans.get(&(coded_len, step, splits)) {
            return Some(plan);
        }
        let profile = tune::Profile {
            message_size: coded_len,
            rate: 0.0,
            rtt,
            max_datagram_size: self.config.encoder.max_datagram_size,
        };
        let tuner = TunerConfig {
            spacing,
            ..adaptive.tuner
        };
        let target = Target {
            max_linger: Duration::ZERO,
            ..adaptive.target
        };
        let p = tune::plan(
            &LossModel::Bernoulli(f64::from(step) / 1000.0),
            &profile,
            &target,
            &tuner,
        );
        if self.plans.len() >= PLAN_CACHE {
            self.plans.clear();
        }
        let plan = (p.data_shards, p.repair_shards);
        self.plans.insert((coded_len, step, splits), plan);
        Some(plan)
    }

    /// Parity for a block built by the encoder alone (batched): the least `m` that meets the
    /// target for its `k`, or `first_flight_repair` when not adaptive.
    fn repair_for(&self, block: &Block) -> usize {
        let Some(adaptive) = &self.config.adaptive else {
            return self.config.first_flight_repair;
        };
        let k = usize::from(block.header().data_shards);
        let model = LossModel::Bernoulli(self.loss.estimate());
        let table = model.loss_counts(k + usize::from(adaptive.tuner.max_repair));
        (0..=usize::from(adaptive.tuner.max_repair))
            .find(|&m| table.residual(k, k + m) <= adaptive.target.residual)
            .unwrap_or(usize::from(adaptive.tuner.max_repair))
    }

    /// Puts frames on the wire now, counting them.
    fn emit(&mut self, now: Instant, frames: impl IntoIterator<Item = Bytes>) {
        let before = self.out.len();
        self.out.extend(frames);
        let n = (self.out.len() - before) as u64;
        self.stats.shards_sent += n;
        self.loss.on_sent(now, n);
    }

    /// The share of the first-hedge allowance spent so far: hedge bytes over `hedge_burst`
    /// plus `hedge_budget` × first-flight bytes. At 1.0 first hedges are skipped (counted in
    /// [`SenderStats::hedges_skipped`]) until first flights earn more allowance.
    pub fn hedge_budget_used(&self) -> f64 {
        let allowance = self.config.hedge_burst as f64
            + self.config.hedge_budget * self.stats.first_flight_bytes as f64;
        if allowance <= 0.0 {
            return 1.0;
        }
        self.stats.hedge_bytes as f64 / allowance
    }

    /// Counters.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }

    /// The ack round trips seen so far.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Messages awaiting an outcome.
    pub fn in_flight(&self) -> usize {
        self.messages.len()
    }

    /// The lowest id still awaiting its outcome, or the next id when none is: every id
    /// below was acked, given up or refused. Ids reserved with [`Sender::reserve_id`] count
    /// as awaiting until [`Sender::reserved_done`] (or their deadline). This is what FLOOR
    /// frames tell the receiver.
    pub fn floor(&self) -> u64 {
        let messages = self.messages.first_key_value().map(|(&id, _)| id);
        let reserved = self.reserved.first_key_value().map(|(&id, _)| id);
        [messages, reserved]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_id)
    }

    /// Takes the next message id for a message sent outside the datagram path (a stream
    /// message), so that both paths share one id space and the receiver one dedupe window.
    /// The sender does not track its delivery (acks for it are ignored), but its floor (and
    /// FLOOR) stays below it until the caller reports its outcome with
    /// [`Sender::reserved_done`], or at the latest `deadline` after the sender next sees the
    /// time (as for a datagram message, whose outcome is then unknown): the receiver must
    /// not settle an id whose message may still arrive. The id is not checked against
    /// `max_id_span`.
    pub fn reserve_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.stats.messages_sent += 1;
        self.reserved.insert(id, None);
        self.reserved_unstamped = true;
        id
    }

    /// Like [`Sender::reserve_id`], for a message with its own deadline (at most
    /// [`MAX_DEADLINE`]): the floor stays below the id until `now + deadline` at the latest.
    pub fn reserve_id_until(&mut self, now: Instant, deadline: Duration) -> u64 {
        let id = self.reserve_id();
        self.reserved
            .insert(id, Some(now + deadline.min(MAX_DEADLINE)));
        id
    }

    /// A reserved id ([`Sender::reserve_id`]) has its outcome (answered, failed or given
    /// up): the floor may pass it.
    pub fn reserved_done(&mut self, now: Instant, id: u64) {
        self.stamp_reserved(now);
        if self.reserved.remove(&id).is_some() {
            self.maybe_send_floor(now);
        }
    }

    /// Gives reserved ids without one their deadline, from `now`.
    fn stamp_reserved(&mut self, now: Instant) {
        if !self.reserved_unstamped {
            return;
        }
        self.reserved_unstamped = false;
        let deadline = now + self.config.deadline;
        for at in self.reserved.values_mut() {
            at.get_or_insert(deadline);
        }
    }

    /// Sends a message without an idempotency key; see [`Sender::send_keyed`].
    pub fn send(&mut self, now: Instant, payload: Bytes) -> Result<u64, SendError> {
        self.send_keyed(now, None, &payload)
    }

    /// Sends a message with an optional idempotency key (`1 ..= MAX_KEY_LEN` bytes): the
    /// receiver delivers at most one message per key within its key TTL. Returns the message
    /// id; its outcome comes later from [`Sender::poll_event`].
    pub fn send_keyed(
        &mut self,
        now: Instant,
        key: Option<&[u8]>,
        payload: &[u8],
    ) -> Result<u64, SendError> {
        self.send_kind(now, key, Kind::Message, payload)
    }

    /// Like [`Sender::send_kind`], with the message's own deadline instead of
    /// [`SenderConfig::deadline`] (shorter or longer, at most [`MAX_DEADLINE`]): at it, the
    /// message fails with [`FailReason::DeadlineExceeded`] unless it was acked.
    pub fn send_until(
        &mut self,
        now: Instant,
        key: Option<&[u8]>,
        kind: Kind,
        payload: &[u8],
        deadline: Duration,
    ) -> Result<u64, SendError> {
        let id = self.send_kind(now, key, kind, payload)?;
        let own = now + self.config.deadline;
        let at = now + deadline.min(MAX_DEADLINE);
        if at != own {
            self.deadlines.remove(&(own, id));
            self.deadlines.insert((at, id));
            if let Some(m) = self.messages.get_mut(&id) {
                m.deadline = at;
            }
        }
        Ok(id)
    }

    /// Like [`Sender::send_keyed`], for a message of `kind` (requests and replies: protocol
    /// 2 only; the caller checks the peer speaks it).
    pub fn send_kind(
        &mut self,
        now: Instant,
        key: Option<&[u8]>,
        kind: Kind,
        payload: &[u8],
    ) -> Result<u64, SendError> {
        if let Some(k) = key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                return Err(SendError::InvalidKey { len: k.len() });
            }
        }
        let payload = Envelope::encode_kind(key, kind, payload);
        self.stamp_reserved(now);
        let id = self.next_id;
        if self.messages.len() >= self.config.max_in_flight
            || id - self.floor() >= self.config.max_id_span.max(1)
        {
            return Err(SendError::Backpressure {
                in_flight: self.messages.len(),
            });
        }
        if self.config.batching {
            self.encoder.push(now, id, payload.clone())?;
        } else {
            let block = self.encode_message(id, payload.clone())?;
            self.pending.push_back(block);
        }
        self.next_id += 1;
        self.stats.messages_sent += 1;
        let deadline = now + self.config.deadline;
        self.deadlines.insert((deadline, id));
        self.messages.insert(
            id,
            Message {
                block: None,
                sent_at: now,
                deadline,
                payload,
                urgent: matches!(kind, Kind::Reply { .. } | Kind::Request),
            },
        );
        self.start_blocks(now);
        Ok(id)
    }

    /// The connection was replaced (after a loss, the same channel reconnected): every message
    /// still in flight is sent again, with its id, deadline and send time, in new blocks (block
    /// ids start over: the peer's reassembly state belongs to the old connection). Its RTT
    /// samples, counters and next message id carry over.
    pub fn new_connection(&mut self, now: Instant) {
        // The peer (perhaps another server) learns the floor afresh, before any shard.
        self.peer_floor = 0;
        self.floor_sent = 0;
        self.floor_sent_at = None;
        self.floor_repeats = 0;
        self.encoder = Encoder::new(self.config.encoder.clone());
        // A new path: whatever was congested or silent was the old one's.
        self.congested = false;
        self.governor.reset();
        self.last_path_rtt = None;
        self.next_probe = None;
        self.last_ack_at = Some(now);
        self.samples_from = Some(now);
        self.blocks.clear();
        self.hedge_due.clear();
        self.window.reset();
        self.recent_latency.clear();
        self.pending.clear();
        self.spaced.clear();
        self.out.clear();
        self.loss.new_connection();
        let in_flight: Vec<(u64, Bytes)> = self
            .messages
            .iter_mut()
            .map(|(&id, m)| {
                m.block = None;
                (id, m.payload.clone())
            })
            .collect();
        for (id, payload) in in_flight {
            match self.encode_message(id, payload) {
                Ok(block) => self.pending.push_back(block),
                Err(_) => {
                    // Possible only if the datagram size shrank below what this message needs.
                    self.remove_message(id);
                    self.stats.failed += 1;
                    self.events.push_back(SenderEvent::Failed {
                        id,
                        reason: FailReason::NotResendable,
                    });
                }
            }
        }
        self.start_blocks(now);
        self.maybe_send_floor(now);
    }

    /// The new connection's peer has no state for this channel (it restarted): every message
    /// in flight fails with [`FailReason::PeerLostState`] instead of being re-sent, because
    /// the peer's dedupe window, which made a re-send safe, is gone. Call it instead of
    /// [`Sender::new_connection`]. Message ids continue.
    pub fn peer_lost_state(&mut self, now: Instant) {
        let ids: Vec<u64> = self.messages.keys().copied().collect();
        for id in ids {
            self.remove_message(id);
            self.stats.failed += 1;
            self.events.push_back(SenderEvent::Failed {
                id,
                reason: FailReason::PeerLostState,
            });
        }
        self.new_connection(now);
    }

    /// Changes the datagram size for blocks built from now on (the path MTU moved).
    pub fn set_max_datagram_size(&mut self, size: usize) {
        self.config.encoder.max_datagram_size = size;
        self.encoder.set_max_datagram_size(size);
        self.copies.set_max_datagram_size(size);
    }

    /// Takes an ack from the peer.
    pub fn handle_ack(&mut self, now: Instant, ack: &AckFrame) {
        self.stamp_reserved(now);
        self.last_ack_at = Some(now);
        // The silence ends: blocks whose hedge came due meanwhile go at the next timer,
        // which is now.
        let silence_ended = self.next_probe.take().is_some();
        if silence_ended {
            self.samples_from = Some(now);
        }
        self.stats.peer_shards_received = self.stats.peer_shards_received.max(ack.shards_received);
        self.governor.on_peer_received(now, ack.shards_received);
        let guard = self.loss_guard();
        if self.congested() {
            self.loss.on_ack_excluded(now, ack.shards_received, guard);
            self.stats.shards_excluded_congested = self.loss.excluded();
        } else {
            self.loss.on_ack(now, ack.shards_received, guard);
        }
        if let Some(lowest) = ack.ranges.last().filter(|r| *r.start() == 0) {
            self.peer_floor = self.peer_floor.max(lowest.end().saturating_add(1));
        }
        let newest = self.ack_ranges(now, ack);
        if let Some(newest) = newest.filter(|_| !silence_ended) {
            self.resend_gaps(now, newest);
        }
        if silence_ended {
            // Blocks sent into the silence (whole, without parity) and still unacked, whose
            // hedge came due: their resend is a retransmission, not a speculative hedge the
            // hedge budget or a congested path may skip (which cost a hedge delay more after
            // every outage). Blocks sent before the silence keep their own schedule.
            let due: Vec<u64> = self
                .hedge_due
                .iter()
                .take_while(|(at, _)| *at <= now)
                .map(|&(_, id)| id)
                .collect();
            for id in due {
                if let Some(b) = self.blocks.get_mut(&id).filter(|b| b.into_silence) {
                    b.attempts = b.attempts.max(1);
                }
            }
        }
        self.maybe_send_floor(now);
    }

    /// How long ago shards must have left for the peer's count to cover them: about one
    /// round trip, the path's own delay (the least round trip seen; the median would include
    /// shard spacing, and a guard too long shifts shards in flight into the count), or the
    /// round trip now if a queue has grown since (the median latency of the last few acked
    /// messages): otherwise shards waiting in our own queue count as lost, the loss
    /// estimate rises with the queue we fill, and buys redundancy that fills it more
    /// (measured at a 1,000 kbit/s bottleneck: an estimate of 30-48% within 200 ms of the
    /// start on a link that lost nothing).
    fn loss_guard(&self) -> Duration {
        let least = self.rtt.quantile(0.0);
        // On the stack: this runs on every ack.
        let mut recent = [Duration::ZERO; RECENT_LATENCIES];
        let n = self.recent_latency.len().min(RECENT_LATENCIES);
        for (slot, &l) in recent.iter_mut().zip(self.recent_latency.iter()) {
            *slot = l;
        }
        let recent = &mut recent[..n];
        recent.sort_unstable();
        recent
            .get(recent.len() / 2)
            .map_or(least, |&now| least.max(now))
    }

    /// Takes a refusal from the peer: each refused message in flight fails at once with
    /// [`FailReason::Refused`] (not delivered; safe to retry).
    pub fn handle_refuse(&mut self, now: Instant, refuse: &RefuseFrame) {
        for range in &refuse.ranges {
            let ids: Vec<u64> = self
                .messages
                .range(range.clone())
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                let m = self.remove_message(id).expect("listed above");
                self.stats.failed += 1;
                self.stats.refused += 1;
                self.events.push_back(SenderEvent::Failed {
                    id,
                    reason: FailReason::Refused(refuse.reason),
                });
                self.release(m.block);
            }
        }
        if refuse.reason == REFUSE_OUT_OF_WINDOW {
            // The peer's window lags ours (a lost FLOOR, or it restarted): tell it again.
            self.floor_repeats = 0;
            self.floor_sent_at = None;
            self.peer_floor = 0;
        }
        self.maybe_send_floor(now);
    }

    /// Whether a FLOOR should go out (now or at its interval): the floor is above what the
    /// peer's acks show, and this value was sent fewer than `FLOOR_REPEATS` times.
    fn floor_wanted(&self) -> bool {
        let floor = self.floor();
        floor > self.peer_floor && (floor != self.floor_sent || self.floor_repeats < FLOOR_REPEATS)
    }

    /// Sends a FLOOR if one is wanted and `floor_interval` passed since the last.
    fn maybe_send_floor(&mut self, now: Instant) {
        if !self.floor_wanted()
            || self
                .floor_sent_at
                .is_some_and(|t| now.saturating_duration_since(t) < self.config.floor_interval)
        {
            return;
        }
        let floor = self.floor();
        if floor != self.floor_sent {
            self.floor_sent = floor;
            self.floor_repeats = 0;
        }
        self.floor_repeats += 1;
        self.floor_sent_at = Some(now);
        self.stats.floors_sent += 1;
        self.out
            .push_back(Frame::Floor(FloorFrame { floor }).to_bytes());
    }

    /// Completes every message an ack's ranges name; returns when the newest of them was
    /// sent.
    fn ack_ranges(&mut self, now: Instant, ack: &AckFrame) -> Option<Instant> {
        // A peer's claimed delay is trusted only up to `max_ack_delay`.
        let ack_delay = Duration::from_micros(ack.ack_delay_us).min(self.config.max_ack_delay);
        let mut newest: Option<Instant> = None;
        for range in &ack.ranges {
            let ids: Vec<(u64, Instant)> = self
                .messages
                .range(range.clone())
                .map(|(&id, m)| (id, m.sent_at))
                .collect();
            for (id, sent_at) in ids {
                newest = Some(newest.map_or(sent_at, |n| n.max(sent_at)));
                self.acked(now, id, ack_delay, false);
            }
        }
        newest
    }

    /// An ack completed a message sent at `newest`: every block with a message sent more
    /// than [`GAP_SLACK`] before it, and nothing of it sent in between, was lost (its answer would
    /// have come first), as QUIC's packet-threshold loss detection reasons (RFC 9002 §6.1.1).
    /// It is resent now, as a retransmission, instead of at its backed-off hedge timer: after
    /// a fade of 100 ms the hedges fired into it were lost too, and the next one was up to a
    /// hedge interval away.
    fn resend_gaps(&mut self, now: Instant, newest: Instant) {
        let Some(cutoff) = newest.checked_sub(GAP_SLACK) else {
            return;
        };
        let mut blocks: Vec<u64> = Vec::new();
        // The oldest few only: at a high rate thousands may be in flight, and a scan of all
        // of them on every ack cost more than the channel had (measured at 75,000
        // payments/s: the sender fell behind and refused most sends); older ones keep their
        // hedge timers.
        for m in self.messages.values().take(GAP_SCAN) {
            if m.sent_at >= cutoff {
                break;
            }
            let Some(block) = m.block else { continue };
            if blocks.last() == Some(&block) {
                continue;
            }
            // Nothing of it sent within the slack before the acked message (its answer
            // would have come), and at most one such resend per half hedge interval, backed
            // off as hedges are: a message the peer holds unacked on purpose (its claim is
            // pending, its application has not taken it) is not resent at every ack.
            let due = self.blocks.get(&block).is_some_and(|b| {
                b.last_tx < cutoff
                    && now.saturating_duration_since(b.last_tx) >= self.hedge_delay(b.hedges) / 2
            });
            if due {
                blocks.push(block);
            }
        }
        for block in blocks {
            if let Some(b) = self.blocks.get_mut(&block) {
                b.attempts = b.attempts.max(1);
                self.stats.gap_resends += 1;
                self.hedge(now, block);
            }
        }
    }

    /// Takes a REPLAYED frame (protocol 2): each message in flight it names is acked as a
    /// replay (its key was delivered before with the same payload).
    pub fn handle_replayed(&mut self, now: Instant, replayed: &crate::wire::ReplayedFrame) {
        for range in &replayed.ranges {
            let ids: Vec<u64> = self
                .messages
                .range(range.clone())
                .map(|(&id, _)| id)
                .collect();
            for id in ids {
                self.acked(now, id, Duration::ZERO, true);
            }
        }
    }

    /// Message `id` (if in flight) is acked: its event, its round-trip sample.
    fn acked(&mut self, now: Instant, id: u64, ack_delay: Duration, replayed: bool) {
        {
            {
                let Some(m) = self.remove_message(id) else {
                    return;
                };
                let latency = now.saturating_duration_since(m.sent_at);
                if self.recent_latency.len() == RECENT_LATENCIES {
                    self.recent_latency.pop_front();
                }
                self.recent_latency.push_back(latency);
                let (shards_sent, hedges, attempts, resent, code) =
                    match m.block.and_then(|b| self.blocks.get(&b)) {
                        Some(b) => (
                            b.shards_sent,
                            b.hedges,
                            b.attempts,
                            b.resent,
                            Some((usize::from(b.block.header().data_shards), b.first_flight)),
                        ),
                        None => (0, 0, 0, false, None),
                    };
                if let Some((k, n)) = code {
                    self.expected_misses += self.expected_miss(k, n);
                    self.stats.acked_after_hedge += u64::from(attempts > 0);
                }
                // Samples come only from blocks acked before any resend: the round trip of a
                // first flight that got through. Two other choices were measured and spiral:
                // - with hedged blocks' latencies too, once more than 5% of first flights are
                //   lost the p95 is set by hedged messages, the hedge delay grows, and so do
                //   their latencies (over quinn at 10% loss: p99 296 ms, in RTT-sized steps);
                // - without them but hedging exactly at the p95, each p95 is taken over samples
                //   cut at the previous one and slides down (4x the expected hedges).
                // Hedging `hedge_slack` beyond the p95 keeps the cut above almost every sample,
                // so the estimate is stable.
                // A block whose hedge was skipped or shed was not resent: its ack is still an
                // unambiguous sample (without it, a path whose round trip grew past the old
                // hedge delay would never be measured again).
                // Sent after the last silence (or connection) began, or acked within twice
                // the transport's round trip (so a path whose round trip grew past the
                // silence threshold is still measured).
                let fresh = self.samples_from.is_none_or(|from| m.sent_at >= from)
                    || self.last_path_rtt.is_some_and(|rtt| latency <= rtt * 2);
                if !resent && fresh {
                    let least = self.min_latency.map_or(latency, |m| m.min(latency));
                    self.min_latency = Some(least);
                    // The delay is subtracted only while the sample stays at or above the
                    // least round trip measured (as QUIC does, RFC 9002 §5.3).
                    let adjusted = latency.saturating_sub(ack_delay);
                    let sample = if adjusted >= least { adjusted } else { latency };
                    self.rtt.push(sample);
                    if self.last_path_rtt.is_none() {
                        self.governor.on_sample(now, sample);
                    }
                }
                self.stats.acked += 1;
                self.events.push_back(SenderEvent::Acked {
                    id,
                    latency,
                    shards_sent,
                    hedges,
                    replayed,
                });
                self.release(m.block);
            }
        }
    }

    /// Fires what is due at `now`: closes lingering batches, hedges late blocks, fails
    /// messages past their deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        // One shard of a block per wake-up: a timer that fires late finds several of a
        // block's shards due, and handed over together they would share a packet (quinn
        // coalesces datagrams queued together), where one loss takes them all. Over real
        // UDP, 1.6 shards went per packet before this (1.05 in virtual time).
        // Each block's due shards in this wake-up: the first goes, the j-th after it waits
        // j spacings more.
        let mut due: HashMap<u64, u32> = HashMap::new();
        let mut later = Vec::new();
        while self
            .spaced
            .first_key_value()
            .is_some_and(|((at, _), _)| *at <= now)
        {
            let (_, (block, frame)) = self.spaced.pop_first().expect("checked");
            if !self.blocks.contains_key(&block) {
                // Every message of it has its outcome (acked while this waited its turn).
                continue;
            }
            let j = due.entry(block).or_insert(0);
            if *j == 0 {
                self.emit(now, [frame]);
            } else {
                later.push((*j, block, frame));
            }
            *j += 1;
        }
        for (j, block, frame) in later {
            self.spaced_seq += 1;
            self.spaced.insert(
                (now + self.config.repair_spacing * j, self.spaced_seq),
                (block, frame),
            );
        }
        self.encoder.handle_timeout(now);
        self.start_blocks(now);
        // Window repairs due; none into a congested or silent path.
        let shed = self.congested() || self.silent();
        let repairs = self.window.poll(now, shed);
        if !repairs.is_empty() {
            self.stats.repair_shards += repairs.len() as u64;
            self.emit(now, repairs);
        }

        while self.deadlines.first().is_some_and(|&(at, _)| at <= now) {
            let (_, id) = self.deadlines.pop_first().expect("checked");
            let Some(m) = self.remove_message(id) else {
                continue;
            };
            self.stats.failed += 1;
            self.events.push_back(SenderEvent::Failed {
                id,
                reason: FailReason::DeadlineExceeded,
            });
            self.release(m.block);
        }
        // Reserved ids whose outcome was never reported are given up like messages.
        self.stamp_reserved(now);
        self.reserved
            .retain(|_, at| at.is_none_or(|deadline| deadline > now));
        // Given-up ids no longer hold the receiver's window.
        self.maybe_send_floor(now);

        if let Some(at) = self.next_probe {
            if self.messages.is_empty() {
                self.next_probe = None;
            } else {
                if at <= now {
                    self.probe(now);
                    self.next_probe = Some(now + self.config.probe_interval);
                }
                return;
            }
        }
        let due: Vec<u64> = self
            .hedge_due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|&(_, id)| id)
            .filter(|id| self.blocks.contains_key(id))
            .collect();
        for id in due {
            self.hedge(now, id);
        }
        // Silence (unless hedges go to a secondary replica, which is another path): the
        // hedges due now were the last; a probe follows at each interval.
        if self.may_fall_silent() && self.silence_at().is_some_and(|at| at <= now) {
            self.stats.silences += 1;
            self.next_probe = Some(now + self.config.probe_interval);
        }
    }

    /// When [`Sender::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        // While silent, the probe replaces every hedge timer.
        let hedge = match self.next_probe {
            Some(probe) => Some(probe),
            None => [
                self.hedge_due.first().map(|&(at, _)| at),
                self.silence_at().filter(|_| self.may_fall_silent()),
            ]
            .into_iter()
            .flatten()
            .min(),
        };
        let deadline = self
            .deadlines
            .first()
            .map(|&(at, _)| at)
            .into_iter()
            .chain(self.reserved.values().flatten().copied())
            .min();
        let spaced = self.spaced.first_key_value().map(|((at, _), _)| *at);
        let floor = self
            .floor_wanted()
            .then(|| self.floor_sent_at.map(|t| t + self.config.floor_interval))
            .flatten();
        let window = self.window.poll_timeout();
        [
            hedge,
            deadline,
            self.encoder.poll_timeout(),
            spaced,
            floor,
            window,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// Whether a secondary replica (sharing the primary's claims store) can take hedge
    /// copies now ([`SenderConfig::hedge_to`]).
    pub fn set_secondary(&mut self, available: bool) {
        self.secondary = available;
        if !available {
            self.secondary_out.clear();
        }
    }

    /// The next datagram for the secondary replica.
    #[must_use]
    pub fn poll_secondary(&mut self) -> Option<Bytes> {
        self.secondary_out.pop_front()
    }

    /// Takes an ack from the secondary replica: it acks messages like the primary's, but
    /// its shard count says nothing about the primary's path, so the loss estimate skips it.
    pub fn handle_secondary_ack(&mut self, now: Instant, ack: &AckFrame) {
        let _ = self.ack_ranges(now, ack);
    }

    /// Queues a whole copy of each unacked message of block `block` for the secondary.
    fn copy_to_secondary(&mut self, block: u64) {
        let ids: Vec<(u64, Bytes)> = self
            .messages
            .iter()
            .filter(|(_, m)| m.block == Some(block))
            .map(|(&id, m)| (id, m.payload.clone()))
            .collect();
        // The secondary sees only hedged messages, so its dedupe window would be all holes:
        // each batch of copies starts with the floor (one small frame; hedges are rare).
        let floor = self.floor();
        if !ids.is_empty() && floor > 0 {
            self.secondary_out
                .push_back(Frame::Floor(FloorFrame { floor }).to_bytes());
        }
        for (id, payload) in ids {
            let Ok(mut copy) = self.copies.encode(id, payload) else {
                continue;
            };
            let mut frames = copy.data_frames();
            frames.extend(copy.next_repair(1));
            self.stats.hedges_to_secondary += 1;
            self.stats.secondary_shards += frames.len() as u64;
            self.secondary_out.extend(frames);
        }
    }

    /// The next outcome.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SenderEvent> {
        self.events.pop_front()
    }

    fn hedge_delay(&self, attempts: u32) -> Duration {
        let mut base = (self
            .rtt
            .quantile(self.config.hedge_quantile)
            .mul_f64(1.0 + self.config.hedge_slack.max(0.0))
            + self.config.hedge_margin)
            .max(self.config.hedge_floor);
        if !self.rtt.is_empty() && self.rtt.len() < YOUNG_SAMPLES {
            // A young channel's percentile is its few first acks' largest: a queue that
            // grows at the start (a narrow link) outruns it, and every hedge then adds to
            // the queue (measured at 1,000 kbit/s: 13 hedges in 75 ms, 33 packets dropped).
            // Until the distribution is known, twice the least round trip, as QUIC's first
            // probe timeout waits for more than one.
            base = base.max(self.rtt.quantile(0.0) * 2);
        }
        base.mul_f64(
            self.config
                .hedge_backoff
                .max(1.0)
                .powi(attempts.min(16) as i32),
        )
        .min(self.config.max_hedge_interval.max(base))
    }

    /// Sends the first flight of every block that is ready (after a FLOOR, if one is due,
    /// so the receiver's window has moved before the shards arrive).
    fn start_blocks(&mut self, now: Instant) {
        while let Some(block) = self.encoder.poll_block() {
            self.pending.push_back((block, None));
        }
        if !self.pending.is_empty() {
            self.maybe_send_floor(now);
        }
        while let Some((mut block, planned)) = self.pending.pop_front() {
            let silent = self.silent();
            if let Some(frame) = self.as_source(now, &block, silent) {
                self.stats.data_shards += 1;
                self.stats.first_flight_bytes += frame.len() as u64;
                self.governor.on_sent(now, 1);
                self.emit(now, [frame]);
                self.track_block(now, block, 1, silent);
                continue;
            }
            let mut frames = block.data_frames();
            self.stats.data_shards += frames.len() as u64;
            self.governor.on_sent(now, frames.len() as u64);
            let mut wanted = planned.unwrap_or_else(|| self.repair_for(&block));
            if self.congested() {
                self.stats.shed_congested += wanted as u64;
                wanted = 0;
            } else if !silent {
                // What the queueing delay leaves room for (all of it on a path that does
                // not queue).
                let allowed = self
                    .governor
                    .allow(usize::from(block.header().data_shards), wanted);
                self.stats.shed_congested += (wanted - allowed) as u64;
                wanted = allowed;
            } else {
                // No redundancy into a silent path: the block is sent whole once it
                // returns.
                wanted = 0;
            }
            let repair = block.next_repair(wanted);
            self.stats.repair_shards += repair.len() as u64;
            let bytes: usize = frames.iter().chain(&repair).map(Bytes::len).sum();
            self.stats.first_flight_bytes += bytes as u64;
            let shards_sent = frames.len() + repair.len();
            frames.extend(repair);
            self.send_spaced(now, block.id(), frames);
            self.track_block(now, block, shards_sent, silent);
        }
    }

    /// Message `id`'s own block, with the parity its first flight carries (`None`: chosen
    /// when it is sent). A message that will travel as a window source is one data shard
    /// with no first-flight parity: the window's repairs protect it, and the block's
    /// parity is there for its hedges.
    fn encode_message(
        &mut self,
        id: u64,
        payload: Bytes,
    ) -> Result<(Block, Option<usize>), EncodeError> {
        let max_datagram = self.config.encoder.max_datagram_size;
        if self.windowed() && RepairWindow::fits(id, payload.len(), max_datagram) {
            if let Ok(block) = self.encoder.encode_split(id, payload.clone(), 1, 0) {
                return Ok((block, Some(0)));
            }
        }
        Ok(match self.plan_for(payload.len()) {
            Some((k, m, exact)) => (
                self.encoder.encode_split(id, payload, k, m)?,
                exact.then_some(usize::from(m)),
            ),
            None => (self.encoder.encode(id, payload)?, None),
        })
    }

    /// A block of one message that fits a datagram, on a protocol-2 path: its first flight
    /// is the message whole, as a window source (the window's repairs are its parity).
    /// `None`: the block goes as shards.
    fn as_source(&mut self, now: Instant, block: &Block, silent: bool) -> Option<Bytes> {
        let header = block.header();
        if !self.windowed() || header.data_shards != 1 || header.lengths.len() != 1 {
            return None;
        }
        let id = header.first_message;
        let body = self.messages.get(&id)?.payload.clone();
        if !RepairWindow::fits(id, body.len(), self.config.encoder.max_datagram_size) {
            return None;
        }
        // No redundancy into a silent path, nor past what the queueing delay allows.
        let urgent = self.messages.get(&id).is_some_and(|m| m.urgent);
        let (ratio, lone) = if silent || self.congested() {
            (0.0, 0)
        } else if self.window.lone(now) {
            // Few sources will follow it: what a block of its own would carry, within what
            // the path leaves (at a low rate that is little traffic; the prior counts).
            let m = self.repair_for(block);
            (
                self.window_ratio(),
                m.min(self.governor.cap().floor() as usize),
            )
        } else {
            (self.window_ratio(), 0)
        };
        // A request and its reply are waited for (a round trip, not a stream of payments):
        // on a path measured lossy, each gets a repair right behind it, so that its loss
        // costs no wait for the repairs later messages earn, within what the queueing delay
        // allows. Measured on the request sweep (seeds 1-5, worst p99 and wire ×): 1% loss
        // 71 -> 41 ms at 1.45 -> 2.41×, 5% 56 -> 46 at 1.86 -> 2.43×, 10% 61 -> 51 at
        // 2.12 -> 2.43×; bursts of 4 85 either way; no loss: nothing spent.
        let urgent = urgent && ratio > 0.0 && self.governor.cap() >= 1.0;
        self.window.send(
            now,
            id,
            &body,
            (ratio, lone, urgent),
            self.config.repair_spacing,
        )
    }

    /// Tracks a block whose first flight (`shards_sent` frames) just went: its messages
    /// point at it and its hedge is scheduled.
    fn track_block(&mut self, now: Instant, block: Block, shards_sent: usize, silent: bool) {
        let id = block.id();
        let mut unacked = 0;
        for msg in block.messages() {
            if let Some(m) = self.messages.get_mut(&msg) {
                m.block = Some(id);
                unacked += 1;
            }
        }
        let next_hedge = now + self.hedge_delay(0);
        self.hedge_due.insert((next_hedge, id));
        self.blocks.insert(
            id,
            BlockState {
                block,
                resent: false,
                first_flight: shards_sent,
                unacked,
                shards_sent,
                hedges: 0,
                attempts: 0,
                next_hedge,
                into_silence: silent,
                last_tx: now,
            },
        );
    }

    fn hedge(&mut self, now: Instant, id: u64) {
        if self.resend_burst_at != Some(now) {
            self.resend_burst_at = Some(now);
            self.resend_burst = 0;
        }
        let allowance = self.config.hedge_burst as f64
            + self.config.hedge_budget * self.stats.first_flight_bytes as f64;
        let spent = self.stats.hedge_bytes;
        let delay = {
            let b = self.blocks.get(&id).expect("caller listed it");
            self.hedge_delay(b.attempts + 1)
        };
        let congested = self.congested();
        let b = self.blocks.get_mut(&id).expect("caller listed it");
        b.attempts += 1;
        self.hedge_due.remove(&(b.next_hedge, id));
        b.next_hedge = now + delay;
        self.hedge_due.insert((b.next_hedge, id));
        let speculative = b.attempts == 1;
        if speculative && congested {
            self.stats.shed_congested += 1;
            return;
        }
        if speculative {
            // Checked before taking parity, so a skipped hedge spends no repair shard.
            let estimate =
                b.block.header().frame_overhead(0) + b.block.header().shard_size as usize;
            let count = usize::from(b.block.header().data_shards).max(self.config.hedge_repair);
            if spent as f64 + (estimate * count.max(1)) as f64 > allowance {
                self.stats.hedges_skipped += 1;
                return;
            }
        }
        // A secondary replica gets a whole copy of the block's messages (its own reassembler
        // holds none of the primary's shards); with `HedgeTo::Other` nothing more goes to the
        // primary. Copies go over another path and are not charged to the hedge budget.
        if self.secondary && self.config.hedge_to != HedgeTo::Same {
            self.copy_to_secondary(id);
            if let Some(b) = self.blocks.get_mut(&id) {
                b.resent = true;
            }
            if self.config.hedge_to == HedgeTo::Other {
                self.blocks.get_mut(&id).expect("caller listed it").hedges += 1;
                if speculative {
                    self.stats.hedges_fired += 1;
                } else {
                    self.stats.retransmits += 1;
                }
                return;
            }
        }
        let b = self.blocks.get_mut(&id).expect("caller listed it");
        // Every resend carries a block's worth, `k` shards: a first flight still unacked at
        // the hedge lost more than its parity covered, often all of it (a burst, a
        // blackout), so one resend that gets through rebuilds it instead of adding one
        // shard per doubling backoff. Congestion too: one shard per resend (tried) left
        // blocks whose earlier shards the peer had evicted, behind a backlog, short of `k`
        // at every try until their deadline (loopback, 50,000 messages/s: p50 up to 970 ms
        // against 0.8 ms with `k`).
        let count = usize::from(b.block.header().data_shards).max(self.config.hedge_repair.max(1));
        // Fresh parity while there is some; then copies of the data shards.
        let mut frames = b.block.next_repair(count);
        if frames.len() < count {
            frames.extend(b.block.data_frames().into_iter().take(count - frames.len()));
        }
        let bytes: usize = frames.iter().map(Bytes::len).sum();
        b.hedges += 1;
        b.resent = true;
        b.last_tx = now;
        b.shards_sent += frames.len();
        if speculative {
            self.stats.hedges_fired += 1;
            self.stats.hedge_bytes += bytes as u64;
        } else {
            self.stats.retransmits += 1;
            self.stats.retransmit_bytes += bytes as u64;
        }
        // Resends due together (after a silence, a stall, a fade) leave RESEND_BURST per
        // `repair_spacing`, not all in one instant: a receiver that was backlogged takes
        // them as its application reads, instead of dropping all but the few that fit
        // (measured: 19 of 100 per round, and 67 of 300 payments past their deadline after
        // a 1.5 s stall, when each message is one frame).
        let after = self.config.repair_spacing * (self.resend_burst / RESEND_BURST);
        self.resend_burst += 1;
        self.send_spaced_after(now, id, frames, after);
    }

    /// Sends the first of `frames` (shards of `block`) now and each next one
    /// `repair_spacing` later, when two of them could share a packet (so one lost packet
    /// costs one shard); otherwise all now.
    fn send_spaced(&mut self, now: Instant, block: u64, frames: Vec<Bytes>) {
        self.send_spaced_after(now, block, frames, Duration::ZERO);
    }

    /// As [`Sender::send_spaced`], the first frame `after` from now (zero: now).
    fn send_spaced_after(
        &mut self,
        now: Instant,
        block: u64,
        mut frames: Vec<Bytes>,
        after: Duration,
    ) {
        if frames.is_empty() {
            return;
        }
        if !after.is_zero() {
            for (j, frame) in frames.into_iter().enumerate() {
                let due = now + after + self.config.repair_spacing * j as u32;
                self.spaced_seq += 1;
                self.spaced.insert((due, self.spaced_seq), (block, frame));
            }
            return;
        }
        let small = frames
            .iter()
            .all(|f| 2 * f.len() <= self.config.encoder.max_datagram_size);
        let first = if self.config.repair_spacing.is_zero() || !small {
            frames.len()
        } else {
            1
        };
        let later = frames.split_off(first.min(frames.len()));
        for (j, frame) in later.into_iter().enumerate() {
            let due = now + self.config.repair_spacing * (j as u32 + 1);
            self.spaced_seq += 1;
            self.spaced.insert((due, self.spaced_seq), (block, frame));
        }
        self.emit(now, frames);
    }

    /// One message of `block` reached an outcome; forget the block when none is left.
    fn release(&mut self, block: Option<u64>) {
        let Some(id) = block else {
            return;
        };
        if let Some(b) = self.blocks.get_mut(&id) {
            b.unacked = b.unacked.saturating_sub(1);
            if b.unacked == 0 {
                self.hedge_due.remove(&(b.next_hedge, id));
                self.blocks.remove(&id);
            }
        }
    }

    /// Forgets a message and its deadline.
    fn remove_message(&mut self, id: u64) -> Option<Message> {
        let m = self.messages.remove(&id)?;
        self.deadlines.remove(&(m.deadline, id));
        self.window.done(id);
        Some(m)
    }
}
