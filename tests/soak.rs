//! Soak: many payments at 10% loss each way over real quinn on the simulator, in virtual
//! time. Every payment is keyed; a send that fails (outcome unknown) is retried with the
//! same key, as a payment application does. At the end every payment was acked and
//! delivered exactly once, and memory stayed flat: peak RSS (`VmHWM`) is reported at a
//! tenth of the run and at its end, and the channel's memory gauges stay under their caps.
//!
//! `cargo test --release --test soak` runs a 20,000-payment smoke version; the full
//! 1,000,000 is `cargo test --release --test soak -- --ignored` (about 2,000 payments per
//! virtual second; `SURELINK_SOAK_MESSAGES=N` changes the count).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::payment;
use surelink::channel::{Channel, Config, SendError};
use surelink::sim::{Congestion, LinkConfig, Loss, Pair, PairConfig};

/// Peak resident set size so far, in KiB (Linux `VmHWM`), if known.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Report {
    retries: u64,
    peak_at_tenth: Option<u64>,
    peak_at_end: Option<u64>,
}

async fn soak(n: u32, seed: u64) -> Report {
    let link = LinkConfig {
        delay: Duration::from_millis(20),
        loss: Loss::Bernoulli(0.10),
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig {
        seed,
        congestion: Congestion::Bbr,
        ..PairConfig::symmetric(link)
    })
    .unwrap();
    let (client_conn, server_conn) = pair.connect().await.unwrap();
    let (client, _client_messages) = Channel::open(client_conn, Config::default()).unwrap();
    let (server, mut messages) = Channel::open(server_conn, Config::default()).unwrap();

    // Deliveries: one bit per payment, and a duplicate counter.
    let receiving = tokio::spawn(async move {
        let mut seen = vec![0u64; (n as usize).div_ceil(64)];
        let (mut delivered, mut duplicates) = (0u32, 0u32);
        while delivered < n {
            let Some(m) = messages.recv().await else {
                break;
            };
            let i = common::number(&m.payload);
            let (word, bit) = (i as usize / 64, 1u64 << (i % 64));
            if seen[word] & bit != 0 {
                duplicates += 1;
            } else {
                seen[word] |= bit;
                delivered += 1;
            }
        }
        (delivered, duplicates, messages)
    });

    let acked = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let every = Duration::from_micros(500);
    let start = tokio::time::Instant::now();
    let mut peak_at_tenth = None;
    for i in 0..n {
        tokio::time::sleep_until(start + every * i).await;
        if i > 0 && i % (n / 10).max(1) == 0 {
            if i == n / 10 {
                peak_at_tenth = peak_rss_kib();
            }
            eprintln!(
                "{i} sent: peak RSS {:?} KiB, RSS {:?} KiB",
                peak_rss_kib(),
                rss_kib()
            );
        }
        // Send waits while max_in_flight messages are out: the loop is paced by the channel.
        let (c, acked, retries) = (client.clone(), acked.clone(), retries.clone());
        tokio::spawn(async move {
            let key = format!("payment-{i}");
            loop {
                match c.send_with_key(key.clone(), payment(i)).await {
                    Ok(_) => break,
                    Err(e) => {
                        // Outcome unknown: retry with the same key.
                        assert!(matches!(e, SendError::Timeout { .. }), "payment {i}: {e}");
                        retries.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            acked.fetch_add(1, Ordering::Relaxed);
        });
    }
    while acked.load(Ordering::Relaxed) < u64::from(n) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            start.elapsed() < every * n + Duration::from_secs(120),
            "{} of {n} acked two minutes after the last send",
            acked.load(Ordering::Relaxed)
        );
    }
    let (delivered, duplicates, _messages) =
        tokio::time::timeout(Duration::from_secs(10), receiving)
            .await
            .expect("every acked payment was delivered")
            .unwrap();
    let peak_at_end = peak_rss_kib();
    let (c, s) = (client.stats(), server.stats());
    eprintln!(
        "{n} payments: delivered {delivered}, duplicates {duplicates}, retries {}, \
         peak RSS {peak_at_end:?} KiB (RSS {:?} KiB), {:.1} s virtual",
        retries.load(Ordering::Relaxed),
        rss_kib(),
        start.elapsed().as_secs_f64()
    );
    eprintln!(
        "client: loss estimate {:.3}, data {} repair {} hedges {} acked {} failed {}",
        c.loss_estimate,
        c.sender.data_shards,
        c.sender.repair_shards,
        c.sender.hedges_fired,
        c.sender.acked,
        c.sender.failed
    );
    eprintln!("server: {:?}\n        {:?}", s.receiver, s.reassembly);
    assert_eq!(delivered, n, "zero lost");
    assert_eq!(duplicates, 0, "zero duplicated");
    assert_eq!(s.receiver.delivered, u64::from(n));
    // Memory that grows with the run is bounded by the caps, not by the run.
    let caps = Config::default();
    assert!(s.receiver.ids_tracked as u64 <= caps.receiver.dedupe_window);
    assert!(s.receiver.keys_held <= caps.receiver.max_keys);
    assert!(s.reassembly.blocks_remembered <= caps.receiver.reassembler.completed_memory);
    assert!(s.reassembly.blocks_buffered <= caps.receiver.reassembler.max_blocks);
    assert_eq!(c.in_flight, 0);
    Report {
        retries: retries.load(Ordering::Relaxed),
        peak_at_tenth,
        peak_at_end,
    }
}

#[tokio::test(start_paused = true)]
async fn soak_smoke() {
    let r = soak(20_000, 1).await;
    eprintln!(
        "retries {}, peak RSS {:?} → {:?} KiB",
        r.retries, r.peak_at_tenth, r.peak_at_end
    );
}

#[tokio::test(start_paused = true)]
#[ignore = "long: a million payments (run with --ignored, in release)"]
async fn soak_a_million_payments_at_ten_percent_loss() {
    let n = std::env::var("SURELINK_SOAK_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let r = soak(n, 2).await;
    eprintln!(
        "retries {}, peak RSS at {} payments {:?} KiB, at {n} {:?} KiB",
        r.retries,
        n / 10,
        r.peak_at_tenth,
        r.peak_at_end
    );
    // Flat: whatever grew after the first tenth is less than 40 bytes per payment (a leak of
    // one small allocation per payment would pass it). Measured: 62 MB → 76 MB at 1M, one
    // step between 600k and 800k, and 76 MB still at 2M.
    if let (Some(tenth), Some(end)) = (r.peak_at_tenth, r.peak_at_end) {
        let grown = end.saturating_sub(tenth) * 1024;
        assert!(
            grown < 40 * u64::from(n - n / 10),
            "peak RSS grew {grown} bytes after the first tenth"
        );
    }
}
