//! The channel over real quinn connections on the simulator, in virtual time.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use surelink::channel::{Channel, Config, Messages, SendError};
use surelink::sim::{Congestion, GilbertElliott, LinkConfig, Loss, Pair, PairConfig, RateLimit};
use surelink::wire::BlockHeader;

fn payment(i: u32) -> Bytes {
    let mut p = format!("payment {i:08} ").into_bytes();
    p.resize(512, b'.');
    p.into()
}

/// A BBR pair over `link` both ways, with a channel open on each end.
struct Ends {
    pair: Pair,
    client_conn: quinn::Connection,
    client: Channel,
    _client_messages: Messages,
    server: Channel,
    server_messages: Messages,
}

async fn ends(link: LinkConfig, seed: u64) -> Ends {
    let pair = Pair::new(PairConfig {
        seed,
        congestion: Congestion::Surelink,
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let (client, _client_messages) = Channel::open(client_conn.clone(), Config::default()).unwrap();
    let (server, server_messages) = Channel::open(server_conn, Config::default()).unwrap();
    Ends {
        pair,
        client_conn,
        client,
        _client_messages,
        server,
        server_messages,
    }
}

/// Takes every message as it arrives (a message is acked once the application took it), for
/// tests that await their sends before they look at what arrived.
fn reader(
    mut messages: Messages,
) -> tokio::sync::mpsc::UnboundedReceiver<surelink::proto::Delivered> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(m) = messages.recv().await {
            if tx.send(m).is_err() {
                return;
            }
        }
    });
    rx
}

/// Takes and drops every message, for tests that do not look at deliveries (a message is
/// acked once the application took it).
fn drain(mut messages: Messages) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while messages.recv().await.is_some() {} })
}

struct Run {
    acked: HashMap<u32, Duration>,
    failed: Vec<(u32, SendError)>,
    delivered: Vec<Bytes>,
}

/// `n` payments at 200/s from client to server over a quinn pair with `link` both ways.
async fn run(link: LinkConfig, seed: u64, n: u32) -> Run {
    let pair = Pair::new(PairConfig {
        seed,
        congestion: Congestion::Surelink,
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let (client, _client_messages) = Channel::open(client_conn, Config::default()).unwrap();
    let (_server, mut server_messages) = Channel::open(server_conn, Config::default()).unwrap();
    let collector = tokio::spawn(async move {
        let mut delivered = Vec::new();
        while let Some(m) = server_messages.recv().await {
            delivered.push(m.payload);
        }
        delivered
    });
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = client.clone();
        tasks.push(tokio::spawn(
            async move { (i, client.send(payment(i)).await) },
        ));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut run = Run {
        acked: HashMap::new(),
        failed: Vec::new(),
        delivered: Vec::new(),
    };
    for t in tasks {
        let (i, outcome) = t.await.unwrap();
        match outcome {
            Ok(receipt) => {
                run.acked.insert(i, receipt.latency);
            }
            Err(e) => run.failed.push((i, e)),
        }
    }
    let st = client.stats().sender;
    eprintln!("  loss burstiness {:?}", client.stats().loss_burstiness);
    if std::env::var("SURELINK_DEBUG").is_ok() {
        eprintln!("client {:?}\nserver {:?}", client.stats(), _server.stats());
    }
    eprintln!(
        "  hedges {} retransmits {} first-flight bytes {} hedge bytes {}; links: up {:?}, down {:?}",
        st.hedges_fired,
        st.retransmits,
        st.first_flight_bytes,
        st.hedge_bytes,
        pair.up(),
        pair.down()
    );
    // Let late deliveries land, then stop the server side.
    tokio::time::sleep(Duration::from_secs(1)).await;
    pair.server.close(0u32.into(), b"done");
    pair.client.close(0u32.into(), b"done");
    let delivered = collector.await.unwrap();
    run.delivered = delivered;
    run
}

fn check(run: &Run, n: u32) {
    assert_eq!(
        run.acked.len() + run.failed.len(),
        n as usize,
        "every send has an outcome"
    );
    let mut seen = BTreeSet::new();
    for p in &run.delivered {
        let i: u32 = std::str::from_utf8(&p[8..16]).unwrap().parse().unwrap();
        assert_eq!(*p, payment(i), "payload intact");
        assert!(seen.insert(i), "payment {i} delivered twice");
    }
    for i in run.acked.keys() {
        assert!(seen.contains(i), "payment {i} acked but not delivered");
    }
    for (_, e) in &run.failed {
        assert!(
            matches!(e, SendError::Timeout { .. }),
            "definite error: {e}"
        );
    }
}

fn p(run: &Run, q: f64) -> Duration {
    let mut l: Vec<Duration> = run.acked.values().copied().collect();
    l.sort();
    l[((q * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1]
}

#[tokio::test(start_paused = true)]
async fn payments_over_quinn_keep_their_semantics_under_loss() {
    let models = [
        Loss::Bernoulli(0.0),
        Loss::Bernoulli(0.01),
        Loss::Bernoulli(0.05),
        Loss::Bernoulli(0.1),
        Loss::Bernoulli(0.2),
        Loss::Bernoulli(0.3),
        Loss::GilbertElliott(GilbertElliott::from_mean(0.05, 4.0)),
    ];
    for (i, loss) in models.into_iter().enumerate() {
        let link = LinkConfig {
            loss: loss.clone(),
            delay: Duration::from_millis(20),
            reorder: 0.02,
            reorder_delay: Duration::from_millis(5),
            duplicate: 0.02,
            ..LinkConfig::default()
        };
        let n = 500;
        let run = run(link, 40 + i as u64, n).await;
        check(&run, n);
        eprintln!(
            "{loss:?}: acked {} failed {} p50 {:?} p99 {:?} p99.9 {:?}",
            run.acked.len(),
            run.failed.len(),
            p(&run, 0.5),
            p(&run, 0.99),
            p(&run, 0.999)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lost_connection_gives_every_pending_send_a_definite_error() {
    // From 1 s on nothing gets through, so the sends below stay in flight; then the client's
    // connection is closed under them.
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        blackouts: vec![Duration::from_secs(1)..Duration::from_secs(3600)],
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig {
        congestion: Congestion::Bbr,
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let (client, _m) = Channel::open(client_conn.clone(), Config::default()).unwrap();
    let (_server, sm) = Channel::open(server_conn, Config::default()).unwrap();
    let _sm = drain(sm);
    assert!(client.send(payment(0)).await.is_ok(), "before the blackout");
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_secs(1)).await;
    let pending: Vec<_> = (1..=10)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move { c.send(payment(i)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    client_conn.close(0u32.into(), b"gone");
    for p in pending {
        let outcome = tokio::time::timeout(Duration::from_secs(10), p)
            .await
            .expect("an outcome, not a hang")
            .unwrap();
        assert!(
            matches!(outcome, Err(SendError::ConnectionLost { .. })),
            "{outcome:?}"
        );
    }
    // After the driver stopped, a send fails at once.
    let late = tokio::time::timeout(Duration::from_secs(1), client.send(payment(99)))
        .await
        .expect("no hang");
    assert!(matches!(late, Err(SendError::Closed)), "{late:?}");
}

#[tokio::test(start_paused = true)]
async fn a_two_second_blackout_delays_but_never_duplicates() {
    // 20 ms each way, 5% loss, and nothing at all gets through between 1 s and 3 s of the
    // network's life; payments keep coming at 200/s throughout.
    let link = LinkConfig {
        loss: Loss::Bernoulli(0.05),
        delay: Duration::from_millis(20),
        reorder: 0.02,
        reorder_delay: Duration::from_millis(5),
        duplicate: 0.02,
        blackouts: vec![Duration::from_secs(1)..Duration::from_secs(3)],
        ..LinkConfig::default()
    };
    let n = 1200;
    let run = run(link, 77, n).await;
    check(&run, n);
    // Measured: after the blackout quinn itself stays silent for ~2.3 s more (its probe
    // timeout doubled through the blackout, and its window is full of lost packets), so
    // payments sent just before and during the blackout may reach their 5 s deadline and
    // fail with an unknown outcome (allowed: `check` saw only `Timeout`s). Payments sent
    // well after it (the last 200, from 5 s on) are all acked.
    eprintln!(
        "blackout: acked {} failed {} max {:?}",
        run.acked.len(),
        run.failed.len(),
        p(&run, 1.0)
    );
    for i in n - 200..n {
        assert!(run.acked.contains_key(&i), "payment {i} after the blackout");
    }
}

#[tokio::test(start_paused = true)]
async fn garbage_and_contradictory_frames_from_an_authenticated_peer_are_counted_and_dropped() {
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(0.05),
        ..LinkConfig::default()
    };
    let Ends {
        pair: _pair,
        client_conn,
        client,
        server,
        server_messages,
        ..
    } = ends(link, 5).await;
    let mut server_messages = reader(server_messages);
    // The hostile part of the client: raw datagrams beside the real channel.
    let hostile = tokio::spawn(async move {
        let mut sent = 0u64;
        for i in 0u64..400 {
            // Forged blocks use ids far above the real sender's (which count up from 0): a
            // peer can always spoil its *own* next block ids (the first header seen for a
            // block id wins), but nothing it sends may disturb anything else.
            let header = |block: u64, first_message: u64, checksum: u32| BlockHeader {
                block: block + i / 4,
                data_shards: 2,
                total_shards: 4,
                shard_size: 8,
                first_message,
                lengths: [10u32, 6].into_iter().collect(),
                checksum,
            };
            let junk: Vec<u8> = match i % 4 {
                // Garbage.
                0 => (0..(i % 50 + 1)).map(|b| (b * 31 + i) as u8).collect(),
                // Two shards of one block whose headers contradict each other.
                1 => {
                    let mut a = Vec::new();
                    header(100_000, 1_000_000, 1).encode_shard(0, &[1; 8], &mut a);
                    let mut b = Vec::new();
                    header(100_000, 2_000_000, 1).encode_shard(1, &[2; 8], &mut b);
                    let _ = client_conn.send_datagram(Bytes::from(a));
                    b
                }
                // An ack with impossible ranges.
                2 => vec![0x12, 0x00, 0x00, 0x05, 0x00, 0x09],
                // A block rebuilt from parity whose checksum is wrong.
                _ => {
                    let mut f = Vec::new();
                    header(200_000, 3_000_000, 0xdead_beef).encode_shard(2, &[3; 8], &mut f);
                    let mut g = Vec::new();
                    header(200_000, 3_000_000, 0xdead_beef).encode_shard(3, &[4; 8], &mut g);
                    let _ = client_conn.send_datagram(Bytes::from(f));
                    g
                }
            };
            if client_conn.send_datagram(Bytes::from(junk)).is_ok() {
                sent += 1;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        sent
    });
    let n = 200u32;
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = client.clone();
        tasks.push(tokio::spawn(async move { c.send(payment(i)).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert!(r.is_ok(), "a real payment is unaffected: {r:?}");
    }
    assert!(hostile.await.unwrap() > 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut seen = BTreeSet::new();
    while let Ok(Some(m)) =
        tokio::time::timeout(Duration::from_millis(10), server_messages.recv()).await
    {
        let i: u32 = std::str::from_utf8(&m.payload[8..16])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(m.payload, payment(i), "payload intact");
        assert!(seen.insert(i), "payment {i} delivered twice");
    }
    assert_eq!(seen.len(), n as usize, "every payment delivered");
    let st = server.stats();
    let invalid: u64 = st.invalid_frames.values().sum();
    eprintln!(
        "server: invalid frames {:?}, {:?}",
        st.invalid_frames, st.reassembly
    );
    assert!(invalid > 0, "garbage is counted by reason");
    assert!(
        st.reassembly.shards_contradicting > 0,
        "contradictions counted"
    );
    assert!(st.reassembly.checksum_failures > 0, "bad checksums counted");
    assert_eq!(
        st.receiver.delivered,
        u64::from(n),
        "nothing forged delivered"
    );
}

#[tokio::test(start_paused = true)]
async fn large_messages_take_the_stream_path_with_the_same_semantics() {
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(0.1),
        duplicate: 0.02,
        ..LinkConfig::default()
    };
    let Ends {
        pair: _pair,
        client,
        server,
        server_messages,
        ..
    } = ends(link, 9).await;
    let mut server_messages = reader(server_messages);
    let big = |i: u8| Bytes::from(vec![i; 100_000 + usize::from(i)]);
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let c = client.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.send(big(i)).await
            } else {
                c.send(payment(u32::from(i))).await
            }
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let receipt = t.await.unwrap().expect("acked");
        assert_eq!(
            receipt.shards_sent == 0,
            i % 2 == 0,
            "big ones go on streams"
        );
    }
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(server_messages.recv().await.unwrap());
    }
    for i in (0..10u8).step_by(2) {
        assert_eq!(
            got.iter().filter(|m| m.payload == big(i)).count(),
            1,
            "big message {i} delivered once, intact"
        );
    }
    assert_eq!(client.stats().stream_messages_sent, 5);
    assert_eq!(server.stats().stream_messages_received, 5);
    // Over the limit: a clear error, nothing sent.
    let too_big = Bytes::from(vec![0u8; Config::default().max_message_size + 1]);
    assert!(matches!(
        client.send(too_big).await,
        Err(SendError::TooLarge { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn without_streams_a_large_message_is_refused_before_sending() {
    let pair = Pair::new(PairConfig::symmetric(LinkConfig::default())).unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let mut config = Config::default();
    config.streams = false;
    let (client, _cm) = Channel::open(client_conn, config.clone()).unwrap();
    let (_server, sm) = Channel::open(server_conn, config).unwrap();
    let _sm = drain(sm);
    let r = client.send(Bytes::from(vec![1u8; 20_000])).await;
    assert!(
        matches!(r, Err(SendError::TooLarge { max: 8192, .. })),
        "{r:?}"
    );
    assert!(client.send(payment(1)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_retry_with_the_same_idempotency_key_is_acked_but_delivered_once() {
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(0.1),
        ..LinkConfig::default()
    };
    let Ends {
        pair: _pair,
        client,
        server,
        server_messages,
        ..
    } = ends(link, 0).await;
    let mut server_messages = reader(server_messages);
    for attempt in 0..3 {
        let r = client
            .send_with_key("order-42", payment(42))
            .await
            .unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!(r.id, attempt, "each attempt is a new message id");
    }
    // A large retry under the same key (stream path) is recognised too.
    let big = Bytes::from(vec![7u8; 50_000]);
    client.send_with_key("order-43", big.clone()).await.unwrap();
    client.send_with_key("order-43", big.clone()).await.unwrap();
    let first = server_messages.recv().await.unwrap();
    assert_eq!(
        (first.key.as_deref(), first.payload.clone()),
        (Some(&b"order-42"[..]), payment(42))
    );
    let second = server_messages.recv().await.unwrap();
    assert_eq!(
        (second.key.as_deref(), second.payload),
        (Some(&b"order-43"[..]), big)
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(2), server_messages.recv())
            .await
            .is_err(),
        "nothing more delivered"
    );
    assert_eq!(server.stats().receiver.duplicate_keys, 3);
    let r = client.send_with_key(vec![0u8; 256], payment(1)).await;
    assert!(matches!(r, Err(SendError::Rejected(_))), "{r:?}");
}

#[tokio::test(start_paused = true)]
async fn stats_describe_the_path_and_the_work() {
    // 400 payments at 10% loss each way, 20 ms each way. The stats must describe that path:
    // round trips of at least the 40 ms propagation, an observed loss near the link's, parity
    // spent and used, and a hedge budget share within its bounds.
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(0.1),
        ..LinkConfig::default()
    };
    let e = ends(link, 31).await;
    let _taken = drain(e.server_messages);
    let outcomes = futures_join(&e.client, 400).await;
    assert!(outcomes.iter().all(Result::is_ok), "all acked at 10% loss");
    let (c, s) = (e.client.stats(), e.server.stats());
    eprintln!("client {c:#?}\nserver {s:#?}");
    assert!(c.rtt_p50 >= Duration::from_millis(40), "{:?}", c.rtt_p50);
    assert!(c.rtt_p95 >= c.rtt_p50);
    let observed = c.loss_observed.expect("loss measured from the acks");
    // The sender judges at least a few hundred shards (512 in its window): 10% loss gives a
    // standard error under 1.5 points; quinn's own packets on the path add a little loss
    // of its own to the shards' share (measured 13%), so the band is wide on the high side.
    assert!((0.05..=0.2).contains(&observed), "observed loss {observed}");
    assert!(
        c.loss_estimate >= observed,
        "the estimate is an upper bound"
    );
    assert!(c.sender.repair_shards > 0 && c.sender.data_shards >= 400);
    assert!(
        s.reassembly.blocks_rebuilt > 0,
        "parity rebuilt lost shards"
    );
    assert!((0.0..=1.0).contains(&c.hedge_budget_used));
    assert_eq!(s.receiver.delivered, 400);
    assert!(s.invalid_frames.is_empty());
    drop(e.pair);
}

/// Sends payments `0..n` every 5 ms, concurrently; their outcomes.
async fn futures_join(
    client: &Channel,
    n: u32,
) -> Vec<Result<surelink::channel::Receipt, SendError>> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let c = client.clone();
        tasks.push(tokio::spawn(async move { c.send(payment(i)).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// Issue case 1: once the receiving application dropped its `Messages` (its consumer task
/// panicked), the channel acks nothing more: messages sent after that are neither delivered
/// nor acked, so their senders learn an unknown outcome (not a receipt for a payment
/// nobody took).
#[tokio::test(start_paused = true)]
async fn after_the_application_drops_its_messages_nothing_more_is_acked() {
    let e = ends(
        LinkConfig {
            delay: Duration::from_millis(10),
            ..LinkConfig::default()
        },
        3,
    )
    .await;
    let mut messages = e.server_messages;
    let (first, got) = tokio::join!(e.client.send(payment(0)), messages.recv());
    assert!(first.is_ok(), "{first:?}");
    assert!(got.is_some());
    drop(messages);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let options = surelink::channel::SendOptions::default().deadline(Duration::from_secs(1));
    let mut acked = 0;
    for i in 1..=20 {
        match e.client.send_with(payment(i), options.clone()).await {
            Ok(_) => acked += 1,
            // Not delivered: refused (REFUSE frame), or unknown if the refusal is lost.
            Err(SendError::Refused { .. } | SendError::Timeout { .. }) => {}
            Err(other) => panic!("payment {i}: {other}"),
        }
    }
    assert_eq!(acked, 0, "nothing acked that nobody took");
}

/// Issue case 1, stream path: a large message handed to the application's queue is
/// acknowledged only once the application takes it. When the application drops its
/// `Messages` without taking it, the sender learns it was refused (not delivered), not a
/// receipt.
#[tokio::test(start_paused = true)]
async fn a_stream_message_is_acked_only_once_the_application_took_it() {
    let mut e = ends(
        LinkConfig {
            delay: Duration::from_millis(10),
            ..LinkConfig::default()
        },
        4,
    )
    .await;
    let big = |i: u8| Bytes::from(vec![i; 20_000]);
    // Taken: acked.
    let client = e.client.clone();
    let first = tokio::spawn(async move { client.send(big(1)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !first.is_finished(),
        "no ack before the application took it"
    );
    assert_eq!(e.server_messages.recv().await.unwrap().payload, big(1));
    assert!(first.await.unwrap().is_ok());
    // Handed over, never taken: refused when the application goes away.
    let client = e.client.clone();
    let second = tokio::spawn(async move { client.send(big(2)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished());
    drop(e.server_messages);
    let outcome = second.await.unwrap();
    assert!(
        matches!(outcome, Err(SendError::Refused { .. })),
        "{outcome:?}"
    );
}

/// Payments at 200/s through an outage of `outage` both ways (from 1 s), with deadlines
/// longer than the outage plus a second: returns when each payment was acked, and the
/// failures.
async fn through_outage(
    outage: Duration,
    seed: u64,
) -> (Vec<(tokio::time::Instant, tokio::time::Instant)>, usize) {
    let start = Duration::from_secs(1);
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        blackouts: vec![start..start + outage],
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig {
        seed,
        congestion: Congestion::Surelink,
        keep_alive: Some(Duration::from_secs(1)),
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let mut config = Config::default();
    config.sender.deadline = outage + Duration::from_secs(3);
    let (client, _client_messages) = Channel::open(client_conn, config.clone()).unwrap();
    let (_server, server_messages) = Channel::open(server_conn, config).unwrap();
    let _reader = reader(server_messages);
    // Payments from 0.5 s into the network's life until 1 s after the link returns.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let n = ((outage + Duration::from_millis(1500)).as_millis() / 5) as u32;
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::Instant::now();
            let outcome = client.send(payment(i)).await;
            (outcome, sent, tokio::time::Instant::now())
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (mut acked, mut failed) = (Vec::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            (Ok(_), sent, at) => acked.push((sent, at)),
            (Err(e), _, _) => {
                eprintln!("failed: {e}");
                failed += 1;
            }
        }
    }
    eprintln!("outage {outage:?}: {:?}", client.stats().sender);
    (acked, failed)
}

#[tokio::test(start_paused = true)]
async fn after_an_outage_every_payment_in_flight_is_acked_soon_after_the_link_returns() {
    // The sender probes a silent path every 100 ms, and quinn's window (full of packets
    // lost in the outage) lets the probes through; the first ack sends every block that
    // went into the outage again at once, as retransmissions, and the congestion
    // controller keeps its window from before the outage while they go (neither the
    // outage's losses nor BBR's first PROBE_RTT shrink it). Measured in virtual time (RTT
    // 40 ms): the last payment in flight acked 178 ms (2 s outage) and 245 ms (5 s: 1,000
    // payments to resend) after the link returned; 478 and 535 ms before the window was
    // kept and the resends counted as retransmissions, 0.6 s and 4.8 s before the probes.
    // Bound: 280 ms, RTT + 200 ms plus the second round trip the 5 s backlog (1,000
    // payments, more than the pre-outage window) needs.
    for (outage, seed) in [(Duration::from_secs(2), 3), (Duration::from_secs(5), 4)] {
        let t0 = tokio::time::Instant::now();
        let (acked, failed) = through_outage(outage, seed).await;
        assert_eq!(
            failed, 0,
            "no payment fails when its deadline outlasts the outage"
        );
        let back = t0 + Duration::from_secs(1) + outage;
        // The payments in flight when the link returned: sent before it, acked after.
        let last = acked
            .iter()
            .filter(|(sent, _)| *sent < back)
            .map(|&(_, at)| at)
            .max()
            .unwrap();
        eprintln!(
            "outage {outage:?}: last ack {:?} after the link returned",
            last.saturating_duration_since(back)
        );
        assert!(
            last <= back + Duration::from_millis(280),
            "last ack {:?} after the link returned",
            last.saturating_duration_since(back)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn stats_tell_bursty_loss_from_independent_loss() {
    // The same mean loss (5% each way) independent, and in bursts of 4 packets on average.
    // The dispersion of the loss (variance over mean of datagrams lost per group of 32) is
    // about 1 under independent loss and about 2L - 1 for bursts of mean length L (see
    // `Sender::loss_dispersion`). The burstiness figure, which compares block first flights
    // that missed with the binomial model, says little once small messages travel whole as
    // window sources (protocol 2: measured 1.3-1.4 for both here), so it is not the figure
    // checked. The line between them is 3.
    for seed in 21..25 {
        let mut figures = Vec::new();
        for loss in [
            Loss::Bernoulli(0.05),
            Loss::GilbertElliott(GilbertElliott::from_mean(0.05, 4.0)),
        ] {
            let link = LinkConfig {
                loss,
                delay: Duration::from_millis(20),
                ..LinkConfig::default()
            };
            let dispersion = paced_run(link, seed, 1500).await.0.loss_dispersion;
            figures.push(dispersion.expect("measured"));
        }
        eprintln!(
            "seed {seed} dispersion: independent {:.2}, bursts {:.2}",
            figures[0], figures[1]
        );
        assert!(
            figures[0] < 3.0,
            "independent loss read as bursty: {figures:?}"
        );
        assert!(
            figures[1] > 3.0,
            "bursty loss read as independent: {figures:?}"
        );
    }
}

/// 200 payments a second over a fresh pair on `link`, `n` of them, every one acked: the
/// client's stats and the client-to-server link's counters after.
async fn paced_run(
    link: LinkConfig,
    seed: u64,
    n: u32,
) -> (surelink::channel::ChannelStats, surelink::sim::LinkStats) {
    let Ends {
        pair,
        client,
        server_messages,
        ..
    } = ends(link, seed).await;
    let _reader = reader(server_messages);
    let mut tasks = Vec::new();
    for i in 0..n {
        let client = client.clone();
        tasks.push(tokio::spawn(async move { client.send(payment(i)).await }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap().expect("every payment acked");
    }
    (client.stats(), pair.up())
}

#[tokio::test(start_paused = true)]
async fn a_bottleneck_gets_data_not_parity_that_would_overflow_it() {
    // 1,000 kbit/s each way through a 50 ms drop-tail queue, no other loss; 200 payments
    // of 512 B a second are about 92% of it with one shard each and their headers, so
    // there is no room for redundancy. Drops here are the queue overflowing, which a
    // sender reading them as path loss answers with more parity (measured before the
    // queueing governor: 13 shards a payment, 8.6x what the link carried offered to it,
    // payments failing). Each payment must be acked, and the sender may offer the link at
    // most 1.2 times what it carries (measured 1.03-1.04 in the sweep).
    let bytes_per_sec = 125_000;
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        rate: Some(RateLimit {
            bytes_per_sec,
            queue_bytes: bytes_per_sec as usize / 20,
        }),
        ..LinkConfig::default()
    };
    for seed in [31, 32] {
        let (st, up) = paced_run(link.clone(), seed, 1000).await;
        let offered = up.offered_bytes as f64 / up.delivered_bytes as f64;
        eprintln!(
            "seed {seed}: offered/carried {offered:.3}, queue drops {}, queueing {:?}, cap {:.2}, \
             shed {}, data shards {}, parity {}",
            up.dropped_queue,
            st.queueing_delay,
            st.redundancy_cap,
            st.sender.shed_congested,
            st.sender.data_shards,
            st.sender.repair_shards
        );
        assert!(
            offered <= 1.2,
            "offered {offered:.2}x what the link carried"
        );
        // The loss the queue causes asked for up to 12 parity shards a payment before; now
        // the queueing delay keeps parity to a fraction of the data shards.
        assert!(
            st.sender.repair_shards * 2 < st.sender.data_shards,
            "parity {} for {} data shards",
            st.sender.repair_shards,
            st.sender.data_shards
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_lossy_path_that_jitters_keeps_its_parity() {
    // 10% loss each way and up to 5 ms of jitter on 20 ms: no queue anywhere, so the
    // queueing governor must leave the parity the loss needs (the case surelink is for).
    // Its target here is 10 ms (a quarter of the 40 ms round trip); quinn's smoothed round
    // trip moves far less than the jitter. Measured: 0.8 parity shards per data shard
    // (3.3 data shards a payment), the cap at its ceiling (12), nothing shed; a governor
    // that took the jitter for a queue would shed the parity and cut the cap.
    let link = LinkConfig {
        loss: Loss::Bernoulli(0.1),
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        ..LinkConfig::default()
    };
    for seed in [41, 42] {
        let (st, _) = paced_run(link.clone(), seed, 1000).await;
        eprintln!(
            "seed {seed}: queueing {:?}, cap {:.2}, parity {} for {} data shards, shed {}",
            st.queueing_delay,
            st.redundancy_cap,
            st.sender.repair_shards,
            st.sender.data_shards,
            st.sender.shed_congested
        );
        assert!(st.redundancy_cap >= 1.0, "cap {}", st.redundancy_cap);
        assert!(
            st.sender.repair_shards * 2 >= st.sender.data_shards,
            "parity {} for {} data shards",
            st.sender.repair_shards,
            st.sender.data_shards
        );
    }
}

/// Issue 26 item 2: `{:?}` of a channel (and of the identity types) shows no secret: not the
/// channel id, which is a bearer token, nor a private key.
#[tokio::test(start_paused = true)]
async fn debug_output_shows_no_secrets() {
    let e = ends(LinkConfig::default(), 1).await;
    let id = e.client.id();
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    for shown in [format!("{:?}", e.client), format!("{:#?}", e.server)] {
        assert!(!shown.contains(&hex), "{shown}");
        assert!(!shown.contains(&format!("{id:?}")), "{shown}");
        assert!(!shown.contains(&format!("{:?}", &id[..4])), "{shown}");
        assert!(shown.contains("tag"), "{shown}");
    }
    let identity = surelink::channel::Identity::self_signed(["localhost"]).unwrap();
    let key = identity.key.secret_der().to_vec();
    let shown = format!("{identity:?}");
    let bytes = format!("{:?}", &key[key.len() - 8..]);
    assert!(
        !shown.contains(&bytes[1..bytes.len() - 1]),
        "the private key is printed: {shown}"
    );
}

/// Issue 26, item 3: `stats()` read once a send returned counts that send (before, the
/// stats were published after the outcomes went out: `acked = 5, in_flight = 1` after six
/// acked sends, while the metric said 6).
/// On a multi-threaded runtime, where the caller wakes on another thread while the driver
/// goes on (the failure needs that: a current-thread runtime runs the caller only after the
/// driver yielded, stats published).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_read_after_a_send_returned_count_it() {
    let link = LinkConfig {
        delay: Duration::from_millis(1),
        ..LinkConfig::default()
    };
    let e = ends(link, 3).await;
    let _reader = drain(e.server_messages);
    for i in 1..=300u64 {
        e.client.send(payment(i as u32)).await.expect("acked");
        let stats = e.client.stats();
        assert_eq!(stats.sender.acked, i, "after send {i}");
        assert_eq!(stats.in_flight, 0, "after send {i}");
    }
}
