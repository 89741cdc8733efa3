//! A payment server over real UDP: accepts surelink channels (and plain quinn streams, for the
//! baseline) and counts the payments it receives.
//!
//! ```text
//! cargo run --release --example payment_server -- --listen 127.0.0.1:4433 --cert-dir /tmp/pay
//! ```
//!
//! Writes its self-signed certificate to `DIR/cert.der` (reusing `DIR/cert.der` and
//! `DIR/key.der` when both exist), prints `listening on ADDR` once it accepts, and on exit
//! (after `--idle-exit-secs` without a payment once one arrived, or on SIGINT/SIGTERM) prints
//! one JSON line: `{"delivered":N,"duplicates":D,"invalid_frames":X,"replica":"NAME",
//! "payloads_without_id":S,"ledger_rows":L,"ledger_already":A,"ledger_failed":F,
//! "reservation_takeovers":T,"fenced_settles":E,"leases_expired":X,"replies":R}`.
//! `duplicates` counts payments seen twice, judged by the payment id in each payload (its
//! first 8 bytes, big endian), independently of surelink's own dedupe. `invalid_frames`
//! counts what `surelink_invalid_frames_total` counts, over every channel the server served:
//! frames that did not decode, and blocks that failed their CRC or carried contradicting or
//! malformed shards. The `ledger_*` fields
//! are for `--ledger` (0 without): rows this replica committed, payments whose claim was this
//! replica's but whose id was in the ledger already (should stay 0: a payment taken twice),
//! and transactions that failed (released, to come again). The last three count two-phase
//! claims over this replica's channels (`ChannelStats`): reservations it took over from a
//! replica whose lease ended, settles fenced because another replica took one over, and
//! settles that came after their own lease ended.
//!
//! With `--dedupe-url postgres://…` (feature `postgres`) deliveries are claimed in that
//! database before they are acked, so several servers sharing it are replicas of one service:
//! a client connected to them all (`payment_client --connect A,B,C`) fails over between them
//! and each payment is delivered once. Replicas share one identity: give them the same
//! `--cert-dir`.
//!
//! With `--client-ca FILE` (PEM or DER) the server requires every client, surelink or
//! baseline, to present a certificate issued by that CA (mutual TLS); a client without one
//! fails the handshake, and the server notes each refused handshake on stderr.
//!
//! With `--metrics ADDR` the server serves its metrics (every `surelink_*` series of
//! [`surelink::metrics`]: payments, deliveries, redundancy, invalid frames, channels open,
//! refused connections) as Prometheus text at `http://ADDR/metrics`:
//!
//! ```text
//! cargo run --release --example payment_server -- --listen 0.0.0.0:4433 --cert-dir /tmp/pay \
//!     --metrics 127.0.0.1:9464
//! curl -s http://127.0.0.1:9464/metrics | grep surelink_messages_delivered_total
//! ```
//!
//! Checking from outside (issue 23; the flags are a contract):
//!
//! - `--deliveries FILE` appends the payment id of every payment the application took (after
//!   `Messages::recv` returned it; with `--ledger`, once its transaction committed), one per
//!   line in decimal, written to the file (one `write` of the whole line, no buffer in this
//!   process) before the next payment is taken. The id is the payload's first 8 bytes, big
//!   endian, as a signed 64-bit number; a payload shorter than 8 bytes is counted
//!   (`"payloads_without_id"` in the JSON line, and a warning on stderr) and not written. The
//!   file is opened for appending, so a replica restarted with the same flags adds to it.
//! - `--replica-name NAME` names the replica on every log line (`replica=NAME`, and a
//!   `replica` span around its connections) and in the ledger; default: the address it
//!   listens on.
//! - `--dedupe-url URL --ledger` runs the inbox pattern: the channel reserves each payment in
//!   the shared store (`Config::store` with `Config::application_claims`) and hands it over
//!   with its reservation; the application then runs one transaction that settles the claim
//!   (`PgStore::claim_in` with `Claim::of`) and inserts the payment's row into
//!   `surelink_ledger(payment_id bigint primary key, replica text, at timestamptz)` (created
//!   if missing), commits, and only then confirms the payment (`Channel::confirm`), which
//!   acks it. Claimed before: rolled back, acked without a row. Busy (another replica holds
//!   or took over the reservation): rolled back, left to that replica, not acked here. A
//!   failed transaction: rolled back, `Channel::release` (the payment comes again).
//!
//! Requests (issue 24; `payment_client --request`): a request is answered with the reply
//! `approved <payment id>` (the id as `--deliveries` writes it; `approved` alone for a payload
//! without one), which acks it. `--reply-delay-ms D` is the application's processing time:
//! each request is answered D ms after it was taken (default 0: at once), requests being
//! processed side by side; the quinn-stream baseline's streams, which are requests and
//! replies too, are answered `ok` after the same delay. Plain messages are acked when taken,
//! as before. `"replies"` in the exit JSON counts the replies sent. (`--ledger` does not
//! answer requests.)
//!
//! Logs (surelink's and this program's, INFO and above) go to stderr.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use surelink::channel::{
    load_certs, server_config_mtls_with_protocols, server_config_with_protocols, Channel, Config,
    Identity, Messages, Server, ALPN_PROTOCOLS,
};
use tokio::time::Instant;
use tracing::Instrument;

/// The ALPN id `payment_client --mode quinn-stream` offers.
const BASELINE_ALPN: &[u8] = b"quinn-stream";

#[derive(Parser)]
#[command(about = "surelink payment server (real UDP, real TLS)")]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Directory for cert.der (and key.der).
    #[arg(long)]
    cert_dir: PathBuf,
    /// Exit after this many seconds without a payment, once at least one arrived.
    #[arg(long, default_value_t = 5)]
    idle_exit_secs: u64,
    /// Require client certificates issued by the CA in FILE (PEM or DER): mutual TLS.
    #[arg(long, value_name = "FILE")]
    client_ca: Option<PathBuf>,
    /// Claim deliveries in this PostgreSQL database (`postgres://user@host:port/db`), shared
    /// with other replicas: a client failing over between them delivers each payment once.
    /// Needs the `postgres` feature.
    #[arg(long, value_name = "URL")]
    dedupe_url: Option<String>,
    /// Answer health checks over HTTP at ADDR: `GET /healthz` is 200 while the process
    /// serves; `GET /readyz` is 200 while it accepts connections and its claims store
    /// (`--dedupe-url`) answers within a second, else 503 with the reason. Prints
    /// `health on ADDR` after `listening on`.
    #[arg(long, value_name = "ADDR")]
    health: Option<SocketAddr>,
    /// Serve metrics as Prometheus text at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Append the payment id of every payment the application took to FILE: one per line,
    /// decimal (the payload's first 8 bytes, big endian, as a signed 64-bit number), written
    /// to the file before the next payment is taken. Taken means returned by
    /// `Messages::recv`; with `--ledger`, its transaction committed (claim and ledger row).
    #[arg(long, value_name = "FILE")]
    deliveries: Option<PathBuf>,
    /// This replica's name, on every log line and in the ledger's `replica` column
    /// (default: the address it listens on).
    #[arg(long, value_name = "NAME")]
    replica_name: Option<String>,
    /// The inbox pattern (needs `--dedupe-url`): each payment's claim and its row in
    /// `surelink_ledger` commit in one transaction; the payment is acked after the commit.
    #[arg(long, requires = "dedupe_url")]
    ledger: bool,
    /// The application's processing time: answer each request (and each baseline stream)
    /// this many milliseconds after taking it.
    #[arg(long, value_name = "D", default_value_t = 0)]
    reply_delay_ms: u64,
}

/// `--health`: `/healthz` and `/readyz` over a minimal HTTP/1.1 (one request per
/// connection, answered and closed).
mod health {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use surelink::store::{Claim, DedupeStore};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Whether the server is ready: accepting, and its store (if any) answering.
    async fn ready(
        accepting: &AtomicBool,
        store: Option<&Arc<dyn DedupeStore>>,
    ) -> Result<(), String> {
        if !accepting.load(Ordering::Relaxed) {
            return Err("not accepting connections (shutting down)".into());
        }
        if let Some(store) = store {
            // A lookup of a claim nobody makes: a round trip to the store, nothing written.
            let probe = Claim::default();
            match tokio::time::timeout(Duration::from_secs(1), store.lookup(&probe)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("claims store: {e}")),
                Err(_) => return Err("claims store: no answer within 1 s".into()),
            }
        }
        Ok(())
    }

    pub(super) async fn serve(
        listener: tokio::net::TcpListener,
        accepting: Arc<AtomicBool>,
        store: Option<Arc<dyn DedupeStore>>,
    ) {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (accepting, store) = (accepting.clone(), store.clone());
            tokio::spawn(async move {
                let mut request = Vec::with_capacity(256);
                let mut buf = [0u8; 512];
                // The request line and headers, within 2 s and 4 KiB.
                let read = async {
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 4096 {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                };
                if tokio::time::timeout(Duration::from_secs(2), read)
                    .await
                    .is_err()
                {
                    return;
                }
                let line = String::from_utf8_lossy(&request);
                let path = line.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = match path {
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    "/readyz" => match ready(&accepting, store.as_ref()).await {
                        Ok(()) => ("200 OK", "ready\n".to_string()),
                        Err(why) => ("503 Service Unavailable", format!("{why}\n")),
                    },
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    }
}

/// Installs the Prometheus exporter: an HTTP listener on `addr`, the send latency as a
/// histogram with surelink's buckets.
fn serve_metrics(addr: SocketAddr) -> Result<(), Box<dyn std::error::Error>> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(surelink::metrics::SEND_LATENCY.into()),
            surelink::metrics::LATENCY_BUCKETS,
        )?
        .install()?;
    surelink::metrics::describe();
    Ok(())
}

/// Log lines (surelink's and this program's, INFO and above) on stderr, each starting with
/// `replica=NAME`: the channel's own tasks are not inside this program's spans, so the name
/// goes on every line rather than only in a span.
fn init_logs(replica: &str) {
    use tracing_subscriber::fmt::format::{Format, Writer};
    use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::registry::LookupSpan;

    struct Named(String, Format);
    impl<S, N> FormatEvent<S, N> for Named
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &tracing::Event<'_>,
        ) -> std::fmt::Result {
            write!(writer, "replica={} ", self.0)?;
            self.1.format_event(ctx, writer, event)
        }
    }

    let targets = tracing_subscriber::filter::Targets::new()
        .with_target("surelink", tracing::Level::INFO)
        .with_target("payment_server", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .event_format(Named(replica.to_string(), Format::default())),
        )
        .with(targets)
        .init();
}

/// The channel config: with `--dedupe-url`, claims in PostgreSQL (swept of claims older
/// than a day); with `--ledger` as well, the application claims (the inbox pattern), and the
/// store only reserves.
async fn channel_config(
    args: &Args,
    replica: &str,
) -> Result<(Config, Option<Arc<ledger::Ledger>>), Box<dyn std::error::Error>> {
    let Some(url) = &args.dedupe_url else {
        return Ok((Config::default(), None));
    };
    #[cfg(feature = "postgres")]
    {
        let ttl = Duration::from_secs(24 * 3600);
        let store = Arc::new(surelink::store::PgStore::connect(url, ttl).await?);
        surelink::store::spawn_expiry(store.clone(), Duration::from_secs(600));
        let mut config = Config::default();
        config.store = Some(store.clone());
        let ledger = if args.ledger {
            config.application_claims = true;
            Some(Arc::new(ledger::Ledger::new(store, replica).await?))
        } else {
            None
        };
        Ok((config, ledger))
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = replica;
        Err(format!(
            "--dedupe-url {url}: built without the postgres feature (cargo run --features postgres …)"
        )
        .into())
    }
}

/// The payment id of `payload`: its first 8 bytes, big endian, signed (the ledger's bigint).
fn payment_id(payload: &[u8]) -> Option<i64> {
    payload
        .get(..8)
        .map(|b| i64::from_be_bytes(b.try_into().expect("8 bytes")))
}

#[derive(Default)]
struct Tally {
    delivered: u64,
    duplicates: u64,
    seen: HashSet<i64>,
    last: Option<Instant>,
    invalid_frames: u64,
    /// Payloads shorter than a payment id (not written to `--deliveries`).
    without_id: u64,
    /// `--ledger`: rows committed, ids found in the ledger already, failed transactions.
    ledger_rows: u64,
    ledger_already: u64,
    ledger_failed: u64,
    /// Requests answered with a reply.
    replies: u64,
    /// `--deliveries`: written one whole line at a time, unbuffered.
    deliveries: Option<File>,
    /// The counters of channels that ended (their handles are let go, so that a server that
    /// serves many channels over its life does not keep every one).
    ended: Ended,
}

/// What the exit JSON sums over the channels.
#[derive(Default)]
struct Ended {
    /// Input that broke the wire format, as `surelink_invalid_frames_total` counts it:
    /// frames that did not decode and, from reassembly, blocks that failed their CRC and
    /// contradicting or malformed shards.
    invalid_frames: u64,
    reservation_takeovers: u64,
    fenced_settles: u64,
    leases_expired: u64,
}

impl Tally {
    /// A channel ended (or the server exits): its counters join the totals.
    fn ended(&mut self, s: &surelink::channel::ChannelStats) {
        let e = &mut self.ended;
        e.invalid_frames += s.invalid_frames.values().sum::<u64>()
            + s.reassembly.checksum_failures
            + s.reassembly.shards_contradicting
            + s.reassembly.shards_malformed;
        e.reservation_takeovers += s.reservation_takeovers;
        e.fenced_settles += s.fenced_settles;
        e.leases_expired += s.leases_expired;
    }

    /// A payment arrived (taken or not): it keeps the server from its idle exit.
    fn touch(&mut self) {
        self.last = Some(Instant::now());
    }

    /// The application took `payload`: counted, and its id appended to `--deliveries`.
    fn record(&mut self, payload: &[u8]) {
        self.delivered += 1;
        self.touch();
        let Some(id) = payment_id(payload) else {
            self.without_id += 1;
            tracing::warn!(
                len = payload.len(),
                count = self.without_id,
                "payment_server: payload shorter than its 8-byte payment id; not recorded"
            );
            return;
        };
        if !self.seen.insert(id) {
            self.duplicates += 1;
        }
        if let Some(file) = &mut self.deliveries {
            // One write of the whole line, straight to the file (no buffer in this process):
            // it is in the file before the next payment is taken, and outlives a SIGKILL.
            if let Err(e) = file.write_all(format!("{id}\n").as_bytes()) {
                // The record of takes is this program's contract: no silent gap in it.
                eprintln!("payment_server: writing payment {id} to --deliveries: {e}");
                std::process::exit(1);
            }
        }
    }
}

/// The identity in `dir`, or a new one written there.
fn identity(
    dir: &Path,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let (cert_path, key_path) = (dir.join("cert.der"), dir.join("key.der"));
    if cert_path.exists() && key_path.exists() {
        let cert = CertificateDer::from(std::fs::read(&cert_path)?);
        let key = PrivatePkcs8KeyDer::from(std::fs::read(&key_path)?);
        return Ok((cert, key.into()));
    }
    let (cert, key) = surelink::sim::test_identity()?;
    // Written under temporary names and renamed, key first: a replica starting at the same
    // moment, or one killed while writing, never sees a cert.der without its key.der.
    let tmp = |name: &str| dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(tmp("key.der"), key.secret_der())?;
    std::fs::write(tmp("cert.der"), cert.as_ref())?;
    std::fs::rename(tmp("key.der"), &key_path)?;
    std::fs::rename(tmp("cert.der"), &cert_path)?;
    Ok((cert, key))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(addr) = args.metrics {
        // Before any channel opens: a channel registers its series when it starts.
        serve_metrics(addr)?;
    }
    let (cert, key) = identity(&args.cert_dir)?;
    // surelink's settings: BBR, 0-RTT off; ALPN surelink/2 (then surelink/1 for older
    // clients) for channels and `quinn-stream` for the baseline, served on streams.
    let mut protocols: Vec<Vec<u8>> = ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
    protocols.push(BASELINE_ALPN.to_vec());
    let server_config = match &args.client_ca {
        None => server_config_with_protocols(vec![cert], key, protocols)?,
        Some(path) => {
            let mut roots = quinn::rustls::RootCertStore::empty();
            for ca in load_certs(path)? {
                roots.add(ca)?;
            }
            let identity = Identity {
                cert_chain: vec![cert],
                key,
            };
            server_config_mtls_with_protocols(identity, roots, protocols)?
        }
    };
    // Bound before the store connects (so that the default replica name is the real
    // address), but nothing is accepted until "listening on" is printed.
    let endpoint = quinn::Endpoint::server(server_config, args.listen)?;
    let local = endpoint.local_addr()?;
    let replica = args
        .replica_name
        .clone()
        .unwrap_or_else(|| local.to_string());
    init_logs(&replica);
    let (config, ledger) = channel_config(&args, &replica).await?;
    let store = config.store.clone();
    let mut tally = Tally::default();
    if let Some(path) = &args.deliveries {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("--deliveries {}: {e}", path.display()))?;
        tally.deliveries = Some(file);
    }
    tracing::info!(
        listen = %local,
        ledger = ledger.is_some(),
        store = args.dedupe_url.is_some(),
        "payment_server: ready"
    );
    println!("listening on {local}");
    let accepting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    if let Some(addr) = args.health {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("health on {}", listener.local_addr()?);
        tokio::spawn(health::serve(listener, accepting.clone(), store));
    }

    let tally = Arc::new(Mutex::new(tally));
    let channels: Arc<Mutex<Vec<Channel>>> = Arc::default();
    let registry = Server::new(config);
    let span = tracing::info_span!("replica", name = %replica);
    // Every connection's task, so that shutdown can wait for them to take what was acked.
    let serving: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let reply_delay = Duration::from_millis(args.reply_delay_ms);
    let accept = {
        let (endpoint, tally, channels) = (endpoint.clone(), tally.clone(), channels.clone());
        let serving = serving.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (tally, channels, registry) =
                    (tally.clone(), channels.clone(), registry.clone());
                let ledger = ledger.clone();
                let mut serving = serving.lock().unwrap();
                serving.retain(|t| !t.is_finished());
                serving.push(tokio::spawn(
                    async move {
                        let peer = incoming.remote_address();
                        let conn = match incoming.await {
                            Ok(conn) => conn,
                            Err(e) => {
                                // Counted, and logged by surelink at most a few lines a
                                // second (a handshake flood is not a log flood).
                                surelink::metrics::handshake_failed(peer, &e);
                                return;
                            }
                        };
                        tracing::info!(%peer, "payment_server: connection");
                        serve(conn, registry, tally, channels, ledger, reply_delay).await;
                    }
                    .instrument(span.clone()),
                ));
            }
        })
    };

    let idle = Duration::from_secs(args.idle_exit_secs);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                let last = tally.lock().unwrap().last;
                if last.is_some_and(|t| t.elapsed() >= idle) {
                    break;
                }
            }
        }
    }
    accepting.store(false, std::sync::atomic::Ordering::Relaxed);
    accept.abort();
    // Stop: close every connection (the close reaches clients, who fail over at once), then
    // let each channel hand over what it already acked before counting.
    endpoint.close(0u32.into(), b"server exiting");
    let tasks: Vec<_> = serving.lock().unwrap().drain(..).collect();
    let drained = async {
        for t in tasks {
            let _ = t.await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drained).await;
    {
        let mut t = tally.lock().unwrap();
        for c in channels.lock().unwrap().drain(..) {
            t.ended(&c.stats());
        }
        let (invalid, takeovers, fenced, late) = (
            t.ended.invalid_frames,
            t.ended.reservation_takeovers,
            t.ended.fenced_settles,
            t.ended.leases_expired,
        );
        println!(
            "{{\"delivered\":{},\"duplicates\":{},\"invalid_frames\":{},\"replica\":{:?},\"payloads_without_id\":{},\"ledger_rows\":{},\"ledger_already\":{},\"ledger_failed\":{},\"reservation_takeovers\":{takeovers},\"fenced_settles\":{fenced},\"leases_expired\":{late},\"replies\":{}}}",
            t.delivered,
            t.duplicates,
            invalid + t.invalid_frames,
            replica,
            t.without_id,
            t.ledger_rows,
            t.ledger_already,
            t.ledger_failed,
            t.replies,
        );
    }
    // Let the close reach the clients, but not for long.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// One connection: a surelink channel (ALPN `surelink/2` or `surelink/1`), or the quinn-stream baseline
/// (ALPN `quinn-stream`: each payment on its own bi-stream, answered with "ok" after
/// `reply_delay`).
async fn serve(
    conn: quinn::Connection,
    registry: Server,
    tally: Arc<Mutex<Tally>>,
    channels: Arc<Mutex<Vec<Channel>>>,
    ledger: Option<Arc<ledger::Ledger>>,
    reply_delay: Duration,
) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.is_some_and(|p| ALPN_PROTOCOLS.contains(&p.as_slice())) {
        match registry.accept_connection(conn).await {
            Ok(Some((channel, messages))) => {
                channels.lock().unwrap().push(channel.clone());
                match ledger {
                    Some(ledger) => ledger.serve(&channel, messages, &tally).await,
                    None => take_all(messages, &tally, reply_delay).await,
                }
                // Every message taken and the channel stopped: its counters go to the totals
                // and its handle goes (issue 25: the list grew by about 11 KiB per channel
                // ever opened).
                let id = channel.id();
                channels.lock().unwrap().retain(|c| c.id() != id);
                tally.lock().unwrap().ended(&channel.stats());
            }
            // A client that reconnected: its channel carries on.
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "payment_server: channel refused");
                eprintln!("payment_server: {e}");
            }
        }
        return;
    }
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let tally = tally.clone();
        tokio::spawn(async move {
            if let Ok(payload) = recv.read_to_end(1 << 20).await {
                tally.lock().unwrap().record(&payload);
                // The application's processing time, as for a surelink request.
                if !reply_delay.is_zero() {
                    tokio::time::sleep(reply_delay).await;
                }
                let _ = send.write_all(b"ok").await;
                let _ = send.finish();
            }
        });
    }
}

/// Without `--ledger`: taking a plain payment from `recv` is what acks it; a request is
/// answered `approved <payment id>` after `reply_delay` (the application's processing time;
/// requests are processed side by side), and the reply acks it.
async fn take_all(mut messages: Messages, tally: &Arc<Mutex<Tally>>, reply_delay: Duration) {
    let mut replying = tokio::task::JoinSet::new();
    while let Some(m) = messages.recv().await {
        tally.lock().unwrap().record(&m.payload);
        if !m.is_request() {
            continue;
        }
        let reply = match payment_id(&m.payload) {
            Some(id) => format!("approved {id}"),
            None => "approved".to_string(),
        };
        let tally = tally.clone();
        replying.spawn(async move {
            if !reply_delay.is_zero() {
                tokio::time::sleep(reply_delay).await;
            }
            match m.reply(reply) {
                Ok(()) => tally.lock().unwrap().replies += 1,
                // The channel stopped: the client learns the request's outcome from it.
                Err(e) => tracing::info!(msg = m.id, error = %e, "payment_server: reply not sent"),
            }
        });
        // Finished replies do not pile up over a long-lived channel.
        while replying.try_join_next().is_some() {}
    }
    while replying.join_next().await.is_some() {}
}

/// `--ledger`: the inbox pattern over PostgreSQL.
#[cfg(feature = "postgres")]
mod ledger {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use surelink::channel::{Channel, Delivered, Messages};
    use surelink::store::{Claim, Claimed, PgStore};
    use tokio_postgres::error::SqlState;

    use super::{payment_id, Tally};

    /// The ledger table (issue 23's contract).
    const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS surelink_ledger (
        payment_id bigint PRIMARY KEY,
        replica    text NOT NULL,
        at         timestamptz NOT NULL DEFAULT now()
    )";

    /// A transaction that has not ended after this long is abandoned (rolled back when its
    /// connection notices) and the payment released.
    const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

    /// How long a replica asks the ledger whether a failed transaction committed after all.
    const RESOLVE_FOR: Duration = Duration::from_secs(10);

    type Error = Box<dyn std::error::Error + Send + Sync>;

    /// How one payment's transaction ended.
    enum Ended {
        /// Claim and row committed.
        Committed,
        /// The claim was this replica's (`Now`) but the payment id was in the ledger already:
        /// rolled back.
        InLedger,
        /// The claim answered something else: rolled back.
        Claim(Claimed),
    }

    pub(super) struct Ledger {
        store: Arc<PgStore>,
        replica: String,
        /// Payments whose transaction failed in a way that may have committed (the commit's
        /// answer lost): finding one in the ledger later is this replica's own commit.
        uncertain: Mutex<HashSet<i64>>,
    }

    impl Ledger {
        /// Creates the ledger table if missing (on the store's connections).
        pub(super) async fn new(
            store: Arc<PgStore>,
            replica: &str,
        ) -> Result<Ledger, surelink::store::StoreError> {
            let conn = store.client().await?;
            // Two replicas creating it at the same moment: one of them may fail on the
            // catalog's unique index; the table then exists.
            if conn.batch_execute(SCHEMA).await.is_err() {
                conn.batch_execute(SCHEMA).await?;
            }
            Ok(Ledger {
                store,
                replica: replica.to_string(),
                uncertain: Mutex::default(),
            })
        }

        /// Runs each payment of the channel through its transaction, in order.
        pub(super) async fn serve(
            &self,
            channel: &Channel,
            mut messages: Messages,
            tally: &Mutex<Tally>,
        ) {
            while let Some(m) = messages.recv().await {
                self.take(channel, &m, tally).await;
            }
        }

        async fn take(&self, channel: &Channel, m: &Delivered, tally: &Mutex<Tally>) {
            let id = payment_id(&m.payload);
            tally.lock().unwrap().touch();
            let ended =
                tokio::time::timeout(TRANSACTION_TIMEOUT, self.transaction(channel, m, id)).await;
            match ended {
                Ok(Ok(Ended::Committed)) => {
                    // The take: recorded before the ack, so an acked payment is in the file.
                    let mut t = tally.lock().unwrap();
                    t.ledger_rows += u64::from(id.is_some());
                    t.record(&m.payload);
                    drop(t);
                    channel.confirm(m.id, Claimed::Now);
                }
                Ok(Ok(Ended::InLedger)) => {
                    let id = id.expect("only a payment with an id has a row");
                    if self.uncertain.lock().unwrap().remove(&id) {
                        // Its earlier transaction did commit; only the answer was lost.
                        tracing::info!(
                            id,
                            "payment_server: an earlier commit of this payment went through"
                        );
                        tally.lock().unwrap().record(&m.payload);
                    } else {
                        tally.lock().unwrap().ledger_already += 1;
                        tracing::error!(
                            id,
                            msg = m.id,
                            "payment_server: the store gave this replica the claim, but the payment is in the ledger already (taken twice?)"
                        );
                    }
                    channel.confirm(m.id, Claimed::Before);
                }
                Ok(Ok(Ended::Claim(Claimed::Now))) => unreachable!("Now commits"),
                Ok(Ok(Ended::Claim(
                    claimed @ (Claimed::Before | Claimed::Conflict | Claimed::Busy),
                ))) => {
                    tracing::info!(
                        id,
                        msg = m.id,
                        ?claimed,
                        "payment_server: not this replica's to take"
                    );
                    channel.confirm(m.id, claimed);
                }
                Ok(Ok(Ended::Claim(claimed))) => {
                    tracing::warn!(?claimed, "payment_server: unknown claim answer; released");
                    channel.release(m.id);
                }
                failed => {
                    let why = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no end within {TRANSACTION_TIMEOUT:?}"),
                    };
                    tally.lock().unwrap().ledger_failed += 1;
                    if let Some(id) = id {
                        // The commit may have gone through with its answer lost (the
                        // connection broke): ask the ledger, as an application must, before
                        // releasing a payment whose effect may be recorded.
                        match self.committed(id).await {
                            Some(true) => {
                                tracing::info!(id, error = %why, "payment_server: the transaction had committed; its answer was lost");
                                let mut t = tally.lock().unwrap();
                                t.ledger_rows += 1;
                                t.record(&m.payload);
                                drop(t);
                                channel.confirm(m.id, Claimed::Now);
                                return;
                            }
                            Some(false) => {}
                            None => {
                                self.uncertain.lock().unwrap().insert(id);
                            }
                        }
                    }
                    tracing::warn!(id, msg = m.id, error = %why, "payment_server: ledger transaction failed; released");
                    channel.release(m.id);
                    // The payment comes again with its sender's resend; no tight loop while
                    // the database is away.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }

        /// After a transaction that failed: whether this replica's row for payment `id` is in
        /// the ledger (it committed), asked until the database answers, at most
        /// [`RESOLVE_FOR`]; `None` if it never did.
        async fn committed(&self, id: i64) -> Option<bool> {
            let until = tokio::time::Instant::now() + RESOLVE_FOR;
            while tokio::time::Instant::now() < until {
                let asked = async {
                    let conn = self.store.client().await?;
                    let row = conn
                        .query_opt(
                            "SELECT replica FROM surelink_ledger WHERE payment_id = $1",
                            &[&id],
                        )
                        .await?;
                    Ok::<_, Error>(row.map(|r| r.get::<_, String>(0)))
                };
                match tokio::time::timeout(Duration::from_secs(1), asked).await {
                    Ok(Ok(row)) => return Some(row.as_deref() == Some(self.replica.as_str())),
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            None
        }

        /// One transaction: claim (settling the channel's reservation), ledger row, commit.
        async fn transaction(
            &self,
            channel: &Channel,
            m: &Delivered,
            id: Option<i64>,
        ) -> Result<Ended, Error> {
            let mut conn = self.store.client().await?;
            let tx = conn.transaction().await?;
            let claim = Claim::of(channel.id(), m).with_client(channel.key_scope());
            let claimed = self.store.claim_in(&*tx, &claim).await?;
            if claimed != Claimed::Now {
                tx.rollback().await?;
                return Ok(Ended::Claim(claimed));
            }
            if let Some(id) = id {
                let row = tx
                    .execute(
                        "INSERT INTO surelink_ledger (payment_id, replica, at) VALUES ($1, $2, now())",
                        &[&id, &self.replica],
                    )
                    .await;
                match row {
                    Ok(_) => {}
                    Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                        tx.rollback().await?;
                        return Ok(Ended::InLedger);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            tx.commit().await?;
            Ok(Ended::Committed)
        }
    }
}

/// Without the `postgres` feature there is no ledger (`--ledger` needs `--dedupe-url`, which
/// fails at start).
#[cfg(not(feature = "postgres"))]
mod ledger {
    use std::sync::Mutex;

    use surelink::channel::{Channel, Messages};

    use super::Tally;

    pub(super) enum Ledger {}

    impl Ledger {
        pub(super) async fn serve(&self, _: &Channel, _: Messages, _: &Mutex<Tally>) {
            match *self {}
        }
    }
}
