use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use super::*;
use crate::wire::{BlockHeader, Frame, Limits, ShardFrame};

fn msg(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect::<Vec<u8>>()
        .into()
}

fn decode_shard(datagram: Bytes) -> ShardFrame {
    match Frame::decode(datagram, &Limits::default()) {
        Ok(Frame::Shard(s)) => s,
        other => panic!("not a shard frame: {other:?}"),
    }
}

/// Every frame of a block: data, then all parity.
fn all_frames(block: &mut Block) -> Vec<Bytes> {
    (0..block.header().total_shards)
        .map(|i| block.frame(i).unwrap())
        .collect()
}

fn drain(r: &mut Reassembler) -> Vec<Delivery> {
    std::iter::from_fn(|| r.poll_delivery()).collect()
}

fn small_encoder(datagram: usize) -> Encoder {
    Encoder::new(EncoderConfig {
        max_datagram_size: datagram,
        ..EncoderConfig::default()
    })
}

#[test]
fn parity_rows_do_not_depend_on_n() {
    // The lazy repair in Block::ensure_parity relies on this property of
    // reed-solomon-erasure's systematic Vandermonde construction.
    let cache = CodecCache::new();
    for k in [1u16, 2, 4, 7, 16] {
        let data: Vec<Vec<u8>> = (0..k).map(|i| msg(64, i as u8).to_vec()).collect();
        let parity = |m: u16| {
            let mut p = vec![vec![0u8; 64]; usize::from(m)];
            cache
                .get(k, k + m)
                .unwrap()
                .encode_sep(&data, &mut p)
                .unwrap();
            p
        };
        let wide = parity(12);
        for m in 1..12 {
            assert_eq!(parity(m)[..], wide[..usize::from(m)], "k={k} m={m}");
        }
    }
}

#[test]
fn frames_fit_the_datagram_and_padding_is_small() {
    for datagram in [200, 1162, 1452] {
        let mut enc = small_encoder(datagram);
        for len in [0, 1, 100, 511, 512, 1000, 1150, 1200, 3000, 20_000, 65_536] {
            if datagram == 200 && len >= 20_000 {
                // 112 data shards or more: more than a receiver accepts
                // (`Limits::max_data_shards`, 64).
                assert!(matches!(
                    enc.encode(7, msg(len, 1)),
                    Err(EncodeError::TooManyShards { .. })
                ));
                continue;
            }
            let mut block = enc.encode(7, msg(len, 1)).unwrap();
            let h = block.header().clone();
            let k = u64::from(h.data_shards);
            assert_eq!(k, BlockHeader::data_shards_for(len as u64, h.shard_size));
            // Balanced shards: padding is under one byte per data shard.
            assert!(
                k * u64::from(h.shard_size) - len as u64 <= k.max(1),
                "len {len}"
            );
            for frame in all_frames(&mut block) {
                assert!(
                    frame.len() <= datagram,
                    "len {len}: frame {} > {datagram}",
                    frame.len()
                );
            }
            assert!(
                h.total_shards > h.data_shards,
                "at least one parity shard possible"
            );
        }
    }
}

#[test]
fn encode_errors() {
    let mut enc = Encoder::new(EncoderConfig::default());
    assert_eq!(
        enc.encode(0, msg(65_537, 0)).unwrap_err(),
        EncodeError::MessageTooLong {
            len: 65_537,
            max: 65_536
        }
    );
    let mut tiny = small_encoder(12);
    assert!(matches!(
        tiny.encode(0, msg(10, 0)),
        Err(EncodeError::DatagramTooSmall {
            max_datagram_size: 12,
            ..
        })
    ));
    // 64 KiB in 100-byte datagrams would need far more than 255 data shards.
    assert!(matches!(
        small_encoder(100).encode(0, msg(65_536, 0)),
        Err(EncodeError::TooManyShards { .. })
    ));
    assert_eq!(
        enc.encode_block(0, &[]).unwrap_err(),
        EncodeError::EmptyBlock
    );
    let many = vec![msg(1, 0); 65];
    assert_eq!(
        enc.encode_block(0, &many).unwrap_err(),
        EncodeError::TooManyMessages { count: 65, max: 64 }
    );
    // A failed push changes nothing.
    assert!(enc.push(Instant::now(), 0, msg(70_000, 0)).is_err());
    assert_eq!(enc.poll_timeout(), None);
}

#[test]
fn message_size_limit_is_configurable() {
    let mut enc = Encoder::new(EncoderConfig {
        limits: Limits {
            max_message_len: 4096,
            ..Limits::default()
        },
        ..EncoderConfig::default()
    });
    assert!(enc.encode(0, msg(4096, 0)).is_ok());
    assert_eq!(
        enc.encode(1, msg(4097, 0)).unwrap_err(),
        EncodeError::MessageTooLong {
            len: 4097,
            max: 4096
        }
    );
}

/// Feeds `indices` of `frames` to a fresh reassembler; returns deliveries.
fn reassemble(frames: &[Bytes], indices: &[usize]) -> (Vec<Delivery>, Reassembler) {
    let mut r = Reassembler::new(ReassemblerConfig::default());
    let mut out = Vec::new();
    for &i in indices {
        r.insert(decode_shard(frames[i].clone()));
        out.extend(drain(&mut r));
    }
    (out, r)
}

fn assert_delivered_once(out: &[Delivery], messages: &[Bytes], first_id: u64) {
    let mut seen = HashSet::new();
    for d in out {
        assert!(
            seen.insert(d.message_id),
            "message {} delivered twice",
            d.message_id
        );
        let j = (d.message_id - first_id) as usize;
        assert_eq!(d.payload, messages[j], "message {} content", d.message_id);
    }
    assert_eq!(seen.len(), messages.len(), "every message delivered");
}

/// All `size`-subsets of `0..n`.
fn subsets(n: usize, size: usize) -> Vec<Vec<usize>> {
    if size == 0 {
        return vec![vec![]];
    }
    if n < size {
        return vec![];
    }
    let mut with_last: Vec<Vec<usize>> = subsets(n - 1, size - 1);
    for s in &mut with_last {
        s.push(n - 1);
    }
    with_last.extend(subsets(n - 1, size));
    with_last
}

#[test]
fn every_k_subset_rebuilds_small_blocks() {
    // Cross-message blocks whose messages straddle shard boundaries, k from 1 to 5.
    let cases: Vec<Vec<usize>> = vec![
        vec![70],
        vec![100, 0, 60],
        vec![300, 5, 120],
        vec![10, 400, 77, 33],
        vec![200, 180],
    ];
    let mut checked = 0;
    for lengths in cases {
        let messages: Vec<Bytes> = lengths
            .iter()
            .enumerate()
            .map(|(i, &l)| msg(l, i as u8))
            .collect();
        let mut enc = Encoder::new(EncoderConfig {
            max_datagram_size: 140,
            min_repair: 3,
            repair_ratio: 0.0,
            ..EncoderConfig::default()
        });
        let mut block = enc.encode_block(40, &messages).unwrap();
        let frames = all_frames(&mut block);
        let (k, n) = (
            usize::from(block.header().data_shards),
            usize::from(block.header().total_shards),
        );
        assert!(k <= 5 && n == k + 3);
        for subset in subsets(n, k) {
            // Forward and reversed order.
            for order in [subset.clone(), subset.iter().rev().copied().collect()] {
                let (out, r) = reassemble(&frames, &order);
                assert_delivered_once(&out, &messages, 40);
                assert_eq!(r.stats().blocks_buffered, 0, "block finished");
                let lost_data = (0..k).any(|i| !subset.contains(&i));
                assert_eq!(r.stats().blocks_rebuilt, u64::from(lost_data));
                checked += 1;
            }
        }
        // Fewer than k shards: nothing comes out (the block checksum cannot be checked).
        for subset in subsets(n, k - 1) {
            let (out, r) = reassemble(&frames, &subset);
            assert_eq!(r.stats().blocks_rebuilt, 0);
            assert!(out.is_empty());
        }
    }
    assert!(checked > 100);
}

#[test]
fn delivery_waits_for_the_checked_block_and_is_zero_copy() {
    let messages = vec![msg(100, 1), msg(100, 2), msg(100, 3)];
    let mut enc = Encoder::new(EncoderConfig {
        max_datagram_size: 130,
        ..EncoderConfig::default()
    });
    let mut block = enc.encode_block(0, &messages).unwrap();
    assert_eq!(block.header().data_shards, 3);
    let frames = all_frames(&mut block);
    let mut r = Reassembler::new(ReassemblerConfig::default());
    // Shard 1 alone holds message 1 exactly, but the block checksum cannot be checked yet.
    let frame = decode_shard(frames[1].clone());
    let held_ptr = frame.payload.as_ptr();
    assert_eq!(r.insert(frame), InsertOutcome::Accepted { delivered: 0 });
    assert!(r.poll_delivery().is_none());
    // Shards 0 and 2: every data shard is in, the checksum matches, all three come out.
    // Message 2 is a zero-copy slice of the datagram that completed the block; message 1's
    // shard was held, so it was copied out of its datagram (which may be a slice of a
    // large receive buffer that a held slice would keep alive).
    r.insert(decode_shard(frames[0].clone()));
    let last = decode_shard(frames[2].clone());
    let last_ptr = last.payload.as_ptr();
    assert_eq!(r.insert(last), InsertOutcome::Accepted { delivered: 3 });
    let out = drain(&mut r);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|d| !d.recovered));
    assert_eq!(out[2].payload.as_ptr(), last_ptr);
    assert_ne!(out[1].payload.as_ptr(), held_ptr);
    for (d, m) in out.iter().zip(&messages) {
        assert_eq!(&d.payload, m);
    }
    // Late shards of the finished block are stale and deliver nothing.
    assert_eq!(
        r.insert(decode_shard(frames[3].clone())),
        InsertOutcome::Stale { messages: 0..=2 }
    );
    assert!(r.poll_delivery().is_none());
    let st = r.stats();
    assert_eq!((st.messages_delivered, st.messages_recovered), (3, 0));
    assert_eq!(
        (st.blocks_completed, st.blocks_rebuilt, st.shards_stale),
        (1, 0, 1)
    );
}

#[test]
fn rebuilt_messages_are_marked_recovered() {
    let messages = vec![msg(100, 1), msg(100, 2), msg(100, 3)];
    let mut enc = Encoder::new(EncoderConfig {
        max_datagram_size: 130,
        ..EncoderConfig::default()
    });
    let mut block = enc.encode_block(0, &messages).unwrap();
    let frames = all_frames(&mut block);
    let mut r = Reassembler::new(ReassemblerConfig::default());
    r.insert(decode_shard(frames[1].clone()));
    r.insert(decode_shard(frames[3].clone()));
    assert_eq!(
        r.insert(decode_shard(frames[4].clone())),
        InsertOutcome::Accepted { delivered: 3 }
    );
    let out = drain(&mut r);
    assert!(out.iter().all(|d| d.recovered));
    for (d, m) in out.iter().zip(&messages) {
        assert_eq!(&d.payload, m);
    }
}

/// Issue case 11: a data shard with flipped bits, on a block that needs no rebuild (k = 1,
/// and every data shard of a wider block), is never delivered; counted.
#[test]
fn a_tampered_data_shard_is_never_delivered() {
    for len in [300, 3000] {
        let mut enc = Encoder::new(EncoderConfig::default());
        let mut b = enc.encode(3, msg(len, 1)).unwrap();
        let k = b.header().data_shards;
        assert_eq!(k > 1, len > 1000);
        let mut r = Reassembler::new(ReassemblerConfig::default());
        for i in 0..k {
            let mut f = decode_shard(b.frame(i).unwrap());
            if i == k - 1 {
                let mut bytes = f.payload.to_vec();
                bytes[5] ^= 0x01;
                f.payload = bytes.into();
                assert_eq!(
                    r.insert(f),
                    InsertOutcome::Rejected(RejectReason::ChecksumMismatch)
                );
            } else {
                r.insert(f);
            }
        }
        assert!(r.poll_delivery().is_none(), "len {len}");
        assert_eq!(r.stats().checksum_failures, 1);
        assert_eq!(r.stats().bytes_buffered, 0);
        // The block was dropped, not remembered: an intact retransmission delivers it.
        for i in 0..k {
            r.insert(decode_shard(b.frame(i).unwrap()));
        }
        let out = drain(&mut r);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload, msg(len, 1));
    }
}

#[test]
fn repair_can_be_extended_with_fresh_shards() {
    let mut enc = Encoder::new(EncoderConfig::default());
    let payment = msg(3000, 9);
    let mut block = enc.encode(5, payment.clone()).unwrap();
    let k = usize::from(block.header().data_shards);
    let m_max = usize::from(block.header().parity_shards());
    assert_eq!((k, m_max), (3, 4));

    let data = block.data_frames();
    let first = block.next_repair(1);
    let hedge = block.next_repair(2);
    let last = block.next_repair(10);
    assert_eq!((first.len(), hedge.len(), last.len()), (1, 2, 1));
    assert!(block.next_repair(1).is_empty());
    assert_eq!(block.repair_remaining(), 0);
    let indices: Vec<u16> = first
        .iter()
        .chain(&hedge)
        .chain(&last)
        .map(|f| decode_shard(f.clone()).index)
        .collect();
    assert_eq!(indices, vec![3, 4, 5, 6], "each repair shard is new");

    // First flight: data shards 0 and 2 lost, the one parity shard arrives. The hedge's
    // parity shards complete the block.
    let mut r = Reassembler::new(ReassemblerConfig::default());
    r.insert(decode_shard(data[1].clone()));
    r.insert(decode_shard(first[0].clone()));
    assert!(r.poll_delivery().is_none());
    r.insert(decode_shard(hedge[1].clone()));
    let d = drain(&mut r);
    assert_eq!(d.len(), 1);
    assert_eq!(
        (d[0].message_id, &d[0].payload, d[0].recovered),
        (5, &payment, true)
    );
}

#[test]
fn hedge_parity_matches_parity_computed_all_at_once() {
    // Repair computed lazily in two steps equals repair computed in one step.
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut lazy = enc.encode_block(0, &[msg(2000, 3), msg(900, 4)]).unwrap();
    let mut eager = enc.encode_block(0, &[msg(2000, 3), msg(900, 4)]).unwrap();
    let n = eager.header().total_shards;
    let eager_all: Vec<Bytes> = (0..n).map(|i| eager.shard(i).unwrap()).collect();
    let k = lazy.header().data_shards;
    lazy.next_repair(1);
    let lazy_all: Vec<Bytes> = (0..n).map(|i| lazy.shard(i).unwrap()).collect();
    assert_eq!(lazy_all, eager_all);
    assert!(lazy.shard(n).is_none());
    assert_eq!(usize::from(n - k), 4);
}

#[test]
fn duplicates_contradictions_and_garbage() {
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut a = enc.encode(0, msg(2000, 1)).unwrap();
    let mut r = Reassembler::new(ReassemblerConfig::default());
    let f0 = a.frame(0).unwrap();
    assert_eq!(
        r.insert(decode_shard(f0.clone())),
        InsertOutcome::Accepted { delivered: 0 }
    );
    assert_eq!(r.insert(decode_shard(f0)), InsertOutcome::Duplicate);
    // Same block id, different layout: refused, and the block is undisturbed.
    let mut liar = decode_shard(a.frame(2).unwrap());
    liar.header.checksum ^= 1;
    assert_eq!(
        r.insert(liar),
        InsertOutcome::Rejected(RejectReason::Contradicts)
    );
    r.insert(decode_shard(a.frame(1).unwrap()));
    let d = drain(&mut r);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].payload, msg(2000, 1));
    // Hand-built frames that break the format are refused, not trusted.
    let mut bad = decode_shard(a.frame(0).unwrap());
    bad.index = 200;
    assert_eq!(
        r.insert(bad),
        InsertOutcome::Rejected(RejectReason::Malformed)
    );
    let mut short = decode_shard(a.frame(3).unwrap());
    short.payload.truncate(3);
    assert_eq!(
        r.insert(short),
        InsertOutcome::Rejected(RejectReason::Malformed)
    );
    let st = r.stats();
    assert_eq!(
        (
            st.shards_duplicate,
            st.shards_contradicting,
            st.shards_malformed
        ),
        (1, 1, 2)
    );
}

#[test]
fn corrupt_parity_fails_the_checksum_and_delivers_nothing_wrong() {
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut b = enc.encode(3, msg(2000, 1)).unwrap();
    let mut bad = decode_shard(b.frame(2).unwrap());
    let mut bytes = bad.payload.to_vec();
    bytes[17] ^= 0x40;
    bad.payload = bytes.into();
    let mut r = Reassembler::new(ReassemblerConfig::default());
    r.insert(decode_shard(b.frame(0).unwrap()));
    assert_eq!(
        r.insert(bad),
        InsertOutcome::Rejected(RejectReason::ChecksumMismatch)
    );
    assert!(r.poll_delivery().is_none());
    assert_eq!(r.stats().checksum_failures, 1);
    assert_eq!(r.stats().bytes_buffered, 0);
}

#[test]
fn memory_cap_holds_under_a_flood_of_block_ids() {
    let config = ReassemblerConfig {
        max_blocks: 64,
        max_bytes: 256 * 1024,
        completed_memory: 100,
        ..ReassemblerConfig::default()
    };
    let mut r = Reassembler::new(config.clone());
    let mut enc = Encoder::new(EncoderConfig::default());
    // 10,000 distinct blocks, each missing a shard, so none ever completes.
    for i in 0..10_000u64 {
        let mut b = enc.encode(i, msg(2000, i as u8)).unwrap();
        let out = r.insert(decode_shard(b.frame(0).unwrap()));
        assert_eq!(out, InsertOutcome::Accepted { delivered: 0 });
        let st = r.stats();
        assert!(st.blocks_buffered <= config.max_blocks);
        assert!(st.bytes_buffered <= config.max_bytes);
    }
    let st = r.stats();
    assert_eq!(st.blocks_evicted, 10_000 - st.blocks_buffered as u64);
    assert_eq!(st.messages_delivered, 0);

    // Byte cap binding before the block cap.
    let mut r = Reassembler::new(ReassemblerConfig {
        max_blocks: 1000,
        max_bytes: 20_000,
        ..ReassemblerConfig::default()
    });
    for i in 0..200u64 {
        let mut b = enc.encode(i, msg(2000, 0)).unwrap();
        r.insert(decode_shard(b.frame(0).unwrap()));
        assert!(r.stats().bytes_buffered <= 20_000);
    }
    assert!(r.stats().blocks_buffered < 30);
    // A shard bigger than the whole budget is refused.
    let mut r = Reassembler::new(ReassemblerConfig {
        max_bytes: 500,
        ..ReassemblerConfig::default()
    });
    let mut b = enc.encode(0, msg(1000, 0)).unwrap();
    assert_eq!(
        r.insert(decode_shard(b.frame(0).unwrap())),
        InsertOutcome::Rejected(RejectReason::OverBudget)
    );
}

#[test]
fn completed_memory_is_bounded() {
    let mut r = Reassembler::new(ReassemblerConfig {
        completed_memory: 10,
        ..ReassemblerConfig::default()
    });
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut first = enc.encode(0, msg(10, 0)).unwrap();
    let f = first.frame(0).unwrap();
    r.insert(decode_shard(f.clone()));
    assert!(matches!(
        r.insert(decode_shard(f.clone())),
        InsertOutcome::Stale { .. }
    ));
    for i in 1..=1000u64 {
        let mut b = enc.encode(i, msg(10, 0)).unwrap();
        r.insert(decode_shard(b.frame(0).unwrap()));
    }
    assert_eq!(r.stats().blocks_remembered, 10);
    assert!(r.remembered_queue_len() <= 20);
    // Forgotten: the protocol layer's dedupe window must catch this one.
    assert_eq!(
        r.insert(decode_shard(f)),
        InsertOutcome::Accepted { delivered: 1 }
    );
}

#[test]
fn an_evicted_block_delivers_once_when_it_comes_back() {
    let mut r = Reassembler::new(ReassemblerConfig {
        max_blocks: 1,
        ..ReassemblerConfig::default()
    });
    let mut enc = Encoder::new(EncoderConfig {
        max_datagram_size: 130,
        ..EncoderConfig::default()
    });
    let messages = vec![msg(100, 1), msg(100, 2)];
    let mut a = enc.encode_block(0, &messages).unwrap();
    r.insert(decode_shard(a.frame(0).unwrap()));
    assert!(drain(&mut r).is_empty());
    // Another block evicts `a`.
    let mut b = enc.encode(10, msg(500, 0)).unwrap();
    r.insert(decode_shard(b.frame(0).unwrap()));
    assert_eq!(r.stats().blocks_evicted, 1);
    // `a` comes back through parity: both messages, once.
    r.insert(decode_shard(a.frame(2).unwrap()));
    r.insert(decode_shard(a.frame(3).unwrap()));
    let d = drain(&mut r);
    assert_eq!(d.len(), 2);
    assert_eq!((d[1].message_id, &d[1].payload), (1, &messages[1]));
    r.insert(decode_shard(a.frame(1).unwrap()));
    assert!(drain(&mut r).is_empty());
}

#[test]
fn batching_by_linger_count_shards_and_gaps() {
    let t0 = Instant::now();
    let cfg = EncoderConfig {
        batch: BatchConfig {
            linger: Duration::from_millis(5),
            max_messages: 4,
            max_data_shards: 3,
        },
        ..EncoderConfig::default()
    };
    let mut enc = Encoder::new(cfg);
    enc.push(t0, 0, msg(300, 0)).unwrap();
    enc.push(t0 + Duration::from_millis(1), 1, msg(300, 1))
        .unwrap();
    assert!(enc.poll_block().is_none());
    assert_eq!(enc.poll_timeout(), Some(t0 + Duration::from_millis(5)));
    enc.handle_timeout(t0 + Duration::from_millis(4));
    assert!(enc.poll_block().is_none());
    enc.handle_timeout(t0 + Duration::from_millis(5));
    let b = enc.poll_block().unwrap();
    assert_eq!(b.messages(), 0..=1);
    // Two 300-byte messages share one 600-byte shard: one datagram, not two.
    assert_eq!((b.header().data_shards, b.header().shard_size), (1, 600));
    assert_eq!(enc.poll_timeout(), None);

    // Count: the fourth message closes the block.
    for i in 10..14 {
        enc.push(t0, i, msg(10, 0)).unwrap();
    }
    assert_eq!(enc.poll_block().unwrap().messages(), 10..=13);
    // A gap in ids closes the batch first.
    enc.push(t0, 20, msg(10, 0)).unwrap();
    enc.push(t0, 22, msg(10, 0)).unwrap();
    assert_eq!(enc.poll_block().unwrap().messages(), 20..=20);
    enc.flush();
    assert_eq!(enc.poll_block().unwrap().messages(), 22..=22);
    // Data shards: three messages of 1000 B need 3 shards; a fourth would need 4.
    for i in 30..34 {
        enc.push(t0, i, msg(1000, 0)).unwrap();
    }
    let b = enc.poll_block().unwrap();
    assert_eq!((b.messages(), b.header().data_shards), (30..=32, 3));
    enc.flush();
    assert_eq!(enc.poll_block().unwrap().messages(), 33..=33);
    // A message bigger than a batch goes alone.
    enc.push(t0, 40, msg(5000, 0)).unwrap();
    assert_eq!(enc.poll_block().unwrap().messages(), 40..=40);
    // Zero linger: every message in its own block at once.
    let mut enc = Encoder::new(EncoderConfig {
        batch: BatchConfig {
            linger: Duration::ZERO,
            ..BatchConfig::default()
        },
        ..EncoderConfig::default()
    });
    enc.push(t0, 0, msg(10, 0)).unwrap();
    assert_eq!(enc.poll_block().unwrap().messages(), 0..=0);
    // Block ids are unique across modes.
    let mut enc = Encoder::new(EncoderConfig::default());
    enc.push(t0, 0, msg(10, 0)).unwrap();
    let lone = enc.encode(5, msg(10, 0)).unwrap();
    enc.flush();
    assert_ne!(enc.poll_block().unwrap().id(), lone.id());
}

/// quinn's coalescing, modelled: datagrams go into a packet in order while they fit.
fn pack(sizes: &[(u64, usize)], mtu: usize) -> Vec<Vec<u64>> {
    // Per datagram: 1 type byte + 2 length bytes inside a QUIC short-header packet of
    // about 30 bytes plus a 16-byte AEAD tag.
    let (packet_overhead, frame_overhead) = (46, 3);
    let mut packets: Vec<Vec<u64>> = vec![];
    let mut room = 0;
    for &(block, len) in sizes {
        let need = len + frame_overhead;
        if need > room || packets.is_empty() {
            packets.push(vec![]);
            room = mtu - packet_overhead;
        }
        room -= need;
        packets.last_mut().unwrap().push(block);
    }
    packets
}

fn max_shards_of_one_block_per_packet(packets: &[Vec<u64>]) -> usize {
    packets
        .iter()
        .map(|p| {
            let mut c: HashMap<u64, usize> = HashMap::new();
            p.iter().map(|&b| *c.entry(b).or_default() += 1).count();
            c.values().copied().max().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn interleaving_spreads_blocks_over_packets() {
    // Four lone 150-byte messages, each its own block of 1 data + 3 parity shards: six
    // frames of ~166 B fit one 1200-byte packet.
    let mut enc = Encoder::new(EncoderConfig::default());
    let queues: Vec<Vec<(u64, usize)>> = (0..4)
        .map(|i| {
            let mut b = enc.encode(i, msg(150, 0)).unwrap();
            let mut frames = b.data_frames();
            frames.extend(b.next_repair(3));
            frames.into_iter().map(|f| (b.id(), f.len())).collect()
        })
        .collect();
    let sequential: Vec<_> = queues.iter().flatten().copied().collect();
    let interleaved = interleave(queues);
    let seq_packets = pack(&sequential, 1200);
    let int_packets = pack(&interleaved, 1200);
    // Sequential: a packet holds all four shards of a block; one loss loses the block.
    assert_eq!(max_shards_of_one_block_per_packet(&seq_packets), 4);
    // Interleaved over 4 blocks: at most ceil(6 / 4) = 2 shards of any block per packet, so a
    // lost packet leaves every block at least 2 of its 4 shards; it needs 1.
    let per_packet = int_packets.iter().map(Vec::len).max().unwrap();
    assert_eq!(per_packet, 6);
    assert_eq!(
        max_shards_of_one_block_per_packet(&int_packets),
        per_packet.div_ceil(4)
    );

    // Near-full shards never share a packet: a 3000-byte message makes three ~1000-byte shards.
    let mut b = enc.encode(9, msg(3000, 0)).unwrap();
    let sizes: Vec<_> = all_frames(&mut b).iter().map(|f| (0, f.len())).collect();
    assert!(pack(&sizes, 1200).iter().all(|p| p.len() == 1));
}

#[test]
fn zero_length_messages() {
    let mut enc = Encoder::new(EncoderConfig::default());
    let mut b = enc
        .encode_block(0, &[Bytes::new(), msg(5, 0), Bytes::new()])
        .unwrap();
    let mut r = Reassembler::new(ReassemblerConfig::default());
    r.insert(decode_shard(b.frame(1).unwrap()));
    let d = drain(&mut r);
    // The parity shard alone rebuilds the block (checked against its CRC): all three.
    let got: Vec<(u64, Bytes, bool)> = d
        .into_iter()
        .map(|d| (d.message_id, d.payload, d.recovered))
        .collect();
    assert_eq!(
        got,
        vec![
            (0, Bytes::new(), true),
            (1, msg(5, 0), true),
            (2, Bytes::new(), true)
        ]
    );
    let mut empty = enc.encode(9, Bytes::new()).unwrap();
    let mut r = Reassembler::new(ReassemblerConfig::default());
    r.insert(decode_shard(empty.frame(3).unwrap()));
    assert_eq!(drain(&mut r)[0].payload, Bytes::new());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Larger blocks: any k or more distinct shards, in any order, with duplicates, rebuild
    /// every message exactly once.
    #[test]
    fn any_k_of_n_rebuilds(
        lengths in prop::collection::vec(0usize..3000, 1..12),
        datagram in 300usize..1500,
        extra in 0usize..4,
        seed in any::<u64>(),
    ) {
        let messages: Vec<Bytes> = lengths.iter().enumerate().map(|(i, &l)| msg(l, i as u8)).collect();
        let mut enc = small_encoder(datagram);
        let mut block = match enc.encode_block(1000, &messages) {
            Ok(block) => block,
            // More data shards than the wire's cap allows (large inputs at small datagram
            // sizes): refused, as it must be; the cap has its own tests.
            Err(EncodeError::TooManyShards { .. }) => return Ok(()),
            Err(e) => panic!("{e}"),
        };
        let frames = all_frames(&mut block);
        let k = usize::from(block.header().data_shards);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<usize> = (0..frames.len()).collect();
        order.shuffle(&mut rng);
        order.truncate((k + extra).min(frames.len()));
        // Duplicate a few.
        for _ in 0..3 {
            let i = order[rng.random_range(0..order.len())];
            order.insert(rng.random_range(0..=order.len()), i);
        }
        let (out, r) = reassemble(&frames, &order);
        assert_delivered_once(&out, &messages, 1000);
        prop_assert_eq!(r.stats().blocks_buffered, 0);
    }

    /// Batches built by push carry exactly the messages pushed, in order.
    #[test]
    fn batched_blocks_carry_what_was_pushed(
        lengths in prop::collection::vec(0usize..2500, 1..60),
        gaps in prop::collection::vec(0u64..3, 60),
    ) {
        let t0 = Instant::now();
        let mut enc = Encoder::new(EncoderConfig::default());
        let mut r = Reassembler::new(ReassemblerConfig::default());
        let mut sent = HashMap::new();
        let mut id = 0u64;
        let mut got = HashMap::new();
        for (i, &len) in lengths.iter().enumerate() {
            id += u64::from(gaps[i] == 0); // sometimes skip an id
            id += 1;
            let m = msg(len, i as u8);
            sent.insert(id, m.clone());
            enc.push(t0 + Duration::from_micros(i as u64 * 700), id, m).unwrap();
            enc.handle_timeout(t0 + Duration::from_micros(i as u64 * 700));
            while let Some(mut b) = enc.poll_block() {
                for f in all_frames(&mut b).into_iter().skip(1) {
                    r.insert(decode_shard(f));
                }
                for d in drain(&mut r) {
                    prop_assert!(got.insert(d.message_id, d.payload).is_none());
                }
            }
        }
        enc.flush();
        while let Some(mut b) = enc.poll_block() {
            for f in all_frames(&mut b).into_iter().skip(1) {
                r.insert(decode_shard(f));
            }
            for d in drain(&mut r) {
                prop_assert!(got.insert(d.message_id, d.payload).is_none());
            }
        }
        prop_assert_eq!(got, sent);
    }
}

#[test]
fn worst_case_rebuild_of_wide_blocks() {
    // Every lost shard is data: k - m data shards and all m parity shards survive.
    for (k, m, s) in [
        (4u16, 2u16, 256usize),
        (8, 4, 1200),
        (32, 8, 256),
        (32, 8, 1200),
    ] {
        let mut enc = Encoder::new(EncoderConfig {
            max_datagram_size: s + 20,
            repair_ratio: 0.0,
            min_repair: m,
            ..EncoderConfig::default()
        });
        let message = msg(usize::from(k) * s, 5);
        let mut block = enc.encode(0, message.clone()).unwrap();
        assert_eq!(
            (block.header().data_shards, block.header().total_shards),
            (k, k + m)
        );
        let frames: Vec<Bytes> = (m..k + m).map(|i| block.frame(i).unwrap()).collect();
        let (out, r) = reassemble(&frames, &(0..frames.len()).collect::<Vec<_>>());
        assert_eq!(r.stats().checksum_failures, 0, "k={k} m={m} s={s}");
        assert_eq!(out.len(), 1, "k={k} m={m} s={s}: {:?}", r.stats());
        assert_eq!(out[0].payload, message);
    }
}
