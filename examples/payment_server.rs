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
//! one JSON line: `{"delivered":N,"duplicates":D,"invalid_frames":X}`. `duplicates` counts
//! payments seen twice, judged by the payment id in each payload (its first 8 bytes, big
//! endian), independently of surelink's own dedupe.
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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use surelink::channel::{
    load_certs, server_config_mtls_with_protocols, server_config_with_protocols, Channel, Config,
    Identity, Server, ALPN_PROTOCOLS,
};

/// The ALPN id `payment_client --mode quinn-stream` offers.
const BASELINE_ALPN: &[u8] = b"quinn-stream";
use tokio::time::Instant;

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
    /// Serve metrics as Prometheus text at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
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

/// The channel config: with `--dedupe-url`, claims in PostgreSQL (swept of claims older
/// than a day).
async fn channel_config(args: &Args) -> Result<Config, Box<dyn std::error::Error>> {
    let Some(url) = &args.dedupe_url else {
        return Ok(Config::default());
    };
    #[cfg(feature = "postgres")]
    {
        let ttl = Duration::from_secs(24 * 3600);
        let store = Arc::new(surelink::store::PgStore::connect(url, ttl).await?);
        surelink::store::spawn_expiry(store.clone(), Duration::from_secs(600));
        let mut config = Config::default();
        config.store = Some(store);
        Ok(config)
    }
    #[cfg(not(feature = "postgres"))]
    Err(format!(
        "--dedupe-url {url}: built without the postgres feature (cargo run --features postgres …)"
    )
    .into())
}

#[derive(Default)]
struct Tally {
    delivered: u64,
    duplicates: u64,
    seen: HashSet<u64>,
    last: Option<Instant>,
    invalid_frames: u64,
}

impl Tally {
    fn record(&mut self, payload: &[u8]) {
        self.delivered += 1;
        let id = payload
            .get(..8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")));
        if let Some(id) = id {
            if !self.seen.insert(id) {
                self.duplicates += 1;
            }
        }
        self.last = Some(Instant::now());
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
    std::fs::write(&cert_path, cert.as_ref())?;
    std::fs::write(&key_path, key.secret_der())?;
    Ok((cert, key))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(addr) = args.metrics {
        // Before any channel opens: a channel registers its series when it starts.
        serve_metrics(addr)?;
    }
    let config = channel_config(&args).await?;
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
    let endpoint = quinn::Endpoint::server(server_config, args.listen)?;
    println!("listening on {}", endpoint.local_addr()?);

    let tally = Arc::new(Mutex::new(Tally::default()));
    let channels: Arc<Mutex<Vec<Channel>>> = Arc::default();
    let registry = Server::new(config);
    // Every connection's task, so that shutdown can wait for them to take what was acked.
    let serving: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let accept = {
        let (endpoint, tally, channels) = (endpoint.clone(), tally.clone(), channels.clone());
        let serving = serving.clone();
        tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                let (tally, channels, registry) =
                    (tally.clone(), channels.clone(), registry.clone());
                let mut serving = serving.lock().unwrap();
                serving.retain(|t| !t.is_finished());
                serving.push(tokio::spawn(async move {
                    let peer = incoming.remote_address();
                    let conn = match incoming.await {
                        Ok(conn) => conn,
                        Err(e) => {
                            eprintln!("payment_server: handshake with {peer} failed: {e}");
                            surelink::metrics::handshake_failed(peer, &e);
                            return;
                        }
                    };
                    serve(conn, registry, tally, channels).await;
                }));
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
    let invalid: u64 = channels
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.stats().invalid_frames.values().sum::<u64>())
        .sum();
    {
        let t = tally.lock().unwrap();
        println!(
            "{{\"delivered\":{},\"duplicates\":{},\"invalid_frames\":{}}}",
            t.delivered,
            t.duplicates,
            invalid + t.invalid_frames
        );
    }
    // Let the close reach the clients, but not for long.
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// One connection: a surelink channel (ALPN `surelink/2` or `surelink/1`), or the quinn-stream baseline
/// (ALPN `quinn-stream`: each payment on its own bi-stream, answered with "ok").
async fn serve(
    conn: quinn::Connection,
    registry: Server,
    tally: Arc<Mutex<Tally>>,
    channels: Arc<Mutex<Vec<Channel>>>,
) {
    let alpn = conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol);
    if alpn.is_some_and(|p| ALPN_PROTOCOLS.contains(&p.as_slice())) {
        match registry.accept_connection(conn).await {
            Ok(Some((channel, mut messages))) => {
                channels.lock().unwrap().push(channel);
                while let Some(m) = messages.recv().await {
                    tally.lock().unwrap().record(&m.payload);
                }
            }
            // A client that reconnected: its channel carries on.
            Ok(None) => {}
            Err(e) => eprintln!("payment_server: {e}"),
        }
        return;
    }
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let tally = tally.clone();
        tokio::spawn(async move {
            if let Ok(payload) = recv.read_to_end(1 << 20).await {
                tally.lock().unwrap().record(&payload);
                let _ = send.write_all(b"ok").await;
                let _ = send.finish();
            }
        });
    }
}
