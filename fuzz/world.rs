//! A deterministic world for the channel's whole policy ([`surelink::proto::link::Link`]): one
//! client channel over one to three replicas, a lossy network in virtual time, a claims store
//! that fails (errors, errors after COMMIT, hangs), server processes that crash with or
//! without their state, applications that pause or stop reading, a client that closes or
//! drops its handles. Every send and every delivery is recorded in a
//! [`surelink::promises::Ledger`], checked after every step and, once the world has run
//! quiet, with every send required to have its outcome.
//!
//! Shared by the `channel` fuzz target and `tests/fuzz_corpus.rs` (corpus replay on stable).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use surelink::promises::{Ledger, Outcome};
use surelink::proto::link::{
    claims_mode, Action, Attached, ConnId, DialFailure, Dialed, Input, Link, LinkConfig, Lost,
    Role, StreamEnd, GOODBYE,
};
use surelink::proto::ClaimOutcome;

/// One-way delay of the simulated path.
const DELAY: Duration = Duration::from_millis(10);
/// Silence after which quinn would report a connection lost (its idle timeout).
const IDLE: Duration = Duration::from_secs(1);
/// Datagram size of every connection.
const SIZE: usize = 1200;
/// Application close code of a refusal (`channel::connect`'s `REFUSED`).
const REFUSED: u32 = 2;

/// How the store misbehaves on its next claim attempts.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreFault {
    /// The attempt fails; nothing is written.
    Error,
    /// The claim is written, then the answer is lost (the connection broke after COMMIT).
    ErrorAfterCommit,
    /// No answer: the attempt times out; the claim is written a little later, or never.
    Hang {
        /// Whether it is written in the end.
        commits: bool,
    },
}

/// One step of a scenario.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// The client application sends a message (keyed from a small set, so keys repeat as
    /// retries do; `big` takes the stream path; `deadline` a per-send deadline in 100 ms).
    Send {
        key: Option<u8>,
        big: bool,
        deadline: Option<u8>,
    },
    /// Virtual time passes (ms × 4).
    Advance(u8),
    /// Datagram loss per direction from now on, in percent (capped at 60).
    Loss(u8),
    /// Every packet both ways is lost for `ms × 20`.
    Blackout(u8),
    /// Replica `replica`'s process dies; `keep_state`: its channels survive (only its
    /// socket restarted), otherwise they are gone.
    Crash { replica: u8, keep_state: bool },
    /// The next `count` (1..=4) claim attempts misbehave.
    Store { fault: StoreFault, count: u8 },
    /// Replica `replica`'s application stops taking messages for `ms × 20`.
    Pause { replica: u8, ms: u8 },
    /// Replica `replica`'s application drops its `Messages`.
    Stop { replica: u8 },
    /// The client closes its channel (`drain`: `close().await`; otherwise `abort()`).
    Close { drain: bool },
    /// The client drops every handle.
    DropHandles,
    /// The shell reports the client's primary path: quinn's round trip (`rtt_ms × 4` ms,
    /// arbitrary, so queueing comes and goes) and whether its send buffer is congested.
    Path { rtt_ms: u8, congested: bool },
}

/// A scenario: the world's shape and its steps.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Replicas (1 without a store).
    pub replicas: usize,
    /// Whether they share a claims store.
    pub store: bool,
    /// The steps.
    pub ops: Vec<Op>,
}

/// Runs `scenario` and checks it.
pub fn run(scenario: Scenario) {
    let mut world = World::new(scenario.replicas, scenario.store);
    for op in scenario.ops {
        world.step(op);
    }
    world.finish();
}

impl<'a> Arbitrary<'a> for Scenario {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let store = u.arbitrary::<bool>()?;
        // Replicas without a shared store may each deliver a message once: they must share
        // one (documented), so several replicas come only with a store.
        let replicas = if store { u.int_in_range(1..=3)? } else { 1 };
        let mut ops = Vec::new();
        while !u.is_empty() && ops.len() < 64 {
            ops.push(u.arbitrary()?);
        }
        Ok(Scenario {
            replicas,
            store,
            ops,
        })
    }
}

/// Where a packet goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server(usize),
}

#[derive(Debug)]
enum Event {
    /// A datagram arrives.
    Datagram { to: Side, conn: ConnId, data: Bytes },
    /// A stream message arrives at the server (reliable while the connection lives).
    StreamOpen {
        replica: usize,
        conn: ConnId,
        id: u64,
        head: Bytes,
        body: Bytes,
    },
    /// A stream's status byte arrives at the client.
    StreamAnswer { conn: ConnId, id: u64, status: u8 },
    /// A stream send reaches its deadline at the client.
    StreamDeadline { conn: ConnId, id: u64 },
    /// A dial attempt finishes.
    DialDone {
        dial: u64,
        result: Result<Dialed, DialFailure>,
    },
    /// The client's Hello reaches replica `replica` on a new connection.
    Hello {
        replica: usize,
        incarnation: u64,
        conn: ConnId,
        dial: u64,
        floor: u64,
    },
    /// A connection ends at one side.
    Lost { to: Side, conn: ConnId, how: Lost },
    /// A claim attempt is answered.
    Claimed {
        replica: usize,
        incarnation: u64,
        attempt: u64,
        result: Result<ClaimOutcome, String>,
    },
    /// A hung claim is written after all.
    LateCommit {
        message: u64,
        key: Option<Bytes>,
        claimant: u64,
    },
    /// An application resumes reading.
    Resume { replica: usize },
}

#[derive(Debug)]
struct Conn {
    replica: usize,
    incarnation: u64,
    /// Whether each end still has it.
    client_open: bool,
    server_open: bool,
}

/// A receiving application.
#[derive(Debug, Default)]
struct App {
    /// Handed over, not yet taken: (message id, send).
    queue: VecDeque<(u64, u64)>,
    paused_until: Option<Instant>,
    stopped: bool,
}

#[derive(Debug)]
struct Server {
    incarnation: u64,
    link: Option<Link>,
    app: App,
    /// Inbound stream answers: answer id → (conn, message id).
    answers: HashMap<u64, (ConnId, u64)>,
    next_answer: u64,
}

/// The shared claims store: (message id → claimant), (key → message id).
#[derive(Debug, Default)]
struct Store {
    pairs: HashMap<u64, u64>,
    keys: HashMap<Bytes, u64>,
    faults: VecDeque<StoreFault>,
}

impl Store {
    fn claim(&mut self, message: u64, key: &Option<Bytes>, claimant: u64) -> ClaimOutcome {
        if let Some(&owner) = self.pairs.get(&message) {
            return if owner == claimant {
                ClaimOutcome::Now
            } else {
                ClaimOutcome::Before
            };
        }
        if key.as_ref().is_some_and(|k| self.keys.contains_key(k)) {
            return ClaimOutcome::Before;
        }
        self.pairs.insert(message, claimant);
        if let Some(k) = key {
            self.keys.insert(k.clone(), message);
        }
        ClaimOutcome::Now
    }
}

/// The world.
pub struct World {
    start: Instant,
    now: Instant,
    seq: u64,
    events: BTreeMap<(Instant, u64), Event>,
    client: Link,
    client_stopped: bool,
    servers: Vec<Server>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: u64,
    store_mode: bool,
    store: Store,
    /// Datagram loss per mille, and the end of a blackout.
    loss: u32,
    blackout_until: Option<Instant>,
    /// A deterministic generator for loss decisions (xorshift).
    rng: u64,
    ledger: Ledger,
    /// Send token → whether its outcome was reported.
    next_token: u64,
    /// Keys change when a server without a store loses its state: a key is only remembered
    /// by the server that saw it (documented), so a "retry" across that loss is a new key.
    key_epoch: u32,
    handles_dropped: bool,
    closing: bool,
    server_config: LinkConfig,
    /// Dials already answered (a real driver answers each once).
    answered: std::collections::HashSet<u64>,
    /// Stream sends running at the client: (connection, message id).
    streams: std::collections::BTreeSet<(ConnId, u64)>,
    /// (replica, message) whose claim was written (its answer on its way, late, or reported
    /// as a failure) and which that replica has not handed over yet. A crash of such a
    /// replica is not simulated: another replica would ack the message as claimed before
    /// while nobody delivers it. That is a known gap (claims are one-phase; closing it needs a
    /// claim that others see as settled only once its owner hands the message over, with a
    /// lease for owners that died), stated in the README's guarantees.
    unresolved: std::collections::HashSet<(usize, u64)>,
}

fn client_config() -> LinkConfig {
    let mut c = LinkConfig {
        stream_threshold: 256,
        ..LinkConfig::default()
    };
    c.sender.max_in_flight = 16;
    c
}

impl World {
    /// A world with `replicas` servers, sharing a claims store when `store`.
    pub fn new(replicas: usize, store: bool) -> World {
        let start = Instant::now();
        let mut server_config = LinkConfig::default();
        server_config.receiver.claims = claims_mode(store, false);
        let mut world = World {
            start,
            now: start,
            seq: 0,
            events: BTreeMap::new(),
            client: Link::new(
                start,
                client_config(),
                Role::Client {
                    replicas,
                    current: 0,
                    attached: if store {
                        Attached::Claims
                    } else {
                        Attached::New
                    },
                },
                ConnId(0),
                SIZE,
                0,
            ),
            client_stopped: false,
            servers: (0..replicas)
                .map(|_| Server {
                    incarnation: 0,
                    link: None,
                    app: App::default(),
                    answers: HashMap::new(),
                    next_answer: 0,
                })
                .collect(),
            conns: BTreeMap::new(),
            next_conn: 1,
            store_mode: store,
            store: Store::default(),
            loss: 0,
            blackout_until: None,
            rng: 0x9e37_79b9_7f4a_7c15,
            ledger: Ledger::default(),
            next_token: 0,
            key_epoch: 0,
            handles_dropped: false,
            closing: false,
            server_config,
            answered: Default::default(),
            streams: Default::default(),
            unresolved: Default::default(),
        };
        // The first connection, to replica 0, handshake and Hello done.
        world.conns.insert(
            ConnId(0),
            Conn {
                replica: 0,
                incarnation: 0,
                client_open: true,
                server_open: true,
            },
        );
        let mut config = world.server_config.clone();
        config.claimant_seed = claimant_seed(0, 0);
        world.servers[0].link = Some(Link::new(start, config, Role::Server, ConnId(0), SIZE, 0));
        world.drain_all();
        world
    }

    fn at(&mut self, at: Instant, event: Event) {
        self.seq += 1;
        self.events.insert((at, self.seq), event);
    }

    fn random(&mut self) -> u32 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 32) as u32
    }

    fn dropped(&mut self) -> bool {
        if self.blackout_until.is_some_and(|t| self.now < t) {
            return true;
        }
        self.random() % 1000 < self.loss
    }

    fn key(&self, k: u8) -> Bytes {
        Bytes::from(format!("key-{}-{}", self.key_epoch, k % 6))
    }

    /// Runs one step, then checks the promises that must hold at every instant.
    pub fn step(&mut self, op: Op) {
        if trace() {
            eprintln!("{:>9.3?} step {op:?}", self.now - self.start);
        }
        match op {
            Op::Send { key, big, deadline } => {
                let token = self.next_token;
                self.next_token += 1;
                let key = key.map(|k| self.key(k));
                let mut payload = token.to_be_bytes().to_vec();
                payload.resize(if big { 600 } else { 40 }, b'.');
                self.ledger.sent(token, key.as_deref());
                let input = Input::Send {
                    token,
                    key,
                    payload: payload.into(),
                    deadline: deadline.map(|d| Duration::from_millis(100 * u64::from(d.max(1)))),
                };
                if self.client_stopped {
                    // A stopped channel's handle answers `Closed` without the link.
                    self.ledger.outcome(token, Outcome::NotDelivered);
                } else {
                    self.client.handle(self.now, input);
                }
            }
            Op::Advance(ms) => self.run_for(Duration::from_millis(4 * u64::from(ms))),
            Op::Loss(p) => self.loss = u32::from(p.min(60)) * 10,
            Op::Blackout(ms) => {
                let until = self.now + Duration::from_millis(20 * u64::from(ms));
                self.blackout_until = Some(until);
                if until - self.now >= IDLE {
                    // quinn would time every connection out after its idle timeout.
                    let conns: Vec<ConnId> = self.conns.keys().copied().collect();
                    for conn in conns {
                        self.lose_both(conn, self.now + IDLE);
                    }
                }
            }
            Op::Crash {
                replica,
                keep_state,
            } => self.crash(usize::from(replica) % self.servers.len(), keep_state),
            Op::Store { fault, count } => {
                for _ in 0..count.clamp(1, 4) {
                    self.store.faults.push_back(fault);
                }
            }
            Op::Pause { replica, ms } => {
                let r = usize::from(replica) % self.servers.len();
                let until = self.now + Duration::from_millis(20 * u64::from(ms));
                self.servers[r].app.paused_until = Some(until);
                self.at(until, Event::Resume { replica: r });
            }
            Op::Stop { replica } => {
                let r = usize::from(replica) % self.servers.len();
                let s = &mut self.servers[r];
                if !s.app.stopped {
                    s.app.stopped = true;
                    s.app.queue.clear();
                    if let Some(link) = &mut s.link {
                        link.handle(self.now, Input::AppGone);
                    }
                }
            }
            Op::Close { drain } => {
                if !self.closing && !self.client_stopped {
                    self.closing = true;
                    self.client.handle(self.now, Input::Close { drain });
                }
            }
            Op::DropHandles => {
                if !self.handles_dropped && !self.client_stopped {
                    self.handles_dropped = true;
                    self.client.handle(self.now, Input::HandlesDropped);
                }
            }
            Op::Path { rtt_ms, congested } => {
                if let Some(conn) = self.client.primary() {
                    let rtt = Duration::from_millis(4 * u64::from(rtt_ms));
                    self.client.handle(self.now, Input::PathRtt { conn, rtt });
                    self.client
                        .handle(self.now, Input::Congestion { conn, congested });
                }
            }
        }
        self.drain_all();
        self.take_all();
        // With a claims store another replica may ack a message this one claimed and handed
        // over before its application read it: that is checked at the end.
        let checked = if self.store_mode {
            self.ledger.check_handed_over()
        } else {
            self.ledger.check()
        };
        if let Err(e) = checked {
            panic!("after a step at {:?}: {e}", self.now - self.start);
        }
    }

    /// Runs until nothing is left to happen (at most 10 virtual minutes), then checks every
    /// promise, every send's outcome included.
    pub fn finish(mut self) -> Ledger {
        self.loss = 0;
        for s in &mut self.servers {
            s.app.paused_until = None;
        }
        self.run_for(Duration::from_secs(600));
        if let Err(e) = self.ledger.check_final() {
            panic!("at the end ({:?}): {e}", self.now - self.start);
        }
        self.ledger
    }

    /// The applications take what they can.
    fn take_all(&mut self) {
        for r in 0..self.servers.len() {
            loop {
                let s = &mut self.servers[r];
                if s.app.stopped || s.app.paused_until.is_some_and(|t| self.now < t) {
                    break;
                }
                let Some((id, send)) = s.app.queue.pop_front() else {
                    break;
                };
                if !self.store_mode {
                    self.ledger.delivered(r, send);
                }
                if let Some(link) = &mut self.servers[r].link {
                    link.handle(self.now, Input::Took { id });
                }
                self.drain_server(r);
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next_event = self.events.keys().next().map(|&(t, _)| t);
            let next_timer = std::iter::once(if self.client_stopped {
                None
            } else {
                self.client.poll_timeout()
            })
            .chain(
                self.servers
                    .iter()
                    .map(|s| s.link.as_ref().and_then(Link::poll_timeout)),
            )
            .flatten()
            .min();
            let next = match (next_event, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => break,
                },
            };
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            if next_event == Some(next) {
                let key = *self.events.keys().next().expect("an event");
                let event = self.events.remove(&key).expect("the event");
                self.dispatch(event);
            } else {
                self.fire_timers();
            }
            self.drain_all();
            self.take_all();
        }
        self.now = self.now.max(until);
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        if !self.client_stopped && self.client.poll_timeout().is_some_and(|t| t <= now) {
            self.client.handle(now, Input::Timer);
        }
        for s in &mut self.servers {
            if let Some(link) = &mut s.link {
                if link.poll_timeout().is_some_and(|t| t <= now) {
                    link.handle(now, Input::Timer);
                }
            }
        }
    }

    fn dispatch(&mut self, event: Event) {
        let now = self.now;
        if trace() {
            eprintln!("{:>9.3?} event {event:?}", now - self.start);
        }
        match event {
            Event::Datagram { to, conn, data } => {
                let open = self.conns.get(&conn).is_some_and(|c| match to {
                    Side::Client => c.client_open,
                    Side::Server(_) => c.server_open,
                });
                if !open {
                    return;
                }
                let input = Input::Datagram { conn, data };
                match to {
                    Side::Client if !self.client_stopped => self.client.handle(now, input),
                    Side::Server(r) => {
                        if let Some(link) = &mut self.servers[r].link {
                            link.handle(now, input);
                        }
                    }
                    Side::Client => {}
                }
            }
            Event::StreamOpen {
                replica,
                conn,
                id,
                head,
                body,
            } => {
                if !self.conns.get(&conn).is_some_and(|c| c.server_open) {
                    return;
                }
                let s = &mut self.servers[replica];
                let Some(link) = &mut s.link else {
                    return;
                };
                let answer = s.next_answer;
                s.next_answer += 1;
                s.answers.insert(answer, (conn, id));
                let mut message = head.to_vec();
                message.extend_from_slice(&body);
                link.handle(
                    now,
                    Input::StreamMessage {
                        answer,
                        message: message.into(),
                    },
                );
            }
            Event::StreamAnswer { conn, id, status } => {
                if self.client_stopped || !self.streams.remove(&(conn, id)) {
                    return;
                }
                self.client.handle(
                    now,
                    Input::StreamDone {
                        id,
                        conn,
                        end: StreamEnd::Status(status),
                    },
                );
            }
            Event::StreamDeadline { conn, id } => {
                if self.client_stopped || !self.streams.remove(&(conn, id)) {
                    return;
                }
                self.client.handle(
                    now,
                    Input::StreamDone {
                        id,
                        conn,
                        end: StreamEnd::Deadline,
                    },
                );
            }
            Event::DialDone { dial, result } => {
                if self.client_stopped || !self.answered.insert(dial) {
                    return;
                }
                self.client.handle(now, Input::DialDone { dial, result });
            }
            Event::Hello {
                replica,
                incarnation,
                conn,
                dial,
                floor,
            } => {
                let server = &mut self.servers[replica];
                if server.incarnation != incarnation {
                    // The process died meanwhile: the dial times out.
                    return;
                }
                self.conns.insert(
                    conn,
                    Conn {
                        replica,
                        incarnation,
                        client_open: true,
                        server_open: true,
                    },
                );
                let attached = match &mut server.link {
                    Some(link) if !link.is_stopped() => {
                        link.handle(
                            now,
                            Input::Reattached {
                                conn,
                                max_datagram_size: Some(SIZE),
                            },
                        );
                        Attached::Resumed
                    }
                    _ => {
                        // A new channel here: its window starts at the client's floor.
                        let mut config = self.server_config.clone();
                        config.claimant_seed = claimant_seed(replica, incarnation);
                        server.link = Some(Link::new(now, config, Role::Server, conn, SIZE, floor));
                        server.app = App {
                            stopped: server.app.stopped,
                            ..App::default()
                        };
                        if server.app.stopped {
                            let link = server.link.as_mut().expect("just set");
                            link.handle(now, Input::AppGone);
                        }
                        if self.store_mode {
                            Attached::Claims
                        } else {
                            Attached::New
                        }
                    }
                };
                self.at(
                    now + DELAY,
                    Event::DialDone {
                        dial,
                        result: Ok(Dialed {
                            conn,
                            attached,
                            max_datagram_size: Some(SIZE),
                        }),
                    },
                );
            }
            Event::Lost { to, conn, how } => {
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                match to {
                    Side::Client if c.client_open => {
                        c.client_open = false;
                        self.end_streams(now, conn);
                        if !self.client_stopped {
                            self.client.handle(
                                now,
                                Input::ConnectionLost {
                                    conn,
                                    how,
                                    reason: format!("{how:?}"),
                                },
                            );
                        }
                    }
                    Side::Server(r) if c.server_open => {
                        c.server_open = false;
                        if c.incarnation == self.servers[r].incarnation {
                            if let Some(link) = &mut self.servers[r].link {
                                link.handle(
                                    now,
                                    Input::ConnectionLost {
                                        conn,
                                        how,
                                        reason: format!("{how:?}"),
                                    },
                                );
                            }
                        }
                    }
                    _ => {}
                }
            }
            Event::Claimed {
                replica,
                incarnation,
                attempt,
                result,
            } => {
                let s = &mut self.servers[replica];
                if s.incarnation == incarnation {
                    if let Some(link) = &mut s.link {
                        link.handle(now, Input::ClaimAnswered { attempt, result });
                    }
                }
            }
            Event::LateCommit {
                message,
                key,
                claimant,
            } => {
                self.store.claim(message, &key, claimant);
            }
            Event::Resume { replica } => {
                let app = &mut self.servers[replica].app;
                if app.paused_until.is_some_and(|t| t <= now) {
                    app.paused_until = None;
                }
            }
        }
    }

    /// The client's stream sends on `conn` end with the connection (as quinn's stream tasks
    /// report it).
    fn end_streams(&mut self, now: Instant, conn: ConnId) {
        let ended: Vec<u64> = self
            .streams
            .iter()
            .filter(|(c, _)| *c == conn)
            .map(|&(_, id)| id)
            .collect();
        for id in ended {
            self.streams.remove(&(conn, id));
            if !self.client_stopped {
                self.client.handle(
                    now,
                    Input::StreamDone {
                        id,
                        conn,
                        end: StreamEnd::Connection("connection lost".into()),
                    },
                );
            }
        }
    }

    /// Closes `conn` at both ends at `at` (a timeout, as quinn's idle timer reports it).
    fn lose_both(&mut self, conn: ConnId, at: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let replica = c.replica;
        self.at(
            at,
            Event::Lost {
                to: Side::Client,
                conn,
                how: Lost::Retryable,
            },
        );
        self.at(
            at,
            Event::Lost {
                to: Side::Server(replica),
                conn,
                how: Lost::Retryable,
            },
        );
    }

    fn crash(&mut self, replica: usize, keep_state: bool) {
        let now = self.now;
        if !keep_state && self.unresolved.iter().any(|&(r, _)| r == replica) {
            // The known gap described at `unresolved`.
            return;
        }
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.replica == replica && c.server_open)
            .map(|(&id, _)| id)
            .collect();
        for conn in conns {
            // The server side is gone at once; the client notices after its idle timeout.
            if let Some(c) = self.conns.get_mut(&conn) {
                c.server_open = false;
            }
            self.at(
                now + IDLE,
                Event::Lost {
                    to: Side::Client,
                    conn,
                    how: Lost::Retryable,
                },
            );
            if keep_state {
                if let Some(link) = &mut self.servers[replica].link {
                    link.handle(
                        now,
                        Input::ConnectionLost {
                            conn,
                            how: Lost::Retryable,
                            reason: "socket restarted".into(),
                        },
                    );
                }
            }
        }
        let s = &mut self.servers[replica];
        if !keep_state {
            // Messages handed over to the application died with it: they were delivered
            // (handed over), as far as anyone can tell (with a store, recorded already).
            for (_, send) in s.app.queue.drain(..) {
                if !self.store_mode {
                    self.ledger.delivered(replica, send);
                }
            }
            s.link = None;
            s.answers.clear();
            s.incarnation += 1;
            if !self.store_mode {
                self.key_epoch += 1;
            }
        }
        self.drain_server(replica);
    }

    fn drain_all(&mut self) {
        for _ in 0..8 {
            let mut any = self.drain_client();
            for r in 0..self.servers.len() {
                any |= self.drain_server(r);
            }
            if !any {
                break;
            }
        }
    }

    fn drain_client(&mut self) -> bool {
        let now = self.now;
        let mut any = false;
        while let Some(action) = self.client.poll_action() {
            any = true;
            if trace() {
                eprintln!("{:>9.3?} client {action:?}", now - self.start);
            }
            match action {
                Action::Transmit { conn, datagram } => {
                    let Some((open, replica)) =
                        self.conns.get(&conn).map(|c| (c.client_open, c.replica))
                    else {
                        continue;
                    };
                    if !open || self.dropped() {
                        continue;
                    }
                    let to = Side::Server(replica);
                    self.at(
                        now + DELAY,
                        Event::Datagram {
                            to,
                            conn,
                            data: datagram,
                        },
                    );
                }
                Action::Dial {
                    dial,
                    replica,
                    floor,
                    timeout,
                } => {
                    let reachable = self.blackout_until.is_none_or(|t| t <= now);
                    let conn = ConnId(self.next_conn);
                    self.next_conn += 1;
                    if reachable && replica < self.servers.len() {
                        let incarnation = self.servers[replica].incarnation;
                        self.at(
                            now + 2 * DELAY,
                            Event::Hello {
                                replica,
                                incarnation,
                                conn,
                                dial,
                                floor,
                            },
                        );
                    }
                    // Answered by the Hello's answer, or failing that by the timeout (the
                    // client ignores the second answer of a dial).
                    self.at(
                        now + timeout.max(4 * DELAY),
                        Event::DialDone {
                            dial,
                            result: Err(DialFailure {
                                refused: false,
                                reason: "no answer".into(),
                            }),
                        },
                    );
                }
                Action::Close { conn, code, .. } => {
                    self.end_streams(now, conn);
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.client_open = false;
                        let replica = c.replica;
                        let how = lost_by(code);
                        self.at(
                            now + DELAY,
                            Event::Lost {
                                to: Side::Server(replica),
                                conn,
                                how,
                            },
                        );
                    }
                }
                Action::OpenStream {
                    conn,
                    id,
                    head,
                    body,
                    deadline,
                } => {
                    if let Some(c) = self.conns.get(&conn) {
                        if c.client_open && self.blackout_until.is_none_or(|t| t <= now) {
                            let replica = c.replica;
                            self.at(
                                now + DELAY,
                                Event::StreamOpen {
                                    replica,
                                    conn,
                                    id,
                                    head,
                                    body,
                                },
                            );
                        }
                    }
                    self.streams.insert((conn, id));
                    self.at(deadline.max(now), Event::StreamDeadline { conn, id });
                }
                Action::Complete { token, outcome } => {
                    self.ledger.outcome(token, Outcome::of(&outcome));
                }
                Action::SamplePaths { conns } => {
                    self.client.handle(now, Input::Samples(samples(conns)));
                }
                Action::Stop { .. } => {
                    self.client_stopped = true;
                    for c in self.conns.values_mut() {
                        c.client_open = false;
                    }
                }
                // Nothing the server sends the client's application here.
                Action::Deliver(_)
                | Action::FreeSlot { .. }
                | Action::AnswerStream { .. }
                | Action::Claim { .. } => {}
            }
        }
        any
    }

    fn drain_server(&mut self, r: usize) -> bool {
        let now = self.now;
        let mut any = false;
        loop {
            let Some(link) = self.servers[r].link.as_mut() else {
                return any;
            };
            let Some(action) = link.poll_action() else {
                return any;
            };
            any = true;
            if trace() {
                eprintln!("{:>9.3?} server {r} {action:?}", now - self.start);
            }
            match action {
                Action::Transmit { conn, datagram } => {
                    let open = self.conns.get(&conn).is_some_and(|c| c.server_open);
                    if open && !self.dropped() {
                        self.at(
                            now + DELAY,
                            Event::Datagram {
                                to: Side::Client,
                                conn,
                                data: datagram,
                            },
                        );
                    }
                }
                Action::Close { conn, code, .. } => {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.server_open = false;
                        let how = lost_by(code);
                        self.at(
                            now + DELAY,
                            Event::Lost {
                                to: Side::Client,
                                conn,
                                how,
                            },
                        );
                    }
                }
                Action::AnswerStream { answer, status } => {
                    let s = &mut self.servers[r];
                    if let (Some((conn, id)), Some(status)) = (s.answers.remove(&answer), status) {
                        if self.conns.get(&conn).is_some_and(|c| c.server_open) {
                            self.at(now + DELAY, Event::StreamAnswer { conn, id, status });
                        }
                    }
                }
                Action::Claim {
                    attempt,
                    id,
                    key,
                    claimant,
                    timeout,
                    ..
                } => {
                    let incarnation = self.servers[r].incarnation;
                    let result = match self.store.faults.pop_front() {
                        None => {
                            let outcome = self.store.claim(id, &key, claimant);
                            if outcome == ClaimOutcome::Now {
                                // Written; its answer is on its way (see `unresolved`).
                                self.unresolved.insert((r, id));
                            }
                            Ok(outcome)
                        }
                        Some(StoreFault::Error) => Err("store unreachable".to_string()),
                        Some(StoreFault::ErrorAfterCommit) => {
                            self.store.claim(id, &key, claimant);
                            self.unresolved.insert((r, id));
                            Err("connection closed after COMMIT".to_string())
                        }
                        Some(StoreFault::Hang { commits }) => {
                            if commits {
                                self.unresolved.insert((r, id));
                                self.at(
                                    now + timeout + DELAY,
                                    Event::LateCommit {
                                        message: id,
                                        key: key.clone(),
                                        claimant,
                                    },
                                );
                            }
                            self.at(
                                now + timeout,
                                Event::Claimed {
                                    replica: r,
                                    incarnation,
                                    attempt,
                                    result: Err("timed out".into()),
                                },
                            );
                            continue;
                        }
                    };
                    self.at(
                        now + Duration::from_millis(1),
                        Event::Claimed {
                            replica: r,
                            incarnation,
                            attempt,
                            result,
                        },
                    );
                }
                Action::Deliver(d) => {
                    self.unresolved.remove(&(r, d.id));
                    let send = u64::from_be_bytes(d.payload[..8].try_into().expect("8 bytes"));
                    if self.store_mode {
                        // With a claims store a claimed message handed over counts as
                        // delivered (the claim is the record), read or not.
                        self.ledger.delivered(r, send);
                    }
                    let app = &mut self.servers[r].app;
                    if !app.stopped {
                        app.queue.push_back((d.id, send));
                    }
                }
                Action::Stop { .. } => {
                    self.servers[r].link = None;
                }
                Action::SamplePaths { conns } => {
                    if let Some(link) = self.servers[r].link.as_mut() {
                        link.handle(now, Input::Samples(samples(conns)));
                    }
                }
                // A server sends nothing of its own in this world.
                Action::Dial { .. }
                | Action::OpenStream { .. }
                | Action::Complete { .. }
                | Action::FreeSlot { .. } => {}
            }
        }
    }
}

/// Every path as the world's links see it: the round trip, no packet counts.
fn samples(conns: Vec<ConnId>) -> Vec<(ConnId, surelink::proto::link::PathSample)> {
    let sample = surelink::proto::link::PathSample {
        rtt: 2 * DELAY,
        sent_packets: 0,
        lost_packets: 0,
    };
    conns.into_iter().map(|c| (c, sample)).collect()
}

/// How a peer's close code reaches the other end.
fn lost_by(code: u32) -> Lost {
    match code {
        GOODBYE => Lost::Goodbye,
        REFUSED => Lost::Fatal,
        _ => Lost::Retryable,
    }
}

/// A server process's claimant tokens: its own range (the driver draws a random seed).
fn claimant_seed(replica: usize, incarnation: u64) -> u64 {
    ((replica as u64 + 1) << 48) | (incarnation << 32)
}

/// Whether to print every event and action (`SURELINK_WORLD_TRACE`).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("SURELINK_WORLD_TRACE").is_some())
}

/// Arbitrary bytes as a scenario, run and checked.
pub fn channel(data: &[u8]) {
    let mut u = Unstructured::new(data);
    if let Ok(scenario) = Scenario::arbitrary(&mut u) {
        run(scenario);
    }
}
