//! What a channel knows about its path and its work: `stats()` on both ends after a run of
//! payments over the simulator, and (with `--trace`) the `tracing` spans for connect, send
//! and deliver.
//!
//! ```text
//! cargo run --release --example channel_stats
//! cargo run --release --example channel_stats -- --loss 0.2 --messages 500
//! cargo run --release --example channel_stats -- --messages 3 --trace
//! ```
//!
//! A client connects to a [`Listener`] over simulated links (`--delay-ms` each way, `--loss`
//! each way, BBR), in virtual time, and sends `--messages` payments of `--size` bytes at
//! `--rate` per second. Then it prints both ends' [`ChannelStats`].

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use surelink::channel::{Channel, ChannelStats, Config, Listener};
use surelink::sim::{Congestion, LinkConfig, Loss, Pair, PairConfig, SERVER_NAME};

#[derive(Parser)]
#[command(about = "a channel's stats() and tracing spans after payments over the simulator")]
struct Args {
    /// Packet loss each way (Bernoulli).
    #[arg(long, default_value_t = 0.1)]
    loss: f64,
    /// Payments to send.
    #[arg(long, default_value_t = 1000)]
    messages: u32,
    /// Payments per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Payment size in bytes.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// One-way delay in milliseconds.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Seed of the simulated links.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print surelink's tracing spans and events (debug level) to stderr.
    #[arg(long)]
    trace: bool,
}

fn main() {
    let args = Args::parse();
    if args.trace {
        use tracing_subscriber::prelude::*;
        let only_surelink = tracing_subscriber::filter::Targets::new()
            .with_target("surelink", tracing::Level::TRACE);
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .with(only_surelink)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a tokio runtime");
    let (client, server) = runtime.block_on(run(&args));
    print("client (sender)", &client);
    print("server (receiver)", &server);
}

async fn run(args: &Args) -> (ChannelStats, ChannelStats) {
    let link = LinkConfig {
        delay: Duration::from_millis(args.delay_ms),
        loss: Loss::Bernoulli(args.loss),
        ..LinkConfig::default()
    };
    let pair = Pair::new(PairConfig {
        seed: args.seed,
        congestion: Congestion::Bbr,
        initial_rtt: Duration::from_millis(2 * args.delay_ms.max(5)),
        ..PairConfig::symmetric(link)
    })
    .expect("a simulated pair");
    let mut listener = Listener::new(pair.server.clone(), Config::default());
    let (client, _replies) = Channel::connect(
        &pair.client,
        pair.server_addr,
        SERVER_NAME,
        None,
        Config::default(),
    )
    .await
    .expect("connected");
    let (server, mut messages) = listener.accept().await.expect("a channel");
    let n = args.messages;
    let receiver = tokio::spawn(async move {
        let mut seen = HashSet::new();
        while seen.len() < n as usize {
            match tokio::time::timeout(Duration::from_secs(10), messages.recv()).await {
                Ok(Some(m)) => assert!(seen.insert(m.payload), "delivered twice"),
                _ => break,
            }
        }
        seen.len()
    });
    let every = Duration::from_secs_f64(1.0 / args.rate);
    let mut sends = Vec::new();
    for i in 0..n {
        let mut p = format!("payment {i:08} ").into_bytes();
        p.resize(args.size.max(p.len()), b'.');
        let c = client.clone();
        sends.push(tokio::spawn(async move { c.send(Bytes::from(p)).await }));
        tokio::time::sleep(every).await;
    }
    let mut acked = 0;
    for s in sends {
        acked += usize::from(s.await.expect("send task").is_ok());
    }
    let delivered = receiver.await.expect("receiver task");
    println!("{acked} of {n} payments acked, {delivered} delivered (each once)\n");
    (client.stats(), server.stats())
}

fn print(title: &str, s: &ChannelStats) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("== {title}");
    println!(
        "  path          loss estimate {:.2}% (observed {}), ack RTT p50 {:.1} ms, p95 {:.1} ms",
        100.0 * s.loss_estimate,
        s.loss_observed
            .map_or("n/a".into(), |l| format!("{:.2}%", 100.0 * l)),
        ms(s.rtt_p50),
        ms(s.rtt_p95),
    );
    println!(
        "  sent          {} messages: {} acked, {} failed; shards {} data + {} repair",
        s.sender.messages_sent,
        s.sender.acked,
        s.sender.failed,
        s.sender.data_shards,
        s.sender.repair_shards
    );
    println!(
        "  hedging       {} hedges fired, {} skipped (budget), {:.1}% of the hedge budget used, {} retransmits",
        s.sender.hedges_fired,
        s.sender.hedges_skipped,
        100.0 * s.hedge_budget_used,
        s.sender.retransmits
    );
    println!(
        "  received      {} delivered, {} blocks rebuilt from repair, {} duplicates suppressed, \
         {} duplicate keys, {} stale shards",
        s.receiver.delivered,
        s.reassembly.blocks_rebuilt,
        s.receiver.duplicates_suppressed,
        s.receiver.duplicate_keys,
        s.reassembly.shards_stale
    );
    let invalid: Vec<String> = s
        .invalid_frames
        .iter()
        .map(|(reason, n)| format!("{reason} {n}"))
        .collect();
    println!(
        "  invalid       {}",
        if invalid.is_empty() {
            "none".to_string()
        } else {
            invalid.join(", ")
        }
    );
    println!(
        "  wire          {} UDP bytes sent, {} received, {} reconnects\n",
        s.udp_bytes_sent, s.udp_bytes_received, s.reconnects
    );
}
