//! TLS identity: certificates and keys from PEM or DER files, the client's trust (a CA or a
//! pinned server certificate, optionally with a client certificate of its own), and a server
//! that requires client certificates from a given CA (mutual TLS).
//!
//! Every config these helpers build is TLS 1.3 only, offers (a client) or accepts (a server)
//! ALPN [`ALPN_PROTOCOLS`](super::ALPN_PROTOCOLS), protocol 2 before 1, never
//! sends or accepts early data (0-RTT: RFC 9001 §9.2, RFC 8446 §8, early data can be replayed,
//! and a replayed payment is a second payment), and carries [`transport_config`].

use std::path::Path;
use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::rustls;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use super::connect::{alpn_protocols, provider, transport_config, ConfigError};

/// Why a certificate or key could not be used or made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is PEM but holds nothing of the kind asked for, or is malformed.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What was wrong.
        what: String,
    },
    /// A self-signed certificate could not be made (`Identity::self_signed`; for example
    /// a name that is neither a DNS name nor an IP address).
    #[error("self-signed certificate: {0}")]
    SelfSigned(String),
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(path).map_err(|source| IdentityError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn is_pem(data: &[u8]) -> bool {
    data.windows(11).any(|w| w == b"-----BEGIN ")
}

/// Certificates from `path`: every `CERTIFICATE` block of a PEM file (a chain, end entity
/// first), or one DER certificate.
pub fn load_certs(path: impl AsRef<Path>) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let path = path.as_ref();
    let data = read(path)?;
    if !is_pem(&data) {
        return Ok(vec![CertificateDer::from(data)]);
    }
    let certs = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            path: path.display().to_string(),
            what: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(IdentityError::Pem {
            path: path.display().to_string(),
            what: "no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The private key in `path`: a PEM file (PKCS #8, PKCS #1 or SEC1) or a DER PKCS #8 key.
pub fn load_key(path: impl AsRef<Path>) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let path = path.as_ref();
    let data = read(path)?;
    if !is_pem(&data) {
        return Ok(PrivatePkcs8KeyDer::from(data).into());
    }
    PrivateKeyDer::from_pem_slice(&data).map_err(|e| IdentityError::Pem {
        path: path.display().to_string(),
        what: format!("no usable private key: {e}"),
    })
}

/// How a client decides to trust the server.
#[derive(Clone, Debug)]
pub enum ServerTrust {
    /// Certificates chaining to one of these roots, for the name the client dials.
    Roots(rustls::RootCertStore),
    /// Exactly one of these certificates (compared byte for byte with the server's end-entity
    /// certificate; name and validity dates are not checked, the pin is the trust). The
    /// server must still prove it holds the certificate's key.
    Pinned(Vec<CertificateDer<'static>>),
}

impl ServerTrust {
    /// Trust the CA certificates in `path` (PEM or DER).
    pub fn ca_file(path: impl AsRef<Path>) -> Result<ServerTrust, IdentityError> {
        let path = path.as_ref();
        let mut roots = rustls::RootCertStore::empty();
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|e| IdentityError::Pem {
                path: path.display().to_string(),
                what: format!("not a usable CA certificate: {e}"),
            })?;
        }
        Ok(ServerTrust::Roots(roots))
    }

    /// Pin the server certificate(s) in `path` (PEM or DER).
    pub fn pinned_file(path: impl AsRef<Path>) -> Result<ServerTrust, IdentityError> {
        Ok(ServerTrust::Pinned(load_certs(path)?))
    }
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The chain, end entity first.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The end entity's key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a chain and its key from files (PEM or DER).
    pub fn from_files(
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Identity, IdentityError> {
        Ok(Identity {
            cert_chain: load_certs(cert)?,
            key: load_key(key)?,
        })
    }
}

#[cfg(feature = "rcgen")]
impl Identity {
    /// A new self-signed certificate for `names` (DNS names or IP addresses, the names
    /// clients dial) and its key, for development and tests (feature `rcgen`). Clients
    /// trust it by adding its certificate to their roots (or pinning it:
    /// [`ServerTrust::Pinned`]). In production, load a certificate issued for the service
    /// instead ([`Identity::from_files`]).
    ///
    /// ```
    /// use surelink::channel::{self, Identity};
    ///
    /// let identity = Identity::self_signed(["localhost"])?;
    /// // The client side: trust exactly this certificate.
    /// let mut roots = surelink::rustls::RootCertStore::empty();
    /// roots.add(identity.cert_chain[0].clone())?;
    /// let client_config = channel::client_config(roots)?;
    /// // The server side: present it.
    /// let server_config = channel::server_config(identity.cert_chain, identity.key)?;
    /// # let _ = (client_config, server_config);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn self_signed<I>(names: I) -> Result<Identity, IdentityError>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let generated = rcgen::generate_simple_self_signed(names)
            .map_err(|e| IdentityError::SelfSigned(e.to_string()))?;
        let key = PrivatePkcs8KeyDer::from(generated.key_pair.serialize_der());
        Ok(Identity {
            cert_chain: vec![generated.cert.der().clone()],
            key: key.into(),
        })
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A client config: trust the server as `trust` says and, when `identity` is given, present
/// it as a client certificate (for servers that require one: [`server_config_mtls`]).
pub fn client_config_with(
    trust: ServerTrust,
    identity: Option<Identity>,
) -> Result<quinn::ClientConfig, ConfigError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Roots(roots) => builder.with_root_certificates(roots),
        ServerTrust::Pinned(pins) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    pins,
                    provider: provider(),
                }))
        }
    };
    let mut tls = match identity {
        Some(id) => builder.with_client_auth_cert(id.cert_chain, id.key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn_protocols();
    tls.enable_early_data = false;
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// A server config presenting `identity` that **requires** a client certificate chaining to
/// one of `client_roots` (mutual TLS): a client without one fails the handshake. The
/// channel's [`peer_identity`](super::Channel::peer_identity) then names the client, and the
/// client's certificate scopes its idempotency keys and owns its channels (see
/// [`Server`](super::Server)). 0-RTT off, ALPN [`ALPN_PROTOCOLS`](super::ALPN_PROTOCOLS),
/// [`transport_config`].
pub fn server_config_mtls(
    identity: Identity,
    client_roots: rustls::RootCertStore,
) -> Result<quinn::ServerConfig, ConfigError> {
    server_config_mtls_with_protocols(identity, client_roots, alpn_protocols())
}

/// [`server_config_mtls`] accepting `protocols` as ALPN ids, in preference order (for a
/// server that also serves something else on the same endpoint; include
/// [`ALPN_PROTOCOLS`](super::ALPN_PROTOCOLS), in their order). Every protocol requires the
/// client certificate.
pub fn server_config_mtls_with_protocols(
    identity: Identity,
    client_roots: rustls::RootCertStore,
    protocols: Vec<Vec<u8>>,
) -> Result<quinn::ServerConfig, ConfigError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        provider(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain, identity.key)?;
    tls.alpn_protocols = protocols;
    tls.max_early_data_size = 0;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Trusts exactly the pinned certificates; the handshake signature is still verified.
#[derive(Debug)]
struct Pinned {
    pins: Vec<CertificateDer<'static>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.iter().any(|p| p.as_ref() == end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
