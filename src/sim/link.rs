//! The link model: what happens to each packet sent over one direction of a link.
//!
//! Pure and seeded: [`Link::on_send`] takes `now` and the packet's length and returns a
//! [`Verdict`]. It draws the same number of random numbers for every packet, so the same seed
//! and the same sequence of packets give the same verdicts. Time-based fades ([`Fades`]) draw
//! from a stream of their own, so their schedule depends only on the seed and the time, not
//! on how many packets are sent.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

pub use crate::tune::GilbertElliott;

/// Which packets a link loses at random.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Loss {
    /// None.
    #[default]
    None,
    /// Each packet independently with probability `p`.
    Bernoulli(f64),
    /// Bursty loss from a two-state Markov chain.
    GilbertElliott(GilbertElliott),
    /// A recorded pattern, `true` = drop, for packet 0, 1, 2, …; repeats when it runs out.
    Replay(Arc<[bool]>),
}

/// A token-bucket-free rate limit: packets leave at `bytes_per_sec` through a FIFO queue of at
/// most `queue_bytes`; a packet that does not fit is dropped (tail drop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Link rate in bytes per second.
    pub bytes_per_sec: u64,
    /// Queue capacity in bytes.
    pub queue_bytes: usize,
}

/// A change of the rate limit's rate during a run: from `at` on, [`RateLimit::bytes_per_sec`]
/// is replaced by `bytes_per_sec`.
///
/// The queue keeps its capacity in bytes (a router's buffer does not change with its link's
/// rate), so at a lower rate it holds more time. Packets queued before the change leave at
/// the old rate up to `at` and at the new rate after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateChange {
    /// When the rate changes, measured from the link's start (like
    /// [`LinkConfig::blackouts`]).
    pub at: Duration,
    /// The rate from `at` on, in bytes per second.
    pub bytes_per_sec: u64,
}

/// Time-based fades: spans of time in which every packet is dropped, as Wi-Fi and cellular
/// links fade for some milliseconds whatever the number of packets sent.
///
/// The link alternates between "up" and "in a fade". Fades arrive as a Poisson process at
/// `per_sec` per second of up time (so the time up before a fade is exponential with mean
/// `1 / per_sec`), and each lasts an exponentially distributed time with mean `mean`. The
/// long-run share of time in a fade is therefore `per_sec·mean / (1 + per_sec·mean)`
/// ([`Fades::time_share`]). A link starts up.
///
/// The schedule is drawn lazily from its own ChaCha8 stream of the link's seed: it is a
/// function of the seed, the parameters and the time since the link's start only, the same
/// however many packets are sent, and it does not change the draws of the other models.
/// A `per_sec` or `mean` of zero (or a `per_sec` that is not a positive number) means no
/// fades.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fades {
    /// Fades per second of time outside a fade.
    pub per_sec: f64,
    /// Mean fade duration.
    pub mean: Duration,
}

/// The ChaCha8 stream the fade schedule draws from (the per-packet draws use stream 0).
const FADE_STREAM: u64 = 0xfade;

impl Fades {
    /// `per_sec` fades per second (of time outside a fade), each lasting `mean` on average.
    pub fn new(per_sec: f64, mean: Duration) -> Self {
        Fades { per_sec, mean }
    }

    /// Whether this produces any fade at all.
    pub fn is_active(&self) -> bool {
        self.per_sec > 0.0 && !self.mean.is_zero()
    }

    /// The long-run share of time spent in a fade: `per_sec·mean / (1 + per_sec·mean)`
    /// (0 when inactive).
    pub fn time_share(&self) -> f64 {
        if !self.is_active() {
            return 0.0;
        }
        let x = self.per_sec * self.mean.as_secs_f64();
        if x.is_infinite() {
            1.0
        } else {
            x / (1.0 + x)
        }
    }

    /// The fades that a link drawing from `seed` goes through before `until`, measured from
    /// the link's start: the same windows [`Link::on_send`] drops packets in. The last one may
    /// extend past `until`.
    pub fn schedule(&self, seed: u64, until: Duration) -> Vec<Range<Duration>> {
        let mut clock = FadeClock::new(*self, seed);
        let mut windows = Vec::new();
        if !self.is_active() {
            return windows;
        }
        while clock.current.start < until {
            windows.push(clock.current.clone());
            clock.advance();
        }
        windows
    }
}

/// The lazily drawn fade schedule of one link.
#[derive(Debug)]
struct FadeClock {
    fades: Fades,
    seed: u64,
    rng: ChaCha8Rng,
    /// The latest fade drawn.
    current: Range<Duration>,
    /// Where the up time before `current` began (the end of the fade before it).
    up_since: Duration,
}

impl FadeClock {
    fn new(fades: Fades, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(FADE_STREAM);
        let mut clock = FadeClock {
            fades,
            seed,
            rng,
            current: Duration::ZERO..Duration::ZERO,
            up_since: Duration::ZERO,
        };
        if fades.is_active() {
            clock.advance();
        } else {
            clock.current = Duration::MAX..Duration::MAX;
        }
        clock
    }

    /// An exponentially distributed time with mean `mean_s` seconds.
    fn exponential(&mut self, mean_s: f64) -> Duration {
        let u: f64 = self.rng.random();
        // u in [0, 1): 1 - u in (0, 1], so the logarithm is finite.
        let secs = -(1.0 - u).ln() * mean_s;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }

    /// Draws the next fade: an up time, then a fade.
    fn advance(&mut self) {
        let from = self.current.end;
        let up = self.exponential(1.0 / self.fades.per_sec);
        let length = self.exponential(self.fades.mean.as_secs_f64());
        let start = from.saturating_add(up);
        self.up_since = from;
        self.current = start..start.saturating_add(length);
    }

    /// Whether `t` (since the link's start) is inside a fade.
    fn in_fade(&mut self, t: Duration) -> bool {
        if !self.fades.is_active() {
            return false;
        }
        if t < self.up_since {
            // Earlier than the fades already passed: draw the schedule again from the start.
            *self = FadeClock::new(self.fades, self.seed);
        }
        while self.current.end <= t && self.current.end < Duration::MAX {
            self.advance();
        }
        self.current.contains(&t)
    }
}

/// Everything one direction of a link does to packets. The default is a perfect link.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LinkConfig {
    /// Random loss.
    pub loss: Loss,
    /// One-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in `0 ..= jitter`, per packet (reorders packets sent closer
    /// together than the jitter).
    pub jitter: Duration,
    /// Probability that a packet is held back by `reorder_delay` on top of its delay.
    pub reorder: f64,
    /// How long a reordered packet is held back.
    pub reorder_delay: Duration,
    /// Probability that a packet is delivered twice (the copy with its own jitter).
    pub duplicate: f64,
    /// Probability that one bit of a packet is flipped.
    pub corrupt: f64,
    /// Rate limit with a bounded queue.
    pub rate: Option<RateLimit>,
    /// Windows, measured from the link's start, in which every packet is dropped.
    pub blackouts: Vec<Range<Duration>>,
    /// Time-based fades, in which every packet is dropped; they combine with `loss` (a packet
    /// outside a fade still meets the loss model).
    pub fades: Option<Fades>,
    /// A change of `rate`'s rate during the run (no effect without `rate`).
    pub rate_change: Option<RateChange>,
}

impl LinkConfig {
    /// A link with one-way `delay` and Bernoulli loss `p`.
    pub fn lossy(delay: Duration, p: f64) -> Self {
        LinkConfig {
            delay,
            loss: Loss::Bernoulli(p),
            ..LinkConfig::default()
        }
    }
}

/// Why a packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropCause {
    /// The loss model dropped it.
    Loss,
    /// It was sent during a blackout.
    Blackout,
    /// The rate limiter's queue was full.
    QueueFull,
    /// It was sent during a fade ([`LinkConfig::fades`]).
    Fade,
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Dropped.
    Drop(DropCause),
    /// Delivered at `at`, and a second copy at `duplicate_at` if duplicated; with bit
    /// `corrupt_bit` flipped (in both copies) if corrupted.
    Deliver {
        /// When the packet arrives.
        at: Instant,
        /// When a duplicate arrives, if any.
        duplicate_at: Option<Instant>,
        /// The bit to flip, counted from the first byte's least significant bit.
        corrupt_bit: Option<usize>,
    },
}

impl Verdict {
    /// The copies of `data` this verdict delivers, with their arrival times: none if dropped,
    /// otherwise one (two if duplicated), each with the corrupted bit flipped if corrupted.
    pub fn deliveries(&self, data: &[u8]) -> Vec<(Instant, Vec<u8>)> {
        let Verdict::Deliver {
            at,
            duplicate_at,
            corrupt_bit,
        } = *self
        else {
            return Vec::new();
        };
        let mut data = data.to_vec();
        if let Some(bit) = corrupt_bit {
            data[bit / 8] ^= 1 << (bit % 8);
        }
        match duplicate_at {
            Some(dup) => vec![(at, data.clone()), (dup, data)],
            None => vec![(at, data)],
        }
    }
}

/// Counters of one link direction; readable (with [`LinkCounters::snapshot`]) while a run goes.
#[derive(Debug, Default)]
pub struct LinkCounters {
    offered_packets: AtomicU64,
    offered_bytes: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_blackout: AtomicU64,
    dropped_queue: AtomicU64,
    dropped_fade: AtomicU64,
    delivered_packets: AtomicU64,
    delivered_bytes: AtomicU64,
    duplicated: AtomicU64,
    corrupted: AtomicU64,
}

/// A snapshot of [`LinkCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Packets sent into the link.
    pub offered_packets: u64,
    /// Bytes sent into the link.
    pub offered_bytes: u64,
    /// Packets dropped by the loss model.
    pub dropped_loss: u64,
    /// Packets dropped in a blackout.
    pub dropped_blackout: u64,
    /// Packets dropped because the rate limiter's queue was full.
    pub dropped_queue: u64,
    /// Packets dropped in a fade.
    pub dropped_fade: u64,
    /// Packets scheduled for delivery (duplicates not counted).
    pub delivered_packets: u64,
    /// Bytes scheduled for delivery (duplicates not counted).
    pub delivered_bytes: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Packets delivered with a flipped bit.
    pub corrupted: u64,
}

impl LinkStats {
    /// Packets dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_loss + self.dropped_blackout + self.dropped_queue + self.dropped_fade
    }

    /// Share of offered packets dropped.
    pub fn loss_rate(&self) -> f64 {
        if self.offered_packets == 0 {
            0.0
        } else {
            self.dropped() as f64 / self.offered_packets as f64
        }
    }
}

impl LinkCounters {
    /// The counters now.
    pub fn snapshot(&self) -> LinkStats {
        LinkStats {
            offered_packets: self.offered_packets.load(Relaxed),
            offered_bytes: self.offered_bytes.load(Relaxed),
            dropped_loss: self.dropped_loss.load(Relaxed),
            dropped_blackout: self.dropped_blackout.load(Relaxed),
            dropped_queue: self.dropped_queue.load(Relaxed),
            dropped_fade: self.dropped_fade.load(Relaxed),
            delivered_packets: self.delivered_packets.load(Relaxed),
            delivered_bytes: self.delivered_bytes.load(Relaxed),
            duplicated: self.duplicated.load(Relaxed),
            corrupted: self.corrupted.load(Relaxed),
        }
    }
}

/// One direction of a link: its configuration, random state and counters.
#[derive(Debug)]
pub struct Link {
    config: LinkConfig,
    seed: u64,
    rng: ChaCha8Rng,
    fade_clock: Option<FadeClock>,
    start: Instant,
    ge_bad: bool,
    sent: u64,
    queue_free_at: Instant,
    counters: Arc<LinkCounters>,
    recording: Option<Vec<bool>>,
}

impl Link {
    /// A link whose blackouts, fades and rate change are measured from `start`, drawing from
    /// `seed`.
    pub fn new(config: LinkConfig, seed: u64, start: Instant) -> Self {
        Link {
            fade_clock: config.fades.map(|f| FadeClock::new(f, seed)),
            config,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            start,
            ge_bad: false,
            sent: 0,
            queue_free_at: start,
            counters: Arc::default(),
            recording: None,
        }
    }

    /// Starts recording every packet's fate (`true` = dropped, for any cause), for replay
    /// with [`Loss::Replay`]. One bit per packet; recording again starts a new trace.
    pub fn start_recording(&mut self) {
        self.recording = Some(Vec::new());
    }

    /// The trace recorded since [`Link::start_recording`] (empty if not recording); recording
    /// stops.
    pub fn take_recording(&mut self) -> Vec<bool> {
        self.recording.take().unwrap_or_default()
    }

    /// The configuration in use.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Changes the configuration from the next packet on; random state, queue and counters
    /// carry over, and so does the fade schedule if [`LinkConfig::fades`] is unchanged (new
    /// fade parameters give the schedule of those parameters, still measured from the
    /// link's start).
    pub fn set_config(&mut self, config: LinkConfig) {
        if config.fades != self.config.fades {
            self.fade_clock = config.fades.map(|f| FadeClock::new(f, self.seed));
        }
        self.config = config;
    }

    /// The fades this link goes through before `until`, measured from its start (see
    /// [`Fades::schedule`]); empty without fades.
    pub fn fade_schedule(&self, until: Duration) -> Vec<Range<Duration>> {
        self.config
            .fades
            .map(|f| f.schedule(self.seed, until))
            .unwrap_or_default()
    }

    /// A handle on this link's counters.
    pub fn counters(&self) -> Arc<LinkCounters> {
        self.counters.clone()
    }

    /// Decides the fate of a packet of `len` bytes sent at `now`.
    pub fn on_send(&mut self, now: Instant, len: usize) -> Verdict {
        let verdict = self.decide(now, len);
        if let Some(trace) = &mut self.recording {
            trace.push(matches!(verdict, Verdict::Drop(_)));
        }
        verdict
    }

    fn decide(&mut self, now: Instant, len: usize) -> Verdict {
        // Every draw happens for every packet, whatever the outcome, so verdicts depend only on
        // the seed and the sequence of (time, length).
        let u_state: f64 = self.rng.random();
        let u_loss: f64 = self.rng.random();
        let u_jitter: f64 = self.rng.random();
        let u_reorder: f64 = self.rng.random();
        let u_dup: f64 = self.rng.random();
        let u_dup_jitter: f64 = self.rng.random();
        let u_corrupt: f64 = self.rng.random();
        let u_bit: f64 = self.rng.random();
        let packet = self.sent;
        self.sent += 1;

        let c = &self.counters;
        c.offered_packets.fetch_add(1, Relaxed);
        c.offered_bytes.fetch_add(len as u64, Relaxed);

        let since_start = now.saturating_duration_since(self.start);
        if self
            .config
            .blackouts
            .iter()
            .any(|w| w.contains(&since_start))
        {
            c.dropped_blackout.fetch_add(1, Relaxed);
            return Verdict::Drop(DropCause::Blackout);
        }
        if let Some(clock) = &mut self.fade_clock {
            if clock.in_fade(since_start) {
                c.dropped_fade.fetch_add(1, Relaxed);
                return Verdict::Drop(DropCause::Fade);
            }
        }

        let lost = match &self.config.loss {
            Loss::None => false,
            Loss::Bernoulli(p) => u_loss < *p,
            Loss::GilbertElliott(ge) => {
                let flip = if self.ge_bad {
                    ge.p_bad_to_good
                } else {
                    ge.p_good_to_bad
                };
                if u_state < flip {
                    self.ge_bad = !self.ge_bad;
                }
                u_loss
                    < if self.ge_bad {
                        ge.loss_bad
                    } else {
                        ge.loss_good
                    }
            }
            Loss::Replay(pattern) => {
                !pattern.is_empty() && pattern[(packet % pattern.len() as u64) as usize]
            }
        };
        if lost {
            c.dropped_loss.fetch_add(1, Relaxed);
            return Verdict::Drop(DropCause::Loss);
        }

        let mut depart = now;
        if let Some(rate) = self.config.rate {
            let old = rate.bytes_per_sec.max(1) as f64;
            // The rate change, as (instant, new rate).
            let change = self
                .config
                .rate_change
                .map(|c| (self.start + c.at, c.bytes_per_sec.max(1) as f64));
            let bps_at = |t: Instant| match change {
                Some((at, new)) if t >= at => new,
                _ => old,
            };
            // Bytes the link sends from `a` to `b`.
            let bytes_between = |a: Instant, b: Instant| match change {
                Some((at, new)) if a < at && at < b => {
                    (at - a).as_secs_f64() * old + (b - at).as_secs_f64() * new
                }
                _ => b.saturating_duration_since(a).as_secs_f64() * bps_at(a),
            };
            let backlog_bytes = bytes_between(now, self.queue_free_at.max(now)) as usize;
            if backlog_bytes + len > rate.queue_bytes {
                c.dropped_queue.fetch_add(1, Relaxed);
                return Verdict::Drop(DropCause::QueueFull);
            }
            let start = self.queue_free_at.max(now);
            let mut end = start + Duration::from_secs_f64(len as f64 / bps_at(start));
            if let Some((at, new)) = change {
                if start < at && end > at {
                    // Part of the packet leaves before the change, the rest at the new rate.
                    let before = (at - start).as_secs_f64() * old;
                    end = at + Duration::from_secs_f64((len as f64 - before).max(0.0) / new);
                }
            }
            self.queue_free_at = end;
            depart = self.queue_free_at;
        }

        let jitter = |u: f64| self.config.jitter.mul_f64(u);
        let mut at = depart + self.config.delay + jitter(u_jitter);
        if u_reorder < self.config.reorder {
            at += self.config.reorder_delay;
        }
        let duplicate_at = (u_dup < self.config.duplicate)
            .then(|| depart + self.config.delay + jitter(u_dup_jitter));
        let corrupt_bit = (u_corrupt < self.config.corrupt && len > 0)
            .then(|| ((u_bit * (len * 8) as f64) as usize).min(len * 8 - 1));

        c.delivered_packets.fetch_add(1, Relaxed);
        c.delivered_bytes.fetch_add(len as u64, Relaxed);
        if duplicate_at.is_some() {
            c.duplicated.fetch_add(1, Relaxed);
        }
        if corrupt_bit.is_some() {
            c.corrupted.fetch_add(1, Relaxed);
        }
        Verdict::Deliver {
            at,
            duplicate_at,
            corrupt_bit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: usize = 100_000;

    /// Sends `n` packets of 100 bytes, one per millisecond; returns the verdicts.
    fn run(config: LinkConfig, seed: u64, n: usize) -> (Vec<Verdict>, Vec<Instant>, Link) {
        let t0 = Instant::now();
        let mut link = Link::new(config, seed, t0);
        let times: Vec<Instant> = (0..n)
            .map(|i| t0 + Duration::from_millis(i as u64))
            .collect();
        let verdicts = times.iter().map(|&t| link.on_send(t, 100)).collect();
        (verdicts, times, link)
    }

    fn lost(v: &Verdict) -> bool {
        matches!(v, Verdict::Drop(_))
    }

    /// |observed - p| ≤ 5 standard deviations of a binomial proportion over n trials.
    fn within_5_sigma(observed: f64, p: f64, n: usize) -> bool {
        (observed - p).abs() <= 5.0 * (p * (1.0 - p) / n as f64).sqrt()
    }

    #[test]
    fn bernoulli_loss_matches_p() {
        for p in [0.01, 0.1, 0.3] {
            let (v, _, link) = run(LinkConfig::lossy(Duration::ZERO, p), 7, N);
            let observed = v.iter().filter(|v| lost(v)).count() as f64 / N as f64;
            assert!(
                within_5_sigma(observed, p, N),
                "p = {p}: observed {observed}"
            );
            let st = link.counters().snapshot();
            assert_eq!(st.offered_packets, N as u64);
            assert_eq!(st.dropped_loss + st.delivered_packets, N as u64);
            assert_eq!(st.loss_rate(), observed);
        }
    }

    #[test]
    fn gilbert_elliott_mean_loss_and_burst_length() {
        // Gilbert model: all packets lost in the bad state, none in the good one.
        let ge = GilbertElliott::from_mean(0.1, 4.0);
        assert!((ge.mean_loss() - 0.1).abs() < 1e-12);
        let n = 200_000;
        let config = LinkConfig {
            loss: Loss::GilbertElliott(ge),
            ..LinkConfig::default()
        };
        let (v, _, _) = run(config, 11, n);
        let losses: Vec<bool> = v.iter().map(lost).collect();

        // Mean loss. Consecutive packets are correlated: for a two-state chain the variance of
        // the sample mean is π(1-π)/n · (1+λ)/(1-λ), with λ = 1 - p_gb - p_bg the chain's
        // second eigenvalue.
        let pi = ge.bad_share();
        let lambda = 1.0 - ge.p_good_to_bad - ge.p_bad_to_good;
        let sigma = (pi * (1.0 - pi) / n as f64 * (1.0 + lambda) / (1.0 - lambda)).sqrt();
        let mean = losses.iter().filter(|&&l| l).count() as f64 / n as f64;
        assert!(
            (mean - 0.1).abs() <= 5.0 * sigma,
            "mean loss {mean}, σ {sigma}"
        );

        // Bursts are sojourns in the bad state: geometric with mean 1/p_bg and variance
        // (1-p_bg)/p_bg²; the mean of B bursts has standard error sqrt(var / B).
        let mut bursts = Vec::new();
        let mut run_len = 0;
        for &l in &losses {
            if l {
                run_len += 1;
            } else if run_len > 0 {
                bursts.push(run_len);
                run_len = 0;
            }
        }
        let b = bursts.len() as f64;
        let mean_burst = bursts.iter().sum::<usize>() as f64 / b;
        let p = ge.p_bad_to_good;
        let se = ((1.0 - p) / (p * p) / b).sqrt();
        assert!(
            (mean_burst - 4.0).abs() <= 5.0 * se,
            "mean burst {mean_burst}, se {se}, {b} bursts"
        );
        // And far from what Bernoulli loss at the same rate gives (1 / (1 - 0.1) ≈ 1.11).
        assert!(mean_burst > 3.0);
    }

    #[test]
    fn delay_and_jitter_stay_in_bounds() {
        let config = LinkConfig {
            delay: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            duplicate: 0.05,
            ..LinkConfig::default()
        };
        let (v, times, _) = run(config, 3, 10_000);
        let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
        for (v, &t) in v.iter().zip(&times) {
            let Verdict::Deliver {
                at, duplicate_at, ..
            } = *v
            else {
                panic!("perfect link dropped a packet");
            };
            for at in std::iter::once(at).chain(duplicate_at) {
                let d = at - t;
                assert!(
                    d >= Duration::from_millis(20) && d <= Duration::from_millis(25),
                    "{d:?}"
                );
                min = min.min(d);
                max = max.max(d);
            }
        }
        // The jitter is used, not just bounded.
        assert!(min < Duration::from_micros(20_100) && max > Duration::from_micros(24_900));
    }

    #[test]
    fn blackout_drops_inside_and_nothing_outside() {
        let config = LinkConfig {
            blackouts: vec![Duration::from_millis(100)..Duration::from_millis(300)],
            ..LinkConfig::default()
        };
        let (v, _, link) = run(config, 1, 1000);
        for (i, v) in v.iter().enumerate() {
            let inside = (100..300).contains(&i);
            assert_eq!(
                *v == Verdict::Drop(DropCause::Blackout),
                inside,
                "packet {i}"
            );
            assert_eq!(lost(v), inside, "packet {i}");
        }
        assert_eq!(link.counters().snapshot().dropped_blackout, 200);
    }

    #[test]
    fn same_seed_same_trace() {
        let config = LinkConfig {
            loss: Loss::GilbertElliott(GilbertElliott::from_mean(0.2, 3.0)),
            jitter: Duration::from_millis(3),
            reorder: 0.1,
            reorder_delay: Duration::from_millis(10),
            duplicate: 0.1,
            corrupt: 0.1,
            ..LinkConfig::default()
        };
        // Each run has its own start instant: compare fates relative to the send time.
        let trace = |seed| {
            let (v, times, _) = run(config.clone(), seed, 5000);
            v.iter()
                .zip(&times)
                .map(|(v, &t)| match *v {
                    Verdict::Drop(cause) => Err(cause),
                    Verdict::Deliver {
                        at,
                        duplicate_at,
                        corrupt_bit,
                    } => Ok((at - t, duplicate_at.map(|d| d - t), corrupt_bit)),
                })
                .collect::<Vec<_>>()
        };
        let (a, b, c) = (trace(42), trace(42), trace(43));
        assert!(a == b, "same seed, different trace");
        assert!(a != c, "different seeds, same trace");
    }

    #[test]
    fn replay_follows_the_recorded_pattern() {
        let pattern: Arc<[bool]> = vec![false, true, true, false, false].into();
        let config = LinkConfig {
            loss: Loss::Replay(pattern.clone()),
            ..LinkConfig::default()
        };
        let (v, _, _) = run(config, 5, 23);
        for (i, v) in v.iter().enumerate() {
            assert_eq!(lost(v), pattern[i % 5], "packet {i}");
        }
    }

    #[test]
    fn a_recorded_trace_replays_exactly() {
        let t0 = Instant::now();
        let ge = LinkConfig {
            loss: Loss::GilbertElliott(GilbertElliott::from_mean(0.2, 5.0)),
            ..LinkConfig::default()
        };
        let mut link = Link::new(ge, 77, t0);
        link.start_recording();
        let original: Vec<bool> = (0..2000).map(|_| lost(&link.on_send(t0, 100))).collect();
        let trace = link.take_recording();
        assert_eq!(trace, original);
        assert!(trace.iter().filter(|&&d| d).count() > 200);
        // Replayed on a link with another seed: the same packets are dropped.
        let replay = LinkConfig {
            loss: Loss::Replay(trace.into()),
            ..LinkConfig::default()
        };
        let mut other = Link::new(replay, 1, t0);
        let replayed: Vec<bool> = (0..2000).map(|_| lost(&other.on_send(t0, 100))).collect();
        assert_eq!(replayed, original);
    }

    #[test]
    fn duplication_corruption_and_reordering_rates() {
        let config = LinkConfig {
            duplicate: 0.05,
            corrupt: 0.02,
            reorder: 0.1,
            reorder_delay: Duration::from_millis(7),
            ..LinkConfig::default()
        };
        let (v, times, link) = run(config, 9, N);
        let st = link.counters().snapshot();
        assert!(within_5_sigma(st.duplicated as f64 / N as f64, 0.05, N));
        assert!(within_5_sigma(st.corrupted as f64 / N as f64, 0.02, N));
        let mut reordered = 0;
        for (v, &t) in v.iter().zip(&times) {
            if let Verdict::Deliver {
                at, corrupt_bit, ..
            } = *v
            {
                reordered += usize::from(at - t == Duration::from_millis(7));
                assert!(corrupt_bit.is_none_or(|b| b < 800));
            }
        }
        assert!(within_5_sigma(reordered as f64 / N as f64, 0.1, N));
    }

    #[test]
    fn rate_limit_paces_and_tail_drops() {
        let t0 = Instant::now();
        // 100 kB/s, queue of 1000 bytes: 100-byte packets leave 1 ms apart.
        let config = LinkConfig {
            rate: Some(RateLimit {
                bytes_per_sec: 100_000,
                queue_bytes: 1000,
            }),
            ..LinkConfig::default()
        };
        let mut link = Link::new(config, 1, t0);
        // A burst of 20 at once: the first 10 fit the queue, the rest are tail-dropped.
        let verdicts: Vec<Verdict> = (0..20).map(|_| link.on_send(t0, 100)).collect();
        for (i, v) in verdicts.iter().enumerate() {
            match *v {
                Verdict::Deliver { at, .. } => {
                    assert!(i < 10, "packet {i} should not fit");
                    assert_eq!(at - t0, Duration::from_millis(i as u64 + 1));
                }
                Verdict::Drop(cause) => {
                    assert!(i >= 10);
                    assert_eq!(cause, DropCause::QueueFull);
                }
            }
        }
        // After the queue drains, packets pass again.
        assert!(matches!(
            link.on_send(t0 + Duration::from_millis(20), 100),
            Verdict::Deliver { .. }
        ));
        assert_eq!(link.counters().snapshot().dropped_queue, 10);
    }

    /// Two-state continuous-time chain, up ⇄ fade, with rates λ = `per_sec` (up → fade) and
    /// μ = 1 / mean (fade → up): the share of time in a fade is π = λ/(λ+μ), and the indicator's
    /// autocorrelation decays as e^{-(λ+μ)t}, so the share measured over a time T has variance
    /// ≈ 2π(1-π) / ((λ+μ)·T).
    fn fade_share_sigma(f: Fades, t: f64) -> f64 {
        let pi = f.time_share();
        let rates = f.per_sec + 1.0 / f.mean.as_secs_f64();
        (2.0 * pi * (1.0 - pi) / (rates * t)).sqrt()
    }

    #[test]
    fn fade_time_share_and_durations_match_the_model() {
        for (per_sec, mean_ms, seed) in [(2.0, 20, 1), (0.5, 50, 2), (10.0, 5, 3)] {
            let f = Fades::new(per_sec, Duration::from_millis(mean_ms));
            let x = per_sec * mean_ms as f64 / 1000.0;
            assert!((f.time_share() - x / (1.0 + x)).abs() < 1e-12);
            // Over a long run: the share of time in a fade.
            let horizon = 20_000.0;
            let until = Duration::from_secs_f64(horizon);
            let windows = f.schedule(seed, until);
            let faded: f64 = windows
                .iter()
                .map(|w| (w.end.min(until) - w.start).as_secs_f64())
                .sum();
            let share = faded / horizon;
            let sigma = fade_share_sigma(f, horizon);
            assert!(
                (share - f.time_share()).abs() <= 5.0 * sigma,
                "{f:?}: share {share}, expected {} ± 5·{sigma}",
                f.time_share()
            );
            // Fades are disjoint, in order, and their durations and the up times between them
            // are exponential with means `mean` and 1/per_sec: the mean of n exponentials has
            // standard error mean/√n.
            let n = windows.len() as f64;
            let mean_len = windows
                .iter()
                .map(|w| (w.end - w.start).as_secs_f64())
                .sum::<f64>()
                / n;
            let m = f.mean.as_secs_f64();
            assert!(
                (mean_len - m).abs() <= 5.0 * m / n.sqrt(),
                "{f:?}: {mean_len}"
            );
            let mut prev_end = Duration::ZERO;
            let mut up = 0.0;
            for w in &windows {
                assert!(w.start >= prev_end && w.end >= w.start);
                up += (w.start - prev_end).as_secs_f64();
                prev_end = w.end;
            }
            let mean_up = up / n;
            let g = 1.0 / per_sec;
            assert!(
                (mean_up - g).abs() <= 5.0 * g / n.sqrt(),
                "{f:?}: up {mean_up}"
            );

            // And what packets meet: one packet a millisecond over 200 s, each in a fade or
            // not; the share dropped estimates the same share of time.
            let config = LinkConfig {
                fades: Some(f),
                ..LinkConfig::default()
            };
            let n_packets = 200_000;
            let (v, _, link) = run(config, seed, n_packets);
            let dropped = v
                .iter()
                .filter(|v| **v == Verdict::Drop(DropCause::Fade))
                .count();
            assert_eq!(v.iter().filter(|v| lost(v)).count(), dropped);
            let st = link.counters().snapshot();
            assert_eq!(st.dropped_fade, dropped as u64);
            assert_eq!(st.dropped(), dropped as u64);
            let share = dropped as f64 / n_packets as f64;
            let sigma = fade_share_sigma(f, n_packets as f64 / 1000.0);
            assert!(
                (share - f.time_share()).abs() <= 5.0 * sigma,
                "{f:?}: packets dropped {share}, expected {} ± 5·{sigma}",
                f.time_share()
            );
        }
    }

    #[test]
    fn fades_are_the_same_however_many_packets_are_sent() {
        let f = Fades::new(2.0, Duration::from_millis(20));
        let config = LinkConfig {
            fades: Some(f),
            // Random loss too: its draws differ between the two links, the fades do not.
            loss: Loss::Bernoulli(0.05),
            ..LinkConfig::default()
        };
        let t0 = Instant::now();
        let mut sparse = Link::new(config.clone(), 9, t0);
        let mut dense = Link::new(config, 9, t0);
        let secs = 60;
        let schedule = f.schedule(9, Duration::from_secs(secs));
        assert!(schedule.len() > 60, "{} fades", schedule.len());
        let in_schedule = |t: Duration| schedule.iter().any(|w| w.contains(&t));
        let mut fade_drops = 0;
        // One packet every 10 ms on one link, one every millisecond (10× as many) on the other.
        for ms in 0..secs * 1000 {
            let t = Duration::from_millis(ms);
            let d = dense.on_send(t0 + t, 100) == Verdict::Drop(DropCause::Fade);
            assert_eq!(d, in_schedule(t), "dense at {t:?}");
            if ms % 10 == 0 {
                let s = sparse.on_send(t0 + t, 100) == Verdict::Drop(DropCause::Fade);
                assert_eq!(s, d, "at {t:?}");
                fade_drops += usize::from(s);
            }
        }
        assert!(fade_drops > 0);
        assert_eq!(sparse.fade_schedule(Duration::from_secs(secs)), schedule);
        assert_eq!(dense.counters().snapshot().dropped_fade, {
            (0..secs * 1000)
                .filter(|&ms| in_schedule(Duration::from_millis(ms)))
                .count() as u64
        });
        // A packet earlier than those already judged still meets the same schedule.
        let early = schedule[0].start;
        assert_eq!(
            dense.on_send(t0 + early, 100),
            Verdict::Drop(DropCause::Fade)
        );
    }

    #[test]
    fn fades_leave_the_other_draws_alone_and_repeat_with_the_seed() {
        let base = LinkConfig {
            loss: Loss::Bernoulli(0.1),
            jitter: Duration::from_millis(3),
            duplicate: 0.05,
            ..LinkConfig::default()
        };
        let faded = LinkConfig {
            fades: Some(Fades::new(5.0, Duration::from_millis(30))),
            ..base.clone()
        };
        let (plain, times, _) = run(base, 21, 20_000);
        let (with_fades, times2, link) = run(faded.clone(), 21, 20_000);
        // Outside fades, every packet's fate is the one it has without fades: the fades do
        // not consume the per-packet draws.
        let mut outside = 0;
        for (i, (a, b)) in plain.iter().zip(&with_fades).enumerate() {
            if *b == Verdict::Drop(DropCause::Fade) {
                continue;
            }
            outside += 1;
            let rel = |v: &Verdict, t: Instant| match *v {
                Verdict::Drop(c) => Err(c),
                Verdict::Deliver {
                    at, duplicate_at, ..
                } => Ok((at - t, duplicate_at.map(|d| d - t))),
            };
            assert_eq!(rel(a, times[i]), rel(b, times2[i]), "packet {i}");
        }
        let st = link.counters().snapshot();
        assert!(st.dropped_fade > 100 && st.dropped_loss > 100, "{st:?}");
        assert_eq!(outside as u64 + st.dropped_fade, 20_000);
        // Same seed, same verdicts; another seed, other fades.
        let fates = |seed| {
            let (v, times, _) = run(faded.clone(), seed, 20_000);
            v.iter()
                .zip(&times)
                .map(|(v, &t)| match *v {
                    Verdict::Drop(c) => Err(c),
                    Verdict::Deliver { at, .. } => Ok(at - t),
                })
                .collect::<Vec<_>>()
        };
        assert!(fates(21) == fates(21));
        let f = faded.fades.unwrap();
        assert_ne!(
            f.schedule(21, Duration::from_secs(20)),
            f.schedule(22, Duration::from_secs(20))
        );
    }

    #[test]
    fn set_config_keeps_the_fade_schedule() {
        let f = Fades::new(3.0, Duration::from_millis(40));
        let config = LinkConfig {
            fades: Some(f),
            ..LinkConfig::default()
        };
        let t0 = Instant::now();
        let mut link = Link::new(config.clone(), 4, t0);
        let schedule = f.schedule(4, Duration::from_secs(20));
        for ms in (0..20_000).step_by(3) {
            if ms == 10_000 {
                // A blackout added half-way (as the loss sweep does) changes no fade.
                link.set_config(LinkConfig {
                    blackouts: vec![Duration::from_secs(30)..Duration::from_secs(31)],
                    ..config.clone()
                });
            }
            let t = Duration::from_millis(ms);
            let faded = link.on_send(t0 + t, 10) == Verdict::Drop(DropCause::Fade);
            assert_eq!(faded, schedule.iter().any(|w| w.contains(&t)), "{t:?}");
        }
        // No fades: nothing is dropped.
        assert!(Fades::new(0.0, Duration::from_millis(10))
            .schedule(1, Duration::from_secs(100))
            .is_empty());
        assert!(Fades::new(1.0, Duration::ZERO)
            .schedule(1, Duration::from_secs(100))
            .is_empty());
    }

    #[test]
    fn rate_change_mid_run() {
        let t0 = Instant::now();
        // 100 kB/s, then 50 kB/s from 10 ms: 100-byte packets leave 1 ms apart, then 2 ms.
        let config = LinkConfig {
            rate: Some(RateLimit {
                bytes_per_sec: 100_000,
                queue_bytes: 1_000_000,
            }),
            rate_change: Some(RateChange {
                at: Duration::from_millis(10),
                bytes_per_sec: 50_000,
            }),
            ..LinkConfig::default()
        };
        let mut link = Link::new(config.clone(), 1, t0);
        let departures: Vec<Duration> = (0..15)
            .map(|_| match link.on_send(t0, 100) {
                Verdict::Deliver { at, .. } => at - t0,
                v => panic!("{v:?}"),
            })
            .collect();
        let close = |a: Duration, ms: f64| (a.as_secs_f64() * 1000.0 - ms).abs() < 1e-3;
        for (i, &d) in departures.iter().enumerate() {
            let expected = if i < 10 {
                i as f64 + 1.0
            } else {
                10.0 + 2.0 * (i - 9) as f64
            };
            assert!(
                close(d, expected),
                "packet {i}: {d:?}, expected {expected} ms"
            );
        }
        // A packet that straddles the change: half of it leaves at the old rate.
        let mut straddle = Link::new(
            LinkConfig {
                rate_change: Some(RateChange {
                    at: Duration::from_micros(10_500),
                    bytes_per_sec: 50_000,
                }),
                ..config.clone()
            },
            1,
            t0,
        );
        let last = (0..11).map(|_| straddle.on_send(t0, 100)).last().unwrap();
        let Verdict::Deliver { at, .. } = last else {
            panic!("{last:?}")
        };
        // 10 ms for the first ten; then 50 B by 10.5 ms and 50 B at 50 kB/s (1 ms).
        assert!(close(at - t0, 11.5), "{:?}", at - t0);
        // Measured from the link's start, not from the first packet; a later change is not yet
        // in effect.
        let mut late = Link::new(config, 1, t0);
        match late.on_send(t0 + Duration::from_millis(20), 100) {
            Verdict::Deliver { at, .. } => {
                assert!(close(at - t0, 22.0), "{:?}", at - t0)
            }
            v => panic!("{v:?}"),
        }
        // The queue's capacity stays in bytes: 1,000 bytes hold 10 packets at either rate.
        let small = LinkConfig {
            rate: Some(RateLimit {
                bytes_per_sec: 100_000,
                queue_bytes: 1000,
            }),
            rate_change: Some(RateChange {
                at: Duration::from_millis(5),
                bytes_per_sec: 50_000,
            }),
            ..LinkConfig::default()
        };
        let mut link = Link::new(small, 1, t0);
        let passed = (0..20).filter(|_| !lost(&link.on_send(t0, 100))).count();
        assert_eq!(passed, 10);
        assert_eq!(link.counters().snapshot().dropped_queue, 10);
    }
}
