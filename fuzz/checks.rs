//! Checks shared by the fuzz targets (`fuzz_targets/*.rs`) and by the crate's
//! `tests/fuzz_corpus.rs`, which replays the committed corpus under `cargo test` on stable.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use surelink::fec::{Block, CodecCache, Encoder, EncoderConfig, Reassembler, ReassemblerConfig};
use surelink::wire::{Frame, Limits};

fn tight_limits() -> Limits {
    Limits {
        max_shards: 8,
        max_shard_size: 64,
        max_message_len: 100,
        max_block_messages: 3,
        max_ack_ranges: 3,
        max_close_reason: 4,
    }
}

/// Arbitrary bytes: decoding never panics, and a frame that decodes re-encodes to bytes that
/// decode to the same frame, under default and under tight limits.
pub fn frame_decode(data: &[u8]) {
    for limits in [Limits::default(), tight_limits()] {
        if let Ok(frame) = Frame::decode(Bytes::copy_from_slice(data), &limits) {
            let again = Frame::decode(frame.to_bytes(), &limits);
            assert_eq!(again.as_ref(), Ok(&frame), "round trip of {data:02x?}");
            if let Frame::Shard(s) = &frame {
                assert_eq!(s.validate(&limits), Ok(()));
            }
        }
    }
}

/// One step of the reassembler target.
#[derive(Arbitrary, Debug)]
enum Op {
    /// Encode a block of messages `(length, fill seed)` at a datagram size.
    Encode {
        messages: Vec<(u16, u8)>,
        datagram: u16,
    },
    /// Insert one shard of an encoded block.
    Deliver { block: u8, index: u8 },
    /// Insert every shard of an encoded block, in index order.
    DeliverAll { block: u8 },
    /// Insert a shard with one payload bit flipped (QUIC would stop this on the wire; a buggy
    /// sender would not).
    Flip { block: u8, index: u8, bit: u16 },
    /// Insert a shard with one header field changed.
    Tamper {
        block: u8,
        index: u8,
        field: u8,
        value: u32,
    },
    /// Decode arbitrary bytes and insert them if they are a shard frame.
    Raw(Vec<u8>),
}

const MAX_OPS: usize = 256;
const MAX_BLOCKS: usize = 6;
const MAX_BYTES: usize = 48 * 1024;
const COMPLETED_MEMORY: usize = 4096;

/// Codecs shared across runs: building one inverts a k × k matrix, which would otherwise
/// dominate every run (a cache holds no state that changes results).
fn codecs() -> CodecCache {
    static CACHE: OnceLock<CodecCache> = OnceLock::new();
    CACHE.get_or_init(CodecCache::new).clone()
}

struct Sent {
    block: Block,
    first_message: u64,
    messages: Vec<Bytes>,
}

/// An arbitrary sequence of operations against one reassembler with small caps. Checks after
/// every step: no panic; the caps hold; no (block, message) is delivered twice; a message of
/// a block whose headers were never tampered with equals what was encoded whenever it came
/// from untouched shards or from a rebuild (the block checksum must catch flipped bits).
pub fn reassembler(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let config = ReassemblerConfig {
        max_blocks: MAX_BLOCKS,
        max_bytes: MAX_BYTES,
        completed_memory: COMPLETED_MEMORY,
        ..ReassemblerConfig::default()
    };
    let limits = config.limits.clone();
    let mut r = Reassembler::with_cache(config, codecs());
    let mut enc = Encoder::with_cache(EncoderConfig::default(), codecs());
    let mut sent: Vec<Sent> = Vec::new();
    let mut by_block: HashMap<u64, usize> = HashMap::new();
    let mut header_tampered: HashSet<u64> = HashSet::new();
    let mut payload_flipped: HashSet<u64> = HashSet::new();
    let mut delivered: HashSet<(u64, u64)> = HashSet::new();
    let mut next_message = 0u64;

    for _ in 0..MAX_OPS {
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        let mut frames = Vec::new();
        match op {
            Op::Encode { messages, datagram } => {
                let messages: Vec<Bytes> = messages
                    .iter()
                    .take(6)
                    .map(|&(len, seed)| {
                        // Blocks of up to ~40 data shards: large k is covered by unit tests
                        // and proptest; here it would only slow the search down.
                        let len = usize::from(len) % 1200;
                        (0..len)
                            .map(|i| (i as u8) ^ seed)
                            .collect::<Vec<u8>>()
                            .into()
                    })
                    .collect();
                enc.set_max_datagram_size(200 + usize::from(datagram) % 1300);
                if let Ok(block) = enc.encode_block(next_message, &messages) {
                    by_block.insert(block.id(), sent.len());
                    sent.push(Sent {
                        block,
                        first_message: next_message,
                        messages,
                    });
                    next_message += 100;
                }
            }
            Op::Deliver { block, index } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    frames.extend(s.block.frame(u16::from(index) % n));
                }
            }
            Op::DeliverAll { block } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    frames.extend((0..n).filter_map(|i| s.block.frame(i)));
                }
            }
            Op::Flip { block, index, bit } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    let id = s.block.id();
                    if let Some(f) = s.block.frame(u16::from(index) % n) {
                        let mut f = f.to_vec();
                        // Flip a bit in the payload (the last shard_wire_len bytes).
                        let payload = s.block.header().shard_wire_len(u16::from(index) % n);
                        if payload > 0 {
                            let at = f.len() - payload + usize::from(bit) / 8 % payload;
                            f[at] ^= 1 << (bit % 8);
                            payload_flipped.insert(id);
                        }
                        frames.push(Bytes::from(f));
                    }
                }
            }
            Op::Tamper {
                block,
                index,
                field,
                value,
            } => {
                if let Some(s) = pick(&mut sent, block) {
                    let n = s.block.header().total_shards;
                    if let Some(f) = s.block.frame(u16::from(index) % n) {
                        if let Ok(Frame::Shard(mut shard)) = Frame::decode(f, &limits) {
                            let h = &mut shard.header;
                            match field % 6 {
                                0 => h.checksum ^= value,
                                1 => h.first_message ^= u64::from(value),
                                2 => h.lengths[0] = h.lengths[0].wrapping_add(value),
                                3 => h.shard_size = h.shard_size.wrapping_add(value),
                                4 => h.total_shards = h.total_shards.wrapping_add(value as u16),
                                _ => shard.index = shard.index.wrapping_add(value as u16),
                            }
                            header_tampered.insert(shard.header.block);
                            r.insert(shard);
                        }
                    }
                }
            }
            Op::Raw(bytes) => frames.push(Bytes::from(bytes)),
        }
        for f in frames {
            if let Ok(Frame::Shard(shard)) = Frame::decode(f.clone(), &limits) {
                // A raw frame that names one of our blocks counts as tampering with it,
                // unless it is byte for byte a frame we encoded.
                let ours = by_block
                    .get(&shard.header.block)
                    .is_some_and(|&i| *sent[i].block.header() == shard.header);
                if !ours {
                    header_tampered.insert(shard.header.block);
                }
                r.insert(shard);
            }
        }

        while let Some(d) = r.poll_delivery() {
            assert!(
                delivered.insert((d.block, d.message_id)),
                "block {} message {} delivered twice",
                d.block,
                d.message_id
            );
            let Some(&i) = by_block.get(&d.block) else {
                continue;
            };
            if header_tampered.contains(&d.block) {
                continue;
            }
            if payload_flipped.contains(&d.block) && !d.recovered {
                continue;
            }
            let s = &sent[i];
            let j = (d.message_id - s.first_message) as usize;
            assert_eq!(
                d.payload, s.messages[j],
                "block {} message {} (recovered: {}) differs from what was encoded",
                d.block, d.message_id, d.recovered
            );
        }
        let st = r.stats();
        assert!(st.bytes_buffered <= MAX_BYTES, "{st:?}");
        assert!(st.blocks_buffered <= MAX_BLOCKS, "{st:?}");
        assert!(st.blocks_remembered <= COMPLETED_MEMORY, "{st:?}");
    }
}

fn pick(sent: &mut [Sent], i: u8) -> Option<&mut Sent> {
    let len = sent.len();
    (len > 0).then(|| &mut sent[usize::from(i) % len])
}
