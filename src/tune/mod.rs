//! The tuner: how much redundancy a link needs, from its loss model.
//!
//! **Outside the stable API**: public for the fuzz targets, benchmarks and tests, and may
//! change in any release. The sender uses it on its own (adaptive redundancy is the default).
//!
//! Reed-Solomon codes are MDS: a block of `k` data shards sent as `n` shards is rebuilt from
//! any `k`, so it fails exactly when more than `n - k` shards are lost. With each shard in a
//! packet of its own, the residual loss after the first flight is a tail of the distribution
//! of losses among `n` consecutive packets: a binomial tail under Bernoulli loss, and a
//! forward pass over the Markov chain under Gilbert-Elliott loss ([`LossModel::loss_counts`]).
//!
//! - [`plan`] chooses `k`, `m`, the messages per block (with their linger) and the hedge delay
//!   that meet a [`Target`] at the fewest wire bytes, and reports how far the chosen code is
//!   from the least overhead any `(k, n)` code needs ([`Plan::least_code_overhead`]).
//! - [`LossEstimator`] estimates the link's per-shard loss online from the sender's shard
//!   counts and the peer's acks; the sender re-plans from it (adaptive redundancy, see
//!   `proto::SenderConfig::adaptive`).
//!
//! Everything here is pure: numbers in, numbers out.
//!
//! ```
//! use surelink::tune::{plan, LossModel, Profile, Target, TunerConfig};
//!
//! let p = plan(&LossModel::Bernoulli(0.1), &Profile::default(), &Target::default(),
//!              &TunerConfig::default());
//! assert!(p.residual <= 0.005);
//! println!("k = {}, m = {}, {:.2}× the payload on the wire", p.data_shards, p.repair_shards,
//!          p.wire_ratio);
//! ```

mod estimate;
mod model;
mod plan;

pub use estimate::{wilson, EstimatorConfig, LossEstimator};
pub use model::{GilbertElliott, LossModel, LossTable};
pub use plan::{frame_header_len, least_code_overhead, plan, Plan, Profile, Target, TunerConfig};

#[cfg(all(test, feature = "sim"))]
mod tests;
