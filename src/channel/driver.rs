//! The driver task: one per channel. It owns a [`Link`] (the channel's policy) and performs
//! what it decides over quinn and tokio: it turns connection events, dial results, stream
//! results, store answers and the application's commands into [`Input`]s, and each
//! [`Action`] into I/O. Every decision is the link's.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::dial::{refused, Dialer};
use super::io::{self, Event};
use super::{Channel, ChannelId, ChannelStats, Command, Config, Handle, Messages};
use crate::metrics::ChannelMetrics;
use crate::proto::link::{
    Action, Attached, ConnId, DialFailure, Dialed, Input, Link, LinkConfig, Role, SharedKeys,
    StreamEnd,
};
use crate::proto::Delivered;
use crate::wire::MAX_KEY_LEN;

/// Where a new connection comes from when the current one is lost.
pub(super) enum Reattach {
    /// Nowhere: the channel ends with its connection.
    Never,
    /// A client dials its replicas (the link says when and which); it is connected to
    /// replica `current`, whose server answered `attached`.
    Dial {
        dialer: Box<Dialer>,
        current: usize,
        attached: Attached,
    },
    /// A server waits for the client to come back: the [`Server`](super::Server) routes its
    /// new connection here by channel id; `on_stop` tells it the channel ended.
    Registry {
        rx: mpsc::UnboundedReceiver<quinn::Connection>,
        on_stop: Box<dyn FnOnce() + Send>,
    },
}

/// What woke the driver.
enum Wake {
    Event(Event),
    Command(Option<Command>),
    Registered(quinn::Connection),
    Timer,
}

/// Bound of the queue from connection tasks to the driver: a slow driver holds the readers
/// back (quinn then drops the oldest datagrams) instead of queueing without bound.
const EVENTS: usize = 1024;

/// UDP bytes sent and received over every connection: the closed ones (`counters`) and
/// those still open.
fn udp_bytes<'a>(
    counters: &ChannelStats,
    open: impl Iterator<Item = &'a quinn::Connection>,
) -> (u64, u64) {
    open.map(|c| c.stats()).fold(
        (counters.udp_bytes_sent, counters.udp_bytes_received),
        |(tx, rx), s| (tx + s.udp_tx.bytes, rx + s.udp_rx.bytes),
    )
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// A short tag for logs: a channel id works as a bearer token, so it is never logged.
pub(super) fn tag(id: &ChannelId) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    id.hash(&mut h);
    format!("{:08x}", h.finish() as u32)
}

/// Starts the driver for a channel over `connection` and returns the application's handles.
pub(super) fn spawn(
    connection: quinn::Connection,
    config: Config,
    id: ChannelId,
    reattach: Reattach,
    floor: u64,
    shared_keys: Option<SharedKeys>,
) -> Result<(Channel, Messages), crate::proto::link::SendError> {
    let size = connection
        .max_datagram_size()
        .ok_or(crate::proto::link::SendError::DatagramsUnsupported)?;
    let permits = Arc::new(Semaphore::new(config.sender.max_in_flight.max(1)));
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (delivered, rx) = mpsc::unbounded_channel();
    let (events_tx, events) = mpsc::channel(EVENTS);
    let stats = Arc::new(Mutex::new(ChannelStats::default()));
    let current = Arc::new(Mutex::new(Some(connection.clone())));
    let role = match &reattach {
        Reattach::Never => Role::Plain,
        Reattach::Dial {
            dialer,
            current,
            attached,
        } => Role::Client {
            replicas: dialer.replicas(),
            current: *current,
            attached: *attached,
        },
        Reattach::Registry { .. } => Role::Server,
    };
    // Whose keys the peer sends: on the accepting side of a connection, the client's
    // identity (mutual TLS), else the anonymous client's. A client's peer is a server: its
    // keys are anonymous.
    let key_scope = if connection.side().is_server() {
        super::connect::client_scope(&connection)
    } else {
        crate::proto::ANONYMOUS
    };
    // The version the first connection negotiated; later connections of the channel (a
    // reconnect, a failover) keep it.
    let protocol = super::connect::negotiated_protocol(&connection);
    let link_config = LinkConfig {
        handoff: HANDOFF,
        shared_keys,
        claimant_seed: rand::random(),
        key_scope,
        protocol,
        ..config.link()
    };
    let first = ConnId(0);
    let metrics = ChannelMetrics::new(&role);
    let span = tracing::debug_span!("surelink.channel", tag = %tag(&id), role = metrics.role());
    let link = Link::new(now(), link_config, role, first, size, floor);
    let channel = Channel {
        inner: Arc::new(Handle {
            id,
            commands: commands.clone(),
            permits,
            stats: stats.clone(),
            current: current.clone(),
            max_message_size: config.max_message_size,
            key_scope,
            protocol,
        }),
    };
    let mut driver = Driver {
        link,
        config,
        id,
        key_scope,
        reattach,
        conns: HashMap::new(),
        writers: HashMap::new(),
        next_conn: 1,
        events,
        events_tx,
        commands: command_rx,
        answer_tx: commands.clone(),
        commands_open: true,
        delivered,
        replies: HashMap::new(),
        replies_due: Vec::new(),
        permits: HashMap::new(),
        answers: HashMap::new(),
        next_token: 0,
        closers: Vec::new(),
        followups: Vec::new(),
        rtt_reported_at: None,
        stats,
        current,
        counters: ChannelStats::default(),
        metrics,
    };
    driver.register(first, connection);
    tokio::spawn(tracing::Instrument::instrument(driver.run(), span));
    Ok((channel, Messages { rx, commands }))
}

/// Bytes in quinn's datagram send buffer above which a connection counts as congested:
/// about 24 full datagrams, a couple of milliseconds at the rates a channel sustains.
const CONGESTED_BYTES: usize = 32 * 1024;

/// Least time between two reports of the primary connection's round trip to the link.
const RTT_REPORT_INTERVAL: Duration = Duration::from_millis(2);

/// Events taken without waiting after each wake-up before the stats are published.
const READY_BATCH: usize = 64;

/// Most datagrams queued in front of quinn's send buffer per connection; beyond it a
/// datagram is not sent (counted in `send_errors`; the sender's hedges and
/// retransmissions recover it). The sender's `max_in_flight` bounds it long before.
const MAX_QUEUED_DATAGRAMS: usize = 65_536;

/// Delivered messages handed to [`Messages`] and not yet taken; the rest wait in the
/// receiver, which bounds them by bytes (`ReceiverConfig::max_queued_bytes`).
const HANDOFF: usize = 4;

/// What a send or a request ends with, when it succeeds.
#[derive(Debug)]
pub(super) enum Done {
    /// A send's receipt.
    Sent(super::Receipt),
    /// A request's reply.
    Replied(crate::proto::link::Reply),
}

type Reply = oneshot::Sender<Result<Done, crate::proto::link::SendError>>;

/// Where a handed message's answer goes: the driver's commands.
struct Answers(mpsc::UnboundedSender<Command>);

impl crate::proto::AnswerSink for Answers {
    fn answer(&self, id: u64, answer: crate::proto::Answer) -> bool {
        self.0.send(Command::Answer { id, answer }).is_ok()
    }
}

struct Driver {
    link: Link,
    config: Config,
    id: ChannelId,
    /// Whose keys the peer sends (the link's `key_scope`): the client of every claim.
    key_scope: crate::proto::Scope,
    reattach: Reattach,
    conns: HashMap<ConnId, quinn::Connection>,
    /// Each connection's queue in front of quinn's datagram send buffer, the buffer's
    /// free space when the connection was new, and whether the link was last told it is
    /// congested.
    writers: HashMap<ConnId, (io::Writer, usize, bool)>,
    next_conn: u64,
    events: mpsc::Receiver<Event>,
    events_tx: mpsc::Sender<Event>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Where handed messages' answers go (the driver's own commands).
    answer_tx: mpsc::UnboundedSender<Command>,
    commands_open: bool,
    delivered: mpsc::UnboundedSender<Delivered>,
    replies: HashMap<u64, Reply>,
    /// Outcomes decided and not yet given to their callers: given once the stats that count
    /// them are published (`publish`), so that `stats()` read after a `send` returned counts
    /// that send.
    /// (Whether it was counted abandoned already.)
    replies_due: Vec<(Reply, Result<Done, crate::proto::link::SendError>, bool)>,
    /// In-flight slots, held here with their messages (not in the caller's future: a
    /// cancelled `send` does not free its slot before the message has its outcome).
    permits: HashMap<u64, OwnedSemaphorePermit>,
    answers: HashMap<u64, oneshot::Sender<u8>>,
    next_token: u64,
    closers: Vec<oneshot::Sender<()>>,
    followups: Vec<Input>,
    /// When the primary connection's round trip was last reported to the link.
    rtt_reported_at: Option<Instant>,
    stats: Arc<Mutex<ChannelStats>>,
    current: Arc<Mutex<Option<quinn::Connection>>>,
    /// The driver's own counters (send errors, bytes of closed connections, abandoned sends).
    counters: ChannelStats,
    metrics: ChannelMetrics,
}

async fn next_registered(reattach: &mut Reattach) -> Option<quinn::Connection> {
    match reattach {
        Reattach::Registry { rx, .. } => rx.recv().await,
        _ => std::future::pending().await,
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
        loop {
            let timer = self.link.poll_timeout();
            // Arrivals before timers: an ack and the hedge timer due at the same instant must
            // not hedge (in virtual time such ties are common: measured, an unbiased select
            // hedged ~80% of messages on a loss-free link).
            let wake = tokio::select! {
                biased;
                Some(e) = self.events.recv() => Wake::Event(e),
                c = self.commands.recv(), if self.commands_open => Wake::Command(c),
                Some(c) = next_registered(&mut self.reattach) => Wake::Registered(c),
                _ = sleep_until(timer) => Wake::Timer,
            };
            let input = match wake {
                Wake::Event(e) => self.event(e),
                Wake::Command(Some(c)) => self.command(c),
                Wake::Command(None) => {
                    self.commands_open = false;
                    None
                }
                Wake::Registered(c) => {
                    if self.link.primary().is_some() {
                        tracing::warn!(
                            remote = %c.remote_address(),
                            "surelink: a new connection took the channel over from one still open \
                             (its client reconnected before this side saw the loss, or another \
                             client holds the channel id)"
                        );
                        self.metrics.takeover();
                    }
                    let max_datagram_size = c.max_datagram_size();
                    let protocol = super::connect::negotiated_protocol(&c);
                    let conn = self.register_new(c);
                    Some(Input::Reattached {
                        conn,
                        max_datagram_size,
                        protocol,
                    })
                }
                Wake::Timer => {
                    self.recheck_congestion();
                    Some(Input::Timer)
                }
            };
            if let Some(input) = input {
                self.step(input);
            }
            // What else is ready is taken before the stats are published again: at high
            // message rates publishing after every datagram cost more than the datagrams.
            for _ in 0..READY_BATCH {
                if self.link.is_stopped() {
                    break;
                }
                let Ok(e) = self.events.try_recv() else {
                    break;
                };
                if let Some(input) = self.event(e) {
                    self.handle(input);
                }
            }
            self.report_rtt();
            self.publish();
            if self.link.is_stopped() {
                break;
            }
        }
        self.stop();
    }

    /// Hands one input to the link and performs what it decides.
    fn step(&mut self, input: Input) {
        self.handle(input);
        self.publish();
    }

    /// [`Driver::step`] without publishing the stats.
    fn handle(&mut self, input: Input) {
        self.link.handle(now(), input);
        loop {
            while let Some(action) = self.link.poll_action() {
                self.perform(action);
            }
            if self.followups.is_empty() {
                break;
            }
            for input in std::mem::take(&mut self.followups) {
                self.link.handle(now(), input);
            }
        }
        if self.link.is_closed() {
            self.closed();
        }
    }

    fn event(&mut self, event: Event) -> Option<Input> {
        match event {
            Event::Input(i) => {
                if let Input::ConnectionLost { conn, .. } = &i {
                    // Gone: keep its byte counts, forget it.
                    self.retire(*conn);
                }
                Some(i)
            }
            Event::Dialed(dial, result) => Some(Input::DialDone {
                dial,
                result: match result {
                    Ok((c, attached)) => {
                        let size = c.max_datagram_size();
                        let protocol = super::connect::negotiated_protocol(&c);
                        Ok(Dialed {
                            conn: self.register_new(c),
                            attached,
                            max_datagram_size: size,
                            protocol,
                        })
                    }
                    Err(e) => Err(DialFailure {
                        refused: refused(&e),
                        reason: e.to_string(),
                    }),
                },
            }),
            Event::Inbound(message, reply) => {
                self.next_token += 1;
                self.answers.insert(self.next_token, reply);
                Some(Input::StreamMessage {
                    answer: self.next_token,
                    message,
                })
            }
        }
    }

    fn command(&mut self, command: Command) -> Option<Input> {
        Some(match command {
            Command::Send {
                key,
                payload,
                deadline,
                reply,
                permit,
                request,
            } => {
                self.next_token += 1;
                let token = self.next_token;
                self.replies.insert(token, reply);
                self.permits.insert(token, permit);
                match request {
                    false => Input::Send {
                        token,
                        key,
                        payload,
                        deadline,
                    },
                    true => Input::Request {
                        token,
                        key,
                        payload,
                        deadline,
                    },
                }
            }
            Command::Received { id } => Input::Received { id },
            Command::Answer { id, answer } => Input::Answered { id, answer },
            Command::Confirm { id, outcome } => Input::Confirm { id, outcome },
            Command::Close { drain, done } => {
                if let Some(done) = done {
                    self.closers.push(done);
                }
                Input::Close { drain }
            }
            Command::Took { id } => Input::Took { id },
            Command::AppGone => Input::AppGone,
            Command::HandlesDropped => Input::HandlesDropped,
        })
    }

    fn register_new(&mut self, conn: quinn::Connection) -> ConnId {
        let id = ConnId(self.next_conn);
        self.next_conn += 1;
        self.register(id, conn);
        id
    }

    /// Starts reading `conn`: its datagrams, its streams and its end go to the driver.
    fn register(&mut self, id: ConnId, conn: quinn::Connection) {
        self.conns.insert(id, conn.clone());
        let capacity = conn.datagram_send_buffer_space();
        self.writers
            .insert(id, (io::Writer::spawn(conn.clone()), capacity, false));
        self.metrics.connection_opened();
        let tx = self.events_tx.clone();
        let streams = self.config.streams;
        let limit = self.config.max_message_size + MAX_KEY_LEN + 32;
        let timeout = self.config.sender.deadline;
        tokio::spawn(io::read_connection(id, conn, streams, limit, timeout, tx));
    }

    /// Forgets a connection, keeping its byte counts.
    fn retire(&mut self, id: ConnId) -> Option<quinn::Connection> {
        self.writers.remove(&id);
        let conn = self.conns.remove(&id)?;
        self.metrics.connection_closed();
        let s = conn.stats();
        self.counters.udp_bytes_sent += s.udp_tx.bytes;
        self.counters.udp_bytes_received += s.udp_rx.bytes;
        Some(conn)
    }

    /// Hands a datagram to quinn, or to the connection's writer when quinn's buffer cannot
    /// take it now (quinn would discard older datagrams to make room), and tells the link
    /// when the connection turns congested or clear.
    fn transmit(&mut self, conn: ConnId, datagram: Bytes) {
        let (Some(c), Some((writer, capacity, _))) =
            (self.conns.get(&conn), self.writers.get(&conn))
        else {
            return;
        };
        let space = c.datagram_send_buffer_space();
        if writer.queued() == 0 && space >= datagram.len() {
            if c.send_datagram(datagram).is_err() {
                self.counters.send_errors += 1;
            }
        } else if writer.queued() < MAX_QUEUED_DATAGRAMS {
            writer.push(datagram);
        } else {
            self.counters.send_errors += 1;
        }
        let (capacity, queued) = (*capacity, writer.queued());
        self.congestion(
            conn,
            queued > 0 || capacity.saturating_sub(space) > CONGESTED_BYTES,
        );
    }

    /// Tells the link the primary connection's round trip as quinn measures it, at most
    /// every [`RTT_REPORT_INTERVAL`] (the sender's queueing measure).
    fn report_rtt(&mut self) {
        let now = now();
        if self
            .rtt_reported_at
            .is_some_and(|t| now.saturating_duration_since(t) < RTT_REPORT_INTERVAL)
        {
            return;
        }
        let Some(conn) = self.link.primary() else {
            return;
        };
        let Some(rtt) = self.conns.get(&conn).map(quinn::Connection::rtt) else {
            return;
        };
        self.rtt_reported_at = Some(now);
        self.handle(Input::PathRtt { conn, rtt });
    }

    /// Re-reads whether the primary connection is congested (its writer drained).
    fn recheck_congestion(&mut self) {
        let Some(conn) = self.link.primary() else {
            return;
        };
        let (Some(c), Some((writer, capacity, true))) =
            (self.conns.get(&conn), self.writers.get(&conn))
        else {
            return;
        };
        let buffered = capacity.saturating_sub(c.datagram_send_buffer_space());
        let congested = writer.queued() > 0 || buffered > CONGESTED_BYTES;
        self.congestion(conn, congested);
    }

    fn congestion(&mut self, conn: ConnId, congested: bool) {
        if let Some((_, _, told)) = self.writers.get_mut(&conn) {
            if *told != congested {
                *told = congested;
                self.followups.push(Input::Congestion { conn, congested });
            }
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Transmit { conn, datagram } => self.transmit(conn, datagram),
            Action::Dial {
                dial,
                replica,
                floor,
                timeout,
            } => {
                let Reattach::Dial { dialer, .. } = &self.reattach else {
                    return;
                };
                let (dialer, tx) = ((**dialer).clone(), self.events_tx.clone());
                tokio::spawn(async move {
                    let result = dialer.attempt(replica, floor, timeout).await;
                    let _ = tx.send(Event::Dialed(dial, result)).await;
                });
            }
            Action::Close { conn, code, reason } => {
                if let Some(c) = self.retire(conn) {
                    c.close(code.into(), reason.as_bytes());
                }
            }
            Action::OpenStream {
                conn,
                id,
                head,
                body,
                deadline,
            } => {
                let Some(c) = self.conns.get(&conn).cloned() else {
                    let end = StreamEnd::Connection("connection closed".into());
                    self.followups.push(Input::StreamDone { id, conn, end });
                    return;
                };
                let tx = self.events_tx.clone();
                tokio::spawn(async move {
                    let end = io::send_stream_message(c, head, body, deadline).await;
                    let _ = tx
                        .send(Event::Input(Input::StreamDone { id, conn, end }))
                        .await;
                });
            }
            Action::AnswerStream { answer, status } => {
                if let (Some(reply), Some(status)) = (self.answers.remove(&answer), status) {
                    let _ = reply.send(status);
                }
            }
            Action::Claim {
                attempt,
                id,
                key,
                digest,
                claimant,
                timeout,
                step,
            } => self.claim(attempt, (id, key, digest), claimant, timeout, step),
            Action::Deliver(mut message) => {
                if message.is_request() || self.config.explicit_ack {
                    // Acked by the application's answer, which comes back as a command.
                    message.set_answering(crate::proto::Answering::new(
                        message.id,
                        message.is_request(),
                        Box::new(Answers(self.answer_tx.clone())),
                    ));
                }
                let span = tracing::debug_span!(
                    "surelink.deliver",
                    id = message.id,
                    len = message.payload.len()
                );
                let _entered = span.enter();
                tracing::trace!("handed to the application");
                if self.delivered.send(message).is_ok() {
                    self.metrics.delivered();
                }
            }
            Action::Complete { token, outcome } => {
                self.metrics
                    .outcome(&outcome.clone().map_err(super::SendError::from));
                if let Some(reply) = self.replies.remove(&token) {
                    self.replies_due
                        .push((reply, outcome.map(Done::Sent), false));
                }
            }
            Action::Replied { token, reply } => {
                self.metrics.replied();
                if let Some(waiter) = self.replies.remove(&token) {
                    self.replies_due
                        .push((waiter, Ok(Done::Replied(reply)), false));
                }
            }
            Action::FreeSlot { token } => {
                self.permits.remove(&token);
            }
            Action::SamplePaths { conns } => {
                let samples = conns
                    .into_iter()
                    .filter_map(|id| Some((id, io::sample(self.conns.get(&id)?))))
                    .collect();
                self.followups.push(Input::Samples(samples));
            }
            Action::Stop { reason } => {
                tracing::debug!(%reason, "surelink channel: driver stops");
            }
        }
    }

    /// One claim attempt in the store, within `timeout` (a hung store becomes an error): the
    /// message's key is the peer's ([`Driver::key_scope`]), with its payload's digest.
    fn claim(
        &self,
        attempt: u64,
        (id, key, digest): (u64, Option<Bytes>, crate::proto::Digest),
        claimant: u64,
        timeout: Duration,
        step: crate::proto::link::ClaimStep,
    ) {
        let claim = crate::store::Claim {
            channel: self.id,
            message: id,
            key,
            client: self.key_scope,
            digest: Some(digest),
            claimant,
            epoch: 0,
        };
        let (store, tx) = (self.config.store.clone(), self.events_tx.clone());
        tokio::spawn(io::claim(store, claim, attempt, timeout, step, tx));
    }

    /// Copies the link's and the driver's counters into the handles' stats.
    fn publish(&mut self) {
        let primary = self
            .link
            .primary()
            .and_then(|c| self.conns.get(&c))
            .cloned();
        {
            let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
            if current.as_ref().map(|c| c.stable_id()) != primary.as_ref().map(|c| c.stable_id()) {
                *current = primary;
            }
        }
        // Callers that stopped waiting are counted in these very stats (one that stops between
        // here and its reply is counted in the next). Marked in place: no allocation, this
        // runs after every step.
        for (reply, _, counted) in &mut self.replies_due {
            *counted = reply.is_closed();
            self.counters.sends_abandoned += u64::from(*counted);
        }
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        st.publish(&self.link, &self.counters);
        let (conns, counters) = (&self.conns, &self.counters);
        self.metrics
            .update(now(), &st, || udp_bytes(counters, conns.values()));
        drop(st);
        // Then the outcomes: a caller that reads `stats()` once its send returned finds it
        // counted (before, the stats could lag their outcomes: acked 5 after six acked sends).
        for (reply, outcome, counted) in self.replies_due.drain(..) {
            if reply.send(outcome).is_err() && !counted {
                self.counters.sends_abandoned += 1;
            }
        }
    }

    /// The link stopped: close what is left, tell the registry, wake `close()` callers.
    fn stop(mut self) {
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.retire(id) {
                c.close(0u32.into(), b"channel stopped");
            }
        }
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.publish();
        let udp = (
            self.counters.udp_bytes_sent,
            self.counters.udp_bytes_received,
        );
        self.metrics.close(udp);
        self.closed();
    }

    /// The link's connections are closed (it may still hand over deliveries and finish
    /// claims): the registry forgets the channel, `close()` callers return.
    fn closed(&mut self) {
        if let Reattach::Registry { rx, on_stop } =
            std::mem::replace(&mut self.reattach, Reattach::Never)
        {
            // Closed first, so that the registry sees the entry is stale.
            drop(rx);
            on_stop();
        }
        for c in self.closers.drain(..) {
            let _ = c.send(());
        }
    }
}
