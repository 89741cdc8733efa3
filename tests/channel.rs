//! The channel over real quinn connections on the simulator, in virtual time.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use surelink::channel::{Channel, Config, SendError};
use surelink::sim::{Congestion, GilbertElliott, LinkConfig, Loss, Pair, PairConfig};

fn payment(i: u32) -> Bytes {
    let mut p = format!("payment {i:08} ").into_bytes();
    p.resize(512, b'.');
    p.into()
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
        congestion: Congestion::Bbr,
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
        Loss::Bernoulli(0.1),
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
        let n = 1000;
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
    let (_server, _sm) = Channel::open(server_conn, Config::default()).unwrap();
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
