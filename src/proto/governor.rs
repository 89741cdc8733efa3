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
}

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
            self.cap *= 0.5f64.powf(rounds);
            if self.cap < 0.01 {
                self.cap = 0.0;
            }
        } else {
            let room = 1.0 - delay / target;
            self.cap = (self.cap + CLIMB_PER_ROUND_TRIP * room * rounds).min(self.ceiling);
        }
    }

    /// Parity shards per data shard allowed now.
    pub(crate) fn cap(&self) -> f64 {
        self.cap
    }

    /// How many of `wanted` parity shards a block of `k` data shards may carry; fractions
    /// carry over to the next block, so a cap of 0.25 gives one parity shard every fourth
    /// one-shard block.
    pub(crate) fn allow(&mut self, k: usize, wanted: usize) -> usize {
        let allowance = self.cap * k as f64 + self.credit;
        let allowed = (allowance.floor() as usize).min(wanted);
        self.credit = if allowed < wanted {
            (allowance - allowed as f64).clamp(0.0, 1.0)
        } else {
            0.0
        };
        allowed
    }

    /// A new path: its queue is not the old one's.
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
