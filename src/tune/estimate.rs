//! The link's loss, estimated online from the sender's own shard counts.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most accounted intervals the windows hold (one per ack: a second's worth at 65,000
/// acks a second), so memory stays bounded whatever the rate.
const MAX_CHUNKS: usize = 65_536;

/// Judged shards per group, and groups kept, for [`LossEstimator::dispersion`].
const GROUP: u64 = 32;
const GROUPS: usize = 64;

/// Settings of a [`LossEstimator`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EstimatorConfig {
    /// Shards the long window covers. Default 512: on a clean link the estimate's upper bound
    /// falls under 0.2% after that many shards.
    pub window: u64,
    /// Shards the short window covers, to see loss appear within a few round trips.
    /// Default 32.
    pub short_window: u64,
    /// Width of the long window's upper confidence bound, in standard deviations (Wilson
    /// score). Default 1.
    pub z: f64,
    /// Width of the short window's lower bound. Default 2: one loss in 32 shards (which a
    /// change in the shards in flight can fake) is not believed, two are.
    pub z_short: f64,
    /// The estimate before any shard is accounted for. Default 0.02.
    pub initial: f64,
    /// The long window also spans at least this long. Default 250 ms: at high message rates
    /// 512 shards are a few milliseconds, shorter than the lag between sending a shard
    /// (into the transport's queues) and the peer's count including it, and the signed
    /// errors that lag makes (a shard judged lost, then found) no longer cancel within
    /// the window (measured at 20,000 messages/s on a clean loopback: an estimate of 4.7%).
    pub window_time: Duration,
    /// The short window also spans at least this long. Default 50 ms: with 10 ms, at 5,000
    /// messages a second on a clean loopback the estimate still spiked (0.5–17% when
    /// messages were planned, median 1.7%: the lag jitters by milliseconds) and 38% of
    /// messages were split into shards with parity (p99 6.3 ms, 1.33× bytes; with 50 ms
    /// 4.2 ms, 1.22×). (At 200 messages a second both windows are longer in shards than in
    /// time: unchanged.)
    pub short_window_time: Duration,
    /// Send records kept to match acks against (bounded memory). Default 4096.
    pub history: usize,
    /// Judged intervals younger than this, while they hold at least `short_window` shards,
    /// are not in the windows yet; meanwhile only the shards they found count (negative
    /// loss: shards judged lost earlier that arrived after all). A peer that pauses for a
    /// few ms makes every shard sent meanwhile look lost until the next acks find them;
    /// held back, the two cancel before the estimate sees either. Default 20 ms. Measured
    /// on a clean loopback (payment_client, 3 runs each), without it / with it: 5,000
    /// messages a second 1.31-1.34 / 1.06-1.12 data shards per message, 1.22 / 1.16-1.17x
    /// wire bytes, p99 4.3 / 3.2-3.9 ms; 20,000 a second 1.60-1.64 / 1.30-1.43 shards,
    /// 1.29-1.30 / 1.21-1.25x, p99 5.1-5.2 / 4.9-5.0 ms (the estimate had spiked to 0.6-5%,
    /// splitting 512-byte messages into 3 shards plus parity). At 200 messages a second
    /// the intervals never hold that many shards: nothing changes there.
    pub maturity: Duration,
}

impl Default for EstimatorConfig {
    fn default() -> Self {
        EstimatorConfig {
            window: 512,
            short_window: 32,
            z: 0.5,
            z_short: 2.0,
            initial: 0.02,
            window_time: Duration::from_millis(250),
            short_window_time: Duration::from_millis(50),
            history: 4096,
            maturity: Duration::from_millis(20),
        }
    }
}

/// Per-shard loss rate, from the shards this side sent and the peer's count of distinct shards
/// received (carried in every ack), so it sees loss even when the code repaired it.
///
/// An ack says how many shards the peer had when it sent the ack, which covers the shards
/// sent up to about one round trip before the ack arrives (`guard`). Each ack closes an
/// interval: shards sent up to `now - guard` since the last ack, minus shards the peer gained
/// since the last ack. The difference is signed: a shard counted lost because it was still in
/// flight shows up as a gain in a later interval, so over any span of intervals the sum is
/// exact up to the change in shards in flight, and a wrong but steady `guard` cancels out.
///
/// The estimate is the larger of the Wilson upper bound over the last `window` shards (slow,
/// cautious: a clean link must prove it) and the Wilson lower bound over the last
/// `short_window` shards (fast: loss that appears is believed as soon as it is significant).
#[derive(Clone, Debug)]
pub struct LossEstimator {
    config: EstimatorConfig,
    /// `(time, shards sent so far on this connection)` after each send, oldest first.
    sent: VecDeque<(Instant, u64)>,
    total_sent: u64,
    /// Shards accounted for so far on this connection: sent up to the last cutoff, and the
    /// peer's count in the last ack.
    accounted_sent: u64,
    accounted_received: u64,
    /// `(when, lost, total)` per accounted interval (lost is signed, see above), newest
    /// last; at most [`MAX_CHUNKS`].
    chunks: VecDeque<(Instant, i64, u64)>,
    lost_all: i64,
    total_all: u64,
    /// The newest chunks, as many as the short window holds, and their sums (kept as chunks
    /// come, so the estimate costs the same at any rate).
    short: VecDeque<(Instant, i64, u64)>,
    lost_short: i64,
    total_short: u64,
    /// [`LossEstimator::estimate`], recomputed when a chunk is judged (the sender asks on
    /// every send).
    cached: f64,
    /// Shards accounted without being judged ([`LossEstimator::on_ack_excluded`]).
    excluded: u64,
    /// Chunks younger than [`EstimatorConfig::maturity`], newest last, and their sums:
    /// not in the windows yet.
    young: VecDeque<(Instant, i64, u64)>,
    lost_young: i64,
    total_young: u64,
    /// The group being filled (lost, total) and the last finished groups' lost counts.
    group: (i64, u64),
    groups: VecDeque<i64>,
}

impl LossEstimator {
    /// An estimator with `config`.
    pub fn new(config: EstimatorConfig) -> Self {
        LossEstimator {
            config,
            sent: VecDeque::new(),
            total_sent: 0,
            accounted_sent: 0,
            accounted_received: 0,
            chunks: VecDeque::new(),
            lost_all: 0,
            total_all: 0,
            short: VecDeque::new(),
            lost_short: 0,
            total_short: 0,
            cached: config.initial,
            excluded: 0,
            young: VecDeque::new(),
            lost_young: 0,
            total_young: 0,
            group: (0, 0),
            groups: VecDeque::new(),
        }
    }

    /// `count` shards were sent at `now`.
    pub fn on_sent(&mut self, now: Instant, count: u64) {
        if count == 0 {
            return;
        }
        self.total_sent += count;
        match self.sent.back_mut() {
            Some((t, c)) if *t == now => *c = self.total_sent,
            _ => self.sent.push_back((now, self.total_sent)),
        }
        if self.sent.len() > self.config.history.max(2) {
            // Too many sends without an ack: merge the oldest two (their shards are accounted
            // a little later than they could be, never lost).
            let (_, c) = self.sent.pop_front().expect("len > 2");
            if let Some(front) = self.sent.front_mut() {
                front.1 = front.1.max(c);
            }
        }
    }

    /// An ack arrived at `now` saying the peer has received `peer_received` distinct shards on
    /// this connection. Shards sent after `now - guard` are not judged yet.
    pub fn on_ack(&mut self, now: Instant, peer_received: u64, guard: Duration) {
        self.account(now, peer_received, guard, true);
    }

    /// Like [`LossEstimator::on_ack`], but the interval it closes is left out of the
    /// estimate: shards lost while the sender itself congested the path (its queues
    /// overflowed) are congestion, not the path's loss, and must not buy more redundancy.
    pub fn on_ack_excluded(&mut self, now: Instant, peer_received: u64, guard: Duration) {
        self.account(now, peer_received, guard, false);
    }

    fn account(&mut self, now: Instant, peer_received: u64, guard: Duration, judge: bool) {
        self.mature(now);
        let Some(cutoff) = now.checked_sub(guard) else {
            return;
        };
        let mut sent_upto = self.accounted_sent;
        while let Some(&(t, c)) = self.sent.front() {
            if t > cutoff {
                break;
            }
            sent_upto = c;
            self.sent.pop_front();
        }
        let d_sent = sent_upto.saturating_sub(self.accounted_sent);
        if d_sent == 0 || peer_received < self.accounted_received {
            // Nothing to judge, or an ack older than one already seen (reordered).
            return;
        }
        let d_received = peer_received - self.accounted_received;
        self.accounted_sent = sent_upto;
        self.accounted_received = peer_received;
        if judge {
            let lost = d_sent as i64 - d_received as i64;
            self.young.push_back((now, lost, d_sent));
            self.lost_young += lost;
            self.total_young += d_sent;
            self.mature(now);
        } else {
            self.excluded += d_sent;
        }
    }

    /// Moves judged intervals old enough into the windows. They are held only while they
    /// are many shards (a high rate, where the windows are bounded by time and a pause of
    /// a few ms is a visible share of them); at low rates they join the windows at once.
    fn mature(&mut self, now: Instant) {
        if self.young.is_empty() {
            return;
        }
        while let Some(&(at, l, t)) = self.young.front() {
            if now.saturating_duration_since(at) < self.config.maturity
                && self.total_young >= self.config.short_window
                && self.young.len() <= MAX_CHUNKS
            {
                break;
            }
            self.young.pop_front();
            self.lost_young -= l;
            self.total_young -= t;
            self.push_chunk(at, l, t);
        }
        self.cached = self.compute();
    }

    /// Index of dispersion of the lost count per group of `GROUP` consecutive judged shards
    /// (variance over mean) across the last groups: about `1 - p` when shards are lost
    /// independently, several times more when they are lost in bursts.
    pub fn dispersion(&self) -> Option<f64> {
        if self.groups.len() < 8 {
            return None;
        }
        let n = self.groups.len() as f64;
        let mean = self.groups.iter().map(|&l| l.max(0) as f64).sum::<f64>() / n;
        if mean <= 0.0 {
            return None;
        }
        let var = self
            .groups
            .iter()
            .map(|&l| (l.max(0) as f64 - mean).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        Some(var / mean)
    }

    fn push_chunk(&mut self, now: Instant, lost: i64, total: u64) {
        self.group.0 += lost;
        self.group.1 += total;
        if self.group.1 >= GROUP {
            self.groups.push_back(self.group.0);
            if self.groups.len() > GROUPS {
                self.groups.pop_front();
            }
            self.group = (0, 0);
        }
        self.chunks.push_back((now, lost, total));
        self.lost_all += lost;
        self.total_all += total;
        while let Some(&(at, l, t)) = self.chunks.front() {
            let young = now.saturating_duration_since(at) < self.config.window_time;
            if self.chunks.len() <= MAX_CHUNKS && (self.total_all - t < self.config.window || young)
            {
                break;
            }
            self.chunks.pop_front();
            self.lost_all -= l;
            self.total_all -= t;
        }
        // The short window: the newest chunks, back to the first one that is old enough
        // with enough shards newer than it (that one and older ones are out).
        self.short.push_back((now, lost, total));
        self.lost_short += lost;
        self.total_short += total;
        while let Some(&(at, l, t)) = self.short.front() {
            let newer = self.total_short - t;
            if self.short.len() <= MAX_CHUNKS
                && (newer < self.config.short_window
                    || now.saturating_duration_since(at) < self.config.short_window_time)
            {
                break;
            }
            self.short.pop_front();
            self.lost_short -= l;
            self.total_short -= t;
        }
    }

    /// The peer's count restarts: a new connection.
    pub fn new_connection(&mut self) {
        self.sent.clear();
        self.total_sent = 0;
        self.accounted_sent = 0;
        self.accounted_received = 0;
    }

    /// Shards left out of the estimate because they were sent into congestion.
    pub fn excluded(&self) -> u64 {
        self.excluded
    }

    /// Shards judged in the long window, and how many of them were lost.
    pub fn window(&self) -> (u64, u64) {
        (clamp_lost(self.lost_all, self.total_all), self.total_all)
    }

    /// The loss rate to plan for; see the type's docs.
    pub fn estimate(&self) -> f64 {
        self.cached
    }

    fn compute(&self) -> f64 {
        if self.total_all == 0 {
            return self.config.initial;
        }
        let z = self.config.z;
        // Young chunks count only when they found shards (negative loss): what they judged
        // lost may be shards still in flight behind a pause, found a moment later.
        let found = self.lost_young.min(0);
        let slow = wilson(
            clamp_lost(self.lost_all + found, self.total_all),
            self.total_all,
            z,
        )
        .1;
        let fast = wilson(
            clamp_lost(self.lost_short + found, self.total_short),
            self.total_short,
            self.config.z_short,
        )
        .0;
        slow.max(fast)
    }

    /// The loss rate a code spread over many messages plans for: the rate over the long
    /// window, with the prior (`initial`) counted as 64 shards judged (so a few first
    /// shards, one of them lost, do not read as 20% loss: the upper bound of
    /// [`LossEstimator::estimate`] is for a single block's plan, not for a rate spent on
    /// every message), or the short window's lower bound when that is higher (a rise shows
    /// there first).
    pub fn mean(&self) -> f64 {
        const PRIOR_SHARDS: f64 = 64.0;
        let lost = clamp_lost(self.lost_all, self.total_all) as f64;
        let observed =
            (lost + self.config.initial * PRIOR_SHARDS) / (self.total_all as f64 + PRIOR_SHARDS);
        let found = self.lost_young.min(0);
        let fast = wilson(
            clamp_lost(self.lost_short + found, self.total_short),
            self.total_short,
            self.config.z_short,
        )
        .0;
        observed.max(fast)
    }

    /// The plain loss rate over the long window (no confidence bound), if any shard was judged.
    pub fn observed(&self) -> Option<f64> {
        (self.total_all > 0)
            .then(|| clamp_lost(self.lost_all, self.total_all) as f64 / self.total_all as f64)
    }
}

fn clamp_lost(lost: i64, total: u64) -> u64 {
    (lost.max(0) as u64).min(total)
}

/// Wilson score interval `(lower, upper)` for `x` successes in `n` trials at `z` deviations.
pub fn wilson(x: u64, n: u64, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let p = x as f64 / n;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let center = (p + z2 / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    ((center - half).max(0.0), (center + half).min(1.0))
}
