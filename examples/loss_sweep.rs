//! The loss sweep: surelink against plain quinn streams (stock Cubic, and BBR), on the
//! in-crate simulator, in the same run.
//!
//! ```text
//! cargo run --release --example loss_sweep
//! cargo run --release --example loss_sweep -- --loss 0,0.01,0.1 --messages 2000 --json
//! cargo run --release --example loss_sweep -- --plot sweep.svg
//! # issue 14's cases, over seeds 1 to 5:
//! cargo run --release --example loss_sweep -- --seeds 1-5 --loss 0,0.1,0.2 \
//!     --ge-loss 0.05,0.06 --ge-burst 4,8 --blackout 2,2 --blackout 2,5 --bottleneck-kbps 1000
//! # the same rows over real UDP sockets on loopback (real time: 10 s per row at the defaults)
//! cargo run --release --example loss_sweep -- --real-udp --loss 0.1 --ge-loss 0.05
//! # issue 22's time-based fades (2/s of 20 ms; 0.5/s of 50 ms, alone and with 1% loss) and
//! # a bottleneck that drops from 2,000 to 1,000 kbit/s 5 s into the run:
//! cargo run --release --example loss_sweep -- --seeds 1-5 --loss --ge-loss \
//!     --fades 2,20 --fades 0.5,50 --fades-loss 0,0.01
//! cargo run --release --example loss_sweep -- --seeds 1-5 --loss --ge-loss \
//!     --bottleneck-kbps 2000 --bottleneck-change 5,1000
//! # issue 24's round trips: each payment a request, the server replying with 64 bytes
//! cargo run --release --example loss_sweep -- --request --seeds 1-5 --loss 0,0.1 \
//!     --ge-loss 0.05 --ge-burst 4
//! ```
//!
//! For each case and each transport, a client sends `--messages` payments of `--size` bytes at
//! `--rate` per second over a simulated link with `--delay-ms` each way and the same link
//! effects both ways; the server answers each one:
//!
//! - `surelink`: a [`Channel`] on each end (BBR, adaptive redundancy); latency is from `send`
//!   to its receipt (the ack).
//! - `quinn-stream`, `quinn-stream-bbr`: one bi-stream per payment, the server answers `ok`;
//!   latency is from opening the stream to reading the answer. Stock quinn (Cubic) and quinn with
//!   BBR.
//!
//! With `--request` every transport measures a round trip instead (issue 24): the surelink
//! client sends each payment with `Channel::request` and the server's application replies at
//! once with `--reply-size` bytes (default 64; `Delivered::reply`), latency from the request
//! sent to the reply received (`Reply::latency`, the library's own measure, as `Receipt`'s is
//! for `send`); the quinn servers answer each bi-stream with `--reply-size` bytes instead of
//! `ok`, latency from opening the stream to reading the whole reply. Each reply names its
//! request and is checked; a wrong one counts as failed. `p99_ms` and the other latencies are
//! then round trips, and `payload_bytes` counts the replies too.
//!
//! The cases (each row's `model`):
//!
//! - `bernoulli`: independent loss, one case per `--loss` rate.
//! - `gilbert-elliott`: bursty loss (a two-state Markov chain per packet) with mean `--ge-loss`
//!   and mean burst `--ge-burst` packets. Both flags take lists; they are **paired**
//!   (`--ge-loss 0.05,0.06 --ge-burst 4,8` is 5%/4 and 6%/8), a single value pairs with every
//!   value of the other list, and `--ge-cross` crosses them instead (every mean with every
//!   burst). A mean of 0 makes no case.
//! - `blackout`: `--blackout START_S,DUR_S` (repeatable) drops every packet, both ways, from
//!   START_S to START_S + DUR_S after the first payment is sent; nothing else is lost unless
//!   `--blackout-loss` gives Bernoulli rates to add (one blackout case per rate, default 0
//!   only). surelink's per-payment deadline is `--deadline-s`, by default the larger of 5 s
//!   and DUR_S + 2 s on blackout rows (so "none fails" is testable) and surelink's default
//!   (5 s) elsewhere. Blackout rows also report the recovery: `recovery_ms`, the latest ack
//!   of a payment sent before the link returned minus the link's return; `outage_payments`,
//!   the payments caught by the outage (sent before the return and not acked before the
//!   blackout began); `outage_failed`, those of them that failed.
//! - `fades`: `--fades RATE_PER_S,MEAN_MS` (repeatable, one case each) drops every packet
//!   sent during a fade. Fades are spans of *time*, not of packets (`sim::Fades`): they
//!   arrive as a Poisson process, RATE_PER_S per second of time outside a fade, and last an
//!   exponentially distributed time with mean MEAN_MS, so a sender that sends more packets
//!   does not get shorter bursts. They run both ways, each direction with its own schedule
//!   (seeded from the row's seed), measured from the links' start; the share of time in a
//!   fade is RATE·MEAN / (1 + RATE·MEAN). `--fades-loss` gives Bernoulli rates to add (one
//!   fades case per rate per `--fades`, default 0 only). Over `--real-udp` the fades run on
//!   the real clock.
//! - `bottleneck`: `--bottleneck-kbps K` (a list) limits both ways to K kbit/s through a
//!   drop-tail queue of `--bottleneck-queue-ms` at that rate (default 50 ms), no other loss.
//!   `delivered_bytes` (what the links carried) beside `wire_bytes` (what was offered to
//!   them) shows how much the senders pushed past the bottleneck. With
//!   `--bottleneck-change AT_S,KBPS` (repeatable) every bottleneck case instead runs once per
//!   change, its rate becoming KBPS kbit/s AT_S seconds after the first payment is sent (both
//!   ways, timed like a blackout); the queue keeps its size in bytes, so at a lower rate it
//!   holds more time.
//!
//! `--seed` takes a list and ranges (`--seeds 1-5`, `--seed 1,3,7`): every case runs once
//! per seed, one row each; the table then ends with the worst p99 per case and transport
//! across seeds.
//!
//! By default everything runs in the simulator's virtual time (tokio's paused clock), so
//! latencies are network and protocol time, and a 10 s run takes far less wall time.
//! `--real-udp` runs the same rows over real UDP sockets on loopback, in real time, with the
//! same link model applied to each socket's outgoing packets (`sim::LossyUdpSocket`): a row
//! then takes `--messages / --rate` seconds (10 s at the defaults) plus about a second.
//! Wire bytes are every UDP payload byte offered to the links, both ways; realized loss is
//! the share of packets the links dropped (for any cause), both ways.
//!
//! JSON rows (`--json` on stdout instead of the table, or `--json-out FILE` beside it)
//! carry `transport`, `model`, `loss`, `realized_loss`, `messages`, `acked`, `failed`,
//! `duplicates`, `p50_ms`, `p90_ms`, `p99_ms`, `p999_ms`, `max_ms`, `wire_bytes`,
//! `payload_bytes`, and: `seed`, `clock` (`virtual` or `real`), `request` (`true` with
//! `--request`), `reply_size` (`null` without `--request`), `rate`,
//! `delay_ms`, `deadline_s` (surelink's deadline, or the quinn rows' `--quinn-timeout-s`),
//! `ge_burst`, `blackout_start_s`, `blackout_s`, `recovery_ms`, `outage_payments`,
//! `outage_failed`, `bottleneck_kbps`, `bottleneck_queue_ms`, `bottleneck_change_at_s`,
//! `bottleneck_change_kbps`, `fade_rate_per_s`, `fade_mean_ms` (each `null` where the case has
//! no such parameter), `delivered_bytes`, `dropped_loss`, `dropped_blackout`, `dropped_queue`,
//! `dropped_fade` (the links' counters, both ways), `hedges`, `retransmits`, `datagram_send_errors`,
//! `data_shards`, `repair_shards` (surelink's sender: first hedges, later resends, datagrams
//! quinn refused, first-flight data and parity shards; `null` for the quinn rows),
//! `loss_burstiness`, `queueing_delay_ms`, `redundancy_cap`, `loss_dispersion` (the client channel's
//! `ChannelStats` at the end of the row; `null` for the quinn rows or until measured), and
//! `wall_s`.
//!
//! `--timeline MS` prints each row's course to stderr, one line per window: packets each way
//! and how many the link dropped, the client connection's congestion window, packets quinn
//! declared lost and its RTT, payments sent and acked, and surelink's shards, first hedges and
//! resends; for looking into a blackout's recovery or a bottleneck.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use surelink::channel::{Channel, Config};
use surelink::sim::{
    Congestion, Fades, GilbertElliott, LinkConfig, LinkStats, Loss, Pair, PairConfig, RateChange,
    RateLimit,
};
use tokio::time::Instant;

#[derive(Parser, Clone)]
#[command(
    about = "surelink vs quinn streams under simulated loss: latency, outcomes, overhead",
    after_help = "Virtual time by default (a 2,000-payment row takes a few wall seconds). \
                  --real-udp runs in real time: --messages / --rate seconds per row (2,000 at \
                  200/s = 10 s) plus about a second, times 3 transports, cases and seeds."
)]
struct Args {
    /// Bernoulli loss rates (each way), comma-separated; `--loss` with no value: no such case.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0,0.01,0.05,0.1,0.2")]
    loss: Vec<f64>,
    /// Mean loss of the Gilbert-Elliott cases, comma-separated (0, or no value: no such case).
    /// Paired with --ge-burst (see --ge-cross).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "0.05")]
    ge_loss: Vec<f64>,
    /// Mean burst lengths, in packets, of the Gilbert-Elliott cases, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    ge_burst: Vec<f64>,
    /// Cross --ge-loss with --ge-burst (every mean with every burst) instead of pairing them
    /// element by element.
    #[arg(long)]
    ge_cross: bool,
    /// A blackout case: both directions drop everything from START_S to START_S + DUR_S
    /// seconds after the first payment. Repeatable.
    #[arg(long, value_name = "START_S,DUR_S", value_parser = parse_blackout)]
    blackout: Vec<(f64, f64)>,
    /// Bernoulli loss (each way) under each blackout case, comma-separated: one blackout case
    /// per rate.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    blackout_loss: Vec<f64>,
    /// A fades case: both directions drop every packet sent during a fade; fades arrive
    /// RATE_PER_S times per second (of time outside a fade) and last MEAN_MS milliseconds on
    /// average, both exponentially distributed. Repeatable.
    #[arg(long, value_name = "RATE_PER_S,MEAN_MS", value_parser = parse_fades)]
    fades: Vec<(f64, f64)>,
    /// Bernoulli loss (each way) under each fades case, comma-separated: one fades case per
    /// rate.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    fades_loss: Vec<f64>,
    /// Bottleneck cases: both directions limited to K kbit/s, comma-separated.
    #[arg(long, value_name = "K", value_delimiter = ',')]
    bottleneck_kbps: Vec<f64>,
    /// With --bottleneck-kbps: the bottleneck's rate becomes KBPS kbit/s AT_S seconds after
    /// the first payment. Repeatable: every bottleneck case runs once per change.
    #[arg(long, value_name = "AT_S,KBPS", value_parser = parse_bottleneck_change)]
    bottleneck_change: Vec<(f64, f64)>,
    /// The bottleneck's drop-tail queue, in milliseconds at its rate.
    #[arg(long, default_value_t = 50.0)]
    bottleneck_queue_ms: f64,
    /// Run over real UDP sockets on loopback in real time (the same link model on each
    /// socket's outgoing packets) instead of the virtual-time simulator.
    #[arg(long)]
    real_udp: bool,
    /// surelink's per-payment deadline in seconds (default: max(5, DUR_S + 2) on blackout
    /// rows, surelink's default elsewhere).
    #[arg(long)]
    deadline_s: Option<f64>,
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
    /// Seeds of the simulated links: a list and/or ranges (`1-5`, `1,3,7`); every case runs
    /// once per seed.
    #[arg(long, alias = "seeds", value_parser = parse_seeds, default_value = "1")]
    seed: Vec<Vec<u64>>,
    /// One JSON object per row instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON rows to FILE (one object a line), beside the table.
    #[arg(long, value_name = "FILE")]
    json_out: Option<std::path::PathBuf>,
    /// Draw p99 latency against loss per transport into this SVG file (the worst seed's).
    #[arg(long)]
    plot: Option<std::path::PathBuf>,
    /// Print each row's timeline to stderr, one line per MS milliseconds: packets each link
    /// carried and dropped, the client connection's congestion window, packets quinn declared
    /// lost and its RTT estimate, payments sent and acked, and surelink's shards, hedges and
    /// resends.
    #[arg(long, value_name = "MS")]
    timeline: Option<u64>,
    /// Give up on a quinn request after this many seconds (counted as failed).
    #[arg(long, default_value_t = 60)]
    quinn_timeout_s: u64,
    /// Measure round trips: surelink sends each payment as a request (`Channel::request`)
    /// and the server's application replies with `--reply-size` bytes at once; the quinn
    /// server answers each bi-stream with `--reply-size` bytes. Latency is then request sent
    /// to the whole reply received.
    #[arg(long)]
    request: bool,
    /// With `--request`: the size of each reply, in bytes.
    #[arg(long, default_value_t = 64, requires = "request")]
    reply_size: usize,
}

fn parse_blackout(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s}: expected START_S,DUR_S"))?;
    let parse = |v: &str| {
        v.trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("{v}: not a number of seconds"))
    };
    let (start, dur) = (parse(a)?, parse(b)?);
    if dur <= 0.0 {
        return Err(format!("{s}: the blackout must last more than 0 s"));
    }
    Ok((start, dur))
}

/// Two comma-separated numbers, each checked by `ok` (which names what is wrong).
fn parse_pair(
    s: &str,
    shape: &str,
    ok: impl Fn(usize, f64) -> Result<(), String>,
) -> Result<(f64, f64), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("{s}: expected {shape}"))?;
    let mut values = [0.0; 2];
    for (i, v) in [a, b].into_iter().enumerate() {
        let x = v
            .trim()
            .parse::<f64>()
            .map_err(|_| format!("{s}: {v:?} is not a number (expected {shape})"))?;
        ok(i, x).map_err(|e| format!("{s}: {e}"))?;
        values[i] = x;
    }
    Ok((values[0], values[1]))
}

/// `RATE_PER_S,MEAN_MS`, both positive and finite.
fn parse_fades(s: &str) -> Result<(f64, f64), String> {
    parse_pair(s, "RATE_PER_S,MEAN_MS", |i, x| {
        if x.is_finite() && x > 0.0 {
            Ok(())
        } else if i == 0 {
            Err(format!("{x} fades per second: must be more than 0"))
        } else {
            Err(format!("a mean fade of {x} ms: must be more than 0"))
        }
    })
}

/// `AT_S,KBPS`: a time of at least 0 s and a rate above 0.
fn parse_bottleneck_change(s: &str) -> Result<(f64, f64), String> {
    parse_pair(s, "AT_S,KBPS", |i, x| match i {
        0 if x.is_finite() && x >= 0.0 => Ok(()),
        0 => Err(format!("{x} s: not a time from the first payment")),
        _ if x.is_finite() && x > 0.0 => Ok(()),
        _ => Err(format!("{x} kbit/s: must be more than 0")),
    })
}

/// `1-5`, `3`, `1,3,7`, `1-3,9`.
fn parse_seeds(s: &str) -> Result<Vec<u64>, String> {
    let mut seeds = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |v: &str| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("{v}: not a seed"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b || b - a >= 10_000 {
                    return Err(format!("{part}: not a range of seeds"));
                }
                seeds.extend(a..=b);
            }
            None => seeds.push(num(part)?),
        }
    }
    if seeds.is_empty() {
        return Err("no seed".into());
    }
    Ok(seeds)
}

impl Args {
    /// Every seed, in the order given, once.
    fn seeds(&self) -> Vec<u64> {
        let mut seen = HashSet::new();
        self.seed
            .iter()
            .flatten()
            .copied()
            .filter(|s| seen.insert(*s))
            .collect()
    }

    /// Payload bytes per payment, both ways: the payment, and with `--request` its reply.
    fn payload_size(&self) -> usize {
        self.size + if self.request { self.reply_size } else { 0 }
    }

    fn clock(&self) -> &'static str {
        if self.real_udp {
            "real"
        } else {
            "virtual"
        }
    }
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

#[derive(Clone, Debug)]
struct Case {
    /// `bernoulli`, `gilbert-elliott`, `blackout`, `fades` or `bottleneck`.
    model: &'static str,
    /// Mean random loss each way.
    loss: f64,
    link: Loss,
    /// Gilbert-Elliott: mean burst, in packets.
    ge_burst: Option<f64>,
    /// Blackout: (start, duration) in seconds from the first payment.
    blackout: Option<(f64, f64)>,
    /// Bottleneck: kbit/s.
    bottleneck_kbps: Option<f64>,
    /// Bottleneck: the change of rate, (seconds from the first payment, kbit/s).
    bottleneck_change: Option<(f64, f64)>,
    /// Fades: (per second, mean in ms).
    fades: Option<(f64, f64)>,
}

impl Case {
    /// What tells this case from the others of a run.
    fn key(&self) -> String {
        format!(
            "{} {} {:?} {:?} {:?} {:?} {:?}",
            self.model,
            self.loss,
            self.ge_burst,
            self.blackout,
            self.bottleneck_kbps,
            self.bottleneck_change,
            self.fades
        )
    }

    /// A short name for the table.
    fn label(&self) -> String {
        let pct = |p: f64| format!("{}%", (p * 1000.0).round() / 10.0);
        let extra = if self.loss > 0.0 {
            format!(" +{}", pct(self.loss))
        } else {
            String::new()
        };
        match self.model {
            "gilbert-elliott" => format!("GE {} b{}", pct(self.loss), self.ge_burst.unwrap_or(0.0)),
            "blackout" => {
                let (start, dur) = self.blackout.unwrap_or_default();
                format!("blackout {dur}s@{start}s{extra}")
            }
            "fades" => {
                let (rate, mean_ms) = self.fades.unwrap_or_default();
                format!("fades {rate}/s {mean_ms}ms{extra}")
            }
            "bottleneck" => {
                let kbps = self.bottleneck_kbps.unwrap_or(0.0);
                match self.bottleneck_change {
                    Some((at, to)) => format!("bottleneck {kbps}k→{to}k@{at}s"),
                    None => format!("bottleneck {kbps}k"),
                }
            }
            _ => format!("bernoulli {}", pct(self.loss)),
        }
    }
}

/// One payment's fate, in time since the first payment was sent.
#[derive(Clone, Copy, Debug)]
struct Outcome {
    sent: Duration,
    acked: Option<Duration>,
}

/// surelink's sender counters for a row.
#[derive(Clone, Copy, Debug, Default)]
struct SenderCounts {
    hedges: u64,
    retransmits: u64,
    send_errors: u64,
    data_shards: u64,
    repair_shards: u64,
    shards_sent: u64,
    loss_burstiness: Option<f64>,
    loss_dispersion: Option<f64>,
    queueing_delay: Option<Duration>,
    redundancy_cap: f64,
}

impl SenderCounts {
    fn of(channel: &Channel) -> SenderCounts {
        let st = channel.stats();
        SenderCounts {
            hedges: st.sender.hedges_fired,
            retransmits: st.sender.retransmits,
            send_errors: st.send_errors,
            data_shards: st.sender.data_shards,
            repair_shards: st.sender.repair_shards,
            shards_sent: st.sender.shards_sent,
            loss_burstiness: st.loss_burstiness,
            loss_dispersion: st.loss_dispersion,
            queueing_delay: st.queueing_delay,
            redundancy_cap: st.redundancy_cap,
        }
    }
}

/// One line of `--timeline`: counters at `at` after the first payment.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    up: LinkStats,
    down: LinkStats,
    path: quinn::PathStats,
    sender: Option<SenderCounts>,
}

/// Samples the links, the client's connection and surelink's sender every `every` until
/// `done` is set.
async fn sample_until(
    done: &std::sync::atomic::AtomicBool,
    every: Option<u64>,
    start: Instant,
    pair: &Pair,
    conn: &quinn::Connection,
    channel: Option<&Channel>,
) -> Vec<Sample> {
    let Some(ms) = every else {
        return Vec::new();
    };
    let every = Duration::from_millis(ms.max(1));
    let mut samples = Vec::new();
    let mut at = start;
    while !done.load(std::sync::atomic::Ordering::Relaxed) {
        samples.push(Sample {
            at: at - start,
            up: pair.up(),
            down: pair.down(),
            path: conn.stats().path,
            sender: channel.map(SenderCounts::of),
        });
        at += every;
        tokio::time::sleep_until(at).await;
    }
    samples
}

fn print_timeline(row: &Row, samples: &[Sample]) {
    eprintln!(
        "timeline: {} {} seed {} (Δ per window; cwnd and rtt at the window's end)",
        row.transport.name(),
        row.case.label(),
        row.seed
    );
    eprintln!(
        "{:>7} {:>6} {:>6} {:>6} {:>6} {:>8} {:>6} {:>6} {:>5} {:>5} {:>7} {:>5} {:>5}",
        "t_ms",
        "up",
        "up_x",
        "down",
        "down_x",
        "cwnd",
        "qlost",
        "rtt",
        "sent",
        "acked",
        "shards",
        "hedge",
        "resnd"
    );
    for w in samples.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let in_window = |t: Duration| t >= a.at && t < b.at;
        let sent = row.outcomes.iter().filter(|o| in_window(o.sent)).count();
        let acked = row
            .outcomes
            .iter()
            .filter(|o| o.acked.is_some_and(in_window))
            .count();
        let sl = match (a.sender, b.sender) {
            (Some(x), Some(y)) => format!(
                "{:>7} {:>5} {:>5}",
                y.shards_sent - x.shards_sent,
                y.hedges - x.hedges,
                y.retransmits - x.retransmits
            ),
            _ => String::new(),
        };
        eprintln!(
            "{:>7} {:>6} {:>6} {:>6} {:>6} {:>8} {:>6} {:>6.0} {:>5} {:>5} {}",
            a.at.as_millis(),
            b.up.offered_packets - a.up.offered_packets,
            b.up.dropped() - a.up.dropped(),
            b.down.offered_packets - a.down.offered_packets,
            b.down.dropped() - a.down.dropped(),
            b.path.cwnd,
            b.path.lost_packets - a.path.lost_packets,
            b.path.rtt.as_secs_f64() * 1000.0,
            sent,
            acked,
            sl
        );
    }
}

struct Row {
    transport: Transport,
    case: Case,
    seed: u64,
    deadline: Duration,
    messages: usize,
    latencies: Vec<Duration>,
    outcomes: Vec<Outcome>,
    failed: usize,
    duplicates: usize,
    up: LinkStats,
    down: LinkStats,
    payload_bytes: u64,
    sender: Option<SenderCounts>,
    timeline: Vec<Sample>,
    wall: Duration,
}

/// What a run hands back for its row.
struct Run {
    latencies: Vec<Duration>,
    outcomes: Vec<Outcome>,
    failed: usize,
    duplicates: usize,
    links: (LinkStats, LinkStats),
    deadline: Duration,
    sender: Option<SenderCounts>,
    timeline: Vec<Sample>,
}

impl Row {
    /// A finished run: latencies sorted here.
    fn new(
        args: &Args,
        transport: Transport,
        case: &Case,
        seed: u64,
        run: Run,
        wall: std::time::Instant,
    ) -> Row {
        let mut latencies = run.latencies;
        latencies.sort();
        Row {
            transport,
            case: case.clone(),
            seed,
            deadline: run.deadline,
            messages: args.messages,
            latencies,
            outcomes: run.outcomes,
            failed: run.failed,
            duplicates: run.duplicates,
            up: run.links.0,
            down: run.links.1,
            payload_bytes: (args.messages * args.payload_size()) as u64,
            sender: run.sender,
            timeline: run.timeline,
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

    fn delivered_bytes(&self) -> u64 {
        self.up.delivered_bytes + self.down.delivered_bytes
    }

    fn realized_loss(&self) -> f64 {
        let offered = self.up.offered_packets + self.down.offered_packets;
        if offered == 0 {
            return 0.0;
        }
        (self.up.dropped() + self.down.dropped()) as f64 / offered as f64
    }

    /// Blackout rows: (the blackout's start, the link's return), from the first payment.
    fn outage(&self) -> Option<(Duration, Duration)> {
        let (start, dur) = self.case.blackout?;
        let start = Duration::from_secs_f64(start);
        Some((start, start + Duration::from_secs_f64(dur)))
    }

    /// Payments caught by the outage: sent before the link returned, and not acked before the
    /// blackout began. (How many, how many failed.)
    fn outage_payments(&self) -> Option<(usize, usize)> {
        let (down, back) = self.outage()?;
        let caught = self
            .outcomes
            .iter()
            .filter(|o| o.sent < back && o.acked.is_none_or(|a| a >= down));
        let (mut n, mut failed) = (0, 0);
        for o in caught {
            n += 1;
            failed += usize::from(o.acked.is_none());
        }
        Some((n, failed))
    }

    /// Blackout rows: the latest ack of a payment sent before the link returned, minus the
    /// return, in ms (`None` if no such payment was acked).
    fn recovery_ms(&self) -> Option<f64> {
        let (_, back) = self.outage()?;
        let latest = self
            .outcomes
            .iter()
            .filter(|o| o.sent < back)
            .filter_map(|o| o.acked)
            .max()?;
        Some((latest.as_secs_f64() - back.as_secs_f64()) * 1000.0)
    }

    fn json(&self, args: &Args) -> String {
        let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
        let int = |v: Option<u64>| v.map_or("null".to_string(), |v| v.to_string());
        let outage = self.outage_payments();
        let sender = self.sender;
        format!(
            concat!(
                "{{\"transport\":\"{}\",\"model\":\"{}\",\"loss\":{},\"realized_loss\":{:.5},",
                "\"messages\":{},\"acked\":{},\"failed\":{},\"duplicates\":{},",
                "\"p50_ms\":{},\"p90_ms\":{},\"p99_ms\":{},\"p999_ms\":{},\"max_ms\":{},",
                "\"wire_bytes\":{},\"payload_bytes\":{},",
                "\"seed\":{},\"clock\":\"{}\",\"request\":{},\"reply_size\":{},",
                "\"rate\":{},\"delay_ms\":{},\"deadline_s\":{},",
                "\"ge_burst\":{},\"blackout_start_s\":{},\"blackout_s\":{},\"recovery_ms\":{},",
                "\"outage_payments\":{},\"outage_failed\":{},",
                "\"bottleneck_kbps\":{},\"bottleneck_queue_ms\":{},",
                "\"bottleneck_change_at_s\":{},\"bottleneck_change_kbps\":{},",
                "\"fade_rate_per_s\":{},\"fade_mean_ms\":{},",
                "\"delivered_bytes\":{},\"dropped_loss\":{},\"dropped_blackout\":{},",
                "\"dropped_queue\":{},\"dropped_fade\":{},\"hedges\":{},\"retransmits\":{},",
                "\"datagram_send_errors\":{},\"data_shards\":{},\"repair_shards\":{},",
                "\"loss_burstiness\":{},\"queueing_delay_ms\":{},\"redundancy_cap\":{},",
                "\"loss_dispersion\":{},",
                "\"wall_s\":{:.3}}}"
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
            self.seed,
            args.clock(),
            args.request,
            int(args.request.then_some(args.reply_size as u64)),
            args.rate,
            args.delay_ms,
            self.deadline.as_secs_f64(),
            num(self.case.ge_burst),
            num(self.case.blackout.map(|b| b.0)),
            num(self.case.blackout.map(|b| b.1)),
            num(self.recovery_ms()),
            int(outage.map(|o| o.0 as u64)),
            int(outage.map(|o| o.1 as u64)),
            num(self.case.bottleneck_kbps),
            num(self.case.bottleneck_kbps.map(|_| args.bottleneck_queue_ms)),
            num(self.case.bottleneck_change.map(|c| c.0)),
            num(self.case.bottleneck_change.map(|c| c.1)),
            num(self.case.fades.map(|f| f.0)),
            num(self.case.fades.map(|f| f.1)),
            self.delivered_bytes(),
            self.up.dropped_loss + self.down.dropped_loss,
            self.up.dropped_blackout + self.down.dropped_blackout,
            self.up.dropped_queue + self.down.dropped_queue,
            self.up.dropped_fade + self.down.dropped_fade,
            int(sender.map(|s| s.hedges)),
            int(sender.map(|s| s.retransmits)),
            int(sender.map(|s| s.send_errors)),
            int(sender.map(|s| s.data_shards)),
            int(sender.map(|s| s.repair_shards)),
            num(sender.and_then(|s| s.loss_burstiness)),
            num(sender.and_then(|s| s.queueing_delay.map(|d| d.as_secs_f64() * 1000.0))),
            num(sender.map(|s| s.redundancy_cap)),
            num(sender.and_then(|s| s.loss_dispersion)),
            self.wall.as_secs_f64(),
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

/// The server's answer to payment `i`: `ok`, or with `--request` a reply of exactly
/// `--reply-size` bytes that starts like the payment (`reply   00000042 ...`, cut short if the
/// reply is shorter), so the client can check it got the reply to its own request.
fn answer(args: &Args, i: usize) -> Bytes {
    if !args.request {
        return Bytes::from_static(b"ok");
    }
    let mut r = format!("reply   {i:08} ").into_bytes();
    r.resize(args.reply_size, b'.');
    r.into()
}

/// kbit/s in bytes per second (at least 1).
fn bytes_per_sec(kbps: f64) -> u64 {
    (kbps * 1000.0 / 8.0).round().max(1.0) as u64
}

/// The case's link, one direction; blackouts and a bottleneck's change of rate are added once
/// the pair is connected (see [`start_sending`]). Fades are there from the start: a
/// stationary process, measured from the links' start.
fn link(args: &Args, case: &Case) -> LinkConfig {
    let rate = case.bottleneck_kbps.map(|kbps| {
        let bytes_per_sec = bytes_per_sec(kbps);
        RateLimit {
            bytes_per_sec,
            queue_bytes: (bytes_per_sec as f64 * args.bottleneck_queue_ms / 1000.0) as usize,
        }
    });
    LinkConfig {
        loss: case.link.clone(),
        delay: Duration::from_millis(args.delay_ms),
        rate,
        fades: case
            .fades
            .map(|(per_sec, mean_ms)| Fades::new(per_sec, Duration::from_secs_f64(mean_ms / 1e3))),
        ..LinkConfig::default()
    }
}

/// A pair for a run, and when its links started (blackouts are measured from then).
fn pair(
    args: &Args,
    case: &Case,
    seed: u64,
    congestion: Congestion,
    surelink: bool,
) -> (Pair, Instant) {
    let config = PairConfig {
        seed,
        congestion,
        keep_alive: Some(Duration::from_secs(1)),
        // surelink's recommended transport settings (`channel::transport_config`) ask for
        // fewer QUIC ACKs; the quinn rows keep quinn's defaults.
        ack_frequency: surelink.then(surelink::channel::ack_frequency_config),
        ..PairConfig::symmetric(link(args, case))
    };
    let created = Instant::now();
    let pair = if args.real_udp {
        Pair::over_loopback(config)
    } else {
        Pair::new(config)
    };
    (pair.expect("endpoints"), created)
}

/// The instant the first payment goes out: now. A blackout case's window and a bottleneck's
/// change of rate are put on both links here, measured from this instant.
fn start_sending(args: &Args, case: &Case, pair: &Pair, created: Instant) -> Instant {
    let start = Instant::now();
    // The links measure time from their start (the pair's construction).
    let offset = start - created;
    let mut l = link(args, case);
    let mut changed = false;
    if let Some((from, dur)) = case.blackout {
        let from = offset + Duration::from_secs_f64(from);
        l.blackouts = vec![from..from + Duration::from_secs_f64(dur)];
        changed = true;
    }
    if let Some((at, kbps)) = case.bottleneck_change {
        l.rate_change = Some(RateChange {
            at: offset + Duration::from_secs_f64(at),
            bytes_per_sec: bytes_per_sec(kbps),
        });
        changed = true;
    }
    if changed {
        pair.set_links(l.clone(), l);
    }
    start
}

/// surelink's deadline on this case's rows.
fn deadline(args: &Args, case: &Case) -> Duration {
    match (args.deadline_s, case.blackout) {
        (Some(s), _) => Duration::from_secs_f64(s),
        (None, Some((_, dur))) => Duration::from_secs_f64((dur + 2.0).max(5.0)),
        (None, None) => Config::default().sender.deadline,
    }
}

async fn run_surelink(args: &Args, case: &Case, seed: u64, bar: &ProgressBar) -> Run {
    let (pair, created) = pair(args, case, seed, Congestion::Surelink, true);
    let (client_conn, server_conn) = pair.connect().await.expect("handshake");
    let quic = client_conn.clone();
    let mut config = Config::default();
    config.sender.deadline = deadline(args, case);
    let deadline = config.sender.deadline;
    let (client, _client_messages) = Channel::open(client_conn, config).expect("open");
    let (server, mut server_messages) =
        Channel::open(server_conn, Config::default()).expect("open");
    let server_args = args.clone();
    let collector = tokio::spawn(async move {
        let mut seen = HashSet::new();
        let mut duplicates = 0;
        while let Some(m) = server_messages.recv().await {
            let i = payment_index(&m.payload);
            if let Some(i) = i {
                if !seen.insert(i) {
                    duplicates += 1;
                }
            }
            // A plain message was acked by taking it; a request is answered at once (the
            // reply acks it). A reply that fails (the channel stopped) leaves the request
            // to fail on the client's side.
            if m.is_request() {
                let _ = m.reply(answer(&server_args, i.unwrap_or(0)));
            }
        }
        duplicates
    });
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let start = start_sending(args, case, &pair, created);
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampling = sample_until(&done, args.timeline, start, &pair, &quic, Some(&client));
    let sending = async {
        let mut tasks = Vec::with_capacity(args.messages);
        for i in 0..args.messages {
            tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
            let client = client.clone();
            let p = payment(i, args.size);
            let expected = args.request.then(|| answer(args, i));
            tasks.push(tokio::spawn(async move {
                let sent = Instant::now();
                // The library's own measure either way: `send` to the ack (`Receipt`), or the
                // request sent to its reply received (`Reply`).
                let latency = match expected {
                    None => client.send(p).await.ok().map(|r| r.latency),
                    Some(expected) => match client.request(p).await {
                        Ok(reply) if reply.payload == expected => Some(reply.latency),
                        Ok(reply) => {
                            tracing::warn!(i, got = ?reply.payload, "not the reply to this request");
                            None
                        }
                        Err(_) => None,
                    },
                };
                (sent - start, Instant::now() - start, latency)
            }));
            bar.set_position(i as u64 + 1);
        }
        let mut latencies = Vec::new();
        let mut outcomes = Vec::new();
        let mut failed = 0;
        for t in tasks {
            let (sent, acked_at, latency) = t.await.expect("send task");
            let acked = match latency {
                Some(l) => {
                    latencies.push(l);
                    Some(acked_at)
                }
                None => {
                    failed += 1;
                    None
                }
            };
            outcomes.push(Outcome { sent, acked });
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (latencies, outcomes, failed)
    };
    let (timeline, (latencies, outcomes, failed)) = tokio::join!(sampling, sending);
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
    let sender = SenderCounts::of(&client);
    drop(client);
    server.close().await;
    pair.client.close(0u32.into(), b"done");
    pair.server.close(0u32.into(), b"done");
    let duplicates = tokio::time::timeout(Duration::from_secs(30), collector)
        .await
        .map(|r| r.unwrap_or(0))
        .unwrap_or(0);
    Run {
        latencies,
        outcomes,
        failed,
        duplicates,
        links: (up, down),
        deadline,
        sender: Some(sender),
        timeline,
    }
}

async fn run_quinn(args: &Args, case: &Case, seed: u64, bbr: bool, bar: &ProgressBar) -> Run {
    let congestion = if bbr {
        Congestion::Bbr
    } else {
        Congestion::Cubic
    };
    let (pair, created) = pair(args, case, seed, congestion, false);
    let (client, server) = pair.connect().await.expect("handshake");
    let seen = Arc::new(Mutex::new((HashSet::new(), 0usize)));
    let seen_server = seen.clone();
    let server_args = args.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = server.accept_bi().await {
            let seen = seen_server.clone();
            let args = server_args.clone();
            tokio::spawn(async move {
                if let Ok(data) = recv.read_to_end(1 << 20).await {
                    let i = payment_index(&data);
                    if let Some(i) = i {
                        let mut s = seen.lock().expect("not poisoned");
                        if !s.0.insert(i) {
                            s.1 += 1;
                        }
                    }
                    // The answer at once: `ok`, or with --request the reply.
                    let _ = send.write_all(&answer(&args, i.unwrap_or(0))).await;
                    let _ = send.finish();
                }
            });
        }
    });
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let timeout = Duration::from_secs(args.quinn_timeout_s);
    let start = start_sending(args, case, &pair, created);
    let done = std::sync::atomic::AtomicBool::new(false);
    let sampling = sample_until(&done, args.timeline, start, &pair, &client, None);
    let sending = async {
        let mut tasks = Vec::with_capacity(args.messages);
        for i in 0..args.messages {
            tokio::time::sleep_until(start + interval.mul_f64(i as f64)).await;
            let client = client.clone();
            let p = payment(i, args.size);
            let expected = answer(args, i);
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                // From opening the stream to reading the whole answer (with --request, the
                // reply: the round trip).
                let exchange = async {
                    let (mut send, mut recv) = client.open_bi().await.ok()?;
                    send.write_all(&p).await.ok()?;
                    send.finish().ok()?;
                    let got = recv.read_to_end(expected.len().max(64)).await.ok()?;
                    (got == expected).then_some(())
                };
                let ok = matches!(tokio::time::timeout(timeout, exchange).await, Ok(Some(())));
                (t0 - start, ok.then(|| t0.elapsed()))
            }));
            bar.set_position(i as u64 + 1);
        }
        let mut latencies = Vec::new();
        let mut outcomes = Vec::new();
        let mut failed = 0;
        for t in tasks {
            let (sent, latency) = t.await.expect("request task");
            match latency {
                Some(l) => latencies.push(l),
                None => failed += 1,
            }
            outcomes.push(Outcome {
                sent,
                acked: latency.map(|l| sent + l),
            });
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (latencies, outcomes, failed)
    };
    let (timeline, (latencies, outcomes, failed)) = tokio::join!(sampling, sending);
    let (up, down) = (pair.up(), pair.down());
    pair.client.close(0u32.into(), b"done");
    pair.server.close(0u32.into(), b"done");
    let duplicates = seen.lock().expect("not poisoned").1;
    Run {
        latencies,
        outcomes,
        failed,
        duplicates,
        links: (up, down),
        deadline: timeout,
        sender: None,
        timeline,
    }
}

/// Pairs (or, with `--ge-cross`, crosses) the Gilbert-Elliott means and bursts.
fn ge_pairs(args: &Args) -> Result<Vec<(f64, f64)>, String> {
    let (losses, bursts) = (&args.ge_loss, &args.ge_burst);
    let pairs: Vec<(f64, f64)> = if args.ge_cross {
        losses
            .iter()
            .flat_map(|&l| bursts.iter().map(move |&b| (l, b)))
            .collect()
    } else if losses.len() == bursts.len() {
        losses.iter().copied().zip(bursts.iter().copied()).collect()
    } else if losses.len() == 1 {
        bursts.iter().map(|&b| (losses[0], b)).collect()
    } else if bursts.len() == 1 {
        losses.iter().map(|&l| (l, bursts[0])).collect()
    } else {
        return Err(format!(
            "--ge-loss has {} values and --ge-burst {}: give as many of each to pair them, \
             one of either, or --ge-cross",
            losses.len(),
            bursts.len()
        ));
    };
    for &(l, b) in &pairs {
        if !(0.0..1.0).contains(&l) || (l > 0.0 && b < 1.0) {
            return Err(format!(
                "Gilbert-Elliott mean {l}, burst {b}: the mean must be in [0, 1) and bursts at least 1 packet"
            ));
        }
    }
    Ok(pairs.into_iter().filter(|&(l, _)| l > 0.0).collect())
}

fn bernoulli(p: f64) -> Loss {
    if p > 0.0 {
        Loss::Bernoulli(p)
    } else {
        Loss::None
    }
}

fn cases(args: &Args) -> Result<Vec<Case>, String> {
    let plain = Case {
        model: "bernoulli",
        loss: 0.0,
        link: Loss::None,
        ge_burst: None,
        blackout: None,
        bottleneck_kbps: None,
        bottleneck_change: None,
        fades: None,
    };
    let mut cases: Vec<Case> = args
        .loss
        .iter()
        .map(|&p| Case {
            loss: p,
            link: bernoulli(p),
            ..plain.clone()
        })
        .collect();
    for (mean, burst) in ge_pairs(args)? {
        cases.push(Case {
            model: "gilbert-elliott",
            loss: mean,
            link: Loss::GilbertElliott(GilbertElliott::from_mean(mean, burst)),
            ge_burst: Some(burst),
            ..plain.clone()
        });
    }
    for &blackout in &args.blackout {
        for &p in &args.blackout_loss {
            cases.push(Case {
                model: "blackout",
                loss: p,
                link: bernoulli(p),
                blackout: Some(blackout),
                ..plain.clone()
            });
        }
    }
    for &p in &args.fades_loss {
        if !(0.0..1.0).contains(&p) {
            return Err(format!("--fades-loss {p}: must be in [0, 1)"));
        }
    }
    for &fades in &args.fades {
        for &p in &args.fades_loss {
            cases.push(Case {
                model: "fades",
                loss: p,
                link: bernoulli(p),
                fades: Some(fades),
                ..plain.clone()
            });
        }
    }
    if !args.bottleneck_change.is_empty() && args.bottleneck_kbps.is_empty() {
        return Err(
            "--bottleneck-change needs --bottleneck-kbps (the rate the bottleneck starts at)"
                .into(),
        );
    }
    let changes: Vec<Option<(f64, f64)>> = if args.bottleneck_change.is_empty() {
        vec![None]
    } else {
        args.bottleneck_change.iter().copied().map(Some).collect()
    };
    for &kbps in &args.bottleneck_kbps {
        if !kbps.is_finite() || kbps <= 0.0 {
            return Err(format!("--bottleneck-kbps {kbps}: must be more than 0"));
        }
        for &change in &changes {
            cases.push(Case {
                model: "bottleneck",
                bottleneck_kbps: Some(kbps),
                bottleneck_change: change,
                ..plain.clone()
            });
        }
    }
    for c in &cases {
        if !(0.0..1.0).contains(&c.loss) {
            return Err(format!("loss {}: must be in [0, 1)", c.loss));
        }
    }
    Ok(cases)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if a > 0.0 && b / a < 0.95 => format!("{:.2}×", b / a),
        (Some(a), Some(b)) if a > 0.0 => format!("{:.1}×", b / a),
        _ => "-".into(),
    }
}

/// The row of transport `t` for the same case and seed as `row`.
fn peer<'a>(rows: &'a [Row], row: &Row, t: Transport) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.transport == t && r.seed == row.seed && r.case.key() == row.case.key())
}

/// The model-specific column: a blackout's recovery and casualties, a bottleneck's offered
/// bytes against what it carried, the share of packets fades took.
fn note(row: &Row) -> String {
    match row.case.model {
        "blackout" => {
            let rec = row
                .recovery_ms()
                .map_or("-".to_string(), |ms| format!("{ms:.0}"));
            let (n, failed) = row.outage_payments().unwrap_or_default();
            format!("rec {rec} ms, {failed}/{n} lost")
        }
        "bottleneck" => format!(
            "offered÷carried {:.2}",
            row.wire_bytes() as f64 / row.delivered_bytes().max(1) as f64
        ),
        "fades" => {
            let offered = row.up.offered_packets + row.down.offered_packets;
            let faded = row.up.dropped_fade + row.down.dropped_fade;
            format!(
                "in fades {:.1}% of packets",
                faded as f64 * 100.0 / offered.max(1) as f64
            )
        }
        _ => String::new(),
    }
}

fn print_table(args: &Args, rows: &[Row]) {
    let seeds = args.seeds();
    let seeds_shown = seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let replies = if args.request {
        format!(" as requests with {} B replies", args.reply_size)
    } else {
        String::new()
    };
    println!(
        "{} payments of {} B{} at {}/s, {} ms each way, same link both ways, seed {}; {} time{}",
        args.messages,
        args.size,
        replies,
        args.rate,
        args.delay_ms,
        seeds_shown,
        args.clock(),
        if args.real_udp {
            " (real UDP on loopback)"
        } else {
            ""
        }
    );
    println!(
        "{:<17} {:<25} {:>4} {:>6} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>5} {:>4} {:>6} {:>9} {:>9}  note",
        "transport",
        "case",
        "seed",
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
        "p99÷bbr",
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    for row in rows {
        let (vs_quinn, vs_bbr) = if row.transport == Transport::Surelink {
            let find = |t| peer(rows, row, t).and_then(|r| r.ms(0.99));
            (
                ratio(row.ms(0.99), find(Transport::QuinnStream)),
                ratio(row.ms(0.99), find(Transport::QuinnStreamBbr)),
            )
        } else {
            (String::new(), String::new())
        };
        println!(
            "{:<17} {:<25} {:>4} {:>5.1}% {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>5} {:>4} {:>6.2} {:>9} {:>9}  {}",
            row.transport.name(),
            row.case.label(),
            row.seed,
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
            note(row),
        );
    }
    let measured = if args.request {
        "request sent to reply received"
    } else {
        "send to ack"
    };
    println!("latencies in ms ({measured}); wire× = UDP bytes both ways / payload bytes (with --request, requests and replies); p99÷quinn = how many times lower surelink's p99 is; rec = latest ack of a payment sent before the link returned, minus the return; lost = of the payments caught by the outage, failed");
    if seeds.len() > 1 {
        print_summary(rows);
    }
}

/// Per case and transport, across seeds: the worst p99 and p99.9, all failures, the most
/// wire bytes, the slowest recovery.
fn print_summary(rows: &[Row]) {
    println!("\nacross seeds (worst of each):");
    println!(
        "{:<17} {:<25} {:>5} {:>7} {:>8} {:>8} {:>5} {:>6} {:>9}  rec ms",
        "transport", "case", "seeds", "p99", "p99.9", "max", "fail", "wire×", "p99÷bbr"
    );
    let mut keys: Vec<(String, String, Transport)> = Vec::new();
    for r in rows {
        let key = (r.case.key(), r.case.label(), r.transport);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let worst = |v: &mut dyn Iterator<Item = Option<f64>>| {
        v.flatten()
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
    };
    let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    for (key, label, t) in keys {
        let of: Vec<&Row> = rows
            .iter()
            .filter(|r| r.transport == t && r.case.key() == key)
            .collect();
        let p99 = worst(&mut of.iter().map(|r| r.ms(0.99)));
        let bbr_p99 = worst(
            &mut of
                .iter()
                .map(|r| peer(rows, r, Transport::QuinnStreamBbr).and_then(|b| b.ms(0.99))),
        );
        let vs_bbr = if t == Transport::Surelink {
            ratio(p99, bbr_p99)
        } else {
            String::new()
        };
        println!(
            "{:<17} {:<25} {:>5} {:>7} {:>8} {:>8} {:>5} {:>6.2} {:>9}  {}",
            t.name(),
            label,
            of.len(),
            f(p99),
            f(worst(&mut of.iter().map(|r| r.ms(0.999)))),
            f(worst(&mut of.iter().map(|r| r.ms(1.0)))),
            of.iter().map(|r| r.failed).sum::<usize>(),
            of.iter()
                .map(|r| r.wire_bytes() as f64 / r.payload_bytes.max(1) as f64)
                .fold(0.0, f64::max),
            vs_bbr,
            f(worst(&mut of.iter().map(|r| r.recovery_ms()))),
        );
    }
    println!("p99÷bbr here: quinn+BBR's worst p99 over surelink's worst p99");
}

fn plot(
    path: &std::path::Path,
    rows: &[Row],
    request: bool,
) -> Result<(), Box<dyn std::error::Error>> {
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
            if request {
                "p99 request-to-reply round trip vs loss (each way)"
            } else {
                "p99 send-to-ack latency vs loss (each way)"
            },
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
        // One point per loss rate: the worst seed's p99.
        let mut points: Vec<(f64, f64)> = Vec::new();
        for r in bern.iter().filter(|r| r.transport == t) {
            let Some(ms) = r.ms(0.99) else { continue };
            let x = r.case.loss * 100.0;
            match points.iter_mut().find(|p| p.0 == x) {
                Some(p) => p.1 = p.1.max(ms),
                None => points.push((x, ms)),
            }
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
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

fn main() {
    let args = Args::parse();
    let cases = match cases(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("loss_sweep: {e}");
            std::process::exit(2);
        }
    };
    // Virtual time: tokio's paused clock jumps whenever every task waits on a timer. Real
    // UDP: the real clock.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(!args.real_udp)
        .build()
        .expect("runtime");
    rt.block_on(sweep(args, cases));
}

async fn sweep(args: Args, cases: Vec<Case>) {
    let seeds = args.seeds();
    let total = (cases.len() * seeds.len() * Transport::ALL.len()) as u64;
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.messages as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>48} [{bar:30}] {pos}/{len} payments")
            .expect("template")
            .progress_chars("=> "),
    );
    let mut json_out = args.json_out.as_ref().map(|path| {
        std::fs::File::create(path).unwrap_or_else(|e| {
            eprintln!("loss_sweep: {}: {e}", path.display());
            std::process::exit(2);
        })
    });
    let mut rows = Vec::new();
    let wall = std::time::Instant::now();
    for case in &cases {
        for &seed in &seeds {
            for t in Transport::ALL {
                bar.set_prefix(format!(
                    "{}/{} {} {} seed {}",
                    rows.len() + 1,
                    total,
                    t.name(),
                    case.label(),
                    seed
                ));
                bar.set_position(0);
                let started = std::time::Instant::now();
                let run = match t {
                    Transport::Surelink => run_surelink(&args, case, seed, &bar).await,
                    Transport::QuinnStream => run_quinn(&args, case, seed, false, &bar).await,
                    Transport::QuinnStreamBbr => run_quinn(&args, case, seed, true, &bar).await,
                };
                let row = Row::new(&args, t, case, seed, run, started);
                if args.timeline.is_some() {
                    print_timeline(&row, &row.timeline);
                }
                tracing::debug!(wall = ?row.wall, "row done");
                if args.json {
                    println!("{}", row.json(&args));
                }
                if let Some(f) = &mut json_out {
                    use std::io::Write;
                    if let Err(e) = writeln!(f, "{}", row.json(&args)) {
                        eprintln!("loss_sweep: writing the JSON rows: {e}");
                        std::process::exit(1);
                    }
                }
                rows.push(row);
            }
        }
    }
    bar.finish_and_clear();
    if !args.json {
        print_table(&args, &rows);
        println!("({:.1} s wall)", wall.elapsed().as_secs_f64());
    }
    if let Some(path) = &args.plot {
        match plot(path, &rows, args.request) {
            Ok(()) => eprintln!("plot written to {}", path.display()),
            Err(e) => {
                eprintln!("could not draw the plot: {e}");
                std::process::exit(1);
            }
        }
    }
}
