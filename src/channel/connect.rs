//! Connect and accept helpers: configs with surelink's transport settings, the client's
//! first connection (later ones are the core's decision, see [`crate::proto::link`]), and
//! the server's registry of channels (reattach by id, identity check, shutdown).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::mpsc;

use super::congestion::SilenceFloorConfig;
use super::dial::{Dialer, REFUSED};
use super::driver::{self, Reattach};
use super::{Channel, ChannelId, Command, Config, Messages, SendError};
use crate::proto::link::{Attached, SharedKeys};
use crate::proto::{Scope, ANONYMOUS};
use crate::wire::{Frame, HelloFrame, Limits, HELLO_CLAIMS, HELLO_NEW, HELLO_RESUMED};

/// The ALPN protocol id of surelink's first protocol version, `surelink/1`. Clients still
/// offer it after [`ALPN_V2`] and servers still accept it, so that peers of older versions
/// keep working; a channel over it speaks protocol 1 ([`Channel::protocol`]).
pub const ALPN: &[u8] = b"surelink/1";

/// The ALPN protocol id of protocol version 2, `surelink/2` (replays reported as such, keys
/// reused with another payload refused: `docs/PROTOCOL.md`).
pub const ALPN_V2: &[u8] = b"surelink/2";

/// Every ALPN id of surelink, in preference order: what surelink's client configs offer and
/// its server configs accept. A server picks the first of its own list that the client
/// offers (rustls decides by the server's order), so two current peers speak 2 and a peer
/// of an older version, offering only [`ALPN`], speaks 1.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [ALPN_V2, ALPN];

/// [`ALPN_PROTOCOLS`] as a TLS config takes them.
pub(super) fn alpn_protocols() -> Vec<Vec<u8>> {
    ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect()
}

/// The protocol version `conn` negotiated: 1 for [`ALPN`], 2 for [`ALPN_V2`] and for a
/// connection with neither (an application's own connection: [`Channel::open`]).
pub(super) fn negotiated_protocol(conn: &quinn::Connection) -> u8 {
    let alpn = conn.handshake_data().and_then(|d| {
        d.downcast::<quinn::crypto::rustls::HandshakeData>()
            .ok()?
            .protocol
    });
    match alpn.as_deref() {
        Some(ALPN) => 1,
        _ => 2,
    }
}

/// Transport settings for surelink connections.
///
/// - **BBR congestion control.** Measured on the simulator (README, "Congestion"): under 10%
///   random loss quinn's default Cubic shrinks its window at every lost packet and holds
///   queued DATAGRAMs back, so 23–28% of payments missed a 5 s deadline; with BBR, which
///   paces by measured bandwidth and round trip rather than by loss, all were acked with a
///   p99 near one round trip. BBR still bounds what is in flight by its bandwidth-delay
///   estimate, so redundancy cannot flood a path that is truly congested.
/// - **Probes get through an outage.** BBR is wrapped in a [`SilenceFloorConfig`]: after
///   500 ms without an acknowledgement a few packets may go beyond the congestion window
///   (which is full of packets lost in the outage), so the surelink sender's probes leave
///   at their fixed interval instead of waiting for quinn's doubling probe timeout, and the
///   first one through the returned link ends the silence.
/// - Keep-alives every second and a 10 s idle timeout, so a dead path is noticed (and a
///   client reconnects) in seconds while a 2 s blackout does not end the connection.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.congestion_controller_factory(congestion_controller());
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(10)).expect("10 s is a valid timeout"),
    ));
    t.ack_frequency_config(Some(ack_frequency_config()));
    t
}

/// surelink's congestion controller: BBR, wrapped so that a silent path stays probe-able
/// ([`SilenceFloorConfig`]). Part of [`transport_config`]; for transport configs built
/// another way.
pub fn congestion_controller() -> Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> {
    Arc::new(SilenceFloorConfig::new(
        Arc::new(quinn::congestion::BbrConfig::default()),
        SILENCE,
        SILENCE_FLOOR,
    ))
}

/// No acknowledgement for this long makes the path silent ([`SilenceFloorConfig`]). 100 ms
/// was measured first: the same in virtual time, but over real UDP with bursty loss (5% in
/// bursts of 4) it stalled channels for seconds (p99 2.2 s against 107 ms with plain BBR),
/// and a 2 s blackout left 231 payments failing. At 500 ms: p99 106 ms, and 2 s and 5 s
/// blackouts over real UDP recover in 406 and 911 ms with none failing.
const SILENCE: Duration = Duration::from_millis(500);

/// Bytes a silent path may carry beyond what is in flight: a few probes.
const SILENCE_FLOOR: u64 = 4 * 1500;

/// The QUIC ACK frequency surelink asks of its peer: an ACK after 8 ack-eliciting packets
/// (quinn's default is every other one) or after the peer's usual `max_ack_delay`.
///
/// surelink acknowledges messages itself, in its own ack datagrams, and never waits for QUIC
/// to retransmit a DATAGRAM (it cannot), so QUIC's ACKs only feed congestion control and
/// stream recovery. With every shard in its own packet they were most of the return
/// traffic: measured on the simulator at 10% loss, 4,600 ACK-only packets against 2,000
/// surelink acks for 2,000 payments. Only takes effect when both ends support quinn's
/// ACK-frequency extension (both are quinn here).
pub fn ack_frequency_config() -> quinn::AckFrequencyConfig {
    let mut a = quinn::AckFrequencyConfig::default();
    a.ack_eliciting_threshold(quinn::VarInt::from_u32(8));
    a
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// rustls refused the certificate, key or roots.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// rustls produced a configuration QUIC cannot use.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The client-certificate verifier could not be built (e.g. no usable client CA).
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The rustls crypto provider of every TLS config surelink builds: aws-lc-rs with the
/// `aws-lc-rs` feature (the default, as in rustls: it offers hybrid post-quantum key exchange,
/// X25519MLKEM768, and rustls prefers it), else ring (the `ring` feature, without
/// post-quantum key exchange). With both features aws-lc-rs wins.
///
/// This decides the TLS handshake and packet protection of surelink's configs only. quinn's
/// own helpers (`quinn::ServerConfig::with_single_cert`, `quinn::ClientConfig::
/// with_root_certificates`) and its stateless-reset and token keys prefer ring when both are
/// compiled in (the default build has no ring).
pub(super) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    #[cfg(feature = "aws-lc-rs")]
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    // ring has no post-quantum key exchange, which is why rustls (0.23.48 on) deprecates its
    // default provider; the `ring` feature is the choice of a build that cannot have a C
    // toolchain, made knowingly (see Cargo.toml), so the warning is not every adopter's.
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    Arc::new(provider)
}

#[cfg(not(any(feature = "ring", feature = "aws-lc-rs")))]
compile_error!(
    "surelink needs a crypto provider: enable its feature `ring` (the default) or `aws-lc-rs`"
);

/// A client config trusting `roots`, offering ALPN [`ALPN_PROTOCOLS`] (protocol 2, else 1),
/// TLS 1.3 only, no early data, and [`transport_config`].
pub fn client_config(roots: rustls::RootCertStore) -> Result<quinn::ClientConfig, ConfigError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn_protocols();
    tls.enable_early_data = false;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A server config presenting `cert_chain` and `key`, accepting ALPN [`ALPN_PROTOCOLS`]
/// (protocol 2 preferred, 1 for older clients), with 0-RTT off (early data can be replayed:
/// RFC 9001 §9.2) and [`transport_config`].
pub fn server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<quinn::ServerConfig, ConfigError> {
    server_config_with_protocols(cert_chain, key, alpn_protocols())
}

/// Like [`server_config`], accepting the ALPN `protocols` instead, in preference order, for
/// an endpoint that serves other protocols beside surelink (include [`ALPN_PROTOCOLS`], in
/// their order; dispatch on the connection's negotiated protocol: [`Server`] has an
/// example). QUIC requires ALPN (RFC 9001 §8.1): clients must offer one of these.
pub fn server_config_with_protocols(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    protocols: Vec<Vec<u8>>,
) -> Result<quinn::ServerConfig, ConfigError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert_chain, key)?;
    tls.alpn_protocols = protocols;
    tls.max_early_data_size = 0;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Why [`Channel::connect`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The connection could not be started (bad server name, endpoint closed, …).
    #[error("cannot connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake or the Hello failed.
    #[error("connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The Hello could not be written.
    #[error("cannot send the channel's hello: {0}")]
    Hello(String),
    /// The connection does not carry DATAGRAM frames.
    #[error("the connection does not carry QUIC datagrams")]
    DatagramsUnsupported,
}

impl Channel {
    /// Connects to a surelink server (a [`Listener`] or [`Server`]) at `addr` and opens a
    /// channel with a new random id. `server_name` is the name the server's certificate is
    /// issued for. `client_config` defaults to the endpoint's; build one with
    /// [`client_config`] or [`client_config_with`](super::client_config_with) for
    /// surelink's ALPN and transport settings. Returns once the handshake and the Hello are
    /// done. When the connection is lost the channel reconnects as [`Config::reconnect`]
    /// says and re-sends unacked messages with their ids; the server delivers none twice.
    ///
    /// The crate root's quickstart shows a client and a server.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
        client_config: Option<quinn::ClientConfig>,
        config: Config,
    ) -> Result<(Channel, Messages), ConnectError> {
        let dialer = Dialer {
            endpoint: endpoint.clone(),
            addrs: vec![addr],
            server_name: server_name.to_owned(),
            client_config,
            channel_id: rand::random(),
        };
        let span = tracing::info_span!("surelink.connect", server = %addr, name = server_name);
        let dialed = tracing::Instrument::instrument(dialer.dial(addr, 0), span.clone()).await;
        let (conn, attached) = span.in_scope(|| match dialed {
            Ok(c) => {
                tracing::debug!("connected");
                Ok(c)
            }
            Err(e) => {
                tracing::debug!(error = %e, "connect failed");
                Err(e)
            }
        })?;
        Self::start(dialer, 0, attached, conn, config)
    }

    /// Like [`Channel::connect`], over several replicas of one service (`replicas[0]`
    /// preferred): it connects to the first that answers, in order, and when the connection
    /// is lost it fails over to the next, re-sending unacked messages with their ids. The
    /// replicas must share a claims store ([`Config::store`] on their side): a replica that
    /// never held the channel then takes it over, and the store keeps each message delivered
    /// at most once between them. `stats().failovers` counts the moves.
    pub async fn connect_replicas(
        endpoint: &quinn::Endpoint,
        replicas: &[SocketAddr],
        server_name: &str,
        client_config: Option<quinn::ClientConfig>,
        config: Config,
    ) -> Result<(Channel, Messages), ConnectError> {
        let dialer = Dialer {
            endpoint: endpoint.clone(),
            addrs: replicas.to_vec(),
            server_name: server_name.to_owned(),
            client_config,
            channel_id: rand::random(),
        };
        let mut last = ConnectError::Hello("no replica given".into());
        for index in 0..replicas.len() {
            match dialer
                .attempt(index, 0, config.reconnect.attempt_timeout)
                .await
            {
                Ok((conn, attached)) => {
                    return Self::start(dialer, index, attached, conn, config);
                }
                Err(e) => {
                    tracing::debug!(error = %e, replica = index, "connect failed");
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn start(
        dialer: Dialer,
        current: usize,
        attached: Attached,
        conn: quinn::Connection,
        config: Config,
    ) -> Result<(Channel, Messages), ConnectError> {
        let id = dialer.channel_id;
        let reattach = Reattach::Dial {
            dialer: Box::new(dialer),
            current,
            attached,
        };
        driver::spawn(conn, config, id, reattach, 0, None).map_err(|e| match SendError::from(e) {
            SendError::DatagramsUnsupported => ConnectError::DatagramsUnsupported,
            other => ConnectError::Hello(other.to_string()),
        })
    }
}

/// Why a server did not open a channel on a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AcceptError {
    /// The connection failed before its Hello arrived.
    #[error("connection failed before its hello: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// No Hello within [`Config::hello_timeout`]. The connection is not closed explicitly (it
    /// may be a non-surelink client on a shared endpoint): it stays open while the caller
    /// holds another handle to it, otherwise quinn closes it (code 0) once
    /// [`Server::accept_connection`], which took it, drops it. [`Listener`] keeps no other
    /// handle.
    #[error("no hello within {0:?}")]
    HelloTimeout(Duration),
    /// The connection's first bidirectional stream did not hold a valid Hello: its bytes did
    /// not decode as one (the connection was closed with the refusal code, 2), or the stream
    /// could not be read (reset, or longer than 64 bytes; the connection was not closed
    /// explicitly, as for [`AcceptError::HelloTimeout`]).
    #[error("invalid hello: {0}")]
    InvalidHello(String),
    /// [`Config::max_channels`] channels are open; the connection was closed.
    #[error("{0} channels open, the limit; connection refused")]
    TooManyChannels(usize),
    /// The connection does not carry DATAGRAM frames; it was closed.
    #[error("the connection does not carry QUIC datagrams")]
    DatagramsUnsupported,
    /// The connection named a channel that another client identity opened (its TLS
    /// certificate differs from the one the channel started with, on this server or, with a
    /// shared claims store, on any replica: [`DedupeStore::bind_channel`](crate::store::DedupeStore::bind_channel));
    /// it was closed with the refusal code and the channel was left untouched.
    #[error("the channel belongs to another client identity; connection refused")]
    NotOwner,
    /// The connection named a channel this server does not hold, and the claims store did
    /// not answer who owns it (an error, or no answer within [`Config::claim_attempt_timeout`]):
    /// the connection was closed with the goodbye code, so the client tries again later or
    /// at another replica. A channel is never taken over without the store's answer.
    #[error("the claims store could not bind the channel to its client: {0}; connection closed")]
    StoreUnavailable(String),
    /// The server is shutting down ([`Server::shutdown`]); the connection was closed with
    /// the goodbye code, so the client tries elsewhere (another replica) or later.
    #[error("the server is shutting down; connection closed")]
    ShuttingDown,
}

struct ServerInner {
    config: Config,
    channels: Mutex<HashMap<ChannelId, Entry>>,
    /// Reattaches refused because the client identity differed.
    not_owner: std::sync::atomic::AtomicU64,
    /// Set by [`Server::shutdown`]: no channel opens or reattaches any more.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Without a claims store: idempotency keys delivered by any of this server's channels.
    keys: Option<SharedKeys>,
}

/// A channel the server holds: where its new connections go, and the client identity it
/// started with (the end-entity certificate under mutual TLS, else `None`).
struct Entry {
    tx: mpsc::UnboundedSender<quinn::Connection>,
    identity: Option<CertificateDer<'static>>,
    /// The channel's driver, to close it at a shutdown.
    commands: mpsc::UnboundedSender<Command>,
}

/// The client's end-entity certificate on `conn`, if it presented one.
fn client_identity(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}

/// The client on `conn` (the accepting end), as keys and channel owners name it: the
/// SHA-256 of its end-entity certificate under mutual TLS, else
/// [`ANONYMOUS`](crate::proto::ANONYMOUS).
pub(super) fn client_scope(conn: &quinn::Connection) -> Scope {
    client_identity(conn).map_or(ANONYMOUS, |cert| {
        use sha2::Digest as _;
        sha2::Sha256::digest(cert.as_ref()).into()
    })
}

impl ServerInner {
    /// Forgets channel `id` if its driver has stopped.
    fn remove_closed(&self, id: &ChannelId) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channels.get(id).is_some_and(|e| e.tx.is_closed()) {
            channels.remove(id);
        }
    }
}

/// The server side's registry of channels by id: it opens a channel for a new id and hands
/// a reconnecting client's new connection to its existing channel, whose dedupe state
/// carries over. Cheap to clone.
///
/// **Who a client is.** Under mutual TLS ([`server_config_mtls`](super::server_config_mtls))
/// a client is its end-entity certificate, and two things are its own:
/// - its idempotency keys: two clients' `order-42` are two payments, each delivered once
///   (the keys are scoped by the SHA-256 of the certificate: [`Channel::key_scope`]), in
///   this server's key record and in a claims store shared by replicas;
/// - its channels: a connection from another certificate that names one of them is refused
///   ([`AcceptError::NotOwner`]), here while the server holds the channel and, with a claims
///   store ([`Config::store`]), on every replica sharing it, which binds each channel id to
///   its client before taking it over ([`DedupeStore::bind_channel`](crate::store::DedupeStore::bind_channel)).
///   A replica that cannot get the store's answer closes the connection with
///   [`GOODBYE`](super::GOODBYE) ([`AcceptError::StoreUnavailable`]): the client retries.
///
/// Without mutual TLS the server cannot tell clients apart: every client is the same
/// anonymous one. All of them share one key namespace, so keys must be unique across
/// clients (a UUID, or a terminal or merchant id before the order number: `till-7/order-42`);
/// a key another client used within the key TTL is taken for a replay (same payload) or
/// refused (another payload). And a channel id is a bearer token: whoever presents it gets
/// the channel (on a replica with a store, the right to claim its message ids), so clients
/// must keep it secret. With [`Config::application_claims`] and no store, ownership is
/// checked only on the server that holds the channel.
///
/// A [`Listener`] runs one over an endpoint of its own. Use a `Server` directly when the
/// application accepts connections itself, for example on an endpoint that also serves
/// other ALPN protocols ([`server_config_with_protocols`]):
///
/// ```
/// use surelink::channel::{self, Channel, Config, Identity, Server};
/// use surelink::quinn::Endpoint;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let identity = Identity::self_signed(["localhost"])?;
/// # let mut roots = surelink::rustls::RootCertStore::empty();
/// # roots.add(identity.cert_chain[0].clone())?;
/// // surelink's ALPN ids (protocol 2, then 1 for older clients), then the others.
/// let mut protocols: Vec<Vec<u8>> = channel::ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect();
/// protocols.push(b"admin/1".to_vec());
/// let tls = channel::server_config_with_protocols(identity.cert_chain, identity.key, protocols)?;
/// let endpoint = Endpoint::server(tls, "127.0.0.1:0".parse()?)?;
/// # let addr = endpoint.local_addr()?;
/// let server = Server::new(Config::default());
/// tokio::spawn(async move {
///     while let Some(incoming) = endpoint.accept().await {
///         let server = server.clone();
///         tokio::spawn(async move {
///             let Ok(conn) = incoming.await else { return };
///             let alpn = conn.handshake_data().and_then(|d| {
///                 d.downcast::<surelink::quinn::crypto::rustls::HandshakeData>().ok()?.protocol
///             });
///             if !alpn.is_some_and(|p| channel::ALPN_PROTOCOLS.contains(&p.as_slice())) {
///                 return; // another protocol's connection
///             }
///             // `None`: a client that reconnected, handed to its existing channel.
///             if let Ok(Some((_channel, mut messages))) = server.accept_connection(conn).await {
///                 while let Some(message) = messages.recv().await {
///                     println!("{:?}", message.payload);
///                 }
///             }
///         });
///     }
/// });
/// # let client = Endpoint::client("127.0.0.1:0".parse()?)?;
/// # let client_config = Some(channel::client_config(roots)?);
/// # let (channel, _) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
/// # channel.send_with_key("order-1", "pay").await?;
/// # channel.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("channels", &self.channels())
            .finish()
    }
}

/// Logs, once per process, that a server keeps its idempotency keys in memory only (no
/// claims store, or one that is not durable, and no application claims): "a retry with the
/// same key is safe" then holds only until the process restarts.
fn warn_if_keys_are_not_durable(config: &Config) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !keys_are_durable(config) && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!(
            "surelink: this server keeps idempotency keys in this process's memory only: a \
             restart or a rolling deploy forgets them, and a payment retried under its key \
             after that can be delivered again; for payments, set Config::store to a durable \
             claims store (store::PgStore)"
        );
    }
}

/// Whether a server with `config` keeps its idempotency keys beyond its process: in a durable
/// claims store, or in the application's own (the inbox pattern).
fn keys_are_durable(config: &Config) -> bool {
    config.application_claims || config.store.as_ref().is_some_and(|s| s.is_durable())
}

impl Server {
    /// A registry whose channels use `config`. Without a durable claims store
    /// ([`Config::store`]) it logs a warning once per process: its idempotency keys do not
    /// survive a restart.
    pub fn new(config: Config) -> Self {
        crate::metrics::describe_once();
        warn_if_keys_are_not_durable(&config);
        Server {
            inner: Arc::new(ServerInner {
                channels: Mutex::new(HashMap::new()),
                not_owner: std::sync::atomic::AtomicU64::new(0),
                shutting_down: std::sync::atomic::AtomicBool::new(false),
                keys: (config.store.is_none() && !config.application_claims)
                    .then(|| SharedKeys::new(config.receiver.key_ttl, config.receiver.max_keys)),
                config,
            }),
        }
    }

    /// Channels held (connected or waiting for their client to reconnect).
    pub fn channels(&self) -> usize {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Connections refused because they named a channel opened by another client identity
    /// (under mutual TLS; see [`AcceptError::NotOwner`]): held by this server, or bound to
    /// another client in the claims store.
    pub fn reattaches_refused(&self) -> u64 {
        self.inner
            .not_owner
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Shuts the server down in order: no channel opens or reattaches any more (such
    /// connections are closed with [`GOODBYE`](super::GOODBYE), so clients fail over or come
    /// back later); every channel drains (its own sends and the claims in flight finish, so
    /// their acks go out) for up to `grace`, then closes its connection with a goodbye.
    /// Deliveries already made are still handed to the application's `Messages`. Returns
    /// once every channel's connection is closed.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner
            .shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let commands: Vec<_> = {
            let channels = self
                .inner
                .channels
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            channels.values().map(|e| e.commands.clone()).collect()
        };
        let deadline = tokio::time::Instant::now() + grace;
        let mut closing = Vec::new();
        for c in &commands {
            let (done, closed) = tokio::sync::oneshot::channel();
            let drain = Command::Close {
                drain: true,
                done: Some(done),
            };
            if c.send(drain).is_ok() {
                closing.push(closed);
            }
        }
        for closed in closing {
            let _ = tokio::time::timeout_at(deadline, closed).await;
        }
        for c in commands {
            let (done, closed) = tokio::sync::oneshot::channel();
            let abort = Command::Close {
                drain: false,
                done: Some(done),
            };
            if c.send(abort).is_ok() {
                let _ = closed.await;
            }
        }
    }

    /// Reads the Hello of an established connection and opens its channel: `Some` for a new
    /// channel id, `None` when the connection was handed to an existing channel (a client
    /// that reconnected). A refusal is logged (at `warn` or `info`) and counted in
    /// `surelink_connections_refused_total` (see [`crate::metrics`]).
    pub async fn accept_connection(
        &self,
        conn: quinn::Connection,
    ) -> Result<Option<(Channel, Messages)>, AcceptError> {
        let span = tracing::debug_span!("surelink.accept", remote = %conn.remote_address());
        let result = tracing::Instrument::instrument(self.hello(conn), span.clone()).await;
        if let Err(e) = &result {
            span.in_scope(|| refused(e));
        }
        result
    }

    async fn hello(
        &self,
        conn: quinn::Connection,
    ) -> Result<Option<(Channel, Messages)>, AcceptError> {
        let timeout = self.inner.config.hello_timeout;
        let (mut answer, hello) = tokio::time::timeout(timeout, async {
            let (send, mut recv) = conn.accept_bi().await?;
            let hello = recv
                .read_to_end(64)
                .await
                .map_err(|e| AcceptError::InvalidHello(e.to_string()))?;
            Ok::<_, AcceptError>((send, hello))
        })
        .await
        .map_err(|_| AcceptError::HelloTimeout(timeout))??;
        let hello = match Frame::decode(hello.into(), &Limits::default()) {
            Ok(Frame::Hello(h)) => h,
            Ok(other) => {
                conn.close(REFUSED.into(), b"expected a hello");
                return Err(AcceptError::InvalidHello(format!("{other:?}")));
            }
            Err(e) => {
                conn.close(REFUSED.into(), b"invalid hello");
                return Err(AcceptError::InvalidHello(e.to_string()));
            }
        };
        self.bind(&conn, &hello.channel_id).await?;
        let (opened, status) = self.attach(conn, hello)?;
        // The client waits for this byte before it sends: it learns whether its messages may
        // be re-sent with their ids (the channel's dedupe window is still here) or not.
        let _ = answer.write_all(&[status]).await;
        let _ = answer.finish();
        Ok(opened)
    }

    /// With a claims store, binds a channel this server does not hold to the client on
    /// `conn` before it is taken over: another replica may hold it for another client
    /// (issue 21 case 7: whoever learned the id could otherwise claim the channel's future
    /// message ids here, and its owner's later payments would be acked as claimed before and
    /// never delivered). A channel held here is checked by [`Server::attach`] instead.
    async fn bind(
        &self,
        conn: &quinn::Connection,
        channel_id: &ChannelId,
    ) -> Result<(), AcceptError> {
        let Some(store) = self.inner.config.store.clone() else {
            return Ok(());
        };
        let held = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(channel_id)
            .is_some_and(|e| !e.tx.is_closed());
        if held
            || self
                .inner
                .shutting_down
                .load(std::sync::atomic::Ordering::SeqCst)
        {
            // Held: `attach` compares identities. Shutting down: `attach` refuses.
            return Ok(());
        }
        let timeout = self.inner.config.claim_attempt_timeout;
        let owner = client_scope(conn);
        match tokio::time::timeout(timeout, store.bind_channel(*channel_id, owner)).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => {
                self.inner
                    .not_owner
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    channel = %driver::tag(channel_id),
                    remote = %conn.remote_address(),
                    "surelink: a connection named a channel bound to another client identity \
                     in the claims store; refused"
                );
                conn.close(REFUSED.into(), b"not this channel's client");
                Err(AcceptError::NotOwner)
            }
            Ok(Err(e)) => {
                conn.close(super::GOODBYE.into(), b"claims store unavailable");
                Err(AcceptError::StoreUnavailable(e.to_string()))
            }
            Err(_) => {
                conn.close(super::GOODBYE.into(), b"claims store unavailable");
                Err(AcceptError::StoreUnavailable(format!(
                    "no answer within {timeout:?}"
                )))
            }
        }
    }

    /// Hands `conn` to channel `channel_id`, or opens it; the Hello's answer goes with it.
    #[allow(clippy::type_complexity)]
    fn attach(
        &self,
        conn: quinn::Connection,
        hello: HelloFrame,
    ) -> Result<(Option<(Channel, Messages)>, u8), AcceptError> {
        let channel_id = hello.channel_id;
        let mut channels = self
            .inner
            .channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self
            .inner
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            conn.close(super::GOODBYE.into(), b"shutting down");
            return Err(AcceptError::ShuttingDown);
        }
        let identity = client_identity(&conn);
        let conn = match channels.get(&channel_id) {
            // A channel id alone must not be a bearer token: under mutual TLS only the
            // client that opened the channel may reattach to it.
            Some(entry) if !entry.tx.is_closed() && entry.identity != identity => {
                self.inner
                    .not_owner
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    channel = %driver::tag(&channel_id),
                    remote = %conn.remote_address(),
                    "surelink: a connection named a channel opened by another client identity; refused"
                );
                conn.close(REFUSED.into(), b"not this channel's client");
                return Err(AcceptError::NotOwner);
            }
            Some(entry) => match entry.tx.send(conn) {
                Ok(()) => return Ok((None, HELLO_RESUMED)),
                // Its driver stopped just now: start the channel afresh.
                Err(mpsc::error::SendError(conn)) => {
                    channels.remove(&channel_id);
                    conn
                }
            },
            None => conn,
        };
        if channels.len() >= self.inner.config.max_channels {
            conn.close(REFUSED.into(), b"too many channels");
            return Err(AcceptError::TooManyChannels(channels.len()));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let server = Arc::downgrade(&self.inner);
        let reattach = Reattach::Registry {
            rx,
            on_stop: Box::new(move || {
                // The driver's receiver was dropped just now, so the registry entry is stale.
                if let Some(server) = server.upgrade() {
                    server.remove_closed(&channel_id);
                }
            }),
        };
        // With a claims store shared by replicas, a channel this server never held may have
        // run on another replica: take it over from the client's floor, and let the store
        // judge re-sent messages.
        let config = &self.inner.config;
        // Without a store the client must not re-send what it had in flight (HELLO_NEW), but
        // its window still starts at its floor: its next ids are above it, and a window
        // starting at 0 would refuse them all once it used more than `dedupe_window` ids
        // (issue case 4).
        let status = if config.store.is_some() || config.application_claims {
            HELLO_CLAIMS
        } else {
            HELLO_NEW
        };
        let floor = hello.floor;
        let opened = driver::spawn(
            conn.clone(),
            self.inner.config.clone(),
            channel_id,
            reattach,
            floor,
            self.inner.keys.clone(),
        )
        .map_err(|_| {
            conn.close(REFUSED.into(), b"datagrams required");
            AcceptError::DatagramsUnsupported
        })?;
        let commands = opened.0.inner.commands.clone();
        channels.insert(
            channel_id,
            Entry {
                tx,
                identity,
                commands,
            },
        );
        Ok((Some(opened), status))
    }
}

/// Logs and counts a connection the server refused.
fn refused(e: &AcceptError) {
    let reason = match e {
        AcceptError::Connection(_) => "connection_lost",
        AcceptError::HelloTimeout(_) => "hello_timeout",
        AcceptError::InvalidHello(_) => "invalid_hello",
        AcceptError::TooManyChannels(_) => "too_many_channels",
        AcceptError::DatagramsUnsupported => "datagrams_unsupported",
        AcceptError::NotOwner => "not_owner",
        AcceptError::ShuttingDown => "shutting_down",
        AcceptError::StoreUnavailable(_) => "store_unavailable",
    };
    crate::metrics::connection_refused(reason);
    // Counted in full above; logged at most a few lines a second (a flood is not a log
    // flood), each saying how many were suppressed before it.
    let Some(suppressed) = crate::metrics::failure_log() else {
        return;
    };
    match e {
        // Not a refusal: the client went away (or the path failed) before its Hello.
        AcceptError::Connection(_) => tracing::debug!(error = %e, "surelink: connection lost"),
        // Logged where it was decided, with the channel's tag.
        AcceptError::NotOwner => {}
        AcceptError::HelloTimeout(_) | AcceptError::ShuttingDown => {
            tracing::info!(error = %e, suppressed, "surelink: connection refused")
        }
        AcceptError::InvalidHello(_)
        | AcceptError::TooManyChannels(_)
        | AcceptError::DatagramsUnsupported
        | AcceptError::StoreUnavailable(_) => {
            tracing::warn!(error = %e, suppressed, "surelink: connection refused")
        }
    }
}

/// Accepts surelink channels on an endpoint: handshakes and Hellos run concurrently in the
/// background; [`Listener::accept`] yields each new channel. A client that reconnects is
/// handed to its existing channel (its messages keep their ids, none is delivered twice),
/// so `accept` yields each channel once.
///
/// The usual server: one task per channel, and an orderly shutdown.
///
/// ```
/// use std::time::Duration;
/// use surelink::channel::{self, Channel, Config, Identity, Listener};
/// use surelink::quinn::Endpoint;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let identity = Identity::self_signed(["localhost"])?;
/// # let mut roots = surelink::rustls::RootCertStore::empty();
/// # roots.add(identity.cert_chain[0].clone())?;
/// let tls = channel::server_config(identity.cert_chain, identity.key)?;
/// let endpoint = Endpoint::server(tls, "127.0.0.1:0".parse()?)?;
/// # let addr = endpoint.local_addr()?;
/// let mut listener = Listener::new(endpoint, Config::default());
/// # let client = Endpoint::client("127.0.0.1:0".parse()?)?;
/// # let client_config = Some(channel::client_config(roots)?);
/// # let (channel, _) = Channel::connect(&client, addr, "localhost", client_config, Config::default()).await?;
/// # let client = tokio::spawn(async move {
/// #     channel.send_with_key("order-1", "pay 10.00 EUR").await.unwrap();
/// #     channel.close().await;
/// # });
/// // Accept channels until it is time to stop (here: the first channel ended).
/// let (_channel, mut messages) = listener.accept().await.expect("a channel");
/// let worker = tokio::spawn(async move {
///     while let Some(payment) = messages.recv().await {
///         println!("{:?}: {:?}", payment.key, payment.payload);
///     }
/// });
/// worker.await?;
/// // Stop accepting; every channel drains for up to 5 s, then closes with a goodbye.
/// listener.shutdown(Duration::from_secs(5)).await;
/// # client.await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Listener {
    server: Server,
    rx: mpsc::Receiver<(Channel, Messages)>,
    task: tokio::task::JoinHandle<()>,
    expiry: Option<tokio::task::JoinHandle<()>>,
    admission: Arc<std::sync::Mutex<crate::proto::admission::Admission>>,
}

/// A filter a [`Listener`] asks about each connection attempt before any work
/// ([`Listener::with_filter`]): `false` refuses it.
pub type IncomingFilter = Arc<dyn Fn(&quinn::Incoming) -> bool + Send + Sync>;

impl Listener {
    /// Starts accepting on `endpoint` (which needs a server config: see [`server_config`]).
    pub fn new(endpoint: quinn::Endpoint, config: Config) -> Listener {
        Self::with_filter(endpoint, config, Arc::new(|_| true))
    }

    /// Like [`Listener::new`], with `filter` asked about each connection attempt before any
    /// work (its remote address, whether it is validated: quinn's `Incoming`): `false`
    /// refuses it at once (counted, reason `filtered`). For per-address rules of the
    /// application's own (a deny list, a rate per address). Admission control
    /// ([`Config::admission`]) applies to what it lets through.
    pub fn with_filter(
        endpoint: quinn::Endpoint,
        config: Config,
        filter: IncomingFilter,
    ) -> Listener {
        use crate::proto::admission::{Admission, Admit};
        // Claims older than the store's TTL are swept ten times per TTL (at most hourly).
        let expiry = config.store.clone().map(|store| {
            let every = (store.ttl() / 10).clamp(Duration::from_secs(1), Duration::from_secs(3600));
            crate::store::spawn_expiry(store, every)
        });
        let admission = Arc::new(std::sync::Mutex::new(Admission::new(config.admission)));
        let server = Server::new(config);
        let (tx, rx) = mpsc::channel(64);
        let registry = server.clone();
        let gate = admission.clone();
        let task = tokio::spawn(async move {
            while let Some(incoming) = endpoint.accept().await {
                if !filter(&incoming) {
                    crate::metrics::connection_refused("filtered");
                    incoming.refuse();
                    continue;
                }
                let admit = gate.lock().unwrap_or_else(|e| e.into_inner()).decide(
                    incoming.remote_address().ip(),
                    incoming.remote_address_validated(),
                    incoming.may_retry(),
                );
                crate::metrics::admission(admit, &gate);
                match admit {
                    Admit::Accept => {}
                    Admit::Retry => {
                        if incoming.retry().is_err() {
                            // quinn could not send one (already retried): dropped.
                            crate::metrics::connection_refused("handshake_cap");
                        }
                        continue;
                    }
                    Admit::Ignore => {
                        crate::metrics::connection_refused("handshake_cap");
                        incoming.ignore();
                        continue;
                    }
                }
                let (registry, tx, gate) = (registry.clone(), tx.clone(), gate.clone());
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    let handshake = incoming.await;
                    crate::metrics::admission_ended(&gate, remote.ip());
                    let conn = match handshake {
                        Ok(c) => c,
                        Err(e) => {
                            crate::metrics::handshake_failed(remote, &e);
                            return;
                        }
                    };
                    // A reconnect (`None`) joined its channel; a refusal was logged and
                    // counted by `accept_connection`.
                    if let Ok(Some(channel)) = registry.accept_connection(conn).await {
                        let _ = tx.send(channel).await;
                    }
                });
            }
        });
        Listener {
            server,
            rx,
            task,
            expiry,
            admission,
        }
    }

    /// Its admission counters: handshakes in progress, accepted, Retries sent, attempts
    /// ignored at the cap ([`Config::admission`]).
    pub fn admission(&self) -> crate::proto::admission::AdmissionStats {
        self.admission
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stats()
    }

    /// The next new channel; `None` once the endpoint is closed.
    pub async fn accept(&mut self) -> Option<(Channel, Messages)> {
        self.rx.recv().await
    }

    /// The registry behind this listener.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Stops accepting and shuts every channel down in order ([`Server::shutdown`]):
    /// channels drain for up to `grace`, then close with a goodbye. Channels not yet taken
    /// with [`Listener::accept`] are dropped (nothing of theirs is acked any more).
    pub async fn shutdown(&mut self, grace: Duration) {
        self.server.shutdown(grace).await;
        self.task.abort();
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(expiry) = &self.expiry {
            expiry.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    /// The crate features pick the provider (rustls names them only in `Debug`).
    #[test]
    fn the_crypto_provider_follows_the_features() {
        let key_provider = format!("{:?}", super::provider().key_provider);
        let expected = if cfg!(feature = "aws-lc-rs") {
            "AwsLcRs"
        } else {
            "Ring"
        };
        assert_eq!(key_provider, expected);
    }

    /// Issue 26, item 3: a server warns when its keys would not survive a restart: no
    /// store, or an in-memory one; not with the inbox pattern (the application's store).
    #[test]
    fn keys_are_durable_only_in_a_durable_store_or_the_applications() {
        use std::sync::Arc;
        let mut config = super::Config::default();
        assert!(!super::keys_are_durable(&config), "no store");
        config.store = Some(Arc::new(crate::store::MemoryStore::default()));
        assert!(!super::keys_are_durable(&config), "in memory");
        config.application_claims = true;
        assert!(super::keys_are_durable(&config), "the application's");
    }
}
