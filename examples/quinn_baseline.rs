//! Stock quinn on the simulator: request/response latency over plain QUIC streams, the
//! baseline surelink is measured against.
//!
//! `cargo run --release --example quinn_baseline` (add `-- --help` for the flags).
//!
//! Each message is a request on its own bi-stream; the server echoes it; latency is from
//! opening the stream to reading the whole response, in the simulator's virtual time (so it
//! is network and protocol time: CPU time is not counted). Bernoulli loss both ways.

use std::time::Duration;

use clap::Parser;
use surelink::sim::{Congestion, LinkConfig, Pair, PairConfig};

#[derive(Parser)]
#[command(about = "quinn streams on the simulator: latency percentiles per loss rate")]
struct Args {
    /// Loss rates (each way), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,0.05,0.1,0.2")]
    loss: Vec<f64>,
    /// Messages per run.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Messages per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Message size in bytes.
    #[arg(long, default_value_t = 512)]
    size: usize,
    /// One-way delay in milliseconds.
    #[arg(long, default_value_t = 20)]
    delay_ms: u64,
    /// Seed of the simulated links.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

async fn run(args: &Args, loss: f64, congestion: Congestion) -> Vec<Duration> {
    let pair = Pair::new(PairConfig {
        seed: args.seed,
        congestion,
        ..PairConfig::symmetric(LinkConfig::lossy(
            Duration::from_millis(args.delay_ms),
            loss,
        ))
    })
    .expect("endpoints");
    let (client, server) = pair.connect().await.expect("handshake");
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
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let mut tasks = Vec::with_capacity(args.messages);
    let start = tokio::time::Instant::now();
    for i in 0..args.messages {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let client = client.clone();
        let size = args.size;
        tasks.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let (mut send, mut recv) = client.open_bi().await.ok()?;
            send.write_all(&vec![i as u8; size]).await.ok()?;
            send.finish().ok()?;
            let echo = recv.read_to_end(1 << 20).await.ok()?;
            (echo.len() == size).then(|| t0.elapsed())
        }));
    }
    let mut latencies = Vec::with_capacity(args.messages);
    for t in tasks {
        if let Ok(Some(l)) = t.await {
            latencies.push(l);
        }
    }
    latencies.sort();
    latencies
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let args = Args::parse();
    println!(
        "quinn streams, {} × {} B request/response at {}/s, {} ms each way, Bernoulli loss both ways, seed {}",
        args.messages, args.size, args.rate, args.delay_ms, args.seed
    );
    println!(
        "{:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "cc", "loss", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "done"
    );
    for &loss in &args.loss {
        for (name, cc) in [("cubic", Congestion::Cubic), ("bbr", Congestion::Bbr)] {
            let wall = std::time::Instant::now();
            let l = run(&args, loss, cc).await;
            let ms = |q| percentile(&l, q).as_secs_f64() * 1000.0;
            println!(
                "{:>6} {:>5.1}% {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>7}   ({:.1} s wall)",
                name,
                loss * 100.0,
                ms(0.5),
                ms(0.9),
                ms(0.99),
                ms(0.999),
                ms(1.0),
                l.len(),
                wall.elapsed().as_secs_f64()
            );
        }
    }
}
