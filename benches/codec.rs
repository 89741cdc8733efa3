//! Encode and worst-case rebuild: surelink's coder (with framing, checksum and reassembly)
//! against the raw reed-solomon-erasure codec and a memcpy of the same bytes, side by side.
//!
//! `cargo bench --bench codec`; throughput is data bytes (k × S) per second.
//!
//! - `encode/raw`: `ReedSolomon::encode_sep` of m parity shards from k data shards.
//! - `encode/surelink`: `Encoder::encode_block` (copy into padded shards, CRC-32) plus every
//!   data frame and m repair frames as ready-to-send datagrams.
//! - `rebuild/raw`: `reconstruct_data` with the first m data shards lost (the worst case:
//!   every lost shard is data, so all m are rebuilt).
//! - `rebuild/surelink`: decode the k surviving frames (k - m data, m parity), insert them
//!   into a long-lived `Reassembler`, rebuild, verify the checksum, deliver the message.
//! - `memcpy`: copying the k × S bytes once, as a floor.
//! - `window/repair/W`: the window code's encoder (`fec::window`, docs/PROTOCOL.md §9.5): one
//!   repair over W sources of 512-byte messages (520-byte symbols); throughput is the W
//!   symbols' bytes.
//! - `window/recover_L<L>/W`: a fresh `WindowDecoder` takes the W − L sources received (in
//!   order) and L repairs over all W, and gives the L rebuilt messages (checked, then
//!   polled). Throughput is in recoveries, so the time per recovery is the time ÷ L.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use surelink::fec::window::{source_symbol, WindowDecoder, WindowEncoder, WindowLimits};
use surelink::fec::{CodecCache, Encoder, EncoderConfig, Reassembler, ReassemblerConfig};
use surelink::wire::{Frame, Limits, RepairFrame};

const CODES: [(u16, u16); 4] = [(4, 2), (8, 4), (16, 4), (32, 8)];
const SIZES: [u32; 2] = [256, 1200];
/// Bytes of received frames cycled through the rebuild bench: small enough to stay in cache,
/// as a datagram quinn has just decrypted is.
const POOL_BYTES: usize = 256 * 1024;

fn payload(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i * 7 + 3) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// An encoder whose blocks of one `k × s`-byte message have exactly k shards of s bytes.
fn encoder_for(k: u16, m: u16, s: u32, cache: &CodecCache) -> Encoder {
    let enc = Encoder::with_cache(
        EncoderConfig {
            // Room for the header with block and message ids up to 2^14.
            max_datagram_size: s as usize + 24,
            repair_ratio: 0.0,
            min_repair: m,
            ..EncoderConfig::default()
        },
        cache.clone(),
    );
    let mut probe = Encoder::with_cache(enc.config().clone(), cache.clone());
    let h = probe
        .encode(0, payload(usize::from(k) * s as usize))
        .unwrap()
        .header()
        .clone();
    assert_eq!((h.data_shards, h.total_shards, h.shard_size), (k, k + m, s));
    enc
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    for (k, m) in CODES {
        for s in SIZES {
            let label = format!("{k}+{m}x{s}");
            let bytes = usize::from(k) * s as usize;
            g.throughput(Throughput::Bytes(bytes as u64));
            let cache = CodecCache::new();
            let codec = cache.get(k, k + m).unwrap();
            let data: Vec<Vec<u8>> = payload(bytes)
                .chunks(s as usize)
                .map(<[u8]>::to_vec)
                .collect();

            g.bench_with_input(BenchmarkId::new("raw", &label), &(), |b, _| {
                let mut parity = vec![vec![0u8; s as usize]; usize::from(m)];
                b.iter(|| {
                    codec.encode_sep(black_box(&data), &mut parity).unwrap();
                    black_box(&parity);
                })
            });

            let mut enc = encoder_for(k, m, s, &cache);
            let message = payload(bytes);
            g.bench_with_input(BenchmarkId::new("surelink", &label), &(), |b, _| {
                b.iter(|| {
                    let mut block = enc.encode(0, black_box(message.clone())).unwrap();
                    let frames = block.data_frames();
                    let repair = block.next_repair(usize::from(m));
                    black_box((frames, repair));
                })
            });

            g.bench_with_input(BenchmarkId::new("memcpy", &label), &(), |b, _| {
                let mut dst = vec![0u8; bytes];
                b.iter(|| {
                    dst.copy_from_slice(black_box(&message));
                    black_box(&dst);
                })
            });
        }
    }
    g.finish();
}

fn bench_rebuild(c: &mut Criterion) {
    let mut g = c.benchmark_group("rebuild");
    for (k, m) in CODES {
        for s in SIZES {
            let label = format!("{k}+{m}x{s}");
            let bytes = usize::from(k) * s as usize;
            g.throughput(Throughput::Bytes(bytes as u64));
            let cache = CodecCache::new();
            let mut enc = encoder_for(k, m, s, &cache);
            let message = payload(bytes);
            // A pool of distinct blocks, cycled; survivors of each: data shards m..k and all m
            // parity shards.
            let pool_len = (POOL_BYTES / bytes).max(16);
            let pool: Vec<Vec<Bytes>> = (0..pool_len)
                .map(|i| {
                    let mut block = enc.encode(i as u64, message.clone()).unwrap();
                    assert_eq!(block.header().total_shards, k + m, "block {i}");
                    (m..k + m).map(|j| block.frame(j).unwrap()).collect()
                })
                .collect();
            let mut block = enc.encode(0, message.clone()).unwrap();
            let shards: Vec<Option<Vec<u8>>> = (0..k + m)
                .map(|i| (i >= m).then(|| block.shard(i).unwrap().to_vec()))
                .collect();
            let codec = cache.get(k, k + m).unwrap();

            g.bench_with_input(BenchmarkId::new("raw", &label), &(), |b, _| {
                b.iter_batched_ref(
                    || shards.clone(),
                    |shards| codec.reconstruct_data(black_box(shards)).unwrap(),
                    BatchSize::SmallInput,
                )
            });

            // One long-lived reassembler, as on a real receiver. It remembers fewer finished
            // blocks than the pool holds, so a block id seen again is new to it (and its
            // finished-block memory evicts on every block, as in a steady state).
            let limits = Limits::default();
            let config = ReassemblerConfig {
                completed_memory: pool_len / 2,
                ..ReassemblerConfig::default()
            };
            g.bench_with_input(BenchmarkId::new("surelink", &label), &(), |b, _| {
                b.iter_custom(|iters| {
                    let mut r = Reassembler::with_cache(config.clone(), cache.clone());
                    let start = Instant::now();
                    for i in 0..iters as usize {
                        for f in &pool[i % pool_len] {
                            let Ok(Frame::Shard(shard)) = Frame::decode(f.clone(), &limits) else {
                                unreachable!("encoded frames decode");
                            };
                            r.insert(shard);
                        }
                        let d = r.poll_delivery().expect("rebuilt");
                        debug_assert_eq!(d.payload.len(), message.len());
                        black_box(d);
                    }
                    start.elapsed()
                })
            });
        }
    }
    g.finish();
}

/// Window sizes (sources a repair covers) and losses in the window benches; the reference
/// sender's repairs cover at most 32 sources.
const WINDOWS: [u64; 4] = [8, 16, 32, 64];
const LOSSES: [u64; 2] = [1, 4];
/// A payment message's envelope: with a two-byte id its source symbol is 520 bytes.
const WINDOW_MESSAGE: usize = 512;

fn bench_window(c: &mut Criterion) {
    let mut g = c.benchmark_group("window");
    let limits = WindowLimits::default();
    for w in WINDOWS {
        assert!(w <= limits.max_window);
        // Sources 0..w: message ids 1000.. (two-byte varints), distinct envelopes.
        let messages: Vec<(u64, Bytes)> = (0..w)
            .map(|seq| {
                let body: Vec<u8> = (0..WINDOW_MESSAGE)
                    .map(|i| (i * 7 + seq as usize * 13 + 3) as u8)
                    .collect();
                (1000 + seq, Bytes::from(body))
            })
            .collect();
        let symbols: Vec<Bytes> = messages
            .iter()
            .map(|(id, body)| Bytes::from(source_symbol(*id, body).unwrap()))
            .collect();
        assert_eq!(symbols[0].len(), 520);
        let window_bytes: usize = symbols.iter().map(Bytes::len).sum();
        let encoder = || {
            let mut enc = WindowEncoder::new(w);
            for s in &symbols {
                enc.push(s.to_vec());
            }
            enc
        };

        g.throughput(Throughput::Bytes(window_bytes as u64));
        let mut enc = encoder();
        g.bench_with_input(BenchmarkId::new("repair", w), &(), |b, _| {
            b.iter(|| black_box(enc.repair_from(black_box(0)).unwrap()))
        });

        for l in LOSSES {
            // L lost sources spread over the window; L repairs over all of it.
            let lost: Vec<u64> = (0..l).map(|j| (2 * j + 1) * w / (2 * l)).collect();
            let mut enc = encoder();
            let repairs: Vec<RepairFrame> = (0..l).map(|_| enc.repair_from(0).unwrap()).collect();
            let received: Vec<(u64, Bytes)> = (0..w)
                .filter(|seq| !lost.contains(seq))
                .map(|seq| (seq, symbols[seq as usize].clone()))
                .collect();
            let recover = || {
                let mut dec = WindowDecoder::new(limits);
                for (seq, symbol) in &received {
                    dec.on_source(*seq, symbol.clone());
                }
                for r in &repairs {
                    dec.on_repair(r);
                }
                dec
            };
            // Outside the timing: every lost message comes back, exactly.
            let mut dec = recover();
            let mut rebuilt: Vec<(u64, u64, Bytes)> =
                std::iter::from_fn(|| dec.poll_recovered()).collect();
            rebuilt.sort_by_key(|r| r.0);
            let expected: Vec<(u64, u64, Bytes)> = lost
                .iter()
                .map(|&seq| {
                    let (id, body) = &messages[seq as usize];
                    (seq, *id, body.clone())
                })
                .collect();
            assert_eq!(rebuilt, expected, "W {w}, L {l}");

            g.throughput(Throughput::Elements(l));
            g.bench_with_input(BenchmarkId::new(format!("recover_L{l}"), w), &(), |b, _| {
                b.iter(|| {
                    let mut dec = recover();
                    while let Some(m) = dec.poll_recovered() {
                        black_box(m);
                    }
                    dec
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench_encode, bench_rebuild, bench_window
}
criterion_main!(benches);
