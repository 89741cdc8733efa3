//! Real quinn endpoints over the in-memory simulator, in virtual time.

use std::collections::HashSet;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::process::Command;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

mod common;
use common::example;

use quinn::udp::{RecvMeta, Transmit};
use quinn::AsyncUdpSocket;
use surelink::sim::{
    Congestion, Fades, GilbertElliott, LinkConfig, Loss, Pair, PairConfig, SimNetwork,
};

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

/// Sends one numbered 64-byte packet every `spacing` for `secs` seconds from `a` to `b` on a
/// fresh network seeded with `seed`, whose `a → b` link has `link`; returns, per packet,
/// whether it was lost, and the link's counters.
async fn numbered_packets(
    seed: u64,
    link: LinkConfig,
    spacing: Duration,
    secs: u64,
) -> (Vec<bool>, surelink::sim::LinkStats) {
    let (a, b): (SocketAddr, SocketAddr) = (
        "10.0.0.1:1000".parse().unwrap(),
        "10.0.0.2:2000".parse().unwrap(),
    );
    let net = SimNetwork::new(seed);
    // The links' start (fades are measured from it) is now.
    let t0 = tokio::time::Instant::now();
    net.set_link(a, b, link);
    let (sa, sb) = (net.bind(a).unwrap(), net.bind(b).unwrap());
    let n = (Duration::from_secs(secs).as_nanos() / spacing.as_nanos()) as u32;
    for i in 0..n {
        let at = t0 + spacing * i;
        tokio::time::sleep_until(at).await;
        assert_eq!(tokio::time::Instant::now(), at, "packet {i} sent late");
        let mut data = [0u8; 64];
        data[..4].copy_from_slice(&i.to_le_bytes());
        let transmit = Transmit {
            destination: b,
            ecn: None,
            contents: &data,
            segment_size: None,
            src_ip: None,
        };
        sa.try_send(&transmit).unwrap();
    }
    // Everything still in flight lands, then the receiver drains its inbox.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut received = HashSet::new();
    let mut cx = Context::from_waker(Waker::noop());
    let mut bufs = vec![[0u8; 64]; 32];
    loop {
        let mut slices: Vec<IoSliceMut> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); 32];
        match sb.poll_recv(&mut cx, &mut slices, &mut meta) {
            Poll::Ready(Ok(k)) => {
                for (m, buf) in meta.iter().zip(&bufs).take(k) {
                    assert_eq!(m.len, 64);
                    let i = u32::from_le_bytes(buf[..4].try_into().unwrap());
                    assert!(received.insert(i), "packet {i} twice");
                }
            }
            Poll::Ready(Err(e)) => panic!("{e}"),
            Poll::Pending => break,
        }
    }
    let lost = (0..n).map(|i| !received.contains(&i)).collect();
    (lost, net.link_stats(a, b))
}

/// Time-based fades over the in-memory network: every packet sent in a fade is dropped and
/// counted as such, the share of packets lost is the share of time in a fade, a lost run
/// lasts as long as a fade (in time), and the fades are the same whether the sender sends a
/// packet every millisecond or ten times fewer.
#[tokio::test(start_paused = true)]
async fn fades_over_the_in_memory_network_take_spans_of_time() {
    let fades = Fades::new(2.0, Duration::from_millis(20));
    let link = LinkConfig {
        delay: DELAY,
        fades: Some(fades),
        ..LinkConfig::default()
    };
    let secs = 60;
    let (dense, dense_stats) =
        numbered_packets(5, link.clone(), Duration::from_millis(1), secs).await;
    let (sparse, sparse_stats) = numbered_packets(5, link, Duration::from_millis(10), secs).await;

    // The network lost exactly what the link's fades dropped, nothing else.
    for (lost, st) in [(&dense, dense_stats), (&sparse, sparse_stats)] {
        let n_lost = lost.iter().filter(|&&l| l).count() as u64;
        assert_eq!(st.offered_packets, lost.len() as u64);
        assert_eq!(st.dropped_fade, n_lost, "{st:?}");
        assert_eq!(st.dropped(), n_lost, "{st:?}");
        assert!(n_lost > 0);
    }
    // The same fades at the times both sent a packet.
    for (k, &lost) in sparse.iter().enumerate() {
        assert_eq!(lost, dense[10 * k], "at {} ms", 10 * k);
    }

    // The share of packets lost estimates the share of time in a fade, π = λm/(1+λm). As a
    // two-state chain with rates λ and μ = 1/m, the share over T seconds has standard
    // deviation √(2π(1-π)/((λ+μ)T)).
    let pi = fades.time_share();
    let share = dense.iter().filter(|&&l| l).count() as f64 / dense.len() as f64;
    let sigma = (2.0 * pi * (1.0 - pi) / ((2.0 + 50.0) * secs as f64)).sqrt();
    assert!(
        (share - pi).abs() <= 5.0 * sigma,
        "lost {share}, expected {pi} ± 5·{sigma}"
    );

    // Runs of lost packets a millisecond apart last as long as the fades: exponential with
    // mean 20 ms, so the mean of r runs has standard error 20/√r ms (plus up to a packet's
    // spacing of rounding).
    let mut runs = Vec::new();
    let mut len = 0;
    for &l in dense.iter().chain([false].iter()) {
        if l {
            len += 1;
        } else if len > 0 {
            runs.push(len as f64);
            len = 0;
        }
    }
    let mean_ms = runs.iter().sum::<f64>() / runs.len() as f64;
    let se = 20.0 / (runs.len() as f64).sqrt();
    assert!(
        (mean_ms - 20.0).abs() <= 5.0 * se + 1.0,
        "{} runs of mean {mean_ms} ms",
        runs.len()
    );
}

/// QUIC over fades both ways with 1% random loss on top: every exchange completes, and both
/// causes of loss are counted apart.
#[tokio::test(start_paused = true)]
async fn quic_crosses_fades_with_random_loss() {
    let link = LinkConfig {
        fades: Some(Fades::new(5.0, Duration::from_millis(30))),
        ..LinkConfig::lossy(DELAY, 0.01)
    };
    let pair = Pair::new(PairConfig {
        seed: 11,
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client, server) = pair.connect().await.expect("handshake");
    spawn_echo(server);
    for n in 0..150u8 {
        let msg = vec![n; 700];
        assert_eq!(echo(&client, &msg).await, msg);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (up, down) = (pair.up(), pair.down());
    assert!(
        up.dropped_fade > 0 && down.dropped_fade > 0,
        "{up:?} {down:?}"
    );
    assert!(up.dropped_loss + down.dropped_loss > 0, "{up:?} {down:?}");
    assert_eq!(up.dropped_blackout + up.dropped_queue, 0);
}

/// `loss_sweep`'s fades and bottleneck-change flags: a bad value is refused before anything
/// runs, with exit status 2 and a message naming it, never a panic.
#[test]
fn loss_sweep_refuses_bad_fades_and_bottleneck_changes() {
    let cases: &[(&[&str], &str)] = &[
        (&["--fades", "0,20"], "must be more than 0"),
        (&["--fades", "2"], "expected RATE_PER_S,MEAN_MS"),
        (&["--fades", "2,abc"], "is not a number"),
        (&["--fades", "2,-5"], "mean fade of -5 ms"),
        (&["--fades", "inf,20"], "fades per second"),
        (&["--fades", "2,20", "--fades-loss", "1"], "--fades-loss 1"),
        (
            &["--bottleneck-change", "5,1000"],
            "needs --bottleneck-kbps",
        ),
        (
            &["--bottleneck-kbps", "2000", "--bottleneck-change", "5"],
            "expected AT_S,KBPS",
        ),
        (
            &["--bottleneck-kbps", "2000", "--bottleneck-change", "5,0"],
            "0 kbit/s",
        ),
        (
            &["--bottleneck-kbps", "2000", "--bottleneck-change=-1,1000"],
            "not a time",
        ),
    ];
    let help = Command::new(example("loss_sweep"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--fades"),
        "{} predates --fades: rebuild it (`cargo build --examples`, or the whole `cargo test`)",
        example("loss_sweep").display()
    );
    for (args, expected) in cases {
        let out = Command::new(example("loss_sweep"))
            .args(["--loss", "--ge-loss", "--messages", "10"])
            .args(*args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} ran");
    }
}
