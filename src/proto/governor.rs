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
/// A queue that shedding does not drain is not ours: once the queueing delay has stayed
/// past the target this many base round trips (at least [`UNDRAINED_MIN`]), the base is
/// measured again from now. That is a route that lengthened, or
/// jitter whose mean sits above the least round trip, or a queue other traffic keeps
/// full: shedding redundancy into those only costs the repair it would have bought.
const UNDRAINED_ROUND_TRIPS: u32 = 32;
const UNDRAINED_MIN: Duration = Duration::from_millis(200);

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
    /// Since when the delay has been past the target, and what it was then (or when it
    /// last fell by a quarter).
    queueing_since: Option<(Instant, Duration)>,
    /// Times the base was measured again because shedding did not drain the queue.
    rebases: u64,
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
            queueing_since: None,
            rebases: 0,
        }
    }

    /// The least round trip of the last ten minutes.
    fn base_delay(&self) -> Option<Duration> {
        self.base.iter().map(|&(_, d)| d).min()
    }

    /// The queueing delay counted as congestion: `min_target` or a quarter of the base
    /// round trip, whichever is longer.
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
            let now_delay = Duration::from_secs_f64(delay);
            match self.queueing_since {
                Some((since, _))
                    if now.saturating_duration_since(since)
                        >= (base * UNDRAINED_ROUND_TRIPS).max(UNDRAINED_MIN) =>
                {
                    let current = self.recent.iter().min().copied().unwrap_or(rtt);
                    self.base.clear();
                    self.base.push_back((now, current));
                    self.queueing_since = None;
                    self.rebases += 1;
                }
                Some(_) => {}
                None => self.queueing_since = Some((now, now_delay)),
            }
        } else {
            // A dip under the target does not end the episode, only a drained queue.
            if delay < target / 2.0 {
                self.queueing_since = None;
            }
            let room = 1.0 - delay / target;
            self.cap = (self.cap + CLIMB_PER_ROUND_TRIP * room * rounds).min(self.ceiling);
        }
    }

    /// Parity shards per data shard allowed now.
    pub(crate) fn cap(&self) -> f64 {
        self.cap
    }

    /// Times the base round trip was measured again because shedding did not drain the
    /// queue (see [`UNDRAINED_ROUND_TRIPS`]).
    #[cfg(test)]
    pub(crate) fn rebases(&self) -> u64 {
        self.rebases
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
        let rebases = self.rebases;
        *self = Governor::new(self.min_target, self.ceiling);
        self.rebases = rebases;
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
        let mut g = Governor::new(15 * MS, 2.0);
        let mut t = Instant::now();
        // Jitter up to 8 ms on 40 ms: under the 15 ms target.
        feed(&mut g, &mut t, 2000, |i| (40 + (i * 7919) % 9) * MS);
        assert!(!g.queueing());
        assert_eq!(g.cap(), 2.0);
        assert_eq!(g.allow(1, 3), 2);
    }

    #[test]
    fn a_filling_queue_sheds_parity_and_an_emptied_one_earns_it_back() {
        let mut g = Governor::new(15 * MS, 2.0);
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
        let mut g = Governor::new(15 * MS, 2.0);
        g.cap = 0.25;
        let given: usize = (0..8).map(|_| g.allow(1, 2)).sum();
        assert_eq!(given, 2);
    }

    #[test]
    fn a_lengthened_route_is_not_taken_for_a_queue_for_long() {
        let mut g = Governor::new(15 * MS, 2.0);
        let mut t = Instant::now();
        feed(&mut g, &mut t, 100, |_| 20 * MS);
        // The route lengthens to 60 ms for good: queueing at first; shedding does not drain
        // it, so after 32 round trips of 20 ms (640 ms, 128 samples) the base is measured
        // again.
        feed(&mut g, &mut t, 8, |_| 60 * MS);
        assert!(g.queueing());
        feed(&mut g, &mut t, 132, |_| 60 * MS);
        assert!(!g.queueing());
        assert_eq!(g.queueing_delay(), Some(Duration::ZERO));
        assert_eq!(g.rebases(), 1);
        // And the cap climbs back.
        feed(&mut g, &mut t, 8 * 40, |_| 60 * MS);
        assert!(g.cap() > 1.0, "{}", g.cap());
    }

    #[test]
    fn jitter_above_the_least_round_trip_does_not_shed_parity_for_long() {
        // A 10 ms path plus up to 30 ms of jitter, smoothed as quinn smooths its round trip
        // (gain 1/8 per sample, a sample every 2 ms): the smoothed round trip's mean sits
        // about 9 ms above the least it reaches in a minute. With a 5 ms target that read as
        // queueing 57% of the time (parity shed, mean cap 0.07); the 15 ms default target
        // leaves it alone.
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(5);
        let mut g = Governor::new(15 * MS, 2.0);
        let mut t = Instant::now();
        let mut srtt = 25.0f64;
        let (mut queueing, mut cap, samples) = (0u32, 0.0, 30_000u32);
        for _ in 0..samples {
            t += 2 * MS;
            let raw = 10.0 + rng.random_range(0.0..30.0);
            srtt = srtt * 7.0 / 8.0 + raw / 8.0;
            g.on_sample(t, Duration::from_secs_f64(srtt / 1000.0));
            queueing += u32::from(g.queueing());
            cap += g.cap();
        }
        let (share, mean_cap) = (
            f64::from(queueing) / f64::from(samples),
            cap / f64::from(samples),
        );
        eprintln!(
            "queueing {share:.3} of the time, mean cap {mean_cap:.2}, rebases {}",
            g.rebases()
        );
        assert!(share < 0.1, "queueing {share:.3} of the time");
        assert!(mean_cap > 1.5, "mean cap {mean_cap:.2}");
    }
}
