//! The packet-loss simulator: lossy, delaying, reordering sockets under a real quinn endpoint.
//!
//! Everything above the socket (QUIC's TLS, loss recovery, congestion control, and surelink)
//! runs unchanged; only the packets' fate is simulated, by a seeded [`Link`] model per
//! direction.

mod link;

pub use link::{
    DropCause, GilbertElliott, Link, LinkConfig, LinkCounters, LinkStats, Loss, RateLimit, Verdict,
};
