use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::*;

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn bernoulli_rows_are_binomial() {
    let t = LossModel::Bernoulli(0.1).loss_counts(6);
    for n in 0..=6 {
        let sum: f64 = (0..=n).map(|j| t.exactly(n, j)).sum();
        assert!(close(sum, 1.0, 1e-12), "row {n} sums to {sum}");
    }
    // C(4, j) 0.1^j 0.9^(4-j)
    assert!(close(t.exactly(4, 0), 0.6561, 1e-12));
    assert!(close(t.exactly(4, 2), 6.0 * 0.01 * 0.81, 1e-12));
    // (1, 2): both lost.
    assert!(close(t.residual(1, 2), 0.01, 1e-12));
    // (2, 4): three or four of four lost.
    assert!(close(t.residual(2, 4), 4.0 * 0.001 * 0.9 + 0.0001, 1e-12));
    assert_eq!(t.residual(0, 3), 0.0);
    assert_eq!(t.residual(5, 3), 1.0);
    assert_eq!(t.residual(1, 99), 1.0, "past the table counts as failure");
}

#[test]
fn gilbert_elliott_with_equal_states_is_bernoulli() {
    let ge = GilbertElliott {
        p_good_to_bad: 0.3,
        p_bad_to_good: 0.2,
        loss_good: 0.07,
        loss_bad: 0.07,
    };
    let a = LossModel::from(ge).loss_counts(10);
    let b = LossModel::Bernoulli(0.07).loss_counts(10);
    for n in 0..=10 {
        for j in 0..=n {
            assert!(close(a.exactly(n, j), b.exactly(n, j), 1e-12));
        }
    }
}

#[test]
fn bursts_make_the_tail_heavier_at_the_same_mean() {
    let ge = LossModel::from(GilbertElliott::from_mean(0.1, 4.0));
    let bern = LossModel::Bernoulli(0.1);
    assert!(close(ge.mean_loss(), 0.1, 1e-12));
    // One packet: the same marginal.
    assert!(close(ge.residual(1, 1), 0.1, 1e-12));
    // Two consecutive packets both lost: P(bad) × P(stay bad) = 0.1 × 0.75.
    assert!(close(ge.residual(1, 2), 0.075, 1e-12));
    assert!(ge.residual(2, 4) > 10.0 * bern.residual(2, 4));
}

/// Runs of `n` consecutive packets through the simulator's link model: how often more than
/// `n - k` are lost, against the model's exact value. The bound is 5 standard deviations of
/// the count of failing runs (runs are nearly independent: each is long against the chain's
/// memory only for Bernoulli, so for Gilbert-Elliott the bound uses the variance inflated by
/// the mean burst length).
fn check_against_link(model: LossModel, loss: crate::sim::Loss, k: usize, n: usize, runs: usize) {
    use crate::sim::{Link, LinkConfig, Verdict};
    let start = Instant::now();
    let mut link = Link::new(
        LinkConfig {
            loss,
            ..LinkConfig::default()
        },
        7,
        start,
    );
    // Warm the chain up to its stationary state.
    for _ in 0..1000 {
        link.on_send(start, 100);
    }
    let mut failed = 0;
    for _ in 0..runs {
        let lost = (0..n)
            .filter(|_| matches!(link.on_send(start, 100), Verdict::Drop(_)))
            .count();
        failed += usize::from(lost > n - k);
    }
    let expected = model.residual(k, n);
    let burst = match model {
        LossModel::GilbertElliott(ge) => 1.0 / ge.p_bad_to_good,
        LossModel::Bernoulli(_) => 1.0,
    };
    let sd = (runs as f64 * expected * (1.0 - expected) * burst).sqrt();
    let got = failed as f64;
    assert!(
        (got - runs as f64 * expected).abs() <= 5.0 * sd + 1.0,
        "({k}, {n}): {failed} of {runs} runs failed, model says {:.1}",
        runs as f64 * expected
    );
}

#[test]
fn model_matches_the_simulator_bernoulli() {
    for (k, n) in [(1, 2), (2, 4), (4, 7), (3, 6)] {
        check_against_link(
            LossModel::Bernoulli(0.1),
            crate::sim::Loss::Bernoulli(0.1),
            k,
            n,
            200_000,
        );
    }
}

#[test]
fn model_matches_the_simulator_gilbert_elliott() {
    let ge = GilbertElliott::from_mean(0.05, 4.0);
    for (k, n) in [(1, 2), (2, 4), (4, 7), (1, 5)] {
        check_against_link(
            LossModel::from(ge),
            crate::sim::Loss::GilbertElliott(ge),
            k,
            n,
            200_000,
        );
    }
}

/// The chosen plan, applied by the real encoder and reassembler with the simulator's link
/// between them: the share of messages not rebuilt from the first flight matches the plan's
/// residual (5 standard deviations).
#[test]
fn plans_deliver_their_residual_through_encoder_link_and_reassembler() {
    use crate::fec::{Encoder, EncoderConfig, Reassembler, ReassemblerConfig};
    use crate::sim::{Link, LinkConfig, Verdict};
    use crate::wire::{Frame, Limits};

    for (p, target) in [(0.1, 0.005), (0.2, 0.005), (0.05, 0.01)] {
        let model = LossModel::Bernoulli(p);
        let profile = Profile {
            message_size: 513,
            ..Profile::default()
        };
        let target = Target {
            residual: target,
            max_linger: Duration::ZERO,
        };
        let plan = plan(&model, &profile, &target, &TunerConfig::default());
        assert!(plan.meets_target, "{plan:?}");
        let start = Instant::now();
        let mut link = Link::new(LinkConfig::lossy(Duration::ZERO, p), 11, start);
        let mut enc = Encoder::new(EncoderConfig::default());
        let mut rx = Reassembler::new(ReassemblerConfig::default());
        let messages = 40_000u64;
        let mut delivered = 0u64;
        for id in 0..messages {
            let payload = Bytes::from(vec![id as u8; 513]);
            let mut block = enc
                .encode_split(id, payload, plan.data_shards, plan.repair_shards)
                .unwrap();
            assert_eq!(block.header().data_shards, plan.data_shards);
            let mut frames = block.data_frames();
            frames.extend(block.next_repair(usize::from(plan.repair_shards)));
            for f in frames {
                if let Verdict::Deliver { .. } = link.on_send(start, f.len()) {
                    if let Ok(Frame::Shard(s)) = Frame::decode(f.clone(), &Limits::default()) {
                        rx.insert(s);
                    }
                }
            }
            while let Some(d) = rx.poll_delivery() {
                assert_eq!(d.message_id, id);
                delivered += 1;
            }
        }
        let failed = (messages - delivered) as f64;
        let expected = messages as f64 * plan.residual;
        let sd = (expected * (1.0 - plan.residual)).sqrt();
        assert!(
            (failed - expected).abs() <= 5.0 * sd + 1.0,
            "p {p}: {failed} of {messages} not rebuilt, plan {plan:?} says {expected:.1}"
        );
    }
}

#[test]
fn clean_link_plans_no_parity() {
    let p = plan(
        &LossModel::Bernoulli(0.0),
        &Profile::default(),
        &Target::default(),
        &TunerConfig::default(),
    );
    assert_eq!((p.data_shards, p.repair_shards), (1, 0));
    assert!(p.wire_ratio < 1.15, "{p:?}");
    assert_eq!(p.least_code_overhead, 1.0);
}

#[test]
fn plans_meet_the_target_and_stay_near_the_bound() {
    let cfg = TunerConfig::default();
    let mut last_overhead = 0.0;
    for p in [0.001, 0.01, 0.05, 0.1, 0.2, 0.3] {
        let model = LossModel::Bernoulli(p);
        let plan = plan(&model, &Profile::default(), &Target::default(), &cfg);
        assert!(plan.meets_target, "p {p}: {plan:?}");
        // Exhaustive check: no candidate within the search bounds is cheaper and meets it.
        for k in 1..=8usize {
            for m in 0..=12usize {
                let shard = 512usize.div_ceil(k);
                let ratio = (k + m) as f64
                    * (shard + frame_header_len(1) + cfg.packet_overhead) as f64
                    / 512.0;
                if model.residual(k, k + m) <= 0.005 {
                    assert!(ratio >= plan.wire_ratio - 1e-9, "p {p}: ({k}, {m}) cheaper");
                }
            }
        }
        assert!(plan.code_overhead >= plan.least_code_overhead - 1e-9);
        assert!(
            plan.code_overhead >= last_overhead - 1e-9,
            "more loss, less code?"
        );
        last_overhead = plan.code_overhead;
        assert!(plan.residual_after_hedge <= plan.residual);
    }
    // At 10% loss the plan fits the overhead goal of 2.5×.
    let ten = plan(
        &LossModel::Bernoulli(0.1),
        &Profile::default(),
        &Target::default(),
        &cfg,
    );
    assert!(ten.wire_ratio <= 2.5, "{ten:?}");
}

#[test]
fn linger_allows_cross_message_blocks_when_the_rate_is_high() {
    let profile = Profile {
        message_size: 128,
        rate: 10_000.0,
        ..Profile::default()
    };
    let target = Target {
        residual: 0.005,
        max_linger: Duration::from_millis(2),
    };
    let model = LossModel::Bernoulli(0.1);
    let batched = plan(&model, &profile, &target, &TunerConfig::default());
    let alone = plan(
        &model,
        &profile,
        &Target {
            max_linger: Duration::ZERO,
            ..target
        },
        &TunerConfig::default(),
    );
    assert!(batched.messages_per_block > 1, "{batched:?}");
    assert!(batched.linger <= target.max_linger);
    assert!(batched.wire_ratio < alone.wire_ratio);
}

#[test]
fn impossible_targets_give_the_strongest_plan() {
    let p = plan(
        &LossModel::Bernoulli(0.9),
        &Profile::default(),
        &Target {
            residual: 1e-9,
            max_linger: Duration::ZERO,
        },
        &TunerConfig::default(),
    );
    assert!(!p.meets_target);
    assert_eq!(p.repair_shards, 12);
}

/// A seeded sender/receiver pair of counters: shards sent one per millisecond, each lost with
/// probability `p`; a shard arrives half a round trip (20 ms) after it is sent, and the peer's
/// count takes another half to come back.
struct Feed {
    rng: ChaCha8Rng,
    now: Instant,
    sent: u64,
    received: Vec<(Instant, u64)>,
    total_received: u64,
}

impl Feed {
    fn new(seed: u64) -> Self {
        Feed {
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Instant::now(),
            sent: 0,
            received: Vec::new(),
            total_received: 0,
        }
    }

    fn run(&mut self, est: &mut LossEstimator, shards: u64, p: f64) {
        let rtt = Duration::from_millis(40);
        for _ in 0..shards {
            self.now += Duration::from_millis(1);
            est.on_sent(self.now, 1);
            self.sent += 1;
            if self.rng.random::<f64>() >= p {
                self.total_received += 1;
            }
            // Arrival times: sent + rtt / 2.
            self.received
                .push((self.now + rtt / 2, self.total_received));
            // The peer's count as of half a round trip ago arrives now.
            let seen = self.now - rtt / 2;
            let count = self
                .received
                .iter()
                .rev()
                .find(|(t, _)| *t <= seen)
                .map_or(0, |&(_, c)| c);
            est.on_ack(self.now, count, rtt);
        }
    }
}

#[test]
fn estimator_converges_and_reacts() {
    let mut est = LossEstimator::new(EstimatorConfig::default());
    assert_eq!(est.estimate(), 0.02, "the prior before any ack");
    let mut feed = Feed::new(3);
    // Clean: the bound falls below the 0.5% that lets the tuner send no parity.
    feed.run(&mut est, 600, 0.0);
    assert!(est.estimate() < 0.005, "clean: {}", est.estimate());
    // Loss appears: see `estimator_reacts_to_loss_onset` for the reaction time.
    feed.run(&mut est, 200, 0.1);
    assert!(est.estimate() > 0.02, "onset: {}", est.estimate());
    // Long run at 10%: the plain rate over the window is within 4 standard deviations
    // (window of 512 shards), and the planning estimate is not below it.
    feed.run(&mut est, 5000, 0.1);
    let observed = est.observed().unwrap();
    let sd = (0.1f64 * 0.9 / 512.0).sqrt();
    assert!(close(observed, 0.1, 4.0 * sd), "observed {observed}");
    assert!(est.estimate() >= observed);
    // And back to clean.
    feed.run(&mut est, 1200, 0.0);
    assert!(est.estimate() < 0.005, "recovered: {}", est.estimate());
}

/// After a clean spell, loss of 10% appears: once 128 shards of it are judged, is the
/// estimate above 2%? The chance that it is not follows from the estimator's definition: with
/// `a` losses among the first 96 lossy shards and `b` among the last 32, it lags when the short
/// window's lower bound (b of 32) and the long window's upper bound (a + b of 512) are both at
/// most 2%. Summed over the two binomials, that is the expected share of lagging onsets; 200
/// seeded onsets may lag up to 3 standard deviations above it.
#[test]
fn estimator_reacts_to_loss_onset() {
    let config = EstimatorConfig::default();
    let bin = LossModel::Bernoulli(0.1).loss_counts(96);
    let mut p_lag = 0.0;
    for a in 0..=96 {
        for b in 0..=32 {
            let short = wilson(b as u64, 32, config.z_short).0;
            let long = wilson((a + b) as u64, 512, config.z).1;
            if short <= 0.02 && long <= 0.02 {
                p_lag += bin.exactly(96, a) * bin.exactly(32, b);
            }
        }
    }
    let guard_shards = 40;
    let runs = 200;
    let mut lagging = 0;
    for seed in 0..runs {
        let mut est = LossEstimator::new(config);
        let mut feed = Feed::new(seed);
        feed.run(&mut est, 600, 0.0);
        feed.run(&mut est, 128 + guard_shards, 0.1);
        lagging += usize::from(est.estimate() <= 0.02);
    }
    let expected = runs as f64 * p_lag;
    let sd = (expected * (1.0 - p_lag)).sqrt();
    eprintln!("lagging {lagging} of {runs}, expected {expected:.1}");
    assert!(
        lagging as f64 <= expected + 3.0 * sd + 1.0,
        "{lagging} of {runs} onsets not seen after 128 shards, expected {expected:.1}"
    );
}

#[test]
fn estimator_memory_is_bounded_without_acks() {
    let mut est = LossEstimator::new(EstimatorConfig {
        history: 64,
        ..EstimatorConfig::default()
    });
    let t = Instant::now();
    for i in 0..10_000u64 {
        est.on_sent(t + Duration::from_micros(i), 1);
    }
    // Everything sent is judged by one late ack that saw it all: nothing counted lost.
    est.on_ack(t + Duration::from_secs(10), 10_000, Duration::from_secs(1));
    // (An interval that large waits `maturity` before it joins the windows.)
    est.on_ack(t + Duration::from_secs(11), 10_000, Duration::from_secs(1));
    assert_eq!(est.window().0, 0);
    assert!(est.window().1 >= 512);
}

#[test]
fn wilson_bounds() {
    let (lo, hi) = wilson(0, 512, 1.0);
    assert_eq!(lo, 0.0);
    assert!(hi < 0.002);
    let (lo, hi) = wilson(50, 500, 1.0);
    assert!(lo < 0.1 && hi > 0.1 && hi - lo < 0.03);
}

/// At high rates the peer's count lags what was handed to the transport by a varying few
/// milliseconds (its queues, the peer's scheduling): shards judged lost in one interval are
/// found in a later one. Over windows of a few milliseconds (512 shards at 50 shards a
/// millisecond) those errors stop cancelling; the windows' time spans keep a clean link
/// reading clean.
#[test]
fn a_clean_link_at_a_high_rate_reads_clean_despite_a_varying_lag() {
    const LAG_US: u64 = 400;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let run = |config: EstimatorConfig, rng: &mut ChaCha8Rng| {
        let mut est = LossEstimator::new(config);
        let t = Instant::now();
        let guard = Duration::from_micros(200);
        // (send time, count after it), 50 shards a millisecond for two seconds.
        let mut sent = Vec::new();
        for i in 0..100_000u64 {
            let at = t + Duration::from_micros(20 * i);
            est.on_sent(at, 1);
            sent.push((at, i + 1));
            if i % 25 == 24 {
                // An ack every half millisecond; the peer has what was sent more than the
                // guard plus a lag of 0-0.4 ms ago (nothing is lost).
                let lag = Duration::from_micros(rng.random_range(0..LAG_US));
                let seen = at.checked_sub(guard + lag).unwrap_or(t);
                let count = sent
                    .iter()
                    .rev()
                    .find(|(s, _)| *s <= seen)
                    .map_or(0, |&(_, c)| c);
                est.on_ack(at, count, guard);
            }
        }
        est.estimate()
    };
    let windowed = run(EstimatorConfig::default(), &mut rng);
    let shards_only = run(
        EstimatorConfig {
            window_time: Duration::ZERO,
            short_window_time: Duration::ZERO,
            ..EstimatorConfig::default()
        },
        &mut rng,
    );
    eprintln!("estimate {windowed:.5}; with windows of shards only {shards_only:.5}");
    // 0.5% is where the tuner starts sending parity (its p99 target's residual).
    assert!(windowed < 0.005, "clean link read as {windowed}");
    assert!(
        shards_only > 0.005,
        "without the time spans the lag reads as loss: {shards_only}"
    );
}

/// A clean link whose peer pauses now and then (a receiver descheduled for 3 ms every
/// 100 ms, then working through its backlog for 3 ms) reads clean at 50 shards a
/// millisecond: what a pause makes look lost is found by the next acks within the
/// maturity. Without it, the estimate crosses the tuner's parity threshold after pauses.
#[test]
fn a_clean_link_whose_peer_pauses_reads_clean() {
    let run = |config: EstimatorConfig| {
        let mut est = LossEstimator::new(config);
        let t = Instant::now();
        let guard = Duration::from_micros(200);
        let mut worst: f64 = 0.0;
        for i in 0..100_000u64 {
            let at = t + Duration::from_micros(20 * i);
            est.on_sent(at, 1);
            // An ack every half millisecond, none while the peer pauses (the first 3 ms of
            // every 100); in the 3 ms after, its acks lag by what is left of the backlog
            // (3 ms falling to 0). Otherwise the peer has everything sent more than the
            // guard ago: nothing is lost.
            let phase = (i * 20) % 100_000;
            if i % 25 != 24 || phase < 3_000 {
                continue;
            }
            let lag_us = 6_000u64.saturating_sub(phase).min(3_000);
            let seen_us = (i * 20).saturating_sub(200 + lag_us);
            est.on_ack(at, seen_us / 20 + 1, guard);
            if i > 25_000 {
                worst = worst.max(est.estimate());
            }
        }
        worst
    };
    let held = run(EstimatorConfig::default());
    let unheld = run(EstimatorConfig {
        maturity: Duration::ZERO,
        ..EstimatorConfig::default()
    });
    eprintln!("worst estimate {held:.5}; without maturity {unheld:.5}");
    // 0.5% is where the tuner starts sending parity (its p99 target's residual).
    assert!(held < 0.005, "clean link read as {held}");
    assert!(
        unheld > 0.005,
        "without maturity the pauses read as loss: {unheld}"
    );
}

/// On a path whose round trip is shorter than the spacing of a split message's data
/// shards, a message that fits one datagram is not split (its parity is whole copies). On
/// a 40 ms path the same loss splits it (cheaper in bytes, and the spacing is small beside
/// the round trip).
#[test]
fn a_message_is_not_split_wider_than_the_round_trip_allows() {
    let model = LossModel::Bernoulli(0.01);
    let target = Target::default();
    let config = TunerConfig::default();
    let at = |rtt_us: u64, message_size: usize| {
        plan(
            &model,
            &Profile {
                message_size,
                rtt: Duration::from_micros(rtt_us),
                ..Profile::default()
            },
            &target,
            &config,
        )
    };
    let far = at(40_000, 512);
    assert!(far.data_shards > 1, "{far:?}");
    let near = at(200, 512);
    assert_eq!(near.data_shards, 1, "{near:?}");
    assert!(near.meets_target, "{near:?}");
    // Shards too large for two to share a datagram go together, unspaced: such a message is
    // split as bytes say (here into 3, its parity one shard).
    let big = at(200, 2000);
    assert!(big.data_shards >= 2 && big.shard_size * 2 > 1200, "{big:?}");
    // 2.5 ms: up to 3 data shards (their spacing 2 ms).
    assert!(at(2_500, 512).data_shards <= 3);
}

/// The loss's index of dispersion tells independent loss from bursts, from the peer's
/// shard counts alone. Its value under each model is exact from the chain (the law of the
/// lost count in 32 consecutive packets): 0.95 for 5% independent loss, 5.6 for 5% in
/// bursts of 4. Seeded; over 64 groups the estimate's relative spread is about
/// `sqrt(2 / 63)` = 0.18 (more for the bursts' heavier tail), so the bounds sit 4 spreads
/// above the first and about 2.5 below the second.
#[test]
fn dispersion_tells_bursts_from_independent_loss() {
    let exact = |model: LossModel| {
        let table = model.loss_counts(32);
        let mean: f64 = (0..=32).map(|j| j as f64 * table.exactly(32, j)).sum();
        let var: f64 = (0..=32)
            .map(|j| (j as f64 - mean).powi(2) * table.exactly(32, j))
            .sum();
        var / mean
    };
    let burst_model = LossModel::GilbertElliott(GilbertElliott::from_mean(0.05, 4.0));
    let (d_independent, d_bursts) = (exact(LossModel::Bernoulli(0.05)), exact(burst_model));
    eprintln!("exact: independent {d_independent:.2}, bursts of 4 {d_bursts:.2}");
    assert!((d_independent - 0.95).abs() < 0.01 && d_bursts > 4.0);
    let run = |model: LossModel, seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (p_gb, p_bg, l_g, l_b) = match model {
            LossModel::Bernoulli(p) => (0.0, 1.0, p, p),
            LossModel::GilbertElliott(ge) => (
                ge.p_good_to_bad,
                ge.p_bad_to_good,
                ge.loss_good,
                ge.loss_bad,
            ),
        };
        let mut bad = false;
        let mut est = LossEstimator::new(EstimatorConfig::default());
        let t = Instant::now();
        let mut received = 0u64;
        for i in 0..4_000u64 {
            let at = t + Duration::from_millis(i);
            est.on_sent(at, 1);
            if rng.random::<f64>() < if bad { p_bg } else { p_gb } {
                bad = !bad;
            }
            if rng.random::<f64>() >= if bad { l_b } else { l_g } {
                received += 1;
            }
            // An ack per shard sent, covering it (a guard of zero).
            est.on_ack(at, received, Duration::ZERO);
        }
        est.dispersion().expect("enough groups with loss")
    };
    for seed in 1..=5 {
        let independent = run(LossModel::Bernoulli(0.05), seed);
        let bursts = run(burst_model, seed);
        eprintln!("seed {seed}: independent {independent:.2}, bursts of 4 {bursts:.2}");
        assert!(
            independent < d_independent * (1.0 + 4.0 * 0.18),
            "{independent}"
        );
        assert!(bursts > d_bursts * (1.0 - 2.5 * 0.18), "{bursts}");
    }
}
