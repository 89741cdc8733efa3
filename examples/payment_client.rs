//! A payment client over real UDP: sends N payments at a fixed rate through surelink (or plain
//! quinn streams, the baseline) and reports send-to-ack latencies.
//!
//! ```text
//! cargo run --release --example payment_client -- --connect 127.0.0.1:4433 \
//!     --ca /tmp/pay/cert.der --count 2000 --rate 200 --size 512 \
//!     [--mode surelink|quinn-stream|quinn-stream-bbr]
//! # a high-rate run: 50,000 payments a second for 3 s
//! cargo run --release --example payment_client -- --connect 127.0.0.1:4433 \
//!     --ca /tmp/pay/cert.der --rate 50000 --duration-s 3 --size 512
//! ```
//!
//! Modes: `surelink` (a channel: coded shards in QUIC datagrams); `quinn-stream`, the
//! baseline: each payment a request on its own quinn bi-stream, quinn's defaults (Cubic);
//! `quinn-stream-bbr`, the same with quinn's BBR congestion controller, the stream baseline a
//! knowledgeable user would pick. The server's side of every connection uses surelink's
//! transport settings (`payment_server`).
//!
//! Payments leave open loop: payment `i` is due `i / rate` seconds after the first, whatever
//! became of the earlier ones (`--count N`, or `--duration-s S` for `rate × S` payments).
//! Each latency runs from the moment the payment's task starts; at high rates the client
//! itself can fall behind its schedule, so `send_lag_p99_ms` reports how late (p99) tasks
//! started against their due time, and `elapsed_s` the time from the first payment due to
//! the last outcome.
//!
//! `--connect A,B,C` names replicas of one service (the first preferred): the surelink mode
//! fails over between them (`Channel::connect_replicas`), which needs the replicas to share a
//! claims store (`payment_server --dedupe-url`).
//!
//! Each payload starts with its payment id (8 bytes, big endian: a random prefix for the run,
//! then a sequence number), so a server can spot duplicates across clients. Read as a signed
//! 64-bit number, it is the id `payment_server --deliveries` and `--ledger` record.
//!
//! With `--keyed` (surelink mode) every payment carries an idempotency key derived from its
//! id (`pay-ID`, ID in decimal), so a retry of the same payment reuses it; `--retries N` sends
//! a payment whose outcome was unknown (`SendError::may_have_been_delivered`) again, with the
//! same key and payload, up to N more times. Every payment ends in one outcome: acked, failed
//! with an unknown outcome (it may have been delivered), or failed definitely (it was not).
//!
//! With `--request` (surelink mode; issue 24) every payment is a request
//! (`Channel::request_with`, with its key under `--keyed`) and waits for the server
//! application's reply (`payment_server` answers `approved <payment id>`, after
//! `--reply-delay-ms`); a payment counts as acked when its reply came, and its latency is the
//! round trip from its first attempt's start to the reply. `--retries N` retries a request
//! whose outcome was unknown (`RequestError::may_have_been_delivered`) under the same key; a
//! retry of a request the server already answered gets the kept reply (`Reply::replayed`).
//!
//! Checking from outside (issue 23; the flags are a contract):
//!
//! - `--acked-ids FILE` writes the payment id (signed, decimal) of every acked payment, one
//!   per line, in the order the payments were sent; written once every payment has its
//!   outcome, before the JSON line.
//! - `--outcomes FILE` writes one CSV line per payment, with a header:
//!   `id,sent_unix_ms,outcome,latency_ms,attempts,error`: when its first attempt started
//!   (milliseconds since the Unix epoch), `acked`, `unknown` or `definite`, the time from that
//!   start to its outcome, how many times it was sent, and the last error's kind (empty when
//!   acked). With `--request` two more columns follow, `reply,replayed`: the reply (as text
//!   when it is printable ASCII without a comma or a quote, otherwise `hex:` and its bytes in
//!   hex; empty without one) and whether it was a kept reply replayed to a retry (`true`,
//!   `false`, empty without a reply).
//!
//! Prints one JSON line: `{"mode":..,"sent":N,"acked":A,"failed":F,"failed_unknown":U,
//! "failed_definite":D,"retries":R,"keyed":..,"p50_ms":..,"p90_ms":..,
//! "p99_ms":..,"p999_ms":..,"max_ms":..,"wire_bytes":..,"payload_bytes":..,"failovers":..,
//! "hedges_to_secondary":..,"send_lag_p99_ms":..,"elapsed_s":..,"rate":..,"data_shards":..,
//! "repair_shards":..,"hedges":..,"retransmits":..,"datagram_send_errors":..,
//! "loss_estimate":..,"queueing_delay_ms":..,"redundancy_cap":..,"shed_congested":..,
//! "request":..,"replies":..,"replies_replayed":..}`; `replies` counts the requests that got
//! their reply, `replies_replayed` those of them whose reply was kept from an earlier attempt
//! with the same key (both `null` without `--request`); the nine before `request` are
//! surelink's (first-flight data and parity shards, first hedges, later
//! resends, datagrams quinn refused, and from `ChannelStats` at the end: the loss estimate,
//! the queueing delay, the parity cap it allows, shards shed for congestion), `null` for the
//! baselines; `failovers` counts moves to
//! another replica and `hedges_to_secondary` hedges sent as copies to the warm standby replica
//! (`--hedge-to other|both`; both 0 for the baseline); latencies are of acked payments;
//! `wire_bytes` counts UDP payload bytes both ways; `failed` is `failed_unknown` plus
//! `failed_definite` (a failed baseline request counts as unknown), `retries` the sends
//! after the first. Exits 0 when every payment
//! was acked; exits 1 when some were not, 2 (with a message on stderr) when it could not
//! connect at all, for instance because the server requires a client certificate
//! (`payment_server --client-ca`) and none valid was given with `--cert FILE --key FILE`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use surelink::channel::{
    client_config_with, load_certs, Channel, Config, Identity, SendOptions, ServerTrust,
};
use surelink::proto::HedgeTo;
use surelink::sim::SERVER_NAME;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum HedgeTarget {
    Same,
    Other,
    Both,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// surelink: coded shards in QUIC datagrams, acks, hedges.
    Surelink,
    /// Each payment a request/response on its own quinn bi-stream (quinn defaults: Cubic).
    QuinnStream,
    /// The same with quinn's BBR congestion controller.
    QuinnStreamBbr,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Surelink => "surelink",
            Mode::QuinnStream => "quinn-stream",
            Mode::QuinnStreamBbr => "quinn-stream-bbr",
        }
    }
}

#[derive(Parser)]
#[command(about = "surelink payment client (real UDP, real TLS)")]
struct Args {
    /// Server address, or several replicas of one service, comma-separated, the first
    /// preferred (surelink mode fails over between them; the baseline uses the first).
    #[arg(long, value_delimiter = ',', required = true)]
    connect: Vec<SocketAddr>,
    /// The server's certificate (PEM or DER), trusted as the CA.
    #[arg(long)]
    ca: PathBuf,
    /// A client certificate chain to present (PEM or DER; with `--key`), for servers that
    /// require one.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (PEM or DER PKCS#8).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Payments to send.
    #[arg(
        long,
        required_unless_present = "duration_s",
        conflicts_with = "duration_s"
    )]
    count: Option<u64>,
    /// Send for this many seconds instead: `rate × duration` payments.
    #[arg(long)]
    duration_s: Option<f64>,
    /// Payments per second (open loop).
    #[arg(long)]
    rate: f64,
    /// Payment size in bytes (at least 8: the payment id).
    #[arg(long)]
    size: usize,
    /// Transport.
    #[arg(long, value_enum, default_value_t = Mode::Surelink)]
    mode: Mode,
    /// With several replicas: where hedges go while a warm standby is up (same: repair
    /// shards to the primary; other: a copy to the standby; both).
    #[arg(long, value_enum, default_value_t = HedgeTarget::Same)]
    hedge_to: HedgeTarget,
    /// A payment not acked within this many milliseconds fails (surelink mode).
    #[arg(long, default_value_t = 5000)]
    deadline_ms: u64,
    /// surelink mode: code payments sent within this many milliseconds of each other into
    /// one block (`SenderConfig::batching`, `BatchConfig::linger`); fewer datagrams at high
    /// rates, up to this much more latency. Off (0) by default.
    #[arg(long, default_value_t = 0)]
    batch_linger_ms: u64,
    /// surelink mode: give every payment an idempotency key derived from its id (`pay-ID`).
    #[arg(long)]
    keyed: bool,
    /// surelink mode, with `--keyed`: send a payment whose outcome was unknown again, with the
    /// same key, up to this many more times.
    #[arg(long, default_value_t = 0, requires = "keyed")]
    retries: u32,
    /// surelink mode: send every payment as a request and wait for the server application's
    /// reply (with its key under `--keyed`); latency is then the round trip.
    #[arg(long)]
    request: bool,
    /// Write the payment id of every acked payment to FILE, one per line (signed, decimal).
    #[arg(long, value_name = "FILE")]
    acked_ids: Option<PathBuf>,
    /// Write every payment's outcome to FILE as CSV:
    /// `id,sent_unix_ms,outcome,latency_ms,attempts,error`.
    #[arg(long, value_name = "FILE")]
    outcomes: Option<PathBuf>,
}

/// How one payment ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Acked,
    /// Failed; it may have been delivered.
    Unknown,
    /// Failed; it was not delivered.
    Definite,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Unknown => "unknown",
            Outcome::Definite => "definite",
        }
    }
}

/// One payment's record, for the summary and `--outcomes`.
struct Sent {
    /// The payment id as the servers record it (the payload's first 8 bytes, signed).
    id: i64,
    sent_unix_ms: f64,
    lag: Duration,
    outcome: Outcome,
    /// From its first attempt's start to its outcome.
    elapsed: Duration,
    attempts: u32,
    /// The last error's kind (`Timeout`, `ConnectionLost`, …); empty when acked.
    error: String,
    /// `--request`: the reply, and whether it was replayed from an earlier attempt.
    reply: Option<(Bytes, bool)>,
}

/// The variant name of `e` (`Timeout { id: 3 }` → `Timeout`).
fn kind(e: &impl std::fmt::Debug) -> String {
    let debug = format!("{e:?}");
    debug
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A reply for a CSV field: as text when it is printable ASCII without a comma or a quote,
/// otherwise `hex:` and its bytes in hex.
fn csv_reply(reply: &[u8]) -> String {
    let plain = reply
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b',' && b != b'"');
    if plain {
        String::from_utf8_lossy(reply).into_owned()
    } else {
        let hex: String = reply.iter().map(|b| format!("{b:02x}")).collect();
        format!("hex:{hex}")
    }
}

/// `A,B,C` for messages.
fn shown(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn payment(id: u64, size: usize) -> Bytes {
    let mut p = id.to_be_bytes().to_vec();
    p.resize(size.max(8), b'.');
    p.into()
}

fn percentile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("payment_client: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, Box<dyn std::error::Error>> {
    let mut roots = quinn::rustls::RootCertStore::empty();
    for ca in load_certs(&args.ca)? {
        roots.add(ca)?;
    }
    let identity = |args: &Args| match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Identity::from_files(cert, key).map(Some),
        _ => Ok(None),
    };
    let primary = args.connect[0];
    let bind: SocketAddr = if primary.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind)?;
    // Full handshakes only: payment data never travels in 0-RTT (RFC 9001 §9.2).
    let (channel, conn) = match args.mode {
        Mode::Surelink => {
            let mut config = Config::default();
            config.sender.deadline = Duration::from_millis(args.deadline_ms);
            if args.batch_linger_ms > 0 {
                config.sender.batching = true;
                config.sender.encoder.batch.linger = Duration::from_millis(args.batch_linger_ms);
            }
            config.sender.hedge_to = match args.hedge_to {
                HedgeTarget::Same => HedgeTo::Same,
                HedgeTarget::Other => HedgeTo::Other,
                HedgeTarget::Both => HedgeTo::Both,
            };
            // surelink's settings: ALPN surelink/2 (or 1), BBR, no early data; reconnects with the
            // same channel id if the connection is lost.
            let tls = Some(client_config_with(
                ServerTrust::Roots(roots),
                identity(&args)?,
            )?);
            let connected = if args.connect.len() == 1 {
                Channel::connect(&endpoint, primary, SERVER_NAME, tls, config).await
            } else {
                Channel::connect_replicas(&endpoint, &args.connect, SERVER_NAME, tls, config).await
            };
            let (channel, _messages) =
                connected.map_err(|e| format!("connecting to {}: {e}", shown(&args.connect)))?;
            (Some(channel), None)
        }
        Mode::QuinnStream | Mode::QuinnStreamBbr => {
            // The baseline: quinn's defaults (Cubic, or BBR); QUIC requires an ALPN id, so it
            // offers `quinn-stream`, which is how the server tells it from a surelink channel.
            let builder = quinn::rustls::ClientConfig::builder().with_root_certificates(roots);
            let mut tls = match identity(&args)? {
                Some(id) => builder.with_client_auth_cert(id.cert_chain, id.key)?,
                None => builder.with_no_client_auth(),
            };
            tls.alpn_protocols = vec![b"quinn-stream".to_vec()];
            let mut config = quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
            ));
            if args.mode == Mode::QuinnStreamBbr {
                let mut transport = quinn::TransportConfig::default();
                transport.congestion_controller_factory(Arc::new(
                    quinn::congestion::BbrConfig::default(),
                ));
                config.transport_config(Arc::new(transport));
            }
            let conn = endpoint
                .connect_with(config, primary, SERVER_NAME)?
                .await
                .map_err(|e| format!("connecting to {primary}: {e}"))?;
            (None, Some(conn))
        }
    };

    // Payment ids unique across runs: a random prefix for this run, then a sequence number.
    let run_prefix = u64::from(rand::random::<u32>()) << 32;
    let (keyed, retries) = (args.keyed && channel.is_some(), args.retries);
    let request = args.request && channel.is_some();
    let rate = args.rate.max(1e-3);
    // clap requires one of --count and --duration-s.
    let count = args
        .count
        .unwrap_or_else(|| (rate * args.duration_s.unwrap_or(0.0)).round().max(1.0) as u64);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(count as usize);
    for i in 0..count {
        let due = start + interval.mul_f64(i as f64);
        tokio::time::sleep_until(due).await;
        let id = run_prefix | i;
        let p = payment(id, args.size);
        let key = keyed.then(|| Bytes::from(format!("pay-{}", id as i64)));
        let (channel, conn) = (channel.clone(), conn.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = tokio::time::Instant::now();
            let sent_unix_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64()
                * 1000.0;
            let lag = t0 - due;
            let mut attempts = 0;
            let mut reply = None;
            let (outcome, error) = match (channel, conn) {
                // Requests: the same key and payload on every attempt, so the server's
                // application sees the request at most once and a retry gets its reply.
                (Some(c), _) if request => loop {
                    attempts += 1;
                    let options = match &key {
                        Some(k) => SendOptions::default().key(k.clone()),
                        None => SendOptions::default(),
                    };
                    match c.request_with(p.clone(), options).await {
                        Ok(r) => {
                            reply = Some((r.payload, r.replayed));
                            break (Outcome::Acked, String::new());
                        }
                        Err(e) if e.may_have_been_delivered() && attempts <= retries => {}
                        Err(e) if e.may_have_been_delivered() => {
                            break (Outcome::Unknown, kind(&e))
                        }
                        Err(e) => break (Outcome::Definite, kind(&e)),
                    }
                },
                (Some(c), _) => loop {
                    attempts += 1;
                    let result = match &key {
                        Some(k) => c.send_with_key(k.clone(), p.clone()).await,
                        None => c.send(p.clone()).await,
                    };
                    match result {
                        Ok(_) => break (Outcome::Acked, String::new()),
                        // The same key and payload: delivered at most once, whichever attempt.
                        Err(e) if e.may_have_been_delivered() && attempts <= retries => {}
                        Err(e) if e.may_have_been_delivered() => {
                            break (Outcome::Unknown, kind(&e))
                        }
                        Err(e) => break (Outcome::Definite, kind(&e)),
                    }
                },
                (None, None) => (Outcome::Definite, "NoConnection".to_string()),
                (None, Some(conn)) => {
                    attempts = 1;
                    let answered = async {
                        let (mut send, mut recv) = conn.open_bi().await.ok()?;
                        send.write_all(&p).await.ok()?;
                        send.finish().ok()?;
                        let answer = recv.read_to_end(64).await.ok()?;
                        (answer == b"ok").then_some(())
                    }
                    .await;
                    match answered {
                        Some(()) => (Outcome::Acked, String::new()),
                        None => (Outcome::Unknown, "Stream".to_string()),
                    }
                }
            };
            Sent {
                id: id as i64,
                sent_unix_ms,
                lag,
                outcome,
                elapsed: t0.elapsed(),
                attempts,
                error,
                reply,
            }
        }));
    }
    let mut sent = Vec::with_capacity(tasks.len());
    for t in tasks {
        match t.await {
            Ok(s) => sent.push(s),
            Err(e) => return Err(format!("a payment's task failed: {e}").into()),
        }
    }
    let latencies = {
        let mut l: Vec<Duration> = sent
            .iter()
            .filter(|s| s.outcome == Outcome::Acked)
            .map(|s| s.elapsed)
            .collect();
        l.sort();
        l
    };
    let mut lags: Vec<Duration> = sent.iter().map(|s| s.lag).collect();
    let count_of = |o: Outcome| sent.iter().filter(|s| s.outcome == o).count() as u64;
    let (failed_unknown, failed_definite) =
        (count_of(Outcome::Unknown), count_of(Outcome::Definite));
    let resends: u64 = sent
        .iter()
        .map(|s| u64::from(s.attempts.saturating_sub(1)))
        .sum();
    if let Some(path) = &args.acked_ids {
        let mut out = String::new();
        for s in sent.iter().filter(|s| s.outcome == Outcome::Acked) {
            out.push_str(&format!("{}\n", s.id));
        }
        std::fs::write(path, out).map_err(|e| format!("--acked-ids {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.outcomes {
        let mut out = String::from("id,sent_unix_ms,outcome,latency_ms,attempts,error");
        out.push_str(if request { ",reply,replayed\n" } else { "\n" });
        for s in &sent {
            out.push_str(&format!(
                "{},{:.3},{},{:.3},{},{}",
                s.id,
                s.sent_unix_ms,
                s.outcome.name(),
                s.elapsed.as_secs_f64() * 1000.0,
                s.attempts,
                s.error
            ));
            if request {
                match &s.reply {
                    Some((r, replayed)) => out.push_str(&format!(",{},{replayed}", csv_reply(r))),
                    None => out.push_str(",,"),
                }
            }
            out.push('\n');
        }
        let mut f = std::fs::File::create(path)
            .map_err(|e| format!("--outcomes {}: {e}", path.display()))?;
        f.write_all(out.as_bytes())?;
    }
    let elapsed = start.elapsed();
    lags.sort();
    // A TLS 1.3 client finishes its handshake before the server has judged its certificate,
    // so a baseline connection the server refuses (mutual TLS) only learns so a round trip
    // later: report that as the connection failure it is, like the surelink mode does.
    if let (Some(conn), true) = (&conn, latencies.is_empty()) {
        if let Some(e) = conn.close_reason() {
            return Err(format!("connecting to {primary}: {e}").into());
        }
    }
    let wire_bytes = match (&channel, &conn) {
        (Some(c), _) => {
            let st = c.stats();
            st.udp_bytes_sent + st.udp_bytes_received
        }
        (None, Some(conn)) => {
            let st = conn.stats();
            st.udp_tx.bytes + st.udp_rx.bytes
        }
        (None, None) => 0,
    };
    let acked = latencies.len() as u64;
    debug_assert_eq!(acked + failed_unknown + failed_definite, count);
    let (failovers, hedges_to_secondary) = channel.as_ref().map_or((0, 0), |c| {
        let st = c.stats();
        (st.failovers, st.sender.hedges_to_secondary)
    });
    // surelink's sender, `null` for the baseline: first-flight data and parity shards, first
    // hedges, later resends, datagrams quinn refused.
    let sender = channel.as_ref().map_or_else(
        || "\"data_shards\":null,\"repair_shards\":null,\"hedges\":null,\"retransmits\":null,\"datagram_send_errors\":null,\"loss_estimate\":null,\"queueing_delay_ms\":null,\"redundancy_cap\":null,\"shed_congested\":null".to_string(),
        |c| {
            let st = c.stats();
            format!(
                "\"data_shards\":{},\"repair_shards\":{},\"hedges\":{},\"retransmits\":{},\"datagram_send_errors\":{},\"loss_estimate\":{:.5},\"queueing_delay_ms\":{},\"redundancy_cap\":{:.3},\"shed_congested\":{}",
                st.sender.data_shards,
                st.sender.repair_shards,
                st.sender.hedges_fired,
                st.sender.retransmits,
                st.send_errors,
                st.loss_estimate,
                st.queueing_delay
                    .map_or("null".to_string(), |d| format!("{:.3}", d.as_secs_f64() * 1000.0)),
                st.redundancy_cap,
                st.sender.shed_congested
            )
        },
    );
    // `--request`: requests answered, and of them those answered with a kept reply.
    let replies = |replayed: bool| {
        if !request {
            return "null".to_string();
        }
        let n = sent
            .iter()
            .filter(|s| s.reply.as_ref().is_some_and(|r| r.1 || !replayed))
            .count();
        n.to_string()
    };
    println!(
        "{{\"mode\":\"{}\",\"sent\":{},\"acked\":{},\"failed\":{},\"failed_unknown\":{},\"failed_definite\":{},\"retries\":{},\"keyed\":{},\"p50_ms\":{:.3},\"p90_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3},\"wire_bytes\":{},\"payload_bytes\":{},\"failovers\":{},\"hedges_to_secondary\":{},\"send_lag_p99_ms\":{:.3},\"elapsed_s\":{:.3},\"rate\":{},{},\"request\":{},\"replies\":{},\"replies_replayed\":{}}}",
        args.mode.name(),
        count,
        acked,
        count - acked,
        failed_unknown,
        failed_definite,
        resends,
        keyed,
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.9),
        percentile_ms(&latencies, 0.99),
        percentile_ms(&latencies, 0.999),
        percentile_ms(&latencies, 1.0),
        wire_bytes,
        count * args.size.max(8) as u64,
        failovers,
        hedges_to_secondary,
        percentile_ms(&lags, 0.99),
        elapsed.as_secs_f64(),
        args.rate,
        sender,
        request,
        replies(false),
        replies(true),
    );
    if let Some(c) = &channel {
        c.close().await;
    }
    if let Some(conn) = &conn {
        conn.close(0u32.into(), b"done");
    }
    endpoint.wait_idle().await;
    Ok(acked == count)
}
