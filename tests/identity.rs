//! TLS identity over the simulator: CA trust and pinning, mutual TLS with the client's
//! identity visible to the server's application, and clear failures when trust is missing.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use surelink::channel::{
    client_config_with, server_config_mtls, Channel, Config, ConnectError, Identity, Listener,
    ServerTrust,
};
use surelink::sim::{LinkConfig, SimNetwork, TestCa, TestCert, SERVER_NAME};
use surelink::wire::{Frame, HelloFrame};

/// A directory of its own for one test's files.
fn dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("surelink-identity-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_pem(dir: &std::path::Path, name: &str, c: &TestCert) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key.pem")),
    );
    std::fs::write(&cert, &c.cert_pem).unwrap();
    std::fs::write(&key, &c.key_pem).unwrap();
    (cert, key)
}

struct World {
    net: SimNetwork,
    client: quinn::Endpoint,
    server_addr: SocketAddr,
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
        std::sync::Arc::new(quinn::TokioRuntime),
    )
    .unwrap()
}

/// A network with 10 ms each way, a client endpoint and a server endpoint with `server`.
fn world(server: quinn::ServerConfig) -> (World, quinn::Endpoint) {
    let net = SimNetwork::new(7);
    net.set_default_link(LinkConfig {
        delay: Duration::from_millis(10),
        ..LinkConfig::default()
    });
    let server_addr: SocketAddr = ([10, 0, 0, 2], 4433).into();
    let server = endpoint(&net, server_addr, Some(server));
    let client = endpoint(&net, ([10, 0, 0, 1], 50_000).into(), None);
    (
        World {
            net,
            client,
            server_addr,
        },
        server,
    )
}

async fn connect(w: &World, config: quinn::ClientConfig) -> Result<Channel, ConnectError> {
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        Channel::connect(
            &w.client,
            w.server_addr,
            SERVER_NAME,
            Some(config),
            Config::default(),
        ),
    )
    .await
    .expect("an outcome, not a hang");
    r.map(|(c, _messages)| c)
}

/// A server with a certificate from `server_ca`, requiring client certificates from
/// `client_ca`.
fn mtls_server(server_ca: &TestCa, client_ca: &TestCa) -> quinn::ServerConfig {
    let s = server_ca.server(SERVER_NAME).unwrap();
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(client_ca.cert()).unwrap();
    server_config_mtls(
        Identity {
            cert_chain: vec![s.cert],
            key: s.key.into(),
        },
        roots,
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn mutual_tls_names_the_client_to_the_server_application() {
    let d = dir("mtls");
    let (server_ca, client_ca) = (
        TestCa::new("servers").unwrap(),
        TestCa::new("shops").unwrap(),
    );
    let ca_file = d.join("server-ca.pem");
    std::fs::write(&ca_file, server_ca.cert_pem()).unwrap();
    let shop = client_ca.client("shop-17").unwrap();
    let (cert, key) = write_pem(&d, "shop-17", &shop);
    let (w, server) = world(mtls_server(&server_ca, &client_ca));
    let mut listener = Listener::new(server, Config::default());
    let config = client_config_with(
        ServerTrust::ca_file(&ca_file).unwrap(),
        Some(Identity::from_files(&cert, &key).unwrap()),
    )
    .unwrap();
    let client = connect(&w, config).await.expect("the handshake succeeds");
    let (server_channel, mut messages) = listener.accept().await.unwrap();
    // A message is acked once the server's application took it: receive while sending.
    let (sent, got) = tokio::join!(client.send(common::payment(1)), messages.recv());
    sent.unwrap();
    assert_eq!(common::number(&got.unwrap().payload), 1);
    let seen = server_channel.peer_identity().expect("the client's chain");
    assert_eq!(
        seen[0], shop.cert,
        "the server application sees the client's certificate"
    );
    let server_seen = client.peer_identity().expect("the server's chain");
    assert_ne!(server_seen[0], shop.cert);
    drop(w.net);
}

#[tokio::test(start_paused = true)]
async fn without_a_valid_client_certificate_the_handshake_fails_with_a_clear_error() {
    let (server_ca, client_ca, other_ca) = (
        TestCa::new("servers").unwrap(),
        TestCa::new("shops").unwrap(),
        TestCa::new("strangers").unwrap(),
    );
    let (w, server) = world(mtls_server(&server_ca, &client_ca));
    let mut listener = Listener::new(server, Config::default());
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(server_ca.cert()).unwrap();
    let stranger = other_ca.client("mallory").unwrap();
    for (what, identity) in [
        ("no client certificate", None),
        (
            "a certificate from another CA",
            Some(Identity {
                cert_chain: vec![stranger.cert.clone()],
                key: stranger.key.clone_key().into(),
            }),
        ),
    ] {
        let config = client_config_with(ServerTrust::Roots(roots.clone()), identity).unwrap();
        match connect(&w, config).await {
            Err(ConnectError::Connection(e)) => {
                let message = e.to_string();
                eprintln!("{what}: {message}");
                assert!(
                    message.contains("certificate") || message.contains("handshake"),
                    "{what}: a TLS error, got {message}"
                );
            }
            Err(e) => panic!("{what}: expected a refused handshake, got {e}"),
            Ok(_) => panic!("{what}: the handshake must fail"),
        }
    }
    assert!(
        tokio::time::timeout(Duration::from_secs(1), listener.accept())
            .await
            .is_err(),
        "no channel was opened"
    );
}

#[tokio::test(start_paused = true)]
async fn a_pinned_server_certificate_is_trusted_and_any_other_is_not() {
    let d = dir("pin");
    let ca = TestCa::new("servers").unwrap();
    let (real, other) = (
        ca.server(SERVER_NAME).unwrap(),
        ca.server(SERVER_NAME).unwrap(),
    );
    // The pin as a DER file, the way payment_server writes its certificate.
    let (real_pin, other_pin) = (d.join("real.der"), d.join("other.der"));
    std::fs::write(&real_pin, real.cert.as_ref()).unwrap();
    std::fs::write(&other_pin, other.cert.as_ref()).unwrap();
    let server_config =
        surelink::channel::server_config(vec![real.cert.clone()], real.key.clone_key().into())
            .unwrap();
    let (w, server) = world(server_config);
    let mut listener = Listener::new(server, Config::default());
    // The server's application takes what arrives (a message is acked once taken).
    tokio::spawn(async move {
        while let Some((_channel, mut messages)) = listener.accept().await {
            tokio::spawn(async move { while messages.recv().await.is_some() {} });
        }
    });
    let pinned = client_config_with(ServerTrust::pinned_file(&real_pin).unwrap(), None).unwrap();
    let client = connect(&w, pinned)
        .await
        .expect("the pinned certificate is trusted");
    assert!(client.send(common::payment(2)).await.is_ok());
    let wrong = client_config_with(ServerTrust::pinned_file(&other_pin).unwrap(), None).unwrap();
    match connect(&w, wrong).await {
        Err(ConnectError::Connection(e)) => {
            eprintln!("wrong pin: {e}");
            assert!(e.to_string().contains("certificate"), "{e}");
        }
        other => panic!("expected a certificate error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn certificate_and_key_files_in_pem_and_der_load_and_bad_ones_say_why() {
    let d = dir("files");
    let ca = TestCa::new("servers").unwrap();
    let s = ca.server(SERVER_NAME).unwrap();
    let (pem, key_pem) = write_pem(&d, "server", &s);
    let (der, key_der) = (d.join("server.der"), d.join("server.key.der"));
    std::fs::write(&der, s.cert.as_ref()).unwrap();
    std::fs::write(&key_der, s.key.secret_pkcs8_der()).unwrap();
    for (cert, key) in [(&pem, &key_pem), (&der, &key_der)] {
        let id = Identity::from_files(cert, key).unwrap();
        assert_eq!(id.cert_chain, vec![s.cert.clone()]);
        assert_eq!(id.key.secret_der(), s.key.secret_pkcs8_der());
    }
    // A chain: two certificates in one PEM file, in order.
    let chain = d.join("chain.pem");
    std::fs::write(&chain, format!("{}{}", s.cert_pem, ca.cert_pem())).unwrap();
    assert_eq!(
        surelink::channel::load_certs(&chain).unwrap(),
        vec![s.cert.clone(), ca.cert()]
    );
    let missing = surelink::channel::load_certs(d.join("nope.pem")).unwrap_err();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    let no_key = surelink::channel::load_key(&pem).unwrap_err();
    assert!(
        no_key.to_string().contains("no usable private key"),
        "{no_key}"
    );
    let no_cert = surelink::channel::load_certs(&key_pem).unwrap_err();
    assert!(no_cert.to_string().contains("no CERTIFICATE"), "{no_cert}");
}

/// A client config trusting `server_ca`, presenting `who`'s certificate.
fn client_as(server_ca: &TestCa, who: &TestCert) -> quinn::ClientConfig {
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(server_ca.cert()).unwrap();
    client_config_with(
        ServerTrust::Roots(roots),
        Some(Identity {
            cert_chain: vec![who.cert.clone()],
            key: who.key.clone_key().into(),
        }),
    )
    .unwrap()
}

/// Issue case 10: a channel id is not a bearer token. Under mutual TLS, a connection from
/// another valid client that names an existing channel's id is refused (REFUSED, counted),
/// and the channel stays with its own client.
#[tokio::test(start_paused = true)]
async fn another_client_identity_cannot_take_over_a_channel_by_its_id() {
    let (server_ca, client_ca) = (
        TestCa::new("servers").unwrap(),
        TestCa::new("shops").unwrap(),
    );
    let (shop, thief) = (
        client_ca.client("shop-17").unwrap(),
        client_ca.client("shop-99").unwrap(),
    );
    let (w, server) = world(mtls_server(&server_ca, &client_ca));
    let mut listener = Listener::new(server, Config::default());
    let client = connect(&w, client_as(&server_ca, &shop)).await.unwrap();
    let (_server_channel, mut messages) = listener.accept().await.unwrap();
    let (sent, got) = tokio::join!(client.send(common::payment(1)), messages.recv());
    sent.unwrap();
    assert_eq!(common::number(&got.unwrap().payload), 1);

    // The other client, with a valid certificate of its own, learned the channel id.
    let conn = w
        .client
        .connect_with(client_as(&server_ca, &thief), w.server_addr, SERVER_NAME)
        .unwrap()
        .await
        .expect("its own handshake is valid");
    let hello = Frame::Hello(HelloFrame {
        channel_id: client.id(),
        floor: 0,
    })
    .to_bytes();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1))
        .await
        .expect("an answer, not a hang");
    assert!(answer.is_err(), "no hello answer: {answer:?}");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the server closed the connection");
    match closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, quinn::VarInt::from_u32(2), "REFUSED")
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(listener.server().reattaches_refused(), 1);
    // The channel stays with its client: its messages still arrive and are acked.
    let (sent, got) = tokio::join!(client.send(common::payment(2)), messages.recv());
    sent.unwrap();
    assert_eq!(common::number(&got.unwrap().payload), 2);
    assert_eq!(client.stats().reconnects, 0);
    drop(w.net);
}

/// A second server endpoint on `w`'s network, at `addr`, with `server`.
fn second_server(w: &World, addr: SocketAddr, server: quinn::ServerConfig) -> quinn::Endpoint {
    endpoint(&w.net, addr, Some(server))
}

/// A channel to the server at `addr`.
async fn connect_to(
    w: &World,
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> (Channel, surelink::channel::Messages) {
    tokio::time::timeout(
        Duration::from_secs(20),
        Channel::connect(
            &w.client,
            addr,
            SERVER_NAME,
            Some(config),
            Config::default(),
        ),
    )
    .await
    .expect("an outcome, not a hang")
    .unwrap()
}

/// Sends `payload` under `key` on `client` while taking the next message from `messages`
/// (within 5 s): the receipt, and what was delivered (`None`: nothing).
async fn pay(
    client: &Channel,
    messages: &mut surelink::channel::Messages,
    key: &'static str,
    payload: &'static str,
) -> (surelink::channel::Receipt, Option<bytes::Bytes>) {
    let (sent, got) = tokio::join!(
        client.send_with_key(key, payload),
        tokio::time::timeout(Duration::from_secs(5), messages.recv())
    );
    (
        sent.unwrap_or_else(|e| panic!("{key} {payload:?}: {e}")),
        got.ok().flatten().map(|m| m.payload),
    )
}

/// Issue 21 case 6: idempotency keys are the client's own. Under mutual TLS two clients
/// both pay "order-42" (the same payload) and "order-43" (different payloads) on one server
/// without a store: each of the four payments is delivered once and acked as delivered, and
/// a client's own retry is still a replay. Before, every client's keys were one namespace:
/// the second client's "order-42" was acked as a replay and never delivered, and its
/// "order-43" refused as a key reused.
#[tokio::test(start_paused = true)]
async fn two_clients_keys_are_their_own() {
    let (server_ca, client_ca) = (
        TestCa::new("servers").unwrap(),
        TestCa::new("shops").unwrap(),
    );
    let (shop, other) = (
        client_ca.client("shop-17").unwrap(),
        client_ca.client("shop-99").unwrap(),
    );
    let (w, server) = world(mtls_server(&server_ca, &client_ca));
    let mut listener = Listener::new(server, Config::default());
    let a = connect(&w, client_as(&server_ca, &shop)).await.unwrap();
    let (a_server, mut a_messages) = listener.accept().await.unwrap();
    let b = connect(&w, client_as(&server_ca, &other)).await.unwrap();
    let (b_server, mut b_messages) = listener.accept().await.unwrap();
    for (key, a_pays, b_pays) in [
        ("order-42", "pay 10.00 EUR", "pay 10.00 EUR"),
        ("order-43", "pay 7.00 EUR", "pay 5.00 EUR"),
    ] {
        let (receipt, got) = pay(&a, &mut a_messages, key, a_pays).await;
        assert!(!receipt.replayed);
        assert_eq!(got.as_deref(), Some(a_pays.as_bytes()));
        let (receipt, got) = pay(&b, &mut b_messages, key, b_pays).await;
        assert!(
            !receipt.replayed,
            "{key}: the other client's key, not a replay"
        );
        assert_eq!(got.as_deref(), Some(b_pays.as_bytes()), "{key}");
    }
    // A client's own retry is a replay: acked, not delivered again.
    let (receipt, got) = pay(&a, &mut a_messages, "order-42", "pay 10.00 EUR").await;
    assert!(receipt.replayed);
    assert_eq!(got, None);
    // Each client's keys are scoped by its certificate.
    assert_ne!(a_server.key_scope(), b_server.key_scope());
    assert_ne!(a_server.key_scope(), surelink::proto::ANONYMOUS);
    assert_eq!(a.key_scope(), surelink::proto::ANONYMOUS, "a client's peer");
    drop(w.net);
}

/// Issue 21 case 6 across replicas: two servers share a claims store; two clients with
/// their own certificates pay "order-42" (the same payload), one at each replica. Both are
/// delivered. Before, the store's keys were one namespace: the second claim was "claimed
/// before", acked, and never delivered.
#[tokio::test(start_paused = true)]
async fn two_clients_keys_are_their_own_across_replicas() {
    let (server_ca, client_ca) = (
        TestCa::new("servers").unwrap(),
        TestCa::new("shops").unwrap(),
    );
    let (shop, other) = (
        client_ca.client("shop-17").unwrap(),
        client_ca.client("shop-99").unwrap(),
    );
    let store = std::sync::Arc::new(surelink::store::MemoryStore::default());
    let mut config = Config::default();
    config.store = Some(store.clone());
    let (w, server) = world(mtls_server(&server_ca, &client_ca));
    let replica_addr: SocketAddr = ([10, 0, 0, 3], 4433).into();
    let replica = second_server(&w, replica_addr, mtls_server(&server_ca, &client_ca));
    let mut first = Listener::new(server, config.clone());
    let mut second = Listener::new(replica, config);
    let (a, _) = connect_to(&w, w.server_addr, client_as(&server_ca, &shop)).await;
    let (_, mut a_messages) = first.accept().await.unwrap();
    let (b, _) = connect_to(&w, replica_addr, client_as(&server_ca, &other)).await;
    let (_, mut b_messages) = second.accept().await.unwrap();
    let (receipt, got) = pay(&a, &mut a_messages, "order-42", "pay 10.00 EUR").await;
    assert!(!receipt.replayed);
    assert!(got.is_some());
    let (receipt, got) = pay(&b, &mut b_messages, "order-42", "pay 10.00 EUR").await;
    assert!(!receipt.replayed, "the other client's key, not a replay");
    assert!(got.is_some(), "delivered at the second replica");
    assert_eq!(store.len(), 2);
    drop(w.net);
}

/// Opens a raw connection as `who` to `addr` and sends a Hello naming `channel`: the
/// server's one-byte answer, or the code it closed the connection with.
async fn hello_as(
    w: &World,
    addr: SocketAddr,
    who: quinn::ClientConfig,
    channel: [u8; 16],
) -> Result<u8, quinn::VarInt> {
    let conn = w
        .client
        .connect_with(who, addr, SERVER_NAME)
        .unwrap()
        .await
        .expect("its own handshake is valid");
    let hello = Frame::Hello(HelloFrame {
        channel_id: channel,
        floor: 0,
    })
    .to_bytes();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&hello).await.unwrap();
    send.finish().unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1))
        .await
        .expect("an answer, not a hang");
    if let Ok(answer) = answer {
        conn.close(0u32.into(), b"");
        return Ok(answer[0]);
    }
    match tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("the server closed the connection")
    {
        quinn::ConnectionError::ApplicationClosed(c) => Err(c.error_code),
        other => panic!("expected a close, got {other}"),
    }
}

/// Issue 21 case 7: with a shared claims store, a replica that never held channel X no
/// longer answers any identity that presents X's id. A second client, with a valid
/// certificate of its own, that learned the id is refused there (REFUSED, counted as
/// `not_owner`); X's own client may still move there (the replica answers that it judges by
/// the store), and X keeps working where it is. Before, the replica took the channel over
/// for whoever came first: the thief could claim X's future message ids, and X's later
/// payments were acked as claimed before and never delivered.
#[tokio::test(start_paused = true)]
async fn another_identity_cannot_take_a_channel_over_at_another_replica() {
    let (server_ca, client_ca) = (
        TestCa::new("servers").unwrap(),
        TestCa::new("shops").unwrap(),
    );
    let (shop, thief) = (
        client_ca.client("shop-17").unwrap(),
        client_ca.client("shop-99").unwrap(),
    );
    let store = std::sync::Arc::new(surelink::store::MemoryStore::default());
    let mut config = Config::default();
    config.store = Some(store.clone());
    let (w, server) = world(mtls_server(&server_ca, &client_ca));
    let replica_addr: SocketAddr = ([10, 0, 0, 3], 4433).into();
    let replica = second_server(&w, replica_addr, mtls_server(&server_ca, &client_ca));
    let mut first = Listener::new(server, config.clone());
    let second = Listener::new(replica, config);
    let (client, _) = connect_to(&w, w.server_addr, client_as(&server_ca, &shop)).await;
    let (_, mut messages) = first.accept().await.unwrap();
    let (receipt, got) = pay(&client, &mut messages, "order-1", "pay 1.00 EUR").await;
    assert!(!receipt.replayed && got.is_some());

    let refused = hello_as(&w, replica_addr, client_as(&server_ca, &thief), client.id()).await;
    assert_eq!(refused, Err(quinn::VarInt::from_u32(2)), "REFUSED");
    assert_eq!(second.server().reattaches_refused(), 1);
    assert_eq!(second.server().channels(), 0, "nothing taken over");
    // The channel's own client may fail over there: the replica takes it over.
    let owner = hello_as(&w, replica_addr, client_as(&server_ca, &shop), client.id()).await;
    assert_eq!(owner, Ok(surelink::wire::HELLO_CLAIMS));
    // And the channel works where it is.
    let (receipt, got) = pay(&client, &mut messages, "order-2", "pay 2.00 EUR").await;
    assert!(!receipt.replayed);
    assert_eq!(got.as_deref(), Some(&b"pay 2.00 EUR"[..]));
    assert_eq!(client.stats().reconnects, 0);
    drop(w.net);
}

/// rustls' crypto provider as the crate's features choose it.
fn crypto_provider() -> std::sync::Arc<quinn::rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(common::crypto_provider())
}

/// A client config as an older surelink built it: ALPN `surelink/1` only, by hand.
fn v1_client(roots: quinn::rustls::RootCertStore) -> quinn::ClientConfig {
    let mut tls = quinn::rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&quinn::rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"surelink/1".to_vec()];
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    config.transport_config(std::sync::Arc::new(surelink::channel::transport_config()));
    config
}

/// The protocol version over ALPN: a client of an older version, offering only
/// `surelink/1`, still gets receipts from today's server, and both ends of its channel speak
/// protocol 1 (a replay is acked like a delivery); two current peers speak 2.
#[tokio::test(start_paused = true)]
async fn protocol_versions_are_negotiated_over_alpn() {
    assert_eq!(surelink::channel::ALPN, b"surelink/1");
    assert_eq!(surelink::channel::ALPN_V2, b"surelink/2");
    let ca = TestCa::new("servers").unwrap();
    let s = ca.server(SERVER_NAME).unwrap();
    let server_config =
        surelink::channel::server_config(vec![s.cert.clone()], s.key.clone_key().into()).unwrap();
    let (w, server) = world(server_config);
    let mut listener = Listener::new(server, Config::default());
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(ca.cert()).unwrap();

    let old = connect(&w, v1_client(roots.clone())).await.unwrap();
    let (old_server, mut old_messages) = listener.accept().await.unwrap();
    assert_eq!((old.protocol(), old_server.protocol()), (1, 1));
    let (receipt, got) = pay(&old, &mut old_messages, "order-1", "pay 1.00 EUR").await;
    assert!(!receipt.replayed);
    assert_eq!(got.as_deref(), Some(&b"pay 1.00 EUR"[..]));
    let (receipt, got) = pay(&old, &mut old_messages, "order-1", "pay 1.00 EUR").await;
    assert_eq!(got, None, "a replay is not delivered again");
    assert!(
        !receipt.replayed,
        "protocol 1 acks a replay like a delivery"
    );

    let current = connect(
        &w,
        client_config_with(ServerTrust::Roots(roots), None).unwrap(),
    )
    .await
    .unwrap();
    let (current_server, mut current_messages) = listener.accept().await.unwrap();
    assert_eq!((current.protocol(), current_server.protocol()), (2, 2));
    let (receipt, got) = pay(&current, &mut current_messages, "order-2", "pay 2.00 EUR").await;
    assert!(!receipt.replayed && got.is_some());
    let (receipt, got) = pay(&current, &mut current_messages, "order-2", "pay 2.00 EUR").await;
    assert!(receipt.replayed && got.is_none(), "protocol 2 says so");
    drop(w.net);
}
