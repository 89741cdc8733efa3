//! Loss models and the distribution of losses among consecutive packets.

/// Gilbert-Elliott loss: a good and a bad state, each with its own loss probability; the state
/// changes before each packet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GilbertElliott {
    /// Probability of moving from good to bad before a packet.
    pub p_good_to_bad: f64,
    /// Probability of moving from bad to good before a packet.
    pub p_bad_to_good: f64,
    /// Loss probability in the good state.
    pub loss_good: f64,
    /// Loss probability in the bad state.
    pub loss_bad: f64,
}

impl GilbertElliott {
    /// The chain that loses every packet in the bad state and none in the good state (the
    /// Gilbert model), with mean loss `mean_loss` and mean burst length `mean_burst` packets:
    /// `p_bad_to_good = 1 / mean_burst`, and `p_good_to_bad` so that the stationary share of
    /// the bad state is `mean_loss`.
    pub fn from_mean(mean_loss: f64, mean_burst: f64) -> Self {
        let mean_loss = mean_loss.clamp(0.0, 0.999);
        let p_bad_to_good = 1.0 / mean_burst.max(1.0);
        GilbertElliott {
            p_good_to_bad: (mean_loss * p_bad_to_good / (1.0 - mean_loss)).min(1.0),
            p_bad_to_good,
            loss_good: 0.0,
            loss_bad: 1.0,
        }
    }

    /// Stationary probability of the bad state.
    pub fn bad_share(&self) -> f64 {
        let s = self.p_good_to_bad + self.p_bad_to_good;
        if s == 0.0 {
            0.0
        } else {
            self.p_good_to_bad / s
        }
    }

    /// Long-run share of packets lost.
    pub fn mean_loss(&self) -> f64 {
        let b = self.bad_share();
        (1.0 - b) * self.loss_good + b * self.loss_bad
    }
}

/// A packet loss model the tuner reasons about.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossModel {
    /// Each packet lost independently with this probability.
    Bernoulli(f64),
    /// Bursty loss from a two-state Markov chain, stepped once per packet.
    GilbertElliott(GilbertElliott),
}

impl LossModel {
    /// Long-run share of packets lost.
    pub fn mean_loss(&self) -> f64 {
        match self {
            LossModel::Bernoulli(p) => p.clamp(0.0, 1.0),
            LossModel::GilbertElliott(ge) => ge.mean_loss(),
        }
    }

    /// `table[n][j]` = probability that exactly `j` of `n` consecutive packets are lost, for
    /// `n` in `0 ..= max_n`, starting from the chain's stationary state. Exact (a forward pass
    /// over the chain; for Bernoulli it is the binomial distribution).
    pub fn loss_counts(&self, max_n: usize) -> LossTable {
        let (p_gb, p_bg, l_g, l_b) = match *self {
            LossModel::Bernoulli(p) => {
                let p = p.clamp(0.0, 1.0);
                (0.0, 1.0, p, p)
            }
            LossModel::GilbertElliott(ge) => (
                ge.p_good_to_bad.clamp(0.0, 1.0),
                ge.p_bad_to_good.clamp(0.0, 1.0),
                ge.loss_good.clamp(0.0, 1.0),
                ge.loss_bad.clamp(0.0, 1.0),
            ),
        };
        let bad = match *self {
            LossModel::Bernoulli(_) => 0.0,
            LossModel::GilbertElliott(ge) => ge.bad_share(),
        };
        // good[j], bad[j]: probability of being in that state after the packets so far with
        // `j` of them lost.
        let mut good = vec![0.0; max_n + 1];
        let mut badv = vec![0.0; max_n + 1];
        good[0] = 1.0 - bad;
        badv[0] = bad;
        let mut rows = Vec::with_capacity(max_n + 1);
        rows.push(vec![1.0]);
        for n in 1..=max_n {
            let mut ng = vec![0.0; max_n + 1];
            let mut nb = vec![0.0; max_n + 1];
            for j in 0..n {
                // The state changes before the packet, then the packet is lost or not.
                let to_g = good[j] * (1.0 - p_gb) + badv[j] * p_bg;
                let to_b = good[j] * p_gb + badv[j] * (1.0 - p_bg);
                ng[j] += to_g * (1.0 - l_g);
                ng[j + 1] += to_g * l_g;
                nb[j] += to_b * (1.0 - l_b);
                nb[j + 1] += to_b * l_b;
            }
            good = ng;
            badv = nb;
            rows.push((0..=n).map(|j| good[j] + badv[j]).collect());
        }
        LossTable { rows }
    }

    /// Probability that a block of `k` data shards sent as `n` shards in `n` consecutive
    /// packets is not rebuilt: more than `n - k` of them lost (Reed-Solomon is MDS, so any
    /// `k` rebuild it).
    pub fn residual(&self, k: usize, n: usize) -> f64 {
        self.loss_counts(n).residual(k, n)
    }
}

impl From<GilbertElliott> for LossModel {
    fn from(ge: GilbertElliott) -> Self {
        LossModel::GilbertElliott(ge)
    }
}

/// Loss-count distributions for runs of 0 ..= `max_n` packets; see [`LossModel::loss_counts`].
#[derive(Clone, Debug)]
pub struct LossTable {
    rows: Vec<Vec<f64>>,
}

impl LossTable {
    /// Longest run covered.
    pub fn max_n(&self) -> usize {
        self.rows.len() - 1
    }

    /// Probability that exactly `j` of `n` packets are lost (0 outside the table).
    pub fn exactly(&self, n: usize, j: usize) -> f64 {
        self.rows
            .get(n)
            .and_then(|r| r.get(j))
            .copied()
            .unwrap_or(0.0)
    }

    /// Probability that more than `n - k` of `n` packets are lost: a `(k, n)` block fails.
    /// `n` past the table counts as a failure (1.0).
    pub fn residual(&self, k: usize, n: usize) -> f64 {
        let Some(row) = self.rows.get(n) else {
            return 1.0;
        };
        if k == 0 {
            return 0.0;
        }
        if k > n {
            return 1.0;
        }
        // Summed from the tail up: the small terms first, so a tiny residual keeps its digits.
        let tail: f64 = row[n - k + 1..].iter().rev().sum();
        tail.clamp(0.0, 1.0)
    }
}
