//! The packet-loss simulator: lossy, delaying, reordering sockets under a real quinn endpoint.
//!
//! For tests, benchmarks and demos (feature `sim`); outside the stable API, so it may change in
//! any release.
//!
//! Everything above the socket (QUIC's TLS, loss recovery, congestion control, and surelink)
//! runs unchanged; only the packets' fate is simulated, by a seeded [`Link`] model per
//! direction.
//!
//! - [`Link`]: the pure link model (loss, delay, jitter, reordering, duplication, corruption,
//!   rate limit and its change mid-run, blackouts, time-based [`Fades`]) with its counters.
//! - [`SimNetwork`]: an in-memory network whose [`SimSocket`]s implement quinn's
//!   `AsyncUdpSocket`. It runs on tokio's clock, so under a paused clock a run takes virtual
//!   time, not wall time.
//! - [`LossyUdpSocket`]: the same link model on the outgoing side of a real UDP socket, for
//!   real-time runs on loopback.
//! - [`Pair`]: a client and a server endpoint with test certificates, over a [`SimNetwork`]
//!   or over loopback.
//!
//! ```no_run
//! # async fn demo() -> Result<(), surelink::sim::HarnessError> {
//! use std::time::Duration;
//! use surelink::sim::{LinkConfig, Pair, PairConfig};
//!
//! let pair = Pair::new(PairConfig::symmetric(LinkConfig::lossy(Duration::from_millis(20), 0.1)))?;
//! let (client, server) = pair.connect().await?;
//! # Ok(()) }
//! ```

mod harness;
mod link;
mod memory;
mod udp;

pub use harness::{
    test_identity, transport_config, Congestion, HarnessError, Pair, PairConfig, TestCa, TestCert,
    SERVER_NAME,
};
pub use link::{
    DropCause, Fades, GilbertElliott, Link, LinkConfig, LinkCounters, LinkStats, Loss, RateChange,
    RateLimit, Verdict,
};
pub use memory::{SimNetwork, SimSocket};
pub use udp::LossyUdpSocket;
