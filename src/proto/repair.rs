//! The sending side of the sliding-window code (protocol 2): which messages travel as
//! window sources, and when repairs over them go out.
//!
//! A message whose envelope fits one datagram (with room for a repair over it) is sent whole
//! as a MESSAGE frame, source `seq` of the connection's window ([`crate::fec::window`]).
//! Repairs cover the *unacked* sources, from the lowest unacked one to the newest (at most
//! `max_window`): sources the peer acked it holds, so they cost a repair nothing but
//! arithmetic, and every repair is useful for whichever of the others was lost.
//!
//! # When repairs go
//!
//! - **Paced with the messages**: each source earns `ratio` repairs (the sender's
//!   [`Sender::window_ratio`](super::Sender::window_ratio), from the measured loss and its
//!   burstiness, capped by what the queueing delay allows); a whole repair earned goes
//!   `spacing` after its source, so it does not share the source's packet.
//! - **Tail**: when no source followed the newest for `tail` and no repair covers it, one
//!   repair over the unacked window goes: a message that happens to be the last of a run
//!   still gets a repair within `tail`.
//! - **Lone messages**: a source that follows the previous one after more than `tail` (a low
//!   message rate: no source will follow it soon) gets the repairs a block of its own would
//!   carry for the loss estimate (the least `m` whose residual meets the target, as the
//!   block code's plan), `tail / 2` apart: one arriving after the message also repeats its
//!   ack, which no later message's ack would soon.
//! - What the window cannot rebuild is left to the message's hedge (its block's fresh
//!   parity, as for every message).
//!
//! # Invariants
//!
//! - `unacked` holds exactly the sources whose messages await their outcome; a source leaves
//!   it once, when its message is acked, refused or given up ([`RepairWindow::done`]).
//! - The encoder keeps sources from the lowest unacked one (or at most `max_window`).
//! - `seq`s are per connection: [`RepairWindow::reset`] on every new connection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::fec::window::{self, WindowEncoder, MAX_WINDOW};
use crate::wire::{Frame, MessageFrame};

/// Settings of the sliding-window code's sending side ([`SenderConfig::window`](super::SenderConfig::window)).
#[derive(Clone, Debug, PartialEq)]
pub struct WindowConfig {
    /// Most sources one repair covers (`1 ..= 128`). Default 32.
    pub max_window: u64,
    /// Least repairs per source, whatever the loss estimate says. Default 0.
    pub min_ratio: f64,
    /// Most repairs per source. Default 1.
    pub max_ratio: f64,
    /// Repairs per source per unit of estimated loss rate (`ratio = gain × p / (1 - p)`,
    /// raised for bursty loss). Default 7 (measured on the sweep at 10% loss, seeds 1-5: p99
    /// 55-61 ms at 1.90-2.00x wire; 6.5: 56-61 at 1.93-2.03; 7.5: 56 at 2.05-2.14).
    pub gain: f64,
    /// Sources within which a lost one should meet a repair: the ratio is at least
    /// `ln(p / residual) / horizon` for measured loss `p`, so that at low loss a repair still
    /// follows a loss soon (`0`: no such floor). Default 5 (measured on the sweep, seeds
    /// 1-5: 4 gave 1% loss p99 46 ms at 1.48x wire, 5 gave 46 ms at 1.42x, 6 gave 56 ms at
    /// 1.39x).
    pub horizon: f64,
    /// A lone newest source gets a repair after this long without another. Default 10 ms.
    pub tail: Duration,
    /// Tail repairs only while the ratio planned is at least this. Default 0.015 (about
    /// 0.5% estimated loss: below it a lone message's loss is rarer than the p99 target
    /// and its hedge is enough).
    pub tail_ratio: f64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            max_window: 32,
            min_ratio: 0.0,
            max_ratio: 1.0,
            gain: 7.0,
            horizon: 5.0,
            tail: Duration::from_millis(10),
            tail_ratio: 0.015,
        }
    }
}

/// Counters of the window's sending side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowSendStats {
    /// Messages sent as window sources (MESSAGE frames, first flights only).
    pub sources: u64,
    /// Repairs sent.
    pub repairs: u64,
    /// Bytes of repair frames sent.
    pub repair_bytes: u64,
    /// Repairs earned but not sent because the path was congested.
    pub shed: u64,
}

/// The window code's sending state for one connection. Sans-I/O.
#[derive(Debug)]
pub(crate) struct RepairWindow {
    config: WindowConfig,
    encoder: WindowEncoder,
    /// Unacked sources: seq → message id.
    unacked: BTreeMap<u64, u64>,
    /// Message id → its source's seq.
    seq_of: HashMap<u64, u64>,
    /// Repairs earned, not yet whole.
    credit: f64,
    /// Repairs due, in time order.
    due: VecDeque<Instant>,
    /// The newest seq a sent repair covered.
    covered: Option<u64>,
    /// When the newest source went.
    last_source_at: Option<Instant>,
    /// Whether the newest source had its tail repair.
    tailed: bool,
    /// Whether the newest source gets a tail repair (the ratio planned for it was at least
    /// `tail_ratio`).
    tail_wanted: bool,
    stats: WindowSendStats,
}

impl RepairWindow {
    pub(crate) fn new(config: WindowConfig) -> Self {
        let max = config.max_window.clamp(1, MAX_WINDOW);
        let defaults = WindowConfig::default();
        let finite_or = |v: f64, d: f64| if v.is_finite() { v.max(0.0) } else { d };
        // Nothing here may panic later (`f64::clamp` does when min > max, or on NaN).
        let min_ratio = finite_or(config.min_ratio, defaults.min_ratio);
        let max_ratio = finite_or(config.max_ratio, defaults.max_ratio).max(min_ratio);
        RepairWindow {
            encoder: WindowEncoder::new(max),
            config: WindowConfig {
                max_window: max,
                min_ratio,
                max_ratio,
                gain: finite_or(config.gain, defaults.gain),
                horizon: finite_or(config.horizon, defaults.horizon),
                tail_ratio: finite_or(config.tail_ratio, defaults.tail_ratio),
                ..config
            },
            unacked: BTreeMap::new(),
            seq_of: HashMap::new(),
            credit: 0.0,
            due: VecDeque::new(),
            covered: None,
            last_source_at: None,
            tail_wanted: false,
            tailed: false,
            stats: WindowSendStats::default(),
        }
    }

    pub(crate) fn config(&self) -> &WindowConfig {
        &self.config
    }

    pub(crate) fn stats(&self) -> WindowSendStats {
        self.stats
    }

    /// Starts over for a new connection (sequence numbers are per connection).
    pub(crate) fn reset(&mut self) {
        let config = self.config.clone();
        let stats = self.stats;
        *self = RepairWindow::new(config);
        self.stats = stats;
    }

    /// Whether message `id` with a `body_len`-byte envelope travels as a source: its
    /// MESSAGE frame, and a repair over it, fit a datagram of `max_datagram` bytes.
    pub(crate) fn fits(id: u64, body_len: usize, max_datagram: usize) -> bool {
        // A repair frame's header: type, and three varints of at most 8 bytes.
        const REPAIR_HEADER: usize = 1 + 8 + 8 + 8;
        window::symbol_len(id, body_len) + REPAIR_HEADER <= max_datagram
    }

    /// Whether a source sent now is lone: none went within the last `tail`.
    pub(crate) fn lone(&self, now: Instant) -> bool {
        self.last_source_at
            .is_none_or(|t| now.saturating_duration_since(t) > self.config.tail)
    }

    /// Message `id` goes as a source now: its MESSAGE frame. It earns `ratio` repairs, due
    /// `spacing` after it, and, if `lone` ([`RepairWindow::lone`]) is more than that, `lone`
    /// repairs, one every `spacing`; an `urgent` one (a reply) at least one, `spacing` after
    /// it.
    pub(crate) fn send(
        &mut self,
        now: Instant,
        id: u64,
        body: &Bytes,
        (ratio, lone, urgent): (f64, usize, bool),
        spacing: Duration,
    ) -> Option<Bytes> {
        let symbol = window::source_symbol(id, body)?;
        let seq = self.encoder.push(symbol);
        self.unacked.insert(seq, id);
        self.seq_of.insert(id, seq);
        self.trim();
        self.last_source_at = Some(now);
        self.tailed = false;
        self.stats.sources += 1;
        let ratio = if ratio.is_finite() { ratio } else { 0.0 };
        let ratio = ratio.clamp(self.config.min_ratio, self.config.max_ratio);
        self.tail_wanted = ratio >= self.config.tail_ratio && ratio > 0.0;
        self.credit += ratio;
        let spacing = spacing.max(Duration::from_micros(1));
        let mut earned = 0;
        while self.credit >= 1.0 {
            self.credit -= 1.0;
            earned += 1;
        }
        if urgent && earned == 0 {
            earned = 1;
        }
        if lone > earned {
            // A lone message's repairs are spread over `tail`, half of it apart: one that
            // arrives after the message also repeats its ack (the receiver repeats acks at
            // most every 10 ms), which at a low rate no later message's ack would do.
            let apart = (self.config.tail / 2).max(spacing);
            for j in 0..lone {
                self.due.push_back(now + apart * (j as u32 + 1));
            }
        } else {
            for _ in 0..earned {
                self.due.push_back(now + spacing);
            }
        }
        if lone > 0 {
            // Its repairs are its tail.
            self.tailed = true;
        }
        Some(
            Frame::Message(MessageFrame {
                seq,
                id,
                body: body.clone(),
            })
            .to_bytes(),
        )
    }

    /// Message `id` has its outcome (acked, refused, given up): its source leaves the
    /// window.
    pub(crate) fn done(&mut self, id: u64) {
        if let Some(seq) = self.seq_of.remove(&id) {
            self.unacked.remove(&seq);
            self.trim();
        }
    }

    /// Keeps the encoder's sources from the lowest unacked one.
    fn trim(&mut self) {
        let low = self
            .unacked
            .keys()
            .next()
            .copied()
            .unwrap_or_else(|| self.encoder.next_seq());
        self.encoder.forget_below(low);
        // Sources the encoder forgot (the window overflowed) are left to their hedges.
        let base = self.encoder.base();
        while let Some((&seq, &id)) = self.unacked.first_key_value() {
            if seq >= base {
                break;
            }
            self.unacked.remove(&seq);
            self.seq_of.remove(&id);
        }
    }

    /// The repairs due at `now`. With `shed`, they are counted and dropped (congestion,
    /// silence).
    pub(crate) fn poll(&mut self, now: Instant, shed: bool) -> Vec<Bytes> {
        let mut count = 0;
        while self.due.front().is_some_and(|&at| at <= now) {
            self.due.pop_front();
            count += 1;
        }
        let newest = self.encoder.next_seq().checked_sub(1);
        if count == 0 && self.tail_at().is_some_and(|at| at <= now) {
            count = 1;
            self.tailed = true;
        }
        if count == 0 {
            return Vec::new();
        }
        if shed {
            self.stats.shed += count as u64;
            self.covered = newest;
            return Vec::new();
        }
        let Some(&first) = self.unacked.keys().next() else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let Some(repair) = self.encoder.repair_from(first) else {
                break;
            };
            let frame = Frame::Repair(repair).to_bytes();
            self.stats.repairs += 1;
            self.stats.repair_bytes += frame.len() as u64;
            out.push(frame);
        }
        self.covered = newest;
        out
    }

    /// When a tail repair is due: `tail` after the newest source, if it is unacked and no
    /// repair covered it.
    fn tail_at(&self) -> Option<Instant> {
        let newest = self.encoder.next_seq().checked_sub(1)?;
        if !self.tail_wanted
            || self.tailed
            || self.covered.is_some_and(|c| c >= newest)
            || !self.unacked.contains_key(&newest)
        {
            return None;
        }
        Some(self.last_source_at? + self.config.tail)
    }

    /// When [`RepairWindow::poll`] has something to send.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        [self.due.front().copied(), self.tail_at()]
            .into_iter()
            .flatten()
            .min()
    }
}
