//! Delivery benchmarks: surelink against quinn streams in the same run, and the sans-I/O core's
//! throughput.
//!
//! `cargo bench --bench delivery`
//!
//! - `send_to_ack/<loss>`: one 512 B payment at a time, 20 ms each way (plus up to 3 ms of
//!   jitter), the same Bernoulli loss both ways, on the in-crate simulator in virtual time
//!   (tokio's paused clock). The time criterion reports per iteration is the *virtual*
//!   send-to-ack latency (`iter_custom`), so it is network and protocol time, comparable
//!   between the functions of a group: `surelink` (a `Channel` on each end, BBR, adaptive
//!   redundancy), `quinn-stream` (stock quinn, one bi-stream per payment, the server answers
//!   `ok`) and `quinn-stream-bbr` (the same with quinn's BBR). One connection per function
//!   lives across iterations, as a real client's does.
//! - `burst/<case>`: as `send_to_ack`, under bursty loss instead (a Gilbert-Elliott chain per
//!   packet: mean 5% in bursts of 4 packets, and mean 6% in bursts of 8), with surelink beside
//!   quinn streams with Cubic (`quinn-stream`) and with BBR (`quinn-stream-bbr`).
//! - `request_round_trip/<loss>`: as `send_to_ack` at 0% and 10% loss, with each payment a
//!   request and its reply (issue 24): `surelink` sends it with `Channel::request` and the
//!   server's application replies with 64 bytes at once (`Delivered::reply`);
//!   `quinn-stream` and `quinn-stream-bbr` open a bi-stream per request and the server answers
//!   it with the same 64 bytes. The time per iteration is the virtual round trip, request sent
//!   to the whole reply received.
//! - `high_rate/<case>`: many payments in flight at once on a clean link, surelink beside
//!   quinn streams (Cubic and BBR). Each iteration sends 1,000 payments of 512 B at once and
//!   waits for all their acks (surelink: 1,000 concurrent `send`s; quinn: 1,000 concurrent
//!   bi-streams, the server allowing 1,000 at once where quinn's default is 100, as a user
//!   expecting that many requests in flight would set it); throughput is in
//!   payments per second. `wall_0ms`: real time over the in-memory network with no delay,
//!   both ends on one thread, so it counts CPU, pacing and any deliberate spacing, as a
//!   loopback run does. `virtual_20ms`: virtual time, 20 ms each way, no jitter, so it counts
//!   only network and protocol time (congestion window growth, pacing, spacing, drops when
//!   quinn's datagram buffer is full).
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
use surelink::sim::{Congestion, GilbertElliott, LinkConfig, Loss, Pair, PairConfig};

const SIZE: usize = 512;

/// The size of a reply in `request_round_trip`.
const REPLY_SIZE: usize = 64;

fn payment() -> Bytes {
    Bytes::from(vec![b'p'; SIZE])
}

/// What a server answers each payment with: `ok` (the quinn servers' ack of a payment), or
/// a reply of [`REPLY_SIZE`] bytes (a request's reply, on every transport).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Reply,
}

impl Answer {
    fn bytes(self) -> Bytes {
        match self {
            Answer::Ok => Bytes::from_static(b"ok"),
            Answer::Reply => Bytes::from(vec![b'r'; REPLY_SIZE]),
        }
    }
}

fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime")
}

/// The links of the `send_to_ack` and `burst` groups: 20 ms each way, up to 3 ms of jitter,
/// `loss` both ways.
fn lossy(loss: Loss) -> LinkConfig {
    LinkConfig {
        loss,
        delay: Duration::from_millis(20),
        // 3 ms of jitter: real links have some, and criterion's analysis needs samples that
        // are not all equal (virtual time is exact).
        jitter: Duration::from_millis(3),
        ..LinkConfig::default()
    }
}

fn pair(link: LinkConfig, congestion: Congestion, surelink: bool) -> Pair {
    Pair::new(PairConfig {
        seed: 9,
        congestion,
        keep_alive: Some(Duration::from_secs(1)),
        ack_frequency: surelink.then(surelink::channel::ack_frequency_config),
        ..PairConfig::symmetric(link)
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

async fn surelink_ends(link: LinkConfig) -> SurelinkEnds {
    let pair = pair(link, Congestion::Surelink, true);
    let (c, s) = pair.connect().await.expect("handshake");
    let (client, _client_messages) = Channel::open(c, Config::default()).expect("open");
    let (server, mut messages) = Channel::open(s, Config::default()).expect("open");
    // Taking a plain payment acks it; a request is answered at once with a reply.
    let reply = Answer::Reply.bytes();
    let drain = tokio::spawn(async move {
        while let Some(d) = messages.recv().await {
            if d.is_request() {
                let _ = d.reply(reply.clone());
            }
        }
    });
    SurelinkEnds {
        _pair: pair,
        client,
        _client_messages,
        _server: server,
        _drain: drain,
    }
}

/// The quinn baseline's two ends, the server answering each bi-stream with `answer`; with
/// `streams`, the server lets the client open that many bi-streams at once instead of
/// quinn's default 100.
async fn quinn_ends(
    link: LinkConfig,
    congestion: Congestion,
    streams: Option<u32>,
    answer: Answer,
) -> (Pair, quinn::Connection) {
    let pair = pair(link, congestion, false);
    if let Some(n) = streams {
        // The pair's transport settings (`PairConfig`'s defaults here, keep-alive 1 s) with
        // the larger stream limit.
        let mut t = surelink::sim::transport_config(congestion, PairConfig::default().initial_rtt);
        t.max_idle_timeout(PairConfig::default().idle_timeout.try_into().ok());
        t.keep_alive_interval(Some(Duration::from_secs(1)));
        t.max_concurrent_bidi_streams(n.into());
        let mut config = pair.server_config.clone();
        config.transport = std::sync::Arc::new(t);
        pair.server.set_server_config(Some(config));
    }
    let (client, server) = pair.connect().await.expect("handshake");
    let answer = answer.bytes();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = server.accept_bi().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                if recv.read_to_end(1 << 20).await.is_ok() {
                    let _ = send.write_all(&answer).await;
                    let _ = send.finish();
                }
            });
        }
    });
    (pair, client)
}

/// One request on its own bi-stream, until the whole answer (`expected`) is read.
async fn quinn_request(conn: &quinn::Connection, p: &[u8], expected: &[u8]) -> Option<()> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(p).await.ok()?;
    send.finish().ok()?;
    let got = recv.read_to_end(expected.len().max(64)).await.ok()?;
    (got == expected).then_some(())
}

fn send_to_ack(c: &mut Criterion) {
    for loss in [0.0, 0.01, 0.1] {
        let mut group = c.benchmark_group(format!("send_to_ack/{}%", loss * 100.0));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(3));
        one_at_a_time(&mut group, &lossy(Loss::Bernoulli(loss)), Answer::Ok);
        group.finish();
    }
}

/// Issue 24: a request's round trip, request sent to reply received, one at a time.
fn request_round_trip(c: &mut Criterion) {
    for loss in [0.0, 0.1] {
        let mut group = c.benchmark_group(format!("request_round_trip/{}%", loss * 100.0));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(3));
        one_at_a_time(&mut group, &lossy(Loss::Bernoulli(loss)), Answer::Reply);
        group.finish();
    }
}

/// One payment at a time, 5 ms apart (200 per second, as in the sweep); criterion's time per
/// iteration is the virtual send-to-ack latency, or with [`Answer::Reply`] the round trip of
/// a request and its reply.
fn one_at_a_time(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    link: &LinkConfig,
    answer: Answer,
) {
    let gap = Duration::from_millis(5);
    let rt = paused_runtime();
    let ends = rt.block_on(surelink_ends(link.clone()));
    group.bench_function(BenchmarkId::from_parameter("surelink"), |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t0 = tokio::time::Instant::now();
                    // A failed send counts its whole wait: the benchmark must not hide it.
                    if answer == Answer::Reply {
                        let _ = ends.client.request(payment()).await;
                    } else {
                        let _ = ends.client.send(payment()).await;
                    }
                    total += t0.elapsed();
                    tokio::time::sleep(gap).await;
                }
                total
            })
        })
    });
    drop(ends);
    let (p, expected) = (payment(), answer.bytes());
    for (name, congestion) in [
        ("quinn-stream", Congestion::Cubic),
        ("quinn-stream-bbr", Congestion::Bbr),
    ] {
        let rt = paused_runtime();
        let (_pair, conn) = rt.block_on(quinn_ends(link.clone(), congestion, None, answer));
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = tokio::time::Instant::now();
                        let _ = quinn_request(&conn, &p, &expected).await;
                        total += t0.elapsed();
                        tokio::time::sleep(gap).await;
                    }
                    total
                })
            })
        });
    }
}

fn burst(c: &mut Criterion) {
    for (name, mean, burst) in [("ge5%_b4", 0.05, 4.0), ("ge6%_b8", 0.06, 8.0)] {
        let mut group = c.benchmark_group(format!("burst/{name}"));
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(3));
        let link = lossy(Loss::GilbertElliott(GilbertElliott::from_mean(mean, burst)));
        one_at_a_time(&mut group, &link, Answer::Ok);
        group.finish();
    }
}

/// Payments per iteration of the `high_rate` groups.
const AT_ONCE: usize = 1000;

/// Sends [`AT_ONCE`] payments at once on `client` and waits for every outcome.
async fn surelink_batch(client: &Channel) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..AT_ONCE {
        let client = client.clone();
        set.spawn(async move { client.send(payment()).await.is_ok() });
    }
    while let Some(ok) = set.join_next().await {
        black_box(ok.expect("send task"));
    }
}

async fn quinn_batch(conn: &quinn::Connection) {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..AT_ONCE {
        let conn = conn.clone();
        set.spawn(async move { quinn_request(&conn, &payment(), b"ok").await.is_some() });
    }
    while let Some(ok) = set.join_next().await {
        black_box(ok.expect("request task"));
    }
}

fn high_rate(c: &mut Criterion) {
    // (group, runtime with a paused clock?, one-way delay). No jitter: jitter reorders
    // packets sent together, and quinn's loss detection takes reordering by 3 packets for a
    // loss (measured with 3 ms of jitter: quinn streams took 1.8 s for 1,000 payments
    // instead of 0.4 s). Virtual time is then exact, so this group draws no plots (criterion's
    // density plot fails on equal samples).
    let cases = [("wall_0ms", false, 0), ("virtual_20ms", true, 20)];
    for (name, paused, delay_ms) in cases {
        let mut group = c.benchmark_group(format!("high_rate/{name}"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(5));
        group.throughput(Throughput::Elements(AT_ONCE as u64));
        let link = LinkConfig {
            delay: Duration::from_millis(delay_ms),
            ..LinkConfig::default()
        };
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(paused)
                .build()
                .expect("runtime")
        };
        // Virtual time from tokio's clock; wall time from the OS's.
        let elapsed = move |t0: (tokio::time::Instant, Instant)| {
            if paused {
                t0.0.elapsed()
            } else {
                t0.1.elapsed()
            }
        };
        let now = || (tokio::time::Instant::now(), Instant::now());

        let rt = runtime();
        let ends = rt.block_on(surelink_ends(link.clone()));
        group.bench_function(BenchmarkId::from_parameter("surelink"), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let t0 = now();
                        surelink_batch(&ends.client).await;
                        total += elapsed(t0);
                    }
                    total
                })
            })
        });
        drop(ends);
        for (transport, congestion) in [
            ("quinn-stream", Congestion::Cubic),
            ("quinn-stream-bbr", Congestion::Bbr),
        ] {
            let rt = runtime();
            let (_pair, conn) = rt.block_on(quinn_ends(
                link.clone(),
                congestion,
                Some(AT_ONCE as u32),
                Answer::Ok,
            ));
            group.bench_function(BenchmarkId::from_parameter(transport), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let t0 = now();
                            quinn_batch(&conn).await;
                            total += elapsed(t0);
                        }
                        total
                    })
                })
            });
        }
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

criterion_group!(benches, send_to_ack, burst, request_round_trip, core);
criterion_group! {
    name = exact;
    config = Criterion::default().without_plots();
    targets = high_rate
}
criterion_main!(benches, exact);
