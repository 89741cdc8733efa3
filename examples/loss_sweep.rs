//! The loss sweep: surelink against plain quinn streams (stock Cubic, and BBR), on the
//! in-crate simulator, in the same run.
//!
//! ```text
//! cargo run --release --example loss_sweep
//! cargo run --release --example loss_sweep -- --loss 0,0.01,0.1 --messages 2000 --json
//! cargo run --release --example loss_sweep -- --plot sweep.svg
//! ```
//!
//! For each loss model (Bernoulli rates from `--loss`, plus one Gilbert-Elliott case unless
//! `--ge-loss 0`) and each transport, a client sends `--messages` payments of `--size` bytes at
//! `--rate` per second over a simulated link with `--delay-ms` each way and the same loss both
//! ways; the server answers each one:
//!
//! - `surelink`: a [`Channel`] on each end (BBR, adaptive redundancy); latency is from `send`
//!   to its receipt (the ack).
//! - `quinn-stream`, `quinn-stream-bbr`: one bi-stream per payment, the server answers `ok`;
//!   latency is from opening the stream to reading the answer. Stock quinn (Cubic) and quinn with
//!   BBR.
//!
//! Everything runs in the simulator's virtual time (tokio's paused clock), so latencies are
//! network and protocol time, and a 10 s run takes far less wall time. Wire bytes are every UDP
//! payload byte offered to the links, both ways; realized loss is the share of packets the links
//! dropped, both ways.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use surelink::channel::{Channel, Config};
use surelink::sim::{Congestion, GilbertElliott, LinkConfig, LinkStats, Loss, Pair, PairConfig};

#[derive(Parser, Clone)]
#[command(about = "surelink vs quinn streams under simulated loss: latency, outcomes, overhead")]
struct Args {
    /// Bernoulli loss rates (each way), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.05,0.1,0.2")]
    loss: Vec<f64>,
    /// Mean loss of the Gilbert-Elliott case (0: no such case).
    #[arg(long, default_value_t = 0.05)]
    ge_loss: f64,
    /// Mean burst length, in packets, of the Gilbert-Elliott case.
    #[arg(long, default_value_t = 4.0)]
    ge_burst: f64,
    /// Payments per run.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
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
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw p99 latency against loss per transport into this SVG file.
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Give up on a quinn request after this many seconds (counted as failed).
    #[arg(long, default_value_t = 60)]
    quinn_timeout_s: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Surelink,
    QuinnStream,
    QuinnStreamBbr,
}

impl Transport {
    const ALL: [Transport; 3] = [
        Transport::Surelink,
        Transport::QuinnStream,
        Transport::QuinnStreamBbr,
    ];

    fn name(self) -> &'static str {
        match self {
            Transport::Surelink => "surelink",
            Transport::QuinnStream => "quinn-stream",
            Transport::QuinnStreamBbr => "quinn-stream-bbr",
        }
    }
}

#[derive(Clone)]
struct Case {
    /// `bernoulli` or `gilbert-elliott`.
    model: &'static str,
    /// Mean loss each way.
    loss: f64,
    link: Loss,
}

struct Row {
    transport: Transport,
    case: Case,
    messages: usize,
    latencies: Vec<Duration>,
    failed: usize,
    duplicates: usize,
    up: LinkStats,
    down: LinkStats,
    payload_bytes: u64,
    wall: Duration,
}

impl Row {
    /// A finished run: latencies sorted here.
    #[allow(clippy::too_many_arguments)]
    fn new(
        args: &Args,
        transport: Transport,
        case: &Case,
        mut latencies: Vec<Duration>,
        failed: usize,
        duplicates: usize,
        (up, down): (LinkStats, LinkStats),
        wall: std::time::Instant,
    ) -> Row {
        latencies.sort();
        Row {
            transport,
            case: case.clone(),
            messages: args.messages,
            latencies,
            failed,
            duplicates,
            up,
            down,
            payload_bytes: (args.messages * args.size) as u64,
            wall: wall.elapsed(),
        }
    }

    fn acked(&self) -> usize {
        self.latencies.len()
    }

    fn ms(&self, q: f64) -> Option<f64> {
        if self.latencies.is_empty() {
            return None;
        }
        let n = self.latencies.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        Some(self.latencies[rank - 1].as_secs_f64() * 1000.0)
    }

    fn wire_bytes(&self) -> u64 {
        self.up.offered_bytes + self.down.offered_bytes
    }

    fn realized_loss(&self) -> f64 {
        let offered = self.up.offered_packets + self.down.offered_packets;
        if offered == 0 {
            return 0.0;
        }
        (self.up.dropped() + self.down.dropped()) as f64 / offered as f64
    }

    fn json(&self) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        format!(
            concat!(
                "{{\"transport\":\"{}\",\"model\":\"{}\",\"loss\":{},\"realized_loss\":{:.5},",
                "\"messages\":{},\"acked\":{},\"failed\":{},\"duplicates\":{},",
                "\"p50_ms\":{},\"p90_ms\":{},\"p99_ms\":{},\"p999_ms\":{},\"max_ms\":{},",
                "\"wire_bytes\":{},\"payload_bytes\":{}}}"
            ),
            self.transport.name(),
            self.case.model,
            self.case.loss,
            self.realized_loss(),
            self.messages,
            self.acked(),
            self.failed,
            self.duplicates,
            num(self.ms(0.5)),
            num(self.ms(0.9)),
            num(self.ms(0.99)),
            num(self.ms(0.999)),
            num(self.ms(1.0)),
            self.wire_bytes(),
            self.payload_bytes,
        )
    }
}

fn payment(i: usize, size: usize) -> Bytes {
    let mut p = format!("payment {i:08} ").into_bytes();
    p.resize(size.max(17), b'.');
    p.into()
}

fn payment_index(p: &[u8]) -> Option<usize> {
    std::str::from_utf8(p.get(8..16)?).ok()?.parse().ok()
}

fn pair(args: &Args, case: &Case, congestion: Congestion, surelink: bool) -> Pair {
    let link = LinkConfig {
        loss: case.link.clone(),
        delay: Duration::from_millis(args.delay_ms),
        ..LinkConfig::default()
    };
    Pair::new(PairConfig {
        seed: args.seed,
        congestion,
        keep_alive: Some(Duration::from_secs(1)),
        // surelink's recommended transport settings (`channel::transport_config`) ask for
        // fewer QUIC ACKs; the quinn rows keep quinn's defaults.
        ack_frequency: surelink.then(surelink::channel::ack_frequency_config),
        ..PairConfig::symmetric(link)
    })
    .expect("simulated endpoints")
}

async fn run_surelink(args: &Args, case: &Case, bar: &ProgressBar) -> Row {
    let wall = std::time::Instant::now();
    let pair = pair(args, case, Congestion::Surelink, true);
    let (client_conn, server_conn) = pair.connect().await.expect("handshake");
    let (client, _client_messages) = Channel::open(client_conn, Config::default()).expect("open");
    let (server, mut server_messages) =
        Channel::open(server_conn, Config::default()).expect("open");
    let collector = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        while let Some(m) = server_messages.recv().await {
            if let Some(i) = payment_index(&m.payload) {
                if !seen.insert(i) {
                    duplicates += 1;
                }
            }
        }
        duplicates
    });
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(args.messages);
    for i in 0..args.messages {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let client = client.clone();
        let p = payment(i, args.size);
        tasks.push(tokio::spawn(async move { client.send(p).await }));
        bar.set_position(i as u64 + 1);
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.expect("send task") {
            Ok(receipt) => latencies.push(receipt.latency),
            Err(_) => failed += 1,
        }
    }
    // Let late deliveries land, then close; the collector ends when the channel does.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (up, down) = (pair.up(), pair.down());
    if std::env::var_os("SWEEP_DEBUG").is_some() {
        eprintln!(
            "up {up:?}\ndown {down:?}\nclient {:?}\nserver {:?}",
            client.stats(),
            server.stats()
        );
    }
    drop(client);
    server.close().await;
    pair.client.close(0u32.into(), b"done");
    pair.server.close(0u32.into(), b"done");
    let duplicates = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    let t = Transport::Surelink;
    Row::new(
        args,
        t,
        case,
        latencies,
        failed,
        duplicates,
        (up, down),
        wall,
    )
}

async fn run_quinn(args: &Args, case: &Case, bbr: bool, bar: &ProgressBar) -> Row {
    let wall = std::time::Instant::now();
    let congestion = if bbr {
        Congestion::Bbr
    } else {
        Congestion::Cubic
    };
    let pair = pair(args, case, congestion, false);
    let (client, server) = pair.connect().await.expect("handshake");
    let seen = Arc::new(Mutex::new((HashSet::new(), 0usize)));
    let seen_server = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = server.accept_bi().await {
            let seen = seen_server.clone();
            tokio::spawn(async move {
                if let Ok(data) = recv.read_to_end(1 << 20).await {
                    if let Some(i) = payment_index(&data) {
                        let mut s = seen.lock().expect("not poisoned");
                        if !s.0.insert(i) {
                            s.1 += 1;
                        }
                    }
                    let _ = send.write_all(b"ok").await;
                    let _ = send.finish();
                }
            });
        }
    });
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let timeout = Duration::from_secs(args.quinn_timeout_s);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(args.messages);
    for i in 0..args.messages {
        tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
        let client = client.clone();
        let p = payment(i, args.size);
        tasks.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let exchange = async {
                let (mut send, mut recv) = client.open_bi().await.ok()?;
                send.write_all(&p).await.ok()?;
                send.finish().ok()?;
                let answer = recv.read_to_end(64).await.ok()?;
                (answer == b"ok").then_some(())
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Some(())) => Some(t0.elapsed()),
                _ => None,
            }
        }));
        bar.set_position(i as u64 + 1);
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.expect("request task") {
            Some(l) => latencies.push(l),
            None => failed += 1,
        }
    }
    let (up, down) = (pair.up(), pair.down());
    pair.client.close(0u32.into(), b"done");
    pair.server.close(0u32.into(), b"done");
    let duplicates = seen.lock().expect("not poisoned").1;
    let t = if bbr {
        Transport::QuinnStreamBbr
    } else {
        Transport::QuinnStream
    };
    Row::new(
        args,
        t,
        case,
        latencies,
        failed,
        duplicates,
        (up, down),
        wall,
    )
}

fn cases(args: &Args) -> Vec<Case> {
    let mut cases: Vec<Case> = args
        .loss
        .iter()
        .map(|&p| Case {
            model: "bernoulli",
            loss: p,
            link: if p > 0.0 {
                Loss::Bernoulli(p)
            } else {
                Loss::None
            },
        })
        .collect();
    if args.ge_loss > 0.0 {
        cases.push(Case {
            model: "gilbert-elliott",
            loss: args.ge_loss,
            link: Loss::GilbertElliott(GilbertElliott::from_mean(args.ge_loss, args.ge_burst)),
        });
    }
    cases
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 => format!("{:.1}×", b / a),
        _ => "-".into(),
    }
}

fn print_table(args: &Args, rows: &[Row]) {
    println!(
        "{} payments of {} B at {}/s, {} ms each way, same loss both ways, seed {}; virtual time",
        args.messages, args.size, args.rate, args.delay_ms, args.seed
    );
    println!(
        "{:<17} {:<16} {:>6} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>5} {:>4} {:>6} {:>9} {:>9}",
        "transport",
        "model",
        "loss",
        "real",
        "p50",
        "p90",
        "p99",
        "p99.9",
        "max",
        "acked",
        "fail",
        "dup",
        "wire×",
        "p99÷quinn",
        "p99÷bbr"
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    for row in rows {
        let (vs_quinn, vs_bbr) = if row.transport == Transport::Surelink {
            let find = |t| {
                rows.iter()
                    .find(|r| {
                        r.transport == t
                            && r.case.model == row.case.model
                            && r.case.loss == row.case.loss
                    })
                    .and_then(|r| r.ms(0.99))
            };
            (
                ratio(row.ms(0.99), find(Transport::QuinnStream)),
                ratio(row.ms(0.99), find(Transport::QuinnStreamBbr)),
            )
        } else {
            (String::new(), String::new())
        };
        println!(
            "{:<17} {:<16} {:>5.1}% {:>6.1}% {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>5} {:>4} {:>6.2} {:>9} {:>9}",
            row.transport.name(),
            row.case.model,
            row.case.loss * 100.0,
            row.realized_loss() * 100.0,
            f(row.ms(0.5)),
            f(row.ms(0.9)),
            f(row.ms(0.99)),
            f(row.ms(0.999)),
            f(row.ms(1.0)),
            row.acked(),
            row.failed,
            row.duplicates,
            row.wire_bytes() as f64 / row.payload_bytes.max(1) as f64,
            vs_quinn,
            vs_bbr,
        );
    }
    println!("latencies in ms (send to ack); wire× = UDP bytes both ways / payload bytes; p99÷quinn = how many times lower surelink's p99 is");
}

fn plot(path: &std::path::Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let bern: Vec<&Row> = rows
        .iter()
        .filter(|r| r.case.model == "bernoulli")
        .collect();
    let max_loss = bern.iter().map(|r| r.case.loss).fold(0.01, f64::max) * 100.0;
    let max_ms = bern.iter().filter_map(|r| r.ms(0.99)).fold(10.0, f64::max);
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "p99 send-to-ack latency vs loss (each way)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_loss * 1.05, (5f64..max_ms * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("Bernoulli loss each way (%)")
        .y_desc("p99 latency (ms, log)")
        .draw()?;
    for (t, color) in Transport::ALL.into_iter().zip([BLUE, RED, GREEN]) {
        let points: Vec<(f64, f64)> = bern
            .iter()
            .filter(|r| r.transport == t)
            .filter_map(|r| r.ms(0.99).map(|ms| (r.case.loss * 100.0, ms)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(t.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    root.present()?;
    Ok(())
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let args = Args::parse();
    let cases = cases(&args);
    let total = (cases.len() * Transport::ALL.len()) as u64;
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.messages as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>34} [{bar:30}] {pos}/{len} payments")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut rows = Vec::new();
    let wall = std::time::Instant::now();
    for case in &cases {
        for t in Transport::ALL {
            bar.set_prefix(format!(
                "{}/{} {} {} {:.1}%",
                rows.len() + 1,
                total,
                t.name(),
                case.model,
                case.loss * 100.0
            ));
            bar.set_position(0);
            let row = match t {
                Transport::Surelink => run_surelink(&args, case, &bar).await,
                Transport::QuinnStream => run_quinn(&args, case, false, &bar).await,
                Transport::QuinnStreamBbr => run_quinn(&args, case, true, &bar).await,
            };
            tracing::debug!(wall = ?row.wall, "row done");
            if args.json {
                println!("{}", row.json());
            }
            rows.push(row);
        }
    }
    bar.finish_and_clear();
    if !args.json {
        print_table(&args, &rows);
        println!("({:.1} s wall)", wall.elapsed().as_secs_f64());
    }
    if let Some(path) = &args.plot {
        match plot(path, &rows) {
            Ok(()) => eprintln!("plot written to {}", path.display()),
            Err(e) => {
                eprintln!("could not draw the plot: {e}");
                std::process::exit(1);
            }
        }
    }
}
