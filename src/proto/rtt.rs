//! The ack round-trip distribution: a bounded window of recent samples.

use std::collections::VecDeque;
use std::time::Duration;

/// Recent ack round-trip samples, for percentiles such as the hedge delay's p95.
///
/// Keeps the last `capacity` samples in arrival order and in sorted order, so a percentile is
/// an index (the sender asks on every block and every ack). Before any sample it answers with
/// the initial estimate.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    samples: VecDeque<Duration>,
    sorted: Vec<Duration>,
    capacity: usize,
    initial: Duration,
}

impl RttEstimator {
    /// An estimator keeping `capacity` samples, answering `initial` until the first one.
    pub fn new(initial: Duration, capacity: usize) -> Self {
        RttEstimator {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            sorted: Vec::with_capacity(capacity.min(4096)),
            capacity: capacity.max(1),
            initial,
        }
    }

    /// Adds a sample, forgetting the oldest beyond capacity.
    pub fn push(&mut self, rtt: Duration) {
        if self.samples.len() == self.capacity {
            if let Some(old) = self.samples.pop_front() {
                let at = self.sorted.partition_point(|&s| s < old);
                self.sorted.remove(at);
            }
        }
        self.samples.push_back(rtt);
        let at = self.sorted.partition_point(|&s| s <= rtt);
        self.sorted.insert(at, rtt);
    }

    /// Samples held.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether no sample has been taken yet.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The `q` quantile (nearest rank) of the samples held, or the initial estimate.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.sorted.is_empty() {
            return self.initial;
        }
        let len = self.sorted.len();
        let rank = ((q.clamp(0.0, 1.0) * len as f64).ceil() as usize).clamp(1, len);
        self.sorted[rank - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_window() {
        let ms = Duration::from_millis;
        let mut r = RttEstimator::new(ms(100), 100);
        assert_eq!(r.quantile(0.95), ms(100));
        for i in 1..=100 {
            r.push(ms(i));
        }
        assert_eq!(r.quantile(0.5), ms(50));
        assert_eq!(r.quantile(0.95), ms(95));
        assert_eq!(r.quantile(1.0), ms(100));
        // The window slides: 100 new samples of 7 ms replace the old ones.
        for _ in 0..100 {
            r.push(ms(7));
        }
        assert_eq!((r.len(), r.quantile(0.99)), (100, ms(7)));
    }
}
