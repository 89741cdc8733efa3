//! Delivery benchmarks: surelink against quinn streams in the same run, and the sans-I/O core's
//! throughput.
//!
//! `cargo bench --bench delivery`
//!
//! - `send_to_ack/<loss>`: one 512 B payment at a time, 20 ms each way (plus up to 3 ms of
//!   jitter), the same Bernoulli loss both ways, on the in-crate simulator in virtual time
//!   (tokio's paused clock). The time criterion reports per iteration is the *virtual*
//!   send-to-ack latency (`iter_custom`), so it is network and protocol time, comparable between the two functions of a group:
//!   `surelink` (a `Channel` on each end, BBR, adaptive redundancy) and `quinn-stream` (stock
//!   quinn, one bi-stream per payment, the server answers `ok`). One connection per group
//!   lives across iterations, as a real client's does.
//! - `core`: 512 B messages through `proto::Peer` to a second `Peer` and acks back, in memory,
//!   wall time: envelope, encode, frame, decode, reassemble, dedupe, deliver, ack, ack
//!   handling. `adaptive_clean` is the default sender once a clean link is proven (one data
//!   shard, no parity); `one_parity` is the fixed 1 + 1 code. Shard spacing is off (it only
//!   schedules frames later). Throughput is in messages per second.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use surelink::channel::{Channel, Config, Messages};
use surelink::proto::{Peer, ReceiverConfig, SenderConfig};
use surelink::sim::{Congestion, LinkConfig, Pair, PairConfig};

const SIZE: usize = 512;

fn payment() -> Bytes {
    Bytes::from(vec![b'p'; SIZE])
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

fn pair(loss: f64, congestion: Congestion, surelink: bool) -> Pair {
    Pair::new(PairConfig {
        seed: 9,
        congestion,
        keep_alive: Some(Duration::from_secs(1)),
        ack_frequency: surelink.then(surelink::channel::ack_frequency_config),
        // 3 ms of jitter: real links have some, and criterion's analysis needs samples that
        // are not all equal (virtual time is exact).
        ..PairConfig::symmetric(LinkConfig {
            jitter: Duration::from_millis(3),
            ..LinkConfig::lossy(Duration::from_millis(20), loss)
        })
    })
    .expect("simulated endpoints")
}

struct SurelinkEnds {
    _pair: Pair,
    client: Channel,
    _client_messages: Messages,
    _server: Channel,
    _drain: tokio::task::JoinHandle<()>,
}

async fn surelink_ends(loss: f64) -> SurelinkEnds {
    let pair = pair(loss, Congestion::Surelink, true);
    let (c, s) = pair.connect().await.expect("handshake");
    let (client, _client_messages) = Channel::open(c, Config::default()).expect("open");
    let (server, mut messages) = Channel::open(s, Config::default()).expect("open");
    let drain = tokio::spawn(async move { while messages.recv().await.is_some() {} });
    SurelinkEnds {
        _pair: pair,
        client,
        _client_messages,
        _server: server,
        _drain: drain,
    }
}

async fn quinn_ends(loss: f64) -> (Pair, quinn::Connection) {
    let pair = pair(loss, Congestion::Cubic, false);
    let (client, server) = pair.connect().await.expect("handshake");
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = server.accept_bi().await {
            tokio::spawn(async move {
                if recv.read_to_end(1 << 20).await.is_ok() {
                    let _ = send.write_all(b"ok").await;
                    let _ = send.finish();
                }
            });
        }
    });
    (pair, client)
}

async fn quinn_request(conn: &quinn::Connection, p: &[u8]) -> Option<()> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(p).await.ok()?;
    send.finish().ok()?;
    (recv.read_to_end(64).await.ok()? == b"ok").then_some(())
}

fn send_to_ack(c: &mut Criterion) {
    for loss in [0.0, 0.01, 0.1] {
        let mut group = c.benchmark_group(format!("send_to_ack/{}%", loss * 100.0));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(3));
        // Between payments, 5 ms of quiet (200 per second, as in the sweep).
        let gap = Duration::from_millis(5);

        let rt = paused_runtime();
        let ends = rt.block_on(surelink_ends(loss));
        group.bench_function(BenchmarkId::from_parameter("surelink"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = tokio::time::Instant::now();
                        // A failed send counts its whole wait: the benchmark must not hide it.
                        let _ = ends.client.send(payment()).await;
                        total += t0.elapsed();
                        tokio::time::sleep(gap).await;
                    }
                    total
                })
            })
        });
        drop(ends);

        let rt = paused_runtime();
        let (_pair, conn) = rt.block_on(quinn_ends(loss));
        let p = payment();
        group.bench_function(BenchmarkId::from_parameter("quinn-stream"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = tokio::time::Instant::now();
                        let _ = quinn_request(&conn, &p).await;
                        total += t0.elapsed();
                        tokio::time::sleep(gap).await;
                    }
                    total
                })
            })
        });
        group.finish();
    }
}

/// Moves everything `from` wants to send into `to`.
fn pump(now: Instant, from: &mut Peer, to: &mut Peer) {
    while let Some(d) = from.poll_transmit() {
        to.handle_datagram(now, d);
    }
}

fn core(c: &mut Criterion) {
    let mut group = c.benchmark_group("core");
    group.throughput(Throughput::Elements(1));
    let configs = [
        (
            "adaptive_clean",
            SenderConfig {
                repair_spacing: Duration::ZERO,
                ..SenderConfig::default()
            },
        ),
        (
            "one_parity",
            SenderConfig {
                adaptive: None,
                repair_spacing: Duration::ZERO,
                ..SenderConfig::default()
            },
        ),
    ];
    for (name, config) in configs {
        let mut a = Peer::new(config.clone(), ReceiverConfig::default());
        let mut b = Peer::new(config, ReceiverConfig::default());
        let mut now = Instant::now();
        let p = payment();
        let step = |a: &mut Peer, b: &mut Peer, now: &mut Instant| {
            *now += Duration::from_micros(2);
            a.sender.send(*now, p.clone()).expect("in flight stays low");
            pump(*now, a, b);
            while let Some(d) = b.receiver.poll_delivery() {
                black_box(d);
            }
            pump(*now, b, a);
            while let Some(e) = a.sender.poll_event() {
                black_box(e);
            }
        };
        // Warm up: the adaptive sender proves the path clean (its ack round trip is the
        // simulated 2 µs per message, so the loss estimator judges shards at once).
        for _ in 0..2000 {
            step(&mut a, &mut b, &mut now);
        }
        if name == "adaptive_clean" {
            assert_eq!(a.sender.current_plan(SIZE), Some((1, 0)), "warm-up");
        }
        group.bench_function(name, |bench| bench.iter(|| step(&mut a, &mut b, &mut now)));
    }
    group.finish();
}

criterion_group!(benches, send_to_ack, core);
criterion_main!(benches);
