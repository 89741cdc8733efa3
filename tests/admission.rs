//! A listener's admission of new connections (issue 25): address validation with a QUIC
//! Retry, a cap on handshakes in progress, and the application's filter, over real quinn
//! endpoints on the simulator.

use std::sync::Arc;
use std::time::Duration;

use surelink::channel::{AdmissionConfig, Channel, Config, Listener};
use surelink::sim::{Congestion, LinkConfig, Pair, PairConfig, SERVER_NAME};

fn pair(seed: u64) -> Pair {
    Pair::new(PairConfig {
        seed,
        congestion: Congestion::Surelink,
        ..PairConfig::symmetric(LinkConfig::lossy(Duration::from_millis(10), 0.0))
    })
    .unwrap()
}

fn with_admission(retry_above: usize, max_handshakes: usize) -> Config {
    let mut config = Config::default();
    let mut admission = AdmissionConfig::default();
    admission.retry_above = retry_above;
    admission.max_handshakes = max_handshakes;
    config.admission = admission;
    config
}

async fn connect(pair: &Pair) -> Result<(Channel, surelink::channel::Messages), String> {
    let mut config = Config::default();
    config.reconnect.attempt_timeout = Duration::from_secs(2);
    tokio::time::timeout(
        Duration::from_secs(5),
        Channel::connect(&pair.client, pair.server_addr, SERVER_NAME, None, config),
    )
    .await
    .map_err(|_| "timed out".to_owned())?
    .map_err(|e| e.to_string())
}

/// With a Retry for every unvalidated address, a client proves its address and connects one
/// round trip later; its channel works.
#[tokio::test(start_paused = true)]
async fn a_client_connects_through_a_retry() {
    let pair = pair(1);
    let mut listener = Listener::new(pair.server.clone(), with_admission(0, 16));
    let server = tokio::spawn(async move {
        let (_c, mut m) = listener.accept().await.expect("a channel");
        let got = m.recv().await.map(|d| d.payload);
        // Until the client closes: the ack goes out before anything here is dropped.
        while m.recv().await.is_some() {}
        (got, listener.admission())
    });
    let (channel, _messages) = connect(&pair).await.expect("connected through the retry");
    channel.send("pay").await.expect("acked");
    channel.close().await;
    let (got, admission) = server.await.unwrap();
    assert_eq!(got.as_deref(), Some(&b"pay"[..]));
    assert_eq!(admission.retries, 1, "{admission:?}");
    assert_eq!(admission.accepted, 1, "the validated attempt");
}

/// At the cap, attempts are ignored: nothing is answered and no handshake state is kept.
#[tokio::test(start_paused = true)]
async fn attempts_at_the_cap_are_ignored() {
    let pair = pair(2);
    let listener = Listener::new(pair.server.clone(), with_admission(usize::MAX, 0));
    let outcome = connect(&pair).await;
    assert!(outcome.is_err(), "connected past a cap of 0");
    let admission = listener.admission();
    assert!(admission.ignored >= 1, "{admission:?}");
    assert_eq!((admission.accepted, admission.in_progress), (0, 0));
}

/// The application's filter refuses an attempt before any work.
#[tokio::test(start_paused = true)]
async fn the_filter_refuses_before_any_work() {
    let pair = pair(3);
    let client_ip = pair.client.local_addr().unwrap().ip();
    let listener = Listener::with_filter(
        pair.server.clone(),
        Config::default(),
        Arc::new(move |incoming| incoming.remote_address().ip() != client_ip),
    );
    assert!(connect(&pair).await.is_err(), "a filtered client connected");
    assert_eq!(listener.admission().accepted, 0);
}
