//! Forward error correction: messages ⇄ Reed-Solomon shards.
//!
//! **Outside the stable API**: public for the fuzz targets, benchmarks and tests, and may
//! change in any release. Applications use [`crate::channel`].
//!
//! A *block* is one or more messages with consecutive ids, concatenated and cut into `k`
//! equal data shards of `S` bytes, plus parity shards computed by `reed-solomon-erasure` over
//! GF(2^8). Any `k` distinct shards of a block rebuild it (the code is MDS). The byte layout of
//! a shard frame is in [`crate::wire`]; this module decides what goes into blocks and rebuilds
//! them.
//!
//! - [`Encoder`] builds blocks two ways: one block per message ([`Encoder::encode`]), or one
//!   block across several small messages sent close together ([`Encoder::push`], bounded by a
//!   linger time, a message count and a data-shard count). Shards are sized so a shard frame
//!   fits one QUIC datagram, and balanced so the padding is under `k` bytes.
//! - [`Block`] is the sender's copy of a block. Its repair can be extended later:
//!   [`Block::next_repair`] hands out parity shards never sent before, so a hedge carries new
//!   information rather than copies. Every block is coded for `n = k + m_max` shards; parity is
//!   computed lazily, first only what the first flight needs.
//! - [`Reassembler`] takes shard frames in any order, with duplicates and garbage, and yields
//!   each message once, when its whole block is known and matches the block's CRC: all its
//!   data shards are in, or any `k` distinct shards of it rebuild the rest. Its memory is
//!   capped in blocks and in bytes.
//!
//! # Send order and packet coalescing
//!
//! quinn packs several small DATAGRAM frames into one UDP packet (measured here: 2000
//! datagrams of 200 B left in about 400 packets), so one lost packet can take several shards
//! of one block. Two things keep shards of a block in different packets:
//!
//! 1. Shards are sized near the datagram size: a block's shard size is
//!    `ceil(total / ceil(total / S_max))`, where `S_max` is what fits in one datagram, so a
//!    block of several small messages becomes one or more near-full shards instead of many
//!    small ones, and two such frames never fit one packet.
//! 2. When several blocks have shards waiting, [`interleave`] orders them round robin, so a
//!    packet that still carries several small frames carries shards of different blocks (see
//!    the test `interleaving_spreads_blocks_over_packets`).
//!
//! Pacing (spacing a lone small block's parity shards in time) belongs to the protocol core,
//! which owns time.

mod encoder;
mod reassembler;
pub mod window;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use encoder::{interleave, BatchConfig, Block, EncodeError, Encoder, EncoderConfig};
pub use reassembler::{
    Delivery, InsertOutcome, Reassembler, ReassemblerConfig, ReassemblerStats, RejectReason,
};

/// The Reed-Solomon codec over GF(2^8) that surelink uses.
pub type Codec = reed_solomon_erasure::galois_8::ReedSolomon;

/// Most codecs a [`CodecCache`] holds before it evicts one.
const CODEC_CACHE_CAPACITY: usize = 128;

/// Codecs cached per `(k, n)`.
///
/// Building a codec inverts a `k × k` matrix; a channel uses a handful of `(k, n)` pairs over
/// and over, so they are built once. Cloning the cache shares it. Bounded to
/// 128 entries (an arbitrary one is evicted when full).
#[derive(Clone, Default)]
pub struct CodecCache {
    inner: Arc<Mutex<CodecMap>>,
}

type CodecMap = HashMap<(u16, u16), Arc<Codec>>;

impl std::fmt::Debug for CodecCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodecCache")
            .field("len", &self.len())
            .finish()
    }
}

impl CodecCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// The codec for `k` data shards of `n` total, or `None` when no codec exists for them
    /// (`k = 0`, `n ≤ k`: no parity, or `n > 256`).
    pub fn get(&self, k: u16, n: u16) -> Option<Arc<Codec>> {
        if k == 0 || n <= k || n > crate::wire::MAX_SHARDS {
            return None;
        }
        let mut map = self.lock();
        if let Some(codec) = map.get(&(k, n)) {
            return Some(codec.clone());
        }
        let codec = Arc::new(Codec::new(usize::from(k), usize::from(n - k)).ok()?);
        if map.len() >= CODEC_CACHE_CAPACITY {
            if let Some(key) = map.keys().next().copied() {
                map.remove(&key);
            }
        }
        map.insert((k, n), codec.clone());
        Some(codec)
    }

    /// Codecs currently cached.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds no codec.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CodecMap> {
        // A panic while holding this lock cannot leave the map inconsistent (inserts and
        // removes are single calls), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests;
