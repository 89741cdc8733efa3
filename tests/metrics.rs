//! The metrics contract: a server's figures scraped over HTTP as Prometheus text equal what
//! `stats()` and the applications saw. One test runs client and server in this process over
//! the simulator (5% loss, so hedges, repair and retransmissions happen) with the Prometheus
//! exporter installed; another runs `payment_server --metrics ADDR` and `payment_client`
//! over real UDP.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::example;

use bytes::Bytes;
use quinn::rustls;
use surelink::channel::{
    client_config, server_config, Channel, ChannelStats, Config, Listener, SendOptions, GOODBYE,
};
use surelink::sim::{LinkConfig, SimNetwork, SERVER_NAME};
use surelink::wire::{Frame, HelloFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Prometheus text, parsed: every sample by name, with its labels.
struct Scrape {
    text: String,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// `GET http://addr/metrics` with a plain HTTP/1.1 request over TCP.
    async fn get(addr: SocketAddr) -> Scrape {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{head}"
        );
        Scrape::parse(body)
    }

    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect(line);
            let value: f64 = value.parse().expect(line);
            let (name, labels) = match series.split_once('{') {
                None => (series, BTreeMap::new()),
                Some((name, rest)) => {
                    let rest = rest.strip_suffix('}').expect(line);
                    let labels = rest
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(|l| {
                            let (k, v) = l.split_once('=').expect(line);
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (name, labels)
                }
            };
            samples.push((name.to_string(), labels, value));
        }
        Scrape {
            text: text.to_string(),
            samples,
        }
    }

    /// The sum of the samples of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// Like [`Scrape::sum`], for a counter: a whole number.
    fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let v = self.sum(name, labels);
        assert_eq!(v.fract(), 0.0, "{name} {labels:?} = {v}");
        v as u64
    }

    /// The values of label `label` among the samples of `name` with `role`, each with its sum.
    fn by(&self, name: &str, role: &str, label: &str) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (n, l, v) in &self.samples {
            if n == name && l.get("role").map(String::as_str) == Some(role) && *v != 0.0 {
                *out.entry(l[label].clone()).or_default() += *v as u64;
            }
        }
        out
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Installs the Prometheus exporter, as `payment_server --metrics` does.
fn install_exporter(addr: SocketAddr) {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full(surelink::metrics::SEND_LATENCY.into()),
            surelink::metrics::LATENCY_BUCKETS,
        )
        .unwrap()
        .install()
        .unwrap();
    surelink::metrics::describe();
}

fn endpoint(
    net: &SimNetwork,
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> quinn::Endpoint {
    quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        server,
        net.bind(addr).unwrap(),
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap()
}

/// A client config like surelink's, offering ALPN `alpn`.
fn client_with_alpn(roots: rustls::RootCertStore, alpn: &[u8]) -> quinn::ClientConfig {
    let provider = Arc::new(common::crypto_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// A hand-made surelink connection: the handshake, and a Hello for channel `[7; 16]`.
async fn raw_channel(
    endpoint: &quinn::Endpoint,
    roots: &rustls::RootCertStore,
    server: SocketAddr,
) -> quinn::Connection {
    let config = client_config(roots.clone()).unwrap();
    let raw = endpoint
        .connect_with(config, server, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let hello = Frame::Hello(HelloFrame {
        channel_id: [7; 16],
        floor: 0,
    })
    .to_bytes();
    let (mut send, mut recv) = raw.open_bi().await.unwrap();
    send.write_all(&hello).await.unwrap();
    send.finish().unwrap();
    recv.read_to_end(1).await.unwrap();
    raw
}

/// Waits (up to 20 s) until `ready` holds.
async fn until(what: &str, mut ready: impl FnMut() -> bool) {
    for _ in 0..400 {
        if ready() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Waits (up to 20 s) until a scrape satisfies `ready`; returns it.
async fn scrape_until(addr: SocketAddr, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
    let mut s = Scrape::get(addr).await;
    for _ in 0..400 {
        if ready(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = Scrape::get(addr).await;
    }
    panic!(
        "timed out waiting for {what} at {addr} ({} samples):\n{}",
        s.samples.len(),
        s.text
    );
}

/// The counters of several channels added up (a server's channels).
fn total(stats: &[ChannelStats], f: impl Fn(&ChannelStats) -> u64) -> u64 {
    stats.iter().map(f).sum()
}

const PAYMENTS: u32 = 60;
const LARGE: u32 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_figures_equal_stats() {
    let metrics_addr = free_port();
    install_exporter(metrics_addr);

    // A client and a server endpoint over the simulator, 5% loss each way.
    let net = SimNetwork::new(11);
    net.set_default_link(LinkConfig::lossy(Duration::from_millis(5), 0.05));
    let (cert, key) = surelink::sim::test_identity().unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let server_addr: SocketAddr = ([10, 0, 0, 2], 4433).into();
    let server_endpoint = endpoint(
        &net,
        server_addr,
        Some(server_config(vec![cert], key).unwrap()),
    );
    let client_endpoint = endpoint(&net, ([10, 0, 0, 1], 50_000).into(), None);

    // The server application: every channel's messages are taken and counted.
    let mut listener = Listener::new(server_endpoint, Config::default());
    let server = listener.server().clone();
    let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((channel, mut messages)) = listener.accept().await {
            let reader = tokio::spawn(async move {
                let mut n = 0u64;
                while messages.recv().await.is_some() {
                    n += 1;
                }
                n
            });
            accepted_tx.send((channel, reader)).unwrap();
        }
    });

    // The client: small payments (datagrams), two large ones (streams), one refused before
    // sending (an empty idempotency key).
    let (client, mut client_messages) = Channel::connect(
        &client_endpoint,
        server_addr,
        SERVER_NAME,
        Some(client_config(roots.clone()).unwrap()),
        Config::default(),
    )
    .await
    .unwrap();
    let mut sends = Vec::new();
    for i in 0..PAYMENTS + LARGE {
        let size = if i < PAYMENTS { 300 } else { 20_000 };
        let c = client.clone();
        sends.push(tokio::spawn(async move {
            c.send(Bytes::from(vec![i as u8; size])).await
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rejected = client
        .send_with(Bytes::from_static(b"x"), SendOptions::default().key(""))
        .await;
    assert!(rejected.is_err());
    let mut latencies = Vec::new();
    let mut failed = 0;
    for s in sends {
        match s.await.unwrap() {
            Ok(receipt) => latencies.push(receipt.latency.as_secs_f64()),
            Err(e) => {
                eprintln!("send failed: {e}");
                failed += 1;
            }
        }
    }
    let (main_channel, main_reader) = accepted.recv().await.unwrap();

    // Garbage: a hand-made connection with a valid Hello, then datagrams that do not decode.
    let raw = raw_channel(&client_endpoint, &roots, server_addr).await;
    let (garbage_channel, garbage_reader) = accepted.recv().await.unwrap();
    // An unknown version, an unknown type, a truncated shard, a broken ack.
    let garbage: [&[u8]; 4] = [
        &[0xff; 40],
        &[0x1f, 0, 0],
        &[0x11],
        &[0x12, 0xff, 0xff, 0xff],
    ];
    // Sent in rounds until eight were counted (the link loses 5%).
    let mut sent_garbage = 0u64;
    until("invalid frames at the server", || {
        if garbage_channel.stats().invalid_frames.values().sum::<u64>() >= 8 {
            return true;
        }
        for g in garbage {
            raw.send_datagram(Bytes::copy_from_slice(g)).unwrap();
            sent_garbage += 1;
        }
        false
    })
    .await;

    // A takeover: a second connection names the same channel while the first is open; the
    // server moves the channel to it and closes the first.
    let old = raw;
    let raw = raw_channel(&client_endpoint, &roots, server_addr).await;
    old.closed().await;

    // Refused connections: a client offering another ALPN, and one whose Hello is garbage.
    let bad_alpn = client_endpoint
        .connect_with(
            client_with_alpn(roots.clone(), b"not-surelink"),
            server_addr,
            SERVER_NAME,
        )
        .unwrap()
        .await;
    assert!(bad_alpn.is_err());
    let bad_hello = client_endpoint
        .connect_with(
            client_config(roots.clone()).unwrap(),
            server_addr,
            SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = bad_hello.open_bi().await.unwrap();
    send.write_all(&[0xff, 0xff, 0xff]).await.unwrap();
    send.finish().unwrap();
    bad_hello.closed().await;

    // While the channels run: the gauges.
    let refused =
        |s: &Scrape, reason| s.count("surelink_connections_refused_total", &[("reason", reason)]);
    let running = scrape_until(metrics_addr, "the refusals", |s| {
        refused(s, "invalid_hello") == 1 && refused(s, "tls") >= 1
    })
    .await;
    // (The bad-ALPN client may be refused more than once: when the server's close is lost,
    // its retransmitted Initial starts a new handshake.)
    assert_eq!(
        running.count("surelink_connections_refused_total", &[]),
        1 + refused(&running, "tls"),
        "{}",
        running.text
    );
    let server_channels = server.channels() as u64;
    assert_eq!(server_channels, 2);
    assert_eq!(
        running.count("surelink_channels_open", &[("role", "server")]),
        server_channels
    );
    assert_eq!(
        running.count("surelink_channels_open", &[("role", "client")]),
        1
    );
    assert_eq!(
        running.count("surelink_connections_open", &[("role", "server")]),
        2
    );
    assert_eq!(
        running.count("surelink_connections_open", &[("role", "client")]),
        1
    );
    assert_eq!(
        running.count("surelink_in_flight", &[("role", "client")]),
        0
    );
    assert_eq!(
        running.count("surelink_takeovers_total", &[("role", "server")]),
        1
    );
    assert_eq!(
        running.count("surelink_reconnects_total", &[("role", "server")]),
        1
    );
    let loss = running.sum("surelink_loss_estimate", &[("role", "client")]);
    assert!(loss > 0.0 && loss < 0.5, "client loss estimate {loss}");
    // What was measured, beside what is planned for (issue 26, item 3: the plan reads 2-3%
    // on a clean path, an alert belongs on the measurement).
    let observed = running.sum("surelink_loss_observed", &[("role", "client")]);
    assert!(
        (0.0..0.5).contains(&observed),
        "client loss observed {observed}"
    );
    assert!(running
        .text
        .contains("# TYPE surelink_messages_delivered_total counter"));
    assert!(running
        .text
        .contains("# TYPE surelink_send_latency_seconds histogram"));

    // End everything: the raw connection says goodbye, the client closes (over a lossless
    // link, so that no goodbye is lost); once each channel's Messages ends, its driver has
    // taken its last step.
    let lossless = LinkConfig {
        delay: Duration::from_millis(5),
        ..LinkConfig::default()
    };
    let client_addr = client_endpoint.local_addr().unwrap();
    net.set_link(client_addr, server_addr, lossless.clone());
    net.set_link(server_addr, client_addr, lossless);
    raw.close(GOODBYE.into(), b"done");
    client.close().await;
    assert!(client_messages.recv().await.is_none());
    let delivered = main_reader.await.unwrap();
    let garbage_delivered = garbage_reader.await.unwrap();
    assert_eq!(delivered, latencies.len() as u64);
    assert_eq!(garbage_delivered, 0);
    until("the server's channels to end", || server.channels() == 0).await;
    let s = scrape_until(metrics_addr, "every channel closed", |s| {
        s.count("surelink_channels_open", &[]) == 0
    })
    .await;
    eprintln!("{}", s.text);

    let c = client.stats();
    let servers = [main_channel.stats(), garbage_channel.stats()];
    let client_role = [("role", "client")];
    let server_role = [("role", "server")];

    // The client's sends: every outcome counted once, by kind.
    assert_eq!(
        s.count("surelink_messages_sent_total", &client_role),
        c.sender.messages_sent
    );
    assert_eq!(c.sender.messages_sent, u64::from(PAYMENTS + LARGE));
    assert_eq!(
        s.count("surelink_messages_acked_total", &client_role),
        latencies.len() as u64
    );
    assert_eq!(
        s.count(
            "surelink_messages_failed_total",
            &[("role", "client"), ("reason", "rejected")]
        ),
        1
    );
    assert_eq!(
        s.count("surelink_messages_failed_total", &client_role),
        1 + failed,
        "{failed} sends failed besides the rejected one"
    );
    assert_eq!(
        s.count("surelink_send_latency_seconds_count", &client_role),
        latencies.len() as u64
    );
    let sum = s.sum("surelink_send_latency_seconds_sum", &client_role);
    let expected: f64 = latencies.iter().sum();
    assert!((sum - expected).abs() < 1e-6, "{sum} vs {expected}");
    assert_eq!(
        s.count(
            "surelink_send_latency_seconds_bucket",
            &[("role", "client"), ("le", "+Inf")]
        ),
        latencies.len() as u64
    );

    // The client's redundancy, as its stats say.
    for (name, kind, value) in [
        ("surelink_shards_sent_total", None, c.sender.shards_sent),
        (
            "surelink_data_shards_sent_total",
            None,
            c.sender.data_shards,
        ),
        (
            "surelink_repair_shards_sent_total",
            None,
            c.sender.repair_shards,
        ),
        ("surelink_hedges_total", None, c.sender.hedges_fired),
        (
            "surelink_hedges_skipped_total",
            None,
            c.sender.hedges_skipped,
        ),
        ("surelink_retransmits_total", None, c.sender.retransmits),
        (
            "surelink_stream_messages_sent_total",
            None,
            c.stream_messages_sent,
        ),
        ("surelink_udp_bytes_sent_total", None, c.udp_bytes_sent),
        (
            "surelink_udp_bytes_received_total",
            None,
            c.udp_bytes_received,
        ),
        (
            "surelink_shard_bytes_sent_total",
            Some("first_flight"),
            c.sender.first_flight_bytes,
        ),
        (
            "surelink_shard_bytes_sent_total",
            Some("hedge"),
            c.sender.hedge_bytes,
        ),
        (
            "surelink_shard_bytes_sent_total",
            Some("retransmit"),
            c.sender.retransmit_bytes,
        ),
    ] {
        let mut labels = vec![("role", "client")];
        labels.extend(kind.map(|k| ("kind", k)));
        assert_eq!(s.count(name, &labels), value, "{name} {kind:?}");
    }
    assert_eq!(c.stream_messages_sent, u64::from(LARGE));
    // Redundancy was spent.
    assert!(c.sender.repair_shards > 0 && c.udp_bytes_sent > 0);

    // The server's side: deliveries as its application counted them, and as stats say.
    assert_eq!(
        s.count("surelink_messages_delivered_total", &server_role),
        delivered
    );
    assert_eq!(
        total(&servers, |st| st.receiver.delivered
            - st.receiver.discarded
            - st.duplicate_keys_elsewhere),
        delivered
    );
    assert_eq!(
        s.count("surelink_messages_delivered_total", &client_role),
        0
    );
    assert_eq!(
        s.count("surelink_shards_received_total", &server_role),
        total(&servers, |st| st.receiver.shards_received)
    );
    assert_eq!(
        s.count("surelink_duplicates_suppressed_total", &server_role),
        total(&servers, |st| st.receiver.duplicates_suppressed
            + st.receiver.duplicate_keys
            + st.duplicate_keys_elsewhere
            + st.receiver.claimed_before)
    );
    assert_eq!(
        s.count("surelink_reconnects_total", &server_role),
        total(&servers, |st| st.reconnects)
    );

    // Invalid frames by reason: exactly what the server's channels counted.
    let mut invalid = BTreeMap::new();
    for st in &servers {
        for (reason, n) in &st.invalid_frames {
            *invalid.entry(reason.to_string()).or_insert(0) += n;
        }
    }
    let reassembly: u64 = total(&servers, |st| {
        st.reassembly.checksum_failures
            + st.reassembly.shards_contradicting
            + st.reassembly.shards_malformed
    });
    assert_eq!(reassembly, 0, "no reassembly failures on this run");
    assert!(invalid.values().sum::<u64>() >= 8 && invalid.values().sum::<u64>() <= sent_garbage);
    assert_eq!(
        s.by("surelink_invalid_frames_total", "server", "reason"),
        invalid
    );

    // Everything ended: no channel, connection or message in flight is left in the gauges.
    for role in ["client", "server"] {
        for gauge in [
            "surelink_channels_open",
            "surelink_connections_open",
            "surelink_in_flight",
            "surelink_loss_estimate",
            "surelink_loss_observed",
            "surelink_reservations_held",
        ] {
            assert_eq!(s.sum(gauge, &[("role", role)]), 0.0, "{gauge} {role}");
        }
    }
    // Every series is surelink's, and none names a channel.
    for (name, labels, _) in &s.samples {
        assert!(name.starts_with("surelink_"), "{name}");
        for k in labels.keys() {
            assert!(
                ["role", "reason", "kind", "le"].contains(&k.as_str()),
                "{k}"
            );
        }
    }
}

/// The contract: `payment_server --metrics ADDR` serves Prometheus text at
/// `http://ADDR/metrics`, and `surelink_messages_delivered_total` counts what its
/// application received (its tally on exit), which is what `payment_client` had acked.
#[tokio::test]
async fn payment_server_serves_prometheus_text() {
    let dir = std::env::temp_dir().join(format!("surelink-metrics-{}", std::process::id()));
    let metrics_addr = free_port();
    let mut server = Command::new(example("payment_server"))
        .args(["--listen", "127.0.0.1:0", "--cert-dir"])
        .arg(&dir)
        .args(["--metrics", &metrics_addr.to_string()])
        .args(["--idle-exit-secs", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_string();

    let client = Command::new(example("payment_client"))
        .args(["--connect", &addr, "--ca"])
        .arg(dir.join("cert.der"))
        .args(["--count", "30", "--rate", "200", "--size", "200"])
        .output()
        .unwrap();
    let json = String::from_utf8(client.stdout).unwrap();
    assert!(client.status.success(), "{json}");
    assert!(json.contains("\"acked\":30"), "{json}");

    let s = scrape_until(metrics_addr, "30 deliveries", |s| {
        s.count("surelink_messages_delivered_total", &[("role", "server")]) == 30
    })
    .await;
    assert!(s
        .text
        .contains("# TYPE surelink_messages_delivered_total counter"));
    assert_eq!(
        s.count("surelink_invalid_frames_total", &[("role", "server")]),
        0
    );
    assert_eq!(s.count("surelink_connections_refused_total", &[]), 0);

    let killed = Command::new("kill")
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(killed.success());
    let mut tally = String::new();
    out.read_line(&mut tally).unwrap();
    server.wait().unwrap();
    assert!(tally.contains("\"delivered\":30,"), "{tally}");
    let _ = std::fs::remove_dir_all(dir);
}
