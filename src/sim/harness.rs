//! A client and a server quinn endpoint over a [`SimNetwork`], with test certificates, in
//! one call.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use quinn::{ClientConfig, Connection, Endpoint, EndpointConfig, ServerConfig, TransportConfig};

use super::link::{LinkConfig, LinkCounters, LinkStats};
use super::memory::SimNetwork;
use super::udp::LossyUdpSocket;

/// The name the test certificate is issued for, and that clients connect to.
pub const SERVER_NAME: &str = "localhost";

/// Congestion controller for the endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// quinn's default, Cubic.
    #[default]
    Cubic,
    /// NewReno.
    NewReno,
    /// BBR (quinn's experimental implementation).
    Bbr,
    /// surelink's controller: BBR kept probe-able through a silence
    /// ([`crate::channel::congestion_controller`]).
    Surelink,
}

/// Settings of a [`Pair`].
#[derive(Clone, Debug)]
pub struct PairConfig {
    /// Seed of the network's links.
    pub seed: u64,
    /// The link from client to server.
    pub client_to_server: LinkConfig,
    /// The link from server to client.
    pub server_to_client: LinkConfig,
    /// Congestion controller on both ends.
    pub congestion: Congestion,
    /// quinn's initial RTT estimate. Default 100 ms instead of quinn's 333 ms, so a lost first
    /// handshake packet costs about 300 ms rather than 1 s.
    pub initial_rtt: Duration,
    /// quinn's idle timeout. Default 5 minutes instead of quinn's 30 s: at 30% loss each way
    /// quinn's probe timeouts back off exponentially, and a run of lost probes can leave a live
    /// connection silent for 30 s (measured: about 1 run in 40 of the quinn test in
    /// `tests/sim.rs` timed out with the default).
    pub idle_timeout: Duration,
    /// quinn's keep-alive interval; default none (quinn's default).
    pub keep_alive: Option<Duration>,
    /// The ACK frequency both ends ask of each other (quinn's draft extension); default none
    /// (quinn's default: an ACK every other ack-eliciting packet). surelink's recommendation is
    /// `channel::ack_frequency_config()`.
    pub ack_frequency: Option<quinn::AckFrequencyConfig>,
}

impl Default for PairConfig {
    fn default() -> Self {
        PairConfig {
            seed: 0,
            client_to_server: LinkConfig::default(),
            server_to_client: LinkConfig::default(),
            congestion: Congestion::default(),
            initial_rtt: Duration::from_millis(100),
            idle_timeout: Duration::from_secs(300),
            keep_alive: None,
            ack_frequency: None,
        }
    }
}

impl PairConfig {
    /// The same link config both ways.
    pub fn symmetric(link: LinkConfig) -> Self {
        PairConfig {
            client_to_server: link.clone(),
            server_to_client: link,
            ..PairConfig::default()
        }
    }
}

/// Why a [`Pair`] could not be built or connected.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Generating the test certificate failed.
    #[error("test certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] quinn::rustls::Error),
    /// The client's certificate verifier could not be built.
    #[error("certificate verifier: {0}")]
    Verifier(#[from] quinn::rustls::client::VerifierBuilderError),
    /// Creating an endpoint or socket failed.
    #[error("endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// The client could not start connecting.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The server endpoint closed before a connection arrived.
    #[error("server endpoint closed before the client connected")]
    ServerClosed,
}

/// A self-signed certificate for [`SERVER_NAME`] and its private key.
pub fn test_identity() -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), HarnessError> {
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
    let key = PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der());
    Ok((ck.cert.der().clone(), key.into()))
}

/// A transport config for simulated runs: the chosen congestion controller and initial RTT,
/// everything else quinn's default.
pub fn transport_config(congestion: Congestion, initial_rtt: Duration) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.initial_rtt(initial_rtt);
    match congestion {
        Congestion::Cubic => {}
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Congestion::Surelink => {
            t.congestion_controller_factory(crate::channel::congestion_controller());
        }
    }
    t
}

/// A client and a server endpoint: on one simulated network ([`Pair::new`], virtual-time
/// capable) or on real loopback UDP sockets ([`Pair::over_loopback`], real time).
#[derive(Debug)]
pub struct Pair {
    /// The simulated network, for [`Pair::new`]; `None` over loopback.
    pub net: Option<SimNetwork>,
    /// The client endpoint, with a default client config that trusts the server.
    pub client: Endpoint,
    /// The server endpoint.
    pub server: Endpoint,
    /// The client's address.
    pub client_addr: SocketAddr,
    /// The server's address.
    pub server_addr: SocketAddr,
    /// The client config in use (to connect again, or from another endpoint).
    pub client_config: ClientConfig,
    /// The server config in use (to restart the server on the same address).
    pub server_config: ServerConfig,
    up: Arc<LinkCounters>,
    down: Arc<LinkCounters>,
    /// The client's and the server's sockets, over loopback (for [`Pair::set_links`]).
    sockets: Option<(Arc<LossyUdpSocket>, Arc<LossyUdpSocket>)>,
}

/// Client and server configs sharing a fresh test identity and a transport config.
fn configs(config: &PairConfig) -> Result<(ClientConfig, ServerConfig), HarnessError> {
    let mut transport = transport_config(config.congestion, config.initial_rtt);
    transport.max_idle_timeout(config.idle_timeout.try_into().ok());
    transport.keep_alive_interval(config.keep_alive);
    transport.ack_frequency_config(config.ack_frequency.clone());
    let transport = Arc::new(transport);
    let (cert, key) = test_identity()?;
    let mut server_config = ServerConfig::with_single_cert(vec![cert.clone()], key)?;
    server_config.transport_config(transport.clone());
    let mut roots = quinn::rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut client_config = ClientConfig::with_root_certificates(Arc::new(roots))?;
    client_config.transport_config(transport);
    Ok((client_config, server_config))
}

fn endpoint(
    socket: Arc<dyn quinn::AsyncUdpSocket>,
    server: Option<ServerConfig>,
) -> Result<Endpoint, HarnessError> {
    Ok(Endpoint::new_with_abstract_socket(
        EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

impl Pair {
    /// Builds both endpoints on a new [`SimNetwork`]. Must be called inside a tokio runtime;
    /// runs in virtual time if tokio's clock is paused.
    pub fn new(config: PairConfig) -> Result<Pair, HarnessError> {
        let net = SimNetwork::new(config.seed);
        let client_addr: SocketAddr = ([10, 0, 0, 1], 50_000).into();
        let server_addr: SocketAddr = ([10, 0, 0, 2], 4433).into();
        net.set_link(client_addr, server_addr, config.client_to_server.clone());
        net.set_link(server_addr, client_addr, config.server_to_client.clone());
        let (client_config, server_config) = configs(&config)?;
        let server = Self::server_endpoint(&net, server_addr, server_config.clone())?;
        let mut client = endpoint(net.bind(client_addr)?, None)?;
        client.set_default_client_config(client_config.clone());
        Ok(Pair {
            up: net.link_counters(client_addr, server_addr),
            down: net.link_counters(server_addr, client_addr),
            net: Some(net),
            client,
            server,
            client_addr,
            server_addr,
            client_config,
            server_config,
            sockets: None,
        })
    }

    /// Builds both endpoints on real UDP sockets on 127.0.0.1, each applying its link to what
    /// it sends ([`LossyUdpSocket`]). Must be called inside a tokio runtime; real time.
    pub fn over_loopback(config: PairConfig) -> Result<Pair, HarnessError> {
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let client_socket =
            LossyUdpSocket::bind(any, config.client_to_server.clone(), config.seed)?;
        let server_socket =
            LossyUdpSocket::bind(any, config.server_to_client.clone(), config.seed ^ 0x5eed)?;
        let (client_addr, server_addr) = (
            quinn::AsyncUdpSocket::local_addr(&*client_socket)?,
            quinn::AsyncUdpSocket::local_addr(&*server_socket)?,
        );
        let (up, down) = (client_socket.counters(), server_socket.counters());
        let sockets = Some((client_socket.clone(), server_socket.clone()));
        let (client_config, server_config) = configs(&config)?;
        let server = endpoint(server_socket, Some(server_config.clone()))?;
        let mut client = endpoint(client_socket, None)?;
        client.set_default_client_config(client_config.clone());
        Ok(Pair {
            net: None,
            client,
            server,
            client_addr,
            server_addr,
            client_config,
            server_config,
            up,
            down,
            sockets,
        })
    }

    /// Changes both links from the next packet on, keeping their random state, queues and
    /// counters: `up` (client → server) and `down` (server → client). Works over a
    /// [`SimNetwork`] and over loopback alike. Blackouts stay measured from the links' start
    /// (when the pair was built), so a blackout "`s` after some instant" is `s` plus that
    /// instant's distance from the pair's construction.
    pub fn set_links(&self, up: LinkConfig, down: LinkConfig) {
        if let Some(net) = &self.net {
            net.set_link(self.client_addr, self.server_addr, up);
            net.set_link(self.server_addr, self.client_addr, down);
        } else if let Some((client, server)) = &self.sockets {
            client.set_link(up);
            server.set_link(down);
        }
    }

    /// A server endpoint bound at `addr` on `net` (e.g. to restart a server).
    pub fn server_endpoint(
        net: &SimNetwork,
        addr: SocketAddr,
        config: ServerConfig,
    ) -> Result<Endpoint, HarnessError> {
        endpoint(net.bind(addr)?, Some(config))
    }

    /// Connects the client to the server; returns (client side, server side).
    pub async fn connect(&self) -> Result<(Connection, Connection), HarnessError> {
        let connecting = self.client.connect(self.server_addr, SERVER_NAME)?;
        let accept = async {
            let incoming = self
                .server
                .accept()
                .await
                .ok_or(HarnessError::ServerClosed)?;
            Ok::<_, HarnessError>(incoming.await?)
        };
        let (client, server) = tokio::join!(connecting, accept);
        Ok((client?, server?))
    }

    /// Counters of the client → server link.
    pub fn up(&self) -> LinkStats {
        self.up.snapshot()
    }

    /// Counters of the server → client link.
    pub fn down(&self) -> LinkStats {
        self.down.snapshot()
    }
}

/// A throwaway certificate authority for tests and demos: it issues server and client
/// certificates (for mutual TLS) and writes them as PEM files.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate a [`TestCa`] issued, with its key.
#[derive(Debug)]
pub struct TestCert {
    /// The certificate (DER).
    pub cert: CertificateDer<'static>,
    /// Its private key (PKCS #8 DER).
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The certificate as PEM.
    pub cert_pem: String,
    /// The key as PEM.
    pub key_pem: String,
}

impl TestCa {
    /// A new CA whose certificate's common name is `name`.
    pub fn new(name: &str) -> Result<TestCa, HarnessError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa { cert, key })
    }

    /// The CA's certificate (DER), to trust.
    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// The CA's certificate as PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `name` (a DNS name such as [`SERVER_NAME`]).
    pub fn server(&self, name: &str) -> Result<TestCert, HarnessError> {
        self.issue(
            vec![name.to_string()],
            name,
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose common name is `name`.
    pub fn client(&self, name: &str) -> Result<TestCert, HarnessError> {
        self.issue(Vec::new(), name, rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        names: Vec<String>,
        common_name: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> Result<TestCert, HarnessError> {
        let mut params = rcgen::CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(TestCert {
            cert: cert.der().clone(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A blackout put on both links after the handshake drops what follows, and the links'
    /// counters carry over.
    async fn blackout_after_connect(pair: Pair) {
        let (client, server) = pair.connect().await.expect("handshake");
        // Let the handshake's last packets settle (no keep-alive: the links then stay quiet).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = (pair.up(), pair.down());
        assert!(before.0.delivered_packets > 0 && before.1.delivered_packets > 0);
        let dark = LinkConfig {
            blackouts: vec![Duration::ZERO..Duration::from_secs(3600)],
            ..LinkConfig::default()
        };
        pair.set_links(dark.clone(), dark);
        client
            .send_datagram(bytes::Bytes::from_static(b"lost"))
            .expect("datagram");
        let read = tokio::time::timeout(Duration::from_millis(300), server.read_datagram());
        assert!(read.await.is_err(), "a datagram crossed a blackout");
        let (up, down) = (pair.up(), pair.down());
        assert!(up.dropped_blackout > 0, "{up:?}");
        assert_eq!(up.delivered_packets, before.0.delivered_packets);
        assert_eq!(
            down.offered_packets - down.dropped_blackout,
            before.1.offered_packets
        );
    }

    #[tokio::test(start_paused = true)]
    async fn set_links_over_a_simulated_network() {
        blackout_after_connect(Pair::new(PairConfig::default()).expect("pair")).await;
    }

    #[tokio::test]
    async fn set_links_over_loopback() {
        blackout_after_connect(Pair::over_loopback(PairConfig::default()).expect("pair")).await;
    }
}
