//! Real quinn endpoints over the in-memory simulator, in virtual time.

use std::time::{Duration, Instant};

use surelink::sim::{Congestion, GilbertElliott, LinkConfig, Loss, Pair, PairConfig};

const DELAY: Duration = Duration::from_millis(20);

/// Echoes every bi-stream on the server side.
fn spawn_echo(server: quinn::Connection) {
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = server.accept_bi().await {
            tokio::spawn(async move {
                if let Ok(data) = recv.read_to_end(1 << 20).await {
                    let _ = send.write_all(&data).await;
                    let _ = send.finish();
                }
            });
        }
    });
}

async fn echo(client: &quinn::Connection, data: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = client.open_bi().await.expect("open stream");
    send.write_all(data).await.expect("write");
    send.finish().expect("finish");
    recv.read_to_end(1 << 20).await.expect("read echo")
}

#[tokio::test(start_paused = true)]
async fn handshake_and_data_at_0_10_30_percent_loss() {
    for (i, p) in [0.0, 0.1, 0.3].into_iter().enumerate() {
        let pair = Pair::new(PairConfig {
            seed: 100 + i as u64,
            ..PairConfig::symmetric(LinkConfig::lossy(DELAY, p))
        })
        .unwrap();
        let (client, server) = pair.connect().await.expect("handshake");
        spawn_echo(server);
        // 20 request/response exchanges of 512 B, then one large one.
        for n in 0..20u8 {
            let msg = vec![n; 512];
            assert_eq!(echo(&client, &msg).await, msg, "loss {p}");
        }
        // 64 KiB, or 16 KiB at 30% loss (a long transfer there mostly measures quinn's backoff).
        let len = if p < 0.3 { 65_536u32 } else { 16_384 };
        let big: Vec<u8> = (0..len).map(|i| i as u8).collect();
        assert_eq!(echo(&client, &big).await, big, "loss {p}");

        let (up, down) = (pair.up(), pair.down());
        assert!(up.offered_packets > 40 && down.offered_packets > 40);
        // The realized loss is the configured one (loosely: hundreds of packets).
        let realized = (up.dropped() + down.dropped()) as f64
            / (up.offered_packets + down.offered_packets) as f64;
        let n = (up.offered_packets + down.offered_packets) as f64;
        assert!(
            (realized - p).abs() <= 5.0 * (p * (1.0 - p) / n).sqrt() + 1e-9,
            "configured {p}, realized {realized} over {n} packets"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn datagrams_cross_and_some_are_lost() {
    let pair = Pair::new(PairConfig {
        seed: 7,
        ..PairConfig::symmetric(LinkConfig::lossy(DELAY, 0.2))
    })
    .unwrap();
    let (client, server) = pair.connect().await.unwrap();
    let sent = 500;
    for i in 0..sent {
        client.send_datagram(vec![i as u8; 200].into()).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut received = 0;
    while let Ok(Ok(d)) =
        tokio::time::timeout(Duration::from_millis(200), server.read_datagram()).await
    {
        assert_eq!(d.len(), 200);
        received += 1;
    }
    // Datagrams are never retransmitted: some are lost, most arrive.
    assert!(received < sent, "{received} of {sent}");
    assert!(received > sent / 2, "{received} of {sent}");
}

#[tokio::test(start_paused = true)]
async fn corrupted_packets_are_rejected_by_quic() {
    let link = LinkConfig {
        delay: DELAY,
        corrupt: 0.2,
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig::symmetric(link)).unwrap();
    let (client, server) = pair.connect().await.unwrap();
    spawn_echo(server);
    for n in 0..20u8 {
        let msg = vec![n; 2000];
        // Every byte intact: QUIC's packet protection dropped every corrupted packet, and loss
        // recovery resent what they carried.
        assert_eq!(echo(&client, &msg).await, msg);
    }
    assert!(pair.up().corrupted + pair.down().corrupted > 10);
}

#[tokio::test(start_paused = true)]
async fn blackout_stalls_then_recovers() {
    let link = LinkConfig {
        delay: DELAY,
        blackouts: vec![Duration::from_secs(1)..Duration::from_secs(3)],
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig::symmetric(link)).unwrap();
    let (client, server) = pair.connect().await.unwrap();
    spawn_echo(server);
    tokio::time::sleep_until(tokio::time::Instant::now() + Duration::from_millis(1500)).await;
    let start = tokio::time::Instant::now();
    assert_eq!(echo(&client, b"during").await, b"during");
    // Sent at 1.5 s, inside the blackout: the answer comes only after it ends at 3 s.
    assert!(
        start.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        start.elapsed()
    );
    assert!(pair.up().dropped_blackout + pair.down().dropped_blackout > 0);
}

#[tokio::test(start_paused = true)]
async fn virtual_time_runs_faster_than_real_time() {
    // 2,000 request/responses at 200 per second, 40 ms RTT, Gilbert-Elliott loss: 10 s of
    // simulated time.
    let link = LinkConfig {
        delay: DELAY,
        loss: Loss::GilbertElliott(GilbertElliott::from_mean(0.05, 2.0)),
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig {
        congestion: Congestion::Bbr,
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client, server) = pair.connect().await.unwrap();
    spawn_echo(server);
    let wall = Instant::now();
    let virtual_start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..2000u32 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let msg = i.to_be_bytes().repeat(128);
            assert_eq!(echo(&client, &msg).await, msg);
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let simulated = virtual_start.elapsed();
    let real = wall.elapsed();
    assert!(simulated >= Duration::from_secs(10), "{simulated:?}");
    // Not a speed assertion on the machine: virtual time must not track wall time.
    assert!(
        real < simulated / 2,
        "real {real:?} for simulated {simulated:?}"
    );
    eprintln!("2000 exchanges: {simulated:?} simulated in {real:?} of wall time");
}

/// The real-UDP transport, in real time on loopback: same link model, real sockets.
#[tokio::test]
async fn loopback_udp_with_loss_and_delay() {
    let pair = Pair::over_loopback(PairConfig {
        seed: 3,
        ..PairConfig::symmetric(LinkConfig::lossy(Duration::from_millis(5), 0.1))
    })
    .unwrap();
    let (client, server) = pair.connect().await.expect("handshake over loopback");
    spawn_echo(server);
    for n in 0..30u8 {
        let msg = vec![n; 1500];
        assert_eq!(echo(&client, &msg).await, msg);
    }
    let (up, down) = (pair.up(), pair.down());
    assert!(up.dropped_loss + down.dropped_loss > 0, "{up:?} {down:?}");
    assert!(pair.net.is_none());
}
