//! Choosing code parameters for a loss model, a traffic profile and a target.

use std::time::Duration;

use super::model::{LossModel, LossTable};

/// The traffic the tuner plans for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Profile {
    /// Bytes per message, as coded (the envelope included).
    pub message_size: usize,
    /// Messages per second (0 when unknown: no cross-message blocks are considered).
    pub rate: f64,
    /// The link's round trip (send to ack).
    pub rtt: Duration,
    /// Largest datagram the path carries.
    pub max_datagram_size: usize,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            message_size: 512,
            rate: 0.0,
            rtt: Duration::from_millis(40),
            max_datagram_size: 1162,
        }
    }
}

/// What the plan must achieve.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// Highest acceptable probability that a message's first flight does not rebuild it
    /// (its ack then waits for a hedge, about one more round trip).
    pub residual: f64,
    /// Longest a message may wait for others to share its block (cross-message blocks).
    /// Zero: one block per message.
    pub max_linger: Duration,
}

impl Target {
    /// The target for a latency quantile `q` (e.g. 0.99 for p99): the share of messages
    /// that need a hedge must sit well inside `1 - q`, so it is set to half of it. A p99
    /// target gives a residual of 0.5%.
    pub fn for_quantile(q: f64) -> Self {
        Target {
            residual: ((1.0 - q) / 2.0).clamp(1e-9, 0.5),
            max_linger: Duration::ZERO,
        }
    }
}

impl Default for Target {
    /// The p99 target: residual 0.5%, no linger.
    fn default() -> Self {
        Target::for_quantile(0.99)
    }
}

/// Costs and bounds of the search.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TunerConfig {
    /// Most data shards a message is split into (or a cross-message block uses). Default 8.
    pub max_data_shards: u16,
    /// Most parity shards in a first flight. Default 12.
    pub max_repair: u16,
    /// Most messages in a cross-message block. Default 16.
    pub max_batch: u16,
    /// Bytes every shard costs on the wire besides its payload and frame header: QUIC's short
    /// header, AEAD tag and DATAGRAM frame header, counted as if each shard had a packet of its
    /// own (they are spaced so they do). Default 30.
    pub packet_overhead: usize,
    /// Gap between the shards of one block (see `SenderConfig::repair_spacing`). Default 1 ms.
    /// A message is not split into more data shards than it needs to fit a datagram where
    /// the spacing of its data shards would exceed the round trip ([`Profile::rtt`]; not
    /// checked when that is zero).
    pub spacing: Duration,
    /// The hedge fires this share beyond the round trip. Default 0.1.
    pub hedge_slack: f64,
}

impl Default for TunerConfig {
    fn default() -> Self {
        TunerConfig {
            max_data_shards: 8,
            max_repair: 12,
            max_batch: 16,
            packet_overhead: 30,
            spacing: Duration::from_millis(1),
            hedge_slack: 0.1,
        }
    }
}

/// Code parameters chosen by [`plan`], with what they cost and achieve under the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    /// Messages per block (1: each message its own block).
    pub messages_per_block: u16,
    /// Data shards per block (`k`).
    pub data_shards: u16,
    /// Parity shards in the first flight (`m`); the block is coded for more, for hedges.
    pub repair_shards: u16,
    /// Bytes per shard.
    pub shard_size: usize,
    /// How long the first message of a block waits for the last.
    pub linger: Duration,
    /// Probability that the first flight does not rebuild the block.
    pub residual: f64,
    /// Probability that the first flight plus one hedge shard do not.
    pub residual_after_hedge: f64,
    /// Expected first-flight wire bytes per payload byte (frame headers and per-packet
    /// overhead included).
    pub wire_ratio: f64,
    /// `n / k` of the chosen code.
    pub code_overhead: f64,
    /// The least `n / k` any `(k, n)` code with `k ≤ 16` needs for the target under this
    /// model, headers ignored: how far the choice is from the code-theoretic bound. Infinite
    /// when no such code reaches the target.
    pub least_code_overhead: f64,
    /// When to hedge: the round trip with slack, plus the block's linger and shard spacing.
    pub hedge_delay: Duration,
    /// Whether `residual ≤ target.residual`. When no candidate reaches it, the plan is the
    /// one with the lowest residual.
    pub meets_target: bool,
}

/// Frame header bytes of a shard of a block with `messages` messages (type, block id, k, n,
/// index, shard size, first message id, lengths, checksum; typical varint widths).
pub fn frame_header_len(messages: u16) -> usize {
    16 + 2 * usize::from(messages)
}

/// Chooses the cheapest code (first-flight wire bytes per payload byte) whose residual loss
/// meets `target` under `model`: `k` data shards per block (a message split into `k`, or up to
/// `max_batch` messages sharing a block when `target.max_linger` allows) and `m` parity
/// shards, each shard in a packet of its own. Ties go to fewer shards.
pub fn plan(model: &LossModel, profile: &Profile, target: &Target, config: &TunerConfig) -> Plan {
    let max_k = usize::from(config.max_data_shards.max(1));
    let max_m = usize::from(config.max_repair);
    let table = model.loss_counts(max_k + max_m + 1);
    let mut best: Option<Plan> = None;
    let mut lowest: Option<Plan> = None;
    let size = profile.message_size.max(1);
    for b in 1..=config.max_batch.max(1) {
        let linger = if b == 1 {
            Duration::ZERO
        } else if profile.rate > 0.0 {
            Duration::from_secs_f64(f64::from(b - 1) / profile.rate)
        } else {
            break;
        };
        if linger > target.max_linger {
            break;
        }
        let total = size * usize::from(b);
        let header = frame_header_len(b);
        let s_max = profile.max_datagram_size.saturating_sub(header).max(1);
        let k_min = total.div_ceil(s_max);
        if k_min > max_k {
            continue;
        }
        for k in k_min..=max_k.min(total) {
            // The k-th data shard leaves (k - 1) spacings after the first: where that is
            // longer than the round trip itself (a LAN, a loopback), a split delays the
            // message more than the path does, so a message is split only as far as the
            // datagram size requires (its parity then whole copies). Measured on a clean
            // loopback at 5,000 messages a second: 6% of messages split into 3 shards when
            // the estimate spiked, and the p99 was 3.2-3.9 ms against a 0.2 ms round trip.
            let shard = total.div_ceil(k);
            // (Shards too large for two to share a datagram are sent together, unspaced.)
            let spaced = 2 * (shard + header) <= profile.max_datagram_size;
            if k > k_min
                && spaced
                && !profile.rtt.is_zero()
                && config.spacing * (k as u32 - 1) > profile.rtt
            {
                break;
            }
            let per_shard = (shard + header + config.packet_overhead) as f64;
            for m in 0..=max_m {
                let n = k + m;
                let residual = table.residual(k, n);
                let candidate = Plan {
                    messages_per_block: b,
                    data_shards: k as u16,
                    repair_shards: m as u16,
                    shard_size: shard,
                    linger,
                    residual,
                    residual_after_hedge: table.residual(k, n + 1),
                    wire_ratio: n as f64 * per_shard / total as f64,
                    code_overhead: n as f64 / k as f64,
                    least_code_overhead: f64::INFINITY,
                    hedge_delay: profile.rtt.mul_f64(1.0 + config.hedge_slack.max(0.0))
                        + linger
                        + config.spacing * (n as u32 - 1),
                    meets_target: residual <= target.residual,
                };
                if lowest.is_none_or(|l| residual < l.residual) {
                    lowest = Some(candidate);
                }
                if candidate.meets_target {
                    let better = best.is_none_or(|p| {
                        candidate.wire_ratio < p.wire_ratio - 1e-9
                            || (candidate.wire_ratio <= p.wire_ratio + 1e-9
                                && candidate.data_shards + candidate.repair_shards
                                    < p.data_shards + p.repair_shards)
                    });
                    if better {
                        best = Some(candidate);
                    }
                    // More parity only costs more.
                    break;
                }
            }
        }
    }
    let mut chosen = best
        .or(lowest)
        .expect("b = 1, k = 1 is always a candidate for a positive datagram size");
    chosen.least_code_overhead = least_code_overhead(model, target.residual, 16);
    chosen
}

/// The least `n / k` over codes with `k ≤ max_k` (and `n ≤ 4 max_k`) whose residual under
/// `model` is at most `residual`; infinite if none is.
pub fn least_code_overhead(model: &LossModel, residual: f64, max_k: usize) -> f64 {
    let max_n = 4 * max_k.max(1);
    let table: LossTable = model.loss_counts(max_n);
    let mut least = f64::INFINITY;
    for k in 1..=max_k.max(1) {
        if let Some(n) = (k..=max_n).find(|&n| table.residual(k, n) <= residual) {
            least = least.min(n as f64 / k as f64);
        }
    }
    least
}
