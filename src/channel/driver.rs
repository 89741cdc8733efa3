//! The driver task: one per channel, owning the [`Peer`] and the current connection.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::connect::{Attached, Dialer, ServerInner};
use super::{Channel, ChannelId, ChannelStats, Command, Config, Messages, Receipt, SendError};
use crate::proto::{
    ClaimOutcome, ClaimRequest, Claims, Delivered, FailReason, Peer, SenderEvent, StreamStatus,
};
use crate::wire::{encode_stream_head, Envelope, Frame, Limits, MAX_KEY_LEN, STREAM_DELIVERED};

/// Where a new connection comes from when the current one is lost.
pub(super) enum Reattach {
    /// Nowhere: the channel ends with its connection.
    Never,
    /// A client dials the server again.
    Dial(Box<Dialer>),
    /// A server waits for the client to come back; the [`Server`](super::Server) routes its
    /// new connection here by channel id.
    Registry {
        rx: mpsc::UnboundedReceiver<quinn::Connection>,
        server: Weak<ServerInner>,
    },
}

type Reply = oneshot::Sender<Result<Receipt, SendError>>;
/// A redial in progress: the new connection and whether the server still had the channel.
type Dialing = Pin<Box<dyn Future<Output = Result<(quinn::Connection, Attached), String>> + Send>>;
/// A warm standby being dialled.
type StandbyDialing = Pin<Box<dyn Future<Output = Option<(quinn::Connection, Attached)>> + Send>>;

/// How often a warm standby that is not the most preferred replica tries to move to a more
/// preferred one (a replica that came back rejoins as the standby).
const STANDBY_UPGRADE: Duration = Duration::from_secs(5);

/// How often the primary and the standby are scored ([`Config::switch_ratio`]).
const RANK_EVERY: Duration = Duration::from_secs(1);

/// Consecutive samples in which the standby must score better before the channel moves.
const SWITCH_AFTER: u32 = 3;

/// The least score difference (about milliseconds of round trip) worth a move: on a LAN or
/// loopback, where round trips are fractions of a millisecond, ratios are noise.
const SWITCH_MIN_GAIN_MS: f64 = 10.0;

/// Scores of the replicas a channel is connected to.
#[derive(Debug, Default)]
struct Ranking {
    /// Smoothed score per replica index (for the stats).
    scores: Vec<Option<f64>>,
    /// Smoothed round trip (ms) and packet loss per replica index; loss only once a sample
    /// saw enough packets to say anything (an idle standby sends a keep-alive a second).
    rtt: Vec<Option<f64>>,
    loss: Vec<Option<f64>>,
    /// (sent, lost) packet counters of the primary and the standby at the last sample.
    primary_path: Option<(u64, u64)>,
    standby_path: Option<(u64, u64)>,
    /// Samples in a row in which the standby scored below `switch_ratio` of the primary.
    better: u32,
    next: Option<Instant>,
}

/// Packets a sample must cover before its loss counts.
const LOSS_SAMPLE_MIN: u64 = 50;

/// One sample of a connection: its round trip (ms) and, when enough packets went out since
/// `last`, their loss.
fn sample_path(conn: &quinn::Connection, last: &mut Option<(u64, u64)>) -> (f64, Option<f64>) {
    let path = conn.stats().path;
    let (sent, lost) = (path.sent_packets, path.lost_packets);
    let loss = match *last {
        Some((s0, l0)) if sent >= s0 + LOSS_SAMPLE_MIN => {
            Some((lost.saturating_sub(l0) as f64 / (sent - s0) as f64).min(1.0))
        }
        _ => None,
    };
    if loss.is_some() || last.is_none() {
        *last = Some((sent, lost));
    }
    (conn.rtt().as_secs_f64() * 1000.0, loss)
}

/// A score from a round trip and a loss rate: lower is better.
fn score(rtt_ms: f64, loss: Option<f64>) -> f64 {
    rtt_ms * (1.0 + 10.0 * loss.unwrap_or(0.0))
}

/// A message on the stream path.
struct StreamSend {
    head: Bytes,
    body: Bytes,
    reply: Reply,
    started: Instant,
    deadline: Instant,
    /// The connection generation its task runs on; `None` while it waits for a connection.
    running_on: Option<u64>,
}

/// How a stream send ended, other than with a status byte.
#[derive(Debug)]
enum StreamFailure {
    Deadline,
    /// The peer reset or stopped the stream: it did not deliver the message.
    Refused,
    Connection(String),
}

/// What a stream reader task hands the driver.
enum Inbound {
    Message(Bytes, oneshot::Sender<u8>),
    Invalid(&'static str),
}

enum Event {
    Datagram(Result<Bytes, quinn::ConnectionError>),
    Stream(Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>),
    Inbound(Inbound),
    StreamDone(u64, u64, Result<u8, StreamFailure>),
    Command(Option<Command>),
    /// A new connection, and whether the peer still holds the channel's state.
    Attach(Result<(quinn::Connection, Attached), String>),
    /// A warm standby connection is ready (`None`: an upgrade round found none).
    Standby(Option<(quinn::Connection, Attached)>),
    /// The warm standby connection closed.
    StandbyLost,
    /// A datagram from the warm standby (its acks of hedge copies).
    StandbyDatagram(Bytes),
    /// The store answered a claim.
    Claimed(ClaimRequest, ClaimOutcome),
    /// The application took messages: room to hand over another.
    Room(mpsc::OwnedPermit<Delivered>),
    Timer,
}

/// Delivered messages in the hand-off queue between the driver and [`Messages`]; the rest
/// wait in the receiver, which bounds them by bytes (`ReceiverConfig::max_queued_bytes`).
const HANDOFF: usize = 4;

/// Why messages in flight failed when the server came back without the channel.
const PEER_LOST_STATE: &str =
    "the server came back without this channel's state (it restarted), so the message was not re-sent";

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Starts the driver for a channel over `connection` and returns the application's handles.
pub(super) fn spawn(
    connection: quinn::Connection,
    mut config: Config,
    id: ChannelId,
    reattach: Reattach,
    floor: u64,
) -> Result<(Channel, Messages), SendError> {
    let size = connection
        .max_datagram_size()
        .ok_or(SendError::DatagramsUnsupported)?;
    config.sender.encoder.max_datagram_size = size;
    let permits = Arc::new(Semaphore::new(config.sender.max_in_flight.max(1)));
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (delivered, rx) = mpsc::channel(HANDOFF);
    let stats = Arc::new(Mutex::new(ChannelStats::default()));
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let (inbound_tx, inbound_rx) = mpsc::unbounded_channel();
    // Bounded by the receiver's `max_pending_claims`: one answer per claim asked.
    let (claims_tx, claims_rx) = mpsc::unbounded_channel();
    config.receiver.claims = if config.application_claims {
        Claims::Application
    } else if config.store.is_some() {
        Claims::Owner
    } else {
        Claims::Off
    };
    let current = Arc::new(Mutex::new(Some(connection.clone())));
    let channel = Channel {
        id,
        commands,
        permits,
        stats: stats.clone(),
        current: current.clone(),
        max_message_size: config.max_message_size,
    };
    let mut peer = Peer::new(config.sender.clone(), config.receiver.clone());
    peer.receiver.start_at(floor);
    let driver = Driver {
        peer,
        config,
        id,
        conn: Some(connection),
        generation: 0,
        fresh_since: 0,
        reattach,
        dialing: None,
        detached_until: None,
        waiting: HashMap::new(),
        streams: HashMap::new(),
        done_tx,
        done_rx,
        inbound_tx,
        inbound_rx,
        commands: command_rx,
        commands_open: true,
        delivered,
        parked: VecDeque::new(),
        stream_waiting: HashMap::new(),
        claims_tx,
        claims_rx,
        stats,
        current,
        counters: ChannelStats::default(),
        waiting_since: None,
        standby_upgrade_at: None,
        ranking: Ranking::default(),
        switching: false,
        standby: None,
        standby_dialing: None,
    };
    let span = tracing::debug_span!("surelink_channel", id = %hex(&id));
    tokio::spawn(tracing::Instrument::instrument(driver.run(), span));
    Ok((channel, Messages { rx }))
}

struct Driver {
    peer: Peer,
    config: Config,
    id: ChannelId,
    conn: Option<quinn::Connection>,
    /// Counts connections: a stream task reports which one it ran on.
    generation: u64,
    /// The first generation whose peer came back without the channel's state: a stream
    /// message started before it is not re-sent.
    fresh_since: u64,
    reattach: Reattach,
    dialing: Option<Dialing>,
    /// A server-side channel without a connection ends at this instant.
    detached_until: Option<Instant>,
    waiting: HashMap<u64, Reply>,
    streams: HashMap<u64, StreamSend>,
    done_tx: mpsc::UnboundedSender<(u64, u64, Result<u8, StreamFailure>)>,
    done_rx: mpsc::UnboundedReceiver<(u64, u64, Result<u8, StreamFailure>)>,
    inbound_tx: mpsc::UnboundedSender<Inbound>,
    inbound_rx: mpsc::UnboundedReceiver<Inbound>,
    commands: mpsc::UnboundedReceiver<Command>,
    commands_open: bool,
    delivered: mpsc::Sender<Delivered>,
    /// Stream messages that arrived while the receiver was backlogged, answered once the
    /// application catches up (at most QUIC's concurrent stream limit).
    parked: VecDeque<(Bytes, oneshot::Sender<u8>)>,
    /// Stream messages awaiting their claim, by id.
    stream_waiting: HashMap<u64, oneshot::Sender<u8>>,
    claims_tx: mpsc::UnboundedSender<(ClaimRequest, ClaimOutcome)>,
    claims_rx: mpsc::UnboundedReceiver<(ClaimRequest, ClaimOutcome)>,
    stats: Arc<Mutex<ChannelStats>>,
    /// The connection in use, shared with the handles for its byte counters.
    current: Arc<Mutex<Option<quinn::Connection>>>,
    /// The driver's own counters (the peer's are copied in at each step).
    counters: ChannelStats,
    /// Since when messages have awaited their outcome with nothing heard from the peer
    /// (reset by every datagram received); drives `failover_after`.
    waiting_since: Option<Instant>,
    /// When the standby next tries to move to a more preferred replica.
    standby_upgrade_at: Option<Instant>,
    ranking: Ranking,
    /// Set while moving to the standby on purpose (a switch, not a failover).
    switching: bool,
    /// A warm standby connection to another replica, ready to take over.
    standby: Option<(quinn::Connection, Attached)>,
    standby_dialing: Option<StandbyDialing>,
}

async fn read_datagram(conn: &Option<quinn::Connection>) -> Result<Bytes, quinn::ConnectionError> {
    match conn {
        Some(c) => c.read_datagram().await,
        None => std::future::pending().await,
    }
}

async fn accept_bi(
    conn: &Option<quinn::Connection>,
) -> Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError> {
    match conn {
        Some(c) => c.accept_bi().await,
        None => std::future::pending().await,
    }
}

async fn next_connection(
    reattach: &mut Reattach,
    dialing: &mut Option<Dialing>,
) -> Result<(quinn::Connection, Attached), String> {
    match reattach {
        // The client chose this channel by id: it keeps its own state, whatever ours was.
        Reattach::Registry { rx, .. } => match rx.recv().await {
            Some(c) => Ok((c, Attached::Resumed)),
            None => std::future::pending().await,
        },
        Reattach::Dial(_) => match dialing {
            Some(f) => {
                let r = f.as_mut().await;
                *dialing = None;
                r
            }
            None => std::future::pending().await,
        },
        Reattach::Never => std::future::pending().await,
    }
}

/// A slot in the hand-off queue once the application takes a message. The sender is cloned
/// only when the branch is polled (a disabled `select!` branch is built but never polled).
async fn room(
    delivered: &mpsc::Sender<Delivered>,
) -> Result<mpsc::OwnedPermit<Delivered>, mpsc::error::SendError<()>> {
    delivered.clone().reserve_owned().await
}

async fn next_standby(
    dialing: &mut Option<StandbyDialing>,
) -> Option<(quinn::Connection, Attached)> {
    match dialing {
        Some(f) => {
            let r = f.as_mut().await;
            *dialing = None;
            r
        }
        None => std::future::pending().await,
    }
}

async fn standby_closed(standby: &Option<(quinn::Connection, Attached)>) {
    match standby {
        Some((c, _)) => {
            c.closed().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

impl Driver {
    async fn run(mut self) {
        self.start_standby();
        self.ranking.next = Some(now() + RANK_EVERY);
        let reason = loop {
            let conn = self.conn.clone();
            let standby = self.standby.as_ref().map(|(c, _)| c.clone());
            let timer = self.next_timer();
            let streams = self.config.streams;
            // Arrivals before timers: an ack and the hedge timer due at the same instant must
            // not hedge (in virtual time such ties are common: measured, an unbiased select
            // hedged ~80% of messages on a loss-free link).
            let event = tokio::select! {
                biased;
                d = read_datagram(&conn) => Event::Datagram(d),
                s = accept_bi(&conn), if streams => Event::Stream(s),
                Some(m) = self.inbound_rx.recv() => Event::Inbound(m),
                Some((id, generation, r)) = self.done_rx.recv() => Event::StreamDone(id, generation, r),
                Some((request, outcome)) = self.claims_rx.recv() => Event::Claimed(request, outcome),
                c = self.commands.recv(), if self.commands_open => Event::Command(c),
                a = next_connection(&mut self.reattach, &mut self.dialing) => Event::Attach(a),
                s = next_standby(&mut self.standby_dialing) => Event::Standby(s),
                _ = standby_closed(&self.standby) => Event::StandbyLost,
                Ok(d) = read_datagram(&standby) => Event::StandbyDatagram(d),
                Ok(p) = room(&self.delivered), if self.peer.receiver.has_deliveries() => Event::Room(p),
                _ = sleep_until(timer) => Event::Timer,
            };
            if let Some(reason) = self.handle(event) {
                break reason;
            }
            self.flush();
        };
        self.finish(reason);
    }

    fn next_timer(&self) -> Option<Instant> {
        let waiting_streams = self
            .streams
            .values()
            .filter(|s| s.running_on.is_none())
            .map(|s| s.deadline);
        let silence = self.failover_deadline();
        [
            self.peer.poll_timeout(),
            self.detached_until,
            silence,
            self.standby_upgrade_at,
            self.ranking.next,
        ]
        .into_iter()
        .flatten()
        .chain(waiting_streams)
        .min()
    }

    /// Handles one event; `Some(reason)` ends the channel.
    fn handle(&mut self, event: Event) -> Option<String> {
        let now = now();
        match event {
            Event::Datagram(Ok(d)) => {
                self.waiting_since = self.waiting_since.map(|_| now);
                self.peer.handle_datagram(now, d);
            }
            Event::Datagram(Err(e)) | Event::Stream(Err(e)) => return self.lost(now, e),
            Event::Stream(Ok((send, recv))) => {
                let limit = self.config.max_message_size + MAX_KEY_LEN + 32;
                tokio::spawn(read_stream_message(
                    send,
                    recv,
                    limit,
                    self.config.sender.deadline,
                    self.inbound_tx.clone(),
                ));
            }
            Event::Inbound(Inbound::Message(message, reply)) => {
                self.counters.stream_messages_received += 1;
                if self.peer.receiver.backlogged() || !self.parked.is_empty() {
                    self.parked.push_back((message, reply));
                } else {
                    self.take_stream_message(now, message, reply);
                }
            }
            Event::Claimed(request, outcome) => {
                self.peer.receiver.claim_done(now, &request, outcome);
            }
            Event::Room(permit) => {
                if let Some(message) = self.peer.receiver.poll_delivery() {
                    deliver(permit, message);
                }
            }
            Event::Inbound(Inbound::Invalid(reason)) => self.peer.count_invalid_reason(reason),
            Event::StreamDone(id, generation, result) => {
                self.stream_done(now, id, generation, result)
            }
            Event::Command(Some(Command::Send {
                key,
                payload,
                reply,
            })) => self.send(now, key, payload, reply),
            Event::Command(Some(Command::Confirm { id, outcome })) => {
                self.peer.receiver.confirm(now, id, outcome);
            }
            Event::Command(Some(Command::Close)) => {
                if let Some(c) = &self.conn {
                    c.close(0u32.into(), b"closed");
                }
                return Some("the channel was closed by the application".into());
            }
            Event::Command(None) => {
                self.commands_open = false;
                if self.conn.is_none() && self.delivered.is_closed() {
                    return Some("every handle was dropped".into());
                }
            }
            Event::Attach(Ok((c, attached))) => self.attach(now, c, attached),
            Event::Standby(Some((c, attached))) => {
                tracing::debug!(replica = %c.remote_address(), "surelink channel: warm standby ready");
                if let Some((old, _)) = self.standby.take() {
                    old.close(0u32.into(), b"replaced by a preferred replica");
                }
                // Hedge copies only to a replica that judges by the shared claims store:
                // anything else could deliver a copy as a second message.
                self.peer.sender.set_secondary(attached == Attached::Claims);
                self.standby = Some((c, attached));
                self.ranking.standby_path = None;
                self.ranking.better = 0;
                self.schedule_upgrade(now);
            }
            Event::Standby(None) => self.schedule_upgrade(now),
            Event::StandbyLost => {
                tracing::debug!("surelink channel: warm standby lost");
                self.standby = None;
                self.peer.sender.set_secondary(false);
                self.start_standby();
            }
            Event::StandbyDatagram(d) => {
                if let Ok(Frame::Ack(ack)) = Frame::decode(d, &Limits::default()) {
                    self.peer.sender.handle_secondary_ack(now, &ack);
                }
            }
            Event::Attach(Err(reason)) => return Some(reason),
            Event::Timer => {
                if self.ranking.next.is_some_and(|at| at <= now) {
                    self.rank(now);
                }
                if self.standby_upgrade_at.is_some_and(|at| at <= now) {
                    self.standby_upgrade_at = None;
                    self.upgrade_standby();
                }
                if self.failover_deadline().is_some_and(|at| at <= now) {
                    tracing::info!("surelink channel: replica silent; failing over");
                    if let Some(c) = &self.conn {
                        c.close(0u32.into(), b"silent: failing over");
                    }
                    self.waiting_since = None;
                    return self.lost(now, quinn::ConnectionError::TimedOut);
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
                        let _ = s.reply.send(Err(SendError::Timeout { id }));
                    }
                }
                if self.detached_until.is_some_and(|t| t <= now) {
                    return Some(format!(
                        "the peer did not reconnect within {:?}",
                        self.config.channel_ttl
                    ));
                }
            }
        }
        None
    }

    fn send(&mut self, now: Instant, key: Option<Bytes>, payload: Bytes, reply: Reply) {
        let len = Envelope::overhead(key.as_deref()) + payload.len();
        let threshold = self
            .config
            .stream_threshold
            .min(self.config.receiver.reassembler.limits.max_message_len as usize);
        if len <= threshold {
            match self.peer.sender.send_keyed(now, key.as_deref(), &payload) {
                Ok(id) => {
                    self.waiting.insert(id, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(SendError::Rejected(e)));
                }
            }
            return;
        }
        if !self.config.streams {
            let _ = reply.send(Err(SendError::TooLarge {
                len,
                max: threshold,
            }));
            return;
        }
        if let Some(k) = &key {
            if k.is_empty() || k.len() > MAX_KEY_LEN {
                let _ = reply.send(Err(SendError::Rejected(
                    crate::proto::SendError::InvalidKey { len: k.len() },
                )));
                return;
            }
        }
        let id = self.peer.sender.reserve_id();
        self.counters.stream_messages_sent += 1;
        self.streams.insert(
            id,
            StreamSend {
                head: encode_stream_head(id),
                body: Envelope::encode(key.as_deref(), &payload),
                reply,
                started: now,
                deadline: now + self.config.sender.deadline,
                running_on: None,
            },
        );
        self.start_stream(id);
    }

    /// Starts the task of stream message `id` on the current connection, if there is one.
    fn start_stream(&mut self, id: u64) {
        let (Some(conn), Some(s)) = (self.conn.clone(), self.streams.get_mut(&id)) else {
            return;
        };
        s.running_on = Some(self.generation);
        let (head, body, deadline) = (s.head.clone(), s.body.clone(), s.deadline);
        let (done, generation) = (self.done_tx.clone(), self.generation);
        tokio::spawn(async move {
            let result = send_stream_message(conn, head, body, deadline).await;
            let _ = done.send((id, generation, result));
        });
    }

    fn stream_done(
        &mut self,
        now: Instant,
        id: u64,
        generation: u64,
        result: Result<u8, StreamFailure>,
    ) {
        let outcome = match result {
            Ok(STREAM_DELIVERED) => Ok(()),
            Ok(_) | Err(StreamFailure::Refused) => Err(SendError::Refused { id }),
            Err(StreamFailure::Deadline) => Err(SendError::Timeout { id }),
            Err(StreamFailure::Connection(reason)) => {
                let Some(s) = self.streams.get_mut(&id) else {
                    return;
                };
                let may_retry = !matches!(self.reattach, Reattach::Never) && now < s.deadline;
                if generation < self.fresh_since {
                    Err(SendError::ConnectionLost {
                        reason: PEER_LOST_STATE.into(),
                    })
                } else if !may_retry {
                    Err(SendError::ConnectionLost { reason })
                } else {
                    // Same id on the next connection: the peer's dedupe window makes the
                    // retry safe even if the first attempt was delivered.
                    s.running_on = None;
                    if generation != self.generation {
                        self.start_stream(id);
                    }
                    return;
                }
            }
        };
        let Some(s) = self.streams.remove(&id) else {
            return;
        };
        let _ = s.reply.send(outcome.map(|()| Receipt {
            id,
            latency: now.saturating_duration_since(s.started),
            shards_sent: 0,
            hedges: 0,
        }));
    }

    /// The connection is gone; `Some(reason)` when the channel ends with it.
    fn lost(&mut self, now: Instant, e: quinn::ConnectionError) -> Option<String> {
        let reason = e.to_string();
        tracing::debug!(%reason, "surelink channel: connection lost");
        self.retire_connection();
        match &self.reattach {
            Reattach::Never => Some(reason),
            Reattach::Dial(dialer) => {
                if !super::connect::retryable(&e) {
                    return Some(reason);
                }
                // A warm standby takes over at once (its Hello's floor is older, hence lower:
                // the store judges the ids in between).
                if let Some((conn, attached)) = self.standby.take() {
                    self.standby_dialing = None;
                    self.peer.sender.set_secondary(false);
                    self.counters.standby_failovers += 1;
                    self.attach(now, conn, attached);
                    return None;
                }
                let mut dialer = (**dialer).clone();
                dialer.floor = self.floor();
                self.dialing = Some(Box::pin(
                    dialer.redial(self.config.reconnect.clone(), reason),
                ));
                None
            }
            Reattach::Registry { .. } => {
                if matches!(e, quinn::ConnectionError::LocallyClosed) {
                    return Some(reason);
                }
                self.detached_until = Some(now + self.config.channel_ttl);
                None
            }
        }
    }

    /// Moves the channel to a new connection. When the peer still holds the channel
    /// (`resumed`), unacked messages are re-sent on it with their ids and stream messages
    /// restart; when it lost its state, they fail with an unknown outcome instead (a re-send
    /// could be delivered twice).
    fn attach(&mut self, now: Instant, conn: quinn::Connection, attached: Attached) {
        let Some(size) = conn.max_datagram_size() else {
            conn.close(1u32.into(), b"datagrams required");
            return;
        };
        if let Some(old) = &self.conn {
            old.close(0u32.into(), b"replaced by a newer connection");
        }
        self.retire_connection();
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
        tracing::debug!("surelink channel: attached to a new connection");
        self.peer.sender.set_max_datagram_size(size);
        self.generation += 1;
        if attached == Attached::Resumed {
            self.peer.new_connection(now);
        } else if attached == Attached::Claims {
            tracing::debug!("surelink channel: a replica sharing the claims store took over");
            self.peer.peer_claims_only(now);
        } else {
            tracing::warn!("surelink channel: the server lost the channel's state; messages in flight fail with an unknown outcome");
            self.peer.peer_lost_state(now);
            self.fresh_since = self.generation;
            let lost: Vec<u64> = self
                .streams
                .iter()
                .filter(|(_, s)| s.running_on.is_none())
                .map(|(&id, _)| id)
                .collect();
            for id in lost {
                if let Some(s) = self.streams.remove(&id) {
                    let _ = s.reply.send(Err(SendError::ConnectionLost {
                        reason: PEER_LOST_STATE.into(),
                    }));
                }
            }
        }
        self.counters.reconnects += 1;
        // The new connection gets its own `failover_after` from now.
        self.waiting_since = None;
        if let Reattach::Dial(dialer) = &mut self.reattach {
            if let Some(index) = dialer.replica_of(conn.remote_address()) {
                if index != dialer.current && self.switching {
                    self.counters.switches += 1;
                    tracing::info!(
                        replica = index,
                        "surelink channel: switched to a better replica"
                    );
                } else if index != dialer.current {
                    self.counters.failovers += 1;
                    tracing::info!(replica = index, "surelink channel: failed over");
                }
                dialer.current = index;
            }
        }
        self.switching = false;
        self.ranking.primary_path = None;
        self.ranking.better = 0;

        self.detached_until = None;
        self.conn = Some(conn);
        self.start_standby();
        let waiting: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| s.running_on.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            self.start_stream(id);
        }
    }

    /// Starts dialling a warm standby, for a channel over several replicas without one.
    fn start_standby(&mut self) {
        let Reattach::Dial(dialer) = &self.reattach else {
            return;
        };
        if !self.config.warm_standby
            || dialer.replicas() < 2
            || self.standby.is_some()
            || self.standby_dialing.is_some()
        {
            return;
        }
        let mut dialer = (**dialer).clone();
        dialer.floor = self.floor();
        let current = dialer.current;
        let candidates = (0..dialer.replicas()).filter(|&i| i != current).collect();
        let (timeout, pause) = (
            self.config.reconnect.attempt_timeout,
            self.config.reconnect.max_backoff,
        );
        self.standby_dialing = Some(Box::pin(dialer.standby(candidates, timeout, Some(pause))));
    }

    /// Scores the primary and the standby; moves to the standby when it has scored much
    /// better for [`SWITCH_AFTER`] samples in a row.
    fn rank(&mut self, now: Instant) {
        self.ranking.next = None;
        let Reattach::Dial(dialer) = &self.reattach else {
            return;
        };
        if dialer.replicas() < 2 {
            return;
        }
        self.ranking.next = Some(now + RANK_EVERY);
        let r = &mut self.ranking;
        let n = dialer.replicas();
        r.scores.resize(n, None);
        r.rtt.resize(n, None);
        r.loss.resize(n, None);
        let smooth = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.7 * o + 0.3 * new));
        let mut sample = |conn: &quinn::Connection, last: &mut Option<(u64, u64)>| {
            let index = dialer.replica_of(conn.remote_address())?;
            let (rtt, loss) = sample_path(conn, last);
            r.rtt[index] = smooth(r.rtt[index], rtt);
            if let Some(l) = loss {
                r.loss[index] = smooth(r.loss[index], l);
            }
            r.scores[index] = r.rtt[index].map(|rtt| score(rtt, r.loss[index]));
            Some(index)
        };
        let primary = self
            .conn
            .as_ref()
            .and_then(|c| sample(c, &mut r.primary_path));
        let standby = self
            .standby
            .as_ref()
            .and_then(|(c, _)| sample(c, &mut r.standby_path));
        let ratio = self.config.switch_ratio;
        // Loss counts only where both replicas have a measure of it; otherwise the round
        // trips alone decide.
        let better = match (primary, standby) {
            (Some(p), Some(s)) if ratio > 0.0 => {
                let both = r.loss[p].is_some() && r.loss[s].is_some();
                let of = |i: usize| {
                    let rtt = r.rtt[i].unwrap_or(f64::INFINITY);
                    score(rtt, if both { r.loss[i] } else { None })
                };
                of(s) < ratio * of(p) && of(p) - of(s) > SWITCH_MIN_GAIN_MS
            }
            _ => false,
        };
        r.better = if better { r.better + 1 } else { 0 };
        if r.better >= SWITCH_AFTER {
            self.switch_to_standby(now);
        }
    }

    /// Moves to the warm standby on purpose: it measured much better than the primary. Like
    /// a failover, unacked messages are re-sent there with their ids (the shared store
    /// recognises those the old primary delivered).
    fn switch_to_standby(&mut self, now: Instant) {
        let Some((conn, attached)) = self.standby.take() else {
            return;
        };
        if let Some(old) = &self.conn {
            old.close(0u32.into(), b"switching to a better replica");
        }
        self.retire_connection();
        self.standby_dialing = None;
        self.ranking.standby_path = None;
        self.peer.sender.set_secondary(false);
        self.switching = true;
        self.attach(now, conn, attached);
    }

    /// The replicas more preferred than the standby's (and not the one in use), in order.
    fn better_standbys(&self) -> Vec<usize> {
        let (Reattach::Dial(dialer), Some((standby, _))) = (&self.reattach, &self.standby) else {
            return Vec::new();
        };
        let Some(at) = dialer.replica_of(standby.remote_address()) else {
            return Vec::new();
        };
        (0..at).filter(|&i| i != dialer.current).collect()
    }

    /// Plans the next attempt to move the standby to a more preferred replica, if any.
    fn schedule_upgrade(&mut self, now: Instant) {
        self.standby_upgrade_at =
            (!self.better_standbys().is_empty()).then_some(now + STANDBY_UPGRADE);
    }

    /// One round of dialling the replicas more preferred than the standby; one that answers
    /// replaces it (a recovered replica rejoins as the standby).
    fn upgrade_standby(&mut self) {
        let candidates = self.better_standbys();
        let Reattach::Dial(dialer) = &self.reattach else {
            return;
        };
        if candidates.is_empty() || self.standby_dialing.is_some() {
            return;
        }
        let mut dialer = (**dialer).clone();
        dialer.floor = self.floor();
        let timeout = self.config.reconnect.attempt_timeout;
        self.standby_dialing = Some(Box::pin(dialer.standby(candidates, timeout, None)));
    }

    /// The lowest message id still awaiting its outcome (datagram or stream path), or the
    /// next id: every id below was acked or given up.
    fn floor(&self) -> u64 {
        let streams = self.streams.keys().min().copied();
        let sender = self.peer.sender.floor();
        streams.map_or(sender, |s| s.min(sender))
    }

    /// Drops the current connection, keeping its byte counts.
    fn retire_connection(&mut self) {
        if let Some(old) = self.conn.take() {
            let s = old.stats();
            self.counters.udp_bytes_sent += s.udp_tx.bytes;
            self.counters.udp_bytes_received += s.udp_rx.bytes;
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn flush_counters(&self) {
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.udp_bytes_sent = self.counters.udp_bytes_sent;
        st.udp_bytes_received = self.counters.udp_bytes_received;
    }

    /// Sends what the peer produced, completes sends, hands over deliveries, updates stats.
    fn flush(&mut self) {
        self.hand_over();
        while !self.parked.is_empty() && !self.peer.receiver.backlogged() {
            let (message, reply) = self.parked.pop_front().expect("not empty");
            self.take_stream_message(now(), message, reply);
            self.hand_over();
        }
        while let Some(request) = self.peer.receiver.poll_claim() {
            self.start_claim(request);
        }
        while let Some((id, status)) = self.peer.receiver.poll_stream_answer() {
            if let Some(reply) = self.stream_waiting.remove(&id) {
                let _ = reply.send(status);
            }
        }
        while let Some(d) = self.peer.sender.poll_secondary() {
            if let Some((c, _)) = &self.standby {
                if c.send_datagram(d).is_err() {
                    self.counters.send_errors += 1;
                }
            }
        }
        while let Some(d) = self.peer.poll_transmit() {
            // Without a connection, datagrams are dropped: what matters is re-sent on the
            // next connection (`Peer::new_connection`).
            if let Some(c) = &self.conn {
                if c.send_datagram(d).is_err() {
                    self.counters.send_errors += 1;
                }
            }
        }
        while let Some(event) = self.peer.sender.poll_event() {
            let (id, outcome) = match event {
                SenderEvent::Acked {
                    id,
                    latency,
                    shards_sent,
                    hedges,
                } => (
                    id,
                    Ok(Receipt {
                        id,
                        latency,
                        shards_sent,
                        hedges,
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
                SenderEvent::Failed { id, .. } => (id, Err(SendError::Timeout { id })),
            };
            if let Some(reply) = self.waiting.remove(&id) {
                let _ = reply.send(outcome);
            }
        }
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.sender = self.peer.sender.stats();
        st.loss_estimate = self.peer.sender.loss_estimate();
        st.loss_observed = self.peer.sender.loss_observed();
        st.rtt_p50 = self.peer.sender.rtt().quantile(0.5);
        st.rtt_p95 = self.peer.sender.rtt().quantile(0.95);
        st.hedge_budget_used = self.peer.sender.hedge_budget_used();
        st.receiver = self.peer.receiver.stats();
        st.reassembly = self.peer.receiver.reassembly();
        // Cloned only when it changed: this runs once per datagram.
        if self.peer.invalid_frames().total() != st.invalid_frames.values().sum::<u64>() {
            st.invalid_frames = self.peer.invalid_frames().by_reason.clone();
        }
        st.send_errors = self.counters.send_errors;
        st.reconnects = self.counters.reconnects;
        st.failovers = self.counters.failovers;
        st.standby_failovers = self.counters.standby_failovers;
        st.standby_ready = self.standby.is_some();
        st.switches = self.counters.switches;
        if st.replica_scores != self.ranking.scores {
            st.replica_scores = self.ranking.scores.clone();
        }
        st.stream_messages_sent = self.counters.stream_messages_sent;
        st.stream_messages_received = self.counters.stream_messages_received;
        st.udp_bytes_sent = self.counters.udp_bytes_sent;
        st.udp_bytes_received = self.counters.udp_bytes_received;
        st.in_flight = self.peer.sender.in_flight() + self.streams.len();
        drop(st);
        let waiting = self.peer.sender.in_flight() + self.streams.len() > 0;
        self.waiting_since = match (waiting, self.waiting_since) {
            (false, _) => None,
            (true, None) => Some(now()),
            (true, since) => since,
        };
    }

    /// When a silent replica is given up ([`Config::failover_after`]): only for a channel
    /// over several replicas, with a connection, while messages await their outcome.
    fn failover_deadline(&self) -> Option<Instant> {
        let Reattach::Dial(dialer) = &self.reattach else {
            return None;
        };
        if dialer.replicas() < 2 || self.conn.is_none() {
            return None;
        }
        self.waiting_since.map(|t| t + self.config.failover_after)
    }

    /// Takes a stream message: its status byte now, or once its claim is answered.
    fn take_stream_message(&mut self, now: Instant, message: Bytes, reply: oneshot::Sender<u8>) {
        match self.peer.handle_stream_message(now, message) {
            StreamStatus::Now(status) => {
                let _ = reply.send(status);
            }
            // A re-send of a message still being claimed takes over the answer (the
            // older stream's reader then gives up).
            StreamStatus::Later(id) => {
                self.stream_waiting.insert(id, reply);
            }
        }
    }

    /// Claims a message in the store, retrying with doubling backoff for up to
    /// `claim_timeout`; the answer comes back as [`Event::Claimed`].
    fn start_claim(&self, request: ClaimRequest) {
        let Some(store) = self.config.store.clone() else {
            // Claims mode without a store cannot happen (spawn sets one with the other);
            // answer anyway so nothing waits forever.
            let _ = self.claims_tx.send((request, ClaimOutcome::Failed));
            return;
        };
        let claim = crate::store::Claim {
            channel: self.id,
            message: request.id,
            key: request.key.clone(),
            // Anonymous until the channel layer sets a per-receiver token (issue 13 case 2).
            claimant: 0,
        };
        let (tx, timeout) = (self.claims_tx.clone(), self.config.claim_timeout);
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + timeout;
            let mut backoff = Duration::from_millis(10);
            let outcome = loop {
                match store.claim(&claim).await {
                    Ok(crate::store::Claimed::Now) => break ClaimOutcome::Now,
                    Ok(crate::store::Claimed::Before) => break ClaimOutcome::Before,
                    Err(e) => {
                        tracing::warn!(error = %e, id = claim.message, "surelink: claim failed");
                        if tokio::time::Instant::now() + backoff > give_up {
                            break ClaimOutcome::Failed;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                    }
                }
            };
            let _ = tx.send((request, outcome));
        });
    }

    /// Hands delivered messages to [`Messages`] while its queue has room.
    fn hand_over(&mut self) {
        while self.peer.receiver.has_deliveries() {
            match self.delivered.try_reserve() {
                Ok(permit) => {
                    let message = self.peer.receiver.poll_delivery().expect("has deliveries");
                    deliver(permit, message);
                }
                Err(mpsc::error::TrySendError::Full(())) => return,
                // The application dropped its `Messages`: nobody will take these.
                Err(mpsc::error::TrySendError::Closed(())) => {
                    while self.peer.receiver.poll_delivery().is_some() {}
                    return;
                }
            }
        }
    }

    /// The channel ends: every pending send learns that its outcome is unknown.
    fn finish(mut self, reason: String) {
        tracing::debug!(%reason, "surelink channel: stopped");
        self.flush();
        for (_, reply) in self.waiting.drain() {
            let _ = reply.send(Err(SendError::ConnectionLost {
                reason: reason.clone(),
            }));
        }
        for (_, s) in self.streams.drain() {
            let _ = s.reply.send(Err(SendError::ConnectionLost {
                reason: reason.clone(),
            }));
        }
        if let Some(c) = &self.conn {
            c.close(0u32.into(), b"channel stopped");
        }
        if let Some((c, _)) = self.standby.take() {
            c.close(0u32.into(), b"channel stopped");
        }
        self.retire_connection();
        self.flush_counters();
        if let Reattach::Registry { server, .. } =
            std::mem::replace(&mut self.reattach, Reattach::Never)
        {
            // The receiver half was dropped just now, so the registry entry is stale.
            if let Some(server) = server.upgrade() {
                server.remove_closed(&self.id);
            }
        }
        // Messages acked but still queued here reach the application all the same, and so
        // do those whose claim is being made now: a claim that succeeds records a delivery
        // (a retry elsewhere will find it claimed), so its message must be delivered.
        let (mut peer, mut claims, delivered) = (self.peer, self.claims_rx, self.delivered);
        let claim_timeout = self.config.claim_timeout;
        if !peer.receiver.has_deliveries() && peer.receiver.stats().claims_pending == 0 {
            return;
        }
        tokio::spawn(async move {
            let give_up = tokio::time::Instant::now() + claim_timeout;
            loop {
                while let Some(message) = peer.receiver.poll_delivery() {
                    let Ok(permit) = delivered.reserve().await else {
                        return;
                    };
                    deliver(permit, message);
                }
                if peer.receiver.stats().claims_pending == 0 {
                    return;
                }
                match tokio::time::timeout_at(give_up, claims.recv()).await {
                    Ok(Some((request, outcome))) => {
                        peer.receiver.claim_done(now(), &request, outcome);
                    }
                    _ => return,
                }
            }
        });
    }
}

/// Hands one message to the application, in its `surelink.deliver` span.
fn deliver<P: HandOff>(permit: P, message: Delivered) {
    let span = tracing::debug_span!(
        "surelink.deliver",
        id = message.id,
        len = message.payload.len()
    );
    let _entered = span.enter();
    tracing::trace!("handed to the application");
    permit.hand(message);
}

/// A reserved slot in the hand-off queue (borrowed or owned).
trait HandOff {
    fn hand(self, message: Delivered);
}

impl HandOff for mpsc::Permit<'_, Delivered> {
    fn hand(self, message: Delivered) {
        self.send(message);
    }
}

impl HandOff for mpsc::OwnedPermit<Delivered> {
    fn hand(self, message: Delivered) {
        self.send(message);
    }
}

async fn send_stream_message(
    conn: quinn::Connection,
    head: Bytes,
    body: Bytes,
    deadline: Instant,
) -> Result<u8, StreamFailure> {
    let work = async {
        let lost = |e: &dyn std::fmt::Display| StreamFailure::Connection(e.to_string());
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        for part in [&head, &body] {
            send.write_all(part).await.map_err(|e| match e {
                quinn::WriteError::Stopped(_) => StreamFailure::Refused,
                e => lost(&e),
            })?;
        }
        send.finish().map_err(|e| lost(&e))?;
        let status = recv.read_to_end(1).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)) => StreamFailure::Refused,
            e => lost(&e),
        })?;
        status
            .first()
            .copied()
            .ok_or_else(|| StreamFailure::Connection("the stream ended without a status".into()))
    };
    match tokio::time::timeout_at(deadline.into(), work).await {
        Ok(result) => result,
        Err(_) => Err(StreamFailure::Deadline),
    }
}

/// Reads one stream message (at most `limit` bytes, within `timeout`), hands it to the driver
/// and writes back the status it answers.
async fn read_stream_message(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    limit: usize,
    timeout: Duration,
    inbound: mpsc::UnboundedSender<Inbound>,
) {
    let message = match tokio::time::timeout(timeout, recv.read_to_end(limit)).await {
        Ok(Ok(m)) => m,
        Ok(Err(quinn::ReadToEndError::TooLong)) => {
            let _ = inbound.send(Inbound::Invalid("stream_too_long"));
            let _ = send.reset(1u32.into());
            let _ = recv.stop(1u32.into());
            return;
        }
        // The connection or the stream broke: the sender retries or reports.
        Ok(Err(_)) => return,
        Err(_) => {
            let _ = inbound.send(Inbound::Invalid("stream_timeout"));
            let _ = send.reset(1u32.into());
            let _ = recv.stop(1u32.into());
            return;
        }
    };
    let (reply, status) = oneshot::channel();
    if inbound
        .send(Inbound::Message(Bytes::from(message), reply))
        .is_err()
    {
        return;
    }
    let Ok(status) = status.await else {
        return;
    };
    if send.write_all(&[status]).await.is_ok() {
        let _ = send.finish();
    }
}

fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
