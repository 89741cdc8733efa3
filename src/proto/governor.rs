//! How much redundancy the path has room for, from the queueing delay it shows.
//!
//! Redundancy (first-flight parity, speculative hedges) is spare traffic: worth sending
//! while the path carries it without queueing, harmful once it fills a bottleneck's queue,
//! where its drops read as path loss and ask for more redundancy still (the collapse that
//! got FEC removed from Google's QUIC). Loss alone cannot tell a bottleneck from a lossy
//! link; queueing delay can: random loss leaves the round trip where it was, a queue that
//! fills before it drops lengthens it. So the governor treats redundancy as scavenger
//! traffic, as LEDBAT (RFC 6817) treats bulk transfers: it measures the queueing delay
//! (the least of the last few round trips minus the base, the least over the last ten
//! minutes) and keeps a cap on parity shards per data shard that grows while the delay is
//! under a target and shrinks, by half per round trip, while it is over. Data shards are
//! not governed here (quinn's congestion controller paces them).
//!
//! **The capacity budget.** A queue shows only once it has formed, and on a link the
//! messages nearly fill, any redundancy fills it again as soon as the cap climbs back. So
//! the governor also learns the path's capacity: whenever the queueing delay is past the
//! target, the path is delivering all it can, and the rate at which the peer receives
//! datagrams (from its acks' `shards_received`) is the capacity. For 10 s after such a
//! measurement, redundancy is capped by what that capacity leaves beyond the messages:
//! `cap ≤ (0.9 × capacity − message rate) / message rate`, datagrams per second, where the
//! message rate is what first flights sent over the last 100 ms. As WebRTC sets its media
//! rate to the estimate × (1 − protection overhead), repair is paid out of the path's
//! budget, never added on top of it. (quinn's BBR would be the natural source of the
//! estimate, but it reports no pacing rate while the sender is application-limited:
//! measured 0 throughout a 10 s sweep row at 1,000 kbit/s.)

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Samples the current delay is the least of (LEDBAT's `CURRENT_FILTER`).
const CURRENT_FILTER: usize = 4;
/// One base-delay bucket per minute, ten kept (LEDBAT's `BASE_HISTORY`): a route that
/// lengthens for good is re-measured within ten minutes.
const BASE_BUCKET: Duration = Duration::from_secs(60);
const BASE_HISTORY: usize = 10;
/// Parity shards per data shard the cap climbs each round trip with no queueing at all
/// (additive, as LEDBAT's window grows by at most one packet per round trip): after a
/// queue drains, redundancy comes back in steps a bottleneck notices before it overflows.
const CLIMB_PER_ROUND_TRIP: f64 = 0.1;

/// The redundancy cap and the delay measurements behind it.
#[derive(Debug, Clone)]
pub(crate) struct Governor {
    /// Queueing delay counted as congestion at least (a quarter of the base round trip if
    /// longer).
    min_target: Duration,
    /// Parity shards per data shard the cap never exceeds.
    ceiling: f64,
    /// Parity shards allowed per data shard now.
    cap: f64,
    /// Fractional parity carried to the next block (below one shard).
    credit: f64,
    recent: VecDeque<Duration>,
    /// `(bucket start, least round trip in it)`, oldest first.
    base: VecDeque<(Instant, Duration)>,
    last_update: Option<Instant>,
    /// The path's capacity in datagrams per second, measured while it queued, and when.
    capacity: Option<(f64, Instant)>,
    /// First-flight datagrams sent, `(when, count)`, over the last `RATE_WINDOW`.
    sent: VecDeque<(Instant, u64)>,
    /// Their sum.
    sent_count: u64,
    /// The peer's cumulative `shards_received`, `(when, count)`, over the last
    /// `RATE_WINDOW`.
    received: VecDeque<(Instant, u64)>,
}

/// The span over which rates are measured.
const RATE_WINDOW: Duration = Duration::from_millis(100);
/// Share of the measured capacity messages and redundancy may fill together.
const RATE_SHARE: f64 = 0.9;
/// How long a capacity measurement holds without a new one.
const CAPACITY_TTL: Duration = Duration::from_secs(10);

impl Governor {
    /// A governor that counts `min_target` of queueing (or a quarter of the base round
    /// trip, if longer) as congestion and caps parity at `ceiling` per data shard. It starts
    /// at the ceiling: a fresh path has shown no queue.
    pub(crate) fn new(min_target: Duration, ceiling: f64) -> Self {
        Governor {
            min_target,
            ceiling: ceiling.max(0.0),
            cap: ceiling.max(0.0),
            credit: 0.0,
            recent: VecDeque::with_capacity(CURRENT_FILTER),
            base: VecDeque::with_capacity(BASE_HISTORY),
            last_update: None,
            capacity: None,
            sent: VecDeque::new(),
            sent_count: 0,
            received: VecDeque::new(),
        }
    }

    /// The least round trip of the last ten minutes.
    fn base_delay(&self) -> Option<Duration> {
        self.base.iter().map(|&(_, d)| d).min()
    }

    /// The queueing delay counted as congestion.
    pub(crate) fn target(&self) -> Duration {
        self.base_delay()
            .map_or(self.min_target, |b| self.min_target.max(b / 4))
    }

    /// The current queueing delay: the least of the last few round trips over the base.
    pub(crate) fn queueing_delay(&self) -> Option<Duration> {
        let current = self.recent.iter().min()?;
        Some(current.saturating_sub(self.base_delay()?))
    }

    /// Whether the path is queueing past the target.
    pub(crate) fn queueing(&self) -> bool {
        self.queueing_delay().is_some_and(|d| d > self.target())
    }

    /// Takes a round-trip sample at `now` (the transport's smoothed round trip, or a first
    /// flight's ack).
    pub(crate) fn on_sample(&mut self, now: Instant, rtt: Duration) {
        if self.recent.len() == CURRENT_FILTER {
            self.recent.pop_front();
        }
        self.recent.push_back(rtt);
        // Buckets older than the history age out by time too (samples may be sparse).
        while self.base.front().is_some_and(|&(start, _)| {
            now.saturating_duration_since(start) >= BASE_BUCKET * BASE_HISTORY as u32
        }) {
            self.base.pop_front();
        }
        match self.base.back_mut() {
            Some((start, least)) if now.saturating_duration_since(*start) < BASE_BUCKET => {
                *least = (*least).min(rtt);
            }
            _ => {
                if self.base.len() == BASE_HISTORY {
                    self.base.pop_front();
                }
                self.base.push_back((now, rtt));
            }
        }
        let (Some(delay), Some(base)) = (self.queueing_delay(), self.base_delay()) else {
            return;
        };
        let elapsed = self
            .last_update
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_update = Some(now);
        // The share of a round trip since the last update (at most one).
        let rounds = (elapsed.as_secs_f64() / base.as_secs_f64().max(1e-3)).min(1.0);
        let target = self.target().as_secs_f64();
        let delay = delay.as_secs_f64();
        if delay > target {
            // The path delivers all it can: what the peer receives is its capacity.
            if let Some(rate) = self.received_rate() {
                self.capacity = Some((rate, now));
            }
            self.cap *= 0.5f64.powf(rounds);
            if self.cap < 0.01 {
                self.cap = 0.0;
            }
        } else {
            let room = 1.0 - delay / target;
            self.cap = (self.cap + CLIMB_PER_ROUND_TRIP * room * rounds).min(self.ceiling);
        }
    }

    /// Parity shards per data shard allowed now: the delay's cap, within what the measured
    /// capacity leaves (see the module docs).
    pub(crate) fn cap(&self) -> f64 {
        self.cap.min(self.capacity_cap())
    }

    /// The path's capacity (datagrams per second) if measured within the last 10 s.
    pub(crate) fn capacity(&self) -> Option<f64> {
        let (rate, at) = self.capacity?;
        let last = self.sent.back().map(|&(t, _)| t).unwrap_or(at);
        (last.saturating_duration_since(at) < CAPACITY_TTL).then_some(rate)
    }

    /// What the measured capacity leaves for redundancy, per message datagram.
    fn capacity_cap(&self) -> f64 {
        let Some(capacity) = self.capacity() else {
            return f64::INFINITY;
        };
        let sending = self.sent_count as f64 / RATE_WINDOW.as_secs_f64();
        if sending <= 0.0 {
            return f64::INFINITY;
        }
        ((RATE_SHARE * capacity - sending) / sending).max(0.0)
    }

    /// `count` first-flight datagrams (messages, not redundancy) left at `now`.
    pub(crate) fn on_sent(&mut self, now: Instant, count: u64) {
        self.sent.push_back((now, count));
        self.sent_count += count;
        while let Some(&(at, c)) = self.sent.front() {
            if now.saturating_duration_since(at) <= RATE_WINDOW {
                break;
            }
            self.sent.pop_front();
            self.sent_count -= c;
        }
    }

    /// The peer's cumulative count of datagrams received, from an ack at `now`.
    pub(crate) fn on_peer_received(&mut self, now: Instant, total: u64) {
        if self.received.back().is_some_and(|&(_, c)| c > total) {
            // A count from a new incarnation of the peer: start over.
            self.received.clear();
        }
        self.received.push_back((now, total));
        while self.received.len() > 2
            && self
                .received
                .get(1)
                .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= RATE_WINDOW)
        {
            self.received.pop_front();
        }
    }

    /// Datagrams per second the peer received over the last `RATE_WINDOW` or so.
    fn received_rate(&self) -> Option<f64> {
        let (&(t0, c0), &(t1, c1)) = (self.received.front()?, self.received.back()?);
        let span = t1.saturating_duration_since(t0).as_secs_f64();
        (span >= RATE_WINDOW.as_secs_f64() / 2.0).then(|| (c1 - c0) as f64 / span)
    }

    /// How many of `wanted` parity shards a block of `k` data shards may carry; fractions
    /// carry over to the next block, so a cap of 0.25 gives one parity shard every fourth
    /// one-shard block.
    pub(crate) fn allow(&mut self, k: usize, wanted: usize) -> usize {
        let allowance = self.cap() * k as f64 + self.credit;
        let allowed = (allowance.floor() as usize).min(wanted);
        self.credit = if allowed < wanted {
            (allowance - allowed as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        allowed
    }

    /// A new path: its queue and its rate are not the old one's.
    pub(crate) fn reset(&mut self) {
        *self = Governor::new(self.min_target, self.ceiling);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Feeds one sample every 5 ms for `count` samples from `t`, each `rtt(i)`.
    fn feed(g: &mut Governor, t: &mut Instant, count: u32, rtt: impl Fn(u32) -> Duration) {
        for i in 0..count {
            *t += 5 * MS;
            g.on_sample(*t, rtt(i));
        }
    }

    #[test]
    fn a_path_without_queueing_keeps_the_ceiling() {
        let mut g = Governor::new(5 * MS, 2.0);
        let mut t = Instant::now();
        // Jitter up to 8 ms on 40 ms: under the 10 ms target (a quarter of the base).
        feed(&mut g, &mut t, 2000, |i| (40 + (i * 7919) % 9) * MS);
        assert!(!g.queueing());
        assert_eq!(g.cap(), 2.0);
        assert_eq!(g.allow(1, 3), 2);
    }

    #[test]
    fn a_filling_queue_sheds_parity_and_an_emptied_one_earns_it_back() {
        let mut g = Governor::new(5 * MS, 2.0);
        let mut t = Instant::now();
        feed(&mut g, &mut t, 100, |_| 40 * MS);
        // A 50 ms queue: the cap halves every round trip (40 ms = 8 samples here).
        feed(&mut g, &mut t, 8 * 10, |_| 90 * MS);
        assert!(g.queueing());
        assert_eq!(g.cap(), 0.0, "ten round trips of queueing");
        assert_eq!(g.allow(1, 3), 0);
        // The queue drains: back to the ceiling, 0.1 a round trip, in twenty round trips.
        feed(&mut g, &mut t, 8 * 10, |_| 40 * MS);
        assert!((g.cap() - 1.0).abs() < 0.05, "{}", g.cap());
        feed(&mut g, &mut t, 8 * 11, |_| 40 * MS);
        assert!(!g.queueing());
        assert!((g.cap() - 2.0).abs() < 1e-9, "{}", g.cap());
    }

    #[test]
    fn fractions_of_a_shard_carry_to_the_next_block() {
        let mut g = Governor::new(5 * MS, 2.0);
        g.cap = 0.25;
        let given: usize = (0..8).map(|_| g.allow(1, 2)).sum();
        assert_eq!(given, 2);
    }

    #[test]
    fn redundancy_is_paid_out_of_the_capacity_measured_while_queueing() {
        let mut g = Governor::new(5 * MS, 2.0);
        let mut t = Instant::now();
        let mut received = 0;
        // 200 messages a second (one every 5 ms), the peer receiving 220 a second (the
        // messages and some redundancy) through a path that does not queue: no capacity
        // known, the delay alone decides.
        for _ in 0..100 {
            t += 5 * MS;
            g.on_sent(t, 1);
            received += 1;
            g.on_peer_received(t, received + received / 10);
            g.on_sample(t, 40 * MS);
        }
        assert_eq!(g.capacity(), None);
        assert!((g.cap() - 2.0).abs() < 1e-9);
        // Now the path queues (50 ms over the base): it delivers 220 a second, all it can.
        for _ in 0..20 {
            t += 5 * MS;
            g.on_sent(t, 1);
            received += 1;
            g.on_peer_received(t, received + received / 10);
            g.on_sample(t, 90 * MS);
        }
        let capacity = g.capacity().expect("measured");
        assert!((capacity - 220.0).abs() < 5.0, "{capacity}");
        // The queue drains and the delay's cap climbs back, but the capacity holds:
        // 0.9 × 220 - 200 = -2, nothing left for redundancy.
        for _ in 0..400 {
            t += 5 * MS;
            g.on_sent(t, 1);
            g.on_sample(t, 40 * MS);
        }
        assert!(g.cap > 1.0, "the delay cap climbed back: {}", g.cap);
        assert_eq!(g.cap(), 0.0);
        assert_eq!(g.allow(1, 3), 0);
        // Half the message rate: 0.9 × 220 - 100 = 98 per 100 messages (measured over a
        // 100 ms window holding 10 or 11 of them).
        for _ in 0..40 {
            t += 10 * MS;
            g.on_sent(t, 1);
        }
        assert!((0.75..=1.0).contains(&g.cap()), "{}", g.cap());
        // Ten seconds later the measurement has expired.
        for _ in 0..1000 {
            t += 10 * MS;
            g.on_sent(t, 1);
        }
        assert_eq!(g.capacity(), None);
    }

    #[test]
    fn the_base_is_remeasured_after_ten_minutes() {
        let mut g = Governor::new(5 * MS, 2.0);
        let mut t = Instant::now();
        g.on_sample(t, 20 * MS);
        // The route lengthens to 60 ms for good: queueing at first, not after ten minutes.
        for _ in 0..(11 * 60) {
            t += Duration::from_secs(1);
            g.on_sample(t, 60 * MS);
        }
        assert_eq!(g.queueing_delay(), Some(Duration::ZERO));
        assert!(!g.queueing());
    }
}
