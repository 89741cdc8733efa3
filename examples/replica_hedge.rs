//! Hedging across replicas, measured: two replicas sharing a claims store on the simulator;
//! from `--degrade-at` seconds on, the primary's path loses `--loss` of its packets each way
//! while the standby's stays at `--base-loss`. The channel stays on the primary (switching
//! off), and its hedges go where `hedge_to` says: `same` (repair shards to the primary, the
//! default), `other` (a whole copy to the standby) or `both`. Every mode runs on the same
//! seeds in the same process; latencies are pooled over the seeds.
//!
//! ```text
//! cargo run --release --example replica_hedge
//! cargo run --release --example replica_hedge -- --loss 0.3 --seeds 5 --messages 1000
//! ```
//!
//! Prints a table, or with `--json` one line per mode:
//! `{"hedge_to":"both","runs":5,"acked":..,"p50_ms":..,"p99_ms":..,"p999_ms":..,"max_ms":..,
//! "copies":..,"p99_vs_same":..,"max_vs_same":..}`. Runs in virtual time.

use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use surelink::channel::{Channel, Config, Listener};
use surelink::proto::HedgeTo;
use surelink::sim::{Congestion, LinkConfig, Loss, Pair, PairConfig, SERVER_NAME};
use surelink::store::MemoryStore;

#[derive(Parser)]
#[command(about = "surelink: hedging to a standby replica when the primary's path degrades")]
struct Args {
    /// Loss of the degraded primary path, each way.
    #[arg(long, default_value_t = 0.3)]
    loss: f64,
    /// Loss of every path before (and of the standby's throughout), each way.
    #[arg(long, default_value_t = 0.05)]
    base_loss: f64,
    /// One-way delay in milliseconds.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// When the primary's path degrades, in seconds.
    #[arg(long, default_value_t = 1.0)]
    degrade_at: f64,
    /// Payments per run (at 200/s).
    #[arg(long, default_value_t = 600)]
    messages: u32,
    /// Runs per mode (seeds 1..=N).
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// One JSON object per mode instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    Same,
    Other,
    Both,
}

impl Mode {
    fn hedge_to(self) -> HedgeTo {
        match self {
            Mode::Same => HedgeTo::Same,
            Mode::Other => HedgeTo::Other,
            Mode::Both => HedgeTo::Both,
        }
    }
}

fn link(delay: Duration, loss: f64) -> LinkConfig {
    LinkConfig {
        delay,
        loss: Loss::Bernoulli(loss),
        ..LinkConfig::default()
    }
}

/// One run: latencies of acked payments, payments not acked, copies sent to the standby.
async fn run(args: &Args, mode: Mode, seed: u64) -> (Vec<Duration>, usize, u64) {
    let delay = Duration::from_millis(args.delay_ms);
    let base = link(delay, args.base_loss);
    let pair = Pair::new(PairConfig {
        seed,
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(50),
        keep_alive: Some(Duration::from_millis(300)),
        ..PairConfig::symmetric(base.clone())
    })
    .expect("simulated pair");
    let net = pair.net.clone().expect("simulated network");
    let client_addr = pair.client.local_addr().expect("bound");
    let standby: std::net::SocketAddr = ([10, 0, 9, 1], 4433).into();
    net.set_link(client_addr, standby, base.clone());
    net.set_link(standby, client_addr, base);
    let store = Arc::new(MemoryStore::default());
    let mut server_config = Config::default();
    server_config.store = Some(store);
    let standby_endpoint =
        Pair::server_endpoint(&net, standby, pair.server_config.clone()).expect("standby endpoint");
    let mut servers = Vec::new();
    for endpoint in [pair.server.clone(), standby_endpoint] {
        let mut listener = Listener::new(endpoint, server_config.clone());
        servers.push(tokio::spawn(async move {
            // Each replica's application takes whatever its channels deliver.
            while let Some((_channel, mut messages)) = listener.accept().await {
                tokio::spawn(async move { while messages.recv().await.is_some() {} });
            }
        }));
    }
    let mut config = Config::default();
    config.sender.hedge_to = mode.hedge_to();
    config.switch_ratio = 0.0;
    let (client, _replies) = Channel::connect_replicas(
        &pair.client,
        &[pair.server_addr, standby],
        SERVER_NAME,
        None,
        config,
    )
    .await
    .expect("connected");
    let start = tokio::time::Instant::now();
    let degrade = start + Duration::from_secs_f64(args.degrade_at);
    let mut tasks = Vec::new();
    let mut degraded = false;
    for i in 0..args.messages {
        tokio::time::sleep_until(start + Duration::from_millis(5) * i).await;
        if !degraded && tokio::time::Instant::now() >= degrade {
            let bad = link(delay, args.loss);
            net.set_link(client_addr, pair.server_addr, bad.clone());
            net.set_link(pair.server_addr, client_addr, bad);
            degraded = true;
        }
        let c = client.clone();
        let payment = bytes::Bytes::from(format!("payment {i}"));
        tasks.push(tokio::spawn(async move { c.send(payment).await }));
    }
    let (mut latencies, mut failed) = (Vec::new(), 0);
    for t in tasks {
        match t.await.expect("send task") {
            Ok(receipt) => latencies.push(receipt.latency),
            Err(_) => failed += 1,
        }
    }
    let copies = client.stats().sender.hedges_to_secondary;
    client.close().await;
    for s in servers {
        s.abort();
    }
    (latencies, failed, copies)
}

fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let args = Args::parse();
    let mut rows = Vec::new();
    for mode in [Mode::Same, Mode::Other, Mode::Both] {
        let (mut all, mut failed, mut copies) = (Vec::new(), 0, 0);
        for seed in 1..=args.seeds {
            let (l, f, c) = run(&args, mode, seed).await;
            all.extend(l);
            failed += f;
            copies += c;
        }
        all.sort();
        rows.push((mode, all, failed, copies));
    }
    let (same_p99, same_max) = {
        let same = &rows[0].1;
        (quantile_ms(same, 0.99), quantile_ms(same, 1.0))
    };
    if !args.json {
        println!(
            "primary path at {:.0}% loss from {} s (standby {:.0}%), {} payments × {} seeds",
            args.loss * 100.0,
            args.degrade_at,
            args.base_loss * 100.0,
            args.messages,
            args.seeds
        );
        println!("hedge_to  acked   p50 ms  p99 ms  p99.9 ms  max ms  copies  p99/same  max/same");
    }
    for (mode, l, failed, copies) in &rows {
        let (p50, p99, p999, max) = (
            quantile_ms(l, 0.5),
            quantile_ms(l, 0.99),
            quantile_ms(l, 0.999),
            quantile_ms(l, 1.0),
        );
        let name = format!("{mode:?}").to_lowercase();
        if args.json {
            println!(
                "{{\"hedge_to\":\"{name}\",\"runs\":{},\"acked\":{},\"failed\":{failed},\"p50_ms\":{p50:.3},\"p99_ms\":{p99:.3},\"p999_ms\":{p999:.3},\"max_ms\":{max:.3},\"copies\":{copies},\"p99_vs_same\":{:.3},\"max_vs_same\":{:.3}}}",
                args.seeds,
                l.len(),
                p99 / same_p99,
                max / same_max
            );
        } else {
            println!(
                "{name:<8} {:>6} {p50:>8.1} {p99:>7.1} {p999:>9.1} {max:>7.1} {copies:>7} {:>9.2} {:>9.2}",
                l.len(),
                p99 / same_p99,
                max / same_max
            );
        }
    }
}
